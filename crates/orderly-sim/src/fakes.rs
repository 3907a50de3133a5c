//! The outside world the engine calls: fake carriers and a fake webhook
//! endpoint. Both sleep on tokio's (paused, virtual) time, draw their own
//! seeded randomness, and fail as the scheduler tells them: carriers time out
//! (sometimes after making the label), answer 5xx or refuse calls during an
//! outage; the webhook fails, times out after accepting, or is down. The
//! webhook is a receiver that deduplicates on `notification_id` and records
//! every delivery, so the checker can count re-sends and spot duplicates.

use crate::clock::VirtualClock;
use crate::rng::SimRng;
use async_trait::async_trait;
use orderly_domain::Timestamp;
use orderly_engine::ports::{CarrierApi, CarrierCallError, Clock, Label, LabelRequest, WebhookSink};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A failure mode that lasts until a time, hitting a share of calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    until: Option<Timestamp>,
    per_mille: u64,
}

impl Window {
    /// A mode failing `per_mille`/1000 of calls until `until`.
    pub fn new(until: Timestamp, per_mille: u64) -> Window {
        Window { until: Some(until), per_mille }
    }

    fn hits(&self, now: Timestamp, rng: &mut SimRng) -> bool {
        self.until.is_some_and(|t| t > now) && rng.chance(self.per_mille)
    }
}

/// How a carrier misbehaves now.
#[derive(Debug, Clone, Copy, Default)]
pub struct CarrierFaults {
    /// Calls answered with a 5xx.
    pub errors: Window,
    /// Calls answered after the timeout.
    pub timeouts: Window,
    /// Calls refused at once.
    pub outage: Window,
}

#[derive(Debug)]
struct CarrierState {
    rng: SimRng,
    faults: CarrierFaults,
    labels: BTreeMap<String, Label>,
    labeled: BTreeMap<String, String>,
    calls: u64,
}

enum Answer {
    Refuse,
    Fail,
    Late { create: bool },
    Label,
}

/// A carrier's label API that honours idempotency keys like a real one.
pub struct FakeCarrier {
    id: String,
    clock: Arc<VirtualClock>,
    timeout_ms: u64,
    state: Mutex<CarrierState>,
}

impl FakeCarrier {
    /// Carrier `id`; `timeout_ms` is the engine's call timeout (late answers exceed it).
    pub fn new(id: &str, clock: Arc<VirtualClock>, timeout_ms: u64, seed: u64) -> FakeCarrier {
        let stream = orderly_domain::ids::fnv1a(id.as_bytes());
        let state = CarrierState {
            rng: SimRng::new(seed, stream),
            faults: CarrierFaults::default(),
            labels: BTreeMap::new(),
            labeled: BTreeMap::new(),
            calls: 0,
        };
        FakeCarrier { id: id.to_owned(), clock, timeout_ms, state: Mutex::new(state) }
    }

    /// Changes how it misbehaves.
    pub fn set_faults(&self, f: impl FnOnce(&mut CarrierFaults)) {
        f(&mut self.lock().faults);
    }

    /// Shipments it made a label for (shipment id → tracking number).
    pub fn labeled(&self) -> BTreeMap<String, String> {
        self.lock().labeled.clone()
    }

    /// (calls, labels made).
    pub fn counts(&self) -> (u64, u64) {
        let st = self.lock();
        (st.calls, st.labels.len() as u64)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CarrierState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn decide(&self) -> (Answer, u64) {
        let now = self.clock.now();
        let mut st = self.lock();
        st.calls += 1;
        let latency_ms = st.rng.range(20, 400);
        let f = st.faults;
        let answer = if f.outage.hits(now, &mut st.rng) {
            Answer::Refuse
        } else if f.timeouts.hits(now, &mut st.rng) {
            Answer::Late { create: st.rng.chance(500) }
        } else if f.errors.hits(now, &mut st.rng) {
            Answer::Fail
        } else {
            Answer::Label
        };
        (answer, latency_ms)
    }

    fn make_label(&self, req: &LabelRequest) -> Label {
        let mut st = self.lock();
        let n = st.labels.len();
        let label = st
            .labels
            .entry(req.idempotency_key.clone())
            .or_insert_with(|| Label {
                tracking_number: format!("{}-{n:06}", self.id),
                carrier: self.id.clone(),
                cost: "4.95".to_owned(),
            })
            .clone();
        st.labeled.insert(req.shipment_id.clone(), label.tracking_number.clone());
        label
    }
}

#[async_trait]
impl CarrierApi for FakeCarrier {
    async fn create_label(&self, req: &LabelRequest) -> Result<Label, CarrierCallError> {
        let (answer, latency_ms) = self.decide();
        match answer {
            Answer::Refuse => Err(CarrierCallError::Unavailable(format!("{}: connection refused", self.id))),
            Answer::Fail => {
                tokio::time::sleep(Duration::from_millis(latency_ms)).await;
                Err(CarrierCallError::Unavailable(format!("{}: 503", self.id)))
            }
            Answer::Late { create } => {
                if create {
                    self.make_label(req);
                }
                tokio::time::sleep(Duration::from_millis(self.timeout_ms + 1_000 + latency_ms)).await;
                Ok(self.make_label(req))
            }
            Answer::Label => {
                tokio::time::sleep(Duration::from_millis(latency_ms)).await;
                Ok(self.make_label(req))
            }
        }
    }
}

/// How the webhook endpoint misbehaves now.
#[derive(Debug, Clone, Copy, Default)]
pub struct WebhookFaults {
    /// Deliveries answered with an error.
    pub errors: Window,
    /// Deliveries answered after the engine's timeout (accepted or not).
    pub timeouts: Window,
    /// Deliveries refused at once.
    pub outage: Window,
}

/// One notification as the customer's endpoint received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Notification id (the source event's id).
    pub id: String,
    /// The source event's type.
    pub kind: String,
    /// Order.
    pub order_id: String,
    /// Shipment concerned, if any.
    pub shipment_id: Option<String>,
}

