//! The PostgreSQL store against a real server: the shared store contract,
//! persistence across reconnects, schema isolation, batch edge cases, the
//! optimistic version path and error mapping.

mod common;

use common::{TestSchema, event, row};
use orderly_engine::ports::{Batch, Store, StoreError};
use orderly_store_postgres::{Expect, PgStore};

const POOL: u32 = 4;

#[tokio::test]
async fn postgres_store_meets_the_contract() {
    let Some(schema) = TestSchema::new("contract").await else { return };
    let store = PgStore::connect(&schema.url, &schema.name, POOL).await.expect("connect");
    orderly_engine::contract::check_store(&store).await;
    store.close().await;
}

#[tokio::test]
async fn reconnecting_keeps_committed_state_and_schema() {
    let Some(schema) = TestSchema::new("reopen").await else { return };
    {
        let store = PgStore::connect(&schema.url, &schema.name, POOL).await.expect("connect");
        orderly_engine::contract::check_store(&store).await;
        store.close().await;
    }
    let store = PgStore::connect(&schema.url, &schema.name, POOL).await.expect("reconnect");
    assert_eq!(store.outbox_head().await.expect("head"), 5, "the five events check_store committed");
    assert_eq!(store.cursor("inventory").await.expect("cursor"), 9);
    assert!(store.inbox_contains("x-1").await.expect("inbox"));
    let (a, version) = store.get_versioned("things", "a").await.expect("get").expect("a exists");
    assert_eq!(a.doc, b"{\"v\":2}".to_vec());
    assert_eq!(version, 2, "a was put twice");
    let head = store.commit(Batch { outbox: vec![event("e6", "o-4", 1)], ..Batch::default() }).await.expect("commit");
    assert_eq!(head, 6, "positions continue densely after the failed duplicate commits");
    store.close().await;
}

#[tokio::test]
async fn two_schemas_are_isolated() {
    let Some(one) = TestSchema::new("iso").await else { return };
    let two = one.sibling("b");
    let a = PgStore::connect(&one.url, &one.name, POOL).await.expect("connect a");
    let b = PgStore::connect(&two.url, &two.name, POOL).await.expect("connect b");
    a.commit(Batch {
        puts: vec![row("k", Some("open"), "{}")],
        outbox: vec![event("same-id", "o-1", 1)],
        cursors: vec![("orders".into(), 5)],
        inbox: vec!["in-1".into()],
        ..Batch::default()
    })
    .await
    .expect("commit a");
    assert!(b.get("things", "k").await.expect("get").is_none());
    assert_eq!(b.outbox_head().await.expect("head"), 0);
    assert_eq!(b.cursor("orders").await.expect("cursor"), 0);
    assert!(!b.inbox_contains("in-1").await.expect("inbox"));
    assert!(b.count_by_idx("things").await.expect("count").is_empty());
    let head = b.commit(Batch { outbox: vec![event("same-id", "o-1", 1)], ..Batch::default() }).await;
    assert_eq!(head.expect("an event id is unique per schema only"), 1);
    assert_eq!(a.outbox_head().await.expect("head"), 1);
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn duplicate_event_ids_in_one_batch_conflict_and_leave_nothing() {
    let Some(schema) = TestSchema::new("dupbatch").await else { return };
    let store = PgStore::connect(&schema.url, &schema.name, POOL).await.expect("connect");
    let failed = store
        .commit(Batch {
            puts: vec![row("k", None, "{}")],
            outbox: vec![event("e1", "o-1", 1), event("e1", "o-1", 2)],
            cursors: vec![("orders".into(), 3)],
            inbox: vec!["in".into()],
            ..Batch::default()
        })
        .await;
    assert!(matches!(failed, Err(StoreError::Conflict(_))), "got {failed:?}");
    assert_eq!(store.outbox_head().await.expect("head"), 0);
    assert!(store.get("things", "k").await.expect("get").is_none());
    assert_eq!(store.cursor("orders").await.expect("cursor"), 0);
    assert!(!store.inbox_contains("in").await.expect("inbox"));
    store.close().await;
}

#[tokio::test]
async fn batches_with_repeats_behave_like_sequential_writes() {
    let Some(schema) = TestSchema::new("repeats").await else { return };
    let store = PgStore::connect(&schema.url, &schema.name, POOL).await.expect("connect");
    let head = store
        .commit(Batch {
            puts: vec![row("a", Some("x"), "1"), row("a", Some("y"), "2"), row("gone", None, "{}")],
            deletes: vec![("things", "gone".into()), ("things", "gone".into()), ("things", "never".into())],
            cursors: vec![("p".into(), 4), ("p".into(), 9), ("p".into(), 2)],
            inbox: vec!["i".into(), "i".into()],
            ..Batch::default()
        })
        .await
        .expect("commit");
    assert_eq!(head, 0, "no events: head stays 0");
    let a = store.get("things", "a").await.expect("get").expect("a");
    assert_eq!((a.idx.as_deref(), a.doc.as_slice()), (Some("y"), b"2".as_slice()), "last put wins");
    assert!(store.get("things", "gone").await.expect("get").is_none(), "put then delete: deleted");
    assert_eq!(store.cursor("p").await.expect("cursor"), 9, "highest cursor wins");
    let replayed = store.commit(Batch { inbox: vec!["i".into()], ..Batch::default() }).await;
    assert!(
        matches!(replayed, Err(StoreError::Conflict(_))),
        "an inbox id already there: another replica handled the event first: {replayed:?}"
    );
    store
        .commit(Batch { cursors: vec![("p".into(), 5)], ..Batch::default() })
        .await
        .expect("an older cursor is accepted");
    assert_eq!(store.cursor("p").await.expect("cursor"), 9, "a cursor never moves back");
    assert_eq!(store.commit(Batch::default()).await.expect("empty batch"), 0);
    store.close().await;
}

#[tokio::test]
async fn scans_page_in_byte_order_whatever_the_server_locale() {
    let Some(schema) = TestSchema::new("order").await else { return };
    let store = PgStore::connect(&schema.url, &schema.name, POOL).await.expect("connect");
    let keys = ["b", "B", "a", "A", "_", "ä", "10", "9"];
    let puts = keys.iter().map(|k| row(k, Some("i"), "{}")).collect();
    store.commit(Batch { puts, ..Batch::default() }).await.expect("commit");
    let mut expected: Vec<&str> = keys.to_vec();
    expected.sort_unstable();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.scan("things", Some("i"), after.as_deref(), 3).await.expect("scan");
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        seen.extend(page.into_iter().map(|r| r.key));
    }
    assert_eq!(seen, expected);
    store.close().await;
}

