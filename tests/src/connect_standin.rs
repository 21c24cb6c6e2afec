//! A **stand-in** for a 1Password Connect server (`connect-api`), for tests
//! of the agent's Connect client. It is not 1Password software: a small
//! HTTP/1.1 server (std::net, one thread per connection, `Connection: close`)
//! on 127.0.0.1 with a free port, holding vaults and items in memory and
//! answering the read endpoints the way the Connect API notes
//! (`specs/onepassword-connect.md`) describe:
//!
//! - `GET /heartbeat` (no auth, `text/plain` `.`), `GET /health` (no auth, JSON);
//! - `GET /v1/vaults[?filter=name eq "X" | title eq "X"]`, `GET /v1/vaults/{id}`,
//!   `GET /v1/vaults/{id}/items[?filter=title eq "X"]` (summaries: no
//!   `fields`/`sections`), `GET /v1/vaults/{vid}/items/{iid}` (full item);
//! - filters are percent-decoded (`%20` and `+`) and compared exactly
//!   (case-sensitive), the conservative reading of SCIM `eq`;
//! - `Authorization: Bearer <token>` on `/v1` (401
//!   `{"status":401,"message":"Invalid token signature"}`), 403 `vault {id} is
//!   not in scope` for denied vaults (which the vault list also omits), 404
//!   `vault {id} not found` / `item {id} not found`;
//! - every response carries `1Password-Connect-Version: 1.7.3`.
//!
//! Test hooks: [`ConnectStandIn::fail_next`] (answer the next N `/v1`
//! requests with 429/5xx; [`ConnectStandIn::fail_after`]: after M more served),
//! [`ConnectStandIn::remove_item`], [`ConnectStandIn::requests`] (count of `/v1`
//! requests), [`ConnectStandIn::stop`] / [`ConnectStandIn::restart`] (same
//! port), [`ConnectStandIn::set_field`] (rotate a secret: bumps `version`).
//! Duplicate titles and names are allowed, to test ambiguity handling.

use crate::standin::{lock, read_head, Head, Served};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};

/// What `1Password-Connect-Version` says.
pub const CONNECT_VERSION: &str = "1.7.3";

/// A request the stand-in saw on `/v1` (no `Authorization`: never recorded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query string as sent (still percent-encoded).
    pub raw_query: Option<String>,
    /// The decoded `filter` parameter, if any.
    pub filter: Option<String>,
    pub user_agent: Option<String>,
    pub content_type: Option<String>,
}

/// A stand-in 1Password Connect server (see the module docs). Stopped on
/// Drop.
pub struct ConnectStandIn {
    server: Served<State>,
}

struct State {
    token: String,
    vaults: Vec<Vault>,
    items: Vec<StoredItem>,
    denied: HashSet<String>,
    fail: Option<(u16, usize)>,
    /// (requests still to serve normally, status, times): then `fail`.
    fail_after: Option<(usize, u16, usize)>,
    requests: usize,
    last: Option<SeenRequest>,
    /// Seconds after 2024-01-01T00:00:00Z; ticks on every change.
    clock: u64,
}

struct Vault {
    id: String,
    name: String,
    created: u64,
    updated: u64,
}

struct StoredItem {
    id: String,
    vault_id: String,
    title: String,
    version: u64,
    created: u64,
    updated: u64,
    /// (id, label)
    sections: Vec<(String, String)>,
    fields: Vec<StoredField>,
}

struct StoredField {
    id: String,
    label: String,
    value: String,
    /// Index into the item's sections.
    section: Option<usize>,
}

