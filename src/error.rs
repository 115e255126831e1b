//! Errors that credproxy answers itself, mapped to the contract's codes in
//! this one place.
//!
//! Each answer carries a JSON body `{"error": {"code", "message"}}` and the
//! header `X-Credproxy-Error: CODE`, so a caller can tell them from the
//! upstream's. Messages are fixed text: nothing from a request, a token or a
//! key is ever interpolated into them.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

pub const ERROR_HEADER: &str = "x-credproxy-error";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// No budget for this request within the provider's `max_queue_wait`.
    RateLimited {
        retry_after_secs: u64,
    },
    UpstreamUnreachable,
    UpstreamTimeout,
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
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::UpstreamUnreachable => "upstream_unreachable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
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
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge | ProxyError::BodyTooLargeToSign => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ProxyError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::TokenRefreshFailed { .. } | ProxyError::StoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::RateLimited { .. } | ProxyError::LookupsLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
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
            ProxyError::RateLimited { .. } => "the provider's request budget is spent for now; retry after Retry-After seconds",
            ProxyError::UpstreamUnreachable => "the upstream API could not be reached",
            ProxyError::UpstreamTimeout => "the upstream API did not answer in time",
            ProxyError::LookupsLimited { .. } => "too many requests from this address presented session keys that are not cached; retry after Retry-After seconds",
            ProxyError::StoreUnavailable => "the session store is unavailable; retry later",
            ProxyError::Internal => "this session cannot be used; see the server log",
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
            ProxyError::UpstreamUnreachable,
            ProxyError::UpstreamTimeout,
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
}
