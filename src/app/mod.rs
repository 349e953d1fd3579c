//! The application: the runtime, one cancellation token for SIGTERM/SIGINT, the node lock, the
//! metrics server, and the commands `run` (with `--once`), `render`, `cleanup` and `explain`.

pub mod host;
pub mod instance_lock;

use crate::cli::{Config, RunConfig, SourceConfig};
use crate::compile::{enforcement, explain};
use crate::dataplane::{self, BackendChoice, Dataplane, render};
use crate::metrics::{self, Metrics};
use crate::reconcile::denied_log::DeniedLog;
use crate::reconcile::policy_counters::PolicyCounters;
use crate::reconcile::{self, NodeTarget, Timing};
use crate::source::{Source, kube, manifests};
use anyhow::Result;
use instance_lock::{Holder, InstanceLock};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The log target from before the module layout of issue 10, kept so users' log filters still
/// match.
const LOG_TARGET: &str = "kube_netpol_iptables::cli";

pub fn run(config: Config) -> Result<()> {
    match config {
        Config::Run(config) => run_agent(config),
        Config::Render {
            manifests,
            max_manifest_bytes,
            node_name,
            deny_action,
        } => {
            let snapshot = manifests::load_dir_with_limit(&manifests, max_manifest_bytes)?;
            let mut states = reconcile::desired_states(&snapshot, &node_name);
            let options = enforcement::Options {
                deny_action,
                ..Default::default()
            };
            enforcement::apply(&mut states, &snapshot, &node_name, &options);
            print!("{}", render::render_fresh(&states));
            Ok(())
        }
        Config::Cleanup { backend } => {
            let _lock = instance_lock::try_acquire()?.map_err(|holder| {
                anyhow::anyhow!(
                    "{holder}: stop the agent before cleaning up, or it would fight the cleanup"
                )
            })?;
            match backend {
                BackendChoice::Auto => Ok(dataplane::cleanup()?),
                one => Ok(dataplane::cleanup_backend(&dataplane::detect_backend(
                    one,
                )?)?),
            }
        }
        Config::Explain {
            manifests: dir,
            max_manifest_bytes,
            kubeconfig,
            query,
            json,
        } => {
            let snapshot = match dir {
                Some(dir) => manifests::load_dir_with_limit(&dir, max_manifest_bytes)?,
                None => list_cluster(kubeconfig)?,
            };
            let explanation =
                explain::explain(&snapshot, &query).map_err(|e| anyhow::anyhow!(e))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&explanation)?);
            } else {
                print!("{explanation}");
            }
            Ok(())
        }
        Config::Version => {
            println!("kube-netpol-iptables {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

/// The cluster as the API lists it once (every kind listed), for `explain`.
fn list_cluster(kubeconfig: Option<std::path::PathBuf>) -> Result<crate::model::ClusterSnapshot> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = kube::client(kubeconfig.as_deref()).await?;
        let store = kube::start(client, None);
        let listing = async {
            loop {
                if let Some((_, snapshot)) = store.snapshot() {
                    return snapshot;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), listing)
            .await
            .map_err(|_| anyhow::anyhow!("the cluster could not be listed within 60s"))
    })
}

/// `run`: until a signal, or one sync with `--once`.
fn run_agent(config: RunConfig) -> Result<()> {
    host::raise_open_file_limit();
    // The manifests load while the lock is taken and the kernel probed (a cold start's time).
    let mut manifests_source = match &config.source {
        SourceConfig::Manifests {
            dir,
            max_file_bytes,
            ..
        } => Some(manifests::DirSource::prefetching(
            dir.clone(),
            *max_file_bytes,
        )),
        SourceConfig::Kube { .. } => None,
    };
    // A one-shot sync refuses at once; the agent waits (see below).
    let mut lock_attempt = instance_lock::try_acquire()?;
    if config.once {
        lock_attempt = Ok(lock_attempt.map_err(|holder| {
            anyhow::anyhow!("{holder}: a second writer would fight it; stop it first")
        })?);
    }
    let mut tables = dataplane::detect_backend(config.backend)?;
    tables.lock_wait = config.xtables_wait;
    tracing::info!(target: LOG_TARGET, backend = %tables.backend, node = config.node_name, "starting");
    // Liveness allows for the slowest legitimate gap: a resync plus its retries.
    let metrics = Metrics::new((config.timing.resync_period * 2).max(Duration::from_secs(120)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let stop = CancellationToken::new();
        tokio::spawn(cancel_on_signal(stop.clone()));
        if let (Some(bind), false) = (config.metrics_bind, config.once) {
            let holder = lock_attempt.as_ref().err().cloned();
            tokio::spawn(serve_metrics(bind, metrics.clone(), holder));
        }
        // Held until the process exits. Waiting rather than exiting lets a rolling update
        // overlap without a crash loop, and keeps a second deployment visible (not ready)
        // instead of fighting the first.
        let Some(_lock) = (match lock_attempt {
            Ok(lock) => Some(lock),
            Err(_) => wait_for_instance_lock(&metrics, &stop).await?,
        }) else {
            return Ok(());
        };
        dataplane::probe_kernel(&tables)?;
        host::check_bridge_netfilter();
        dataplane::other_engines::report();
        let observers = start_observers(&config, &tables, &metrics, &stop)?;
        let dataplane = Dataplane::new(tables);
        let node = config.node_name;
        let run_mode = (config.once, config.timing);
        let enforcement = config.enforcement;
        match config.source {
            SourceConfig::Manifests {
                dir,
                max_file_bytes,
                poll_interval,
            } => {
                let source = manifests_source
                    .take()
                    .unwrap_or_else(|| manifests::DirSource::new(dir, max_file_bytes));
                if !config.once {
                    tokio::spawn(source.clone().poll(poll_interval, stop.clone()));
                }
                let target = (dataplane, node, enforcement, observers);
                enforce(source, target, run_mode, metrics, stop).await
            }
            SourceConfig::Kube { kubeconfig } => {
                let client = kube::client(kubeconfig.as_deref()).await?;
                let source = kube::start(client.clone(), (!config.once).then(|| metrics.clone()));
                // Only this node's Node object, for its pod CIDRs (new-pod isolation).
                kube::node::start(client, source.clone(), node.clone());
                let target = (dataplane, node, enforcement, observers);
                enforce(source, target, run_mode, metrics, stop).await
            }
        }
    })
}

