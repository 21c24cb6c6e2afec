//! The cluster side: how a stack reaches its API server (a kubeconfig
//! context or the in-cluster service account), discovery, and the four
//! calls the agent makes (get, server-side apply, dry-run apply, delete),
//! all through the real kube-rs client. Errors are turned into sentences
//! that name the server, the object and what to do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiResource, Discovery, Scope};
use kube::{Client, Config};
use serde_json::Value as Json;

use super::model::ClusterAccess;
use super::{ObjectRef, FIELD_MANAGER};
use crate::apply::KubeFailure;

/// Where the kubeconfig comes from when a stack uses one.
#[derive(Debug, Clone, Default)]
pub struct KubeSettings {
    /// `kubeconfig:` of the agent config. Unset: `$KUBECONFIG` (colon
    /// separated), else `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// A sandbox run (`--root`): stacks reach a cluster only through a
    /// `kubeconfig:` the agent config names, never the user's own one, so
    /// trying the agent out never touches a real cluster by accident.
    pub sandbox: bool,
}

/// Why a stack could not be planned or applied at all.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StackError {
    #[error("kubeconfig {path}: {message}\n  fix the file, or point `kubeconfig:` in the agent config (or $KUBECONFIG) at a good one")]
    Kubeconfig { path: String, message: String },
    #[error("in-cluster config: {0}")]
    InCluster(String),
    #[error("cannot build the Kubernetes client for {server}: {message}")]
    Client { server: String, message: String },
    #[error("cannot reach the Kubernetes API at {server}: {message}\n  is the cluster running, and the kubeconfig's server address right?")]
    Unreachable { server: String, message: String },
    #[error("the Kubernetes API at {server} refused discovery: {message}")]
    Api { server: String, message: String },
    #[error("{identity} may not {}\n  grant these in a Role or ClusterRole bound to {identity} (a plan's dry runs need `patch`, and `create` for new objects), or use a kubeconfig with more rights", missing.join(", "))]
    Forbidden {
        /// `user "viewer"`, or `this identity` when the server will not say.
        identity: String,
        /// `patch deployments.apps in namespace vod`, one per missing right.
        missing: Vec<String>,
    },
}

impl StackError {
    /// The kind of failure, for the error metric.
    pub fn failure(&self) -> KubeFailure {
        match self {
            StackError::Kubeconfig { .. }
            | StackError::InCluster(_)
            | StackError::Client { .. }
            | StackError::Api { .. } => KubeFailure::Other,
            StackError::Unreachable { .. } => KubeFailure::Connect,
            StackError::Forbidden { .. } => KubeFailure::Forbidden,
        }
    }
}

/// A failure of one object or stack: the sentence for people, and its kind
/// for metrics and decisions (never read back from the sentence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: KubeFailure,
    pub message: String,
}

impl Failure {
    pub fn new(kind: KubeFailure, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }

    /// A failed call, in the caller's words (`message` quotes the server).
    pub fn call(e: &CallError, message: String) -> Failure {
        Failure::new(e.failure(), message)
    }
}

impl From<StackError> for Failure {
    fn from(e: StackError) -> Failure {
        Failure::new(e.failure(), e.to_string())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl serde::Serialize for Failure {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.message)
    }
}

/// Who the cluster says the client is (`SelfSubjectReview`): `user
/// "NAME"`, or `this identity` when it cannot tell.
pub async fn whoami(cluster: &Cluster) -> String {
    let body =
        serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"});
    let req = http::Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&body).expect("JSON serializes"));
    let Ok(req) = req else {
        return "this identity".to_string();
    };
    let answer = tokio::time::timeout(CALL_BUDGET, cluster.client.request::<Json>(req)).await;
    match answer {
        Ok(Ok(v)) => v
            .pointer("/status/userInfo/username")
            .and_then(Json::as_str)
            .map_or("this identity".to_string(), |u| format!("user \"{u}\"")),
        _ => "this identity".to_string(),
    }
}

