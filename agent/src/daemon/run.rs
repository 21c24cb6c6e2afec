//! The daemon's main loop: triggers → coalescing queue → one reconcile
//! worker. See the module docs of `daemon` for the parts.
//!
//! # Expected flow
//! 1. Start: open the HTTP listener, take the daemon lock, queue `startup`.
//! 2. Each batch of triggers runs one reconcile on the blocking pool:
//!    fetch → verify → validate → plan → apply. A revision refused at any
//!    stage is recorded (state, `/api/status`, logs) and the last good
//!    revision is used instead, so drift is still healed.
//! 3. After each run the file watchers are pointed at the managed paths.
//!
//! # Guarantees
//! - SIGTERM/SIGINT: the resource in progress finishes, state is recorded,
//!   the process exits 0. SIGHUP reloads the config; a bad one is refused
//!   and the old one kept.
//! - A hand edit of a managed file is checked against the catalog when the
//!   watcher sees it; only a real difference queues a run (the agent's own
//!   writes do not).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use homelab_agent_state::{Lock, Refused, Store};
use notify::{RecursiveMode, Watcher};
use tracing::{error, info, warn};

use super::http::{HttpState, WebhookConfig};
use super::queue::{Trigger, TriggerQueue};
use super::status::{ClassCounts, Refusal, StatusSnapshot};
use crate::config::{self, AgentConfig};
use crate::desired::catalog::Catalog;
use crate::engine::{self, SourceSpec, StageError};
use crate::fsops::Fs;
use crate::plan::{self, Classification};
use crate::resources::Host;
use crate::source::git::{self, RepoLocation};
use crate::telemetry::{Phase, Phases, RunOutcome, Telemetry};

/// Errors that stop the daemon (at start-up only; run errors are reported
/// and retried).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "cannot listen on {addr}: {source}\n  set `listen` in the agent config to a free address"
    )]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    State(#[from] homelab_agent_state::StateError),
}

/// Settings resolved from the config for one run.
#[derive(Clone)]
struct Settings {
    config: AgentConfig,
    host: String,
    root: Option<PathBuf>,
    state_dir: PathBuf,
}

fn settings(config: &AgentConfig) -> Result<Settings, DaemonError> {
    let host = match &config.host {
        Some(h) => h.clone(),
        None => crate::cli::short_hostname().map_err(|e| DaemonError::Setup(e.to_string()))?,
    };
    let root = match &config.root {
        Some(r) => {
            std::fs::create_dir_all(r).map_err(|e| {
                DaemonError::Setup(format!("cannot create root {}: {e}", r.display()))
            })?;
            Some(
                r.canonicalize()
                    .map_err(|e| DaemonError::Setup(format!("root {}: {e}", r.display())))?,
            )
        }
        None => None,
    };
    let state_dir = config
        .state_dir
        .clone()
        .unwrap_or_else(|| crate::cli::default_state_dir(root.as_deref()));
    Ok(Settings {
        config: config.clone(),
        host,
        root,
        state_dir,
    })
}

/// The catalog the drift watcher compares live changes against.
struct DriftIndex {
    catalog: Arc<Catalog>,
    /// Host path (root-prefixed) -> catalog index.
    by_path: HashMap<PathBuf, usize>,
    root: Option<PathBuf>,
    platform: crate::resources::Platform,
}

struct Shared {
    settings: RwLock<Settings>,
    queue: Arc<TriggerQueue>,
    status: Arc<RwLock<StatusSnapshot>>,
    http: Arc<HttpState>,
    cancel: Arc<AtomicBool>,
    drift: RwLock<Option<DriftIndex>>,
    /// Consecutive fetch failures, for the poll backoff.
    fetch_failures: AtomicU32,
    runs: AtomicU32,
    /// Metrics (served at `/metrics`) and Loki events.
    telemetry: Arc<Telemetry>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads a secret file, refusing one that others can read.
pub(crate) fn read_private_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{what} {} is readable by group or others (mode {:04o}); run: chmod 600 {}",
            path.display(),
            meta.permissions().mode() & 0o777,
            path.display()
        ));
    }
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    Ok(bytes.trim_ascii().to_vec())
}

fn webhook_config(config: &AgentConfig) -> Result<Option<WebhookConfig>, String> {
    let Some(path) = &config.webhook_secret_file else {
        return Ok(None);
    };
    let secret = read_private_file(path, "webhook secret file")?;
    let git_ref = if config.reference.starts_with("refs/") {
        config.reference.clone()
    } else {
        format!("refs/heads/{}", config.reference)
    };
    Ok(Some(WebhookConfig { secret, git_ref }))
}

