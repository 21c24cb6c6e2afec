//! Apply of one stack, after the native resources.
//!
//! # Expected flow
//! 1. Plan the stack (connect, discovery, dry runs); a stack that cannot be
//!    planned fails alone.
//! 2. Record intents (inventory entries without a digest) for objects about
//!    to be created, so a crash still leaves them owned and prunable.
//! 3. CRDs and Namespaces first (CRDs waited for until `Established`, then
//!    discovery runs again so their custom resources resolve), then the rest
//!    by kind rank; objects of one rank in parallel (bounded). Server-side
//!    apply under `homelab-agent`; `force` only with `force_conflicts: true`
//!    or to heal drift (the fields were the agent's before someone edited
//!    them).
//! 4. Prune in reverse order (only what the plan found owned and created).
//! 5. With `wait: true`, wait for every workload of the stack to be rolled
//!    out (Jobs complete) within the stack's timeout.
//! 6. Commit the stack's inventory in one transaction: applied objects get
//!    their digest, pruned ones leave; a failed delete stays to be retried.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use homelab_agent_state::{DigestKey, InventoryEntry, Origin, RunCounts, StateError, Store};
use serde_json::Value as Json;

use super::client::{self, Cluster, Failure, KubeSettings, Resolver};
use super::health::{self, Health};
use super::plan::{self, ObjectPlan, StackPlan, StackStatus, PARALLELISM};
use super::{Stack, INVENTORY_KIND};
use crate::apply::{KubeFailure, Outcome, Reason};
use crate::desired::catalog::Catalog;
use crate::plan::{Action, Classification};

/// How often health and CRD establishment are polled.
pub const POLL: Duration = Duration::from_millis(500);

/// Called on every poll while a stack waits (rollouts, deletions, CRDs):
/// the daemon heals native drift there, so a slow rollout never holds the
/// host's own resources hostage.
pub type Idle<'a> = dyn Fn() + 'a;

/// One poll interval of a wait, with the idle work done first.
async fn pause(idle: Option<&Idle<'_>>) {
    if let Some(f) = idle {
        f();
    }
    tokio::time::sleep(POLL).await;
}

/// What apply did to one stack.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StackReport {
    pub name: String,
    /// Not checked: no cluster credentials at all (with the reason).
    pub not_checked: Option<String>,
    /// The whole stack failed (cannot connect, discovery, state).
    pub error: Option<Failure>,
    pub outcomes: Vec<Outcome>,
    pub counts: RunCounts,
    /// Time spent waiting for its workloads to become healthy (the
    /// `health` phase).
    #[serde(skip)]
    pub health_wait: Duration,
}

impl StackReport {
    fn new(name: &str) -> StackReport {
        StackReport {
            name: name.to_string(),
            not_checked: None,
            error: None,
            outcomes: Vec::new(),
            counts: RunCounts::default(),
            health_wait: Duration::ZERO,
        }
    }

    /// Passes every message through `scrub` (the run's secret values and
    /// URL credentials out: an API server's refusal may quote what it was
    /// sent), before it is printed, logged or recorded.
    pub fn scrub(&mut self, scrub: &dyn Fn(&str) -> String) {
        let error = self.error.iter_mut().map(|f| &mut f.message);
        for text in error.chain(self.not_checked.iter_mut()) {
            *text = scrub(text);
        }
        for o in &mut self.outcomes {
            for text in o.error.iter_mut().chain(o.note.iter_mut()) {
                *text = scrub(text);
            }
        }
    }

    pub fn failed(&self) -> bool {
        self.error.is_some() || self.counts.failed > 0
    }

    /// Every Kubernetes failure of the stack, by kind (the error metric).
    pub fn failures(&self) -> impl Iterator<Item = KubeFailure> + '_ {
        self.error
            .iter()
            .map(|f| f.kind)
            .chain(self.outcomes.iter().filter_map(Outcome::kube_failure))
    }
}

