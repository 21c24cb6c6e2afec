//! A blocking client for the 1Password Connect REST API (read-only: vaults
//! and items), used to resolve `op://` references.
//!
//! Owns: the bearer token (read from a mode-600 file, never printed), HTTP
//! with retries, vault/item name → id resolution and field selection within
//! an item. Leaves to others: caching across a run (built on top; see
//! [`ConnectClient::requests_made`]) and writing values anywhere.
//!
//! Behaviour, following the Connect API notes (`specs/onepassword-connect.md`):
//! - An argument matching `^[a-z0-9]{26}$` is taken as an id. A vault id is
//!   fetched directly (`GET /v1/vaults/{id}`); an item id too, and when that
//!   answers 404 the argument is looked up as a title (as connect-sdk-go does).
//! - Names are looked up with a `filter=title eq "<name>"` list, then
//!   post-filtered case-insensitively (vault `name`, item `title`). When the
//!   filtered list has no match (the server's filter may be case-sensitive),
//!   the unfiltered list is searched case-insensitively. Exactly one match is
//!   required; several fail with [`ConnectError::Ambiguous`] listing their ids.
//! - Field selection ([`Item::field`]) is **case-insensitive**, like the op
//!   CLI's secret references (load-secrets-action compares exactly; we follow
//!   the CLI so a reference means the same to `op read` and to the agent).
//! - 429, 5xx and connection errors/timeouts are retried with jittered
//!   exponential backoff (100 ms, 200 ms, 400 ms; 4 attempts), each attempt
//!   bounded by [`ConnectConfig::timeout`].
//! - Environment proxies are ignored and redirects are not followed: the
//!   bearer token goes to the configured URL and nowhere else.
//! - Response bodies are parsed into typed values and zeroed; parse errors
//!   report only the position (serde's messages can quote a value).

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use serde::Deserialize;

use super::{Reference, SecretValue};

/// Default per-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Attempts per request (the first plus three retries).
const ATTEMPTS: usize = 4;

/// Backoff before the first retry; doubled for each further retry.
const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// Largest response body accepted (Connect has no pagination; item lists of
/// a big vault are still far below this).
const MAX_BODY: u64 = 64 << 20;

/// Longest server error message quoted in an error.
const MAX_MESSAGE: usize = 300;

/// Where Connect is and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectConfig {
    /// Base URL, e.g. `http://127.0.0.1:8080` (without `/v1`).
    pub url: String,
    /// File holding the Connect access token; must not be readable by group
    /// or others.
    pub token_file: PathBuf,
    /// Per-request timeout (connect + response).
    pub timeout: Duration,
}

