//! Services and schedules against a real systemd (PID 1 of an nspawn
//! container, `tests/src/nspawn.rs`); the agent runs inside the container
//! and drives it with its own `systemctl`.
//!
//! One host, `box`: a config file that notifies `service:hla-demo`, an
//! unrelated file, the service (a shell that records each start and refuses
//! a config saying `greeting=broken`), and a schedule firing every 2 s.

use std::time::Duration;

use homelab_agent_tests::nspawn::{Container, WORK_DIR};
use homelab_agent_tests::{stderr, stdout};

const HOST: &str =
    "platform: linux\nroots: [/etc/hla-demo, /var/lib/hla-demo]\nmodules:\n  - name: demo\n";

fn module(greeting: &str, unrelated: &str, with_service: bool) -> String {
    let mut m = format!(
        r#"description: "systemd end-to-end demo"
resources:
  - directory: /etc/hla-demo
  - directory: /var/lib/hla-demo
  - file: /etc/hla-demo/demo.conf
    content: "greeting={greeting}\n"
    {notify}
  - file: /etc/hla-demo/unrelated.txt
    content: "{unrelated}\n"
  - schedule: hla-tick
    program: /bin/sh
    args: ["-c", "date +%s.%N >> /var/lib/hla-demo/ticks"]
    every: 2s
    after: ["directory:/var/lib/hla-demo"]
"#,
        notify = if with_service {
            r#"notify: ["service:hla-demo"]"#
        } else {
            ""
        }
    );
    if with_service {
        m.push_str(
            r#"  - service: hla-demo
    description: "demo daemon"
    program: /bin/sh
    args: ["-c", "echo start >> /var/lib/hla-demo/starts; if grep -q '^greeting=broken' /etc/hla-demo/demo.conf; then exit 1; fi; exec sleep infinity"]
    restart: on-failure
    restart_delay: 1s
    start_timeout: 4s
    after: ["directory:/var/lib/hla-demo"]
"#,
        );
    }
    m
}

struct Box {
    c: Container,
}

impl Box {
    fn boot(name: &str) -> Box {
        let c = Container::boot(name);
        let repo = c.work_dir().join("repo");
        std::fs::create_dir_all(repo.join("hosts")).unwrap();
        std::fs::create_dir_all(repo.join("modules/demo")).unwrap();
        std::fs::write(repo.join("hosts/box.yaml"), HOST).unwrap();
        Box { c }
    }

    fn module(&self, text: &str) {
        std::fs::write(
            self.c.work_dir().join("repo/modules/demo/module.yaml"),
            text,
        )
        .unwrap();
    }

    fn agent(&self, cmd: &str, extra: &[&str]) -> std::process::Output {
        let repo = format!("{WORK_DIR}/repo");
        let mut args = vec![cmd, "--repo", repo.as_str(), "--host", "box"];
        args.extend_from_slice(extra);
        self.c.agent(&args)
    }

    fn prop(&self, unit: &str, p: &str) -> String {
        self.c.show(unit, &[p]).get(p).cloned().unwrap_or_default()
    }

    fn starts(&self) -> usize {
        let out = self.c.exec(&["cat", "/var/lib/hla-demo/starts"]);
        stdout(&out).lines().count()
    }

    fn cat(&self, path: &str) -> String {
        stdout(&self.c.exec(&["cat", path]))
    }
}

fn show(o: &std::process::Output) -> String {
    format!("exit {:?}\n{}\n{}", o.status.code(), stdout(o), stderr(o))
}

