//! Local controls of a running daemon: `agent reconcile`, `agent suspend`
//! and `agent resume` talk to it over a Unix socket in its state directory
//! ([`socket_path`]), never over the network listener.
//!
//! # Who may use it
//! Only the agent's own user (and root). Two checks, each enough alone:
//! the socket is mode 0600 inside the state directory's `daemon/`
//! directory (0700), so nobody else can connect; and every connection's
//! peer credentials (`SO_PEERCRED` / `getpeereid`) are checked against the
//! daemon's effective uid before a request is read ([`authorized`]).
//! No token is needed, and no port is opened.
//!
//! # Protocol (version 1)
//! One connection, one request: the client writes one JSON line
//! ([`Request`], at most [`REQUEST_LIMIT`] bytes, within
//! [`REQUEST_TIMEOUT`]); the daemon answers with one JSON line
//! ([`Response`]) and closes. A reconcile that waits is answered when the
//! first run that *started after the request* has finished (a run already
//! in progress read its source earlier), or with an error when the daemon
//! stops. At most [`MAX_CLIENTS`] connections are served at once; more are
//! closed at once.
//!
//! Hand-written over serde_json lines rather than HTTP: the client is the
//! agent itself, the requests are three, and a line protocol needs no HTTP
//! client over Unix sockets in the CLI.

use std::io::{BufRead, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use homelab_agent_state::{RunCounts, Suspension};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use super::status::Refusal;
use crate::telemetry::RunOutcome;

/// The version of the line protocol in [`Request::v`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest request line.
pub const REQUEST_LIMIT: usize = 4096;

/// Time a client has to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once.
pub const MAX_CLIENTS: usize = 16;

/// Longest accepted `agent suspend --reason`, in characters.
pub const REASON_LIMIT: usize = 500;

/// The control socket of the daemon whose state directory is `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("daemon").join("control.sock")
}

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Request {
    /// [`PROTOCOL_VERSION`].
    pub v: u32,
    #[serde(flatten)]
    pub op: Op,
}

/// The operations.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Run now. With `wait`, answer with the result of that run.
    Reconcile { wait: bool },
    /// Stop applying (plans and drift reports go on) until resumed.
    Suspend { by: String, reason: String },
    /// Apply again, and run now.
    Resume,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Response {
    /// A reconcile without `wait`: a run is queued.
    Queued,
    /// A reconcile with `wait`: the run that answered it.
    Finished { run: RunSummary },
    /// Applying is suspended (now, or already was: `already`).
    Suspended {
        suspension: Suspension,
        already: bool,
    },
    /// Applying resumed (`was`: the suspension that ended; `None` if there was none).
    Resumed { was: Option<Suspension> },
    /// Not done: why, and what to do.
    Refused { reason: Refusing, message: String },
}

/// Why a request was not carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusing {
    /// The peer is not the agent's user (nor root).
    NotAllowed,
    /// The request line was too long, late, not JSON or of another version.
    BadRequest,
    /// A reconcile asked of a suspended daemon.
    Suspended,
    /// The daemon is stopping; the run will not come.
    Stopping,
    /// The state directory could not be written.
    State,
}

/// One finished run, as `agent reconcile` reports it. Every text in it is
/// scrubbed of the run's secret values and URL credentials.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunSummary {
    /// What started it (`manual`, `manual+poll`, ...).
    pub trigger: String,
    pub result: RunOutcome,
    /// The revision it converged (or planned, when suspended); `None` when
    /// no revision could be used.
    pub revision: Option<String>,
    /// The newest revision was refused (a bad commit): the run used the
    /// last good one instead.
    pub refused: Option<Refusal>,
    pub counts: RunCounts,
    /// What the plan found before applying.
    pub planned: crate::plan::Summary,
    /// The first error of the run, if any.
    pub error: Option<String>,
    pub duration_ms: u64,
}

impl RunSummary {
    /// Nothing failed and the newest revision was used: `agent reconcile`
    /// exits 0.
    pub fn succeeded(&self) -> bool {
        matches!(self.result, RunOutcome::Success | RunOutcome::Skipped) && self.refused.is_none()
    }
}

