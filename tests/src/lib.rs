//! Test harness for the end-to-end tests: runs the real `agent` binary
//! against sandboxes (`--root`) and copies of the reference homelab.
//!
//! Everything here is loopback- or tempdir-only.

pub mod connect_standin;
pub mod dist;
pub mod forgejo_standin;
pub mod git_server;
pub mod kube_env;
pub mod kube_standin;
pub mod leaks;
pub mod local_daemon;
pub mod log_env;
pub mod loki_standin;
pub mod nspawn;
pub mod ports;
pub mod prometheus;
pub mod real_tools;
pub mod standin;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root (holds hosts/, modules/).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The bin directory of a Go-built test environment (`tests/kube-env/`,
/// `tests/log-env/`): `$ENV_VAR` when set (CI builds once and exports it),
/// else what `tests/<env>/build.sh` prints: it builds into
/// `~/.cache/homelab-agent/<env>/<hash>/bin` on first use, then only
/// prints the cached directory.
pub fn go_env_bin(env_var: &str, env: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(env_var).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let script = workspace().join(format!("tests/{env}/build.sh"));
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run tests/{env}/build.sh: {e}"));
    assert!(
        out.status.success(),
        "tests/{env}/build.sh failed (needs Go and the Go module proxy)"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Path of the `agent` binary of this build profile, built on first use
/// (a separate test crate cannot rely on cargo having built another
/// package's binary).
pub fn agent_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test> (tests) or target/<profile>/<bin> (bench binaries)
        let mut profile_dir = exe.parent().unwrap().to_path_buf();
        if profile_dir.file_name().is_some_and(|n| n == "deps") {
            profile_dir.pop();
        }
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "homelab-agent", "--bin", "agent"])
            .current_dir(workspace());
        // ring's build script reruns when CARGO_PKG_NAME, CARGO_MANIFEST_DIR
        // ... change: cargo sets them for this test process (not for the
        // outer build), which rebuilt the TLS stack and the agent on every
        // test binary.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
            ]
            .iter()
            .any(|p| name.starts_with(p))
            {
                cmd.env_remove(&*name);
            }
        }
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the agent binary failed");
        profile_dir.join("agent")
    })
}

/// Where the harness points `$KUBECONFIG`: nowhere. Tests that want a
/// cluster name a kubeconfig explicitly (the Kubernetes stand-in's, or the
/// opt-in real cluster's), so a developer's own ~/.kube/config never leaks
/// into a test.
pub const NO_KUBECONFIG: &str = "/nonexistent/homelab-agent-tests/kubeconfig";

/// A command for the agent binary, colour off, no kubeconfig.
pub fn agent() -> Command {
    let mut cmd = Command::new(agent_bin());
    cmd.env("NO_COLOR", "1");
    cmd.env("KUBECONFIG", NO_KUBECONFIG);
    cmd
}

/// Runs the agent with `args`; returns the output.
pub fn run(args: &[&str]) -> Output {
    agent().args(args).output().expect("spawn agent")
}

