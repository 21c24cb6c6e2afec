//! The package kind at the command boundary: every apt and Homebrew
//! command line a plan and an apply issue, against recorded tool answers
//! (the real apt runs in `tests/tests/package_apt.rs`), plus validation.

use std::cmp::Ordering;
use std::path::Path;
use std::sync::Arc;

use super::apt::{compare_versions, install_cmd, parse_policy, parse_query};
use super::brew::{parse_info, parse_list};
use super::*;
use crate::fsops::Fs;
use crate::resources::exec::RecordingRunner;
use crate::resources::Observation;

fn host(platform: Platform, sandbox: bool, runner: &RecordingRunner) -> Host {
    Host::new(Fs::new(Path::new("/")).unwrap(), sandbox, platform)
        .with_runner(Arc::new(runner.clone()))
}

fn pkg(name: &str, state: Wanted, version: Option<&str>) -> Package {
    Package {
        name: name.into(),
        state,
        version: version.map(str::to_string),
        cask: false,
        brew: None,
    }
}

/// Observe + diff + apply (when there is a diff), as plan and apply do.
/// Returns the changes as `field: old -> new` and the apply result.
fn converge(p: &Package, host: &Host) -> (Vec<String>, Result<(), ResourceError>) {
    let live = p.observe(host).expect("observe");
    let changes = p.diff(&live, host);
    let shown = changes
        .iter()
        .map(|c| {
            format!(
                "{}: {} -> {}",
                c.field,
                c.old.as_deref().unwrap_or("-"),
                c.new.as_deref().unwrap_or("-")
            )
        })
        .collect();
    let applied = if changes.is_empty() {
        Ok(())
    } else {
        let mut ctx = ApplyCtx::new(host);
        p.apply(&live, &changes, &mut ctx)
    };
    (shown, applied)
}

// ---- apt --------------------------------------------------------------

const QUERY: &str = "dpkg-query -W -f ${Status}\\t${Version}\\n";
const INSTALL: &str = "apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold";
const REMOVE: &str = "apt-get remove -y -q -o DPkg::Lock::Timeout=120";

fn policy(candidate: &str) -> String {
    format!("jq:\n  Installed: (none)\n  Candidate: {candidate}\n  Version table:\n     {candidate} 500\n        500 http://deb.debian.org/debian bookworm/main amd64 Packages\n")
}

fn apt(installed: Option<&str>, candidate: Option<&str>) -> RecordingRunner {
    let r = RecordingRunner::new();
    match installed {
        Some(v) => r.answer(QUERY, 0, &format!("install ok installed\t{v}\n"), ""),
        None => r.answer(QUERY, 1, "", "dpkg-query: no packages found matching jq\n"),
    }
    r.answer(
        "apt-cache policy",
        0,
        &candidate.map(policy).unwrap_or_default(),
        "",
    );
    r
}

#[test]
fn apt_present_installs_a_missing_package() {
    let r = apt(None, Some("1.6-2.1"));
    let h = host(Platform::Linux, false, &r);
    let p = pkg("jq", Wanted::Present, None);
    let live = p.observe(&h).unwrap();
    assert!(!live.exists, "a missing package is created");
    let (changes, applied) = converge(&p, &h);
    applied.unwrap();
    assert_eq!(changes, ["state: absent -> present (1.6-2.1)"]);
    assert_eq!(
        r.take_log(),
        [
            format!("{QUERY} jq"),
            "apt-cache policy jq".into(),
            format!("{QUERY} jq"),
            "apt-cache policy jq".into(),
            format!("{INSTALL} jq"),
        ]
    );
}

#[test]
fn apt_present_and_installed_is_in_sync_with_one_query() {
    let r = apt(Some("1.6-2.1"), Some("1.7-1"));
    let h = host(Platform::Linux, false, &r);
    let (changes, _) = converge(&pkg("jq", Wanted::Present, None), &h);
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(r.take_log(), [format!("{QUERY} jq")]);
}

