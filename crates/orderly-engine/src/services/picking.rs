//! The picking service: pick tasks per warehouse in two priority queues with
//! aging. Warehouse scanners pull the next task and confirm it with its
//! instruction key (order line id + sequence); a duplicate confirmation has
//! no second effect.

use super::common::{ApiError, Reply, derived_id};
use crate::events::{self, OrderAllocated, OrderCanceled, PickData};
use crate::ports::{Store, StoreError};
use crate::prefetch::Reads;
use crate::runtime::{EventError, Service, Tx};
use crate::table::{CACHE_ENTRIES_MAX, IndexGuard, Staged, Table};
use orderly_domain::event::{Envelope, EventType};
use orderly_domain::pick_queue::PickQueue;
use orderly_domain::{LineId, LocationId, OrderId, PickId, Priority, Qty, Sku, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// How long a picker may hold a task before it goes back to the queue.
pub const ASSIGNMENT_TIMEOUT_MS: i64 = 15 * 60_000;

/// Where a pick task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PickStatus {
    /// Waiting in its location's queue.
    Queued,
    /// Handed to a picker.
    Assigned,
    /// Picked in full.
    Completed,
    /// Picked short.
    Short,
    /// Its order was canceled.
    Canceled,
}

impl PickStatus {
    fn as_str(self) -> &'static str {
        match self {
            PickStatus::Queued => "queued",
            PickStatus::Assigned => "assigned",
            PickStatus::Completed => "completed",
            PickStatus::Short => "short",
            PickStatus::Canceled => "canceled",
        }
    }
}

/// A pick task, as stored and as shown to scanners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PickTask {
    /// Task id.
    pub id: PickId,
    /// Order id.
    pub order_id: OrderId,
    /// Line id.
    pub line_id: LineId,
    /// SKU.
    pub sku: Sku,
    /// Units to pick.
    pub qty: Qty,
    /// Where.
    pub location: LocationId,
    /// Queue.
    pub priority: Priority,
    /// What the scanner must send back: order line id + sequence.
    pub instruction_key: String,
    /// Status.
    pub status: PickStatus,
    /// When it was queued.
    pub enqueued_at: Timestamp,
    /// When a picker took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_at: Option<Timestamp>,
    /// Units picked (completed or short).
    #[serde(default)]
    pub qty_picked: Qty,
    /// Short-pick reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The answer to a confirmation or short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PickOutcome {
    /// The task after the command.
    pub task: PickTask,
    /// True when this was a repeat of an instruction already executed.
    pub duplicate: bool,
}

/// Commands from the API.
pub enum Command {
    /// The next task for a location (None when there is none).
    Next {
        /// Warehouse.
        location: LocationId,
        /// Answer.
        reply: Reply<Option<PickTask>>,
    },
    /// The picker picked everything.
    Confirm {
        /// Task.
        pick_id: PickId,
        /// Must match the task's.
        instruction_key: String,
        /// Must equal the task's quantity.
        qty: Qty,
        /// Answer.
        reply: Reply<PickOutcome>,
    },
    /// The picker found fewer units.
    Short {
        /// Task.
        pick_id: PickId,
        /// Must match the task's.
        instruction_key: String,
        /// Units found (less than requested).
        qty_found: Qty,
        /// Why.
        reason: String,
        /// Answer.
        reply: Reply<PickOutcome>,
    },
    /// Reconciliation.
    Reconcile(ReconcileCommand),
}

/// Reconciliation commands (see `services::reconcile`).
pub enum ReconcileCommand {
    /// Every pick task of these lines.
    View {
        /// Which lines.
        line_ids: Vec<LineId>,
        /// Answer.
        reply: Reply<Vec<PickTask>>,
    },
    /// Publishes `pick.completed` again for completed tasks whose event is
    /// not in this service's outbox (it was lost); answers how many.
    Republish {
        /// Which tasks.
        pick_ids: Vec<PickId>,
        /// Answer.
        reply: Reply<u64>,
    },
}

/// The picking service. Its queues, assignments and open tasks per order are
/// in-memory indexes over the task rows: a failed commit marks them stale and
/// they are rebuilt from the store before the next input, so a task popped
/// (or closed) in a batch that never committed is not lost.
pub struct Picking {
    tasks: Table<PickTask>,
    line_picks: Table<u64>,
    queues: BTreeMap<LocationId, PickQueue<PickId>>,
    assigned: BTreeMap<PickId, Timestamp>,
    open_by_order: HashMap<OrderId, Vec<PickId>>,
    indexes: IndexGuard,
    starvation_limit_ms: i64,
}

