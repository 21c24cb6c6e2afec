//! The git source: desired state read straight from one commit's tree.
//!
//! Two halves:
//! - [`GitCache`]: a bare repository under the state directory that caches one remote. `fetch`
//!   brings one reference (branch, tag, full commit id) in, shallow (depth 1) when the server
//!   allows it, within a time bound, with credentials only from a token file.
//! - [`CommitSource`]: a [`Source`] over one commit of any repository (the cache, or a local
//!   checkout for `--repo . --rev HEAD~3`). There is no work tree: reads are blob lookups in
//!   the commit's tree, so uncommitted edits are never seen and the revision is the commit id.
//!
//! Transports are gix's: `file://` and `ssh://`/scp-like spawn `git upload-pack` / the system
//! `ssh` (which uses its own `known_hosts` and keys; we add `BatchMode=yes` so it never
//! prompts), and `http(s)://` goes through reqwest with rustls (call [`install_tls_provider`]
//! first; `fetch` does). The token goes only over https, or plain http to a loopback address.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use gix::bstr::ByteSlice;
use gix::ObjectId;

use super::{ReadBudget, Refusal, Source, SourceError};

/// Length of commit ids in messages.
const SHORT: usize = 7;
/// The file in a cache directory that records which remote it caches.
const URL_FILE: &str = "homelab-agent-url";
/// The lock file serialising fetches into one cache (threads and processes).
const LOCK_FILE: &str = "homelab-agent-fetch.lock";
/// The user name sent with the token when the URL names none (`https://user@host/...` does);
/// Forgejo and Gitea accept any user name with an access token as the password.
const TOKEN_USER: &str = "homelab-agent";

/// `abcdef1` for messages.
pub fn short_id(id: &gix::oid) -> String {
    id.to_hex_with_len(SHORT).to_string()
}

/// Errors of the git source. Each says what failed, where (URL or path, reference, commit) and
/// what to do. No message ever contains a token.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("`{url}` is not a usable git URL: {reason}\n  use https://host/owner/repo.git, ssh://git@host/owner/repo.git, git@host:owner/repo.git or file:///path")]
    BadUrl { url: String, reason: String },
    #[error("`{reference}` is not a reference that can be fetched from {url}: {reason}\n  pass a branch (`main`, `refs/heads/main`), a tag, or a full 40-hex commit id")]
    BadReference {
        url: String,
        reference: String,
        reason: String,
    },
    #[error("cannot create the git cache for {url} at {}: {reason}\n  check that the state directory is writable by this user", path.display())]
    CacheInit {
        url: String,
        path: PathBuf,
        reason: String,
    },
    #[error("the git cache at {} is unusable: {reason}\n  remove that directory; the next fetch recreates it", path.display())]
    CacheBroken { path: PathBuf, reason: String },
    #[error("the git cache at {} holds {found}, not {url}\n  use a cache directory per URL (see source::git::cache_dir), or remove that directory", path.display())]
    CacheMismatch {
        path: PathBuf,
        url: String,
        found: String,
    },
    #[error("another fetch into the git cache at {} (for {url}) held its lock for longer than {}; `{reference}` was not fetched\n  wait for it to finish, or check for a stuck agent process", path.display(), humantime::format_duration(*timeout))]
    CacheBusy {
        url: String,
        reference: String,
        path: PathBuf,
        timeout: Duration,
    },
    #[error("the token file {} cannot be used: {reason}\n  write the Forgejo access token alone into that file, owned by the agent's user, mode 0600", path.display())]
    TokenFile { path: PathBuf, reason: String },
    #[error("the token file {} is readable by group or others (mode {mode:04o}); refusing to use it\n  run `chmod 600 {}`, and rotate the token if others could have read it", path.display(), path.display())]
    TokenFilePermissions { path: PathBuf, mode: u32 },
    #[error("{url} has no branch or tag `{reference}`{}\n  check the reference (--ref / `ref:` in the config); to pin a commit, pass its full 40-hex id", known_refs(known))]
    RefNotFound {
        url: String,
        reference: String,
        known: Vec<String>,
    },
    #[error("`{reference}` is ambiguous on {url}: it names {}\n  pass the full name, e.g. `{}`", candidates.join(" and "), candidates.first().map(String::as_str).unwrap_or("refs/heads/main"))]
    AmbiguousRef {
        url: String,
        reference: String,
        candidates: Vec<String>,
    },
    #[error("cannot fetch `{reference}` from {url}: {reason}{}", hint_line(hint))]
    Fetch {
        url: String,
        reference: String,
        reason: String,
        hint: String,
    },
    #[error("fetching `{reference}` from {url} did not finish within {}; nothing was changed\n  check that the server is reachable, or raise the fetch timeout", humantime::format_duration(*timeout))]
    Timeout {
        url: String,
        reference: String,
        timeout: Duration,
    },
    #[error("`{reference}` on {url} points to a {kind} ({}), not a commit\n  pass a branch, a tag of a commit, or a commit id", short_id(id))]
    NotACommit {
        url: String,
        reference: String,
        id: ObjectId,
        kind: String,
    },
    #[error("{} is not a git repository: {reason}\n  pass the root of a checkout (the directory holding .git) or a bare repository; without --rev a plain directory is read as it is", path.display())]
    NotARepository { path: PathBuf, reason: String },
    #[error("cannot resolve `{rev}` in {location}: {reason}{}", hint_line(hint))]
    RevNotFound {
        location: String,
        rev: String,
        reason: String,
        hint: String,
    },
    #[error("cannot read commit {} in {location}: {reason}\n  the repository may be damaged; for the cache, remove it and fetch again", short_id(commit))]
    Object {
        location: String,
        commit: ObjectId,
        reason: String,
    },
}

fn hint_line(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!("\n  {hint}")
    }
}

fn known_refs(known: &[String]) -> String {
    if known.is_empty() {
        String::new()
    } else {
        format!(" (it has: {})", known.join(", "))
    }
}

/// A gix error with its causes on one line (`what: cause: cause`), repeats dropped.
pub(crate) fn why(e: &gix::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        let text = text.trim();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(text)) {
            parts.push(text.to_string());
        }
        next = err.source();
    }
    parts.join(": ")
}