/// Runs the daemon until SIGTERM/SIGINT. `config_path` is re-read on SIGHUP.
pub fn run(config: AgentConfig) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .build()
        .map_err(|e| DaemonError::Setup(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(main_loop(config))
}

async fn main_loop(config: AgentConfig) -> Result<(), DaemonError> {
    let settings = settings(&config)?;
    // One daemon per state directory, for the daemon's whole life.
    let _daemon_lock = Lock::acquire(&settings.state_dir.join("daemon"), "agent run")?;
    let webhook = webhook_config(&config).map_err(DaemonError::Setup)?;
    let queue = Arc::new(TriggerQueue::new());
    let status = Arc::new(RwLock::new(StatusSnapshot {
        host: settings.host.clone(),
        source: config.repo.clone(),
        reference: config.reference.clone(),
        ..StatusSnapshot::default()
    }));
    let telemetry = Arc::new(
        Telemetry::new(&settings.host, config.loki.as_ref())
            .map_err(|e| DaemonError::Setup(e.to_string()))?,
    );
    let http = HttpState::new(queue.clone(), status.clone(), webhook);
    http.set_metrics(telemetry.metrics.clone());
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: config.listen,
            source,
        })?;
    info!(%addr, host = %settings.host, repo = %config.repo, "agent run: listening");
    let shared = Arc::new(Shared {
        settings: RwLock::new(settings),
        queue: queue.clone(),
        status,
        http: http.clone(),
        cancel: Arc::new(AtomicBool::new(false)),
        drift: RwLock::new(None),
        fetch_failures: AtomicU32::new(0),
        runs: AtomicU32::new(0),
        telemetry,
    });
    refresh_status_from_state(&shared);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut http_stop = stop_rx.clone();
    let server = tokio::spawn(super::http::serve(listener, http, async move {
        let _ = http_stop.wait_for(|s| *s).await;
    }));
    tokio::spawn(poll_timer(shared.clone(), stop_rx.clone()));
    let watchers = Arc::new(Mutex::new(Watchers::new(shared.clone())));
    watchers.lock().unwrap().watch_source();

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| DaemonError::Setup(e.to_string()))?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| DaemonError::Setup(e.to_string()))?;

    queue.push(Trigger::Startup);
    loop {
        tokio::select! {
            batch = queue.next() => {
                let batch = settle_source_edits(&queue, batch).await;
                let s = shared.clone();
                let w = watchers.clone();
                // The reconcile runs on the blocking pool; signals are still
                // handled meanwhile (SIGTERM sets `cancel`, which apply reads
                // between resources).
                let mut run = tokio::task::spawn_blocking(move || {
                    reconcile(&s, &batch);
                    w.lock().unwrap().sync_managed();
                    // Only now is the run over for `/api/status`: a hand edit
                    // made after it reads `running: false` is watched.
                    s.status.write().unwrap().running = false;
                });
                loop {
                    tokio::select! {
                        _ = &mut run => break,
                        _ = term.recv() => { info!("SIGTERM: finishing the current resource"); shared.cancel.store(true, Ordering::Relaxed); }
                        _ = tokio::signal::ctrl_c() => { info!("SIGINT: finishing the current resource"); shared.cancel.store(true, Ordering::Relaxed); }
                        _ = hup.recv() => reload(&shared),
                    }
                }
                if shared.cancel.load(Ordering::Relaxed) {
                    break;
                }
            }
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping"); break; }
            _ = hup.recv() => reload(&shared),
        }
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    // Give queued events a moment to reach Loki.
    let telemetry = shared.telemetry.clone();
    let _ = tokio::task::spawn_blocking(move || telemetry.flush(Duration::from_secs(5))).await;
    info!("agent run: stopped");
    Ok(())
}

