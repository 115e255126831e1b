//! A provider at work on the request path: where a caller may put its
//! session key, how real credentials are injected, and how they are found
//! again in the upstream's answers, all read from the provider's
//! description (`config::Description`), so the proxy never asks which
//! provider it is. What only Spark does is in `spark.rs`.
//!
//! **Invariant:** [`Shape::take_slot`] removes every place a caller could
//! put a credential for this provider (`Authorization`, every injected
//! header, every injected query parameter in any spelling), and
//! [`Credentials::inject`] is the only code that writes one. Together with
//! the proxy removing the session header and `Proxy-Authorization`, no
//! session key reaches the upstream and a caller cannot override the
//! injected credentials.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_LENGTH};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use secrecy::{ExposeSecret, SecretString};

use crate::config::{Description, Dialect, Placeholder, ProviderConfig, Scheme};
use crate::secrets::session::KeyHash;

mod query;
mod scrub;
pub mod spark;

pub use query::QueryNames;
pub use scrub::MIN_SCRUBBED_SECRET;
use scrub::{Scrubbed, Scrubber};

/// Rounds of percent-decoding tried when looking for a disguised name or a
/// dot segment: more than any server applies, and a bound on the work.
pub(crate) const MAX_DECODE_ROUNDS: usize = 4;

/// What the provider's own credential slot held.
#[derive(Debug, Default)]
pub struct Slot {
    /// Hash of the session key found in the slot, if any.
    pub key: Option<KeyHash>,
    /// Spark: the caller used `Authorization: Bearer` (the RESO Web API);
    /// keep the scheme.
    pub bearer: bool,
}

/// A caller's query names a credential parameter in a form an upstream may
/// read as one (`accessToken+=`, `accessToken[]=`, `accessToken%3D...`,
/// `accessToken%00=`...): it would reach the upstream ahead of the injected
/// one, so the request is refused.
#[derive(Debug, thiserror::Error)]
#[error("a credential parameter is disguised in the query string")]
pub struct DisguisedCredential;

/// An injected header that may carry a session key: the text its template
/// writes around `{access_token}`.
#[derive(Debug)]
struct HeaderSlot {
    name: HeaderName,
    before: String,
    after: String,
}

/// A provider's request-path form, computed once from its description.
#[derive(Debug)]
pub struct Shape {
    dialect: Dialect,
    /// Removed from every request: `Authorization` and every injected header.
    removed: Vec<HeaderName>,
    /// Of those, the ones that may carry a session key.
    slots: Vec<HeaderSlot>,
    names: Arc<QueryNames>,
}

impl Shape {
    pub fn new(d: &Description) -> Shape {
        let mut removed = vec![AUTHORIZATION];
        let mut slots = Vec::new();
        for (name, template) in &d.headers {
            if !removed.contains(name) {
                removed.push(name.clone());
            }
            if let Some((before, after)) = template.around_access_token() {
                slots.push(HeaderSlot {
                    name: name.clone(),
                    before,
                    after,
                });
            }
        }
        let names = QueryNames::new(
            d.query
                .iter()
                .map(|(n, t)| {
                    let alone = t
                        .around_access_token()
                        .is_some_and(|(b, a)| b.is_empty() && a.is_empty());
                    (n.as_str(), alone)
                })
                .chain(d.owned_query.iter().map(|n| (n.as_str(), false))),
        );
        Shape {
            dialect: d.dialect,
            removed,
            slots,
            names: Arc::new(names),
        }
    }

