//! The `agent` command line: parses arguments, runs the stages in order and
//! maps outcomes to exit codes. The only place that uses `anyhow`.
//!
//! Exit codes (README.md "Exit codes"): 0 nothing failed; 1 an error or a
//! failed resource or stack; 2 only with `--detailed-exitcode`: plan found
//! something to do or look at, or apply changed something or left
//! something undone (skipped, drift reported). A skipped resource is never
//! a failure.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use homelab_agent_state::{Lock, Store};

use crate::config;
use crate::desired::{self, model::DriftPolicy};
use crate::engine::{self, SourceSpec};
use crate::fsops::Fs;
use crate::report::{self, Style};
use crate::resources::Host;
use crate::source::{LocalDir, Source};
use crate::telemetry::{Phase, Phases};

/// Writes to standard output; a reader that went away (`agent status |
/// head`, `agent plan | head -1`) is not an error: what is left is dropped
/// and the command finishes its work (an apply still records its run,
/// writes its metrics file and flushes its events). `println!` would panic.
fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    static CLOSED: AtomicBool = AtomicBool::new(false);
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        // Closed pipe, full disk, revoked terminal: nobody reads what follows.
        CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("warning: cannot write to standard output: {e}");
        }
    }
}

/// `print!` that survives a closed standard output (see [`write_stdout`]).
macro_rules! out {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*)) };
}

/// `println!` that survives a closed standard output (see [`write_stdout`]).
macro_rules! outln {
    () => { write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

mod control;

/// Plans and converges this host from a repository of desired state.
///
/// The repository holds hosts/<name>.yaml (what each host runs), modules/
/// (reusable bundles of resources with templates) and k8s/ (Kubernetes
/// stacks). `agent plan` shows what would change and changes nothing;
/// `agent apply` converges. Try it safely with `--root /tmp/lab`, which puts
/// every managed path under a sandbox directory.
#[derive(Debug, Parser)]
#[command(name = "agent", version = crate::dist::VERSION, about, long_about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show what apply would do: creates (+), changes (~), prunes (-) and drift (!). Never writes.
    Plan(PlanArgs),
    /// Converge the host to the desired state, prune what left it, and record the run.
    Apply(ApplyArgs),
    /// Check the desired state of one or every host without looking at the host.
    Validate(ValidateArgs),
    /// Show the applied revision, the inventory and recent runs from the state directory.
    Status(StatusArgs),
    /// Run as a daemon: converge on every push webhook, poll, file change and SIGHUP.
    Run(RunArgs),
    /// Ask the running daemon for a run now, and wait for its result.
    Reconcile(ReconcileArgs),
    /// Stop applying on this host: the daemon still fetches, plans and reports drift; `agent
    /// apply` refuses. Kept across restarts until `agent resume`.
    Suspend(SuspendArgs),
    /// Apply again after `agent suspend` (the daemon converges at once).
    Resume(ControlArgs),
    /// Secrets from 1Password Connect.
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// List the resource kinds a module can declare, with their fields.
    Kinds,
    /// Install the agent's own service (systemd unit / LaunchDaemon) running
    /// `agent run --config FILE`, restarted on failure, and start it.
    InstallService(InstallArgs),
    /// Stop, disable and remove the agent's own service.
    UninstallService(UninstallArgs),
    /// Start a homelab repository for this machine: hosts/<this host>.yaml, an example module,
    /// an agent config and a README. Never overwrites a file.
    Init(crate::init::InitArgs),
    /// Print a shell completion script.
    Completions(crate::dist::CompletionsArgs),
    /// Write the man pages, completions and service file a package ships (scripts/release.sh).
    #[command(hide = true)]
    DistFiles(crate::dist::DistFilesArgs),
}

/// The command line's definition (completions and man pages are made from it).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(Debug, Args)]
struct InstallArgs {
    /// Agent config the service runs with (made absolute). Default: the platform's default path.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The agent binary the service runs. Default: this binary.
    #[arg(long, value_name = "FILE")]
    binary: Option<PathBuf>,
    /// Write the unit/plist under this directory only; call no service manager.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Print the unit/plist and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Bootstrap from this repository: copy its agents/<HOST>.yaml to --config first.
    #[arg(long, value_name = "PATH|URL", requires = "host")]
    repo: Option<String>,
    /// With --repo: the host whose agent config to take (agents/<HOST>.yaml).
    #[arg(long, value_name = "NAME", requires = "repo")]
    host: Option<String>,
    /// With --repo: branch, tag or commit to read it from.
    #[arg(
        long = "ref",
        value_name = "REF",
        default_value = "main",
        requires = "repo"
    )]
    reference: String,
    /// With --repo: a Forgejo access token file (chmod 600) for a private repository.
    #[arg(long, value_name = "FILE", requires = "repo")]
    token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct UninstallArgs {
    /// Remove the unit/plist under this directory only; call no service manager.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum SecretsCommand {
    /// Resolve every op:// reference the host uses; report missing, ambiguous or unauthorised
    /// ones with the resource that uses them. Prints no values. Exit 1 if any fails.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    target: Target,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Agent config file. Default: /etc/homelab-agent/agent.yaml (Linux),
    /// /usr/local/etc/homelab-agent/agent.yaml (macOS).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Append the log to FILE (and point standard error at it) instead of standard error;
    /// when a rotator (newsyslog) moves FILE away, the next line opens it again.
    /// `install-service` on macOS sets it, with a newsyslog config that rotates the file.
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
}

