//! The stack files, decoded: a host's `stacks:` entries and
//! `k8s/<stack>/stack.yaml`. Decoding collects every problem with file:line;
//! nothing here renders manifests or talks to a cluster.

use std::time::Duration;

use crate::desired::model::{on_drift, DriftPolicy};
use crate::syntax::diag::{Diagnostic, Diagnostics};
use crate::syntax::yaml::{MapReader, Node, Value};

/// How a host reaches the cluster a stack lives in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterAccess {
    /// A context of the kubeconfig (`None`: the kubeconfig's current context).
    Kubeconfig { context: Option<String> },
    /// The service account of the pod the agent runs in.
    InCluster,
}

impl ClusterAccess {
    /// `context minikube`, `the current context`, `in-cluster config`: for messages.
    pub fn describe(&self) -> String {
        match self {
            ClusterAccess::Kubeconfig { context: Some(c) } => format!("context {c}"),
            ClusterAccess::Kubeconfig { context: None } => "the current context".to_string(),
            ClusterAccess::InCluster => "in-cluster config".to_string(),
        }
    }
}

/// One entry of a host's `stacks:`.
#[derive(Debug, Clone)]
pub struct StackUse {
    pub name: String,
    /// Line of the entry in the host file.
    pub line: usize,
    /// `context:` of the entry (overrides the stack's own `context`).
    pub context: Option<String>,
    pub in_cluster: bool,
    pub on_drift: Option<DriftPolicy>,
}

const STACK_USE_KEYS: &[&str] = &["name", "context", "in_cluster", "on_drift"];

/// Whether `name` can be a stack (a folder under `k8s/`, part of a label value).
pub fn valid_stack_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Reads a host's `stacks:` list (a name, or a map with `name`).
pub fn parse_stack_uses(
    r: &mut MapReader<'_>,
    file: &str,
    diags: &mut Diagnostics,
) -> Vec<StackUse> {
    let mut out: Vec<StackUse> = Vec::new();
    for item in r.list("stacks", diags).unwrap_or_default() {
        let parsed = match &item.value {
            Value::Str(name) => Some(StackUse {
                name: name.clone(),
                line: item.line,
                context: None,
                in_cluster: false,
                on_drift: None,
            }),
            _ => {
                let Some(mut m) = MapReader::new(file, "a `stacks` entry", item, diags) else {
                    continue;
                };
                let found = m.take("name");
                let name = match m.require("name", found, diags) {
                    Some(n) => match n.as_str() {
                        Some(s) => Some(s.to_string()),
                        None => {
                            diags.push(
                                Diagnostic::new(file, "a stack `name` must be a string")
                                    .line(n.line),
                            );
                            None
                        }
                    },
                    None => None,
                };
                let context = m.string("context", diags);
                let in_cluster = m.bool("in_cluster", diags).unwrap_or(false);
                let policy = on_drift(&mut m, diags);
                m.finish(STACK_USE_KEYS, diags);
                if let (Some((_, line)), true) = (&context, in_cluster) {
                    diags.push(
                        Diagnostic::new(file, "a stack entry has both `context` and `in_cluster: true`")
                            .line(*line)
                            .hint("use `context:` for a kubeconfig context, or `in_cluster: true` when the agent runs in a pod of that cluster"),
                    );
                }
                name.map(|name| StackUse {
                    name,
                    line: item.line,
                    context: context.map(|(c, _)| c),
                    in_cluster,
                    on_drift: policy,
                })
            }
        };
        let Some(stack) = parsed else { continue };
        if !valid_stack_name(&stack.name) {
            diags.push(
                Diagnostic::new(file, format!("`{}` is not a valid stack name", stack.name))
                    .line(stack.line)
                    .hint("stack names are folders under k8s/: lower-case letters, digits and `-`, at most 40 characters"),
            );
            continue;
        }
        if let Some(first) = out.iter().find(|s| s.name == stack.name) {
            diags.push(
                Diagnostic::new(file, format!("stack {} is listed twice", stack.name))
                    .line(stack.line)
                    .hint(format!(
                        "remove one of the two entries (the first is at line {})",
                        first.line
                    )),
            );
            continue;
        }
        out.push(stack);
    }
    out
}

/// A ConfigMap generated from files of the repository at apply time
/// (`config_maps:` in stack.yaml): one key per file, named after the file.
#[derive(Debug, Clone)]
pub struct GeneratedConfigMap {
    /// What is generated: a ConfigMap (`config_maps:`), or a
    /// PrometheusRule whose `spec` is the one rules file (`prometheus_rules:`).
    pub kind: GeneratedKind,
    pub name: String,
    pub namespace: Option<String>,
    pub labels: Vec<(String, String)>,
    /// Repo-relative paths, with the line that names each.
    pub files: Vec<(String, usize)>,
    pub line: usize,
}

