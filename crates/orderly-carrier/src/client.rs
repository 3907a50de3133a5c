//! The HTTP client of a carrier's label API (and of the simulator's admin
//! API, for tests). Every failure is classified once, here, into retryable
//! (timeouts, `5xx`, `429`, transport) and final (`4xx`, bad answers), which is
//! what the shipping service's retries, breaker and fallback act on.

use crate::lease::{Clients, Lease, error_chain};
use crate::wire::{CarrierSettings, Label, LabelRequest, Problem, SimStats, TrackingInfo};
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;

/// The largest response body read from a carrier.
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024;
/// The longest error detail kept from a carrier's answer.
pub const DETAIL_LEN_MAX: usize = 512;
/// Idle connections kept per carrier host (one per idle client, see `lease`).
pub const IDLE_CONNECTIONS_MAX: usize = 16;
/// The header that carries the idempotency key, besides the JSON body.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Why a carrier call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CarrierError {
    /// No answer within the client's timeout. Retryable: label requests carry
    /// an idempotency key, so a retry never buys a second label.
    #[error("the carrier did not answer in time")]
    Timeout,
    /// The carrier answered `5xx`, `408` or `429`. Retryable.
    #[error("the carrier is unavailable (HTTP {0})")]
    Unavailable(u16),
    /// The carrier refused the request (`4xx`). Not retryable.
    #[error("the carrier rejected the request (HTTP {status}): {detail}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The carrier's explanation, shortened to [`DETAIL_LEN_MAX`] bytes.
        detail: String,
    },
    /// The connection failed (refused, reset, DNS). Retryable.
    #[error("transport error: {0}")]
    Transport(String),
    /// The carrier answered something that is not the documented shape. Not retryable.
    #[error("bad response from the carrier: {0}")]
    BadResponse(String),
    /// The client could not be built (bad base URL, TLS setup). Not retryable.
    #[error("invalid carrier client configuration: {0}")]
    Config(String),
}

impl CarrierError {
    /// Whether trying again (after a backoff) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, CarrierError::Timeout | CarrierError::Unavailable(_) | CarrierError::Transport(_))
    }
}

/// A client of one carrier API base URL.
///
/// A connection is used again only after a `2xx` answer whose body was read
/// to its end and parsed: after any other answer its client is dropped (see
/// `lease`), so bytes a carrier left on it can never be read as the answer
/// to a later call (a stray label for another shipment).
#[derive(Debug, Clone)]
pub struct CarrierClient {
    clients: Arc<Clients>,
    base: Url,
}

impl CarrierClient {
    /// A client of the API at `base_url` (`http` or `https`) whose every call
    /// gives up after `timeout`.
    pub fn new(base_url: &str, timeout: Duration) -> Result<Self, CarrierError> {
        let base = Url::parse(base_url).map_err(|e| CarrierError::Config(format!("base URL {base_url:?}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(CarrierError::Config(format!("base URL {base_url:?} must be http or https")));
        }
        crate::install_crypto_provider();
        let builder = move || {
            reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout)
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("orderly-carrier/", env!("CARGO_PKG_VERSION")))
        };
        let clients = Clients::new(IDLE_CONNECTIONS_MAX, builder).map_err(CarrierError::Config)?;
        Ok(CarrierClient { clients, base })
    }

    /// Asks for a label (`POST /v1/labels`). The same idempotency key always
    /// returns the same label.
    pub async fn create_label(&self, request: &LabelRequest) -> Result<Label, CarrierError> {
        let key = HeaderValue::from_str(&request.idempotency_key)
            .map_err(|_| rejected_locally("idempotency_key is not a valid header value"))?;
        let (lease, call) = self.request(Method::POST, &["v1", "labels"])?;
        send(lease, with_json(call.header(IDEMPOTENCY_KEY_HEADER, key), request)?).await
    }

    /// The label behind a tracking number (`GET /v1/tracking/{tracking_number}`).
    pub async fn track(&self, tracking_number: &str) -> Result<TrackingInfo, CarrierError> {
        let (lease, call) = self.request(Method::GET, &["v1", "tracking", tracking_number])?;
        send(lease, call).await
    }

    /// Simulator only: replaces a carrier's scripted settings
    /// (`PUT /admin/carriers/{carrier}`) and returns those now in force.
    pub async fn admin_set(&self, carrier: &str, settings: &CarrierSettings) -> Result<CarrierSettings, CarrierError> {
        let (lease, call) = self.request(Method::PUT, &["admin", "carriers", carrier])?;
        send(lease, with_json(call, settings)?).await
    }

    /// Simulator only: every carrier's counters (`GET /admin/stats`).
    pub async fn stats(&self) -> Result<SimStats, CarrierError> {
        let (lease, call) = self.request(Method::GET, &["admin", "stats"])?;
        send(lease, call).await
    }

