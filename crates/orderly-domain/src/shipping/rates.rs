//! Versioned carrier rate tables (PRODUCT.md §4.11): parsed and validated from a
//! small text file loaded at startup or uploaded through the ops API, and held in
//! a [`RateBook`] whose pending upload takes effect at the start of the next
//! label batch, without a restart.
//!
//! # File format
//!
//! UTF-8 text, one record per line, fields separated by commas:
//!
//! ```text
//! # orderly carrier rates
//! version,2026-11-01.1
//! carrier,zone,max_weight_g,price
//! fastship,EU,1000,4.95
//! fastship,EU,5000,8.50
//! slowpost,EU,2000,3.10
//! ```
//!
//! - Blank lines and lines starting with `#` are ignored anywhere; a leading
//!   byte-order mark and `\r\n` line ends are accepted; spaces around fields are
//!   trimmed. There is no quoting: no field can contain a comma.
//! - The first record is `version,<YYYY-MM-DD>.<revision>`: a calendar date and
//!   a revision from 1 to 9999 without leading zeros, e.g. `2026-11-01.2`.
//!   Versions compare as (date, revision) numbers, so `2026-11-01.10` is newer
//!   than `2026-11-01.9`, and an upload must be newer than every version the
//!   book holds.
//! - The second record is exactly the header `carrier,zone,max_weight_g,price`.
//! - Every further record is one weight bracket: a carrier id and a zone (the
//!   id alphabet `[A-Za-z0-9._:-]`, at most 64 bytes), the bracket's upper
//!   weight bound in grams (1 to [`WEIGHT_G_MAX`]), and a non-negative price with
//!   at most two decimals. Within one (carrier, zone) the weights are strictly
//!   increasing in file order; a parcel costs the price of the smallest bracket
//!   whose `max_weight_g` is at least its weight, and a parcel heavier than the
//!   last bracket has no price with that carrier.
//! - A table has at least one bracket, at most [`RATES_BYTES_MAX`] bytes, at
//!   most [`RATES_LINES_MAX`] lines and lines of at most [`RATE_LINE_BYTES_MAX`]
//!   bytes. Every error names its 1-based line.
//!
//! [`RateTable::render`] writes the canonical form of a table (no comments, no
//! spaces, rows sorted by carrier, zone and weight), which parses back to the
//! same table.
//!
//! ```
//! use orderly_domain::shipping::rates::RateTable;
//! use orderly_domain::shipping::carrier_routing::CarrierId;
//! use orderly_domain::{Money, Zone};
//!
//! let table = RateTable::parse("version,2026-11-01.1\ncarrier,zone,max_weight_g,price\nfastship,EU,1000,4.95\n")
//!     .expect("a valid table");
//! let (fastship, eu) = (CarrierId::parse("fastship").expect("id"), Zone::parse("EU").expect("zone"));
//! assert_eq!(table.version().to_string(), "2026-11-01.1");
//! assert_eq!(table.price(&fastship, &eu, 800), Some(Money::parse("4.95").expect("money")));
//! assert_eq!(table.price(&fastship, &eu, 1_001), None);
//! ```

use crate::ids::{IdError, Zone};
use crate::money::{Money, MoneyError};
use crate::shipping::carrier_routing::{CarrierId, CarrierRoutes};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};

/// Largest rate file accepted, in bytes (4 MiB).
pub const RATES_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Most lines a rate file may have, comments and blank lines included.
pub const RATES_LINES_MAX: usize = 20_000;

/// Longest line accepted, in bytes.
pub const RATE_LINE_BYTES_MAX: usize = 256;

/// Heaviest bracket bound accepted, in grams (one tonne).
pub const WEIGHT_G_MAX: u32 = 1_000_000;

/// Highest revision within one day.
pub const REVISION_MAX: u16 = 9_999;

/// The exact header record.
pub const HEADER: &str = "carrier,zone,max_weight_g,price";

const COLUMNS: [&str; 4] = ["carrier", "zone", "max_weight_g", "price"];

/// Longest rendered row: two ids, a 7-digit weight, a 16-character price, three commas and a newline.
const RENDERED_ROW_BYTES_MAX: usize = 64 + 64 + 7 + 16 + 3 + 1;

// A rendered table always fits the parse limits, so `render` round-trips.
const _: () = assert!(RATES_LINES_MAX * RENDERED_ROW_BYTES_MAX <= RATES_BYTES_MAX);

