//! Plan of one stack: for every object, the live object and a server-side
//! dry-run apply (never persisted), diffed after normalisation and
//! classified like native resources (create, change, drift, in sync,
//! skipped); prunes from the inventory. Never writes, to the cluster or the
//! state.

use std::collections::{BTreeMap, HashSet};

use futures::StreamExt;
use homelab_agent_state::{DigestKey, InventoryEntry, Origin};
use kube::discovery::{ApiResource, Scope};
use serde_json::Value as Json;

use super::client::{
    self, Cluster, Conflict, Connection, Failure, KubeSettings, Refusal, Resolver, StackError,
};
use super::diff::{self, ObjectChange};
use super::ownership::{self, Takeover};
use super::{ObjectRef, Stack, MANAGED_BY, MANAGED_BY_LABEL, STACK_LABEL};
use crate::apply::KubeFailure;
use crate::desired::catalog::Catalog;
use crate::desired::model::DriftPolicy;
use crate::plan::{stored_digest, Action, Classification, Summary};

/// How many objects of a stack are observed or applied at once.
pub const PARALLELISM: usize = 4;

/// Whether the stack could be looked at.
#[derive(Debug, Clone)]
pub enum StackStatus {
    Planned,
    /// No cluster credentials exist at all (not an error).
    NotChecked(String),
    /// The cluster could not be used (an error for this stack only).
    Failed(Failure),
}

/// One object in a stack's plan.
#[derive(Debug, Clone)]
pub struct ObjectPlan {
    /// Index into [`Stack::objects`].
    pub index: usize,
    /// The id (its namespace as discovery decided).
    pub id: String,
    /// `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    pub class: Classification,
    pub action: Action,
    pub changes: Vec<ObjectChange>,
    /// Fields another manager owns that this apply would set.
    pub conflicts: Vec<Conflict>,
    /// Why it could not be planned (the object only; the stack goes on).
    pub error: Option<Failure>,
    pub known: Option<InventoryEntry>,
    /// Keyed digest to record when applied.
    pub digest: String,
    pub exists: bool,
    /// Its kind comes from a CRD of this stack not served yet.
    pub pending_crd: bool,
    /// What apply will do besides the diff (adoption, hand-over, re-create,
    /// waiting for a deletion), one sentence each.
    pub notes: Vec<String>,
    /// `managedFields` to rewrite before applying (adoption, stringData).
    pub takeover: Option<Takeover>,
    /// `spec.replicas` to keep while the manifest hands the field over.
    pub handover: Option<i64>,
    /// Delete and create again: fields that cannot change in place.
    pub recreate: bool,
    /// A deletion in progress to wait for before applying.
    pub wait_gone: Option<Deleting>,
    /// The call the identity may not make: (verb, resource), for the
    /// stack's one permission message.
    pub forbidden: Option<(String, String)>,
}

/// What is being deleted when an object is planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleting {
    /// The object itself (finalizers hold it).
    Itself,
    /// Its namespace is terminating.
    Namespace(String),
}

/// Annotation that lets the agent delete and re-create an object whose
/// change cannot be made in place (immutable fields). Jobs need none: a
/// changed Job is a new run.
pub const RECREATE_ANNOTATION: &str = "homelab-agent/recreate";

/// Whether apply forces this object's conflicts: with `force_conflicts:
/// true`, or to heal drift, and never over a controller's fields.
pub fn forces(stack: &Stack, p: &ObjectPlan) -> bool {
    (stack.spec.force_conflicts || p.class == Classification::Drift)
        && !p.conflicts.iter().any(|c| c.controller)
}

/// An inventory entry of the stack that left it.
#[derive(Debug, Clone)]
pub struct ObjectPrune {
    pub id: String,
    pub reference: ObjectRef,
    /// `Delete`, or `Forget` (left in place, with the reason in `note`).
    pub action: Action,
    pub note: Option<String>,
    /// The resource to delete through (when `Delete`).
    pub resource: Option<ApiResource>,
}

/// The plan of one stack.
#[derive(Debug, Clone)]
pub struct StackPlan {
    /// Index into [`Catalog::stacks`].
    pub index: usize,
    pub name: String,
    pub status: StackStatus,
    pub objects: Vec<ObjectPlan>,
    pub prunes: Vec<ObjectPrune>,
}

