//! RFC 9457 problem details: the one error shape of the HTTP API. Every error
//! the API answers — from handlers, extractors, middleware, the router's
//! fallbacks and even a caught panic — is `application/problem+json` with a
//! stable `type` URI and a human `detail`.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, OriginalUri, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use std::any::Any;
use std::fmt;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Every problem `type` URI starts with this; the rest is a stable slug.
pub const PROBLEM_TYPE_BASE: &str = "https://orderly.dev/problems/";

/// Bare error bodies longer than this are not reused as a problem's detail.
const BARE_ERROR_DETAIL_MAX_BYTES: usize = 4 * 1024;

/// One RFC 9457 problem: what went wrong, for a machine (`type`, `status`) and
/// for a human (`title`, `detail`), plus optional extension members.
///
/// Handlers return `Result<_, Problem>`; `Problem` is an [`IntoResponse`].
///
/// Boxed, so `Result<T, Problem>` stays one pointer wide on the error side.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem(Box<Details>);

/// The members of a [`Problem`].
#[derive(Debug, Clone, PartialEq)]
struct Details {
    type_uri: String,
    title: String,
    status: StatusCode,
    detail: String,
    instance: Option<String>,
    extra: Map<String, Value>,
    headers: HeaderMap,
}

impl Problem {
    /// A problem of type `PROBLEM_TYPE_BASE + slug`, e.g.
    /// `Problem::new(StatusCode::CONFLICT, "insufficient-stock", "Insufficient stock", "only 3 left")`.
    /// The slug is part of the API contract: never rename one.
    pub fn new(status: StatusCode, slug: &str, title: impl Into<String>, detail: impl Into<String>) -> Problem {
        Problem(Box::new(Details {
            type_uri: format!("{PROBLEM_TYPE_BASE}{slug}"),
            title: title.into(),
            status,
            detail: detail.into(),
            instance: None,
            extra: Map::new(),
            headers: HeaderMap::new(),
        }))
    }

