//! What differs between providers: where a caller may put its session key,
//! how real credentials are injected, and how the token endpoint is called.
//!
//! Everything provider-specific on the request path lives here, behind
//! [`ProviderKind`], so the proxy itself never asks "is this Spark?".
//!
//! **Invariant:** [`ProviderKind::take_slot`] removes every place a caller
//! could put a credential for this provider, and [`Credentials::inject`] is
//! the only code that writes one. Together with the proxy removing the session
//! header and `Proxy-Authorization`, no session key reaches the upstream and a
//! caller cannot override the injected credentials.

use std::borrow::Cow;
use std::fmt;

use http::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::config::ProviderConfig;
use crate::session::KeyHash;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// FBS's Spark API: `Authorization: OAuth TOKEN`, JSON token bodies.
    Spark,
    /// Zillow Rental Feeds: `accessToken`, `clientId`, `apiKey` query parameters,
    /// form token bodies with HTTP Basic client authentication.
    Zillow,
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProviderKind::Spark => "spark",
            ProviderKind::Zillow => "zillow",
        })
    }
}

/// Zillow's query parameters that belong to credproxy, never to the caller.
const ZILLOW_OWNED: [&str; 3] = ["accessToken", "clientId", "apiKey"];

/// What the provider's own credential slot held.
#[derive(Debug, Default)]
pub struct Slot {
    /// Hash of the session key found in the slot, if any.
    pub key: Option<KeyHash>,
    /// The caller used `Authorization: Bearer` (Spark's RESO Web API); keep the scheme.
    pub bearer: bool,
}

impl ProviderKind {
    /// Removes the provider's credential slot from the request and returns what
    /// it held, with the query string to forward (Zillow's owned parameters
    /// taken out, every other byte kept in order).
    pub fn take_slot<'q>(
        self,
        headers: &mut HeaderMap,
        query: Option<&'q str>,
    ) -> (Slot, Option<Cow<'q, str>>) {
        match self {
            ProviderKind::Spark => {
                let mut slot = Slot::default();
                // Any Authorization the caller sent is replaced by the real token.
                if let Some(value) = headers.remove(AUTHORIZATION) {
                    if let Ok(text) = value.to_str() {
                        if let Some((scheme, rest)) = text.trim().split_once(' ') {
                            let token = rest.trim();
                            if scheme.eq_ignore_ascii_case("bearer") {
                                slot.bearer = true;
                            }
                            if (slot.bearer || scheme.eq_ignore_ascii_case("oauth"))
                                && !token.is_empty()
                            {
                                slot.key = Some(KeyHash::of(token.as_bytes()));
                            }
                        }
                    }
                }
                (slot, query.map(Cow::Borrowed))
            }
            ProviderKind::Zillow => {
                // Zillow takes no Authorization header; a caller's (which may
                // hold a session key) is not forwarded.
                headers.remove(AUTHORIZATION);
                let (rest, key) = split_zillow_query(query);
                (Slot { key, bearer: false }, rest)
            }
        }
    }

    /// Whether injected credentials travel in the query string (and so
    /// must be removed from links the proxy rewrites).
    pub fn credentials_in_query(self) -> bool {
        self == ProviderKind::Zillow
    }

    /// Removes injected credentials from the upstream's answer, where an
    /// upstream may echo the request URL: a redirect's `Location` (Zillow
    /// keeps the query, credentials included, in trailing-slash redirects).
    pub fn scrub_response(self, headers: &mut HeaderMap) {
        if self != ProviderKind::Zillow {
            return;
        }
        for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
            let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            let Some((base, query)) = value.split_once('?') else {
                continue;
            };
            let (rest, _) = split_zillow_query(Some(query));
            let cleaned = match rest {
                Some(q) if q.len() == query.len() => continue,
                Some(q) => format!("{base}?{q}"),
                None => base.to_owned(),
            };
            match HeaderValue::from_str(&cleaned) {
                Ok(v) => {
                    headers.insert(name, v);
                }
                Err(_) => {
                    headers.remove(name);
                }
            }
        }
    }
}

