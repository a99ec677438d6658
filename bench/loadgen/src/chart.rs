//! Charts of the reports: deliveries per second and p99 latency against subscribers, one
//! line per target, drawn as SVG with plotters.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::Report;

fn color(target: &str) -> RGBColor {
    match target {
        "thinws" => RGBColor(47, 111, 237),
        "socketio" | "socket.io" => RGBColor(217, 130, 43),
        _ => RGBColor(31, 163, 92),
    }
}

/// Points (subscribers, value) per target, for one scenario.
fn series(
    reports: &[Report],
    scenario: &str,
    value: impl Fn(&Report) -> f64,
) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut out: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in reports.iter().filter(|r| r.scenario == scenario) {
        let name = r.label.clone().unwrap_or_else(|| r.target.clone());
        out.entry(name)
            .or_default()
            .push((r.sockets as f64, value(r)));
    }
    for points in out.values_mut() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

pub fn draw(reports: &[Report], output: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(output, (1100, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    panel(
        &left,
        "fanout: deliveries per second",
        "deliveries/s",
        &series(reports, "fanout", |r| r.deliveries_per_sec),
    )?;
    panel(
        &right,
        "fanout: p99 latency (ms)",
        "p99 ms",
        &series(reports, "fanout", |r| r.p99_ms),
    )?;
    root.present()?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    data: &BTreeMap<String, Vec<(f64, f64)>>,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let x_max = data.values().flatten().map(|p| p.0).fold(1.0, f64::max) * 1.3;
    let y_max = data.values().flatten().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((50f64..x_max).log_scale(), 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("subscribers")
        .y_desc(y_label)
        .y_label_formatter(&|v| {
            if *v >= 1e6 {
                format!("{:.1}M", v / 1e6)
            } else if *v >= 1e3 {
                format!("{:.0}k", v / 1e3)
            } else {
                format!("{v:.0}")
            }
        })
        .draw()?;
    for (name, points) in data {
        let c = color(name);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}