/// The plans of a catalog's stacks, with what apply needs to carry them out
/// (each planned stack's connection and the runtime it lives on): apply
/// does exactly this plan, it never plans again.
pub struct StacksPlan {
    pub plans: Vec<StackPlan>,
    connections: Vec<Option<(Cluster, Resolver)>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Default for StacksPlan {
    /// No stacks.
    fn default() -> StacksPlan {
        StacksPlan {
            plans: Vec::new(),
            connections: Vec::new(),
            runtime: None,
        }
    }
}

/// Plans every stack of the catalog side by side (none: empty). Never
/// writes.
pub fn plan_stacks(
    catalog: &Catalog,
    inventory: &BTreeMap<String, InventoryEntry>,
    key: &DigestKey,
    settings: &KubeSettings,
) -> StacksPlan {
    if catalog.stacks.is_empty() {
        return StacksPlan::default();
    }
    let runtime = plan::runtime();
    let planned = runtime.block_on(futures::future::join_all(
        catalog
            .stacks
            .iter()
            .enumerate()
            .map(|(index, stack)| plan::plan_one(index, stack, inventory, key, settings)),
    ));
    let (plans, connections) = planned.into_iter().unzip();
    StacksPlan {
        plans,
        connections,
        runtime: Some(runtime),
    }
}

impl StacksPlan {
    /// Passes every message through `scrub` (see [`StackReport::scrub`]).
    pub fn scrub(&mut self, scrub: &dyn Fn(&str) -> String) {
        for p in &mut self.plans {
            p.scrub(scrub);
        }
    }

    /// Carries out every stack's plan side by side, each isolated from the
    /// others, and records each one's inventory in `store`: one waiting for
    /// its rollout (up to its timeout) holds no other stack up.
    pub fn apply(
        self,
        catalog: &Catalog,
        store: &Store,
        cancel: Option<&AtomicBool>,
        idle: Option<&Idle<'_>>,
    ) -> Vec<StackReport> {
        let Some(runtime) = self.runtime else {
            return Vec::new();
        };
        let host = catalog.host.name.as_str();
        runtime.block_on(futures::future::join_all(
            self.plans.iter().zip(self.connections).map(|(plan, conn)| {
                let stack = &catalog.stacks[plan.index];
                let cx = Cx {
                    stack,
                    host,
                    store,
                    cancel,
                    idle,
                };
                apply_one(cx, plan, conn)
            }),
        ))
    }
}

/// What one stack's apply works with.
#[derive(Clone, Copy)]
struct Cx<'a> {
    stack: &'a Stack,
    host: &'a str,
    store: &'a Store,
    cancel: Option<&'a AtomicBool>,
    idle: Option<&'a Idle<'a>>,
}

impl Cx<'_> {
    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

fn stopped() -> Failure {
    Failure::new(
        KubeFailure::Other,
        "not applied: the agent was asked to stop",
    )
}

