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
//!   the process exits 0, within [`SHUTDOWN_GRACE`] even when the run is
//!   stuck (a render is never waited for). SIGHUP reloads the config; a bad
//!   one is refused and the old one kept.
//! - A bad revision never kills or hangs the daemon: a panic in any stage
//!   is caught (`catch_unwind`) and refuses the revision; rendering runs on
//!   its own thread with half the run's time budget (`run_timeout`) and is
//!   abandoned past it; a revision that panicked, timed out or was being
//!   rendered when the process died ([`RENDER_MARKER`]) is not tried again,
//!   not even after a restart, until a newer one is fetched or the config is
//!   reloaded. The daemon meanwhile stays on the last good revision and
//!   keeps healing drift. A run past its whole budget is reported stuck
//!   (`/readyz`) and no new run starts until it ends.
//! - A hand edit of a managed file is checked against the catalog when the
//!   watcher sees it; only a real difference queues a run (the agent's own
//!   writes do not).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use homelab_agent_state::{Lock, RefusalCause, Refused, Store, Suspension};
use notify::{RecursiveMode, Watcher};
use tracing::{error, info, warn};

use super::control::{Controls, Refusing, RunSummary};
use super::http::{HttpState, WebhookConfig};
use super::queue::{Trigger, TriggerQueue};
use super::status::{Refusal, StatusSnapshot};
use crate::config::{self, AgentConfig};
use crate::desired::catalog::Catalog;
use crate::engine::{self, Scrubber, SourceSpec, StageError};
use crate::fsops::Fs;
use crate::plan;
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
    #[error("cannot open the control socket {}: {source}\n  it lives in the state directory (`state_dir`): make sure that is a writable local directory with a short path (a Unix socket path has at most about 100 bytes)", path.display())]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Credentials(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Notify(#[from] crate::notifications::NotifyError),
    #[error(transparent)]
    Hostname(std::io::Error),
    /// (The io error is shown in the message, so it is a field rather than a
    /// `source`: the CLI prints an error's chain.)
    #[error("cannot create root {}: {error}", path.display())]
    Root {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("root {}: {error}", path.display())]
    BadRoot {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::loki::LokiError),
    #[error("{0}")]
    Signals(std::io::Error),
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
    /// The webhook secret and API token, read and checked at (re)load.
    credentials: Arc<config::Credentials>,
    /// Commit statuses and webhook messages (`notify:`), built at (re)load.
    notifier: Option<Arc<crate::notifications::Notifier>>,
}

/// How long SIGTERM waits for the run in progress (its current resource
/// and the state record) before the process exits anyway: a render that
/// never ends, or a tool that hangs, must not keep the daemon alive.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// The file (under `state-dir/daemon/`) naming the revision being rendered.
/// Present at start-up, it means the last process died during that render
/// (a crash the daemon could not catch, or a kill), and the revision is
/// refused instead of being tried again.
pub const RENDER_MARKER: &str = "rendering";

/// Stack of the render thread: deep enough that the YAML and template
/// limits, not the stack, end a deeply nested document.
const RENDER_STACK_BYTES: usize = 16 * 1024 * 1024;

