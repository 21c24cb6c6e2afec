//! The daemon's one HTTP listener: push webhooks from Forgejo / Gitea /
//! GitHub, liveness and readiness probes, and the status snapshot.
//!
//! # Routes
//! | Route | Answer |
//! |---|---|
//! | `POST /hooks/forgejo`, `/hooks/gitea`, `/hooks/github` | push webhook (rules on `hook`) |
//! | `GET /healthz` | `200 ok` while the process serves |
//! | `GET /readyz` | `200 ready`, or `503` with [`StatusSnapshot::ready`]'s reason |
//! | `GET /api/status` | `200` JSON of the [`StatusSnapshot`] |
//! | `GET /metrics` | Prometheus metrics: OpenMetrics when `Accept` prefers it, else text 0.0.4 |
//! | anything else | `404` (`405` for a known path with another method) |
//!
//! # Authentication
//! `/healthz` and `/readyz` answer anyone (probes carry no credentials);
//! the hooks authenticate each delivery by its HMAC signature. `/api/status`
//! and `/metrics` answer anyone unless `api_token_file` is set in the agent
//! config: then they need `Authorization: Bearer <token>` (compared in
//! constant time; `401` otherwise), and `/readyz` gives its reason only as
//! "not ready" (the reason names revisions and files).
//!
//! # Slow and many clients
//! [`serve`] runs its own accept loop over hyper (axum's `serve` has no
//! knobs): a client has [`Limits::header_read_timeout`] to send a request's
//! headers (hyper's `header_read_timeout`, from the connection's start and
//! between keep-alive requests) and [`BODY_READ_TIMEOUT`] for a webhook's
//! body; at most [`Limits::max_connections`] connections are open at once.
//! At that bound the oldest connection not in the middle of a request is
//! closed to make room, so a crowd of slow or idle clients can neither
//! exhaust file descriptors nor keep `/healthz` from answering.
//!
//! # Webhooks
//! A verified push is only a *trigger*: it puts [`Trigger::Webhook`] on the
//! queue and the worker re-reads the desired state from git. Nothing from the
//! payload except `ref` is used. The signature covers the body only (no
//! timestamp, not the headers), so delivery-id de-duplication only stops
//! a forge's re-deliveries and naive replays; a replay with a new id still
//! costs at most one extra reconcile of what is already in git.
//!
//! The secret and signature values are never logged.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::queue::{Trigger, TriggerQueue};
use super::status::StatusSnapshot;
use crate::telemetry::metrics::Metrics;

/// Largest accepted webhook body (1 MiB); larger bodies get `413`.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// How many delivery ids are remembered for replay protection.
pub const RECENT_DELIVERIES: usize = 1024;

/// How long a client may take to send a webhook's body (after its headers).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds of the listener against slow and many clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once. 64: a homelab has a forge, a Prometheus and
    /// a few people; each connection costs a file descriptor (the default
    /// soft limit is 1,024) and a task.
    pub max_connections: usize,
    /// Time to send a request's headers, from the connection's start and
    /// again between keep-alive requests. 10 s: far above any real client
    /// on a LAN, short enough that a slowloris client loses its slot soon.
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Signature headers, in order of preference. `true`: value is `sha256=<hex>`.
const SIGNATURE_HEADERS: [(&str, bool); 3] = [
    ("x-forgejo-signature", false),
    ("x-gitea-signature", false),
    ("x-hub-signature-256", true),
];
const EVENT_HEADERS: [&str; 3] = ["x-forgejo-event", "x-gitea-event", "x-github-event"];
const DELIVERY_HEADERS: [&str; 3] = [
    "x-forgejo-delivery",
    "x-gitea-delivery",
    "x-github-delivery",
];

/// Webhook settings; swapped atomically on config reload (SIGHUP).
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// The shared HMAC secret (raw bytes).
    pub secret: Vec<u8>,
    /// The full ref whose pushes trigger a run, e.g. `refs/heads/main`.
    pub git_ref: String,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("secret", &"<redacted>")
            .field("git_ref", &self.git_ref)
            .finish()
    }
}

/// Shared state of the HTTP listener.
pub struct HttpState {
    /// `None`: webhooks disabled, the hook paths answer `404`.
    pub webhook: RwLock<Option<WebhookConfig>>,
    pub queue: Arc<TriggerQueue>,
    pub status: Arc<RwLock<StatusSnapshot>>,
    recent: Mutex<RecentDeliveries>,
    /// `None`: `/metrics` answers `404`.
    metrics: RwLock<Option<Arc<Metrics>>>,
    /// `Some`: `/api/status` and `/metrics` need it as a bearer token.
    api_token: RwLock<Option<Vec<u8>>>,
}

impl HttpState {
    pub fn new(
        queue: Arc<TriggerQueue>,
        status: Arc<RwLock<StatusSnapshot>>,
        webhook: Option<WebhookConfig>,
    ) -> Arc<HttpState> {
        Arc::new(HttpState {
            webhook: RwLock::new(webhook),
            queue,
            status,
            recent: Mutex::new(RecentDeliveries::new(RECENT_DELIVERIES)),
            metrics: RwLock::new(None),
            api_token: RwLock::new(None),
        })
    }

    /// Requires this bearer token on `/api/status` and `/metrics` (`None`: no token).
    pub fn set_api_token(&self, token: Option<Vec<u8>>) {
        *self.api_token.write().unwrap_or_else(|e| e.into_inner()) = token;
    }

    fn token_required(&self) -> bool {
        self.api_token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// `None` when no token is configured or the request carries it; else
    /// the `401` to answer.
    fn denied(&self, headers: &HeaderMap) -> Option<Response> {
        let guard = self.api_token.read().unwrap_or_else(|e| e.into_inner());
        let token = guard.as_ref()?;
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        (!constant_time_eq(given.as_bytes(), token)).then(|| {
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "this endpoint needs the API token: Authorization: Bearer <api_token_file>",
            )
                .into_response()
        })
    }

    /// Serves these metrics at `/metrics`.
    pub fn set_metrics(&self, metrics: Arc<Metrics>) {
        *self.metrics.write().unwrap_or_else(|e| e.into_inner()) = Some(metrics);
    }

    /// Replaces the webhook settings (config reload). Takes effect for the
    /// next request; the remembered delivery ids are kept.
    pub fn set_webhook(&self, webhook: Option<WebhookConfig>) {
        *self.webhook.write().unwrap_or_else(|e| e.into_inner()) = webhook;
    }

