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

use homelab_agent_state::{InventoryEntry, Origin, RunCounts, StateError, Store};

mod outcome;
pub use outcome::{KubeFailure, Outcome, Reason};

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
    /// When apply started and finished (Unix milliseconds).
    #[serde(skip)]
    pub started_ms: u64,
    #[serde(skip)]
    pub finished_ms: u64,
    /// The first error (of a resource that failed, not one skipped), for
    /// the run record.
    #[serde(skip)]
    pub first_error: Option<String>,
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

pub(crate) fn now_ms() -> u64 {
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
    let _ = trigger;
    let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    let started_ms = now_ms();
    if !plan.failures.is_empty() {
        return Err(refuse(plan));
    }
    record_intents(plan, store)?;
    let mut progress = converge(plan, host, &cancelled);
    let handled = handlers(
        plan,
        host,
        &mut HandlerState {
            done: progress.state.iter().map(|s| *s == State::Done).collect(),
            started: &progress.started,
            cancelled: &cancelled,
        },
    );
    progress.take_handled(&handled);
    let prune_started = Instant::now();
    let prunes = prune(plan, host, cancelled());
    let prune_duration = prune_started.elapsed();
    let sync_error = host.fs.sync().err().map(|e| e.to_string());
    let (outcomes, mut counts) = outcomes(plan, &mut progress, &handled, &prunes);
    if sync_error.is_some() {
        counts.failed += 1;
    }
    commit(plan, store, &progress, &prunes, sync_error.is_none())?;
    // A skipped resource is not a failure: its reason is in its outcome
    // (and the log), not the run's error.
    let first_error = sync_error.clone().or_else(|| {
        outcomes
            .iter()
            .filter(|o| !o.skipped())
            .find_map(|o| o.error.clone())
    });
    Ok(ApplyReport {
        outcomes,
        counts,
        revision: plan.catalog.revision.clone(),
        prune_duration,
        started_ms,
        finished_ms: now_ms(),
        first_error,
    })
}

/// Where one entry stands during apply.
#[derive(Clone, Copy, PartialEq)]
enum State {
    Untouched,
    /// Staged, waiting for its batch to commit.
    Pending,
    Done,
    Failed,
    Skipped,
    /// Applied, then put back: the service it notifies did not come up.
    RolledBack,
}

/// What apply knows of every catalog entry, by index.
struct Progress {
    state: Vec<State>,
    errors: Vec<Option<String>>,
    reasons: Vec<Option<Reason>>,
    /// Started or restarted by its own apply.
    started: Vec<bool>,
}

impl Progress {
    fn fail(&mut self, i: usize, error: String, reason: Option<Reason>) {
        self.state[i] = State::Failed;
        self.errors[i] = Some(error);
        self.reasons[i] = reason;
    }

    /// Commits the staged batch: each staged entry is done or failed.
    fn flush(&mut self, host: &Host, batch: &mut Vec<(usize, crate::fsops::Staged)>) {
        let (idx, staged): (Vec<usize>, Vec<_>) = std::mem::take(batch).into_iter().unzip();
        for (i, result) in idx.into_iter().zip(host.fs.commit(staged)) {
            match result {
                Ok(()) => self.state[i] = State::Done,
                Err(e) => self.fail(i, e.to_string(), None),
            }
        }
    }

    /// What the handlers did overrides the entry's own result.
    fn take_handled(&mut self, handled: &[Handled]) {
        for (i, h) in handled.iter().enumerate() {
            match h {
                Handled::Nothing | Handled::Restarted(_) => {}
                Handled::Failed(why) => self.fail(i, why.clone(), None),
                Handled::FailedRolledBack { why, service } => self.fail(
                    i,
                    why.clone(),
                    Some(Reason::RolledBack {
                        service: service.clone(),
                    }),
                ),
                Handled::RolledBack { why, service } => {
                    self.state[i] = State::RolledBack;
                    self.errors[i] = Some(why.clone());
                    self.reasons[i] = Some(Reason::RolledBack {
                        service: service.clone(),
                    });
                }
            }
        }
    }
}

/// Step 2: records *intents* (one transaction) for every resource about to
/// be created or adopted, so a crash mid-apply leaves it owned and prunable.
fn record_intents(plan: &Plan, store: &Store) -> Result<(), StateError> {
    let entries = &plan.catalog.entries;
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
                    rolled_back: None,
                },
            )
        })
        .collect();
    if intents.is_empty() {
        return Ok(());
    }
    store.write(&plan.catalog.host.name, |w| {
        for (id, entry) in &intents {
            w.put_inventory(id, entry)?;
        }
        Ok(())
    })
}

