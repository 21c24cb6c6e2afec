//! `agent run` on a local-directory repository (no git server): the lab the
//! metrics, Loki and dashboard tests share. The repository is watched, so
//! writing a repo file queues a run; hand edits of managed files are seen by
//! the drift watcher.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::agent;

/// A repo, a sandbox root and an agent config in one temp directory.
pub struct LocalLab {
    pub tmp: tempfile::TempDir,
    pub listen: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl LocalLab {
    /// An empty lab; host `lab`, `roots: [/srv]` is up to the caller's host file.
    pub fn new() -> LocalLab {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("repo/hosts")).unwrap();
        std::fs::create_dir_all(tmp.path().join("repo/modules")).unwrap();
        std::fs::create_dir_all(tmp.path().join("root")).unwrap();
        LocalLab {
            tmp,
            listen: format!("127.0.0.1:{}", free_port()),
        }
    }

    pub fn repo(&self) -> PathBuf {
        self.tmp.path().join("repo")
    }

    pub fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    pub fn config_path(&self) -> PathBuf {
        self.tmp.path().join("agent.yaml")
    }

    /// A managed path's real location in the sandbox.
    pub fn host_path(&self, p: &str) -> PathBuf {
        self.root().join(p.trim_start_matches('/'))
    }

    /// Writes a repo file (creating parents) atomically: the daemon watches
    /// the repo, and a run started between the truncate and the write of a
    /// plain `fs::write` would read an empty module (which is valid, and
    /// prunes everything it held).
    pub fn write(&self, rel: &str, content: &str) {
        let p = self.repo().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let tmp = p.with_extension("tmp-write");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }

    /// Writes a file only its owner can read (password files).
    pub fn write_private(&self, name: &str, content: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.tmp.path().join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// Writes agent.yaml: this lab's repo, root, listen address, host `lab`,
    /// an hour's poll interval (runs come from watchers), plus `extra`.
    pub fn write_config(&self, extra: &str) -> PathBuf {
        std::fs::write(
            self.config_path(),
            format!(
                "repo: {}\nhost: lab\npoll_interval: 1h\nlisten: {}\nroot: {}\n{extra}",
                self.repo().display(),
                self.listen,
                self.root().display()
            ),
        )
        .unwrap();
        self.config_path()
    }

    /// Starts `agent run` with the config written last and waits for its
    /// first run.
    pub fn start(&self) -> Daemon {
        let log = self.tmp.path().join("daemon.log");
        let child = agent()
            .args(["run", "--config", self.config_path().to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            listen: self.listen.clone(),
            log,
        };
        d.wait_until("the first run", Duration::from_secs(30), |s| {
            s["last_run"].is_object() || s["refused"].is_object()
        });
        d
    }
}

impl Default for LocalLab {
    fn default() -> Self {
        LocalLab::new()
    }
}

/// A running daemon; killed on Drop.
pub struct Daemon {
    child: Child,
    pub listen: String,
    pub log: PathBuf,
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
