//! `service` (a long-running daemon) and `schedule` (a periodic job): one
//! desired spec, two platform backends chosen by the host's `platform`.
//!
//! - Linux: systemd (`systemd.rs`): unit files in `/etc/systemd/system`, a
//!   service unit, or for a schedule a oneshot service plus a timer; every
//!   generated unit passes `systemd-analyze verify` before it is installed.
//! - macOS: launchd (`launchd.rs`): a plist in `/Library/LaunchDaemons`
//!   (system domain) or a user's `~/Library/LaunchAgents` (`scope: agent`).
//!
//! Observe reads the unit/plist files through `host.fs` and, outside
//! sandbox mode, asks the service manager (`systemctl show`, `launchctl
//! print`). Drift: stopped or disabled by hand, unit or plist edited by
//! hand. In sandbox mode (`--root`) only the files are written under the
//! root and the service manager is never called ("files only").
//!
//! Handlers and rollback live in the engine (`apply`): a file with
//! `notify: [service:NAME]` that changed makes the engine call
//! [`Resource::notified`] once at the end of the run; after every start or
//! restart it calls [`Resource::wait_up`], and on failure restores the
//! changed files ([`Resource::restore`]) and restarts again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    ApplyCtx, FieldChange, Host, IdentityKind, Kind, Observation, ParseInput, Platform,
    PruneOutcome, Resource, ResourceError,
};
use crate::fsops::{Attrs, Meta};
use crate::syntax::diag::Diagnostics;
use crate::syntax::yaml::{MapReader, Node, Value};

pub mod calendar;
pub mod launchd;
pub mod systemd;

use calendar::Calendar;

/// How a service restarts after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    Always,
    OnFailure,
    Never,
}

impl Restart {
    pub fn name(self) -> &'static str {
        match self {
            Restart::Always => "always",
            Restart::OnFailure => "on-failure",
            Restart::Never => "never",
        }
    }
}

/// Where a launchd job lives (systemd units are always system units).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `/Library/LaunchDaemons`, the `system` domain; runs at boot.
    System,
    /// The `user`'s `~/Library/LaunchAgents`, domain `gui/<uid>`.
    Agent,
}

/// When a schedule runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    Calendar(Calendar),
    /// Every N seconds (systemd `OnUnitActiveSec`, launchd `StartInterval`).
    Every(u64),
}

/// What kind of job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    Service {
        running: bool,
        restart: Restart,
        restart_delay: u64,
        start_timeout: Duration,
    },
    Schedule {
        when: When,
        persistent: bool,
        randomized_delay: u64,
        /// Longest a run may take (systemd `TimeoutStartSec`), seconds.
        timeout: Option<u64>,
    },
}

/// The desired service or schedule, as declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub description: String,
    pub program: String,
    pub args: Vec<String>,
    pub environment: BTreeMap<String, String>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub working_directory: Option<String>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    pub enabled: bool,
    pub scope: Scope,
    pub job: Job,
    /// Extra `[Service]` settings for systemd (`systemd:` map), e.g. k3s'
    /// `KillMode=process`; they replace the generated line of the same key.
    pub systemd_extra: Vec<(String, String)>,
}

impl Spec {
    pub fn is_schedule(&self) -> bool {
        matches!(self.job, Job::Schedule { .. })
    }

    /// The launchd label: the name itself when it has a dot (reverse-DNS,
    /// `me.eblu.zot`), else `homelab.<name>`.
    pub fn label(&self) -> String {
        label_for(&self.name)
    }
}

/// See [`Spec::label`]; prune derives it from the identity alone.
pub fn label_for(name: &str) -> String {
    if name.contains('.') {
        name.to_string()
    } else {
        format!("homelab.{name}")
    }
}

const SERVICE_FIELDS: &[&str] = &[
    "program",
    "systemd",
    "args",
    "environment",
    "user",
    "group",
    "working_directory",
    "stdout",
    "stderr",
    "enabled",
    "description",
    "scope",
    "state",
    "restart",
    "restart_delay",
    "start_timeout",
];
const SCHEDULE_FIELDS: &[&str] = &[
    "program",
    "systemd",
    "args",
    "environment",
    "user",
    "group",
    "working_directory",
    "stdout",
    "stderr",
    "enabled",
    "description",
    "scope",
    "calendar",
    "every",
    "persistent",
    "randomized_delay",
    "timeout",
];

