//! The agent's durable local state.
//!
//! This crate owns everything the agent remembers between runs, per host:
//! the applied revision, the *inventory* (every resource the agent manages,
//! with the digest of its desired spec as last applied and whether the agent
//! created it or adopted something that already existed), and the last
//! [`MAX_RUNS`] run records. It also owns the single-instance [`Lock`].
//!
//! It knows nothing about resources, YAML or plans: records are plain data.
//!
//! # Guarantees
//! - Every change goes through one redb write transaction ([`Store::write`]):
//!   a crash leaves either the old or the new state, never a mix.
//! - Readers ([`Store::open_read_only`]) never modify the file, so a dry run
//!   leaves the state byte-for-byte unchanged.
//! - Secret values are never handed to this crate; digests are computed by the
//!   caller.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use redb::{Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// How many run records are kept per host; older ones are dropped on commit.
pub const MAX_RUNS: usize = 100;

const DB_FILE: &str = "state.redb";
const KEY_FILE: &str = "digest.key";
const LOCK_FILE: &str = "lock";

/// host -> JSON [`HostRecord`]
const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
/// (host, resource id) -> JSON [`InventoryEntry`]
const INVENTORY: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("inventory");
/// (host, sequence) -> JSON [`RunRecord`]
const RUNS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("runs");

/// Errors of the state store. Each names the state directory involved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("another agent holds the lock on state directory {dir}: {holder}\n  wait for it to finish, or stop it (a stale lock is released when its process exits)")]
    Locked { dir: PathBuf, holder: String },
    #[error("cannot create state directory {dir}: {source}\n  pass --state-dir with a writable directory")]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use lock file {path}: {source}")]
    LockIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state database {path} needs recovery after an agent was stopped mid-run\n  run `agent apply` (or `agent plan`), which recovers it while holding the lock")]
    NeedsRecovery { path: PathBuf },
    #[error("state database {path} cannot be opened: {source}\n  if it is corrupt, move it aside; the next apply adopts what is on disk")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    #[error("state database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("state database {path} holds a record that does not parse ({what}): {source}")]
    Corrupt {
        path: PathBuf,
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Who put a resource into the inventory: decides what pruning may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The object did not exist; the agent created it. Pruning deletes it.
    Created,
    /// The object existed before the agent first managed it. Pruning only
    /// forgets it and leaves it in place.
    Adopted,
}

/// One managed resource as the agent last left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryEntry {
    pub kind: String,
    /// The module (or stack) instance that declared it.
    pub module: String,
    /// Digest of the desired spec as applied. `None` marks an apply that was
    /// started but not confirmed (written before touching the host, so a crash
    /// mid-apply still leaves the resource owned by the agent).
    pub digest: Option<String>,
    pub origin: Origin,
    /// The desired state as applied held secret values: the live object may
    /// still hold them, so plans never show its current content.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held_secrets: bool,
    /// The (keyed) digest of a desired state that was applied, made the
    /// service it notifies fail to start, and was rolled back. Held: not
    /// retried until the desired state changes again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<String>,
}

/// Per-host revision bookkeeping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostRecord {
    /// Revision of the desired state last applied to the host's resources
    /// with nothing failed (resources skipped for an unresolved secret or a
    /// held change do not count against it: see [`RunResult::Skipped`]).
    pub applied_revision: Option<String>,
    /// Unix seconds of that apply.
    pub applied_at: Option<u64>,
    /// Unix seconds of the last run in which nothing failed, on any target
    /// (host or stack): result [`RunResult::Success`] or
    /// [`RunResult::Skipped`]. Records written before it read as `None`
    /// (readers fall back to `applied_at`).
    pub last_success_at: Option<u64>,
    /// Newest revision fetched from the source.
    pub fetched_revision: Option<String>,
    /// Newest revision that fetched, verified and validated; what the agent
    /// falls back to when a newer one is refused.
    pub last_good_revision: Option<String>,
    /// Set by `agent apply --rev` to the fetched revision at that moment: the
    /// daemon keeps the pinned revision until a newer one is fetched.
    pub manual_override: Option<String>,
    /// Why the newest revision was refused, if it was.
    pub refused: Option<Refused>,
}

