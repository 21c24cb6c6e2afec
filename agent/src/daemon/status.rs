//! What the daemon knows about itself, served at `/api/status` and used by
//! `/readyz`. Updated by the reconcile worker only; readers get a copy.

use homelab_agent_state::{RefusalCause, RunRecord};

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
    /// Counts of the last finished run (all targets): what it created,
    /// changed, healed, pruned, skipped and failed. The same as
    /// `last_run.counts`; zero before the first run.
    #[serde(default)]
    pub counts: homelab_agent_state::RunCounts,
    /// What the plan of the last run found, before it applied.
    #[serde(default)]
    pub planned: crate::plan::Summary,
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
    /// Applying is suspended (`agent suspend`): runs plan and report drift
    /// and apply nothing. Readiness does not change: the daemon works as
    /// asked (the metric `homelab_agent_suspended` and its alert say it).
    #[serde(default)]
    pub suspended: Option<homelab_agent_state::Suspension>,
    /// The last run that finished, whatever it did: also the runs that
    /// record nothing (stopped before applying, or suspended). `last_run`
    /// is the last one recorded in the state.
    #[serde(default)]
    pub last_attempt: Option<super::control::RunSummary>,
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

/// Why the daemon is not ready (`/readyz` 503, with this as the body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("a run ({trigger}) is stuck: it went past its time budget of {budget_secs} s (run_timeout) and was abandoned; no run starts until it ends (see the log)")]
    Stuck { trigger: String, budget_secs: u64 },
    #[error("no good revision yet: {stage} failed: {error}")]
    NoGoodRevision { stage: String, error: String },
    #[error("no revision fetched and applied yet")]
    NothingYet,
    #[error("newest revision refused ({stage}{}): {error}; staying on {}", revision.as_deref().map(|v| format!(" of {v}")).unwrap_or_default(), last_good.as_deref().unwrap_or("none"))]
    Refused {
        stage: String,
        revision: Option<String>,
        error: String,
        last_good: Option<String>,
    },
    #[error("last run {result}: {}", error.as_deref().unwrap_or("see agent status"))]
    LastRun {
        result: homelab_agent_state::RunResult,
        error: Option<String>,
    },
}

impl StatusSnapshot {
    /// Ready: a source revision is available and nothing failed in the last
    /// run (resources skipped for an unresolved secret do not count).
    pub fn ready(&self) -> Result<(), NotReady> {
        if let Some(stuck) = &self.stuck {
            return Err(NotReady::Stuck {
                trigger: stuck.trigger.clone(),
                budget_secs: stuck.budget_secs,
            });
        }
        if self.last_good_revision.is_none() && self.applied_revision.is_none() {
            return Err(match &self.refused {
                Some(r) => NotReady::NoGoodRevision {
                    stage: r.stage.clone(),
                    error: r.error.clone(),
                },
                None => NotReady::NothingYet,
            });
        }
        if let Some(r) = &self.refused {
            return Err(NotReady::Refused {
                stage: r.stage.clone(),
                revision: r.revision.clone(),
                error: r.error.clone(),
                last_good: self.last_good_revision.clone(),
            });
        }
        if let Some(run) = &self.last_run {
            if run.result.failed() {
                return Err(NotReady::LastRun {
                    result: run.result,
                    error: run.error.clone(),
                });
            }
        }
        Ok(())
    }
}
