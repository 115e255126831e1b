//! The hot path's spans, made only while traces are on
//! ([`telemetry::traces_on`]); `Span::none()` otherwise.
//!
//! Attribute names follow OpenTelemetry's HTTP semantic conventions, plus
//! `credproxy.*`. What goes in: methods, the caller's path (never the
//! query, which may carry a key or a credential parameter), the upstream's
//! host and path (never the query, which carries injected credentials),
//! statuses, the provider, the session id, timings. No header value.
//! Numbers are recorded as `i64` (tracing-opentelemetry exports a `u64` as
//! a string).

use http::request::Parts;
use tracing::field::Empty;
use tracing::Span;

use super::access::AccessLog;
use super::forward::Head;
use super::{ClientAddr, Route};
use crate::error::Failure;
use crate::telemetry::{self, TARGET};

/// The request's server span, continuing the caller's `traceparent`.
pub(super) fn server_span(parts: &Parts) -> Span {
    if !telemetry::traces_on() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        otel.name = parts.method.as_str(),
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = parts.method.as_str(),
        url.scheme = "http",
        url.path = parts.uri.path(),
        client.address = Empty,
        http.route = Empty,
        http.response.status_code = Empty,
        http.response.body.size = Empty,
        error.type = Empty,
        credproxy.provider = Empty,
        credproxy.session_id = Empty,
        credproxy.key_id = Empty,
        credproxy.refreshed = Empty,
        credproxy.replayed = Empty,
        credproxy.queued_ms = Empty,
        credproxy.broke_off = Empty,
    );
    if let Some(ClientAddr(ip)) = parts.extensions.get::<ClientAddr>() {
        span.record("client.address", tracing::field::display(ip));
    }
    telemetry::trace::continue_from(&span, &parts.headers);
    span
}

/// What the request came to, on its server span (named by its method: its
/// route is known only once the span has begun): the provider and session, the status and, for credproxy's own
/// answers, `error.type` (the upstream failure's cause, or the error code).
pub(super) fn record_answer(
    log: &AccessLog,
    status: u16,
    error: Option<&http::HeaderValue>,
    failure: Option<&Failure>,
) {
    let span = &log.span;
    if log.route.is_some() {
        span.record("credproxy.provider", log.provider);
        span.record("http.route", format!("/{}/{{rest}}", log.provider).as_str());
    }
    span.record("http.response.status_code", i64::from(status));
    if let Some(session) = &log.session {
        span.record("credproxy.session_id", session.id.as_str());
    }
    if let Some(key) = &log.key {
        span.record("credproxy.key_id", key.key_id.as_str());
    }
    span.record("credproxy.refreshed", log.refreshed);
    span.record("credproxy.replayed", log.replayed);
    if let Some(q) = log.queued_ms {
        span.record("credproxy.queued_ms", q as i64);
    }
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    let error_type = match failure {
        Some(f) => Some(f.cause.as_str()),
        None => error.and_then(|v| v.to_str().ok()),
    };
    if let Some(t) = error_type {
        span.record("error.type", t);
    }
}

/// A client span for one upstream attempt: `http.request.resend_count` is
/// 1 or more for a resend or a replay.
pub(super) fn attempt_span(route: &Route, head: &Head, attempt: u32) -> Span {
    if !telemetry::traces_on() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "upstream",
        otel.name = head.method.as_str(),
        otel.kind = "client",
        http.request.method = head.method.as_str(),
        server.address = route.api_host.as_str(),
        server.port = i64::from(route.api_port),
        url.path = head.uri.path(),
        http.request.resend_count = Empty,
        http.response.status_code = Empty,
        error.type = Empty,
        credproxy.provider = route.name,
    );
    if attempt > 1 {
        span.record("http.request.resend_count", i64::from(attempt - 1));
    }
    span
}
