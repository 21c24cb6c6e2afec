//! `agent install-service` / `uninstall-service`: the agent's own
//! LaunchDaemon (macOS) or systemd unit (Linux), running
//! `agent run --config FILE`, restarted on failure, logging to the
//! platform's place (the journal; `/var/log/homelab-agent.log` on macOS).
//!
//! launchd never rotates a LaunchDaemon's log file, so on macOS the agent
//! writes it itself (`agent run --log-file`, which follows the file when
//! it is moved away) and install-service adds a newsyslog config
//! ([`NEWSYSLOG_CONF`]): newsyslog, which macOS runs every half hour,
//! rotates it at 10 MiB and keeps 5 compressed generations. The unified
//! log (`os_log`) was the other choice; a plain file keeps `tail -f` and
//! the Linux text format, and newsyslog is macOS's own rotator.
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
    #[error("cannot remove the log rotation config {path}: {source}")]
    Rotation {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Resource(#[from] ResourceError),
    #[error(transparent)]
    Fs(#[from] crate::fsops::FsError),
}

/// The LaunchDaemon's log file (macOS).
pub const MACOS_LOG: &str = "/var/log/homelab-agent.log";

/// newsyslog's config for [`MACOS_LOG`] (macOS).
pub const NEWSYSLOG_CONF: &str = "/etc/newsyslog.d/homelab-agent.conf";

/// The newsyslog entry: root-owned, 0640, 5 generations, rotated at
/// 10240 KiB, bzip2-compressed (`J`), no signal (`N`: the agent reopens
/// the file by itself, see `telemetry::logfile`), created if missing
/// (`C`).
pub fn newsyslog_conf() -> String {
    format!(
        "# homelab-agent's LaunchDaemon log, written by `agent install-service`.\n\
         # The agent follows the file when newsyslog moves it away: no signal (N).\n\
         # logfilename                 [owner:group] mode count size(KiB) when flags\n\
         {MACOS_LOG}    root:wheel    640  5     10240     *    CJN\n"
    )
}

/// The agent's own service spec.
pub fn spec(binary: &Path, config: &Path, platform: Platform) -> Spec {
    let (stdout, stderr) = match platform {
        // launchd drops stdio otherwise (what is printed before logging
        // starts, or by a crash); the journal catches it on Linux.
        Platform::Macos => (Some(MACOS_LOG.to_string()), Some(MACOS_LOG.to_string())),
        Platform::Linux => (None, None),
    };
    let mut args = vec![
        "run".to_string(),
        "--config".to_string(),
        config.to_string_lossy().into_owned(),
    ];
    if platform == Platform::Macos {
        args.extend(["--log-file".to_string(), MACOS_LOG.to_string()]);
    }
    Spec {
        name: service_name(platform).to_string(),
        description: "homelab-agent: converges this host from its git repository".into(),
        program: binary.to_string_lossy().into_owned(),
        args,
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
    install_on(this_platform(), binary, config, root, dry_run)
}

/// [`install`] for `platform` (another one than this machine's only with a
/// `root`, in tests).
fn install_on(
    platform: Platform,
    binary: &Path,
    config: &Path,
    root: Option<&Path>,
    dry_run: bool,
) -> Result<Installed, InstallError> {
    if !dry_run {
        std::fs::metadata(config).map_err(|source| InstallError::Config {
            path: config.to_path_buf(),
            source,
        })?;
    }
    let unit = Unit::new(spec(binary, config, platform), platform);
    let mut files = unit_files(&unit);
    if platform == Platform::Macos {
        files.push((PathBuf::from(NEWSYSLOG_CONF), newsyslog_conf()));
    }
    if dry_run {
        return Ok(Installed {
            files,
            changed: Vec::new(),
        });
    }
    let host = host(root, platform)?;
    let mut rotation = false;
    if platform == Platform::Macos {
        rotation = write_if_changed(&host.fs, Path::new(NEWSYSLOG_CONF), &newsyslog_conf())?;
    }
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
    let mut changed: Vec<&'static str> = changes.iter().map(|c| c.field).collect();
    if rotation {
        changed.push("log rotation");
    }
    Ok(Installed { files, changed })
}

/// Writes `content` to `path` (0644, atomically) unless it is already
/// there byte for byte; true when written.
fn write_if_changed(fs: &Fs, path: &Path, content: &str) -> Result<bool, InstallError> {
    if let Some(live) = fs.read_file(path)? {
        if live.1.as_deref() == Some(content.as_bytes()) {
            return Ok(false);
        }
    }
    let attrs = crate::fsops::Attrs {
        mode: 0o644,
        uid: None,
        gid: None,
    };
    if let Some(parent) = path.parent() {
        fs.create_dir_all(
            parent,
            crate::fsops::Attrs {
                mode: 0o755,
                ..attrs
            },
        )?;
    }
    let staged = fs.stage_file(path, content.as_bytes(), attrs)?;
    for result in fs.commit(vec![staged]) {
        result?;
    }
    fs.sync()?;
    Ok(true)
}

/// Stops, disables and removes the agent's service (and on macOS its
/// newsyslog config; the log files stay).
pub fn uninstall(root: Option<&Path>) -> Result<PruneOutcome, InstallError> {
    uninstall_on(this_platform(), root)
}

fn uninstall_on(platform: Platform, root: Option<&Path>) -> Result<PruneOutcome, InstallError> {
    let host = host(root, platform)?;
    let outcome = ServiceKind.prune(service_name(platform), &host)?;
    if platform == Platform::Macos {
        let conf = host.fs.host_path(Path::new(NEWSYSLOG_CONF));
        match std::fs::remove_file(&conf) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(InstallError::Rotation {
                    path: conf,
                    source: e,
                })
            }
        }
    }
    Ok(outcome)
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
    Ok(if write_if_changed(&fs, dest, &text)? {
        ConfigCopy::Written
    } else {
        ConfigCopy::UpToDate
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// On macOS the LaunchDaemon runs `agent run --log-file`, and a
    /// newsyslog config rotates that file; both written under `--root`,
    /// and removed again (the config) by uninstall.
    #[test]
    fn the_macos_service_logs_to_a_file_newsyslog_rotates() {
        let root = tempfile::tempdir().unwrap();
        let config = root.path().join("agent.yaml");
        std::fs::write(&config, "repo: .\n").unwrap();
        let done = install_on(
            Platform::Macos,
            Path::new("/usr/local/bin/agent"),
            Path::new("/usr/local/etc/homelab-agent/agent.yaml"),
            Some(root.path()),
            true,
        )
        .unwrap();
        let text: String = done
            .files
            .iter()
            .map(|(p, c)| format!("# {}\n{c}", p.display()))
            .collect();
        // Inline: a snapshot directory under src/ would read as a module.
        insta::assert_snapshot!(text, @r#"
# /Library/LaunchDaemons/homelab.agent.plist
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
	<key>Label</key>
	<string>homelab.agent</string>
	<key>ProgramArguments</key>
	<array>
		<string>/usr/local/bin/agent</string>
		<string>run</string>
		<string>--config</string>
		<string>/usr/local/etc/homelab-agent/agent.yaml</string>
		<string>--log-file</string>
		<string>/var/log/homelab-agent.log</string>
	</array>
	<key>EnvironmentVariables</key>
	<dict>
		<key>RUST_LOG</key>
		<string>info</string>
	</dict>
	<key>RunAtLoad</key>
	<true/>
	<key>KeepAlive</key>
	<dict>
		<key>SuccessfulExit</key>
		<false/>
	</dict>
	<key>ThrottleInterval</key>
	<integer>5</integer>
	<key>StandardOutPath</key>
	<string>/var/log/homelab-agent.log</string>
	<key>StandardErrorPath</key>
	<string>/var/log/homelab-agent.log</string>
</dict>
</plist>
# /etc/newsyslog.d/homelab-agent.conf
# homelab-agent's LaunchDaemon log, written by `agent install-service`.
# The agent follows the file when newsyslog moves it away: no signal (N).
# logfilename                 [owner:group] mode count size(KiB) when flags
/var/log/homelab-agent.log    root:wheel    640  5     10240     *    CJN
"#);

        let done = install_on(
            Platform::Macos,
            Path::new("/usr/local/bin/agent"),
            &config,
            Some(root.path()),
            false,
        )
        .unwrap();
        assert!(done.changed.contains(&"log rotation"), "{:?}", done.changed);
        let conf = root.path().join(NEWSYSLOG_CONF.trim_start_matches('/'));
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), newsyslog_conf());
        let plist = root
            .path()
            .join("Library/LaunchDaemons/homelab.agent.plist");
        let plist = std::fs::read_to_string(plist).unwrap();
        assert!(plist.contains("<string>--log-file</string>"), "{plist}");
        // Installed again: nothing to write.
        let again = install_on(
            Platform::Macos,
            Path::new("/usr/local/bin/agent"),
            &config,
            Some(root.path()),
            false,
        )
        .unwrap();
        assert!(again.changed.is_empty(), "{:?}", again.changed);
        uninstall_on(Platform::Macos, Some(root.path())).unwrap();
        assert!(!conf.exists());
    }

    #[test]
    fn the_linux_unit_logs_to_the_journal() {
        let s = spec(
            Path::new("/usr/bin/agent"),
            Path::new("/etc/a.yaml"),
            Platform::Linux,
        );
        assert_eq!(s.args, ["run", "--config", "/etc/a.yaml"]);
        assert_eq!(s.stderr, None);
    }
}
