//! The Homebrew backend (macOS): formulae and casks.
//!
//! Homebrew refuses to run as root, and the agent usually runs as root (a
//! LaunchDaemon). Whom brew runs as: the owner of the `brew` executable,
//! found at `/opt/homebrew/bin/brew` (Apple silicon) or
//! `/usr/local/bin/brew` (Intel), with symlinks resolved (on Intel it links
//! into `/usr/local/Homebrew`). Homebrew's installer makes the user who
//! installed it the owner of its prefix, and only that user can write the
//! Cellar, so that is the one user brew works as. A root-owned installation
//! is refused with a message. The agent reaches that user through `sudo -n
//! -H -u USER -- /usr/bin/env VAR=1... BREW ARGS` (sudo resets the
//! environment, hence `env`); an agent not running as root runs brew
//! directly, as itself.
//!
//! Every call sets `HOMEBREW_NO_AUTO_UPDATE` (no implicit `brew update`:
//! slow, networked, and it would change what `latest` means mid-run),
//! `HOMEBREW_NO_ENV_HINTS` and `NONINTERACTIVE`.
//!
//! Observe: `brew list --versions [--cask] NAME` (exit 1: not installed);
//! `brew info --json=v2 [--cask] NAME` for the candidate and `outdated`
//! when it matters (missing; `latest`). Apply: `brew install`, `brew
//! upgrade`, `brew uninstall`, each with `--cask` for casks.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Live, Package, PackageError, Wanted};
use crate::resources::exec::Cmd;
use crate::resources::{Host, PruneOutcome, ResourceError};

const QUERY_LIMIT: Duration = Duration::from_secs(2 * 60);
const INSTALL_LIMIT: Duration = Duration::from_secs(30 * 60);
const UNINSTALL_LIMIT: Duration = Duration::from_secs(10 * 60);

/// Where Homebrew is looked for, in order.
pub const LOCATIONS: &[&str] = &["/opt/homebrew/bin/brew", "/usr/local/bin/brew"];

const ENV: &[(&str, &str)] = &[
    ("HOMEBREW_NO_AUTO_UPDATE", "1"),
    ("HOMEBREW_NO_ENV_HINTS", "1"),
    ("NONINTERACTIVE", "1"),
];

/// A Homebrew installation and the user it runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brew {
    pub exe: PathBuf,
    /// `Some(user)`: the agent is root; brew runs as `user` via sudo.
    pub run_as: Option<String>,
}

impl Brew {
    /// [`Brew::locate`] at the standard [`LOCATIONS`] for this process.
    pub fn locate_default() -> Result<Brew, PackageError> {
        let candidates: Vec<&Path> = LOCATIONS.iter().map(Path::new).collect();
        Brew::locate(&candidates, nix::unistd::geteuid().as_raw())
    }

