//! The systemd backend: unit files in `/etc/systemd/system`, driven with
//! `systemctl` (through `host.runner`).
//!
//! A service is `<name>.service`; a schedule is a oneshot `<name>.service`
//! plus `<name>.timer`. Every generated unit passes `systemd-analyze
//! verify` (in a private temp directory, with unknown keys and sections
//! counted as errors) before it is installed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{key_values, poll_up, settle_for, GenFile, Job, Managed, NotUp, Restart, Spec, When};
use crate::resources::exec::{Cmd, ExecError};
use crate::resources::{Host, PruneOutcome, ResourceError};

pub const UNIT_DIR: &str = "/etc/systemd/system";

const HEADER: &str = "# Managed by homelab-agent: edits here are reverted on its next run.\n";

/// `systemctl ARGS` with a time limit that covers a slow stop.
pub fn systemctl<I, S>(args: I) -> Cmd
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    Cmd::new("systemctl", args).timeout(Duration::from_secs(120))
}

/// Escapes `%` specifiers (every value in a unit file).
fn spec_escape(s: &str) -> String {
    s.replace('%', "%%")
}

/// One word of a command line: quoted when systemd would otherwise split
/// or interpret it; `$` and `%` escaped so nothing is expanded.
fn exec_word(s: &str) -> String {
    let escaped = spec_escape(s).replace('$', "$$");
    let needs_quotes = s.is_empty()
        || s.chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';'));
    if needs_quotes {
        format!("\"{}\"", escaped.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        escaped
    }
}

fn exec_line(spec: &Spec) -> String {
    std::iter::once(spec.program.as_str())
        .chain(spec.args.iter().map(String::as_str))
        .map(exec_word)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `[Service]` lines both kinds share.
fn process_lines(spec: &Spec, out: &mut String) {
    out.push_str(&format!("ExecStart={}\n", exec_line(spec)));
    if let Some(u) = &spec.user {
        out.push_str(&format!("User={}\n", spec_escape(u)));
    }
    if let Some(g) = &spec.group {
        out.push_str(&format!("Group={}\n", spec_escape(g)));
    }
    if let Some(wd) = &spec.working_directory {
        out.push_str(&format!("WorkingDirectory={}\n", spec_escape(wd)));
    }
    for (k, v) in &spec.environment {
        let v = spec_escape(v).replace('\\', "\\\\").replace('"', "\\\"");
        out.push_str(&format!("Environment=\"{k}={v}\"\n"));
    }
    if let Some(p) = &spec.stdout {
        out.push_str(&format!("StandardOutput=append:{}\n", spec_escape(p)));
    }
    if let Some(p) = &spec.stderr {
        out.push_str(&format!("StandardError=append:{}\n", spec_escape(p)));
    }
}

/// Generated `[Service]` lines, minus those the spec's `systemd:` settings
/// replace, then those settings.
fn service_section(spec: &Spec, generated: &str, out: &mut String) {
    for line in generated.lines() {
        let key = line.split_once('=').map_or("", |(k, _)| k);
        if !spec.systemd_extra.iter().any(|(k, _)| k == key) {
            out.push_str(line);
            out.push('\n');
        }
    }
    for (k, v) in &spec.systemd_extra {
        out.push_str(&format!("{k}={}\n", spec_escape(v)));
    }
}

/// The unit text of the `.service`.
pub fn service_unit(spec: &Spec) -> String {
    let mut out = String::from(HEADER);
    out.push_str("[Unit]\n");
    out.push_str(&format!("Description={}\n", spec_escape(&spec.description)));
    out.push_str("Wants=network-online.target\nAfter=network-online.target\n\n[Service]\n");
    let mut section = String::new();
    match &spec.job {
        Job::Service {
            restart,
            restart_delay,
            start_timeout,
            ..
        } => {
            section.push_str("Type=exec\n");
            process_lines(spec, &mut section);
            let restart = match restart {
                Restart::Never => "no",
                other => other.name(),
            };
            section.push_str(&format!("Restart={restart}\nRestartSec={restart_delay}\n"));
            section.push_str(&format!("TimeoutStartSec={}\n", start_timeout.as_secs()));
            service_section(spec, &section, &mut out);
            out.push_str("\n[Install]\nWantedBy=multi-user.target\n");
        }
        Job::Schedule { timeout, .. } => {
            section.push_str("Type=oneshot\n");
            process_lines(spec, &mut section);
            if let Some(t) = timeout {
                section.push_str(&format!("TimeoutStartSec={t}\n"));
            }
            service_section(spec, &section, &mut out);
        }
    }
    out
}

/// The unit text of a schedule's `.timer`.
pub fn timer_unit(spec: &Spec) -> Option<String> {
    let Job::Schedule {
        when,
        persistent,
        randomized_delay,
        ..
    } = &spec.job
    else {
        return None;
    };
    let mut out = String::from(HEADER);
    out.push_str(&format!(
        "[Unit]\nDescription=Timer: {}\n\n[Timer]\n",
        spec_escape(&spec.description)
    ));
    match when {
        When::Calendar(cal) => {
            out.push_str(&format!("OnCalendar={}\n", cal.on_calendar()));
            out.push_str(&format!("Persistent={persistent}\n"));
        }
        When::Every(secs) => {
            out.push_str(&format!(
                "OnActiveSec={secs}\nOnUnitActiveSec={secs}\nAccuracySec=1s\n"
            ));
        }
    }
    if *randomized_delay > 0 {
        out.push_str(&format!("RandomizedDelaySec={randomized_delay}\n"));
    }
    out.push_str("\n[Install]\nWantedBy=timers.target\n");
    Some(out)
}

fn unit_path(name: &str, suffix: &str) -> PathBuf {
    Path::new(UNIT_DIR).join(format!("{name}.{suffix}"))
}

/// The files a spec installs.
pub fn files(spec: &Spec) -> Vec<GenFile> {
    let mut out = vec![GenFile {
        field: "unit",
        path: unit_path(&spec.name, "service"),
        content: service_unit(spec).into_bytes(),
        mode: 0o644,
        owner: Some("root".into()),
        group: Some("root".into()),
    }];
    if let Some(timer) = timer_unit(spec) {
        out.push(GenFile {
            field: "timer",
            path: unit_path(&spec.name, "timer"),
            content: timer.into_bytes(),
            mode: 0o644,
            owner: Some("root".into()),
            group: Some("root".into()),
        });
    }
    out
}

/// The unit systemctl enables and starts: the timer of a schedule.
fn main_unit(spec: &Spec) -> String {
    if spec.is_schedule() {
        format!("{}.timer", spec.name)
    } else {
        format!("{}.service", spec.name)
    }
}

/// Lines of `systemd-analyze verify` output that are about our files and
/// say a key or section is unknown (systemd only warns for those).
fn unknown_key_lines<'a>(stderr: &'a str, names: &[String]) -> Vec<&'a str> {
    stderr
        .lines()
        .filter(|l| names.iter().any(|n| l.contains(n.as_str())))
        .filter(|l| {
            l.contains("Unknown key")
                || l.contains("Unknown section")
                || l.contains("Unknown lvalue")
                || l.contains("Invalid section header")
                || l.contains("Failed to parse")
                || l.contains("Missing '='")
        })
        .collect()
}