/// A revision the agent would not apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// `fetch`, `signature` or `validate` (or `plan` / `apply` for a
    /// revision that panicked there).
    pub stage: String,
    pub revision: Option<String>,
    /// What went wrong. Never holds a secret value or a URL credential:
    /// the daemon scrubs it before it is recorded.
    pub error: String,
    /// Unix seconds.
    pub at: u64,
    /// Why, as a type (records written before it read as `Invalid`).
    #[serde(default)]
    pub cause: RefusalCause,
}

/// Why a revision was refused: decides whether the daemon tries it again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCause {
    /// Its content is wrong (fetch, signature, validation): checked again on
    /// every run, which is cheap and notices a fix on the server side.
    #[default]
    Invalid,
    /// A stage panicked on it.
    Panicked,
    /// Rendering it took longer than the run's time budget.
    TimedOut,
    /// The agent died while rendering it (a crash or a kill): the next
    /// process found the marker left behind.
    Crashed,
}

impl RefusalCause {
    /// The lower-case name, as in JSON (`invalid`, `panicked`, ...).
    pub fn name(self) -> &'static str {
        match self {
            RefusalCause::Invalid => "invalid",
            RefusalCause::Panicked => "panicked",
            RefusalCause::TimedOut => "timed_out",
            RefusalCause::Crashed => "crashed",
        }
    }

    /// Trying the revision again would crash, hang or panic again: the
    /// daemon does not, until a newer revision is fetched (or the config is
    /// reloaded), not even after a restart.
    pub fn is_sticky(self) -> bool {
        !matches!(self, RefusalCause::Invalid)
    }
}

/// Counts of one run, by classification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunCounts {
    pub created: u32,
    pub changed: u32,
    pub drift_healed: u32,
    pub drift_reported: u32,
    pub pruned: u32,
    pub failed: u32,
    pub unchanged: u32,
    /// Not applied because a secret did not resolve (or a dependency was skipped).
    pub skipped: u32,
}

/// Outcome of one run. Applied, skipped and failed are distinct: a run
/// that only skipped resources is not a failed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunResult {
    /// Every target converged: nothing failed, nothing skipped.
    Success,
    /// Nothing failed, but some resources were skipped (a secret did not
    /// resolve, a change is held after a rollback, or a resource after one
    /// of those); everything else converged.
    Skipped,
    /// Some resources (or stacks) failed; others were applied.
    Partial,
    /// Something failed and nothing was applied.
    Failed,
}

impl RunResult {
    /// Something failed (`Partial`, `Failed`): the run is not a success,
    /// for readiness, the last-success metric and the exit code.
    pub fn failed(self) -> bool {
        matches!(self, RunResult::Partial | RunResult::Failed)
    }

    /// The lower-case name (`success`, `skipped`, `partial`, `failed`), as
    /// in the JSON of a record and the `result` label of the metrics.
    pub fn name(self) -> &'static str {
        match self {
            RunResult::Success => "success",
            RunResult::Skipped => "skipped",
            RunResult::Partial => "partial",
            RunResult::Failed => "failed",
        }
    }
}

impl std::fmt::Display for RunResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One run of `apply` (or of the daemon's reconcile loop).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Unix milliseconds.
    pub started_ms: u64,
    pub finished_ms: u64,
    /// What started the run: `cli`, `poll`, `webhook`, `watch`, ...
    pub trigger: String,
    pub revision: String,
    pub counts: RunCounts,
    pub result: RunResult,
    /// First error message, if any (never holds secret values).
    pub error: Option<String>,
    /// The `--target` selectors of a limited run (`agent apply --target`);
    /// empty for a whole run. A limited run moves no applied revision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
}

/// The file (in the state directory) recording that applying is suspended.
pub const SUSPEND_FILE: &str = "suspended.json";

/// Largest suspension record read (it is a few hundred bytes).
const SUSPEND_FILE_LIMIT: u64 = 64 * 1024;