/// The reference homelab's 1Password vault `homelab`: every item and field
/// its hosts, modules and stacks name (`op://homelab/ITEM/FIELD`), each with
/// a distinct stand-in value (`ref-ITEM-FIELD`). A reference the repository
/// gains without an entry here does not resolve, which the reference tests
/// report (`tests/tests/reference_coherence.rs`). Key material a test needs
/// to be real (the borgmatic key pair, the TLS certificate) it sets itself
/// with [`ConnectStandIn::set_field`].
pub const REFERENCE_VAULT: &[(&str, &[&str])] = &[
    (
        "borgmatic",
        &["passphrase", "ssh_private_key", "ssh_public_key"],
    ),
    ("borgmatic-gilbert", &["ssh_public_key"]),
    (
        "forgejo",
        &[
            "secret_key",
            "internal_token",
            "lfs_jwt_secret",
            "oauth2_jwt_secret",
        ],
    ),
    ("ginflix", &["django-secret-key"]),
    ("ginflix-postgres", &["password"]),
    ("k3s", &["cluster-token"]),
    ("ops-eblu-me-tls", &["certificate", "private_key"]),
    ("postgres-backup", &["password"]),
    ("vlog-worker", &["api-key"]),
    ("zot-htpasswd", &["ci"]),
];

/// The stand-in value of `ITEM/FIELD` in [`REFERENCE_VAULT`].
pub fn reference_value(item: &str, field: &str) -> String {
    format!("ref-{item}-{field}")
}

impl ConnectStandIn {
    /// Starts the stand-in on a free 127.0.0.1 port; `/v1` requests need
    /// `Authorization: Bearer <token>`.
    pub fn start(token: &str) -> ConnectStandIn {
        let state = State {
            token: token.to_string(),
            vaults: Vec::new(),
            items: Vec::new(),
            denied: HashSet::new(),
            fail: None,
            fail_after: None,
            requests: 0,
            last: None,
            clock: 0,
        };
        ConnectStandIn {
            server: Served::start("connect-standin", state, handle),
        }
    }

    /// `http://127.0.0.1:PORT` (no `/v1`), what the agent's `url` takes.
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// Creates a vault; returns its 26-char id. Names need not be unique.
    pub fn add_vault(&self, name: &str) -> String {
        let mut st = self.lock();
        let now = st.tick();
        let id = new_id();
        st.vaults.push(Vault {
            id: id.clone(),
            name: name.to_string(),
            created: now,
            updated: now,
        });
        id
    }

