//! The store contract: behaviour every [`Store`] adapter must show. Each
//! adapter's tests call [`check_store`] on a fresh, empty store, so SQLite,
//! PostgreSQL and memory are held to one definition.

use crate::ports::{Batch, GreatestKey, Row, Store};
use orderly_domain::Timestamp;
use orderly_domain::event::{Envelope, EventType};

fn event(id: &str, subject: &str, seq: u64) -> Envelope {
    Envelope::new(
        id.into(),
        "/orderly/test",
        EventType::OrderCreated,
        subject,
        Timestamp(1_000),
        seq,
        serde_json::json!({"n": seq}),
    )
}

fn row(key: &str, idx: Option<&str>, doc: &str) -> Row {
    Row { table: "things", key: key.into(), idx: idx.map(str::to_owned), doc: doc.as_bytes().to_vec() }
}

/// Runs every contract check against `store`, which must start empty.
/// Panics (it is test support) with the name of the failed check.
pub async fn check_store(store: &dyn Store) {
    assert_eq!(store.outbox_head().await.expect("head"), 0, "empty outbox starts at 0");
    assert_eq!(store.cursor("orders").await.expect("cursor"), 0, "unknown cursor is 0");

    let head = store
        .commit(Batch {
            puts: vec![row("a", Some("open"), "{\"v\":1}"), row("b", Some("done"), "{}"), row("c", Some("open"), "{}")],
            outbox: vec![event("e1", "o-1", 1), event("e2", "o-2", 1), event("e3", "o-1", 2)],
            cursors: vec![("inventory".into(), 7)],
            inbox: vec!["x-1".into()],
            ..Batch::default()
        })
        .await
        .expect("commit");
    assert_eq!(head, 3, "commit returns the outbox head");
    assert_eq!(store.outbox_head().await.expect("head"), 3);

    let got = store.get("things", "a").await.expect("get").expect("row a exists");
    assert_eq!(got.doc, b"{\"v\":1}".to_vec());
    assert_eq!(got.idx.as_deref(), Some("open"));
    assert!(store.get("things", "zz").await.expect("get").is_none(), "missing row is None");
    assert!(store.get("other", "a").await.expect("get").is_none(), "tables are separate");

    // Many keys at once, across tables: the present ones with their versions.
    let mut many = store
        .get_many_versioned(&[("things", "c"), ("things", "zz"), ("other", "a"), ("things", "a")])
        .await
        .expect("get many");
    many.sort_by(|x, y| x.0.key.cmp(&y.0.key));
    let keys: Vec<(&str, &str, u64)> = many.iter().map(|(r, v)| (r.table, r.key.as_str(), *v)).collect();
    assert_eq!(keys, vec![("things", "a", 1), ("things", "c", 1)], "get_many: present rows only, with versions");
    assert_eq!(many[0].0, got, "get_many reads the same row as get");
    assert!(store.get_many_versioned(&[]).await.expect("get many").is_empty());

    let open: Vec<String> =
        store.scan("things", Some("open"), None, 10).await.expect("scan").into_iter().map(|r| r.key).collect();
    assert_eq!(open, vec!["a", "c"], "scan by index, key order");
    let page: Vec<String> =
        store.scan("things", None, Some("a"), 1).await.expect("scan").into_iter().map(|r| r.key).collect();
    assert_eq!(page, vec!["b"], "scan pages after a key");
    let counts = store.count_by_idx("things").await.expect("count");
    assert_eq!(counts, vec![("done".to_owned(), 1), ("open".to_owned(), 2)]);

    // The greatest key, in byte order ("a" sorts after "Z"), where known.
    store
        .commit(Batch {
            puts: ["Z", "a"].map(|k| Row { table: "ordering", key: k.into(), idx: None, doc: b"{}".to_vec() }).into(),
            ..Batch::default()
        })
        .await
        .expect("commit");
    for (table, want) in [("things", "c"), ("ordering", "a")] {
        match store.greatest_key(table).await.expect("greatest key") {
            GreatestKey::Unknown => {}
            GreatestKey::Key(k) => assert_eq!(k, want, "greatest key of {table}"),
            GreatestKey::Empty => panic!("{table} has rows"),
        }
    }
    let none = store.greatest_key("other").await.expect("greatest key");
    assert!(matches!(none, GreatestKey::Unknown | GreatestKey::Empty), "a table without rows: {none:?}");

    let after = store.outbox_after(1, 10).await.expect("outbox");
    assert_eq!(after.iter().map(|r| r.position).collect::<Vec<_>>(), vec![2, 3], "outbox after a position");
    assert_eq!(after[0].envelope, event("e2", "o-2", 1), "envelope round-trips");
    let o1 = store.outbox_for_subject("o-1", 10).await.expect("subject");
    assert_eq!(o1.iter().map(|r| r.envelope.sequence).collect::<Vec<_>>(), vec![1, 2], "per-subject history in order");

    assert_eq!(store.cursor("inventory").await.expect("cursor"), 7);
    assert!(store.inbox_contains("x-1").await.expect("inbox"));
    assert!(!store.inbox_contains("x-2").await.expect("inbox"));

    store
        .commit(Batch {
            puts: vec![row("a", Some("done"), "{\"v\":2}")],
            deletes: vec![("things", "b".into())],
            cursors: vec![("inventory".into(), 9)],
            ..Batch::default()
        })
        .await
        .expect("second commit");
    assert!(store.get("things", "b").await.expect("get").is_none(), "delete");
    assert_eq!(store.get("things", "a").await.expect("get").expect("a").idx.as_deref(), Some("done"), "replace");
    assert_eq!(store.cursor("inventory").await.expect("cursor"), 9, "cursor advances");

    let dup = store.commit(Batch { outbox: vec![event("e1", "o-9", 1)], ..Batch::default() }).await;
    assert!(dup.is_err(), "an event id is unique in the outbox");
    assert_eq!(store.outbox_head().await.expect("head"), 3, "a failed commit leaves nothing behind");

    // A commit that hands its events back: the same events, in order, stored.
    let written = vec![event("e4", "o-3", 1), event("e5", "o-3", 2)];
    let (head, durable, events) = store
        .commit_visible_returning_events(Batch { outbox: written.clone(), ..Batch::default() })
        .await
        .expect("commit returning events");
    assert_eq!(head, 5, "the head after the two events");
    assert_eq!(durable.then_head(head).await.expect("durable"), 5);
    assert_eq!(events, written, "the events come back as written, in order");
    let stored: Vec<Envelope> =
        store.outbox_after(3, 10).await.expect("outbox").into_iter().map(|r| r.envelope).collect();
    assert_eq!(stored, written, "and they are stored");
    let dup = store.commit_visible_returning_events(Batch { outbox: vec![event("e4", "o-9", 1)], ..Batch::default() });
    assert!(dup.await.is_err(), "a failed commit hands nothing back");
    assert_eq!(store.outbox_head().await.expect("head"), 5);
    assert!(store.get("things", "a").await.expect("get").is_some());
    check_ledger_table(store).await;
    check_versions(store).await;
}

