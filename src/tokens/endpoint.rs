//! Calling a provider's token endpoint: the refresh grant (and the
//! authorisation-code grant of the connect flow).
//!
//! Spark takes a JSON body with the client credentials in it; Zillow takes a
//! form body with HTTP Basic client authentication. Both answer JSON with
//! `access_token`, an optional `refresh_token` (kept when omitted) and an
//! optional `expires_in`.
//!
//! Errors are classified for the caller: `invalid_grant` / `invalid_client`
//! mean a person must reconnect ([`TokenError::Rejected`]); anything else (5xx,
//! timeouts, unreachable, unparseable answers) is transient
//! ([`TokenError::Failed`]) and leaves the session intact. Error texts are
//! built from status codes and OAuth error codes only, never from bodies
//! that could carry a token.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::config::ProviderConfig;
use crate::config::{ClientAuth, GrantBody, Scheme};
use crate::provider::spark::api_key::ApiKeyCredentials;
use crate::tls::{tls_config, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The provider refused the grant: the session needs a person.
    #[error("the token endpoint refused the grant ({code})")]
    Rejected { code: String },
    /// The endpoint failed or could not be reached; try again later.
    /// `class` is a short fixed name of what happened (a session's
    /// `last_error`), `reason` a sentence for the log; neither holds
    /// anything from the endpoint's body.
    #[error("the token endpoint failed: {reason}")]
    Failed { class: &'static str, reason: String },
}

/// The classes of [`TokenError::Failed`].
pub mod class {
    /// No answer within `token_timeout`.
    pub const TIMEOUT: &str = "token_endpoint_timeout";
    /// The connection could not be made (refused, DNS, TLS) or broke.
    pub const UNREACHABLE: &str = "token_endpoint_unreachable";
    /// A 5xx (or any answer that is neither a success nor a client error).
    pub const ERROR: &str = "token_endpoint_error";
    /// 429.
    pub const RATE_LIMITED: &str = "token_endpoint_rate_limited";
    /// A 4xx other than `invalid_grant`/`invalid_client` and 429.
    pub const CLIENT_ERROR: &str = "token_endpoint_client_error";
    /// An answer of more than 64 KiB.
    pub const TOO_LARGE: &str = "token_answer_too_large";
    /// An answer whose body broke off.
    pub const UNREADABLE: &str = "token_answer_unreadable";
    /// A 2xx without an `access_token`.
    pub const NO_ACCESS_TOKEN: &str = "token_answer_without_access_token";
    /// An access token that cannot be sent (see `usable_access_token`).
    pub const UNUSABLE: &str = "unusable_access_token";
    /// `token_url` is not configured.
    pub const NO_TOKEN_URL: &str = "no_token_url";
}

impl TokenError {
    fn failed(class: &'static str, reason: impl Into<String>) -> TokenError {
        TokenError::Failed {
            class,
            reason: reason.into(),
        }
    }
}

/// What a grant returns.
#[derive(Debug)]
pub struct TokenAnswer {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub expires_in: Option<u64>,
}

pub enum Grant<'a> {
    RefreshToken(&'a SecretString),
    AuthorizationCode(&'a SecretString),
}

/// One provider's token endpoint.
pub struct TokenEndpoint {
    http: reqwest::Client,
    grant_body: GrantBody,
    client_auth: ClientAuth,
    redirect_uri_on_refresh: bool,
    url: Option<url::Url>,
    client_id: String,
    client_secret: SecretString,
    redirect_uri: String,
    /// Spark's API keys: `{api_base}/v1/session`, where a Spark session is
    /// opened (the "refresh"), and the user agent Spark requires.
    spark_session: Option<(url::Url, Option<http::HeaderValue>)>,
}

#[derive(Deserialize)]
struct RawAnswer {
    access_token: Option<SecretString>,
    refresh_token: Option<SecretString>,
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawError {
    error: Option<String>,
}

/// An OAuth error code, kept only if it looks like one (it goes into logs).
fn safe_code(code: &str) -> String {
    if !code.is_empty()
        && code.len() <= 64
        && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        code.to_owned()
    } else {
        "unrecognised error".to_owned()
    }
}

impl TokenEndpoint {
    pub fn new(provider: &ProviderConfig) -> Result<TokenEndpoint, TlsError> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(provider)?)
            .connect_timeout(provider.connect_timeout)
            .timeout(provider.token_timeout)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            // Each call on a connection of its own: the token endpoint
            // answers every session, and a kept-alive connection would read
            // whatever a server sent past one session's answer (a copy of
            // its new tokens, say) as the next session's. A refresh is rare
            // enough that a connection per call costs nothing that matters.
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|_| TlsError::Client {
                key: format!("providers.{}.token_url", provider.name),
            })?;
        Ok(TokenEndpoint {
            http,
            grant_body: provider.description.grant_body,
            client_auth: provider.description.client_auth,
            redirect_uri_on_refresh: provider.description.redirect_uri_on_refresh,
            url: provider.token_url.clone(),
            client_id: provider.client_id.clone(),
            client_secret: provider.client_secret.clone(),
            redirect_uri: provider.redirect_uri.to_string(),
            spark_session: (provider.description.scheme == Scheme::SparkApiKey).then(|| {
                let mut url = provider.api_base.clone();
                let path = format!("{}/v1/session", url.path().trim_end_matches('/'));
                url.set_path(&path);
                (url, provider.user_agent.clone())
            }),
        })
    }

    /// Calls the token endpoint (a client span when traced: the URL's host
    /// and path, never its query or the grant).
    pub async fn grant(&self, grant: Grant<'_>) -> Result<TokenAnswer, TokenError> {
        use tracing::Instrument;
        if !crate::telemetry::traces_on() {
            return self.grant_now(grant).await;
        }
        let url = self
            .spark_session
            .as_ref()
            .map(|(u, _)| u)
            .or(self.url.as_ref());
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            "token endpoint",
            otel.name = "POST",
            otel.kind = "client",
            http.request.method = "POST",
            server.address = url.and_then(|u| u.host_str()).unwrap_or_default(),
            server.port = i64::from(url.and_then(|u| u.port_or_known_default()).unwrap_or_default()),
            url.path = url.map(|u| u.path()).unwrap_or_default(),
            error.type = tracing::field::Empty,
        );
        let answer = self.grant_now(grant).instrument(span.clone()).await;
        match &answer {
            Ok(_) => {}
            Err(TokenError::Rejected { .. }) => {
                span.record("error.type", "invalid_grant");
            }
            Err(TokenError::Failed { class, .. }) => {
                span.record("error.type", *class);
            }
        }
        answer
    }

    async fn grant_now(&self, grant: Grant<'_>) -> Result<TokenAnswer, TokenError> {
        if let Some((url, user_agent)) = &self.spark_session {
            return self
                .open_spark_session(url, user_agent.as_ref(), grant)
                .await;
        }
        let url = self.url.clone().ok_or_else(|| {
            TokenError::failed(
                class::NO_TOKEN_URL,
                "no token_url is configured for this provider",
            )
        })?;
        let (grant_type, field, value) = match grant {
            Grant::RefreshToken(t) => ("refresh_token", "refresh_token", t),
            Grant::AuthorizationCode(c) => ("authorization_code", "code", c),
        };
        // The grant's parameters, in the order the providers' documents
        // show them; the client's credentials in the body or as HTTP Basic.
        let in_body = self.client_auth == ClientAuth::Body;
        let mut params: Vec<(&str, &str)> = Vec::with_capacity(5);
        if in_body {
            params.push(("client_id", &self.client_id));
            params.push(("client_secret", self.client_secret.expose_secret()));
        }
        params.push(("grant_type", grant_type));
        params.push((field, value.expose_secret()));
        if self.redirect_uri_on_refresh || matches!(grant, Grant::AuthorizationCode(_)) {
            params.push(("redirect_uri", &self.redirect_uri));
        }
        let mut req = match self.grant_body {
            GrantBody::Json => {
                let body: serde_json::Map<String, serde_json::Value> = params
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
                    .collect();
                self.http.post(url).json(&body)
            }
            GrantBody::Form => {
                let mut form = url::form_urlencoded::Serializer::new(String::new());
                for (k, v) in &params {
                    form.append_pair(k, v);
                }
                self.http
                    .post(url)
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(form.finish())
            }
        };
        if !in_body {
            req = req.basic_auth(&self.client_id, Some(self.client_secret.expose_secret()));
        }
        let resp = req
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    TokenError::failed(class::TIMEOUT, "timed out")
                } else if e.is_connect() {
                    TokenError::failed(class::UNREACHABLE, "unreachable")
                } else {
                    TokenError::failed(class::UNREACHABLE, "the request failed")
                }
            })?;
        let status = resp.status();
        let body = read_capped(resp, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge => TokenError::failed(
                    class::TOO_LARGE,
                    format!("answered {status} with more than {MAX_ANSWER_BYTES} bytes"),
                ),
                BodyError::Read => TokenError::failed(
                    class::UNREADABLE,
                    format!("answered {status} but the body could not be read"),
                ),
                BodyError::Timeout => TokenError::failed(
                    class::TIMEOUT,
                    format!("answered {status} but the body did not arrive in time"),
                ),
            })?;
        if status.is_success() {
            return parse_answer(&body).ok_or_else(|| {
                TokenError::failed(
                    class::NO_ACCESS_TOKEN,
                    format!("answered {status} without a usable access_token"),
                )
            });
        }
        let code = serde_json::from_slice::<RawError>(&body)
            .ok()
            .and_then(|e| e.error)
            .map(|c| safe_code(&c));
        let class = if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            class::RATE_LIMITED
        } else if status.is_client_error() {
            class::CLIENT_ERROR
        } else {
            class::ERROR
        };
        match code.as_deref() {
            Some("invalid_grant" | "invalid_client") if status.is_client_error() => {
                Err(TokenError::Rejected {
                    code: code.unwrap_or_default(),
                })
            }
            Some(code) => Err(TokenError::failed(
                class,
                format!("answered {status} ({code})"),
            )),
            None => Err(TokenError::failed(class, format!("answered {status}"))),
        }
    }
}