    /// Creates the vault `homelab` holding [`REFERENCE_VAULT`]; returns
    /// each item's id by title.
    pub fn add_reference_vault(&self) -> std::collections::BTreeMap<&'static str, String> {
        let vault = self.add_vault("homelab");
        REFERENCE_VAULT
            .iter()
            .map(|(item, fields)| {
                let values: Vec<(String, String)> = fields
                    .iter()
                    .map(|f| (f.to_string(), reference_value(item, f)))
                    .collect();
                let pairs: Vec<(&str, &str)> = values
                    .iter()
                    .map(|(f, v)| (f.as_str(), v.as_str()))
                    .collect();
                (*item, self.add_item(&vault, item, &pairs))
            })
            .collect()
    }

    /// Creates a LOGIN-like item with top-level fields `(label, value)`;
    /// returns its id. Fields labelled `username`/`password` get those ids
    /// (as built-in LOGIN fields have), others random 26-char ids.
    pub fn add_item(&self, vault_id: &str, title: &str, fields: &[(&str, &str)]) -> String {
        self.insert_item(vault_id, title, None, fields)
    }

    /// Creates an item whose fields all live in one section labelled
    /// `section_label` (with a random id); returns the item id.
    pub fn add_item_with_section(
        &self,
        vault_id: &str,
        title: &str,
        section_label: &str,
        fields: &[(&str, &str)],
    ) -> String {
        self.insert_item(vault_id, title, Some(section_label), fields)
    }

    fn insert_item(
        &self,
        vault_id: &str,
        title: &str,
        section: Option<&str>,
        fields: &[(&str, &str)],
    ) -> String {
        let mut st = self.lock();
        assert!(
            st.vaults.iter().any(|v| v.id == vault_id),
            "ConnectStandIn: no vault {vault_id}"
        );
        let now = st.tick();
        let id = new_id();
        let sections: Vec<(String, String)> = section
            .map(|l| (new_id(), l.to_string()))
            .into_iter()
            .collect();
        let fields = fields
            .iter()
            .map(|(label, value)| StoredField {
                id: if section.is_none() && matches!(*label, "username" | "password") {
                    label.to_string()
                } else {
                    new_id()
                },
                label: label.to_string(),
                value: value.to_string(),
                section: section.map(|_| 0),
            })
            .collect();
        st.items.push(StoredItem {
            id: id.clone(),
            vault_id: vault_id.to_string(),
            title: title.to_string(),
            version: 1,
            created: now,
            updated: now,
            sections,
            fields,
        });
        if let Some(v) = st.vaults.iter_mut().find(|v| v.id == vault_id) {
            v.updated = now;
        }
        id
    }

    /// Sets the value of the field labelled `label` (exact) of an item,
    /// adding a top-level field if there is none; bumps the item's version.
    pub fn set_field(&self, item_id: &str, label: &str, value: &str) {
        let mut st = self.lock();
        let now = st.tick();
        let item = st
            .items
            .iter_mut()
            .find(|i| i.id == item_id)
            .unwrap_or_else(|| panic!("ConnectStandIn: no item {item_id}"));
        match item.fields.iter_mut().find(|f| f.label == label) {
            Some(f) => f.value = value.to_string(),
            None => item.fields.push(StoredField {
                id: new_id(),
                label: label.to_string(),
                value: value.to_string(),
                section: None,
            }),
        }
        item.version += 1;
        item.updated = now;
    }

    /// The token is not scoped to this vault any more: 403 on its
    /// endpoints, and the vault list leaves it out.
    pub fn deny_vault(&self, vault_id: &str) {
        self.lock().denied.insert(vault_id.to_string());
    }

    /// The next `times` `/v1` requests are answered with `status` (e.g. 429,
    /// 500, 503) and a Connect error body, before auth is checked. Replaces
    /// any earlier setting; `times = 0` clears it.
    pub fn fail_next(&self, status: u16, times: usize) {
        self.lock().fail = (times > 0).then_some((status, times));
    }

    /// Like [`ConnectStandIn::fail_next`], but only after `served` more
    /// `/v1` requests were answered normally: Connect failing in the middle
    /// of a client's run, deterministically.
    pub fn fail_after(&self, served: usize, status: u16, times: usize) {
        let mut st = self.lock();
        st.fail = None;
        st.fail_after = Some((served, status, times));
    }

    /// Deletes an item (as deleting it in 1Password would): it is gone from
    /// lists, and `GET` on its id answers 404.
    pub fn remove_item(&self, item_id: &str) {
        let mut st = self.lock();
        let now = st.tick();
        let before = st.items.len();
        let vault = st
            .items
            .iter()
            .find(|i| i.id == item_id)
            .map(|i| i.vault_id.clone());
        st.items.retain(|i| i.id != item_id);
        assert!(st.items.len() < before, "ConnectStandIn: no item {item_id}");
        if let Some(v) = st.vaults.iter_mut().find(|v| Some(&v.id) == vault.as_ref()) {
            v.updated = now;
        }
    }

    /// `/v1` requests received so far (failed and unauthorised ones too).
    pub fn requests(&self) -> usize {
        self.lock().requests
    }

    /// The last `/v1` request received.
    pub fn last_request(&self) -> Option<SeenRequest> {
        self.lock().last.clone()
    }

    /// Stops serving (the port then refuses connections). Data is kept.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Serves again on the same port, with the same data.
    pub fn restart(&mut self) {
        self.server.restart();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.server.lock()
    }
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

struct Request {
    method: String,
    path: String,
    raw_query: Option<String>,
    /// Lower-cased names.
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn query(&self, key: &str) -> Option<String> {
        self.raw_query.as_deref()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k) == key).then(|| percent_decode(v))
        })
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

fn json_response(status: u16, body: Value) -> Response {
    Response {
        status,
        content_type: "application/json",
        body: body.to_string(),
    }
}

fn error(status: u16, message: &str) -> Response {
    json_response(status, json!({"status": status, "message": message}))
}

fn handle(mut conn: TcpStream, state: &Mutex<State>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let response = match read_request(&mut conn) {
        Some(req) => route(&req, state),
        None => return,
    };
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n1Password-Connect-Version: {CONNECT_VERSION}\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(response.body.as_bytes());
    let _ = conn.flush();
    let _ = conn.shutdown(Shutdown::Write);
}

