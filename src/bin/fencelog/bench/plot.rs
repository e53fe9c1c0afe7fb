//! The chart of `fencelog bench --plot`: records/s against records per batch (both on log
//! scales), one line per writer.

use std::path::Path;

use anyhow::{anyhow, Context};
use plotters::prelude::*;

/// One writer's rates: (records per batch, records/s).
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Draws `series` into a PNG at `path`, labelled with the TrueType font at `font`.
pub fn draw(path: &Path, font: &Path, series: &[Series]) -> anyhow::Result<()> {
    let bytes = std::fs::read(font).with_context(|| {
        format!(
            "cannot read the font {} (Debian: fonts-dejavu-core; or give --font)",
            font.display()
        )
    })?;
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a TrueType font", font.display()))?;

    let points = || series.iter().flat_map(|s| s.points.iter());
    let (x_min, x_max) = bounds(points().map(|p| p.0));
    let (y_min, y_max) = bounds(points().map(|p| p.1));
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "records/s against batch size (256-byte records)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (x_min / 1.5..x_max * 1.5).log_scale(),
            (y_min / 1.5..y_max * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("records per batch")
        .y_desc("records/s")
        .x_label_formatter(&|x| round_label(*x))
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .label_style(("sans-serif", 14))
        .draw()?;
    for (index, line) in series.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(line.points.clone(), color.stroke_width(2)))?
            .label(line.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
        chart.draw_series(
            line.points
                .iter()
                .map(|&point| Circle::new(point, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The smallest and largest of `values` (1 and 2 when there are none, to keep a valid range).
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > 0.0 && lo <= hi {
        (lo, hi)
    } else {
        (1.0, 2.0)
    }
}

/// A label for 1, 2 and 5 times a power of ten only: log axes put a mark at every integer
/// multiple, and their labels would run into each other.
fn round_label(value: f64) -> String {
    let leading = value / 10f64.powf(value.log10().floor());
    if [1.0, 2.0, 5.0].iter().any(|l| (leading - l).abs() < 0.01) {
        format!("{value:.0}")
    } else {
        String::new()
    }
}
