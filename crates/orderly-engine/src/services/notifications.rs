//! The notifications service: one customer notification per order or
//! shipment event, delivered to the webhook endpoint by a worker task so the
//! service loop never waits on the network.
//!
//! A notification's id is the id of the event it tells about, and it is the
//! key of table `notifications`, so a redelivered event finds its
//! notification and creates no second one. Delivery is at least once: a
//! notification is marked sent in the same commit that emits
//! `notification.sent`, and its body carries `notification_id`, so a receiver
//! can drop a delivery repeated after a crash between the webhook's answer
//! and that commit. Failed deliveries are retried with exponential backoff and
//! jitter behind a circuit breaker; past the limit (`bus.max_attempts`) the
//! notification is marked failed, emits `notification.failed` and waits for
//! an operator's [`Command::Retry`].

use super::common::{ApiError, Reply};
use super::shipping::{DueQueue, breaker_gauge};
use crate::config::Settings;
use crate::events::{self, LabelCreated, ShipmentDelivered};
use crate::metrics::Metrics;
use crate::ports::{GreatestKey, Store, StoreError, WebhookSink};
use crate::prefetch::Reads;
use crate::runtime::{EventError, Service, Tx};
use crate::table::{CACHE_ENTRIES_MAX, Staged, Table};
use orderly_domain::event::{Envelope, EventData, EventType};
use orderly_domain::shipping::{BreakerConfig, BreakerState, CircuitBreaker, RetryPolicy};
use orderly_domain::{OrderId, ShipmentId, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Most webhook deliveries out at once (also the worker's job channel capacity).
pub const DELIVERIES_IN_FLIGHT_MAX: usize = 32;
/// Longest one webhook delivery may take.
pub const WEBHOOK_TIMEOUT_MS: u64 = 10_000;
/// How long past the timeout a delivery may stay unanswered before the
/// service presumes its result lost and tries again.
pub const CALL_GRACE_MS: i64 = 5_000;
/// Backoff between delivery attempts: first cap.
pub const RETRY_BASE_MS: u64 = 1_000;
/// Backoff between delivery attempts: longest wait.
pub const RETRY_MAX_MS: u64 = 60_000;
/// Most failed notifications listed at once.
pub const FAILED_LIST_MAX: u32 = 500;
/// Most notifications waiting in the in-memory delivery queue. The rest
/// wait in the store (status `pending`, in id order, which is creation
/// order) and are paged in as the queue drains, so an endpoint down for
/// hours costs disk, not memory.
pub const QUEUE_MAX: usize = 10_000;
/// Pending notifications read from the store per page when refilling the queue.
const REFILL_PAGE: u32 = 1_000;
/// How long a delivery waits when the breaker's one probe is already out.
const PROBE_WAIT_MS: i64 = 1_000;

/// Where a notification is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationStatus {
    /// Waiting for (another) delivery attempt.
    Pending,
    /// The endpoint accepted it.
    Sent,
    /// Every attempt failed; waiting for an operator's retry.
    Failed,
}

impl NotificationStatus {
    /// The wire name, also the `notifications` index value.
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationStatus::Pending => "pending",
            NotificationStatus::Sent => "sent",
            NotificationStatus::Failed => "failed",
        }
    }
}

/// A notification, as stored (table `notifications`, key = source event id,
/// indexed by status) and shown to ops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Notification id: the id of the event it tells about.
    pub id: String,
    /// The source event's type, e.g. `orderly.order.backordered`.
    pub kind: String,
    /// Order.
    pub order_id: OrderId,
    /// Customer e-mail, when known.
    pub email: Option<String>,
    /// What is delivered (JSON, carrying `notification_id`), as the text
    /// written once when the notification was created.
    pub body: EventData,
    /// Status.
    pub status: NotificationStatus,
    /// Failed attempts since it was created or last retried by ops.
    pub attempts: u32,
    /// Delivery attempts over its whole life.
    pub total_attempts: u32,
    /// When the next attempt is due (restored after a restart).
    pub next_attempt_at: Timestamp,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When the endpoint accepted it.
    pub sent_at: Option<Timestamp>,
    /// When it was marked failed.
    pub failed_at: Option<Timestamp>,
}

/// `orderly.notification.sent`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationSent {
    /// Notification id (= source event id).
    pub notification_id: String,
    /// The source event's type.
    pub kind: String,
    /// Order.
    pub order_id: OrderId,
    /// Attempts it took over its life.
    pub attempts: u32,
}

/// `orderly.notification.failed`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationFailed {
    /// Notification id (= source event id).
    pub notification_id: String,
    /// The source event's type.
    pub kind: String,
    /// Order.
    pub order_id: OrderId,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: String,
}