impl ConnectConfig {
    /// A config with the default timeout (10 s).
    pub fn new(url: impl Into<String>, token_file: impl Into<PathBuf>) -> ConnectConfig {
        ConnectConfig {
            url: url.into(),
            token_file: token_file.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Why a Connect lookup failed. Every message names what failed, where (the
/// Connect URL, vault, item, field or reference) and what to do. None holds
/// the token or a secret value.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("Connect url `{url}` is not usable: {reason}: set it to the Connect server's base URL, e.g. http://connect:8080 (without /v1)")]
    Url { url: String, reason: String },

    #[error("cannot read the Connect token file {}: {reason}: put the Connect access token in it (mode 600)", path.display())]
    TokenFile { path: PathBuf, reason: String },

    #[error("the Connect token file {} has mode {mode:04o}, readable by group or others: run `chmod 600 {}`", path.display(), path.display())]
    TokenFilePermissions { path: PathBuf, mode: u32 },

    #[error("Connect at {url} rejected the token (401: {message}): check token_file holds a valid Connect access token")]
    Unauthorized { url: String, message: String },

    #[error("Connect at {url} refused access to vault {vault} (403: {message}): grant the Connect token access to that vault, or use a token that has it")]
    Forbidden {
        url: String,
        vault: String,
        message: String,
    },

    #[error("{}", not_found_message(url, what, name, vault.as_deref()))]
    NotFound {
        url: String,
        /// "vault" or "item".
        what: &'static str,
        name: String,
        /// The vault searched, for items.
        vault: Option<String>,
    },

    #[error("{}", ambiguous_message(url, what, name, vault.as_deref(), ids))]
    Ambiguous {
        url: String,
        what: &'static str,
        name: String,
        vault: Option<String>,
        ids: Vec<String>,
    },

    #[error("{}", field_not_found_message(reference, item, missing, available))]
    FieldNotFound {
        reference: String,
        /// The item's title.
        item: String,
        /// What has no match: `field "x"`, or `section "y"` when no section
        /// matches.
        missing: String,
        /// The item's fields as they would be written in a reference
        /// (`label` or `section/label`); labels only, never values.
        available: Vec<String>,
    },

    #[error("`{reference}`: item \"{item}\" has {} fields that match: {}: name the section (op://vault/item/section/field) or use the field's id", candidates.len(), candidates.join(", "))]
    AmbiguousField {
        reference: String,
        item: String,
        /// Each match as `section/label (id ...)`.
        candidates: Vec<String>,
    },

    #[error(
        "`{reference}`: field \"{field}\" of item \"{item}\" has no value: set it in 1Password"
    )]
    EmptyField {
        reference: String,
        item: String,
        field: String,
    },

    #[error("cannot reach Connect at {url} ({reason}) after {attempts} attempts: check that connect-api is running and that `url` points at it")]
    Unreachable {
        url: String,
        reason: String,
        attempts: usize,
    },

    #[error("Connect at {url} answered {status} ({message}) to {request}{}: {}", retried(*attempts), server_hint(*status))]
    Server {
        url: String,
        status: u16,
        message: String,
        /// Method and path of the failing request (ids and titles only).
        request: String,
        attempts: usize,
    },

    #[error("Connect at {url} sent a response to {request} that is not what the Connect API returns ({reason}): check that `url` points at a 1Password Connect server")]
    BadResponse {
        url: String,
        request: String,
        reason: String,
    },
}

fn server_hint(status: u16) -> &'static str {
    match status {
        429 => "Connect is rate limiting (usually while it syncs): try again later, and check the connect-api and connect-sync logs",
        500.. => "check the connect-api and connect-sync logs",
        _ => "check that `url` points at a 1Password Connect server, and its logs",
    }
}

fn retried(attempts: usize) -> String {
    if attempts > 1 {
        format!(" after {attempts} attempts")
    } else {
        String::new()
    }
}

fn not_found_message(url: &str, what: &str, name: &str, vault: Option<&str>) -> String {
    match vault {
        Some(vault) => format!(
            "Connect at {url} has no {what} \"{name}\" in vault {vault}: check the name (or use the {what}'s id) and that the {what} exists in that vault"
        ),
        None => format!(
            "Connect at {url} has no {what} \"{name}\" that the token can see: check the name (or use the {what}'s id) and that the token is granted access to it"
        ),
    }
}

fn ambiguous_message(
    url: &str,
    what: &str,
    name: &str,
    vault: Option<&str>,
    ids: &[String],
) -> String {
    let count = match ids.len() {
        2 => "two".to_string(),
        3 => "three".to_string(),
        4 => "four".to_string(),
        n => n.to_string(),
    };
    let place = match vault {
        Some(vault) => format!(" in vault {vault}"),
        None => String::new(),
    };
    let noun = if what == "vault" {
        "vaults named"
    } else {
        "items titled"
    };
    format!(
        "Connect at {url} has {count} {noun} \"{name}\"{place} (ids {}): refer to it by id",
        ids.join(", ")
    )
}

fn field_not_found_message(
    reference: &str,
    item: &str,
    missing: &str,
    available: &[String],
) -> String {
    let fields = if available.is_empty() {
        "it has no fields".to_string()
    } else {
        format!("its fields are {}", available.join(", "))
    };
    format!("`{reference}`: item \"{item}\" has no {missing} ({fields}): fix the reference (fields are written `label` or `section/label`; ids work too)")
}

/// A full item. `Debug` shows ids, labels and kinds; values print as
/// `[redacted]`.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub title: String,
    pub version: u64,
    pub vault_id: String,
    pub sections: Vec<Section>,
    pub fields: Vec<Field>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub id: String,
    pub label: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Field {
    pub id: String,
    pub label: Option<String>,
    /// The section the field belongs to; `None` for top-level fields.
    pub section_id: Option<String>,
    pub value: Option<SecretValue>,
    /// Connect's `type` (`STRING`, `CONCEALED`, ...), kept as an open string.
    pub kind: String,
    /// `USERNAME`, `PASSWORD`, `NOTES`; `None` when absent or empty.
    pub purpose: Option<String>,
}