    /// 400: the request is malformed (bad query, bad header, bad path).
    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, "bad-request", "Bad request", detail)
    }

    /// 400: the body is not syntactically valid JSON.
    pub fn malformed_json(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, "malformed-json", "Malformed JSON", detail)
    }

    /// 401 with `WWW-Authenticate: Bearer`: no API key, or one we do not know.
    pub fn unauthorized(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", detail)
            .with_header(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"orderly\""))
    }

    /// 403: the API key is valid but its role may not do this.
    pub fn forbidden(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    /// 404: no such resource (or route).
    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 405: the route exists but not for this method.
    pub fn method_not_allowed(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "Method not allowed", detail)
    }

    /// 409: the request conflicts with the current state; use [`Problem::new`]
    /// for a more specific type such as `insufficient-stock`.
    pub fn conflict(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::CONFLICT, "conflict", "Conflict", detail)
    }

    /// 413: the body is larger than the configured limit (when known).
    pub fn payload_too_large(limit_bytes: Option<usize>) -> Problem {
        let detail = match limit_bytes {
            Some(limit) => format!("the request body exceeds the limit of {limit} bytes"),
            None => "the request body exceeds the configured limit".to_string(),
        };
        let problem = Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", "Payload too large", detail);
        match limit_bytes {
            Some(limit) => problem.with_extra("limit_bytes", Value::from(limit)),
            None => problem,
        }
    }

    /// 415: the body is not `application/json`.
    pub fn unsupported_media_type(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "Unsupported media type", detail)
    }

    /// 422: well-formed JSON whose content is invalid (wrong type, missing
    /// field, rule violated).
    pub fn unprocessable(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable-content", "Unprocessable content", detail)
    }

    /// 429 with `Retry-After`: the caller should slow down.
    pub fn too_many_requests(retry_after_seconds: u64, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::TOO_MANY_REQUESTS, "too-many-requests", "Too many requests", detail)
            .with_retry_after(retry_after_seconds)
    }

    /// 503: a dependency is unavailable or the server is overloaded; add
    /// [`Problem::with_retry_after`] when a retry time is known.
    pub fn unavailable(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "service-unavailable", "Service unavailable", detail)
    }

    /// 500: a bug. The detail never carries internals; they go to the log.
    pub fn internal() -> Problem {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal-error",
            "Internal error",
            "an unexpected error occurred; it has been logged",
        )
    }

    /// Sets `instance`, a URI reference for this occurrence (e.g. the order's path).
    pub fn with_instance(mut self, instance: impl Into<String>) -> Problem {
        self.0.instance = Some(instance.into());
        self
    }

    /// Adds an extension member. The standard members (`type`, `title`,
    /// `status`, `detail`, `instance`) cannot be overridden this way.
    pub fn with_extra(mut self, name: impl Into<String>, value: Value) -> Problem {
        self.0.extra.insert(name.into(), value);
        self
    }

    /// Sets the `Retry-After` header, in seconds.
    pub fn with_retry_after(self, seconds: u64) -> Problem {
        self.with_header(RETRY_AFTER, HeaderValue::from(seconds))
    }

    /// Adds a response header (e.g. `Allow`); `Content-Type` is always
    /// `application/problem+json` and cannot be changed.
    pub fn with_header(mut self, name: axum::http::HeaderName, value: HeaderValue) -> Problem {
        if name != CONTENT_TYPE && name != CONTENT_LENGTH {
            self.0.headers.insert(name, value);
        }
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.0.status
    }

    /// The stable `type` URI.
    pub fn type_uri(&self) -> &str {
        &self.0.type_uri
    }

    /// The short, human summary of the type.
    pub fn title(&self) -> &str {
        &self.0.title
    }

    /// The human explanation of this occurrence.
    pub fn detail(&self) -> &str {
        &self.0.detail
    }

    /// The occurrence's URI reference, if set.
    pub fn instance(&self) -> Option<&str> {
        self.0.instance.as_deref()
    }

    /// Extension members.
    pub fn extra(&self) -> &Map<String, Value> {
        &self.0.extra
    }

    /// The response headers this problem adds.
    pub fn headers(&self) -> &HeaderMap {
        &self.0.headers
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.0.status.as_u16(), self.0.title, self.0.detail)
    }
}

impl std::error::Error for Problem {}

impl Serialize for Problem {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        const STANDARD: [&str; 5] = ["type", "title", "status", "detail", "instance"];
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", &self.0.type_uri)?;
        map.serialize_entry("title", &self.0.title)?;
        map.serialize_entry("status", &self.0.status.as_u16())?;
        map.serialize_entry("detail", &self.0.detail)?;
        if let Some(instance) = &self.0.instance {
            map.serialize_entry("instance", instance)?;
        }
        for (name, value) in self.0.extra.iter().filter(|(name, _)| !STANDARD.contains(&name.as_str())) {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        // Serializing strings and `serde_json::Value`s cannot fail; the fallback
        // keeps the promise of a problem+json body even so.
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| {
            br#"{"type":"https://orderly.dev/problems/internal-error","title":"Internal error","status":500}"#.to_vec()
        });
        let mut response = (self.0.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        headers.extend(self.0.headers);
        response
    }
}

/// A JSON body extractor (and response) like [`axum::Json`], whose every
/// rejection is a problem: 400 for malformed JSON, 422 for valid JSON of the
/// wrong shape, 415 for a missing or wrong `Content-Type`, 413 for a body over
/// the limit — never axum's plain-text rejection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiJson<T>(pub T);

/// The request body limit in force, put in request extensions by
/// [`crate::limits::with_limits`] so a 413 can say what the limit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimit(pub usize);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map(|limit| limit.0);
        if !is_json_content_type(req.headers()) {
            return Err(Problem::unsupported_media_type("expected a request with `Content-Type: application/json`"));
        }
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::payload_too_large(limit)
            } else {
                Problem::bad_request(format!("could not read the request body: {}", rejection.body_text()))
            }
        })?;
        check_json_depth(&bytes)?;
        match Json::<T>::from_bytes(&bytes) {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection_problem(&rejection, limit)),
        }
    }
}

