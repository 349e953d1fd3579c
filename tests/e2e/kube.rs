//! End-to-end in Kubernetes mode: the fake API server listens inside the node's network
//! namespace, the real agent binary watches it through a kubeconfig, and a NetworkPolicy created
//! through the API changes real reachability. Also checks /metrics, /healthz and /readyz.
//! Needs root; without it the test says SKIPPED loudly and passes.

use kni_testlab::fakeapi;
use kni_testlab::lab;

use fakeapi::{FakeApi, Kind};
use lab::{Lab, Proto, http_get, in_netns, probe, skip_unless_root, wait_until};
use std::process::Command;
use std::time::Duration;

#[test]
fn a_policy_created_through_the_api_changes_real_reachability() {
    if skip_unless_root("a_policy_created_through_the_api_changes_real_reachability") {
        return;
    }
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    let runtime = fakeapi::runtime();
    let _guard = runtime.enter();
    let node_ns = lab.nodes[0].netns.clone();
    let api = FakeApi::start(lab.loopback_listener(0));
    // kube-apiserver authorizes a watch only when it starts; short watches make a revoked
    // permission show at the next one (the agent asks for 120 s).
    api.cap_watches(Duration::from_secs(2));
    api.apply_namespaces(&lab::NAMESPACES, true);
    for p in &lab.pods {
        api.apply(
            Kind::Pod,
            &p.api_manifest("containers: [{name: c, ports: [{name: http, containerPort: 80}]}]"),
        );
    }
    // Kubernetes mode wakes on watch events: a slow poll must not slow anything down.
    let mut agent = lab.spawn_kube_agent(&api.kubeconfig(), "nft", &["--poll-interval", "5s"]);

    wait_until("ready", Duration::from_secs(15), || {
        http_get(&node_ns, "/readyz").is_some_and(|(c, _)| c == 200)
    });
    assert_eq!(http_get(&node_ns, "/healthz").map(|(c, _)| c), Some(200));
    let tcp = |from: &str, to: &str, port: u16| {
        lab.forget_flows();
        probe(
            &lab.pod(from).netns,
            lab.pod(to).ip(false),
            Proto::Tcp,
            port,
        )
    };
    assert!(tcp("y/a", "x/a", 80));

    // Created through the API: only namespace y may reach x's named port http.
    let syncs_before = successful_syncs(&node_ns);
    let created = std::time::Instant::now();
    api.apply(
        Kind::NetworkPolicy,
        "metadata: {name: from-y, namespace: x}\nspec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: http}]}]}",
    );
    wait_until(
        "synced after the watch event",
        Duration::from_secs(10),
        || successful_syncs(&node_ns) > syncs_before,
    );
    let synced = created.elapsed();
    eprintln!("a policy created through the API was synced after {synced:?}");
    // The debounce (100 ms), not --poll-interval (5 s), sets the pace.
    assert!(synced < Duration::from_secs(1), "synced after {synced:?}");
    // The loop also wakes every second (heartbeat), which alone would sync within 0.1–1.1 s:
    // only a wake on the watch event makes nearly every change sync within 400 ms (without it
    // 7 of 9 rounds under 400 ms would happen less than 1 time in 100 even at random phases).
    let mut rounds = Vec::new();
    for round in 0..9 {
        std::thread::sleep(Duration::from_millis(150));
        let syncs_before = successful_syncs(&node_ns);
        let changed = std::time::Instant::now();
        api.apply(
            Kind::Namespace,
            &format!("metadata: {{name: y, labels: {{ns: y, round: '{round}'}}}}"),
        );
        wait_until("synced after a change", Duration::from_secs(10), || {
            successful_syncs(&node_ns) > syncs_before
        });
        rounds.push(changed.elapsed());
    }
    rounds.sort();
    eprintln!("a change through the API was synced after {rounds:?}");
    assert!(rounds[6] < Duration::from_millis(400), "{rounds:?}");
    let took = wait_until("policy enforced", Duration::from_secs(5), || {
        !tcp("z/a", "x/a", 80)
    });
    eprintln!("a policy created through the API was enforced after {took:?}");
    assert!(tcp("y/a", "x/a", 80));
    assert!(!tcp("y/a", "x/a", 81));
    assert!(
        probe(
            &lab.pod("y/b").netns,
            lab.pod("x/b").ip(true),
            Proto::Tcp,
            80
        ),
        "IPv6 too"
    );

    // A namespace label change through the API moves its pods into the peer set.
    api.apply(Kind::Namespace, "metadata: {name: z, labels: {ns: y}}");
    wait_until("namespace relabelled", Duration::from_secs(5), || {
        tcp("z/a", "x/a", 80)
    });

    // Readable once listed and the watch has held (2 s).
    wait_until("pods readable", Duration::from_secs(5), || {
        http_get(&node_ns, "/metrics")
            .is_some_and(|(_, m)| m.contains("kni_api_readable{kind=\"Pod\"} 1"))
    });
    let (code, metrics) = http_get(&node_ns, "/metrics").unwrap();
    assert_eq!(code, 200);
    for name in [
        "kni_sync_duration_seconds_bucket",
        "kni_syncs_total{",
        "kni_last_successful_sync_timestamp_seconds",
        "kni_owned_chains",
        "kni_owned_rules",
        "kni_owned_sets",
        "kni_owned_set_members",
        "kni_kernel_write_errors_total",
        "kni_drift_repairs_total",
        "kni_invalid_objects{",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    assert!(metrics.contains("result=\"success\""), "{metrics}");

    // RBAC no longer allows reading pods: not ready, and /readyz says why; ready again when the
    // permission is back.
    api.set_forbidden(Kind::Pod, true);
    // Seen at the next watch: the open one ends within the server's 2 s.
    wait_until("not ready without pods", Duration::from_secs(5), || {
        http_get(&node_ns, "/readyz").is_some_and(|(c, body)| {
            c == 503 && body.contains("cannot read Pod") && body.contains("forbidden")
        })
    });
    assert!(tcp("y/a", "x/a", 80), "the last state stays enforced");
    api.set_forbidden(Kind::Pod, false);
    wait_until("ready with pods readable", Duration::from_secs(10), || {
        http_get(&node_ns, "/readyz").is_some_and(|(c, _)| c == 200)
    });

    // The API goes away: what was programmed stays enforced, and the agent is not ready.
    api.stop();
    wait_until(
        "not ready while the API is down",
        Duration::from_secs(5),
        || {
            http_get(&node_ns, "/readyz")
                .is_some_and(|(c, body)| c == 503 && body.contains("cannot read"))
        },
    );
    assert!(!tcp("x/c", "x/a", 80));
    assert!(tcp("y/a", "x/a", 80));
    assert_eq!(http_get(&node_ns, "/healthz").map(|(c, _)| c), Some(200));

    // Back after long enough for a growing backoff to reach tens of seconds, as a restarted
    // kube-apiserver (410 for every old resourceVersion); a change made right then reaches the
    // kernel within 5 s (plus one probe's timeout, the resolution of this check).
    std::thread::sleep(Duration::from_secs(10));
    let addr = api.addr;
    let listener = in_netns(&node_ns, move || std::net::TcpListener::bind(addr).unwrap())
        .join()
        .unwrap();
    api.restart_on(listener);
    api.delete(Kind::NetworkPolicy, "x/from-y");
    let took = wait_until(
        "a change after the restart enforced",
        Duration::from_secs(5) + lab::PROBE_TIMEOUT,
        || tcp("x/c", "x/a", 80),
    );
    eprintln!("a change made as the API returned was enforced after {took:?}");
    wait_until("ready after the restart", Duration::from_secs(5), || {
        http_get(&node_ns, "/readyz").is_some_and(|(c, _)| c == 200)
    });

    let _ = agent.kill();
    let _ = agent.wait();
}

/// Successful syncs so far, from the agent's /metrics.
fn successful_syncs(netns: &str) -> f64 {
    let (_, metrics) = http_get(netns, "/metrics").unwrap();
    metrics
        .lines()
        .filter(|l| l.starts_with("kni_syncs_total{") && l.contains("result=\"success\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn without_a_node_name_the_agent_says_so() {
    let out = Command::new(env!("CARGO_BIN_EXE_kube-netpol-iptables"))
        .args(["run", "--kubeconfig", "/nonexistent"])
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pass --node-name or set NODE_NAME"),
        "{stderr}"
    );
}