/// Why a rate table version string is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a rate table version looks like 2026-11-01.1: a calendar date, '.', and a revision from 1 to 9999")]
pub struct RateVersionError;

/// A rate table's version, `YYYY-MM-DD.revision`, ordered by date then revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RateVersion {
    // Field order is the comparison order.
    year: u16,
    month: u8,
    day: u8,
    revision: u16,
}

impl RateVersion {
    /// Parses `2026-11-01.1`.
    pub fn parse(s: &str) -> Result<RateVersion, RateVersionError> {
        let (date, revision) = s.split_once('.').ok_or(RateVersionError)?;
        // The RFC 3339 parser checks the digits and the calendar (no 2026-02-30).
        if date.len() != 10 || Timestamp::parse_rfc3339(&format!("{date}T00:00:00Z")).is_none() {
            return Err(RateVersionError);
        }
        let number = |range: std::ops::Range<usize>| date[range].parse::<u16>().map_err(|_| RateVersionError);
        let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
        if revision.is_empty()
            || revision.len() > 4
            || revision.starts_with('0')
            || !revision.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(RateVersionError);
        }
        let revision = revision.parse::<u16>().ok().filter(|r| *r <= REVISION_MAX).ok_or(RateVersionError)?;
        let month = u8::try_from(month).map_err(|_| RateVersionError)?;
        let day = u8::try_from(day).map_err(|_| RateVersionError)?;
        Ok(RateVersion { year, month, day, revision })
    }
}

impl fmt::Display for RateVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}.{}", self.year, self.month, self.day, self.revision)
    }
}

impl TryFrom<String> for RateVersion {
    type Error = RateVersionError;
    fn try_from(s: String) -> Result<RateVersion, RateVersionError> {
        RateVersion::parse(&s)
    }
}

impl From<RateVersion> for String {
    fn from(v: RateVersion) -> String {
        v.to_string()
    }
}

/// Why a rate file is rejected. Every variant about a line names it (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// The file is larger than [`RATES_BYTES_MAX`].
    #[error("the rate file is larger than {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// The file has more than [`RATES_LINES_MAX`] lines.
    #[error("the rate file has more than {max} lines")]
    TooManyLines {
        /// The limit.
        max: usize,
    },
    /// A line is longer than [`RATE_LINE_BYTES_MAX`].
    #[error("line {line}: longer than {max} bytes")]
    LineTooLong {
        /// The offending line.
        line: usize,
        /// The limit.
        max: usize,
    },
    /// The file has no records at all.
    #[error("the rate file is empty: it needs a `version,YYYY-MM-DD.N` line, the header and rates")]
    MissingVersion,
    /// The first record is not `version,…`.
    #[error("line {line}: expected `version,YYYY-MM-DD.N` as the first record")]
    ExpectedVersion {
        /// The offending line.
        line: usize,
    },
    /// The version is malformed.
    #[error("line {line}: {source}")]
    BadVersion {
        /// The offending line.
        line: usize,
        /// What is wrong with it.
        source: RateVersionError,
    },
    /// The file ends before the header.
    #[error("the rate file has no header; expected `{HEADER}` after the version")]
    MissingHeader,
    /// The header names a column this format does not have.
    #[error("line {line}: unknown column {column:?}; the header is `{HEADER}`")]
    UnknownColumn {
        /// The offending line.
        line: usize,
        /// The unknown column name.
        column: String,
    },
    /// The header has the known columns in the wrong order, twice, or not all of them.
    #[error("line {line}: the header must be exactly `{HEADER}`")]
    BadHeader {
        /// The offending line.
        line: usize,
    },
    /// A rate record does not have four fields.
    #[error("line {line}: expected 4 fields (carrier,zone,max_weight_g,price), found {found}")]
    FieldCount {
        /// The offending line.
        line: usize,
        /// How many fields it has.
        found: usize,
    },
    /// The carrier id is invalid.
    #[error("line {line}: {source}")]
    BadCarrier {
        /// The offending line.
        line: usize,
        /// What is wrong with it.
        source: IdError,
    },
    /// The zone is invalid.
    #[error("line {line}: {source}")]
    BadZone {
        /// The offending line.
        line: usize,
        /// What is wrong with it.
        source: IdError,
    },
    /// The weight is not a whole number of grams from 1 to [`WEIGHT_G_MAX`].
    #[error("line {line}: max_weight_g must be a whole number of grams from 1 to {max}")]
    BadWeight {
        /// The offending line.
        line: usize,
        /// The limit.
        max: u32,
    },
    /// The price is not a decimal amount.
    #[error("line {line}: {source}")]
    BadPrice {
        /// The offending line.
        line: usize,
        /// What is wrong with it.
        source: MoneyError,
    },
    /// The price is negative.
    #[error("line {line}: price must not be negative")]
    NegativePrice {
        /// The offending line.
        line: usize,
    },
    /// The same (carrier, zone, max_weight_g) appears twice.
    #[error("line {line}: duplicates the bracket on line {first_line}")]
    Duplicate {
        /// The offending line.
        line: usize,
        /// Where the bracket first appears.
        first_line: usize,
    },
    /// A bracket is lighter than the previous bracket of its (carrier, zone).
    #[error("line {line}: max_weight_g must be larger than on line {previous_line} (same carrier and zone)")]
    NotIncreasing {
        /// The offending line.
        line: usize,
        /// The previous bracket of the same carrier and zone.
        previous_line: usize,
    },
    /// The file has a version and a header but no rates.
    #[error("the rate file has no rates")]
    Empty,
}