impl Item {
    /// The value of the field `reference` names. Matching is
    /// case-insensitive on ids and labels: with a section in the reference,
    /// only fields of sections whose label or id matches are candidates;
    /// without one, every field is. Then the field's id or label must match.
    /// No match → [`ConnectError::FieldNotFound`] (lists field labels, never
    /// values); several → [`ConnectError::AmbiguousField`]; a match without a
    /// value → [`ConnectError::EmptyField`].
    pub fn field(&self, reference: &Reference) -> Result<&SecretValue, ConnectError> {
        let eq = |a: &str, b: &str| a.to_lowercase() == b.to_lowercase();
        let sections: Option<Vec<&str>> = reference.section.as_deref().map(|want| {
            self.sections
                .iter()
                .filter(|s| eq(&s.id, want) || s.label.as_deref().is_some_and(|l| eq(l, want)))
                .map(|s| s.id.as_str())
                .collect()
        });
        let matches: Vec<&Field> = self
            .fields
            .iter()
            .filter(|f| match &sections {
                Some(ids) => f.section_id.as_deref().is_some_and(|s| ids.contains(&s)),
                None => true,
            })
            .filter(|f| {
                eq(&f.id, &reference.field)
                    || f.label.as_deref().is_some_and(|l| eq(l, &reference.field))
            })
            .collect();
        match matches.as_slice() {
            [] => Err(ConnectError::FieldNotFound {
                reference: reference.to_string(),
                item: self.title.clone(),
                missing: match (&reference.section, &sections) {
                    (Some(want), Some(ids)) if ids.is_empty() => format!("section \"{want}\""),
                    (Some(want), _) => {
                        format!("field \"{}\" in section \"{want}\"", reference.field)
                    }
                    (None, _) => format!("field \"{}\"", reference.field),
                },
                available: self.fields.iter().map(|f| self.field_path(f)).collect(),
            }),
            [one] => one.value.as_ref().ok_or_else(|| ConnectError::EmptyField {
                reference: reference.to_string(),
                item: self.title.clone(),
                field: self.field_path(one),
            }),
            several => Err(ConnectError::AmbiguousField {
                reference: reference.to_string(),
                item: self.title.clone(),
                candidates: several
                    .iter()
                    .map(|f| format!("{} (id {})", self.field_path(f), f.id))
                    .collect(),
            }),
        }
    }

    /// A field as written in a reference: `label` or `section/label`
    /// (ids where there is no label).
    fn field_path(&self, field: &Field) -> String {
        let name = field
            .label
            .clone()
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| field.id.clone());
        match &field.section_id {
            Some(sid) => {
                let section = self
                    .sections
                    .iter()
                    .find(|s| &s.id == sid)
                    .and_then(|s| s.label.clone())
                    .filter(|l| !l.is_empty())
                    .unwrap_or_else(|| sid.clone());
                format!("{section}/{name}")
            }
            None => name,
        }
    }
}

