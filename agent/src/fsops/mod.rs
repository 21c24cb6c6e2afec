//! Safe, atomic filesystem operations on the managed host.
//!
//! Owns: resolving managed paths under the host root (`/`, or the sandbox of
//! `--root`) without ever following a symlink, atomic file replacement, and
//! durability. Leaves to callers: what to write and whether to.
//!
//! # Guarantees
//! - Every path is walked component by component with `openat(O_NOFOLLOW)`
//!   from the root directory; a symlink anywhere in a parent path is an error
//!   ([`FsError::SymlinkInPath`]), never followed.
//! - A file is replaced by writing a temp file in the same directory, created
//!   `O_EXCL` with permissions no wider than the final mode, owned and
//!   `chmod`ed to its final owner and mode *before the first byte is written*,
//!   then renamed over the target. Readers see the old or the new content,
//!   never a mix.
//! - Durability is batched: [`Fs::stage_file`] writes temp files, then
//!   [`Fs::commit`] makes their data durable with one `syncfs` per filesystem
//!   (Linux; `fsync` per file elsewhere) before renaming, and [`Fs::sync`]
//!   makes the renames durable. This keeps a 1,000-file apply to a few syncs
//!   instead of 2,000.
//! - Temp files are named `.<name>.hla-tmp.<pid>.<id>.<tag>` (`id`: a
//!   random number of the [`Fs`] instance, then a counter), where `tag`
//!   is a MAC (keyed BLAKE3, 64 bits) of the rest of the name under a key
//!   derived from the state directory's key ([`Fs::set_temp_key`]). One left
//!   by a crash is removed the next time the agent writes into that
//!   directory, but only when it is proven the agent's own leftover: the tag
//!   verifies (no other process, other state directory or look-alike name
//!   has it), the pid in the name is not this process and is no longer
//!   running (a live run's file is never touched), and it is a regular file
//!   or a symlink (what the agent stages). Anything else is left alone.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{fchown, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

/// Filesystem errors, each naming the host path involved.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path} is a symlink; the agent never writes through symlinks in a parent path\n  replace the symlink with a real directory, or manage the path the link points to")]
    SymlinkInPath { path: PathBuf },
    #[error("{path} is not a directory, but a managed path goes through it")]
    NotADirectory { path: PathBuf },
    #[error("{op} {path}: {errno}")]
    Io {
        op: &'static str,
        path: PathBuf,
        errno: Errno,
    },
}

fn io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(Errno) -> FsError + 'p {
    move |errno| FsError::Io {
        op,
        path: path.to_path_buf(),
        errno,
    }
}

/// What `lstat` says about a path (never following a final symlink).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: FileKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    Other,
}

impl FileKind {
    pub fn name(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Directory => "directory",
            FileKind::Symlink => "symlink",
            FileKind::Other => "special file",
        }
    }
}

impl From<FileStat> for Meta {
    // mode_t is u32 on Linux and u16 on macOS: the conversion is not useless everywhere.
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    fn from(st: FileStat) -> Meta {
        let fmt = SFlag::from_bits_truncate(st.st_mode as _) & SFlag::S_IFMT;
        let kind = if fmt == SFlag::S_IFREG {
            FileKind::File
        } else if fmt == SFlag::S_IFDIR {
            FileKind::Directory
        } else if fmt == SFlag::S_IFLNK {
            FileKind::Symlink
        } else {
            FileKind::Other
        };
        Meta {
            kind,
            mode: u32::from(st.st_mode) & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
        }
    }
}

/// Metadata of a path, and its content when it is a regular file.
pub type FileRead = (Meta, Option<Vec<u8>>);

/// Ownership and permissions to give a file or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// A temp file written and waiting for [`Fs::commit`].
#[derive(Debug)]
pub struct Staged {
    dir: Arc<OwnedFd>,
    tmp: OsString,
    name: OsString,
    path: PathBuf,
}

