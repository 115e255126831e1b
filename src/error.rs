//! Errors that credproxy answers itself, mapped to the contract's codes in
//! this one place.
//!
//! Each answer carries a JSON body `{"error": {"code", "message"}}` and the
//! header `X-Credproxy-Error: CODE`, so a caller can tell them from the
//! upstream's. Messages are fixed text: nothing from a request, a token or a
//! key is ever interpolated into them.
//!
//! An upstream failure keeps why it happened ([`Failure`]: a [`Cause`] and
//! the error it came from) up to the access-log line (`cause=`, `detail=`);
//! the caller's answer is the same fixed code and message whatever it was.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

pub const ERROR_HEADER: &str = "x-credproxy-error";

#[derive(Debug)]
pub enum ProxyError {
    MissingSession,
    UnknownSession,
    /// A valid key, presented on the route of a provider it does not belong to.
    KeyOfOtherProvider,
    ReauthorizationRequired,
    UnknownRoute,
    BadRequest(&'static str),
    BodyTooLarge,
    /// Spark's API keys sign a request over its body: one above the replay
    /// limit (or streamed) cannot be signed.
    BodyTooLargeToSign,
    /// The request body made no progress for `server.body_read_timeout`.
    RequestTimeout,
    TokenRefreshFailed {
        retry_after_secs: u64,
    },
    /// The request is outside its session key's scope (its methods or paths).
    ForbiddenByScope,
    /// The session key's own rate (`--rate`) is spent: refused at once.
    KeyRateLimited {
        retry_after_secs: u64,
    },
    /// No budget for this request within the provider's `max_queue_wait`.
    RateLimited {
        retry_after_secs: u64,
    },
    /// The upstream could not be reached, or broke off its answer.
    UpstreamUnreachable(Failure),
    /// The upstream did not answer, or went silent, in time.
    UpstreamTimeout(Failure),
    /// The client presented too many keys that are not cached (each costs a
    /// store read): `store.cold_lookups_per_client`.
    LookupsLimited {
        retry_after_secs: u64,
    },
    /// The store could not be read for a session that is not cached.
    StoreUnavailable,
    /// A stored session cannot be used (e.g. sealed with another key).
    Internal,
}

impl ProxyError {
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::MissingSession => "missing_session",
            ProxyError::UnknownSession | ProxyError::KeyOfOtherProvider => "unknown_session",
            ProxyError::ReauthorizationRequired => "reauthorization_required",
            ProxyError::UnknownRoute => "unknown_route",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::BodyTooLarge | ProxyError::BodyTooLargeToSign => "body_too_large",
            ProxyError::RequestTimeout => "request_timeout",
            ProxyError::TokenRefreshFailed { .. } => "token_refresh_failed",
            ProxyError::ForbiddenByScope => "forbidden_by_scope",
            ProxyError::RateLimited { .. } | ProxyError::KeyRateLimited { .. } => "rate_limited",
            ProxyError::UpstreamUnreachable(_) => "upstream_unreachable",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::LookupsLimited { .. } => "too_many_lookups",
            ProxyError::StoreUnavailable => "store_unavailable",
            ProxyError::Internal => "internal_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingSession
            | ProxyError::UnknownSession
            | ProxyError::KeyOfOtherProvider
            | ProxyError::ReauthorizationRequired => StatusCode::UNAUTHORIZED,
            ProxyError::UnknownRoute => StatusCode::NOT_FOUND,
            ProxyError::ForbiddenByScope => StatusCode::FORBIDDEN,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge | ProxyError::BodyTooLargeToSign => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ProxyError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::TokenRefreshFailed { .. } | ProxyError::StoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::RateLimited { .. }
            | ProxyError::KeyRateLimited { .. }
            | ProxyError::LookupsLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn message(&self) -> &'static str {
        match self {
            ProxyError::MissingSession => "no session key: send X-Credproxy-Session, Proxy-Authorization: Bearer, or the provider's own credential slot",
            ProxyError::UnknownSession => "the session key is unknown or was revoked",
            ProxyError::KeyOfOtherProvider => "this session key belongs to another provider; send it to that provider's route",
            ProxyError::ReauthorizationRequired => "the provider refused this session's refresh token; reconnect the account or replace its tokens",
            ProxyError::UnknownRoute => "no configured provider serves this path; use /{provider}/...",
            ProxyError::BadRequest(why) => why,
            ProxyError::BodyTooLarge => "the request body is larger than this provider's limit",
            ProxyError::BodyTooLargeToSign => "this provider's requests are signed over their body, which must fit in memory: the body is larger than its max_replay_body",
            ProxyError::RequestTimeout => "the request body stopped arriving; send it again",
            ProxyError::TokenRefreshFailed { .. } => "the provider's token endpoint failed; the session is intact, retry later",
            ProxyError::ForbiddenByScope => "this session key may not make this request: its method or path is outside the key's scope",
            ProxyError::RateLimited { .. } => "the provider's request budget is spent for now; retry after Retry-After seconds",
            ProxyError::KeyRateLimited { .. } => "this session key's own rate is spent for now; retry after Retry-After seconds",
            ProxyError::UpstreamUnreachable(_) => "the upstream API could not be reached",
            ProxyError::UpstreamTimeout(_) => "the upstream API did not answer in time",
            ProxyError::LookupsLimited { .. } => "too many requests from this address presented session keys that are not cached; retry after Retry-After seconds",
            ProxyError::StoreUnavailable => "the session store is unavailable; retry later",
            ProxyError::Internal => "this session cannot be used; see the server log",
        }
    }