/// What the daemon does for each request (implemented by the daemon's
/// shared state; a test double in the tests below).
pub trait Controls: Send + Sync + 'static {
    /// Queues a run; the receiver gets the first run that starts after
    /// this call. `Err`: refused.
    fn reconcile(&self) -> Result<tokio::sync::oneshot::Receiver<RunSummary>, (Refusing, String)>;
    /// Records the suspension; `Ok((s, true))` when one was already there (kept).
    fn suspend(&self, by: String, reason: String)
        -> Result<(Suspension, bool), (Refusing, String)>;
    fn resume(&self) -> Result<Option<Suspension>, (Refusing, String)>;
}

/// The peer may use the controls: it runs as the daemon's effective user,
/// or as root.
pub fn authorized(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == own_uid || peer_uid == 0
}

/// Binds the control socket: removes a stale one (the caller holds the
/// daemon lock, so no other daemon uses it) and makes it 0600.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the controls until `shutdown` resolves; then waiting clients get
/// [`Refusing::Stopping`] and the socket file is removed.
pub async fn serve(
    listener: tokio::net::UnixListener,
    path: PathBuf,
    controls: Arc<dyn Controls>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let own_uid = nix::unistd::geteuid().as_raw();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    let mut stop = shutdown.clone();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                "control socket: {MAX_CLIENTS} clients already connected; closing a new one"
            );
            continue;
        };
        let controls = controls.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            client(stream, own_uid, &*controls, stop).await;
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// One connection: check the peer, read the request, answer.
async fn client(
    mut stream: tokio::net::UnixStream,
    own_uid: u32,
    controls: &dyn Controls,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let peer = stream.peer_cred().map(|c| c.uid());
    let response = match peer {
        Ok(uid) if authorized(uid, own_uid) => match read_request(&mut stream).await {
            Ok(request) => answer(request, controls, &mut stop).await,
            Err(message) => Response::Refused {
                reason: Refusing::BadRequest,
                message,
            },
        },
        Ok(uid) => {
            tracing::warn!(
                peer_uid = uid,
                "control socket: refused a client that is not the agent's user"
            );
            Response::Refused {
                reason: Refusing::NotAllowed,
                message: format!("only the agent's user (uid {own_uid}) or root may control it; you are uid {uid}"),
            }
        }
        Err(e) => Response::Refused {
            reason: Refusing::NotAllowed,
            message: format!("cannot read the peer's credentials: {e}"),
        },
    };
    let mut line = serde_json::to_vec(&response).expect("responses serialize");
    line.push(b'\n');
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(&line)).await;
    let _ = stream.shutdown().await;
}

async fn read_request(stream: &mut tokio::net::UnixStream) -> Result<Request, String> {
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(stream).take(REQUEST_LIMIT as u64 + 1);
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => return Err(format!("no request line within {REQUEST_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(format!("cannot read the request: {e}")),
        Ok(Ok(_)) => {}
    }
    if line.len() > REQUEST_LIMIT {
        return Err(format!("the request is longer than {REQUEST_LIMIT} bytes"));
    }
    let request: Request =
        serde_json::from_slice(&line).map_err(|e| format!("the request is not valid: {e}"))?;
    if request.v != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} is not spoken here (this daemon speaks {PROTOCOL_VERSION}): use the agent binary the daemon runs",
            request.v
        ));
    }
    Ok(request)
}

async fn answer(
    request: Request,
    controls: &dyn Controls,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Response {
    let refused = |(reason, message)| Response::Refused { reason, message };
    match request.op {
        Op::Reconcile { wait } => match controls.reconcile() {
            Err(e) => refused(e),
            Ok(_) if !wait => Response::Queued,
            Ok(done) => tokio::select! {
                run = done => match run {
                    Ok(run) => Response::Finished { run },
                    Err(_) => refused((Refusing::Stopping, "the daemon stopped before the run finished".to_string())),
                },
                () = async { let _ = stop.wait_for(|s| *s).await; } => refused((Refusing::Stopping, "the daemon is stopping; the run will not come".to_string())),
            },
        },
        Op::Suspend { by, reason } => {
            let by = clean(&by, 64);
            let reason = clean(&reason, REASON_LIMIT);
            match controls.suspend(by, reason) {
                Ok((suspension, already)) => Response::Suspended {
                    suspension,
                    already,
                },
                Err(e) => refused(e),
            }
        }
        Op::Resume => match controls.resume() {
            Ok(was) => Response::Resumed { was },
            Err(e) => refused(e),
        },
    }
}

/// Text from a client, for a log line and the status: control characters
/// become spaces, at most `limit` characters.
pub fn clean(text: &str, limit: usize) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(limit)
        .collect::<String>()
        .trim()
        .to_string()
}

