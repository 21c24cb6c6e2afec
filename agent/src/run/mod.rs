//! One run, wired once for every caller: a loaded catalog → plan (every
//! target) → apply (exactly that plan) → record. `agent plan`, `agent
//! apply` and the daemon are adapters that print or emit the typed
//! [`RunReport`]; none of them wires the stages itself.
//!
//! # Targets
//! A run converges two kinds of target: the host's native resources
//! ([`crate::plan`] / [`crate::apply`]) and the host's Kubernetes stacks
//! ([`crate::k8s`]). Each is planned once, and apply carries out that plan;
//! both report the one [`crate::apply::Outcome`] type and the one
//! [`RunCounts`]. The host comes first: a stack never holds the host's
//! own resources up, and each stack fails alone.
//!
//! A run may be limited to some resources, modules or stacks
//! ([`Targets::Limited`], `--target`): [`select::limit`] cuts the catalog and
//! the inventory down once, before the plan, and every stage works on
//! that. Its record names the targets and it leaves the host's applied
//! revision alone (the host was not converged as a whole).

pub mod record;
pub mod select;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use homelab_agent_state::{
    DigestKey, InventoryEntry, Lock, RunCounts, RunRecord, StateError, Store,
};

use crate::apply::{ApplyError, ApplyReport};
use crate::desired::catalog::Catalog;
use crate::k8s::apply::{StackReport, StacksPlan};
use crate::k8s::client::KubeSettings;
use crate::k8s::plan::StackPlan;
use crate::plan::Plan;
use crate::resources::Host;
use crate::telemetry::{Phase, Phases};

/// Why a run stopped before it could apply anything.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    State(#[from] StateError),
    /// A `--target` that cannot be run: nothing was planned or changed.
    #[error(transparent)]
    Select(#[from] select::SelectError),
}

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Observe and diff every target; never writes (`agent plan`).
    Plan,
    /// Plan, then carry the plan out and record it (the caller holds the
    /// state directory's lock).
    Apply,
}

/// Which targets a run covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// The host's resources and its stacks.
    All,
    /// The host's resources alone (the daemon heals native drift this way
    /// while a stack waits for its rollout).
    HostOnly,
    /// The selected resources, modules and stacks with what they need
    /// (`--target`, see [`select`]); the rest is not looked at. The
    /// catalog must not be shared (a limited run cuts it down).
    Limited(select::Selection),
}

/// Where and how a run works.
pub struct RunContext<'a> {
    pub host: &'a Host,
    pub state_dir: &'a Path,
    pub kube: &'a KubeSettings,
    /// What started it: `cli`, `poll`, `webhook`, `watch`, ...
    pub trigger: &'a str,
    /// Set by SIGTERM: the resource in progress finishes, the rest wait.
    pub cancel: Option<&'a AtomicBool>,
    /// Removes the run's secret values (and URL credentials) from every
    /// message of the report.
    pub scrub: &'a dyn Fn(&str) -> String,
    /// Called after the native plan, before anything is applied (the
    /// daemon points its drift watchers at the catalog there).
    pub on_planned: Option<&'a dyn Fn(&Plan)>,
    /// Called after the native apply, before the stacks.
    pub on_host_applied: Option<&'a dyn Fn()>,
    /// Called on every poll while a stack waits, with the run's open state
    /// (the daemon heals native drift there: [`heal`]).
    pub idle: Option<&'a dyn Fn(&Store)>,
}

/// What a run found and did.
pub struct RunReport {
    /// The host's plan (its catalog is the run's desired state).
    pub plan: Plan,
    /// Each stack's plan.
    pub stacks: Vec<StackPlan>,
    /// Stacks in the inventory that the host no longer declares: (name,
    /// objects).
    pub orphans: Vec<(String, usize)>,
    pub apply: ApplyStage,
    /// Wall time per phase (observe, apply, prune).
    pub phases: Phases,
    /// What a limited run covered (`None`: the whole desired state).
    pub limit: Option<select::Limit>,
}