    /// `upstream_unreachable` for `cause`, with no error behind it.
    pub fn unreachable(cause: Cause) -> ProxyError {
        ProxyError::UpstreamUnreachable(Failure::new(cause, None))
    }

    /// `upstream_timeout` for `cause`, with no error behind it.
    pub fn timeout(cause: Cause) -> ProxyError {
        ProxyError::UpstreamTimeout(Failure::new(cause, None))
    }

    /// Why the upstream failed, for an upstream failure.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            ProxyError::UpstreamUnreachable(f) | ProxyError::UpstreamTimeout(f) => Some(f),
            _ => None,
        }
    }

    pub fn failure_mut(&mut self) -> Option<&mut Failure> {
        match self {
            ProxyError::UpstreamUnreachable(f) | ProxyError::UpstreamTimeout(f) => Some(f),
            _ => None,
        }
    }

    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({"error": {"code": self.code(), "message": self.message()}});
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        match self {
            ProxyError::TokenRefreshFailed { retry_after_secs }
            | ProxyError::RateLimited { retry_after_secs }
            | ProxyError::KeyRateLimited { retry_after_secs }
            | ProxyError::LookupsLimited { retry_after_secs } => {
                h.insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(*retry_after_secs),
                );
            }
            ProxyError::StoreUnavailable => {
                h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

/// Why an exchange with the upstream failed: named on the access-log line,
/// never in the caller's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The upstream's name did not resolve.
    Dns,
    /// Nothing listens there: the connection was refused.
    Refused,
    /// No connection within the provider's `connect_timeout`.
    ConnectTimeout,
    /// The TLS handshake failed: not TLS, an alert, nothing in common.
    TlsHandshake,
    /// The upstream's certificate is not trusted (unknown issuer, another
    /// name, expired).
    Certificate,
    /// The connection was reset or aborted.
    Reset,
    /// The upstream closed the connection before its answer was complete.
    Closed,
    /// The answer broke HTTP (a malformed head, bad framing, a body longer
    /// than its length).
    Protocol,
    /// No answer within the provider's `request_timeout`.
    Timeout,
    /// The answer's body went silent for the provider's `request_timeout`.
    Stalled,
    /// An error body longer than credproxy reads to classify it.
    TooLong,
    /// Anything else (see the log line's `detail`).
    Other,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Dns => "dns",
            Cause::Refused => "refused",
            Cause::ConnectTimeout => "connect_timeout",
            Cause::TlsHandshake => "tls_handshake",
            Cause::Certificate => "certificate",
            Cause::Reset => "reset",
            Cause::Closed => "closed",
            Cause::Protocol => "protocol",
            Cause::Timeout => "timeout",
            Cause::Stalled => "stalled",
            Cause::TooLong => "too_long",
            Cause::Other => "other",
        }
    }
}

/// An upstream failure as the proxy carries it to the access log: its
/// cause, and the client's error where there is one.
#[derive(Debug)]
pub struct Failure {
    pub cause: Cause,
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Failure {
    pub fn new(cause: Cause, source: Option<Box<dyn std::error::Error + Send + Sync>>) -> Failure {
        Failure { cause, source }
    }

    /// The source and its chain of causes, `: `-separated, for the log (a
    /// cause its parent already quotes is not repeated). Client errors
    /// (I/O, TLS, HTTP) name no header, token or key.
    pub fn detail(&self) -> Option<String> {
        let mut out = String::new();
        for e in chain(self.source.as_deref()?) {
            let text = e.to_string();
            if out.is_empty() {
                out = text;
            } else if !out.ends_with(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
        }
        Some(out)
    }
}

/// An error and the errors under it, outermost first. Unlike
/// [`std::error::Error::source`] alone, this goes into an
/// [`std::io::Error`] that wraps another (whose `source` skips it): TLS
/// errors come wrapped so.
pub fn chain<'e>(
    e: &'e (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'e (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| {
        match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_json_and_header() {
        let all = [
            ProxyError::MissingSession,
            ProxyError::UnknownSession,
            ProxyError::ReauthorizationRequired,
            ProxyError::UnknownRoute,
            ProxyError::BadRequest("x"),
            ProxyError::BodyTooLarge,
            ProxyError::BodyTooLargeToSign,
            ProxyError::RequestTimeout,
            ProxyError::TokenRefreshFailed {
                retry_after_secs: 3,
            },
            ProxyError::RateLimited {
                retry_after_secs: 4,
            },
            ProxyError::LookupsLimited {
                retry_after_secs: 1,
            },
            ProxyError::unreachable(Cause::Refused),
            ProxyError::timeout(Cause::Timeout),
            ProxyError::StoreUnavailable,
            ProxyError::Internal,
        ];
        for e in all {
            let r = e.to_response();
            assert_eq!(r.status(), e.status());
            assert_eq!(r.headers()[ERROR_HEADER], e.code());
        }
        let r = ProxyError::TokenRefreshFailed {
            retry_after_secs: 3,
        }
        .to_response();
        assert_eq!(r.headers()["retry-after"], "3");
    }

    #[test]
    fn the_cause_stays_out_of_the_answer() {
        let source = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let e = ProxyError::UpstreamUnreachable(Failure::new(Cause::Reset, Some(Box::new(source))));
        let r = e.to_response();
        let body = format!("{:?}", r.body());
        assert!(!body.contains("reset"), "{body}");
        assert_eq!(r.headers()[ERROR_HEADER], "upstream_unreachable");
        let failure = e.failure().expect("an upstream failure");
        assert_eq!(failure.cause.as_str(), "reset");
        assert_eq!(failure.detail().as_deref(), Some("reset by peer"));
    }
}
