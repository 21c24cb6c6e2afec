//! The machine-readable plan and apply (`agent plan --json`, `agent apply
//! --json`): one schema for both, versioned by [`FORMAT_VERSION`],
//! documented in `docs/json-output.md` and `docs/json-output.schema.json`
//! (which the tests validate real output against).
//!
//! Both documents have the same keys at every level; what one of them
//! cannot know is `null` there (a plan has no `counts`). Every entry (a
//! host resource or a stack object) has `kind` and `module`, a skipped or
//! unchecked entry has a `reason`, and nothing that was not looked at is
//! ever `in_sync`.

use std::collections::HashMap;

use homelab_agent_state::RunCounts;
use serde::Serialize;
use serde_json::Value as Json;

use crate::apply::{ApplyReport, KubeFailure, Outcome, Reason};
use crate::desired::model::DriftPolicy;
use crate::plan::{Action, Classification, Plan, Summary};
use crate::resources::FieldChange;
use crate::syntax::diag::Diagnostics;

/// The version of the schema. Raised when a key is removed or renamed or
/// its meaning changes; adding a key does not raise it.
pub const FORMAT_VERSION: u32 = 1;

/// Which command printed the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Plan,
    Apply,
}

/// What an entry is, or was found to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryClass {
    InSync,
    Create,
    Change,
    Drift,
    Prune,
    /// Not applied, not a failure: see `reason` (a secret, a hold).
    Skipped,
    /// Not looked at this run: see `reason` (a sandbox, no cluster).
    NotChecked,
    /// Could not be observed or planned: see `error`.
    Error,
}

impl From<Classification> for EntryClass {
    fn from(c: Classification) -> EntryClass {
        match c {
            Classification::InSync => EntryClass::InSync,
            Classification::Create => EntryClass::Create,
            Classification::Change => EntryClass::Change,
            Classification::Drift => EntryClass::Drift,
            Classification::Prune => EntryClass::Prune,
            Classification::Skipped => EntryClass::Skipped,
        }
    }
}

/// Why an entry is what it is: [`Reason`], plus "not checked".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EntryReason {
    Blocked { needs: String },
    Held,
    AfterFailed { id: String },
    Stopped,
    RolledBack { service: String },
    Restarted { by: String },
    Kube { failure: KubeFailure },
    NotChecked { why: String },
}

impl From<&Reason> for EntryReason {
    fn from(r: &Reason) -> EntryReason {
        match r {
            Reason::Blocked { needs } => EntryReason::Blocked {
                needs: needs.clone(),
            },
            Reason::Held => EntryReason::Held,
            Reason::AfterFailed { id } => EntryReason::AfterFailed { id: id.clone() },
            Reason::Stopped => EntryReason::Stopped,
            Reason::RolledBack { service } => EntryReason::RolledBack {
                service: service.clone(),
            },
            Reason::Restarted { by } => EntryReason::Restarted { by: by.clone() },
            Reason::Kube(k) => EntryReason::Kube { failure: *k },
        }
    }
}

/// One difference: the field (a host resource's field, or a stack
/// object's JSON path) and its old and new values, typed where they are
/// values (see [`typed_value`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub field: String,
    pub old: Json,
    pub new: Json,
    /// A unified diff of a file's content (host resources only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
}

impl Change {
    /// A host resource's field change.
    pub fn host(c: &FieldChange) -> Change {
        Change {
            field: c.field.to_string(),
            old: typed_value(c.field, c.old.as_deref()),
            new: typed_value(c.field, c.new.as_deref()),
            diff: c.diff.clone(),
        }
    }
}

/// A host field's value as JSON: `enabled` a boolean, `owner` and `group`
/// the numeric id (the name shows in the text plan), anything else a
/// string as the text plan shows it: modes as octal strings (`"0644"`,
/// JSON has no octal numbers), contents and states as descriptions.
/// Absent: `null`.
pub fn typed_value(field: &str, text: Option<&str>) -> Json {
    let Some(text) = text else {
        return Json::Null;
    };
    match field {
        "enabled" => match text {
            "true" => Json::Bool(true),
            "false" => Json::Bool(false),
            _ => Json::String(text.to_string()),
        },
        // Old: `1000`; new: `erich (1000)`.
        "owner" | "group" => {
            let id = text
                .rsplit_once('(')
                .map_or(text, |(_, id)| id.trim_end_matches(')'));
            id.parse::<u64>()
                .map_or_else(|_| Json::String(text.to_string()), Json::from)
        }
        _ => Json::String(text.to_string()),
    }
}

