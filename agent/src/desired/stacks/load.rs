//! The desired side of stacks: reads `k8s/<stack>/stack.yaml` and its
//! manifests through the [`Source`], renders every string value with the
//! host's vars (minijinja, strict), resolves `secret("op://...")` in the
//! values of a Secret's `stringData` (nowhere else), adds the ownership
//! labels, generates ConfigMaps from repository files, and validates the
//! whole. Every problem becomes a diagnostic with file:line; nothing here
//! talks to a cluster.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value as Json};

use super::model::{self, ClusterAccess, StackSpec, StackUse};
use super::{DesiredObject, Manifest, ObjectRef, Stack};
use crate::desired::model::DriftPolicy;
use crate::desired::refusal_diag;
use crate::desired::render::{self, ModuleEnv, SecretUsage};
use crate::secrets::resolve::SecretSource;
use crate::source::{Source, SourceError};
use crate::syntax::diag::{Diagnostic, Diagnostics};
use crate::syntax::yaml::{self, Node, Value};

/// What the stacks of one host are rendered with.
pub struct StackContext<'a> {
    pub host_file: &'a str,
    pub host: &'a str,
    /// `vars.*` of the host.
    pub vars: minijinja::Value,
    /// `host.*` (name, platform).
    pub host_value: minijinja::Value,
    /// The host's `on_drift`, else the agent's default.
    pub policy: DriftPolicy,
    pub secrets: Arc<dyn SecretSource>,
    /// The template work left for this load, shared with the host's modules.
    pub budget: Arc<render::RenderBudget>,
}

/// Loads every stack `uses` names. Problems go to `diags`.
pub fn load_stacks(
    source: &Arc<dyn Source>,
    uses: &[StackUse],
    cx: &StackContext<'_>,
    diags: &mut Diagnostics,
) -> Result<Vec<Stack>, SourceError> {
    let mut stacks = Vec::new();
    for u in uses {
        let file = format!("k8s/{}/stack.yaml", u.name);
        let read = match source.read(&file) {
            Err(e) => {
                diags.push(refusal_diag(e, Some((cx.host_file, u.line)))?);
                continue;
            }
            Ok(read) => read,
        };
        let Some(bytes) = read else {
            let mut known: Vec<String> = source
                .list("k8s")?
                .into_iter()
                .filter(|n| model::valid_stack_name(n))
                .collect();
            known.sort();
            diags.push(
                Diagnostic::new(
                    cx.host_file,
                    format!("unknown stack `{}`: there is no {file}", u.name),
                )
                .line(u.line)
                .hint(if known.is_empty() {
                    "add k8s/<stack>/stack.yaml and its manifests".to_string()
                } else {
                    format!("available stacks: {}", known.join(", "))
                }),
            );
            continue;
        };
        let Some(doc) = parse_text(&file, bytes, diags) else {
            continue;
        };
        let spec = model::parse_stack(&u.name, &file, &doc, diags);
        stacks.push(load_one(source, u, spec, cx, diags)?);
    }
    check_unique_across(&stacks, diags);
    Ok(stacks)
}

fn parse_text(file: &str, bytes: Vec<u8>, diags: &mut Diagnostics) -> Option<Node> {
    let Ok(text) = String::from_utf8(bytes) else {
        diags.push(Diagnostic::new(file, "file is not UTF-8 text"));
        return None;
    };
    match yaml::parse(file, &text) {
        Ok(n) => Some(n),
        Err(e) => {
            diags.extend(e);
            None
        }
    }
}

