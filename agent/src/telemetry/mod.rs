//! Drift you can see: Prometheus metrics and Loki events about the runs.
//!
//! - `metrics.rs`: the metric set (prometheus-client), served at `/metrics`
//!   as OpenMetrics or Prometheus text, and written as a node-exporter
//!   textfile by `agent plan|apply --metrics-file`.
//! - `events.rs`: what a run tells Loki (apply actions, drift, corrections,
//!   prunes, refused revisions, rollbacks, errors), derived from the plan and
//!   the apply report.
//! - `loki.rs`: the shipper: a bounded queue and one background thread that
//!   batches events to Loki's JSON push API.
//!
//! This layer only *reads* what the stages produce (plan, apply report,
//! state record); it never changes them. **Invariant:** secret values never
//! reach it: events and labels carry ids, kinds, modules, field names,
//! revisions and error messages, never file contents or diffs.

pub mod events;
pub mod logfile;
pub mod loki;
pub mod metrics;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::apply::ApplyReport;
use crate::config::LokiConfig;
use crate::plan::{Action, Classification, Plan};
use crate::secrets::resolve::{SecretError, SecretSource};
use events::Event;
use loki::{LokiError, Shipper};
use metrics::Metrics;

/// A stage of a run, for durations and failures. Label values are the
/// [`Phase::name`]s; the set is fixed (bounded cardinality).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Resolve the source: fetch, open the commit, verify its signature.
    Fetch,
    /// Load the desired state: parse, render templates, resolve secrets.
    Render,
    /// Observe and diff every resource (the plan).
    Observe,
    /// Create and update resources.
    Apply,
    /// Remove what left the desired state.
    Prune,
    /// Wait for workloads to become healthy (Kubernetes stacks).
    Health,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Fetch,
        Phase::Render,
        Phase::Observe,
        Phase::Apply,
        Phase::Prune,
        Phase::Health,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Fetch => "fetch",
            Phase::Render => "render",
            Phase::Observe => "observe",
            Phase::Apply => "apply",
            Phase::Prune => "prune",
            Phase::Health => "health",
        }
    }
}

/// Time spent per phase in one run (phases that did not run are absent).
#[derive(Debug, Clone, Default)]
pub struct Phases {
    spent: [Option<Duration>; 6],
}

impl Phases {
    /// Runs `f`, adding its wall time to `phase`.
    pub fn time<T>(&mut self, phase: Phase, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.add(phase, start.elapsed());
        out
    }

    /// Adds `d` to `phase`.
    pub fn add(&mut self, phase: Phase, d: Duration) {
        let slot = &mut self.spent[phase as usize];
        *slot = Some(slot.unwrap_or_default() + d);
    }

    /// Adds every phase of `other`.
    pub fn add_all(&mut self, other: &Phases) {
        for (phase, d) in other.iter() {
            self.add(phase, d);
        }
    }

    pub fn get(&self, phase: Phase) -> Option<Duration> {
        self.spent[phase as usize]
    }

    /// The phases that ran, in order.
    pub fn iter(&self) -> impl Iterator<Item = (Phase, Duration)> + '_ {
        Phase::ALL
            .into_iter()
            .filter_map(|p| self.get(p).map(|d| (p, d)))
    }
}

/// How a run ended, as the `result` label of `homelab_agent_runs_total`:
/// the run record's [`RunResult`](homelab_agent_state::RunResult), or
/// `error` for a run that stopped before it applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// Everything converged.
    Success,
    /// Nothing failed; some resources were skipped (a secret did not
    /// resolve, a held change).
    Skipped,
    /// Some resources failed; others were applied.
    Partial,
    /// Nothing could be applied (every change failed).
    Failed,
    /// The run stopped before apply (no usable revision, resources that
    /// could not be observed, state unreadable, state directory locked).
    Error,
    /// Applying is suspended (`agent suspend`): the run planned, reported
    /// drift and applied nothing.
    Suspended,
}

