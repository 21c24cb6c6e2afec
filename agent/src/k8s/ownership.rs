//! Field ownership on a live object (pure): what the agent must rewrite in
//! `metadata.managedFields` before its server-side apply does what the
//! manifest says, and who the other managers are.
//!
//! - **Adoption.** An object first made with `kubectl apply` (client side)
//!   or `kubectl create` has its fields owned by `kubectl-client-side-apply`
//!   or `kubectl-create` (operation `Update`). Server-side apply only
//!   removes fields no manager owns, so a field, env var or container later
//!   removed from the manifest would stay for ever. As Flux does, the
//!   agent takes those managers' fields over (merges them into its own
//!   `Apply` entry, drops theirs; the `last-applied-configuration`
//!   annotation goes with them).
//! - **Secrets applied with `stringData`.** The server stores `data`, and
//!   the applier keeps owning `stringData.KEY`, so a removed key never
//!   left. Stacks now send `data`; an entry that still owns `stringData`
//!   keys is rewritten to own the same `data` keys.
//! - **Controllers.** A manager that writes through a subresource (the HPA
//!   through `scale`) or is a known controller is never forced out of a
//!   field; interactive managers (`kubectl ...`) are (see [`is_interactive`]).
//! - **Handing `spec.replicas` over.** When the manifest stops setting
//!   `replicas` that the agent owned, removing the field would reset it to
//!   1 before the HPA acts: the value is first applied by a separate
//!   manager ([`HANDOVER_MANAGER`]) so it stays as it is (the procedure the
//!   Kubernetes documentation gives for handing a field to an autoscaler).

use serde_json::{Map, Value as Json};

use super::FIELD_MANAGER;

/// The manager that keeps `spec.replicas` at its value when the manifest
/// hands it over.
pub const HANDOVER_MANAGER: &str = "homelab-agent-handover";

/// Managers whose `Update` entries come from creating an object by hand
/// (`kubectl apply` client side, `kubectl create`/`replace`, and kubectl's
/// names before 1.18): taken over on adoption.
const CLIENT_SIDE_MANAGERS: &[&str] = &[
    "kubectl-client-side-apply",
    "kubectl-create",
    "kubectl-replace",
    "kubectl",
    "before-first-apply",
];

/// Kubernetes' own controllers by name (their writes through the main
/// resource carry no subresource).
const CONTROLLERS: &[&str] = &[
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "cloud-controller-manager",
];

/// A person's tool: `kubectl` in any of its managers (`kubectl-edit`,
/// `kubectl-patch`, `kubectl-client-side-apply`, ...), and the common UIs.
/// Fields such a manager took are drift the agent may take back (force).
pub fn is_interactive(manager: &str) -> bool {
    manager == "kubectl"
        || manager.starts_with("kubectl-")
        || ["k9s", "Lens", "headlamp", "dashboard", "before-first-apply"]
            .iter()
            .any(|m| manager.eq_ignore_ascii_case(m))
}

/// Whether `manager` is a controller on `live`: a Kubernetes controller by
/// name, or a manager that writes the object through a subresource (the
/// HPA's `scale`). Its fields are never forced.
pub fn is_controller(manager: &str, live: Option<&Json>) -> bool {
    if CONTROLLERS.contains(&manager)
        || manager.ends_with("-controller")
        || manager.ends_with("-operator")
    {
        return true;
    }
    entries(live).iter().any(|e| {
        e.get("manager").and_then(Json::as_str) == Some(manager)
            && e.get("subresource")
                .and_then(Json::as_str)
                .is_some_and(|s| !s.is_empty())
    })
}

fn entries(live: Option<&Json>) -> Vec<Json> {
    live.and_then(|l| l.pointer("/metadata/managedFields"))
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default()
}

fn is_ours(e: &Json) -> bool {
    e.get("manager").and_then(Json::as_str) == Some(FIELD_MANAGER)
        && e.get("operation").and_then(Json::as_str) == Some("Apply")
        && e.get("subresource").is_none()
}

