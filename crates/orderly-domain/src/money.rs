//! Money as integer minor units (cents). Parsed from and printed as a decimal
//! string (`"19.99"`); never a float.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest amount accepted from outside, in minor units (one trillion).
pub const MONEY_MINOR_MAX: i64 = 100_000_000_000_000;

/// An amount of money in minor units (two decimal places).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Money(i64);

/// Why a string is not an amount of money.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Not of the form `123`, `123.4` or `123.45` (optionally negative).
    #[error("money must be a decimal string with at most two decimals, e.g. \"19.99\"")]
    Malformed,
    /// Larger than [`MONEY_MINOR_MAX`].
    #[error("amount is too large")]
    TooLarge,
}

impl Money {
    /// Zero.
    pub const ZERO: Money = Money(0);

    /// Builds an amount from minor units.
    pub const fn from_minor(minor: i64) -> Money {
        Money(minor)
    }

    /// The amount in minor units.
    pub const fn minor(self) -> i64 {
        self.0
    }

    /// Parses `"19.99"`, `"20"`, `"-3.5"`.
    pub fn parse(s: &str) -> Result<Money, MoneyError> {
        let (neg, body) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (whole, frac) = match body.split_once('.') {
            Some((w, f)) => (w, f),
            None => (body, ""),
        };
        let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty()
            || !digits(whole)
            || !digits(frac)
            || frac.len() > 2
            || (body.contains('.') && frac.is_empty())
        {
            return Err(MoneyError::Malformed);
        }
        if whole.len() > 13 {
            return Err(MoneyError::TooLarge);
        }
        let whole: i64 = whole.parse().map_err(|_| MoneyError::Malformed)?;
        let frac_minor: i64 = match frac.len() {
            0 => 0,
            1 => frac.parse::<i64>().map_err(|_| MoneyError::Malformed)? * 10,
            _ => frac.parse().map_err(|_| MoneyError::Malformed)?,
        };
        let minor = whole * 100 + frac_minor;
        if minor > MONEY_MINOR_MAX {
            return Err(MoneyError::TooLarge);
        }
        Ok(Money(if neg { -minor } else { minor }))
    }

    /// Sum, saturating (amounts are bounded at the edge, so this never saturates in practice).
    pub fn saturating_add(self, other: Money) -> Money {
        Money(self.0.saturating_add(other.0))
    }

    /// Difference, saturating.
    pub fn saturating_sub(self, other: Money) -> Money {
        Money(self.0.saturating_sub(other.0))
    }

    /// This amount times a quantity, saturating.
    pub fn times(self, qty: u32) -> Money {
        Money(self.0.saturating_mul(i64::from(qty)))
    }
}

impl TryFrom<String> for Money {
    type Error = MoneyError;
    fn try_from(s: String) -> Result<Money, MoneyError> {
        Money::parse(&s)
    }
}

impl From<Money> for String {
    fn from(m: Money) -> String {
        // Spelled as `Display` does, without its machinery: every order's
        // document and events carry amounts.
        let mut s = String::with_capacity(24);
        if m.0 < 0 {
            s.push('-');
        }
        let abs = m.0.unsigned_abs();
        crate::ids::push_decimal(&mut s, abs / 100);
        s.push('.');
        let cents = (abs % 100) as u8;
        s.push(char::from(b'0' + cents / 10));
        s.push(char::from(b'0' + cents % 10));
        s
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

impl std::iter::Sum for Money {
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        iter.fold(Money::ZERO, Money::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_amount_as_a_string_is_its_display() {
        let mut amounts = vec![0, 1, 5, 9, 10, 99, 100, 101, 1999, -1, -5, -99, -100, -305, i64::MAX, i64::MIN];
        amounts.extend((-2_000..2_000).map(|i: i64| i * 7_919));
        for cents in amounts {
            let m = Money(cents);
            assert_eq!(String::from(m), m.to_string(), "{cents} cents");
        }
        assert_eq!(String::from(Money(-305)), "-3.05");
        assert_eq!(String::from(Money(i64::MIN)), "-92233720368547758.08");
    }

    #[test]
    fn parses_decimal_strings() {
        assert_eq!(Money::parse("19.99"), Ok(Money(1999)));
        assert_eq!(Money::parse("20"), Ok(Money(2000)));
        assert_eq!(Money::parse("0.5"), Ok(Money(50)));
        assert_eq!(Money::parse("-3.05"), Ok(Money(-305)));
        for bad in ["", ".5", "1.", "1.234", "1e3", "abc", "1,00", "--1", " 1"] {
            assert_eq!(Money::parse(bad), Err(MoneyError::Malformed), "{bad}");
        }
        assert_eq!(Money::parse("99999999999999"), Err(MoneyError::TooLarge));
    }
}