/// Deepest nesting of arrays and objects accepted in a JSON body. Every
/// request shape nests at most 4 levels; the parser's own recursion limit
/// (128) is far above what any client needs.
pub const JSON_DEPTH_MAX: usize = 32;

/// `application/json` or any `application/*+json`, parameters ignored.
fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.split_once('/') {
        Some(("application", subtype)) => subtype == "json" || subtype.ends_with("+json"),
        _ => false,
    }
}

/// A 400 `json-too-deep` problem when `body` nests arrays or objects deeper
/// than [`JSON_DEPTH_MAX`] (brackets inside strings do not count). One pass,
/// no allocation: it runs before the parser.
pub fn check_json_depth(body: &[u8]) -> Result<(), Problem> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in body {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > JSON_DEPTH_MAX {
                    return Err(Problem::new(
                        StatusCode::BAD_REQUEST,
                        "json-too-deep",
                        "JSON nested too deeply",
                        format!("the JSON body nests arrays or objects deeper than {JSON_DEPTH_MAX} levels"),
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        Json(self.0).into_response()
    }
}

/// Maps an axum JSON rejection to its problem; `limit` is the body limit in
/// force, if known.
pub fn json_rejection_problem(rejection: &JsonRejection, limit: Option<usize>) -> Problem {
    match rejection {
        JsonRejection::JsonDataError(_) => Problem::unprocessable(rejection.body_text()),
        JsonRejection::JsonSyntaxError(_) => Problem::malformed_json(rejection.body_text()),
        JsonRejection::MissingJsonContentType(_) => {
            Problem::unsupported_media_type("expected a request with `Content-Type: application/json`")
        }
        JsonRejection::BytesRejection(_) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Problem::payload_too_large(limit)
        }
        _ => Problem::bad_request(format!("could not read the request body: {}", rejection.body_text())),
    }
}

/// The router fallback: a 404 problem naming the method and path.
pub async fn not_found_fallback(method: Method, uri: OriginalUri) -> Problem {
    Problem::not_found(format!("no route for {method} {}", uri.0.path()))
}

/// The router's method-not-allowed fallback: a 405 problem. The router still
/// adds the `Allow` header.
pub async fn method_not_allowed_fallback(method: Method, uri: OriginalUri) -> Problem {
    Problem::method_not_allowed(format!("{} does not accept {method}", uri.0.path()))
}

/// Installs [`not_found_fallback`] (replacing any fallback already set) and
/// [`method_not_allowed_fallback`]. Call it once every route is added: the
/// 405 fallback only reaches the routes that exist at the time (and
/// [`ensure_problem`] still catches any bare 405 it misses).
pub fn with_fallbacks<S>(router: axum::Router<S>) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router.fallback(not_found_fallback).method_not_allowed_fallback(method_not_allowed_fallback)
}

/// The panic handler for `tower_http::catch_panic::CatchPanicLayer::custom`:
/// logs the panic and answers a 500 problem. Defence in depth only: handlers
/// return errors, they do not panic.
pub fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("non-string panic payload");
    tracing::error!(panic = message, "request handler panicked");
    Problem::internal().into_response()
}