/// Why the CLI could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no daemon is running for this state directory (no control socket at {}): start it (`agent run`, or the service `agent install-service` installed)", path.display())]
    NotRunning { path: PathBuf },
    #[error("permission denied on the control socket {}: only the agent's own user (or root) may control the daemon; run this as that user (e.g. with sudo)", path.display())]
    Denied { path: PathBuf },
    #[error("cannot reach the daemon at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from the daemon within {}: it may still be running the request (see `agent status` and the daemon's log)", humantime::format_duration(*waited))]
    Timeout { waited: Duration },
    #[error("the daemon's answer cannot be read: {0}")]
    Answer(String),
}

/// Sends `request` to the daemon at `path` and waits (at most `timeout`)
/// for its answer.
pub fn request(path: &Path, op: Op, timeout: Duration) -> Result<Response, ControlError> {
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ControlError::NotRunning {
                    path: path.to_path_buf(),
                }
            }
            std::io::ErrorKind::PermissionDenied => ControlError::Denied {
                path: path.to_path_buf(),
            },
            _ => ControlError::Connect {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            ControlError::Timeout { waited: timeout }
        }
        _ => ControlError::Answer(e.to_string()),
    };
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .map_err(io)?;
    // A zero timeout would mean "none" to the socket.
    stream
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(io)?;
    let mut line = serde_json::to_vec(&Request {
        v: PROTOCOL_VERSION,
        op,
    })
    .expect("requests serialize");
    line.push(b'\n');
    // A daemon that refuses the client answers before reading the request
    // and closes: the write then fails, and the answer is still there to read.
    if let Err(e) = stream.write_all(&line) {
        if !matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ) {
            return Err(io(e));
        }
    }
    let mut answer = Vec::new();
    // Bounded: an answer is a run summary, far below 1 MiB.
    std::io::BufReader::new(std::io::Read::take(&stream, 1024 * 1024))
        .read_until(b'\n', &mut answer)
        .map_err(io)?;
    if answer.is_empty() {
        return Err(ControlError::Answer(
            "the daemon closed the connection without answering (see its log)".to_string(),
        ));
    }
    serde_json::from_slice(&answer).map_err(|e| ControlError::Answer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A test double of the daemon's controls.
    #[derive(Default)]
    struct Fake {
        suspended: Mutex<Option<Suspension>>,
        waiting: Mutex<Vec<tokio::sync::oneshot::Sender<RunSummary>>>,
    }

    impl Controls for Fake {
        fn reconcile(
            &self,
        ) -> Result<tokio::sync::oneshot::Receiver<RunSummary>, (Refusing, String)> {
            if self.suspended.lock().unwrap().is_some() {
                return Err((Refusing::Suspended, "suspended".into()));
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.waiting.lock().unwrap().push(tx);
            Ok(rx)
        }
        fn suspend(
            &self,
            by: String,
            reason: String,
        ) -> Result<(Suspension, bool), (Refusing, String)> {
            let mut s = self.suspended.lock().unwrap();
            let already = s.is_some();
            let now = s.get_or_insert(Suspension {
                host: "indri".into(),
                since: 1,
                by,
                reason,
            });
            Ok((now.clone(), already))
        }
        fn resume(&self) -> Result<Option<Suspension>, (Refusing, String)> {
            Ok(self.suspended.lock().unwrap().take())
        }
    }

    fn summary() -> RunSummary {
        RunSummary {
            trigger: "manual".into(),
            result: RunOutcome::Success,
            revision: Some("abc".into()),
            refused: None,
            counts: RunCounts::default(),
            planned: Default::default(),
            error: None,
            duration_ms: 5,
        }
    }

    async fn ask(path: PathBuf, op: Op) -> Result<Response, ControlError> {
        tokio::task::spawn_blocking(move || request(&path, op, Duration::from_secs(10)))
            .await
            .unwrap()
    }

    #[test]
    fn only_the_agents_user_and_root_are_authorized() {
        assert!(authorized(1000, 1000));
        assert!(authorized(0, 1000));
        assert!(authorized(0, 0));
        assert!(!authorized(1001, 1000));
        assert!(!authorized(65534, 0));
    }

    #[test]
    fn client_text_loses_control_characters_and_length() {
        assert_eq!(clean("disk\nswap\x1b[31m", 100), "disk swap [31m");
        assert_eq!(clean(&"x".repeat(1000), REASON_LIMIT).len(), REASON_LIMIT);
    }

    #[tokio::test]
    async fn the_socket_answers_each_op_and_refuses_bad_requests() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let fake = Arc::new(Fake::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve(listener, path.clone(), fake.clone(), stop_rx));

        assert_eq!(
            ask(path.clone(), Op::Reconcile { wait: false })
                .await
                .unwrap(),
            Response::Queued
        );
        // (Its receiver was dropped: nobody waits for that run.)
        assert!(fake.waiting.lock().unwrap().pop().unwrap().is_closed());
        // A waiting reconcile is answered by the run it queued.
        let waiting = tokio::spawn(ask(path.clone(), Op::Reconcile { wait: true }));
        let tx = loop {
            if let Some(tx) = fake.waiting.lock().unwrap().pop() {
                break tx;
            }
            tokio::task::yield_now().await;
        };
        tx.send(summary()).unwrap();
        assert_eq!(
            waiting.await.unwrap().unwrap(),
            Response::Finished { run: summary() }
        );

        let suspended = ask(
            path.clone(),
            Op::Suspend {
                by: "alice".into(),
                reason: "disk\nswap".into(),
            },
        )
        .await
        .unwrap();
        let Response::Suspended {
            suspension,
            already: false,
        } = suspended
        else {
            panic!("{suspended:?}");
        };
        assert_eq!(suspension.reason, "disk swap");
        assert!(matches!(
            ask(path.clone(), Op::Reconcile { wait: true })
                .await
                .unwrap(),
            Response::Refused {
                reason: Refusing::Suspended,
                ..
            }
        ));
        assert!(matches!(
            ask(path.clone(), Op::Resume).await.unwrap(),
            Response::Resumed { was: Some(_) }
        ));

        // Not JSON, another version, too long: refused, nothing done.
        for line in [
            b"hello\n".to_vec(),
            b"{\"v\":2,\"op\":\"resume\"}\n".to_vec(),
            [vec![b'{'; REQUEST_LIMIT + 10], b"\n".to_vec()].concat(),
        ] {
            let p = path.clone();
            let answer = tokio::task::spawn_blocking(move || {
                let mut s = std::os::unix::net::UnixStream::connect(&p).unwrap();
                s.write_all(&line).unwrap();
                let mut out = String::new();
                std::io::Read::read_to_string(&mut s, &mut out).unwrap();
                out
            })
            .await
            .unwrap();
            let r: Response = serde_json::from_str(&answer).unwrap();
            assert!(
                matches!(
                    r,
                    Response::Refused {
                        reason: Refusing::BadRequest,
                        ..
                    }
                ),
                "{r:?}"
            );
        }
        assert!(fake.suspended.lock().unwrap().is_none());

        // A reconcile still waiting when the daemon stops is told so.
        let waiting = tokio::spawn(ask(path.clone(), Op::Reconcile { wait: true }));
        while fake.waiting.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        stop_tx.send(true).unwrap();
        assert!(matches!(
            waiting.await.unwrap().unwrap(),
            Response::Refused {
                reason: Refusing::Stopping,
                ..
            }
        ));
        server.await.unwrap();
        assert!(!path.exists(), "the socket is removed at shutdown");
        assert!(matches!(
            ask(path.clone(), Op::Resume).await,
            Err(ControlError::NotRunning { .. })
        ));
    }
}
