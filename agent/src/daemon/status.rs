//! What the daemon knows about itself, served at `/api/status` and used by
//! `/readyz`. Updated by the reconcile worker only; readers get a copy.

use homelab_agent_state::{RefusalCause, RunRecord};

/// Counts of the last plan, by classification.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClassCounts {
    pub create: usize,
    pub change: usize,
    pub drift: usize,
    pub prune: usize,
    pub in_sync: usize,
    /// Resources skipped because a secret did not resolve.
    #[serde(default)]
    pub skipped: usize,
}

/// A snapshot of the daemon's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatusSnapshot {
    pub host: String,
    /// Where the desired state comes from (URL or directory).
    pub source: String,
    /// The configured ref (branch, tag or commit).
    pub reference: String,
    pub fetched_revision: Option<String>,
    pub applied_revision: Option<String>,
    pub last_good_revision: Option<String>,
    /// `agent apply --rev` pinned an older revision by hand; cleared by the next push.
    pub manual_override: bool,
    /// A revision that was refused (fetch, signature or validation), with why.
    pub refused: Option<Refusal>,
    pub last_run: Option<RunRecord>,
    /// Counts of the last plan.
    pub counts: ClassCounts,
    /// A run is in progress.
    pub running: bool,
    /// Unix seconds the run in progress started.
    #[serde(default)]
    pub run_started_at: Option<u64>,
    /// The run in progress went past its time budget and was abandoned.
    #[serde(default)]
    pub stuck: Option<StuckRun>,
    /// The configured `run_timeout`, in seconds.
    #[serde(default)]
    pub run_timeout_secs: u64,
}

/// A run past its time budget (`run_timeout`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StuckRun {
    /// What started it (`poll`, `webhook+drift`, ...).
    pub trigger: String,
    pub budget_secs: u64,
}

/// Why the newest revision is not applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Refusal {
    /// `fetch`, `signature` or `validate` (`apply` for a revision that panicked there).
    pub stage: String,
    pub revision: Option<String>,
    /// Scrubbed: no secret value, no URL credential.
    pub error: String,
    /// `invalid`, or `panicked` / `timed_out` / `crashed`: then the revision
    /// is not tried again until a newer one is fetched or the config reloaded.
    #[serde(default)]
    pub cause: RefusalCause,
}

impl StatusSnapshot {
    /// Ready: a source revision is available and the last run did not fail.
    /// `Err` says why not.
    pub fn ready(&self) -> Result<(), String> {
        if let Some(stuck) = &self.stuck {
            return Err(format!(
                "a run ({}) is stuck: it went past its time budget of {} s (run_timeout) and was abandoned; no run starts until it ends (see the log)",
                stuck.trigger, stuck.budget_secs
            ));
        }
        if self.last_good_revision.is_none() && self.applied_revision.is_none() {
            return Err(match &self.refused {
                Some(r) => format!("no good revision yet: {} failed: {}", r.stage, r.error),
                None => "no revision fetched and applied yet".to_string(),
            });
        }
        if let Some(r) = &self.refused {
            return Err(format!(
                "newest revision refused ({}{}): {}; staying on {}",
                r.stage,
                r.revision
                    .as_deref()
                    .map(|v| format!(" of {v}"))
                    .unwrap_or_default(),
                r.error,
                self.last_good_revision.as_deref().unwrap_or("none")
            ));
        }
        if let Some(run) = &self.last_run {
            if run.result != homelab_agent_state::RunResult::Success {
                return Err(format!(
                    "last run {:?}: {}",
                    run.result,
                    run.error.as_deref().unwrap_or("see agent status")
                ));
            }
        }
        Ok(())
    }
}
