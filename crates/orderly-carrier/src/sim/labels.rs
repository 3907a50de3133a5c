//! The simulator's label book: validation of label requests, pricing, and a
//! bounded store that makes label creation idempotent per carrier and key.

use super::config::Cents;
use crate::wire::{Label, LabelRequest, TrackingInfo};
use std::collections::{HashMap, VecDeque};

/// The most labels kept; beyond it the oldest label (and its idempotency key)
/// is forgotten, as real carriers expire keys after a while.
pub const LABELS_MAX: usize = 100_000;
/// The heaviest parcel accepted, in grams.
pub const WEIGHT_G_MAX: u32 = 70_000;
/// The longest shipment id or zone.
pub const ID_LEN_MAX: usize = 64;
/// The longest idempotency key.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 128;
/// Surcharge per started kilogram beyond the first, in cents.
const SURCHARGE_CENTS_PER_KG: u64 = 50;

/// Why a label request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LabelError {
    /// A field is missing, malformed or out of range.
    #[error("{0}")]
    Invalid(String),
    /// The idempotency key was used before for a different request.
    #[error("idempotency key {0:?} was already used for a different label request")]
    KeyReused(String),
}

/// What creating a label did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Created {
    /// A new label was created and charged.
    New(Label),
    /// The key was known: the original label, not charged again.
    Replay(Label),
}

/// Checks every field of a label request.
pub(crate) fn validate(request: &LabelRequest) -> Result<(), LabelError> {
    check_id("shipment_id", &request.shipment_id)?;
    check_id("zone", &request.zone)?;
    if request.weight_g == 0 || request.weight_g > WEIGHT_G_MAX {
        return Err(LabelError::Invalid(format!("weight_g must be between 1 and {WEIGHT_G_MAX}")));
    }
    let key = &request.idempotency_key;
    if key.is_empty() || key.len() > IDEMPOTENCY_KEY_LEN_MAX || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(LabelError::Invalid(format!(
            "idempotency_key must be 1 to {IDEMPOTENCY_KEY_LEN_MAX} visible ASCII characters"
        )));
    }
    Ok(())
}

/// The price of a label: the base price up to 1 kg, plus a surcharge per
/// started kilogram beyond it.
pub(crate) fn price(base: Cents, weight_g: u32) -> Cents {
    let extra_kg = u64::from(weight_g.saturating_sub(1) / 1000);
    base.plus(extra_kg * SURCHARGE_CENTS_PER_KG)
}

/// Labels by tracking number and by (carrier, idempotency key), bounded by [`LABELS_MAX`].
#[derive(Debug, Default)]
pub(crate) struct LabelBook {
    by_tracking: HashMap<String, Stored>,
    by_key: HashMap<(String, String), String>,
    oldest_first: VecDeque<String>,
    sequence: u64,
}

#[derive(Debug, Clone)]
struct Stored {
    label: Label,
    request: LabelRequest,
}

impl LabelBook {
    /// The label already created for this request's key, if any; an error if
    /// the key was used for a different request.
    pub(crate) fn replay(&self, request: &LabelRequest) -> Result<Option<Label>, LabelError> {
        let key = (request.carrier.clone(), request.idempotency_key.clone());
        let Some(stored) = self.by_key.get(&key).and_then(|tracking| self.by_tracking.get(tracking)) else {
            return Ok(None);
        };
        if stored.request != *request {
            return Err(LabelError::KeyReused(request.idempotency_key.clone()));
        }
        Ok(Some(stored.label.clone()))
    }

    /// Creates a label for a validated request that [`LabelBook::replay`] did
    /// not know, forgetting the oldest label when the book is full.
    pub(crate) fn create(&mut self, request: &LabelRequest, cost: Cents, created_at: String) -> Label {
        if self.oldest_first.len() >= LABELS_MAX {
            self.forget_oldest();
        }
        self.sequence += 1;
        let label = Label {
            tracking_number: format!("{}-{:010}", request.carrier.to_ascii_uppercase(), self.sequence),
            carrier: request.carrier.clone(),
            cost: cost.to_string(),
            created_at,
            label_id: format!("lbl-{:010}", self.sequence),
        };
        let tracking = label.tracking_number.clone();
        self.by_key.insert((request.carrier.clone(), request.idempotency_key.clone()), tracking.clone());
        self.by_tracking.insert(tracking.clone(), Stored { label: label.clone(), request: request.clone() });
        self.oldest_first.push_back(tracking);
        assert!(self.by_tracking.len() <= LABELS_MAX, "the label book is bounded");
        label
    }

