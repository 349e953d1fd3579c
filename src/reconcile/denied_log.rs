//! The denied-packet log (`--log-denied`): each packet our NFLOG rules copy becomes one
//! structured log line naming the pods (or addresses), protocol, port, direction and the
//! policies that isolate the pod in that direction, from the state last written. Those come from
//! the compiled state itself ([`log_denied::isolating_policies`], what `explain` lists), never
//! from a second reading of the policies.

use crate::compile::ir::{DesiredState, Family, Target};
use crate::compile::log_denied;
use crate::dataplane::nflog::{DeniedPacket, NflogReader, protocol_name};
use crate::metrics::Metrics;
use crate::model::ClusterSnapshot;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The log target of denied-packet lines, for log filters.
pub const LOG_TARGET: &str = "kube_netpol_iptables::denied";

/// What a denied packet's line needs from the last state written.
#[derive(Default)]
pub struct DeniedLog {
    lookup: Mutex<Lookup>,
}

#[derive(Default)]
struct Lookup {
    /// `namespace/name` of the pod holding each address.
    pods: HashMap<IpAddr, String>,
    /// The policies each logging chain's pod is isolated by.
    policies: HashMap<String, Vec<String>>,
}

/// One denied packet, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeniedEvent {
    /// `namespace/name`, or the address when no pod holds it.
    pub src: String,
    pub dst: String,
    pub policies: Vec<String>,
}

impl DeniedLog {
    /// Takes the pods of `snapshot` and the chains of the states just written.
    pub fn update(&self, snapshot: &ClusterSnapshot, desired: &[(Family, DesiredState)]) {
        let mut lookup = Lookup::default();
        for pod in snapshot.pods.iter().filter(|p| p.is_policy_relevant()) {
            for ip in &pod.ips {
                lookup.pods.insert(*ip, pod.key());
            }
        }
        for (_, state) in desired {
            for (chain, rules) in &state.chains {
                if rules
                    .iter()
                    .any(|r| matches!(r.target, Target::LogDenied(_)))
                {
                    lookup
                        .policies
                        .insert(chain.clone(), log_denied::isolating_policies(state, chain));
                }
            }
        }
        *self.lookup.lock().unwrap_or_else(|e| e.into_inner()) = lookup;
    }

    pub fn resolve(&self, packet: &DeniedPacket) -> DeniedEvent {
        let lookup = self.lookup.lock().unwrap_or_else(|e| e.into_inner());
        let name = |ip: &IpAddr| {
            lookup
                .pods
                .get(ip)
                .cloned()
                .unwrap_or_else(|| ip.to_string())
        };
        DeniedEvent {
            src: name(&packet.src),
            dst: name(&packet.dst),
            policies: lookup
                .policies
                .get(&packet.chain)
                .cloned()
                .unwrap_or_default(),
        }
    }

    /// Writes the line of one denied packet and counts it.
    pub fn record(&self, packet: &DeniedPacket, metrics: Option<&Metrics>) {
        let event = self.resolve(packet);
        tracing::info!(target: LOG_TARGET,
            direction = packet.direction.as_str(),
            src = event.src.as_str(),
            src_ip = %packet.src,
            dst = event.dst.as_str(),
            dst_ip = %packet.dst,
            protocol = protocol_name(packet.protocol).as_str(),
            port = packet.dst_port,
            policies = event.policies.join(",").as_str(),
            chain = packet.chain.as_str(),
            "denied packet"
        );
        if let Some(m) = metrics {
            m.denied_packet(packet.direction.as_str());
        }
    }

    /// Reads `reader` on a thread of its own for as long as the process runs.
    pub fn spawn_reader(
        self: Arc<Self>,
        mut reader: NflogReader,
        metrics: Option<Arc<Metrics>>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("nflog".into())
            .spawn(move || {
                loop {
                    match reader.receive() {
                        Ok(packets) => {
                            for packet in &packets {
                                self.record(packet, metrics.as_deref());
                            }
                        }
                        Err(e) => {
                            // ENOBUFS: the kernel dropped log messages we were too slow for.
                            tracing::warn!(target: LOG_TARGET, "reading denied packets: {e:#}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::enforcement::{self, Options};
    use crate::compile::log_denied::{Direction, LogDenied};
    use crate::compile::{Compiler, names};
    use crate::source::manifests::load_text;

    #[test]
    fn a_denied_packet_names_the_pods_and_the_policies_isolating_the_dropping_pod() {
        let text = "\
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: n1}
status: {phase: Running, podIP: 10.0.0.4}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress]}
";
        let snapshot = load_text("test.yaml", text).unwrap();
        let mut states = Compiler::new().compile(&snapshot, "n1").into_vec();
        let options = Options {
            log_denied: Some(LogDenied {
                group: 100,
                rate: Default::default(),
            }),
            ..Options::default()
        };
        enforcement::apply(&mut states, &snapshot, "n1", &options);
        let log = DeniedLog::default();
        log.update(&snapshot, &states);
        let packet = DeniedPacket {
            direction: Direction::Ingress,
            chain: names::pod_chain(true, "shop/db"),
            src: "192.0.2.9".parse().unwrap(),
            dst: "10.0.0.4".parse().unwrap(),
            protocol: 6,
            dst_port: Some(5432),
        };
        assert_eq!(
            log.resolve(&packet),
            DeniedEvent {
                src: "192.0.2.9".into(),
                dst: "shop/db".into(),
                policies: vec!["shop/default-deny".into()],
            }
        );
    }
}
