//! The kernel's floor for a desired state, for the benchmarks: the restore text a fresh node needs
//! and the time the tools take to apply it, with nothing of the agent around them.

use crate::lab::run_with_stdin;
use kube_netpol_iptables::compile::ir::{DesiredState, Family};
use kube_netpol_iptables::dataplane::Backend;
use kube_netpol_iptables::dataplane::kernel::{KernelSets, KernelTable, View};
use kube_netpol_iptables::dataplane::render::{render_ipset_update, render_iptables};
use std::time::{Duration, Instant};

pub type States = Vec<(Family, DesiredState)>;

/// The restore text a fresh node needs: (ipset, [(family, iptables)]).
pub fn payload(states: &States) -> (String, Vec<(Family, String)>) {
    let ipset = render_ipset_update(states.iter().map(|(_, s)| s), &KernelSets::default()).unwrap();
    let want = View::of_desired(states);
    let tables = states
        .iter()
        .map(|(f, _)| {
            (
                *f,
                render_iptables(&want.tables[f], &KernelTable::default()).unwrap(),
            )
        })
        .collect();
    (ipset, tables)
}

/// `iptables-<backend>-restore` or `ip6tables-<backend>-restore`.
fn restore_bin(backend: Backend, family: Family) -> String {
    let prog = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    format!("{prog}-{backend}-restore")
}

/// The same payload piped straight into the tools, nothing else.
pub fn bare_restore(backend: Backend, states: &States) -> Duration {
    let (ipset, tables) = payload(states);
    let start = Instant::now();
    run_with_stdin(&["ipset", "restore"], &ipset);
    for (family, text) in &tables {
        run_with_stdin(
            &[&restore_bin(backend, *family), "--noflush", "--wait", "10"],
            text,
        );
    }
    start.elapsed()
}

/// A yardstick for what the sets per distinct selection saved: `states` with each chain given
/// its own copy of every set it refers to, close to the layout before issue 11, which made a set
/// per policy rule's peer list (so a selection used by many policies was written many times).
/// Same rules, same members per rule; more sets and members.
pub fn previous_layout(states: &States) -> States {
    use kube_netpol_iptables::compile::ir::Match;
    states
        .iter()
        .map(|(family, state)| {
            let mut state = state.clone();
            let shared = std::mem::take(&mut state.sets);
            let mut copied = std::collections::BTreeSet::new();
            for rules in state.chains.values_mut() {
                // One copy per chain (a policy's rules for one direction) and selection.
                let mut in_chain = std::collections::BTreeMap::new();
                for rule in rules {
                    for m in &mut rule.matches {
                        if let Match::Set { name, .. } = m
                            && let Some(set) = shared.get(name.as_str())
                        {
                            copied.insert(name.clone());
                            let next = state.sets.len();
                            let copy = in_chain.entry(name.clone()).or_insert_with(|| {
                                // Within ipset's 31 characters and our prefix (cleanup removes it).
                                let copy = format!("KNI-Y{}{next:08}", family_digit(*family));
                                state.sets.insert(copy.clone(), set.clone());
                                copy
                            });
                            *name = copy.clone();
                        }
                    }
                }
            }
            // Sets no rule refers to by name stay as they are.
            for (name, set) in shared {
                if !copied.contains(&name) {
                    state.sets.insert(name, set);
                }
            }
            (*family, state)
        })
        .collect()
}

fn family_digit(family: Family) -> char {
    match family {
        Family::V4 => '4',
        Family::V6 => '6',
    }
}
