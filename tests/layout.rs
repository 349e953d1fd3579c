//! The code map of docs/design.md, checked: no non-test source file over 500 lines, folders import
//! only folders to their right in the one-way order, and no two files import each other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each folder may import only the folders after it (non-test code).
const ORDER: &[&str] = &[
    "app",
    "reconcile",
    "source",
    "metrics",
    "dataplane",
    "compile",
    "model",
];
const MAX_LINES: usize = 500;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn is_test_file(rel: &str, test_modules: &BTreeSet<Vec<String>>) -> bool {
    rel.ends_with("/tests.rs") || rel.contains("/tests/") || test_modules.contains(&module_of(rel))
}

/// Modules declared behind `#[cfg(test)]` (`#[cfg(test)] mod memory;`): test code in their own
/// files.
fn test_modules(sources: &BTreeMap<String, String>) -> BTreeSet<Vec<String>> {
    let mut found = BTreeSet::new();
    for (rel, text) in sources {
        let parent = module_of(rel);
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for pair in lines.windows(2) {
            if pair[0] != "#[cfg(test)]" {
                continue;
            }
            let declared = pair[1]
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub(super) ")
                .trim_start_matches("pub ");
            if let Some(name) = declared
                .strip_prefix("mod ")
                .and_then(|r| r.strip_suffix(';'))
            {
                let mut path = parent.clone();
                path.push(name.to_string());
                found.insert(path);
            }
        }
    }
    found
}

/// The text of a file without its inline `#[cfg(test)] mod tests { … }` (always last here).
fn non_test_text(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// The module path of a file: `src/compile/mod.rs` → [compile], `src/cli.rs` → [cli].
fn module_of(rel: &str) -> Vec<String> {
    let rel = rel.trim_start_matches("src/").trim_end_matches(".rs");
    let mut parts: Vec<String> = rel.split('/').map(String::from).collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Files referenced by `crate::…` and `super::…` paths, resolved to the longest module path that
/// is a file.
fn imports(rel: &str, text: &str, files: &BTreeMap<Vec<String>, String>) -> BTreeSet<String> {
    let me = module_of(rel);
    let is_mod_file = rel.ends_with("/mod.rs");
    let mut found = BTreeSet::new();
    let words: Vec<&str> = text
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("crate::") || w.starts_with("super::"))
        .collect();
    for word in words {
        let mut segments: Vec<&str> = word.split("::").filter(|s| !s.is_empty()).collect();
        let mut base: Vec<String> = Vec::new();
        if segments[0] == "crate" {
            segments.remove(0);
        } else {
            base = me.clone();
            if !is_mod_file {
                base.pop();
            }
            while segments.first() == Some(&"super") {
                segments.remove(0);
                if segments.first() == Some(&"super") {
                    base.pop();
                }
            }
            // `super::x` in a non-mod file names a sibling: `base` is already the parent.
        }
        for len in (0..=segments.len()).rev() {
            let mut path = base.clone();
            path.extend(segments[..len].iter().map(|s| s.to_string()));
            if let Some(file) = files.get(&path) {
                if file != rel {
                    found.insert(file.clone());
                }
                break;
            }
        }
    }
    found
}

#[test]
fn the_code_map_holds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = Vec::new();
    rust_files(&root.join("src"), &mut paths);
    let sources: BTreeMap<String, String> = paths
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            (rel, std::fs::read_to_string(p).unwrap())
        })
        .collect();
    let files: BTreeMap<Vec<String>, String> = sources
        .keys()
        .map(|rel| (module_of(rel), rel.clone()))
        .collect();
    let test_modules = test_modules(&sources);
    let mut problems = Vec::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in &sources {
        if is_test_file(rel, &test_modules) {
            continue;
        }
        let code = non_test_text(text);
        let lines = code.lines().count();
        if lines > MAX_LINES {
            problems.push(format!(
                "{rel}: {lines} lines of non-test code (at most {MAX_LINES})"
            ));
        }
        let deps = imports(rel, code, &files);
        let folder = module_of(rel).first().cloned().unwrap_or_default();
        if let Some(rank) = ORDER.iter().position(|f| *f == folder) {
            for dep in &deps {
                let to = module_of(dep).first().cloned().unwrap_or_default();
                match ORDER.iter().position(|f| *f == to) {
                    Some(to_rank) if to_rank < rank => {
                        problems.push(format!("{rel} imports {dep}: {folder} may not use {to}"))
                    }
                    _ => {}
                }
            }
        }
        graph.insert(rel.clone(), deps);
    }
    for (a, deps) in &graph {
        for b in deps {
            if a < b && graph.get(b).is_some_and(|d| d.contains(a)) {
                problems.push(format!("{a} and {b} import each other"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
