//! A real git smart-HTTP server for end-to-end tests, plus the client-side
//! pieces that go with it: a working clone to commit and push from, the exact
//! webhook request Forgejo sends for a push, and a tiny HTTP/1.1 client.
//!
//! The server is lighttpd running `git http-backend` through mod_cgi, on
//! 127.0.0.1 with a free port. Every request needs HTTP basic auth (user +
//! a Forgejo-style access token as the password); repositories live at
//! Forgejo-like paths `/<owner>/<repo>.git` and accept pushes.
//!
//! Needs `lighttpd` and `git` (with `git-http-backend` in `git --exec-path`),
//! and `ssh-keygen` (openssh-client) for signed commits. `.ci/run` installs them:
//! `apt-get install -y --no-install-recommends lighttpd git openssh-client`.
//!
//! Every `git` run by this module is hermetic (see [`git`]): no system or
//! global config is read or written, no terminal prompt, no askpass.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The basic-auth user name the server accepts (Forgejo accepts any user name
/// with a token; a fixed one keeps URLs predictable).
pub const GIT_USER: &str = "homelab-agent";

/// How long [`GitServer::start`] / [`GitServer::restart`] wait for lighttpd.
const START_TIMEOUT: Duration = Duration::from_secs(10);

const INSTALL_HINT: &str =
    "install it with `apt-get install -y --no-install-recommends lighttpd git openssh-client` \
     (what .ci/run does)";

/// Supervises lighttpd from a shell so that lighttpd also dies when the test
/// process dies without running `Drop` (SIGKILL, abort): the shell's stdin is
/// a pipe from the test process; when it closes (we drop it, or the process is
/// gone) the watcher sends SIGTERM to lighttpd. The shell itself exits with
/// lighttpd's status, so `try_wait` on it tells whether lighttpd is running.
/// `$0` = lighttpd binary, `$1` = config file.
const SUPERVISOR: &str = r#"
exec 3<&0 </dev/null
"$0" -D -f "$1" 3<&- &
pid=$!
{ read -r _ <&3; kill -TERM "$pid" 2>/dev/null; } &
exec 3<&-
wait "$pid"
"#;

/// A real git smart-HTTP server (lighttpd + git-http-backend via CGI) on
/// 127.0.0.1 with a free port, HTTP basic auth on every request (user +
/// password = a Forgejo-style access token), serving bare repositories under a
/// temp dir at Forgejo-like paths `/<owner>/<repo>.git`. Pushes allowed
/// (`http.receivepack`). Killed on Drop.
pub struct GitServer {
    dir: tempfile::TempDir,
    port: u16,
    token: String,
    lighttpd: PathBuf,
    backend: PathBuf,
    child: Option<Child>,
    /// Write end of the supervisor's stdin: dropping it stops lighttpd.
    stdin: Option<ChildStdin>,
}

