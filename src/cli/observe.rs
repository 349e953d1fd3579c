//! The observability flags of `run`: the denied-packet log and the policy counters' interval.

use crate::compile::log_denied::{self, LogDenied, Rate};
use crate::reconcile::policy_counters;
use clap::Args;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ObserveFlags {
    /// Log denied packets: each drop is copied (rate-limited per pod, see --log-denied-rate) to
    /// an NFLOG group the agent reads, and logged with the pods, protocol, port, direction and
    /// the policies that isolate the pod. Needs the xt_NFLOG, xt_limit and nfnetlink_log modules.
    #[arg(long, env = "KNI_LOG_DENIED", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub log_denied: bool,
    /// The NFLOG group denied packets are sent to (no other process may read it).
    #[arg(long, env = "KNI_NFLOG_GROUP", default_value_t = log_denied::DEFAULT_GROUP)]
    pub nflog_group: u16,
    /// Denied packets logged at most, per pod and direction: N/s, optionally ",burst=B"
    /// (default burst: 2N).
    #[arg(long, env = "KNI_LOG_DENIED_RATE", default_value_t = Rate::default())]
    pub log_denied_rate: Rate,
    /// How often the policy chains' rule counters are read for
    /// kni_policy_allowed_packets_total (one iptables-save -c per family; "0s" or "off": never).
    #[arg(long, env = "KNI_POLICY_COUNTERS_INTERVAL", default_value = "30s",
          value_parser = parse_interval)]
    pub policy_counters_interval: Duration,
}

impl ObserveFlags {
    pub fn log_denied(&self) -> Option<LogDenied> {
        self.log_denied.then_some(LogDenied {
            group: self.nflog_group,
            rate: self.log_denied_rate,
        })
    }

    /// `None`: not read at all.
    pub fn policy_counters_interval(&self) -> Option<Duration> {
        (!self.policy_counters_interval.is_zero()).then_some(self.policy_counters_interval)
    }
}

/// A duration up to 1h, or `0s`/`off`: never.
fn parse_interval(s: &str) -> Result<Duration, String> {
    match s.trim() {
        "0" | "0s" | "off" => Ok(Duration::ZERO),
        s => super::parse_duration_at_most(s, Duration::from_secs(3600)),
    }
}

/// `DEFAULT_INTERVAL` is the flag's default, spelled out above for clap.
const _: () = assert!(policy_counters::DEFAULT_INTERVAL.as_secs() == 30);