/// Whether `s` has the shape of a Connect id: `^[a-z0-9]{26}$`.
pub fn looks_like_id(s: &str) -> bool {
    s.len() == 26
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// A blocking Connect client. `Debug` shows the URL only.
pub struct ConnectClient {
    /// Base URL without trailing `/`.
    url: String,
    /// `Bearer <token>`, marked sensitive.
    auth: HeaderValue,
    http: reqwest::blocking::Client,
    timeout: Duration,
    requests: AtomicUsize,
}

impl fmt::Debug for ConnectClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectClient")
            .field("url", &self.url)
            .field("token", &super::REDACTED)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// An HTTP answer other than 2xx/401 that the caller maps (403, 404, ...).
struct Status {
    status: u16,
    message: String,
}

impl ConnectClient {
    /// Reads the bearer token from `token_file` (surrounding whitespace
    /// trimmed); refuses a file readable by group or others. The token never
    /// appears in an error, log or `Debug` output.
    pub fn new(cfg: &ConnectConfig) -> Result<ConnectClient, ConnectError> {
        let (url, auth) = Self::check(cfg)?;
        let bad_url = |reason: &str| ConnectError::Url {
            url: crate::redact::url_credentials_owned(&cfg.url),
            reason: reason.to_string(),
        };
        crate::source::git::install_tls_provider();
        let http = reqwest::blocking::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| bad_url(&format!("cannot set up the HTTP client: {e}")))?;
        Ok(ConnectClient {
            url,
            auth,
            http,
            timeout: cfg.timeout,
            requests: AtomicUsize::new(0),
        })
    }

    /// The checks of [`ConnectClient::new`] without building the HTTP
    /// client (the agent config check runs them too): the URL's form and
    /// the token file. Returns the base URL and the `Authorization` value.
    pub fn check(cfg: &ConnectConfig) -> Result<(String, HeaderValue), ConnectError> {
        let url = cfg.url.trim().trim_end_matches('/').to_string();
        let bad_url = |reason: &str| ConnectError::Url {
            url: crate::redact::url_credentials_owned(&cfg.url),
            reason: crate::redact::url_credentials_owned(reason),
        };
        let parsed = reqwest::Url::parse(&url).map_err(|e| bad_url(&e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad_url("the scheme must be http or https"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad_url("it must not have a query or fragment"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(bad_url(
                "it must not hold credentials (the token comes from token_file)",
            ));
        }
        if url.ends_with("/v1") {
            return Err(bad_url("it ends with /v1"));
        }

        let token = read_token(&cfg.token_file)?;
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
                ConnectError::TokenFile {
                    path: cfg.token_file.clone(),
                    reason: "the token holds characters not allowed in an HTTP header".into(),
                }
            })?;
        auth.set_sensitive(true);
        Ok((url, auth))
    }

    /// The base URL requests go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// HTTP requests sent so far, every attempt (retries included) counted.
    pub fn requests_made(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// Resolves a vault by id (26 chars `[a-z0-9]`, checked with
    /// `GET /v1/vaults/{id}`) or by name (see the module docs).
    pub fn vault_id(&self, vault: &str) -> Result<String, ConnectError> {
        if looks_like_id(vault) {
            let path = format!("/v1/vaults/{vault}");
            return match self.get(&path)? {
                Ok(body) => Ok(self.parse::<Named>(&path, body)?.id),
                Err(s) => Err(self.vault_status(s, vault, &path)),
            };
        }
        let found: Vec<Named> = self.lookup(
            "/v1/vaults",
            vault,
            |v: &Named| {
                v.name
                    .as_deref()
                    .is_some_and(|n| n.to_lowercase() == vault.to_lowercase())
            },
            |s, path| self.vault_status(s, vault, path),
        )?;
        match found.as_slice() {
            [one] => Ok(one.id.clone()),
            [] => Err(ConnectError::NotFound {
                url: self.url.clone(),
                what: "vault",
                name: vault.to_string(),
                vault: None,
            }),
            several => Err(ConnectError::Ambiguous {
                url: self.url.clone(),
                what: "vault",
                name: vault.to_string(),
                vault: None,
                ids: several.iter().map(|v| v.id.clone()).collect(),
            }),
        }
    }

    /// Fetches the full item `item` (an id or a title, see the module docs)
    /// from the vault with id `vault_id`.
    pub fn item(&self, vault_id: &str, item: &str) -> Result<Item, ConnectError> {
        if looks_like_id(item) {
            // On 404, fall through: maybe a title shaped like an id.
            if let Some(found) = self.item_by_id(vault_id, item)? {
                return Ok(found);
            }
        }
        let items_path = format!("/v1/vaults/{vault_id}/items");
        let found: Vec<Titled> = self.lookup(
            &items_path,
            item,
            |i: &Titled| i.title.to_lowercase() == item.to_lowercase(),
            |s, path| self.vault_status(s, vault_id, path),
        )?;
        match found.as_slice() {
            [one] => self
                .item_by_id(vault_id, &one.id)?
                .ok_or_else(|| self.item_not_found(vault_id, item)),
            [] => Err(self.item_not_found(vault_id, item)),
            several => Err(ConnectError::Ambiguous {
                url: self.url.clone(),
                what: "item",
                name: item.to_string(),
                vault: Some(vault_id.to_string()),
                ids: several.iter().map(|i| i.id.clone()).collect(),
            }),
        }
    }

    fn item_not_found(&self, vault_id: &str, item: &str) -> ConnectError {
        ConnectError::NotFound {
            url: self.url.clone(),
            what: "item",
            name: item.to_string(),
            vault: Some(vault_id.to_string()),
        }
    }

    /// `GET .../items/{id}`; `Ok(None)` on a 404 for the item (a missing
    /// vault is an error).
    fn item_by_id(&self, vault_id: &str, item_id: &str) -> Result<Option<Item>, ConnectError> {
        let path = format!("/v1/vaults/{vault_id}/items/{item_id}");
        match self.get(&path)? {
            Ok(body) => {
                let raw: RawItem = self.parse(&path, body)?;
                Ok(Some(raw.into_item()))
            }
            Err(s) if s.status == 404 && s.message.starts_with("vault") => {
                Err(self.vault_status(s, vault_id, &path))
            }
            Err(s) if s.status == 404 => Ok(None),
            Err(s) => Err(self.vault_status(s, vault_id, &path)),
        }
    }

    /// Lists `list_path` filtered by `title eq "<name>"` and keeps what
    /// `keep` accepts; with nothing kept, lists without the filter.
    fn lookup<T: for<'de> Deserialize<'de>>(
        &self,
        list_path: &str,
        name: &str,
        keep: impl Fn(&T) -> bool,
        status: impl Fn(Status, &str) -> ConnectError,
    ) -> Result<Vec<T>, ConnectError> {
        let filter = format!("title eq \"{}\"", name.replace('"', "\\\""));
        let filtered = format!("{list_path}?filter={}", percent_encode(&filter));
        for path in [filtered.as_str(), list_path] {
            let list: Vec<T> = match self.get(path)? {
                Ok(body) => self.parse(path, body)?,
                Err(s) => return Err(status(s, path)),
            };
            let kept: Vec<T> = list.into_iter().filter(|x| keep(x)).collect();
            if !kept.is_empty() {
                return Ok(kept);
            }
        }
        Ok(Vec::new())
    }

    /// Maps a 403/404 about vault `vault`, or anything else, to an error.
    fn vault_status(&self, s: Status, vault: &str, path: &str) -> ConnectError {
        match s.status {
            403 => ConnectError::Forbidden {
                url: self.url.clone(),
                vault: vault.to_string(),
                message: s.message,
            },
            404 => ConnectError::NotFound {
                url: self.url.clone(),
                what: "vault",
                name: vault.to_string(),
                vault: None,
            },
            status => ConnectError::Server {
                url: self.url.clone(),
                status,
                message: s.message,
                request: format!("GET {path}"),
                attempts: 1,
            },
        }
    }

    fn parse<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        mut body: Vec<u8>,
    ) -> Result<T, ConnectError> {
        let parsed = serde_json::from_slice::<T>(&body);
        zero(&mut body);
        parsed.map_err(|e| ConnectError::BadResponse {
            url: self.url.clone(),
            request: format!("GET {path}"),
            // Not `e` itself: serde's message can quote a (secret) value.
            reason: match e.classify() {
                serde_json::error::Category::Io => "truncated body".to_string(),
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                    format!("invalid JSON at line {} column {}", e.line(), e.column())
                }
                serde_json::error::Category::Data => format!(
                    "unexpected JSON structure at line {} column {}",
                    e.line(),
                    e.column()
                ),
            },
        })
    }

    /// One GET with retries. `Ok(Ok(body))` on 2xx; `Ok(Err(status))` for
    /// statuses the caller maps (403, 404, other 4xx); 401 and exhausted
    /// retries are errors here.
    fn get(&self, path: &str) -> Result<Result<Vec<u8>, Status>, ConnectError> {
        let url = format!("{}{path}", self.url);
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.requests.fetch_add(1, Ordering::Relaxed);
            let outcome = self.get_once(&url);
            let retryable = match &outcome {
                Err(_) => true,
                Ok(Ok(_)) => false,
                Ok(Err(s)) => s.status == 429 || s.status >= 500,
            };
            if !retryable || attempt >= ATTEMPTS {
                return match outcome {
                    Ok(Ok(body)) => Ok(Ok(body)),
                    Ok(Err(s)) if s.status == 401 => Err(ConnectError::Unauthorized {
                        url: self.url.clone(),
                        message: s.message,
                    }),
                    Ok(Err(s)) if s.status == 429 || s.status >= 500 => Err(ConnectError::Server {
                        url: self.url.clone(),
                        status: s.status,
                        message: s.message,
                        request: format!("GET {path}"),
                        attempts: attempt,
                    }),
                    Ok(Err(s)) => Ok(Err(s)),
                    Err(NoAnswer(reason)) => Err(ConnectError::Unreachable {
                        url: self.url.clone(),
                        reason,
                        attempts: attempt,
                    }),
                };
            }
            let base = BACKOFF_BASE * (1 << (attempt - 1));
            // Jitter: 75 %..125 % of the nominal delay.
            let delay = base.mul_f64(0.75 + fastrand::f64() * 0.5);
            tracing::debug!(
                url = %self.url,
                path,
                attempt,
                delay_ms = delay.as_millis() as u64,
                "Connect request failed; retrying"
            );
            std::thread::sleep(delay);
        }
    }

    /// One attempt: `Err(reason)` when no HTTP answer came.
    fn get_once(&self, url: &str) -> Result<Result<Vec<u8>, Status>, NoAnswer> {
        let resp = self
            .http
            .get(url)
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(
                USER_AGENT,
                concat!("homelab-agent/", env!("CARGO_PKG_VERSION")),
            )
            .send()
            .map_err(|e| NoAnswer(self.transport_reason(&e)))?;
        let status = resp.status();
        let mut body = Vec::new();
        let read = resp.take(MAX_BODY).read_to_end(&mut body);
        if status.is_success() {
            if let Err(e) = read {
                zero(&mut body);
                return Err(NoAnswer(format!(
                    "reading the response failed: {}",
                    io_reason(&e, self.timeout)
                )));
            }
            return Ok(Ok(body));
        }
        let message = error_message(&body).unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("no reason given")
                .to_string()
        });
        zero(&mut body);
        Ok(Err(Status {
            status: status.as_u16(),
            message,
        }))
    }

    fn transport_reason(&self, e: &reqwest::Error) -> String {
        if e.is_timeout() {
            return format!("no answer within {}", humantime_ms(self.timeout));
        }
        // The innermost cause ("Connection refused (os error 111)") says the
        // most; reqwest's own message repeats the URL.
        let mut inner: &dyn std::error::Error = e;
        while let Some(next) = inner.source() {
            inner = next;
        }
        let text = inner.to_string();
        if e.is_connect() {
            format!("connection failed: {text}")
        } else {
            text
        }
    }
}

