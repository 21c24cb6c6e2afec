//! `agent reconcile`, `agent suspend`, `agent resume`: the local controls
//! of a running daemon, over its control socket (`daemon::control`).
//! Suspending and resuming also work with no daemon running: the
//! suspension is a record in the state directory, which the daemon reads
//! at every run and at start.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use homelab_agent_state::Suspension;

use super::{write_stdout, ControlArgs, ReconcileArgs, SuspendArgs};
use crate::config;
use crate::daemon::control::{self, ControlError, Op, Response, RunSummary};
use crate::daemon::run::suspension_text;

/// The state directory and host of the daemon `args` point at.
struct Daemon {
    state_dir: PathBuf,
    host: String,
}

fn locate(args: &ControlArgs) -> Result<Daemon> {
    // Without flags, the config the service runs with, when there is one.
    let path = args.config.clone().or_else(|| {
        let p = config::default_path();
        (args.state_dir.is_none() && args.root.is_none() && p.exists()).then_some(p)
    });
    let c = path.as_deref().map(config::load).transpose()?;
    let (host, state_dir) =
        super::host_state(c.as_ref(), None, args.root.clone(), args.state_dir.clone())?;
    Ok(Daemon { state_dir, host })
}

/// The name of the user running this command, for the suspension record.
fn who() -> String {
    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name);
    // `sudo agent suspend`: the person behind sudo.
    match (std::env::var("SUDO_USER").ok(), name) {
        (Some(sudo), Some(name)) if uid.is_root() => format!("{sudo} (as {name})"),
        (_, Some(name)) => name,
        (_, None) => format!("uid {uid}"),
    }
}