/// Why an upload to the [`RateBook`] is refused; the book keeps what it had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateBookError {
    /// The uploaded version is not newer than the newest version held.
    #[error("rate table version {uploaded} is not newer than {latest}")]
    NotNewer {
        /// The refused version.
        uploaded: RateVersion,
        /// The newest version held (pending, or else active).
        latest: RateVersion,
    },
}

/// One weight bracket: parcels up to `max_weight_g` cost `price`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Bracket {
    max_weight_g: u32,
    price: Money,
}

impl Bracket {
    /// The heaviest parcel in this bracket, in grams.
    pub fn max_weight_g(&self) -> u32 {
        self.max_weight_g
    }

    /// The label price.
    pub fn price(&self) -> Money {
        self.price
    }
}

/// A validated, versioned carrier rate table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateTable {
    version: RateVersion,
    /// Brackets per carrier and zone, sorted by strictly increasing weight.
    brackets: BTreeMap<CarrierId, BTreeMap<Zone, Vec<Bracket>>>,
    zones: BTreeSet<Zone>,
}

impl RateTable {
    /// Parses and validates a rate file (see the module docs for the format).
    pub fn parse(text: &str) -> Result<RateTable, RateError> {
        if text.len() > RATES_BYTES_MAX {
            return Err(RateError::TooLarge { max: RATES_BYTES_MAX });
        }
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut version = None;
        let mut header_seen = false;
        let mut builder = Builder::default();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            if line > RATES_LINES_MAX {
                return Err(RateError::TooManyLines { max: RATES_LINES_MAX });
            }
            if raw.len() > RATE_LINE_BYTES_MAX {
                return Err(RateError::LineTooLong { line, max: RATE_LINE_BYTES_MAX });
            }
            let record = raw.trim();
            if record.is_empty() || record.starts_with('#') {
                continue;
            }
            if version.is_none() {
                version = Some(parse_version_record(line, record)?);
            } else if !header_seen {
                check_header(line, record)?;
                header_seen = true;
            } else {
                builder.add(line, record)?;
            }
        }
        let version = version.ok_or(RateError::MissingVersion)?;
        if !header_seen {
            return Err(RateError::MissingHeader);
        }
        builder.finish(version)
    }

    /// The table's version.
    pub fn version(&self) -> RateVersion {
        self.version
    }

    /// The price of a label for a parcel of `weight_g` grams: the smallest
    /// bracket of (carrier, zone) whose `max_weight_g` is at least the weight.
    /// `None` if the carrier does not serve the zone or the parcel is heavier
    /// than its last bracket.
    pub fn price(&self, carrier: &CarrierId, zone: &Zone, weight_g: u32) -> Option<Money> {
        let brackets = self.brackets(carrier, zone);
        let index = brackets.partition_point(|b| b.max_weight_g < weight_g);
        brackets.get(index).map(Bracket::price)
    }

    /// The brackets of (carrier, zone), lightest first; empty if it has none.
    pub fn brackets(&self, carrier: &CarrierId, zone: &Zone) -> &[Bracket] {
        self.brackets.get(carrier).and_then(|zones| zones.get(zone)).map_or(&[], Vec::as_slice)
    }

    /// Every carrier with at least one bracket, sorted.
    pub fn carriers(&self) -> impl Iterator<Item = &CarrierId> {
        self.brackets.keys()
    }

    /// Every zone with at least one bracket, sorted.
    pub fn zones(&self) -> impl Iterator<Item = &Zone> {
        self.zones.iter()
    }

    /// How many brackets the table holds.
    pub fn bracket_count(&self) -> usize {
        self.brackets.values().flat_map(BTreeMap::values).map(Vec::len).sum()
    }

    /// The (zone, carrier) pairs that `routes` can send labels to but this table
    /// cannot price. The ops API checks an upload with it before accepting it.
    pub fn missing_routes(&self, routes: &CarrierRoutes) -> Vec<(Zone, CarrierId)> {
        routes
            .iter()
            .flat_map(|(zone, pair)| [pair.primary(), pair.secondary()].map(|carrier| (zone, carrier)))
            .filter(|(zone, carrier)| self.brackets(carrier, zone).is_empty())
            .map(|(zone, carrier)| (zone.clone(), carrier.clone()))
            .collect()
    }

    /// The canonical text of this table, which [`RateTable::parse`] reads back
    /// to an equal table.
    pub fn render(&self) -> String {
        let mut out = format!("version,{}\n{HEADER}\n", self.version);
        for (carrier, zones) in &self.brackets {
            for (zone, brackets) in zones {
                for b in brackets {
                    writeln!(out, "{carrier},{zone},{},{}", b.max_weight_g, b.price)
                        .expect("writing to a String cannot fail");
                }
            }
        }
        out
    }
}

