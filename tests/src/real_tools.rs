//! Real tools for `tests/real_tools.rs`: a throwaway PostgreSQL 15 cluster,
//! nginx and Caddy on free loopback ports, a tiny HTTP/1.0 client, and the
//! "world" link that lets a tool read what a sandboxed apply wrote.
//!
//! Everything listens on 127.0.0.1 only, keeps its state in the test's temp
//! directory (HOME and XDG directories included), waits with a deadline and
//! is stopped when its guard drops. The packages come from `.ci/run`
//! (caddy, nginx-light, borgmatic, borgbackup; PostgreSQL 15 is on a fresh
//! Debian machine).

use std::io::{Read, Write};
use std::net::TcpStream;

use crate::ports::{says_address_in_use, Start};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// What to install when a tool is missing.
pub const INSTALL_HINT: &str = "apt-get install -y --no-install-recommends caddy nginx-light borgmatic borgbackup postgresql-15 (.ci/run does this)";

/// PostgreSQL 15's binaries (not on PATH on Debian).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Polls `ready` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command to completion with a time limit (killed after it);
/// panics with its output when it cannot start.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}\n  {INSTALL_HINT}"));
    // Drain the pipes on threads so a chatty tool cannot block on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// Makes the absolute path `world` (which must not exist) a symlink to
/// `root` + `world`. Hosts in these tests keep their managed paths under
/// `world`, so after `agent apply --root root` a tool reading the paths the
/// rendered files name (a passphrase file, a backup directory) finds what the
/// agent wrote in the sandbox.
pub fn link_world(root: &Path, world: &Path) {
    let inside = root.join(world.strip_prefix("/").unwrap());
    std::fs::create_dir_all(&inside).unwrap();
    std::os::unix::fs::symlink(&inside, world).unwrap();
}

/// A child process killed when dropped.
pub struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Daemon {
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}\n  {INSTALL_HINT}"));
        Daemon { name, child, log }
    }

    /// Waits until every port on 127.0.0.1 accepts connections (10 s at
    /// most); [`Start::PortTaken`] when the program exited because one was
    /// in use (its log says so), a panic when it exited otherwise.
    fn wait_for_ports(mut self, ports: &[u16]) -> Start<Daemon> {
        for &port in ports {
            let mut exited = None;
            let up = wait_until(Duration::from_secs(10), || {
                if let Ok(Some(status)) = self.child.try_wait() {
                    exited = Some(status);
                    return true;
                }
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            if let Some(status) = exited {
                let log = self.log_text();
                if says_address_in_use(&log) {
                    return Start::PortTaken(log);
                }
                panic!("{} exited ({status}): {log}", self.name);
            }
            assert!(
                up,
                "{} did not listen on 127.0.0.1:{port}: {}",
                self.name,
                self.log_text()
            );
        }
        Start::Up(self)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx (`daemon off`) with the given `server { ... }` blocks, every
/// temp and log path under `dir`, once it listens on `ports`; start it
/// through [`crate::ports::start_on_reserved_ports`].
pub fn nginx(dir: &Path, servers: &str, ports: &[u16]) -> Start<Daemon> {
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  default_type application/octet-stream;\n\
             client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;\n\
             fastcgi_temp_path {d}/tmp/fcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;\n\
             {servers}\n}}\n"
        ),
    )
    .unwrap();
    // -e: nginx 1.22 otherwise opens its compiled-in error log before reading the config.
    let daemon = Daemon::spawn(
        "nginx",
        // /usr/sbin is not on every PATH (a non-root shell's).
        Command::new(if Path::new("/usr/sbin/nginx").exists() {
            "/usr/sbin/nginx"
        } else {
            "nginx"
        })
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log")),
        dir.join("nginx.out"),
    );
    daemon.wait_for_ports(ports)
}

/// Environment that keeps Caddy's state (certificates, autosave) under `dir`.
pub fn caddy_env<'c>(cmd: &'c mut Command, dir: &Path) -> &'c mut Command {
    cmd.env("HOME", dir)
        .env("XDG_DATA_HOME", dir.join("xdg-data"))
        .env("XDG_CONFIG_HOME", dir.join("xdg-config"))
}

