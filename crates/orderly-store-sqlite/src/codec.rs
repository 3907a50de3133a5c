//! How an outbox event is kept in a SQLite file: a compact binary header
//! and the event's `data` as JSON. Only the storage changes; every reader
//! gets the same [`Envelope`] back, and the wire (HTTP, NATS) still carries
//! CloudEvents JSON.
//!
//! A CloudEvents JSON event spends about 350 of its 450–650 bytes on
//! attributes that are constant (`specversion`, `datacontenttype`), derived
//! (`idempotencykey` is `source/subject/sequence`) or spelled long (a UUID in
//! 36 characters, a time in 24). The outbox was the largest table of the
//! orders and inventory files; every byte of it is written twice (WAL, then
//! the checkpoint).
//!
//! Layout of format 1 (a JSON event starts with `{`, so the first byte tells
//! them apart, and rows written before this format are still read):
//!
//! | bytes | field |
//! |---|---|
//! | 1 | format, `1` |
//! | 1 | flags: bit 0 id packed, bit 1 specversion not `1.0`, bit 2 datacontenttype not `application/json`, bit 3 idempotencykey not derived, bit 4 priority present |
//! | 16 or string | id: a lowercase hyphenated UUID as its 16 bytes, else a string |
//! | string | source |
//! | string | type |
//! | string | subject |
//! | 8 | time, milliseconds since the epoch, little endian |
//! | varint | sequence |
//! | strings | specversion, datacontenttype, idempotencykey, priority, each only if its flag is set |
//! | rest | data, JSON |
//!
//! A string is a varint length and UTF-8 bytes.

use orderly_domain::Timestamp;
use orderly_domain::event::{Envelope, EventData, EventType, SPEC_VERSION};
use orderly_domain::ids::{pack_uuid, push_uuid};

const FORMAT: u8 = 1;
const ID_PACKED: u8 = 1;
const SPEC_OTHER: u8 = 1 << 1;
const CONTENT_OTHER: u8 = 1 << 2;
const KEY_OTHER: u8 = 1 << 3;
const PRIORITY: u8 = 1 << 4;
const CONTENT_TYPE: &str = "application/json";

/// Encodes `env` for the outbox table.
pub fn encode(env: &Envelope) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(160);
    let packed = pack_uuid(&env.id);
    let derived = is_derived_key(env);
    let mut flags = 0;
    flags |= if packed.is_some() { ID_PACKED } else { 0 };
    flags |= if env.specversion != SPEC_VERSION { SPEC_OTHER } else { 0 };
    flags |= if env.datacontenttype != CONTENT_TYPE { CONTENT_OTHER } else { 0 };
    flags |= if derived { 0 } else { KEY_OTHER };
    flags |= if env.priority.is_some() { PRIORITY } else { 0 };
    out.push(FORMAT);
    out.push(flags);
    match packed {
        Some(bytes) => out.extend_from_slice(&bytes),
        None => put_str(&mut out, &env.id),
    }
    put_str(&mut out, &env.source);
    put_str(&mut out, env.event_type.as_str());
    put_str(&mut out, &env.subject);
    out.extend_from_slice(&env.time.0.to_le_bytes());
    put_varint(&mut out, env.sequence);
    if flags & SPEC_OTHER != 0 {
        put_str(&mut out, &env.specversion);
    }
    if flags & CONTENT_OTHER != 0 {
        put_str(&mut out, &env.datacontenttype);
    }
    if flags & KEY_OTHER != 0 {
        put_str(&mut out, &env.idempotencykey);
    }
    if let Some(p) = &env.priority {
        put_str(&mut out, p);
    }
    // The data is JSON text already (serialized once by its producer).
    out.extend_from_slice(env.data.text().as_bytes());
    Ok(out)
}

/// Decodes a stored event in either format.
pub fn decode(bytes: &[u8]) -> Result<Envelope, String> {
    match bytes.first() {
        Some(b'{') => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        Some(&FORMAT) => decode_compact(&bytes[1..]).ok_or_else(|| "truncated or malformed compact event".to_owned()),
        Some(other) => Err(format!("unknown event format {other}")),
        None => Err("empty event".to_owned()),
    }
}

fn decode_compact(bytes: &[u8]) -> Option<Envelope> {
    let mut r = Reader(bytes);
    let flags = r.byte()?;
    let id = match flags & ID_PACKED != 0 {
        true => spell_uuid(r.take(16)?.try_into().ok()?),
        false => r.string()?,
    };
    let source = r.string()?;
    let event_type = EventType::parse(r.str()?);
    let subject = r.string()?;
    let time = Timestamp(i64::from_le_bytes(r.take(8)?.try_into().ok()?));
    let sequence = r.varint()?;
    let specversion = match flags & SPEC_OTHER != 0 {
        true => r.string()?,
        false => SPEC_VERSION.to_owned(),
    };
    let datacontenttype = match flags & CONTENT_OTHER != 0 {
        true => r.string()?,
        false => CONTENT_TYPE.to_owned(),
    };
    let idempotencykey = match flags & KEY_OTHER != 0 {
        true => r.string()?,
        false => derived_key(&source, &subject, sequence),
    };
    let priority = match flags & PRIORITY != 0 {
        true => Some(r.string()?),
        false => None,
    };
    let data = EventData::parse_text(std::str::from_utf8(r.0).ok()?).ok()?;
    Some(Envelope {
        specversion,
        id,
        source,
        event_type,
        subject,
        time,
        datacontenttype,
        data,
        sequence,
        idempotencykey,
        priority,
    })
}

