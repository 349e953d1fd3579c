//! The Kubernetes API source: one watcher per kind (Namespaces, Pods, NetworkPolicies) keeps a
//! store of objects already converted to the core's model, so memory holds only the fields
//! enforcement needs, not whole API objects.
//!
//! A (re-)list (start, 410 Gone, reconnect after an error) is buffered and swapped in whole when it
//! completes (`Init` … `InitDone`), so the store never shows a half-listed kind; and no snapshot is
//! handed out until every kind has listed once. During an API outage the watchers retry with
//! backoff and the store keeps the last state, which stays enforced. As client-go's reflector
//! does, a failed watch resumes from the last resourceVersion seen, and a kind is listed afresh
//! (resourceVersion=0, from the API server's watch cache) only after 410 Expired or a failed list.

use crate::convert::{self, InvalidField};
use crate::metrics::Metrics;
use crate::model::{ClusterSnapshot, Namespace, Pod, Policy};
use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(Default)]
struct Store {
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<String, Pod>,
    policies: BTreeMap<String, Policy>,
    /// Objects that failed conversion, by kind and key, with the reason.
    invalid: BTreeMap<(&'static str, String), String>,
    /// This node's pod CIDRs, from its Node object (see `node_source`).
    node_pod_cidrs: BTreeMap<String, Vec<ipnet::IpNet>>,
    listed: [bool; 3],
    generation: u64,
}

/// The store shared by the watchers and the sync loop.
#[derive(Default)]
pub struct ClusterStore {
    inner: Mutex<Store>,
    changed: Notify,
}

impl ClusterStore {
    /// Waits until something changed since the last call (or a change was already pending).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Bumped on every change; `None` until every kind has listed once.
    pub fn generation(&self) -> Option<u64> {
        let s = self.inner.lock().unwrap();
        s.listed.iter().all(|l| *l).then_some(s.generation)
    }

    /// The cluster as last seen, once every kind has listed; `None` before.
    pub fn snapshot(&self) -> Option<(u64, ClusterSnapshot)> {
        let s = self.inner.lock().unwrap();
        if !s.listed.iter().all(|l| *l) {
            return None;
        }
        let mut snapshot = ClusterSnapshot {
            namespaces: s
                .namespaces
                .values()
                .map(|n| (n.name.clone(), n.clone()))
                .collect(),
            pods: s.pods.values().cloned().collect(),
            policies: s.policies.values().cloned().collect(),
            node_pod_cidrs: s.node_pod_cidrs.clone(),
        };
        snapshot
            .pods
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Some((s.generation, snapshot))
    }

    /// Objects that could not be used, by kind.
    pub fn invalid_counts(&self) -> BTreeMap<&'static str, usize> {
        let s = self.inner.lock().unwrap();
        let mut counts: BTreeMap<&'static str, usize> =
            [("Namespace", 0), ("Pod", 0), ("NetworkPolicy", 0)].into();
        for (kind, _) in s.invalid.keys() {
            *counts.entry(kind).or_default() += 1;
        }
        counts
    }

    /// Records `node`'s pod CIDRs (a change is a change like any other: the loop syncs).
    pub fn set_node_pod_cidrs(&self, node: &str, cidrs: Vec<ipnet::IpNet>) {
        if self.inner.lock().unwrap().node_pod_cidrs.get(node) == Some(&cidrs) {
            return;
        }
        self.update(|s| {
            s.node_pod_cidrs.insert(node.to_string(), cidrs);
        });
    }

    fn update(&self, f: impl FnOnce(&mut Store)) {
        let mut s = self.inner.lock().unwrap();
        f(&mut s);
        s.generation += 1;
        drop(s);
        // A permit is kept if nobody waits right now, so no change is ever missed.
        self.changed.notify_one();
    }
}

/// What the store needs to know about each watched kind.
trait Kind:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    const NAME: &'static str;
    const INDEX: usize;
    type Model: Clone + Send;
    fn convert(&self) -> Result<Self::Model, InvalidField>;
    fn map(store: &mut Store) -> &mut BTreeMap<String, Self::Model>;
}