/// The managed host's filesystem, rooted at `/` or at a sandbox.
pub struct Fs {
    root: PathBuf,
    root_fd: Arc<OwnedFd>,
    /// Opened directories (host-relative path -> fd), so 1,000 files in 20
    /// directories cost 20 path walks, not 1,000.
    dirs: Mutex<HashMap<PathBuf, Arc<OwnedFd>>>,
    cleaned: Mutex<HashSet<PathBuf>>,
    /// Filesystems written to since the last [`Fs::sync`] (by device).
    dirty: Mutex<HashMap<u64, Arc<OwnedFd>>>,
    counter: AtomicU64,
    /// Signs temp-file names (see the module docs); random until
    /// [`Fs::set_temp_key`] gives the state directory's.
    temp_key: Mutex<[u8; 32]>,
    /// Random, names this instance's temp files apart from older ones.
    instance: u32,
}

const DIR_FLAGS: OFlag = OFlag::O_DIRECTORY
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_RDONLY);

impl Fs {
    /// Opens the root. `root` is `/` in production, a directory with `--root`.
    pub fn new(root: &Path) -> Result<Fs, FsError> {
        let fd = nix::fcntl::open(root, OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(io("open root", root))?;
        Ok(Fs {
            root: root.to_path_buf(),
            root_fd: Arc::new(fd),
            dirs: Mutex::new(HashMap::new()),
            cleaned: Mutex::new(HashSet::new()),
            dirty: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
            temp_key: Mutex::new(random_key()),
            instance: u32::from_le_bytes(random_key()[..4].try_into().expect("4 bytes")),
        })
    }

    /// Signs temp-file names with a key derived from `state_key` (the state
    /// directory's secret key), so the agent recognises the leftovers of its
    /// own earlier runs and nothing else. Without it, names are signed with
    /// a key of this process only: nothing of another process is removed.
    pub fn set_temp_key(&self, state_key: &[u8; 32]) {
        *self.temp_key.lock().unwrap_or_else(|e| e.into_inner()) =
            blake3::derive_key("homelab-agent 2026 temp-file names", state_key);
    }

    /// A new temp name beside `name`: `.<name>.hla-tmp.<pid>.<id>.<tag>`.
    fn temp_name(&self, name: &OsStr) -> OsString {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // Cut long names so the temp name stays within NAME_MAX (255).
        let name = &name.as_bytes()[..name.len().min(160)];
        let mut stem = Vec::with_capacity(name.len() + 40);
        stem.push(b'.');
        stem.extend_from_slice(name);
        // The counter starts with this instance's random id: a leftover of
        // an earlier process with the same pid (pids are reused, after a
        // reboot often) or of an earlier run of this one never has the
        // name of a file made now.
        let id = format!(".hla-tmp.{}.{:08x}{n:x}", std::process::id(), self.instance);
        stem.extend_from_slice(id.as_bytes());
        let tag = self.temp_tag(&stem);
        stem.push(b'.');
        stem.extend_from_slice(tag.as_bytes());
        OsString::from_vec(stem)
    }

    fn temp_tag(&self, stem: &[u8]) -> String {
        let key = *self.temp_key.lock().unwrap_or_else(|e| e.into_inner());
        blake3::keyed_hash(&key, stem).to_hex()[..16].to_string()
    }

    /// Whether `name` in `dir` is a leftover this agent may remove.
    fn is_own_leftover(&self, dir: &OwnedFd, name: &OsStr) -> bool {
        let Some(temp) = parse_temp_name(name.as_bytes()) else {
            return false;
        };
        if !constant_time_eq(self.temp_tag(temp.stem).as_bytes(), temp.tag) {
            return false;
        }
        if temp.pid == std::process::id() || pid_alive(temp.pid) {
            return false;
        }
        matches!(
            fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW).map(Meta::from),
            Ok(Meta {
                kind: FileKind::File | FileKind::Symlink,
                ..
            })
        )
    }

