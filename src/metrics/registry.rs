//! The metrics and health state the agent records, and their Prometheus encoding.

use crate::compile::ir::{DesiredState, Family};
use crate::dataplane::{SyncMode, SyncReport};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    cluster_network_policies: MetricFamily<Labels, Gauge>,
    failed_closed_rules: Gauge,
    /// Policy rules that could not be programmed and allow nothing, one line each (for /readyz).
    failed_closed: Mutex<Vec<String>>,
    api_readable: MetricFamily<Labels, Gauge>,
    api_watch_errors: MetricFamily<Labels, Counter>,
    flows_cut: MetricFamily<Labels, Counter>,
    denied_packets: MetricFamily<Labels, Counter>,
    policy_allowed_packets: MetricFamily<Labels, Counter>,
    programming_latency: Histogram,
    /// Why each watched kind cannot be read right now (absent: readable).
    api_problems: Mutex<BTreeMap<String, String>>,
    /// A full sync has succeeded since start.
    synced_once: AtomicBool,
    /// The last sync attempt failed.
    failing: AtomicBool,
    /// When the sync loop last went round (unix seconds).
    heartbeat: AtomicI64,
    /// How long the loop may be silent before /healthz fails.
    stall_limit: Duration,
    /// Why the agent is not ready although nothing failed (e.g. waiting for the node lock).
    waiting: Mutex<Option<String>>,
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
        let cluster_network_policies = MetricFamily::<Labels, Gauge>::default();
        registry.register(
            "cluster_network_policies",
            "Valid ClusterNetworkPolicies (Kubernetes mode), by tier",
            cluster_network_policies.clone(),
        );
        let failed_closed_rules = Gauge::default();
        registry.register(
            "policy_rules_failed_closed",
            "Policy rules that could not be programmed (e.g. ipBlocks needing more set entries than allowed) and allow nothing; /readyz names them",
            failed_closed_rules.clone(),
        );
        let api_readable = MetricFamily::<Labels, Gauge>::default();
        registry.register(
            "api_readable",
            "1 while the agent can list and watch this kind, 0 while it cannot (see /readyz)",
            api_readable.clone(),
        );
        let api_watch_errors = MetricFamily::<Labels, Counter>::default();
        registry.register(
            "api_watch_errors",
            "Failed lists and watches by kind and reason (forbidden, unauthorized, unreachable, expired, error)",
            api_watch_errors.clone(),
        );
        let flows_cut = MetricFamily::<Labels, Counter>::default();
        registry.register(
            "conntrack_flows_cut",
            "Established flows strict mode cut because the new policy state denies them, by the policy direction that denies them",
            flows_cut.clone(),
        );
        let denied_packets = MetricFamily::<Labels, Counter>::default();
        registry.register(
            "denied_packets",
            "Denied packets logged (--log-denied; rate-limited per pod, so a sample of the drops), by direction",
            denied_packets.clone(),
        );
        let policy_allowed_packets = MetricFamily::<Labels, Counter>::default();
        registry.register(
            "policy_allowed_packets",
            "New connections' first packets a policy's rules allowed, from the kernel's rule counters (read at most every 30 s), by policy and direction",
            policy_allowed_packets.clone(),
        );
        let programming_latency = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "programming_latency_seconds",
            "Time from a change being seen (API watch event received, manifests change noticed) to the kernel holding it",
            programming_latency.clone(),
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
            cluster_network_policies,
            failed_closed_rules,
            failed_closed: Mutex::new(Vec::new()),
            api_readable,
            api_watch_errors,
            flows_cut,
            denied_packets,
            policy_allowed_packets,
            programming_latency,
            api_problems: Mutex::new(BTreeMap::new()),
            synced_once: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            heartbeat: AtomicI64::new(now_secs() as i64),
            stall_limit,
            waiting: Mutex::new(None),
        })
    }

    /// Not ready, for the reason given, until cleared with `None`.
    pub fn set_waiting(&self, reason: Option<String>) {
        *self.waiting.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }

    fn waiting(&self) -> Option<String> {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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

    pub fn set_cluster_policies(&self, tier: &str, count: usize) {
        self.cluster_network_policies
            .get_or_create(&vec![("tier".into(), tier.into())])
            .set(count as i64);
    }

    /// Records the rules that fail closed and returns the ones recorded before.
    pub fn set_failed_closed(&self, rules: Vec<String>) -> Vec<String> {
        self.failed_closed_rules.set(rules.len() as i64);
        std::mem::replace(&mut *self.failed_closed.lock().unwrap(), rules)
    }

    /// What /readyz adds to "ok": the rules that fail closed (the node is enforcing, more strictly
    /// than those policies ask).
    pub(super) fn readiness_detail(&self) -> String {
        let rules = self.failed_closed.lock().unwrap();
        if rules.is_empty() {
            return String::new();
        }
        let mut out = format!(
            "\ndegraded: {} policy rule(s) could not be programmed and allow nothing:",
            rules.len()
        );
        for rule in rules.iter() {
            out.push_str("\n- ");
            out.push_str(rule);
        }
        out
    }

    /// Strict mode cut `count` flows denied by policies of `direction` (ingress or egress).
    pub fn flows_cut(&self, direction: &str, count: u64) {
        self.flows_cut
            .get_or_create(&vec![("direction".into(), direction.into())])
            .inc_by(count);
    }

    /// One denied packet was logged (`direction`: ingress, egress or other).
    pub fn denied_packet(&self, direction: &str) {
        self.denied_packets
            .get_or_create(&vec![("direction".into(), direction.into())])
            .inc();
    }

    /// `packets` more were allowed by `namespace/policy` in `direction`.
    pub fn policy_allowed(&self, namespace: &str, policy: &str, direction: &str, packets: u64) {
        self.policy_allowed_packets
            .get_or_create(&vec![
                ("namespace".into(), namespace.into()),
                ("policy".into(), policy.into()),
                ("direction".into(), direction.into()),
            ])
            .inc_by(packets);
    }

    /// A change seen `took` ago is now in the kernel.
    pub fn programmed(&self, took: Duration) {
        self.programming_latency.observe(took.as_secs_f64());
    }

    /// A list or watch of `kind` failed.
    pub fn api_error(&self, kind: &str, reason: &str) {
        self.api_watch_errors
            .get_or_create(&vec![
                ("kind".into(), kind.into()),
                ("reason".into(), reason.into()),
            ])
            .inc();
    }

    /// `kind` cannot be read, and why; or (`None`) it can.
    pub fn set_api_problem(&self, kind: &str, problem: Option<String>) {
        self.api_readable
            .get_or_create(&vec![("kind".into(), kind.into())])
            .set(problem.is_none() as i64);
        let mut problems = self.api_problems.lock().unwrap();
        match problem {
            Some(p) => problems.insert(kind.into(), p),
            None => problems.remove(kind),
        };
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

    /// Ready: a full sync has succeeded, the last attempt did not fail and every watched kind
    /// can be read. Otherwise, why not.
    pub fn readiness(&self) -> Result<(), String> {
        if let Some(reason) = self.waiting() {
            return Err(reason);
        }
        // An API problem first: with RBAC missing from the start there is no sync either, and
        // the forbidden kind is what the operator must be told.
        let problems = self.api_problems.lock().unwrap();
        if !problems.is_empty() {
            let why: Vec<&str> = problems.values().map(String::as_str).collect();
            return Err(format!(
                "the API cannot be read, the last state stays enforced: {}",
                why.join("; ")
            ));
        }
        if !self.synced_once.load(Ordering::Relaxed) {
            return Err("no successful sync yet".into());
        }
        if self.failing.load(Ordering::Relaxed) {
            return Err("the last sync failed (see the log)".into());
        }
        Ok(())
    }

    pub fn ready(&self) -> bool {
        self.readiness().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_the_unreadable_kind_before_the_first_sync() {
        let metrics = Metrics::new(Duration::from_secs(120));
        assert_eq!(metrics.readiness(), Err("no successful sync yet".into()));
        metrics.set_api_problem("Pod", Some("cannot read Pod: 403 forbidden".into()));
        let why = metrics.readiness().unwrap_err();
        assert!(why.contains("cannot read Pod: 403 forbidden"), "{why}");
        metrics.set_api_problem("Pod", None);
        assert_eq!(metrics.readiness(), Err("no successful sync yet".into()));
    }
}
