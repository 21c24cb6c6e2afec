//! The agent's own configuration (`agent.yaml`): where the desired state
//! lives, how to reach it, and how the daemon behaves. Parsed with the same
//! line-aware YAML reader as the desired state: unknown keys and wrong types
//! are errors with file:line, all reported at once.
//!
//! Relative paths in the file are relative to the file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::desired::model::DriftPolicy;
use crate::syntax::diag::{Diagnostic, Diagnostics};
use crate::syntax::yaml::{self, MapReader, Value};
use crate::syntax::{duration, duration_at_least};

/// Errors loading the agent config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read agent config {path}: {source}\n  pass --config FILE, or create it (see README: agent config)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent config {path} is invalid:\n{diags}")]
    Invalid { path: PathBuf, diags: Diagnostics },
    /// The config parses, but a file it names cannot be used (see
    /// [`check_credentials`]). Every problem is listed.
    #[error("agent config {}: {} file(s) it names cannot be used:\n{}", path.display(), problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Credentials {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// How the daemon logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `verify:` settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyConfig {
    /// git's allowed_signers format.
    pub allowed_signers: PathBuf,
}

/// `onepassword:` settings: where secrets come from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OnePasswordConfig {
    /// Connect server base URL, e.g. `http://127.0.0.1:8080` (no `/v1`).
    pub connect_url: String,
    /// File holding the Connect access token (chmod 600).
    pub token_file: PathBuf,
}

/// How events are encoded on the wire (`loki.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LokiFormat {
    /// `logproto.PushRequest` in protobuf, snappy-compressed: Loki's native
    /// format (what Promtail and Alloy send). The default.
    Protobuf,
    /// Loki's JSON push body.
    Json,
}

/// `loki:` settings: where the agent's events go (Loki's push API, or a
/// server that accepts it, such as VictoriaLogs).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LokiConfig {
    /// The push endpoint: the configured URL, with `/loki/api/v1/push`
    /// appended to its path unless the path already ends with it; a query
    /// string is kept (VictoriaLogs:
    /// `http://vl:9428/insert/loki/api/v1/push?_msg_field=msg`).
    pub push_url: String,
    /// Wire format of a push (`format: protobuf | json`).
    pub format: LokiFormat,
    /// Sent as `X-Scope-OrgID` (multi-tenant Loki).
    pub tenant: Option<String>,
    /// Basic auth (a reverse proxy in front of Loki); needs `password_file`.
    pub username: Option<String>,
    /// File holding the basic-auth password (chmod 600).
    pub password_file: Option<PathBuf>,
    /// Events per push (at most).
    pub batch_size: usize,
    /// How long an event may wait for its batch to fill.
    pub batch_wait: Duration,
    /// Events kept in memory while Loki is slow or down; beyond this the
    /// oldest are dropped (and counted).
    pub max_buffered_events: usize,
    /// Retries of a batch answered 429/5xx or not answered, before it is
    /// dropped (and counted).
    pub max_retries: u32,
    /// Cap of the exponential backoff between retries (from 500 ms).
    pub max_backoff: Duration,
    /// Timeout of one push request.
    pub timeout: Duration,
}

/// `notify:` settings: where the agent tells the operator how runs went
/// (see `notifications`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NotifyConfig {
    /// A commit status per host on each commit a run applied.
    pub forgejo: Option<ForgejoNotify>,
    /// An ntfy-compatible webhook on failure, rollback and drift.
    pub webhook: Option<WebhookNotify>,
    /// Timeout of one request (connect and answer).
    pub timeout: Duration,
}

/// `notify.forgejo`: Forgejo's commit-status API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ForgejoNotify {
    /// The forge's base URL (`https://forgejo.example`; `/api/v1` is added).
    pub url: String,
    /// `owner/name` of the desired-state repository; default: the last two
    /// parts of `repo`'s path.
    pub repository: String,
    /// An access token with repository write scope (chmod 600).
    pub token_file: PathBuf,
    /// The link each status carries (for example the agent's status page).
    pub target_url: Option<String>,
}

/// `notify.webhook`: an ntfy topic URL, or anything that takes its shape
/// (a POST with a text body and `Title`, `Priority`, `Tags` headers).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WebhookNotify {
    pub url: String,
    /// A bearer token (ntfy access token), chmod 600.
    pub token_file: Option<PathBuf>,
}

const NOTIFY_KEYS: &[&str] = &["forgejo", "webhook", "timeout"];
const FORGEJO_KEYS: &[&str] = &["url", "repository", "token_file", "target_url"];
const WEBHOOK_KEYS: &[&str] = &["url", "token_file"];

/// The push path appended to `loki.url`.
pub const LOKI_PUSH_PATH: &str = "/loki/api/v1/push";

/// The whole agent config, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AgentConfig {
    /// The file it came from.
    pub file: PathBuf,
    /// URL (https, http, ssh, scp-like, file) or a local directory.
    pub repo: String,
    /// Branch, tag or commit to follow.
    pub reference: String,
    pub token_file: Option<PathBuf>,
    pub host: Option<String>,
    pub poll_interval: Duration,
    pub webhook_secret_file: Option<PathBuf>,
    pub listen: SocketAddr,
    pub state_dir: Option<PathBuf>,
    /// Sandbox root (as `--root`): for trying the daemon out and for tests.
    pub root: Option<PathBuf>,
    pub on_drift: DriftPolicy,
    pub verify: Option<VerifyConfig>,
    pub onepassword: Option<OnePasswordConfig>,
    pub log_format: LogFormat,
    /// Events to Loki; `None`: no events are sent.
    pub loki: Option<LokiConfig>,
    /// The kubeconfig stacks use (default: `$KUBECONFIG`, else `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// A run (fetch, render, plan, apply) taking longer than this is
    /// abandoned and reported; a revision whose rendering does is refused.
    pub run_timeout: Duration,
    /// A bearer token (0600 file) that `/api/status` and `/metrics` require;
    /// `None`: they answer anyone who can reach the listener.
    pub api_token_file: Option<PathBuf>,
    /// Commit statuses and webhook notifications; `None`: none are sent.
    pub notify: Option<NotifyConfig>,
}

