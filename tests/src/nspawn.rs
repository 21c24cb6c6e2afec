//! A real systemd, PID 1 of a throwaway container, for the tests of native
//! services and packages.
//!
//! [`Container::boot`] starts `systemd-nspawn --boot` on a Debian bookworm
//! minbase tree (debootstrapped once into a cache shared by every test and
//! test process, see [`rootfs`]) with an overlay on tmpfs over it
//! (`--volatile=overlay`: the cached tree is never written), no network but
//! its own loopback (`--private-network`), the agent's build directory
//! read-only at [`BIN_DIR`] and a per-container host temp directory
//! read-write at [`WORK_DIR`]. Tests drive it with `nsenter -t LEADER -a`
//! (LEADER is the container's PID 1 as the host sees it), so the agent runs
//! *inside* and talks to the container's systemd with its own `systemctl`.
//!
//! Isolation, as the recipe this ports found necessary: nspawn is told not
//! to register with a machine manager or create a scope (`--register=no
//! --keep-unit`) and is started inside its own cgroup directories (one per
//! hierarchy: `name=systemd` and `unified` on a hybrid host, the one tree on
//! pure cgroup v2), so the container's cgroups never land in the host's
//! root cgroup. Running systemd as PID 1 with a bare `unshare` + `chroot`
//! would take over the host's cgroups and `/dev`; never do that.
//!
//! Guarantees: every wait is bounded; dropping a [`Container`] shuts it down
//! (SIGTERM to nspawn = clean halt of the container), kills whatever is left
//! in its cgroups, removes them and its temp directory. A test process that
//! was killed outright leaves its cgroups behind; the next [`Container::boot`]
//! sweeps those whose owning process is gone.
//!
//! Needs root, `systemd-nspawn` (Debian: systemd-container), `nsenter`
//! (util-linux), `debootstrap` and, once, the Debian mirror apt uses.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Debian release of the container tree.
pub const RELEASE: &str = "bookworm";
/// Packages on top of minbase (which already has dpkg and apt): an init
/// with a system bus, CA roots for rustls, and `ip`.
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "ca-certificates",
    "iproute2",
];
/// Bumped when [`PACKAGES`] changes, so an old cached tree is not reused.
const TREE_VERSION: &str = "v1";

/// Where the agent's build directory (`target/<profile>`) appears inside.
pub const BIN_DIR: &str = "/opt/hla/bin";
/// Where the per-container host temp directory appears inside (read-write).
pub const WORK_DIR: &str = "/opt/hla/work";
/// The agent binary inside.
pub const AGENT: &str = "/opt/hla/bin/agent";

/// Longest wait for another process's debootstrap to finish.
const TREE_LOCK_WAIT: Duration = Duration::from_secs(20 * 60);
/// Longest debootstrap run.
const DEBOOTSTRAP_LIMIT: Duration = Duration::from_secs(15 * 60);
/// Longest boot (to `running` or `degraded`); a loaded 2-core machine
/// boots in well under a second, but several tests boot at once.
const BOOT_LIMIT: Duration = Duration::from_secs(90);
/// Longest clean shutdown before the container is killed.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(30);
/// Default limit for a command run inside.
const EXEC_LIMIT: Duration = Duration::from_secs(180);

/// The cache directory for container trees: `HLA_NSPAWN_CACHE`, else
/// `/var/tmp/homelab-agent-nspawn` (outside the repo, survives reboots and
/// `cargo clean`; `rm -rf` it to drop the tree).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HLA_NSPAWN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/homelab-agent-nspawn"))
}

/// The Debian mirror apt already uses on this machine (the `bookworm`
/// index target), `HLA_DEBIAN_MIRROR` when set, else deb.debian.org.
pub fn mirror() -> String {
    if let Ok(m) = std::env::var("HLA_DEBIAN_MIRROR") {
        return m;
    }
    let out = Command::new("apt-get")
        .args(["indextargets", "--format", "$(REPO_URI) $(RELEASE)"])
        .stderr(Stdio::null())
        .output();
    if let Ok(out) = out {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((uri, release)) = line.split_once(' ') {
                if release == RELEASE {
                    return uri.to_string();
                }
            }
        }
    }
    "http://deb.debian.org/debian/".to_string()
}

