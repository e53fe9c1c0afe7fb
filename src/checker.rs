//! The history checker: after any fault, compares what clients were told (the acknowledged
//! records, as `load --acked-out` writes them) with what the cluster holds (the committed log,
//! the batches in etcd, the nodes' stores), and names every violation of the WAL's promise:
//!
//! 1. every acknowledged seq is committed, once, with the same key and value digest (so no node
//!    acknowledged anything it had not committed, fenced or not);
//! 2. the committed seqs are dense, with no duplicates, from where the log starts;
//! 3. no seq was committed by two epochs: the batches' epochs never decrease along the log;
//! 4. each node's applied state equals the replay of the committed log up to its applied seq.
//!
//! The records travel in one text format, shared with `fencelog read` and `load --acked-out`:
//! `<seq>\t<key>\t<xxh3-64 of the value, 16 hex digits>` (a delete: `-`).

use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh3::xxh3_64;

use crate::batch::BatchHeader;
use crate::error::{Error, Result};
use crate::local_store::StateDigest;
use crate::record::{Epoch, Op, Record, Seq};
use crate::state::DigestBuilder;

/// One line of the shared record format.
pub fn tsv_line(seq: Seq, record: &Record) -> String {
    format!("{seq}\t{}", tsv_columns(record))
}

/// The key and digest columns of [`tsv_line`]. Keys are printed with non-printable bytes
/// escaped (`\t`, `\xff`), so a line always has three columns.
pub fn tsv_columns(record: &Record) -> String {
    format!("{}\t{}", record.key.escape_ascii(), value_digest(record))
}

/// The digest column of [`tsv_line`]: the value's xxh3-64 in 16 hex digits, `-` for a delete.
pub fn value_digest(record: &Record) -> String {
    match record.op {
        Op::Put => format!("{:016x}", xxh3_64(&record.value)),
        Op::Delete => "-".to_owned(),
    }
}

/// The acknowledged records, by seq, from `load --acked-out` files; a seq acknowledged twice
/// is itself a violation, reported in the second value.
pub fn parse_acked(text: &str) -> Result<(BTreeMap<u64, String>, Vec<String>)> {
    let mut acked = BTreeMap::new();
    let mut violations = Vec::new();
    for (number, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let seq = line
            .split('\t')
            .next()
            .and_then(|seq| seq.parse::<u64>().ok())
            .filter(|_| line.split('\t').count() == 3)
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "acked line {}: {line:?} is not <seq>\\t<key>\\t<digest>",
                    number + 1
                ))
            })?;
        if let Some(earlier) = acked.insert(seq, line.to_owned()) {
            violations.push(format!(
                "seq {seq} was acknowledged twice: {earlier:?} and {line:?}"
            ));
        }
    }
    Ok((acked, violations))
}

/// Checks the committed log, record by record in seq order, against the acknowledged records
/// and the nodes' states.
pub struct Checker {
    acked: BTreeMap<u64, String>,
    /// Nodes' (name, applied state) waiting for the replay to reach their applied seq.
    nodes: Vec<(String, StateDigest)>,
    replay: BTreeMap<Vec<u8>, Vec<u8>>,
    first: Option<Seq>,
    last: Seq,
    matched: usize,
    nodes_checked: usize,
    violations: Vec<String>,
}

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    pub acknowledged: usize,
    /// Acknowledged seqs below where the committed log that was read starts (trimmed from
    /// etcd): neither found nor missing.
    pub unverified: usize,
    pub committed_first: Seq,
    pub committed_last: Seq,
    pub nodes_checked: usize,
    pub batches_checked: usize,
    pub violations: Vec<String>,
}

impl Checker {
    /// `nodes`: each node's name and its state digest (`fencelog inspect`), to compare with the
    /// replay. The replay needs the log from seq 1; a node that cannot be checked is a violation.
    pub fn new(acked: BTreeMap<u64, String>, nodes: Vec<(String, StateDigest)>) -> Checker {
        Checker {
            acked,
            nodes,
            replay: BTreeMap::new(),
            first: None,
            last: Seq::NONE,
            matched: 0,
            nodes_checked: 0,
            violations: Vec::new(),
        }
    }

    /// The next committed record, in seq order.
    pub fn committed(&mut self, seq: Seq, record: &Record) {
        if self.first.is_none() {
            self.first = Some(seq);
            self.check_nodes_at(Seq::NONE);
        } else if seq != Seq(self.last.0 + 1) {
            self.violations.push(format!(
                "the committed log is not dense: seq {seq} follows seq {}",
                self.last
            ));
        }
        self.last = seq;
        let line = tsv_line(seq, record);
        if let Some(acked) = self.acked.remove(&seq.0) {
            if acked == line {
                self.matched += 1;
            } else {
                self.violations.push(format!(
                    "seq {seq} was acknowledged as {acked:?} but committed as {line:?}"
                ));
            }
        }
        match record.op {
            Op::Put => self.replay.insert(record.key.clone(), record.value.clone()),
            Op::Delete => self.replay.remove(&record.key),
        };
        self.check_nodes_at(seq);
    }

