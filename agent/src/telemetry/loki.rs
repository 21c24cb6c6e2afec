//! Ships [`Event`]s to Loki's push API (`POST /loki/api/v1/push`), or to a
//! server that accepts it (VictoriaLogs: `/insert/loki/api/v1/push`).
//!
//! Two wire formats (`loki.format`): `protobuf` (the default; Loki's native
//! `logproto.PushRequest`, snappy block-compressed, `Content-Type:
//! application/x-protobuf`, as Promtail and Alloy send) and `json`.
//!
//! # Expected flow
//! [`Shipper::push`] serialises the event and appends it to a bounded
//! in-memory queue (never blocks, never fails). One background thread takes
//! up to `batch_size` events once the batch is full or its oldest event has
//! waited `batch_wait`, groups them into streams
//! `{job="homelab-agent", host, event}` (entries in time order) and posts
//! them.
//!
//! # Guarantees
//! - Reconciliation never waits for Loki: pushing takes a mutex for a
//!   queue append.
//! - Memory is bounded: at most `max_buffered_events` events are held
//!   (queued plus in flight); when Loki is slow or down the oldest queued
//!   event is dropped and counted (`queue_full`).
//! - 204/2xx: sent. 400: Loki stored what it could and says what it
//!   ignored; the batch is never resent (the ignored entries are counted as
//!   `rejected`). 413: the batch is split in halves. 429, 5xx and network
//!   errors: retried with exponential backoff (500 ms doubling, jittered,
//!   capped at `max_backoff`) up to `max_retries`; a `Retry-After` on 429
//!   or 503 (seconds or an HTTP date) lengthens the wait to what the server
//!   asked, still capped at `max_backoff`; then dropped and counted
//!   (`retries_exhausted`). Other 4xx (401, 403, 404): dropped, counted as
//!   `rejected`, logged with what to fix.
//! - Timestamps are strictly increasing per process, so entries are ordered
//!   within every stream and no two are equal (Loki drops exact repeats).
//! - At least once: a batch whose answer is lost (a timeout after the server
//!   stored it) is resent as it was; Loki drops the repeats, VictoriaLogs
//!   keeps them (tests/tests/loki_victorialogs.rs).
//!
//! # Assumptions
//! Loki (or the proxy in front) accepts the configured format;
//! `X-Scope-OrgID` is sent when `tenant` is set; basic auth when
//! `username` is set. No proxies, no redirects. The password is read once,
//! from a file only its owner can read; it is never logged.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::events::{Event, EventKind};
use super::metrics::Metrics;
use crate::config::{LokiConfig, LokiFormat};

/// The `job` label of every stream.
pub const JOB: &str = "homelab-agent";

/// First retry delay.
const MIN_BACKOFF: Duration = Duration::from_millis(500);

/// Errors starting the shipper (config problems; sending never errors).
#[derive(Debug, thiserror::Error)]
pub enum LokiError {
    #[error("loki.password_file: {0}")]
    Password(crate::config::CredentialError),
    #[error("cannot start the Loki shipper: {0}")]
    Start(std::io::Error),
}

struct Queued {
    event: EventKind,
    ts_ns: u128,
    line: String,
    enqueued: Instant,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Queued>,
    in_flight: usize,
    last_ts: u128,
    stop: bool,
    done: bool,
}

struct Inner {
    config: LokiConfig,
    host: String,
    password: Option<String>,
    metrics: Arc<Metrics>,
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish_depth(&self, q: &Queue) {
        self.metrics.loki_queued(q.events.len() + q.in_flight);
    }
}

/// The background shipper. Dropping it asks the thread to send what is
/// queued and stop (without waiting); [`Shipper::shutdown`] waits.
pub struct Shipper {
    inner: Arc<Inner>,
}

