//! Tells the operator how runs went, where they already look (`notify:` in
//! the agent config; the daemon calls it):
//!
//! - **Forgejo commit statuses.** `pending` when a run starts on a new
//!   revision, then `success` or `failure` on the commit it applied (or
//!   refused), with the context `homelab-agent/<host>`: the forge shows
//!   which hosts converged on each commit, as Flux's notification
//!   controller does for Gitea (`POST /api/v1/repos/{owner}/{repo}/statuses/{sha}`,
//!   `Authorization: token …`; see `specs/forgejo-commit-status.md`).
//!   Only commit ids get one (a local directory has no commit).
//! - **An ntfy-compatible webhook** on failure, rollback and drift: a POST
//!   with a text body and `Title`, `Priority` and `Tags` headers (ntfy's
//!   publish API; anything that takes that shape works). Each message is
//!   sent once: the same failure, rollback or set of drifted resources is
//!   not sent again until it changes.
//!
//! # Guarantees
//! - Bounded: one request per message, no retries, `notify.timeout` for
//!   connect and answer, no redirects followed, no proxy from the
//!   environment, answers read up to 64 KiB and never echoed.
//! - Nothing secret: tokens come from 0600 files and go only into the
//!   `Authorization` header (marked sensitive); every text sent passes the
//!   run's scrubber and loses URL credentials first.
//! - Never fails a run: errors are returned for the daemon to log and
//!   count (`homelab_agent_notify_errors_total{reason}`).

use std::sync::Mutex;

use reqwest::header::HeaderValue;

use crate::config::{self, NotifyConfig};

/// A commit status's state (Forgejo's `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Success,
    Failure,
}

/// What a notification is about (the webhook's message kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    Failure,
    Rollback,
    Drift,
}

impl AlertKind {
    fn name(self) -> &'static str {
        match self {
            AlertKind::Failure => "failure",
            AlertKind::Rollback => "rollback",
            AlertKind::Drift => "drift",
        }
    }
}

/// Why a notification was not delivered. Holds no token and no body.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notify: {0}")]
    Credential(#[from] config::CredentialError),
    #[error("notify: the {what} token holds characters not allowed in an HTTP header")]
    BadToken { what: &'static str },
    #[error("notify: cannot set up the HTTP client: {0}")]
    Client(String),
    #[error("{target}: cannot reach {url}: {error}")]
    Unreachable {
        target: &'static str,
        url: String,
        error: String,
    },
    #[error("{target}: {url} answered {status}{hint}")]
    Refused {
        target: &'static str,
        url: String,
        status: u16,
        hint: &'static str,
    },
}

impl NotifyError {
    /// The metric label: which target failed (`telemetry::metrics::NOTIFY_ERROR_REASONS`).
    pub fn target(&self) -> &'static str {
        match self {
            NotifyError::Unreachable { target, .. } | NotifyError::Refused { target, .. } => target,
            _ => "forgejo",
        }
    }
}

/// What a finished run tells: the revision it applied, and what went
/// wrong or drifted. Texts are scrubbed again before they leave.
#[derive(Debug, Default, Clone)]
pub struct RunNotice {
    pub revision: String,
    /// The run failed: the first error (a resource, a stack, a refusal).
    pub failure: Option<String>,
    /// How many entries failed (for the message).
    pub failed: usize,
    /// Resources applied and put back: a service they feed did not start.
    pub rolled_back: Vec<String>,
    /// Resources and stack objects found drifted.
    pub drifted: Vec<String>,
    /// Of those, healed (the rest are reported only, `on_drift: report`).
    pub healed: usize,
}

impl RunNotice {
    /// What `run` tells: failed when apply was refused or something
    /// failed (skipped entries are not failures), the rolled-back
    /// resources, and every drifted resource and stack object.
    pub fn from_run(run: &crate::run::RunReport) -> RunNotice {
        let mut notice = RunNotice {
            revision: run.plan.catalog.revision.clone(),
            ..RunNotice::default()
        };
        for p in &run.plan.resources {
            if p.class == crate::plan::Classification::Drift {
                notice
                    .drifted
                    .push(run.plan.catalog.entries[p.index].id.clone());
            }
        }
        for st in &run.stacks {
            for o in &st.objects {
                if o.class == crate::plan::Classification::Drift {
                    notice.drifted.push(o.id.clone());
                }
            }
        }
        match &run.apply {
            crate::run::ApplyStage::NotAsked => {}
            crate::run::ApplyStage::Refused(e) => {
                notice.failure = Some(e.to_string());
                notice.failed = run.plan.failures.len();
            }
            crate::run::ApplyStage::Done(applied) => {
                let counts = applied.counts();
                notice.healed = counts.drift_healed as usize;
                notice.failed = counts.failed as usize;
                if applied.failed() {
                    notice.failure = Some(
                        applied
                            .record
                            .error
                            .clone()
                            .unwrap_or_else(|| format!("{} failed", counts.failed)),
                    );
                }
                let stacks = applied.stacks.iter().flat_map(|s| &s.outcomes);
                for o in applied.host.outcomes.iter().chain(stacks) {
                    if o.rolled_back() {
                        notice.rolled_back.push(o.id.clone());
                    }
                }
            }
        }
        notice
    }
}

