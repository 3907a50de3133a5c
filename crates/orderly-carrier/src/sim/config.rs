//! The simulator's configuration: a seed and, per carrier, its scripted
//! faults and price. Built from code, from CLI-style spec strings
//! (`fastship:latency_ms=20,error_rate=0.1`), or changed at runtime through
//! the admin API; every path goes through the same validation.

use crate::wire::{CarrierSettings, Outage};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The most carriers one simulator knows.
pub const CARRIERS_MAX: usize = 64;
/// The longest carrier name.
pub const CARRIER_NAME_LEN_MAX: usize = 32;
/// The largest latency a carrier can be scripted with.
pub const LATENCY_MS_MAX: u64 = 60_000;
/// The latest start and longest duration of an outage window (one day).
pub const OUTAGE_MS_MAX: u64 = 86_400_000;
/// The largest base price, in cents.
pub const PRICE_CENTS_MAX: u64 = 1_000_000;

/// Why a configuration or a carrier's settings were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The name is empty, too long or uses other characters than `a-z0-9-_`.
    #[error("carrier name {0:?} must be 1 to {CARRIER_NAME_LEN_MAX} characters of a-z, 0-9, '-' or '_'")]
    CarrierName(String),
    /// The latency is above [`LATENCY_MS_MAX`].
    #[error("latency_ms {0} exceeds {LATENCY_MS_MAX}")]
    Latency(u64),
    /// A probability outside `[0, 1]`.
    #[error("{field} {value} must be between 0 and 1")]
    Rate {
        /// Which rate.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// `error_rate + timeout_rate` above 1.
    #[error("error_rate + timeout_rate must not exceed 1 (got {0})")]
    RatesSum(f64),
    /// An outage starting or lasting longer than [`OUTAGE_MS_MAX`].
    #[error("outage after_ms and duration_ms must each be at most {OUTAGE_MS_MAX}")]
    Outage,
    /// A price that is not a non-negative decimal with at most two places.
    #[error("base_price {0:?} must be a decimal with at most two places, at most {PRICE_CENTS_MAX} cents")]
    Price(String),
    /// More than [`CARRIERS_MAX`] carriers.
    #[error("at most {CARRIERS_MAX} carriers")]
    TooManyCarriers,
    /// A spec string that does not parse.
    #[error("carrier spec {spec:?}: {reason}")]
    Spec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Simulator configuration: the seed for scripted faults and the carriers.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    seed: u64,
    carriers: BTreeMap<String, Profile>,
}

impl SimConfig {
    /// A configuration with `seed` and no carriers.
    pub fn new(seed: u64) -> Self {
        SimConfig { seed, carriers: BTreeMap::new() }
    }

    /// The demo configuration: `fastship` (4.95) and `slowpost` (3.50), no faults.
    pub fn demo(seed: u64) -> Self {
        let fastship = CarrierSettings::default();
        let slowpost = CarrierSettings { base_price: "3.50".to_owned(), ..CarrierSettings::default() };
        SimConfig::new(seed)
            .with_carrier("fastship", &fastship)
            .and_then(|config| config.with_carrier("slowpost", &slowpost))
            .expect("the demo carriers are valid constants")
    }

    /// Builds a configuration from CLI values: a seed and carrier specs
    /// (see [`SimConfig::with_carrier_spec`]); no specs gives [`SimConfig::demo`].
    pub fn from_specs<S: AsRef<str>>(seed: u64, specs: &[S]) -> Result<Self, ConfigError> {
        if specs.is_empty() {
            return Ok(SimConfig::demo(seed));
        }
        specs.iter().try_fold(SimConfig::new(seed), |config, spec| config.with_carrier_spec(spec.as_ref()))
    }

    /// Adds (or replaces) carrier `name` with `settings`.
    pub fn with_carrier(mut self, name: &str, settings: &CarrierSettings) -> Result<Self, ConfigError> {
        let name = parse_carrier_name(name)?;
        let profile = Profile::parse(settings)?;
        if !self.carriers.contains_key(&name) && self.carriers.len() >= CARRIERS_MAX {
            return Err(ConfigError::TooManyCarriers);
        }
        self.carriers.insert(name, profile);
        Ok(self)
    }

