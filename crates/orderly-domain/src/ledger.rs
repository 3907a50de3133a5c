//! The inventory ledger of one SKU: stock per (location, partition), reservations
//! per order line, cart holds, the FIFO backorder queue and the audit trail of
//! adjustments, as a pure decide/apply aggregate (PRODUCT.md §3, §4 items 4–6, 13).
//!
//! `decide` holds every rule and returns events or a typed [`LedgerError`];
//! `apply` only moves numbers, cannot fail, and asserts after every change that
//! no partition has more reserved than on hand and that stock is conserved.
//! Events carry everything `apply` needs (the partitions chosen, the safety held
//! back), so replaying the log rebuilds the ledger without the config.

use crate::Qty;
use crate::ids::{HoldId, LineId, LocationId, OrderId, Sku, fnv1a};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

mod backorders;
mod sorted_map;
use backorders::BackorderQueue;
use sorted_map::SortedMap;

/// Most allocation partitions one location of a SKU may be split into.
pub const PARTITIONS_MAX: u32 = 256;
/// `inventory.safety_stock_pct` when the config says nothing.
pub const SAFETY_STOCK_PCT_DEFAULT: u8 = 5;
/// Longest cart hold accepted, in milliseconds (one week).
pub const HOLD_TTL_MS_MAX: i64 = 7 * 24 * 3_600_000;
/// Largest expiry jitter offset accepted, in milliseconds (one hour).
pub const HOLD_JITTER_MS_MAX: i64 = 3_600_000;
/// Most holds one `ExpireHolds` releases; the engine repeats while [`SkuLedger::next_expiry`] is due.
pub const HOLDS_EXPIRED_PER_BATCH_MAX: usize = 4096;
/// Longest adjustment reason or user name, in bytes.
pub const AUDIT_TEXT_LEN_MAX: usize = 200;
/// Longest warehouse instruction key, in bytes.
pub const INSTRUCTION_KEY_LEN_MAX: usize = 128;
/// How many instruction keys and hold consumptions of closed lines are remembered
/// to recognise late duplicates (open lines remember all of theirs).
pub const DONE_KEYS_MAX: usize = 4096;
/// Largest single adjustment or physical count, in units.
pub const COUNT_MAX: u64 = u32::MAX as u64;
/// The adjustment reason recorded when a pick comes up short.
pub const SHORT_PICK_REASON: &str = "short_pick";
/// The adjustment reason recorded by a cycle count.
pub const CYCLE_COUNT_REASON: &str = "cycle_count";
/// The schema version of [`LedgerEvent`]; bump it when a payload changes shape.
pub const LEDGER_EVENT_VERSION: u32 = 1;

/// The per-SKU knobs `decide` needs. Built by [`LedgerConfig::new`], so a held
/// value is always in range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerConfig {
    partitions: u32,
    safety_stock_pct: u8,
    /// A deliberate bug for the simulator's bug-finding test: reservations
    /// count the safety buffer as available. No configuration key sets it.
    reserve_ignores_safety: bool,
}

impl LedgerConfig {
    /// A config with `partitions` allocation partitions per location (1 for a
    /// normal SKU, e.g. 8 for a hot one) and `safety_stock_pct` percent of each
    /// receipt held back as safety buffer.
    pub fn new(partitions: u32, safety_stock_pct: u8) -> Result<LedgerConfig, LedgerError> {
        if partitions == 0 || partitions > PARTITIONS_MAX {
            return Err(LedgerError::InvalidConfig("partitions must be between 1 and 256"));
        }
        if safety_stock_pct > 100 {
            return Err(LedgerError::InvalidConfig("safety_stock_pct must be between 0 and 100"));
        }
        Ok(LedgerConfig { partitions, safety_stock_pct, reserve_ignores_safety: false })
    }

    /// The same config with a deliberate bug: reservations take the safety
    /// buffer as if it were available. Only `orderly-sim`'s bug-finding test
    /// calls this, to prove the simulator catches an oversell; no setting,
    /// flag or endpoint reaches it.
    #[doc(hidden)]
    pub fn with_reservations_ignoring_safety(mut self) -> LedgerConfig {
        self.reserve_ignores_safety = true;
        self
    }

    /// Allocation partitions per location.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Percent of each receipt held back as safety buffer.
    pub fn safety_stock_pct(&self) -> u8 {
        self.safety_stock_pct
    }

    /// The safety buffer held back from `qty` received units: the ceiling of the percentage.
    pub fn safety_for(&self, qty: u64) -> u64 {
        qty.saturating_mul(u64::from(self.safety_stock_pct)).div_ceil(100).min(qty)
    }
}

impl Default for LedgerConfig {
    fn default() -> LedgerConfig {
        LedgerConfig { partitions: 1, safety_stock_pct: SAFETY_STOCK_PCT_DEFAULT, reserve_ignores_safety: false }
    }
}

/// What the inventory service asks of one SKU's ledger.
///
/// Commands are additive (two `Reserve`s reserve twice): deduplicating
/// redelivered messages is the inbox's job. Warehouse instructions (`Commit`,
/// `Short`) and hold consumption are deduplicated here as well, because they
/// come from people and scanners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LedgerCommand {
    /// Stock arrived at a location; it is spread over the partitions, part of it
    /// is held back as safety buffer, and the backorder queue is served first.
    Receive {
        /// Where it arrived.
        location: LocationId,
        /// How many units.
        qty: Qty,
    },
    /// Reserve `qty` units for a line at one location, starting at the hinted
    /// partition and falling back to the location's other partitions.
    Reserve {
        /// The order the line belongs to.
        order: OrderId,
        /// The line.
        line: LineId,
        /// Units to reserve.
        qty: Qty,
        /// The location chosen by routing.
        location: LocationId,
        /// Which partition to try first, e.g. a hash of the order id.
        partition_hint: u32,
    },
    /// Cancel a line: release everything it holds and take it off the backorder queue.
    Release {
        /// The line.
        line: LineId,
    },
    /// A pick was confirmed: the units leave the ledger and the partition's
    /// safety buffer is released because its count is now certain.
    Commit {
        /// The line picked.
        line: LineId,
        /// Where it was picked.
        location: LocationId,
        /// Units picked.
        qty: Qty,
        /// `order line id + sequence`; a repeated key changes nothing.
        instruction_key: String,
    },
    /// A pick came up short: what was found is committed, the missing units are
    /// written off (safety buffer first) and the line's unfilled remainder is reported.
    Short {
        /// The line picked.
        line: LineId,
        /// Where it was picked.
        location: LocationId,
        /// Units the pick was for: the line may hold more at the location
        /// (another pick of it), which this short does not touch.
        qty: Qty,
        /// Units actually found, fewer than `qty`.
        qty_found: Qty,
        /// `order line id + sequence`; a repeated key changes nothing.
        instruction_key: String,
        /// When the short was reported (recorded on the write-off).
        at: Timestamp,
    },
    /// A manual or reconciliation adjustment. A loss larger than the free stock
    /// bumps the newest reservations at the location into the backorder queue.
    Adjust {
        /// The location adjusted.
        location: LocationId,
        /// Signed change of on-hand units.
        delta: i64,
        /// Why (recorded).
        reason: String,
        /// Who (recorded).
        user: String,
        /// When (recorded).
        at: Timestamp,
    },
    /// A physical count of the whole location: on hand becomes `counted` and the
    /// safety buffer is released. Never rejected for being low.
    CycleCount {
        /// The location counted.
        location: LocationId,
        /// Units found.
        counted: u64,
        /// Who counted (recorded).
        user: String,
        /// When (recorded).
        at: Timestamp,
    },
    /// Reserve stock for a cart until `now + ttl_ms + jitter_offset_ms`.
    CreateHold {
        /// The hold's id.
        hold_id: HoldId,
        /// Units to hold.
        qty: Qty,
        /// Where; `None` picks the location with the most available stock.
        location: Option<LocationId>,
        /// The caller's clock.
        now: Timestamp,
        /// `inventory.hold_ttl` in milliseconds.
        ttl_ms: i64,
        /// Drawn by the caller from `[0, inventory.hold_release_jitter]`.
        jitter_offset_ms: i64,
    },
    /// Reserve stock for an order being acknowledged (a synchronous
    /// reservation) with no lifetime of its own: the order consumes it, or
    /// its owner releases it once the order is known never to exist. Time
    /// cannot take it from an acknowledged order whose creation is still in
    /// flight to this ledger. Its `expires_at` is [`Timestamp::MAX`].
    CreateOrderHold {
        /// The hold's id.
        hold_id: HoldId,
        /// Units to hold.
        qty: Qty,
        /// Where.
        location: LocationId,
        /// The caller's clock.
        now: Timestamp,
    },
    /// Turn a live hold into a line's reservation (no second reservation).
    ConsumeHold {
        /// The hold.
        hold_id: HoldId,
        /// The order confirmed.
        order: OrderId,
        /// The line the held units now belong to.
        line: LineId,
    },
    /// Give a hold back before it expires (cart emptied).
    ReleaseHold {
        /// The hold.
        hold_id: HoldId,
    },
    /// Release every hold due at `now`.
    ExpireHolds {
        /// The caller's clock.
        now: Timestamp,
    },
    /// Reconciliation: where a location's on-hand units differ from what its
    /// recorded movements explain (`received + adjusted - committed`), record
    /// the unexplained difference as an adjustment (on hand stays as it is).
    /// Nothing to record is no event, so repeating it changes nothing.
    Restate {
        /// The location.
        location: LocationId,
        /// Why (recorded), e.g. `reconciliation`.
        reason: String,
        /// Who (recorded).
        user: String,
        /// When (recorded).
        at: Timestamp,
    },
    /// Put a line (or the rest of it) at the back of the SKU's backorder queue.
    Backorder {
        /// The order.
        order: OrderId,
        /// The line.
        line: LineId,
        /// Units still wanted.
        qty: Qty,
        /// When the line started waiting.
        since: Timestamp,
    },
}

/// Units at one partition of a location.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartQty {
    /// The partition index, `0..partitions`.
    pub partition: u32,
    /// Units.
    pub qty: u64,
}

/// Units received into one partition and how many of them are held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartReceipt {
    /// The partition index.
    pub partition: u32,
    /// Units received.
    pub qty: u64,
    /// Units of those held back as safety buffer.
    pub safety: u64,
}

/// A signed change of on-hand units at one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartDelta {
    /// The partition index.
    pub partition: u32,
    /// The change.
    pub delta: i64,
}

/// Why a line's reservation was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// The line or order was canceled.
    Canceled,
    /// The picker did not find the units.
    ShortPick,
    /// A negative adjustment or count left too little stock; the line was backordered.
    StockLoss,
}

/// Why safety buffer left a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SafetyCause {
    /// A confirmed pick made the partition's count certain.
    PickConfirmed,
    /// A cycle count made the location's count certain.
    CycleCount,
    /// A short pick's missing units were charged to the buffer.
    ShortPick,
    /// A negative adjustment used the buffer after the free stock.
    StockLoss,
}

/// Why a hold was released before it expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldReleaseReason {
    /// The cart gave it back.
    Canceled,
    /// A negative adjustment or count left too little stock.
    StockLoss,
}

/// Why a line joined the backorder queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackorderCause {
    /// The engine could not allocate it.
    Requested,
    /// Its reservation was bumped by a stock loss.
    StockLoss,
}

/// What happened to one SKU's stock. Self-sufficient for replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LedgerEvent {
    /// Stock arrived and was spread over partitions.
    Received {
        /// Where.
        location: LocationId,
        /// Total units.
        qty: u64,
        /// Per partition, with the safety buffer held back.
        parts: Vec<PartReceipt>,
    },
    /// Units were reserved for a line.
    Reserved {
        /// The order.
        order: OrderId,
        /// The line.
        line: LineId,
        /// Where.
        location: LocationId,
        /// Total units.
        qty: u64,
        /// Per partition.
        parts: Vec<PartQty>,
        /// Whether this fills the line's backorder (and shortens the queue).
        from_backorder: bool,
    },
    /// A line's reserved units went back to stock.
    Released {
        /// The order.
        order: OrderId,
        /// The line.
        line: LineId,
        /// Where.
        location: LocationId,
        /// Total units.
        qty: u64,
        /// Per partition.
        parts: Vec<PartQty>,
        /// Why.
        reason: ReleaseReason,
    },
    /// Picked units left the ledger.
    Committed {
        /// The order.
        order: OrderId,
        /// The line.
        line: LineId,
        /// Where.
        location: LocationId,
        /// Total units.
        qty: u64,
        /// Per partition.
        parts: Vec<PartQty>,
        /// The warehouse instruction confirmed.
        instruction_key: String,
    },
    /// A pick came up short; `qty_missing` units of the line need re-routing or a backorder.
    Shorted {
        /// The order.
        order: OrderId,
        /// The line.
        line: LineId,
        /// Where.
        location: LocationId,
        /// Units found (and committed).
        qty_found: u64,
        /// The line's unfilled remainder from this pick.
        qty_missing: u64,
        /// The warehouse instruction reported.
        instruction_key: String,
    },
    /// On-hand stock changed for a recorded reason.
    Adjusted {
        /// Where.
        location: LocationId,
        /// Total signed change (zero for a count that matched).
        delta: i64,
        /// Per partition.
        parts: Vec<PartDelta>,
        /// Why.
        reason: String,
        /// Who.
        user: String,
        /// When.
        at: Timestamp,
    },
    /// Safety buffer left some partitions.
    SafetyReleased {
        /// Where.
        location: LocationId,
        /// Total units.
        qty: u64,
        /// Per partition.
        parts: Vec<PartQty>,
        /// Why.
        cause: SafetyCause,
    },
    /// A cart hold reserved stock.
    HoldCreated {
        /// The hold.
        hold_id: HoldId,
        /// Where.
        location: LocationId,
        /// Total units.
        qty: u64,
        /// Per partition.
        parts: Vec<PartQty>,
        /// When it was created.
        created_at: Timestamp,
        /// When it expires (ttl plus jitter).
        expires_at: Timestamp,
    },
    /// A hold became a line's reservation.
    HoldConsumed {
        /// The hold.
        hold_id: HoldId,
        /// The order.
        order: OrderId,
        /// The line.
        line: LineId,
        /// Where.
        location: LocationId,
        /// Total units.
        qty: u64,
        /// Per partition.
        parts: Vec<PartQty>,
    },
    /// A hold (or part of it) was given back before expiry.
    HoldReleased {
        /// The hold.
        hold_id: HoldId,
        /// Where.
        location: LocationId,
        /// Total units.
        qty: u64,
        /// Per partition.
        parts: Vec<PartQty>,
        /// Why.
        reason: HoldReleaseReason,
    },
    /// A hold expired and its units went back to stock.
    HoldExpired {
        /// The hold.
        hold_id: HoldId,
        /// Where.
        location: LocationId,
        /// Total units.
        qty: u64,
        /// Per partition.
        parts: Vec<PartQty>,
        /// When it was due.
        expires_at: Timestamp,
    },
    /// A line joined (or grew in) the backorder queue.
    Backordered {
        /// The order.
        order: OrderId,
        /// The line.
        line: LineId,
        /// Units wanted.
        qty: u64,
        /// When it started waiting.
        since: Timestamp,
        /// Why.
        cause: BackorderCause,
    },
    /// On-hand units no recorded movement explained were recorded as an
    /// adjustment (the `adjusted` books change, on hand does not).
    Restated {
        /// Where.
        location: LocationId,
        /// Total units recorded (on hand minus what the books explained).
        delta: i64,
        /// Per partition.
        parts: Vec<PartDelta>,
        /// Why.
        reason: String,
        /// Who.
        user: String,
        /// When.
        at: Timestamp,
    },
    /// A canceled line left the backorder queue.
    BackorderCanceled {
        /// The order.
        order: OrderId,
        /// The line.
        line: LineId,
        /// Units it was still waiting for.
        qty: u64,
    },
}