impl TokenEndpoint {
    /// Spark's API keys: opens a Spark session, `POST /v1/session?ApiKey=K&ApiSig=S`
    /// with an empty body, for the key in `grant` (the session's sealed
    /// "refresh token"). Its `AuthToken` and `Expires` become the access
    /// token and its lifetime. A key Spark refuses (401 with code 1000, bad
    /// key or signature; 1010, disabled) is rejected like `invalid_grant`.
    async fn open_spark_session(
        &self,
        url: &url::Url,
        user_agent: Option<&http::HeaderValue>,
        grant: Grant<'_>,
    ) -> Result<TokenAnswer, TokenError> {
        let Grant::RefreshToken(held) = grant else {
            return Err(TokenError::failed(
                class::CLIENT_ERROR,
                "Spark API-key sessions are added with their key, not connected",
            ));
        };
        let creds = ApiKeyCredentials::read(held).ok_or_else(|| TokenError::Rejected {
            code: "invalid_key".to_owned(),
        })?;
        let mut url = url.clone();
        url.query_pairs_mut()
            .append_pair("ApiKey", &creds.api_key)
            .append_pair("ApiSig", &creds.session_signature());
        let mut req = self
            .http
            .post(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .header(reqwest::header::CONTENT_LENGTH, "0");
        if let Some(ua) = user_agent {
            req = req.header("x-sparkapi-user-agent", ua.clone());
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                TokenError::failed(class::TIMEOUT, "timed out")
            } else {
                TokenError::failed(class::UNREACHABLE, "unreachable")
            }
        })?;
        let status = resp.status();
        let body = read_capped(resp, MAX_ANSWER_BYTES).await.map_err(|_| {
            TokenError::failed(
                class::UNREADABLE,
                format!("answered {status} but the body could not be read"),
            )
        })?;
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let d = answer.get("D");
        if status.is_success() {
            let result = d.and_then(|d| d.get("Results")).and_then(|r| r.get(0));
            let token = result
                .and_then(|r| r.get("AuthToken"))
                .and_then(|t| t.as_str())
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()));
            let Some(token) = token else {
                return Err(TokenError::failed(
                    class::NO_ACCESS_TOKEN,
                    format!("answered {status} without a usable AuthToken"),
                ));
            };
            let expires_in = result
                .and_then(|r| r.get("Expires"))
                .and_then(|e| e.as_str())
                .and_then(unix_of_rfc3339)
                .map(|at| (at - crate::store::now()).max(0) as u64);
            return Ok(TokenAnswer {
                access_token: creds.with_auth_token(token.to_owned()).to_secret(),
                refresh_token: None,
                expires_in,
            });
        }
        let code = d.and_then(|d| d.get("Code")).and_then(|c| c.as_u64());
        match code {
            Some(1000) if status.is_client_error() => Err(TokenError::Rejected {
                code: "invalid_key".to_owned(),
            }),
            Some(1010) if status.is_client_error() => Err(TokenError::Rejected {
                code: "disabled_key".to_owned(),
            }),
            Some(code) => Err(TokenError::failed(
                class::ERROR,
                format!("answered {status} (code {code})"),
            )),
            None if status == reqwest::StatusCode::TOO_MANY_REQUESTS => Err(TokenError::failed(
                class::RATE_LIMITED,
                format!("answered {status}"),
            )),
            None => Err(TokenError::failed(
                class::ERROR,
                format!("answered {status}"),
            )),
        }
    }
}