/// Carries out one stack's plan: the steps of the module comment.
async fn apply_one(
    cx: Cx<'_>,
    plan: &StackPlan,
    connection: Option<(Cluster, Resolver)>,
) -> StackReport {
    let mut report = StackReport::new(&plan.name);
    match &plan.status {
        StackStatus::NotChecked(why) => {
            report.not_checked = Some(why.clone());
            return report;
        }
        StackStatus::Failed(e) => {
            report.error = Some(e.clone());
            return report;
        }
        StackStatus::Planned => {}
    }
    let (cluster, mut resolver) = connection.expect("a planned stack is connected");
    if let Err(e) = record_intents(&cx, plan) {
        report.error = Some(Failure::new(
            KubeFailure::Other,
            format!("cannot record intents in the state: {e}; nothing was applied"),
        ));
        return report;
    }
    let mut run = Run {
        stack: cx.stack,
        plan,
        cluster: &cluster,
        idle: cx.idle,
        errors: vec![None; plan.objects.len()],
        applied: vec![false; plan.objects.len()],
    };
    let (first, rest) = stages(cx.stack, plan);
    for &i in &first {
        if cx.cancelled() {
            run.errors[i] = Some(stopped());
            continue;
        }
        run.apply_object(i, &resolver).await;
    }
    report.error = run.settle_crds(&first, &mut resolver).await.err();
    if report.error.is_none() {
        run.apply_by_rank(&rest, &resolver, &cx).await;
    }
    let prunes = prune(&cx, plan, &cluster, report.error.is_some()).await;
    if cx.stack.spec.wait && report.error.is_none() && !cx.cancelled() {
        let started = Instant::now();
        run.wait_healthy(&resolver).await;
        report.health_wait = started.elapsed();
    }
    let (outcomes, counts) = outcomes(cx.stack, plan, &run.errors, &prunes);
    if let Err(e) = commit(&cx, plan, &run.applied, &prunes) {
        report.error = Some(Failure::new(
            KubeFailure::Other,
            format!("cannot record the stack's inventory: {e}"),
        ));
    }
    report.outcomes = outcomes;
    report.counts = counts;
    report
}

/// Step 2: inventory entries without a digest for the objects about to be
/// created, so a crash still leaves them owned and prunable.
fn record_intents(cx: &Cx<'_>, plan: &StackPlan) -> Result<(), StateError> {
    let intents: Vec<(String, InventoryEntry)> = plan
        .objects
        .iter()
        .filter(|p| p.error.is_none() && p.action == Action::Create && p.known.is_none())
        .map(|p| {
            (
                p.id.clone(),
                InventoryEntry {
                    kind: INVENTORY_KIND.to_string(),
                    module: cx.stack.name().to_string(),
                    digest: None,
                    origin: Origin::Created,
                    held_secrets: cx.stack.objects[p.index].holds_secrets,
                    rolled_back: None,
                },
            )
        })
        .collect();
    if intents.is_empty() {
        return Ok(());
    }
    cx.store.write(cx.host, |w| {
        for (id, entry) in &intents {
            w.put_inventory(id, entry)?;
        }
        Ok(())
    })
}

/// Step 3's order: CRDs and Namespaces first, then the rest, each by kind
/// rank, group, kind and id.
fn stages(stack: &Stack, plan: &StackPlan) -> (Vec<usize>, Vec<usize>) {
    let reference = |i: usize| &stack.objects[plan.objects[i].index].reference;
    let mut order: Vec<usize> = (0..plan.objects.len()).collect();
    order.sort_by_key(|&i| {
        let r = reference(i);
        (
            super::kind_rank(&r.kind),
            r.group.clone(),
            r.kind.clone(),
            plan.objects[i].id.clone(),
        )
    });
    order.into_iter().partition(|&i| {
        matches!(
            reference(i).kind.as_str(),
            "CustomResourceDefinition" | "Namespace"
        )
    })
}

/// What pruning one object did: a note, or why not.
type Pruned = Result<Option<String>, Failure>;

/// Step 4: deletes what the plan found owned and gone from the stack,
/// nothing when the stack failed or the agent is stopping.
async fn prune(cx: &Cx<'_>, plan: &StackPlan, cluster: &Cluster, failed: bool) -> Vec<Pruned> {
    let mut results = Vec::new();
    for p in &plan.prunes {
        let result = match (p.action, &p.resource) {
            _ if cx.cancelled() || failed => {
                Err(Failure::new(KubeFailure::Other, "not pruned this run"))
            }
            (Action::Delete, Some(ar)) => {
                let api = client::api(cluster, ar, p.reference.namespace.as_deref());
                match client::delete(&api, &p.reference.name).await {
                    Ok(true) => Ok(still_deleting(&api, &p.reference.name).await),
                    Ok(false) => Ok(Some("already gone".to_string())),
                    Err(e) => Err(Failure::call(
                        &e,
                        format!(
                            "delete failed (kept in the inventory, retried next run): {}",
                            e.describe()
                        ),
                    )),
                }
            }
            (Action::Forget, _) => Ok(p.note.clone()),
            _ => Err(Failure::new(
                KubeFailure::Other,
                p.note.clone().unwrap_or_else(|| "not pruned".into()),
            )),
        };
        results.push(result);
    }
    results
}