/// Why the ledger refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// Rejected: a quantity was zero.
    #[error("quantity must be positive")]
    ZeroQuantity,
    /// Rejected: a quantity or count is beyond [`COUNT_MAX`].
    #[error("quantity is larger than {max}")]
    QuantityTooLarge {
        /// The limit.
        max: u64,
    },
    /// Rejected: not enough available stock (on hand − reserved − safety).
    #[error("only {available} units available")]
    Insufficient {
        /// Units available where the request looked.
        available: u64,
    },
    /// Rejected: the line does not hold that many units there.
    #[error("line {line} holds {reserved} units at {location}")]
    NotReserved {
        /// The line.
        line: LineId,
        /// The location.
        location: LocationId,
        /// What it does hold there.
        reserved: u64,
    },
    /// Rejected: a short pick found more than the line holds.
    #[error("found {found} units but the line holds {reserved}")]
    FoundMoreThanReserved {
        /// What the line holds at the location.
        reserved: u64,
        /// What the picker reported.
        found: u64,
    },
    /// Rejected: the line is known under another order.
    #[error("line {line} belongs to order {order}")]
    LineOfOtherOrder {
        /// The line.
        line: LineId,
        /// The order it belongs to.
        order: OrderId,
    },
    /// Rejected: no live hold has this id.
    #[error("no live hold {0}")]
    UnknownHold(HoldId),
    /// Rejected: a live hold already has this id.
    #[error("hold {0} already exists")]
    HoldExists(HoldId),
    /// Rejected: ttl or jitter offset out of range.
    #[error("hold ttl must be 1..={HOLD_TTL_MS_MAX} ms and jitter offset 0..={HOLD_JITTER_MS_MAX} ms")]
    InvalidHoldTiming,
    /// Rejected: a manual adjustment would take on hand below zero (a count never does).
    #[error("adjustment of {delta} would take on-hand stock of {on_hand} below zero")]
    AdjustBelowZero {
        /// On hand at the location.
        on_hand: u64,
        /// The requested change.
        delta: i64,
    },
    /// Rejected: reason or user missing or too long.
    #[error("{field} must be 1..={AUDIT_TEXT_LEN_MAX} bytes")]
    InvalidAuditField {
        /// `reason` or `user`.
        field: &'static str,
    },
    /// Rejected: instruction key missing or too long.
    #[error("instruction key must be 1..={INSTRUCTION_KEY_LEN_MAX} bytes")]
    InvalidInstructionKey,
    /// Rejected: a config value out of range.
    #[error("invalid ledger config: {0}")]
    InvalidConfig(&'static str),
    /// Impossible: the ledger's own state is inconsistent (a bug or a corrupt snapshot).
    #[error("ledger state is inconsistent: {0}")]
    Impossible(String),
}

impl LedgerError {
    /// True when the caller's request was at fault (map to 4xx); false for [`LedgerError::Impossible`].
    pub fn is_rejected(&self) -> bool {
        !matches!(self, LedgerError::Impossible(_))
    }
}

/// One SKU's inventory ledger: the aggregate `decide` reads and `apply` changes.
///
/// Besides the whole-document serde form, a ledger can be stored in pieces:
/// a small [`LedgerCore`] (stock numbers and counters) plus one
/// [`LedgerPiece`] per open line, cart hold, waiting backorder and
/// remembered done key. `apply` records which pieces it touched
/// ([`SkuLedger::take_changes`]), so a store writes O(changes) per batch
/// however long the backorder queue is; [`SkuLedger::assemble`] rebuilds the
/// ledger from its pieces.
///
/// The whole-document serde form is the one older versions wrote (a FIFO of
/// tickets and a map of entries by line, see `LedgerDoc`); in memory the
/// waiting lines are one compact ticket-ordered queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "LedgerDoc")]
pub struct SkuLedger {
    sku: Sku,
    stock: Stock,
    lines: BTreeMap<LineId, LineClaim>,
    holds: BTreeMap<HoldId, HoldClaim>,
    hold_expiries: BTreeSet<(Timestamp, HoldId)>,
    /// The waiting lines, oldest ticket first, with an index by line.
    backorders: BackorderQueue,
    next_ticket: u64,
    done: VecDeque<DoneKey>,
    done_index: BTreeSet<DoneKey>,
    /// How many done keys have left the window: `done[i]` is done key number
    /// `done_base + i` (its piece's sequence).
    done_base: u64,
    next_claim_seq: u64,
    version: u64,
    /// Pieces touched since [`SkuLedger::take_changes`] last ran.
    changes: BTreeSet<PieceKey>,
}

/// [`SkuLedger`]'s whole-document form, as every version wrote it: the FIFO
/// of tickets (which may hold stale ones: a ticket whose line left the queue
/// or re-entered it with a newer ticket) and the waiting lines by id with
/// their current ticket.
#[derive(Deserialize)]
struct LedgerDoc {
    sku: Sku,
    stock: Stock,
    lines: BTreeMap<LineId, LineClaim>,
    holds: BTreeMap<HoldId, HoldClaim>,
    hold_expiries: BTreeSet<(Timestamp, HoldId)>,
    backorders: VecDeque<(u64, LineId)>,
    backorder_entries: BTreeMap<LineId, (u64, BackorderEntry)>,
    next_ticket: u64,
    done: VecDeque<DoneKey>,
    done_index: BTreeSet<DoneKey>,
    #[serde(default)]
    done_base: u64,
    next_claim_seq: u64,
    version: u64,
}

/// [`LedgerDoc`] borrowed from a ledger, to serialize it.
#[derive(Serialize)]
struct LedgerDocRef<'a> {
    sku: &'a Sku,
    stock: &'a Stock,
    lines: &'a BTreeMap<LineId, LineClaim>,
    holds: &'a BTreeMap<HoldId, HoldClaim>,
    hold_expiries: &'a BTreeSet<(Timestamp, HoldId)>,
    backorders: Vec<(u64, LineId)>,
    backorder_entries: BTreeMap<LineId, (u64, BackorderEntry)>,
    next_ticket: u64,
    done: &'a VecDeque<DoneKey>,
    done_index: &'a BTreeSet<DoneKey>,
    done_base: u64,
    next_claim_seq: u64,
    version: u64,
}

impl Serialize for SkuLedger {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        LedgerDocRef {
            sku: &self.sku,
            stock: &self.stock,
            lines: &self.lines,
            holds: &self.holds,
            hold_expiries: &self.hold_expiries,
            backorders: self.backorders.tickets().collect(),
            backorder_entries: self
                .backorders
                .iter()
                .map(|(ticket, entry)| (entry.line.clone(), (ticket, entry)))
                .collect(),
            next_ticket: self.next_ticket,
            done: &self.done,
            done_index: &self.done_index,
            done_base: self.done_base,
            next_claim_seq: self.next_claim_seq,
            version: self.version,
        }
        .serialize(serializer)
    }
}

impl TryFrom<LedgerDoc> for SkuLedger {
    type Error = String;

    /// Every waiting line must still hold its ticket in the document's FIFO
    /// (what `check_invariants` verified of a ledger kept in this form).
    fn try_from(doc: LedgerDoc) -> Result<SkuLedger, String> {
        let fifo: BTreeSet<(u64, &LineId)> = doc.backorders.iter().map(|(t, l)| (*t, l)).collect();
        if doc.backorder_entries.iter().any(|(line, (ticket, _))| !fifo.contains(&(*ticket, line))) {
            return Err("the backorder queue and its index disagree".to_owned());
        }
        if doc.backorder_entries.iter().any(|(line, (_, entry))| *line != entry.line) {
            return Err("a backorder entry is filed under another line".to_owned());
        }
        drop(fifo);
        let backorders = BackorderQueue::from_unordered(doc.backorder_entries.into_values())?;
        Ok(SkuLedger {
            sku: doc.sku,
            stock: doc.stock,
            lines: doc.lines,
            holds: doc.holds,
            hold_expiries: doc.hold_expiries,
            backorders,
            next_ticket: doc.next_ticket,
            done: doc.done,
            done_index: doc.done_index,
            done_base: doc.done_base,
            next_claim_seq: doc.next_claim_seq,
            version: doc.version,
            changes: BTreeSet::new(),
        })
    }
}

impl PartialEq for SkuLedger {
    /// Equal state: the backorder queue's empty slots (lines that left it,
    /// not yet dropped) and the pending change set are not part of it.
    fn eq(&self, other: &SkuLedger) -> bool {
        self.sku == other.sku
            && self.stock == other.stock
            && self.lines == other.lines
            && self.holds == other.holds
            && self.hold_expiries == other.hold_expiries
            && self.backorders == other.backorders
            && self.next_ticket == other.next_ticket
            && self.done == other.done
            && self.done_index == other.done_index
            && self.done_base == other.done_base
            && self.next_claim_seq == other.next_claim_seq
            && self.version == other.version
    }
}

impl Eq for SkuLedger {}

/// Which piece of a stored ledger something is (see [`SkuLedger`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PieceKey {
    /// An open order line's claim.
    Line(LineId),
    /// A live cart hold.
    Hold(HoldId),
    /// A line waiting in the backorder queue.
    Backorder(LineId),
    /// A remembered done key, by its sequence number.
    Done(u64),
}

impl PieceKey {
    /// The piece's key within its ledger: `l/<line>`, `h/<hold>`, `b/<line>`
    /// or `d/<seq, 20 digits>` (ids never contain `/`, and done keys sort by
    /// sequence).
    pub fn encode(&self) -> String {
        match self {
            PieceKey::Line(line) => format!("l/{line}"),
            PieceKey::Hold(hold) => format!("h/{hold}"),
            PieceKey::Backorder(line) => format!("b/{line}"),
            PieceKey::Done(seq) => format!("d/{seq:020}"),
        }
    }
}

/// One independently stored piece of a ledger. Opaque: only the ledger
/// makes and reads them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LedgerPiece(Piece);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Piece {
    Line(LineId, LineClaim),
    Hold(HoldId, HoldClaim),
    Backorder(u64, BackorderEntry),
    Done(u64, DoneKey),
}

impl LedgerPiece {
    /// Which piece this is.
    pub fn key(&self) -> PieceKey {
        match &self.0 {
            Piece::Line(line, _) => PieceKey::Line(line.clone()),
            Piece::Hold(hold, _) => PieceKey::Hold(hold.clone()),
            Piece::Backorder(_, entry) => PieceKey::Backorder(entry.line.clone()),
            Piece::Done(seq, _) => PieceKey::Done(*seq),
        }
    }
}

/// The part of a ledger stored as one small document: stock numbers and
/// counters, without lines, holds, backorders or done keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerCore {
    /// The piece format's version (2); a whole-document ledger has none.
    v: u32,
    sku: Sku,
    stock: Stock,
    next_ticket: u64,
    done_base: u64,
    next_claim_seq: u64,
    version: u64,
}

/// [`LedgerCore`]'s format version.
pub const LEDGER_CORE_VERSION: u32 = 2;

impl LedgerCore {
    /// The SKU.
    pub fn sku(&self) -> &Sku {
        &self.sku
    }
}

/// A ledger being rebuilt from its core and pieces as they are read, page
/// by page, so the pieces never sit in memory next to the ledger
/// ([`SkuLedger::assemble`] does it in one go).
pub struct LedgerAssembly {
    ledger: SkuLedger,
    done: BTreeMap<u64, DoneKey>,
}

impl LedgerAssembly {
    /// Starts from a ledger's core.
    pub fn new(core: LedgerCore) -> Result<LedgerAssembly, String> {
        if core.v != LEDGER_CORE_VERSION {
            return Err(format!("ledger core version {} (expected {LEDGER_CORE_VERSION})", core.v));
        }
        let mut ledger = SkuLedger::new(core.sku);
        ledger.stock = core.stock;
        ledger.next_ticket = core.next_ticket;
        ledger.done_base = core.done_base;
        ledger.next_claim_seq = core.next_claim_seq;
        ledger.version = core.version;
        Ok(LedgerAssembly { ledger, done: BTreeMap::new() })
    }

    /// Adds one stored piece (any order).
    pub fn add(&mut self, LedgerPiece(piece): LedgerPiece) -> Result<(), String> {
        let ledger = &mut self.ledger;
        match piece {
            Piece::Line(line, claim) => {
                ledger.lines.insert(line, claim);
            }
            Piece::Hold(hold, claim) => {
                ledger.hold_expiries.insert((claim.expires_at, hold.clone()));
                ledger.holds.insert(hold, claim);
            }
            Piece::Backorder(ticket, entry) => {
                if ticket >= ledger.next_ticket {
                    return Err(format!("backorder ticket {ticket} not yet issued"));
                }
                ledger.backorders.insert_unordered(ticket, entry)?;
            }
            Piece::Done(seq, key) => {
                self.done.insert(seq, key);
            }
        }
        Ok(())
    }

    /// The ledger, once every piece is in, checked against every invariant.
    pub fn finish(self) -> Result<SkuLedger, String> {
        let LedgerAssembly { mut ledger, done } = self;
        ledger.backorders.sort()?;
        for (i, (seq, key)) in (0u64..).zip(done) {
            if seq != ledger.done_base + i {
                return Err(format!("done key {seq} out of sequence (expected {})", ledger.done_base + i));
            }
            ledger.done_index.insert(key.clone());
            ledger.done.push_back(key);
        }
        ledger.check_invariants_with(false)?;
        Ok(ledger)
    }
}

