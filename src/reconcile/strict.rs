//! Strict mode's step after a sync wrote the kernel: cut the established flows the new state
//! denies (decided by `compile::strict`, deleted by `dataplane::conntrack`), log and count them.

use crate::compile::DesiredState;
use crate::dataplane::conntrack::cut_denied_flows;
use crate::metrics::Metrics;
use crate::model::Family;
use std::time::Instant;

/// The log target of the sync (see `target.rs`), so users' filters for it cover this too.
const LOG_TARGET: &str = "kube_netpol_iptables::agent";

/// Remembers whether the last attempt failed, so that a node without ctnetlink logs once per run
/// of failures rather than at every sync.
#[derive(Default)]
pub struct FlowCutter {
    failing: bool,
}

impl FlowCutter {
    /// A failure is logged and left to the next sync: the rules are written, only flows older
    /// than them go on.
    pub fn cut_after_sync(&mut self, states: &[(Family, DesiredState)], metrics: Option<&Metrics>) {
        let started = Instant::now();
        match cut_denied_flows(states) {
            Ok(report) => {
                let cut: u64 = report.cut.values().sum();
                if let Some(m) = metrics {
                    for (direction, count) in &report.cut {
                        m.flows_cut(direction.as_str(), *count);
                    }
                }
                if cut > 0 {
                    tracing::info!(target: LOG_TARGET,
                        cut,
                        flows = report.flows,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "strict mode: cut established flows the new policy state denies"
                    );
                }
                if std::mem::take(&mut self.failing) {
                    tracing::info!(target: LOG_TARGET, "strict mode: cutting flows works again");
                }
            }
            Err(e) => {
                if std::mem::replace(&mut self.failing, true) {
                    tracing::debug!(target: LOG_TARGET, "strict mode: still cannot cut flows: {e:#}");
                } else {
                    tracing::warn!(target: LOG_TARGET,
                        "strict mode: could not cut the flows the new policy state denies (they go on until they end; retried at the next sync): {e:#}"
                    );
                }
            }
        }
    }
}