/// The default [`AgentConfig::run_timeout`]: far above a real run (a
/// thousand files apply in well under a second; package installs and
/// Kubernetes health waits take minutes), far below "stuck forever".
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(15 * 60);

const KEYS: &[&str] = &[
    "repo",
    "ref",
    "token_file",
    "host",
    "poll_interval",
    "webhook_secret_file",
    "listen",
    "state_dir",
    "root",
    "on_drift",
    "verify",
    "onepassword",
    "log_format",
    "kubeconfig",
    "loki",
    "run_timeout",
    "api_token_file",
    "notify",
];

const LOKI_KEYS: &[&str] = &[
    "url",
    "format",
    "tenant",
    "username",
    "password_file",
    "batch_size",
    "batch_wait",
    "max_buffered_events",
    "max_retries",
    "max_backoff",
    "timeout",
];

/// Where the config lives by default on this OS.
pub fn default_path() -> PathBuf {
    if cfg!(target_os = "macos") {
        PathBuf::from("/usr/local/etc/homelab-agent/agent.yaml")
    } else {
        PathBuf::from("/etc/homelab-agent/agent.yaml")
    }
}

/// The default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// Largest agent config read (a config is a screenful; this bounds a
/// mistaken path, such as a log file, before it is parsed).
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Refuses what is not a regular file of at most `max` bytes: a FIFO or a
/// device named in the config would block the reader (the daemon's reload
/// runs on its event loop), and a huge file would be read whole.
fn check_regular(path: &Path, max: u64) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is not a regular file (a FIFO, device or directory)",
        ));
    }
    if meta.len() > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {} bytes, over the limit of {max}", meta.len()),
        ));
    }
    Ok(())
}

/// Reads and validates a config file (at most [`yaml::MAX_FILE_BYTES`]).
pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
    let text =
        read_limited(path, yaml::MAX_FILE_BYTES as u64).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    parse(path, &text)
}

pub use crate::source::read_limited;

/// Parses config text; `path` names it in messages and anchors relative paths.
pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
    let file = path.display().to_string();
    let invalid = |diags: Diagnostics| ConfigError::Invalid {
        path: path.to_path_buf(),
        diags: diags.sorted(),
    };
    let doc = yaml::parse(&file, text).map_err(invalid)?;
    let mut diags = Diagnostics::default();
    let base = path.parent().unwrap_or(Path::new("."));
    let Some(mut r) = MapReader::new(&file, "the agent config", &doc, &mut diags) else {
        return Err(invalid(diags));
    };
    let rel = |p: String| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            base.join(p)
        }
    };
    let repo = match r.string("repo", &mut diags) {
        Some((repo, line)) => {
            if let Some(why) = url_credentials_problem(&repo) {
                diags.push(
                    Diagnostic::new(
                        &file,
                        format!("`repo: {}` {why}", crate::redact::url_credentials(&repo)),
                    )
                    .line(line)
                    .hint("put the token in a file named by `token_file` (chmod 600), and rotate it: it was written in the config"),
                );
            }
            Some(repo)
        }
        None if !r.has("repo") => {
            diags.push(
                Diagnostic::new(&file, "the agent config has no `repo`")
                    .line(r.line)
                    .hint("repo: https://forgejo.example/owner/homelab.git (or a local directory)"),
            );
            None
        }
        None => None,
    };
    let reference = r
        .string("ref", &mut diags)
        .map_or_else(|| "main".to_string(), |s| s.0);
    let token_file = r.string("token_file", &mut diags).map(|s| rel(s.0));
    let host = r.string("host", &mut diags).map(|s| s.0);
    let poll_interval =
        duration(&mut r, "poll_interval", &mut diags).unwrap_or(Duration::from_secs(60));
    let webhook_secret_file = r
        .string("webhook_secret_file", &mut diags)
        .map(|s| rel(s.0));
    let listen = match r.string("listen", &mut diags) {
        None => DEFAULT_LISTEN.parse().expect("valid default"),
        Some((s, line)) => match s.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                diags.push(
                    Diagnostic::new(&file, format!("`listen: {s}` is not an address:port"))
                        .line(line)
                        .hint("e.g. listen: 127.0.0.1:9464 (loopback; put a reverse proxy in front for Forgejo)"),
                );
                DEFAULT_LISTEN.parse().expect("valid default")
            }
        },
    };
    let state_dir = r.string("state_dir", &mut diags).map(|s| rel(s.0));
    let root = r.string("root", &mut diags).map(|s| rel(s.0));
    let on_drift = crate::desired::model::on_drift(&mut r, &mut diags).unwrap_or(DriftPolicy::Heal);
    let verify = r.take("verify").and_then(|node| {
        let mut v = MapReader::new(&file, "`verify`", node, &mut diags)?;
        let signers = v.string("allowed_signers", &mut diags);
        if signers.is_none() {
            diags.push(
                Diagnostic::new(&file, "`verify` needs `allowed_signers`")
                    .line(node.line)
                    .hint("verify: {allowed_signers: /etc/homelab-agent/allowed_signers}"),
            );
        }
        v.finish(&["allowed_signers"], &mut diags);
        signers.map(|(s, _)| VerifyConfig {
            allowed_signers: rel(s),
        })
    });
    let onepassword = r.take("onepassword").and_then(|node| {
        let mut o = MapReader::new(&file, "`onepassword`", node, &mut diags)?;
        let url = o.string("connect_url", &mut diags);
        let token = o.string("token_file", &mut diags);
        if url.is_none() || token.is_none() {
            diags.push(
                Diagnostic::new(&file, "`onepassword` needs `connect_url` and `token_file`")
                    .line(node.line)
                    .hint("onepassword: {connect_url: http://127.0.0.1:8080, token_file: /etc/homelab-agent/op-token}"),
            );
        }
        o.finish(&["connect_url", "token_file"], &mut diags);
        Some(OnePasswordConfig {
            connect_url: url?.0,
            token_file: rel(token?.0),
        })
    });
    let log_format = match r.string("log_format", &mut diags) {
        None => LogFormat::Text,
        Some((s, _)) if s == "text" => LogFormat::Text,
        Some((s, _)) if s == "json" => LogFormat::Json,
        Some((s, line)) => {
            diags.push(
                Diagnostic::new(
                    &file,
                    format!("`log_format` must be `text` or `json`, found `{s}`"),
                )
                .line(line),
            );
            LogFormat::Text
        }
    };
    let loki = r
        .take("loki")
        .and_then(|node| loki(&file, node, &rel, &mut diags));
    let kubeconfig = r.string("kubeconfig", &mut diags).map(|s| rel(s.0));
    let run_timeout = duration(&mut r, "run_timeout", &mut diags).unwrap_or(DEFAULT_RUN_TIMEOUT);
    let api_token_file = r.string("api_token_file", &mut diags).map(|s| rel(s.0));
    let notify = r
        .take("notify")
        .and_then(|node| notify(&file, node, repo.as_deref(), &rel, &mut diags));
    r.finish(KEYS, &mut diags);
    if !diags.is_empty() {
        return Err(invalid(diags));
    }
    Ok(AgentConfig {
        file: path.to_path_buf(),
        repo: repo.expect("checked above"),
        reference,
        token_file,
        host,
        poll_interval,
        webhook_secret_file,
        listen,
        state_dir,
        root,
        on_drift,
        verify,
        onepassword,
        log_format,
        loki,
        kubeconfig,
        run_timeout,
        api_token_file,
        notify,
    })
}

