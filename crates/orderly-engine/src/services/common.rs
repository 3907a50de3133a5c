//! Small pieces every service uses: API errors, per-subject sequences and
//! derived ids.

use crate::ports::StoreError;
use orderly_domain::ids::{ID_LEN_MAX, fnv1a};

/// Why an API command was refused. The HTTP layer maps each kind to one status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The input is invalid (400/422).
    #[error("{detail}")]
    Invalid {
        /// Stable problem slug, e.g. `invalid-quantity`.
        kind: &'static str,
        /// Human explanation.
        detail: String,
    },
    /// The thing does not exist (404).
    #[error("{0} not found")]
    NotFound(String),
    /// The request conflicts with current state (409), e.g. not enough stock.
    #[error("{detail}")]
    Conflict {
        /// Stable problem slug, e.g. `insufficient-stock`.
        kind: &'static str,
        /// Human explanation.
        detail: String,
    },
    /// The engine is overloaded; retry after a moment (429).
    #[error("engine busy; retry shortly")]
    Busy,
    /// The engine could not commit or answer in time (503).
    #[error("engine unavailable: {0}")]
    Unavailable(String),
}

impl ApiError {
    /// An invalid-input error.
    pub fn invalid(kind: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::Invalid { kind, detail: detail.into() }
    }

    /// A conflict error.
    pub fn conflict(kind: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::Conflict { kind, detail: detail.into() }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError::Unavailable(e.to_string())
    }
}

/// The reply channel of an API command.
pub type Reply<T> = tokio::sync::oneshot::Sender<Result<T, ApiError>>;

/// Derives an id `<base><suffix>`, hashing `base` down when the result would
/// exceed the id length limit, so derived ids are always valid and stable.
pub fn derived_id(base: &str, suffix: &str) -> String {
    let s = [base, suffix].concat();
    if s.len() <= ID_LEN_MAX { s } else { format!("{:016x}{suffix}", fnv1a(base.as_bytes())) }
}

/// The span every event is handled in: its `event_id`, type, and the
/// `order_id` it concerns (when its data names one), so each log line
/// written while handling it carries them (JSON logs list span fields).
pub fn event_span(env: &orderly_domain::event::Envelope) -> tracing::Span {
    let span = tracing::info_span!(
        "event",
        event_id = %env.id,
        event_type = %env.event_type,
        order_id = tracing::field::Empty,
        subject = %env.subject
    );
    // Found only for a span someone listens to: finding it may parse the
    // event's data, once per event handled.
    if !span.is_disabled() {
        // An order event's subject is its order; other events name it in their data.
        let order_id = match env.event_type.domain() {
            "order" => std::borrow::Cow::Borrowed(env.subject.as_str()),
            _ => env.data.str_field("order_id").unwrap_or_default(),
        };
        span.record("order_id", tracing::field::display(&order_id));
    }
    span
}