impl StackPlan {
    /// Passes every message through `scrub` (see `StackReport::scrub`).
    pub fn scrub(&mut self, scrub: &dyn Fn(&str) -> String) {
        if let StackStatus::Failed(Failure { message: e, .. }) | StackStatus::NotChecked(e) =
            &mut self.status
        {
            *e = scrub(e);
        }
        for o in &mut self.objects {
            let error = o.error.iter_mut().map(|f| &mut f.message);
            for text in error.chain(o.notes.iter_mut()) {
                *text = scrub(text);
            }
        }
        for p in &mut self.prunes {
            for text in p.note.iter_mut() {
                *text = scrub(text);
            }
        }
    }

    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        match &self.status {
            StackStatus::NotChecked(_) => s.not_checked += 1,
            StackStatus::Failed(_) => s.errors += 1,
            StackStatus::Planned => {}
        }
        s.prune = self
            .prunes
            .iter()
            .filter(|p| p.action == Action::Delete)
            .count();
        for o in &self.objects {
            if o.error.is_some() {
                s.errors += 1;
                continue;
            }
            if !o.conflicts.is_empty() {
                s.conflicts += 1;
            }
            match o.class {
                Classification::InSync => s.in_sync += 1,
                Classification::Create => s.create += 1,
                Classification::Change => s.change += 1,
                Classification::Drift => s.drift += 1,
                Classification::Skipped => s.skipped += 1,
                Classification::Prune => {}
            }
        }
        s
    }

    /// Anything to do or report (what `--detailed-exitcode` 2 means).
    pub fn has_changes(&self) -> bool {
        let s = self.summary();
        s.create + s.change + s.drift + s.skipped + s.prune > 0
            || self.prunes.iter().any(|p| p.action == Action::Forget)
    }
}

/// Adds the counts of several stacks.
pub fn total(plans: &[StackPlan]) -> Summary {
    let mut t = Summary::default();
    for p in plans {
        t.add(&p.summary());
    }
    t
}

/// A small runtime of its own for the stack phase: the engine is
/// synchronous, and the daemon calls it from its blocking pool, never from
/// its event loop.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds")
}

/// Connects and plans one stack; also returns the cluster and discovery
/// (for apply).
pub async fn plan_one(
    index: usize,
    stack: &Stack,
    inventory: &BTreeMap<String, InventoryEntry>,
    key: &DigestKey,
    settings: &KubeSettings,
) -> (StackPlan, Option<(Cluster, Resolver)>) {
    let mut plan = StackPlan {
        index,
        name: stack.name().to_string(),
        status: StackStatus::Planned,
        objects: Vec::new(),
        prunes: Vec::new(),
    };
    let cluster = match client::connect(&stack.access, settings).await {
        Ok(Connection::Ready(c)) => c,
        Ok(Connection::NotChecked(why)) => {
            plan.status = StackStatus::NotChecked(why);
            return (plan, None);
        }
        Err(e) => {
            plan.status = StackStatus::Failed(e.into());
            return (plan, None);
        }
    };
    let resolver = match Resolver::discover(&cluster, &groups(stack, inventory)).await {
        Ok(r) => r,
        Err(e) => {
            plan.status = StackStatus::Failed(e.into());
            return (plan, None);
        }
    };
    match observe(stack, inventory, key, &cluster, &resolver, &mut plan).await {
        Ok(()) => (plan, Some((cluster, resolver))),
        Err(e) => {
            plan.status = StackStatus::Failed(e.into());
            plan.objects.clear();
            plan.prunes.clear();
            (plan, None)
        }
    }
}

/// The API groups the stack's objects and its inventory entries use.
fn groups(stack: &Stack, inventory: &BTreeMap<String, InventoryEntry>) -> Vec<String> {
    let mut g: Vec<String> = stack
        .objects
        .iter()
        .map(|o| o.reference.group.clone())
        .collect();
    let prefix = stack.id_prefix();
    g.extend(
        inventory
            .keys()
            .filter(|id| id.starts_with(&prefix))
            .filter_map(|id| ObjectRef::parse_id(id).map(|(_, r)| r.group)),
    );
    g.sort();
    g.dedup();
    g
}

