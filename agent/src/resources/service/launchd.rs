//! The launchd backend (macOS): a plist per job, driven with the modern
//! `launchctl` verbs (`bootstrap`, `bootout`, `enable`, `disable`,
//! `kickstart`, `print`, `print-disabled`) through `host.runner`.
//!
//! System jobs (`scope: system`, the default) live in
//! `/Library/LaunchDaemons/<label>.plist`, `root:wheel 0644`, domain
//! `system`, and run as `user` through `UserName`. `scope: agent` jobs live
//! in the user's `~/Library/LaunchAgents`, domain `gui/<uid>`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use plist::{Dictionary, Value};

use super::{
    label_for, poll_up, settle_for, GenFile, Job, Managed, NotUp, Restart, Scope, Spec, When,
};
use crate::resources::exec::Cmd;
use crate::resources::{Host, PruneOutcome, ResourceError};

pub const DAEMON_DIR: &str = "/Library/LaunchDaemons";

/// `launchctl ARGS`.
pub fn launchctl<I, S>(args: I) -> Cmd
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    Cmd::new("launchctl", args).timeout(Duration::from_secs(60))
}

fn plist_path(spec: &Spec) -> PathBuf {
    let file = format!("{}.plist", spec.label());
    match (spec.scope, &spec.user) {
        (Scope::Agent, Some(user)) => Path::new("/Users")
            .join(user)
            .join("Library/LaunchAgents")
            .join(file),
        _ => Path::new(DAEMON_DIR).join(file),
    }
}

/// The plist dictionary for a spec, keys in a fixed order.
pub fn plist_dict(spec: &Spec) -> Dictionary {
    let mut d = Dictionary::new();
    d.insert("Label".into(), Value::String(spec.label()));
    let argv: Vec<Value> = std::iter::once(spec.program.clone())
        .chain(spec.args.iter().cloned())
        .map(Value::String)
        .collect();
    d.insert("ProgramArguments".into(), Value::Array(argv));
    if !spec.environment.is_empty() {
        let mut env = Dictionary::new();
        for (k, v) in &spec.environment {
            env.insert(k.clone(), Value::String(v.clone()));
        }
        d.insert("EnvironmentVariables".into(), Value::Dictionary(env));
    }
    if spec.scope == Scope::System {
        if let Some(u) = &spec.user {
            d.insert("UserName".into(), Value::String(u.clone()));
        }
        if let Some(g) = &spec.group {
            d.insert("GroupName".into(), Value::String(g.clone()));
        }
    }
    if let Some(wd) = &spec.working_directory {
        d.insert("WorkingDirectory".into(), Value::String(wd.clone()));
    }
    match &spec.job {
        Job::Service {
            restart,
            restart_delay,
            ..
        } => {
            d.insert("RunAtLoad".into(), Value::Boolean(true));
            let keep_alive = match restart {
                Restart::Always => Value::Boolean(true),
                Restart::OnFailure => {
                    let mut k = Dictionary::new();
                    k.insert("SuccessfulExit".into(), Value::Boolean(false));
                    Value::Dictionary(k)
                }
                Restart::Never => Value::Boolean(false),
            };
            d.insert("KeepAlive".into(), keep_alive);
            d.insert(
                "ThrottleInterval".into(),
                Value::Integer((*restart_delay.max(&1)).into()),
            );
        }
        Job::Schedule { when, .. } => {
            d.insert("RunAtLoad".into(), Value::Boolean(false));
            match when {
                When::Calendar(cal) => {
                    let intervals = cal.launchd_intervals().unwrap_or_default();
                    let dicts: Vec<Value> = intervals
                        .into_iter()
                        .map(|entry| {
                            let mut i = Dictionary::new();
                            for (k, v) in entry {
                                i.insert(k.into(), Value::Integer(u64::from(v).into()));
                            }
                            Value::Dictionary(i)
                        })
                        .collect();
                    let value = if dicts.len() == 1 {
                        dicts.into_iter().next().expect("one")
                    } else {
                        Value::Array(dicts)
                    };
                    d.insert("StartCalendarInterval".into(), value);
                }
                When::Every(secs) => {
                    d.insert("StartInterval".into(), Value::Integer((*secs).into()));
                }
            }
        }
    }
    if let Some(p) = &spec.stdout {
        d.insert("StandardOutPath".into(), Value::String(p.clone()));
    }
    if let Some(p) = &spec.stderr {
        d.insert("StandardErrorPath".into(), Value::String(p.clone()));
    }
    d
}

