//! Prometheus metrics and the health endpoints (`/metrics`, `/healthz`, `/readyz`).

use crate::dataplane::{SyncMode, SyncReport};
use crate::state::{DesiredState, Family};
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The default for `--metrics-bind-address`. Clear of kube-proxy (10249, 10256), kubelet
/// (10248, 10250, 10255), node-exporter (9100) and kube-network-policies (9080).
pub const DEFAULT_BIND: &str = "0.0.0.0:9847";

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    sync_duration: MetricFamily<Labels, Histogram>,
    syncs: MetricFamily<Labels, Counter>,
    last_success: Gauge<f64, AtomicU64>,
    chains: Gauge,
    rules: Gauge,
    sets: Gauge,
    set_members: Gauge,
    write_errors: Counter,
    drift_repairs: Counter,
    retained_chains: Gauge,
    invalid_objects: MetricFamily<Labels, Gauge>,
    /// A full sync has succeeded since start.
    synced_once: AtomicBool,
    /// The last sync attempt failed.
    failing: AtomicBool,
    /// When the sync loop last went round (unix seconds).
    heartbeat: AtomicI64,
    /// How long the loop may be silent before /healthz fails.
    stall_limit: Duration,
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Metrics {
    pub fn new(stall_limit: Duration) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("kni");
        let sync_duration = MetricFamily::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "sync_duration_seconds",
            "Time from a snapshot to the kernel holding it (compile, diff, write), by mode",
            sync_duration.clone(),
        );
        let syncs = MetricFamily::<Labels, Counter>::default();
        registry.register(
            "syncs",
            "Syncs by mode and result (success, error)",
            syncs.clone(),
        );
        let last_success = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_successful_sync_timestamp_seconds",
            "Unix time of the last successful sync",
            last_success.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let chains = gauge(
            &mut registry,
            "owned_chains",
            "Chains the agent owns (both families)",
        );
        let rules = gauge(
            &mut registry,
            "owned_rules",
            "Rules in the agent's chains and hooks (both families)",
        );
        let sets = gauge(&mut registry, "owned_sets", "ipsets the agent owns");
        let set_members = gauge(
            &mut registry,
            "owned_set_members",
            "Members of the agent's ipsets",
        );
        let write_errors = Counter::default();
        registry.register(
            "kernel_write_errors",
            "Failed ipset/iptables reads or writes (the last good state stays in the kernel)",
            write_errors.clone(),
        );
        let drift_repairs = Counter::default();
        registry.register(
            "drift_repairs",
            "Differences between the kernel and what the agent wrote, found and repaired by full syncs",
            drift_repairs.clone(),
        );
        let retained_chains = gauge(
            &mut registry,
            "retained_chains",
            "Chains the agent no longer uses but keeps, emptied, because another tool's rule jumps to them",
        );
        let invalid_objects = MetricFamily::<Labels, Gauge>::default();
        registry.register(
            "invalid_objects",
            "Objects the agent could not use (see its log), by kind",
            invalid_objects.clone(),
        );
        Arc::new(Metrics {
            registry,
            sync_duration,
            syncs,
            last_success,
            chains,
            rules,
            sets,
            set_members,
            write_errors,
            drift_repairs,
            retained_chains,
            invalid_objects,
            synced_once: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            heartbeat: AtomicI64::new(now_secs() as i64),
            stall_limit,
        })
    }

    pub fn heartbeat(&self) {
        self.heartbeat.store(now_secs() as i64, Ordering::Relaxed);
    }

    fn mode_label(mode: SyncMode) -> String {
        match mode {
            SyncMode::Full => "full".into(),
            SyncMode::Incremental => "incremental".into(),
        }
    }

    pub fn sync_succeeded(
        &self,
        mode: SyncMode,
        took: Duration,
        report: &SyncReport,
        desired: &[(Family, DesiredState)],
    ) {
        let mode = Self::mode_label(mode);
        self.sync_duration
            .get_or_create(&vec![("mode".into(), mode.clone())])
            .observe(took.as_secs_f64());
        self.syncs
            .get_or_create(&vec![
                ("mode".into(), mode),
                ("result".into(), "success".into()),
            ])
            .inc();
        self.last_success.set(now_secs());
        self.chains
            .set(desired.iter().map(|(_, s)| s.chains.len() as i64).sum());
        self.rules
            .set(desired.iter().map(|(_, s)| s.rule_count() as i64).sum());
        self.sets
            .set(desired.iter().map(|(_, s)| s.sets.len() as i64).sum());
        self.set_members
            .set(desired.iter().map(|(_, s)| s.member_count() as i64).sum());
        self.drift_repairs.inc_by(report.repairs.len() as u64);
        self.retained_chains.set(report.retained_chains as i64);
        self.failing.store(false, Ordering::Relaxed);
        self.synced_once.store(true, Ordering::Relaxed);
    }

    /// `kernel` says whether the failure was in reading or writing the kernel (not the source).
    pub fn sync_failed(&self, mode: SyncMode, kernel: bool) {
        self.syncs
            .get_or_create(&vec![
                ("mode".into(), Self::mode_label(mode)),
                ("result".into(), "error".into()),
            ])
            .inc();
        if kernel {
            self.write_errors.inc();
        }
        self.failing.store(true, Ordering::Relaxed);
    }

    pub fn set_invalid_objects(&self, kind: &str, count: usize) {
        self.invalid_objects
            .get_or_create(&vec![("kind".into(), kind.into())])
            .set(count as i64);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Alive: the sync loop went round recently.
    pub fn healthy(&self) -> bool {
        now_secs() as i64 - self.heartbeat.load(Ordering::Relaxed)
            <= self.stall_limit.as_secs() as i64
    }

    /// Ready: a full sync has succeeded and the last attempt did not fail.
    pub fn ready(&self) -> bool {
        self.synced_once.load(Ordering::Relaxed) && !self.failing.load(Ordering::Relaxed)
    }
}

pub fn router(metrics: Arc<Metrics>) -> Router {
    let (m1, m2, m3) = (metrics.clone(), metrics.clone(), metrics);
    Router::new()
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m1.render(),
                )
            }),
        )
        .route(
            "/healthz",
            get(move || async move { status(m2.healthy(), "sync loop stalled") }),
        )
        .route(
            "/readyz",
            get(move || async move {
                status(m3.ready(), "no successful sync yet, or the last one failed")
            }),
        )
}

fn status(ok: bool, why_not: &'static str) -> impl IntoResponse {
    if ok {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, why_not)
    }
}

/// Serves the endpoints until the process ends. Binding fails loudly (a port clash is a
/// deployment error the operator must see).
pub async fn serve(bind: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-bind-address {bind}: {e}"))?;
    tracing::info!(%bind, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(metrics)).await?;
    Ok(())
}
