//! The CloudEvents 1.0 envelope every service emits, with Orderly's extension
//! attributes `sequence` and `idempotencykey`, and the catalog of event types.

use crate::time::Timestamp;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

/// The CloudEvents spec version Orderly speaks.
pub const SPEC_VERSION: &str = "1.0";

/// A CloudEvents 1.0 event in JSON form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Always `"1.0"`.
    pub specversion: String,
    /// A UUIDv7, unique per event; consumers deduplicate on it.
    pub id: String,
    /// The producing service, e.g. `/orderly/orders`.
    pub source: String,
    /// The event type, e.g. `orderly.order.created`.
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// The order id or SKU the event is about.
    pub subject: String,
    /// When the producer decided it.
    pub time: Timestamp,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// The payload, kept as the JSON text it was written or read as
    /// (`null` when an incoming event has none: CloudEvents data is optional).
    #[serde(default)]
    pub data: EventData,
    /// Per-(source, subject) version, strictly increasing from 1.
    pub sequence: u64,
    /// What makes a second delivery of the same effect recognisable.
    pub idempotencykey: String,
    /// `high` for same-day / flash-sale work that travels on its own channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
}

/// The idempotency key [`Envelope::new`] gives an event:
/// `source/subject/sequence`, as `format!` would spell it (built without it:
/// every event written or read back takes one).
pub fn default_idempotency_key(source: &str, subject: &str, sequence: u64) -> String {
    let mut key = String::with_capacity(source.len() + subject.len() + 22);
    key.push_str(source);
    key.push('/');
    key.push_str(subject);
    key.push('/');
    crate::ids::push_decimal(&mut key, sequence);
    key
}

impl Envelope {
    /// Builds an envelope; `id` and `time` come from the caller's id source and clock.
    pub fn new(
        id: String,
        source: &str,
        event_type: EventType,
        subject: &str,
        time: Timestamp,
        sequence: u64,
        data: impl Into<EventData>,
    ) -> Envelope {
        let idempotencykey = default_idempotency_key(source, subject, sequence);
        Envelope {
            specversion: SPEC_VERSION.to_owned(),
            id,
            source: source.to_owned(),
            event_type,
            subject: subject.to_owned(),
            time,
            datacontenttype: "application/json".to_owned(),
            data: data.into(),
            sequence,
            idempotencykey,
            priority: None,
        }
    }

    /// Checks what a consumer must be able to rely on before acting on an
    /// envelope that came from outside (a broker, a replay).
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        if self.specversion != SPEC_VERSION {
            return Err(EnvelopeError::SpecVersion(self.specversion.clone()));
        }
        if self.id.is_empty() || self.id.len() > 128 {
            return Err(EnvelopeError::Field("id"));
        }
        if self.source.is_empty() || self.subject.is_empty() {
            return Err(EnvelopeError::Field("source/subject"));
        }
        if self.sequence == 0 {
            return Err(EnvelopeError::Field("sequence"));
        }
        if let EventType::Unknown(t) = &self.event_type {
            return Err(EnvelopeError::UnknownType(t.clone()));
        }
        Ok(())
    }
}

/// An event's `data`: its JSON text, serialized once by the producer (or
/// read once from a store or broker) and shared, never re-encoded.
///
/// An envelope is cloned for every consumer, the tail and the broker; with a
/// tree (`serde_json::Value`) each clone copied every map and string, each
/// drop freed them, and every store wrote the tree out again. The text is
/// immutable, so a clone is a reference count, the store writes the bytes as
/// they are, and a consumer parses straight into its contract type
/// ([`EventData::read`]) or probes one top-level field
/// ([`EventData::field`], [`EventData::str_field`]) without building a tree.
#[derive(Clone)]
pub struct EventData(Arc<RawValue>);

impl EventData {
    /// Serializes `value` once.
    pub fn of<T: Serialize + ?Sized>(value: &T) -> EventData {
        EventData(Arc::from(
            serde_json::value::to_raw_value(value).expect("event payloads are plain data and always serialize"),
        ))
    }

    /// Takes JSON text as it is, after checking it is one JSON value that
    /// parses (as a tree would: a lone surrogate escape or a number out of
    /// range is refused, which skipping over the text would not notice).
    pub fn parse_text(text: &str) -> Result<EventData, serde_json::Error> {
        let raw = RawValue::from_string(text.trim().to_owned())?;
        serde_json::from_str::<Valid>(raw.get())?;
        Ok(EventData(Arc::from(raw)))
    }

