//! Resource kinds: one trait, one registry.
//!
//! A kind ([`Kind`]) parses its fields from module YAML into a
//! [`Resource`]; a resource *observes* the live host, *diffs* (pure) the
//! desired spec against that observation into typed [`FieldChange`]s, and
//! *applies* exactly those changes. `plan` is observe + diff and never
//! writes. The engine only ever sees these traits, so a new kind is its own
//! module plus one line in [`REGISTRY`].
//!
//! Kinds that write files stage them through [`ApplyCtx::stage_file`], which
//! lets the engine batch durability (see `fsops`).

use std::any::Any;
use std::collections::HashMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::fsops::{Attrs, Fs, FsError, Staged};
use crate::syntax::diag::{Diagnostic, Diagnostics};
use crate::syntax::yaml::MapReader;

pub mod absent;
pub mod directory;
pub mod exec;
pub mod file;
pub mod package;
pub mod service;
pub mod symlink;

/// Every kind the agent knows. The one list: parser, help and engine read it.
pub static REGISTRY: &[&dyn Kind] = &[
    &file::FileKind,
    &directory::DirectoryKind,
    &symlink::SymlinkKind,
    &absent::AbsentKind,
    &service::ServiceKind,
    &service::ScheduleKind,
    &package::PackageKind,
];

/// Finds a kind by name.
pub fn kind(name: &str) -> Option<&'static dyn Kind> {
    REGISTRY.iter().copied().find(|k| k.name() == name)
}

/// What a resource's identity is: decides the validation it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    /// An absolute host path: normalised, checked against the host's roots,
    /// ordered after its nearest parent directory resource.
    Path,
    /// A name (service label, package): letters, digits and `._@+-`,
    /// starting with a letter or digit, at most 128 characters.
    Name,
}

/// Whether `name` is a valid [`IdentityKind::Name`].
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@+-".contains(c))
}

/// Module files a kind may read while parsing (`template:`, `source:`).
pub trait Assets {
    /// Renders `templates/<name>` of the module with the resource's context.
    fn template(&self, name: &str, line: usize) -> Result<String, Diagnostic>;
    /// Reads `files/<name>` of the module verbatim.
    fn file(&self, name: &str, line: usize) -> Result<Vec<u8>, Diagnostic>;
}

/// What a kind's parser gets: the identity (already validated), the
/// resource's remaining fields, and the module's assets.
pub struct ParseInput<'a, 'r> {
    pub id: &'a str,
    /// The host's platform (kinds with per-platform backends validate for it).
    pub platform: Platform,
    pub identity: &'a str,
    pub fields: &'a mut MapReader<'r>,
    pub assets: &'a dyn Assets,
    pub diags: &'a mut Diagnostics,
}

/// A kind of resource (`file`, `directory`, ...).
pub trait Kind: Sync {
    /// The YAML key and id prefix.
    fn name(&self) -> &'static str;
    /// One line for `--help` and the reference docs.
    fn doc(&self) -> &'static str;
    fn identity_kind(&self) -> IdentityKind;
    /// The kind's own keys (the engine adds `after`, `notify`, `on_drift`, `when`).
    fn fields(&self) -> &'static [&'static str];
    /// Parses the fields; pushes diagnostics and returns `None` on error.
    fn parse(&self, input: ParseInput<'_, '_>) -> Option<Box<dyn Resource>>;
    /// Undoes a resource the agent created that left the catalog. Only
    /// called for inventory entries with origin `created`.
    fn prune(&self, identity: &str, host: &Host) -> Result<PruneOutcome, ResourceError>;
}

/// What pruning did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PruneOutcome {
    Removed,
    AlreadyGone,
    /// Kept on the host (e.g. a directory that still holds files); the agent
    /// stops managing it.
    LeftInPlace(String),
}