    /// Where a managed path really is (root-prefixed), for messages.
    pub fn host_path(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// Opens directory `dir` (absolute, normalised). `Ok(None)` when it or a
    /// parent does not exist.
    pub fn open_dir(&self, dir: &Path) -> Result<Option<Arc<OwnedFd>>, FsError> {
        if let Some(fd) = self.dirs.lock().unwrap().get(dir) {
            return Ok(Some(fd.clone()));
        }
        let parent_fd = match dir.parent() {
            None => return Ok(Some(self.root_fd.clone())),
            Some(parent) => match self.open_dir(parent)? {
                Some(fd) => fd,
                None => return Ok(None),
            },
        };
        let name = dir.file_name().expect("normalised absolute path");
        match openat(parent_fd.as_fd(), name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => {
                let fd = Arc::new(fd);
                self.dirs
                    .lock()
                    .unwrap()
                    .insert(dir.to_path_buf(), fd.clone());
                Ok(Some(fd))
            }
            Err(Errno::ENOENT) => Ok(None),
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                let meta = fstatat(parent_fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map(Meta::from)
                    .map_err(io("stat", dir))?;
                if meta.kind == FileKind::Symlink {
                    Err(FsError::SymlinkInPath {
                        path: dir.to_path_buf(),
                    })
                } else {
                    Err(FsError::NotADirectory {
                        path: dir.to_path_buf(),
                    })
                }
            }
            Err(e) => Err(io("open directory", dir)(e)),
        }
    }

    fn split<'p>(&self, path: &'p Path) -> (&'p Path, &'p OsStr) {
        (
            path.parent().unwrap_or(Path::new("/")),
            path.file_name().unwrap_or(OsStr::new(".")),
        )
    }

