//! The rollback event in a real log server: a rollback needs a real service
//! manager, so the agent runs inside the nspawn container
//! (`tests/src/nspawn.rs`, systemd as PID 1) and VictoriaLogs
//! (`tests/src/log_env.rs` builds it) runs there too, as a transient unit on
//! the container's own loopback (its network is private). The events are
//! read back from the server over that loopback (`nsenter -n curl`).

use std::time::Duration;

use homelab_agent_tests::nspawn::{Container, WORK_DIR};
use homelab_agent_tests::{log_env, stderr, stdout};

const HOST: &str =
    "platform: linux\nroots: [/etc/hla-demo, /var/lib/hla-demo]\nmodules:\n  - name: demo\n";

fn module(greeting: &str) -> String {
    format!(
        r#"description: "rollback to Loki"
resources:
  - directory: /etc/hla-demo
  - directory: /var/lib/hla-demo
  - file: /etc/hla-demo/demo.conf
    content: "greeting={greeting}\n"
    notify: ["service:hla-demo"]
  - service: hla-demo
    description: "demo daemon"
    program: /bin/sh
    args: ["-c", "if grep -q '^greeting=broken' /etc/hla-demo/demo.conf; then exit 1; fi; exec sleep infinity"]
    restart: on-failure
    restart_delay: 1s
    start_timeout: 4s
    after: ["directory:/var/lib/hla-demo"]
"#
    )
}

/// `curl` of the host in the container's network namespace.
fn curl(c: &Container, url: &str) -> Option<String> {
    let out = std::process::Command::new("nsenter")
        .args(["-t", &c.leader().to_string(), "-n", "--"])
        .args(["curl", "-sf", "--max-time", "5", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_rollback_is_an_event_in_the_real_log_server() {
    let c = Container::boot("loki-rollback");
    let work = c.work_dir();
    std::fs::copy(
        log_env::binaries().join("victoria-logs"),
        work.join("victoria-logs"),
    )
    .unwrap();
    let out = c.exec(&[
        "systemd-run",
        "--unit=vlogs",
        &format!("{WORK_DIR}/victoria-logs"),
        "-httpListenAddr=127.0.0.1:9428",
        &format!("-storageDataPath={WORK_DIR}/vl-data"),
        "-retentionPeriod=100y",
        "-loggerLevel=WARN",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.wait_until(
        "victoria-logs in the container",
        Duration::from_secs(30),
        || curl(&c, "http://127.0.0.1:9428/health").is_some(),
    );

    std::fs::create_dir_all(work.join("repo/hosts")).unwrap();
    std::fs::create_dir_all(work.join("repo/modules/demo")).unwrap();
    std::fs::write(work.join("repo/hosts/box.yaml"), HOST).unwrap();
    std::fs::write(
        work.join("agent.yaml"),
        format!(
            "repo: {WORK_DIR}/repo\nhost: box\nloki:\n  url: \"http://127.0.0.1:9428/insert/loki/api/v1/push?_msg_field=msg\"\n  batch_wait: 100ms\n"
        ),
    )
    .unwrap();
    let config = format!("{WORK_DIR}/agent.yaml");
    let apply = || c.agent(&["apply", "--config", &config]);

    std::fs::write(work.join("repo/modules/demo/module.yaml"), module("hello")).unwrap();
    let out = apply();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    std::fs::write(work.join("repo/modules/demo/module.yaml"), module("broken")).unwrap();
    let out = apply();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    assert!(text.contains("service:hla-demo rolled back"), "{text}");

    // Read back from the server, not the sender.
    let query =
        "http://127.0.0.1:9428/select/logsql/query?query=_stream%3A%7Bevent%3D%22rollback%22%7D";
    let mut rows = Vec::new();
    c.wait_until("the rollback event stored", Duration::from_secs(20), || {
        let _ = curl(&c, "http://127.0.0.1:9428/internal/force_flush");
        rows = curl(&c, query)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .collect();
        !rows.is_empty()
    });
    let text = serde_json::to_string(&rows).unwrap();
    eprintln!("rollback rows: {text}");
    assert!(
        rows.iter()
            .all(|r| r["job"] == "homelab-agent" && r["host"] == "box"),
        "{text}"
    );
    assert!(
        text.contains("service:hla-demo") || text.contains("demo.conf"),
        "{text}"
    );
    // The changes that were rolled back are events of their own too.
    let all = curl(
        &c,
        "http://127.0.0.1:9428/select/logsql/query?query=_stream%3A%7Bjob%3D%22homelab-agent%22%7D",
    )
    .unwrap_or_default();
    assert!(all.contains("\"event\":\"apply\""), "{all}");
}
