//! Replays the fuzz corpus (fuzz/corpus/) through the fuzzed code path on the stable toolchain,
//! plus every prefix of each input, so inputs the fuzzer once found keep being checked in CI.

use kube_netpol_iptables::fuzzing::manifests_to_restore_text;

#[test]
fn corpus_inputs_and_their_prefixes_never_panic() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/manifests_compile");
    let mut inputs = 0;
    let mut accepted = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        inputs += 1;
        if manifests_to_restore_text(&data).is_some() {
            accepted += 1;
        }
        for end in 0..data.len() {
            let _ = manifests_to_restore_text(&data[..end]);
        }
    }
    assert!(inputs >= 3, "the corpus is missing");
    assert!(
        accepted >= 2,
        "the seeds that are valid manifests must render"
    );
}