    /// Tracking information for a known tracking number.
    pub(crate) fn tracking(&self, tracking_number: &str) -> Option<TrackingInfo> {
        let stored = self.by_tracking.get(tracking_number)?;
        Some(TrackingInfo {
            tracking_number: stored.label.tracking_number.clone(),
            carrier: stored.label.carrier.clone(),
            cost: stored.label.cost.clone(),
            created_at: stored.label.created_at.clone(),
            label_id: stored.label.label_id.clone(),
            shipment_id: stored.request.shipment_id.clone(),
            zone: stored.request.zone.clone(),
            weight_g: stored.request.weight_g,
            status: "label_created".to_owned(),
        })
    }

    fn forget_oldest(&mut self) {
        let Some(tracking) = self.oldest_first.pop_front() else { return };
        if let Some(stored) = self.by_tracking.remove(&tracking) {
            self.by_key.remove(&(stored.request.carrier, stored.request.idempotency_key));
        }
    }
}

fn check_id(field: &str, value: &str) -> Result<(), LabelError> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
    if value.is_empty() || value.len() > ID_LEN_MAX || !value.bytes().all(allowed) {
        return Err(LabelError::Invalid(format!(
            "{field} must be 1 to {ID_LEN_MAX} characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(key: &str) -> LabelRequest {
        LabelRequest {
            carrier: "fastship".to_owned(),
            shipment_id: "s-1".to_owned(),
            zone: "EU".to_owned(),
            weight_g: 500,
            idempotency_key: key.to_owned(),
        }
    }

    fn base() -> Cents {
        Cents::parse("4.95").expect("a valid constant")
    }

    #[test]
    fn price_adds_a_surcharge_per_started_kilogram() {
        assert_eq!(price(base(), 500).to_string(), "4.95");
        assert_eq!(price(base(), 1000).to_string(), "4.95");
        assert_eq!(price(base(), 1001).to_string(), "5.45");
        assert_eq!(price(base(), 3500).to_string(), "6.45");
    }

    #[test]
    fn validation_refuses_bad_fields() {
        assert_eq!(validate(&request("k")), Ok(()));
        let cases = [
            LabelRequest { weight_g: 0, ..request("k") },
            LabelRequest { weight_g: WEIGHT_G_MAX + 1, ..request("k") },
            LabelRequest { zone: String::new(), ..request("k") },
            LabelRequest { shipment_id: "a b".to_owned(), ..request("k") },
            request(""),
            request(&"k".repeat(IDEMPOTENCY_KEY_LEN_MAX + 1)),
        ];
        for case in cases {
            assert!(validate(&case).is_err(), "{case:?} should be refused");
        }
    }

    #[test]
    fn same_key_replays_and_different_body_is_refused() {
        let mut book = LabelBook::default();
        let first = book.create(&request("k"), base(), "t".to_owned());
        assert_eq!(book.replay(&request("k")), Ok(Some(first)));
        let other = LabelRequest { weight_g: 900, ..request("k") };
        assert_eq!(book.replay(&other), Err(LabelError::KeyReused("k".to_owned())));
        assert_eq!(book.replay(&request("other")), Ok(None));
    }

    #[test]
    fn the_book_forgets_its_oldest_label_when_full() {
        let mut book = LabelBook::default();
        let first = book.create(&request("k0"), base(), "t".to_owned());
        for i in 1..LABELS_MAX {
            book.create(&request(&format!("k{i}")), base(), "t".to_owned());
        }
        assert!(book.tracking(&first.tracking_number).is_some());
        book.create(&request("last"), base(), "t".to_owned());
        assert!(book.tracking(&first.tracking_number).is_none());
        assert_eq!(book.replay(&request("k0")), Ok(None));
        assert_eq!(book.by_tracking.len(), LABELS_MAX);
        assert_eq!(book.by_key.len(), LABELS_MAX);
    }
}
