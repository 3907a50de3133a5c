//! A receiver (or carrier) that leaves bytes on a connection after its answer
//! must not decide the verdict of a later call: each call's verdict is its own
//! answer's. A raw loopback server, scripted byte for byte per connection,
//! answers a first delivery with a refusal plus stray bytes (a second,
//! pipelined `200`, a body longer than its `Content-Length`, a chunked tail),
//! then answers the second delivery with a refusal of its own.
//!
//! The decisive case: stray bytes that reach the client after it wrote the
//! next request on the same connection are read as that request's answer
//! (HTTP/1.1 cannot tell them apart), so before the fix a `599` followed by a
//! stray `200` made the next delivery, refused with `500`, look delivered.
//! Stray bytes that arrive with the answer or while the connection is idle
//! are caught by hyper, which drops the connection; those tests are guards.

use orderly_carrier::client::{CarrierClient, CarrierError};
use orderly_carrier::signing::{DeliveryError, WebhookSender};
use orderly_carrier::wire::LabelRequest;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Longest any wait of these tests may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// The fuzz case CI reported (`\x01\x11` then this body): a framed `599`.
const FUZZ_BODY: &[u8] = b"\x01one XX is not served\"}";

/// One step of the server on one connection.
#[derive(Clone)]
enum Step {
    /// Read one whole request (head, then `Content-Length` bytes of body).
    Request,
    /// Write these bytes.
    Write(Vec<u8>),
    /// Wait until the test says go.
    Pause(Arc<Notify>),
    /// Tell the test this point was reached.
    Signal(Arc<Notify>),
}

/// A loopback server: connection `k` (in accept order) runs script
/// `min(k, last)`, then keeps the connection open (no FIN that would make the
/// client drop it) until the client closes it.
struct Scripted {
    addr: SocketAddr,
    /// Requests read on each connection, in accept order.
    requests: Arc<Mutex<Vec<usize>>>,
}

impl Scripted {
    async fn start(scripts: Vec<Vec<Step>>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("bound");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let counts = Arc::clone(&requests);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = {
                    let mut counts = counts.lock().expect("not poisoned");
                    counts.push(0);
                    counts.len() - 1
                };
                let script = scripts[index.min(scripts.len() - 1)].clone();
                tokio::spawn(run(stream, script, Arc::clone(&counts), index));
            }
        });
        Scripted { addr, requests }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests_per_connection(&self) -> Vec<usize> {
        self.requests.lock().expect("not poisoned").clone()
    }
}

