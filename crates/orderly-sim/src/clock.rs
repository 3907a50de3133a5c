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
    /// A clock starting at [`EPOCH_MS`] now.
    ///
    /// # Panics
    /// Outside a tokio runtime: `Instant::now()` would then read the real
    /// clock, not the runtime's paused one, and every later reading would be
    /// off by however long the thread took to enter the runtime (so a seed
    /// would not replay across processes).
    pub fn new() -> VirtualClock {
        assert!(
            tokio::runtime::Handle::try_current().is_ok(),
            "VirtualClock::new must be called inside the simulation's (paused) runtime"
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("a runtime")
    }

    #[test]
    #[should_panic(expected = "inside the simulation's (paused) runtime")]
    fn refuses_to_start_outside_a_runtime() {
        let _ = VirtualClock::new();
    }

    #[test]
    fn reads_paused_time_however_late_the_runtime_is_entered() {
        let rt = paused_runtime();
        std::thread::sleep(std::time::Duration::from_millis(3));
        rt.block_on(async {
            let clock = VirtualClock::new();
            assert_eq!(clock.now(), Timestamp(EPOCH_MS));
            tokio::time::advance(std::time::Duration::from_millis(1_500)).await;
            assert_eq!(clock.now(), Timestamp(EPOCH_MS + 1_500));
            clock.jump(-500);
            assert_eq!(clock.now(), Timestamp(EPOCH_MS + 1_000));
        });
    }
}
