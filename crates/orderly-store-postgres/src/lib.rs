//! The distributed store: each service keeps its documents, outbox, cursors
//! and inbox in its own PostgreSQL schema (or database). A batch commits as
//! one transaction with `synchronous_commit=on`, written with one multi-row
//! statement per kind of change.
//!
//! Outbox positions are dense and visible in commit order, even with several
//! writers (replicas) in one schema: appending events takes the lock on the
//! single `outbox_head` row, held until commit, and numbers the events after
//! it. A consumer that reads `position > cursor` therefore never skips an
//! event committed late (see `write::append_outbox`). The price is that
//! commits carrying events are serialized per schema, so their rate is bounded
//! by the commit latency; batch many events per commit.
//!
//! Schemas are created and migrated on [`PgStore::connect`], with embedded,
//! versioned migrations (`migrations/`) run under a per-schema advisory lock.

mod conn;
mod error;
mod lease;
mod partitions;
mod schema;
mod write;

pub use lease::{LEASE_RETRY, Lease, create_database, drop_database};
pub use partitions::{MEMBERSHIP_ROUND, RELEASE_DRAIN, share_partitions};

pub use schema::{LOCK_TIMEOUT_MS, SCHEMA_NAME_MAX, STATEMENT_TIMEOUT_MS};
pub use write::Expect;

/// Statements whose plans must not depend on the tables' statistics: each
/// batch-wide read is one primary-key probe per key (a `LATERAL` subquery the
/// planner cannot turn into a hash join), even under a generic plan made when
/// the table was empty. As plain joins, a schema created moments before (not
/// yet analyzed by autovacuum) got sequential scans of the whole table,
/// 35-160 ms each at 50,000 rows. Public for the plan tests (`tests/plans.rs`).
#[doc(hidden)]
pub mod sql {
    /// Documents by `(table, key)` arrays (`$1`, `$2`). `LIMIT 1` (the primary
    /// key gives at most one row anyway) keeps the subquery from being
    /// flattened into a join.
    pub const READ_MANY: &str = "SELECT d.tbl, d.key, d.idx, d.doc, d.version \
         FROM unnest($1::text[], $2::text[]) AS k(tbl, key) \
         CROSS JOIN LATERAL (SELECT tbl, key, idx, doc, version FROM docs \
         WHERE docs.tbl = k.tbl AND docs.key = k.key LIMIT 1) d";

    /// Locks the documents named by sorted, deduplicated `(table, key)` arrays
    /// and returns their versions. Rows are locked in the arrays' order, the
    /// same for every writer, so writers never wait on each other in a cycle.
    pub const LOCK_EXPECTED: &str = "SELECT x.tbl, x.key, d.version \
         FROM unnest($1::text[], $2::text[]) AS x(tbl, key) \
         CROSS JOIN LATERAL (SELECT version FROM docs \
         WHERE docs.tbl = x.tbl AND docs.key = x.key FOR UPDATE) d";

    /// The ids of a `text[]` (`$1`) that the inbox holds, one primary-key
    /// probe per id. Written as `id = ANY($1)`, even a custom plan chose a
    /// sequential scan with a hashed array on an inbox autovacuum had not yet
    /// analyzed: every poll of every bus consumer read the whole inbox
    /// (6.7 ms at 60,000 rows for 320 ids, against 0.8 ms probing), a cost
    /// that grew with the sale.
    pub const INBOX_MANY: &str = "SELECT i.id FROM unnest($1::text[]) AS k(id) \
         CROSS JOIN LATERAL (SELECT id FROM inbox WHERE inbox.id = k.id LIMIT 1) i";
}

use async_trait::async_trait;
use error::{store_error, unavailable};
use orderly_domain::event::Envelope;
use orderly_engine::ports::{Batch, GreatestKey, OutboxRecord, Row, Store, StoreError};
use schema::SchemaName;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// The most connections one store's pool may open.
pub const POOL_SIZE_MAX: u32 = 64;

/// How long an operation waits for a pooled connection before failing with
/// [`StoreError::Unavailable`].
pub const ACQUIRE_TIMEOUT_MS: u64 = 5_000;

/// A PostgreSQL-backed [`Store`] for one service, confined to one schema.
/// Cloning is cheap and shares the connection pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    kept: conn::Kept,
    options: PgConnectOptions,
    schema: SchemaName,
}

impl PgStore {
    /// Connects to `url` (e.g. `postgres://user@host:5432/db`), creates
    /// `schema` if it is missing, migrates it, and opens a pool of up to
    /// `pool_size` connections (clamped to 1..=[`POOL_SIZE_MAX`]) whose
    /// sessions all live in that schema.
    ///
    /// A malformed url or schema name, or an unreachable server, is
    /// [`StoreError::Unavailable`]: the store cannot be opened.
    pub async fn connect(url: &str, schema: &str, pool_size: u32) -> Result<PgStore, StoreError> {
        let schema = SchemaName::parse(schema).map_err(unavailable)?;
        let options = schema::connect_options(url, &schema)?;
        schema::migrate(&options, &schema).await?;
        let pool_size = pool_size.clamp(1, POOL_SIZE_MAX);
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .min_connections(0)
            .acquire_timeout(Duration::from_millis(ACQUIRE_TIMEOUT_MS))
            // No ping before handing a pooled connection out: it is a round
            // trip of its own before every read and every commit (it doubled
            // the round trips of a point read). A connection the server has
            // dropped fails its next statement instead, which is
            // `StoreError::Unavailable` like any failed statement (reads are
            // retried, a batch is rolled back and tried again), and sqlx
            // closes it.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await
            .map_err(store_error)?;
        tracing::info!(schema = schema.as_str(), "postgres store ready");
        Ok(PgStore { pool, kept: conn::Kept::new(pool_size), options, schema })
    }