/// Whether a stack object defines (as a CRD) the group and kind of `r`.
pub fn defined_by_crd(stack: &Stack, r: &ObjectRef) -> bool {
    stack.objects.iter().any(|o| {
        o.reference.kind == "CustomResourceDefinition"
            && o.body.0.pointer("/spec/group").and_then(Json::as_str) == Some(r.group.as_str())
            && o.body.0.pointer("/spec/names/kind").and_then(Json::as_str) == Some(r.kind.as_str())
    })
}

/// The body to send: a cluster-scoped object carries no namespace.
pub fn body_for(stack: &Stack, index: usize, namespace: Option<&str>) -> Json {
    let mut body = stack.objects[index].body.0.clone();
    if namespace.is_none() {
        if let Some(meta) = body.get_mut("metadata").and_then(Json::as_object_mut) {
            meta.remove("namespace");
        }
    }
    body
}

/// Where an object lives, as discovery says. Errors name the object.
pub fn placement(
    stack: &Stack,
    index: usize,
    scope: &Scope,
) -> Result<(Option<String>, String), Failure> {
    let o = &stack.objects[index];
    match scope {
        Scope::Namespaced => {
            let ns = o.reference.namespace.clone().unwrap_or_else(|| stack.spec.namespace.clone());
            let r = ObjectRef {
                namespace: Some(ns.clone()),
                ..o.reference.clone()
            };
            Ok((Some(ns), r.id(stack.name())))
        }
        Scope::Cluster if o.namespace_explicit => Err(Failure::new(
            KubeFailure::Invalid,
            format!(
                "{} is cluster-scoped in this cluster, but its manifest names namespace {}; remove metadata.namespace",
                o.reference.kind_group(),
                o.reference.namespace.as_deref().unwrap_or("")
            ),
        )),
        Scope::Cluster => {
            let r = ObjectRef {
                namespace: None,
                ..o.reference.clone()
            };
            Ok((None, r.id(stack.name())))
        }
    }
}

async fn observe(
    stack: &Stack,
    inventory: &BTreeMap<String, InventoryEntry>,
    key: &DigestKey,
    cluster: &Cluster,
    resolver: &Resolver,
    plan: &mut StackPlan,
) -> Result<(), StackError> {
    let mut results = futures::stream::iter(0..stack.objects.len())
        .map(|i| observe_object(stack, i, inventory, key, cluster, resolver))
        .buffered(PARALLELISM);
    // The first transport failure ends the stack (the rest would fail the
    // same way, each after its own time-out).
    while let Some(r) = results.next().await {
        plan.objects.push(r?);
    }
    drop(results);
    // Missing permissions, said once for the stack, not once per object.
    let mut missing: Vec<String> = plan
        .objects
        .iter()
        .filter_map(|p| {
            let (verb, resource) = p.forbidden.as_ref()?;
            Some(match &p.namespace {
                Some(ns) => format!("{verb} {resource} in namespace {ns}"),
                None => format!("{verb} {resource} (cluster-wide)"),
            })
        })
        .collect();
    if !missing.is_empty() {
        missing.sort();
        missing.dedup();
        return Err(StackError::Forbidden {
            identity: client::whoami(cluster).await,
            missing,
        });
    }
    // Shown (and applied) in apply order: kind rank, then id.
    plan.objects.sort_by(|a, b| {
        let rank = |p: &ObjectPlan| super::kind_rank(&stack.objects[p.index].reference.kind);
        (rank(a), &a.id).cmp(&(rank(b), &b.id))
    });
    let desired: HashSet<&str> = plan.objects.iter().map(|o| o.id.as_str()).collect();
    let prefix = stack.id_prefix();
    let mut prunes = Vec::new();
    for (id, entry) in inventory.iter().filter(|(id, _)| id.starts_with(&prefix)) {
        if desired.contains(id.as_str()) {
            continue;
        }
        let Some((_, reference)) = ObjectRef::parse_id(id) else {
            continue;
        };
        prunes.push(plan_prune(stack, id, entry, reference, cluster, resolver).await?);
    }
    // Reverse apply order: dependents before what they depend on.
    prunes.sort_by(|a, b| {
        let key = |p: &ObjectPrune| (super::kind_rank(&p.reference.kind), p.id.clone());
        key(b).cmp(&key(a))
    });
    plan.prunes = prunes;
    Ok(())
}

