//! Allocator tuning for the process (glibc only).
//!
//! glibc's malloc gives threads that allocate at the same time their own
//! arenas, up to eight per core. The engine allocates on the async workers
//! and frees on the blocking threads that commit (and the other way round), so
//! freed memory is spread over many arenas that each keep it for reuse: in a
//! flash sale the resident size grew well beyond the live heap. Two arenas
//! (one per core on the reference machine) keep contention low and the
//! resident size close to what is live.

/// Arenas glibc may create, unless `MALLOC_ARENA_MAX` says otherwise.
pub const ARENAS_MAX: i32 = 2;

/// Applies the tuning. Call first thing in `main`, before any thread starts.
/// Returns whether glibc took the limit (false elsewhere, or when
/// `MALLOC_ARENA_MAX` is set: glibc reads that itself).
pub fn tune() -> bool {
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
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_arena_limit() {
        let configured = std::env::var_os("MALLOC_ARENA_MAX").is_some();
        assert_eq!(super::tune(), !configured, "mallopt(M_ARENA_MAX) refused");
    }
}
