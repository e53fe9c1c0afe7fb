//! The report of `fencelog bench`: the table with every rate against the ceiling and the seed
//! style, the notes, the ratios the targets are about, and the plotted lines.

use std::fmt::Write as _;
use std::time::Duration;

use super::{plot, Distant, Measurement, REFERENCE_BATCH};

/// The plotted charts: each writer's records/s against its records per batch; and, where etcd
/// was a round trip away, each configuration's records/s against the delay.
pub(super) fn charts(results: &[Measurement]) -> Vec<plot::Chart> {
    let by_batch = [
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
    .collect();
    let mut charts = vec![plot::Chart {
        caption: "records/s against batch size (256-byte records)".into(),
        x: plot::Axis::LogRecordsPerBatch,
        series: by_batch,
    }];
    charts.retain(|chart| !chart.series.is_empty());
    let mut by_delay: Vec<plot::Series> = Vec::new();
    for (m, distant) in distant_rows(results) {
        let name = match distant.in_flight {
            None => format!("plain loop, {} records per batch", distant.cap),
            Some(k) => format!("API, batch cap {}, {k} in flight", distant.cap),
        };
        let point = (distant.away.as_secs_f64() * 1000.0, m.per_second());
        match by_delay.iter_mut().find(|s| s.name == name) {
            Some(series) => series.points.push(point),
            None => by_delay.push(plot::Series {
                name,
                points: vec![point],
            }),
        }
    }
    if !by_delay.is_empty() {
        charts.push(plot::Chart {
            caption: "records/s against etcd's delay each way".into(),
            x: plot::Axis::DelayMs,
            series: by_delay,
        });
    }
    charts
}

/// The rows measured with etcd a round trip away.
fn distant_rows(results: &[Measurement]) -> impl Iterator<Item = (&Measurement, &Distant)> {
    results
        .iter()
        .filter_map(|m| m.distant.as_ref().map(|d| (m, d)))
}

/// The section on etcd a round trip away: each row against one commit in flight, against no
/// delay and against the plain loop at its delay; and the ratios the targets are about.
fn distant_section(out: &mut String, results: &[Measurement]) {
    let rows: Vec<_> = distant_rows(results).collect();
    if rows.is_empty() {
        return;
    }
    let rate = |away: Duration, cap: usize, in_flight: Option<usize>| {
        rows.iter()
            .find(|(_, d)| d.away == away && d.cap == cap && d.in_flight == in_flight)
            .map(|(m, _)| m.per_second())
    };
    let best = |away: Duration, cap: usize| {
        rows.iter()
            .filter(|(_, d)| d.away == away && d.cap == cap && d.in_flight.is_some())
            .map(|(m, _)| m.per_second())
            .max_by(f64::total_cmp)
    };
    let plain = |away: Duration| {
        rows.iter()
            .find(|(_, d)| d.away == away && d.in_flight.is_none())
            .map(|(m, _)| m.per_second())
    };
    let _ = writeln!(
        out,
        "\n## etcd a round trip away\n\n\
         etcd behind the delaying proxy (each chunk held for the delay in each direction, \
         pipelined; its threads run in this process). A primary daemon loaded through its API \
         by {} clients appending {} records at a time, and the plain loop ({REFERENCE_BATCH} \
         records per batch) through the same proxy. `vs 1 in flight`: against the same delay \
         and batch cap with one commit transaction in flight; `vs 0 ms`: against the same row \
         with no delay; `vs plain loop`: against the plain loop at the same delay. `batches per \
         txn`: batches sealed while every commit was in flight go together in the next; \
         `commit ms`: mean time of one commit transaction; `behind`: transactions etcd refused because the \
         one before had not landed yet (sent again).\n",
        super::distant::CLIENTS,
        super::distant::PER_APPEND
    );
    let _ = writeln!(
        out,
        "| etcd each way | batch cap | in flight | records/s | vs 1 in flight | vs 0 ms | vs plain loop | ack p50 ms | ack p99 ms | records per batch | batches per txn | commit ms | behind |"
    );
    let _ = writeln!(
        out,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (m, d) in &rows {
        let per_second = m.per_second();
        let in_flight = d.in_flight.map_or("plain loop".into(), |k| k.to_string());
        let one = d.in_flight.and_then(|_| rate(d.away, d.cap, Some(1)));
        let _ = writeln!(
            out,
            "| {} ms | {} | {in_flight} | {per_second:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            super::distant::in_ms(d.away),
            d.cap,
            ratio(per_second, one),
            ratio(per_second, rate(Duration::ZERO, d.cap, d.in_flight)),
            d.in_flight
                .map_or_else(String::new, |_| ratio(per_second, plain(d.away))),
            millis(d.ack.map(|a| a.0)),
            millis(d.ack.map(|a| a.1)),
            m.records_per_batch
                .map_or_else(String::new, |b| format!("{b:.0}")),
            d.batches_per_transaction
                .map_or_else(String::new, |b| format!("{b:.2}")),
            millis(m.commit_per_batch),
            d.behind.map_or_else(String::new, |b| b.to_string()),
        );
    }
    let ms = |ms: u64| Duration::from_millis(ms);
    let mut targets = Vec::new();
    if let (Some(four), Some(one)) = (rate(ms(1), 128, Some(4)), rate(ms(1), 128, Some(1))) {
        targets.push(format!(
            "at 1 ms, batch cap 128: 4 in flight / 1 = {:.2}x (target 2.5x)",
            four / one.max(1e-9)
        ));
    }
    if let (Some(far), Some(near)) = (best(ms(1), 1024), best(Duration::ZERO, 1024)) {
        targets.push(format!(
            "at 1 ms, batch cap 1024: the best / the best at 0 ms = {:.2} (target 0.90)",
            far / near.max(1e-9)
        ));
    }
    if let (Some(api), Some(plain)) = (best(Duration::ZERO, 1024), plain(Duration::ZERO)) {
        targets.push(format!(
            "at 0 ms, batch cap 1024: the best through the API / the plain loop = {:.2} (target 0.75)",
            api / plain.max(1e-9)
        ));
    }
    if !targets.is_empty() {
        let _ = writeln!(out, "\nTargets: {}.", targets.join("; "));
    }
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
    distant_section(&mut out, results);
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

/// `rate` against `base` as a table cell (empty without a base).
fn ratio(rate: f64, base: Option<f64>) -> String {
    base.filter(|b| *b > 0.0)
        .map_or_else(String::new, |b| format!("{:.2}", rate / b))
}

/// A duration in milliseconds as a table cell (empty without one).
fn millis(duration: Option<Duration>) -> String {
    duration.map_or_else(String::new, |d| format!("{:.2}", d.as_secs_f64() * 1000.0))
}