/// `agent suspend`: applying is paused for the agent of this state
/// directory (the daemon still fetches, plans and reports drift; `agent
/// apply` refuses) until `agent resume`.
///
/// Kept apart from the database, as Puppet keeps `agent_disabled.lock`:
/// one small record replaced atomically (write, fsync, rename), so it can
/// be set while a run holds the database open, and read by anyone allowed
/// into the state directory without opening the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    /// The host whose agent was suspended.
    pub host: String,
    /// Unix seconds.
    pub since: u64,
    /// Who asked (a user name, or `uid N`).
    pub by: String,
    /// Why, as given to `agent suspend --reason` (may be empty).
    #[serde(default)]
    pub reason: String,
}

impl Suspension {
    /// The suspension recorded in `dir`, if any. A record that cannot be
    /// read or parsed counts as a suspension (fail closed: someone meant to
    /// pause applying), with the problem as its reason.
    pub fn read(dir: &Path) -> Option<Suspension> {
        let path = dir.join(SUSPEND_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => return Some(Suspension::unreadable(&path, &e.to_string())),
        };
        let mut bytes = Vec::new();
        if let Err(e) = file.take(SUSPEND_FILE_LIMIT + 1).read_to_end(&mut bytes) {
            return Some(Suspension::unreadable(&path, &e.to_string()));
        }
        if bytes.len() as u64 > SUSPEND_FILE_LIMIT {
            return Some(Suspension::unreadable(
                &path,
                &format!("larger than {SUSPEND_FILE_LIMIT} bytes"),
            ));
        }
        match serde_json::from_slice(&bytes) {
            Ok(s) => Some(s),
            Err(e) => Some(Suspension::unreadable(&path, &e.to_string())),
        }
    }

    fn unreadable(path: &Path, why: &str) -> Suspension {
        Suspension {
            host: String::new(),
            since: 0,
            by: "unknown".to_string(),
            reason: format!(
                "the suspension record {} cannot be read ({why}); `agent resume` removes it",
                path.display()
            ),
        }
    }

    /// Records `self` in `dir` atomically (mode 0600), replacing any
    /// earlier suspension.
    pub fn write(&self, dir: &Path) -> Result<(), StateError> {
        create_dir(dir)?;
        let path = dir.join(SUSPEND_FILE);
        let io = |source| StateError::LockIo {
            path: path.clone(),
            source,
        };
        write_private(dir, SUSPEND_FILE, &to_json(self)).map_err(io)
    }

    /// Removes the suspension of `dir`; the one removed, if there was one.
    pub fn clear(dir: &Path) -> Result<Option<Suspension>, StateError> {
        let was = Suspension::read(dir);
        let path = dir.join(SUSPEND_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::LockIo { path, source }),
        }
        sync_dir(dir).map_err(|source| StateError::LockIo {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(was)
    }
}

/// Writes `dir/name` (mode 0600) atomically and durably: a temporary file
/// beside it (a stale one left by a killed process is replaced), fsync,
/// rename over, fsync of the directory.
fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Makes a rename or removal in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The single-instance lock on a state directory.
///
/// Held for the whole of an `apply` (or the daemon's life). The file records
/// who holds it, so a second agent can say so; it is emptied on release so a
/// run that changed nothing leaves the state directory's bytes unchanged.
#[derive(Debug)]
pub struct Lock {
    file: Option<Flock<File>>,
    path: PathBuf,
    /// Directories this lock created (deepest first), removed again on
    /// release when nothing else was written into them.
    created: Vec<PathBuf>,
}

impl Lock {
    /// Takes the lock without waiting. `holder` describes this process
    /// (e.g. `agent apply`); the pid is added.
    pub fn acquire(dir: &Path, holder: &str) -> Result<Lock, StateError> {
        let created: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
            .map(Path::to_path_buf)
            .collect();
        create_dir(dir)?;
        let path = dir.join(LOCK_FILE);
        let io = |source| StateError::LockIo {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, _errno)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(StateError::Locked {
                    dir: dir.to_path_buf(),
                    holder: if holder.is_empty() {
                        "a process that has not written its name yet".to_string()
                    } else {
                        holder.to_string()
                    },
                });
            }
        };
        locked.set_len(0).map_err(io)?;
        locked.rewind().map_err(io)?;
        write!(locked, "pid {} ({holder})", std::process::id()).map_err(io)?;
        Ok(Lock {
            file: Some(locked),
            path,
            created,
        })
    }
}

