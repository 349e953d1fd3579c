//! The dataplane: reads what the kernel holds of ours, writes the difference in one
//! `ipset restore` and one `iptables-restore --noflush` per family, and removes what we own.
//!
//! Order of a sync: sets are created and filled first (so no rule ever points at a missing set),
//! then the rules of each family are replaced in one atomic restore, and sets that no rule uses
//! any more are destroyed last.

mod canary;
pub mod conntrack;
mod ipset;
pub mod kernel;
pub mod other_engines;
pub mod render;

use ipset::{destroy_sets, ipset_restore, ipset_save};
use ipset::{destroy_unused_sets, warn_foreign_sets};

use crate::state::{DesiredState, Family};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Legacy,
    Nft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Legacy, Backend::Nft];

    fn suffix(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }

    pub fn other(self) -> Backend {
        match self {
            Backend::Legacy => Backend::Nft,
            Backend::Nft => Backend::Legacy,
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.suffix())
    }
}

/// How long we wait by default for the xtables lock that other iptables users (kube-proxy, the
/// CNI) take.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(10);
const XTABLES_LOCK: &str = "/run/xtables.lock";

/// The iptables-save/-restore binaries of one backend.
#[derive(Debug, Clone)]
pub struct Tables {
    pub backend: Backend,
    save: [PathBuf; 2],
    restore: [PathBuf; 2],
    /// Whether iptables-restore takes the xtables lock itself (`--wait`); very old releases
    /// (CentOS 7's 1.4.21) cannot, and then we hold the lock around it.
    restore_waits: bool,
    /// How long to wait for the xtables lock before giving up on a write.
    pub lock_wait: Duration,
}

fn family_index(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
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
            lock_wait: DEFAULT_LOCK_WAIT,
        })
    }

    pub fn save(&self, family: Family) -> Result<String> {
        self.save_table(family, "filter")
    }

    /// `iptables` (or `ip6tables`) of this backend, for listing single chains.
    fn list_tool(&self, family: Family) -> Option<PathBuf> {
        list_tool_of(&self.save[family_index(family)])
    }

    /// `iptables-save -t TABLE`, or nothing when the backend has no such table: asking legacy
    /// iptables for a table creates it, and once any legacy table exists every `iptables-nft`
    /// call on the node warns "iptables-legacy tables present".
    fn save_table(&self, family: Family, table: &str) -> Result<String> {
        if !self.has_table(family, table) {
            return Ok(String::new());
        }
        run_tool(&self.save[family_index(family)], &["-t", table], None)
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

    pub fn restore(&self, family: Family, text: &str) -> Result<()> {
        let bin = &self.restore[family_index(family)];
        // iptables-nft serialises through nf_tables transactions and never takes the xtables
        // lock; holding it here would only block kube-proxy and the CNI for the whole write.
        if self.backend == Backend::Nft {
            return run_tool(bin, &["--noflush"], Some(text)).map(drop);
        }
        if self.restore_waits {
            let wait = self.lock_wait.as_secs().max(1).to_string();
            run_tool(bin, &["--noflush", "--wait", &wait], Some(text)).map(drop)
        } else {
            let _lock = XtablesLock::acquire(Path::new(XTABLES_LOCK), self.lock_wait)?;
            run_tool(bin, &["--noflush"], Some(text)).map(drop)
        }
    }

    /// Rules in this backend (both families) that are not ours: how much the host uses it.
    fn foreign_rule_count(&self) -> usize {
        Family::ALL
            .iter()
            .filter_map(|f| run_tool(&self.save[family_index(*f)], &[], None).ok())
            .flat_map(|t| t.lines().map(str::to_owned).collect::<Vec<_>>())
            .filter(|l| l.starts_with("-A ") && !l.contains(crate::names::PREFIX))
            .count()
    }

    /// Whether kubelet or kube-proxy left their marker chains here (what kube-proxy's
    /// iptables-wrapper looks for first).
    fn has_kubelet_canary(&self) -> bool {
        Family::ALL.iter().any(|f| {
            self.save_table(*f, "mangle")
                .map(|t| {
                    t.lines().any(|l| {
                        l.starts_with(":KUBE-IPTABLES-HINT")
                            || l.starts_with(":KUBE-KUBELET-CANARY")
                    })
                })
                .unwrap_or(false)
        })
    }
}

