//! Support shared by the test binaries, the benchmark and the profiling example (never shipped):
//! the network-namespace lab with real probes ([`lab`]), the in-process fake Kubernetes API
//! server ([`fakeapi`]), the kernel's floor for the benchmarks ([`floor`]), their one table ([`table`]) and the deterministic synthetic cluster ([`synthetic`]).

pub mod fakeapi;
pub mod floor;
pub mod lab;
pub mod synthetic;
pub mod table;
