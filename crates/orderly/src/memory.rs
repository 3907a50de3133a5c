//! Allocator tuning for the process.
//!
//! The `orderly` binary allocates through mimalloc (the `mimalloc` feature,
//! on by default; its `#[global_allocator]` is in `main.rs`). glibc spends
//! about a fifth of a flash sale's CPU in `malloc_consolidate`,
//! `unlink_chunk` and `_int_free`; mimalloc takes about a quarter less CPU in
//! all and about 40% more throughput, for a somewhat larger resident size
//! (README, Performance). Two of its defaults are changed to keep that growth
//! small: arenas are committed as they are used, not up front, and freed
//! pages go back to the OS at once instead of after a second.
//!
//! glibc's malloc still serves SQLite's own C allocations, and all of them
//! in a build without the feature (`--no-default-features`). It gives
//! threads that allocate at the same time their own arenas, up to eight per
//! core. The engine allocates on the async workers and frees on the blocking
//! threads that commit (and the other way round), so freed memory is spread
//! over many arenas that each keep it for reuse: in a flash sale the resident
//! size grew well beyond the live heap. Two arenas (one per core on the
//! reference machine) keep contention low and the resident size close to
//! what is live.

/// Arenas glibc may create, unless `MALLOC_ARENA_MAX` says otherwise.
pub const ARENAS_MAX: i32 = 2;

/// mimalloc's options this sets to 0, unless their variable is set: the
/// option's number (`mi_option_t` in `mimalloc.h`, v3), its variable and its
/// default.
#[cfg(feature = "mimalloc")]
const MIMALLOC_OPTIONS: [(libmimalloc_sys::mi_option_t, &str, std::ffi::c_long); 2] = [
    (4, "MIMALLOC_ARENA_EAGER_COMMIT", 2), // mi_option_arena_eager_commit
    (15, "MIMALLOC_PURGE_DELAY", 1000),    // mi_option_purge_delay, milliseconds
];

/// Applies the tuning. Call first thing in `main`, before any thread starts.
/// Returns whether glibc took the arena limit (false elsewhere, or when
/// `MALLOC_ARENA_MAX` is set: glibc reads that itself).
pub fn tune() -> bool {
    #[cfg(feature = "mimalloc")]
    for (option, var, _) in MIMALLOC_OPTIONS {
        if std::env::var_os(var).is_none() {
            // SAFETY: sets one of mimalloc's options; not thread safe, and
            // called before any other thread exists.
            unsafe { libmimalloc_sys::mi_option_set(option, 0) };
        }
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a parameter of the allocator; called
        // before any other thread exists, so no allocation races with it.
        // A refusal (0) leaves glibc's default, which is only slower to shrink.
        return unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENAS_MAX) } == 1;
    }
    false
}

#[cfg(test)]
mod tests {
    /// The only test that calls `tune` in this process. With the `mimalloc`
    /// feature it first checks that the option numbers are the ones with
    /// mimalloc's documented defaults, then that the zeros took.
    #[test]
    fn the_allocators_take_the_tuning() {
        #[cfg(feature = "mimalloc")]
        for (option, var, default) in super::MIMALLOC_OPTIONS {
            if std::env::var_os(var).is_none() {
                // SAFETY: reads an option; nothing sets options concurrently.
                let value = unsafe { libmimalloc_sys::mi_option_get(option) };
                assert_eq!(value, default, "option {option} is not {var}");
            }
        }
        let configured = std::env::var_os("MALLOC_ARENA_MAX").is_some();
        let took = super::tune();
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        assert_eq!(took, !configured, "mallopt(M_ARENA_MAX) refused");
        let _ = (took, configured);
        #[cfg(feature = "mimalloc")]
        for (option, var, _) in super::MIMALLOC_OPTIONS {
            if std::env::var_os(var).is_none() {
                // SAFETY: reads an option; the setter ran above on this thread.
                assert_eq!(unsafe { libmimalloc_sys::mi_option_get(option) }, 0, "{var} not taken");
            }
        }
    }
}
