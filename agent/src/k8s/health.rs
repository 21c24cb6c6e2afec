//! Health of workloads (pure): is a Deployment, StatefulSet or DaemonSet
//! rolled out, is a Job complete? The wait loop lives in `apply.rs`.

use serde_json::Value as Json;

/// What a live object says about its rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ready,
    /// Still rolling out; why, for the timeout message.
    Progressing(String),
    /// Will not get better by waiting (a failed Job, a Deployment past its
    /// progress deadline).
    Failed(String),
}

/// Kinds whose health the agent waits for.
pub fn has_health(group: &str, kind: &str) -> bool {
    matches!(
        (group, kind),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet") | ("batch", "Job")
    )
}

fn int(obj: &Json, pointer: &str) -> Option<i64> {
    obj.pointer(pointer).and_then(Json::as_i64)
}

/// `Available=False (MinimumReplicasUnavailable: ...)`, for messages.
pub fn conditions(obj: &Json) -> String {
    let Some(list) = obj.pointer("/status/conditions").and_then(Json::as_array) else {
        return "no conditions".to_string();
    };
    list.iter()
        .map(|c| {
            let s = |k: &str| c.get(k).and_then(Json::as_str).unwrap_or("");
            let mut out = format!("{}={}", s("type"), s("status"));
            match (s("reason"), s("message")) {
                ("", "") => {}
                (r, "") => out.push_str(&format!(" ({r})")),
                (r, m) => out.push_str(&format!(" ({r}: {m})")),
            }
            out
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn condition<'a>(obj: &'a Json, kind: &str) -> Option<&'a Json> {
    obj.pointer("/status/conditions")
        .and_then(Json::as_array)?
        .iter()
        .find(|c| c.get("type").and_then(Json::as_str) == Some(kind))
}

fn is_true(c: Option<&Json>) -> bool {
    c.and_then(|c| c.get("status")).and_then(Json::as_str) == Some("True")
}

/// The health of a live object of a kind [`has_health`] accepts.
pub fn evaluate(kind: &str, obj: &Json) -> Health {
    let generation = int(obj, "/metadata/generation").unwrap_or(0);
    let observed = int(obj, "/status/observedGeneration").unwrap_or(-1);
    if kind != "Job" && observed < generation {
        return Health::Progressing(format!(
            "the controller has not seen generation {generation} yet (observedGeneration {observed})"
        ));
    }
    match kind {
        "Deployment" => {
            let want = int(obj, "/spec/replicas").unwrap_or(1);
            let updated = int(obj, "/status/updatedReplicas").unwrap_or(0);
            let available = int(obj, "/status/availableReplicas").unwrap_or(0);
            let total = int(obj, "/status/replicas").unwrap_or(0);
            if let Some(c) = condition(obj, "Progressing") {
                if c.get("reason").and_then(Json::as_str) == Some("ProgressDeadlineExceeded") {
                    return Health::Failed(format!(
                        "progress deadline exceeded; conditions: {}",
                        conditions(obj)
                    ));
                }
            }
            if updated >= want && available >= want && total <= want {
                Health::Ready
            } else {
                Health::Progressing(format!(
                    "{updated}/{want} updated, {available}/{want} available; conditions: {}",
                    conditions(obj)
                ))
            }
        }
        "StatefulSet" => {
            let want = int(obj, "/spec/replicas").unwrap_or(1);
            let ready = int(obj, "/status/readyReplicas").unwrap_or(0);
            let updated = int(obj, "/status/updatedReplicas").unwrap_or(0);
            let revisions_match =
                obj.pointer("/status/currentRevision") == obj.pointer("/status/updateRevision");
            if ready >= want && updated >= want && revisions_match {
                Health::Ready
            } else {
                Health::Progressing(format!(
                    "{ready}/{want} ready, {updated}/{want} updated; conditions: {}",
                    conditions(obj)
                ))
            }
        }
        "DaemonSet" => {
            let want = int(obj, "/status/desiredNumberScheduled").unwrap_or(0);
            let updated = int(obj, "/status/updatedNumberScheduled").unwrap_or(0);
            let available = int(obj, "/status/numberAvailable").unwrap_or(0);
            if updated >= want && available >= want {
                Health::Ready
            } else {
                Health::Progressing(format!(
                    "{updated}/{want} updated, {available}/{want} available"
                ))
            }
        }
        "Job" => {
            if is_true(condition(obj, "Failed")) {
                Health::Failed(format!("the job failed; conditions: {}", conditions(obj)))
            } else if is_true(condition(obj, "Complete")) {
                Health::Ready
            } else {
                Health::Progressing(format!("not complete; conditions: {}", conditions(obj)))
            }
        }
        _ => Health::Ready,
    }
}

/// Waiting reasons of a container that waiting will not cure: the image
/// cannot be pulled, the container keeps crashing or cannot be created.
/// A workload with such a pod fails at once with the pod's own reason
/// instead of running out its stack's timeout.
const STUCK_REASONS: &[&str] = &[
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The label selector of a workload (`spec.selector.matchLabels`) as a
/// query string, `None` without one.
pub fn pod_selector(obj: &Json) -> Option<String> {
    let labels = obj.pointer("/spec/selector/matchLabels")?.as_object()?;
    if labels.is_empty() {
        return None;
    }
    Some(
        labels
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// Why a pod cannot become ready, if waiting will not help: `pod NS/NAME:
/// container C is waiting: ImagePullBackOff (message)`.
pub fn stuck_pod(pod: &Json) -> Option<String> {
    let statuses = ["/status/initContainerStatuses", "/status/containerStatuses"];
    for pointer in statuses {
        for c in pod
            .pointer(pointer)
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            let Some(waiting) = c.pointer("/state/waiting") else {
                continue;
            };
            let reason = waiting.get("reason").and_then(Json::as_str).unwrap_or("");
            if !STUCK_REASONS.contains(&reason) {
                continue;
            }
            let s = |p: &str| pod.pointer(p).and_then(Json::as_str).unwrap_or("");
            let mut out = format!(
                "pod {}/{}: container {} is waiting: {reason}",
                s("/metadata/namespace"),
                s("/metadata/name"),
                c.get("name").and_then(Json::as_str).unwrap_or("?")
            );
            if let Some(m) = waiting.get("message").and_then(Json::as_str) {
                out.push_str(&format!(" ({m})"));
            }
            return Some(out);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(kind: &str, obj: Json, expect: &str) {
        let got = match evaluate(kind, &obj) {
            Health::Ready => "ready".to_string(),
            Health::Progressing(m) => format!("progressing: {m}"),
            Health::Failed(m) => format!("failed: {m}"),
        };
        assert!(got.starts_with(expect), "{got}");
    }

    #[test]
    fn stuck_pods_name_the_container_and_reason() {
        let pod = json!({"metadata": {"namespace": "vod", "name": "web-1"},
            "status": {"containerStatuses": [
                {"name": "ok", "state": {"running": {}}},
                {"name": "web", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]}});
        assert_eq!(
            stuck_pod(&pod).unwrap(),
            "pod vod/web-1: container web is waiting: ImagePullBackOff (Back-off pulling image)"
        );
        let starting = json!({"status": {"containerStatuses": [
            {"name": "web", "state": {"waiting": {"reason": "ContainerCreating"}}}]}});
        assert_eq!(stuck_pod(&starting), None);
        let d = json!({"spec": {"selector": {"matchLabels": {"app": "web", "tier": "x"}}}});
        assert_eq!(pod_selector(&d).unwrap(), "app=web,tier=x");
    }

    #[test]
    fn deployments() {
        let ok = json!({"metadata": {"generation": 2}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}});
        check("Deployment", ok, "ready");
        check(
            "Deployment",
            json!({"metadata": {"generation": 3}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}}),
            "progressing: the controller has not seen generation 3",
        );
        check("Deployment", json!({"metadata": {"generation": 1}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 1, "replicas": 3, "updatedReplicas": 1, "availableReplicas": 2,
              "conditions": [{"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"}]}}),
            "progressing: 1/2 updated, 2/2 available; conditions: Available=False (MinimumReplicasUnavailable)");
        check("Deployment", json!({"metadata": {"generation": 1}, "spec": {},
            "status": {"observedGeneration": 1, "conditions": [{"type": "Progressing", "status": "False",
              "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet \"w-1\" has timed out progressing."}]}}),
            "failed: progress deadline exceeded; conditions: Progressing=False (ProgressDeadlineExceeded: ReplicaSet \"w-1\" has timed out progressing.)");
    }

    #[test]
    fn statefulsets_daemonsets_and_jobs() {
        check(
            "StatefulSet",
            json!({"metadata": {"generation": 1}, "spec": {"replicas": 1},
            "status": {"observedGeneration": 1, "readyReplicas": 1, "updatedReplicas": 1, "currentRevision": "a", "updateRevision": "a"}}),
            "ready",
        );
        check(
            "StatefulSet",
            json!({"metadata": {"generation": 1}, "spec": {"replicas": 1},
            "status": {"observedGeneration": 1, "readyReplicas": 0, "updatedReplicas": 1}}),
            "progressing: 0/1 ready",
        );
        check(
            "DaemonSet",
            json!({"metadata": {"generation": 1},
            "status": {"observedGeneration": 1, "desiredNumberScheduled": 2, "updatedNumberScheduled": 2, "numberAvailable": 2}}),
            "ready",
        );
        check(
            "Job",
            json!({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}),
            "ready",
        );
        check(
            "Job",
            json!({"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}),
            "failed: the job failed; conditions: Failed=True (BackoffLimitExceeded)",
        );
        check("Job", json!({"status": {}}), "progressing: not complete");
    }
}
