//! The operations dashboard (`GET /`): one server-rendered HTML page with its
//! style and script inline, all embedded in the binary. The page signs in
//! with an API key and polls the JSON API; it needs no key to load, holds no
//! data itself, and may load nothing from anywhere: its Content-Security-Policy
//! allows exactly its own inline script and style (by SHA-256 hash) and
//! `fetch` to this server.

use crate::auth::sha256;
use axum::http::HeaderValue;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use std::sync::LazyLock;

/// The page's markup, with `{{STYLE}}`, `{{SCRIPT}}`, `{{VERSION}}` and
/// `{{POLL_SECONDS}}` slots.
const TEMPLATE_HTML: &str = include_str!("../dashboard/index.html");

/// The page's style sheet, inlined into `<style>`.
pub const STYLE_CSS: &str = include_str!("../dashboard/dashboard.css");

/// The page's script, inlined into `<script>`.
pub const SCRIPT_JS: &str = include_str!("../dashboard/dashboard.js");

/// How often the page polls the API; `dashboard.js` has the same `POLL_MS`.
const POLL_SECONDS: u32 = 2;

/// The rendered page and its policy, built once.
struct Page {
    html: String,
    csp: HeaderValue,
}

static PAGE: LazyLock<Page> = LazyLock::new(|| {
    let html = render();
    let csp = HeaderValue::from_str(&content_security_policy()).expect("a CSP of ASCII hashes is a valid header value");
    Page { html, csp }
});

/// `GET /`: the operations dashboard.
pub async fn dashboard() -> Response {
    let page = &*PAGE;
    (
        [
            (CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
            (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (CONTENT_SECURITY_POLICY, page.csp.clone()),
            (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        ],
        page.html.clone(),
    )
        .into_response()
}

/// The page as served: the template with its slots filled.
pub fn render() -> String {
    TEMPLATE_HTML
        .replace("{{VERSION}}", env!("CARGO_PKG_VERSION"))
        .replace("{{POLL_SECONDS}}", &POLL_SECONDS.to_string())
        .replace("{{STYLE}}", STYLE_CSS)
        .replace("{{SCRIPT}}", SCRIPT_JS)
}

/// The policy: nothing by default; the inline script and style only by their
/// exact hash (so an injected one never runs); `fetch` to this origin only;
/// no framing, no form posts elsewhere, no base-URL tricks.
pub fn content_security_policy() -> String {
    format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; img-src data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        csp_hash(SCRIPT_JS),
        csp_hash(STYLE_CSS)
    )
}

/// A CSP source expression for an inline element whose text is `text`.
fn csp_hash(text: &str) -> String {
    format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode(sha256(text.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_is_filled_once() {
        let html = render();
        assert!(!html.contains("{{"), "an unfilled slot remains");
        assert_eq!(html.matches("<script>").count(), 1);
        assert_eq!(html.matches("<style>").count(), 1);
        assert!(html.contains(&format!("<script>{SCRIPT_JS}</script>")));
        assert!(html.contains(&format!("<style>{STYLE_CSS}</style>")));
    }

    #[test]
    fn inline_assets_cannot_close_their_own_element() {
        assert!(!SCRIPT_JS.to_ascii_lowercase().contains("</script"));
        assert!(!STYLE_CSS.to_ascii_lowercase().contains("</style"));
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        let html = render();
        for needle in ["http://", "https://", "//cdn", "@import", "url(", "src=", "<link rel=\"stylesheet\""] {
            assert!(!html.contains(needle), "the dashboard contains {needle:?}");
        }
    }

    #[test]
    fn the_policy_allows_exactly_the_inline_assets() {
        let csp = content_security_policy();
        assert!(csp.starts_with("default-src 'none';"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert!(csp.contains(&csp_hash(SCRIPT_JS)) && csp.contains(&csp_hash(STYLE_CSS)), "{csp}");
        assert!(csp.contains("connect-src 'self'"), "{csp}");
        // A known vector: the hash of "alert(1)" is what browsers compute too.
        assert_eq!(csp_hash("alert(1)"), "sha256-bhHHL3z2vDgxUt0W3dWQOrprscmda2Y5pLsLg4GF+pI=");
    }

    #[tokio::test]
    async fn the_page_is_served_as_html_with_the_policy() {
        let response = dashboard().await;
        assert_eq!(response.status(), axum::http::StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers[CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(headers[CONTENT_SECURITY_POLICY].to_str().expect("ascii"), content_security_policy());
        assert_eq!(headers[X_CONTENT_TYPE_OPTIONS], "nosniff");
    }
}
