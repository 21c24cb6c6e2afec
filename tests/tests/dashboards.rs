//! The Grafana dashboard and the Prometheus alert rules as files:
//! structure (valid JSON, datasources as variables, an expression per
//! target, no overlapping panels, only metrics the agent exports, Loki
//! queries on the agent's three labels), `promtool check rules`, and a
//! `promtool test rules` case that fires every alert.

mod support;

use std::collections::BTreeSet;

use homelab_agent_tests::local_daemon::LocalLab;
use homelab_agent_tests::prometheus::promtool;
use homelab_agent_tests::workspace;

const EVENTS: [&str; 9] = [
    "apply",
    "drift",
    "correction",
    "prune",
    "refused",
    "rollback",
    "error",
    "suspend",
    "resume",
];

/// Metric names in the agent's `/metrics` (text format): every sample name
/// and every family name.
fn exported_names() -> BTreeSet<String> {
    let lab = LocalLab::new();
    lab.write(
        "hosts/lab.yaml",
        "platform: linux\nroots: [/srv]\nmodules:\n  - name: app\n",
    );
    lab.write(
        "modules/app/module.yaml",
        "resources:\n  - file: /srv/app.conf\n    content: \"x\\n\"\n",
    );
    lab.write_config("");
    let daemon = lab.start();
    let (_, text) = daemon.metrics(Some("text/plain"));
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next().unwrap(),
            None if line.starts_with('#') => continue,
            None => line.split(['{', ' ']).next().unwrap(),
        };
        names.insert(name.to_string());
    }
    assert!(names.len() > 10, "{text}");
    names
}

#[test]
fn the_dashboard_is_provisionable_and_only_names_exported_metrics() {
    let d = support::dashboard();
    let uid = d["uid"].as_str().unwrap();
    assert!(!uid.is_empty() && uid.len() <= 40, "uid {uid:?}");
    assert!(d["title"].is_string());
    assert!(d.get("id").is_none_or(|id| id.is_null()), "no fixed id");
    assert!(
        d.get("__inputs").is_none(),
        "file provisioning does not resolve __inputs"
    );

    // Datasource variables for Prometheus and Loki, a host variable.
    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(var("prom")["type"], "datasource");
    assert_eq!(var("prom")["query"], "prometheus");
    assert_eq!(var("loki")["type"], "datasource");
    assert_eq!(var("loki")["query"], "loki");
    let host = var("host");
    assert_eq!(host["type"], "query");
    assert_eq!(host["datasource"]["uid"], "${prom}");
    assert_eq!(host["includeAll"], true);
    assert_eq!(host["multi"], true);
    let ds_uid = |kind: &str| match kind {
        "prometheus" => "${prom}",
        "loki" => "${loki}",
        other => panic!("datasource type {other}"),
    };

    let panels = d["panels"].as_array().unwrap();
    assert!(panels.len() >= 12);
    let mut ids = BTreeSet::new();
    let mut rects = Vec::new();
    let mut prom_exprs = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id in {title}"
        );
        // The datasource is a variable, in the panel and in every target.
        let kind = p["datasource"]["type"].as_str().unwrap();
        assert_eq!(p["datasource"]["uid"], ds_uid(kind), "panel {title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no target");
        for t in targets {
            assert!(t["refId"].is_string(), "panel {title}");
            if let Some(tds) = t.get("datasource") {
                assert_eq!(tds["uid"], ds_uid(kind), "a target of {title}");
            }
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(
                !expr.trim().is_empty(),
                "a target of {title} has no expression"
            );
            assert!(
                expr.contains("$host"),
                "{title}: filter by the host variable: {expr}"
            );
            if kind == "prometheus" {
                prom_exprs.push((title.to_string(), expr.to_string()));
            } else {
                // LogQL on the agent's three stream labels only.
                let selector = &expr[expr.find('{').unwrap() + 1..expr.find('}').unwrap()];
                for matcher in selector.split(',') {
                    let (label, value) = matcher
                        .split_once(['=', '!'])
                        .unwrap_or_else(|| panic!("{title}: matcher {matcher}"));
                    let label = label.trim();
                    assert!(
                        ["job", "host", "event"].contains(&label),
                        "{title}: label {label}"
                    );
                    if label == "event" {
                        let value = value
                            .trim_start_matches(['=', '~', '!'])
                            .trim()
                            .trim_matches('"');
                        for v in value.split('|') {
                            assert!(EVENTS.contains(&v), "{title}: event {v}");
                        }
                    }
                    if label == "job" {
                        assert!(value.contains("\"homelab-agent\""), "{title}: {value}");
                    }
                }
            }
        }
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(
            w > 0 && h > 0 && x + w <= 24,
            "panel {title} leaves the 24-column grid"
        );
        rects.push((title.to_string(), x, y, w, h));
    }
    for (i, a) in rects.iter().enumerate() {
        for b in &rects[i + 1..] {
            let apart =
                a.1 + a.3 <= b.1 || b.1 + b.3 <= a.1 || a.2 + a.4 <= b.2 || b.2 + b.4 <= a.2;
            assert!(apart, "panels {:?} and {:?} overlap", a.0, b.0);
        }
    }
    // The panels the dashboard promises.
    let titles: BTreeSet<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Drifted now",
        "Drift and corrections",
        "Pending changes",
        "Runs by result",
        "Failures by phase",
        "Run duration p50 / p95",
        "Applied vs fetched revision per host",
        "Time since last success",
        "Suspended",
        "Recent drift and error events",
    ] {
        assert!(titles.contains(want), "no panel {want:?}");
    }

    // Every metric the dashboard (and the alert rules) name exists.
    let exported = exported_names();
    let mut missing = Vec::new();
    let named = prom_exprs
        .iter()
        .map(|(t, e)| (format!("panel {t}"), e.clone()))
        .chain(
            support::alerts()
                .into_iter()
                .map(|a| (format!("alert {}", a.name), a.expr)),
        )
        .chain([(
            "variable host".to_string(),
            host["definition"].as_str().unwrap().to_string(),
        )]);
    let mut count = 0;
    for (what, expr) in named {
        for name in support::metric_names(&expr) {
            count += 1;
            if !exported.contains(&name) {
                missing.push(format!("{what}: {name}"));
            }
        }
    }
    assert!(count > 25, "{count} metric references");
    assert!(
        missing.is_empty(),
        "not in /metrics:\n{}",
        missing.join("\n")
    );
}

