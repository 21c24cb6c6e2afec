//! The stack part of `agent plan` and `agent apply` output (text and JSON),
//! printed after the native resources. Only reads. Secret values are never
//! in a plan to begin with (changes of Secret data carry no value).

use std::fmt::Write;

use super::apply::StackReport;
use super::client::describe_conflicts;
use super::plan::{forces, total, StackPlan, StackStatus};
use crate::desired::catalog::Catalog;
use crate::plan::{Action, Classification};
use crate::report::json::{
    merge_outcomes, summarize, Change, Entry, EntryClass, EntryReason, ObjectFields, StackDoc,
};
use crate::report::{symbol, Style};

/// The plans of the host's stacks, then one summary line. Empty when the
/// host owns no stack.
pub fn plan_text(catalog: &Catalog, plans: &[StackPlan], style: Style) -> String {
    let mut out = String::new();
    if plans.is_empty() {
        return out;
    }
    for p in plans {
        let stack = &catalog.stacks[p.index];
        let _ = write!(
            out,
            "\nStack {} (namespace {}, {})",
            style.paint("1", &p.name),
            stack.spec.namespace,
            stack.access.describe()
        );
        match &p.status {
            StackStatus::NotChecked(why) => {
                let _ = writeln!(out, ": not checked: {why}");
                let _ = writeln!(
                    out,
                    "  {} object(s) in the desired state, not compared with a cluster:",
                    stack.objects.len()
                );
                let mut listed: Vec<&super::DesiredObject> = stack.objects.iter().collect();
                listed.sort_by_key(|o| (super::kind_rank(&o.reference.kind), o.id.clone()));
                for o in listed {
                    match &o.blocked {
                        Some(b) => {
                            let _ =
                                writeln!(out, "  {} {}  needs {b}", style.paint("33", "?"), o.id);
                        }
                        None => {
                            let _ =
                                writeln!(out, "  {} {}  not checked", style.paint("33", "?"), o.id);
                        }
                    }
                }
                continue;
            }
            StackStatus::Failed(e) => {
                let _ = writeln!(
                    out,
                    ": {} {}",
                    style.paint("31", "error:"),
                    e.message.replace('\n', "\n  ")
                );
                continue;
            }
            StackStatus::Planned => out.push('\n'),
        }
        let mut shown = 0;
        for o in &p.objects {
            let obj = &stack.objects[o.index];
            if let Some(e) = &o.error {
                shown += 1;
                let _ = writeln!(
                    out,
                    "{} {}  ({}:{}): {e}",
                    style.paint("31", "error:"),
                    o.id,
                    obj.file,
                    obj.line
                );
                continue;
            }
            if o.class == Classification::InSync {
                continue;
            }
            shown += 1;
            let (sym, color) = symbol(o.class);
            let why = match (o.class, o.action) {
                (Classification::Skipped, _) => format!(
                    " skipped: needs {}",
                    obj.blocked.as_deref().unwrap_or("a secret")
                ),
                (Classification::Drift, Action::Report) => {
                    " drifted; on_drift: report, left alone".to_string()
                }
                (Classification::Drift, _) => " drifted; will be healed".to_string(),
                (_, _) if o.pending_crd => " (its CRD is created first)".to_string(),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "{} {}{why}",
                style.paint(color, sym),
                style.paint("1", &o.id)
            );
            for c in &o.changes {
                let _ = writeln!(
                    out,
                    "    {}: {} -> {}",
                    c.path,
                    c.old.as_deref().unwrap_or("(none)"),
                    c.new.as_deref().unwrap_or("(none)")
                );
            }
            for n in &o.notes {
                let _ = writeln!(out, "    note: {n}");
            }
            if !o.conflicts.is_empty() {
                let _ = writeln!(
                    out,
                    "    conflict: {}; {}",
                    describe_conflicts(&o.conflicts),
                    if forces(stack, o) {
                        "will be taken over (force)"
                    } else if o.conflicts.iter().any(|c| c.controller) {
                        "a controller's fields are never forced: apply will fail; remove them from the manifest to leave them to it"
                    } else {
                        "apply will fail unless the stack says force_conflicts: true"
                    }
                );
            }
        }
        for pr in &p.prunes {
            shown += 1;
            let (sym, color) = symbol(Classification::Prune);
            let what = match (pr.action, &pr.note) {
                (Action::Delete, Some(n)) => format!("will be deleted: it left the stack; {n}"),
                (Action::Delete, None) => "will be deleted: it left the stack".to_string(),
                (Action::Forget, Some(n)) => format!("will be forgotten: {n}"),
                (_, Some(n)) => n.clone(),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "{} {}  {what}",
                style.paint(color, sym),
                style.paint("1", &pr.id)
            );
        }
        if shown == 0 {
            let _ = writeln!(out, "  No changes: {} object(s) in sync.", p.objects.len());
        }
    }
    let s = total(plans);
    let mut line = format!(
        "\nStacks: {} to create, {} to change, {} to prune, {} drifted.",
        s.create, s.change, s.prune, s.drift
    );
    if s.skipped > 0 {
        let _ = write!(line, " {} skipped (secrets).", s.skipped);
    }
    if s.conflicts > 0 {
        let _ = write!(line, " {} conflict(s).", s.conflicts);
    }
    if s.errors > 0 {
        let _ = write!(line, " {} error(s).", s.errors);
    }
    if s.not_checked > 0 {
        let _ = write!(line, " {} not checked (no cluster).", s.not_checked);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// The entries of one stack's plan: every object (not checked, with the
/// stack's reason, when the stack was not compared with a cluster), then
/// prunes.
fn stack_entries(stack: &super::Stack, p: &StackPlan) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::new();
    let object =
        |o: &super::DesiredObject, namespace: Option<String>, conflicts: serde_json::Value| {
            ObjectFields {
                api_version: Some(o.api_version.clone()),
                namespace,
                name: o.reference.name.clone(),
                conflicts,
            }
        };
    if let StackStatus::NotChecked(why) = &p.status {
        let mut listed: Vec<&super::DesiredObject> = stack.objects.iter().collect();
        listed.sort_by_key(|o| (super::kind_rank(&o.reference.kind), o.id.clone()));
        for o in listed {
            let (classification, action, reason) = match &o.blocked {
                Some(b) => (
                    EntryClass::Skipped,
                    Action::Skip,
                    EntryReason::Blocked { needs: b.clone() },
                ),
                None => (
                    EntryClass::NotChecked,
                    Action::None,
                    EntryReason::NotChecked { why: why.clone() },
                ),
            };
            out.push(Entry {
                id: o.id.clone(),
                kind: o.reference.kind.clone(),
                module: p.name.clone(),
                classification,
                action,
                on_drift: Some(o.on_drift),
                changes: Vec::new(),
                reason: Some(reason),
                error: None,
                note: None,
                object: Some(object(
                    o,
                    o.reference.namespace.clone(),
                    serde_json::json!([]),
                )),
            });
        }
    }
    for o in &p.objects {
        let obj = &stack.objects[o.index];
        let (classification, reason) = match (&o.error, o.class, &obj.blocked) {
            (Some(e), _, _) => (
                EntryClass::Error,
                Some(EntryReason::Kube { failure: e.kind }),
            ),
            (None, Classification::Skipped, Some(b)) => (
                EntryClass::Skipped,
                Some(EntryReason::Blocked { needs: b.clone() }),
            ),
            (None, Classification::Skipped, None) => (EntryClass::Skipped, Some(EntryReason::Held)),
            (None, class, _) => (class.into(), None),
        };
        out.push(Entry {
            id: o.id.clone(),
            kind: obj.reference.kind.clone(),
            module: p.name.clone(),
            classification,
            action: o.action,
            on_drift: Some(obj.on_drift),
            changes: o.changes.iter().map(object_change).collect(),
            reason,
            error: o.error.as_ref().map(|e| e.message.clone()),
            note: (!o.notes.is_empty()).then(|| o.notes.join("; ")),
            object: Some(object(
                obj,
                o.namespace.clone(),
                serde_json::to_value(&o.conflicts).unwrap_or_default(),
            )),
        });
    }
    for pr in &p.prunes {
        out.push(Entry {
            id: pr.id.clone(),
            kind: pr.reference.kind.clone(),
            module: p.name.clone(),
            classification: EntryClass::Prune,
            action: pr.action,
            on_drift: None,
            changes: Vec::new(),
            reason: None,
            error: None,
            note: pr.note.clone(),
            object: Some(ObjectFields {
                api_version: None,
                namespace: pr.reference.namespace.clone(),
                name: pr.reference.name.clone(),
                conflicts: serde_json::json!([]),
            }),
        });
    }
    out
}

/// A stack object's change: old and new are the JSON values themselves
/// (Secret data and values cut at 200 characters stay descriptions).
fn object_change(c: &super::diff::ObjectChange) -> Change {
    let value = |v: &Option<String>| match v {
        None => serde_json::Value::Null,
        Some(text) => {
            serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.clone()))
        }
    };
    Change {
        field: c.path.clone(),
        old: value(&c.old),
        new: value(&c.new),
        diff: None,
    }
}