/// A delivery's result, fed back into the service by the [`DeliveryWorker`].
#[derive(Debug, Clone)]
pub struct DeliveryOutcome {
    /// The delivery's job number (results of superseded deliveries are ignored).
    pub job: u64,
    /// Notification id.
    pub notification_id: String,
    /// `Err` when the endpoint refused, failed or timed out.
    pub result: Result<(), String>,
}

/// Notifications' part of `/v1/ops/summary`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NotificationSummary {
    /// The endpoint (scheme and host, or `log`).
    pub endpoint: String,
    /// Its breaker.
    pub breaker: BreakerState,
    /// Notifications waiting for delivery (queued, backing off or out).
    pub queue_depth: u64,
    /// Deliveries out now.
    pub in_flight: u64,
    /// Notifications per status in the store.
    pub by_status: BTreeMap<String, u64>,
}

/// Commands from the API (and from the delivery worker).
pub enum Command {
    /// One notification.
    Get {
        /// Notification id.
        id: String,
        /// Answer.
        reply: Reply<Notification>,
    },
    /// Failed notifications in id order, after `after`, at most `limit` (≤ [`FAILED_LIST_MAX`]).
    ListFailed {
        /// Resume after this id.
        after: Option<String>,
        /// Page size.
        limit: u32,
        /// Answer.
        reply: Reply<Vec<Notification>>,
    },
    /// Puts a failed notification back in the queue with a fresh set of attempts.
    Retry {
        /// Notification id.
        id: String,
        /// Answer.
        reply: Reply<Notification>,
    },
    /// Breaker and queue state.
    Summary {
        /// Answer.
        reply: Reply<NotificationSummary>,
    },
    /// A delivery's result, from the [`DeliveryWorker`].
    DeliveryResult(DeliveryOutcome),
}

/// Why the notifications service cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The settings are unusable.
    #[error("invalid notification configuration: {0}")]
    Config(String),
}

/// One delivery the service hands to the worker.
#[derive(Debug)]
struct DeliveryJob {
    job: u64,
    notification_id: String,
    body: EventData,
}

#[derive(Debug, Clone, Copy)]
struct Delivery {
    job: u64,
    dispatched_at: Timestamp,
}

/// What notifications remembers of an order: whom to tell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Contact {
    email: String,
}

/// What every delivered notification carries, then what it is about
/// (each field once: the parts share no names).
#[derive(Serialize)]
struct Body<'a, T> {
    notification_id: &'a str,
    kind: &'a str,
    order_id: &'a str,
    email: Option<&'a str>,
    occurred_at: Timestamp,
    #[serde(flatten)]
    about: T,
}

/// An order's new state.
#[derive(Serialize)]
struct OrderAbout<'a> {
    state: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expected_ship_date: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shipment_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// A label bought for a shipment.
#[derive(Serialize)]
struct LabelAbout<'a> {
    state: &'a str,
    shipment_id: &'a str,
    carrier: &'a str,
    tracking: &'a str,
    label_created_at: Timestamp,
}

/// A shipment delivered.
#[derive(Serialize)]
struct DeliveredAbout<'a> {
    state: &'a str,
    shipment_id: &'a str,
}

/// The fields of an order event a notification needs. Order events carry
/// different payloads (`OrderStateChanged`, `OrderAllocated`, `OrderCanceled`…);
/// all carry the order id, and the rest is taken when present.
#[derive(Debug, Deserialize)]
struct OrderNotice {
    order_id: OrderId,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    expected_ship_date: Option<Timestamp>,
    #[serde(default)]
    shipment_id: Option<ShipmentId>,
    #[serde(default)]
    reason: Option<String>,
}

/// The notifications service.
pub struct Notifications {
    notifications: Table<Notification>,
    contacts: Table<Contact>,
    queue: DueQueue<Delivery>,
    endpoint: String,
    breaker: CircuitBreaker,
    retry: RetryPolicy,
    jobs: mpsc::Sender<DeliveryJob>,
    next_job: u64,
    call_deadline_ms: i64,
    /// Some pending notification may be in the store only (the queue was full).
    spilled: bool,
    /// Spilled again since the current pass over the store began.
    spilled_in_pass: bool,
    /// Where the current pass over the store's pending notifications resumes.
    refill_after: Option<String>,
    /// The greatest notification id (its source event's id) stored when the
    /// service opened: no earlier notification has a greater one.
    stored_upto: GreatestKey,
}