/// How long a test lets one agent command run before it calls it hung and
/// fails. It only stops a hang: how fast a command is (a hostile input
/// refused within 2 s, ...) is measured by `bench/`, not asserted here.
pub const HANG_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `cmd` (stdin empty), killing it and failing the test if it is still
/// running after [`HANG_LIMIT`].
pub fn run_agent_bounded(cmd: &mut Command) -> Output {
    real_tools::run_bounded(cmd, HANG_LIMIT)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The one lab of the suite: a temp directory holding a desired-state repo
/// (`repo/`), a sandbox root (`root/`) and an agent config (`agent.yaml`).
/// The labs of single test files (a Kubernetes one, a 1Password one, the
/// daemon's) hold one of these and add what is theirs.
pub struct Lab {
    pub tmp: tempfile::TempDir,
}

impl Lab {
    /// A lab whose repo is a copy of the reference homelab.
    pub fn reference() -> Lab {
        let lab = Lab::empty();
        copy_dir(&workspace().join("hosts"), &lab.repo().join("hosts"));
        copy_dir(&workspace().join("modules"), &lab.repo().join("modules"));
        copy_dir(&workspace().join("k8s"), &lab.repo().join("k8s"));
        copy_dir(&workspace().join("agents"), &lab.repo().join("agents"));
        copy_dir(
            &workspace().join("dashboards"),
            &lab.repo().join("dashboards"),
        );
        lab
    }

    /// A lab with an empty repo directory.
    pub fn empty() -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("repo")).unwrap();
        std::fs::create_dir_all(tmp.path().join("root")).unwrap();
        Lab { tmp }
    }

    pub fn repo(&self) -> PathBuf {
        self.tmp.path().join("repo")
    }

    pub fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    /// Where [`Lab::write_config`] writes the agent config.
    pub fn config(&self) -> PathBuf {
        self.tmp.path().join("agent.yaml")
    }

    /// A managed path's real location in the sandbox.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.root().join(path.trim_start_matches('/'))
    }

    /// Writes a repo file (creating parents) atomically: a daemon may be
    /// watching the repo, and a run started between the truncate and the
    /// write of a plain `fs::write` would read an empty file.
    pub fn write(&self, rel: &str, content: &str) {
        let p = self.repo().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let tmp = p.with_extension("tmp-write");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }

    /// Writes a file beside the repo that only its owner can read (token
    /// and password files); returns its path.
    pub fn write_private(&self, name: &str, content: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// Writes agent.yaml: this lab's repo and root, host `host`, then
    /// `extra` verbatim; returns its path.
    pub fn write_config(&self, host: &str, extra: &str) -> PathBuf {
        std::fs::write(
            self.config(),
            format!(
                "repo: {}\nhost: {host}\nroot: {}\n{extra}",
                self.repo().display(),
                self.root().display()
            ),
        )
        .unwrap();
        self.config()
    }

    /// Runs `agent ARGS --config agent.yaml`.
    pub fn with_config(&self, args: &[&str]) -> Output {
        agent()
            .args(args)
            .arg("--config")
            .arg(self.config())
            .output()
            .expect("spawn agent")
    }

    /// Runs `agent <cmd> --repo <repo> --root <root> --host <host> <extra>`.
    pub fn agent(&self, cmd: &str, host: &str, extra: &[&str]) -> Output {
        self.agent_command(cmd, host, extra)
            .output()
            .expect("spawn agent")
    }

    /// [`Lab::agent`] as a command, e.g. for [`run_agent_bounded`].
    pub fn agent_command(&self, cmd: &str, host: &str, extra: &[&str]) -> Command {
        let mut c = agent();
        c.arg(cmd)
            .arg("--repo")
            .arg(self.repo())
            .arg("--root")
            .arg(self.root())
            .args(["--host", host])
            .args(extra);
        c
    }

    /// Replaces the lab's temp path with stable placeholders, for snapshots.
    pub fn redact(&self, text: &str) -> String {
        text.replace(self.root().to_str().unwrap(), "[ROOT]")
            .replace(self.repo().to_str().unwrap(), "[REPO]")
    }
}

/// Recursively copies a directory of plain files.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dst = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dst);
        } else {
            std::fs::copy(entry.path(), &dst).unwrap();
        }
    }
}

/// Everything about one path that a byte-for-byte comparison cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File {
        mode: u32,
        uid: u32,
        content: Vec<u8>,
    },
    Dir {
        mode: u32,
    },
    Link {
        target: PathBuf,
    },
}

/// Snapshot of a whole tree (relative path -> node), for "nothing changed"
/// assertions.
pub fn tree(dir: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(base).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                out.insert(
                    rel,
                    Node::Link {
                        target: std::fs::read_link(&path).unwrap(),
                    },
                );
            } else if meta.is_dir() {
                out.insert(rel, Node::Dir { mode });
                walk(base, &path, out);
            } else {
                // A FIFO, socket or device has no content to compare (and
                // reading a FIFO would block): its type and mode are kept.
                let content = if meta.is_file() {
                    std::fs::read(&path).unwrap()
                } else {
                    format!("<special {:o}>", meta.mode() & 0o170000).into_bytes()
                };
                out.insert(
                    rel,
                    Node::File {
                        mode,
                        uid: meta.uid(),
                        content,
                    },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Runs the agent with `args` under umask 000 while a thread lists `dir` as
/// fast as it can; returns every (name, mode) it saw with group or other
/// permission bits. Proves files are created with their final mode before
/// their first byte (a naive create-then-chmod would be caught).
pub fn run_watching_modes(args: &[&str], dir: &Path) -> Vec<(String, u32)> {
    use std::os::unix::process::CommandExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (seen, done, dir) = (seen.clone(), done.clone(), dir.to_path_buf());
        std::thread::spawn(move || {
            let mut scans = 0u64;
            while !done.load(Ordering::Relaxed) {
                scans += 1;
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    if let Ok(meta) = entry.path().symlink_metadata() {
                        let mode = meta.permissions().mode() & 0o777;
                        if mode & 0o077 != 0 {
                            seen.lock()
                                .unwrap()
                                .push((entry.file_name().to_string_lossy().into_owned(), mode));
                        }
                    }
                }
            }
            scans
        })
    };
    let mut cmd = agent();
    cmd.args(args).stdout(std::process::Stdio::null());
    // SAFETY: umask is async-signal-safe; nothing else runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::empty());
            Ok(())
        });
    }
    let status = cmd.status().unwrap();
    done.store(true, Ordering::Relaxed);
    let scans = watcher.join().unwrap();
    assert!(status.success(), "agent {args:?} failed");
    assert!(
        scans > 1,
        "the watcher must have looked while the agent ran"
    );
    let seen = seen.lock().unwrap().clone();
    seen
}