#[test]
fn services_and_schedules_converge_on_real_systemd() {
    let b = Box::boot("services");

    // 1. Apply: service active + enabled, timer active + enabled.
    b.module(&module("hello", "one", true));
    let out = b.agent("apply", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(b.prop("hla-demo.service", "ActiveState"), "active");
    assert_eq!(b.prop("hla-demo.service", "SubState"), "running");
    assert_eq!(b.prop("hla-demo.service", "UnitFileState"), "enabled");
    assert_eq!(b.prop("hla-tick.timer", "ActiveState"), "active");
    assert_eq!(b.prop("hla-tick.timer", "UnitFileState"), "enabled");
    assert_eq!(b.starts(), 1, "started once, after its config was in place");

    // 2. Nothing to do.
    let out = b.agent("plan", &["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(stdout(&out).contains("No changes"), "{}", show(&out));

    // 3. The timer fires the scheduled job.
    b.c.wait_until(
        "the timer ran hla-tick twice",
        Duration::from_secs(20),
        || b.cat("/var/lib/hla-demo/ticks").lines().count() >= 2,
    );

    // 4. A config change restarts the service exactly once.
    let pid = b.prop("hla-demo.service", "MainPID");
    b.module(&module("hi", "one", true));
    let out = b.agent("apply", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        stdout(&out)
            .contains("service:hla-demo restarted; notified by file:/etc/hla-demo/demo.conf"),
        "{}",
        show(&out)
    );
    let new_pid = b.prop("hla-demo.service", "MainPID");
    assert_ne!(new_pid, pid, "restarted");
    assert_eq!(b.starts(), 2, "exactly one restart");

    // 5. A change to a file that notifies nothing restarts nothing.
    b.module(&module("hi", "two", true));
    let out = b.agent("apply", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(b.prop("hla-demo.service", "MainPID"), new_pid);
    assert_eq!(b.starts(), 2);

    // 6. Stopped by hand: drift in the plan; apply starts it.
    let stop = b.c.systemctl(&["stop", "hla-demo.service"]);
    assert!(stop.status.success(), "{}", show(&stop));
    let out = b.agent("plan", &["--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let text = stdout(&out);
    assert!(text.contains("! service:hla-demo"), "{text}");
    assert!(
        text.contains("state: stopped (inactive/dead) -> running"),
        "{text}"
    );
    let out = b.agent("apply", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        stdout(&out).contains("service:hla-demo drift healed"),
        "{}",
        show(&out)
    );
    assert_eq!(b.prop("hla-demo.service", "ActiveState"), "active");

    // 7. Disabled and unit edited by hand: both healed.
    b.c.systemctl(&["disable", "hla-demo.service"]);
    let out = b.agent("plan", &[]);
    assert!(
        stdout(&out).contains("enabled: false -> true"),
        "{}",
        show(&out)
    );
    let unit = b.cat("/etc/systemd/system/hla-demo.service");
    b.c.write(
        "/etc/systemd/system/hla-demo.service",
        &unit.replace("RestartSec=1", "RestartSec=30"),
    );
    let out = b.agent("apply", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(b.prop("hla-demo.service", "UnitFileState"), "enabled");
    assert_eq!(b.cat("/etc/systemd/system/hla-demo.service"), unit);
    assert_eq!(b.prop("hla-demo.service", "NeedDaemonReload"), "no");

    // 8. A change that makes the service fail: rolled back, running the old config.
    let before = b.starts();
    b.module(&module("broken", "two", true));
    let out = b.agent("apply", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let text = stdout(&out);
    assert!(text.contains("service:hla-demo rolled back"), "{text}");
    assert!(
        text.contains("running the previous configuration"),
        "{text}"
    );
    assert!(
        text.contains("file:/etc/hla-demo/demo.conf: rolled back: service:hla-demo did not come up with this change"),
        "{text}"
    );
    assert_eq!(b.cat("/etc/hla-demo/demo.conf"), "greeting=hi\n");
    assert_eq!(b.prop("hla-demo.service", "ActiveState"), "active");
    assert!(
        b.starts() > before + 1,
        "tried the new config, then the old one"
    );
    // Held: the same change is not retried until git changes it.
    let out = b.agent("plan", &[]);
    assert!(
        stdout(&out).contains("? file:/etc/hla-demo/demo.conf  (module demo) skipped: held"),
        "{}",
        show(&out)
    );
    let pid = b.prop("hla-demo.service", "MainPID");
    let out = b.agent("apply", &[]);
    assert_eq!(b.prop("hla-demo.service", "MainPID"), pid, "{}", show(&out));
    // A fix is applied normally.
    b.module(&module("fixed", "two", true));
    let out = b.agent("apply", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(b.cat("/etc/hla-demo/demo.conf"), "greeting=fixed\n");

    // 9. The service leaves the module: stopped, disabled, unit removed, reloaded.
    b.module(&module("fixed", "two", false));
    let out = b.agent("apply", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        stdout(&out).contains("- service:hla-demo removed"),
        "{}",
        show(&out)
    );
    assert_eq!(b.prop("hla-demo.service", "LoadState"), "not-found");
    assert_eq!(b.prop("hla-demo.service", "ActiveState"), "inactive");
    let ls =
        b.c.exec(&["ls", "/etc/systemd/system/multi-user.target.wants"]);
    assert!(!stdout(&ls).contains("hla-demo"), "{}", show(&ls));
    assert!(
        b.c.exec(&["test", "-e", "/etc/systemd/system/hla-demo.service"])
            .status
            .code()
            == Some(1)
    );
}

#[test]
fn agent_installs_and_removes_its_own_service() {
    let b = Box::boot("install");
    b.module(&module("hello", "one", false));
    let config = format!("{WORK_DIR}/agent.yaml");
    std::fs::write(
        b.c.work_dir().join("agent.yaml"),
        format!(
            "repo: {WORK_DIR}/repo\nhost: box\nlisten: 127.0.0.1:9464\nstate_dir: /var/lib/homelab-agent\npoll_interval: 1h\n"
        ),
    )
    .unwrap();
    let out = b.c.agent(&["install-service", "--config", &config]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(b.prop("homelab-agent.service", "ActiveState"), "active");
    assert_eq!(b.prop("homelab-agent.service", "UnitFileState"), "enabled");
    // The daemon under systemd converges the host by itself.
    b.c.wait_until(
        "the daemon applied the host",
        Duration::from_secs(30),
        || b.cat("/etc/hla-demo/unrelated.txt") == "one\n",
    );
    let out = b.c.agent(&["uninstall-service"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(b.prop("homelab-agent.service", "LoadState"), "not-found");
}
