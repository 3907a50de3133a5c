//! Which connection a store operation runs on.
//!
//! A service's loop reads and commits one operation at a time, and every
//! pooled operation costs more than its statement: sqlx pings a connection
//! when it goes back to the pool (one more round trip, and one more wake-up
//! of a server process). So one of the pool's connections is kept out of it
//! and used by whichever operation finds it free (in practice the service's
//! loop); an operation that finds it busy takes a pooled connection as
//! before. A use that does not finish (an error, a cancelled future) gives
//! that connection back to the pool, whose release check cleans or closes
//! it, and the next operation keeps a fresh one.

use crate::error::store_error;
use orderly_engine::ports::StoreError;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use tokio::sync::{Mutex, MutexGuard};

/// The smallest pool one connection is kept out of (a smaller one, e.g. a
/// process's read-only view of a service running elsewhere, keeps them all
/// pooled).
pub(crate) const KEEP_FROM_POOL_MIN: u32 = 3;

/// The kept connection, shared by the clones of one store.
#[derive(Debug, Clone)]
pub(crate) struct Kept {
    slot: Option<Arc<Mutex<Option<PoolConnection<Postgres>>>>>,
}

impl Kept {
    /// A slot for a pool of `pool_size` connections (none below [`KEEP_FROM_POOL_MIN`]).
    pub(crate) fn new(pool_size: u32) -> Kept {
        Kept { slot: (pool_size >= KEEP_FROM_POOL_MIN).then(|| Arc::new(Mutex::new(None))) }
    }

    /// The kept connection if it is free, else a pooled one.
    pub(crate) async fn conn<'a>(&'a self, pool: &PgPool) -> Result<Conn<'a>, StoreError> {
        if let Some(slot) = &self.slot
            && let Ok(mut guard) = slot.try_lock()
        {
            let conn = match guard.take() {
                Some(c) => c,
                None => pool.acquire().await.map_err(store_error)?,
            };
            return Ok(Conn::Kept { guard, conn: Some(conn) });
        }
        Ok(Conn::Pooled(pool.acquire().await.map_err(store_error)?))
    }

    /// Gives the kept connection back to the pool (before closing it).
    pub(crate) async fn release(&self) {
        if let Some(slot) = &self.slot {
            drop(slot.lock().await.take());
        }
    }
}

/// A connection for one operation; call [`Conn::done`] once it succeeded.
pub(crate) enum Conn<'a> {
    /// The kept connection, locked for this operation.
    Kept { guard: MutexGuard<'a, Option<PoolConnection<Postgres>>>, conn: Option<PoolConnection<Postgres>> },
    /// A connection from the pool.
    Pooled(PoolConnection<Postgres>),
}

impl Conn<'_> {
    /// The operation finished: the kept connection stays kept. Dropped
    /// without this, it returns to the pool instead.
    pub(crate) fn done(self) {
        if let Conn::Kept { mut guard, mut conn } = self {
            *guard = conn.take();
        }
    }
}

impl Deref for Conn<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match self {
            Conn::Kept { conn, .. } => conn.as_ref().expect("a kept connection is present until done"),
            Conn::Pooled(c) => c,
        }
    }
}

impl DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            Conn::Kept { conn, .. } => conn.as_mut().expect("a kept connection is present until done"),
            Conn::Pooled(c) => c,
        }
    }
}
