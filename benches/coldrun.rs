//! Cold-run benchmark (issue 11): the whole agent process on a fresh node, from the first byte of
//! input to the kernel programmed, against the bare restore of its own payload, all measured in
//! one run in a network namespace this benchmark creates. Two sources:
//!
//! - manifests: `run --once --manifests DIR` on the synthetic cluster written as one YAML file,
//!   plus the parse alone (in process) to show what parsing costs;
//! - Kubernetes: `run --once` against the fake API server (kni_testlab::fakeapi) serving the same
//!   cluster: start to first sync, through the initial lists.
//!
//! Each process is timed from spawn to exit; peak memory is its maximum resident set size.
//! Needs root. Run with hack/bench.sh (which runs this after the sync benchmark), or:
//!
//!   cargo bench --bench coldrun -- [--namespaces N] [--pods N] [--local-pods N] [--policies N]
//!                                  [--rounds N]

use kni_testlab::fakeapi::{FakeApi, Kind};
use kni_testlab::floor::{bare_restore, previous_layout};
use kni_testlab::lab::{add_netns, sh};
use kni_testlab::synthetic::{self, LOCAL_NODE, Params};
use kube_netpol_iptables::dataplane::{self, Backend};
use kube_netpol_iptables::reconcile::desired_states;
use kube_netpol_iptables::source::manifests;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

struct Options {
    params: Params,
    rounds: usize,
}

/// `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it, and
/// then it runs a small case once, as a smoke test.
fn parse_args() -> Options {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let benchmarking = args.iter().any(|a| a == "--bench");
    args.retain(|a| a != "--bench");
    let mut opts = Options {
        params: if benchmarking {
            Params::default()
        } else {
            Params {
                namespaces: 10,
                pods: 200,
                local_pods: 10,
                policies: 20,
                rules_per_policy: 3,
            }
        },
        rounds: if benchmarking { 3 } else { 1 },
    };
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--namespaces" => opts.params.namespaces = value(),
            "--pods" => opts.params.pods = value(),
            "--local-pods" => opts.params.local_pods = value(),
            "--policies" => opts.params.policies = value(),
            "--rules-per-policy" => opts.params.rules_per_policy = value(),
            "--rounds" => opts.rounds = value().max(1),
            // Options of the sync benchmark, passed through by hack/bench.sh.
            "--connections" => {
                value();
            }
            "--skip-iperf" => {}
            other => panic!("unknown option {other}"),
        }
    }
    opts
}

fn clean() {
    dataplane::cleanup().expect("cleanup");
}

fn enter_new_netns(name: &str) {
    let _ = Command::new("ip").args(["netns", "del", name]).output();
    add_netns(name);
    let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    // Single-threaded at this point: every process we start from now on lives in the namespace.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    sh(&["ip", "link", "set", "lo", "up"]);
}

