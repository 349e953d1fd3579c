//! Checks and settings of the host the agent runs on, done once at start.

/// The log target from before the module layout of issue 10, kept so users' log filters still
/// match.
const LOG_TARGET: &str = "kube_netpol_iptables::agent";

/// Says loudly when bridged pod traffic would bypass iptables.
pub fn check_bridge_netfilter() {
    let path = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => tracing::warn!(target: LOG_TARGET,
            "{path} is 0: with a bridging CNI (e.g. Flannel's cni0) traffic between pods of this node bypasses iptables and policies do not apply to it; set net.bridge.bridge-nf-call-iptables=1 (kube-proxy needs it too)"
        ),
        Err(_) => tracing::warn!(target: LOG_TARGET,
            "br_netfilter is not loaded: with a bridging CNI (e.g. Flannel's cni0) traffic between pods of this node bypasses iptables; run `modprobe br_netfilter` and set net.bridge.bridge-nf-call-iptables=1 (routing CNIs do not need it)"
        ),
    }
}

/// Raises the soft limit on open files to the hard limit, as Go programs (kube-proxy, kubelet) do
/// at start: the default soft limit of 1024 is easily reached by a node's worth of work.
pub fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