/// The active rate table and, once uploaded, the next one. The shipping service
/// calls [`RateBook::activate_pending`] at the start of each label batch, so a
/// batch prices every label with one table and an upload takes effect from the
/// next batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateBook {
    active: RateTable,
    pending: Option<RateTable>,
}

impl RateBook {
    /// A book whose active table is the one loaded at startup.
    pub fn new(active: RateTable) -> RateBook {
        RateBook { active, pending: None }
    }

    /// Queues `table` for the next batch. Its version must be newer than the
    /// newest held (a pending upload, or else the active table); a newer upload
    /// replaces a pending one. On error the book is unchanged.
    pub fn upload(&mut self, table: RateTable) -> Result<(), RateBookError> {
        let latest = self.latest_version();
        if table.version <= latest {
            return Err(RateBookError::NotNewer { uploaded: table.version, latest });
        }
        self.pending = Some(table);
        Ok(())
    }

    /// Makes the pending table active, if there is one, and returns its version.
    pub fn activate_pending(&mut self) -> Option<RateVersion> {
        let next = self.pending.take()?;
        self.active = next;
        Some(self.active.version)
    }

    /// The table labels are priced with now.
    pub fn active(&self) -> &RateTable {
        &self.active
    }

    /// The table that takes over at the next batch.
    pub fn pending(&self) -> Option<&RateTable> {
        self.pending.as_ref()
    }

    /// The newest version held, pending or active.
    pub fn latest_version(&self) -> RateVersion {
        self.pending.as_ref().unwrap_or(&self.active).version
    }
}

fn parse_version_record(line: usize, record: &str) -> Result<RateVersion, RateError> {
    match record.split_once(',') {
        Some((key, value)) if key.trim() == "version" => {
            RateVersion::parse(value.trim()).map_err(|source| RateError::BadVersion { line, source })
        }
        _ => Err(RateError::ExpectedVersion { line }),
    }
}

fn check_header(line: usize, record: &str) -> Result<(), RateError> {
    let columns: Vec<&str> = record.split(',').map(str::trim).collect();
    if let Some(unknown) = columns.iter().find(|c| !COLUMNS.contains(c)) {
        return Err(RateError::UnknownColumn { line, column: (*unknown).to_owned() });
    }
    if columns != COLUMNS {
        return Err(RateError::BadHeader { line });
    }
    Ok(())
}

