//! The service runtime: the loop every service runs, in every mode.
//!
//! Each turn takes a bounded batch of inputs (commands from the API, events
//! from the bus, due timers), lets the service decide and apply them against
//! its cached state, then commits state changes, emitted events (outbox) and
//! consumer cursors in ONE transaction, and answers callers and wakes
//! subscribers only once that transaction is on disk (a store that syncs
//! apart from its writes lets the loop decide the next batch meanwhile:
//! [`Completions`]). A failed commit rolls the caches back and answers
//! nobody, so nothing is acknowledged that is not durable.

use crate::bus::{EventSource, Publisher};
use crate::metrics::Metrics;
use crate::ports::{Batch, Clock, Durable, OutboxRecord, Rng, Row, Store, StoreError, uuid_v7};
use crate::prefetch::{Prefetched, Reads};
use crate::table::Staged;
use orderly_domain::Timestamp;
use orderly_domain::event::{Envelope, EventData, EventType};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{Notify, mpsc, oneshot, watch};

/// Most commands taken into one batch.
pub const COMMAND_BATCH_MAX: usize = 2048;
/// Most events taken from one producer into one batch.
pub const EVENT_BATCH_MAX: u32 = 2048;
/// Longest a service sleeps with nothing to do before checking its timers.
pub const IDLE_TICK_MS: u64 = 250;
/// Longest a consumer cursor may stay ahead of the store when only cursors
/// moved (see [`Deferred`]), in ms.
pub const CURSOR_DEFER_MAX_MS: i64 = 1_000;
/// Shortest pause after a commit conflict, in ms.
pub const CONFLICT_PAUSE_MIN_MS: u64 = 2;
/// Longest pause after a commit conflict, in ms.
pub const CONFLICT_PAUSE_MAX_MS: u64 = 21;
/// The dead-letter table every service has.
pub const DEAD_LETTERS: &str = "dead_letters";
/// Most committed batches whose sync a service may have pending while it
/// decides the next (see [`Completions`]).
pub const UNSYNCED_BATCHES_MAX: usize = 4;

/// What a service shares with its runtime.
pub struct Ctx {
    /// The service name (`orders`, `inventory`, …).
    pub service: &'static str,
    /// The CloudEvents `source` of its events (`/orderly/orders`).
    pub source: String,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Randomness (jitter, ids).
    pub rng: Arc<dyn Rng>,
    /// The service's own store.
    pub store: Arc<dyn Store>,
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// How many times an event is tried before it is dead-lettered.
    pub max_attempts: u32,
}

/// The work of one batch: what the service decided, to be committed at once.
pub struct Tx {
    /// The batch's time, the same for every input in it.
    pub now: Timestamp,
    ctx: Arc<Ctx>,
    batch: Batch,
    after_commit: Vec<Box<dyn FnOnce() + Send>>,
    head: u64,
    consumed: u64,
    /// What this batch read ahead (a store a round trip away), if anything.
    prefetched: Option<Arc<Prefetched>>,
    /// Whether the input being handled may have been handled before (see
    /// [`Tx::may_be_repeated`]).
    repeatable: bool,
}

impl Tx {
    fn new(ctx: Arc<Ctx>, head: u64, prefetched: Option<Arc<Prefetched>>) -> Tx {
        let batch = Batch { assumed_head: Some(head), ..Batch::default() };
        Tx {
            now: ctx.clock.now(),
            ctx,
            batch,
            after_commit: Vec::new(),
            head,
            consumed: 0,
            prefetched,
            repeatable: true,
        }
    }

    /// The service's own store (for cache misses and queries), answering
    /// from what the batch read ahead first.
    pub fn store(&self) -> &dyn Store {
        match &self.prefetched {
            Some(p) => p.as_ref(),
            None => self.ctx.store.as_ref(),
        }
    }

    /// Reads ahead what `reads` names (nothing to do on a store without
    /// [`Store::reads_many`]). A failure is only logged: each read is then
    /// made when needed, and fails there if the store is down.
    async fn read_ahead(&mut self, reads: Reads) {
        if let Some(p) = &self.prefetched
            && !reads.is_empty()
        {
            let n = reads.len() as u64;
            match p.fetch(reads).await {
                Ok(()) => self.ctx.metrics.inc("orderly_reads_ahead_total", &[("service", self.ctx.service)], n),
                Err(e) => tracing::warn!(service = self.ctx.service, error = %e, "read-ahead failed"),
            }
        }
    }

    /// Whether the event being handled may have been handled and committed
    /// before: true unless it comes from a source that delivers each event
    /// exactly once (the embedded outbox, whose cursor commits with the
    /// effects) to the only writer of this service's store. Guards that
    /// read the store to recognise a repeat may skip that read when false.
    pub fn may_be_repeated(&self) -> bool {
        self.repeatable
    }

    /// The runtime context.
    pub fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    /// A random u64 from the runtime's generator.
    pub fn random(&self) -> u64 {
        self.ctx.rng.next_u64()
    }

    /// A fresh UUIDv7.
    pub fn new_id(&self) -> String {
        uuid_v7(self.now, self.ctx.rng.as_ref())
    }

    /// Appends an event to the outbox of this batch with an explicit
    /// per-subject sequence (an aggregate's version).
    pub fn emit_seq(
        &mut self,
        event_type: EventType,
        subject: &str,
        sequence: u64,
        data: impl Into<EventData>,
    ) -> &mut Envelope {
        let id = self.new_id();
        let env = Envelope::new(id, &self.ctx.source, event_type, subject, self.now, sequence, data);
        self.batch.outbox.push(env);
        self.batch.outbox.last_mut().expect("an envelope was just pushed")
    }

    /// Appends an event whose sequence is its position in this service's
    /// outbox: strictly increasing for every subject, with no lookup.
    pub fn emit(&mut self, event_type: EventType, subject: &str, data: impl Into<EventData>) -> &mut Envelope {
        let sequence = self.head + self.batch.outbox.len() as u64 + 1;
        self.emit_seq(event_type, subject, sequence, data)
    }

    /// Like [`Tx::emit`], marking the event for the high-priority channel.
    pub fn emit_high(&mut self, event_type: EventType, subject: &str, data: impl Into<EventData>) {
        self.emit(event_type, subject, data).priority = Some("high".to_owned());
    }

    /// Puts a raw row into this batch (for tables not cached by a [`crate::table::Table`]).
    pub fn put_row(&mut self, row: Row) {
        self.batch.puts.push(row);
    }

    /// Deletes a raw row in this batch.
    pub fn delete_row(&mut self, table: &'static str, key: String) {
        self.batch.deletes.push((table, key));
    }

    /// Runs `f` once the batch is durable (answers callers, wakes timers).
    pub fn after_commit(&mut self, f: impl FnOnce() + Send + 'static) {
        self.after_commit.push(Box::new(f));
    }

    /// Answers a caller once the batch is durable. If the commit fails the
    /// caller sees its channel closed and must retry.
    pub fn reply<T: Send + 'static>(&mut self, to: oneshot::Sender<T>, value: T) {
        self.after_commit(move || {
            // The caller may have given up (timeout, disconnect); nothing to do then.
            let _ = to.send(value);
        });
    }
}

/// How an event failed.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// Worth retrying (store hiccup, a dependency not ready yet).
    #[error("transient: {0}")]
    Transient(String),
    /// Will never succeed as it is: dead-letter it at once.
    #[error("poison: {0}")]
    Poison(String),
    /// Came before an event it depends on, from another producer (a pick of
    /// an order this consumer has not heard of yet): retried with backoff
    /// until that event is consumed, and never dead-lettered.
    #[error("early: {0}")]
    Early(String),
}

impl From<StoreError> for EventError {
    fn from(e: StoreError) -> EventError {
        EventError::Transient(e.to_string())
    }
}