#[test]
fn apt_latest_upgrades_to_the_candidate() {
    let r = apt(Some("1.6-2"), Some("1.6-2.1"));
    let h = host(Platform::Linux, false, &r);
    let (changes, applied) = converge(&pkg("jq", Wanted::Latest, None), &h);
    applied.unwrap();
    assert_eq!(changes, ["version: 1.6-2 -> 1.6-2.1"]);
    assert_eq!(
        r.take_log(),
        [
            format!("{QUERY} jq"),
            "apt-cache policy jq".into(),
            format!("{INSTALL} jq"),
        ]
    );
}

#[test]
fn apt_latest_in_sync_when_the_candidate_is_installed() {
    let r = apt(Some("1.6-2.1"), Some("1.6-2.1"));
    let (changes, _) = converge(
        &pkg("jq", Wanted::Latest, None),
        &host(Platform::Linux, false, &r),
    );
    assert!(changes.is_empty(), "{changes:?}");
}

#[test]
fn apt_latest_never_downgrades_a_newer_local_version() {
    let r = apt(Some("1:1.0"), Some("1.9"));
    let (changes, _) = converge(
        &pkg("jq", Wanted::Latest, None),
        &host(Platform::Linux, false, &r),
    );
    assert!(changes.is_empty(), "epoch 1 is newer: {changes:?}");
}

#[test]
fn apt_absent_removes_an_installed_package() {
    let r = apt(Some("1.6-2.1"), None);
    let h = host(Platform::Linux, false, &r);
    let p = pkg("jq", Wanted::Absent, None);
    let (changes, applied) = converge(&p, &h);
    applied.unwrap();
    assert_eq!(changes, ["state: present (1.6-2.1) -> absent"]);
    assert_eq!(
        r.take_log(),
        [format!("{QUERY} jq"), format!("{REMOVE} jq")],
        "no apt-cache for an absent package"
    );
}

#[test]
fn apt_absent_and_missing_is_in_sync_and_reads_as_existing() {
    let r = apt(None, None);
    let h = host(Platform::Linux, false, &r);
    let p = pkg("jq", Wanted::Absent, None);
    let live = p.observe(&h).unwrap();
    // So the inventory records it as adopted: never pruned.
    assert!(live.exists);
    assert!(p.diff(&live, &h).is_empty());
}

#[test]
fn apt_version_pin_installs_exactly_that_version() {
    let r = apt(Some("1.1"), None);
    let h = host(Platform::Linux, false, &r);
    let (changes, applied) = converge(&pkg("hla-hello", Wanted::Present, Some("1.0")), &h);
    applied.unwrap();
    assert_eq!(changes, ["version: 1.1 -> 1.0"]);
    assert_eq!(
        r.take_log(),
        [
            format!("{QUERY} hla-hello"),
            format!("{INSTALL} --allow-downgrades hla-hello=1.0"),
        ]
    );
}

#[test]
fn apt_version_pin_in_sync() {
    let r = apt(Some("1.0"), None);
    let (changes, _) = converge(
        &pkg("hla-hello", Wanted::Present, Some("1.0")),
        &host(Platform::Linux, false, &r),
    );
    assert!(changes.is_empty(), "{changes:?}");
}

#[test]
fn apt_pin_of_a_missing_package_shows_state_and_version() {
    let r = apt(None, Some("1.1"));
    let h = host(Platform::Linux, false, &r);
    let (changes, _) = converge(&pkg("hla-hello", Wanted::Present, Some("1.0")), &h);
    assert_eq!(changes, ["state: absent -> present (1.0)"]);
    assert_eq!(
        r.take_log().last().unwrap(),
        &format!("{INSTALL} --allow-downgrades hla-hello=1.0")
    );
}