/// A stack object's identity beyond its id.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectFields {
    #[serde(rename = "apiVersion")]
    pub api_version: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    /// Fields another manager owns that the apply sets.
    pub conflicts: Json,
}

/// One host resource or stack object, in a plan or in an apply.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub id: String,
    /// The resource kind (`file`, `service`, ...) or the Kubernetes kind.
    pub kind: String,
    /// The module that declares it (for a stack object: its stack).
    pub module: String,
    pub classification: EntryClass,
    /// Plan: what apply will do. Apply: what it did.
    pub action: Action,
    /// `null` for prunes (no longer declared).
    pub on_drift: Option<DriftPolicy>,
    pub changes: Vec<Change>,
    /// Set on every skipped and not-checked entry; on others when known.
    pub reason: Option<EntryReason>,
    /// Set when it failed (or could not be planned).
    pub error: Option<String>,
    pub note: Option<String>,
    #[serde(flatten)]
    pub object: Option<ObjectFields>,
}

/// Counts of entries by classification: the summary of a document is
/// computed from its plan's entries, so it always agrees with them.
pub fn summarize(entries: &[Entry]) -> Summary {
    let mut s = Summary::default();
    for e in entries {
        match e.classification {
            EntryClass::InSync => s.in_sync += 1,
            EntryClass::Create => s.create += 1,
            EntryClass::Change => s.change += 1,
            EntryClass::Drift => s.drift += 1,
            EntryClass::Prune => s.prune += 1,
            EntryClass::Skipped => s.skipped += 1,
            EntryClass::NotChecked => s.not_checked += 1,
            EntryClass::Error => s.errors += 1,
        }
        if e.object
            .as_ref()
            .and_then(|o| o.conflicts.as_array())
            .is_some_and(|c| !c.is_empty())
        {
            s.conflicts += 1;
        }
    }
    s
}

/// The plan's entries for the host's resources: in apply order, then the
/// resources that could not be observed, then prunes.
pub fn host_plan_entries(plan: &Plan) -> Vec<Entry> {
    let mut out = Vec::with_capacity(plan.resources.len() + plan.prunes.len());
    for p in &plan.resources {
        let e = &plan.catalog.entries[p.index];
        let not_checked = p.class == Classification::InSync
            && p.note == Some(crate::resources::package::SANDBOX_NOTE);
        let (classification, reason, note) = if not_checked {
            let why = p.note.unwrap_or_default().to_string();
            (
                EntryClass::NotChecked,
                Some(EntryReason::NotChecked { why }),
                None,
            )
        } else if p.class == Classification::Skipped {
            let reason = match (&e.blocked, p.note) {
                (Some(b), _) => EntryReason::Blocked { needs: b.clone() },
                (None, _) => EntryReason::Held,
            };
            (EntryClass::Skipped, Some(reason), p.note.map(String::from))
        } else {
            (p.class.into(), None, p.note.map(String::from))
        };
        out.push(Entry {
            id: e.id.clone(),
            kind: e.resource.kind().to_string(),
            module: e.module.clone(),
            classification,
            action: p.action,
            on_drift: Some(e.on_drift),
            changes: p.changes.iter().map(Change::host).collect(),
            reason,
            error: None,
            note,
            object: None,
        });
    }
    for f in &plan.failures {
        let e = plan.catalog.entries.iter().find(|e| e.id == f.id);
        out.push(Entry {
            id: f.id.clone(),
            kind: e.map_or_else(|| kind_of_id(&f.id), |e| e.resource.kind().to_string()),
            module: e.map(|e| e.module.clone()).unwrap_or_default(),
            classification: EntryClass::Error,
            action: Action::None,
            on_drift: e.map(|e| e.on_drift),
            changes: Vec::new(),
            reason: None,
            error: Some(f.error.to_string()),
            note: None,
            object: None,
        });
    }
    for p in &plan.prunes {
        out.push(Entry {
            id: p.id.clone(),
            kind: p.kind.clone(),
            module: p.module.clone(),
            classification: EntryClass::Prune,
            action: p.action,
            on_drift: None,
            changes: Vec::new(),
            reason: None,
            error: None,
            note: None,
            object: None,
        });
    }
    out
}

/// The kind part of an id (`file:/etc/x` → `file`).
fn kind_of_id(id: &str) -> String {
    id.split_once(':').map_or(id, |(k, _)| k).to_string()
}

