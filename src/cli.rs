//! The command line. Lives in the library so tests can check deployment manifests against the
//! real parser.

use crate::agent;
use crate::dataplane::{self, BackendChoice, Dataplane, SyncMode, render};
use crate::kube_source;
use crate::manifests;
use crate::metrics::{self, Metrics};
use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Kubernetes NetworkPolicy agent for nodes whose kernel lacks nft_queue: enforces policies with
/// ipset and iptables-restore batches, on the legacy or nft iptables backend.
#[derive(Parser, Debug)]
#[command(name = "kube-netpol-iptables", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Enforce NetworkPolicies on this node: from the Kubernetes API (in-cluster config or
    /// --kubeconfig), or from a manifests directory with --manifests.
    Run {
        /// Directory of Namespace, Pod and NetworkPolicy manifests (*.yaml, *.yml, *.json)
        /// to enforce instead of watching the Kubernetes API.
        #[arg(long, env = "KNI_MANIFESTS", conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// kubeconfig file for the Kubernetes API; default: in-cluster configuration.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// This node's name: pods whose spec.nodeName equals it are the ones enforced here.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Sync once and exit (non-zero if anything could not be written).
        #[arg(long)]
        once: bool,
        /// iptables backend: auto picks the one the host uses, as kube-proxy does.
        #[arg(long, env = "KNI_BACKEND", value_enum, default_value = "auto")]
        backend: BackendChoice,
        /// Address for /metrics, /healthz and /readyz; "off" disables them.
        #[arg(long, env = "KNI_METRICS_BIND_ADDRESS", default_value = metrics::DEFAULT_BIND)]
        metrics_bind_address: String,
        /// How often to check the manifests directory for changes.
        #[arg(long, env = "KNI_POLL_INTERVAL", default_value = "200ms", value_parser = parse_duration)]
        poll_interval: Duration,
        /// A burst of changes becomes one sync once the source has been quiet this long.
        #[arg(long, env = "KNI_SYNC_DEBOUNCE", default_value = "100ms", value_parser = parse_duration)]
        sync_debounce: Duration,
        /// Upper bound on how long a change may wait for the burst to end.
        #[arg(long, env = "KNI_SYNC_MAX_DELAY", default_value = "1s", value_parser = parse_duration)]
        sync_max_delay: Duration,
        /// How often to read the kernel back and repair anything that differs (drift).
        #[arg(long, env = "KNI_RESYNC_PERIOD", default_value = "5m", value_parser = parse_duration)]
        resync_period: Duration,
        /// How long to wait for the xtables lock (held by kube-proxy, the CNI, …) before a write
        /// fails and is retried.
        #[arg(long, env = "KNI_XTABLES_WAIT", default_value = "10s", value_parser = parse_duration)]
        xtables_wait: Duration,
    },
    /// Print the ipset and iptables-restore text `run` would write to a fresh node; touches nothing.
    Render {
        #[arg(long, env = "KNI_MANIFESTS")]
        manifests: PathBuf,
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
    },
    /// Remove every chain, jump and set the agent owns (both families), and nothing else.
    Cleanup {
        /// Which backend to clean; auto cleans every installed one.
        #[arg(long, env = "KNI_BACKEND", value_enum, default_value = "auto")]
        backend: BackendChoice,
    },
    /// Print the version.
    Version,
}

/// Durations like `200ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 200ms, 30s or 5m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            manifests,
            kubeconfig,
            node_name,
            once,
            backend,
            metrics_bind_address,
            poll_interval,
            sync_debounce,
            sync_max_delay,
            resync_period,
            xtables_wait,
        } => {
            let Some(node_name) = node_name.filter(|n| !n.is_empty()) else {
                bail!(
                    "no node name: pass --node-name or set NODE_NAME (the DaemonSet sets it from spec.nodeName)"
                );
            };
            let bind: Option<SocketAddr> = match metrics_bind_address.as_str() {
                "off" | "" => None,
                addr => Some(addr.parse().map_err(|_| {
                    anyhow::anyhow!("--metrics-bind-address {addr:?} is not an address like 0.0.0.0:9847 (or \"off\")")
                })?),
            };
            let mut tables = dataplane::detect_backend(backend)?;
            tables.lock_wait = xtables_wait;
            tracing::info!(backend = %tables.backend, node = node_name, "starting");
            dataplane::probe_kernel(&tables)?;
            agent::check_bridge_netfilter();
            let mut dataplane = Dataplane::new(tables);
            let options = agent::WatchOptions {
                poll_interval,
                debounce: sync_debounce,
                max_delay: sync_max_delay,
                resync_period,
            };
            // Liveness allows for the slowest legitimate gap: a resync plus its retries.
            let metrics = Metrics::new((resync_period * 2).max(Duration::from_secs(120)));
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                tokio::spawn(async {
                    use tokio::signal::unix::{SignalKind, signal};
                    let (Ok(mut term), Ok(mut int)) = (
                        signal(SignalKind::terminate()),
                        signal(SignalKind::interrupt()),
                    ) else {
                        return;
                    };
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    tracing::info!("signal received: finishing the sync in progress");
                    agent::STOP.store(true, std::sync::atomic::Ordering::Relaxed);
                });
                if let (Some(bind), false) = (bind, once) {
                    let m = metrics.clone();
                    tokio::spawn(async move {
                        if let Err(e) = metrics::serve(bind, m).await {
                            tracing::error!("{e:#}");
                            std::process::exit(1);
                        }
                    });
                }
                match (manifests, once) {
                    (Some(dir), true) => {
                        let mut cache = Default::default();
                        agent::sync_from_dir(
                            &mut dataplane,
                            &mut cache,
                            &dir,
                            &node_name,
                            SyncMode::Full,
                            None,
                        )
                        .map(drop)
                    }
                    (Some(dir), false) => {
                        tokio::task::spawn_blocking(move || {
                            agent::watch_dir(
                                &mut dataplane,
                                &dir,
                                &node_name,
                                &options,
                                Some(&metrics),
                            )
                        })
                        .await?
                    }
                    (None, once) => {
                        let client = kube_source::client(kubeconfig.as_deref()).await?;
                        let store = kube_source::start(client);
                        if once {
                            let snapshot = loop {
                                if let Some((_, s)) = store.snapshot() {
                                    break s;
                                }
                                store.changed().await;
                            };
                            tokio::task::spawn_blocking(move || {
                                let mut cache = Default::default();
                                agent::sync_snapshot(
                                    &mut dataplane,
                                    &mut cache,
                                    &snapshot,
                                    &node_name,
                                    SyncMode::Full,
                                    None,
                                )
                                .map(drop)
                            })
                            .await?
                        } else {
                            agent::watch_cluster(dataplane, store, node_name, options, metrics)
                                .await
                        }
                    }
                }
            })
        }
        Command::Render {
            manifests,
            node_name,
        } => {
            let snapshot = manifests::load_dir(&manifests)?;
            print!(
                "{}",
                render::render_fresh(&agent::desired_states(&snapshot, &node_name))
            );
            Ok(())
        }
        Command::Cleanup { backend } => match backend {
            BackendChoice::Auto => dataplane::cleanup(),
            one => dataplane::cleanup_backend(&dataplane::detect_backend(one)?),
        },
        Command::Version => {
            println!("kube-netpol-iptables {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn manifests_and_kubeconfig_exclude_each_other() {
        assert!(
            Cli::try_parse_from(["k", "run", "--manifests", "d", "--kubeconfig", "k"]).is_err()
        );
        assert!(Cli::try_parse_from(["k", "run", "--node-name", "n"]).is_ok());
    }
}