/// The rewrite of `metadata.managedFields` the agent makes before applying.
#[derive(Debug, Clone, PartialEq)]
pub struct Takeover {
    /// Client-side managers whose fields the agent takes over.
    pub from: Vec<String>,
    /// The agent's entry owned `stringData` keys (now `data` keys).
    pub string_data: bool,
    /// The new `managedFields` list.
    pub managed_fields: Json,
    /// The live `resourceVersion` (the rewrite fails if the object moved).
    pub resource_version: String,
}

impl Takeover {
    /// For the plan: what the rewrite does.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.from.is_empty() {
            parts.push(format!(
                "adopts the fields of {} (made by hand): fields the manifest does not set are removed",
                self.from
                    .iter()
                    .map(|m| format!("\"{m}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if self.string_data {
            parts.push(
                "applied with stringData before: its keys are now owned as data, so a removed key leaves"
                    .to_string(),
            );
        }
        parts.join("; ")
    }
}

/// Deep union of two `fieldsV1` sets.
fn union(into: &mut Map<String, Json>, from: &Map<String, Json>) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Json::Object(a)), Json::Object(b)) => union(a, b),
            (Some(_), _) => {}
            (None, v) => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

/// What to rewrite before applying to `live`; `None` when nothing.
pub fn takeover(live: &Json) -> Option<Takeover> {
    let all = entries(Some(live));
    let foreign: Vec<&Json> = all
        .iter()
        .filter(|e| {
            e.get("operation").and_then(Json::as_str) == Some("Update")
                && e.get("subresource").is_none()
                && e.get("manager")
                    .and_then(Json::as_str)
                    .is_some_and(|m| CLIENT_SIDE_MANAGERS.contains(&m))
        })
        .collect();
    let ours = all.iter().find(|e| is_ours(e));
    let string_data = ours
        .and_then(|e| e.pointer("/fieldsV1/f:stringData"))
        .is_some();
    if foreign.is_empty() && !string_data {
        return None;
    }
    let mut fields: Map<String, Json> = ours
        .and_then(|e| e.get("fieldsV1"))
        .and_then(Json::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(Json::Object(sd)) = fields.remove("f:stringData") {
        let mut data = Map::new();
        for (k, v) in sd {
            data.insert(k, v);
        }
        let entry = fields
            .entry("f:data")
            .or_insert_with(|| Json::Object(Map::new()));
        if let Json::Object(d) = entry {
            union(d, &data);
        }
    }
    for e in &foreign {
        if let Some(f) = e.get("fieldsV1").and_then(Json::as_object) {
            union(&mut fields, f);
        }
    }
    let api_version = live
        .get("apiVersion")
        .and_then(Json::as_str)
        .unwrap_or("v1");
    let mut merged = serde_json::json!({
        "manager": FIELD_MANAGER,
        "operation": "Apply",
        "apiVersion": api_version,
        "fieldsType": "FieldsV1",
        "fieldsV1": Json::Object(fields),
    });
    if let Some(t) = ours.and_then(|e| e.get("time")) {
        merged["time"] = t.clone();
    }
    let mut list: Vec<Json> = all
        .iter()
        .filter(|e| !is_ours(e) && !foreign.iter().any(|f| std::ptr::eq(*f, *e)))
        .cloned()
        .collect();
    list.insert(0, merged);
    let mut from: Vec<String> = foreign
        .iter()
        .filter_map(|e| e.get("manager").and_then(Json::as_str))
        .map(str::to_string)
        .collect();
    from.sort();
    from.dedup();
    Some(Takeover {
        from,
        string_data,
        managed_fields: Json::Array(list),
        resource_version: live
            .pointer("/metadata/resourceVersion")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string(),
    })
}

/// The finalizers holding a live object (`metadata.finalizers`).
pub fn finalizers(live: &Json) -> Vec<&str> {
    live.pointer("/metadata/finalizers")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(Json::as_str)
        .collect()
}

/// Kinds whose `spec.replicas` an autoscaler may own.
const SCALABLE: &[&str] = &["Deployment", "StatefulSet", "ReplicaSet"];

/// The live `spec.replicas` to keep when the manifest stops setting a
/// `replicas` the agent owned (see [`HANDOVER_MANAGER`]); `None` otherwise.
pub fn replicas_handover(live: &Json, body: &Json) -> Option<i64> {
    let kind = body.get("kind").and_then(Json::as_str)?;
    if !SCALABLE.contains(&kind) || body.pointer("/spec/replicas").is_some() {
        return None;
    }
    let owned = entries(Some(live))
        .iter()
        .any(|e| is_ours(e) && e.pointer("/fieldsV1/f:spec/f:replicas").is_some());
    if !owned {
        return None;
    }
    live.pointer("/spec/replicas").and_then(Json::as_i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn client_side_managers_are_taken_over_with_the_last_applied_annotation() {
        let live = json!({"apiVersion": "apps/v1", "metadata": {"resourceVersion": "7", "managedFields": [
            {"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "apps/v1",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}}},
                                                    "f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {"f:env": {}}}}}}}},
            {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status", "fieldsV1": {"f:status": {}}},
            {"manager": "homelab-agent", "operation": "Apply", "apiVersion": "apps/v1", "fieldsV1": {"f:spec": {"f:replicas": {}}}}
        ]}});
        let t = takeover(&live).unwrap();
        assert_eq!(t.from, ["kubectl-client-side-apply"]);
        assert!(!t.string_data);
        assert_eq!(t.resource_version, "7");
        let list = t.managed_fields.as_array().unwrap();
        assert_eq!(list.len(), 2, "{list:?}");
        assert_eq!(list[0]["manager"], "homelab-agent");
        assert!(list[0]["fieldsV1"]["f:metadata"]["f:annotations"]
            .get("f:kubectl.kubernetes.io/last-applied-configuration")
            .is_some());
        assert!(list[0]["fieldsV1"]["f:spec"]["f:template"].is_object());
        assert_eq!(list[1]["manager"], "kube-controller-manager");
        // Nothing to take over: nothing to do.
        let clean = json!({"metadata": {"managedFields": [list[0].clone()]}});
        assert!(takeover(&clean).is_none());
    }

    #[test]
    fn string_data_ownership_becomes_data_ownership() {
        let live = json!({"apiVersion": "v1", "metadata": {"managedFields": [
            {"manager": "homelab-agent", "operation": "Apply", "apiVersion": "v1",
             "fieldsV1": {"f:stringData": {"f:A": {}, "f:B": {}}, "f:type": {}}}]}});
        let t = takeover(&live).unwrap();
        assert!(t.string_data && t.from.is_empty());
        let f = &t.managed_fields[0]["fieldsV1"];
        assert!(f.get("f:stringData").is_none());
        assert!(f["f:data"]["f:A"].is_object() && f["f:data"]["f:B"].is_object());
    }

    #[test]
    fn controllers_and_people() {
        let live = json!({"metadata": {"managedFields": [
            {"manager": "hpa-thing", "operation": "Update", "subresource": "scale"}]}});
        assert!(is_controller("kube-controller-manager", None));
        assert!(is_controller("hpa-thing", Some(&live)));
        assert!(!is_controller("kubectl-edit", Some(&live)));
        assert!(is_interactive("kubectl-patch") && is_interactive("kubectl"));
        assert!(!is_interactive("helm") && !is_interactive("kube-controller-manager"));
    }

    #[test]
    fn replicas_are_handed_over_only_when_the_agent_owned_them() {
        let live = json!({"spec": {"replicas": 3}, "metadata": {"managedFields": [
            {"manager": "homelab-agent", "operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}}}}]}});
        let without = json!({"kind": "Deployment", "spec": {}});
        assert_eq!(replicas_handover(&live, &without), Some(3));
        let with = json!({"kind": "Deployment", "spec": {"replicas": 2}});
        assert_eq!(replicas_handover(&live, &with), None);
        let not_ours = json!({"spec": {"replicas": 3}, "metadata": {"managedFields": []}});
        assert_eq!(replicas_handover(&not_ours, &without), None);
        assert_eq!(
            replicas_handover(&live, &json!({"kind": "ConfigMap"})),
            None
        );
    }
}