async fn run(mut stream: TcpStream, script: Vec<Step>, counts: Arc<Mutex<Vec<usize>>>, index: usize) {
    for step in script {
        match step {
            Step::Request => {
                if !read_request(&mut stream).await {
                    return; // the client closed the connection (or the deadline passed)
                }
                counts.lock().expect("not poisoned")[index] += 1;
            }
            Step::Write(bytes) => {
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Step::Pause(go) => go.notified().await,
            Step::Signal(reached) => reached.notify_one(),
        }
    }
    // Hold the connection open until the client closes it; count what else comes.
    let mut buffer = [0u8; 4096];
    let _ = tokio::time::timeout(DEADLINE, async {
        while let Ok(n) = stream.read(&mut buffer).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Reads one request; false on EOF, error or deadline.
async fn read_request(stream: &mut TcpStream) -> bool {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(DEADLINE, async {
        // Byte by byte so a pipelined next request stays in the socket.
        loop {
            match stream.read(&mut byte).await {
                Ok(1) => request.push(byte[0]),
                _ => return false,
            }
            if request.ends_with(b"\r\n\r\n") {
                break;
            }
        }
        let head = String::from_utf8_lossy(&request).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.is_ok()
    })
    .await;
    matches!(read, Ok(true))
}

/// A keep-alive answer with a `Content-Length` body.
fn answer(status: u16, body: &[u8]) -> Vec<u8> {
    let mut bytes =
        format!("HTTP/1.1 {status} Test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len())
            .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// The stray bytes: a complete `200` answer nobody asked for.
fn stray_ok() -> Vec<u8> {
    answer(200, b"{}")
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn sender(url: &str) -> WebhookSender {
    WebhookSender::new(&format!("{url}/hook"), Some("secret"), Duration::from_secs(2)).expect("a loopback sender")
}

async fn deliver(sender: &WebhookSender) -> Result<(), DeliveryError> {
    sender.send("evt-1", br#"{"order_id":"o-1"}"#, 1_700_000_000).await
}

fn verdict(outcome: &Result<(), DeliveryError>) -> String {
    format!("{outcome:?}")
}

/// Every later connection answers its request with `500`.
fn refusing() -> Vec<Step> {
    vec![Step::Request, Step::Write(answer(500, b"{}"))]
}

#[tokio::test]
async fn clean_answers_share_one_connection() {
    // The control: without it the other tests might never reach the pool.
    let server = Scripted::start(vec![vec![
        Step::Request,
        Step::Write(answer(200, b"{}")),
        Step::Request,
        Step::Write(answer(500, b"{}")),
    ]])
    .await;
    let sender = sender(&server.url());
    assert_eq!(verdict(&deliver(&sender).await), "Ok(())");
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(500))");
    assert_eq!(server.requests_per_connection(), vec![2], "the second delivery reused the connection");
}

#[tokio::test]
async fn a_stray_200_after_a_599_does_not_answer_the_next_delivery() {
    // The 599 of the fuzz case, kept alive; the stray 200 reaches the client
    // after it wrote the next request, then comes that request's own 500.
    let server = Scripted::start(vec![
        vec![
            Step::Request,
            Step::Write(answer(599, FUZZ_BODY)),
            Step::Request,
            Step::Write(join(&[&stray_ok(), &answer(500, b"{}")])),
        ],
        refusing(),
    ])
    .await;
    let sender = sender(&server.url());
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(599))");
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(500))", "the stray 200 was read as the answer");
    assert_eq!(server.requests_per_connection(), vec![1, 1], "a refused connection is not used again");
}

#[tokio::test]
async fn the_fuzz_case_framing_with_a_stray_200_in_the_same_write() {
    // Exactly what the fuzz server wrote (connection: close), plus a stray 200.
    let mut fuzz = answer(599, FUZZ_BODY);
    let head_end = fuzz.windows(2).position(|w| w == b"\r\n").expect("a status line") + 2;
    fuzz.splice(head_end..head_end, b"connection: close\r\n".iter().copied());
    let server = Scripted::start(vec![
        vec![Step::Request, Step::Write(join(&[&fuzz, &stray_ok()])), Step::Request, Step::Write(stray_ok())],
        refusing(),
    ])
    .await;
    let sender = sender(&server.url());
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(599))");
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(500))");
    assert_eq!(server.requests_per_connection(), vec![1, 1]);
}

#[tokio::test]
async fn a_stray_200_in_the_same_write_is_caught() {
    let server = Scripted::start(vec![
        vec![
            Step::Request,
            Step::Write(join(&[&answer(599, FUZZ_BODY), &stray_ok()])),
            Step::Request,
            Step::Write(stray_ok()),
        ],
        refusing(),
    ])
    .await;
    let sender = sender(&server.url());
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(599))");
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(500))");
}

#[tokio::test]
async fn a_stray_200_while_idle_is_caught() {
    let go = Arc::new(Notify::new());
    let written = Arc::new(Notify::new());
    let server = Scripted::start(vec![
        vec![
            Step::Request,
            Step::Write(answer(599, FUZZ_BODY)),
            Step::Pause(Arc::clone(&go)),
            Step::Write(stray_ok()),
            Step::Signal(Arc::clone(&written)),
            Step::Request,
            Step::Write(stray_ok()),
        ],
        refusing(),
    ])
    .await;
    let sender = sender(&server.url());
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(599))");
    go.notify_one();
    tokio::time::timeout(DEADLINE, written.notified()).await.expect("the stray bytes are written");
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(500))");
}

#[tokio::test]
async fn a_body_longer_than_its_content_length_does_not_answer_the_next_delivery() {
    // Content-Length says 2; the rest of the "body" is a 200 that arrives
    // after the next request.
    let server = Scripted::start(vec![
        vec![
            Step::Request,
            Step::Write(b"HTTP/1.1 503 Busy\r\ncontent-length: 2\r\n\r\n{}".to_vec()),
            Step::Request,
            Step::Write(join(&[&stray_ok(), &answer(500, b"{}")])),
        ],
        refusing(),
    ])
    .await;
    let sender = sender(&server.url());
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(503))");
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(500))");
    assert_eq!(server.requests_per_connection(), vec![1, 1]);
}

#[tokio::test]
async fn a_chunked_tail_does_not_answer_the_next_delivery() {
    let chunked = b"HTTP/1.1 599 X\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec();
    let server = Scripted::start(vec![
        vec![Step::Request, Step::Write(chunked), Step::Request, Step::Write(stray_ok())],
        refusing(),
    ])
    .await;
    let sender = sender(&server.url());
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(599))");
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(500))");
    assert_eq!(server.requests_per_connection(), vec![1, 1]);
}

