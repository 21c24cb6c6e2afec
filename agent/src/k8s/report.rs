//! The stack part of `agent plan` and `agent apply` output (text and JSON),
//! printed after the native resources. Only reads. Secret values are never
//! in a plan to begin with (changes of Secret data carry no value).

use std::fmt::Write;

use super::apply::StackReport;
use super::client::describe_conflicts;
use super::plan::{forces, total, StackPlan, StackStatus};
use crate::desired::catalog::Catalog;
use crate::plan::{Action, Classification};
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
                            let _ = writeln!(out, "  = {}", o.id);
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

/// `--json`: one object per stack.
pub fn plan_json(catalog: &Catalog, plans: &[StackPlan]) -> serde_json::Value {
    let stacks: Vec<serde_json::Value> = plans
        .iter()
        .map(|p| {
            let stack = &catalog.stacks[p.index];
            let (status, reason) = match &p.status {
                StackStatus::Planned => ("planned", None),
                StackStatus::NotChecked(r) => ("not_checked", Some(r.clone())),
                StackStatus::Failed(e) => ("error", Some(e.message.clone())),
            };
            let mut objects: Vec<serde_json::Value> = Vec::new();
            if matches!(p.status, StackStatus::NotChecked(_)) {
                let mut listed: Vec<&super::DesiredObject> = stack.objects.iter().collect();
                listed.sort_by_key(|o| (super::kind_rank(&o.reference.kind), o.id.clone()));
                for o in listed {
                    objects.push(serde_json::json!({
                        "id": o.id,
                        "apiVersion": o.api_version,
                        "kind": o.reference.kind,
                        "namespace": o.reference.namespace,
                        "name": o.reference.name,
                        "action": if o.blocked.is_some() { Action::Skip } else { Action::None },
                        "classification": if o.blocked.is_some() { Some(Classification::Skipped) } else { None },
                        "on_drift": o.on_drift,
                    }));
                }
            }
            for o in &p.objects {
                let obj = &stack.objects[o.index];
                objects.push(serde_json::json!({
                    "id": o.id,
                    "apiVersion": obj.api_version,
                    "kind": obj.reference.kind,
                    "namespace": o.namespace,
                    "name": obj.reference.name,
                    "action": o.action,
                    "classification": o.class,
                    "on_drift": obj.on_drift,
                    "changes": o.changes,
                    "conflicts": o.conflicts,
                    "notes": o.notes,
                    "error": o.error,
                }));
            }
            for pr in &p.prunes {
                objects.push(serde_json::json!({
                    "id": pr.id,
                    "kind": pr.reference.kind,
                    "namespace": pr.reference.namespace,
                    "name": pr.reference.name,
                    "action": pr.action,
                    "classification": Classification::Prune,
                    "note": pr.note,
                }));
            }
            serde_json::json!({
                "name": p.name,
                "namespace": stack.spec.namespace,
                "cluster": stack.access,
                "status": status,
                "reason": reason,
                "objects": objects,
                "summary": p.summary(),
            })
        })
        .collect();
    serde_json::Value::Array(stacks)
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