impl Kind for core::Namespace {
    const NAME: &'static str = "Namespace";
    const INDEX: usize = 0;
    type Model = Namespace;
    fn convert(&self) -> Result<Namespace, InvalidField> {
        convert::namespace(self)
    }
    fn map(store: &mut Store) -> &mut BTreeMap<String, Namespace> {
        &mut store.namespaces
    }
}

impl Kind for core::Pod {
    const NAME: &'static str = "Pod";
    const INDEX: usize = 1;
    type Model = Pod;
    fn convert(&self) -> Result<Pod, InvalidField> {
        convert::pod(self)
    }
    fn map(store: &mut Store) -> &mut BTreeMap<String, Pod> {
        &mut store.pods
    }
}

impl Kind for net::NetworkPolicy {
    const NAME: &'static str = "NetworkPolicy";
    const INDEX: usize = 2;
    type Model = Policy;
    fn convert(&self) -> Result<Policy, InvalidField> {
        convert::policy(self)
    }
    fn map(store: &mut Store) -> &mut BTreeMap<String, Policy> {
        &mut store.policies
    }
}

fn key_of<K: Kind>(obj: &K) -> String {
    match obj.namespace() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

/// Converts an object, recording or clearing its invalid state. An invalid object is left out;
/// everything else keeps being enforced.
fn convert_recorded<K: Kind>(store: &mut Store, obj: &K) -> Option<(String, K::Model)> {
    let key = key_of(obj);
    match obj.convert() {
        Ok(model) => {
            store.invalid.remove(&(K::NAME, key.clone()));
            Some((key, model))
        }
        Err(e) => {
            tracing::error!(
                kind = K::NAME,
                object = key,
                "ignoring an invalid object: {e}"
            );
            store.invalid.insert((K::NAME, key), e.to_string());
            None
        }
    }
}

/// Why a list or watch failed, as far as retrying and reporting care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// 410: the resourceVersion is too old (compaction, API server restart); list again.
    Expired,
    /// No answer, or the server is overloaded or not ready (5xx, 429).
    Unreachable,
    /// 403: RBAC does not allow it.
    Forbidden,
    /// 401: the credentials were not accepted.
    Unauthorized,
    Other,
}

impl Failure {
    fn of(error: &watcher::Error) -> Failure {
        use watcher::Error as E;
        let code = match error {
            E::InitialListFailed(e) | E::WatchStartFailed(e) | E::WatchFailed(e) => match e {
                kube::Error::Api(status) => status.code,
                // Also a watch connection reset under us (`ReadEvents`).
                kube::Error::HyperError(_)
                | kube::Error::Service(_)
                | kube::Error::ReadEvents(_) => {
                    return Failure::Unreachable;
                }
                _ => return Failure::Other,
            },
            E::WatchError(status) => status.code,
            E::NoResourceVersion => return Failure::Other,
        };
        match code {
            410 => Failure::Expired,
            403 => Failure::Forbidden,
            401 => Failure::Unauthorized,
            429 | 500..=599 => Failure::Unreachable,
            _ => Failure::Other,
        }
    }

    /// The `reason` label of `kni_api_watch_errors_total`.
    fn label(self) -> &'static str {
        match self {
            Failure::Expired => "expired",
            Failure::Unreachable => "unreachable",
            Failure::Forbidden => "forbidden",
            Failure::Unauthorized => "unauthorized",
            Failure::Other => "error",
        }
    }
}

/// How long the server asked us to wait (429 from API Priority and Fairness): the Status's
/// `retryAfterSeconds`, which `client_for` fills from the Retry-After header.
fn retry_after(error: &watcher::Error) -> Option<Duration> {
    use watcher::Error as E;
    let status = match error {
        E::InitialListFailed(kube::Error::Api(s))
        | E::WatchStartFailed(kube::Error::Api(s))
        | E::WatchFailed(kube::Error::Api(s)) => s,
        E::WatchError(s) => s,
        _ => return None,
    };
    let secs = status.details.as_ref()?.retry_after_seconds;
    (secs > 0).then(|| Duration::from_secs(secs.into()))
}

