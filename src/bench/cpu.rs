//! CPU time of a process, from `/proc/<pid>/stat`, to set beside a throughput: how many cores
//! fencelog and etcd burned for it.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// User plus system CPU seconds `pid` has used so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| Error::Benchmark(format!("unreadable /proc/{pid}/stat")))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) (utime, stime) are the 12th and 13th after the name.
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| Error::Benchmark(format!("unreadable /proc/{pid}/stat")))
    };
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(11)? + ticks(12)?) as f64 / per_second)
}

/// CPU use of some processes over an interval, in cores (CPU seconds per second).
pub struct CpuClock {
    pids: Vec<u32>,
    started: Instant,
    at_start: Vec<f64>,
}

impl CpuClock {
    pub fn start(pids: &[u32]) -> Result<CpuClock> {
        Ok(CpuClock {
            pids: pids.to_vec(),
            started: Instant::now(),
            at_start: pids
                .iter()
                .map(|&p| cpu_seconds(p))
                .collect::<Result<_>>()?,
        })
    }

    /// The cores each process used since [`CpuClock::start`], in the order given there.
    pub fn cores(&self) -> Result<Vec<f64>> {
        let elapsed = self
            .started
            .elapsed()
            .max(Duration::from_millis(1))
            .as_secs_f64();
        self.pids
            .iter()
            .zip(&self.at_start)
            .map(|(&pid, start)| Ok((cpu_seconds(pid)? - start) / elapsed))
            .collect()
    }
}
