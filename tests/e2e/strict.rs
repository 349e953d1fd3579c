//! End-to-end, with real packets: the deny action (a denied connection times out by default and
//! is refused with `--deny-action reject`) and strict mode (established flows a policy change
//! denies stop within a second of the write, allowed ones see no gap), on both backends and both
//! families, direct and through a kube-proxy-style DNAT. Needs root.

use kni_testlab::lab;

use lab::{Lab, in_netns, skip_unless_root};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n";

/// x/a accepts only x/c: x/b's flows to it are denied, x/c's kept.
fn only_c_to_a() -> String {
    format!(
        "{NP}metadata: {{name: only-c, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{pod: c}}}}}}]}}]\n"
    )
}

/// How one fresh TCP connection attempt ended.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Connected,
    Refused,
    TimedOut,
}

fn connect_once(netns: &str, target: SocketAddr) -> Attempt {
    in_netns(netns, move || {
        match TcpStream::connect_timeout(&target, Duration::from_millis(1500)) {
            Ok(_) => Attempt::Connected,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => Attempt::Refused,
            Err(e) if e.kind() == ErrorKind::TimedOut => Attempt::TimedOut,
            Err(e) => panic!("connect {target}: {e}"),
        }
    })
    .join()
    .unwrap()
}

fn deny_action(backend: &str) {
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    lab.write_cluster_manifests(&[&only_c_to_a()]);
    let (a, b, c) = (lab.pod("x/a"), lab.pod("x/b"), lab.pod("x/c"));
    for (extra, denied) in [
        (&[][..], Attempt::TimedOut),
        (&["--deny-action", "drop"][..], Attempt::TimedOut),
        (&["--deny-action", "reject"][..], Attempt::Refused),
    ] {
        let out = lab.once(backend, &[], extra);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        lab.forget_flows();
        for v6 in [false, true] {
            let to_a = SocketAddr::new(a.ip(v6), 80);
            assert_eq!(
                connect_once(&b.netns, to_a),
                denied,
                "{backend} {extra:?} v6={v6}: x/b -> x/a"
            );
            assert_eq!(
                connect_once(&c.netns, to_a),
                Attempt::Connected,
                "{backend} {extra:?} v6={v6}: x/c -> x/a"
            );
        }
    }
}

#[test]
fn denied_connections_time_out_by_default_and_are_refused_with_reject_legacy() {
    if skip_unless_root("denied_connections_time_out_by_default_and_are_refused_with_reject_legacy")
    {
        return;
    }
    deny_action("legacy");
}

#[test]
fn denied_connections_time_out_by_default_and_are_refused_with_reject_nft() {
    if skip_unless_root("denied_connections_time_out_by_default_and_are_refused_with_reject_nft") {
        return;
    }
    deny_action("nft");
}

const TCP_ECHO_PORT: u16 = 7000;
const UDP_ECHO_PORT: u16 = 7001;
/// Service ports kube-proxy-style DNAT rules send to the echo ports of x/a.
const TCP_SERVICE_PORT: u16 = 8080;
const UDP_SERVICE_PORT: u16 = 8081;
const SERVICE_V4: &str = "10.96.0.10";
const SERVICE_V6: &str = "fd00:96::10";
/// Each flow sends one line or datagram this often.
const PERIOD: Duration = Duration::from_millis(100);

