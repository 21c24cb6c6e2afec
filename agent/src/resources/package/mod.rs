//! `package`: a system package installed, kept at the newest version the
//! host's package index knows, or removed, through the platform's package
//! manager: apt/dpkg on Linux (`apt.rs`), Homebrew on macOS (`brew.rs`,
//! formulae and casks). The kind owns validation, the diff and the choice of
//! backend; the backends own the command lines.
//!
//! What is supported:
//! - `state: present` (default) installs when missing; `latest` also
//!   upgrades when the index has a newer version; `absent` removes
//!   (apt: `remove`, configuration files stay; Homebrew: `uninstall`).
//! - `version` (with `present` only): on apt an exact version
//!   (`apt-get install NAME=VERSION`, downgrades allowed); on Homebrew the
//!   versioned formula `NAME@VERSION` (e.g. `postgresql` + `version: "15"`
//!   is `postgresql@15`), which must exist: Homebrew cannot install other
//!   exact versions, and casks have none.
//! - `cask: true`: a Homebrew cask (macOS only; rejected at validation on
//!   Linux).
//!
//! Index freshness is the host's: `latest` compares with what the local
//! index says (`apt-cache policy`, `brew info`), refreshed by apt's daily
//! timer or `brew update`. Plans never refresh it (plan never writes);
//! apply runs `apt-get update` once and retries when apt does not know a
//! package or version yet.
//!
//! Sandbox mode (`--root`) never calls a package manager: the resource
//! reads as in sync with the note [`SANDBOX_NOTE`].
//!
//! Prune removes only packages the agent installed (origin `created`; one
//! present before is adopted and forgotten). It knows only the name, so a
//! Homebrew package pinned with `version` (formula `NAME@VERSION`) is not
//! found by prune: name the versioned formula itself (`package:
//! postgresql@15`) when it should be pruned.

use super::{
    ApplyCtx, FieldChange, Host, IdentityKind, Kind, Observation, ParseInput, Platform,
    PruneOutcome, Resource, ResourceError,
};
use crate::syntax::yaml::Value;

mod apt;
mod brew;

pub use brew::Brew;

/// What the plan says about a package in sandbox mode.
pub const SANDBOX_NOTE: &str = "not checked: package managers are skipped in sandbox mode (--root)";

pub struct PackageKind;

/// The desired `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    Present,
    Latest,
    Absent,
}

impl Wanted {
    fn name(self) -> &'static str {
        match self {
            Wanted::Present => "present",
            Wanted::Latest => "latest",
            Wanted::Absent => "absent",
        }
    }
}

/// Errors from package managers beyond a failed command.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("Homebrew not found (looked at {searched})\n  install Homebrew (https://brew.sh), or remove the package resources from this host")]
    BrewNotFound { searched: String },
    #[error("Homebrew at {path} is owned by root, and Homebrew refuses to run as root\n  give the Homebrew prefix back to the user who installed it (chown -R USER)")]
    BrewOwnedByRoot { path: String },
    #[error("Homebrew has no formula `{formula}`\n  a `version` on macOS names a versioned formula (such as postgresql@15 or python@3.12); `brew search {name}@` lists them; Homebrew cannot install other exact versions")]
    NoVersionedFormula { formula: String, name: String },
    #[error("cannot read `{command}` output: {detail}")]
    UnexpectedOutput { command: String, detail: String },
}

