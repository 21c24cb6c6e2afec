//! The desired state of Kubernetes stacks (`k8s/<stack>/stack.yaml` and
//! its manifests): the model (`model.rs`) and its loading (`load.rs`),
//! part of the *desired* stage, so a bad manifest rejects the revision like
//! any other desired state. Planning and applying them is the `k8s` target.

pub mod load;
pub mod model;

use std::fmt;

use crate::desired::model::DriftPolicy;

/// `kind` of stack objects in the inventory.
pub const INVENTORY_KIND: &str = "k8s";
/// The field manager of every apply.
pub const FIELD_MANAGER: &str = "homelab-agent";
/// Ownership label: who manages the object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "homelab-agent";
/// Ownership label: which host's stack (`<host>.<stack>`).
pub const STACK_LABEL: &str = "homelab-agent/stack";
/// Per-object drift policy (`heal` or `report`).
pub const ON_DRIFT_ANNOTATION: &str = "homelab-agent/on-drift";

/// A stack of one host, loaded and validated.
#[derive(Debug)]
pub struct Stack {
    pub spec: model::StackSpec,
    pub access: model::ClusterAccess,
    /// Value of [`STACK_LABEL`]: `<host>.<stack>`.
    pub owner: String,
    pub policy: DriftPolicy,
    pub objects: Vec<DesiredObject>,
}

impl Stack {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Inventory ids of this stack start with this.
    pub fn id_prefix(&self) -> String {
        format!("{INVENTORY_KIND}:{}/", self.spec.name)
    }
}

/// Which object: group, version, kind, namespace (`None`: cluster-scoped), name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectRef {
    /// `Deployment.apps` / `ConfigMap`: the kind as kubectl names it.
    pub fn kind_group(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// `Deployment.apps vlog/vlog-worker`, for messages.
    pub fn display(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind_group(), self.name),
            None => format!("{} {}", self.kind_group(), self.name),
        }
    }

    /// The inventory id: `k8s:<stack>/<namespace>/<Kind[.group]>/<name>`
    /// (namespace empty for cluster-scoped objects).
    pub fn id(&self, stack: &str) -> String {
        format!(
            "{INVENTORY_KIND}:{stack}/{}/{}/{}",
            self.namespace.as_deref().unwrap_or(""),
            self.kind_group(),
            self.name
        )
    }

    /// Parses an inventory id back (the version is not in it: discovery
    /// picks the preferred one). `None` for anything else.
    pub fn parse_id(id: &str) -> Option<(String, ObjectRef)> {
        let rest = id.strip_prefix(INVENTORY_KIND)?.strip_prefix(':')?;
        let mut parts = rest.splitn(4, '/');
        let (stack, ns, kind_group, name) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if stack.is_empty() || kind_group.is_empty() || name.is_empty() || name.contains('/') {
            return None;
        }
        let (kind, group) = kind_group.split_once('.').unwrap_or((kind_group, ""));
        Some((
            stack.to_string(),
            ObjectRef {
                group: group.to_string(),
                version: String::new(),
                kind: kind.to_string(),
                namespace: (!ns.is_empty()).then(|| ns.to_string()),
                name: name.to_string(),
            },
        ))
    }
}

/// A manifest as it will be applied. It may hold Secret values, so `Debug`
/// shows only what it is, never its content.
#[derive(Clone, PartialEq)]
pub struct Manifest(pub serde_json::Value);

impl fmt::Debug for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Manifest({} {})",
            self.0.get("kind").and_then(|k| k.as_str()).unwrap_or("?"),
            self.0
                .pointer("/metadata/name")
                .and_then(|k| k.as_str())
                .unwrap_or("?")
        )
    }
}

/// One object of a stack.
#[derive(Debug)]
pub struct DesiredObject {
    pub id: String,
    pub stack: String,
    pub reference: ObjectRef,
    pub api_version: String,
    /// The manifest named its namespace (else the stack's default was used).
    pub namespace_explicit: bool,
    pub file: String,
    pub line: usize,
    pub body: Manifest,
    /// A secret did not resolve: not applied, not pruned, reported.
    pub blocked: Option<String>,
    pub holds_secrets: bool,
    pub on_drift: DriftPolicy,
    /// Digest of the manifest (in memory only; the inventory keeps a keyed hash).
    pub digest: String,
}

