//! The text form of an [`Explanation`] (`--output text`).

use super::{End, Explanation};
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
            if v.isolated {
                writeln!(f, "    isolated by: {}", v.isolating_policies.join(", "))?;
            }
            for a in &v.allowed_by {
                write!(f, "    allowed by {} {name} rule {}", a.policy, a.rule)?;
                match a.peers.as_slice() {
                    [] => write!(f, ", any peer")?,
                    peers => {
                        for p in peers {
                            write!(f, ", peer {} ({})", p.index, p.what)?;
                        }
                    }
                }
                match &a.port {
                    None => writeln!(f, ", any port")?,
                    Some(p) => writeln!(f, ", port {} ({})", p.index, p.what)?,
                }
            }
            if v.isolated && !v.allowed {
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
