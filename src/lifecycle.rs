//! A node's lifecycle: states, the events that move between them, and the one table
//! that says which moves exist. Pure: no I/O, so the table is tested exhaustively.
//!
//! ```text
//!            Start               CaughtUp
//! Stopped ─────────▶ Syncing ─────────────▶ Watching
//!                    ▲  │ ▲                  │  │ │
//!           RetryDue │  │ └──── Compacted ───┘  │ │
//!                    │  │ ConnectionLost        │ │ ConnectionLost
//!            Reconnecting ◀─────────────────────┘ │
//!                    ▲  └ LogBroken ┐            │ LogBroken
//!                    │              ▼            ▼
//!                    │         Recovering ◀──────┘   (RetryDue: read again, from Syncing)
//!
//! Syncing, Watching ── Trimmed ──▶ NeedsSnapshot ── RetryDue ──▶ Syncing
//! Stopped ── Bootstrap ──▶ Bootstrapping ── Start ──▶ Syncing      (a snapshot being installed)
//! Syncing, Watching, Reconnecting, Recovering ── Promote ──▶ Promoting ── TookOver ──▶ Promoted
//!                                            PromotionFailed: Promoting ──▶ Stopped
//! any state ── Stop ──▶ Stopped
//! ```
//!
//! Every state has a way out that a component drives: the follower raises `CaughtUp`,
//! `Compacted`, `ConnectionLost` and `LogBroken`; its backoff raises `RetryDue` in
//! `Reconnecting`, and its recovery timer in `Recovering` (a damaged or missing batch may be
//! repaired) and in `NeedsSnapshot` (the log was trimmed past this node: the
//! [`crate::node::Node`] installs a snapshot meanwhile, which restarts the standby); the
//! [`crate::node::Node`] raises `Promote` once it has won the leadership, `TookOver` or
//! `PromotionFailed` when the new term starts or cannot, `Stop` when the term ends and `Start`
//! when it follows again (a former primary rejoins as a standby); shutdown raises `Stop`.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// Transitions kept for status.
pub const HISTORY_LEN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    Stopped,
    /// Reading committed batches by key range.
    Syncing,
    /// Caught up; receiving batches as they are committed.
    Watching,
    /// etcd unreachable or the watch broke; reading again after a backoff.
    Reconnecting,
    /// Stopped at the last good seq: a batch is missing or damaged. Retried on a timer; says so
    /// loudly meanwhile.
    Recovering,
    /// etcd no longer holds the batches after this node's `received_seq` (trimmed): only a
    /// snapshot of the state brings it back. Retried on a timer.
    NeedsSnapshot,
    /// Installing a snapshot (the follower is stopped); then following from its seq.
    Bootstrapping,
    /// Won the leadership: receiving the rest of the committed log, then starting a term.
    Promoting,
    /// Leading as the primary.
    Promoted,
}

impl State {
    pub const ALL: [State; 9] = [
        State::Stopped,
        State::Syncing,
        State::Watching,
        State::Reconnecting,
        State::Recovering,
        State::NeedsSnapshot,
        State::Bootstrapping,
        State::Promoting,
        State::Promoted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Syncing => "syncing",
            State::Watching => "watching",
            State::Reconnecting => "reconnecting",
            State::Recovering => "recovering",
            State::NeedsSnapshot => "needs_snapshot",
            State::Bootstrapping => "bootstrapping",
            State::Promoting => "promoting",
            State::Promoted => "promoted",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    Start,
    CaughtUp,
    Compacted,
    ConnectionLost,
    LogBroken,
    Trimmed,
    Bootstrap,
    RetryDue,
    Promote,
    TookOver,
    PromotionFailed,
    Stop,
}

impl Event {
    pub const ALL: [Event; 12] = [
        Event::Start,
        Event::CaughtUp,
        Event::Compacted,
        Event::ConnectionLost,
        Event::LogBroken,
        Event::Trimmed,
        Event::Bootstrap,
        Event::RetryDue,
        Event::Promote,
        Event::TookOver,
        Event::PromotionFailed,
        Event::Stop,
    ];
}

/// The transition table: where `event` takes `state`, or `None` if it cannot happen there.
pub fn next(state: State, event: Event) -> Option<State> {
    use Event::*;
    use State::*;
    match (state, event) {
        (Stopped | Bootstrapping, Start) => Some(Syncing),
        (Stopped, Bootstrap) => Some(Bootstrapping),
        (Syncing, CaughtUp) => Some(Watching),
        (Watching, Compacted) => Some(Syncing),
        (Syncing | Watching, ConnectionLost) => Some(Reconnecting),
        (Syncing | Watching, LogBroken) => Some(Recovering),
        (Syncing | Watching, Trimmed) => Some(NeedsSnapshot),
        (Reconnecting | Recovering | NeedsSnapshot, RetryDue) => Some(Syncing),
        (Syncing | Watching | Reconnecting | Recovering, Promote) => Some(Promoting),
        (Promoting, TookOver) => Some(Promoted),
        (Promoting, PromotionFailed) => Some(Stopped),
        (
            Syncing | Watching | Reconnecting | Recovering | NeedsSnapshot | Bootstrapping
            | Promoting | Promoted,
            Stop,
        ) => Some(Stopped),
        _ => None,
    }
}

/// One transition, as kept in the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub event: Event,
    pub detail: String,
    pub at: Instant,
}