impl Kind for PackageKind {
    fn name(&self) -> &'static str {
        "package"
    }
    fn doc(&self) -> &'static str {
        "a system package, apt on Linux or Homebrew on macOS: state present | latest | absent (default present), version, cask (macOS)"
    }
    fn identity_kind(&self) -> IdentityKind {
        IdentityKind::Name
    }
    fn fields(&self) -> &'static [&'static str] {
        &["state", "version", "cask"]
    }

    fn parse(&self, input: ParseInput<'_, '_>) -> Option<Box<dyn Resource>> {
        let ParseInput {
            identity,
            platform,
            fields,
            diags,
            ..
        } = input;
        let before = diags.len();
        let state = match fields.string("state", diags) {
            None => Some((Wanted::Present, fields.line)),
            Some((s, line)) => match s.as_str() {
                "present" => Some((Wanted::Present, line)),
                "latest" => Some((Wanted::Latest, line)),
                "absent" => Some((Wanted::Absent, line)),
                other => {
                    diags.push(
                        fields
                            .diag(
                                line,
                                format!("`state` of a package must be present, latest or absent, found `{other}`"),
                            )
                            .hint("present: installed (any version); latest: installed and upgraded; absent: removed"),
                    );
                    None
                }
            },
        };
        let version = match fields.take("version") {
            None => None,
            Some(node) => match &node.value {
                Value::Str(v) if valid_version(v) => Some((v.clone(), node.line)),
                Value::Str(v) => {
                    diags.push(
                        fields
                            .diag(node.line, format!("`version: {v}` is not a package version"))
                            .hint("an exact version such as \"1.6-2.1\" or \"2:9.0.1378-2\": letters, digits and . + ~ : _ -"),
                    );
                    None
                }
                Value::Int(_) | Value::Float(_) => {
                    diags.push(
                        fields
                            .diag(
                                node.line,
                                "`version` must be a quoted string, found a number",
                            )
                            .hint("YAML reads 1.10 as the number 1.1; write version: \"1.10\""),
                    );
                    None
                }
                other => {
                    diags.push(fields.diag(
                        node.line,
                        format!("`version` must be a string, found {}", other.type_name()),
                    ));
                    None
                }
            },
        };
        let cask = match fields.take("cask") {
            None => None,
            Some(node) => match node.value {
                Value::Bool(b) => Some((b, node.line)),
                ref other => {
                    diags.push(fields.diag(
                        node.line,
                        format!("`cask` must be true or false, found {}", other.type_name()),
                    ));
                    None
                }
            },
        };
        if let Some((true, line)) = cask {
            if platform != Platform::Macos {
                diags.push(
                    fields
                        .diag(
                            line,
                            format!(
                                "`cask: true` is a Homebrew cask, which exists only on macOS; this host's platform is {}",
                                platform.name()
                            ),
                        )
                        .hint("remove `cask`, or limit the resource to macOS hosts with `when: host.platform == \"macos\"`"),
                );
            }
        }
        if let (Some((v, line)), Some((state, _))) = (&version, state) {
            if state != Wanted::Present {
                diags.push(
                    fields
                        .diag(
                            *line,
                            format!("`version: {v}` cannot be combined with `state: {}`", state.name()),
                        )
                        .hint(match state {
                            Wanted::Latest => "latest follows the newest version; a version pins one: keep one of them",
                            _ => "an absent package has no version: remove `version`",
                        }),
                );
            }
            if let Some((true, _)) = cask {
                diags.push(
                    fields
                        .diag(*line, "a Homebrew cask cannot be pinned to a version")
                        .hint("Homebrew installs casks at their current version only: remove `version`"),
                );
            }
        }
        if platform == Platform::Linux && !apt::valid_name(identity) {
            diags.push(
                fields
                    .diag(
                        fields.line,
                        format!("`package: {identity}` is not a Debian package name"),
                    )
                    .hint("Debian package names are lower-case letters, digits and + - . (at least two characters, starting with a letter or digit)"),
            );
        }
        if diags.len() > before {
            return None;
        }
        Some(Box::new(Package {
            name: identity.to_string(),
            state: state?.0,
            version: version.map(|v| v.0),
            cask: cask.is_some_and(|c| c.0),
            brew: None,
        }))
    }

    fn prune(&self, identity: &str, host: &Host) -> Result<PruneOutcome, ResourceError> {
        if host.sandbox {
            return Ok(PruneOutcome::LeftInPlace(
                "not removed: package managers are skipped in sandbox mode (--root)".into(),
            ));
        }
        match host.platform {
            Platform::Linux => apt::prune(host, identity),
            Platform::Macos => brew::prune(host, &Brew::locate_default()?, identity),
        }
    }
}

/// Exact versions: what dpkg and Homebrew formula suffixes allow.
fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~:_-".contains(c))
}

/// A desired package.
#[derive(Debug)]
pub struct Package {
    name: String,
    state: Wanted,
    version: Option<String>,
    cask: bool,
    /// Where Homebrew is and whom it runs as; located on use when `None`
    /// (tests give one).
    brew: Option<Brew>,
}