fn transport(cluster: &Cluster, e: &client::CallError) -> Option<StackError> {
    match e {
        client::CallError::Transport(m) => Some(StackError::Unreachable {
            server: cluster.server.clone(),
            message: m.clone(),
        }),
        client::CallError::Timeout => Some(StackError::Unreachable {
            server: cluster.server.clone(),
            message: e.describe(),
        }),
        client::CallError::Api(_) => None,
    }
}

/// Plans one object: placement, GET, the server's dry run, then the
/// comparison of the two. A transport failure ends the stack's
/// observation (`Err`); anything else is this object's plan or error.
async fn observe_object(
    stack: &Stack,
    index: usize,
    inventory: &BTreeMap<String, InventoryEntry>,
    key: &DigestKey,
    cluster: &Cluster,
    resolver: &Resolver,
) -> Result<ObjectPlan, StackError> {
    let o = &stack.objects[index];
    let mut p = unplanned(stack, index, inventory, key);
    if o.blocked.is_some() {
        return Ok(p);
    }
    let Some((ar, scope)) = resolver.resolve(&o.reference) else {
        if defined_by_crd(stack, &o.reference) {
            p.class = Classification::Create;
            p.action = Action::Create;
            p.pending_crd = true;
            return Ok(p);
        }
        p.error = Some(Failure::new(
            KubeFailure::NotFound,
            format!(
                "the cluster serves no {} in {} (is its CustomResourceDefinition installed?)",
                o.reference.kind, o.api_version
            ),
        ));
        return Ok(p);
    };
    let (namespace, id) = match placement(stack, index, &scope) {
        Ok(x) => x,
        Err(e) => {
            p.error = Some(e);
            return Ok(p);
        }
    };
    p.known = inventory.get(&id).cloned();
    p.id = id;
    p.namespace = namespace.clone();
    let api = client::api(cluster, &ar, namespace.as_deref());
    let live = match client::get(&api, &o.reference.name).await {
        Ok(l) => l,
        Err(e) => {
            if let Some(err) = transport(cluster, &e) {
                return Err(err);
            }
            if e.refusal() == Some(Refusal::Forbidden) {
                p.forbidden = Some(("get".into(), resource_name(&ar)));
            }
            p.error = Some(Failure::call(
                &e,
                format!("cannot read it: {}", e.describe()),
            ));
            return Ok(p);
        }
    };
    p.exists = live.is_some();
    let applied_same =
        p.known.as_ref().and_then(|k| k.digest.as_deref()) == Some(p.digest.as_str());
    if let Some(l) = &live {
        if being_deleted(&mut p, l) {
            missing(&mut p, applied_same, o.on_drift);
            return Ok(p);
        }
    }
    let cx = DryRunCx {
        stack,
        index,
        api: &api,
        ar: &ar,
        cluster,
        live: live.as_ref(),
        namespace: namespace.as_deref(),
        applied_same,
    };
    let dry = match dry_run(&cx, &mut p).await? {
        DryRun::Done => return Ok(p),
        DryRun::NamespaceComesLater => None,
        DryRun::Answer(d) => Some(d),
    };
    let Some(live) = live else {
        // A finished Job the TTL controller removed is done, not drift:
        // the same Job is not run again. A changed Job (another digest) is.
        if applied_same
            && o.reference.kind == "Job"
            && o.body.0.pointer("/spec/ttlSecondsAfterFinished").is_some()
        {
            p.class = Classification::InSync;
            p.action = Action::None;
            return Ok(p);
        }
        missing(&mut p, applied_same, o.on_drift);
        return Ok(p);
    };
    let dry = dry.expect("a live object's dry run either succeeded or returned");
    let body = body_for(stack, index, namespace.as_deref());
    compare(&mut p, &live, &dry, &body, key, applied_same, o.on_drift);
    Ok(p)
}

/// An object's plan before anything is known about it: skipped.
fn unplanned(
    stack: &Stack,
    index: usize,
    inventory: &BTreeMap<String, InventoryEntry>,
    key: &DigestKey,
) -> ObjectPlan {
    let o = &stack.objects[index];
    ObjectPlan {
        index,
        id: o.id.clone(),
        namespace: o.reference.namespace.clone(),
        class: Classification::Skipped,
        action: Action::Skip,
        changes: Vec::new(),
        conflicts: Vec::new(),
        error: None,
        known: inventory.get(&o.id).cloned(),
        digest: stored_digest(key, &o.digest),
        exists: false,
        pending_crd: false,
        notes: Vec::new(),
        takeover: None,
        handover: None,
        recreate: false,
        wait_gone: None,
        forbidden: None,
    }
}

