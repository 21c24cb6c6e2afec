//! A **stand-in** for a Kubernetes API server, for tests of the agent's
//! stacks. It is not Kubernetes: no Kubernetes API server can run on the
//! test machines, so this is a small HTTP/1.1 server (std::net, one thread
//! per connection, `Connection: close`) on 127.0.0.1 with a free port that
//! answers what the agent's real kube-rs client sends, following the notes
//! in `specs/kubernetes-ssa.md`:
//!
//! - discovery: `GET /api` (APIVersions), `GET /apis` (APIGroupList), `GET
//!   /api/v1` and `GET /apis/<group>/<version>` (APIResourceList, with
//!   `status` subresources listed as the real server does);
//! - `GET` one object, `GET` a list (one namespace or all) with
//!   `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`), `DELETE` (body or
//!   query `DeleteOptions`; 404 when gone; deleting a Namespace deletes what
//!   is in it);
//! - `PATCH` with `Content-Type: application/apply-patch+yaml` (server-side
//!   apply: `fieldManager` required, `force`, `dryRun=All`) and with
//!   `application/merge-patch+json` (an *Update* by `fieldManager`, which is
//!   what `kubectl edit` does);
//! - server-side apply semantics the agent relies on: per-manager field
//!   ownership kept in `metadata.managedFields` (FieldsV1); a dry run never
//!   persists; a field a manager stops applying is removed when no other
//!   manager owns it; a field another manager owns with a different value is
//!   a 409 `Conflict` with one `FieldManagerConflict` cause per (manager,
//!   field), unless `force=true` moves it; an Update takes the fields it
//!   changes from every other manager; `stringData` of a Secret becomes
//!   base64 `data`; a few server defaults (Deployment, Service) that no
//!   manager owns; `resourceVersion`, `uid`, `generation` (bumped when
//!   anything but metadata and status changes), `creationTimestamp`;
//! - errors as the real server shapes its `Status`: 404 `NotFound`
//!   (`deployments.apps "x" not found`, also for a missing namespace), 409
//!   `Conflict`, 422 `Invalid` (negative replicas, a changed Deployment
//!   selector or Job template: `field is immutable`), 400 `BadRequest`, 401
//!   without the bearer token;
//! - CRDs: applying a `CustomResourceDefinition` serves its resources from
//!   then on, and it is `Established` at once.
//!
//! Workloads roll out at once (their `status` says so) unless a test pins a
//! status with [`KubeStandIn::set_status`]. Other hooks: [`KubeStandIn::get`],
//! [`KubeStandIn::apply_as`] (another field manager's apply),
//! [`KubeStandIn::edit`] (an Update, as `kubectl edit`), [`KubeStandIn::stop`]
//! / [`KubeStandIn::restart`], [`KubeStandIn::requests`] and
//! [`KubeStandIn::write_kubeconfig`].

use crate::standin::{lock, read_head, Head, Served};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Map, Value};

/// The bearer token the stand-in accepts (in the kubeconfig it writes).
pub const TOKEN: &str = "kube-standin-token";

/// One resource type the stand-in serves.
#[derive(Debug, Clone)]
struct ResourceType {
    group: String,
    version: String,
    plural: String,
    kind: String,
    namespaced: bool,
    short: Vec<&'static str>,
}

/// One request seen (no headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
}

type Key = (String, String, String, String); // group, plural, namespace ("" cluster), name

struct Stored {
    object: Value,
    /// manager -> (operation, apiVersion, owned leaf paths)
    managers: BTreeMap<String, (String, String, BTreeSet<FieldPath>)>,
    /// A status a test pinned: kept, never rolled out by the stand-in.
    pinned_status: bool,
}

struct State {
    types: Vec<ResourceType>,
    objects: BTreeMap<Key, Stored>,
    resource_version: u64,
    requests: Vec<Seen>,
    next_ip: u32,
    /// Answer every request 429 with this `Retry-After` (seconds): an API
    /// server throttling, which a real one cannot be made to do on demand.
    throttle: Option<u32>,
}

/// A stand-in Kubernetes API server (see the module docs). Stopped on Drop.
pub struct KubeStandIn {
    server: Served<State>,
}

fn builtin_types() -> Vec<ResourceType> {
    let t = |group: &str,
             version: &str,
             plural: &str,
             kind: &str,
             namespaced: bool,
             short: &[&'static str]| ResourceType {
        group: group.into(),
        version: version.into(),
        plural: plural.into(),
        kind: kind.into(),
        namespaced,
        short: short.to_vec(),
    };
    vec![
        t("", "v1", "namespaces", "Namespace", false, &["ns"]),
        t("", "v1", "configmaps", "ConfigMap", true, &["cm"]),
        t("", "v1", "secrets", "Secret", true, &[]),
        t("", "v1", "services", "Service", true, &["svc"]),
        t("", "v1", "serviceaccounts", "ServiceAccount", true, &["sa"]),
        t(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            true,
            &["pvc"],
        ),
        t("", "v1", "pods", "Pod", true, &["po"]),
        t("apps", "v1", "deployments", "Deployment", true, &["deploy"]),
        t("apps", "v1", "statefulsets", "StatefulSet", true, &["sts"]),
        t("apps", "v1", "daemonsets", "DaemonSet", true, &["ds"]),
        t("batch", "v1", "jobs", "Job", true, &[]),
        t("batch", "v1", "cronjobs", "CronJob", true, &["cj"]),
        t(
            "autoscaling",
            "v2",
            "horizontalpodautoscalers",
            "HorizontalPodAutoscaler",
            true,
            &["hpa"],
        ),
        t(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
            &["pdb"],
        ),
        t(
            "networking.k8s.io",
            "v1",
            "networkpolicies",
            "NetworkPolicy",
            true,
            &["netpol"],
        ),
        t(
            "networking.k8s.io",
            "v1",
            "ingresses",
            "Ingress",
            true,
            &["ing"],
        ),
        t(
            "rbac.authorization.k8s.io",
            "v1",
            "roles",
            "Role",
            true,
            &[],
        ),
        t(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
            &[],
        ),
        t(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
            &[],
        ),
        t(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            &[],
        ),
        t(
            "storage.k8s.io",
            "v1",
            "storageclasses",
            "StorageClass",
            false,
            &["sc"],
        ),
        t(
            "node.k8s.io",
            "v1",
            "runtimeclasses",
            "RuntimeClass",
            false,
            &[],
        ),
        t(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd"],
        ),
    ]
}

