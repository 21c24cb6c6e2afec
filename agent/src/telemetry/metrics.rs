//! The agent's Prometheus metrics (prefix `homelab_agent_`), built with
//! prometheus-client.
//!
//! Two kinds of metric live here:
//! - **counters and histograms** (runs, drift events, corrections, durations,
//!   errors by reason, Loki shipping), which only a long-running process
//!   (the daemon) can meaningfully keep;
//! - a **snapshot** of the host after the last run (resources managed,
//!   drifted, pending; revisions; last success; phase durations of the last
//!   run), computed at scrape time by one collector. A one-shot `agent plan`
//!   or `apply` writes only the snapshot, as a node-exporter textfile
//!   (`--metrics-file`), so a host without the daemon still reports.
//!
//! Labels are bounded: `host`, `module` (module or stack), `kind`, and fixed
//! enumerations (`phase`, `trigger`, `result`, `reason`, `role`). No resource
//! ids, no paths, no error text. Revisions appear only on the
//! `homelab_agent_revision_info` pseudo-metric (one series per role).
//!
//! prometheus-client writes OpenMetrics; [`to_prometheus_text`] turns that
//! into the Prometheus text format 0.0.4 for scrapers that ask for it and for
//! the textfile collector.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::{Phase, Phases, RunOutcome};
use crate::apply::ApplyReport;
use crate::plan::{Action, Classification, Plan};

/// Every metric name starts with this (and `_`).
pub const PREFIX: &str = "homelab_agent";

/// `Content-Type` of the OpenMetrics text format.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Histogram buckets for run and phase durations, in seconds: 5 ms to 5 min
/// (a file run takes milliseconds, a Kubernetes health wait minutes).
const DURATION_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0,
];

/// Why a revision was refused (`homelab_agent_source_errors_total{reason}`).
pub const SOURCE_ERROR_REASONS: [&str; 3] = ["fetch", "signature", "validate"];
/// Why a secret reference did not resolve
/// (`homelab_agent_secret_errors_total{reason}`).
pub const SECRET_ERROR_REASONS: [&str; 3] = ["not_configured", "unavailable", "failed"];
/// Why Loki events were dropped
/// (`homelab_agent_loki_events_dropped_total{reason}`).
pub const LOKI_DROP_REASONS: [&str; 3] = ["queue_full", "rejected", "retries_exhausted"];
/// What started a daemon run (`homelab_agent_runs_total{trigger}`): the
/// names of `daemon::queue::Trigger` (a batch counts as its first trigger).
pub const TRIGGERS: [&str; 7] = [
    "startup", "poll", "webhook", "source", "watch", "signal", "manual",
];

/// The `reason` values of `homelab_agent_kube_errors_total` ([`KubeFailure::name`](crate::apply::KubeFailure::name)).
pub const KUBE_ERROR_REASONS: [&str; 7] = [
    "connect",
    "forbidden",
    "not_found",
    "conflict",
    "invalid",
    "timeout",
    "other",
];

/// Why a Kubernetes operation failed: the type stack outcomes carry.
pub use crate::apply::KubeFailure as KubeErrorReason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    host: String,
    module: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    host: String,
    trigger: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    host: String,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    host: String,
    reason: &'static str,
}

/// The `reason` of `notify_errors_total`: the target that failed.
pub const NOTIFY_ERROR_REASONS: [&str; 2] = ["forgejo", "webhook"];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Per (module, kind): what the last run left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceCounts {
    /// In the desired state.
    pub managed: u64,
    /// Live state differs from what was applied, and the run did not heal
    /// it (`on_drift: report`, or the heal failed).
    pub drifted: u64,
    /// Still to do: creates, changes, prunes and heals not (yet) applied.
    pub pending: u64,
}

/// (module, kind) -> counts.
pub type ResourceTable = BTreeMap<(String, String), ResourceCounts>;

/// The host as the last run left it; read at scrape time.
#[derive(Debug, Default, Clone)]
struct Snapshot {
    host: String,
    /// `None` until a plan has been made.
    resources: Option<ResourceTable>,
    fetched: Option<String>,
    applied: Option<String>,
    last_good: Option<String>,
    /// Unix seconds of the last successful run; 0 = never.
    last_success: u64,
    last_phases: Vec<(Phase, f64)>,
    /// Unix seconds applying was suspended at (`agent suspend`); `None`: applying.
    suspended_since: Option<u64>,
}

