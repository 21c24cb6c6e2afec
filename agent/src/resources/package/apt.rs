//! The apt/dpkg backend (Debian and derivatives).
//!
//! Observe: `dpkg-query -W -f '${Status}\t${Version}\n' NAME` (installed or
//! not, and which version), and `apt-cache policy NAME` for the candidate
//! when it matters (a missing package; `latest`). Versions are compared
//! with dpkg's own ordering ([`compare_versions`]), so a locally installed
//! newer version is not "upgraded" to an older candidate.
//!
//! Apply: `apt-get install` / `apt-get remove`, non-interactive (keeping
//! changed configuration files), waiting up to two minutes for the dpkg
//! lock another apt may hold. When apt does not know the package or the
//! version, the index is refreshed once (`apt-get update`) and the install
//! retried.

use std::cmp::Ordering;
use std::time::Duration;

use super::{Live, Package, Wanted};
use crate::resources::exec::{Cmd, Output};
use crate::resources::{Host, PruneOutcome, ResourceError};

const QUERY_LIMIT: Duration = Duration::from_secs(60);
const UPDATE_LIMIT: Duration = Duration::from_secs(5 * 60);
const INSTALL_LIMIT: Duration = Duration::from_secs(20 * 60);

/// Debian policy: lower-case letters, digits, `+ - .`; at least two
/// characters, starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

/// A command with apt's and dpkg's messages untranslated.
fn cmd<'a>(program: &str, args: impl IntoIterator<Item = &'a str>) -> Cmd {
    Cmd::new(program, args.into_iter().map(str::to_string)).env("LC_ALL", "C")
}

pub fn query_cmd(name: &str) -> Cmd {
    cmd(
        "dpkg-query",
        ["-W", "-f", "${Status}\\t${Version}\\n", name],
    )
    .timeout(QUERY_LIMIT)
}

pub fn policy_cmd(name: &str) -> Cmd {
    cmd("apt-cache", ["policy", name]).timeout(QUERY_LIMIT)
}