fn stack_doc(
    catalog: &Catalog,
    p: &StackPlan,
    objects: Vec<Entry>,
    summary: crate::plan::Summary,
) -> StackDoc {
    let stack = &catalog.stacks[p.index];
    let (status, reason) = match &p.status {
        StackStatus::Planned => ("planned", None),
        StackStatus::NotChecked(r) => ("not_checked", Some(r.clone())),
        StackStatus::Failed(e) => ("error", Some(e.message.clone())),
    };
    StackDoc {
        name: p.name.clone(),
        namespace: stack.spec.namespace.clone(),
        cluster: serde_json::to_value(&stack.access).unwrap_or_default(),
        status,
        reason,
        objects,
        summary,
        counts: None,
    }
}

/// `--json` of a plan: one document per stack (see `report::json`).
pub fn plan_json(catalog: &Catalog, plans: &[StackPlan]) -> Vec<StackDoc> {
    plans
        .iter()
        .map(|p| {
            let entries = stack_entries(&catalog.stacks[p.index], p);
            let summary = summarize(&entries);
            stack_doc(catalog, p, entries, summary)
        })
        .collect()
}

/// `--json` of an apply: each stack's planned entries as apply left them,
/// with apply's counts; `status` is `applied` unless the stack was not
/// checked or failed as a whole.
pub fn apply_json(
    catalog: &Catalog,
    plans: &[StackPlan],
    reports: &[StackReport],
) -> Vec<StackDoc> {
    plans
        .iter()
        .map(|p| {
            let planned = stack_entries(&catalog.stacks[p.index], p);
            let summary = summarize(&planned);
            let report = reports.iter().find(|r| r.name == p.name);
            let entries = match report {
                Some(r) => merge_outcomes(planned, &r.outcomes),
                None => planned,
            };
            let mut doc = stack_doc(catalog, p, entries, summary);
            if let Some(r) = report {
                doc.counts = Some(r.counts.clone());
                (doc.status, doc.reason) = match (&r.not_checked, &r.error) {
                    (Some(why), _) => ("not_checked", Some(why.clone())),
                    (None, Some(e)) => ("error", Some(e.message.clone())),
                    (None, None) => ("applied", None),
                };
            }
            doc
        })
        .collect()
}