impl RunOutcome {
    pub const ALL: [RunOutcome; 6] = [
        RunOutcome::Success,
        RunOutcome::Skipped,
        RunOutcome::Partial,
        RunOutcome::Failed,
        RunOutcome::Error,
        RunOutcome::Suspended,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RunOutcome::Success => "success",
            RunOutcome::Skipped => "skipped",
            RunOutcome::Partial => "partial",
            RunOutcome::Failed => "failed",
            RunOutcome::Error => "error",
            RunOutcome::Suspended => "suspended",
        }
    }
}

impl From<homelab_agent_state::RunResult> for RunOutcome {
    fn from(r: homelab_agent_state::RunResult) -> RunOutcome {
        use homelab_agent_state::RunResult;
        match r {
            RunResult::Success => RunOutcome::Success,
            RunResult::Skipped => RunOutcome::Skipped,
            RunResult::Partial => RunOutcome::Partial,
            RunResult::Failed => RunOutcome::Failed,
        }
    }
}

/// Metrics plus (when configured) the Loki shipper: what the daemon and the
/// CLI report through.
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    loki: RwLock<Option<(LokiConfig, Shipper)>>,
    /// What the previous run left drifted or failing, so a drift that
    /// persists (`on_drift: report`) or a resource failing the same way run
    /// after run is counted and sent once, not once per poll.
    last: std::sync::Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// Ids still drifted after the run.
    drifted: std::collections::HashSet<String>,
    /// (id, error) of resources that failed or were skipped.
    errors: std::collections::HashSet<(String, String)>,
}

impl Telemetry {
    /// Metrics for `host`; a shipper when `loki` is set (its password file
    /// is read now, so a bad one is a start-up error).
    pub fn new(host: &str, loki: Option<&LokiConfig>) -> Result<Telemetry, LokiError> {
        let t = Telemetry {
            metrics: Arc::new(Metrics::new(host)),
            loki: RwLock::new(None),
            last: Default::default(),
        };
        t.configure(host, loki)?;
        Ok(t)
    }

    /// Applies a (re)loaded config: a new shipper if the Loki settings or
    /// the host changed (the old one sends what it holds and stops), then
    /// the host label. On error nothing changes.
    pub fn configure(&self, host: &str, loki: Option<&LokiConfig>) -> Result<(), LokiError> {
        let mut slot = self.loki.write().unwrap_or_else(|e| e.into_inner());
        let unchanged = slot.as_ref().map(|(c, _)| c) == loki && self.metrics.host() == host;
        if !unchanged {
            let new = match loki {
                None => None,
                Some(c) => Some((c.clone(), Shipper::start(c, host, self.metrics.clone())?)),
            };
            *slot = new;
        }
        self.metrics.set_host(host);
        Ok(())
    }

    /// Queues events for Loki (nothing without a `loki:` config).
    pub fn emit(&self, events: impl IntoIterator<Item = Event>) {
        let slot = self.loki.read().unwrap_or_else(|e| e.into_inner());
        if let Some((_, shipper)) = slot.as_ref() {
            let events: Vec<Event> = events.into_iter().collect();
            shipper.push_all(&events);
        }
    }

    /// A plan that was not applied: the resource gauges only.
    pub fn observe_plan(&self, plan: &Plan) {
        self.metrics
            .set_resources(metrics::resource_table(plan, None));
    }