/// The outcome of looking for cluster credentials.
pub enum Connection {
    Ready(Cluster),
    /// No kubeconfig and no in-cluster config exist at all: nothing to
    /// check against (a fresh checkout). Holds the reason.
    NotChecked(String),
}

/// A connected client and the server's address (for messages).
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub server: String,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most one API call may take, retries included. kube-rs's own retry
/// layer is switched off: it could keep one call going for minutes.
pub const CALL_BUDGET: Duration = Duration::from_secs(20);
/// Attempts of one call on 429, 503, 504 or a refused connection.
const ATTEMPTS: u32 = 3;
/// The longest `Retry-After` the agent honours inside one call.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(2);

/// The kubeconfig files that exist, and a description of where the agent looked.
fn kubeconfig_paths(settings: &KubeSettings) -> (Vec<PathBuf>, String) {
    if let Some(p) = &settings.kubeconfig {
        return (
            vec![p.clone()],
            format!("`kubeconfig: {}` of the agent config", p.display()),
        );
    }
    if let Some(list) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        let paths: Vec<PathBuf> = std::env::split_paths(&list)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        let existing = paths.iter().filter(|p| p.is_file()).cloned().collect();
        return (
            existing,
            format!("$KUBECONFIG ({})", list.to_string_lossy()),
        );
    }
    match std::env::var_os("HOME") {
        Some(home) => {
            let p = Path::new(&home).join(".kube/config");
            let existing = if p.is_file() {
                vec![p.clone()]
            } else {
                Vec::new()
            };
            (existing, "~/.kube/config".to_string())
        }
        None => (Vec::new(), "$HOME (unset)".to_string()),
    }
}

fn in_cluster_present() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        && Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token").is_file()
}

/// The largest kubeconfig read (a kubeconfig with embedded certificates for
/// a few clusters is a few KiB).
const MAX_KUBECONFIG_BYTES: u64 = 1 << 20;

/// Refuses what kube-rs would read without a bound: a FIFO, device or
/// directory (the read would block or never end) or a file over
/// [`MAX_KUBECONFIG_BYTES`].
fn check_kubeconfig_file(path: &Path) -> Result<(), StackError> {
    let refuse = |message: String| StackError::Kubeconfig {
        path: path.display().to_string(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| refuse(e.to_string()))?;
    if !meta.is_file() {
        return Err(refuse(
            "it is not a regular file (a FIFO, device or directory)".to_string(),
        ));
    }
    if meta.len() > MAX_KUBECONFIG_BYTES {
        return Err(refuse(format!(
            "it is {} bytes, over the limit of {MAX_KUBECONFIG_BYTES}",
            meta.len()
        )));
    }
    Ok(())
}

/// Builds the client for `access`. Never touches the network.
pub async fn connect(
    access: &ClusterAccess,
    settings: &KubeSettings,
) -> Result<Connection, StackError> {
    if settings.sandbox && settings.kubeconfig.is_none() {
        return Ok(Connection::NotChecked(
            "sandbox run (--root): stacks reach a cluster only through `kubeconfig:` in the agent config".to_string(),
        ));
    }
    let mut config = match access {
        ClusterAccess::InCluster => {
            if !in_cluster_present() {
                return Ok(Connection::NotChecked(
                    "not running inside a cluster (no KUBERNETES_SERVICE_HOST and service account token), and the stack asks for in_cluster".to_string(),
                ));
            }
            Config::incluster().map_err(|e| StackError::InCluster(chain(&e)))?
        }
        ClusterAccess::Kubeconfig { context } => {
            let (paths, looked) = kubeconfig_paths(settings);
            if let (Some(p), true) = (&settings.kubeconfig, paths.iter().all(|p| !p.is_file())) {
                return Err(StackError::Kubeconfig {
                    path: p.display().to_string(),
                    message: "the file does not exist".to_string(),
                });
            }
            if paths.is_empty() {
                return Ok(Connection::NotChecked(format!(
                    "no kubeconfig: nothing at {looked}, and not running inside a cluster"
                )));
            }
            let mut merged: Option<Kubeconfig> = None;
            for p in &paths {
                check_kubeconfig_file(p)?;
                let kc = Kubeconfig::read_from(p).map_err(|e| StackError::Kubeconfig {
                    path: p.display().to_string(),
                    message: chain(&e),
                })?;
                merged = Some(match merged {
                    None => kc,
                    Some(m) => m.merge(kc).map_err(|e| StackError::Kubeconfig {
                        path: p.display().to_string(),
                        message: chain(&e),
                    })?,
                });
            }
            let kc = merged.expect("at least one path");
            let shown = paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":");
            if let Some(c) = context {
                if !kc.contexts.iter().any(|n| &n.name == c) {
                    let known: Vec<&str> = kc.contexts.iter().map(|n| n.name.as_str()).collect();
                    return Err(StackError::Kubeconfig {
                        path: shown,
                        message: format!(
                            "it has no context `{c}` (contexts: {})",
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    });
                }
            }
            let options = KubeConfigOptions {
                context: context.clone(),
                ..KubeConfigOptions::default()
            };
            Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|e| StackError::Kubeconfig {
                    path: shown,
                    message: chain(&e),
                })?
        }
    };
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(READ_TIMEOUT);
    config.write_timeout = Some(READ_TIMEOUT);
    // Retries are the agent's own (`call`), bounded by CALL_BUDGET.
    config.default_retry = false;
    let server = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_string();
    crate::source::git::install_tls_provider();
    let client = Client::try_from(config).map_err(|e| StackError::Client {
        server: server.clone(),
        message: chain(&e),
    })?;
    Ok(Connection::Ready(Cluster { client, server }))
}

