//! The end-to-end suites, one module each, in one test binary (the lab and the fake API server
//! compile once): the real agent binary programs node network namespaces, and real TCP/UDP
//! connections between pod namespaces decide. Needs root; without it every test says SKIPPED
//! loudly and passes (KNI_E2E_REQUIRED=1 makes that a failure). Run one suite by its module path,
//! e.g. `cargo test --test e2e faults::`.

mod abuse;
mod agent;
mod cnp;
mod explain;
mod faults;
mod hardening;
mod image;
mod kube;
mod kube_cnp;
mod kube_node;
mod logdenied;
mod matrix;
mod other_engines;
mod strict;
mod sync;
mod upgrade;

/// The agent binary under test.
const AGENT: &str = env!("CARGO_BIN_EXE_kube-netpol-iptables");
