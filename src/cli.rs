//! The command line: clap types, turned into a plain [`Config`] for the application. Nothing else
//! sees clap types. Lives in the library so tests can check deployment manifests against the real
//! parser.

use crate::compile::enforcement::{self, DenyAction};
use crate::compile::explain::{Endpoint, Query};
use crate::compile::new_pod_isolation::NewPodIsolation;
use crate::dataplane::BackendChoice;
use crate::metrics;
use crate::model::{Family, Protocol};
use crate::reconcile::Timing;
use crate::source::manifests;
use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
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
    /// Log lines as text or as one JSON object each.
    #[arg(
        long,
        global = true,
        env = "KNI_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Enforce NetworkPolicies on this node: from the Kubernetes API (in-cluster config or
    /// --kubeconfig), or from a manifests directory with --manifests.
    Run {
        /// Directory of Namespace, Pod, NetworkPolicy, ClusterNetworkPolicy and Node manifests
        /// (*.yaml, *.yml, *.json) to enforce instead of watching the Kubernetes API.
        #[arg(long, env = "KNI_MANIFESTS", conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// Largest manifest file read, in bytes; a larger file fails the load (the last good state
        /// stays). Parsing needs up to about 50 times a file's size in memory; a ConfigMap holds
        /// at most 1 MiB.
        #[arg(long, env = "KNI_MAX_MANIFEST_BYTES", default_value_t = manifests::DEFAULT_MAX_FILE_BYTES,
              value_parser = clap::value_parser!(u64).range(1..))]
        max_manifest_bytes: u64,
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
        backend: BackendFlag,
        /// Address for /metrics, /healthz and /readyz; "off" disables them.
        #[arg(long, env = "KNI_METRICS_BIND_ADDRESS", default_value = metrics::DEFAULT_BIND)]
        metrics_bind_address: String,
        /// How often to check the manifests directory for changes (at most 1h; Kubernetes mode
        /// wakes on watch events instead).
        #[arg(long, env = "KNI_POLL_INTERVAL", default_value = "200ms",
              value_parser = |s: &str| parse_duration_at_most(s, MAX_POLL_INTERVAL))]
        poll_interval: Duration,
        /// A change after a quiet spell this long is synced at once; the changes behind it become
        /// one sync once the source has been quiet this long (at most 1h).
        #[arg(long, env = "KNI_SYNC_DEBOUNCE", default_value = "100ms",
              value_parser = |s: &str| parse_duration_at_most(s, MAX_SYNC_DEBOUNCE))]
        sync_debounce: Duration,
        /// Upper bound on how long a change may wait for the burst to end (at most 1h).
        #[arg(long, env = "KNI_SYNC_MAX_DELAY", default_value = "1s",
              value_parser = |s: &str| parse_duration_at_most(s, MAX_SYNC_MAX_DELAY))]
        sync_max_delay: Duration,
        /// How often to read the kernel back and repair anything that differs (drift; at most 24h).
        #[arg(long, env = "KNI_RESYNC_PERIOD", default_value = "5m",
              value_parser = |s: &str| parse_duration_at_most(s, MAX_RESYNC_PERIOD))]
        resync_period: Duration,
        /// How long to wait for the xtables lock (held by kube-proxy, the CNI, …) before a write
        /// fails and is retried (at most 1h).
        #[arg(long, env = "KNI_XTABLES_WAIT", default_value = "10s",
              value_parser = |s: &str| parse_duration_at_most(s, MAX_XTABLES_WAIT))]
        xtables_wait: Duration,
        /// What happens to traffic no policy allows: drop (the sender times out) or reject (TCP
        /// reset, ICMP port unreachable).
        #[arg(long, env = "KNI_DENY_ACTION", value_enum, default_value = "drop")]
        deny_action: DenyActionFlag,
        /// After a sync that changes the rules, cut the established conntrack flows the new
        /// rules deny (otherwise they go on until they end).
        #[arg(long, env = "KNI_STRICT_MODE", default_value_t = true, action = clap::ArgAction::Set,
              num_args = 0..=1, default_missing_value = "true", require_equals = true)]
        strict_mode: bool,
        /// Drop connections to addresses in this node's pod CIDRs that no known pod holds, until
        /// the pod is known and programmed (`both`: such addresses cannot send either; `off`:
        /// not at all). Off, with a warning, while no pod CIDR is known (--pod-cidr or the Node's
        /// spec.podCIDRs).
        #[arg(
            long,
            env = "KNI_NEW_POD_ISOLATION",
            value_enum,
            default_value = "ingress"
        )]
        new_pod_isolation: NewPodIsolationFlag,
        /// This node's pod CIDR (repeatable; comma-separated in the environment); overrides the
        /// Node object's spec.podCIDRs.
        #[arg(long = "pod-cidr", env = "KNI_POD_CIDRS", value_delimiter = ',')]
        pod_cidrs: Vec<ipnet::IpNet>,
        #[command(flatten)]
        observe: observe::ObserveFlags,
    },
    /// Print the ipset and iptables-restore text `run` would write to a fresh node; touches nothing.
    Render {
        #[arg(long, env = "KNI_MANIFESTS")]
        manifests: PathBuf,
        /// Largest manifest file read, in bytes; a larger file fails the load (the last good state
        /// stays). Parsing needs up to about 50 times a file's size in memory; a ConfigMap holds
        /// at most 1 MiB.
        #[arg(long, env = "KNI_MAX_MANIFEST_BYTES", default_value_t = manifests::DEFAULT_MAX_FILE_BYTES,
              value_parser = clap::value_parser!(u64).range(1..))]
        max_manifest_bytes: u64,
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// As for `run`.
        #[arg(long, env = "KNI_DENY_ACTION", value_enum, default_value = "drop")]
        deny_action: DenyActionFlag,
    },
    /// Say why a flow is allowed or denied: the verdict of the rules the agents would program on
    /// the source's node (egress) and the destination's node (ingress), and which policies and
    /// rules decide. Reads the manifests or lists the cluster once; touches nothing.
    Explain {
        /// Directory of manifests; default: list the Kubernetes API (in-cluster or --kubeconfig).
        #[arg(long, env = "KNI_MANIFESTS", conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// As for `run`.
        #[arg(long, env = "KNI_MAX_MANIFEST_BYTES", default_value_t = manifests::DEFAULT_MAX_FILE_BYTES,
              value_parser = clap::value_parser!(u64).range(1..))]
        max_manifest_bytes: u64,
        /// kubeconfig file for the Kubernetes API; default: in-cluster configuration.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// The source: namespace/pod, or an IP address (no pod's: outside the cluster).
        #[arg(long)]
        from: Endpoint,
        /// The destination: namespace/pod, or an IP address.
        #[arg(long)]
        to: Endpoint,
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: u16,
        #[arg(long, value_enum, default_value = "TCP", ignore_case = true)]
        protocol: ProtocolFlag,
        /// 4 or 6; default: the first family both ends have (IPv4 first).
        #[arg(long, value_parser = ["4", "6"])]
        family: Option<String>,
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFlag,
    },
    /// Remove every chain, jump and set the agent owns (both families), and nothing else.
    Cleanup {
        /// Which backend to clean; auto cleans every installed one.
        #[arg(long, env = "KNI_BACKEND", value_enum, default_value = "auto")]
        backend: BackendFlag,
    },
    /// Print the version.
    Version,
}