    /// Applies any pending migrations (idempotent; what `orderly migrate`
    /// runs) and returns the schema version reached.
    pub async fn migrate(&self) -> Result<i64, StoreError> {
        schema::migrate(&self.options, &self.schema).await
    }

    /// The schema this store reads and writes.
    pub fn schema(&self) -> &str {
        self.schema.as_str()
    }

    /// A connection for one operation (see [`conn`]).
    async fn conn(&self) -> Result<conn::Conn<'_>, StoreError> {
        self.kept.conn(&self.pool).await
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.kept.release().await;
        self.pool.close().await;
    }

    /// Commits a batch like [`Store::commit`], but only if every document in
    /// `expect` is at the stated version (0: absent) when the batch commits;
    /// otherwise nothing is written and the answer is [`StoreError::Conflict`].
    ///
    /// Documents that exist are locked until commit. An expectation of
    /// absence on a document the batch does not put is checked but not
    /// locked (there is no row to lock).
    pub async fn commit_expecting(&self, mut batch: Batch, expect: &[Expect]) -> Result<u64, StoreError> {
        batch.expect.extend_from_slice(expect);
        self.commit(batch).await
    }

    /// Deletes inbox entries older than `age`, at most `limit` of them (oldest
    /// first); returns how many went. Run it once redelivery of such old event
    /// ids is no longer possible (beyond the bus's retention).
    pub async fn prune_inbox(&self, age: Duration, limit: u32) -> Result<u64, StoreError> {
        let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        let mut c = self.conn().await?;
        let done = sqlx::query(
            "DELETE FROM inbox WHERE id IN (SELECT id FROM inbox \
             WHERE created_at < now() - $1 * interval '1 millisecond' ORDER BY created_at LIMIT $2)",
        )
        .bind(age_ms)
        .bind(i64::from(limit))
        .execute(&mut *c)
        .await
        .map_err(store_error)?;
        c.done();
        Ok(done.rows_affected())
    }

    async fn outbox_query(
        &self,
        sql: &'static str,
        first: impl for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
        limit: u32,
    ) -> Result<Vec<OutboxRecord>, StoreError> {
        let mut c = self.conn().await?;
        let raw: Vec<(i64, Vec<u8>)> =
            sqlx::query_as(sql).bind(first).bind(i64::from(limit)).fetch_all(&mut *c).await.map_err(store_error)?;
        c.done();
        raw.iter().map(|(position, event)| decode_outbox(*position, event)).collect()
    }
}

fn decode_outbox(position: i64, event: &[u8]) -> Result<OutboxRecord, StoreError> {
    let envelope: Envelope = serde_json::from_slice(event).map_err(|e| StoreError::Corrupt {
        table: "outbox".into(),
        key: position.to_string(),
        detail: e.to_string(),
    })?;
    Ok(OutboxRecord { position: position as u64, envelope })
}

type DocRow = (String, Option<String>, Vec<u8>, i64);

#[async_trait]
impl Store for PgStore {
    async fn get_versioned(&self, table: &'static str, key: &str) -> Result<Option<(Row, u64)>, StoreError> {
        let mut c = self.conn().await?;
        let found: Option<DocRow> =
            sqlx::query_as("SELECT key, idx, doc, version FROM docs WHERE tbl = $1 AND key = $2")
                .bind(table)
                .bind(key)
                .fetch_optional(&mut *c)
                .await
                .map_err(store_error)?;
        c.done();
        Ok(found.map(|(key, idx, doc, version)| (Row { table, key, idx, doc }, version as u64)))
    }

