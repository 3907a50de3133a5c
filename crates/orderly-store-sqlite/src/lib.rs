//! The embedded store: each service gets its own SQLite database file, in WAL
//! mode, written by one connection (the service is the only writer) and read
//! by a small pool. A batch is one transaction: documents, outbox rows and
//! cursors commit together, so a crash loses either the whole batch or
//! nothing. Commits are synced apart from their writes (`sync`), so the
//! service decides its next batch while the last one reaches the disk.

pub mod codec;
mod sync;

use async_trait::async_trait;
use orderly_domain::event::Envelope;
use orderly_engine::ports::{Batch, Durable, GreatestKey, OutboxRecord, Row, Store, StoreError, check_expectations};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Read connections per store.
pub const READERS_MAX: usize = 2;

/// Page size of a new database file. Each commit rewrites the pages it
/// touches (the right edge of each B-tree it appends to) into the WAL, a
/// frame and a write per page: at 8 KiB a flash sale ran 7–11% faster than
/// at SQLite's default 4 KiB, and 1–2 KiB pages ran a third slower.
pub const PAGE_SIZE: u32 = 8192;

/// WAL bytes after which the store checkpoints (in pages of the file's own
/// size). SQLite's own `wal_autocheckpoint` would run the checkpoint inside
/// the commit that crossed it, so that commit's callers would wait for it;
/// the store runs it right after that commit instead (see
/// [`SqliteStore::commit`]).
///
/// A checkpoint ends with an fsync of the database file, and the disk
/// flushes one file at a time: every store's commits that sync meanwhile
/// wait behind it. At 16 MiB those waits set a flash sale's p99 (57–64 ms
/// against 40–44 ms at 4 MiB, same throughput; 64 MiB: 89–96 ms); 2 MiB
/// was no better than 4, 8 MiB a little worse. Where the CPU is the limit
/// (a sale over HTTP) 4 MiB costs 3.5–8.5% of throughput: a hot page is
/// copied more often. README, Performance.
pub const WAL_CHECKPOINT_BYTES: u64 = 4 * 1024 * 1024;