#[test]
fn alert_rules_pass_promtool_and_every_alert_has_a_firing_test() {
    let dir = workspace().join("dashboards");
    let rules = dir.join("alerts.yaml");
    let out = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let alerts = support::alerts();
    assert!(
        said.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{said}"
    );

    let names: BTreeSet<String> = alerts.iter().map(|a| a.name.clone()).collect();
    for want in [
        "HomelabAgentDown",
        "HomelabAgentDriftPersisting",
        "HomelabAgentRunsFailing",
        "HomelabAgentAppliedBehindFetched",
        "HomelabAgentNoSuccessfulRun",
        "HomelabAgentLokiEventsDropped",
        "HomelabAgentSuspended",
    ] {
        assert!(names.contains(want), "no alert {want}");
    }
    for a in &alerts {
        // A summary that says what to do: a command to run or a setting.
        assert!(
            a.summary.len() > 80 && a.summary.contains('`'),
            "{}: summary does not say what to do: {:?}",
            a.name,
            a.summary
        );
    }
    let durations: Vec<(&str, Option<&str>)> = alerts
        .iter()
        .map(|a| (a.name.as_str(), a.for_.as_deref()))
        .collect();
    assert!(
        durations.contains(&("HomelabAgentDriftPersisting", Some("30m"))),
        "{durations:?}"
    );
    assert!(
        durations.contains(&("HomelabAgentAppliedBehindFetched", Some("15m"))),
        "{durations:?}"
    );
    assert!(
        alerts
            .iter()
            .any(|a| a.name == "HomelabAgentNoSuccessfulRun" && a.expr.contains("> 3600")),
        "no successful run in an hour"
    );

    let tested = support::alerts_tested_firing();
    let untested: Vec<&String> = names.difference(&tested).collect();
    assert!(
        untested.is_empty(),
        "alerts without a firing test: {untested:?}"
    );
    let tests = dir.join("alerts_test.yaml");
    // promtool resolves rule_files relative to the test file.
    // (promtool's run is bounded by the harness: a hang fails there.)
    let out = promtool(&["test", "rules", tests.to_str().unwrap()], None);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("SUCCESS"), "{said}");
}
