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
//! - Temp files left by a crash are named `.<name>.hla-tmp.<pid>.<n>` and are
//!   removed the next time the agent writes into that directory (the
//!   single-instance lock means no other agent can own them).

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
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
        })
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
        let Ok(entries) = std::fs::read_dir(self.host_path(dir)) else {
            return;
        };
        let Ok(Some(fd)) = self.open_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if is_temp_name(&name) {
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
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut tmp = OsString::from(".");
        tmp.push(name);
        tmp.push(format!(".hla-tmp.{}.{n}", std::process::id()));
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
        let mut tmp = OsString::from(".");
        tmp.push(name);
        tmp.push(format!(
            ".hla-tmp.{}.{}",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed)
        ));
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

fn is_temp_name(name: &OsStr) -> bool {
    let bytes = name.as_bytes();
    bytes.starts_with(b".") && bytes.windows(9).any(|w| w == b".hla-tmp.")
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

    #[test]
    fn stale_temp_files_are_cleaned_on_next_write() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(".a.hla-tmp.1.0"), b"half").unwrap();
        let fs = Fs::new(tmp.path()).unwrap();
        let staged = fs
            .stage_file(Path::new("/a"), b"whole", attrs(0o644))
            .unwrap();
        fs.commit(vec![staged]).into_iter().for_each(|r| r.unwrap());
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [OsString::from("a")]);
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