/// Installs rustls' ring crypto provider as the process default, which reqwest (built with
/// `rustls-no-provider`) needs before the first https connection. Idempotent.
pub fn install_tls_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Where desired state comes from, parsed from `--repo` / config `repo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoLocation {
    /// https://, http://, ssh://, git://, git@host:owner/repo.git (scp-like), file://
    Remote(String),
    /// A local directory. May or may not be a git repository.
    Local(PathBuf),
}

impl fmt::Display for RepoLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RepoLocation::Remote(url) => f.write_str(url),
            RepoLocation::Local(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Parses `--repo`: a URL with a scheme, an scp-like `user@host:path` (git's rule: a `:`
/// before any `/`), else a local path.
pub fn parse_location(s: &str) -> RepoLocation {
    let lower = s.to_ascii_lowercase();
    const SCHEMES: &[&str] = &[
        "https://",
        "http://",
        "ssh://",
        "git+ssh://",
        "ssh+git://",
        "git://",
        "file://",
    ];
    if SCHEMES.iter().any(|scheme| lower.starts_with(scheme)) {
        return RepoLocation::Remote(s.to_string());
    }
    if let Some(colon) = s.find(':') {
        let host = &s[..colon];
        let host_part = host.rsplit('@').next().unwrap_or(host);
        if !host_part.is_empty() && !host.contains('/') && colon + 1 < s.len() {
            return RepoLocation::Remote(s.to_string());
        }
    }
    RepoLocation::Local(PathBuf::from(s))
}

/// The cache directory for `url` under the agent's state directory:
/// `<state-dir>/git/<first 16 hex of sha256(url)>`.
pub fn cache_dir(state_dir: &Path, url: &str) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(url.as_bytes());
    state_dir.join("git").join(&hex::encode(digest)[..16])
}

/// How to fetch.
#[derive(Debug, Clone)]
pub struct GitOptions {
    /// A file holding a Forgejo access token, sent as the password of HTTP(S) basic auth when
    /// the server asks for credentials (user: the URL's user if it names one, else
    /// `homelab-agent`). Sent only over https, or plain http to a loopback address. Refused if
    /// group/other may read the file. Read on every fetch, so a rotated token is picked up.
    pub token_file: Option<PathBuf>,
    /// Overall bound for one fetch, lock wait included.
    pub timeout: Duration,
}

impl Default for GitOptions {
    fn default() -> Self {
        GitOptions {
            token_file: None,
            timeout: Duration::from_secs(120),
        }
    }
}

/// The token in `path`, after checking its mode. Never logged, never in an error.
pub fn read_token(path: &Path) -> Result<String, GitError> {
    let bad = |reason: String| GitError::TokenFile {
        path: path.to_path_buf(),
        reason,
    };
    let meta = fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("it is not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(GitError::TokenFilePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let bytes = fs::read(path).map_err(|e| bad(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|_| bad("it is not UTF-8 text".into()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(bad("it is empty".into()));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(
            "it holds more than one word or line; it must hold only the token".into(),
        ));
    }
    Ok(token.to_string())
}

/// A bare cache of one remote, e.g. under `<state-dir>/git/<hash of url>` ([`cache_dir`]).
///
/// Local refs mirror the remote names that were fetched (`refs/heads/main`, `refs/tags/v1`), so
/// [`GitCache::resolve`] answers from the last fetch. Commits fetched by id are kept alive by
/// `refs/hla/commits/<id>`; a fetched `HEAD` becomes the cache's (detached) `HEAD`.
pub struct GitCache {
    path: PathBuf,
    url: String,
    repo: gix::ThreadSafeRepository,
    ssh_command: Option<String>,
}

impl fmt::Debug for GitCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitCache")
            .field("path", &self.path)
            .field("url", &self.url)
            .finish()
    }
}

fn open_isolated(
    path: &Path,
    overrides: Vec<String>,
) -> Result<gix::ThreadSafeRepository, gix::Error> {
    gix::open::Options::isolated()
        .config_overrides(overrides)
        .open(path)
}

impl GitCache {
    /// Opens the cache at `cache_dir`, creating it (mode 0700, bare) if missing or empty.
    /// Refuses a directory that caches another URL, and URLs with an embedded password (use
    /// [`GitOptions::token_file`]).
    pub fn open_or_init(cache_dir: &Path, url: &str) -> Result<GitCache, GitError> {
        let parsed = gix::url::parse(url.as_bytes().as_bstr()).map_err(|e| GitError::BadUrl {
            url: redact(url),
            reason: redact(&e.to_string()),
        })?;
        if parsed.password().is_some() {
            return Err(GitError::BadUrl {
                url: redact(url),
                reason:
                    "it contains a password; put the token in a token file (--token-file) instead"
                        .into(),
            });
        }
        let init_err = |reason: String| GitError::CacheInit {
            url: redact(url),
            path: cache_dir.to_path_buf(),
            reason,
        };
        let is_empty = match fs::read_dir(cache_dir) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(init_err(e.to_string())),
        };
        if is_empty {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(cache_dir)
                .map_err(|e| init_err(e.to_string()))?;
            gix::init_bare(cache_dir).map_err(|e| init_err(why(&e)))?;
            // Masked: the file is for people (and the mismatch check), and a
            // token in the URL must not rest in the state directory.
            fs::write(cache_dir.join(URL_FILE), format!("{}\n", redact(url)))
                .map_err(|e| init_err(e.to_string()))?;
        } else {
            let found = fs::read_to_string(cache_dir.join(URL_FILE)).map_err(|e| {
                GitError::CacheBroken {
                    path: cache_dir.to_path_buf(),
                    reason: format!("cannot read {URL_FILE}: {e}"),
                }
            })?;
            let found = found.trim_end();
            // Caches written before URLs were masked hold the URL as given.
            if found != redact(url) && found != url {
                return Err(GitError::CacheMismatch {
                    path: cache_dir.to_path_buf(),
                    url: redact(url),
                    found: redact(found),
                });
            }
        }
        let repo = open_isolated(cache_dir, Vec::new()).map_err(|e| GitError::CacheBroken {
            path: cache_dir.to_path_buf(),
            reason: why(&e),
        })?;
        Ok(GitCache {
            path: cache_dir.to_path_buf(),
            url: url.to_string(),
            repo,
            ssh_command: None,
        })
    }

    /// Runs `command` (a shell command line, like git's `core.sshCommand`) instead of the
    /// default `ssh -o BatchMode=yes ...` for ssh:// and scp-like URLs. `GIT_SSH_COMMAND` in
    /// the environment does the same; this takes precedence.
    pub fn with_ssh_command(mut self, command: impl Into<String>) -> GitCache {
        self.ssh_command = Some(command.into());
        self
    }

    /// The remote this cache holds.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The cache directory (a bare repository).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cache repository, e.g. for signature verification.
    pub fn repo(&self) -> &gix::ThreadSafeRepository {
        &self.repo
    }

    /// Whether the cache holds only part of the history (after a depth-1 fetch).
    pub fn is_shallow(&self) -> bool {
        self.repo.to_thread_local().is_shallow().unwrap_or(false)
    }

    /// Fetches `reference` (a branch like `main` or `refs/heads/main`, a tag, `HEAD`, or a
    /// full commit id) and returns the commit it resolves to (tags are peeled). Shallow
    /// (depth 1) where the server allows it, else full. Credentials come only from
    /// `opts.token_file`; there is never a prompt. Bounded by `opts.timeout`: on timeout this
    /// returns at once and the fetch is interrupted; it stops at its next check (or when the
    /// transport gives up), holding the cache's lock until then, and does not move the
    /// cache's refs after the interruption.
    pub fn fetch(&self, reference: &str, opts: &GitOptions) -> Result<ObjectId, GitError> {
        validate_reference(&self.url, reference)?;
        let token = match &opts.token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        install_tls_provider();

        let user = gix::url::parse(self.url.as_bytes().as_bstr())
            .ok()
            .and_then(|u| u.user().map(str::to_string))
            .unwrap_or_else(|| TOKEN_USER.to_string());
        let job = FetchJob {
            path: self.path.clone(),
            url: self.url.clone(),
            reference: reference.to_string(),
            token,
            user,
            ssh_command: self.ssh_command.clone(),
            timeout: opts.timeout,
        };
        let interrupt = Arc::new(AtomicBool::new(false));
        let waiting_for_lock = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        {
            let interrupt = interrupt.clone();
            let waiting_for_lock = waiting_for_lock.clone();
            std::thread::Builder::new()
                .name("git-fetch".into())
                .spawn(move || {
                    let result = job.run(&interrupt, &waiting_for_lock);
                    let _ = tx.send(result);
                })
                .map_err(|e| self.fetch_error(reference, format!("cannot start a thread: {e}")))?;
        }
        match rx.recv_timeout(opts.timeout) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // The worker notices at its next check, or when the transport gives up; it
                // holds the cache lock until then, so a later fetch cannot interleave.
                interrupt.store(true, Ordering::SeqCst);
                if waiting_for_lock.load(Ordering::SeqCst) {
                    Err(GitError::CacheBusy {
                        url: redact(&self.url),
                        reference: reference.to_string(),
                        path: self.path.clone(),
                        timeout: opts.timeout,
                    })
                } else {
                    Err(GitError::Timeout {
                        url: redact(&self.url),
                        reference: reference.to_string(),
                        timeout: opts.timeout,
                    })
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(self.fetch_error(
                reference,
                "the fetch thread stopped without a result (panic)".into(),
            )),
        }
    }

    fn fetch_error(&self, reference: &str, reason: String) -> GitError {
        GitError::Fetch {
            url: redact(&self.url),
            reference: reference.to_string(),
            reason,
            hint: String::new(),
        }
    }

    /// Resolves a revision spec (`main`, `HEAD~3`, a short or full id, a tag) in the cache,
    /// without fetching, to a commit.
    pub fn resolve(&self, rev: &str) -> Result<ObjectId, GitError> {
        resolve_commit(&self.repo.to_thread_local(), rev, &redact(&self.url))
    }

    /// A source reading `commit` from this cache, described as `<url>@<short id>`.
    pub fn source(&self, commit: ObjectId) -> Result<CommitSource, GitError> {
        CommitSource::new(self.repo.clone(), commit, redact(&self.url))
    }
}

/// Rejects what cannot be a single fetchable reference, before any network traffic.
fn validate_reference(url: &str, reference: &str) -> Result<(), GitError> {
    let bad = |reason: &str| GitError::BadReference {
        url: redact(url),
        reference: reference.to_string(),
        reason: reason.to_string(),
    };
    if reference.is_empty() {
        return Err(bad("it is empty"));
    }
    if reference.starts_with('-') || reference.starts_with('+') || reference.starts_with('^') {
        return Err(bad("it starts with `-`, `+` or `^`"));
    }
    if let Some(c) = reference
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || ":*?[\\~^".contains(*c))
    {
        return Err(bad(&if c == '~' || c == '^' {
            format!("it contains `{c}`: revision expressions like `main~1` cannot be fetched, only resolved in a repository that already holds the history")
        } else {
            format!("reference names cannot contain `{}`", c.escape_default())
        }));
    }
    if reference.contains("..") || reference.ends_with('/') || reference.ends_with(".lock") {
        return Err(bad("it is not a valid reference name"));
    }
    Ok(())
}

/// Hides the credentials of `url` (the one rule for every message: [`crate::redact`]).
fn redact(url: &str) -> String {
    crate::redact::url_credentials_owned(url)
}

/// One fetch, run on its own thread so that `fetch` can bound it.
struct FetchJob {
    path: PathBuf,
    url: String,
    reference: String,
    token: Option<String>,
    /// The basic-auth user sent with the token.
    user: String,
    ssh_command: Option<String>,
    timeout: Duration,
}

/// What the server said about `reference` before the pack was received.
struct Wanted {
    /// The remote name (`refs/heads/main`, `HEAD`), `None` when fetching by id.
    remote_name: Option<String>,
    /// What the remote ref points to (a tag object for annotated tags), or the requested id.
    target: ObjectId,
}

enum Attempt {
    Done(ObjectId),
    /// The server cannot do shallow fetches: retry with the full history.
    NoShallow(String),
}

impl FetchJob {
    fn run(
        &self,
        interrupt: &AtomicBool,
        waiting_for_lock: &AtomicBool,
    ) -> Result<ObjectId, GitError> {
        let _lock = self.lock(waiting_for_lock)?;
        if interrupt.load(Ordering::SeqCst) {
            return Err(GitError::Timeout {
                url: redact(&self.url),
                reference: self.reference.clone(),
                timeout: self.timeout,
            });
        }
        let repo = open_isolated(&self.path, self.overrides())
            .map_err(|e| GitError::CacheBroken {
                path: self.path.clone(),
                reason: why(&e),
            })?
            .to_thread_local();
        let depth_one = gix::remote::fetch::Shallow::DepthAtRemote(1.try_into().expect("1 > 0"));
        match self.attempt(&repo, depth_one, interrupt)? {
            Attempt::Done(id) => Ok(id),
            Attempt::NoShallow(_) => match self.attempt(&repo, Default::default(), interrupt)? {
                Attempt::Done(id) => Ok(id),
                Attempt::NoShallow(reason) => Err(self.error(reason)),
            },
        }
    }

    /// Takes the cache's fetch lock (an `flock`, so it also serialises separate processes).
    fn lock(&self, waiting: &AtomicBool) -> Result<nix::fcntl::Flock<fs::File>, GitError> {
        use nix::fcntl::{Flock, FlockArg};
        let path = self.path.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| GitError::CacheBroken {
                path: self.path.clone(),
                reason: format!("cannot open {}: {e}", path.display()),
            })?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(lock),
            Err((file, _)) => {
                waiting.store(true, Ordering::SeqCst);
                let lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| {
                    GitError::CacheBroken {
                        path: self.path.clone(),
                        reason: format!("cannot lock {}: {e}", path.display()),
                    }
                })?;
                waiting.store(false, Ordering::SeqCst);
                Ok(lock)
            }
        }
    }

    /// Configuration for this fetch: an `ssh` that never prompts (unless `GIT_SSH_COMMAND`
    /// says otherwise: the cache is opened isolated from the environment, so it is passed on
    /// here).
    fn overrides(&self) -> Vec<String> {
        let configured = self
            .ssh_command
            .clone()
            .or_else(|| std::env::var("GIT_SSH_COMMAND").ok())
            .filter(|cmd| !cmd.trim().is_empty());
        match configured {
            Some(cmd) => vec![format!("core.sshCommand={cmd}")],
            _ => {
                let connect = self.timeout.as_secs().clamp(1, 30);
                vec![
                    format!(
                        "core.sshCommand=ssh -o BatchMode=yes -o ConnectTimeout={connect} \
                         -o ServerAliveInterval=15 -o ServerAliveCountMax=2"
                    ),
                    "ssh.variant=ssh".into(),
                ]
            }
        }
    }

    fn error(&self, reason: String) -> GitError {
        // gix's words when the credentials callback has nothing to give.
        let reason = if reason.contains("No credentials were returned") {
            if self.url.starts_with("http://") || self.url.starts_with("https://") {
                "the server requires authentication (HTTP 401)".to_string()
            } else {
                "the server refused access (permission denied)".to_string()
            }
        } else {
            reason
        };
        let hint = fetch_hint(&self.url, &reason, self.token.is_some(), &self.user);
        GitError::Fetch {
            url: redact(&self.url),
            reference: self.reference.clone(),
            reason,
            hint,
        }
    }

    /// The credentials callback: the token, if there is one and it may go to the URL asked
    /// for (else nothing, noted in `withheld`). Always installed: gix's default would run
    /// credential helpers and then prompt on a terminal.
    fn credentials(
        &self,
        withheld: Arc<AtomicBool>,
    ) -> impl FnMut(
        gix::credentials::helper::Action,
    ) -> gix::Result<Option<gix::credentials::protocol::Outcome>>
           + 'static {
        use gix::credentials::helper::Action;
        let token = self.token.clone();
        let user = self.user.clone();
        move |action| match action {
            Action::Get(ctx) => {
                let Some(token) = &token else { return Ok(None) };
                if !ctx
                    .url
                    .as_ref()
                    .is_some_and(|url| token_allowed(url.as_ref()))
                {
                    withheld.store(true, Ordering::SeqCst);
                    return Ok(None);
                }
                Ok(Some(gix::credentials::protocol::Outcome {
                    identity: gix::sec::identity::Account {
                        username: user.clone(),
                        password: token.clone(),
                        oauth_refresh_token: None,
                    },
                    next: ctx.into(),
                }))
            }
            Action::Store(_) | Action::Erase(_) => Ok(None),
        }
    }

    /// Branch and tag names on the remote (for a "did you mean"); empty if listing fails.
    fn list_remote_refs(&self, repo: &gix::Repository) -> Vec<String> {
        use gix::remote::Direction;
        let listed = repo
            .remote_at(self.url.as_str())
            .and_then(|r| {
                r.with_fetch_tags(gix::remote::fetch::Tags::None)
                    .with_refspecs(
                        ["refs/heads/*:refs/heads/*", "refs/tags/*:refs/tags/*"],
                        Direction::Fetch,
                    )
            })
            .and_then(|remote| {
                let connection = remote
                    .connect(Direction::Fetch)?
                    .with_credentials(self.credentials(Arc::new(AtomicBool::new(false))));
                connection
                    .ref_map(gix::progress::Discard, Default::default())
                    .map(|(map, _)| map)
            });
        let Ok(map) = listed else {
            return Vec::new();
        };
        let mut known: Vec<String> = map
            .remote_refs
            .iter()
            .filter_map(|r| {
                let name = r.unpack().0.to_str_lossy();
                name.strip_prefix("refs/heads/")
                    .or_else(|| name.strip_prefix("refs/tags/"))
                    .map(str::to_string)
            })
            .collect();
        known.sort();
        known.dedup();
        known.truncate(20);
        known
    }

    fn attempt(
        &self,
        repo: &gix::Repository,
        shallow: gix::remote::fetch::Shallow,
        interrupt: &AtomicBool,
    ) -> Result<Attempt, GitError> {
        use gix::remote::Direction;

        let wants_shallow = shallow != gix::remote::fetch::Shallow::NoChange;
        let remote = repo
            .remote_at(self.url.as_str())
            .and_then(|r| {
                r.with_fetch_tags(gix::remote::fetch::Tags::None)
                    .with_refspecs([self.reference.as_str()], Direction::Fetch)
            })
            .map_err(|e| self.error(why(&e)))?;
        let connection = remote
            .connect(Direction::Fetch)
            .map_err(|e| self.error(why(&e)))?;
        let withheld = Arc::new(AtomicBool::new(false));
        let connection = connection.with_credentials(self.credentials(withheld.clone()));
        let with_hint = |e: &gix::Error| {
            let mut err = self.error(why(e));
            if withheld.load(Ordering::SeqCst) {
                if let GitError::Fetch { hint, .. } = &mut err {
                    *hint = "the token is sent only over https (or plain http to this host's loopback address): use an https:// URL".into();
                }
            }
            err
        };
        let prepare = connection
            .prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(|e| with_hint(&e))?;
        let wanted = self.select(repo, prepare.ref_map())?;
        let outcome = match prepare
            .with_shallow(shallow)
            .receive(gix::progress::Discard, interrupt)
        {
            Ok(outcome) => outcome,
            Err(e) => {
                let reason = why(&e);
                if interrupt.load(Ordering::SeqCst) {
                    return Err(GitError::Timeout {
                        url: redact(&self.url),
                        reference: self.reference.clone(),
                        timeout: self.timeout,
                    });
                }
                if wants_shallow && reason.to_ascii_lowercase().contains("shallow") {
                    return Ok(Attempt::NoShallow(reason));
                }
                if wanted.remote_name.is_none() {
                    return Err(GitError::Fetch {
                        url: redact(&self.url),
                        reference: self.reference.clone(),
                        reason,
                        hint: "the server may not serve commits by id that no branch or tag points to (Forgejo and git >= 2.x over protocol v2 do); fetch a branch or tag instead".into(),
                    });
                }
                return Err(with_hint(&e));
            }
        };
        if interrupt.load(Ordering::SeqCst) {
            // The caller has given up on this fetch: leave the refs as they were.
            return Err(GitError::Timeout {
                url: redact(&self.url),
                reference: self.reference.clone(),
                timeout: self.timeout,
            });
        }
        self.point_ref(repo, &wanted)?;
        if let gix::remote::fetch::Status::Change {
            write_pack_bundle, ..
        } = &outcome.status
        {
            // gix updated no ref (our refspec has no destination), so the `.keep` file that
            // protects the new pack is ours to remove, now that our ref points into it.
            if let Some(keep) = &write_pack_bundle.keep_path {
                let _ = fs::remove_file(keep);
            }
        }
        let commit = self.peel(repo, &wanted)?;
        Ok(Attempt::Done(commit))
    }

    /// Picks the one remote ref (or id) that `reference` names.
    fn select(
        &self,
        repo: &gix::Repository,
        ref_map: &gix::remote::fetch::RefMap,
    ) -> Result<Wanted, GitError> {
        use gix::remote::fetch::refmap::Source as RemoteSource;
        let mut found: Vec<(String, ObjectId)> = Vec::new();
        for mapping in &ref_map.mappings {
            match &mapping.remote {
                RemoteSource::ObjectId(id) => {
                    return Ok(Wanted {
                        remote_name: None,
                        target: *id,
                    })
                }
                RemoteSource::Ref(r) => {
                    let (name, target, _peeled) = r.unpack();
                    if let Some(target) = target {
                        let name = name.to_str_lossy().into_owned();
                        if !found.iter().any(|(n, _)| *n == name) {
                            found.push((name, target.to_owned()));
                        }
                    }
                }
            }
        }
        match found.len() {
            // The server listed only refs matching our spec's prefixes: ask again for all
            // branch and tag names, for the message.
            0 => Err(GitError::RefNotFound {
                url: redact(&self.url),
                reference: self.reference.clone(),
                known: self.list_remote_refs(repo),
            }),
            1 => {
                let (name, target) = found.pop().expect("one");
                Ok(Wanted {
                    remote_name: Some(name),
                    target,
                })
            }
            _ => Err(GitError::AmbiguousRef {
                url: redact(&self.url),
                reference: self.reference.clone(),
                candidates: found.into_iter().map(|(n, _)| n).collect(),
            }),
        }
    }

    /// Points the cache's mirror of the fetched ref at what the remote said.
    fn point_ref(&self, repo: &gix::Repository, wanted: &Wanted) -> Result<(), GitError> {
        use gix::refs::transaction::PreviousValue;
        let local = match &wanted.remote_name {
            Some(name) if name.starts_with("refs/") => name.clone(),
            Some(name) if name == "HEAD" => "HEAD".to_string(),
            Some(name) => format!("refs/hla/remote/{name}"),
            None => format!("refs/hla/commits/{}", wanted.target),
        };
        // The object must be here before a ref may point at it.
        repo.find_header(wanted.target).map_err(|e| {
            self.error(format!(
                "the server did not send {} ({})",
                short_id(&wanted.target),
                why(&e)
            ))
        })?;
        repo.reference(
            local.as_str(),
            wanted.target,
            PreviousValue::Any,
            format!(
                "homelab-agent: fetch {} from {}",
                self.reference,
                redact(&self.url)
            ),
        )
        .map_err(|e| GitError::CacheBroken {
            path: self.path.clone(),
            reason: format!("cannot update {local}: {}", why(&e)),
        })?;
        Ok(())
    }

    fn peel(&self, repo: &gix::Repository, wanted: &Wanted) -> Result<ObjectId, GitError> {
        let object = repo
            .find_object(wanted.target)
            .map_err(|e| self.error(why(&e)))?;
        let kind = object.kind;
        match object.peel_to_commit() {
            Ok(commit) => Ok(commit.id),
            Err(_) => Err(GitError::NotACommit {
                url: redact(&self.url),
                reference: self.reference.clone(),
                id: wanted.target,
                kind: kind.to_string(),
            }),
        }
    }
}

/// Whether the token may be sent to `url`: over https, or over plain http only to a loopback
/// address (nothing leaves the host). gix itself is built to allow http credentials
/// (`http-client-insecure-credentials`) so that this policy, not a blanket refusal, applies.
fn token_allowed(url: &gix::bstr::BStr) -> bool {
    let Ok(url) = gix::url::parse(url) else {
        return false;
    };
    match url.scheme {
        gix::url::Scheme::Https => true,
        gix::url::Scheme::Http => url.host().is_some_and(|host| {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }),
        _ => false,
    }
}

/// What to do about a failed fetch, from the transport's words.
fn fetch_hint(url: &str, reason: &str, have_token: bool, user: &str) -> String {
    let lower = reason.to_ascii_lowercase();
    let http = url.starts_with("http://") || url.starts_with("https://");
    if lower.contains("clear text") {
        return "credentials are never sent over plain http: use an https:// URL".into();
    }
    if http
        && (lower.contains("401")
            || lower.contains("authenticat")
            || lower.contains("credentials")
            || lower.contains("403"))
    {
        return if have_token {
            format!("the server refused the token (sent as user `{user}`): check that it is valid, not expired, and may read the repository; to send another user name, put it in the URL (https://USER@host/...)")
        } else {
            "the server wants credentials: pass --token-file with a Forgejo access token (read:repository)".into()
        };
    }
    if lower.contains("permission denied") || lower.contains("host key") {
        return "ssh could not log in: check the deploy key (ssh-agent or ~/.ssh/config of the agent's user) and that the host is in known_hosts (ssh runs with BatchMode=yes, so it never asks)".into();
    }
    if lower.contains("could not verify that") || lower.contains("not a git repository") {
        return "check that the path exists and is a git repository".into();
    }
    if lower.contains("resolve") || lower.contains("connect") || lower.contains("refused") {
        return "check the URL and that the server is reachable from this host".into();
    }
    String::new()
}

/// Resolves `rev` in `repo` to a commit; `location` names the repository in messages.
fn resolve_commit(repo: &gix::Repository, rev: &str, location: &str) -> Result<ObjectId, GitError> {
    let not_found = |reason: String| {
        let shallow = repo.is_shallow().unwrap_or(false);
        let hint = if shallow && (rev.contains('~') || rev.contains('^')) {
            "this repository holds only fetched commits (shallow, depth 1): older commits are not here; pass a branch, tag or full commit id to fetch".to_string()
        } else {
            "pass a branch, a tag, or a commit id (short or full) that exists in the repository"
                .to_string()
        };
        GitError::RevNotFound {
            location: location.to_string(),
            rev: rev.to_string(),
            reason,
            hint,
        }
    };
    if rev.is_empty() {
        return Err(not_found("the revision is empty".into()));
    }
    let id = repo
        .rev_parse_single(rev.as_bytes().as_bstr())
        .map_err(|e| not_found(why(&e)))?;
    let object = id.object().map_err(|e| not_found(why(&e)))?;
    let kind = object.kind;
    match object.peel_to_commit() {
        Ok(commit) => Ok(commit.id),
        Err(_) => Err(not_found(format!(
            "it names a {kind} ({}), not a commit",
            short_id(&id)
        ))),
    }
}

/// A [`Source`] that reads files straight from one commit's tree (no work tree).
///
/// `Send + Sync`: it holds a [`gix::ThreadSafeRepository`] and a small pool of thread-local
/// handles, so concurrent reads do not serialise on one handle.
pub struct CommitSource {
    repo: gix::ThreadSafeRepository,
    pool: Mutex<Vec<gix::Repository>>,
    commit: ObjectId,
    tree: ObjectId,
    label: String,
    /// Bytes read from this commit, against `MAX_TOTAL_BYTES`.
    budget: ReadBudget,
}

impl fmt::Debug for CommitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommitSource")
            .field("label", &self.label)
            .field("commit", &self.commit)
            .finish()
    }
}

impl CommitSource {
    /// Opens the git repository at `repo_path` (bare, or the root of a checkout; not a
    /// subdirectory) and resolves `rev` (`HEAD`, `HEAD~3`, `main`, a tag, a short or full id)
    /// to a commit. Uncommitted edits are not seen.
    pub fn open(repo_path: &Path, rev: &str) -> Result<CommitSource, GitError> {
        let repo = open_isolated(repo_path, Vec::new()).map_err(|e| GitError::NotARepository {
            path: repo_path.to_path_buf(),
            reason: why(&e),
        })?;
        let label = repo_path.display().to_string();
        let commit = resolve_commit(&repo.to_thread_local(), rev, &label)?;
        CommitSource::new(repo, commit, label)
    }

    fn new(
        repo: gix::ThreadSafeRepository,
        commit: ObjectId,
        label: String,
    ) -> Result<CommitSource, GitError> {
        let local = repo.to_thread_local();
        let tree = local
            .find_commit(commit)
            .and_then(|c| c.tree_id().map(|id| id.detach()))
            .map_err(|e| GitError::Object {
                location: label.clone(),
                commit,
                reason: why(&e),
            })?;
        Ok(CommitSource {
            repo,
            pool: Mutex::new(vec![local]),
            commit,
            tree,
            label,
            budget: ReadBudget::default(),
        })
    }

    /// The commit read.
    pub fn commit_id(&self) -> ObjectId {
        self.commit
    }

    /// A handle on the repository, e.g. for signature verification.
    pub fn repository(&self) -> gix::Repository {
        self.repo.to_thread_local()
    }

    fn with_repo<T>(&self, f: impl FnOnce(&gix::Repository) -> T) -> T {
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut repo = pooled.unwrap_or_else(|| self.repo.to_thread_local());
        repo.object_cache_size_if_unset(4 * 1024 * 1024);
        let out = f(&repo);
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(repo);
        out
    }

    /// Checks a repo-relative path like `LocalDir` does and returns its components.
    fn components(path: &str) -> Result<Vec<&str>, SourceError> {
        super::components(path)
    }

    /// When `parts` is missing from the tree: refuses it if one of its
    /// parent directories is a symlink (as `LocalDir` does), so a link is
    /// never silently read as "no such file".
    fn check_parents(
        &self,
        repo: &gix::Repository,
        path: &str,
        parts: &[&str],
    ) -> Result<(), SourceError> {
        for n in 1..parts.len() {
            let entry = self
                .entry(repo, &parts[..n])
                .map_err(|e| self.read_error(path, &e))?;
            match entry {
                Some((mode, _)) if mode.is_link() => {
                    return Err(SourceError::Refused {
                        path: path.to_string(),
                        why: Refusal::Symlink {
                            at: parts[..n].join("/"),
                        },
                    })
                }
                Some((mode, _)) if mode.is_tree() => {}
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    fn read_error(&self, path: &str, e: &gix::Error) -> SourceError {
        SourceError::Read {
            path: path.to_string(),
            source: io::Error::other(format!(
                "in commit {} of {}: {}",
                short_id(&self.commit),
                self.label,
                why(e)
            )),
        }
    }

    /// The entry at `parts` in the commit's tree (`None` for the root).
    fn entry(
        &self,
        repo: &gix::Repository,
        parts: &[&str],
    ) -> Result<Option<(gix::objs::tree::EntryMode, ObjectId)>, gix::Error> {
        let tree = repo.find_tree(self.tree)?;
        Ok(tree
            .lookup_entry(parts.iter().map(|p| p.as_bytes()))?
            .map(|e| (e.mode(), e.object_id())))
    }
}

impl Source for CommitSource {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let parts = Self::components(path)?;
        if parts.is_empty() {
            return Ok(None);
        }
        self.with_repo(|repo| {
            let entry = self
                .entry(repo, &parts)
                .map_err(|e| self.read_error(path, &e))?;
            match entry {
                Some((mode, id)) if mode.is_blob() => {
                    // The size from the object's header, before inflating it.
                    let header = repo
                        .find_header(id)
                        .map_err(|e| self.read_error(path, &e))?;
                    super::check_size(path, header.size())?;
                    let object = repo
                        .find_object(id)
                        .map_err(|e| self.read_error(path, &e))?;
                    super::check_size(path, object.data.len() as u64)?;
                    self.budget.charge(path, object.data.len() as u64)?;
                    Ok(Some(object.detach().data))
                }
                Some((mode, _)) if mode.is_link() => Err(SourceError::Refused {
                    path: path.to_string(),
                    why: Refusal::Symlink {
                        at: path.to_string(),
                    },
                }),
                Some(_) => Ok(None),
                None => {
                    self.check_parents(repo, path, &parts)?;
                    Ok(None)
                }
            }
        })
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, SourceError> {
        let parts = Self::components(dir)?;
        self.with_repo(|repo| {
            let tree_id = if parts.is_empty() {
                self.tree
            } else {
                match self
                    .entry(repo, &parts)
                    .map_err(|e| self.read_error(dir, &e))?
                {
                    Some((mode, id)) if mode.is_tree() => id,
                    Some((mode, _)) if mode.is_link() => {
                        return Err(SourceError::Refused {
                            path: dir.to_string(),
                            why: Refusal::Symlink {
                                at: dir.to_string(),
                            },
                        })
                    }
                    Some(_) => return Ok(Vec::new()),
                    None => {
                        self.check_parents(repo, dir, &parts)?;
                        return Ok(Vec::new());
                    }
                }
            };
            let tree = repo
                .find_tree(tree_id)
                .map_err(|e| self.read_error(dir, &e))?;
            let mut names = Vec::new();
            for entry in tree.iter() {
                let entry = entry.map_err(|e| self.read_error(dir, &e))?;
                if let Ok(name) = entry.filename().to_str() {
                    names.push(name.to_string());
                }
            }
            names.sort();
            Ok(names)
        })
    }

    fn revision(&self) -> String {
        self.commit.to_string()
    }

    fn describe(&self) -> String {
        format!("{}@{}", self.label, short_id(&self.commit))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use homelab_agent_tests::git_server::{self, GitServer, WorkClone};

    /// Runs hermetic `git -C dir args`; panics with stderr on failure; returns trimmed stdout.
    pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
        let out = git_server::git()
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub(crate) fn write(dir: &Path, rel: &str, content: &str) {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    /// A work repository (branch `main`) with identity set and signing off.
    pub(crate) fn init_repo(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        git(dir, &["init", "-q", "-b", "main"]);
        for (k, v) in [
            ("user.name", "Lab Admin"),
            ("user.email", "lab@example.com"),
            ("commit.gpgsign", "false"),
            ("tag.gpgsign", "false"),
        ] {
            git(dir, &["config", k, v]);
        }
    }

    pub(crate) fn commit_all(dir: &Path, msg: &str) -> String {
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "-q", "--allow-empty", "-m", msg]);
        git(dir, &["rev-parse", "HEAD"])
    }

    struct Fixture {
        tmp: tempfile::TempDir,
        work: PathBuf,
        url: String,
        first: String,
        second: String,
    }

    /// Two commits: `hosts/lab.yaml` v1 → v2, `modules/m/module.yaml` unchanged.
    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        init_repo(&work);
        write(&work, "hosts/lab.yaml", "name: lab # v1\n");
        write(&work, "modules/m/module.yaml", "resources: []\n");
        write(&work, "modules/m/templates/a.j2", "a\n");
        let first = commit_all(&work, "one");
        write(&work, "hosts/lab.yaml", "name: lab # v2\n");
        let second = commit_all(&work, "two");
        let url = format!("file://{}", work.display());
        Fixture {
            tmp,
            work,
            url,
            first,
            second,
        }
    }

    fn opts() -> GitOptions {
        GitOptions {
            token_file: None,
            timeout: Duration::from_secs(60),
        }
    }

    fn read_str(src: &dyn Source, path: &str) -> Option<String> {
        src.read(path)
            .unwrap()
            .map(|b| String::from_utf8(b).unwrap())
    }

    /// Issue 12: a checkout and its commit refuse the same paths the same
    /// way: a symlink (to outside or inside, or as a parent directory) and
    /// a file over the size limit.
    #[test]
    fn a_commit_refuses_what_a_checkout_refuses() {
        use crate::source::{LocalDir, Refusal, MAX_FILE_BYTES};
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        init_repo(&work);
        write(&work, "modules/m/templates/a.j2", "a\n");
        let t = work.join("modules/m/templates");
        std::os::unix::fs::symlink("/etc/passwd", t.join("out.j2")).unwrap();
        std::os::unix::fs::symlink("a.j2", t.join("in.j2")).unwrap();
        std::os::unix::fs::symlink("m", work.join("modules/n")).unwrap();
        let big = fs::File::create(t.join("big.j2")).unwrap();
        big.set_len(MAX_FILE_BYTES + 1).unwrap();
        commit_all(&work, "hostile");
        let commit = CommitSource::open(&work, "HEAD").unwrap();
        let local = LocalDir::open(&work).unwrap();
        let symlink = |at: &str| Refusal::Symlink { at: at.into() };
        for (path, why) in [
            (
                "modules/m/templates/out.j2",
                symlink("modules/m/templates/out.j2"),
            ),
            (
                "modules/m/templates/in.j2",
                symlink("modules/m/templates/in.j2"),
            ),
            ("modules/n/templates/a.j2", symlink("modules/n")),
            (
                "modules/m/templates/big.j2",
                Refusal::TooLarge {
                    limit: MAX_FILE_BYTES,
                },
            ),
        ] {
            for src in [&commit as &dyn Source, &local] {
                match src.read(path) {
                    Err(SourceError::Refused { path: p, why: w }) => {
                        assert_eq!((p.as_str(), &w), (path, &why), "{}", src.describe())
                    }
                    other => panic!("{path} in {}: {other:?}", src.describe()),
                }
            }
        }
        for src in [&commit as &dyn Source, &local] {
            assert!(matches!(
                src.list("modules/n"),
                Err(SourceError::Refused { .. })
            ));
            assert_eq!(
                read_str(src, "modules/m/templates/a.j2").as_deref(),
                Some("a\n")
            );
        }
    }

    #[test]
    fn parse_location_forms() {
        use RepoLocation::*;
        for remote in [
            "https://forgejo.example.com/eblume/homelab.git",
            "http://127.0.0.1:3000/o/r.git",
            "ssh://git@forgejo.example.com:2222/o/r.git",
            "git@forgejo.example.com:eblume/homelab.git",
            "forgejo:o/r.git",
            "file:///srv/git/homelab.git",
            "HTTPS://EXAMPLE.COM/o/r",
        ] {
            assert_eq!(parse_location(remote), Remote(remote.into()), "{remote}");
        }
        for local in [
            ".",
            "/srv/homelab",
            "./a:b",
            "../homelab",
            "homelab",
            "dir/with:colon",
        ] {
            assert_eq!(
                parse_location(local),
                Local(PathBuf::from(local)),
                "{local}"
            );
        }
    }

    #[test]
    fn redact_hides_passwords_and_token_users() {
        assert_eq!(
            redact("https://u:secret@h/o/r.git"),
            "https://u:***@h/o/r.git"
        );
        // A user name alone over https is how forges take a token.
        assert_eq!(redact("https://u@h/o/r.git"), "https://***@h/o/r.git");
        assert_eq!(redact("ssh://git@h/o/r.git"), "ssh://git@h/o/r.git");
        assert_eq!(redact("git@h:o/r.git"), "git@h:o/r.git");
    }

    #[test]
    fn cache_dir_is_stable_per_url() {
        let a = cache_dir(Path::new("/var/lib/hla"), "https://h/o/r.git");
        assert_eq!(a, cache_dir(Path::new("/var/lib/hla"), "https://h/o/r.git"));
        assert_ne!(
            a,
            cache_dir(Path::new("/var/lib/hla"), "https://h/o/other.git")
        );
        assert!(a.starts_with("/var/lib/hla/git"));
    }

    #[test]
    fn fetch_over_file_url_reads_lists_and_follows_new_commits() {
        let fx = fixture();
        let cache_path = fx.tmp.path().join("state/git/x");
        let cache = GitCache::open_or_init(&cache_path, &fx.url).unwrap();
        let mode = fs::metadata(&cache_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the cache is private");

        let id = cache.fetch("main", &opts()).unwrap();
        assert_eq!(id.to_string(), fx.second);
        assert!(
            cache.is_shallow(),
            "file:// (git upload-pack) allows depth 1"
        );
        assert_eq!(cache.resolve("main").unwrap(), id);
        assert_eq!(cache.resolve(&fx.second[..8]).unwrap(), id);

        let src = cache.source(id).unwrap();
        assert_eq!(
            read_str(&src, "hosts/lab.yaml").as_deref(),
            Some("name: lab # v2\n")
        );
        assert_eq!(
            read_str(&src, "modules/m/module.yaml").as_deref(),
            Some("resources: []\n")
        );
        assert_eq!(src.read("hosts/missing.yaml").unwrap(), None);
        assert_eq!(src.read("modules/m").unwrap(), None, "a tree is not a file");
        assert_eq!(src.read("hosts/lab.yaml/x").unwrap(), None);
        assert_eq!(src.list("").unwrap(), ["hosts", "modules"]);
        assert_eq!(src.list("modules/m").unwrap(), ["module.yaml", "templates"]);
        assert_eq!(src.list("nope").unwrap(), Vec::<String>::new());
        assert_eq!(src.list("hosts/lab.yaml").unwrap(), Vec::<String>::new());
        assert!(matches!(src.read("../x"), Err(SourceError::BadPath(_))));
        assert!(matches!(
            src.read("/etc/passwd"),
            Err(SourceError::BadPath(_))
        ));
        assert_eq!(src.revision(), fx.second);
        assert_eq!(src.describe(), format!("{}@{}", fx.url, &fx.second[..7]));

        // Shallow: the parent is not in the cache, and the error says why.
        let err = cache.resolve("main~1").unwrap_err().to_string();
        assert!(err.contains("main~1") && err.contains("shallow"), "{err}");

        // A new commit upstream: fetching again moves to it.
        write(&fx.work, "hosts/lab.yaml", "name: lab # v3\n");
        let third = commit_all(&fx.work, "three");
        let id3 = cache.fetch("refs/heads/main", &opts()).unwrap();
        assert_eq!(id3.to_string(), third);
        assert_eq!(cache.resolve("main").unwrap(), id3);
        let src3 = cache.source(id3).unwrap();
        assert_eq!(
            read_str(&src3, "hosts/lab.yaml").as_deref(),
            Some("name: lab # v3\n")
        );
        // The older source still reads its own commit.
        assert_eq!(
            read_str(&src, "hosts/lab.yaml").as_deref(),
            Some("name: lab # v2\n")
        );

        // Nothing new: same id, no error.
        assert_eq!(cache.fetch("main", &opts()).unwrap(), id3);

        // Reopening the cache keeps what was fetched.
        let reopened = GitCache::open_or_init(&cache_path, &fx.url).unwrap();
        assert_eq!(reopened.resolve("main").unwrap(), id3);
    }

    #[test]
    fn fetch_tags_and_commit_ids() {
        let fx = fixture();
        git(&fx.work, &["tag", "-a", "-m", "release 1", "v1", &fx.first]);
        git(&fx.work, &["tag", "light", &fx.second]);
        let cache = GitCache::open_or_init(&fx.tmp.path().join("cache"), &fx.url).unwrap();

        // An annotated tag is peeled to its commit.
        let v1 = cache.fetch("v1", &opts()).unwrap();
        assert_eq!(v1.to_string(), fx.first);
        assert_eq!(cache.resolve("v1").unwrap(), v1);
        let src = cache.source(v1).unwrap();
        assert_eq!(
            read_str(&src, "hosts/lab.yaml").as_deref(),
            Some("name: lab # v1\n")
        );

        assert_eq!(
            cache.fetch("refs/tags/light", &opts()).unwrap().to_string(),
            fx.second
        );

        // A full commit id (not a tip) is fetched as such.
        let cache2 = GitCache::open_or_init(&fx.tmp.path().join("cache2"), &fx.url).unwrap();
        let by_id = cache2.fetch(&fx.first, &opts()).unwrap();
        assert_eq!(by_id.to_string(), fx.first);
        assert_eq!(
            read_str(&cache2.source(by_id).unwrap(), "hosts/lab.yaml").as_deref(),
            Some("name: lab # v1\n")
        );

        // HEAD of the remote.
        assert_eq!(
            cache2.fetch("HEAD", &opts()).unwrap().to_string(),
            fx.second
        );
        assert_eq!(cache2.resolve("HEAD").unwrap().to_string(), fx.second);
    }

    #[test]
    fn bad_refs_give_clear_errors() {
        let fx = fixture();
        git(&fx.work, &["tag", "main-tag", &fx.first]);
        git(&fx.work, &["tag", "dup", &fx.first]);
        git(&fx.work, &["branch", "dup", &fx.first]);
        let cache = GitCache::open_or_init(&fx.tmp.path().join("cache"), &fx.url).unwrap();

        let err = cache.fetch("nope", &opts()).unwrap_err();
        assert!(matches!(err, GitError::RefNotFound { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("`nope`") && msg.contains(&fx.url), "{msg}");
        assert!(
            msg.contains("main") && msg.contains("main-tag"),
            "lists known refs: {msg}"
        );

        let err = cache.fetch("dup", &opts()).unwrap_err();
        assert!(matches!(err, GitError::AmbiguousRef { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("refs/heads/dup") && msg.contains("refs/tags/dup"),
            "{msg}"
        );
        assert_eq!(
            cache.fetch("refs/heads/dup", &opts()).unwrap().to_string(),
            fx.first
        );

        for bad in ["", "main~1", "a:b", "refs/heads/*", "-x", "a b"] {
            let err = cache.fetch(bad, &opts()).unwrap_err();
            assert!(
                matches!(err, GitError::BadReference { .. }),
                "{bad}: {err:?}"
            );
        }

        let err = cache.resolve("nope").unwrap_err().to_string();
        assert!(err.contains("`nope`"), "{err}");
    }

    #[test]
    fn unreachable_remotes_error_without_panicking() {
        let tmp = tempfile::tempdir().unwrap();
        let url = "file:///nonexistent/homelab.git";
        let cache = GitCache::open_or_init(&tmp.path().join("c1"), url).unwrap();
        let err = cache.fetch("main", &opts()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, GitError::Fetch { .. }), "{err:?}");
        assert!(msg.contains(url) && msg.contains("`main`"), "{msg}");

        // Nothing listens on this port.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}/o/r.git");
        let cache = GitCache::open_or_init(&tmp.path().join("c2"), &url).unwrap();
        let err = cache.fetch("main", &opts()).unwrap_err();
        assert!(err.to_string().contains(&url), "{err}");
    }

    /// ssh:// and scp-like URLs go through gix's ssh transport; a stand-in `ssh` runs the
    /// remote command locally (as sshd would), so no sshd is needed.
    #[test]
    fn fetch_over_ssh_transport() {
        let fx = fixture();
        let fake_ssh = fx.tmp.path().join("fake-ssh");
        // `-G host` (gix's check that this is OpenSSH), then [options] user@host git-upload-pack '/path'.
        fs::write(
            &fake_ssh,
            "#!/bin/sh\n[ \"$1\" = -G ] && exit 0\nwhile [ $# -gt 0 ]; do case \"$1\" in -o) shift 2;; -*) shift;; *) break;; esac; done\necho \"$1\" >> \"$0.log\"\nshift\nexec sh -c \"$*\"\n",
        )
        .unwrap();
        fs::set_permissions(&fake_ssh, fs::Permissions::from_mode(0o755)).unwrap();
        for (i, url) in [
            format!("ssh://git@lab.example{}", fx.work.display()),
            format!("git@lab.example:{}", fx.work.display()),
        ]
        .into_iter()
        .enumerate()
        {
            assert!(matches!(parse_location(&url), RepoLocation::Remote(_)));
            let cache = GitCache::open_or_init(&fx.tmp.path().join(format!("c{i}")), &url)
                .unwrap()
                .with_ssh_command(fake_ssh.display().to_string());
            let id = cache.fetch("main", &opts()).unwrap();
            assert_eq!(id.to_string(), fx.second, "{url}");
        }
        let log = fs::read_to_string(fx.tmp.path().join("fake-ssh.log")).unwrap();
        assert_eq!(log, "git@lab.example\ngit@lab.example\n");

        // The real ssh, to a closed port: an error naming ssh, no prompt, no hang.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("ssh://git@127.0.0.1:{port}/o/r.git");
        let cache = GitCache::open_or_init(&fx.tmp.path().join("real"), &url).unwrap();
        let err = cache.fetch("main", &opts()).unwrap_err().to_string();
        assert!(err.contains(&url) && err.contains("ssh"), "{err}");
    }

    #[test]
    fn a_hanging_server_hits_the_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts and never answers.
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                held.push(stream);
            }
        });
        let tmp = tempfile::tempdir().unwrap();
        let url = format!("http://127.0.0.1:{port}/o/r.git");
        let cache = GitCache::open_or_init(&tmp.path().join("c"), &url).unwrap();
        // The server never answers: the fetch ends by its own bound (a
        // fetch without one would never return).
        let err = cache
            .fetch(
                "main",
                &GitOptions {
                    token_file: None,
                    timeout: Duration::from_millis(1500),
                },
            )
            .unwrap_err();
        assert!(matches!(err, GitError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("1s 500ms"), "{err}");
    }

    #[test]
    fn cache_refuses_another_url_and_passwords_in_urls() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("c");
        GitCache::open_or_init(&path, "https://h/o/a.git").unwrap();
        let err = GitCache::open_or_init(&path, "https://h/o/b.git").unwrap_err();
        assert!(matches!(err, GitError::CacheMismatch { .. }), "{err:?}");

        let err = GitCache::open_or_init(&tmp.path().join("d"), "https://u:hunter2@h/o/r.git")
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("hunter2") && err.contains("token file"),
            "{err}"
        );
    }

    #[test]
    fn local_repository_at_any_revision() {
        let fx = fixture();
        let head = CommitSource::open(&fx.work, "HEAD").unwrap();
        assert_eq!(head.revision(), fx.second);
        assert_eq!(
            read_str(&head, "hosts/lab.yaml").as_deref(),
            Some("name: lab # v2\n")
        );
        let old = CommitSource::open(&fx.work, "HEAD~1").unwrap();
        assert_eq!(old.revision(), fx.first);
        assert_eq!(
            read_str(&old, "hosts/lab.yaml").as_deref(),
            Some("name: lab # v1\n")
        );
        assert_eq!(
            CommitSource::open(&fx.work, &fx.first[..7])
                .unwrap()
                .commit_id()
                .to_string(),
            fx.first
        );
        assert!(old.describe().ends_with(&format!("@{}", &fx.first[..7])));

        // Uncommitted edits are not seen.
        write(&fx.work, "hosts/lab.yaml", "dirty\n");
        let head = CommitSource::open(&fx.work, "HEAD").unwrap();
        assert_eq!(
            read_str(&head, "hosts/lab.yaml").as_deref(),
            Some("name: lab # v2\n")
        );

        // Bare repositories too.
        let bare = fx.tmp.path().join("bare.git");
        let out = git_server::git()
            .args(["clone", "-q", "--bare"])
            .arg(&fx.work)
            .arg(&bare)
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(
            CommitSource::open(&bare, "main~1").unwrap().revision(),
            fx.first
        );

        let err = CommitSource::open(&fx.work, "nope").unwrap_err();
        assert!(matches!(err, GitError::RevNotFound { .. }), "{err:?}");
        let err = CommitSource::open(&fx.work, "HEAD:hosts")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a commit"), "{err}");
        let plain = fx.tmp.path().join("plain");
        fs::create_dir_all(&plain).unwrap();
        let err = CommitSource::open(&plain, "HEAD").unwrap_err();
        assert!(matches!(err, GitError::NotARepository { .. }), "{err:?}");
        assert!(err.to_string().contains("without --rev"), "{err}");
    }

    #[test]
    fn commit_source_is_send_sync_and_reads_in_parallel() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CommitSource>();
        assert_send_sync::<GitCache>();
        let fx = fixture();
        let src = Arc::new(CommitSource::open(&fx.work, "HEAD").unwrap());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let src = src.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        assert!(src.read("hosts/lab.yaml").unwrap().is_some());
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn token_file_must_be_private() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("token");
        fs::write(&path, "s3cr3t-t0ken\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_token(&path).unwrap_err();
        assert!(
            matches!(err, GitError::TokenFilePermissions { mode: 0o644, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("chmod 600") && !msg.contains("s3cr3t"),
            "{msg}"
        );

        // fetch refuses it before any network traffic.
        let cache =
            GitCache::open_or_init(&tmp.path().join("c"), "https://h.invalid/o/r.git").unwrap();
        let err = cache
            .fetch(
                "main",
                &GitOptions {
                    token_file: Some(path.clone()),
                    timeout: Duration::from_secs(5),
                },
            )
            .unwrap_err();
        assert!(
            matches!(err, GitError::TokenFilePermissions { .. }),
            "{err:?}"
        );

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&path).unwrap(), "s3cr3t-t0ken");
        fs::write(&path, "\n").unwrap();
        assert!(read_token(&path).unwrap_err().to_string().contains("empty"));
        assert!(matches!(
            read_token(&tmp.path().join("missing")),
            Err(GitError::TokenFile { .. })
        ));
    }

    #[test]
    fn token_policy() {
        use gix::bstr::ByteSlice;
        for (url, ok) in [
            ("https://forgejo.example.com/o/r.git", true),
            ("http://127.0.0.1:3000/o/r.git", true),
            ("http://localhost/o/r.git", true),
            ("http://[::1]:8080/o/r.git", true),
            ("http://forgejo.lan/o/r.git", false),
            ("http://192.168.1.2/o/r.git", false),
        ] {
            assert_eq!(token_allowed(url.as_bytes().as_bstr()), ok, "{url}");
        }
    }

    /// Real smart HTTP with basic auth: lighttpd + git-http-backend from the tests crate.
    #[test]
    fn fetch_over_smart_http_with_a_token() {
        let server = GitServer::start();
        server.create_repo("eblume", "homelab");
        let tmp = tempfile::tempdir().unwrap();
        let clone = WorkClone::clone_from(&server, "eblume", "homelab", &tmp.path().join("work"));
        clone.write("hosts/lab.yaml", "name: lab\n");
        let pushed = clone.commit("first");
        clone.push("main");

        let url = server.url("eblume", "homelab");
        let token_file = server.write_token_file(&tmp.path().join("secrets"));
        let cache = GitCache::open_or_init(&tmp.path().join("cache"), &url).unwrap();

        // Without a token: refused, with what to do.
        let err = cache.fetch("main", &opts()).unwrap_err().to_string();
        assert!(
            err.contains("HTTP 401") && err.contains("--token-file"),
            "{err}"
        );

        // A wrong token: refused, and the token is not in the message.
        let wrong = tmp.path().join("wrong");
        fs::write(&wrong, "0000wrong0000\n").unwrap();
        fs::set_permissions(&wrong, fs::Permissions::from_mode(0o600)).unwrap();
        let err = cache
            .fetch(
                "main",
                &GitOptions {
                    token_file: Some(wrong),
                    timeout: Duration::from_secs(30),
                },
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refused the token") && !err.contains("0000wrong0000"),
            "{err}"
        );

        let with_token = GitOptions {
            token_file: Some(token_file),
            timeout: Duration::from_secs(30),
        };
        let id = cache.fetch("main", &with_token).unwrap();
        assert_eq!(id.to_string(), pushed);
        assert_eq!(
            read_str(&cache.source(id).unwrap(), "hosts/lab.yaml").as_deref(),
            Some("name: lab\n")
        );

        // The user name comes from the URL when it names one (this server knows only its own).
        let other_user = url.replacen("http://", "http://someone-else@", 1);
        let cache2 = GitCache::open_or_init(&tmp.path().join("cache2"), &other_user).unwrap();
        let err = cache2.fetch("main", &with_token).unwrap_err().to_string();
        assert!(err.contains("user `someone-else`"), "{err}");

        clone.write("hosts/lab.yaml", "name: lab 2\n");
        let next = clone.commit("second");
        clone.push("main");
        assert_eq!(cache.fetch("main", &with_token).unwrap().to_string(), next);
        assert!(!server.token().is_empty());
    }
}
