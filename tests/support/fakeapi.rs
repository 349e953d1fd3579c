//! An in-process fake Kubernetes API server speaking real list and watch HTTP for Namespaces,
//! Pods and NetworkPolicies, behaving as kube-apiserver does where the agent depends on it:
//!
//! - lists: `resourceVersion=0` is served whole from the "watch cache" and `limit` is ignored
//!   (kube-apiserver: staging/src/k8s.io/apiserver/pkg/storage/cacher/cacher.go,
//!   `computeListLimit`: "the limit is ignored for requests that set RV == 0"); any other list
//!   with `limit` is paginated with `continue` tokens at a consistent resourceVersion, as etcd
//!   serves it (cacher/delegator.go, `shouldDelegateList`); a continue token or an exact
//!   resourceVersion older than the compaction gets 410 Expired;
//! - watches: newline-delimited events from a resourceVersion, bookmarks, an ERROR event with a
//!   410 Expired `Status` from a compacted (or, after a restart, unknown) resourceVersion, and
//!   closing after `timeoutSeconds` (or the server's own cap);
//! - 403 Forbidden `Status` for a kind whose permission is revoked, checked when a list or watch
//!   starts only: kube-apiserver authorizes a watch once, in its handler chain
//!   (staging/src/k8s.io/apiserver/pkg/endpoints/filters/authorization.go), and never cuts it
//!   later; 429 with Retry-After and a plain-text body, as API Priority and Fairness rejects
//!   (staging/src/k8s.io/apiserver/pkg/server/filters/maxinflight.go, `tooManyRequests`); 503
//!   while unavailable, connection refused while stopped, and connections reset on demand; a restart begins a new watch-cache history, so watches
//!   from before it get 410 as from a restarted kube-apiserver, whose cache starts at "now".
//!
//! - ClusterNetworkPolicy (policy.networking.k8s.io/v1alpha2) exists only while its
//!   CustomResourceDefinition is installed (`install_cluster_policy_crd`): before, discovery
//!   (`/apis/policy.networking.k8s.io/v1alpha2`) and the resource answer 404 with kube-apiserver's
//!   plain-text body (the end of its handler chain is `http.NotFound`:
//!   staging/src/k8s.io/apiserver/pkg/util/notfoundhandler/not_found_handler.go), after 403 is
//!   checked as for any path; installed, it is listed and watched like the built-in kinds.
//!   Deleting the definition deletes its objects first (DELETED events, as the CRD finalizer
//!   does), then ends the watches and answers 404 again.
//!
//! Every request is recorded (kind, query, User-Agent) for tests to check what clients send.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kube_netpol_iptables::dataplane::{SyncMode, SyncReport};
use kube_netpol_iptables::metrics::Metrics;
use kube_netpol_iptables::model::ClusterSnapshot;
use kube_netpol_iptables::source::kube::ClusterStore;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
    /// Cluster-scoped; the agent watches its own, by `fieldSelector=metadata.name=…`, and all
    /// while a ClusterNetworkPolicy selects nodes.
    Node,
    /// Cluster-scoped; served only while its CRD is installed.
    ClusterNetworkPolicy,
}

/// The group/version ClusterNetworkPolicy is served in.
pub const CNP_API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            Kind::ClusterNetworkPolicy => CNP_API_VERSION,
            _ => "v1",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Node => "Node",
            Kind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        }
    }
    /// The resource name, as in RBAC rules and error messages.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::Node => "nodes",
            Kind::ClusterNetworkPolicy => "clusternetworkpolicies",
        }
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub at: Instant,
    pub kind: Kind,
    pub watch: bool,
    pub query: BTreeMap<String, String>,
    pub user_agent: Option<String>,
    /// The HTTP status answered (200 for a watch that then sends a 410 ERROR event).
    pub status: u16,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// Watches, continue tokens and exact lists from a resourceVersion below this get 410.
    compacted_below: u64,
    objects: BTreeMap<Kind, BTreeMap<String, Value>>,
    /// Every change: (resourceVersion, kind, event type, object).
    log: Vec<(u64, Kind, &'static str, Value)>,
    held: Vec<Kind>,
    /// While set, open watches deliver nothing (as if the network between dropped packets).
    paused: bool,
    /// While set, every request gets 503 (an API server that is up but not serving).
    unavailable: bool,
    /// Kinds the client may not list and watch (403 Forbidden)...
    forbidden: BTreeSet<Kind>,
    /// ...or only not watch.
    watch_forbidden: BTreeSet<Kind>,
    /// The server closes every watch after this long, whatever `timeoutSeconds` asked.
    watch_cap: Option<Duration>,
    /// This many next requests get 429 Too Many Requests with `Retry-After: .1` seconds.
    throttled: (usize, u64),
    /// Whether the ClusterNetworkPolicy CRD is installed.
    cnp_crd: bool,
}

