//! A real Prometheus (the Debian package's `prometheus`, 2.42 in CI) on a
//! free 127.0.0.1 port, scraping given targets every second, with optional
//! rule files; and `promtool`. Ported from the shared recipe
//! (`ci-helpers/prometheus.sh`) into the tests crate. `.ci/run` installs the
//! package; nothing here is skipped when it is missing: the test fails and
//! says how to install it.
//!
//! Every wait is bounded; the process is killed on Drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::git_server::http_request;

/// How long Prometheus may take to start and answer `/-/ready`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn binary(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    let p = Path::new("/usr/bin").join(name);
    assert!(
        p.is_file(),
        "{name} not found: install the Debian package `prometheus` \
         (apt-get install --no-install-recommends prometheus; .ci/run does)"
    );
    p
}

/// Runs `promtool ARGS` with `stdin` as input.
pub fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(binary("promtool"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
    }
    // promtool finishes in well under a second; bound it anyway.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("promtool {args:?} took over 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running Prometheus. Killed on Drop.
pub struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// `application/x-www-form-urlencoded` value encoding.
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`(job, "127.0.0.1:PORT")`)
    /// every second, evaluating `rule_files` every second, and waits until
    /// it is ready.
    pub fn start(targets: &[(&str, &str)], rule_files: &[&Path]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let mut config = String::from(
            "global: { scrape_interval: 1s, evaluation_interval: 1s, scrape_timeout: 1s }\n",
        );
        if !rule_files.is_empty() {
            config.push_str("rule_files:\n");
            for f in rule_files {
                config.push_str(&format!("  - {:?}\n", f.display().to_string()));
            }
        }
        config.push_str("scrape_configs:\n");
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job:?}\n    static_configs: [ {{ targets: [{addr:?}] }} ]\n"
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, &config).unwrap();
        let check = promtool(&["check", "config", config_path.to_str().unwrap()], None);
        assert!(
            check.status.success(),
            "promtool check config:\n{config}\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let log_path = dir.path().join("prometheus.log");
        let (child, port) = crate::ports::start_on_reserved_port("prometheus", |port| {
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Command::new(binary("prometheus"))
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn prometheus");
            let addr = format!("127.0.0.1:{port}");
            let start = Instant::now();
            loop {
                if let Ok((200, _)) = http_request("GET", &addr, "/-/ready", &[], &[]) {
                    return crate::ports::Start::Up((child, port));
                }
                if let Some(status) = child.try_wait().unwrap() {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if crate::ports::says_address_in_use(&log) {
                        return crate::ports::Start::PortTaken(log);
                    }
                    panic!("prometheus exited ({status}):\n{log}");
                }
                if start.elapsed() > START_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "prometheus not ready after {START_TIMEOUT:?}:\n{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Prometheus { child, port, dir }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Prometheus' own log (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET` an API path; the parsed JSON answer (any status).
    pub fn api_get(&self, path: &str) -> Value {
        let (_, body) = http_request("GET", &self.addr(), path, &[], &[])
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
    }

    /// An instant query through the HTTP API: `Ok(data)` when Prometheus
    /// says `success`, `Err(error text)` otherwise.
    pub fn query(&self, promql: &str) -> Result<Value, String> {
        self.post("/api/v1/query", &format!("query={}", form_encode(promql)))
    }

    /// A range query over the last `minutes` minutes, 1 s step.
    pub fn query_range(&self, promql: &str, minutes: u64) -> Result<Value, String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let body = format!(
            "query={}&start={}&end={now}&step=1",
            form_encode(promql),
            now - minutes * 60
        );
        self.post("/api/v1/query_range", &body)
    }

    fn post(&self, path: &str, form: &str) -> Result<Value, String> {
        let headers = [(
            "Content-Type".to_string(),
            "application/x-www-form-urlencoded".to_string(),
        )];
        let (code, body) = http_request("POST", &self.addr(), path, &headers, form.as_bytes())
            .map_err(|e| format!("POST {path}: {e}"))?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {code}: not JSON ({e}): {body}"))?;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!(
                "HTTP {code}: {}: {}",
                v["errorType"].as_str().unwrap_or("?"),
                v["error"].as_str().unwrap_or("?")
            ))
        }
    }

    /// The samples of an instant vector query as (labels, value).
    pub fn vector(&self, promql: &str) -> Vec<(Value, f64)> {
        let data = self
            .query(promql)
            .unwrap_or_else(|e| panic!("query {promql}: {e}"));
        data["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|s| {
                let v: f64 = s["value"][1]
                    .as_str()
                    .unwrap_or("NaN")
                    .parse()
                    .unwrap_or(f64::NAN);
                (s["metric"].clone(), v)
            })
            .collect()
    }

    /// Polls `promql` until `ok(samples)` holds; panics after `limit`.
    pub fn wait_for(
        &self,
        what: &str,
        promql: &str,
        limit: Duration,
        ok: impl Fn(&[(Value, f64)]) -> bool,
    ) -> Vec<(Value, f64)> {
        let start = Instant::now();
        loop {
            let v = self.vector(promql);
            if ok(&v) {
                return v;
            }
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}: `{promql}` = {v:?}\nprometheus log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
