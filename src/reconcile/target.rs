//! What the loop syncs into: the node (compile for both families, then the dataplane), behind a
//! small trait so the loop can be tested with a fake. The only place that calls the compiler.

use super::denied_log::DeniedLog;
use super::policy_counters::PolicyCounters;
use super::strict::FlowCutter;
use crate::compile::ir::{DesiredState, Family};
use crate::compile::{Compiler, enforcement};
use crate::dataplane::{Dataplane, SyncMode, SyncReport};
use crate::metrics::Metrics;
use crate::model::ClusterSnapshot;
use anyhow::Result;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

/// The log target from before the module layout of issue 10, kept so users' log filters still
/// match.
const LOG_TARGET: &str = "kube_netpol_iptables::agent";

/// Where snapshots are enforced. Both calls may block (they run processes): the loop makes them
/// off the async threads.
pub trait Target: Send + 'static {
    /// Compiles `snapshot` and writes it; on failure the last good state stays.
    fn sync(&mut self, snapshot: &ClusterSnapshot, mode: SyncMode) -> Result<()>;
    /// Whether someone changed what we wrote, and how (a cheap check between full syncs).
    fn damage(&mut self) -> Option<String>;
    /// When what the last successful `sync` wrote was in force, if it did more afterwards (on nft
    /// the removal of replaced rules, see `SyncReport::in_force_at`; strict mode's flow cut, the
    /// denied-log and counter bookkeeping); `None`: when it returned.
    fn in_force_at(&self) -> Option<std::time::Instant> {
        None
    }
}

/// The desired state of `node` for both families, compiled from scratch.
pub fn desired_states(snapshot: &ClusterSnapshot, node: &str) -> Vec<(Family, DesiredState)> {
    Compiler::new().compile(snapshot, node).into_vec()
}

/// `desired_states`, reusing the peer selections of earlier calls (see `Compiler`): the same
/// result, at a cost proportional to what changed.
pub fn desired_states_cached(
    snapshot: &ClusterSnapshot,
    node: &str,
    cache: &mut Compiler,
) -> Vec<(Family, DesiredState)> {
    cache.compile(snapshot, node).into_vec()
}

/// This node's kernel.
pub struct NodeTarget {
    dataplane: Dataplane,
    cache: Compiler,
    node: String,
    metrics: Option<Arc<Metrics>>,
    /// Deny action, strict mode and new-pod isolation.
    enforcement: enforcement::Options,
    flow_cutter: FlowCutter,
    /// `--log-denied`: told the pods and chains of each state written.
    denied_log: Option<Arc<DeniedLog>>,
    /// Told the policy chains of each state written, for their counters.
    policy_counters: Option<Arc<PolicyCounters>>,
    /// When the last successful sync's writes were in force.
    in_force_at: Option<std::time::Instant>,
}

impl NodeTarget {
    pub fn new(
        dataplane: Dataplane,
        node: String,
        metrics: Option<Arc<Metrics>>,
        enforcement: enforcement::Options,
    ) -> NodeTarget {
        NodeTarget {
            dataplane,
            cache: Compiler::new(),
            node,
            metrics,
            enforcement,
            flow_cutter: FlowCutter::default(),
            in_force_at: None,
            denied_log: None,
            policy_counters: None,
        }
    }

    /// Keeps `denied_log` and `policy_counters` told what each sync wrote.
    pub fn observed_by(
        mut self,
        denied_log: Option<Arc<DeniedLog>>,
        policy_counters: Option<Arc<PolicyCounters>>,
    ) -> NodeTarget {
        self.denied_log = denied_log;
        self.policy_counters = policy_counters;
        self
    }

    /// Compiles a snapshot and writes it, logging the outcome and recording it in the metrics.
    fn sync_snapshot(&mut self, snapshot: &ClusterSnapshot, mode: SyncMode) -> Result<SyncReport> {
        let started = Instant::now();
        let metrics = self.metrics.as_deref();
        let node = self.node.as_str();
        let mut desired = desired_states_cached(snapshot, node, &mut self.cache);
        enforcement::apply(&mut desired, snapshot, node, &self.enforcement);
        let compiled = started.elapsed();
        report_failed_closed(&desired, metrics);
        self.in_force_at = None;
        let report = match self.dataplane.sync(&desired, mode) {
            Ok(r) => r,
            Err(e) => {
                if let Some(m) = metrics {
                    m.sync_failed(mode, true);
                }
                return Err(e.into());
            }
        };
        self.in_force_at = Some(report.in_force_at.unwrap_or_else(std::time::Instant::now));
        for repair in &report.repairs {
            tracing::warn!(target: LOG_TARGET,
                repair = %repair,
                "repaired drift: the kernel differed from what we had written"
            );
        }
        if let Some(m) = metrics {
            m.sync_succeeded(mode, started.elapsed(), &report, &desired);
        }
        if let Some(log) = &self.denied_log {
            log.update(snapshot, &desired);
        }
        if let Some(counters) = &self.policy_counters {
            counters.update(&desired);
        }
        // Strict mode: flows the new rules deny stop now, not when they end.
        if self.enforcement.strict_mode
            && (report.ipset_lines + report.iptables_lines > 0 || mode == SyncMode::Full)
        {
            self.flow_cutter.cut_after_sync(&desired, metrics);
        }
        tracing::info!(target: LOG_TARGET,
            node,
            ?mode,
            pods = snapshot.pods.len(),
            policies = snapshot.policies.len(),
            rules = desired.iter().map(|(_, s)| s.rule_count()).sum::<usize>(),
            sets = desired.iter().map(|(_, s)| s.sets.len()).sum::<usize>(),
            ipset_lines = report.ipset_lines,
            iptables_lines = report.iptables_lines,
            repairs = report.repairs.len(),
            compile_ms = compiled.as_millis() as u64,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "synced"
        );
        Ok(report)
    }
}

impl Target for NodeTarget {
    fn sync(&mut self, snapshot: &ClusterSnapshot, mode: SyncMode) -> Result<()> {
        self.sync_snapshot(snapshot, mode).map(drop)
    }

    fn in_force_at(&self) -> Option<std::time::Instant> {
        self.in_force_at
    }

    fn damage(&mut self) -> Option<String> {
        self.dataplane.hooks_damaged()
    }
}

/// Logs the policy rules that could not be programmed (they allow nothing) whenever that list
/// changes, and records them for /metrics and /readyz.
fn report_failed_closed(desired: &[(Family, DesiredState)], metrics: Option<&Metrics>) {
    let rules: BTreeSet<String> = desired
        .iter()
        .flat_map(|(_, s)| &s.failed_closed)
        .map(ToString::to_string)
        .collect();
    let rules: Vec<String> = rules.into_iter().collect();
    let before = match metrics {
        Some(m) => m.set_failed_closed(rules.clone()),
        None => Vec::new(),
    };
    if metrics.is_some() && before == rules {
        return;
    }
    for rule in &rules {
        tracing::warn!(target: LOG_TARGET,
            rule = rule.as_str(),
            "a policy rule could not be programmed: it allows nothing (fail closed); everything else is enforced as usual"
        );
    }
    if rules.is_empty() && !before.is_empty() {
        tracing::info!(target: LOG_TARGET, "every policy rule is programmed again");
    }
}
