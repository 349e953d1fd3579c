//! The xtables lock: an exclusive flock on `/run/xtables.lock`, which every iptables user shares.
//! Held around a legacy restore only when the iptables release cannot wait for it itself.

use super::error::{DataplaneError, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long we wait by default for the xtables lock that other iptables users (kube-proxy, the
/// CNI) take.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(10);
pub const XTABLES_LOCK: &str = "/run/xtables.lock";

pub struct XtablesLock(std::fs::File);

impl XtablesLock {
    /// Waits at most `wait` for the lock; `tool` is what we hold it for (named in the error).
    pub fn acquire(path: &Path, wait: Duration, tool: &str) -> Result<XtablesLock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(DataplaneError::io(format!(
                "cannot open the xtables lock {}",
                path.display()
            )))?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(XtablesLock(file)),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(DataplaneError::LockHeld {
                        tool: tool.to_string(),
                        path: PathBuf::from(path),
                        wait,
                        stderr: String::new(),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(DataplaneError::io(format!(
                        "cannot lock {}",
                        path.display()
                    ))(e));
                }
            }
        }
    }
}

impl Drop for XtablesLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_times_out_as_lock_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xtables.lock");
        let held = XtablesLock::acquire(&path, Duration::ZERO, "test").unwrap();
        let err = XtablesLock::acquire(&path, Duration::from_millis(120), "iptables-restore")
            .err()
            .expect("held by `held`");
        assert_eq!(err.metric_label(), "lock_held");
        assert!(err.to_string().contains("iptables-restore"), "{err}");
        drop(held);
        assert!(XtablesLock::acquire(&path, Duration::ZERO, "test").is_ok());
    }
}
