//! The first two stages, source and desired, for the CLI and the daemon
//! (everything after them is `run::run`).
//!
//! `resolve` picks the source (fetching a remote into the cache in the state
//! directory, or reading a local directory / a local repository's commit),
//! verifies the commit's signature when configured, and loads the catalog.
//! Each failure names its stage (`fetch`, `signature`, `validate`), so the
//! daemon can stay on the last good revision and say why.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::OnePasswordConfig;
use crate::desired::catalog::Catalog;
use crate::desired::model::DriftPolicy;
use crate::desired::{self, DesiredError};
use crate::secrets::cache::ConnectSource;
use crate::secrets::connect::{ConnectClient, ConnectConfig};
use crate::secrets::resolve::{Offline, SecretError, SecretSource};
use crate::source::git::{self, CommitSource, GitCache, GitOptions, RepoLocation};
use crate::source::verify::AllowedSigners;
use crate::source::{LocalDir, Source};

/// Where the desired state comes from and how to read it.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    /// `--repo` / config `repo`.
    pub repo: String,
    /// Branch, tag or commit to follow (remote sources).
    pub reference: String,
    /// `--rev`: plan or apply this revision instead of the followed ref.
    pub rev: Option<String>,
    pub token_file: Option<PathBuf>,
    pub allowed_signers: Option<PathBuf>,
    /// Fetch before resolving (remote sources). `false` reads the cache only.
    pub fetch: bool,
    pub fetch_timeout: Duration,
}

/// A stage failure: what the daemon records as a refused revision.
///
/// Fetch and signature messages are built with [`StageError::fetch`] and
/// [`StageError::signature`], which hide URL credentials: they quote the
/// repository URL (and gix's own errors may quote it again).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{0}")]
    Fetch(String),
    #[error("{0}")]
    Signature(String),
    #[error(transparent)]
    Validate(#[from] DesiredError),
    /// The source has no `hosts/` folder: the wrong directory (the agent run
    /// outside the repository), or a repository of something else.
    #[error("this is not a homelab repository: {repo} has no hosts/ folder\n  pass --repo with the directory (or URL) of your homelab repository, the one holding hosts/, modules/ and k8s/")]
    NotARepository { repo: String },
}

impl StageError {
    pub fn stage(&self) -> &'static str {
        match self {
            StageError::Fetch(_) => "fetch",
            StageError::Signature(_) => "signature",
            StageError::Validate(_) | StageError::NotARepository { .. } => "validate",
        }
    }

    /// A fetch failure, URL credentials hidden.
    pub fn fetch(e: impl std::fmt::Display) -> StageError {
        StageError::Fetch(crate::redact::url_credentials_owned(&e.to_string()))
    }

    /// A signature failure, URL credentials hidden.
    pub fn signature(e: impl std::fmt::Display) -> StageError {
        StageError::Signature(crate::redact::url_credentials_owned(&e.to_string()))
    }
}

/// A revision ready to load: the source and, for remote sources, the cache
/// (so a fallback to the last good revision can be read without fetching).
pub struct Resolved {
    pub source: Arc<dyn Source>,
    /// The commit fetched for the followed ref, when a fetch happened.
    pub fetched: Option<String>,
    pub cache: Option<PathBuf>,
}

pub use git::cache_dir;

/// Picks and opens the source. Remote: fetch (if asked), resolve `rev` or
/// the followed ref, verify the signature. Local directory: read from disk,
/// or with `rev`, from that commit of the local repository.
pub fn resolve(spec: &SourceSpec, state_dir: &Path) -> Result<Resolved, StageError> {
    match git::parse_location(&spec.repo) {
        RepoLocation::Local(dir) => {
            let source: Arc<dyn Source> = match &spec.rev {
                None => Arc::new(LocalDir::open(&dir).map_err(StageError::fetch)?),
                Some(rev) => {
                    let commit = CommitSource::open(&dir, rev).map_err(StageError::fetch)?;
                    verify(spec, &commit)?;
                    Arc::new(commit)
                }
            };
            Ok(Resolved {
                source,
                fetched: None,
                cache: None,
            })
        }
        RepoLocation::Remote(url) => {
            git::install_tls_provider();
            let dir = cache_dir(state_dir, &url);
            let cache = GitCache::open_or_init(&dir, &url).map_err(StageError::fetch)?;
            let opts = GitOptions {
                token_file: spec.token_file.clone(),
                timeout: spec.fetch_timeout,
            };
            let fetched = if spec.fetch {
                Some(
                    cache
                        .fetch(&spec.reference, &opts)
                        .map_err(StageError::fetch)?,
                )
            } else {
                None
            };
            let rev = match (&spec.rev, fetched) {
                (Some(rev), _) => {
                    // An older commit is not in a shallow cache: fetch it by id.
                    if cache.resolve(rev).is_err() && spec.fetch {
                        cache.fetch(rev, &opts).map_err(StageError::fetch)?;
                    }
                    rev.clone()
                }
                (None, Some(id)) => id.to_string(),
                (None, None) => spec.reference.clone(),
            };
            let commit = CommitSource::open(&dir, &rev).map_err(StageError::fetch)?;
            verify(spec, &commit)?;
            Ok(Resolved {
                source: Arc::new(commit),
                fetched: fetched.map(|id| id.to_string()),
                cache: Some(dir),
            })
        }
    }
}