/// Unix seconds of an RFC 3339 time with any offset, as Spark writes
/// `Expires` (`2010-10-30T15:49:01-05:00`); fractions are dropped.
fn unix_of_rfc3339(text: &str) -> Option<i64> {
    let text = text.trim();
    let local = text.get(..19)?;
    let at = humantime::parse_rfc3339(&format!("{local}Z")).ok()?;
    let mut unix = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64;
    let mut rest = &text[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        rest = frac.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    match rest.as_bytes() {
        b"Z" | b"z" | b"" => {}
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digit = |b: u8| b.is_ascii_digit().then(|| i64::from(b - b'0'));
            let offset =
                (digit(*h1)? * 10 + digit(*h2)?) * 3600 + (digit(*m1)? * 10 + digit(*m2)?) * 60;
            unix += if *sign == b'+' { -offset } else { offset };
        }
        _ => return None,
    }
    Some(unix)
}

/// The largest token-endpoint answer read: a real one is well under 4 KiB,
/// and an endpoint that streams more must not grow memory.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

enum BodyError {
    TooLarge,
    Read,
    Timeout,
}

/// Reads a body of at most `limit` bytes, chunk by chunk, giving up (and
/// dropping the connection) as soon as it is known to be larger.
async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| {
        if e.is_timeout() {
            BodyError::Timeout
        } else {
            BodyError::Read
        }
    })? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn parse_answer(body: &[u8]) -> Option<TokenAnswer> {
    let raw: RawAnswer = serde_json::from_slice(body).ok()?;
    let access_token = raw.access_token.filter(|t| !t.expose_secret().is_empty())?;
    // Some servers send expires_in as a string; accept both, ignore nonsense.
    let expires_in = match raw.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    Some(TokenAnswer {
        access_token,
        refresh_token: raw.refresh_token.filter(|t| !t.expose_secret().is_empty()),
        expires_in,
    })
}

