//! Stage 4, *apply*: carries out a [`Plan`] in dependency order, prunes, and
//! commits the new state.
//!
//! # Expected flow
//! 1. Refuse a plan with observation errors (nothing is touched).
//! 2. Record *intents* in the inventory (one transaction) for every resource
//!    about to be created or adopted, so a crash mid-apply still leaves it
//!    owned by the agent and prunable.
//! 3. Apply in catalog order. File writes are staged and committed in
//!    batches (one filesystem sync per batch); a batch is flushed before any
//!    resource that depends on a staged one. A failed resource skips its
//!    dependents; the others still converge.
//! 4. Prune (deepest paths first), sync, and commit inventory, applied
//!    revision and the run record in one transaction.
//!
//! # Guarantees
//! A crash at any point leaves every file old or new, and the next run
//! finishes the job: unconfirmed intents read as *change*, and files that
//! already match are adopted into the inventory without a write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use homelab_agent_state::{
    InventoryEntry, Origin, RunCounts, RunRecord, RunResult, StateError, Store,
};

use crate::plan::{Action, Classification, Plan};
use crate::resources::{self, ApplyCtx, Host, PruneOutcome};

/// Why apply could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{count} resource(s) could not be observed; nothing was applied:\n{details}")]
    ObserveFailed { count: usize, details: String },
    #[error(transparent)]
    State(#[from] StateError),
}

/// What happened to one resource.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    pub id: String,
    pub action: Action,
    pub class: Classification,
    /// Fields changed, for messages.
    pub fields: Vec<&'static str>,
    /// `None` when it succeeded.
    pub error: Option<String>,
    /// Extra words (`left in place: it is not empty`).
    pub note: Option<String>,
}

/// Everything apply did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApplyReport {
    pub outcomes: Vec<Outcome>,
    pub counts: RunCounts,
    pub revision: String,
    /// Time spent pruning (the rest of apply's time is applying), for the
    /// phase metrics.
    #[serde(skip)]
    pub prune_duration: Duration,
}

impl ApplyReport {
    /// Something failed (exit 1). Skipped resources are not failures: they
    /// are reported and still to do.
    pub fn failed(&self) -> bool {
        self.counts.failed > 0
    }
    /// Changed the host, or left something to do (`--detailed-exitcode` 2).
    pub fn changed_anything(&self) -> bool {
        let c = &self.counts;
        c.created + c.changed + c.drift_healed + c.pruned + c.skipped > 0
    }
}