impl Shipper {
    /// Reads the password file (if any) and starts the thread.
    pub fn start(
        config: &LokiConfig,
        host: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Shipper, LokiError> {
        let password = match &config.password_file {
            None => None,
            Some(path) => {
                let bytes = crate::config::read_private_file(path, "Loki password file")
                    .map_err(LokiError::Password)?;
                Some(String::from_utf8(bytes).map_err(|_| {
                    LokiError::Password(crate::config::CredentialError::NotText {
                        what: "Loki password file",
                        path: path.clone(),
                    })
                })?)
            }
        };
        let inner = Arc::new(Inner {
            config: config.clone(),
            host: host.to_string(),
            password,
            metrics,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let worker = inner.clone();
        std::thread::Builder::new()
            .name("loki-shipper".into())
            .spawn(move || run(&worker))
            .map_err(LokiError::Start)?;
        Ok(Shipper { inner })
    }

    /// Queues an event; drops the oldest queued one when full.
    pub fn push(&self, event: &Event) {
        self.push_all(std::slice::from_ref(event));
    }

    /// Queues a run's events together (one lock, one wake-up of the
    /// thread), dropping the oldest queued ones when full: which events
    /// are dropped does not depend on how fast the thread takes a batch.
    pub fn push_all(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let lines: Vec<(EventKind, u128, String)> = events
            .iter()
            .map(|e| (e.event, e.at_ns, e.line()))
            .collect();
        let mut q = self.inner.lock();
        let cap = self.inner.config.max_buffered_events;
        let mut dropped = 0;
        for (event, at_ns, line) in lines {
            let ts_ns = at_ns.max(q.last_ts + 1);
            q.last_ts = ts_ns;
            while q.events.len() + q.in_flight >= cap {
                if q.events.pop_front().is_none() {
                    break;
                }
                dropped += 1;
            }
            if q.events.len() + q.in_flight >= cap {
                // Everything held is in flight: this one cannot be kept.
                dropped += 1;
            } else {
                q.events.push_back(Queued {
                    event,
                    ts_ns,
                    line,
                    enqueued: Instant::now(),
                });
            }
        }
        if dropped > 0 {
            self.inner.metrics.loki_dropped("queue_full", dropped);
        }
        self.inner.publish_depth(&q);
        drop(q);
        self.inner.wake.notify_all();
    }

    /// Events queued or in flight.
    pub fn pending(&self) -> usize {
        let q = self.inner.lock();
        q.events.len() + q.in_flight
    }

    /// Sends what is queued (no more waiting for batches to fill, no
    /// backoff sleeps) and stops; waits at most `limit`. Returns whether
    /// the thread finished in time.
    pub fn shutdown(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut q = self.inner.lock();
        q.stop = true;
        self.inner.wake.notify_all();
        while !q.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = self
                .inner
                .wake
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.inner.lock().stop = true;
        self.inner.wake.notify_all();
    }
}

/// The thread: batch, send, repeat; exit when stopped and empty.
fn run(inner: &Inner) {
    crate::source::git::install_tls_provider();
    let client = reqwest::blocking::Client::builder()
        .timeout(inner.config.timeout)
        .connect_timeout(inner.config.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build();
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "loki: cannot set up the HTTP client; events are not sent");
            let mut q = inner.lock();
            q.done = true;
            inner.wake.notify_all();
            return;
        }
    };
    while let Some(batch) = next_batch(inner) {
        send(inner, &client, batch);
        let mut q = inner.lock();
        q.in_flight = 0;
        inner.publish_depth(&q);
    }
    let mut q = inner.lock();
    q.done = true;
    inner.wake.notify_all();
}

/// Waits for a full batch, a batch that waited long enough, or stop.
/// `None`: stopped with nothing left.
fn next_batch(inner: &Inner) -> Option<Vec<Queued>> {
    let mut q = inner.lock();
    loop {
        let Some(oldest) = q.events.front().map(|e| e.enqueued) else {
            if q.stop {
                return None;
            }
            q = inner.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let waited = oldest.elapsed();
        if q.stop || q.events.len() >= inner.config.batch_size || waited >= inner.config.batch_wait
        {
            let n = q.events.len().min(inner.config.batch_size);
            let batch: Vec<Queued> = q.events.drain(..n).collect();
            q.in_flight = batch.len();
            inner.publish_depth(&q);
            return Some(batch);
        }
        q = inner
            .wake
            .wait_timeout(q, inner.config.batch_wait - waited)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// One stream per event kind, entries in time order: what both formats send.
fn streams<'a>(batch: &[(EventKind, u128, &'a str)]) -> BTreeMap<EventKind, Vec<(u128, &'a str)>> {
    let mut streams: BTreeMap<EventKind, Vec<(u128, &str)>> = BTreeMap::new();
    for (event, ts, line) in batch {
        streams.entry(*event).or_default().push((*ts, line));
    }
    for values in streams.values_mut() {
        values.sort_by_key(|(ts, _)| *ts);
    }
    streams
}

/// The JSON push body: one stream per event kind, entries in time order.
pub fn push_body(host: &str, batch: &[(EventKind, u128, &str)]) -> String {
    let streams: Vec<serde_json::Value> = streams(batch)
        .into_iter()
        .map(|(event, values)| {
            serde_json::json!({
                "stream": {"job": JOB, "host": host, "event": event.name()},
                "values": values
                    .into_iter()
                    .map(|(ts, line)| [ts.to_string(), line.to_string()])
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({ "streams": streams }).to_string()
}

/// Loki's `logproto` push messages (pkg/push/push.proto), the fields a
/// client sends; derived by hand so no protoc is needed to build.
pub mod logproto {
    /// `logproto.PushRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        #[prost(message, repeated, tag = "1")]
        pub streams: Vec<Stream>,
    }

    /// `logproto.StreamAdapter`: labels in Prometheus text form.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Stream {
        #[prost(string, tag = "1")]
        pub labels: String,
        #[prost(message, repeated, tag = "2")]
        pub entries: Vec<Entry>,
    }

    /// `logproto.EntryAdapter`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Entry {
        #[prost(message, optional, tag = "1")]
        pub timestamp: Option<Timestamp>,
        #[prost(string, tag = "2")]
        pub line: String,
    }

    /// `google.protobuf.Timestamp`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Timestamp {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

/// A label value in Prometheus text form: quoted; quote, backslash and
/// newline escaped.
fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The protobuf push message (before compression), same streams as
/// [`push_body`]; labels sorted by name, as Loki keeps them.
pub fn push_request(host: &str, batch: &[(EventKind, u128, &str)]) -> logproto::PushRequest {
    logproto::PushRequest {
        streams: streams(batch)
            .into_iter()
            .map(|(event, values)| logproto::Stream {
                labels: format!(
                    "{{event={}, host={}, job={}}}",
                    label_value(event.name()),
                    label_value(host),
                    label_value(JOB)
                ),
                entries: values
                    .into_iter()
                    .map(|(ts, line)| logproto::Entry {
                        timestamp: Some(logproto::Timestamp {
                            seconds: (ts / 1_000_000_000) as i64,
                            nanos: (ts % 1_000_000_000) as i32,
                        }),
                        line: line.to_string(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The protobuf push body: [`push_request`] encoded, snappy block format.
pub fn push_body_protobuf(host: &str, batch: &[(EventKind, u128, &str)]) -> Vec<u8> {
    let bytes = prost::Message::encode_to_vec(&push_request(host, batch));
    // Snappy cannot fail on input this small (its limit is ~4 GiB); an
    // error would only come from a bug, and an empty body is then refused
    // (400) and counted rather than panicking in the shipper thread.
    snap::raw::Encoder::new()
        .compress_vec(&bytes)
        .unwrap_or_default()
}

/// How Loki answered one push.
enum Answer {
    Sent,
    /// 400: Loki ignored this many entries (the rest were stored).
    PartlyRejected(u64, String),
    TooLarge,
    /// 429, 5xx, timeouts, connection errors; with the server's
    /// `Retry-After` (429 and 503) when it gave one.
    Retry(String, Option<Duration>),
    /// 401, 403, 404, ...: a config problem.
    Refused(u16, String),
}

fn post(inner: &Inner, client: &reqwest::blocking::Client, batch: &[Queued]) -> Answer {
    let entries: Vec<(EventKind, u128, &str)> = batch
        .iter()
        .map(|q| (q.event, q.ts_ns, q.line.as_str()))
        .collect();
    let req = client.post(&inner.config.push_url);
    // Protobuf goes without Content-Encoding: snappy is implied (Loki's
    // protocol, as Promtail sends it).
    let mut req = match inner.config.format {
        LokiFormat::Protobuf => req
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .body(push_body_protobuf(&inner.host, &entries)),
        LokiFormat::Json => req
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(push_body(&inner.host, &entries)),
    };
    if let Some(tenant) = &inner.config.tenant {
        req = req.header("X-Scope-OrgID", tenant);
    }
    if let (Some(user), Some(password)) = (&inner.config.username, &inner.password) {
        req = req.basic_auth(user, Some(password));
    }
    let resp = match req.send() {
        Ok(r) => r,
        Err(e) => {
            let why = if e.is_timeout() {
                "timed out".to_string()
            } else if e.is_connect() {
                "cannot connect".to_string()
            } else {
                e.without_url().to_string()
            };
            return Answer::Retry(why, None);
        }
    };
    let status = resp.status().as_u16();
    let retry_after = match status {
        429 | 503 => resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, std::time::SystemTime::now())),
        _ => None,
    };
    // Loki's error bodies are short plain text; read at most 4 KiB of it.
    let text = {
        use std::io::Read;
        let mut buf = Vec::new();
        let _ = resp.take(4096).read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).trim().to_string()
    };
    match status {
        200..=299 => Answer::Sent,
        400 => {
            let ignored = ignored_count(&text).unwrap_or(batch.len() as u64);
            Answer::PartlyRejected(ignored.min(batch.len() as u64), first_line(&text))
        }
        413 => Answer::TooLarge,
        429 | 500..=599 => {
            Answer::Retry(format!("HTTP {status}: {}", first_line(&text)), retry_after)
        }
        _ => Answer::Refused(status, first_line(&text)),
    }
}

fn first_line(text: &str) -> String {
    super::events::truncate(text.lines().next().unwrap_or(""))
        .chars()
        .take(300)
        .collect()
}

/// A `Retry-After` value: delay-seconds or an HTTP date (RFC 9110 10.2.3).
/// `None` when it is neither; a date in the past is no wait.
pub fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form servers send.
fn httpdate(s: &str) -> Option<std::time::SystemTime> {
    let rest = s.split_once(", ")?.1;
    let mut parts = rest.split(' ');
    let day: u64 = parts.next()?.parse().ok()?;
    let month = parts.next()?;
    let year: i64 = parts.next()?.parse().ok()?;
    let time = parts.next()?;
    if parts.next()? != "GMT" || parts.next().is_some() {
        return None;
    }
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == month)? as i64
        + 1;
    let mut hms = time.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some() || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days.checked_mul(86_400)? + (h * 3600 + m * 60 + sec) as i64;
    let secs = u64::try_from(secs).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Sums Loki's "total ignored: N out of M" counts in a 400 body.
pub fn ignored_count(body: &str) -> Option<u64> {
    let mut total = None;
    for part in body.split("total ignored: ").skip(1) {
        let n: u64 = part
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())?;
        total = Some(total.unwrap_or(0) + n);
    }
    total
}

/// Sends one batch with retries; accounts for every event in it.
fn send(inner: &Inner, client: &reqwest::blocking::Client, batch: Vec<Queued>) {
    let n = batch.len() as u64;
    let mut attempt = 0u32;
    let mut backoff = MIN_BACKOFF;
    loop {
        match post(inner, client, &batch) {
            Answer::Sent => {
                inner.metrics.loki_sent(n);
                return;
            }
            Answer::PartlyRejected(ignored, why) => {
                tracing::warn!(events = n, ignored, reason = %why, "loki: push rejected (400); the batch is not resent");
                inner.metrics.loki_sent(n - ignored);
                inner.metrics.loki_dropped("rejected", ignored);
                return;
            }
            Answer::TooLarge if batch.len() > 1 => {
                let mut first = batch;
                let second = first.split_off(first.len() / 2);
                send(inner, client, first);
                send(inner, client, second);
                return;
            }
            Answer::TooLarge => {
                tracing::warn!("loki: one event is larger than Loki accepts (413); dropped");
                inner.metrics.loki_dropped("rejected", n);
                return;
            }
            Answer::Refused(status, why) => {
                let hint = match status {
                    401 => "; set loki.tenant (X-Scope-OrgID) or check loki.username/password_file",
                    403 => "; check loki.username and loki.password_file",
                    404 => "; check loki.url (the push path /loki/api/v1/push is added)",
                    _ => "",
                };
                tracing::warn!(status, reason = %why, events = n, "loki: push refused{hint}");
                inner.metrics.loki_dropped("rejected", n);
                return;
            }
            Answer::Retry(why, retry_after) => {
                attempt += 1;
                if attempt > inner.config.max_retries {
                    tracing::warn!(events = n, attempts = attempt, reason = %why, "loki: giving up on a batch");
                    inner.metrics.loki_dropped("retries_exhausted", n);
                    return;
                }
                tracing::debug!(attempt, reason = %why, retry_after = ?retry_after, "loki: push failed; retrying");
                let jitter = 0.8 + fastrand::f64() * 0.4;
                // The server's Retry-After, when longer than our own backoff,
                // bounded by max_backoff (a server asking for an hour does
                // not stall the queue for an hour).
                let wait = backoff
                    .mul_f64(jitter)
                    .max(retry_after.unwrap_or(Duration::ZERO))
                    .min(inner.config.max_backoff);
                let q = inner.lock();
                if !q.stop {
                    // Woken early by shutdown: retry at once.
                    let _ = inner.wake.wait_timeout_while(q, wait, |q| !q.stop);
                }
                backoff = (backoff * 2).min(inner.config.max_backoff);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_groups_streams_and_orders_entries() {
        let body = push_body(
            "nas",
            &[
                (EventKind::Drift, 30, "{\"a\":3}"),
                (EventKind::Apply, 10, "{\"a\":1}"),
                (EventKind::Drift, 20, "{\"a\":2}"),
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let streams = v["streams"].as_array().unwrap();
        assert_eq!(streams.len(), 2);
        assert_eq!(
            streams[0]["stream"],
            serde_json::json!({"job": "homelab-agent", "host": "nas", "event": "apply"})
        );
        assert_eq!(
            streams[1]["values"],
            serde_json::json!([["20", "{\"a\":2}"], ["30", "{\"a\":3}"]])
        );
    }

    #[test]
    fn the_protobuf_body_is_snappy_compressed_logproto_with_the_same_streams() {
        let batch = [
            (EventKind::Drift, 1_700_000_000_000_000_030, "{\"a\":3}"),
            (EventKind::Apply, 1_700_000_000_000_000_010, "{\"a\":1}"),
            (EventKind::Drift, 1_700_000_001_000_000_020, "{\"a\":2}"),
        ];
        let body = push_body_protobuf("n\"a\\s", &batch);
        let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
        let req: logproto::PushRequest = prost::Message::decode(raw.as_slice()).unwrap();
        assert_eq!(req, push_request("n\"a\\s", &batch));
        let labels: Vec<&str> = req.streams.iter().map(|s| s.labels.as_str()).collect();
        assert_eq!(
            labels,
            [
                r#"{event="apply", host="n\"a\\s", job="homelab-agent"}"#,
                r#"{event="drift", host="n\"a\\s", job="homelab-agent"}"#,
            ]
        );
        let drift: Vec<(i64, i32, &str)> = req.streams[1]
            .entries
            .iter()
            .map(|e| {
                let t = e.timestamp.as_ref().unwrap();
                (t.seconds, t.nanos, e.line.as_str())
            })
            .collect();
        assert_eq!(
            drift,
            [
                (1_700_000_000, 30, "{\"a\":3}"),
                (1_700_000_001, 20, "{\"a\":2}")
            ]
        );
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let check = |v: &str| retry_after(v, now);
        assert_eq!(check("120"), Some(Duration::from_secs(120)));
        assert_eq!(check(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            check("Sun, 06 Nov 1994 08:49:47 GMT"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            check("Mon, 07 Nov 1994 08:49:37 GMT"),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(check("Sun, 06 Nov 1994 08:00:00 GMT"), Some(Duration::ZERO));
        for bad in [
            "",
            "-1",
            "1.5",
            "soon",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Foo 1994 08:49:37 GMT",
        ] {
            assert_eq!(check(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ignored_counts_are_summed_from_a_400_body() {
        let body = "entry with timestamp 2024-06-10 ignored, reason: 'entry too far behind', user 'fake', total ignored: 1 out of 2 for stream: {event=\"apply\"}\nentry ... total ignored: 3 out of 3 for stream: {event=\"drift\"}";
        assert_eq!(ignored_count(body), Some(4));
        assert_eq!(ignored_count("invalid labels"), None);
    }
}