pub struct ServiceKind;
pub struct ScheduleKind;

impl Kind for ServiceKind {
    fn name(&self) -> &'static str {
        "service"
    }
    fn doc(&self) -> &'static str {
        "a long-running daemon (systemd unit on linux, launchd plist on macos): program (absolute), args, environment, user, group, working_directory, stdout, stderr, state (running|stopped), enabled, restart (always|on-failure|never), restart_delay, start_timeout, description, scope (system|agent, macos), systemd (linux: extra [Service] settings); sandbox: files only"
    }
    fn identity_kind(&self) -> IdentityKind {
        IdentityKind::Name
    }
    fn fields(&self) -> &'static [&'static str] {
        SERVICE_FIELDS
    }
    fn parse(&self, input: ParseInput<'_, '_>) -> Option<Box<dyn Resource>> {
        parse(input, false)
    }
    fn prune(&self, identity: &str, host: &Host) -> Result<PruneOutcome, ResourceError> {
        prune(identity, host, false)
    }
}

impl Kind for ScheduleKind {
    fn name(&self) -> &'static str {
        "schedule"
    }
    fn doc(&self) -> &'static str {
        "a periodic job (systemd oneshot service + timer on linux, launchd StartCalendarInterval on macos): program, args, environment, user, group, working_directory, stdout, stderr, calendar (cron's 5 fields or hourly|daily|weekly|monthly) or every (e.g. 15m), persistent (catch up missed runs, default true), randomized_delay, timeout, enabled, systemd (linux: extra [Service] settings); sandbox: files only"
    }
    fn identity_kind(&self) -> IdentityKind {
        IdentityKind::Name
    }
    fn fields(&self) -> &'static [&'static str] {
        SCHEDULE_FIELDS
    }
    fn parse(&self, input: ParseInput<'_, '_>) -> Option<Box<dyn Resource>> {
        parse(input, true)
    }
    fn prune(&self, identity: &str, host: &Host) -> Result<PruneOutcome, ResourceError> {
        prune(identity, host, true)
    }
}

fn prune(identity: &str, host: &Host, schedule: bool) -> Result<PruneOutcome, ResourceError> {
    match host.platform {
        Platform::Linux => systemd::prune(identity, host, schedule),
        Platform::Macos => launchd::prune(identity, host),
    }
}

/// A duration field: `30s`, `5m`, `1h 30m` or a number of seconds.
fn duration(
    fields: &mut MapReader<'_>,
    key: &str,
    diags: &mut Diagnostics,
) -> Option<(u64, usize)> {
    let node = fields.take(key)?;
    let parsed = match &node.value {
        Value::Int(n) if *n >= 0 => Ok(*n as u64),
        Value::Str(s) => humantime::parse_duration(s.trim())
            .map(|d| d.as_secs())
            .map_err(|e| format!("`{key}: {s}` is not a duration ({e})")),
        other => Err(format!(
            "`{key}` must be a duration such as \"30s\" or \"5m\", found {}",
            other.type_name()
        )),
    };
    match parsed {
        Ok(v) => Some((v, node.line)),
        Err(msg) => {
            diags.push(
                fields
                    .diag(node.line, msg)
                    .hint("write a duration such as 30s, 5m, 1h or a number of seconds"),
            );
            None
        }
    }
}

fn absolute(
    fields: &MapReader<'_>,
    key: &str,
    value: Option<(String, usize)>,
    diags: &mut Diagnostics,
) -> Option<String> {
    let (v, line) = value?;
    if !v.starts_with('/') {
        diags.push(
            fields
                .diag(line, format!("`{key}` must be an absolute path, found `{v}`"))
                .hint("service managers run programs without a shell or search path; write the full path"),
        );
        return None;
    }
    Some(v)
}