/// How the cached tree came to be, for the figures tests print.
#[derive(Debug, Clone, Copy)]
pub enum TreeOrigin {
    /// Found complete in the cache.
    Cached,
    /// Debootstrapped by this process, taking this long.
    Built(Duration),
}

/// The cached container tree, debootstrapped on first use. A file lock in
/// the cache directory makes concurrent tests and test processes build it
/// once; the tree is built under a `.partial` name and renamed when
/// complete, so a killed debootstrap never leaves a tree that looks usable.
pub fn rootfs() -> (&'static Path, TreeOrigin) {
    static TREE: OnceLock<(PathBuf, TreeOrigin)> = OnceLock::new();
    let (p, o) = TREE.get_or_init(build_rootfs);
    (p, *o)
}

fn build_rootfs() -> (PathBuf, TreeOrigin) {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).expect("create the nspawn cache directory");
    let tree = cache.join(format!("{RELEASE}-{TREE_VERSION}"));
    let done =
        |t: &Path| t.join("lib/systemd/systemd").exists() && t.join(".hla-complete").exists();
    if done(&tree) {
        return (tree, TreeOrigin::Cached);
    }
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cache.join("lock"))
        .expect("open the nspawn cache lock");
    let deadline = Instant::now() + TREE_LOCK_WAIT;
    let _lock = loop {
        match nix::fcntl::Flock::lock(
            lock_file.try_clone().unwrap(),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        ) {
            Ok(l) => break l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err((_, e)) => panic!(
                "waited {TREE_LOCK_WAIT:?} for {} (another debootstrap?): {e}",
                cache.join("lock").display()
            ),
        }
    };
    // Someone else may have built it while we waited.
    if done(&tree) {
        return (tree, TreeOrigin::Cached);
    }
    // A tree without the completion marker is not trusted.
    if tree.exists() {
        std::fs::remove_dir_all(&tree).expect("remove an incomplete cached tree");
    }
    let partial = cache.join(format!("{RELEASE}-{TREE_VERSION}.partial"));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).expect("remove a partial tree from a killed debootstrap");
    }
    let log_path = cache.join("debootstrap.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mirror = mirror();
    let started = Instant::now();
    // In a private mount namespace: the /proc and /sys debootstrap mounts in
    // the target vanish with it even if it is killed.
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "debootstrap"])
        .arg("--variant=minbase")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(RELEASE)
        .arg(&partial)
        .arg(&mirror)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0);
    let mut child = cmd
        .spawn()
        .expect("run debootstrap (apt-get install debootstrap)");
    let status = wait_bounded(&mut child, DEBOOTSTRAP_LIMIT);
    if status.is_none() {
        // Its own process group: dpkg and friends go with it.
        let _ = kill(Pid::from_raw(-(child.id() as i32)), Signal::SIGKILL);
        let _ = child.wait();
    }
    let tail = || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "debootstrap of {RELEASE} from {mirror} failed or timed out ({status:?}); log {}:\n{}",
        log_path.display(),
        tail()
    );
    std::fs::write(partial.join(".hla-complete"), PACKAGES.join("\n")).unwrap();
    std::fs::rename(&partial, &tree).unwrap();
    (tree, TreeOrigin::Built(started.elapsed()))
}

/// Waits for `child` at most `limit`. `None`: still running (or lost).
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return None,
        }
    }
}