impl Picking {
    /// Opens the service over its store, rebuilding queues from open tasks.
    pub async fn open(
        store: &dyn crate::ports::Store,
        starvation_limit_ms: i64,
    ) -> Result<Picking, crate::ports::StoreError> {
        let mut svc = Picking {
            tasks: Table::new("picks", CACHE_ENTRIES_MAX, |t: &PickTask| Some(t.status.as_str().to_owned()))
                .settled_when(|t| matches!(t.status, PickStatus::Completed | PickStatus::Short | PickStatus::Canceled)),
            line_picks: Table::new("line_picks", CACHE_ENTRIES_MAX, |_| None),
            queues: BTreeMap::new(),
            assigned: BTreeMap::new(),
            open_by_order: HashMap::new(),
            indexes: IndexGuard::unbuilt(),
            starvation_limit_ms,
        };
        svc.refresh(store).await?;
        Ok(svc)
    }

    /// Rebuilds the queues, assignments and open tasks from the store's open
    /// task rows when they are stale (at startup, after a failed commit).
    async fn refresh(&mut self, store: &dyn Store) -> Result<(), StoreError> {
        if !self.indexes.is_stale() {
            return Ok(());
        }
        self.queues.clear();
        self.assigned.clear();
        self.open_by_order.clear();
        for status in [PickStatus::Queued, PickStatus::Assigned] {
            let mut after: Option<String> = None;
            loop {
                let rows = store.scan("picks", Some(status.as_str()), after.as_deref(), 1000).await?;
                let done = rows.len() < 1000;
                for row in rows {
                    after = Some(row.key.clone());
                    self.tasks.load(store, &row.key).await?;
                    if let Some(task) = self.tasks.get(&row.key).cloned() {
                        self.track_open(&task);
                    }
                }
                if done {
                    break;
                }
            }
        }
        self.indexes.rebuilt();
        Ok(())
    }

    /// Open tasks per location and priority (for metrics and the dashboard).
    pub fn queue_depths(&self) -> Vec<(LocationId, usize, usize)> {
        self.queues
            .iter()
            .map(|(l, q)| {
                let d = q.len_by_priority();
                (l.clone(), d.same_day, d.standard)
            })
            .collect()
    }

    fn track_open(&mut self, task: &PickTask) {
        self.open_by_order.entry(task.order_id.clone()).or_default().push(task.id.clone());
        match (task.status, task.assigned_at) {
            (PickStatus::Assigned, Some(at)) => {
                self.assigned.insert(task.id.clone(), at);
            }
            _ => self.queues.entry(task.location.clone()).or_default().push(
                task.id.clone(),
                task.priority,
                task.enqueued_at,
            ),
        }
    }

    fn close(&mut self, task: &PickTask) {
        self.assigned.remove(&task.id);
        if let Some(ids) = self.open_by_order.get_mut(&task.order_id) {
            ids.retain(|id| id != &task.id);
            if ids.is_empty() {
                self.open_by_order.remove(&task.order_id);
            }
        }
    }

    async fn on_allocated(&mut self, tx: &mut Tx, ev: OrderAllocated) -> Result<(), EventError> {
        self.refresh(tx.store()).await?;
        for a in &ev.allocations {
            self.line_picks.load(tx.store(), a.line_id.as_str()).await?;
        }
        let subject = ev.order_id.as_str();
        for a in ev.allocations {
            let n = self.line_picks.get(a.line_id.as_str()).copied().unwrap_or(0) + 1;
            self.line_picks.insert(a.line_id.as_str().to_owned(), n);
            let id = PickId::parse(derived_id(a.line_id.as_str(), &format!(".p{n}")))
                .map_err(|e| EventError::Poison(e.to_string()))?;
            let task = PickTask {
                id: id.clone(),
                order_id: ev.order_id.clone(),
                line_id: a.line_id.clone(),
                sku: a.sku,
                qty: a.qty,
                location: a.location,
                priority: ev.priority,
                instruction_key: format!("{}:{n}", a.line_id),
                status: PickStatus::Queued,
                enqueued_at: tx.now,
                assigned_at: None,
                qty_picked: 0,
                reason: None,
            };
            self.track_open(&task);
            let data = events::data(&pick_data(&task));
            if task.priority == Priority::SameDay {
                tx.emit_high(EventType::PickRequested, subject, data);
            } else {
                tx.emit(EventType::PickRequested, subject, data);
            }
            self.tasks.insert(id.as_str().to_owned(), task);
        }
        Ok(())
    }

