//! One watcher per kind, with retry and readiness reporting.

use super::store::{ClusterStore, Kind, apply_event};
use crate::metrics::Metrics;
use futures::StreamExt;
use kube::Api;
use kube::runtime::watcher;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The log target from before the module layout of issue 10, kept so users' log filters still
/// match.
const LOG_TARGET: &str = "kube_netpol_iptables::kube_source";

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
    /// 404: the API does not serve the kind (a CustomResourceDefinition deleted).
    NotFound,
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
            404 => Failure::NotFound,
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
            Failure::NotFound => "not_found",
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
            tracing::debug!(target: LOG_TARGET, kind = self.kind, "{error}; listing again");
            return;
        }
        if self.failing == Some(failure) {
            return;
        }
        self.failing = Some(failure);
        let problem = format!("cannot read {}: {error}", self.kind);
        tracing::warn!(target: LOG_TARGET,
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
            tracing::info!(target: LOG_TARGET, kind = self.kind, "{} readable again", self.kind);
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

/// How long the watch must stay up after a list before the kind counts as readable again: a
/// watch the server refuses (RBAC allowing list but not watch) fails at once, and must not make
/// the kind look readable between its lists.
const WATCH_HOLDS_AFTER: Duration = Duration::from_secs(2);

/// Lists, then follows the watch. After an error it waits (backoff, or the server's Retry-After)
/// and lets kube-runtime's watcher go on from where it was: a failed list lists again, a failed
/// watch resumes from the last resourceVersion (kube-runtime `watcher.rs`, `step_trampolined`).
/// Only 410 Expired starts a fresh watcher, which lists at once.
///
/// With `until_not_found` (a kind a CustomResourceDefinition serves), returns when the API
/// answers 404 (the definition was deleted); otherwise never.
pub(super) async fn watch_kind<K: Kind>(
    api: Api<K>,
    store: Arc<ClusterStore>,
    metrics: Option<Arc<Metrics>>,
    until_not_found: bool,
) {
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
                    report_invalid(&store, health.metrics.as_deref());
                    continue;
                }
                Some(Err(error)) => error,
                None => break,
            };
            let failure = Failure::of(&error);
            if failure == Failure::NotFound && until_not_found {
                health.readable();
                return;
            }
            store.kind_failed::<K>();
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

/// Keeps `kni_invalid_objects` (every kind, zero included) and `kni_cluster_network_policies`
/// current.
pub(super) fn report_invalid(store: &ClusterStore, metrics: Option<&Metrics>) {
    if let Some(m) = metrics {
        for (kind, count) in store.invalid_counts() {
            m.set_invalid_objects(kind, count);
        }
        for (tier, count) in store.cluster_policies_per_tier() {
            m.set_cluster_policies(tier, count);
        }
    }
}
