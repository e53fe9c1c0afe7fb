//! Workloads that `fencelog bench` and the criterion benches share, so that both measure the
//! same things: the commit layer's ceiling (pre-encoded fenced transactions), the seed design's
//! writer (one key per record), producers driving a primary, and a standby's receive, replay and
//! restart.

pub mod ceiling;
pub mod cpu;
pub mod producers;
pub mod seed_style;
pub mod standby;