/// What the apply stage of a run did.
pub enum ApplyStage {
    /// A plan-only run.
    NotAsked,
    /// Some resources could not be observed: nothing was applied.
    Refused(ApplyError),
    Done(Box<Applied>),
}

/// What apply did, and what was recorded.
pub struct Applied {
    pub host: ApplyReport,
    pub stacks: Vec<StackReport>,
    /// The run's record in the state.
    pub record: RunRecord,
}

impl Applied {
    /// Something failed (exit 1): the record's result is `partial` or
    /// `failed`, the one rule readiness and the last-success metric follow
    /// too. Skipped resources are not failures.
    pub fn failed(&self) -> bool {
        self.record.result.failed()
    }

    /// Changed a target, or left something undone: skipped, or drift
    /// reported (`--detailed-exitcode` 2).
    pub fn changed_anything(&self) -> bool {
        changed(&self.record.counts)
    }

    /// The counts of every target together.
    pub fn counts(&self) -> &RunCounts {
        &self.record.counts
    }
}

fn changed(c: &RunCounts) -> bool {
    c.created + c.changed + c.drift_healed + c.pruned + c.skipped + c.drift_reported > 0
}

impl RunReport {
    /// The plan found something it could not look at (a resource, a stack
    /// or one of its objects).
    pub fn plan_failed(&self) -> bool {
        !self.plan.failures.is_empty() || crate::k8s::plan::total(&self.stacks).errors > 0
    }

    /// The plan has something to do or report (`--detailed-exitcode` 2).
    pub fn plan_has_changes(&self) -> bool {
        self.plan.has_changes() || self.stacks.iter().any(StackPlan::has_changes)
    }

    pub fn applied(&self) -> Option<&Applied> {
        match &self.apply {
            ApplyStage::Done(a) => Some(a),
            _ => None,
        }
    }
}

/// Runs `catalog` through the stages for `mode`.
pub fn run(
    catalog: impl Into<Arc<Catalog>>,
    mode: Mode,
    targets: Targets,
    cx: &RunContext<'_>,
) -> Result<RunReport, RunError> {
    run_in(catalog.into(), mode, targets, cx, None)
}

/// A run of the host's resources alone inside a run in progress (its
/// state already open): the daemon heals native drift this way while a
/// stack waits for its rollout. Recorded as a run of its own.
pub fn heal(
    catalog: Arc<Catalog>,
    cx: &RunContext<'_>,
    store: &Store,
) -> Result<RunReport, RunError> {
    run_in(catalog, Mode::Apply, Targets::HostOnly, cx, Some(store))
}