/// Step 3: applies in catalog order, batching staged file writes (a batch
/// is flushed before anything that depends on it); a failed resource fails
/// its dependents, the others still converge.
fn converge(plan: &Plan, host: &Host, cancelled: &dyn Fn() -> bool) -> Progress {
    let entries = &plan.catalog.entries;
    let mut progress = Progress {
        state: vec![State::Untouched; entries.len()],
        errors: vec![None; entries.len()],
        reasons: vec![None; entries.len()],
        started: vec![false; entries.len()],
    };
    let mut ctx = ApplyCtx::new(host);
    let mut batch: Vec<(usize, crate::fsops::Staged)> = Vec::new();
    for p in &plan.resources {
        let i = p.index;
        let entry = &entries[i];
        if p.action == Action::Skip {
            progress.state[i] = State::Skipped;
            let (why, reason) = match (&entry.blocked, p.note) {
                (Some(needs), _) => (
                    Some(needs.as_str()),
                    Reason::Blocked {
                        needs: needs.clone(),
                    },
                ),
                (None, note) => (note, Reason::Held),
            };
            progress.errors[i] = why.map(|why| format!("skipped: {why}"));
            progress.reasons[i] = Some(reason);
            continue;
        }
        if !matches!(p.action, Action::Create | Action::Update) {
            continue;
        }
        if cancelled() {
            progress.fail(
                i,
                "not applied: the agent was asked to stop".to_string(),
                Some(Reason::Stopped),
            );
            continue;
        }
        if entry
            .deps
            .iter()
            .any(|&d| progress.state[d] == State::Pending)
        {
            progress.flush(host, &mut batch);
        }
        if let Some(&d) = entry
            .deps
            .iter()
            .find(|&&d| progress.state[d] == State::Failed)
        {
            progress.fail(
                i,
                format!("skipped: it comes after {}, which failed", entries[d].id),
                Some(Reason::AfterFailed {
                    id: entries[d].id.clone(),
                }),
            );
            continue;
        }
        let result = entry.resource.apply(&p.observation, &p.changes, &mut ctx);
        progress.started[i] = ctx.take_started();
        match result {
            Ok(()) => {
                let staged = ctx.take_staged();
                if staged.is_empty() {
                    progress.state[i] = State::Done;
                } else {
                    progress.state[i] = State::Pending;
                    batch.extend(staged.into_iter().map(|s| (i, s)));
                }
            }
            Err(e) => progress.fail(i, e.to_string(), None),
        }
    }
    progress.flush(host, &mut batch);
    progress
}

/// What pruning one inventory entry did: a note, or why it failed.
type Pruned = Result<Option<String>, PruneError>;

