//! The chart of `fencelog bench --plot`: records/s against records per batch (both on log
//! scales), one line per writer; beside it, where etcd was a round trip away, records/s
//! against the delay, one line per configuration.

use std::path::Path;

use anyhow::{anyhow, Context};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

/// One line: (x, records/s) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// What a chart's x axis shows.
pub enum Axis {
    /// Records per batch, on a log scale.
    LogRecordsPerBatch,
    /// etcd's delay each way in milliseconds, from 0, on a linear scale.
    DelayMs,
}

/// One chart of the picture.
pub struct Chart {
    pub caption: String,
    pub x: Axis,
    pub series: Vec<Series>,
}

/// Draws `charts` side by side into a PNG at `path`, labelled with the TrueType font at `font`.
pub fn draw(path: &Path, font: &Path, charts: &[Chart]) -> anyhow::Result<()> {
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

    let width = 960 * charts.len().max(1) as u32;
    let root = BitMapBackend::new(path, (width, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((1, charts.len().max(1)));
    for (area, chart) in areas.iter().zip(charts) {
        let points = || chart.series.iter().flat_map(|s| s.points.iter());
        let (x_min, x_max) = bounds(points().map(|p| p.0));
        let (y_min, y_max) = bounds(points().map(|p| p.1));
        let y = (y_min / 1.5..y_max * 1.5).log_scale();
        match chart.x {
            Axis::LogRecordsPerBatch => lines(
                area,
                chart,
                (x_min / 1.5..x_max * 1.5).log_scale(),
                y,
                "records per batch",
                &|x| round_label(*x),
            )?,
            Axis::DelayMs => lines(
                area,
                chart,
                0.0..points().map(|p| p.0).fold(1.0, f64::max) * 1.1,
                y,
                "etcd's delay each way (ms)",
                &|x| format!("{x:.1}"),
            )?,
        }
    }
    root.present()?;
    Ok(())
}

/// One chart's lines, with a mark at every point, on `x` and `y`.
fn lines<X, Y>(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    chart: &Chart,
    x: X,
    y: Y,
    x_desc: &str,
    x_label: &dyn Fn(&f64) -> String,
) -> anyhow::Result<()>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut context = ChartBuilder::on(area)
        .caption(chart.caption.as_str(), ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)?;
    context
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("records/s")
        .x_label_formatter(x_label)
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .label_style(("sans-serif", 14))
        .draw()?;
    for (index, line) in chart.series.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        context
            .draw_series(LineSeries::new(line.points.clone(), color.stroke_width(2)))?
            .label(line.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
        context.draw_series(
            line.points
                .iter()
                .map(|&point| Circle::new(point, 4, color.filled())),
        )?;
    }
    context
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
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