    /// A run while applying is suspended (`agent suspend`): gauges, and a
    /// drift counted and sent once when it appears (`not healed: applying is
    /// suspended`); the heal after `agent resume` is then a correction of
    /// that drift, not a new one.
    pub fn observe_suspended_plan(&self, plan: &Plan, trigger: &str) {
        self.metrics
            .set_resources(metrics::resource_table(plan, None));
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let mut drifted = std::collections::HashSet::new();
        let mut out = Vec::new();
        for p in plan
            .resources
            .iter()
            .filter(|p| p.class == Classification::Drift)
        {
            let entry = &plan.catalog.entries[p.index];
            drifted.insert(entry.id.clone());
            if last.drifted.contains(&entry.id) {
                continue;
            }
            self.metrics
                .drift_event(&entry.module, entry.resource.kind());
            let fields: Vec<String> = p.changes.iter().map(|c| c.field.to_string()).collect();
            let mut e = events::Event::new(
                events::EventKind::Drift,
                format!(
                    "{} drifted{}: not healed (applying is suspended)",
                    entry.id,
                    if fields.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", fields.join(", "))
                    }
                ),
            );
            e.resource = Some(entry.id.clone());
            e.kind = Some(entry.resource.kind().to_string());
            e.module = Some(entry.module.clone());
            e.revision = Some(plan.catalog.revision.clone());
            e.trigger = Some(trigger.to_string());
            e.action = Some("none");
            e.changes = fields;
            out.push(e);
        }
        last.drifted = drifted;
        drop(last);
        self.emit(out);
    }

    /// An applied run: gauges, drift counters and the run's events.
    /// A drift still there from the previous run, or a resource failing with
    /// the same error again, is not counted or sent again. (The run's
    /// outcome is its record's result: `RunOutcome::from`.)
    pub fn observe_apply(&self, plan: &Plan, report: &ApplyReport, trigger: &str) {
        let events = self.account(plan, report, trigger);
        self.emit(events);
    }

    /// [`Telemetry::observe_apply`] without sending: counts, and returns the
    /// events to send.
    fn account(&self, plan: &Plan, report: &ApplyReport, trigger: &str) -> Vec<Event> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let mut now = Seen::default();
        self.metrics
            .set_resources(metrics::resource_table(plan, Some(report)));
        let kinds: std::collections::HashMap<&str, (&str, &str)> = plan
            .catalog
            .entries
            .iter()
            .map(|e| (e.id.as_str(), (e.module.as_str(), e.resource.kind())))
            .collect();
        let mut apply_failed = false;
        let mut prune_failed = false;
        for o in &report.outcomes {
            if o.class == Classification::Drift {
                let (module, kind) = kinds.get(o.id.as_str()).copied().unwrap_or_default();
                let healed = o.error.is_none() && o.action != Action::Report;
                if !last.drifted.contains(&o.id) {
                    self.metrics.drift_event(module, kind);
                }
                if healed {
                    self.metrics.correction(module, kind);
                } else {
                    now.drifted.insert(o.id.clone());
                }
            }
            if o.error.is_some() && o.class != Classification::Skipped {
                match o.class {
                    Classification::Prune => prune_failed = true,
                    _ => apply_failed = true,
                }
            }
        }
        if apply_failed {
            self.metrics.phase_failed(Phase::Apply);
        }
        if prune_failed {
            self.metrics.phase_failed(Phase::Prune);
        }
        let mut events = events::for_run(plan, report, trigger);
        events.retain(|e| {
            let id = e.resource.clone().unwrap_or_default();
            match e.event {
                events::EventKind::Drift => !last.drifted.contains(&id),
                events::EventKind::Error => {
                    let key = (id, e.error.clone().unwrap_or_default());
                    let new = !last.errors.contains(&key);
                    now.errors.insert(key);
                    new
                }
                _ => true,
            }
        });
        *last = now;
        events
    }

    /// A run that stopped before finishing: in `phase` (counted), or
    /// outside the phases (`stage`: `state`, reading or writing the state).
    pub fn run_error(
        &self,
        phase: Option<Phase>,
        stage: &str,
        revision: Option<&str>,
        error: &str,
        trigger: &str,
    ) {
        if let Some(phase) = phase {
            self.metrics.phase_failed(phase);
        }
        self.emit([events::run_error(stage, revision, error, trigger)]);
    }

    /// Wraps a run's secret source so failed references are counted.
    pub fn count_secrets(&self, inner: Arc<dyn SecretSource>) -> Arc<dyn SecretSource> {
        Arc::new(CountingSecrets {
            inner,
            metrics: self.metrics.clone(),
        })
    }

    /// Sends what is queued for Loki, waiting at most `limit`.
    pub fn flush(&self, limit: Duration) {
        let slot = self.loki.read().unwrap_or_else(|e| e.into_inner());
        if let Some((_, shipper)) = slot.as_ref() {
            if !shipper.shutdown(limit) {
                tracing::warn!(
                    pending = shipper.pending(),
                    "loki: events still unsent at exit"
                );
            }
        }
    }
}

/// A secret source that counts failed references by reason.
struct CountingSecrets {
    inner: Arc<dyn SecretSource>,
    metrics: Arc<Metrics>,
}

