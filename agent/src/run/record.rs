//! The one place a run's results are written to the state: the run record
//! (with every target's counts), the applied revision, and what the source
//! stage decided (fetched, last good and refused revisions, a revision
//! picked by hand). Apply writes only the inventory of what it did.

use homelab_agent_state::{Refused, RunCounts, RunRecord, RunResult, StateError, Store};

use crate::apply::ApplyReport;
use crate::k8s::apply::StackReport;

/// Which run is recorded.
pub struct RunInfo<'a> {
    /// What started it: `cli`, `poll`, ...
    pub trigger: &'a str,
    pub revision: &'a str,
    /// The `--target` selectors of a limited run (empty: a whole run).
    pub targets: &'a [String],
}

/// Records a finished run: its counts (the host's and every stack's), its
/// result and first error; the revision as applied when none of the host's
/// resources failed (skipped ones do not count against it, so a host with
/// a secret that does not resolve still gets an applied, and then a last
/// good, revision to fall back to); and the time of the last run in which
/// nothing failed. One transaction. A limited run (`--target`) is recorded
/// with its targets and moves neither the applied revision nor the last
/// success: the host was not converged as a whole.
pub fn finish_run(
    store: &Store,
    host: &str,
    run: &RunInfo<'_>,
    native: &ApplyReport,
    stacks: &[StackReport],
) -> Result<RunRecord, StateError> {
    let mut record = run_record(run.trigger, run.revision, native, stacks);
    record.targets = run.targets.to_vec();
    let whole = run.targets.is_empty();
    let host_applied = whole && native.counts.failed == 0;
    let succeeded = whole && !record.result.failed();
    let revision = run.revision;
    store.write(host, |w| {
        if host_applied || succeeded {
            let at = native.finished_ms / 1000;
            w.update_host(|h| {
                if host_applied {
                    h.applied_revision = Some(revision.to_string());
                    h.applied_at = Some(at);
                }
                if succeeded {
                    h.last_success_at = Some(record.finished_ms / 1000);
                }
            })?;
        }
        w.add_run(&record)
    })?;
    Ok(record)
}

/// The run record of a run. The result: `Partial` (or `Failed` when
/// nothing was changed) when anything failed, host or stack; else
/// `Skipped` when anything was skipped; else `Success`.
fn run_record(
    trigger: &str,
    revision: &str,
    native: &ApplyReport,
    stacks: &[StackReport],
) -> RunRecord {
    let mut counts = native.counts.clone();
    let mut error = native.first_error.clone();
    for s in stacks {
        add(&mut counts, &s.counts);
        counts.failed += u32::from(s.error.is_some());
        let first = s
            .error
            .as_ref()
            .map(|e| format!("stack {}: {e}", s.name))
            .or_else(|| {
                s.outcomes
                    .iter()
                    .find_map(|o| o.error.as_ref().map(|e| format!("{}: {e}", o.id)))
            });
        error = error.or(first);
    }
    let result = result_of(&counts);
    RunRecord {
        started_ms: native.started_ms,
        finished_ms: crate::apply::now_ms(),
        trigger: trigger.to_string(),
        revision: revision.to_string(),
        counts,
        result,
        error,
        targets: Vec::new(),
    }
}

/// The result rule, from the counts of every target together (a stack
/// that failed as a whole counts one failure).
pub fn result_of(c: &RunCounts) -> RunResult {
    if c.failed > 0 {
        if c.created + c.changed + c.drift_healed + c.pruned > 0 {
            RunResult::Partial
        } else {
            RunResult::Failed
        }
    } else if c.skipped > 0 {
        RunResult::Skipped
    } else {
        RunResult::Success
    }
}

fn add(into: &mut RunCounts, c: &RunCounts) {
    into.created += c.created;
    into.changed += c.changed;
    into.pruned += c.pruned;
    into.drift_healed += c.drift_healed;
    into.drift_reported += c.drift_reported;
    into.unchanged += c.unchanged;
    into.skipped += c.skipped;
    into.failed += c.failed;
}

