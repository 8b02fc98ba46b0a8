//! SVG plot: latency percentiles against offered load (direct, and broker-floor's p99).

use std::path::Path;

use plotters::prelude::*;

use crate::report::Sweep;
use crate::stats::Quantiles;

type Line = (String, Vec<(f64, f64)>, RGBColor);
/// Picks one percentile out of a step's latency.
type Pick = fn(&Quantiles) -> Option<f64>;

fn series(sweep: &Sweep, key: Pick) -> Vec<(f64, f64)> {
    sweep.steps.iter().filter_map(|s| Some((s.offered_rate, key(&s.latency)?.max(0.001)))).collect()
}

pub fn latency_svg(path: &Path, direct: &Sweep, floor: Option<&Sweep>) -> Result<(), String> {
    let keys: [(Pick, &str); 5] = [
        (|q| q.p50_ms, "p50"),
        (|q| q.p90_ms, "p90"),
        (|q| q.p99_ms, "p99"),
        (|q| q.p999_ms, "p99.9"),
        (|q| q.max_ms, "max"),
    ];
    let mut lines: Vec<Line> = Vec::new();
    let colors = [BLUE, GREEN, RED, MAGENTA, BLACK];
    for ((k, name), c) in keys.iter().zip(colors) {
        lines.push((format!("fanout {name}"), series(direct, *k), c));
    }
    if let Some(f) = floor {
        lines.push(("broker-floor p50".into(), series(f, |q| q.p50_ms), CYAN));
        lines.push(("broker-floor p99".into(), series(f, |q| q.p99_ms), RGBColor(255, 140, 0)));
    }
    let all: Vec<(f64, f64)> = lines.iter().flat_map(|l| l.1.iter().copied()).collect();
    if all.is_empty() {
        return Err("nothing to plot".into());
    }
    let xmax = all.iter().map(|p| p.0).fold(0.0, f64::max) * 1.05;
    let ymin = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min).max(0.01) / 1.5;
    let ymax = all.iter().map(|p| p.1).fold(0.0, f64::max) * 1.5;
    let title = format!(
        "fanout: latency vs offered load ({} instances, {} users, {} B messages)",
        direct.instances.unwrap_or(0),
        direct.users,
        direct.message_bytes
    );
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, (ymin..ymax).log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("offered load (messages/s)")
        .y_desc("end-to-end latency (ms, log scale)")
        .draw()
        .map_err(e)?;
    for (name, pts, color) in lines {
        if pts.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(e)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// A line of the comparison plot: legend label (first run of a group only), points, colour, width.
type RunLine = (Option<String>, Vec<(f64, f64)>, RGBColor, u32);
/// A group of lines: side, its sweeps, the percentile, its name, colour, width.
type Group<'a> = (&'a str, &'a [&'a Sweep], Pick, &'a str, RGBColor, u32);

/// fanout against no-tier: p50 and p99 of every run against offered load.
pub fn no_tier_svg(path: &Path, fanout: &[&Sweep], no_tier: &[&Sweep]) -> Result<(), String> {
    let mut lines: Vec<RunLine> = Vec::new();
    let groups: [Group; 4] = [
        ("fanout", fanout, |q| q.p99_ms, "p99", RGBColor(200, 30, 30), 2),
        ("fanout", fanout, |q| q.p50_ms, "p50", RGBColor(240, 150, 150), 1),
        ("no-tier", no_tier, |q| q.p99_ms, "p99", RGBColor(30, 60, 200), 2),
        ("no-tier", no_tier, |q| q.p50_ms, "p50", RGBColor(140, 170, 240), 1),
    ];
    for (side, sweeps, pick, what, color, width) in groups {
        for (i, s) in sweeps.iter().enumerate() {
            let runs = if sweeps.len() == 1 { "run 1".to_string() } else { format!("runs 1–{}", sweeps.len()) };
            let label = (i == 0).then(|| format!("{side} {what} ({runs})"));
            lines.push((label, series(s, pick), color, width));
        }
    }
    let all: Vec<(f64, f64)> = lines.iter().flat_map(|l| l.1.iter().copied()).collect();
    if all.is_empty() {
        return Err("nothing to plot".into());
    }
    let xmax = all.iter().map(|p| p.0).fold(0.0, f64::max) * 1.05;
    let ymin = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min).max(0.01) / 1.5;
    let ymax = all.iter().map(|p| p.1).fold(0.0, f64::max) * 1.5;
    let f = fanout[0];
    let title = format!(
        "fanout ({} instances) vs no tier (MQTT over WebSocket to Mosquitto): {} users, {} B, QoS 1",
        f.instances.unwrap_or(0),
        f.users,
        f.message_bytes
    );
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, (ymin..ymax).log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("offered load (messages/s)")
        .y_desc("end-to-end latency (ms, log scale)")
        .draw()
        .map_err(e)?;
    // The 50 ms line a sustained rate must stay under.
    chart
        .draw_series(LineSeries::new([(0.0, 50.0), (xmax, 50.0)], BLACK.mix(0.4).stroke_width(1)))
        .map_err(e)?
        .label("p99 limit 50 ms")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4).stroke_width(1)));
    for (label, pts, color, width) in lines {
        if pts.is_empty() {
            continue;
        }
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 2, color.filled()))).map_err(e)?;
        let s = chart.draw_series(LineSeries::new(pts, color.stroke_width(width))).map_err(e)?;
        if let Some(l) = label {
            s.label(l).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width)));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// `sub-scale` (from one or more report.json files): confirmed subscriptions per second