/// `…/iptables-nft` for `…/iptables-nft-save`.
fn list_tool_of(save: &Path) -> Option<PathBuf> {
    let name = save.file_name()?.to_str()?.strip_suffix("-save")?;
    Some(save.with_file_name(name))
}

/// Picks the backend the host uses, the way kube-proxy's iptables-wrapper does: the one where
/// kubelet's canary chains live, else the one holding more rules (ours not counted), nft on a tie.
pub fn detect_backend(choice: BackendChoice) -> Result<Tables> {
    let pick = |b: Backend| {
        Tables::find(b).ok_or_else(|| {
            anyhow!("the {b} iptables backend is not installed (no iptables-{b}-restore, ip6tables-{b}-restore and -save found in PATH)")
        })
    };
    match choice {
        BackendChoice::Legacy => pick(Backend::Legacy),
        BackendChoice::Nft => pick(Backend::Nft),
        BackendChoice::Auto => {
            let found: Vec<Tables> = Backend::ALL
                .iter()
                .filter_map(|b| Tables::find(*b))
                .collect();
            match found.len() {
                0 => bail!(
                    "no iptables found: install iptables (with iptables-restore and ip6tables-restore)"
                ),
                1 => Ok(found.into_iter().next().unwrap()),
                _ => {
                    let (legacy, nft) = (&found[0], &found[1]);
                    let chosen = if nft.has_kubelet_canary() {
                        nft
                    } else if legacy.has_kubelet_canary()
                        || legacy.foreign_rule_count() > nft.foreign_rule_count()
                    {
                        legacy
                    } else {
                        nft
                    };
                    Ok(chosen.clone())
                }
            }
        }
    }
}

/// An exclusive flock on the xtables lock file, the lock every iptables user shares.
struct XtablesLock(std::fs::File);

impl XtablesLock {
    fn acquire(path: &Path, wait: Duration) -> Result<XtablesLock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open the xtables lock {}", path.display()))?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(XtablesLock(file)),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    bail!(
                        "another process held the xtables lock {} for more than {wait:?}",
                        path.display()
                    )
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()));
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

/// Runs a tool, feeding `stdin` if given. On failure the error names the command and, when the
/// tool reports a line number, quotes that line of our input.
///
/// Input goes through a private unlinked file (O_TMPFILE, mode 0600), written completely before
/// the tool starts, never through a pipe: if the agent is killed mid-write, a pipe hands the tool
/// everything up to the cut and then EOF, and `ipset restore` applies that last cut line (an
/// address shortened to another address, or a bare `flush`). A file the tool already holds open
/// stays whole whatever happens to us.
pub(crate) fn run_tool(bin: &Path, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let shown = format!("{} {}", bin.display(), args.join(" "));
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
        .with_context(|| format!("cannot run {shown}"))?;
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {shown}"))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let offending = stdin.and_then(|text| {
        failing_line_number(&stderr).and_then(|n| {
            text.lines()
                .nth(n.checked_sub(1)?)
                .map(|l| (n, l.to_string()))
        })
    });
    match offending {
        Some((n, line)) => bail!(
            "{shown} failed ({}): {stderr}\n  input line {n}: {line}",
            out.status
        ),
        None => bail!("{shown} failed ({}): {stderr}", out.status),
    }
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
    let mut file = tempfile::tempfile().context("cannot create a temporary file for a batch")?;
    file.write_all(bytes)
        .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
        .context("cannot write a batch to its temporary file")?;
    Ok(file)
}