impl Drop for Lock {
    /// Empties the lock file; if this lock created the state directory and
    /// nothing else was written into it (a refused run), removes it again so
    /// a refused run leaves no trace.
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            let _ = file.set_len(0);
            drop(file);
        }
        let Some(dir) = self.created.first() else {
            return;
        };
        let only_lock = std::fs::read_dir(dir)
            .map(|entries| entries.flatten().all(|e| e.path() == self.path))
            .unwrap_or(false);
        if only_lock {
            let _ = std::fs::remove_file(&self.path);
            for d in &self.created {
                if std::fs::remove_dir(d).is_err() {
                    break;
                }
            }
        }
    }
}

fn create_dir(dir: &Path) -> Result<(), StateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StateError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })
}

/// The database is held open by another process only for the length of a
/// run's commit (the daemon opens it per run), so waiting briefly beats
/// failing: retry for up to 10 s.
fn retry_while_busy<T>(
    mut open: impl FnMut() -> Result<T, redb::DatabaseError>,
) -> Result<T, redb::DatabaseError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match open() {
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// The per-host key of the inventory's digests: digests are keyed hashes
/// (BLAKE3 keyed mode, a MAC) so a low-entropy secret in a file cannot be
/// brute-forced from the state file.
#[derive(Clone, PartialEq, Eq)]
pub struct DigestKey([u8; 32]);

impl std::fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DigestKey([redacted])")
    }
}

impl DigestKey {
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Reads the key of `dir`; with `create`, makes one (32 random bytes,
    /// mode 0600, written atomically) if there is none. Without `create` and
    /// without a key (nothing was ever applied), returns a throwaway key.
    pub fn load(dir: &Path, create: bool) -> Result<DigestKey, StateError> {
        let path = dir.join(KEY_FILE);
        let io = |source| StateError::LockIo {
            path: path.clone(),
            source,
        };
        match std::fs::read(&path) {
            Ok(bytes) if bytes.len() == 32 => {
                let mut key = [0u8; 32];
                key.copy_from_slice(&bytes);
                return Ok(DigestKey(key));
            }
            Ok(_) | Err(_) if !create => return Ok(DigestKey(random_key().map_err(io)?)),
            _ => {}
        }
        create_dir(dir)?;
        let key = random_key().map_err(io)?;
        write_private(dir, KEY_FILE, &key).map_err(io)?;
        Ok(DigestKey(key))
    }
}

fn random_key() -> std::io::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    File::open("/dev/urandom")?.read_exact(&mut key)?;
    Ok(key)
}

enum Db {
    ReadWrite(Database),
    ReadOnly(ReadOnlyDatabase),
    /// No database file yet: reads see an empty state.
    Empty,
}

/// The state database of one state directory.
pub struct Store {
    path: PathBuf,
    db: Db,
}

impl Store {
    /// Opens (creating if needed) the database for reading and writing.
    /// Callers hold the [`Lock`] first.
    pub fn open(dir: &Path) -> Result<Store, StateError> {
        create_dir(dir)?;
        let path = dir.join(DB_FILE);
        let db = retry_while_busy(|| Database::create(&path)).map_err(|e| StateError::Open {
            path: path.clone(),
            source: Box::new(e),
        })?;
        Ok(Store {
            path,
            db: Db::ReadWrite(db),
        })
    }

    /// Opens the database for reading only; a missing database reads as empty
    /// and nothing is created.
    pub fn open_read_only(dir: &Path) -> Result<Store, StateError> {
        let path = dir.join(DB_FILE);
        if !path.exists() {
            return Ok(Store {
                path,
                db: Db::Empty,
            });
        }
        let db = retry_while_busy(|| ReadOnlyDatabase::open(&path)).map_err(|e| match e {
            // A writer was killed with the database open: only a read-write
            // open (under the lock) may repair it.
            redb::DatabaseError::RepairAborted => StateError::NeedsRecovery { path: path.clone() },
            e => StateError::Open {
                path: path.clone(),
                source: Box::new(e),
            },
        })?;
        Ok(Store {
            path,
            db: Db::ReadOnly(db),
        })
    }

