//! End-to-end, with real packets: `--log-denied`. Denied probes of both families produce one
//! JSON log line each with the pods, protocol, port, direction and isolating policies; allowed
//! probes produce none (also one the first selecting policy does not allow but a later one
//! does); the per-pod rate limit holds; a resync of an unchanged state with the log rules writes
//! nothing; /metrics shows the denied counter, the per-policy allowed counters and the
//! programming latency. Both backends. Needs root.

use kni_testlab::lab;

use kube_netpol_iptables::dataplane::nflog::NflogReader;
use lab::{Lab, Proto, http_get, in_netns, probe, skip_unless_root, wait_until};
use serde_json::Value;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n";

/// x: every pod isolated for ingress, allowed nothing by `allow-nothing`; x/b allowed from y by
/// `later-from-y`. y/c may send only to z (`c-to-z`). y/a may not reach z on TCP 82 (the Admin
/// ClusterNetworkPolicy `y-a-not-to-z-82`, whose Deny drops in its own chain).
fn policies() -> Vec<String> {
    vec![
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: y-a-not-to-z-82}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {pods: {namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: a}}}}\n  egress: [{name: no-82, action: Deny, to: [{namespaces: {matchLabels: {ns: z}}}], protocols: [{tcp: {destinationPort: {number: 82}}}]}]\n".to_string(),
        format!(
            "{NP}metadata: {{name: allow-nothing, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n"
        ),
        format!(
            "{NP}metadata: {{name: later-from-y, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: b}}}}\n  ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}}}]}}]\n"
        ),
        format!(
            "{NP}metadata: {{name: c-to-z, namespace: y}}\nspec:\n  podSelector: {{matchLabels: {{pod: c}}}}\n  policyTypes: [Egress]\n  egress: [{{to: [{{namespaceSelector: {{matchLabels: {{ns: z}}}}}}]}}]\n"
        ),
    ]
}

/// One TCP connection attempt that gives up quickly (a dropped SYN is logged once it is sent).
fn tcp_attempt(netns: &str, target: SocketAddr) -> bool {
    in_netns(netns, move || {
        TcpStream::connect_timeout(&target, Duration::from_millis(300)).is_ok()
    })
    .join()
    .unwrap()
}

/// `count` UDP datagrams, as fast as they go, from `netns` to `target`.
fn udp_burst(netns: &str, target: SocketAddr, count: usize) {
    in_netns(netns, move || {
        let bind = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let s = UdpSocket::bind(bind).unwrap();
        for _ in 0..count {
            let _ = s.send_to(b"x", target);
        }
    })
    .join()
    .unwrap()
}

/// The agent's JSON log lines that are denied-packet events.
fn denied_events(lab: &Lab) -> Vec<Value> {
    lab.agent_log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "denied packet")
        .collect()
}

fn matching<'a>(events: &'a [Value], src: &str, dst: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["src"] == src && e["dst"] == dst)
        .collect()
}

/// The value of the first sample of `metric` whose line contains every one of `labels`.
fn metric(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(metric))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