#[tokio::test]
async fn expected_versions_guard_commits() {
    let Some(schema) = TestSchema::new("versions").await else { return };
    let store = PgStore::connect(&schema.url, &schema.name, POOL).await.expect("connect");
    let expect = |key: &str, version| Expect { table: "things", key: key.into(), version };
    let put = |key: &str, doc: &str, id: &str| Batch {
        puts: vec![row(key, None, doc)],
        outbox: vec![event(id, key, 1)],
        ..Batch::default()
    };

    store.commit_expecting(put("p", "1", "e1"), &[expect("p", 0)]).await.expect("create when absent");
    let stale = store.commit_expecting(put("p", "2", "e2"), &[expect("p", 0)]).await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "exists already: {stale:?}");
    store.commit_expecting(put("p", "2", "e3"), &[expect("p", 1)]).await.expect("update at version 1");
    let stale = store.commit_expecting(put("p", "3", "e4"), &[expect("p", 1)]).await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "moved on to 2: {stale:?}");
    let other = store.commit_expecting(put("q", "1", "e5"), &[expect("p", 7)]).await;
    assert!(matches!(other, Err(StoreError::Conflict(_))), "a read dependency is checked too: {other:?}");

    let (p, version) = store.get_versioned("things", "p").await.expect("get").expect("p");
    assert_eq!((p.doc.as_slice(), version), (b"2".as_slice(), 2));
    assert!(store.get("things", "q").await.expect("get").is_none(), "failed commits write nothing");
    assert_eq!(store.outbox_head().await.expect("head"), 2, "failed commits append nothing");
    store.close().await;
}

#[tokio::test]
async fn bad_schema_names_and_unreachable_servers_are_unavailable() {
    let refused = PgStore::connect("postgres://postgres@127.0.0.1:5432/test", "Bad-Name", 1).await;
    assert!(matches!(refused, Err(StoreError::Unavailable(_))), "{refused:?}");
    let refused = PgStore::connect("not a url", "fine", 1).await;
    assert!(matches!(refused, Err(StoreError::Unavailable(_))), "{refused:?}");
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    let refused = PgStore::connect("postgres://postgres@127.0.0.1:1/test", "fine", 1).await;
    assert!(matches!(refused, Err(StoreError::Unavailable(_))), "{refused:?}");
}

#[tokio::test]
async fn replicas_numbering_events_from_a_stale_head_get_their_real_positions() {
    let Some(schema) = TestSchema::new("renumber").await else { return };
    let store = PgStore::connect(&schema.url, &schema.name, POOL).await.expect("connect");
    // Replica a and replica b both believe the head is 0 and number their
    // `emit`ted events 1, 2 from it; a commits first.
    let batch = |ids: [&str; 2]| Batch {
        outbox: vec![event(ids[0], "o-1", 1), event(ids[1], "o-2", 2)],
        assumed_head: Some(0),
        ..Batch::default()
    };
    assert_eq!(store.commit(batch(["a1", "a2"])).await.expect("a commits"), 2);
    assert_eq!(store.commit(batch(["b1", "b2"])).await.expect("b commits"), 4);
    let all = store.outbox_after(0, 10).await.expect("outbox");
    let seqs: Vec<(u64, u64)> = all.iter().map(|r| (r.position, r.envelope.sequence)).collect();
    assert_eq!(seqs, vec![(1, 1), (2, 2), (3, 3), (4, 4)], "b's events renumbered from the real head");
    // An event with its own sequence (an aggregate's version) keeps it.
    let own = Batch { outbox: vec![event("c1", "o-1", 7)], assumed_head: Some(0), ..Batch::default() };
    store.commit(own).await.expect("commit");
    let last = store.outbox_after(4, 10).await.expect("outbox");
    assert_eq!((last[0].position, last[0].envelope.sequence), (5, 7));
    store.close().await;
}

#[tokio::test]
async fn many_inbox_ids_are_looked_up_in_one_read() {
    let Some(schema) = TestSchema::new("inbox_many").await else { return };
    let store = PgStore::connect(&schema.url, &schema.name, POOL).await.expect("connect");
    let none = store.inbox_contains_many(&[]).await.expect("empty");
    assert_eq!(none, Some(Default::default()), "nothing asked, nothing found");
    store.commit(Batch { inbox: vec!["in-1".into(), "in-3".into()], ..Batch::default() }).await.expect("commit");
    let found = store.inbox_contains_many(&["in-1", "in-2", "in-3", "in-1"]).await.expect("lookup").expect("supported");
    let mut found: Vec<String> = found.into_iter().collect();
    found.sort();
    assert_eq!(found, vec!["in-1".to_owned(), "in-3".to_owned()]);
    for (id, there) in [("in-1", true), ("in-2", false), ("in-3", true)] {
        assert_eq!(store.inbox_contains(id).await.expect("inbox"), there, "{id}: the one-id read agrees");
    }
    store.close().await;
}