    async fn reconcile(&mut self, tx: &mut Tx, cmd: ReconcileCommand) {
        match cmd {
            ReconcileCommand::View { line_ids, reply } => {
                let r = self.tasks_of(tx, &line_ids).await;
                tx.reply(reply, r);
            }
            ReconcileCommand::Republish { pick_ids, reply } => {
                let r = self.republish(tx, &pick_ids).await;
                tx.reply(reply, r);
            }
        }
    }

    async fn tasks_of(&mut self, tx: &mut Tx, line_ids: &[LineId]) -> Result<Vec<PickTask>, ApiError> {
        let mut out = Vec::new();
        for line in line_ids {
            self.line_picks.load(tx.store(), line.as_str()).await?;
            let n = self.line_picks.get(line.as_str()).copied().unwrap_or(0);
            for k in 1..=n {
                let id = derived_id(line.as_str(), &format!(".p{k}"));
                if self.tasks.load(tx.store(), &id).await?
                    && let Some(t) = self.tasks.get(&id)
                {
                    out.push(t.clone());
                }
            }
        }
        Ok(out)
    }

    async fn republish(&mut self, tx: &mut Tx, pick_ids: &[PickId]) -> Result<u64, ApiError> {
        let mut n = 0;
        for id in pick_ids {
            if !self.tasks.load(tx.store(), id.as_str()).await? {
                continue;
            }
            let Some(task) = self.tasks.get(id.as_str()).cloned() else { continue };
            if task.status != PickStatus::Completed {
                continue;
            }
            let published = tx.store().outbox_for_subject(task.order_id.as_str(), 10_000).await?.iter().any(|r| {
                r.envelope.event_type == EventType::PickCompleted
                    && r.envelope.data.str_field("pick_id").as_deref() == Some(id.as_str())
            });
            if !published {
                tracing::warn!(order_id = %task.order_id, pick_id = %task.id, "republishing a completed pick whose event is missing");
                tx.emit(EventType::PickCompleted, task.order_id.as_str(), events::data(&pick_data(&task)));
                n += 1;
            }
        }
        Ok(n)
    }

    /// Units the order no longer has at a location leave its open tasks
    /// there: a task for no more than what was taken back is canceled, a
    /// larger one picks fewer.
    async fn on_deallocated(&mut self, tx: &mut Tx, ev: events::Deallocated) -> Result<(), EventError> {
        let Some(ids) = self.open_by_order.get(&ev.order_id).cloned() else { return Ok(()) };
        for id in &ids {
            self.tasks.load(tx.store(), id.as_str()).await?;
        }
        for a in &ev.allocations {
            let mut left = a.qty;
            for id in &ids {
                if left == 0 {
                    break;
                }
                let Some(task) = self.tasks.get(id.as_str()) else { continue };
                let open = matches!(task.status, PickStatus::Queued | PickStatus::Assigned);
                if !open || task.line_id != a.line_id || task.location != a.location {
                    continue;
                }
                let task = self.tasks.get_mut(id.as_str()).expect("present above");
                if task.qty > left {
                    task.qty -= left;
                    left = 0;
                    continue;
                }
                left -= task.qty;
                task.status = PickStatus::Canceled;
                let task = task.clone();
                if let Some(q) = self.queues.get_mut(&task.location) {
                    q.remove_where(|t| t == &task.id);
                }
                self.close(&task);
                tracing::info!(order_id = %ev.order_id, pick_id = %task.id, "pick canceled: its units were taken back");
                tx.emit(EventType::PickCanceled, ev.order_id.as_str(), events::data(&pick_data(&task)));
            }
        }
        Ok(())
    }