/// SIGHUP: re-read the config; keep the old one if the new one is bad.
fn reload(shared: &Arc<Shared>) {
    let path = shared.settings.read().unwrap().config.file.clone();
    let result = config::load(&path)
        .map_err(|e| e.to_string())
        .and_then(|c| settings(&c).map_err(|e| e.to_string()).map(|s| (c, s)))
        .and_then(|(c, s)| webhook_config(&c).map(|w| (s, w)))
        .and_then(|(s, w)| {
            shared
                .telemetry
                .configure(&s.host, s.config.loki.as_ref())
                .map_err(|e| e.to_string())
                .map(|()| (s, w))
        });
    match result {
        Ok((new, webhook)) => {
            shared.http.set_webhook(webhook);
            *shared.settings.write().unwrap() = new;
            info!(config = %path.display(), "SIGHUP: configuration reloaded");
            shared.queue.push(Trigger::Signal);
        }
        Err(e) => {
            error!(config = %path.display(), error = %e, "SIGHUP: new configuration refused; keeping the old one")
        }
    }
}

/// Queues `poll` every interval ±10 %, or sooner with backoff after fetch errors.
async fn poll_timer(shared: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        let interval = shared.settings.read().unwrap().config.poll_interval;
        let failures = shared.fetch_failures.load(Ordering::Relaxed);
        let base = if failures == 0 {
            interval
        } else {
            // 5 s, 10 s, 20 s ... capped at the poll interval.
            (Duration::from_secs(5) * 2u32.saturating_pow(failures.saturating_sub(1).min(10)))
                .min(interval)
        };
        let jitter = 0.9 + fastrand::f64() * 0.2;
        tokio::select! {
            _ = tokio::time::sleep(base.mul_f64(jitter)) => shared.queue.push(Trigger::Poll),
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Loads the newest acceptable catalog: the fetched (or pinned) revision, or
/// on refusal the last good one. Returns the catalog, the fetched id and the
/// refusal, if any.
fn choose_catalog(
    s: &Settings,
    record: &homelab_agent_state::HostRecord,
    fetch: bool,
    telemetry: &Telemetry,
    phases: &mut Phases,
) -> (Option<Catalog>, Option<String>, Option<Refused>) {
    let spec = SourceSpec {
        repo: s.config.repo.clone(),
        reference: s.config.reference.clone(),
        // Without a fetch: the pinned revision under a manual override, else the
        // newest fetched one (refused ones fall back below as usual).
        rev: match (fetch, &record.manual_override) {
            (true, _) => None,
            (false, Some(_)) => record.applied_revision.clone(),
            (false, None) => record.fetched_revision.clone(),
        },
        token_file: s.config.token_file.clone(),
        allowed_signers: s.config.verify.as_ref().map(|v| v.allowed_signers.clone()),
        fetch,
        fetch_timeout: Duration::from_secs(60),
    };
    let secrets = telemetry.count_secrets(engine::secret_source(s.config.onepassword.as_ref()));
    let state_dir = engine::managed_state_dir(s.root.as_deref(), &s.state_dir);
    let refuse = |e: &StageError, revision: Option<String>| Refused {
        stage: e.stage().to_string(),
        revision,
        error: e.to_string(),
        at: now_secs(),
    };
    let mut fetched = None;
    let refused;
    match phases.time(Phase::Fetch, || engine::resolve(&spec, &s.state_dir)) {
        Ok(resolved) => {
            fetched = resolved.fetched.clone();
            // `agent apply --rev` pinned a revision: keep it until a newer fetch.
            let pinned = match (
                &record.manual_override,
                &fetched,
                &record.applied_revision,
                &resolved.cache,
            ) {
                (Some(pin), Some(f), Some(applied), Some(cache)) if pin == f => {
                    Some((cache.clone(), applied.clone()))
                }
                _ => None,
            };
            let source = match pinned {
                Some((cache, applied)) => {
                    phases.time(Phase::Fetch, || engine::open_commit(&cache, &applied))
                }
                None => Ok(resolved.source),
            };
            match source.and_then(|src| {
                phases.time(Phase::Render, || {
                    engine::load(
                        src,
                        &s.host,
                        s.config.on_drift,
                        secrets.clone(),
                        state_dir.clone(),
                    )
                })
            }) {
                Ok(c) => return (Some(c), fetched, None),
                Err(e) => refused = Some(refuse(&e, fetched.clone())),
            }
        }
        Err(e) => refused = Some(refuse(&e, None)),
    }
    // Fall back to the last good revision (remote sources keep it in the cache).
    let fallback = match (
        git::parse_location(&s.config.repo),
        &record.last_good_revision,
    ) {
        (RepoLocation::Remote(url), Some(good)) => {
            let cache = engine::cache_dir(&s.state_dir, &url);
            phases
                .time(Phase::Fetch, || engine::open_commit(&cache, good))
                .and_then(|src| {
                    phases.time(Phase::Render, || {
                        engine::load(
                            src,
                            &s.host,
                            s.config.on_drift,
                            secrets.clone(),
                            state_dir.clone(),
                        )
                    })
                })
                .ok()
        }
        _ => None,
    };
    (fallback, fetched, refused)
}

/// One run: choose the revision, plan, apply, record.
fn reconcile(shared: &Arc<Shared>, triggers: &BTreeSet<Trigger>) {
    let started = Instant::now();
    let mut phases = Phases::default();
    let s = shared.settings.read().unwrap().clone();
    let trigger = triggers
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join("+");
    // The metric label: the batch's first trigger (a bounded set of values).
    let primary = triggers.iter().next().map_or("poll", |t| t.name());
    let telemetry = &shared.telemetry;
    shared.status.write().unwrap().running = true;
    let _lock = match Lock::acquire(&s.state_dir, &format!("agent run ({trigger})")) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "run skipped: the state directory is locked; retrying at the next trigger");
            telemetry
                .metrics
                .run_finished(primary, RunOutcome::Error, &phases, started.elapsed());
            shared.status.write().unwrap().running = false;
            return;
        }
    };
    let record = match Store::open_read_only_recovering(&s.state_dir)
        .and_then(|st| st.host(&s.host))
    {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot read state");
            telemetry.run_error(None, "state", None, &e.to_string(), &trigger);
            telemetry
                .metrics
                .run_finished(primary, RunOutcome::Error, &phases, started.elapsed());
            shared.status.write().unwrap().running = false;
            return;
        }
    };
    // A run for drift alone converges to the revision already fetched: no
    // network round trip between a hand edit and its heal.
    let fetch = !triggers.iter().all(|t| *t == Trigger::Drift) || record.fetched_revision.is_none();
    let (catalog, fetched, refused) = choose_catalog(&s, &record, fetch, telemetry, &mut phases);
    match &refused {
        Some(r) => {
            warn!(stage = %r.stage, revision = ?r.revision, error = %r.error, "revision refused; staying on the last good revision");
            // Counted every run; sent to Loki once per refused revision.
            let known = record.refused.as_ref().is_some_and(|k| {
                k.stage == r.stage && k.revision == r.revision && k.error == r.error
            });
            telemetry.metrics.source_error(&r.stage);
            telemetry.metrics.phase_failed(if r.stage == "validate" {
                Phase::Render
            } else {
                Phase::Fetch
            });
            if !known {
                telemetry.emit([crate::telemetry::events::refused(
                    &r.stage,
                    r.revision.as_deref(),
                    &r.error,
                    &trigger,
                )]);
            }
            if r.stage == "fetch" {
                shared.fetch_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        None => shared.fetch_failures.store(0, Ordering::Relaxed),
    }
    let candidate_ok = refused.is_none();
    let mut counts = ClassCounts::default();
    let mut outcome = RunOutcome::Error;
    if let Some(catalog) = catalog {
        let revision = catalog.revision.clone();
        match run_plan_apply(shared, &s, catalog, &trigger, &mut phases) {
            Ok((c, o)) => (counts, outcome) = (c, o),
            Err(e) => error!(error = %e, "run failed"),
        }
        let _ = Store::open(&s.state_dir).and_then(|st| {
            st.write(&s.host, |w| {
                w.update_host(|h| {
                    if fetched.is_some() {
                        h.fetched_revision = fetched.clone();
                    }
                    if candidate_ok && h.applied_revision.as_deref() == Some(revision.as_str()) {
                        h.last_good_revision = Some(revision.clone());
                    }
                    if h.manual_override.is_some()
                        && fetched.is_some()
                        && h.manual_override != fetched
                    {
                        h.manual_override = None;
                    }
                    h.refused = refused.clone();
                })
            })
        });
    } else {
        let _ = Store::open(&s.state_dir).and_then(|st| {
            st.write(&s.host, |w| {
                w.update_host(|h| {
                    if fetched.is_some() {
                        h.fetched_revision = fetched.clone();
                    }
                    h.refused = refused.clone();
                })
            })
        });
    }
    shared.runs.fetch_add(1, Ordering::Relaxed);
    telemetry
        .metrics
        .run_finished(primary, outcome, &phases, started.elapsed());
    release_memory();
    refresh_status_from_state(shared);
    shared.status.write().unwrap().counts = counts;
}

fn run_plan_apply(
    shared: &Arc<Shared>,
    s: &Settings,
    catalog: Catalog,
    trigger: &str,
    phases: &mut Phases,
) -> Result<(ClassCounts, RunOutcome), String> {
    let telemetry = &shared.telemetry;
    let revision = catalog.revision.clone();
    let failed = |phase: Option<Phase>, stage: &str, e: String| {
        telemetry.run_error(phase, stage, Some(&revision), &e, trigger);
        e
    };
    let fs = Fs::new(s.root.as_deref().unwrap_or(Path::new("/")))
        .map_err(|e| failed(Some(Phase::Observe), "observe", e.to_string()))?;
    let host = Host::new(fs, s.root.is_some(), catalog.host.platform);
    let inventory = Store::open_read_only_recovering(&s.state_dir)
        .and_then(|st| st.inventory(&s.host))
        .map_err(|e| failed(None, "state", e.to_string()))?;
    let key = homelab_agent_state::DigestKey::load(&s.state_dir, true)
        .map_err(|e| failed(None, "state", e.to_string()))?;
    host.fs.set_temp_key(key.bytes());
    let plan = phases.time(Phase::Observe, || {
        plan::plan(catalog, &host, &inventory, &key)
    });
    let mut counts = ClassCounts {
        prune: plan.prunes.len(),
        ..ClassCounts::default()
    };
    for p in &plan.resources {
        match p.class {
            Classification::Create => counts.create += 1,
            Classification::Change => counts.change += 1,
            Classification::Drift => counts.drift += 1,
            Classification::InSync => counts.in_sync += 1,
            Classification::Skipped => counts.skipped += 1,
            Classification::Prune => {}
        }
        if let (Classification::Skipped, Some(why)) =
            (p.class, &plan.catalog.entries[p.index].blocked)
        {
            warn!(resource = %plan.catalog.entries[p.index].id, reason = %why, "skipped: a secret did not resolve");
        }
        if p.class == Classification::Drift {
            let e = &plan.catalog.entries[p.index];
            info!(resource = %e.id, module = %e.module, on_drift = e.on_drift.name(), "drift detected");
        }
    }
    if !plan.failures.is_empty() {
        telemetry.observe_plan(&plan);
        let err = crate::apply::refuse(&plan).to_string();
        return Err(failed(Some(Phase::Observe), "observe", err));
    }
    // The drift watcher compares events against this catalog from now on:
    // set before applying, so the events of the agent's own writes compare
    // equal and queue nothing.
    let by_path = plan
        .catalog
        .entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.resource.path().map(|p| (host.fs.host_path(p), i)))
        .collect();
    *shared.drift.write().unwrap() = Some(DriftIndex {
        catalog: plan.catalog.clone(),
        by_path,
        root: s.root.clone(),
        platform: plan.catalog.host.platform,
    });
    let store = Store::open(&s.state_dir).map_err(|e| failed(None, "state", e.to_string()))?;
    let apply_started = Instant::now();
    let report =
        crate::apply::apply_cancellable(&plan, &host, &store, trigger, Some(&shared.cancel))
            .map_err(|e| failed(Some(Phase::Apply), "apply", e.to_string()))?;
    // Kubernetes stacks after the native resources, on a runtime of their
    // own inside this blocking task (the event loop is never blocked).
    let stacks = crate::k8s::apply::apply_stacks(
        &plan.catalog,
        &inventory,
        &key,
        &store,
        &crate::k8s::client::KubeSettings {
            kubeconfig: s.config.kubeconfig.clone(),
            sandbox: s.root.is_some(),
        },
        Some(&shared.cancel),
    );
    if let Err(e) = crate::k8s::apply::record_run(&store, &s.host, &stacks) {
        warn!(error = %e, "cannot record the stacks' results in the run record");
    }
    log_stacks(&stacks);
    for st in &stacks {
        let errors = st
            .error
            .iter()
            .chain(st.outcomes.iter().filter_map(|o| o.error.as_ref()))
            .filter(|e| !e.starts_with("skipped"));
        for e in errors {
            telemetry
                .metrics
                .kube_error(crate::telemetry::metrics::KubeErrorReason::of_message(e));
        }
    }
    drop(store);
    phases.add(
        Phase::Apply,
        apply_started
            .elapsed()
            .saturating_sub(report.prune_duration),
    );
    phases.add(Phase::Prune, report.prune_duration);
    let outcome = telemetry.observe_apply(&plan, &report, trigger);
    for o in &report.outcomes {
        match &o.error {
            None => {
                info!(resource = %o.id, action = ?o.action, classification = ?o.class, fields = ?o.fields, "applied")
            }
            Some(err) => warn!(resource = %o.id, error = %err, "apply failed"),
        }
    }
    info!(revision = %report.revision, trigger, created = report.counts.created, changed = report.counts.changed,
        pruned = report.counts.pruned, drift_healed = report.counts.drift_healed,
        drift_reported = report.counts.drift_reported, failed = report.counts.failed, "run finished");
    Ok((counts, outcome))
}

