//! What happened to one entry of a target (a host resource or a stack
//! object): one type for every target, so reports, events, metrics, exit
//! codes and the daemon read the same fields, and never the words of a
//! message.

use crate::plan::{Action, Classification};

/// What happened to one resource or object.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    pub id: String,
    pub action: Action,
    pub class: Classification,
    /// Fields changed, for messages.
    pub fields: Vec<String>,
    /// `None` when it succeeded (or was skipped: see `reason`).
    pub error: Option<String>,
    /// Extra words (`left in place: it is not empty`).
    pub note: Option<String>,
    /// Why it ended this way, as a type: what callers decide on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
}

impl Outcome {
    /// Not applied, and not a failure: still to do (a secret, a hold).
    pub fn skipped(&self) -> bool {
        self.reason.as_ref().is_some_and(Reason::is_skip)
    }

    /// Applied, then put back (a service it feeds did not come up).
    pub fn rolled_back(&self) -> bool {
        matches!(self.reason, Some(Reason::RolledBack { .. }))
    }

    /// The kind of Kubernetes API failure, for the error metric.
    pub fn kube_failure(&self) -> Option<KubeFailure> {
        match &self.reason {
            Some(Reason::Kube(k)) => Some(*k),
            _ => None,
        }
    }
}

/// Why an outcome is what it is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reason {
    /// Skipped: it needs something that is not there yet (a secret that did
    /// not resolve, or a resource before it that was blocked).
    Blocked { needs: String },
    /// Skipped: a change held after it was rolled back, until the desired
    /// state changes again.
    Held,
    /// Failed: not applied, it comes after `id`, which failed.
    AfterFailed { id: String },
    /// Failed: not applied, the agent was asked to stop.
    Stopped,
    /// Applied, then restored: `service` did not come up with it.
    RolledBack { service: String },
    /// Restarted because the resources named changed.
    Restarted { by: String },
    /// A Kubernetes API failure of this kind.
    Kube(KubeFailure),
}

impl Reason {
    /// Skipped rather than failed.
    pub fn is_skip(&self) -> bool {
        matches!(self, Reason::Blocked { .. } | Reason::Held)
    }
}

/// Why a Kubernetes operation failed (`homelab_agent_kube_errors_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KubeFailure {
    /// The API server could not be reached.
    Connect,
    /// 401/403: credentials or RBAC.
    Forbidden,
    /// 404 for something that should exist.
    NotFound,
    /// 409: someone else owns or changed the object.
    Conflict,
    /// 422/400: the API server refused the object.
    Invalid,
    /// A rollout or wait did not finish in time.
    Timeout,
    /// Anything else.
    Other,
}

impl KubeFailure {
    pub const ALL: [KubeFailure; 7] = [
        KubeFailure::Connect,
        KubeFailure::Forbidden,
        KubeFailure::NotFound,
        KubeFailure::Conflict,
        KubeFailure::Invalid,
        KubeFailure::Timeout,
        KubeFailure::Other,
    ];

    /// The metric label value.
    pub fn name(self) -> &'static str {
        match self {
            KubeFailure::Connect => "connect",
            KubeFailure::Forbidden => "forbidden",
            KubeFailure::NotFound => "not_found",
            KubeFailure::Conflict => "conflict",
            KubeFailure::Invalid => "invalid",
            KubeFailure::Timeout => "timeout",
            KubeFailure::Other => "other",
        }
    }
}
