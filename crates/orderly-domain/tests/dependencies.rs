//! Pins the domain crate's dependency list: the pure core must never pull in
//! I/O, async, clocks or randomness. Adding a dependency here is a design
//! decision; make it in this list on purpose. Dev-dependencies that bring in
//! randomness (proptest, criterion, rand, getrandom) are refused too, so that
//! `cargo tree -p orderly-domain` stays free of them.

const ALLOWED: &[&str] = &["serde", "serde_json", "thiserror"];
const FORBIDDEN: &[&str] = &[
    "tokio",
    "sqlx",
    "rusqlite",
    "reqwest",
    "async-nats",
    "rand",
    "axum",
    "hyper",
    "futures",
    "chrono",
    "time",
    "uuid",
    "getrandom",
];

#[test]
fn domain_dependencies_are_pinned() {
    let manifest = include_str!("../Cargo.toml");
    let deps = section(manifest, "[dependencies]");
    let mut names: Vec<&str> =
        deps.iter().filter_map(|l| l.split(['=', '.']).next()).map(str::trim).filter(|n| !n.is_empty()).collect();
    names.sort_unstable();
    assert_eq!(names, ALLOWED, "the domain crate's dependencies changed");
    for bad in FORBIDDEN {
        assert!(!names.contains(bad), "{bad} must never be a domain dependency");
    }
}

/// Never allowed even as dev-dependencies: they pull rand and getrandom into
/// `cargo tree -p orderly-domain`. Property tests and benchmarks of the domain
/// live in `crates/orderly-domain-checks` instead.
const FORBIDDEN_DEV: &[&str] = &["proptest", "criterion", "rand", "getrandom"];

#[test]
fn domain_dev_dependencies_pull_in_no_randomness() {
    let manifest = include_str!("../Cargo.toml");
    let names: Vec<&str> = section(manifest, "[dev-dependencies]")
        .iter()
        .filter_map(|l| l.split(['=', '.']).next())
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    for bad in FORBIDDEN_DEV {
        assert!(
            !names.contains(bad),
            "{bad} must not be a dev-dependency of the domain crate; put such tests in orderly-domain-checks"
        );
    }
}

fn section<'a>(manifest: &'a str, header: &str) -> Vec<&'a str> {
    manifest
        .lines()
        .skip_while(|l| l.trim() != header)
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .collect()
}