/// Backoff of a rejected request (403, 401, other errors): 0.5 s doubling to 16 s; with
/// backon's jitter (+0–100 %) a retry comes every 16–32 s at most.
const REJECTED_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(500), Duration::from_secs(16));
/// Backoff while the API server does not answer (restart, outage): kept short, so the node is
/// current again within seconds of the server's return whatever the outage length (1.5–3 s).
const UNREACHABLE_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(250), Duration::from_millis(1500));
/// The longest Retry-After honoured, so a wrong value cannot stop the agent following the cluster.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(60);
/// A kind that has had no failure for this long starts its backoff afresh.
const QUIET_RESET: Duration = Duration::from_secs(60);

fn backoff((min, max): (Duration, Duration)) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// When to list again after a failure. A successful list does not reset the backoff (a kind
/// that may be listed but not watched would otherwise be listed every second); a quiet minute
/// does.
struct Retry {
    rejected: backon::ExponentialBackoff,
    unreachable: backon::ExponentialBackoff,
    last_failure: Option<(Instant, Failure)>,
}

impl Retry {
    fn new() -> Retry {
        Retry {
            rejected: backoff(REJECTED_BACKOFF),
            unreachable: backoff(UNREACHABLE_BACKOFF),
            last_failure: None,
        }
    }

    /// The delay before the next attempt; never shorter than the server's Retry-After.
    fn delay(&mut self, failure: Failure, retry_after: Option<Duration>) -> Duration {
        let now = Instant::now();
        let previous = self
            .last_failure
            .replace((now, failure))
            .filter(|(at, _)| now - *at < QUIET_RESET);
        if previous.is_none() {
            *self = Retry {
                last_failure: Some((now, failure)),
                ..Retry::new()
            };
        }
        let next = match failure {
            // A 410 is routine: list again at once, unless the fresh list expired right away too.
            Failure::Expired if previous.is_none_or(|(_, f)| f != Failure::Expired) => {
                Some(Duration::ZERO)
            }
            Failure::Unreachable => self.unreachable.next(),
            _ => self.rejected.next(),
        };
        let delay = next.unwrap_or(REJECTED_BACKOFF.1);
        retry_after.map_or(delay, |server| delay.max(server.min(RETRY_AFTER_CAP)))
    }
}

/// Reports whether a kind can be read: one log line per change (not per retry), the
/// `kni_api_readable` gauge, `kni_api_watch_errors_total` and the reason `/readyz` gives.
struct Health {
    kind: &'static str,
    failing: Option<Failure>,
    metrics: Option<Arc<Metrics>>,
}

impl Health {
    fn failed(&mut self, failure: Failure, error: &watcher::Error) {
        if let Some(m) = &self.metrics {
            m.api_error(self.kind, failure.label());
        }
        if failure == Failure::Expired {
            tracing::debug!(kind = self.kind, "{error}; listing again");
            return;
        }
        if self.failing == Some(failure) {
            return;
        }
        self.failing = Some(failure);
        let problem = format!("cannot read {}: {error}", self.kind);
        tracing::warn!(
            kind = self.kind,
            reason = failure.label(),
            "{problem} (will keep retrying with backoff; the last state stays enforced)"
        );
        if let Some(m) = &self.metrics {
            m.set_api_problem(self.kind, Some(problem));
        }
    }

    fn readable(&mut self) {
        if self.failing.take().is_some() {
            tracing::info!(kind = self.kind, "{} readable again", self.kind);
        }
        if let Some(m) = &self.metrics {
            m.set_api_problem(self.kind, None);
        }
    }
}

/// The server ends each watch after this long and the watcher opens the next one from the last
/// resourceVersion (no list). kube-apiserver authorizes a watch only when it starts, so this
/// bounds how long a revoked permission goes unnoticed; the price is one watch request per kind
/// per node per period, served from the watch cache (kube-runtime's default is 290 s).
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(120);

