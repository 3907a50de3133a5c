//! A limit on everything a client can make the server spend: body size,
//! request time, requests in flight, open connections. Plus request ids,
//! tracing, panic containment, and [`serve`] with a bounded graceful drain.
//! Every refusal is a problem+json response, never a hang.

use crate::problem::{BodyLimit, Problem, ensure_problem, panic_response};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderName;
use axum::middleware::{Next, from_fn_with_state, map_response};
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use orderly_engine::config::HttpSettings;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

/// The request id header, set on every request and echoed on every response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Pause after an accept error that is not about one connection (e.g. out of
/// file descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE_MS: u64 = 50;

/// The HTTP limits in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body accepted (413 beyond).
    pub body_limit_bytes: usize,
    /// Longest a request may take (503 `request-timeout` beyond); 0 is
    /// treated as 1 ms, so validate config before.
    pub request_timeout_ms: u64,
    /// Requests handled at once (503 `overloaded` beyond).
    pub max_in_flight_requests: usize,
    /// Connections open at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// After shutdown is signalled, how long open requests may finish.
    pub shutdown_drain_ms: u64,
    /// Longest a client may take to send a complete request head before
    /// its connection is closed (slowloris defence).
    pub header_read_timeout_ms: u64,
}

/// How long open requests may finish after shutdown, by default.
pub const SHUTDOWN_DRAIN_MS_DEFAULT: u64 = 30_000;

impl Limits {
    /// The `[http]` settings as limits; in-flight requests are capped like
    /// connections, and the drain is [`SHUTDOWN_DRAIN_MS_DEFAULT`].
    pub fn from_settings(settings: &HttpSettings) -> Limits {
        Limits {
            body_limit_bytes: settings.body_limit_bytes,
            request_timeout_ms: u64::try_from(settings.request_timeout.0).unwrap_or(0),
            max_in_flight_requests: settings.max_connections,
            max_connections: settings.max_connections,
            shutdown_drain_ms: SHUTDOWN_DRAIN_MS_DEFAULT,
            header_read_timeout_ms: HEADER_READ_TIMEOUT_MS_DEFAULT,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::from_settings(&HttpSettings::default())
    }
}

/// Wraps every route and the fallback of `router` with, from the outside in:
/// request id (`x-request-id`, kept if the client sent one), a tracing span,
/// panic → 500 problem, bare error → problem, in-flight cap → 503, timeout →
/// 503, body limit → 413. Apply it last, to the complete router.
pub fn with_limits<S>(router: Router<S>, limits: &Limits) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let body_limit = limits.body_limit_bytes;
    let admission = Admission {
        timeout: Duration::from_millis(limits.request_timeout_ms.max(1)),
        permits: Arc::new(Semaphore::new(limits.max_in_flight_requests.max(1))),
    };
    // One stack, applied once: `Router::layer` boxes every route again per
    // layer, and a boxed route is cloned (an allocation) on every request,
    // so ten separate layers cost ten boxes and ten boxed futures a request.
    let stack = tower::ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
            let request_id =
                request.extensions().get::<RequestId>().and_then(|id| id.header_value().to_str().ok()).unwrap_or("");
            tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id)
        }))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(CatchPanicLayer::custom(panic_response as fn(_) -> Response))
        .layer(map_response(move |response: Response| ensure_problem(response, Some(body_limit))))
        .layer(from_fn_with_state(admission, admit))
        .layer(axum::Extension(BodyLimit(body_limit)))
        .layer(RequestBodyLimitLayer::new(body_limit))
        .layer(DefaultBodyLimit::max(body_limit));
    router.layer(stack)
}

/// The in-flight cap and the time limit, checked by one middleware.
#[derive(Debug, Clone)]
struct Admission {
    timeout: Duration,
    permits: Arc<Semaphore>,
}

/// Middleware: answers 503 `overloaded` at once, rather than queueing, when
/// the in-flight cap is reached, and 503 `request-timeout` when the rest of
/// the stack takes longer than the limit (the handler's future is dropped).
async fn admit(State(admission): State<Admission>, request: Request, next: Next) -> Response {
    let Ok(_permit) = admission.permits.try_acquire() else {
        return Problem::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Overloaded",
            "the server is handling as many requests as it allows; retry shortly",
        )
        .with_retry_after(1)
        .into_response();
    };
    match tokio::time::timeout(admission.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "request-timeout",
            "Request timed out",
            format!("the request did not complete within {} ms", admission.timeout.as_millis()),
        )
        .with_retry_after(1)
        .into_response(),
    }
}