impl Notifications {
    /// Opens the service over its store, with every pending notification back
    /// in the queue. Deliveries are tried `bus.max_attempts` times. The engine
    /// spawns the returned worker with `tokio::spawn(worker.run(command_sender))`,
    /// where `command_sender` feeds the channel the runtime reads this service's
    /// commands from.
    pub async fn open(
        store: &dyn Store,
        settings: &Settings,
        sink: Arc<dyn WebhookSink>,
    ) -> Result<(Notifications, DeliveryWorker), OpenError> {
        let retry = RetryPolicy::new(settings.bus.max_attempts, RETRY_BASE_MS, RETRY_MAX_MS, 2)
            .map_err(|e| OpenError::Config(format!("bus.max_attempts: {e}")))?;
        let cooldown_ms = u64::try_from(settings.notifications.breaker_cooldown.0)
            .map_err(|_| OpenError::Config("notifications.breaker_cooldown must not be negative".to_owned()))?;
        let breaker = BreakerConfig::new(settings.notifications.breaker_failures, cooldown_ms)
            .map_err(|e| OpenError::Config(format!("notifications.breaker_*: {e}")))?;
        let (jobs_tx, jobs_rx) = mpsc::channel(DELIVERIES_IN_FLIGHT_MAX);
        let mut svc = Notifications {
            // Not even pending notifications stay cached: the queue holds
            // their ids, and a delivery reads its notification from the store
            // (in a flash sale they wait by the tens of thousands, bodies and all).
            notifications: Table::new("notifications", CACHE_ENTRIES_MAX, |n: &Notification| {
                Some(n.status.as_str().to_owned())
            })
            .settled_when(|_| true),
            contacts: Table::new("contacts", CACHE_ENTRIES_MAX, |_| None),
            queue: DueQueue::new(),
            endpoint: endpoint_label(settings.notifications.webhook_url.as_deref()),
            breaker: CircuitBreaker::new(breaker),
            retry,
            jobs: jobs_tx,
            next_job: 0,
            call_deadline_ms: i64::try_from(WEBHOOK_TIMEOUT_MS).unwrap_or(i64::MAX).saturating_add(CALL_GRACE_MS),
            // Every pending notification is in the store only: the first refill pages them in.
            spilled: true,
            spilled_in_pass: false,
            refill_after: None,
            stored_upto: store.greatest_key("notifications").await?,
        };
        svc.refill(store).await?;
        Ok((svc, DeliveryWorker { jobs: jobs_rx, sink }))
    }

    /// Queues a pending notification for delivery at `at`, or leaves it to
    /// the store when the queue is full (a later refill pages it in).
    fn enqueue(&mut self, id: &str, at: Timestamp) {
        if self.queue.contains(id) || self.queue.len() < QUEUE_MAX {
            self.queue.schedule(id, at);
        } else {
            self.spilled = true;
            self.spilled_in_pass = true;
        }
    }

    /// Whether a notification for event `id` may have been stored before the
    /// service opened (then only the store can tell).
    fn maybe_stored_before(&self, id: &str) -> bool {
        match &self.stored_upto {
            GreatestKey::Unknown => true,
            GreatestKey::Empty => false,
            GreatestKey::Key(upto) => id <= upto.as_str(),
        }
    }

    /// True when pending notifications wait in the store only and the queue has room for them.
    fn wants_refill(&self) -> bool {
        self.spilled && self.queue.len() <= QUEUE_MAX / 2
    }