/// The outcome of every object that was not simply in sync, and the counts.
fn outcomes(
    stack: &Stack,
    plan: &StackPlan,
    errors: &[Option<Failure>],
    prunes: &[Pruned],
) -> (Vec<Outcome>, RunCounts) {
    let mut counts = RunCounts::default();
    let mut outcomes = Vec::new();
    for (i, p) in plan.objects.iter().enumerate() {
        let o = &stack.objects[p.index];
        let failure = errors[i].clone().or_else(|| p.error.clone());
        match (p.class, p.action, &failure) {
            (_, _, Some(_)) => counts.failed += 1,
            (Classification::Skipped, ..) => counts.skipped += 1,
            (Classification::InSync, ..) => counts.unchanged += 1,
            (_, Action::Report, _) => counts.drift_reported += 1,
            (Classification::Create, ..) => counts.created += 1,
            (Classification::Change, ..) => counts.changed += 1,
            (Classification::Drift, ..) => counts.drift_healed += 1,
            _ => {}
        }
        let blocked = failure.is_none().then_some(o.blocked.as_ref()).flatten();
        let (error, reason) = match (failure, blocked) {
            (Some(f), _) => (Some(f.message), Some(Reason::Kube(f.kind))),
            (None, Some(b)) => (
                Some(format!("skipped: needs {b}")),
                Some(Reason::Blocked { needs: b.clone() }),
            ),
            (None, None) => (None, None),
        };
        if p.class != Classification::InSync || error.is_some() {
            outcomes.push(Outcome {
                id: p.id.clone(),
                action: p.action,
                class: p.class,
                fields: p.changes.iter().map(|c| c.path.clone()).collect(),
                error,
                note: None,
                reason,
            });
        }
    }
    for (p, r) in plan.prunes.iter().zip(prunes) {
        let (error, note, reason) = match r {
            Ok(note) => {
                if p.action == Action::Delete {
                    counts.pruned += 1;
                }
                (None, note.clone(), None)
            }
            Err(f) => {
                counts.failed += 1;
                (Some(f.message.clone()), None, Some(Reason::Kube(f.kind)))
            }
        };
        outcomes.push(Outcome {
            id: p.id.clone(),
            action: p.action,
            class: Classification::Prune,
            fields: Vec::new(),
            error,
            note,
            reason,
        });
    }
    (outcomes, counts)
}

/// Step 6: the stack's inventory in one transaction: applied objects get
/// their digest, pruned ones leave; a failed delete stays to be retried.
fn commit(
    cx: &Cx<'_>,
    plan: &StackPlan,
    applied: &[bool],
    prunes: &[Pruned],
) -> Result<(), StateError> {
    cx.store.write(cx.host, |w| -> Result<(), StateError> {
        for (i, p) in plan.objects.iter().enumerate() {
            let ok = match p.action {
                Action::Create | Action::Update => applied[i],
                Action::None => p.error.is_none(),
                _ => false,
            };
            if !ok {
                continue;
            }
            let origin = p.known.as_ref().map_or(
                if p.exists {
                    Origin::Adopted
                } else {
                    Origin::Created
                },
                |k| k.origin,
            );
            let entry = InventoryEntry {
                kind: INVENTORY_KIND.to_string(),
                module: cx.stack.name().to_string(),
                digest: Some(p.digest.clone()),
                origin,
                held_secrets: cx.stack.objects[p.index].holds_secrets,
                rolled_back: None,
            };
            if p.known.as_ref() != Some(&entry) {
                w.put_inventory(&p.id, &entry)?;
            }
        }
        for (p, r) in plan.prunes.iter().zip(prunes) {
            if r.is_ok() {
                w.remove_inventory(&p.id)?;
            }
        }
        Ok(())
    })
}