pub(super) fn reconcile(args: &ReconcileArgs) -> Result<ExitCode> {
    let daemon = locate(&args.control)?;
    let path = control::socket_path(&daemon.state_dir);
    let answer = control::request(
        &path,
        Op::Reconcile {
            wait: !args.no_wait,
        },
        args.timeout,
    )?;
    match answer {
        Response::Queued => {
            if args.json {
                print_json(&reconcile_json(&daemon.host, None))?;
            } else {
                outln!(
                    "Run queued on host {} (`agent status` shows its result).",
                    daemon.host
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::Finished { run } => {
            if args.json {
                print_json(&reconcile_json(&daemon.host, Some(&run)))?;
            } else {
                // Scrubbed by the daemon; URL credentials masked again here.
                outln!(
                    "{}",
                    crate::redact::url_credentials(run_text(&daemon.host, &run).trim_end())
                );
            }
            Ok(if run.succeeded() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Response::Refused { message, .. } => anyhow::bail!("the daemon refused: {message}"),
        other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// `agent reconcile --json` (docs/json-output.md): `run` is `null` with `--no-wait`.
fn reconcile_json(host: &str, run: Option<&RunSummary>) -> serde_json::Value {
    serde_json::json!({
        "format_version": crate::report::json::FORMAT_VERSION,
        "command": "reconcile",
        "host": host,
        "queued": true,
        "run": run,
    })
}

/// What `agent reconcile` prints for a finished run.
fn run_text(host: &str, run: &RunSummary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let took = humantime::format_duration(std::time::Duration::from_millis(run.duration_ms));
    let revision = run.revision.as_deref().unwrap_or("none");
    let _ = writeln!(
        out,
        "Run on host {host} ({}): {}, revision {revision}, took {took}",
        run.trigger,
        run.result.name()
    );
    let c = &run.counts;
    if run.result == crate::telemetry::RunOutcome::Suspended {
        let p = &run.planned;
        let _ = writeln!(
            out,
            "  applying is suspended: planned only ({} to create, {} to change, {} drifted, {} to prune)",
            p.create, p.change, p.drift, p.prune
        );
    } else {
        let _ = writeln!(
            out,
            "  created {}, changed {}, healed {}, pruned {}, drift reported {}, skipped {}, failed {}",
            c.created, c.changed, c.drift_healed, c.pruned, c.drift_reported, c.skipped, c.failed
        );
    }
    if let Some(r) = &run.refused {
        let _ = writeln!(
            out,
            "  the newest revision{} was refused at {}: {}\n  the run used the last good revision instead; fix the commit and push again",
            r.revision
                .as_deref()
                .map(|v| format!(" {v}"))
                .unwrap_or_default(),
            r.stage,
            r.error.replace('\n', "\n  ")
        );
    }
    if let Some(e) = &run.error {
        let _ = writeln!(out, "  error: {}", e.replace('\n', "\n  "));
    }
    if c.skipped > 0 && run.result != crate::telemetry::RunOutcome::Suspended {
        let _ = writeln!(
            out,
            "  skipped resources are not failures: `agent plan` shows which, `agent secrets check` why"
        );
    }
    out
}

fn print_json(value: &serde_json::Value) -> Result<()> {
    outln!(
        "{}",
        crate::redact::url_credentials(&serde_json::to_string_pretty(value)?)
    );
    Ok(())
}

pub(super) fn suspend(args: &SuspendArgs) -> Result<ExitCode> {
    let daemon = locate(&args.control)?;
    let path = control::socket_path(&daemon.state_dir);
    // Cleaned here too: with no daemon the CLI writes the record itself.
    let by = control::clean(&who(), 64);
    let reason = control::clean(&args.reason, control::REASON_LIMIT);
    match control::request(
        &path,
        Op::Suspend {
            by: by.clone(),
            reason: reason.clone(),
        },
        control::REQUEST_TIMEOUT,
    ) {
        Ok(Response::Suspended {
            suspension,
            already,
        }) => {
            if already {
                outln!(
                    "Host {} was already suspended ({}); nothing changed.",
                    suspension.host,
                    suspension_text(&suspension)
                );
            } else {
                outln!("Host {}: applying suspended ({}). The daemon still plans and reports drift; `agent resume` applies again.", suspension.host, suspension_text(&suspension));
            }
            Ok(ExitCode::SUCCESS)
        }
        Ok(Response::Refused { message, .. }) => anyhow::bail!("the daemon refused: {message}"),
        Ok(other) => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
        Err(ControlError::NotRunning { .. }) => {
            if let Some(s) = Suspension::read(&daemon.state_dir) {
                outln!(
                    "Host {} was already suspended ({}); nothing changed.",
                    daemon.host,
                    suspension_text(&s)
                );
                return Ok(ExitCode::SUCCESS);
            }
            let s = Suspension {
                host: daemon.host.clone(),
                since: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                by,
                reason,
            };
            s.write(&daemon.state_dir)?;
            outln!(
                "Host {}: applying suspended ({}). No daemon is running: recorded in {}; the daemon keeps it when it starts, and `agent apply` refuses until `agent resume`.",
                daemon.host,
                suspension_text(&s),
                daemon.state_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) fn resume(args: &ControlArgs) -> Result<ExitCode> {
    let daemon = locate(args)?;
    let path = control::socket_path(&daemon.state_dir);
    let was = match control::request(&path, Op::Resume, control::REQUEST_TIMEOUT) {
        Ok(Response::Resumed { was }) => was,
        Ok(Response::Refused { message, .. }) => anyhow::bail!("the daemon refused: {message}"),
        Ok(other) => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
        Err(ControlError::NotRunning { .. }) => Suspension::clear(&daemon.state_dir)?,
        Err(e) => return Err(e.into()),
    };
    match was {
        Some(s) => outln!(
            "Host {}: applying resumed (it was suspended {}).",
            daemon.host,
            suspension_text(&s)
        ),
        None => outln!("Host {} was not suspended; nothing changed.", daemon.host),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::RunOutcome;

    fn run(result: RunOutcome) -> RunSummary {
        RunSummary {
            trigger: "manual".into(),
            result,
            revision: Some("3f2a9c1".into()),
            refused: None,
            counts: homelab_agent_state::RunCounts {
                created: 1,
                skipped: 2,
                ..Default::default()
            },
            planned: Default::default(),
            error: None,
            duration_ms: 1234,
        }
    }

    #[test]
    fn reconcile_text() {
        let mut refused = run(RunOutcome::Success);
        refused.refused = Some(crate::daemon::status::Refusal {
            stage: "validate".into(),
            revision: Some("9d8e7f6".into()),
            error: "hosts/indri.yaml:3: unknown module `zott`".into(),
            cause: Default::default(),
        });
        let mut suspended = run(RunOutcome::Suspended);
        suspended.planned.drift = 1;
        let mut failed = run(RunOutcome::Partial);
        failed.error = Some("file:/etc/x: permission denied".into());
        insta::assert_snapshot!(format!(
            "{}\n{}\n{}\n{}",
            run_text("indri", &run(RunOutcome::Skipped)),
            run_text("indri", &refused),
            run_text("indri", &suspended),
            run_text("indri", &failed)
        ));
        assert!(run(RunOutcome::Skipped).succeeded());
        assert!(!refused.succeeded());
        assert!(!failed.succeeded());
        assert!(!suspended.succeeded());
    }
}