    /// The JSON text.
    pub fn text(&self) -> &str {
        self.0.get()
    }

    /// Parses the text into `T` (which may borrow from it).
    pub fn read<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    /// The data as a tree (for tests, tools and the simulator's checks).
    pub fn value(&self) -> serde_json::Value {
        self.read().unwrap_or(serde_json::Value::Null)
    }

    /// The raw text of the top-level field `key`, if the data is an object
    /// that has it (the last one if it is named twice, as a tree would keep).
    /// Other fields are skipped, not built.
    pub fn field(&self, key: &str) -> Option<&RawValue> {
        // The text of a raw value starts at its first character.
        if !self.0.get().starts_with('{') {
            return None;
        }
        let mut de = serde_json::Deserializer::from_str(self.0.get());
        FieldSeed { key }.deserialize(&mut de).ok().flatten()
    }

    /// The top-level field `key` if it is a string (borrowed unless it has escapes).
    pub fn str_field(&self, key: &str) -> Option<Cow<'_, str>> {
        let raw = self.field(key)?;
        if !raw.get().starts_with('"') {
            return None;
        }
        let mut de = serde_json::Deserializer::from_str(raw.get());
        de.deserialize_str(Text).ok()
    }

    /// The top-level keys, in order (duplicates included), if the data is an object.
    pub fn keys(&self) -> Vec<String> {
        let mut de = serde_json::Deserializer::from_str(self.0.get());
        de.deserialize_any(KeysOf).unwrap_or_default()
    }
}

impl From<serde_json::Value> for EventData {
    fn from(value: serde_json::Value) -> EventData {
        EventData::of(&value)
    }
}

impl Default for EventData {
    fn default() -> EventData {
        EventData::from(serde_json::Value::Null)
    }
}

impl PartialEq for EventData {
    /// Equal as JSON values: the same data spelled with other whitespace or key order is equal.
    fn eq(&self, other: &EventData) -> bool {
        self.text() == other.text() || self.value() == other.value()
    }
}

impl fmt::Debug for EventData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

impl Serialize for EventData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for EventData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<EventData, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        serde_json::from_str::<Valid>(raw.get()).map_err(de::Error::custom)?;
        Ok(EventData(Arc::from(raw)))
    }
}

/// Proof that JSON text parses the way a full parse into a tree would, with
/// every string decoded (escapes included) and nothing kept.
struct Valid;

impl<'de> Deserialize<'de> for Valid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Valid, D::Error> {
        d.deserialize_any(ValidVisitor)
    }
}

struct ValidVisitor;