fn settings(config: &AgentConfig) -> Result<Settings, DaemonError> {
    // The one credential check `agent validate --config` runs too.
    let credentials = Arc::new(config::check_credentials(config)?);
    let host = match &config.host {
        Some(h) => h.clone(),
        None => crate::config::short_hostname().map_err(DaemonError::Hostname)?,
    };
    let root = match &config.root {
        Some(r) => {
            std::fs::create_dir_all(r).map_err(|error| DaemonError::Root {
                path: r.clone(),
                error,
            })?;
            Some(r.canonicalize().map_err(|error| DaemonError::BadRoot {
                path: r.clone(),
                error,
            })?)
        }
        None => None,
    };
    let state_dir = config
        .state_dir
        .clone()
        .unwrap_or_else(|| crate::config::default_state_dir(root.as_deref()));
    let notifier = match &config.notify {
        Some(n) => crate::notifications::Notifier::new(&host, n)?.map(Arc::new),
        None => None,
    };
    Ok(Settings {
        config: config.clone(),
        host,
        root,
        state_dir,
        credentials,
        notifier,
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
    /// Read by apply between resources: set by SIGTERM, and for a run past
    /// its time budget. Cleared when a run starts (unless shutting down).
    cancel: Arc<AtomicBool>,
    /// Set by SIGTERM/SIGINT.
    shutting_down: AtomicBool,
    /// SIGHUP: the next run tries a revision refused as sticky again.
    retry_refused: AtomicBool,
    /// The revision the previous process died rendering (see [`RENDER_MARKER`]).
    crashed_revision: Mutex<Option<String>>,
    drift: RwLock<Option<DriftIndex>>,
    /// Consecutive fetch failures, for the poll backoff.
    fetch_failures: AtomicU32,
    runs: AtomicU32,
    /// Metrics (served at `/metrics`) and Loki events.
    telemetry: Arc<Telemetry>,
    /// Points the drift watchers at the current catalog: called after each
    /// run, and after a run's native apply, before its stacks wait.
    sync_watchers: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// What was logged about each target's resources (skips and reported
    /// drift are logged once per change, not every poll).
    run_log: Mutex<super::log::RunLog>,
    /// A local-directory source has no history to re-read: the catalog of
    /// the last good revision (the last one applied with nothing failed on
    /// the host) is kept here, in memory, and converged when a newer edit
    /// is refused. (Git sources re-read the last good commit from the
    /// cache instead.)
    last_good_local: Mutex<Option<Arc<Catalog>>>,
    /// The number of the last run started (the first is 1).
    run_seq: AtomicU64,
    /// `agent reconcile` clients waiting, each for the first run numbered
    /// at least this (one that started after it asked).
    waiters: Mutex<Vec<(u64, tokio::sync::oneshot::Sender<RunSummary>)>>,
}

impl Shared {
    /// Answers the clients waiting for run `seq` (or an earlier number).
    fn run_done(&self, seq: u64, summary: &RunSummary) {
        self.status
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .last_attempt = Some(summary.clone());
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let (done, waiting): (Vec<_>, Vec<_>) = waiters.drain(..).partition(|(min, _)| *min <= seq);
        *waiters = waiting;
        for (_, tx) in done {
            let _ = tx.send(summary.clone());
        }
    }

    /// Copies the suspension (`agent suspend`) into the status and metrics.
    fn show_suspension(&self, suspension: Option<&Suspension>) {
        self.telemetry.metrics.set_suspended(suspension);
        self.status
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .suspended = suspension.cloned();
    }
}

/// The daemon's side of the control socket (`daemon::control`).
struct DaemonControls(Arc<Shared>);

impl Controls for DaemonControls {
    fn reconcile(&self) -> Result<tokio::sync::oneshot::Receiver<RunSummary>, (Refusing, String)> {
        let shared = &self.0;
        let state_dir = shared.settings.read().unwrap().state_dir.clone();
        if let Some(s) = Suspension::read(&state_dir) {
            return Err((
                Refusing::Suspended,
                format!(
                    "applying is suspended on host {} ({}): no run was started; `agent resume` applies again (and runs now), `agent plan` shows the drift meanwhile",
                    s.host,
                    suspension_text(&s)
                ),
            ));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut waiters = shared.waiters.lock().unwrap_or_else(|e| e.into_inner());
            let next = shared.run_seq.load(Ordering::SeqCst) + 1;
            waiters.push((next, tx));
        }
        info!("run requested (agent reconcile)");
        shared.queue.push(Trigger::Manual);
        Ok(rx)
    }

    fn suspend(
        &self,
        by: String,
        reason: String,
    ) -> Result<(Suspension, bool), (Refusing, String)> {
        let shared = &self.0;
        let (state_dir, host) = {
            let s = shared.settings.read().unwrap();
            (s.state_dir.clone(), s.host.clone())
        };
        if let Some(s) = Suspension::read(&state_dir) {
            return Ok((s, true));
        }
        let suspension = Suspension {
            host,
            since: now_secs(),
            by,
            reason,
        };
        suspension
            .write(&state_dir)
            .map_err(|e| (Refusing::State, e.to_string()))?;
        warn!(by = %suspension.by, reason = %suspension.reason, "applying suspended (agent suspend): runs plan and report drift, and apply nothing until `agent resume`");
        shared.show_suspension(Some(&suspension));
        shared
            .telemetry
            .emit([crate::telemetry::events::suspended(&suspension)]);
        Ok((suspension, false))
    }

    fn resume(&self) -> Result<Option<Suspension>, (Refusing, String)> {
        let shared = &self.0;
        let state_dir = shared.settings.read().unwrap().state_dir.clone();
        let was = Suspension::clear(&state_dir).map_err(|e| (Refusing::State, e.to_string()))?;
        shared.show_suspension(None);
        if let Some(w) = &was {
            shared
                .telemetry
                .emit([crate::telemetry::events::resumed(w)]);
            info!("applying resumed (agent resume); converging now");
            shared.queue.push(Trigger::Manual);
        }
        Ok(was)
    }
}

/// `since <time>, by <who>: <reason>` for messages.
pub fn suspension_text(s: &Suspension) -> String {
    let since = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s.since));
    if s.reason.is_empty() {
        format!("since {since}, by {}", s.by)
    } else {
        format!("since {since}, by {}: {}", s.by, s.reason)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn webhook_config(s: &Settings) -> Option<WebhookConfig> {
    let secret = s.credentials.webhook_secret.clone()?;
    let reference = &s.config.reference;
    let git_ref = if reference.starts_with("refs/") {
        reference.clone()
    } else {
        format!("refs/heads/{reference}")
    };
    Some(WebhookConfig { secret, git_ref })
}

/// Runs the daemon until SIGTERM/SIGINT. `config_path` is re-read on SIGHUP.
pub fn run(config: AgentConfig) -> Result<(), DaemonError> {
    install_panic_hook();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .build()
        .map_err(DaemonError::Runtime)?;
    let result = runtime.block_on(main_loop(config));
    // A run abandoned at shutdown still holds a blocking thread: dropping
    // the runtime would wait for it forever.
    runtime.shutdown_timeout(Duration::from_millis(100));
    result
}

thread_local! {
    /// Where the last panic on this thread happened (set by the hook, read
    /// by the `catch_unwind` that turns it into a refusal).
    static PANIC_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Panics are logged as one line with their location only: a payload could
/// quote a value (the refusal that records it is scrubbed first).
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map_or_else(
            || "an unknown place".to_string(),
            |l| format!("{}:{}", l.file(), l.line()),
        );
        PANIC_AT.with(|p| *p.borrow_mut() = Some(at.clone()));
        let thread = std::thread::current();
        error!(thread = thread.name().unwrap_or("unnamed"), at = %at, "panic (caught: the revision is refused, the daemon goes on)");
    }));
}

/// The message of a caught panic, with where it happened.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string());
    let at = PANIC_AT.with(|p| p.borrow_mut().take());
    match at {
        Some(at) => format!("the agent panicked at {at}: {msg}"),
        None => format!("the agent panicked: {msg}"),
    }
}

/// What the main loop knows about the run in progress.
struct RunInFlight {
    handle: tokio::task::JoinHandle<()>,
    trigger: String,
    started: Instant,
    /// Past the run's time budget: reported, cancelled, no longer waited for
    /// by shutdown.
    stuck: bool,
}

