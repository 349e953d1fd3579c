//! Sync benchmark: programs a real network namespace with a synthetic cluster and reports, from
//! one run, our full and incremental sync times, the ratio to the bare restore floor, the ratio to
//! writing rule by rule, legacy vs nft, dataplane throughput and new-connection rate with and
//! without rules, and the agent's peak memory. Needs root. Run with hack/bench.sh (which installs
//! iperf3), or:
//!
//!   cargo bench --bench sync -- [--namespaces N] [--pods N] [--local-pods N] [--policies N]
//!                               [--rules-per-policy N] [--connections N] [--skip-iperf]

use kni_testlab::floor::{States, bare_restore, payload};
use kni_testlab::lab::{add_netns, add_pod_netns, in_netns};
use kni_testlab::synthetic::{self, LOCAL_NODE, Params};
use kube_netpol_iptables::compile::Compiler;
use kube_netpol_iptables::compile::ir::Family;
use kube_netpol_iptables::dataplane::{self, Backend, Dataplane, SyncMode, Tables};
use kube_netpol_iptables::model::ClusterSnapshot;
use kube_netpol_iptables::reconcile::{desired_states, desired_states_cached};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

struct Options {
    params: Params,
    skip_iperf: bool,
    /// New connections per run of the connection-rate measure.
    connections: usize,
}

