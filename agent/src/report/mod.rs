//! Stage 5, *report*: turns plans and apply reports into CLI text and JSON.
//! Only reads what earlier stages produced.

pub mod json;

use std::fmt::Write;

use crate::apply::ApplyReport;
use crate::plan::{Action, Classification, Plan, Summary};

/// ANSI colours, used only when writing to a terminal.
#[derive(Clone, Copy)]
pub struct Style {
    pub color: bool,
}

impl Style {
    pub(crate) fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
}

/// The plan symbol of a classification and its ANSI colour.
pub(crate) fn symbol(class: Classification) -> (&'static str, &'static str) {
    match class {
        Classification::Create => ("+", "32"),
        Classification::Change => ("~", "33"),
        Classification::Prune => ("-", "31"),
        Classification::Drift => ("!", "35"),
        Classification::InSync => (" ", "0"),
        Classification::Skipped => ("?", "33"),
    }
}

/// The plan as a human reads it: a header, one block per resource that is
/// not in sync (with field changes and content diffs), errors, and the
/// summary line.
pub fn plan_text(plan: &Plan, sandbox: Option<&str>, style: Style) -> String {
    let mut out = String::new();
    let host = &plan.catalog.host;
    let _ = writeln!(
        out,
        "Plan for host {} ({}) at revision {}",
        host.name,
        host.platform.name(),
        plan.catalog.revision
    );
    if let Some(root) = sandbox {
        let _ = writeln!(
            out,
            "Sandbox: paths under {root}; owner and group are not enforced."
        );
    }
    out.push('\n');
    for p in &plan.resources {
        let entry = &plan.catalog.entries[p.index];
        if p.class == Classification::InSync {
            if let Some(note) = p.note {
                let _ = writeln!(
                    out,
                    "  {}  (module {}) {note}",
                    style.paint("1", &entry.id),
                    entry.module
                );
            }
            continue;
        }
        let (sym, color) = symbol(p.class);
        let blocked;
        let why = match (p.class, p.action) {
            (Classification::Skipped, _) => {
                blocked = match (&entry.blocked, p.note) {
                    (Some(b), _) => format!(" skipped: needs {b}"),
                    (None, Some(note)) => format!(" skipped: {note}"),
                    (None, None) => " skipped".to_string(),
                };
                blocked.as_str()
            }
            (Classification::Drift, Action::Report) => " drifted; on_drift: report, left alone",
            (Classification::Drift, _) => " drifted; will be healed",
            _ => "",
        };
        let note = p
            .note
            .filter(|_| p.class != Classification::Skipped)
            .map(|n| format!(" [{n}]"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{} {}  (module {}){why}{note}",
            style.paint(color, sym),
            style.paint("1", &entry.id),
            entry.module
        );
        for c in &p.changes {
            let old = c.old.as_deref().unwrap_or("(none)");
            let new = c.new.as_deref().unwrap_or("(none)");
            let _ = writeln!(out, "    {}: {old} -> {new}", c.field);
            if let Some(diff) = &c.diff {
                for line in diff.lines() {
                    let painted = match line.as_bytes().first() {
                        Some(b'+') if !line.starts_with("+++") => style.paint("32", line),
                        Some(b'-') if !line.starts_with("---") => style.paint("31", line),
                        Some(b'@') => style.paint("36", line),
                        _ => line.to_string(),
                    };
                    let _ = writeln!(out, "      {painted}");
                }
            }
        }
    }
    for p in &plan.prunes {
        let (sym, color) = symbol(Classification::Prune);
        let what = match p.action {
            Action::Forget => {
                "will be forgotten: it existed before the agent managed it, so it stays in place"
            }
            _ => "will be removed: the agent created it and it left the desired state",
        };
        let _ = writeln!(
            out,
            "{} {}  (module {}) {what}",
            style.paint(color, sym),
            style.paint("1", &p.id),
            p.module
        );
    }
    for f in &plan.failures {
        let _ = writeln!(out, "{} {}: {}", style.paint("31", "error:"), f.id, f.error);
    }
    let s = plan.summary();
    if !plan.has_changes() && s.errors == 0 {
        let _ = writeln!(out, "No changes: {} resource(s) in sync.", s.in_sync);
    }
    out.push('\n');
    out.push_str(&summary_line("Plan", &s));
    out
}

fn summary_line(word: &str, s: &Summary) -> String {
    let mut line = format!(
        "{word}: {} to create, {} to change, {} to prune, {} drifted.",
        s.create, s.change, s.prune, s.drift
    );
    if s.skipped > 0 {
        let _ = write!(line, " {} skipped.", s.skipped);
    }
    if s.errors > 0 {
        let _ = write!(line, " {} error(s).", s.errors);
    }
    line.push('\n');
    line
}

/// What a limited run covers, for its reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// The selectors (normalised).
    pub targets: Vec<String>,
    /// Host resources in the run (selected, what they come after, the
    /// services they notify) and in the whole desired state.
    pub resources: usize,
    pub of_resources: usize,
    /// Stacks in the run and in the whole desired state.
    pub stacks: usize,
    pub of_stacks: usize,
    /// Leftovers named by id (in the inventory, no longer declared): the
    /// run prunes them.
    pub leftovers: usize,
}