/// Prunes a file or symlink: removed only while it is still of the kind
/// the agent made; anything else put there since is left alone.
pub fn prune_if(
    host: &Host,
    path: &Path,
    kind: crate::fsops::FileKind,
) -> Result<PruneOutcome, ResourceError> {
    match host.fs.meta(path)? {
        None => Ok(PruneOutcome::AlreadyGone),
        Some(m) if m.kind == kind => {
            host.fs.remove_file(path)?;
            Ok(PruneOutcome::Removed)
        }
        Some(m) => Ok(PruneOutcome::LeftInPlace(format!(
            "it is now a {}",
            m.kind.name()
        ))),
    }
}

/// One desired resource, parsed and ready to observe.
pub trait Resource: Send + Sync + Debug {
    fn kind(&self) -> &'static str;
    fn identity(&self) -> &str;
    /// The host path this resource manages, if any (for roots and ordering).
    fn path(&self) -> Option<&Path>;
    /// Every host path it writes (its own path, or the unit files a service
    /// generates): two resources may not claim one path.
    fn claimed_paths(&self) -> Vec<&Path> {
        self.path().into_iter().collect()
    }
    /// The bytes this resource writes, by host path (a file's content, a
    /// service's unit files): for checks of a whole homelab's rendered
    /// configuration (`tests/tests/reference_coherence.rs`). A file's
    /// content holds its secret values: never print it.
    fn rendered(&self) -> Vec<(&Path, &[u8])> {
        Vec::new()
    }
    /// Feeds every desired field into the digest recorded in the inventory.
    fn digest(&self, hasher: &mut blake3::Hasher);
    /// Reads the live state. Never writes.
    fn observe(&self, host: &Host) -> Result<Observation, ResourceError>;
    /// Pure: what differs between desired and `live`. Empty means in sync.
    fn diff(&self, live: &Observation, host: &Host) -> Vec<FieldChange>;
    /// Hands the resource the secret values its rendering used (so it can
    /// pick a private default mode) and its content rendered with every
    /// secret masked (the only view of it plans may show; `None`: show
    /// none). Kinds that never hold secrets ignore it.
    fn set_secrets(&mut self, _values: Vec<crate::secrets::SecretValue>, _masked: Option<Vec<u8>>) {
    }
    /// What sandbox mode (`--root`) leaves out for this resource, for the
    /// plan: e.g. "files only: launchctl/systemctl are not called".
    fn sandbox_note(&self) -> Option<&'static str> {
        None
    }
    /// The capability of being started, restarted on notification and
    /// waited for (services); `None` for everything else.
    fn as_startable(&self) -> Option<&dyn Startable> {
        None
    }
    /// The capability of being put back as observed (rollback); `None`
    /// when the kind cannot be rolled back.
    fn as_restorable(&self) -> Option<&dyn Restorable> {
        None
    }
    /// Whether its desired state holds secret values.
    fn holds_secrets(&self) -> bool {
        false
    }
    /// Makes exactly `changes` true on the host.
    fn apply(
        &self,
        live: &Observation,
        changes: &[FieldChange],
        ctx: &mut ApplyCtx<'_>,
    ) -> Result<(), ResourceError>;
}

/// What only services can do: restart when notified, and be waited for.
pub trait Startable {
    /// Whether `notify: [this]` is allowed (a service restarts on it; a
    /// schedule does not).
    fn accepts_notify(&self) -> bool;
    /// A resource that notifies this one changed: restart it (once per
    /// run). Returns whether it restarted (a stopped service does not).
    fn notified(&self, host: &Host) -> Result<bool, ResourceError>;
    /// After a start or restart this run: waits until it is up, within its
    /// start timeout.
    fn wait_up(&self, host: &Host) -> Result<(), ResourceError>;
}

/// What kinds that can be rolled back do (files, services).
pub trait Restorable {
    /// Puts back what `live` observed before this run changed it.
    fn restore(&self, live: &Observation, host: &Host) -> Result<(), ResourceError>;
}

/// A kind's view of the live state, type-erased for the engine.
#[derive(Debug)]
pub struct Observation {
    /// Whether the object exists at all (decides *create* vs *change*).
    pub exists: bool,
    live: Box<dyn Any + Send + Sync>,
}

