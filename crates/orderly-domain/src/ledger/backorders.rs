//! The FIFO of lines waiting for stock in one SKU's ledger.
//!
//! A flash sale leaves most of its orders waiting here (990,500 lines for
//! 1,000,000 orders of 10,000 units), so the per-line cost is what counts:
//! one 48-byte slot per line in ticket order (ticket, line, quantity, since)
//! plus one index entry (line to ticket), and no allocation of its own. A
//! line id of the form every engine line has, `o-<UUID>:<n>` (lowercase,
//! hyphenated), is kept as its 16 UUID bytes and `n`, and its order id
//! `o-<UUID>` is derived, both spelled again when an entry is read. Any other
//! line id is kept as it is, with its order id when the line id does not name
//! it. Before, a waiting line also held its line id's bytes on the heap (64
//! bytes with the allocator's rounding), shared by the slot and the index.

use super::BackorderEntry;
use crate::ids::{LineId, OrderId};
use crate::time::Timestamp;
use std::collections::{BTreeMap, VecDeque};

/// Waiting lines in ticket order, with an index by line.
///
/// A line that leaves the queue leaves an empty slot behind; empty slots are
/// dropped from the front at once, and from anywhere when they outnumber the
/// live ones, so the queue stays O(live lines) and removal anywhere is
/// O(log n). A line is found by its ticket (the index) and a binary search
/// over the slots, whose tickets increase.
#[derive(Debug, Clone, Default)]
pub(crate) struct BackorderQueue {
    slots: VecDeque<Slot>,
    index: BTreeMap<Key, u64>,
}

#[derive(Debug, Clone)]
struct Slot {
    ticket: u64,
    /// `None` once the line has left the queue.
    entry: Option<Waiting>,
}

/// A [`BackorderEntry`] with its ids packed.
#[derive(Debug, Clone)]
struct Waiting {
    line: Line,
    qty: u64,
    since: Timestamp,
}

/// A waiting line's id, and its order id where the line id does not name it.
#[derive(Debug, Clone)]
enum Line {
    /// `o-<uuid>:<n>` of order `o-<uuid>`.
    Named { uuid: [u8; 16], n: u32 },
    /// Any other line id; the order id is `None` when it is the line id up
    /// to its last `:`.
    Other(Box<(LineId, Option<OrderId>)>),
}

/// A line id as the index keys it: the same packing as [`Line`], without
/// the order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Named([u8; 16], u32),
    Other(LineId),
}

impl Key {
    fn of(line: &LineId) -> Key {
        match named(line.as_str()) {
            Some((uuid, n)) => Key::Named(uuid, n),
            None => Key::Other(line.clone()),
        }
    }
}

/// The order id a line id names: the line id up to its last `:`.
fn order_part(line: &LineId) -> Option<&str> {
    line.as_str().rsplit_once(':').map(|(order, _)| order)
}

/// The UUID bytes and line number of `o-<uuid>:<n>`, if `line` is exactly
/// that spelling (lowercase hex, hyphens in place, `n` without a sign or a
/// leading zero), so that [`spell`] gives back the same string.
fn named(line: &str) -> Option<([u8; 16], u32)> {
    let rest = line.strip_prefix("o-")?;
    let (uuid, n) = rest.split_at_checked(36)?;
    let n = n.strip_prefix(':')?;
    if n.is_empty() || (n.len() > 1 && n.starts_with('0')) || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = n.parse().ok()?;
    Some((crate::ids::pack_uuid(uuid)?, n))
}

/// `o-<uuid>`, and `:<n>` after it when `n` is given.
fn spell(uuid: &[u8; 16], n: Option<u32>) -> String {
    let mut s = String::with_capacity(52);
    s.push_str("o-");
    crate::ids::push_uuid(&mut s, uuid);
    if let Some(n) = n {
        s.push(':');
        crate::ids::push_decimal(&mut s, u64::from(n));
    }
    s
}

impl Waiting {
    fn new(entry: BackorderEntry) -> Waiting {
        let BackorderEntry { order, line, qty, since } = entry;
        let names_order = order_part(&line) == Some(order.as_str());
        let line = match named(line.as_str()) {
            Some((uuid, n)) if names_order => Line::Named { uuid, n },
            _ => Line::Other(Box::new((line, (!names_order).then_some(order)))),
        };
        Waiting { line, qty, since }
    }