#[derive(Debug)]
struct SnapshotCollector(Mutex<Snapshot>);

impl SnapshotCollector {
    fn get(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.get().clone();
        let host = s.host.as_str();
        {
            let info = Info::new(vec![("host", host), ("version", env!("CARGO_PKG_VERSION"))]);
            let e = encoder.encode_descriptor(
                "build",
                "Agent version; constant 1",
                None,
                MetricType::Info,
            )?;
            info.encode(e)?;
        }
        if let Some(table) = &s.resources {
            type Pick = fn(&ResourceCounts) -> u64;
            let gauges: [(&str, &str, Pick); 3] = [
                (
                    "managed_resources",
                    "Resources in the desired state of this host, by module (or stack) and kind",
                    |c| c.managed,
                ),
                (
                    "drifted_resources",
                    "Resources whose live state differs from what was applied and was not healed by the last run (on_drift: report, or the heal failed)",
                    |c| c.drifted,
                ),
                (
                    "pending_changes",
                    "Creates, changes, heals and prunes the last run left to do (skipped, failed, or only planned)",
                    |c| c.pending,
                ),
            ];
            for (name, help, pick) in gauges {
                let mut e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                for ((module, kind), counts) in table {
                    let labels = [
                        ("host", host),
                        ("module", module.as_str()),
                        ("kind", kind.as_str()),
                    ];
                    ConstGauge::new(pick(counts)).encode(e.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut e = encoder.encode_descriptor(
                "revision",
                "Revisions of the desired state by role: fetched (newest seen), applied (last applied with no resource failed), last_good (newest that fetched, verified, validated and applied); constant 1",
                None,
                MetricType::Info,
            )?;
            for (role, rev) in [
                ("fetched", &s.fetched),
                ("applied", &s.applied),
                ("last_good", &s.last_good),
            ] {
                if let Some(rev) = rev {
                    let none: [(&str, &str); 0] = [];
                    let labels = vec![("host", host), ("role", role), ("revision", rev.as_str())];
                    Info::new(labels).encode(e.encode_family(&none)?)?;
                }
            }
        }
        {
            let mut e = encoder.encode_descriptor(
                "last_successful_run_timestamp",
                "Unix time of the last run in which nothing failed (resources skipped for an unresolved secret do not count against it); 0 if none yet",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            let labels = [("host", host)];
            ConstGauge::new(s.last_success).encode(e.encode_family(&labels)?)?;
        }
        {
            let mut e = encoder.encode_descriptor(
                "suspended",
                "1 while applying is suspended on this host (`agent suspend`: drift is still detected and reported, nothing is applied); 0 otherwise",
                None,
                MetricType::Gauge,
            )?;
            let labels = [("host", host)];
            ConstGauge::new(u64::from(s.suspended_since.is_some()))
                .encode(e.encode_family(&labels)?)?;
            let mut e = encoder.encode_descriptor(
                "suspended_since_timestamp",
                "Unix time applying was suspended at; 0 while applying",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            ConstGauge::new(s.suspended_since.unwrap_or(0)).encode(e.encode_family(&labels)?)?;
        }
        {
            let mut e = encoder.encode_descriptor(
                "last_run_phase_duration",
                "Time the last run spent in each phase",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            for (phase, secs) in &s.last_phases {
                let labels = [("host", host), ("phase", phase.name())];
                ConstGauge::new(*secs).encode(e.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The daemon's metrics. Cheap to share (`Arc`); every method takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    snapshot: Arc<SnapshotCollector>,
    host: RwLock<String>,
    drift_events: Family<ResourceLabels, Counter>,
    drift_corrections: Family<ResourceLabels, Counter>,
    runs: Family<RunLabels, Counter>,
    run_duration: HistogramFamily<HostLabels>,
    phase_duration: HistogramFamily<PhaseLabels>,
    phase_failures: Family<PhaseLabels, Counter>,
    source_errors: Family<ReasonLabels, Counter>,
    secret_errors: Family<ReasonLabels, Counter>,
    kube_errors: Family<ReasonLabels, Counter>,
    loki_sent: Family<HostLabels, Counter>,
    loki_dropped: Family<ReasonLabels, Counter>,
    loki_queued: Family<HostLabels, Gauge>,
    notify_errors: Family<ReasonLabels, Counter>,
}

impl Metrics {
    /// Every metric registered, label values known in advance set to 0 for
    /// `host` (so `increase()` sees the first event).
    pub fn new(host: &str) -> Metrics {
        let mut registry = Registry::with_prefix(PREFIX);
        let snapshot = Arc::new(SnapshotCollector(Mutex::new(Snapshot {
            host: host.to_string(),
            ..Snapshot::default()
        })));
        registry.register_collector(Box::new(snapshot.clone()));
        let m = Metrics {
            registry: Registry::default(),
            snapshot,
            host: RwLock::new(host.to_string()),
            drift_events: Family::default(),
            drift_corrections: Family::default(),
            runs: Family::default(),
            run_duration: Family::new_with_constructor(duration_histogram),
            phase_duration: Family::new_with_constructor(duration_histogram),
            phase_failures: Family::default(),
            source_errors: Family::default(),
            secret_errors: Family::default(),
            kube_errors: Family::default(),
            loki_sent: Family::default(),
            loki_dropped: Family::default(),
            loki_queued: Family::default(),
            notify_errors: Family::default(),
        };
        let r = &mut registry;
        r.register(
            "drift_events",
            "Drifts found: a resource whose live state was changed by hand since the last apply, counted when first seen (a drift left in place is not counted again)",
            m.drift_events.clone(),
        );
        r.register(
            "drift_corrections",
            "Drifted resources healed back to the desired state",
            m.drift_corrections.clone(),
        );
        r.register(
            "runs",
            "Reconcile runs by what started them and how they ended (success; skipped = nothing failed, some resources skipped; partial, failed; error = stopped before apply)",
            m.runs.clone(),
        );
        r.register_with_unit(
            "run_duration",
            "Wall time of whole reconcile runs",
            Unit::Seconds,
            m.run_duration.clone(),
        );
        r.register_with_unit(
            "run_phase_duration",
            "Wall time of each phase of a run: fetch, render, observe, apply, prune, health",
            Unit::Seconds,
            m.phase_duration.clone(),
        );
        r.register(
            "run_phase_failures",
            "Runs that failed in a phase (a refused revision counts as fetch or render, an unobservable resource as observe, a failed resource as apply or prune)",
            m.phase_failures.clone(),
        );
        r.register(
            "source_errors",
            "Revisions refused, by reason: fetch (unreachable or bad ref), signature (not signed by an allowed key), validate (invalid desired state)",
            m.source_errors.clone(),
        );
        r.register(
            "secret_errors",
            "Secret references that did not resolve, by reason: not_configured, unavailable (Connect down), failed (wrong reference or no access)",
            m.secret_errors.clone(),
        );
        r.register(
            "kube_errors",
            "Kubernetes API errors, by reason",
            m.kube_errors.clone(),
        );
        r.register(
            "loki_events_sent",
            "Events Loki accepted",
            m.loki_sent.clone(),
        );
        r.register(
            "loki_events_dropped",
            "Events never delivered to Loki, by reason: queue_full (oldest dropped while Loki was slow or down), rejected (Loki answered 4xx), retries_exhausted",
            m.loki_dropped.clone(),
        );
        r.register(
            "loki_queued_events",
            "Events waiting in memory to be sent to Loki",
            m.loki_queued.clone(),
        );
        r.register(
            "notify_errors",
            "Notifications not delivered (they never fail a run), by reason: forgejo (a commit status), webhook (an ntfy message)",
            m.notify_errors.clone(),
        );
        let m = Metrics { registry, ..m };
        m.init_series(host);
        m
    }

    /// Creates the known series at 0 for `host`.
    fn init_series(&self, host: &str) {
        let host = host.to_string();
        for trigger in TRIGGERS {
            for result in RunOutcome::ALL {
                self.runs.get_or_create_owned(&RunLabels {
                    host: host.clone(),
                    trigger,
                    result: result.name(),
                });
            }
        }
        self.run_duration
            .get_or_create_owned(&HostLabels { host: host.clone() });
        for phase in Phase::ALL {
            let l = PhaseLabels {
                host: host.clone(),
                phase: phase.name(),
            };
            self.phase_duration.get_or_create_owned(&l);
            self.phase_failures.get_or_create_owned(&l);
        }
        for (family, reasons) in [
            (&self.source_errors, &SOURCE_ERROR_REASONS[..]),
            (&self.secret_errors, &SECRET_ERROR_REASONS[..]),
            (&self.kube_errors, &KUBE_ERROR_REASONS[..]),
            (&self.loki_dropped, &LOKI_DROP_REASONS[..]),
            (&self.notify_errors, &NOTIFY_ERROR_REASONS[..]),
        ] {
            for reason in reasons {
                family.get_or_create_owned(&ReasonLabels {
                    host: host.clone(),
                    reason,
                });
            }
        }
        self.loki_sent
            .get_or_create_owned(&HostLabels { host: host.clone() });
        self.loki_queued.get_or_create_owned(&HostLabels { host });
    }

    /// The `host` label now.
    pub fn host(&self) -> String {
        self.host.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The host label from now on (config reload).
    pub fn set_host(&self, host: &str) {
        if self.host() == host {
            return;
        }
        *self.host.write().unwrap_or_else(|e| e.into_inner()) = host.to_string();
        self.snapshot.get().host = host.to_string();
        self.init_series(host);
    }

    /// Records the resource table of the last plan (and apply).
    pub fn set_resources(&self, table: ResourceTable) {
        let host = self.host();
        // Drift series exist from the first plan, so the first drift shows
        // as an increase.
        for (module, kind) in table.keys() {
            let l = ResourceLabels {
                host: host.clone(),
                module: module.clone(),
                kind: kind.clone(),
            };
            self.drift_events.get_or_create_owned(&l);
            self.drift_corrections.get_or_create_owned(&l);
        }
        self.snapshot.get().resources = Some(table);
    }

    /// Records the revisions from the state record.
    pub fn set_revisions(&self, record: &homelab_agent_state::HostRecord) {
        let mut s = self.snapshot.get();
        s.fetched = record.fetched_revision.clone();
        s.applied = record.applied_revision.clone();
        s.last_good = record.last_good_revision.clone();
        s.last_success = record.last_success_at.or(record.applied_at).unwrap_or(0);
    }

    /// Records whether applying is suspended (`agent suspend`).
    pub fn set_suspended(&self, suspension: Option<&homelab_agent_state::Suspension>) {
        self.snapshot.get().suspended_since = suspension.map(|s| s.since);
    }

    fn resource_labels(&self, module: &str, kind: &str) -> ResourceLabels {
        ResourceLabels {
            host: self.host(),
            module: module.to_string(),
            kind: kind.to_string(),
        }
    }

    /// A resource was found drifted (counted once per drift, see
    /// `Telemetry::observe_apply`).
    pub fn drift_event(&self, module: &str, kind: &str) {
        self.drift_events
            .get_or_create(&self.resource_labels(module, kind))
            .inc();
    }

    /// A drifted resource was healed.
    pub fn correction(&self, module: &str, kind: &str) {
        self.drift_corrections
            .get_or_create(&self.resource_labels(module, kind))
            .inc();
    }

    /// A finished run: its outcome, its phases and its total duration.
    pub fn run_finished(
        &self,
        trigger: &'static str,
        outcome: RunOutcome,
        phases: &Phases,
        total: std::time::Duration,
    ) {
        let host = self.host();
        self.runs
            .get_or_create(&RunLabels {
                host: host.clone(),
                trigger,
                result: outcome.name(),
            })
            .inc();
        self.run_duration
            .get_or_create(&HostLabels { host: host.clone() })
            .observe(total.as_secs_f64());
        for (phase, d) in phases.iter() {
            self.phase_duration
                .get_or_create(&PhaseLabels {
                    host: host.clone(),
                    phase: phase.name(),
                })
                .observe(d.as_secs_f64());
        }
        self.set_last_phases(phases);
    }

    /// Phase durations of the last run (the snapshot gauges only).
    pub fn set_last_phases(&self, phases: &Phases) {
        self.snapshot.get().last_phases =
            phases.iter().map(|(p, d)| (p, d.as_secs_f64())).collect();
    }

    /// A run failed in `phase`.
    pub fn phase_failed(&self, phase: Phase) {
        self.phase_failures
            .get_or_create(&PhaseLabels {
                host: self.host(),
                phase: phase.name(),
            })
            .inc();
    }

    /// A revision was refused at `stage` (`fetch`, `signature`, `validate`).
    pub fn source_error(&self, stage: &str) {
        let reason = SOURCE_ERROR_REASONS
            .into_iter()
            .find(|r| *r == stage)
            .unwrap_or("fetch");
        self.source_errors
            .get_or_create(&ReasonLabels {
                host: self.host(),
                reason,
            })
            .inc();
    }

    /// A secret reference did not resolve.
    pub fn secret_error(&self, error: &crate::secrets::resolve::SecretError) {
        use crate::secrets::resolve::SecretError;
        let reason = match error {
            SecretError::NotConfigured => "not_configured",
            SecretError::Unavailable(_) => "unavailable",
            SecretError::Failed(_) => "failed",
        };
        self.secret_errors
            .get_or_create(&ReasonLabels {
                host: self.host(),
                reason,
            })
            .inc();
    }

    /// A Kubernetes API error (for the stack kinds).
    pub fn kube_error(&self, reason: KubeErrorReason) {
        self.kube_errors
            .get_or_create(&ReasonLabels {
                host: self.host(),
                reason: reason.name(),
            })
            .inc();
    }

    /// Loki accepted `n` events.
    pub fn loki_sent(&self, n: u64) {
        self.loki_sent
            .get_or_create(&HostLabels { host: self.host() })
            .inc_by(n);
    }

    /// `n` events were dropped for `reason` (one of [`LOKI_DROP_REASONS`]).
    pub fn loki_dropped(&self, reason: &'static str, n: u64) {
        self.loki_dropped
            .get_or_create(&ReasonLabels {
                host: self.host(),
                reason,
            })
            .inc_by(n);
    }

    /// A notification was not delivered (`target`: one of
    /// [`NOTIFY_ERROR_REASONS`]).
    pub fn notify_error(&self, target: &'static str) {
        self.notify_errors
            .get_or_create(&ReasonLabels {
                host: self.host(),
                reason: target,
            })
            .inc();
    }

    /// Events waiting for Loki now.
    pub fn loki_queued(&self, n: usize) {
        self.loki_queued
            .get_or_create(&HostLabels { host: self.host() })
            .set(n as i64);
    }

    /// Everything, as OpenMetrics text (ends with `# EOF`).
    pub fn openmetrics(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Everything, as Prometheus text 0.0.4.
    pub fn prometheus_text(&self) -> String {
        to_prometheus_text(&self.openmetrics())
    }

    /// The body and content type for a scrape with this `Accept` header:
    /// OpenMetrics when the scraper prefers it (Prometheus does), else
    /// Prometheus text.
    pub fn negotiate(&self, accept: Option<&str>) -> (String, &'static str) {
        if prefers_openmetrics(accept) {
            (self.openmetrics(), OPENMETRICS_CONTENT_TYPE)
        } else {
            (self.prometheus_text(), PROMETHEUS_CONTENT_TYPE)
        }
    }

    /// The snapshot alone (no counters or histograms: a one-shot process
    /// has none worth keeping), as Prometheus text for the textfile
    /// collector.
    pub fn textfile(&self) -> String {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(self.snapshot.clone()));
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        to_prometheus_text(&out)
    }
}

/// Errors writing the textfile.
#[derive(Debug, thiserror::Error)]
pub enum TextfileError {
    #[error("--metrics-file {path}: {why}\n  give a file in an existing directory, e.g. /var/lib/node_exporter/textfile_collector/homelab_agent.prom")]
    Path { path: String, why: String },
    #[error("cannot write metrics file {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: crate::fsops::FsError,
    },
}

/// Writes `text` to `path` atomically (temp file in the same directory,
/// synced, renamed), mode 0644: the textfile collector never reads half a
/// file.
pub fn write_textfile(path: &Path, text: &str) -> Result<(), TextfileError> {
    let shown = path.display().to_string();
    let bad = |why: &str| TextfileError::Path {
        path: shown.clone(),
        why: why.to_string(),
    };
    let name = path.file_name().ok_or_else(|| bad("not a file name"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(bad("its directory does not exist"));
    }
    let fs = crate::fsops::Fs::new(&dir).map_err(|source| TextfileError::Write {
        path: shown.clone(),
        source,
    })?;
    let target = Path::new("/").join(name);
    let attrs = crate::fsops::Attrs {
        mode: 0o644,
        uid: None,
        gid: None,
    };
    let write = |source| TextfileError::Write {
        path: shown.clone(),
        source,
    };
    let staged = fs
        .stage_file(&target, text.as_bytes(), attrs)
        .map_err(write)?;
    for r in fs.commit(vec![staged]) {
        r.map_err(write)?;
    }
    fs.sync().map_err(write)
}

/// Does this `Accept` header rank OpenMetrics at least as high as
/// Prometheus text (and above zero)?
pub fn prefers_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return false;
    };
    let (mut om, mut text) = (0.0f64, 0.0f64);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let mime = parts.next().unwrap_or("").to_ascii_lowercase();
        let mut q = 1.0;
        for p in parts {
            if let Some(v) = p.strip_prefix("q=") {
                q = v.parse().unwrap_or(0.0);
            }
        }
        match mime.as_str() {
            "application/openmetrics-text" => om = om.max(q),
            "text/plain" => text = text.max(q),
            _ => {}
        }
    }
    om > 0.0 && om >= text
}

/// Rewrites prometheus-client's OpenMetrics output as Prometheus text
/// 0.0.4: counter families are named with `_total` (as their samples are),
/// info families become gauges named `_info`, `# UNIT` and `# EOF` go,
/// `_created` samples go. Only the types this crate emits occur.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // HELP comes before TYPE: learn every family's type first.
    let types: BTreeMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' '))
        .collect();
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((tag, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let (name, tail) = match types.get(name).copied() {
                    Some("counter") => (format!("{name}_total"), tail.to_string()),
                    Some("info") if tag == "# TYPE " => {
                        (format!("{name}_info"), "gauge".to_string())
                    }
                    Some("info") => (format!("{name}_info"), tail.to_string()),
                    Some("unknown") if tag == "# TYPE " => {
                        (name.to_string(), "untyped".to_string())
                    }
                    _ => (name.to_string(), tail.to_string()),
                };
                out.push_str(tag);
                out.push_str(&name);
                out.push(' ');
                out.push_str(&tail);
                out.push('\n');
            }
            None => {
                let name = line.split(['{', ' ']).next().unwrap_or("");
                if name.ends_with("_created") && !line.starts_with('#') {
                    continue;
                }
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// What the plan (and, after an apply, the report) leave per (module, kind).
/// Without a report, everything the plan would do is pending.
pub fn resource_table(plan: &Plan, report: Option<&ApplyReport>) -> ResourceTable {
    let mut table = ResourceTable::new();
    let outcomes: BTreeMap<&str, &crate::apply::Outcome> = report
        .map(|r| r.outcomes.iter().map(|o| (o.id.as_str(), o)).collect())
        .unwrap_or_default();
    for p in &plan.resources {
        let e = &plan.catalog.entries[p.index];
        let c = table
            .entry((e.module.clone(), e.resource.kind().to_string()))
            .or_default();
        c.managed += 1;
        if p.class == Classification::InSync {
            continue;
        }
        let (done, report_only) = match report {
            None => (false, p.action == Action::Report),
            Some(_) => {
                let ok = outcomes
                    .get(e.id.as_str())
                    .is_some_and(|o| o.error.is_none());
                (ok && p.action != Action::Report, p.action == Action::Report)
            }
        };
        if p.class == Classification::Drift && !done {
            c.drifted += 1;
        }
        if !done && !report_only {
            c.pending += 1;
        }
    }
    for p in &plan.prunes {
        let c = table.entry((p.module.clone(), p.kind.clone())).or_default();
        let done = report.is_some()
            && outcomes
                .get(p.id.as_str())
                .is_some_and(|o| o.error.is_none());
        if !done {
            c.pending += 1;
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_units_and_suffixes_follow_the_conventions() {
        let m = Metrics::new("nas");
        m.drift_event("app", "file");
        m.correction("app", "file");
        m.set_revisions(&homelab_agent_state::HostRecord {
            applied_revision: Some("abc".into()),
            fetched_revision: Some("def".into()),
            applied_at: Some(1_700_000_000),
            ..Default::default()
        });
        let om = m.openmetrics();
        assert!(om.ends_with("# EOF\n"), "{om}");
        for want in [
            "# TYPE homelab_agent_runs counter",
            "homelab_agent_runs_total{host=\"nas\",trigger=\"poll\",result=\"success\"} 0",
            "# TYPE homelab_agent_run_duration_seconds histogram",
            "# UNIT homelab_agent_run_duration_seconds seconds",
            "homelab_agent_run_phase_duration_seconds_bucket{le=\"+Inf\",host=\"nas\",phase=\"health\"} 0",
            "homelab_agent_drift_corrections_total{host=\"nas\",module=\"app\",kind=\"file\"} 1",
            "# TYPE homelab_agent_build info",
            "homelab_agent_revision_info{host=\"nas\",role=\"applied\",revision=\"abc\"} 1",
            "homelab_agent_last_successful_run_timestamp_seconds{host=\"nas\"} 1700000000",
            "homelab_agent_loki_events_dropped_total{host=\"nas\",reason=\"queue_full\"} 0",
        ] {
            assert!(om.contains(want), "missing {want:?} in\n{om}");
        }
        let text = m.prometheus_text();
        for want in [
            "# TYPE homelab_agent_runs_total counter\n",
            "# HELP homelab_agent_runs_total ",
            "# TYPE homelab_agent_build_info gauge\n",
            "# TYPE homelab_agent_revision_info gauge\n",
            "homelab_agent_revision_info{host=\"nas\",role=\"fetched\",revision=\"def\"} 1\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }

    #[test]
    fn trigger_series_are_the_daemon_triggers() {
        use crate::daemon::queue::Trigger;
        let names = [
            Trigger::Startup,
            Trigger::Poll,
            Trigger::Webhook,
            Trigger::SourceChanged,
            Trigger::Drift,
            Trigger::Signal,
            Trigger::Manual,
        ]
        .map(Trigger::name);
        assert_eq!(names, TRIGGERS);
    }

    #[test]
    fn kube_error_reasons_are_the_label_values() {
        let names: Vec<&str> = KubeErrorReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names, KUBE_ERROR_REASONS);
        let m = Metrics::new("k");
        m.kube_error(KubeErrorReason::Conflict);
        assert!(m
            .openmetrics()
            .contains("homelab_agent_kube_errors_total{host=\"k\",reason=\"conflict\"} 1\n"));
    }

    #[test]
    fn content_negotiation_follows_accept() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(prefers_openmetrics(Some(prometheus)));
        assert!(!prefers_openmetrics(None));
        assert!(!prefers_openmetrics(Some("*/*")));
        assert!(!prefers_openmetrics(Some("text/plain")));
        assert!(!prefers_openmetrics(Some(
            "application/openmetrics-text;q=0.2,text/plain;q=0.9"
        )));
        assert!(!prefers_openmetrics(Some(
            "application/openmetrics-text;q=0"
        )));
        let m = Metrics::new("h");
        assert_eq!(m.negotiate(Some(prometheus)).1, OPENMETRICS_CONTENT_TYPE);
        assert_eq!(m.negotiate(Some("text/plain")).1, PROMETHEUS_CONTENT_TYPE);
    }

    #[test]
    fn the_textfile_holds_the_snapshot_only() {
        let m = Metrics::new("nas");
        let mut t = ResourceTable::new();
        t.insert(
            ("app".into(), "file".into()),
            ResourceCounts {
                managed: 3,
                drifted: 1,
                pending: 2,
            },
        );
        m.set_resources(t);
        let text = m.textfile();
        assert!(text.contains(
            "homelab_agent_drifted_resources{host=\"nas\",module=\"app\",kind=\"file\"} 1\n"
        ));
        assert!(text.contains(
            "homelab_agent_pending_changes{host=\"nas\",module=\"app\",kind=\"file\"} 2\n"
        ));
        assert!(!text.contains("_total"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("homelab_agent.prom");
        write_textfile(&path, &text).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // No temp file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let err = write_textfile(&dir.path().join("missing/x.prom"), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("its directory does not exist"), "{err}");
    }
}
