//! The README's generated table: which figures make each row, and the targets (written by hand,
//! kept here as data; a target with a limit gets its verdict from the figures).

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Figure, ms};

const BEGIN: &str = "<!-- bench-report:begin -->";
const END: &str = "<!-- bench-report:end -->";

/// A target: its text, and the statistic and limit (ms) that decide whether it is met.
pub struct Target {
    pub text: &'static str,
    pub limit: Option<(&'static str, f64)>,
}

const fn check(text: &'static str, stat: &'static str, ms: f64) -> Target {
    Target {
        text,
        limit: Some((stat, ms)),
    }
}

const fn note(text: &'static str) -> Target {
    Target { text, limit: None }
}

/// A row: what it measures, the figures it shows (joined with " / "), what tells them apart
/// in a verdict, and its targets.
pub struct Row {
    pub what: &'static str,
    pub figures: &'static [&'static str],
    pub labels: &'static [&'static str],
    pub targets: &'static [Target],
}

const SIZES: &[&str] = &["256 MiB", "4 GiB"];

/// The rows, in order.
pub const ROWS: &[Row] = &[
    Row {
        what: "`fork(1)` of a paused 2-vCPU test guest, child prepared ahead (`cargo bench --bench fork`)",
        figures: &[
            "fork1/paused_parent_prepared/256: fork latency",
            "fork1/paused_parent_prepared/4096: fork latency",
        ],
        labels: SIZES,
        targets: &[
            check("p50 ≤ 0.5 ms", "p50", 0.5),
            check("p99 ≤ 1 ms", "p99", 1.0),
            note("flat in size"),
        ],
    },
    Row {
        what: "the same, not prepared",
        figures: &[
            "fork1/paused_parent/256: fork latency",
            "fork1/paused_parent/4096: fork latency",
        ],
        labels: SIZES,
        targets: &[],
    },
    Row {
        what: "how long a `fork(1)` held a running parent paused (repeated forks, child prepared; `Vm::last_pause`)",
        figures: &[
            "fork1/running_parent_prepared/256: parent paused",
            "fork1/running_parent_prepared/4096: parent paused",
        ],
        labels: SIZES,
        targets: &[
            check("p50 ≤ 1 ms", "p50", 1.0),
            check("p99 ≤ 1 ms", "p99", 1.0),
            note("whatever the size"),
        ],
    },
    Row {
        what: "… the first fork of a fresh running parent",
        figures: &["pause/first_fork/256", "pause/first_fork/4096"],
        labels: SIZES,
        targets: &[check("p50 ≤ 1 ms", "p50", 1.0)],
    },
    Row {
        what: "… the host wrote 16 MiB into the parent between forks",
        figures: &[
            "pause/repeated_16MiB_written/256",
            "pause/repeated_16MiB_written/4096",
        ],
        labels: SIZES,
        targets: &[check("p50 ≤ 1 ms", "p50", 1.0)],
    },
    Row {
        what: "`fork(1000)` of a paused, halted 256 MiB guest, children prepared: the call (`cargo bench --bench fork_scale`)",
        figures: &["fork_n/1000_prepared: total"],
        labels: &[],
        targets: &[check("1,000 in < 0.5 s", "max", 500.0)],
    },
    Row {
        what: "… each child's spawn within it",
        figures: &["fork_n/1000_prepared: spawn per child"],
        labels: &[],
        targets: &[],
    },
    Row {
        what: "`Vm::restore` (call → running; `cargo bench --bench snapshot -- restore`)",
        figures: &[
            "snapshot/restore_cold/256MiB",
            "snapshot/restore_cold/4096MiB",
        ],
        labels: SIZES,
        targets: &[check("≤ 5 ms", "p50", 5.0), note("flat in size")],
    },
    Row {
        what: "a loaded snapshot's spawn with a child kept ready (`Snapshot::keep_ready`)",
        figures: &[
            "snapshot/restore_kept_ready/256MiB",
            "snapshot/restore_kept_ready/4096MiB",
        ],
        labels: SIZES,
        targets: &[check("≤ 1 ms", "p50", 1.0), note("flat in size")],
    },
    Row {
        what: "10,000 `fork(1)`s of a paused 256 MiB test guest with 2 vCPUs and 4 devices, child prepared (`cargo bench --bench fork_tails`)",
        figures: &["fork_tails/prepared: fork latency"],
        labels: &[],
        targets: &[check("p99 ≤ 1 ms", "p99", 1.0)],
    },
    Row {
        what: "… not prepared",
        figures: &["fork_tails/unprepared: fork latency"],
        labels: &[],
        targets: &[check("p50 ≤ 0.5 ms", "p50", 0.5)],
    },
    Row {
        what: "… how long a fork of it held it paused while it ran (both vCPUs spinning), child prepared",
        figures: &["fork_tails/running: parent paused"],
        labels: &[],
        targets: &[check("p99 ≤ 1 ms", "p99", 1.0)],
    },
    Row {
        what: "`Vm::restore` of a directory kept ready (`Vm::keep_restores_ready`)",
        figures: &[
            "snapshot/restore_dir_kept_ready/256MiB",
            "snapshot/restore_dir_kept_ready/4096MiB",
        ],
        labels: SIZES,
        targets: &[check("≤ 1 ms", "p50", 1.0), note("flat in size")],
    },
];