    /// `lstat` of a managed path; `None` when it does not exist.
    pub fn meta(&self, path: &Path) -> Result<Option<Meta>, FsError> {
        let (parent, name) = self.split(path);
        let Some(dir) = self.open_dir(parent)? else {
            return Ok(None);
        };
        match fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st.into())),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(io("stat", path)(e)),
        }
    }

    /// Reads a regular file. Returns its metadata, and its content when it
    /// is a regular file (a symlink is reported, not followed).
    pub fn read_file(&self, path: &Path) -> Result<Option<FileRead>, FsError> {
        let (parent, name) = self.split(path);
        let Some(dir) = self.open_dir(parent)? else {
            return Ok(None);
        };
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        match openat(dir.as_fd(), name, flags, Mode::empty()) {
            Ok(fd) => {
                let meta: Meta = fstat(&fd).map_err(io("stat", path))?.into();
                if meta.kind != FileKind::File {
                    return Ok(Some((meta, None)));
                }
                let mut file = std::fs::File::from(fd);
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut file, &mut buf).map_err(|e| FsError::Io {
                    op: "read",
                    path: path.to_path_buf(),
                    errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                })?;
                Ok(Some((meta, Some(buf))))
            }
            Err(Errno::ENOENT) => Ok(None),
            Err(Errno::ELOOP | Errno::ENXIO | Errno::EWOULDBLOCK) => {
                Ok(self.meta(path)?.map(|m| (m, None)))
            }
            Err(e) => Err(io("open", path)(e)),
        }
    }

    /// The target of a symlink, `None` when `path` is missing or not a link.
    pub fn read_link(&self, path: &Path) -> Result<Option<PathBuf>, FsError> {
        let (parent, name) = self.split(path);
        let Some(dir) = self.open_dir(parent)? else {
            return Ok(None);
        };
        match nix::fcntl::readlinkat(dir.as_fd(), name) {
            Ok(target) => Ok(Some(PathBuf::from(target))),
            Err(Errno::ENOENT | Errno::EINVAL) => Ok(None),
            Err(e) => Err(io("readlink", path)(e)),
        }
    }

    fn mark_dirty(&self, fd: &Arc<OwnedFd>, path: &Path) -> Result<(), FsError> {
        let dev = fstat(fd.as_fd()).map_err(io("stat", path))?.st_dev as u64;
        self.dirty
            .lock()
            .unwrap()
            .entry(dev)
            .or_insert_with(|| fd.clone());
        Ok(())
    }

    /// Creates `dir` and any missing parents (parents get 0755), then sets
    /// `attrs` on `dir` itself. An existing directory only gets `attrs`.
    pub fn create_dir_all(&self, dir: &Path, attrs: Attrs) -> Result<(), FsError> {
        let mut missing = Vec::new();
        let mut cur = dir;
        loop {
            if self.open_dir(cur)?.is_some() {
                break;
            }
            missing.push(cur);
            match cur.parent() {
                Some(p) => cur = p,
                None => break,
            }
        }
        for path in missing.into_iter().rev() {
            let (parent, name) = self.split(path);
            let parent_fd = self.open_dir(parent)?.ok_or_else(|| FsError::Io {
                op: "mkdir",
                path: path.to_path_buf(),
                errno: Errno::ENOENT,
            })?;
            let mode = if path == dir {
                attrs.mode & 0o700
            } else {
                0o755
            };
            match mkdirat(parent_fd.as_fd(), name, Mode::from_bits_truncate(mode as _)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(io("mkdir", path)(e)),
            }
            self.mark_dirty(&parent_fd, path)?;
            if path != dir {
                // mkdir's mode is cut by the umask; say exactly what we mean.
                let fd = self.open_dir(path)?.expect("just created");
                fchmod(fd.as_fd(), Mode::from_bits_truncate(0o755)).map_err(io("chmod", path))?;
            }
        }
        self.set_attrs(dir, attrs)
    }

    /// Sets owner then mode on an existing file or directory (not following
    /// a symlink at `path`).
    pub fn set_attrs(&self, path: &Path, attrs: Attrs) -> Result<(), FsError> {
        let (parent, name) = self.split(path);
        let dir = self.open_dir(parent)?.ok_or_else(|| FsError::Io {
            op: "open",
            path: path.to_path_buf(),
            errno: Errno::ENOENT,
        })?;
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        let fd = openat(dir.as_fd(), name, flags, Mode::empty()).map_err(io("open", path))?;
        apply_attrs(&fd, attrs, path)?;
        self.mark_dirty(&dir, path)
    }

    /// Removes stale temp files of earlier, crashed runs from `dir`, once per run.
    fn clean_stale_temps(&self, dir: &Path) {
        if !self.cleaned.lock().unwrap().insert(dir.to_path_buf()) {
            return;
        }
        let Ok(Some(fd)) = self.open_dir(dir) else {
            return;
        };
        // Listed through the walked descriptor: the directory the names
        // come from is the one they are removed from.
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let Ok(mut entries) = nix::dir::Dir::openat(fd.as_fd(), ".", flags, Mode::empty()) else {
            return;
        };
        let names: Vec<OsString> = entries
            .iter()
            .flatten()
            .map(|e| OsStr::from_bytes(e.file_name().to_bytes()).to_os_string())
            .filter(|name| name.as_bytes().windows(9).any(|w| w == b".hla-tmp."))
            .collect();
        for name in names {
            if self.is_own_leftover(&fd, &name) {
                let _ = unlinkat(fd.as_fd(), name.as_os_str(), UnlinkatFlags::NoRemoveDir);
            }
        }
    }

    /// Opens `dir` for writing into it: creates it (0755, with parents) when
    /// missing and removes stale temp files of crashed runs.
    fn prepare_dir(&self, dir: &Path) -> Result<Arc<OwnedFd>, FsError> {
        let fd = match self.open_dir(dir)? {
            Some(fd) => fd,
            None => {
                let attrs = Attrs {
                    mode: 0o755,
                    uid: None,
                    gid: None,
                };
                self.create_dir_all(dir, attrs)?;
                self.open_dir(dir)?.expect("just created")
            }
        };
        self.clean_stale_temps(dir);
        Ok(fd)
    }

    /// Writes `content` to a temp file beside `path`, already carrying its
    /// final owner and mode. Nothing is visible at `path` until [`Fs::commit`].
    pub fn stage_file(&self, path: &Path, content: &[u8], attrs: Attrs) -> Result<Staged, FsError> {
        let (parent, name) = self.split(path);
        let dir = self.prepare_dir(parent)?;
        let tmp = self.temp_name(name);
        // Created with at most the owner bits of the final mode; group/other
        // bits are only granted by the fchmod below, after fchown.
        let create_mode = Mode::from_bits_truncate((attrs.mode & 0o600) as _);
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd =
            openat(dir.as_fd(), tmp.as_os_str(), flags, create_mode).map_err(io("create", path))?;
        let staged = Staged {
            dir: dir.clone(),
            tmp,
            name: name.to_os_string(),
            path: path.to_path_buf(),
        };
        let result = (|| {
            apply_attrs(&fd, attrs, path)?;
            let mut file = std::fs::File::from(fd);
            file.write_all(content).map_err(|e| FsError::Io {
                op: "write",
                path: path.to_path_buf(),
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
            })?;
            if !cfg!(target_os = "linux") {
                file.sync_all().map_err(|e| FsError::Io {
                    op: "fsync",
                    path: path.to_path_buf(),
                    errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                })?;
            }
            self.mark_dirty(&dir, path)
        })();
        if let Err(e) = result {
            let _ = unlinkat(
                dir.as_fd(),
                staged.tmp.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            );
            return Err(e);
        }
        Ok(staged)
    }

    /// Where a staged temp file really is (root-prefixed), for a tool that
    /// checks it before [`Fs::commit`] (a file's `validate:` command).
    pub fn staged_path(&self, staged: &Staged) -> PathBuf {
        let (parent, _) = self.split(&staged.path);
        self.host_path(parent).join(&staged.tmp)
    }

    /// Removes a staged temp file instead of committing it; the target is
    /// left exactly as it was.
    pub fn discard(&self, staged: Staged) -> Result<(), FsError> {
        match unlinkat(
            staged.dir.as_fd(),
            staged.tmp.as_os_str(),
            UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(io("remove temp file of", &staged.path)(e)),
        }
    }

    /// Makes staged data durable, then renames each temp file over its
    /// target. Returns one result per staged file, in order.
    pub fn commit(&self, staged: Vec<Staged>) -> Vec<Result<(), FsError>> {
        if staged.is_empty() {
            return Vec::new();
        }
        if let Err(e) = self.sync() {
            return staged.iter().map(|_| Err(clone_err(&e))).collect();
        }
        let mut renamed_in: HashSet<*const OwnedFd> = HashSet::new();
        staged
            .into_iter()
            .map(|s| {
                let res = renameat(
                    s.dir.as_fd(),
                    s.tmp.as_os_str(),
                    s.dir.as_fd(),
                    s.name.as_os_str(),
                );
                if res.is_err() {
                    let _ = unlinkat(s.dir.as_fd(), s.tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
                }
                res.map_err(io("rename", &s.path))?;
                // The rename itself is made durable by the next `sync`.
                if renamed_in.insert(Arc::as_ptr(&s.dir)) {
                    self.mark_dirty(&s.dir, &s.path)?;
                }
                Ok(())
            })
            .collect()
    }

    /// Flushes everything written since the last sync: `syncfs` once per
    /// filesystem touched on Linux, `fsync` of each directory elsewhere.
    pub fn sync(&self) -> Result<(), FsError> {
        let dirty: Vec<Arc<OwnedFd>> = self
            .dirty
            .lock()
            .unwrap()
            .drain()
            .map(|(_, fd)| fd)
            .collect();
        for fd in dirty {
            #[cfg(target_os = "linux")]
            nix::unistd::syncfs(fd.as_fd()).map_err(io("syncfs", &self.root))?;
            #[cfg(not(target_os = "linux"))]
            nix::unistd::fsync(fd.as_fd()).map_err(io("fsync", &self.root))?;
        }
        Ok(())
    }

    /// Creates or replaces a symlink atomically (temp link + rename).
    pub fn symlink(&self, path: &Path, target: &Path) -> Result<(), FsError> {
        let (parent, name) = self.split(path);
        let dir = self.prepare_dir(parent)?;
        let tmp = self.temp_name(name);
        symlinkat(target, dir.as_fd(), tmp.as_os_str()).map_err(io("symlink", path))?;
        if let Err(e) = renameat(dir.as_fd(), tmp.as_os_str(), dir.as_fd(), name) {
            let _ = unlinkat(dir.as_fd(), tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
            return Err(io("rename", path)(e));
        }
        self.mark_dirty(&dir, path)
    }

    /// Removes a file or symlink. Missing is fine.
    pub fn remove_file(&self, path: &Path) -> Result<(), FsError> {
        let (parent, name) = self.split(path);
        let Some(dir) = self.open_dir(parent)? else {
            return Ok(());
        };
        match unlinkat(dir.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => self.mark_dirty(&dir, path),
            Err(e) => Err(io("remove", path)(e)),
        }
    }

    /// Removes an empty directory. `Ok(false)` when it is not empty (left in place).
    pub fn remove_empty_dir(&self, path: &Path) -> Result<bool, FsError> {
        let (parent, name) = self.split(path);
        let Some(dir) = self.open_dir(parent)? else {
            return Ok(true);
        };
        match unlinkat(dir.as_fd(), name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {
                self.dirs.lock().unwrap().remove(path);
                self.mark_dirty(&dir, path)?;
                Ok(true)
            }
            Err(Errno::ENOTEMPTY | Errno::EEXIST) => Ok(false),
            Err(e) => Err(io("remove directory", path)(e)),
        }
    }
}

fn apply_attrs(fd: &OwnedFd, attrs: Attrs, path: &Path) -> Result<(), FsError> {
    if attrs.uid.is_some() || attrs.gid.is_some() {
        fchown(
            fd.as_fd(),
            attrs.uid.map(Uid::from_raw),
            attrs.gid.map(Gid::from_raw),
        )
        .map_err(io("chown", path))?;
    }
    fchmod(fd.as_fd(), Mode::from_bits_truncate(attrs.mode as _)).map_err(io("chmod", path))
}

fn clone_err(e: &FsError) -> FsError {
    match e {
        FsError::SymlinkInPath { path } => FsError::SymlinkInPath { path: path.clone() },
        FsError::NotADirectory { path } => FsError::NotADirectory { path: path.clone() },
        FsError::Io { op, path, errno } => FsError::Io {
            op,
            path: path.clone(),
            errno: *errno,
        },
    }
}

/// The parts of a temp name `<stem>.<tag>`, where the stem is
/// `.<name>.hla-tmp.<pid>.<instance><n>` (hex).
struct TempName<'a> {
    stem: &'a [u8],
    pid: u32,
    tag: &'a [u8],
}