/// Reads the request head (and discards a body); `None` on a closed or
/// malformed connection (e.g. the wake-up connect of `stop`).
fn read_request(conn: &mut TcpStream) -> Option<Request> {
    let head = read_head(conn)?;
    // Discard a body, if any (reads only send none; be tidy for others).
    let len = head.content_length();
    let mut chunk = [0u8; 4096];
    let mut have = head.rest.len();
    while have < len.min(1 << 20) {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => have += n,
        }
    }
    let Head {
        method,
        target,
        headers,
        ..
    } = head;
    let (path, raw_query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target, None),
    };
    Some(Request {
        method,
        path,
        raw_query,
        headers,
    })
}

fn route(req: &Request, state: &Mutex<State>) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/heartbeat") => {
            return Response {
                status: 200,
                content_type: "text/plain",
                body: ".".into(),
            }
        }
        ("GET", "/health") => {
            return json_response(
                200,
                json!({
                    "name": "1Password Connect API",
                    "version": CONNECT_VERSION,
                    "dependencies": [
                        {"service": "sync", "status": "ACTIVE"},
                        {"service": "sqlite", "status": "ACTIVE", "message": "Connected to ./1password.sqlite"}
                    ]
                }),
            )
        }
        _ => {}
    }
    let segments: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    if segments.first() != Some(&"v1") {
        return error(404, "Not Found");
    }

    let mut st = lock(state);
    st.requests += 1;
    st.last = Some(SeenRequest {
        method: req.method.clone(),
        path: req.path.clone(),
        raw_query: req.raw_query.clone(),
        filter: req.query("filter"),
        user_agent: req.header("user-agent").map(str::to_string),
        content_type: req.header("content-type").map(str::to_string),
    });
    if let Some((served, status, times)) = st.fail_after {
        if served == 0 {
            st.fail_after = None;
            st.fail = Some((status, times));
        } else {
            st.fail_after = Some((served - 1, status, times));
        }
    }
    if let Some((status, times)) = st.fail {
        st.fail = (times > 1).then_some((status, times - 1));
        let message = match status {
            429 => "Too Many Requests",
            503 => "Service Unavailable",
            _ => "Internal Server Error",
        };
        return error(status, message);
    }
    let authorized = req
        .header("authorization")
        .is_some_and(|v| v == format!("Bearer {}", st.token));
    if !authorized {
        return error(401, "Invalid token signature");
    }
    if req.method != "GET" {
        return error(405, "Method Not Allowed (this stand-in serves reads only)");
    }
    let filter = match req.query("filter").map(|f| parse_filter(&f)) {
        Some(Some(f)) => Some(f),
        Some(None) => return error(400, "Invalid filter"),
        None => None,
    };

    match segments.as_slice() {
        ["v1", "vaults"] => {
            let list: Vec<Value> = st
                .vaults
                .iter()
                .filter(|v| !st.denied.contains(&v.id))
                .filter(|v| match &filter {
                    Some((attr, want)) => (attr == "name" || attr == "title") && &v.name == want,
                    None => true,
                })
                .map(|v| vault_json(&st, v))
                .collect();
            json_response(200, Value::Array(list))
        }
        ["v1", "vaults", vid] => match st.vault(vid) {
            Ok(v) => json_response(200, vault_json(&st, v)),
            Err(r) => r,
        },
        ["v1", "vaults", vid, "items"] => {
            if let Err(r) = st.vault(vid) {
                return r;
            }
            let list: Vec<Value> = st
                .items
                .iter()
                .filter(|i| i.vault_id == *vid)
                .filter(|i| match &filter {
                    Some((attr, want)) => attr == "title" && &i.title == want,
                    None => true,
                })
                .map(|i| item_json(i, false))
                .collect();
            json_response(200, Value::Array(list))
        }
        ["v1", "vaults", vid, "items", iid] => {
            if let Err(r) = st.vault(vid) {
                return r;
            }
            match st.items.iter().find(|i| i.vault_id == *vid && i.id == *iid) {
                Some(i) => json_response(200, item_json(i, true)),
                None => error(404, &format!("item {iid} not found")),
            }
        }
        _ => error(404, "Not Found"),
    }
}