/// The plist as XML bytes.
pub fn plist_bytes(spec: &Spec) -> Vec<u8> {
    let mut out = Vec::new();
    Value::Dictionary(plist_dict(spec))
        .to_writer_xml(&mut out)
        .expect("writing a plist to memory cannot fail");
    out.push(b'\n');
    out
}

pub fn files(spec: &Spec) -> Vec<GenFile> {
    let (owner, group) = match (spec.scope, &spec.user) {
        (Scope::Agent, Some(u)) => (Some(u.clone()), Some("staff".to_string())),
        // root:wheel, by id (0:0 on every macOS; also resolvable where no `wheel` exists)
        _ => (Some("0".to_string()), Some("0".to_string())),
    };
    vec![GenFile {
        field: "plist",
        path: plist_path(spec),
        content: plist_bytes(spec),
        mode: 0o644,
        owner,
        group,
    }]
}

/// `system` or `gui/<uid>`.
fn domain(spec: &Spec) -> Result<String, ResourceError> {
    match (spec.scope, &spec.user) {
        (Scope::Agent, Some(user)) => {
            let uid = nix::unistd::User::from_name(user)
                .ok()
                .flatten()
                .ok_or_else(|| ResourceError::UnknownUser(user.clone()))?
                .uid;
            Ok(format!("gui/{uid}"))
        }
        _ => Ok("system".to_string()),
    }
}

fn target(spec: &Spec) -> Result<String, ResourceError> {
    Ok(format!("{}/{}", domain(spec)?, spec.label()))
}

/// `state = running` and `pid = 123` from `launchctl print` (whose format
/// is not an API: only these two lines are read).
fn parse_print(text: &str) -> (String, Option<u32>) {
    let mut state = String::from("unknown");
    let mut pid = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("state = ") {
            if state == "unknown" {
                state = v.trim().to_string();
            }
        } else if let Some(v) = line.strip_prefix("pid = ") {
            pid = pid.or(v.trim().parse().ok());
        }
    }
    (state, pid)
}

/// Whether `launchctl print-disabled DOMAIN` lists the label as disabled
/// (`=> disabled`, or `=> true` on older macOS).
fn disabled(text: &str, label: &str) -> bool {
    let quoted = format!("\"{label}\"");
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with(&quoted))
        .any(|l| l.ends_with("disabled") || l.ends_with("true"))
}

pub fn observe(spec: &Spec, host: &Host) -> Result<Managed, ResourceError> {
    let target = target(spec)?;
    let out = host.runner.run(&launchctl(["print", target.as_str()]))?;
    let (loaded, state, pid) = if out.success() {
        let (state, pid) = parse_print(&out.stdout);
        (true, state, pid)
    } else {
        (false, "not loaded".to_string(), None)
    };
    let dis = host.run_ok(&launchctl(["print-disabled", domain(spec)?.as_str()]))?;
    let active = if spec.is_schedule() {
        loaded
    } else {
        loaded && state == "running"
    };
    Ok(Managed {
        loaded,
        active,
        state,
        enabled: !disabled(&dis.stdout, &spec.label()),
        pid,
    })
}

