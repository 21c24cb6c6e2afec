//! What the protocol stand-ins (`connect_standin`, `kube_standin`,
//! `loki_standin`) share: [`Served`], a server on a loopback port it bound
//! itself (an accept loop with one thread per connection) that stops and
//! serves again on the same port, a lock that survives a panicking handler
//! (the test that panicked reports it; the stand-in keeps serving), and
//! the reading of an HTTP/1.1 request head.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A serving stand-in: its accept thread and stop flag.
pub struct Running {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    port: u16,
}

impl Running {
    /// Accepts on `listener` (thread `name`), handing each connection to
    /// `handle` on its own thread with the shared `state`.
    pub fn serve<S: Send + 'static>(
        name: &str,
        listener: TcpListener,
        state: Arc<Mutex<S>>,
        handle: fn(TcpStream, &Mutex<S>),
    ) -> Running {
        let port = listener.local_addr().expect("a bound listener").port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let conn_name = format!("{name}-conn");
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let state = state.clone();
                    let _ = std::thread::Builder::new()
                        .name(conn_name.clone())
                        .spawn(move || handle(conn, &state));
                }
            })
            .unwrap_or_else(|e| panic!("spawn the {name} thread: {e}"));
        Running { stop, thread, port }
    }

    /// Stops accepting (a connection wakes the accept loop) and waits for
    /// the accept thread; connections in flight finish on their own.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ =
            TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_secs(2));
        let _ = self.thread.join();
    }
}

/// How long [`Served::restart`] keeps trying to bind the old port again.
const REBIND_TIMEOUT: Duration = Duration::from_secs(10);

/// A stand-in's server: its state, the loopback port it bound (`:0`, so
/// the port is its own from the start), and its accept loop while it
/// serves. Stopped on Drop.
pub struct Served<S> {
    name: &'static str,
    state: Arc<Mutex<S>>,
    port: u16,
    handle: fn(TcpStream, &Mutex<S>),
    running: Option<Running>,
}

impl<S: Send + 'static> Served<S> {
    /// Binds a free 127.0.0.1 port and serves `state` with `handle`
    /// (thread `name`).
    pub fn start(name: &'static str, state: S, handle: fn(TcpStream, &Mutex<S>)) -> Served<S> {
        let listener = crate::ports::bind_loopback();
        let port = listener.local_addr().expect("a bound listener").port();
        let state = Arc::new(Mutex::new(state));
        let running = Some(Running::serve(name, listener, state.clone(), handle));
        Served {
            name,
            state,
            port,
            handle,
            running,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The state, also after a handler panicked while holding it.
    pub fn lock(&self) -> MutexGuard<'_, S> {
        lock(&self.state)
    }

    /// Stops serving (the port then refuses connections); the state is kept.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
    }

    /// Serves again on the same port, with the same state. The port was
    /// this server's until [`Served::stop`]: binding it again is retried
    /// for a while (a connection of the old listener may hold it briefly).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + REBIND_TIMEOUT;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!(
                    "{}: cannot bind 127.0.0.1:{} again: {e}",
                    self.name, self.port
                ),
            }
        };
        self.running = Some(Running::serve(
            self.name,
            listener,
            self.state.clone(),
            self.handle,
        ));
    }
}

impl<S> Drop for Served<S> {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
    }
}

/// Locks `state`, also after a handler panicked while holding it.
pub fn lock<S>(state: &Mutex<S>) -> MutexGuard<'_, S> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// An HTTP/1.1 request head, and the bytes read past it (the start of the body).
pub struct Head {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub rest: Vec<u8>,
}

impl Head {
    /// `Content-Length`, 0 when absent or unreadable.
    pub fn content_length(&self) -> usize {
        self.headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    }
}

/// Reads a request head (at most 64 KiB); `None` on a closed or malformed
/// connection (e.g. the wake-up connect of [`Running::stop`]).
pub fn read_head(conn: &mut impl std::io::Read) -> Option<Head> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Head {
        method,
        target,
        headers,
        rest: buf[end + 4..].to_vec(),
    })
}
