//! Leases: at most one process runs a service against a database at a time.
//!
//! A lease is a session-level advisory lock held on a connection of its own
//! for as long as the process runs the service. A second replica waits (a
//! hot standby) and takes over within a second of the first one's session
//! ending (process exit, crash, network loss), so two replicas never apply
//! the same service's events from two diverging caches.

use crate::error::store_error;
use orderly_engine::ports::StoreError;
use sqlx::{Connection, PgConnection};
use std::str::FromStr;
use std::time::Duration;

/// How often a waiting replica tries to take the lease.
pub const LEASE_RETRY: Duration = Duration::from_millis(500);

/// A held lease on a service; dropping it (or the process ending) frees it.
pub struct Lease {
    conn: PgConnection,
    service: String,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("service", &self.service).finish_non_exhaustive()
    }
}

fn key(service: &str) -> String {
    format!("orderly-service-lease:{service}")
}

impl Lease {
    /// Tries once to take the lease on `service` in the database at `url`:
    /// `None` when another session holds it.
    pub async fn try_acquire(url: &str, service: &str) -> Result<Option<Lease>, StoreError> {
        let options = sqlx::postgres::PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("bad PostgreSQL url: {e}")))?
            .application_name("orderly-lease");
        let mut conn = PgConnection::connect_with(&options).await.map_err(store_error)?;
        let (got,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(key(service))
            .fetch_one(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(got.then(|| Lease { conn, service: service.to_owned() }))
    }

    /// Takes the lease on `service`, waiting while another replica holds it;
    /// `waiting` is called once if it has to wait.
    pub async fn acquire(url: &str, service: &str, waiting: impl FnOnce()) -> Result<Lease, StoreError> {
        let mut waiting = Some(waiting);
        loop {
            if let Some(lease) = Lease::try_acquire(url, service).await? {
                return Ok(lease);
            }
            if let Some(w) = waiting.take() {
                w();
            }
            tokio::time::sleep(LEASE_RETRY).await;
        }
    }

    /// Checks that the session holding the lease is alive (the lock with it).
    pub async fn check(&mut self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&mut self.conn).await.map_err(store_error)?;
        Ok(())
    }

    /// The service leased.
    pub fn service(&self) -> &str {
        &self.service
    }
}

/// Creates database `name` on the server at `url` (benchmarks: a fresh one per run).
pub async fn create_database(url: &str, name: &str) -> Result<(), StoreError> {
    admin(url, &format!("CREATE DATABASE \"{}\"", checked(name)?)).await
}

/// Drops database `name` on the server at `url`, closing its sessions.
pub async fn drop_database(url: &str, name: &str) -> Result<(), StoreError> {
    admin(url, &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", checked(name)?)).await
}

fn checked(name: &str) -> Result<&str, StoreError> {
    let ok = !name.is_empty() && name.len() <= 63 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok { Ok(name) } else { Err(StoreError::Unavailable(format!("bad database name {name:?}"))) }
}

async fn admin(url: &str, sql: &str) -> Result<(), StoreError> {
    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Unavailable(format!("bad PostgreSQL url: {e}")))?;
    let mut conn = PgConnection::connect_with(&options).await.map_err(store_error)?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut conn).await.map_err(store_error)?;
    Ok(())
}
