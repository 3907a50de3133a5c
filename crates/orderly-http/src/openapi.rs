//! The API's OpenAPI 3.1 document (`GET /openapi.json`) and its interactive
//! page (`GET /docs`). Both are files embedded in the binary, so they need no
//! key and no network: the page has no external asset and renders the
//! document it fetches from this server.
//!
//! The document is written by hand in `api/openapi.json`, from the serde
//! shapes of the request and response types; `tests/openapi.rs` checks that
//! it covers every route in [`crate::routes::router`] and that real responses
//! match its schemas.

use axum::http::HeaderValue;
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use axum::response::{IntoResponse, Response};

/// The OpenAPI 3.1 document, as served.
pub const OPENAPI_JSON: &str = include_str!("../api/openapi.json");

/// The interactive documentation page, as served.
pub const DOCS_HTML: &str = include_str!("../api/docs.html");

/// The page may load nothing but this server: its own inline script and
/// style, and `fetch` to the API. No CDN, no frames, no plugins.
const DOCS_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /openapi.json`: the OpenAPI document.
pub async fn openapi_json() -> Response {
    (
        [
            (CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        OPENAPI_JSON,
    )
        .into_response()
}

/// `GET /docs`: the interactive documentation page.
pub async fn docs() -> Response {
    (
        [
            (CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
            (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (CONTENT_SECURITY_POLICY, HeaderValue::from_static(DOCS_CSP)),
            (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ],
        DOCS_HTML,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_document_is_openapi_3_1_json() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).expect("openapi.json is JSON");
        let version = doc["openapi"].as_str().expect("an openapi version");
        assert!(version.starts_with("3.1."), "{version}");
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for needle in ["http://", "https://", "//cdn", "<link", "src="] {
            assert!(!DOCS_HTML.contains(needle), "docs.html contains {needle:?}");
        }
    }
}