/// What apply did to each stack, then a summary line. Empty without stacks.
pub fn apply_text(reports: &[StackReport], style: Style) -> String {
    let mut out = String::new();
    if reports.is_empty() {
        return out;
    }
    let mut total = homelab_agent_state::RunCounts::default();
    let mut not_checked = 0;
    let mut failed_stacks = 0;
    for r in reports {
        if let Some(why) = &r.not_checked {
            not_checked += 1;
            let _ = writeln!(out, "\nStack {}: not checked: {why}", r.name);
            continue;
        }
        if let Some(e) = &r.error {
            failed_stacks += 1;
            let _ = writeln!(
                out,
                "\nStack {}: {} {}",
                r.name,
                style.paint("31", "failed:"),
                e.message.replace('\n', "\n  ")
            );
        } else {
            let _ = writeln!(out, "\nStack {}:", r.name);
        }
        for o in &r.outcomes {
            let (sym, color) = symbol(o.class);
            let verb = match (o.class, o.action) {
                (_, Action::Report) => "drift reported, left alone (on_drift: report)",
                (Classification::Drift, _) => "drift healed",
                (_, Action::Create) => "created",
                (_, Action::Update) => "updated",
                (_, Action::Delete) => "deleted",
                (_, Action::Forget) => "forgotten",
                _ => "unchanged",
            };
            match &o.error {
                Some(err) if o.skipped() => {
                    let _ = writeln!(out, "{} {} {err}", style.paint("33", "?"), o.id);
                }
                Some(err) => {
                    let _ = writeln!(out, "{} {}: {err}", style.paint("31", "failed"), o.id);
                }
                None => {
                    let fields = if o.fields.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", o.fields.join(", "))
                    };
                    let note = o
                        .note
                        .as_ref()
                        .map(|n| format!("; {n}"))
                        .unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "{} {} {verb}{fields}{note}",
                        style.paint(color, sym),
                        o.id
                    );
                }
            }
        }
        if r.outcomes.is_empty() && r.error.is_none() {
            let _ = writeln!(
                out,
                "  Nothing to do: {} object(s) in sync.",
                r.counts.unchanged
            );
        }
        let c = &r.counts;
        total.created += c.created;
        total.changed += c.changed;
        total.pruned += c.pruned;
        total.drift_healed += c.drift_healed;
        total.drift_reported += c.drift_reported;
        total.failed += c.failed;
        total.skipped += c.skipped;
    }
    let _ = write!(
        out,
        "\nStacks: {} created, {} changed, {} pruned, {} drifted ({} healed, {} reported). {} failed, {} skipped.",
        total.created,
        total.changed,
        total.pruned,
        total.drift_healed + total.drift_reported,
        total.drift_healed,
        total.drift_reported,
        total.failed,
        total.skipped
    );
    if failed_stacks > 0 {
        let _ = write!(out, " {failed_stacks} stack(s) failed.");
    }
    if not_checked > 0 {
        let _ = write!(out, " {not_checked} not checked (no cluster).");
    }
    out.push('\n');
    out
}

/// A line per stack that left the host but still has objects in the inventory.
pub fn orphans_text(orphans: &[(String, usize)]) -> String {
    let mut out = String::new();
    for (stack, n) in orphans {
        let _ = writeln!(
            out,
            "\nStack {stack} is no longer listed by this host: its {n} object(s) stay in the cluster and in the inventory.\n  To delete them, list it again with its manifests removed and apply (prune), then drop it."
        );
    }
    out
}
