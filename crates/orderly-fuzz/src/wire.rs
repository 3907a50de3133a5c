//! Answers from the outside world over real HTTP on loopback: a one-shot
//! server writes the fuzzed answer, the real carrier client (label API) or
//! webhook sender reads it. Input layout: the first byte chooses the mode.
//! Even: the rest is written verbatim (raw HTTP/1.1, so the status line,
//! headers and framing are fuzzed too). Odd: the second byte picks a status
//! from [`STATUSES`] and the rest is a well-framed JSON body, and the outcome
//! must be classified as the contract says (5xx/408/429 retryable, other 4xx
//! rejected with a bounded detail, 2xx a label or a `BadResponse`).

use orderly_carrier::client::{CarrierClient, CarrierError, DETAIL_LEN_MAX};
use orderly_carrier::signing::{DeliveryError, WebhookSender};
use orderly_carrier::wire::LabelRequest;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Statuses of the framed mode.
pub const STATUSES: &[u16] =
    &[200, 201, 202, 204, 206, 301, 304, 400, 401, 404, 408, 409, 422, 429, 500, 502, 503, 599];

/// Longest a client waits for one answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest a case waits for the server to finish its answer.
const ANSWER_WAIT: Duration = Duration::from_secs(1);

// One client of each kind for every case. A case's verdict must depend on
// its own answer only: the clients use a connection again only after a clean
// `2xx` (see `orderly_carrier`'s `lease`), and a case ends only once the
// server has written everything it will ever write on the connection it
// answered, its FIN included, so a kept connection's leftovers (or its close)
// are already in the client's socket when the next case's request comes and
// hyper drops the connection and sends that request on a new one instead of
// racing it. Without that wait, a shared client failed a framed case about
// once per 20-40 s of fuzzing with a transport error: a connection that a
// raw keep-alive answer (`HTTP/1.1 429 X ... content-length: 0`) left pooled
// was closed by the server just after the next case's request went out. The
// framed 599 CI reported as "delivered" was most likely one of those: the
// `Ok(())` at the end of tests/fuzz.rs's message was the result of saving
// the input, not the target's outcome.
struct Wire {
    runtime: tokio::runtime::Runtime,
    next: Arc<Mutex<Vec<u8>>>,
    answered: tokio::sync::watch::Receiver<u64>,
    carrier: CarrierClient,
    webhook: WebhookSender,
}

impl Wire {
    /// Runs one case's call with `bytes` as the server's answer, then waits
    /// until the server has answered (or [`ANSWER_WAIT`]).
    fn call<T>(&self, bytes: Vec<u8>, call: impl std::future::Future<Output = T>) -> T {
        *self.next.lock().expect("not poisoned") = bytes;
        let mut answered = self.answered.clone();
        let before = *answered.borrow_and_update();
        self.runtime.block_on(async {
            let outcome = call.await;
            // A request that never reached the server (none so far) only costs the wait.
            let _ = tokio::time::timeout(ANSWER_WAIT, answered.wait_for(|n| *n > before)).await;
            outcome
        })
    }
}

fn wire() -> &'static Wire {
    static WIRE: OnceLock<Wire> = OnceLock::new();
    WIRE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let next = Arc::new(Mutex::new(Vec::new()));
        let (answers, answered) = tokio::sync::watch::channel(0u64);
        let addr = runtime.block_on(serve(next.clone(), Arc::new(answers)));
        let base = format!("http://{addr}");
        let carrier = CarrierClient::new(&base, CALL_TIMEOUT).expect("a loopback carrier client");
        let webhook = WebhookSender::new(&format!("{base}/hook"), Some("fuzz-secret"), CALL_TIMEOUT)
            .expect("a loopback webhook sender");
        Wire { runtime, next, answered, carrier, webhook }
    })
}

/// A loopback server that answers every connection's first request with the
/// bytes in `next` when the request arrives, then closes it and counts one
/// answer in `answers`.
async fn serve(next: Arc<Mutex<Vec<u8>>>, answers: Arc<tokio::sync::watch::Sender<u64>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(answer_once(stream, next.clone(), Arc::clone(&answers)));
        }
    });
    addr
}

async fn answer_once(mut stream: TcpStream, next: Arc<Mutex<Vec<u8>>>, answers: Arc<tokio::sync::watch::Sender<u64>>) {
    // Read the whole request (headers, then Content-Length bytes) so closing
    // does not reset the connection under the client's feet.
    let mut request = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
    loop {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await;
        let Ok(Ok(n)) = read else { return };
        if n == 0 {
            return;
        }
        request.extend_from_slice(&buffer[..n]);
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                break;
            }
        }
    }
    // The answer is the one set for the request that came, read only now: the
    // client may have opened this connection during an earlier case (a pool
    // connecting in the background) and used it only for this one.
    let answer = next.lock().map(|a| a.clone()).unwrap_or_default();
    let _ = stream.write_all(&answer).await;
    let _ = stream.shutdown().await;
    answers.send_modify(|n| *n += 1);
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buffer)).await;
}

/// What the server will answer, and the status when framed.
fn answer(data: &[u8]) -> Option<(Vec<u8>, Option<u16>)> {
    let (&mode, rest) = data.split_first()?;
    if mode % 2 == 0 {
        return Some((rest.to_vec(), None));
    }
    let (&pick, body) = rest.split_first()?;
    let status = STATUSES[usize::from(pick) % STATUSES.len()];
    let mut bytes = format!(
        "HTTP/1.1 {status} Fuzz\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    Some((bytes, Some(status)))
}

/// A carrier's answer to `POST /v1/labels`.
pub fn carrier_response(data: &[u8]) {
    let Some((bytes, status)) = answer(data) else { return };
    let wire = wire();
    let request = LabelRequest {
        carrier: "fastship".into(),
        shipment_id: "shp-1".into(),
        zone: "EU".into(),
        weight_g: 500,
        idempotency_key: "fuzz-key".into(),
    };
    let outcome = wire.call(bytes, wire.carrier.create_label(&request));
    if let Err(CarrierError::Rejected { detail, .. }) = &outcome {
        assert!(detail.len() <= DETAIL_LEN_MAX, "detail is bounded: {} bytes", detail.len());
    }
    assert!(!matches!(outcome, Err(CarrierError::Config(_))), "a bad answer is not a config error: {outcome:?}");
    let Some(status) = status else { return };
    match status {
        500..=599 | 408 | 429 => {
            assert_eq!(outcome, Err(CarrierError::Unavailable(status)), "retryable")
        }
        400..=499 => {
            assert!(matches!(&outcome, Err(CarrierError::Rejected { status: s, .. }) if *s == status), "{outcome:?}")
        }
        200..=299 => assert!(matches!(outcome, Ok(_) | Err(CarrierError::BadResponse(_))), "{outcome:?}"),
        _ => assert!(matches!(outcome, Err(CarrierError::BadResponse(_))), "{status}: {outcome:?}"),
    }
}

/// A webhook receiver's answer to a signed notification.
pub fn webhook_response(data: &[u8]) {
    let Some((bytes, status)) = answer(data) else { return };
    let wire = wire();
    let outcome = wire.call(bytes, wire.webhook.send("evt-1", br#"{"order_id":"o-1"}"#, 1_700_000_000));
    let Some(status) = status else { return };
    if (200..300).contains(&status) {
        assert!(outcome.is_ok(), "{status}: {outcome:?}");
    } else {
        assert!(matches!(outcome, Err(DeliveryError::Status(s)) if s == status), "{status}: {outcome:?}");
    }
}