/// A service: handlers over its own cached state. Handlers must return an
/// error only BEFORE changing any state, so a failed input leaves the batch
/// as if it had never been tried.
pub trait Service: Send + 'static {
    /// What the API sends it; each command carries its own reply channel.
    type Command: Send + 'static;
    /// Handles one command.
    fn on_command(&mut self, tx: &mut Tx, cmd: Self::Command) -> impl Future<Output = ()> + Send;
    /// Handles one event from a producer it subscribes to.
    fn on_event(&mut self, tx: &mut Tx, event: &Envelope) -> impl Future<Output = Result<(), EventError>> + Send;
    /// Runs due timers (hold expiry, label batches, notification retries).
    fn on_tick(&mut self, tx: &mut Tx) -> impl Future<Output = ()> + Send;
    /// When the next timer is due, if any.
    fn next_deadline(&self) -> Option<Timestamp>;
    /// The service's cached tables, to stage, roll back or settle.
    fn tables(&mut self) -> Vec<&mut dyn Staged>;
    /// The documents handling `event` will read that are likely not cached
    /// (see [`crate::prefetch`]): on a store a round trip away they are read
    /// for a whole poll in one statement before the handlers run. A hint
    /// only; it never changes a result.
    fn event_reads(&self, event: &Envelope, reads: &mut Reads) {
        let _ = (event, reads);
    }
    /// Like [`Service::event_reads`], for a command.
    fn command_reads(&self, cmd: &Self::Command, reads: &mut Reads) {
        let _ = (cmd, reads);
    }
    /// Forgets every cached row (called between batches, about once a
    /// second while another replica is live, together with the versions
    /// remembered of them); rows are reloaded on next use. A stale copy could
    /// never be committed over a newer row (versions are checked), but it
    /// would cost a conflict and give stale answers.
    fn drop_shared(&mut self) {}
}

/// How often cached shared rows are dropped while another replica is live.
pub const DROP_SHARED_EVERY_MS: i64 = 1_000;

/// What a service whose work is shared with other replicas needs: who owns
/// which partitions (and whether others are live), and the store wrapper
/// that turns reads into commit preconditions.
#[derive(Clone)]
pub struct Sharing {
    /// The replica's partitions and the live member count.
    pub ownership: Arc<crate::partitions::Ownership>,
    /// The service's store, versioned.
    pub versioned: Arc<crate::versioned::VersionedStore>,
}

/// A dead-lettered event, as stored in the consumer's `dead_letters` table.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// The event id.
    pub id: String,
    /// The consuming service.
    pub consumer: String,
    /// The producing service.
    pub producer: String,
    /// Why it failed, last time.
    pub error: String,
    /// How many times it was tried.
    pub attempts: u32,
    /// When it was dead-lettered.
    pub failed_at: Timestamp,
    /// The event itself, replayable.
    pub envelope: Envelope,
}

