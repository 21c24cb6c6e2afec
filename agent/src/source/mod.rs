//! Sources of desired state: where `hosts/`, `modules/` and `k8s/` are read.
//!
//! A source answers "what bytes are at this repo-relative path" and names the
//! revision it read. Everything after `source` reads through this trait, so
//! the git source (read straight from a commit's tree) and a local directory
//! are interchangeable, and both refuse the same things ([`Refusal`]): a
//! symlink anywhere in a path, anything but regular files and directories,
//! a file over [`MAX_FILE_BYTES`], reads over [`MAX_TOTAL_BYTES`]. Nothing
//! outside the repository can be read through a source.

pub mod git;
mod local;
pub mod verify;

pub use git::{parse_location, CommitSource, GitCache, GitError, GitOptions, RepoLocation};
pub use local::LocalDir;
pub use verify::{verify_commit, AllowedSigners, Verified, VerifyError};

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The most one repository file may hold. Desired state is text (YAML,
/// templates, small verbatim files); a larger file is refused, not read, so
/// a hostile repository cannot make the agent hold gigabytes.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The most one revision may read in total (every file of every module,
/// template and manifest one host uses), for the same reason.
pub const MAX_TOTAL_BYTES: u64 = 32 * 1024 * 1024;

/// Why a path of the repository is refused rather than read. The same rules
/// hold for every source, so a repository behaves the same as a checkout
/// (`LocalDir`) and as a commit (`CommitSource`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `at` (the path itself or one of its parent directories) is a
    /// symlink. A commit stores a symlink as a link, not as the file it
    /// points to, and the agent never follows one: no repository file can
    /// name a file outside the repository.
    Symlink { at: String },
    /// Not a regular file or directory: a FIFO (reading would block), a
    /// socket or a device.
    Special { kind: &'static str },
    /// Bigger than [`MAX_FILE_BYTES`].
    TooLarge { limit: u64 },
    /// Reading it would take the revision over [`MAX_TOTAL_BYTES`].
    OverBudget { limit: u64 },
}

impl Refusal {
    /// What is wrong with `path`, in a sentence.
    pub fn message(&self, path: &str) -> String {
        match self {
            Refusal::Symlink { at } if at == path => format!(
                "{path} is a symlink in the repository; the agent reads no symlinks from a repository"
            ),
            Refusal::Symlink { at } => format!(
                "{path} is reached through {at}, a symlink in the repository; the agent reads no symlinks from a repository"
            ),
            Refusal::Special { kind } => format!(
                "{path} is a {kind}, not a regular file; the agent reads only regular files and directories from a repository"
            ),
            Refusal::TooLarge { limit } => format!(
                "{path} is larger than {} MiB, the limit for one repository file",
                limit / (1024 * 1024)
            ),
            Refusal::OverBudget { limit } => format!(
                "reading {path} takes this host's desired state over {} MiB, the limit for one revision",
                limit / (1024 * 1024)
            ),
        }
    }

    /// What to do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            Refusal::Symlink { .. } => "replace the symlink with the file or directory itself (a git commit would store only the link)",
            Refusal::Special { .. } => "replace it with a regular file",
            Refusal::TooLarge { .. } | Refusal::OverBudget { .. } => {
                "keep large files out of the desired-state repository; install them with a package or fetch them from a service"
            }
        }
    }
}

/// Errors reading the source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path} in the desired-state repository: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("repository {0} does not exist or is not a directory\n  pass --repo with the checkout of your homelab repository")]
    NotFound(PathBuf),
    #[error("`{0}` is not a plain repo-relative path")]
    BadPath(String),
    /// The repository holds something at `path` the agent does not read.
    #[error("{}\n  {}", why.message(path), why.hint())]
    Refused { path: String, why: Refusal },
}

impl SourceError {
    /// The refusal, when the repository itself is at fault (not the disk).
    pub fn refusal(&self) -> Option<(&str, &Refusal)> {
        match self {
            SourceError::Refused { path, why } => Some((path, why)),
            _ => None,
        }
    }
}

/// Bytes read by one revision, against [`MAX_TOTAL_BYTES`].
#[derive(Debug, Default)]
pub struct ReadBudget {
    used: AtomicU64,
}

impl ReadBudget {
    /// Counts `len` more bytes read for `path`; refuses past the limit.
    pub fn charge(&self, path: &str, len: u64) -> Result<(), SourceError> {
        let before = self.used.fetch_add(len, Ordering::Relaxed);
        if before.saturating_add(len) > MAX_TOTAL_BYTES {
            return Err(SourceError::Refused {
                path: path.to_string(),
                why: Refusal::OverBudget {
                    limit: MAX_TOTAL_BYTES,
                },
            });
        }
        Ok(())
    }
}

/// A file's size against [`MAX_FILE_BYTES`].
pub fn check_size(path: &str, len: u64) -> Result<(), SourceError> {
    if len > MAX_FILE_BYTES {
        return Err(SourceError::Refused {
            path: path.to_string(),
            why: Refusal::TooLarge {
                limit: MAX_FILE_BYTES,
            },
        });
    }
    Ok(())
}

/// The components of a repo-relative path; `..`, `.`, absolute paths and
/// empty components are refused ([`SourceError::BadPath`]).
pub fn components(path: &str) -> Result<Vec<&str>, SourceError> {
    let rel = Path::new(path);
    if path.starts_with('/')
        || path.contains('\0')
        || rel.components().any(|c| !matches!(c, Component::Normal(_)))
        || path.split('/').any(|c| c == "." || c == "..")
    {
        return Err(SourceError::BadPath(path.to_string()));
    }
    Ok(path.split('/').filter(|c| !c.is_empty()).collect())
}

/// A revision of the desired state.
pub trait Source: Send + Sync {
    /// Bytes at a repo-relative path (`hosts/indri.yaml`), `None` if absent.
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, SourceError>;
    /// File and directory names directly under a repo-relative directory.
    fn list(&self, dir: &str) -> Result<Vec<String>, SourceError>;
    /// The revision read so far (stable once loading is done).
    fn revision(&self) -> String;
    /// For messages: where this source is.
    fn describe(&self) -> String;
}

/// Reads a regular file of at most `limit` bytes as UTF-8 text. A FIFO,
/// device or directory is refused without blocking on it (opened
/// non-blocking, checked before reading), and a larger file is refused
/// after reading `limit + 1` bytes, whatever it claims to be.
pub fn read_limited(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "the file is over the limit of {} bytes",
                crate::syntax::yaml::thousands(usize::try_from(limit).unwrap_or(usize::MAX))
            ),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}