impl SkuLedger {
    /// Decides what a command does, without changing anything.
    pub fn decide(&self, cmd: &LedgerCommand, cfg: &LedgerConfig) -> Result<Vec<LedgerEvent>, LedgerError> {
        use LedgerCommand as C;
        match cmd {
            C::Receive { location, qty } => self.decide_receive(location, *qty, cfg),
            C::Reserve { order, line, qty, location, partition_hint } => {
                self.decide_reserve(order, line, *qty, location, *partition_hint, cfg)
            }
            C::Release { line } => Ok(self.decide_release(line)),
            C::Commit { line, location, qty, instruction_key } => {
                self.decide_commit(line, location, *qty, instruction_key)
            }
            C::Short { line, location, qty, qty_found, instruction_key, at } => {
                self.decide_short(line, location, (*qty, *qty_found), instruction_key, *at)
            }
            C::Adjust { location, delta, reason, user, at } => {
                self.decide_adjust(location, *delta, Audit { reason, user, at: *at }, cfg)
            }
            C::CycleCount { location, counted, user, at } => {
                self.decide_cycle_count(location, *counted, Audit { reason: CYCLE_COUNT_REASON, user, at: *at }, cfg)
            }
            C::CreateHold { hold_id, qty, location, now, ttl_ms, jitter_offset_ms } => {
                if !(1..=HOLD_TTL_MS_MAX).contains(ttl_ms) || !(0..=HOLD_JITTER_MS_MAX).contains(jitter_offset_ms) {
                    return Err(LedgerError::InvalidHoldTiming);
                }
                self.decide_create_hold(hold_id, *qty, location.as_ref(), *now, now.plus_ms(ttl_ms + jitter_offset_ms))
            }
            C::CreateOrderHold { hold_id, qty, location, now } => {
                self.decide_create_hold(hold_id, *qty, Some(location), *now, Timestamp::MAX)
            }
            C::ConsumeHold { hold_id, order, line } => self.decide_consume_hold(hold_id, order, line),
            C::ReleaseHold { hold_id } => Ok(self.decide_release_hold(hold_id)),
            C::ExpireHolds { now } => Ok(self.decide_expire_holds(*now)),
            C::Backorder { order, line, qty, since } => self.decide_backorder(order, line, *qty, *since),
            C::Restate { location, reason, user, at } => self.decide_restate(location, Audit { reason, user, at: *at }),
        }
    }

    /// Applies one event. Has no rules and cannot fail; panics only on an event
    /// that could not have come from `decide` on this state (a bug).
    pub fn apply(&mut self, ev: &LedgerEvent) {
        apply_stock(&mut self.stock, ev);
        use LedgerEvent as E;
        match ev {
            E::Received { .. } | E::Adjusted { .. } | E::SafetyReleased { .. } | E::Restated { .. } => {}
            E::Reserved { order, line, location, qty, parts, from_backorder } => {
                self.claim_line(order, line).add(location, parts);
                if *from_backorder {
                    self.shorten_backorder(line, *qty);
                }
            }
            E::Released { line, location, parts, .. } => self.unclaim_line(line, location, parts),
            E::Committed { line, location, parts, instruction_key, .. } => {
                self.remember_instruction(line, instruction_key);
                self.unclaim_line(line, location, parts);
            }
            E::Shorted { line, instruction_key, .. } => self.remember_instruction(line, instruction_key),
            E::HoldCreated { hold_id, location, parts, created_at, expires_at, .. } => {
                let seq = self.next_seq();
                let claim = HoldClaim {
                    location: location.clone(),
                    parts: parts_map(parts),
                    created_at: *created_at,
                    expires_at: *expires_at,
                    seq,
                };
                self.hold_expiries.insert((*expires_at, hold_id.clone()));
                self.holds.insert(hold_id.clone(), claim);
                self.changes.insert(PieceKey::Hold(hold_id.clone()));
            }
            E::HoldConsumed { hold_id, order, line, location, parts, .. } => {
                let hold = self.holds.remove(hold_id).expect("apply: a consumed hold was live when decided");
                self.hold_expiries.remove(&(hold.expires_at, hold_id.clone()));
                self.changes.insert(PieceKey::Hold(hold_id.clone()));
                let claim = self.claim_line(order, line);
                claim.add(location, parts);
                claim.consumed_holds.insert(hold_id.clone());
            }
            E::HoldReleased { hold_id, parts, .. } | E::HoldExpired { hold_id, parts, .. } => {
                self.unclaim_hold(hold_id, parts);
            }
            E::Backordered { order, line, qty, since, .. } => self.enqueue_backorder(order, line, *qty, *since),
            E::BackorderCanceled { line, .. } => {
                self.backorders.remove(line);
                self.changes.insert(PieceKey::Backorder(line.clone()));
            }
        }
        self.version += 1;
    }

    /// An empty ledger for `sku`.
    pub fn new(sku: Sku) -> SkuLedger {
        SkuLedger {
            sku,
            stock: Stock::new(),
            lines: BTreeMap::new(),
            holds: BTreeMap::new(),
            hold_expiries: BTreeSet::new(),
            backorders: BackorderQueue::default(),
            next_ticket: 0,
            done: VecDeque::new(),
            done_index: BTreeSet::new(),
            done_base: 0,
            next_claim_seq: 0,
            version: 0,
            changes: BTreeSet::new(),
        }
    }

    /// Rebuilds a ledger by applying a log of events from scratch.
    pub fn from_events<'a>(sku: Sku, events: impl IntoIterator<Item = &'a LedgerEvent>) -> SkuLedger {
        let mut ledger = SkuLedger::new(sku);
        for ev in events {
            ledger.apply(ev);
        }
        ledger.changes.clear();
        ledger
    }

    /// The pieces touched by `apply` since the last call, in key order; the
    /// caller stores [`SkuLedger::piece`] for each (or deletes it when that
    /// is `None`) together with [`SkuLedger::core`].
    pub fn take_changes(&mut self) -> Vec<PieceKey> {
        std::mem::take(&mut self.changes).into_iter().collect()
    }

    /// Marks every piece changed (to store a ledger that was kept whole).
    pub fn mark_all_changed(&mut self) {
        let keys: Vec<PieceKey> = self
            .lines
            .keys()
            .map(|l| PieceKey::Line(l.clone()))
            .chain(self.holds.keys().map(|h| PieceKey::Hold(h.clone())))
            .chain(self.backorders.lines().map(PieceKey::Backorder))
            .chain((0..self.done.len() as u64).map(|i| PieceKey::Done(self.done_base + i)))
            .collect();
        self.changes.extend(keys);
    }

    /// The current content of a piece, `None` when it no longer exists.
    pub fn piece(&self, key: &PieceKey) -> Option<LedgerPiece> {
        let piece = match key {
            PieceKey::Line(line) => Piece::Line(line.clone(), self.lines.get(line)?.clone()),
            PieceKey::Hold(hold) => Piece::Hold(hold.clone(), self.holds.get(hold)?.clone()),
            PieceKey::Backorder(line) => {
                let (ticket, entry) = self.backorders.get(line)?;
                Piece::Backorder(ticket, entry)
            }
            PieceKey::Done(seq) => {
                let i = usize::try_from(seq.checked_sub(self.done_base)?).ok()?;
                Piece::Done(*seq, self.done.get(i)?.clone())
            }
        };
        Some(LedgerPiece(piece))
    }

    /// The small document stored beside the pieces.
    pub fn core(&self) -> LedgerCore {
        LedgerCore {
            v: LEDGER_CORE_VERSION,
            sku: self.sku.clone(),
            stock: self.stock.clone(),
            next_ticket: self.next_ticket,
            done_base: self.done_base,
            next_claim_seq: self.next_claim_seq,
            version: self.version,
        }
    }

    /// Rebuilds a ledger from its core and every stored piece (any order),
    /// checking that they fit together and that every invariant holds.
    pub fn assemble(core: LedgerCore, pieces: impl IntoIterator<Item = LedgerPiece>) -> Result<SkuLedger, String> {
        let mut assembly = LedgerAssembly::new(core)?;
        for piece in pieces {
            assembly.add(piece)?;
        }
        assembly.finish()
    }

    /// The SKU this ledger is for.
    pub fn sku(&self) -> &Sku {
        &self.sku
    }

    /// How many events have been applied; the service compares it with the
    /// envelope `sequence` for its optimistic concurrency check.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Units available for new reservations across all locations.
    pub fn available(&self) -> u64 {
        self.stock.values().flatten().map(PartitionStock::available).sum()
    }

    /// Units available for new reservations at one location.
    pub fn available_at(&self, location: &LocationId) -> u64 {
        self.partitions_at(location).iter().map(PartitionStock::available).sum()
    }

    /// Units a reservation may take at one location under `cfg`: what is
    /// available (more only with the simulator's deliberate bug on).
    pub fn reservable_at(&self, location: &LocationId, cfg: &LedgerConfig) -> u64 {
        self.partitions_at(location).iter().map(|p| p.reservable(cfg)).sum()
    }

    /// The body of `GET /v1/inventory/{sku}`.
    pub fn snapshot(&self) -> InventorySnapshot {
        let locations: Vec<LocationSnapshot> =
            self.stock.iter().map(|(location, parts)| location_snapshot(location, parts)).collect();
        InventorySnapshot { sku: self.sku.clone(), available: self.available(), locations }
    }

    /// One location's numbers, if it has ever held this SKU.
    pub fn location(&self, location: &LocationId) -> Option<LocationSnapshot> {
        self.stock.get(location).map(|parts| location_snapshot(location, parts))
    }

    /// All counters summed over every location and partition.
    pub fn totals(&self) -> StockTotals {
        let mut t = StockTotals::default();
        for s in self.stock.values().flatten() {
            t.on_hand += s.on_hand;
            t.reserved += s.reserved;
            t.safety += s.safety;
            t.received += s.received;
            t.committed += s.committed;
            t.adjusted += s.adjusted;
        }
        t
    }

    /// What a line holds, per location.
    pub fn reservation(&self, line: &LineId) -> Option<ReservationView> {
        self.lines.get(line).map(|claim| reservation_view(line, claim))
    }

    /// Every open reservation, by line id (for reconciliation).
    pub fn reservations(&self) -> Vec<ReservationView> {
        self.lines.iter().map(|(line, claim)| reservation_view(line, claim)).collect()
    }

    /// The backorder queue, oldest first.
    pub fn backorders(&self) -> impl Iterator<Item = BackorderEntry> + '_ {
        self.backorders.iter().map(|(_, entry)| entry)
    }

    /// A line's place in the backorder queue, if it waits.
    pub fn backorder(&self, line: &LineId) -> Option<BackorderEntry> {
        self.backorders.get(line).map(|(_, entry)| entry)
    }

    /// Every live hold, in id order.
    pub fn holds(&self) -> impl Iterator<Item = HoldView> + '_ {
        self.holds.keys().filter_map(|id| self.hold(id))
    }

    /// A live hold.
    pub fn hold(&self, hold_id: &HoldId) -> Option<HoldView> {
        self.holds.get(hold_id).map(|h| HoldView {
            hold_id: hold_id.clone(),
            location: h.location.clone(),
            qty: h.parts.values().sum(),
            created_at: h.created_at,
            expires_at: h.expires_at,
        })
    }

    /// How many holds are live.
    pub fn hold_count(&self) -> usize {
        self.holds.len()
    }

    /// Per location, on hand minus what its recorded movements explain
    /// (`received + adjusted - committed`); only locations that differ.
    /// Non-empty only when the stored ledger was changed outside the engine.
    pub fn drift(&self) -> Vec<(LocationId, i64)> {
        self.stock
            .iter()
            .filter_map(|(location, parts)| {
                let d: i128 = parts.iter().map(PartitionStock::drift).sum();
                (d != 0).then(|| (location.clone(), i64::try_from(d).unwrap_or(i64::MAX)))
            })
            .collect()
    }

    /// When the engine's timer should next send `ExpireHolds` (never for
    /// order holds, which do not expire: they sort last).
    pub fn next_expiry(&self) -> Option<Timestamp> {
        self.hold_expiries.first().map(|(t, _)| *t).filter(|t| *t != Timestamp::MAX)
    }

    /// Checks every invariant of the whole ledger (O(size); for the simulator,
    /// the benchmark and tests). `apply` checks the touched partitions itself.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_invariants_with(true)
    }

    /// [`Self::check_invariants`], optionally tolerating stock whose on-hand
    /// units drifted from its recorded movements (a ledger changed behind the
    /// engine's back still loads, so reconciliation can restate it).
    fn check_invariants_with(&self, books: bool) -> Result<(), String> {
        let mut claimed: BTreeMap<(&LocationId, u32), u64> = BTreeMap::new();
        for (line, claim) in &self.lines {
            if claim.holdings.is_empty() {
                return Err(format!("line {line} is open but holds nothing"));
            }
            for (location, parts) in &claim.holdings {
                add_claims(&mut claimed, location, parts, &format!("line {line}"))?;
            }
        }
        for (hold_id, hold) in &self.holds {
            add_claims(&mut claimed, &hold.location, &hold.parts, &format!("hold {hold_id}"))?;
            if !self.hold_expiries.contains(&(hold.expires_at, hold_id.clone())) {
                return Err(format!("hold {hold_id} is missing from the expiry index"));
            }
        }
        if self.hold_expiries.len() != self.holds.len() {
            return Err("the hold expiry index has stale entries".to_owned());
        }
        for (location, parts) in &self.stock {
            for (p, s) in (0u32..).zip(parts) {
                s.check_with(books).map_err(|e| format!("{location}/{p}: {e}"))?;
                let claims = claimed.remove(&(location, p)).unwrap_or(0);
                if claims != s.reserved {
                    return Err(format!("{location}/{p}: reserved {} but claims hold {claims}", s.reserved));
                }
            }
        }
        if let Some(((location, p), _)) = claimed.first_key_value() {
            return Err(format!("claims at {location}/{p}, a partition that does not exist"));
        }
        self.check_queues()
    }

    fn check_queues(&self) -> Result<(), String> {
        // Tickets increase and each live line is indexed once under its own
        // ticket (so no line waits twice), and none waits for zero units:
        // checked on the packed slots, without spelling an id, since this
        // runs after every change in debug builds.
        self.backorders.check()?;
        if let Some(ticket) = self.backorders.last_ticket()
            && ticket >= self.next_ticket
        {
            return Err(format!("backorder ticket {ticket} not yet issued"));
        }
        if self.done.len() > DONE_KEYS_MAX || self.done.len() != self.done_index.len() {
            return Err("the done-key window is inconsistent".to_owned());
        }
        Ok(())
    }
}

/// Read-only numbers of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionSnapshot {
    /// The partition index.
    pub partition: u32,
    /// Units physically there, as far as the ledger knows.
    pub on_hand: u64,
    /// Units promised to lines and holds.
    pub reserved: u64,
    /// Units held back until counts are certain.
    pub safety: u64,
    /// `on_hand − reserved − safety`.
    pub available: u64,
    /// Units ever received.
    pub received: u64,
    /// Units ever picked.
    pub committed: u64,
    /// Net units ever adjusted.
    pub adjusted: i64,
}

