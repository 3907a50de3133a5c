//! API-key authentication and role checks. Keys live in the config only as
//! SHA-256 hashes; a presented bearer token is hashed and compared with every
//! configured hash in constant time. The key ring can be swapped at runtime,
//! so a config reload revokes a key at once. Keys are never logged.

use crate::problem::Problem;
use arc_swap::ArcSwap;
use axum::extract::{FromRequestParts, OptionalFromRequestParts, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{Extensions, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use orderly_engine::config::{ApiKey, AuthSettings};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use subtle::ConstantTimeEq;

/// Bearer tokens longer than this are rejected without hashing.
pub const TOKEN_MAX_BYTES: usize = 512;

/// Key names longer than this are a config error.
pub const KEY_NAME_MAX_BYTES: usize = 128;

/// Keys in one ring at most: authentication compares against every one.
pub const KEYS_MAX: usize = 1024;

/// Prefix of every generated key, so leaked keys are easy to grep for.
pub const KEY_PREFIX: &str = "ok_";

/// Random bytes in a generated key (256 bits).
const KEY_ENTROPY_BYTES: usize = 32;

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Orders and holds.
    Storefront,
    /// Picks, packs, receiving.
    Warehouse,
    /// Delivery callbacks.
    Carrier,
    /// Everything, including adjustments, overrides, rates and dead letters.
    Ops,
    /// Read only.
    Viewer,
}

impl Role {
    /// Every role, for read endpoints any key may use.
    pub const ALL: &'static [Role] = &[Role::Storefront, Role::Warehouse, Role::Carrier, Role::Ops, Role::Viewer];

    /// The config spelling: `storefront`, `warehouse`, `carrier`, `ops`, `viewer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Storefront => "storefront",
            Role::Warehouse => "warehouse",
            Role::Carrier => "carrier",
            Role::Ops => "ops",
            Role::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of the five roles.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: use storefront, warehouse, carrier, ops or viewer")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        match s {
            "storefront" => Ok(Role::Storefront),
            "warehouse" => Ok(Role::Warehouse),
            "carrier" => Ok(Role::Carrier),
            "ops" => Ok(Role::Ops),
            "viewer" => Ok(Role::Viewer),
            other => Err(UnknownRole(other.to_string())),
        }
    }
}

/// Who made a request: the configured key's name and role. Handlers extract
/// it (401 problem when the request has no valid key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// The key's configured name (e.g. `ops-console`).
    pub name: String,
    /// The key's role.
    pub role: Role,
}

impl Principal {
    /// `Ok` when this principal's role is in `allowed` (ops always is),
    /// else a 403 problem.
    pub fn require(&self, allowed: &[Role]) -> Result<(), Problem> {
        require(self, allowed)
    }
}

/// `Ok` when the principal's role is in `allowed` (ops is allowed everything),
/// else a 403 problem naming the roles that are.
pub fn require(principal: &Principal, allowed: &[Role]) -> Result<(), Problem> {
    if principal.role == Role::Ops || allowed.contains(&principal.role) {
        return Ok(());
    }
    let mut names: Vec<&str> = allowed.iter().map(|role| role.as_str()).collect();
    if !names.contains(&"ops") {
        names.push("ops");
    }
    Err(Problem::forbidden(format!("role {} may not do this; it needs one of: {}", principal.role, names.join(", "))))
}

/// Why the `[auth]` settings cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    /// A key has an empty, overlong or non-printable name.
    #[error("auth.keys: invalid key name {0:?} (1 to {KEY_NAME_MAX_BYTES} printable characters)")]
    InvalidName(String),
    /// Two keys share a name.
    #[error("auth.keys: the name {0:?} is used by more than one key")]
    DuplicateName(String),
    /// A key's role is not one of the five.
    #[error("auth.keys[{name}]: {source}")]
    UnknownRole {
        /// The key's name.
        name: String,
        /// The role problem.
        source: UnknownRole,
    },
    /// A key's hash is not `sha256:` followed by 64 hex digits.
    #[error("auth.keys[{0}]: hash must be \"sha256:\" followed by 64 hex digits (see `orderly keys new`)")]
    InvalidHash(String),
    /// More keys than [`KEYS_MAX`].
    #[error("auth.keys: {0} keys configured, at most {KEYS_MAX} are allowed")]
    TooManyKeys(usize),
}

/// One configured key: name, role and the SHA-256 of the key.
#[derive(Clone)]
struct StoredKey {
    principal: Principal,
    hash: [u8; 32],
}

/// The configured API keys, validated. Immutable: a reload builds a new ring
/// and swaps it into a [`SharedKeyRing`].
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: Vec<StoredKey>,
}

