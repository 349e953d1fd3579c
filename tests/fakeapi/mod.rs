//! An in-process fake Kubernetes API server speaking real list and watch HTTP for Namespaces,
//! Pods and NetworkPolicies: resourceVersions, newline-delimited watch events, bookmarks, 410 Gone
//! for compacted versions, dropped connections, and held lists.
#![allow(dead_code)]

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            _ => "v1",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_below: u64,
    objects: BTreeMap<Kind, BTreeMap<String, Value>>,
    /// Every change: (resourceVersion, kind, event type, object).
    log: Vec<(u64, Kind, &'static str, Value)>,
    held: Vec<Kind>,
    /// While set, open watches deliver nothing (as if the network between dropped packets).
    paused: bool,
    /// While set, every request gets 503 (an API server that is down or unreachable).
    unavailable: bool,
}

pub struct Shared {
    inner: Mutex<Inner>,
    changed: Notify,
    released: Notify,
    /// Bumping this ends every open watch connection.
    drop_tx: watch::Sender<u64>,
    pub bookmarks_sent: AtomicUsize,
    pub lists_served: AtomicUsize,
    pub gone_sent: AtomicUsize,
}

#[derive(Clone)]
pub struct FakeApi {
    pub url: String,
    pub shared: Arc<Shared>,
    server: Arc<tokio::task::AbortHandle>,
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
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (drop_tx, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
            released: Notify::new(),
            drop_tx,
            bookmarks_sent: AtomicUsize::new(0),
            lists_served: AtomicUsize::new(0),
            gone_sent: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route(
                "/api/v1/namespaces",
                get(|s, q| handle(s, q, Kind::Namespace)),
            )
            .route("/api/v1/pods", get(|s, q| handle(s, q, Kind::Pod)))
            .route(
                "/apis/networking.k8s.io/v1/networkpolicies",
                get(|s, q| handle(s, q, Kind::NetworkPolicy)),
            )
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        })
        .abort_handle();
        FakeApi {
            url: format!("http://{addr}"),
            shared,
            server: Arc::new(server),
        }
    }

    pub fn start_local() -> FakeApi {
        FakeApi::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
    }

    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\ncurrent-context: c\n",
            self.url
        )
    }

    /// Creates or replaces an object (given as YAML or JSON), as `kubectl apply` would.
    pub fn apply(&self, kind: Kind, doc: &str) {
        let mut obj: Value = serde_yaml_ng::from_str(doc).unwrap();
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.name());
        let mut s = self.shared.inner.lock().unwrap();
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

    /// Forgets history: a watch from any version before now gets 410 Gone.
    pub fn compact(&self) {
        let mut s = self.shared.inner.lock().unwrap();
        s.compacted_below = s.rv + 1;
    }

    /// Ends every open watch connection (clients reconnect from their last version).
    pub fn drop_watches(&self) {
        self.shared.drop_tx.send_modify(|g| *g += 1);
    }

    /// The API goes away: no more connections are accepted and open watches end.
    pub fn stop(&self) {
        self.server.abort();
        self.drop_watches();
    }

    /// The API becomes unreachable (503 for every request, open watches end) or comes back.
    pub fn set_available(&self, up: bool) {
        self.shared.inner.lock().unwrap().unavailable = !up;
        if !up {
            self.drop_watches();
        }
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
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap();
    b.push(b'\n');
    Bytes::from(b)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
    kind: Kind,
) -> Response {
    let is_watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    if !is_watch {
        loop {
            let released = shared.released.notified();
            if !shared.inner.lock().unwrap().held.contains(&kind) {
                break;
            }
            released.await;
        }
        let s = shared.inner.lock().unwrap();
        let items: Vec<Value> = s
            .objects
            .get(&kind)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        shared.lists_served.fetch_add(1, Ordering::Relaxed);
        let body = json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.name()),
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        });
        return (
            StatusCode::OK,
            [("content-type", "application/json")],
            body.to_string(),
        )
            .into_response();
    }

    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let too_old = {
        let s = shared.inner.lock().unwrap();
        from < s.compacted_below
    };
    if too_old {
        shared.gone_sent.fetch_add(1, Ordering::Relaxed);
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410}});
        let _ = tx.send(line(&gone)).await;
    } else {
        let mut dropped = shared.drop_tx.subscribe();
        let shared = shared.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut sent = from;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                let changed = shared.changed.notified();
                // Flags and events under one lock: nothing slips out after the API "went down".
                let (events, rv): (Vec<Value>, u64) = {
                    let s = shared.inner.lock().unwrap();
                    if s.unavailable {
                        return;
                    }
                    if s.paused {
                        (Vec::new(), sent)
                    } else {
                        let events = s
                            .log
                            .iter()
                            .filter(|(v, k, _, _)| *v > sent && *k == kind)
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