/// Runs the agent binary to completion: (wall time from spawn to exit, peak RSS in KiB if known).
/// Started through GNU time, which reports the agent's own peak: a child of this (large)
/// benchmark process would inherit its high-water mark (Linux records the pre-exec peak in
/// `ru_maxrss`). Without GNU time (hack/bench.sh installs it) the peak is not reported.
fn run_agent(args: &[&str]) -> (Duration, Option<u64>) {
    let bin = env!("CARGO_BIN_EXE_kube-netpol-iptables");
    let report = std::env::temp_dir().join(format!("kni-coldrun-rss-{}", std::process::id()));
    let mut command = if Path::new(GNU_TIME).exists() {
        let mut c = Command::new(GNU_TIME);
        c.args(["-f", "%M", "-o", report.to_str().unwrap(), bin]);
        c
    } else {
        Command::new(bin)
    };
    let start = Instant::now();
    let out = command
        .args(args)
        // KNI_COLDRUN_LOG=info shows the agent's own timeline (printed after each run).
        .env(
            "RUST_LOG",
            std::env::var("KNI_COLDRUN_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let elapsed = start.elapsed();
    if std::env::var_os("KNI_COLDRUN_LOG").is_some() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        out.status.success(),
        "the agent failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kib = std::fs::read_to_string(&report)
        .ok()
        .and_then(|t| t.trim().parse().ok());
    let _ = std::fs::remove_file(&report);
    (elapsed, kib)
}

const GNU_TIME: &str = "/usr/bin/time";

fn mib(kib: Option<u64>) -> String {
    kib.map_or("not measured: no GNU time".into(), |kib| {
        format!("{:.1} MiB", kib as f64 / 1024.0)
    })
}

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "the cold-run benchmark programs a network namespace: run it as root (sudo hack/bench.sh)"
        );
        let benchmarking = std::env::args().any(|a| a == "--bench");
        let required = std::env::var_os("KNI_E2E_REQUIRED").is_some();
        std::process::exit(if benchmarking || required { 1 } else { 0 });
    }
    let opts = parse_args();
    let params = opts.params.clone();
    let netns = format!("kni-coldrun-{}", std::process::id());
    enter_new_netns(&netns);
    println!("kube-netpol-iptables cold-run benchmark: {params:?}");
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| {
        println!("{k:<58} {v}");
        rows.push((k.into(), v));
    };

    let snapshot = synthetic::generate(&params);
    let states = desired_states(&snapshot, LOCAL_NODE);
    let members: usize = states.iter().map(|(_, s)| s.member_count()).sum();
    let rules: usize = states.iter().map(|(_, s)| s.rule_count()).sum();
    let sets: usize = states.iter().map(|(_, s)| s.sets.len()).sum();
    row(
        "payload",
        format!("{rules} rules, {sets} sets, {members} set members"),
    );
    let previous = previous_layout(&states);
    let previous_sets: usize = previous.iter().map(|(_, s)| s.sets.len()).sum();
    let previous_members: usize = previous.iter().map(|(_, s)| s.member_count()).sum();
    row(
        "yardstick: the same rules with a set per chain and selection (close to the layout before issue 11)",
        format!("{previous_sets} sets, {previous_members} set members"),
    );

    // The manifests: one file, as a ConfigMap or `kubectl get -o yaml` would give.
    let dir = std::env::temp_dir().join(format!("kni-coldrun-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = synthetic::to_manifests(&snapshot);
    let documents = text.matches("\n---\n").count() + 1;
    std::fs::write(dir.join("cluster.yaml"), &text).unwrap();
    row(
        "manifests",
        format!("{documents} documents, {:.1} MB", text.len() as f64 / 1e6),
    );
    let mut parse = Duration::MAX;
    for _ in 0..opts.rounds {
        let start = Instant::now();
        let loaded = manifests::load_dir(&dir).expect("the manifests load");
        parse = parse.min(start.elapsed());
        assert_eq!(loaded.pods.len(), snapshot.pods.len());
    }
    row("manifests → snapshot, in process (best)", ms(parse));

    // Kubernetes mode: the same cluster behind the fake API server, in a thread of its own.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let api = runtime.block_on(async {
        let api = FakeApi::start_local();
        for doc in text.split("\n---\n") {
            let kind = match doc.lines().find_map(|l| l.strip_prefix("kind: ")) {
                Some("Namespace") => Kind::Namespace,
                Some("Pod") => Kind::Pod,
                Some("NetworkPolicy") => Kind::NetworkPolicy,
                other => panic!("unexpected kind {other:?}"),
            };
            api.apply(kind, doc);
        }
        api
    });
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();

    let dir_arg = dir.to_str().unwrap();
    let kubeconfig_arg = kubeconfig.to_str().unwrap();
    for backend in [Backend::Nft, Backend::Legacy] {
        let backend_arg = backend.to_string();
        let mut floor = Duration::MAX;
        let mut previous_floor = Duration::MAX;
        let mut cold: (Duration, Option<u64>) = (Duration::MAX, None);
        let mut kube: (Duration, Option<u64>) = (Duration::MAX, None);
        // Alternate the three so that machine noise hits them alike; best of the rounds.
        for _ in 0..opts.rounds {
            clean();
            previous_floor = previous_floor.min(bare_restore(backend, &previous));
            clean();
            floor = floor.min(bare_restore(backend, &states));
            clean();
            let run = run_agent(&[
                "run",
                "--once",
                "--manifests",
                dir_arg,
                "--node-name",
                LOCAL_NODE,
                "--backend",
                &backend_arg,
            ]);
            cold = (cold.0.min(run.0), cold.1.max(run.1));
            clean();
            let run = run_agent(&[
                "run",
                "--once",
                "--kubeconfig",
                kubeconfig_arg,
                "--node-name",
                LOCAL_NODE,
                "--backend",
                &backend_arg,
            ]);
            kube = (kube.0.min(run.0), kube.1.max(run.1));
        }
        clean();
        row(
            &format!("[{backend}] bare ipset + iptables-restore of the payload"),
            ms(floor),
        );
        row(
            &format!("[{backend}] bare restore of the yardstick payload"),
            format!(
                "{} ({:.2}x the payload's)",
                ms(previous_floor),
                previous_floor.as_secs_f64() / floor.as_secs_f64()
            ),
        );
        row(
            &format!("[{backend}] cold run, manifests → kernel (whole process)"),
            format!("{} (peak {})", ms(cold.0), mib(cold.1)),
        );
        row(
            &format!("[{backend}] ratio cold run / bare floor"),
            format!("{:.2}x", cold.0.as_secs_f64() / floor.as_secs_f64()),
        );
        row(
            &format!("[{backend}] Kubernetes mode: start → initial lists → first sync"),
            format!("{} (peak {})", ms(kube.0), mib(kube.1)),
        );
    }
    drop(api);
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = Command::new("ip").args(["netns", "del", &netns]).output();
    kni_testlab::table::record(rows.iter().map(|(k, v)| (k.as_str(), v.as_str())));
}