/// Operations commands every service understands, whatever its own
/// commands are.
pub enum Control {
    /// Runs a dead-lettered event again; on success it leaves the dead-letter
    /// store in the same commit as its effect, so a second replay finds
    /// nothing and has no effect.
    Replay {
        /// The event id.
        id: String,
        /// Answer: the error if it failed again.
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    /// Drops a dead-lettered event for good.
    Discard {
        /// The event id.
        id: String,
        /// Answer.
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
}

/// Why a control command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No dead letter with that id in this service.
    #[error("no dead letter {0}")]
    NotFound(String),
    /// The event failed again.
    #[error("replay failed: {0}")]
    Failed(String),
    /// The store could not be read.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// Deliberate bugs the simulator switches on to prove that its invariants
/// catch them (`orderly-sim`'s bug-finding tests). Production code never sets
/// any: [`Mutations::default`] is all off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mutations {
    /// The consumer skips the inbox check, so a redelivered event is applied again.
    pub skip_inbox_check: bool,
}

/// A service with everything it needs to take steps: its context, its event
/// sources, retry bookkeeping and its outbox head. [`run`] steps it in a loop;
/// the simulator steps it one batch at a time.
pub struct Driver<S: Service> {
    service: S,
    ctx: Arc<Ctx>,
    sources: Vec<Arc<dyn EventSource>>,
    retry: RetryState,
    head: u64,
    publish: Arc<dyn Fn(u64) + Send + Sync>,
    retain: Option<Publisher>,
    completions: Completions,
    mutations: Mutations,
    sharing: Option<Sharing>,
    dropped_at: Timestamp,
    prefetched: Option<Arc<Prefetched>>,
    deferred: Deferred,
    linger: std::time::Duration,
}

impl<S: Service> Driver<S> {
    /// A driver over `service`; reads the outbox head from the store.
    pub async fn new(
        service: S,
        ctx: Arc<Ctx>,
        sources: Vec<Arc<dyn EventSource>>,
        publish: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<Driver<S>, StoreError> {
        let head = ctx.store.outbox_head().await?;
        let prefetched = ctx.store.reads_many().then(|| Arc::new(Prefetched::new(ctx.store.clone())));
        Ok(Driver {
            service,
            ctx,
            sources,
            retry: RetryState::default(),
            head,
            publish: Arc::new(publish),
            retain: None,
            completions: Completions::default(),
            mutations: Mutations::default(),
            sharing: None,
            dropped_at: Timestamp(0),
            prefetched,
            deferred: Deferred { allowed: true, ..Deferred::default() },
            linger: std::time::Duration::ZERO,
        })
    }

    /// Shares the service's work with other replicas (see [`Sharing`]).
    pub fn set_sharing(&mut self, sharing: Sharing) {
        self.sharing = Some(sharing);
        self.deferred.allowed = false;
    }

    /// Hands every committed event to `publisher`'s in-memory tail (the
    /// embedded bus), so in-process consumers need not read them back from
    /// the store. Only for a store this driver alone writes.
    pub fn retain_committed(&mut self, publisher: Publisher) {
        self.retain = Some(publisher);
    }

    /// Makes [`run`] wait `linger` after each batch that did work before it
    /// takes the next, unless half a full batch is already waiting (see
    /// [`Driver::lingers`]): a service off the intake path (`bus.linger`)
    /// then commits at most about once per `linger` under load, with
    /// everything that arrived meanwhile, instead of once per trickle of
    /// input. An idle service still takes its first input at once.
    pub fn set_linger(&mut self, linger: std::time::Duration) {
        self.linger = linger;
    }

    /// How long [`run`] waits before the next batch, after one that did work
    /// with `commands` commands already queued: [`Driver::set_linger`]'s
    /// time, or nothing when there is none or half a batch (of commands, or
    /// of one producer's events) is waiting.
    pub fn lingers(&self, commands: usize) -> Option<std::time::Duration> {
        let full = commands >= COMMAND_BATCH_MAX / 2
            || self.sources.iter().any(|s| s.backlog() >= u64::from(EVENT_BATCH_MAX / 2));
        (!self.linger.is_zero() && !full).then_some(self.linger)
    }

    /// Switches deliberate bugs on (the simulator's bug-finding tests only).
    pub fn set_mutations(&mut self, mutations: Mutations) {
        self.mutations = mutations;
    }

    /// The service.
    pub fn service(&self) -> &S {
        &self.service
    }

    /// The service, mutably (tests and the simulator).
    pub fn service_mut(&mut self) -> &mut S {
        &mut self.service
    }

    /// The runtime context.
    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    /// The event sources.
    pub fn sources(&self) -> &[Arc<dyn EventSource>] {
        &self.sources
    }

    /// One batch: the given commands and controls, pending events, due
    /// timers; one commit. Returns whether it did any work.
    pub async fn step(&mut self, commands: Vec<S::Command>, controls: Vec<Control>) -> bool {
        if let Some(sharing) = &self.sharing {
            let now = self.ctx.clock.now();
            let due = sharing.ownership.others_live() && now.since(self.dropped_at) >= DROP_SHARED_EVERY_MS;
            if sharing.versioned.take_overflow() || due {
                self.service.drop_shared();
                sharing.versioned.forget();
                self.dropped_at = now;
            }
        }
        let started = std::time::Instant::now();
        if let Some(p) = &self.prefetched {
            p.clear();
        }
        let mut tx = Tx::new(self.ctx.clone(), self.head, self.prefetched.clone());
        let mut worked = !commands.is_empty() || !controls.is_empty();
        if !commands.is_empty() {
            self.ctx.metrics.inc(
                "orderly_batch_commands_total",
                &[("service", self.ctx.service)],
                commands.len() as u64,
            );
            if self.prefetched.is_some() {
                let mut reads = Reads::default();
                commands.iter().for_each(|cmd| self.service.command_reads(cmd, &mut reads));
                tx.read_ahead(reads).await;
            }
        }
        for cmd in commands {
            self.service.on_command(&mut tx, cmd).await;
        }
        for control in controls {
            self.control(&mut tx, control).await;
        }
        let mut marks: Vec<(usize, u64)> = Vec::new();
        for (i, source) in self.sources.iter().enumerate() {
            if self.retry.blocked_until.get(source.producer()).is_some_and(|t| *t > tx.now) {
                continue;
            }
            self.retry.blocked_until.remove(source.producer());
            let dedupe = source.at_least_once() && !self.mutations.skip_inbox_check;
            tx.repeatable = source.at_least_once() || self.sharing.is_some();
            let consumed = consume(&mut self.service, &mut tx, source.as_ref(), &mut self.retry, dedupe).await;
            tx.repeatable = true;
            match consumed {
                Ok(Some(upto)) => {
                    source.mark(upto, &mut tx.batch);
                    marks.push((i, upto));
                    worked = true;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(service = self.ctx.service, producer = source.producer(), error = %e, "poll failed")
                }
            }
        }
        if self.service.next_deadline().is_some_and(|d| d <= tx.now) {
            self.service.on_tick(&mut tx).await;
            worked = true;
        }
        let publish = Publish { head: &self.publish, retain: self.retain.as_ref(), completions: &mut self.completions };
        if worked {
            let service = [("service", self.ctx.service)];
            self.ctx.metrics.observe("orderly_batch_build_seconds", &service, started.elapsed().as_secs_f64());
        }
        let commit = commit(&mut self.service, &self.ctx, tx, &self.sources, &marks, publish, &mut self.deferred);
        if let Some(h) = commit.await {
            self.head = h;
        }
        worked
    }

    /// Stores the cursors a batch left ahead of the store (see [`Deferred`]);
    /// [`run`] calls it before it returns. Nothing to do when none are.
    pub async fn flush_cursors(&mut self) -> Result<(), StoreError> {
        self.completions.drain().await;
        if self.deferred.cursors.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::default();
        self.deferred.add_to(&mut batch, &self.sources);
        self.ctx.store.commit(batch).await?;
        self.deferred.clear();
        Ok(())
    }

    async fn control(&mut self, tx: &mut Tx, control: Control) {
        let (id, reply, replay) = match control {
            Control::Replay { id, reply } => (id, reply, true),
            Control::Discard { id, reply } => (id, reply, false),
        };
        let letter = match self.ctx.store.get(DEAD_LETTERS, &id).await {
            Ok(Some(row)) => {
                serde_json::from_slice::<DeadLetter>(&row.doc).map_err(|e| ControlError::Failed(e.to_string()))
            }
            Ok(None) => Err(ControlError::NotFound(id.clone())),
            Err(e) => Err(ControlError::Unavailable(e.to_string())),
        };
        let letter = match letter {
            Ok(l) => l,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if replay {
            if let Err(e) = self.service.on_event(tx, &letter.envelope).await {
                let _ = reply.send(Err(ControlError::Failed(e.to_string())));
                return;
            }
            self.ctx.metrics.inc("orderly_dead_letters_replayed_total", &[("consumer", self.ctx.service)], 1);
        }
        tx.delete_row(DEAD_LETTERS, id);
        tx.reply(reply, Ok(()));
    }

    /// How long the loop may sleep before a timer or a retry is due.
    pub fn idle_ms(&self) -> u64 {
        let now = self.ctx.clock.now();
        let mut due = self.service.next_deadline().map_or(IDLE_TICK_MS as i64, |d| d.since(now));
        if let Some(r) = self.retry.earliest() {
            due = due.min(r.since(now));
        }
        if let Some(since) = self.deferred.since {
            due = due.min(since.plus_ms(CURSOR_DEFER_MAX_MS).since(now));
        }
        due.clamp(1, IDLE_TICK_MS as i64) as u64
    }
}

/// Runs a driver until `shutdown` turns true, then finishes the batch in
/// flight and returns.
pub async fn run<S: Service>(
    mut driver: Driver<S>,
    mut commands: mpsc::Receiver<S::Command>,
    mut controls: mpsc::Receiver<Control>,
    mut shutdown: watch::Receiver<bool>,
) {
    let wake = Arc::new(Notify::new());
    for source in driver.sources() {
        spawn_forwarder(source.changes(), wake.clone(), shutdown.clone());
    }
    let mut pending: Vec<S::Command> = Vec::new();
    let mut closed = false;
    loop {
        while !closed && pending.len() < COMMAND_BATCH_MAX {
            match commands.try_recv() {
                Ok(c) => pending.push(c),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
            }
        }
        let mut ctl = Vec::new();
        while let Ok(c) = controls.try_recv() {
            ctl.push(c);
        }
        let worked = driver.step(std::mem::take(&mut pending), ctl).await;
        if *shutdown.borrow() {
            if let Err(e) = driver.flush_cursors().await {
                // Harmless: the events after the stored cursor changed nothing
                // and are handled again, to the same effect, after a restart.
                tracing::warn!(service = driver.ctx.service, error = %e, "storing consumer cursors at shutdown failed");
            }
            return;
        }
        if worked {
            if let Some(linger) = driver.lingers(commands.len()) {
                tokio::select! {
                    _ = tokio::time::sleep(linger) => {},
                    _ = shutdown.changed() => {},
                }
            }
            continue;
        }
        let sleep_ms = driver.idle_ms();
        tokio::select! {
            c = commands.recv(), if !closed => match c {
                Some(c) => pending.push(c),
                None => closed = true,
            },
            _ = wake.notified() => {},
            _ = tokio::time::sleep(std::time::Duration::from_millis(sleep_ms)) => {},
            _ = shutdown.changed() => {},
        }
    }
}

fn spawn_forwarder(mut changes: watch::Receiver<u64>, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() { return; }
                    wake.notify_one();
                }
                _ = shutdown.changed() => return,
            }
        }
    });
}

/// Per-producer retry bookkeeping: attempts per event id, and when a blocked
/// producer may be polled again.
#[derive(Default)]
struct RetryState {
    attempts: HashMap<String, u32>,
    blocked_until: HashMap<&'static str, Timestamp>,
}

impl RetryState {
    fn earliest(&self) -> Option<Timestamp> {
        self.blocked_until.values().min().copied()
    }
}

/// Consumer cursors moved ahead of the store.
///
/// A batch whose only change is consumer cursors (every event it polled was
/// filtered out or changed nothing) need not cost a commit and an fsync: its
/// cursors wait for the service's next commit, or at most
/// [`CURSOR_DEFER_MAX_MS`], or shutdown. Only for sources that deliver
/// exactly once (the embedded outbox) and a store nobody else writes. If the
/// process stops before they are stored, the consumer reads those events
/// again after the restart; they meet the same stored state (a batch that
/// changed anything stored the cursors with it), so they change nothing
/// again: the same as a consumer that had not reached them yet.
#[derive(Default)]
struct Deferred {
    /// (source index, position) of the sources whose cursors wait.
    cursors: Vec<(usize, u64)>,
    /// When the oldest of them was deferred.
    since: Option<Timestamp>,
    /// Whether this driver may defer at all (no replicas share its store).
    allowed: bool,
}

