//! Logs and traces: the `tracing` subscriber (plain or JSON lines on stderr,
//! filtered by `ORDERLY_LOG`) and, when `otel.endpoint` is set, export of
//! every span (an event handled, with its `event_id` and `order_id`) to an
//! OpenTelemetry collector over OTLP/HTTP (protobuf), in batches from a
//! background thread.

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The OTLP traces URL for a collector base URL (`…/v1/traces` is added
/// unless it is there already).
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") { base.to_owned() } else { format!("{base}/v1/traces") }
}

/// A tracer provider exporting to `endpoint` over OTLP/HTTP in batches.
/// Shut it down (or drop [`Telemetry`]) to flush what is buffered.
pub fn otlp_provider(endpoint: &str) -> Result<SdkTracerProvider> {
    // reqwest is built without a default TLS crypto provider in this workspace.
    orderly_carrier::install_crypto_provider();
    let _: reqwest::Url =
        traces_url(endpoint).parse().with_context(|| format!("otel.endpoint {endpoint:?} is not a URL"))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url(endpoint))
        .with_timeout(std::time::Duration::from_secs(5))
        .with_headers(std::collections::HashMap::new())
        .build()
        .context("cannot build the OTLP exporter")?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name("orderly").build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// The `tracing` layer that turns spans into OpenTelemetry spans.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("orderly"))
}

/// Keeps the exporter alive; flushes it when dropped.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("OpenTelemetry export did not flush: {e}");
        }
    }
}

/// Installs the global subscriber: `default` level unless `ORDERLY_LOG`
/// says otherwise, JSON lines when `ORDERLY_LOG_FORMAT=json`, and OTLP
/// export when `otel_endpoint` is set.
pub fn init(default: &str, otel_endpoint: Option<&str>) -> Result<Telemetry> {
    let filter = EnvFilter::try_from_env("ORDERLY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("ORDERLY_LOG_FORMAT").is_ok_and(|v| v == "json");
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json { fmt.json().boxed() } else { fmt.boxed() };
    let provider = otel_endpoint.map(otlp_provider).transpose()?;
    let otel = provider.as_ref().map(otel_layer);
    Registry::default().with(filter).with(otel).with(fmt).try_init().context("a tracing subscriber is already set")?;
    Ok(Telemetry { provider })
}