struct Run<'a> {
    idle: Option<&'a Idle<'a>>,
    stack: &'a Stack,
    plan: &'a StackPlan,
    cluster: &'a Cluster,
    errors: Vec<Option<Failure>>,
    applied: Vec<bool>,
}

impl Run<'_> {
    /// Step 3, after the first stage: waits for the CRDs it applied to be
    /// `Established`, then (up to the stack's timeout) until discovery
    /// serves every kind they define, and refreshes `resolver`.
    async fn settle_crds(
        &mut self,
        first: &[usize],
        resolver: &mut Resolver,
    ) -> Result<(), Failure> {
        let stack = self.stack;
        let crds: Vec<usize> = first
            .iter()
            .copied()
            .filter(|&i| {
                self.applied[i]
                    && stack.objects[self.plan.objects[i].index].reference.kind
                        == "CustomResourceDefinition"
            })
            .collect();
        if crds.is_empty() {
            return Ok(());
        }
        for &i in &crds {
            if let Err(e) = self.wait_established(i, resolver).await {
                self.errors[i] = Some(e);
            }
        }
        let mut groups: Vec<String> = stack
            .objects
            .iter()
            .map(|o| o.reference.group.clone())
            .collect();
        groups.sort();
        groups.dedup();
        let deadline = Instant::now() + stack.spec.timeout;
        loop {
            let r = Resolver::discover(self.cluster, &groups)
                .await
                .map_err(|e| {
                    Failure::new(
                        e.failure(),
                        format!("discovery after applying CRDs failed: {e}"),
                    )
                })?;
            let unresolved = stack.objects.iter().find(|o| {
                plan::defined_by_crd(stack, &o.reference) && r.resolve(&o.reference).is_none()
            });
            *resolver = r;
            match unresolved {
                None => return Ok(()),
                Some(o) if Instant::now() >= deadline => {
                    return Err(Failure::new(
                        KubeFailure::Timeout,
                        format!(
                            "the cluster still serves no {} in {} {} after applying its CRD",
                            o.reference.kind,
                            o.api_version,
                            humantime::format_duration(stack.spec.timeout)
                        ),
                    ))
                }
                Some(_) => pause(self.idle).await,
            }
        }
    }

    /// Step 3, the second stage: by kind rank, the objects of one rank in
    /// parallel (bounded).
    async fn apply_by_rank(&mut self, order: &[usize], resolver: &Resolver, cx: &Cx<'_>) {
        let rank = |i: usize| {
            super::kind_rank(
                &self.stack.objects[self.plan.objects[i].index]
                    .reference
                    .kind,
            )
        };
        for batch in order.chunk_by(|&a, &b| rank(a) == rank(b)) {
            let results: Vec<(usize, Result<bool, Failure>)> =
                futures::stream::iter(batch.iter().copied())
                    .map(|i| {
                        let run = &*self;
                        async move {
                            if cx.cancelled() {
                                return (i, Err(stopped()));
                            }
                            (i, run.apply_one_result(i, resolver).await)
                        }
                    })
                    .buffer_unordered(PARALLELISM)
                    .collect()
                    .await;
            for (i, r) in results {
                match r {
                    Ok(applied) => self.applied[i] = applied,
                    Err(e) => self.errors[i] = Some(e),
                }
            }
        }
    }

    async fn apply_object(&mut self, i: usize, resolver: &Resolver) {
        match self.apply_one_result(i, resolver).await {
            Ok(applied) => self.applied[i] = applied,
            Err(e) => self.errors[i] = Some(e),
        }
    }

    /// Applies object `i` of the plan if it needs it: `Ok(true)` applied,
    /// `Ok(false)` nothing to do.
    async fn apply_one_result(&self, i: usize, resolver: &Resolver) -> Result<bool, Failure> {
        let p: &ObjectPlan = &self.plan.objects[i];
        if p.error.is_some() || !matches!(p.action, Action::Create | Action::Update) {
            return Ok(false);
        }
        let o = &self.stack.objects[p.index];
        let Some((ar, scope)) = resolver.resolve(&o.reference) else {
            return Err(Failure::new(
                KubeFailure::NotFound,
                format!(
                    "the cluster serves no {} in {} even after applying the stack's CRDs",
                    o.reference.kind, o.api_version
                ),
            ));
        };
        let (namespace, _) = plan::placement(self.stack, p.index, &scope)?;
        let body = plan::body_for(self.stack, p.index, namespace.as_deref());
        let api = client::api(self.cluster, &ar, namespace.as_deref());
        let name = &o.reference.name;
        match &p.wait_gone {
            Some(plan::Deleting::Itself) => self.wait_gone(&api, name, "it", false).await?,
            Some(plan::Deleting::Namespace(ns)) => {
                let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
                    kube::Api::all(self.cluster.client.clone());
                let namespaces = dynamic(namespaces);
                self.wait_gone(&namespaces, ns, &format!("namespace {ns}"), true)
                    .await?
            }
            None => {}
        }
        if p.recreate {
            client::delete(&api, name).await.map_err(|e| {
                Failure::call(
                    &e,
                    format!("cannot delete it to re-create it: {}", e.describe()),
                )
            })?;
            self.wait_gone(&api, name, "it", false).await?;
        }
        if let Some(t) = &p.takeover {
            let patch = serde_json::json!({"metadata": {
                "managedFields": t.managed_fields,
                "resourceVersion": t.resource_version,
            }});
            let params = kube::api::PatchParams::default();
            let merge = kube::api::Patch::Merge(&patch);
            client::call(|| api.patch(name, &params, &merge))
                .await
                .map_err(|e| {
                    Failure::call(&e, format!(
                        "cannot take the fields of {} over: {} (the object changed since the plan? run again)",
                        t.from.join(", "),
                        e.describe()
                    ))
                })?;
        }
        if let Some(n) = p.handover {
            let keep = serde_json::json!({
                "apiVersion": o.api_version, "kind": o.reference.kind,
                "metadata": {"name": name}, "spec": {"replicas": n},
            });
            let params = kube::api::PatchParams::apply(super::ownership::HANDOVER_MANAGER).force();
            let apply = kube::api::Patch::Apply(&keep);
            client::call(|| api.patch(name, &params, &apply))
                .await
                .map_err(|e| {
                    Failure::call(
                        &e,
                        format!("cannot hand spec.replicas over: {}", e.describe()),
                    )
                })?;
        }
        let force = plan::forces(self.stack, p);
        match client::apply(&api, name, &body, force, false).await {
            Ok(_) => Ok(true),
            Err(e) if !e.conflicts().is_empty() => {
                let conflicts: Vec<client::Conflict> = e
                    .conflicts()
                    .into_iter()
                    .map(|mut c| {
                        c.controller = p
                            .conflicts
                            .iter()
                            .any(|k| k.manager == c.manager && k.controller)
                            || super::ownership::is_controller(&c.manager, None);
                        c
                    })
                    .collect();
                let message = if conflicts.iter().any(|c| c.controller) {
                    format!(
                        "conflict: {}; a controller's fields are never forced: remove them from the manifest to leave them to it",
                        client::describe_conflicts(&conflicts)
                    )
                } else {
                    format!(
                        "conflict: {}; set `force_conflicts: true` in {} to take these fields over, or stop setting them",
                        client::describe_conflicts(&conflicts),
                        self.stack.spec.file
                    )
                };
                Err(Failure::new(KubeFailure::Conflict, message))
            }
            Err(e) => Err(Failure::call(
                &e,
                format!("rejected by the API server: {}", e.describe()),
            )),
        }
    }

    /// Waits (up to the stack's timeout) until the object is gone (or,
    /// with `or_recreated`, exists again without being deleted: a
    /// namespace this run created anew).
    async fn wait_gone(
        &self,
        api: &kube::Api<kube::api::DynamicObject>,
        name: &str,
        what: &str,
        or_recreated: bool,
    ) -> Result<(), Failure> {
        let deadline = Instant::now() + self.stack.spec.timeout;
        loop {
            match client::get(api, name).await {
                Ok(None) => return Ok(()),
                Ok(Some(live))
                    if or_recreated && live.pointer("/metadata/deletionTimestamp").is_none() =>
                {
                    return Ok(())
                }
                Ok(Some(live)) => {
                    if Instant::now() >= deadline {
                        let finalizers = super::ownership::finalizers(&live).join(", ");
                        return Err(Failure::new(
                            KubeFailure::Timeout,
                            format!(
                                "{what} was still being deleted after {}{}",
                                humantime::format_duration(self.stack.spec.timeout),
                                if finalizers.is_empty() {
                                    String::new()
                                } else {
                                    format!(" (held by finalizers {finalizers})")
                                }
                            ),
                        ));
                    }
                }
                Err(e) => {
                    return Err(Failure::call(
                        &e,
                        format!("cannot read {what}: {}", e.describe()),
                    ))
                }
            }
            pause(self.idle).await;
        }
    }

    /// Waits for a CRD's `Established` condition.
    async fn wait_established(&self, i: usize, resolver: &Resolver) -> Result<(), Failure> {
        let o = &self.stack.objects[self.plan.objects[i].index];
        let Some((ar, _)) = resolver.resolve(&o.reference) else {
            return Err(Failure::new(
                KubeFailure::NotFound,
                "apiextensions.k8s.io is not served",
            ));
        };
        let api = client::api(self.cluster, &ar, None);
        let deadline = Instant::now() + self.stack.spec.timeout;
        loop {
            if let Ok(Some(live)) = client::get(&api, &o.reference.name).await {
                let established = live
                    .pointer("/status/conditions")
                    .and_then(Json::as_array)
                    .is_some_and(|cs| {
                        cs.iter().any(|c| {
                            c.get("type").and_then(Json::as_str) == Some("Established")
                                && c.get("status").and_then(Json::as_str) == Some("True")
                        })
                    });
                if established {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(Failure::new(
                    KubeFailure::Timeout,
                    format!(
                        "the CRD was not Established within {}",
                        humantime::format_duration(self.stack.spec.timeout)
                    ),
                ));
            }
            pause(self.idle).await;
        }
    }

    /// A pod of the workload that waiting will not make ready (see
    /// [`health::stuck_pod`]), with its reason.
    async fn stuck_pod(&self, namespace: Option<&str>, workload: &Json) -> Option<String> {
        let selector = health::pod_selector(workload)?;
        let ns = namespace?;
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(self.cluster.client.clone(), ns);
        let lp = kube::api::ListParams::default().labels(&selector);
        let list = client::call(|| pods.list(&lp)).await.ok()?;
        list.items.iter().find_map(|pod| {
            let v = serde_json::to_value(pod).ok()?;
            health::stuck_pod(&v)
        })
    }

    /// Waits until every workload of the stack is healthy, or the timeout;
    /// an unhealthy one fails with its object and conditions.
    async fn wait_healthy(&mut self, resolver: &Resolver) {
        let deadline = Instant::now() + self.stack.spec.timeout;
        let mut pending: Vec<usize> = (0..self.plan.objects.len())
            .filter(|&i| {
                let p = &self.plan.objects[i];
                let r = &self.stack.objects[p.index].reference;
                p.error.is_none()
                    && self.errors[i].is_none()
                    && p.action != Action::Skip
                    && health::has_health(&r.group, &r.kind)
            })
            .collect();
        let mut last: BTreeMap<usize, String> = BTreeMap::new();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for &i in &pending {
                let p = &self.plan.objects[i];
                let r = &self.stack.objects[p.index].reference;
                let Some((ar, _)) = resolver.resolve(r) else {
                    continue;
                };
                let api = client::api(self.cluster, &ar, p.namespace.as_deref());
                match client::get(&api, &r.name).await {
                    Ok(Some(live)) => match health::evaluate(&r.kind, &live) {
                        Health::Ready => {}
                        Health::Progressing(why) => {
                            if let Some(stuck) = self.stuck_pod(p.namespace.as_deref(), &live).await
                            {
                                self.errors[i] = Some(Failure::new(
                                    KubeFailure::Timeout,
                                    format!("unhealthy: {stuck}"),
                                ));
                                continue;
                            }
                            last.insert(i, why);
                            still.push(i);
                        }
                        Health::Failed(why) => {
                            self.errors[i] = Some(Failure::new(
                                KubeFailure::Timeout,
                                format!("unhealthy: {why}"),
                            ));
                        }
                    },
                    // A Job with a TTL that finished and was removed.
                    Ok(None)
                        if r.kind == "Job"
                            && self.stack.objects[p.index]
                                .body
                                .0
                                .pointer("/spec/ttlSecondsAfterFinished")
                                .is_some() => {}
                    Ok(None) => {
                        last.insert(i, "it does not exist".into());
                        still.push(i);
                    }
                    Err(e) => {
                        last.insert(i, format!("cannot read it: {}", e.describe()));
                        still.push(i);
                    }
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for &i in &pending {
                    self.errors[i] = Some(Failure::new(
                        KubeFailure::Timeout,
                        format!(
                            "not healthy after {} (timeout of {}): {}",
                            humantime::format_duration(self.stack.spec.timeout),
                            self.stack.spec.file,
                            last.get(&i).map(String::as_str).unwrap_or("no status")
                        ),
                    ));
                }
                break;
            }
            pause(self.idle).await;
        }
    }
}

