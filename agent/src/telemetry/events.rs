//! Events: what a run did, one JSON line each, for Loki.
//!
//! The stream labels are only `{job="homelab-agent", host, event}` (bounded:
//! seven `event` values); everything else (resource id, kind, module,
//! revision, changed field names, trigger, error) is in the line. Lines never
//! hold file contents, diffs or secret values: a change is summarised by the
//! *names* of the fields that changed.

use std::collections::HashMap;

use crate::apply::ApplyReport;
use crate::plan::{Action, Classification, Plan};

/// The `event` label: what happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A resource was created or changed (git moved).
    Apply,
    /// A resource was found drifted (changed by hand since the last apply).
    Drift,
    /// A drifted resource was healed.
    Correction,
    /// A resource that left the desired state was removed or forgotten.
    Prune,
    /// A revision was refused (fetch, signature, validation).
    Refused,
    /// A change failed and was rolled back (service handlers).
    Rollback,
    /// Something failed: a resource, a prune, or the run.
    Error,
    /// Applying was suspended (`agent suspend`): who, and why (`note`).
    Suspend,
    /// Applying resumed (`agent resume`).
    Resume,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::Apply,
        EventKind::Drift,
        EventKind::Correction,
        EventKind::Prune,
        EventKind::Refused,
        EventKind::Rollback,
        EventKind::Error,
        EventKind::Suspend,
        EventKind::Resume,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::Apply => "apply",
            EventKind::Drift => "drift",
            EventKind::Correction => "correction",
            EventKind::Prune => "prune",
            EventKind::Refused => "refused",
            EventKind::Rollback => "rollback",
            EventKind::Error => "error",
            EventKind::Suspend => "suspend",
            EventKind::Resume => "resume",
        }
    }
}

/// Longest error text kept in an event (bytes); longer is cut at a char
/// boundary and marked, so one event stays small.
pub const MAX_ERROR_BYTES: usize = 2048;

/// One event. Serialises to the Loki line (the `event` kind is repeated in
/// the line so a `| json` query sees it too).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Event {
    pub event: EventKind,
    /// `info`, `warn` or `error`.
    pub level: &'static str,
    /// One sentence for people.
    pub msg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// What apply did: create, update, report, delete, forget, skip.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'static str>,
    /// Names of the fields that changed (`content`, `mode`, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
    /// Refused revisions and run errors: the stage or phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Unix nanoseconds when it happened (the Loki timestamp, not in the line).
    #[serde(skip)]
    pub at_ns: u128,
}

impl Event {
    pub fn new(event: EventKind, msg: impl Into<String>) -> Event {
        Event {
            event,
            level: match event {
                EventKind::Error | EventKind::Refused => "error",
                EventKind::Drift | EventKind::Rollback | EventKind::Suspend => "warn",
                _ => "info",
            },
            msg: msg.into(),
            resource: None,
            kind: None,
            module: None,
            revision: None,
            trigger: None,
            action: None,
            changes: Vec::new(),
            stage: None,
            error: None,
            note: None,
            at_ns: super::unix_nanos(),
        }
    }

    /// The JSON line.
    pub fn line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }
}

/// `s` cut to at most [`MAX_ERROR_BYTES`].
/// URL credentials are hidden too: every error of an event passes here.
pub fn truncate(s: &str) -> String {
    let s = &*crate::redact::url_credentials(s);
    if s.len() <= MAX_ERROR_BYTES {
        return s.to_string();
    }
    let mut end = MAX_ERROR_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} [cut: {} bytes in all]", &s[..end], s.len())
}