/// Runs `cmd` with stdout and stderr captured, killed after `limit` (the
/// output then says so on stderr).
pub fn output_bounded(cmd: &mut Command, limit: Duration) -> Output {
    fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + limit;
    let (status, timed_out) = loop {
        match child.try_wait().expect("wait for child") {
            Some(status) => break (status, false),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                break (child.wait().expect("wait for killed child"), true);
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let mut stderr = err.join().unwrap_or_default();
    if timed_out {
        stderr.extend_from_slice(format!("\n[harness: killed after {limit:?}]\n").as_bytes());
    }
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr,
    }
}

/// The cgroup directories a container named `dir_name` is started in:
/// one per hierarchy on a hybrid (v1 `name=systemd` + v2 `unified`) host,
/// the one tree on pure v2.
fn cgroup_dirs(dir_name: &str) -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("systemd").is_dir() && base.join("unified").is_dir() {
        vec![
            base.join("systemd").join(dir_name),
            base.join("unified").join(dir_name),
        ]
    } else {
        vec![base.join(dir_name)]
    }
}

/// Prefix of the harness's cgroup directories: `hla-nspawn-<pid>-<n>`.
const CGROUP_PREFIX: &str = "hla-nspawn-";

/// Every pid in a cgroup directory and below.
fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(cgroup_pids(&e.path()));
            }
        }
    }
    pids
}