/// What is installed now, as the backend saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// `false` in sandbox mode: nothing was looked at.
    pub checked: bool,
    /// The installed version, `None` when not installed.
    pub installed: Option<String>,
    /// The version an install or upgrade would bring, when the backend
    /// looked (missing packages; `latest`).
    pub candidate: Option<String>,
    /// `latest`: the candidate is newer than the installed version.
    pub outdated: bool,
}

impl Live {
    fn not_checked() -> Live {
        Live {
            checked: false,
            installed: None,
            candidate: None,
            outdated: false,
        }
    }
}

impl Package {
    fn brew(&self) -> Result<Brew, ResourceError> {
        match &self.brew {
            Some(b) => Ok(b.clone()),
            None => Ok(Brew::locate_default()?),
        }
    }
}

impl Resource for Package {
    fn kind(&self) -> &'static str {
        "package"
    }
    fn identity(&self) -> &str {
        &self.name
    }
    fn path(&self) -> Option<&std::path::Path> {
        None
    }
    fn digest(&self, h: &mut blake3::Hasher) {
        h.update(self.state.name().as_bytes());
        h.update(b"\0");
        h.update(self.version.as_deref().unwrap_or("").as_bytes());
        h.update(&[u8::from(self.cask)]);
    }

    fn sandbox_note(&self) -> Option<&'static str> {
        Some(SANDBOX_NOTE)
    }

    fn observe(&self, host: &Host) -> Result<Observation, ResourceError> {
        if host.sandbox {
            // Reads as present and in sync: never "created" (so never
            // pruned) by a sandbox run.
            return Ok(Observation::new(true, Live::not_checked()));
        }
        let live = match host.platform {
            Platform::Linux => apt::observe(host, &self.name, self.state)?,
            Platform::Macos => brew::observe(host, &self.brew()?, self)?,
        };
        // An absent package reads as existing, so the inventory records it
        // as adopted: pruning it later never removes a package someone
        // installed after the agent made sure it was gone.
        let exists = live.installed.is_some() || self.state == Wanted::Absent;
        Ok(Observation::new(exists, live))
    }

    fn diff(&self, live: &Observation, host: &Host) -> Vec<FieldChange> {
        diff(self, live.get(), host.platform)
    }

    fn apply(
        &self,
        live: &Observation,
        changes: &[FieldChange],
        ctx: &mut ApplyCtx<'_>,
    ) -> Result<(), ResourceError> {
        let live: &Live = live.get();
        let host = ctx.host;
        if !live.checked || host.sandbox || changes.is_empty() {
            return Ok(());
        }
        match host.platform {
            Platform::Linux => apt::apply(host, self, live),
            Platform::Macos => brew::apply(host, &self.brew()?, self, live),
        }
    }
}

/// `1.6 (candidate)` style value for the plan.
fn shown(state: &str, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("{state} ({v})"),
        None => state.to_string(),
    }
}

/// Pure: the fields that differ.
fn diff(p: &Package, live: &Live, platform: Platform) -> Vec<FieldChange> {
    let mut out = Vec::new();
    if !live.checked {
        return out;
    }
    match (p.state, &live.installed) {
        (Wanted::Absent, None) => {}
        (Wanted::Absent, Some(v)) => out.push(FieldChange::new(
            "state",
            Some(shown("present", Some(v))),
            Some("absent".into()),
        )),
        (state, None) => {
            let target = p.version.as_deref().or(live.candidate.as_deref());
            out.push(FieldChange::new(
                "state",
                Some("absent".into()),
                Some(shown(state.name(), target)),
            ));
        }
        (state, Some(installed)) => {
            // apt pins an exact version; a Homebrew pin is a formula of its
            // own (observed as such), so any installed version matches.
            if let (Some(pin), Platform::Linux) = (&p.version, platform) {
                if installed != pin {
                    out.push(FieldChange::new(
                        "version",
                        Some(installed.clone()),
                        Some(pin.clone()),
                    ));
                }
            }
            if state == Wanted::Latest && live.outdated {
                out.push(FieldChange::new(
                    "version",
                    Some(installed.clone()),
                    Some(
                        live.candidate
                            .clone()
                            .unwrap_or_else(|| "newer".to_string()),
                    ),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