async fn main_loop(config: AgentConfig) -> Result<(), DaemonError> {
    let settings = settings(&config)?;
    // One daemon per state directory, for the daemon's whole life.
    let _daemon_lock = Lock::acquire(&settings.state_dir.join("daemon"), "agent run")?;
    let crashed_revision = read_render_marker(&settings.state_dir);
    if let Some(rev) = &crashed_revision {
        error!(revision = %rev, "the last agent process died while rendering this revision; it is refused, not tried again");
    }
    let webhook = webhook_config(&settings);
    let queue = Arc::new(TriggerQueue::new());
    let status = Arc::new(RwLock::new(StatusSnapshot {
        host: settings.host.clone(),
        source: crate::redact::url_credentials_owned(&config.repo),
        reference: config.reference.clone(),
        ..StatusSnapshot::default()
    }));
    let telemetry = Arc::new(Telemetry::new(&settings.host, config.loki.as_ref())?);
    let http = HttpState::new(queue.clone(), status.clone(), webhook);
    http.set_metrics(telemetry.metrics.clone());
    http.set_api_token(settings.credentials.api_token.clone());
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
    info!(%addr, host = %settings.host, repo = %crate::redact::url_credentials(&config.repo), "agent run: listening");
    let shared = Arc::new(Shared {
        settings: RwLock::new(settings),
        queue: queue.clone(),
        status,
        http: http.clone(),
        cancel: Arc::new(AtomicBool::new(false)),
        shutting_down: AtomicBool::new(false),
        retry_refused: AtomicBool::new(false),
        crashed_revision: Mutex::new(crashed_revision),
        drift: RwLock::new(None),
        fetch_failures: AtomicU32::new(0),
        runs: AtomicU32::new(0),
        telemetry,
        sync_watchers: std::sync::OnceLock::new(),
        run_log: Mutex::new(super::log::RunLog::default()),
        last_good_local: Mutex::new(None),
        run_seq: AtomicU64::new(0),
        waiters: Mutex::new(Vec::new()),
    });
    refresh_status_from_state(&shared);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The local controls (`agent reconcile`, `suspend`, `resume`).
    let control_path = super::control::socket_path(&shared.settings.read().unwrap().state_dir);
    let control = super::control::bind(&control_path).map_err(|source| DaemonError::Control {
        path: control_path.clone(),
        source,
    })?;
    let control_server = tokio::spawn(super::control::serve(
        control,
        control_path,
        Arc::new(DaemonControls(shared.clone())),
        stop_rx.clone(),
    ));
    let mut http_stop = stop_rx.clone();
    let server = tokio::spawn(super::http::serve(
        listener,
        http,
        super::http::Limits::default(),
        async move {
            let _ = http_stop.wait_for(|s| *s).await;
        },
    ));
    tokio::spawn(poll_timer(shared.clone(), stop_rx.clone()));
    let watchers = Arc::new(Mutex::new(Watchers::new(shared.clone())));
    watchers.lock().unwrap().watch_source();
    {
        let w = Arc::downgrade(&watchers);
        let _ = shared.sync_watchers.set(Box::new(move || {
            if let Some(w) = w.upgrade() {
                w.lock().unwrap_or_else(|e| e.into_inner()).sync_managed();
            }
        }));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::Signals)?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(DaemonError::Signals)?;

    queue.push(Trigger::Startup);
    let mut current: Option<RunInFlight> = None;
    // Set by SIGTERM/SIGINT while a run is in progress: exit at this instant
    // at the latest.
    let mut exit_by: Option<tokio::time::Instant> = None;
    loop {
        let budget = shared.settings.read().unwrap().config.run_timeout;
        let stuck_at = current
            .as_ref()
            .filter(|r| !r.stuck)
            .map(|r| tokio::time::Instant::from_std(r.started + budget));
        tokio::select! {
            batch = queue.next(), if current.is_none() && exit_by.is_none() => {
                let batch = settle_source_edits(&queue, batch).await;
                let trigger = batch.iter().map(|t| t.name()).collect::<Vec<_>>().join("+");
                shared.cancel.store(false, Ordering::Relaxed);
                // Numbered after its batch settled: a client that asked
                // before this point waits for this run or a later one.
                let seq = shared.run_seq.fetch_add(1, Ordering::SeqCst) + 1;
                let s = shared.clone();
                let w = watchers.clone();
                // The reconcile runs on the blocking pool; signals, HTTP and
                // the time budget are handled meanwhile.
                let handle = tokio::task::spawn_blocking(move || {
                    let started = Instant::now();
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let summary = reconcile(&s, &batch);
                        w.lock().unwrap_or_else(|e| e.into_inner()).sync_managed();
                        summary
                    }));
                    let summary = run.unwrap_or_else(|payload| {
                        // Stages catch their own panics; this is the last net
                        // (state reading, the watchers).
                        let why = panic_message(&*payload);
                        error!(error = %why, "run failed");
                        RunSummary {
                            trigger: batch.iter().map(|t| t.name()).collect::<Vec<_>>().join("+"),
                            result: RunOutcome::Error,
                            revision: None,
                            refused: None,
                            counts: Default::default(),
                            planned: Default::default(),
                            // The message could quote a value: the log has it.
                            error: Some("the agent panicked during the run; its log says where".to_string()),
                            duration_ms: started.elapsed().as_millis() as u64,
                        }
                    });
                    s.run_done(seq, &summary);
                    // Only now is the run over for `/api/status`: a hand edit
                    // made after it reads `running: false` is watched.
                    let mut st = s.status.write().unwrap_or_else(|e| e.into_inner());
                    st.running = false;
                    st.stuck = None;
                    st.run_started_at = None;
                });
                current = Some(RunInFlight { handle, trigger, started: Instant::now(), stuck: false });
            }
            _ = async { (&mut current.as_mut().expect("guarded").handle).await }, if current.is_some() => {
                let run = current.take().expect("guarded");
                if run.stuck {
                    warn!(trigger = %run.trigger, took = ?run.started.elapsed(), "the abandoned run ended");
                }
                if exit_by.is_some() {
                    break;
                }
            }
            _ = tokio::time::sleep_until(stuck_at.unwrap_or_else(tokio::time::Instant::now)), if stuck_at.is_some() => {
                let run = current.as_mut().expect("guarded");
                run.stuck = true;
                // Apply stops between resources; a stage that never returns
                // keeps its thread, but no new run starts until it ends.
                shared.cancel.store(true, Ordering::Relaxed);
                shared.telemetry.run_error(None, "run", None, &format!("run ({}) exceeded its time budget of {} (run_timeout)", run.trigger, humantime::format_duration(budget)), &run.trigger);
                error!(trigger = %run.trigger, budget = %humantime::format_duration(budget), "run exceeded its time budget (run_timeout); abandoned: no new run starts until it ends");
                shared.status.write().unwrap().stuck = Some(super::status::StuckRun {
                    trigger: run.trigger.clone(),
                    budget_secs: budget.as_secs(),
                });
            }
            _ = tokio::time::sleep_until(exit_by.unwrap_or_else(tokio::time::Instant::now)), if exit_by.is_some() => {
                warn!("the run did not stop within {SHUTDOWN_GRACE:?}; exiting without it");
                break;
            }
            _ = term.recv() => if stop_requested(&shared, &current, &mut exit_by, "SIGTERM") { break },
            _ = tokio::signal::ctrl_c() => if stop_requested(&shared, &current, &mut exit_by, "SIGINT") { break },
            _ = hup.recv() => reload(&shared),
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), control_server).await;
    // Give queued events a moment to reach Loki.
    let telemetry = shared.telemetry.clone();
    let _ = tokio::task::spawn_blocking(move || telemetry.flush(Duration::from_secs(5))).await;
    // A render abandoned here did not crash the agent: do not refuse its
    // revision at the next start.
    remove_render_marker(&shared.settings.read().unwrap().state_dir);
    info!("agent run: stopped");
    Ok(())
}