impl Deferred {
    /// Whether a batch that only moves `marks` may skip its commit at `now`.
    fn may_take(&self, marks: &[(usize, u64)], sources: &[Arc<dyn EventSource>], now: Timestamp) -> bool {
        self.allowed
            && !marks.is_empty()
            && marks.iter().all(|(i, _)| !sources[*i].at_least_once())
            && self.since.is_none_or(|t| now.since(t) < CURSOR_DEFER_MAX_MS)
    }

    fn take(&mut self, marks: &[(usize, u64)], now: Timestamp) {
        for &(i, upto) in marks {
            match self.cursors.iter_mut().find(|(j, _)| *j == i) {
                Some(entry) => entry.1 = entry.1.max(upto),
                None => self.cursors.push((i, upto)),
            }
        }
        self.since.get_or_insert(now);
    }

    fn expired(&self, now: Timestamp) -> bool {
        self.since.is_some_and(|t| now.since(t) >= CURSOR_DEFER_MAX_MS)
    }

    /// Adds the waiting cursors to `batch`, except a producer's the batch
    /// already moves (further: a cursor only goes forward).
    fn add_to(&self, batch: &mut Batch, sources: &[Arc<dyn EventSource>]) {
        for &(i, upto) in &self.cursors {
            let producer = sources[i].producer();
            if !batch.cursors.iter().any(|(p, _)| p == producer) {
                batch.cursors.push((producer.to_owned(), upto));
            }
        }
    }

    fn clear(&mut self) {
        self.cursors.clear();
        self.since = None;
    }
}

/// Processes one producer's pending events; returns how far to advance its
/// cursor. `dedupe` checks the inbox (at-least-once sources).
async fn consume<S: Service>(
    service: &mut S,
    tx: &mut Tx,
    source: &dyn EventSource,
    retry: &mut RetryState,
    dedupe: bool,
) -> Result<Option<u64>, StoreError> {
    let polled = source.poll(EVENT_BATCH_MAX).await?;
    let record_inbox = source.at_least_once();
    // A source may deliver a batch in any order that keeps each subject's
    // order; on a failure the cursor only moves below the first event not
    // handled, so nothing is skipped (what was handled past it comes again
    // and is deduplicated or rejected as stale).
    let mut first_unhandled: Option<u64> = None;
    // Ids this batch has already handled (a redelivery can repeat an event
    // within a poll): a set, not a scan of the batch's inbox list per event,
    // which made a poll of n events cost O(n²) string comparisons.
    let mut handled: std::collections::HashSet<String> = match dedupe {
        true => tx.batch.inbox.iter().cloned().collect(),
        false => std::collections::HashSet::new(),
    };
    // One inbox read for the whole poll where the store offers it (a server
    // a round trip away), instead of one per event.
    let known = match dedupe && !polled.records.is_empty() {
        true => {
            let ids: Vec<&str> = polled.records.iter().map(|r| r.envelope.id.as_str()).collect();
            tx.store().inbox_contains_many(&ids).await?
        }
        false => None,
    };
    if tx.prefetched.is_some() {
        let mut reads = Reads::default();
        for record in &polled.records {
            let id = &record.envelope.id;
            if !(dedupe && known.as_ref().is_some_and(|k| k.contains(id))) {
                service.event_reads(&record.envelope, &mut reads);
            }
        }
        tx.read_ahead(reads).await;
    }
    for record in &polled.records {
        if first_unhandled.is_some() {
            first_unhandled = first_unhandled.min(Some(record.position));
            continue;
        }
        let id = &record.envelope.id;
        let duplicate = dedupe
            && (handled.contains(id)
                || match &known {
                    Some(known) => known.contains(id),
                    None => tx.store().inbox_contains(id).await?,
                });
        if duplicate {
            tx.ctx.metrics.inc("orderly_duplicate_events_total", &[("consumer", tx.ctx.service)], 1);
            continue;
        }
        match service.on_event(tx, &record.envelope).await {
            Ok(()) => {
                retry.attempts.remove(id);
                tx.consumed += 1;
                if record_inbox {
                    tx.batch.inbox.push(id.clone());
                    handled.insert(id.clone());
                }
            }
            Err(e) => {
                if handle_failure(tx, source.producer(), &record.envelope, e, retry) {
                    if record_inbox {
                        tx.batch.inbox.push(id.clone());
                        handled.insert(id.clone());
                    }
                    continue;
                }
                // Retried after a backoff.
                first_unhandled = Some(record.position);
            }
        }
    }
    let upto = first_unhandled.map_or(polled.upto, |p| p - 1);
    Ok((upto > polled.from).then_some(upto))
}

/// Decides between retry-later (false) and dead-letter-now (true).
fn handle_failure(
    tx: &mut Tx,
    producer: &'static str,
    env: &Envelope,
    error: EventError,
    retry: &mut RetryState,
) -> bool {
    let attempts = retry.attempts.entry(env.id.clone()).or_insert(0);
    *attempts += 1;
    let ctx = tx.ctx.clone();
    let poison = matches!(error, EventError::Poison(_));
    let early = matches!(error, EventError::Early(_));
    ctx.metrics.inc("orderly_events_failed_total", &[("consumer", ctx.service)], 1);
    if poison || (*attempts >= ctx.max_attempts && !early) {
        let letter = DeadLetter {
            id: env.id.clone(),
            consumer: ctx.service.to_owned(),
            producer: producer.to_owned(),
            error: error.to_string(),
            attempts: *attempts,
            failed_at: tx.now,
            envelope: env.clone(),
        };
        retry.attempts.remove(&env.id);
        tracing::warn!(service = ctx.service, event_id = %env.id, subject = %env.subject, error = %letter.error, "dead-lettered");
        let doc = serde_json::to_vec(&letter).expect("a dead letter always serializes");
        tx.put_row(Row { table: DEAD_LETTERS, key: env.id.clone(), idx: Some(producer.to_owned()), doc });
        ctx.metrics.inc("orderly_dead_letters_total", &[("consumer", ctx.service)], 1);
        return true;
    }
    ctx.metrics.inc("orderly_event_retries_total", &[("consumer", ctx.service)], 1);
    let delay = backoff_ms(*attempts, ctx.rng.next_u64());
    retry.blocked_until.insert(producer, tx.now.plus_ms(delay));
    tracing::info!(service = ctx.service, event_id = %env.id, attempt = *attempts, delay_ms = delay, error = %error, "retrying event");
    false
}

/// Exponential backoff with equal jitter: 50 ms doubling, capped at 5 s.
fn backoff_ms(attempt: u32, random: u64) -> i64 {
    let cap = (50i64 << attempt.min(7)).min(5_000);
    cap / 2 + (random % (cap as u64 / 2 + 1)) as i64
}

/// Where a commit's events are announced: the new head, and (embedded bus)
/// the committed events themselves.
struct Publish<'a> {
    head: &'a Arc<dyn Fn(u64) + Send + Sync>,
    retain: Option<&'a Publisher>,
    /// Where the announcements wait for the batch to be on disk.
    completions: &'a mut Completions,
}

/// What a committed batch does once it is on disk.
type Announce = Box<dyn FnOnce() + Send>;