impl KubeStandIn {
    /// Starts the stand-in on a free 127.0.0.1 port with the built-in types
    /// and the namespaces a cluster starts with (`default`, `kube-system`).
    pub fn start() -> KubeStandIn {
        let state = State {
            types: builtin_types(),
            objects: BTreeMap::new(),
            resource_version: 100,
            requests: Vec::new(),
            next_ip: 10,
            throttle: None,
        };
        let s = KubeStandIn {
            server: Served::start("kube-standin", state, handle),
        };
        for ns in ["default", "kube-system"] {
            s.apply_as(
                "kube-apiserver",
                &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                false,
            )
            .unwrap();
        }
        s
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Writes a kubeconfig whose context `context` points at this server
    /// (plain http, bearer token); returns its path.
    pub fn write_kubeconfig(&self, dir: &Path, context: &str) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {}\nusers:\n- name: standin\n  user:\n    token: {TOKEN}\ncontexts:\n- name: {context}\n  context:\n    cluster: standin\n    user: standin\n    namespace: default\ncurrent-context: {context}\n",
                self.url()
            ),
        )
        .unwrap();
        path
    }

    /// The stored object (`group` "" for core), `None` if absent.
    pub fn get(
        &self,
        group: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let st = self.server.lock();
        let t = st
            .types
            .iter()
            .find(|t| t.group == group && t.kind == kind)?;
        st.objects
            .get(&(
                group.into(),
                t.plural.clone(),
                namespace.unwrap_or("").into(),
                name.into(),
            ))
            .map(with_managed_fields)
    }

    /// Every stored object of a kind, for assertions.
    pub fn names(&self, group: &str, kind: &str) -> Vec<String> {
        let st = self.server.lock();
        let Some(t) = st.types.iter().find(|t| t.group == group && t.kind == kind) else {
            return Vec::new();
        };
        st.objects
            .iter()
            .filter(|((g, p, _, _), _)| *g == group && *p == t.plural)
            .map(|((_, _, ns, n), _)| {
                if ns.is_empty() {
                    n.clone()
                } else {
                    format!("{ns}/{n}")
                }
            })
            .collect()
    }

    /// Server-side apply by another field manager (a Helm release, another
    /// tool), as over HTTP. Errors are the Status the server would return.
    pub fn apply_as(&self, manager: &str, object: &Value, force: bool) -> Result<Value, Value> {
        let mut st = self.server.lock();
        let (key, t) = st.key_of(object).map_err(|e| e.1)?;
        st.apply(&t, key, object.clone(), manager, force, false)
            .map(|r| r.1)
            .map_err(|e| e.1)
    }

    /// What a Helm release of kube-prometheus-stack leaves for the agent's
    /// `monitoring` stack: the operator's PrometheusRule CRD and the
    /// `monitoring` namespace (neither owned by the agent).
    pub fn install_prometheus_operator(&self) {
        self.apply_as(
            "helm",
            &serde_json::json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": "prometheusrules.monitoring.coreos.com"},
                "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                         "names": {"plural": "prometheusrules", "singular": "prometheusrule", "kind": "PrometheusRule"},
                         "versions": [{"name": "v1", "served": true, "storage": true,
                                       "schema": {"openAPIV3Schema": {"type": "object"}}}]}}),
            false,
        )
        .expect("the CRD applies");
        self.apply_as(
            "helm",
            &serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "monitoring"}}),
            false,
        )
        .expect("the namespace applies");
    }

    /// An Update (JSON merge patch) by `manager`, as `kubectl edit` does:
    /// the fields it changes become that manager's.
    pub fn edit(
        &self,
        manager: &str,
        group: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        patch: &Value,
    ) -> Value {
        let mut st = self.server.lock();
        let t = st
            .types
            .iter()
            .find(|t| t.group == group && t.kind == kind)
            .cloned()
            .expect("a served kind");
        let key = (
            group.to_string(),
            t.plural.clone(),
            namespace.unwrap_or("").to_string(),
            name.to_string(),
        );
        st.update(&t, key, patch, manager)
            .map(|r| r.1)
            .unwrap_or_else(|e| e.1)
    }

    /// Pins a workload's `status` (the stand-in then never rolls it out):
    /// how tests make a Deployment unhealthy, or healthy on their terms.
    pub fn set_status(
        &self,
        group: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        status: Value,
    ) {
        let mut st = self.server.lock();
        let t = st
            .types
            .iter()
            .find(|t| t.group == group && t.kind == kind)
            .cloned()
            .expect("a served kind");
        let key = (
            group.to_string(),
            t.plural.clone(),
            namespace.unwrap_or("").to_string(),
            name.to_string(),
        );
        let stored = st
            .objects
            .get_mut(&key)
            .expect("set_status of an existing object");
        stored.object["status"] = status;
        stored.pinned_status = true;
    }

    /// Every request so far.
    /// Throttles every request from now on (429 with `Retry-After: secs`),
    /// or stops throttling (`None`).
    pub fn throttle(&self, secs: Option<u32>) {
        self.server.lock().throttle = secs;
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.server.lock().requests.clone()
    }

    /// Stops serving (connections are refused); objects are kept.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Serves again on the same port.
    pub fn restart(&mut self) {
        self.server.restart();
    }
}

// ---------------------------------------------------------------- HTTP

struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn param(&self, key: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k) == key).then(|| decode(v))
        })
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_request(conn: &mut TcpStream) -> Option<Request> {
    let Head {
        method,
        target,
        headers,
        rest,
    } = read_head(conn)?;
    let mut chunk = [0u8; 8192];
    let mut body = rest;
    let header = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        // Read until the terminating chunk, then decode.
        while !body.windows(5).any(|w| w == b"0\r\n\r\n") {
            let n = conn.read(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        let mut decoded = Vec::new();
        let mut rest = &body[..];
        while let Some(pos) = rest.windows(2).position(|w| w == b"\r\n") {
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&rest[..pos]).trim(), 16).ok()?;
            if size == 0 {
                break;
            }
            let start = pos + 2;
            decoded.extend_from_slice(rest.get(start..start + size)?);
            rest = rest.get(start + size + 2..)?;
        }
        body = decoded;
    } else {
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while body.len() < len.min(8 << 20) {
            let n = conn.read(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(len);
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target, String::new()),
    };
    Some(Request {
        method,
        path,
        query,
        headers,
        body,
    })
}

fn handle(mut conn: TcpStream, state: &Mutex<State>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let Some(req) = read_request(&mut conn) else {
        return;
    };
    let (status, body) = route(&req, state);
    let retry_after = lock(state).throttle.filter(|_| status == 429);
    let reason = match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        _ => "Unknown",
    };
    let text = body.to_string();
    let extra = retry_after.map_or(String::new(), |s| format!("Retry-After: {s}\r\n"));
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        text.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(text.as_bytes());
    let _ = conn.flush();
    let _ = conn.shutdown(Shutdown::Write);
}

type Answer = (u16, Value);

/// A `Status` shaped as the real server's.
fn status(code: u16, reason: &str, message: String, details: Option<Value>) -> Answer {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        s["details"] = d;
    }
    (code, s)
}

fn not_found(t: &ResourceType, name: &str) -> Answer {
    let what = if t.group.is_empty() {
        t.plural.clone()
    } else {
        format!("{}.{}", t.plural, t.group)
    };
    status(
        404,
        "NotFound",
        format!("{what} \"{name}\" not found"),
        Some(json!({"name": name, "group": t.group, "kind": t.plural})),
    )
}

fn route(req: &Request, state: &Mutex<State>) -> Answer {
    let mut st = lock(state);
    st.requests.push(Seen {
        method: req.method.clone(),
        path: req.path.clone(),
        query: req.query.clone(),
    });
    if req.header("authorization") != Some(&format!("Bearer {TOKEN}")) {
        return status(401, "Unauthorized", "Unauthorized".into(), None);
    }
    if let Some(secs) = st.throttle {
        return (
            429,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "Too many requests, please try again later.", "reason": "TooManyRequests",
                   "details": {"retryAfterSeconds": secs}, "code": 429}),
        );
    }
    let segs: Vec<&str> = req
        .path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api"] => {
            return (
                200,
                json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            )
        }
        ["apis"] => return (200, st.group_list()),
        ["api", v, rest @ ..] => ("".to_string(), v.to_string(), rest.to_vec()),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest.to_vec()),
        _ => {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource".into(),
                None,
            )
        }
    };
    if rest.is_empty() {
        return match st.resource_list(&group, &version) {
            Some(l) => (200, l),
            None => status(
                404,
                "NotFound",
                "the server could not find the requested resource".into(),
                None,
            ),
        };
    }
    // [namespaces/<ns>/]<plural>[/<name>]
    let (namespace, plural, name) = match rest.as_slice() {
        ["namespaces", ns, plural, name] => (
            Some(ns.to_string()),
            plural.to_string(),
            Some(name.to_string()),
        ),
        ["namespaces", ns, plural] => (Some(ns.to_string()), plural.to_string(), None),
        [plural, name] => (None, plural.to_string(), Some(name.to_string())),
        [plural] => (None, plural.to_string(), None),
        _ => {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource".into(),
                None,
            )
        }
    };
    let Some(t) = st
        .types
        .iter()
        .find(|t| t.group == group && t.version == version && t.plural == plural)
        .cloned()
    else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
            None,
        );
    };
    if t.namespaced != namespace.is_some() && name.is_some() {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
            None,
        );
    }
    let Some(name) = name else {
        if req.method != "GET" {
            return status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource".into(),
                None,
            );
        }
        return st.list(
            &t,
            namespace.as_deref(),
            req.param("labelSelector").as_deref(),
        );
    };
    let key = (
        group.clone(),
        plural.clone(),
        namespace.clone().unwrap_or_default(),
        name.clone(),
    );
    match req.method.as_str() {
        "GET" => match st.objects.get(&key) {
            Some(s) => (200, with_managed_fields(s)),
            None => not_found(&t, &name),
        },
        "DELETE" => st.delete(&t, &key),
        "PATCH" => {
            let content_type = req.header("content-type").unwrap_or("");
            let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
                return status(400, "BadRequest", "the body of the request was in an unknown format (this stand-in reads JSON bodies)".into(), None);
            };
            let manager = req.param("fieldManager");
            let dry_run = req.param("dryRun").as_deref() == Some("All");
            let force = req.param("force").as_deref() == Some("true");
            if content_type.starts_with("application/apply-patch+yaml") {
                let Some(manager) = manager else {
                    return status(
                        400,
                        "BadRequest",
                        "PATCH requests with apply must have fieldManager".into(),
                        None,
                    );
                };
                if body
                    .get("metadata")
                    .and_then(|m| m.get("name"))
                    .and_then(Value::as_str)
                    != Some(name.as_str())
                {
                    return status(
                        400,
                        "BadRequest",
                        "the name of the object (\"\") does not match the name on the URL".into(),
                        None,
                    );
                }
                if let Some(ns) = body.pointer("/metadata/namespace").and_then(Value::as_str) {
                    if Some(ns) != namespace.as_deref() {
                        return status(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request".into(), None);
                    }
                }
                if body.pointer("/metadata/managedFields").is_some() {
                    return status(
                        400,
                        "BadRequest",
                        "metadata.managedFields must be nil".into(),
                        None,
                    );
                }
                match st.apply(&t, key, body, &manager, force, dry_run) {
                    Ok((code, v)) => (code, v),
                    Err(e) => e,
                }
            } else if content_type.starts_with("application/merge-patch+json") {
                if force {
                    return status(
                        400,
                        "BadRequest",
                        "force may not be used with a non-apply patch".into(),
                        None,
                    );
                }
                let manager = manager.unwrap_or_else(|| "kubectl-edit".into());
                match st.update(&t, key, &body, &manager) {
                    Ok(r) => r,
                    Err(e) => e,
                }
            } else {
                status(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {content_type})"), None)
            }
        }
        _ => status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".into(),
            None,
        ),
    }
}