/// An error and its sources, one sentence.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// What an API call failed with.
#[derive(Debug, Clone)]
pub enum CallError {
    /// A Status from the server.
    Api(Box<kube::core::Status>),
    /// The server could not be reached or answered nonsense.
    Transport(String),
    /// No answer within [`CALL_BUDGET`] (retries included).
    Timeout,
}

/// Runs one API call, bounded: at most [`ATTEMPTS`] tries within
/// [`CALL_BUDGET`], retrying only what a server says is temporary (429,
/// 503, 504, honouring `Retry-After` up to [`MAX_RETRY_AFTER`]) and refused
/// connections.
pub async fn call<T, F, Fut>(mut f: F) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let attempt = async {
        let mut tries = 0;
        loop {
            tries += 1;
            let err = match f().await {
                Ok(v) => return Ok(v),
                Err(e) => CallError::from_kube(e),
            };
            let wait = match &err {
                CallError::Api(s) if matches!(s.code, 429 | 503 | 504) => s
                    .details
                    .as_ref()
                    .map(|d| u64::from(d.retry_after_seconds))
                    .filter(|&secs| secs > 0)
                    .map(Duration::from_secs)
                    .unwrap_or(Duration::from_millis(250 * u64::from(tries))),
                CallError::Transport(_) => Duration::from_millis(250 * u64::from(tries)),
                _ => return Err(err),
            };
            if tries >= ATTEMPTS {
                return Err(err);
            }
            tokio::time::sleep(wait.min(MAX_RETRY_AFTER)).await;
        }
    };
    tokio::time::timeout(CALL_BUDGET, attempt)
        .await
        .unwrap_or(Err(CallError::Timeout))
}

/// Why the server refused a change, as its Status says (read once, here,
/// at the protocol boundary; callers match on the variant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 422 on fields that cannot change in place (the validation origin
    /// `immutable`, whose message is `field is immutable`, also "when
    /// `immutable` is set"): the fields named by the server.
    Immutable(Vec<String>),
    /// 403 with the cause `NamespaceTerminating`: the object's namespace
    /// is being deleted.
    NamespaceTerminating,
    /// 403: the identity may not do this.
    Forbidden,
    /// 400 under strict field validation: unknown or duplicate fields.
    UnknownFields(Vec<String>),
}