fn load_one(
    source: &Arc<dyn Source>,
    u: &StackUse,
    spec: StackSpec,
    cx: &StackContext<'_>,
    diags: &mut Diagnostics,
) -> Result<Stack, SourceError> {
    let dir = format!("k8s/{}", u.name);
    let owner = format!("{}.{}", cx.host, u.name);
    if !valid_label_value(&owner) {
        diags.push(
            Diagnostic::new(
                cx.host_file,
                format!(
                    "the ownership label value `{owner}` (host.stack) is not a valid label value"
                ),
            )
            .line(u.line)
            .hint("host and stack names together must stay within 63 characters"),
        );
    }
    let access = if u.in_cluster {
        ClusterAccess::InCluster
    } else {
        ClusterAccess::Kubeconfig {
            context: u.context.clone().or_else(|| spec.context.clone()),
        }
    };
    let policy = u.on_drift.or(spec.on_drift).unwrap_or(cx.policy);
    let usage: Arc<Mutex<SecretUsage>> = Arc::default();
    let env = ModuleEnv::with_loader_dir(
        source.clone(),
        dir.clone(),
        cx.secrets.clone(),
        usage.clone(),
        cx.budget.clone(),
    );
    let stack_value = minijinja::Value::from(BTreeMap::from([
        ("name".to_string(), minijinja::Value::from(u.name.as_str())),
        (
            "namespace".to_string(),
            minijinja::Value::from(spec.namespace.as_str()),
        ),
    ]));
    let ctx = minijinja::Value::from(BTreeMap::from([
        ("vars".to_string(), cx.vars.clone()),
        ("host".to_string(), cx.host_value.clone()),
        ("stack".to_string(), stack_value),
    ]));
    let files: Vec<(String, usize)> = match &spec.manifests {
        Some(list) => list.clone(),
        None => {
            let listed = match source.list(&dir) {
                Ok(names) => names,
                Err(e) => {
                    diags.push(refusal_diag(e, Some((cx.host_file, u.line)))?);
                    Vec::new()
                }
            };
            let mut names: Vec<String> = listed
                .into_iter()
                .filter(|n| {
                    (n.ends_with(".yaml") || n.ends_with(".yml"))
                        && n != "stack.yaml"
                        && !n.starts_with('.')
                })
                .collect();
            names.sort();
            names.into_iter().map(|n| (n, 0)).collect()
        }
    };
    let renderer = Renderer {
        env: &env,
        ctx: &ctx,
        usage: &usage,
    };
    let mut objects = Vec::new();
    for (name, line) in &files {
        let path = format!("{dir}/{name}");
        let read = match source.read(&path) {
            Err(e) => {
                // Listed from the folder (line 0): said at the manifest itself.
                let at = (*line > 0).then_some((spec.file.as_str(), *line));
                diags.push(refusal_diag(e, at)?);
                continue;
            }
            Ok(read) => read,
        };
        let Some(bytes) = read else {
            diags.push(
                Diagnostic::new(
                    &spec.file,
                    format!("manifest `{name}` not found: there is no {path}"),
                )
                .line(*line),
            );
            continue;
        };
        let Ok(text) = String::from_utf8(bytes) else {
            diags.push(Diagnostic::new(&path, "manifest is not UTF-8 text"));
            continue;
        };
        let docs = match yaml::parse_all(&path, &text) {
            Ok(d) => d,
            Err(e) => {
                diags.extend(e);
                continue;
            }
        };
        for doc in docs {
            if doc.value == Value::Null {
                continue;
            }
            if let Some(o) = object(&renderer, &spec, u, &owner, policy, &path, &doc, diags) {
                objects.push(o);
            }
        }
    }
    for cm in &spec.config_maps {
        if let Some(o) = generated_config_map(source, &spec, u, &owner, policy, cm, diags)? {
            objects.push(o);
        }
    }
    let mut seen: HashMap<String, (String, usize)> = HashMap::new();
    for o in &objects {
        if let Some((file, line)) = seen.get(&o.id) {
            diags.push(
                Diagnostic::new(
                    &o.file,
                    format!("duplicate object; first declared at {file}:{line}"),
                )
                .line(o.line)
                .resource(&o.id)
                .hint("each object may be declared once per stack"),
            );
        } else {
            seen.insert(o.id.clone(), (o.file.clone(), o.line));
        }
    }
    Ok(Stack {
        spec,
        access,
        owner,
        policy,
        objects,
    })
}