/// One log event per stack object touched, and per failed or unchecked stack.
fn log_stacks(stacks: &[crate::k8s::apply::StackReport]) {
    for st in stacks {
        if let Some(why) = &st.not_checked {
            info!(stack = %st.name, reason = %why, "stack not checked");
        }
        if let Some(e) = &st.error {
            warn!(stack = %st.name, error = %e, "stack failed");
        }
        for o in &st.outcomes {
            match &o.error {
                None => {
                    info!(stack = %st.name, resource = %o.id, action = ?o.action, classification = ?o.class, fields = ?o.fields, "applied")
                }
                Some(err) => {
                    warn!(stack = %st.name, resource = %o.id, error = %err, "apply failed")
                }
            }
        }
    }
}

/// A batch with a local source edit waits until the source has been quiet
/// for [`SOURCE_SETTLE`] (at most [`SOURCE_SETTLE_MAX`]): an editor that
/// truncates and then writes must not be read half-way, which could look
/// like resources removed and prune them.
async fn settle_source_edits(
    queue: &TriggerQueue,
    mut batch: BTreeSet<Trigger>,
) -> BTreeSet<Trigger> {
    if !batch.contains(&Trigger::SourceChanged) {
        return batch;
    }
    let started = Instant::now();
    loop {
        tokio::time::sleep(SOURCE_SETTLE).await;
        let more = queue.take();
        let quiet = !more.contains(&Trigger::SourceChanged);
        batch.extend(more);
        if quiet || started.elapsed() >= SOURCE_SETTLE_MAX {
            return batch;
        }
    }
}

