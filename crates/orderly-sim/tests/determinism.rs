//! Same seed, same run, byte for byte: every outbox and every stored
//! document (the fingerprint), the faults, the final states, the counters.

use orderly_sim::SimConfig;

#[test]
fn a_seed_replays_exactly() {
    let config = SimConfig { steps: 120, ..SimConfig::default() };
    for seed in [7, 1_000_003] {
        let first = orderly_sim::run_seed(&config, seed);
        let second = orderly_sim::run_seed(&config, seed);
        assert!(!first.fingerprint.is_empty());
        assert_eq!(first, second, "seed {seed} did not replay exactly");
    }
}

#[test]
fn different_seeds_differ() {
    let config = SimConfig { steps: 40, ..SimConfig::default() };
    let a = orderly_sim::run_seed(&config, 11);
    let b = orderly_sim::run_seed(&config, 12);
    assert_ne!(a.fingerprint, b.fingerprint);
}