#[test]
fn apt_refreshes_the_index_once_when_apt_does_not_know_the_package() {
    let r = apt(None, None);
    r.answer(
        "apt-get install",
        100,
        "Reading package lists...\n",
        "E: Unable to locate package hla-new\n",
    );
    let h = host(Platform::Linux, false, &r);
    let (changes, applied) = converge(&pkg("hla-new", Wanted::Present, None), &h);
    assert_eq!(changes, ["state: absent -> present"]);
    let err = applied.unwrap_err().to_string();
    assert!(err.contains("Unable to locate package hla-new"), "{err}");
    assert!(err.contains("exit 100"), "{err}");
    assert!(
        err.contains("index was refreshed (apt-get update)"),
        "{err}"
    );
    let log = r.take_log();
    assert_eq!(
        log[2..],
        [
            format!("{INSTALL} hla-new"),
            "apt-get update -q -o DPkg::Lock::Timeout=120".into(),
            format!("{INSTALL} hla-new"),
        ]
    );
}

#[test]
fn apt_other_install_failures_are_not_retried() {
    let r = apt(None, Some("1.0"));
    r.answer(
        "apt-get install",
        100,
        "",
        "E: Sub-process /usr/bin/dpkg returned an error code (1)\n",
    );
    let h = host(Platform::Linux, false, &r);
    let (_, applied) = converge(&pkg("jq", Wanted::Present, None), &h);
    let err = applied.unwrap_err().to_string();
    assert!(err.starts_with("`apt-get install"), "{err}");
    assert!(err.contains("dpkg returned an error code"), "{err}");
    assert!(!r.take_log().iter().any(|l| l.contains("update")));
}

#[test]
fn apt_query_failure_is_an_observation_error() {
    let r = RecordingRunner::new();
    r.answer(QUERY, 2, "", "dpkg-query: error: cannot access archive\n");
    let err = pkg("jq", Wanted::Present, None)
        .observe(&host(Platform::Linux, false, &r))
        .unwrap_err()
        .to_string();
    assert!(err.contains("dpkg-query"), "{err}");
    assert!(err.contains("cannot access archive"), "{err}");
}

#[test]
fn apt_commands_are_non_interactive_and_untranslated() {
    let c = install_cmd("jq", None);
    assert!(c
        .env
        .contains(&("DEBIAN_FRONTEND".into(), "noninteractive".into())));
    assert!(c.env.contains(&("LC_ALL".into(), "C".into())));
    assert!(c.timeout >= std::time::Duration::from_secs(600));
}

#[test]
fn dpkg_status_lines() {
    assert_eq!(
        parse_query("install ok installed\t1.6-2.1\n").as_deref(),
        Some("1.6-2.1")
    );
    assert_eq!(parse_query("deinstall ok config-files\t1.6-2.1\n"), None);
    assert_eq!(parse_query("unknown ok not-installed\t\n"), None);
    // Multi-arch: the first installed architecture.
    assert_eq!(
        parse_query("deinstall ok config-files\t1.0\ninstall ok installed\t1.1\n").as_deref(),
        Some("1.1")
    );
}

#[test]
fn apt_cache_policy_candidate() {
    assert_eq!(parse_policy(&policy("1.6-2.1")).as_deref(), Some("1.6-2.1"));
    assert_eq!(
        parse_policy("jq:\n  Installed: (none)\n  Candidate: (none)\n"),
        None
    );
    assert_eq!(parse_policy(""), None, "apt knows no such package");
}

#[test]
fn dpkg_version_order() {
    // Checked against `dpkg --compare-versions` on Debian 12.
    for (a, b, want) in [
        ("1.0", "1.1", Ordering::Less),
        ("1.10", "1.9", Ordering::Greater),
        ("1:0.9", "1.0", Ordering::Greater),
        ("1.0~rc1", "1.0", Ordering::Less),
        ("1.0", "1.0+b1", Ordering::Less),
        ("1.0a", "1.0", Ordering::Greater),
        ("1.0", "1.0-0", Ordering::Equal),
        ("2.0-1", "2.0-1+deb12u1", Ordering::Less),
        ("1.6-2.1", "1.6-2", Ordering::Greater),
        ("0:1.01", "1.1", Ordering::Equal),
        ("1.0-1~bpo12+1", "1.0-1", Ordering::Less),
    ] {
        assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
        assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
    }
}

// ---- Homebrew ---------------------------------------------------------

