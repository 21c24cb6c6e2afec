//! Reading the dashboard and the alert rules the way Grafana and Prometheus
//! do, for `metrics.rs` and `dashboards.rs`.
#![allow(dead_code)]

use std::collections::BTreeSet;

use homelab_agent::desired::yaml::{self, Node, Value};
use homelab_agent_tests::workspace;

pub fn dashboard() -> serde_json::Value {
    let path = workspace().join("dashboards/homelab-agent.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// (panel title, datasource type, expression) of every dashboard target.
pub fn dashboard_targets() -> Vec<(String, String, String)> {
    let d = dashboard();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        let ds = p["datasource"]["type"].as_str().unwrap_or("").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap_or("").to_string(),
                ds.clone(),
                t["expr"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

fn get<'a>(node: &'a Node, key: &str) -> Option<&'a Node> {
    match &node.value {
        Value::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
        _ => None,
    }
}

fn items(node: Option<&Node>) -> &[Node] {
    match node.map(|n| &n.value) {
        Some(Value::Seq(items)) => items,
        _ => &[],
    }
}

/// A YAML file of the repo, parsed.
pub fn yaml_file(rel: &str) -> Node {
    let text = std::fs::read_to_string(workspace().join(rel)).unwrap();
    yaml::parse(rel, &text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// One alerting rule of dashboards/alerts.yaml.
pub struct Alert {
    pub name: String,
    pub expr: String,
    pub summary: String,
    pub for_: Option<String>,
}

pub fn alerts() -> Vec<Alert> {
    let doc = yaml_file("dashboards/alerts.yaml");
    let mut out = Vec::new();
    for group in items(get(&doc, "groups")) {
        for rule in items(get(group, "rules")) {
            let s = |k: &str| get(rule, k).and_then(|n| n.as_str()).map(str::to_string);
            out.push(Alert {
                name: s("alert").expect("every rule is an alert"),
                expr: s("expr").expect("every rule has an expr"),
                summary: get(rule, "annotations")
                    .and_then(|a| get(a, "summary"))
                    .and_then(|n| n.as_str())
                    .unwrap_or("")
                    .to_string(),
                for_: s("for"),
            });
        }
    }
    out
}

/// Alert names with a firing case (non-empty `exp_alerts`) in
/// dashboards/alerts_test.yaml.
pub fn alerts_tested_firing() -> BTreeSet<String> {
    let doc = yaml_file("dashboards/alerts_test.yaml");
    let mut out = BTreeSet::new();
    for test in items(get(&doc, "tests")) {
        for case in items(get(test, "alert_rule_test")) {
            if !items(get(case, "exp_alerts")).is_empty() {
                if let Some(name) = get(case, "alertname").and_then(|n| n.as_str()) {
                    out.insert(name.to_string());
                }
            }
        }
    }
    out
}

/// Grafana's variables replaced by what a query would see with "All"
/// hosts selected, so Prometheus can run the expression.
pub fn grafana_vars(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h")
        .replace("$host", ".*")
}

/// Every `homelab_agent_*` name in an expression (series names, such as
/// `..._bucket`, as written).
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("homelab_agent_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}
