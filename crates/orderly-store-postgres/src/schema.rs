//! Where a service's data lives and how it gets there: the validated schema
//! name, the session settings every connection carries, and the embedded,
//! versioned migrations run under a per-schema advisory lock.

use crate::error::{store_error, unavailable};
use orderly_engine::ports::StoreError;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{AssertSqlSafe, Connection, PgConnection, SqlSafeStr};
use std::str::FromStr;

/// The longest schema name PostgreSQL keeps without truncating (NAMEDATALEN - 1).
pub const SCHEMA_NAME_MAX: usize = 63;

/// How long one statement may run on a store connection before PostgreSQL
/// cancels it (the cancel surfaces as [`StoreError::Unavailable`]).
pub const STATEMENT_TIMEOUT_MS: u32 = 30_000;

/// How long a statement may wait for a row lock (e.g. the outbox head) before
/// giving up with [`StoreError::Conflict`], so a stuck writer cannot wedge the rest.
pub const LOCK_TIMEOUT_MS: u32 = 10_000;

/// The embedded migrations: (version, description, SQL). Append only.
const MIGRATIONS: &[(i64, &str, &str)] = &[(1, "orderly store", include_str!("../migrations/0001_orderly_store.sql"))];

/// The first key of the two-key advisory lock Orderly takes around migrations
/// ("OR" in ASCII); the second is `hashtext(schema)`. Commits take no
/// advisory locks, so nothing else shares this key space.
const MIGRATION_LOCK_CLASS: i32 = 0x4f52;

/// A schema name that is safe to splice into DDL and `search_path`:
/// lowercase ASCII letters, digits and `_`, not starting with a digit,
/// at most [`SCHEMA_NAME_MAX`] bytes, and not a `pg_` system name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SchemaName(String);

impl SchemaName {
    /// Parses a schema name, or says why it is refused.
    pub(crate) fn parse(name: &str) -> Result<SchemaName, String> {
        let valid_chars = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let starts_ok = name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
        if !valid_chars || !starts_ok || name.len() > SCHEMA_NAME_MAX || name.starts_with("pg_") {
            return Err(format!(
                "invalid schema name {name:?}: use 1 to {SCHEMA_NAME_MAX} lowercase letters, digits and _, \
                 starting with a letter or _, not pg_"
            ));
        }
        Ok(SchemaName(name.to_owned()))
    }

