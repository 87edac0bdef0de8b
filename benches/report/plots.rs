//! The plots, drawn with `plotters` (a maintained plotting crate: axes, ticks, log scales and
//! legends are its work, not ours) through its SVG backend only, with no font or system library:
//! the SVG names a generic font and the viewer draws the text.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::Figure;

const SIZE: (u32, u32) = (900, 560);
const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// `docs/plots/fork-latency.svg`: the distribution (CDF, log time axis) of every `fork(1)` of a
/// paused parent, prepared and not, at 256 MiB and 4 GiB.
pub fn fork_latency(path: &Path, figures: &BTreeMap<String, Figure>) -> Result<(), String> {
    let series: Vec<(String, Vec<f64>)> = [
        (
            "fork1/paused_parent_prepared/256: fork latency",
            "256 MiB, prepared",
        ),
        (
            "fork1/paused_parent_prepared/4096: fork latency",
            "4 GiB, prepared",
        ),
        (
            "fork1/paused_parent/256: fork latency",
            "256 MiB, not prepared",
        ),
        (
            "fork1/paused_parent/4096: fork latency",
            "4 GiB, not prepared",
        ),
    ]
    .iter()
    .filter_map(|(name, label)| {
        let f = figures.get(*name)?;
        let mut ms: Vec<f64> = f
            .list("samples")
            .iter()
            .map(|ns| *ns as f64 / 1e6)
            .collect();
        ms.sort_by(f64::total_cmp);
        (!ms.is_empty()).then(|| (format!("{label} (n={})", ms.len()), ms))
    })
    .collect();
    if series.is_empty() {
        println!("no fork(1) samples: {} not drawn", path.display());
        return Ok(());
    }
    let all = series.iter().flat_map(|(_, v)| v.iter().copied());
    let lo = all.clone().fold(f64::INFINITY, f64::min).max(1e-3) * 0.9;
    let hi = all.fold(0.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "fork(1) of a paused 2-vCPU test guest: latency distribution",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("call → child running (ms, log scale)")
        .y_desc("fraction of forks at most this long")
        .draw()
        .map_err(err)?;
    for (i, (label, ms)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let n = ms.len() as f64;
        let points = ms.iter().enumerate().map(|(k, v)| (*v, (k + 1) as f64 / n));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    println!("{} written", path.display());
    Ok(())
}

/// `docs/plots/fork1000.svg`: how many of `fork(1000)`'s children were started how long after the
/// call (prepared and not, a panel each), with the moment the call returned them all.
pub fn fork1000(path: &Path, figures: &BTreeMap<String, Figure>) -> Result<(), String> {
    let series: Vec<(String, Vec<u64>, u64)> = [
        ("fork_n/1000_prepared: timeline", "children prepared"),
        ("fork_n/1000: timeline", "not prepared"),
    ]
    .iter()
    .filter_map(|(name, label)| {
        let f = figures.get(*name)?;
        let started = f.list("started");
        let total = f.ns("total")?;
        (!started.is_empty()).then(|| {
            (
                format!(
                    "{label}: the call returned (•) after {:.0} ms",
                    total as f64 / 1e6
                ),
                started,
                total,
            )
        })
    })
    .collect();
    if series.is_empty() {
        println!("no fork(1000) timeline: {} not drawn", path.display());
        return Ok(());
    }
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(
            "fork(1000) of a paused, halted 256 MiB guest: children started over time",
            ("sans-serif", 20),
        )
        .map_err(err)?;
    // One panel per case: their time scales differ by an order of magnitude or more.
    let panels = root.split_evenly((1, series.len()));
    for (i, ((label, started, total), panel)) in series.iter().zip(&panels).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let hi = *total as f64 / 1e6 * 1.05;
        let n = started.len() as f64;
        let mut chart = ChartBuilder::on(panel)
            .caption(label.as_str(), ("sans-serif", 15))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..hi, 0.0..n * 1.05)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("ms since the call")
            .y_desc("children started (threads running)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(err)?;
        let points = std::iter::once((0.0, 0.0)).chain(
            started
                .iter()
                .enumerate()
                .map(|(k, ns)| (*ns as f64 / 1e6, (k + 1) as f64)),
        );
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?;
        // The call returns all of them at once.
        chart
            .draw_series(std::iter::once(Circle::new(
                (*total as f64 / 1e6, n),
                5,
                BLACK.filled(),
            )))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    println!("{} written", path.display());
    Ok(())
}
