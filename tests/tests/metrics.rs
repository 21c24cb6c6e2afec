//! Metrics end to end: a real Prometheus (Debian package, `src/prometheus.rs`)
//! scrapes a running `agent run`; a drift shows up in PromQL and returns to
//! zero once healed; every expression of the dashboard and the alert rules
//! runs against that Prometheus; `promtool check metrics` finds nothing to
//! lint; `agent plan|apply --metrics-file` write a textfile-collector file.

mod support;

use std::time::Duration;

use homelab_agent_tests::local_daemon::{sample, wait_for_file, LocalLab};
use homelab_agent_tests::prometheus::{promtool, Prometheus};
use homelab_agent_tests::{stderr, workspace, Lab};

const HOST: &str = "platform: linux\nroots: [/srv]\nmodules:\n  - name: app\n";

fn module(notes_policy: &str) -> String {
    format!(
        "resources:\n  - directory: /srv/app\n  - file: /srv/app/heal.conf\n    content: \"port = 1\\n\"\n  - file: /srv/app/notes.txt\n    content: \"hands off\\n\"\n    on_drift: {notes_policy}\n"
    )
}

fn first(v: &[(serde_json::Value, f64)]) -> Option<f64> {
    v.first().map(|s| s.1)
}

#[test]
fn prometheus_scrapes_the_daemon_and_sees_drift_come_and_go() {
    let lab = LocalLab::new();
    lab.write("hosts/lab.yaml", HOST);
    lab.write("modules/app/module.yaml", &module("report"));
    lab.write_config("");
    let daemon = lab.start();
    let alerts = workspace().join("dashboards/alerts.yaml");
    let prom = Prometheus::start(&[("homelab-agent", &daemon.listen)], &[&alerts]);
    let limit = Duration::from_secs(30);
    prom.wait_for(
        "the first scrape",
        "up{job=\"homelab-agent\"}",
        limit,
        |v| first(v) == Some(1.0),
    );
    prom.wait_for(
        "the managed resources",
        "sum(homelab_agent_managed_resources{host=\"lab\"})",
        limit,
        |v| first(v) == Some(3.0),
    );
    let drifted = "sum by (host) (homelab_agent_drifted_resources{host=\"lab\"})";
    assert_eq!(first(&prom.vector(drifted)), Some(0.0));

    // A hand edit of a report-only file: drifted now, seen through PromQL.
    std::fs::write(lab.host_path("/srv/app/notes.txt"), "my notes\n").unwrap();
    let v = prom.wait_for("the drift", drifted, limit, |v| first(v) == Some(1.0));
    assert_eq!(v[0].0["host"], "lab");
    prom.wait_for(
        "the drift event",
        "homelab_agent_drift_events_total{host=\"lab\",module=\"app\",kind=\"file\"}",
        limit,
        |v| first(v) == Some(1.0),
    );
    assert_eq!(
        first(&prom.vector("sum by (host) (homelab_agent_pending_changes{host=\"lab\"})")),
        Some(0.0),
        "report-only drift is not pending"
    );

    // Healing it (the repo now says heal): back to zero, one correction.
    lab.write("modules/app/module.yaml", &module("heal"));
    wait_for_file(
        &lab.host_path("/srv/app/notes.txt"),
        "hands off\n",
        Duration::from_secs(10),
    );
    prom.wait_for("the drift to heal", drifted, limit, |v| {
        first(v) == Some(0.0)
    });
    prom.wait_for(
        "the correction",
        "sum(homelab_agent_drift_corrections_total{host=\"lab\"})",
        limit,
        |v| first(v) == Some(1.0),
    );

    // A heal-mode edit is healed at once; it shows as an increase.
    std::fs::write(lab.host_path("/srv/app/heal.conf"), "port = 2\n").unwrap();
    wait_for_file(
        &lab.host_path("/srv/app/heal.conf"),
        "port = 1\n",
        Duration::from_secs(10),
    );
    prom.wait_for(
        "the second correction",
        "sum(homelab_agent_drift_corrections_total{host=\"lab\"})",
        limit,
        |v| first(v) == Some(2.0),
    );
    prom.wait_for(
        "drift in the last minutes",
        "sum(increase(homelab_agent_drift_events_total{host=\"lab\"}[5m]))",
        limit,
        |v| first(v).is_some_and(|x| x > 0.0),
    );
    prom.wait_for(
        "successful runs",
        "sum(homelab_agent_runs_total{host=\"lab\",result=\"success\"})",
        limit,
        |v| first(v).is_some_and(|x| x >= 4.0),
    );
    let rev = prom.vector("homelab_agent_revision_info{host=\"lab\",role=\"applied\"}");
    assert_eq!(rev.len(), 1, "{rev:?}");
    assert!(rev[0].0["revision"].as_str().unwrap().starts_with("local-"));
    let runs = prom.vector("sum(homelab_agent_run_duration_seconds_count{host=\"lab\"})");
    assert!(first(&runs).is_some_and(|x| x >= 4.0), "{runs:?}");

    // Every expression of the dashboard and the alert rules runs and
    // returns a valid result.
    let mut failed = Vec::new();
    let mut empty = Vec::new();
    let mut checked = 0;
    for (panel, ds, expr) in support::dashboard_targets() {
        if ds != "prometheus" {
            continue;
        }
        let q = support::grafana_vars(&expr);
        checked += 1;
        match (prom.query(&q), prom.query_range(&q, 5)) {
            (Ok(data), Ok(_)) => {
                if data["result"].as_array().is_none_or(|r| r.is_empty()) {
                    empty.push(panel.clone());
                }
            }
            (Err(e), _) | (_, Err(e)) => failed.push(format!("panel {panel:?}: {q}: {e}")),
        }
    }
    for alert in support::alerts() {
        checked += 1;
        if let Err(e) = prom.query(&alert.expr) {
            failed.push(format!("alert {}: {}: {e}", alert.name, alert.expr));
        }
    }
    assert!(checked >= 25, "only {checked} expressions found");
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    // With one healthy, recently drifted host, every panel but the Kubernetes
    // errors (none here) has data.
    for panel in [
        "Drifted now",
        "Pending changes",
        "Time since last success",
        "Hosts behind their fetched revision",
        "Drift and corrections",
        "Drifted now by module",
        "Pending changes by module and kind",
        "Applied vs fetched revision per host",
        "Runs by result",
        "Failures by phase",
        "Run duration p50 / p95",
        "Phase duration p95 (and last run)",
        "Events to Loki",
    ] {
        assert!(
            !empty.contains(&panel.to_string()),
            "panel {panel:?} is empty"
        );
    }

    // The rules, loaded into this Prometheus, evaluate without errors.
    let start = std::time::Instant::now();
    loop {
        let rules = prom.api_get("/api/v1/rules");
        let all: Vec<&serde_json::Value> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().unwrap().iter())
            .collect();
        let evaluated = all.len() == support::alerts().len()
            && all.iter().all(|r| {
                r["health"] == "ok"
                    && !r["lastEvaluation"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("0001")
            });
        if evaluated {
            // A healthy host fires nothing.
            assert!(all.iter().all(|r| r["state"] == "inactive"), "{rules}");
            break;
        }
        assert!(
            start.elapsed() < limit,
            "rules not evaluated cleanly: {rules}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let targets = prom.api_get("/api/v1/targets");
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["health"], "up", "{targets}");
    assert_eq!(target["lastError"], "", "{targets}");
}

#[test]
fn promtool_finds_nothing_to_lint_in_the_metrics() {
    let lab = LocalLab::new();
    lab.write("hosts/lab.yaml", HOST);
    lab.write("modules/app/module.yaml", &module("report"));
    lab.write_config("");
    let daemon = lab.start();
    std::fs::write(lab.host_path("/srv/app/notes.txt"), "edited\n").unwrap();
    daemon.wait_metrics("the drift", Duration::from_secs(10), |m| {
        sample(
            m,
            "homelab_agent_drifted_resources{host=\"lab\",module=\"app\",kind=\"file\"}",
        ) == Some(1.0)
    });
    let (content_type, text) = daemon.metrics(Some("text/plain;version=0.0.4"));
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let out = promtool(&["check", "metrics"], Some(&text));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{text}"
    );
    // Conventions promtool does not check.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, ty) = (parts.next().unwrap(), parts.next().unwrap());
        assert!(name.starts_with("homelab_agent_"), "{line}");
        assert_eq!(ty == "counter", name.ends_with("_total"), "{line}");
        if name.contains("duration") || name.contains("timestamp") {
            assert!(name.ends_with("_seconds"), "{line}");
        }
        if name.ends_with("_info") {
            assert_eq!(ty, "gauge", "{line}");
        }
    }
    // No label that grows with the inventory: no ids, no paths.
    assert!(
        !text.contains("/srv/app") && !text.contains("resource="),
        "{text}"
    );

    let (content_type, om) = daemon.metrics(Some("application/openmetrics-text;version=1.0.0"));
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE homelab_agent_runs counter\n"), "{om}");
    assert!(
        om.contains("# UNIT homelab_agent_run_duration_seconds seconds\n"),
        "{om}"
    );
}