/// The watcher configuration. `any_semantic` makes lists ask for resourceVersion=0, which the
/// API server answers from its watch cache instead of a quorum read from etcd; but kube-core
/// leaves resourceVersion=0 out of a list that has a limit (`ListParams::populate_qp`) and the
/// watcher's default page size is 500, so the page size must be off. The watch cache ignores
/// limit for resourceVersion=0 anyway, so nothing is lost.
fn watch_config() -> watcher::Config {
    watcher::Config {
        page_size: None,
        ..watcher::Config::default()
    }
    .any_semantic()
    .timeout(WATCH_TIMEOUT.as_secs() as u32)
}

/// Applies one watcher event to the store. A (re-)list is buffered in `relist` and swapped in
/// whole at `InitDone`; returns true then.
fn apply_event<K: Kind>(
    store: &ClusterStore,
    relist: &mut Option<BTreeMap<String, K::Model>>,
    event: Event<K>,
) -> bool {
    match event {
        Event::Init => {
            *relist = Some(BTreeMap::new());
            // The relist re-reports every invalid object still there.
            store
                .inner
                .lock()
                .unwrap()
                .invalid
                .retain(|(kind, _), _| *kind != K::NAME);
        }
        Event::InitApply(obj) => {
            let mut s = store.inner.lock().unwrap();
            if let (Some(buffer), Some((key, model))) =
                (relist.as_mut(), convert_recorded(&mut s, &obj))
            {
                buffer.insert(key, model);
            }
        }
        Event::InitDone => {
            let listed = relist.take().unwrap_or_default();
            // The first list is worth a line; later ones (410, a kind that may not be watched)
            // are routine, and changes of readability are logged by `Health`.
            if store.inner.lock().unwrap().listed[K::INDEX] {
                tracing::debug!(kind = K::NAME, objects = listed.len(), "listed");
            } else {
                tracing::info!(kind = K::NAME, objects = listed.len(), "listed");
            }
            store.update(|s| {
                *K::map(s) = listed;
                s.listed[K::INDEX] = true;
            });
            return true;
        }
        Event::Apply(obj) => store.update(|s| {
            let key = key_of(&obj);
            match convert_recorded(s, &obj) {
                Some((key, model)) => {
                    K::map(s).insert(key, model);
                }
                None => {
                    K::map(s).remove(&key);
                }
            }
        }),
        Event::Delete(obj) => store.update(|s| {
            let key = key_of(&obj);
            K::map(s).remove(&key);
            s.invalid.remove(&(K::NAME, key));
        }),
    }
    false
}

/// How long the watch must stay up after a list before the kind counts as readable again: a
/// watch the server refuses (RBAC allowing list but not watch) fails at once, and must not make
/// the kind look readable between its lists.
const WATCH_HOLDS_AFTER: Duration = Duration::from_secs(2);

/// Lists, then follows the watch. After an error it waits (backoff, or the server's Retry-After)
/// and lets kube-runtime's watcher go on from where it was: a failed list lists again, a failed
/// watch resumes from the last resourceVersion (kube-runtime `watcher.rs`, `step_trampolined`).
/// Only 410 Expired starts a fresh watcher, which lists at once.
async fn watch_kind<K: Kind>(api: Api<K>, store: Arc<ClusterStore>, metrics: Option<Arc<Metrics>>) {
    let mut health = Health {
        kind: K::NAME,
        failing: None,
        metrics,
    };
    let mut retry = Retry::new();
    loop {
        let mut events = watcher::watcher(api.clone(), watch_config()).boxed();
        let mut relist = None;
        let mut readable_at: Option<tokio::time::Instant> = None;
        loop {
            let next = match readable_at {
                // `next()` is cancel-safe: the watcher keeps its request in progress.
                Some(at) => match tokio::time::timeout_at(at, events.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        health.readable();
                        readable_at = None;
                        continue;
                    }
                },
                None => events.next().await,
            };
            let error = match next {
                Some(Ok(event)) => {
                    if apply_event(&store, &mut relist, event) {
                        readable_at = Some(tokio::time::Instant::now() + WATCH_HOLDS_AFTER);
                    }
                    continue;
                }
                Some(Err(error)) => error,
                None => break,
            };
            let failure = Failure::of(&error);
            health.failed(failure, &error);
            tokio::time::sleep(retry.delay(failure, retry_after(&error))).await;
            if failure == Failure::Expired {
                break;
            }
            // A resumed watch that holds makes the kind readable again; a list must complete.
            readable_at = match error {
                watcher::Error::InitialListFailed(_) => None,
                _ => Some(tokio::time::Instant::now() + WATCH_HOLDS_AFTER),
            };
        }
    }
}

