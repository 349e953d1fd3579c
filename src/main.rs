use anyhow::Result;
use clap::{Parser, Subcommand};
use kube_netpol_iptables::agent;
use kube_netpol_iptables::dataplane::{self, BackendChoice, render};
use kube_netpol_iptables::manifests;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Kubernetes NetworkPolicy agent for nodes whose kernel lacks nft_queue: enforces policies with
/// ipset and iptables-restore batches, on the legacy or nft iptables backend.
#[derive(Parser)]
#[command(name = "kube-netpol-iptables", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enforce the policies of a manifests directory on this node, and keep enforcing them.
    Run {
        /// Directory of Namespace, Pod and NetworkPolicy manifests (*.yaml, *.yml, *.json).
        #[arg(long, env = "KNI_MANIFESTS")]
        manifests: PathBuf,
        /// This node's name: pods whose spec.nodeName equals it are the ones enforced here.
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Sync once and exit (non-zero if anything could not be written).
        #[arg(long)]
        once: bool,
        /// iptables backend: auto picks the one the host uses, as kube-proxy does.
        #[arg(long, env = "KNI_BACKEND", value_enum, default_value = "auto")]
        backend: BackendChoice,
        /// How often to check the directory for changes.
        #[arg(long, env = "KNI_POLL_INTERVAL", default_value = "200ms", value_parser = parse_duration)]
        poll_interval: Duration,
        /// A burst of changes becomes one sync once the directory has been quiet this long.
        #[arg(long, env = "KNI_SYNC_DEBOUNCE", default_value = "100ms", value_parser = parse_duration)]
        sync_debounce: Duration,
        /// Upper bound on how long a change may wait for the burst to end.
        #[arg(long, env = "KNI_SYNC_MAX_DELAY", default_value = "1s", value_parser = parse_duration)]
        sync_max_delay: Duration,
        /// How often to read the kernel back and repair anything that differs (drift).
        #[arg(long, env = "KNI_RESYNC_PERIOD", default_value = "5m", value_parser = parse_duration)]
        resync_period: Duration,
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
fn parse_duration(s: &str) -> Result<Duration, String> {
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            manifests,
            node_name,
            once,
            backend,
            poll_interval,
            sync_debounce,
            sync_max_delay,
            resync_period,
        } => {
            let tables = dataplane::detect_backend(backend)?;
            tracing::info!(backend = %tables.backend, node = node_name, "starting");
            agent::check_bridge_netfilter();
            let mut dataplane = dataplane::Dataplane::new(tables);
            if once {
                agent::sync_from_dir(
                    &mut dataplane,
                    &manifests,
                    &node_name,
                    dataplane::SyncMode::Full,
                )
                .map(drop)
            } else {
                agent::watch(
                    &mut dataplane,
                    &manifests,
                    &node_name,
                    &agent::WatchOptions {
                        poll_interval,
                        debounce: sync_debounce,
                        max_delay: sync_max_delay,
                        resync_period,
                    },
                )
            }
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
            one => {
                let tables = dataplane::detect_backend(one)?;
                dataplane::remove_rules(&tables)?;
                dataplane::destroy_unused_sets()
            }
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
}