/// TCP and UDP echo servers in `netns` (both families), until `stop`.
fn echo_servers(netns: &str, stop: &Arc<AtomicBool>) -> Vec<JoinHandle<()>> {
    let tcp = in_netns(netns, || TcpListener::bind(("::", TCP_ECHO_PORT)).unwrap())
        .join()
        .unwrap();
    tcp.set_nonblocking(true).unwrap();
    let udp = in_netns(netns, || UdpSocket::bind(("::", UDP_ECHO_PORT)).unwrap())
        .join()
        .unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let stop_tcp = stop.clone();
    let stop_udp = stop.clone();
    vec![
        std::thread::spawn(move || {
            let mut connections = Vec::new();
            while !stop_tcp.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut s, _)) => {
                        let stop = stop_tcp.clone();
                        connections.push(std::thread::spawn(move || {
                            s.set_nonblocking(false).unwrap();
                            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                            let mut buf = [0u8; 256];
                            while !stop.load(Ordering::Relaxed) {
                                match s.read(&mut buf) {
                                    Ok(0) => return,
                                    Ok(n) => {
                                        if s.write_all(&buf[..n]).is_err() {
                                            return;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            ErrorKind::WouldBlock | ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => return,
                                }
                            }
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for c in connections {
                let _ = c.join();
            }
        }),
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !stop_udp.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            }
        }),
    ]
}

/// A long-lived flow: one line (TCP, one connection) or datagram (UDP, one socket, so one
/// 5-tuple) every `PERIOD`, and the times its echoes came back.
struct Flow {
    name: String,
    denied: bool,
    echoes: Arc<Mutex<Vec<Instant>>>,
    thread: JoinHandle<()>,
}

fn start_flow(
    netns: &str,
    name: String,
    target: SocketAddr,
    tcp: bool,
    denied: bool,
    stop: &Arc<AtomicBool>,
) -> Flow {
    let echoes = Arc::new(Mutex::new(Vec::new()));
    let (record, stop) = (echoes.clone(), stop.clone());
    let what = name.clone();
    let thread = in_netns(netns, move || {
        let mut buf = [0u8; 64];
        let wait = Some(Duration::from_millis(150));
        if tcp {
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            s.set_read_timeout(wait).unwrap();
            s.set_write_timeout(wait).unwrap();
            while !stop.load(Ordering::Relaxed) {
                if s.write_all(b"line\n").is_err() {
                    return;
                }
                match s.read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => record.lock().unwrap().push(Instant::now()),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => return,
                }
                std::thread::sleep(PERIOD);
            }
        } else {
            let any: SocketAddr = if target.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let s = UdpSocket::bind(any).unwrap();
            s.set_read_timeout(wait).unwrap();
            s.connect(target).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let _ = s.send(b"datagram");
                if s.recv(&mut buf).is_ok() {
                    record.lock().unwrap().push(Instant::now());
                }
                std::thread::sleep(PERIOD);
            }
        }
    });
    Flow {
        name,
        denied,
        echoes,
        thread,
    }
}

/// kube-proxy's kind of rules in the node namespace: the service address's ports DNAT'd to x/a's
/// echo ports, in nat PREROUTING (pod traffic) and OUTPUT (the node's own).
fn service_dnat(lab: &Lab, backend: &str) {
    let a = lab.pod("x/a");
    for (tool, service, pod) in [
        ("iptables", SERVICE_V4.to_string(), a.v4.to_string()),
        ("ip6tables", SERVICE_V6.to_string(), format!("[{}]", a.v6)),
    ] {
        let tool = format!("{tool}-{backend}");
        for chain in ["PREROUTING", "OUTPUT"] {
            for (proto, from, to) in [
                ("tcp", TCP_SERVICE_PORT, TCP_ECHO_PORT),
                ("udp", UDP_SERVICE_PORT, UDP_ECHO_PORT),
            ] {
                lab.node_cmd(
                    0,
                    &[
                        &tool,
                        "-t",
                        "nat",
                        "-A",
                        chain,
                        "-d",
                        &service,
                        "-p",
                        proto,
                        "--dport",
                        &from.to_string(),
                        "-j",
                        "DNAT",
                        "--to-destination",
                        &format!("{pod}:{to}"),
                    ],
                );
            }
        }
    }
}

/// Whether our policy chain for x/a is in both families' filter tables.
fn policy_written(lab: &Lab, backend: &str) -> bool {
    ["iptables", "ip6tables"].iter().all(|tool| {
        lab.node_cmd(0, &[&format!("{tool}-{backend}-save"), "-t", "filter"])
            .contains(":KNI-POLI-")
    })
}

/// The longest time without an echo between `from` and `to`.
fn longest_gap(echoes: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut gap = Duration::ZERO;
    for t in echoes.iter().copied().filter(|t| *t > from && *t < to) {
        gap = gap.max(t - last);
        last = t;
    }
    gap.max(to.saturating_duration_since(last))
}

