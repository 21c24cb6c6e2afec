//! `LocalDir`: the desired state read from a directory on disk (a checkout,
//! uncommitted edits included), under the same rules as a git commit.
//!
//! A commit cannot name a file outside itself: its symlinks are links, its
//! files are blobs of bounded size. A directory can hold anything, so every
//! read here walks the path one component at a time from the repository's
//! directory with `openat(O_NOFOLLOW)` (the walk [`crate::fsops::Fs`] does
//! on managed paths, without its cache of open directories: a repository
//! can have thousands, and descriptors are a bounded resource), and refuses
//! ([`SourceError::Refused`]) instead of reading:
//! - a symlink anywhere in the path, wherever it points (inside or outside
//!   the repository): the git source refuses the same link, so a repository
//!   validates the same as a checkout and as a commit;
//! - anything that is not a regular file or a directory (a FIFO would block
//!   the run, a device or socket has no content to read); the type is
//!   checked with `fstatat` before opening, so a device is never opened,
//!   and again on the opened descriptor, so a swap in between is caught;
//! - a file over [`MAX_FILE_BYTES`] (read with a cap of the limit + 1
//!   bytes, so a file that grows while it is read is refused too) and reads
//!   over [`MAX_TOTAL_BYTES`] in one revision.
//!
//! Listings read the directory through the walked descriptor and follow
//! nothing; a listed symlink is refused when it is read.
//!
//! Not detectable: a hard link. It *is* the file it links to, so a hard
//! link in the checkout to a file elsewhere on the same filesystem reads that
//! file. Making one needs write access to the checkout's directory on that
//! machine (a push cannot create one: git has no hard links); the agent's
//! own git sources never have any.
//!
//! The repository's own directory (`--repo`) is opened as given: the
//! operator chose it, so a symlink there is followed.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, Mode, SFlag};

use super::{check_size, components, ReadBudget, Refusal, Source, SourceError, MAX_FILE_BYTES};

/// A directory on disk (a checkout, possibly with uncommitted edits).
///
/// Its revision is `local-<hash>`: a digest of every file read, so two plans
/// of the same content name the same revision.
pub struct LocalDir {
    root: PathBuf,
    /// The repository's directory, where every walk starts.
    root_fd: OwnedFd,
    read: Mutex<BTreeMap<String, blake3::Hash>>,
    budget: ReadBudget,
}

/// What is at a path, without following or opening it.
enum Found {
    Missing,
    Directory,
    File,
}

impl LocalDir {
    pub fn open(root: &Path) -> Result<LocalDir, SourceError> {
        if !root.is_dir() {
            return Err(SourceError::NotFound(root.to_path_buf()));
        }
        let root_fd = nix::fcntl::open(root, OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| read_error(".", e))?;
        Ok(LocalDir {
            root: root.to_path_buf(),
            root_fd,
            read: Mutex::new(BTreeMap::new()),
            budget: ReadBudget::default(),
        })
    }

    /// Opens the directory `dirs` (components) from the repository's
    /// directory, one component at a time, never following a symlink.
    /// `None` when it is missing or not a directory (as in a commit).
    fn open_dir(&self, path: &str, dirs: &[&str]) -> Result<Option<OwnedFd>, SourceError> {
        let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
        let mut fd = openat(self.root_fd.as_fd(), ".", flags, Mode::empty())
            .map_err(|e| read_error(path, e))?;
        for (i, name) in dirs.iter().enumerate() {
            fd = match openat(fd.as_fd(), *name, flags, Mode::empty()) {
                Ok(next) => next,
                Err(Errno::ENOENT) => return Ok(None),
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    let st = fstatat(fd.as_fd(), *name, AtFlags::AT_SYMLINK_NOFOLLOW)
                        .map_err(|e| read_error(path, e))?;
                    if let Err(Refusal::Symlink { .. }) = file_type(st.st_mode as u32) {
                        return Err(SourceError::Refused {
                            path: path.to_string(),
                            why: Refusal::Symlink {
                                at: dirs[..=i].join("/"),
                            },
                        });
                    }
                    return Ok(None);
                }
                Err(e) => return Err(read_error(path, e)),
            };
        }
        Ok(Some(fd))
    }

    /// What is at `parts` (a symlink or special file is refused).
    fn classify(&self, path: &str, parts: &[&str]) -> Result<Found, SourceError> {
        let Some((name, parents)) = parts.split_last() else {
            return Ok(Found::Directory);
        };
        let Some(dir) = self.open_dir(path, parents)? else {
            return Ok(Found::Missing);
        };
        let st = match fstatat(dir.as_fd(), *name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(Found::Missing),
            Err(e) => return Err(read_error(path, e)),
        };
        match file_type(st.st_mode as u32) {
            Ok(found) => Ok(found),
            Err(why) => Err(SourceError::Refused {
                path: path.to_string(),
                why: match why {
                    Refusal::Symlink { .. } => Refusal::Symlink {
                        at: path.to_string(),
                    },
                    other => other,
                },
            }),
        }
    }

    /// Reads the regular file at `parts`, capped at [`MAX_FILE_BYTES`].
    fn read_regular(&self, path: &str, parts: &[&str]) -> Result<Vec<u8>, SourceError> {
        let (name, parents) = parts.split_last().expect("a file has a name");
        let dir = self
            .open_dir(path, parents)?
            .ok_or_else(|| read_error(path, Errno::ENOENT))?;
        // O_NONBLOCK: should a FIFO be swapped in after the check above,
        // opening it does not wait for a writer (and fstat refuses it).
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        let fd = openat(dir.as_fd(), *name, flags, Mode::empty()).map_err(|e| match e {
            Errno::ELOOP => SourceError::Refused {
                path: path.to_string(),
                why: Refusal::Symlink {
                    at: path.to_string(),
                },
            },
            e => read_error(path, e),
        })?;
        let st = fstat(&fd).map_err(|e| read_error(path, e))?;
        match file_type(st.st_mode as u32) {
            Ok(Found::File) => {}
            Ok(_) => return Err(read_error(path, Errno::EISDIR)),
            Err(why) => {
                return Err(SourceError::Refused {
                    path: path.to_string(),
                    why,
                })
            }
        }
        check_size(path, st.st_size as u64)?;
        // The size can change after fstat: read at most one byte more than
        // allowed and refuse if that byte came.
        let mut buf = Vec::with_capacity(st.st_size as usize);
        std::fs::File::from(fd)
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut buf)
            .map_err(|source| SourceError::Read {
                path: path.to_string(),
                source,
            })?;
        check_size(path, buf.len() as u64)?;
        self.budget.charge(path, buf.len() as u64)?;
        Ok(buf)
    }
}