/// Apply's entries: each planned entry replaced by what apply did to it
/// (one entry per outcome: a service also restarted appears twice, the
/// second time with action `restart`); entries apply had nothing to do
/// for stay as planned. Same order as the plan.
pub fn merge_outcomes(planned: Vec<Entry>, outcomes: &[Outcome]) -> Vec<Entry> {
    let mut by_id: HashMap<&str, Vec<&Outcome>> = HashMap::new();
    for o in outcomes {
        by_id.entry(o.id.as_str()).or_default().push(o);
    }
    let mut out = Vec::with_capacity(planned.len());
    for p in planned {
        match by_id.remove(p.id.as_str()) {
            None => out.push(p),
            Some(done) => {
                for o in done {
                    out.push(applied_entry(&p, o));
                }
            }
        }
    }
    // An outcome for something the plan did not list (not expected):
    // reported rather than lost, in the order apply produced it.
    for o in outcomes {
        if let Some(done) = by_id.remove(o.id.as_str()) {
            for o in done {
                let base = Entry {
                    id: o.id.clone(),
                    kind: kind_of_id(&o.id),
                    module: String::new(),
                    classification: o.class.into(),
                    action: o.action,
                    on_drift: None,
                    changes: Vec::new(),
                    reason: None,
                    error: None,
                    note: None,
                    object: None,
                };
                out.push(applied_entry(&base, o));
            }
        }
    }
    out
}

/// `planned` as apply left it.
fn applied_entry(planned: &Entry, o: &Outcome) -> Entry {
    let classification = if o.skipped() {
        EntryClass::Skipped
    } else {
        o.class.into()
    };
    let reason = match (&o.reason, classification) {
        (Some(r), _) => Some(r.into()),
        // Skipped without a typed reason: keep the plan's.
        (None, EntryClass::Skipped) => planned.reason.clone(),
        (None, _) => None,
    };
    // The changes apply carried out (or tried): the plan's diff, which
    // apply makes exactly; none for a restart or a skip.
    let changes = match o.action {
        Action::Create | Action::Update | Action::Report | Action::Delete => {
            planned.changes.clone()
        }
        _ => Vec::new(),
    };
    Entry {
        id: o.id.clone(),
        kind: planned.kind.clone(),
        module: planned.module.clone(),
        classification,
        action: o.action,
        on_drift: planned.on_drift,
        changes,
        reason,
        // A skip is not a failure: its `reason` says why.
        error: o
            .error
            .clone()
            .filter(|_| classification != EntryClass::Skipped),
        note: o.note.clone().or_else(|| planned.note.clone()),
        object: planned.object.clone(),
    }
}

/// A stack in a document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StackDoc {
    pub name: String,
    pub namespace: String,
    /// How the stack reaches its cluster (never a credential).
    pub cluster: Json,
    /// `planned` (plan), `applied` (apply), `not_checked`, `error`.
    pub status: &'static str,
    /// Why it is not checked, or what failed.
    pub reason: Option<String>,
    pub objects: Vec<Entry>,
    pub summary: Summary,
    /// What apply did (`null` in a plan).
    pub counts: Option<RunCounts>,
}

/// A stack that the host no longer lists but whose objects are still in
/// the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Orphan {
    pub name: String,
    pub objects: usize,
}

/// The whole document of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Document {
    pub format_version: u32,
    pub command: Command,
    pub host: String,
    pub platform: crate::resources::Platform,
    pub revision: String,
    /// The sandbox root (`--root`), when there is one.
    pub sandbox: Option<String>,
    /// `null`: the desired state loaded (see [`error_document`]).
    pub error: Option<Json>,
    pub resources: Vec<Entry>,
    /// Counts of the host's entries as planned.
    pub summary: Summary,
    /// What apply did to the host (`null` in a plan).
    pub counts: Option<RunCounts>,
    pub stacks: Vec<StackDoc>,
    pub orphaned_stacks: Vec<Orphan>,
    /// The `--target` selectors of a limited run; absent for a whole run
    /// (see [`Document::limited_to`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
}

impl Document {
    /// The document of a run limited to `targets` (`--target`).
    pub fn limited_to(mut self, limit: Option<&super::Limit>) -> Document {
        self.targets = limit.map(|l| l.targets.clone()).unwrap_or_default();
        self
    }
}

/// `doc` (an [`error_document`]) with the `--target` selectors of the
/// run that could not start or was refused; unchanged without any.
pub fn error_with_targets(mut doc: Json, targets: &[String]) -> Json {
    if !targets.is_empty() {
        doc["targets"] = Json::from(targets.to_vec());
    }
    doc
}