/// Label values: at most 63 characters of `[A-Za-z0-9_.-]`, alphanumeric at both ends.
pub fn valid_label_value(v: &str) -> bool {
    v.len() <= 63
        && (v.is_empty()
            || v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric())
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

/// Two stacks of one host must not declare the same object: they would
/// fight over it and prune it from each other.
fn check_unique_across(stacks: &[Stack], diags: &mut Diagnostics) {
    let mut seen: HashMap<String, &DesiredObject> = HashMap::new();
    for s in stacks {
        for o in &s.objects {
            let key = o.reference.display();
            match seen.get(&key) {
                Some(first) if first.stack != o.stack => diags.push(
                    Diagnostic::new(
                        &o.file,
                        format!(
                            "{key} is also declared by stack {} ({}:{})",
                            first.stack, first.file, first.line
                        ),
                    )
                    .line(o.line)
                    .resource(&o.id)
                    .hint("an object belongs to one stack; remove one of the declarations"),
                ),
                _ => {
                    seen.insert(key, o);
                }
            }
        }
    }
}

struct Renderer<'a> {
    env: &'a ModuleEnv,
    ctx: &'a minijinja::Value,
    usage: &'a Arc<Mutex<SecretUsage>>,
}

const SECRET_HINT: &str =
    "in stacks, secret(\"op://...\") may only be used in the values of a Secret's `stringData`";

impl Renderer<'_> {
    /// Renders every string of `node` into JSON; `secret()` is allowed only
    /// when `allow_secrets` says so for the path.
    fn json(
        &self,
        node: &Node,
        path: &mut Vec<String>,
        allow_secrets: &dyn Fn(&[String]) -> bool,
        file: &str,
        diags: &mut Diagnostics,
    ) -> Json {
        match &node.value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Int(i) => Json::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
            Value::Str(s) => {
                let allowed = allow_secrets(path);
                self.usage.lock().unwrap().allowed = allowed;
                let out = self.env.render_str(s, self.ctx);
                self.usage.lock().unwrap().allowed = false;
                match out {
                    Ok(text) => Json::String(text),
                    Err(e) => {
                        let mut d = Diagnostic::new(
                            file,
                            format!(
                                "template error in `{}` at {}: {}",
                                s.trim().chars().take(80).collect::<String>(),
                                if path.is_empty() {
                                    ".".to_string()
                                } else {
                                    path.join(".")
                                },
                                render::describe(&e)
                            ),
                        )
                        .line(node.line);
                        d = d.hint(if render::is_limit(&e) {
                            render::LIMIT_HINT
                        } else if s.contains("secret(") && !allowed {
                            SECRET_HINT
                        } else {
                            "manifests see vars.*, host.name, host.platform, stack.name and stack.namespace"
                        });
                        diags.push(d);
                        Json::String(String::new())
                    }
                }
            }
            Value::Seq(items) => Json::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        path.push(i.to_string());
                        let v = self.json(n, path, allow_secrets, file, diags);
                        path.pop();
                        v
                    })
                    .collect(),
            ),
            Value::Map(entries) => {
                let mut map = Map::new();
                for (k, v) in entries {
                    path.push(k.clone());
                    let value = self.json(v, path, allow_secrets, file, diags);
                    path.pop();
                    map.insert(k.clone(), value);
                }
                Json::Object(map)
            }
        }
    }
}

/// Kinds that are not namespaced in every Kubernetes release the agent
/// knows (a kind not listed is taken as namespaced until discovery says
/// otherwise).
pub const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "StorageClass",
    "PersistentVolume",
    "PriorityClass",
    "IngressClass",
    "RuntimeClass",
    "CSIDriver",
    "Node",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "APIService",
    "VolumeSnapshotClass",
];

