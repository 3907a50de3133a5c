//! How PostgreSQL failures become [`StoreError`]s: what a retry can fix now
//! (another writer got there first) is a conflict; what needs the server or
//! network back is unavailable; bytes we cannot decode are corrupt.

use orderly_engine::ports::StoreError;

/// SQLSTATEs that mean "another transaction won; retry the batch":
/// serialization_failure, deadlock_detected, unique_violation, lock_not_available.
const CONFLICT_CODES: &[&str] = &["40001", "40P01", "23505", "55P03"];

/// Maps a sqlx error to the store's error kinds.
pub(crate) fn store_error(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.code().is_some_and(|c| CONFLICT_CODES.contains(&c.as_ref())) => {
            let constraint = db.constraint().map(|c| format!(" ({c})")).unwrap_or_default();
            StoreError::Conflict(format!("{}{constraint}", db.message()))
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::ColumnNotFound(_) => {
            StoreError::Corrupt { table: "?".into(), key: "?".into(), detail: e.to_string() }
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// An unavailable error with a message.
pub(crate) fn unavailable(detail: impl Into<String>) -> StoreError {
    StoreError::Unavailable(detail.into())
}
