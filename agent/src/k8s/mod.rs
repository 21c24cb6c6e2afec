//! Kubernetes stacks: `k8s/<stack>/stack.yaml` plus manifests, converged
//! with server-side apply under the field manager `homelab-agent`.
//!
//! Owns: the cluster connection and discovery (`client.rs`, the
//! real kube-rs client), the normalised diff (`diff.rs`, pure), plan and
//! apply of one stack (`plan.rs`, `apply.rs`), health waits (`health.rs`)
//! and the stack part of the CLI report (`report.rs`).
//!
//! Leaves to others: the stack model and its loading
//! (`desired/stacks/`: part of the desired stage), the native resources (a stack runs after them and
//! never blocks them), the state store (stack objects are ordinary
//! inventory entries of kind [`INVENTORY_KIND`], ids `k8s:<stack>/...`),
//! and secret resolution (`secret()` of `desired/render.rs`).
//!
//! # Guarantees
//! - Each stack is isolated: an unreachable API server, a bad kubeconfig or
//!   a rejected object fails only that stack; native resources converge.
//! - No kubeconfig and no in-cluster config at all: the stack is *not
//!   checked* (a fresh checkout plans offline); that is not an error.
//! - Secret values never leave memory except towards the API server: plans
//!   show Secret data by key names only, the inventory holds keyed hashes.
//! - Prune deletes only objects the agent created, found in the inventory,
//!   that still carry both ownership labels with this host's stack.

pub mod apply;
pub mod client;
pub mod diff;
pub mod health;
pub mod ownership;
pub mod plan;
pub mod report;

pub use crate::desired::stacks::{
    kind_rank, load, model, DesiredObject, Manifest, ObjectRef, Stack, FIELD_MANAGER,
    INVENTORY_KIND, MANAGED_BY, MANAGED_BY_LABEL, ON_DRIFT_ANNOTATION, STACK_LABEL,
};
