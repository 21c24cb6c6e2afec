//! `agent run --log-file FILE`: the daemon's log appended to a file that a
//! rotator may move away at any time (newsyslog on macOS, which the
//! LaunchDaemon installed by `install-service` is set up with). Before each
//! line the path is checked: when it no longer names the open file (moved
//! away, or replaced by a new empty one), the file is opened again there
//! and made the process's standard error too, so a panic message lands in
//! the current file as well. No signal and no pid file are needed, so the
//! rotator's config says `N` (no signal).
//!
//! Hand-written rather than a rolling-file crate: the rotation itself is
//! the platform's (newsyslog's sizes, counts and compression); this only
//! follows it, as a `tail -F` would, in a few lines.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A log file that follows its path across rotations. Cheap to clone
/// (one shared handle), as a tracing writer needs.
#[derive(Clone)]
pub struct LogFile {
    inner: Arc<Mutex<Open>>,
}

struct Open {
    path: PathBuf,
    file: Option<File>,
    /// (device, inode) of `file`.
    id: (u64, u64),
    /// Also `dup2` the file onto standard error after each (re)open.
    stderr: bool,
}

impl LogFile {
    /// Opens (creates, mode 0640) `path` for appending. With `stderr`,
    /// standard error is pointed at it too, now and after each reopen.
    pub fn open(path: &Path, stderr: bool) -> std::io::Result<LogFile> {
        let mut open = Open {
            path: path.to_path_buf(),
            file: None,
            id: (0, 0),
            stderr,
        };
        open.reopen()?;
        Ok(LogFile {
            inner: Arc::new(Mutex::new(open)),
        })
    }
}

impl Open {
    fn reopen(&mut self) -> std::io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&self.path)?;
        let meta = file.metadata()?;
        self.id = (meta.dev(), meta.ino());
        if self.stderr {
            // SAFETY: dup2 onto fd 2 of a descriptor this process owns; no
            // memory is involved, and fd 2 stays open throughout.
            unsafe {
                libc::dup2(file.as_raw_fd(), 2);
            }
        }
        self.file = Some(file);
        Ok(())
    }

    /// The path no longer names the open file: it was rotated away.
    fn moved(&self) -> bool {
        match std::fs::metadata(&self.path) {
            Ok(m) => (m.dev(), m.ino()) != self.id,
            Err(_) => true,
        }
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut open = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if open.moved() {
            // Keep writing to the old file when the path cannot be opened
            // (a full disk, a removed directory): a log line is not worth
            // stopping for.
            let _ = open.reopen();
        }
        match open.file.as_mut() {
            Some(f) => f.write_all(buf).map(|()| buf.len()),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut open = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match open.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What newsyslog does: rename the file away (then compress it, or
    /// create an empty one in its place). The next line goes to the file
    /// at the path, never to the moved one.
    #[test]
    fn a_rotated_file_is_followed_to_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("homelab-agent.log");
        let mut log = LogFile::open(&path, false).unwrap();
        log.write_all(b"one\n").unwrap();
        std::fs::rename(&path, dir.path().join("homelab-agent.log.0")).unwrap();
        log.write_all(b"two\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("homelab-agent.log.0")).unwrap(),
            "one\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
        // Rotated with a new empty file created in its place.
        std::fs::rename(&path, dir.path().join("homelab-agent.log.1")).unwrap();
        std::fs::write(&path, "").unwrap();
        let mut clone = log.clone();
        clone.write_all(b"three\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("homelab-agent.log.0"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
    }
}
