//! The carrier simulator: a small HTTP server that behaves like a carrier's
//! label API, with faults (latency, errors, timeouts, downtime, outage
//! windows) scripted per carrier at startup or at runtime, drawn from a seeded
//! RNG so runs repeat. Used by tests, `orderly demo` and `orderly carrier-sim`.
//!
//! Routes: `POST /v1/labels`, `GET /v1/tracking/{tracking_number}`,
//! `GET|PUT /admin/carriers/{carrier}`, `GET /admin/carriers`,
//! `GET /admin/stats`, `GET /healthz`.

mod config;
mod labels;
mod problem;
mod routes;
mod state;

pub use config::{
    CARRIER_NAME_LEN_MAX, CARRIERS_MAX, ConfigError, LATENCY_MS_MAX, OUTAGE_MS_MAX, PRICE_CENTS_MAX, SimConfig,
};
pub use labels::{ID_LEN_MAX, IDEMPOTENCY_KEY_LEN_MAX, LABELS_MAX, WEIGHT_G_MAX};
pub use routes::{BODY_BYTES_MAX, REPLAYED_HEADER, REQUESTS_IN_FLIGHT_MAX, TIMEOUT_HOLD_MS};
pub use state::LABEL_TIMES_MAX;

use state::SimState;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Serves the simulator on `listener` until `shutdown` completes. On shutdown,
/// held and delayed requests are answered `503` at once, so it never waits
/// out a scripted timeout.
pub async fn serve(
    listener: TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (stop_sender, stop) = watch::channel(false);
    let app = routes::router(Arc::new(SimState::new(config, stop)));
    let signal = async move {
        shutdown.await;
        stop_sender.send_replace(true);
    };
    axum::serve(listener, app).with_graceful_shutdown(signal).await
}

/// Starts a simulator on `127.0.0.1` with a free port, for tests and demos.
pub async fn spawn_local(config: SimConfig) -> io::Result<LocalSim> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        // Either a send or the sender's drop means stop.
        let _ = stopped.await;
    };
    let task = tokio::spawn(serve(listener, config, shutdown));
    Ok(LocalSim { url: format!("http://{addr}"), addr, stop: Some(stop), task: Some(task) })
}

/// A simulator running in the background; dropping it stops the server.
#[derive(Debug)]
pub struct LocalSim {
    url: String,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl LocalSim {
    /// The base URL, e.g. `http://127.0.0.1:41234` (no trailing slash).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
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
}

impl Drop for LocalSim {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