/// `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it, and
/// then a small case checks that the benchmark still works, without iperf and with few
/// connections.
fn parse_args() -> Options {
    let all: Vec<String> = std::env::args().skip(1).collect();
    if !all.iter().any(|a| a == "--bench") {
        let smoke = Params {
            namespaces: 5,
            pods: 60,
            local_pods: 6,
            policies: 12,
            rules_per_policy: 2,
        };
        return Options {
            params: smoke,
            skip_iperf: true,
            connections: 200,
        };
    }
    let mut opts = Options {
        params: Params::default(),
        skip_iperf: false,
        connections: 5000,
    };
    let p = &mut opts.params;
    let args: Vec<String> = all.into_iter().filter(|a| a != "--bench").collect();
    let mut i = 0;
    while i < args.len() {
        let value = || {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--namespaces" => p.namespaces = value(),
            "--pods" => p.pods = value(),
            "--local-pods" => p.local_pods = value(),
            "--policies" => p.policies = value(),
            "--rules-per-policy" => p.rules_per_policy = value(),
            "--connections" => opts.connections = value(),
            "--skip-iperf" => {
                opts.skip_iperf = true;
                i += 1;
                continue;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    let p = &opts.params;
    assert!(
        p.local_pods >= 2 && p.local_pods <= p.pods,
        "need at least 2 local pods"
    );
    opts
}

fn clean() {
    dataplane::cleanup().expect("cleanup");
}

/// Splits a restore line into arguments, keeping a quoted comment whole.
fn split_args(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Rule by rule, as per-rule crates and older agents write: one process per set entry and per
/// rule. Measured on a sample at full table size (per-rule cost grows with the table on the legacy
/// backend), then extrapolated to the whole payload.
fn rule_by_rule(backend: Backend, states: &States) -> (Duration, usize, usize) {
    let (ipset, tables) = payload(states);
    let set_lines: Vec<&str> = ipset.lines().filter(|l| l.starts_with("add ")).collect();
    let rule_lines: Vec<(Family, &str)> = tables
        .iter()
        .flat_map(|(f, t)| {
            t.lines()
                .filter(|l| l.starts_with("-A "))
                .map(move |l| (*f, l))
        })
        .collect();
    const SAMPLE: usize = 300;
    // Sample set entries: a scratch set, one `ipset add` process each.
    sh(&[
        "ipset",
        "create",
        "KNI-BENCH-S",
        "hash:net",
        "family",
        "inet",
        "maxelem",
        "1048576",
    ]);
    let start = Instant::now();
    for i in 0..SAMPLE {
        sh(&[
            "ipset",
            "add",
            "KNI-BENCH-S",
            &format!("10.200.{}.{}/32", i / 250, i % 250 + 1),
        ]);
    }
    let per_entry = start.elapsed() / SAMPLE as u32;
    sh(&["ipset", "destroy", "KNI-BENCH-S"]);
    // Sample rules: appended one `iptables` process each to a scratch chain, with the full payload
    // already in the table.
    let ipt = format!("iptables-{backend}");
    sh(&[&ipt, "-w", "-N", "KNI-BENCH-R"]);
    let v4_rules: Vec<&str> = rule_lines
        .iter()
        .filter(|(f, _)| *f == Family::V4)
        .map(|(_, l)| *l)
        .collect();
    let start = Instant::now();
    for line in v4_rules.iter().cycle().take(SAMPLE) {
        let mut args = split_args(line);
        args[1] = "KNI-BENCH-R".into();
        let mut cmd = Command::new(&ipt);
        cmd.arg("-w").args(&args);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let per_rule = start.elapsed() / SAMPLE as u32;
    sh(&[&ipt, "-w", "-F", "KNI-BENCH-R"]);
    sh(&[&ipt, "-w", "-X", "KNI-BENCH-R"]);
    let total = per_entry * set_lines.len() as u32 + per_rule * rule_lines.len() as u32;
    (total, set_lines.len(), rule_lines.len())
}

fn enter_new_netns(name: &str) {
    let _ = Command::new("ip").args(["netns", "del", name]).output();
    add_netns(name);
    let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    // Single-threaded at this point: every process we start from now on lives in the namespace.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    sh(&["ip", "link", "set", "lo", "up"]);
    sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
}

struct Row(String, String);

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "the sync benchmark programs a network namespace: run it as root (sudo hack/bench.sh)"
        );
        let benchmarking = std::env::args().any(|a| a == "--bench");
        // Under `cargo test` without root the smoke run is skipped, loudly, like the e2e tests.
        let required = std::env::var_os("KNI_E2E_REQUIRED").is_some();
        std::process::exit(if benchmarking || required { 1 } else { 0 });
    }
    let opts = parse_args();
    let params = opts.params.clone();
    let node_ns = format!("kni-bench-{}", std::process::id());
    enter_new_netns(&node_ns);
    let mut rows: Vec<Row> = Vec::new();
    let mut row = |k: &str, v: String| {
        println!("{k:<58} {v}");
        rows.push(Row(k.into(), v));
    };
    println!("kube-netpol-iptables sync benchmark: {params:?}");

    let mut snapshot = synthetic::generate(&params);
    // Compile: best of 3.
    let mut compile_time = Duration::MAX;
    let mut states = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        states = desired_states(&snapshot, LOCAL_NODE);
        compile_time = compile_time.min(start.elapsed());
    }
    let chains: usize = states.iter().map(|(_, s)| s.chains.len()).sum();
    let rules: usize = states.iter().map(|(_, s)| s.rule_count()).sum();
    let sets: usize = states.iter().map(|(_, s)| s.sets.len()).sum();
    let members: usize = states.iter().map(|(_, s)| s.member_count()).sum();
    row("compile (both families)", ms(compile_time));
    row("ipBlock ::/0 minus 10,000 /64 excepts", {
        let except: Vec<ipnet::IpNet> = (0..10_000u128)
            .map(|i| {
                let addr = std::net::Ipv6Addr::from(
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
                );
                ipnet::IpNet::V6(ipnet::Ipv6Net::new(addr, 64).unwrap())
            })
            .collect();
        let start = Instant::now();
        let prefixes =
            kube_netpol_iptables::model::cidr::subtract("::/0".parse().unwrap(), &except);
        format!("{} ({} prefixes)", ms(start.elapsed()), prefixes.len())
    });
    row(
        "rendered size",
        format!("{chains} chains, {rules} rules, {sets} sets, {members} set members"),
    );

    let mut full = Vec::new();
    for backend in [Backend::Legacy, Backend::Nft] {
        clean();
        let floor = bare_restore(backend, &states);
        clean();
        let tables = Tables::find(backend).expect("backend installed");
        let mut dp = Dataplane::new(tables);
        let start = Instant::now();
        let fresh = desired_states(&snapshot, LOCAL_NODE);
        dp.sync(&fresh, SyncMode::Full).expect("full sync");
        let ours = start.elapsed();
        row(
            &format!("[{backend}] full sync, compile + write (fresh node)"),
            ms(ours),
        );
        row(
            &format!("[{backend}] bare ipset + iptables-restore of same payload"),
            ms(floor),
        );
        row(
            &format!("[{backend}] ratio ours / bare floor"),
            format!("{:.2}x", ours.as_secs_f64() / floor.as_secs_f64()),
        );
        let start = Instant::now();
        let report = dp.sync(&fresh, SyncMode::Full).unwrap();
        row(
            &format!("[{backend}] full resync, nothing changed (reads kernel back)"),
            format!(
                "{} ({} lines written)",
                ms(start.elapsed()),
                report.ipset_lines + report.iptables_lines
            ),
        );
        // Each periodic resync reads the entries of another slice of the sets: all rounds.
        let mut rounds: Vec<Duration> = (0..dataplane::MEMBER_CHECK_ROUNDS)
            .map(|_| {
                let start = Instant::now();
                let report = dp.sync(&fresh, SyncMode::Full).unwrap();
                assert_eq!(report.ipset_lines + report.iptables_lines, 0);
                start.elapsed()
            })
            .collect();
        rounds.sort_unstable();
        row(
            &format!(
                "[{backend}] full resync, nothing changed, {} rounds: p50 / max",
                rounds.len()
            ),
            format!(
                "{} / {}",
                ms(rounds[rounds.len() / 2]),
                ms(rounds[rounds.len() - 1])
            ),
        );
        let mut restarted = Dataplane::new(Tables::find(backend).expect("backend installed"));
        let start = Instant::now();
        restarted.sync(&fresh, SyncMode::Full).unwrap();
        row(
            &format!("[{backend}] full sync after a restart, nothing changed (reads every set)"),
            ms(start.elapsed()),
        );
        full.push((backend, ours, dp));
    }

    // Incremental changes on the nft dataplane (the default on current distributions), each
    // timed from the changed snapshot to the kernel updated: compile + diff + write.
    let (_, nft_full, mut dp) = full.pop().unwrap();
    // The agent's path: peer selections cached between changes.
    let mut cache = Compiler::new();
    desired_states_cached(&snapshot, LOCAL_NODE, &mut cache);
    let (_, legacy_full, _) = full.pop().unwrap();
    let mut change = |what: &str, snapshot: &ClusterSnapshot| {
        let start = Instant::now();
        let s = desired_states_cached(snapshot, LOCAL_NODE, &mut cache);
        let compiled = start.elapsed();
        let report = dp
            .sync(&s, SyncMode::Incremental)
            .expect("incremental sync");
        let done = start.elapsed();
        let in_force = match report.in_force_at {
            Some(at) => format!("in force after {}; ", ms(at - start)),
            None => String::new(),
        };
        row(
            &format!("incremental: {what}"),
            format!(
                "{} ({in_force}compile {}, diff + write {}; {} ipset + {} iptables lines)",
                ms(done),
                ms(compiled),
                ms(done - compiled),
                report.ipset_lines,
                report.iptables_lines
            ),
        );
    };
    let mut new_pod = snapshot.pods[params.local_pods].clone();
    new_pod.name = "bench-new".into();
    new_pod.node_name = Some(LOCAL_NODE.into());
    let (v4, v6) = synthetic::pod_ips(params.pods + 1);
    new_pod.ips = vec![v4, v6];
    snapshot.pods_mut().push(new_pod);
    change("local pod added", &snapshot);
    snapshot.pods_mut().pop();
    change("local pod deleted", &snapshot);
    let remote = params.local_pods + 7;
    snapshot.pods_mut()[remote]
        .labels
        .insert("tier".into(), "db".into());
    snapshot.pods_mut()[remote]
        .labels
        .insert("version".into(), "v2".into());
    change("remote pod label changed", &snapshot);
    snapshot
        .namespaces
        .get_mut("ns-3")
        .unwrap()
        .labels
        .insert("env".into(), "prod".into());
    change("namespace label changed", &snapshot);
    let idx = snapshot
        .policies
        .iter()
        .position(|p| p.namespace == snapshot.pods[0].namespace)
        .expect("a local policy");
    snapshot.policies[idx].ingress.truncate(1);
    change("policy changed (a local pod's)", &snapshot);

    // The same kinds of change, each applied and reverted many times, for p50 and p95.
    let runs = 25;
    // Until the change is in force: on nft, rules that replace others are put in force ahead of
    // them, and the removal that follows is reported as the whole sync.
    let mut timed = |snapshot: &ClusterSnapshot, times: &mut Vec<Sample>| {
        let start = Instant::now();
        let s = desired_states_cached(snapshot, LOCAL_NODE, &mut cache);
        let compiled = start.elapsed();
        let report = dp
            .sync(&s, SyncMode::Incremental)
            .expect("incremental sync");
        let done = start.elapsed();
        let in_force = report.in_force_at.map_or(done, |at| at - start);
        times.push((in_force, compiled, done));
    };
    let mut kinds: Vec<(&str, Vec<Sample>)> = [
        "local pod added",
        "local pod deleted",
        "remote pod relabelled",
        "namespace relabelled",
        "policy changed",
    ]
    .into_iter()
    .map(|k| (k, Vec::new()))
    .collect();
    let mut added = snapshot.pods[params.local_pods].clone();
    added.name = "bench-repeated".into();
    added.node_name = Some(LOCAL_NODE.into());
    let (v4, v6) = synthetic::pod_ips(params.pods + 2);
    added.ips = vec![v4, v6];
    let ns3 = |snapshot: &mut ClusterSnapshot, env: &str| {
        let labels = &mut snapshot.namespaces.get_mut("ns-3").unwrap().labels;
        labels.insert("env".into(), env.into());
    };
    let full_ingress = synthetic::generate(&params).policies[idx].ingress.clone();
    for _ in 0..runs {
        snapshot.pods_mut().push(added.clone());
        timed(&snapshot, &mut kinds[0].1);
        snapshot.pods_mut().pop();
        timed(&snapshot, &mut kinds[1].1);
        for (tier, version) in [("web", "v1"), ("db", "v2")] {
            let labels = &mut snapshot.pods_mut()[remote].labels;
            labels.insert("tier".into(), tier.into());
            labels.insert("version".into(), version.into());
            timed(&snapshot, &mut kinds[2].1);
        }
        for env in ["staging", "prod"] {
            ns3(&mut snapshot, env);
            timed(&snapshot, &mut kinds[3].1);
        }
        for ingress in [full_ingress.clone(), full_ingress[..1].to_vec()] {
            snapshot.policies[idx].ingress = ingress;
            timed(&snapshot, &mut kinds[4].1);
        }
    }
    for (what, times) in kinds {
        percentiles_row(
            &mut row,
            &format!("[nft] incremental p50 / p95 ({} runs): {what}", times.len()),
            times,
        );
    }
    // The policy change again on the legacy backend. Every nf_tables commit leaves the freeing
    // of what it replaced to a worker that first waits out an RCU grace period, and the next
    // netfilter netlink socket to close (the restore's own, on exit) or the next commit
    // initialising an xtables match waits for that worker: a rule change of both families pays
    // two grace periods on nft, none on legacy (docs/performance.md).
    {
        let mut legacy = Dataplane::new(Tables::find(Backend::Legacy).unwrap());
        let s = desired_states_cached(&snapshot, LOCAL_NODE, &mut cache);
        legacy.sync(&s, SyncMode::Full).unwrap();
        let mut times = Vec::new();
        for _ in 0..runs {
            for ingress in [full_ingress.clone(), full_ingress[..1].to_vec()] {
                snapshot.policies[idx].ingress = ingress;
                let start = Instant::now();
                let s = desired_states_cached(&snapshot, LOCAL_NODE, &mut cache);
                let compiled = start.elapsed();
                legacy.sync(&s, SyncMode::Incremental).unwrap();
                times.push((start.elapsed(), compiled, start.elapsed()));
            }
        }
        percentiles_row(
            &mut row,
            &format!(
                "[legacy] incremental p50 / p95 ({} runs): policy changed",
                times.len()
            ),
            times,
        );
        // Back to the nft backend for what follows (a full sync removes the legacy rules).
        dp.sync(
            &desired_states_cached(&snapshot, LOCAL_NODE, &mut cache),
            SyncMode::Full,
        )
        .unwrap();
    }
    let states = desired_states(&snapshot, LOCAL_NODE);

    // Rule by rule, with the payload in place (nft backend).
    let (per_rule_total, entries, rule_lines) = rule_by_rule(Backend::Nft, &states);
    let start = Instant::now();
    clean();
    let mut fresh_dp = Dataplane::new(Tables::find(Backend::Nft).unwrap());
    fresh_dp.sync(&states, SyncMode::Full).unwrap();
    let ours = start.elapsed();
    row(
        "[nft] rule by rule (one process each; sampled, extrapolated)",
        format!(
            "{:.1} s for {entries} set entries + {rule_lines} rules",
            per_rule_total.as_secs_f64()
        ),
    );
    row(
        "[nft] ratio rule by rule / ours",
        format!("{:.0}x", per_rule_total.as_secs_f64() / ours.as_secs_f64()),
    );
    row(
        "legacy vs nft full sync",
        format!(
            "{} vs {} (legacy at {:.2}x of nft)",
            ms(legacy_full),
            ms(nft_full),
            legacy_full.as_secs_f64() / nft_full.as_secs_f64()
        ),
    );

    pod_to_pod(&node_ns, &snapshot, &opts, &mut row);
    peak_memory(&snapshot, &mut row);
    clean();
    let _ = Command::new("ip").args(["netns", "del", &node_ns]).output();
    kni_testlab::table::record(rows.iter().map(|Row(k, v)| (k.as_str(), v.as_str())));
}

/// One row of p50 / p95 of `times` (whole, compile), with the compile part of the p50.
/// One timed change: until in force, of it the compile, and the whole sync.
type Sample = (Duration, Duration, Duration);

fn percentiles_row(row: &mut dyn FnMut(&str, String), label: &str, mut times: Vec<Sample>) {
    let mut whole: Vec<Duration> = times.iter().map(|t| t.2).collect();
    whole.sort_unstable();
    times.sort_unstable();
    let at = |q: f64| ((times.len() - 1) as f64 * q).round() as usize;
    let ((p50, compile, _), (p95, _, _)) = (times[at(0.5)], times[at(0.95)]);
    let mut text = format!(
        "{} / {} (compile {} of the p50)",
        ms(p50),
        ms(p95),
        ms(compile)
    );
    if whole != times.iter().map(|t| t.0).collect::<Vec<_>>() {
        text.push_str(&format!(
            "; whole sync with the removal of the replaced rules {} / {}",
            ms(whole[at(0.5)]),
            ms(whole[at(0.95)])
        ));
    }
    row(label, text);
}

/// What the rules cost the traffic between two local pods, with the large case programmed and
/// with no rules: TCP throughput (one long stream, iperf3; only its first packet reaches our
/// chains) and the rate of new connections (every one walks our dispatch and policy chains).
fn pod_to_pod(
    node_ns: &str,
    snapshot: &ClusterSnapshot,
    opts: &Options,
    row: &mut dyn FnMut(&str, String),
) {
    let iperf = !opts.skip_iperf && Command::new("iperf3").arg("--version").output().is_ok();
    if !iperf {
        row(
            "throughput",
            "skipped: iperf3 not installed (hack/bench.sh installs it) or --skip-iperf".into(),
        );
    }
    // The two local pods whose keys sort last: the longest walk while dispatch is one rule per
    // local pod in key order. Real pod namespaces get their addresses, and one more policy
    // allows traffic between them (it isolates them too, so both are in our chains).
    let mut local: Vec<usize> = (0..snapshot.pods.len())
        .filter(|&j| snapshot.pods[j].node_name.as_deref() == Some(LOCAL_NODE))
        .collect();
    local.sort_by_key(|&j| snapshot.pods[j].key());
    let chosen = &local[local.len() - 2..];
    let pods: Vec<(String, Ipv4Addr)> = chosen
        .iter()
        .enumerate()
        .map(|(i, &j)| {
            let ns = format!("{node_ns}-p{i}");
            let ips = &snapshot.pods[j].ips;
            let (IpAddr::V4(v4), IpAddr::V6(v6)) = (ips[0], ips[1]) else {
                panic!("synthetic pods have an IPv4 and an IPv6 address")
            };
            add_pod_netns(node_ns, &ns, &format!("vb{i}"), v4, v6);
            (ns, v4)
        })
        .collect();
    let mut with_bench = snapshot.clone();
    for &j in chosen {
        with_bench.pods_mut()[j]
            .labels
            .insert("bench".into(), "pod-to-pod".into());
    }
    let allow: kube_netpol_iptables::model::Policy = {
        let yaml = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bench, namespace: placeholder}\nspec:\n  podSelector: {matchLabels: {bench: pod-to-pod}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {bench: pod-to-pod}}}]}]\n  egress: [{to: [{namespaceSelector: {}, podSelector: {matchLabels: {bench: pod-to-pod}}}]}]";
        let p: k8s_openapi::api::networking::v1::NetworkPolicy =
            serde_yaml_ng::from_str(yaml).unwrap();
        kube_netpol_iptables::source::convert::policy(&p).unwrap()
    };
    for (i, &j) in chosen.iter().enumerate() {
        let mut p = allow.clone();
        p.namespace = with_bench.pods[j].namespace.clone();
        p.name = format!("bench-{i}");
        with_bench.policies.push(p);
    }
    // With rules and without, alternately, best of each: on a shared machine, load that comes
    // and goes then weighs on both sides of the ratio alike.
    let states = desired_states(&with_bench, LOCAL_NODE);
    let (mut conns_with, mut conns_without) = (0.0f64, 0.0f64);
    let mut conns_tracked = 0.0f64;
    let (mut tput_with, mut tput_without) = (None, None);
    for round in 0..CONNECTION_ROUNDS {
        let mut dp = Dataplane::new(Tables::find(Backend::Nft).unwrap());
        dp.sync(&states, SyncMode::Full).unwrap();
        if round == 0 && iperf {
            tput_with = Some(iperf_gbits(&pods[0].0, &pods[1].0, pods[1].1));
        }
        conns_with = conns_with.max(connection_rate(&pods, opts.connections));
        clean();
        if round == 0 && iperf {
            tput_without = Some(iperf_gbits(&pods[0].0, &pods[1].0, pods[1].1));
        }
        conns_without = conns_without.max(connection_rate(&pods, opts.connections));
        // No rules of ours, but connection tracking on, as on any node where kube-proxy (or
        // another NAT or firewall user) runs: its FORWARD rule, which needs conntrack for every
        // packet. Separates what tracking costs from what our chains cost.
        conntrack_forward_rule("-A");
        conns_tracked = conns_tracked.max(connection_rate(&pods, opts.connections));
        conntrack_forward_rule("-D");
    }
    if let (Some(with_rules), Some(without)) = (tput_with, tput_without) {
        row(
            "[nft] TCP throughput pod to pod, large case programmed",
            format!("{with_rules:.2} Gbit/s"),
        );
        row(
            "[nft] TCP throughput pod to pod, no rules",
            format!("{without:.2} Gbit/s"),
        );
        row(
            "throughput with rules / without",
            format!("{:.1}%", 100.0 * with_rules / without),
        );
    }
    row(
        "[nft] new TCP connections pod to pod, large case programmed",
        format!(
            "{conns_with:.0}/s (best of {CONNECTION_ROUNDS} × {})",
            opts.connections
        ),
    );
    row(
        "[nft] new TCP connections pod to pod, no rules",
        format!(
            "{conns_without:.0}/s (best of {CONNECTION_ROUNDS} × {})",
            opts.connections
        ),
    );
    row(
        "new-connection rate with rules / without",
        format!("{:.1}%", 100.0 * conns_with / conns_without),
    );
    row(
        "[nft] new TCP connections pod to pod, no rules of ours, conntrack on (kube-proxy's FORWARD rule)",
        format!(
            "{conns_tracked:.0}/s (best of {CONNECTION_ROUNDS} × {})",
            opts.connections
        ),
    );
    row(
        "new-connection rate with rules / conntrack on without our rules",
        format!("{:.1}%", 100.0 * conns_with / conns_tracked),
    );
    // What connection tracking alone leaves of the rate: the most any ruleset that lets replies
    // through by their conntrack state (ours, kube-proxy's, every CNI's NAT) can reach.
    row(
        "new-connection rate, conntrack on without our rules / no rules (ceiling for stateful rules)",
        format!("{:.1}%", 100.0 * conns_tracked / conns_without),
    );
    for (ns, _) in &pods {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
}