/// What every brew call starts with when the agent is root.
const SUDO: &str = "sudo -n -H -u alice -- /usr/bin/env HOMEBREW_NO_AUTO_UPDATE=1 HOMEBREW_NO_ENV_HINTS=1 NONINTERACTIVE=1 /opt/homebrew/bin/brew ";

fn brew_pkg(name: &str, state: Wanted, version: Option<&str>, cask: bool) -> Package {
    Package {
        name: name.into(),
        state,
        version: version.map(str::to_string),
        cask,
        brew: Some(Brew {
            exe: "/opt/homebrew/bin/brew".into(),
            run_as: Some("alice".into()),
        }),
    }
}

/// The log with the sudo prefix checked and cut.
fn brew_log(r: &RecordingRunner) -> Vec<String> {
    r.take_log()
        .into_iter()
        .map(|l| {
            l.strip_prefix(SUDO)
                .unwrap_or_else(|| panic!("not run as alice through sudo: {l}"))
                .to_string()
        })
        .collect()
}

fn formula_info(stable: &str, revision: u32, outdated: bool) -> String {
    format!(
        r#"{{"formulae":[{{"name":"jq","versions":{{"stable":"{stable}","head":"HEAD","bottle":true}},"revision":{revision},"installed":[],"outdated":{outdated}}}],"casks":[]}}"#
    )
}

#[test]
fn brew_present_installs_a_missing_formula() {
    let r = RecordingRunner::new();
    r.answer(&format!("{SUDO}list --versions jq"), 1, "", "");
    r.answer(
        &format!("{SUDO}info --json=v2 jq"),
        0,
        &formula_info("1.7.1", 0, false),
        "",
    );
    let h = host(Platform::Macos, false, &r);
    let (changes, applied) = converge(&brew_pkg("jq", Wanted::Present, None, false), &h);
    applied.unwrap();
    assert_eq!(changes, ["state: absent -> present (1.7.1)"]);
    assert_eq!(
        brew_log(&r),
        ["list --versions jq", "info --json=v2 jq", "install jq"]
    );
}

#[test]
fn brew_present_and_installed_is_one_list_call() {
    let r = RecordingRunner::new();
    r.answer(&format!("{SUDO}list --versions jq"), 0, "jq 1.7.1\n", "");
    let h = host(Platform::Macos, false, &r);
    let (changes, _) = converge(&brew_pkg("jq", Wanted::Present, None, false), &h);
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(brew_log(&r), ["list --versions jq"]);
}

#[test]
fn brew_latest_upgrades_an_outdated_formula() {
    let r = RecordingRunner::new();
    r.answer(&format!("{SUDO}list --versions jq"), 0, "jq 1.6\n", "");
    r.answer(
        &format!("{SUDO}info --json=v2 jq"),
        0,
        &formula_info("1.7.1", 1, true),
        "",
    );
    let h = host(Platform::Macos, false, &r);
    let (changes, applied) = converge(&brew_pkg("jq", Wanted::Latest, None, false), &h);
    applied.unwrap();
    assert_eq!(changes, ["version: 1.6 -> 1.7.1_1"]);
    assert_eq!(
        brew_log(&r),
        ["list --versions jq", "info --json=v2 jq", "upgrade jq"]
    );
}

#[test]
fn brew_latest_up_to_date_is_in_sync() {
    let r = RecordingRunner::new();
    r.answer(&format!("{SUDO}list --versions jq"), 0, "jq 1.7.1\n", "");
    r.answer(
        &format!("{SUDO}info --json=v2 jq"),
        0,
        &formula_info("1.7.1", 0, false),
        "",
    );
    let (changes, _) = converge(
        &brew_pkg("jq", Wanted::Latest, None, false),
        &host(Platform::Macos, false, &r),
    );
    assert!(changes.is_empty(), "{changes:?}");
}

#[test]
fn brew_absent_uninstalls() {
    let r = RecordingRunner::new();
    r.answer(&format!("{SUDO}list --versions jq"), 0, "jq 1.7.1\n", "");
    let h = host(Platform::Macos, false, &r);
    let (changes, applied) = converge(&brew_pkg("jq", Wanted::Absent, None, false), &h);
    applied.unwrap();
    assert_eq!(changes, ["state: present (1.7.1) -> absent"]);
    assert_eq!(brew_log(&r), ["list --versions jq", "uninstall jq"]);
}

