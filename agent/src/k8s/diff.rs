//! The normalised diff of two versions of an object (pure).
//!
//! Plan compares the live object with the server's dry-run result of the
//! apply: both carry the server's defaults, so only what the apply would
//! change differs. What the server writes on its own never counts:
//! `metadata.{managedFields, resourceVersion, generation, uid,
//! creationTimestamp, selfLink}`, `status`, and controller annotations.
//! Secret data is compared by key names and keyed hashes; its values never
//! reach a change.

use base64::Engine;
use homelab_agent_state::DigestKey;
use serde_json::{Map, Value as Json};

/// Metadata the server owns.
const SERVER_METADATA: &[&str] = &[
    "managedFields",
    "resourceVersion",
    "generation",
    "uid",
    "creationTimestamp",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// Annotations controllers and old tools write.
const IGNORED_ANNOTATIONS: &[&str] = &[
    "deployment.kubernetes.io/revision",
    "kubectl.kubernetes.io/last-applied-configuration",
];

/// One difference: a JSON path (`spec.replicas`,
/// `spec.template.spec.containers[name=worker].image`) and the old and new
/// values (compact JSON; Secret data shows no value).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ObjectChange {
    pub path: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

/// The object without what the server owns; Secret `stringData` folded
/// into `data` (as the server does) and every Secret value replaced by a
/// keyed hash.
pub fn normalize(obj: &Json, key: &DigestKey) -> Json {
    let mut o = obj.clone();
    let Some(map) = o.as_object_mut() else {
        return o;
    };
    map.remove("status");
    if let Some(meta) = map.get_mut("metadata").and_then(Json::as_object_mut) {
        for k in SERVER_METADATA {
            meta.remove(*k);
        }
        if let Some(ann) = meta.get_mut("annotations").and_then(Json::as_object_mut) {
            for k in IGNORED_ANNOTATIONS {
                ann.remove(*k);
            }
        }
        if meta
            .get("annotations")
            .and_then(Json::as_object)
            .is_some_and(Map::is_empty)
        {
            meta.remove("annotations");
        }
    }
    let is_secret = map.get("kind").and_then(Json::as_str) == Some("Secret")
        && map.get("apiVersion").and_then(Json::as_str) == Some("v1");
    if is_secret {
        let mut data: Map<String, Json> = Map::new();
        if let Some(Json::Object(d)) = map.remove("data") {
            for (k, v) in d {
                let bytes = v
                    .as_str()
                    .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                    .unwrap_or_default();
                data.insert(k, Json::String(hash(key, &bytes)));
            }
        }
        if let Some(Json::Object(d)) = map.remove("stringData") {
            for (k, v) in d {
                data.insert(
                    k,
                    Json::String(hash(key, v.as_str().unwrap_or_default().as_bytes())),
                );
            }
        }
        if !data.is_empty() {
            map.insert("data".into(), Json::Object(data));
        }
    }
    o
}

fn hash(key: &DigestKey, bytes: &[u8]) -> String {
    format!(
        "hash:{}",
        &blake3::keyed_hash(key.bytes(), bytes).to_hex()[..16]
    )
}

/// Whether `path` is inside a Secret's data (values must not be shown).
fn secret_path(is_secret: bool, path: &str) -> bool {
    is_secret && (path.starts_with("data.") || path == "data")
}

/// What differs between two normalised objects.
pub fn diff(old: &Json, new: &Json) -> Vec<ObjectChange> {
    let is_secret = new.get("kind").and_then(Json::as_str) == Some("Secret");
    let mut out = Vec::new();
    walk(old, new, String::new(), &mut out);
    for c in &mut out {
        if secret_path(is_secret, &c.path) {
            c.old = c.old.as_ref().map(|_| "(secret value)".to_string());
            c.new = c
                .new
                .as_ref()
                .map(|_| "(secret value, changed)".to_string());
        }
    }
    out
}

fn show(v: &Json) -> String {
    let s = v.to_string();
    if s.chars().count() > 200 {
        format!("{}…", s.chars().take(200).collect::<String>())
    } else {
        s
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn walk(old: &Json, new: &Json, path: String, out: &mut Vec<ObjectChange>) {
    match (old, new) {
        (Json::Object(a), Json::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = join(&path, k);
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => walk(x, y, p, out),
                    (Some(x), None) => out.push(ObjectChange {
                        path: p,
                        old: Some(show(x)),
                        new: None,
                    }),
                    (None, Some(y)) => out.push(ObjectChange {
                        path: p,
                        old: None,
                        new: Some(show(y)),
                    }),
                    (None, None) => {}
                }
            }
        }
        (Json::Array(a), Json::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                let label = match (
                    x.get("name").and_then(Json::as_str),
                    y.get("name").and_then(Json::as_str),
                ) {
                    (Some(n), Some(m)) if n == m => format!("{path}[name={n}]"),
                    _ => format!("{path}[{i}]"),
                };
                walk(x, y, label, out);
            }
        }
        _ if old == new => {}
        _ => out.push(ObjectChange {
            path,
            old: Some(show(old)),
            new: Some(show(new)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> DigestKey {
        DigestKey::load(
            std::path::Path::new("/nonexistent-homelab-agent-key-dir"),
            false,
        )
        .unwrap()
    }

    fn check(old: Json, new: Json, expect: &[(&str, Option<&str>, Option<&str>)]) {
        let k = key();
        let got = diff(&normalize(&old, &k), &normalize(&new, &k));
        let got: Vec<(String, Option<String>, Option<String>)> =
            got.into_iter().map(|c| (c.path, c.old, c.new)).collect();
        let want: Vec<(String, Option<String>, Option<String>)> = expect
            .iter()
            .map(|(p, o, n)| (p.to_string(), o.map(str::to_string), n.map(str::to_string)))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn server_fields_are_not_differences() {
        check(
            json!({"kind": "ConfigMap", "metadata": {"name": "a", "uid": "1", "resourceVersion": "7", "generation": 2,
                   "creationTimestamp": "x", "managedFields": [{"manager": "m"}],
                   "annotations": {"deployment.kubernetes.io/revision": "3"}}, "status": {"x": 1}, "data": {"k": "v"}}),
            json!({"kind": "ConfigMap", "metadata": {"name": "a", "uid": "2", "resourceVersion": "9"}, "data": {"k": "v"}}),
            &[],
        );
    }

    #[test]
    fn changes_are_paths_with_old_and_new() {
        check(
            json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "w", "image": "a:1"}]}}}}),
            json!({"spec": {"replicas": 3, "paused": true, "template": {"spec": {"containers": [{"name": "w", "image": "a:2"}]}}}}),
            &[
                ("spec.paused", None, Some("true")),
                ("spec.replicas", Some("2"), Some("3")),
                (
                    "spec.template.spec.containers[name=w].image",
                    Some("\"a:1\""),
                    Some("\"a:2\""),
                ),
            ],
        );
        check(
            json!({"a": [1, 2]}),
            json!({"a": [1]}),
            &[("a", Some("[1,2]"), Some("[1]"))],
        );
    }

    #[test]
    fn secret_values_are_compared_by_keyed_hash_and_never_shown() {
        let live = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
            "data": {"KEY": base64::engine::general_purpose::STANDARD.encode("old-value-1"), "GONE": "eA=="}});
        let same = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
            "stringData": {"KEY": "old-value-1", "GONE": "x"}});
        check(live.clone(), same, &[]);
        let changed = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
            "stringData": {"KEY": "new-value-2", "NEW": "n"}});
        let k = key();
        let changes = diff(&normalize(&live, &k), &normalize(&changed, &k));
        let text = format!("{changes:?}");
        for value in ["old-value-1", "new-value-2", "b2xkLXZhbHVlLTE"] {
            assert!(!text.contains(value), "{text}");
        }
        let paths: Vec<&str> = changes.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["data.GONE", "data.KEY", "data.NEW"]);
        assert_eq!(changes[1].old.as_deref(), Some("(secret value)"));
        assert_eq!(changes[2].old, None);
    }
}