    /// Opens for reading; if a killed writer left the database needing
    /// recovery, repairs it first with a read-write open. Callers must hold
    /// the [`Lock`] (recovery writes).
    pub fn open_read_only_recovering(dir: &Path) -> Result<Store, StateError> {
        match Store::open_read_only(dir) {
            Err(StateError::NeedsRecovery { .. }) => {
                drop(Store::open(dir)?);
                Store::open_read_only(dir)
            }
            other => other,
        }
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    fn parse<T: for<'de> Deserialize<'de>>(
        &self,
        bytes: &[u8],
        what: &str,
    ) -> Result<T, StateError> {
        serde_json::from_slice(bytes).map_err(|source| StateError::Corrupt {
            path: self.path.clone(),
            what: what.to_string(),
            source,
        })
    }

    fn read_txn(&self) -> Result<Option<redb::ReadTransaction>, StateError> {
        let txn = match &self.db {
            Db::ReadWrite(db) => db.begin_read(),
            Db::ReadOnly(db) => db.begin_read(),
            Db::Empty => return Ok(None),
        };
        txn.map(Some).map_err(|e| self.db_err(e))
    }

    /// Revision bookkeeping of `host` (default when never applied).
    pub fn host(&self, host: &str) -> Result<HostRecord, StateError> {
        let Some(txn) = self.read_txn()? else {
            return Ok(HostRecord::default());
        };
        let table = match txn.open_table(HOSTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(HostRecord::default()),
            Err(e) => return Err(self.db_err(e)),
        };
        match table.get(host).map_err(|e| self.db_err(e))? {
            Some(v) => self.parse(v.value(), &format!("host {host}")),
            None => Ok(HostRecord::default()),
        }
    }

    /// The whole inventory of `host`, keyed by resource id.
    pub fn inventory(&self, host: &str) -> Result<BTreeMap<String, InventoryEntry>, StateError> {
        let mut out = BTreeMap::new();
        let Some(txn) = self.read_txn()? else {
            return Ok(out);
        };
        let table = match txn.open_table(INVENTORY) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(out),
            Err(e) => return Err(self.db_err(e)),
        };
        let range = table.range((host, "")..).map_err(|e| self.db_err(e))?;
        for item in range {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            let (h, id) = k.value();
            if h != host {
                break;
            }
            out.insert(
                id.to_string(),
                self.parse(v.value(), &format!("inventory {id}"))?,
            );
        }
        Ok(out)
    }

    /// The most recent run records of `host`, newest first.
    pub fn runs(&self, host: &str, limit: usize) -> Result<Vec<RunRecord>, StateError> {
        let mut out = Vec::new();
        let Some(txn) = self.read_txn()? else {
            return Ok(out);
        };
        let table = match txn.open_table(RUNS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(out),
            Err(e) => return Err(self.db_err(e)),
        };
        let range = table
            .range((host, 0)..=(host, u64::MAX))
            .map_err(|e| self.db_err(e))?;
        for item in range.rev().take(limit) {
            let (_, v) = item.map_err(|e| self.db_err(e))?;
            out.push(self.parse(v.value(), "run record")?);
        }
        Ok(out)
    }

    /// Runs `f` inside one write transaction and commits it durably.
    /// Nothing `f` did is visible unless it returns `Ok` and the commit succeeds.
    pub fn write<T>(
        &self,
        host: &str,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let Db::ReadWrite(db) = &self.db else {
            panic!("Store::write on a read-only store is a programming error");
        };
        let txn = db.begin_write().map_err(|e| self.db_err(e))?;
        let out = {
            let mut writer = Writer {
                store: self,
                host: host.to_string(),
                hosts: txn.open_table(HOSTS).map_err(|e| self.db_err(e))?,
                inventory: txn.open_table(INVENTORY).map_err(|e| self.db_err(e))?,
                runs: txn.open_table(RUNS).map_err(|e| self.db_err(e))?,
            };
            let out = f(&mut writer)?;
            writer.trim_runs()?;
            out
        };
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(out)
    }
}