/// What one sync wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub ipset_lines: usize,
    pub iptables_lines: usize,
    /// Differences between the kernel and what we had written, found by a full sync.
    pub repairs: Vec<String>,
    /// Chains of ours kept (emptied) because someone else's rule still jumps to them.
    pub retained_chains: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Diff against what we last wrote; touches the kernel only where the desired state changed.
    Incremental,
    /// Read the kernel back first and repair whatever differs (drift), then clean the other backend.
    Full,
}

/// Writes desired state to one backend and remembers what it wrote, so the next sync can write
/// only the difference.
pub struct Dataplane {
    pub tables: Tables,
    /// What the kernel holds of ours after our last successful write. `None` after a failure or at
    /// start: the next sync then reads the kernel.
    applied: Option<kernel::View>,
    /// Sets we no longer use that could not be destroyed yet (still referenced by someone else).
    undestroyed: BTreeSet<String>,
    /// Chains we no longer use, kept empty because someone else's rule jumps to them.
    retained: BTreeSet<(Family, String)>,
    /// Objects under our prefix that are not ours, already warned about.
    warned_foreign: BTreeSet<String>,
    /// Deny action, strict mode and new-pod isolation, applied by the sync path
    /// (`agent::sync_snapshot`).
    pub enforcement: crate::enforcement::Options,
}

impl Dataplane {
    pub fn new(tables: Tables) -> Dataplane {
        Dataplane {
            tables,
            applied: None,
            undestroyed: BTreeSet::new(),
            retained: BTreeSet::new(),
            warned_foreign: BTreeSet::new(),
            enforcement: Default::default(),
        }
    }

    /// Warns once per chain we had to keep, and forgets those that are gone. Only a full sync
    /// sees references, so an incremental one keeps the list as it is.
    fn note_retained(
        &mut self,
        seen: BTreeSet<(Family, String)>,
        full: bool,
        report: &mut SyncReport,
    ) {
        if full {
            for (family, chain) in seen.difference(&self.retained) {
                tracing::warn!(
                    %family,
                    chain = chain.as_str(),
                    "a chain we no longer use is still the target of someone else's rule: kept empty (it allows nothing) until that rule goes"
                );
            }
            self.retained = seen;
        }
        report.retained_chains = self.retained.len();
    }

    /// Reads our part of the kernel: the filter tables first, then our sets (the registry's,
    /// those our rules use, and those named exactly as a set we want, or its scratch copy: we
    /// cannot program the name without taking it over, and nobody else derives it). Objects under
    /// our prefix that are not ours are warned about once.
    fn read_kernel(&mut self, want: &kernel::View) -> Result<kernel::View> {
        let mut view = kernel::View::default();
        let mut used: BTreeSet<String> = want
            .sets
            .sets
            .keys()
            .flat_map(|n| [n.clone(), crate::names::temporary_set(n)])
            .collect();
        for family in Family::ALL {
            let table = kernel::parse_iptables_save(&self.tables.save(family)?);
            used.extend(table.sets_used.iter().cloned());
            let new: Vec<&String> = table
                .foreign
                .iter()
                .filter(|c| !self.warned_foreign.contains(&format!("{family} {c}")))
                .collect();
            warn_foreign_chains(family, new.iter().copied());
            self.warned_foreign
                .extend(table.foreign.iter().map(|c| format!("{family} {c}")));
            view.tables.insert(family, table);
        }
        let (sets, foreign) = ipset_save(&used)?;
        warn_foreign_sets(foreign.iter().filter(|s| !self.warned_foreign.contains(*s)));
        self.warned_foreign.extend(foreign);
        view.sets = sets;
        Ok(view)
    }