/// Being deleted (a finalizer holds it, or the namespace controller is
/// emptying its namespace): never "in sync"; apply waits for it to go,
/// then creates it again.
fn being_deleted(p: &mut ObjectPlan, live: &Json) -> bool {
    if live.pointer("/metadata/deletionTimestamp").is_none() {
        return false;
    }
    let finalizers = ownership::finalizers(live);
    p.notes.push(format!(
        "it is being deleted{}: apply waits for it to go (up to the stack's timeout), then creates it again",
        if finalizers.is_empty() {
            String::new()
        } else {
            format!(" (held by finalizers {})", finalizers.join(", "))
        }
    ));
    p.wait_gone = Some(Deleting::Itself);
    true
}

/// What an object's dry run works with.
struct DryRunCx<'a> {
    stack: &'a Stack,
    index: usize,
    api: &'a kube::Api<kube::api::DynamicObject>,
    ar: &'a ApiResource,
    cluster: &'a Cluster,
    live: Option<&'a Json>,
    namespace: Option<&'a str>,
    applied_same: bool,
}

/// What the server's dry run said.
enum DryRun {
    /// The object as the server would store it.
    Answer(Json),
    /// Its namespace is created by the same stack, in this run.
    NamespaceComesLater,
    /// The plan of the object is complete (an error, a wait, a re-create).
    Done,
}

/// The server-side dry run, without force first (to find conflicts, then
/// with force to see the result); a refusal becomes the object's plan.
async fn dry_run(cx: &DryRunCx<'_>, p: &mut ObjectPlan) -> Result<DryRun, StackError> {
    let name = &cx.stack.objects[cx.index].reference.name;
    let body = body_for(cx.stack, cx.index, cx.namespace);
    let e = match client::apply(cx.api, name, &body, false, true).await {
        Ok(d) => return Ok(DryRun::Answer(d)),
        Err(e) => e,
    };
    if !e.conflicts().is_empty() {
        p.conflicts = e.conflicts();
        for c in &mut p.conflicts {
            c.controller = ownership::is_controller(&c.manager, cx.live);
        }
        return Ok(match client::apply(cx.api, name, &body, true, true).await {
            Ok(d) => DryRun::Answer(d),
            Err(e) => {
                p.error = Some(rejected(&e));
                DryRun::Done
            }
        });
    }
    if e.code() == Some(404) && cx.live.is_none() {
        if creates_namespace(cx.stack, cx.namespace) {
            return Ok(DryRun::NamespaceComesLater);
        }
        if let Some(ns) = cx.namespace {
            p.error = Some(Failure::new(KubeFailure::NotFound, format!(
                "its namespace {ns} does not exist and this stack does not create it: create it first (or add a Namespace manifest to the stack); {}",
                e.describe()
            )));
            return Ok(DryRun::Done);
        }
    }
    if let Some(err) = transport(cx.cluster, &e) {
        return Err(err);
    }
    refused(cx, p, &e);
    Ok(DryRun::Done)
}