/// `systemd-analyze verify` of the generated units, in a private temp
/// directory (not the live one: nothing is installed before it passes).
pub fn verify(files: &[GenFile], host: &Host) -> Result<(), ResourceError> {
    let dir = tempfile_dir()?;
    let mut paths = Vec::new();
    let mut names = Vec::new();
    for f in files {
        let name = f
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let p = dir.path.join(&name);
        std::fs::write(&p, &f.content).map_err(|error| ResourceError::Scratch {
            path: p.clone(),
            error,
        })?;
        paths.push(p.to_string_lossy().into_owned());
        names.push(name);
    }
    let mut args = vec!["verify".to_string(), "--man=no".to_string()];
    args.extend(paths);
    let cmd = Cmd::new("systemd-analyze", args).timeout(Duration::from_secs(60));
    let out = match host.runner.run(&cmd) {
        Ok(out) => out,
        // Not installed (a Synology NAS ships none): the agent's own checks,
        // and one warning per run, not one per unit.
        Err(ExecError::Spawn { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            host.warn_once(
                "systemd-analyze",
                "systemd-analyze is not installed on this host: units are checked by the agent's own rules instead \
                 (sections, Key=value lines, an executable ExecStart program); an unknown setting in `systemd:` is not caught. \
                 Install it for the full check (Debian: apt-get install systemd)",
            );
            return own_check(files);
        }
        Err(e) => return Err(e.into()),
    };
    let unknown = unknown_key_lines(&out.stderr, &names);
    if !out.success() || !unknown.is_empty() {
        let mut message = if unknown.is_empty() {
            out.message()
        } else {
            unknown.join("\n")
        };
        message = message.replace(&dir.path.to_string_lossy().into_owned(), UNIT_DIR);
        return Err(ResourceError::Command {
            command: format!("systemd-analyze verify {}", names.join(" ")),
            code: out.code.filter(|&c| c != 0).or(Some(1)),
            message: format!(
                "{message}\n  the unit was not installed; fix the service's fields in the module"
            ),
        });
    }
    Ok(())
}

/// The sections the generated units use.
const SECTIONS: &[&str] = &["[Unit]", "[Service]", "[Install]", "[Timer]"];

/// The first word of an `ExecStart=` value as [`exec_word`] wrote it.
fn exec_program(value: &str) -> String {
    let word = match value.strip_prefix('"') {
        Some(rest) => {
            let mut out = String::new();
            let mut chars = rest.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => out.extend(chars.next()),
                    '"' => break,
                    c => out.push(c),
                }
            }
            out
        }
        None => value.split_whitespace().next().unwrap_or("").to_string(),
    };
    word.replace("$$", "$").replace("%%", "%")
}