/// Why an inventory entry was not pruned.
#[derive(Debug, thiserror::Error)]
enum PruneError {
    #[error("not pruned: the agent was asked to stop")]
    Stopped,
    #[error("unknown kind `{0}` in the inventory; this agent cannot prune it")]
    UnknownKind(String),
    #[error(transparent)]
    Resource(#[from] resources::ResourceError),
}

/// Step 4: prunes what the plan found owned and gone from the desired
/// state (deepest paths first: the plan's order); nothing when stopping.
fn prune(plan: &Plan, host: &Host, stopping: bool) -> Vec<Pruned> {
    plan.prunes
        .iter()
        .map(|p| {
            if stopping {
                return Err(PruneError::Stopped);
            }
            if p.action == Action::Forget {
                return Ok(None);
            }
            let kind =
                resources::kind(&p.kind).ok_or_else(|| PruneError::UnknownKind(p.kind.clone()))?;
            let identity = p.id.split_once(':').map_or("", |(_, i)| i);
            match kind.prune(identity, host)? {
                PruneOutcome::LeftInPlace(why) => Ok(Some(format!("left in place: {why}"))),
                _ => Ok(None),
            }
        })
        .collect()
}

/// The outcome of every entry that was not simply in sync, and the counts.
fn outcomes(
    plan: &Plan,
    progress: &mut Progress,
    handled: &[Handled],
    prunes: &[Pruned],
) -> (Vec<Outcome>, RunCounts) {
    let entries = &plan.catalog.entries;
    let mut counts = RunCounts::default();
    let mut outcomes = Vec::new();
    for p in &plan.resources {
        let i = p.index;
        let error = progress.errors[i].take();
        let reason = progress.reasons[i].take();
        match (p.class, p.action, &error) {
            _ if progress.state[i] == State::Skipped => counts.skipped += 1,
            (_, _, Some(_)) => counts.failed += 1,
            (Classification::InSync, ..) => counts.unchanged += 1,
            (_, Action::Report, _) => counts.drift_reported += 1,
            (Classification::Create, ..) => counts.created += 1,
            (Classification::Change, ..) => counts.changed += 1,
            (Classification::Drift, ..) => counts.drift_healed += 1,
            _ => {}
        }
        let restarted = match &handled[i] {
            Handled::Restarted(by) => Some(by.clone()),
            _ => None,
        };
        let rolled_back = matches!(reason, Some(Reason::RolledBack { .. }));
        let rollback_note = rolled_back.then(|| "rolled back".to_string());
        let reason = reason.or_else(|| restarted.clone().map(|by| Reason::Restarted { by }));
        if p.class != Classification::InSync {
            outcomes.push(Outcome {
                id: entries[i].id.clone(),
                action: p.action,
                class: p.class,
                fields: p.changes.iter().map(|c| c.field.to_string()).collect(),
                error,
                note: rollback_note
                    .or_else(|| restarted.map(|by| format!("restarted (notified by {by})"))),
                reason,
            });
        } else if restarted.is_some() || error.is_some() {
            outcomes.push(Outcome {
                id: entries[i].id.clone(),
                action: Action::Restart,
                class: p.class,
                fields: Vec::new(),
                error,
                note: rollback_note.or_else(|| restarted.map(|by| format!("notified by {by}"))),
                reason,
            });
        }
    }
    for (p, result) in plan.prunes.iter().zip(prunes) {
        let (error, note, reason) = match result {
            Ok(note) => {
                counts.pruned += 1;
                (None, note.clone(), None)
            }
            Err(e) => {
                counts.failed += 1;
                let reason = matches!(e, PruneError::Stopped).then_some(Reason::Stopped);
                (Some(e.to_string()), None, reason)
            }
        };
        outcomes.push(Outcome {
            id: p.id.clone(),
            action: p.action,
            class: Classification::Prune,
            fields: Vec::new(),
            error,
            note,
            reason,
        });
    }
    (outcomes, counts)
}

/// Step 5: the inventory in one transaction: applied entries get their
/// digest, a rolled-back change is held, pruned entries leave. (The run
/// record and the applied revision are written by `run::record`.)
fn commit(
    plan: &Plan,
    store: &Store,
    progress: &Progress,
    prunes: &[Pruned],
    synced: bool,
) -> Result<(), StateError> {
    let entries = &plan.catalog.entries;
    store.write(&plan.catalog.host.name, |w| {
        for p in &plan.resources {
            let entry = &entries[p.index];
            if progress.state[p.index] == State::RolledBack {
                // Keeps what was applied before; holds this desired state.
                let mut held = p.known.clone().unwrap_or(InventoryEntry {
                    kind: entry.resource.kind().to_string(),
                    module: entry.module.clone(),
                    digest: None,
                    origin: Origin::Adopted,
                    held_secrets: entry.resource.holds_secrets(),
                    rolled_back: None,
                });
                held.rolled_back = Some(p.digest.clone());
                w.put_inventory(&entry.id, &held)?;
                continue;
            }
            let ok = match p.action {
                Action::Create | Action::Update => progress.state[p.index] == State::Done && synced,
                // Not looked at, not applied: its entry (if any) stays as it
                // was. Recording it would make a file that was there before
                // "created" (so prunable), and a hand edit of it a "change".
                Action::Skip => false,
                _ => true,
            };
            if !ok || p.action == Action::Report {
                continue;
            }
            let origin = p
                .known
                .as_ref()
                .map(|k| k.origin)
                .unwrap_or(if p.observation.exists {
                    Origin::Adopted
                } else {
                    Origin::Created
                });
            let held_secrets = entry.resource.holds_secrets();
            let up_to_date = p.known.as_ref().is_some_and(|k| {
                k.digest.as_deref() == Some(p.digest.as_str())
                    && k.origin == origin
                    && k.held_secrets == held_secrets
                    && k.rolled_back.is_none()
            });
            if !up_to_date {
                w.put_inventory(
                    &entry.id,
                    &InventoryEntry {
                        kind: entry.resource.kind().to_string(),
                        module: entry.module.clone(),
                        digest: Some(p.digest.clone()),
                        origin,
                        held_secrets,
                        rolled_back: None,
                    },
                )?;
            }
        }
        for (p, result) in plan.prunes.iter().zip(prunes) {
            if result.is_ok() {
                w.remove_inventory(&p.id)?;
            }
        }
        Ok(())
    })
}

/// What the handler step did to one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Handled {
    Nothing,
    /// A service restarted for the notifying resources named.
    Restarted(String),
    /// A service that did not restart or come up; or a restore that failed.
    Failed(String),
    /// A resource put back to its previous state (not recorded as applied)
    /// because `service` did not come up.
    RolledBack {
        why: String,
        service: String,
    },
    /// A service that did not come up; what fed it was put back (the
    /// service itself had not changed).
    FailedRolledBack {
        why: String,
        service: String,
    },
}