/// The events of one applied run, in the order apply reported them.
pub fn for_run(plan: &Plan, report: &ApplyReport, trigger: &str) -> Vec<Event> {
    let mut where_from: HashMap<&str, (&str, &str)> = HashMap::new();
    for e in &plan.catalog.entries {
        where_from.insert(e.id.as_str(), (e.module.as_str(), e.resource.kind()));
    }
    for p in &plan.prunes {
        where_from.insert(p.id.as_str(), (p.module.as_str(), p.kind.as_str()));
    }
    let mut out = Vec::new();
    for o in &report.outcomes {
        let (module, kind) = where_from.get(o.id.as_str()).copied().unwrap_or(("", ""));
        let base = |event: EventKind, msg: String| {
            let mut e = Event::new(event, msg);
            e.resource = Some(o.id.clone());
            e.kind = (!kind.is_empty()).then(|| kind.to_string());
            e.module = (!module.is_empty()).then(|| module.to_string());
            e.revision = Some(report.revision.clone());
            e.trigger = Some(trigger.to_string());
            e.action = Some(o.action.name());
            e.changes = o.fields.clone();
            e.note = o.note.clone();
            e
        };
        let fields = if o.fields.is_empty() {
            String::new()
        } else {
            format!(" ({})", o.fields.join(", "))
        };
        if o.class == Classification::Drift {
            let how = match (&o.error, o.action) {
                (_, Action::Report) => "reported only (on_drift: report)",
                (None, _) => "healed",
                (Some(_), _) => "heal failed",
            };
            out.push(base(
                EventKind::Drift,
                format!("{} drifted{fields}: {how}", o.id),
            ));
            if o.error.is_none() && o.action != Action::Report {
                out.push(base(
                    EventKind::Correction,
                    format!("{} healed{fields}", o.id),
                ));
            }
        }
        match (&o.error, o.class) {
            (Some(err), class) => {
                let mut e = base(
                    EventKind::Error,
                    if class == Classification::Skipped {
                        format!("{} skipped", o.id)
                    } else {
                        format!("{} failed", o.id)
                    },
                );
                if class == Classification::Skipped {
                    e.level = "warn";
                }
                e.error = Some(truncate(err));
                out.push(e);
            }
            (None, Classification::Prune) => out.push(base(
                EventKind::Prune,
                match o.action {
                    Action::Forget => format!("{} forgotten (left in place)", o.id),
                    _ => format!("{} removed", o.id),
                },
            )),
            (None, Classification::Create) => {
                out.push(base(EventKind::Apply, format!("{} created", o.id)))
            }
            (None, Classification::Change) => {
                out.push(base(EventKind::Apply, format!("{} changed{fields}", o.id)))
            }
            _ => {}
        }
        if o.rolled_back() {
            let mut e = base(
                EventKind::Rollback,
                format!("{} {}", o.id, o.note.as_deref().unwrap_or("")),
            );
            e.error = o.error.as_deref().map(truncate);
            out.push(e);
        }
    }
    out
}

/// A refused revision.
pub fn refused(stage: &str, revision: Option<&str>, error: &str, trigger: &str) -> Event {
    let mut e = Event::new(
        EventKind::Refused,
        format!(
            "revision {} refused at {stage}; staying on the last good revision",
            revision.unwrap_or("(unknown)")
        ),
    );
    e.stage = Some(stage.to_string());
    e.revision = revision.map(str::to_string);
    e.error = Some(truncate(error));
    e.trigger = Some(trigger.to_string());
    e
}

/// `agent suspend`: applying stops on this host until `agent resume`.
pub fn suspended(s: &homelab_agent_state::Suspension) -> Event {
    let mut e = Event::new(
        EventKind::Suspend,
        format!(
            "applying suspended by {}: drift is reported, nothing is applied until `agent resume`",
            s.by
        ),
    );
    e.note = (!s.reason.is_empty()).then(|| s.reason.clone());
    e
}

/// `agent resume`: applying again (`was`: the suspension that ended).
pub fn resumed(was: &homelab_agent_state::Suspension) -> Event {
    let mut e = Event::new(
        EventKind::Resume,
        format!("applying resumed (suspended by {})", was.by),
    );
    e.note = (!was.reason.is_empty()).then(|| was.reason.clone());
    e
}

/// A run that stopped before finishing (`phase` says where).
pub fn run_error(phase: &str, revision: Option<&str>, error: &str, trigger: &str) -> Event {
    let mut e = Event::new(EventKind::Error, format!("run failed at {phase}"));
    e.stage = Some(phase.to_string());
    e.revision = revision.map(str::to_string);
    e.error = Some(truncate(error));
    e.trigger = Some(trigger.to_string());
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_hold_only_what_is_set() {
        let mut e = Event::new(EventKind::Drift, "file:/a drifted (content): healed");
        e.resource = Some("file:/a".into());
        e.changes = vec!["content".into(), "mode".into()];
        let v: serde_json::Value = serde_json::from_str(&e.line()).unwrap();
        assert_eq!(v["event"], "drift");
        assert_eq!(v["level"], "warn");
        assert_eq!(v["resource"], "file:/a");
        assert_eq!(v["changes"], serde_json::json!(["content", "mode"]));
        assert!(v.get("error").is_none() && v.get("at_ns").is_none(), "{v}");
    }

    #[test]
    fn long_errors_are_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let t = truncate(&long);
        assert!(t.len() < MAX_ERROR_BYTES + 40, "{}", t.len());
        assert!(t.ends_with(&format!("[cut: {} bytes in all]", long.len())));
        assert_eq!(truncate("short"), "short");
    }
}