    /// Pages pending notifications from the store into the queue, up to
    /// [`QUEUE_MAX`], continuing a pass over them in id order. A pass that
    /// reaches the end with nothing spilled meanwhile means the queue holds
    /// every pending notification again.
    async fn refill(&mut self, store: &dyn Store) -> Result<(), StoreError> {
        while self.spilled && self.queue.len() < QUEUE_MAX {
            if self.refill_after.is_none() {
                self.spilled_in_pass = false;
            }
            let room = u32::try_from(QUEUE_MAX - self.queue.len()).unwrap_or(REFILL_PAGE).min(REFILL_PAGE);
            let pending = Some(NotificationStatus::Pending.as_str());
            let rows = store.scan("notifications", pending, self.refill_after.as_deref(), room).await?;
            let end = rows.len() < room as usize;
            for row in rows {
                if !self.queue.contains(&row.key) {
                    let n: Notification = decode(&row.key, &row.doc)?;
                    self.queue.schedule_stored(&row.key, n.next_attempt_at);
                }
                self.refill_after = Some(row.key);
            }
            if end {
                self.refill_after = None;
                self.spilled = self.spilled_in_pass;
                if self.spilled {
                    // Spilled during this pass: the next tick starts another.
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    async fn on_order_event(&mut self, tx: &mut Tx, event: &Envelope, state: &str) -> Result<(), EventError> {
        let notice: OrderNotice = events::parse(event)?;
        // Order events carry the e-mail; shipment events do not, and only an
        // allocated order ships, so its contact is stored at its allocation
        // (not for every order created: a flash sale's backordered orders
        // cost no contact row until they are allocated).
        let email = match (notice.email.clone(), event.event_type == EventType::OrderAllocated) {
            (Some(email), false) => Some(email),
            (email, _) => self.remember(tx, &notice.order_id, email).await?,
        };
        let about = OrderAbout {
            state: notice.state.as_deref().unwrap_or(state),
            expected_ship_date: notice.expected_ship_date,
            shipment_id: notice.shipment_id.as_ref().map(ShipmentId::as_str),
            reason: notice.reason.as_deref(),
        };
        self.create(tx, event, notice.order_id, email, about);
        Ok(())
    }

    async fn on_label_created(&mut self, tx: &mut Tx, event: &Envelope) -> Result<(), EventError> {
        let label: LabelCreated = events::parse(event)?;
        let email = self.remember(tx, &label.order_id, None).await?;
        let about = LabelAbout {
            state: "label_created",
            shipment_id: label.shipment_id.as_str(),
            carrier: &label.carrier,
            tracking: &label.tracking_number,
            label_created_at: label.label_created_at,
        };
        self.create(tx, event, label.order_id, email, about);
        Ok(())
    }

    async fn on_shipment_delivered(&mut self, tx: &mut Tx, event: &Envelope) -> Result<(), EventError> {
        let delivered: ShipmentDelivered = events::parse(event)?;
        let email = self.remember(tx, &delivered.order_id, None).await?;
        let about = DeliveredAbout { state: "delivered", shipment_id: delivered.shipment_id.as_str() };
        self.create(tx, event, delivered.order_id, email, about);
        Ok(())
    }

    /// Records an order's e-mail when the event carries one; returns the one known.
    async fn remember(
        &mut self,
        tx: &mut Tx,
        order: &OrderId,
        email: Option<String>,
    ) -> Result<Option<String>, StoreError> {
        if email.is_none() {
            self.contacts.load(tx.store(), order.as_str()).await?;
        }
        let known = self.contacts.get(order.as_str()).map(|c| c.email.clone());
        match email {
            Some(email) if known.as_deref() != Some(email.as_str()) => {
                self.contacts.insert(order.as_str().to_owned(), Contact { email: email.clone() });
                Ok(Some(email))
            }
            Some(email) => Ok(Some(email)),
            None => Ok(known),
        }
    }

    /// Creates the notification for `event` (the caller checked it is new).
    fn create(
        &mut self,
        tx: &mut Tx,
        event: &Envelope,
        order_id: OrderId,
        email: Option<String>,
        about: impl Serialize,
    ) {
        let body = EventData::of(&Body {
            notification_id: &event.id,
            kind: event.event_type.as_str(),
            order_id: order_id.as_str(),
            email: email.as_deref(),
            occurred_at: event.time,
            about,
        });
        let notification = Notification {
            id: event.id.clone(),
            kind: event.event_type.as_str().to_owned(),
            order_id,
            email,
            body,
            status: NotificationStatus::Pending,
            attempts: 0,
            total_attempts: 0,
            next_attempt_at: tx.now,
            last_error: None,
            created_at: tx.now,
            sent_at: None,
            failed_at: None,
        };
        self.notifications.insert(event.id.clone(), notification);
        self.enqueue(&event.id, tx.now);
        tx.ctx().metrics.inc("orderly_notifications_created_total", &[], 1);
    }

    /// Hands due notifications to the worker, as far as the breaker and the
    /// in-flight limit allow.
    async fn dispatch(&mut self, tx: &mut Tx) {
        let capacity = DELIVERIES_IN_FLIGHT_MAX.saturating_sub(self.queue.in_flight());
        if capacity == 0 {
            return;
        }
        let due = self.queue.due(tx.now, capacity);
        self.breaker.refresh(tx.now);
        if let BreakerState::Open { until } = self.breaker.state() {
            // Nothing goes out before the cooldown ends: no need to load anything.
            due.iter().for_each(|(_, id)| self.queue.schedule(id, until));
            return;
        }
        // Read together (one statement on PostgreSQL); a failure here is
        // met again, per notification, below.
        let ids: Vec<&str> = due.iter().map(|(_, id)| id.as_str()).collect();
        if let Err(e) = self.notifications.load_many(tx.store(), &ids).await {
            tracing::debug!(error = %e, "could not read due notifications together");
        }
        for (_, id) in due {
            let body = match self.pending_body(tx, &id).await {
                Ok(Some(body)) => body,
                Ok(None) => {
                    self.queue.unschedule(&id);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(notification = %id, event_id = %id, error = %e, "could not load notification; retrying shortly");
                    self.queue.schedule(&id, tx.now.plus_ms(PROBE_WAIT_MS));
                    continue;
                }
            };
            self.send(tx, &id, body);
        }
    }

    /// Hands one delivery to the worker, if the breaker lets it through.
    fn send(&mut self, tx: &mut Tx, id: &str, body: EventData) {
        // Reserve the worker slot first, so a call the breaker admits always goes out.
        let permit = match self.jobs.try_reserve() {
            Ok(permit) => permit,
            Err(e) => {
                tracing::error!(notification = %id, event_id = %id, error = %e, "delivery worker unavailable; retrying shortly");
                self.queue.schedule(id, tx.now.plus_ms(PROBE_WAIT_MS));
                return;
            }
        };
        if !self.breaker.allow(tx.now) {
            let until = match self.breaker.state() {
                BreakerState::Open { until } => until,
                _ => tx.now.plus_ms(PROBE_WAIT_MS),
            };
            self.queue.schedule(id, until);
            return;
        }
        self.next_job += 1;
        permit.send(DeliveryJob { job: self.next_job, notification_id: id.to_owned(), body });
        self.queue.start(id, Delivery { job: self.next_job, dispatched_at: tx.now });
    }

    /// The body of a notification still waiting for delivery; `None` if it is not.
    async fn pending_body(&mut self, tx: &mut Tx, id: &str) -> Result<Option<EventData>, StoreError> {
        if !self.notifications.load(tx.store(), id).await? {
            return Ok(None);
        }
        let Some(n) = self.notifications.get(id).filter(|n| n.status == NotificationStatus::Pending) else {
            return Ok(None);
        };
        // The stored text itself (a reference count), not a copy.
        Ok(Some(n.body.clone()))
    }

    /// Processes a delivery's result.
    async fn on_delivery_result(&mut self, tx: &mut Tx, outcome: DeliveryOutcome) {
        let id = outcome.notification_id;
        if self.queue.flight(&id).is_none_or(|d| d.job != outcome.job) {
            return;
        }
        self.queue.finish(&id);
        match &outcome.result {
            Ok(()) => self.breaker.on_success(tx.now),
            Err(_) => self.breaker.on_failure(tx.now),
        }
        let found = match self.notifications.load(tx.store(), &id).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(notification = %id, event_id = %id, error = %e, "could not load notification for its result");
                self.queue.schedule(&id, tx.now.plus_ms(PROBE_WAIT_MS));
                return;
            }
        };
        if !found {
            return;
        }
        match outcome.result {
            Ok(()) => self.record_sent(tx, &id),
            Err(error) => self.record_failure(tx, &id, error),
        }
    }

    fn record_sent(&mut self, tx: &mut Tx, id: &str) {
        let Some(n) = self.notifications.get_mut(id).filter(|n| n.status == NotificationStatus::Pending) else {
            return;
        };
        n.status = NotificationStatus::Sent;
        n.sent_at = Some(tx.now);
        n.total_attempts += 1;
        n.last_error = None;
        let data = NotificationSent {
            notification_id: n.id.clone(),
            kind: n.kind.clone(),
            order_id: n.order_id.clone(),
            attempts: n.total_attempts,
        };
        tx.emit(EventType::NotificationSent, data.order_id.as_str(), events::data(&data));
        tx.ctx().metrics.inc("orderly_notifications_sent_total", &[], 1);
    }

    fn record_failure(&mut self, tx: &mut Tx, id: &str, error: String) {
        let jitter = tx.random();
        let Some(n) = self.notifications.get_mut(id).filter(|n| n.status == NotificationStatus::Pending) else {
            return;
        };
        n.attempts += 1;
        n.total_attempts += 1;
        n.last_error = Some(error.clone());
        if let Some(delay_ms) = self.retry.delay_ms(n.attempts, jitter) {
            n.next_attempt_at = tx.now.plus_ms(i64::try_from(delay_ms).unwrap_or(i64::MAX));
            let at = n.next_attempt_at;
            tracing::info!(notification = %id, event_id = %id, order_id = %n.order_id, attempt = n.attempts, delay_ms, error = %error, "delivery failed; retrying");
            self.queue.schedule(id, at);
            tx.ctx().metrics.inc("orderly_notification_retries_total", &[], 1);
            return;
        }
        n.status = NotificationStatus::Failed;
        n.failed_at = Some(tx.now);
        let data = NotificationFailed {
            notification_id: n.id.clone(),
            kind: n.kind.clone(),
            order_id: n.order_id.clone(),
            attempts: n.attempts,
            error,
        };
        tracing::warn!(notification = %id, event_id = %id, order_id = %n.order_id, attempts = n.attempts, "delivery failed for good; waiting for ops");
        tx.emit(EventType::NotificationFailed, data.order_id.as_str(), events::data(&data));
        tx.ctx().metrics.inc("orderly_notifications_failed_total", &[], 1);
    }

    /// Deliveries whose result never came back count as failed attempts.
    async fn reap_lost_deliveries(&mut self, tx: &mut Tx) {
        let lost: Vec<DeliveryOutcome> = self
            .queue
            .flights()
            .filter(|(_, d)| tx.now.since(d.dispatched_at) > self.call_deadline_ms)
            .map(|(id, d)| DeliveryOutcome {
                job: d.job,
                notification_id: id.clone(),
                result: Err("no result from the delivery worker".to_owned()),
            })
            .collect();
        for outcome in lost {
            self.on_delivery_result(tx, outcome).await;
        }
    }

    async fn load(&mut self, tx: &mut Tx, id: &str) -> Result<Notification, ApiError> {
        let not_found = || ApiError::NotFound(format!("notification {id}"));
        if !self.notifications.load(tx.store(), id).await? {
            return Err(not_found());
        }
        self.notifications.get(id).cloned().ok_or_else(not_found)
    }

    async fn retry_failed(&mut self, tx: &mut Tx, id: &str) -> Result<Notification, ApiError> {
        let n = self.load(tx, id).await?;
        match n.status {
            NotificationStatus::Pending => return Ok(n),
            NotificationStatus::Sent => {
                return Err(ApiError::conflict("notification-sent", format!("notification {id} was already sent")));
            }
            NotificationStatus::Failed => {}
        }
        let n = self.notifications.get_mut(id).ok_or_else(|| ApiError::NotFound(format!("notification {id}")))?;
        n.status = NotificationStatus::Pending;
        n.attempts = 0;
        n.failed_at = None;
        n.next_attempt_at = tx.now;
        let n = n.clone();
        self.enqueue(id, tx.now);
        tx.ctx().metrics.inc("orderly_notification_replays_total", &[], 1);
        Ok(n)
    }

    async fn list_failed(&self, tx: &mut Tx, after: Option<&str>, limit: u32) -> Result<Vec<Notification>, ApiError> {
        let limit = limit.clamp(1, FAILED_LIST_MAX);
        let rows = tx.store().scan("notifications", Some(NotificationStatus::Failed.as_str()), after, limit).await?;
        rows.iter().map(|r| decode(&r.key, &r.doc).map_err(ApiError::from)).collect()
    }

    async fn summary(&mut self, tx: &mut Tx) -> Result<NotificationSummary, ApiError> {
        self.breaker.refresh(tx.now);
        Ok(NotificationSummary {
            endpoint: self.endpoint.clone(),
            breaker: self.breaker.state(),
            queue_depth: self.queue.len() as u64,
            in_flight: self.queue.in_flight() as u64,
            by_status: tx.store().count_by_idx("notifications").await?.into_iter().collect(),
        })
    }

    fn publish_gauges(&mut self, tx: &Tx) {
        self.breaker.refresh(tx.now);
        let m = &tx.ctx().metrics;
        m.set("orderly_webhook_breaker_state", &[("endpoint", &self.endpoint)], breaker_gauge(self.breaker.state()));
        m.set("orderly_notification_queue_depth", &[], self.queue.len() as f64);
    }
}

impl Service for Notifications {
    type Command = Command;

    async fn on_command(&mut self, tx: &mut Tx, cmd: Command) {
        match cmd {
            Command::Get { id, reply } => {
                let r = self.load(tx, &id).await;
                tx.reply(reply, r);
            }
            Command::ListFailed { after, limit, reply } => {
                let r = self.list_failed(tx, after.as_deref(), limit).await;
                tx.reply(reply, r);
            }
            Command::Retry { id, reply } => {
                let r = self.retry_failed(tx, &id).await;
                tx.reply(reply, r);
            }
            Command::Summary { reply } => {
                let r = self.summary(tx).await;
                tx.reply(reply, r);
            }
            Command::DeliveryResult(outcome) => self.on_delivery_result(tx, outcome).await,
        }
        self.publish_gauges(tx);
    }

    async fn on_event(&mut self, tx: &mut Tx, event: &Envelope) -> Result<(), EventError> {
        use tracing::Instrument;
        let span = super::common::event_span(event);
        async move {
            if !wants(event.event_type.as_str()) {
                return Ok(());
            }
            // A redelivered event (a broker, a replica that lost a race, a
            // replayed dead letter, a lost cursor): its notification exists
            // already. Customers must never get the same notification twice,
            // so this guard reads the store even though the runtime
            // deduplicates too. It skips the read (a miss per event was about
            // 5% of a flash sale's CPU) only for an event the runtime delivers
            // exactly once to this store's only writer and whose id is past
            // every notification stored before the service opened: then only
            // this process can have stored it, and it is delivered here once.
            let repeat = match tx.may_be_repeated() || self.maybe_stored_before(&event.id) {
                true => self.notifications.load(tx.store(), &event.id).await?,
                false => self.notifications.get(&event.id).is_some(),
            };
            if repeat {
                return Ok(());
            }
            if let Some(state) = order_state(event.event_type.as_str()) {
                return self.on_order_event(tx, event, state).await;
            }
            match event.event_type {
                EventType::ShipmentLabelCreated => self.on_label_created(tx, event).await,
                EventType::ShipmentDelivered => self.on_shipment_delivered(tx, event).await,
                _ => Ok(()),
            }
        }
        .instrument(span)
        .await
    }

    async fn on_tick(&mut self, tx: &mut Tx) {
        if self.wants_refill()
            && let Err(e) = self.refill(tx.store()).await
        {
            tracing::warn!(error = %e, "could not page pending notifications in; retrying on the next tick");
        }
        self.reap_lost_deliveries(tx).await;
        self.dispatch(tx).await;
        self.publish_gauges(tx);
    }

    fn next_deadline(&self) -> Option<Timestamp> {
        let dispatch = (self.queue.in_flight() < DELIVERIES_IN_FLIGHT_MAX).then(|| self.queue.earliest()).flatten();
        let lost = self.queue.flights().map(|(_, d)| d.dispatched_at.plus_ms(self.call_deadline_ms + 1)).min();
        let refill = self.wants_refill().then_some(Timestamp(i64::MIN));
        [dispatch, lost, refill].into_iter().flatten().min()
    }

    fn tables(&mut self) -> Vec<&mut dyn Staged> {
        vec![&mut self.notifications, &mut self.contacts, &mut self.queue]
    }

    fn command_reads(&self, cmd: &Command, reads: &mut Reads) {
        match cmd {
            // A delivery's result marks its notification sent or failed; a
            // sale's notifications have mostly left the cache by then.
            Command::DeliveryResult(outcome) => self.notifications.want(&outcome.notification_id, reads),
            Command::Get { id, .. } | Command::Retry { id, .. } => self.notifications.want(id, reads),
            Command::ListFailed { .. } | Command::Summary { .. } => {}
        }
    }

    fn event_reads(&self, event: &Envelope, reads: &mut Reads) {
        let order_id = || match order_state(event.event_type.as_str()) {
            Some(_) => Some(std::borrow::Cow::Borrowed(event.subject.as_str())),
            None => event.data.str_field("order_id"),
        };
        if wants(event.event_type.as_str()) {
            self.notifications.want(&event.id, reads);
            if let Some(order) = order_id() {
                self.contacts.want(&order, reads);
            }
        }
    }
}

/// Registers the help text of the metrics this service updates.
pub fn describe_metrics(m: &Metrics) {
    m.describe("orderly_notifications_created_total", "Customer notifications created (one per source event).");
    m.describe("orderly_notifications_sent_total", "Notifications the webhook endpoint accepted.");
    m.describe("orderly_notifications_failed_total", "Notifications that failed every attempt (waiting for ops).");
    m.describe("orderly_notification_retries_total", "Webhook deliveries retried after a failure.");
    m.describe("orderly_notification_replays_total", "Failed notifications put back in the queue by ops.");
    m.describe("orderly_notification_queue_depth", "Notifications waiting for delivery.");
    m.describe("orderly_webhook_breaker_state", "Webhook endpoint breaker: 0 closed, 1 half-open, 2 open.");
}

/// Whether the notifications service consumes an event type (the embedded
/// bus's filter for its order and shipping subscriptions).
pub fn wants(event_type: &str) -> bool {
    order_state(event_type).is_some()
        || event_type == EventType::ShipmentLabelCreated.as_str()
        || event_type == EventType::ShipmentDelivered.as_str()
}

/// The order events customers are told about, with the state each announces.
fn order_state(event_type: &str) -> Option<&'static str> {
    let state = match EventType::parse(event_type) {
        EventType::OrderConfirmed => "confirmed",
        EventType::OrderAllocated => "allocated",
        EventType::OrderBackordered => "backordered",
        EventType::OrderPartiallyShipped => "partially_shipped",
        EventType::OrderShipped => "shipped",
        EventType::OrderDelivered => "delivered",
        EventType::OrderCanceled => "canceled",
        EventType::OrderReturnRequested => "return_requested",
        EventType::OrderReturned => "returned",
        _ => return None,
    };
    Some(state)
}

/// Delivers the notifications the service hands it through the webhook sink,
/// off the service loop, each bounded by [`WEBHOOK_TIMEOUT_MS`], and feeds every
/// result back as a [`Command::DeliveryResult`].
pub struct DeliveryWorker {
    jobs: mpsc::Receiver<DeliveryJob>,
    sink: Arc<dyn WebhookSink>,
}

impl DeliveryWorker {
    /// Runs until the service is gone (its job channel closes); deliveries
    /// still out are then abandoned (the notifications stay pending in the store).
    pub async fn run(mut self, results: mpsc::Sender<Command>) {
        let mut deliveries = JoinSet::new();
        loop {
            // Biased: an unbiased select picks among ready branches with a
            // per-process random number, so a simulated seed would not replay.
            tokio::select! {
                biased;
                job = self.jobs.recv() => match job {
                    Some(job) => {
                        deliveries.spawn(deliver(self.sink.clone(), job, results.clone()));
                    }
                    None => return,
                },
                Some(_) = deliveries.join_next(), if !deliveries.is_empty() => {}
            }
        }
    }
}

async fn deliver(sink: Arc<dyn WebhookSink>, job: DeliveryJob, results: mpsc::Sender<Command>) {
    let call = sink.deliver(&job.notification_id, job.body.text().as_bytes());
    let result = match tokio::time::timeout(std::time::Duration::from_millis(WEBHOOK_TIMEOUT_MS), call).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {WEBHOOK_TIMEOUT_MS} ms")),
    };
    let outcome = DeliveryOutcome { job: job.job, notification_id: job.notification_id, result };
    // The service may be shutting down; the notification stays pending in the store.
    let _ = results.send(Command::DeliveryResult(outcome)).await;
}