    fn check_nodes_at(&mut self, seq: Seq) {
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.nodes)
            .into_iter()
            .partition(|(_, state)| state.applied_seq == seq);
        self.nodes = waiting;
        if due.is_empty() {
            return;
        }
        let replayed = self.replay_digest(seq);
        for (node, state) in due {
            self.nodes_checked += 1;
            if self.first.is_some_and(|first| first > Seq(1)) {
                self.violations.push(format!(
                    "node {node}: cannot replay its state, the log starts at seq {}",
                    self.first.unwrap_or_default()
                ));
            } else if (state.keys, state.digest) != (replayed.keys, replayed.digest) {
                self.violations.push(format!(
                    "node {node}: its state at seq {seq} ({} keys, digest {:016x}) differs from the replay ({} keys, digest {:016x})",
                    state.keys, state.digest, replayed.keys, replayed.digest
                ));
            }
        }
    }

    fn replay_digest(&self, seq: Seq) -> StateDigest {
        let mut hasher = DigestBuilder::default();
        for (key, value) in &self.replay {
            hasher.add(key, value);
        }
        StateDigest::at(seq, hasher.finish())
    }

    /// Ends the check; `batches` are the headers of the batches in etcd, in key order.
    pub fn finish(mut self, batches: &[BatchHeader]) -> Report {
        let mut unverified = 0;
        for (seq, line) in std::mem::take(&mut self.acked) {
            // Below the log that was read is trimmed, not lost: nothing here can tell.
            if self.first.is_some_and(|first| seq < first.0) {
                unverified += 1;
                continue;
            }
            self.violations.push(format!(
                "seq {seq} was acknowledged ({line:?}) but is not in the committed log"
            ));
        }
        for (node, state) in std::mem::take(&mut self.nodes) {
            self.violations.push(format!(
                "node {node} has applied seq {}, past the committed log's end at {}",
                state.applied_seq, self.last
            ));
        }
        let mut previous: Option<&BatchHeader> = None;
        for batch in batches {
            if let Some(previous) = previous {
                if batch.first_seq != Seq(previous.last_seq().0 + 1) {
                    self.violations.push(format!(
                        "etcd's batch at seq {} does not follow the one ending at seq {}",
                        batch.first_seq,
                        previous.last_seq()
                    ));
                }
                if batch.epoch < previous.epoch {
                    self.violations.push(format!(
                        "seq {} was committed by epoch {} after epoch {} had committed seq {}",
                        batch.first_seq,
                        batch.epoch,
                        previous.epoch,
                        previous.last_seq()
                    ));
                }
            }
            previous = Some(batch);
        }
        Report {
            acknowledged: self.matched,
            unverified,
            committed_first: self.first.unwrap_or_default(),
            committed_last: self.last,
            nodes_checked: self.nodes_checked,
            batches_checked: batches.len(),
            violations: self.violations,
        }
    }
}

/// The epochs seen along `batches`, for the report: epoch → batches.
pub fn epochs(batches: &[BatchHeader]) -> HashMap<Epoch, usize> {
    let mut epochs = HashMap::new();
    for batch in batches {
        *epochs.entry(batch.epoch).or_default() += 1;
    }
    epochs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(pairs: &[(&str, &str)], seq: u64) -> StateDigest {
        let mut hasher = DigestBuilder::default();
        for (k, v) in pairs {
            hasher.add(k.as_bytes(), v.as_bytes());
        }
        StateDigest::at(Seq(seq), hasher.finish())
    }

    fn acked(lines: &[String]) -> BTreeMap<u64, String> {
        parse_acked(&lines.join("\n")).unwrap().0
    }

    #[test]
    fn a_history_that_keeps_every_promise_has_no_violations() {
        let (a, b) = (Record::put("a", "1"), Record::put("b", "2"));
        let nodes = vec![("n1".to_owned(), digest_of(&[("a", "1")], 1))];
        let mut checker = Checker::new(acked(&[tsv_line(Seq(2), &b)]), nodes);
        checker.committed(Seq(1), &a);
        checker.committed(Seq(2), &b);
        let report = checker.finish(&[]);
        assert_eq!(report.violations, Vec::<String>::new());
        assert_eq!((report.acknowledged, report.nodes_checked), (1, 1));
    }

    #[test]
    fn a_lost_or_changed_acknowledged_record_is_a_violation() {
        let a = Record::put("a", "1");
        let lines = [
            tsv_line(Seq(1), &Record::put("a", "other")),
            tsv_line(Seq(2), &a),
        ];
        let mut checker = Checker::new(acked(&lines), Vec::new());
        checker.committed(Seq(1), &a);
        let report = checker.finish(&[]);
        assert_eq!(report.violations.len(), 2, "{:?}", report.violations);
    }

    #[test]
    fn a_gap_a_diverged_node_and_an_acknowledged_duplicate_are_violations() {
        let a = Record::put("a", "1");
        let (_, twice) = parse_acked("1\ta\tx\n1\ta\ty").unwrap();
        assert_eq!(twice.len(), 1);
        let nodes = vec![("n1".to_owned(), digest_of(&[("a", "2")], 1))];
        let mut checker = Checker::new(BTreeMap::new(), nodes);
        checker.committed(Seq(1), &a);
        checker.committed(Seq(3), &a);
        assert_eq!(checker.finish(&[]).violations.len(), 2);
    }

    #[test]
    fn an_acknowledged_seq_below_the_log_read_is_unverified_not_a_violation() {
        let a = Record::put("a", "1");
        let lines = [tsv_line(Seq(1), &a), tsv_line(Seq(5), &a)];
        let mut checker = Checker::new(acked(&lines), Vec::new());
        checker.committed(Seq(5), &a);
        let report = checker.finish(&[]);
        assert_eq!(report.violations, Vec::<String>::new());
        assert_eq!((report.acknowledged, report.unverified), (1, 1));
    }

    #[test]
    fn an_acknowledged_seq_past_the_log_start_that_is_missing_is_a_violation() {
        let a = Record::put("a", "1");
        let lines = [tsv_line(Seq(5), &a), tsv_line(Seq(7), &a)];
        let mut checker = Checker::new(acked(&lines), Vec::new());
        checker.committed(Seq(5), &a);
        checker.committed(Seq(6), &a);
        let report = checker.finish(&[]);
        assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
    }
}