/// SIGTERM/SIGINT: without a run, stop now (`true`); with one, ask it to
/// finish its current resource and give it [`SHUTDOWN_GRACE`].
fn stop_requested(
    shared: &Shared,
    current: &Option<RunInFlight>,
    exit_by: &mut Option<tokio::time::Instant>,
    signal: &str,
) -> bool {
    shared.shutting_down.store(true, Ordering::Relaxed);
    shared.cancel.store(true, Ordering::Relaxed);
    match current {
        None => {
            info!("{signal}: stopping");
            true
        }
        Some(run) if run.stuck => {
            info!("{signal}: stopping (the abandoned run is left behind)");
            true
        }
        Some(_) => {
            info!("{signal}: finishing the current resource");
            exit_by.get_or_insert_with(|| tokio::time::Instant::now() + SHUTDOWN_GRACE);
            false
        }
    }
}

/// SIGHUP: re-read the config; keep the old one if the new one is bad.
fn reload(shared: &Arc<Shared>) {
    let path = shared.settings.read().unwrap().config.file.clone();
    let result = config::load(&path)
        .map_err(|e| e.to_string())
        .and_then(|c| settings(&c).map_err(|e| e.to_string()))
        .and_then(|s| {
            // The daemon's lock and control socket live in its state
            // directory: moving it needs a restart.
            let old = shared.settings.read().unwrap().state_dir.clone();
            if s.state_dir == old {
                Ok(s)
            } else {
                Err(format!(
                    "the state directory would move from {} to {} (state_dir or root changed); the running daemon holds its lock and control socket there: restart it to move",
                    old.display(),
                    s.state_dir.display()
                ))
            }
        })
        .and_then(|s| {
            shared
                .telemetry
                .configure(&s.host, s.config.loki.as_ref())
                .map_err(|e| e.to_string())
                .map(|()| s)
        });
    match result {
        Ok(new) => {
            shared.http.set_webhook(webhook_config(&new));
            shared.http.set_api_token(new.credentials.api_token.clone());
            *shared.settings.write().unwrap() = new;
            // An operator's reload is the way to try a revision refused as
            // sticky again (e.g. after raising `run_timeout`).
            shared.retry_refused.store(true, Ordering::Relaxed);
            info!(config = %path.display(), "SIGHUP: configuration reloaded");
            shared.queue.push(Trigger::Signal);
        }
        Err(e) => {
            error!(config = %path.display(), error = %e, "SIGHUP: new configuration refused; keeping the old one")
        }
    }
}

fn render_marker(state_dir: &Path) -> PathBuf {
    state_dir.join("daemon").join(RENDER_MARKER)
}

fn read_render_marker(state_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(render_marker(state_dir)).ok()?;
    let rev = text.trim();
    (!rev.is_empty()).then(|| rev.to_string())
}

fn remove_render_marker(state_dir: &Path) {
    let _ = std::fs::remove_file(render_marker(state_dir));
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

/// How one render ended.
enum Rendered {
    Done(Result<Catalog, StageError>),
    Panicked(String),
    TimedOut(Duration),
}

/// Loads a catalog on a thread of its own, waiting until `deadline` at most:
/// a template that never ends is abandoned (its thread runs on, holding no
/// lock and writing nothing, until the template's own limits end it), and a
/// panic is caught and returned.
fn render_bounded(
    source: Arc<dyn crate::source::Source>,
    s: &Settings,
    secrets: Arc<dyn crate::secrets::resolve::SecretSource>,
    deadline: Instant,
) -> Rendered {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let host = s.host.clone();
    let policy = s.config.on_drift;
    let state_dir = engine::managed_state_dir(s.root.as_deref(), &s.state_dir);
    let started = Instant::now();
    let spawned = std::thread::Builder::new()
        .name("render".into())
        .stack_size(RENDER_STACK_BYTES)
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine::load(source, &host, policy, secrets, state_dir)
            }))
            .map_err(|payload| panic_message(&*payload));
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        return Rendered::Done(Err(StageError::Fetch(format!(
            "cannot start the render thread: {e}"
        ))));
    }
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(Ok(result)) => Rendered::Done(result),
        Ok(Err(panic)) => Rendered::Panicked(panic),
        Err(_) => Rendered::TimedOut(started.elapsed()),
    }
}