#[allow(clippy::too_many_arguments)]
fn object(
    r: &Renderer<'_>,
    spec: &StackSpec,
    u: &StackUse,
    owner: &str,
    policy: DriftPolicy,
    file: &str,
    doc: &Node,
    diags: &mut Diagnostics,
) -> Option<DesiredObject> {
    let Value::Map(entries) = &doc.value else {
        diags.push(
            Diagnostic::new(
                file,
                format!(
                    "a manifest document must be a map (an object), found {}",
                    doc.value.type_name()
                ),
            )
            .line(doc.line),
        );
        return None;
    };
    let get = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    let before = diags.len();
    let mut required = |key: &str| match get(key).and_then(Node::as_str) {
        Some(s) if !s.is_empty() && !s.contains("{{") => Some(s.to_string()),
        _ => {
            diags.push(
                Diagnostic::new(file, format!("the object has no `{key}` (a plain string)"))
                    .line(get(key).map_or(doc.line, |n| n.line))
                    .hint("every manifest needs apiVersion, kind and metadata.name; apiVersion and kind cannot be templated"),
            );
            None
        }
    };
    let api_version = required("apiVersion");
    let kind = required("kind");
    let (api_version, kind) = (api_version?, kind?);
    let is_secret = api_version == "v1" && kind == "Secret";
    let allow = move |path: &[String]| is_secret && path.len() == 2 && path[0] == "stringData";
    *r.usage.lock().unwrap() = SecretUsage::default();
    let mut body = r.json(doc, &mut Vec::new(), &allow, file, diags);
    let used = std::mem::take(&mut *r.usage.lock().unwrap());
    if diags.len() > before {
        return None;
    }
    if is_secret {
        string_data_to_data(&mut body);
    }
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), api_version.clone()),
    };
    let metadata = body
        .as_object_mut()
        .expect("a map renders to an object")
        .entry("metadata")
        .or_insert_with(|| Json::Object(Map::new()));
    let Some(metadata) = metadata.as_object_mut() else {
        diags.push(Diagnostic::new(file, "`metadata` must be a map").line(doc.line));
        return None;
    };
    for forbidden in [
        "managedFields",
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "generateName",
    ] {
        if metadata.contains_key(forbidden) {
            diags.push(
                Diagnostic::new(file, format!("metadata.{forbidden} must not be in a manifest"))
                    .line(doc.line)
                    .hint("the server sets it; remove it (objects exported with kubectl get -o yaml need cleaning)"),
            );
        }
    }
    let name = match metadata.get("name").and_then(Json::as_str) {
        Some(n) if model::dns_subdomain(n) || n.contains(':') && !n.contains('/') => n.to_string(),
        Some(n) => {
            diags.push(
                Diagnostic::new(file, format!("`{n}` is not a valid object name"))
                    .line(doc.line)
                    .hint("lower-case letters, digits, `-` and `.`"),
            );
            return None;
        }
        None => {
            diags.push(
                Diagnostic::new(file, format!("the {kind} has no metadata.name")).line(doc.line),
            );
            return None;
        }
    };
    let cluster_scoped = CLUSTER_SCOPED.contains(&kind.as_str());
    let namespace_explicit = metadata.contains_key("namespace");
    let namespace = match metadata.get("namespace") {
        Some(Json::String(ns)) if model::dns_label(ns) => Some(ns.clone()),
        Some(other) => {
            diags.push(
                Diagnostic::new(
                    file,
                    format!("metadata.namespace {other} of {kind} {name} is not a valid namespace"),
                )
                .line(doc.line),
            );
            return None;
        }
        None if cluster_scoped => None,
        None => Some(spec.namespace.clone()),
    };
    if cluster_scoped && namespace.is_some() {
        diags.push(
            Diagnostic::new(
                file,
                format!("{kind} {name} is cluster-scoped and cannot have a namespace"),
            )
            .line(doc.line)
            .hint("remove metadata.namespace"),
        );
        return None;
    }
    if let (Some(ns), false) = (&namespace, namespace_explicit) {
        metadata.insert("namespace".into(), Json::String(ns.clone()));
    }
    let on_drift = match metadata
        .get("annotations")
        .and_then(|a| a.get(super::ON_DRIFT_ANNOTATION))
    {
        None => policy,
        Some(Json::String(v)) if v == "heal" => DriftPolicy::Heal,
        Some(Json::String(v)) if v == "report" => DriftPolicy::Report,
        Some(other) => {
            diags.push(
                Diagnostic::new(
                    file,
                    format!(
                        "annotation {}: {other} must be `heal` or `report`",
                        super::ON_DRIFT_ANNOTATION
                    ),
                )
                .line(doc.line),
            );
            return None;
        }
    };
    if !label_owner(metadata, owner, file, doc.line, &kind, &name, diags) {
        return None;
    }
    let reference = ObjectRef {
        group,
        version,
        kind,
        namespace,
        name,
    };
    let blocked = (!used.failures.is_empty()).then(|| {
        used.failures
            .iter()
            .map(|(r, e)| format!("{r}: {e}"))
            .collect::<Vec<_>>()
            .join("; ")
    });
    let holds_secrets = !used.values.is_empty() || blocked.is_some();
    Some(DesiredObject::new(
        &u.name,
        reference,
        api_version,
        namespace_explicit,
        file,
        doc.line,
        Manifest(body),
        blocked,
        holds_secrets,
        on_drift,
    ))
}