    /// Removes the provider's credential slots from the request and returns
    /// what they held, with the query string to forward (injected parameters
    /// taken out, every other byte kept in order). A query that names a
    /// credential parameter in disguise is refused.
    pub fn take_slot<'q>(
        &self,
        headers: &mut HeaderMap,
        query: Option<&'q str>,
    ) -> Result<(Slot, Option<Cow<'q, str>>), DisguisedCredential> {
        let mut slot = Slot::default();
        for name in &self.removed {
            // Whatever the caller sent there is replaced or dropped: it may
            // hold a session key, and it must not override an injection.
            let Some(value) = headers.remove(name) else {
                continue;
            };
            if slot.key.is_some() {
                continue;
            }
            if self.dialect == Dialect::Spark && *name == AUTHORIZATION {
                spark::read_authorization(&value, &mut slot);
                continue;
            }
            if let Some(s) = self.slots.iter().find(|s| s.name == *name) {
                slot.key = key_in(&value, &s.before, &s.after);
            }
        }
        if self.names.is_empty() {
            return Ok((slot, query.map(Cow::Borrowed)));
        }
        let (rest, key) = query::split_query(query, &self.names)?;
        if slot.key.is_none() {
            slot.key = key;
        }
        Ok((slot, rest))
    }

    /// The injected query parameters (to remove from links the proxy
    /// rewrites); `None` when credentials travel in headers only.
    pub fn query_names(&self) -> Option<Arc<QueryNames>> {
        (!self.names.is_empty()).then(|| Arc::clone(&self.names))
    }
}

/// The session key in a caller's header written as the template writes it
/// (`Bearer KEY`): a scheme word is compared ignoring case and spacing,
/// other text exactly.
fn key_in(value: &HeaderValue, before: &str, after: &str) -> Option<KeyHash> {
    let text = value.to_str().ok()?.trim();
    let inner = match before.strip_suffix(' ') {
        Some(scheme) if !scheme.is_empty() && !scheme.contains(' ') => {
            let (word, rest) = text.split_once(' ')?;
            if !word.eq_ignore_ascii_case(scheme) {
                return None;
            }
            rest.trim_start()
        }
        _ => text.strip_prefix(before)?,
    };
    let key = inner.strip_suffix(after)?.trim_end();
    (!key.is_empty()).then(|| KeyHash::of(key.as_bytes()))
}

/// How a legacy application presents `key` to this provider: the header
/// line to send, if the key goes in a header, and the path (with the query
/// that carries the key, if it goes there) of the provider's example call.
pub fn key_example(d: &Description, key: &str) -> (Option<String>, String) {
    let path = d.example_path.clone();
    for (name, template) in &d.headers {
        if template.around_access_token().is_some() {
            let value = template.fill(|p| match p {
                Placeholder::AccessToken => key.to_owned(),
                _ => String::new(),
            });
            return (
                Some(format!(
                    "{}: {value}",
                    crate::config::header_case(name.as_str())
                )),
                path,
            );
        }
    }
    for (name, template) in &d.query {
        if template.around_access_token() == Some((String::new(), String::new())) {
            let sep = if path.contains('?') { '&' } else { '?' };
            return (None, format!("{path}{sep}{name}={key}"));
        }
    }
    (None, path)
}

/// Characters escaped in injected query values: everything but unreserved.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A session's credentials in the exact form they are injected, computed once
/// when the session enters the cache so the hot path only copies them, and
/// the secret values among them, to find them again in the upstream's answers.
#[derive(Clone)]
pub struct Credentials {
    injection: Injection,
    scrubber: Arc<Scrubber>,
}