fn environment(fields: &mut MapReader<'_>, diags: &mut Diagnostics) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(node) = fields.take("environment") else {
        return out;
    };
    let Value::Map(entries) = &node.value else {
        diags.push(fields.diag(
            node.line,
            format!(
                "`environment` must be a map of NAME: value, found {}",
                node.value.type_name()
            ),
        ));
        return out;
    };
    for (k, v) in entries {
        let valid = k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            diags.push(
                fields
                    .diag(
                        v.line,
                        format!("`{k}` is not a valid environment variable name"),
                    )
                    .hint("use letters, digits and _, not starting with a digit"),
            );
            continue;
        }
        let text = match &v.value {
            Value::Str(s) => s.clone(),
            Value::Int(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Float(f) => f.to_string(),
            other => {
                diags.push(fields.diag(
                    v.line,
                    format!(
                        "environment `{k}` must be a string, found {}",
                        other.type_name()
                    ),
                ));
                continue;
            }
        };
        if text.contains('\n') || text.contains('\0') {
            diags.push(fields.diag(
                v.line,
                format!("environment `{k}` holds a newline or NUL, which unit files and plists cannot carry"),
            ));
            continue;
        }
        out.insert(k.clone(), text);
    }
    out
}

/// `systemd:`: extra `[Service]` settings, `Key: value`. Keys are letters
/// only (systemd's spelling, checked again by `systemd-analyze verify`).
fn systemd_extra(
    fields: &mut MapReader<'_>,
    platform: Platform,
    diags: &mut Diagnostics,
) -> Vec<(String, String)> {
    let Some(node) = fields.take("systemd") else {
        return Vec::new();
    };
    if platform != Platform::Linux {
        diags.push(
            fields
                .diag(node.line, "`systemd:` settings apply only to linux hosts")
                .hint("use `when: host.platform == \"linux\"` on a resource meant for both, or remove it"),
        );
        return Vec::new();
    }
    let Value::Map(entries) = &node.value else {
        diags.push(fields.diag(
            node.line,
            format!(
                "`systemd` must be a map of Key: value, found {}",
                node.value.type_name()
            ),
        ));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, v) in entries {
        if k.is_empty()
            || !k.chars().all(|c| c.is_ascii_alphanumeric())
            || !k.starts_with(|c: char| c.is_ascii_uppercase())
        {
            diags.push(
                fields
                    .diag(v.line, format!("`{k}` is not a systemd setting name"))
                    .hint("write it as in systemd.service(5), e.g. KillMode, LimitNOFILE"),
            );
            continue;
        }
        let text = match &v.value {
            Value::Str(s) => s.clone(),
            Value::Int(n) => n.to_string(),
            Value::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
            other => {
                diags.push(fields.diag(
                    v.line,
                    format!(
                        "systemd `{k}` must be a string, found {}",
                        other.type_name()
                    ),
                ));
                continue;
            }
        };
        if text.contains('\n') {
            diags.push(fields.diag(v.line, format!("systemd `{k}` holds a newline")));
            continue;
        }
        out.push((k.clone(), text));
    }
    out
}

fn one_of<T: Copy>(
    fields: &mut MapReader<'_>,
    key: &str,
    options: &[(&str, T)],
    diags: &mut Diagnostics,
) -> Option<T> {
    let (v, line) = fields.string(key, diags)?;
    match options.iter().find(|(n, _)| *n == v) {
        Some((_, t)) => Some(*t),
        None => {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            diags.push(
                fields
                    .diag(
                        line,
                        format!("`{key}: {v}` is not one of {}", names.join(", ")),
                    )
                    .hint(match crate::syntax::yaml::closest(&v, &names) {
                        Some(n) => format!("did you mean `{n}`?"),
                        None => format!("use one of {}", names.join(", ")),
                    }),
            );
            None
        }
    }
}