/// A dry run the server refused: a namespace being deleted (wait), fields
/// that cannot change in place (re-create, when allowed), missing rights
/// (gathered for the stack's one message), or the object's error.
fn refused(cx: &DryRunCx<'_>, p: &mut ObjectPlan, e: &client::CallError) {
    let o = &cx.stack.objects[cx.index];
    let kind = o.reference.kind.as_str();
    match e.refusal() {
        Some(Refusal::NamespaceTerminating) => {
            let ns = cx.namespace.unwrap_or_default().to_string();
            p.notes.push(format!(
                "its namespace {ns} is being deleted: apply waits for it to go (up to the stack's timeout) first"
            ));
            p.wait_gone = Some(Deleting::Namespace(ns));
            p.class = Classification::Create;
            p.action = Action::Create;
            return;
        }
        Some(Refusal::Immutable(fields)) if cx.live.is_some() => {
            let fields = fields.join(", ");
            let recreate_allowed = kind == "Job"
                || o.body
                    .0
                    .pointer("/metadata/annotations")
                    .and_then(|a| a.get(RECREATE_ANNOTATION))
                    .and_then(Json::as_str)
                    == Some("true");
            if !recreate_allowed {
                p.error = Some(Failure::new(KubeFailure::Invalid, format!(
                    "cannot change in place: {fields} (immutable); revert the change, or add the annotation `{RECREATE_ANNOTATION}: \"true\"` to delete and re-create the object"
                )));
                return;
            }
            p.recreate = true;
            p.notes.push(if kind == "Job" {
                format!("a changed Job runs again: {fields} cannot change in place, so the Job is deleted and created anew")
            } else {
                format!("{fields} cannot change in place: it is deleted and created again ({RECREATE_ANNOTATION}: \"true\")")
            });
            p.class = if cx.applied_same {
                Classification::Drift
            } else {
                Classification::Change
            };
            p.action = if cx.applied_same && o.on_drift == DriftPolicy::Report {
                Action::Report
            } else {
                Action::Update
            };
            return;
        }
        Some(Refusal::Forbidden) => {
            p.forbidden = Some((
                if cx.live.is_some() { "patch" } else { "create" }.into(),
                resource_name(cx.ar),
            ));
        }
        _ => {}
    }
    p.error = Some(rejected(e));
}

/// The live object against the server's dry run: the diff, a replicas
/// hand-over, an adoption, and the classification.
fn compare(
    p: &mut ObjectPlan,
    live: &Json,
    dry: &Json,
    body: &Json,
    key: &DigestKey,
    applied_same: bool,
    on_drift: DriftPolicy,
) {
    p.changes = diff::diff(&diff::normalize(live, key), &diff::normalize(dry, key));
    if let Some(n) = ownership::replicas_handover(live, body) {
        // The dry run shows replicas reset to the default; apply first
        // hands the field over at its value, so it stays.
        p.changes.retain(|c| c.path != "spec.replicas");
        p.handover = Some(n);
        p.notes.push(format!(
            "spec.replicas left the manifest: handed over at its current value {n} (an autoscaler owns it from now on)"
        ));
    }
    if let Some(t) = ownership::takeover(live) {
        p.notes.push(t.describe());
        p.takeover = Some(t);
    }
    if p.changes.is_empty() {
        // Equal values are no conflict: nothing to take over.
        p.conflicts.clear();
    }
    let rewrite = p.handover.is_some() || p.takeover.is_some();
    p.class = if p.changes.is_empty() && !rewrite {
        Classification::InSync
    } else if applied_same {
        Classification::Drift
    } else {
        Classification::Change
    };
    p.action = match p.class {
        Classification::InSync => Action::None,
        Classification::Drift if on_drift == DriftPolicy::Report => Action::Report,
        _ => Action::Update,
    };
}

/// An object that is not (or soon not) there: drift when the agent had
/// applied this very manifest, else a create.
fn missing(p: &mut ObjectPlan, applied_same: bool, on_drift: DriftPolicy) {
    p.class = if applied_same {
        Classification::Drift
    } else {
        Classification::Create
    };
    p.action = if applied_same && on_drift == DriftPolicy::Report {
        Action::Report
    } else {
        Action::Create
    };
}

/// Whether the stack itself creates namespace `ns` (a Namespace object).
fn creates_namespace(stack: &Stack, ns: Option<&str>) -> bool {
    ns.is_some_and(|ns| {
        stack.objects.iter().any(|o| {
            o.reference.kind == "Namespace"
                && o.reference.group.is_empty()
                && o.reference.name == ns
        })
    })
}

/// `deployments.apps`, `configmaps`: a resource as RBAC names it.
fn resource_name(ar: &ApiResource) -> String {
    if ar.group.is_empty() {
        ar.plural.clone()
    } else {
        format!("{}.{}", ar.plural, ar.group)
    }
}

/// A dry-run refusal as a sentence: unknown fields named as such.
fn rejected(e: &client::CallError) -> Failure {
    let message = match e.refusal() {
        Some(Refusal::UnknownFields(fields)) if !fields.is_empty() => format!(
            "unknown field{} {} (the server validates strictly): fix the manifest; {}",
            if fields.len() == 1 { "" } else { "s" },
            fields.join(", "),
            e.describe()
        ),
        _ => format!("dry-run apply rejected: {}", e.describe()),
    };
    Failure::call(e, message)
}

