//! The daemon's log lines about its runs, written for a person: one line
//! when a run starts and one when it ends (trigger, revision, result,
//! counts, duration); one per resource applied or failed; and one per
//! skipped resource (or reported drift) **per change**: a resource skipped
//! for the same reason run after run, or drifted under `on_drift: report`,
//! is logged once, not every poll (as `Telemetry` sends its events once).
//! Values are words (`create`, `content, mode`), never Rust debug text.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use homelab_agent_state::{Refused, RunCounts};
use tracing::field::display;
use tracing::{info, warn};

use crate::apply::{Outcome, Reason};
use crate::plan::{Action, Classification};
use crate::telemetry::RunOutcome;

/// What was logged about one target (the host, or a stack) by its last run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Seen {
    /// Skipped resources and the reason logged for them.
    skipped: HashMap<String, String>,
    /// Resources logged as drifted under `on_drift: report`.
    reported: HashSet<String>,
}

/// What the daemon has logged about each target, so a skip or a reported
/// drift that persists is not logged again.
#[derive(Debug, Default)]
pub struct RunLog {
    /// Keyed by target: `""` for the host, the stack's name for a stack.
    targets: HashMap<String, Seen>,
}

/// Where an outcome belongs: the host, or a stack.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Host,
    Stack(&'a str),
}

impl Target<'_> {
    fn key(self) -> String {
        match self {
            Target::Host => String::new(),
            Target::Stack(s) => s.to_string(),
        }
    }
}

impl Target<'_> {
    /// The `stack` field of a line: absent for the host.
    fn stack(self) -> Option<tracing::field::DisplayValue<String>> {
        match self {
            Target::Host => None,
            Target::Stack(s) => Some(display(s.to_string())),
        }
    }
}

impl RunLog {
    /// Logs each drifted host resource found by a run while applying is
    /// suspended, once per drift (as `on_drift: report` drift is).
    pub fn suspended_drift<'a>(&mut self, drifted: impl Iterator<Item = &'a str>) {
        let seen = self.targets.entry(Target::Host.key()).or_default();
        let mut now = HashSet::new();
        for id in drifted {
            if !seen.reported.contains(id) {
                info!(resource = %id, "drifted; not healed (applying is suspended)");
            }
            now.insert(id.to_string());
        }
        seen.reported = now;
    }

    /// Logs what a run did to `target`'s resources; `scrub` removes the
    /// run's secret values from error messages. Replaces what was seen of
    /// that target: a resource that stops being skipped and is skipped
    /// again later is logged again.
    pub fn outcomes(
        &mut self,
        target: Target<'_>,
        outcomes: &[Outcome],
        scrub: &dyn Fn(&str) -> String,
    ) {
        let before = self.targets.remove(&target.key()).unwrap_or_default();
        let mut now = Seen::default();
        let stack = target.stack();
        for o in outcomes {
            if o.skipped() {
                let reason = skip_reason(o);
                if before.skipped.get(&o.id) != Some(&reason) {
                    if matches!(o.reason, Some(Reason::Held)) {
                        warn!(stack, resource = %o.id, reason = %reason, "skipped: change held after a rollback");
                    } else {
                        warn!(stack, resource = %o.id, reason = %reason, "skipped: a secret did not resolve");
                    }
                }
                now.skipped.insert(o.id.clone(), reason);
                continue;
            }
            if let Some(err) = &o.error {
                warn!(stack, resource = %o.id, error = %scrub(err), "apply failed");
                continue;
            }
            if o.class == Classification::Drift && o.action == Action::Report {
                if !before.reported.contains(&o.id) {
                    info!(stack, resource = %o.id, "drifted; not healed (on_drift: report)");
                }
                now.reported.insert(o.id.clone());
                continue;
            }
            let fields = (!o.fields.is_empty()).then(|| display(o.fields.join(", ")));
            let note = o.note.as_deref().map(display);
            info!(
                stack,
                resource = %o.id,
                action = %o.action,
                classification = %o.class,
                fields,
                note,
                "applied"
            );
        }
        let mut gone: Vec<&String> = before
            .skipped
            .keys()
            .filter(|id| !now.skipped.contains_key(*id))
            .collect();
        gone.sort();
        for id in gone {
            info!(stack, resource = %id, "no longer skipped");
        }
        self.targets.insert(target.key(), now);
    }
}

/// Why a skipped outcome was skipped, in words.
fn skip_reason(o: &Outcome) -> String {
    match &o.error {
        Some(e) => e.strip_prefix("skipped: ").unwrap_or(e).to_string(),
        None => match &o.reason {
            Some(Reason::Blocked { needs }) => format!("needs {needs}"),
            _ => crate::plan::HELD
                .strip_prefix("held: ")
                .unwrap_or(crate::plan::HELD)
                .to_string(),
        },
    }
}

/// The line a run starts with.
pub fn run_started(trigger: &str) {
    info!(trigger = %trigger, "run started");
}

