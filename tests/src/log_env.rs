//! A real log server for the Loki tests: VictoriaLogs (Apache-2.0), which accepts Loki's
//! push API at `/insert/loki/api/v1/push` (JSON and protobuf with snappy) and is queried
//! back with LogsQL at `/select/logsql/query`.
//!
//! `tests/log-env/build.sh` builds `victoria-logs` once from the Go module proxy into
//! `~/.cache/homelab-agent/log-env/<hash>/bin` (or `$HOMELAB_VLOGS_BIN`), like the
//! Kubernetes binaries (`kube_env.rs`). [`VictoriaLogs::start`] runs it on a free
//! 127.0.0.1 port with its data in a temp dir, in its own process group; every wait is
//! bounded; `Drop` stops it (SIGTERM, then SIGKILL) and removes the data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::ports::{says_address_in_use, Start};
use crate::prometheus::form_encode;

/// The directory holding `victoria-logs`: `$HOMELAB_VLOGS_BIN`, else what
/// `tests/log-env/build.sh` prints (it builds on first use).
pub fn binaries() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| crate::go_env_bin("HOMELAB_VLOGS_BIN", "log-env"))
}

/// A running VictoriaLogs. Stopped, and its data removed, on drop.
pub struct VictoriaLogs {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    client: reqwest::blocking::Client,
}

impl VictoriaLogs {
    /// Starts VictoriaLogs on a free loopback port and waits (at most 30 s)
    /// until `/health` answers.
    pub fn start() -> VictoriaLogs {
        let dir = tempfile::tempdir().unwrap();
        // reqwest is built without a TLS provider of its own (plain http here).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .unwrap();
        let mut vl = VictoriaLogs {
            child: None,
            port: 0,
            dir,
            client,
        };
        vl.port = crate::ports::start_on_reserved_port("victoria-logs", |port| {
            vl.port = port;
            vl.spawn().map(|()| port)
        });
        vl
    }

    /// Starts the server on `self.port` and waits until it is healthy;
    /// [`Start::PortTaken`] when it exited because the port was in use.
    fn spawn(&mut self) -> Start<()> {
        let before = self.log().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("victoria-logs.log"))
            .unwrap();
        let mut cmd = Command::new(binaries().join("victoria-logs"));
        cmd.arg(format!("-httpListenAddr=127.0.0.1:{}", self.port))
            .arg(format!(
                "-storageDataPath={}",
                self.dir.path().join("data").display()
            ))
            // The tests' events carry the run's timestamps: keep them all.
            .arg("-retentionPeriod=100y")
            .arg("-loggerLevel=WARN")
            .arg("-memory.allowedBytes=64MiB")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // Its own process group, so a stop reaches everything it started.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        self.child = Some(cmd.spawn().expect("spawn victoria-logs"));
        let start = Instant::now();
        loop {
            let ok = self
                .client
                .get(format!("{}/health", self.url()))
                .timeout(Duration::from_secs(1))
                .send()
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Start::Up(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                let said = self.log().get(before..).unwrap_or_default().to_string();
                if says_address_in_use(&said) {
                    return Start::PortTaken(said);
                }
                panic!("victoria-logs exited ({status}):\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "victoria-logs not ready after 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Loki's push endpoint as VictoriaLogs serves it, with the line's `msg`
    /// field as the message (`_msg_field=msg`).
    pub fn loki_push_url(&self) -> String {
        format!("{}/insert/loki/api/v1/push?_msg_field=msg", self.url())
    }

    /// What VictoriaLogs wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("victoria-logs.log")).unwrap_or_default()
    }

    /// Stops the server (SIGTERM to its group, SIGKILL after 10 s); the data
    /// stays for [`VictoriaLogs::restart`]. The port stays free meanwhile:
    /// pushes are refused, as by a server that is down.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    }

    /// Starts the server again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        if let Start::PortTaken(said) = self.spawn() {
            panic!(
                "victoria-logs: its port {} was taken while it was down:\n{said}",
                self.port
            );
        }
    }

    /// Makes what was just ingested searchable (VictoriaLogs otherwise shows
    /// new data within about a second).
    pub fn flush(&self) {
        let r = self
            .client
            .get(format!("{}/internal/force_flush", self.url()))
            .send()
            .expect("victoria-logs force_flush");
        assert!(r.status().is_success(), "force_flush: {}", r.status());
    }

    /// Its own metrics (Prometheus text), e.g. the pushes per format:
    /// `vl_http_requests_total{path="/insert/loki/api/v1/push",format="protobuf"}`.
    pub fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.url()))
            .send()
            .and_then(|r| r.text())
            .expect("victoria-logs /metrics")
    }

    /// Runs a LogsQL query over all stored logs; one JSON object per entry.
    pub fn query(&self, logsql: &str) -> Vec<serde_json::Value> {
        self.flush();
        let r = self
            .client
            .get(format!(
                "{}/select/logsql/query?query={}",
                self.url(),
                form_encode(logsql)
            ))
            .send()
            .expect("victoria-logs query");
        let status = r.status();
        let body = r.text().unwrap();
        assert!(status.is_success(), "LogsQL `{logsql}`: {status}: {body}");
        body.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("a JSON line from /select/logsql/query"))
            .collect()
    }

    /// Queries until `done` holds, at most `limit`; returns the last rows.
    pub fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        logsql: &str,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let start = Instant::now();
        loop {
            let rows = self.query(logsql);
            if done(&rows) {
                return rows;
            }
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}; `{logsql}` returned {} rows:\n{}",
                rows.len(),
                rows.iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Its data directory (for checks on what is stored).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for VictoriaLogs {
    fn drop(&mut self) {
        self.stop();
    }
}