#[test]
fn brew_cask_uses_cask_everywhere() {
    let r = RecordingRunner::new();
    r.answer(&format!("{SUDO}list --versions --cask firefox"), 1, "", "");
    r.answer(
        &format!("{SUDO}info --json=v2 --cask firefox"),
        0,
        r#"{"formulae":[],"casks":[{"token":"firefox","version":"120.0.1","installed":null,"outdated":false}]}"#,
        "",
    );
    let h = host(Platform::Macos, false, &r);
    let (changes, applied) = converge(&brew_pkg("firefox", Wanted::Latest, None, true), &h);
    applied.unwrap();
    assert_eq!(changes, ["state: absent -> latest (120.0.1)"]);
    assert_eq!(
        brew_log(&r),
        [
            "list --versions --cask firefox",
            "info --json=v2 --cask firefox",
            "install --cask firefox"
        ]
    );
    // Outdated cask: upgrade --cask.
    r.clear_answers();
    r.answer(
        &format!("{SUDO}list --versions --cask firefox"),
        0,
        "firefox 119.0\n",
        "",
    );
    r.answer(
        &format!("{SUDO}info --json=v2 --cask firefox"),
        0,
        r#"{"casks":[{"token":"firefox","version":"120.0.1","installed":"119.0","outdated":true}]}"#,
        "",
    );
    let (changes, applied) = converge(&brew_pkg("firefox", Wanted::Latest, None, true), &h);
    applied.unwrap();
    assert_eq!(changes, ["version: 119.0 -> 120.0.1"]);
    assert_eq!(brew_log(&r).last().unwrap(), "upgrade --cask firefox");
}

#[test]
fn brew_version_pin_is_the_versioned_formula() {
    let r = RecordingRunner::new();
    r.answer(&format!("{SUDO}list --versions postgresql@15"), 1, "", "");
    r.answer(
        &format!("{SUDO}info --json=v2 postgresql@15"),
        0,
        &formula_info("15.10", 0, false).replace("\"jq\"", "\"postgresql@15\""),
        "",
    );
    let h = host(Platform::Macos, false, &r);
    let p = brew_pkg("postgresql", Wanted::Present, Some("15"), false);
    let (changes, applied) = converge(&p, &h);
    applied.unwrap();
    assert_eq!(changes, ["state: absent -> present (15)"]);
    assert_eq!(
        brew_log(&r),
        [
            "list --versions postgresql@15",
            "info --json=v2 postgresql@15",
            "install postgresql@15"
        ]
    );
    // Installed: in sync whatever its patch version.
    r.answer(
        &format!("{SUDO}list --versions postgresql@15"),
        0,
        "postgresql@15 15.10\n",
        "",
    );
    let (changes, _) = converge(&p, &h);
    assert!(changes.is_empty(), "{changes:?}");
}

#[test]
fn brew_version_pin_without_such_formula_says_what_is_supported() {
    let r = RecordingRunner::new();
    r.answer(&format!("{SUDO}list --versions jq@1.5"), 1, "", "");
    r.answer(
        &format!("{SUDO}info --json=v2 jq@1.5"),
        1,
        "",
        "Error: No available formula with the name \"jq@1.5\".\n",
    );
    let err = brew_pkg("jq", Wanted::Present, Some("1.5"), false)
        .observe(&host(Platform::Macos, false, &r))
        .unwrap_err()
        .to_string();
    assert!(err.contains("Homebrew has no formula `jq@1.5`"), "{err}");
    assert!(err.contains("versioned formula"), "{err}");
}

#[test]
fn brew_runs_directly_when_the_agent_is_not_root() {
    let b = Brew {
        exe: "/usr/local/bin/brew".into(),
        run_as: None,
    };
    let c = b.cmd(&["list", "--versions", "jq"]);
    assert_eq!(c.line(), "/usr/local/bin/brew list --versions jq");
    assert!(c
        .env
        .contains(&("HOMEBREW_NO_AUTO_UPDATE".into(), "1".into())));
}