thread_local! {
    /// Frames in the WAL after the last commit on this thread, as SQLite's
    /// WAL hook reports them (the writer commits on the calling thread).
    static WAL_FRAMES: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

/// WAL frames (one page each) that hold `bytes`, at least one.
fn frames_in(bytes: u64, page_size: u64) -> i64 {
    (bytes / page_size.max(512)).max(1) as i64
}

/// The writer's WAL hook: notes the WAL's length after each commit.
/// Registering it replaces SQLite's automatic checkpoints.
fn note_wal_frames(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(i64::from(frames));
    Ok(())
}

/// The schema, versioned with `PRAGMA user_version`. Each entry migrates from
/// the previous version; never edit a released entry, append a new one.
const MIGRATIONS: &[&str] = &[
    r"
    CREATE TABLE docs (
        tbl TEXT NOT NULL,
        key TEXT NOT NULL,
        idx TEXT,
        doc BLOB NOT NULL,
        PRIMARY KEY (tbl, key)
    ) WITHOUT ROWID;
    CREATE INDEX docs_by_idx ON docs (tbl, idx, key);
    CREATE TABLE outbox (
        position INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        subject TEXT NOT NULL,
        event BLOB NOT NULL
    );
    CREATE INDEX outbox_by_subject ON outbox (subject, position);
    CREATE TABLE cursors (producer TEXT PRIMARY KEY, position INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE inbox (id TEXT PRIMARY KEY) WITHOUT ROWID;
",
    r"
    ALTER TABLE docs ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
",
    // Rows without an index value (contacts, inventory's order rows) stay
    // out of the index: one B-tree insert less per such row. The index
    // serves `count_by_idx`, whose `idx IS NOT NULL` lets it use this one.
    r"
    DROP INDEX docs_by_idx;
    CREATE INDEX docs_by_idx ON docs (tbl, idx, key) WHERE idx IS NOT NULL;
",
];

/// How hard a commit is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every commit is fsynced before it counts (survives power loss): the
    /// writer commits with `synchronous=NORMAL` (no sync inside the commit)
    /// and the store's syncer thread fsyncs the WAL after it, one fsync for
    /// every commit written meanwhile; [`Store::commit`] returns, and
    /// [`Store::commit_visible`]'s [`Durable`] resolves, only then.
    #[default]
    Full,
    /// fsync at checkpoints (`synchronous=NORMAL`): survives a process crash, not power loss.
    Normal,
}

/// A SQLite-backed [`Store`].
pub struct SqliteStore {
    /// Syncs the WAL after commits (with [`Durability::Full`]). First, so it
    /// is dropped first: it finishes the syncs asked for while the
    /// connections (and so the WAL file) are still open.
    sync: Option<Arc<sync::WalSync>>,
    path: PathBuf,
    writer: Arc<Mutex<Connection>>,
    /// The file's page size: a WAL frame holds one page.
    page_size: u64,
    /// WAL frames after which a commit is followed by a checkpoint.
    checkpoint_frames: i64,
    /// A checkpoint is queued or running.
    checkpointing: Arc<std::sync::atomic::AtomicBool>,
    /// Checkpoints run, for tests and the curious.
    checkpoints: Arc<std::sync::atomic::AtomicU64>,
    readers: Vec<Arc<Mutex<Connection>>>,
    next_reader: std::sync::atomic::AtomicUsize,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path, durability: Durability) -> Result<SqliteStore, StoreError> {
        let writer = Connection::open(path).map_err(unavailable)?;
        // Takes effect only while the file is new (an existing file keeps
        // its page size: WAL mode cannot change it).
        writer.execute_batch(&format!("PRAGMA page_size={PAGE_SIZE};")).map_err(unavailable)?;
        writer
            .execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000; \
                 PRAGMA foreign_keys=ON;",
            )
            .map_err(unavailable)?;
        let page_size: u64 = writer.query_row("PRAGMA page_size", [], |r| r.get(0)).map_err(unavailable)?;
        let checkpoint_frames = frames_in(WAL_CHECKPOINT_BYTES, page_size);
        writer.wal_hook(Some(note_wal_frames));
        migrate(&writer)?;
        // From here on commits do not sync in SQLite: with `Full` the store's
        // syncer does, apart from the writes (see `sync`); with `Normal`
        // only checkpoints do.
        writer.execute_batch("PRAGMA synchronous=NORMAL;").map_err(unavailable)?;
        let sync = match durability {
            Durability::Full => Some(Arc::new(sync::WalSync::start(path).map_err(unavailable)?)),
            Durability::Normal => None,
        };
        let mut readers = Vec::new();
        for _ in 0..READERS_MAX {
            let r = Connection::open(path).map_err(unavailable)?;
            r.execute_batch("PRAGMA busy_timeout=5000; PRAGMA query_only=ON;").map_err(unavailable)?;
            readers.push(Arc::new(Mutex::new(r)));
        }
        Ok(SqliteStore {
            sync,
            path: path.to_owned(),
            writer: Arc::new(Mutex::new(writer)),
            page_size,
            checkpoint_frames,
            checkpointing: Arc::default(),
            checkpoints: Arc::default(),
            readers,
            next_reader: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Writes `batch` (see [`Store::commit_visible`]) and hands its events back.
    async fn write(&self, batch: Batch) -> Result<(u64, Durable, Vec<Envelope>), StoreError> {
        let writer = self.writer.clone();
        let checkpoint_frames = self.checkpoint_frames;
        let syncer = self.sync.clone();
        let committed: Result<(u64, bool, u64, Vec<Envelope>), StoreError> = tokio::task::spawn_blocking(move || {
            let mut c = writer.lock().unwrap_or_else(|p| p.into_inner());
            WAL_FRAMES.set(0);
            let head = write_batch(&mut c, &batch)?;
            // Numbered under the writer's lock: numbers follow the WAL's order.
            let seq = syncer.as_ref().map_or(0, |s| s.written());
            Ok((head, WAL_FRAMES.get() >= checkpoint_frames, seq, batch.outbox))
        })
        .await
        .map_err(unavailable)?
        .map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DatabaseBusy => {
                StoreError::Conflict(f.to_string())
            }
            rusqlite::Error::ToSqlConversionFailure(inner) if inner.is::<ExpectFailed>() => {
                StoreError::Conflict(inner.to_string())
            }
            other => unavailable(other),
        });
        let (head, checkpoint, seq, events) = committed?;
        if checkpoint {
            self.checkpoint_soon();
        }
        Ok((head, Durable::at(self.sync.as_ref().map(|s| s.subscribe()), seq), events))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// WAL syncs run since the store opened (none with [`Durability::Normal`]).
    pub fn syncs(&self) -> u64 {
        self.sync.as_ref().map_or(0, |s| s.syncs())
    }

    /// Checkpoints run since the store opened.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Checkpoints once the WAL holds `bytes` (at least a page); for tests.
    pub fn set_checkpoint_bytes(&mut self, bytes: u64) {
        self.checkpoint_frames = frames_in(bytes, self.page_size);
    }

    /// Copies the WAL into the database file (a passive checkpoint, as
    /// SQLite's automatic one), on a blocking thread, once: the commit that
    /// asked for it has already answered its callers, and the next commit
    /// waits for the writer only if the checkpoint is still running.
    fn checkpoint_soon(&self) {
        use std::sync::atomic::Ordering;
        if self.checkpointing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (writer, checkpointing, checkpoints) =
            (self.writer.clone(), self.checkpointing.clone(), self.checkpoints.clone());
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let c = writer.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!(path = %path.display(), error = %e, "checkpoint failed; the next commit past the mark retries");
            }
            checkpoints.fetch_add(1, Ordering::Relaxed);
            checkpointing.store(false, Ordering::Release);
        });
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let i = self.next_reader.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.readers.len();
        let conn = self.readers[i].clone();
        tokio::task::spawn_blocking(move || {
            let c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&c)
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }

    /// A point read: answered on the calling thread when a reader is free
    /// (an indexed lookup in pages SQLite or the OS has cached costs less
    /// than handing it to a blocking thread), else like [`SqliteStore::read`].
    /// Only on a multi-threaded runtime, where a worker may block that long.
    async fn point_read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inline = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if inline {
            for conn in &self.readers {
                if let Ok(c) = conn.try_lock() {
                    return f(&c).map_err(unavailable);
                }
            }
        }
        self.read(f).await
    }
}