/// One 3 s iperf3 stream from `client_ns` to the server at `server_ip` in `server_ns`.
fn iperf_gbits(client_ns: &str, server_ns: &str, server_ip: Ipv4Addr) -> f64 {
    let server = Command::new("ip")
        .args(["netns", "exec", server_ns, "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .spawn();
    std::thread::sleep(Duration::from_millis(300));
    let ip = server_ip.to_string();
    let out = sh(&[
        "ip", "netns", "exec", client_ns, "iperf3", "-c", &ip, "-t", "3", "-J",
    ]);
    let _ = server.map(|mut s| s.wait());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap()
        / 1e9
}

/// Empties the node's conntrack table, so that runs start alike (each connection leaves an
/// entry behind for minutes).
/// Adds (`-A`) or deletes (`-D`) kube-proxy's `-m conntrack --ctstate INVALID -j DROP` in the
/// bench node's FORWARD chain (a namespace of the bench's own).
fn conntrack_forward_rule(op: &str) {
    sh(&[
        "iptables-nft",
        "-w",
        op,
        "FORWARD",
        "-m",
        "conntrack",
        "--ctstate",
        "INVALID",
        "-j",
        "DROP",
    ]);
}

fn forget_flows() {
    let _ = Command::new("conntrack").arg("-F").output();
}

const CONNECTION_PORT: u16 = 8080;
/// Rounds of the connection-rate measure, each with rules and without.
const CONNECTION_ROUNDS: usize = 3;

/// New TCP connections per second from the first of `pods` to a server in the second, one after
/// the other: connect, send one request, read the answer until the server closes (so the server,
/// not the client, holds TIME_WAIT and the client's ports never run out). `count` connections
/// after a tenth as many to warm up, from an empty conntrack table.
fn connection_rate(pods: &[(String, Ipv4Addr)], count: usize) -> f64 {
    forget_flows();
    let warm_up = count / 10;
    let listener = in_netns(&pods[1].0, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, CONNECTION_PORT)).expect("bind")
    })
    .join()
    .unwrap();
    let server = std::thread::spawn(move || {
        let mut request = [0u8; 16];
        for _ in 0..warm_up + count {
            let (mut s, _) = listener.accept().expect("accept");
            let _ = s.read(&mut request);
            let _ = s.write_all(b"ok");
        }
    });
    let addr = SocketAddr::from((pods[1].1, CONNECTION_PORT));
    let rate = in_netns(&pods[0].0, move || {
        let one = || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
            s.write_all(b"GET\n").unwrap();
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).unwrap();
            assert_eq!(answer, b"ok");
        };
        (0..warm_up).for_each(|_| one());
        let start = Instant::now();
        (0..count).for_each(|_| one());
        count as f64 / start.elapsed().as_secs_f64()
    })
    .join()
    .unwrap();
    server.join().unwrap();
    rate
}

