//! Command-boundary tests: the exact `launchctl` and `systemctl` sequences
//! for create, update, restart (notify), remove and drift, against a
//! recorded log ([`RecordingRunner`]), and the generated plists parsed back.
//! No Mac runs these: they pin what the agent would run on one. Real
//! systemd is exercised end to end in `tests/tests/systemd.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::calendar::Calendar;
use super::*;
use crate::fsops::Fs;
use crate::resources::exec::RecordingRunner;
use crate::resources::{ApplyCtx, Host, Kind, Platform, Resource};

fn spec(name: &str, job: Job) -> Spec {
    Spec {
        name: name.to_string(),
        description: format!("{name} test"),
        program: "/opt/homebrew/bin/zot".into(),
        args: vec!["serve".into(), "/etc/zot/config.json".into()],
        environment: BTreeMap::from([("ZOT_LOG".to_string(), "info".to_string())]),
        user: Some("root".into()),
        group: None,
        working_directory: Some("/var/lib/zot".into()),
        stdout: Some("/var/log/zot.log".into()),
        stderr: None,
        enabled: true,
        scope: Scope::System,
        job,
        systemd_extra: Vec::new(),
    }
}

fn service_job() -> Job {
    Job::Service {
        running: true,
        restart: Restart::Always,
        restart_delay: 10,
        start_timeout: Duration::from_secs(1),
    }
}

fn schedule_job(expr: &str) -> Job {
    Job::Schedule {
        when: When::Calendar(Calendar::parse(expr).unwrap()),
        persistent: true,
        randomized_delay: 300,
        timeout: Some(3600),
    }
}

struct Lab {
    _dir: tempfile::TempDir,
    host: Host,
    runner: RecordingRunner,
}

fn lab(platform: Platform) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let runner = RecordingRunner::new();
    let host = Host::new(Fs::new(dir.path()).unwrap(), false, platform)
        .with_runner(Arc::new(runner.clone()));
    Lab {
        _dir: dir,
        host,
        runner,
    }
}

/// observe → diff → apply, returning the changed fields.
fn converge(unit: &Unit, host: &Host) -> Vec<&'static str> {
    let live = unit.observe(host).unwrap();
    let changes = unit.diff(&live, host);
    let mut ctx = ApplyCtx::new(host);
    unit.apply(&live, &changes, &mut ctx).unwrap();
    changes.iter().map(|c| c.field).collect()
}

const LOADED_RUNNING: &str = "system/homelab.zot = {\n\tstate = running\n\tpid = 4242\n}\n";
const LOADED_STOPPED: &str =
    "system/homelab.zot = {\n\tstate = not running\n\tlast exit code = 1\n}\n";