/// Mutations of one host's state inside a write transaction.
pub struct Writer<'t> {
    store: &'t Store,
    host: String,
    hosts: redb::Table<'t, &'static str, &'static [u8]>,
    inventory: redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    runs: redb::Table<'t, (&'static str, u64), &'static [u8]>,
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("state records always serialize")
}

impl Writer<'_> {
    pub fn put_inventory(&mut self, id: &str, entry: &InventoryEntry) -> Result<(), StateError> {
        self.inventory
            .insert((self.host.as_str(), id), to_json(entry).as_slice())
            .map_err(|e| self.store.db_err(e))?;
        Ok(())
    }

    pub fn remove_inventory(&mut self, id: &str) -> Result<(), StateError> {
        self.inventory
            .remove((self.host.as_str(), id))
            .map_err(|e| self.store.db_err(e))?;
        Ok(())
    }

    /// The host record as this transaction sees it.
    pub fn host(&self) -> Result<HostRecord, StateError> {
        match self
            .hosts
            .get(self.host.as_str())
            .map_err(|e| self.store.db_err(e))?
        {
            Some(v) => self.store.parse(v.value(), &format!("host {}", self.host)),
            None => Ok(HostRecord::default()),
        }
    }

    /// Reads, changes and writes back the host record.
    pub fn update_host(&mut self, f: impl FnOnce(&mut HostRecord)) -> Result<(), StateError> {
        let mut record = self.host()?;
        f(&mut record);
        self.set_host(&record)
    }

    pub fn set_host(&mut self, record: &HostRecord) -> Result<(), StateError> {
        self.hosts
            .insert(self.host.as_str(), to_json(record).as_slice())
            .map_err(|e| self.store.db_err(e))?;
        Ok(())
    }

    pub fn add_run(&mut self, record: &RunRecord) -> Result<(), StateError> {
        let next = self
            .runs
            .range((self.host.as_str(), 0)..=(self.host.as_str(), u64::MAX))
            .map_err(|e| self.store.db_err(e))?
            .next_back()
            .transpose()
            .map_err(|e| self.store.db_err(e))?
            .map_or(0, |(k, _)| k.value().1 + 1);
        self.runs
            .insert((self.host.as_str(), next), to_json(record).as_slice())
            .map_err(|e| self.store.db_err(e))?;
        Ok(())
    }

    /// Changes the newest run record of the host, if there is one: a phase
    /// that runs after the record was written (the Kubernetes stacks) adds
    /// what it did to the same run.
    pub fn update_last_run(&mut self, f: impl FnOnce(&mut RunRecord)) -> Result<bool, StateError> {
        let last = self
            .runs
            .range((self.host.as_str(), 0)..=(self.host.as_str(), u64::MAX))
            .map_err(|e| self.store.db_err(e))?
            .next_back()
            .transpose()
            .map_err(|e| self.store.db_err(e))?
            .map(|(k, v)| (k.value().1, v.value().to_vec()));
        let Some((seq, bytes)) = last else {
            return Ok(false);
        };
        let mut record: RunRecord = self.store.parse(&bytes, "run record")?;
        f(&mut record);
        self.runs
            .insert((self.host.as_str(), seq), to_json(&record).as_slice())
            .map_err(|e| self.store.db_err(e))?;
        Ok(true)
    }

    /// Changes the run record that started at `started_ms` (the newest of
    /// them), if it is still kept: the stacks of a run add what they did to
    /// that run, even when runs recorded while they waited (the daemon
    /// heals native drift during a stack's rollout) came after it.
    pub fn update_run(
        &mut self,
        started_ms: u64,
        f: impl FnOnce(&mut RunRecord),
    ) -> Result<bool, StateError> {
        let mut found = None;
        for item in self
            .runs
            .range((self.host.as_str(), 0)..=(self.host.as_str(), u64::MAX))
            .map_err(|e| self.store.db_err(e))?
            .rev()
        {
            let (k, v) = item.map_err(|e| self.store.db_err(e))?;
            let record: RunRecord = self.store.parse(v.value(), "run record")?;
            if record.started_ms == started_ms {
                found = Some((k.value().1, record));
                break;
            }
        }
        let Some((seq, mut record)) = found else {
            return Ok(false);
        };
        f(&mut record);
        self.runs
            .insert((self.host.as_str(), seq), to_json(&record).as_slice())
            .map_err(|e| self.store.db_err(e))?;
        Ok(true)
    }

    fn trim_runs(&mut self) -> Result<(), StateError> {
        let host = self.host.as_str();
        let keys: Vec<u64> = self
            .runs
            .range((host, 0)..=(host, u64::MAX))
            .map_err(|e| self.store.db_err(e))?
            .map(|item| item.map(|(k, _)| k.value().1))
            .collect::<Result<_, _>>()
            .map_err(|e| self.store.db_err(e))?;
        if keys.len() > MAX_RUNS {
            for seq in &keys[..keys.len() - MAX_RUNS] {
                self.runs
                    .remove((host, *seq))
                    .map_err(|e| self.store.db_err(e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_suspension_round_trips_and_a_broken_record_still_suspends() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Suspension::read(dir.path()), None);
        let s = Suspension {
            host: "indri".into(),
            since: 1_700_000_000,
            by: "alice".into(),
            reason: "disk swap".into(),
        };
        s.write(dir.path()).unwrap();
        assert_eq!(Suspension::read(dir.path()), Some(s.clone()));
        let mode = std::fs::metadata(dir.path().join(SUSPEND_FILE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert_eq!(Suspension::clear(dir.path()).unwrap(), Some(s));
        assert_eq!(Suspension::read(dir.path()), None);
        assert_eq!(Suspension::clear(dir.path()).unwrap(), None);
        // Fail closed: a record that does not parse (or is too large) suspends.
        std::fs::write(dir.path().join(SUSPEND_FILE), b"{not json").unwrap();
        let broken = Suspension::read(dir.path()).expect("suspended");
        assert!(broken.reason.contains("cannot be read"), "{broken:?}");
        std::fs::write(dir.path().join(SUSPEND_FILE), vec![b' '; 70 * 1024]).unwrap();
        let big = Suspension::read(dir.path()).expect("suspended");
        assert!(big.reason.contains("larger than"), "{big:?}");
        assert!(Suspension::clear(dir.path()).unwrap().is_some());
        assert_eq!(Suspension::read(dir.path()), None);
    }

    use super::*;

    fn entry(digest: &str) -> InventoryEntry {
        InventoryEntry {
            kind: "file".into(),
            module: "zot".into(),
            digest: Some(digest.into()),
            origin: Origin::Created,
            held_secrets: false,
            rolled_back: None,
        }
    }

    fn run(n: u64) -> RunRecord {
        RunRecord {
            started_ms: n,
            finished_ms: n + 1,
            trigger: "cli".into(),
            revision: format!("rev{n}"),
            counts: RunCounts::default(),
            result: RunResult::Success,
            error: None,
            targets: Vec::new(),
        }
    }

    /// Records written by older versions (no `last_success_at`, the three
    /// old results) still read; the new result round-trips by its name.
    #[test]
    fn old_records_read_and_the_skipped_result_round_trips() {
        let host: HostRecord =
            serde_json::from_str(r#"{"applied_revision":"abc","applied_at":5}"#).unwrap();
        assert_eq!(host.applied_at, Some(5));
        assert_eq!(host.last_success_at, None);
        let old = r#"{"started_ms":1,"finished_ms":2,"trigger":"poll","revision":"r","counts":{"created":1},"result":"partial","error":null}"#;
        let record: RunRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.result, RunResult::Partial);
        assert!(record.result.failed());
        let mut skipped = run(3);
        skipped.result = RunResult::Skipped;
        let json = serde_json::to_string(&skipped).unwrap();
        assert!(json.contains(r#""result":"skipped""#), "{json}");
        assert_eq!(serde_json::from_str::<RunRecord>(&json).unwrap(), skipped);
        assert!(!RunResult::Skipped.failed() && !RunResult::Success.failed());
        // A whole run writes no `targets`; a limited one's round-trip.
        assert!(!json.contains("targets"), "{json}");
        assert!(record.targets.is_empty());
        let mut limited = run(4);
        limited.targets = vec!["module:zot".into()];
        let json = serde_json::to_string(&limited).unwrap();
        assert_eq!(serde_json::from_str::<RunRecord>(&json).unwrap(), limited);
    }

    #[test]
    fn the_digest_key_is_private_stable_and_random() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = DigestKey::load(dir.path(), true).unwrap();
        let b = DigestKey::load(dir.path(), false).unwrap();
        assert_eq!(a, b);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(DigestKey::load(other.path(), true).unwrap(), a);
        assert_eq!(format!("{a:?}"), "DigestKey([redacted])");
    }

    #[test]
    fn inventory_is_per_host_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .write("indri", |w| {
                w.put_inventory("file:/a", &entry("1"))?;
                w.put_inventory("file:/b", &entry("2"))
            })
            .unwrap();
        store
            .write("sifaka", |w| w.put_inventory("file:/c", &entry("3")))
            .unwrap();
        let inv = store.inventory("indri").unwrap();
        assert_eq!(inv.keys().collect::<Vec<_>>(), ["file:/a", "file:/b"]);
        assert_eq!(inv["file:/b"], entry("2"));
        store
            .write("indri", |w| w.remove_inventory("file:/a"))
            .unwrap();
        assert_eq!(store.inventory("indri").unwrap().len(), 1);
        assert_eq!(store.inventory("sifaka").unwrap().len(), 1);
    }

    #[test]
    fn failed_write_closure_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let err = store.write("indri", |w| {
            w.put_inventory("file:/a", &entry("1"))?;
            Err::<(), _>(StateError::Locked {
                dir: dir.path().into(),
                holder: "test".into(),
            })
        });
        assert!(err.is_err());
        assert!(store.inventory("indri").unwrap().is_empty());
    }

    #[test]
    fn keeps_only_the_last_hundred_runs_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for n in 0..130 {
            store.write("indri", |w| w.add_run(&run(n))).unwrap();
        }
        let runs = store.runs("indri", 1000).unwrap();
        assert_eq!(runs.len(), MAX_RUNS);
        assert_eq!(runs[0].revision, "rev129");
        assert_eq!(runs[MAX_RUNS - 1].revision, "rev30");
    }

    #[test]
    fn the_last_run_can_be_amended_and_only_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(!store.write("indri", |w| w.update_last_run(|_| {})).unwrap());
        for n in 0..3 {
            store.write("indri", |w| w.add_run(&run(n))).unwrap();
        }
        let amended = store
            .write("indri", |w| w.update_last_run(|r| r.counts.failed = 4))
            .unwrap();
        assert!(amended);
        let runs = store.runs("indri", 10).unwrap();
        assert_eq!(runs.len(), 3);
        assert_eq!(
            (runs[0].revision.as_str(), runs[0].counts.failed),
            ("rev2", 4)
        );
        assert_eq!(runs[1].counts.failed, 0);
    }

    #[test]
    fn read_only_store_of_missing_dir_is_empty_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("state");
        let store = Store::open_read_only(&sub).unwrap();
        assert!(store.inventory("indri").unwrap().is_empty());
        assert_eq!(store.host("indri").unwrap(), HostRecord::default());
        assert!(!sub.exists());
    }

    #[test]
    fn a_lock_that_created_the_state_dir_removes_it_when_nothing_was_written() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("var/lib/agent");
        drop(Lock::acquire(&dir, "agent apply").unwrap());
        assert!(
            !tmp.path().join("var").exists(),
            "refused run leaves no trace"
        );
        let lock = Lock::acquire(&dir, "agent apply").unwrap();
        drop(Store::open(&dir).unwrap());
        drop(lock);
        assert!(dir.join(DB_FILE).exists());
        assert_eq!(std::fs::read(dir.join(LOCK_FILE)).unwrap(), b"");
    }

    #[test]
    fn second_lock_names_the_holder_and_released_lock_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let first = Lock::acquire(dir.path(), "agent apply").unwrap();
        let err = Lock::acquire(dir.path(), "agent apply").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("agent apply"), "{msg}");
        drop(first);
        assert_eq!(std::fs::read(dir.path().join(LOCK_FILE)).unwrap(), b"");
        let _again = Lock::acquire(dir.path(), "agent apply").unwrap();
    }
}