async fn plan_prune(
    stack: &Stack,
    id: &str,
    entry: &InventoryEntry,
    reference: ObjectRef,
    cluster: &Cluster,
    resolver: &Resolver,
) -> Result<ObjectPrune, StackError> {
    let mut prune = ObjectPrune {
        id: id.to_string(),
        reference,
        action: Action::Forget,
        note: None,
        resource: None,
    };
    let r = &prune.reference;
    let Some((ar, _)) = resolver.resolve_kind(&r.group, &r.kind) else {
        prune.note = Some(format!(
            "the cluster no longer serves {}; nothing to delete",
            r.kind_group()
        ));
        return Ok(prune);
    };
    let api = client::api(cluster, &ar, r.namespace.as_deref());
    let live = match client::get(&api, &r.name).await {
        Ok(l) => l,
        Err(e) => {
            if let Some(err) = transport(cluster, &e) {
                return Err(err);
            }
            prune.note = Some(format!(
                "kept in the inventory: cannot read it: {}",
                e.describe()
            ));
            prune.action = Action::None;
            return Ok(prune);
        }
    };
    let Some(live) = live else {
        prune.note = Some("already gone".to_string());
        return Ok(prune);
    };
    let label = |k: &str| {
        live.pointer("/metadata/labels")
            .and_then(|l| l.get(k))
            .and_then(Json::as_str)
            .map(str::to_string)
    };
    let owned = label(MANAGED_BY_LABEL).as_deref() == Some(MANAGED_BY)
        && label(STACK_LABEL).as_deref() == Some(stack.owner.as_str());
    prune.note = if !owned {
        Some(format!(
            "left in place: it does not carry both ownership labels ({MANAGED_BY_LABEL}={MANAGED_BY}, {STACK_LABEL}={})",
            stack.owner
        ))
    } else if entry.origin == Origin::Adopted {
        Some("left in place: it existed before the agent managed it".to_string())
    } else if !stack.spec.prune {
        Some(format!(
            "left in place: {} says prune: false",
            stack.spec.file
        ))
    } else {
        prune.action = Action::Delete;
        prune.resource = Some(ar);
        if r.kind == "Namespace" && r.group.is_empty() {
            Some(namespace_contents(cluster, &r.name).await)
        } else {
            None
        }
    };
    Ok(prune)
}

/// What goes with a namespace: its PersistentVolumeClaims above all.
async fn namespace_contents(cluster: &Cluster, ns: &str) -> String {
    let pvcs: kube::Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        kube::Api::namespaced(cluster.client.clone(), ns);
    let lp = kube::api::ListParams::default();
    match client::call(|| pvcs.list(&lp)).await {
        Ok(list) if list.items.is_empty() => format!(
            "everything in namespace {ns} goes with it (it holds no PersistentVolumeClaim)"
        ),
        Ok(list) => {
            let names: Vec<String> = list
                .items
                .iter()
                .filter_map(|p| p.metadata.name.clone())
                .collect();
            format!(
                "everything in namespace {ns} goes with it, including {} PersistentVolumeClaim(s) ({}) and their data",
                names.len(),
                names.join(", ")
            )
        }
        Err(e) => format!(
            "everything in namespace {ns} goes with it (its PersistentVolumeClaims could not be listed: {})",
            e.describe()
        ),
    }
}

/// Stacks the inventory holds objects of that this host no longer lists:
/// (stack, object count). Their objects are neither pruned nor forgotten
/// (how to reach their cluster left with the host's entry); the report says
/// how to delete them.
pub fn orphaned_stacks(
    catalog: &Catalog,
    inventory: &BTreeMap<String, InventoryEntry>,
) -> Vec<(String, usize)> {
    let mut out: BTreeMap<String, usize> = BTreeMap::new();
    for id in inventory.keys() {
        if let Some((stack, _)) = ObjectRef::parse_id(id) {
            if !catalog.stacks.iter().any(|s| s.name() == stack) {
                *out.entry(stack).or_default() += 1;
            }
        }
    }
    out.into_iter().collect()
}
