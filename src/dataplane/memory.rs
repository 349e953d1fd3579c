//! An in-memory kernel for tests without root: it applies `ipset restore` and
//! `iptables-restore --noflush` text the way the tools do, refuses what the kernel refuses (a rule
//! naming a missing set or chain, destroying a set a rule or `list:set` still uses, deleting a chain
//! a rule still jumps to), and prints `ipset save` / `iptables-save` / `iptables -S` output for the
//! parsers. Both iptables backends of one node share its sets, as they do in the kernel. Faults
//! (a held lock, rejected restores) are injected through [`Faults`].

use super::backend::Backend;
use super::error::{BlamedLine, DataplaneError, Result};
use super::kernel::Kernel;
use super::lock::XTABLES_LOCK;
use crate::compile::ir::Family;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

const BUILTINS: [&str; 3] = ["INPUT", "FORWARD", "OUTPUT"];
const TARGETS: [&str; 7] = ["ACCEPT", "DROP", "RETURN", "MARK", "REJECT", "LOG", "NFLOG"];

/// Failures to inject.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// How many of the next iptables restores are rejected (nothing of them applied).
    pub reject_iptables: usize,
    /// Another process holds the xtables lock: every iptables write and listing times out.
    pub lock_held: bool,
}

/// One write, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Ipset(String),
    Iptables(Backend, Family, String),
}

#[derive(Debug, Clone, Default)]
pub struct MemSet {
    /// `hash:net family inet hashsize 1024 maxelem 65536`, as created.
    pub header: String,
    /// Entries in insertion order.
    pub members: Vec<String>,
}

impl MemSet {
    fn kind(&self) -> &str {
        self.header.split_whitespace().next().unwrap_or_default()
    }
    fn maxelem(&self) -> usize {
        let words: Vec<&str> = self.header.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "maxelem" || w[0] == "size")
            .and_then(|w| w[1].parse().ok())
            .unwrap_or(65_536)
    }
}

/// One family's filter table of one backend: chains in creation order, each with its rules.
#[derive(Debug, Clone)]
pub struct Table {
    pub chains: Vec<(String, Vec<String>)>,
}

impl Default for Table {
    fn default() -> Table {
        Table {
            chains: BUILTINS.iter().map(|b| (b.to_string(), vec![])).collect(),
        }
    }
}

impl Table {
    pub fn rules(&self, chain: &str) -> Option<&Vec<String>> {
        self.chains.iter().find(|(c, _)| c == chain).map(|(_, r)| r)
    }
    fn rules_mut(&mut self, chain: &str) -> Option<&mut Vec<String>> {
        self.chains
            .iter_mut()
            .find(|(c, _)| c == chain)
            .map(|(_, r)| r)
    }
    fn all_rules(&self) -> impl Iterator<Item = (&str, &str)> {
        self.chains
            .iter()
            .flat_map(|(c, rules)| rules.iter().map(move |r| (c.as_str(), r.as_str())))
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub sets: BTreeMap<String, MemSet>,
    pub tables: BTreeMap<(Backend, Family), Table>,
    pub faults: Faults,
    pub writes: Vec<Write>,
    /// Sets whose entries were read (`ipset save`), in the order they were.
    pub entries_read: Vec<String>,
    /// Whether the other backend's tools are installed.
    pub other_installed: bool,
}

impl State {
    pub fn table(&mut self, backend: Backend, family: Family) -> &mut Table {
        self.tables.entry((backend, family)).or_default()
    }

    /// Whether any rule of any backend and family, or any `list:set`, uses `set`.
    fn set_in_use(&self, set: &str) -> bool {
        let in_rule = self.tables.values().any(|t| {
            t.all_rules()
                .any(|(_, r)| words_after(r, "--match-set").any(|s| s == set))
        });
        in_rule
            || self
                .sets
                .values()
                .any(|s| s.kind() == "list:set" && s.members.iter().any(|m| m == set))
    }
}

/// The words following each occurrence of `flag` in a rule.
fn words_after<'a>(rule: &'a str, flag: &'a str) -> impl Iterator<Item = &'a str> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let found: Vec<&str> = words
        .windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1])
        .collect();
    found.into_iter()
}