    /// Brings the kernel to `desired` (one state per family). Sets are created and filled first,
    /// then each family's rules are replaced in one atomic restore, then sets no rule uses any more
    /// are destroyed. On failure the kernel keeps what it had (each restore is atomic per table)
    /// and the next sync reads the kernel again.
    pub fn sync(
        &mut self,
        desired: &[(Family, DesiredState)],
        mode: SyncMode,
    ) -> Result<SyncReport> {
        // Rendered once: diffed against the kernel now, remembered as what we wrote afterwards.
        let mut want = kernel::View::of_desired(desired);
        let incremental = mode == SyncMode::Incremental && self.applied.is_some();
        let mut result = self.sync_inner(desired, &mut want, mode);
        if incremental && let Err(e) = &result {
            // What we remember does not show what others did since (e.g. a rule of theirs that
            // now jumps to a chain we are deleting): read the kernel and try once more.
            tracing::info!("incremental write failed, retrying with a full sync: {e:#}");
            result = self.sync_inner(desired, &mut want, SyncMode::Full);
        }
        self.applied = result.is_ok().then_some(want);
        result
    }

    fn sync_inner(
        &mut self,
        desired: &[(Family, DesiredState)],
        want: &mut kernel::View,
        mode: SyncMode,
    ) -> Result<SyncReport> {
        let mut report = SyncReport::default();
        let full = mode == SyncMode::Full || self.applied.is_none();
        // Replaced by `sync` whatever happens, so it is taken rather than copied.
        let view = match (self.applied.take(), full) {
            (Some(applied), false) => applied,
            (believed, _) => {
                let actual = self.read_kernel(want)?;
                if let Some(believed) = &believed {
                    // Sets we could not destroy yet are known leftovers, not drift.
                    report.repairs = believed
                        .drift_from(&actual)
                        .into_iter()
                        .filter(|d| {
                            !self
                                .undestroyed
                                .iter()
                                .chain(self.retained.iter().map(|(_, c)| c))
                                .any(|n| d.contains(n.as_str()))
                        })
                        .collect();
                }
                actual
            }
        };

        let update = render::render_ipset_update(desired.iter().map(|(_, s)| s), &view.sets)
            .map_err(|e| anyhow!(e))?;
        ipset_restore(&update)?;
        report.ipset_lines += update.lines().count();
        // Sets updated in place keep the size they were created with; remember that one.
        render::keep_kernel_set_sizes(&mut want.sets, &view.sets);

        let empty = kernel::KernelTable::default();
        let mut retained = BTreeSet::new();
        for (family, _) in desired {
            let have = view.tables.get(family).unwrap_or(&empty);
            retained.extend(
                have.chains
                    .iter()
                    .filter(|c| !want.tables[family].chains.contains(c))
                    .filter(|c| have.referenced.contains(*c))
                    .map(|c| (*family, c.clone())),
            );
            if let Some(text) = render::render_iptables(&want.tables[family], have) {
                self.tables
                    .restore(*family, &text)
                    .with_context(|| format!("writing {family} rules"))?;
                report.iptables_lines += text.lines().count();
            }
        }

        self.note_retained(retained, full, &mut report);

        // Our rules belong in one backend only. Leftovers in the other (from a run with another
        // --backend, or before the host switched) would judge packets twice and keep sets in use.
        if full
            && let Some(other) = Tables::find(self.tables.backend.other())
            && remove_rules(&other)?
        {
            tracing::info!(backend = %other.backend, "removed our leftover rules from the other iptables backend");
        }

        // Sets no rule of ours uses any more, plus those an earlier sync could not destroy.
        let wanted: BTreeSet<&String> = desired.iter().flat_map(|(_, s)| s.sets.keys()).collect();
        let mut stale: BTreeSet<String> = view
            .sets
            .sets
            .keys()
            .filter(|n| !wanted.contains(n))
            .cloned()
            .collect();
        stale.extend(
            self.undestroyed
                .iter()
                .filter(|n| !wanted.contains(n))
                .cloned(),
        );
        report.ipset_lines += stale.len();
        self.undestroyed = destroy_sets(&stale);
        Ok(report)
    }
}

/// A kernel feature the agent relies on, how to test for it, and the module that provides it.
struct Feature {
    what: &'static str,
    module: &'static str,
    /// Rule (without `-A CHAIN`) for the probe chain; `None` for set types.
    rule: Option<&'static str>,
    /// Set type to create; `None` for matches and targets.
    set: Option<(&'static str, &'static str)>,
}

