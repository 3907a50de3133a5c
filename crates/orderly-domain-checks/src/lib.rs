//! Property tests (`tests/*_props.rs`) and micro-benchmarks (`benches/hot_paths.rs`)
//! of `orderly-domain`. They live in this crate, not in the domain crate, so that
//! proptest and criterion (and through them rand and getrandom) never show up in
//! `cargo tree -p orderly-domain`. The library itself is empty.