/// Turns an error response that is not already problem+json — a bare status
/// from a tower layer (413 from the body limit, 405), or axum's plain-text
/// rejection of a path or query — into a problem with the same status and
/// headers. A short plain-text body becomes the detail. JSON bodies are left
/// alone: a handler chose them.
pub async fn ensure_problem(response: Response, body_limit: Option<usize>) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || !is_bare(response.headers()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, BARE_ERROR_DETAIL_MAX_BYTES)
        .await
        .ok()
        .and_then(|bytes| String::from_utf8(bytes.to_vec()).ok())
        .filter(|text| !text.trim().is_empty());
    let problem = problem_for_status(status, text, body_limit);
    parts.headers.remove(CONTENT_TYPE);
    parts.headers.remove(CONTENT_LENGTH);
    let mut rebuilt = problem.into_response();
    for (name, value) in parts.headers.iter() {
        if !rebuilt.headers().contains_key(name) {
            rebuilt.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rebuilt
}

/// True when a response has no body type or a plain-text one.
fn is_bare(headers: &HeaderMap) -> bool {
    match headers.get(CONTENT_TYPE).and_then(|value| value.to_str().ok()) {
        None => true,
        Some(content_type) => content_type.starts_with("text/plain"),
    }
}

/// The problem for a bare error status, with `text` as detail when there is one.
fn problem_for_status(status: StatusCode, text: Option<String>, body_limit: Option<usize>) -> Problem {
    let reason = status.canonical_reason().unwrap_or("Error");
    let detail = text.unwrap_or_else(|| reason.to_lowercase());
    match status {
        StatusCode::BAD_REQUEST => Problem::bad_request(detail),
        StatusCode::UNAUTHORIZED => Problem::unauthorized(detail),
        StatusCode::FORBIDDEN => Problem::forbidden(detail),
        StatusCode::NOT_FOUND => Problem::not_found(detail),
        StatusCode::METHOD_NOT_ALLOWED => Problem::method_not_allowed(detail),
        StatusCode::PAYLOAD_TOO_LARGE => Problem::payload_too_large(body_limit),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Problem::unsupported_media_type(detail),
        StatusCode::UNPROCESSABLE_ENTITY => Problem::unprocessable(detail),
        StatusCode::INTERNAL_SERVER_ERROR => Problem::internal(),
        StatusCode::SERVICE_UNAVAILABLE => Problem::unavailable(detail),
        _ => {
            let slug = reason.to_lowercase().replace([' ', '\''], "-");
            Problem::new(status, &slug, reason, detail)
        }
    }
}

/// True when a header value is `application/problem+json`.
pub fn is_problem_json(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).and_then(|value| value.to_str().ok()).is_some_and(|value| value.starts_with(PROBLEM_JSON))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_standard_members_first_and_keeps_them() {
        let problem = Problem::conflict("taken").with_instance("/v1/orders/1").with_extra("status", Value::from(1));
        let json = serde_json::to_value(&problem).expect("serializes");
        assert_eq!(json["type"], "https://orderly.dev/problems/conflict");
        assert_eq!(json["status"], 409);
        assert_eq!(json["instance"], "/v1/orders/1");
    }

    #[test]
    fn content_type_cannot_be_overridden() {
        let problem = Problem::bad_request("x").with_header(CONTENT_TYPE, HeaderValue::from_static("text/html"));
        let response = problem.into_response();
        assert!(is_problem_json(response.headers()));
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Line {
        sku: String,
        qty: u32,
    }

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Lines {
        lines: Vec<Line>,
    }

    async fn extract(body: &'static str) -> Result<ApiJson<Lines>, Problem> {
        let request = Request::builder()
            .header(CONTENT_TYPE, "application/json")
            .body(axum::body::Body::from(body))
            .expect("a request");
        ApiJson::<Lines>::from_request(request, &()).await
    }

    #[tokio::test]
    async fn a_body_that_parses_is_taken_and_one_of_the_wrong_shape_names_the_bad_field() {
        let ApiJson(ok) = extract(r#"{"lines":[{"sku":"A","qty":2}]}"#).await.expect("parses");
        assert_eq!(ok, Lines { lines: vec![Line { sku: "A".into(), qty: 2 }] });
        let wrong = extract(r#"{"lines":[{"sku":"A","qty":2},{"sku":"B","qty":-1}]}"#).await.expect_err("refused");
        assert_eq!(wrong.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let json = serde_json::to_value(&wrong).expect("serializes");
        let detail = json["detail"].as_str().expect("a detail");
        assert!(detail.contains("lines[1].qty"), "{detail}");
        let trailing = extract(r#"{"lines":[]} x"#).await.expect_err("trailing characters");
        assert_eq!(trailing.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn unusual_statuses_get_a_slug_from_their_reason() {
        let problem = problem_for_status(StatusCode::IM_A_TEAPOT, None, None);
        assert_eq!(problem.type_uri(), "https://orderly.dev/problems/i-m-a-teapot");
        assert_eq!(problem.status(), StatusCode::IM_A_TEAPOT);
    }
}