impl Observation {
    pub fn new<T: Any + Send + Sync>(exists: bool, live: T) -> Observation {
        Observation {
            exists,
            live: Box::new(live),
        }
    }

    /// The kind's own observed value. Panics if a kind is handed another
    /// kind's observation, which the engine never does.
    pub fn get<T: Any>(&self) -> &T {
        self.live
            .downcast_ref()
            .expect("observation handed to the kind that made it")
    }
}

/// One field that differs: `mode: 0644 -> 0640`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldChange {
    pub field: &'static str,
    pub old: Option<String>,
    pub new: Option<String>,
    /// A unified diff, for content.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
}

impl FieldChange {
    pub fn new(field: &'static str, old: Option<String>, new: Option<String>) -> FieldChange {
        FieldChange {
            field,
            old,
            new,
            diff: None,
        }
    }
}

/// Errors observing, applying or pruning one resource.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Exec(#[from] exec::ExecError),
    /// The kind cannot be rolled back (it has no `Restorable`).
    #[error("{kind} cannot be rolled back")]
    NotRestorable { kind: &'static str },
    /// What was there before this run is not something the kind can put back.
    #[error("{} was not a regular file before; it cannot be put back", path.display())]
    CannotPutBack { path: PathBuf },
    /// A scratch file of the agent's own (a unit being verified).
    #[error("cannot write {}: {error}", path.display())]
    Scratch {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Package(#[from] package::PackageError),
    #[error("`{command}` failed ({}): {message}", code.map_or("killed".to_string(), |c| format!("exit {c}")))]
    Command {
        command: String,
        code: Option<i32>,
        message: String,
    },
    /// A file's `validate:` command refused the rendered file (or could not
    /// run); the live file was not touched.
    #[error("validate: `{command}` {status}{output}\n  {path} was left untouched (the rendered file was checked as a temp file, now removed); {hint}")]
    Validate {
        path: PathBuf,
        command: String,
        /// `failed (exit 1)`, `timed out after 30s`, `could not start: ...`.
        status: String,
        /// The tool's own message (`:\n    ...`), or why it is not shown.
        output: String,
        hint: String,
    },
    /// A (re)started service did not come up.
    #[error(transparent)]
    NotUp(Box<service::NotUp>),
    #[error("user `{0}` does not exist on this host\n  create the user first, or change `owner`")]
    UnknownUser(String),
    /// The desired state is for another platform than this machine's: its
    /// users and groups (and packages and services) are not this machine's.
    #[error("{0}")]
    OtherPlatform(OtherPlatform),
    #[error(
        "group `{0}` does not exist on this host\n  create the group first, or change `group`"
    )]
    UnknownGroup(String),
    #[error("{path} is a {found}; refusing to replace it with a {wanted}\n  move it away by hand, or declare an `absent` resource for it first")]
    WrongType {
        path: PathBuf,
        found: &'static str,
        wanted: &'static str,
    },
    #[error("{path} is a directory that is not empty; `absent` removes only files, links and empty directories")]
    DirectoryNotEmpty { path: PathBuf },
}

/// The platform of the managed host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Macos,
    Linux,
}

/// A host of one platform looked at from a machine of another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherPlatform {
    /// The host's name (empty where it is not known).
    pub host: String,
    pub platform: Platform,
    pub machine: Platform,
}

impl std::fmt::Display for OtherPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = if self.host.is_empty() {
            "this host".to_string()
        } else {
            format!("host {}", self.host)
        };
        write!(
            f,
            "{host} is a {} host and this machine runs {}: its users, groups, packages and services cannot be checked here\n  plan it in a sandbox, where ownership is not enforced (`--root /tmp/lab`), or run the agent on the host itself",
            self.platform.display_name(),
            self.machine.display_name()
        )
    }
}

impl std::error::Error for OtherPlatform {}