/// Read-only numbers of one location (the per-location object of `GET /v1/inventory/{sku}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationSnapshot {
    /// The location.
    pub location: LocationId,
    /// Sum over partitions.
    pub on_hand: u64,
    /// Sum over partitions.
    pub reserved: u64,
    /// Sum over partitions.
    pub safety: u64,
    /// Sum over partitions.
    pub available: u64,
    /// Each partition.
    pub partitions: Vec<PartitionSnapshot>,
}

/// The body of `GET /v1/inventory/{sku}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventorySnapshot {
    /// The SKU.
    pub sku: Sku,
    /// Available across all locations.
    pub available: u64,
    /// Each location.
    pub locations: Vec<LocationSnapshot>,
}

/// All counters of a ledger summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockTotals {
    /// Units on hand.
    pub on_hand: u64,
    /// Units reserved.
    pub reserved: u64,
    /// Units of safety buffer.
    pub safety: u64,
    /// Units ever received.
    pub received: u64,
    /// Units ever picked.
    pub committed: u64,
    /// Net units ever adjusted.
    pub adjusted: i64,
}

/// Units of a line at one location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The location.
    pub location: LocationId,
    /// Units reserved there.
    pub qty: u64,
}

/// What one line holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationView {
    /// The order.
    pub order: OrderId,
    /// The line.
    pub line: LineId,
    /// Total units reserved.
    pub qty: u64,
    /// Per location.
    pub allocations: Vec<Allocation>,
}

/// A line waiting in the backorder queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackorderEntry {
    /// The order.
    pub order: OrderId,
    /// The line.
    pub line: LineId,
    /// Units still wanted.
    pub qty: u64,
    /// When it started waiting.
    pub since: Timestamp,
}

/// A live cart hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldView {
    /// The hold.
    pub hold_id: HoldId,
    /// Where.
    pub location: LocationId,
    /// Units held.
    pub qty: u64,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it expires.
    pub expires_at: Timestamp,
}

// ---------------------------------------------------------------------------
// Decisions, one per command.

/// Who, why and when, recorded on every adjustment.
struct Audit<'a> {
    reason: &'a str,
    user: &'a str,
    at: Timestamp,
}

impl SkuLedger {
    fn decide_receive(
        &self,
        location: &LocationId,
        qty: Qty,
        cfg: &LedgerConfig,
    ) -> Result<Vec<LedgerEvent>, LedgerError> {
        let qty = positive(qty)?;
        let parts = spread(self.partitions_at(location), cfg.partitions, qty)
            .into_iter()
            .map(|p| PartReceipt { partition: p.partition, qty: p.qty, safety: cfg.safety_for(p.qty) })
            .collect();
        let mut events = vec![LedgerEvent::Received { location: location.clone(), qty, parts }];
        self.push_backorder_fills(&mut events, std::slice::from_ref(location));
        Ok(events)
    }

    fn decide_reserve(
        &self,
        order: &OrderId,
        line: &LineId,
        qty: Qty,
        location: &LocationId,
        hint: u32,
        cfg: &LedgerConfig,
    ) -> Result<Vec<LedgerEvent>, LedgerError> {
        let qty = positive(qty)?;
        self.check_line_order(order, line)?;
        let parts = self.partitions_at(location);
        let available: u64 = parts.iter().map(|p| p.reservable(cfg)).sum();
        if available < qty {
            return Err(LedgerError::Insufficient { available });
        }
        Ok(vec![LedgerEvent::Reserved {
            order: order.clone(),
            line: line.clone(),
            location: location.clone(),
            qty,
            parts: plan_take(parts, hint, qty, |p| p.reservable(cfg)),
            from_backorder: false,
        }])
    }

    fn decide_release(&self, line: &LineId) -> Vec<LedgerEvent> {
        let mut events = Vec::new();
        let mut locations = Vec::new();
        if let Some(claim) = self.lines.get(line) {
            for (location, parts) in &claim.holdings {
                events.push(LedgerEvent::Released {
                    order: claim.order.clone(),
                    line: line.clone(),
                    location: location.clone(),
                    qty: parts.values().sum(),
                    parts: parts_vec(parts),
                    reason: ReleaseReason::Canceled,
                });
                locations.push(location.clone());
            }
        }
        if let Some(b) = self.backorder(line) {
            events.push(LedgerEvent::BackorderCanceled { order: b.order.clone(), line: line.clone(), qty: b.qty });
        }
        self.push_backorder_fills(&mut events, &locations);
        events
    }

    fn decide_commit(
        &self,
        line: &LineId,
        location: &LocationId,
        qty: Qty,
        key: &str,
    ) -> Result<Vec<LedgerEvent>, LedgerError> {
        let qty = positive(qty)?;
        check_instruction_key(key)?;
        if self.instruction_done(line, key) {
            return Ok(Vec::new());
        }
        let (claim, held) = self.holding(line, location)?;
        let held_qty: u64 = held.values().sum();
        if held_qty < qty {
            return Err(LedgerError::NotReserved {
                line: line.clone(),
                location: location.clone(),
                reserved: held_qty,
            });
        }
        let parts = take_in_order(held, qty);
        let safety = self.safety_at(location, parts.iter().map(|p| (p.partition, u64::MAX)))?;
        let mut events = vec![LedgerEvent::Committed {
            order: claim.order.clone(),
            line: line.clone(),
            location: location.clone(),
            qty,
            parts,
            instruction_key: key.to_owned(),
        }];
        push_safety_release(&mut events, location, safety, SafetyCause::PickConfirmed);
        self.push_backorder_fills(&mut events, std::slice::from_ref(location));
        Ok(events)
    }

    /// A short pick does not serve the backorder queue: the shorted line's
    /// remainder is re-routed by the engine first. Only the pick's own units
    /// (`qty`, `found` of them found) are concerned: what else the line holds
    /// at the location belongs to its other picks.
    fn decide_short(
        &self,
        line: &LineId,
        location: &LocationId,
        (qty, found): (Qty, Qty),
        key: &str,
        at: Timestamp,
    ) -> Result<Vec<LedgerEvent>, LedgerError> {
        check_instruction_key(key)?;
        if self.instruction_done(line, key) {
            return Ok(Vec::new());
        }
        let (claim, held) = self.holding(line, location)?;
        let held_qty = held.values().sum::<u64>();
        let (pick_qty, found_qty) = (u64::from(qty).min(held_qty), u64::from(found));
        if found_qty > pick_qty {
            return Err(LedgerError::FoundMoreThanReserved { reserved: pick_qty, found: found_qty });
        }
        if found_qty == pick_qty {
            return self.decide_commit(line, location, found, key);
        }
        let found_parts = take_in_order(held, found_qty);
        let missing_parts = parts_minus(&parts_map(&take_in_order(held, pick_qty)), &found_parts);
        let missing = pick_qty - found_qty;
        let absorbed = self.safety_at(location, missing_parts.iter().map(|p| (p.partition, p.qty)))?;
        let (order, line_id, loc) = (&claim.order, line.clone(), location.clone());
        let mut events = Vec::new();
        if found_qty > 0 {
            events.push(LedgerEvent::Committed {
                order: order.clone(),
                line: line_id.clone(),
                location: loc.clone(),
                qty: found_qty,
                parts: found_parts,
                instruction_key: key.to_owned(),
            });
        }
        events.push(LedgerEvent::Released {
            order: order.clone(),
            line: line_id.clone(),
            location: loc.clone(),
            qty: missing,
            parts: missing_parts.clone(),
            reason: ReleaseReason::ShortPick,
        });
        push_safety_release(&mut events, location, absorbed, SafetyCause::ShortPick);
        events.push(LedgerEvent::Adjusted {
            location: loc.clone(),
            delta: -signed(missing)?,
            parts: deltas(missing_parts.clone(), -1)?,
            reason: SHORT_PICK_REASON.to_owned(),
            user: format!("pick:{key}"),
            at,
        });
        events.push(LedgerEvent::Shorted {
            order: order.clone(),
            line: line_id,
            location: loc,
            qty_found: found_qty,
            qty_missing: missing,
            instruction_key: key.to_owned(),
        });
        Ok(events)
    }

    fn decide_adjust(
        &self,
        location: &LocationId,
        delta: i64,
        audit: Audit<'_>,
        cfg: &LedgerConfig,
    ) -> Result<Vec<LedgerEvent>, LedgerError> {
        check_audit(&audit)?;
        if delta == 0 {
            return Err(LedgerError::ZeroQuantity);
        }
        if delta.unsigned_abs() > COUNT_MAX {
            return Err(LedgerError::QuantityTooLarge { max: COUNT_MAX });
        }
        let current = self.partitions_at(location);
        let mut events = Vec::new();
        let parts = if delta > 0 {
            deltas(spread(current, cfg.partitions, delta.unsigned_abs()), 1)?
        } else {
            let on_hand: u64 = current.iter().map(|s| s.on_hand).sum();
            if on_hand < delta.unsigned_abs() {
                return Err(LedgerError::AdjustBelowZero { on_hand, delta });
            }
            self.shrink(location, current, delta.unsigned_abs(), audit.at, &mut events)?
        };
        events.push(adjusted(location, delta, parts, &audit));
        if delta > 0 {
            self.push_backorder_fills(&mut events, std::slice::from_ref(location));
        }
        Ok(events)
    }

    fn decide_cycle_count(
        &self,
        location: &LocationId,
        counted: u64,
        audit: Audit<'_>,
        cfg: &LedgerConfig,
    ) -> Result<Vec<LedgerEvent>, LedgerError> {
        check_audit(&audit)?;
        if counted > COUNT_MAX {
            return Err(LedgerError::QuantityTooLarge { max: COUNT_MAX });
        }
        let mut scratch = self.partitions_at(location).to_vec();
        let safety = self.safety_at(location, (0u32..).zip(scratch.iter().map(|_| u64::MAX)))?;
        scratch.iter_mut().for_each(|s| s.safety = 0);
        let mut events = Vec::new();
        push_safety_release(&mut events, location, safety, SafetyCause::CycleCount);
        let on_hand: u64 = scratch.iter().map(|s| s.on_hand).sum();
        let parts = if counted >= on_hand {
            deltas(spread(&scratch, cfg.partitions, counted - on_hand), 1)?
        } else {
            self.shrink(location, &scratch, on_hand - counted, audit.at, &mut events)?
        };
        let delta = signed(counted)? - signed(on_hand)?;
        events.push(adjusted(location, delta, parts, &audit));
        self.push_backorder_fills(&mut events, std::slice::from_ref(location));
        Ok(events)
    }

    fn decide_restate(&self, location: &LocationId, audit: Audit<'_>) -> Result<Vec<LedgerEvent>, LedgerError> {
        check_audit(&audit)?;
        let mut parts = Vec::new();
        for (partition, s) in (0u32..).zip(self.partitions_at(location)) {
            let drift = i64::try_from(s.drift())
                .map_err(|_| LedgerError::Impossible(format!("{location}/{partition}: drift out of range")))?;
            if drift != 0 {
                if s.reserved + s.safety > s.on_hand {
                    return Err(LedgerError::Impossible(format!(
                        "{location}/{partition}: on hand {} is below reserved {} + safety {}; count the location",
                        s.on_hand, s.reserved, s.safety
                    )));
                }
                parts.push(PartDelta { partition, delta: drift });
            }
        }
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        Ok(vec![LedgerEvent::Restated {
            location: location.clone(),
            delta: parts.iter().map(|p| p.delta).sum(),
            parts,
            reason: audit.reason.to_owned(),
            user: audit.user.to_owned(),
            at: audit.at,
        }])
    }

    fn decide_create_hold(
        &self,
        hold_id: &HoldId,
        qty: Qty,
        location: Option<&LocationId>,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Vec<LedgerEvent>, LedgerError> {
        if self.holds.contains_key(hold_id) {
            return Err(LedgerError::HoldExists(hold_id.clone()));
        }
        let qty = positive(qty)?;
        let location = match location {
            Some(l) => l.clone(),
            None => self.roomiest_location(qty)?,
        };
        let parts = self.partitions_at(&location);
        let available: u64 = parts.iter().map(PartitionStock::available).sum();
        if available < qty {
            return Err(LedgerError::Insufficient { available });
        }
        Ok(vec![LedgerEvent::HoldCreated {
            hold_id: hold_id.clone(),
            parts: plan_take(parts, hint_of(hold_id.as_str()), qty, PartitionStock::available),
            location,
            qty,
            created_at: now,
            expires_at,
        }])
    }

    fn decide_consume_hold(
        &self,
        hold_id: &HoldId,
        order: &OrderId,
        line: &LineId,
    ) -> Result<Vec<LedgerEvent>, LedgerError> {
        let Some(hold) = self.holds.get(hold_id) else {
            let consumed_here = self.lines.get(line).is_some_and(|c| c.consumed_holds.contains(hold_id))
                || self.done_index.contains(&DoneKey::Hold { hold_id: hold_id.clone(), line: line.clone() });
            return if consumed_here { Ok(Vec::new()) } else { Err(LedgerError::UnknownHold(hold_id.clone())) };
        };
        self.check_line_order(order, line)?;
        Ok(vec![LedgerEvent::HoldConsumed {
            hold_id: hold_id.clone(),
            order: order.clone(),
            line: line.clone(),
            location: hold.location.clone(),
            qty: hold.parts.values().sum(),
            parts: parts_vec(&hold.parts),
        }])
    }

    fn decide_release_hold(&self, hold_id: &HoldId) -> Vec<LedgerEvent> {
        let Some(hold) = self.holds.get(hold_id) else { return Vec::new() };
        let mut events = vec![LedgerEvent::HoldReleased {
            hold_id: hold_id.clone(),
            location: hold.location.clone(),
            qty: hold.parts.values().sum(),
            parts: parts_vec(&hold.parts),
            reason: HoldReleaseReason::Canceled,
        }];
        self.push_backorder_fills(&mut events, std::slice::from_ref(&hold.location));
        events
    }

    fn decide_expire_holds(&self, now: Timestamp) -> Vec<LedgerEvent> {
        let mut events = Vec::new();
        let mut locations = Vec::new();
        let due = self.hold_expiries.iter().take_while(|(t, _)| *t <= now).take(HOLDS_EXPIRED_PER_BATCH_MAX);
        for (expires_at, hold_id) in due {
            let hold = &self.holds[hold_id];
            events.push(LedgerEvent::HoldExpired {
                hold_id: hold_id.clone(),
                location: hold.location.clone(),
                qty: hold.parts.values().sum(),
                parts: parts_vec(&hold.parts),
                expires_at: *expires_at,
            });
            locations.push(hold.location.clone());
        }
        self.push_backorder_fills(&mut events, &locations);
        events
    }

    fn decide_backorder(
        &self,
        order: &OrderId,
        line: &LineId,
        qty: Qty,
        since: Timestamp,
    ) -> Result<Vec<LedgerEvent>, LedgerError> {
        let qty = positive(qty)?;
        self.check_line_order(order, line)?;
        Ok(vec![LedgerEvent::Backordered {
            order: order.clone(),
            line: line.clone(),
            qty,
            since,
            cause: BackorderCause::Requested,
        }])
    }
}

// ---------------------------------------------------------------------------
// Decision helpers.

impl SkuLedger {
    /// Serves the backorder queue, oldest first, from what `events` leave
    /// available at `locations`. Partially filling the head is fine; a later
    /// entry gets units only once every earlier one is filled.
    fn push_backorder_fills(&self, events: &mut Vec<LedgerEvent>, locations: &[LocationId]) {
        if self.backorders.is_empty() || locations.is_empty() {
            return;
        }
        let mut scratch = self.stock.clone();
        let mut canceled = BTreeSet::new();
        for ev in events.iter() {
            apply_stock(&mut scratch, ev);
            if let LedgerEvent::BackorderCanceled { line, .. } = ev {
                canceled.insert(line.clone());
            }
        }
        let mut filled: BTreeMap<LineId, u64> = BTreeMap::new();
        let mut fills = Vec::new();
        let locations: BTreeSet<&LocationId> = locations.iter().collect();
        for location in locations {
            let Some(parts) = scratch.get_mut(location) else { continue };
            for entry in self.backorders().filter(|b| !canceled.contains(&b.line)) {
                let available: u64 = parts.iter().map(PartitionStock::available).sum();
                let done = filled.get(&entry.line).copied().unwrap_or(0);
                if available == 0 {
                    break;
                }
                let qty = (entry.qty - done).min(available);
                if qty == 0 {
                    continue;
                }
                let take = plan_take(parts, hint_of(entry.line.as_str()), qty, PartitionStock::available);
                for p in &take {
                    parts[p.partition as usize].reserved += p.qty;
                }
                filled.insert(entry.line.clone(), done + qty);
                fills.push(LedgerEvent::Reserved {
                    order: entry.order.clone(),
                    line: entry.line.clone(),
                    location: location.clone(),
                    qty,
                    parts: take,
                    from_backorder: true,
                });
            }
        }
        events.extend(fills);
    }