/// `agent apply --rev`: a revision picked by hand, kept by the daemon
/// until a newer fetch.
pub fn manual_override(
    store: &Store,
    host: &str,
    fetched: Option<String>,
) -> Result<(), StateError> {
    store.write(host, |w| {
        w.update_host(|h| {
            if fetched.is_some() {
                h.fetched_revision = fetched.clone();
            }
            h.manual_override = h.fetched_revision.clone().or(Some(String::new()));
        })
    })
}

/// What the daemon's source stage decided for a run.
pub struct SourceResult<'a> {
    /// The commit fetched for the followed ref, if a fetch happened.
    pub fetched: Option<&'a str>,
    /// The revision the run converged, and whether it was the candidate
    /// (not refused): such a revision, once applied, is the last good one.
    pub converged: Option<(&'a str, bool)>,
    pub refused: Option<&'a Refused>,
}

/// Records the source stage's decision: the fetched revision, the last
/// good one, a refusal, and the end of a manual override once the followed
/// ref moves on.
pub fn source_result(store: &Store, host: &str, r: &SourceResult<'_>) -> Result<(), StateError> {
    store.write(host, |w| {
        w.update_host(|h| {
            if let Some(f) = r.fetched {
                h.fetched_revision = Some(f.to_string());
            }
            if let Some((revision, true)) = r.converged {
                if h.applied_revision.as_deref() == Some(revision) {
                    h.last_good_revision = Some(revision.to_string());
                }
            }
            if r.converged.is_some()
                && h.manual_override.is_some()
                && r.fetched.is_some()
                && h.manual_override.as_deref() != r.fetched
            {
                h.manual_override = None;
            }
            h.refused = r.refused.cloned();
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{KubeFailure, Outcome, Reason};
    use crate::k8s::client::Failure;
    use crate::plan::{Action, Classification};

    fn info<'a>(trigger: &'a str, revision: &'a str) -> RunInfo<'a> {
        RunInfo {
            trigger,
            revision,
            targets: &[],
        }
    }

    /// A limited run is recorded with its targets and moves neither the
    /// applied revision nor the last success; the next whole run does.
    #[test]
    fn a_limited_run_is_recorded_but_applies_no_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let host = native(RunCounts {
            created: 1,
            ..RunCounts::default()
        });
        let targets = ["module:app".to_string()];
        let limited = RunInfo {
            trigger: "cli",
            revision: "r1",
            targets: &targets,
        };
        let r = finish_run(&store, "lab", &limited, &host, &[]).unwrap();
        assert_eq!(r.result, RunResult::Success);
        assert_eq!(r.targets, targets);
        assert_eq!(store.host("lab").unwrap(), Default::default());
        assert_eq!(store.runs("lab", 10).unwrap(), [r]);
        finish_run(&store, "lab", &info("cli", "r1"), &host, &[]).unwrap();
        let h = store.host("lab").unwrap();
        assert_eq!(h.applied_revision.as_deref(), Some("r1"));
        assert!(h.last_success_at.is_some());
    }

    fn native(counts: RunCounts) -> ApplyReport {
        ApplyReport {
            outcomes: Vec::new(),
            counts,
            revision: "r1".into(),
            prune_duration: Default::default(),
            started_ms: 1,
            finished_ms: 2,
            first_error: None,
        }
    }

    /// Stack `web`, failed as a whole: its cluster could not be reached.
    fn unreachable_stack() -> StackReport {
        StackReport {
            name: "web".into(),
            not_checked: None,
            error: Some(Failure::new(KubeFailure::Connect, "cannot reach")),
            outcomes: Vec::new(),
            counts: RunCounts::default(),
            health_wait: Default::default(),
        }
    }

    #[test]
    fn a_failed_stack_makes_a_good_host_run_partial_and_names_its_error() {
        let host = native(RunCounts {
            created: 2,
            ..RunCounts::default()
        });
        let stack = StackReport {
            name: "web".into(),
            not_checked: None,
            error: None,
            outcomes: vec![Outcome {
                id: "k8s:web/web/Deployment.apps/web".into(),
                action: Action::Update,
                class: Classification::Change,
                fields: Vec::new(),
                error: Some("unhealthy: ImagePullBackOff".into()),
                note: None,
                reason: Some(Reason::Kube(KubeFailure::Timeout)),
            }],
            counts: RunCounts {
                failed: 1,
                ..RunCounts::default()
            },
            health_wait: Default::default(),
        };
        let r = run_record("cli", "r1", &host, &[stack]);
        assert_eq!(r.result, RunResult::Partial);
        assert_eq!(r.counts.created, 2);
        assert_eq!(r.counts.failed, 1);
        assert_eq!(
            r.error.as_deref(),
            Some("k8s:web/web/Deployment.apps/web: unhealthy: ImagePullBackOff")
        );
    }

    #[test]
    fn a_stack_that_could_not_connect_fails_a_run_that_did_nothing() {
        let stack = unreachable_stack();
        let r = run_record("poll", "r1", &native(RunCounts::default()), &[stack]);
        assert_eq!(r.result, RunResult::Failed);
        assert_eq!(r.counts.failed, 1);
        assert_eq!(r.error.as_deref(), Some("stack web: cannot reach"));
    }

    /// A run that only skipped (an unresolved secret) is not a failed run:
    /// its revision is applied and it counts as the last success; a failed
    /// resource keeps both where they were.
    #[test]
    fn a_run_that_only_skipped_is_applied_and_a_failed_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let host = native(RunCounts {
            changed: 1,
            skipped: 1,
            ..RunCounts::default()
        });
        let r = finish_run(&store, "lab", &info("cli", "r1"), &host, &[]).unwrap();
        assert_eq!(r.result, RunResult::Skipped);
        let h = store.host("lab").unwrap();
        assert_eq!(h.applied_revision.as_deref(), Some("r1"));
        assert_eq!(h.applied_at, Some(0));
        assert_eq!(h.last_success_at, Some(r.finished_ms / 1000));
        let failing = native(RunCounts {
            changed: 1,
            skipped: 1,
            failed: 1,
            ..RunCounts::default()
        });
        let r = finish_run(&store, "lab", &info("cli", "r2"), &failing, &[]).unwrap();
        assert_eq!(r.result, RunResult::Partial);
        assert_eq!(store.host("lab").unwrap(), h, "nothing moved");
        assert_eq!(store.runs("lab", 10).unwrap().len(), 2);
    }

    /// A failed stack: the host's revision is applied, the run is no success.
    #[test]
    fn a_failed_stack_applies_the_host_revision_but_is_no_success() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let stack = unreachable_stack();
        let r = finish_run(
            &store,
            "lab",
            &info("poll", "r1"),
            &native(RunCounts::default()),
            &[stack],
        )
        .unwrap();
        assert_eq!(r.result, RunResult::Failed);
        let h = store.host("lab").unwrap();
        assert_eq!(h.applied_revision.as_deref(), Some("r1"));
        assert_eq!(h.last_success_at, None);
    }

    #[test]
    fn the_result_rule() {
        let c = |created, skipped, failed| RunCounts {
            created,
            skipped,
            failed,
            ..RunCounts::default()
        };
        assert_eq!(result_of(&c(0, 0, 0)), RunResult::Success);
        assert_eq!(result_of(&c(1, 0, 0)), RunResult::Success);
        assert_eq!(result_of(&c(0, 2, 0)), RunResult::Skipped);
        assert_eq!(result_of(&c(1, 2, 0)), RunResult::Skipped);
        assert_eq!(result_of(&c(1, 2, 1)), RunResult::Partial);
        assert_eq!(result_of(&c(0, 2, 1)), RunResult::Failed);
    }
}
