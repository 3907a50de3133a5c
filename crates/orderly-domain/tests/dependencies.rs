//! Pins the domain crate's dependency list: the pure core must never pull in
//! I/O, async, clocks or randomness. Adding a dependency here is a design
//! decision; make it in this list on purpose.

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

fn section<'a>(manifest: &'a str, header: &str) -> Vec<&'a str> {
    manifest
        .lines()
        .skip_while(|l| l.trim() != header)
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with('['))
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .collect()
}