fn parse(input: ParseInput<'_, '_>, schedule: bool) -> Option<Box<dyn Resource>> {
    let ParseInput {
        identity,
        fields,
        diags,
        platform,
        ..
    } = input;
    let before = diags.len();
    let found = fields.take("program");
    let program_node: Option<&Node> = fields.require("program", found, diags);
    let program = program_node.and_then(|n| match n.as_str() {
        Some(s) => absolute(fields, "program", Some((s.to_string(), n.line)), diags),
        None => {
            diags.push(fields.diag(
                n.line,
                format!("`program` must be a string, found {}", n.value.type_name()),
            ));
            None
        }
    });
    let args: Vec<String> = fields
        .string_list("args", diags)
        .unwrap_or_default()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    if let Some(bad) = args.iter().find(|a| a.contains('\n') || a.contains('\0')) {
        diags.push(fields.diag(
            fields.line,
            format!("an argument holds a newline or NUL: {bad:?}"),
        ));
    }
    let environment = environment(fields, diags);
    let systemd_extra = systemd_extra(fields, platform, diags);
    let user = fields.string("user", diags).map(|s| s.0);
    let group = fields.string("group", diags).map(|s| s.0);
    let wd = fields.string("working_directory", diags);
    let working_directory = absolute(fields, "working_directory", wd, diags);
    let so = fields.string("stdout", diags);
    let stdout = absolute(fields, "stdout", so, diags);
    let se = fields.string("stderr", diags);
    let stderr = absolute(fields, "stderr", se, diags);
    let enabled = fields.bool("enabled", diags).unwrap_or(true);
    let description = fields
        .string("description", diags)
        .map(|s| s.0)
        .unwrap_or_else(|| format!("{identity} (homelab-agent)"));
    let scope_node = fields.take("scope");
    let scope = read_scope(fields, scope_node, platform, &user, diags);
    let job = if schedule {
        let calendar = fields.string("calendar", diags);
        let every = duration(fields, "every", diags);
        let when = match (calendar, every) {
            (Some((expr, line)), None) => match Calendar::parse(&expr) {
                Ok(cal) => {
                    if platform == Platform::Macos {
                        if let Err(e) = cal.launchd_intervals() {
                            diags.push(fields.diag(line, e.to_string()));
                        }
                    }
                    Some(When::Calendar(cal))
                }
                Err(e) => {
                    diags.push(fields.diag(line, format!("`calendar`: {e}")).hint(
                        "e.g. calendar: \"30 2 * * *\" (02:30 daily), \"0 */6 * * *\", daily, weekly",
                    ));
                    None
                }
            },
            (None, Some((0, line))) => {
                diags.push(fields.diag(line, "`every` must be at least 1s"));
                None
            }
            (None, Some((secs, _))) => Some(When::Every(secs)),
            (Some(_), Some(_)) => {
                diags.push(
                    fields
                        .diag(
                            fields.line,
                            "a schedule takes `calendar` or `every`, not both",
                        )
                        .hint("remove one of them"),
                );
                None
            }
            (None, None) => {
                diags.push(
                    fields
                        .diag(fields.line, "a schedule needs `calendar` or `every`")
                        .hint("e.g. calendar: daily, or every: 15m"),
                );
                None
            }
        };
        let persistent = fields.bool("persistent", diags).unwrap_or(true);
        let randomized_delay = duration(fields, "randomized_delay", diags).map_or(0, |d| d.0);
        let timeout = duration(fields, "timeout", diags).map(|d| d.0);
        when.map(|when| Job::Schedule {
            when,
            persistent,
            randomized_delay,
            timeout,
        })
    } else {
        let running = one_of(
            fields,
            "state",
            &[("running", true), ("stopped", false)],
            diags,
        )
        .unwrap_or(true);
        let restart = one_of(
            fields,
            "restart",
            &[
                ("always", Restart::Always),
                ("on-failure", Restart::OnFailure),
                ("never", Restart::Never),
            ],
            diags,
        )
        .unwrap_or(Restart::OnFailure);
        let restart_delay = duration(fields, "restart_delay", diags).map_or(5, |d| d.0);
        let start_timeout = duration(fields, "start_timeout", diags).map_or(30, |d| d.0.max(1));
        Some(Job::Service {
            running,
            restart,
            restart_delay,
            start_timeout: Duration::from_secs(start_timeout),
        })
    };
    if platform == Platform::Macos
        && !enabled
        && matches!(job, Some(Job::Service { running: true, .. }))
    {
        diags.push(
            fields
                .diag(
                    fields.line,
                    "`enabled: false` with `state: running`: launchd cannot load a disabled job",
                )
                .hint("on macos, use state: stopped with enabled: false, or enable it"),
        );
    }
    if diags.len() > before {
        return None;
    }
    let spec = Spec {
        name: identity.to_string(),
        description,
        program: program?,
        args,
        environment,
        user,
        group,
        working_directory,
        stdout,
        stderr,
        enabled,
        scope,
        job: job?,
        systemd_extra,
    };
    Some(Box::new(Unit::new(spec, platform)))
}