/// The agent's own checks of generated units, for a host without
/// `systemd-analyze`: every line a comment, one of [`SECTIONS`] or
/// `Key=value` (key of letters and digits, no control characters), and the
/// `ExecStart` program an executable file (what `verify` refuses most
/// often: a typo in `program`).
pub fn own_check(files: &[GenFile]) -> Result<(), ResourceError> {
    use std::os::unix::fs::PermissionsExt;
    let mut problems = Vec::new();
    let mut names = Vec::new();
    for f in files {
        let name = f
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&f.content);
        for (i, line) in text.lines().enumerate() {
            let at = format!("{}:{}", f.path.display(), i + 1);
            if line.is_empty() || line.starts_with('#') || SECTIONS.contains(&line) {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                problems.push(format!("{at}: not a section header nor Key=value"));
                continue;
            };
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
                problems.push(format!(
                    "{at}: `{}` is not a setting name",
                    key.escape_debug()
                ));
            }
            if value.chars().any(char::is_control) {
                problems.push(format!(
                    "{at}: the value of {key} holds a control character"
                ));
            }
            if key == "ExecStart" {
                let program = exec_program(value);
                let ok = std::fs::metadata(&program)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
                if !ok {
                    problems.push(format!(
                        "{at}: Command {program} is not executable (missing, not a file, or no execute bit)"
                    ));
                }
            }
        }
        names.push(name);
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(ResourceError::Command {
        command: format!("the agent's unit check of {}", names.join(" ")),
        code: Some(1),
        message: format!(
            "{}\n  the unit was not installed; fix the service's fields in the module",
            problems.join("\n")
        ),
    })
}

/// A private temp directory removed on drop.
struct TempDir {
    path: PathBuf,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn tempfile_dir() -> Result<TempDir, ResourceError> {
    use std::os::unix::fs::DirBuilderExt;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "homelab-agent-verify.{}.{n}.{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .map_err(|error| ResourceError::Scratch {
            path: path.clone(),
            error,
        })?;
    Ok(TempDir { path })
}

fn show(host: &Host, unit: &str, props: &str) -> Result<String, ResourceError> {
    Ok(host.run_ok(&systemctl(["show", "-p", props, unit]))?.stdout)
}

pub fn observe(spec: &Spec, host: &Host) -> Result<Managed, ResourceError> {
    let unit = main_unit(spec);
    let text = show(
        host,
        &unit,
        "LoadState,ActiveState,SubState,UnitFileState,MainPID",
    )?;
    let kv = key_values(&text);
    let get = |k: &str| kv.get(k).copied().unwrap_or("");
    Ok(Managed {
        loaded: get("LoadState") == "loaded",
        active: matches!(get("ActiveState"), "active" | "reloading"),
        state: format!("{}/{}", get("ActiveState"), get("SubState")),
        enabled: matches!(get("UnitFileState"), "enabled" | "enabled-runtime"),
        pid: get("MainPID").parse().ok().filter(|&p| p != 0),
    })
}