    async fn get_many_versioned(&self, keys: &[(&'static str, &str)]) -> Result<Vec<(Row, u64)>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let tables: Vec<&str> = keys.iter().map(|(t, _)| *t).collect();
        let wanted: Vec<&str> = keys.iter().map(|(_, k)| *k).collect();
        let mut c = self.conn().await?;
        let found: Vec<(String, String, Option<String>, Vec<u8>, i64)> =
            sqlx::query_as(sql::READ_MANY).bind(&tables).bind(&wanted).fetch_all(&mut *c).await.map_err(store_error)?;
        c.done();
        // Rows name their table as the caller did (a `&'static str`).
        let named: HashMap<&str, &'static str> = keys.iter().map(|(t, _)| (*t, *t)).collect();
        found
            .into_iter()
            .map(|(tbl, key, idx, doc, version)| match named.get(tbl.as_str()) {
                Some(&table) => Ok((Row { table, key, idx, doc }, version as u64)),
                None => Err(StoreError::Corrupt { table: tbl, key, detail: "a table that was not asked for".into() }),
            })
            .collect()
    }

    fn reads_many(&self) -> bool {
        true
    }

    async fn scan_versioned(
        &self,
        table: &'static str,
        idx: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(Row, u64)>, StoreError> {
        let sql = match idx {
            Some(_) => {
                "SELECT key, idx, doc, version FROM docs WHERE tbl = $1 AND idx = $2 AND key > $3 \
                 ORDER BY key LIMIT $4"
            }
            None => {
                "SELECT key, idx, doc, version FROM docs WHERE tbl = $1 AND $2::text IS NULL AND key > $3 \
                     ORDER BY key LIMIT $4"
            }
        };
        let mut c = self.conn().await?;
        let rows: Vec<DocRow> = sqlx::query_as(sql)
            .bind(table)
            .bind(idx)
            .bind(after.unwrap_or(""))
            .bind(i64::from(limit))
            .fetch_all(&mut *c)
            .await
            .map_err(store_error)?;
        c.done();
        Ok(rows.into_iter().map(|(key, idx, doc, version)| (Row { table, key, idx, doc }, version as u64)).collect())
    }

    async fn greatest_key(&self, table: &'static str) -> Result<GreatestKey, StoreError> {
        // `key` is `COLLATE "C"` (byte order), and the primary key answers this.
        let mut c = self.conn().await?;
        let key: Option<String> = sqlx::query_scalar("SELECT max(key) FROM docs WHERE tbl = $1")
            .bind(table)
            .fetch_one(&mut *c)
            .await
            .map_err(store_error)?;
        c.done();
        Ok(key.map_or(GreatestKey::Empty, GreatestKey::Key))
    }

    async fn count_by_idx(&self, table: &'static str) -> Result<Vec<(String, u64)>, StoreError> {
        let mut c = self.conn().await?;
        let counts: Vec<(String, i64)> = sqlx::query_as(
            "SELECT idx, count(*) FROM docs WHERE tbl = $1 AND idx IS NOT NULL GROUP BY idx ORDER BY idx",
        )
        .bind(table)
        .fetch_all(&mut *c)
        .await
        .map_err(store_error)?;
        c.done();
        Ok(counts.into_iter().map(|(idx, n)| (idx, n as u64)).collect())
    }

    async fn commit(&self, mut batch: Batch) -> Result<u64, StoreError> {
        let expect = std::mem::take(&mut batch.expect);
        let columns = write::Columns::from_batch(batch)?;
        let mut c = self.conn().await?;
        let tx = sqlx::Connection::begin(&mut *c).await.map_err(store_error)?;
        let head = write::commit(tx, columns, &expect).await?;
        c.done();
        Ok(head)
    }

    async fn outbox_after(&self, position: u64, limit: u32) -> Result<Vec<OutboxRecord>, StoreError> {
        // Past the largest BIGINT nothing can follow.
        let Ok(position) = i64::try_from(position) else { return Ok(Vec::new()) };
        self.outbox_query(
            "SELECT position, event FROM outbox WHERE position > $1 ORDER BY position LIMIT $2",
            position,
            limit,
        )
        .await
    }

    async fn outbox_for_subject(&self, subject: &str, limit: u32) -> Result<Vec<OutboxRecord>, StoreError> {
        self.outbox_query(
            "SELECT position, event FROM outbox WHERE subject = $1 ORDER BY position LIMIT $2",
            subject.to_owned(),
            limit,
        )
        .await
    }

    async fn outbox_head(&self) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        let head: i64 =
            sqlx::query_scalar("SELECT position FROM outbox_head").fetch_one(&mut *c).await.map_err(store_error)?;
        c.done();
        Ok(head as u64)
    }

    async fn cursor(&self, producer: &str) -> Result<u64, StoreError> {
        let mut c = self.conn().await?;
        let position: Option<i64> = sqlx::query_scalar("SELECT position FROM cursors WHERE producer = $1")
            .bind(producer)
            .fetch_optional(&mut *c)
            .await
            .map_err(store_error)?;
        c.done();
        Ok(position.map_or(0, |p| p as u64))
    }

    async fn inbox_contains(&self, event_id: &str) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM inbox WHERE id = $1")
            .bind(event_id)
            .fetch_optional(&mut *c)
            .await
            .map_err(store_error)?;
        c.done();
        Ok(found.is_some())
    }

    async fn inbox_contains_many(&self, event_ids: &[&str]) -> Result<Option<HashSet<String>>, StoreError> {
        if event_ids.is_empty() {
            return Ok(Some(HashSet::new()));
        }
        let mut c = self.conn().await?;
        let found: Vec<String> =
            sqlx::query_scalar(sql::INBOX_MANY).bind(event_ids).fetch_all(&mut *c).await.map_err(store_error)?;
        c.done();
        Ok(Some(found.into_iter().collect()))
    }
}