// ---------------------------------------------------------------- field paths

/// One step of a field path: a map key, or the item of an associative list
/// keyed by `name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Seg {
    Key(String),
    Name(String),
}

type FieldPath = Vec<Seg>;

/// A list whose items are maps with distinct `name`s merges by name.
fn keyed(items: &[Value]) -> bool {
    let names: Vec<Option<&str>> = items
        .iter()
        .map(|i| i.get("name").and_then(Value::as_str))
        .collect();
    !items.is_empty()
        && names.iter().all(Option::is_some)
        && names.iter().collect::<BTreeSet<_>>().len() == names.len()
}

/// The leaf fields of an applied object (what its manager owns).
fn leaves(v: &Value, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                if prefix.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "status") {
                    continue;
                }
                if prefix.len() == 1
                    && prefix[0] == Seg::Key("metadata".into())
                    && matches!(k.as_str(), "name" | "namespace")
                {
                    continue;
                }
                prefix.push(Seg::Key(k.clone()));
                leaves(x, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) if keyed(items) => {
            for item in items {
                prefix.push(Seg::Name(item["name"].as_str().unwrap().to_string()));
                for (k, x) in item.as_object().unwrap() {
                    prefix.push(Seg::Key(k.clone()));
                    leaves(x, prefix, out);
                    prefix.pop();
                }
                prefix.pop();
            }
        }
        _ => {
            out.insert(prefix.clone());
        }
    }
}

fn leaf_set(v: &Value) -> BTreeSet<FieldPath> {
    let mut out = BTreeSet::new();
    leaves(v, &mut Vec::new(), &mut out);
    out
}

fn lookup<'a>(v: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    let mut cur = v;
    for s in path {
        cur = match s {
            Seg::Key(k) => cur.get(k)?,
            Seg::Name(n) => cur
                .as_array()?
                .iter()
                .find(|i| i.get("name").and_then(Value::as_str) == Some(n))?,
        };
    }
    Some(cur)
}

/// Removes a field, then parents it left empty.
fn remove(v: &mut Value, path: &[Seg]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    {
        let Some(parent) = lookup_mut(v, parents) else {
            return;
        };
        match (last, parent) {
            (Seg::Key(k), Value::Object(m)) => {
                m.remove(k);
            }
            (Seg::Name(n), Value::Array(items)) => {
                items.retain(|i| i.get("name").and_then(Value::as_str) != Some(n))
            }
            _ => {}
        }
    }
    if parents.len() > 1
        || parents
            .first()
            .is_some_and(|p| *p != Seg::Key("metadata".into()))
    {
        let empty = lookup(v, parents).is_some_and(|p| match p {
            Value::Object(m) => m.is_empty(),
            Value::Array(a) => a.is_empty(),
            _ => false,
        });
        if empty {
            remove(v, parents);
        }
    }
}

fn lookup_mut<'a>(v: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    let mut cur = v;
    for s in path {
        cur = match s {
            Seg::Key(k) => cur.get_mut(k)?,
            Seg::Name(n) => cur
                .as_array_mut()?
                .iter_mut()
                .find(|i| i.get("name").and_then(Value::as_str) == Some(n))?,
        };
    }
    Some(cur)
}

/// Deep merge of an applied object into the live one (associative lists by name).
fn merge(dst: &mut Value, src: &Value) {
    match (dst, src) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, sv) in s {
                match d.get_mut(k) {
                    Some(dv) => merge(dv, sv),
                    None => {
                        d.insert(k.clone(), sv.clone());
                    }
                }
            }
        }
        (Value::Array(d), Value::Array(s))
            if keyed(s) && d.iter().all(|i| i.get("name").is_some()) =>
        {
            for item in s {
                match d.iter_mut().find(|i| i.get("name") == item.get("name")) {
                    Some(di) => merge(di, item),
                    None => d.push(item.clone()),
                }
            }
        }
        (d, s) => *d = s.clone(),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// `.spec.template.spec.containers[name="web"].image`
fn show_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for s in path {
        match s {
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Name(n) => out.push_str(&format!("[name=\"{n}\"]")),
        }
    }
    out
}

/// FieldsV1 of a set of leaf paths.
fn fields_v1(paths: &BTreeSet<FieldPath>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut cur = &mut root;
        for s in p {
            let key = match s {
                Seg::Key(k) => format!("f:{k}"),
                Seg::Name(n) => format!("k:{}", json!({"name": n})),
            };
            cur = cur
                .entry(key)
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .unwrap();
            if matches!(s, Seg::Name(_)) {
                cur.entry(".").or_insert_with(|| Value::Object(Map::new()));
            }
        }
    }
    Value::Object(root)
}

fn with_managed_fields(s: &Stored) -> Value {
    let mut o = s.object.clone();
    let entries: Vec<Value> = s
        .managers
        .iter()
        .filter(|(_, (_, _, set))| !set.is_empty())
        .map(|(m, (op, api_version, set))| {
            json!({"manager": m, "operation": op, "apiVersion": api_version, "time": "2026-01-01T00:00:00Z",
                   "fieldsType": "FieldsV1", "fieldsV1": fields_v1(set)})
        })
        .collect();
    o["metadata"]["managedFields"] = Value::Array(entries);
    o
}

// ---------------------------------------------------------------- the store