/// What a service's committed batches still have to do once they are on
/// disk: answer their callers and announce their events. A store that syncs
/// apart from its writes ([`Store::commit_visible`]) lets the service decide
/// its next batch meanwhile; the announcements go out in commit order, each
/// once its batch's [`Durable`] resolves, from one task per service. When
/// nothing is pending and the batch is durable already (a store that syncs
/// in its commit), they run at once, in the service's loop.
#[derive(Default)]
pub struct Completions {
    /// Batches queued and not yet announced.
    pending: Arc<std::sync::atomic::AtomicUsize>,
    queue: Option<mpsc::Sender<(Durable, Announce)>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Completions {
    /// Runs `announce` once `durable` resolves and everything queued before
    /// it ran; waits while [`UNSYNCED_BATCHES_MAX`] batches are queued.
    async fn finish(&mut self, durable: Durable, announce: Announce) {
        use std::sync::atomic::Ordering;
        if self.pending.load(Ordering::Acquire) == 0 && durable.is_done() {
            announce();
            return;
        }
        let queue = self.queue.get_or_insert_with(|| {
            let (tx, mut rx) = mpsc::channel::<(Durable, Announce)>(UNSYNCED_BATCHES_MAX);
            let pending = self.pending.clone();
            self.task = Some(tokio::spawn(async move {
                while let Some((durable, announce)) = rx.recv().await {
                    // A store dropped before its sync: nothing is answered
                    // (the callers hear the engine is unavailable).
                    if durable.wait().await {
                        announce();
                    }
                    pending.fetch_sub(1, Ordering::AcqRel);
                }
            }));
            tx
        });
        self.pending.fetch_add(1, Ordering::AcqRel);
        if queue.send((durable, announce)).await.is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Waits until everything queued has been announced.
    pub async fn drain(&mut self) {
        self.queue = None;
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

async fn commit<S: Service>(
    service: &mut S,
    ctx: &Arc<Ctx>,
    mut tx: Tx,
    sources: &[Arc<dyn EventSource>],
    marks: &[(usize, u64)],
    publish: Publish<'_>,
    deferred: &mut Deferred,
) -> Option<u64> {
    let completions = publish.completions;
    let mut staged = Ok(());
    for table in service.tables() {
        if let Err(e) = table.stage(&mut tx.batch) {
            staged = Err(e);
            break;
        }
    }
    let now = tx.now;
    let cursors_only = {
        let b = &tx.batch;
        b.puts.is_empty() && b.deletes.is_empty() && b.outbox.is_empty() && b.inbox.is_empty() && b.expect.is_empty()
    };
    let defer =
        staged.is_ok() && cursors_only && !tx.batch.cursors.is_empty() && deferred.may_take(marks, sources, now);
    let flushing = !defer && !deferred.cursors.is_empty() && (!tx.batch.is_empty() || deferred.expired(now));
    if defer {
        // Only cursors moved: they wait for the next commit (see `Deferred`).
        deferred.take(marks, now);
        ctx.metrics.inc("orderly_cursor_commits_deferred_total", &[("service", ctx.service)], 1);
    } else if flushing {
        deferred.add_to(&mut tx.batch, sources);
    }
    if staged.is_ok() && (defer || tx.batch.is_empty()) {
        // Nothing to make durable now: the events polled were all filtered
        // out, duplicates, or changed nothing. A broker must still hear they
        // are done, or it redelivers them for ever. The tables settle too: a
        // table without rows (a due queue) changed, and a later failed batch
        // must not undo it.
        service.tables().into_iter().for_each(|t| t.committed());
        for (i, upto) in marks {
            sources[*i].committed(*upto);
        }
        if tx.consumed > 0 {
            ctx.metrics.inc("orderly_events_consumed_total", &[("consumer", ctx.service)], tx.consumed);
        }
        // After what earlier batches still have to announce.
        let after = std::mem::take(&mut tx.after_commit);
        completions.finish(Durable::Now, Box::new(move || after.into_iter().for_each(|f| f()))).await;
        return None;
    }
    let emitted = tx.batch.outbox.len() as u64;
    let consumed = tx.consumed;
    let rows = {
        let b = &tx.batch;
        (b.puts.len() + b.deletes.len() + b.outbox.len() + b.inbox.len() + b.cursors.len()) as u64
    };
    // The events as they will be stored, numbered from the head this batch
    // was built on (the store is this driver's alone, so a commit appends
    // right after it; checked against the head the commit reports).
    let assumed = tx.head;
    let retaining = publish.retain.is_some() && emitted > 0;
    let committing = std::time::Instant::now();
    let result = match staged {
        // The store hands the events back after writing them (SQLite
        // moves them, no copy), for the in-process consumers.
        Ok(()) if retaining => ctx.store.commit_visible_returning_events(tx.batch).await,
        Ok(()) => ctx.store.commit_visible(tx.batch).await.map(|(head, durable)| (head, durable, Vec::new())),
        Err(e) => Err(e),
    };
    ctx.metrics.observe("orderly_commit_seconds", &[("service", ctx.service)], committing.elapsed().as_secs_f64());
    match result {
        Ok((head, durable, events)) => {
            let retained: Vec<Arc<OutboxRecord>> = (events.into_iter().enumerate())
                .map(|(i, envelope)| Arc::new(OutboxRecord { position: assumed + i as u64 + 1, envelope }))
                .collect();
            if flushing {
                deferred.clear();
            }
            // The caches and cursors move on now: the next batch builds on
            // this one. If the process stops before the batch is synced,
            // both are lost together, and nobody heard of either.
            service.tables().into_iter().for_each(|t| t.committed());
            for (i, upto) in marks {
                sources[*i].committed(*upto);
            }
            ctx.metrics.inc("orderly_commit_rows_total", &[("service", ctx.service)], rows);
            if emitted > 0 {
                ctx.metrics.inc("orderly_events_emitted_total", &[("service", ctx.service)], emitted);
            }
            if consumed > 0 {
                ctx.metrics.inc("orderly_events_consumed_total", &[("consumer", ctx.service)], consumed);
            }
            // Consumers and callers hear of it only once it is on disk.
            let tail = publish.retain.filter(|_| emitted > 0 && head == assumed + emitted).cloned();
            let announce_head = (emitted > 0).then(|| publish.head.clone());
            let after = std::mem::take(&mut tx.after_commit);
            let (written_at, metrics, service_name) = (std::time::Instant::now(), ctx.metrics.clone(), ctx.service);
            let announce = move || {
                // From the write to the sync (and the batches before it).
                let waited = written_at.elapsed().as_secs_f64();
                metrics.observe("orderly_commit_sync_seconds", &[("service", service_name)], waited);
                if let Some(tail) = tail {
                    tail.retain(retained);
                }
                if let Some(publish) = announce_head {
                    publish(head);
                }
                after.into_iter().for_each(|f| f());
            };
            completions.finish(durable, Box::new(announce)).await;
            Some(head)
        }
        Err(StoreError::Conflict(e)) => {
            // Another replica changed a row this batch decided on: the caches
            // drop what changed and the inputs are tried again (events are
            // offered again; API callers retry), after a short random pause
            // so two replicas do not collide again in step.
            tracing::debug!(service = ctx.service, error = %e, "commit conflict; batch rolled back");
            ctx.metrics.inc("orderly_commit_conflicts_total", &[("service", ctx.service)], 1);
            service.tables().into_iter().for_each(|t| t.rollback());
            let pause =
                CONFLICT_PAUSE_MIN_MS + ctx.rng.next_u64() % (CONFLICT_PAUSE_MAX_MS - CONFLICT_PAUSE_MIN_MS + 1);
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            None
        }
        Err(e) => {
            tracing::error!(service = ctx.service, error = %e, "commit failed; batch rolled back");
            ctx.metrics.inc("orderly_commit_failures_total", &[("service", ctx.service)], 1);
            service.tables().into_iter().for_each(|t| t.rollback());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{OutboxSource, Publisher};
    use crate::memory_store::MemoryStore;
    use crate::ports::SeededRng;
    use std::sync::Mutex;

    /// A test context for `service` on `store`, with a manual `clock`.
    fn test_ctx(service: &'static str, store: Arc<MemoryStore>, clock: Arc<ManualClock>) -> Arc<Ctx> {
        Arc::new(Ctx {
            service,
            source: format!("/orderly/{service}"),
            clock,
            rng: Arc::new(SeededRng::new(7)),
            store,
            metrics: Arc::new(Metrics::default()),
            max_attempts: MAX_ATTEMPTS,
        })
    }

    /// Time that moves only when a test moves it.
    #[derive(Default)]
    struct ManualClock(Mutex<i64>);

    impl Clock for ManualClock {
        fn now(&self) -> Timestamp {
            Timestamp(*self.0.lock().unwrap_or_else(|p| p.into_inner()))
        }
    }

    impl ManualClock {
        fn advance(&self, ms: i64) {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) += ms;
        }
    }

    /// A table without rows that counts how often it was settled.
    #[derive(Default)]
    struct Settles {
        committed: u32,
        rolled_back: u32,
    }

    impl Staged for Settles {
        fn stage(&mut self, _batch: &mut Batch) -> Result<(), StoreError> {
            Ok(())
        }
        fn rollback(&mut self) {
            self.rolled_back += 1;
        }
        fn committed(&mut self) {
            self.committed += 1;
        }
    }

    /// A consumer that finds every event early until a command says its
    /// dependency arrived.
    #[derive(Default)]
    struct Waiting {
        ready: bool,
        applied: Vec<String>,
        settles: Settles,
    }

    impl Service for Waiting {
        type Command = bool;

        async fn on_command(&mut self, _tx: &mut Tx, ready: bool) {
            self.ready = ready;
        }

        async fn on_event(&mut self, _tx: &mut Tx, event: &Envelope) -> Result<(), EventError> {
            if !self.ready {
                return Err(EventError::Early(format!("{} before its order", event.id)));
            }
            self.applied.push(event.id.clone());
            Ok(())
        }

        async fn on_tick(&mut self, _tx: &mut Tx) {}

        fn next_deadline(&self) -> Option<Timestamp> {
            None
        }

        fn tables(&mut self) -> Vec<&mut dyn Staged> {
            vec![&mut self.settles]
        }
    }

    const MAX_ATTEMPTS: u32 = 3;

    /// A `Waiting` consumer of a producer whose outbox holds one pick event.
    async fn consumer() -> (Driver<Waiting>, Arc<ManualClock>, Arc<MemoryStore>) {
        let producer = Arc::new(MemoryStore::new());
        let pick = Envelope::new(
            "ev-1".to_owned(),
            "/orderly/picking",
            EventType::PickCompleted,
            "o-1",
            Timestamp(0),
            1,
            serde_json::json!({}),
        );
        let head = producer.commit(Batch { outbox: vec![pick], ..Batch::default() }).await.expect("commit");
        let source = OutboxSource::new("picking", producer, Publisher::new(head), 0, |_| true);
        let clock = Arc::new(ManualClock::default());
        let store = Arc::new(MemoryStore::new());
        let ctx = test_ctx("inventory", store.clone(), clock.clone());
        let driver = Driver::new(Waiting::default(), ctx, vec![Arc::new(source)], |_| {}).await.expect("driver");
        (driver, clock, store)
    }

    #[tokio::test]
    async fn an_early_event_is_retried_past_max_attempts_never_dead_lettered_and_applies_once_it_can() {
        let (mut driver, clock, store) = consumer().await;
        for _ in 0..4 * MAX_ATTEMPTS {
            clock.advance(5_000);
            driver.step(Vec::new(), Vec::new()).await;
        }
        let retries = driver.ctx().metrics.counter_total("orderly_event_retries_total");
        assert_eq!(retries, u64::from(4 * MAX_ATTEMPTS), "every step retried it");
        assert!(store.scan(DEAD_LETTERS, None, None, 10).await.expect("scan").is_empty(), "never dead-lettered");
        assert!(driver.service().applied.is_empty());
        clock.advance(5_000);
        driver.step(vec![true], Vec::new()).await;
        assert_eq!(driver.service().applied, vec!["ev-1".to_owned()]);
        clock.advance(5_000);
        driver.step(Vec::new(), Vec::new()).await;
        assert_eq!(driver.service().applied.len(), 1, "applied once; the cursor moved past it");
        assert!(store.scan(DEAD_LETTERS, None, None, 10).await.expect("scan").is_empty());
    }

    #[tokio::test]
    async fn an_early_event_is_held_off_but_never_longer_than_5_s() {
        let (mut driver, clock, _store) = consumer().await;
        let retries = |d: &Driver<Waiting>| d.ctx().metrics.counter_total("orderly_event_retries_total");
        driver.step(Vec::new(), Vec::new()).await;
        assert_eq!(retries(&driver), 1);
        // Right after a failure the producer is held off (at least 25 ms).
        clock.advance(1);
        driver.step(Vec::new(), Vec::new()).await;
        assert_eq!(retries(&driver), 1, "held off by its backoff");
        // However many tries it took, the next one is at most 5 s away.
        for attempt in 2..=20 {
            clock.advance(5_000);
            driver.step(Vec::new(), Vec::new()).await;
            assert_eq!(retries(&driver), attempt, "attempt {attempt} came within 5 s");
        }
    }

    #[tokio::test]
    async fn each_batch_records_its_build_and_commit_time_and_commands() {
        let (mut driver, _clock, _store) = consumer().await;
        driver.deferred.allowed = false; // its batch only moves a cursor: commit it anyway
        driver.step(vec![true, true], Vec::new()).await; // two commands and the event: one commit
        driver.step(Vec::new(), Vec::new()).await; // nothing to do: not a batch
        let m = driver.ctx().metrics.clone();
        let service = [("service", "inventory")];
        assert_eq!(m.counter("orderly_batch_commands_total", &service), 2);
        assert_eq!(m.histogram_count("orderly_batch_build_seconds", &service), 1);
        assert_eq!(m.histogram_count("orderly_commit_seconds", &service), 1);
        assert!(m.histogram_sum("orderly_commit_seconds", &service) > 0.0);
        assert!(m.render().contains("orderly_commit_seconds_count{service=\"inventory\"} 1"), "{}", m.render());
        assert_eq!(m.histogram_count("orderly_commit_sync_seconds", &service), 1, "a store that syncs in its commit");
    }

    /// Looks up one document per event (its subject) and per command (the
    /// key it names), and says so in its hints, except for keys starting
    /// with `unhinted`; a command `hint-only:<key>` is hinted but not read.
    struct Reader {
        docs: crate::table::Table<String>,
        seen: Vec<(String, bool)>,
    }

    impl Reader {
        async fn look(&mut self, tx: &mut Tx, key: &str) {
            let found = self.docs.load(tx.store(), key).await.expect("load");
            self.seen.push((key.to_owned(), found));
        }
    }

    impl Service for Reader {
        type Command = String;

        async fn on_command(&mut self, tx: &mut Tx, key: String) {
            if !key.starts_with("hint-only:") {
                self.look(tx, &key).await;
            }
        }

        async fn on_event(&mut self, tx: &mut Tx, event: &Envelope) -> Result<(), EventError> {
            self.look(tx, &event.subject).await;
            Ok(())
        }

        async fn on_tick(&mut self, _tx: &mut Tx) {}

        fn next_deadline(&self) -> Option<Timestamp> {
            None
        }

        fn tables(&mut self) -> Vec<&mut dyn Staged> {
            vec![&mut self.docs]
        }

        fn event_reads(&self, event: &Envelope, reads: &mut Reads) {
            self.docs.want(&event.subject, reads);
        }

        fn command_reads(&self, key: &String, reads: &mut Reads) {
            if !key.starts_with("unhinted") {
                self.docs.want(key.strip_prefix("hint-only:").unwrap_or(key), reads);
            }
        }
    }

    #[tokio::test]
    async fn a_store_that_reads_many_gets_each_polls_and_each_batchs_hinted_keys_in_one_read() {
        let doc = |key: &str| Row { table: "docs", key: key.into(), idx: None, doc: b"\"x\"".to_vec() };
        let producer = Arc::new(MemoryStore::new());
        let events = ["o-1", "o-2", "o-3"]
            .iter()
            .enumerate()
            .map(|(i, subject)| {
                let id = format!("ev-{i}");
                Envelope::new(
                    id,
                    "/orderly/orders",
                    EventType::OrderCreated,
                    subject,
                    Timestamp(0),
                    i as u64 + 1,
                    serde_json::json!({}),
                )
            })
            .collect();
        let head = producer.commit(Batch { outbox: events, ..Batch::default() }).await.expect("commit");
        let source = OutboxSource::new("orders", producer, Publisher::new(head), 0, |_| true);
        let store = Arc::new(MemoryStore::reading_many());
        store.commit(Batch { puts: vec![doc("o-1"), doc("c-1")], ..Batch::default() }).await.expect("commit");
        let ctx = test_ctx("packing", store.clone(), Arc::new(ManualClock::default()));
        let reader = Reader { docs: crate::table::Table::new("docs", 100, |_| None), seen: Vec::new() };
        let mut driver = Driver::new(reader, ctx, vec![Arc::new(source)], |_| {}).await.expect("driver");

        driver.step(vec!["c-1".into(), "c-2".into(), "hint-only:late".into()], Vec::new()).await;
        let seen: Vec<(&str, bool)> = driver.service().seen.iter().map(|(k, f)| (k.as_str(), *f)).collect();
        assert_eq!(seen, vec![("c-1", true), ("c-2", false), ("o-1", true), ("o-2", false), ("o-3", false)]);
        assert_eq!(store.reads(), (0, 2), "one read for the commands, one for the poll, no single reads");

        // `late` was read ahead as absent and never used; it exists now (as
        // if this service had committed it): the next batch must not answer
        // from the old read-ahead.
        store.commit(Batch { puts: vec![doc("late")], ..Batch::default() }).await.expect("commit");
        driver.step(vec!["unhinted-1".into(), "late".into(), "c-1".into()], Vec::new()).await;
        let seen: Vec<(&str, bool)> = driver.service().seen[5..].iter().map(|(k, f)| (k.as_str(), *f)).collect();
        assert_eq!(seen, vec![("unhinted-1", false), ("late", true), ("c-1", true)]);
        assert_eq!(
            store.reads(),
            (1, 3),
            "only the unhinted key was read on its own; c-1 is cached: only `late` was read ahead"
        );
        assert_eq!(driver.ctx().metrics.counter("orderly_reads_ahead_total", &[("service", "packing")]), 7);
    }

    /// An at-least-once source that delivers the same events twice in one
    /// poll (a redelivery arriving next to the first copy).
    struct Redelivering {
        records: Vec<Arc<OutboxRecord>>,
        wake: watch::Receiver<u64>,
    }

    #[async_trait::async_trait]
    impl EventSource for Redelivering {
        fn producer(&self) -> &'static str {
            "picking"
        }
        async fn poll(&self, _max: u32) -> Result<crate::bus::Polled, StoreError> {
            let upto = self.records.len() as u64;
            Ok(crate::bus::Polled { records: self.records.clone(), from: 0, upto })
        }
        fn mark(&self, _upto: u64, _batch: &mut Batch) {}
        fn committed(&self, _upto: u64) {}
        fn changes(&self) -> watch::Receiver<u64> {
            self.wake.clone()
        }
        fn backlog(&self) -> u64 {
            0
        }
        fn at_least_once(&self) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn an_event_delivered_twice_in_one_poll_is_handled_once() {
        let event = |id: &str| {
            Envelope::new(
                id.into(),
                "/orderly/picking",
                EventType::PickCompleted,
                "o-1",
                Timestamp(0),
                1,
                serde_json::json!({}),
            )
        };
        let records: Vec<Arc<OutboxRecord>> = ["ev-1", "ev-2", "ev-1", "ev-3", "ev-2"]
            .iter()
            .enumerate()
            .map(|(i, id)| Arc::new(OutboxRecord { position: i as u64 + 1, envelope: event(id) }))
            .collect();
        let source = Redelivering { records, wake: watch::channel(0).1 };
        let store = Arc::new(MemoryStore::new());
        let ctx = test_ctx("inventory", store.clone(), Arc::new(ManualClock::default()));
        let waiting = Waiting { ready: true, ..Waiting::default() };
        let mut driver = Driver::new(waiting, ctx, vec![Arc::new(source)], |_| {}).await.expect("driver");
        driver.step(Vec::new(), Vec::new()).await;
        assert_eq!(driver.service().applied, vec!["ev-1", "ev-2", "ev-3"], "each event applied once");
        for id in ["ev-1", "ev-2", "ev-3"] {
            assert!(store.inbox_contains(id).await.expect("inbox"), "{id} recorded in the inbox");
        }
        let duplicates = driver.ctx().metrics.counter("orderly_duplicate_events_total", &[("consumer", "inventory")]);
        assert_eq!(duplicates, 2);
    }

    #[tokio::test]
    async fn a_batch_with_nothing_to_commit_still_settles_the_tables() {
        let (mut driver, _clock, _store) = consumer().await;
        driver.step(vec![false], Vec::new()).await; // a command, an early event: nothing durable
        assert_eq!(driver.service().settles.committed, 1, "settled although nothing was committed");
        assert_eq!(driver.service().settles.rolled_back, 0);
    }
    #[tokio::test]
    async fn a_batch_that_only_moves_cursors_defers_them_to_the_next_commit_or_at_most_a_second() {
        let (mut driver, clock, store) = consumer().await;
        let deferrals = |d: &Driver<Waiting>| d.ctx().metrics.counter_total("orderly_cursor_commits_deferred_total");
        driver.step(vec![true], Vec::new()).await; // ev-1 applies, and changes nothing stored
        assert_eq!(driver.service().applied, ["ev-1"]);
        assert_eq!(deferrals(&driver), 1);
        assert_eq!(store.cursor("picking").await.expect("cursor"), 0, "no commit for a cursor alone");
        assert_eq!(driver.sources()[0].position(), Some(1), "the consumer itself moved on");
        assert_eq!(driver.sources()[0].backlog(), 0);
        driver.step(Vec::new(), Vec::new()).await;
        assert_eq!(driver.service().applied.len(), 1, "not handled again");
        assert!(driver.idle_ms() <= CURSOR_DEFER_MAX_MS as u64, "the loop wakes to store it in time");

        // A second later the cursor is stored, although nothing else happened.
        clock.advance(CURSOR_DEFER_MAX_MS);
        driver.step(Vec::new(), Vec::new()).await;
        assert_eq!(store.cursor("picking").await.expect("cursor"), 1);
        assert_eq!(driver.idle_ms(), IDLE_TICK_MS, "nothing left to store");

        // Deferred cursors go with the service's next commit of anything else…
        let (mut driver, _clock, store) = consumer().await;
        driver.step(vec![true], Vec::new()).await;
        assert_eq!(store.cursor("picking").await.expect("cursor"), 0);
        let mut tx = Tx::new(driver.ctx().clone(), 0, None);
        tx.put_row(Row { table: "things", key: "k".into(), idx: None, doc: b"{}".to_vec() });
        let head: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(|_| {});
        let mut completions = Completions::default();
        let publish = Publish { head: &head, retain: None, completions: &mut completions };
        commit(&mut driver.service, &driver.ctx, tx, &driver.sources, &[], publish, &mut driver.deferred).await;
        assert_eq!(store.cursor("picking").await.expect("cursor"), 1, "stored with the next commit");
        assert!(driver.deferred.cursors.is_empty());

        // …and at shutdown.
        let (mut driver, _clock, store) = consumer().await;
        driver.step(vec![true], Vec::new()).await;
        driver.flush_cursors().await.expect("flush");
        assert_eq!(store.cursor("picking").await.expect("cursor"), 1);

        // Never for a source that may deliver again (a broker: its inbox
        // deduplicates, in the same commit as the effect), nor with replicas.
        let broker: Vec<Arc<dyn EventSource>> =
            vec![Arc::new(Redelivering { records: Vec::new(), wake: watch::channel(0).1 })];
        let open = Deferred { allowed: true, ..Deferred::default() };
        assert!(!open.may_take(&[(0, 5)], &broker, Timestamp(0)));
        assert!(!Deferred::default().may_take(&[(0, 1)], driver.sources(), Timestamp(0)));
        assert!(open.may_take(&[(0, 1)], driver.sources(), Timestamp(0)));
    }

    /// A consumer that records how many events each of its batches handled.
    struct Counting {
        seen: usize,
        batches: Arc<Mutex<Vec<usize>>>,
    }

    impl Staged for Counting {
        fn stage(&mut self, _batch: &mut Batch) -> Result<(), StoreError> {
            Ok(())
        }
        fn rollback(&mut self) {}
        fn committed(&mut self) {
            if self.seen > 0 {
                self.batches.lock().unwrap_or_else(|p| p.into_inner()).push(std::mem::take(&mut self.seen));
            }
        }
    }

    impl Service for Counting {
        type Command = ();

        async fn on_command(&mut self, _tx: &mut Tx, _cmd: ()) {}

        async fn on_event(&mut self, _tx: &mut Tx, _event: &Envelope) -> Result<(), EventError> {
            self.seen += 1;
            Ok(())
        }

        async fn on_tick(&mut self, _tx: &mut Tx) {}

        fn next_deadline(&self) -> Option<Timestamp> {
            None
        }

        fn tables(&mut self) -> Vec<&mut dyn Staged> {
            vec![self]
        }
    }

    /// Runs a `Counting` consumer with `linger` in [`run`], publishes one
    /// event, and once it is handled three more 20 ms apart; returns the
    /// events per batch.
    async fn batches_with_linger(linger: std::time::Duration) -> Vec<usize> {
        let producer = Arc::new(MemoryStore::new());
        let publisher = Publisher::new(0);
        let source = OutboxSource::new("picking", producer.clone(), publisher.clone(), 0, |_| true);
        let batches = Arc::new(Mutex::new(Vec::new()));
        let service = Counting { seen: 0, batches: batches.clone() };
        let ctx = test_ctx("packing", Arc::new(MemoryStore::new()), Arc::new(ManualClock::default()));
        let mut driver = Driver::new(service, ctx, vec![Arc::new(source)], |_| {}).await.expect("driver");
        driver.set_linger(linger);
        let (_commands, commands_rx) = mpsc::channel(8);
        let (_controls, controls_rx) = mpsc::channel(8);
        let (stop, shutdown) = watch::channel(false);
        let running = tokio::spawn(run(driver, commands_rx, controls_rx, shutdown));
        let handled = |n: usize| {
            let batches = batches.clone();
            async move {
                for _ in 0..500 {
                    if batches.lock().unwrap_or_else(|p| p.into_inner()).iter().sum::<usize>() >= n {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
                panic!("{n} events not handled within a second");
            }
        };
        for i in 1..=4 {
            let event = Envelope::new(
                format!("ev-{i}"),
                "/orderly/picking",
                EventType::PickCompleted,
                "o-1",
                Timestamp(0),
                1,
                serde_json::json!({}),
            );
            let head = producer.commit(Batch { outbox: vec![event], ..Batch::default() }).await.expect("commit");
            publisher.publish(head);
            if i == 1 {
                handled(1).await;
            } else {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        handled(4).await;
        stop.send(true).expect("running");
        running.await.expect("run returns");
        batches.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    #[tokio::test]
    async fn a_lingering_service_takes_its_first_input_at_once_and_what_arrives_during_its_linger_in_one_batch() {
        let lingered = batches_with_linger(std::time::Duration::from_millis(300)).await;
        assert_eq!(lingered, vec![1, 3], "the first at once, the three that came during the linger together");
        let eager = batches_with_linger(std::time::Duration::ZERO).await;
        assert_eq!(eager, vec![1, 1, 1, 1], "without a linger, each as it comes");
    }

    #[tokio::test]
    async fn a_service_does_not_linger_when_half_a_batch_is_waiting() {
        let (mut driver, _clock, _store) = consumer().await;
        assert_eq!(driver.lingers(0), None, "no linger set");
        driver.set_linger(std::time::Duration::from_millis(10));
        assert_eq!(driver.lingers(COMMAND_BATCH_MAX / 2 - 1), Some(std::time::Duration::from_millis(10)));
        assert_eq!(driver.lingers(COMMAND_BATCH_MAX / 2), None, "half a batch of commands waits");
        let producer = Arc::new(MemoryStore::new());
        let publisher = Publisher::new(u64::from(EVENT_BATCH_MAX / 2));
        let behind = OutboxSource::new("orders", producer, publisher, 0, |_| true);
        driver.sources.push(Arc::new(behind));
        assert_eq!(driver.lingers(0), None, "half a batch of one producer's events waits");
    }

    /// Emits an event per command and answers it with the order it was taken in.
    #[derive(Default)]
    struct Emitter {
        taken: u64,
    }

    impl Service for Emitter {
        type Command = oneshot::Sender<u64>;

        async fn on_command(&mut self, tx: &mut Tx, reply: oneshot::Sender<u64>) {
            self.taken += 1;
            tx.emit(EventType::OrderCreated, &format!("o-{}", self.taken), serde_json::json!({}));
            tx.reply(reply, self.taken);
        }

        async fn on_event(&mut self, _tx: &mut Tx, _event: &Envelope) -> Result<(), EventError> {
            Ok(())
        }

        async fn on_tick(&mut self, _tx: &mut Tx) {}

        fn next_deadline(&self) -> Option<Timestamp> {
            None
        }

        fn tables(&mut self) -> Vec<&mut dyn Staged> {
            Vec::new()
        }
    }

    #[tokio::test]
    async fn a_batch_is_answered_and_announced_only_once_synced_while_the_next_is_decided() {
        let store = Arc::new(MemoryStore::syncing_on_demand());
        let ctx = Arc::new(Ctx {
            service: "orders",
            source: "/orderly/orders".into(),
            clock: Arc::new(ManualClock::default()),
            rng: Arc::new(SeededRng::new(7)),
            store: store.clone(),
            metrics: Arc::new(Metrics::default()),
            max_attempts: MAX_ATTEMPTS,
        });
        let publisher = Publisher::new(0);
        let announced = publisher.clone();
        let mut driver =
            Driver::new(Emitter::default(), ctx, Vec::new(), move |h| publisher.publish(h)).await.expect("driver");
        // A consumer of this service's events (no tail kept: it reads the store).
        let consumer = OutboxSource::new("orders", store.clone(), announced.clone(), 0, |_| true);

        let (first, mut first_answer) = oneshot::channel();
        driver.step(vec![first], Vec::new()).await;
        let (second, mut second_answer) = oneshot::channel();
        driver.step(vec![second], Vec::new()).await;
        assert_eq!(store.outbox_head().await.expect("head"), 2, "both batches written");
        assert!(first_answer.try_recv().is_err(), "not answered before its sync");
        assert_eq!(announced.head(), 0, "not announced before its sync");
        let sync_waits = |driver: &Driver<Emitter>| {
            let service = [("service", "orders")];
            let m = &driver.ctx().metrics;
            (
                m.histogram_count("orderly_commit_sync_seconds", &service),
                m.histogram_sum("orderly_commit_sync_seconds", &service),
            )
        };
        assert_eq!(sync_waits(&driver).0, 0, "the wait for a sync is recorded once it ends");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(consumer.poll(10).await.expect("poll").records.is_empty(), "no consumer reads an unsynced event");

        store.sync_upto(1);
        assert_eq!(first_answer.await.expect("answered once synced"), 1);
        let (count, waited) = sync_waits(&driver);
        assert_eq!(count, 1);
        assert!(waited >= 0.02, "from the write to the sync: {waited} s");
        assert!(second_answer.try_recv().is_err(), "the second batch is not synced yet");
        let polled = consumer.poll(10).await.expect("poll");
        assert_eq!((polled.records.len(), polled.upto), (1, 1), "the synced event only");

        store.sync_upto(2);
        assert_eq!(second_answer.await.expect("answered"), 2);
        driver.flush_cursors().await.expect("drains");
        assert_eq!(announced.head(), 2);
    }
}
