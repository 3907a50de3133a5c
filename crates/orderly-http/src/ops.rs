//! The operations summary: orders per state, consumer lag, failures and
//! alerts, computed from the engine's stores and metrics.

use orderly_engine::app::Engine;
use orderly_engine::services::common::ApiError;
use serde::Serialize;
use std::collections::BTreeMap;

/// An alert that is firing.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    /// Stable name, e.g. `consumer_lag`.
    pub name: &'static str,
    /// What is wrong.
    pub detail: String,
}

/// The last reconciliation, in brief (the full report is at `GET /v1/ops/reconcile/last`).
#[derive(Debug, Clone, Serialize)]
pub struct ReconcileBrief {
    /// Run id.
    pub id: String,
    /// When it finished.
    pub finished_at: orderly_domain::Timestamp,
    /// Discrepancies found.
    pub discrepancies: u64,
    /// Compensating changes applied.
    pub repaired: u64,
}

/// Every alert name, so a cleared alert's gauge drops back to 0.
pub const ALERT_NAMES: [&str; 6] =
    ["consumer_lag", "retries", "dead_letters", "carrier_breaker", "manual_adjustment_ratio", "reconciliation"];

/// `GET /v1/ops/summary`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Orders per state.
    pub orders_by_state: BTreeMap<String, u64>,
    /// Age of the oldest unprocessed event, per `consumer<-producer`.
    pub consumer_lag_seconds: BTreeMap<String, f64>,
    /// Events waiting per `consumer<-producer`.
    pub consumer_backlog: BTreeMap<String, u64>,
    /// Dead letters held.
    pub dead_letters: u64,
    /// Event retries since start.
    pub retries: u64,
    /// Event processing failures since start.
    pub failures: u64,
    /// Manual adjustments per automated pick over `alerts.manual_adjustment_window`
    /// (the number of manual adjustments when there was no pick).
    pub manual_adjustment_ratio: f64,
    /// Manual adjustments in the window.
    pub manual_adjustments_in_window: u64,
    /// Automated picks in the window.
    pub automated_picks_in_window: u64,
    /// The last reconciliation run since start: when, what it found and repaired.
    pub reconciliation: Option<ReconcileBrief>,
    /// Carrier breakers, label queue, rate versions.
    pub shipping: Option<orderly_engine::services::shipping::ShippingSummary>,
    /// Webhook breaker and deliveries per status.
    pub notifications: Option<orderly_engine::services::notifications::NotificationSummary>,
    /// Carrier fallbacks since start.
    pub carrier_fallbacks: u64,
    /// Alerts firing now.
    pub alerts: Vec<Alert>,
}

/// Computes the summary and the alerts.
pub async fn summary(engine: &Engine) -> Result<Summary, ApiError> {
    let rt = &engine.runtime;
    let m = &rt.metrics;
    let orders_by_state = engine.orders_by_state().await?.into_iter().collect();
    let mut consumer_lag_seconds = BTreeMap::new();
    let mut consumer_backlog = BTreeMap::new();
    let mut alerts = Vec::new();
    let max_lag_s = rt.settings.alerts.max_lag.0 as f64 / 1000.0;
    for lag in rt.consumer_lag().await {
        let key = format!("{}<-{}", lag.consumer, lag.producer);
        if lag.lag_seconds > max_lag_s {
            alerts.push(Alert {
                name: "consumer_lag",
                detail: format!("{key} is {:.0} s behind (limit {max_lag_s:.0} s)", lag.lag_seconds),
            });
        }
        consumer_lag_seconds.insert(key.clone(), lag.lag_seconds);
        consumer_backlog.insert(key, lag.backlog);
    }
    let dead_letters = engine.dead_letters(1000).await?.len() as u64;
    let retries = m.counter_total("orderly_event_retries_total");
    if retries > rt.settings.alerts.max_retries {
        alerts.push(Alert {
            name: "retries",
            detail: format!("{retries} event retries (limit {})", rt.settings.alerts.max_retries),
        });
    }
    if dead_letters > 0 {
        alerts.push(Alert {
            name: "dead_letters",
            detail: format!("{dead_letters} events are dead-lettered and need attention"),
        });
    }
    let a = &rt.settings.alerts;
    let since = rt.now().0.saturating_sub(a.manual_adjustment_window.0);
    let manual = m.count_since("manual_adjustments", since);
    let picks = m.count_since("automated_picks", since);
    let manual_adjustment_ratio = if picks > 0 { manual as f64 / picks as f64 } else { manual as f64 };
    m.set("orderly_manual_adjustment_ratio", &[], manual_adjustment_ratio);
    if manual >= a.manual_adjustment_min_count && manual_adjustment_ratio > a.max_manual_adjustment_ratio {
        alerts.push(Alert {
            name: "manual_adjustment_ratio",
            detail: format!(
                "{manual} manual adjustments per {picks} automated picks in the last {} min ({manual_adjustment_ratio:.2}, limit {})",
                a.manual_adjustment_window.0 / 60_000,
                a.max_manual_adjustment_ratio
            ),
        });
    }
    let last = engine.last_reconcile();
    if let Some(r) = &last {
        let open = r.discrepancies.iter().filter(|d| !d.repaired).count();
        if open > 0 {
            alerts.push(Alert {
                name: "reconciliation",
                detail: format!("the last reconciliation left {open} discrepancies unrepaired (run {})", r.id),
            });
        }
    }
    let reconciliation = last.map(|r| ReconcileBrief {
        id: r.id.clone(),
        finished_at: r.finished_at,
        discrepancies: r.discrepancies.len() as u64,
        repaired: r.repaired,
    });
    let shipping = engine.shipping_summary().await.ok();
    if let Some(sh) = &shipping {
        for (carrier, state) in &sh.breakers {
            if state.name() != "closed" {
                alerts.push(Alert {
                    name: "carrier_breaker",
                    detail: format!("carrier {carrier} breaker is {}", state.name()),
                });
            }
        }
    }
    let notifications = engine.notification_summary().await.ok();
    for name in ALERT_NAMES {
        let firing = alerts.iter().any(|a| a.name == name);
        m.set("orderly_alert_active", &[("alert", name)], if firing { 1.0 } else { 0.0 });
    }
    Ok(Summary {
        orders_by_state,
        consumer_lag_seconds,
        consumer_backlog,
        dead_letters,
        retries,
        failures: m.counter_total("orderly_events_failed_total"),
        manual_adjustment_ratio,
        manual_adjustments_in_window: manual,
        automated_picks_in_window: picks,
        reconciliation,
        shipping,
        notifications,
        carrier_fallbacks: m.counter_total("orderly_carrier_fallbacks_total"),
        alerts,
    })
}
