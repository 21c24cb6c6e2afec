//! `agent run` on a local-directory repository (no git server): the lab the
//! metrics, Loki and dashboard tests share. The repository is watched, so
//! writing a repo file queues a run; hand edits of managed files are seen by
//! the drift watcher.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{agent, Lab};

/// A [`Lab`] for `agent run`: repo, sandbox root and an agent config that
/// listens on a port from the shared allocator.
pub struct LocalLab {
    lab: Lab,
    listen: Mutex<String>,
}

impl std::ops::Deref for LocalLab {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

impl LocalLab {
    /// An empty lab; host `lab`, `roots: [/srv]` is up to the caller's host file.
    pub fn new() -> LocalLab {
        let lab = Lab::empty();
        std::fs::create_dir_all(lab.repo().join("hosts")).unwrap();
        std::fs::create_dir_all(lab.repo().join("modules")).unwrap();
        LocalLab {
            lab,
            listen: Mutex::new(format!("127.0.0.1:{}", crate::ports::reserve())),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.lab.config()
    }

    /// The daemon's listen address (another one after a start found the
    /// first taken).
    pub fn listen(&self) -> String {
        self.listen.lock().unwrap().clone()
    }

    /// Writes agent.yaml: this lab's repo, root, listen address, host `lab`,
    /// an hour's poll interval (runs come from watchers), plus `extra`.
    pub fn write_config(&self, extra: &str) -> PathBuf {
        self.lab.write_config(
            "lab",
            &format!("poll_interval: 1h\nlisten: {}\n{extra}", self.listen()),
        )
    }

    /// Starts `agent run` with the config written last and waits for its
    /// first run.
    pub fn start(&self) -> Daemon {
        self.start_logging("info")
    }

    /// [`LocalLab::start`] with `RUST_LOG=rust_log` (e.g. to see the
    /// debug events a test waits on).
    pub fn start_logging(&self, rust_log: &str) -> Daemon {
        let d = Daemon::start(
            agent,
            &self.config_path(),
            &self.tmp.path().join("daemon.log"),
            &[("RUST_LOG", rust_log)],
            first_run,
        );
        *self.listen.lock().unwrap() = d.listen.clone();
        d
    }
}

impl Default for LocalLab {
    fn default() -> Self {
        LocalLab::new()
    }
}

/// A running `agent run`; killed on Drop.
pub struct Daemon {
    pub child: Child,
    pub listen: String,
    pub log: PathBuf,
}

/// Readiness for [`Daemon::start`]: the first run is over (applied or
/// refused) and none is in progress.
pub fn first_run(listen: &str) -> bool {
    matches!(get(listen, "/api/status", None), Ok((200, _, body))
    if serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|s| {
        (s["last_run"].is_object() || s["refused"].is_object()) && s["running"] == false
    }))
}

/// Readiness for [`Daemon::start`]: `/readyz` answers 200.
pub fn probe_ready(listen: &str) -> bool {
    matches!(get(listen, "/readyz", None), Ok((200, _, _)))
}

/// The `listen:` address of an agent config.
fn config_listen(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("listen:"))
        .map(str::trim)
}

