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
    #[error("cannot read {path} from {repo}: {reason}\n  fix the repository, or check --repo, --ref and --token-file")]
    Repo {
        repo: String,
        path: String,
        reason: String,
    },
    #[error("{path} in {repo} is not a usable agent config:\n{source}\n  fix it in the repository (`agent validate --config` checks a copy)")]
    RepoConfig {
        repo: String,
        path: String,
        #[source]
        source: crate::config::ConfigError,
    },
    #[error("{path} in {repo} says `host: {found}`, not {wanted}\n  fix the file, or pass the --host it was written for")]
    WrongHost {
        repo: String,
        path: String,
        found: String,
        wanted: String,
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
            if let Some(service) = unit.as_startable() {
                service.wait_up(&host)?;
            }
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

/// Where a host's agent config lives in the repository.
pub fn repo_config_path(host: &str) -> String {
    format!("agents/{host}.yaml")
}

/// What [`config_from_repo`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum ConfigCopy {
    /// Written (new or changed).
    Written,
    /// Already there, byte for byte.
    UpToDate,
}

/// Bootstraps a host from the repository alone: reads `agents/<host>.yaml`
/// from `spec`'s repository (fetched into a cache under `state_dir`, as the
/// daemon fetches it), checks that it parses and names `host`, and writes it
/// to `dest` (0644, atomically; the path the service runs with, also with
/// `--root`, which only places the unit). The config names its own token
/// files; they are checked when the service is installed.
pub fn config_from_repo(
    spec: &crate::engine::SourceSpec,
    state_dir: &Path,
    host: &str,
    dest: &Path,
) -> Result<ConfigCopy, InstallError> {
    let repo = crate::redact::url_credentials_owned(&spec.repo);
    let path = repo_config_path(host);
    let repo_err = |reason: String| InstallError::Repo {
        repo: repo.clone(),
        path: path.clone(),
        reason,
    };
    if !crate::resources::valid_name(host) {
        return Err(repo_err(format!("`{host}` is not a host name")));
    }
    let resolved = crate::engine::resolve(spec, state_dir).map_err(|e| repo_err(e.to_string()))?;
    let bytes = resolved
        .source
        .read(&path)
        .map_err(|e| repo_err(e.to_string()))?
        .ok_or_else(|| {
            repo_err(format!(
                "there is no {path}: add the host's agent config there"
            ))
        })?;
    let text = String::from_utf8(bytes).map_err(|_| repo_err("it is not UTF-8 text".into()))?;
    let parsed = crate::config::parse(Path::new(&path), &text).map_err(|source| {
        InstallError::RepoConfig {
            repo: repo.clone(),
            path: path.clone(),
            source,
        }
    })?;
    if parsed.host.as_deref() != Some(host) {
        return Err(InstallError::WrongHost {
            repo,
            path,
            found: parsed.host.unwrap_or_else(|| "(none)".into()),
            wanted: host.to_string(),
        });
    }
    let fs = Fs::new(Path::new("/"))?;
    if let Some(live) = fs.read_file(dest)? {
        if live.1.as_deref() == Some(text.as_bytes()) {
            return Ok(ConfigCopy::UpToDate);
        }
    }
    let attrs = crate::fsops::Attrs {
        mode: 0o644,
        uid: None,
        gid: None,
    };
    if let Some(parent) = dest.parent() {
        fs.create_dir_all(
            parent,
            crate::fsops::Attrs {
                mode: 0o755,
                ..attrs
            },
        )?;
    }
    let staged = fs.stage_file(dest, text.as_bytes(), attrs)?;
    for result in fs.commit(vec![staged]) {
        result?;
    }
    fs.sync()?;
    Ok(ConfigCopy::Written)
}

/// `install-service --repo R --host H`: [`config_from_repo`] with the
/// default state directory (under `root` when given) for the fetch cache.
pub fn bootstrap_config(
    repo: &str,
    reference: &str,
    token_file: Option<PathBuf>,
    host: &str,
    config: &Path,
    root: Option<&Path>,
) -> Result<ConfigCopy, InstallError> {
    let spec = crate::engine::SourceSpec {
        repo: repo.to_string(),
        reference: reference.to_string(),
        rev: None,
        token_file,
        allowed_signers: None,
        fetch: true,
        fetch_timeout: Duration::from_secs(120),
    };
    let state_dir = crate::config::default_state_dir(root);
    config_from_repo(&spec, &state_dir, host, config)
}