/// After a delete: a note when the object is still there (terminating,
/// held by finalizers), so it is never reported as simply gone.
async fn still_deleting(api: &kube::Api<kube::api::DynamicObject>, name: &str) -> Option<String> {
    let live = client::get(api, name).await.ok()??;
    let finalizers = super::ownership::finalizers(&live);
    Some(if finalizers.is_empty() {
        "deletion in progress (terminating)".to_string()
    } else {
        format!(
            "deletion in progress: held by finalizers {} until they are removed",
            finalizers.join(", ")
        )
    })
}

/// A typed API as a dynamic one (for [`Run::wait_gone`]).
fn dynamic<K>(api: kube::Api<K>) -> kube::Api<kube::api::DynamicObject>
where
    K: kube::Resource<DynamicType = ()>,
{
    let ar = kube::discovery::ApiResource::erase::<K>(&());
    kube::Api::all_with(api.into_client(), &ar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_of_a_stack_report_is_scrubbed() {
        let secret = "hunter2-CANARY";
        let mut r = StackReport {
            name: "web".into(),
            not_checked: Some(format!("nc {secret}")),
            error: Some(Failure::new(KubeFailure::Other, format!("stack {secret}"))),
            outcomes: vec![Outcome {
                id: "k8s:web/web/Secret/s".into(),
                action: Action::Update,
                class: Classification::Change,
                fields: Vec::new(),
                error: Some(format!("422 Invalid: {secret}")),
                note: Some(format!("note {secret}")),
                reason: Some(Reason::Kube(KubeFailure::Invalid)),
            }],
            counts: RunCounts::default(),
            health_wait: Duration::ZERO,
        };
        r.scrub(&|t: &str| t.replace(secret, "[redacted]"));
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains(secret), "{text}");
        assert_eq!(text.matches("[redacted]").count(), 4, "{text}");
    }
}
