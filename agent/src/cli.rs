//! The `agent` command line: parses arguments, runs the stages in order and
//! maps outcomes to exit codes. The only place that uses `anyhow`.
//!
//! Exit codes: 0 success (nothing to do), 1 error, 2 changes or drift present
//! (with `--detailed-exitcode`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use homelab_agent_state::{Lock, Store};

use crate::desired::{self, DesiredError};
use crate::fsops::Fs;
use crate::report::{self, Style};
use crate::resources::Host;
use crate::source::{LocalDir, Source};

/// Plans and converges this host from a repository of desired state.
///
/// The repository holds hosts/<name>.yaml (what each host runs), modules/
/// (reusable bundles of resources with templates) and k8s/ (Kubernetes
/// stacks). `agent plan` shows what would change and changes nothing;
/// `agent apply` converges. Try it safely with `--root /tmp/lab`, which puts
/// every managed path under a sandbox directory.
#[derive(Debug, Parser)]
#[command(name = "agent", version, about, long_about, max_term_width = 100)]
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
    /// List the resource kinds a module can declare, with their fields.
    Kinds,
}

#[derive(Debug, Args)]
struct Target {
    /// Desired-state repository: a local directory.
    #[arg(long, value_name = "PATH", default_value = ".")]
    repo: PathBuf,
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
    /// Print the plan as JSON (one object per resource).
    #[arg(long)]
    json: bool,
    /// Exit 0 when there is nothing to do, 2 when there are changes or drift, 1 on errors.
    #[arg(long)]
    detailed_exitcode: bool,
}

#[derive(Debug, Args)]
struct ApplyArgs {
    #[command(flatten)]
    target: Target,
    /// Print what was done as JSON.
    #[arg(long)]
    json: bool,
    /// Exit 0 when nothing changed, 2 when something was changed, 1 on errors.
    #[arg(long)]
    detailed_exitcode: bool,
}

