//! `Idempotency-Key` support for mutating requests (PRODUCT.md §4.1): the
//! first request with a key runs and its response is stored durably, scoped
//! to the caller; a retry with the same key and the same request gets that
//! response again, byte for byte; the same key with a different request is a
//! 422; a duplicate arriving while the first is still running is a 409.
//!
//! In-flight detection is exact within one process. Across replicas sharing a
//! store it is best effort: the `Store` port has no conditional insert, so
//! two replicas receiving the same new key at the same instant may both run.

use crate::auth::{Principal, hex, sha256};
use crate::problem::{BodyLimit, Problem};
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use orderly_domain::Timestamp;
use orderly_engine::ports::{Batch, Clock, Row, Store, StoreError};
use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The store table holding recorded responses.
pub const IDEMPOTENCY_TABLE: &str = "idempotency";

/// The request header carrying the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The response header marking a replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Longest accepted key.
pub const IDEMPOTENCY_KEY_MAX_BYTES: usize = 255;

/// Rows deleted per purge commit.
const PURGE_BATCH_MAX: u32 = 500;

/// Purge commits per bucket per run, so a purge always ends.
const PURGE_ROUNDS_MAX: u32 = 1_000;

/// Records are indexed by the hour they expire in, so a purge deletes whole
/// past hours without reading live records.
const BUCKET_MS: i64 = 3_600_000;

/// Response headers recorded and replayed along with status and body.
const RECORDED_HEADERS: [HeaderName; 2] = [CONTENT_TYPE, LOCATION];

/// How long records live and how much the middleware buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencyConfig {
    /// How long a recorded response is replayed.
    pub ttl_ms: i64,
    /// Largest request body read (the body is hashed before the handler runs).
    pub body_limit_bytes: usize,
    /// Responses larger than this are returned but not recorded.
    pub response_body_max_bytes: usize,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        IdempotencyConfig { ttl_ms: 24 * BUCKET_MS, body_limit_bytes: 64 * 1024, response_body_max_bytes: 1024 * 1024 }
    }
}

/// Why an idempotency record could not be read or purged.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    /// The store failed; retry later.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record could not be decoded: a bug or a foreign write.
    #[error("corrupt idempotency record {key}: {detail}")]
    Corrupt {
        /// The record's store key.
        key: String,
        /// What was wrong.
        detail: String,
    },
}

/// The idempotency state shared by all requests: the store of recorded
/// responses, the clock for their TTL, and the keys now in flight.
#[derive(Clone)]
pub struct Idempotency {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: IdempotencyConfig,
    in_flight: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

/// Installs [`idempotency`] on every route of `router` (not the fallbacks).
/// Apply it before [`crate::auth::with_authentication`]: it scopes keys by
/// the authenticated principal.
pub fn with_idempotency<S>(router: axum::Router<S>, idempotency: Idempotency) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router.route_layer(axum::middleware::from_fn_with_state(idempotency, self::idempotency))
}

/// Middleware: applies `Idempotency-Key` semantics to authenticated POST,
/// PUT, PATCH and DELETE requests that carry the header; other requests pass
/// through untouched.
pub async fn idempotency(State(state): State<Idempotency>, request: Request, next: Next) -> Response {
    if !is_mutating(request.method()) {
        return next.run(request).await;
    }
    let key = match idempotency_key(request.headers()) {
        Ok(Some(key)) => key,
        Ok(None) => return next.run(request).await,
        Err(problem) => return problem.into_response(),
    };
    let Some(principal) = request.extensions().get::<Principal>().cloned() else {
        return next.run(request).await;
    };
    match state.handle(&key, &principal, request, next).await {
        Ok(response) => response,
        Err(problem) => problem.into_response(),
    }
}

