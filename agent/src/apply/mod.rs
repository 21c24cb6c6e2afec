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
    /// When the run started (its record's key for the stacks' counts).
    #[serde(skip)]
    pub started_ms: u64,
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
                    rolled_back: None,
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
        /// Applied, then put back: the service it notifies did not come up.
        RolledBack,
    }
    let mut state = vec![State::Untouched; entries.len()];
    let mut errors: Vec<Option<String>> = vec![None; entries.len()];
    let mut started = vec![false; entries.len()];
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
                .as_deref()
                .or(p.note)
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
        let result = entry.resource.apply(&p.observation, &p.changes, &mut ctx);
        started[p.index] = ctx.take_started();
        match result {
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

    // 3b. Handlers: restart notified services once, wait for every started
    // service to come up, roll back what made one fail.
    let handled = handlers(
        plan,
        host,
        &mut HandlerState {
            done: state.iter().map(|s| *s == State::Done).collect(),
            started: &started,
            cancelled: &cancelled,
        },
    );
    for (i, h) in handled.iter().enumerate() {
        match h {
            Handled::Nothing => {}
            Handled::Restarted(_) => {}
            Handled::Failed(why) | Handled::FailedRolledBack(why) => {
                state[i] = State::Failed;
                errors[i] = Some(why.clone());
            }
            Handled::RolledBack(why) => {
                state[i] = State::RolledBack;
                errors[i] = Some(why.clone());
            }
        }
    }

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
        let (restarted, rolled_back) = match &handled[p.index] {
            Handled::Restarted(by) => (Some(by.clone()), false),
            Handled::RolledBack(_) => (None, true),
            Handled::FailedRolledBack(_) => (None, true),
            Handled::Failed(_) => (None, false),
            Handled::Nothing => (None, false),
        };
        // Events and reports recognise a rollback by this note.
        let rollback_note = rolled_back.then(|| "rolled back".to_string());
        if p.class != Classification::InSync {
            outcomes.push(Outcome {
                id: entry.id.clone(),
                action: p.action,
                class: p.class,
                fields: p.changes.iter().map(|c| c.field).collect(),
                error,
                note: rollback_note
                    .or_else(|| restarted.map(|by| format!("restarted (notified by {by})"))),
            });
        } else if restarted.is_some() || error.is_some() {
            outcomes.push(Outcome {
                id: entry.id.clone(),
                action: Action::Restart,
                class: p.class,
                fields: Vec::new(),
                error,
                note: rollback_note.or_else(|| restarted.map(|by| format!("notified by {by}"))),
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
            if state[p.index] == State::RolledBack {
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
                    && k.rolled_back.is_none()
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
                        rolled_back: None,
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
        started_ms,
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
    /// A resource put back to its previous state (not recorded as applied).
    RolledBack(String),
    /// A service that did not come up; what fed it was put back (the
    /// service itself had not changed).
    FailedRolledBack(String),
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
        let mut restarted = own_start;
        if !own_start {
            match service.resource.notified(host) {
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
        let Err(why) = service.resource.wait_up(host) else {
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
            match entries[i].resource.restore(&planned[&i].observation, host) {
                Ok(()) => restored.push(i),
                Err(e) => restore_errors.push(format!("{}: {e}", entries[i].id)),
            }
        }
        let list = restored
            .iter()
            .map(|&i| entries[i].id.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let after = match service.resource.notified(host) {
            Ok(_) => match service.resource.wait_up(host) {
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
                out[i] = Handled::RolledBack(format!(
                    "rolled back: {} did not come up with this change",
                    service.id
                ));
            }
        }
        out[s] = if restored.contains(&s) {
            Handled::RolledBack(msg)
        } else {
            Handled::FailedRolledBack(msg)
        };
    }
    out
}