/// Adds the two ownership labels; a manifest that sets them otherwise is wrong.
fn label_owner(
    metadata: &mut Map<String, Json>,
    owner: &str,
    file: &str,
    line: usize,
    kind: &str,
    name: &str,
    diags: &mut Diagnostics,
) -> bool {
    let labels = metadata
        .entry("labels")
        .or_insert_with(|| Json::Object(Map::new()));
    let Some(labels) = labels.as_object_mut() else {
        diags.push(
            Diagnostic::new(
                file,
                format!("metadata.labels of {kind} {name} must be a map"),
            )
            .line(line),
        );
        return false;
    };
    let mut ok = true;
    for (key, value) in [
        (super::MANAGED_BY_LABEL, super::MANAGED_BY),
        (super::STACK_LABEL, owner),
    ] {
        match labels.get(key) {
            Some(Json::String(v)) if v == value => {}
            None => {
                labels.insert(key.to_string(), Json::String(value.to_string()));
            }
            Some(other) => {
                diags.push(
                    Diagnostic::new(file, format!("label {key}: {other} of {kind} {name} contradicts the agent's ownership label ({value})"))
                        .line(line)
                        .hint("remove it: the agent sets its ownership labels itself"),
                );
                ok = false;
            }
        }
    }
    ok
}