impl CallError {
    fn from_kube(e: kube::Error) -> CallError {
        match e {
            kube::Error::Api(status) => CallError::Api(status),
            other => CallError::Transport(chain(&other)),
        }
    }

    /// The server's refusal, classified.
    pub fn refusal(&self) -> Option<Refusal> {
        let CallError::Api(s) = self else {
            return None;
        };
        let causes = s
            .details
            .as_ref()
            .map(|d| d.causes.as_slice())
            .unwrap_or_default();
        match s.code {
            403 => {
                if causes.iter().any(|c| c.reason == "NamespaceTerminating") {
                    return Some(Refusal::NamespaceTerminating);
                }
                Some(Refusal::Forbidden)
            }
            422 => {
                let fields: Vec<String> = causes
                    .iter()
                    .filter(|c| c.message.contains("field is immutable"))
                    .map(|c| c.field.clone())
                    .collect();
                (!fields.is_empty()).then_some(Refusal::Immutable(fields))
            }
            // Strict field validation: `unknown field "spec.foo"` (400,
            // built-in decoding) or `.spec.foo: field not declared in
            // schema` (the typed patch of server-side apply, 500 in 1.37).
            _ if s.message.contains("unknown field")
                || s.message.contains("field not declared in schema") =>
            {
                let mut fields: Vec<String> = Vec::new();
                for part in s.message.split(['\n', ',']) {
                    if let Some((_, rest)) = part.split_once("unknown field \"") {
                        if let Some((f, _)) = rest.split_once('"') {
                            fields.push(f.trim_start_matches('.').to_string());
                        }
                    } else if let Some((before, _)) =
                        part.split_once(": field not declared in schema")
                    {
                        let f = before.rsplit(' ').next().unwrap_or(before);
                        fields.push(f.trim_start_matches('.').to_string());
                    }
                }
                Some(Refusal::UnknownFields(fields))
            }
            _ => None,
        }
    }

    /// The kind of failure, from the status code (or the transport).
    pub fn failure(&self) -> KubeFailure {
        match self {
            CallError::Api(s) => match s.code {
                401 | 403 => KubeFailure::Forbidden,
                404 => KubeFailure::NotFound,
                409 => KubeFailure::Conflict,
                400 | 422 => KubeFailure::Invalid,
                _ => KubeFailure::Other,
            },
            CallError::Transport(_) => KubeFailure::Connect,
            CallError::Timeout => KubeFailure::Timeout,
        }
    }

    pub fn code(&self) -> Option<u16> {
        match self {
            CallError::Api(s) => Some(s.code),
            CallError::Transport(_) | CallError::Timeout => None,
        }
    }

    /// Field-manager conflicts: (manager, field) pairs.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let CallError::Api(s) = self else {
            return Vec::new();
        };
        if s.code != 409 {
            return Vec::new();
        }
        let causes = s
            .details
            .as_ref()
            .map(|d| d.causes.as_slice())
            .unwrap_or_default();
        causes
            .iter()
            .filter(|c| c.reason == "FieldManagerConflict")
            .map(|c| Conflict {
                manager: c
                    .message
                    .split('"')
                    .nth(1)
                    .unwrap_or(&c.message)
                    .to_string(),
                field: c.field.clone(),
                controller: false,
            })
            .collect()
    }

    /// `422 Invalid: <message>` or the transport error.
    pub fn describe(&self) -> String {
        match self {
            CallError::Api(s) => {
                let mut out = format!("{} {}: {}", s.code, s.reason, s.message);
                if let Some(d) = &s.details {
                    for c in &d.causes {
                        if !s.message.contains(&c.message) {
                            out.push_str(&format!("; {} {}", c.field, c.message));
                        }
                    }
                }
                out
            }
            CallError::Transport(t) => t.clone(),
            CallError::Timeout => format!(
                "no answer within {} (retries included)",
                humantime::format_duration(CALL_BUDGET)
            ),
        }
    }
}

