//! The report of `fencelog bench`: the table with every rate against the ceiling and the seed
//! style, the notes, the ratios the targets are about, and the plotted lines.

use std::fmt::Write as _;
use std::time::Duration;

use super::{plot, Measurement, REFERENCE_BATCH};

/// The plotted lines: each writer's records/s against its records per batch.
pub(super) fn series(results: &[Measurement]) -> Vec<plot::Series> {
    [
        "ceiling",
        "fencelog double",
        "fencelog single",
        "seed style",
    ]
    .into_iter()
    .map(|writer| plot::Series {
        name: writer.to_owned(),
        points: results
            .iter()
            .filter(|m| m.plotted && m.what.starts_with(writer))
            .filter_map(|m| m.records_per_batch.map(|b| (b, m.per_second())))
            .collect(),
    })
    .filter(|s| !s.points.is_empty())
    .collect()
}

/// The report: the machine, a table with each rate against the ceiling and the seed style, and
/// the ratios the targets are about.
pub(super) fn report(results: &[Measurement], seconds: u64, took: Duration) -> String {
    let rate_of = |prefix: &str| {
        results
            .iter()
            .find(|m| m.what.starts_with(prefix))
            .map(Measurement::per_second)
    };
    let ceiling = rate_of(&format!("ceiling: pre-encoded {REFERENCE_BATCH}-record"))
        .or_else(|| rate_of("ceiling"));
    let seed = rate_of("seed style");
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mut out = String::new();
    let _ = writeln!(out, "# fencelog bench\n");
    let _ = writeln!(
        out,
        "{cores} cores, {}, each measurement {seconds} s on a fresh etcd (whole run {:.0} s); \
         256-byte records. `vs ceiling`: against the pre-encoded ceiling at the same batch size \
         ({REFERENCE_BATCH} records for the rows without one). `encode` and `commit`: mean \
         milliseconds to seal and encode one batch and to commit one (fencelog's from its \
         `seal_seconds` and `commit_seconds` metrics). CPU in cores (CPU seconds per second) of \
         this process and of etcd over the whole measurement.\n",
        etcd_version(),
        took.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| what | records/s | vs ceiling | vs seed style | records per batch | encode ms | commit ms | fencelog CPU | etcd CPU |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let millis = |d: Option<Duration>| {
        d.map_or_else(String::new, |d| format!("{:.2}", d.as_secs_f64() * 1000.0))
    };
    let ratio = |rate: f64, base: Option<f64>| {
        base.filter(|b| *b > 0.0)
            .map_or_else(String::new, |b| format!("{:.2}", rate / b))
    };
    for m in results {
        let rate = m.per_second();
        // Against the ceiling at the same batch size where there is one.
        let same_batch = results
            .iter()
            .find(|c| c.what.starts_with("ceiling") && c.cap.is_some() && c.cap == m.cap)
            .map(Measurement::per_second);
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {} | {} | {:.2} | {:.2} |",
            m.what,
            rate,
            ratio(rate, same_batch.or(ceiling)),
            ratio(rate, seed),
            m.records_per_batch
                .map_or_else(String::new, |b| format!("{b:.0}")),
            millis(m.encode_per_batch),
            millis(m.commit_per_batch),
            m.cpu.0,
            m.cpu.1
        );
    }
    for note in results.iter().filter_map(|m| m.note.as_ref()) {
        let _ = writeln!(out, "\n{note}");
    }
    let double = rate_of(&format!("fencelog double, batch cap {REFERENCE_BATCH}"));
    let single = rate_of(&format!("fencelog single, batch cap {REFERENCE_BATCH}"));
    if let (Some(double), Some(single)) = (double, single) {
        let _ = writeln!(
            out,
            "\nAt batch cap {REFERENCE_BATCH}: double / single = {:.2}x; fencelog / ceiling = {}; \
             fencelog / plain loop = {}x; fencelog / seed style = {}x.",
            double / single.max(1e-9),
            ratio(double, ceiling),
            ratio(double, rate_of("plain loop")),
            ratio(double, seed)
        );
    }
    out
}

/// `etcd --version`'s first line, or why it is unknown.
fn etcd_version() -> String {
    let binary = std::env::var("FENCELOG_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    match std::process::Command::new(binary).arg("--version").output() {
        Ok(output) => String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or("etcd version unknown")
            .to_owned(),
        Err(e) => format!("etcd version unknown ({e})"),
    }
}