impl DesiredObject {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stack: &str,
        reference: ObjectRef,
        api_version: String,
        namespace_explicit: bool,
        file: &str,
        line: usize,
        body: Manifest,
        blocked: Option<String>,
        holds_secrets: bool,
        on_drift: DriftPolicy,
    ) -> DesiredObject {
        let id = reference.id(stack);
        let mut h = blake3::Hasher::new();
        h.update(id.as_bytes());
        h.update(b"\0");
        h.update(&serde_json::to_vec(&body.0).expect("JSON values serialize"));
        DesiredObject {
            id,
            stack: stack.to_string(),
            reference,
            api_version,
            namespace_explicit,
            file: file.to_string(),
            line,
            body,
            blocked,
            holds_secrets,
            on_drift,
            digest: h.finalize().to_hex()[..32].to_string(),
        }
    }
}

/// Apply order rank of a kind (Flux's order): CRDs and Namespaces first,
/// workloads after their config, webhooks last; unknown kinds (custom
/// resources) after the built-in ones.
pub fn kind_rank(kind: &str) -> usize {
    const ORDER: &[&str] = &[
        "CustomResourceDefinition",
        "Namespace",
        "ResourceQuota",
        "StorageClass",
        "ServiceAccount",
        "PodSecurityPolicy",
        "Role",
        "ClusterRole",
        "RoleBinding",
        "ClusterRoleBinding",
        "ConfigMap",
        "Secret",
        "Service",
        "LimitRange",
        "PriorityClass",
        "PersistentVolume",
        "PersistentVolumeClaim",
        "Deployment",
        "StatefulSet",
        "DaemonSet",
        "Job",
        "CronJob",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Ingress",
    ];
    const LAST: &[&str] = &[
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ];
    if let Some(i) = ORDER.iter().position(|k| *k == kind) {
        return i;
    }
    match LAST.iter().position(|k| *k == kind) {
        Some(i) => ORDER.len() + 1 + i,
        None => ORDER.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        let r = ObjectRef {
            group: "apps".into(),
            version: "v1".into(),
            kind: "Deployment".into(),
            namespace: Some("vlog".into()),
            name: "vlog-worker".into(),
        };
        let id = r.id("vlog-workers");
        assert_eq!(id, "k8s:vlog-workers/vlog/Deployment.apps/vlog-worker");
        let (stack, back) = ObjectRef::parse_id(&id).unwrap();
        assert_eq!(stack, "vlog-workers");
        assert_eq!(
            back,
            ObjectRef {
                version: String::new(),
                ..r
            }
        );
        let ns = ObjectRef {
            group: String::new(),
            version: "v1".into(),
            kind: "Namespace".into(),
            namespace: None,
            name: "vlog".into(),
        };
        assert_eq!(ns.id("s"), "k8s:s//Namespace/vlog");
        let crd = ObjectRef::parse_id(
            "k8s:m//CustomResourceDefinition.apiextensions.k8s.io/ipaddresspools.metallb.io",
        )
        .unwrap()
        .1;
        assert_eq!(crd.group, "apiextensions.k8s.io");
        assert_eq!(crd.name, "ipaddresspools.metallb.io");
        assert!(ObjectRef::parse_id("file:/etc/x").is_none());
    }

    #[test]
    fn ranks_put_crds_and_namespaces_first_and_webhooks_last() {
        assert!(kind_rank("CustomResourceDefinition") < kind_rank("Namespace"));
        assert!(kind_rank("ConfigMap") < kind_rank("Deployment"));
        assert!(kind_rank("Deployment") < kind_rank("IPAddressPool"));
        assert!(kind_rank("IPAddressPool") < kind_rank("ValidatingWebhookConfiguration"));
    }

    #[test]
    fn manifests_never_debug_print_their_content() {
        let m = Manifest(
            serde_json::json!({"kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "hunter2"}}),
        );
        assert_eq!(format!("{m:?}"), "Manifest(Secret s)");
    }
}
