//! The kernel through its tools: iptables-save/-restore of one backend, `iptables -S`, and ipset,
//! with the xtables lock where the backend needs it. Tools are found once, when [`Tables`] is made.

use super::backend::Backend;
use super::error::{BlamedLine, DataplaneError, Result};
use super::kernel::Kernel;
use super::lock::{DEFAULT_LOCK_WAIT, XTABLES_LOCK, XtablesLock};
use super::render;
use crate::compile::ir::Family;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The iptables-save/-restore binaries of one backend, and ipset.
#[derive(Debug, Clone)]
pub struct Tables {
    pub backend: Backend,
    save: [PathBuf; 2],
    restore: [PathBuf; 2],
    /// Whether iptables-restore takes the xtables lock itself (`--wait`); very old releases
    /// (CentOS 7's 1.4.21) cannot, and then we hold the lock around it.
    restore_waits: bool,
    ipset: Option<PathBuf>,
    /// How long to wait for the xtables lock before giving up on a write.
    pub lock_wait: Duration,
    /// The other backend's tools, looked up on first need and then kept.
    other: Arc<OnceLock<Option<Tables>>>,
}

fn family_index(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

impl Tables {
    /// Finds the tools of `backend`: `iptables-legacy-save` and friends, or on hosts that ship
    /// only one backend under the plain names, `iptables-save` when its version says it is that
    /// backend.
    pub fn find(backend: Backend) -> Option<Tables> {
        // `program` is iptables or ip6tables, `action` save or restore.
        let tool = |program: &str, action: &str| -> Option<PathBuf> {
            if let Some(p) = find_in_path(&format!("{program}-{}-{action}", backend.suffix())) {
                return Some(p);
            }
            let plain = find_in_path(&format!("{program}-{action}"))?;
            let version = Command::new(&plain).arg("--version").output().ok()?;
            let text = String::from_utf8_lossy(&version.stdout).to_string()
                + &String::from_utf8_lossy(&version.stderr);
            let is_nft = text.contains("nf_tables");
            (is_nft == (backend == Backend::Nft)).then_some(plain)
        };
        let save = [tool("iptables", "save")?, tool("ip6tables", "save")?];
        let restore = [tool("iptables", "restore")?, tool("ip6tables", "restore")?];
        let help = Command::new(&restore[0]).arg("--help").output().ok();
        let restore_waits = help.is_some_and(|h| {
            String::from_utf8_lossy(&h.stdout).contains("--wait")
                || String::from_utf8_lossy(&h.stderr).contains("--wait")
        });
        Some(Tables {
            backend,
            save,
            restore,
            restore_waits,
            ipset: find_in_path("ipset"),
            lock_wait: DEFAULT_LOCK_WAIT,
            other: Arc::default(),
        })
    }

    /// `iptables-save -t TABLE`, or nothing when the backend has no such table: asking legacy
    /// iptables for a table creates it, and once any legacy table exists every `iptables-nft`
    /// call on the node warns "iptables-legacy tables present".
    pub(super) fn save_table(&self, family: Family, table: &str) -> Result<String> {
        if !self.has_table(family, table) {
            return Ok(String::new());
        }
        run_tool(&self.save[family_index(family)], &["-t", table], None)
    }

    /// `iptables-save -c -t filter`: the filter table with each rule's packet and byte counters.
    pub fn save_filter_with_counters(&self, family: Family) -> Result<String> {
        if !self.has_table(family, "filter") {
            return Ok(String::new());
        }
        run_tool(
            &self.save[family_index(family)],
            &["-c", "-t", "filter"],
            None,
        )
    }

    /// `iptables-save` of every table.
    pub(super) fn save_all_tables(&self, family: Family) -> Result<String> {
        run_tool(&self.save[family_index(family)], &[], None)
    }

    /// Whether the table exists. Legacy tables are listed by the kernel per network namespace;
    /// nft tables are only listed, never created, by iptables-nft-save.
    fn has_table(&self, family: Family, table: &str) -> bool {
        if self.backend == Backend::Nft {
            return true;
        }
        let names = match family {
            Family::V4 => "/proc/net/ip_tables_names",
            Family::V6 => "/proc/net/ip6_tables_names",
        };
        std::fs::read_to_string(names).is_ok_and(|t| t.lines().any(|l| l.trim() == table))
    }

    fn ipset_bin(&self) -> Result<&Path> {
        self.ipset.as_deref().ok_or(DataplaneError::IpsetMissing)
    }

    /// `iptables` (or `ip6tables`) of this backend, for listing single chains.
    fn list_tool(&self, family: Family) -> Option<PathBuf> {
        list_tool_of(&self.save[family_index(family)])
    }
}

impl Kernel for Tables {
    fn backend(&self) -> Backend {
        self.backend
    }

    fn iptables_save(&self, family: Family) -> Result<String> {
        self.save_table(family, "filter")
    }

    fn iptables_restore(&self, family: Family, text: &str) -> Result<()> {
        let bin = &self.restore[family_index(family)];
        // iptables-nft serialises through nf_tables transactions and never takes the xtables
        // lock; holding it here would only block kube-proxy and the CNI for the whole write.
        if self.backend == Backend::Nft {
            return run_tool(bin, &["--noflush"], Some(text)).map(drop);
        }
        if self.restore_waits {
            let wait = self.lock_wait.as_secs().max(1).to_string();
            run_tool(bin, &["--noflush", "--wait", &wait], Some(text))
                .map(drop)
                .map_err(|e| with_lock_wait(e, self.lock_wait))
        } else {
            let shown = bin.display().to_string();
            let _lock = XtablesLock::acquire(Path::new(XTABLES_LOCK), self.lock_wait, &shown)?;
            run_tool(bin, &["--noflush"], Some(text)).map(drop)
        }
    }

    fn iptables_list(&self, family: Family, chain: &str, rule: Option<usize>) -> Result<String> {
        let bin = self
            .list_tool(family)
            .ok_or(DataplaneError::BackendMissing(self.backend))?;
        // Waits at most a second for the xtables lock where the backend uses it.
        let number = rule.map(|n| n.to_string());
        let mut args = vec!["-w", "1", "-S", chain];
        args.extend(number.as_deref());
        run_tool(&bin, &args, None)
    }

    fn ipset_list_names(&self) -> Result<String> {
        run_tool(self.ipset_bin()?, &["list", "-n"], None)
    }

    fn ipset_save(&self, sets: &[String]) -> Result<String> {
        if sets.is_empty() {
            return Ok(String::new());
        }
        // One process lists them all.
        let batch = render::list_batch(sets);
        run_tool(self.ipset_bin()?, &["-o", "save", "restore"], Some(&batch))
    }

    fn ipset_headers(&self, sets: &[String]) -> Result<String> {
        if sets.is_empty() {
            return Ok(String::new());
        }
        // One process, plain output: `list NAME -t` prints the header and the entry count only.
        let batch = render::list_headers_batch(sets);
        run_tool(self.ipset_bin()?, &["restore"], Some(&batch))
    }

    fn ipset_restore(&self, text: &str) -> Result<()> {
        run_tool(self.ipset_bin()?, &["-exist", "restore"], Some(text)).map(drop)
    }

    fn other_backend(&self) -> Option<Box<dyn Kernel>> {
        let other = self
            .other
            .get_or_init(|| Tables::find(self.backend.other()))
            .clone()?;
        Some(Box::new(Tables {
            lock_wait: self.lock_wait,
            ..other
        }))
    }
}

/// A lock timeout reported by iptables-restore `--wait` carries how long we let it wait.
fn with_lock_wait(e: DataplaneError, wait: Duration) -> DataplaneError {
    match e {
        DataplaneError::LockHeld {
            tool, path, stderr, ..
        } => DataplaneError::LockHeld {
            tool,
            path,
            wait,
            stderr,
        },
        other => other,
    }
}

/// `…/iptables-nft` for `…/iptables-nft-save`.
fn list_tool_of(save: &Path) -> Option<PathBuf> {
    let name = save.file_name()?.to_str()?.strip_suffix("-save")?;
    Some(save.with_file_name(name))
}

/// Runs a tool, feeding `stdin` if given. On failure the error names the command and, when the
/// tool reports a line number, quotes that line of our input.
///
/// Input goes through a private unlinked file (O_TMPFILE, mode 0600), written completely before
/// the tool starts, never through a pipe: if the agent is killed mid-write, a pipe hands the tool
/// everything up to the cut and then EOF, and `ipset restore` applies that last cut line (an
/// address shortened to another address, or a bare `flush`). A file the tool already holds open
/// stays whole whatever happens to us.
fn run_tool(bin: &Path, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let command = format!("{} {}", bin.display(), args.join(" "));
    let input = match stdin {
        Some(text) => Stdio::from(complete_input_file(text.as_bytes())?),
        None => Stdio::null(),
    };
    let child = Command::new(bin)
        .args(args)
        .stdin(input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(DataplaneError::io(format!("cannot run {command}")))?;
    let out = child
        .wait_with_output()
        .map_err(DataplaneError::io(format!("waiting for {command}")))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let status = out.status.to_string();
    // iptables exits with 4 (RESOURCE_PROBLEM) and says so when another process holds the lock.
    if out.status.code() == Some(4) && stderr.contains("xtables lock") {
        return Err(DataplaneError::LockHeld {
            tool: command,
            path: PathBuf::from(XTABLES_LOCK),
            wait: Duration::ZERO,
            stderr,
        });
    }
    let Some(text) = stdin else {
        return Err(DataplaneError::ToolFailed {
            command,
            status,
            stderr,
        });
    };
    let line = failing_line_number(&stderr).and_then(|n| {
        Some(BlamedLine {
            number: n,
            text: text.lines().nth(n.checked_sub(1)?)?.to_string(),
        })
    });
    // Which of our commands was refused, not what the tool said about it.
    if let Some((command_word, set)) = line.as_ref().and_then(|l| render::batch_line_set(&l.text))
        && command_word == "destroy"
    {
        return Err(DataplaneError::SetInUse {
            command,
            status,
            set: set.to_string(),
            stderr,
        });
    }
    Err(DataplaneError::RestoreRejected {
        command,
        status,
        stderr,
        line,
    })
}

/// The line number iptables-restore ("line 7 failed") or ipset ("Error in line 7:") blames.
fn failing_line_number(stderr: &str) -> Option<usize> {
    let words: Vec<&str> = stderr.split_whitespace().collect();
    words.windows(2).find_map(|w| {
        (w[0] == "line")
            .then(|| w[1].trim_end_matches([':', ',']).parse().ok())
            .flatten()
    })
}

/// An anonymous file holding `bytes`, positioned at its start.
fn complete_input_file(bytes: &[u8]) -> Result<std::fs::File> {
    use std::io::{Seek, SeekFrom};
    let mut file =
        tempfile::tempfile().map_err(DataplaneError::io("cannot create a file for a batch"))?;
    file.write_all(bytes)
        .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
        .map_err(DataplaneError::io("cannot write a batch to its file"))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_blamed_line() {
        assert_eq!(
            failing_line_number("iptables-restore: line 7 failed"),
            Some(7)
        );
        assert_eq!(
            failing_line_number(
                "ipset v7.17: Error in line 3: The set with the given name does not exist"
            ),
            Some(3)
        );
        assert_eq!(
            failing_line_number("Another app is currently holding the xtables lock"),
            None
        );
    }

    #[test]
    fn the_list_tool_is_the_save_tool_without_its_suffix() {
        assert_eq!(
            list_tool_of(Path::new("/usr/sbin/ip6tables-nft-save")),
            Some(Path::new("/usr/sbin/ip6tables-nft").to_path_buf())
        );
        assert_eq!(
            list_tool_of(Path::new("/sbin/iptables-save")),
            Some(Path::new("/sbin/iptables").to_path_buf())
        );
    }
}