impl State {
    fn group_list(&self) -> Value {
        let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for t in self.types.iter().filter(|t| !t.group.is_empty()) {
            groups
                .entry(t.group.clone())
                .or_default()
                .insert(t.version.clone());
        }
        let list: Vec<Value> = groups
            .iter()
            .map(|(g, versions)| {
                let vs: Vec<Value> = versions
                    .iter()
                    .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                    .collect();
                let preferred = vs.last().cloned().unwrap();
                json!({"name": g, "versions": vs, "preferredVersion": preferred})
            })
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list})
    }

    fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let types: Vec<&ResourceType> = self
            .types
            .iter()
            .filter(|t| t.group == group && t.version == version)
            .collect();
        if types.is_empty() {
            return None;
        }
        let mut resources = Vec::new();
        for t in types {
            resources.push(json!({
                "name": t.plural, "singularName": t.kind.to_lowercase(), "namespaced": t.namespaced, "kind": t.kind,
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
                "shortNames": t.short,
            }));
            resources.push(json!({"name": format!("{}/status", t.plural), "singularName": "", "namespaced": t.namespaced,
                "kind": t.kind, "verbs": ["get", "patch", "update"]}));
        }
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        Some(
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
        )
    }

    fn key_of(&self, object: &Value) -> Result<(Key, ResourceType), (u16, Value)> {
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let t = self
            .types
            .iter()
            .find(|t| t.group == group && t.version == version && t.kind == kind)
            .cloned()
            .ok_or_else(|| {
                status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource".into(),
                    None,
                )
            })?;
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let ns = if t.namespaced {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        Ok(((t.group.clone(), t.plural.clone(), ns, name), t))
    }

    fn list(&self, t: &ResourceType, namespace: Option<&str>, selector: Option<&str>) -> Answer {
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|((g, p, ns, _), _)| {
                *g == t.group && *p == t.plural && namespace.is_none_or(|n| n == ns)
            })
            .filter(|(_, s)| selector.is_none_or(|sel| matches_selector(&s.object, sel)))
            .map(|(_, s)| {
                let mut o = with_managed_fields(s);
                let m = o.as_object_mut().unwrap();
                m.remove("apiVersion");
                m.remove("kind");
                o
            })
            .collect();
        let gv = if t.group.is_empty() {
            t.version.clone()
        } else {
            format!("{}/{}", t.group, t.version)
        };
        (
            200,
            json!({"kind": format!("{}List", t.kind), "apiVersion": gv,
                     "metadata": {"resourceVersion": self.resource_version.to_string()}, "items": items}),
        )
    }

    fn delete(&mut self, t: &ResourceType, key: &Key) -> Answer {
        if self.objects.remove(key).is_none() {
            return not_found(t, &key.3);
        }
        if t.kind == "Namespace" {
            self.objects.retain(|(_, _, ns, _), _| *ns != key.3);
        }
        if t.kind == "CustomResourceDefinition" {
            let name = key.3.clone();
            if let Some((plural, group)) = name.split_once('.') {
                self.types
                    .retain(|x| !(x.group == group && x.plural == plural));
                self.objects
                    .retain(|(g, p, _, _), _| !(g == group && p == plural));
            }
        }
        self.resource_version += 1;
        (
            200,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                     "details": {"name": key.3, "group": t.group, "kind": t.plural, "uid": "gone"}}),
        )
    }

    fn namespace_missing(&self, t: &ResourceType, key: &Key) -> Option<Answer> {
        if !t.namespaced {
            return None;
        }
        let ns_key = (
            String::new(),
            "namespaces".to_string(),
            String::new(),
            key.2.clone(),
        );
        (!self.objects.contains_key(&ns_key)).then(|| {
            status(
                404,
                "NotFound",
                format!("namespaces \"{}\" not found", key.2),
                Some(json!({"name": key.2, "kind": "namespaces"})),
            )
        })
    }

    /// Server-side apply. `Ok((201|200, object))`.
    fn apply(
        &mut self,
        t: &ResourceType,
        key: Key,
        mut body: Value,
        manager: &str,
        force: bool,
        dry_run: bool,
    ) -> Result<Answer, Answer> {
        if let Some(e) = self.namespace_missing(t, &key) {
            return Err(e);
        }
        if let Some(m) = body.as_object_mut() {
            m.remove("status");
        }
        if t.kind == "Secret" {
            string_data_to_data(&mut body);
        }
        let new_set = leaf_set(&body);
        let api_version = body
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let existing = self.objects.get(&key);
        let mut managers = existing.map(|s| s.managers.clone()).unwrap_or_default();
        let live = existing.map(|s| s.object.clone());
        // Conflicts: fields another manager owns, with a different value.
        let mut conflicts: Vec<(String, FieldPath)> = Vec::new();
        if let Some(live) = &live {
            for p in &new_set {
                for (m, (_, _, set)) in &managers {
                    if m != manager && set.contains(p) && lookup(live, p) != lookup(&body, p) {
                        conflicts.push((m.clone(), p.clone()));
                    }
                }
            }
        }
        if !conflicts.is_empty() && !force {
            let causes: Vec<Value> = conflicts
                .iter()
                .map(|(m, p)| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{m}\" using {api_version}"), "field": show_path(p)}))
                .collect();
            let listed: Vec<String> = conflicts
                .iter()
                .map(|(m, p)| {
                    format!(
                        "conflict with \"{m}\" using {api_version}: {}",
                        show_path(p)
                    )
                })
                .collect();
            let message = if conflicts.len() == 1 {
                format!("Apply failed with 1 conflict: {}", listed[0])
            } else {
                format!(
                    "Apply failed with {} conflicts: {}",
                    conflicts.len(),
                    listed.join("\n")
                )
            };
            return Err(status(
                409,
                "Conflict",
                message,
                Some(json!({"causes": causes})),
            ));
        }
        for (m, p) in &conflicts {
            if let Some(entry) = managers.get_mut(m) {
                entry.2.remove(p);
            }
        }
        let old_set = managers
            .get(manager)
            .map(|e| e.2.clone())
            .unwrap_or_default();
        let mut merged = live.clone().unwrap_or_else(|| json!({}));
        for p in old_set.difference(&new_set) {
            let owned_by_other = managers
                .iter()
                .any(|(m, (_, _, set))| m != manager && set.contains(p));
            if !owned_by_other {
                remove(&mut merged, p);
            }
        }
        merge(&mut merged, &body);
        managers.insert(
            manager.to_string(),
            ("Apply".to_string(), api_version, new_set),
        );
        self.finish_write(t, key, live, merged, managers, dry_run)
    }

    /// An Update (merge patch): changed fields move to `manager`.
    fn update(
        &mut self,
        t: &ResourceType,
        key: Key,
        patch: &Value,
        manager: &str,
    ) -> Result<Answer, Answer> {
        let Some(existing) = self.objects.get(&key) else {
            return Err(not_found(t, &key.3));
        };
        let live = existing.object.clone();
        let mut managers = existing.managers.clone();
        let mut merged = live.clone();
        merge_patch(&mut merged, patch);
        if t.kind == "Secret" {
            string_data_to_data(&mut merged);
        }
        let before = leaf_set(&live);
        let after = leaf_set(&merged);
        let changed: BTreeSet<FieldPath> = after
            .iter()
            .filter(|p| lookup(&live, p) != lookup(&merged, p))
            .cloned()
            .collect();
        let gone: BTreeSet<FieldPath> = before.difference(&after).cloned().collect();
        for (_, (_, _, set)) in managers.iter_mut() {
            set.retain(|p| !changed.contains(p) && !gone.contains(p));
        }
        let api_version = live
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let entry = managers
            .entry(manager.to_string())
            .or_insert_with(|| ("Update".to_string(), api_version, BTreeSet::new()));
        entry.2.extend(changed);
        self.finish_write(t, key, Some(live), merged, managers, false)
    }

    fn finish_write(
        &mut self,
        t: &ResourceType,
        key: Key,
        live: Option<Value>,
        mut merged: Value,
        managers: BTreeMap<String, (String, String, BTreeSet<FieldPath>)>,
        dry_run: bool,
    ) -> Result<Answer, Answer> {
        self.defaults(t, &mut merged, live.as_ref());
        validate(t, &key.3, &merged, live.as_ref())?;
        let created = live.is_none();
        let meta = merged["metadata"].as_object_mut().unwrap();
        meta.insert("name".into(), json!(key.3));
        if t.namespaced {
            meta.insert("namespace".into(), json!(key.2));
        }
        let spec_changed = live
            .as_ref()
            .is_none_or(|l| strip_meta(l) != strip_meta(&merged));
        let generation = live
            .as_ref()
            .and_then(|l| l.pointer("/metadata/generation"))
            .and_then(Value::as_i64)
            .unwrap_or(0)
            + i64::from(spec_changed);
        let meta = merged["metadata"].as_object_mut().unwrap();
        meta.insert("generation".into(), json!(generation.max(1)));
        if created {
            meta.insert(
                "uid".into(),
                json!(format!("uid-{}-{}", key.3, self.resource_version)),
            );
            meta.insert(
                "creationTimestamp".into(),
                json!(crate::rfc3339(1_767_225_600 + self.resource_version as i64)),
            );
        }
        if dry_run {
            // Never persisted; a created object has no resourceVersion yet.
            if created {
                merged["metadata"]
                    .as_object_mut()
                    .unwrap()
                    .remove("resourceVersion");
            }
            let stored = Stored {
                object: merged,
                managers,
                pinned_status: false,
            };
            return Ok((
                if created { 201 } else { 200 },
                with_managed_fields(&stored),
            ));
        }
        let changed = live.as_ref() != Some(&merged);
        if changed {
            self.resource_version += 1;
            merged["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        }
        let pinned = self.objects.get(&key).is_some_and(|s| s.pinned_status);
        if pinned {
            if let Some(st) = live.as_ref().and_then(|l| l.get("status")) {
                merged["status"] = st.clone();
            }
        } else {
            roll_out(&t.kind, &mut merged);
        }
        if t.kind == "CustomResourceDefinition" {
            self.serve_crd(&mut merged);
        }
        let stored = Stored {
            object: merged,
            managers,
            pinned_status: pinned,
        };
        let answer = with_managed_fields(&stored);
        self.objects.insert(key, stored);
        Ok((if created { 201 } else { 200 }, answer))
    }

    fn defaults(&mut self, t: &ResourceType, o: &mut Value, live: Option<&Value>) {
        match t.kind.as_str() {
            "Deployment" => {
                let spec = o["spec"].as_object_mut();
                if let Some(spec) = spec {
                    spec.entry("replicas").or_insert(json!(1));
                    spec.entry("revisionHistoryLimit").or_insert(json!(10));
                    spec.entry("progressDeadlineSeconds").or_insert(json!(600));
                    spec.entry("strategy").or_insert(json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}));
                }
            }
            "Service" => {
                let ip = live.and_then(|l| l.pointer("/spec/clusterIP")).cloned();
                let next = self.next_ip;
                if let Some(spec) = o["spec"].as_object_mut() {
                    spec.entry("type").or_insert(json!("ClusterIP"));
                    spec.entry("sessionAffinity").or_insert(json!("None"));
                    if !spec.contains_key("clusterIP") {
                        spec.insert(
                            "clusterIP".into(),
                            ip.unwrap_or_else(|| json!(format!("10.96.0.{next}"))),
                        );
                        self.next_ip += 1;
                    }
                }
            }
            _ => {}
        }
    }

    /// A CRD serves its kind from now on and is Established at once.
    fn serve_crd(&mut self, crd: &mut Value) {
        let group = crd
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let plural = crd
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let kind = crd
            .pointer("/spec/names/kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let namespaced = crd.pointer("/spec/scope").and_then(Value::as_str) != Some("Cluster");
        let versions: Vec<String> = crd
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .map(|vs| {
                vs.iter()
                    .filter(|v| v.get("served") != Some(&json!(false)))
                    .filter_map(|v| v.get("name")?.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        self.types
            .retain(|t| !(t.group == group && t.plural == plural));
        for version in versions {
            self.types.push(ResourceType {
                group: group.clone(),
                version,
                plural: plural.clone(),
                kind: kind.clone(),
                namespaced,
                short: Vec::new(),
            });
        }
        crd["status"] = json!({"conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted"}
        ], "acceptedNames": {"plural": plural, "kind": kind}});
    }
}

fn strip_meta(o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

fn string_data_to_data(body: &mut Value) {
    let Some(m) = body.as_object_mut() else {
        return;
    };
    if let Some(Value::Object(sd)) = m.remove("stringData") {
        let data = m.entry("data").or_insert_with(|| json!({}));
        for (k, v) in sd {
            data[k] =
                json!(base64::engine::general_purpose::STANDARD
                    .encode(v.as_str().unwrap_or_default()));
        }
    }
}

fn matches_selector(o: &Value, selector: &str) -> bool {
    let labels = o.pointer("/metadata/labels");
    let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            label(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            label(k.trim()) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            label(k.trim()).is_none()
        } else {
            label(term.trim()).is_some()
        }
    })
}