fn run_in(
    catalog: Arc<Catalog>,
    mode: Mode,
    targets: Targets,
    cx: &RunContext<'_>,
    open: Option<&Store>,
) -> Result<RunReport, RunError> {
    let host_name = catalog.host.name.clone();
    let mut phases = Phases::default();
    let mut inventory = match (mode, open) {
        (_, Some(store)) => store.inventory(&host_name)?,
        (Mode::Plan, None) => read_inventory(cx.state_dir, &host_name)?,
        // The caller holds the lock: recovering a database a killed agent
        // left open is safe here.
        (Mode::Apply, None) => {
            Store::open_read_only_recovering(cx.state_dir)?.inventory(&host_name)?
        }
    };
    let mut catalog = catalog;
    let mut limit = None;
    if let Targets::Limited(selection) = &targets {
        let whole = Arc::try_unwrap(catalog).map_err(|_| select::SelectError::Shared)?;
        let (c, i, l) = select::limit(whole, inventory, selection)?;
        catalog = Arc::new(c);
        inventory = i;
        limit = Some(l);
    }
    // Planned from a read-only key, so a plan that cannot be applied
    // leaves the state directory untouched.
    let key = DigestKey::load(cx.state_dir, false)?;
    let mut plan = phases.time(Phase::Observe, || {
        crate::plan::plan(catalog.clone(), cx.host, &inventory, &key)
    });
    let orphans = crate::k8s::plan::orphaned_stacks(&catalog, &inventory);
    let with_stacks = targets != Targets::HostOnly;
    if mode == Mode::Plan || !plan.failures.is_empty() {
        let mut stacks = StacksPlan::default();
        if with_stacks && mode == Mode::Plan {
            stacks = phases.time(Phase::Observe, || {
                crate::k8s::apply::plan_stacks(&catalog, &inventory, &key, cx.kube)
            });
        }
        stacks.scrub(cx.scrub);
        let apply = match mode {
            Mode::Plan => ApplyStage::NotAsked,
            Mode::Apply => ApplyStage::Refused(crate::apply::refuse(&plan)),
        };
        return Ok(RunReport {
            plan,
            stacks: stacks.plans,
            orphans,
            apply,
            phases,
            limit,
        });
    }
    let key = DigestKey::load(cx.state_dir, true)?;
    // Temp files are signed with it, so a later run knows its leftovers.
    cx.host.fs.set_temp_key(key.bytes());
    plan.rekey(&key);
    let mut stacks = StacksPlan::default();
    if with_stacks {
        stacks = phases.time(Phase::Observe, || {
            crate::k8s::apply::plan_stacks(&catalog, &inventory, &key, cx.kube)
        });
    }
    if let Some(f) = cx.on_planned {
        f(&plan);
    }
    let owned;
    let store = match open {
        Some(store) => store,
        None => {
            owned = Store::open(cx.state_dir)?;
            &owned
        }
    };
    let started = Instant::now();
    let host_report =
        match crate::apply::apply_cancellable(&plan, cx.host, store, cx.trigger, cx.cancel) {
            Ok(r) => r,
            Err(ApplyError::State(e)) => return Err(e.into()),
            Err(refused) => {
                return Ok(RunReport {
                    plan,
                    stacks: stacks.plans,
                    orphans,
                    apply: ApplyStage::Refused(refused),
                    phases,
                    limit,
                })
            }
        };
    phases.add(
        Phase::Apply,
        started.elapsed().saturating_sub(host_report.prune_duration),
    );
    phases.add(Phase::Prune, host_report.prune_duration);
    if let Some(f) = cx.on_host_applied {
        f();
    }
    let mut stack_plans = stacks.plans.clone();
    let stacks_started = Instant::now();
    let idle = cx.idle.map(|f| move || f(store));
    let idle = idle.as_ref().map(|f| f as &crate::k8s::apply::Idle<'_>);
    let mut stack_reports = stacks.apply(&catalog, store, cx.cancel, idle);
    // Stacks run side by side: the longest health wait is the phase's time.
    let health = stack_reports
        .iter()
        .map(|s| s.health_wait)
        .max()
        .unwrap_or_default();
    phases.add(
        Phase::Apply,
        stacks_started.elapsed().saturating_sub(health),
    );
    if !health.is_zero() {
        phases.add(Phase::Health, health);
    }
    for st in &mut stack_reports {
        st.scrub(cx.scrub);
    }
    for p in &mut stack_plans {
        p.scrub(cx.scrub);
    }
    let record = record::finish_run(
        store,
        &host_name,
        &record::RunInfo {
            trigger: cx.trigger,
            revision: &catalog.revision,
            targets: limit.as_ref().map_or(&[][..], |l| &l.targets[..]),
        },
        &host_report,
        &stack_reports,
    )?;
    Ok(RunReport {
        plan,
        stacks: stack_plans,
        orphans,
        apply: ApplyStage::Done(Box::new(Applied {
            host: host_report,
            stacks: stack_reports,
            record,
        })),
        phases,
        limit,
    })
}

/// The inventory for a plan. Plans never write, with one exception: a
/// database left needing recovery by a killed agent is recovered (under the
/// lock, so never under a running apply); that changes no record in it.
fn read_inventory(
    state_dir: &Path,
    host: &str,
) -> Result<BTreeMap<String, InventoryEntry>, StateError> {
    match Store::open_read_only(state_dir) {
        Err(StateError::NeedsRecovery { .. }) => {
            let _lock = Lock::acquire(
                state_dir,
                &format!("agent plan --host {host} (recovering state)"),
            )?;
            Store::open_read_only_recovering(state_dir)?.inventory(host)
        }
        other => other?.inventory(host),
    }
}