fn jump_target(rule: &str) -> Option<&str> {
    words_after(rule, "-j")
        .chain(words_after(rule, "-g"))
        .next()
}

/// A node's kernel in memory; clones (and [`Kernel::other_backend`]) share it.
#[derive(Debug, Clone)]
pub struct MemoryKernel {
    pub backend: Backend,
    state: Arc<Mutex<State>>,
}

impl MemoryKernel {
    pub fn new(backend: Backend) -> MemoryKernel {
        MemoryKernel {
            backend,
            state: Arc::default(),
        }
    }

    /// The same node through another iptables backend.
    pub fn through(&self, backend: Backend) -> MemoryKernel {
        MemoryKernel {
            backend,
            state: self.state.clone(),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Applies `text` as another program would (no fault injected, not logged as ours).
    pub fn foreign_iptables(&self, family: Family, text: &str) {
        let mut state = self.state();
        let mut table = state.table(self.backend, family).clone();
        apply_iptables(&mut table, &state.sets, text).expect("foreign rules apply");
        *state.table(self.backend, family) = table;
    }

    pub fn foreign_ipset(&self, text: &str) {
        apply_ipset(&mut self.state(), text).expect("foreign ipset batch applies");
    }

    fn rejected(command: &str, text: &str, number: usize, why: &str) -> DataplaneError {
        DataplaneError::RestoreRejected {
            command: command.to_string(),
            status: "exit status: 1".into(),
            stderr: format!("line {number} failed: {why}"),
            line: Some(BlamedLine {
                number,
                text: text.lines().nth(number - 1).unwrap_or_default().to_string(),
            }),
        }
    }

    fn lock_held(&self) -> DataplaneError {
        DataplaneError::LockHeld {
            tool: format!("iptables-{}-restore", self.backend),
            path: XTABLES_LOCK.into(),
            wait: Duration::from_secs(1),
            stderr: String::new(),
        }
    }
}

/// Applies one `ipset restore` batch line by line; a failing line stops it (earlier lines stay),
/// as with the tool.
fn apply_ipset(state: &mut State, text: &str) -> Result<()> {
    for (i, line) in text.lines().enumerate() {
        let fail = |why: &str| MemoryKernel::rejected("ipset -exist restore", text, i + 1, why);
        let words: Vec<&str> = line.split_whitespace().collect();
        let (Some(command), Some(name)) = (words.first(), words.get(1)) else {
            continue;
        };
        let name = name.to_string();
        match *command {
            "create" => {
                let header = words[2..].join(" ");
                match state.sets.get(&name) {
                    Some(s) if s.kind() != words.get(2).copied().unwrap_or_default() => {
                        return Err(fail("set with the same name and another type exists"));
                    }
                    Some(_) => {}
                    None => {
                        state.sets.insert(
                            name,
                            MemSet {
                                header,
                                members: vec![],
                            },
                        );
                    }
                }
            }
            "add" | "del" => {
                let entry = words.get(2).copied().unwrap_or_default().to_string();
                let is_list = state.sets.get(&name).map(|s| s.kind() == "list:set");
                if is_list == Some(true) && !state.sets.contains_key(&entry) {
                    return Err(fail("no set by the name of the entry"));
                }
                let Some(set) = state.sets.get_mut(&name) else {
                    return Err(fail("the set with the given name does not exist"));
                };
                let at = set.members.iter().position(|m| *m == entry);
                match (*command, at) {
                    ("add", None) if set.members.len() >= set.maxelem() => {
                        return Err(fail("Hash is full, cannot add more elements"));
                    }
                    ("add", None) => set.members.push(entry),
                    ("del", Some(at)) => drop(set.members.remove(at)),
                    _ => {}
                }
            }
            "flush" => match state.sets.get_mut(&name) {
                Some(set) => set.members.clear(),
                None => return Err(fail("the set with the given name does not exist")),
            },
            "swap" => {
                let other = words.get(2).copied().unwrap_or_default().to_string();
                let (Some(a), Some(b)) = (state.sets.get(&name), state.sets.get(&other)) else {
                    return Err(fail("the set with the given name does not exist"));
                };
                if a.kind() != b.kind() {
                    return Err(fail("sets of different types cannot be swapped"));
                }
                let (a, b) = (a.clone(), b.clone());
                state.sets.insert(name, b);
                state.sets.insert(other, a);
            }
            "destroy" => {
                if !state.sets.contains_key(&name) {
                    return Err(fail("the set with the given name does not exist"));
                }
                if state.set_in_use(&name) {
                    return Err(DataplaneError::SetInUse {
                        command: "ipset -exist restore".into(),
                        status: "exit status: 1".into(),
                        set: name,
                        stderr: format!(
                            "Error in line {}: Set cannot be destroyed: it is in use by a kernel component",
                            i + 1
                        ),
                    });
                }
                state.sets.remove(&name);
            }
            other => return Err(fail(&format!("unknown command {other}"))),
        }
    }
    Ok(())
}

/// Applies `iptables-restore --noflush` text to a copy of `table`: all of it, or (on error)
/// nothing.
fn apply_iptables(
    table: &mut Table,
    sets: &BTreeMap<String, MemSet>,
    text: &str,
) -> std::result::Result<(), (usize, String)> {
    let mut work = table.clone();
    let mut in_filter = false;
    for (i, line) in text.lines().enumerate() {
        let fail = |why: &str| Err((i + 1, why.to_string()));
        if let Some(name) = line.strip_prefix('*') {
            in_filter = name == "filter";
            continue;
        }
        if line == "COMMIT" {
            in_filter = false;
            continue;
        }
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if !in_filter {
            return fail("not in a table");
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if BUILTINS.contains(&name) {
                continue;
            }
            match work.rules_mut(name) {
                // --noflush: declaring an existing chain flushes it.
                Some(rules) => rules.clear(),
                None => work.chains.push((name.to_string(), vec![])),
            }
            continue;
        }
        let (op, rest) = line.split_once(' ').unwrap_or((line, ""));
        let (chain, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let check_rule = |work: &Table, spec: &str| -> std::result::Result<(), String> {
            if let Some(target) = jump_target(spec)
                && !TARGETS.contains(&target)
                && work.rules(target).is_none()
            {
                return Err(format!("Couldn't load target `{target}'"));
            }
            if let Some(set) = words_after(spec, "--match-set").find(|s| !sets.contains_key(*s)) {
                return Err(format!("Set {set} doesn't exist"));
            }
            Ok(())
        };
        match op {
            "-A" | "-I" => {
                let (position, spec) = match op {
                    "-I" => match rest.split_once(' ') {
                        Some((n, spec)) if n.parse::<usize>().is_ok() => {
                            (n.parse::<usize>().unwrap(), spec)
                        }
                        _ => (1, rest),
                    },
                    _ => (usize::MAX, rest),
                };
                if let Err(why) = check_rule(&work, spec) {
                    return fail(&why);
                }
                let Some(rules) = work.rules_mut(chain) else {
                    return fail("No chain/target/match by that name");
                };
                let at = position.saturating_sub(1).min(rules.len());
                rules.insert(at, spec.to_string());
            }
            "-D" => {
                let Some(rules) = work.rules_mut(chain) else {
                    return fail("No chain/target/match by that name");
                };
                match rules.iter().position(|r| r == rest) {
                    Some(at) => drop(rules.remove(at)),
                    None => return fail("Bad rule (does a matching rule exist in that chain?)"),
                }
            }
            "-F" => match work.rules_mut(chain) {
                Some(rules) => rules.clear(),
                None => return fail("No chain/target/match by that name"),
            },
            "-X" => {
                if BUILTINS.contains(&chain) || work.rules(chain).is_none() {
                    return fail("No chain/target/match by that name");
                }
                if work.all_rules().any(|(_, r)| jump_target(r) == Some(chain)) {
                    return fail("Too many links");
                }
                if !work.rules(chain).unwrap().is_empty() {
                    return fail("Directory not empty");
                }
                work.chains.retain(|(c, _)| c != chain);
            }
            _ => return fail("unknown command"),
        }
    }
    *table = work;
    Ok(())
}

fn render_save(table: &Table) -> String {
    let mut out = String::from("# Generated by the memory kernel\n*filter\n");
    for (chain, _) in &table.chains {
        let policy = if BUILTINS.contains(&chain.as_str()) {
            "ACCEPT"
        } else {
            "-"
        };
        out.push_str(&format!(":{chain} {policy} [0:0]\n"));
    }
    for (chain, rule) in table.all_rules() {
        out.push_str(&format!("-A {chain} {rule}\n"));
    }
    out.push_str("COMMIT\n");
    out
}

fn missing_set(name: &str) -> DataplaneError {
    DataplaneError::ToolFailed {
        command: "ipset restore".into(),
        status: "exit status: 1".into(),
        stderr: format!("The set with the given name does not exist: {name}"),
    }
}

impl Kernel for MemoryKernel {
    fn backend(&self) -> Backend {
        self.backend
    }

    fn iptables_save(&self, family: Family) -> Result<String> {
        Ok(render_save(self.state().table(self.backend, family)))
    }

    fn iptables_restore(&self, family: Family, text: &str) -> Result<()> {
        let mut state = self.state();
        if state.faults.lock_held && self.backend == Backend::Legacy {
            return Err(self.lock_held());
        }
        let command = format!("iptables-{}-restore --noflush", self.backend);
        if state.faults.reject_iptables > 0 {
            state.faults.reject_iptables -= 1;
            return Err(Self::rejected(&command, text, 1, "injected"));
        }
        let mut table = state.table(self.backend, family).clone();
        apply_iptables(&mut table, &state.sets, text)
            .map_err(|(n, why)| Self::rejected(&command, text, n, &why))?;
        *state.table(self.backend, family) = table;
        state
            .writes
            .push(Write::Iptables(self.backend, family, text.to_string()));
        Ok(())
    }

    fn iptables_list(&self, family: Family, chain: &str, rule: Option<usize>) -> Result<String> {
        let mut state = self.state();
        if state.faults.lock_held && self.backend == Backend::Legacy {
            return Err(self.lock_held());
        }
        let missing = || DataplaneError::ToolFailed {
            command: format!("iptables -S {chain}"),
            status: "exit status: 1".into(),
            stderr: "No chain/target/match by that name.".into(),
        };
        let rules = state
            .table(self.backend, family)
            .rules(chain)
            .ok_or_else(missing)?;
        let line = |r: &String| format!("-A {chain} {r}\n");
        Ok(match rule {
            Some(n) => rules.get(n - 1).map(line).unwrap_or_default(),
            None => format!("-N {chain}\n") + &rules.iter().map(line).collect::<String>(),
        })
    }

    fn ipset_list_names(&self) -> Result<String> {
        Ok(self.state().sets.keys().map(|n| format!("{n}\n")).collect())
    }

    fn ipset_save(&self, sets: &[String]) -> Result<String> {
        let mut state = self.state();
        state.entries_read.extend(sets.iter().cloned());
        let mut out = String::new();
        for name in sets {
            let set = state.sets.get(name).ok_or_else(|| missing_set(name))?;
            out.push_str(&format!("create {name} {}\n", set.header));
            for m in &set.members {
                out.push_str(&format!("add {name} {m}\n"));
            }
        }
        Ok(out)
    }

    fn ipset_headers(&self, sets: &[String]) -> Result<String> {
        let state = self.state();
        let mut out = String::new();
        for name in sets {
            let set = state.sets.get(name).ok_or_else(|| missing_set(name))?;
            let (kind, header) = set.header.split_once(' ').unwrap_or((&set.header, ""));
            out.push_str(&format!(
                "Name: {name}\nType: {kind}\nRevision: 0\nHeader: {header}\nSize in memory: 0\nReferences: 0\nNumber of entries: {}\n",
                set.members.len()
            ));
        }
        Ok(out)
    }

    fn ipset_restore(&self, text: &str) -> Result<()> {
        let mut state = self.state();
        state.writes.push(Write::Ipset(text.to_string()));
        apply_ipset(&mut state, text)
    }

    fn other_backend(&self) -> Option<Box<dyn Kernel>> {
        self.state()
            .other_installed
            .then(|| Box::new(self.through(self.backend.other())) as Box<dyn Kernel>)
    }
}

#[cfg(test)]
mod tests;