/// `apt-get install` of `name` (or exactly `name=version`).
pub fn install_cmd(name: &str, version: Option<&str>) -> Cmd {
    let target = match version {
        Some(v) => format!("{name}={v}"),
        None => name.to_string(),
    };
    let mut args = vec![
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-o",
        "DPkg::Lock::Timeout=120",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    ];
    if version.is_some() {
        args.push("--allow-downgrades");
    }
    args.push(&target);
    cmd("apt-get", args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .timeout(INSTALL_LIMIT)
}

pub fn remove_cmd(name: &str) -> Cmd {
    cmd(
        "apt-get",
        ["remove", "-y", "-q", "-o", "DPkg::Lock::Timeout=120", name],
    )
    .env("DEBIAN_FRONTEND", "noninteractive")
    .timeout(INSTALL_LIMIT)
}

pub fn update_cmd() -> Cmd {
    cmd("apt-get", ["update", "-q", "-o", "DPkg::Lock::Timeout=120"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .timeout(UPDATE_LIMIT)
}

/// The installed version of `name`, `None` when it is not installed
/// (never known, removed, or only its configuration files left).
pub fn installed(host: &Host, name: &str) -> Result<Option<String>, ResourceError> {
    let cmd = query_cmd(name);
    let out = host.runner.run(&cmd)?;
    match out.code {
        Some(0) => Ok(parse_query(&out.stdout)),
        // "dpkg-query: no packages found matching NAME"
        Some(1) if out.stderr.contains("no packages found") => Ok(None),
        code => Err(ResourceError::Command {
            command: cmd.line(),
            code,
            message: out.message(),
        }),
    }
}

/// `install ok installed\t1.6-2.1` lines (one per architecture) → the
/// version of the first installed one.
pub fn parse_query(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|line| {
        let (status, version) = line.split_once('\t')?;
        let state = status.split_whitespace().nth(2)?;
        matches!(state, "installed" | "triggers-awaited" | "triggers-pending")
            .then(|| version.trim().to_string())
    })
}

/// The candidate version from `apt-cache policy` (`None`: apt knows no
/// installable version).
pub fn candidate(host: &Host, name: &str) -> Result<Option<String>, ResourceError> {
    let out = host.run_ok(&policy_cmd(name))?;
    Ok(parse_policy(&out.stdout))
}

pub fn parse_policy(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|line| {
        let v = line.trim().strip_prefix("Candidate:")?.trim();
        (v != "(none)" && !v.is_empty()).then(|| v.to_string())
    })
}

pub fn observe(host: &Host, name: &str, state: Wanted) -> Result<Live, ResourceError> {
    let installed = installed(host, name)?;
    let wants_candidate = match state {
        Wanted::Absent => false,
        Wanted::Present => installed.is_none(),
        Wanted::Latest => true,
    };
    let candidate = if wants_candidate {
        candidate(host, name)?
    } else {
        None
    };
    let outdated = match (&installed, &candidate) {
        (Some(i), Some(c)) => compare_versions(i, c) == Ordering::Less,
        _ => false,
    };
    Ok(Live {
        checked: true,
        installed,
        candidate,
        outdated,
    })
}

/// apt's "I do not know that (version of the) package" errors: a refresh
/// of the index may help.
fn unknown_to_apt(out: &Output) -> bool {
    let text = format!("{}\n{}", out.stderr, out.stdout);
    text.contains("Unable to locate package")
        || text.contains("has no installation candidate")
        || (text.contains("Version '") && text.contains("was not found"))
}

pub fn apply(host: &Host, p: &Package, live: &Live) -> Result<(), ResourceError> {
    match p.state {
        Wanted::Absent => {
            if live.installed.is_some() {
                host.run_ok(&remove_cmd(&p.name))?;
            }
            Ok(())
        }
        Wanted::Present | Wanted::Latest => {
            let install = install_cmd(&p.name, p.version.as_deref());
            let out = host.runner.run(&install)?;
            if out.success() {
                return Ok(());
            }
            if !unknown_to_apt(&out) {
                return Err(ResourceError::Command {
                    command: install.line(),
                    code: out.code,
                    message: out.message(),
                });
            }
            host.run_ok(&update_cmd())?;
            let retry = host.runner.run(&install)?;
            if retry.success() {
                return Ok(());
            }
            let mut message = retry.message();
            if unknown_to_apt(&retry) {
                message.push_str("\n  apt's index was refreshed (apt-get update) and still has no such package or version: check the name and `version`, or add the apt source that provides it");
            }
            Err(ResourceError::Command {
                command: install.line(),
                code: retry.code,
                message,
            })
        }
    }
}

pub fn prune(host: &Host, name: &str) -> Result<PruneOutcome, ResourceError> {
    if installed(host, name)?.is_none() {
        return Ok(PruneOutcome::AlreadyGone);
    }
    host.run_ok(&remove_cmd(name))?;
    Ok(PruneOutcome::Removed)
}

/// dpkg's version ordering (`dpkg --compare-versions`): epoch numerically,
/// then upstream version and Debian revision with `verrevcmp` (`~` sorts
/// before everything, even the end of the string; letters before other
/// characters; digit runs numerically).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if e.chars().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), r),
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((up, rev)) => (epoch, up, rev),
            None => (epoch, rest, ""),
        }
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| verrevcmp(ra.as_bytes(), rb.as_bytes()))
}

fn order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(b'~') => -1,
        Some(c) => i32::from(c) + 256,
    }
}

fn verrevcmp(a: &[u8], b: &[u8]) -> Ordering {
    let (mut i, mut j) = (0, 0);
    let at = |s: &[u8], k: usize| s.get(k).copied();
    let digit = |c: Option<u8>| c.is_some_and(|c| c.is_ascii_digit());
    while i < a.len() || j < b.len() {
        while (i < a.len() && !digit(at(a, i))) || (j < b.len() && !digit(at(b, j))) {
            let (ac, bc) = (order(at(a, i)), order(at(b, j)));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while at(a, i) == Some(b'0') {
            i += 1;
        }
        while at(b, j) == Some(b'0') {
            j += 1;
        }
        let mut first_diff = 0i32;
        while digit(at(a, i)) && digit(at(b, j)) {
            if first_diff == 0 {
                first_diff = i32::from(a[i]) - i32::from(b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(at(a, i)) {
            return Ordering::Greater;
        }
        if digit(at(b, j)) {
            return Ordering::Less;
        }
        if first_diff != 0 {
            return first_diff.cmp(&0);
        }
    }
    Ordering::Equal
}