    /// Plans taking `need` on-hand units out of a location: free stock first,
    /// then safety buffer, then the newest claims (holds before lines, since a
    /// cart is a promise to nobody who has paid), whose lines are backordered.
    /// Returns the per-partition cut; pushes the releases it needs into `events`.
    fn shrink(
        &self,
        location: &LocationId,
        parts: &[PartitionStock],
        need: u64,
        at: Timestamp,
        events: &mut Vec<LedgerEvent>,
    ) -> Result<Vec<PartDelta>, LedgerError> {
        let mut cut = vec![0u64; parts.len()];
        let mut left = need;
        for (p, s) in parts.iter().enumerate() {
            let take = s.available().min(left);
            cut[p] += take;
            left -= take;
        }
        let mut safety = Vec::new();
        for (p, s) in (0u32..).zip(parts) {
            let take = s.safety.min(left);
            if take > 0 {
                cut[p as usize] += take;
                left -= take;
                safety.push(PartQty { partition: p, qty: take });
            }
        }
        push_safety_release(events, location, safety, SafetyCause::StockLoss);
        if left > 0 {
            self.bump_claims(location, left, at, &mut cut, events);
        }
        let cut: Vec<PartQty> =
            (0u32..).zip(cut).filter(|(_, c)| *c > 0).map(|(partition, qty)| PartQty { partition, qty }).collect();
        deltas(cut, -1)
    }

    fn bump_claims(
        &self,
        location: &LocationId,
        mut left: u64,
        at: Timestamp,
        cut: &mut [u64],
        events: &mut Vec<LedgerEvent>,
    ) {
        let mut holds: Vec<(&HoldId, &HoldClaim)> =
            self.holds.iter().filter(|(_, h)| &h.location == location).collect();
        holds.sort_by_key(|(_, h)| Reverse(h.seq));
        for (hold_id, hold) in holds {
            if left == 0 {
                return;
            }
            let parts = take_in_order(&hold.parts, left.min(hold.parts.values().sum()));
            let qty = bump_cut(&parts, cut, &mut left);
            let reason = HoldReleaseReason::StockLoss;
            events.push(LedgerEvent::HoldReleased {
                hold_id: hold_id.clone(),
                location: location.clone(),
                qty,
                parts,
                reason,
            });
        }
        let mut lines: Vec<(&LineId, &LineClaim, &Parts)> =
            self.lines.iter().filter_map(|(id, c)| c.holdings.get(location).map(|p| (id, c, p))).collect();
        lines.sort_by_key(|(_, c, _)| Reverse(c.seq));
        for (line, claim, held) in lines {
            if left == 0 {
                return;
            }
            let parts = take_in_order(held, left.min(held.values().sum()));
            let qty = bump_cut(&parts, cut, &mut left);
            let (order, line) = (claim.order.clone(), line.clone());
            events.push(LedgerEvent::Released {
                order: order.clone(),
                line: line.clone(),
                location: location.clone(),
                qty,
                parts,
                reason: ReleaseReason::StockLoss,
            });
            events.push(LedgerEvent::Backordered { order, line, qty, since: at, cause: BackorderCause::StockLoss });
        }
        assert_eq!(left, 0, "claims at a location cover its reserved units");
    }

    /// The location with the most available stock (first by id on ties).
    fn roomiest_location(&self, qty: u64) -> Result<LocationId, LedgerError> {
        let mut best: Option<(&LocationId, u64)> = None;
        for (location, parts) in &self.stock {
            let available = parts.iter().map(PartitionStock::available).sum();
            if best.is_none_or(|(_, b)| available > b) {
                best = Some((location, available));
            }
        }
        match best {
            Some((location, available)) if available >= qty => Ok(location.clone()),
            Some((_, available)) => Err(LedgerError::Insufficient { available }),
            None => Err(LedgerError::Insufficient { available: 0 }),
        }
    }

    /// Safety buffer at the given partitions of a location, each capped.
    fn safety_at(
        &self,
        location: &LocationId,
        partitions: impl Iterator<Item = (u32, u64)>,
    ) -> Result<Vec<PartQty>, LedgerError> {
        let stock = self.partitions_at(location);
        let mut out = Vec::new();
        for (partition, cap) in partitions {
            let s = stock
                .get(partition as usize)
                .ok_or_else(|| LedgerError::Impossible(format!("{location}/{partition} is claimed but missing")))?;
            let qty = s.safety.min(cap);
            if qty > 0 {
                out.push(PartQty { partition, qty });
            }
        }
        Ok(out)
    }

    fn holding(&self, line: &LineId, location: &LocationId) -> Result<(&LineClaim, &Parts), LedgerError> {
        self.lines
            .get(line)
            .and_then(|c| c.holdings.get(location).map(|p| (c, p)))
            .ok_or_else(|| LedgerError::NotReserved { line: line.clone(), location: location.clone(), reserved: 0 })
    }

    fn instruction_done(&self, line: &LineId, key: &str) -> bool {
        self.lines.get(line).is_some_and(|c| c.instruction_keys.contains(key))
            || self.done_index.contains(&DoneKey::Instruction { line: line.clone(), key: key.to_owned() })
    }

    fn check_line_order(&self, order: &OrderId, line: &LineId) -> Result<(), LedgerError> {
        let known = self.lines.get(line).map(|c| c.order.clone()).or_else(|| self.backorder(line).map(|b| b.order));
        match known {
            Some(other) if other != *order => Err(LedgerError::LineOfOtherOrder { line: line.clone(), order: other }),
            _ => Ok(()),
        }
    }

    fn partitions_at(&self, location: &LocationId) -> &[PartitionStock] {
        self.stock.get(location).map_or(&[], Vec::as_slice)
    }
}

// ---------------------------------------------------------------------------
// Apply helpers.

impl SkuLedger {
    fn next_seq(&mut self) -> u64 {
        self.next_claim_seq += 1;
        self.next_claim_seq
    }

    fn claim_line(&mut self, order: &OrderId, line: &LineId) -> &mut LineClaim {
        self.changes.insert(PieceKey::Line(line.clone()));
        if !self.lines.contains_key(line) {
            let seq = self.next_seq();
            let claim = LineClaim {
                order: order.clone(),
                seq,
                holdings: SortedMap::new(),
                instruction_keys: BTreeSet::new(),
                consumed_holds: BTreeSet::new(),
            };
            self.lines.insert(line.clone(), claim);
        }
        self.lines.get_mut(line).expect("inserted above")
    }

    /// Takes units off a line; a line holding nothing more is closed and its
    /// dedup keys move to the bounded window of done keys.
    fn unclaim_line(&mut self, line: &LineId, location: &LocationId, parts: &[PartQty]) {
        self.changes.insert(PieceKey::Line(line.clone()));
        let claim = self.lines.get_mut(line).expect("apply: a released line holds units");
        let held = claim.holdings.get_mut(location).expect("apply: a released line holds units there");
        subtract_parts(held, parts);
        if held.is_empty() {
            claim.holdings.remove(location);
        }
        if !claim.holdings.is_empty() {
            return;
        }
        let claim = self.lines.remove(line).expect("looked up above");
        for key in claim.instruction_keys {
            self.remember_done(DoneKey::Instruction { line: line.clone(), key });
        }
        for hold_id in claim.consumed_holds {
            self.remember_done(DoneKey::Hold { hold_id, line: line.clone() });
        }
    }

    fn unclaim_hold(&mut self, hold_id: &HoldId, parts: &[PartQty]) {
        self.changes.insert(PieceKey::Hold(hold_id.clone()));
        let hold = self.holds.get_mut(hold_id).expect("apply: a released hold is live");
        subtract_parts(&mut hold.parts, parts);
        if hold.parts.is_empty() {
            let expires_at = hold.expires_at;
            self.holds.remove(hold_id);
            self.hold_expiries.remove(&(expires_at, hold_id.clone()));
        }
    }

    fn remember_instruction(&mut self, line: &LineId, key: &str) {
        match self.lines.get_mut(line) {
            Some(claim) => {
                claim.instruction_keys.insert(key.to_owned());
                self.changes.insert(PieceKey::Line(line.clone()));
            }
            None => self.remember_done(DoneKey::Instruction { line: line.clone(), key: key.to_owned() }),
        }
    }

    fn remember_done(&mut self, key: DoneKey) {
        if self.done_index.insert(key.clone()) {
            self.done.push_back(key);
            self.changes.insert(PieceKey::Done(self.done_base + self.done.len() as u64 - 1));
        }
        while self.done.len() > DONE_KEYS_MAX {
            let oldest = self.done.pop_front().expect("longer than the limit");
            self.done_index.remove(&oldest);
            self.changes.insert(PieceKey::Done(self.done_base));
            self.done_base += 1;
        }
    }

    fn enqueue_backorder(&mut self, order: &OrderId, line: &LineId, qty: u64, since: Timestamp) {
        self.changes.insert(PieceKey::Backorder(line.clone()));
        if let Some(waiting) = self.backorders.qty_mut(line) {
            *waiting += qty;
            return;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.backorders.push(ticket, BackorderEntry { order: order.clone(), line: line.clone(), qty, since });
    }

    fn shorten_backorder(&mut self, line: &LineId, qty: u64) {
        self.changes.insert(PieceKey::Backorder(line.clone()));
        let waiting = self.backorders.qty_mut(line).expect("apply: a filled backorder is queued");
        *waiting = waiting.checked_sub(qty).expect("apply: a backorder is never overfilled");
        if *waiting == 0 {
            self.backorders.remove(line);
        }
    }
}

/// Applies an event's effect on stock numbers only; shared by `apply` and by
/// `decide`'s scratch copy, and asserts every touched partition stays sound.
fn apply_stock(stock: &mut Stock, ev: &LedgerEvent) {
    use LedgerEvent as E;
    match ev {
        E::Received { location, parts, .. } => {
            for p in parts {
                let s = partition_mut(stock, location, p.partition);
                s.on_hand += p.qty;
                s.received += p.qty;
                s.safety += p.safety;
                s.assert_sound(location, p.partition);
            }
        }
        E::Reserved { location, parts, .. } | E::HoldCreated { location, parts, .. } => {
            each_part(stock, location, parts, |s, q| s.reserved += q);
        }
        E::Released { location, parts, .. }
        | E::HoldReleased { location, parts, .. }
        | E::HoldExpired { location, parts, .. } => {
            each_part(stock, location, parts, |s, q| s.reserved = sub(s.reserved, q, "reserved"));
        }
        E::Committed { location, parts, .. } => each_part(stock, location, parts, |s, q| {
            s.reserved = sub(s.reserved, q, "reserved");
            s.on_hand = sub(s.on_hand, q, "on hand");
            s.committed += q;
        }),
        E::SafetyReleased { location, parts, .. } => {
            each_part(stock, location, parts, |s, q| s.safety = sub(s.safety, q, "safety"));
        }
        E::Adjusted { location, parts, .. } => {
            for p in parts {
                let s = partition_mut(stock, location, p.partition);
                s.on_hand = s.on_hand.checked_add_signed(p.delta).expect("apply: an adjustment never goes below zero");
                s.adjusted += p.delta;
                s.assert_sound(location, p.partition);
            }
        }
        E::Restated { location, parts, .. } => {
            for p in parts {
                let s = partition_mut(stock, location, p.partition);
                s.adjusted += p.delta;
                s.assert_sound(location, p.partition);
            }
        }
        E::Shorted { .. } | E::HoldConsumed { .. } | E::Backordered { .. } | E::BackorderCanceled { .. } => {}
    }
}

fn each_part(stock: &mut Stock, location: &LocationId, parts: &[PartQty], f: impl Fn(&mut PartitionStock, u64)) {
    for p in parts {
        let s = partition_mut(stock, location, p.partition);
        f(s, p.qty);
        s.assert_sound(location, p.partition);
    }
}

fn partition_mut<'a>(stock: &'a mut Stock, location: &LocationId, partition: u32) -> &'a mut PartitionStock {
    let parts = stock.entry(location.clone()).or_default();
    let index = partition as usize;
    if parts.len() <= index {
        parts.resize(index + 1, PartitionStock::default());
    }
    &mut parts[index]
}

fn sub(from: u64, qty: u64, what: &str) -> u64 {
    from.checked_sub(qty).unwrap_or_else(|| panic!("apply: {what} would go below zero ({from} - {qty})"))
}

// ---------------------------------------------------------------------------
// Internal state.

type Stock = BTreeMap<LocationId, Vec<PartitionStock>>;
type Parts = SortedMap<u32, u64>;

/// The numbers of one (location, partition).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PartitionStock {
    on_hand: u64,
    reserved: u64,
    safety: u64,
    received: u64,
    committed: u64,
    adjusted: i64,
}

impl PartitionStock {
    fn available(&self) -> u64 {
        self.on_hand.saturating_sub(self.reserved).saturating_sub(self.safety)
    }