/// Peak resident memory of the real agent binary syncing the cluster from a manifests directory.
fn peak_memory(snapshot: &ClusterSnapshot, row: &mut dyn FnMut(&str, String)) {
    clean();
    let dir = std::env::temp_dir().join(format!("kni-bench-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifests = synthetic::to_manifests(snapshot);
    // The large cases write one file above the agent's default limit (16 MiB).
    let limit = (manifests.len() + 1).to_string();
    std::fs::write(dir.join("cluster.yaml"), manifests).unwrap();
    let bin = env!("CARGO_BIN_EXE_kube-netpol-iptables");
    let mut child = Command::new(bin)
        .args([
            "run",
            "--manifests",
            dir.to_str().unwrap(),
            "--node-name",
            LOCAL_NODE,
            "--backend",
            "nft",
            "--resync-period",
            "1h",
            "--max-manifest-bytes",
            &limit,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the first sync (our chains exist), then read the agent's own high-water mark.
    let start = Instant::now();
    let started = Instant::now();
    while !sh(&["iptables-nft-save", "-t", "filter"]).contains(":KNI-PODI-") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the agent did not sync"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let to_first_sync = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: ? kB")
        .to_string();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let kb: f64 = hwm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    row(
        "agent binary: manifests → first full sync",
        ms(to_first_sync),
    );
    row(
        "agent binary: peak memory (VmHWM)",
        format!("{:.1} MiB", kb / 1024.0),
    );
}