#[derive(Debug)]
struct WebhookState {
    rng: SimRng,
    faults: WebhookFaults,
    accepted: BTreeMap<String, Received>,
    fresh: Vec<Received>,
    resends: u64,
    deliveries: u64,
    unreadable: u64,
}

/// A webhook endpoint that deduplicates on `notification_id`.
pub struct FakeWebhook {
    clock: Arc<VirtualClock>,
    state: Mutex<WebhookState>,
}

/// Longer than the engine waits for a delivery.
const LATE_MS: u64 = orderly_engine::services::notifications::WEBHOOK_TIMEOUT_MS + 1_000;

impl FakeWebhook {
    /// An endpoint drawing from `seed`.
    pub fn new(clock: Arc<VirtualClock>, seed: u64) -> FakeWebhook {
        let state = WebhookState {
            rng: SimRng::new(seed, 0x5EB0),
            faults: WebhookFaults::default(),
            accepted: BTreeMap::new(),
            fresh: Vec::new(),
            resends: 0,
            deliveries: 0,
            unreadable: 0,
        };
        FakeWebhook { clock, state: Mutex::new(state) }
    }

    /// Changes how it misbehaves.
    pub fn set_faults(&self, f: impl FnOnce(&mut WebhookFaults)) {
        f(&mut self.lock().faults);
    }

    /// Notifications accepted for the first time since the last call.
    pub fn take_fresh(&self) -> Vec<Received> {
        std::mem::take(&mut self.lock().fresh)
    }

    /// (deliveries, distinct notifications accepted, re-sends dropped, unreadable bodies).
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let st = self.lock();
        (st.deliveries, st.accepted.len() as u64, st.resends, st.unreadable)
    }

    /// Every accepted notification, by id.
    pub fn accepted(&self) -> BTreeMap<String, Received> {
        self.lock().accepted.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WebhookState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a delivery; a repeat of an accepted id is a re-send, dropped.
    fn receive(&self, event_id: &str, body: &[u8]) {
        let mut st = self.lock();
        st.deliveries += 1;
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
            st.unreadable += 1;
            return;
        };
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let id = field("notification_id").unwrap_or_else(|| event_id.to_owned());
        if st.accepted.contains_key(&id) {
            st.resends += 1;
            return;
        }
        let received = Received {
            id: id.clone(),
            kind: field("kind").unwrap_or_default(),
            order_id: field("order_id").unwrap_or_default(),
            shipment_id: field("shipment_id"),
        };
        st.accepted.insert(id, received.clone());
        st.fresh.push(received);
    }
}

#[async_trait]
impl WebhookSink for FakeWebhook {
    async fn deliver(&self, event_id: &str, body: &[u8]) -> Result<(), String> {
        let now = self.clock.now();
        let (refuse, late, fail, accept_late, latency_ms) = {
            let mut st = self.lock();
            let f = st.faults;
            let refuse = f.outage.hits(now, &mut st.rng);
            let late = f.timeouts.hits(now, &mut st.rng);
            let fail = f.errors.hits(now, &mut st.rng);
            (refuse, late, fail, st.rng.chance(500), st.rng.range(5, 150))
        };
        if refuse {
            return Err("webhook endpoint: connection refused".to_owned());
        }
        if late {
            if accept_late {
                self.receive(event_id, body);
            }
            tokio::time::sleep(Duration::from_millis(LATE_MS + latency_ms)).await;
            return Err("webhook endpoint: answered too late".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(latency_ms)).await;
        if fail {
            return Err("webhook endpoint: 500".to_owned());
        }
        self.receive(event_id, body);
        Ok(())
    }
}