impl KeyRing {
    /// Validates `[auth] keys` (name, role, `sha256:<64 hex>` hash, unique names).
    pub fn from_settings(settings: &AuthSettings) -> Result<KeyRing, AuthConfigError> {
        KeyRing::from_keys(&settings.keys)
    }

    /// Validates a list of configured keys.
    pub fn from_keys(keys: &[ApiKey]) -> Result<KeyRing, AuthConfigError> {
        if keys.len() > KEYS_MAX {
            return Err(AuthConfigError::TooManyKeys(keys.len()));
        }
        let mut names = HashSet::new();
        let mut stored = Vec::with_capacity(keys.len());
        for key in keys {
            let valid_name =
                !key.name.is_empty() && key.name.len() <= KEY_NAME_MAX_BYTES && !key.name.chars().any(char::is_control);
            if !valid_name {
                return Err(AuthConfigError::InvalidName(key.name.clone()));
            }
            if !names.insert(key.name.as_str()) {
                return Err(AuthConfigError::DuplicateName(key.name.clone()));
            }
            let role = key
                .role
                .parse::<Role>()
                .map_err(|source| AuthConfigError::UnknownRole { name: key.name.clone(), source })?;
            let hash = parse_hash(&key.hash).ok_or_else(|| AuthConfigError::InvalidHash(key.name.clone()))?;
            stored.push(StoredKey { principal: Principal { name: key.name.clone(), role }, hash });
        }
        Ok(KeyRing { keys: stored })
    }

    /// A ring with no keys: every request that needs a key is refused.
    pub fn empty() -> KeyRing {
        KeyRing::default()
    }

    /// True when no key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The principal whose configured hash is the SHA-256 of `token`, if any.
    /// Every stored hash is compared, in constant time, whatever matches.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        if token.is_empty() || token.len() > TOKEN_MAX_BYTES {
            return None;
        }
        let presented = sha256(token.as_bytes());
        let mut found = None;
        for key in &self.keys {
            let equal: bool = key.hash.ct_eq(&presented).into();
            if equal && found.is_none() {
                found = Some(&key.principal);
            }
        }
        found.cloned()
    }
}

impl fmt::Debug for KeyRing {
    /// Names and roles only: hashes stay out of logs too.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.keys.iter().map(|key| (&key.principal.name, key.principal.role))).finish()
    }
}

/// The live key ring, shared by every request and swapped whole on reload:
/// readers never block, and a revoked key fails on the very next request.
#[derive(Clone, Default)]
pub struct SharedKeyRing(Arc<ArcSwap<KeyRing>>);

impl SharedKeyRing {
    /// Shares `ring`.
    pub fn new(ring: KeyRing) -> SharedKeyRing {
        SharedKeyRing(Arc::new(ArcSwap::from_pointee(ring)))
    }

    /// The ring in force now.
    pub fn current(&self) -> Arc<KeyRing> {
        self.0.load_full()
    }

    /// Puts `ring` in force for every later request.
    pub fn replace(&self, ring: KeyRing) {
        self.0.store(Arc::new(ring));
    }

    /// Validates `settings` and puts them in force; on error the old ring stays.
    pub fn reload(&self, settings: &AuthSettings) -> Result<(), AuthConfigError> {
        self.replace(KeyRing::from_settings(settings)?);
        Ok(())
    }
}

impl fmt::Debug for SharedKeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedKeyRing").field(&*self.0.load()).finish()
    }
}

/// Put in request extensions by [`authenticate`] when no key was presented,
/// so the 401 can say whether any key is configured at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anonymous {
    /// False when the server has no key configured.
    pub keys_configured: bool,
}

/// Middleware: identifies the caller. A valid `Authorization: Bearer <key>`
/// puts a [`Principal`] in request extensions; a presented but unknown or
/// malformed key is a 401 at once; no key passes on as [`Anonymous`] (open
/// routes such as `/healthz` need none; [`Principal`] extraction answers 401).
/// A viewer key is refused (403) on any method other than GET, HEAD, OPTIONS.
pub async fn authenticate(State(keys): State<SharedKeyRing>, mut request: Request, next: Next) -> Response {
    let ring = keys.current();
    match identify(&ring, request.headers()) {
        Identity::Anonymous => {
            request.extensions_mut().insert(Anonymous { keys_configured: !ring.is_empty() });
        }
        Identity::Rejected(problem) => return problem.into_response(),
        Identity::Known(principal) => {
            if principal.role == Role::Viewer && !is_read(request.method()) {
                return Problem::forbidden("role viewer is read-only").into_response();
            }
            tracing::debug!(principal = %principal.name, role = %principal.role, "authenticated");
            request.extensions_mut().insert(principal);
        }
    }
    next.run(request).await
}