impl GitServer {
    /// Starts the server on a free loopback port with a fresh random token.
    ///
    /// Panics with what to install when lighttpd or git-http-backend is missing.
    pub fn start() -> GitServer {
        let lighttpd = find_lighttpd().unwrap_or_else(|| {
            panic!("GitServer: `lighttpd` not found on PATH or in /usr/sbin: {INSTALL_HINT}")
        });
        let backend = find_http_backend();
        let dir = tempfile::Builder::new()
            .prefix("git-http-")
            .tempdir()
            .expect("create GitServer temp dir");
        let path = dir.path().to_str().expect("utf-8 temp dir").to_owned();
        assert!(
            !path.contains(['"', '\\', '\n']),
            "temp dir {path:?} cannot be quoted in a lighttpd config"
        );
        for sub in ["repos", "www", "upload"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        // 40 hex chars, like a Forgejo access token.
        let token = random_hex(20);
        // authn_file "plain" backend: one `user:password` per line.
        write_private(
            &dir.path().join("users.plain"),
            format!("{GIT_USER}:{token}\n").as_bytes(),
        );
        let mut server = GitServer {
            dir,
            port: 0,
            token,
            lighttpd,
            backend,
            child: None,
            stdin: None,
        };
        // lighttpd must be told its port: one the shared allocator reserved,
        // another when lighttpd finds it taken all the same.
        server.port = crate::ports::start_on_reserved_port("GitServer (lighttpd)", |port| {
            server.port = port;
            match server.launch() {
                Ok(()) => crate::ports::Start::Up(port),
                Err(Launch::AddrInUse(log)) => crate::ports::Start::PortTaken(log),
                Err(Launch::Failed(log)) => panic!("GitServer: lighttpd did not start:\n{log}"),
            }
        });
        server
    }

    /// Creates an empty bare repository `/<owner>/<name>.git` (default branch
    /// `main`) that accepts pushes.
    pub fn create_repo(&self, owner: &str, name: &str) {
        let path = self.repo_path(owner, name);
        assert!(!path.exists(), "repo {owner}/{name} already exists");
        std::fs::create_dir_all(&path).unwrap();
        git_ok(
            git()
                .args(["init", "-q", "--bare", "-b", "main"])
                .arg(&path),
        );
        git_ok(
            git()
                .arg("-C")
                .arg(&path)
                .args(["config", "http.receivepack", "true"]),
        );
    }

    /// Path of a bare repository on disk (to inspect it with `git -C`).
    pub fn repo_path(&self, owner: &str, name: &str) -> PathBuf {
        self.dir
            .path()
            .join("repos")
            .join(owner)
            .join(format!("{name}.git"))
    }

    /// `http://127.0.0.1:PORT/<owner>/<name>.git`, no credentials.
    pub fn url(&self, owner: &str, name: &str) -> String {
        format!("http://{}/{owner}/{name}.git", self.addr())
    }

    /// `http://USER:TOKEN@127.0.0.1:PORT/<owner>/<name>.git`, for the test's own git.
    pub fn url_with_auth(&self, owner: &str, name: &str) -> String {
        format!(
            "http://{GIT_USER}:{}@{}/{owner}/{name}.git",
            self.token,
            self.addr()
        )
    }

    /// The access token (the basic-auth password).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The basic-auth user name ([`GIT_USER`]).
    pub fn user(&self) -> &str {
        GIT_USER
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, for [`http_get`] / [`http_post`].
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Writes the token to `dir/git-token` with mode 0600 and returns its path.
    /// The file ends with a newline, like `echo $TOKEN > file` (readers must trim).
    pub fn write_token_file(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("git-token");
        write_private(&path, format!("{}\n", self.token).as_bytes());
        path
    }

    /// Stops the server (connections are refused until [`restart`](Self::restart)).
    /// Repositories are kept. A no-op when already stopped.
    pub fn stop(&mut self) {
        // Closing the supervisor's stdin makes it SIGTERM lighttpd and exit.
        drop(self.stdin.take());
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    // Stuck: kill lighttpd by its pid file, then the shell.
                    if let Some(pid) = std::fs::read_to_string(self.dir.path().join("lighttpd.pid"))
                        .ok()
                        .and_then(|s| s.trim().parse::<i32>().ok())
                    {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }

    /// Starts the server again on the same port with the same repos and token.
    /// Panics if the port was taken meanwhile.
    pub fn restart(&mut self) {
        self.stop();
        match self.launch() {
            Ok(()) => {}
            Err(Launch::AddrInUse(log) | Launch::Failed(log)) => {
                panic!("GitServer: restart on port {} failed:\n{log}", self.port)
            }
        }
    }

    /// Whether lighttpd is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// lighttpd's error log (and stdout/stderr), for assertion messages.
    pub fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}", read("error.log"), read("lighttpd.out"))
    }

    fn config(&self) -> String {
        let d = self.dir.path().display();
        let port = self.port;
        let backend = self.backend.display();
        // mod_auth sets REMOTE_USER for the CGI, which git-http-backend needs
        // to allow receive-pack (plus http.receivepack in each repo).
        // GIT_HTTP_EXPORT_ALL: serve repos without git-daemon-export-ok.
        // The alias maps every URL below the backend binary, so lighttpd runs
        // it with PATH_INFO=/<owner>/<repo>.git/...
        format!(
            r#"server.modules = ("mod_auth", "mod_authn_file", "mod_alias", "mod_setenv", "mod_cgi")
server.bind          = "127.0.0.1"
server.port          = {port}
server.document-root = "{d}/www"
server.pid-file      = "{d}/lighttpd.pid"
server.errorlog      = "{d}/error.log"
server.upload-dirs   = ( "{d}/upload" )
server.max-request-size = 0
server.stream-request-body = 2
auth.backend = "plain"
auth.backend.plain.userfile = "{d}/users.plain"
auth.require = ( "/" => ( "method" => "basic", "realm" => "git", "require" => "valid-user" ) )
alias.url = ( "/" => "{backend}/" )
cgi.assign = ( "" => "" )
setenv.add-environment = ( "GIT_PROJECT_ROOT" => "{d}/repos", "GIT_HTTP_EXPORT_ALL" => "1" )
"#
        )
    }

    /// Writes the config, starts lighttpd under the supervisor shell and waits
    /// until it listens.
    fn launch(&mut self) -> Result<(), Launch> {
        let dir = self.dir.path().to_path_buf();
        let conf = dir.join("lighttpd.conf");
        std::fs::write(&conf, self.config()).unwrap();
        let started = |d: &Path| {
            std::fs::read_to_string(d.join("error.log"))
                .unwrap_or_default()
                .matches("server started")
                .count()
        };
        let before = started(&dir);
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("lighttpd.out"))
            .unwrap();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg(&self.lighttpd)
            .arg(&conf)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn sh to run lighttpd");
        self.stdin = child.stdin.take();
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                self.child = None;
                self.stdin = None;
                let log = format!("lighttpd exited with {status}\n{}", self.log());
                return Err(if log.contains("Address already in use") {
                    Launch::AddrInUse(log)
                } else {
                    Launch::Failed(log)
                });
            }
            // "server started" is logged after the listening socket is bound.
            if started(&dir) > before
                && TcpStream::connect_timeout(
                    &([127, 0, 0, 1], self.port).into(),
                    Duration::from_millis(200),
                )
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(Launch::Failed(format!(
                    "not listening on 127.0.0.1:{} after {START_TIMEOUT:?}\n{}",
                    self.port,
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Launch {
    AddrInUse(String),
    Failed(String),
}

fn find_lighttpd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("lighttpd"))
        .find(|p| p.is_file())
}

/// `$(git --exec-path)/git-http-backend` of the `git` on PATH (so server and
/// client are the same git; on some machines that is /usr/local/libexec/git-core,
/// not Debian's /usr/lib/git-core).
fn find_http_backend() -> PathBuf {
    let out = git()
        .arg("--exec-path")
        .output()
        .unwrap_or_else(|e| panic!("GitServer: cannot run `git` ({e}): {INSTALL_HINT}"));
    assert!(out.status.success(), "`git --exec-path` failed");
    let exec = String::from_utf8(out.stdout).unwrap();
    let backend = Path::new(exec.trim()).join("git-http-backend");
    assert!(
        backend.is_file(),
        "GitServer: {} not found: {INSTALL_HINT}",
        backend.display()
    );
    backend
}

/// Writes `content` to a new file with mode 0600 (replacing any old file).
fn write_private(path: &Path, content: &[u8]) {
    let _ = std::fs::remove_file(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(content).unwrap();
}

/// `n` random bytes from the kernel, hex-encoded.
fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    hex::encode(buf)
}

/// A random version-4 UUID (lowercase, hyphenated), e.g. for a webhook delivery id.
pub fn new_uuid() -> String {
    let mut b: [u8; 16] = hex::decode(random_hex(16)).unwrap().try_into().unwrap();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

// ---------------------------------------------------------------------------
// git client side

/// A hermetic `git` command: no system/global config (`GIT_CONFIG_NOSYSTEM`,
/// `GIT_CONFIG_GLOBAL=/dev/null`), no prompts (`GIT_TERMINAL_PROMPT=0`, no
/// askpass, no ssh-agent), no inherited `GIT_DIR` & co, C locale.
pub fn git() -> Command {
    let mut cmd = Command::new("git");
    for var in [
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_NAMESPACE",
        "GIT_CONFIG",
        "GIT_CONFIG_PARAMETERS",
        "GIT_CONFIG_COUNT",
        "GIT_AUTHOR_NAME",
        "GIT_AUTHOR_EMAIL",
        "GIT_AUTHOR_DATE",
        "GIT_COMMITTER_NAME",
        "GIT_COMMITTER_EMAIL",
        "GIT_COMMITTER_DATE",
        "GIT_ASKPASS",
        "SSH_ASKPASS",
        "SSH_AUTH_SOCK",
        "GIT_PROTOCOL",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    cmd
}

/// Runs a git command; panics with its stderr on failure; returns stdout.
fn git_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn git");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `git ls-remote <url>`: ref name -> object id (includes `HEAD`), or
/// git's stderr when it fails (auth refused, server down, ...).
pub fn ls_remote(url: &str) -> Result<BTreeMap<String, String>, String> {
    let out: Output = git().args(["ls-remote", url]).output().expect("spawn git");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(id, name)| (name.to_owned(), id.to_owned()))
        .collect())
}

/// Generates an unencrypted ed25519 key `dir/name` (and `dir/name.pub`) with
/// `ssh-keygen`; returns the private key path (mode 0600).
pub fn generate_ssh_key(dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "test@homelab-agent",
            "-f",
        ])
        .arg(&key)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run ssh-keygen ({e}): {INSTALL_HINT}"));
    assert!(
        out.status.success(),
        "ssh-keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    key
}

/// A working clone to commit and push from, using the system `git` (identity
/// set in the clone's own config, no global config read or touched).
pub struct WorkClone {
    pub dir: PathBuf,
}

impl WorkClone {
    /// Clones `/<owner>/<name>.git` (authenticated URL; an empty repo clones
    /// fine) into `into`, which must not exist or be empty.
    pub fn clone_from(server: &GitServer, owner: &str, name: &str, into: &Path) -> WorkClone {
        git_ok(
            git()
                .args(["clone", "-q", &server.url_with_auth(owner, name)])
                .arg(into),
        );
        let clone = WorkClone {
            dir: into.to_path_buf(),
        };
        for (k, v) in [
            ("user.name", "Test Pusher"),
            ("user.email", "pusher@homelab.test"),
            ("commit.gpgsign", "false"),
            ("tag.gpgsign", "false"),
            ("init.defaultBranch", "main"),
        ] {
            clone.git(&["config", k, v]);
        }
        clone
    }

