//! Several writers on one schema at once: consumers reading the outbox by
//! position see every event exactly once, migrations may race safely, and
//! version checks stop lost updates.

mod common;

use common::{TestSchema, event, row};
use orderly_engine::ports::{Batch, Store, StoreError};
use orderly_store_postgres::{Expect, PgStore};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// How long a concurrency test may take before it is declared stuck.
const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_never_let_a_position_reader_skip_an_event() {
    let Some(schema) = TestSchema::new("gaps").await else { return };
    const WRITERS_PER_STORE: usize = 3;
    const COMMITS_PER_WRITER: usize = 40;
    let stores = [
        PgStore::connect(&schema.url, &schema.name, 4).await.expect("connect one"),
        PgStore::connect(&schema.url, &schema.name, 4).await.expect("connect two"),
    ];
    let reader = PgStore::connect(&schema.url, &schema.name, 2).await.expect("connect reader");

    let mut writers = JoinSet::new();
    for (s, store) in stores.iter().enumerate() {
        for w in 0..WRITERS_PER_STORE {
            let store = store.clone();
            writers.spawn(async move { write_events(&store, s, w, COMMITS_PER_WRITER).await });
        }
    }
    let (stop, stop_rx) = tokio::sync::watch::channel(None);
    let consumer = tokio::spawn(async move { consume(&reader, stop_rx).await });

    let mut written = BTreeSet::new();
    while let Some(ids) = writers.join_next().await {
        written.extend(ids.expect("writer task"));
    }
    let head = stores[0].outbox_head().await.expect("head");
    stop.send_replace(Some(head));
    let consumed = consumer.await.expect("consumer task");

    let positions: Vec<u64> = consumed.iter().map(|(position, _)| *position).collect();
    let ids: Vec<&String> = consumed.iter().map(|(_, id)| id).collect();
    let unique: BTreeSet<String> = ids.iter().map(|id| (*id).clone()).collect();
    assert_eq!(unique.len(), ids.len(), "no event was delivered twice");
    assert_eq!(unique, written, "the consumer saw every committed event: none was skipped");
    assert_eq!(positions, (1..=head).collect::<Vec<_>>(), "positions are dense and read in order");
    for store in &stores {
        store.close().await;
    }
}

/// One writer: `commits` batches of 1 to 4 events, each also putting a
/// document shared with other writers and its own cursor.
async fn write_events(store: &PgStore, s: usize, w: usize, commits: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for c in 0..commits {
        let events: Vec<_> = (0..=(c % 4)).map(|i| event(&format!("s{s}-w{w}-c{c}-{i}"), "o", 1)).collect();
        ids.extend(events.iter().map(|e| e.id.clone()));
        let batch = Batch {
            puts: vec![row(&format!("shared-{}", c % 2), None, "{}"), row(&format!("own-{s}-{w}"), None, "{}")],
            outbox: events,
            cursors: vec![(format!("producer-{s}-{w}"), c as u64)],
            ..Batch::default()
        };
        let head = store.commit(batch).await.expect("commit");
        assert!(head >= ids.len() as u64, "the head counts at least our own events");
    }
    ids
}

