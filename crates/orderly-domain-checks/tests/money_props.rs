//! Property of money's decimal form: every amount in the accepted range prints
//! as a string that parses back to the same amount. (Moved here from an inline
//! test in `orderly-domain/src/money.rs`; it only needs the public API.)

use orderly_domain::Money;
use orderly_domain::money::MONEY_MINOR_MAX;
use proptest::prelude::*;

proptest! {
    #[test]
    fn display_round_trips(minor in -MONEY_MINOR_MAX..=MONEY_MINOR_MAX) {
        let m = Money::from_minor(minor);
        prop_assert_eq!(Money::parse(&m.to_string()), Ok(m));
    }
}
