//! The container image, run as the DaemonSet runs it: in a node's network namespace with
//! NET_ADMIN and NET_RAW, the host's xtables lock and /lib/modules mounted, enforcing policies from
//! a mounted manifests directory, judged by real connections between lab pods.
//!
//! Runs when KNI_IMAGE_TEST=1 (CI sets it after `hack/image.sh` built the image); otherwise every
//! test says SKIPPED loudly and passes. Needs root and podman.

use kni_testlab::lab;

use lab::{Lab, is_root};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = concat!("localhost/kube-netpol-iptables:", env!("CARGO_PKG_VERSION"));
const AGENT: &str = "/usr/local/bin/kube-netpol-iptables";

const DENY_X_INGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}";
const ALLOW_X_FROM_Y_80: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-y, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]";

fn skip_unless_image_test(test: &str) -> bool {
    if std::env::var_os("KNI_IMAGE_TEST").is_none() {
        eprintln!(
            "\n*** SKIPPED {test}: the container image tests run with KNI_IMAGE_TEST=1 after `sudo hack/image.sh` (CI does both) ***\n"
        );
        return true;
    }
    assert!(
        is_root(),
        "{test}: KNI_IMAGE_TEST is set but we are not root"
    );
    false
}

/// Podman with a private containers.conf (as hack/image.sh writes): runc, and modest ulimits
/// never above ours, since podman's defaults fail in setrlimit where we cannot raise hard limits.
struct Podman {
    conf: PathBuf,
}

impl Podman {
    fn new(dir: &Path) -> Podman {
        let hard = |resource| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            assert_eq!(unsafe { libc::getrlimit(resource, &mut lim) }, 0);
            lim.rlim_max
        };
        let ulimits = [
            ("nofile", libc::RLIMIT_NOFILE, 65536),
            ("nproc", libc::RLIMIT_NPROC, 4096),
        ]
        .map(|(name, resource, modest)| {
            let max = hard(resource).min(modest);
            format!("\"{name}={max}:{max}\"")
        });
        let conf = dir.join("containers.conf");
        std::fs::write(
            &conf,
            format!(
                "[containers]\ndefault_ulimits = [{}]\n[engine]\nruntime = \"runc\"\n",
                ulimits.join(", ")
            ),
        )
        .unwrap();
        let podman = Podman { conf };
        let out = podman.run(&["image", "exists", IMAGE]);
        assert!(
            out.status.success(),
            "KNI_IMAGE_TEST is set but there is no image {IMAGE}: build it with `sudo hack/image.sh`"
        );
        podman
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("podman")
            .args(args)
            .env("CONTAINERS_CONF", &self.conf)
            .stdin(Stdio::null())
            .output()
            .expect("run podman (hack/image.sh installs it)")
    }

    /// Runs podman and returns stdout; panics with its output if it fails.
    fn ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `podman run` arguments that give a container what the DaemonSet gives the agent, in the
    /// network namespace of node 1 of `lab`, with the lab's manifests at /manifests.
    fn node_container_args(lab: &Lab) -> Vec<String> {
        let lock = "/run/xtables.lock";
        // As the DaemonSet's hostPath (FileOrCreate): iptables creates it on first use.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(lock)
            .unwrap();
        let mut args = vec![
            "--pull=never".into(),
            format!("--network=ns:/run/netns/{}", lab.nodes[0].netns),
            "--cap-add=NET_ADMIN".into(),
            "--cap-add=NET_RAW".into(),
            format!("--volume={lock}:{lock}"),
            format!("--volume={}:/manifests:ro", lab.manifests_dir().display()),
        ];
        // Kernels with everything built in (some VMs) have no /lib/modules.
        if Path::new("/lib/modules").is_dir() {
            args.push("--volume=/lib/modules:/lib/modules:ro".into());
        }
        args
    }
}

/// A detached container, removed when dropped so a failing test leaves none behind.
struct Container<'a> {
    podman: &'a Podman,
    name: String,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self
            .podman
            .run(&["rm", "--force", "--time", "0", &self.name]);
    }
}