/// Whether an access token from a token endpoint can be used as issued:
/// visible ASCII only (no spaces, no control characters; RFC 6750's
/// `b64token` is a subset) and injectable for `provider`. Anything else
/// would be committed only to fail every request that uses it.
pub fn usable_access_token(provider: &ProviderConfig, token: &SecretString) -> bool {
    let text = token.expose_secret();
    // Spark's API-key sessions hold their key, secret and AuthToken as one
    // value that only `Credentials` reads.
    let plain = provider.description.scheme == Scheme::SparkApiKey
        || text.bytes().all(|b| b.is_ascii_graphic());
    !text.is_empty() && plain && crate::provider::Credentials::new(provider, token).is_ok()
}

/// Exponential back-off with jitter: `base * 2^(failures-1)`, capped, times 0.8..1.2.
pub fn backoff(failures: u32, base: Duration, cap: Duration) -> Duration {
    use rand::Rng;
    let exp = base.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    exp.min(cap).mul_f64(rand::rng().random_range(0.8..1.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spark_expiry_times_read_with_any_offset() {
        assert_eq!(unix_of_rfc3339("1970-01-01T00:00:10Z"), Some(10));
        assert_eq!(unix_of_rfc3339("1970-01-01T01:00:10+01:00"), Some(10));
        assert_eq!(unix_of_rfc3339("1970-01-01T00:00:10-05:00"), Some(18_010));
        assert_eq!(unix_of_rfc3339("1970-01-01T00:00:10.250Z"), Some(10));
        assert_eq!(unix_of_rfc3339("tomorrow"), None);
    }

    #[test]
    fn answers_parse_with_optional_fields() {
        let a = parse_answer(br#"{"access_token":"a","refresh_token":"r","expires_in":86400}"#)
            .expect("ok");
        assert_eq!(a.access_token.expose_secret(), "a");
        assert_eq!(a.expires_in, Some(86400));
        let z = parse_answer(
            br#"{"access_token":"a","Token_type":"bearer","refresh_token":"r","id_token":"x"}"#,
        )
        .expect("ok");
        assert!(z.expires_in.is_none());
        let s = parse_answer(br#"{"access_token":"a","expires_in":"3600"}"#).expect("ok");
        assert!(s.refresh_token.is_none() && s.expires_in == Some(3600));
        assert!(parse_answer(br#"{"refresh_token":"r"}"#).is_none());
        assert!(parse_answer(b"not json").is_none());
    }

    #[test]
    fn error_codes_are_sanitised() {
        assert_eq!(safe_code("invalid_grant"), "invalid_grant");
        assert_eq!(safe_code("tok-abc123"), "unrecognised error");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(60);
        assert!(backoff(1, base, cap) <= Duration::from_millis(1200));
        assert!(backoff(4, base, cap) >= Duration::from_millis(6400));
        assert!(backoff(30, base, cap) <= Duration::from_secs(72));
    }
}