/// The longest description Forgejo shows well.
const MAX_DESCRIPTION: usize = 140;
/// ntfy's message limit (larger bodies become attachments).
const MAX_BODY: usize = 4096;

struct Forgejo {
    /// `…/api/v1/repos/{owner}/{name}/statuses/`.
    statuses_url: String,
    auth: HeaderValue,
    target_url: Option<String>,
}

struct Webhook {
    url: String,
    auth: Option<HeaderValue>,
}

/// How many revisions [`Sent`] remembers.
const REMEMBERED: usize = 32;

/// What was sent, so nothing is sent twice: per revision (a refused one
/// and the last good one it falls back to alternate every run) the last
/// status, failure and rollback; the last set of drifted resources.
#[derive(Default)]
struct Sent {
    status: Vec<(String, State)>,
    failure: Vec<(String, String)>,
    rollback: Vec<(String, String)>,
    drift: Option<String>,
}

/// Sets `key`'s value in a bounded list; `true` when it changed.
fn remember<V: PartialEq>(list: &mut Vec<(String, V)>, key: &str, value: V) -> bool {
    match list.iter_mut().find(|(k, _)| k == key) {
        Some((_, v)) if *v == value => false,
        Some((_, v)) => {
            *v = value;
            true
        }
        None => {
            if list.len() >= REMEMBERED {
                list.remove(0);
            }
            list.push((key.to_string(), value));
            true
        }
    }
}

/// The notifier of one host. Not `Debug`: it holds tokens.
pub struct Notifier {
    host: String,
    context: String,
    timeout: std::time::Duration,
    forgejo: Option<Forgejo>,
    webhook: Option<Webhook>,
    sent: Mutex<Sent>,
}

impl Notifier {
    /// Reads the token files (0600) and builds the bounded client. `None`
    /// when nothing is configured.
    pub fn new(host: &str, cfg: &NotifyConfig) -> Result<Option<Notifier>, NotifyError> {
        if cfg.forgejo.is_none() && cfg.webhook.is_none() {
            return Ok(None);
        }
        let header = |token: Vec<u8>, scheme: &str, what| {
            let mut value = HeaderValue::from_bytes(&[scheme.as_bytes(), &token].concat())
                .map_err(|_| NotifyError::BadToken { what })?;
            value.set_sensitive(true);
            Ok::<_, NotifyError>(value)
        };
        let forgejo = match &cfg.forgejo {
            Some(f) => Some(Forgejo {
                statuses_url: format!("{}/api/v1/repos/{}/statuses/", f.url, f.repository),
                auth: header(
                    config::read_private_file(&f.token_file, "Forgejo token file")?,
                    "token ",
                    "Forgejo",
                )?,
                target_url: f.target_url.clone(),
            }),
            None => None,
        };
        let webhook = match &cfg.webhook {
            Some(w) => Some(Webhook {
                url: w.url.clone(),
                auth: match &w.token_file {
                    Some(p) => Some(header(
                        config::read_private_file(p, "webhook token file")?,
                        "Bearer ",
                        "webhook",
                    )?),
                    None => None,
                },
            }),
            None => None,
        };
        Ok(Some(Notifier {
            host: host.to_string(),
            context: format!("homelab-agent/{host}"),
            timeout: cfg.timeout,
            forgejo,
            webhook,
            sent: Mutex::new(Sent::default()),
        }))
    }