/// How to find the daemon (its state directory holds the control socket).
#[derive(Debug, Args)]
struct ControlArgs {
    /// Agent config the daemon runs with (its state_dir, root and host). Default: the
    /// platform's default config (/etc/homelab-agent/agent.yaml on Linux) when it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The daemon's state directory (instead of a config).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Sandbox root the daemon runs with (locates the default state directory).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ReconcileArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// How long to wait for the run's result (a run already in progress finishes first).
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Queue the run and return at once.
    #[arg(long)]
    no_wait: bool,
    /// Print the result as JSON (docs/json-output.md).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct SuspendArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// Why (shown by `agent status`, /api/status and `agent apply`'s refusal).
    #[arg(long, value_name = "TEXT", default_value = "")]
    reason: String,
}

#[derive(Debug, Args)]
struct Target {
    /// Agent config file; its repo, ref, host, root, state_dir, token and signature
    /// settings are the defaults for the flags below. Default: none for plan/apply.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Desired-state repository: a local directory (uncommitted edits included), or a git URL
    /// (https://, http://, ssh://, git@host:owner/repo.git, file://) fetched into the state dir.
    #[arg(long, value_name = "PATH|URL")]
    repo: Option<String>,
    /// Branch, tag or commit to follow for a git URL. Default: main.
    #[arg(long = "ref", value_name = "REF")]
    reference: Option<String>,
    /// Plan or apply this revision instead (a commit, tag, branch, or `HEAD~3`); read straight
    /// from the commit, no work tree. With a local directory it must be a git repository.
    #[arg(long, value_name = "REV")]
    rev: Option<String>,
    /// Host to plan for (a file hosts/NAME.yaml). Default: this machine's short hostname.
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    /// Sandbox: prefix every managed path with DIR (and keep state inside it).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Where the agent keeps its state. Default: /var/lib/homelab-agent
    /// (Linux), /usr/local/var/homelab-agent (macOS), or DIR/var/lib/homelab-agent with --root.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct PlanArgs {
    #[command(flatten)]
    target: Target,
    /// Limit the run to SELECTOR (repeatable): a resource id as the plan shows it
    /// (`file:/usr/local/etc/zot/config.json`), `module:NAME` (its resources) or `stack:NAME` (one
    /// Kubernetes stack). Also covered, transitively: what they come after and the services they
    /// notify. Nothing else is observed, compared, applied or pruned; only a leftover named by id
    /// (in the state, no longer declared) is pruned. Host selectors plan no stack, stack selectors
    /// no host resource. A selector that matches nothing is an error (exit 1) and changes nothing.
    /// Exit codes keep their meaning, for what the run covered.
    #[arg(long = "target", value_name = "SELECTOR")]
    targets: Vec<String>,
    /// Print the plan as JSON (one object per resource).
    #[arg(long)]
    json: bool,
    /// Exit 2 when there is something to do or look at: a create, change, prune or drift
    /// (healed or `on_drift: report`), or a skipped resource (a secret that did not resolve, a
    /// held change: not compared). 0 when everything is in sync; 1 on errors (invalid desired
    /// state, something that could not be observed). Without the flag: 0 or 1.
    #[arg(long)]
    detailed_exitcode: bool,
    /// Also write the plan's metrics (resources managed, drifted, pending; revisions; last
    /// success) to FILE for node-exporter's textfile collector (atomically; name it *.prom).
    /// Not with --target: the metrics describe the whole host.
    #[arg(long, value_name = "FILE", conflicts_with = "targets")]
    metrics_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ApplyArgs {
    #[command(flatten)]
    target: Target,
    /// Apply only SELECTOR (repeatable; see `agent plan --help`): a resource id, `module:NAME`
    /// or `stack:NAME`, with what they come after and the services they notify. The run is
    /// recorded with its targets but sets no applied revision or last success: the host may not
    /// match its desired state until a whole apply.
    #[arg(long = "target", value_name = "SELECTOR")]
    targets: Vec<String>,
    /// Print what was done as JSON.
    #[arg(long)]
    json: bool,
    /// Exit 2 when nothing failed and something was changed (created, changed, healed, pruned)
    /// or left undone (a skipped resource, drift reported under `on_drift: report`). 0 when
    /// nothing failed and everything was already in sync; 1 when a resource or stack failed or
    /// the run was refused. Without the flag: 0 (skipped resources included) or 1.
    #[arg(long)]
    detailed_exitcode: bool,
    /// Also write the run's metrics to FILE for node-exporter's textfile collector (see
    /// `agent plan --help`). Not with --target.
    #[arg(long, value_name = "FILE", conflicts_with = "targets")]
    metrics_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ValidateArgs {
    /// Check this agent config file as `agent run` does at start (its keys and
    /// every file it names), then the desired state of its host in its repository
    /// when that is a local directory (a remote one is not fetched).
    #[arg(long, value_name = "FILE", conflicts_with = "repo")]
    config: Option<PathBuf>,
    /// Desired-state repository: a local directory (the one holding hosts/).
    #[arg(long, value_name = "PATH", default_value = ".")]
    repo: PathBuf,
    /// Validate only this host. Default: every host in hosts/ (with --config: its host).
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Host whose state to show. Default: this machine's short hostname.
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    /// Sandbox root used with plan/apply (locates the default state directory).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// State directory (see `agent apply --help`).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// How many recent runs to show.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Agent config (for the state dir, host and the daemon's listen address).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

/// The secret values resolved by this command (set by `load`), scrubbed from
/// the error line `main` prints.
static SCRUBBER: std::sync::OnceLock<Arc<engine::Scrubber>> = std::sync::OnceLock::new();

/// This command's secret values and URL credentials out of `text`.
fn cli_scrub(text: &str) -> String {
    match SCRUBBER.get() {
        Some(s) => s.scrub(text),
        None => crate::redact::url_credentials_owned(text),
    }
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => run_plan(args),
        Command::Apply(args) => run_apply(args),
        Command::Validate(args) => run_validate(args),
        Command::Status(args) => run_status(args),
        Command::Run(args) => run_daemon(args),
        Command::Reconcile(args) => control::reconcile(&args),
        Command::Suspend(args) => control::suspend(&args),
        Command::Resume(args) => control::resume(&args),
        Command::Secrets(SecretsCommand::Check(args)) => run_secrets_check(args),
        Command::Kinds => {
            out!("{}", kinds_text());
            Ok(ExitCode::SUCCESS)
        }
        Command::InstallService(args) => run_install_service(args),
        Command::UninstallService(args) => run_uninstall_service(args),
        Command::Init(args) => crate::init::run(&args)
            .map(|text| {
                out!("{text}");
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Command::Completions(args) => crate::dist::completions(command(), args.shell)
            .map(|text| {
                out!("{text}");
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Command::DistFiles(args) => crate::dist::dist_files(command(), &args)
            .map(|paths| {
                for p in paths {
                    outln!("wrote {}", p.display());
                }
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // The one place errors leave the CLI: URL credentials and the
            // secret values this command resolved hidden.
            let text = cli_scrub(&format!("{e:#}"));
            eprintln!("error: {text}");
            ExitCode::from(1)
        }
    }
}

pub use crate::config::default_state_dir;

/// This machine's hostname up to the first dot.
pub fn short_hostname() -> Result<String> {
    Ok(config::short_hostname()?)
}

fn style() -> Style {
    Style {
        color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    }
}

/// Source, host name, catalog, and the live host to observe.
struct Loaded {
    /// Taken by the run.
    catalog: Option<desired::catalog::Catalog>,
    host: Host,
    state_dir: PathBuf,
    sandbox: Option<String>,
    /// The commit fetched for the followed ref (git sources).
    fetched: Option<String>,
    /// Time spent fetching and rendering.
    phases: Phases,
    loki: Option<config::LokiConfig>,
    /// How stacks reach their clusters.
    kube: crate::k8s::client::KubeSettings,
}

/// Flags over config over defaults.
struct Resolved {
    spec: SourceSpec,
    host: String,
    root: Option<PathBuf>,
    state_dir: PathBuf,
    policy: DriftPolicy,
    onepassword: Option<config::OnePasswordConfig>,
    loki: Option<config::LokiConfig>,
    kube: crate::k8s::client::KubeSettings,
}

fn resolve_target(target: &Target) -> Result<Resolved> {
    let config = target.config.as_deref().map(config::load).transpose()?;
    if let Some(c) = &config {
        // The same check as `agent run` and `agent validate --config`.
        config::check_credentials(c)?;
    }
    let c = config.as_ref();
    let host = match target
        .host
        .clone()
        .or_else(|| c.and_then(|c| c.host.clone()))
    {
        Some(h) => h,
        None => short_hostname()?,
    };
    let root = match target
        .root
        .clone()
        .or_else(|| c.and_then(|c| c.root.clone()))
    {
        Some(root) => {
            std::fs::create_dir_all(&root)
                .with_context(|| format!("cannot create sandbox root {}", root.display()))?;
            Some(
                root.canonicalize()
                    .with_context(|| format!("sandbox root {}", root.display()))?,
            )
        }
        None => None,
    };
    let state_dir = target
        .state_dir
        .clone()
        .or_else(|| c.and_then(|c| c.state_dir.clone()))
        .unwrap_or_else(|| default_state_dir(root.as_deref()));
    let spec = SourceSpec {
        repo: target
            .repo
            .clone()
            .or_else(|| c.map(|c| c.repo.clone()))
            .unwrap_or_else(|| ".".to_string()),
        reference: target
            .reference
            .clone()
            .or_else(|| c.map(|c| c.reference.clone()))
            .unwrap_or_else(|| "main".to_string()),
        rev: target.rev.clone(),
        token_file: c.and_then(|c| c.token_file.clone()),
        allowed_signers: c.and_then(|c| c.verify.as_ref().map(|v| v.allowed_signers.clone())),
        fetch: true,
        fetch_timeout: std::time::Duration::from_secs(60),
    };
    let kube = crate::k8s::client::KubeSettings {
        kubeconfig: c.and_then(|c| c.kubeconfig.clone()),
        sandbox: root.is_some(),
    };
    Ok(Resolved {
        spec,
        host,
        root,
        state_dir,
        policy: c.map_or(DriftPolicy::Heal, |c| c.on_drift),
        onepassword: c.and_then(|c| c.onepassword.clone()),
        loki: c.and_then(|c| c.loki.clone()),
        kube,
    })
}

fn load(target: &Target) -> Result<Loaded> {
    let r = resolve_target(target)?;
    let mut phases = Phases::default();
    let resolved = phases.time(Phase::Fetch, || engine::resolve(&r.spec, &r.state_dir))?;
    // Every value this command resolves is scrubbed from the error line (main).
    let secrets = engine::Scrubber::new(engine::secret_source(r.onepassword.as_ref()));
    let _ = SCRUBBER.set(secrets.clone());
    let catalog = phases.time(Phase::Render, || {
        engine::load(
            resolved.source,
            &r.host,
            r.policy,
            secrets,
            engine::managed_state_dir(r.root.as_deref(), &r.state_dir),
        )
    })?;
    let fs = Fs::new(r.root.as_deref().unwrap_or(Path::new("/")))?;
    let host = Host::new(fs, r.root.is_some(), catalog.host.platform);
    Ok(Loaded {
        catalog: Some(catalog),
        host,
        state_dir: r.state_dir,
        sandbox: r.root.map(|r| r.display().to_string()),
        fetched: resolved.fetched,
        phases,
        loki: r.loki,
        kube: r.kube,
    })
}

/// `--metrics-file`: the plan's (and apply's) snapshot metrics as a
/// node-exporter textfile, written atomically.
fn write_metrics_file(
    path: &Path,
    state_dir: &Path,
    plan: &crate::plan::Plan,
    report: Option<&crate::apply::ApplyReport>,
    phases: &Phases,
) -> Result<()> {
    let host = &plan.catalog.host.name;
    let metrics = crate::telemetry::metrics::Metrics::new(host);
    metrics.set_resources(crate::telemetry::metrics::resource_table(plan, report));
    let record = Store::open_read_only(state_dir)
        .and_then(|s| s.host(host))
        .unwrap_or_default();
    metrics.set_revisions(&record);
    metrics.set_suspended(homelab_agent_state::Suspension::read(state_dir).as_ref());
    metrics.set_last_phases(phases);
    crate::telemetry::metrics::write_textfile(path, &metrics.textfile())?;
    Ok(())
}

/// The context of a CLI run (no daemon hooks).
fn run_context<'a>(
    loaded: &'a Loaded,
    scrub: &'a dyn Fn(&str) -> String,
) -> crate::run::RunContext<'a> {
    crate::run::RunContext {
        host: &loaded.host,
        state_dir: &loaded.state_dir,
        kube: &loaded.kube,
        trigger: "cli",
        cancel: None,
        scrub,
        on_planned: None,
        on_host_applied: None,
        idle: None,
    }
}

/// With `--json`, a run that cannot start (invalid desired state, a source
/// or config that cannot be read) still prints a document CI can parse
/// (see `report::json::error_document`); the error goes to stderr and the
/// exit code as without `--json`.
fn load_or_json(target: &Target, json: bool, command: report::json::Command) -> Result<Loaded> {
    let e = match load(target) {
        Ok(loaded) => return Ok(loaded),
        Err(e) => e,
    };
    if json {
        let host = target.host.clone().or_else(|| {
            target
                .config
                .as_deref()
                .and_then(|p| config::load(p).ok())
                .and_then(|c| c.host)
        });
        let (stage, diags) = match e.downcast_ref::<engine::StageError>() {
            Some(engine::StageError::Validate(desired::DesiredError::Invalid { diags })) => {
                ("validate", Some(diags))
            }
            Some(s) => (s.stage(), None),
            None => match e.downcast_ref::<desired::DesiredError>() {
                Some(desired::DesiredError::Invalid { diags }) => ("validate", Some(diags)),
                Some(_) => ("validate", None),
                None if e.downcast_ref::<config::ConfigError>().is_some() => ("config", None),
                None => ("load", None),
            },
        };
        // Scrubbed as main scrubs the error line: no secret, no URL credential.
        let diags = diags.map(scrub_diagnostics);
        let doc = report::json::error_document(
            command,
            host.as_deref(),
            stage,
            &cli_scrub(&format!("{e:#}")),
            diags.as_ref(),
        );
        outln!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Err(e)
}

/// Diagnostics with this command's secret values and URL credentials removed.
fn scrub_diagnostics(diags: &crate::syntax::diag::Diagnostics) -> crate::syntax::diag::Diagnostics {
    let mut out = crate::syntax::diag::Diagnostics::default();
    for d in diags.iter() {
        let mut d = d.clone();
        d.file = cli_scrub(&d.file);
        d.message = cli_scrub(&d.message);
        d.resource = d.resource.as_deref().map(cli_scrub);
        d.hint = d.hint.as_deref().map(cli_scrub);
        out.push(d);
    }
    out
}

/// Runs `catalog` for `mode`, limited to `targets` (`--target`) when there
/// are any. A selector that cannot be run is an error before anything is
/// planned; with `--json` it prints an error document (stage `target`).
fn run_targets(
    catalog: desired::catalog::Catalog,
    mode: crate::run::Mode,
    targets: &[String],
    json: bool,
    command: report::json::Command,
    cx: &crate::run::RunContext<'_>,
) -> Result<crate::run::RunReport> {
    let host = catalog.host.name.clone();
    let run = crate::run::select::Selection::parse(targets)
        .map_err(crate::run::RunError::from)
        .and_then(|selection| {
            let targets = selection.map_or(crate::run::Targets::All, crate::run::Targets::Limited);
            crate::run::run(catalog, mode, targets, cx)
        });
    match run {
        Err(crate::run::RunError::Select(e)) if json => {
            let doc = report::json::error_document(
                command,
                Some(&host),
                "target",
                &cli_scrub(&e.to_string()),
                None,
            );
            let doc = report::json::error_with_targets(doc, targets);
            outln!("{}", serde_json::to_string_pretty(&doc)?);
            Err(e.into())
        }
        other => Ok(other?),
    }
}

fn run_plan(args: PlanArgs) -> Result<ExitCode> {
    let mut loaded = load_or_json(&args.target, args.json, report::json::Command::Plan)?;
    let catalog = loaded.catalog.take().expect("loaded");
    // Once, not once per owner, package and service.
    loaded.host.check_platform(&catalog.host.name)?;
    if let Some(s) = homelab_agent_state::Suspension::read(&loaded.state_dir) {
        // On stderr: the plan itself (and its JSON) is unchanged.
        eprintln!(
            "note: applying is suspended on host {} ({}): the daemon plans and reports drift, and applies nothing until `agent resume`",
            catalog.host.name,
            crate::daemon::run::suspension_text(&s)
        );
    }
    let run = run_targets(
        catalog,
        crate::run::Mode::Plan,
        &args.targets,
        args.json,
        report::json::Command::Plan,
        &run_context(&loaded, &cli_scrub),
    )?;
    loaded.phases.add_all(&run.phases);
    let catalog = &run.plan.catalog;
    if args.json {
        let doc = report::json::plan_document(
            &run.plan,
            loaded.sandbox.as_deref(),
            crate::k8s::report::plan_json(catalog, &run.stacks),
            &run.orphans,
        )
        .limited_to(run.limit.as_ref());
        outln!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        if let Some(limit) = &run.limit {
            out!("{}", report::limit_text(limit));
        }
        out!(
            "{}",
            report::plan_text(&run.plan, loaded.sandbox.as_deref(), style())
        );
        out!(
            "{}",
            crate::k8s::report::plan_text(catalog, &run.stacks, style())
        );
        out!("{}", crate::k8s::report::orphans_text(&run.orphans));
    }
    if let Some(path) = &args.metrics_file {
        write_metrics_file(path, &loaded.state_dir, &run.plan, None, &loaded.phases)?;
    }
    Ok(if run.plan_failed() {
        ExitCode::from(1)
    } else if args.detailed_exitcode && run.plan_has_changes() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn run_apply(args: ApplyArgs) -> Result<ExitCode> {
    let mut loaded = load_or_json(&args.target, args.json, report::json::Command::Apply)?;
    let catalog = loaded.catalog.take().expect("loaded");
    loaded.host.check_platform(&catalog.host.name)?;
    let hostname = catalog.host.name.clone();
    // `agent suspend`: nothing applies here either (as Puppet's
    // `agent --disable`), until `agent resume`.
    if let Some(s) = homelab_agent_state::Suspension::read(&loaded.state_dir) {
        let message = format!(
            "applying is suspended on host {hostname} ({}); nothing was changed\n  `agent resume` applies again; `agent plan` shows what would change",
            crate::daemon::run::suspension_text(&s)
        );
        if args.json {
            let doc = report::json::error_document(
                report::json::Command::Apply,
                Some(&hostname),
                "suspended",
                &message,
                None,
            );
            outln!("{}", serde_json::to_string_pretty(&doc)?);
        }
        anyhow::bail!(message);
    }
    // Loki events (with `loki:` in the config); a bad password file stops
    // the run before anything is applied.
    let telemetry = match &loaded.loki {
        Some(l) => Some(crate::telemetry::Telemetry::new(&hostname, Some(l))?),
        None => None,
    };
    let _lock = Lock::acquire(&loaded.state_dir, &format!("agent apply --host {hostname}"))?;
    let run = run_targets(
        catalog,
        crate::run::Mode::Apply,
        &args.targets,
        args.json,
        report::json::Command::Apply,
        &run_context(&loaded, &cli_scrub),
    )?;
    loaded.phases.add_all(&run.phases);
    let applied = match run.apply {
        crate::run::ApplyStage::Done(applied) => applied,
        crate::run::ApplyStage::Refused(e) => {
            if args.json {
                let doc = report::json::error_document(
                    report::json::Command::Apply,
                    Some(&hostname),
                    "observe",
                    &cli_scrub(&e.to_string()),
                    None,
                );
                let doc = report::json::error_with_targets(doc, &args.targets);
                outln!("{}", serde_json::to_string_pretty(&doc)?);
                return Err(e.into());
            }
            if let Some(limit) = &run.limit {
                out!("{}", report::limit_text(limit));
            }
            out!(
                "{}",
                report::plan_text(&run.plan, loaded.sandbox.as_deref(), style())
            );
            // Refused before the state is opened for writing: nothing changes.
            return Err(e.into());
        }
        crate::run::ApplyStage::NotAsked => unreachable!("an apply run applies"),
    };
    // A limited run does not pin its revision for the daemon either: the
    // host was not converged to it.
    if args.target.rev.is_some() && !applied.host.failed() && run.limit.is_none() {
        // A revision picked by hand: the daemon keeps it until a newer fetch.
        let store = Store::open(&loaded.state_dir)?;
        crate::run::record::manual_override(&store, &hostname, loaded.fetched.clone())?;
    }
    if args.json {
        let doc = report::json::apply_document(
            &run.plan,
            &applied.host,
            loaded.sandbox.as_deref(),
            crate::k8s::report::apply_json(&run.plan.catalog, &run.stacks, &applied.stacks),
            &run.orphans,
        )
        .limited_to(run.limit.as_ref());
        outln!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        if let Some(limit) = &run.limit {
            out!("{}", report::limit_text(limit));
        }
        out!("{}", report::apply_text(&applied.host, style()));
        out!(
            "{}",
            crate::k8s::report::apply_text(&applied.stacks, style())
        );
        if let Some(limit) = &run.limit {
            out!("{}", report::limit_warning(limit));
        }
    }
    if let Some(t) = &telemetry {
        t.observe_apply(&run.plan, &applied.host, "cli");
        t.flush(std::time::Duration::from_secs(5));
    }
    if let Some(path) = &args.metrics_file {
        write_metrics_file(
            path,
            &loaded.state_dir,
            &run.plan,
            Some(&applied.host),
            &loaded.phases,
        )?;
    }
    Ok(if applied.failed() {
        ExitCode::from(1)
    } else if args.detailed_exitcode && applied.changed_anything() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn run_validate(args: ValidateArgs) -> Result<ExitCode> {
    let (repo, hosts) = match &args.config {
        Some(path) => {
            let c = config::load(path)?;
            // Everything `agent run` refuses at start, refused here too
            // (`daemon::run::settings`: the credential files, the host name).
            let creds = config::check_credentials(&c)?;
            let host = match args.host.clone().or_else(|| c.host.clone()) {
                Some(h) => h,
                None => short_hostname()?,
            };
            outln!(
                "ok: agent config {} (repo {}, ref {}, host {host})",
                path.display(),
                crate::redact::url_credentials(&c.repo),
                c.reference
            );
            if let Some(v) = &c.verify {
                outln!("ok: allowed signers {}", v.allowed_signers.display());
            }
            if creds.webhook_secret.is_some() {
                outln!(
                    "ok: webhook secret file (private, at least {} bytes)",
                    config::MIN_SHARED_SECRET_BYTES
                );
            }
            if creds.api_token.is_some() {
                outln!(
                    "ok: API token file (private, at least {} bytes)",
                    config::MIN_SHARED_SECRET_BYTES
                );
            }
            // Then the desired state it points at, as the help says.
            match crate::source::git::parse_location(&c.repo) {
                crate::source::git::RepoLocation::Local(dir) => (dir, vec![host]),
                crate::source::git::RepoLocation::Remote(url) => {
                    outln!(
                        "not checked: the desired state of host {host} is in {}, which the daemon fetches; validate a checkout of it with `agent validate --repo DIR --host {host}`",
                        crate::redact::url_credentials(&url.to_string())
                    );
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        None => (args.repo.clone(), args.host.clone().into_iter().collect()),
    };
    let source: Arc<dyn Source> = Arc::new(LocalDir::open(&repo)?);
    engine::check_repository(&*source)?;
    let hosts = match hosts {
        hosts if !hosts.is_empty() => hosts,
        _ => desired::host_names(&*source)?,
    };
    if hosts.is_empty() {
        anyhow::bail!("no hosts in {}: add hosts/<name>.yaml", source.describe());
    }
    let mut failed = false;
    for host in hosts {
        // A fresh source per host: each has its own read budget, as when
        // that host's agent reads the repository.
        let source: Arc<dyn Source> = Arc::new(LocalDir::open(&repo)?);
        match desired::load(source, &host) {
            Ok(catalog) if catalog.stacks.is_empty() => {
                outln!("ok: host {host}: {} resources", catalog.entries.len())
            }
            Ok(catalog) => outln!(
                "ok: host {host}: {} resources, {} stack(s) with {} object(s)",
                catalog.entries.len(),
                catalog.stacks.len(),
                catalog
                    .stacks
                    .iter()
                    .map(|s| s.objects.len())
                    .sum::<usize>()
            ),
            Err(e) => {
                failed = true;
                eprintln!("error: host {host}: {e}");
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn run_secrets_check(args: CheckArgs) -> Result<ExitCode> {
    let loaded = load(&args.target)?;
    let catalog = loaded.catalog.as_ref().expect("loaded");
    outln!("{}", secrets_check_text(catalog).trim_end());
    let failed = catalog
        .entries
        .iter()
        .any(|e| e.blocked.is_some() && e.blocked_after.is_none())
        || catalog
            .stacks
            .iter()
            .flat_map(|s| &s.objects)
            .any(|o| o.blocked.is_some());
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `agent secrets check`: every host resource and stack object that holds
/// secrets, by whether its references resolved. A resource blocked only
/// because one before it is blocked is not a secret failure: it is listed
/// apart, as waiting.
fn secrets_check_text(catalog: &desired::catalog::Catalog) -> String {
    use std::fmt::Write;
    let mut ok = 0;
    let mut failed = Vec::new();
    let mut waiting = Vec::new();
    for e in &catalog.entries {
        match (&e.blocked, e.blocked_after) {
            (Some(_), Some(_)) => waiting.push(e.id.as_str()),
            (Some(why), None) => failed.push(format!(
                "{}  (module {}, {}:{}): {why}",
                e.id, e.module, e.file, e.line
            )),
            (None, _) if e.resource.holds_secrets() => ok += 1,
            (None, _) => {}
        }
    }
    for o in catalog.stacks.iter().flat_map(|s| &s.objects) {
        match &o.blocked {
            Some(why) => failed.push(format!(
                "{}  (stack {}, {}:{}): {why}",
                o.id, o.stack, o.file, o.line
            )),
            None if o.holds_secrets => ok += 1,
            None => {}
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Secrets for host {}: {ok} resource(s) resolved all their references, {} could not.",
        catalog.host.name,
        failed.len()
    );
    for f in &failed {
        let _ = writeln!(out, "  failed: {f}");
    }
    if !waiting.is_empty() {
        let _ = writeln!(
            out,
            "  {} resource(s) after those are skipped until they resolve (not secret failures): {}",
            waiting.len(),
            waiting.join(", ")
        );
    }
    out
}

fn absolute(path: PathBuf) -> Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path);
    }
    Ok(std::env::current_dir()
        .context("cannot read the current directory")?
        .join(path))
}

fn run_install_service(args: InstallArgs) -> Result<ExitCode> {
    let config = absolute(args.config.unwrap_or_else(config::default_path))?;
    let binary = match args.binary {
        Some(b) => absolute(b)?,
        None => std::env::current_exe()
            .and_then(|p| p.canonicalize())
            .context("cannot find this binary's path; pass --binary")?,
    };
    if let (Some(repo), Some(host), false) = (&args.repo, &args.host, args.dry_run) {
        let done = crate::install::bootstrap_config(
            repo,
            &args.reference,
            args.token_file.clone(),
            host,
            &config,
            args.root.as_deref(),
        )?;
        let from = crate::install::repo_config_path(host);
        match done {
            crate::install::ConfigCopy::Written => {
                outln!("config: {} (from {from})", config.display())
            }
            crate::install::ConfigCopy::UpToDate => {
                outln!("up to date: {} (from {from})", config.display())
            }
        }
    }
    if !args.dry_run {
        // The service would only crash-loop on a config that does not load
        // or names unusable files: the same check as `agent run` at start.
        config::check_credentials(&config::load(&config)?)?;
    }
    let done = crate::install::install(&binary, &config, args.root.as_deref(), args.dry_run)?;
    for (path, content) in &done.files {
        let shown = match &args.root {
            Some(r) => r.join(path.strip_prefix("/").unwrap_or(path)),
            None => path.clone(),
        };
        if args.dry_run {
            outln!("# {} (would be written)\n{content}", shown.display());
        } else if done.changed.is_empty() {
            outln!("up to date: {}", shown.display());
        } else {
            outln!(
                "installed: {} ({})",
                shown.display(),
                done.changed.join(", ")
            );
        }
    }
    if !args.dry_run && args.root.is_none() {
        let name = crate::install::service_name(crate::install::this_platform());
        outln!("running: {name} (agent run --config {})", config.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn run_uninstall_service(args: UninstallArgs) -> Result<ExitCode> {
    let name = crate::install::service_name(crate::install::this_platform());
    match crate::install::uninstall(args.root.as_deref())? {
        crate::resources::PruneOutcome::AlreadyGone => outln!("not installed: {name}"),
        _ => outln!("removed: {name} (stopped, disabled, unit file deleted)"),
    }
    Ok(ExitCode::SUCCESS)
}

fn run_daemon(args: RunArgs) -> Result<ExitCode> {
    let path = args.config.unwrap_or_else(config::default_path);
    let config = config::load(&path)?;
    init_logging(config.log_format, args.log_file.as_deref())?;
    crate::daemon::run::run(config)?;
    Ok(ExitCode::SUCCESS)
}

/// Logs to stderr (or `log_file`, followed across rotations) as text or
/// JSON lines; `RUST_LOG` filters (default info).
fn init_logging(format: config::LogFormat, log_file: Option<&Path>) -> Result<()> {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Every line through the redacting writer: no URL credential in a log.
    let (writer, ansi) = match log_file {
        Some(path) => {
            let file = crate::telemetry::logfile::LogFile::open(path, true)
                .with_context(|| format!("cannot open the log file {}", path.display()))?;
            (
                BoxMakeWriter::new(move || crate::redact::RedactingWriter(file.clone())),
                false,
            )
        }
        None => (
            BoxMakeWriter::new(|| crate::redact::RedactingWriter(std::io::stderr())),
            std::io::stderr().is_terminal(),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    let _ = match format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
    Ok(())
}

/// Asks a running daemon for its status (`GET /api/status` on loopback),
/// with the API token when the config names one (and it can be read).
fn daemon_status(
    addr: std::net::SocketAddr,
    token_file: Option<&Path>,
) -> Option<crate::daemon::status::StatusSnapshot> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(300)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    let auth = token_file
        .and_then(|p| config::read_private_file(p, "API token file").ok())
        .and_then(|t| String::from_utf8(t).ok())
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET /api/status HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let body = response.split_once("\r\n\r\n")?.1;
    serde_json::from_str(body).ok()
}

/// The kind reference, generated from the registry.
fn kinds_text() -> String {
    let mut out =
        String::from("Resource kinds (a resource is `- KIND: IDENTITY` plus fields):\n\n");
    for kind in crate::resources::REGISTRY {
        out.push_str(&format!("  {:<10} {}\n", kind.name(), kind.doc()));
        if !kind.fields().is_empty() {
            out.push_str(&format!(
                "  {:<10} fields: {}\n",
                "",
                kind.fields().join(", ")
            ));
        }
    }
    out.push_str("\nEvery resource may also have: after (ids to come after), notify (ids to tell on change),\non_drift (heal | report), when (a Jinja expression; false leaves the resource out).\n");
    out.push_str("\nPaths are absolute, normalised, inside the host's roots, free of control characters, and\nclaimed by one resource each; nothing goes under a file, symlink or absent resource, and\nnothing touches the agent's state directory. A root of / needs `whole_filesystem: true`\nin the host file.\n");
    out
}

/// The host and state directory flags and a config point at, as the
/// daemon resolves them (`daemon::run::settings`): flags over the config
/// over this machine's hostname and the default state directory (under the
/// sandbox root, made absolute, if there is one).
fn host_state(
    c: Option<&config::AgentConfig>,
    host: Option<String>,
    root: Option<PathBuf>,
    state_dir: Option<PathBuf>,
) -> Result<(String, PathBuf)> {
    let host = match host.or_else(|| c.and_then(|c| c.host.clone())) {
        Some(h) => h,
        None => short_hostname()?,
    };
    let root = root
        .or_else(|| c.and_then(|c| c.root.clone()))
        .map(|r| r.canonicalize().unwrap_or(r));
    let state_dir = state_dir
        .or_else(|| c.and_then(|c| c.state_dir.clone()))
        .unwrap_or_else(|| default_state_dir(root.as_deref()));
    Ok((host, state_dir))
}

fn run_status(args: StatusArgs) -> Result<ExitCode> {
    let config = args.config.as_deref().map(config::load).transpose()?;
    let c = config.as_ref();
    let (host, state_dir) = host_state(c, args.host, args.root, args.state_dir)?;
    let listen = c.map_or_else(
        || config::DEFAULT_LISTEN.parse().expect("valid"),
        |c| c.listen,
    );
    let daemon = daemon_status(listen, c.and_then(|c| c.api_token_file.as_deref()));
    let store = Store::open_read_only(&state_dir)?;
    let record = store.host(&host)?;
    let inventory = store.inventory(&host)?;
    let runs = store.runs(&host, args.runs)?;
    let last_run = store.runs(&host, 1)?.pop();
    let suspended = homelab_agent_state::Suspension::read(&state_dir);
    if args.json {
        let value = serde_json::json!({
            "host": host,
            "state_dir": state_dir,
            "suspended": suspended,
            "daemon": daemon,
            "applied": record,
            "inventory": inventory,
            "runs": runs,
        });
        outln!(
            "{}",
            crate::redact::url_credentials(&serde_json::to_string_pretty(&value)?)
        );
        return Ok(ExitCode::SUCCESS);
    }
    outln!("Host {host} (state in {})", state_dir.display());
    match &daemon {
        Some(d) => outln!(
            "Daemon: running on {listen}{}",
            if d.running {
                ", a run is in progress"
            } else {
                ""
            }
        ),
        None => outln!("Daemon: not reachable on {listen}"),
    }
    if let Some(s) = &suspended {
        outln!(
            "Suspended: applying is paused {} (drift is still detected and reported; `agent resume` applies again)",
            crate::daemon::run::suspension_text(s)
        );
    }
    if let Some(f) = &record.fetched_revision {
        outln!("Fetched revision: {f}");
    }
    if let Some(g) = &record.last_good_revision {
        outln!("Last good revision: {g}");
    }
    if record.manual_override.is_some() {
        outln!(
            "Manual override: the applied revision was picked with --rev; kept until the next push"
        );
    }
    if let Some(r) = &record.refused {
        outln!(
            "Refused revision{} at {} ({}):\n  {}",
            r.revision
                .as_deref()
                .map(|v| format!(" {v}"))
                .unwrap_or_default(),
            r.stage,
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(r.at)
            ),
            crate::redact::url_credentials(&r.error).replace('\n', "\n  ")
        );
    }
    match (&record.applied_revision, record.applied_at) {
        (Some(rev), Some(at)) => outln!(
            "Applied revision: {rev} at {}",
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(at)
            )
        ),
        _ => outln!("Applied revision: none yet"),
    }
    if let Some(last) = &last_run {
        if last.counts.skipped > 0 {
            outln!(
                "Skipped in the last run: {} resource(s) (a secret that did not resolve, or a held change; `agent plan` shows which, `agent secrets check` why)",
                last.counts.skipped
            );
        }
    }
    let mut by_module: std::collections::BTreeMap<(&str, &str), usize> = Default::default();
    for e in inventory.values() {
        *by_module
            .entry((e.module.as_str(), e.kind.as_str()))
            .or_default() += 1;
    }
    outln!("Inventory: {} resource(s)", inventory.len());
    for ((module, kind), n) in by_module {
        outln!("  {module:<16} {kind:<10} {n}");
    }
    let pending = inventory.values().filter(|e| e.digest.is_none()).count();
    if pending > 0 {
        outln!("  {pending} resource(s) with an unconfirmed apply (the next apply finishes them)");
    }
    outln!("Recent runs (newest first):");
    if runs.is_empty() {
        outln!("  none");
    }
    for r in runs {
        let c = &r.counts;
        outln!(
            "  {}  {:<7} {:<8} {}  +{} ~{} -{} !{} skipped {} failed {}{}{}",
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.started_ms)
            ),
            r.trigger,
            r.result.name(),
            r.revision,
            c.created,
            c.changed,
            c.pruned,
            c.drift_healed + c.drift_reported,
            c.skipped,
            c.failed,
            if r.targets.is_empty() {
                String::new()
            } else {
                format!("  limited to --target {}", r.targets.join(", --target "))
            },
            r.error
                .map(|e| format!("  ({})", crate::redact::url_credentials(&e)))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}