    fn webhook_config(&self) -> Option<WebhookConfig> {
        self.webhook
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn status_snapshot(&self) -> StatusSnapshot {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `true` if the id is new (and remembers it), `false` for a replay.
    fn first_delivery(&self, id: &str) -> bool {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id)
    }
}

/// A bounded set of recently seen delivery ids; the oldest is forgotten first.
struct RecentDeliveries {
    cap: usize,
    order: VecDeque<String>,
    seen: HashSet<String>,
}

impl RecentDeliveries {
    fn new(cap: usize) -> RecentDeliveries {
        RecentDeliveries {
            cap: cap.max(1),
            order: VecDeque::new(),
            seen: HashSet::new(),
        }
    }

    /// `true` if `id` was not in the set; it is now.
    fn insert(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() >= self.cap {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.order.push_back(id.to_string());
        self.seen.insert(id.to_string());
        true
    }
}

/// The listener's routes.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/hooks/forgejo", post(hook))
        .route("/hooks/gitea", post(hook))
        .route("/hooks/github", post(hook))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/status", get(api_status))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Serves until `shutdown` resolves, then stops accepting, lets the
/// requests in flight finish (for a second at most) and closes the rest.
/// See the module docs for the bounds ([`Limits`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state);
    let conns = Arc::new(Mutex::new(Connections::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors (EMFILE) or a connection reset
                    // before accept: wait a little instead of spinning.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some((id, busy, close)) = conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(limits.max_connections)
        else {
            tracing::warn!(%peer, "http: every connection is busy; closing the new one");
            continue;
        };
        // Reap finished connection tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
        let service = ConnService {
            app: app.clone(),
            peer,
            busy,
        };
        let conns = conns.clone();
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                // Evicted to make room: dropping the connection closes it.
                _ = close => {}
                () = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
                }
            }
            conns.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_millis(1500), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    Ok(())
}

/// The open connections, oldest first, and whether each is handling a request.
#[derive(Default)]
struct Connections {
    next: u64,
    open: BTreeMap<u64, (Arc<AtomicUsize>, Option<tokio::sync::oneshot::Sender<()>>)>,
}

impl Connections {
    /// Makes room for a new connection (closing the oldest idle ones while
    /// at `max`) and registers it: its id, its in-request counter and the
    /// signal that closes it. `None`: every open connection is in a request.
    fn admit(
        &mut self,
        max: usize,
    ) -> Option<(u64, Arc<AtomicUsize>, tokio::sync::oneshot::Receiver<()>)> {
        while self.open.len() >= max.max(1) {
            let oldest_idle = self
                .open
                .iter()
                .find(|(_, (busy, _))| busy.load(Ordering::Relaxed) == 0)
                .map(|(id, _)| *id)?;
            if let Some((_, Some(close))) = self.open.remove(&oldest_idle) {
                let _ = close.send(());
            }
        }
        let id = self.next;
        self.next += 1;
        let busy = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.open.insert(id, (busy.clone(), Some(tx)));
        Some((id, busy, rx))
    }

    fn remove(&mut self, id: u64) {
        self.open.remove(&id);
    }
}

/// One connection's service: the router, with the peer address (for logs)
/// and the connection marked busy while a request is handled.
#[derive(Clone)]
struct ConnService {
    app: Router,
    peer: SocketAddr,
    busy: Arc<AtomicUsize>,
}

struct BusyGuard(Arc<AtomicUsize>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for ConnService {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, mut request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        self.busy.fetch_add(1, Ordering::Relaxed);
        let guard = BusyGuard(self.busy.clone());
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let app = self.app.clone();
        Box::pin(async move {
            let _guard = guard;
            tower::ServiceExt::oneshot(app, request.map(Body::new)).await
        })
    }
}

/// Equal, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    match state.status_snapshot().ready() {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        // Unauthenticated: with a token configured the reason is for
        // `/api/status` only.
        Err(_) if state.token_required() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready (GET /api/status with the API token says why)",
        )
            .into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason.to_string()).into_response(),
    }
}

async fn api_status(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    if let Some(denied) = state.denied(&headers) {
        return denied;
    }
    Json(state.status_snapshot()).into_response()
}

/// `/metrics`, in the format the scraper prefers (content negotiation).
async fn metrics(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    if let Some(denied) = state.denied(&headers) {
        return denied;
    }
    let metrics = state
        .metrics
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let Some(metrics) = metrics else {
        return (StatusCode::NOT_FOUND, "metrics are not enabled").into_response();
    };
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (body, content_type) = metrics.negotiate(accept);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "not found")
}

/// The JSON answer of the hook endpoint.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct HookReply {
    /// `accepted`, `ignored` or `rejected`.
    pub status: String,
    pub reason: String,
}

fn reply(code: StatusCode, status: &str, reason: impl Into<String>) -> Response {
    (
        code,
        Json(HookReply {
            status: status.to_string(),
            reason: reason.into(),
        }),
    )
        .into_response()
}

