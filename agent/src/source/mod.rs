//! Sources of desired state: where `hosts/`, `modules/` and `k8s/` are read.
//!
//! A source answers "what bytes are at this repo-relative path" and names the
//! revision it read. Everything after `source` reads through this trait, so
//! the git source (read straight from a commit's tree) and a local directory
//! are interchangeable.

pub mod git;
pub mod verify;

pub use git::{parse_location, CommitSource, GitCache, GitError, GitOptions, RepoLocation};
pub use verify::{verify_commit, AllowedSigners, Verified, VerifyError};

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

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

/// A directory on disk (a checkout, possibly with uncommitted edits).
///
/// Its revision is `local-<hash>`: a digest of every file read, so two plans
/// of the same content name the same revision.
pub struct LocalDir {
    root: PathBuf,
    read: Mutex<BTreeMap<String, blake3::Hash>>,
}

impl LocalDir {
    pub fn open(root: &Path) -> Result<LocalDir, SourceError> {
        if !root.is_dir() {
            return Err(SourceError::NotFound(root.to_path_buf()));
        }
        Ok(LocalDir {
            root: root.to_path_buf(),
            read: Mutex::new(BTreeMap::new()),
        })
    }

    fn resolve(&self, path: &str) -> Result<PathBuf, SourceError> {
        let rel = Path::new(path);
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(SourceError::BadPath(path.to_string()));
        }
        Ok(self.root.join(rel))
    }
}

impl Source for LocalDir {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let full = self.resolve(path)?;
        match std::fs::read(&full) {
            Ok(bytes) => {
                self.read
                    .lock()
                    .unwrap()
                    .insert(path.to_string(), blake3::hash(&bytes));
                Ok(Some(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => Ok(None),
            Err(source) => Err(SourceError::Read {
                path: path.to_string(),
                source,
            }),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, SourceError> {
        let full = self.resolve(dir)?;
        let entries = match std::fs::read_dir(&full) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(SourceError::Read {
                    path: dir.to_string(),
                    source,
                })
            }
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names)
    }

    fn revision(&self) -> String {
        let mut h = blake3::Hasher::new();
        for (path, hash) in self.read.lock().unwrap().iter() {
            h.update(path.as_bytes());
            h.update(b"\0");
            h.update(hash.as_bytes());
        }
        format!("local-{}", &h.finalize().to_hex()[..12])
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}