/// Largest request head (request line and headers) accepted: hyper answers
/// a bare 431 beyond it (the connection is not parsed far enough for a
/// problem body). Also the HTTP/2 header list limit.
pub const HEADER_BYTES_MAX: usize = 16 * 1024;

/// Most headers in one request (431 beyond).
pub const HEADERS_MAX: usize = 100;

/// How long a client may take to send a complete request head, by default.
pub const HEADER_READ_TIMEOUT_MS_DEFAULT: u64 = 10_000;

/// Serves `router` on `listener` until `shutdown` completes, with at most
/// `limits.max_connections` connections open (more wait in the backlog).
/// A connection whose request head is not complete within
/// `limits.header_read_timeout_ms` is closed (slowloris clients cannot hold
/// the connection slots); heads over [`HEADER_BYTES_MAX`] bytes or
/// [`HEADERS_MAX`] headers are refused. After shutdown, open requests get
/// `limits.shutdown_drain_ms` to finish; then the server stops anyway, so
/// shutdown never hangs.
pub async fn serve<F>(listener: TcpListener, router: Router, limits: &Limits, shutdown: F) -> io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    let mut listener = CappedListener::new(listener, limits.max_connections);
    let head_timeout = Duration::from_millis(limits.header_read_timeout_ms.max(1));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(HEADER_BYTES_MAX.max(8192))
        .max_headers(HEADERS_MAX);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(HEADER_BYTES_MAX as u32);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _address) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        if let Err(error) = stream.stream.set_nodelay(true) {
            tracing::trace!(%error, "could not set TCP_NODELAY");
        }
        // The HTTP/1 timer only starts once hyper knows the protocol, so the
        // first request head is also bounded here: a connection that has not
        // produced a request in time is dropped.
        let first_request = Arc::new(tokio::sync::Notify::new());
        let seen = first_request.clone();
        let service = router.clone().map_request(move |request: axum::http::Request<hyper::body::Incoming>| {
            seen.notify_one();
            request.map(axum::body::Body::new)
        });
        let connection = builder
            .serve_connection_with_upgrades(
                TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(service),
            )
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = &mut connection => {
                    if let Err(error) = result {
                        tracing::trace!(%error, "connection ended with an error");
                    }
                    return;
                }
                () = first_request.notified() => {}
                () = tokio::time::sleep(head_timeout) => {
                    tracing::debug!("closing a connection that sent no complete request head in time");
                    return;
                }
            }
            if let Err(error) = connection.await {
                tracing::trace!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let drain = Duration::from_millis(limits.shutdown_drain_ms);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            drain_ms = limits.shutdown_drain_ms,
            "requests still open after the shutdown drain; stopping anyway"
        );
    }
    Ok(())
}

/// A TCP listener that holds at most `max_connections` connections open:
/// each accepted stream carries a permit, released when it closes.
#[derive(Debug)]
pub struct CappedListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
}

impl CappedListener {
    /// Caps `listener` at `max_connections` (at least one).
    pub fn new(listener: TcpListener, max_connections: usize) -> CappedListener {
        CappedListener { listener, permits: Arc::new(Semaphore::new(max_connections.max(1))) }
    }
}

impl Listener for CappedListener {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CappedStream, SocketAddr) {
        // Wait for a free slot before accepting, so excess connections queue
        // in the kernel's backlog instead of costing us memory.
        let permit = loop {
            match self.permits.clone().acquire_owned().await {
                Ok(permit) => break permit,
                // The semaphore is never closed; if it were, wait for a retry
                // rather than panic.
                Err(_) => tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS)).await,
            }
        };
        loop {
            match self.listener.accept().await {
                Ok((stream, address)) => return (CappedStream { stream, _permit: permit }, address),
                Err(error) if is_connection_error(&error) => {}
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Errors about one connection (the peer gave up): just accept the next.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// An accepted TCP stream holding one of its listener's connection slots.
#[derive(Debug)]
pub struct CappedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for CappedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