/// The push webhook. In order:
/// 1. webhooks not configured → `404`;
/// 2. `Content-Type` not `application/json` → `415`;
/// 3. body over [`BODY_LIMIT`] → `413`;
/// 4. missing, empty or wrong HMAC-SHA256 signature of the raw body → `401`;
/// 5. no event header → `400`; event other than `push` → `200` ignored;
/// 6. no delivery id → `400`; body not JSON with a string `ref` → `400`;
/// 7. `ref` other than the configured one → `200` ignored;
/// 8. delivery id seen before → `200` ignored (replay);
/// 9. otherwise [`Trigger::Webhook`] is queued → `202` accepted.
async fn hook(State(state): State<Arc<HttpState>>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.to_string())
        .unwrap_or_else(|| "-".to_string());
    let (parts, body) = request.into_parts();
    let headers = parts.headers;

    let Some(config) = state.webhook_config() else {
        tracing::debug!(%path, %peer, "webhook: not configured");
        return reply(
            StatusCode::NOT_FOUND,
            "rejected",
            "webhooks are not configured",
        );
    };

    if !is_json(&headers) {
        tracing::warn!(%path, %peer, outcome = "rejected", "webhook: content type is not application/json");
        return reply(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "rejected",
            "content type must be application/json",
        );
    }

    let read = tokio::time::timeout(BODY_READ_TIMEOUT, read_limited(&headers, body, BODY_LIMIT));
    let body = match read.await.unwrap_or(Err(ReadError::TimedOut)) {
        Ok(body) => body,
        Err(ReadError::TimedOut) => {
            tracing::warn!(%path, %peer, outcome = "rejected", "webhook: body not sent within {BODY_READ_TIMEOUT:?}");
            return reply(
                StatusCode::REQUEST_TIMEOUT,
                "rejected",
                "body not sent in time",
            );
        }
        Err(ReadError::TooLarge) => {
            tracing::warn!(%path, %peer, outcome = "rejected", "webhook: body over {BODY_LIMIT} bytes");
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                "rejected",
                format!("body larger than {BODY_LIMIT} bytes"),
            );
        }
        Err(ReadError::Body(e)) => {
            tracing::warn!(%path, %peer, outcome = "rejected", "webhook: reading the body failed: {e}");
            return reply(
                StatusCode::BAD_REQUEST,
                "rejected",
                "could not read the body",
            );
        }
    };

    let delivery = first_header(&headers, &DELIVERY_HEADERS)
        .unwrap_or_default()
        .to_string();
    let event = first_header(&headers, &EVENT_HEADERS)
        .unwrap_or_default()
        .to_string();

    if let Err(why) = verify_signature(&headers, &config.secret, &body) {
        tracing::warn!(%path, %peer, %delivery, %event, outcome = "rejected", "webhook: {why}");
        return reply(StatusCode::UNAUTHORIZED, "rejected", why);
    }

    if event.is_empty() {
        tracing::warn!(%path, %peer, %delivery, outcome = "rejected", "webhook: no event header");
        return reply(StatusCode::BAD_REQUEST, "rejected", "missing event header");
    }
    if !event.eq_ignore_ascii_case("push") {
        tracing::info!(%path, %peer, %delivery, %event, outcome = "ignored", "webhook: not a push");
        return reply(
            StatusCode::OK,
            "ignored",
            format!("event {event:?} is not a push"),
        );
    }

    if delivery.is_empty() {
        tracing::warn!(%path, %peer, %event, outcome = "rejected", "webhook: no delivery id");
        return reply(
            StatusCode::BAD_REQUEST,
            "rejected",
            "missing delivery id header",
        );
    }

    #[derive(serde::Deserialize)]
    struct Push {
        #[serde(rename = "ref")]
        git_ref: String,
    }
    let push: Push = match serde_json::from_slice(&body) {
        Ok(push) => push,
        Err(e) => {
            tracing::warn!(%path, %peer, %delivery, %event, outcome = "rejected", "webhook: bad push payload: {e}");
            return reply(
                StatusCode::BAD_REQUEST,
                "rejected",
                "body is not a push payload with a ref",
            );
        }
    };
    let git_ref = push.git_ref;

    if git_ref != config.git_ref {
        tracing::info!(%path, %peer, %delivery, %event, %git_ref, outcome = "ignored", "webhook: push to another ref");
        return reply(
            StatusCode::OK,
            "ignored",
            format!("push to {git_ref}, watching {}", config.git_ref),
        );
    }

    if !state.first_delivery(&delivery) {
        tracing::info!(%path, %peer, %delivery, %event, %git_ref, outcome = "ignored", "webhook: delivery seen before");
        return reply(StatusCode::OK, "ignored", "delivery already seen");
    }

    state.queue.push(Trigger::Webhook);
    tracing::info!(%path, %peer, %delivery, %event, %git_ref, outcome = "accepted", "webhook: run queued");
    reply(StatusCode::ACCEPTED, "accepted", "run queued")
}

/// `Content-Type` is `application/json`, parameters (charset) allowed.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// The first of `names` that is present (value trimmed; "" if not text).
fn first_header<'a>(headers: &'a HeaderMap, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|name| headers.get(*name))
        .map(|v| v.to_str().unwrap_or("").trim())
}

/// Checks the HMAC-SHA256 of `body`: the first signature header present
/// wins; an empty one means "unsigned". Errors say why, without values.
fn verify_signature(headers: &HeaderMap, secret: &[u8], body: &[u8]) -> Result<(), &'static str> {
    let Some((value, prefixed)) = SIGNATURE_HEADERS
        .iter()
        .find_map(|(name, prefixed)| headers.get(*name).map(|v| (v, *prefixed)))
    else {
        return Err("missing signature");
    };
    let value = value.to_str().map_err(|_| "malformed signature")?.trim();
    let hex_sig = if prefixed {
        value.strip_prefix("sha256=").ok_or("malformed signature")?
    } else {
        value
    };
    if hex_sig.is_empty() {
        return Err("missing signature");
    }
    let sig = hex::decode(hex_sig).map_err(|_| "malformed signature")?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.verify_slice(&sig).map_err(|_| "bad signature")
}

enum ReadError {
    TooLarge,
    TimedOut,
    Body(axum::Error),
}

