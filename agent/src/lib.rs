//! homelab-agent: a declarative homelab reconciler.
//!
//! Data flows one way, one module per stage:
//! [`source`] (a revision) → [`desired`] (a validated catalog) → [`plan`]
//! (observe + diff + classify) → [`apply`] (converge, prune, commit state)
//! → [`report`] (text and JSON). [`resources`] holds the kinds and
//! [`fsops`] the safe filesystem layer they write through; [`k8s`] the
//! Kubernetes stacks, planned and applied after the native resources. [`cli`] wires
//! them into the `agent` binary.

pub mod apply;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod desired;
pub mod dist;
pub mod engine;
pub mod fsops;
pub mod init;
pub mod install;
pub mod k8s;
pub mod notifications;
pub mod plan;
pub mod redact;
pub mod report;
pub mod resources;
pub mod run;
pub mod secrets;
pub mod source;
pub mod syntax;
pub mod telemetry;
