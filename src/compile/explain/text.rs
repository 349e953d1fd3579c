//! The text form of an [`Explanation`] (`--output text`).

use super::{End, Explanation, Part};
use std::fmt;

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |e: &End| match &e.pod {
            Some(pod) => format!("{pod} ({})", e.address),
            None => format!("{} (outside the cluster)", e.address),
        };
        writeln!(
            f,
            "{} {} -> {} port {} ({}): {}",
            self.protocol,
            show(&self.from),
            show(&self.to),
            self.port,
            self.family,
            if self.allowed { "ALLOWED" } else { "DENIED" }
        )?;
        for (name, end, v) in [
            ("egress", &self.from, &self.egress),
            ("ingress", &self.to, &self.ingress),
        ] {
            let whose = match (&end.pod, &end.node) {
                (Some(pod), Some(node)) => format!("{pod} on node {node}"),
                (Some(pod), None) => pod.clone(),
                (None, _) => end.address.to_string(),
            };
            writeln!(
                f,
                "  {name} of {whose}: {}",
                if v.allowed { "allowed" } else { "denied" }
            )?;
            if let Some(note) = &v.note {
                writeln!(f, "    {note}")?;
            }
            if !v.isolating_policies.is_empty() {
                writeln!(f, "    isolated by: {}", v.isolating_policies.join(", "))?;
            }
            if !v.cluster_policies.is_empty() {
                writeln!(
                    f,
                    "    cluster network policies: {}",
                    v.cluster_policies.join(", ")
                )?;
            }
            for h in &v.cluster_rules {
                write!(
                    f,
                    "    {} {} {name} rule {} ({:?}): {}",
                    h.tier, h.policy, h.rule, h.name, h.action
                )?;
                write_matched(f, &h.peers, "", h.port.as_ref(), ", any protocol")?;
            }
            let d = &v.decided_by;
            match (&d.policy, d.rule) {
                (Some(policy), Some(rule)) => writeln!(
                    f,
                    "    decided by: {} {policy} rule {rule}{}: {}",
                    d.stage,
                    d.rule_name
                        .as_ref()
                        .map(|n| format!(" ({n:?})"))
                        .unwrap_or_default(),
                    d.action
                )?,
                _ => writeln!(f, "    decided by: {}: {}", d.stage, d.action)?,
            }
            for a in &v.allowed_by {
                write!(f, "    allowed by {} {name} rule {}", a.policy, a.rule)?;
                write_matched(f, &a.peers, ", any peer", a.port.as_ref(), ", any port")?;
            }
            if d.stage == "NetworkPolicy" && !v.allowed {
                writeln!(f, "    no rule of these policies matches")?;
            }
            for hit in &v.except_hits {
                writeln!(
                    f,
                    "    {} {name} rule {} peer {}: ipBlock {} excepts {}",
                    hit.policy, hit.rule, hit.peer, hit.cidr, hit.except
                )?;
            }
            for fc in &v.failed_closed {
                writeln!(f, "    failed closed: {fc}")?;
            }
        }
        Ok(())
    }
}

/// The peers and the port of a rule that matched, ending the line: `no_peers` when it has no
/// peers, `no_port` when it has no port.
fn write_matched(
    f: &mut fmt::Formatter<'_>,
    peers: &[Part],
    no_peers: &str,
    port: Option<&Part>,
    no_port: &str,
) -> fmt::Result {
    if peers.is_empty() {
        write!(f, "{no_peers}")?;
    }
    for p in peers {
        write!(f, ", peer {} ({})", p.index, p.what)?;
    }
    match port {
        None => writeln!(f, "{no_port}"),
        Some(p) => writeln!(f, ", port {} ({})", p.index, p.what),
    }
}