    /// The first of `candidates` that exists; when `euid` is root, run as
    /// the owner of the real (symlinks resolved) executable.
    pub fn locate(candidates: &[&Path], euid: u32) -> Result<Brew, PackageError> {
        let exe = candidates
            .iter()
            .find(|p| p.is_file())
            .ok_or_else(|| PackageError::BrewNotFound {
                searched: candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?
            .to_path_buf();
        if euid != 0 {
            return Ok(Brew { exe, run_as: None });
        }
        let real = std::fs::canonicalize(&exe).unwrap_or_else(|_| exe.clone());
        let owner =
            std::fs::metadata(&real)
                .map(|m| m.uid())
                .map_err(|_| PackageError::BrewNotFound {
                    searched: real.display().to_string(),
                })?;
        if owner == 0 {
            return Err(PackageError::BrewOwnedByRoot {
                path: real.display().to_string(),
            });
        }
        let user = nix::unistd::User::from_uid(owner.into())
            .ok()
            .flatten()
            .map(|u| u.name)
            // sudo takes `#UID` for a user without a name.
            .unwrap_or_else(|| format!("#{owner}"));
        Ok(Brew {
            exe,
            run_as: Some(user),
        })
    }

    /// `brew ARGS` as the right user.
    pub fn cmd(&self, args: &[&str]) -> Cmd {
        let exe = self.exe.display().to_string();
        match &self.run_as {
            Some(user) => {
                let mut all: Vec<String> = ["-n", "-H", "-u", user, "--", "/usr/bin/env"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                all.extend(ENV.iter().map(|(k, v)| format!("{k}={v}")));
                all.push(exe);
                all.extend(args.iter().map(|s| s.to_string()));
                Cmd::new("sudo", all)
            }
            None => ENV
                .iter()
                .fold(Cmd::new(&exe, args.iter().copied()), |c, (k, v)| {
                    c.env(k, v)
                }),
        }
    }
}

/// `list --versions [--cask] NAME` style argument lists.
fn args<'a>(verb: &[&'a str], cask: bool, name: &'a str) -> Vec<&'a str> {
    let mut out = verb.to_vec();
    if cask {
        out.push("--cask");
    }
    out.push(name);
    out
}

/// The installed versions of `name` (`None`: not installed).
fn installed(
    host: &Host,
    brew: &Brew,
    cask: bool,
    name: &str,
) -> Result<Option<String>, ResourceError> {
    let cmd = brew
        .cmd(&args(&["list", "--versions"], cask, name))
        .timeout(QUERY_LIMIT);
    let out = host.runner.run(&cmd)?;
    match out.code {
        Some(0) => Ok(parse_list(&out.stdout)),
        // Not installed (or no such formula): exit 1, nothing on stdout.
        Some(1) => Ok(None),
        code => Err(ResourceError::Command {
            command: cmd.line(),
            code,
            message: out.message(),
        }),
    }
}

/// `jq 1.6 1.7.1` → `1.6 1.7.1` (every installed keg).
pub fn parse_list(stdout: &str) -> Option<String> {
    let line = stdout.lines().find(|l| !l.trim().is_empty())?;
    let versions: Vec<&str> = line.split_whitespace().skip(1).collect();
    (!versions.is_empty()).then(|| versions.join(" "))
}

/// From `brew info --json=v2`: the current version (with its `_revision`)
/// and whether the installed one is outdated.
/// Why `brew info --json=v2` output cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("no {0} in the answer")]
    Missing(&'static str),
}

pub fn parse_info(json: &str, cask: bool) -> Result<(Option<String>, bool), InfoError> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let (list, what) = if cask {
        ("casks", "cask")
    } else {
        ("formulae", "formula")
    };
    let item = v[list].get(0).ok_or(InfoError::Missing(what))?;
    let version = if cask {
        item["version"].as_str().map(str::to_string)
    } else {
        item["versions"]["stable"].as_str().map(|stable| {
            match item["revision"].as_u64().unwrap_or(0) {
                0 => stable.to_string(),
                r => format!("{stable}_{r}"),
            }
        })
    };
    Ok((version, item["outdated"].as_bool().unwrap_or(false)))
}

pub fn observe(host: &Host, brew: &Brew, p: &Package) -> Result<Live, ResourceError> {
    let name = p.formula();
    let installed = installed(host, brew, p.cask, &name)?;
    let wants_info = match p.state {
        Wanted::Absent => false,
        Wanted::Present => installed.is_none(),
        Wanted::Latest => true,
    };
    let (candidate, outdated) = if wants_info {
        let cmd = brew
            .cmd(&args(&["info", "--json=v2"], p.cask, &name))
            .timeout(QUERY_LIMIT);
        let out = host.runner.run(&cmd)?;
        if !out.success() {
            if p.version.is_some() {
                return Err(PackageError::NoVersionedFormula {
                    formula: name,
                    name: p.name.clone(),
                }
                .into());
            }
            return Err(ResourceError::Command {
                command: cmd.line(),
                code: out.code,
                message: out.message(),
            });
        }
        parse_info(&out.stdout, p.cask).map_err(|e| PackageError::UnexpectedOutput {
            command: cmd.line(),
            detail: e.to_string(),
        })?
    } else {
        (None, false)
    };
    Ok(Live {
        checked: true,
        outdated: outdated && installed.is_some(),
        installed,
        candidate,
    })
}

pub fn apply(host: &Host, brew: &Brew, p: &Package, live: &Live) -> Result<(), ResourceError> {
    let name = p.formula();
    let run = |verb: &str, limit: Duration| -> Result<(), ResourceError> {
        host.run_ok(&brew.cmd(&args(&[verb], p.cask, &name)).timeout(limit))?;
        Ok(())
    };
    match (p.state, &live.installed) {
        (Wanted::Absent, Some(_)) => run("uninstall", UNINSTALL_LIMIT),
        (Wanted::Absent, None) => Ok(()),
        (_, None) => run("install", INSTALL_LIMIT),
        (Wanted::Latest, Some(_)) if live.outdated => run("upgrade", INSTALL_LIMIT),
        (_, Some(_)) => Ok(()),
    }
}

/// Removes `name` if installed, as a formula or else as a cask.
pub fn prune(host: &Host, brew: &Brew, name: &str) -> Result<PruneOutcome, ResourceError> {
    for cask in [false, true] {
        if installed(host, brew, cask, name)?.is_some() {
            host.run_ok(
                &brew
                    .cmd(&args(&["uninstall"], cask, name))
                    .timeout(UNINSTALL_LIMIT),
            )?;
            return Ok(PruneOutcome::Removed);
        }
    }
    Ok(PruneOutcome::AlreadyGone)
}

impl Package {
    /// What Homebrew calls it: the name, or the versioned formula
    /// `NAME@VERSION` when pinned.
    fn formula(&self) -> String {
        match &self.version {
            Some(v) => format!("{}@{v}", self.name),
            None => self.name.clone(),
        }
    }
}