fn once_writes(lab: &Lab, backend: &str, extra: &[&str]) -> (usize, usize) {
    let out = lab.once(backend, &[], extra);
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{log}");
    let field = |name: &str| -> usize {
        let at = log.rfind(&format!("{name}=")).expect(name) + name.len() + 1;
        log[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("ipset_lines"), field("iptables_lines"))
}

fn log_denied(backend: &str) {
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    let policies = policies();
    let refs: Vec<&str> = policies.iter().map(String::as_str).collect();
    lab.write_cluster_manifests(&refs);
    let log_flags = ["--log-denied", "--log-denied-rate", "1/s,burst=3"];

    // The log rules read back from the kernel equal what we render: nothing is rewritten.
    let (sets, rules) = once_writes(&lab, backend, &log_flags);
    assert!(sets > 0 && rules > 0);
    assert_eq!(
        once_writes(&lab, backend, &log_flags),
        (0, 0),
        "{backend}: an unchanged state with the log rules writes nothing"
    );
    // The same with --deny-action reject (a log rule before the TCP reset and one before the
    // ICMP unreachable), then back.
    let reject = [&log_flags[..], &["--deny-action", "reject"]].concat();
    assert!(once_writes(&lab, backend, &reject).1 > 0);
    assert_eq!(
        once_writes(&lab, backend, &reject),
        (0, 0),
        "{backend}: reject with the log rules"
    );
    assert!(once_writes(&lab, backend, &log_flags).1 > 0);
    let saved = lab.our_state(backend);
    assert!(
        saved.contains("-j NFLOG --nflog-prefix kni-deny-ingress-KNI-PODI-")
            && saved.contains("-j NFLOG --nflog-prefix kni-deny-egress-KNI-PODE-"),
        "{saved}"
    );

    let mut agent_args = log_flags.to_vec();
    agent_args.extend([
        "--log-format",
        "json",
        "--policy-counters-interval",
        "1s",
        "--resync-period",
        "2s",
    ]);
    let mut agent = lab.spawn_agent(backend, &agent_args);
    let node = lab.nodes[0].netns.clone();
    wait_until("the agent is ready", Duration::from_secs(20), || {
        http_get(&node, "/readyz").is_some_and(|(status, _)| status == 200)
    });
    lab.forget_flows();

    let (x_a, x_b, y_a, y_c, z_a, z_b) = (
        lab.pod("x/a"),
        lab.pod("x/b"),
        lab.pod("y/a"),
        lab.pod("y/c"),
        lab.pod("z/a"),
        lab.pod("z/b"),
    );
    for v6 in [false, true] {
        // Allowed: by the second of x/b's policies only; by no policy at all (y is open for
        // ingress); by y/c's egress policy.
        assert!(probe(&y_a.netns, x_b.ip(v6), Proto::Tcp, 80), "y/a -> x/b");
        assert!(probe(&z_a.netns, y_a.ip(v6), Proto::Tcp, 81), "z/a -> y/a");
        assert!(probe(&y_c.netns, z_b.ip(v6), Proto::Udp, 80), "y/c -> z/b");
        // Denied: x/a's ingress (TCP and UDP), y/c's egress.
        assert!(!tcp_attempt(&z_a.netns, SocketAddr::new(x_a.ip(v6), 80)));
        assert!(!probe(&z_b.netns, x_a.ip(v6), Proto::Udp, 81), "z/b -> x/a");
        assert!(!tcp_attempt(&y_c.netns, SocketAddr::new(y_a.ip(v6), 81)));
        assert!(!tcp_attempt(&y_a.netns, SocketAddr::new(z_a.ip(v6), 82)));
    }
    wait_until(
        "the denied packets are logged",
        Duration::from_secs(10),
        || {
            let events = denied_events(&lab);
            [
                ("z/a", "x/a"),
                ("z/b", "x/a"),
                ("y/c", "y/a"),
                ("y/a", "z/a"),
            ]
            .iter()
            .all(|(src, dst)| {
                let found = matching(&events, src, dst);
                found
                    .iter()
                    .any(|e| e["dst_ip"].as_str().unwrap().contains(':'))
                    && found
                        .iter()
                        .any(|e| e["dst_ip"].as_str().unwrap().contains('.'))
            })
        },
    );
    let events = denied_events(&lab);
    for e in matching(&events, "z/a", "x/a") {
        assert_eq!(e["direction"], "ingress", "{e}");
        assert_eq!(e["protocol"], "tcp", "{e}");
        assert_eq!(e["port"], 80, "{e}");
        assert_eq!(e["policies"], "x/allow-nothing", "{e}");
        assert_eq!(e["level"], "INFO", "{e}");
        let src_ip: IpAddr = e["src_ip"].as_str().unwrap().parse().unwrap();
        assert!(src_ip == z_a.ip(false) || src_ip == z_a.ip(true), "{e}");
    }
    for e in matching(&events, "z/b", "x/a") {
        assert_eq!(
            (&e["direction"], &e["protocol"], &e["port"]),
            (
                &Value::from("ingress"),
                &Value::from("udp"),
                &Value::from(81)
            ),
            "{e}"
        );
    }
    for e in matching(&events, "y/c", "y/a") {
        assert_eq!(e["direction"], "egress", "{e}");
        assert_eq!(e["policies"], "y/c-to-z", "{e}");
        assert_eq!(e["port"], 81, "{e}");
    }
    // The cluster policy's Deny: logged from its own chain, named with its tier.
    for e in matching(&events, "y/a", "z/a") {
        assert_eq!(e["direction"], "egress", "{e}");
        assert_eq!(e["policies"], "Admin/y-a-not-to-z-82", "{e}");
        assert_eq!(e["port"], 82, "{e}");
    }
    // Nothing allowed was logged, in particular not y/a -> x/b, which x/allow-nothing's chain
    // (walked first) does not allow.
    for (src, dst) in [("y/a", "x/b"), ("z/a", "y/a"), ("y/c", "z/b")] {
        assert!(
            matching(&events, src, dst).is_empty(),
            "{backend}: allowed {src} -> {dst} was logged: {:?}",
            matching(&events, src, dst)
        );
    }
    assert_eq!(
        events.len(),
        events
            .iter()
            .filter(
                |e| ["z/a", "z/b", "y/c"].contains(&e["src"].as_str().unwrap())
                    || (e["src"] == "y/a" && e["dst"] == "z/a")
            )
            .count(),
        "only the denied probes: {events:?}"
    );

    // The rate limit: 1/s after a burst of 3, per pod and direction.
    let z_c = lab.pod("z/c");
    let x_c = lab.pod("x/c");
    let before = matching(&denied_events(&lab), "z/c", "x/c").len();
    assert_eq!(before, 0);
    let started = Instant::now();
    for _ in 0..4 {
        udp_burst(&z_c.netns, SocketAddr::new(x_c.ip(false), 80), 50);
        std::thread::sleep(Duration::from_millis(100));
    }
    let elapsed = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let logged = matching(&denied_events(&lab), "z/c", "x/c").len();
    let most = 3 + elapsed.ceil() as usize + 1;
    assert!(
        (3..=most).contains(&logged),
        "{backend}: 200 denied datagrams in {elapsed:.1}s gave {logged} lines (burst 3, 1/s)"
    );

    // Metrics: the denied counter, the allowed counter of the policy that allowed y/a -> x/b,
    // and, after a change, a programming latency sample.
    wait_until(
        "the allowed counters are read",
        Duration::from_secs(10),
        || {
            let (_, text) = http_get(&node, "/metrics").unwrap();
            let allowed = |labels: &[&str]| {
                metric(&text, "kni_policy_allowed_packets_total", labels).is_some_and(|n| n >= 2.0)
            };
            // One new connection per family each.
            allowed(&[
                "namespace=\"x\"",
                "policy=\"later-from-y\"",
                "direction=\"ingress\"",
            ]) && allowed(&[
                "namespace=\"y\"",
                "policy=\"c-to-z\"",
                "direction=\"egress\"",
            ])
        },
    );
    let (_, text) = http_get(&node, "/metrics").unwrap();
    let denied_in = metric(
        &text,
        "kni_denied_packets_total",
        &["direction=\"ingress\""],
    );
    let denied_out = metric(&text, "kni_denied_packets_total", &["direction=\"egress\""]);
    assert!(denied_in.is_some_and(|n| n >= 4.0), "{text}");
    assert!(denied_out.is_some_and(|n| n >= 2.0), "{text}");
    let mut more = refs.clone();
    let extra = format!(
        "{NP}metadata: {{name: extra, namespace: z}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n"
    );
    more.push(&extra);
    lab.write_cluster_manifests(&more);
    wait_until(
        "a programming latency sample",
        Duration::from_secs(10),
        || {
            let (_, text) = http_get(&node, "/metrics").unwrap();
            metric(&text, "kni_programming_latency_seconds_count", &[]).is_some_and(|n| n >= 1.0)
        },
    );
    // Full resyncs meanwhile found nothing to repair.
    let log = lab.agent_log();
    assert!(!log.contains("repaired drift"), "{backend}: {log}");
    assert!(agent.try_wait().unwrap().is_none(), "the agent is running");
}

#[test]
fn denied_packets_are_logged_with_pods_and_policies_and_allowed_ones_never_legacy() {
    if skip_unless_root(
        "denied_packets_are_logged_with_pods_and_policies_and_allowed_ones_never_legacy",
    ) {
        return;
    }
    log_denied("legacy");
}

#[test]
fn denied_packets_are_logged_with_pods_and_policies_and_allowed_ones_never_nft() {
    if skip_unless_root(
        "denied_packets_are_logged_with_pods_and_policies_and_allowed_ones_never_nft",
    ) {
        return;
    }
    log_denied("nft");
}

#[test]
fn log_denied_fails_clearly_when_its_group_is_read_by_another_process() {
    if skip_unless_root("log_denied_fails_clearly_when_its_group_is_read_by_another_process") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[]);
    let run = |lab: &Lab| lab.once("nft", &[], &["--log-denied", "--nflog-group", "7"]);
    // Someone else (ulogd, say) reads group 7 in the node's network namespace.
    let taken = in_netns(&lab.nodes[0].netns, || NflogReader::open(7))
        .join()
        .unwrap()
        .expect("bind group 7");
    let out = run(&lab);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cannot read NFLOG group 7"), "{err}");
    assert!(
        lab.our_state("nft").lines().all(|l| !l.starts_with("-A")),
        "nothing programmed"
    );
    drop(taken);
    let out = run(&lab);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