/// Wraps every route (and the fallback) of `router` with [`authenticate`].
/// Apply it after [`crate::idempotency::with_idempotency`], so idempotency
/// sees the principal.
pub fn with_authentication<S>(router: axum::Router<S>, keys: SharedKeyRing) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router.layer(axum::middleware::from_fn_with_state(keys, authenticate))
}

/// The outcome of reading the `Authorization` header.
enum Identity {
    Anonymous,
    Known(Principal),
    Rejected(Problem),
}

/// Reads and checks the bearer token, if any.
fn identify(ring: &KeyRing, headers: &HeaderMap) -> Identity {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Identity::Anonymous;
    };
    let malformed =
        || Identity::Rejected(Problem::unauthorized("malformed Authorization header; expected `Bearer <api key>`"));
    if values.next().is_some() {
        return malformed();
    }
    let Ok(value) = value.to_str() else {
        return malformed();
    };
    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return malformed();
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return malformed();
    }
    match ring.authenticate(token.trim()) {
        Some(principal) => Identity::Known(principal),
        None => Identity::Rejected(Problem::unauthorized("the API key is not valid (unknown or revoked)")),
    }
}

/// True for methods that only read.
fn is_read(method: &Method) -> bool {
    *method == Method::GET || *method == Method::HEAD || *method == Method::OPTIONS
}