/// Splits Zillow's query into the caller's own parameters (bytes untouched)
/// and the `accessToken` the caller sent, if any.
///
/// Names are compared after percent-decoding, so `access%54oken` cannot slip
/// a caller's credential past us; values and other parameters are never
/// re-encoded, so odd or invalid escapes pass through as they came.
fn split_zillow_query(query: Option<&str>) -> (Option<Cow<'_, str>>, Option<KeyHash>) {
    let Some(q) = query else { return (None, None) };
    // Case-insensitively too: whatever the upstream's parser makes of
    // `AccessToken`, the caller must not get a credential past us with it.
    let owned = |seg: &str| {
        let name = seg.split_once('=').map_or(seg, |(n, _)| n);
        let name = percent_decode_str(name).decode_utf8_lossy();
        ZILLOW_OWNED
            .iter()
            .any(|o| o.eq_ignore_ascii_case(name.trim()))
    };
    if !q.split('&').any(owned) {
        return (Some(Cow::Borrowed(q)), None);
    }
    let mut key = None;
    let mut kept = String::with_capacity(q.len());
    let mut first = true;
    for seg in q.split('&') {
        if owned(seg) {
            if key.is_none() {
                if let Some((name, value)) = seg.split_once('=') {
                    if percent_decode_str(name)
                        .decode_utf8_lossy()
                        .trim()
                        .eq_ignore_ascii_case("accessToken")
                    {
                        let value: Cow<[u8]> = percent_decode_str(value).into();
                        if !value.is_empty() {
                            key = Some(KeyHash::of(&value));
                        }
                    }
                }
            }
            continue;
        }
        if !first {
            kept.push('&');
        }
        kept.push_str(seg);
        first = false;
    }
    ((!kept.is_empty()).then_some(Cow::Owned(kept)), key)
}

/// Characters escaped in injected query values: everything but unreserved.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A session's credentials in the exact form they are injected, computed once
/// when the session enters the cache so the hot path only copies them.
#[derive(Clone)]
pub enum Credentials {
    Spark {
        oauth: HeaderValue,
        bearer: HeaderValue,
        user_agent: Option<HeaderValue>,
    },
    Zillow {
        /// `accessToken=..&clientId=..&apiKey=..`, already percent-encoded.
        query: SecretString,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials([redacted])")
    }
}

/// An access token that cannot be put in a header (control characters).
#[derive(Debug, thiserror::Error)]
#[error("the stored access token contains characters that cannot be sent in a header")]
pub struct UnusableToken;

impl Credentials {
    pub fn new(
        provider: &ProviderConfig,
        access_token: &SecretString,
    ) -> Result<Credentials, UnusableToken> {
        let token = access_token.expose_secret();
        Ok(match provider.kind {
            ProviderKind::Spark => {
                let header = |scheme: &str| {
                    let mut v = HeaderValue::from_str(&format!("{scheme} {token}"))
                        .map_err(|_| UnusableToken)?;
                    v.set_sensitive(true);
                    Ok::<_, UnusableToken>(v)
                };
                Credentials::Spark {
                    oauth: header("OAuth")?,
                    bearer: header("Bearer")?,
                    user_agent: provider.user_agent.clone(),
                }
            }
            ProviderKind::Zillow => {
                let enc = |s: &str| utf8_percent_encode(s, QUERY_VALUE).to_string();
                let api_key = provider
                    .api_key
                    .as_ref()
                    .map(|k| enc(k.expose_secret()))
                    .unwrap_or_default();
                Credentials::Zillow {
                    query: SecretString::from(format!(
                        "accessToken={}&clientId={}&apiKey={}",
                        enc(token),
                        enc(&provider.client_id),
                        api_key
                    )),
                }
            }
        })
    }

    /// Writes the credentials into the outgoing request. `query` is what
    /// [`ProviderKind::take_slot`] left of the caller's query; the result is
    /// the query to send upstream.
    pub fn inject(
        &self,
        headers: &mut HeaderMap,
        query: Option<Cow<'_, str>>,
        slot: &Slot,
        path: &str,
    ) -> Option<String> {
        match self {
            Credentials::Spark {
                oauth,
                bearer,
                user_agent,
            } => {
                // The RESO Web API only takes Bearer; keep the scheme the caller chose,
                // and default to Bearer there when the key came some other way.
                let use_bearer = slot.bearer || is_reso_path(path);
                headers.insert(
                    AUTHORIZATION,
                    if use_bearer {
                        bearer.clone()
                    } else {
                        oauth.clone()
                    },
                );
                if let Some(ua) = user_agent {
                    if !headers.contains_key(&SPARK_USER_AGENT) {
                        headers.insert(SPARK_USER_AGENT, ua.clone());
                    }
                }
                query.map(Cow::into_owned)
            }
            Credentials::Zillow { query: creds } => {
                let creds = creds.expose_secret();
                Some(match query {
                    Some(q) if !q.is_empty() => {
                        let mut out = String::with_capacity(q.len() + 1 + creds.len());
                        out.push_str(&q);
                        out.push('&');
                        out.push_str(creds);
                        out
                    }
                    _ => creds.to_owned(),
                })
            }
        }
    }
}

