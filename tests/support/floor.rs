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