/// An http(s) URL with a host, no credentials, no whitespace: the checks
/// of `notify`'s URLs (`key` as written in the config).
fn http_url(
    file: &str,
    key: &str,
    (url, line): (String, usize),
    example: &str,
    diags: &mut Diagnostics,
) -> Option<String> {
    let before = diags.len();
    if let Some(why) = url_credentials_problem(&url) {
        diags.push(
            Diagnostic::new(
                file,
                format!("`{key}: {}` {why}", crate::redact::url_credentials(&url)),
            )
            .line(line)
            .hint("put the token in a file named by `token_file` (chmod 600), and rotate it: it was written in the config"),
        );
    }
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
    let host_ok = url
        .split_once("://")
        .is_some_and(|(_, rest)| !rest.is_empty() && !rest.starts_with('/'));
    if !scheme_ok || !host_ok || url.contains(char::is_whitespace) {
        diags.push(
            Diagnostic::new(
                file,
                format!(
                    "`{key}: {}` is not an http(s) URL",
                    crate::redact::url_credentials(&url)
                ),
            )
            .line(line)
            .hint(format!("e.g. {example}")),
        );
    }
    (diags.len() == before).then_some(url)
}

/// `owner/name` from a repository URL's path (`https://forge/owner/name.git`,
/// `git@forge:owner/name.git`); `None` for a local directory.
fn repository_of(repo: &str) -> Option<String> {
    let path = if let Some((_, rest)) = repo.split_once("://") {
        rest.split_once('/')?.1
    } else if let Some((host, path)) = repo.split_once(':') {
        // scp-like `git@host:owner/name.git` (not a local path like `./x`).
        if host.contains('/') || host.is_empty() {
            return None;
        }
        path
    } else {
        return None;
    };
    let path = path.trim_end_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    let mut parts = path.rsplit('/');
    let name = parts.next().filter(|n| !n.is_empty())?;
    let owner = parts.next().filter(|o| !o.is_empty())?;
    Some(format!("{owner}/{name}"))
}

/// Whether `s` is `owner/name` with the characters Forgejo allows.
fn valid_repository(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 100
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    s.split_once('/').is_some_and(|(o, n)| ok(o) && ok(n))
}