fn parse_row(line: usize, record: &str) -> Result<(CarrierId, Zone, Bracket), RateError> {
    let fields: Vec<&str> = record.split(',').map(str::trim).collect();
    let [carrier, zone, weight, price] = fields[..] else {
        return Err(RateError::FieldCount { line, found: fields.len() });
    };
    let carrier = CarrierId::parse(carrier).map_err(|source| RateError::BadCarrier { line, source })?;
    let zone = Zone::parse(zone).map_err(|source| RateError::BadZone { line, source })?;
    let max_weight_g = weight
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| weight.parse::<u32>().ok())
        .flatten()
        .filter(|w| (1..=WEIGHT_G_MAX).contains(w))
        .ok_or(RateError::BadWeight { line, max: WEIGHT_G_MAX })?;
    let price = Money::parse(price).map_err(|source| RateError::BadPrice { line, source })?;
    if price < Money::ZERO {
        return Err(RateError::NegativePrice { line });
    }
    Ok((carrier, zone, Bracket { max_weight_g, price }))
}

/// Collects brackets while parsing, remembering each one's line for errors.
#[derive(Default)]
struct Builder {
    brackets: BTreeMap<CarrierId, BTreeMap<Zone, Vec<(Bracket, usize)>>>,
}

impl Builder {
    fn add(&mut self, line: usize, record: &str) -> Result<(), RateError> {
        let (carrier, zone, bracket) = parse_row(line, record)?;
        let brackets = self.brackets.entry(carrier).or_default().entry(zone).or_default();
        // Brackets are kept strictly increasing, so a binary search finds a repeat.
        let weight = bracket.max_weight_g;
        if let Ok(index) = brackets.binary_search_by_key(&weight, |(b, _)| b.max_weight_g) {
            return Err(RateError::Duplicate { line, first_line: brackets[index].1 });
        }
        if let Some(&(last, previous_line)) = brackets.last()
            && last.max_weight_g > weight
        {
            return Err(RateError::NotIncreasing { line, previous_line });
        }
        brackets.push((bracket, line));
        Ok(())
    }