/// Spark's application identification header.
pub const SPARK_USER_AGENT: http::HeaderName =
    http::HeaderName::from_static("x-sparkapi-user-agent");

fn is_reso_path(path: &str) -> bool {
    path.get(..11)
        .is_some_and(|p| p.eq_ignore_ascii_case("/reso/odata"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zillow(q: &str) -> (Option<String>, Option<KeyHash>) {
        let (rest, key) = split_zillow_query(Some(q));
        (rest.map(Cow::into_owned), key)
    }

    #[test]
    fn zillow_keeps_other_bytes_in_order() {
        let (rest, key) = zillow("b=2&accessToken=KEY&a=%zz&clientId=x&apiKey=y&&c=%41+");
        assert_eq!(rest.as_deref(), Some("b=2&a=%zz&&c=%41+"));
        assert_eq!(key, Some(KeyHash::of(b"KEY")));
    }

    #[test]
    fn zillow_untouched_query_is_borrowed() {
        let (rest, key) = split_zillow_query(Some("x=%ZZ&y"));
        assert!(matches!(rest, Some(Cow::Borrowed("x=%ZZ&y"))));
        assert!(key.is_none());
    }

    #[test]
    fn zillow_encoded_names_are_still_owned() {
        let (rest, key) = zillow("access%54oken=K%2B&z=1&api%4Bey");
        assert_eq!(rest.as_deref(), Some("z=1"));
        assert_eq!(key, Some(KeyHash::of(b"K+")));
    }

    #[test]
    fn zillow_owned_names_match_in_any_case() {
        let (rest, key) = zillow("AccessToken=K&APIKEY=x&clientid=y&z=1");
        assert_eq!(rest.as_deref(), Some("z=1"));
        assert_eq!(key, Some(KeyHash::of(b"K")));
    }

    #[test]
    fn zillow_redirects_lose_the_injected_credentials() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::LOCATION,
            HeaderValue::from_static(
                "https://z.example/listings/?a=1&accessToken=T&clientId=C&apiKey=K",
            ),
        );
        h.insert(
            http::header::CONTENT_LOCATION,
            HeaderValue::from_static("/x?accessToken=T"),
        );
        ProviderKind::Zillow.scrub_response(&mut h);
        assert_eq!(h[http::header::LOCATION], "https://z.example/listings/?a=1");
        assert_eq!(h[http::header::CONTENT_LOCATION], "/x");
        let mut spark = HeaderMap::new();
        spark.insert(
            http::header::LOCATION,
            HeaderValue::from_static("/x?accessToken=T"),
        );
        ProviderKind::Spark.scrub_response(&mut spark);
        assert_eq!(
            spark[http::header::LOCATION],
            "/x?accessToken=T",
            "Spark's credentials are headers"
        );
    }

    #[test]
    fn zillow_only_owned_params_leave_no_query() {
        assert_eq!(zillow("accessToken=K"), (None, Some(KeyHash::of(b"K"))));
    }

    #[test]
    fn spark_slot_reads_oauth_and_bearer() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("OAuth abc"));
        let (slot, _) = ProviderKind::Spark.take_slot(&mut h, None);
        assert_eq!(slot.key, Some(KeyHash::of(b"abc")));
        assert!(!slot.bearer && h.is_empty());
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer  xyz "));
        let (slot, _) = ProviderKind::Spark.take_slot(&mut h, Some("q=1"));
        assert_eq!(slot.key, Some(KeyHash::of(b"xyz")));
        assert!(slot.bearer);
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcjpwYXNz"),
        );
        let (slot, _) = ProviderKind::Spark.take_slot(&mut h, None);
        assert!(
            slot.key.is_none() && h.is_empty(),
            "other schemes are dropped, never forwarded"
        );
    }

    #[test]
    fn reso_path_detection() {
        assert!(is_reso_path("/Reso/OData/Property"));
        assert!(is_reso_path("/reso/odata"));
        assert!(!is_reso_path("/v1/listings"));
        assert!(!is_reso_path("/Reso"));
    }
}