    fn line_id(&self) -> LineId {
        match &self.line {
            Line::Named { uuid, n } => {
                LineId::parse(spell(uuid, Some(*n))).expect("a packed line id was a line id when queued")
            }
            Line::Other(other) => other.0.clone(),
        }
    }

    fn key(&self) -> Key {
        match &self.line {
            Line::Named { uuid, n } => Key::Named(*uuid, *n),
            Line::Other(other) => Key::of(&other.0),
        }
    }

    fn entry(&self) -> BackorderEntry {
        self.entry_of(self.line_id())
    }

    /// The entry, given its line id (the caller's, so it is not spelled again).
    fn entry_of(&self, line: LineId) -> BackorderEntry {
        let order = match &self.line {
            Line::Named { uuid, .. } => {
                OrderId::parse(spell(uuid, None)).expect("a derived order id was an order id when queued")
            }
            Line::Other(other) => match &other.1 {
                Some(order) => order.clone(),
                None => {
                    let part = order_part(&other.0).expect("a line without its order id names it");
                    OrderId::parse(part).expect("a derived order id was an order id when queued")
                }
            },
        };
        BackorderEntry { order, line, qty: self.qty, since: self.since }
    }
}

impl BackorderQueue {
    /// Lines waiting.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// True when no line waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn position(&self, line: &LineId) -> Option<usize> {
        self.position_of(&Key::of(line))
    }

    fn position_of(&self, key: &Key) -> Option<usize> {
        let ticket = *self.index.get(key)?;
        self.slots.binary_search_by_key(&ticket, |s| s.ticket).ok()
    }

    /// A waiting line's ticket and entry.
    pub(crate) fn get(&self, line: &LineId) -> Option<(u64, BackorderEntry)> {
        let slot = &self.slots[self.position(line)?];
        slot.entry.as_ref().map(|w| (slot.ticket, w.entry_of(line.clone())))
    }

    /// The units a waiting line still wants, to change them.
    pub(crate) fn qty_mut(&mut self, line: &LineId) -> Option<&mut u64> {
        let i = self.position(line)?;
        self.slots[i].entry.as_mut().map(|w| &mut w.qty)
    }

    /// Queues a line at the back with a ticket newer than every queued one.
    /// Panics (a bug) if the ticket is not newer or the line already waits.
    pub(crate) fn push(&mut self, ticket: u64, entry: BackorderEntry) {
        assert!(self.slots.back().is_none_or(|s| s.ticket < ticket), "backorder tickets increase");
        let waiting = Waiting::new(entry);
        let known = self.index.insert(waiting.key(), ticket);
        assert!(known.is_none(), "a line waits once");
        self.slots.push_back(Slot { ticket, entry: Some(waiting) });
    }

    /// Builds a queue from entries in any order (a ledger read from its
    /// pieces or an older whole document).
    pub(crate) fn from_unordered(entries: impl IntoIterator<Item = (u64, BackorderEntry)>) -> Result<Self, String> {
        let mut queue = BackorderQueue::default();
        for (ticket, entry) in entries {
            queue.insert_unordered(ticket, entry)?;
        }
        queue.sort()?;
        Ok(queue)
    }

    /// Adds a line in any order; [`BackorderQueue::sort`] must run before
    /// the queue is used.
    pub(crate) fn insert_unordered(&mut self, ticket: u64, entry: BackorderEntry) -> Result<(), String> {
        let line = entry.line.clone();
        let waiting = Waiting::new(entry);
        if let Some(other) = self.index.insert(waiting.key(), ticket) {
            return Err(format!("backorder for {line} queued twice (tickets {other} and {ticket})"));
        }
        self.slots.push_back(Slot { ticket, entry: Some(waiting) });
        Ok(())
    }

    /// Puts lines added by [`BackorderQueue::insert_unordered`] in ticket
    /// order, in place.
    pub(crate) fn sort(&mut self) -> Result<(), String> {
        self.slots.make_contiguous().sort_unstable_by_key(|s| s.ticket);
        if let Some(w) = self.slots.iter().zip(self.slots.iter().skip(1)).find(|(a, b)| a.ticket == b.ticket) {
            return Err(format!("backorder ticket {} used twice", w.0.ticket));
        }
        Ok(())
    }

    /// Takes a line out of the queue; returns whether it waited.
    pub(crate) fn remove(&mut self, line: &LineId) -> bool {
        let key = Key::of(line);
        let Some(i) = self.position_of(&key) else { return false };
        self.index.remove(&key);
        self.slots[i].entry = None;
        self.compact();
        true
    }

    /// Drops empty slots from the front at once, and from anywhere when they
    /// outnumber live ones.
    fn compact(&mut self) {
        while self.slots.front().is_some_and(|s| s.entry.is_none()) {
            self.slots.pop_front();
        }
        if self.slots.len() > 2 * self.index.len() + 64 {
            self.slots.retain(|s| s.entry.is_some());
        }
    }

    /// Waiting lines with their tickets, oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, BackorderEntry)> + '_ {
        self.slots.iter().filter_map(|s| s.entry.as_ref().map(|w| (s.ticket, w.entry())))
    }

    /// The waiting lines' tickets and ids, oldest first.
    pub(crate) fn tickets(&self) -> impl Iterator<Item = (u64, LineId)> + '_ {
        self.slots.iter().filter_map(|s| s.entry.as_ref().map(|w| (s.ticket, w.line_id())))
    }

    /// The ids of the waiting lines, oldest first.
    pub(crate) fn lines(&self) -> impl Iterator<Item = LineId> + '_ {
        self.tickets().map(|(_, line)| line)
    }

    /// The newest live line's ticket.
    pub(crate) fn last_ticket(&self) -> Option<u64> {
        self.slots.iter().rev().find(|s| s.entry.is_some()).map(|s| s.ticket)
    }

    /// Checks that the slots and the index agree: tickets increase, every
    /// live slot is indexed under its line with its ticket, nothing else is
    /// (so no line waits twice), and no line waits for zero units.
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut last: Option<u64> = None;
        let mut live = 0usize;
        for slot in &self.slots {
            if last.is_some_and(|t| t >= slot.ticket) {
                return Err(format!("backorder ticket {} out of order", slot.ticket));
            }
            last = Some(slot.ticket);
            if let Some(w) = &slot.entry {
                live += 1;
                if self.index.get(&w.key()) != Some(&slot.ticket) {
                    return Err("the backorder queue and its index disagree".to_owned());
                }
                if w.qty == 0 {
                    return Err(format!("backorder entry for {} is empty", w.line_id()));
                }
                if let Line::Other(other) = &w.line {
                    let (line, order) = &**other;
                    if order.as_ref().is_some_and(|o| order_part(line) == Some(o.as_str())) {
                        return Err(format!("backorder for {line} keeps an order id its line names"));
                    }
                    if order.is_none() && order_part(line).is_none_or(|o| OrderId::parse(o).is_err()) {
                        return Err(format!("backorder for {line} names no order"));
                    }
                    if order.is_none() && named(line.as_str()).is_some() {
                        return Err(format!("backorder for {line} is not packed"));
                    }
                }
            }
        }
        if live != self.index.len() {
            return Err("the backorder queue and its index disagree".to_owned());
        }
        Ok(())
    }
}