/// Another field manager owns a field the stack sets.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Conflict {
    pub manager: String,
    pub field: String,
    /// The manager is a controller (see `ownership::is_controller`): its
    /// fields are never forced.
    pub controller: bool,
}

/// Formats conflicts for a message: `"kubectl-edit": .spec.replicas, .data.x`.
pub fn describe_conflicts(conflicts: &[Conflict]) -> String {
    let mut by_manager: Vec<(String, Vec<String>)> = Vec::new();
    for c in conflicts {
        match by_manager.iter_mut().find(|(m, _)| *m == c.manager) {
            Some((_, fields)) => fields.push(c.field.clone()),
            None => by_manager.push((c.manager.clone(), vec![c.field.clone()])),
        }
    }
    by_manager
        .iter()
        .map(|(m, f)| {
            let controller = conflicts.iter().any(|c| &c.manager == m && c.controller);
            format!(
                "field manager \"{m}\"{} owns {}",
                if controller { " (a controller)" } else { "" },
                f.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Discovery of the groups a stack needs.
pub struct Resolver {
    discovery: Discovery,
}

impl Resolver {
    /// Runs discovery for `groups` (core is `""`).
    pub async fn discover(cluster: &Cluster, groups: &[String]) -> Result<Resolver, StackError> {
        let refs: Vec<&str> = groups.iter().map(String::as_str).collect();
        // Retried and bounded like every call (a throttling server is asked
        // again after its Retry-After, up to CALL_BUDGET in all).
        let discovery = call(|| Discovery::new(cluster.client.clone()).filter(&refs).run())
            .await
            .map_err(|e| match e {
                CallError::Api(s) if s.code == 429 => StackError::Api {
                    server: cluster.server.clone(),
                    message: format!(
                        "{} {}: {} (still throttled after {ATTEMPTS} tries; the next run asks again)",
                        s.code, s.reason, s.message
                    ),
                },
                CallError::Api(s) => StackError::Api {
                    server: cluster.server.clone(),
                    message: format!("{} {}: {}", s.code, s.reason, s.message),
                },
                other => StackError::Unreachable {
                    server: cluster.server.clone(),
                    message: other.describe(),
                },
            })?;
        Ok(Resolver { discovery })
    }

    /// The resource and scope of an exact group/version/kind.
    pub fn resolve(&self, r: &ObjectRef) -> Option<(ApiResource, Scope)> {
        let gvk = GroupVersionKind::gvk(&r.group, &r.version, &r.kind);
        self.discovery
            .resolve_gvk(&gvk)
            .map(|(ar, caps)| (ar, caps.scope))
    }

    /// The preferred version's resource of a group and kind (for prunes,
    /// whose version the inventory does not keep).
    pub fn resolve_kind(&self, group: &str, kind: &str) -> Option<(ApiResource, Scope)> {
        self.discovery
            .get(group)?
            .recommended_kind(kind)
            .map(|(ar, caps)| (ar, caps.scope))
    }
}

/// The API of one object's resource.
pub fn api(cluster: &Cluster, ar: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(cluster.client.clone(), ns, ar),
        None => Api::all_with(cluster.client.clone(), ar),
    }
}

/// The live object, `None` when it does not exist.
pub async fn get(api: &Api<DynamicObject>, name: &str) -> Result<Option<Json>, CallError> {
    call(|| api.get_opt(name))
        .await
        .map(|o| o.map(|o| serde_json::to_value(o).expect("objects serialize")))
}

/// Server-side apply of `body` under the agent's field manager.
pub async fn apply(
    api: &Api<DynamicObject>,
    name: &str,
    body: &Json,
    force: bool,
    dry_run: bool,
) -> Result<Json, CallError> {
    // Strict: an unknown or duplicate field is an error naming the field,
    // not silently dropped.
    let mut params = PatchParams::apply(FIELD_MANAGER).validation_strict();
    if force {
        params = params.force();
    }
    if dry_run {
        params = params.dry_run();
    }
    let patch = Patch::Apply(body);
    call(|| api.patch(name, &params, &patch))
        .await
        .map(|o| serde_json::to_value(o).expect("objects serialize"))
}

/// Deletes in the background; `false` when it was already gone.
pub async fn delete(api: &Api<DynamicObject>, name: &str) -> Result<bool, CallError> {
    let params = DeleteParams::background();
    match call(|| api.delete(name, &params)).await {
        Ok(_) => Ok(true),
        Err(CallError::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn status(v: Json) -> kube::core::Status {
        serde_json::from_value(v).unwrap()
    }

    fn throttled(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(status(serde_json::json!({
            "status": "Failure", "code": code, "reason": "TooManyRequests", "message": "slow down",
            "details": {"retryAfterSeconds": 0}
        }))))
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn throttling_is_retried_a_bounded_number_of_times() {
        let tries = AtomicU32::new(0);
        let r: Result<(), CallError> = rt().block_on(call(|| {
            tries.fetch_add(1, Ordering::Relaxed);
            async { Err(throttled(429)) }
        }));
        assert_eq!(r.unwrap_err().code(), Some(429));
        assert_eq!(tries.load(Ordering::Relaxed), ATTEMPTS);
    }

    #[test]
    fn answers_that_waiting_will_not_change_are_not_retried() {
        for code in [400, 403, 404, 409, 422, 500] {
            let tries = AtomicU32::new(0);
            let r: Result<(), CallError> = rt().block_on(call(|| {
                tries.fetch_add(1, Ordering::Relaxed);
                async move { Err(throttled(code)) }
            }));
            assert_eq!(r.unwrap_err().code(), Some(code));
            assert_eq!(tries.load(Ordering::Relaxed), 1, "{code}");
        }
    }

    #[test]
    fn a_call_that_never_answers_ends_at_the_budget() {
        let r: Result<(), CallError> = rt().block_on(async {
            tokio::time::pause();
            call(std::future::pending::<Result<(), kube::Error>>).await
        });
        assert!(matches!(r, Err(CallError::Timeout)));
        assert!(CallError::Timeout.describe().contains("within 20s"));
    }

    #[test]
    fn a_kubeconfig_that_is_a_fifo_or_huge_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(check_kubeconfig_file(&fifo)
            .unwrap_err()
            .to_string()
            .contains("not a regular file"));
        let big = dir.path().join("big");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_KUBECONFIG_BYTES + 1).unwrap();
        assert!(check_kubeconfig_file(&big)
            .unwrap_err()
            .to_string()
            .contains("over the limit"));
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "apiVersion: v1\n").unwrap();
        assert!(check_kubeconfig_file(&ok).is_ok());
    }

    #[test]
    fn refusals_are_classified_from_the_status() {
        let immutable = CallError::Api(Box::new(status(serde_json::json!({
            "code": 422, "reason": "Invalid", "message": "StatefulSet.apps \"db\" is invalid",
            "details": {"causes": [{"reason": "FieldValueInvalid",
                "message": "Invalid value: ...: field is immutable", "field": "spec.volumeClaimTemplates"}]}
        }))));
        assert_eq!(
            immutable.refusal(),
            Some(Refusal::Immutable(vec!["spec.volumeClaimTemplates".into()]))
        );
        let terminating = CallError::Api(Box::new(status(serde_json::json!({
            "code": 403, "reason": "Forbidden", "message": "unable to create new content",
            "details": {"causes": [{"reason": "NamespaceTerminating", "message": "namespace vod is being terminated",
                "field": "metadata.namespace"}]}
        }))));
        assert_eq!(terminating.refusal(), Some(Refusal::NamespaceTerminating));
        let unknown = CallError::Api(Box::new(status(serde_json::json!({
            "code": 500, "message": "failed to create typed patch object (ns/web; apps/v1, Kind=Deployment): .spec.replicass: field not declared in schema"
        }))));
        assert_eq!(
            unknown.refusal(),
            Some(Refusal::UnknownFields(vec!["spec.replicass".into()]))
        );
    }
}
