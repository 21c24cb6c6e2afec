//! A **stand-in** for Forgejo's commit-status API and for an ntfy topic,
//! for tests of the agent's notifications. It is neither Forgejo nor ntfy:
//! a small HTTP/1.1 server (std::net, one thread per connection,
//! `Connection: close`, the plumbing of `standin.rs`) on 127.0.0.1 with a
//! free port. Facts it follows (`specs/forgejo-commit-status.md`, from the
//! Gitea API's `CreateStatusOption` model that Forgejo serves):
//!
//! - `POST /api/v1/repos/{owner}/{repo}/statuses/{sha}`, `sha` a full
//!   40-hex commit id, JSON body with `state` (`pending` | `success` |
//!   `error` | `failure` | `warning`), `context`, `description`,
//!   `target_url` (every field optional in the schema);
//! - auth `Authorization: token <access token>`: missing or wrong → `401`;
//! - an unknown repository, or a commit the repository does not hold →
//!   `404`; an unknown `state` or a body that is not a JSON object → `422`;
//! - success `201 Created` with the stored status as JSON (`id`, `state`,
//!   `context`, `description`, `target_url`, `created_at`, `creator`);
//! - read back `GET /api/v1/repos/{owner}/{repo}/commits/{ref}/statuses`
//!   (newest first) and `…/commits/{ref}/status` (combined: `state` the
//!   worst of the latest status per context).
//!
//! ntfy's publish API (`POST /{topic}` with the message as the text body
//! and `Title`, `Priority`, `Tags` headers, `200` with the message as
//! JSON) is served on `/ntfy/{topic}` of the same port, kept in
//! [`ForgejoStandIn::messages`].
//!
//! Test hooks: [`ForgejoStandIn::fail_with`] (answer every request with a
//! status, e.g. 500, storing nothing), [`ForgejoStandIn::stop`] /
//! [`ForgejoStandIn::restart`] (down, then up on the same port).
//! [`ForgejoStandIn::requests`] records every request with its raw body.

use crate::standin::{lock, read_head, Served};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Mutex, MutexGuard};

use serde_json::{json, Value};

/// Largest body read (a status is a few hundred bytes; ntfy caps messages
/// at 4 KiB before it makes them attachments).
const MAX_BODY: usize = 64 * 1024;

/// A stored commit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub id: u64,
    pub repo: String,
    pub sha: String,
    pub state: String,
    pub context: String,
    pub description: String,
    pub target_url: String,
}

/// A message published to an ntfy topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub title: Option<String>,
    pub priority: Option<String>,
    pub tags: Option<String>,
    pub authorization: Option<String>,
    pub body: String,
}

/// One request as received, with the status it was answered.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub status: u16,
    pub body: String,
}

#[derive(Default)]
struct State {
    token: String,
    /// `owner/name` → commits it holds.
    repos: Vec<(String, Vec<String>)>,
    statuses: Vec<Status>,
    messages: Vec<Message>,
    requests: Vec<Request>,
    fail: Option<u16>,
}

/// The stand-in (see the module docs). Stopped on Drop.
pub struct ForgejoStandIn {
    server: Served<State>,
}

impl ForgejoStandIn {
    /// Starts on a free port; requests must carry `token`.
    pub fn start(token: &str) -> ForgejoStandIn {
        let state = State {
            token: token.to_string(),
            ..State::default()
        };
        ForgejoStandIn {
            server: Served::start("forgejo-standin", state, handle),
        }
    }

    /// `http://127.0.0.1:PORT` (what `notify.forgejo.url` takes).
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The URL of an ntfy topic on this server.
    pub fn ntfy_url(&self, topic: &str) -> String {
        format!("{}/ntfy/{topic}", self.url())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.server.lock()
    }

    /// A repository `owner/name` holding `commits`.
    pub fn add_repo(&self, repo: &str, commits: &[String]) {
        let mut st = self.lock();
        match st.repos.iter_mut().find(|(r, _)| r == repo) {
            Some((_, c)) => c.extend(commits.iter().cloned()),
            None => st.repos.push((repo.to_string(), commits.to_vec())),
        }
    }

    /// Answer every request with `status` (storing nothing); `None`: serve.
    pub fn fail_with(&self, status: Option<u16>) {
        self.lock().fail = status;
    }

    pub fn stop(&mut self) {
        self.server.stop();
    }

    pub fn restart(&mut self) {
        self.server.restart();
    }

    /// Every status stored, oldest first.
    pub fn statuses(&self) -> Vec<Status> {
        self.lock().statuses.clone()
    }

    /// Every ntfy message stored, oldest first.
    pub fn messages(&self) -> Vec<Message> {
        self.lock().messages.clone()
    }

    /// Every request received, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }
}

