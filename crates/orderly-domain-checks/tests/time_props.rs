//! Property of timestamps' RFC 3339 form: every instant from the epoch to
//! about the year 2223 prints as a string that parses back to the same instant.
//! (Moved here from an inline test in `orderly-domain/src/time.rs`; it only
//! needs the public API.)

use orderly_domain::Timestamp;
use proptest::prelude::*;

proptest! {
    #[test]
    fn display_round_trips(ms in 0i64..8_000_000_000_000) {
        let t = Timestamp(ms);
        prop_assert_eq!(Timestamp::parse_rfc3339(&t.to_string()), Some(t));
    }
}