/// Loads the newest acceptable catalog: the fetched (or pinned) revision, or
/// on refusal the last good one. Returns the catalog, the fetched id and the
/// refusal, if any.
///
/// The candidate gets half the run's budget to render; the last good
/// revision what is left. A candidate refused as sticky (it panicked, timed
/// out, or the last process died rendering it) is not rendered again.
#[allow(clippy::too_many_arguments)]
fn choose_catalog(
    shared: &Shared,
    s: &Settings,
    record: &homelab_agent_state::HostRecord,
    fetch: bool,
    phases: &mut Phases,
    secrets: &Arc<Scrubber>,
    started: Instant,
) -> (Option<Arc<Catalog>>, Option<String>, Option<Refused>) {
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
    let dyn_secrets: Arc<dyn crate::secrets::resolve::SecretSource> = secrets.clone();
    let budget = s.config.run_timeout;
    let refuse = |e: &StageError, revision: Option<String>| Refused {
        stage: e.stage().to_string(),
        revision,
        error: secrets.scrub(&e.to_string()),
        at: now_secs(),
        cause: RefusalCause::Invalid,
    };
    let sticky = |revision: &str, cause: RefusalCause, error: String| Refused {
        stage: "validate".to_string(),
        revision: Some(revision.to_string()),
        error: secrets.scrub(&error),
        at: now_secs(),
        cause,
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
            // The revision about to be rendered, when known before rendering
            // (a commit; a local directory's id comes from what it reads).
            let candidate = match &pinned {
                Some((_, applied)) => Some(applied.clone()),
                None => fetched.clone().or_else(|| spec.rev.clone()),
            };
            let crashed = shared
                .crashed_revision
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let retry = shared.retry_refused.swap(false, Ordering::Relaxed);
            let known_sticky = record.refused.as_ref().filter(|r| {
                !retry && r.cause.is_sticky() && r.revision.is_some() && r.revision == candidate
            });
            if let (Some(known), Some(rev)) = (known_sticky, &candidate) {
                info!(revision = %rev, cause = known.cause.name(), "revision refused earlier (it panicked, hung or crashed the agent); not tried again until a newer one is fetched or the config is reloaded");
                refused = Some(known.clone());
            } else if let Some(rev) = candidate
                .as_ref()
                .filter(|c| crashed.as_deref() == Some(c.as_str()))
            {
                refused = Some(sticky(
                    rev,
                    RefusalCause::Crashed,
                    format!("the agent died while rendering revision {rev} (a crash it could not catch, such as a stack overflow or running out of memory, or a kill); it is not tried again\n  push a fixed revision; to try this one again, reload the config (SIGHUP)"),
                ));
            } else {
                let source = match pinned {
                    Some((cache, applied)) => {
                        phases.time(Phase::Fetch, || engine::open_commit(&cache, &applied))
                    }
                    None => Ok(resolved.source),
                };
                refused = match source {
                    Err(e) => Some(refuse(&e, fetched.clone())),
                    Ok(src) => {
                        if let Some(rev) = &candidate {
                            write_render_marker(&s.state_dir, rev);
                        }
                        let half = started + budget / 2;
                        let rendered = phases.time(Phase::Render, || {
                            render_bounded(src, s, dyn_secrets.clone(), half)
                        });
                        remove_render_marker(&s.state_dir);
                        let label = candidate
                            .clone()
                            .unwrap_or_else(|| "the local directory".into());
                        match rendered {
                            Rendered::Done(Ok(c)) => return (Some(Arc::new(c)), fetched, None),
                            Rendered::Done(Err(e)) => Some(refuse(&e, fetched.clone())),
                            Rendered::Panicked(why) => Some(sticky(
                                &label,
                                RefusalCause::Panicked,
                                format!("rendering revision {label} crashed the agent: {why}\n  this is a bug in the agent, triggered by this revision: please report it; push a revision without the change meanwhile"),
                            )),
                            Rendered::TimedOut(took) => Some(sticky(
                                &label,
                                RefusalCause::TimedOut,
                                format!("rendering revision {label} took longer than {} (half of run_timeout: {}); abandoned\n  look for a template that loops over a huge range or recurses; raise `run_timeout` in the agent config if the render is legitimately slow", humantime::format_duration(Duration::from_secs(took.as_secs().max(1))), humantime::format_duration(budget)),
                            )),
                        }
                    }
                };
            }
        }
        Err(e) => refused = Some(refuse(&e, None)),
    }
    // Fall back to the last good revision: remote sources keep it in the
    // cache; a local directory's is the catalog kept in memory.
    let refused_revision = refused.as_ref().and_then(|r| r.revision.as_ref());
    let fallback = match (
        git::parse_location(&s.config.repo),
        &record.last_good_revision,
    ) {
        (RepoLocation::Local(_), Some(good)) if refused.is_some() => {
            let kept = shared
                .last_good_local
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            kept.filter(|c| &c.revision == good && refused_revision != Some(good))
        }
        (RepoLocation::Remote(url), Some(good))
            if refused.as_ref().and_then(|r| r.revision.as_ref()) != Some(good) =>
        {
            let cache = engine::cache_dir(&s.state_dir, &url);
            match phases.time(Phase::Fetch, || engine::open_commit(&cache, good)) {
                Ok(src) => match phases.time(Phase::Render, || {
                    render_bounded(src, s, dyn_secrets.clone(), started + budget)
                }) {
                    Rendered::Done(Ok(c)) => Some(Arc::new(c)),
                    Rendered::Done(Err(e)) => {
                        warn!(revision = %good, error = %secrets.scrub(&e.to_string()), "the last good revision does not load either");
                        None
                    }
                    Rendered::Panicked(why) => {
                        warn!(revision = %good, error = %secrets.scrub(&why), "the last good revision does not load either");
                        None
                    }
                    Rendered::TimedOut(_) => {
                        warn!(revision = %good, "the last good revision did not render within the run's budget");
                        None
                    }
                },
                Err(_) => None,
            }
        }
        _ => None,
    };
    (fallback, fetched, refused)
}

fn write_render_marker(state_dir: &Path, revision: &str) {
    let path = render_marker(state_dir);
    if let Err(e) = std::fs::write(&path, format!("{revision}\n")) {
        warn!(path = %path.display(), error = %e, "cannot write the render marker; a crash during this render would be retried after a restart");
    }
}