fn respond(conn: &mut TcpStream, status: u16, body: &Value) {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        _ => "Error",
    };
    let body = body.to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn handle(mut conn: TcpStream, state: &Mutex<State>) {
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let Some(head) = read_head(&mut conn) else {
        return;
    };
    let len = head.content_length();
    if len > MAX_BODY {
        respond(&mut conn, 413, &json!({"message": "body too large"}));
        return;
    }
    let mut body = head.rest.clone();
    let mut chunk = [0u8; 8192];
    while body.len() < len {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(len);
    let body = String::from_utf8_lossy(&body).into_owned();
    let header = |name: &str| {
        head.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut st = lock(state);
    let (status, answer) = match st.fail {
        Some(code) => (code, json!({"message": "stand-in failure"})),
        None => route(&mut st, &head.method, &head.target, &body, &header),
    };
    st.requests.push(Request {
        method: head.method.clone(),
        target: head.target.clone(),
        status,
        body,
    });
    drop(st);
    respond(&mut conn, status, &answer);
}

fn route(
    st: &mut State,
    method: &str,
    target: &str,
    body: &str,
    header: &dyn Fn(&str) -> Option<String>,
) -> (u16, Value) {
    let path = target.split('?').next().unwrap_or("");
    if let Some(topic) = path.strip_prefix("/ntfy/") {
        if method != "POST" && method != "PUT" {
            return (405, json!({"message": "method not allowed"}));
        }
        st.messages.push(Message {
            topic: topic.to_string(),
            title: header("title"),
            priority: header("priority"),
            tags: header("tags"),
            authorization: header("authorization"),
            body: body.to_string(),
        });
        return (
            200,
            json!({"id": st.messages.len().to_string(), "event": "message", "topic": topic, "message": body}),
        );
    }
    let Some(rest) = path.strip_prefix("/api/v1/repos/") else {
        return (404, json!({"message": "not found"}));
    };
    if header("authorization").as_deref() != Some(&format!("token {}", st.token)) {
        return (401, json!({"message": "token is required"}));
    }
    let parts: Vec<&str> = rest.split('/').collect();
    match (method, parts.as_slice()) {
        ("POST", [owner, name, "statuses", sha]) => {
            let repo = format!("{owner}/{name}");
            let known = st
                .repos
                .iter()
                .any(|(r, commits)| *r == repo && commits.iter().any(|c| c == sha));
            if sha.len() != 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) || !known {
                return (404, json!({"message": "repository or commit not found"}));
            }
            let Ok(Value::Object(b)) = serde_json::from_str::<Value>(body) else {
                return (422, json!({"message": "body is not a JSON object"}));
            };
            let text = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let state = text("state");
            if !["pending", "success", "error", "failure", "warning"].contains(&state.as_str()) {
                return (422, json!({"message": format!("invalid state {state:?}")}));
            }
            let s = Status {
                id: st.statuses.len() as u64 + 1,
                repo,
                sha: sha.to_string(),
                state,
                context: text("context"),
                description: text("description"),
                target_url: text("target_url"),
            };
            st.statuses.push(s.clone());
            (201, status_json(&s))
        }
        ("GET", [owner, name, "commits", sha, "statuses"]) => {
            let repo = format!("{owner}/{name}");
            let list: Vec<Value> = st
                .statuses
                .iter()
                .rev()
                .filter(|s| s.repo == repo && s.sha == *sha)
                .map(status_json)
                .collect();
            (200, Value::Array(list))
        }
        ("GET", [owner, name, "commits", sha, "status"]) => {
            let repo = format!("{owner}/{name}");
            let mut latest: Vec<&Status> = Vec::new();
            for s in st.statuses.iter().rev() {
                if s.repo == repo && s.sha == *sha && !latest.iter().any(|l| l.context == s.context)
                {
                    latest.push(s);
                }
            }
            let rank = |s: &str| match s {
                "error" => 4,
                "failure" => 3,
                "warning" => 2,
                "pending" => 1,
                _ => 0,
            };
            let worst = latest
                .iter()
                .map(|s| s.state.as_str())
                .max_by_key(|s| rank(s))
                .unwrap_or("pending");
            (
                200,
                json!({"state": worst, "sha": sha, "total_count": latest.len(),
                       "statuses": latest.iter().map(|s| status_json(s)).collect::<Vec<_>>()}),
            )
        }
        _ => (404, json!({"message": "not found"})),
    }
}

fn status_json(s: &Status) -> Value {
    json!({
        "id": s.id,
        "state": s.state,
        "context": s.context,
        "description": s.description,
        "target_url": s.target_url,
        "created_at": "2024-01-01T00:00:00Z",
        "creator": {"login": "homelab-agent"},
    })
}