impl Idempotency {
    /// Idempotency over `store` (its `idempotency` table), timed by `clock`.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, config: IdempotencyConfig) -> Idempotency {
        Idempotency { inner: Arc::new(Inner { store, clock, config, in_flight: Mutex::new(HashSet::new()) }) }
    }

    /// The configuration in force.
    pub fn config(&self) -> IdempotencyConfig {
        self.inner.config
    }

    /// Runs or replays one keyed request.
    async fn handle(
        &self,
        key: &str,
        principal: &Principal,
        request: Request,
        next: Next,
    ) -> Result<Response, Problem> {
        let (parts, body) = request.into_parts();
        let limit = parts
            .extensions
            .get::<BodyLimit>()
            .map_or(self.inner.config.body_limit_bytes, |outer| outer.0.min(self.inner.config.body_limit_bytes));
        let body = read_body(body, limit).await?;
        let scope = scope_key(principal, key);
        let fingerprint = request_hash(&parts.method, &parts.uri, principal, &body);
        let _claim = self.claim(&scope).ok_or_else(in_flight_problem)?;
        let now = self.inner.clock.now();
        if let Some(record) = self.load(&scope, now).await.map_err(store_problem)? {
            if record.request_hash != fingerprint {
                return Err(reuse_problem());
            }
            tracing::debug!(principal = %principal.name, "replaying an idempotent response");
            return record.replay().map_err(|detail| store_problem(IdempotencyError::Corrupt { key: scope, detail }));
        }
        let response = next.run(Request::from_parts(parts, Body::from(body))).await;
        if !is_recordable(response.status()) {
            return Ok(response);
        }
        self.record(scope, fingerprint, principal, now, response).await
    }

    /// Buffers a fresh response, stores it, and returns it unchanged.
    async fn record(
        &self,
        scope: String,
        fingerprint: String,
        principal: &Principal,
        now: Timestamp,
        response: Response,
    ) -> Result<Response, Problem> {
        let max = self.inner.config.response_body_max_bytes;
        let fits = response.body().size_hint().upper().is_some_and(|upper| upper <= max as u64);
        if !fits {
            tracing::warn!(max, "response too large to record for idempotent replay");
            return Ok(response);
        }
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, max).await.map_err(|error| {
            tracing::error!(%error, "could not buffer a response for idempotent replay");
            Problem::internal()
        })?;
        let expires_at = now.plus_ms(self.inner.config.ttl_ms);
        let record = Record {
            request_hash: fingerprint,
            principal: principal.name.clone(),
            status: parts.status.as_u16(),
            headers: recorded_headers(&parts.headers),
            body: base64::engine::general_purpose::STANDARD.encode(&bytes),
            created_at_ms: now.millis(),
            expires_at_ms: expires_at.millis(),
        };
        self.store(scope, &record, expires_at).await;
        Ok(Response::from_parts(parts, Body::from(bytes)))
    }

    /// Commits a record. A failure is logged, not returned: the effect has
    /// happened and the caller deserves its response; only a replay is lost.
    async fn store(&self, scope: String, record: &Record, expires_at: Timestamp) {
        let doc = match serde_json::to_vec(record) {
            Ok(doc) => doc,
            Err(error) => {
                tracing::error!(%error, "could not encode an idempotency record");
                return;
            }
        };
        let row = Row { table: IDEMPOTENCY_TABLE, key: scope, idx: Some(bucket_of(expires_at)), doc };
        let batch = Batch { puts: vec![row], ..Batch::default() };
        if let Err(error) = self.inner.store.commit(batch).await {
            tracing::warn!(%error, "could not record a response for idempotent replay");
        }
    }

    /// The unexpired record for `scope`, if any.
    async fn load(&self, scope: &str, now: Timestamp) -> Result<Option<Record>, IdempotencyError> {
        let Some(row) = self.inner.store.get(IDEMPOTENCY_TABLE, scope).await? else {
            return Ok(None);
        };
        let record: Record = serde_json::from_slice(&row.doc)
            .map_err(|error| IdempotencyError::Corrupt { key: scope.to_string(), detail: error.to_string() })?;
        Ok((record.expires_at_ms > now.millis()).then_some(record))
    }

    /// Marks `scope` in flight; `None` when it already is.
    fn claim(&self, scope: &str) -> Option<Claim> {
        let mut in_flight = self.inner.in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        in_flight.insert(scope.to_string()).then(|| Claim { owner: self.inner.clone(), scope: scope.to_string() })
    }

    /// Deletes every record that expired before the current hour began and
    /// returns how many. Records of the current hour expire lazily: a lookup
    /// ignores them and the next request with the key overwrites them.
    pub async fn purge_expired(&self) -> Result<u64, IdempotencyError> {
        let now = self.inner.clock.now();
        let current = now.millis().div_euclid(BUCKET_MS);
        let mut purged = 0;
        for (bucket, _) in self.inner.store.count_by_idx(IDEMPOTENCY_TABLE).await? {
            if bucket.parse::<i64>().is_ok_and(|hour| hour < current) {
                purged += self.purge_bucket(&bucket, now).await?;
            }
        }
        Ok(purged)
    }

    /// Deletes the expired records of one past bucket, a batch at a time.
    async fn purge_bucket(&self, bucket: &str, now: Timestamp) -> Result<u64, IdempotencyError> {
        let mut purged = 0;
        for _ in 0..PURGE_ROUNDS_MAX {
            let rows = self.inner.store.scan(IDEMPOTENCY_TABLE, Some(bucket), None, PURGE_BATCH_MAX).await?;
            let scanned = rows.len();
            // A key may be re-recorded between scan and delete: claim each,
            // then re-read it, so only records still expired are deleted.
            let claims: Vec<Claim> = rows.iter().filter_map(|row| self.claim(&row.key)).collect();
            let mut batch = Batch::default();
            for claim in &claims {
                if self.load(&claim.scope, now).await?.is_none() {
                    batch.deletes.push((IDEMPOTENCY_TABLE, claim.scope.clone()));
                }
            }
            purged += batch.deletes.len() as u64;
            if !batch.is_empty() {
                self.inner.store.commit(batch).await?;
            }
            drop(claims);
            if scanned < PURGE_BATCH_MAX as usize {
                break;
            }
        }
        Ok(purged)
    }

    /// Purges expired records every `every` until `shutdown` completes.
    /// Failures are logged and retried at the next tick.
    pub async fn run_purger(&self, every: Duration, shutdown: impl Future<Output = ()>) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = ticks.tick() => match self.purge_expired().await {
                    Ok(0) => {}
                    Ok(purged) => tracing::debug!(purged, "purged expired idempotency records"),
                    Err(error) => tracing::warn!(%error, "idempotency purge failed"),
                },
            }
        }
    }
}