#[test]
fn brew_runs_as_the_owner_of_the_real_executable() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("Homebrew/bin");
    std::fs::create_dir_all(&repo).unwrap();
    let real = repo.join("brew");
    std::fs::write(&real, "#!/bin/sh\n").unwrap();
    let link_dir = tmp.path().join("bin");
    std::fs::create_dir(&link_dir).unwrap();
    let link = link_dir.join("brew");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let missing = tmp.path().join("nope/brew");
    let candidates = [missing.as_path(), link.as_path()];

    // The test runs as root here and in CI; it hands the file to uid 4242
    // (no such user: sudo gets `#4242`).
    nix::unistd::chown(&real, Some(4242.into()), None).unwrap();
    let b = Brew::locate(&candidates, 0).unwrap();
    assert_eq!(b.exe, link, "the path found is the one run");
    assert_eq!(b.run_as.as_deref(), Some("#4242"));

    // Not root: runs as itself.
    assert_eq!(Brew::locate(&candidates, 501).unwrap().run_as, None);

    // Owned by root: refused with a reason.
    nix::unistd::chown(&real, Some(0.into()), None).unwrap();
    let err = Brew::locate(&candidates, 0).unwrap_err().to_string();
    assert!(err.contains("owned by root"), "{err}");

    let err = Brew::locate(&[missing.as_path()], 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Homebrew not found"), "{err}");
}

#[test]
fn brew_output_parsers() {
    assert_eq!(parse_list("jq 1.6 1.7.1\n").as_deref(), Some("1.6 1.7.1"));
    assert_eq!(parse_list(""), None);
    assert_eq!(
        parse_info(&formula_info("1.7.1", 2, true), false).unwrap(),
        (Some("1.7.1_2".into()), true)
    );
    assert!(parse_info("{}", true).is_err());
}

// ---- sandbox, prune ---------------------------------------------------

#[test]
fn sandbox_runs_no_package_manager_and_says_so() {
    for platform in [Platform::Linux, Platform::Macos] {
        let r = RecordingRunner::new();
        let h = host(platform, true, &r);
        // On macOS with Homebrew located: were sandbox mode to reach for
        // it, the recording runner would log the call.
        let p = match platform {
            Platform::Macos => brew_pkg("jq", Wanted::Latest, None, false),
            _ => pkg("jq", Wanted::Latest, None),
        };
        let live = p.observe(&h).unwrap();
        assert!(live.exists, "never planned as a create (so never pruned)");
        assert!(p.diff(&live, &h).is_empty());
        assert_eq!(p.sandbox_note(), Some(SANDBOX_NOTE));
        let outcome = PackageKind.prune("jq", &h).unwrap();
        assert!(matches!(outcome, PruneOutcome::LeftInPlace(_)));
        assert!(r.take_log().is_empty(), "{platform:?}: no command ran");
    }
}

#[test]
fn apt_prune_removes_only_an_installed_package() {
    let r = apt(Some("1.0"), None);
    let h = host(Platform::Linux, false, &r);
    assert_eq!(
        PackageKind.prune("hla-hello", &h).unwrap(),
        PruneOutcome::Removed
    );
    assert_eq!(
        r.take_log(),
        [format!("{QUERY} hla-hello"), format!("{REMOVE} hla-hello")]
    );
    let r = apt(None, None);
    let h = host(Platform::Linux, false, &r);
    assert_eq!(
        PackageKind.prune("hla-hello", &h).unwrap(),
        PruneOutcome::AlreadyGone
    );
    assert_eq!(r.take_log(), [format!("{QUERY} hla-hello")]);
}

#[test]
fn observation_is_typed() {
    // The engine hands a kind only its own observation.
    let o = Observation::new(
        true,
        Live {
            checked: true,
            installed: Some("1".into()),
            candidate: None,
            outdated: false,
        },
    );
    assert_eq!(o.get::<Live>().installed.as_deref(), Some("1"));
}

// ---- validation -------------------------------------------------------

