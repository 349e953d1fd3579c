//! Manifest parsing, conversion, compile() and rendering must never panic, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kube_netpol_iptables::fuzzing::manifests_to_restore_text(data);
});