/// A target's text with its verdict.
fn verdict(target: &Target, row: &Row, figures: &[&Figure]) -> String {
    let Some((stat, limit)) = target.limit else {
        return target.text.to_owned();
    };
    let met: Vec<bool> = figures
        .iter()
        .map(|f| f.ns(stat).is_some_and(|ns| ns as f64 / 1e6 <= limit))
        .collect();
    let which = |want: bool| {
        met.iter()
            .zip(row.labels)
            .filter(|(m, _)| **m == want)
            .map(|(_, l)| *l)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = if met.iter().all(|m| *m) {
        "met".to_owned()
    } else if met.iter().all(|m| !*m) {
        "not met here".to_owned()
    } else {
        format!("met at {}, not at {}", which(true), which(false))
    };
    format!("{} ({text})", target.text)
}

/// The row's line, or `None` if a figure is missing.
fn line(row: &Row, figures: &BTreeMap<String, Figure>) -> Option<String> {
    let found: Vec<&Figure> = row
        .figures
        .iter()
        .map(|name| figures.get(*name))
        .collect::<Option<_>>()?;
    // One sample (one `fork(1000)` call) is a figure, not a distribution: p50 only.
    let cell = |stat: &str| {
        found
            .iter()
            .map(|f| match f.ns(stat) {
                Some(_) if stat != "p50" && f.ns("n") == Some(1) => "—".to_owned(),
                value => value.map(ms).unwrap_or_default(),
            })
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let n = found
        .iter()
        .map(|f| f.ns("n").unwrap_or(0).to_string())
        .collect::<Vec<_>>()
        .join(" / ");
    let targets: Vec<String> = row
        .targets
        .iter()
        .map(|t| verdict(t, row, &found))
        .collect();
    let targets = if targets.is_empty() {
        "—".to_owned()
    } else {
        targets.join(", ")
    };
    Some(format!(
        "| {} | {} | {} | {} | {} | {n} | {targets} |",
        row.what,
        cell("p50"),
        cell("p90"),
        cell("p99"),
        cell("max"),
    ))
}

/// Rewrites the block between the markers in `readme`: a line naming the machine and the date of
/// the figures, and the table. A row whose figures are missing keeps its line from before.
pub fn rewrite_readme(
    readme: &Path,
    figures: &BTreeMap<String, Figure>,
    machine: &str,
) -> Result<(), String> {
    let text = std::fs::read_to_string(readme).map_err(|e| format!("{}: {e}", readme.display()))?;
    let (Some(begin), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        return Err(format!("{} has no {BEGIN} … {END}", readme.display()));
    };
    let old = &text[begin + BEGIN.len()..end];
    let mut rows = Vec::new();
    let mut dates = Vec::new();
    let mut loads = Vec::new();
    let mut kept = 0;
    for row in ROWS {
        match line(row, figures) {
            Some(line) => {
                rows.push(line);
                for name in row.figures {
                    if let Some(f) = figures.get(*name) {
                        dates.push(f.at());
                        loads.extend(f.line.get("load").and_then(serde_json::Value::as_f64));
                    }
                }
            }
            None => {
                let prefix = format!("| {} |", row.what);
                match old.lines().find(|l| l.starts_with(&prefix)) {
                    Some(line) => {
                        println!("kept from before (no figures now): {}", row.what);
                        rows.push(line.to_owned());
                        kept += 1;
                    }
                    None => println!("left out (no figures): {}", row.what),
                }
            }
        }
    }
    let days: Vec<String> = {
        let mut days: Vec<String> = dates.iter().map(|at| date(*at)).collect();
        days.sort();
        days.dedup();
        days
    };
    let load = match (
        loads.iter().copied().reduce(f64::min),
        loads.iter().copied().reduce(f64::max),
    ) {
        (Some(lo), Some(hi)) => {
            format!(", 1-minute load average {lo:.1}–{hi:.1} at the end of each case")
        }
        _ => String::new(),
    };
    let kept = match kept {
        0 => String::new(),
        k => format!("; {k} rows kept as they were, from an earlier run"),
    };
    let block = format!(
        "\n*Generated by `scripts/bench-report.sh` from the benchmarks' own runs ({}{load}{kept}) on {machine}; \
         p50/p90/p99/max in ms, n samples each, 256 MiB / 4 GiB guests where two figures are \
         given; plots: [fork latency](docs/plots/fork-latency.svg), \
         [fork(1000) over time](docs/plots/fork1000.svg).*\n\n\
         | what | p50 | p90 | p99 | max | n | target |\n|---|---|---|---|---|---|---|\n{}\n",
        days.join(", "),
        rows.join("\n")
    );
    let new = format!("{}{BEGIN}{block}{}", &text[..begin], &text[end..]);
    std::fs::write(readme, new).map_err(|e| format!("{}: {e}", readme.display()))?;
    println!("{}: {} rows written", readme.display(), rows.len());
    Ok(())
}

/// The UTC date of Unix time `at`, `YYYY-MM-DD` (civil-from-days, Howard Hinnant's algorithm).
fn date(at: u64) -> String {
    let days = (at / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
