//! End-to-end against bad input and abuse: a ConfigMap volume and entries of it that cannot be
//! read, a pod claiming the node's loopback address, a second agent in the same network
//! namespace, and idle connections to the metrics port. Every check is a real flow in the lab.
//! Needs root; without it every test says SKIPPED loudly and passes.

use kni_testlab::fakeapi;
use kni_testlab::lab;

use fakeapi::{FakeApi, Kind};
use lab::{AgentProcess, Lab, http_get, in_netns, skip_unless_root, wait_until};
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DENY_X: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}";
const ALLOW_X_FROM_Y: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-y, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]";
const BIN: &str = env!("CARGO_BIN_EXE_kube-netpol-iptables");

/// Publishes `files` the way the kubelet updates a ConfigMap volume: a new timestamped
/// directory, then `..data` swapped to it atomically (the top-level `name -> ..data/name`
/// symlinks stay).
fn publish_configmap(dir: &Path, version: u32, files: &[(&str, &str)]) {
    let ts = format!("..2026_11_23_20_00_{version:02}.{version}");
    std::fs::create_dir(dir.join(&ts)).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(&ts).join(name), text).unwrap();
    }
    symlink(&ts, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
}

/// `probe` holds for `period`, checked every 100 ms.
fn stays(what: &str, period: Duration, mut probe: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < period {
        assert!(probe(), "{what}: broke after {:?}", start.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn readyz(node_ns: &str) -> Option<u16> {
    http_get(node_ns, "/readyz").map(|(c, _)| c)
}

#[test]
fn configmap_updates_apply_and_unreadable_entries_keep_the_last_state() {
    if skip_unless_root("configmap_updates_apply_and_unreadable_entries_keep_the_last_state") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    let dir = lab.manifests_dir().to_path_buf();
    let node_ns = lab.nodes[0].netns.clone();
    lab.write_cluster_manifests(&[]);
    std::fs::remove_file(dir.join("policies.yaml")).unwrap();
    publish_configmap(&dir, 1, &[("netpol.yaml", DENY_X)]);
    symlink("..data/netpol.yaml", dir.join("netpol.yaml")).unwrap();
    let _agent = lab.spawn_agent("legacy", &[]);
    wait_until("ready", Duration::from_secs(10), || {
        readyz(&node_ns) == Some(200)
    });
    assert!(!lab.tcp("y/a", "x/a", 80), "enforced from the ConfigMap");

    // An update through `..data` is seen and applied.
    publish_configmap(
        &dir,
        2,
        &[("netpol.yaml", &format!("{DENY_X}\n---\n{ALLOW_X_FROM_Y}"))],
    );
    wait_until("update applied", Duration::from_secs(5), || {
        lab.tcp("y/a", "x/a", 80)
    });
    publish_configmap(&dir, 3, &[("netpol.yaml", DENY_X)]);
    wait_until("update applied", Duration::from_secs(5), || {
        !lab.tcp("y/a", "x/a", 80)
    });

    // The update drops the file the symlink leads to: the symlink dangles. Its policy must not
    // silently vanish (that opened the denied flow).
    publish_configmap(&dir, 4, &[("other.yaml", "")]);
    stays(
        "the denied flow stays denied",
        Duration::from_secs(3),
        || !lab.tcp("y/a", "x/a", 80),
    );
    wait_until("not ready", Duration::from_secs(5), || {
        readyz(&node_ns) == Some(503)
    });
    let log = lab.agent_log();
    assert!(
        log.contains("netpol.yaml") && log.contains("No such file"),
        "{log}"
    );

    // Repaired: ready again.
    publish_configmap(&dir, 5, &[("netpol.yaml", DENY_X)]);
    wait_until("ready again", Duration::from_secs(10), || {
        readyz(&node_ns) == Some(200)
    });

    // The policy file turns into a FIFO: never opened (that would block), reported, state kept.
    let fifo = dir.join("..2026_11_23_20_00_05.5").join("netpol.yaml");
    std::fs::remove_file(&fifo).unwrap();
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    stays(
        "the denied flow stays denied",
        Duration::from_secs(3),
        || !lab.tcp("y/a", "x/a", 80),
    );
    wait_until("not ready", Duration::from_secs(5), || {
        readyz(&node_ns) == Some(503)
    });
    assert_eq!(http_get(&node_ns, "/healthz").map(|(c, _)| c), Some(200));
    assert!(lab.agent_log().contains("FIFO"), "{}", lab.agent_log());
}

#[test]
fn a_pod_claiming_the_loopback_address_is_reported_and_loopback_keeps_working() {
    if skip_unless_root(
        "a_pod_claiming_the_loopback_address_is_reported_and_loopback_keeps_working",
    ) {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    let runtime = fakeapi::runtime();
    let _guard = runtime.enter();
    let node_ns = lab.nodes[0].netns.clone();
    let api = FakeApi::start(lab.loopback_listener(0));
    api.apply_namespaces(&lab::NAMESPACES, true);
    for p in &lab.pods {
        api.apply(Kind::Pod, &p.api_manifest(""));
    }
    // A pod on this node claiming the loopback addresses, isolated for egress.
    api.apply(
        Kind::Pod,
        "metadata: {name: evil, namespace: z, labels: {pod: evil}}\nspec: {nodeName: node1}\nstatus: {phase: Running, podIP: 127.0.0.1, podIPs: [{ip: 127.0.0.1}, {ip: '::1'}]}",
    );
    api.apply(
        Kind::NetworkPolicy,
        "metadata: {name: evil-egress, namespace: z}\nspec: {podSelector: {matchLabels: {pod: evil}}, policyTypes: [Egress]}",
    );
    api.apply(
        Kind::NetworkPolicy,
        "metadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}",
    );
    let kubeconfig = lab.manifests_dir().join("kubeconfig.conf");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let log = std::fs::File::create(lab.manifests_dir().join("agent.log")).unwrap();
    let _agent = AgentProcess(
        Command::new("ip")
            .args(["netns", "exec", &node_ns, BIN, "run"])
            .args(["--kubeconfig", kubeconfig.to_str().unwrap()])
            .args(["--backend", "nft", "--node-name", "node1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // /readyz itself goes over the node's loopback (127.0.0.1:9847).
    wait_until("ready over loopback", Duration::from_secs(15), || {
        readyz(&node_ns) == Some(200)
    });
    assert!(!lab.tcp("y/a", "x/a", 80), "everything else is enforced");
    let loopback_v6 = in_netns(&node_ns, || {
        let listener = std::net::TcpListener::bind("[::1]:0").unwrap();
        let addr = listener.local_addr().unwrap();
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
    })
    .join()
    .unwrap();
    assert!(loopback_v6, "::1 still works on the node");
    let (_, metrics) = http_get(&node_ns, "/metrics").unwrap();
    assert!(
        metrics.contains("kni_invalid_objects{kind=\"Pod\"} 1"),
        "{metrics}"
    );
    let log = std::fs::read_to_string(lab.manifests_dir().join("agent.log")).unwrap();
    assert!(
        log.contains("z/evil") && log.contains("loopback"),
        "the pod is reported:\n{log}"
    );
    api.stop();
}

#[test]
fn a_second_agent_in_the_namespace_waits_writes_nothing_and_takes_over() {
    if skip_unless_root("a_second_agent_in_the_namespace_waits_writes_nothing_and_takes_over") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    let node_ns = lab.nodes[0].netns.clone();
    lab.write_cluster_manifests(&[DENY_X]);
    let mut first = lab.spawn_agent("legacy", &[]);
    wait_until("first ready", Duration::from_secs(10), || {
        readyz(&node_ns) == Some(200)
    });
    assert!(!lab.tcp("y/a", "x/a", 80));

    // The second one enforces a directory without policies: had it written anything, the
    // denied flow would open.
    let open_dir = lab.manifests_dir().with_extension("second");
    std::fs::create_dir_all(&open_dir).unwrap();
    std::fs::copy(
        lab.manifests_dir().join("cluster.yaml"),
        open_dir.join("cluster.yaml"),
    )
    .unwrap();
    let log_path = open_dir.with_extension("log");
    let second_log = std::fs::File::create(&log_path).unwrap();
    let mut second = AgentProcess(
        Command::new("ip")
            .args(["netns", "exec", &node_ns, BIN, "run"])
            .args(["--manifests", open_dir.to_str().unwrap()])
            .args(["--node-name", "node1", "--backend", "legacy"])
            .args(["--metrics-bind-address", "127.0.0.1:9848"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(second_log)
            .spawn()
            .unwrap(),
    );
    let second_readyz = || {
        in_netns(&node_ns, || {
            let mut s = TcpStream::connect("127.0.0.1:9848").ok()?;
            use std::io::Write;
            write!(s, "GET /readyz HTTP/1.0\r\n\r\n").ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            Some(text)
        })
        .join()
        .unwrap()
    };
    let first_pid = first.id();
    wait_until(
        "the second says who holds the lock",
        Duration::from_secs(10),
        || {
            second_readyz().is_some_and(|t| {
            t.contains(" 503 ")
                && t.contains(&format!("another instance holds the node lock @kube-netpol-iptables (pid {first_pid})"))
        })
        },
    );
    stays("the second writes nothing", Duration::from_secs(4), || {
        !lab.tcp("y/a", "x/a", 80)
    });
    assert_eq!(readyz(&node_ns), Some(200), "the first is unaffected");

    // One-shot runs and cleanup refuse while an agent runs.
    let out = lab.once("legacy", &[], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("another instance holds the node lock"),
        "{stderr}"
    );
    let out = lab.agent(0, &["cleanup"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("stop the agent before cleaning up"),
        "{stderr}"
    );
    assert!(!lab.tcp("y/a", "x/a", 80), "cleanup removed nothing");

    // The first exits: the second takes over and enforces its own directory.
    let _ = Command::new("kill")
        .arg(first_pid.to_string())
        .status()
        .unwrap();
    assert!(first.wait().unwrap().success());
    wait_until("the second takes over", Duration::from_secs(10), || {
        second_readyz().is_some_and(|t| t.contains(" 200 "))
    });
    assert!(lab.tcp("y/a", "x/a", 80));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("took over the node lock"), "{log}");
    let _ = second.kill();
    let _ = std::fs::remove_dir_all(&open_dir);
    let _ = std::fs::remove_file(&log_path);
}

#[test]
fn idle_metrics_connections_starve_neither_syncs_nor_probes() {
    if skip_unless_root("idle_metrics_connections_starve_neither_syncs_nor_probes") {
        return;
    }
    // This test holds a few hundred sockets itself.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    let node_ns = lab.nodes[0].netns.clone();
    lab.write_cluster_manifests(&[DENY_X]);
    let log = std::fs::File::create(lab.manifests_dir().join("agent.log")).unwrap();
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &node_ns, BIN, "run"])
        .args(["--manifests", lab.manifests_dir().to_str().unwrap()])
        .args(["--node-name", "node1", "--backend", "legacy"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // A small descriptor limit, soft and hard, so a few hundred connections would exhaust it.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 256,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let _agent = AgentProcess(command.spawn().unwrap());
    wait_until("ready", Duration::from_secs(10), || {
        readyz(&node_ns) == Some(200)
    });
    assert!(!lab.tcp("y/a", "x/a", 80));

    let idle: Vec<TcpStream> = in_netns(&node_ns, || {
        (0..400)
            .filter_map(|_| {
                TcpStream::connect_timeout(
                    &"127.0.0.1:9847".parse().unwrap(),
                    Duration::from_secs(5),
                )
                .ok()
            })
            .collect()
    })
    .join()
    .unwrap();
    let opened = Instant::now();

    // Probes get through at once, and a policy change still reaches the kernel.
    let took = wait_until("/healthz answers", Duration::from_secs(3), || {
        http_get(&node_ns, "/healthz").is_some_and(|(c, _)| c == 200)
    });
    eprintln!("/healthz answered after {took:?} with 400 idle connections open");
    lab.write_cluster_manifests(&[DENY_X, ALLOW_X_FROM_Y]);
    wait_until("policy change applied", Duration::from_secs(10), || {
        lab.tcp("y/a", "x/a", 80)
    });
    let log = lab.agent_log();
    assert!(!log.contains("Too many open files"), "{log}");
    assert_eq!(idle.len(), 400, "every connection was accepted");

    // Idle connections are closed by the agent after its idle timeout.
    for mut stream in idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut buf = [0u8; 16];
        let closed = match stream.read(&mut buf) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        } && opened.elapsed() < Duration::from_secs(25);
        assert!(
            closed,
            "an idle connection stayed open {:?}",
            opened.elapsed()
        );
    }
    assert_eq!(http_get(&node_ns, "/healthz").map(|(c, _)| c), Some(200));
}

/// `--max-manifest-bytes` reaches the loader (through `render`, which needs no root).
#[test]
fn the_manifest_size_limit_is_a_flag() {
    let dir = std::env::temp_dir().join(format!("kni-size-flag-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), DENY_X).unwrap();
    let render = |limit: &str| {
        Command::new(BIN)
            .args(["render", "--manifests", dir.to_str().unwrap()])
            .args(["--node-name", "n", "--max-manifest-bytes", limit])
            .output()
            .unwrap()
    };
    let out = render("100");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("a.yaml") && stderr.contains("limit of 100 bytes"),
        "{stderr}"
    );
    assert!(render(&DENY_X.len().to_string()).status.success());
    assert!(!render("0").status.success(), "zero is not a limit");
    let _ = std::fs::remove_dir_all(&dir);
}