/// The `notify:` section. Every problem is reported; `None` if any.
fn notify(
    file: &str,
    node: &yaml::Node,
    repo: Option<&str>,
    rel: &dyn Fn(String) -> PathBuf,
    diags: &mut Diagnostics,
) -> Option<NotifyConfig> {
    let before = diags.len();
    let mut n = MapReader::new(file, "`notify`", node, diags)?;
    let forgejo = n.take("forgejo").and_then(|node| {
        let mut f = MapReader::new(file, "`notify.forgejo`", node, diags)?;
        let url = match f.string("url", diags) {
            Some(u) => http_url(file, "notify.forgejo.url", u, "url: https://forgejo.example", diags),
            None => {
                if !f.has("url") {
                    diags.push(
                        Diagnostic::new(file, "`notify.forgejo` needs `url` and `token_file`")
                            .line(node.line)
                            .hint("forgejo: {url: https://forgejo.example, token_file: /etc/homelab-agent/forgejo-token}"),
                    );
                }
                None
            }
        };
        let token_file = f.string("token_file", diags).map(|t| rel(t.0));
        if token_file.is_none() && f.has("url") {
            diags.push(
                Diagnostic::new(file, "`notify.forgejo` needs `token_file`")
                    .line(node.line)
                    .hint("a Forgejo access token with repository write scope, in a file (chmod 600)"),
            );
        }
        let repository = match f.string("repository", diags) {
            Some((r, line)) if !valid_repository(&r) => {
                diags.push(
                    Diagnostic::new(
                        file,
                        format!("`notify.forgejo.repository: {r}` is not owner/name"),
                    )
                    .line(line)
                    .hint("e.g. repository: erich/homelab"),
                );
                None
            }
            Some((r, _)) => Some(r),
            None => match repo.and_then(repository_of) {
                Some(r) if valid_repository(&r) => Some(r),
                _ => {
                    diags.push(
                        Diagnostic::new(
                            file,
                            "`notify.forgejo` needs `repository`: `repo` is not a forge URL to take it from",
                        )
                        .line(node.line)
                        .hint("repository: owner/name (the repository on the forge whose commits the agent applies)"),
                    );
                    None
                }
            },
        };
        let target_url = f.string("target_url", diags).and_then(|u| {
            http_url(
                file,
                "notify.forgejo.target_url",
                u,
                "target_url: https://indri.example/api/status",
                diags,
            )
        });
        f.finish(FORGEJO_KEYS, diags);
        Some(ForgejoNotify {
            url: url?.trim_end_matches('/').to_string(),
            repository: repository?,
            token_file: token_file?,
            target_url,
        })
    });
    let webhook = n.take("webhook").and_then(|node| {
        let mut w = MapReader::new(file, "`notify.webhook`", node, diags)?;
        let url = match w.string("url", diags) {
            Some(u) => http_url(
                file,
                "notify.webhook.url",
                u,
                "url: https://ntfy.example/homelab",
                diags,
            ),
            None => {
                if !w.has("url") {
                    diags.push(
                        Diagnostic::new(file, "`notify.webhook` needs `url`")
                            .line(node.line)
                            .hint("webhook: {url: https://ntfy.example/homelab}"),
                    );
                }
                None
            }
        };
        let token_file = w.string("token_file", diags).map(|t| rel(t.0));
        w.finish(WEBHOOK_KEYS, diags);
        Some(WebhookNotify {
            url: url?,
            token_file,
        })
    });
    let timeout = duration(&mut n, "timeout", diags).unwrap_or(Duration::from_secs(10));
    if timeout > Duration::from_secs(60) {
        diags.push(
            Diagnostic::new(
                file,
                "`notify.timeout` is longer than 1m: a slow forge would hold every run up",
            )
            .line(node.line)
            .hint("timeout: 10s (the default)"),
        );
    }
    n.finish(NOTIFY_KEYS, diags);
    if diags.len() > before {
        return None;
    }
    Some(NotifyConfig {
        forgejo,
        webhook,
        timeout,
    })
}

/// The `loki:` section. Every problem is reported; `None` if any.
fn loki(
    file: &str,
    node: &yaml::Node,
    rel: &dyn Fn(String) -> PathBuf,
    diags: &mut Diagnostics,
) -> Option<LokiConfig> {
    let before = diags.len();
    let mut l = MapReader::new(file, "`loki`", node, diags)?;
    let url = match l.string("url", diags) {
        None => {
            if !l.has("url") {
                diags.push(
                    Diagnostic::new(file, "`loki` needs `url`")
                        .line(node.line)
                        .hint("loki: {url: http://loki.example:3100}"),
                );
            }
            None
        }
        Some((url, line)) => {
            if let Some(why) = url_credentials_problem(&url) {
                diags.push(
                    Diagnostic::new(
                        file,
                        format!("`loki.url: {}` {why}", crate::redact::url_credentials(&url)),
                    )
                    .line(line)
                    .hint("use `username` and `password_file` (chmod 600), and rotate the password: it was written in the config"),
                );
            }
            let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
            let host_ok = url
                .split_once("://")
                .is_some_and(|(_, rest)| !rest.is_empty() && !rest.starts_with('/'));
            if !scheme_ok || !host_ok || url.contains(char::is_whitespace) {
                diags.push(
                    Diagnostic::new(file, format!("`loki.url: {url}` is not an http(s) URL"))
                        .line(line)
                        .hint("e.g. url: http://loki.example:3100 (the push path is added)"),
                );
                None
            } else {
                Some(loki_push_url(&url))
            }
        }
    };
    let format = match l.string("format", diags) {
        None => LokiFormat::Protobuf,
        Some((f, _)) if f == "protobuf" => LokiFormat::Protobuf,
        Some((f, _)) if f == "json" => LokiFormat::Json,
        Some((f, line)) => {
            diags.push(
                Diagnostic::new(file, format!("`loki.format: {f}` is not a push format"))
                    .line(line)
                    .hint("protobuf (the default: snappy-compressed, as Promtail sends) or json"),
            );
            LokiFormat::Protobuf
        }
    };
    let tenant = l.string("tenant", diags).and_then(|(t, line)| {
        let allowed = |c: char| c.is_ascii_alphanumeric() || "!-_.*'()".contains(c);
        if t.is_empty() || t.len() > 150 || t == "." || t == ".." || !t.chars().all(allowed) {
            diags.push(
                Diagnostic::new(file, format!("`loki.tenant: {t}` is not a Loki tenant id"))
                    .line(line)
                    .hint("1 to 150 letters, digits and ! - _ . * ' ( ); one tenant only"),
            );
            None
        } else {
            Some(t)
        }
    });
    let username = l.string("username", diags);
    let password_file = l.string("password_file", diags);
    if let (Some((_, line)), None) | (None, Some((_, line))) = (&username, &password_file) {
        diags.push(
            Diagnostic::new(
                file,
                "`loki` basic auth needs both `username` and `password_file`",
            )
            .line(*line)
            .hint("username: agent, password_file: /etc/homelab-agent/loki-password (chmod 600)"),
        );
    }
    let batch_size = int_in(&mut l, "batch_size", 1, 10_000, diags).unwrap_or(100);
    let batch_wait = duration_at_least(&mut l, "batch_wait", Duration::from_millis(100), diags)
        .unwrap_or(Duration::from_secs(1));
    let max_buffered_events =
        int_in(&mut l, "max_buffered_events", 1, 1_000_000, diags).unwrap_or(5_000);
    let max_retries = int_in(&mut l, "max_retries", 0, 100, diags).unwrap_or(10) as u32;
    let max_backoff = duration_at_least(&mut l, "max_backoff", Duration::from_secs(1), diags)
        .unwrap_or(Duration::from_secs(60));
    let timeout = duration_at_least(&mut l, "timeout", Duration::from_secs(1), diags)
        .unwrap_or(Duration::from_secs(10));
    l.finish(LOKI_KEYS, diags);
    if diags.len() > before {
        return None;
    }
    Some(LokiConfig {
        push_url: url?,
        format,
        tenant,
        username: username.map(|u| u.0),
        password_file: password_file.map(|p| rel(p.0)),
        batch_size,
        batch_wait,
        max_buffered_events,
        max_retries,
        max_backoff,
        timeout,
    })
}