struct HandlerState<'a> {
    /// Applied successfully this run.
    done: Vec<bool>,
    /// Started or restarted by its own apply.
    started: &'a [bool],
    cancelled: &'a dyn Fn() -> bool,
}

/// Restarts each notified service once (unless its own apply already
/// (re)started it), waits for every (re)started service to come up, and
/// on failure restores the resources changed this run that it depends on
/// (its notifiers and itself) and restarts it on the old configuration.
fn handlers(plan: &Plan, host: &Host, st: &mut HandlerState<'_>) -> Vec<Handled> {
    let entries = &plan.catalog.entries;
    let mut out = vec![Handled::Nothing; entries.len()];
    let planned: std::collections::HashMap<usize, &crate::plan::Planned> =
        plan.resources.iter().map(|p| (p.index, p)).collect();
    let changed = |i: usize| {
        st.done[i]
            && planned
                .get(&i)
                .is_some_and(|p| matches!(p.action, Action::Create | Action::Update))
    };
    // Service index → the changed resources notifying it.
    let mut notified: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, e) in entries.iter().enumerate() {
        if changed(i) {
            for &t in &e.notifies {
                notified.entry(t).or_default().push(i);
            }
        }
    }
    for s in 0..entries.len() {
        let by = notified.get(&s).cloned().unwrap_or_default();
        let own_start = st.started[s];
        if by.is_empty() && !own_start {
            continue;
        }
        if (st.cancelled)() {
            break;
        }
        let service = &entries[s];
        // A service whose own apply failed (or was skipped) is reported as such.
        let own_failed = planned
            .get(&s)
            .is_some_and(|p| matches!(p.action, Action::Create | Action::Update))
            && !st.done[s];
        if own_failed || planned.get(&s).is_some_and(|p| p.action == Action::Skip) {
            continue;
        }
        let names = by
            .iter()
            .map(|&i| entries[i].id.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let Some(startable) = service.resource.as_startable() else {
            continue;
        };
        let mut restarted = own_start;
        if !own_start {
            match startable.notified(host) {
                Ok(true) => {
                    restarted = true;
                    out[s] = Handled::Restarted(names.clone());
                }
                Ok(false) => {}
                Err(e) => {
                    out[s] = Handled::Failed(format!("restart (notified by {names}) failed: {e}"));
                    continue;
                }
            }
        }
        if !restarted {
            continue;
        }
        let Err(why) = startable.wait_up(host) else {
            continue;
        };
        // Roll back what changed this run and feeds the service.
        let mut to_restore: Vec<usize> = by.clone();
        if changed(s) {
            to_restore.push(s);
        }
        let restorable: Vec<usize> = to_restore
            .into_iter()
            .filter(|&i| planned.get(&i).is_some_and(|p| p.observation.exists))
            .collect();
        if restorable.is_empty() {
            out[s] = Handled::Failed(format!(
                "did not come up: {why}; nothing to roll back to (it is new this run)"
            ));
            continue;
        }
        let mut restored = Vec::new();
        let mut restore_errors = Vec::new();
        for &i in &restorable {
            let result = match entries[i].resource.as_restorable() {
                Some(r) => r.restore(&planned[&i].observation, host),
                None => Err(resources::ResourceError::NotRestorable {
                    kind: entries[i].resource.kind(),
                }),
            };
            match result {
                Ok(()) => restored.push(i),
                Err(e) => restore_errors.push(format!("{}: {e}", entries[i].id)),
            }
        }
        let list = restored
            .iter()
            .map(|&i| entries[i].id.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let after = match startable.notified(host) {
            Ok(_) => match startable.wait_up(host) {
                Ok(()) => "running the previous configuration".to_string(),
                Err(e) => format!("still not up after the rollback: {e}"),
            },
            Err(e) => format!("restart after the rollback failed: {e}"),
        };
        let mut msg = format!(
            "did not come up after the change: {why}; {} rolled back ({list}); {after}",
            service.id
        );
        if !restore_errors.is_empty() {
            msg.push_str(&format!(
                "; could not restore: {}",
                restore_errors.join("; ")
            ));
        }
        for &i in &restored {
            if i != s {
                out[i] = Handled::RolledBack {
                    why: format!(
                        "rolled back: {} did not come up with this change",
                        service.id
                    ),
                    service: service.id.clone(),
                };
            }
        }
        out[s] = if restored.contains(&s) {
            Handled::RolledBack {
                why: msg,
                service: service.id.clone(),
            }
        } else {
            Handled::FailedRolledBack {
                why: msg,
                service: service.id.clone(),
            }
        };
    }
    out
}