    /// Adds a carrier from a spec `NAME[:KEY=VALUE,...]` whose keys are
    /// `latency_ms`, `error_rate`, `timeout_rate`, `down`, `base_price` and
    /// `outage` (as `AFTER_MS+DURATION_MS`), e.g.
    /// `fastship:latency_ms=20,error_rate=0.1,outage=5000+2000`.
    pub fn with_carrier_spec(self, spec: &str) -> Result<Self, ConfigError> {
        let (name, settings) = parse_spec(spec)?;
        self.with_carrier(name, &settings)
    }

    /// The seed of every scripted random fault.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The configured carrier names, in order.
    pub fn carrier_names(&self) -> impl Iterator<Item = &str> {
        self.carriers.keys().map(String::as_str)
    }

    /// The settings of carrier `name`, if configured.
    pub fn settings(&self, name: &str) -> Option<CarrierSettings> {
        self.carriers.get(name).map(Profile::to_settings)
    }

    pub(crate) fn into_parts(self) -> (u64, BTreeMap<String, Profile>) {
        (self.seed, self.carriers)
    }
}

/// Validated settings of one carrier.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Profile {
    pub(crate) latency: Duration,
    pub(crate) error_rate: f64,
    pub(crate) timeout_rate: f64,
    pub(crate) down: bool,
    pub(crate) outage: Option<Outage>,
    pub(crate) base_price: Cents,
}

impl Profile {
    /// Parses wire settings into a profile, or says what is wrong.
    pub(crate) fn parse(settings: &CarrierSettings) -> Result<Profile, ConfigError> {
        if settings.latency_ms > LATENCY_MS_MAX {
            return Err(ConfigError::Latency(settings.latency_ms));
        }
        let error_rate = parse_rate("error_rate", settings.error_rate)?;
        let timeout_rate = parse_rate("timeout_rate", settings.timeout_rate)?;
        if error_rate + timeout_rate > 1.0 {
            return Err(ConfigError::RatesSum(error_rate + timeout_rate));
        }
        if let Some(outage) = settings.outage
            && (outage.after_ms > OUTAGE_MS_MAX || outage.duration_ms > OUTAGE_MS_MAX)
        {
            return Err(ConfigError::Outage);
        }
        Ok(Profile {
            latency: Duration::from_millis(settings.latency_ms),
            error_rate,
            timeout_rate,
            down: settings.down,
            outage: settings.outage,
            base_price: Cents::parse(&settings.base_price)?,
        })
    }

    /// The wire form of this profile.
    pub(crate) fn to_settings(&self) -> CarrierSettings {
        CarrierSettings {
            latency_ms: u64::try_from(self.latency.as_millis()).expect("latency is capped at LATENCY_MS_MAX"),
            error_rate: self.error_rate,
            timeout_rate: self.timeout_rate,
            down: self.down,
            outage: self.outage,
            base_price: self.base_price.to_string(),
        }
    }
}

/// A non-negative amount of money in cents, at most [`PRICE_CENTS_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Cents(u64);

impl Cents {
    /// Parses `"4.95"`, `"4.9"` or `"4"`.
    pub(crate) fn parse(text: &str) -> Result<Cents, ConfigError> {
        let invalid = || ConfigError::Price(text.to_owned());
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let digits_only = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || whole.len() > 7 || fraction.len() > 2 || !digits_only(whole) || !digits_only(fraction) {
            return Err(invalid());
        }
        if text.contains('.') && fraction.is_empty() {
            return Err(invalid());
        }
        let whole: u64 = whole.parse().map_err(|_| invalid())?;
        let fraction: u64 = format!("{fraction:0<2}").parse().map_err(|_| invalid())?;
        let cents = whole * 100 + fraction;
        if cents > PRICE_CENTS_MAX {
            return Err(invalid());
        }
        Ok(Cents(cents))
    }

    /// This amount plus `cents`, saturating.
    pub(crate) fn plus(self, cents: u64) -> Cents {
        Cents(self.0.saturating_add(cents))
    }
}

impl fmt::Display for Cents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

/// Checks a carrier name and returns it owned.
pub(crate) fn parse_carrier_name(name: &str) -> Result<String, ConfigError> {
    let valid_char = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
    if name.is_empty() || name.len() > CARRIER_NAME_LEN_MAX || !name.bytes().all(valid_char) {
        return Err(ConfigError::CarrierName(name.to_owned()));
    }
    Ok(name.to_owned())
}