const SOURCE_SETTLE: Duration = Duration::from_millis(200);
const SOURCE_SETTLE_MAX: Duration = Duration::from_secs(5);

/// Hands memory freed by the run back to the OS, so an idle daemon stays
/// small (glibc keeps freed heap otherwise).
fn release_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; no pointers change.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Copies revisions and the last run from the state store into the status snapshot.
fn refresh_status_from_state(shared: &Arc<Shared>) {
    let s = shared.settings.read().unwrap().clone();
    let Ok(store) = Store::open_read_only(&s.state_dir) else {
        return;
    };
    let record = store.host(&s.host).unwrap_or_default();
    shared.telemetry.metrics.set_revisions(&record);
    let last_run = store.runs(&s.host, 1).ok().and_then(|mut r| r.pop());
    let mut st = shared.status.write().unwrap();
    st.host = s.host.clone();
    st.source = s.config.repo.clone();
    st.reference = s.config.reference.clone();
    st.fetched_revision = record.fetched_revision;
    st.applied_revision = record.applied_revision;
    st.last_good_revision = record.last_good_revision;
    st.manual_override = record.manual_override.is_some();
    st.refused = record.refused.map(|r| Refusal {
        stage: r.stage,
        revision: r.revision,
        error: r.error,
    });
    st.last_run = last_run;
}