/// The largest value each duration flag accepts: beyond these a value is a typo, and near
/// `u64::MAX` seconds the arithmetic on it (deadlines, `resync * 2`) would overflow.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(3600);
pub const MAX_SYNC_DEBOUNCE: Duration = Duration::from_secs(3600);
pub const MAX_SYNC_MAX_DELAY: Duration = Duration::from_secs(3600);
pub const MAX_RESYNC_PERIOD: Duration = Duration::from_secs(24 * 3600);
pub const MAX_XTABLES_WAIT: Duration = Duration::from_secs(3600);

/// Durations like `200ms`, `30s`, `5m`, `1h`, greater than zero and at most `max`.
pub fn parse_duration_at_most(s: &str, max: Duration) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let too_long = || format!("{s:?} is longer than the maximum of {}", show(max));
    let n: u64 = match num.parse() {
        Ok(n) => n,
        // Only digits, and still not a u64: far too long.
        Err(_) if !num.is_empty() => return Err(too_long()),
        Err(_) => return Err(format!("{s:?} is not a duration like 200ms, 30s or 5m")),
    };
    let per_unit: u64 = match unit {
        "ms" => 1,
        "s" | "" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    let d = n
        .checked_mul(per_unit)
        .map(Duration::from_millis)
        .ok_or_else(too_long)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    if d > max {
        return Err(too_long());
    }
    Ok(d)
}

/// `1h`, `30s`, `200ms`: the largest unit that shows `d` exactly.
fn show(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendFlag {
    Auto,
    Legacy,
    Nft,
}

impl From<BackendFlag> for BackendChoice {
    fn from(flag: BackendFlag) -> BackendChoice {
        match flag {
            BackendFlag::Auto => BackendChoice::Auto,
            BackendFlag::Legacy => BackendChoice::Legacy,
            BackendFlag::Nft => BackendChoice::Nft,
        }
    }
}

/// `--deny-action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DenyActionFlag {
    /// Drop silently: the sender times out (what kube-network-policies, Calico and Cilium do,
    /// and what the ClusterNetworkPolicy conformance tests expect).
    Drop,
    /// Answer with a TCP reset, or ICMP(v6) port unreachable for other protocols.
    Reject,
}

impl From<DenyActionFlag> for DenyAction {
    fn from(flag: DenyActionFlag) -> DenyAction {
        match flag {
            DenyActionFlag::Drop => DenyAction::Drop,
            DenyActionFlag::Reject => DenyAction::Reject,
        }
    }
}

/// `--new-pod-isolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NewPodIsolationFlag {
    /// Nothing reaches an unknown address in the pod CIDRs.
    Ingress,
    /// Nothing reaches it and it reaches nothing.
    Both,
    /// Addresses no known pod holds are not treated differently.
    Off,
}

