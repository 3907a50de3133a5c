//! Identifier newtypes, parsed at the edge so the rest of the domain never
//! sees an empty, oversized or ill-formed id.

use serde::{Deserialize, Serialize, Serializer};
use std::fmt;
use std::sync::Arc;

/// Longest id the domain accepts, in bytes.
pub const ID_LEN_MAX: usize = 64;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string is empty.
    #[error("{kind} must not be empty")]
    Empty {
        /// Which kind of id was being parsed.
        kind: &'static str,
    },
    /// The string is longer than [`ID_LEN_MAX`].
    #[error("{kind} is longer than {max} characters")]
    TooLong {
        /// Which kind of id was being parsed.
        kind: &'static str,
        /// The limit.
        max: usize,
    },
    /// The string has a character outside `[A-Za-z0-9._:-]`.
    #[error("{kind} may only contain letters, digits, '.', '_', ':' and '-'")]
    BadChar {
        /// Which kind of id was being parsed.
        kind: &'static str,
    },
}

fn check(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > ID_LEN_MAX {
        return Err(IdError::TooLong { kind, max: ID_LEN_MAX });
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')) {
        return Err(IdError::BadChar { kind });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        ///
        /// Immutable and shared: a clone is a reference count, not a copy
        /// (ids are cloned into events, caches and queues by the million).
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            /// Parses and validates an identifier.
            pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check($kind, &s)?;
                Ok(Self(Arc::from(s)))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                String::from(&*id.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(/// An order's id.
    OrderId, "order id");
id_type!(/// An order line's id, unique across orders (e.g. `<order id>:1`).
    LineId, "line id");
id_type!(/// A stock-keeping unit.
    Sku, "sku");
id_type!(/// A stock location: a warehouse, a drop-shipper or a marketplace.
    LocationId, "location id");
id_type!(/// A customer's id.
    CustomerId, "customer id");
id_type!(/// A cart hold's id.
    HoldId, "hold id");
id_type!(/// A pick task's id.
    PickId, "pick id");
id_type!(/// A shipment's id.
    ShipmentId, "shipment id");
id_type!(/// A shipping zone, e.g. `EU`.
    Zone, "zone");

impl LineId {
    /// The id of line number `n` (1-based) of an order.
    pub fn for_order(order: &OrderId, n: u32) -> LineId {
        // An order id is at most ID_LEN_MAX bytes of the allowed alphabet; the
        // suffix keeps it in the alphabet. Truncation is never needed for ids
        // shorter than ID_LEN_MAX - 11; longer ones are hashed down.
        let mut s = String::with_capacity(order.as_str().len() + 11);
        s.push_str(order.as_str());
        s.push(':');
        push_decimal(&mut s, u64::from(n));
        if s.len() <= ID_LEN_MAX {
            LineId(Arc::from(s))
        } else {
            LineId(Arc::from(format!("{:016x}:{}", fnv1a(order.as_str().as_bytes()), n)))
        }
    }
}

/// FNV-1a, used only to shorten derived ids deterministically.
/// A lowercase hyphenated UUID (8-4-4-4-12 hex digits) as its 16 bytes;
/// any other spelling (uppercase, braces, no hyphens) is `None`, so
/// [`push_uuid`] gives back exactly the text that was packed.
pub fn pack_uuid(text: &str) -> Option<[u8; 16]> {
    let text = text.as_bytes();
    if text.len() != 36 {
        return None;
    }
    let hex = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut bytes = [0u8; 16];
    let (mut i, mut j) = (0, 0);
    while i < 36 {
        if matches!(i, 8 | 13 | 18 | 23) {
            if text[i] != b'-' {
                return None;
            }
            i += 1;
            continue;
        }
        bytes[j] = (hex(text[i])? << 4) | hex(text[i + 1])?;
        (i, j) = (i + 2, j + 1);
    }
    Some(bytes)
}

/// Appends `bytes` as a lowercase hyphenated UUID (what [`pack_uuid`] reads).
pub fn push_uuid(out: &mut String, bytes: &[u8; 16]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [b'-'; 36];
    let mut at = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        text[at] = HEX[usize::from(b >> 4)];
        text[at + 1] = HEX[usize::from(b & 0xf)];
        at += 2;
    }
    out.push_str(std::str::from_utf8(&text).expect("hex digits and hyphens"));
}

/// Appends `n` in decimal, as `write!(out, "{n}")` would, without the
/// formatting machinery (ids and amounts are spelled on every order's path).
pub fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[at..]).expect("ASCII digits"));
}

pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_and_line_ids_are_spelled_as_format_spells_them() {
        let mut n = 1u64;
        let mut values = vec![0, 1, 9, 10, 99, 100, 4_294_967_295, u64::MAX - 1, u64::MAX];
        for _ in 0..2_000 {
            n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            values.push(n >> (n % 64));
        }
        for v in values {
            let mut s = String::from("x");
            push_decimal(&mut s, v);
            assert_eq!(s, format!("x{v}"));
        }
        let order = OrderId::parse("o-0190a6f1-0000-7000-8000-000000000001").expect("order id");
        for n in [0, 1, 12, u32::MAX] {
            assert_eq!(LineId::for_order(&order, n).as_str(), format!("{}:{n}", order.as_str()));
        }
        let long = OrderId::parse("o".repeat(ID_LEN_MAX)).expect("longest order id");
        let line = LineId::for_order(&long, 3);
        assert_eq!(line.as_str(), format!("{:016x}:3", fnv1a(long.as_str().as_bytes())), "hashed down");
    }

    #[test]
    fn parses_valid_ids_and_rejects_bad_ones() {
        assert!(Sku::parse("SKU-1").is_ok());
        assert_eq!(Sku::parse(""), Err(IdError::Empty { kind: "sku" }));
        assert!(matches!(Sku::parse("a b"), Err(IdError::BadChar { .. })));
        assert!(matches!(Sku::parse("x".repeat(65)), Err(IdError::TooLong { .. })));
    }

    #[test]
    fn serde_round_trip_validates() {
        let s: Sku = serde_json::from_str("\"SKU-9\"").expect("valid sku");
        assert_eq!(s.as_str(), "SKU-9");
        assert!(serde_json::from_str::<Sku>("\"bad sku\"").is_err());
    }

    #[test]
    fn line_ids_stay_valid_for_long_order_ids() {
        let o = OrderId::parse("o".repeat(64)).expect("valid");
        let l = LineId::for_order(&o, 12);
        assert!(LineId::parse(l.as_str()).is_ok());
    }
}