/// Boots a job out and waits until launchd has let go of it (exit 36:
/// still stopping; 3 or 113: not loaded).
fn bootout(host: &Host, target: &str) -> Result<(), ResourceError> {
    for _ in 0..100 {
        let out = host.runner.run(&launchctl(["bootout", target]))?;
        match out.code {
            Some(0) => {}
            Some(36) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Some(3) | Some(113) => return Ok(()),
            _ => {
                return Err(ResourceError::Command {
                    command: format!("launchctl bootout {target}"),
                    code: out.code,
                    message: out.message(),
                })
            }
        }
        // Gone once `print` no longer finds it.
        let print = host.runner.run(&launchctl(["print", target]))?;
        if !print.success() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(ResourceError::Command {
        command: format!("launchctl bootout {target}"),
        code: None,
        message: "the job was still loaded after 10 s".into(),
    })
}

/// A loaded job keeps running its old plist: boot it out before the new
/// one is written.
pub fn unload_for_update(
    spec: &Spec,
    host: &Host,
    managed: Option<&Managed>,
) -> Result<(), ResourceError> {
    if managed.is_some_and(|m| m.loaded) {
        bootout(host, &target(spec)?)?;
    }
    Ok(())
}

pub fn converge(
    spec: &Spec,
    host: &Host,
    managed: &Managed,
    files_changed: bool,
) -> Result<bool, ResourceError> {
    let target = target(spec)?;
    let domain = domain(spec)?;
    if spec.enabled && !managed.enabled {
        host.run_ok(&launchctl(["enable", target.as_str()]))?;
    } else if !spec.enabled && managed.enabled {
        host.run_ok(&launchctl(["disable", target.as_str()]))?;
    }
    let want = match spec.job {
        Job::Service { running, .. } => running,
        Job::Schedule { .. } => spec.enabled,
    };
    // Booted out already when the plist changed.
    let loaded = managed.loaded && !files_changed;
    let plist = plist_path(spec).to_string_lossy().into_owned();
    let mut started = false;
    if want {
        if !loaded {
            host.run_ok(&launchctl(["bootstrap", domain.as_str(), plist.as_str()]))?;
            started = !spec.is_schedule();
        } else if !spec.is_schedule() && !managed.active {
            host.run_ok(&launchctl(["kickstart", target.as_str()]))?;
            started = true;
        }
    } else if loaded {
        bootout(host, &target)?;
    }
    Ok(started)
}

pub fn restart(spec: &Spec, host: &Host) -> Result<(), ResourceError> {
    host.run_ok(&launchctl(["kickstart", "-k", target(spec)?.as_str()]))?;
    Ok(())
}

/// Up = loaded, `state = running`, the same pid for the settle time.
pub fn wait_up(spec: &Spec, host: &Host, timeout: Duration) -> Result<(), NotUp> {
    let target = target(spec)?;
    let mut last_pid = None;
    poll_up(timeout, settle_for(timeout), || {
        let out = host.runner.run(&launchctl(["print", target.as_str()]))?;
        if !out.success() {
            return Err(NotUp::NotLoaded {
                target: target.clone(),
                message: out.message(),
            });
        }
        let (state, pid) = parse_print(&out.stdout);
        let same = pid.is_some() && pid == last_pid;
        last_pid = pid;
        Ok(if state == "running" && same {
            None
        } else {
            Some(state)
        })
    })
}

pub fn prune(name: &str, host: &Host) -> Result<PruneOutcome, ResourceError> {
    let label = label_for(name);
    let file = format!("{label}.plist");
    let mut found: Option<(PathBuf, String)> = None;
    let daemon = Path::new(DAEMON_DIR).join(&file);
    if host.fs.meta(&daemon)?.is_some() {
        found = Some((daemon, "system".into()));
    } else if let Ok(users) = std::fs::read_dir(host.fs.host_path(Path::new("/Users"))) {
        for u in users.flatten() {
            let user = u.file_name().to_string_lossy().into_owned();
            let p = Path::new("/Users")
                .join(&user)
                .join("Library/LaunchAgents")
                .join(&file);
            if host.fs.meta(&p)?.is_some() {
                let uid = nix::unistd::User::from_name(&user)
                    .ok()
                    .flatten()
                    .map(|u| u.uid.to_string())
                    .unwrap_or_default();
                found = Some((p, format!("gui/{uid}")));
                break;
            }
        }
    }
    let Some((path, domain)) = found else {
        return Ok(PruneOutcome::AlreadyGone);
    };
    if !host.sandbox {
        bootout(host, &format!("{domain}/{label}"))?;
    }
    host.fs.remove_file(&path)?;
    Ok(PruneOutcome::Removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn print_output_is_read() {
        let text = "system/homelab.zot = {\n\tactive count = 1\n\tpath = /Library/LaunchDaemons/homelab.zot.plist\n\tstate = running\n\n\tprogram = /opt/homebrew/bin/zot\n\tpid = 4242\n\tlast exit code = 0\n\tjob state = running\n}\n";
        assert_eq!(parse_print(text), ("running".to_string(), Some(4242)));
    }

    #[test]
    fn print_disabled_both_styles() {
        let new = "disabled services = {\n\t\"homelab.zot\" => disabled\n\t\"com.apple.x\" => enabled\n}\n";
        assert!(disabled(new, "homelab.zot"));
        assert!(!disabled(new, "com.apple.x"));
        let old = "disabled services = {\n\t\"homelab.zot\" => true\n}\n";
        assert!(disabled(old, "homelab.zot"));
        assert!(!disabled(old, "homelab.jellyfin"));
    }
}
