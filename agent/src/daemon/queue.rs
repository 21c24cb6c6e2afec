//! The coalescing trigger queue: every trigger (poll, webhook, file watcher,
//! signal) lands here; the reconcile worker takes them in batches.
//!
//! # Guarantees
//! - A burst of triggers while the worker is idle gives one run.
//! - Triggers that arrive during a run give exactly one more run after it.
//! - Pushing never blocks and never fails.

use std::collections::BTreeSet;
use std::sync::Mutex;

use tokio::sync::Notify;

/// Why a run was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The daemon started.
    Startup,
    /// The poll timer fired.
    Poll,
    /// A verified push webhook for the configured ref.
    Webhook,
    /// A local-directory source changed on disk.
    SourceChanged,
    /// A managed file or directory changed on disk (possible drift).
    Drift,
    /// SIGHUP (after a config reload).
    Signal,
    /// `agent reconcile` or `agent resume` (the control socket).
    Manual,
}

impl Trigger {
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Poll => "poll",
            Trigger::Webhook => "webhook",
            Trigger::SourceChanged => "source",
            Trigger::Drift => "watch",
            Trigger::Signal => "signal",
            Trigger::Manual => "manual",
        }
    }
}

/// One queue per daemon; cheap to share behind an `Arc`.
#[derive(Default)]
pub struct TriggerQueue {
    pending: Mutex<BTreeSet<Trigger>>,
    notify: Notify,
}

impl TriggerQueue {
    pub fn new() -> TriggerQueue {
        TriggerQueue::default()
    }

    /// Records a trigger and wakes the worker.
    pub fn push(&self, trigger: Trigger) {
        self.pending.lock().unwrap().insert(trigger);
        self.notify.notify_one();
    }

    /// Waits until at least one trigger is pending, then takes all of them.
    pub async fn next(&self) -> BTreeSet<Trigger> {
        loop {
            {
                let mut pending = self.pending.lock().unwrap();
                if !pending.is_empty() {
                    return std::mem::take(&mut *pending);
                }
            }
            self.notify.notified().await;
        }
    }

    /// Takes a pending [`Trigger::Drift`] alone (leaving the others): the
    /// run in progress heals native drift while its stacks wait.
    pub fn take_drift(&self) -> bool {
        self.pending.lock().unwrap().remove(&Trigger::Drift)
    }

    /// Takes what is pending without waiting (tests, shutdown, and folding
    /// more source edits into a batch while they settle).
    pub fn take(&self) -> BTreeSet<Trigger> {
        std::mem::take(&mut *self.pending.lock().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_coalesces_into_one_batch() {
        let q = TriggerQueue::new();
        for _ in 0..20 {
            q.push(Trigger::Webhook);
        }
        q.push(Trigger::Poll);
        let batch = q.next().await;
        assert_eq!(batch, BTreeSet::from([Trigger::Poll, Trigger::Webhook]));
        assert!(q.take().is_empty());
    }

    #[tokio::test]
    async fn a_trigger_during_a_run_gives_exactly_one_more() {
        let q = std::sync::Arc::new(TriggerQueue::new());
        q.push(Trigger::Startup);
        let first = q.next().await;
        assert_eq!(first.len(), 1);
        // "during the run"
        q.push(Trigger::Webhook);
        q.push(Trigger::Webhook);
        let second = q.next().await;
        assert_eq!(second, BTreeSet::from([Trigger::Webhook]));
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), q.next()).await;
        assert!(waited.is_err(), "no third run");
    }
}