/// Section names of a 64-bit little-endian ELF file.
fn elf_section_names(elf: &[u8]) -> Vec<String> {
    assert!(
        elf.len() > 64 && elf[..4] == *b"\x7fELF" && elf[4] == 2 && elf[5] == 1,
        "not a 64-bit little-endian ELF file"
    );
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let header = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(header(shstrndx) + 0x18);
    (0..shnum)
        .map(|i| {
            let start = strtab + u32_at(header(i));
            let end = start + elf[start..].iter().position(|&b| b == 0).unwrap();
            String::from_utf8_lossy(&elf[start..end]).into_owned()
        })
        .collect()
}

/// The ENTRYPOINT and CMD lines of the repository's Containerfile, as JSON arrays.
fn containerfile_entrypoint_and_cmd() -> (String, String) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Containerfile"))
        .expect("read Containerfile");
    let value = |instruction: &str| {
        let line = text
            .lines()
            .filter_map(|l| l.strip_prefix(instruction))
            .next_back()
            .unwrap_or_else(|| panic!("no {instruction} in the Containerfile"));
        serde_json::from_str::<serde_json::Value>(line.trim())
            .expect("exec-form JSON array")
            .to_string()
    };
    (value("ENTRYPOINT "), value("CMD "))
}

#[test]
fn image_carries_both_backends_ipset_and_a_stripped_agent() {
    if skip_unless_image_test("image_carries_both_backends_ipset_and_a_stripped_agent") {
        return;
    }
    let dir = tempdir("tools");
    let podman = Podman::new(&dir);

    // Every tool the agent runs, run inside the image (so their libraries are there too).
    let script = r#"set -e
for family in iptables ip6tables; do
  for backend in legacy nft; do
    for tool in "" -save -restore; do "$family-$backend$tool" --version; done
  done
done
ipset --version"#;
    let out = podman.ok(&[
        "run",
        "--rm",
        "--pull=never",
        // A namespace of its own; ipset asks the kernel for its protocol version.
        "--network=none",
        "--cap-add=NET_ADMIN",
        "--entrypoint=/bin/sh",
        IMAGE,
        "-c",
        script,
    ]);
    let versions = String::from_utf8_lossy(&out);
    for (what, count) in [("(legacy)", 6), ("(nf_tables)", 6), ("ipset v", 1)] {
        assert_eq!(
            versions.matches(what).count(),
            count,
            "{what} in:\n{versions}"
        );
    }

    let version = podman.ok(&[
        "run",
        "--rm",
        "--pull=never",
        "--network=none",
        IMAGE,
        "version",
    ]);
    assert!(
        String::from_utf8_lossy(&version).contains(env!("CARGO_PKG_VERSION")),
        "the agent in {IMAGE} says: {}",
        String::from_utf8_lossy(&version)
    );

    // Stripped: no symbol table, no debug sections.
    let binary = podman.ok(&[
        "run",
        "--rm",
        "--pull=never",
        "--network=none",
        "--entrypoint=/bin/cat",
        IMAGE,
        AGENT,
    ]);
    let sections = elf_section_names(&binary);
    assert!(sections.iter().any(|s| s == ".text"), "{sections:?}");
    assert!(
        !sections
            .iter()
            .any(|s| s == ".symtab" || s.starts_with(".debug")),
        "the agent in the image is not stripped: {sections:?}"
    );

    // Whichever way hack/image.sh built it, the image starts the agent as the Containerfile says.
    let config = podman.ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}} {{json .Config.Cmd}}",
        IMAGE,
    ]);
    let (entrypoint, cmd) = containerfile_entrypoint_and_cmd();
    assert_eq!(
        String::from_utf8_lossy(&config).trim(),
        format!("{entrypoint} {cmd}")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn image_enforces_policies_in_a_node_namespace_with_both_backends() {
    if skip_unless_image_test("image_enforces_policies_in_a_node_namespace_with_both_backends") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    let podman = Podman::new(lab.manifests_dir());
    let common = Podman::node_container_args(&lab);
    let agent_args = |backend: &'static str| {
        [
            "run",
            "--manifests",
            "/manifests",
            "--node-name",
            "node1",
            "--backend",
            backend,
        ]
    };
    let both_families = |from: &str, to: &str, port: u16| {
        let (from, to) = (lab.pod(from), lab.pod(to));
        [false, true].map(|v6| {
            lab.forget_flows();
            lab::probe(&from.netns, to.ip(v6), lab::Proto::Tcp, port)
        })
    };
    assert_eq!(
        both_families("y/a", "x/a", 80),
        [true, true],
        "no policy yet"
    );

    // The agent in the image, watching the mounted directory (nf_tables backend).
    lab.write_cluster_manifests(&[DENY_X_INGRESS]);
    let name = format!("{}-agent", lab.prefix);
    let mut run = vec!["run", "--detach", "--name", &name];
    run.extend(common.iter().map(String::as_str));
    run.push(IMAGE);
    run.extend(agent_args("nft"));
    podman.ok(&run);
    let container = Container {
        podman: &podman,
        name: name.clone(),
    };
    let logs = || {
        let out = podman.run(&["logs", &name]);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    // Polls `ok` for up to 20 s; on failure, the agent's log says why.
    let settle = |what: &str, ok: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !ok() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{what}: not within 20 s; the agent's log:\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    settle("the default deny blocks y/a -> x/a", &|| {
        both_families("y/a", "x/a", 80) == [false, false]
    });
    assert!(
        has_rules(&lab, "nft") && !has_rules(&lab, "legacy"),
        "the nf_tables backend holds the rules:\n{}",
        logs()
    );
    let ready = lab::http_get(&lab.nodes[0].netns, "/readyz");
    assert_eq!(
        ready.as_ref().map(|r| r.0),
        Some(200),
        "{ready:?}\n{}",
        logs()
    );

    lab.write_cluster_manifests(&[DENY_X_INGRESS, ALLOW_X_FROM_Y_80]);
    settle("the allow policy opens y/a -> x/a:80", &|| {
        both_families("y/a", "x/a", 80) == [true, true]
    });
    assert_eq!(
        both_families("z/a", "x/a", 80),
        [false, false],
        "z is not allowed"
    );
    assert_eq!(
        both_families("y/a", "x/a", 81),
        [false, false],
        "port 81 is not allowed"
    );

    // SIGTERM: the agent finishes and exits 0; its rules stay in the kernel.
    podman.ok(&["stop", "--time", "10", &name]);
    let status = podman.ok(&["inspect", "--format", "{{.State.ExitCode}}", &name]);
    assert_eq!(String::from_utf8_lossy(&status).trim(), "0", "{}", logs());
    drop(container);

    // The legacy backend, once: it takes over and removes the nf_tables rules.
    let mut once = vec!["run", "--rm"];
    once.extend(common.iter().map(String::as_str));
    once.push(IMAGE);
    once.extend(agent_args("legacy"));
    once.push("--once");
    podman.ok(&once);
    assert!(
        has_rules(&lab, "legacy") && !has_rules(&lab, "nft"),
        "the legacy backend holds the rules"
    );
    assert_eq!(both_families("y/a", "x/a", 80), [true, true]);
    assert_eq!(both_families("z/a", "x/a", 80), [false, false]);

    // `cleanup` from the image removes everything of ours: z reaches x again.
    let mut cleanup = vec!["run", "--rm"];
    cleanup.extend(common.iter().map(String::as_str));
    cleanup.extend([IMAGE, "cleanup"]);
    podman.ok(&cleanup);
    assert!(!has_rules(&lab, "legacy") && !has_rules(&lab, "nft"));
    assert_eq!(both_families("z/a", "x/a", 80), [true, true]);
}

/// Whether node 1 has rules of ours (either family) in `backend`'s filter table.
fn has_rules(lab: &Lab, backend: &str) -> bool {
    ["iptables", "ip6tables"].iter().any(|tool| {
        lab.node_cmd(0, &[&format!("{tool}-{backend}-save"), "-t", "filter"])
            .lines()
            .any(|l| l.starts_with("-A") && l.contains("KNI-"))
    })
}

fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kni{}-image-{what}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
