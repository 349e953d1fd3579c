//! A cheap check, run every few seconds between full syncs, that nobody has flushed our dispatch
//! chains or removed our jumps to them: either opens every flow we deny. The idea is kube-proxy's
//! canary chain (pkg/proxy/iptables/proxier.go watches KUBE-PROXY-CANARY to notice a flushed
//! table); ours reads only the few rules that matter instead of the whole table: for each hook,
//! the first rule of its built-in chain (`iptables -S FORWARD 1`) and our chain it jumps to
//! (`iptables -S KNI-FORWARD`, one rule per local pod).

use super::{Dataplane, kernel, run_tool};
use std::path::Path;

impl Dataplane {
    /// What is wrong with our hooks and dispatch chains compared with what we last wrote, or
    /// `None` when they are intact (or nothing was written yet, or the check could not run: a
    /// held xtables lock is not damage).
    pub fn hooks_damaged(&self) -> Option<String> {
        let applied = self.applied.as_ref()?;
        for (family, table) in &applied.tables {
            let Some(bin) = self.tables.list_tool(*family) else {
                continue;
            };
            for jump in &table.jumps {
                let Ok(first) = list(&bin, &[&jump.builtin, "1"]) else {
                    continue;
                };
                let expected = format!("-A {} {}", jump.builtin, jump.spec);
                if !first.lines().any(|l| l == expected) {
                    return Some(format!(
                        "{family}: our jump is not the first rule of {}",
                        jump.builtin
                    ));
                }
                let target = &jump.spec[jump.spec.rfind(' ').map_or(0, |i| i + 1)..];
                let rules = match list(&bin, &[target]) {
                    Ok(rules) => rules,
                    Err(e) if format!("{e:#}").contains("lock") => continue,
                    Err(_) => return Some(format!("{family}: chain {target} is missing")),
                };
                // Parsed like iptables-save output, so rules compare in our canonical form.
                let save: String = format!("*filter\n:{target} - [0:0]\n")
                    + &rules
                        .lines()
                        .filter(|l| l.starts_with("-A "))
                        .map(|l| format!("{l}\n"))
                        .collect::<String>();
                let got = kernel::parse_iptables_save(&save);
                let empty = Vec::new();
                if got.rules.get(target).unwrap_or(&empty)
                    != table.rules.get(target).unwrap_or(&empty)
                {
                    return Some(format!("{family}: chain {target} has other rules"));
                }
            }
        }
        None
    }
}

/// `iptables -S ARGS` (waiting at most a second for the xtables lock where the backend uses it).
fn list(bin: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["-w", "1", "-S"];
    all.extend_from_slice(args);
    run_tool(bin, &all, None)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_list_tool_is_the_save_tool_without_its_suffix() {
        use std::path::Path;
        assert_eq!(
            super::super::list_tool_of(Path::new("/usr/sbin/ip6tables-nft-save")),
            Some(Path::new("/usr/sbin/ip6tables-nft").to_path_buf())
        );
        assert_eq!(
            super::super::list_tool_of(Path::new("/sbin/iptables-save")),
            Some(Path::new("/sbin/iptables").to_path_buf())
        );
    }
}