impl Platform {
    /// The platform of the machine the agent runs on (the one it was built
    /// for); `None` on any other (the agent manages macOS and Linux only).
    pub fn this_machine() -> Option<Platform> {
        if cfg!(target_os = "macos") {
            Some(Platform::Macos)
        } else if cfg!(target_os = "linux") {
            Some(Platform::Linux)
        } else {
            None
        }
    }

    /// `macOS`, `Linux`: for messages.
    pub fn display_name(self) -> &'static str {
        match self {
            Platform::Macos => "macOS",
            Platform::Linux => "Linux",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Platform::Macos => "macos",
            Platform::Linux => "linux",
        }
    }
}

/// The live host as resources see it.
pub struct Host {
    pub fs: Fs,
    /// `--root` given: paths live under a sandbox; ownership is not enforced
    /// (the sandbox's users are not the host's).
    pub sandbox: bool,
    pub platform: Platform,
    /// How host tools (`systemctl`, `launchctl`, `apt-get`, ...) are run.
    pub runner: std::sync::Arc<dyn exec::Runner>,
    ids: Mutex<HashMap<(bool, String), Option<u32>>>,
    /// Warnings given so far (a Host lives for one run): see [`Host::warn_once`].
    warnings: Mutex<Vec<(&'static str, String)>>,
}

impl Host {
    pub fn new(fs: Fs, sandbox: bool, platform: Platform) -> Host {
        Host {
            fs,
            sandbox,
            platform,
            runner: std::sync::Arc::new(exec::SystemRunner),
            ids: Mutex::new(HashMap::new()),
            warnings: Mutex::new(Vec::new()),
        }
    }

    /// Says `message` once per run for `key` (a missing optional tool, say),
    /// however many resources run into it: to the daemon's log when it has
    /// one, else on stderr. Returns whether it was said now.
    pub fn warn_once(&self, key: &'static str, message: &str) -> bool {
        let mut warnings = self.warnings.lock().unwrap_or_else(|e| e.into_inner());
        if warnings.iter().any(|(k, _)| *k == key) {
            return false;
        }
        warnings.push((key, message.to_string()));
        if tracing::dispatcher::has_been_set() {
            tracing::warn!(tool = key, "{message}");
        } else {
            eprintln!("warning: {message}");
        }
        true
    }

    /// The warnings of this run, in the order they were given.
    pub fn warnings(&self) -> Vec<String> {
        let warnings = self.warnings.lock().unwrap_or_else(|e| e.into_inner());
        warnings.iter().map(|(_, m)| m.clone()).collect()
    }

    /// Runs host tools through `runner` (tests record the commands).
    pub fn with_runner(mut self, runner: std::sync::Arc<dyn exec::Runner>) -> Host {
        self.runner = runner;
        self
    }

    /// Runs `cmd`; a non-zero exit is [`ResourceError::Command`] with the
    /// tool's own message.
    pub fn run_ok(&self, cmd: &exec::Cmd) -> Result<exec::Output, ResourceError> {
        let out = self.runner.run(cmd)?;
        if out.success() {
            Ok(out)
        } else {
            Err(ResourceError::Command {
                command: cmd.line(),
                code: out.code,
                message: out.message(),
            })
        }
    }

    /// Resolves a user (`group == false`) or group name, cached per run.
    /// A number is taken as an id.
    fn resolve(&self, group: bool, name: &str) -> Option<u32> {
        if let Ok(n) = name.parse() {
            return Some(n);
        }
        let key = (group, name.to_string());
        if let Some(v) = self.ids.lock().unwrap().get(&key) {
            return *v;
        }
        let id = if group {
            nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw())
        } else {
            nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .map(|u| u.uid.as_raw())
        };
        self.ids.lock().unwrap().insert(key, id);
        id
    }

    /// Refuses to look at a host of another platform than this machine's
    /// (outside a sandbox): every owner, group, package and service of it
    /// would fail on its own. Callers check once, before observing, and say
    /// it once.
    pub fn check_platform(&self, host: &str) -> Result<(), OtherPlatform> {
        match Platform::this_machine() {
            Some(machine) if !self.sandbox && machine != self.platform => Err(OtherPlatform {
                host: host.to_string(),
                platform: self.platform,
                machine,
            }),
            _ => Ok(()),
        }
    }

