//! Outbound webhook deliveries, signed so a receiver can trust them.
//!
//! Header: `Orderly-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//! A receiver recomputes the HMAC over the timestamp, a dot and the raw body,
//! compares in constant time, and rejects timestamps older than its
//! tolerance (e.g. 5 minutes) to stop replays. `Orderly-Event-Id` carries
//! the notification id so a receiver can drop a repeated delivery.

use crate::lease::Clients;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;

type HmacSha256 = Hmac<Sha256>;

/// Most bytes of a receiver's answer read (the answer is ignored but drained).
const RESPONSE_BYTES_MAX: usize = 16 * 1024;

/// The signature header value for `body` at `unix_seconds`.
pub fn signature(secret: &[u8], unix_seconds: i64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(unix_seconds.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={unix_seconds},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a signature header against `body`, accepting timestamps within
/// `tolerance_s` of `now_unix`. Comparison is constant-time.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now_unix: i64, tolerance_s: i64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => v1 = hex::decode(value).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return false };
    if (now_unix - t).abs() > tolerance_s {
        return false;
    }
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&v1).is_ok()
}

/// Why a delivery failed (all are retried by the caller).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The receiver answered with a non-2xx status.
    #[error("webhook answered {0}")]
    Status(u16),
    /// No answer in time, or the connection failed.
    #[error("webhook unreachable: {0}")]
    Transport(String),
}

/// Most clients (each with at most one idle connection) kept between deliveries.
pub const IDLE_CLIENTS_MAX: usize = 32;

/// Sends signed JSON deliveries to one webhook URL.
///
/// A connection is used again only after a `2xx` answer read to its end:
/// after any other answer its client is dropped (see `lease`), so bytes a
/// receiver left on it can never be read as the answer to a later delivery.
#[derive(Clone)]
pub struct WebhookSender {
    clients: Arc<Clients>,
    url: String,
    secret: Option<Vec<u8>>,
}

impl WebhookSender {
    /// A sender to `url`, signing with `secret` when given.
    pub fn new(url: &str, secret: Option<&str>, timeout: Duration) -> Result<WebhookSender, DeliveryError> {
        crate::install_crypto_provider();
        let builder = move || reqwest::Client::builder().timeout(timeout).connect_timeout(timeout);
        let clients = Clients::new(IDLE_CLIENTS_MAX, builder).map_err(DeliveryError::Transport)?;
        Ok(WebhookSender { clients, url: url.to_owned(), secret: secret.map(|s| s.as_bytes().to_vec()) })
    }

    /// POSTs `body` (JSON) with the event id and, if configured, a signature.
    /// The verdict is the status of this delivery's own answer: `2xx` is
    /// delivered, whatever its body; anything else is an error.
    pub async fn send(&self, event_id: &str, body: &[u8], now_unix: i64) -> Result<(), DeliveryError> {
        let mut lease = self.clients.lease().map_err(DeliveryError::Transport)?;
        let mut req = lease
            .client()
            .post(&self.url)
            .header("content-type", "application/json")
            .header("orderly-event-id", event_id)
            .body(body.to_vec());
        if let Some(secret) = &self.secret {
            req = req.header("orderly-signature", signature(secret, now_unix, body));
        }
        let resp = req.send().await.map_err(|e| DeliveryError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let drained = drain(resp).await;
        if !(200..300).contains(&status) {
            return Err(DeliveryError::Status(status));
        }
        if drained {
            lease.clean();
        }
        Ok(())
    }
}

/// Reads and drops an answer's body; whether it ended within
/// [`RESPONSE_BYTES_MAX`] bytes and without an error.
async fn drain(mut resp: reqwest::Response) -> bool {
    let mut drained = 0;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                drained += chunk.len();
                if drained > RESPONSE_BYTES_MAX {
                    return false;
                }
            }
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let header = signature(b"s3cret", 1_700_000_000, b"{\"a\":1}");
        assert!(header.starts_with("t=1700000000,v1="));
        assert!(verify(b"s3cret", &header, b"{\"a\":1}", 1_700_000_010, 300));
        assert!(!verify(b"s3cret", &header, b"{\"a\":2}", 1_700_000_010, 300), "body changed");
        assert!(!verify(b"other", &header, b"{\"a\":1}", 1_700_000_010, 300), "wrong secret");
        assert!(!verify(b"s3cret", &header, b"{\"a\":1}", 1_700_009_999, 300), "too old");
        assert!(!verify(b"s3cret", "garbage", b"{\"a\":1}", 1_700_000_010, 300));
    }
}