/// Optimistic concurrency: a document's version is 1 when first put and
/// grows by one per put; a batch whose `expect` does not hold is a conflict
/// and writes nothing; expecting 0 means "absent".
async fn check_versions(store: &dyn Store) {
    use crate::ports::{Expect, StoreError};
    let put =
        |key: &str, doc: &str| Row { table: "versioned", key: key.into(), idx: Some("i".into()), doc: doc.into() };
    let expect = |key: &str, version| Expect { table: "versioned", key: key.into(), version };
    let batch = |rows: Vec<Row>, expect: Vec<Expect>| Batch { puts: rows, expect, ..Batch::default() };

    store.commit(batch(vec![put("p", "1")], vec![expect("p", 0)])).await.expect("create when absent");
    let (row, version) = store.get_versioned("versioned", "p").await.expect("get").expect("p exists");
    assert_eq!((row.doc.as_slice(), version), (b"1".as_slice(), 1), "first put is version 1");
    let stale = store.commit(batch(vec![put("p", "2")], vec![expect("p", 0)])).await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "expected absent but present: {stale:?}");
    store.commit(batch(vec![put("p", "2")], vec![expect("p", 1)])).await.expect("update at version 1");
    let stale = store.commit(batch(vec![put("p", "3"), put("q", "1")], vec![expect("p", 1)])).await;
    assert!(matches!(stale, Err(StoreError::Conflict(_))), "a stale version conflicts: {stale:?}");
    assert!(store.get("versioned", "q").await.expect("get").is_none(), "a conflicting batch writes nothing");
    let other = store.commit(batch(vec![put("q", "1")], vec![expect("p", 7)])).await;
    assert!(matches!(other, Err(StoreError::Conflict(_))), "a precondition on another document: {other:?}");
    let scanned = store.scan_versioned("versioned", Some("i"), None, 10).await.expect("scan");
    let versions: Vec<(String, u64)> = scanned.into_iter().map(|(r, v)| (r.key, v)).collect();
    assert_eq!(versions, vec![("p".to_owned(), 2)], "scan reports versions");
    let delete = Batch { deletes: vec![("versioned", "p".into())], expect: vec![expect("p", 1)], ..Batch::default() };
    assert!(matches!(store.commit(delete).await, Err(StoreError::Conflict(_))), "a stale delete conflicts");
    let delete = Batch { deletes: vec![("versioned", "p".into())], expect: vec![expect("p", 2)], ..Batch::default() };
    store.commit(delete).await.expect("delete at the current version");
    assert!(store.get_versioned("versioned", "p").await.expect("get").is_none());
    store.commit(batch(vec![put("p", "9")], vec![expect("p", 0)])).await.expect("absent again after a delete");
}