/// against the subscriptions S held, one line per engine and synthetic-connection count, and
/// broker RSS per subscription on a second panel. Log-log.
pub fn sub_scale_svg(path: &Path, reports: &[serde_json::Value]) -> Result<(), String> {
    let colors = [RED, BLUE, GREEN, MAGENTA, BLACK, CYAN];
    let mut rate: Vec<Line> = Vec::new();
    let mut mem: Vec<Line> = Vec::new();
    let engines = reports
        .iter()
        .filter_map(|r| r.get("scenarios")?.as_array())
        .flatten()
        .filter(|s| s.get("scenario").and_then(|v| v.as_str()) == Some("sub-scale"))
        .filter_map(|s| s.get("engines")?.as_array())
        .flatten();
    for (i, e) in engines.enumerate() {
        let name = format!(
            "{} ({} synthetic connections)",
            e.get("engine").and_then(|v| v.as_str()).unwrap_or("?"),
            e.get("synthetic_clients").and_then(|v| v.as_u64()).unwrap_or(0)
        );
        let rows = e.get("rows").and_then(|v| v.as_array()).cloned().unwrap_or_default();
        let pick = |k: &str| -> Vec<(f64, f64)> {
            rows.iter()
                .filter_map(|r| Some((r.get("subscriptions")?.as_f64()?.max(1.0), r.get(k)?.as_f64()?.max(0.001))))
                .collect()
        };
        let c = colors[i % colors.len()];
        rate.push((name.clone(), pick("subscribe_rate_per_s"), c));
        mem.push((name, pick("broker_rss_bytes_per_subscription"), c));
    }
    let all: Vec<(f64, f64)> = rate.iter().chain(&mem).flat_map(|l| l.1.iter().copied()).collect();
    if all.is_empty() {
        return Err("no sub-scale rows to plot".into());
    }
    let xmin = all.iter().map(|p| p.0).fold(f64::INFINITY, f64::min) / 1.5;
    let xmax = all.iter().map(|p| p.0).fold(0.0, f64::max) * 1.5;
    let root = SVGBackend::new(path, (960, 900)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let panels = root.split_evenly((2, 1));
    for (panel, (lines, ydesc, title)) in panels.iter().zip([
        (&rate, "confirmed subscriptions / s (log)", "SUBSCRIBE throughput while growing to S"),
        (&mem, "broker RSS per subscription, bytes (log)", "broker memory per subscription"),
    ]) {
        let pts: Vec<f64> = lines.iter().flat_map(|l| l.1.iter().map(|p| p.1)).collect();
        let ymin = pts.iter().copied().fold(f64::INFINITY, f64::min) / 2.0;
        let ymax = pts.iter().copied().fold(0.0, f64::max) * 2.0;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d((xmin..xmax).log_scale(), (ymin.max(0.001)..ymax.max(1.0)).log_scale())
            .map_err(e)?;
        chart.configure_mesh().x_desc("user subscriptions S on the broker (log)").y_desc(ydesc).draw().map_err(e)?;
        for (name, pts, color) in lines.iter().cloned() {
            if pts.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(e)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled()))).map_err(e)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}
