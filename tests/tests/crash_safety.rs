//! Crash safety: SIGKILL `agent apply` at several points while it converges
//! 2,000 files. Every file must hold one complete version (never a partial
//! write), the next apply must finish the job, and the state must match the
//! disk afterwards (nothing left to do, every file owned as *created*).

use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use homelab_agent_tests::{agent, stderr, stdout, Lab};

const FILES: usize = 2000;
const DIRS: usize = 20;

fn write_repo(lab: &Lab, version: u32) {
    lab.write(
        "hosts/lab.yaml",
        &format!("platform: linux\nroots: [/srv]\nmodules:\n  - name: many\n    params:\n      version: {version}\n"),
    );
    let mut module =
        String::from("params:\n  version:\n    type: int\n    required: true\nresources:\n");
    for d in 0..DIRS {
        module.push_str(&format!("  - directory: /srv/d{d:02}\n"));
    }
    for f in 0..FILES {
        module.push_str(&format!(
            "  - file: /srv/d{:02}/f{f:05}.conf\n    template: item.j2\n    mode: \"0640\"\n",
            f % DIRS
        ));
    }
    lab.write("modules/many/module.yaml", &module);
    // ~4 KiB per file, so a torn write would be visible.
    lab.write(
        "modules/many/templates/item.j2",
        "{% for i in range(200) %}version {{ params.version }} line {{ i }}\n{% endfor %}",
    );
}

fn content(version: u32) -> Vec<u8> {
    (0..200)
        .map(|i| format!("version {version} line {i}\n"))
        .collect::<String>()
        .into_bytes()
}

fn apply_args(lab: &Lab) -> Vec<String> {
    vec![
        "apply".into(),
        "--repo".into(),
        lab.repo().display().to_string(),
        "--root".into(),
        lab.root().display().to_string(),
        "--host".into(),
        "lab".into(),
    ]
}

/// Every managed file holds exactly one of `allowed`, in full.
fn check_files(lab: &Lab, allowed: &HashSet<Vec<u8>>, after_kill_at: Duration) {
    for f in 0..FILES {
        let path = lab.host_path(&format!("/srv/d{:02}/f{f:05}.conf", f % DIRS));
        let got = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{} after kill at {after_kill_at:?}: {e}", path.display()));
        assert!(
            allowed.contains(&got),
            "{} is torn after kill at {after_kill_at:?}: {} bytes",
            path.display(),
            got.len()
        );
    }
}

#[test]
fn sigkill_mid_apply_leaves_whole_files_and_the_next_apply_finishes() {
    let lab = Lab::empty();
    write_repo(&lab, 1);
    let started = Instant::now();
    let out = agent().args(apply_args(&lab)).output().unwrap();
    let full = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut allowed: HashSet<Vec<u8>> = HashSet::from([content(1)]);

    // Kill points spread over one full apply's duration, plus a very early
    // one. Run times vary with machine load: a kill that came too late (the
    // apply had finished) shrinks the estimate and adds another attempt.
    let mut estimate = full;
    let mut queue: std::collections::VecDeque<f64> = [0.0]
        .into_iter()
        .chain((1..=6).map(|i| f64::from(i) / 7.0))
        .collect();
    let mut killed_mid_run = 0;
    let mut attempts = 0u32;
    while let Some(fraction) = queue.pop_front() {
        attempts += 1;
        let at = estimate.mul_f64(fraction).max(Duration::from_millis(2));
        let version = 1 + attempts;
        write_repo(&lab, version);
        allowed.insert(content(version));
        let mut child = agent()
            .args(apply_args(&lab))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        if child.try_wait().unwrap().is_none() {
            killed_mid_run += 1;
        } else if attempts < 20 {
            estimate = estimate.mul_f64(0.5);
            queue.push_back(fraction);
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        check_files(&lab, &allowed, at);
    }
    assert!(
        killed_mid_run >= 3,
        "only {killed_mid_run} kills landed mid-run; the test proves little"
    );

    // The next apply completes; afterwards the state matches the disk.
    let final_version = 100;
    write_repo(&lab, final_version);
    let out = agent().args(apply_args(&lab)).output().unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    check_files(
        &lab,
        &HashSet::from([content(final_version)]),
        Duration::ZERO,
    );
    let mut plan = apply_args(&lab);
    plan[0] = "plan".into();
    plan.push("--detailed-exitcode".into());
    let out = agent().args(&plan).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "state and disk disagree:\n{}",
        stdout(&out)
    );

    let store =
        homelab_agent_state::Store::open_read_only(&lab.root().join("var/lib/homelab-agent"))
            .unwrap();
    let inventory = store.inventory("lab").unwrap();
    assert_eq!(inventory.len(), FILES + DIRS);
    for (id, entry) in &inventory {
        assert!(entry.digest.is_some(), "{id} left unconfirmed");
        assert_eq!(
            entry.origin,
            homelab_agent_state::Origin::Created,
            "{id}: the agent created it, even across crashes"
        );
    }
    // No temp file of a killed run survives.
    for d in 0..DIRS {
        for entry in std::fs::read_dir(lab.host_path(&format!("/srv/d{d:02}"))).unwrap() {
            let name = entry.unwrap().file_name();
            assert!(
                !name.to_string_lossy().contains(".hla-tmp."),
                "stale temp file {name:?}"
            );
        }
    }
}

/// An agent killed while its state database is open leaves it needing
/// recovery; the next plan and apply recover it (under the lock) instead of
/// failing, and keep what it recorded.
#[test]
fn a_state_database_left_open_by_a_killed_agent_is_recovered() {
    use std::io::BufRead;
    let lab = Lab::empty();
    lab.write(
        "hosts/lab.yaml",
        "platform: linux\nroots: [/srv]\nmodules: [{name: m}]\n",
    );
    lab.write(
        "modules/m/module.yaml",
        "resources:\n  - file: /srv/a\n    content: \"a\\n\"\n",
    );
    let state = lab.root().join("var/lib/homelab-agent");
    let mut holder = std::process::Command::new(env!("CARGO_BIN_EXE_hold-state"))
        .arg(&state)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    holder.kill().unwrap(); // SIGKILL with the database open
    holder.wait().unwrap();
    assert!(
        matches!(
            homelab_agent_state::Store::open_read_only(&state),
            Err(homelab_agent_state::StateError::NeedsRecovery { .. })
        ),
        "the scenario: a killed writer leaves the database needing recovery"
    );

    let mut plan = apply_args(&lab);
    plan[0] = "plan".into();
    let out = agent().args(&plan).output().unwrap();
    assert!(out.status.success(), "plan after a crash: {}", stderr(&out));
    // The record the killed process committed is still there: its resource
    // left the catalog, so the plan prunes it.
    assert!(
        stdout(&out).contains("- file:/srv/held  (module held) will be removed"),
        "{}",
        stdout(&out)
    );
    let out = agent().args(apply_args(&lab)).output().unwrap();
    assert!(
        out.status.success(),
        "apply after a crash: {}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(lab.host_path("/srv/a")).unwrap(),
        "a\n"
    );
}