    fn finish(self, version: RateVersion) -> Result<RateTable, RateError> {
        let mut zones = BTreeSet::new();
        let mut brackets = BTreeMap::new();
        for (carrier, by_zone) in self.brackets {
            let mut out = BTreeMap::new();
            for (zone, rows) in by_zone {
                zones.insert(zone.clone());
                out.insert(zone, rows.into_iter().map(|(b, _)| b).collect());
            }
            brackets.insert(carrier, out);
        }
        if brackets.is_empty() {
            return Err(RateError::Empty);
        }
        Ok(RateTable { version, brackets, zones })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
# orderly carrier rates
version,2026-11-01.1
carrier,zone,max_weight_g,price
fastship,EU,1000,4.95
fastship,EU,5000,8.50

slowpost,EU,2000,3.10
fastship,US,1000,9
";

    fn table(text: &str) -> RateTable {
        RateTable::parse(text).expect("a valid table")
    }

    fn err(text: &str) -> RateError {
        RateTable::parse(text).expect_err("an invalid table")
    }

    fn carrier(s: &str) -> CarrierId {
        CarrierId::parse(s).expect("valid carrier id")
    }

    fn zone(s: &str) -> Zone {
        Zone::parse(s).expect("valid zone")
    }

    fn money(s: &str) -> Money {
        Money::parse(s).expect("valid money")
    }

    fn version(s: &str) -> RateVersion {
        RateVersion::parse(s).expect("valid version")
    }

    fn with_rows(rows: &str) -> String {
        format!("version,2026-11-01.1\n{HEADER}\n{rows}")
    }

    #[test]
    fn given_a_valid_file_when_parsed_then_it_prices_by_smallest_fitting_bracket() {
        let t = table(SAMPLE);
        let (fast, eu) = (carrier("fastship"), zone("EU"));
        assert_eq!(t.version(), version("2026-11-01.1"));
        assert_eq!(t.price(&fast, &eu, 0), Some(money("4.95")));
        assert_eq!(t.price(&fast, &eu, 1_000), Some(money("4.95")));
        assert_eq!(t.price(&fast, &eu, 1_001), Some(money("8.50")));
        assert_eq!(t.price(&fast, &eu, 5_001), None, "heavier than the last bracket");
        assert_eq!(t.price(&carrier("slowpost"), &zone("US"), 1), None, "carrier does not serve the zone");
        assert_eq!(t.price(&carrier("nobody"), &eu, 1), None);
        assert_eq!(t.carriers().map(CarrierId::as_str).collect::<Vec<_>>(), ["fastship", "slowpost"]);
        assert_eq!(t.zones().map(Zone::as_str).collect::<Vec<_>>(), ["EU", "US"]);
        assert_eq!(t.bracket_count(), 4);
    }

    #[test]
    fn given_crlf_a_bom_and_spaces_when_parsed_then_they_are_tolerated() {
        let t = table(
            "\u{feff}version, 2026-11-01.1\r\n carrier , zone,max_weight_g,price\r\nfastship , EU, 1000 , 4.95\r\n",
        );
        assert_eq!(t.price(&carrier("fastship"), &zone("EU"), 10), Some(money("4.95")));
    }

    #[test]
    fn versions_compare_by_date_then_revision_number() {
        assert!(version("2026-11-01.10") > version("2026-11-01.9"));
        assert!(version("2026-11-02.1") > version("2026-11-01.9999"));
        assert!(version("2027-01-01.1") > version("2026-12-31.5"));
        assert_eq!(version("2026-11-01.10").to_string(), "2026-11-01.10");
        for bad in
            ["", "2026-11-01", "2026-11-01.", "2026-11-01.0", "2026-11-01.01", "2026-11-01.10000", "2026-02-30.1"]
        {
            assert_eq!(RateVersion::parse(bad), Err(RateVersionError), "{bad:?}");
        }
        for bad in ["26-11-01.1", "2026-1-01.1", "2026/11/01.1", "2026-11-01.1a", "2026-11-01.+1", "x026-11-01.1"] {
            assert_eq!(RateVersion::parse(bad), Err(RateVersionError), "{bad:?}");
        }
        assert_eq!(serde_json::to_string(&version("2026-11-01.2")).expect("serializable"), "\"2026-11-01.2\"");
    }

    #[test]
    fn given_a_bad_preamble_when_parsed_then_the_error_names_the_line() {
        assert_eq!(err(""), RateError::MissingVersion);
        assert_eq!(err("# only a comment\n\n"), RateError::MissingVersion);
        assert_eq!(err("# c\ncarrier,zone,max_weight_g,price\n"), RateError::ExpectedVersion { line: 2 });
        assert_eq!(err("version,2026-13-01.1\n"), RateError::BadVersion { line: 1, source: RateVersionError });
        assert_eq!(err("version,2026-11-01.1\n"), RateError::MissingHeader);
        assert_eq!(err("version,2026-11-01.1\ncarrier,zone,price,max_weight_g\n"), RateError::BadHeader { line: 2 });
        assert_eq!(err("version,2026-11-01.1\ncarrier,zone,max_weight_g\n"), RateError::BadHeader { line: 2 });
        assert_eq!(
            err("version,2026-11-01.1\ncarrier,zone,max_weight_g,price,currency\n"),
            RateError::UnknownColumn { line: 2, column: "currency".to_owned() }
        );
        assert_eq!(err(&with_rows("")), RateError::Empty);
        assert_eq!(err(&with_rows("# nothing yet\n")), RateError::Empty);
    }

    #[test]
    fn given_bad_rows_when_parsed_then_each_field_is_validated_with_its_line() {
        assert_eq!(err(&with_rows("fastship,EU,1000\n")), RateError::FieldCount { line: 3, found: 3 });
        assert_eq!(err(&with_rows("fastship,EU,1000,1,2\n")), RateError::FieldCount { line: 3, found: 5 });
        assert!(matches!(err(&with_rows("fast ship,EU,1,1\n")), RateError::BadCarrier { line: 3, .. }));
        assert!(matches!(err(&with_rows("fastship,,1,1\n")), RateError::BadZone { line: 3, .. }));
        for weight in ["0", "-1", "+5", "1.5", "", "1000001", "99999999999"] {
            let e = err(&with_rows(&format!("fastship,EU,{weight},1\n")));
            assert_eq!(e, RateError::BadWeight { line: 3, max: WEIGHT_G_MAX }, "{weight:?}");
        }
        assert!(matches!(err(&with_rows("fastship,EU,1,4.955\n")), RateError::BadPrice { line: 3, .. }));
        assert_eq!(err(&with_rows("fastship,EU,1,-0.01\n")), RateError::NegativePrice { line: 3 });
        assert!(
            table(&with_rows("fastship,EU,1,0\n")).price(&carrier("fastship"), &zone("EU"), 1) == Some(Money::ZERO)
        );
    }

    #[test]
    fn given_unordered_or_repeated_brackets_when_parsed_then_they_are_rejected() {
        let repeated = with_rows("fastship,EU,1000,1\nslowpost,EU,1000,1\nfastship,EU,1000,2\n");
        assert_eq!(err(&repeated), RateError::Duplicate { line: 5, first_line: 3 });
        let earlier = with_rows("fastship,EU,1000,1\nfastship,EU,5000,2\nfastship,EU,1000,3\n");
        assert_eq!(err(&earlier), RateError::Duplicate { line: 5, first_line: 3 });
        let lighter = with_rows("fastship,EU,1000,1\nfastship,EU,5000,2\nfastship,EU,2000,3\n");
        assert_eq!(err(&lighter), RateError::NotIncreasing { line: 5, previous_line: 4 });
        // Interleaving other pairs is fine as long as each pair increases.
        assert!(RateTable::parse(&with_rows("a,EU,10,1\nb,EU,5,1\na,EU,20,1\na,US,5,1\n")).is_ok());
    }

    #[test]
    fn given_oversized_input_when_parsed_then_limits_are_enforced() {
        assert_eq!(err(&" ".repeat(RATES_BYTES_MAX + 1)), RateError::TooLarge { max: RATES_BYTES_MAX });
        assert_eq!(err(&"\n".repeat(RATES_LINES_MAX + 1)), RateError::TooManyLines { max: RATES_LINES_MAX });
        let long = format!("# {}\n", "x".repeat(RATE_LINE_BYTES_MAX));
        assert_eq!(err(&long), RateError::LineTooLong { line: 1, max: RATE_LINE_BYTES_MAX });
    }

    #[test]
    fn given_a_table_when_rendered_then_it_parses_back_to_the_same_table() {
        let t = table(SAMPLE);
        let text = t.render();
        assert!(text.starts_with("version,2026-11-01.1\ncarrier,zone,max_weight_g,price\nfastship,EU,1000,4.95\n"));
        assert!(text.contains("fastship,US,1000,9.00\n"));
        assert_eq!(table(&text), t);
    }

    #[test]
    fn given_routes_when_checking_coverage_then_unpriced_pairs_are_listed() {
        use crate::shipping::carrier_routing::CarrierPair;
        let mut routes = CarrierRoutes::new();
        let eu = CarrierPair::new(carrier("fastship"), carrier("slowpost")).expect("distinct");
        let us = CarrierPair::new(carrier("fastship"), carrier("slowpost")).expect("distinct");
        routes.insert(zone("EU"), eu).expect("new zone");
        routes.insert(zone("US"), us).expect("new zone");
        assert_eq!(table(SAMPLE).missing_routes(&routes), [(zone("US"), carrier("slowpost"))]);
    }

    #[test]
    fn given_a_book_when_a_newer_table_is_uploaded_then_it_takes_effect_at_the_next_batch() {
        let mut book = RateBook::new(table(SAMPLE));
        let next = table(&with_rows("fastship,EU,1000,5.25\n").replace("2026-11-01.1", "2026-11-01.2"));
        book.upload(next.clone()).expect("newer version");
        assert_eq!(book.active().version(), version("2026-11-01.1"), "the running batch keeps its table");
        assert_eq!(book.latest_version(), version("2026-11-01.2"));
        assert_eq!(book.activate_pending(), Some(version("2026-11-01.2")));
        assert_eq!(book.active(), &next);
        assert_eq!(book.activate_pending(), None);
        assert_eq!(book.pending(), None);
    }

    #[test]
    fn given_a_book_when_an_old_or_equal_version_is_uploaded_then_it_is_refused_and_nothing_changes() {
        let mut book = RateBook::new(table(SAMPLE));
        let newer = table(&with_rows("a,EU,1,1\n").replace("2026-11-01.1", "2026-11-03.1"));
        book.upload(newer).expect("newer version");
        let before = book.clone();
        for older in ["2026-11-01.1", "2026-11-02.7", "2026-11-03.1"] {
            let t = table(&with_rows("a,EU,1,1\n").replace("2026-11-01.1", older));
            assert_eq!(
                book.upload(t),
                Err(RateBookError::NotNewer { uploaded: version(older), latest: version("2026-11-03.1") })
            );
            assert_eq!(book, before);
        }
        let newest = table(&with_rows("a,EU,1,1\n").replace("2026-11-01.1", "2026-11-03.2"));
        book.upload(newest).expect("newer than the pending one");
        assert_eq!(book.activate_pending(), Some(version("2026-11-03.2")));
    }
}