/// Long-lived TCP and UDP flows to x/a from x/b (to be denied) and x/c (kept), direct and through
/// the service address, both families; then the policy that keeps only x/c's.
fn strict_mode(backend: &str, strict: bool) {
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    service_dnat(&lab, backend);
    let stop = Arc::new(AtomicBool::new(false));
    let servers = echo_servers(&lab.pod("x/a").netns, &stop);
    let agent_args: &[&str] = if strict {
        &[]
    } else {
        &["--strict-mode=false"]
    };
    let mut agent = lab.spawn_agent(backend, agent_args);
    // The agent's first sync (no policy yet) is written before the flows start.
    lab::wait_until("first sync", Duration::from_secs(20), || {
        lab.agent_log().contains("synced")
    });

    let a = lab.pod("x/a");
    let mut flows = Vec::new();
    for from in ["x/b", "x/c"] {
        for v6 in [false, true] {
            let service: IpAddr = if v6 { SERVICE_V6 } else { SERVICE_V4 }.parse().unwrap();
            for (tcp, echo_port, service_port) in [
                (true, TCP_ECHO_PORT, TCP_SERVICE_PORT),
                (false, UDP_ECHO_PORT, UDP_SERVICE_PORT),
            ] {
                for target in [
                    SocketAddr::new(a.ip(v6), echo_port),
                    SocketAddr::new(service, service_port),
                ] {
                    let name = format!(
                        "{from} -> {target} {} (x/a)",
                        if tcp { "TCP" } else { "UDP" }
                    );
                    flows.push(start_flow(
                        &lab.pod(from).netns,
                        name,
                        target,
                        tcp,
                        from == "x/b",
                        &stop,
                    ));
                }
            }
        }
    }
    // Every flow works before the change.
    std::thread::sleep(Duration::from_millis(700));
    for f in &flows {
        assert!(
            f.echoes.lock().unwrap().len() >= 3,
            "{backend}: {} does not work before the policy",
            f.name
        );
    }

    let changed = Instant::now();
    lab.write_cluster_manifests(&[&only_c_to_a()]);
    lab::wait_until("the policy is written", Duration::from_secs(10), || {
        policy_written(&lab, backend)
    });
    let written = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    let end = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let metrics = lab::http_get(&lab.nodes[0].netns, "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    let _ = agent.kill();

    let mut wrong = Vec::new();
    let mut last_denied_echo = Duration::ZERO;
    let mut longest_allowed_gap = Duration::ZERO;
    for f in flows {
        f.thread.join().unwrap();
        let echoes = f.echoes.lock().unwrap().clone();
        let last = echoes.last().copied().unwrap();
        let after = |t: Instant| echoes.iter().filter(|e| **e > t).count();
        if !f.denied {
            let gap = longest_gap(&echoes, changed, end);
            longest_allowed_gap = longest_allowed_gap.max(gap);
            if gap > Duration::from_millis(700) {
                wrong.push(format!("{}: allowed, but no echo for {gap:?}", f.name));
            }
        } else if strict {
            last_denied_echo = last_denied_echo.max(last.saturating_duration_since(written));
            // Cut within a second of the write (and no echo at all after that).
            if after(written + Duration::from_secs(1)) > 0 {
                wrong.push(format!(
                    "{}: denied, still answered {:?} after the write",
                    f.name,
                    last.saturating_duration_since(written)
                ));
            }
        } else if after(written + Duration::from_millis(1500)) == 0 {
            // Without strict mode the established flow goes on: what strict mode is for.
            wrong.push(format!(
                "{}: with --strict-mode=false the established flow stopped",
                f.name
            ));
        }
    }
    for s in servers {
        let _ = s.join();
    }
    if strict {
        // x/b's 8 flows (2 families, TCP and UDP, direct and through the service) and no other.
        let log = lab.agent_log();
        assert!(log.contains("cut=8 "), "{backend}: {log}");
        assert!(
            metrics.contains("kni_conntrack_flows_cut_total{direction=\"ingress\"} 8\n"),
            "{backend}: {metrics}"
        );
        for line in log.lines().filter(|l| l.contains("strict mode")) {
            eprintln!("{backend}: {line}");
        }
        eprintln!(
            "{backend}: last echo of a denied flow {last_denied_echo:?} after the write was seen; longest gap of an allowed flow {longest_allowed_gap:?}"
        );
    }
    assert!(
        wrong.is_empty(),
        "{backend} strict={strict}:\n{}\nagent log:\n{}",
        wrong.join("\n"),
        lab.agent_log()
    );
}

#[test]
fn strict_mode_cuts_denied_flows_and_keeps_allowed_ones_legacy() {
    if skip_unless_root("strict_mode_cuts_denied_flows_and_keeps_allowed_ones_legacy") {
        return;
    }
    strict_mode("legacy", true);
}

#[test]
fn strict_mode_cuts_denied_flows_and_keeps_allowed_ones_nft() {
    if skip_unless_root("strict_mode_cuts_denied_flows_and_keeps_allowed_ones_nft") {
        return;
    }
    strict_mode("nft", true);
}

#[test]
fn without_strict_mode_denied_established_flows_go_on_legacy() {
    if skip_unless_root("without_strict_mode_denied_established_flows_go_on_legacy") {
        return;
    }
    strict_mode("legacy", false);
}

#[test]
fn without_strict_mode_denied_established_flows_go_on_nft() {
    if skip_unless_root("without_strict_mode_denied_established_flows_go_on_nft") {
        return;
    }
    strict_mode("nft", false);
}

/// The lab's manifests without the pod `key` (its namespace and address stay).
fn manifests_without(lab: &Lab, key: &str) {
    lab.write_cluster_manifests(&[]);
    let (namespace, name) = key.split_once('/').unwrap();
    let path = lab.manifests_dir().join("cluster.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text
        .split("---\n")
        .filter(|doc| {
            !(doc.contains("kind: Pod\n")
                && doc.contains(&format!("  name: {name}\n  namespace: {namespace}\n")))
        })
        .collect();
    assert!(kept.len() < text.split("---\n").count(), "no pod {key}");
    lab.write_file("cluster.yaml", &kept.join("---\n"));
}

/// Where the agent learns node1's pod CIDRs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PodCidrs {
    Flags,
    NodeObject,
}

fn new_pod_isolation(backend: &str, source: PodCidrs) {
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    manifests_without(&lab, "z/c");
    let flags: &[&str] = match source {
        PodCidrs::Flags => &[
            "--pod-cidr",
            "10.244.1.0/24",
            "--pod-cidr",
            "fd00:244:1::/64",
        ],
        PodCidrs::NodeObject => {
            lab.write_file(
                "node.yaml",
                "apiVersion: v1\nkind: Node\nmetadata: {name: node1}\nspec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, 'fd00:244:1::/64']}\n",
            );
            &[]
        }
    };
    let mut agent = lab.spawn_agent(backend, flags);
    lab::wait_until("first sync", Duration::from_secs(20), || {
        lab.agent_log().contains("synced")
    });
    let node = lab.nodes[0].netns.clone();
    let (a, c) = (lab.pod("x/a").clone(), lab.pod("z/c").clone());
    let reach = |from: &str, to: &lab::LabPod, v6: bool, proto: lab::Proto| {
        lab::probe(from, to.ip(v6), proto, 80)
    };
    for v6 in [false, true] {
        for proto in [lab::Proto::Tcp, lab::Proto::Udp] {
            let what = format!("{backend} {source:?} v6={v6} {proto:?}");
            assert!(!reach(&a.netns, &c, v6, proto), "{what}: pod -> unknown");
            assert!(reach(&node, &c, v6, proto), "{what}: node -> unknown");
            assert!(reach(&c.netns, &a, v6, proto), "{what}: unknown -> pod");
            assert!(
                reach(&a.netns, &lab.pod("x/b").clone(), v6, proto),
                "{what}"
            );
        }
    }
    // The pod appears: its address opens.
    lab.write_cluster_manifests(&[]);
    lab::wait_until("z/c opens", Duration::from_secs(10), || {
        reach(&a.netns, &c, false, lab::Proto::Tcp)
    });
    assert!(reach(&a.netns, &c, true, lab::Proto::Tcp), "{backend}");
    assert!(reach(&a.netns, &c, true, lab::Proto::Udp), "{backend}");
    // The pod goes: closed again.
    manifests_without(&lab, "z/c");
    lab::wait_until("z/c closes", Duration::from_secs(10), || {
        !reach(&a.netns, &c, false, lab::Proto::Tcp)
    });
    assert!(!reach(&a.netns, &c, true, lab::Proto::Tcp), "{backend}");
    assert!(reach(&node, &c, true, lab::Proto::Tcp), "{backend}");
    let _ = agent.kill();
}

#[test]
fn unknown_local_addresses_are_closed_until_their_pod_is_known_legacy() {
    if skip_unless_root("unknown_local_addresses_are_closed_until_their_pod_is_known_legacy") {
        return;
    }
    new_pod_isolation("legacy", PodCidrs::Flags);
}

#[test]
fn unknown_local_addresses_are_closed_until_their_pod_is_known_nft() {
    if skip_unless_root("unknown_local_addresses_are_closed_until_their_pod_is_known_nft") {
        return;
    }
    new_pod_isolation("nft", PodCidrs::Flags);
}

#[test]
fn pod_cidrs_come_from_the_node_object_legacy() {
    if skip_unless_root("pod_cidrs_come_from_the_node_object_legacy") {
        return;
    }
    new_pod_isolation("legacy", PodCidrs::NodeObject);
}

#[test]
fn pod_cidrs_come_from_the_node_object_nft() {
    if skip_unless_root("pod_cidrs_come_from_the_node_object_nft") {
        return;
    }
    new_pod_isolation("nft", PodCidrs::NodeObject);
}

/// `--new-pod-isolation both`: an unknown address cannot send either (to pods or to the node),
/// while the node still reaches it; once its pod is known it sends again.
fn new_pod_isolation_both(backend: &str) {
    let lab = Lab::new(crate::AGENT, 1, |_, _| 0);
    manifests_without(&lab, "z/c");
    let mut agent = lab.spawn_agent(
        backend,
        &[
            "--new-pod-isolation",
            "both",
            "--pod-cidr",
            "10.244.1.0/24,fd00:244:1::/64",
        ],
    );
    lab::wait_until("first sync", Duration::from_secs(20), || {
        lab.agent_log().contains("synced")
    });
    let node = lab.nodes[0].clone();
    let (a, c) = (lab.pod("x/a").clone(), lab.pod("z/c").clone());
    for v6 in [false, true] {
        for proto in [lab::Proto::Tcp, lab::Proto::Udp] {
            let what = format!("{backend} v6={v6} {proto:?}");
            assert!(
                !lab::probe(&c.netns, a.ip(v6), proto, 80),
                "{what}: unknown -> pod"
            );
            let node_ip: IpAddr = if v6 { node.v6.into() } else { node.v4.into() };
            assert!(
                !lab::probe(&c.netns, node_ip, proto, 80),
                "{what}: unknown -> node"
            );
            assert!(
                lab::probe(&node.netns, c.ip(v6), proto, 80),
                "{what}: node -> unknown"
            );
        }
    }
    lab.write_cluster_manifests(&[]);
    lab::wait_until("z/c sends once known", Duration::from_secs(10), || {
        lab::probe(&c.netns, a.ip(false), lab::Proto::Tcp, 80)
    });
    assert!(lab::probe(&c.netns, a.ip(true), lab::Proto::Udp, 80));
    let _ = agent.kill();
}

#[test]
fn in_both_mode_unknown_addresses_cannot_send_legacy() {
    if skip_unless_root("in_both_mode_unknown_addresses_cannot_send_legacy") {
        return;
    }
    new_pod_isolation_both("legacy");
}

#[test]
fn in_both_mode_unknown_addresses_cannot_send_nft() {
    if skip_unless_root("in_both_mode_unknown_addresses_cannot_send_nft") {
        return;
    }
    new_pod_isolation_both("nft");
}
