//! Committing a batch: one transaction, one multi-row statement per kind of
//! change (arrays bound once and expanded with `unnest`), and outbox positions
//! assigned under the `outbox_head` row lock so they appear in commit order.
//!
//! Order inside the transaction matters:
//! 1. expected versions are checked, locking the documents they name;
//! 2. documents are upserted and deleted, cursors and inbox written
//!    (rows sorted by key so concurrent writers lock in one order);
//! 3. last, and only if the batch has events, `outbox_head` is bumped and
//!    the events inserted. The head lock is thus held only for the insert
//!    and the commit, and every lock taken before it is on rows, never on the
//!    head, so writers cannot deadlock through it.

use crate::error::store_error;
use orderly_domain::event::Envelope;
pub use orderly_engine::ports::Expect;
use orderly_engine::ports::{Batch, StoreError, version_conflict};
use sqlx::{PgConnection, Postgres, Transaction};
use std::collections::{BTreeMap, BTreeSet};

/// A batch laid out as one array per column, deduplicated and sorted.
#[derive(Debug, Default)]
pub(crate) struct Columns {
    put_tables: Vec<&'static str>,
    put_keys: Vec<String>,
    put_idx: Vec<Option<String>>,
    put_docs: Vec<Vec<u8>>,
    delete_tables: Vec<&'static str>,
    delete_keys: Vec<String>,
    events: Vec<Envelope>,
    /// The head the events' `emit`ted sequences were numbered after.
    assumed_head: Option<u64>,
    cursor_producers: Vec<String>,
    cursor_positions: Vec<i64>,
    inbox_ids: Vec<String>,
}