/// Loads a one-module repo for a host of `platform`; the error text.
fn load(platform: &str, resources: &str) -> Result<usize, String> {
    let tmp = tempfile::tempdir().unwrap();
    let write = |rel: &str, text: &str| {
        let p = tmp.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write(
        "hosts/lab.yaml",
        &format!("platform: {platform}\nroots: [/srv]\nmodules:\n  - name: m\n"),
    );
    write(
        "modules/m/module.yaml",
        &format!("params: {{}}\nresources:\n{resources}"),
    );
    let source = crate::source::LocalDir::open(tmp.path()).unwrap();
    crate::desired::load(Arc::new(source), "lab")
        .map(|c| c.entries.len())
        .map_err(|e| e.to_string())
}

#[test]
fn valid_packages_load() {
    assert_eq!(
        load(
            "linux",
            "  - package: jq\n  - package: hla-hello\n    version: \"1:1.0-2~bpo12+1\"\n  - package: telnet\n    state: absent\n  - package: curl\n    state: latest\n"
        ),
        Ok(4)
    );
    assert_eq!(
        load(
            "macos",
            "  - package: firefox\n    cask: true\n  - package: postgresql\n    version: \"15\"\n  - package: python@3.12\n"
        ),
        Ok(3)
    );
}

#[test]
fn cask_on_linux_is_rejected_at_its_line() {
    let err = load("linux", "  - package: firefox\n    cask: true\n").unwrap_err();
    assert!(
        err.contains("modules/m/module.yaml:4: package:firefox: `cask: true` is a Homebrew cask, which exists only on macOS; this host's platform is linux"),
        "{err}"
    );
    assert!(err.contains("when: host.platform"), "{err}");
}

#[test]
fn bad_state_is_rejected() {
    let err = load("linux", "  - package: jq\n    state: installed\n").unwrap_err();
    assert!(
        err.contains("modules/m/module.yaml:4: package:jq: `state` of a package must be present, latest or absent, found `installed`"),
        "{err}"
    );
}

#[test]
fn version_conflicts_are_rejected() {
    let err = load(
        "linux",
        "  - package: jq\n    state: latest\n    version: \"1.6\"\n",
    )
    .unwrap_err();
    assert!(
        err.contains(
            "module.yaml:5: package:jq: `version: 1.6` cannot be combined with `state: latest`"
        ),
        "{err}"
    );
    let err = load(
        "linux",
        "  - package: jq\n    state: absent\n    version: \"1.6\"\n",
    )
    .unwrap_err();
    assert!(err.contains("an absent package has no version"), "{err}");
    let err = load(
        "macos",
        "  - package: firefox\n    cask: true\n    version: \"120\"\n",
    )
    .unwrap_err();
    assert!(
        err.contains(
            "module.yaml:5: package:firefox: a Homebrew cask cannot be pinned to a version"
        ),
        "{err}"
    );
}

#[test]
fn unquoted_version_number_is_rejected_with_a_hint() {
    let err = load("linux", "  - package: jq\n    version: 1.10\n").unwrap_err();
    assert!(
        err.contains(
            "module.yaml:4: package:jq: `version` must be a quoted string, found a number"
        ),
        "{err}"
    );
    assert!(err.contains("version: \"1.10\""), "{err}");
    let err = load("linux", "  - package: jq\n    version: \"1.0 beta\"\n").unwrap_err();
    assert!(err.contains("is not a package version"), "{err}");
}

#[test]
fn debian_names_are_checked_on_linux_only() {
    let err = load("linux", "  - package: Foo_Bar\n").unwrap_err();
    assert!(
        err.contains(
            "module.yaml:3: package:Foo_Bar: `package: Foo_Bar` is not a Debian package name"
        ),
        "{err}"
    );
    assert_eq!(load("macos", "  - package: Foo_Bar\n"), Ok(1));
}

#[test]
fn unknown_keys_get_a_suggestion() {
    let err = load("linux", "  - package: jq\n    verison: \"1\"\n").unwrap_err();
    assert!(err.contains("unknown key `verison`"), "{err}");
    assert!(err.contains("did you mean `version`?"), "{err}");
}