/// The current state, since when, and the last [`HISTORY_LEN`] transitions.
#[derive(Debug)]
pub struct Lifecycle {
    state: State,
    since: Instant,
    detail: String,
    history: VecDeque<Transition>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            state: State::Stopped,
            since: Instant::now(),
            detail: String::new(),
            history: VecDeque::new(),
        }
    }
}

impl Lifecycle {
    /// Applies `event`; an event the table does not allow is refused and changes nothing.
    pub fn apply(&mut self, event: Event, detail: impl Into<String>) -> Result<State, State> {
        let to = next(self.state, event).ok_or(self.state)?;
        let detail = detail.into();
        if to == State::Recovering {
            tracing::error!(from = %self.state, ?event, %detail, "standby is recovering: it stays at its last good seq");
        } else {
            tracing::info!(from = %self.state, to = %to, ?event, "node state: {detail}");
        }
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        let now = Instant::now();
        self.history.push_back(Transition {
            from: self.state,
            to,
            event,
            detail: detail.clone(),
            at: now,
        });
        self.state = to;
        self.since = now;
        self.detail = detail;
        Ok(to)
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Why the current state was entered.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    pub fn time_in_state(&self) -> Duration {
        self.since.elapsed()
    }

    pub fn history(&self) -> impl Iterator<Item = &Transition> {
        self.history.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, VecDeque};

    use super::*;

    /// States reachable from `from` through the table.
    fn reachable(from: State) -> BTreeSet<State> {
        let mut seen = BTreeSet::from([from]);
        let mut queue = VecDeque::from([from]);
        while let Some(state) = queue.pop_front() {
            for event in Event::ALL {
                if let Some(to) = next(state, event) {
                    if seen.insert(to) {
                        queue.push_back(to);
                    }
                }
            }
        }
        seen
    }

    #[test]
    fn every_state_is_reachable_from_stopped() {
        assert_eq!(reachable(State::Stopped), BTreeSet::from(State::ALL));
    }

    #[test]
    fn every_state_has_a_way_out_and_a_way_back_to_watching() {
        for state in State::ALL {
            assert!(
                Event::ALL
                    .iter()
                    .any(|&e| next(state, e).is_some_and(|to| to != state)),
                "{state} is a dead end"
            );
            assert!(
                reachable(state).contains(&State::Watching),
                "{state} can never get back to watching"
            );
        }
    }

    #[test]
    fn every_running_state_can_be_stopped() {
        for state in State::ALL.into_iter().filter(|&s| s != State::Stopped) {
            assert_eq!(next(state, Event::Stop), Some(State::Stopped), "{state}");
        }
    }

    #[test]
    fn the_table_is_exactly_the_documented_one() {
        use Event::*;
        use State::*;
        let allowed: Vec<(State, Event, State)> = State::ALL
            .into_iter()
            .flat_map(|s| {
                Event::ALL
                    .into_iter()
                    .filter_map(move |e| next(s, e).map(|to| (s, e, to)))
            })
            .collect();
        assert_eq!(
            allowed,
            vec![
                (Stopped, Start, Syncing),
                (Stopped, Bootstrap, Bootstrapping),
                (Syncing, CaughtUp, Watching),
                (Syncing, ConnectionLost, Reconnecting),
                (Syncing, LogBroken, Recovering),
                (Syncing, Trimmed, NeedsSnapshot),
                (Syncing, Promote, Promoting),
                (Syncing, Stop, Stopped),
                (Watching, Compacted, Syncing),
                (Watching, ConnectionLost, Reconnecting),
                (Watching, LogBroken, Recovering),
                (Watching, Trimmed, NeedsSnapshot),
                (Watching, Promote, Promoting),
                (Watching, Stop, Stopped),
                (Reconnecting, RetryDue, Syncing),
                (Reconnecting, Promote, Promoting),
                (Reconnecting, Stop, Stopped),
                (Recovering, RetryDue, Syncing),
                (Recovering, Promote, Promoting),
                (Recovering, Stop, Stopped),
                (NeedsSnapshot, RetryDue, Syncing),
                (NeedsSnapshot, Stop, Stopped),
                (Bootstrapping, Start, Syncing),
                (Bootstrapping, Stop, Stopped),
                (Promoting, TookOver, Promoted),
                (Promoting, PromotionFailed, Stopped),
                (Promoting, Stop, Stopped),
                (Promoted, Stop, Stopped),
            ]
        );
    }

    #[test]
    fn a_refused_event_changes_nothing() {
        let mut lifecycle = Lifecycle::default();
        assert_eq!(
            lifecycle.apply(Event::CaughtUp, "too early"),
            Err(State::Stopped)
        );
        assert_eq!(lifecycle.state(), State::Stopped);
        assert_eq!(lifecycle.history().count(), 0);
    }

    #[test]
    fn the_history_is_bounded_and_ordered() {
        let mut lifecycle = Lifecycle::default();
        lifecycle.apply(Event::Start, "").unwrap();
        for i in 0..HISTORY_LEN {
            lifecycle
                .apply(Event::ConnectionLost, format!("drop {i}"))
                .unwrap();
            lifecycle.apply(Event::RetryDue, "").unwrap();
        }
        assert_eq!(lifecycle.history().count(), HISTORY_LEN);
        let last = lifecycle.history().last().unwrap();
        assert_eq!((last.from, last.to), (State::Reconnecting, State::Syncing));
        assert_eq!(lifecycle.state(), State::Syncing);
    }
}