fn parse_temp_name(bytes: &[u8]) -> Option<TempName<'_>> {
    let dot = bytes.iter().rposition(|&b| b == b'.')?;
    let (stem, tag) = (&bytes[..dot], &bytes[dot + 1..]);
    if tag.len() != 16 || !tag.iter().all(|b| b.is_ascii_hexdigit()) || !stem.starts_with(b".") {
        return None;
    }
    let mut rest = stem.rsplitn(3, |&b| b == b'.');
    let n = rest.next()?;
    let pid = rest.next()?;
    let head = rest.next()?;
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    let hex = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_hexdigit);
    if !hex(n) || !digits(pid) || !head.ends_with(b".hla-tmp") {
        return None;
    }
    let pid = std::str::from_utf8(pid).ok()?.parse().ok()?;
    Some(TempName { stem, pid, tag })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a process with `pid` exists (signal 0). Not permitted to signal
/// it (another user's) still means it runs.
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return true;
    }
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(Errno::ESRCH)
    )
}

/// A key no other process knows (names of a run without a state key).
fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .is_err()
    {
        // Without /dev/urandom: unique to this process and moment, which is
        // all this key has to be (it only ever makes this process's names).
        let seed = format!("{}-{:?}", std::process::id(), std::time::SystemTime::now());
        key = *blake3::hash(seed.as_bytes()).as_bytes();
    }
    key
}

