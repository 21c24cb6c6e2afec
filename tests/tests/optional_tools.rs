//! A host without `systemd-analyze` (a Synology NAS ships none): the agent
//! says so once per run and checks units with its own rules, and services
//! still converge on the real systemd of the nspawn container
//! (`tests/src/nspawn.rs`), from which `systemd-analyze` is removed.

use homelab_agent_tests::nspawn::{Container, WORK_DIR};
use homelab_agent_tests::{stderr, stdout};

const HOST: &str = "platform: linux\nroots: [/var/lib/hla-opt]\nmodules:\n  - name: demo\n";

const WARNING: &str = "systemd-analyze is not installed on this host";

fn module(broken: bool) -> String {
    let mut m = String::from(
        r#"resources:
  - directory: /var/lib/hla-opt
  - service: hla-one
    program: /bin/sleep
    args: ["infinity"]
    start_timeout: 3s
  - service: hla-two
    program: /bin/sleep
    args: ["infinity"]
    start_timeout: 3s
  - schedule: hla-tick
    program: /bin/true
    every: 1h
"#,
    );
    if broken {
        m.push_str(
            r#"  - service: hla-broken
    program: /opt/nowhere/bin/daemon
"#,
        );
    }
    m
}

fn show(o: &std::process::Output) -> String {
    format!("exit {:?}\n{}\n{}", o.status.code(), stdout(o), stderr(o))
}

#[test]
fn services_converge_without_systemd_analyze_with_one_warning() {
    let c = Container::boot("no-analyze");
    let out = c.exec(&["rm", "/usr/bin/systemd-analyze"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = c.exec(&["sh", "-c", "command -v systemd-analyze"]);
    assert!(
        !out.status.success(),
        "systemd-analyze still found: {}",
        show(&out)
    );

    let repo = c.work_dir().join("repo");
    std::fs::create_dir_all(repo.join("hosts")).unwrap();
    std::fs::create_dir_all(repo.join("modules/demo")).unwrap();
    std::fs::write(repo.join("hosts/box.yaml"), HOST).unwrap();
    std::fs::write(repo.join("modules/demo/module.yaml"), module(false)).unwrap();
    let repo_in = format!("{WORK_DIR}/repo");
    let apply = || c.agent(&["apply", "--repo", &repo_in, "--host", "box"]);

    // Three units, verified by the agent's own checks: one warning.
    let out = apply();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(stderr(&out).matches(WARNING).count(), 1, "{}", show(&out));
    for unit in ["hla-one.service", "hla-two.service", "hla-tick.timer"] {
        let p = c.show(unit, &["ActiveState", "UnitFileState"]);
        assert_eq!(p["ActiveState"], "active", "{unit}: {p:?}");
        assert_eq!(p["UnitFileState"], "enabled", "{unit}: {p:?}");
    }

    // In sync: nothing is verified, nothing is said.
    let out = apply();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(!stderr(&out).contains(WARNING), "{}", show(&out));

    // A program that is not there is still refused, before its unit is
    // installed; the others stay up.
    std::fs::write(repo.join("modules/demo/module.yaml"), module(true)).unwrap();
    let out = apply();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let text = show(&out);
    assert!(
        text.contains("Command /opt/nowhere/bin/daemon is not executable"),
        "{text}"
    );
    assert_eq!(text.matches(WARNING).count(), 1, "{text}");
    assert!(
        !c.root()
            .join("etc/systemd/system/hla-broken.service")
            .exists(),
        "the unit was installed"
    );
    assert_eq!(
        c.show("hla-one.service", &["ActiveState"])["ActiveState"],
        "active"
    );

    // The agent's own service installs the same way.
    std::fs::write(repo.join("modules/demo/module.yaml"), module(false)).unwrap();
    c.write(
        "/etc/homelab-agent/agent.yaml",
        &format!("repo: {repo_in}\nhost: box\npoll_interval: 1h\n"),
    );
    let out = c.agent(&[
        "install-service",
        "--config",
        "/etc/homelab-agent/agent.yaml",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(stderr(&out).matches(WARNING).count(), 1, "{}", show(&out));
    let p = c.show("homelab-agent.service", &["ActiveState", "SubState"]);
    assert_eq!(
        (p["ActiveState"].as_str(), p["SubState"].as_str()),
        ("active", "running"),
        "{p:?}"
    );
    let out = c.agent(&["uninstall-service"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}