impl Columns {
    /// Lays a batch out as columns. Several puts of one document keep the
    /// last; a document both put and deleted ends deleted (puts apply first,
    /// as in the SQLite store); a producer's cursor keeps its highest value.
    pub(crate) fn from_batch(batch: Batch) -> Result<Columns, StoreError> {
        let mut c = Columns::default();
        let puts: BTreeMap<(&'static str, String), _> =
            batch.puts.into_iter().map(|r| ((r.table, r.key), (r.idx, r.doc))).collect();
        for ((table, key), (idx, doc)) in puts {
            c.put_tables.push(table);
            c.put_keys.push(key);
            c.put_idx.push(idx);
            c.put_docs.push(doc);
        }
        let deletes: BTreeSet<(&'static str, String)> = batch.deletes.into_iter().collect();
        for (table, key) in deletes {
            c.delete_tables.push(table);
            c.delete_keys.push(key);
        }
        c.events = batch.outbox;
        c.assumed_head = batch.assumed_head;
        let mut cursors: BTreeMap<String, u64> = BTreeMap::new();
        for (producer, position) in batch.cursors {
            let slot = cursors.entry(producer).or_default();
            *slot = (*slot).max(position);
        }
        for (producer, position) in cursors {
            c.cursor_positions.push(to_i64("cursors", &producer, position)?);
            c.cursor_producers.push(producer);
        }
        let inbox: BTreeSet<String> = batch.inbox.into_iter().collect();
        c.inbox_ids.extend(inbox);
        Ok(c)
    }
}

/// Runs one batch as one transaction; returns the outbox head after it.
pub(crate) async fn commit(
    mut tx: Transaction<'_, Postgres>,
    columns: Columns,
    expect: &[Expect],
) -> Result<u64, StoreError> {
    check_expected(&mut tx, expect).await?;
    let put_versions = upsert_docs(&mut tx, &columns).await?;
    check_put_versions(expect, &put_versions)?;
    check_deleted(&mut tx, expect, &columns).await?;
    write_rest(&mut tx, &columns).await?;
    let head = append_outbox(&mut tx, &columns).await?;
    tx.commit().await.map_err(store_error)?;
    Ok(head)
}

/// Locks the existing documents named in `expect` and compares versions.
async fn check_expected(conn: &mut PgConnection, expect: &[Expect]) -> Result<(), StoreError> {
    if expect.is_empty() {
        return Ok(());
    }
    let mut wanted: Vec<(&'static str, String)> = expect.iter().map(|e| (e.table, e.key.clone())).collect();
    wanted.sort();
    wanted.dedup();
    let (tables, keys): (Vec<&'static str>, Vec<String>) = wanted.into_iter().unzip();
    let found: Vec<(String, String, i64)> = sqlx::query_as(crate::sql::LOCK_EXPECTED)
        .bind(&tables)
        .bind(&keys)
        .fetch_all(&mut *conn)
        .await
        .map_err(store_error)?;
    let found: BTreeMap<(String, String), i64> = found.into_iter().map(|(t, k, v)| ((t, k), v)).collect();
    for e in expect {
        let actual = found.get(&(e.table.to_owned(), e.key.clone())).map_or(0, |v| *v as u64);
        if actual != e.version {
            return Err(version_conflict(e, actual));
        }
    }
    Ok(())
}

/// A document expected absent may have been inserted by a writer that
/// committed after [`check_expected`] looked (there was no row to lock): the
/// upsert then updated it instead of inserting, which its version shows.
fn check_put_versions(expect: &[Expect], put_versions: &BTreeMap<(String, String), i64>) -> Result<(), StoreError> {
    for e in expect {
        if let Some(&after) = put_versions.get(&(e.table.to_owned(), e.key.clone())) {
            let before = (after as u64).saturating_sub(1);
            if before != e.version {
                return Err(version_conflict(e, before));
            }
        }
    }
    Ok(())
}

/// A document expected absent that the batch does not put may have been
/// inserted after [`check_expected`] looked; checked again before commit.
async fn check_deleted(conn: &mut PgConnection, expect: &[Expect], c: &Columns) -> Result<(), StoreError> {
    let put: BTreeSet<(&str, &str)> = c.put_tables.iter().copied().zip(c.put_keys.iter().map(String::as_str)).collect();
    for e in expect.iter().filter(|e| e.version == 0 && !put.contains(&(e.table, e.key.as_str()))) {
        let found: Option<i64> = sqlx::query_scalar("SELECT version FROM docs WHERE tbl = $1 AND key = $2")
            .bind(e.table)
            .bind(&e.key)
            .fetch_optional(&mut *conn)
            .await
            .map_err(store_error)?;
        if let Some(v) = found {
            return Err(version_conflict(e, v as u64));
        }
    }
    Ok(())
}

/// Inserts or replaces the batch's documents, bumping each one's version;
/// returns the new versions.
async fn upsert_docs(conn: &mut PgConnection, c: &Columns) -> Result<BTreeMap<(String, String), i64>, StoreError> {
    if c.put_keys.is_empty() {
        return Ok(BTreeMap::new());
    }
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "INSERT INTO docs (tbl, key, idx, doc) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[]) \
         ON CONFLICT (tbl, key) DO UPDATE \
         SET idx = excluded.idx, doc = excluded.doc, version = docs.version + 1 \
         RETURNING tbl, key, version",
    )
    .bind(&c.put_tables)
    .bind(&c.put_keys)
    .bind(&c.put_idx)
    .bind(&c.put_docs)
    .fetch_all(&mut *conn)
    .await
    .map_err(store_error)?;
    Ok(rows.into_iter().map(|(t, k, v)| ((t, k), v)).collect())
}

/// Deletes documents and stores cursors and inbox entries.
async fn write_rest(conn: &mut PgConnection, c: &Columns) -> Result<(), StoreError> {
    if !c.delete_keys.is_empty() {
        sqlx::query(
            "DELETE FROM docs d USING unnest($1::text[], $2::text[]) AS x(tbl, key) \
             WHERE d.tbl = x.tbl AND d.key = x.key",
        )
        .bind(&c.delete_tables)
        .bind(&c.delete_keys)
        .execute(&mut *conn)
        .await
        .map_err(store_error)?;
    }
    if !c.cursor_producers.is_empty() {
        // A cursor never moves back: a replayed batch must not rewind it.
        sqlx::query(
            "INSERT INTO cursors (producer, position) SELECT * FROM unnest($1::text[], $2::bigint[]) \
             ON CONFLICT (producer) DO UPDATE \
             SET position = greatest(cursors.position, excluded.position), updated_at = now()",
        )
        .bind(&c.cursor_producers)
        .bind(&c.cursor_positions)
        .execute(&mut *conn)
        .await
        .map_err(store_error)?;
    }
    if !c.inbox_ids.is_empty() {
        // No ON CONFLICT: an id already there means another replica handled
        // the event first; the unique violation makes this batch a conflict.
        sqlx::query("INSERT INTO inbox (id) SELECT * FROM unnest($1::text[])")
            .bind(&c.inbox_ids)
            .execute(&mut *conn)
            .await
            .map_err(store_error)?;
    }
    Ok(())
}

/// Appends the batch's events after the current head and returns the new head.
///
/// The `UPDATE outbox_head` row lock is held until this transaction commits,
/// so a second writer in the same schema waits here and then numbers its
/// events after ours. Positions are therefore dense, and position `p + 1`
/// becomes visible only after position `p` already is: a consumer reading
/// `position > cursor` can never step over an event still in flight. A
/// rolled-back batch releases the lock and its update, leaving no hole.
///
/// Events `emit`ted with a sequence numbered after the batch's assumed head
/// are renumbered from the real one: a replica's idea of the head may be
/// behind another replica's commits, and an event's sequence is its position.
async fn append_outbox(conn: &mut PgConnection, c: &Columns) -> Result<u64, StoreError> {
    if c.events.is_empty() {
        let head: i64 =
            sqlx::query_scalar("SELECT position FROM outbox_head").fetch_one(&mut *conn).await.map_err(store_error)?;
        return Ok(head as u64);
    }
    let count = c.events.len() as i64;
    let head: i64 = sqlx::query_scalar("UPDATE outbox_head SET position = position + $1 RETURNING position")
        .bind(count)
        .fetch_one(&mut *conn)
        .await
        .map_err(store_error)?;
    let base = (head - count) as u64;
    let mut ids = Vec::with_capacity(c.events.len());
    let mut subjects = Vec::with_capacity(c.events.len());
    let mut bodies = Vec::with_capacity(c.events.len());
    for (i, event) in c.events.iter().enumerate() {
        let encoded = match c.assumed_head {
            Some(assumed) if assumed != base && event.sequence == assumed + i as u64 + 1 => {
                let mut renumbered = event.clone();
                renumbered.sequence = base + i as u64 + 1;
                serde_json::to_vec(&renumbered)
            }
            _ => serde_json::to_vec(event),
        };
        let body = encoded.map_err(|e| StoreError::Corrupt {
            table: "outbox".into(),
            key: event.id.clone(),
            detail: format!("event does not encode: {e}"),
        })?;
        ids.push(event.id.clone());
        subjects.push(event.subject.clone());
        bodies.push(body);
    }
    sqlx::query(
        "INSERT INTO outbox (position, id, subject, event) \
         SELECT $1 + e.n, e.id, e.subject, e.event \
         FROM unnest($2::text[], $3::text[], $4::bytea[]) WITH ORDINALITY AS e(id, subject, event, n)",
    )
    .bind(head - count)
    .bind(&ids)
    .bind(&subjects)
    .bind(&bodies)
    .execute(&mut *conn)
    .await
    .map_err(store_error)?;
    Ok(head as u64)
}

/// Converts a u64 the engine hands us into PostgreSQL's BIGINT.
pub(crate) fn to_i64(table: &str, key: &str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt {
        table: table.into(),
        key: key.into(),
        detail: format!("{value} does not fit a BIGINT"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderly_engine::ports::Row;

    fn put(key: &str, doc: &str) -> Row {
        Row { table: "t", key: key.into(), idx: None, doc: doc.as_bytes().to_vec() }
    }

    #[test]
    fn columns_keep_the_last_put_sorted_and_the_highest_cursor() {
        let batch = Batch {
            puts: vec![put("b", "1"), put("a", "2"), put("b", "3")],
            deletes: vec![("t", "z".into()), ("t", "y".into()), ("t", "z".into())],
            cursors: vec![("p".into(), 7), ("o".into(), 1), ("p".into(), 3)],
            inbox: vec!["i2".into(), "i1".into(), "i2".into()],
            ..Batch::default()
        };
        let c = Columns::from_batch(batch).expect("columns");
        assert_eq!(c.put_keys, vec!["a", "b"]);
        assert_eq!(c.put_docs, vec![b"2".to_vec(), b"3".to_vec()]);
        assert_eq!(c.delete_keys, vec!["y", "z"]);
        assert_eq!(c.cursor_producers, vec!["o", "p"]);
        assert_eq!(c.cursor_positions, vec![1, 7]);
        assert_eq!(c.inbox_ids, vec!["i1", "i2"]);
    }

    #[test]
    fn a_cursor_beyond_bigint_is_refused_not_wrapped() {
        let batch = Batch { cursors: vec![("p".into(), u64::MAX)], ..Batch::default() };
        assert!(matches!(Columns::from_batch(batch), Err(StoreError::Corrupt { .. })));
    }
}
