//! The span each handled event runs in names its order in the logs, whether
//! the order is the event's subject or only named in its data.

use orderly_domain::Timestamp;
use orderly_domain::event::{Envelope, EventData, EventType};
use orderly_engine::services::common::event_span;
mod support;

use support::Captured;

fn logged_in_span(env: &Envelope, level: tracing::Level) -> String {
    let buffer = Captured::default();
    let writer = buffer.clone();
    let subscriber =
        tracing_subscriber::fmt().json().with_max_level(level).with_writer(move || writer.clone()).finish();
    tracing::subscriber::with_default(subscriber, || {
        let span = event_span(env);
        let _entered = span.enter();
        tracing::warn!("handled");
    });
    buffer.text()
}

fn envelope(event_type: EventType, subject: &str, data: &str) -> Envelope {
    let data = EventData::parse_text(data).expect("json");
    Envelope::new("ev-1".into(), "/orderly/test", event_type, subject, Timestamp(0), 1, data)
}

#[test]
fn an_event_span_names_the_order_from_the_subject_or_the_data() {
    let order_event = envelope(EventType::OrderCreated, "o-1", "{}");
    let line = logged_in_span(&order_event, tracing::Level::INFO);
    assert!(line.contains(r#""order_id":"o-1""#), "{line}");
    assert!(line.contains(r#""event_id":"ev-1""#), "{line}");

    let sku_event = envelope(EventType::InventoryReserved, "SKU-1", r#"{"order_id":"o-2","sku":"SKU-1"}"#);
    let line = logged_in_span(&sku_event, tracing::Level::INFO);
    assert!(line.contains(r#""order_id":"o-2""#), "{line}");
    assert!(line.contains(r#""subject":"SKU-1""#), "{line}");

    // Spans off (warnings only, as the benchmark logs): the line is written, without span fields.
    let line = logged_in_span(&sku_event, tracing::Level::WARN);
    assert!(line.contains("handled") && !line.contains("o-2"), "{line}");
}