/// `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds (Howard Hinnant's
/// civil_from_days), for the stand-ins' JSON timestamps.
pub fn rfc3339(unix_secs: i64) -> String {
    let (days, rem) = (unix_secs.div_euclid(86_400), unix_secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// SIGTERM to `child`, then its exit status (waits at most 20 s).
pub fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "daemon did not stop on SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Exit code, stderr, wall time and peak RSS (KiB) of one agent run.
pub struct Measured {
    pub code: i32,
    pub stderr: String,
    pub time: std::time::Duration,
    pub rss_kb: i64,
}

/// Runs the agent under `/usr/bin/time` when there is one: the peak RSS
/// that `wait4` reports for a child spawned from this (large) test process
/// includes this process's own, recorded when the child execs; `time` is a
/// small parent, so its figure is the agent's alone. Without it, the `wait4`
/// figure is still an upper bound.
// The child is reaped by `wait4` (which std's `wait` cannot be told to use).
#[allow(clippy::zombie_processes)]
pub fn measure_agent(args: &[&str]) -> Measured {
    let time_bin = std::path::Path::new("/usr/bin/time");
    let rss_file = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = if time_bin.exists() {
        let mut cmd = std::process::Command::new(time_bin);
        cmd.args(["-f", "%M", "-o"])
            .arg(rss_file.path())
            .arg(agent_bin())
            .env("NO_COLOR", "1")
            .env("KUBECONFIG", NO_KUBECONFIG);
        cmd
    } else {
        agent()
    };
    let mut child = cmd
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn agent");
    let start = std::time::Instant::now();
    // Only stops a hang (see HANG_LIMIT): SIGKILL once the limit passes,
    // unless the child was reaped first.
    let reaped = std::sync::Arc::new(std::sync::Mutex::new(false));
    let watchdog = {
        let reaped = reaped.clone();
        let pid = child.id() as libc::pid_t;
        std::thread::spawn(move || {
            let step = std::time::Duration::from_millis(50);
            while start.elapsed() < HANG_LIMIT {
                if *reaped.lock().unwrap() {
                    return false;
                }
                std::thread::sleep(step);
            }
            let reaped = reaped.lock().unwrap();
            if !*reaped {
                // SAFETY: the child is not reaped yet (checked under the lock), so the pid is still its.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return true;
            }
            false
        })
    };
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut s).unwrap();
        s
    });
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for this child only.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    // Reaped under the watchdog's lock, so it never signals a reused pid.
    let waited = loop {
        let mut reaped = reaped.lock().unwrap();
        let waited = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if waited != 0 {
            *reaped = true;
            break waited;
        }
        drop(reaped);
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    let time = start.elapsed();
    assert!(
        !watchdog.join().unwrap(),
        "agent {args:?} was still running after {HANG_LIMIT:?} (killed)"
    );
    let rss_kb = std::fs::read_to_string(rss_file.path())
        .ok()
        .and_then(|s| s.lines().last()?.trim().parse().ok())
        .unwrap_or(usage.ru_maxrss);
    Measured {
        code: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
        stderr: reader.join().unwrap(),
        time,
        rss_kb,
    }
}

/// Removes indri's Caddy from a copy of the reference repository: its
/// Caddyfile is validated by the macOS binary it names
/// (`/opt/homebrew/bin/caddy`), which a Linux test machine lacks, so an
/// apply of indri here would fail on that one file. For tests and
/// benchmarks of the stacks, which must apply cleanly; the Caddyfile itself
/// is checked with the real Caddy by `reference_coherence.rs`.
pub fn without_indri_caddy(repo: &Path) {
    let indri = repo.join("hosts/indri.yaml");
    let text = std::fs::read_to_string(&indri).unwrap();
    let start = text.find("  - name: caddy\n").expect("indri's caddy");
    let end = start + text[start..].find("\n\n").unwrap() + 2;
    std::fs::write(&indri, format!("{}{}", &text[..start], &text[end..])).unwrap();
}
