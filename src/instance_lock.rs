//! One agent per network namespace. Two agents on one node (the standalone and the Flannel
//! manifests both applied) would rewrite each other's chains and sets on every sync, so a probed
//! flow flaps. The lock is a listening unix socket with an abstract name: abstract sockets belong
//! to the network namespace, the kernel releases the name when the process dies however it dies,
//! and there is no file to go stale.

use std::io;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

/// The abstract socket name (`@kube-netpol-iptables` in `ss -xl`).
pub const NAME: &[u8] = b"kube-netpol-iptables";

/// Proof that this process holds the lock; it holds it until it exits.
#[derive(Debug)]
pub struct InstanceLock {
    _listener: UnixListener,
}

/// Who holds the lock, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder's pid as seen from our pid namespace, when the kernel can tell.
    pub pid: Option<u32>,
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
                _listener: listener,
            }))
        }
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(Err(holder(&addr))),
        Err(e) => Err(e),
    }
}

/// Asks the kernel for the pid of the process listening on `addr` (SO_PEERCRED of a connection).
fn holder(addr: &SocketAddr) -> Holder {
    let pid = UnixStream::connect_addr(addr).ok().and_then(|stream| {
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
        (rc == 0 && cred.pid > 0).then_some(cred.pid as u32)
    });
    Holder { pid }
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
}