#[tokio::test]
async fn chunked_garbage_is_caught() {
    let garbage = b"HTTP/1.1 599 X\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec();
    let server = Scripted::start(vec![
        vec![Step::Request, Step::Write(join(&[&garbage, &stray_ok()])), Step::Request, Step::Write(stray_ok())],
        refusing(),
    ])
    .await;
    let sender = sender(&server.url());
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(599))");
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(500))");
}

#[tokio::test]
async fn a_short_body_then_the_next_delivery() {
    // Content-Length promises more than comes: the first delivery times out
    // reading the body (the verdict is its status), the second is answered
    // on a new connection.
    let server = Scripted::start(vec![
        vec![Step::Request, Step::Write(b"HTTP/1.1 599 X\r\ncontent-length: 50\r\n\r\n{}".to_vec())],
        refusing(),
    ])
    .await;
    let sender =
        WebhookSender::new(&format!("{}/hook", server.url()), None, Duration::from_millis(300)).expect("a sender");
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(599))");
    assert_eq!(verdict(&deliver(&sender).await), "Err(Status(500))");
    assert_eq!(server.requests_per_connection(), vec![1, 1]);
}

#[tokio::test]
async fn concurrent_deliveries_never_share_a_refused_connection() {
    // Many deliveries at once through clones of one sender: every first
    // request on a connection is refused with 599 and a stray 200 follows
    // any request that comes after it on the same connection. No delivery
    // may be reported delivered.
    let script = vec![
        Step::Request,
        Step::Write(answer(599, FUZZ_BODY)),
        Step::Request,
        Step::Write(join(&[&stray_ok(), &answer(599, b"{}")])),
    ];
    let server = Scripted::start(vec![script]).await;
    let sender = sender(&server.url());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let sender = sender.clone();
        tasks.spawn(async move {
            let mut verdicts = Vec::new();
            for _ in 0..4 {
                verdicts.push(verdict(&deliver(&sender).await));
            }
            verdicts
        });
    }
    while let Some(verdicts) = tasks.join_next().await {
        for verdict in verdicts.expect("a delivery task") {
            assert_eq!(verdict, "Err(Status(599))");
        }
    }
    assert!(server.requests_per_connection().iter().all(|n| *n <= 1), "{:?}", server.requests_per_connection());
}

fn label_request(key: &str) -> LabelRequest {
    LabelRequest {
        carrier: "fastship".into(),
        shipment_id: format!("shp-{key}"),
        zone: "EU".into(),
        weight_g: 500,
        idempotency_key: key.into(),
    }
}

const LABEL: &[u8] = br#"{"tracking_number":"FS1","carrier":"fastship","cost":"4.95","created_at":"2026-11-26T14:00:00Z","label_id":"lbl-1"}"#;

#[tokio::test]
async fn carrier_clean_labels_share_one_connection() {
    let server = Scripted::start(vec![vec![
        Step::Request,
        Step::Write(answer(201, LABEL)),
        Step::Request,
        Step::Write(answer(422, br#"{"detail":"bad zone"}"#)),
    ]])
    .await;
    let client = CarrierClient::new(&server.url(), Duration::from_secs(2)).expect("a loopback client");
    assert!(client.create_label(&label_request("k1")).await.is_ok());
    let second = client.create_label(&label_request("k2")).await;
    assert!(matches!(second, Err(CarrierError::Rejected { status: 422, .. })), "{second:?}");
    assert_eq!(server.requests_per_connection(), vec![2], "the second call reused the connection");
}

#[tokio::test]
async fn carrier_a_stray_label_after_a_503_is_not_the_next_answer() {
    // A 503 then, after the next request, a label nobody asked for and that
    // request's own 422: the next call must be rejected, not handed the label.
    let server = Scripted::start(vec![
        vec![
            Step::Request,
            Step::Write(answer(503, b"{}")),
            Step::Request,
            Step::Write(join(&[&answer(201, LABEL), &answer(422, br#"{"detail":"bad zone"}"#)])),
        ],
        vec![Step::Request, Step::Write(answer(422, br#"{"detail":"bad zone"}"#))],
    ])
    .await;
    let client = CarrierClient::new(&server.url(), Duration::from_secs(2)).expect("a loopback client");
    assert_eq!(client.create_label(&label_request("k1")).await, Err(CarrierError::Unavailable(503)));
    let second = client.create_label(&label_request("k2")).await;
    assert!(matches!(second, Err(CarrierError::Rejected { status: 422, .. })), "{second:?}");
    assert_eq!(server.requests_per_connection(), vec![1, 1]);
}