/// A file type from `st_mode`: regular files and directories are read,
/// anything else is a refusal.
fn file_type(mode: u32) -> Result<Found, Refusal> {
    let fmt = SFlag::from_bits_truncate(mode as _) & SFlag::S_IFMT;
    if fmt == SFlag::S_IFREG {
        Ok(Found::File)
    } else if fmt == SFlag::S_IFDIR {
        Ok(Found::Directory)
    } else if fmt == SFlag::S_IFLNK {
        Err(Refusal::Symlink { at: String::new() })
    } else {
        let kind = if fmt == SFlag::S_IFIFO {
            "FIFO (named pipe)"
        } else if fmt == SFlag::S_IFSOCK {
            "socket"
        } else if fmt == SFlag::S_IFCHR {
            "character device"
        } else if fmt == SFlag::S_IFBLK {
            "block device"
        } else {
            "special file"
        };
        Err(Refusal::Special { kind })
    }
}

fn read_error(path: &str, errno: Errno) -> SourceError {
    SourceError::Read {
        path: path.to_string(),
        source: std::io::Error::from(errno),
    }
}

impl Source for LocalDir {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let parts = components(path)?;
        match self.classify(path, &parts)? {
            Found::Missing | Found::Directory => Ok(None),
            Found::File => {
                let bytes = self.read_regular(path, &parts)?;
                self.read
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(path.to_string(), blake3::hash(&bytes));
                Ok(Some(bytes))
            }
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, SourceError> {
        let parts = components(dir)?;
        if !matches!(self.classify(dir, &parts)?, Found::Directory) {
            return Ok(Vec::new());
        }
        let Some(fd) = self.open_dir(dir, &parts)? else {
            return Ok(Vec::new());
        };
        let mut entries = nix::dir::Dir::from_fd(fd).map_err(|e| read_error(dir, e))?;
        let mut names = Vec::new();
        for entry in entries.iter() {
            let entry = entry.map_err(|e| read_error(dir, e))?;
            match entry.file_name().to_str() {
                Ok("." | "..") | Err(_) => {}
                Ok(name) => names.push(name.to_string()),
            }
        }
        names.sort();
        Ok(names)
    }

    fn revision(&self) -> String {
        let mut h = blake3::Hasher::new();
        for (path, hash) in self.read.lock().unwrap_or_else(|e| e.into_inner()).iter() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn repo() -> (tempfile::TempDir, LocalDir) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("modules/m/templates")).unwrap();
        std::fs::write(dir.path().join("modules/m/module.yaml"), "resources: []\n").unwrap();
        let src = LocalDir::open(dir.path()).unwrap();
        (dir, src)
    }