#[derive(Debug, Args)]
struct ValidateArgs {
    /// Desired-state repository: a local directory.
    #[arg(long, value_name = "PATH", default_value = ".")]
    repo: PathBuf,
    /// Validate only this host. Default: every host in hosts/.
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
    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the CLI and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => run_plan(args),
        Command::Apply(args) => run_apply(args),
        Command::Validate(args) => run_validate(args),
        Command::Status(args) => run_status(args),
        Command::Kinds => {
            print!("{}", kinds_text());
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn short_hostname() -> Result<String> {
    let name =
        nix::unistd::gethostname().context("cannot read this machine's hostname; pass --host")?;
    let name = name.to_string_lossy();
    Ok(name.split('.').next().unwrap_or(&name).to_string())
}

fn default_state_dir(root: Option<&Path>) -> PathBuf {
    match root {
        Some(root) => root.join("var/lib/homelab-agent"),
        None if cfg!(target_os = "macos") => PathBuf::from("/usr/local/var/homelab-agent"),
        None => PathBuf::from("/var/lib/homelab-agent"),
    }
}

fn style() -> Style {
    Style {
        color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    }
}

/// Source, host name, catalog, and the live host to observe.
struct Loaded {
    catalog: desired::catalog::Catalog,
    host: Host,
    state_dir: PathBuf,
    sandbox: Option<String>,
}

fn load(target: &Target) -> Result<Loaded> {
    let source: Arc<dyn Source> = Arc::new(LocalDir::open(&target.repo)?);
    let host_name = match &target.host {
        Some(h) => h.clone(),
        None => short_hostname()?,
    };
    let catalog = desired::load(source, &host_name).map_err(desired_error)?;
    let root = match &target.root {
        Some(root) => {
            std::fs::create_dir_all(root)
                .with_context(|| format!("cannot create sandbox root {}", root.display()))?;
            Some(
                root.canonicalize()
                    .with_context(|| format!("sandbox root {}", root.display()))?,
            )
        }
        None => None,
    };
    let fs = Fs::new(root.as_deref().unwrap_or(Path::new("/")))?;
    let host = Host::new(fs, root.is_some(), catalog.host.platform);
    let state_dir = target
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(root.as_deref()));
    Ok(Loaded {
        catalog,
        host,
        state_dir,
        sandbox: root.map(|r| r.display().to_string()),
    })
}

fn desired_error(e: DesiredError) -> anyhow::Error {
    anyhow::Error::new(e)
}

/// The inventory for a plan. Plans never write, with one exception: a
/// database left needing recovery by a killed agent is recovered (under the
/// lock, so never under a running apply); that changes no record in it.
fn read_inventory(
    state_dir: &Path,
    host: &str,
) -> Result<std::collections::BTreeMap<String, homelab_agent_state::InventoryEntry>> {
    match Store::open_read_only(state_dir) {
        Err(homelab_agent_state::StateError::NeedsRecovery { .. }) => {
            let _lock = Lock::acquire(
                state_dir,
                &format!("agent plan --host {host} (recovering state)"),
            )?;
            Ok(Store::open_read_only_recovering(state_dir)?.inventory(host)?)
        }
        other => Ok(other?.inventory(host)?),
    }
}

fn run_plan(args: PlanArgs) -> Result<ExitCode> {
    let loaded = load(&args.target)?;
    let inventory = read_inventory(&loaded.state_dir, &loaded.catalog.host.name)?;
    let plan = crate::plan::plan(loaded.catalog, &loaded.host, &inventory);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report::plan_json(&plan))?
        );
    } else {
        print!(
            "{}",
            report::plan_text(&plan, loaded.sandbox.as_deref(), style())
        );
    }
    Ok(if !plan.failures.is_empty() {
        ExitCode::from(1)
    } else if args.detailed_exitcode && plan.has_changes() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn run_apply(args: ApplyArgs) -> Result<ExitCode> {
    let loaded = load(&args.target)?;
    let hostname = loaded.catalog.host.name.clone();
    let _lock = Lock::acquire(&loaded.state_dir, &format!("agent apply --host {hostname}"))?;
    // Plan from a read-only view, so a plan that cannot be applied leaves
    // the state directory untouched.
    let inventory = Store::open_read_only_recovering(&loaded.state_dir)?.inventory(&hostname)?;
    let plan = crate::plan::plan(loaded.catalog, &loaded.host, &inventory);
    if !plan.failures.is_empty() {
        print!(
            "{}",
            report::plan_text(&plan, loaded.sandbox.as_deref(), style())
        );
        // Refused before the state is opened for writing: nothing changes.
        return Err(crate::apply::refuse(&plan).into());
    }
    let store = Store::open(&loaded.state_dir)?;
    let report = crate::apply::apply(&plan, &loaded.host, &store, "cli")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::apply_text(&report, style()));
    }
    Ok(if report.failed() {
        ExitCode::from(1)
    } else if args.detailed_exitcode && report.changed_anything() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn run_validate(args: ValidateArgs) -> Result<ExitCode> {
    let source: Arc<dyn Source> = Arc::new(LocalDir::open(&args.repo)?);
    let hosts = match args.host {
        Some(h) => vec![h],
        None => desired::host_names(&*source)?,
    };
    if hosts.is_empty() {
        anyhow::bail!("no hosts in {}: add hosts/<name>.yaml", source.describe());
    }
    let mut failed = false;
    for host in hosts {
        match desired::load(source.clone(), &host) {
            Ok(catalog) => println!("ok: host {host}: {} resources", catalog.entries.len()),
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
    out
}

fn run_status(args: StatusArgs) -> Result<ExitCode> {
    let host = match args.host {
        Some(h) => h,
        None => short_hostname()?,
    };
    let state_dir = args
        .state_dir
        .unwrap_or_else(|| default_state_dir(args.root.as_deref()));
    let store = Store::open_read_only(&state_dir)?;
    let record = store.host(&host)?;
    let inventory = store.inventory(&host)?;
    let runs = store.runs(&host, args.runs)?;
    if args.json {
        let value = serde_json::json!({
            "host": host,
            "state_dir": state_dir,
            "applied": record,
            "inventory": inventory,
            "runs": runs,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("Host {host} (state in {})", state_dir.display());
    match (&record.applied_revision, record.applied_at) {
        (Some(rev), Some(at)) => println!(
            "Applied revision: {rev} at {}",
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(at)
            )
        ),
        _ => println!("Applied revision: none yet"),
    }
    let mut by_module: std::collections::BTreeMap<(&str, &str), usize> = Default::default();
    for e in inventory.values() {
        *by_module
            .entry((e.module.as_str(), e.kind.as_str()))
            .or_default() += 1;
    }
    println!("Inventory: {} resource(s)", inventory.len());
    for ((module, kind), n) in by_module {
        println!("  {module:<16} {kind:<10} {n}");
    }
    let pending = inventory.values().filter(|e| e.digest.is_none()).count();
    if pending > 0 {
        println!(
            "  {pending} resource(s) with an unconfirmed apply (the next apply finishes them)"
        );
    }
    println!("Recent runs (newest first):");
    if runs.is_empty() {
        println!("  none");
    }
    for r in runs {
        let c = &r.counts;
        println!(
            "  {}  {:<7} {:<8} {}  +{} ~{} -{} !{} failed {}{}",
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.started_ms)
            ),
            r.trigger,
            format!("{:?}", r.result).to_lowercase(),
            r.revision,
            c.created,
            c.changed,
            c.pruned,
            c.drift_healed + c.drift_reported,
            c.failed,
            r.error.map(|e| format!("  ({e})")).unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}