/// A hot SKU's ledger stored in pieces: a commit writes only what changed
/// (not the whole backorder queue), reading it back (across scan pages)
/// gives the same ledger, a failed commit leaves the stored one intact, and a
/// whole-document ledger from an older version is read and rewritten in
/// pieces.
async fn check_ledger_table(store: &dyn Store) {
    use crate::table::{LEDGER_PIECES, LEDGERS, LedgerTable, Staged, read_ledger};
    use orderly_domain::ledger::{LedgerCommand, LedgerConfig, SkuLedger};
    use orderly_domain::{LineId, LocationId, OrderId, Sku};

    let cfg = LedgerConfig::new(2, 0).expect("config");
    let sku = Sku::parse("HOT-1").expect("sku");
    let run = |ledger: &mut SkuLedger, cmd: LedgerCommand| {
        for ev in ledger.decide(&cmd, &cfg).expect("accepted") {
            ledger.apply(&ev);
        }
    };
    let backorder = |i: u32| LedgerCommand::Backorder {
        order: OrderId::parse(format!("o-{i}")).expect("order"),
        line: LineId::parse(format!("o-{i}:1")).expect("line"),
        qty: 1,
        since: Timestamp(i64::from(i)),
    };
    let mut table = LedgerTable::new(10);
    table.insert(sku.to_string(), SkuLedger::new(sku.clone()));
    let queued = 2_500u32; // more than one page of pieces
    for i in 0..queued {
        run(table.get_mut(sku.as_str()).expect("cached"), backorder(i));
    }
    let mut batch = Batch::default();
    table.stage(&mut batch).expect("stage");
    store.commit(batch).await.expect("commit the queue");
    table.committed();

    // One more backorder and a receipt that fills three: a handful of rows.
    run(table.get_mut(sku.as_str()).expect("cached"), backorder(queued));
    run(
        table.get_mut(sku.as_str()).expect("cached"),
        LedgerCommand::Receive { location: LocationId::parse("WH-1").expect("loc"), qty: 3 },
    );
    let mut batch = Batch::default();
    table.stage(&mut batch).expect("stage");
    assert!(batch.puts.len() + batch.deletes.len() <= 12, "a batch writes O(changes) rows, not the queue");
    store.commit(batch).await.expect("commit the change");
    table.committed();
    let live = table.get(sku.as_str()).expect("cached").clone();
    let stored = read_ledger(store, sku.as_str()).await.expect("read").expect("stored");
    assert!(!stored.whole, "stored in pieces");
    assert_eq!(stored.ledger, live, "the pieces rebuild the live ledger");
    assert_eq!(stored.ledger.backorders().count(), queued as usize - 2, "FIFO queue kept");
    assert_eq!(
        stored.ledger.backorders().next().map(|b| b.line.to_string()),
        Some("o-3:1".to_owned()),
        "the oldest waiting line is first"
    );

    // A failed commit (a duplicate outbox id) leaves the stored ledger as it was.
    run(table.get_mut(sku.as_str()).expect("cached"), backorder(queued + 1));
    let mut batch = Batch { outbox: vec![event("e1", "o-1", 9)], ..Batch::default() };
    table.stage(&mut batch).expect("stage");
    assert!(store.commit(batch).await.is_err(), "duplicate event id");
    table.rollback();
    assert!(table.load(store, sku.as_str()).await.expect("reload"), "reloaded after the rollback");
    assert_eq!(table.get(sku.as_str()), Some(&live), "the cache is back to what is stored");

    // A whole document from before pieces existed.
    let mut old_ledger = SkuLedger::new(Sku::parse("OLD-1").expect("sku"));
    run(&mut old_ledger, backorder(1));
    run(&mut old_ledger, backorder(2));
    run(&mut old_ledger, LedgerCommand::Receive { location: LocationId::parse("WH-2").expect("loc"), qty: 1 });
    assert_eq!(old_ledger.reservations().len(), 1, "the oldest line was filled");
    let doc = serde_json::to_vec(&old_ledger).expect("whole ledger");
    store
        .commit(Batch { puts: vec![Row { table: LEDGERS, key: "OLD-1".into(), idx: None, doc }], ..Batch::default() })
        .await
        .expect("commit a whole ledger");
    let mut table = LedgerTable::new(10);
    assert!(table.load(store, "OLD-1").await.expect("load"));
    let mut batch = Batch::default();
    table.stage(&mut batch).expect("stage");
    assert!(batch.puts.iter().any(|r| r.table == LEDGER_PIECES), "rewritten in pieces");
    store.commit(batch).await.expect("commit the rewrite");
    table.committed();
    let stored = read_ledger(store, "OLD-1").await.expect("read").expect("stored");
    assert!(!stored.whole);
    assert_eq!(stored.ledger.backorders().count(), 1);
    assert_eq!(stored.ledger, old_ledger, "the same ledger, now in pieces");
}