/// `caddy run` on a Caddyfile, once `port` answers; start it through
/// [`crate::ports::start_on_reserved_ports`].
pub fn caddy(dir: &Path, caddyfile: &Path, port: u16) -> Start<Daemon> {
    let mut cmd = Command::new("caddy");
    cmd.args(["run", "--adapter", "caddyfile", "--config"])
        .arg(caddyfile);
    caddy_env(&mut cmd, dir);
    Daemon::spawn("caddy", &mut cmd, dir.join("caddy.out")).wait_for_ports(&[port])
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` over HTTP/1.0 (so the body is never chunked) to
/// 127.0.0.1:`port`, with extra header lines; 10 s at most.
pub fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// A throwaway PostgreSQL 15 cluster on 127.0.0.1:`port` (fsync off):
/// local socket connections are trusted (the test's own setup), TCP ones
/// need a SCRAM password (what the backup uses, through its pgpass file).
pub struct Postgres {
    pub port: u16,
    /// Data directory, socket and log; removed after the server stops.
    pub dir: PathBuf,
    /// Superuser password (for TCP connections).
    pub password: String,
    _tmp: tempfile::TempDir,
}

impl Postgres {
    /// initdb + start in a new temp directory, as the `postgres` user
    /// (initdb refuses root).
    pub fn start() -> Postgres {
        let tmp = tempfile::tempdir().unwrap();
        let dir_buf = tmp.path().to_path_buf();
        let dir = dir_buf.as_path();
        assert!(
            Path::new(PG_BIN).join("initdb").exists(),
            "PostgreSQL 15 not found in {PG_BIN}\n  {INSTALL_HINT}"
        );
        std::fs::create_dir_all(dir).unwrap();
        // The postgres user must reach its directory through the test's temp dirs.
        let mut p = dir.to_path_buf();
        while p != Path::new("/tmp") && p.parent().is_some() {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode | 0o755)).unwrap();
            p.pop();
        }
        let ok = run_bounded(
            Command::new("chown").args(["postgres:postgres"]).arg(dir),
            Duration::from_secs(10),
        );
        assert!(ok.status.success(), "chown: {ok:?}");
        let mut pg = Postgres {
            port: 0,
            dir: dir.to_path_buf(),
            password: String::new(),
            // Dropped after `Drop::drop` stopped the server.
            _tmp: tmp,
        };
        let data = dir.join("data");
        let init = pg.as_postgres(
            &format!("{PG_BIN}/initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        );
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let log = dir.join("server.log");
        pg.port = crate::ports::start_on_reserved_port("PostgreSQL", |port| {
            // A failed try's words must not stand for the next one's.
            let _ = std::fs::remove_file(&log);
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
                dir.display()
            );
            let start = pg.as_postgres(
                &format!("{PG_BIN}/pg_ctl"),
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "-t",
                    "30",
                    "-s",
                    "-o",
                    &opts,
                    "start",
                ],
            );
            let server_log = std::fs::read_to_string(&log).unwrap_or_default();
            if start.status.success() {
                Start::Up(port)
            } else if says_address_in_use(&server_log) {
                Start::PortTaken(server_log)
            } else {
                panic!(
                    "pg_ctl start: {}\n{server_log}",
                    String::from_utf8_lossy(&start.stderr)
                )
            }
        });
        pg.password = format!("superuser-{}", pg.port);
        pg.sql(
            "postgres",
            &format!("ALTER ROLE postgres PASSWORD '{}'", pg.password),
        );
        pg
    }

    fn as_postgres(&self, program: &str, args: &[&str]) -> Output {
        run_bounded(
            Command::new("runuser")
                .args(["-u", "postgres", "--", program])
                .args(args)
                .current_dir(&self.dir),
            Duration::from_secs(60),
        )
    }

    /// Runs SQL as the superuser over the local socket; panics on failure.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let out = self.as_postgres(
            &format!("{PG_BIN}/psql"),
            &[
                "-h",
                self.dir.to_str().unwrap(),
                "-p",
                &self.port.to_string(),
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-qAtc",
                sql,
            ],
        );
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    /// Stops the server (never panics: it may run while a test unwinds).
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{PG_BIN}/pg_ctl")])
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "-t", "20", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