/// Reads the whole body, refusing more than `limit` bytes (early when
/// `Content-Length` already says so).
async fn read_limited(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
) -> Result<Bytes, ReadError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) || body.size_hint().lower() > limit as u64 {
        return Err(ReadError::TooLarge);
    }
    let mut buf = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(ReadError::Body)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(ReadError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use axum::http::{Method, Request as HttpRequest};
    use homelab_agent_state::{RunCounts, RunRecord, RunResult};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    use super::super::status::Refusal;
    use super::*;

    const SECRET: &[u8] = b"s3cret-hook-key";
    const MAIN: &str = "refs/heads/main";

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    /// The push payload of the spec, pretty-printed with 2-space indent as
    /// Forgejo sends it.
    fn push_body(git_ref: &str) -> Vec<u8> {
        let person = serde_json::json!({"name": "Ann", "email": "ann@lan", "username": "ann"});
        let commit = serde_json::json!({
            "id": "bffeb74224043ba2feb48d137756c8a9331c449a",
            "message": "bump grafana\n",
            "url": "https://git.lan/ops/homelab/commit/bffeb74224043ba2feb48d137756c8a9331c449a",
            "author": person, "committer": person,
            "verification": null, "timestamp": "2024-06-10T09:00:00Z",
            "added": [], "removed": [], "modified": ["hosts/nas/grafana.yaml"]
        });
        let payload = serde_json::json!({
            "ref": git_ref,
            "before": "28e1879d029cb852e4844d9c718537df08844e03",
            "after": "bffeb74224043ba2feb48d137756c8a9331c449a",
            "compare_url": "https://git.lan/ops/homelab/compare/28e1879d029cb852e4844d9c718537df08844e03...bffeb74224043ba2feb48d137756c8a9331c449a",
            "commits": [commit.clone()],
            "total_commits": 1,
            "head_commit": commit,
            "repository": {
                "id": 12, "name": "homelab", "full_name": "ops/homelab",
                "owner": {"id": 3, "login": "ops", "username": "ops", "full_name": "", "email": ""},
                "html_url": "https://git.lan/ops/homelab",
                "clone_url": "https://git.lan/ops/homelab.git",
                "ssh_url": "git@git.lan:ops/homelab.git",
                "default_branch": "main", "private": true
            },
            "pusher": {"id": 5, "login": "ann", "username": "ann", "email": "ann@lan"},
            "sender": {"id": 5, "login": "ann", "username": "ann"}
        });
        serde_json::to_vec_pretty(&payload).unwrap()
    }

    fn uuid(n: u32) -> String {
        format!("8c6e1f2a-5b7d-4e3f-9a1b-{n:012x}")
    }

    #[derive(Clone, Copy, Debug)]
    enum Forge {
        Forgejo,
        Gitea,
        GitHub,
    }

    /// The headers each forge sends (spec table): Forgejo sends its own set
    /// plus the Gitea and GitHub ones; Gitea the same minus X-Forgejo-*;
    /// GitHub only its own.
    fn forge_headers(
        forge: Forge,
        event: &str,
        delivery: &str,
        sig: &str,
    ) -> Vec<(String, String)> {
        let mut h = vec![("Content-Type".to_string(), "application/json".to_string())];
        let mut add = |k: &str, v: &str| h.push((k.to_string(), v.to_string()));
        if matches!(forge, Forge::Forgejo) {
            add("X-Forgejo-Delivery", delivery);
            add("X-Forgejo-Event", event);
            add("X-Forgejo-Event-Type", event);
            add("X-Forgejo-Signature", sig);
        }
        if matches!(forge, Forge::Forgejo | Forge::Gitea) {
            add("X-Gitea-Delivery", delivery);
            add("X-Gitea-Event", event);
            add("X-Gitea-Event-Type", event);
            add("X-Gitea-Signature", sig);
            add("X-Gogs-Delivery", delivery);
            add("X-Gogs-Event", event);
            add("X-Gogs-Signature", sig);
        }
        add("X-GitHub-Delivery", delivery);
        add("X-GitHub-Event", event);
        if !matches!(forge, Forge::GitHub) {
            add("X-GitHub-Event-Type", event);
        }
        add("X-Hub-Signature-256", &format!("sha256={sig}"));
        h
    }

    fn path_of(forge: Forge) -> &'static str {
        match forge {
            Forge::Forgejo => "/hooks/forgejo",
            Forge::Gitea => "/hooks/gitea",
            Forge::GitHub => "/hooks/github",
        }
    }

    fn state_with(webhook: Option<WebhookConfig>) -> Arc<HttpState> {
        HttpState::new(
            Arc::new(TriggerQueue::new()),
            Arc::new(RwLock::new(StatusSnapshot::default())),
            webhook,
        )
    }

    fn enabled() -> Arc<HttpState> {
        state_with(Some(WebhookConfig {
            secret: SECRET.to_vec(),
            git_ref: MAIN.to_string(),
        }))
    }

    async fn send(
        state: &Arc<HttpState>,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> (StatusCode, Vec<u8>) {
        let mut req = HttpRequest::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let resp = router(state.clone())
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let code = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (code, bytes.to_vec())
    }

    async fn post_hook(
        state: &Arc<HttpState>,
        path: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> (StatusCode, HookReply) {
        let (code, bytes) = send(state, Method::POST, path, headers, body).await;
        let reply: HookReply = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{code}: not a JSON reply ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (code, reply)
    }

    /// A signed Forgejo push to `git_ref`.
    async fn forgejo_push(
        state: &Arc<HttpState>,
        git_ref: &str,
        delivery: &str,
    ) -> (StatusCode, HookReply) {
        let body = push_body(git_ref);
        let h = forge_headers(Forge::Forgejo, "push", delivery, &sign(SECRET, &body));
        post_hook(state, "/hooks/forgejo", &h, body).await
    }

    fn set(headers: &mut Vec<(String, String)>, name: &str, value: Option<&str>) {
        headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        if let Some(v) = value {
            headers.push((name.to_string(), v.to_string()));
        }
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let mut h = HeaderMap::new();
        h.insert(
            "x-gitea-signature",
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            verify_signature(&h, b"Jefe", b"what do ya want for nothing?"),
            Ok(())
        );
        assert_eq!(
            verify_signature(&h, b"Jefe", b"what do ya want for nothing!"),
            Err("bad signature")
        );
    }

    #[tokio::test]
    async fn forgejo_push_with_good_signature_is_accepted_and_queued() {
        let state = enabled();
        let (code, reply) = forgejo_push(&state, MAIN, &uuid(1)).await;
        assert_eq!(code, StatusCode::ACCEPTED, "{reply:?}");
        assert_eq!(reply.status, "accepted");
        assert_eq!(state.queue.take(), BTreeSet::from([Trigger::Webhook]));
        assert!(state.queue.take().is_empty());
    }

    #[tokio::test]
    async fn every_forge_header_variant_is_accepted_on_every_hook_path() {
        let mut n = 100;
        for forge in [Forge::Forgejo, Forge::Gitea, Forge::GitHub] {
            for path in ["/hooks/forgejo", "/hooks/gitea", "/hooks/github"] {
                n += 1;
                let state = enabled();
                let body = push_body(MAIN);
                let h = forge_headers(forge, "push", &uuid(n), &sign(SECRET, &body));
                let (code, reply) = post_hook(&state, path, &h, body).await;
                assert_eq!(code, StatusCode::ACCEPTED, "{forge:?} on {path}: {reply:?}");
                assert_eq!(
                    state.queue.take(),
                    BTreeSet::from([Trigger::Webhook]),
                    "{forge:?} on {path}"
                );
            }
        }
    }

    /// Each case edits the headers/body of a valid Forgejo push (or GitHub
    /// push) and states the expected code and reply status; none may queue.
    #[tokio::test]
    async fn rejected_and_ignored_requests_queue_nothing() {
        type Edit = fn(&mut Vec<(String, String)>, &mut Vec<u8>);
        let cases: Vec<(&str, Forge, Edit, StatusCode, &str, &str)> = vec![
            (
                "bad signature (forgejo)",
                Forge::Forgejo,
                |h, b| {
                    let sig = sign(b"wrong secret", b);
                    set(h, "X-Forgejo-Signature", Some(&sig));
                },
                StatusCode::UNAUTHORIZED,
                "rejected",
                "bad signature",
            ),
            (
                "body changed after signing",
                Forge::Forgejo,
                |_, b| {
                    b.extend_from_slice(b"\n");
                },
                StatusCode::UNAUTHORIZED,
                "rejected",
                "bad signature",
            ),
            (
                "bad signature (github)",
                Forge::GitHub,
                |h, _| {
                    set(
                        h,
                        "X-Hub-Signature-256",
                        Some(&format!("sha256={}", "0".repeat(64))),
                    );
                },
                StatusCode::UNAUTHORIZED,
                "rejected",
                "bad signature",
            ),
            (
                "github signature without sha256= prefix",
                Forge::GitHub,
                |h, b| {
                    let sig = sign(SECRET, b);
                    set(h, "X-Hub-Signature-256", Some(&sig));
                },
                StatusCode::UNAUTHORIZED,
                "rejected",
                "malformed signature",
            ),
            (
                "signature not hex",
                Forge::Gitea,
                |h, _| {
                    set(h, "X-Gitea-Signature", Some("not-hex"));
                },
                StatusCode::UNAUTHORIZED,
                "rejected",
                "malformed signature",
            ),
            (
                "truncated signature",
                Forge::Gitea,
                |h, b| {
                    let sig = sign(SECRET, b);
                    set(h, "X-Gitea-Signature", Some(&sig[..62]));
                },
                StatusCode::UNAUTHORIZED,
                "rejected",
                "bad signature",
            ),
            (
                "missing signature",
                Forge::Forgejo,
                |h, _| {
                    for name in [
                        "X-Forgejo-Signature",
                        "X-Gitea-Signature",
                        "X-Gogs-Signature",
                        "X-Hub-Signature-256",
                    ] {
                        set(h, name, None);
                    }
                },
                StatusCode::UNAUTHORIZED,
                "rejected",
                "missing signature",
            ),
            (
                "unsigned hook: empty signature headers",
                Forge::Forgejo,
                |h, _| {
                    set(h, "X-Forgejo-Signature", Some(""));
                    set(h, "X-Gitea-Signature", Some(""));
                    set(h, "X-Hub-Signature-256", Some("sha256="));
                },
                StatusCode::UNAUTHORIZED,
                "rejected",
                "missing signature",
            ),
            (
                "only legacy sha1 signature",
                Forge::GitHub,
                |h, _| {
                    set(h, "X-Hub-Signature-256", None);
                    set(
                        h,
                        "X-Hub-Signature",
                        Some("sha1=0000000000000000000000000000000000000000"),
                    );
                },
                StatusCode::UNAUTHORIZED,
                "rejected",
                "missing signature",
            ),
            (
                "form content type",
                Forge::Forgejo,
                |h, _| {
                    set(h, "Content-Type", Some("application/x-www-form-urlencoded"));
                },
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "rejected",
                "application/json",
            ),
            (
                "no content type",
                Forge::Forgejo,
                |h, _| {
                    set(h, "Content-Type", None);
                },
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "rejected",
                "application/json",
            ),
            (
                "ping event",
                Forge::Forgejo,
                |h, _| {
                    for name in ["X-Forgejo-Event", "X-Gitea-Event", "X-GitHub-Event"] {
                        set(h, name, Some("ping"));
                    }
                },
                StatusCode::OK,
                "ignored",
                r#""ping" is not a push"#,
            ),
            (
                "create event",
                Forge::Gitea,
                |h, _| {
                    set(h, "X-Gitea-Event", Some("create"));
                    set(h, "X-GitHub-Event", Some("create"));
                },
                StatusCode::OK,
                "ignored",
                r#""create" is not a push"#,
            ),
            (
                "push to another branch",
                Forge::Forgejo,
                |h, b| {
                    *b = push_body("refs/heads/dev");
                    let sig = sign(SECRET, b);
                    set(h, "X-Forgejo-Signature", Some(&sig));
                },
                StatusCode::OK,
                "ignored",
                "push to refs/heads/dev, watching refs/heads/main",
            ),
            (
                "push of a tag",
                Forge::GitHub,
                |h, b| {
                    *b = push_body("refs/tags/main");
                    let sig = format!("sha256={}", sign(SECRET, b));
                    set(h, "X-Hub-Signature-256", Some(&sig));
                },
                StatusCode::OK,
                "ignored",
                "push to refs/tags/main",
            ),
            (
                "signed but not JSON",
                Forge::Forgejo,
                |h, b| {
                    *b = b"payload=%7B%7D".to_vec();
                    let sig = sign(SECRET, b);
                    set(h, "X-Forgejo-Signature", Some(&sig));
                },
                StatusCode::BAD_REQUEST,
                "rejected",
                "not a push payload",
            ),
            (
                "signed JSON without ref",
                Forge::Forgejo,
                |h, b| {
                    *b = br#"{"zen": "hi"}"#.to_vec();
                    let sig = sign(SECRET, b);
                    set(h, "X-Forgejo-Signature", Some(&sig));
                },
                StatusCode::BAD_REQUEST,
                "rejected",
                "not a push payload",
            ),
            (
                "no delivery id",
                Forge::GitHub,
                |h, _| {
                    set(h, "X-GitHub-Delivery", None);
                },
                StatusCode::BAD_REQUEST,
                "rejected",
                "missing delivery id",
            ),
            (
                "no event header",
                Forge::GitHub,
                |h, _| {
                    set(h, "X-GitHub-Event", None);
                },
                StatusCode::BAD_REQUEST,
                "rejected",
                "missing event header",
            ),
        ];
        for (i, (name, forge, edit, want_code, want_status, want_reason)) in
            cases.into_iter().enumerate()
        {
            let state = enabled();
            let mut body = push_body(MAIN);
            let mut h = forge_headers(forge, "push", &uuid(200 + i as u32), &sign(SECRET, &body));
            edit(&mut h, &mut body);
            let (code, reply) = post_hook(&state, path_of(forge), &h, body).await;
            assert_eq!(
                (code, reply.status.as_str()),
                (want_code, want_status),
                "{name}: {reply:?}"
            );
            assert!(reply.reason.contains(want_reason), "{name}: {reply:?}");
            assert!(state.queue.take().is_empty(), "{name}: queued a run");
        }
    }

    #[tokio::test]
    async fn content_type_with_charset_is_json() {
        let state = enabled();
        let body = push_body(MAIN);
        let mut h = forge_headers(Forge::Forgejo, "push", &uuid(1), &sign(SECRET, &body));
        set(
            &mut h,
            "Content-Type",
            Some("Application/JSON; charset=utf-8"),
        );
        let (code, _) = post_hook(&state, "/hooks/forgejo", &h, body).await;
        assert_eq!(code, StatusCode::ACCEPTED);
    }

    #[tokio::test]
    async fn body_limit_is_one_mib() {
        // Exactly 1 MiB, signed: accepted. One byte more: 413, also when the
        // signature is right and whether or not Content-Length is sent.
        let mut exact = push_body(MAIN);
        exact.pop(); // the closing brace
        let pad = BODY_LIMIT - exact.len() - br#","pad":""}"#.len();
        exact.extend_from_slice(format!(r#","pad":"{}"}}"#, "x".repeat(pad)).as_bytes());
        assert_eq!(exact.len(), BODY_LIMIT);
        let mut over = exact.clone();
        over.insert(over.len() - 2, b'x');
        assert!(serde_json::from_slice::<serde_json::Value>(&over).is_ok());

        let state = enabled();
        let h = forge_headers(Forge::Forgejo, "push", &uuid(1), &sign(SECRET, &exact));
        let (code, reply) = post_hook(&state, "/hooks/forgejo", &h, exact).await;
        assert_eq!(code, StatusCode::ACCEPTED, "{reply:?}");
        assert_eq!(state.queue.take().len(), 1);

        for with_length in [false, true] {
            let mut h = forge_headers(Forge::Forgejo, "push", &uuid(2), &sign(SECRET, &over));
            if with_length {
                set(&mut h, "Content-Length", Some(&over.len().to_string()));
            }
            let (code, reply) = post_hook(&state, "/hooks/forgejo", &h, over.clone()).await;
            assert_eq!(
                code,
                StatusCode::PAYLOAD_TOO_LARGE,
                "content-length {with_length}: {reply:?}"
            );
            assert!(state.queue.take().is_empty());
        }
    }

    #[tokio::test]
    async fn streamed_body_over_the_limit_is_413() {
        // No size hint, no Content-Length: the limit holds while streaming.
        let body = Body::new(Chunks(
            (0..17)
                .map(|_| Bytes::from(vec![b' '; 64 * 1024]))
                .collect(),
        ));
        let req = HttpRequest::post("/hooks/forgejo")
            .header("content-type", "application/json")
            .header("x-forgejo-signature", "00")
            .body(body)
            .unwrap();
        let state = enabled();
        let resp = router(state.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    /// A body of chunks with no size hint, like a chunked upload.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl HttpBody for Chunks {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            std::task::Poll::Ready(self.0.pop_front().map(|c| Ok(http_body::Frame::data(c))))
        }
    }

    /// A body that never comes (a slow client holding its connection
    /// busy): cut at [`BODY_READ_TIMEOUT`] with `408` (time is paused: the
    /// test does not wait ten seconds).
    #[tokio::test(start_paused = true)]
    async fn a_webhook_body_that_never_ends_is_cut_at_the_read_timeout() {
        struct Never;
        impl HttpBody for Never {
            type Data = Bytes;
            type Error = std::io::Error;
            fn poll_frame(
                self: Pin<&mut Self>,
                _cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>>
            {
                std::task::Poll::Pending
            }
        }
        let req = HttpRequest::post("/hooks/forgejo")
            .header("content-type", "application/json")
            .body(Body::new(Never))
            .unwrap();
        let started = tokio::time::Instant::now();
        let resp = router(enabled()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(started.elapsed(), BODY_READ_TIMEOUT);
    }

    #[tokio::test]
    async fn replayed_delivery_is_ignored() {
        let state = enabled();
        let (code, _) = forgejo_push(&state, MAIN, &uuid(7)).await;
        assert_eq!(code, StatusCode::ACCEPTED);
        assert_eq!(state.queue.take().len(), 1);

        let (code, reply) = forgejo_push(&state, MAIN, &uuid(7)).await;
        assert_eq!(
            (code, reply.status.as_str()),
            (StatusCode::OK, "ignored"),
            "{reply:?}"
        );
        assert!(state.queue.take().is_empty());

        // The same delivery through another header variant is still a replay.
        let body = push_body(MAIN);
        let h = forge_headers(Forge::GitHub, "push", &uuid(7), &sign(SECRET, &body));
        let (code, _) = post_hook(&state, "/hooks/github", &h, body).await;
        assert_eq!(code, StatusCode::OK);
        assert!(state.queue.take().is_empty());

        // A rejected or ignored delivery does not burn its id.
        let body = push_body(MAIN);
        let h = forge_headers(Forge::Forgejo, "push", &uuid(8), &sign(b"wrong", &body));
        assert_eq!(
            post_hook(&state, "/hooks/forgejo", &h, body).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            forgejo_push(&state, "refs/heads/dev", &uuid(8)).await.0,
            StatusCode::OK
        );
        assert_eq!(
            forgejo_push(&state, MAIN, &uuid(8)).await.0,
            StatusCode::ACCEPTED
        );
    }

    #[test]
    fn recent_deliveries_forget_the_oldest_first() {
        let mut r = RecentDeliveries::new(3);
        assert!(r.insert("a") && r.insert("b") && r.insert("c"));
        assert!(!r.insert("a"));
        assert!(r.insert("d")); // evicts a
        assert!(r.insert("a")); // evicts b
        assert!(!r.insert("c") && !r.insert("d"));
        assert!(r.insert("b"));
        assert_eq!(r.order.len(), 3);
        assert_eq!(r.seen.len(), 3);
    }

    #[tokio::test]
    async fn a_burst_of_twenty_webhooks_is_one_batch() {
        let state = enabled();
        for n in 0..20 {
            let (code, reply) = forgejo_push(&state, MAIN, &uuid(1000 + n)).await;
            assert_eq!(code, StatusCode::ACCEPTED, "#{n}: {reply:?}");
        }
        assert_eq!(state.queue.take(), BTreeSet::from([Trigger::Webhook]));
        assert!(state.queue.take().is_empty());
    }

    #[tokio::test]
    async fn disabled_webhooks_are_404_and_reload_swaps_settings() {
        let state = state_with(None);
        let (code, reply) = forgejo_push(&state, MAIN, &uuid(1)).await;
        assert_eq!(
            (code, reply.status.as_str()),
            (StatusCode::NOT_FOUND, "rejected")
        );
        assert!(state.queue.take().is_empty());

        state.set_webhook(Some(WebhookConfig {
            secret: SECRET.to_vec(),
            git_ref: MAIN.into(),
        }));
        assert_eq!(
            forgejo_push(&state, MAIN, &uuid(2)).await.0,
            StatusCode::ACCEPTED
        );
        assert_eq!(state.queue.take().len(), 1);

        // New secret and ref: the old secret no longer verifies.
        state.set_webhook(Some(WebhookConfig {
            secret: b"rotated".to_vec(),
            git_ref: "refs/heads/prod".into(),
        }));
        assert_eq!(
            forgejo_push(&state, "refs/heads/prod", &uuid(3)).await.0,
            StatusCode::UNAUTHORIZED
        );
        let body = push_body("refs/heads/prod");
        let h = forge_headers(Forge::Forgejo, "push", &uuid(4), &sign(b"rotated", &body));
        assert_eq!(
            post_hook(&state, "/hooks/forgejo", &h, body).await.0,
            StatusCode::ACCEPTED
        );
        assert_eq!(state.queue.take().len(), 1);

        state.set_webhook(None);
        assert_eq!(
            forgejo_push(&state, MAIN, &uuid(5)).await.0,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn webhook_config_debug_hides_the_secret() {
        let c = WebhookConfig {
            secret: b"hunter2".to_vec(),
            git_ref: MAIN.into(),
        };
        let s = format!("{c:?}");
        assert!(
            !s.contains("hunter2") && !s.contains("104") && s.contains(MAIN),
            "{s}"
        );
    }

    fn ready_snapshot() -> StatusSnapshot {
        StatusSnapshot {
            host: "nas".into(),
            source: "https://git.lan/ops/homelab.git".into(),
            reference: "main".into(),
            fetched_revision: Some("bffeb74224043ba2feb48d137756c8a9331c449a".into()),
            applied_revision: Some("bffeb74224043ba2feb48d137756c8a9331c449a".into()),
            last_good_revision: Some("bffeb74224043ba2feb48d137756c8a9331c449a".into()),
            last_run: Some(RunRecord {
                started_ms: 1_718_010_000_000,
                finished_ms: 1_718_010_001_500,
                trigger: "webhook".into(),
                revision: "bffeb74224043ba2feb48d137756c8a9331c449a".into(),
                counts: RunCounts {
                    changed: 1,
                    unchanged: 9,
                    ..RunCounts::default()
                },
                result: RunResult::Success,
                error: None,
                targets: Vec::new(),
            }),
            ..StatusSnapshot::default()
        }
    }

    #[tokio::test]
    async fn probes_and_status() {
        let state = enabled();
        let get = |path: &'static str| {
            let state = state.clone();
            async move {
                let (code, body) = send(&state, Method::GET, path, &[], Vec::new()).await;
                (code, String::from_utf8(body).unwrap())
            }
        };

        assert_eq!(get("/healthz").await, (StatusCode::OK, "ok".to_string()));

        // Nothing applied yet: not ready.
        let (code, text) = get("/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(text, "no revision fetched and applied yet");

        *state.status.write().unwrap() = ready_snapshot();
        assert_eq!(get("/readyz").await, (StatusCode::OK, "ready".to_string()));

        // A refused newest revision: 503 with the reason.
        state.status.write().unwrap().refused = Some(Refusal {
            stage: "signature".into(),
            revision: Some("deadbeef".into()),
            error: "commit is not signed by a trusted key".into(),
            cause: Default::default(),
        });
        let (code, text) = get("/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            text,
            state
                .status
                .read()
                .unwrap()
                .ready()
                .unwrap_err()
                .to_string()
        );
        assert!(
            text.contains("signature of deadbeef") && text.contains("not signed"),
            "{text}"
        );

        // /api/status round-trips.
        let (code, text) = get("/api/status").await;
        assert_eq!(code, StatusCode::OK);
        let back: StatusSnapshot = serde_json::from_str(&text).unwrap();
        assert_eq!(back, *state.status.read().unwrap());
    }

    #[tokio::test]
    async fn a_stuck_run_makes_readyz_fail() {
        let state = enabled();
        *state.status.write().unwrap() = ready_snapshot();
        state.status.write().unwrap().stuck = Some(super::super::status::StuckRun {
            trigger: "webhook".into(),
            budget_secs: 900,
        });
        let (code, body) = send(&state, Method::GET, "/readyz", &[], Vec::new()).await;
        let body = String::from_utf8(body).unwrap();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("a run (webhook) is stuck") && body.contains("900 s"),
            "{body}"
        );
    }

    /// With `api_token_file`: `/api/status` and `/metrics` need the token,
    /// the probes do not, and `/readyz` keeps its reason for them.
    #[tokio::test]
    async fn the_api_token_guards_status_and_metrics_only() {
        let token = "t0ken-of-at-least-thirty-two-bytes-x";
        let state = enabled();
        state.set_metrics(Arc::new(Metrics::new("lab")));
        state.set_api_token(Some(token.as_bytes().to_vec()));
        state.status.write().unwrap().refused = Some(Refusal {
            stage: "validate".into(),
            revision: Some("deadbeef".into()),
            error: "modules/app/module.yaml:3: secret layout".into(),
            cause: Default::default(),
        });
        let bearer = format!("Bearer {token}");
        for path in ["/api/status", "/metrics"] {
            for (auth, want) in [
                (None, StatusCode::UNAUTHORIZED),
                (Some("Bearer wrong"), StatusCode::UNAUTHORIZED),
                (Some(token), StatusCode::UNAUTHORIZED),
                (Some(bearer.as_str()), StatusCode::OK),
            ] {
                let headers: Vec<(String, String)> = auth
                    .map(|a| ("authorization".to_string(), a.to_string()))
                    .into_iter()
                    .collect();
                let (code, body) = send(&state, Method::GET, path, &headers, Vec::new()).await;
                assert_eq!(code, want, "{path} {headers:?}");
                if code == StatusCode::UNAUTHORIZED {
                    let body = String::from_utf8(body).unwrap();
                    assert!(!body.contains("deadbeef"), "{body}");
                }
            }
        }
        let (code, _) = send(&state, Method::GET, "/healthz", &[], Vec::new()).await;
        assert_eq!(code, StatusCode::OK);
        let (code, body) = send(&state, Method::GET, "/readyz", &[], Vec::new()).await;
        let body = String::from_utf8(body).unwrap();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            !body.contains("secret layout") && body.contains("not ready"),
            "{body}"
        );
        state.set_api_token(None);
        let (code, _) = send(&state, Method::GET, "/api/status", &[], Vec::new()).await;
        assert_eq!(code, StatusCode::OK);
    }

    /// Slowloris: far more slow clients than the listener takes, each
    /// sending half a request head. `/healthz` still answers at once (the
    /// oldest idle connections make room), the open connections stay at the
    /// bound, and a client that sends nothing is dropped after the header
    /// timeout.
    #[tokio::test]
    async fn slow_and_many_clients_do_not_starve_healthz() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 8,
            header_read_timeout: Duration::from_millis(400),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, enabled(), limits, async {
            let _ = stopped.await;
        }));
        let mut slow = Vec::new();
        for _ in 0..100 {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .unwrap();
            slow.push(c);
        }
        let started = std::time::Instant::now();
        let healthz = async {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = Vec::new();
            c.read_to_end(&mut out).await.unwrap();
            String::from_utf8(out).unwrap()
        };
        let answer = tokio::time::timeout(Duration::from_secs(2), healthz)
            .await
            .expect("/healthz answered under a slowloris crowd");
        assert!(
            answer.starts_with("HTTP/1.1 200 ") && answer.ends_with("ok"),
            "{answer}"
        );
        eprintln!("/healthz under 100 slow clients: {:?}", started.elapsed());
        // The crowd was closed down to the bound: count the server-closed ones.
        let mut closed = 0;
        for c in &mut slow {
            let mut buf = [0u8; 256];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(5), c.read(&mut buf)).await
            {
                closed += 1;
            }
        }
        assert!(
            closed >= 100 - limits.max_connections,
            "only {closed} of 100 slow clients closed"
        );

        // A silent client is dropped once the header timeout passes.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buf))
            .await
            .expect("closed by the header timeout")
            .unwrap_or(0);
        let _ = n;
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn metrics_are_served_in_the_format_asked_for() {
        let state = enabled();
        let (code, _) = send(&state, Method::GET, "/metrics", &[], Vec::new()).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "no metrics set yet");
        state.set_metrics(Arc::new(Metrics::new("lab")));
        let get = |accept: Option<&'static str>| {
            let state = state.clone();
            async move {
                let mut req = HttpRequest::builder().method(Method::GET).uri("/metrics");
                if let Some(a) = accept {
                    req = req.header("Accept", a);
                }
                let resp = router(state)
                    .oneshot(req.body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                let ct = resp.headers()[header::CONTENT_TYPE]
                    .to_str()
                    .unwrap()
                    .to_string();
                let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
                    .await
                    .unwrap();
                (ct, String::from_utf8(body.to_vec()).unwrap())
            }
        };
        let (ct, body) = get(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        ))
        .await;
        assert_eq!(ct, crate::telemetry::metrics::OPENMETRICS_CONTENT_TYPE);
        assert!(body.ends_with("# EOF\n"), "{body}");
        for accept in [None, Some("text/plain"), Some("*/*")] {
            let (ct, body) = get(accept).await;
            assert_eq!(
                ct,
                crate::telemetry::metrics::PROMETHEUS_CONTENT_TYPE,
                "{accept:?}"
            );
            assert!(!body.contains("# EOF"), "{body}");
            assert!(
                body.contains("# TYPE homelab_agent_runs_total counter\n"),
                "{body}"
            );
        }
    }

    #[tokio::test]
    async fn unknown_routes_and_methods() {
        let state = enabled();
        for (method, path, want) in [
            (Method::GET, "/", StatusCode::NOT_FOUND),
            (Method::GET, "/hooks/bitbucket", StatusCode::NOT_FOUND),
            (Method::POST, "/hooks/forgejo/extra", StatusCode::NOT_FOUND),
            (Method::GET, "/api/status/x", StatusCode::NOT_FOUND),
            (
                Method::GET,
                "/hooks/forgejo",
                StatusCode::METHOD_NOT_ALLOWED,
            ),
            (Method::POST, "/healthz", StatusCode::METHOD_NOT_ALLOWED),
        ] {
            let (code, _) = send(&state, method.clone(), path, &[], Vec::new()).await;
            assert_eq!(code, want, "{method} {path}");
        }
        assert!(state.queue.take().is_empty());
    }

    /// Real HTTP over TCP: bind, serve, send raw HTTP/1.1, shut down.
    #[tokio::test]
    async fn serves_real_http_and_shuts_down_gracefully() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = enabled();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state.clone(), Limits::default(), async {
            let _ = stopped.await;
        }));

        async fn raw(addr: SocketAddr, request: Vec<u8>) -> String {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            conn.write_all(&request).await.unwrap();
            let mut out = Vec::new();
            conn.read_to_end(&mut out).await.unwrap();
            String::from_utf8(out).unwrap()
        }

        let body = push_body(MAIN);
        let mut request = format!(
            "POST /hooks/forgejo HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             X-Forgejo-Delivery: {}\r\nX-Forgejo-Event: push\r\nX-Forgejo-Signature: {}\r\n\r\n",
            body.len(),
            uuid(1),
            sign(SECRET, &body)
        )
        .into_bytes();
        request.extend_from_slice(&body);
        let response = raw(addr, request).await;
        assert!(response.starts_with("HTTP/1.1 202 "), "{response}");
        assert!(
            response.ends_with(r#"{"status":"accepted","reason":"run queued"}"#),
            "{response}"
        );
        assert_eq!(state.queue.take(), BTreeSet::from([Trigger::Webhook]));

        // Content-Length over the limit: refused before the body is read.
        let response = raw(
            addr,
            format!(
                "POST /hooks/gitea HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                BODY_LIMIT + 1
            )
            .into_bytes(),
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 413 "), "{response}");

        let response = raw(
            addr,
            format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .into_bytes(),
        )
        .await;
        assert!(
            response.starts_with("HTTP/1.1 200 ") && response.ends_with("\r\n\r\nok"),
            "{response}"
        );

        stop.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("server stops after shutdown")
            .unwrap()
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "listener closed"
        );
    }
}
