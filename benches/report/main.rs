//! `bench-report`: the README's benchmark table and the plots in `docs/plots/`, from the JSON
//! lines the fork, restore and pause benchmarks write (`forkvm_tests::report`), so that the table
//! is reproduced rather than copied by hand. `scripts/bench-report.sh` runs the benchmarks and
//! then this.
//!
//! Usage: `bench-report [--dir DIR] [--readme FILE] [--plots DIR] [--machine TEXT]` (defaults:
//! `target/bench-report`, `README.md`, `docs/plots`, the development VM). The table goes between
//! `<!-- bench-report:begin -->` and `<!-- bench-report:end -->`; its rows and targets are
//! [`table::ROWS`]. Every figure read is also listed in `DIR/all.md`.

mod plots;
mod table;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// One figure: the newest line of its name.
pub struct Figure {
    pub line: Value,
}

impl Figure {
    /// A field in nanoseconds (`p50`, `p90`, `p99`, `max`, `total`, ...).
    pub fn ns(&self, field: &str) -> Option<u64> {
        self.line.get(field)?.as_u64()
    }

    /// An array of nanoseconds (`samples`, `started`).
    pub fn list(&self, field: &str) -> Vec<u64> {
        self.line
            .get(field)
            .and_then(Value::as_array)
            .map(|v| v.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    }

    /// When it was written (Unix seconds).
    pub fn at(&self) -> u64 {
        self.ns("at").unwrap_or(0)
    }
}

/// Every figure of the `*.jsonl` files in `dir`, by name: the newest of each.
fn load(dir: &Path) -> Result<BTreeMap<String, Figure>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut figures: BTreeMap<String, Figure> = BTreeMap::new();
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    paths.sort();
    for path in paths {
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(line) = serde_json::from_str::<Value>(line) else {
                eprintln!("{}: skipped a line that is not JSON", path.display());
                continue;
            };
            let Some(name) = line.get("name").and_then(Value::as_str).map(str::to_owned) else {
                continue;
            };
            let figure = Figure { line };
            // Later lines of a file are newer; across files, `at` decides.
            if figures.get(&name).is_none_or(|old| old.at() <= figure.at()) {
                figures.insert(name, figure);
            }
        }
    }
    Ok(figures)
}

/// Milliseconds, to three significant figures or so.
pub fn ms(ns: u64) -> String {
    let ms = ns as f64 / 1e6;
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}

/// `DIR/all.md`: every figure read, one table row each.
fn write_all(dir: &Path, figures: &BTreeMap<String, Figure>) -> std::io::Result<()> {
    let mut text = String::from(
        "| name | n | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|---|---|\n",
    );
    for (name, f) in figures {
        let Some(n) = f.ns("n") else { continue };
        if f.line.get("kind").is_some() {
            continue;
        }
        let cell = |field| f.ns(field).map(ms).unwrap_or_default();
        text += &format!(
            "| {name} | {n} | {} | {} | {} | {} |\n",
            cell("p50"),
            cell("p90"),
            cell("p99"),
            cell("max")
        );
    }
    std::fs::write(dir.join("all.md"), text)
}

fn run() -> Result<(), String> {
    let mut dir = PathBuf::from("target/bench-report");
    let mut readme = PathBuf::from("README.md");
    let mut plots_dir = PathBuf::from("docs/plots");
    let mut machine = String::from("the 2-core development VM whose KVM emulates guest ring 0");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--dir" => dir = value()?.into(),
            "--readme" => readme = value()?.into(),
            "--plots" => plots_dir = value()?.into(),
            "--machine" => machine = value()?,
            "--bench" => {} // `cargo bench` passes it to every target
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let figures = load(&dir)?;
    if figures.is_empty() {
        return Err(format!("no figures in {}", dir.display()));
    }
    write_all(&dir, &figures).map_err(|e| format!("{}/all.md: {e}", dir.display()))?;
    println!(
        "{} figures; all of them: {}/all.md",
        figures.len(),
        dir.display()
    );
    table::rewrite_readme(&readme, &figures, &machine)?;
    std::fs::create_dir_all(&plots_dir).map_err(|e| format!("{}: {e}", plots_dir.display()))?;
    plots::fork_latency(&plots_dir.join("fork-latency.svg"), &figures)?;
    plots::fork1000(&plots_dir.join("fork1000.svg"), &figures)?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-report: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