fn generated_config_map(
    source: &Arc<dyn Source>,
    spec: &StackSpec,
    u: &StackUse,
    owner: &str,
    policy: DriftPolicy,
    cm: &model::GeneratedConfigMap,
    diags: &mut Diagnostics,
) -> Result<Option<DesiredObject>, SourceError> {
    let mut data = Map::new();
    let mut ok = true;
    for (path, line) in &cm.files {
        let key = path.rsplit('/').next().unwrap_or(path).to_string();
        if path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            diags.push(
                Diagnostic::new(&spec.file, format!("`{path}` is not a repo-relative path"))
                    .line(*line),
            );
            ok = false;
            continue;
        }
        let bytes = match source.read(path) {
            Ok(Some(b)) => b,
            Ok(None) | Err(SourceError::BadPath(_)) => {
                diags.push(
                    Diagnostic::new(&spec.file, format!("file `{path}` of ConfigMap {} does not exist in the repository", cm.name))
                        .line(*line)
                        .hint("paths are relative to the repository root, e.g. dashboards/homelab-agent.json"),
                );
                ok = false;
                continue;
            }
            Err(e) => {
                diags.push(refusal_diag(e, Some((spec.file.as_str(), *line)))?);
                ok = false;
                continue;
            }
        };
        let Ok(text) = String::from_utf8(bytes) else {
            diags.push(
                Diagnostic::new(
                    &spec.file,
                    format!("file `{path}` is not UTF-8 text; a ConfigMap holds text"),
                )
                .line(*line),
            );
            ok = false;
            continue;
        };
        if data.insert(key.clone(), Json::String(text)).is_some() {
            diags.push(
                Diagnostic::new(
                    &spec.file,
                    format!("two files of ConfigMap {} are named `{key}`", cm.name),
                )
                .line(*line)
                .hint("the key of each file is its name; rename one"),
            );
            ok = false;
        }
    }
    if !ok {
        return Ok(None);
    }
    // A PrometheusRule's spec is the rules file itself, verbatim.
    let rule_spec = match cm.kind {
        model::GeneratedKind::ConfigMap => None,
        model::GeneratedKind::PrometheusRule => {
            let (path, line) = &cm.files[0];
            let text = data.values().next().and_then(Json::as_str).unwrap_or("");
            match crate::syntax::yaml::parse(path, text) {
                Ok(node) if matches!(&node.value, Value::Map(e) if e.iter().any(|(k, _)| k == "groups")) => {
                    Some(raw_json(&node))
                }
                Ok(_) => {
                    diags.push(
                        Diagnostic::new(&spec.file, format!("`{path}` is not a Prometheus rules file (no top-level `groups:`)"))
                            .line(*line)
                            .hint("a PrometheusRule's spec is a rules file: groups: [{name, rules: [...]}]"),
                    );
                    return Ok(None);
                }
                Err(e) => {
                    diags.extend(e);
                    return Ok(None);
                }
            }
        }
    };
    let namespace = cm
        .namespace
        .clone()
        .unwrap_or_else(|| spec.namespace.clone());
    let mut metadata = Map::new();
    metadata.insert("name".into(), Json::String(cm.name.clone()));
    metadata.insert("namespace".into(), Json::String(namespace.clone()));
    metadata.insert(
        "labels".into(),
        Json::Object(
            cm.labels
                .iter()
                .map(|(k, v)| (k.clone(), Json::String(v.clone())))
                .collect(),
        ),
    );
    let (group, kind, api_version) = match cm.kind {
        model::GeneratedKind::ConfigMap => ("", "ConfigMap", "v1"),
        model::GeneratedKind::PrometheusRule => (
            "monitoring.coreos.com",
            "PrometheusRule",
            "monitoring.coreos.com/v1",
        ),
    };
    if !label_owner(
        &mut metadata,
        owner,
        &spec.file,
        cm.line,
        kind,
        &cm.name,
        diags,
    ) {
        return Ok(None);
    }
    let body = match rule_spec {
        None => serde_json::json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": metadata,
            "data": data,
        }),
        Some(rules) => serde_json::json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": metadata,
            "spec": rules,
        }),
    };
    Ok(Some(DesiredObject::new(
        &u.name,
        ObjectRef {
            group: group.into(),
            version: "v1".into(),
            kind: kind.into(),
            namespace: Some(namespace),
            name: cm.name.clone(),
        },
        api_version.into(),
        true,
        &spec.file,
        cm.line,
        Manifest(body),
        None,
        false,
        policy,
    )))
}

/// A YAML node as JSON, strings untouched (no template rendering).
fn raw_json(node: &Node) -> Json {
    match &node.value {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Str(s) => Json::String(s.clone()),
        Value::Seq(items) => Json::Array(items.iter().map(raw_json).collect()),
        Value::Map(entries) => Json::Object(
            entries
                .iter()
                .map(|(k, v)| (k.clone(), raw_json(v)))
                .collect(),
        ),
    }
}

