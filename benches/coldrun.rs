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
    // Large cases write one file above the default --max-manifest-bytes (16 MiB): raised to fit.
    let manifest_limit = (text.len() as u64).max(16 << 20);
    let manifest_limit_arg = manifest_limit.to_string();
    let mut parse = Duration::MAX;
    for _ in 0..opts.rounds {
        let start = Instant::now();
        let loaded =
            manifests::load_dir_with_limit(&dir, manifest_limit).expect("the manifests load");
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
                "--max-manifest-bytes",
                &manifest_limit_arg,
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
    kube_changes(&api, &runtime, kubeconfig_arg, &snapshot, &params, &mut row);
    drop(api);
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = Command::new("ip").args(["netns", "del", &netns]).output();
    kni_testlab::table::record(rows.iter().map(|(k, v)| (k.as_str(), v.as_str())));
}

/// The agent running in Kubernetes mode on the nft backend: single changes through the API
/// (namespace relabelled, remote pod relabelled, a local pod's policy changed), each after a quiet
/// spell longer than the debounce, timed by the agent itself: `kni_programming_latency_seconds`,
/// from the watch event received to the kernel holding it.
fn kube_changes(
    api: &FakeApi,
    runtime: &tokio::runtime::Runtime,
    kubeconfig: &str,
    snapshot: &kube_netpol_iptables::model::ClusterSnapshot,
    params: &Params,
    row: &mut dyn FnMut(&str, String),
) {
    use kube_netpol_iptables::model::ClusterSnapshot;
    clean();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_kube-netpol-iptables"))
        .args([
            "run",
            "--kubeconfig",
            kubeconfig,
            "--node-name",
            LOCAL_NODE,
            "--backend",
            "nft",
            "--metrics-bind-address",
            METRICS,
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let histogram = || -> Option<Histogram> {
        let text = metrics_text()?;
        let value = |l: &str| l.rsplit(' ').next()?.parse::<f64>().ok();
        let series = |name: &str| text.lines().find(|l| l.starts_with(name)).and_then(value);
        let count = series("kni_programming_latency_seconds_count")?;
        let sum = series("kni_programming_latency_seconds_sum")?;
        let buckets = text
            .lines()
            .filter_map(|l| l.strip_prefix("kni_programming_latency_seconds_bucket{le=\""))
            .filter_map(|l| {
                let (le, rest) = l.split_once('"')?;
                Some((le.parse::<f64>().unwrap_or(f64::INFINITY), value(rest)?))
            })
            .collect();
        Some((count, sum, buckets))
    };
    while histogram().is_none_or(|(count, _, _)| count < 1.0) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the agent did not sync in Kubernetes mode"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (count_before, sum_before, buckets_before) = histogram().unwrap();
    let one = |s: ClusterSnapshot| synthetic::to_manifests(&s);
    let mut namespace = snapshot.namespaces["ns-3"].clone();
    let mut remote = snapshot.pods[params.local_pods + 7].clone();
    let idx = snapshot
        .policies
        .iter()
        .position(|p| p.namespace == snapshot.pods[0].namespace)
        .expect("a local policy");
    let mut policy = snapshot.policies[idx].clone();
    let full_ingress = policy.ingress.clone();
    const ROUNDS: usize = 10;
    for round in 0..ROUNDS {
        let flip = round % 2 == 0;
        namespace
            .labels
            .insert("env".into(), if flip { "staging" } else { "prod" }.into());
        remote
            .labels
            .insert("tier".into(), if flip { "db" } else { "web" }.into());
        policy.ingress = if flip {
            full_ingress[..1].to_vec()
        } else {
            full_ingress.clone()
        };
        let docs = [
            (
                Kind::Namespace,
                one(ClusterSnapshot {
                    namespaces: [(namespace.name.clone(), namespace.clone())].into(),
                    ..Default::default()
                }),
            ),
            (
                Kind::Pod,
                one(ClusterSnapshot {
                    pods: vec![remote.clone()].into(),
                    ..Default::default()
                }),
            ),
            (
                Kind::NetworkPolicy,
                one(ClusterSnapshot {
                    policies: vec![policy.clone()],
                    ..Default::default()
                }),
            ),
        ];
        for (kind, doc) in docs {
            runtime.block_on(async { api.apply(kind, &doc) });
            // Quiet for longer than the debounce (100 ms): each change is a sync of its own.
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let (count, sum, buckets) = histogram().unwrap();
    let changes = count - count_before;
    let mean = (sum - sum_before) / changes;
    // The bucket bound under which half (95%) of this run's changes were programmed.
    let bound = |q: f64| -> String {
        buckets
            .iter()
            .zip(&buckets_before)
            .find(|((_, n), (_, before))| n - before >= q * changes)
            .map_or("?".into(), |((le, _), _)| format!("{:.0} ms", le * 1000.0))
    };
    let _ = agent.kill();
    let _ = agent.wait();
    clean();
    row(
        &format!(
            "[nft] Kubernetes mode: single changes through the API ({changes:.0} synced; {} sent, namespace/pod/policy), watch event → kernel (the agent's histogram)",
            3 * ROUNDS
        ),
        format!(
            "mean {:.1} ms; p50 ≤ {}, p95 ≤ {}",
            mean * 1000.0,
            bound(0.5),
            bound(0.95)
        ),
    );
}

/// (count, sum, cumulative (bound, count) buckets) of the agent's programming latency, from one
/// read of its metrics.
type Histogram = (f64, f64, Vec<(f64, f64)>);

const METRICS: &str = "127.0.0.1:9847";

/// The agent's /metrics, or `None` while it does not answer.
fn metrics_text() -> Option<String> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&METRICS.parse().unwrap(), Duration::from_secs(1))
            .ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}