#[test]
fn plist_parses_back_with_the_expected_keys() {
    let unit = Unit::new(spec("zot", service_job()), Platform::Macos);
    let f = &unit.files()[0];
    assert_eq!(
        f.path,
        Path::new("/Library/LaunchDaemons/homelab.zot.plist")
    );
    assert_eq!(
        (f.mode, f.owner.as_deref(), f.group.as_deref()),
        (0o644, Some("0"), Some("0"))
    );
    let text = String::from_utf8(f.content.clone()).unwrap();
    insta::assert_snapshot!("launchd_service_plist", text);
    let back = plist::Value::from_reader_xml(f.content.as_slice()).unwrap();
    let d = back.as_dictionary().unwrap();
    assert_eq!(d["Label"].as_string(), Some("homelab.zot"));
    let argv: Vec<&str> = d["ProgramArguments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_string().unwrap())
        .collect();
    assert_eq!(
        argv,
        ["/opt/homebrew/bin/zot", "serve", "/etc/zot/config.json"]
    );
    assert_eq!(d["RunAtLoad"].as_boolean(), Some(true));
    assert_eq!(d["KeepAlive"].as_boolean(), Some(true));
    assert_eq!(d["ThrottleInterval"].as_signed_integer(), Some(10));
    assert_eq!(d["UserName"].as_string(), Some("root"));
    assert_eq!(d["WorkingDirectory"].as_string(), Some("/var/lib/zot"));
    assert_eq!(d["StandardOutPath"].as_string(), Some("/var/log/zot.log"));
    assert!(!d.contains_key("StandardErrorPath"));
    let env = d["EnvironmentVariables"].as_dictionary().unwrap();
    assert_eq!(env["ZOT_LOG"].as_string(), Some("info"));

    // on-failure restarts: KeepAlive { SuccessfulExit = false }
    let mut s = spec("zot", service_job());
    s.job = Job::Service {
        running: true,
        restart: Restart::OnFailure,
        restart_delay: 5,
        start_timeout: Duration::from_secs(30),
    };
    let back = plist::Value::from_reader_xml(launchd::plist_bytes(&s).as_slice()).unwrap();
    let keep = back.as_dictionary().unwrap()["KeepAlive"]
        .as_dictionary()
        .unwrap()
        .clone();
    assert_eq!(keep["SuccessfulExit"].as_boolean(), Some(false));
}

#[test]
fn schedule_plist_has_calendar_intervals() {
    let unit = Unit::new(
        spec("borgmatic", schedule_job("30 2 * * *")),
        Platform::Macos,
    );
    let text = String::from_utf8(unit.files()[0].content.clone()).unwrap();
    insta::assert_snapshot!("launchd_schedule_plist", text);
    let back = plist::Value::from_reader_xml(unit.files()[0].content.as_slice()).unwrap();
    let d = back.as_dictionary().unwrap();
    let cal = d["StartCalendarInterval"].as_dictionary().unwrap();
    assert_eq!(cal["Hour"].as_unsigned_integer(), Some(2));
    assert_eq!(cal["Minute"].as_unsigned_integer(), Some(30));
    assert!(!cal.contains_key("Day"));
    assert_eq!(d["RunAtLoad"].as_boolean(), Some(false));
    assert!(!d.contains_key("KeepAlive"));

    // Weekdays expand to one dictionary each (launchd has no ranges).
    let unit = Unit::new(
        spec("report", schedule_job("0 9 * * mon-fri")),
        Platform::Macos,
    );
    let back = plist::Value::from_reader_xml(unit.files()[0].content.as_slice()).unwrap();
    let list = back.as_dictionary().unwrap()["StartCalendarInterval"]
        .as_array()
        .unwrap()
        .clone();
    let days: Vec<u64> = list
        .iter()
        .map(|v| {
            v.as_dictionary().unwrap()["Weekday"]
                .as_unsigned_integer()
                .unwrap()
        })
        .collect();
    assert_eq!(days, [1, 2, 3, 4, 5]);
}

#[test]
fn launchctl_create_bootstraps_the_new_plist() {
    let lab = lab(Platform::Macos);
    lab.runner.answer(
        "launchctl print system/",
        113,
        "",
        "Could not find service \"homelab.zot\" in domain for system",
    );
    lab.runner.answer(
        "launchctl print-disabled system",
        0,
        "disabled services = {\n}\n",
        "",
    );
    let unit = Unit::new(spec("zot", service_job()), Platform::Macos);
    let fields = converge(&unit, &lab.host);
    assert_eq!(fields, ["plist", "state"]);
    assert_eq!(
        lab.runner.take_log(),
        [
            "launchctl print system/homelab.zot",
            "launchctl print-disabled system",
            "launchctl bootstrap system /Library/LaunchDaemons/homelab.zot.plist",
        ]
    );
    let written = std::fs::read(
        lab.host
            .fs
            .host_path(Path::new("/Library/LaunchDaemons/homelab.zot.plist")),
    )
    .unwrap();
    assert_eq!(written, unit.files()[0].content);
}

#[test]
fn launchctl_update_boots_out_then_bootstraps() {
    let lab = lab(Platform::Macos);
    let old = Unit::new(spec("zot", service_job()), Platform::Macos);
    lab.runner
        .answer("launchctl print system/", 113, "", "not found");
    lab.runner
        .answer("launchctl print-disabled system", 0, "", "");
    converge(&old, &lab.host);
    lab.runner.take_log();

    // Loaded and running the old plist; the new one changes the arguments.
    lab.runner.clear_answers();
    lab.runner
        .answer("launchctl print-disabled system", 0, "", "");
    lab.runner
        .answer("launchctl print system/homelab.zot", 0, LOADED_RUNNING, "");
    let mut s = spec("zot", service_job());
    s.args.push("--verbose".into());
    let new = Unit::new(s, Platform::Macos);
    let live = new.observe(&lab.host).unwrap();
    lab.runner
        .answer("launchctl print system/homelab.zot", 113, "", "not found");
    let changes = new.diff(&live, &lab.host);
    assert_eq!(
        changes.iter().map(|c| c.field).collect::<Vec<_>>(),
        ["plist"]
    );
    let mut ctx = ApplyCtx::new(&lab.host);
    new.apply(&live, &changes, &mut ctx).unwrap();
    assert!(
        ctx.take_started(),
        "a changed running service is (re)started"
    );
    assert_eq!(
        lab.runner.take_log(),
        [
            "launchctl print system/homelab.zot",
            "launchctl print-disabled system",
            "launchctl bootout system/homelab.zot",
            "launchctl print system/homelab.zot",
            "launchctl bootstrap system /Library/LaunchDaemons/homelab.zot.plist",
        ]
    );
}

#[test]
fn launchctl_restart_on_notify_is_kickstart_k() {
    let lab = lab(Platform::Macos);
    let unit = Unit::new(spec("zot", service_job()), Platform::Macos);
    assert!(unit.as_startable().unwrap().notified(&lab.host).unwrap());
    assert_eq!(
        lab.runner.take_log(),
        ["launchctl kickstart -k system/homelab.zot"]
    );
    // Up: running with a steady pid.
    lab.runner
        .answer("launchctl print system/homelab.zot", 0, LOADED_RUNNING, "");
    unit.as_startable().unwrap().wait_up(&lab.host).unwrap();
    // Not loaded: fails at once with launchctl's words.
    lab.runner.answer(
        "launchctl print system/homelab.zot",
        113,
        "",
        "Could not find service",
    );
    let err = unit
        .as_startable()
        .unwrap()
        .wait_up(&lab.host)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not loaded: Could not find service"), "{err}");
}

#[test]
fn launchctl_drift_stopped_and_disabled_by_hand() {
    let lab = lab(Platform::Macos);
    let unit = Unit::new(spec("zot", service_job()), Platform::Macos);
    lab.runner.answer("launchctl print system/", 113, "", "");
    lab.runner
        .answer("launchctl print-disabled system", 0, "", "");
    converge(&unit, &lab.host);
    lab.runner.take_log();
    lab.runner.clear_answers();
    // Someone ran `launchctl disable` and the job exited.
    lab.runner
        .answer("launchctl print system/homelab.zot", 0, LOADED_STOPPED, "");
    lab.runner.answer(
        "launchctl print-disabled system",
        0,
        "disabled services = {\n\t\"homelab.zot\" => disabled\n}\n",
        "",
    );
    let fields = converge(&unit, &lab.host);
    assert_eq!(fields, ["state", "enabled"]);
    assert_eq!(
        lab.runner.take_log(),
        [
            "launchctl print system/homelab.zot",
            "launchctl print-disabled system",
            "launchctl enable system/homelab.zot",
            "launchctl kickstart system/homelab.zot",
        ]
    );
}

#[test]
fn launchctl_remove_boots_out_and_deletes_the_plist() {
    let lab = lab(Platform::Macos);
    let unit = Unit::new(spec("zot", service_job()), Platform::Macos);
    lab.runner.answer("launchctl print system/", 113, "", "");
    lab.runner
        .answer("launchctl print-disabled system", 0, "", "");
    converge(&unit, &lab.host);
    lab.runner.take_log();
    lab.runner.clear_answers();
    // bootout succeeds, then print no longer finds it.
    lab.runner
        .answer("launchctl print system/homelab.zot", 113, "", "");
    let out = ServiceKind.prune("zot", &lab.host).unwrap();
    assert_eq!(out, PruneOutcome::Removed);
    assert_eq!(
        lab.runner.take_log(),
        [
            "launchctl bootout system/homelab.zot",
            "launchctl print system/homelab.zot",
        ]
    );
    assert!(lab
        .host
        .fs
        .meta(Path::new("/Library/LaunchDaemons/homelab.zot.plist"))
        .unwrap()
        .is_none());
    // Gone already: nothing to do, nothing run.
    assert_eq!(
        ServiceKind.prune("zot", &lab.host).unwrap(),
        PruneOutcome::AlreadyGone
    );
    assert!(lab.runner.take_log().is_empty());
}

#[test]
fn launchctl_bootout_waits_while_still_stopping() {
    let lab = lab(Platform::Macos);
    let unit = Unit::new(spec("zot", service_job()), Platform::Macos);
    lab.runner.answer("launchctl print system/", 113, "", "");
    lab.runner
        .answer("launchctl print-disabled system", 0, "", "");
    converge(&unit, &lab.host);
    lab.runner.take_log();
    // EINPROGRESS once is retried; Homebrew does the same.
    lab.runner
        .answer("launchctl bootout", 36, "", "Operation now in progress");
    let r = lab.runner.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        r.answer("launchctl bootout", 0, "", "");
    });
    ServiceKind.prune("zot", &lab.host).unwrap();
    t.join().unwrap();
    let log = lab.runner.take_log();
    assert!(
        log.iter()
            .filter(|l| l.starts_with("launchctl bootout"))
            .count()
            >= 2,
        "{log:?}"
    );
}