/// The document of `agent plan --json`.
pub fn plan_document(
    plan: &Plan,
    sandbox: Option<&str>,
    stacks: Vec<StackDoc>,
    orphans: &[(String, usize)],
) -> Document {
    let resources = host_plan_entries(plan);
    document(
        Command::Plan,
        plan,
        sandbox,
        summarize(&resources),
        resources,
        None,
        stacks,
        orphans,
    )
}

/// The document of `agent apply --json`: the plan's entries as apply left
/// them, its summary, and apply's counts.
pub fn apply_document(
    plan: &Plan,
    report: &ApplyReport,
    sandbox: Option<&str>,
    stacks: Vec<StackDoc>,
    orphans: &[(String, usize)],
) -> Document {
    let planned = host_plan_entries(plan);
    let summary = summarize(&planned);
    let resources = merge_outcomes(planned, &report.outcomes);
    document(
        Command::Apply,
        plan,
        sandbox,
        summary,
        resources,
        Some(report.counts.clone()),
        stacks,
        orphans,
    )
}

#[allow(clippy::too_many_arguments)]
fn document(
    command: Command,
    plan: &Plan,
    sandbox: Option<&str>,
    summary: Summary,
    resources: Vec<Entry>,
    counts: Option<RunCounts>,
    stacks: Vec<StackDoc>,
    orphans: &[(String, usize)],
) -> Document {
    Document {
        format_version: FORMAT_VERSION,
        command,
        host: plan.catalog.host.name.clone(),
        platform: plan.catalog.host.platform,
        revision: plan.catalog.revision.clone(),
        sandbox: sandbox.map(String::from),
        error: None,
        resources,
        summary,
        counts,
        stacks,
        orphaned_stacks: orphans
            .iter()
            .map(|(name, objects)| Orphan {
                name: name.clone(),
                objects: *objects,
            })
            .collect(),
        targets: Vec::new(),
    }
}

/// The document printed instead when the run could not start: the
/// desired state is invalid (every diagnostic, with file, line, resource
/// id, message and hint), or the source or config could not be read.
/// `message` must already be scrubbed.
pub fn error_document(
    command: Command,
    host: Option<&str>,
    stage: &str,
    message: &str,
    diagnostics: Option<&Diagnostics>,
) -> Json {
    let diagnostics: Vec<Json> = diagnostics
        .into_iter()
        .flat_map(Diagnostics::iter)
        .map(|d| {
            serde_json::json!({
                "file": d.file,
                "line": d.line,
                "resource": d.resource,
                "message": d.message,
                "hint": d.hint,
            })
        })
        .collect();
    serde_json::json!({
        "format_version": FORMAT_VERSION,
        "command": command,
        "host": host,
        "error": {
            "stage": stage,
            "message": message,
            "diagnostics": diagnostics,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_typed_where_they_are_values() {
        assert_eq!(typed_value("enabled", Some("true")), Json::Bool(true));
        assert_eq!(typed_value("enabled", Some("false")), Json::Bool(false));
        assert_eq!(typed_value("owner", Some("1000")), Json::from(1000));
        assert_eq!(typed_value("owner", Some("erich (1000)")), Json::from(1000));
        assert_eq!(typed_value("group", Some("staff (20)")), Json::from(20));
        assert_eq!(typed_value("mode", Some("0644")), Json::from("0644"));
        assert_eq!(typed_value("mode", None), Json::Null);
        // Not a value: kept as the text plan shows it.
        assert_eq!(
            typed_value("owner", Some("nobody (?)")),
            Json::from("nobody (?)")
        );
    }

    #[test]
    fn every_reason_serializes_with_its_type() {
        let reasons = [
            Reason::Blocked {
                needs: "op://v/i/f".into(),
            },
            Reason::Held,
            Reason::AfterFailed {
                id: "file:/a".into(),
            },
            Reason::Stopped,
            Reason::RolledBack {
                service: "service:x".into(),
            },
            Reason::Restarted {
                by: "file:/a".into(),
            },
            Reason::Kube(KubeFailure::Conflict),
        ];
        let types: Vec<Json> = reasons
            .iter()
            .map(|r| serde_json::to_value(EntryReason::from(r)).unwrap()["type"].clone())
            .collect();
        assert_eq!(
            types,
            [
                "blocked",
                "held",
                "after_failed",
                "stopped",
                "rolled_back",
                "restarted",
                "kube"
            ]
        );
        assert_eq!(
            serde_json::to_value(EntryReason::from(&Reason::Kube(KubeFailure::Conflict))).unwrap(),
            serde_json::json!({"type": "kube", "failure": "conflict"})
        );
    }
}