impl PartialEq for BackorderQueue {
    /// The same lines waiting in the same order with the same tickets (empty
    /// slots not yet dropped are not part of the state).
    fn eq(&self, other: &BackorderQueue) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for BackorderQueue {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::OrderId;
    use crate::time::Timestamp;

    fn entry(n: u32, qty: u64) -> BackorderEntry {
        let order = OrderId::parse(format!("o{n}")).expect("order id");
        BackorderEntry { line: LineId::for_order(&order, 1), order, qty, since: Timestamp(i64::from(n)) }
    }

    fn line(n: u32) -> LineId {
        entry(n, 1).line
    }

    fn waiting(q: &BackorderQueue) -> Vec<(u64, String, u64)> {
        q.iter().map(|(t, e)| (t, e.line.to_string(), e.qty)).collect()
    }

    #[test]
    fn serves_in_ticket_order_and_removes_anywhere() {
        let mut q = BackorderQueue::default();
        for n in 0..1000 {
            q.push(u64::from(n) * 2, entry(n, 1 + u64::from(n % 3)));
        }
        assert_eq!(q.len(), 1000);
        assert_eq!(q.get(&line(500)).map(|(t, e)| (t, e.qty)), Some((1000, 3)));
        // Take out every odd line, then the head: order and lookups hold.
        for n in (1..1000).step_by(2) {
            assert!(q.remove(&line(n)));
            assert!(!q.remove(&line(n)), "removed once");
        }
        assert!(q.remove(&line(0)));
        q.check().expect("consistent");
        assert_eq!(q.len(), 499);
        assert!(q.slots.len() <= 2 * q.len() + 64, "empty slots are dropped");
        let tickets: Vec<u64> = q.iter().map(|(t, _)| t).collect();
        assert_eq!(tickets, (2..1000).step_by(2).map(|n| n * 2).collect::<Vec<u64>>());
        *q.qty_mut(&line(998)).expect("waits") = 7;
        assert_eq!(q.get(&line(998)).map(|(_, e)| e.qty), Some(7));
        assert_eq!(q.get(&line(1)), None);
        // Draining from the front leaves nothing behind.
        for n in (2..1000).step_by(2) {
            assert!(q.remove(&line(n)));
        }
        assert!(q.is_empty());
        assert!(q.slots.is_empty());
        q.check().expect("consistent");
    }

    #[test]
    fn builds_from_unordered_entries_equal_to_the_queue_it_came_from() {
        let mut q = BackorderQueue::default();
        for n in 0..300 {
            q.push(u64::from(n) + 10, entry(n, 1));
        }
        for n in (0..300).step_by(7) {
            q.remove(&line(n));
        }
        let mut entries: Vec<(u64, BackorderEntry)> = q.iter().collect();
        entries.reverse();
        entries.swap(3, 100);
        let rebuilt = BackorderQueue::from_unordered(entries).expect("valid");
        rebuilt.check().expect("consistent");
        assert_eq!(rebuilt, q);
        assert_eq!(waiting(&rebuilt), waiting(&q));
        assert!(rebuilt.slots.iter().all(|s| s.entry.is_some()), "no empty slot after a rebuild");
    }

    #[test]
    fn keeps_the_order_id_only_when_the_line_id_does_not_name_it() {
        let mut q = BackorderQueue::default();
        let named = entry(1, 2);
        let hashed_order = OrderId::parse("o-".to_owned() + &"x".repeat(62)).expect("order id");
        let hashed = BackorderEntry {
            line: LineId::for_order(&hashed_order, 3),
            order: hashed_order.clone(),
            qty: 1,
            since: Timestamp(5),
        };
        assert!(!hashed.line.as_str().starts_with("o-"), "a long order id's lines are hashed");
        let other = BackorderEntry {
            line: LineId::parse("o7:1").expect("line"),
            order: OrderId::parse("o8").expect("order"),
            qty: 1,
            since: Timestamp(6),
        };
        let plain = BackorderEntry {
            line: LineId::parse("free-form").expect("line"),
            order: OrderId::parse("o9").expect("order"),
            qty: 4,
            since: Timestamp(7),
        };
        for (t, e) in [(1, &named), (2, &hashed), (3, &other), (4, &plain)] {
            q.push(t, e.clone());
        }
        let kept: Vec<bool> = q
            .slots
            .iter()
            .map(|s| s.entry.as_ref().is_some_and(|w| matches!(&w.line, Line::Other(o) if o.1.is_some())))
            .collect();
        assert_eq!(kept, [false, true, true, true]);
        assert_eq!(q.iter().map(|(_, e)| e).collect::<Vec<_>>(), [named.clone(), hashed, other, plain]);
        assert_eq!(q.get(&named.line), Some((1, named)));
        q.check().expect("consistent");
    }

    #[test]
    fn rejects_a_line_or_ticket_queued_twice() {
        let twice = BackorderQueue::from_unordered([(1, entry(1, 1)), (2, entry(1, 1))]);
        assert!(twice.is_err_and(|e| e.contains("queued twice")));
        let ticket = BackorderQueue::from_unordered([(5, entry(1, 1)), (5, entry(2, 1))]);
        assert!(ticket.is_err_and(|e| e.contains("used twice")));
    }

    #[test]
    fn check_catches_a_line_waiting_twice_or_for_nothing() {
        let mut q = BackorderQueue::default();
        q.push(1, entry(1, 1));
        q.push(2, entry(2, 1));
        q.check().expect("consistent");
        // The same line in a second slot: the index names only one of them.
        q.slots[1].entry = q.slots[0].entry.clone();
        assert!(q.check().is_err_and(|e| e.contains("disagree")));
        let mut q = BackorderQueue::default();
        q.push(1, entry(1, 1));
        q.slots[0].entry.as_mut().expect("live").qty = 0;
        assert!(q.check().is_err_and(|e| e.contains("is empty")));
    }

    #[test]
    fn the_last_ticket_is_the_newest_live_lines() {
        let mut q = BackorderQueue::default();
        assert_eq!(q.last_ticket(), None);
        q.push(3, entry(1, 1));
        q.push(7, entry(2, 1));
        q.push(9, entry(3, 1));
        assert_eq!(q.last_ticket(), Some(9));
        assert!(q.remove(&line(3)));
        assert_eq!(q.last_ticket(), Some(7), "an empty slot left behind is not a ticket");
    }

    #[test]
    fn check_catches_an_index_that_disagrees() {
        let mut q = BackorderQueue::default();
        q.push(1, entry(1, 1));
        q.push(2, entry(2, 1));
        q.index.insert(Key::of(&line(3)), 9);
        assert!(q.check().is_err());
        q.index.remove(&Key::of(&line(3)));
        q.index.insert(Key::of(&line(2)), 1);
        assert!(q.check().is_err());
    }

    /// An engine order id: `o-` and a lowercase hyphenated UUID.
    fn uuid_order(n: u32) -> OrderId {
        OrderId::parse(format!("o-01a21ee6-7032-7eeb-9f95-{n:012x}")).expect("order id")
    }

    #[test]
    fn engine_line_ids_are_packed_without_an_allocation_and_read_back_exactly() {
        assert!(std::mem::size_of::<Slot>() <= 48, "a slot is {} bytes", std::mem::size_of::<Slot>());
        let mut q = BackorderQueue::default();
        let mut entries = Vec::new();
        for n in 0..200u32 {
            let order = uuid_order(n);
            let e = BackorderEntry { line: LineId::for_order(&order, 1 + n % 3), order, qty: 1, since: Timestamp(7) };
            q.push(u64::from(n), e.clone());
            entries.push(e);
        }
        assert!(q.slots.iter().all(|s| matches!(s.entry.as_ref().map(|w| &w.line), Some(Line::Named { .. }))));
        assert_eq!(q.iter().map(|(_, e)| e).collect::<Vec<_>>(), entries);
        assert_eq!(q.lines().collect::<Vec<_>>(), entries.iter().map(|e| e.line.clone()).collect::<Vec<_>>());
        assert_eq!(q.get(&entries[150].line), Some((150, entries[150].clone())));
        assert!(q.remove(&entries[150].line));
        assert_eq!(q.get(&entries[150].line), None);
        q.check().expect("consistent");
        let rebuilt = BackorderQueue::from_unordered(q.iter().collect::<Vec<_>>().into_iter().rev()).expect("valid");
        assert_eq!(rebuilt, q);
    }

    #[test]
    fn only_the_exact_engine_spelling_is_packed() {
        let uuid = "01a21ee6-7032-7eeb-9f95-516aef505eb3";
        for packed in [format!("o-{uuid}:1"), format!("o-{uuid}:0"), format!("o-{uuid}:4294967295")] {
            let (bytes, n) = named(&packed).unwrap_or_else(|| panic!("{packed} is packed"));
            assert_eq!(spell(&bytes, Some(n)), packed);
            assert_eq!(spell(&bytes, None), format!("o-{uuid}"));
        }
        for kept in [
            format!("o-{}:1", uuid.to_uppercase()),
            format!("o-{uuid}:01"),
            format!("o-{uuid}:"),
            format!("o-{uuid}:+1"),
            format!("o-{uuid}:4294967296"),
            format!("o-{uuid}1:1"),
            format!("o-{}:1", uuid.replace('-', "_")),
            format!("x-{uuid}:1"),
            format!("o-{uuid}"),
            "o-01a21ee6-7032-7eeb-9f95-516aef505eb:1".to_owned(),
            "o-01a21ee6-7032-7eeb-9f95-516aef505ebg:1".to_owned(),
            "o-é1a21ee6-7032-7eeb-9f95-516aef505eb:1".to_owned(),
        ] {
            assert_eq!(named(&kept), None, "{kept} is kept as it is");
        }
    }

    #[test]
    fn a_packable_line_of_another_order_keeps_its_order() {
        let mut q = BackorderQueue::default();
        let line = LineId::for_order(&uuid_order(1), 1);
        let e = BackorderEntry { line: line.clone(), order: uuid_order(2), qty: 3, since: Timestamp(1) };
        q.push(1, e.clone());
        assert!(matches!(&q.slots[0].entry.as_ref().expect("waits").line, Line::Other(o) if o.1.is_some()));
        assert_eq!(q.get(&line), Some((1, e)));
        q.check().expect("consistent");
        assert!(q.remove(&line));
        assert!(q.is_empty());
    }
}