fn parse_rate(field: &'static str, value: f64) -> Result<f64, ConfigError> {
    if (0.0..=1.0).contains(&value) { Ok(value) } else { Err(ConfigError::Rate { field, value }) }
}

/// Splits `NAME[:KEY=VALUE,...]` into a name and settings; an outage is
/// written `AFTER_MS+DURATION_MS`.
fn parse_spec(spec: &str) -> Result<(&str, CarrierSettings), ConfigError> {
    let fail = |reason: String| ConfigError::Spec { spec: spec.to_owned(), reason };
    let (name, pairs) = spec.split_once(':').unwrap_or((spec, ""));
    let mut settings = CarrierSettings::default();
    for pair in pairs.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| fail(format!("{pair:?} is not KEY=VALUE")))?;
        let bad = || fail(format!("bad value {value:?} for {key}"));
        match key {
            "latency_ms" => settings.latency_ms = value.parse().map_err(|_| bad())?,
            "error_rate" => settings.error_rate = value.parse().map_err(|_| bad())?,
            "timeout_rate" => settings.timeout_rate = value.parse().map_err(|_| bad())?,
            "down" => settings.down = value.parse().map_err(|_| bad())?,
            "base_price" => settings.base_price = value.to_owned(),
            "outage" => settings.outage = Some(parse_outage(value).ok_or_else(bad)?),
            other => return Err(fail(format!("unknown key {other:?}"))),
        }
    }
    Ok((name, settings))
}

fn parse_outage(value: &str) -> Option<Outage> {
    let (after, duration) = value.split_once('+')?;
    Some(Outage { after_ms: after.parse().ok()?, duration_ms: duration.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_parse_and_format() {
        assert_eq!(Cents::parse("4.95").map(|c| c.to_string()), Ok("4.95".to_owned()));
        assert_eq!(Cents::parse("4.9").map(|c| c.to_string()), Ok("4.90".to_owned()));
        assert_eq!(Cents::parse("4").map(|c| c.to_string()), Ok("4.00".to_owned()));
        for bad in ["", ".5", "4.", "4.951", "-1", "1e3", "abc", "99999999"] {
            assert!(Cents::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn spec_parses_every_key() {
        let config = SimConfig::new(1).with_carrier_spec(
            "fastship:latency_ms=20,error_rate=0.1,timeout_rate=0.2,down=true,outage=5+7,base_price=3.5",
        );
        let settings = config.ok().and_then(|c| c.settings("fastship"));
        let expected = CarrierSettings {
            latency_ms: 20,
            error_rate: 0.1,
            timeout_rate: 0.2,
            down: true,
            outage: Some(Outage { after_ms: 5, duration_ms: 7 }),
            base_price: "3.50".to_owned(),
        };
        assert_eq!(settings, Some(expected));
    }

    #[test]
    fn bare_name_spec_uses_defaults() {
        let config = SimConfig::from_specs(3, &["acme"]).ok();
        assert_eq!(config.and_then(|c| c.settings("acme")), Some(CarrierSettings::default()));
    }

    #[test]
    fn no_specs_give_the_demo_carriers() {
        let names: Vec<String> = SimConfig::from_specs::<&str>(0, &[])
            .map(|c| c.carrier_names().map(str::to_owned).collect())
            .unwrap_or_default();
        assert_eq!(names, ["fastship", "slowpost"]);
    }

    #[test]
    fn bad_specs_are_refused() {
        for spec in [
            "Fast",
            "",
            "a:latency_ms=x",
            "a:nope=1",
            "a:error_rate=2",
            "a:error_rate=0.6,timeout_rate=0.6",
            "a:outage=5",
        ] {
            assert!(SimConfig::new(0).with_carrier_spec(spec).is_err(), "{spec:?} should be refused");
        }
    }

    #[test]
    fn carriers_are_capped() {
        let mut config = SimConfig::new(0);
        for i in 0..CARRIERS_MAX {
            config = config.with_carrier(&format!("c{i}"), &CarrierSettings::default()).expect("under the cap");
        }
        assert_eq!(config.with_carrier("one-more", &CarrierSettings::default()), Err(ConfigError::TooManyCarriers));
    }
}