    fn refusal(r: Result<impl std::fmt::Debug, SourceError>) -> (String, Refusal) {
        match r {
            Err(SourceError::Refused { path, why }) => (path, why),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn plain_files_and_listings_read_as_before() {
        let (dir, src) = repo();
        std::fs::write(dir.path().join("modules/m/templates/a.j2"), "a").unwrap();
        assert_eq!(
            src.read("modules/m/templates/a.j2").unwrap().as_deref(),
            Some(&b"a"[..])
        );
        assert_eq!(src.read("modules/m/templates/none.j2").unwrap(), None);
        assert_eq!(
            src.read("modules/m").unwrap(),
            None,
            "a directory is not a file"
        );
        assert_eq!(src.read("modules/m/module.yaml/x").unwrap(), None);
        assert_eq!(src.list("modules/m").unwrap(), ["module.yaml", "templates"]);
        assert_eq!(src.list("").unwrap(), ["modules"]);
        assert_eq!(src.list("nope").unwrap(), Vec::<String>::new());
        assert!(matches!(src.read("../x"), Err(SourceError::BadPath(_))));
        assert!(matches!(src.read("a/./b"), Err(SourceError::BadPath(_))));
        assert!(matches!(
            src.read("/etc/passwd"),
            Err(SourceError::BadPath(_))
        ));
    }

    #[test]
    fn a_symlink_is_refused_wherever_it_points_and_in_any_component() {
        let (dir, src) = repo();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "outside-canary").unwrap();
        std::fs::create_dir(outside.path().join("templates")).unwrap();
        std::fs::write(outside.path().join("templates/a.j2"), "outside-canary").unwrap();
        let t = dir.path().join("modules/m/templates");
        symlink(outside.path().join("secret"), t.join("out.j2")).unwrap();
        std::fs::write(t.join("real.j2"), "inside").unwrap();
        symlink("real.j2", t.join("in.j2")).unwrap();
        symlink(
            outside.path().join("templates"),
            dir.path().join("modules/n"),
        )
        .unwrap();
        symlink("/nonexistent", t.join("dangling.j2")).unwrap();

        for (path, at) in [
            ("modules/m/templates/out.j2", "modules/m/templates/out.j2"),
            ("modules/m/templates/in.j2", "modules/m/templates/in.j2"),
            (
                "modules/m/templates/dangling.j2",
                "modules/m/templates/dangling.j2",
            ),
            ("modules/n/a.j2", "modules/n"),
        ] {
            let (p, why) = refusal(src.read(path));
            assert_eq!(p, path);
            assert_eq!(why, Refusal::Symlink { at: at.to_string() }, "{path}");
        }
        // Listing a linked directory is refused too; listing the directory
        // holding links names them (reading them is refused).
        assert_eq!(
            refusal(src.list("modules/n")).1,
            Refusal::Symlink {
                at: "modules/n".into()
            }
        );
        assert!(src.list("modules").unwrap().contains(&"n".to_string()));
        let msg = src.read("modules/n/a.j2").unwrap_err().to_string();
        assert!(
            !msg.contains("canary") && !msg.contains(&*outside.path().to_string_lossy()),
            "{msg}"
        );
    }

    /// Walks keep no directory open: a repository of many folders cannot
    /// exhaust the agent's descriptors.
    #[cfg(target_os = "linux")]
    #[test]
    fn reading_many_folders_keeps_no_descriptor_open() {
        let (dir, src) = repo();
        for i in 0..300 {
            let d = dir.path().join(format!("modules/m{i}/templates"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("a.j2"), "a").unwrap();
        }
        let open_fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let before = open_fds();
        for i in 0..300 {
            assert!(src
                .read(&format!("modules/m{i}/templates/a.j2"))
                .unwrap()
                .is_some());
            assert_eq!(src.list(&format!("modules/m{i}")).unwrap(), ["templates"]);
        }
        // Other tests run in parallel threads: allow for their few.
        assert!(open_fds() < before + 50, "{before} -> {}", open_fds());
    }

    #[test]
    fn fifos_and_sockets_are_refused_without_blocking() {
        let (dir, src) = repo();
        let t = dir.path().join("modules/m/templates");
        nix::unistd::mkfifo(&t.join("fifo.j2"), Mode::from_bits_truncate(0o644)).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(t.join("sock.j2")).unwrap();
        // Refused by type before any open: opening the FIFO to read would
        // block until a writer came (none does: the test would hang).
        let (_, why) = refusal(src.read("modules/m/templates/fifo.j2"));
        assert_eq!(
            why,
            Refusal::Special {
                kind: "FIFO (named pipe)"
            }
        );
        let (_, why) = refusal(src.read("modules/m/templates/sock.j2"));
        assert_eq!(why, Refusal::Special { kind: "socket" });
    }

    #[test]
    fn files_over_the_limit_are_refused_and_the_revision_has_a_budget() {
        let (dir, src) = repo();
        let t = dir.path().join("modules/m/templates");
        let f = std::fs::File::create(t.join("big.j2")).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap();
        let (_, why) = refusal(src.read("modules/m/templates/big.j2"));
        assert_eq!(
            why,
            Refusal::TooLarge {
                limit: MAX_FILE_BYTES
            }
        );
        let f = std::fs::File::create(t.join("max.j2")).unwrap();
        f.set_len(MAX_FILE_BYTES).unwrap();
        assert_eq!(
            src.read("modules/m/templates/max.j2")
                .unwrap()
                .unwrap()
                .len() as u64,
            MAX_FILE_BYTES
        );
        let reads = super::super::MAX_TOTAL_BYTES / MAX_FILE_BYTES;
        for _ in 1..reads {
            src.read("modules/m/templates/max.j2").unwrap();
        }
        let (_, why) = refusal(src.read("modules/m/templates/max.j2"));
        assert!(matches!(why, Refusal::OverBudget { .. }), "{why:?}");
    }
}