/// Makes the manager match the spec after the files are in place; returns
/// whether a service was started or restarted.
pub fn converge(
    spec: &Spec,
    host: &Host,
    managed: &Managed,
    files_changed: bool,
) -> Result<bool, ResourceError> {
    let unit = main_unit(spec);
    if files_changed {
        host.run_ok(&systemctl(["daemon-reload"]))?;
    }
    if spec.enabled && (!managed.enabled || files_changed) {
        // `reenable` also drops the links of an [Install] section that changed.
        let verb = if managed.enabled {
            "reenable"
        } else {
            "enable"
        };
        host.run_ok(&systemctl([verb, unit.as_str()]))?;
    } else if !spec.enabled && managed.enabled {
        host.run_ok(&systemctl(["disable", unit.as_str()]))?;
    }
    let want_active = match spec.job {
        Job::Service { running, .. } => running,
        Job::Schedule { .. } => spec.enabled,
    };
    let mut started = false;
    if want_active {
        if !managed.active {
            if managed.state.starts_with("failed") {
                host.run_ok(&systemctl(["reset-failed", unit.as_str()]))?;
            }
            host.run_ok(&systemctl(["start", unit.as_str()]))?;
            started = !spec.is_schedule();
        } else if files_changed {
            host.run_ok(&systemctl(["restart", unit.as_str()]))?;
            started = !spec.is_schedule();
        }
    } else if managed.active {
        host.run_ok(&systemctl(["stop", unit.as_str()]))?;
    }
    Ok(started)
}

pub fn restart(spec: &Spec, host: &Host) -> Result<(), ResourceError> {
    let unit = main_unit(spec);
    // A service crash-looping on a bad config has used up its start rate
    // limit (5 starts in 10 s): clear it, or the restart onto the restored
    // config is refused.
    host.run_ok(&systemctl(["reset-failed", unit.as_str()]))?;
    host.run_ok(&systemctl(["restart", unit.as_str()]))?;
    Ok(())
}

/// Up = `active/running` with the same main PID and restart count for the
/// settle time; `failed` ends the wait at once.
pub fn wait_up(spec: &Spec, host: &Host, timeout: Duration) -> Result<(), NotUp> {
    let unit = main_unit(spec);
    let mut last: Option<(String, String)> = None;
    poll_up(timeout, settle_for(timeout), || {
        let text = show(host, &unit, "ActiveState,SubState,MainPID,NRestarts,Result")?;
        let kv = key_values(&text);
        let get = |k: &str| kv.get(k).copied().unwrap_or("").to_string();
        let state = format!("{}/{}", get("ActiveState"), get("SubState"));
        if get("ActiveState") == "failed" {
            return Err(NotUp::UnitFailed {
                unit: unit.clone(),
                state,
                result: get("Result"),
            });
        }
        let ident = (get("MainPID"), get("NRestarts"));
        let same = last.as_ref() == Some(&ident);
        last = Some(ident);
        if state == "active/running" && same {
            Ok(None)
        } else {
            Ok(Some(state))
        }
    })
}

pub fn prune(name: &str, host: &Host, schedule: bool) -> Result<PruneOutcome, ResourceError> {
    let mut suffixes = vec!["service"];
    if schedule {
        suffixes.insert(0, "timer");
    }
    if !host.sandbox {
        for s in &suffixes {
            let unit = format!("{name}.{s}");
            let kv_text = show(host, &unit, "LoadState,UnitFileState,ActiveState")?;
            let kv = key_values(&kv_text);
            if kv.get("LoadState") == Some(&"not-found") {
                continue;
            }
            if matches!(
                kv.get("UnitFileState"),
                Some(&"enabled") | Some(&"enabled-runtime")
            ) {
                host.run_ok(&systemctl(["disable", unit.as_str()]))?;
            }
            if kv.get("ActiveState").is_some_and(|a| *a != "inactive") {
                host.run_ok(&systemctl(["stop", unit.as_str()]))?;
            }
        }
    }
    let mut removed = false;
    for s in &suffixes {
        let path = unit_path(name, s);
        if host.fs.meta(&path)?.is_some() {
            host.fs.remove_file(&path)?;
            removed = true;
        }
    }
    if !host.sandbox && removed {
        host.run_ok(&systemctl(["daemon-reload"]))?;
    }
    Ok(if removed {
        PruneOutcome::Removed
    } else {
        PruneOutcome::AlreadyGone
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_and_escaped() {
        assert_eq!(exec_word("serve"), "serve");
        assert_eq!(exec_word("a b"), "\"a b\"");
        assert_eq!(exec_word(""), "\"\"");
        assert_eq!(exec_word("100%"), "100%%");
        assert_eq!(exec_word("$HOME"), "$$HOME");
        assert_eq!(exec_word("say \"hi\""), "\"say \\\"hi\\\"\"");
        assert_eq!(exec_word(";"), "\";\"");
    }

    #[test]
    fn unknown_keys_are_found_in_verify_output() {
        let names = vec!["zot.service".to_string()];
        let err = "/tmp/x/zot.service:7: Unknown key name 'Restartt' in section 'Service', ignoring.\n/lib/systemd/system/other.service:3: Unknown key name 'X' in section 'Unit', ignoring.\n";
        assert_eq!(unknown_key_lines(err, &names).len(), 1);
    }
}
