//! Engine settings: every configuration key of PRODUCT.md with its default.
//! The binary reads them from `orderly.toml` and `ORDERLY_*` variables; the
//! engine only sees this typed, validated struct.

use orderly_domain::Money;
use serde::{Deserialize, Deserializer, Serialize};

/// A duration in milliseconds, written in config as `"15m"`, `"2h"`, `"30s"`,
/// `"250ms"` or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Millis(pub i64);

impl Millis {
    /// Parses `"15m"`, `"2h"`, `"30s"`, `"250ms"`, `"1d"` or `"90"` (seconds).
    pub fn parse(s: &str) -> Option<Millis> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: i64 = num.parse().ok()?;
        let factor = match unit.trim() {
            "" | "s" => 1000,
            "ms" => 1,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        n.checked_mul(factor).map(Millis)
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Millis, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => {
                n.checked_mul(1000).map(Millis).ok_or_else(|| serde::de::Error::custom("duration too large"))
            }
            Raw::Text(t) => Millis::parse(&t).ok_or_else(|| {
                serde::de::Error::custom(format!("invalid duration {t:?}: use e.g. \"15m\", \"2h\", \"30s\""))
            }),
        }
    }
}

/// All engine settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// `[allocation]`
    pub allocation: AllocationSettings,
    /// `[inventory]`
    pub inventory: InventorySettings,
    /// `[split]`
    pub split: SplitSettings,
    /// `[picking]`
    pub picking: PickingSettings,
    /// `[shipping]`
    pub shipping: ShippingSettings,
    /// `[carriers]`
    pub carriers: CarrierSettings,
    /// `[notifications]`
    pub notifications: NotificationSettings,
    /// `[alerts]`
    pub alerts: AlertSettings,
    /// `[bus]`
    pub bus: BusSettings,
    /// `[reconcile]`
    pub reconcile: ReconcileSettings,
    /// `[otel]`
    pub otel: OtelSettings,
    /// `[auth]`
    pub auth: AuthSettings,
    /// `[http]`
    pub http: HttpSettings,
}

/// `[allocation]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AllocationSettings {
    /// Lines worth at least this are reserved before the order is acknowledged.
    pub sync_min_line_value: Money,
}

impl Default for AllocationSettings {
    fn default() -> Self {
        AllocationSettings { sync_min_line_value: Money::from_minor(10_000) }
    }
}

/// `[inventory]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InventorySettings {
    /// Percent of received stock held back until picks confirm counts.
    pub safety_stock_pct: u32,
    /// How long a cart hold lasts.
    pub hold_ttl: Millis,
    /// Expiry is spread over `[0, jitter]` after the TTL.
    pub hold_release_jitter: Millis,
    /// Allocation partitions per location for each SKU.
    pub partitions: u32,
}

impl Default for InventorySettings {
    fn default() -> Self {
        InventorySettings {
            safety_stock_pct: 5,
            hold_ttl: Millis(15 * 60_000),
            hold_release_jitter: Millis(2 * 60_000),
            partitions: 1,
        }
    }
}

/// `[split]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SplitSettings {
    /// Orders worth at least this ship partially; smaller ones wait to consolidate.
    pub min_order_value_for_partial: Money,
}

impl Default for SplitSettings {
    fn default() -> Self {
        SplitSettings { min_order_value_for_partial: Money::from_minor(5_000) }
    }
}

/// `[picking]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PickingSettings {
    /// A standard task waiting longer than this is served before newer work.
    pub starvation_limit: Millis,
}

impl Default for PickingSettings {
    fn default() -> Self {
        PickingSettings { starvation_limit: Millis(2 * 3_600_000) }
    }
}

/// `[shipping]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShippingSettings {
    /// Label requests per minute (token bucket rate).
    pub labels_per_minute: u32,
    /// Label requests allowed in a burst (bucket size).
    pub label_burst: u32,
    /// Failed attempts at the primary carrier before the secondary is used.
    pub max_retries: u32,
    /// Timeout of one carrier call.
    pub carrier_timeout: Millis,
    /// Parcel weight assumed per unit, in grams.
    pub unit_weight_g: u32,
}

impl Default for ShippingSettings {
    fn default() -> Self {
        ShippingSettings {
            labels_per_minute: 600,
            label_burst: 50,
            max_retries: 3,
            carrier_timeout: Millis(5_000),
            unit_weight_g: 500,
        }
    }
}

/// One carrier's API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarrierEndpoint {
    /// Carrier id, as in rate tables.
    pub id: String,
    /// Base URL of its label API.
    pub url: String,
}

/// Primary and secondary carrier of a zone.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneRoute {
    /// Zone, e.g. `EU`.
    pub zone: String,
    /// Tried first.
    pub primary: String,
    /// Used after `shipping.max_retries` failures or while the primary's breaker is open.
    pub secondary: String,
}

/// `[carriers]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CarrierSettings {
    /// Directory of rate table files, loaded at startup.
    pub rates_dir: Option<String>,
    /// Carrier APIs.
    pub endpoints: Vec<CarrierEndpoint>,
    /// Routes per zone.
    pub routes: Vec<ZoneRoute>,
    /// Consecutive failures that open a carrier's breaker.
    pub breaker_failures: u32,
    /// How long a breaker stays open before a probe.
    pub breaker_cooldown: Millis,
}

impl Default for CarrierSettings {
    fn default() -> Self {
        CarrierSettings {
            rates_dir: None,
            endpoints: Vec::new(),
            routes: Vec::new(),
            breaker_failures: 5,
            breaker_cooldown: Millis(30_000),
        }
    }
}