    /// What a reservation may take: [`Self::available`], unless the
    /// simulator's deliberate bug counts the safety buffer in.
    fn reservable(&self, cfg: &LedgerConfig) -> u64 {
        if cfg.reserve_ignores_safety { self.on_hand.saturating_sub(self.reserved) } else { self.available() }
    }

    /// On hand minus what the recorded movements explain (0 when sound).
    fn drift(&self) -> i128 {
        i128::from(self.on_hand) - (i128::from(self.received) + i128::from(self.adjusted) - i128::from(self.committed))
    }

    /// `reserved + safety <= on_hand` (no oversell) and `on_hand == received + adjusted - committed`.
    fn check(&self) -> Result<(), String> {
        self.check_with(true)
    }

    /// [`Self::check`]; without `books`, a drift between on hand and the
    /// recorded movements is tolerated (it is reconciliation's to restate).
    fn check_with(&self, books: bool) -> Result<(), String> {
        if self.reserved + self.safety > self.on_hand {
            return Err(format!("reserved {} + safety {} exceed on hand {}", self.reserved, self.safety, self.on_hand));
        }
        if !books {
            return Ok(());
        }
        let expected = i128::from(self.received) + i128::from(self.adjusted) - i128::from(self.committed);
        if i128::from(self.on_hand) != expected {
            return Err(format!("on hand {} but received + adjusted - committed = {expected}", self.on_hand));
        }
        Ok(())
    }

    fn assert_sound(&self, location: &LocationId, partition: u32) {
        if let Err(e) = self.check() {
            panic!("ledger invariant broken at {location}/{partition}: {e}");
        }
    }
}

/// What one order line holds, per location and partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LineClaim {
    order: OrderId,
    /// Order of creation; the newest claims are bumped first by a stock loss.
    seq: u64,
    holdings: SortedMap<LocationId, Parts>,
    instruction_keys: BTreeSet<String>,
    consumed_holds: BTreeSet<HoldId>,
}

impl LineClaim {
    fn add(&mut self, location: &LocationId, parts: &[PartQty]) {
        let held = self.holdings.entry_or_default(location.clone());
        for p in parts {
            *held.entry_or_default(p.partition) += p.qty;
        }
    }
}

/// What one cart hold holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct HoldClaim {
    location: LocationId,
    parts: Parts,
    created_at: Timestamp,
    expires_at: Timestamp,
    seq: u64,
}

/// A deduplication key of a closed line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum DoneKey {
    Instruction { line: LineId, key: String },
    Hold { hold_id: HoldId, line: LineId },
}

// ---------------------------------------------------------------------------
// Pure leaves.

/// Takes `qty` available units starting at the hinted partition and falling back
/// to the others in ring order. The caller has checked the location has enough.
fn plan_take(parts: &[PartitionStock], hint: u32, qty: u64, room: impl Fn(&PartitionStock) -> u64) -> Vec<PartQty> {
    let n = parts.len();
    let mut out = Vec::new();
    let mut need = qty;
    for i in 0..n {
        if need == 0 {
            break;
        }
        let p = (hint as usize + i) % n;
        let take = room(&parts[p]).min(need);
        if take > 0 {
            out.push(PartQty { partition: partition_index(p), qty: take });
            need -= take;
        }
    }
    debug_assert_eq!(need, 0, "plan_take is only called when the location has enough");
    out
}

/// Spreads `qty` units evenly over partitions `0..partitions`; the remainder goes
/// to the partitions with the least on hand, so repeated small receipts rotate.
fn spread(current: &[PartitionStock], partitions: u32, qty: u64) -> Vec<PartQty> {
    let n = partitions.max(1) as usize;
    let (base, extra) = (qty / n as u64, (qty % n as u64) as usize);
    let mut by_stock: Vec<usize> = (0..n).collect();
    by_stock.sort_by_key(|&p| (current.get(p).map_or(0, |s| s.on_hand), p));
    let mut out: Vec<PartQty> = (0..n).map(|p| PartQty { partition: partition_index(p), qty: base }).collect();
    for &p in by_stock.iter().take(extra) {
        out[p].qty += 1;
    }
    out.retain(|p| p.qty > 0);
    out
}

fn take_in_order(held: &Parts, qty: u64) -> Vec<PartQty> {
    let mut out = Vec::new();
    let mut need = qty;
    for (&partition, &have) in held {
        if need == 0 {
            break;
        }
        let take = have.min(need);
        out.push(PartQty { partition, qty: take });
        need -= take;
    }
    out
}

fn parts_minus(held: &Parts, taken: &[PartQty]) -> Vec<PartQty> {
    let mut rest = held.clone();
    subtract_parts(&mut rest, taken);
    parts_vec(&rest)
}

fn subtract_parts(held: &mut Parts, parts: &[PartQty]) {
    for p in parts {
        let have = held.get_mut(&p.partition).expect("apply: units are taken from a partition that holds them");
        *have = sub(*have, p.qty, "claim");
        if *have == 0 {
            held.remove(&p.partition);
        }
    }
}

fn bump_cut(parts: &[PartQty], cut: &mut [u64], left: &mut u64) -> u64 {
    let qty: u64 = parts.iter().map(|p| p.qty).sum();
    for p in parts {
        cut[p.partition as usize] += p.qty;
    }
    *left -= qty;
    qty
}

fn push_safety_release(events: &mut Vec<LedgerEvent>, location: &LocationId, parts: Vec<PartQty>, cause: SafetyCause) {
    if !parts.is_empty() {
        let qty = parts.iter().map(|p| p.qty).sum();
        events.push(LedgerEvent::SafetyReleased { location: location.clone(), qty, parts, cause });
    }
}

fn adjusted(location: &LocationId, delta: i64, parts: Vec<PartDelta>, audit: &Audit<'_>) -> LedgerEvent {
    LedgerEvent::Adjusted {
        location: location.clone(),
        delta,
        parts,
        reason: audit.reason.to_owned(),
        user: audit.user.to_owned(),
        at: audit.at,
    }
}

fn deltas(parts: Vec<PartQty>, sign: i64) -> Result<Vec<PartDelta>, LedgerError> {
    parts.into_iter().map(|p| Ok(PartDelta { partition: p.partition, delta: sign * signed(p.qty)? })).collect()
}

fn parts_vec(parts: &Parts) -> Vec<PartQty> {
    parts.iter().map(|(&partition, &qty)| PartQty { partition, qty }).collect()
}

fn parts_map(parts: &[PartQty]) -> Parts {
    let mut map = Parts::new();
    for p in parts {
        *map.entry_or_default(p.partition) += p.qty;
    }
    map
}

fn add_claims<'a>(
    claimed: &mut BTreeMap<(&'a LocationId, u32), u64>,
    location: &'a LocationId,
    parts: &Parts,
    who: &str,
) -> Result<(), String> {
    if parts.is_empty() || parts.values().any(|&q| q == 0) {
        return Err(format!("{who} has an empty claim at {location}"));
    }
    for (&p, &q) in parts {
        *claimed.entry((location, p)).or_default() += q;
    }
    Ok(())
}

fn location_snapshot(location: &LocationId, parts: &[PartitionStock]) -> LocationSnapshot {
    let partitions: Vec<PartitionSnapshot> = (0u32..)
        .zip(parts)
        .map(|(partition, s)| PartitionSnapshot {
            partition,
            on_hand: s.on_hand,
            reserved: s.reserved,
            safety: s.safety,
            available: s.available(),
            received: s.received,
            committed: s.committed,
            adjusted: s.adjusted,
        })
        .collect();
    LocationSnapshot {
        location: location.clone(),
        on_hand: partitions.iter().map(|p| p.on_hand).sum(),
        reserved: partitions.iter().map(|p| p.reserved).sum(),
        safety: partitions.iter().map(|p| p.safety).sum(),
        available: partitions.iter().map(|p| p.available).sum(),
        partitions,
    }
}

fn reservation_view(line: &LineId, claim: &LineClaim) -> ReservationView {
    let allocations: Vec<Allocation> = claim
        .holdings
        .iter()
        .map(|(location, parts)| Allocation { location: location.clone(), qty: parts.values().sum() })
        .collect();
    ReservationView {
        order: claim.order.clone(),
        line: line.clone(),
        qty: allocations.iter().map(|a| a.qty).sum(),
        allocations,
    }
}

fn positive(qty: Qty) -> Result<u64, LedgerError> {
    if qty == 0 { Err(LedgerError::ZeroQuantity) } else { Ok(u64::from(qty)) }
}

fn signed(qty: u64) -> Result<i64, LedgerError> {
    i64::try_from(qty).map_err(|_| LedgerError::Impossible(format!("{qty} units do not fit a signed count")))
}

fn check_audit(audit: &Audit<'_>) -> Result<(), LedgerError> {
    for (field, text) in [("reason", audit.reason), ("user", audit.user)] {
        if text.trim().is_empty() || text.len() > AUDIT_TEXT_LEN_MAX {
            return Err(LedgerError::InvalidAuditField { field });
        }
    }
    Ok(())
}

fn check_instruction_key(key: &str) -> Result<(), LedgerError> {
    if key.is_empty() || key.len() > INSTRUCTION_KEY_LEN_MAX {
        return Err(LedgerError::InvalidInstructionKey);
    }
    Ok(())
}

/// A stable partition hint from an id, for claims the caller gives no hint for.
fn hint_of(id: &str) -> u32 {
    (fnv1a(id.as_bytes()) % u64::from(PARTITIONS_MAX)) as u32
}

fn partition_index(p: usize) -> u32 {
    u32::try_from(p).expect("partition counts are bounded by PARTITIONS_MAX")
}

#[cfg(test)]
mod tests {
    use super::*;
    use LedgerCommand as C;
    use LedgerEvent as E;

    fn loc(s: &str) -> LocationId {
        LocationId::parse(s).expect("valid location id")
    }

    fn order(s: &str) -> OrderId {
        OrderId::parse(s).expect("valid order id")
    }

    fn line(s: &str) -> LineId {
        LineId::parse(s).expect("valid line id")
    }

    fn hold(s: &str) -> HoldId {
        HoldId::parse(s).expect("valid hold id")
    }

    fn cfg(partitions: u32, pct: u8) -> LedgerConfig {
        LedgerConfig::new(partitions, pct).expect("valid config")
    }

    fn receive(location: &str, qty: Qty) -> LedgerCommand {
        C::Receive { location: loc(location), qty }
    }

    /// Reserves for line `<o>:1` of order `o`.
    fn reserve(o: &str, qty: Qty, location: &str, partition_hint: u32) -> LedgerCommand {
        C::Reserve { order: order(o), line: line(&format!("{o}:1")), qty, location: loc(location), partition_hint }
    }

    fn commit(o: &str, qty: Qty, key: &str) -> LedgerCommand {
        C::Commit { line: line(&format!("{o}:1")), location: loc("WH-1"), qty, instruction_key: key.into() }
    }

    fn backorder(o: &str, qty: Qty, since: i64) -> LedgerCommand {
        C::Backorder { order: order(o), line: line(&format!("{o}:1")), qty, since: Timestamp(since) }
    }

    fn adjust(delta: i64) -> LedgerCommand {
        C::Adjust { location: loc("WH-1"), delta, reason: "damaged".into(), user: "ops-1".into(), at: Timestamp(5) }
    }

    fn create_hold(id: &str, qty: Qty, now: i64, ttl_ms: i64, jitter_offset_ms: i64) -> LedgerCommand {
        C::CreateHold { hold_id: hold(id), qty, location: None, now: Timestamp(now), ttl_ms, jitter_offset_ms }
    }

    fn given(cfg: &LedgerConfig, cmds: &[LedgerCommand]) -> SkuLedger {
        let mut ledger = SkuLedger::new(Sku::parse("SKU-1").expect("valid sku"));
        for cmd in cmds {
            when(&mut ledger, cfg, cmd).expect("the given commands are accepted");
        }
        ledger
    }

    /// Decides, applies and checks every invariant.
    fn when(ledger: &mut SkuLedger, cfg: &LedgerConfig, cmd: &LedgerCommand) -> Result<Vec<LedgerEvent>, LedgerError> {
        let events = ledger.decide(cmd, cfg)?;
        for ev in &events {
            ledger.apply(ev);
        }
        ledger.check_invariants().expect("invariants hold after every command");
        Ok(events)
    }

    fn pq(partition: u32, qty: u64) -> PartQty {
        PartQty { partition, qty }
    }

    fn numbers(ledger: &SkuLedger) -> (u64, u64, u64, u64) {
        let l = ledger.location(&loc("WH-1")).expect("WH-1 is known");
        (l.on_hand, l.reserved, l.safety, l.available)
    }