/// What a limited run (`--target`) covers, printed before its plan: the
/// selectors and how much of the desired state they take in.
pub fn limit_text(limit: &Limit) -> String {
    let mut line = format!(
        "Limited to --target {}: {} of {} host resource(s) (with what they come after and the services they notify)",
        limit.targets.join(", --target "),
        limit.resources,
        limit.of_resources
    );
    if limit.of_stacks > 0 {
        let _ = write!(line, ", {} of {} stack(s)", limit.stacks, limit.of_stacks);
    }
    if limit.leftovers > 0 {
        let _ = write!(
            line,
            ", {} leftover(s) named by id that the desired state no longer declares",
            limit.leftovers
        );
    }
    line.push_str("; the rest was not compared.\n\n");
    line
}

/// The warning after a limited apply (as terraform's after `-target`).
pub fn limit_warning(limit: &Limit) -> String {
    format!(
        "\nWarning: this apply was limited to --target {}. The rest of the desired state was not \
         compared or applied, so the host may not match it until a whole `agent apply` (or the \
         daemon's next run); the host's applied revision is unchanged.\n",
        limit.targets.join(", --target ")
    )
}

/// What apply did, one line per resource touched, then a summary.
pub fn apply_text(report: &ApplyReport, style: Style) -> String {
    let mut out = String::new();
    for o in &report.outcomes {
        let (sym, color) = symbol(o.class);
        let verb = match (o.class, o.action) {
            (_, Action::Report) => "drift reported, left alone (on_drift: report)",
            (Classification::Drift, _) => "drift healed",
            (_, Action::Create) => "created",
            (_, Action::Update) => "updated",
            (_, Action::Delete) => "removed",
            (_, Action::Forget) => "forgotten (left in place)",
            (_, Action::Restart) => "restarted",
            _ => "unchanged",
        };
        let fields = if o.fields.is_empty() {
            String::new()
        } else {
            format!(" ({})", o.fields.join(", "))
        };
        // Not applied because of something else (a secret, a hold, a
        // dependency that failed): a question mark, not a failure of its own.
        let not_reached =
            o.skipped() || matches!(o.reason, Some(crate::apply::Reason::AfterFailed { .. }));
        match &o.error {
            Some(err) if not_reached => {
                let _ = writeln!(out, "{} {} {err}", style.paint("33", "?"), o.id);
            }
            Some(err) => {
                let _ = writeln!(out, "{} {}: {}", style.paint("31", "failed"), o.id, err);
            }
            None => {
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
    let c = &report.counts;
    if report.outcomes.is_empty() {
        let _ = writeln!(out, "Nothing to do: {} resource(s) in sync.", c.unchanged);
    }
    let _ = writeln!(
        out,
        "\nApply: {} created, {} changed, {} pruned, {} drifted ({} healed, {} reported). {} failed, {} skipped.",
        c.created,
        c.changed,
        c.pruned,
        c.drift_healed + c.drift_reported,
        c.drift_healed,
        c.drift_reported,
        c.failed,
        c.skipped
    );
    out
}