/// The key [`Envelope::new`] gives an event.
fn derived_key(source: &str, subject: &str, sequence: u64) -> String {
    orderly_domain::event::default_idempotency_key(source, subject, sequence)
}

fn is_derived_key(env: &Envelope) -> bool {
    // `source/subject/sequence`, compared piece by piece without formatting.
    let Some(rest) = env.idempotencykey.strip_prefix(env.source.as_str()) else { return false };
    let Some(rest) = rest.strip_prefix('/') else { return false };
    let Some(rest) = rest.strip_prefix(env.subject.as_str()) else { return false };
    let Some(seq) = rest.strip_prefix('/') else { return false };
    // The sequence as `u64`'s Display spells it: digits only, no leading
    // zero (no allocation: this runs for every event written).
    let canonical = seq.bytes().all(|b| b.is_ascii_digit()) && (seq == "0" || !seq.starts_with('0'));
    canonical && seq.parse::<u64>() == Ok(env.sequence)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn str(&mut self) -> Option<&'a str> {
        let n = usize::try_from(self.varint()?).ok()?;
        std::str::from_utf8(self.take(n)?).ok()
    }

    fn string(&mut self) -> Option<String> {
        self.str().map(str::to_owned)
    }
}

/// An order id (`o-` and a lowercase hyphenated UUID) as its UUID's 16
/// bytes; any other subject is `None`. The outbox's subject index stores
/// these instead of the 38 characters: half the bytes an entry, in the
/// UUIDv7's time order (see `write_batch`).
pub fn pack_order_subject(subject: &str) -> Option<[u8; 16]> {
    pack_uuid(subject.strip_prefix("o-")?)
}

/// The id's 16 bytes spelled as the UUID they were packed from.
fn spell_uuid(bytes: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    push_uuid(&mut s, bytes);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event() -> Envelope {
        let mut e = Envelope::new(
            "01a21f60-5397-719d-b6de-11046bfad424".into(),
            "/orderly/orders",
            EventType::OrderBackordered,
            "o-01a21f60-536a-7b1f-8493-aa220d692cc9",
            Timestamp(1_795_823_936_279),
            3,
            json!({"order_id": "o-01a21f60-536a-7b1f-8493-aa220d692cc9", "state": "backordered", "n": 1.5}),
        );
        e.priority = Some("high".into());
        e
    }

    #[test]
    fn round_trips_and_is_much_smaller_than_json() {
        let e = event();
        let bytes = encode(&e).unwrap();
        assert_eq!(decode(&bytes).unwrap(), e);
        let json = serde_json::to_vec(&e).unwrap();
        assert!(bytes.len() * 2 < json.len(), "{} compact bytes against {} JSON", bytes.len(), json.len());
        let key = e.idempotencykey.as_bytes();
        assert!(!bytes.windows(key.len()).any(|w| w == key), "a derived idempotency key is not stored");
    }

    #[test]
    fn reads_json_rows_written_before_the_compact_format() {
        let e = event();
        assert_eq!(decode(&serde_json::to_vec(&e).unwrap()).unwrap(), e);
    }

    #[test]
    fn keeps_every_attribute_that_is_not_the_default() {
        let mut variants = Vec::new();
        for id in ["01A21F60-5397-719D-B6DE-11046BFAD424", "ev-1", "01a21f60-5397-719d-b6de-11046bfad42", ""] {
            let mut e = event();
            e.id = id.into();
            variants.push(e);
        }
        let mut e = event();
        e.specversion = "0.3".into();
        variants.push(e);
        let mut e = event();
        e.datacontenttype = "text/json".into();
        variants.push(e);
        for key in [
            "custom",
            "/orderly/orders/o-01a21f60-536a-7b1f-8493-aa220d692cc9/03",
            "/orderly/orders/o-01a21f60-536a-7b1f-8493-aa220d692cc9/+3",
            "/orderly/orders/o-01a21f60-536a-7b1f-8493-aa220d692cc9/",
            "/orderly/orders/o-01a21f60-536a-7b1f-8493-aa220d692cc9/4",
            "/orderly/orders/x/3",
        ] {
            let mut e = event();
            e.idempotencykey = key.into();
            variants.push(e);
        }
        let mut e = event();
        e.priority = None;
        e.event_type = EventType::Unknown("vendor.thing".into());
        e.sequence = u64::MAX;
        e.time = Timestamp(i64::MIN);
        e.data = json!(null).into();
        variants.push(e);
        for e in variants {
            let bytes = encode(&e).unwrap();
            assert_eq!(decode(&bytes).unwrap(), e, "{e:?}");
        }
    }

    #[test]
    fn refuses_truncated_or_unknown_rows_without_panicking() {
        let bytes = encode(&event()).unwrap();
        for n in 0..bytes.len() {
            let cut = &bytes[..n];
            // A cut inside the JSON data still fails to parse; earlier cuts
            // fail in the header. Never a panic.
            assert!(decode(cut).is_err(), "a {n}-byte prefix decoded");
        }
        assert!(decode(&[7, 0]).is_err());
        assert!(decode(&[FORMAT, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
    }

    #[test]
    fn uuid_packing_round_trips_only_the_canonical_spelling() {
        let s = "01a21f60-5397-719d-b6de-11046bfad424";
        assert_eq!(spell_uuid(&pack_uuid(s).unwrap()), s);
        for other in [
            "01A21F60-5397-719D-B6DE-11046BFAD424",
            "01a21f6005397-719d-b6de-11046bfad424",
            "g1a21f60-5397-719d-b6de-11046bfad424",
        ] {
            assert!(pack_uuid(other).is_none(), "{other}");
        }
    }
}