/// A consumer as the embedded bus runs one: read `position > cursor`, move the
/// cursor to the last record read, repeat; until told the final head and
/// caught up with it. Returns (position, event id) in the order read.
async fn consume(reader: &PgStore, mut stop: tokio::sync::watch::Receiver<Option<u64>>) -> Vec<(u64, String)> {
    let mut consumed = Vec::new();
    let mut cursor = 0u64;
    let started = Instant::now();
    loop {
        let page = reader.outbox_after(cursor, 50).await.expect("outbox_after");
        if let Some(last) = page.last() {
            cursor = last.position;
        }
        let caught_up = page.is_empty();
        consumed.extend(page.into_iter().map(|r| (r.position, r.envelope.id)));
        if caught_up {
            if stop.borrow().is_some_and(|end| cursor >= end) {
                reader.close().await;
                return consumed;
            }
            assert!(started.elapsed() < DEADLINE, "consumer stuck at {cursor}");
            // A consumer's polling interval, not synchronisation: it wakes early when told to stop.
            let _ = tokio::time::timeout(Duration::from_millis(2), stop.changed()).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_connects_migrate_once() {
    let Some(schema) = TestSchema::new("migrate").await else { return };
    let mut connects = JoinSet::new();
    for _ in 0..4 {
        let (url, name) = (schema.url.clone(), schema.name.clone());
        connects.spawn(async move { PgStore::connect(&url, &name, 1).await });
    }
    let mut stores = Vec::new();
    while let Some(store) = connects.join_next().await {
        stores.push(store.expect("task").expect("every racing connect succeeds"));
    }
    let mut again = JoinSet::new();
    for store in &stores {
        let store = store.clone();
        again.spawn(async move { store.migrate().await });
    }
    while let Some(version) = again.join_next().await {
        assert_eq!(version.expect("task").expect("migrate again"), 1);
    }
    let applied =
        schema.admin_scalar(format!("SELECT count(*) FROM \"{}\"._sqlx_migrations WHERE success", schema.name)).await;
    assert_eq!(applied, 1, "each migration is recorded once");
    let heads = schema.admin_scalar(format!("SELECT count(*) FROM \"{}\".outbox_head", schema.name)).await;
    assert_eq!(heads, 1, "the head row was seeded once");
    orderly_engine::contract::check_store(&stores[0]).await;
    for store in &stores {
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn version_checks_prevent_lost_updates() {
    let Some(schema) = TestSchema::new("lostupd").await else { return };
    const TASKS: u64 = 4;
    const INCREMENTS: u64 = 15;
    let store = PgStore::connect(&schema.url, &schema.name, 8).await.expect("connect");
    let mut tasks = JoinSet::new();
    for _ in 0..TASKS {
        let store = store.clone();
        tasks.spawn(async move {
            let mut conflicts = 0u64;
            let mut done = 0;
            let started = Instant::now();
            while done < INCREMENTS {
                assert!(started.elapsed() < DEADLINE, "no progress");
                let current = store.get_versioned("things", "counter").await.expect("get");
                let (value, version) = match current {
                    Some((row, version)) => (parse_counter(&row.doc), version),
                    None => (0, 0),
                };
                let batch = Batch { puts: vec![row("counter", None, &(value + 1).to_string())], ..Batch::default() };
                let expect = [Expect { table: "things", key: "counter".into(), version }];
                match store.commit_expecting(batch, &expect).await {
                    Ok(_) => done += 1,
                    Err(StoreError::Conflict(_)) => conflicts += 1,
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            conflicts
        });
    }
    let mut conflicts = 0;
    while let Some(c) = tasks.join_next().await {
        conflicts += c.expect("task");
    }
    let (row, version) = store.get_versioned("things", "counter").await.expect("get").expect("counter");
    assert_eq!(parse_counter(&row.doc), TASKS * INCREMENTS, "no increment was lost ({conflicts} conflicts retried)");
    assert_eq!(version, TASKS * INCREMENTS);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_one_of_racing_creators_wins() {
    let Some(schema) = TestSchema::new("create").await else { return };
    let store = PgStore::connect(&schema.url, &schema.name, 8).await.expect("connect");
    for round in 0..10 {
        let key = format!("k{round}");
        let mut tasks = JoinSet::new();
        for t in 0..4 {
            let (store, key) = (store.clone(), key.clone());
            tasks.spawn(async move {
                let batch = Batch { puts: vec![row(&key, None, &t.to_string())], ..Batch::default() };
                store.commit_expecting(batch, &[Expect { table: "things", key, version: 0 }]).await
            });
        }
        let mut wins = 0;
        while let Some(result) = tasks.join_next().await {
            match result.expect("task") {
                Ok(_) => wins += 1,
                Err(StoreError::Conflict(_)) => {}
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!(wins, 1, "round {round}: exactly one creator wins");
        let (_, version) = store.get_versioned("things", &key).await.expect("get").expect("created");
        assert_eq!(version, 1);
    }
    store.close().await;
}

fn parse_counter(doc: &[u8]) -> u64 {
    std::str::from_utf8(doc).ok().and_then(|s| s.parse().ok()).expect("counter documents hold a number")
}