/// The kinds of generated objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeneratedKind {
    ConfigMap,
    /// monitoring.coreos.com/v1 PrometheusRule from a Prometheus rules file
    /// (`groups:`), taken verbatim (alert templates are Go templates).
    PrometheusRule,
}

/// `k8s/<stack>/stack.yaml`.
#[derive(Debug, Clone)]
pub struct StackSpec {
    pub name: String,
    pub file: String,
    pub description: Option<String>,
    /// The namespace of namespaced objects that do not name one.
    pub namespace: String,
    /// Delete objects that left the stack (from the inventory).
    pub prune: bool,
    /// Wait for workloads to roll out and jobs to complete.
    pub wait: bool,
    pub timeout: Duration,
    /// Take over fields another field manager owns (SSA `force=true`).
    pub force_conflicts: bool,
    pub context: Option<String>,
    pub on_drift: Option<DriftPolicy>,
    /// Manifest files (relative to the stack folder); default: every
    /// `*.yaml` / `*.yml` but stack.yaml, in lexical order.
    pub manifests: Option<Vec<(String, usize)>>,
    pub config_maps: Vec<GeneratedConfigMap>,
}

const STACK_KEYS: &[&str] = &[
    "description",
    "namespace",
    "prune",
    "wait",
    "timeout",
    "force_conflicts",
    "context",
    "on_drift",
    "manifests",
    "config_maps",
    "prometheus_rules",
];
const CONFIG_MAP_KEYS: &[&str] = &["name", "namespace", "labels", "files"];

/// Default `timeout` of a stack.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Whether `s` is a DNS-1123 label (namespaces, most object names' parts).
pub fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Whether `s` is a DNS-1123 subdomain (object names).
pub fn dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(dns_label)
}