/// A key marked in flight; dropping it (normal end, error, panic or
/// cancellation by a timeout) clears the mark.
struct Claim {
    owner: Arc<Inner>,
    scope: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut in_flight = self.owner.in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        in_flight.remove(&self.scope);
    }
}

/// A recorded response, as stored (JSON).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Record {
    /// Fingerprint of method, path and query, principal and body.
    request_hash: String,
    /// Who made the request (for operators reading the table).
    principal: String,
    status: u16,
    /// The recorded subset of headers, as (name, value).
    headers: Vec<(String, String)>,
    /// The body, base64 (standard alphabet).
    body: String,
    created_at_ms: i64,
    expires_at_ms: i64,
}

impl Record {
    /// The recorded response, marked `Idempotent-Replayed: true`.
    fn replay(self) -> Result<Response, String> {
        let status = StatusCode::from_u16(self.status).map_err(|error| error.to_string())?;
        let body = base64::engine::general_purpose::STANDARD.decode(&self.body).map_err(|error| error.to_string())?;
        let mut response = (status, Bytes::from(body)).into_response();
        let headers = response.headers_mut();
        headers.remove(CONTENT_TYPE);
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|error| error.to_string())?;
            let value = HeaderValue::from_str(value).map_err(|error| error.to_string())?;
            headers.insert(name, value);
        }
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        Ok(response)
    }
}

/// The caller's Idempotency-Key of a request scoped to the caller, if it sent
/// a valid one. A handler passes it to the engine, which commits it with the
/// resource it creates: the response recorded here is written after that
/// commit, so a crash (or a timeout) in between would otherwise let a retry
/// create the resource a second time.
pub fn scoped_key(principal: &Principal, headers: &HeaderMap) -> Option<String> {
    idempotency_key(headers).ok().flatten().map(|key| scope_key(principal, &key))
}

/// The key from the header: `Ok(None)` without one, a 400 problem when it is
/// repeated, empty, too long or not visible ASCII.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let invalid = || {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            format!("send one Idempotency-Key header of 1 to {IDEMPOTENCY_KEY_MAX_BYTES} visible ASCII characters"),
        )
    };
    if values.next().is_some() {
        return Err(invalid());
    }
    let bytes = value.as_bytes();
    let valid = !bytes.is_empty() && bytes.len() <= IDEMPOTENCY_KEY_MAX_BYTES && bytes.iter().all(u8::is_ascii_graphic);
    match (valid, value.to_str()) {
        (true, Ok(key)) => Ok(Some(key.to_string())),
        _ => Err(invalid()),
    }
}

/// Reads the whole request body, at most `limit` bytes (413 beyond).
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Problem> {
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        if is_length_limit(&error) {
            Problem::payload_too_large(Some(limit))
        } else {
            Problem::bad_request("could not read the request body")
        }
    })
}

/// True when a body error is (or was caused by) a length limit.
fn is_length_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        current = error.source();
    }
    false
}