/// Opens one commit of a cache (the daemon's fallback to the last good revision).
pub fn open_commit(cache: &Path, rev: &str) -> Result<Arc<dyn Source>, StageError> {
    Ok(Arc::new(
        CommitSource::open(cache, rev).map_err(StageError::fetch)?,
    ))
}

fn verify(spec: &SourceSpec, commit: &CommitSource) -> Result<(), StageError> {
    let Some(path) = &spec.allowed_signers else {
        return Ok(());
    };
    let signers = AllowedSigners::load(path).map_err(StageError::signature)?;
    crate::source::verify::verify_source(commit, &signers)
        .map(|_| ())
        .map_err(StageError::signature)
}

/// Where this run's secrets come from: Connect (with a fresh per-run cache)
/// when configured, else nothing (resources that need secrets are skipped).
/// A client that cannot even be built (unreadable token file) makes every
/// reference fail with that reason, so the rest of the host still converges.
pub fn secret_source(config: Option<&OnePasswordConfig>) -> Arc<dyn SecretSource> {
    let Some(op) = config else {
        return Arc::new(Offline);
    };
    git::install_tls_provider();
    match ConnectClient::new(&ConnectConfig::new(
        op.connect_url.clone(),
        op.token_file.clone(),
    )) {
        Ok(client) => Arc::new(ConnectSource::new(client)),
        Err(e) => Arc::new(Failing(e.to_string())),
    }
}

struct Failing(String);

impl SecretSource for Failing {
    fn resolve(
        &self,
        _reference: &crate::secrets::Reference,
    ) -> Result<crate::secrets::SecretValue, SecretError> {
        Err(SecretError::Unavailable(self.0.clone()))
    }
}

/// Refuses a source without a `hosts/` folder: "no host `x`" would send
/// the operator looking for a host file when the directory is wrong.
pub fn check_repository(source: &dyn Source) -> Result<(), StageError> {
    if source
        .list("")
        .map_err(DesiredError::from)?
        .iter()
        .any(|name| name == "hosts")
    {
        return Ok(());
    }
    let repo = match source.describe() {
        here if here == "." => "the current directory".to_string(),
        there => crate::redact::url_credentials_owned(&there),
    };
    Err(StageError::NotARepository { repo })
}

/// Loads the catalog of `host` from a resolved source. `state_dir` is the
/// agent's state directory as a managed path ([`managed_state_dir`]).
pub fn load(
    source: Arc<dyn Source>,
    host: &str,
    policy: DriftPolicy,
    secrets: Arc<dyn SecretSource>,
    state_dir: Option<PathBuf>,
) -> Result<Catalog, StageError> {
    let opts = desired::LoadOptions {
        default_policy: policy,
        secrets,
        state_dir,
    };
    match desired::load_with(source.clone(), host, &opts) {
        // No host file: say so only after checking that this is a homelab
        // repository at all.
        Err(e @ DesiredError::UnknownHost { .. }) => {
            check_repository(&*source)?;
            Err(e.into())
        }
        loaded => Ok(loaded?),
    }
}

/// A secret source that remembers every value it hands out during one run,
/// so that an error of that run can be scrubbed of them before it is
/// printed, logged, recorded in state or served (`/api/status`, `/readyz`).
///
/// The template layer keeps values out of its messages; this is the second
/// line at the boundary: whatever path a value takes into an error text
/// (a filter's message, an include name, a tool's output), the text that
/// leaves the agent does not carry it, nor its JSON-, Debug- or
/// URL-encoded form.
pub struct Scrubber {
    inner: Arc<dyn SecretSource>,
    seen: std::sync::Mutex<Vec<crate::secrets::SecretValue>>,
}

