//! Stage 3, *plan*: observe every resource (bounded parallelism), diff it
//! against the catalog, and classify each difference using the inventory.
//!
//! # Classification
//! - **create**: the object does not exist.
//! - **change**: desired differs from what was last applied (git moved), or
//!   the agent never applied it.
//! - **drift**: desired is unchanged since the last apply, but the live state
//!   no longer matches it (someone edited the host).
//! - **prune**: in the inventory, gone from the catalog.
//!
//! # Guarantees
//! Never writes: observation only reads, and the inventory is passed in.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use homelab_agent_state::{DigestKey, InventoryEntry, Origin};

use crate::desired::catalog::Catalog;
use crate::desired::model::DriftPolicy;
use crate::resources::{FieldChange, Host, Observation, ResourceError};

/// Why a resource is in the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Classification {
    InSync,
    Create,
    Change,
    Drift,
    Prune,
    /// Needs a secret that did not resolve this run: not observed, not
    /// applied, not pruned.
    Skipped,
}

/// What apply will do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// In sync.
    None,
    Create,
    Update,
    /// Drift under `on_drift: report`: shown, never corrected.
    Report,
    /// Prune something the agent created.
    Delete,
    /// Prune something the agent adopted: stop managing it, leave it in place.
    Forget,
    /// Nothing this run (see [`Classification::Skipped`]).
    Skip,
    /// Apply only: a service restarted because a file notifying it changed.
    Restart,
}

impl Classification {
    /// The name in JSON and log lines (`in_sync`, `create`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Classification::InSync => "in_sync",
            Classification::Create => "create",
            Classification::Change => "change",
            Classification::Drift => "drift",
            Classification::Prune => "prune",
            Classification::Skipped => "skipped",
        }
    }
}

impl std::fmt::Display for Classification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Action {
    /// The name in JSON and log lines (`create`, `update`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Action::None => "none",
            Action::Create => "create",
            Action::Update => "update",
            Action::Report => "report",
            Action::Delete => "delete",
            Action::Forget => "forget",
            Action::Skip => "skip",
            Action::Restart => "restart",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One catalog entry in the plan.
#[derive(Debug)]
pub struct Planned {
    /// Index into [`Catalog::entries`].
    pub index: usize,
    pub class: Classification,
    pub action: Action,
    pub changes: Vec<FieldChange>,
    pub observation: Observation,
    /// The inventory entry, if the agent managed this before.
    pub known: Option<InventoryEntry>,
    /// The digest to record when applied (keyed, see [`stored_digest`]).
    pub digest: String,
    /// What this run leaves out for the resource (sandbox mode: "files
    /// only", "not checked"); shown even when it is in sync.
    pub note: Option<&'static str>,
}

/// An inventory entry that left the catalog.
#[derive(Debug, Clone)]
pub struct PlannedPrune {
    pub id: String,
    pub kind: String,
    pub module: String,
    pub origin: Origin,
    pub action: Action,
}

/// A resource that could not be observed.
#[derive(Debug)]
pub struct Failure {
    pub id: String,
    pub error: ResourceError,
}

/// The plan for one host and revision.
#[derive(Debug)]
pub struct Plan {
    pub catalog: Arc<Catalog>,
    pub resources: Vec<Planned>,
    pub prunes: Vec<PlannedPrune>,
    pub failures: Vec<Failure>,
}

/// What a plan found, by classification: the one set of plan counts for
/// every target (the host's resources, a stack, all stacks, the daemon's
/// status).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Summary {
    pub create: usize,
    pub change: usize,
    pub prune: usize,
    pub drift: usize,
    pub in_sync: usize,
    /// Not applied: a secret did not resolve, or a change is held.
    pub skipped: usize,
    /// Could not be observed or planned.
    pub errors: usize,
    /// Would take fields another manager owns (stacks).
    pub conflicts: usize,
    /// Not compared at all: no cluster credentials (stacks).
    pub not_checked: usize,
}

impl Summary {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &Summary) {
        self.create += other.create;
        self.change += other.change;
        self.prune += other.prune;
        self.drift += other.drift;
        self.in_sync += other.in_sync;
        self.skipped += other.skipped;
        self.errors += other.errors;
        self.conflicts += other.conflicts;
        self.not_checked += other.not_checked;
    }
}