/// The store key of a (principal, key) pair: fixed length, whatever the key.
/// The role is part of the scope so a key whose role changes starts afresh.
fn scope_key(principal: &Principal, key: &str) -> String {
    hex(&sha256(&length_prefixed(&[
        b"v1",
        principal.name.as_bytes(),
        principal.role.as_str().as_bytes(),
        key.as_bytes(),
    ])))
}

/// Fingerprint of what the request asks for.
fn request_hash(method: &Method, uri: &axum::http::Uri, principal: &Principal, body: &[u8]) -> String {
    let target = uri.path_and_query().map_or(uri.path(), |target| target.as_str());
    hex(&sha256(&length_prefixed(&[method.as_str().as_bytes(), target.as_bytes(), principal.name.as_bytes(), body])))
}

/// Concatenates fields, each after its length, so no two field lists collide.
fn length_prefixed(fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fields.iter().map(|field| field.len() + 8).sum());
    for field in fields {
        out.extend_from_slice(&(field.len() as u64).to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// The index value of a record expiring at `expires_at`: its hour, padded so
/// text order is time order.
fn bucket_of(expires_at: Timestamp) -> String {
    format!("{:012}", expires_at.millis().div_euclid(BUCKET_MS).max(0))
}

/// The recorded subset of a response's headers.
fn recorded_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    RECORDED_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(name)?.to_str().ok()?;
            Some((name.as_str().to_string(), value.to_string()))
        })
        .collect()
}

/// Methods that change state.
fn is_mutating(method: &Method) -> bool {
    *method == Method::POST || *method == Method::PUT || *method == Method::PATCH || *method == Method::DELETE
}

/// Server errors and "try again later" answers are not recorded: a retry
/// must run again.
fn is_recordable(status: StatusCode) -> bool {
    !status.is_server_error() && status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::REQUEST_TIMEOUT
}

fn in_flight_problem() -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "idempotency-key-in-flight",
        "Request in progress",
        "a request with this Idempotency-Key is still being processed; retry once it has completed",
    )
    .with_retry_after(1)
}

fn reuse_problem() -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reuse",
        "Idempotency-Key reused",
        "this Idempotency-Key was already used for a different request (method, path or body); use a new key for a new request",
    )
}

fn store_problem(error: IdempotencyError) -> Problem {
    match error {
        IdempotencyError::Store(error) => {
            tracing::warn!(%error, "idempotency records unavailable");
            Problem::unavailable("idempotency records are unavailable; retry the request later").with_retry_after(1)
        }
        IdempotencyError::Corrupt { key, detail } => {
            tracing::error!(key, detail, "corrupt idempotency record");
            Problem::internal()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(key: &[u8]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_bytes(key).expect("valid header value"));
        headers
    }

    #[test]
    fn keys_are_bounded_and_visible_ascii() {
        assert_eq!(idempotency_key(&HeaderMap::new()).expect("absent is fine"), None);
        assert_eq!(idempotency_key(&headers(b"abc-123")).expect("valid"), Some("abc-123".to_string()));
        let longest = "k".repeat(IDEMPOTENCY_KEY_MAX_BYTES);
        assert!(idempotency_key(&headers(longest.as_bytes())).is_ok());
        let too_long = "k".repeat(IDEMPOTENCY_KEY_MAX_BYTES + 1);
        for bad in [too_long.as_bytes(), b"", b"a b", "é".as_bytes()] {
            let problem = idempotency_key(&headers(bad)).expect_err("invalid");
            assert_eq!(problem.status(), StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn fields_cannot_run_into_each_other() {
        assert_ne!(length_prefixed(&[b"ab", b"c"]), length_prefixed(&[b"a", b"bc"]));
    }

    #[test]
    fn scopes_differ_per_principal_and_role() {
        let a = Principal { name: "a".into(), role: crate::auth::Role::Storefront };
        let b = Principal { name: "b".into(), role: crate::auth::Role::Storefront };
        let a_ops = Principal { name: "a".into(), role: crate::auth::Role::Ops };
        assert_ne!(scope_key(&a, "k"), scope_key(&b, "k"));
        assert_ne!(scope_key(&a, "k"), scope_key(&a_ops, "k"));
        assert_eq!(scope_key(&a, "k").len(), 64);
    }

    #[test]
    fn buckets_sort_as_time() {
        assert!(bucket_of(Timestamp(BUCKET_MS * 9)) < bucket_of(Timestamp(BUCKET_MS * 10)));
    }
}