/// Removes a cgroup directory tree, deepest first (rmdir only: cgroupfs
/// directories hold no files of their own).
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// Kills everything in the cgroup trees and removes them, within `limit`.
fn tear_down_cgroups(dirs: &[PathBuf], limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let pids: Vec<i32> = dirs.iter().flat_map(|d| cgroup_pids(d)).collect();
        if pids.is_empty() {
            break;
        }
        for d in dirs {
            // cgroup.kill (v2, Linux 5.14+) kills the whole subtree at once,
            // including processes forked while we look.
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if Instant::now() >= deadline {
            return Err(format!("processes still in {dirs:?} after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for d in dirs {
        // A just-emptied cgroup can be busy for a moment.
        loop {
            match remove_cgroup_tree(d) {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("cannot remove {}: {e}", d.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    Ok(())
}

/// Removes the cgroups of containers whose test process is gone (killed
/// before it could drop them), with whatever still runs in them.
fn sweep_stale_cgroups() {
    let mut parents = vec![PathBuf::from("/sys/fs/cgroup")];
    parents.extend(
        ["systemd", "unified"]
            .iter()
            .map(|h| Path::new("/sys/fs/cgroup").join(h)),
    );
    for parent in parents {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(owner) = name
                .strip_prefix(CGROUP_PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<i32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{owner}")).exists() {
                let _ = tear_down_cgroups(&[e.path()], Duration::from_secs(10));
            }
        }
    }
}

/// Host pid of the direct child of `parent` named `comm`, if any.
fn child_named(parent: u32, comm: &str) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if name == comm && ppid == Some(parent) {
            return Some(pid);
        }
    }
    None
}

/// Fails the test with `msg` unless `cond` holds within `timeout` (polled
/// every 50 ms).
pub fn wait_until(desc: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {desc}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A booted container. Dropping it shuts it down and removes its traces.
pub struct Container {
    machine: String,
    nspawn: Option<Child>,
    leader: i32,
    /// Holds `console.log` and `work/` (bound at [`WORK_DIR`]).
    dir: tempfile::TempDir,
    cgroups: Vec<PathBuf>,
    /// Units that had failed when boot finished (`degraded`), as
    /// `systemctl --failed` lists them. Empty when the boot was clean.
    pub failed_units: Vec<String>,
    /// How long from starting nspawn to `running`/`degraded`.
    pub boot_time: Duration,
}

/// How a container stopped.
#[derive(Debug)]
pub struct Halted {
    /// From SIGTERM to nspawn's exit.
    pub took: Duration,
    /// nspawn's exit status; `None` when it had to be killed (or was
    /// already stopped).
    pub status: Option<ExitStatus>,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

impl Container {
    /// Boots a container; `name` is a label for the machine name and logs.
    /// Panics (failing the test) with the console log when it does not come
    /// up within the boot limit.
    pub fn boot(name: &str) -> Container {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the nspawn harness needs root (systemd-nspawn, cgroups)"
        );
        for tool in ["systemd-nspawn", "nsenter", "debootstrap", "unshare"] {
            assert!(
                which(tool),
                "`{tool}` is missing: apt-get install systemd-container debootstrap util-linux (.ci/run does)"
            );
        }
        let (tree, origin) = rootfs();
        if let TreeOrigin::Built(took) = origin {
            eprintln!(
                "nspawn: debootstrapped {} in {:.1}s",
                tree.display(),
                took.as_secs_f64()
            );
        }
        sweep_stale_cgroups();

        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let me = std::process::id();
        let cg_name = format!("{CGROUP_PREFIX}{me}-{seq}");
        let label: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(30)
            .collect();
        let machine = format!("hla-{me}-{seq}-{label}");

        let dir = tempfile::Builder::new()
            .prefix("hla-nspawn-")
            .tempdir()
            .unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin_dir = crate::agent_bin().parent().unwrap().to_path_buf();

        let cgroups = cgroup_dirs(&cg_name);
        for d in &cgroups {
            std::fs::create_dir(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
        }
        let procs: Vec<CString> = cgroups
            .iter()
            .map(|d| {
                CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes()).unwrap()
            })
            .collect();

        let console = std::fs::File::create(dir.path().join("console.log")).unwrap();
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("--quiet")
            .arg(format!("--directory={}", tree.display()))
            .args([
                "--volatile=overlay",
                "--register=no",
                "--keep-unit",
                "--private-network",
            ])
            .arg(format!("--machine={machine}"))
            .arg(format!("--bind-ro={}:{BIN_DIR}", bin_dir.display()))
            .arg(format!("--bind={}:{WORK_DIR}", work.display()))
            .arg("--boot")
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console);
        // SAFETY: between fork and exec only async-signal-safe calls
        // (setsid, open, write, close) on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid()?;
                for p in &procs {
                    let fd = nix::fcntl::open(
                        p.as_c_str(),
                        nix::fcntl::OFlag::O_WRONLY,
                        nix::sys::stat::Mode::empty(),
                    )?;
                    nix::unistd::write(&fd, b"0")?;
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let nspawn = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = tear_down_cgroups(&cgroups, Duration::from_secs(5));
                panic!("start systemd-nspawn: {e}");
            }
        };
        let mut c = Container {
            machine,
            leader: 0,
            nspawn: Some(nspawn),
            dir,
            cgroups,
            failed_units: Vec::new(),
            boot_time: Duration::ZERO,
        };
        c.wait_for_boot(started);
        c.boot_time = started.elapsed();
        eprintln!(
            "nspawn: booted {} (leader {}) in {:.2}s",
            c.machine,
            c.leader,
            c.boot_time.as_secs_f64()
        );
        c
    }

    fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn nspawn_exited(&mut self) -> Option<ExitStatus> {
        self.nspawn
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn wait_for_boot(&mut self, started: Instant) {
        let deadline = started + BOOT_LIMIT;
        let nspawn_pid = self.nspawn.as_ref().unwrap().id();
        loop {
            if let Some(status) = self.nspawn_exited() {
                panic!(
                    "systemd-nspawn exited during boot ({status}); console:\n{}",
                    self.console_tail()
                );
            }
            if let Some(pid) = child_named(nspawn_pid, "systemd") {
                self.leader = pid;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no systemd under nspawn after {BOOT_LIMIT:?}; console:\n{}",
                self.console_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        loop {
            if let Some(status) = self.nspawn_exited() {
                panic!(
                    "systemd-nspawn exited during boot ({status}); console:\n{}",
                    self.console_tail()
                );
            }
            let out = self.exec_with(&["systemctl", "is-system-running"], Duration::from_secs(10));
            let last = String::from_utf8_lossy(&out.stdout).trim().to_string();
            match last.as_str() {
                "running" => return,
                "degraded" => {
                    let out = self.systemctl(&["list-units", "--failed", "--plain", "--no-legend"]);
                    self.failed_units = String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                        .collect();
                    eprintln!(
                        "nspawn: {} booted degraded; failed units: {}",
                        self.machine,
                        self.failed_units.join(", ")
                    );
                    return;
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "container not running after {BOOT_LIMIT:?} (is-system-running: {last:?}); console:\n{}",
                self.console_tail()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The machine name (`hla-<pid>-<n>-<label>`).
    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// The container's PID 1 as the host sees it.
    pub fn leader(&self) -> i32 {
        self.leader
    }

    /// The container's root as the host sees it (`/proc/LEADER/root`):
    /// write unit files under `etc/systemd/system/` here.
    pub fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.leader))
    }

    /// The host path of the read-write bind at [`WORK_DIR`].
    pub fn work_dir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// Writes a file inside the container (creating parent directories).
    pub fn write(&self, path: &str, content: &str) {
        let p = self.root().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content)
            .unwrap_or_else(|e| panic!("write {path} in the container: {e}"));
    }

    /// Runs `args` inside the container (all its namespaces, its root) with
    /// a clean environment, killed after three minutes.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_with(args, EXEC_LIMIT)
    }

    /// [`Container::exec`] with an explicit time limit.
    pub fn exec_with(&self, args: &[&str], limit: Duration) -> Output {
        self.exec_env(args, &[], limit)
    }

    /// [`Container::exec`] with extra environment variables.
    pub fn exec_env(&self, args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.leader.to_string())
            .arg("-a")
            .arg("--")
            .args(args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .env("HOME", "/root")
            .envs(env.iter().copied());
        output_bounded(&mut cmd, limit)
    }

    /// `systemctl ARGS` inside.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["systemctl"];
        all.extend_from_slice(args);
        self.exec_with(&all, Duration::from_secs(60))
    }

    /// `systemctl show -p P... UNIT`, as a map (`MainPID` → `"123"`).
    pub fn show(&self, unit: &str, props: &[&str]) -> BTreeMap<String, String> {
        let mut args = vec!["show"];
        for p in props {
            args.extend(["-p", p]);
        }
        args.push(unit);
        let out = self.systemctl(&args);
        assert!(
            out.status.success(),
            "systemctl show {unit}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_show(&String::from_utf8_lossy(&out.stdout))
    }

    /// Runs the agent built by this workspace inside the container (colour
    /// off), so it talks to this container's systemd and package manager.
    pub fn agent(&self, args: &[&str]) -> Output {
        let mut all = vec![AGENT];
        all.extend_from_slice(args);
        self.exec_env(&all, &[("NO_COLOR", "1")], EXEC_LIMIT)
    }

    /// Fails the test unless `cond` holds within `timeout`.
    pub fn wait_until(&self, desc: &str, timeout: Duration, cond: impl FnMut() -> bool) {
        wait_until(desc, timeout, cond)
    }

    /// Shuts the container down cleanly (killing it if it does not halt
    /// within 30 s) and removes its cgroups. Called by `Drop`; calling it
    /// twice is harmless (the second call reports nothing to do).
    pub fn stop(&mut self) -> Halted {
        let started = Instant::now();
        let mut status = None;
        if let Some(mut child) = self.nspawn.take() {
            // SIGTERM makes nspawn halt the container's systemd cleanly.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            status = wait_bounded(&mut child, SHUTDOWN_LIMIT);
            if status.is_none() {
                eprintln!(
                    "nspawn: {} did not halt within {SHUTDOWN_LIMIT:?}; killing it",
                    self.machine
                );
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let took = started.elapsed();
        if let Err(e) = tear_down_cgroups(&self.cgroups, Duration::from_secs(20)) {
            eprintln!("nspawn: {}: {e}", self.machine);
        }
        let _ = std::fs::remove_dir_all(format!("/run/systemd/nspawn/propagate/{}", self.machine));
        Halted { took, status }
    }

    /// The cgroup directories the container runs in (gone after [`stop`]).
    ///
    /// [`stop`]: Container::stop
    pub fn cgroups(&self) -> &[PathBuf] {
        &self.cgroups
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Parses `systemctl show` output (`Key=Value` lines; values may hold `=`).
pub fn parse_show(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|d| d.join(tool).is_file())
}