/// A label for the webhook endpoint in metrics and the summary: its scheme and
/// host (never credentials or path), or `log` when there is no webhook.
pub fn endpoint_label(url: Option<&str>) -> String {
    let Some(url) = url else { return "log".to_owned() };
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if scheme.is_empty() { host.to_owned() } else { format!("{scheme}://{host}") }
}

fn decode(key: &str, doc: &[u8]) -> Result<Notification, StoreError> {
    serde_json::from_slice(doc).map_err(|e| StoreError::Corrupt {
        table: "notifications".to_owned(),
        key: key.to_owned(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_labels_drop_credentials_and_paths() {
        assert_eq!(endpoint_label(None), "log");
        assert_eq!(endpoint_label(Some("https://user:pw@hooks.example.com/x?y=1")), "https://hooks.example.com");
        assert_eq!(endpoint_label(Some("http://127.0.0.1:9000")), "http://127.0.0.1:9000");
        assert_eq!(endpoint_label(Some("hooks.example.com/a")), "hooks.example.com");
    }

    #[test]
    fn customers_hear_of_order_states_and_shipments_but_not_internal_steps() {
        for t in ["orderly.order.backordered", "orderly.order.canceled", "orderly.shipment.label_created"] {
            assert!(wants(t), "{t}");
        }
        for t in [
            "orderly.order.created",
            "orderly.order.picked",
            "orderly.pick.completed",
            "orderly.shipment.carrier_fallback",
        ] {
            assert!(!wants(t), "{t}");
        }
        assert_eq!(order_state("orderly.order.created"), None);
    }

    /// A delivery's result reads its notification (it left the cache when
    /// the batch that created it committed): on PostgreSQL the read is part
    /// of the batch's one read-ahead, not a round trip of its own.
    #[tokio::test]
    async fn a_delivery_result_reads_its_notification_ahead() {
        struct Nowhere;
        #[async_trait::async_trait]
        impl WebhookSink for Nowhere {
            async fn deliver(&self, _: &str, _: &[u8]) -> Result<(), String> {
                Err("not in this test".into())
            }
        }
        let store = crate::memory_store::MemoryStore::new();
        let (svc, _worker) = Notifications::open(&store, &Settings::default(), Arc::new(Nowhere)).await.expect("opens");
        let mut reads = Reads::default();
        let outcome = DeliveryOutcome { job: 1, notification_id: "n-1".into(), result: Ok(()) };
        svc.command_reads(&Command::DeliveryResult(outcome), &mut reads);
        assert_eq!(reads.len(), 1);
    }
}