#[test]
fn sandbox_never_calls_the_service_manager() {
    for platform in [Platform::Macos, Platform::Linux] {
        let dir = tempfile::tempdir().unwrap();
        let runner = RecordingRunner::new();
        let host = Host::new(Fs::new(dir.path()).unwrap(), true, platform)
            .with_runner(Arc::new(runner.clone()));
        let unit = Unit::new(spec("zot", service_job()), platform);
        assert!(unit.sandbox_note().unwrap().starts_with("files only"));
        let fields = converge(&unit, &host);
        assert_eq!(
            fields,
            [if platform == Platform::Macos {
                "plist"
            } else {
                "unit"
            }]
        );
        assert!(!unit.as_startable().unwrap().notified(&host).unwrap());
        ServiceKind.prune("zot", &host).unwrap();
        assert!(runner.take_log().is_empty(), "{platform:?}");
    }
}

#[test]
fn systemd_units_snapshot() {
    let unit = Unit::new(spec("zot", service_job()), Platform::Linux);
    let f = &unit.files()[0];
    assert_eq!(f.path, Path::new("/etc/systemd/system/zot.service"));
    insta::assert_snapshot!(
        "systemd_service_unit",
        String::from_utf8(f.content.clone()).unwrap()
    );
    let unit = Unit::new(
        spec("pg-backup", schedule_job("30 2 * * *")),
        Platform::Linux,
    );
    assert_eq!(unit.files().len(), 2);
    insta::assert_snapshot!(
        "systemd_schedule_units",
        format!(
            "{}\n{}",
            String::from_utf8(unit.files()[0].content.clone()).unwrap(),
            String::from_utf8(unit.files()[1].content.clone()).unwrap()
        )
    );
}