    /// The ownership to enforce for `owner`/`group`, `None` in sandbox mode.
    /// A name that does not resolve on a machine of another platform than
    /// the host's is the error that says so ([`Host::check_platform`]), not
    /// "user does not exist".
    pub fn ownership(
        &self,
        owner: Option<&str>,
        group: Option<&str>,
    ) -> Result<Ownership, ResourceError> {
        if self.sandbox {
            return Ok(Ownership::default());
        }
        // A name missing here is no news on a machine of another platform.
        let missing = |e: ResourceError| match self.check_platform("") {
            Err(other) => ResourceError::OtherPlatform(other),
            Ok(()) => e,
        };
        let uid = owner
            .map(|o| {
                self.resolve(false, o)
                    .ok_or_else(|| missing(ResourceError::UnknownUser(o.into())))
            })
            .transpose()?;
        let gid = group
            .map(|g| {
                self.resolve(true, g)
                    .ok_or_else(|| missing(ResourceError::UnknownGroup(g.into())))
            })
            .transpose()?;
        Ok(Ownership { uid, gid })
    }
}

/// Resolved owner and group ids; `None` fields are left as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ownership {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// What `apply` may do besides direct calls on `host.fs`.
pub struct ApplyCtx<'h> {
    pub host: &'h Host,
    staged: Vec<Staged>,
    started: bool,
}

impl<'h> ApplyCtx<'h> {
    pub fn new(host: &'h Host) -> ApplyCtx<'h> {
        ApplyCtx {
            host,
            staged: Vec::new(),
            started: false,
        }
    }

    /// Writes a file now (staged, made durable, renamed), for kinds that
    /// must see it in place before their next step (a unit file before
    /// `daemon-reload`).
    pub fn write_now(
        &self,
        path: &Path,
        content: &[u8],
        attrs: Attrs,
    ) -> Result<(), ResourceError> {
        let staged = self.host.fs.stage_file(path, content, attrs)?;
        self.host
            .fs
            .commit(vec![staged])
            .into_iter()
            .next()
            .unwrap_or(Ok(()))
            .map_err(Into::into)
    }

    /// Says that this resource started or restarted a service: the engine
    /// then waits for it to come up and does not restart it again for a
    /// notification this run.
    pub fn mark_started(&mut self) {
        self.started = true;
    }

    /// Whether the last resource applied marked itself started; resets it.
    pub fn take_started(&mut self) -> bool {
        std::mem::take(&mut self.started)
    }

    /// Writes a file's new content to a temp file; the engine renames it
    /// into place when it commits the batch.
    pub fn stage_file(
        &mut self,
        path: &Path,
        content: &[u8],
        attrs: Attrs,
    ) -> Result<(), ResourceError> {
        self.staged
            .push(self.host.fs.stage_file(path, content, attrs)?);
        Ok(())
    }

    /// [`ApplyCtx::stage_file`], then `check` on the temp file (its host
    /// path; already with the final owner and mode) before it joins the
    /// batch. When `check` fails the temp file is removed and the live file
    /// is left exactly as it was.
    pub fn stage_file_checked(
        &mut self,
        path: &Path,
        content: &[u8],
        attrs: Attrs,
        check: impl FnOnce(&Host, &Path) -> Result<(), ResourceError>,
    ) -> Result<(), ResourceError> {
        let staged = self.host.fs.stage_file(path, content, attrs)?;
        let at = self.host.fs.staged_path(&staged);
        match check(self.host, &at) {
            Ok(()) => {
                self.staged.push(staged);
                Ok(())
            }
            Err(e) => {
                // The check's error is the one worth reporting; a temp file
                // that cannot be removed is cleaned by the next write here.
                let _ = self.host.fs.discard(staged);
                Err(e)
            }
        }
    }

    /// Files staged so far, handed to the engine's batch.
    pub fn take_staged(&mut self) -> Vec<Staged> {
        std::mem::take(&mut self.staged)
    }
}

/// `0640` for messages.
pub fn fmt_mode(mode: u32) -> String {
    format!("{mode:04o}")
}

/// Mode, owner and group of a file or directory: parsed, digested, diffed
/// and turned into [`Attrs`] the same way for every kind that has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Perms {
    pub mode: u32,
    pub owner: Option<String>,
    pub group: Option<String>,
}