impl Daemon {
    /// Starts `command()` (the agent, or a wrapper that execs it) as
    /// `agent run --config CONFIG` with `env`, stderr appended to `log`,
    /// and waits (30 s at most) until `ready(listen)`. The config's
    /// `listen:` port comes from the shared allocator
    /// ([`crate::ports::reserve`]); when the daemon finds it taken all
    /// the same, the line is rewritten with another port and the daemon
    /// started again.
    pub fn start(
        command: impl Fn() -> Command,
        config: &Path,
        log: &Path,
        env: &[(&str, &str)],
        ready: impl Fn(&str) -> bool,
    ) -> Daemon {
        let text = std::fs::read_to_string(config).unwrap();
        let first = config_listen(&text)
            .expect("a daemon config names its `listen:` address")
            .to_string();
        let mut tries = 0;
        crate::ports::start_on_reserved_port("agent run", |port| {
            tries += 1;
            // The configured port first; another only after it was taken.
            let listen = if tries == 1 {
                first.clone()
            } else {
                let text = std::fs::read_to_string(config).unwrap();
                let old = config_listen(&text).unwrap().to_string();
                let new = format!("127.0.0.1:{port}");
                std::fs::write(
                    config,
                    text.replace(&format!("listen: {old}\n"), &format!("listen: {new}\n")),
                )
                .unwrap();
                new
            };
            let before = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0) as usize;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap();
            let mut cmd = command();
            cmd.args(["run", "--config", config.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(file);
            for (k, v) in env {
                cmd.env(k, v);
            }
            let mut d = Daemon {
                child: cmd.spawn().expect("spawn agent run"),
                listen,
                log: log.to_path_buf(),
            };
            let start = Instant::now();
            loop {
                if ready(&d.listen) {
                    return crate::ports::Start::Up(d);
                }
                if let Some(status) = d.child.try_wait().unwrap() {
                    let said = d.log_text().get(before..).unwrap_or_default().to_string();
                    if said.contains("cannot listen on") && crate::ports::says_address_in_use(&said)
                    {
                        return crate::ports::Start::PortTaken(said);
                    }
                    panic!("`agent run` exited ({status}); daemon log:\n{said}");
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "`agent run` not ready after 30 s; daemon log:\n{}",
                    d.log_text()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    }
}

/// One HTTP/1.1 GET on loopback (bounded by 5 s): (status, content type, body).
pub fn get(addr: &str, path: &str, accept: Option<&str>) -> std::io::Result<(u16, String, String)> {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr.parse().expect("addr"), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    Ok((status, content_type, body.to_string()))
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `/api/status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        let (code, _, body) = get(&self.listen, "/api/status", None).unwrap();
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// `/metrics` with this `Accept`: (content type, body).
    pub fn metrics(&self, accept: Option<&str>) -> (String, String) {
        let (code, ct, body) = get(&self.listen, "/metrics", accept).unwrap();
        assert_eq!(code, 200, "{body}");
        (ct, body)
    }

    /// One sample's value from the Prometheus-text `/metrics` (`name{labels}`
    /// exactly as printed, labels in the agent's order); 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.metrics(Some("text/plain"));
        sample(&body, series).unwrap_or(0.0)
    }

    /// Waits until `/api/status` satisfies `ok` with no run in progress.
    pub fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Ok((200, _, body)) = get(&self.listen, "/api/status", None) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                    if ok(&v) && v["running"] == false {
                        return v;
                    }
                }
            }
            assert!(
                start.elapsed() < limit,
                "timed out waiting for {what}; daemon log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls a condition on the text `/metrics` until it holds.
    pub fn wait_metrics(&self, what: &str, limit: Duration, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let (_, body) = self.metrics(Some("text/plain"));
            if ok(&body) {
                return body;
            }
            assert!(
                start.elapsed() < limit,
                "timed out waiting for {what}; /metrics:\n{body}\ndaemon log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many times the daemon log says `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    /// Waits until the daemon log says `needle` at least `count` times
    /// (`limit` only stops a hang); returns the log.
    pub fn wait_for_log(&self, needle: &str, count: usize, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = self.log_text();
            if text.matches(needle).count() >= count {
                return text;
            }
            assert!(
                start.elapsed() < limit,
                "the daemon log never said {needle:?} {count} times; daemon log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        crate::terminate(&mut self.child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `series` (name and labels exactly as printed) in Prometheus
/// text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Waits until `path` holds `want`; returns how long it took.
pub fn wait_for_file(path: &Path, want: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(path).ok().as_deref() == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{} never became {want:?} (is {:?})",
            path.display(),
            std::fs::read_to_string(path).ok()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