pub struct Shared {
    inner: Mutex<Inner>,
    changed: Notify,
    released: Notify,
    /// Bumping this ends every open watch connection.
    drop_tx: watch::Sender<u64>,
    /// Bumping this resets every open connection (TCP RST).
    reset_tx: watch::Sender<u64>,
    pub bookmarks_sent: AtomicUsize,
    pub lists_served: AtomicUsize,
    pub gone_sent: AtomicUsize,
    /// Discovery requests for `CNP_API_VERSION`.
    pub cnp_discoveries: AtomicUsize,
    pub requests: Mutex<Vec<Request>>,
}

#[derive(Clone)]
pub struct FakeApi {
    pub url: String,
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    server: Arc<Mutex<Option<tokio::task::AbortHandle>>>,
}

fn key_of(obj: &Value) -> String {
    let meta = &obj["metadata"];
    match meta["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", meta["name"].as_str().unwrap_or_default()),
        None => meta["name"].as_str().unwrap_or_default().to_string(),
    }
}

impl FakeApi {
    /// Serves on `listener` (which may belong to another network namespace) from the current
    /// tokio runtime.
    pub fn start(listener: std::net::TcpListener) -> FakeApi {
        let addr = listener.local_addr().unwrap();
        let (drop_tx, _) = watch::channel(0);
        let (reset_tx, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
            released: Notify::new(),
            drop_tx,
            reset_tx,
            bookmarks_sent: AtomicUsize::new(0),
            lists_served: AtomicUsize::new(0),
            gone_sent: AtomicUsize::new(0),
            cnp_discoveries: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
        });
        let api = FakeApi {
            url: format!("http://{addr}"),
            addr,
            shared,
            server: Arc::new(Mutex::new(None)),
        };
        api.serve(listener);
        api
    }

    pub fn start_local() -> FakeApi {
        FakeApi::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn serve(&self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let shared = self.shared.clone();
        let app = Router::new()
            .route(
                "/api/v1/namespaces",
                get(|s, h, q| handle(s, h, q, Kind::Namespace)),
            )
            .route("/api/v1/pods", get(|s, h, q| handle(s, h, q, Kind::Pod)))
            .route("/api/v1/nodes", get(|s, h, q| handle(s, h, q, Kind::Node)))
            .route(
                "/apis/networking.k8s.io/v1/networkpolicies",
                get(|s, h, q| handle(s, h, q, Kind::NetworkPolicy)),
            )
            .route(&format!("/apis/{CNP_API_VERSION}"), get(cnp_discovery))
            .route(
                &format!("/apis/{CNP_API_VERSION}/clusternetworkpolicies"),
                get(|s, h, q| handle(s, h, q, Kind::ClusterNetworkPolicy)),
            )
            .with_state(shared);
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let reset = self.shared.reset_tx.subscribe();
        let server = tokio::spawn(accept_loop(listener, app, reset)).abort_handle();
        *self.server.lock().unwrap() = Some(server);
    }

    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().unwrap());
        kube_netpol_iptables::source::kube::client_for(config).unwrap()
    }

    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\ncurrent-context: c\n",
            self.url
        )
    }

    /// Creates or replaces an object (given as YAML or JSON), as `kubectl apply` would.
    /// The namespaces `names`, labelled `ns: <name>` if `labelled` (the e2e cases select by it).
    pub fn apply_namespaces(&self, names: &[&str], labelled: bool) {
        for ns in names {
            let labels = if labelled {
                format!(", labels: {{ns: {ns}}}")
            } else {
                String::new()
            };
            self.apply(
                Kind::Namespace,
                &format!("metadata: {{name: {ns}{labels}}}"),
            );
        }
    }

    pub fn apply(&self, kind: Kind, doc: &str) {
        let mut obj: Value = serde_yaml_ng::from_str(doc).unwrap();
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.name());
        let mut s = self.shared.inner.lock().unwrap();
        assert!(
            kind != Kind::ClusterNetworkPolicy || s.cnp_crd,
            "no ClusterNetworkPolicy without its CRD (install_cluster_policy_crd)"
        );
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&obj);
        let existed = s
            .objects
            .entry(kind)
            .or_default()
            .insert(key, obj.clone())
            .is_some();
        s.log
            .push((rv, kind, if existed { "MODIFIED" } else { "ADDED" }, obj));
        drop(s);
        self.shared.changed.notify_waiters();
    }

    pub fn delete(&self, kind: Kind, key: &str) {
        let mut s = self.shared.inner.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        if let Some(mut obj) = s.objects.entry(kind).or_default().remove(key) {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            s.log.push((rv, kind, "DELETED", obj));
        }
        drop(s);
        self.shared.changed.notify_waiters();
    }

    /// Installs the ClusterNetworkPolicy CRD: discovery and the resource are served from now on.
    pub fn install_cluster_policy_crd(&self) {
        self.shared.inner.lock().unwrap().cnp_crd = true;
    }

    /// Deletes the ClusterNetworkPolicy CRD as kube-apiserver does: every object is deleted
    /// (DELETED events), then the resource stops being served (open watches end, 404 after).
    pub fn remove_cluster_policy_crd(&self) {
        let keys: Vec<String> = {
            let s = self.shared.inner.lock().unwrap();
            s.objects
                .get(&Kind::ClusterNetworkPolicy)
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        };
        for key in keys {
            self.delete(Kind::ClusterNetworkPolicy, &key);
        }
        // Let open watches deliver the deletions before they end.
        std::thread::sleep(Duration::from_millis(300));
        self.shared.inner.lock().unwrap().cnp_crd = false;
        self.drop_watches();
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.inner.lock().unwrap().rv
    }

    /// Forgets history: a watch from any version before now gets 410 Gone.
    pub fn compact(&self) {
        let mut s = self.shared.inner.lock().unwrap();
        s.compacted_below = s.rv + 1;
    }

    /// Ends every open watch connection (clients reconnect from their last version).
    pub fn drop_watches(&self) {
        self.shared.drop_tx.send_modify(|g| *g += 1);
    }

    /// Resets every open connection (TCP RST, as from a load balancer or a crashed peer): the
    /// client reads an error, not the end of a watch.
    pub fn reset_connections(&self) {
        self.shared.reset_tx.send_modify(|g| *g += 1);
    }

    /// The next `requests` requests get 429 Too Many Requests with `Retry-After: retry_after_secs`.
    pub fn throttle(&self, requests: usize, retry_after_secs: u64) {
        self.shared.inner.lock().unwrap().throttled = (requests, retry_after_secs);
    }

    /// The API goes away: the port is closed (connection refused) and every open connection ends.
    pub fn stop(&self) {
        if let Some(server) = self.server.lock().unwrap().take() {
            server.abort();
        }
        self.drop_watches();
    }

    /// The API comes back on the same address after `stop`, as a restarted kube-apiserver: its
    /// watch cache starts at the current resourceVersion, so watches from before get 410.
    pub fn restart(&self) {
        self.restart_on(std::net::TcpListener::bind(self.addr).unwrap());
    }

    /// `restart` on a listener bound to the same address (e.g. in another network namespace).
    pub fn restart_on(&self, listener: std::net::TcpListener) {
        assert_eq!(listener.local_addr().unwrap(), self.addr);
        self.compact();
        self.serve(listener);
    }

    /// The API becomes unreachable (503 for every request, open watches end) or comes back.
    pub fn set_available(&self, up: bool) {
        self.shared.inner.lock().unwrap().unavailable = !up;
        if !up {
            self.drop_watches();
        }
    }

    /// Revokes (or restores) the permission to list and watch `kind`: 403 Forbidden from the
    /// next request on. Open watches go on until their timeout, as on kube-apiserver.
    pub fn set_forbidden(&self, kind: Kind, forbidden: bool) {
        let mut s = self.shared.inner.lock().unwrap();
        if forbidden {
            s.forbidden.insert(kind);
        } else {
            s.forbidden.remove(&kind);
        }
    }

    /// Revokes (or restores) only the permission to watch `kind` (a Role with `list` but not
    /// `watch`), from the next watch on.
    pub fn set_watch_forbidden(&self, kind: Kind, forbidden: bool) {
        let mut s = self.shared.inner.lock().unwrap();
        if forbidden {
            s.watch_forbidden.insert(kind);
        } else {
            s.watch_forbidden.remove(&kind);
        }
    }

    /// The server closes every watch after `cap` (as kube-apiserver does after the request's
    /// `timeoutSeconds`, or a random 1–2 × --min-request-timeout when none is given).
    pub fn cap_watches(&self, cap: Duration) {
        self.shared.inner.lock().unwrap().watch_cap = Some(cap);
    }

    /// Open watches stop delivering events until `resume` (or until they are dropped).
    pub fn pause_watches(&self) {
        self.shared.inner.lock().unwrap().paused = true;
    }

    pub fn resume_watches(&self) {
        self.shared.inner.lock().unwrap().paused = false;
        self.shared.changed.notify_waiters();
    }

    /// Makes lists of `kind` wait until `release`.
    pub fn hold_lists(&self, kind: Kind) {
        self.shared.inner.lock().unwrap().held.push(kind);
    }

    pub fn release(&self) {
        self.shared.inner.lock().unwrap().held.clear();
        self.shared.released.notify_waiters();
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Requests for `kind`: lists (`watch == false`) or watches.
    pub fn requests_of(&self, kind: Kind, watch: bool) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.kind == kind && r.watch == watch)
            .collect()
    }
}