    /// The commit-status context: `homelab-agent/<host>`.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// The bounded client, built per batch of notifications on the calling
    /// (blocking) thread and dropped there: reqwest's blocking client owns
    /// a runtime that must not be dropped on the daemon's event loop.
    fn client(&self) -> Result<reqwest::blocking::Client, NotifyError> {
        crate::source::git::install_tls_provider();
        reqwest::blocking::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("homelab-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| NotifyError::Client(e.to_string()))
    }

    fn sent(&self) -> std::sync::MutexGuard<'_, Sent> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A run starts on `revision`: `pending` when it is not the revision
    /// the host last applied (nor the one already marked).
    pub fn run_started(&self, revision: &str, applied: Option<&str>) -> Vec<NotifyError> {
        if applied == Some(revision) {
            return Vec::new();
        }
        let result = self.client().and_then(|http| {
            self.status(&http, revision, State::Pending, "applying", &|t| {
                t.to_string()
            })
        });
        result.err().into_iter().collect()
    }

    /// A run finished: the commit status, then the webhook's failure,
    /// rollback and drift messages (each once). Returns what could not be
    /// delivered; the caller logs and counts it.
    pub fn run_finished(
        &self,
        notice: &RunNotice,
        scrub: &dyn Fn(&str) -> String,
    ) -> Vec<NotifyError> {
        let http = match self.client() {
            Ok(h) => h,
            Err(e) => return vec![e],
        };
        let mut errors = Vec::new();
        let rev = short(&notice.revision);
        let (state, description) = match &notice.failure {
            Some(first) => (
                State::Failure,
                format!(
                    "{} failed: {}",
                    self.host,
                    first.lines().next().unwrap_or("")
                ),
            ),
            None => (State::Success, format!("{} converged on {rev}", self.host)),
        };
        errors.extend(
            self.status(&http, &notice.revision, state, &description, scrub)
                .err(),
        );

        let mut sent = self.sent();
        let failure_msg = match &notice.failure {
            Some(first) if remember(&mut sent.failure, &notice.revision, first.clone()) => {
                Some(format!(
                    "Revision {rev}: the run failed ({} failed).\n{first}",
                    notice.failed.max(1)
                ))
            }
            Some(_) => None,
            None => {
                // Converged: the next failure of this revision (or of a
                // fetch, which has none) is news again.
                sent.failure
                    .retain(|(r, _)| r != &notice.revision && !r.is_empty());
                None
            }
        };
        let rollback_msg = match notice.rolled_back.join("\n") {
            ids if ids.is_empty() => {
                sent.rollback.retain(|(r, _)| r != &notice.revision);
                None
            }
            ids if remember(&mut sent.rollback, &notice.revision, ids.clone()) => Some(format!(
                "Revision {rev}: rolled back (a service did not start with the change; it is held until the desired state changes):\n{ids}"
            )),
            _ => None,
        };
        let mut drifted = notice.drifted.clone();
        drifted.sort();
        let drift_key = (!drifted.is_empty()).then(|| drifted.join("\n"));
        let drift_msg = (drift_key.is_some() && drift_key != sent.drift).then(|| {
            format!(
                "Revision {rev}: {} drifted ({} healed, {} reported only):\n{}",
                drifted.len(),
                notice.healed.min(drifted.len()),
                drifted.len().saturating_sub(notice.healed),
                drifted.join("\n")
            )
        });
        sent.drift = drift_key;
        drop(sent);
        for (kind, msg) in [
            (AlertKind::Failure, failure_msg),
            (AlertKind::Rollback, rollback_msg),
            (AlertKind::Drift, drift_msg),
        ] {
            if let Some(msg) = msg {
                errors.extend(self.alert(&http, kind, &msg, scrub).err());
            }
        }
        errors
    }

    /// A revision was refused before anything was applied (fetch,
    /// signature, validation): `failure` on its commit, and the webhook.
    pub fn refused(
        &self,
        revision: Option<&str>,
        stage: &str,
        error: &str,
        scrub: &dyn Fn(&str) -> String,
    ) -> Vec<NotifyError> {
        let notice = RunNotice {
            revision: revision.unwrap_or_default().to_string(),
            failure: Some(format!("revision refused at {stage}: {error}")),
            failed: 1,
            ..RunNotice::default()
        };
        self.run_finished(&notice, scrub)
    }

    /// Sets the commit status (unless it is what was set last).
    fn status(
        &self,
        http: &reqwest::blocking::Client,
        revision: &str,
        state: State,
        description: &str,
        scrub: &dyn Fn(&str) -> String,
    ) -> Result<(), NotifyError> {
        let Some(f) = &self.forgejo else {
            return Ok(());
        };
        if !is_commit_id(revision) {
            return Ok(());
        }
        if self
            .sent()
            .status
            .iter()
            .any(|(r, st)| r == revision && *st == state)
        {
            return Ok(());
        }
        let body = serde_json::json!({
            "state": state,
            "context": self.context,
            "description": clip(&clean(description, scrub), MAX_DESCRIPTION),
            "target_url": f.target_url.clone().unwrap_or_default(),
        });
        let url = format!("{}{revision}", f.statuses_url);
        let request = http
            .post(&url)
            .header(reqwest::header::AUTHORIZATION, f.auth.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .json(&body);
        send("forgejo", &url, request, |status| match status {
            401 => "; the token is not accepted (notify.forgejo.token_file)",
            403 => "; the token lacks repository write scope",
            404 => "; no such repository or commit (notify.forgejo.repository)",
            422 => "; the status was refused as invalid",
            _ => "",
        })?;
        remember(&mut self.sent().status, revision, state);
        Ok(())
    }

    /// Posts one webhook message.
    fn alert(
        &self,
        http: &reqwest::blocking::Client,
        kind: AlertKind,
        message: &str,
        scrub: &dyn Fn(&str) -> String,
    ) -> Result<(), NotifyError> {
        let Some(w) = &self.webhook else {
            return Ok(());
        };
        let (title, priority, tags) = match kind {
            AlertKind::Failure => (
                format!("{}: run failed", self.host),
                "high",
                "rotating_light",
            ),
            AlertKind::Rollback => (
                format!("{}: change rolled back", self.host),
                "high",
                "leftwards_arrow_with_hook",
            ),
            AlertKind::Drift => (format!("{}: drift", self.host), "default", "warning"),
        };
        let mut request = http
            .post(&w.url)
            .header("Title", header_text(&title))
            .header("Priority", priority)
            .header("Tags", format!("homelab-agent,{},{tags}", kind.name()))
            .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(clip(&clean(message, scrub), MAX_BODY));
        if let Some(auth) = &w.auth {
            request = request.header(reqwest::header::AUTHORIZATION, auth.clone());
        }
        let url = crate::redact::url_credentials_owned(&w.url);
        send("webhook", &url, request, |status| match status {
            401 | 403 => "; the token is not accepted (notify.webhook.token_file)",
            _ => "",
        })
    }
}

/// Sends `request`; a 2xx answer is success. The answer's body is read
/// (bounded) and dropped, never echoed.
fn send(
    target: &'static str,
    url: &str,
    request: reqwest::blocking::RequestBuilder,
    hint: fn(u16) -> &'static str,
) -> Result<(), NotifyError> {
    use std::io::Read;
    let url = crate::redact::url_credentials_owned(url);
    let response = request.send().map_err(|e| NotifyError::Unreachable {
        target,
        url: url.clone(),
        error: crate::redact::url_credentials_owned(&error_chain(&e)),
    })?;
    let status = response.status().as_u16();
    let _ = response.take(64 * 1024).read_to_end(&mut Vec::new());
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(NotifyError::Refused {
            target,
            url,
            status,
            hint: hint(status),
        })
    }
}

/// An error and its sources, one line (reqwest's top level says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The run's scrubber, then URL credentials.
fn clean(text: &str, scrub: &dyn Fn(&str) -> String) -> String {
    crate::redact::url_credentials_owned(&scrub(text))
}

/// At most `max` bytes, cut at a character boundary with `…`.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A header value: printable ASCII only (HTTP headers are not UTF-8).
fn header_text(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// A full commit id (SHA-1 or SHA-256), the only revisions a forge knows.
pub fn is_commit_id(revision: &str) -> bool {
    matches!(revision.len(), 40 | 64) && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The first 12 characters of a commit id (whole otherwise).
fn short(revision: &str) -> &str {
    if is_commit_id(revision) {
        &revision[..12]
    } else {
        revision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_bounded_and_headers_ascii() {
        assert_eq!(clip("short", 10), "short");
        let long = "é".repeat(100);
        let c = clip(&long, 11);
        assert!(c.len() <= 11 && c.ends_with('…'), "{c}");
        assert_eq!(
            header_text("indri: ünïcode\r\nX: y"),
            "indri: ?n?code??X: y"
        );
        assert!(is_commit_id(&"a".repeat(40)));
        assert!(!is_commit_id("local-0123"));
        assert_eq!(short(&"b".repeat(40)), "bbbbbbbbbbbb");
    }
}