impl Plan {
    pub fn summary(&self) -> Summary {
        let mut s = Summary {
            prune: self.prunes.len(),
            errors: self.failures.len(),
            ..Summary::default()
        };
        for p in &self.resources {
            match p.class {
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

    /// Recomputes the digests to record under `key` (the first apply creates
    /// the state directory's key after planning with a throwaway one).
    pub fn rekey(&mut self, key: &DigestKey) {
        for p in &mut self.resources {
            p.digest = stored_digest(key, &self.catalog.entries[p.index].digest);
        }
    }

    /// Anything to do or to report (drift included).
    pub fn has_changes(&self) -> bool {
        let s = self.summary();
        s.create + s.change + s.prune + s.drift + s.skipped > 0
    }
}

/// Why a rolled-back change is skipped.
pub const HELD: &str = "held: this change made a service fail to start and was rolled back; change it in git to try again";

/// Observes, diffs and classifies. `inventory` is the host's state as last
/// committed.
pub fn plan(
    catalog: impl Into<Arc<Catalog>>,
    host: &Host,
    inventory: &BTreeMap<String, InventoryEntry>,
    key: &DigestKey,
) -> Plan {
    let catalog: Arc<Catalog> = catalog.into();
    let observed = observe_all(&catalog, host);
    let mut resources = Vec::with_capacity(catalog.entries.len());
    let mut failures = Vec::new();
    for (index, result) in observed.into_iter().enumerate() {
        let entry = &catalog.entries[index];
        if entry.blocked.is_some() {
            resources.push(Planned {
                index,
                class: Classification::Skipped,
                action: Action::Skip,
                changes: Vec::new(),
                observation: Observation::new(false, ()),
                known: inventory.get(&entry.id).cloned(),
                digest: stored_digest(key, &entry.digest),
                note: None,
            });
            continue;
        }
        let observation = match result {
            Ok(o) => o,
            Err(error) => {
                failures.push(Failure {
                    id: entry.id.clone(),
                    error,
                });
                continue;
            }
        };
        let mut changes = entry.resource.diff(&observation, host);
        let known = inventory.get(&entry.id).cloned();
        if known.as_ref().is_some_and(|k| k.held_secrets) {
            hide_previous_content(&mut changes);
        }
        let digest = stored_digest(key, &entry.digest);
        let applied_same = known
            .as_ref()
            .and_then(|k| k.digest.as_deref())
            .is_some_and(|d| d == digest);
        let class = if changes.is_empty() {
            Classification::InSync
        } else if applied_same {
            Classification::Drift
        } else if !observation.exists {
            Classification::Create
        } else {
            Classification::Change
        };
        let action = match class {
            Classification::InSync | Classification::Prune => Action::None,
            Classification::Skipped => Action::Skip,
            Classification::Create => Action::Create,
            Classification::Change => Action::Update,
            Classification::Drift if entry.on_drift == DriftPolicy::Report => Action::Report,
            Classification::Drift if !observation.exists => Action::Create,
            Classification::Drift => Action::Update,
        };
        // This desired state was applied once, made a service fail to start
        // and was rolled back: not retried until the desired state changes.
        let held = !changes.is_empty()
            && known.as_ref().and_then(|k| k.rolled_back.as_deref()) == Some(digest.as_str());
        let (class, action) = if held {
            (Classification::Skipped, Action::Skip)
        } else {
            (class, action)
        };
        resources.push(Planned {
            index,
            class,
            action,
            changes,
            observation,
            known,
            digest,
            note: if held {
                Some(HELD)
            } else if host.sandbox {
                entry.resource.sandbox_note()
            } else {
                None
            },
        });
    }

    let in_catalog: HashSet<&str> = catalog.entries.iter().map(|e| e.id.as_str()).collect();
    let mut prunes: Vec<PlannedPrune> = inventory
        .iter()
        // Stack objects are planned (and pruned) by `k8s`, not here.
        .filter(|(id, e)| {
            !in_catalog.contains(id.as_str()) && e.kind != crate::desired::stacks::INVENTORY_KIND
        })
        .map(|(id, e)| PlannedPrune {
            id: id.clone(),
            kind: e.kind.clone(),
            module: e.module.clone(),
            origin: e.origin,
            action: match e.origin {
                Origin::Created => Action::Delete,
                Origin::Adopted => Action::Forget,
            },
        })
        .collect();
    // Deepest paths first, so files go before the directories holding them.
    prunes.sort_by(|a, b| {
        let depth = |p: &PlannedPrune| {
            p.id.split_once(':')
                .map_or(0, |(_, ident)| Path::new(ident).components().count())
        };
        depth(b).cmp(&depth(a)).then_with(|| b.id.cmp(&a.id))
    });
    Plan {
        catalog,
        resources,
        prunes,
        failures,
    }
}

/// The live object was last written with secret values: never show its
/// current content (no old lines, no hash), whatever the desired state
/// holds now.
fn hide_previous_content(changes: &mut [FieldChange]) {
    for c in changes.iter_mut().filter(|c| c.field == "content") {
        if let Some(old) = &c.old {
            // Keep only the size ("58 bytes"): no lines, no hash.
            let size: String = old
                .split(&[',', '('][..])
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            c.old = Some(format!("{size} (held secrets, not shown)"));
            c.diff = None;
        }
    }
}

/// What the inventory stores for a desired spec: a keyed hash (MAC) of its
/// digest under the state directory's key, so secrets in file contents
/// cannot be brute-forced from the state file, and a rotated secret still
/// changes it.
pub fn stored_digest(key: &DigestKey, digest: &str) -> String {
    blake3::keyed_hash(key.bytes(), digest.as_bytes()).to_hex()[..32].to_string()
}

/// Observes one entry; a blocked one is not looked at.
fn observe(
    entry: &crate::desired::catalog::Entry,
    host: &Host,
) -> Result<Observation, ResourceError> {
    if entry.blocked.is_some() {
        return Ok(Observation::new(false, ()));
    }
    entry.resource.observe(host)
}

/// Observes every entry, in parallel on up to 8 threads, results in catalog order.
fn observe_all(catalog: &Catalog, host: &Host) -> Vec<Result<Observation, ResourceError>> {
    let n = catalog.entries.len();
    let threads = std::thread::available_parallelism()
        .map_or(1, |p| p.get())
        .min(8)
        .min(n.div_ceil(32).max(1));
    if threads <= 1 {
        return catalog
            .entries
            .iter()
            .map(|e| e.resource.observe(host))
            .collect();
    }
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<Result<Observation, ResourceError>>> =
        (0..n).map(|_| None).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        // Small chunks keep the two cores equally busy.
                        let start = next.fetch_add(16, Ordering::Relaxed);
                        if start >= n {
                            break;
                        }
                        for i in start..(start + 16).min(n) {
                            out.push((i, observe(&catalog.entries[i], host)));
                        }
                    }
                    out
                })
            })
            .collect();
        for w in workers {
            for (i, r) in w.join().expect("observe worker panicked") {
                results[i] = Some(r);
            }
        }
    });
    results
        .into_iter()
        .map(|r| r.expect("every index observed"))
        .collect()
}
