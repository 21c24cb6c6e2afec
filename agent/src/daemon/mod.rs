//! `agent run`: the daemon. One reconcile worker, many triggers, one queue.
//!
//! - `queue.rs`: the coalescing trigger queue.
//! - `status.rs`: the status snapshot served over HTTP.
//! - `http.rs`: the one HTTP listener (webhook, health, status, metrics).
//! - `log.rs`: the log lines about runs (once per change for skips).
//! - `control.rs`: the local controls (reconcile, suspend, resume) on a Unix socket.

pub mod control;
pub mod http;
pub mod log;
pub mod queue;
pub mod run;
pub mod status;
