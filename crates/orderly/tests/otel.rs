//! OpenTelemetry export (`otel.endpoint`): spans reach an OTLP/HTTP receiver
//! on loopback as protobuf at `/v1/traces`, with the event and order ids the
//! engine's spans carry. The receiver is a few lines of std HTTP/1.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing_subscriber::Registry;
use tracing_subscriber::layer::SubscriberExt;

/// One request the receiver got: path, content type, body.
type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// Answers 200 to every request until the deadline, keeping each.
fn receiver(deadline: Instant) -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.set_nonblocking(true).expect("nonblocking");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let got: Received = Arc::default();
    let keep = got.clone();
    std::thread::spawn(move || {
        while Instant::now() < deadline {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            stream.set_nonblocking(false).expect("blocking stream");
            stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let (mut length, mut content_type) = (0usize, String::new());
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                    break;
                }
                let (name, value) = header.split_once(':').unwrap_or((&header, ""));
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "content-type" => content_type = value.trim().to_owned(),
                    _ => {}
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            keep.lock().expect("lock").push((path, content_type, body));
            let mut stream = reader.into_inner();
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n");
        }
    });
    (url, got)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn spans_are_exported_over_otlp_http_to_the_configured_endpoint() {
    let deadline = Instant::now() + Duration::from_secs(20);
    let (url, got) = receiver(deadline);
    let provider = orderly::telemetry::otlp_provider(&url).expect("exporter builds");
    let subscriber = Registry::default().with(orderly::telemetry::otel_layer(&provider));
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("event", event_id = "ev-otel-1", order_id = "o-otel-1");
        let _inside = span.enter();
        tracing::info!("handled");
    });
    provider.force_flush().expect("flushed to the receiver");
    provider.shutdown().expect("shut down");
    while got.lock().expect("lock").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = got.lock().expect("lock");
    let (path, content_type, body) = got.first().expect("the receiver got the spans");
    assert_eq!(path, "/v1/traces");
    assert_eq!(content_type, "application/x-protobuf");
    assert!(contains(body, b"o-otel-1") && contains(body, b"ev-otel-1"), "the span's ids are in the export");
    assert!(contains(body, b"orderly"), "the service name is in the export");
}

#[test]
fn the_traces_url_is_derived_from_the_collector_base() {
    assert_eq!(orderly::telemetry::traces_url("http://127.0.0.1:4318"), "http://127.0.0.1:4318/v1/traces");
    assert_eq!(orderly::telemetry::traces_url("http://c:4318/"), "http://c:4318/v1/traces");
    assert_eq!(orderly::telemetry::traces_url("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
    assert!(orderly::telemetry::otlp_provider("not a url").is_err());
}
