//! The dataplane's errors: one enum, so callers tell a held lock from a missing kernel feature or
//! a rejected batch by its variant, and metrics label failures by kind.

use std::path::PathBuf;
use std::time::Duration;

use super::backend::Backend;

/// A line of our own input that a tool blamed ("line 7 failed", "Error in line 7:").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlamedLine {
    pub number: usize,
    pub text: String,
}

/// One kernel feature the probe found missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingFeature {
    pub what: &'static str,
    pub module: &'static str,
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "the {0} iptables backend is not installed (no iptables-{0}-restore, ip6tables-{0}-restore and -save found in PATH)"
    )]
    BackendMissing(Backend),
    #[error("no iptables found: install iptables (with iptables-restore and ip6tables-restore)")]
    NoIptables,
    #[error("ipset is not installed (install the ipset package)")]
    IpsetMissing,
    /// Another iptables user held the xtables lock longer than we wait.
    #[error("{tool}: another process held the xtables lock {path} for more than {wait:?}{}", stderr_suffix(.stderr))]
    LockHeld {
        tool: String,
        path: PathBuf,
        wait: Duration,
        /// What the tool said, when it waited itself (`--wait`).
        stderr: String,
    },
    #[error(
        "the kernel lacks features the agent needs, so nothing was programmed:\n{}\nLoad the modules on the node (modprobe MODULE) or use a kernel that has them.",
        .0.iter().map(|f| format!("- {} (kernel module {}): {}", f.what, f.module, f.error)).collect::<Vec<_>>().join("\n")
    )]
    FeatureMissing(Vec<MissingFeature>),
    /// A restore batch was refused; the kernel kept what it had (restores are atomic per table).
    #[error("{command} failed ({status}): {stderr}{}", blamed_suffix(.line))]
    RestoreRejected {
        command: String,
        status: String,
        stderr: String,
        line: Option<BlamedLine>,
    },
    /// `ipset destroy` refused: a rule (ours in another backend, or someone else's) still uses it.
    #[error("{command} failed ({status}): set {set} is still in use: {stderr}")]
    SetInUse {
        command: String,
        status: String,
        set: String,
        stderr: String,
    },
    /// A tool that reads (save, list) failed.
    #[error("{command} failed ({status}): {stderr}")]
    ToolFailed {
        command: String,
        status: String,
        stderr: String,
    },
    /// A set of ours has another type or family in the kernel than its name encodes.
    #[error(
        "set {name} exists in the kernel as {found}, not {wanted}; something else changed it (run `kube-netpol-iptables cleanup` and sync again)"
    )]
    SetConflict {
        name: String,
        found: String,
        wanted: String,
    },
    /// A batch line that does not name a set of ours (a bare `flush` or `destroy` acts on all sets).
    #[error(
        "refusing to run an ipset batch whose line {number} does not name a set of ours: {text:?}"
    )]
    UnsafeBatch { number: usize, text: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

fn blamed_suffix(line: &Option<BlamedLine>) -> String {
    line.as_ref()
        .map(|l| format!("\n  input line {}: {}", l.number, l.text))
        .unwrap_or_default()
}

impl DataplaneError {
    /// A short, fixed label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            DataplaneError::BackendMissing(_) => "backend_missing",
            DataplaneError::NoIptables => "no_iptables",
            DataplaneError::IpsetMissing => "ipset_missing",
            DataplaneError::LockHeld { .. } => "lock_held",
            DataplaneError::FeatureMissing(_) => "feature_missing",
            DataplaneError::RestoreRejected { .. } => "restore_rejected",
            DataplaneError::SetInUse { .. } => "set_in_use",
            DataplaneError::ToolFailed { .. } => "tool_failed",
            DataplaneError::SetConflict { .. } => "set_conflict",
            DataplaneError::UnsafeBatch { .. } => "unsafe_batch",
            DataplaneError::Io { .. } => "io",
        }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DataplaneError {
        let what = what.into();
        move |source| DataplaneError::Io { what, source }
    }
}

pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;
