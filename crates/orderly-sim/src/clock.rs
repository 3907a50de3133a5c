//! The virtual clock: tokio's paused time (moved only by the simulator with
//! `tokio::time::advance`) plus a jump offset, so worker sleeps and carrier
//! timeouts follow the same time the services read, and clock jumps move
//! wall time without firing monotonic timers.

use orderly_domain::Timestamp;
use orderly_engine::ports::Clock;
use std::sync::atomic::{AtomicI64, Ordering};
use tokio::time::Instant;

/// Wall time at the start of every simulation (2026-09-21T…Z): fixed, so runs replay.
pub const EPOCH_MS: i64 = 1_790_000_000_000;

/// A clock that reads tokio's (paused) time since the simulation started.
#[derive(Debug)]
pub struct VirtualClock {
    start: Instant,
    jump_ms: AtomicI64,
}

impl VirtualClock {
    /// A clock starting at [`EPOCH_MS`] now. Call inside the simulation's runtime.
    pub fn new() -> VirtualClock {
        VirtualClock { start: Instant::now(), jump_ms: AtomicI64::new(0) }
    }

    /// Moves wall time by `ms` (either way) without moving monotonic time.
    pub fn jump(&self, ms: i64) {
        self.jump_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Timestamp {
        let elapsed = i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX);
        Timestamp(EPOCH_MS.saturating_add(elapsed).saturating_add(self.jump_ms.load(Ordering::SeqCst)))
    }
}