impl<'de> Visitor<'de> for ValidVisitor {
    type Value = Valid;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Valid, E> {
        Ok(Valid)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Valid, A::Error> {
        while seq.next_element::<Valid>()?.is_some() {}
        Ok(Valid)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Valid, A::Error> {
        while map.next_entry::<Valid, Valid>()?.is_some() {}
        Ok(Valid)
    }
}

/// Walks one object, keeping the raw value of `key` and skipping the rest.
struct FieldSeed<'k> {
    key: &'k str,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Option<&'de RawValue>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Option<&'de RawValue>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(is_key) = map.next_key_seed(KeyIs(self.key))? {
            if is_key {
                // The last one wins, as in a full parse into a tree.
                found = Some(map.next_value::<&'de RawValue>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Whether a map key equals the wanted one, compared without allocating.
struct KeyIs<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

/// A JSON string, borrowed from the text when it has no escapes.
struct Text;

impl<'de> Visitor<'de> for Text {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}

/// The keys of one object.
struct KeysOf;

impl<'de> Visitor<'de> for KeysOf {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
        let mut keys = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<IgnoredAny>()?;
            keys.push(key);
        }
        Ok(keys)
    }
}

/// Why an envelope cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Not CloudEvents 1.0.
    #[error("unsupported specversion {0:?}")]
    SpecVersion(String),
    /// A required attribute is missing or out of range.
    #[error("invalid or missing attribute {0}")]
    Field(&'static str),
    /// An event type outside the catalog.
    #[error("unknown event type {0:?}")]
    UnknownType(String),
}

macro_rules! catalog {
    ($($variant:ident => $name:literal,)*) => {
        /// Every event type Orderly emits (PRODUCT.md §3).
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum EventType {
            $(
                #[doc = concat!("`", $name, "`")]
                $variant,
            )*
            /// A type this version does not know (kept so it can be dead-lettered, not dropped).
            Unknown(String),
        }

        impl EventType {
            /// Every known type, in catalog order.
            pub const ALL: &'static [EventType] = &[$(EventType::$variant,)*];

            /// The wire name.
            pub fn as_str(&self) -> &str {
                match self {
                    $(EventType::$variant => $name,)*
                    EventType::Unknown(s) => s,
                }
            }

            /// Parses a wire name; unknown names are kept as [`EventType::Unknown`].
            pub fn parse(s: &str) -> EventType {
                match s {
                    $($name => EventType::$variant,)*
                    other => EventType::Unknown(other.to_owned()),
                }
            }
        }
    };
}

catalog! {
    OrderCreated => "orderly.order.created",
    OrderConfirmed => "orderly.order.confirmed",
    OrderAllocated => "orderly.order.allocated",
    OrderBackordered => "orderly.order.backordered",
    OrderPickingStarted => "orderly.order.picking_started",
    OrderPicked => "orderly.order.picked",
    OrderPickShorted => "orderly.order.pick_shorted",
    OrderPacked => "orderly.order.packed",
    OrderPartiallyShipped => "orderly.order.partially_shipped",
    OrderShipped => "orderly.order.shipped",
    OrderShipmentDelivered => "orderly.order.shipment_delivered",
    OrderDelivered => "orderly.order.delivered",
    OrderCanceled => "orderly.order.canceled",
    OrderReturnRequested => "orderly.order.return_requested",
    OrderReturned => "orderly.order.returned",
    OrderDeallocated => "orderly.order.deallocated",
    OrderVoided => "orderly.order.voided",
    InventoryReserved => "orderly.inventory.reserved",
    InventoryBackordered => "orderly.inventory.backordered",
    InventoryReleased => "orderly.inventory.released",
    InventoryAdjusted => "orderly.inventory.adjusted",
    InventoryReceived => "orderly.inventory.received",
    InventoryCommitted => "orderly.inventory.committed",
    InventoryDeallocated => "orderly.inventory.deallocated",
    HoldCreated => "orderly.hold.created",
    HoldExpired => "orderly.hold.expired",
    HoldConsumed => "orderly.hold.consumed",
    HoldUnclaimed => "orderly.hold.unclaimed",
    PickRequested => "orderly.pick.requested",
    PickCompleted => "orderly.pick.completed",
    PickShort => "orderly.pick.short",
    PickCanceled => "orderly.pick.canceled",
    PackCompleted => "orderly.pack.completed",
    ShipmentLabelCreated => "orderly.shipment.label_created",
    ShipmentCarrierFallback => "orderly.shipment.carrier_fallback",
    ShipmentDelivered => "orderly.shipment.delivered",
    NotificationSent => "orderly.notification.sent",
    NotificationFailed => "orderly.notification.failed",
}

impl EventType {
    /// The domain part of the name (`order`, `inventory`, …).
    pub fn domain(&self) -> &str {
        self.as_str().split('.').nth(1).unwrap_or("")
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EventType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<EventType, D::Error> {
        let s = String::deserialize(d)?;
        Ok(EventType::parse(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_idempotency_key_is_source_subject_sequence() {
        for seq in [0, 1, 10, 12_345, u64::MAX] {
            assert_eq!(default_idempotency_key("/orderly/orders", "o-1", seq), format!("/orderly/orders/o-1/{seq}"));
        }
        let e = Envelope::new(
            "e".into(),
            "/orderly/inventory",
            EventType::OrderCreated,
            "SKU-1",
            Timestamp(0),
            7,
            serde_json::json!({}),
        );
        assert_eq!(e.idempotencykey, "/orderly/inventory/SKU-1/7");
    }

    #[test]
    fn envelope_round_trips_as_cloudevents_json() {
        let e = Envelope::new(
            "0190a6f1-0000-7000-8000-000000000001".into(),
            "/orderly/orders",
            EventType::OrderCreated,
            "o-1",
            Timestamp(1_764_150_000_000),
            1,
            serde_json::json!({"total": "19.99"}),
        );
        let json = serde_json::to_value(&e).expect("serializable");
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["type"], "orderly.order.created");
        assert_eq!(json["time"], "2025-11-26T09:40:00.000Z");
        assert_eq!(json["idempotencykey"], "/orderly/orders/o-1/1");
        let back: Envelope = serde_json::from_value(json).expect("parses");
        assert_eq!(back, e);
        assert_eq!(back.validate(), Ok(()));
    }

    #[test]
    fn event_data_keeps_the_text_and_reads_fields_without_a_tree() {
        let d =
            EventData::of(&serde_json::json!({"order_id": "o-1", "n": 3, "esc": "a\"b", "nested": {"order_id": "x"}}));
        assert_eq!(d.text(), r#"{"esc":"a\"b","n":3,"nested":{"order_id":"x"},"order_id":"o-1"}"#);
        assert_eq!(d.str_field("order_id").as_deref(), Some("o-1"));
        assert!(matches!(d.str_field("order_id"), Some(Cow::Borrowed(_))));
        assert_eq!(d.str_field("esc").as_deref(), Some("a\"b"));
        assert_eq!(d.str_field("n"), None);
        assert_eq!(d.field("n").map(RawValue::get), Some("3"));
        assert_eq!(d.field("nested").map(RawValue::get), Some(r#"{"order_id":"x"}"#));
        assert!(d.field("missing").is_none());
        assert_eq!(d.keys(), ["esc", "n", "nested", "order_id"]);
        assert!(EventData::default().field("x").is_none());
        assert_eq!(EventData::default().text(), "null");
        // Equality is by value, not by spelling.
        let spaced =
            EventData::parse_text(r#" { "order_id" : "o-1", "n": 3, "nested": {"order_id": "x"}, "esc": "a\"b" } "#)
                .expect("valid JSON");
        assert_eq!(spaced, d);
        assert!(EventData::parse_text("{").is_err());
        // Text a tree would refuse is refused, though skipping over it would pass.
        let envelope_with = |data: &str| {
            format!(
                r#"{{"specversion":"1.0","id":"i","source":"/s","type":"orderly.pick.completed","subject":"o",
                    "time":"2025-11-26T09:40:00.000Z","datacontenttype":"application/json","sequence":1,
                    "idempotencykey":"k","data":{data}}}"#
            )
        };
        assert!(serde_json::from_str::<Envelope>(&envelope_with(r#"{"a": "xy"}"#)).is_ok());
        for bad in [r#"{"a": "x\ud800y"}"#, r#"["\udc00"]"#, r#"{"n": 1e400}"#] {
            assert!(serde_json::from_str::<serde_json::Value>(bad).is_err(), "{bad}");
            assert!(EventData::parse_text(bad).is_err(), "{bad}");
            assert!(serde_json::from_str::<Envelope>(&envelope_with(bad)).is_err(), "{bad}");
        }
        assert!(EventData::parse_text(r#"{"a": "\ud83d\ude00", "n": 1e300}"#).is_ok());
        assert!(EventData::parse_text("{} {}").is_err());
        // A clone shares the text.
        let c = d.clone();
        assert!(std::ptr::eq(c.text(), d.text()));
        #[derive(Deserialize)]
        struct Probe<'a> {
            order_id: &'a str,
        }
        assert_eq!(d.read::<Probe>().expect("parses").order_id, "o-1");
        // The last of a twice-named field wins, as in a tree.
        let twice = EventData::parse_text(r#"{"k": 1, "k": 2}"#).expect("valid JSON");
        assert_eq!(twice.field("k").map(RawValue::get), Some("2"));
        assert_eq!(twice.keys(), ["k", "k"]);
        // CloudEvents data is optional.
        let no_data: Envelope = serde_json::from_str(
            r#"{"specversion":"1.0","id":"i","source":"/s","type":"orderly.pick.completed","subject":"o",
                "time":"2025-11-26T09:40:00.000Z","datacontenttype":"application/json","sequence":1,"idempotencykey":"k"}"#,
        )
        .expect("data is optional");
        assert_eq!(no_data.data.text(), "null");
    }

    #[test]
    fn catalog_names_parse_back() {
        for t in EventType::ALL {
            assert_eq!(&EventType::parse(t.as_str()), t);
            assert!(t.as_str().starts_with("orderly."));
        }
        assert_eq!(EventType::OrderCreated.domain(), "order");
        assert!(matches!(EventType::parse("x.y"), EventType::Unknown(_)));
    }

    #[test]
    fn validate_rejects_foreign_envelopes() {
        let mut e =
            Envelope::new("id".into(), "/s", EventType::PickCompleted, "o", Timestamp(0), 1, serde_json::Value::Null);
        e.specversion = "0.3".into();
        assert!(matches!(e.validate(), Err(EnvelopeError::SpecVersion(_))));
        e.specversion = "1.0".into();
        e.sequence = 0;
        assert_eq!(e.validate(), Err(EnvelopeError::Field("sequence")));
    }
}
