//! `agent install-service` / `uninstall-service`: the agent's own
//! LaunchDaemon (macOS) or systemd unit (Linux), running
//! `agent run --config FILE`, restarted on failure, logging to the
//! platform's place (the journal; `/var/log/homelab-agent.log` on macOS).
//!
//! It is the same `service` resource a module declares (`resources::service`),
//! so the unit is generated, verified (`systemd-analyze verify`), written
//! atomically and started exactly as a managed service would be. With
//! `--root` only the file is written under the root (files only).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fsops::Fs;
use crate::resources::service::{Job, Restart, Scope, ServiceKind, Spec, Unit};
use crate::resources::{ApplyCtx, Host, Kind, Platform, PruneOutcome, Resource, ResourceError};

/// The service name: a systemd unit `homelab-agent.service`, or the launchd
/// label `homelab.agent`.
pub fn service_name(platform: Platform) -> &'static str {
    match platform {
        Platform::Linux => "homelab-agent",
        Platform::Macos => "homelab.agent",
    }
}

/// This machine's platform.
pub fn this_platform() -> Platform {
    if cfg!(target_os = "macos") {
        Platform::Macos
    } else {
        Platform::Linux
    }
}

/// Errors installing the agent's service.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("the agent config {path} cannot be read: {source}\n  write it first (see README.md), or pass --config")]
    Config {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Resource(#[from] ResourceError),
    #[error(transparent)]
    Fs(#[from] crate::fsops::FsError),
}

/// The agent's own service spec.
pub fn spec(binary: &Path, config: &Path, platform: Platform) -> Spec {
    let (stdout, stderr) = match platform {
        // launchd drops stdio otherwise; the journal catches it on Linux.
        Platform::Macos => (
            Some("/var/log/homelab-agent.log".to_string()),
            Some("/var/log/homelab-agent.log".to_string()),
        ),
        Platform::Linux => (None, None),
    };
    Spec {
        name: service_name(platform).to_string(),
        description: "homelab-agent: converges this host from its git repository".into(),
        program: binary.to_string_lossy().into_owned(),
        args: vec![
            "run".into(),
            "--config".into(),
            config.to_string_lossy().into_owned(),
        ],
        environment: BTreeMap::from([("RUST_LOG".to_string(), "info".to_string())]),
        user: None,
        group: None,
        working_directory: None,
        stdout,
        stderr,
        enabled: true,
        scope: Scope::System,
        job: Job::Service {
            running: true,
            restart: Restart::OnFailure,
            restart_delay: 5,
            start_timeout: Duration::from_secs(30),
        },
        systemd_extra: Vec::new(),
    }
}

/// What `install` did or would do.
#[derive(Debug)]
pub struct Installed {
    /// Each generated file and its content.
    pub files: Vec<(PathBuf, String)>,
    /// Fields that changed (empty: already installed and running).
    pub changed: Vec<&'static str>,
}

fn host(root: Option<&Path>, platform: Platform) -> Result<Host, InstallError> {
    let fs = Fs::new(root.unwrap_or(Path::new("/")))?;
    Ok(Host::new(fs, root.is_some(), platform))
}

fn unit_files(unit: &Unit) -> Vec<(PathBuf, String)> {
    unit.files()
        .iter()
        .map(|f| {
            (
                f.path.clone(),
                String::from_utf8_lossy(&f.content).into_owned(),
            )
        })
        .collect()
}

/// The files `install` writes for `platform` (the unit or plist and where
/// it goes), for packages: the `.deb` ships exactly this unit.
pub fn render(binary: &Path, config: &Path, platform: Platform) -> Vec<(PathBuf, String)> {
    unit_files(&Unit::new(spec(binary, config, platform), platform))
}

/// Installs (or with `dry_run` only renders) the agent's service.
pub fn install(
    binary: &Path,
    config: &Path,
    root: Option<&Path>,
    dry_run: bool,
) -> Result<Installed, InstallError> {
    let platform = this_platform();
    if !dry_run {
        std::fs::metadata(config).map_err(|source| InstallError::Config {
            path: config.to_path_buf(),
            source,
        })?;
    }
    let unit = Unit::new(spec(binary, config, platform), platform);
    let files = unit_files(&unit);
    if dry_run {
        return Ok(Installed {
            files,
            changed: Vec::new(),
        });
    }
    let host = host(root, platform)?;
    let live = unit.observe(&host)?;
    let changes = unit.diff(&live, &host);
    if !changes.is_empty() {
        let mut ctx = ApplyCtx::new(&host);
        unit.apply(&live, &changes, &mut ctx)?;
        if ctx.take_started() {
            unit.wait_up(&host).map_err(ResourceError::Unsupported)?;
        }
    }
    Ok(Installed {
        files,
        changed: changes.iter().map(|c| c.field).collect(),
    })
}

/// Stops, disables and removes the agent's service.
pub fn uninstall(root: Option<&Path>) -> Result<PruneOutcome, InstallError> {
    let platform = this_platform();
    let host = host(root, platform)?;
    Ok(ServiceKind.prune(service_name(platform), &host)?)
}