/// Values shorter than this are not scrubbed: replacing two letters
/// everywhere in a message would garble it, and such a value is no secret.
const MIN_SCRUBBED_LEN: usize = 4;

impl Scrubber {
    pub fn new(inner: Arc<dyn SecretSource>) -> Arc<Scrubber> {
        Arc::new(Scrubber {
            inner,
            seen: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// `text` with every value resolved so far, in its common encodings,
    /// replaced by `[redacted]`; URL credentials hidden too.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = crate::redact::url_credentials_owned(text);
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for value in seen.iter() {
            let v = value.expose();
            if v.len() < MIN_SCRUBBED_LEN {
                continue;
            }
            let json = serde_json::to_string(v).unwrap_or_default();
            let debug = format!("{v:?}");
            let unquote = |q: &str| {
                q.strip_prefix('"')
                    .and_then(|q| q.strip_suffix('"'))
                    .unwrap_or(q)
                    .to_string()
            };
            for form in [
                v.to_string(),
                unquote(&json),
                unquote(&debug),
                percent_encode(v),
            ] {
                if !form.is_empty() && out.contains(&form) {
                    out = out.replace(&form, crate::secrets::REDACTED);
                }
            }
        }
        out
    }
}

impl SecretSource for Scrubber {
    fn resolve(
        &self,
        reference: &crate::secrets::Reference,
    ) -> Result<crate::secrets::SecretValue, SecretError> {
        let value = self.inner.resolve(reference)?;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.contains(&value) {
            seen.push(value.clone());
        }
        Ok(value)
    }
}

/// RFC 3986 percent-encoding of everything but the unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The state directory as the desired state names paths: with a sandbox
/// `root`, relative to it (`None` when it lies outside the sandbox, where no
/// managed path reaches); lexical, since a root is compared lexically too.
pub fn managed_state_dir(root: Option<&Path>, state_dir: &Path) -> Option<PathBuf> {
    let abs = crate::fsops::normalize(&std::path::absolute(state_dir).ok()?)?;
    match root {
        None => Some(abs),
        Some(root) => abs
            .strip_prefix(root)
            .ok()
            .map(|rest| Path::new("/").join(rest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::{Reference, SecretValue};

    struct Fixed;

    impl SecretSource for Fixed {
        fn resolve(&self, _reference: &Reference) -> Result<SecretValue, SecretError> {
            Ok(SecretValue::new("p@ss/w0rd \"x\""))
        }
    }

    #[test]
    fn a_scrubber_hides_the_values_it_handed_out_in_any_encoding() {
        let s = Scrubber::new(Arc::new(Fixed));
        let text = r#"raw p@ss/w0rd "x", json p@ss/w0rd \"x\", url p%40ss%2Fw0rd%20%22x%22 at https://u:tok@h/r"#;
        assert_eq!(
            s.scrub(text),
            text.replace("u:tok@", "u:***@"),
            "nothing resolved yet"
        );
        s.resolve(&Reference::parse("op://v/i/f").unwrap()).unwrap();
        assert_eq!(
            s.scrub(text),
            "raw [redacted], json [redacted], url [redacted] at https://u:***@h/r"
        );
    }

    #[test]
    fn stage_errors_hide_url_credentials() {
        let e = StageError::fetch("cannot fetch from https://ann:tok@git.lan/r.git: 401");
        assert_eq!(
            e.to_string(),
            "cannot fetch from https://ann:***@git.lan/r.git: 401"
        );
    }

    #[test]
    fn the_state_directory_in_managed_path_terms() {
        let sandbox = Path::new("/tmp/lab");
        assert_eq!(
            managed_state_dir(Some(sandbox), Path::new("/tmp/lab/var/lib/homelab-agent")),
            Some(PathBuf::from("/var/lib/homelab-agent"))
        );
        assert_eq!(
            managed_state_dir(Some(sandbox), Path::new("/srv/state")),
            None,
            "outside the sandbox no managed path reaches it"
        );
        assert_eq!(
            managed_state_dir(None, Path::new("/var/lib/./hla/../homelab-agent")),
            Some(PathBuf::from("/var/lib/homelab-agent"))
        );
    }
}