#[test]
fn systemctl_create_update_drift_remove() {
    let lab = lab(Platform::Linux);
    let unit = Unit::new(spec("zot", service_job()), Platform::Linux);
    lab.runner.answer(
        "systemctl show",
        0,
        "LoadState=not-found\nActiveState=inactive\nSubState=dead\nUnitFileState=\nMainPID=0\n",
        "",
    );
    assert_eq!(converge(&unit, &lab.host), ["unit", "state", "enabled"]);
    let log = lab.runner.take_log();
    assert!(
        log[1].starts_with("systemd-analyze verify --man=no "),
        "{log:?}"
    );
    assert!(log[1].ends_with("/zot.service"));
    assert_eq!(
        [&log[..1], &log[2..]].concat(),
        [
            "systemctl show -p LoadState,ActiveState,SubState,UnitFileState,MainPID zot.service",
            "systemctl daemon-reload",
            "systemctl enable zot.service",
            "systemctl start zot.service",
        ]
    );

    // Stopped by hand: started again, nothing else.
    lab.runner.answer(
        "systemctl show",
        0,
        "LoadState=loaded\nActiveState=inactive\nSubState=dead\nUnitFileState=enabled\nMainPID=0\n",
        "",
    );
    assert_eq!(converge(&unit, &lab.host), ["state"]);
    assert_eq!(lab.runner.take_log()[1..], ["systemctl start zot.service"]);

    // Unit edited by hand while running: rewritten, reloaded, restarted.
    std::fs::write(
        lab.host
            .fs
            .host_path(Path::new("/etc/systemd/system/zot.service")),
        "[Service]\nExecStart=/bin/true\n",
    )
    .unwrap();
    lab.runner.answer(
        "systemctl show",
        0,
        "LoadState=loaded\nActiveState=active\nSubState=running\nUnitFileState=enabled\nMainPID=77\n",
        "",
    );
    assert_eq!(converge(&unit, &lab.host), ["unit"]);
    let log = lab.runner.take_log();
    assert_eq!(
        log[2..],
        [
            "systemctl daemon-reload",
            "systemctl reenable zot.service",
            "systemctl restart zot.service",
        ]
    );

    // Removed from the module: disabled, stopped, file gone, reloaded.
    assert_eq!(
        ServiceKind.prune("zot", &lab.host).unwrap(),
        PruneOutcome::Removed
    );
    assert_eq!(
        lab.runner.take_log(),
        [
            "systemctl show -p LoadState,UnitFileState,ActiveState zot.service",
            "systemctl disable zot.service",
            "systemctl stop zot.service",
            "systemctl daemon-reload",
        ]
    );
}