/// File watchers: the local source (if any) and every managed path.
struct Watchers {
    shared: Arc<Shared>,
    source: Option<notify::RecommendedWatcher>,
    managed: Option<notify::RecommendedWatcher>,
    watched: HashSet<PathBuf>,
}

impl Watchers {
    fn new(shared: Arc<Shared>) -> Watchers {
        Watchers {
            shared,
            source: None,
            managed: None,
            watched: HashSet::new(),
        }
    }

    /// A local-directory source: any change under it queues a run.
    fn watch_source(&mut self) {
        let repo = self.shared.settings.read().unwrap().config.repo.clone();
        let RepoLocation::Local(dir) = git::parse_location(&repo) else {
            return;
        };
        let queue = self.shared.queue.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                let relevant = !matches!(event.kind, notify::EventKind::Access(_))
                    && event
                        .paths
                        .iter()
                        .any(|p| !p.components().any(|c| c.as_os_str() == ".git"));
                if relevant {
                    queue.push(Trigger::SourceChanged);
                }
            }
        });
        match watcher {
            Ok(mut w) => {
                for sub in ["hosts", "modules", "k8s", "dashboards"] {
                    let path = dir.join(sub);
                    if path.is_dir() {
                        if let Err(e) = w.watch(&path, RecursiveMode::Recursive) {
                            warn!(path = %path.display(), error = %e, "cannot watch the source");
                        }
                    }
                }
                self.source = Some(w);
            }
            Err(e) => warn!(error = %e, "cannot start the source watcher"),
        }
    }

    /// Points the managed-path watcher at the parents of every managed path.
    fn sync_managed(&mut self) {
        let dirs: HashSet<PathBuf> = {
            let drift = self.shared.drift.read().unwrap();
            let Some(index) = drift.as_ref() else {
                return;
            };
            index
                .by_path
                .keys()
                .filter_map(|p| p.parent().map(Path::to_path_buf))
                .filter(|d| d.is_dir())
                .collect()
        };
        if self.managed.is_none() {
            let shared = self.shared.clone();
            match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event {
                    on_managed_event(&shared, &event);
                }
            }) {
                Ok(w) => self.managed = Some(w),
                Err(e) => {
                    warn!(error = %e, "cannot start the drift watcher; drift is seen at the next poll");
                    return;
                }
            }
        }
        let watcher = self.managed.as_mut().expect("set above");
        for gone in self.watched.difference(&dirs).cloned().collect::<Vec<_>>() {
            let _ = watcher.unwatch(&gone);
            self.watched.remove(&gone);
        }
        for dir in dirs {
            if !self.watched.contains(&dir) {
                match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        self.watched.insert(dir);
                    }
                    Err(e) => warn!(path = %dir.display(), error = %e, "cannot watch"),
                }
            }
        }
    }
}