#[derive(Clone)]
struct Injection {
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The injected query parameters, `a=..&b=..`, already percent-encoded.
    query: Option<SecretString>,
    /// Spark: `Bearer TOKEN` (OAuth sessions), and the user agent.
    spark_bearer: Option<HeaderValue>,
    spark_user_agent: Option<HeaderValue>,
    /// Spark's API-key sessions: every request is signed.
    signer: Option<Arc<spark::api_key::ApiKeyCredentials>>,
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

fn sensitive(text: &str) -> Result<HeaderValue, UnusableToken> {
    let mut v = HeaderValue::from_str(text).map_err(|_| UnusableToken)?;
    v.set_sensitive(true);
    Ok(v)
}

impl Credentials {
    pub fn new(
        provider: &ProviderConfig,
        access_token: &SecretString,
    ) -> Result<Credentials, UnusableToken> {
        let d = &provider.description;
        // Spark's API-key sessions keep the key, its secret and the open
        // Spark session's AuthToken together in their access token.
        let signer = match d.scheme {
            Scheme::SparkApiKey => Some(Arc::new(
                spark::api_key::ApiKeyCredentials::read(access_token).ok_or(UnusableToken)?,
            )),
            Scheme::OAuth2 | Scheme::Static => None,
        };
        let token = match &signer {
            Some(s) => s.auth_token.as_str(),
            None => access_token.expose_secret(),
        };
        let api_key = provider
            .api_key
            .as_ref()
            .map(|k| k.expose_secret())
            .unwrap_or_default();
        let value = |p: Placeholder| -> &str {
            match p {
                Placeholder::AccessToken => token,
                Placeholder::ClientId => &provider.client_id,
                Placeholder::ApiKey => api_key,
            }
        };
        let mut headers = Vec::with_capacity(d.headers.len());
        for (name, template) in &d.headers {
            headers.push((
                name.clone(),
                sensitive(&template.fill(|p| value(p).to_owned()))?,
            ));
        }
        let mut pairs: Vec<(&str, String)> = d
            .query
            .iter()
            .map(|(name, template)| (name.as_str(), template.fill(|p| value(p).to_owned())))
            .collect();
        if let Some(user) = signer.as_ref().and_then(|s| s.api_user.as_ref()) {
            pairs.push(("ApiUser", user.clone()));
        }
        let query = (!pairs.is_empty()).then(|| {
            let mut q = String::new();
            for (name, filled) in &pairs {
                if !q.is_empty() {
                    q.push('&');
                }
                q.push_str(name);
                q.push('=');
                q.extend(utf8_percent_encode(filled, QUERY_VALUE));
            }
            SecretString::from(q)
        });
        let spark_bearer = match (d.dialect, d.scheme) {
            (Dialect::Spark, Scheme::OAuth2) => Some(sensitive(&format!("Bearer {token}"))?),
            _ => None,
        };
        let spark_user_agent = match d.dialect {
            Dialect::Spark => provider.user_agent.clone(),
            Dialect::Plain => None,
        };
        // The access token is searched for whatever its length; the other
        // injected values only when long enough not to match unrelated text.
        let mut long: Vec<&[u8]> = Vec::new();
        for p in [Placeholder::ClientId, Placeholder::ApiKey] {
            if d.uses(p) {
                long.push(value(p).as_bytes());
            }
        }
        if let Some(s) = &signer {
            long.push(s.api_key.as_bytes());
        }
        let names = Shape::new(d).query_names().map(|n| (*n).clone());
        let scrubber = Scrubber::new(&[token.as_bytes()], &long, names);
        Ok(Credentials {
            injection: Injection {
                headers,
                query,
                spark_bearer,
                spark_user_agent,
                signer,
            },
            scrubber: Arc::new(scrubber),
        })
    }

    /// Whether every request must be signed over its body (Spark's API
    /// keys): a body that cannot be kept in memory cannot be sent.
    pub fn signs(&self) -> bool {
        self.injection.signer.is_some()
    }

    /// Spark's API keys: appends `ApiSig` for the request as it will be
    /// sent (`path` upstream, `query` after [`Credentials::inject`], `body`
    /// as sent). Nothing for other schemes.
    pub fn sign(&self, path: &str, query: &mut String, body: &[u8]) {
        if let Some(signer) = &self.injection.signer {
            let sig = signer.request_signature(path, query, body);
            if !query.is_empty() {
                query.push('&');
            }
            query.push_str("ApiSig=");
            query.push_str(&sig);
        }
    }

    /// Writes the credentials into the outgoing request. `query` is what
    /// [`Shape::take_slot`] left of the caller's query; the result is the
    /// query to send upstream.
    pub fn inject(
        &self,
        headers: &mut HeaderMap,
        query: Option<&str>,
        slot: &Slot,
        path: &str,
    ) -> Option<String> {
        let injection = &self.injection;
        for (name, value) in &injection.headers {
            headers.insert(name.clone(), value.clone());
        }
        if injection.spark_bearer.is_some() || injection.spark_user_agent.is_some() {
            spark::inject(
                headers,
                injection.spark_bearer.as_ref(),
                injection.spark_user_agent.as_ref(),
                slot,
                path,
            );
        }
        let Some(creds) = &injection.query else {
            return query.map(str::to_owned);
        };
        let creds = creds.expose_secret();
        Some(match query {
            Some(q) if !q.is_empty() => {
                let mut out = String::with_capacity(q.len() + 1 + creds.len());
                out.push_str(q);
                out.push('&');
                out.push_str(creds);
                out
            }
            _ => creds.to_owned(),
        })
    }

