//! `kni_policy_allowed_packets_total`: how many packets each policy allowed, from the kernel's
//! counters of our policy chains' rules (one `iptables-save -c` per family, at most every 30 s by
//! default: see docs/metrics.md for its cost). A rewritten chain's counters restart at zero; a
//! reading below the last one is counted whole, so the metric only grows (packets between the
//! last reading and a rewrite are not counted).

use crate::compile::ir::{DesiredState, Family};
use crate::dataplane::Tables;
use crate::dataplane::counters::parse_policy_counters;
use crate::metrics::Metrics;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The default interval between readings (`--policy-counters-interval`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct PolicyCounters {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// (namespace, policy name, direction) of each policy chain written.
    policies: HashMap<String, (String, String, &'static str)>,
    /// The last reading of each chain, per family.
    last: HashMap<(Family, String), u64>,
}

impl PolicyCounters {
    /// Takes the policy chains of the states just written.
    pub fn update(&self, desired: &[(Family, DesiredState)]) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.policies.clear();
        for (_, desired) in desired {
            for (chain, origin) in &desired.origins {
                let (namespace, name) = origin
                    .policy
                    .split_once('/')
                    .unwrap_or(("", &origin.policy));
                state.policies.insert(
                    chain.clone(),
                    (namespace.to_string(), name.to_string(), origin.direction),
                );
            }
        }
    }

    /// Adds what each policy allowed since the last reading of `family`.
    pub fn record(&self, family: Family, reading: BTreeMap<String, u64>, metrics: &Metrics) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let State { policies, last } = &mut *state;
        last.retain(|(f, chain), _| *f != family || reading.contains_key(chain));
        for (chain, packets) in reading {
            let before = last.insert((family, chain.clone()), packets);
            // Below the last reading: the chain was rewritten and counts from zero.
            let added = match before {
                Some(b) if b <= packets => packets - b,
                _ => packets,
            };
            if let Some((namespace, name, direction)) = policies.get(&chain)
                && added > 0
            {
                metrics.policy_allowed(namespace, name, direction, added);
            }
        }
    }

    /// Reads the counters every `interval` until `stop`.
    pub async fn run(
        self: Arc<Self>,
        tables: Tables,
        interval: Duration,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) {
        // The first reading one interval after start, not during the first sync.
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let (me, tables, metrics) = (self.clone(), tables.clone(), metrics.clone());
            let read = tokio::task::spawn_blocking(move || {
                for family in Family::ALL {
                    let text = tables.save_filter_with_counters(family)?;
                    me.record(family, parse_policy_counters(&text), &metrics);
                }
                Ok::<(), crate::dataplane::DataplaneError>(())
            })
            .await;
            if let Ok(Err(e)) = read {
                tracing::warn!(target: "kube_netpol_iptables::agent", "reading policy rule counters: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::ir::PolicyChainOrigin;

    fn allowed(metrics: &Metrics) -> Option<f64> {
        metrics
            .render()
            .lines()
            .find(|l| l.starts_with("kni_policy_allowed_packets_total{") && l.contains("\"web\""))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn readings_become_increments_and_a_rewritten_chain_counts_from_zero() {
        let metrics = Metrics::new(Duration::from_secs(120));
        let counters = PolicyCounters::default();
        let mut state = DesiredState::default();
        state.origins.insert(
            "KNI-POLI-0".into(),
            PolicyChainOrigin {
                policy: "shop/web".into(),
                direction: "ingress",
                rules: vec![],
                tier: None,
            },
        );
        counters.update(&[(Family::V4, state)]);
        let read = |n: u64, family| {
            counters.record(family, BTreeMap::from([("KNI-POLI-0".into(), n)]), &metrics)
        };
        read(5, Family::V4);
        assert_eq!(allowed(&metrics), Some(5.0));
        read(8, Family::V4);
        assert_eq!(allowed(&metrics), Some(8.0));
        // Rewritten (a policy change): the kernel counts from zero again.
        read(2, Family::V4);
        assert_eq!(allowed(&metrics), Some(10.0));
        // The other family's chain of the same name is counted on its own.
        read(1, Family::V6);
        assert_eq!(allowed(&metrics), Some(11.0));
        read(2, Family::V4);
        assert_eq!(allowed(&metrics), Some(11.0), "nothing new");
        let text = metrics.render();
        assert!(
            text.contains(
                "kni_policy_allowed_packets_total{namespace=\"shop\",policy=\"web\",direction=\"ingress\"} 11"
            ),
            "{text}"
        );
    }
}