    async fn on_canceled(&mut self, tx: &mut Tx, ev: OrderCanceled) -> Result<(), EventError> {
        self.refresh(tx.store()).await?;
        let Some(ids) = self.open_by_order.get(&ev.order_id).cloned() else { return Ok(()) };
        for id in &ids {
            self.tasks.load(tx.store(), id.as_str()).await?;
        }
        for id in ids {
            let Some(task) = self.tasks.get_mut(id.as_str()) else { continue };
            task.status = PickStatus::Canceled;
            let task = task.clone();
            if let Some(q) = self.queues.get_mut(&task.location) {
                q.remove_where(|t| t == &task.id);
            }
            self.close(&task);
            tx.emit(EventType::PickCanceled, ev.order_id.as_str(), events::data(&pick_data(&task)));
        }
        Ok(())
    }

    async fn next(&mut self, tx: &mut Tx, location: &LocationId) -> Result<Option<PickTask>, ApiError> {
        self.refresh(tx.store()).await?;
        loop {
            let Some(q) = self.queues.get_mut(location) else { return Ok(None) };
            let Some(item) = q.pop(tx.now, self.starvation_limit_ms) else { return Ok(None) };
            let key = item.task.as_str().to_owned();
            self.tasks.load(tx.store(), &key).await?;
            let Some(task) = self.tasks.get_mut(&key) else { continue };
            if task.status != PickStatus::Queued {
                continue;
            }
            task.status = PickStatus::Assigned;
            task.assigned_at = Some(tx.now);
            let task = task.clone();
            self.assigned.insert(task.id.clone(), tx.now);
            let wait_s = tx.now.since(task.enqueued_at) as f64 / 1000.0;
            let m = &tx.ctx().metrics;
            m.inc("orderly_picks_assigned_total", &[("priority", task.priority.as_str())], 1);
            m.set("orderly_pick_last_wait_seconds", &[("priority", task.priority.as_str())], wait_s);
            return Ok(Some(task));
        }
    }

    async fn finish(
        &mut self,
        tx: &mut Tx,
        pick_id: &PickId,
        instruction_key: &str,
        qty_picked: Qty,
        short_reason: Option<String>,
    ) -> Result<PickOutcome, ApiError> {
        self.refresh(tx.store()).await?;
        if !self.tasks.load(tx.store(), pick_id.as_str()).await? {
            return Err(ApiError::NotFound(format!("pick {pick_id}")));
        }
        let task =
            self.tasks.get(pick_id.as_str()).cloned().ok_or_else(|| ApiError::NotFound(format!("pick {pick_id}")))?;
        if task.instruction_key != instruction_key {
            return Err(ApiError::invalid("instruction-key-mismatch", "instruction_key does not match this pick task"));
        }
        match task.status {
            PickStatus::Completed | PickStatus::Short => return Ok(PickOutcome { task, duplicate: true }),
            PickStatus::Canceled => {
                return Err(ApiError::conflict("pick-canceled", "the order was canceled; return the items"));
            }
            PickStatus::Queued | PickStatus::Assigned => {}
        }
        match &short_reason {
            None if qty_picked != task.qty => {
                return Err(ApiError::invalid(
                    "quantity-mismatch",
                    format!("confirm picks all {} units; use /short for fewer", task.qty),
                ));
            }
            Some(_) if qty_picked >= task.qty => {
                return Err(ApiError::invalid("not-short", format!("qty_found must be less than {}", task.qty)));
            }
            _ => {}
        }
        let Some(t) = self.tasks.get_mut(pick_id.as_str()) else { return Err(ApiError::NotFound(pick_id.to_string())) };
        t.status = if short_reason.is_some() { PickStatus::Short } else { PickStatus::Completed };
        t.qty_picked = qty_picked;
        t.reason = short_reason;
        let task = t.clone();
        if let Some(q) = self.queues.get_mut(&task.location) {
            q.remove_where(|id| id == &task.id);
        }
        self.close(&task);
        let kind = if task.status == PickStatus::Short { EventType::PickShort } else { EventType::PickCompleted };
        tx.emit(kind, task.order_id.as_str(), events::data(&pick_data(&task)));
        tx.ctx().metrics.inc("orderly_picks_completed_total", &[("priority", task.priority.as_str())], 1);
        Ok(PickOutcome { task, duplicate: false })
    }
}

