//! A tiny seeded random number generator (SplitMix64) for scripted faults.
//!
//! Written here rather than taken from `rand` so that a seed replays the same
//! fault sequence forever, whatever version of a library is resolved.

/// A SplitMix64 generator: fast, tiny, and fully determined by its seed.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator that starts from `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// A generator for one named stream of `seed`, so that each carrier draws
    /// its own sequence whatever traffic the others see.
    pub(crate) fn for_stream(seed: u64, name: &str) -> Self {
        SplitMix64::new(seed ^ fnv1a(name.as_bytes()))
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform draw in `[0, 1)`.
    pub(crate) fn next_unit(&mut self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// FNV-1a, to turn a stream name into seed bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let mut a = SplitMix64::for_stream(7, "fastship");
        let mut b = SplitMix64::for_stream(7, "fastship");
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }

    #[test]
    fn streams_differ() {
        let mut a = SplitMix64::for_stream(7, "fastship");
        let mut b = SplitMix64::for_stream(7, "slowpost");
        assert_ne!(a.next_u64(), b.next_u64());
    }

    #[test]
    fn unit_draws_stay_in_range() {
        let mut rng = SplitMix64::new(42);
        for _ in 0..10_000 {
            let x = rng.next_unit();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