    /// Runs `git <args>` in the clone; panics on failure; returns stdout.
    pub fn git(&self, args: &[&str]) -> String {
        git_ok(git().arg("-C").arg(&self.dir).args(args))
    }

    /// Writes a file in the work tree (creating parents).
    pub fn write(&self, rel: &str, content: &str) {
        let p = self.dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    /// Removes a file from the work tree (staged by the next commit).
    pub fn remove(&self, rel: &str) {
        std::fs::remove_file(self.dir.join(rel)).unwrap();
    }

    /// Stages everything (`add -A`) and commits (empty commits allowed);
    /// returns the full commit id.
    pub fn commit(&self, msg: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--allow-empty", "-m", msg]);
        self.head()
    }

    /// Like [`commit`](Self::commit), SSH-signed with the private key at
    /// `ssh_key` (`gpg.format=ssh`, `user.signingkey=<key>`, `commit -S`).
    pub fn commit_signed(&self, msg: &str, ssh_key: &Path) -> String {
        let key = std::fs::canonicalize(ssh_key)
            .unwrap_or_else(|e| panic!("signing key {}: {e}", ssh_key.display()));
        self.git(&["add", "-A"]);
        self.git(&[
            "-c",
            "gpg.format=ssh",
            "-c",
            &format!("user.signingkey={}", key.display()),
            "commit",
            "-q",
            "-S",
            "--allow-empty",
            "-m",
            msg,
        ]);
        self.head()
    }

    /// `git push origin HEAD:refs/heads/<branch>` (a full ref, so it also
    /// creates a new branch from a detached HEAD).
    pub fn push(&self, branch: &str) {
        self.git(&[
            "push",
            "-q",
            "origin",
            &format!("HEAD:{}", full_ref(branch)),
        ]);
    }

    /// Force push (history rewrite): `git push --force origin HEAD:<branch>`.
    pub fn push_force(&self, branch: &str) {
        self.git(&[
            "push",
            "-q",
            "--force",
            "origin",
            &format!("HEAD:{}", full_ref(branch)),
        ]);
    }

    /// The full id of HEAD.
    pub fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"]).trim().to_owned()
    }
}

fn full_ref(branch: &str) -> String {
    if branch.starts_with("refs/") {
        branch.to_owned()
    } else {
        format!("refs/heads/{branch}")
    }
}

// ---------------------------------------------------------------------------
// Forgejo push webhook

/// The exact bytes and headers Forgejo sends for a push of `after` (full id)
/// onto `git_ref` (`refs/heads/main`), signed with `secret`:
/// `X-Forgejo-Signature` / `X-Gitea-Signature` / `X-Gogs-Signature` = lowercase
/// hex HMAC-SHA256 of the raw body, `X-Hub-Signature-256` = `sha256=` + the same
/// (an empty `secret` gives empty signature headers, as Forgejo sends for a hook
/// without secret), `X-{Forgejo,Gitea,Gogs,GitHub}-{Event,Event-Type}: push`,
/// `X-*-Delivery: <delivery>`, `Content-Type: application/json`. The legacy
/// `X-Hub-Signature` (HMAC-SHA1) is not sent.
///
/// The body is pretty-printed JSON (2-space indent) with ref, before, after,
/// compare_url, commits[] (one commit for `after`, none when `after` is all
/// zeros, i.e. a deletion), total_commits, head_commit, repository{id, name,
/// full_name, owner, html_url, clone_url, ssh_url, default_branch, private},
/// pusher, sender. `repo_url` is the clone URL (`http://host:port/owner/name.git`,
/// credentials are stripped); `delivery` is a UUID (see [`new_uuid`]).
pub fn forgejo_push(
    secret: &[u8],
    git_ref: &str,
    before: &str,
    after: &str,
    repo_url: &str,
    delivery: &str,
) -> (Vec<u8>, Vec<(String, String)>) {
    let (html_url, host, owner, name) = split_repo_url(repo_url);
    let full_name = format!("{owner}/{name}");
    let short = |id: &str| id.chars().take(10).collect::<String>();
    let user = serde_json::json!({
        "id": 5, "login": "ann", "login_name": "", "source_id": 0, "full_name": "Ann",
        "email": "ann@noreply.homelab.test", "avatar_url": "", "html_url": format!("{}/ann", base_url(&html_url)),
        "language": "", "is_admin": false, "restricted": false, "active": false,
        "prohibit_login": false, "location": "", "website": "", "description": "",
        "visibility": "public", "followers_count": 0, "following_count": 0,
        "starred_repos_count": 0, "username": "ann"
    });
    let deleted = after.chars().all(|c| c == '0');
    let commits = if deleted {
        vec![]
    } else {
        vec![serde_json::json!({
            "id": after,
            "message": format!("update {}\n", git_ref.rsplit('/').next().unwrap_or(git_ref)),
            "url": format!("{html_url}/commit/{after}"),
            "author": {"name": "Ann", "email": "ann@homelab.test", "username": "ann"},
            "committer": {"name": "Ann", "email": "ann@homelab.test", "username": "ann"},
            "verification": null,
            "timestamp": rfc3339_now(),
            "added": [],
            "removed": [],
            "modified": ["hosts/lab.yaml"]
        })]
    };
    let payload = serde_json::json!({
        "ref": git_ref,
        "before": before,
        "after": after,
        "compare_url": format!("{html_url}/compare/{}...{}", short(before), short(after)),
        "total_commits": commits.len(),
        "head_commit": commits.first().cloned().unwrap_or(serde_json::Value::Null),
        "commits": commits,
        "repository": {
            "id": 12,
            "owner": {"id": 3, "login": owner, "username": owner, "full_name": "", "email": ""},
            "name": name,
            "full_name": full_name,
            "description": "",
            "empty": false,
            "private": true,
            "fork": false,
            "template": false,
            "mirror": false,
            "size": 42,
            "html_url": html_url,
            "url": format!("{}/api/v1/repos/{full_name}", base_url(&html_url)),
            "ssh_url": format!("git@{host}:{full_name}.git"),
            "clone_url": format!("{html_url}.git"),
            "original_url": "",
            "website": "",
            "stars_count": 0,
            "forks_count": 0,
            "watchers_count": 1,
            "open_issues_count": 0,
            "default_branch": "main",
            "archived": false,
            "has_issues": true,
            "has_pull_requests": true,
            "object_format_name": if after.len() == 64 { "sha256" } else { "sha1" }
        },
        "pusher": user,
        "sender": user
    });
    let body = serde_json::to_vec_pretty(&payload).unwrap();
    let sig = if secret.is_empty() {
        String::new()
    } else {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(&body);
        hex::encode(mac.finalize().into_bytes())
    };
    let mut headers = vec![("Content-Type".to_owned(), "application/json".to_owned())];
    for forge in ["Forgejo", "Gitea", "Gogs", "GitHub"] {
        headers.push((format!("X-{forge}-Delivery"), delivery.to_owned()));
        headers.push((format!("X-{forge}-Event"), "push".to_owned()));
        headers.push((format!("X-{forge}-Event-Type"), "push".to_owned()));
    }
    for forge in ["Forgejo", "Gitea", "Gogs"] {
        headers.push((format!("X-{forge}-Signature"), sig.clone()));
    }
    headers.push(("X-Hub-Signature-256".to_owned(), format!("sha256={sig}")));
    (body, headers)
}

/// `http://user:pw@host:port/a/b.git` -> (`http://host:port/a/b`, `host`, `a`, `b`).
fn split_repo_url(url: &str) -> (String, String, String, String) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let hostport = authority.rsplit('@').next().unwrap();
    let host = hostport.split(':').next().unwrap().to_owned();
    let path = path.trim_end_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    let (owner, name) = path.rsplit_once('/').unwrap_or(("", path));
    (
        format!("{scheme}://{hostport}/{path}"),
        host,
        owner.to_owned(),
        name.to_owned(),
    )
}