    /// Removes the injected credentials from every header of the upstream's
    /// answer, where an upstream may echo the request (a redirect's
    /// `Location`, `Link`, `Refresh`, a login page's `?next=` with the URL
    /// percent-encoded, a cookie, an error header...). Every occurrence of
    /// every secret value goes, raw or percent-encoded (either case of hex,
    /// encoded again and again), from every value whatever its bytes; for
    /// Zillow, the credential parameters of URL-like values go too. A value
    /// that does not settle is dropped. A header whose *name* carries a
    /// secret (in any case, since names arrive lowercased, raw or
    /// percent-encoded) is dropped whole. `Content-Length` is left alone: it
    /// holds only digits, which hyper has already read for framing, and a
    /// very short token could otherwise change it. Nothing is allocated when
    /// nothing matches: a memmem search per name, value and secret.
    pub fn scrub_response(&self, headers: &mut HeaderMap) {
        let untouched = |name: &http::HeaderName, v: &HeaderValue| {
            name == CONTENT_LENGTH
                || matches!(self.scrubber.scrub(v.as_bytes()), Scrubbed::Untouched)
        };
        if !headers.keys().any(|n| self.scrubber.in_name(n.as_str()))
            && headers.iter().all(|(n, v)| untouched(n, v))
        {
            return;
        }
        let old = std::mem::replace(headers, HeaderMap::with_capacity(headers.len()));
        let mut name: Option<http::HeaderName> = None;
        let mut drop_name = false;
        for (n, value) in old {
            if let Some(n) = n {
                drop_name = self.scrubber.in_name(n.as_str());
                if drop_name {
                    tracing::debug!("a response header's name carries a credential; dropped");
                }
                name = Some(n);
            }
            let Some(name) = &name else { continue };
            if drop_name {
                continue;
            }
            if name == CONTENT_LENGTH {
                headers.append(name, value);
                continue;
            }
            match self.scrubber.scrub(value.as_bytes()) {
                Scrubbed::Untouched => {
                    headers.append(name, value);
                }
                Scrubbed::Changed(bytes) => match HeaderValue::from_bytes(&bytes) {
                    Ok(v) => {
                        headers.append(name, v);
                    }
                    Err(_) => {
                        tracing::debug!(header = %name, "a scrubbed response header is not a valid value; dropped");
                    }
                },
                Scrubbed::Dropped => {
                    tracing::debug!(header = %name, "a response header kept yielding credentials; dropped");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zillow_names() -> QueryNames {
        QueryNames::new([
            ("accessToken", true),
            ("clientId", false),
            ("apiKey", false),
        ])
    }

    fn split_zillow_query(
        q: Option<&str>,
    ) -> Result<(Option<Cow<'_, str>>, Option<KeyHash>), DisguisedCredential> {
        query::split_query(q, &zillow_names())
    }

    fn spark_shape() -> Shape {
        Shape::new(&crate::config::preset(crate::config::ProviderKind::Spark))
    }

    fn zillow(q: &str) -> (Option<String>, Option<KeyHash>) {
        let (rest, key) = split_zillow_query(Some(q)).expect("not disguised");
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
        let (rest, key) = split_zillow_query(Some("x=%ZZ&y")).expect("plain");
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

    const TOKEN: &str = "zat-Secret+/=Token-42";
    const CLIENT: &str = "zillow-client-id";
    const API_KEY: &str = "zillow-api-key-XYZ";

    fn credentials(kind: &str, api_key: &str, client_id: &str) -> Credentials {
        credentials_with(kind, api_key, client_id, TOKEN)
    }

    fn credentials_with(kind: &str, api_key: &str, client_id: &str, token: &str) -> Credentials {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [store]\nurl = \"sqlite://x.db\"\nkey_file = \"x.key\"\n\
             [providers.p]\nkind = \"{kind}\"\napi_base = \"https://api.example\"\n\
             token_url = \"https://api.example/token\"\nauthorize_url = \"https://api.example/auth\"\n\
             client_id = \"{client_id}\"\nclient_secret = \"s\"\n{api_key}\n"
        );
        let config = crate::config::Config::parse(&text, std::path::Path::new("t.toml"), |_| None)
            .expect("config");
        let provider = config.provider("p").expect("provider");
        Credentials::new(provider, &SecretString::from(token)).expect("credentials")
    }

    fn zillow_credentials() -> Credentials {
        credentials("zillow", &format!("api_key = \"{API_KEY}\""), CLIENT)
    }

    /// What the upstream saw: the injected query, as an echo would quote it.
    fn injected_query(c: &Credentials) -> String {
        c.inject(&mut HeaderMap::new(), Some("a=1"), &Slot::default(), "/")
            .expect("query")
    }

    fn leaks(value: &[u8]) -> bool {
        let lower = String::from_utf8_lossy(value).to_ascii_lowercase();
        [TOKEN, CLIENT, API_KEY].iter().any(|s| {
            let enc = utf8_percent_encode(s, QUERY_VALUE).to_string();
            [s.to_string(), enc.clone(), enc.replace('%', "%25")]
                .iter()
                .any(|f| lower.contains(&f.to_ascii_lowercase()))
        })
    }

    #[test]
    fn every_header_every_occurrence_loses_the_injected_credentials() {
        let c = zillow_credentials();
        let q = injected_query(&c);
        let uri = format!("/listings/?{q}");
        let once = utf8_percent_encode(&uri, NON_ALPHANUMERIC).to_string();
        let twice = utf8_percent_encode(&once, NON_ALPHANUMERIC).to_string();
        let mut h = HeaderMap::new();
        let add = |h: &mut HeaderMap, name: &'static str, v: Vec<u8>| {
            h.append(name, HeaderValue::from_bytes(&v).expect("valid"));
        };
        add(
            &mut h,
            "location",
            format!("https://z.example{uri}").into_bytes(),
        );
        add(&mut h, "location", uri.clone().into_bytes());
        add(
            &mut h,
            "content-location",
            format!("{uri}#frag").into_bytes(),
        );
        add(
            &mut h,
            "link",
            format!("<{uri}>; rel=next, <https://o.example/{uri}>; rel=prev").into_bytes(),
        );
        add(&mut h, "refresh", format!("0; url={uri}").into_bytes());
        add(&mut h, "x-next", format!("/login?next={once}").into_bytes());
        add(
            &mut h,
            "x-next-lower",
            format!("/login?next={}", once.to_ascii_lowercase()).into_bytes(),
        );
        add(
            &mut h,
            "x-twice",
            format!("/login?next={twice}").into_bytes(),
        );
        let mut cafe = b"/caf\xc3\xa9".to_vec();
        cafe.extend_from_slice(uri.as_bytes());
        add(&mut h, "location", cafe);
        add(
            &mut h,
            "set-cookie",
            format!("t={TOKEN}; Path=/").into_bytes(),
        );
        add(&mut h, "x-plain", b"nothing to see".to_vec());
        let before = h.len();
        assert!(h.values().any(|v| leaks(v.as_bytes())));
        c.scrub_response(&mut h);
        assert_eq!(h.len(), before, "values are cleaned, not dropped");
        for (name, v) in &h {
            assert!(
                !leaks(v.as_bytes()),
                "{name}: {:?}",
                String::from_utf8_lossy(v.as_bytes())
            );
        }
        let locations: Vec<_> = h.get_all("location").iter().collect();
        assert_eq!(locations[0], "https://z.example/listings/?a=1");
        assert_eq!(locations[1], "/listings/?a=1");
        assert_eq!(locations[2].as_bytes(), b"/caf\xc3\xa9/listings/?a=1");
        assert_eq!(h["content-location"], "/listings/?a=1#frag");
        assert_eq!(
            h["link"],
            "</listings/?a=1>; rel=next, <https://o.example//listings/?a=1>; rel=prev"
        );
        assert_eq!(h["refresh"], "0; url=/listings/?a=1");
        assert_eq!(h["x-plain"], "nothing to see");
        assert_eq!(h["set-cookie"], "t=; Path=/");
    }

    #[test]
    fn untouched_answers_stay_as_they_are() {
        let c = zillow_credentials();
        let mut h = HeaderMap::new();
        h.insert("location", HeaderValue::from_static("/x?a=1&b=%41+c"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let copy = h.clone();
        c.scrub_response(&mut h);
        assert_eq!(h, copy);
    }

    #[test]
    fn short_secrets_are_not_searched_but_their_parameters_go() {
        let c = credentials("zillow", "api_key = \"k9\"", "c1");
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("19"));
        h.insert(
            "date",
            HeaderValue::from_static("Tue, 1 Oct 2024 09:19:00 GMT"),
        );
        h.insert(
            "location",
            HeaderValue::from_static("/x?clientId=c1&APIKEY=k9&accessToken%5B%5D=z&b=c1"),
        );
        c.scrub_response(&mut h);
        assert_eq!(h["content-length"], "19");
        assert_eq!(h["date"], "Tue, 1 Oct 2024 09:19:00 GMT");
        assert_eq!(h["location"], "/x?b=c1");
    }

    #[test]
    fn a_short_access_token_is_scrubbed_whatever_its_length() {
        for kind in ["spark", "zillow"] {
            let api_key = if kind == "zillow" {
                "api_key = \"k9\""
            } else {
                ""
            };
            let c = credentials_with(kind, api_key, "c1", "zQ7");
            let mut h = HeaderMap::new();
            h.insert("content-length", HeaderValue::from_static("19"));
            h.insert("x-echo", HeaderValue::from_static("OAuth zQ7"));
            h.insert("x-twice", HeaderValue::from_static("a%257A%2551%37b"));
            h.insert("x-other", HeaderValue::from_static("zq7 c1 k9"));
            c.scrub_response(&mut h);
            assert_eq!(h["content-length"], "19", "{kind}");
            assert_eq!(h["x-echo"], "OAuth ", "{kind}");
            assert_eq!(h["x-twice"], "ab", "{kind}");
            assert_eq!(h["x-other"], "zq7 c1 k9", "{kind}: short ids stay");
        }
        // The empty value is no secret to search for.
        let c = credentials_with("spark", "", "c1", "");
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("kept"));
        c.scrub_response(&mut h);
        assert_eq!(h["x-a"], "kept");
    }

    #[test]
    fn header_names_carrying_a_secret_are_dropped() {
        let token = "Sat-Name-Token-42";
        for kind in ["spark", "zillow"] {
            let api_key = if kind == "zillow" {
                format!("api_key = \"{API_KEY}\"")
            } else {
                String::new()
            };
            let c = credentials_with(kind, &api_key, CLIENT, token);
            let mut h = HeaderMap::new();
            // hyper lowercases names: compared in any case.
            h.insert("x-sat-name-token-42", HeaderValue::from_static("1"));
            h.append("x-sat-name-token-42", HeaderValue::from_static("2"));
            h.insert("sat-name-token-42x", HeaderValue::from_static("1"));
            // Percent-encoded, once and twice, escapes in either case.
            h.insert("x-%53at%2dname-token-42", HeaderValue::from_static("1"));
            h.insert("x-%2553at-name-token-4%32", HeaderValue::from_static("1"));
            h.insert("x-sat-name-token-4", HeaderValue::from_static("kept"));
            h.insert("x-innocent", HeaderValue::from_static("kept"));
            if kind == "zillow" {
                h.insert("x-zillow-api-key-xyz", HeaderValue::from_static("1"));
                h.insert("zillow-client-id", HeaderValue::from_static("1"));
            }
            c.scrub_response(&mut h);
            let mut names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
            names.sort_unstable();
            assert_eq!(names, ["x-innocent", "x-sat-name-token-4"], "{kind}");
            assert_eq!(h.get_all("x-innocent").iter().count(), 1);
        }
        // Nothing to drop: left as it is.
        let c = credentials_with("spark", "", "c1", token);
        let mut h = HeaderMap::new();
        h.insert("x-sat-name", HeaderValue::from_static("1"));
        c.scrub_response(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn spark_answers_lose_the_access_token() {
        let c = credentials("spark", "", "spark-client");
        let mut h = HeaderMap::new();
        h.insert(
            "x-echo-authorization",
            HeaderValue::from_str(&format!("OAuth {TOKEN}")).expect("v"),
        );
        h.insert("location", HeaderValue::from_static("/x?accessToken=T&a=1"));
        c.scrub_response(&mut h);
        assert_eq!(h["x-echo-authorization"], "OAuth ");
        assert_eq!(
            h["location"], "/x?accessToken=T&a=1",
            "Spark owns no query parameter"
        );
    }

    #[test]
    fn semicolons_separate_parameters_too() {
        let (rest, key) = zillow("x=1;accessToken=KEY&b=2;clientId=c;z");
        assert_eq!(rest.as_deref(), Some("x=1&b=2;z"));
        assert_eq!(key, Some(KeyHash::of(b"KEY")));
        let (rest, key) = zillow("accessToken=KEY;b=2");
        assert_eq!(rest.as_deref(), Some("b=2"));
        assert_eq!(key, Some(KeyHash::of(b"KEY")));
    }

    #[test]
    fn disguised_credential_names_are_refused() {
        for q in [
            "accessToken+=KEY",
            "accessToken%20=KEY",
            "+accessToken=KEY",
            "accessToken[]=KEY",
            "accessToken%5B%5D=KEY",
            "accessToken[0]=KEY",
            "accessToken%3DKEY",
            "x=1&accessToken%3dKEY",
            "accessToken%00=KEY",
            "accessToken%00junk=KEY",
            "accessToken%09=KEY",
            "access%2554oken=KEY",
            "ACCESSTOKEN%2B=KEY",
            "x=1;apiKey[]=k",
            "clientId%20=c",
            "accessToken%26=KEY",
        ] {
            assert!(split_zillow_query(Some(q)).is_err(), "{q}");
        }
    }

    #[test]
    fn names_that_only_look_alike_pass() {
        for q in [
            "accessTokens=1",
            "myaccessToken=1",
            "access_token=1",
            "x=accessToken%3D1",
            "x=accessToken+",
            "access%20Token=1",
        ] {
            let (rest, key) = zillow(q);
            assert_eq!(rest.as_deref(), Some(q));
            assert!(key.is_none());
        }
        // A bare name (no value) is still a plain one: removed.
        assert_eq!(zillow("accessToken&a=1"), (Some("a=1".into()), None));
    }

    #[test]
    fn zillow_only_owned_params_leave_no_query() {
        assert_eq!(zillow("accessToken=K"), (None, Some(KeyHash::of(b"K"))));
    }

    #[test]
    fn spark_slot_reads_oauth_and_bearer() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("OAuth abc"));
        let (slot, _) = spark_shape().take_slot(&mut h, None).expect("spark");
        assert_eq!(slot.key, Some(KeyHash::of(b"abc")));
        assert!(!slot.bearer && h.is_empty());
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer  xyz "));
        let (slot, _) = spark_shape().take_slot(&mut h, Some("q=1")).expect("spark");
        assert_eq!(slot.key, Some(KeyHash::of(b"xyz")));
        assert!(slot.bearer);
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcjpwYXNz"),
        );
        let (slot, _) = spark_shape().take_slot(&mut h, None).expect("spark");
        assert!(
            slot.key.is_none() && h.is_empty(),
            "other schemes are dropped, never forwarded"
        );
    }
}
