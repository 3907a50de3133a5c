//! HTTP clients lent out one call at a time, so that a connection which
//! carried an answer the caller did not accept is never used again.
//!
//! HTTP/1.1 cannot tell an answer from bytes an earlier exchange left on the
//! connection. hyper drops a pooled connection when it finds bytes there
//! while it is idle, but bytes that arrive after the next request was written
//! (a receiver that sends a second, stray response after its `599`, a body
//! longer than its `Content-Length`, a chunked body with a tail) are read as
//! the answer to that next request: a refused delivery would look accepted.
//! reqwest cannot be told to close one connection, so each call borrows a
//! whole client (its own pool, at most one idle connection) and gives it
//! back only when the caller calls [`Lease::clean`]; otherwise the client and
//! its connections are dropped. What this cannot catch is a stray complete
//! `2xx` after a `2xx`, arriving after the next request: on the wire that is
//! the next request's answer, and only a connection per call would avoid it.
//! The clients share one TLS configuration,
//! built once per process: loading the platform's root certificates is most
//! of what building a reqwest client costs (about 10 ms of CPU in release).

use std::error::Error as _;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// A set of interchangeable clients, each lent to one call at a time.
pub(crate) struct Clients {
    idle: Mutex<Vec<reqwest::Client>>,
    idle_max: usize,
    builder: Box<dyn Fn() -> reqwest::ClientBuilder + Send + Sync>,
    tls: rustls::ClientConfig,
}

impl Clients {
    /// Clients built from `builder` (keeping at most one idle connection per
    /// host, as a client serves one call at a time) with the shared TLS
    /// configuration, at most `idle_max` kept between calls. One is built
    /// now, so a configuration error shows at construction.
    pub(crate) fn new(
        idle_max: usize,
        builder: impl Fn() -> reqwest::ClientBuilder + Send + Sync + 'static,
    ) -> Result<Arc<Clients>, String> {
        let tls = tls()?;
        let clients =
            Clients { idle: Mutex::new(Vec::new()), idle_max: idle_max.max(1), builder: Box::new(builder), tls };
        let first = clients.build()?;
        clients.lock().push(first);
        Ok(Arc::new(clients))
    }

    /// A client for one call: an idle one, else a new one.
    pub(crate) fn lease(self: &Arc<Self>) -> Result<Lease, String> {
        let idle = self.lock().pop();
        let client = match idle {
            Some(client) => client,
            None => self.build()?,
        };
        Ok(Lease { clients: Arc::clone(self), client, clean: false })
    }

    fn build(&self) -> Result<reqwest::Client, String> {
        (self.builder)()
            .pool_max_idle_per_host(1)
            .tls_backend_preconfigured(self.tls.clone())
            .build()
            .map_err(|e| error_chain(&e))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<reqwest::Client>> {
        // A push or a pop: a poisoned lock still holds a consistent list.
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients").field("idle", &self.lock().len()).field("idle_max", &self.idle_max).finish()
    }
}

/// One borrowed client; dropped without [`Lease::clean`], it is discarded.
pub(crate) struct Lease {
    clients: Arc<Clients>,
    client: reqwest::Client,
    clean: bool,
}

impl Lease {
    /// The borrowed client.
    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The call ended with an answer the caller accepted, its body read to
    /// the end: the client (and its connection) may serve another call.
    pub(crate) fn clean(&mut self) {
        self.clean = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.clean {
            return;
        }
        let mut idle = self.clients.lock();
        if idle.len() < self.clients.idle_max {
            idle.push(self.client.clone());
        }
    }
}

/// reqwest's own TLS defaults (the platform's roots, TLS 1.2 and 1.3, SNI,
/// HTTP/1.1 by ALPN), built once per process.
fn tls() -> Result<rustls::ClientConfig, String> {
    static TLS: OnceLock<Result<rustls::ClientConfig, String>> = OnceLock::new();
    TLS.get_or_init(|| {
        crate::install_crypto_provider();
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let verifier = rustls_platform_verifier::Verifier::new(Arc::clone(&provider)).map_err(|e| e.to_string())?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::ALL_VERSIONS)
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tls)
    })
    .clone()
}

/// An error and its sources, joined: reqwest's own message rarely says why.
pub(crate) fn error_chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