fn read_scope(
    fields: &MapReader<'_>,
    node: Option<&Node>,
    platform: Platform,
    user: &Option<String>,
    diags: &mut Diagnostics,
) -> Scope {
    let Some(node) = node else {
        return Scope::System;
    };
    let line = node.line;
    let value = node.as_str().unwrap_or("");
    match (value, platform) {
        ("system", _) => Scope::System,
        ("agent", Platform::Macos) if user.is_some() => Scope::Agent,
        ("agent", Platform::Macos) => {
            diags.push(
                fields
                    .diag(line, "`scope: agent` needs `user`: whose LaunchAgents")
                    .hint("add user: NAME"),
            );
            Scope::System
        }
        ("agent", Platform::Linux) => {
            diags.push(
                fields
                    .diag(line, "`scope: agent` is a launchd (macos) setting; systemd services here are system units")
                    .hint("remove `scope`, and set `user` to run the service as that user"),
            );
            Scope::System
        }
        (other, _) => {
            diags.push(
                fields
                    .diag(
                        line,
                        format!("`scope: {other}` is not one of system, agent"),
                    )
                    .hint("use system (LaunchDaemons) or agent (a user's LaunchAgents)"),
            );
            Scope::System
        }
    }
}

/// One generated file: where, what, and its mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenFile {
    /// `unit`, `timer` or `plist`: the field name in plans.
    pub field: &'static str,
    pub path: PathBuf,
    pub content: Vec<u8>,
    pub mode: u32,
    /// Owner and group names to enforce (outside sandbox mode).
    pub owner: Option<String>,
    pub group: Option<String>,
}

/// What the service manager says (outside sandbox mode).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Managed {
    /// Known to the manager (systemd: a unit file loaded; launchd: loaded).
    pub loaded: bool,
    /// Running (a schedule: its timer is active / the job is loaded).
    pub active: bool,
    /// `ActiveState/SubState` or launchd's `state`, for messages.
    pub state: String,
    pub enabled: bool,
    pub pid: Option<u32>,
}

/// The observed host.
#[derive(Debug)]
struct Live {
    /// Per generated file (same order): its meta and content.
    files: Vec<(Option<Meta>, Option<Vec<u8>>)>,
    managed: Option<Managed>,
}

/// A desired service or schedule, with its generated files.
#[derive(Debug)]
pub struct Unit {
    pub spec: Spec,
    platform: Platform,
    files: Vec<GenFile>,
}

impl Unit {
    pub fn new(spec: Spec, platform: Platform) -> Unit {
        let files = match platform {
            Platform::Linux => systemd::files(&spec),
            Platform::Macos => launchd::files(&spec),
        };
        Unit {
            spec,
            platform,
            files,
        }
    }

    /// The generated files (for tests, `agent install-service`).
    pub fn files(&self) -> &[GenFile] {
        &self.files
    }

    fn start_timeout(&self) -> Duration {
        match self.spec.job {
            Job::Service { start_timeout, .. } => start_timeout,
            Job::Schedule { .. } => Duration::from_secs(30),
        }
    }

    fn attrs(&self, f: &GenFile, host: &Host) -> Result<Attrs, ResourceError> {
        let own = host.ownership(f.owner.as_deref(), f.group.as_deref())?;
        Ok(Attrs {
            mode: f.mode,
            uid: own.uid,
            gid: own.gid,
        })
    }
}