/// The push endpoint of `loki.url`: `/loki/api/v1/push` appended to the
/// path unless it already ends with it (so a server that serves Loki's API
/// under a prefix, VictoriaLogs' `/insert`, is given as either); the query
/// string is kept.
fn loki_push_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let base = base.trim_end_matches('/');
    let mut out = if base.ends_with(LOKI_PUSH_PATH) {
        base.to_string()
    } else {
        format!("{base}{LOKI_PUSH_PATH}")
    };
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// Why a URL may not be used as written: it holds a password
/// (`scheme://user:password@host`). `None`: fine. A user name alone stays
/// allowed (the token file's token goes with it), though messages hide it
/// too, since forges also take a token there.
fn url_credentials_problem(url: &str) -> Option<&'static str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (userinfo, _) = authority.rsplit_once('@')?;
    userinfo.contains(':').then_some(
        "holds a password; the agent never takes one from a URL (it would show in logs and status)",
    )
}

/// Shortest webhook secret and API token accepted, in bytes: 32 bytes
/// (256 bits) is HMAC-SHA256's output size, the key length RFC 2104 (§3)
/// recommends as a minimum (shorter keys weaken the MAC); GitHub and
/// Forgejo ask for a random, high-entropy secret. `openssl rand -hex 32`
/// makes one of 64.
pub const MIN_SHARED_SECRET_BYTES: usize = 32;

