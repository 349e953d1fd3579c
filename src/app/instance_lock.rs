//! One agent per network namespace. Two agents on one node (the standalone and the Flannel
//! manifests both applied) would rewrite each other's chains and sets on every sync, so a probed
//! flow flaps. The lock is a listening unix socket with an abstract name: abstract sockets belong
//! to the network namespace, the kernel releases the name when the process dies however it dies,
//! and there is no file to go stale.

use std::io;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

/// The log target from before the module layout of issue 10, kept so users' log filters still
/// match.
const LOG_TARGET: &str = "kube_netpol_iptables::instance_lock";

/// The abstract socket name (`@kube-netpol-iptables` in `ss -xl`).
pub const NAME: &[u8] = b"kube-netpol-iptables";

/// Proof that this process may write: it holds the lock until it exits, or (`None`) the name is
/// squatted by something that is no agent (see [`try_acquire`]).
#[derive(Debug)]
pub struct InstanceLock {
    _listener: Option<UnixListener>,
}

/// Who holds the lock, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder's pid as seen from our pid namespace, when the kernel can tell.
    pub pid: Option<u32>,
    /// The holder's user, when it answers (an agent always does: it listens).
    pub uid: Option<u32>,
}

impl Holder {
    /// An agent listens on the name and runs as the same user as we do (root, or the user the
    /// DaemonSet gives it). Anything else holding the name is a squatter: abstract socket names
    /// have no permissions, so any process in the network namespace could take it.
    fn is_agent(&self) -> bool {
        // SAFETY: geteuid cannot fail.
        self.uid == Some(unsafe { libc::geteuid() })
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(
                f,
                "another instance holds the node lock @{} (pid {pid})",
                String::from_utf8_lossy(NAME)
            ),
            None => write!(
                f,
                "another instance holds the node lock @{} (in another pid namespace)",
                String::from_utf8_lossy(NAME)
            ),
        }
    }
}

/// Takes the lock of this network namespace, or says who holds it.
pub fn try_acquire() -> io::Result<Result<InstanceLock, Holder>> {
    let addr = SocketAddr::from_abstract_name(NAME)?;
    match UnixListener::bind_addr(&addr) {
        Ok(listener) => {
            // Whoever asks who holds the lock connects; accepting and closing keeps the backlog
            // empty. The thread owns a clone, so the name stays bound until the process exits.
            let answering = listener.try_clone()?;
            std::thread::Builder::new()
                .name("instance-lock".into())
                .spawn(move || {
                    for connection in answering.incoming() {
                        drop(connection);
                    }
                })?;
            Ok(Ok(InstanceLock {
                _listener: Some(listener),
            }))
        }
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let holder = holder(&addr);
            if holder.is_agent() {
                return Ok(Err(holder));
            }
            // Waiting for a squatter would let it switch enforcement off; going on is what an
            // unprivileged process cannot stop. (A second agent still finds the name taken.)
            tracing::warn!(target: LOG_TARGET,
                pid = holder.pid,
                uid = holder.uid,
                "the node lock @{} is held by a process that is no agent (it does not answer, or runs as another user): ignoring it",
                String::from_utf8_lossy(NAME)
            );
            Ok(Ok(InstanceLock { _listener: None }))
        }
        Err(e) => Err(e),
    }
}

/// Asks the kernel who listens on `addr` (SO_PEERCRED of a connection). A name bound but not
/// listening answers nothing; an agent listens as part of binding, so a refusal is retried briefly.
fn holder(addr: &SocketAddr) -> Holder {
    let connected = (0..5).find_map(|attempt| {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        UnixStream::connect_addr(addr).ok()
    });
    let cred = connected.and_then(|stream| {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: a valid socket and a buffer of the size passed.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(cred)
    });
    Holder {
        pid: cred.filter(|c| c.pid > 0).map(|c| c.pid as u32),
        uid: cred.map(|c| c.uid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_taker_in_the_namespace_is_told_who_holds_it() {
        // In a network namespace of its own, so a real agent on this machine does not interfere.
        std::thread::spawn(|| {
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("skipped: unshare(CLONE_NEWNET) needs root");
                return;
            }
            let _first = try_acquire().unwrap().expect("free in a new namespace");
            let holder = try_acquire().unwrap().unwrap_err();
            assert_eq!(holder.pid, Some(std::process::id()));
            assert!(
                holder
                    .to_string()
                    .contains(&format!("(pid {})", std::process::id()))
            );
            // Asking again and again leaves nothing queued to block the next question.
            for _ in 0..300 {
                assert!(try_acquire().unwrap().is_err());
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_squatter_that_is_no_agent_cannot_keep_the_agent_waiting() {
        std::thread::spawn(|| {
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!("skipped: unshare(CLONE_NEWNET) needs root");
                return;
            }
            // Any process can bind the abstract name without listening on it.
            let squatter = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            assert!(squatter >= 0);
            let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (i, b) in NAME.iter().enumerate() {
                addr.sun_path[i + 1] = *b as libc::c_char;
            }
            let len = (std::mem::size_of::<libc::sa_family_t>() + 1 + NAME.len()) as u32;
            let rc =
                unsafe { libc::bind(squatter, (&addr as *const libc::sockaddr_un).cast(), len) };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
            // The name is taken, but by no agent: this instance goes on.
            let lock = try_acquire().unwrap();
            assert!(lock.is_ok(), "a squatter kept the agent waiting: {lock:?}");
            unsafe { libc::close(squatter) };
        })
        .join()
        .unwrap();
    }
}