/// A change under a watched directory: queue a run only if a managed
/// resource really differs from the catalog now (the agent's own writes
/// leave it in sync and so queue nothing).
fn on_managed_event(shared: &Arc<Shared>, event: &notify::Event) {
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return;
    }
    let drift = shared.drift.read().unwrap();
    let Some(index) = drift.as_ref() else {
        return;
    };
    let hits: Vec<usize> = event
        .paths
        .iter()
        .filter_map(|p| index.by_path.get(p).copied())
        .collect();
    if hits.is_empty() {
        return;
    }
    // A fresh host view: directories may have been replaced since the run.
    let Ok(fs) = Fs::new(index.root.as_deref().unwrap_or(Path::new("/"))) else {
        return;
    };
    let host = Host::new(fs, index.root.is_some(), index.platform);
    for i in hits {
        let entry = &index.catalog.entries[i];
        let differs = match entry.resource.observe(&host) {
            Ok(obs) => !entry.resource.diff(&obs, &host).is_empty(),
            Err(_) => true,
        };
        if differs {
            info!(resource = %entry.id, "change on disk; queueing a run");
            shared.queue.push(Trigger::Drift);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Edits keep arriving for 600 ms: the run waits until they stop, and
    /// every trigger that came meanwhile is in the one batch.
    #[tokio::test(flavor = "current_thread")]
    async fn a_run_for_source_edits_waits_until_they_settle() {
        let queue = Arc::new(TriggerQueue::new());
        let q = queue.clone();
        let writer = tokio::spawn(async move {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                q.push(Trigger::SourceChanged);
            }
            q.push(Trigger::Webhook);
        });
        let started = Instant::now();
        let batch = settle_source_edits(&queue, BTreeSet::from([Trigger::SourceChanged])).await;
        writer.await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(600),
            "{:?}",
            started.elapsed()
        );
        assert!(batch.contains(&Trigger::Webhook), "{batch:?}");
        assert!(queue.take().is_empty(), "nothing left for another run");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn other_triggers_do_not_wait() {
        let queue = TriggerQueue::new();
        let started = Instant::now();
        let batch = settle_source_edits(&queue, BTreeSet::from([Trigger::Webhook])).await;
        assert_eq!(batch, BTreeSet::from([Trigger::Webhook]));
        assert!(started.elapsed() < Duration::from_millis(100));
    }
}