/// One run: choose the revision, plan, apply, record.
fn reconcile(shared: &Arc<Shared>, triggers: &BTreeSet<Trigger>) -> RunSummary {
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
    super::log::run_started(&trigger);
    {
        let mut st = shared.status.write().unwrap();
        st.running = true;
        st.run_started_at = Some(now_secs());
    }
    let stopped = |error: String, phases: &Phases| {
        telemetry
            .metrics
            .run_finished(primary, RunOutcome::Error, phases, started.elapsed());
        super::log::run_finished(
            &trigger,
            None,
            RunOutcome::Error,
            &Default::default(),
            started.elapsed(),
        );
        shared.status.write().unwrap().running = false;
        RunSummary {
            trigger: trigger.clone(),
            result: RunOutcome::Error,
            revision: None,
            refused: None,
            counts: Default::default(),
            planned: Default::default(),
            error: Some(error),
            duration_ms: started.elapsed().as_millis() as u64,
        }
    };
    let _lock = match Lock::acquire(&s.state_dir, &format!("agent run ({trigger})")) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "run not started: the state directory is locked; retrying at the next trigger");
            return stopped(e.to_string(), &phases);
        }
    };
    let record =
        match Store::open_read_only_recovering(&s.state_dir).and_then(|st| st.host(&s.host)) {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "cannot read state");
                telemetry.run_error(None, "state", None, &e.to_string(), &trigger);
                return stopped(format!("cannot read state: {e}"), &phases);
            }
        };
    // `agent suspend`: plan and report drift, apply nothing.
    let suspended = Suspension::read(&s.state_dir);
    shared.show_suspension(suspended.as_ref());
    // Every value this run resolves is scrubbed from what it reports.
    let secrets = Scrubber::new(
        telemetry.count_secrets(engine::secret_source(s.config.onepassword.as_ref())),
    );
    // A run for drift alone converges to the revision already fetched: no
    // network round trip between a hand edit and its heal.
    let fetch = !triggers.iter().all(|t| *t == Trigger::Drift) || record.fetched_revision.is_none();
    let (catalog, fetched, mut refused) =
        choose_catalog(shared, &s, &record, fetch, &mut phases, &secrets, started);
    if let (Some(c), None) = (&catalog, &suspended) {
        notify(shared, &s, |n| {
            n.run_started(&c.revision, record.applied_revision.as_deref())
        });
    }
    let mut planned = crate::plan::Summary::default();
    let mut outcome = RunOutcome::Error;
    let mut run_counts = homelab_agent_state::RunCounts::default();
    let mut converged = None;
    let mut run_error = None;
    if let (Some(catalog), Some(suspension)) = (&catalog, &suspended) {
        // Plan only: the drift gauges, the status and the log show what a
        // run would change; the revision is not converged.
        converged = Some(catalog.revision.clone());
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_plan_only(shared, &s, catalog.clone(), &trigger, &mut phases, &secrets)
        }));
        match run {
            Ok(Ok(p)) => {
                planned = p;
                outcome = RunOutcome::Suspended;
                super::log::suspended_run(&suspension_text(suspension), &planned);
            }
            Ok(Err(e)) => {
                error!(error = %e, "plan failed (suspended)");
                run_error = Some(e.message);
            }
            Err(payload) => {
                let why = secrets.scrub(&panic_message(&*payload));
                error!(error = %why, "plan failed: a stage panicked (suspended)");
                run_error = Some(why);
            }
        }
        record_source(
            &s,
            &crate::run::record::SourceResult {
                fetched: fetched.as_deref(),
                converged: None,
                refused: refused.as_ref(),
            },
        );
    } else if let Some(catalog) = catalog {
        let revision = catalog.revision.clone();
        converged = Some(revision.clone());
        let candidate = refused.is_none();
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_plan_apply(shared, &s, catalog.clone(), &trigger, &mut phases, &secrets)
        }));
        match run {
            Ok(Ok(done)) => {
                planned = done.planned;
                outcome = done.outcome;
                run_counts = done.counts;
                run_error = done.error;
                // A local directory has no history: keep what converged,
                // to fall back to after a bad edit.
                if candidate
                    && done.host_applied
                    && matches!(git::parse_location(&s.config.repo), RepoLocation::Local(_))
                {
                    *shared
                        .last_good_local
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(catalog);
                }
            }
            Ok(Err(e)) => {
                error!(error = %e, "run failed");
                run_error = Some(e.message);
            }
            Err(payload) => {
                let why = secrets.scrub(&panic_message(&*payload));
                error!(revision = %revision, error = %why, "run failed: a stage panicked");
                run_error = Some(why.clone());
                telemetry.run_error(Some(Phase::Apply), "apply", Some(&revision), &why, &trigger);
                if candidate && record.last_good_revision.as_deref() != Some(revision.as_str()) {
                    // The newest revision panics plan or apply: refuse it and
                    // converge the last good one (the next run skips it).
                    refused = Some(Refused {
                        stage: "apply".to_string(),
                        revision: Some(revision.clone()),
                        error: format!("{why}\n  this is a bug in the agent, triggered by this revision: please report it; the last good revision is applied meanwhile"),
                        at: now_secs(),
                        cause: RefusalCause::Panicked,
                    });
                    // A commit can be skipped by id: converge the last good
                    // one now. (A local directory would only panic again.)
                    if matches!(git::parse_location(&s.config.repo), RepoLocation::Remote(_)) {
                        shared.queue.push(Trigger::Drift);
                    }
                }
            }
        }
        let candidate_ok = refused.is_none();
        record_source(
            &s,
            &crate::run::record::SourceResult {
                fetched: fetched.as_deref(),
                converged: Some((&revision, candidate_ok)),
                refused: refused.as_ref(),
            },
        );
    } else {
        record_source(
            &s,
            &crate::run::record::SourceResult {
                fetched: fetched.as_deref(),
                converged: None,
                refused: refused.as_ref(),
            },
        );
    }
    report_refusal(shared, &record, refused.as_ref(), &trigger);
    if let Some(r) = &refused {
        let scrub = |t: &str| secrets.scrub(t);
        notify(shared, &s, |n| {
            n.refused(r.revision.as_deref(), &r.stage, &r.error, &scrub)
        });
    }
    shared.runs.fetch_add(1, Ordering::Relaxed);
    telemetry
        .metrics
        .run_finished(primary, outcome, &phases, started.elapsed());
    super::log::run_finished(
        &trigger,
        converged.as_deref(),
        outcome,
        &run_counts,
        started.elapsed(),
    );
    release_memory();
    refresh_status_from_state(shared);
    shared.status.write().unwrap().planned = planned;
    RunSummary {
        trigger,
        result: outcome,
        revision: converged,
        refused: refused.map(|r| Refusal {
            stage: r.stage,
            revision: r.revision,
            error: r.error,
            cause: r.cause,
        }),
        counts: run_counts,
        planned,
        error: run_error,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

/// Sends a run's notifications (`notify:`); what is not delivered is
/// logged and counted, and never fails the run.
fn notify(
    shared: &Shared,
    s: &Settings,
    send: impl FnOnce(&crate::notifications::Notifier) -> Vec<crate::notifications::NotifyError>,
) {
    let Some(n) = &s.notifier else {
        return;
    };
    for e in send(n) {
        warn!(error = %e, "notification not delivered (the run goes on)");
        shared.telemetry.metrics.notify_error(e.target());
    }
}

/// Writes what the source stage decided (see `run::record`).
fn record_source(s: &Settings, result: &crate::run::record::SourceResult<'_>) {
    let written = Store::open(&s.state_dir)
        .and_then(|st| crate::run::record::source_result(&st, &s.host, result));
    if let Err(e) = written {
        warn!(error = %e, "cannot record the revisions of this run in the state");
    }
}

/// Logs, counts and (once per refusal) sends a refused revision.
fn report_refusal(
    shared: &Shared,
    record: &homelab_agent_state::HostRecord,
    refused: Option<&Refused>,
    trigger: &str,
) {
    let telemetry = &shared.telemetry;
    let Some(r) = refused else {
        shared.fetch_failures.store(0, Ordering::Relaxed);
        return;
    };
    super::log::refused(r);
    // Counted every run; sent to Loki once per refused revision.
    let known = record
        .refused
        .as_ref()
        .is_some_and(|k| k.stage == r.stage && k.revision == r.revision && k.error == r.error);
    // `source_errors_total` counts what the source stages refused; a
    // revision that panicked plan or apply is an apply failure.
    match r.stage.as_str() {
        "fetch" | "signature" => {
            telemetry.metrics.source_error(&r.stage);
            telemetry.metrics.phase_failed(Phase::Fetch);
        }
        "validate" => {
            telemetry.metrics.source_error(&r.stage);
            telemetry.metrics.phase_failed(Phase::Render);
        }
        _ => telemetry.metrics.phase_failed(Phase::Apply),
    }
    if !known {
        telemetry.emit([crate::telemetry::events::refused(
            &r.stage,
            r.revision.as_deref(),
            &r.error,
            trigger,
        )]);
    }
    if r.stage == "fetch" {
        shared.fetch_failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reports a daemon run that stopped before applying: scrubbed of the
/// run's secret values, counted in its phase and sent as an error event.
struct Stopper<'a> {
    telemetry: &'a Telemetry,
    secrets: &'a Scrubber,
    revision: String,
    trigger: &'a str,
}

impl Stopper<'_> {
    fn stop(&self, phase: Option<Phase>, stage: &str, e: String) -> RunStopped {
        let message = self.secrets.scrub(&e);
        self.telemetry
            .run_error(phase, stage, Some(&self.revision), &message, self.trigger);
        RunStopped { message }
    }
}

/// Why a daemon run cannot look at its host.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error(transparent)]
    Fs(#[from] crate::fsops::FsError),
    /// Said once per run, not once per owner, package and service.
    #[error(transparent)]
    Platform(#[from] crate::resources::OtherPlatform),
}

/// What a daemon run works on: the host (under the sandbox root, if any)
/// and how its stacks reach their clusters. A host of another platform
/// than this machine's (outside a sandbox) is refused here, once.
fn run_setup(
    s: &Settings,
    catalog: &Catalog,
    stop: &Stopper<'_>,
) -> Result<(Host, crate::k8s::client::KubeSettings), RunStopped> {
    let setup = || -> Result<Host, SetupError> {
        let fs = Fs::new(s.root.as_deref().unwrap_or(Path::new("/")))?;
        let host = Host::new(fs, s.root.is_some(), catalog.host.platform);
        host.check_platform(&catalog.host.name)?;
        Ok(host)
    };
    let host = setup().map_err(|e| stop.stop(Some(Phase::Observe), "observe", e.to_string()))?;
    let kube = crate::k8s::client::KubeSettings {
        kubeconfig: s.config.kubeconfig.clone(),
        sandbox: s.root.is_some(),
    };
    Ok((host, kube))
}

/// A failure of a daemon run before it applied, already logged and sent
/// (scrubbed of the run's secret values).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct RunStopped {
    message: String,
}

/// Heals the host's native resources with the catalog of the run in
/// progress (called while its stacks wait): plan, apply, telemetry. Its own
/// run record, trigger `watch`.
fn heal_native(
    shared: &Arc<Shared>,
    catalog: &Arc<Catalog>,
    cx: &crate::run::RunContext<'_>,
    store: &Store,
    secrets: &Scrubber,
) {
    let trigger = cx.trigger;
    let run = match crate::run::heal(catalog.clone(), cx, store) {
        Ok(run) => run,
        Err(e) => {
            let e = secrets.scrub(&e.to_string());
            warn!(error = %e, "cannot heal drift during a rollout");
            shared.telemetry.run_error(
                Some(Phase::Apply),
                "apply",
                Some(&catalog.revision),
                &e,
                trigger,
            );
            return;
        }
    };
    match &run.apply {
        crate::run::ApplyStage::Done(applied) => {
            shared
                .telemetry
                .observe_apply(&run.plan, &applied.host, trigger);
            shared
                .run_log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .outcomes(
                    super::log::Target::Host,
                    &applied.host.outcomes,
                    &|t: &str| secrets.scrub(t),
                );
            info!(
                trigger,
                healed = applied.host.counts.drift_healed,
                failed = applied.host.counts.failed,
                "native drift healed while a stack waits for its rollout"
            );
        }
        _ => shared.telemetry.observe_plan(&run.plan),
    }
}

/// What a daemon run that applied reports back to `reconcile`.
struct RunDone {
    /// What its plan found.
    planned: crate::plan::Summary,
    /// The record's result.
    outcome: RunOutcome,
    /// The counts of every target.
    counts: homelab_agent_state::RunCounts,
    /// None of the host's resources failed: its revision is the applied
    /// (and so the last good) one.
    host_applied: bool,
    /// The record's first error (scrubbed).
    error: Option<String>,
}

fn run_plan_apply(
    shared: &Arc<Shared>,
    s: &Settings,
    catalog: Arc<Catalog>,
    trigger: &str,
    phases: &mut Phases,
    secrets: &Scrubber,
) -> Result<RunDone, RunStopped> {
    let telemetry = &shared.telemetry;
    let stop = Stopper {
        telemetry,
        secrets,
        revision: catalog.revision.clone(),
        trigger,
    };
    let (host, kube) = run_setup(s, &catalog, &stop)?;
    let scrub = |t: &str| secrets.scrub(t);
    // The drift watcher compares events against this catalog from now on:
    // set before applying, so the events of the agent's own writes compare
    // equal and queue nothing.
    let on_planned = |plan: &plan::Plan| watch_plan(shared, s, &host, plan);
    // The watchers follow this catalog before the stacks start: a hand
    // edit made while a stack waits is seen at once.
    let on_host_applied = || {
        if let Some(sync) = shared.sync_watchers.get() {
            sync();
        }
    };
    let heal_cx = crate::run::RunContext {
        host: &host,
        state_dir: &s.state_dir,
        kube: &kube,
        trigger: Trigger::Drift.name(),
        cancel: Some(&shared.cancel),
        scrub: &scrub,
        on_planned: None,
        on_host_applied: None,
        idle: None,
    };
    // While a stack waits for its rollout, native drift is healed at once
    // (a run of its own, trigger `watch`), never after the stack's timeout.
    let heal = |store: &Store| {
        if shared.queue.take_drift() {
            heal_native(shared, &catalog, &heal_cx, store, secrets);
        }
    };
    let cx = crate::run::RunContext {
        host: &host,
        state_dir: &s.state_dir,
        kube: &kube,
        trigger,
        cancel: Some(&shared.cancel),
        scrub: &scrub,
        on_planned: Some(&on_planned),
        on_host_applied: Some(&on_host_applied),
        idle: Some(&heal),
    };
    let run = crate::run::run(
        catalog.clone(),
        crate::run::Mode::Apply,
        crate::run::Targets::All,
        &cx,
    )
    .map_err(|e| stop.stop(None, "state", e.to_string()))?;
    phases.add_all(&run.phases);
    notify(shared, s, |n| {
        n.run_finished(&crate::notifications::RunNotice::from_run(&run), &scrub)
    });
    let planned = run.plan.summary();
    let applied = match &run.apply {
        crate::run::ApplyStage::Done(applied) => applied,
        crate::run::ApplyStage::Refused(e) => {
            telemetry.observe_plan(&run.plan);
            return Err(stop.stop(Some(Phase::Observe), "observe", e.to_string()));
        }
        crate::run::ApplyStage::NotAsked => unreachable!("an apply run applies"),
    };
    {
        let mut log = shared.run_log.lock().unwrap_or_else(|e| e.into_inner());
        log.outcomes(super::log::Target::Host, &applied.host.outcomes, &scrub);
        for st in &applied.stacks {
            if let Some(why) = &st.not_checked {
                info!(stack = %st.name, reason = %why, "stack not checked");
            }
            if let Some(e) = &st.error {
                warn!(stack = %st.name, error = %e, "stack failed");
            }
            log.outcomes(super::log::Target::Stack(&st.name), &st.outcomes, &scrub);
        }
    }
    for f in applied.stacks.iter().flat_map(|st| st.failures()) {
        telemetry.metrics.kube_error(f);
    }
    telemetry.observe_apply(&run.plan, &applied.host, trigger);
    Ok(RunDone {
        planned,
        outcome: RunOutcome::from(applied.record.result),
        counts: applied.record.counts.clone(),
        host_applied: applied.host.counts.failed == 0,
        error: applied.record.error.as_deref().map(scrub),
    })
}

/// Points the drift watcher's comparisons at `plan`'s catalog.
fn watch_plan(shared: &Shared, s: &Settings, host: &Host, plan: &plan::Plan) {
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
}

/// A run while applying is suspended: plans every target and reports what
/// it found (drift gauges, the log once per drifted resource, the status),
/// applies and records nothing. Hand edits stay watched: each queues such
/// a run, so drift is seen as it happens.
fn run_plan_only(
    shared: &Arc<Shared>,
    s: &Settings,
    catalog: Arc<Catalog>,
    trigger: &str,
    phases: &mut Phases,
    secrets: &Scrubber,
) -> Result<crate::plan::Summary, RunStopped> {
    let telemetry = &shared.telemetry;
    let stop = Stopper {
        telemetry,
        secrets,
        revision: catalog.revision.clone(),
        trigger,
    };
    let (host, kube) = run_setup(s, &catalog, &stop)?;
    let scrub = |t: &str| secrets.scrub(t);
    let cx = crate::run::RunContext {
        host: &host,
        state_dir: &s.state_dir,
        kube: &kube,
        trigger,
        cancel: Some(&shared.cancel),
        scrub: &scrub,
        on_planned: None,
        on_host_applied: None,
        idle: None,
    };
    let run = crate::run::run(
        catalog,
        crate::run::Mode::Plan,
        crate::run::Targets::All,
        &cx,
    )
    .map_err(|e| stop.stop(None, "state", e.to_string()))?;
    phases.add_all(&run.phases);
    watch_plan(shared, s, &host, &run.plan);
    telemetry.observe_suspended_plan(&run.plan, trigger);
    let mut planned = run.plan.summary();
    for st in &run.stacks {
        planned.add(&st.summary());
    }
    shared
        .run_log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .suspended_drift(
            run.plan
                .resources
                .iter()
                .filter(|p| p.class == crate::plan::Classification::Drift)
                .map(|p| run.plan.catalog.entries[p.index].id.as_str()),
        );
    Ok(planned)
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
    shared.show_suspension(Suspension::read(&s.state_dir).as_ref());
    let last_run = store.runs(&s.host, 1).ok().and_then(|mut r| r.pop());
    let mut st = shared.status.write().unwrap();
    st.host = s.host.clone();
    st.source = crate::redact::url_credentials_owned(&s.config.repo);
    st.reference = s.config.reference.clone();
    st.fetched_revision = record.fetched_revision;
    st.applied_revision = record.applied_revision;
    st.last_good_revision = record.last_good_revision;
    st.manual_override = record.manual_override.is_some();
    st.refused = record.refused.map(|r| Refusal {
        stage: r.stage,
        revision: r.revision,
        // Recorded scrubbed; hidden again for records of older versions.
        error: crate::redact::url_credentials_owned(&r.error),
        cause: r.cause,
    });
    st.run_timeout_secs = s.config.run_timeout.as_secs();
    st.counts = last_run
        .as_ref()
        .map(|r| r.counts.clone())
        .unwrap_or_default();
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

    /// A source that panics or blocks on its first read: what a bad
    /// revision does to a stage, without depending on which input does it.
    struct Hostile(&'static str);

    impl crate::source::Source for Hostile {
        fn read(&self, _path: &str) -> Result<Option<Vec<u8>>, crate::source::SourceError> {
            match self.0 {
                "panic" => panic!("a stage cannot cope with this revision"),
                _ => {
                    std::thread::sleep(Duration::from_secs(30));
                    Ok(None)
                }
            }
        }
        fn list(&self, _dir: &str) -> Result<Vec<String>, crate::source::SourceError> {
            Ok(Vec::new())
        }
        fn revision(&self) -> String {
            "hostile".into()
        }
        fn describe(&self) -> String {
            "a hostile source".into()
        }
    }

    fn test_settings() -> Settings {
        let config =
            config::parse(Path::new("/nonexistent/agent.yaml"), "repo: .\nhost: lab\n").unwrap();
        Settings {
            host: "lab".into(),
            root: None,
            state_dir: PathBuf::from("/nonexistent"),
            credentials: Arc::new(config::Credentials::default()),
            notifier: None,
            config,
        }
    }

    #[test]
    fn a_render_that_panics_is_caught_with_its_message_and_place() {
        let started = Instant::now();
        let rendered = render_bounded(
            Arc::new(Hostile("panic")),
            &test_settings(),
            Arc::new(crate::secrets::resolve::Offline),
            started + Duration::from_secs(10),
        );
        match rendered {
            Rendered::Panicked(why) => {
                assert!(
                    why.contains("a stage cannot cope with this revision"),
                    "{why}"
                );
            }
            _ => panic!("not reported as a panic"),
        }
    }

    #[test]
    fn a_render_past_its_deadline_is_abandoned() {
        // The render never ends by itself: returning at all is the
        // abandonment, and it says so.
        let rendered = render_bounded(
            Arc::new(Hostile("hang")),
            &test_settings(),
            Arc::new(crate::secrets::resolve::Offline),
            Instant::now() + Duration::from_millis(300),
        );
        assert!(matches!(rendered, Rendered::TimedOut(_)));
    }

    #[test]
    fn the_render_marker_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("daemon")).unwrap();
        assert_eq!(read_render_marker(dir.path()), None);
        write_render_marker(dir.path(), "abc123");
        assert_eq!(read_render_marker(dir.path()).as_deref(), Some("abc123"));
        remove_render_marker(dir.path());
        assert_eq!(read_render_marker(dir.path()), None);
    }

    /// On tokio's paused clock: any sleep in the settle would move it.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn other_triggers_do_not_wait() {
        let queue = TriggerQueue::new();
        let started = tokio::time::Instant::now();
        let batch = settle_source_edits(&queue, BTreeSet::from([Trigger::Webhook])).await;
        assert_eq!(batch, BTreeSet::from([Trigger::Webhook]));
        assert_eq!(tokio::time::Instant::now(), started, "the batch waited");
    }
}