/// Starts watching the cluster; the returned store fills as lists complete. With `metrics`, the
/// watchers report whether each kind can be read (readiness, `kni_api_*`).
pub fn start(client: Client, metrics: Option<Arc<Metrics>>) -> Arc<ClusterStore> {
    let store = Arc::new(ClusterStore::default());
    tokio::spawn(watch_kind(
        Api::<core::Namespace>::all(client.clone()),
        store.clone(),
        metrics.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<core::Pod>::all(client.clone()),
        store.clone(),
        metrics.clone(),
    ));
    tokio::spawn(watch_kind(
        Api::<net::NetworkPolicy>::all(client),
        store.clone(),
        metrics,
    ));
    store
}

/// Sent as User-Agent, so audit logs and API Priority and Fairness can tell the agent apart.
pub const USER_AGENT: &str = concat!("kube-netpol-iptables/", env!("CARGO_PKG_VERSION"));

/// The default log filter: kube-runtime's watcher logs a WARN line of its own for every 403
/// retry; the agent logs each change of a kind's readability once instead.
pub const DEFAULT_LOG_FILTER: &str = "info,kube_runtime::watcher=error";

/// A client for `config` that sends our User-Agent. kube-client's own retry of 429/503/504
/// (growing to minutes inside one request) is turned off: the watchers' backoff above decides
/// when to try again, so a returning API server is seen within seconds.
pub fn client_for(mut config: kube::Config) -> anyhow::Result<Client> {
    config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_static(USER_AGENT),
    ));
    config.default_retry = false;
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&tower::util::MapResponseLayer::new(retry_after_into_status))
        .build())
}

type ResponseBody = Box<kube::client::DynBody>;

/// kube-client keeps only the body of an error response, but API Priority and Fairness says when
/// to come back in the Retry-After header of its 429, with a plain-text body (kube-apiserver:
/// staging/src/k8s.io/apiserver/pkg/server/filters/maxinflight.go, `tooManyRequests`). Such a
/// response is turned into the `Status` kube-apiserver sends elsewhere for 429, with
/// `details.retryAfterSeconds`, which `retry_after` reads.
fn retry_after_into_status(
    response: axum::http::Response<ResponseBody>,
) -> axum::http::Response<ResponseBody> {
    use http_body_util::BodyExt;
    if response.status() != axum::http::StatusCode::TOO_MANY_REQUESTS {
        return response;
    }
    let Some(secs) = response
        .headers()
        .get(axum::http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
    else {
        return response;
    };
    let status = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "reason": "TooManyRequests", "code": 429,
        "message": format!("too many requests, retry after {secs} s"),
        "details": {"retryAfterSeconds": secs},
    });
    let (parts, _) = response.into_parts();
    let body = kube::client::Body::from(status.to_string().into_bytes())
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
    axum::http::Response::from_parts(parts, Box::new(body) as ResponseBody)
}

/// A client from `--kubeconfig`, or in-cluster configuration (falling back to the usual
/// kubeconfig discovery when not in a pod).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("cannot read kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| anyhow::anyhow!("invalid kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            anyhow::anyhow!("no in-cluster configuration and no kubeconfig found ({e}); pass --kubeconfig or --manifests")
        })?,
    };
    client_for(config)
}