/// No HTTP answer came (connection refused, timeout, a body cut short):
/// the reason, in words that never quote a response body.
#[derive(Debug)]
struct NoAnswer(String);

fn io_reason(e: &std::io::Error, timeout: Duration) -> String {
    if e.kind() == std::io::ErrorKind::TimedOut {
        format!("no answer within {}", humantime_ms(timeout))
    } else {
        e.to_string()
    }
}

fn humantime_ms(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// The `message` of a Connect error body `{"status":..,"message":..}`,
/// shortened and stripped of control characters; `None` for anything else.
fn error_message(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ErrorBody {
        message: String,
    }
    let parsed: ErrorBody = serde_json::from_slice(body).ok()?;
    let mut message: String = parsed
        .message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if message.chars().count() > MAX_MESSAGE {
        message = message.chars().take(MAX_MESSAGE).collect::<String>() + "…";
    }
    let message = message.trim().to_string();
    (!message.is_empty()).then_some(message)
}

fn zero(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        // SAFETY: a valid, aligned, exclusive reference.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (so spaces
/// become `%20`, as Connect's docs show).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reads and checks the token file; the token is held as a [`SecretValue`].
fn read_token(path: &Path) -> Result<SecretValue, ConnectError> {
    let fail = |reason: String| ConnectError::TokenFile {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("it is not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(ConnectError::TokenFilePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut raw = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let text = std::str::from_utf8(&raw).map(|t| SecretValue::new(t.trim()));
    zero(&mut raw);
    let token = text.map_err(|_| fail("it is not UTF-8 text".into()))?;
    if token.expose().is_empty() {
        return Err(fail("it is empty".into()));
    }
    Ok(token)
}

// --- wire types (private; values go straight into SecretValue) ---

/// A vault (only what resolution needs).
#[derive(Deserialize)]
struct Named {
    id: String,
    #[serde(default)]
    name: Option<String>,
}

/// An item summary (only what resolution needs).
#[derive(Deserialize)]
struct Titled {
    id: String,
    #[serde(default)]
    title: String,
}

#[derive(Deserialize)]
struct IdRef {
    id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawItem {
    id: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    version: u64,
    vault: IdRef,
    #[serde(default)]
    sections: Vec<RawSection>,
    #[serde(default)]
    fields: Vec<RawField>,
}

#[derive(Deserialize)]
struct RawSection {
    id: String,
    #[serde(default)]
    label: Option<String>,
}

#[derive(Deserialize)]
struct RawField {
    id: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    section: Option<IdRef>,
    #[serde(default, deserialize_with = "secret")]
    value: Option<SecretValue>,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    purpose: Option<String>,
}

fn secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SecretValue>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.map(SecretValue::new))
}

impl RawItem {
    fn into_item(self) -> Item {
        Item {
            id: self.id,
            title: self.title,
            version: self.version,
            vault_id: self.vault.id,
            sections: self
                .sections
                .into_iter()
                .map(|s| Section {
                    id: s.id,
                    label: s.label,
                })
                .collect(),
            fields: self
                .fields
                .into_iter()
                .map(|f| Field {
                    id: f.id,
                    label: f.label,
                    section_id: f.section.map(|s| s.id),
                    value: f.value,
                    kind: f.kind,
                    purpose: f.purpose.filter(|p| !p.is_empty()),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> Item {
        let field = |id: &str, label: &str, section: Option<&str>, value: &str| Field {
            id: id.into(),
            label: Some(label.into()),
            section_id: section.map(str::to_string),
            value: Some(SecretValue::new(value)),
            kind: "STRING".into(),
            purpose: None,
        };
        Item {
            id: "i".repeat(26),
            title: "postgres".into(),
            version: 1,
            vault_id: "v".repeat(26),
            sections: vec![Section {
                id: "sec1".into(),
                label: Some("admin".into()),
            }],
            fields: vec![
                field("username", "username", None, "app"),
                field("password", "password", None, "top-secret"),
                field("k3", "password", Some("sec1"), "admin-secret"),
                field("k4", "port", Some("sec1"), "5432"),
            ],
        }
    }

    #[test]
    fn fields_match_case_insensitively_within_sections() {
        let it = item();
        let get = |r: &str| {
            it.field(&Reference::parse(r).unwrap())
                .map(|v| v.expose().to_string())
        };
        assert_eq!(get("op://v/i/admin/PASSWORD").unwrap(), "admin-secret");
        assert_eq!(get("op://v/i/SEC1/k3").unwrap(), "admin-secret");
        assert_eq!(get("op://v/i/Username").unwrap(), "app");
        assert_eq!(get("op://v/i/port").unwrap(), "5432");
        let err = get("op://v/i/password").unwrap_err();
        assert!(matches!(err, ConnectError::AmbiguousField { .. }), "{err}");
        let err = get("op://v/i/admin/username").unwrap_err().to_string();
        assert!(
            err.contains("username, password, admin/password, admin/port"),
            "{err}"
        );
        assert!(
            !err.contains("secret") && !format!("{it:?}").contains("secret"),
            "{err}"
        );
    }

    #[test]
    fn ids_and_encoding() {
        assert!(looks_like_id("ftz4pm2xxwmwrsd7rjqn7grzfz"));
        assert!(!looks_like_id("Ftz4pm2xxwmwrsd7rjqn7grzfz"));
        assert!(!looks_like_id("homelab"));
        assert_eq!(
            percent_encode("title eq \"My Item\""),
            "title%20eq%20%22My%20Item%22"
        );
    }

    #[test]
    fn error_bodies_fall_back() {
        assert_eq!(
            error_message(br#"{"status":401,"message":"Invalid token signature"}"#).as_deref(),
            Some("Invalid token signature")
        );
        assert_eq!(error_message(b"<html>bad gateway</html>"), None);
    }
}