/// `http://host:port/a/b` -> `http://host:port`.
fn base_url(html_url: &str) -> String {
    let (scheme, rest) = html_url.split_once("://").unwrap();
    format!("{scheme}://{}", rest.split('/').next().unwrap())
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    crate::rfc3339(secs)
}

// ---------------------------------------------------------------------------
// Minimal HTTP/1.1 client

const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// POSTs `body` with `headers` to `http://ADDR/path` over a plain
/// `TcpStream` (HTTP/1.1, `Connection: close`; `Host` and `Content-Length`
/// are added unless given). Returns (status, body). Panics on a network
/// error or after 5 s; use [`http_request`] to see the error instead.
pub fn http_post(
    addr: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, String) {
    http_request("POST", addr, path, headers, body)
        .unwrap_or_else(|e| panic!("POST http://{addr}{path}: {e}"))
}

/// GET `http://ADDR/path`; see [`http_post`].
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_request("GET", addr, path, &[], &[])
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// One HTTP/1.1 request, the whole exchange bounded by 5 s. `addr` is
/// `host:port` (an `http://` prefix is tolerated).
pub fn http_request(
    method: &str,
    addr: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    use std::io::{Error, ErrorKind};
    let addr = addr.trim_start_matches("http://").trim_end_matches('/');
    let deadline = Instant::now() + HTTP_TIMEOUT;
    let sock = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, format!("bad address {addr}")))?;
    let mut stream = TcpStream::connect_timeout(&sock, HTTP_TIMEOUT)?;
    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    if !has("content-length") && (method != "GET" || !body.is_empty()) {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("Connection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| Error::new(ErrorKind::TimedOut, "HTTP exchange took over 5 s"))
    };
    stream.set_write_timeout(Some(remaining()?))?;
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;
    let mut resp = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        stream.set_read_timeout(Some(remaining()?))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    "HTTP exchange took over 5 s",
                ))
            }
            // A server that answers early and resets: keep what we got.
            Err(_) if !resp.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    let bad = |why: &str| Error::new(ErrorKind::InvalidData, format!("bad HTTP response: {why}"));
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let raw_body = &resp[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("no status code"))?;
    let chunked = head.lines().skip(1).any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
        })
    });
    let body = if chunked {
        dechunk(raw_body).ok_or_else(|| bad("broken chunked body"))?
    } else {
        raw_body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}