impl From<NewPodIsolationFlag> for NewPodIsolation {
    fn from(flag: NewPodIsolationFlag) -> NewPodIsolation {
        match flag {
            NewPodIsolationFlag::Ingress => NewPodIsolation::Ingress,
            NewPodIsolationFlag::Both => NewPodIsolation::Both,
            NewPodIsolationFlag::Off => NewPodIsolation::Off,
        }
    }
}

/// `--protocol` of `explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum ProtocolFlag {
    Tcp,
    Udp,
    Sctp,
}

impl From<ProtocolFlag> for Protocol {
    fn from(flag: ProtocolFlag) -> Protocol {
        match flag {
            ProtocolFlag::Tcp => Protocol::Tcp,
            ProtocolFlag::Udp => Protocol::Udp,
            ProtocolFlag::Sctp => Protocol::Sctp,
        }
    }
}

/// `--output` of `explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFlag {
    Text,
    Json,
}

/// What to do, as plain values: the command line checked and decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Config {
    Run(RunConfig),
    Render {
        manifests: PathBuf,
        max_manifest_bytes: u64,
        node_name: String,
        deny_action: DenyAction,
    },
    Cleanup {
        backend: BackendChoice,
    },
    Explain {
        /// `None`: the Kubernetes API, from this kubeconfig or the in-cluster configuration.
        manifests: Option<PathBuf>,
        max_manifest_bytes: u64,
        kubeconfig: Option<PathBuf>,
        query: Query,
        json: bool,
    },
    Version,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    pub source: SourceConfig,
    pub node_name: String,
    /// Sync once and exit.
    pub once: bool,
    pub backend: BackendChoice,
    /// Where to serve /metrics, /healthz and /readyz; `None`: not at all.
    pub metrics_bind: Option<SocketAddr>,
    pub timing: Timing,
    pub xtables_wait: Duration,
    /// Deny action, strict mode, new-pod isolation, denied-packet log.
    pub enforcement: enforcement::Options,
    /// How often the policy chains' counters are read; `None`: never.
    pub policy_counters_interval: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    Manifests {
        dir: PathBuf,
        max_file_bytes: u64,
        poll_interval: Duration,
    },
    /// The Kubernetes API, from this kubeconfig or the in-cluster configuration.
    Kube { kubeconfig: Option<PathBuf> },
}

impl Cli {
    /// The configuration the command line asks for, or why it is not usable.
    pub fn into_config(self) -> Result<Config> {
        Ok(match self.command {
            Command::Run {
                manifests,
                max_manifest_bytes,
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
                deny_action,
                strict_mode,
                new_pod_isolation,
                pod_cidrs,
                observe,
            } => {
                let Some(node_name) = node_name.filter(|n| !n.is_empty()) else {
                    bail!(
                        "no node name: pass --node-name or set NODE_NAME (the DaemonSet sets it from spec.nodeName)"
                    );
                };
                let metrics_bind = match metrics_bind_address.as_str() {
                    "off" | "" => None,
                    addr => Some(addr.parse().map_err(|_| {
                        anyhow::anyhow!("--metrics-bind-address {addr:?} is not an address like 0.0.0.0:9847 (or \"off\")")
                    })?),
                };
                let source = match manifests {
                    Some(dir) => SourceConfig::Manifests {
                        dir,
                        max_file_bytes: max_manifest_bytes,
                        poll_interval,
                    },
                    None => SourceConfig::Kube { kubeconfig },
                };
                Config::Run(RunConfig {
                    source,
                    node_name,
                    once,
                    backend: backend.into(),
                    metrics_bind,
                    timing: Timing {
                        debounce: sync_debounce,
                        max_delay: sync_max_delay,
                        resync_period,
                    },
                    xtables_wait,
                    enforcement: enforcement::Options {
                        deny_action: deny_action.into(),
                        strict_mode,
                        new_pod_isolation: new_pod_isolation.into(),
                        pod_cidrs,
                        log_denied: observe.log_denied(),
                    },
                    policy_counters_interval: observe.policy_counters_interval(),
                })
            }
            Command::Render {
                manifests,
                max_manifest_bytes,
                node_name,
                deny_action,
            } => Config::Render {
                manifests,
                max_manifest_bytes,
                node_name,
                deny_action: deny_action.into(),
            },
            Command::Explain {
                manifests,
                max_manifest_bytes,
                kubeconfig,
                from,
                to,
                port,
                protocol,
                family,
                output,
            } => Config::Explain {
                manifests,
                max_manifest_bytes,
                kubeconfig,
                query: Query {
                    from,
                    to,
                    protocol: protocol.into(),
                    port,
                    family: family.map(|f| if f == "6" { Family::V6 } else { Family::V4 }),
                },
                json: output == OutputFlag::Json,
            },
            Command::Cleanup { backend } => Config::Cleanup {
                backend: backend.into(),
            },
            Command::Version => Config::Version,
        })
    }
}

mod observe;
#[cfg(test)]
mod tests;