/// The line a run ends with: what started it, the revision it converged
/// (`none` when no revision could be used), how it ended, its counts over
/// every target and how long it took.
pub fn run_finished(
    trigger: &str,
    revision: Option<&str>,
    outcome: RunOutcome,
    counts: &RunCounts,
    took: Duration,
) {
    let took = humantime::format_duration(Duration::from_millis(took.as_millis() as u64));
    info!(
        trigger = %trigger,
        revision = %revision.unwrap_or("none"),
        result = %outcome.name(),
        created = counts.created,
        changed = counts.changed,
        drift_healed = counts.drift_healed,
        drift_reported = counts.drift_reported,
        pruned = counts.pruned,
        skipped = counts.skipped,
        failed = counts.failed,
        took = %took,
        "run finished"
    );
}

/// The line a run ends with while applying is suspended: what its plan
/// found (nothing was applied).
pub fn suspended_run(suspension: &str, planned: &crate::plan::Summary) {
    info!(
        suspended = %suspension,
        create = planned.create,
        change = planned.change,
        drift = planned.drift,
        prune = planned.prune,
        "suspended: planned only, nothing applied (agent resume applies again)"
    );
}

/// The line for a refused revision (every run it is refused in).
pub fn refused(r: &Refused) {
    warn!(
        stage = %r.stage,
        revision = %r.revision.as_deref().unwrap_or("none"),
        cause = %r.cause.name(),
        error = %r.error,
        "revision refused; staying on the last good revision"
    );
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Captures what the daemon's text log would show (no time, no colour).
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(f: impl FnOnce()) -> String {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_target(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = capture.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn outcome(id: &str, action: Action, class: Classification) -> Outcome {
        Outcome {
            id: id.into(),
            action,
            class,
            fields: Vec::new(),
            error: None,
            note: None,
            reason: None,
        }
    }

    fn blocked(id: &str, needs: &str) -> Outcome {
        Outcome {
            error: Some(format!("skipped: {needs}")),
            reason: Some(Reason::Blocked {
                needs: needs.into(),
            }),
            ..outcome(id, Action::Skip, Classification::Skipped)
        }
    }

    /// Three polls with Connect down, then the reason changes, then Connect
    /// is back: each skipped resource is logged once per reason, a reported
    /// drift once, and nothing is printed with Rust debug formatting.
    #[test]
    fn skips_are_logged_once_per_change_of_reason() {
        let down = "op://homelab/db/password: cannot reach Connect at http://127.0.0.1:[PORT]";
        let mut changed = outcome(
            "file:/srv/app/app.conf",
            Action::Update,
            Classification::Change,
        );
        changed.fields = vec!["content".into(), "mode".into()];
        let poll = vec![
            blocked("file:/srv/app/db.conf", down),
            blocked("service:app", "file:/srv/app/db.conf to be applied first"),
            outcome(
                "file:/srv/app/notes.txt",
                Action::Report,
                Classification::Drift,
            ),
        ];
        let mut first = poll.clone();
        first.push(changed);
        let mut failing = outcome(
            "file:/srv/app/broken.conf",
            Action::Create,
            Classification::Create,
        );
        failing.error = Some("cannot write: hunter2 is a directory".into());
        first.push(failing);
        let moved = "op://homelab/db/password: no field `password` in item db";
        let mut later = poll.clone();
        later[0] = blocked("file:/srv/app/db.conf", moved);
        let mut healed = outcome(
            "file:/srv/app/db.conf",
            Action::Create,
            Classification::Create,
        );
        healed.fields = vec!["content".into()];
        let scrub = |t: &str| t.replace("hunter2", "[secret]");
        let mut log = RunLog::default();
        let text = logged(|| {
            run_started("startup");
            log.outcomes(Target::Host, &first, &scrub);
            run_finished(
                "startup",
                Some("local-3f2a"),
                RunOutcome::Partial,
                &RunCounts {
                    changed: 1,
                    skipped: 2,
                    drift_reported: 1,
                    failed: 1,
                    ..RunCounts::default()
                },
                Duration::from_micros(1_234_567),
            );
            log.outcomes(Target::Host, &poll, &scrub);
            log.outcomes(Target::Host, &poll, &scrub);
            log.outcomes(Target::Host, &later, &scrub);
            log.outcomes(
                Target::Stack("web"),
                &[blocked("k8s:web/web/Secret/db", down)],
                &scrub,
            );
            log.outcomes(Target::Host, &[healed], &scrub);
            refused(&Refused {
                stage: "validate".into(),
                revision: Some("local-9c1d".into()),
                error: "modules/app/module.yaml:7: unknown key `mdoe`".into(),
                at: 0,
                cause: homelab_agent_state::RefusalCause::Invalid,
            });
        });
        assert!(
            !text.contains("Some(") && !text.contains("[\"") && !text.contains("hunter2"),
            "{text}"
        );
        insta::assert_snapshot!("daemon_run_log", text);
    }

    #[test]
    fn names_are_the_json_names() {
        for a in [
            Action::None,
            Action::Create,
            Action::Update,
            Action::Report,
            Action::Delete,
            Action::Forget,
            Action::Skip,
            Action::Restart,
        ] {
            assert_eq!(serde_json::to_value(a).unwrap(), a.name());
        }
        for c in [
            Classification::InSync,
            Classification::Create,
            Classification::Change,
            Classification::Drift,
            Classification::Prune,
            Classification::Skipped,
        ] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.name());
        }
    }
}