const PROBE_SET_V4: &str = "KNI-PROBE-NET4";
const PROBE_SET_V6: &str = "KNI-PROBE-NET6";
const PROBE_CHAIN: &str = "KNI-PROBE";

const FEATURES: &[Feature] = &[
    Feature {
        what: "ipset type hash:net (IPv4)",
        module: "ip_set_hash_net",
        rule: None,
        set: Some(("hash:net", "inet")),
    },
    Feature {
        what: "ipset type hash:net (IPv6)",
        module: "ip_set_hash_net",
        rule: None,
        set: Some(("hash:net", "inet6")),
    },
    Feature {
        what: "ipset type hash:ip,port",
        module: "ip_set_hash_ipport",
        rule: None,
        set: Some(("hash:ip,port", "inet")),
    },
    Feature {
        what: "ipset type list:set (the agent's registry of its sets)",
        module: "ip_set_list_set",
        rule: None,
        set: Some(("list:set", "")),
    },
    Feature {
        what: "the set match",
        module: "xt_set",
        rule: Some("-m set --match-set KNI-PROBE-NET4 src -j RETURN"),
        set: None,
    },
    Feature {
        what: "the conntrack match",
        module: "xt_conntrack",
        rule: Some("-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"),
        set: None,
    },
    Feature {
        what: "the addrtype match",
        module: "xt_addrtype",
        rule: Some("-m addrtype --src-type LOCAL -j RETURN"),
        set: None,
    },
    Feature {
        what: "the comment match",
        module: "xt_comment",
        rule: Some("-m comment --comment probe -j RETURN"),
        set: None,
    },
    Feature {
        what: "the multiport match",
        module: "xt_multiport",
        rule: Some("-p sctp -m multiport --dports 80:81 -j RETURN"),
        set: None,
    },
    Feature {
        what: "the mark match and MARK target",
        module: "xt_mark",
        rule: Some("-m mark --mark 0x400000/0x400000 -j MARK --set-xmark 0x0/0x400000"),
        set: None,
    },
    Feature {
        what: "the REJECT target",
        module: "ipt_REJECT / ip6t_REJECT",
        rule: Some("-p tcp -j REJECT --reject-with tcp-reset"),
        set: None,
    },
];

/// Checks, before anything is programmed, that the kernel has every set type, match and target
/// the agent uses, by creating them in scratch objects of our own and removing them again. A
/// missing one is named with its module, instead of half-programming the node.
pub fn probe_kernel(tables: &Tables) -> Result<()> {
    let sets: Vec<(&Feature, String)> = FEATURES
        .iter()
        .filter_map(|f| {
            f.set.map(|(ty, family)| {
                // A list:set holds sets of any family and takes no `family`.
                let family = match family {
                    "" => String::new(),
                    f => format!(" family {f}"),
                };
                (f, format!("create {} {ty}{family}\n", probe_set(f)))
            })
        })
        .collect();
    let destroy_sets = || {
        for (f, _) in &sets {
            let _ = ipset_restore(&format!("destroy {}\n", probe_set(f)));
        }
    };
    // All at once first (the usual case, one process); one by one only to find what is missing.
    let mut missing: Vec<(&Feature, anyhow::Error)> = Vec::new();
    let batch: String = sets.iter().map(|(_, line)| line.as_str()).collect();
    if ipset_restore(&batch).is_err() {
        destroy_sets();
        for (f, line) in &sets {
            if let Err(e) = ipset_restore(line) {
                missing.push((f, e));
            }
        }
    }
    if missing.is_empty() {
        for family in Family::ALL {
            let set = match family {
                Family::V4 => PROBE_SET_V4,
                Family::V6 => PROBE_SET_V6,
            };
            let rules: Vec<(&Feature, String)> = FEATURES
                .iter()
                .filter_map(|f| {
                    f.rule.map(|r| {
                        (
                            f,
                            format!("-A {PROBE_CHAIN} {}\n", r.replace(PROBE_SET_V4, set)),
                        )
                    })
                })
                .collect();
            let chain = |body: &str| format!("*filter\n:{PROBE_CHAIN} - [0:0]\n{body}COMMIT\n");
            let all: String = rules.iter().map(|(_, r)| r.as_str()).collect();
            if let Err(e) = tables.restore(family, &chain(&all)) {
                // A held lock is not a missing feature: say what it is.
                if format!("{e:#}").contains("xtables lock") {
                    destroy_sets();
                    return Err(e.context("checking kernel features"));
                }
                for (f, rule) in &rules {
                    if let Err(e) = tables.restore(family, &chain(rule)) {
                        missing.push((f, e));
                    }
                }
            }
            let _ = tables.restore(family, &chain(&format!("-X {PROBE_CHAIN}\n")));
            if !missing.is_empty() {
                break;
            }
        }
    }
    destroy_sets();
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|(f, e)| format!("- {} (kernel module {}): {e:#}", f.what, f.module))
        .collect();
    bail!(
        "the kernel lacks features the agent needs, so nothing was programmed:\n{}\nLoad the modules on the node (modprobe MODULE) or use a kernel that has them.",
        list.join("\n")
    )
}