/// The 401 for a request without a principal.
fn missing_key(extensions: &Extensions) -> Problem {
    match extensions.get::<Anonymous>() {
        Some(Anonymous { keys_configured: false }) => Problem::unauthorized(
            "no API key is configured on this server, so requests that need one are refused; create one with `orderly keys new`",
        ),
        _ => Problem::unauthorized("this endpoint needs an API key: send `Authorization: Bearer <api key>`"),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Principal, Problem> {
        parts.extensions.get::<Principal>().cloned().ok_or_else(|| missing_key(&parts.extensions))
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Principal {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Option<Principal>, Infallible> {
        Ok(parts.extensions.get::<Principal>().cloned())
    }
}

/// A route layer that lets through only principals with one of the given
/// roles (ops always): 401 without a key, 403 with the wrong role.
/// `Router::new().route(..).route_layer(RequireRoles::new(&[Role::Warehouse]))`.
#[derive(Debug, Clone, Copy)]
pub struct RequireRoles {
    allowed: &'static [Role],
}

impl RequireRoles {
    /// Requires one of `allowed` (ops is always allowed).
    pub const fn new(allowed: &'static [Role]) -> RequireRoles {
        RequireRoles { allowed }
    }
}

impl<S> tower::Layer<S> for RequireRoles {
    type Service = RequireRolesService<S>;

    fn layer(&self, inner: S) -> RequireRolesService<S> {
        RequireRolesService { inner, allowed: self.allowed }
    }
}

/// The service [`RequireRoles`] wraps a route in.
#[derive(Debug, Clone)]
pub struct RequireRolesService<S> {
    inner: S,
    allowed: &'static [Role],
}

impl<S> tower::Service<Request> for RequireRolesService<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let verdict = match request.extensions().get::<Principal>() {
            Some(principal) => require(principal, self.allowed),
            None => Err(missing_key(request.extensions())),
        };
        match verdict {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(problem) => Box::pin(std::future::ready(Ok(problem.into_response()))),
        }
    }
}

/// Why a key could not be generated.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed: {0}")]
pub struct KeyGenerationError(String);

/// A fresh API key and its config hash: `("ok_<43 base64url chars>",
/// "sha256:<64 hex>")`. The key carries 256 bits from the OS generator; print
/// it once and store only the hash.
pub fn generate_key() -> Result<(String, String), KeyGenerationError> {
    let mut entropy = [0u8; KEY_ENTROPY_BYTES];
    getrandom::fill(&mut entropy).map_err(|error| KeyGenerationError(error.to_string()))?;
    let key = format!("{KEY_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(entropy));
    let hash = hash_key(&key);
    Ok((key, hash))
}

/// The config hash of a key: `sha256:<64 lowercase hex>`.
pub fn hash_key(key: &str) -> String {
    format!("sha256:{}", hex(&sha256(key.as_bytes())))
}

/// The `[[auth.keys]]` TOML block for a key, as `orderly keys new` prints it.
pub fn render_key_block(name: &str, role: Role, hash: &str) -> String {
    format!(
        "[[auth.keys]]\nname = {}\nrole = {}\nhash = {}\n",
        toml_string(name),
        toml_string(role.as_str()),
        toml_string(hash)
    )
}

/// A TOML basic string, escaped.
fn toml_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

/// Parses `sha256:<64 hex digits>` (either case).
fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let digits = text.strip_prefix("sha256:")?.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (byte, pair) in hash.iter_mut().zip(digits.chunks_exact(2)) {
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(pair[1]).to_digit(16)?;
        *byte = u8::try_from(high * 16 + low).ok()?;
    }
    Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, role: &str, hash: &str) -> ApiKey {
        ApiKey { name: name.to_string(), role: role.to_string(), hash: hash.to_string() }
    }

    #[test]
    fn a_ring_authenticates_by_hash_only() {
        let hash = hash_key("secret-token");
        let ring = KeyRing::from_keys(&[key("shop", "storefront", &hash)]).expect("valid");
        let principal = ring.authenticate("secret-token").expect("known key");
        assert_eq!(principal, Principal { name: "shop".into(), role: Role::Storefront });
        assert_eq!(ring.authenticate(&hash), None);
        assert_eq!(ring.authenticate(hash.trim_start_matches("sha256:")), None);
        assert_eq!(ring.authenticate(""), None);
        assert_eq!(ring.authenticate(&"x".repeat(TOKEN_MAX_BYTES + 1)), None);
    }

    #[test]
    fn uppercase_hex_is_accepted() {
        let hash = hash_key("k").to_uppercase().replace("SHA256:", "sha256:");
        let ring = KeyRing::from_keys(&[key("a", "ops", &hash)]).expect("valid");
        assert!(ring.authenticate("k").is_some());
    }

    #[test]
    fn bad_configs_are_rejected_with_a_reason() {
        let good = hash_key("k");
        let cases = [
            (vec![key("", "ops", &good)], AuthConfigError::InvalidName(String::new())),
            (vec![key("a", "ops", &good), key("a", "viewer", &good)], AuthConfigError::DuplicateName("a".into())),
            (
                vec![key("a", "admin", &good)],
                AuthConfigError::UnknownRole { name: "a".into(), source: UnknownRole("admin".into()) },
            ),
            (vec![key("a", "ops", "md5:00")], AuthConfigError::InvalidHash("a".into())),
            (vec![key("a", "ops", &good[..70])], AuthConfigError::InvalidHash("a".into())),
            (vec![key("a", "ops", &format!("sha256:{}", "g".repeat(64)))], AuthConfigError::InvalidHash("a".into())),
            (vec![key("a", "ops", &format!("{good}00"))], AuthConfigError::InvalidHash("a".into())),
        ];
        for (keys, expected) in cases {
            assert_eq!(KeyRing::from_keys(&keys).err(), Some(expected));
        }
    }

    #[test]
    fn ops_may_do_everything_others_only_their_roles() {
        let ops = Principal { name: "o".into(), role: Role::Ops };
        let shop = Principal { name: "s".into(), role: Role::Storefront };
        assert!(require(&ops, &[Role::Warehouse]).is_ok());
        assert!(require(&shop, &[Role::Storefront]).is_ok());
        let denied = require(&shop, &[Role::Warehouse]).expect_err("wrong role");
        assert_eq!(denied.status(), axum::http::StatusCode::FORBIDDEN);
        assert!(denied.detail().contains("warehouse, ops"));
    }

    #[test]
    fn generated_keys_are_long_random_and_hash_to_their_hash() {
        let (key_a, hash_a) = generate_key().expect("os rng");
        let (key_b, _) = generate_key().expect("os rng");
        assert_ne!(key_a, key_b);
        assert_eq!(key_a.len(), KEY_PREFIX.len() + 43);
        assert!(key_a[KEY_PREFIX.len()..].chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(hash_key(&key_a), hash_a);
        assert!(parse_hash(&hash_a).is_some());
    }

    #[test]
    fn key_names_are_escaped_in_the_toml_block() {
        let block = render_key_block("a \"b\"\\", Role::Ops, "sha256:00");
        assert!(block.contains(r#"name = "a \"b\"\\""#), "{block}");
    }

    #[test]
    fn debug_output_hides_hashes() {
        let hash = hash_key("k");
        let ring = KeyRing::from_keys(&[key("a", "ops", &hash)]).expect("valid");
        let shown = format!("{:?}", SharedKeyRing::new(ring));
        assert!(!shown.contains(&hash[7..20]), "{shown}");
        assert!(shown.contains("Ops"));
    }
}