/// The error for a plan that cannot be applied (some resources could not
/// be observed). Callers check this before opening the state for writing.
pub fn refuse(plan: &Plan) -> ApplyError {
    let details = plan
        .failures
        .iter()
        .map(|f| {
            format!(
                "  {}: {}",
                f.id,
                f.error.to_string().replace('\n', "\n    ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    ApplyError::ObserveFailed {
        count: plan.failures.len(),
        details,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Applies `plan` to `host` and records it in `store`.
pub fn apply(
    plan: &Plan,
    host: &Host,
    store: &Store,
    trigger: &str,
) -> Result<ApplyReport, ApplyError> {
    apply_cancellable(plan, host, store, trigger, None)
}

/// [`apply`], stopping early when `cancel` becomes true (SIGTERM): the
/// resource in progress finishes, the rest are skipped, nothing is pruned,
/// and what was done is committed to the state.
pub fn apply_cancellable(
    plan: &Plan,
    host: &Host,
    store: &Store,
    trigger: &str,
    cancel: Option<&AtomicBool>,
) -> Result<ApplyReport, ApplyError> {
    let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    let started_ms = now_ms();
    if !plan.failures.is_empty() {
        return Err(refuse(plan));
    }
    let hostname = plan.catalog.host.name.as_str();
    let entries = &plan.catalog.entries;

    // 2. Intents.
    let intents: Vec<(String, InventoryEntry)> = plan
        .resources
        .iter()
        .filter(|p| matches!(p.action, Action::Create | Action::Update) && p.known.is_none())
        .map(|p| {
            let e = &entries[p.index];
            (
                e.id.clone(),
                InventoryEntry {
                    kind: e.resource.kind().to_string(),
                    module: e.module.clone(),
                    digest: None,
                    origin: if p.observation.exists {
                        Origin::Adopted
                    } else {
                        Origin::Created
                    },
                    held_secrets: e.resource.holds_secrets(),
                },
            )
        })
        .collect();
    if !intents.is_empty() {
        store.write(hostname, |w| {
            for (id, entry) in &intents {
                w.put_inventory(id, entry)?;
            }
            Ok(())
        })?;
    }

    // 3. Apply in order, batching staged file writes.
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Untouched,
        Pending,
        Done,
        Failed,
        Skipped,
    }
    let mut state = vec![State::Untouched; entries.len()];
    let mut errors: Vec<Option<String>> = vec![None; entries.len()];
    let mut ctx = ApplyCtx::new(host);
    let mut batch: Vec<(usize, crate::fsops::Staged)> = Vec::new();
    let flush = |batch: &mut Vec<(usize, crate::fsops::Staged)>,
                 state: &mut Vec<State>,
                 errors: &mut Vec<Option<String>>| {
        let (idx, staged): (Vec<usize>, Vec<_>) = std::mem::take(batch).into_iter().unzip();
        for (i, result) in idx.into_iter().zip(host.fs.commit(staged)) {
            match result {
                Ok(()) => state[i] = State::Done,
                Err(e) => {
                    state[i] = State::Failed;
                    errors[i] = Some(e.to_string());
                }
            }
        }
    };
    for p in &plan.resources {
        if p.action == Action::Skip {
            state[p.index] = State::Skipped;
            errors[p.index] = entries[p.index]
                .blocked
                .clone()
                .map(|why| format!("skipped: {why}"));
            continue;
        }
        if !matches!(p.action, Action::Create | Action::Update) {
            continue;
        }
        let entry = &entries[p.index];
        if cancelled() {
            state[p.index] = State::Failed;
            errors[p.index] = Some("not applied: the agent was asked to stop".to_string());
            continue;
        }
        if entry.deps.iter().any(|&d| state[d] == State::Pending) {
            flush(&mut batch, &mut state, &mut errors);
        }
        if let Some(&d) = entry.deps.iter().find(|&&d| state[d] == State::Failed) {
            state[p.index] = State::Failed;
            errors[p.index] = Some(format!(
                "skipped: it comes after {}, which failed",
                entries[d].id
            ));
            continue;
        }
        match entry.resource.apply(&p.observation, &p.changes, &mut ctx) {
            Ok(()) => {
                let staged = ctx.take_staged();
                if staged.is_empty() {
                    state[p.index] = State::Done;
                } else {
                    state[p.index] = State::Pending;
                    batch.extend(staged.into_iter().map(|s| (p.index, s)));
                }
            }
            Err(e) => {
                state[p.index] = State::Failed;
                errors[p.index] = Some(e.to_string());
            }
        }
    }
    flush(&mut batch, &mut state, &mut errors);

    // 4. Prune.
    let prune_started = Instant::now();
    let mut prune_results = Vec::new();
    let stop_before_prune = cancelled();
    for p in &plan.prunes {
        if stop_before_prune {
            prune_results.push(Err("not pruned: the agent was asked to stop".to_string()));
            continue;
        }
        let result = match p.action {
            Action::Forget => Ok(None),
            _ => match resources::kind(&p.kind) {
                None => Err(format!(
                    "unknown kind `{}` in the inventory; this agent cannot prune it",
                    p.kind
                )),
                Some(kind) => {
                    let identity = p.id.split_once(':').map_or("", |(_, i)| i);
                    match kind.prune(identity, host) {
                        Ok(PruneOutcome::LeftInPlace(why)) => {
                            Ok(Some(format!("left in place: {why}")))
                        }
                        Ok(_) => Ok(None),
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
        };
        prune_results.push(result);
    }
    let prune_duration = prune_started.elapsed();
    let sync_error = host.fs.sync().err().map(|e| e.to_string());

    // Outcomes and counts.
    let mut counts = RunCounts::default();
    let mut outcomes = Vec::new();
    for p in &plan.resources {
        let entry = &entries[p.index];
        let error = errors[p.index].take();
        match (p.class, p.action, &error) {
            _ if state[p.index] == State::Skipped => counts.skipped += 1,
            (_, _, Some(_)) => counts.failed += 1,
            (Classification::InSync, ..) => counts.unchanged += 1,
            (_, Action::Report, _) => counts.drift_reported += 1,
            (Classification::Create, ..) => counts.created += 1,
            (Classification::Change, ..) => counts.changed += 1,
            (Classification::Drift, ..) => counts.drift_healed += 1,
            _ => {}
        }
        if p.class != Classification::InSync {
            outcomes.push(Outcome {
                id: entry.id.clone(),
                action: p.action,
                class: p.class,
                fields: p.changes.iter().map(|c| c.field).collect(),
                error,
                note: None,
            });
        }
    }
    for (p, result) in plan.prunes.iter().zip(&prune_results) {
        let (error, note) = match result {
            Ok(note) => {
                counts.pruned += 1;
                (None, note.clone())
            }
            Err(e) => {
                counts.failed += 1;
                (Some(e.clone()), None)
            }
        };
        outcomes.push(Outcome {
            id: p.id.clone(),
            action: p.action,
            class: Classification::Prune,
            fields: Vec::new(),
            error,
            note,
        });
    }
    if sync_error.is_some() {
        counts.failed += 1;
    }

    // 5. Commit state.
    // Skipped resources mean the host did not fully converge: the revision
    // is not recorded as applied and the run is partial.
    let failed = counts.failed > 0 || counts.skipped > 0;
    let first_error = sync_error
        .clone()
        .or_else(|| outcomes.iter().find_map(|o| o.error.clone()));
    let record = RunRecord {
        started_ms,
        finished_ms: now_ms(),
        trigger: trigger.to_string(),
        revision: plan.catalog.revision.clone(),
        counts: counts.clone(),
        result: if !failed {
            RunResult::Success
        } else if counts.created + counts.changed + counts.drift_healed + counts.pruned > 0 {
            RunResult::Partial
        } else {
            RunResult::Failed
        },
        error: first_error,
    };
    store.write(hostname, |w| {
        for p in &plan.resources {
            let entry = &entries[p.index];
            let ok = match p.action {
                Action::Create | Action::Update => {
                    state[p.index] == State::Done && sync_error.is_none()
                }
                // Not looked at, not applied: its entry (if any) stays as it
                // was. Recording it would make a file that was there before
                // "created" (so prunable), and a hand edit of it a "change".
                Action::Skip => false,
                _ => true,
            };
            if !ok {
                continue;
            }
            let origin = p.known.as_ref().map(|k| k.origin).unwrap_or(
                if p.observation.exists || p.action == Action::Report {
                    Origin::Adopted
                } else {
                    Origin::Created
                },
            );
            let held_secrets = entry.resource.holds_secrets();
            let up_to_date = p.known.as_ref().is_some_and(|k| {
                k.digest.as_deref() == Some(p.digest.as_str())
                    && k.origin == origin
                    && k.held_secrets == held_secrets
            });
            if !up_to_date && p.action != Action::Report {
                w.put_inventory(
                    &entry.id,
                    &InventoryEntry {
                        kind: entry.resource.kind().to_string(),
                        module: entry.module.clone(),
                        digest: Some(p.digest.clone()),
                        origin,
                        held_secrets,
                    },
                )?;
            }
        }
        for (p, result) in plan.prunes.iter().zip(&prune_results) {
            if result.is_ok() {
                w.remove_inventory(&p.id)?;
            }
        }
        if !failed {
            let finished = record.finished_ms / 1000;
            w.update_host(|h| {
                h.applied_revision = Some(plan.catalog.revision.clone());
                h.applied_at = Some(finished);
            })?;
        }
        w.add_run(&record)
    })?;
    Ok(ApplyReport {
        outcomes,
        counts,
        revision: plan.catalog.revision.clone(),
        prune_duration,
    })
}
