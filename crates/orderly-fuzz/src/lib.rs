//! Fuzz targets: one function per parser of outside input, each taking raw
//! bytes and asserting the contract for them: no panic, every refusal a typed
//! error (or a 4xx `application/problem+json` answer), and whatever is
//! accepted survives a round trip.
//!
//! The same functions are driven two ways: by `tests/fuzz.rs` (proptest
//! generation: arbitrary bytes, mutations of the committed seed corpus in
//! `fuzz/corpus/<target>/`, and near-valid JSON trees), which CI runs for a
//! few seconds per target, and by libFuzzer through `cargo fuzz` (the
//! `fuzz/` directory) for long local runs.

#![warn(missing_docs)]

pub mod http;
pub mod wire;

use orderly_domain::event::{Envelope, EventType};
use orderly_domain::shipping::rates::RateTable;
use orderly_engine::events as contract;
use orderly_engine::runtime::EventError;

/// A fuzz target: raw bytes in, a panic on a contract violation.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("order_body", http::order_body),
    ("hold_body", http::hold_body),
    ("receipt_body", http::receipt_body),
    ("api_body", http::api_body),
    ("envelope", envelope),
    ("outbox_row", outbox_row),
    ("rates_csv", rates_csv),
    ("config", config),
    ("carrier_response", wire::carrier_response),
    ("webhook_response", wire::webhook_response),
];

/// A CloudEvents envelope as it arrives from the bus (or a replay): parsed,
/// validated, its `data` decoded into the bus-contract payload of its type.
/// Whatever parses re-serializes to an equal envelope.
pub fn envelope(data: &[u8]) {
    let Ok(envelope) = serde_json::from_slice::<Envelope>(data) else {
        return; // serde_json::Error: typed, nothing else to check
    };
    let again: Envelope = serde_json::from_slice(&serde_json::to_vec(&envelope).expect("an envelope serializes"))
        .expect("a serialized envelope parses");
    assert_eq!(again, envelope, "round trip");
    // The field probes consumers route on agree with a full parse of the data.
    let tree = envelope.data.value();
    for key in ["order_id", "email", "pick_id", "allocations", "missing"] {
        let probed = envelope
            .data
            .field(key)
            .map(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).expect("a probed field is JSON"));
        assert_eq!(probed.as_ref(), tree.get(key), "field {key}");
        let text = envelope.data.str_field(key);
        assert_eq!(text.as_deref(), tree.get(key).and_then(serde_json::Value::as_str), "str_field {key}");
    }
    if envelope.validate().is_err() {
        return;
    }
    assert!(!matches!(envelope.event_type, EventType::Unknown(_)), "validate accepts only catalog types");
    let decoded = decode_payload(&envelope);
    if let Err(error) = decoded {
        assert!(matches!(error, EventError::Poison(_)), "a payload that does not parse is poison: {error}");
    }
}

/// An outbox row as the embedded store reads it back (a damaged or foreign
/// database file): compact or CloudEvents JSON, decoded without a panic, and
/// whatever decodes is the same envelope after a compact round trip.
pub fn outbox_row(data: &[u8]) {
    use orderly_store_sqlite::codec;
    let Ok(envelope) = codec::decode(data) else {
        return; // a typed refusal, reported as a corrupt row
    };
    let row = codec::encode(&envelope).expect("a decoded envelope encodes");
    assert_eq!(codec::decode(&row).as_ref(), Ok(&envelope), "compact round trip");
}

/// Decodes `data` into the payload type the consumers of `event_type` read.
fn decode_payload(envelope: &Envelope) -> Result<(), EventError> {
    use EventType as T;
    match &envelope.event_type {
        T::OrderCreated => contract::parse::<contract::OrderCreated>(envelope).map(drop),
        T::OrderAllocated => contract::parse::<contract::OrderAllocated>(envelope).map(drop),
        T::OrderCanceled => contract::parse::<contract::OrderCanceled>(envelope).map(drop),
        T::OrderReturned => contract::parse::<contract::OrderReturned>(envelope).map(drop),
        t if t.domain() == "order" => contract::parse::<contract::OrderStateChanged>(envelope).map(drop),
        T::InventoryReserved => contract::parse::<contract::InventoryReserved>(envelope).map(drop),
        T::InventoryBackordered => contract::parse::<contract::InventoryBackordered>(envelope).map(drop),
        T::InventoryReleased | T::InventoryAdjusted | T::InventoryReceived => {
            contract::parse::<contract::StockMoved>(envelope).map(drop)
        }
        t if t.domain() == "pick" => contract::parse::<contract::PickData>(envelope).map(drop),
        T::PackCompleted => contract::parse::<contract::PackCompleted>(envelope).map(drop),
        T::ShipmentLabelCreated => contract::parse::<contract::LabelCreated>(envelope).map(drop),
        T::ShipmentCarrierFallback => contract::parse::<contract::CarrierFallback>(envelope).map(drop),
        T::ShipmentDelivered => contract::parse::<contract::ShipmentDelivered>(envelope).map(drop),
        _ => contract::parse::<serde_json::Value>(envelope).map(drop),
    }
}

/// A carrier rate file (startup directory or `PUT /v1/ops/carrier-rates`):
/// parsed; an accepted table renders to text that parses to the same table.
pub fn rates_csv(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match RateTable::parse(&text) {
        Ok(table) => {
            let rendered = table.render();
            let again = RateTable::parse(&rendered).expect("a rendered table parses");
            assert_eq!(again.version(), table.version());
            assert_eq!(again.bracket_count(), table.bracket_count());
            assert_eq!(again.render(), rendered, "render is a fixed point");
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
}

/// Configuration: `orderly.toml` text (first byte even) or `ORDERLY_*`
/// environment lines `KEY=VALUE` (first byte odd). Accepted settings are
/// then checked the way startup checks them (keys, limits, ledger, carrier
/// endpoints, webhook), all of which must refuse with typed errors.
pub fn config(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let loaded = if mode % 2 == 0 {
        orderly::settings::parse_str(&text)
    } else {
        let env = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (format!("ORDERLY_{}", k.trim_start_matches("ORDERLY_")), v.to_owned()))
            .collect::<Vec<_>>();
        orderly::settings::load(None, env.into_iter())
    };
    let settings = match loaded {
        Ok(settings) => settings,
        Err(error) => {
            let top = error.to_string();
            assert!(
                top.starts_with("configuration is not valid TOML")
                    || top.starts_with("invalid configuration")
                    || top.starts_with("environment variable ORDERLY_"),
                "unclassified configuration error: {error:#}"
            );
            return;
        }
    };
    let _ = orderly_http::KeyRing::from_settings(&settings.auth);
    let _ = orderly_http::Limits::from_settings(&settings.http);
    if let Ok(pct) = u8::try_from(settings.inventory.safety_stock_pct) {
        let _ = orderly_domain::ledger::LedgerConfig::new(settings.inventory.partitions, pct);
    }
    if settings.carriers.endpoints.len() <= 4 {
        let _ = orderly::adapters::carriers(&settings);
    }
    let _ = orderly::adapters::notifier(&settings);
}