impl SecretSource for CountingSecrets {
    fn resolve(
        &self,
        reference: &crate::secrets::Reference,
    ) -> Result<crate::secrets::SecretValue, SecretError> {
        let r = self.inner.resolve(reference);
        if let Err(e) = &r {
            self.metrics.secret_error(e);
        }
        r
    }
}

/// Wall-clock Unix time in nanoseconds.
pub(crate) fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::events::EventKind;
    use super::metrics::{resource_table, ResourceCounts};
    use super::*;
    use crate::fsops::Fs;
    use crate::resources::{Host, Platform};
    use crate::secrets::resolve::SecretSource;
    use crate::source::LocalDir;

    const SECRET: &str = "hunter2-telemetry-secret";

    struct Static;
    impl SecretSource for Static {
        fn resolve(
            &self,
            _r: &crate::secrets::Reference,
        ) -> Result<crate::secrets::SecretValue, SecretError> {
            Ok(crate::secrets::SecretValue::new(SECRET))
        }
    }

    fn write(dir: &Path, rel: &str, content: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    /// Plans (and applies) the repo in `repo` onto the sandbox `root`.
    fn run(repo: &Path, root: &Path, apply: bool) -> (Plan, Option<ApplyReport>) {
        let opts = crate::desired::LoadOptions {
            secrets: Arc::new(Static),
            ..Default::default()
        };
        let catalog =
            crate::desired::load_with(Arc::new(LocalDir::open(repo).unwrap()), "lab", &opts)
                .unwrap();
        let host = Host::new(Fs::new(root).unwrap(), true, Platform::Linux);
        let state = root.join("state");
        let key = homelab_agent_state::DigestKey::load(&state, true).unwrap();
        let inventory = homelab_agent_state::Store::open_read_only(&state)
            .and_then(|s| s.inventory("lab"))
            .unwrap();
        let plan = crate::plan::plan(catalog, &host, &inventory, &key);
        let report = apply.then(|| {
            let store = homelab_agent_state::Store::open(&state).unwrap();
            crate::apply::apply(&plan, &host, &store, "test").unwrap()
        });
        (plan, report)
    }

    #[test]
    fn a_run_becomes_gauges_and_events_without_secret_values() {
        let repo = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        write(
            repo.path(),
            "hosts/lab.yaml",
            "platform: linux\nroots: [/srv]\nmodules: [{name: m}]\n",
        );
        let module = |extra: &str| {
            format!(
                "resources:\n  - directory: /srv/d\n  - file: /srv/d/heal\n    content: \"a\\n\"\n  - file: /srv/d/report\n    content: \"r\\n\"\n    on_drift: report\n  - file: /srv/d/pw\n    content: \"pw={{{{ secret('op://v/i/f') }}}}\\n\"\n{extra}"
            )
        };
        write(
            repo.path(),
            "modules/m/module.yaml",
            &module("  - file: /srv/d/gone\n    content: \"g\\n\"\n"),
        );
        let (_, report) = run(repo.path(), root.path(), true);
        assert_eq!(report.unwrap().counts.created, 5);
        // Hand edits (one healed, one report-only, one holding a secret), a
        // resource removed from the desired state, one added.
        let live = |p: &str| root.path().join(p.trim_start_matches('/'));
        std::fs::write(live("/srv/d/heal"), "edited\n").unwrap();
        std::fs::write(live("/srv/d/report"), "edited\n").unwrap();
        std::fs::write(live("/srv/d/pw"), "pw=edited\n").unwrap();
        write(
            repo.path(),
            "modules/m/module.yaml",
            &module("  - file: /srv/d/new\n    content: \"n\\n\"\n"),
        );
        let (plan, _) = run(repo.path(), root.path(), false);
        let file = |t: &metrics::ResourceTable| t[&("m".to_string(), "file".to_string())];
        assert_eq!(
            file(&resource_table(&plan, None)),
            ResourceCounts {
                managed: 4,
                drifted: 3,
                // heal, pw, new, prune of gone (report is drift, not pending)
                pending: 4
            }
        );
        let (plan, report) = run(repo.path(), root.path(), true);
        let mut report = report.unwrap();
        assert_eq!(
            file(&resource_table(&plan, Some(&report))),
            ResourceCounts {
                managed: 4,
                drifted: 1,
                pending: 0
            }
        );
        // A service handler's rollback shows as its own event.
        report.outcomes.push(crate::apply::Outcome {
            id: "service:web".into(),
            action: Action::Update,
            class: Classification::Change,
            fields: vec!["config".into()],
            error: Some("health check failed".into()),
            note: Some("rolled back".into()),
            reason: Some(crate::apply::Reason::RolledBack {
                service: "service:web".into(),
            }),
        });
        let events = events::for_run(&plan, &report, "watch");
        let mut by_kind: HashMap<EventKind, Vec<&events::Event>> = HashMap::new();
        for e in &events {
            by_kind.entry(e.event).or_default().push(e);
        }
        let ids = |k: EventKind| -> Vec<&str> {
            let mut v: Vec<&str> = by_kind
                .get(&k)
                .map(|v| v.iter().map(|e| e.resource.as_deref().unwrap()).collect())
                .unwrap_or_default();
            v.sort();
            v
        };
        assert_eq!(
            ids(EventKind::Drift),
            ["file:/srv/d/heal", "file:/srv/d/pw", "file:/srv/d/report"]
        );
        assert_eq!(
            ids(EventKind::Correction),
            ["file:/srv/d/heal", "file:/srv/d/pw"]
        );
        assert_eq!(ids(EventKind::Apply), ["file:/srv/d/new"]);
        assert_eq!(ids(EventKind::Prune), ["file:/srv/d/gone"]);
        assert_eq!(ids(EventKind::Rollback), ["service:web"]);
        assert_eq!(ids(EventKind::Error), ["service:web"]);
        let heal = by_kind[&EventKind::Correction][0];
        assert_eq!(heal.module.as_deref(), Some("m"));
        assert_eq!(heal.kind.as_deref(), Some("file"));
        assert_eq!(heal.trigger.as_deref(), Some("watch"));
        assert_eq!(
            heal.revision.as_deref(),
            Some(plan.catalog.revision.as_str())
        );
        assert_eq!(heal.changes, ["content"]);
        for e in &events {
            let line = e.line();
            assert!(!line.contains(SECRET) && !line.contains("edited"), "{line}");
        }
        // And the metrics of the run hold no value either.
        let t = Telemetry::new("lab", None).unwrap();
        let first = t.account(&plan, &report, "watch");
        assert_eq!(first.len(), events.len());
        // The same run again (the report-only drift still there, the same
        // failure): nothing new to count or send but the heals.
        let again: Vec<EventKind> = t
            .account(&plan, &report, "poll")
            .iter()
            .map(|e| e.event)
            .collect();
        assert!(
            !again.contains(&EventKind::Error)
                && again.iter().filter(|k| **k == EventKind::Drift).count() == 2,
            "{again:?}"
        );
        // Three runs seen: heal and pw drift (and are healed) in each, the
        // report-only drift is counted once.
        t.observe_apply(&plan, &report, "watch");
        let text = t.metrics.openmetrics();
        assert!(!text.contains(SECRET), "{text}");
        assert!(
            text.contains(
                "homelab_agent_drift_corrections_total{host=\"lab\",module=\"m\",kind=\"file\"} 6"
            ) && text.contains(
                "homelab_agent_drift_events_total{host=\"lab\",module=\"m\",kind=\"file\"} 7"
            ),
            "{text}"
        );
    }

    #[test]
    fn phases_accumulate_and_iterate_in_order() {
        let mut p = Phases::default();
        p.add(Phase::Prune, Duration::from_millis(5));
        p.add(Phase::Fetch, Duration::from_millis(1));
        p.add(Phase::Fetch, Duration::from_millis(2));
        let v: Vec<_> = p.iter().map(|(p, d)| (p.name(), d.as_millis())).collect();
        assert_eq!(v, [("fetch", 3), ("prune", 5)]);
        assert_eq!(p.time(Phase::Observe, || 7), 7);
        assert!(p.get(Phase::Observe).is_some());
        assert!(p.get(Phase::Health).is_none());
    }
}