#[test]
fn plan_and_apply_write_a_textfile_for_the_node_exporter() {
    let lab = Lab::empty();
    lab.write("hosts/lab.yaml", HOST);
    lab.write("modules/app/module.yaml", &module("heal"));
    let dir = lab.tmp.path().join("textfile");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("homelab_agent.prom");
    let file_arg = file.to_str().unwrap();
    let read = || std::fs::read_to_string(&file).unwrap();
    let series =
        |what: &str| format!("homelab_agent_{what}{{host=\"lab\",module=\"app\",kind=\"file\"}}");

    // A plan before anything is applied: everything pending, nothing written.
    let out = lab.agent("plan", "lab", &["--metrics-file", file_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = read();
    assert_eq!(
        sample(&text, &series("managed_resources")),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &series("pending_changes")),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "homelab_agent_last_successful_run_timestamp_seconds{host=\"lab\"}"
        ),
        Some(0.0)
    );
    assert!(!lab.root().join("srv").exists(), "plan wrote to the host");

    let out = lab.agent("apply", "lab", &["--metrics-file", file_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = read();
    assert_eq!(
        sample(&text, &series("pending_changes")),
        Some(0.0),
        "{text}"
    );
    let success = sample(
        &text,
        "homelab_agent_last_successful_run_timestamp_seconds{host=\"lab\"}",
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - success).abs() < 120.0, "{success} vs {now}");
    assert!(
        text.contains(
            "homelab_agent_revision_info{host=\"lab\",role=\"applied\",revision=\"local-"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "homelab_agent_last_run_phase_duration_seconds{host=\"lab\",phase=\"apply\"}"
        ),
        "{text}"
    );
    let out = promtool(&["check", "metrics"], Some(&text));
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // One-shot runs write the snapshot only: no counters that restart at 0.
    assert!(!text.contains("_total"), "{text}");

    // A hand edit: the next plan reports it drifted and pending.
    std::fs::write(lab.host_path("/srv/app/heal.conf"), "port = 9\n").unwrap();
    let out = lab.agent("plan", "lab", &["--metrics-file", file_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = read();
    assert_eq!(
        sample(&text, &series("drifted_resources")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &series("pending_changes")),
        Some(1.0),
        "{text}"
    );
    // Replaced atomically: nothing but the file in its directory.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["homelab_agent.prom"]);

    // A file in a directory that does not exist: a clear error.
    let missing = lab.tmp.path().join("nowhere/agent.prom");
    let out = lab.agent(
        "plan",
        "lab",
        &["--metrics-file", missing.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("its directory does not exist"),
        "{}",
        stderr(&out)
    );
}