/// Runs pending migrations; returns the schema version reached.
pub fn migrate(conn: &Connection) -> Result<usize, StoreError> {
    let current: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(unavailable)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let version = i + 1;
        conn.execute_batch(&format!("BEGIN; {sql}; PRAGMA user_version={version}; COMMIT;")).map_err(unavailable)?;
        tracing::info!(version, "sqlite schema migrated");
    }
    Ok(MIGRATIONS.len())
}

fn row_from(table: &'static str, r: &rusqlite::Row<'_>) -> rusqlite::Result<(Row, u64)> {
    Ok((Row { table, key: r.get(0)?, idx: r.get(1)?, doc: r.get(2)? }, r.get::<_, i64>(3)? as u64))
}

/// A batch's expectation failed: rolled back, reported as a conflict.
#[derive(Debug)]
struct ExpectFailed(StoreError);

impl std::fmt::Display for ExpectFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ExpectFailed {}

fn decode_outbox(position: i64, event: &[u8]) -> Result<OutboxRecord, StoreError> {
    let envelope = codec::decode(event).map_err(|detail| StoreError::Corrupt {
        table: "outbox".into(),
        key: position.to_string(),
        detail,
    })?;
    Ok(OutboxRecord { position: position as u64, envelope })
}

fn write_batch(conn: &mut Connection, batch: &Batch) -> rusqlite::Result<u64> {
    let tx = conn.transaction()?;
    if !batch.expect.is_empty() {
        let mut version = tx.prepare_cached("SELECT version FROM docs WHERE tbl = ?1 AND key = ?2")?;
        let mut failed: Option<rusqlite::Error> = None;
        let checked = check_expectations(&batch.expect, |table, key| {
            match version.query_row(params![table, key], |r| r.get::<_, i64>(0)).optional() {
                Ok(v) => v.map(|v| v as u64),
                Err(e) => {
                    failed.get_or_insert(e);
                    None
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        checked.map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(ExpectFailed(e))))?;
    }
    {
        let mut put = tx.prepare_cached(
            "INSERT INTO docs (tbl, key, idx, doc, version) VALUES (?1, ?2, ?3, ?4, 1) \
             ON CONFLICT (tbl, key) DO UPDATE SET idx = excluded.idx, doc = excluded.doc, version = docs.version + 1",
        )?;
        for row in &batch.puts {
            put.execute(params![row.table, row.key, row.idx, row.doc])?;
        }
        let mut del = tx.prepare_cached("DELETE FROM docs WHERE tbl = ?1 AND key = ?2")?;
        for (table, key) in &batch.deletes {
            del.execute(params![table, key])?;
        }
        let mut out = tx.prepare_cached("INSERT INTO outbox (id, subject, event) VALUES (?1, ?2, ?3)")?;
        for env in &batch.outbox {
            let bytes = codec::encode(env).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            // The subject only serves the subject index (the event holds
            // it too): an order id goes in as its 16 UUID bytes, a BLOB,
            // which SQLite keeps apart from every TEXT subject (earlier
            // rows, SKUs); `outbox_for_subject` asks for both spellings.
            match codec::pack_order_subject(&env.subject) {
                Some(packed) => out.execute(params![env.id, packed, bytes])?,
                None => out.execute(params![env.id, env.subject, bytes])?,
            };
        }
        let mut cur = tx.prepare_cached(
            "INSERT INTO cursors (producer, position) VALUES (?1, ?2) \
             ON CONFLICT (producer) DO UPDATE SET position = max(position, excluded.position)",
        )?;
        for (producer, position) in &batch.cursors {
            cur.execute(params![producer, *position as i64])?;
        }
        let mut inbox = tx.prepare_cached("INSERT OR IGNORE INTO inbox (id) VALUES (?1)")?;
        for id in &batch.inbox {
            inbox.execute(params![id])?;
        }
    }
    let head: i64 = tx.prepare_cached("SELECT coalesce(max(position), 0) FROM outbox")?.query_row([], |r| r.get(0))?;
    tx.commit()?;
    Ok(head as u64)
}

#[async_trait]
impl Store for SqliteStore {
    async fn get_versioned(&self, table: &'static str, key: &str) -> Result<Option<(Row, u64)>, StoreError> {
        let key = key.to_owned();
        self.point_read(move |c| {
            c.prepare_cached("SELECT key, idx, doc, version FROM docs WHERE tbl = ?1 AND key = ?2")?
                .query_row(params![table, key], |r| row_from(table, r))
                .optional()
        })
        .await
    }

    async fn scan_versioned(
        &self,
        table: &'static str,
        idx: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(Row, u64)>, StoreError> {
        let (idx, after) = (idx.map(str::to_owned), after.unwrap_or("").to_owned());
        self.read(move |c| {
            let mut stmt = match idx {
                Some(_) => c.prepare_cached(
                    "SELECT key, idx, doc, version FROM docs WHERE tbl = ?1 AND idx = ?2 AND key > ?3 ORDER BY key LIMIT ?4",
                )?,
                None => c.prepare_cached(
                    "SELECT key, idx, doc, version FROM docs WHERE tbl = ?1 AND ?2 IS NULL AND key > ?3 \
                     ORDER BY key LIMIT ?4",
                )?,
            };
            let rows = stmt.query_map(params![table, idx, after, limit], |r| row_from(table, r))?;
            rows.collect()
        })
        .await
    }

    async fn greatest_key(&self, table: &'static str) -> Result<GreatestKey, StoreError> {
        // TEXT compares with SQLite's BINARY collation: byte order.
        let key: Option<String> = self
            .read(move |c| c.query_row("SELECT max(key) FROM docs WHERE tbl = ?1", params![table], |r| r.get(0)))
            .await?;
        Ok(key.map_or(GreatestKey::Empty, GreatestKey::Key))
    }

    async fn count_by_idx(&self, table: &'static str) -> Result<Vec<(String, u64)>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT idx, count(*) FROM docs WHERE tbl = ?1 AND idx IS NOT NULL GROUP BY idx ORDER BY idx",
            )?;
            let rows = stmt.query_map(params![table], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
            rows.collect()
        })
        .await
    }

    async fn commit(&self, batch: Batch) -> Result<u64, StoreError> {
        let (head, durable) = self.commit_visible(batch).await?;
        durable.then_head(head).await
    }

    fn visible_before_synced(&self) -> bool {
        self.sync.is_some()
    }

    /// Writes the batch (SQLite commits it to the WAL without a sync) and
    /// asks the store's syncer for an fsync, which the returned [`Durable`]
    /// waits for. With [`Durability::Normal`] nothing syncs but checkpoints:
    /// [`Durable::Now`].
    async fn commit_visible(&self, batch: Batch) -> Result<(u64, Durable), StoreError> {
        let (head, durable, _) = self.write(batch).await?;
        Ok((head, durable))
    }

    /// The events come back from the writer's thread with the result:
    /// written, never copied.
    async fn commit_visible_returning_events(&self, batch: Batch) -> Result<(u64, Durable, Vec<Envelope>), StoreError> {
        self.write(batch).await
    }

    async fn outbox_after(&self, position: u64, limit: u32) -> Result<Vec<OutboxRecord>, StoreError> {
        let raw: Vec<(i64, Vec<u8>)> = self
            .read(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT position, event FROM outbox WHERE position > ?1 ORDER BY position LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![position as i64, limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })
            .await?;
        raw.iter().map(|(p, e)| decode_outbox(*p, e)).collect()
    }

    async fn outbox_for_subject(&self, subject: &str, limit: u32) -> Result<Vec<OutboxRecord>, StoreError> {
        let subject = subject.to_owned();
        let raw: Vec<(i64, Vec<u8>)> = self
            .read(move |c| match codec::pack_order_subject(&subject) {
                // An order's events: packed since this format, spelled out
                // in rows written before it.
                Some(packed) => {
                    let mut stmt = c.prepare_cached(
                        "SELECT position, event FROM outbox WHERE subject IN (?1, ?2) ORDER BY position LIMIT ?3",
                    )?;
                    let rows = stmt.query_map(params![packed, subject, limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
                    rows.collect()
                }
                None => {
                    let mut stmt = c.prepare_cached(
                        "SELECT position, event FROM outbox WHERE subject = ?1 ORDER BY position LIMIT ?2",
                    )?;
                    let rows = stmt.query_map(params![subject, limit], |r| Ok((r.get(0)?, r.get(1)?)))?;
                    rows.collect()
                }
            })
            .await?;
        raw.iter().map(|(p, e)| decode_outbox(*p, e)).collect()
    }

    async fn outbox_head(&self) -> Result<u64, StoreError> {
        self.read(|c| c.query_row("SELECT coalesce(max(position), 0) FROM outbox", [], |r| r.get::<_, i64>(0)))
            .await
            .map(|h| h as u64)
    }

    async fn cursor(&self, producer: &str) -> Result<u64, StoreError> {
        let producer = producer.to_owned();
        self.read(move |c| {
            c.query_row("SELECT position FROM cursors WHERE producer = ?1", params![producer], |r| r.get::<_, i64>(0))
                .optional()
        })
        .await
        .map(|p| p.unwrap_or(0) as u64)
    }

    async fn inbox_contains(&self, event_id: &str) -> Result<bool, StoreError> {
        let id = event_id.to_owned();
        self.point_read(move |c| c.query_row("SELECT 1 FROM inbox WHERE id = ?1", params![id], |_| Ok(())).optional())
            .await
            .map(|r| r.is_some())
    }
}