impl Resource for Unit {
    fn kind(&self) -> &'static str {
        if self.spec.is_schedule() {
            "schedule"
        } else {
            "service"
        }
    }

    fn identity(&self) -> &str {
        &self.spec.name
    }

    fn path(&self) -> Option<&Path> {
        None
    }

    fn claimed_paths(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    fn rendered(&self) -> Vec<(&Path, &[u8])> {
        self.files
            .iter()
            .map(|f| (f.path.as_path(), f.content.as_slice()))
            .collect()
    }

    fn digest(&self, h: &mut blake3::Hasher) {
        for f in &self.files {
            h.update(f.path.as_os_str().as_encoded_bytes());
            h.update(b"\0");
            h.update(&(f.content.len() as u64).to_le_bytes());
            h.update(&f.content);
            h.update(&f.mode.to_le_bytes());
        }
        let running = matches!(self.spec.job, Job::Service { running: true, .. });
        h.update(&[u8::from(self.spec.enabled), u8::from(running)]);
    }

    fn as_startable(&self) -> Option<&dyn super::Startable> {
        Some(self)
    }

    fn as_restorable(&self) -> Option<&dyn super::Restorable> {
        Some(self)
    }

    fn sandbox_note(&self) -> Option<&'static str> {
        Some(match self.platform {
            Platform::Linux => "files only: systemctl is not called in sandbox mode",
            Platform::Macos => "files only: launchctl is not called in sandbox mode",
        })
    }

    fn observe(&self, host: &Host) -> Result<Observation, ResourceError> {
        let mut files = Vec::with_capacity(self.files.len());
        for f in &self.files {
            match host.fs.read_file(&f.path)? {
                Some((meta, content)) => files.push((Some(meta), content)),
                None => files.push((None, None)),
            }
        }
        let managed = if host.sandbox {
            None
        } else {
            Some(match host.platform {
                Platform::Linux => systemd::observe(&self.spec, host)?,
                Platform::Macos => launchd::observe(&self.spec, host)?,
            })
        };
        let exists =
            files.iter().any(|(m, _)| m.is_some()) || managed.as_ref().is_some_and(|m| m.loaded);
        Ok(Observation::new(exists, Live { files, managed }))
    }

    fn diff(&self, live: &Observation, host: &Host) -> Vec<FieldChange> {
        let live: &Live = live.get();
        let mut out = Vec::new();
        for (f, (meta, content)) in self.files.iter().zip(&live.files) {
            let old = content.as_deref();
            if old != Some(f.content.as_slice()) {
                let mut change = FieldChange::new(
                    f.field,
                    old.map(super::file::describe),
                    Some(super::file::describe(&f.content)),
                );
                change.diff = super::file::unified_diff(
                    old.unwrap_or_default(),
                    &f.content,
                    &f.path.to_string_lossy(),
                );
                out.push(change);
            } else if let Some(m) = meta {
                let want = self.attrs(f, host).ok();
                let bad_owner = want.is_some_and(|w| {
                    w.uid.is_some_and(|u| u != m.uid) || w.gid.is_some_and(|g| g != m.gid)
                });
                if m.mode != f.mode || bad_owner {
                    out.push(FieldChange::new(
                        f.field,
                        Some(format!("mode {:04o}, owner {}:{}", m.mode, m.uid, m.gid)),
                        Some(format!(
                            "mode {:04o}, owner {}:{}",
                            f.mode,
                            f.owner.as_deref().unwrap_or("-"),
                            f.group.as_deref().unwrap_or("-")
                        )),
                    ));
                }
            }
        }
        if let Some(m) = &live.managed {
            let want_active = match self.spec.job {
                Job::Service { running, .. } => running,
                Job::Schedule { .. } => self.spec.enabled,
            };
            if m.active != want_active {
                let (field, on, off) = if self.spec.is_schedule() {
                    ("timer state", "active", "inactive")
                } else {
                    ("state", "running", "stopped")
                };
                out.push(FieldChange::new(
                    field,
                    Some(format!("{} ({})", if m.active { on } else { off }, m.state)),
                    Some(if want_active { on } else { off }.to_string()),
                ));
            }
            if m.enabled != self.spec.enabled {
                out.push(FieldChange::new(
                    "enabled",
                    Some(m.enabled.to_string()),
                    Some(self.spec.enabled.to_string()),
                ));
            }
        }
        out
    }

    fn apply(
        &self,
        live: &Observation,
        changes: &[FieldChange],
        ctx: &mut ApplyCtx<'_>,
    ) -> Result<(), ResourceError> {
        let live: &Live = live.get();
        let host = ctx.host;
        let changed: Vec<&GenFile> = self
            .files
            .iter()
            .filter(|f| changes.iter().any(|c| c.field == f.field))
            .collect();
        if !changed.is_empty() && !host.sandbox && self.platform == Platform::Linux {
            systemd::verify(&self.files, host)?;
        }
        if !host.sandbox && self.platform == Platform::Macos && !changed.is_empty() {
            // A loaded job keeps its old plist until it is booted out.
            launchd::unload_for_update(&self.spec, host, live.managed.as_ref())?;
        }
        for f in &changed {
            if let Some(parent) = f.path.parent() {
                if host.fs.meta(parent)?.is_none() {
                    host.fs.create_dir_all(
                        parent,
                        Attrs {
                            mode: 0o755,
                            uid: None,
                            gid: None,
                        },
                    )?;
                }
            }
            ctx.write_now(&f.path, &f.content, self.attrs(f, host)?)?;
        }
        if host.sandbox {
            return Ok(());
        }
        let managed = live.managed.clone().unwrap_or_default();
        let files_changed = !changed.is_empty();
        let started = match self.platform {
            Platform::Linux => systemd::converge(&self.spec, host, &managed, files_changed)?,
            Platform::Macos => launchd::converge(&self.spec, host, &managed, files_changed)?,
        };
        if started {
            ctx.mark_started();
        }
        Ok(())
    }
}