/// What the real server rejects that the tests rely on (422 `Invalid`).
fn validate(t: &ResourceType, name: &str, o: &Value, live: Option<&Value>) -> Result<(), Answer> {
    let group_kind = if t.group.is_empty() {
        t.kind.clone()
    } else {
        format!("{}.{}", t.kind, t.group)
    };
    let invalid = |field: &str, message: String| {
        let full = format!("{group_kind} \"{name}\" is invalid: {field}: {message}");
        status(
            422,
            "Invalid",
            full,
            Some(json!({"name": name, "group": t.group, "kind": t.kind,
            "causes": [{"reason": "FieldValueInvalid", "message": message, "field": field}]})),
        )
    };
    match t.kind.as_str() {
        "Deployment" | "StatefulSet" => {
            if let Some(r) = o.pointer("/spec/replicas").and_then(Value::as_i64) {
                if r < 0 {
                    return Err(invalid(
                        "spec.replicas",
                        format!("Invalid value: {r}: must be greater than or equal to 0"),
                    ));
                }
            }
            if o.pointer("/spec/selector").is_none() {
                return Err(invalid("spec.selector", "Required value".into()));
            }
            if let Some(l) = live {
                if l.pointer("/spec/selector") != o.pointer("/spec/selector") {
                    return Err(invalid(
                        "spec.selector",
                        format!(
                            "Invalid value: {}: field is immutable",
                            o.pointer("/spec/selector").unwrap()
                        ),
                    ));
                }
            }
        }
        "Job" => {
            if let Some(l) = live {
                if l.pointer("/spec/template") != o.pointer("/spec/template") {
                    return Err(invalid(
                        "spec.template",
                        "Invalid value: field is immutable".into(),
                    ));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// What a cluster's controllers would report once a workload is rolled out.
fn roll_out(kind: &str, o: &mut Value) {
    let generation = o
        .pointer("/metadata/generation")
        .cloned()
        .unwrap_or(json!(1));
    let replicas = o
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    o["status"] = match kind {
        "Deployment" => {
            json!({"observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
            "readyReplicas": replicas, "availableReplicas": replicas,
            "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                           {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]})
        }
        "StatefulSet" => {
            json!({"observedGeneration": generation, "replicas": replicas, "readyReplicas": replicas,
            "updatedReplicas": replicas, "currentRevision": "rev-1", "updateRevision": "rev-1"})
        }
        "DaemonSet" => {
            json!({"observedGeneration": generation, "desiredNumberScheduled": 1, "updatedNumberScheduled": 1,
            "numberAvailable": 1, "numberReady": 1})
        }
        "Job" => json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}),
        _ => return,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One raw HTTP request to the stand-in: (status, JSON body).
    fn call(
        k: &KubeStandIn,
        method: &str,
        path: &str,
        content_type: &str,
        body: &str,
        token: bool,
    ) -> (u16, Value) {
        let mut s = TcpStream::connect(("127.0.0.1", k.server.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let auth = if token {
            format!("Authorization: Bearer {TOKEN}\r\n")
        } else {
            String::new()
        };
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1;
        (code, serde_json::from_str(body).unwrap())
    }

    const APPLY: &str = "application/apply-patch+yaml";

    #[test]
    fn speaks_the_documented_protocol_over_http() {
        let k = KubeStandIn::start();
        // Discovery.
        let (code, v) = call(&k, "GET", "/api", "", "", true);
        assert_eq!((code, v["versions"].clone()), (200, json!(["v1"])));
        let (_, v) = call(&k, "GET", "/apis", "", "", true);
        assert!(v["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == "apps" && g["preferredVersion"]["groupVersion"] == "apps/v1"));
        let (_, v) = call(&k, "GET", "/apis/apps/v1", "", "", true);
        assert_eq!(v["kind"], "APIResourceList");
        assert!(v["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "deployments/status"));
        // Authentication.
        let (code, v) = call(&k, "GET", "/api", "", "", false);
        assert_eq!((code, v["reason"].as_str()), (401, Some("Unauthorized")));
        // 404 as the real server shapes it.
        let (code, v) = call(
            &k,
            "GET",
            "/apis/apps/v1/namespaces/default/deployments/nope",
            "",
            "",
            true,
        );
        assert_eq!(code, 404);
        assert_eq!(
            v,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "deployments.apps \"nope\" not found", "reason": "NotFound",
            "details": {"name": "nope", "group": "apps", "kind": "deployments"}, "code": 404})
        );
        // Apply needs a field manager; a dry run never persists.
        let cm = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c","namespace":"default","labels":{"app":"a"}},"data":{"a":"1","b":"2"}}"#;
        let path = "/api/v1/namespaces/default/configmaps/c";
        let (code, v) = call(&k, "PATCH", path, APPLY, cm, true);
        assert_eq!(
            (code, v["message"].as_str()),
            (
                400,
                Some("PATCH requests with apply must have fieldManager")
            )
        );
        let (code, v) = call(
            &k,
            "PATCH",
            &format!("{path}?fieldManager=m&dryRun=All"),
            APPLY,
            cm,
            true,
        );
        assert_eq!(code, 201);
        assert!(v["metadata"].get("resourceVersion").is_none());
        assert_eq!(call(&k, "GET", path, "", "", true).0, 404);
        let (code, v) = call(
            &k,
            "PATCH",
            &format!("{path}?fieldManager=m"),
            APPLY,
            cm,
            true,
        );
        assert_eq!(code, 201);
        assert_eq!(v["metadata"]["managedFields"][0]["manager"], "m");
        assert_eq!(
            v["metadata"]["managedFields"][0]["fieldsV1"]["f:data"],
            json!({"f:a": {}, "f:b": {}})
        );
        // Another manager with a different value: 409 with the field; force moves it.
        let other = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c","namespace":"default"},"data":{"a":"9"}}"#;
        let (code, v) = call(
            &k,
            "PATCH",
            &format!("{path}?fieldManager=n"),
            APPLY,
            other,
            true,
        );
        assert_eq!(code, 409);
        assert_eq!(v["reason"], "Conflict");
        assert_eq!(
            v["message"],
            "Apply failed with 1 conflict: conflict with \"m\" using v1: .data.a"
        );
        assert_eq!(
            v["details"]["causes"],
            json!([{"reason": "FieldManagerConflict", "message": "conflict with \"m\" using v1", "field": ".data.a"}])
        );
        let (code, _) = call(
            &k,
            "PATCH",
            &format!("{path}?fieldManager=n&force=true"),
            APPLY,
            other,
            true,
        );
        assert_eq!(code, 200);
        // m stops applying b (and a, now n's): b is removed, a stays n's.
        let less = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c","namespace":"default","labels":{"app":"a"}}}"#;
        let (_, v) = call(
            &k,
            "PATCH",
            &format!("{path}?fieldManager=m"),
            APPLY,
            less,
            true,
        );
        assert_eq!(v["data"], json!({"a": "9"}));
        // A merge patch is an Update: the fields it changes become its manager's.
        let (code, v) = call(
            &k,
            "PATCH",
            &format!("{path}?fieldManager=kubectl-edit"),
            "application/merge-patch+json",
            r#"{"metadata":{"labels":{"app":"b"}}}"#,
            true,
        );
        assert_eq!(code, 200);
        let edit = v["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["manager"] == "kubectl-edit")
            .unwrap()
            .clone();
        assert_eq!(
            (edit["operation"].as_str(), edit["fieldsV1"].clone()),
            (
                Some("Update"),
                json!({"f:metadata": {"f:labels": {"f:app": {}}}})
            )
        );
        // List with a label selector; delete; 404 after.
        let (_, v) = call(
            &k,
            "GET",
            "/api/v1/configmaps?labelSelector=app%3Db",
            "",
            "",
            true,
        );
        assert_eq!(v["items"].as_array().unwrap().len(), 1);
        let (_, v) = call(
            &k,
            "GET",
            "/api/v1/namespaces/default/configmaps?labelSelector=app%3Da",
            "",
            "",
            true,
        );
        assert_eq!(v["items"].as_array().unwrap().len(), 0);
        let (code, v) = call(
            &k,
            "DELETE",
            path,
            "application/json",
            r#"{"kind":"DeleteOptions","apiVersion":"v1","propagationPolicy":"Background"}"#,
            true,
        );
        assert_eq!((code, v["status"].as_str()), (200, Some("Success")));
        assert_eq!(
            call(&k, "DELETE", path, "application/json", "{}", true).0,
            404
        );
        // 422 Invalid with its cause.
        let bad = r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d","namespace":"default"},"spec":{"replicas":-1,"selector":{"matchLabels":{"a":"b"}}}}"#;
        let (code, v) = call(
            &k,
            "PATCH",
            "/apis/apps/v1/namespaces/default/deployments/d?fieldManager=m",
            APPLY,
            bad,
            true,
        );
        assert_eq!((code, v["reason"].as_str()), (422, Some("Invalid")));
        assert_eq!(v["details"]["causes"][0]["field"], "spec.replicas");
        // A missing namespace is a 404 NotFound naming it.
        let (code, v) = call(
            &k,
            "PATCH",
            "/api/v1/namespaces/gone/configmaps/c?fieldManager=m",
            APPLY,
            &cm.replace("default", "gone"),
            true,
        );
        assert_eq!(
            (code, v["message"].as_str()),
            (404, Some("namespaces \"gone\" not found"))
        );
    }

    #[test]
    fn field_paths_and_merge() {
        let o = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": {"a": "1"}},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "w", "image": "x", "args": ["a", "b"]}]}}}});
        let set: Vec<String> = leaf_set(&o).iter().map(|p| show_path(p)).collect();
        assert_eq!(
            set,
            [
                ".metadata.labels.a",
                ".spec.replicas",
                ".spec.template.spec.containers[name=\"w\"].args",
                ".spec.template.spec.containers[name=\"w\"].image",
                ".spec.template.spec.containers[name=\"w\"].name",
            ]
        );
        let mut live = json!({"data": {"a": "1", "b": "2"}});
        remove(&mut live, &[Seg::Key("data".into()), Seg::Key("b".into())]);
        assert_eq!(live, json!({"data": {"a": "1"}}));
        remove(&mut live, &[Seg::Key("data".into()), Seg::Key("a".into())]);
        assert_eq!(live, json!({}));
        assert_eq!(decode("app%3Dweb%2Ctier%21%3Ddb"), "app=web,tier!=db");
        assert!(matches_selector(
            &json!({"metadata": {"labels": {"app": "web"}}}),
            "app=web,!gone,tier!=db"
        ));
    }
}