/// Accepts connections until aborted; aborting drops the connection set, which ends every open
/// connection, so clients see their connections close and new ones refused, as when a server dies.
async fn accept_loop(listener: tokio::net::TcpListener, app: Router, reset: watch::Receiver<u64>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // A second handle on the socket, to make its close a reset.
        let std_stream = stream.into_std().unwrap();
        let twin = std_stream.try_clone().unwrap();
        let stream = tokio::net::TcpStream::from_std(std_stream).unwrap();
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut reset = reset.clone();
        reset.mark_unchanged();
        connections.spawn(async move {
            let serve = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = serve => {}
                _ = reset.changed() => {
                    // Linger 0: closing sends RST instead of FIN.
                    let _ = socket2::SockRef::from(&twin).set_linger(Some(Duration::ZERO));
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap();
    b.push(b'\n');
    Bytes::from(b)
}

/// A failure `Status` object, as kube-apiserver sends it.
fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

fn status_response(code: u16, reason: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        status_object(code, reason, message).to_string(),
    )
        .into_response()
}

/// kube-apiserver's answer for a path nothing serves: Go's `http.NotFound`, plain text.
fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [("content-type", "text/plain; charset=utf-8")],
        "404 page not found\n",
    )
        .into_response()
}

/// `GET /apis/policy.networking.k8s.io/v1alpha2`: the APIResourceList while the CRD is
/// installed, 404 before.
async fn cnp_discovery(State(shared): State<Arc<Shared>>) -> Response {
    shared.cnp_discoveries.fetch_add(1, Ordering::Relaxed);
    let (installed, unavailable) = {
        let s = shared.inner.lock().unwrap();
        (s.cnp_crd, s.unavailable)
    };
    if unavailable {
        return status_response(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        );
    }
    if !installed {
        return not_found();
    }
    let body = json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": CNP_API_VERSION,
        "resources": [{"name": "clusternetworkpolicies", "singularName": "clusternetworkpolicy",
            "namespaced": false, "kind": "ClusterNetworkPolicy", "shortNames": ["cnp"],
            "verbs": ["delete", "deletecollection", "get", "list", "patch", "create", "update", "watch"]},
            {"name": "clusternetworkpolicies/status", "singularName": "", "namespaced": false,
            "kind": "ClusterNetworkPolicy", "verbs": ["get", "patch", "update"]}],
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn expired(message: String) -> Response {
    status_response(410, "Expired", &message)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    kind: Kind,
) -> Response {
    let is_watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    let (unavailable, forbidden, throttled) = {
        let mut s = shared.inner.lock().unwrap();
        let throttled = (s.throttled.0 > 0).then_some(s.throttled.1);
        s.throttled.0 = s.throttled.0.saturating_sub(1);
        (
            s.unavailable,
            s.forbidden.contains(&kind) || (is_watch && s.watch_forbidden.contains(&kind)),
            throttled,
        )
    };
    let response = if let Some(retry_after) = throttled {
        (
            StatusCode::TOO_MANY_REQUESTS,
            [
                ("content-type", "text/plain; charset=utf-8".to_string()),
                ("retry-after", retry_after.to_string()),
            ],
            "Too many requests, please try again later.\n",
        )
            .into_response()
    } else if unavailable {
        status_response(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        )
    } else if forbidden {
        let verb = if is_watch { "watch" } else { "list" };
        let group = match kind {
            Kind::NetworkPolicy => "networking.k8s.io",
            Kind::ClusterNetworkPolicy => "policy.networking.k8s.io",
            _ => "",
        };
        status_response(
            403,
            "Forbidden",
            &format!(
                "{res} is forbidden: User \"system:serviceaccount:kube-system:kube-netpol-iptables\" cannot {verb} resource \"{res}\" in API group \"{group}\" at the cluster scope",
                res = kind.resource()
            ),
        )
    } else if kind == Kind::ClusterNetworkPolicy && !shared.inner.lock().unwrap().cnp_crd {
        not_found()
    } else if is_watch {
        watch_response(&shared, &q, kind).await
    } else {
        list_response(&shared, &q, kind).await
    };
    shared.requests.lock().unwrap().push(Request {
        at: Instant::now(),
        kind,
        watch: is_watch,
        query: q.into_iter().collect(),
        user_agent: headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        status: response.status().as_u16(),
    });
    response
}

/// The objects of `kind` as they were at `rv` (replayed from the change log).
fn objects_at(s: &Inner, kind: Kind, rv: u64) -> BTreeMap<String, Value> {
    let mut objects = BTreeMap::new();
    for (_, _, event, obj) in s.log.iter().filter(|(v, k, _, _)| *k == kind && *v <= rv) {
        if *event == "DELETED" {
            objects.remove(&key_of(obj));
        } else {
            objects.insert(key_of(obj), obj.clone());
        }
    }
    objects
}

/// `fieldSelector=metadata.name=NAME`, the only field selector the agent uses.
fn selected_by_fields(q: &HashMap<String, String>, obj: &Value) -> bool {
    match q.get("fieldSelector") {
        None => true,
        Some(selector) => match selector.strip_prefix("metadata.name=") {
            Some(name) => obj["metadata"]["name"].as_str() == Some(name),
            None => panic!("unsupported fieldSelector {selector:?}"),
        },
    }
}

async fn list_response(shared: &Shared, q: &HashMap<String, String>, kind: Kind) -> Response {
    loop {
        let released = shared.released.notified();
        if !shared.inner.lock().unwrap().held.contains(&kind) {
            break;
        }
        released.await;
    }
    let s = shared.inner.lock().unwrap();
    let rv_param = q.get("resourceVersion").map(String::as_str).unwrap_or("");
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    let exact = q.get("resourceVersionMatch").is_some_and(|m| m == "Exact");
    // A continue token carries the resourceVersion of the first page and the last key sent.
    let (at, after) = match q.get("continue") {
        Some(token) => {
            let Some((rv, key)) = token
                .split_once(':')
                .and_then(|(rv, key)| Some((rv.parse::<u64>().ok()?, key)))
            else {
                return status_response(400, "BadRequest", "invalid continue token");
            };
            if rv < s.compacted_below {
                return expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into());
            }
            (rv, Some(key.to_string()))
        }
        None => match rv_param.parse::<u64>() {
            Ok(rv) if exact && rv < s.compacted_below => {
                return expired(format!(
                    "too old resource version: {rv} ({})",
                    s.compacted_below
                ));
            }
            Ok(rv) if exact => (rv, None),
            _ => (s.rv, None),
        },
    };
    // resourceVersion=0 is served from the watch cache, which ignores limit (see the top).
    let paginate = limit > 0 && rv_param != "0";
    let objects = objects_at(&s, kind, at);
    let mut items: Vec<Value> = objects
        .iter()
        .filter(|(_, o)| selected_by_fields(q, o))
        .filter(|(key, _)| after.as_ref().is_none_or(|a| *key > a))
        .map(|(_, o)| o.clone())
        .collect();
    let mut metadata = json!({"resourceVersion": at.to_string()});
    if paginate && items.len() > limit {
        let remaining = items.len() - limit;
        items.truncate(limit);
        let last = key_of(items.last().unwrap());
        metadata["continue"] = json!(format!("{at}:{last}"));
        metadata["remainingItemCount"] = json!(remaining);
    }
    shared.lists_served.fetch_add(1, Ordering::Relaxed);
    let body = json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{}List", kind.name()),
        "metadata": metadata,
        "items": items,
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn watch_response(shared: &Arc<Shared>, q: &HashMap<String, String>, kind: Kind) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let asked = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1800),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let (too_old, timeout) = {
        let s = shared.inner.lock().unwrap();
        (
            from < s.compacted_below,
            s.watch_cap.map_or(asked, |cap| cap.min(asked)),
        )
    };
    if too_old {
        // As the watch cache does: HTTP 200, then one ERROR event with a 410 Status.
        shared.gone_sent.fetch_add(1, Ordering::Relaxed);
        let gone = json!({"type": "ERROR", "object": status_object(410, "Expired", &format!("too old resource version: {from}"))});
        let _ = tx.send(line(&gone)).await;
    } else {
        let mut dropped = shared.drop_tx.subscribe();
        // A reset (`reset_connections`) ends this watch's connection with a TCP RST; nothing may
        // be sent on it after the reset was asked for, even before the connection task has run.
        let reset = shared.reset_tx.subscribe();
        let shared = shared.clone();
        let q = q.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut sent = from;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                let changed = shared.changed.notified();
                // Flags and events under one lock: nothing slips out after the API "went down".
                let (events, rv): (Vec<Value>, u64) = {
                    let s = shared.inner.lock().unwrap();
                    // Only an outage or a reset ends a watch; RBAC is checked when it starts.
                    if s.unavailable || reset.has_changed().unwrap_or(true) {
                        return;
                    }
                    if s.paused {
                        (Vec::new(), sent)
                    } else {
                        let events = s
                            .log
                            .iter()
                            .filter(|(v, k, _, o)| {
                                *v > sent && *k == kind && selected_by_fields(&q, o)
                            })
                            .map(|(_, _, t, o)| json!({"type": t, "object": o}))
                            .collect();
                        (events, s.rv)
                    }
                };
                for e in events {
                    if tx.send(line(&e)).await.is_err() {
                        return;
                    }
                }
                sent = rv;
                tokio::select! {
                    _ = changed => {}
                    _ = tick.tick() => {
                        if reset.has_changed().unwrap_or(true) {
                            return;
                        }
                        if bookmarks {
                            let b = json!({"type": "BOOKMARK", "object": {"kind": kind.name(), "apiVersion": kind.api_version(),
                                "metadata": {"resourceVersion": sent.to_string()}}});
                            if tx.send(line(&b)).await.is_err() {
                                return;
                            }
                            shared.bookmarks_sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ = dropped.changed() => return,
                    _ = tokio::time::sleep_until(deadline) => return,
                }
            }
        });
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