pub fn parse_stack(name: &str, file: &str, doc: &Node, diags: &mut Diagnostics) -> StackSpec {
    let mut spec = StackSpec {
        name: name.to_string(),
        file: file.to_string(),
        description: None,
        namespace: "default".to_string(),
        prune: true,
        wait: true,
        timeout: DEFAULT_TIMEOUT,
        force_conflicts: false,
        context: None,
        on_drift: None,
        manifests: None,
        config_maps: Vec::new(),
    };
    let Some(mut r) = MapReader::new(file, format!("stack {name}"), doc, diags) else {
        return spec;
    };
    spec.description = r.string("description", diags).map(|(s, _)| s);
    if let Some((ns, line)) = r.string("namespace", diags) {
        if dns_label(&ns) {
            spec.namespace = ns;
        } else {
            diags.push(
                Diagnostic::new(
                    file,
                    format!("namespace `{ns}` is not a valid namespace name"),
                )
                .line(line)
                .hint("lower-case letters, digits and `-`, at most 63 characters"),
            );
        }
    }
    spec.prune = r.bool("prune", diags).unwrap_or(true);
    spec.wait = r.bool("wait", diags).unwrap_or(true);
    spec.force_conflicts = r.bool("force_conflicts", diags).unwrap_or(false);
    if let Some((t, line)) = r.string("timeout", diags) {
        match humantime::parse_duration(&t) {
            Ok(d) if d >= Duration::from_secs(1) => spec.timeout = d,
            _ => diags.push(
                Diagnostic::new(
                    file,
                    format!("`timeout: {t}` is not a duration of at least 1s"),
                )
                .line(line)
                .hint("write it like 90s, 5m or 1h"),
            ),
        }
    }
    spec.context = r.string("context", diags).map(|(s, _)| s);
    spec.on_drift = on_drift(&mut r, diags);
    if let Some(list) = r.string_list("manifests", diags) {
        for (m, line) in &list {
            if m.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                diags.push(
                    Diagnostic::new(
                        file,
                        format!("manifest `{m}` is not a path inside the stack folder"),
                    )
                    .line(*line),
                );
            }
        }
        spec.manifests = Some(list);
    }
    for (key, kind) in [
        ("config_maps", GeneratedKind::ConfigMap),
        ("prometheus_rules", GeneratedKind::PrometheusRule),
    ] {
        for item in r.list(key, diags).unwrap_or_default() {
            let what = format!("a `{key}` entry");
            let Some(mut m) = MapReader::new(file, &what, item, diags) else {
                continue;
            };
            let found = m.take("name");
            let name = m
                .require("name", found, diags)
                .and_then(|n| n.as_str().map(str::to_string));
            let namespace = m.string("namespace", diags).map(|(s, _)| s);
            let mut labels = Vec::new();
            match m.take("labels") {
                None => {}
                Some(Node {
                    value: Value::Map(entries),
                    ..
                }) => {
                    for (k, v) in entries {
                        match v.as_str() {
                            Some(s) => labels.push((k.clone(), s.to_string())),
                            None => diags.push(
                                Diagnostic::new(
                                    file,
                                    format!("label `{k}` must be a string (quote it)"),
                                )
                                .line(v.line),
                            ),
                        }
                    }
                }
                Some(node) => diags.push(
                    Diagnostic::new(file, "`labels` must be a map of strings").line(node.line),
                ),
            }
            let files = m.string_list("files", diags).unwrap_or_default();
            if files.is_empty() {
                diags.push(
                    Diagnostic::new(file, format!("{what} needs `files`: repo-relative paths"))
                        .line(item.line),
                );
            } else if kind == GeneratedKind::PrometheusRule && files.len() != 1 {
                diags.push(
                    Diagnostic::new(
                        file,
                        format!("{what} takes exactly one rules file in `files`"),
                    )
                    .line(item.line)
                    .hint("one PrometheusRule per rules file; add another entry for another file"),
                );
            }
            m.finish(CONFIG_MAP_KEYS, diags);
            if let Some(name) = name {
                if !dns_subdomain(&name) {
                    diags.push(
                        Diagnostic::new(file, format!("`{name}` is not a valid ConfigMap name"))
                            .line(item.line),
                    );
                }
                spec.config_maps.push(GeneratedConfigMap {
                    kind,
                    name,
                    namespace,
                    labels,
                    files,
                    line: item.line,
                });
            }
        }
    }
    r.finish(STACK_KEYS, diags);
    spec
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syntax::yaml;

    fn stack(text: &str) -> (StackSpec, String) {
        let node = yaml::parse("k8s/s/stack.yaml", text).unwrap();
        let mut diags = Diagnostics::default();
        let spec = parse_stack("s", "k8s/s/stack.yaml", &node, &mut diags);
        (spec, diags.to_string())
    }

    #[test]
    fn defaults_and_fields() {
        let (s, d) = stack("namespace: vlog\n");
        assert_eq!(d, "");
        assert_eq!(
            (
                s.namespace.as_str(),
                s.prune,
                s.wait,
                s.timeout,
                s.force_conflicts
            ),
            ("vlog", true, true, DEFAULT_TIMEOUT, false)
        );
        let (s, d) = stack("namespace: a\nprune: false\nwait: false\ntimeout: 90s\nforce_conflicts: true\ncontext: minikube\non_drift: report\n");
        assert_eq!(d, "");
        assert_eq!(s.timeout, Duration::from_secs(90));
        assert!(!s.prune && !s.wait && s.force_conflicts);
        assert_eq!(s.context.as_deref(), Some("minikube"));
        assert_eq!(s.on_drift, Some(DriftPolicy::Report));
    }

    #[test]
    fn problems_name_the_line() {
        let (_, d) = stack("namespace: Bad_NS\ntimeout: soon\nprnue: true\n");
        assert!(d.contains("k8s/s/stack.yaml:1: namespace `Bad_NS`"), "{d}");
        assert!(d.contains("k8s/s/stack.yaml:2: `timeout: soon`"), "{d}");
        assert!(d.contains("k8s/s/stack.yaml:3: unknown key `prnue`"), "{d}");
        assert!(d.contains("did you mean `prune`?"), "{d}");
    }

    #[test]
    fn config_maps_need_files() {
        let (s, d) = stack("config_maps:\n  - name: dash\n    namespace: monitoring\n    labels: {grafana_dashboard: \"1\"}\n    files: [dashboards/a.json]\n  - name: empty\n");
        assert_eq!(s.config_maps.len(), 2);
        assert_eq!(
            s.config_maps[0].labels,
            vec![("grafana_dashboard".into(), "1".into())]
        );
        assert!(
            d.contains("stack.yaml:6: a `config_maps` entry needs `files`"),
            "{d}"
        );
    }

    #[test]
    fn host_stack_entries() {
        let node = yaml::parse(
            "hosts/h.yaml",
            "stacks:\n  - vod\n  - name: metallb\n    in_cluster: true\n  - name: x\n    context: a\n    in_cluster: true\n  - name: Bad\n  - vod\n",
        )
        .unwrap();
        let mut diags = Diagnostics::default();
        let mut r = MapReader::new("hosts/h.yaml", "host h", &node, &mut diags).unwrap();
        let uses = parse_stack_uses(&mut r, "hosts/h.yaml", &mut diags);
        let names: Vec<&str> = uses.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["vod", "metallb", "x"]);
        assert!(uses[1].in_cluster);
        let d = diags.to_string();
        assert!(d.contains("hosts/h.yaml:6: a stack entry has both"), "{d}");
        assert!(
            d.contains("hosts/h.yaml:8: `Bad` is not a valid stack name"),
            "{d}"
        );
        assert!(
            d.contains("hosts/h.yaml:9: stack vod is listed twice"),
            "{d}"
        );
    }
}