/// A Secret's `stringData` becomes `data` (base64), as the server would
/// store it. Under server-side apply the applier of `stringData.KEY` keeps
/// owning that (write-only) field while the server stores `data.KEY`, so a
/// key later removed from the manifest would never leave the cluster;
/// applying `data` makes the agent own what is stored.
fn string_data_to_data(body: &mut Json) {
    use base64::Engine;
    let Some(map) = body.as_object_mut() else {
        return;
    };
    let Some(Json::Object(sd)) = map.remove("stringData") else {
        return;
    };
    let data = map
        .entry("data")
        .or_insert_with(|| Json::Object(Map::new()));
    if let Json::Object(data) = data {
        for (k, v) in sd {
            let text = match v {
                Json::String(s) => s,
                other => other.to_string(),
            };
            data.insert(
                k,
                Json::String(base64::engine::general_purpose::STANDARD.encode(text)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::desired::{self, LoadOptions};
    use crate::secrets::resolve::{SecretError, SecretSource};
    use crate::secrets::{Reference, SecretValue};
    use crate::source::LocalDir;

    /// Resolves every reference to `value-of-<item>`.
    struct Fixed;
    impl SecretSource for Fixed {
        fn resolve(&self, r: &Reference) -> Result<SecretValue, SecretError> {
            Ok(SecretValue::new(format!("value-of-{}", r.item)))
        }
    }

    /// Loads host `h` owning stack `s` with `files` in k8s/s/; `Ok(stacks)`
    /// or the diagnostics as text.
    fn load(files: &[(&str, &str)]) -> Result<Vec<super::Stack>, String> {
        let dir = tempfile::tempdir().unwrap();
        let write = |rel: &str, text: &str| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        write("hosts/h.yaml", "platform: linux\nroots: [/srv]\nvars: {tag: \"1.2\"}\nstacks:\n  - name: s\n    context: c\n");
        write("k8s/s/stack.yaml", "namespace: app\n");
        for (rel, text) in files {
            write(rel, text);
        }
        let opts = LoadOptions {
            secrets: Arc::new(Fixed),
            ..LoadOptions::default()
        };
        desired::load_with(Arc::new(LocalDir::open(dir.path()).unwrap()), "h", &opts)
            .map(|c| c.stacks)
            .map_err(|e| e.to_string())
    }

    /// `k8s/monitoring` carries the repository's one copy of the dashboard
    /// and of the alert rules, byte for byte and verbatim.
    #[test]
    fn monitoring_stack_is_generated_from_dashboards() {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let opts = LoadOptions {
            secrets: Arc::new(Fixed),
            ..LoadOptions::default()
        };
        let catalog =
            desired::load_with(Arc::new(LocalDir::open(&repo).unwrap()), "indri", &opts).unwrap();
        let stack = catalog
            .stacks
            .iter()
            .find(|s| s.spec.name == "monitoring")
            .expect("indri owns k8s/monitoring");
        let body = |kind: &str| {
            let o = stack
                .objects
                .iter()
                .find(|o| o.reference.kind == kind)
                .unwrap_or_else(|| panic!("no {kind}"));
            o.body.0.clone()
        };
        let cm = body("ConfigMap");
        let dashboard =
            std::fs::read_to_string(repo.join("dashboards/homelab-agent.json")).unwrap();
        assert_eq!(
            cm["data"]["homelab-agent.json"].as_str(),
            Some(dashboard.as_str())
        );
        assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
        assert_eq!(cm["metadata"]["namespace"], "monitoring");
        let rule = body("PrometheusRule");
        assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
        assert_eq!(
            rule["metadata"]["labels"]["release"],
            "kube-prometheus-stack"
        );
        assert_eq!(
            rule["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "homelab-agent"
        );
        let text = std::fs::read_to_string(repo.join("dashboards/alerts.yaml")).unwrap();
        let node = crate::syntax::yaml::parse("alerts.yaml", &text).unwrap();
        assert_eq!(rule["spec"], super::raw_json(&node));
        // Go templates in annotations are not rendered as Jinja.
        let spec = rule["spec"].to_string();
        assert!(
            spec.contains("{{ $labels.host }}") || spec.contains("$labels"),
            "{spec}"
        );
        assert!(rule["spec"]["groups"]
            .as_array()
            .is_some_and(|g| !g.is_empty()));
    }

    #[test]
    fn prometheus_rules_need_a_rules_file() {
        let err = load(&[
            (
                "k8s/s/stack.yaml",
                "namespace: app\nprometheus_rules:\n  - name: r\n    files: [x.yaml]\n",
            ),
            ("x.yaml", "rules: []\n"),
        ])
        .unwrap_err();
        assert!(
            err.contains("`x.yaml` is not a Prometheus rules file (no top-level `groups:`)"),
            "{err}"
        );
        let err = load(&[(
            "k8s/s/stack.yaml",
            "namespace: app\nprometheus_rules:\n  - name: r\n    files: [a.yaml, b.yaml]\n",
        )])
        .unwrap_err();
        assert!(err.contains("takes exactly one rules file"), "{err}");
    }

    const CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  image: \"app:{{ vars.tag }}\"\n  stack: \"{{ stack.name }}/{{ stack.namespace }}/{{ host.name }}\"\n";

    #[test]
    fn manifests_render_get_the_default_namespace_and_the_ownership_labels() {
        let stacks = load(&[
            ("k8s/s/a.yaml", CM),
            (
                "k8s/s/ns.yaml",
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: app\n",
            ),
        ])
        .unwrap();
        let s = &stacks[0];
        assert_eq!(s.access.describe(), "context c");
        let ids: Vec<&str> = s.objects.iter().map(|o| o.id.as_str()).collect();
        assert_eq!(ids, ["k8s:s/app/ConfigMap/c", "k8s:s//Namespace/app"]);
        let body = &s.objects[0].body.0;
        assert_eq!(body["data"]["image"], "app:1.2");
        assert_eq!(body["data"]["stack"], "s/app/h");
        assert_eq!(body["metadata"]["namespace"], "app");
        assert_eq!(
            body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "homelab-agent"
        );
        assert_eq!(body["metadata"]["labels"]["homelab-agent/stack"], "h.s");
        assert!(s.objects[1].body.0["metadata"].get("namespace").is_none());
        assert_eq!(
            (s.objects[0].file.as_str(), s.objects[0].line),
            ("k8s/s/a.yaml", 1)
        );
    }

    #[test]
    fn secrets_resolve_only_in_secret_string_data() {
        let secret = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  key: \"{{ secret('op://v/item/f') }}\"\n";
        let stacks = load(&[("k8s/s/s.yaml", secret)]).unwrap();
        let o = &stacks[0].objects[0];
        // Sent as `data`, so the agent owns what the server stores.
        assert!(o.body.0.get("stringData").is_none());
        assert_eq!(o.body.0["data"]["key"], "dmFsdWUtb2YtaXRlbQ==");
        assert!(o.holds_secrets && o.blocked.is_none());
        assert!(
            !format!("{:?}", stacks[0]).contains("value-of-item"),
            "Debug never shows a value"
        );
        for bad in [
            secret.replace("kind: Secret", "kind: ConfigMap"),
            secret.replace(
                "stringData:\n  key:",
                "metadata2: {}\nstringData:\n  key: x\nannotations:\n  a:",
            ),
            secret.replace(
                "name: s\n",
                "name: s\n  labels:\n    x: \"{{ secret('op://v/i/f') }}\"\n",
            ),
        ] {
            let err = load(&[("k8s/s/s.yaml", &bad)]).unwrap_err();
            assert!(
                err.contains("may only be used in the values of a Secret's `stringData`"),
                "{err}"
            );
            assert!(err.contains("k8s/s/s.yaml:"), "{err}");
        }
    }

    #[test]
    fn problems_are_reported_with_file_and_line() {
        let check = |text: &str, want: &str| {
            let err = load(&[("k8s/s/x.yaml", text)]).unwrap_err();
            assert!(err.contains(want), "want {want:?} in:\n{err}");
        };
        check(
            "kind: ConfigMap\nmetadata: {name: a}\n",
            "k8s/s/x.yaml:1: the object has no `apiVersion`",
        );
        check(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n",
            "k8s/s/x.yaml:1: the ConfigMap has no metadata.name",
        );
        check(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, namespace: b}\n",
            "Namespace a is cluster-scoped and cannot have a namespace",
        );
        check(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  labels: {homelab-agent/stack: other}\n",
            "label homelab-agent/stack: \"other\" of ConfigMap a contradicts the agent's ownership label (h.s)",
        );
        check(&format!("{CM}---\n{CM}"), "k8s/s/x.yaml:9: k8s:s/app/ConfigMap/c: duplicate object; first declared at k8s/s/x.yaml:1");
        check("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  annotations: {homelab-agent/on-drift: sometimes}\n", "must be `heal` or `report`");
        check("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {x: \"{{ vars.nope }}\"}\n", "k8s/s/x.yaml:4: template error in `{{ vars.nope }}` at data.x: undefined value");
        check(
            "- a\n- b\n",
            "k8s/s/x.yaml:1: a manifest document must be a map",
        );
    }
}
