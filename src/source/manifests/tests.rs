use super::parse::flow_nesting_beyond;
use super::read::read_manifest;
use super::*;
use crate::source::convert;
use std::io::Write;
use std::path::{Path, PathBuf};

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("kni-manifests-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn write(&self, name: &str, text: &str) {
        std::fs::File::create(self.0.join(name))
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn reads_multi_document_lists_and_json_and_skips_other_kinds() {
    let d = TempDir::new("multi");
    d.write(
        "a.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {ns: x}}\n---\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: a, namespace: x}\n- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n  metadata: {name: p, namespace: y}\n  spec: {podSelector: {}}\n",
    );
    d.write(
        "b.json",
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"b","namespace":"x"}}"#,
    );
    d.write("notes.txt", "not a manifest");
    d.write(".a.yaml.swp", "garbage: [");
    let s = load_dir(&d.0).unwrap();
    assert_eq!(s.pods.len(), 2);
    assert_eq!(s.policies.len(), 1);
    assert_eq!(s.namespaces["x"].labels["ns"], "x");
    // Namespace y is implied by the policy, with the label the API server sets.
    assert_eq!(s.namespaces["y"].labels[convert::NAMESPACE_NAME_LABEL], "y");
}

#[test]
fn errors_name_the_file_and_document() {
    let d = TempDir::new("bad");
    d.write(
        "ok.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
    );
    d.write(
        "pol.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: y}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\nspec: {podSelector: {}, ingress: [{ports: [{port: 80, endPort: 70}]}]}\n",
    );
    let err = load_dir(&d.0).unwrap_err().to_string();
    assert!(
        err.contains("pol.yaml document 2 (NetworkPolicy x/bad)"),
        "{err}"
    );
    assert!(
        err.contains("spec.ingress[0].ports[0].endPort: 70 is below port 80"),
        "{err}"
    );

    let d = TempDir::new("syntax");
    d.write("s.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: [\n");
    let err = load_dir(&d.0).unwrap_err().to_string();
    assert!(
        err.contains("s.yaml document 1") && err.contains("not valid YAML"),
        "{err}"
    );

    let d = TempDir::new("schema");
    d.write(
        "s.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: 7}\n",
    );
    let err = load_dir(&d.0).unwrap_err().to_string();
    assert!(
        err.contains("s.yaml document 1 (Pod a)") && err.contains("schema"),
        "{err}"
    );

    let d = TempDir::new("dup");
    d.write("a.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n");
    let err = load_dir(&d.0).unwrap_err().to_string();
    assert!(err.contains("defined twice"), "{err}");

    let err = load_dir(Path::new("/nonexistent/kni"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot read manifests directory"), "{err}");
}

const POD_X_A: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n";

/// A ConfigMap volume as the kubelet writes it: `name -> ..data/name`, `..data -> ..<ts>`, and
/// an update swaps `..data` atomically.
#[test]
fn reads_a_configmap_volume_once_and_follows_its_updates() {
    use std::os::unix::fs::symlink;
    let d = TempDir::new("configmap");
    let publish = |ts: &str, text: &str| {
        std::fs::create_dir(d.0.join(ts)).unwrap();
        std::fs::write(d.0.join(ts).join("pods.yaml"), text).unwrap();
        symlink(ts, d.0.join("..data_tmp")).unwrap();
        std::fs::rename(d.0.join("..data_tmp"), d.0.join("..data")).unwrap();
    };
    publish("..2026_11_23_10_00_00.1", POD_X_A);
    symlink("..data/pods.yaml", d.0.join("pods.yaml")).unwrap();
    let s = load_dir(&d.0).unwrap();
    assert_eq!(s.pods.len(), 1, "read once, not also through ..data");
    publish(
        "..2026_11_23_10_05_00.2",
        &format!("{POD_X_A}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: b, namespace: x}}\n"),
    );
    std::fs::remove_dir_all(d.0.join("..2026_11_23_10_00_00.1")).unwrap();
    assert_eq!(load_dir(&d.0).unwrap().pods.len(), 2);
}

/// Runs `f` on a thread and fails the test if it has not returned within 10 s.
fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("blocked")
}

#[test]
fn an_entry_that_cannot_be_read_fails_the_load() {
    let d = TempDir::new("dangling");
    d.write("a.yaml", POD_X_A);
    std::os::unix::fs::symlink("..data/gone.yaml", d.0.join("gone.yaml")).unwrap();
    // Not manifests: ignored even when dangling.
    std::os::unix::fs::symlink("nowhere", d.0.join("notes.txt")).unwrap();
    std::os::unix::fs::symlink("nowhere", d.0.join("..data")).unwrap();
    let err = load_dir(&d.0).unwrap_err().to_string();
    assert!(
        err.contains("gone.yaml") && err.contains("No such file"),
        "{err}"
    );

    let d = TempDir::new("fifo");
    d.write("a.yaml", POD_X_A);
    let fifo = d.0.join("pipe.yaml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let dir = d.0.clone();
    let err = within_10s(move || load_dir(&dir).unwrap_err().to_string());
    assert!(err.contains("pipe.yaml") && err.contains("FIFO"), "{err}");
    // Even when handed the FIFO directly, reading does not block.
    let err = within_10s(move || read_manifest(&fifo, 100).unwrap_err().to_string());
    assert!(err.contains("FIFO"), "{err}");
}

#[test]
fn duplicate_keys_are_rejected_with_file_document_and_key() {
    let dup = |text: &str| load_text("d.yaml", text).unwrap_err().to_string();
    let err = dup(&format!(
        "{POD_X_A}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec: {{podSelector: {{}}}}\nspec: {{podSelector: {{}}, ingress: [{{}}]}}\n"
    ));
    assert!(
        err.contains("d.yaml document 2") && err.contains("duplicate mapping key \"spec\""),
        "{err}"
    );
    let err = dup("apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: x, app: y}}\n");
    assert!(err.contains("duplicate mapping key \"app\""), "{err}");
    // JSON, as sigs.k8s.io/json's strict decoding reports duplicate fields.
    let err = dup(r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","name":"b"}}"#);
    assert!(err.contains("duplicate mapping key \"name\""), "{err}");
    // The same key in different mappings is fine.
    assert!(
        load_text(
            "ok.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {name: a}}\n"
        )
        .is_ok()
    );
}

#[test]
fn deep_nesting_is_rejected_quickly() {
    let started = std::time::Instant::now();
    for deep in [
        format!("{}{}", "[".repeat(300_000), "]".repeat(300_000)),
        format!("{}1{}", r#"{"a":"#.repeat(120_000), "}".repeat(120_000)),
        format!("items: {}{}", "[\n".repeat(100_000), "]".repeat(100_000)),
        format!(
            "kind: List\nitems:\n- a: {}1{}",
            "{b: ".repeat(65),
            "}".repeat(65)
        ),
    ] {
        let err = load_text("deep.json", &deep).unwrap_err().to_string();
        assert!(
            err.contains("deep.json") && err.contains("nested more than 64 levels"),
            "{err}"
        );
    }
    // Block nesting is not the scanner's problem but still bounded.
    let mut block = String::new();
    for level in 0..70 {
        block.push_str(&format!("{}k:\n", " ".repeat(level)));
    }
    let err = load_text("block.yaml", &block).unwrap_err().to_string();
    assert!(err.contains("nested more than 64 levels"), "{err}");
    // A regression guard, far above the milliseconds this takes (88 s before).
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn brackets_outside_flow_collections_do_not_count_as_nesting() {
    let many = "[{".repeat(100);
    let text = format!(
        "apiVersion: v1 # {many}\nkind: Pod\nmetadata:\n  name: a\n  annotations:\n    plain: x{many}\n    double: \"{many}\\\" {many}\"\n    single: '{many}'' {many}'\n    block: |\n      {many}\n      {many}\n    folded: >-\n      {many}\nflow: {{k: \"{many}\", j: [a, '{many}']}}\n"
    );
    assert_eq!(flow_nesting_beyond(&text, MAX_DEPTH), None);
    if let Err(e) = load_text("brackets.yaml", &text) {
        panic!("{e}\n{text}");
    }
    assert_eq!(flow_nesting_beyond("a: [[[[]]]]\n", 3), Some(1));
    assert_eq!(
        flow_nesting_beyond("a:\n- |\n  x\n- [[\n  [[]]]]\n", 3),
        Some(5)
    );
    assert_eq!(flow_nesting_beyond("--- [[[[]]]]\n", 3), Some(1));
}

#[test]
fn file_size_is_capped_and_large_valid_files_load() {
    let d = TempDir::new("size");
    let pods: Vec<String> = (0..5000)
        .map(|i| format!("- {{apiVersion: v1, kind: Pod, metadata: {{name: p{i}, namespace: x}}, status: {{podIP: 10.0.{}.{}}}}}", i / 250, i % 250 + 1))
        .collect();
    let list = format!("apiVersion: v1\nkind: List\nitems:\n{}\n", pods.join("\n"));
    d.write("big.yaml", &list);
    let size = list.len() as u64;
    assert_eq!(load_dir_with_limit(&d.0, size).unwrap().pods.len(), 5000);
    let err = load_dir_with_limit(&d.0, size - 1).unwrap_err().to_string();
    assert!(
        err.contains("big.yaml") && err.contains(&format!("over the limit of {} bytes", size - 1)),
        "{err}"
    );
    // A 200 GB sparse file is refused without being read.
    let huge = std::fs::File::create(d.0.join("huge.json")).unwrap();
    huge.set_len(200 << 30).unwrap();
    let err = within_10s({
        let dir = d.0.clone();
        move || load_dir(&dir).unwrap_err().to_string()
    });
    assert!(
        err.contains("huge.json") && err.contains("16777216 bytes"),
        "{err}"
    );
}

/// The directory source's own polling: a changed file bumps the generation and wakes the waiter;
/// an unchanged directory does not.
#[tokio::test]
async fn polling_sees_a_changed_file() {
    use crate::source::Source;
    const NS_A: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
    let dir = TempDir::new("poll");
    dir.write("a.yaml", NS_A);
    let source = DirSource::new(dir.0.clone(), DEFAULT_MAX_FILE_BYTES);
    let stop = tokio_util::sync::CancellationToken::new();
    let poller = tokio::spawn(
        source
            .clone()
            .poll(std::time::Duration::from_millis(10), stop.clone()),
    );
    let (first, snapshot) = source.snapshot().unwrap().unwrap();
    assert!(snapshot.namespaces.contains_key("a"));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(source.generation(), Some(first), "nothing changed");
    dir.write("b.yaml", &NS_A.replace("name: a", "name: b"));
    tokio::time::timeout(std::time::Duration::from_secs(5), source.changed())
        .await
        .expect("no change seen");
    let (second, snapshot) = source.snapshot().unwrap().unwrap();
    assert!(second > first);
    assert!(snapshot.namespaces.contains_key("b"));
    stop.cancel();
    poller.await.unwrap();
}

/// The load started early (at the agent's start) is used only if the directory has not changed
/// since it began; a change in between is loaded, not lost.
#[test]
fn an_early_load_is_not_used_after_the_directory_changed() {
    use crate::source::Source;
    let dir = TempDir::new("prefetch");
    dir.write("a.yaml", POD_X_A);
    let source = DirSource::prefetching(dir.0.clone(), DEFAULT_MAX_FILE_BYTES);
    let (_, snapshot) = source.snapshot().unwrap().unwrap();
    assert_eq!(snapshot.pods.len(), 1);

    let source = DirSource::prefetching(dir.0.clone(), DEFAULT_MAX_FILE_BYTES);
    // Let the early load finish before the change.
    std::thread::sleep(std::time::Duration::from_millis(200));
    dir.write("b.yaml", &POD_X_A.replace("name: a", "name: b"));
    let (_, snapshot) = source.snapshot().unwrap().unwrap();
    assert_eq!(
        snapshot.pods.len(),
        2,
        "the change after the early load was lost"
    );
}

/// A file of many documents, larger than one parallel unit: `count` pods in namespace `ns`.
fn many_pods(count: usize) -> String {
    (0..count)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: ns, labels: {{app: a{i}}}}}\nspec: {{nodeName: n{}, containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: \"10.1.{}.{}\"}}]}}\n# a comment of some length, so that the file spans several parallel units of parsing\n",
                i % 7,
                i / 250,
                i % 250
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

#[test]
fn a_large_file_is_cut_at_document_starts_only() {
    let text = many_pods(3000);
    let runs = super::parallel::split_documents(&text, 64 * 1024).unwrap();
    assert!(runs.len() > 4, "{} runs", runs.len());
    assert_eq!(runs.concat(), text);
    for run in &runs[1..] {
        assert!(run.starts_with("---\n"), "{:?}", &run[..20]);
    }
    // Texts whose line starts or documents a cut could change are parsed whole.
    for odd in ["\r\n", "\r", "\u{2028}", "\n%YAML 1.2\n"] {
        let text = format!("{}{odd}{}", many_pods(1000), many_pods(1000));
        assert!(super::parallel::split_documents(&text, 64 * 1024).is_none());
    }
    // A `---` that does not start a line, or is not followed by a blank, is no cut.
    let text = format!(
        "{}---\nkind: x\nmetadata: {{name: ' ---  '}}\n----\n",
        many_pods(1000)
    );
    let runs = super::parallel::split_documents(&text, 1).unwrap();
    assert!(
        runs.iter()
            .all(|r| r.starts_with("---\n") || r.starts_with("apiVersion"))
    );
}

#[test]
fn parallel_parsing_gives_what_a_sequential_parse_gives() {
    let d = TempDir::new("parallel");
    let text = many_pods(3000);
    d.write("a.yaml", &text);
    d.write(
        "b.yaml",
        &many_pods(3).replace("namespace: ns", "namespace: other"),
    );
    let s = load_dir(&d.0).unwrap();
    assert_eq!(s.pods.len(), 3003);
    // In file and document order, every field converted.
    let names: Vec<String> = s.pods.iter().map(|p| p.key()).collect();
    let mut expected: Vec<String> = (0..3000).map(|i| format!("ns/p{i}")).collect();
    expected.extend((0..3).map(|i| format!("other/p{i}")));
    assert_eq!(names, expected);
    assert_eq!(s.pods[2999].labels["app"], "a2999");
    assert_eq!(
        s.pods[2999].ips,
        vec!["10.1.11.249".parse::<std::net::IpAddr>().unwrap()]
    );

    // Errors late in the file keep their document number (counted over the whole file) and
    // their wording, whichever thread's part they fall in.
    let mut broken = many_pods(3000);
    broken.push_str("---\napiVersion: v1\nkind: Pod\nmetadata: {name: [\n");
    d.write("a.yaml", &broken);
    let err = load_dir(&d.0).unwrap_err().to_string();
    assert!(
        err.contains("a.yaml document 3001") && err.contains("not valid YAML"),
        "{err}"
    );
    let dup = format!("{}---\n{}", many_pods(3000), many_pods(1));
    d.write("a.yaml", &dup);
    let err = load_dir(&d.0).unwrap_err().to_string();
    assert!(
        err.contains("a.yaml document 3001")
            && err.contains("Pod ns/p0 is defined twice (first at")
            && err.contains("a.yaml document 1 (Pod ns/p0)"),
        "{err}"
    );
    let dup_key = format!("{}---\nkind: Pod\nkind: Pod\n", many_pods(3000));
    d.write("a.yaml", &dup_key);
    let err = load_dir(&d.0).unwrap_err().to_string();
    assert!(
        err.contains("a.yaml document 3001") && err.contains("duplicate mapping key"),
        "{err}"
    );
}