impl State {
    fn vault(&self, id: &str) -> Result<&Vault, Response> {
        if self.denied.contains(id) {
            return Err(error(403, &format!("vault {id} is not in scope")));
        }
        self.vaults
            .iter()
            .find(|v| v.id == id)
            .ok_or_else(|| error(404, &format!("vault {id} not found")))
    }
}

/// `name eq "X"` / `title eq "X"` → (attribute, value); `\"` unescaped.
fn parse_filter(filter: &str) -> Option<(String, String)> {
    let (attr, rest) = filter.trim().split_once(' ')?;
    let rest = rest.trim_start().strip_prefix("eq")?.trim_start();
    let value = rest.strip_prefix('"')?.strip_suffix('"')?;
    Some((attr.to_string(), value.replace("\\\"", "\"")))
}

fn vault_json(st: &State, v: &Vault) -> Value {
    let items: Vec<&StoredItem> = st.items.iter().filter(|i| i.vault_id == v.id).collect();
    json!({
        "id": v.id,
        "name": v.name,
        "description": "",
        "attributeVersion": 1,
        "contentVersion": items.iter().map(|i| i.version).sum::<u64>(),
        "items": items.len(),
        "type": "USER_CREATED",
        "createdAt": timestamp(v.created),
        "updatedAt": timestamp(v.updated),
    })
}

fn item_json(i: &StoredItem, full: bool) -> Value {
    let mut item = json!({
        "id": i.id,
        "title": i.title,
        "version": i.version,
        "vault": {"id": i.vault_id},
        "category": "LOGIN",
        "tags": [],
        "favorite": false,
        "lastEditedBy": "standinuser0000000000000000",
        "createdAt": timestamp(i.created),
        "updatedAt": timestamp(i.updated),
    });
    if full {
        let fields: Vec<Value> = i
            .fields
            .iter()
            .map(|f| {
                let (kind, purpose) = match (f.label.as_str(), f.section) {
                    ("username", None) => ("STRING", "USERNAME"),
                    ("password", None) => ("CONCEALED", "PASSWORD"),
                    _ => ("CONCEALED", ""),
                };
                let mut field = json!({
                    "id": f.id,
                    "type": kind,
                    "label": f.label,
                    "value": f.value,
                });
                if !purpose.is_empty() {
                    field["purpose"] = json!(purpose);
                }
                if let Some(s) = f.section {
                    let (id, label) = &i.sections[s];
                    field["section"] = json!({"id": id, "label": label});
                }
                field
            })
            .collect();
        if !i.sections.is_empty() {
            item["sections"] = i
                .sections
                .iter()
                .map(|(id, label)| json!({"id": id, "label": label}))
                .collect();
        }
        item["fields"] = Value::Array(fields);
    }
    item
}

/// RFC 3339 for `secs` after 2024-01-01T00:00:00Z.
fn timestamp(secs: u64) -> String {
    // 2024-01-01T00:00:00Z in Unix seconds.
    const BASE: i64 = 1_704_067_200;
    crate::rfc3339(BASE + secs as i64)
}

/// Percent-decodes (`%XX`, and `+` as space, as form encoding has it).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A random 26-char `[a-z0-9]` id, like Connect's.
fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut buf = [0u8; 26];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_and_filters() {
        assert_eq!(
            percent_decode("title%20eq%20%22My%20Item%22"),
            "title eq \"My Item\""
        );
        assert_eq!(percent_decode("title+eq+%22a%22"), "title eq \"a\"");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(
            parse_filter("name eq \"Home Lab\""),
            Some(("name".into(), "Home Lab".into()))
        );
        assert_eq!(parse_filter("title eq nope"), None);
        assert_eq!(timestamp(0), "2024-01-01T00:00:00Z");
        assert_eq!(timestamp(86_400 * 60 + 3661), "2024-03-01T01:01:01Z");
        let id = new_id();
        assert!(
            id.len() == 26
                && id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
    }
}