impl Perms {
    /// Reads `mode` (a quoted octal string such as `"0640"`), `owner` and `group`.
    pub fn parse(fields: &mut MapReader<'_>, diags: &mut Diagnostics, default_mode: u32) -> Perms {
        let mode = parse_mode(fields, diags).unwrap_or(default_mode);
        let owner = fields.string("owner", diags).map(|s| s.0);
        let group = fields.string("group", diags).map(|s| s.0);
        Perms { mode, owner, group }
    }

    pub fn digest(&self, h: &mut blake3::Hasher) {
        h.update(&self.mode.to_le_bytes());
        h.update(self.owner.as_deref().unwrap_or("").as_bytes());
        h.update(b"\0");
        h.update(self.group.as_deref().unwrap_or("").as_bytes());
    }

    /// Resolves owner and group on `host` (nothing enforced in a sandbox).
    pub fn resolve(&self, host: &Host) -> Result<Ownership, ResourceError> {
        host.ownership(self.owner.as_deref(), self.group.as_deref())
    }

    /// What to give the object: this mode and the resolved ids.
    pub fn attrs(&self, want: Ownership) -> Attrs {
        Attrs {
            mode: self.mode,
            uid: want.uid,
            gid: want.gid,
        }
    }

    /// Pushes `mode`, `owner`, `group` changes against `meta` (`None`: the
    /// object is missing or of another type).
    pub fn diff(
        &self,
        meta: Option<&crate::fsops::Meta>,
        want: Ownership,
        out: &mut Vec<FieldChange>,
    ) {
        if meta.map(|m| m.mode) != Some(self.mode) {
            out.push(FieldChange::new(
                "mode",
                meta.map(|m| fmt_mode(m.mode)),
                Some(fmt_mode(self.mode)),
            ));
        }
        if let Some(uid) = want.uid {
            if meta.map(|m| m.uid) != Some(uid) {
                out.push(FieldChange::new(
                    "owner",
                    meta.map(|m| m.uid.to_string()),
                    Some(format!(
                        "{} ({uid})",
                        self.owner.as_deref().unwrap_or_default()
                    )),
                ));
            }
        }
        if let Some(gid) = want.gid {
            if meta.map(|m| m.gid) != Some(gid) {
                out.push(FieldChange::new(
                    "group",
                    meta.map(|m| m.gid.to_string()),
                    Some(format!(
                        "{} ({gid})",
                        self.group.as_deref().unwrap_or_default()
                    )),
                ));
            }
        }
    }
}

/// Parses a quoted octal mode such as `"0640"`.
fn parse_mode(fields: &mut MapReader<'_>, diags: &mut Diagnostics) -> Option<u32> {
    let node = fields.take("mode")?;
    let bad = |fields: &MapReader<'_>, what: String| {
        fields.diag(
            node.line,
            format!("`mode` must be a quoted octal string such as \"0640\", found {what}"),
        )
    };
    match node.as_str() {
        Some(s) if (3..=4).contains(&s.len()) && s.chars().all(|c| ('0'..='7').contains(&c)) => {
            u32::from_str_radix(s, 8).ok()
        }
        Some(s) => {
            diags.push(bad(fields, format!("\"{s}\"")));
            None
        }
        None => {
            diags.push(
                bad(fields, node.value.type_name().to_string())
                    .hint("YAML reads an unquoted 0640 as a number; write mode: \"0640\""),
            );
            None
        }
    }
}
