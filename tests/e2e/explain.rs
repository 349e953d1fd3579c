//! `explain` against the kernel: on a two-node lab, for cases of the e2e matrix, its verdict for
//! every ordered pair of pods, both protocols, both ports and both families equals what a real
//! connection does through the rules the agents programmed, on both iptables backends.

use crate::matrix::cases;
use kni_testlab::lab::{self, Lab, Probe, Proto, run_probes, skip_unless_root};
use std::collections::BTreeMap;

/// Matrix cases covering ingress and egress, ports and named ports, namespace and pod
/// selectors, ipBlocks with `except`, two policies on one pod, and pods that are never peers.
const CASES: [&str; 11] = [
    "default deny ingress in x",
    "default deny egress in x",
    "deny all in x with empty lists",
    "namespaceSelector OR podSelector as two peers",
    "ingress only on TCP port 81",
    "ingress named port resolves per destination pod",
    "egress named port resolves per peer pod",
    "egress and ingress both judge a flow",
    "egress to ipBlocks with except: pods of node 1 cut out",
    "ingress from an ipBlock covering exactly one pod per family",
    "finished and hostNetwork pods are never peers",
];

/// `explain`'s verdict for one probe, from the lab's manifests.
fn explained(lab: &Lab, p: &Probe) -> bool {
    let protocol = if p.proto == Proto::Tcp { "TCP" } else { "UDP" };
    let json = lab.explain_json(&p.from, &p.to, p.port, protocol, p.v6);
    json["allowed"].as_bool().expect("\"allowed\" is a boolean")
}

fn all_probes(lab: &Lab) -> Vec<Probe> {
    let mut probes = Vec::new();
    for from in &lab.pods {
        for to in &lab.pods {
            if from.key() == to.key() {
                continue;
            }
            for proto in [Proto::Tcp, Proto::Udp] {
                for port in lab::PORTS {
                    for v6 in [false, true] {
                        probes.push(Probe {
                            from: from.key(),
                            to: to.key(),
                            proto,
                            port,
                            v6,
                        });
                    }
                }
            }
        }
    }
    probes
}

fn explain_equals_probes(test: &str, backend: &str) {
    if skip_unless_root(test) {
        return;
    }
    let lab = Lab::new(crate::AGENT, 2, |_, pod| usize::from(pod == "c"));
    let mut failures = Vec::new();
    let mut checked = 0;
    for c in cases().into_iter().filter(|c| CASES.contains(&c.name)) {
        checked += 1;
        let mut docs: Vec<&str> = c.policies.iter().map(String::as_str).collect();
        docs.extend(c.extra.iter().map(String::as_str));
        lab.write_cluster_manifests_labelled(&docs, &c.labels);
        lab.sync_all(backend);
        let probes = all_probes(&lab);
        // explain first, a few at a time (it is a process per probe).
        let mut verdicts = BTreeMap::new();
        for chunk in probes.chunks(8) {
            let got: Vec<bool> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|p| s.spawn(|| explained(&lab, p)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            verdicts.extend(chunk.iter().cloned().zip(got));
        }
        let denied = verdicts.values().filter(|v| !**v).count();
        let wrong = run_probes(&lab, probes, &|p| verdicts[p]);
        eprintln!(
            "{test}: {}: {} ({denied} of {} denied)",
            c.name,
            if wrong.is_empty() {
                "explain agrees".to_string()
            } else {
                format!("{} disagree", wrong.len())
            },
            verdicts.len()
        );
        if !wrong.is_empty() {
            failures.push(format!(
                "case {:?} (expected = explain's verdict):\n  {}",
                c.name,
                wrong.join("\n  ")
            ));
        }
    }
    assert_eq!(
        checked,
        CASES.len(),
        "a case named in CASES is not in the matrix"
    );
    assert!(
        failures.is_empty(),
        "{test} ({backend}):\n{}",
        failures.join("\n")
    );
}

#[test]
fn explain_equals_probes_legacy() {
    explain_equals_probes("explain_equals_probes_legacy", "legacy");
}

#[test]
fn explain_equals_probes_nft() {
    explain_equals_probes("explain_equals_probes_nft", "nft");
}