fn probe_set(f: &Feature) -> &'static str {
    match f.set {
        Some((_, "inet6")) => PROBE_SET_V6,
        Some(("hash:net", _)) => PROBE_SET_V4,
        Some(("list:set", _)) => "KNI-PROBE-LIST",
        _ => "KNI-PROBE-IPPORT",
    }
}

/// Removes our chains and jumps from one backend (both families). Sets are left alone: the other
/// backend's rules may use them.
pub fn remove_rules(tables: &Tables) -> Result<bool> {
    remove_rules_noting(tables, &mut BTreeSet::new(), false)
}

/// `remove_rules`, adding the sets the removed rules used to `used`. Chains under our prefix
/// that are not ours are left alone (and named in a warning if `warn`).
fn remove_rules_noting(tables: &Tables, used: &mut BTreeSet<String>, warn: bool) -> Result<bool> {
    let mut removed = false;
    for family in Family::ALL {
        let table = kernel::parse_iptables_save(&tables.save(family)?);
        if warn {
            warn_foreign_chains(family, &table.foreign);
        }
        used.extend(table.sets_used.iter().cloned());
        if let Some(text) = render::render_iptables_removal(&table) {
            tables.restore(family, &text).with_context(|| {
                format!(
                    "removing our {family} rules from the {} backend",
                    tables.backend
                )
            })?;
            removed = true;
        }
    }
    Ok(removed)
}

fn warn_foreign_chains<'a>(family: Family, chains: impl IntoIterator<Item = &'a String>) {
    for chain in chains {
        tracing::warn!(
            %family,
            chain = chain.as_str(),
            "a chain with our prefix that this agent did not create (no hook of ours leads to it): left alone"
        );
    }
}

/// Removes every chain, jump and set the agent owns, on every installed backend.
pub fn cleanup() -> Result<()> {
    cleanup_on(None)
}

/// Removes our chains and jumps from one backend, then every set the agent owns.
pub fn cleanup_backend(tables: &Tables) -> Result<()> {
    cleanup_on(Some(tables))
}

fn cleanup_on(only: Option<&Tables>) -> Result<()> {
    let mut used = BTreeSet::new();
    let found: Vec<Tables> = match only {
        Some(tables) => vec![tables.clone()],
        None => Backend::ALL
            .iter()
            .filter_map(|b| Tables::find(*b))
            .collect(),
    };
    if found.is_empty() {
        bail!("no iptables found: install iptables");
    }
    for tables in &found {
        if remove_rules_noting(tables, &mut used, true)? {
            tracing::info!(backend = %tables.backend, "removed our chains and jumps");
        }
    }
    // Sets go last: no rule of ours references them any more.
    destroy_unused_sets(&used)
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
}
