//! Parsing many documents at once: files are cut into runs of whole documents, parsed on scoped
//! threads, and put back in order; any error is the sequential parse's (see [`parse_files`]).

use super::parse::{Parsed, parse_text};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Parses each file's text, documents spread over up to `available_parallelism` threads. The
/// result is what parsing every file sequentially gives: any error, with its document number and
/// the objects before it, comes from the sequential parse of that file.
pub(super) fn parse_files(files: &[(PathBuf, String)]) -> Vec<Parsed> {
    // Units of consecutive whole documents, so that each thread's parser starts at a document
    // boundary; a file that cannot be split safely is one unit.
    let mut units: Vec<(usize, &str)> = Vec::new();
    for (index, (_, text)) in files.iter().enumerate() {
        match split_documents(text, UNIT_BYTES) {
            Some(runs) => units.extend(runs.into_iter().map(|run| (index, run))),
            None => units.push((index, text.as_str())),
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_THREADS)
        .min(units.len());
    let results = parallel_map(&units, threads, |&(index, text)| {
        parse_text(&files[index].0, text)
    });
    let mut per_file: Vec<Parsed> = files.iter().map(|_| Parsed::default()).collect();
    let mut failed = vec![false; files.len()];
    for (&(index, _), mut unit) in units.iter().zip(results) {
        let into = &mut per_file[index];
        if unit.error.is_some() {
            failed[index] = true;
        }
        for (at, _) in &mut unit.objects {
            at.document += into.documents;
        }
        into.documents += unit.documents;
        into.objects.append(&mut unit.objects);
    }
    // A unit failed: the whole file again, sequentially, for the error exactly as a single parse
    // reports it (a unit's document numbers and line numbers are its own).
    for (index, (file, text)) in files.iter().enumerate() {
        if failed[index] {
            per_file[index] = parse_text(file, text);
        }
    }
    per_file
}

/// Text per unit of parallel parsing: large enough that starting a parser is negligible.
const UNIT_BYTES: usize = 64 * 1024;
const MAX_THREADS: usize = 8;

/// `f` over `items` on `threads` scoped threads, results in the order of `items`.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, R)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        done.push((i, f(item)));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a manifest parsing thread panicked"))
            .collect()
    });
    results.sort_unstable_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// `text` cut into runs of whole documents of about `unit` bytes, or `None` if cutting it could
/// change what it means. A line starting with `---` and a blank is a document start wherever it
/// is (the YAML scanner ends plain and block scalars there and rejects it in quoted ones), so
/// text between two such lines is whole documents. Directives (`%`) belong to the next document
/// and other line breaks (`\r`, U+0085, U+2028, U+2029) or a byte-order mark would move
/// line starts: such a text is not cut.
pub(super) fn split_documents(text: &str, unit: usize) -> Option<Vec<&str>> {
    if text.len() <= unit {
        return Some(vec![text]);
    }
    if text.contains(['\r', '\u{85}', '\u{2028}', '\u{2029}', '\u{feff}']) {
        return None;
    }
    let bytes = text.as_bytes();
    let mut runs = Vec::new();
    let mut start = 0;
    let mut line = 0;
    while line < bytes.len() {
        let rest = &bytes[line..];
        if rest.first() == Some(&b'%') {
            return None;
        }
        let marker = rest.starts_with(b"---")
            && rest
                .get(3)
                .is_none_or(|b| matches!(b, b' ' | b'\t' | b'\n'));
        if marker && line - start >= unit {
            runs.push(&text[start..line]);
            start = line;
        }
        line = match memchr_newline(rest) {
            Some(p) => line + p + 1,
            None => bytes.len(),
        };
    }
    runs.push(&text[start..]);
    Some(runs)
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|b| *b == b'\n')
}