#[test]
fn systemd_verify_failure_installs_nothing() {
    let lab = lab(Platform::Linux);
    let unit = Unit::new(spec("zot", service_job()), Platform::Linux);
    lab.runner.answer(
        "systemctl show",
        0,
        "LoadState=not-found\nActiveState=inactive\nSubState=dead\nUnitFileState=\nMainPID=0\n",
        "",
    );
    lab.runner.answer(
        "systemd-analyze verify",
        0,
        "",
        "/tmp/homelab-agent-verify.1.0.2/zot.service:9: Unknown key name 'Restartt' in section 'Service', ignoring.\n",
    );
    let live = unit.observe(&lab.host).unwrap();
    let changes = unit.diff(&live, &lab.host);
    let mut ctx = ApplyCtx::new(&lab.host);
    let err = unit
        .apply(&live, &changes, &mut ctx)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Unknown key name 'Restartt'"), "{err}");
    assert!(err.contains("the unit was not installed"), "{err}");
    assert!(lab
        .host
        .fs
        .meta(Path::new("/etc/systemd/system/zot.service"))
        .unwrap()
        .is_none());
}

/// The real `systemd-analyze` (on every Debian machine with systemd) accepts
/// every generated unit, and every calendar translation.
#[test]
fn real_systemd_analyze_accepts_units_and_calendars() {
    let host = Host::new(Fs::new(Path::new("/")).unwrap(), false, Platform::Linux);
    let mut s = spec("hla-verify-test", service_job());
    s.program = "/bin/sleep".into();
    s.args = vec![
        "3600".into(),
        "with space".into(),
        "100%".into(),
        "$HOME".into(),
    ];
    s.environment
        .insert("QUOTED".into(), "a \"b\" c\\d %n".into());
    s.working_directory = Some("/tmp".into());
    let unit = Unit::new(s.clone(), Platform::Linux);
    systemd::verify(unit.files(), &host).unwrap();
    s.job = schedule_job("*/15 9-17 * * mon-fri");
    s.name = "hla-verify-sched".into();
    let unit = Unit::new(s.clone(), Platform::Linux);
    systemd::verify(unit.files(), &host).unwrap();

    // A unit systemd would only warn about is refused (unknown key).
    let mut bad = unit.files().to_vec();
    bad[0].content =
        b"[Unit]\nDescription=x\n[Service]\nExecStart=/bin/true\nRestartt=always\n".to_vec();
    let err = systemd::verify(&bad, &host).unwrap_err().to_string();
    assert!(err.contains("Restartt"), "{err}");

    for expr in [
        "daily",
        "hourly",
        "weekly",
        "monthly",
        "yearly",
        "30 2 * * *",
        "*/15 * * * *",
        "0 9 * * mon-fri",
        "0 3 1,15 * *",
        "5 4 * jan,jul *",
        "0 0-6/2 * * sat,sun",
    ] {
        let oc = Calendar::parse(expr).unwrap().on_calendar();
        let out = std::process::Command::new("systemd-analyze")
            .args(["calendar", &oc])
            .output()
            .expect("systemd-analyze is installed");
        assert!(
            out.status.success(),
            "{expr} -> {oc}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `systemd:` settings replace the generated line of the same key and are
/// verified like the rest (an unknown key is refused).
#[test]
fn systemd_extra_settings_replace_generated_lines() {
    let mut s = spec("k3s", service_job());
    s.program = "/bin/sleep".into();
    s.args = vec!["3600".into()];
    s.systemd_extra = vec![
        ("Type".into(), "notify".into()),
        ("KillMode".into(), "process".into()),
        ("Delegate".into(), "yes".into()),
        ("LimitNOFILE".into(), "1048576".into()),
    ];
    let unit = String::from_utf8(systemd::service_unit(&s).into_bytes()).unwrap();
    assert_eq!(unit.matches("Type=").count(), 1, "{unit}");
    assert!(
        unit.contains("Type=notify\n") && unit.contains("KillMode=process\n"),
        "{unit}"
    );
    let host = Host::new(Fs::new(Path::new("/")).unwrap(), false, Platform::Linux);
    systemd::verify(Unit::new(s.clone(), Platform::Linux).files(), &host).unwrap();
    s.systemd_extra.push(("KillModee".into(), "process".into()));
    let err = systemd::verify(Unit::new(s, Platform::Linux).files(), &host)
        .unwrap_err()
        .to_string();
    assert!(err.contains("KillModee"), "{err}");
}

/// Without `systemd-analyze` the agent's own checks stand in: a good unit
/// passes (with quoted and escaped words), a program that is not there is
/// refused, and the host is warned once per run however many units verify.
#[test]
fn without_systemd_analyze_units_get_the_agents_own_checks_and_one_warning() {
    let runner = RecordingRunner::new();
    runner.missing("systemd-analyze");
    let host = Host::new(Fs::new(Path::new("/")).unwrap(), false, Platform::Linux)
        .with_runner(Arc::new(runner.clone()));
    let mut s = spec("hla-fallback", service_job());
    s.program = "/bin/sleep".into();
    s.args = vec![
        "3600".into(),
        "with space".into(),
        "100%".into(),
        "$HOME".into(),
    ];
    systemd::verify(Unit::new(s.clone(), Platform::Linux).files(), &host).unwrap();
    s.job = schedule_job("30 2 * * *");
    systemd::verify(Unit::new(s.clone(), Platform::Linux).files(), &host).unwrap();
    assert_eq!(host.warnings().len(), 1, "{:?}", host.warnings());
    assert!(host.warnings()[0].contains("systemd-analyze is not installed"));

    s.program = "/opt/nowhere/bin/zot".into();
    let err = systemd::verify(Unit::new(s.clone(), Platform::Linux).files(), &host)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Command /opt/nowhere/bin/zot is not executable"),
        "{err}"
    );
    assert!(err.contains("the unit was not installed"), "{err}");
    assert_eq!(host.warnings().len(), 1);

    // A program path that needs quoting is read back as systemd would.
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("my tool \"x\" 100%");
    std::fs::write(&odd, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&odd, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    s.program = odd.to_string_lossy().into_owned();
    systemd::verify(Unit::new(s.clone(), Platform::Linux).files(), &host).unwrap();

    // A line that is no setting (a `systemd:` value cannot make one, but a
    // hand-made file can) is refused.
    let mut bad = Unit::new(s, Platform::Linux).files().to_vec();
    bad[0].content =
        b"[Unit]\nDescription=x\n[Service]\nExecStart=/bin/true\nnot a setting\n".to_vec();
    let err = systemd::verify(&bad, &host).unwrap_err().to_string();
    assert!(
        err.contains(":5: not a section header nor Key=value"),
        "{err}"
    );
}
