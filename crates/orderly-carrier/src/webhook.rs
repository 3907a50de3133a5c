//! A tiny webhook receiver for tests: it records every POST (path, headers,
//! body and the status it answered), can be told to fail the first N
//! requests or to fail during a window (`503`), and lets a test wait for a
//! number of deliveries with a deadline instead of sleeping.

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use std::collections::VecDeque;
use std::io;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The most deliveries kept; older ones are dropped (they are still counted).
pub const DELIVERIES_MAX: usize = 10_000;
/// The largest webhook body accepted.
pub const WEBHOOK_BODY_BYTES_MAX: usize = 1024 * 1024;

/// How a receiver starts out behaving.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// Answer `503` to the first this many POSTs.
    pub fail_first: u32,
    /// Answer `503` during this window, measured from the start of the receiver.
    pub fail_window: Option<FailWindow>,
}

/// A window `[start + after, start + after + duration)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailWindow {
    /// Delay from the receiver's start to the window's start.
    pub after: Duration,
    /// Length of the window.
    pub duration: Duration,
}

/// One recorded POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// 1-based position among all POSTs the receiver got.
    pub attempt: u64,
    /// Path and query, e.g. `/hooks/orders`.
    pub path: String,
    /// Headers in arrival order, names lower-cased (non-UTF-8 values lossily decoded).
    pub headers: Vec<(String, String)>,
    /// The raw body (empty if it exceeded [`WEBHOOK_BODY_BYTES_MAX`]).
    pub body: Vec<u8>,
    /// The status the receiver answered.
    pub status: u16,
    /// Milliseconds from the receiver's start to this POST.
    pub received_ms: u64,
}

impl Delivery {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether the receiver answered `2xx`.
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// A wait for deliveries that reached its deadline first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("waited for {wanted} deliveries, saw {seen}")]
pub struct WaitTimeout {
    /// How many were awaited.
    pub wanted: u64,
    /// How many had arrived at the deadline.
    pub seen: u64,
}

/// Starts a receiver on `127.0.0.1` with a free port; returns its base URL
/// (no trailing slash; any path is accepted) and a handle to inspect and steer it.
pub async fn spawn_receiver(config: ReceiverConfig) -> io::Result<(String, ReceiverHandle)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let started = Instant::now();
    let window = config.fail_window.map(|w| (started + w.after, started + w.after + w.duration));
    let inner =
        Inner { deliveries: VecDeque::new(), fail_remaining: config.fail_first, window, counts: Counts::default() };
    let (counts, _) = watch::channel(Counts::default());
    let shared = Arc::new(Shared { inner: Mutex::new(inner), counts, started });
    let app = Router::new()
        .fallback(record)
        .layer(DefaultBodyLimit::max(WEBHOOK_BODY_BYTES_MAX))
        .with_state(Arc::clone(&shared));
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        // Either a send or the sender's drop means stop.
        let _ = stopped.await;
    };
    let task = tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await });
    Ok((url, ReceiverHandle { shared, stop: Some(stop), task: Some(task) }))
}

/// Inspects and steers a running receiver; dropping it stops the server.
#[derive(Debug)]
pub struct ReceiverHandle {
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl ReceiverHandle {
    /// Every recorded POST (the latest [`DELIVERIES_MAX`]), oldest first.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.shared.lock().deliveries.iter().cloned().collect()
    }

    /// The recorded POSTs that were answered `2xx`, oldest first.
    pub fn accepted(&self) -> Vec<Delivery> {
        self.shared.lock().deliveries.iter().filter(|d| d.accepted()).cloned().collect()
    }

    /// How many POSTs arrived, and how many of them were accepted.
    pub fn counts(&self) -> (u64, u64) {
        let counts = self.shared.lock().counts;
        (counts.received, counts.accepted)
    }

    /// Answers `503` to the next `count` POSTs.
    pub fn fail_next(&self, count: u32) {
        self.shared.lock().fail_remaining = count;
    }

    /// Answers `503` to every POST from now for `duration`.
    pub fn fail_for(&self, duration: Duration) {
        let now = Instant::now();
        self.shared.lock().window = Some((now, now + duration));
    }

    /// Accepts every POST from now on.
    pub fn recover(&self) {
        let mut inner = self.shared.lock();
        inner.fail_remaining = 0;
        inner.window = None;
    }

    /// Waits until at least `count` POSTs were received, for at most `timeout`.
    pub async fn wait_for_received(&self, count: u64, timeout: Duration) -> Result<Vec<Delivery>, WaitTimeout> {
        self.wait(count, timeout, |c| c.received).await
    }

    /// Waits until at least `count` POSTs were accepted, for at most `timeout`.
    pub async fn wait_for_accepted(&self, count: u64, timeout: Duration) -> Result<Vec<Delivery>, WaitTimeout> {
        self.wait(count, timeout, |c| c.accepted).await
    }

    /// Stops the server and waits until it has closed every connection.
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }

    async fn wait(
        &self,
        wanted: u64,
        timeout: Duration,
        count: fn(&Counts) -> u64,
    ) -> Result<Vec<Delivery>, WaitTimeout> {
        let mut counts = self.shared.counts.subscribe();
        let reached = tokio::time::timeout(timeout, counts.wait_for(|c| count(c) >= wanted)).await;
        match reached {
            Ok(Ok(_)) => Ok(self.deliveries()),
            _ => Err(WaitTimeout { wanted, seen: count(&self.shared.lock().counts) }),
        }
    }
}

impl Drop for ReceiverHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    /// Published after every POST, for waiters.
    counts: watch::Sender<Counts>,
    started: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update is a few field writes, so a poisoned lock still holds consistent data.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Debug)]
struct Inner {
    deliveries: VecDeque<Delivery>,
    fail_remaining: u32,
    window: Option<(Instant, Instant)>,
    counts: Counts,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    received: u64,
    accepted: u64,
}

impl Inner {
    /// The status for the next POST: scripted failures first.
    fn decide(&mut self, now: Instant) -> StatusCode {
        if self.fail_remaining > 0 {
            self.fail_remaining -= 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        match self.window {
            Some((start, end)) if now >= start && now < end => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::OK,
        }
    }

    fn push(&mut self, delivery: Delivery) {
        if self.deliveries.len() >= DELIVERIES_MAX {
            self.deliveries.pop_front();
        }
        self.deliveries.push_back(delivery);
    }
}

/// Records a POST to any path and answers as scripted.
async fn record(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> StatusCode {
    if method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED;
    }
    let now = Instant::now();
    let (status, body) = match body {
        Ok(bytes) => (None, bytes.to_vec()),
        Err(rejection) => (Some(rejection.status()), Vec::new()),
    };
    let headers = headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect();
    let mut inner = shared.lock();
    let status = status.unwrap_or_else(|| inner.decide(now));
    inner.counts.received += 1;
    if status.is_success() {
        inner.counts.accepted += 1;
    }
    let delivery = Delivery {
        attempt: inner.counts.received,
        path: uri.path_and_query().map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned()),
        headers,
        body,
        status: status.as_u16(),
        received_ms: u64::try_from(now.duration_since(shared.started).as_millis()).unwrap_or(u64::MAX),
    };
    inner.push(delivery);
    shared.counts.send_replace(inner.counts);
    status
}