/// `[notifications]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotificationSettings {
    /// Where customer notifications are POSTed; none means the log only.
    pub webhook_url: Option<String>,
    /// HMAC-SHA256 secret for the `Orderly-Signature` header.
    pub webhook_secret: Option<String>,
    /// Failed deliveries in a row that open the webhook endpoint's breaker.
    pub breaker_failures: u32,
    /// How long the webhook breaker stays open before one probe.
    pub breaker_cooldown: Millis,
}

impl Default for NotificationSettings {
    fn default() -> Self {
        NotificationSettings {
            webhook_url: None,
            webhook_secret: None,
            breaker_failures: 5,
            breaker_cooldown: Millis(30_000),
        }
    }
}

/// `[alerts]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertSettings {
    /// Alert when a consumer's oldest unprocessed event is older than this.
    pub max_lag: Millis,
    /// Alert when retries exceed this many.
    pub max_retries: u64,
    /// Alert when manual adjustments per automated pick, over
    /// `manual_adjustment_window`, exceed this ratio.
    pub max_manual_adjustment_ratio: f64,
    /// The window of the manual-adjustment ratio.
    pub manual_adjustment_window: Millis,
    /// The ratio alert needs at least this many manual adjustments in the window.
    pub manual_adjustment_min_count: u64,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            max_lag: Millis(5 * 60_000),
            max_retries: 3,
            max_manual_adjustment_ratio: 0.05,
            manual_adjustment_window: Millis(3_600_000),
            manual_adjustment_min_count: 3,
        }
    }
}

/// `[otel]`: OpenTelemetry export.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtelSettings {
    /// OTLP/HTTP collector base URL (`http://127.0.0.1:4318`); spans go to
    /// `<endpoint>/v1/traces`. None: no export.
    pub endpoint: Option<String>,
}

/// `[reconcile]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileSettings {
    /// How often the scheduled reconciliation runs; `"0"` turns it off.
    pub interval: Millis,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        ReconcileSettings { interval: Millis(3_600_000) }
    }
}

/// `[bus]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusSettings {
    /// Attempts per event before it is dead-lettered.
    pub max_attempts: u32,
    /// Commands queued per service before the API answers 429.
    pub queue_capacity: usize,
    /// How long a service off the intake path (picking, packing, shipping,
    /// notifications) waits after a batch before it takes the next, so that
    /// under load it commits what arrived meanwhile in one batch (see
    /// `Driver::set_linger`); `0` takes every trickle of input at once.
    pub linger: Millis,
}

/// Default of `bus.linger`.
pub const LINGER_DEFAULT_MS: i64 = 10;
/// Largest `bus.linger`: past it, downstream services would fall visibly behind.
pub const LINGER_MAX_MS: i64 = 1_000;

impl Default for BusSettings {
    fn default() -> Self {
        BusSettings { max_attempts: 3, queue_capacity: 8192, linger: Millis(LINGER_DEFAULT_MS) }
    }
}

/// A configured API key (its SHA-256, never the key itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Who uses it.
    pub name: String,
    /// `storefront`, `warehouse`, `carrier`, `ops` or `viewer`.
    pub role: String,
    /// `sha256:<hex>` of the key.
    pub hash: String,
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// The keys.
    pub keys: Vec<ApiKey>,
    /// Whether `/metrics`, `/healthz` and `/readyz` need no key.
    pub open_probes: bool,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings { keys: Vec::new(), open_probes: true }
    }
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Largest request body accepted.
    pub body_limit_bytes: usize,
    /// Longest a request may take.
    pub request_timeout: Millis,
    /// Most concurrent connections.
    pub max_connections: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings { body_limit_bytes: 64 * 1024, request_timeout: Millis(10_000), max_connections: 4096 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(Millis::parse("15m"), Some(Millis(900_000)));
        assert_eq!(Millis::parse("2h"), Some(Millis(7_200_000)));
        assert_eq!(Millis::parse("250ms"), Some(Millis(250)));
        assert_eq!(Millis::parse("90"), Some(Millis(90_000)));
        assert_eq!(Millis::parse("soon"), None);
        assert_eq!(Millis::parse("5 weeks"), None);
    }

    #[test]
    fn defaults_match_the_product_contract() {
        let s = Settings::default();
        assert_eq!(s.inventory.safety_stock_pct, 5);
        assert_eq!(s.inventory.hold_ttl, Millis(900_000));
        assert_eq!(s.inventory.hold_release_jitter, Millis(120_000));
        assert_eq!(s.split.min_order_value_for_partial, Money::from_minor(5000));
        assert_eq!(s.picking.starvation_limit, Millis(7_200_000));
        assert_eq!(s.shipping.max_retries, 3);
        assert_eq!(s.alerts.max_lag, Millis(300_000));
        assert_eq!(s.alerts.max_retries, 3);
        assert_eq!(s.alerts.manual_adjustment_window, Millis(3_600_000));
        assert_eq!(s.alerts.manual_adjustment_min_count, 3);
        assert!((s.alerts.max_manual_adjustment_ratio - 0.05).abs() < 1e-9);
        assert_eq!(s.reconcile.interval, Millis(3_600_000));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let bad: Result<Settings, _> = serde_json::from_str(r#"{"inventory":{"safety_pct":5}}"#);
        assert!(bad.is_err());
        let ok: Settings = serde_json::from_str(r#"{"inventory":{"hold_ttl":"10m"}}"#).expect("valid");
        assert_eq!(ok.inventory.hold_ttl, Millis(600_000));
    }
}