/// Lexically normalises an absolute path (`.` and `..` resolved, no
/// filesystem access). `None` when `path` is relative.
pub fn normalize(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for comp in path.components() {
        match comp {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(c) => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn attrs(mode: u32) -> Attrs {
        Attrs {
            mode,
            uid: None,
            gid: None,
        }
    }

    #[test]
    fn normalize_resolves_dots_and_rejects_relative() {
        assert_eq!(
            normalize(Path::new("/a/./b/../c")),
            Some(PathBuf::from("/a/c"))
        );
        assert_eq!(
            normalize(Path::new("/a/../../etc")),
            Some(PathBuf::from("/etc"))
        );
        assert_eq!(normalize(Path::new("a/b")), None);
    }

    #[test]
    fn staged_file_has_final_mode_before_any_byte_and_appears_on_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = Fs::new(tmp.path()).unwrap();
        let path = Path::new("/etc/app/secret.conf");
        let staged = fs.stage_file(path, b"hunter2\n", attrs(0o600)).unwrap();
        // Not visible yet, and the temp file is private.
        assert!(!tmp.path().join("etc/app/secret.conf").exists());
        let tmp_path = tmp.path().join("etc/app").join(&staged.tmp);
        assert_eq!(
            std::fs::metadata(&tmp_path).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        let results = fs.commit(vec![staged]);
        assert!(results.iter().all(Result::is_ok));
        let real = tmp.path().join("etc/app/secret.conf");
        assert_eq!(std::fs::read(&real).unwrap(), b"hunter2\n");
        assert_eq!(
            std::fs::metadata(&real).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        // Parents made on the way are 0755 whatever the umask.
        assert_eq!(
            std::fs::metadata(tmp.path().join("etc/app"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
    }

    #[test]
    fn staged_file_is_owned_by_its_final_owner_before_rename() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let fs = Fs::new(tmp.path()).unwrap();
        // As root (CI) hand it to `nobody`; otherwise to ourselves.
        let (uid, gid) = if nix::unistd::geteuid().is_root() {
            (65534, 65534)
        } else {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        };
        let attrs = Attrs {
            mode: 0o640,
            uid: Some(uid),
            gid: Some(gid),
        };
        let staged = fs.stage_file(Path::new("/app.conf"), b"x", attrs).unwrap();
        let meta = std::fs::metadata(tmp.path().join(&staged.tmp)).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (uid, gid, 0o640)
        );
        fs.commit(vec![staged]).into_iter().for_each(|r| r.unwrap());
        let meta = std::fs::metadata(tmp.path().join("app.conf")).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (uid, gid, 0o640)
        );
    }

    #[test]
    fn symlink_in_parent_path_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("etc/app")).unwrap();
        let fs = Fs::new(tmp.path()).unwrap();
        let err = fs
            .stage_file(Path::new("/etc/app/x.conf"), b"x", attrs(0o644))
            .unwrap_err();
        assert!(
            matches!(err, FsError::SymlinkInPath { ref path } if path == Path::new("/etc/app")),
            "{err}"
        );
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        let err = fs.read_file(Path::new("/etc/app/x.conf")).unwrap_err();
        assert!(matches!(err, FsError::SymlinkInPath { .. }));
    }

    #[test]
    fn final_symlink_is_reported_not_followed_and_replaced_by_rename() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("target"), b"precious").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("target"), tmp.path().join("link")).unwrap();
        let fs = Fs::new(tmp.path()).unwrap();
        let (meta, content) = fs.read_file(Path::new("/link")).unwrap().unwrap();
        assert_eq!(meta.kind, FileKind::Symlink);
        assert!(content.is_none());
        let staged = fs
            .stage_file(Path::new("/link"), b"new", attrs(0o644))
            .unwrap();
        fs.commit(vec![staged]).into_iter().for_each(|r| r.unwrap());
        assert_eq!(
            std::fs::read(tmp.path().join("target")).unwrap(),
            b"precious"
        );
        assert_eq!(std::fs::read(tmp.path().join("link")).unwrap(), b"new");
    }

    /// A pid no process has: a child that has been waited for.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    /// The name `fs` would give a temp file of `name` made by `pid`.
    fn signed(fs: &Fs, name: &str, pid: u32) -> String {
        let stem = format!(".{name}.hla-tmp.{pid}.0");
        format!("{stem}.{}", fs.temp_tag(stem.as_bytes()))
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_agents_own_leftovers_are_cleaned_on_next_write() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = Fs::new(tmp.path()).unwrap();
        fs.set_temp_key(&[7; 32]);
        let dead = dead_pid();
        std::fs::write(tmp.path().join(signed(&fs, "a", dead)), b"half").unwrap();
        std::os::unix::fs::symlink("/x", tmp.path().join(signed(&fs, "l", dead))).unwrap();
        let staged = fs
            .stage_file(Path::new("/a"), b"whole", attrs(0o644))
            .unwrap();
        fs.commit(vec![staged]).into_iter().for_each(|r| r.unwrap());
        assert_eq!(names(tmp.path()), ["a"]);
    }

    /// Issue 12: a file that merely looks like a temp file is never removed.
    #[test]
    fn look_alike_and_live_temp_files_are_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = Fs::new(tmp.path()).unwrap();
        fs.set_temp_key(&[7; 32]);
        let other_state = Fs::new(tmp.path()).unwrap();
        other_state.set_temp_key(&[8; 32]);
        let dead = dead_pid();
        let keep = [
            // The old unsigned format, or another program's file.
            format!(".a.hla-tmp.{dead}.0"),
            format!(".a.hla-tmp.{dead}.0.0123456789abcdef"),
            // Signed by an agent with another state directory.
            signed(&other_state, "a", dead),
            // Signed, but its process runs: a live run's file.
            signed(&fs, "a", std::os::unix::process::parent_id()),
            signed(&fs, "a", 1),
            // This very process's own (a batch not committed yet).
            signed(&fs, "a", std::process::id()),
            // Not a name the agent makes, whatever the tag.
            format!("a.hla-tmp.{dead}.0.0123456789abcdef"),
        ];
        for name in &keep {
            std::fs::write(tmp.path().join(name), b"someone's").unwrap();
        }
        // Right name and tag, but a directory: not something the agent stages.
        let dir = signed(&fs, "d", dead);
        std::fs::create_dir(tmp.path().join(&dir)).unwrap();
        let staged = fs
            .stage_file(Path::new("/a"), b"whole", attrs(0o644))
            .unwrap();
        fs.commit(vec![staged]).into_iter().for_each(|r| r.unwrap());
        let mut expected: Vec<String> = keep.to_vec();
        expected.push(dir);
        expected.push("a".into());
        expected.sort();
        assert_eq!(names(tmp.path()), expected);
        for name in &keep {
            assert_eq!(std::fs::read(tmp.path().join(name)).unwrap(), b"someone's");
        }
    }

    #[test]
    fn temp_names_are_signed_and_stay_within_name_max() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = Fs::new(tmp.path()).unwrap();
        let long = "n".repeat(255);
        let staged = fs
            .stage_file(&Path::new("/").join(&long), b"x", attrs(0o644))
            .unwrap();
        let tmp_name = staged.tmp.clone();
        assert!(tmp_name.len() <= 255, "{}", tmp_name.len());
        let parsed = parse_temp_name(tmp_name.as_bytes()).expect("parses back");
        assert_eq!(parsed.pid, std::process::id());
        assert_eq!(fs.temp_tag(parsed.stem).as_bytes(), parsed.tag);
        fs.commit(vec![staged]).into_iter().for_each(|r| r.unwrap());
        assert_eq!(names(tmp.path()), [long]);
    }

    #[test]
    fn a_discarded_staged_file_leaves_the_target_and_no_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a"), b"old").unwrap();
        let fs = Fs::new(tmp.path()).unwrap();
        let staged = fs
            .stage_file(Path::new("/a"), b"new", attrs(0o640))
            .unwrap();
        let at = fs.staged_path(&staged);
        assert_eq!(at.parent().unwrap(), tmp.path());
        assert_eq!(std::fs::read(&at).unwrap(), b"new");
        fs.discard(staged).unwrap();
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [OsString::from("a")]);
        assert_eq!(std::fs::read(tmp.path().join("a")).unwrap(), b"old");
    }

    #[test]
    fn remove_empty_dir_keeps_a_non_empty_one() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("d/e")).unwrap();
        let fs = Fs::new(tmp.path()).unwrap();
        assert!(!fs.remove_empty_dir(Path::new("/d")).unwrap());
        assert!(fs.remove_empty_dir(Path::new("/d/e")).unwrap());
        assert!(fs.remove_empty_dir(Path::new("/d")).unwrap());
    }
}