/// What [`check_credentials`] read: the values the daemon needs at start.
#[derive(Default)]
pub struct Credentials {
    /// The webhook HMAC key, when `webhook_secret_file` is set.
    pub webhook_secret: Option<Vec<u8>>,
    /// The bearer token of `/api/status` and `/metrics`, when `api_token_file` is set.
    pub api_token: Option<Vec<u8>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Reads a file holding a credential: a regular file, mode 0600 or
/// stricter (no group or other bits), UTF-8-clean or not, not empty once
/// trimmed. The content is never part of an error.
pub fn read_private_file(path: &Path, what: &'static str) -> Result<Vec<u8>, CredentialError> {
    use std::os::unix::fs::PermissionsExt;
    let unreadable = |source| CredentialError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if !meta.is_file() {
        return Err(CredentialError::NotRegular {
            what,
            path: path.to_path_buf(),
        });
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(CredentialError::Exposed {
            what,
            path: path.to_path_buf(),
            mode: meta.permissions().mode() & 0o777,
        });
    }
    // Bounded: a credential is a line, not a disk image someone pointed us at.
    if meta.len() > MAX_CREDENTIAL_BYTES {
        return Err(CredentialError::TooLarge {
            what,
            path: path.to_path_buf(),
            len: meta.len(),
        });
    }
    let bytes = std::fs::read(path).map_err(unreadable)?;
    let value = bytes.trim_ascii().to_vec();
    if value.is_empty() {
        return Err(CredentialError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(value)
}

/// The largest credential file read (a credential is one line).
const MAX_CREDENTIAL_BYTES: u64 = 64 * 1024;

/// Why a credential file cannot be used. Never holds its content.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {} is not a regular file", path.display())]
    NotRegular { what: &'static str, path: PathBuf },
    #[error("{what} {} is readable by group or others (mode {mode:04o}); run: chmod 600 {}", path.display(), path.display())]
    Exposed {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("{what} {} is {len} bytes; a credential file holds one value (at most {MAX_CREDENTIAL_BYTES} bytes)", path.display())]
    TooLarge {
        what: &'static str,
        path: PathBuf,
        len: u64,
    },
    #[error("{what} {} is empty; put the value in it", path.display())]
    Empty { what: &'static str, path: PathBuf },
    #[error("{what} {} holds {len} bytes; `{key}` needs at least {MIN_SHARED_SECRET_BYTES} (256 bits, HMAC-SHA256's key size: a short secret can be guessed)\n    make one: openssl rand -hex 32 > {} && chmod 600 {}", path.display(), path.display(), path.display())]
    TooShort {
        what: &'static str,
        path: PathBuf,
        len: usize,
        key: &'static str,
    },
    #[error("{what} {} is not UTF-8 text", path.display())]
    NotText { what: &'static str, path: PathBuf },
}

/// [`read_private_file`] for a shared secret that must also be long enough
/// ([`MIN_SHARED_SECRET_BYTES`]).
fn read_shared_secret(
    path: &Path,
    what: &'static str,
    key: &'static str,
) -> Result<Vec<u8>, CredentialError> {
    let value = read_private_file(path, what)?;
    if value.len() < MIN_SHARED_SECRET_BYTES {
        return Err(CredentialError::TooShort {
            what,
            path: path.to_path_buf(),
            len: value.len(),
            key,
        });
    }
    Ok(value)
}

/// Checks every file the config names, the way `agent run` uses them: the
/// one check behind `agent run` (at start and on SIGHUP), `agent validate
/// --config` and the CLI commands that take `--config`, so a config that
/// validates starts. Every problem is reported at once.
///
/// Checked: `webhook_secret_file` and `api_token_file` (private, not empty,
/// at least [`MIN_SHARED_SECRET_BYTES`]), `token_file`,
/// `onepassword.token_file` and `loki.password_file` (private, not empty;
/// through the readers that use them), `onepassword.connect_url`, and
/// `verify.allowed_signers` (parses, with at least one key).
pub fn check_credentials(config: &AgentConfig) -> Result<Credentials, ConfigError> {
    let mut problems = Vec::new();
    let mut creds = Credentials::default();
    // Each problem is `key: what is wrong` (the key as written in the config).
    fn noted<E: std::fmt::Display>(problems: &mut Vec<String>, key: &str, r: Result<(), E>) {
        if let Err(e) = r {
            problems.push(crate::redact::url_credentials_owned(&format!("{key}: {e}")));
        }
    }
    if let Some(path) = &config.webhook_secret_file {
        noted(
            &mut problems,
            "webhook_secret_file",
            read_shared_secret(path, "webhook secret file", "webhook_secret_file")
                .map(|v| creds.webhook_secret = Some(v)),
        );
    }
    if let Some(path) = &config.api_token_file {
        noted(
            &mut problems,
            "api_token_file",
            read_shared_secret(path, "API token file", "api_token_file")
                .map(|v| creds.api_token = Some(v)),
        );
    }
    if let Some(path) = &config.token_file {
        noted(
            &mut problems,
            "token_file",
            crate::source::git::read_token(path)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        );
    }
    if let Some(op) = &config.onepassword {
        noted(
            &mut problems,
            "onepassword",
            crate::secrets::connect::ConnectClient::check(
                &crate::secrets::connect::ConnectConfig::new(
                    op.connect_url.clone(),
                    op.token_file.clone(),
                ),
            )
            .map(|_| ())
            .map_err(|e| e.to_string()),
        );
    }
    if let Some(path) = config.loki.as_ref().and_then(|l| l.password_file.as_ref()) {
        noted(
            &mut problems,
            "loki.password_file",
            // As the Loki shipper reads it at start: private, and text.
            read_private_file(path, "Loki password file").and_then(|bytes| {
                String::from_utf8(bytes)
                    .map(|_| ())
                    .map_err(|_| CredentialError::NotText {
                        what: "Loki password file",
                        path: path.clone(),
                    })
            }),
        );
    }
    if let Some(f) = config.notify.as_ref().and_then(|n| n.forgejo.as_ref()) {
        noted(
            &mut problems,
            "notify.forgejo.token_file",
            read_private_file(&f.token_file, "Forgejo token file").map(|_| ()),
        );
    }
    if let Some(path) = config
        .notify
        .as_ref()
        .and_then(|n| n.webhook.as_ref())
        .and_then(|w| w.token_file.as_ref())
    {
        noted(
            &mut problems,
            "notify.webhook.token_file",
            read_private_file(path, "webhook token file").map(|_| ()),
        );
    }
    if let Some(v) = &config.verify {
        let path = &v.allowed_signers;
        noted(
            &mut problems,
            "verify.allowed_signers",
            check_regular(path, MAX_CONFIG_BYTES)
                .map_err(|e| format!("{}: {e}", path.display()))
                .and_then(|()| {
                    crate::source::verify::AllowedSigners::load(path)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }),
        );
    }
    if problems.is_empty() {
        Ok(creds)
    } else {
        Err(ConfigError::Credentials {
            path: config.file.clone(),
            problems,
        })
    }
}

/// An integer in `min..=max`.
fn int_in(
    r: &mut MapReader<'_>,
    key: &str,
    min: i64,
    max: i64,
    diags: &mut Diagnostics,
) -> Option<usize> {
    let node = r.take(key)?;
    match &node.value {
        Value::Int(n) if (min..=max).contains(n) => Some(*n as usize),
        _ => {
            diags.push(r.diag(
                node.line,
                format!("`{key}` must be a whole number from {min} to {max}"),
            ));
            None
        }
    }
}

/// This machine's hostname up to the first dot.
pub fn short_hostname() -> Result<String, std::io::Error> {
    let name = nix::unistd::gethostname().map_err(|e| {
        std::io::Error::other(format!(
            "cannot read this machine's hostname ({e}); pass --host"
        ))
    })?;
    let name = name.to_string_lossy();
    Ok(name.split('.').next().unwrap_or(&name).to_string())
}

/// The default state directory (inside the sandbox with `--root`).
pub fn default_state_dir(root: Option<&Path>) -> PathBuf {
    match root {
        Some(root) => root.join("var/lib/homelab-agent"),
        None if cfg!(target_os = "macos") => PathBuf::from("/usr/local/var/homelab-agent"),
        None => PathBuf::from("/var/lib/homelab-agent"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse(
            Path::new("/etc/homelab-agent/agent.yaml"),
            "repo: https://forge.example/o/r.git\ntoken_file: token\n",
        )
        .unwrap();
        assert_eq!(c.reference, "main");
        assert_eq!(c.poll_interval, Duration::from_secs(60));
        assert_eq!(c.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(
            c.token_file.as_deref(),
            Some(Path::new("/etc/homelab-agent/token"))
        );
        assert_eq!(c.on_drift, DriftPolicy::Heal);
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn an_oversized_or_special_config_file_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("agent.yaml");
        let mut text = String::from("repo: https://forge.example/o/r.git\n");
        text.push_str(&"# padding\n".repeat(yaml::MAX_FILE_BYTES / 10 + 1));
        std::fs::write(&big, &text).unwrap();
        let err = load(&big).unwrap_err().to_string();
        assert!(
            err.contains("agent.yaml: the file is over the limit of 4,194,304 bytes"),
            "{err}"
        );
        // A FIFO is refused at once instead of blocking the agent forever.
        let fifo = dir.path().join("fifo.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = load(&fifo).unwrap_err().to_string();
        assert!(err.contains("fifo.yaml: not a regular file"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let err = parse(
            Path::new("agent.yaml"),
            "ref: main\npoll_interval: 0\nlisten: nowhere\nlog_format: xml\nverify: {}\npol_interval: 5\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "agent.yaml:1: the agent config has no `repo`",
            "agent.yaml:2: `poll_interval` must be a duration",
            "agent.yaml:3: `listen: nowhere` is not an address:port",
            "agent.yaml:4: `log_format` must be `text` or `json`, found `xml`",
            "agent.yaml:5: `verify` needs `allowed_signers`",
            "agent.yaml:6: unknown key `pol_interval`",
            "did you mean `poll_interval`?",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
    }

    #[test]
    fn loki_defaults_and_push_path() {
        let c = parse(
            Path::new("/etc/homelab-agent/agent.yaml"),
            "repo: .\nloki:\n  url: http://loki:3100/\n  tenant: homelab\n  username: agent\n  password_file: loki-password\n",
        )
        .unwrap();
        let l = c.loki.unwrap();
        assert_eq!(l.push_url, "http://loki:3100/loki/api/v1/push");
        assert_eq!(l.tenant.as_deref(), Some("homelab"));
        assert_eq!(l.username.as_deref(), Some("agent"));
        assert_eq!(
            l.password_file.as_deref(),
            Some(Path::new("/etc/homelab-agent/loki-password"))
        );
        assert_eq!(
            (
                l.batch_size,
                l.batch_wait,
                l.max_buffered_events,
                l.max_retries
            ),
            (100, Duration::from_secs(1), 5_000, 10)
        );
        let c = parse(
            Path::new("a.yaml"),
            "repo: .\nloki: {url: \"https://gw.example/loki/api/v1/push\", batch_wait: 250ms}\n",
        )
        .unwrap();
        let l = c.loki.unwrap();
        assert_eq!(l.push_url, "https://gw.example/loki/api/v1/push");
        assert_eq!(l.batch_wait, Duration::from_millis(250));
        assert_eq!(l.format, LokiFormat::Protobuf);
        for (url, push_url) in [
            (
                "http://vl:9428/insert/loki/api/v1/push?_msg_field=msg",
                "http://vl:9428/insert/loki/api/v1/push?_msg_field=msg",
            ),
            (
                "http://vl:9428/insert/?_msg_field=msg",
                "http://vl:9428/insert/loki/api/v1/push?_msg_field=msg",
            ),
            ("http://loki:3100?", "http://loki:3100/loki/api/v1/push"),
        ] {
            let c = parse(
                Path::new("a.yaml"),
                &format!("repo: .\nloki: {{url: \"{url}\", format: json}}\n"),
            )
            .unwrap();
            let l = c.loki.unwrap();
            assert_eq!(
                (l.push_url.as_str(), l.format),
                (push_url, LokiFormat::Json)
            );
        }
        let err = parse(
            Path::new("a.yaml"),
            "repo: .\nloki:\n  url: http://loki:3100\n  format: snappy\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("a.yaml:4: `loki.format: snappy` is not a push format"),
            "{err}"
        );
        assert!(parse(Path::new("a.yaml"), "repo: .\n")
            .unwrap()
            .loki
            .is_none());
    }

    #[test]
    fn loki_problems_are_reported_with_their_lines() {
        let err = parse(
            Path::new("agent.yaml"),
            "repo: .\nloki:\n  url: loki:3100\n  tenant: a|b\n  username: agent\n  batch_size: 0\n  batch_wait: 10ms\n  max_retries: -1\n  batchsize: 5\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "agent.yaml:3: `loki.url: loki:3100` is not an http(s) URL",
            "agent.yaml:4: `loki.tenant: a|b` is not a Loki tenant id",
            "agent.yaml:5: `loki` basic auth needs both `username` and `password_file`",
            "agent.yaml:6: `batch_size` must be a whole number from 1 to 10000",
            "agent.yaml:7: `batch_wait` must be a duration of at least 100ms",
            "agent.yaml:8: `max_retries` must be a whole number from 0 to 100",
            "agent.yaml:9: unknown key `batchsize`",
            "did you mean `batch_size`?",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
        let err = parse(Path::new("agent.yaml"), "repo: .\nloki: {tenant: t}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("agent.yaml:2: `loki` needs `url`"), "{err}");
    }

    #[test]
    fn notify_takes_the_repository_from_repo_and_reports_problems_with_lines() {
        let c = parse(
            Path::new("/etc/homelab-agent/agent.yaml"),
            "repo: https://forgejo.example/erich/homelab.git\nnotify:\n  forgejo:\n    url: https://forgejo.example/\n    token_file: forgejo-token\n  webhook: {url: \"https://ntfy.example/homelab\"}\n",
        )
        .unwrap();
        let n = c.notify.unwrap();
        let f = n.forgejo.unwrap();
        assert_eq!(f.url, "https://forgejo.example");
        assert_eq!(f.repository, "erich/homelab");
        assert_eq!(f.token_file, Path::new("/etc/homelab-agent/forgejo-token"));
        assert_eq!(n.webhook.unwrap().url, "https://ntfy.example/homelab");
        assert_eq!(n.timeout, Duration::from_secs(10));
        assert_eq!(
            repository_of("git@forgejo.example:erich/homelab.git").as_deref(),
            Some("erich/homelab")
        );
        assert_eq!(repository_of("/srv/homelab"), None);

        let err = parse(
            Path::new("agent.yaml"),
            "repo: .\nnotify:\n  forgejo:\n    url: forgejo.example\n    token_file: t\n  webhook:\n    url: \"https://u:p@ntfy.example/x\"\n  timeout: 5m\n  mail: x\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "agent.yaml:4: `notify.forgejo` needs `repository`",
            "agent.yaml:4: `notify.forgejo.url: forgejo.example` is not an http(s) URL",
            "agent.yaml:7: `notify.webhook.url: ",
            "holds a password",
            "agent.yaml:3: `notify.timeout` is longer than 1m",
            "agent.yaml:9: unknown key `mail`",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
        assert!(!err.contains("u:p"), "{err}");
    }

    fn private(dir: &Path, name: &str, content: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// Every credential problem is reported at once, none with its value;
    /// the one check that `agent run` and `agent validate --config` share.
    #[test]
    fn credential_files_are_checked_all_at_once_without_their_values() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let short = private(d, "short", "only-twenty-one-bytes", 0o600);
        let empty = private(d, "empty", "  \n", 0o600);
        let open = private(d, "open", &"o".repeat(40), 0o644);
        let signers = private(d, "signers", "# no keys\n", 0o644);
        let text = format!(
            "repo: .\nwebhook_secret_file: {}\napi_token_file: {}\ntoken_file: {}\nonepassword: {{connect_url: \"http://127.0.0.1:1\", token_file: {}}}\nloki: {{url: \"http://127.0.0.1:2\", username: a, password_file: {}}}\nverify: {{allowed_signers: {}}}\n",
            short.display(),
            empty.display(),
            open.display(),
            d.join("missing").display(),
            open.display(),
            signers.display(),
        );
        let c = parse(&d.join("agent.yaml"), &text).unwrap();
        let err = check_credentials(&c).unwrap_err().to_string();
        for want in [
            "6 file(s) it names cannot be used",
            "holds 21 bytes; `webhook_secret_file` needs at least 32",
            "API token file",
            "is empty",
            "token_file: the token file",
            "onepassword: cannot read the Connect token file",
            "loki.password_file: Loki password file",
            "Loki password file",
            "readable by group or others (mode 0644)",
            "verify.allowed_signers: ",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
        assert!(
            !err.contains("only-twenty-one-bytes") && !err.contains(&"o".repeat(40)),
            "{err}"
        );

        let good = private(d, "good", &"g".repeat(32), 0o600);
        let c = parse(
            &d.join("agent.yaml"),
            &format!(
                "repo: .\nwebhook_secret_file: {}\napi_token_file: {}\n",
                good.display(),
                good.display()
            ),
        )
        .unwrap();
        let creds = check_credentials(&c).unwrap();
        assert_eq!(
            creds.webhook_secret.as_deref(),
            Some("g".repeat(32).as_bytes())
        );
        assert!(!format!("{creds:?}").contains("ggg"));
    }

    #[test]
    fn credentials_in_urls_are_refused_without_being_repeated() {
        let err = parse(
            Path::new("agent.yaml"),
            "repo: https://ann:s3cr3t-tok@git.lan/o/r.git\nloki: {url: \"http://agent:pw-Zq9@loki:3100\"}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("agent.yaml:1: `repo: https://ann:***@git.lan/o/r.git` holds a password"),
            "{err}"
        );
        assert!(
            err.contains("agent.yaml:2: `loki.url: http://agent:***@loki:3100` holds a password"),
            "{err}"
        );
        assert!(
            !err.contains("s3cr3t-tok") && !err.contains("pw-Zq9"),
            "{err}"
        );
        let c = parse(
            Path::new("a.yaml"),
            "repo: ssh://git@git.lan/o/r.git\nrun_timeout: 5s\n",
        )
        .unwrap();
        assert!(parse(Path::new("a.yaml"), "repo: https://ann@git.lan/o/r.git\n").is_ok());
        assert_eq!(c.run_timeout, Duration::from_secs(5));
        assert_eq!(
            parse(Path::new("a.yaml"), "repo: .\n").unwrap().run_timeout,
            DEFAULT_RUN_TIMEOUT
        );
    }

    #[test]
    fn durations_accept_strings() {
        let c = parse(Path::new("a.yaml"), "repo: .\npoll_interval: 5m\n").unwrap();
        assert_eq!(c.poll_interval, Duration::from_secs(300));
    }
}