// Helpers for tests of the Kubernetes source.

pub fn seed(api: &FakeApi) {
    api.apply(Kind::Namespace, "metadata: {name: x, labels: {team: a}}");
    api.apply(Kind::Namespace, "metadata: {name: y}");
    api.apply(
        Kind::Pod,
        "metadata: {name: a, namespace: x, labels: {app: web}}\nspec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}\nstatus: {phase: Running, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}",
    );
    api.apply(
        Kind::NetworkPolicy,
        "metadata: {name: deny, namespace: x}\nspec: {podSelector: {}}",
    );
}

/// Waits until the store's snapshot satisfies `ok`.
pub async fn until(
    store: &Arc<ClusterStore>,
    what: &str,
    ok: impl Fn(&ClusterSnapshot) -> bool,
) -> ClusterSnapshot {
    until_within(store, what, Duration::from_secs(10), ok).await
}

pub async fn until_within(
    store: &Arc<ClusterStore>,
    what: &str,
    limit: Duration,
    ok: impl Fn(&ClusterSnapshot) -> bool,
) -> ClusterSnapshot {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some((_, s)) = store.snapshot()
            && ok(&s)
        {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), store.changed()).await;
    }
}

/// Waits until a watch of `kind` is open (a list completes before its watch starts).
pub async fn watching(api: &FakeApi, kind: Kind) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while api.requests_of(kind, true).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no watch of {kind:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn pod_keys(s: &ClusterSnapshot) -> Vec<String> {
    s.pods.iter().map(|p| p.key()).collect()
}

/// Metrics as after a successful first sync, so readiness depends on the API alone.
pub fn synced_metrics() -> Arc<Metrics> {
    let metrics = Metrics::new(Duration::from_secs(120));
    metrics.sync_succeeded(SyncMode::Full, Duration::ZERO, &SyncReport::default(), &[]);
    assert!(metrics.ready());
    metrics
}

/// The value of one metric line (`name{labels}`) in a /metrics rendering.
pub fn metric(metrics: &Metrics, series: &str) -> Option<f64> {
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until `metrics` is ready (a kind counts as readable once its watch has held after a
/// list).
pub async fn ready_within(metrics: &Metrics, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while let Err(why) = metrics.readiness() {
        assert!(tokio::time::Instant::now() < deadline, "not ready: {why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The runtime an e2e test serves the fake API from while the agent runs as a separate process.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
