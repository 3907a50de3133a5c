//! The CloudEvents 1.0 envelope every service emits, with Orderly's extension
//! attributes `sequence` and `idempotencykey`, and the catalog of event types.

use crate::time::Timestamp;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

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
    /// The payload.
    pub data: serde_json::Value,
    /// Per-(source, subject) version, strictly increasing from 1.
    pub sequence: u64,
    /// What makes a second delivery of the same effect recognisable.
    pub idempotencykey: String,
    /// `high` for same-day / flash-sale work that travels on its own channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
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
        data: serde_json::Value,
    ) -> Envelope {
        let idempotencykey = format!("{source}/{subject}/{sequence}");
        Envelope {
            specversion: SPEC_VERSION.to_owned(),
            id,
            source: source.to_owned(),
            event_type,
            subject: subject.to_owned(),
            time,
            datacontenttype: "application/json".to_owned(),
            data,
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