    #[test]
    fn receipt_is_spread_over_partitions_with_safety_held_back_per_partition() {
        let cfg = cfg(4, 5);
        let mut ledger = given(&cfg, &[]);
        let events = when(&mut ledger, &cfg, &receive("WH-1", 10)).expect("accepted");
        let parts = vec![
            PartReceipt { partition: 0, qty: 3, safety: 1 },
            PartReceipt { partition: 1, qty: 3, safety: 1 },
            PartReceipt { partition: 2, qty: 2, safety: 1 },
            PartReceipt { partition: 3, qty: 2, safety: 1 },
        ];
        assert_eq!(events, vec![E::Received { location: loc("WH-1"), qty: 10, parts }]);
        assert_eq!(numbers(&ledger), (10, 0, 4, 6));
        // The next odd units go to the partitions with the least on hand.
        let events = when(&mut ledger, &cfg, &receive("WH-1", 2)).expect("accepted");
        let E::Received { parts, .. } = &events[0] else { panic!("a receipt") };
        assert_eq!(parts.iter().map(|p| p.partition).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn reservation_starts_at_the_hinted_partition_and_falls_back_to_the_others() {
        let cfg = cfg(2, 0);
        let mut ledger = given(&cfg, &[receive("WH-1", 10)]);
        let events = when(&mut ledger, &cfg, &reserve("o1", 7, "WH-1", 3)).expect("accepted");
        assert_eq!(
            events,
            vec![E::Reserved {
                order: order("o1"),
                line: line("o1:1"),
                location: loc("WH-1"),
                qty: 7,
                parts: vec![pq(1, 5), pq(0, 2)],
                from_backorder: false,
            }]
        );
        assert_eq!(numbers(&ledger), (10, 7, 0, 3));
        let err = when(&mut ledger, &cfg, &reserve("o2", 4, "WH-1", 0)).expect_err("only 3 left");
        assert_eq!(err, LedgerError::Insufficient { available: 3 });
        assert!(err.is_rejected());
        let err = when(&mut ledger, &cfg, &reserve("o2", 1, "WH-9", 0)).expect_err("nothing there");
        assert_eq!(err, LedgerError::Insufficient { available: 0 });
    }

    #[test]
    fn safety_buffer_is_not_available() {
        let cfg = LedgerConfig::default();
        let mut ledger = given(&cfg, &[receive("WH-1", 100)]);
        assert_eq!(numbers(&ledger), (100, 0, 5, 95));
        let err = when(&mut ledger, &cfg, &reserve("o1", 96, "WH-1", 0)).expect_err("safety is held back");
        assert_eq!(err, LedgerError::Insufficient { available: 95 });
    }

    #[test]
    fn release_returns_what_the_line_holds_and_takes_it_off_the_backorder_queue() {
        let cfg = cfg(1, 0);
        let mut ledger = given(&cfg, &[receive("WH-1", 5), reserve("o1", 5, "WH-1", 0), backorder("o1", 3, 1)]);
        let events = when(&mut ledger, &cfg, &C::Release { line: line("o1:1") }).expect("accepted");
        assert_eq!(
            events,
            vec![
                E::Released {
                    order: order("o1"),
                    line: line("o1:1"),
                    location: loc("WH-1"),
                    qty: 5,
                    parts: vec![pq(0, 5)],
                    reason: ReleaseReason::Canceled,
                },
                E::BackorderCanceled { order: order("o1"), line: line("o1:1"), qty: 3 },
            ]
        );
        assert_eq!(numbers(&ledger), (5, 0, 0, 5));
        assert_eq!(ledger.reservation(&line("o1:1")), None);
        assert_eq!(ledger.backorders().count(), 0);
        let again = when(&mut ledger, &cfg, &C::Release { line: line("o1:1") }).expect("a repeated cancel is fine");
        assert_eq!(again, vec![]);
    }

    #[test]
    fn commit_takes_picked_units_out_and_releases_the_partition_safety() {
        let cfg = LedgerConfig::default();
        let mut ledger = given(&cfg, &[receive("WH-1", 100), reserve("o1", 10, "WH-1", 0)]);
        let events = when(&mut ledger, &cfg, &commit("o1", 4, "o1:1#1")).expect("accepted");
        assert_eq!(
            events,
            vec![
                E::Committed {
                    order: order("o1"),
                    line: line("o1:1"),
                    location: loc("WH-1"),
                    qty: 4,
                    parts: vec![pq(0, 4)],
                    instruction_key: "o1:1#1".into(),
                },
                E::SafetyReleased {
                    location: loc("WH-1"),
                    qty: 5,
                    parts: vec![pq(0, 5)],
                    cause: SafetyCause::PickConfirmed,
                },
            ]
        );
        assert_eq!(numbers(&ledger), (96, 6, 0, 90));
        assert_eq!(ledger.totals().committed, 4);
        assert_eq!(ledger.reservation(&line("o1:1")).map(|r| r.qty), Some(6));
    }

    #[test]
    fn a_duplicate_instruction_key_changes_nothing_even_after_the_line_closed() {
        let cfg = cfg(1, 0);
        let mut ledger = given(&cfg, &[receive("WH-1", 10), reserve("o1", 6, "WH-1", 0), commit("o1", 2, "k1")]);
        let before = ledger.clone();
        assert_eq!(when(&mut ledger, &cfg, &commit("o1", 2, "k1")), Ok(vec![]));
        assert_eq!(ledger, before);
        when(&mut ledger, &cfg, &commit("o1", 4, "k2")).expect("the rest is picked");
        assert_eq!(ledger.reservation(&line("o1:1")), None);
        assert_eq!(when(&mut ledger, &cfg, &commit("o1", 4, "k2")), Ok(vec![]));
        assert_eq!(when(&mut ledger, &cfg, &commit("o1", 2, "k1")), Ok(vec![]));
        assert_eq!(numbers(&ledger), (4, 0, 0, 4));
    }

    #[test]
    fn committing_more_than_the_line_holds_is_rejected() {
        let cfg = cfg(1, 0);
        let mut ledger = given(&cfg, &[receive("WH-1", 10), reserve("o1", 3, "WH-1", 0)]);
        let err = when(&mut ledger, &cfg, &commit("o1", 4, "k1")).expect_err("holds 3");
        assert_eq!(err, LedgerError::NotReserved { line: line("o1:1"), location: loc("WH-1"), reserved: 3 });
        let err = when(&mut ledger, &cfg, &commit("o9", 1, "k1")).expect_err("unknown line");
        assert!(matches!(err, LedgerError::NotReserved { reserved: 0, .. }));
        let err = when(&mut ledger, &cfg, &commit("o1", 1, "")).expect_err("no key");
        assert_eq!(err, LedgerError::InvalidInstructionKey);
    }

    #[test]
    fn a_short_pick_commits_what_was_found_and_writes_off_the_rest_from_safety_first() {
        let cfg = LedgerConfig::default();
        let mut ledger = given(&cfg, &[receive("WH-1", 100), reserve("o1", 10, "WH-1", 0)]);
        let short = C::Short {
            line: line("o1:1"),
            location: loc("WH-1"),
            qty: 10,
            qty_found: 7,
            instruction_key: "o1:1#1".into(),
            at: Timestamp(9),
        };
        let events = when(&mut ledger, &cfg, &short).expect("accepted");
        let (o, l, wh) = (order("o1"), line("o1:1"), loc("WH-1"));
        assert_eq!(
            events,
            vec![
                E::Committed {
                    order: o.clone(),
                    line: l.clone(),
                    location: wh.clone(),
                    qty: 7,
                    parts: vec![pq(0, 7)],
                    instruction_key: "o1:1#1".into(),
                },
                E::Released {
                    order: o.clone(),
                    line: l.clone(),
                    location: wh.clone(),
                    qty: 3,
                    parts: vec![pq(0, 3)],
                    reason: ReleaseReason::ShortPick,
                },
                E::SafetyReleased {
                    location: wh.clone(),
                    qty: 3,
                    parts: vec![pq(0, 3)],
                    cause: SafetyCause::ShortPick
                },
                E::Adjusted {
                    location: wh.clone(),
                    delta: -3,
                    parts: vec![PartDelta { partition: 0, delta: -3 }],
                    reason: SHORT_PICK_REASON.into(),
                    user: "pick:o1:1#1".into(),
                    at: Timestamp(9),
                },
                E::Shorted {
                    order: o,
                    line: l,
                    location: wh,
                    qty_found: 7,
                    qty_missing: 3,
                    instruction_key: "o1:1#1".into()
                },
            ]
        );
        // The buffer absorbed the loss: the rest of it stays held because counts are now in doubt.
        assert_eq!(numbers(&ledger), (90, 0, 2, 88));
        assert_eq!(when(&mut ledger, &cfg, &short), Ok(vec![]));
    }

    #[test]
    fn a_short_pick_touches_only_its_own_units_of_the_line() {
        // The line holds 10 at WH-1 from two reservations (two picks of 6 and 4);
        // the pick of 4 finds 1: 3 are written off, the other pick's 6 stay held.
        let cfg = cfg(1, 0);
        let mut ledger = given(&cfg, &[receive("WH-1", 20), reserve("o1", 6, "WH-1", 0), reserve("o1", 4, "WH-1", 0)]);
        let short = C::Short {
            line: line("o1:1"),
            location: loc("WH-1"),
            qty: 4,
            qty_found: 1,
            instruction_key: "o1:1#2".into(),
            at: Timestamp(0),
        };
        let events = when(&mut ledger, &cfg, &short).expect("accepted");
        let missing: u64 = events
            .iter()
            .map(|e| match e {
                E::Shorted { qty_missing, .. } => *qty_missing,
                _ => 0,
            })
            .sum();
        assert_eq!(missing, 3);
        assert_eq!(when(&mut ledger, &cfg, &commit("o1", 6, "o1:1#1")).map(|e| e.len()), Ok(1));
    }

    #[test]
    fn a_short_pick_finding_more_than_reserved_is_rejected() {
        let cfg = cfg(1, 0);
        let mut ledger = given(&cfg, &[receive("WH-1", 10), reserve("o1", 3, "WH-1", 0)]);
        let short = C::Short {
            line: line("o1:1"),
            location: loc("WH-1"),
            qty: 3,
            qty_found: 4,
            instruction_key: "k".into(),
            at: Timestamp(0),
        };
        assert_eq!(when(&mut ledger, &cfg, &short), Err(LedgerError::FoundMoreThanReserved { reserved: 3, found: 4 }));
    }

    #[test]
    fn a_loss_below_reserved_bumps_the_newest_reservation_into_the_backorder_queue() {
        let cfg = cfg(1, 0);
        let mut ledger = given(&cfg, &[receive("WH-1", 10), reserve("o1", 4, "WH-1", 0), reserve("o2", 4, "WH-1", 0)]);
        let events = when(&mut ledger, &cfg, &adjust(-5)).expect("a physical loss is never rejected");
        assert_eq!(
            events,
            vec![
                E::Released {
                    order: order("o2"),
                    line: line("o2:1"),
                    location: loc("WH-1"),
                    qty: 3,
                    parts: vec![pq(0, 3)],
                    reason: ReleaseReason::StockLoss,
                },
                E::Backordered {
                    order: order("o2"),
                    line: line("o2:1"),
                    qty: 3,
                    since: Timestamp(5),
                    cause: BackorderCause::StockLoss,
                },
                E::Adjusted {
                    location: loc("WH-1"),
                    delta: -5,
                    parts: vec![PartDelta { partition: 0, delta: -5 }],
                    reason: "damaged".into(),
                    user: "ops-1".into(),
                    at: Timestamp(5),
                },
            ]
        );
        assert_eq!(numbers(&ledger), (5, 5, 0, 0));
        assert_eq!(ledger.reservation(&line("o1:1")).map(|r| r.qty), Some(4));
        assert_eq!(ledger.reservation(&line("o2:1")).map(|r| r.qty), Some(1));
        assert_eq!(
            ledger.backorders().map(|b| (b.line.to_string(), b.qty)).collect::<Vec<_>>(),
            vec![("o2:1".to_owned(), 3)]
        );
    }

    #[test]
    fn a_loss_takes_free_stock_then_safety_then_cart_holds_before_orders() {
        let cfg = cfg(1, 10);
        let hold = create_hold("h1", 3, 0, 60_000, 0);
        let mut ledger = given(&cfg, &[receive("WH-1", 20), reserve("o1", 10, "WH-1", 0), hold]);
        assert_eq!(numbers(&ledger), (20, 13, 2, 5));
        let events = when(&mut ledger, &cfg, &adjust(-9)).expect("accepted");
        assert_eq!(events.len(), 3);
        assert!(matches!(&events[0], E::SafetyReleased { qty: 2, cause: SafetyCause::StockLoss, .. }));
        assert!(matches!(&events[1], E::HoldReleased { qty: 2, reason: HoldReleaseReason::StockLoss, .. }));
        assert!(matches!(&events[2], E::Adjusted { delta: -9, .. }));
        assert_eq!(numbers(&ledger), (11, 11, 0, 0));
        assert_eq!(ledger.hold(&hold_id("h1")).map(|h| h.qty), Some(1));
        assert_eq!(ledger.backorders().count(), 0);
    }

    #[test]
    fn restate_records_unexplained_on_hand_once() {
        let cfg = cfg(1, 0);
        let ledger = given(&cfg, &[receive("WH-1", 20), reserve("o1", 4, "WH-1", 0)]);
        // Someone lowers on hand in the stored ledger, behind the engine's back.
        let mut doc = serde_json::to_value(&ledger).expect("serializes");
        doc["stock"]["WH-1"][0]["on_hand"] = serde_json::json!(17);
        let mut ledger: SkuLedger = serde_json::from_value(doc).expect("deserializes");
        assert_eq!(ledger.drift(), vec![(loc("WH-1"), -3)]);
        let restate =
            C::Restate { location: loc("WH-1"), reason: "reconciliation".into(), user: "r".into(), at: Timestamp(9) };
        let events = when(&mut ledger, &cfg, &restate).expect("accepted");
        assert!(matches!(&events[..], [E::Restated { delta: -3, .. }]), "{events:?}");
        assert!(ledger.drift().is_empty());
        assert_eq!(ledger.check_invariants(), Ok(()));
        assert_eq!(ledger.totals().on_hand, 17);
        assert!(when(&mut ledger, &cfg, &restate).expect("accepted").is_empty(), "a second run records nothing");
    }

    fn hold_id(s: &str) -> HoldId {
        hold(s)
    }

    #[test]
    fn adjustments_are_audited_and_a_manual_one_cannot_go_below_zero() {
        let cfg = cfg(2, 5);
        let mut ledger = given(&cfg, &[receive("WH-1", 10)]);
        let mut cmd = adjust(-1);
        if let C::Adjust { reason, .. } = &mut cmd {
            reason.clear();
        }
        assert_eq!(when(&mut ledger, &cfg, &cmd), Err(LedgerError::InvalidAuditField { field: "reason" }));
        if let C::Adjust { reason, user, .. } = &mut cmd {
            *reason = "found".into();
            *user = " ".into();
        }
        assert_eq!(when(&mut ledger, &cfg, &cmd), Err(LedgerError::InvalidAuditField { field: "user" }));
        assert_eq!(when(&mut ledger, &cfg, &adjust(0)), Err(LedgerError::ZeroQuantity));
        assert_eq!(
            when(&mut ledger, &cfg, &adjust(-11)),
            Err(LedgerError::AdjustBelowZero { on_hand: 10, delta: -11 })
        );
        let events = when(&mut ledger, &cfg, &adjust(5)).expect("found stock");
        let E::Adjusted { parts, reason, user, .. } = &events[0] else { panic!("an adjustment") };
        assert_eq!(parts.iter().map(|p| p.delta).sum::<i64>(), 5);
        assert_eq!((reason.as_str(), user.as_str()), ("damaged", "ops-1"));
        assert_eq!(ledger.totals().adjusted, 5);
    }

    #[test]
    fn a_cycle_count_sets_on_hand_and_releases_safety() {
        let cfg = LedgerConfig::default();
        let mut ledger = given(&cfg, &[receive("WH-1", 100), reserve("o1", 10, "WH-1", 0)]);
        let count = |counted| C::CycleCount { location: loc("WH-1"), counted, user: "ops-2".into(), at: Timestamp(7) };
        let events = when(&mut ledger, &cfg, &count(97)).expect("accepted");
        assert!(matches!(&events[0], E::SafetyReleased { qty: 5, cause: SafetyCause::CycleCount, .. }));
        assert!(
            matches!(&events[1], E::Adjusted { delta: -3, reason, user, .. } if reason == CYCLE_COUNT_REASON && user == "ops-2")
        );
        assert_eq!(numbers(&ledger), (97, 10, 0, 87));
        // A count below what is reserved is never rejected: the newest reservation waits.
        when(&mut ledger, &cfg, &count(4)).expect("a count is the truth");
        assert_eq!(numbers(&ledger), (4, 4, 0, 0));
        assert_eq!(ledger.backorder(&line("o1:1")).map(|b| b.qty), Some(6));
        // A matching count is still recorded.
        let events = when(&mut ledger, &cfg, &count(4)).expect("accepted");
        assert!(matches!(&events[..], [E::Adjusted { delta: 0, .. }]));
    }

    #[test]
    fn a_hold_reserves_until_ttl_plus_jitter_and_is_consumed_once() {
        let cfg = cfg(1, 0);
        let mut ledger = given(&cfg, &[receive("WH-1", 10)]);
        let events = when(&mut ledger, &cfg, &create_hold("h1", 3, 1_000, 900_000, 60_000)).expect("accepted");
        assert!(
            matches!(&events[..], [E::HoldCreated { expires_at: Timestamp(961_000), qty: 3, location, .. }] if location == &loc("WH-1"))
        );
        assert_eq!(ledger.available(), 7);
        assert_eq!(ledger.next_expiry(), Some(Timestamp(961_000)));
        let consume = C::ConsumeHold { hold_id: hold("h1"), order: order("o1"), line: line("o1:1") };
        let events = when(&mut ledger, &cfg, &consume).expect("accepted");
        assert!(matches!(&events[..], [E::HoldConsumed { qty: 3, .. }]));
        assert_eq!(ledger.available(), 7, "a consumed hold is not reserved twice");
        assert_eq!(ledger.reservation(&line("o1:1")).map(|r| r.qty), Some(3));
        assert_eq!(ledger.next_expiry(), None);
        assert_eq!(when(&mut ledger, &cfg, &consume), Ok(vec![]));
        let other = C::ConsumeHold { hold_id: hold("h1"), order: order("o2"), line: line("o2:1") };
        assert_eq!(when(&mut ledger, &cfg, &other), Err(LedgerError::UnknownHold(hold("h1"))));
        assert_eq!(
            when(&mut ledger, &cfg, &create_hold("h2", 8, 0, 1, 0)),
            Err(LedgerError::Insufficient { available: 7 })
        );
        assert_eq!(when(&mut ledger, &cfg, &create_hold("h2", 1, 0, 0, 0)), Err(LedgerError::InvalidHoldTiming));
    }

    #[test]
    fn expiry_releases_exactly_the_holds_that_are_due() {
        let cfg = cfg(1, 0);
        let holds = [create_hold("h1", 2, 0, 100, 0), create_hold("h2", 3, 0, 100, 100)];
        let mut ledger = given(&cfg, &[receive("WH-1", 10), holds[0].clone(), holds[1].clone()]);
        assert_eq!(ledger.next_expiry(), Some(Timestamp(100)));
        let events = when(&mut ledger, &cfg, &C::ExpireHolds { now: Timestamp(150) }).expect("accepted");
        assert!(matches!(&events[..], [E::HoldExpired { hold_id, qty: 2, .. }] if hold_id == &hold("h1")));
        assert_eq!((ledger.available(), ledger.next_expiry()), (7, Some(Timestamp(200))));
        let events = when(&mut ledger, &cfg, &C::ExpireHolds { now: Timestamp(200) }).expect("accepted");
        assert_eq!(events.len(), 1);
        assert_eq!((ledger.available(), ledger.next_expiry(), ledger.hold_count()), (10, None, 0));
        assert_eq!(when(&mut ledger, &cfg, &C::ReleaseHold { hold_id: hold("h1") }), Ok(vec![]));
    }

    #[test]
    fn an_order_hold_never_expires_and_ends_only_when_consumed_or_released() {
        let cfg = cfg(1, 0);
        let order_hold =
            |id: &str, qty| C::CreateOrderHold { hold_id: hold(id), qty, location: loc("WH-1"), now: Timestamp(0) };
        let mut ledger = given(&cfg, &[receive("WH-1", 10), create_hold("cart", 1, 0, 100, 0)]);
        let events = when(&mut ledger, &cfg, &order_hold("o1.s1", 4)).expect("accepted");
        assert!(matches!(&events[..], [E::HoldCreated { expires_at: Timestamp::MAX, qty: 4, .. }]));
        when(&mut ledger, &cfg, &order_hold("o2.s1", 2)).expect("accepted");
        assert_eq!(ledger.next_expiry(), Some(Timestamp(100)), "only the cart hold is due at all");
        let late = Timestamp(Timestamp::MAX.0 - 1);
        let events = when(&mut ledger, &cfg, &C::ExpireHolds { now: late }).expect("accepted");
        assert!(matches!(&events[..], [E::HoldExpired { hold_id, .. }] if hold_id == &hold("cart")));
        assert_eq!((ledger.available(), ledger.next_expiry(), ledger.hold_count()), (4, None, 2));
        let consume = C::ConsumeHold { hold_id: hold("o1.s1"), order: order("o1"), line: line("o1:1") };
        assert!(matches!(&when(&mut ledger, &cfg, &consume).expect("accepted")[..], [E::HoldConsumed { qty: 4, .. }]));
        let release = C::ReleaseHold { hold_id: hold("o2.s1") };
        assert!(matches!(&when(&mut ledger, &cfg, &release).expect("accepted")[..], [E::HoldReleased { qty: 2, .. }]));
        assert_eq!((ledger.available(), ledger.hold_count()), (6, 0));
        assert_eq!(when(&mut ledger, &cfg, &order_hold("o3.s1", 7)), Err(LedgerError::Insufficient { available: 6 }));
        ledger.check_invariants().expect("invariants hold");
    }

    #[test]
    fn a_receipt_fills_backorders_oldest_first() {
        let cfg = cfg(1, 0);
        let mut ledger = given(&cfg, &[backorder("o1", 3, 1), backorder("o2", 2, 2), backorder("o3", 4, 3)]);
        let events = when(&mut ledger, &cfg, &receive("WH-1", 4)).expect("accepted");
        let fills: Vec<(String, u64, bool)> = events
            .iter()
            .filter_map(|e| match e {
                E::Reserved { line, qty, from_backorder, .. } => Some((line.to_string(), *qty, *from_backorder)),
                _ => None,
            })
            .collect();
        assert_eq!(fills, vec![("o1:1".into(), 3, true), ("o2:1".into(), 1, true)]);
        let queue: Vec<(String, u64)> = ledger.backorders().map(|b| (b.line.to_string(), b.qty)).collect();
        assert_eq!(queue, vec![("o2:1".to_owned(), 1), ("o3:1".to_owned(), 4)]);
        when(&mut ledger, &cfg, &receive("WH-1", 10)).expect("accepted");
        assert_eq!(ledger.backorders().count(), 0);
        assert_eq!(ledger.available(), 5);
        assert_eq!(ledger.reservation(&line("o2:1")).map(|r| r.qty), Some(2));
    }

    #[test]
    fn stock_freed_by_a_cancel_or_a_pick_goes_to_the_backorder_queue() {
        let cfg = cfg(1, 5);
        let mut ledger = given(&cfg, &[receive("WH-1", 20), reserve("o1", 19, "WH-1", 0), backorder("o2", 3, 1)]);
        let events = when(&mut ledger, &cfg, &commit("o1", 1, "k1")).expect("accepted");
        assert!(matches!(&events[1], E::SafetyReleased { qty: 1, .. }));
        assert!(matches!(&events[2], E::Reserved { qty: 1, from_backorder: true, .. }));
        let events = when(&mut ledger, &cfg, &C::Release { line: line("o1:1") }).expect("accepted");
        assert!(matches!(events.last(), Some(E::Reserved { qty: 2, from_backorder: true, .. })));
        assert_eq!(ledger.backorders().count(), 0);
        assert_eq!(ledger.reservation(&line("o2:1")).map(|r| r.qty), Some(3));
    }

    #[test]
    fn a_line_belongs_to_one_order() {
        let cfg = cfg(1, 0);
        let mut ledger = given(&cfg, &[receive("WH-1", 10), reserve("o1", 1, "WH-1", 0)]);
        let cmd =
            C::Reserve { order: order("o2"), line: line("o1:1"), qty: 1, location: loc("WH-1"), partition_hint: 0 };
        assert_eq!(
            when(&mut ledger, &cfg, &cmd),
            Err(LedgerError::LineOfOtherOrder { line: line("o1:1"), order: order("o1") })
        );
        assert_eq!(when(&mut ledger, &cfg, &receive("WH-1", 0)), Err(LedgerError::ZeroQuantity));
    }

    #[test]
    fn events_and_the_ledger_round_trip_through_json() {
        let cfg = cfg(2, 5);
        let mut ledger = given(&cfg, &[]);
        let mut log = Vec::new();
        for cmd in [receive("WH-1", 40), reserve("o1", 5, "WH-1", 1), commit("o1", 2, "k1"), backorder("o2", 1, 3)] {
            log.extend(when(&mut ledger, &cfg, &cmd).expect("accepted"));
        }
        let json = serde_json::to_string(&log).expect("serializable");
        assert!(json.contains(r#""type":"reserved""#) && json.contains(r#""from_backorder":false"#));
        let back: Vec<LedgerEvent> = serde_json::from_str(&json).expect("parses");
        assert_eq!(SkuLedger::from_events(ledger.sku().clone(), &back), ledger);
        let state: SkuLedger = serde_json::from_str(&serde_json::to_string(&ledger).expect("ok")).expect("parses");
        assert_eq!(state, ledger);
        assert_eq!(ledger.version(), log.len() as u64);
    }

    #[test]
    fn a_whole_document_with_stale_tickets_reads_as_the_same_queue() {
        let cfg = cfg(1, 0);
        let mut ledger = given(&cfg, &[]);
        for (i, o) in ["o1", "o2", "o3", "o4"].into_iter().enumerate() {
            when(&mut ledger, &cfg, &backorder(o, 2, i as i64)).expect("accepted");
        }
        let doc = serde_json::to_value(&ledger).expect("serializes");
        assert_eq!(doc["backorders"], serde_json::json!([[0, "o1:1"], [1, "o2:1"], [2, "o3:1"], [3, "o4:1"]]));
        assert_eq!(doc["backorder_entries"]["o3:1"][0], serde_json::json!(2));
        // Older versions left stale tickets in the FIFO (lines that left or
        // re-entered with a newer ticket): they are skipped.
        let mut old = doc.clone();
        old["backorders"] = serde_json::json!([[0, "o1:1"], [1, "o2:1"], [1, "o9:1"], [2, "o3:1"], [3, "o4:1"]]);
        let read: SkuLedger = serde_json::from_value(old).expect("deserializes");
        assert_eq!(read, ledger);
        assert_eq!(read.backorders().map(|b| b.line.to_string()).collect::<Vec<_>>(), ["o1:1", "o2:1", "o3:1", "o4:1"]);
        assert_eq!(read.check_invariants(), Ok(()));
        assert_eq!(serde_json::to_value(&read).expect("serializes"), doc);
        // A waiting line without its ticket in the FIFO is refused.
        let mut lost = doc.clone();
        lost["backorders"] = serde_json::json!([[0, "o1:1"], [2, "o3:1"], [3, "o4:1"]]);
        let err = serde_json::from_value::<SkuLedger>(lost).expect_err("inconsistent");
        assert!(err.to_string().contains("disagree"), "{err}");
        // So is one filed under another line.
        let mut moved = doc;
        moved["backorder_entries"]["o3:1"][1]["line"] = serde_json::json!("o5:1");
        assert!(serde_json::from_value::<SkuLedger>(moved).is_err());
    }

    #[test]
    fn the_snapshot_is_the_inventory_resource() {
        let cfg = cfg(2, 5);
        let ledger = given(&cfg, &[receive("WH-1", 40), receive("WH-2", 20), reserve("o1", 5, "WH-2", 0)]);
        let json = serde_json::to_value(ledger.snapshot()).expect("serializable");
        assert_eq!(json["sku"], "SKU-1");
        assert_eq!(json["available"], 38 + 13);
        let wh2 = &json["locations"][1];
        assert_eq!((wh2["location"].as_str(), wh2["on_hand"].as_u64()), (Some("WH-2"), Some(20)));
        assert_eq!(
            (wh2["reserved"].as_u64(), wh2["safety"].as_u64(), wh2["available"].as_u64()),
            (Some(5), Some(2), Some(13))
        );
        assert_eq!(ledger.available_at(&loc("WH-2")), 13);
    }

    #[test]
    fn config_values_are_range_checked() {
        assert!(LedgerConfig::new(0, 5).is_err());
        assert!(LedgerConfig::new(PARTITIONS_MAX + 1, 5).is_err());
        assert!(LedgerConfig::new(8, 101).is_err());
        let d = LedgerConfig::default();
        assert_eq!((d.partitions(), d.safety_stock_pct()), (1, 5));
        assert_eq!((d.safety_for(1), d.safety_for(20), d.safety_for(21), d.safety_for(0)), (1, 1, 2, 0));
        assert_eq!(cfg(1, 0).safety_for(1000), 0);
    }

    #[test]
    fn stored_pieces_follow_the_done_window_and_rebuild_the_ledger() {
        let cfg = cfg(1, 0);
        let mut ledger = given(&cfg, &[receive("WH-1", 10_000), backorder("late", 2, 1)]);
        let mut stored: BTreeMap<PieceKey, LedgerPiece> = BTreeMap::new();
        let mut store = |ledger: &mut SkuLedger| {
            for key in ledger.take_changes() {
                match ledger.piece(&key) {
                    Some(piece) => stored.insert(key, piece),
                    None => stored.remove(&key),
                };
            }
        };
        store(&mut ledger);
        let closed = DONE_KEYS_MAX + 10;
        for i in 0..closed {
            let o = format!("o-{i}");
            when(&mut ledger, &cfg, &reserve(&o, 1, "WH-1", 0)).expect("in stock");
            when(&mut ledger, &cfg, &commit(&o, 1, "k")).expect("picked");
            store(&mut ledger);
        }
        when(&mut ledger, &cfg, &reserve("open", 3, "WH-1", 0)).expect("in stock");
        store(&mut ledger);
        let done = stored.keys().filter(|k| matches!(k, PieceKey::Done(_))).count();
        assert_eq!(done, DONE_KEYS_MAX, "done keys that left the window are deleted");
        assert!(stored.contains_key(&PieceKey::Done(closed as u64 - 1)), "the newest is kept");
        assert!(!stored.contains_key(&PieceKey::Done(9)), "the oldest are gone");
        assert_eq!(stored.len(), DONE_KEYS_MAX + 2, "plus one open line and one waiting backorder");
        let rebuilt = SkuLedger::assemble(ledger.core(), stored.values().cloned()).expect("fits together");
        assert_eq!(rebuilt, ledger);
        assert_eq!(
            rebuilt.decide(&commit("o-4100", 1, "k"), &cfg),
            ledger.decide(&commit("o-4100", 1, "k"), &cfg),
            "a late duplicate is recognised the same way"
        );
        let mut gap = stored.clone();
        gap.remove(&PieceKey::Done(closed as u64 - 2));
        assert!(SkuLedger::assemble(ledger.core(), gap.into_values()).is_err(), "a missing done key is noticed");
    }
}