impl super::Startable for Unit {
    fn accepts_notify(&self) -> bool {
        !self.spec.is_schedule()
    }

    fn notified(&self, host: &Host) -> Result<bool, ResourceError> {
        if host.sandbox {
            return Ok(false);
        }
        let Job::Service { running: true, .. } = self.spec.job else {
            return Ok(false);
        };
        match self.platform {
            Platform::Linux => systemd::restart(&self.spec, host)?,
            Platform::Macos => launchd::restart(&self.spec, host)?,
        }
        Ok(true)
    }

    fn wait_up(&self, host: &Host) -> Result<(), ResourceError> {
        if host.sandbox {
            return Ok(());
        }
        let Job::Service { running: true, .. } = self.spec.job else {
            return Ok(());
        };
        let timeout = self.start_timeout();
        match self.platform {
            Platform::Linux => systemd::wait_up(&self.spec, host, timeout),
            Platform::Macos => launchd::wait_up(&self.spec, host, timeout),
        }
        .map_err(|e| ResourceError::NotUp(Box::new(e)))
    }
}

impl super::Restorable for Unit {
    fn restore(&self, live: &Observation, host: &Host) -> Result<(), ResourceError> {
        let live: &Live = live.get();
        let mut reload = false;
        for (f, (meta, content)) in self.files.iter().zip(&live.files) {
            if content.as_deref() == Some(f.content.as_slice()) {
                continue;
            }
            reload = true;
            match (meta, content) {
                (Some(m), Some(old)) => {
                    let staged = host.fs.stage_file(
                        &f.path,
                        old,
                        Attrs {
                            mode: m.mode,
                            uid: Some(m.uid),
                            gid: Some(m.gid),
                        },
                    )?;
                    for r in host.fs.commit(vec![staged]) {
                        r?;
                    }
                }
                _ => host.fs.remove_file(&f.path)?,
            }
        }
        if reload && !host.sandbox && self.platform == Platform::Linux {
            host.run_ok(&systemd::systemctl(["daemon-reload"]))?;
        }
        Ok(())
    }
}

/// Reads a `Key=value` listing (`systemctl show`).
pub(crate) fn key_values(text: &str) -> BTreeMap<&str, &str> {
    text.lines().filter_map(|l| l.split_once('=')).collect()
}

/// Why a (re)started service is not up.
#[derive(Debug, thiserror::Error)]
pub enum NotUp {
    #[error("not up within its start timeout of {}s (last state: {last})", timeout.as_secs())]
    Timeout { timeout: Duration, last: String },
    #[error("{unit} failed ({state}, result {result}); see `journalctl -u {unit}`")]
    UnitFailed {
        unit: String,
        state: String,
        result: String,
    },
    #[error("{target} is not loaded: {message}")]
    NotLoaded { target: String, message: String },
    /// Its state could not be read.
    #[error(transparent)]
    Check(Box<ResourceError>),
}

impl<E: Into<ResourceError>> From<E> for NotUp {
    fn from(e: E) -> NotUp {
        NotUp::Check(Box::new(e.into()))
    }
}

/// Polls `check` every 100 ms until it says up for `settle` in a row, says
/// failed, or `timeout` passes.
pub(crate) fn poll_up(
    timeout: Duration,
    settle: Duration,
    mut check: impl FnMut() -> Result<Option<String>, NotUp>,
) -> Result<(), NotUp> {
    let start = std::time::Instant::now();
    let mut up_since: Option<std::time::Instant> = None;
    let mut last = String::from("not checked");
    loop {
        match check() {
            Err(fatal) => return Err(fatal),
            Ok(None) => {
                let since = *up_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= settle {
                    return Ok(());
                }
            }
            Ok(Some(state)) => {
                up_since = None;
                last = state;
            }
        }
        if start.elapsed() >= timeout {
            return Err(NotUp::Timeout { timeout, last });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How long a service must stay up after a (re)start to count as started:
/// a config error usually kills it within a second.
pub(crate) fn settle_for(timeout: Duration) -> Duration {
    (timeout / 2).min(Duration::from_secs(2))
}

#[cfg(test)]
mod tests;