    /// A request to the base URL plus `segments`, on a client lent for it.
    fn request(&self, method: Method, segments: &[&str]) -> Result<(Lease, reqwest::RequestBuilder), CarrierError> {
        let url = self.url(segments)?;
        let lease = self.clients.lease().map_err(CarrierError::Config)?;
        let call = lease.client().request(method, url);
        Ok((lease, call))
    }

    /// The base URL plus `segments`, each percent-encoded.
    fn url(&self, segments: &[&str]) -> Result<Url, CarrierError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| CarrierError::Config("the base URL cannot take a path".to_owned()))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }
}

/// Makes a refusal for a request that never left this process.
fn rejected_locally(detail: &str) -> CarrierError {
    CarrierError::Rejected { status: StatusCode::BAD_REQUEST.as_u16(), detail: detail.to_owned() }
}

fn with_json<T: Serialize>(call: reqwest::RequestBuilder, body: &T) -> Result<reqwest::RequestBuilder, CarrierError> {
    let bytes = serde_json::to_vec(body).map_err(|e| rejected_locally(&e.to_string()))?;
    Ok(call.header(CONTENT_TYPE, "application/json").body(bytes))
}

/// Sends a call and classifies its outcome; the lent client is kept only
/// after an answer that parsed.
async fn send<T: DeserializeOwned>(mut lease: Lease, call: reqwest::RequestBuilder) -> Result<T, CarrierError> {
    let response = call.send().await.map_err(classify)?;
    let status = response.status();
    if status.is_server_error() || matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT) {
        return Err(CarrierError::Unavailable(status.as_u16()));
    }
    let body = read_bounded(response).await?;
    if status.is_client_error() {
        return Err(CarrierError::Rejected { status: status.as_u16(), detail: detail_of(body.as_deref()) });
    }
    if !status.is_success() {
        return Err(CarrierError::BadResponse(format!("unexpected HTTP {status}")));
    }
    let body = body.ok_or_else(|| CarrierError::BadResponse(format!("body exceeds {RESPONSE_BYTES_MAX} bytes")))?;
    let value =
        serde_json::from_slice(&body).map_err(|e| CarrierError::BadResponse(format!("unexpected body: {e}")))?;
    lease.clean();
    Ok(value)
}

/// Reads at most [`RESPONSE_BYTES_MAX`] bytes; `None` if the body is longer.
async fn read_bounded(mut response: reqwest::Response) -> Result<Option<Vec<u8>>, CarrierError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(classify)? {
        if body.len() + chunk.len() > RESPONSE_BYTES_MAX {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// The `detail` of a problem body, else the body's text, shortened.
fn detail_of(body: Option<&[u8]>) -> String {
    let Some(body) = body else { return format!("error body exceeds {RESPONSE_BYTES_MAX} bytes") };
    let text = match serde_json::from_slice::<Problem>(body) {
        Ok(problem) => problem.detail,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    shorten(text, DETAIL_LEN_MAX)
}

fn shorten(mut text: String, len_max: usize) -> String {
    if text.len() > len_max {
        let mut end = len_max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn classify(error: reqwest::Error) -> CarrierError {
    if error.is_timeout() {
        CarrierError::Timeout
    } else if error.is_builder() {
        CarrierError::Config(error_chain(&error))
    } else {
        CarrierError::Transport(error_chain(&error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_errors_are_the_transient_ones() {
        assert!(CarrierError::Timeout.is_retryable());
        assert!(CarrierError::Unavailable(503).is_retryable());
        assert!(CarrierError::Transport("reset".to_owned()).is_retryable());
        assert!(!CarrierError::Rejected { status: 422, detail: String::new() }.is_retryable());
        assert!(!CarrierError::BadResponse(String::new()).is_retryable());
        assert!(!CarrierError::Config(String::new()).is_retryable());
    }

    #[test]
    fn detail_prefers_the_problem_detail_and_is_bounded() {
        let problem = br#"{"type":"t","title":"x","status":422,"detail":"weight_g too big"}"#;
        assert_eq!(detail_of(Some(problem)), "weight_g too big");
        assert_eq!(detail_of(Some(b"plain text")), "plain text");
        let long = "\u{e9}".repeat(DETAIL_LEN_MAX);
        assert!(detail_of(Some(long.as_bytes())).len() <= DETAIL_LEN_MAX);
    }

    #[test]
    fn bad_base_urls_are_refused() {
        for url in ["not a url", "ftp://host", "mailto:x@y"] {
            let result = CarrierClient::new(url, Duration::from_secs(1));
            assert!(matches!(result, Err(CarrierError::Config(_))), "{url}");
        }
    }

    #[test]
    fn paths_are_joined_and_encoded() {
        let client = CarrierClient::new("http://127.0.0.1:9/api/", Duration::from_secs(1)).expect("valid URL");
        let url = client.url(&["v1", "tracking", "a/b c"]).map(|u| u.to_string());
        assert_eq!(url, Ok("http://127.0.0.1:9/api/v1/tracking/a%2Fb%20c".to_owned()));
    }
}