fn pick_data(t: &PickTask) -> PickData {
    PickData {
        pick_id: t.id.clone(),
        order_id: t.order_id.clone(),
        line_id: t.line_id.clone(),
        sku: t.sku.clone(),
        location: t.location.clone(),
        qty: t.qty,
        qty_picked: t.qty_picked,
        priority: t.priority,
        instruction_key: t.instruction_key.clone(),
        reason: t.reason.clone(),
    }
}

impl Service for Picking {
    type Command = Command;

    async fn on_command(&mut self, tx: &mut Tx, cmd: Command) {
        match cmd {
            Command::Reconcile(c) => self.reconcile(tx, c).await,
            Command::Next { location, reply } => {
                let r = self.next(tx, &location).await;
                tx.reply(reply, r);
            }
            Command::Confirm { pick_id, instruction_key, qty, reply } => {
                let r = self.finish(tx, &pick_id, &instruction_key, qty, None).await;
                tx.reply(reply, r);
            }
            Command::Short { pick_id, instruction_key, qty_found, reason, reply } => {
                let r = self.finish(tx, &pick_id, &instruction_key, qty_found, Some(reason)).await;
                tx.reply(reply, r);
            }
        }
    }

    async fn on_event(&mut self, tx: &mut Tx, event: &Envelope) -> Result<(), EventError> {
        use tracing::Instrument;
        let span = super::common::event_span(event);
        async move {
            match event.event_type {
                EventType::OrderAllocated => self.on_allocated(tx, events::parse(event)?).await,
                EventType::OrderCanceled => self.on_canceled(tx, events::parse(event)?).await,
                EventType::OrderDeallocated => self.on_deallocated(tx, events::parse(event)?).await,
                _ => Ok(()),
            }
        }
        .instrument(span)
        .await
    }

    async fn on_tick(&mut self, tx: &mut Tx) {
        if self.refresh(tx.store()).await.is_err() {
            return;
        }
        let expired: Vec<PickId> = self
            .assigned
            .iter()
            .filter(|(_, at)| tx.now.since(**at) >= ASSIGNMENT_TIMEOUT_MS)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.assigned.remove(&id);
            if self.tasks.load(tx.store(), id.as_str()).await.is_err() {
                continue;
            }
            if let Some(task) = self.tasks.get_mut(id.as_str())
                && task.status == PickStatus::Assigned
            {
                task.status = PickStatus::Queued;
                task.assigned_at = None;
                let (loc, prio, at) = (task.location.clone(), task.priority, task.enqueued_at);
                self.queues.entry(loc).or_default().push(id, prio, at);
            }
        }
        for (location, same_day, standard) in self.queue_depths() {
            let m = &tx.ctx().metrics;
            m.set(
                "orderly_pick_queue_depth",
                &[("location", location.as_str()), ("priority", "same_day")],
                same_day as f64,
            );
            m.set(
                "orderly_pick_queue_depth",
                &[("location", location.as_str()), ("priority", "standard")],
                standard as f64,
            );
        }
    }

    fn next_deadline(&self) -> Option<Timestamp> {
        if self.indexes.is_stale() {
            // Rebuild at the next turn: the assignments may be missing some.
            return Some(Timestamp(i64::MIN));
        }
        self.assigned.values().min().map(|at| at.plus_ms(ASSIGNMENT_TIMEOUT_MS))
    }

    fn tables(&mut self) -> Vec<&mut dyn Staged> {
        vec![&mut self.tasks, &mut self.line_picks, &mut self.indexes]
    }

    fn event_reads(&self, event: &Envelope, reads: &mut Reads) {
        /// The line an allocation is for, read without building the rest.
        #[derive(Deserialize)]
        struct LineRef<'a> {
            #[serde(borrow)]
            line_id: std::borrow::Cow<'a, str>,
        }
        // How many picks each allocated line has had.
        if event.event_type == EventType::OrderAllocated
            && let Some(allocations) = event.data.field("allocations")
            && let Ok(lines) = serde_json::from_str::<Vec<LineRef>>(allocations.get())
        {
            for line in &lines {
                self.line_picks.want(&line.line_id, reads);
            }
        }
    }

    /// Tasks are popped, confirmed and timed out through any replica; the
    /// queues are rebuilt from the store's open tasks.
    fn drop_shared(&mut self) {
        self.tasks.clear();
        self.line_picks.clear();
        self.indexes.mark_stale();
    }
}