/// Syncs `source` into the node: once, or until `stop`.
async fn enforce<S: Source>(
    source: Arc<S>,
    (dataplane, node, enforcement, observers): (Dataplane, String, enforcement::Options, Observers),
    (once, timing): (bool, Timing),
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<()> {
    if once {
        let target = NodeTarget::new(dataplane, node, None, enforcement);
        reconcile::once(source, target, stop).await
    } else {
        let target = NodeTarget::new(dataplane, node, Some(metrics.clone()), enforcement)
            .observed_by(observers.0, observers.1);
        reconcile::run(source, target, timing, Some(metrics), stop).await
    }
}

/// What watches the written state besides the loop: the denied-packet log and the policy
/// counters.
type Observers = (Option<Arc<DeniedLog>>, Option<Arc<PolicyCounters>>);

/// Starts the denied-packet log's reader (after checking the kernel can log, see
/// `dataplane::nflog::probe`) and the policy counters' reader, as configured. A one-shot sync
/// programs the log rules but reads nothing.
fn start_observers(
    config: &RunConfig,
    tables: &dataplane::Tables,
    metrics: &Arc<Metrics>,
    stop: &CancellationToken,
) -> Result<Observers> {
    let denied_log = match &config.enforcement.log_denied {
        Some(log) => {
            let reader = dataplane::nflog::probe(tables, log)?;
            tracing::info!(target: LOG_TARGET, group = log.group, rate = %log.rate, "logging denied packets");
            let denied_log = Arc::new(DeniedLog::default());
            if !config.once {
                denied_log
                    .clone()
                    .spawn_reader(reader, Some(metrics.clone()))?;
            }
            Some(denied_log)
        }
        None => None,
    };
    let policy_counters = match config.policy_counters_interval {
        Some(interval) if !config.once => {
            let counters = Arc::new(PolicyCounters::default());
            tokio::spawn(counters.clone().run(
                tables.clone(),
                interval,
                metrics.clone(),
                stop.clone(),
            ));
            Some(counters)
        }
        _ => None,
    };
    Ok((denied_log, policy_counters))
}

/// Cancels `stop` on SIGTERM or SIGINT: the loop finishes the sync in progress (a batch is never
/// cut in half) and returns.
async fn cancel_on_signal(stop: CancellationToken) {
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
    tracing::info!(target: LOG_TARGET, "signal received: finishing the sync in progress");
    stop.cancel();
}

/// Serves the metrics until the process ends; exits the process if the port cannot be bound.
/// With two agents on one port the clash is the first thing to fail: `holder` says who the other
/// one is.
async fn serve_metrics(bind: std::net::SocketAddr, metrics: Arc<Metrics>, holder: Option<Holder>) {
    if let Err(e) = metrics::serve(bind, metrics).await {
        match holder {
            Some(holder) => {
                tracing::error!(target: LOG_TARGET, "{e:#}; {holder}: two agents on one node would fight, exiting")
            }
            None => tracing::error!(target: LOG_TARGET, "{e:#}"),
        }
        std::process::exit(1);
    }
}

/// Waits until no other instance runs in this network namespace, not ready meanwhile. `None`
/// if told to stop while waiting.
async fn wait_for_instance_lock(
    metrics: &Metrics,
    stop: &CancellationToken,
) -> Result<Option<InstanceLock>> {
    let mut logged = false;
    loop {
        match instance_lock::try_acquire()? {
            Ok(lock) => {
                metrics.set_waiting(None);
                if logged {
                    tracing::info!(target: LOG_TARGET, "the other instance is gone: took over the node lock");
                }
                return Ok(Some(lock));
            }
            Err(holder) => {
                if !logged {
                    tracing::warn!(target: LOG_TARGET,
                        "{holder}: waiting for it to exit; until then this instance writes nothing and is not ready"
                    );
                    logged = true;
                }
                metrics.set_waiting(Some(format!("{holder}; waiting for it to exit")));
                metrics.heartbeat();
                tokio::select! {
                    _ = stop.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}
