//! Traces: the OTLP pipeline, and the few operations span sites need
//! (propagation in and out, links, a span written after the fact), so
//! that no other module handles OpenTelemetry's types.
//!
//! Every span site asks [`traces_on`] first and makes `Span::none()`
//! otherwise: without `[telemetry] otlp_endpoint`, a request costs one
//! relaxed load per site, and no span is allocated, recorded or filtered.

use std::panic::Location;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanKind, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, Sampler, SdkTracerProvider, Tracer};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The target of every trace span: the log lines leave them out, the
/// OpenTelemetry layer takes only them.
pub const TARGET: &str = "credproxy::trace";

static ON: AtomicBool = AtomicBool::new(false);
static TRACER: OnceLock<Tracer> = OnceLock::new();

/// Whether spans are made (an OTLP endpoint is configured and the pipeline
/// is up).
#[inline]
pub fn traces_on() -> bool {
    ON.load(Ordering::Relaxed)
}

pub(super) fn start() {
    ON.store(true, Ordering::Relaxed);
}

pub(super) fn stop() {
    ON.store(false, Ordering::Relaxed);
}

/// The traces URL: `endpoint` is OTLP's base URL (`http://host:4318`), to
/// which `/v1/traces` is added, unless it already ends so.
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// The OpenTelemetry layer over an OTLP/HTTP (protobuf) exporter and a batch
/// processor (its own thread: a span's end costs the hot path a channel
/// send), and the provider to shut down at exit.
pub(super) fn pipeline<S>(
    endpoint: &str,
    sample_ratio: f64,
) -> Result<(impl Layer<S>, SdkTracerProvider), opentelemetry_otlp::ExporterBuildError>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(traces_url(endpoint))
        .with_timeout(Duration::from_secs(10))
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).build())
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            sample_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("credproxy")
                .build(),
        )
        .build();
    let tracer = provider.tracer("credproxy");
    let _ = TRACER.set(tracer.clone());
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(filter_fn(|m| m.is_span() && m.target() == TARGET));
    Ok((layer, provider))
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The W3C trace-context headers.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Makes the caller's W3C `traceparent` (and `tracestate`) the parent of
/// `span`, when it sent a valid one. Call before anything else reads the
/// span's context.
pub fn continue_from(span: &Span, headers: &HeaderMap) {
    if span.is_none() || !headers.contains_key(TRACEPARENT) {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Writes `span`'s `traceparent` (and the `tracestate` it continues) into
/// `headers`, replacing any the caller sent; without a span, leaves them.
pub fn propagate(span: &Span, headers: &mut HeaderMap) {
    if span.is_none() {
        return;
    }
    headers.remove(TRACEPARENT);
    headers.remove(TRACESTATE);
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeadersMut(headers));
}

/// A span another may link to (a refresh run, from each request that
/// waited for it).
#[derive(Debug, Clone)]
pub struct Run(SpanContext);

/// `span` as a link target, if it is traced.
pub fn run_of(span: &Span) -> Option<Run> {
    if span.is_none() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(Run(sc))
}

/// Links `span` to `run`.
pub fn link(span: &Span, run: &Run) {
    if !span.is_none() {
        span.add_link(run.0.clone());
    }
}

/// The trace and span ids of `span` as hex, if it is traced (for a JSON log
/// line).
pub(super) fn ids(span: &Span) -> Option<(String, String)> {
    if span.is_none() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// A call that took `took` (from `began`), written as a child span of the
/// current span after the fact: only calls worth seeing (a slow store call)
/// cost a span. `site` names where it was made.
pub fn after_the_fact(
    name: &'static str,
    began: SystemTime,
    took: Duration,
    site: &'static Location<'static>,
) {
    let Some(tracer) = TRACER.get() else { return };
    if !traces_on() {
        return;
    }
    let parent = Span::current();
    if parent.is_none() {
        return;
    }
    let cx = parent.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    let mut span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Client)
        .with_start_time(began)
        .with_attributes([
            KeyValue::new("code.file.path", site.file()),
            KeyValue::new("code.line.number", i64::from(site.line())),
            KeyValue::new("credproxy.took_ms", took.as_millis() as i64),
        ])
        .start_with_context(tracer, &cx);
    opentelemetry::trace::Span::end_with_timestamp(&mut span, began + took);
}