    /// The name itself.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// Connection options for `url` whose sessions live in `schema`: every
/// unqualified name resolves there, commits wait for the WAL flush
/// (`synchronous_commit=on`), statements and lock waits are bounded, and
/// every statement is planned for its own arguments
/// (`plan_cache_mode=force_custom_plan`).
///
/// Why custom plans: sqlx prepares each statement once per connection, and
/// after five executions PostgreSQL may switch to a generic plan that it
/// keeps until the table's statistics change. A schema created moments ago
/// has no statistics, so that plan is made for a near-empty table: a
/// sequential scan of `inbox` for `id = ANY($1)`, and a hash join over a
/// sequential scan of `docs` for the batch-wide reads. The tables then grow
/// by thousands of rows a second until autovacuum first analyzes them, and
/// each such statement took 35-160 ms (seen with `auto_explain` in the
/// distributed flash-sale bench). A custom plan sees the array's length and
/// the table's current size; planning these short statements costs far
/// less than one such scan. Even so, a custom plan of `id = ANY($1)` on an
/// unanalyzed inbox of tens of thousands of rows still chose the sequential
/// scan, so the batch-wide reads are written as one index probe per key
/// (`crate::sql`), which no plan turns into a scan.
///
/// A server on this machine (a loopback address, `localhost` or a Unix
/// socket) is reached without TLS unless the url or `PGSSLMODE` chooses an
/// `sslmode`; see [`plain_on_loopback`].
pub(crate) fn connect_options(url: &str, schema: &SchemaName) -> Result<PgConnectOptions, StoreError> {
    let mut options = PgConnectOptions::from_str(url).map_err(|e| unavailable(format!("bad PostgreSQL url: {e}")))?;
    if plain_on_loopback(url, &options, std::env::var_os("PGSSLMODE").is_some()) {
        options = options.ssl_mode(PgSslMode::Disable);
    }
    Ok(options.application_name("orderly").options([
        ("search_path", schema.as_str().to_owned()),
        ("synchronous_commit", "on".to_owned()),
        ("statement_timeout", STATEMENT_TIMEOUT_MS.to_string()),
        ("lock_timeout", LOCK_TIMEOUT_MS.to_string()),
        ("plan_cache_mode", "force_custom_plan".to_owned()),
    ]))
}

/// True when `url` names a server on this machine and nothing chose an
/// `sslmode` (not the url, not `PGSSLMODE`, given as `env_chose`).
///
/// The default, `prefer`, encrypts whenever the server offers TLS, as
/// Debian's PostgreSQL does on loopback too, where it protects nothing: the
/// bytes never leave the machine, and whoever can read them there can read
/// the database's files. It cost a lot: the PostgreSQL-only flash-sale bench
/// ran 1,292-1,440 orders/s over TLS and 2,927-3,236 without (README,
/// Performance). A url that sets `sslmode` is obeyed as written.
fn plain_on_loopback(url: &str, options: &PgConnectOptions, env_chose: bool) -> bool {
    let url_chose = url
        .split_once('?')
        .is_some_and(|(_, query)| query.split('&').any(|p| p.starts_with("sslmode=") || p.starts_with("ssl-mode=")));
    let host = options.get_host().trim_start_matches('[').trim_end_matches(']');
    let local = options.get_socket().is_some()
        || host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    local && !url_chose && !env_chose
}

/// Creates `schema` if missing and applies pending migrations; returns the
/// schema version reached. Safe when several processes start at once: each
/// runs on its own session holding a per-schema advisory lock, so one
/// migrates and the others then find nothing to do.
pub(crate) async fn migrate(options: &PgConnectOptions, schema: &SchemaName) -> Result<i64, StoreError> {
    // Migrations may legitimately run longer than a store statement, and must
    // wait for the lock as long as another process is migrating.
    let options = options.clone().options([("statement_timeout", "0"), ("lock_timeout", "0")]);
    let mut conn = PgConnection::connect_with(&options).await.map_err(store_error)?;
    let result = migrate_locked(&mut conn, schema).await;
    // Closing the session releases the advisory lock even if migrating failed.
    let closed = conn.close().await.map_err(store_error);
    let version = result?;
    closed?;
    Ok(version)
}

async fn migrate_locked(conn: &mut PgConnection, schema: &SchemaName) -> Result<i64, StoreError> {
    sqlx::query("SELECT pg_advisory_lock($1, hashtext($2))")
        .bind(MIGRATION_LOCK_CLASS)
        .bind(schema.as_str())
        .execute(&mut *conn)
        .await
        .map_err(store_error)?;
    // The name was validated by SchemaName::parse: only [a-z0-9_], so quoting is exact.
    let create = format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", schema.as_str());
    sqlx::query(AssertSqlSafe(create)).execute(&mut *conn).await.map_err(store_error)?;
    let mut migrator = Migrator::with_migrations(embedded_migrations());
    // Our own advisory lock is per schema; sqlx's is per database and would
    // needlessly serialize services that share one database.
    migrator.set_locking(false);
    // `run_direct` is what `run` calls; sqlx keeps it public because `run`'s
    // `Acquire` bound makes the future unsendable for callers that spawn
    // `connect` ("Acquire is not general enough").
    migrator
        .run_direct(None, &mut *conn, false)
        .await
        .map_err(|e| unavailable(format!("migrating schema {}: {e}", schema.as_str())))?;
    sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
        .bind(MIGRATION_LOCK_CLASS)
        .bind(schema.as_str())
        .execute(&mut *conn)
        .await
        .map_err(store_error)?;
    Ok(latest_version())
}

/// The version the embedded migrations bring a schema to.
pub(crate) fn latest_version() -> i64 {
    MIGRATIONS.iter().map(|(v, _, _)| *v).max().unwrap_or(0)
}

fn embedded_migrations() -> Vec<Migration> {
    MIGRATIONS
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(*version, (*description).into(), MigrationType::Simple, sql.into_sql_str(), false)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_on_this_machine_is_reached_without_tls_unless_an_sslmode_is_chosen() {
        let plain = |url: &str, env_chose: bool| {
            let options = PgConnectOptions::from_str(url).expect("a valid url");
            plain_on_loopback(url, &options, env_chose)
        };
        for local in [
            "postgres://root@127.0.0.1:5432/test",
            "postgres://root@127.0.0.2/test?application_name=x",
            "postgres://root@localhost/test",
            "postgres://root@[::1]:5432/test",
            "postgres://root@%2Fvar%2Frun%2Fpostgresql/test",
        ] {
            assert!(plain(local, false), "{local}: on this machine, nothing chosen");
            assert!(!plain(local, true), "{local}: PGSSLMODE chose");
        }
        for chosen in
            ["postgres://root@127.0.0.1/test?sslmode=require", "postgres://root@localhost/test?x=1&ssl-mode=prefer"]
        {
            assert!(!plain(chosen, false), "{chosen}: the url chose");
        }
        for remote in ["postgres://root@db.example.com/test", "postgres://root@10.0.0.5:5432/test"] {
            assert!(!plain(remote, false), "{remote}: another machine keeps the default");
        }
        let schema = SchemaName::parse("orders").expect("a schema name");
        let options = connect_options("postgres://root@127.0.0.1/test", &schema).expect("options");
        assert!(matches!(options.get_ssl_mode(), PgSslMode::Disable), "applied to the store's options");
        let options = connect_options("postgres://root@127.0.0.1/test?sslmode=require", &schema).expect("options");
        assert!(matches!(options.get_ssl_mode(), PgSslMode::Require), "a chosen mode is obeyed");
    }

    #[test]
    fn schema_names_are_restricted_to_safe_identifiers() {
        for ok in ["orders", "_x", "svc_01", &"a".repeat(SCHEMA_NAME_MAX)] {
            assert!(SchemaName::parse(ok).is_ok(), "{ok} should be accepted");
        }
        for bad in ["", "1abc", "Orders", "a-b", "a\"b", "a;drop", "pg_catalog", "é", &"a".repeat(SCHEMA_NAME_MAX + 1)]
        {
            assert!(SchemaName::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn migrations_are_numbered_from_one_without_holes() {
        for (i, (version, _, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version, i as i64 + 1);
        }
        assert_eq!(latest_version(), MIGRATIONS.len() as i64);
    }
}
