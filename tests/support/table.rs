//! The benchmarks' one table: each benchmark appends its `| measure | result |` rows to the file
//! `KNI_BENCH_TABLE` names, and hack/bench.sh prints that file once both have run, so every
//! figure and ratio of one run is in one table.

use std::io::Write;

/// Whether hack/bench.sh collects the rows (then a benchmark does not print a table of its own).
pub fn collected() -> bool {
    std::env::var_os("KNI_BENCH_TABLE").is_some()
}

/// Appends `rows` to the collected table, or prints them as a table of their own.
pub fn record<'r>(rows: impl IntoIterator<Item = (&'r str, &'r str)>) {
    let lines: String = rows
        .into_iter()
        .map(|(k, v)| format!("| {k} | {v} |\n"))
        .collect();
    match std::env::var_os("KNI_BENCH_TABLE") {
        Some(path) => std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .and_then(|mut f| f.write_all(lines.as_bytes()))
            .expect("the benchmark table file can be written"),
        None => print!("\n| measure | result |\n|---|---|\n{lines}"),
    }
}
