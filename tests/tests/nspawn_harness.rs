//! The nspawn harness itself (`tests/src/nspawn.rs`): a real systemd boots
//! as PID 1 of a container, runs a unit we write, runs the agent built by
//! this workspace, and leaves nothing behind when stopped.

use std::time::Duration;

use homelab_agent_tests::nspawn::{Container, WORK_DIR};
use homelab_agent_tests::stdout;

fn text(o: &std::process::Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn host_mounts() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count()
}

#[test]
fn real_systemd_runs_a_unit_and_stops_cleanly() {
    let mounts_before = host_mounts();
    let mut c = Container::boot("harness");
    assert!(
        c.failed_units.is_empty(),
        "a clean tree boots without failed units: {:?}",
        c.failed_units
    );

    let state = c.systemctl(&["is-system-running"]);
    assert_eq!(stdout(&state).trim(), "running", "{}", text(&state));
    let pid1 = c.exec(&["cat", "/proc/1/comm"]);
    assert_eq!(stdout(&pid1).trim(), "systemd", "{}", text(&pid1));
    // Loopback only (--private-network).
    let links = c.exec(&["ip", "-o", "link"]);
    let names: Vec<String> = stdout(&links)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
        .collect();
    assert_eq!(names, ["lo"], "{}", text(&links));

    c.write(
        "/etc/systemd/system/hla-sleeper.service",
        "[Unit]\nDescription=harness test unit\n\n[Service]\nExecStart=/bin/sleep infinity\n",
    );
    let reload = c.systemctl(&["daemon-reload"]);
    assert!(reload.status.success(), "{}", text(&reload));
    let start = c.systemctl(&["start", "hla-sleeper.service"]);
    assert!(start.status.success(), "{}", text(&start));
    let props = c.show(
        "hla-sleeper.service",
        &["MainPID", "ActiveState", "SubState"],
    );
    assert_eq!(props["ActiveState"], "active", "{props:?}");
    assert_eq!(props["SubState"], "running", "{props:?}");
    let main_pid: u32 = props["MainPID"].parse().unwrap();
    assert!(main_pid > 1, "{props:?}");
    // The pid is the container's: its /proc knows it as our sleep (once
    // the forked child has exec'd: `start` of a simple service returns
    // right after the fork).
    let proc_cmdline = format!("/proc/{main_pid}/cmdline");
    c.wait_until("MainPID runs /bin/sleep", Duration::from_secs(10), || {
        stdout(&c.exec(&["cat", &proc_cmdline])) == "/bin/sleep\0infinity\0"
    });
    // The unit runs in the container's cgroup subtree, not the host's.
    let cgroups = c.cgroups().to_vec();
    let in_ours = cgroups.iter().any(|d| {
        walk_procs(d).len() > 1 // systemd, journald, the sleeper...
    });
    assert!(in_ours, "container processes live under {cgroups:?}");

    let stop = c.systemctl(&["stop", "hla-sleeper.service"]);
    assert!(stop.status.success(), "{}", text(&stop));
    c.wait_until("the unit is inactive", Duration::from_secs(10), || {
        c.show("hla-sleeper.service", &["ActiveState"])["ActiveState"] == "inactive"
    });

    let leader = c.leader();
    let halt = c.stop();
    eprintln!("nspawn: halted in {:.2}s", halt.took.as_secs_f64());
    assert!(
        halt.status.is_some_and(|s| s.success()),
        "a clean halt: {halt:?}"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{leader}")).exists(),
        "the container's PID 1 is gone"
    );
    for d in &cgroups {
        assert!(!d.exists(), "{} removed", d.display());
    }
    assert_eq!(host_mounts(), mounts_before, "no mounts left on the host");
}

fn walk_procs(dir: &std::path::Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().unwrap().is_dir() {
                out.extend(walk_procs(&e.path()));
            }
        }
    }
    out
}

#[test]
fn cgroups_of_a_killed_test_process_are_swept() {
    // A test process killed outright leaves its cgroup directories behind;
    // the next boot removes those whose owner is gone.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let stale = if std::path::Path::new("/sys/fs/cgroup/unified").is_dir() {
        std::path::PathBuf::from(format!("/sys/fs/cgroup/unified/hla-nspawn-{dead}-0"))
    } else {
        std::path::PathBuf::from(format!("/sys/fs/cgroup/hla-nspawn-{dead}-0"))
    };
    std::fs::create_dir(&stale).unwrap();
    std::fs::create_dir(stale.join("payload")).unwrap();
    let _c = Container::boot("sweep");
    assert!(!stale.exists(), "{} swept", stale.display());
}

#[test]
fn the_agent_runs_inside_with_a_shared_work_dir() {
    let c = Container::boot("agent-bin");
    let version = c.agent(&["--version"]);
    assert!(version.status.success(), "{}", text(&version));
    assert!(stdout(&version).starts_with("agent "), "{}", text(&version));
    let kinds = c.agent(&["kinds"]);
    assert!(kinds.status.success(), "{}", text(&kinds));
    assert!(stdout(&kinds).contains("file"), "{}", text(&kinds));

    // The work dir is shared both ways; the build dir is read-only inside.
    std::fs::write(c.work_dir().join("from-host"), "hello\n").unwrap();
    let cat = c.exec(&["cat", &format!("{WORK_DIR}/from-host")]);
    assert_eq!(stdout(&cat), "hello\n", "{}", text(&cat));
    let touch = c.exec(&["touch", &format!("{WORK_DIR}/from-inside")]);
    assert!(touch.status.success(), "{}", text(&touch));
    assert!(c.work_dir().join("from-inside").exists());
    let ro = c.exec(&["touch", "/opt/hla/bin/nope"]);
    assert!(!ro.status.success(), "the build dir is read-only inside");
}
