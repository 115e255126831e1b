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
use std::ops::Range;

use http::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_LENGTH};
use memchr::memmem;
use percent_encoding::{
    percent_decode, percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC,
};
use secrecy::{ExposeSecret, SecretString};

use crate::config::ProviderConfig;
pub use crate::config::ProviderKind;
use crate::secrets::session::KeyHash;

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
    /// taken out, every other byte kept in order). A query that names a
    /// credential parameter in disguise is refused.
    pub fn take_slot<'q>(
        self,
        headers: &mut HeaderMap,
        query: Option<&'q str>,
    ) -> Result<(Slot, Option<Cow<'q, str>>), DisguisedCredential> {
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
                Ok((slot, query.map(Cow::Borrowed)))
            }
            ProviderKind::Zillow => {
                // Zillow takes no Authorization header; a caller's (which may
                // hold a session key) is not forwarded.
                headers.remove(AUTHORIZATION);
                let (rest, key) = split_zillow_query(query)?;
                Ok((Slot { key, bearer: false }, rest))
            }
        }
    }

    /// Whether injected credentials travel in the query string (and so
    /// must be removed from links the proxy rewrites).
    pub fn credentials_in_query(self) -> bool {
        self == ProviderKind::Zillow
    }
}

/// A caller's query names a credential parameter in a form an upstream may
/// read as one (`accessToken+=`, `accessToken[]=`, `accessToken%3D...`,
/// `accessToken%00=`...): it would reach the upstream ahead of the injected
/// one, so the request is refused.
#[derive(Debug, thiserror::Error)]
#[error("a credential parameter is disguised in the query string")]
pub struct DisguisedCredential;

/// How a query parameter's name relates to the provider's credential names.
#[derive(Debug, PartialEq, Eq)]
enum ParamName {
    /// Not a credential.
    Other,
    /// `accessToken`, `clientId` or `apiKey` in any case, percent-decoded
    /// once: ours to remove (and, for `accessToken`, a session key).
    Owned { access_token: bool },
    /// A credential name in disguise: trailing `+`, spaces, control
    /// characters or `[]`, an encoded `=` (`accessToken%3DKEY`), a NUL, or
    /// encoded more than once.
    Disguised,
}

/// Rounds of percent-decoding tried when looking for a disguised name or a
/// dot segment: more than any server applies, and a bound on the work.
pub(crate) const MAX_DECODE_ROUNDS: usize = 4;

fn is_owned_name(name: &[u8]) -> Option<bool> {
    ZILLOW_OWNED
        .iter()
        .position(|o| o.as_bytes().eq_ignore_ascii_case(name))
        .map(|i| i == 0)
}

fn classify(name: &[u8]) -> ParamName {
    let once: Cow<[u8]> = percent_decode(name).into();
    if let Some(access_token) = is_owned_name(&once) {
        return ParamName::Owned { access_token };
    }
    // Every spelling a lenient parser might reduce to a credential name:
    // decoded until stable, cut where a parser might end the name, trimmed.
    let mut decoded = once;
    for _ in 0..MAX_DECODE_ROUNDS {
        match Cow::from(percent_decode(&decoded)) {
            Cow::Borrowed(_) => break,
            Cow::Owned(next) => decoded = Cow::Owned(next),
        }
    }
    let cut = decoded
        .iter()
        .position(|&b| matches!(b, b'=' | b'[' | b'&' | b';' | 0))
        .unwrap_or(decoded.len());
    let trimmable = |b: &u8| b.is_ascii_whitespace() || b.is_ascii_control() || *b == b'+';
    let core = &decoded[..cut];
    let start = core
        .iter()
        .position(|b| !trimmable(b))
        .unwrap_or(core.len());
    let end = core
        .iter()
        .rposition(|b| !trimmable(b))
        .map_or(start, |i| i + 1);
    if is_owned_name(&core[start..end]).is_some() {
        ParamName::Disguised
    } else {
        ParamName::Other
    }
}

/// The parameters of a query as `(separator before, segment)` byte ranges;
/// both `&` and `;` separate (some servers split on either).
fn param_spans(q: &[u8]) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + '_ {
    let mut at = Some(0);
    let mut sep = 0..0;
    std::iter::from_fn(move || {
        let from = at?;
        let before = sep.clone();
        match memchr::memchr2(b'&', b';', &q[from..]) {
            Some(i) => {
                sep = from + i..from + i + 1;
                at = Some(from + i + 1);
                Some((before, from..from + i))
            }
            None => {
                at = None;
                Some((before, from..q.len()))
            }
        }
    })
}

/// Whether a query parameter named `name` (as it appears, percent-encoded
/// or not) carries one of Zillow's credentials, plainly or in disguise: the
/// one rule for the request's query, response headers and rewritten links.
pub(crate) fn is_credential_name(name: &[u8]) -> bool {
    classify(name) != ParamName::Other
}

/// A parameter's name: its bytes before the first `=`.
fn name_of(segment: &[u8]) -> &[u8] {
    memchr::memchr(b'=', segment).map_or(segment, |i| &segment[..i])
}

/// Splits Zillow's query into the caller's own parameters (bytes untouched)
/// and the `accessToken` the caller sent, if any.
///
/// Names are compared after percent-decoding, so `access%54oken` cannot slip
/// a caller's credential past us; values and other parameters are never
/// re-encoded, so odd or invalid escapes pass through as they came. `&` and
/// `;` both separate parameters; a credential name in disguise is refused.
fn split_zillow_query(
    query: Option<&str>,
) -> Result<(Option<Cow<'_, str>>, Option<KeyHash>), DisguisedCredential> {
    let Some(q) = query else {
        return Ok((None, None));
    };
    let bytes = q.as_bytes();
    let mut owned_any = false;
    for (_, seg) in param_spans(bytes) {
        // Case-insensitively too: whatever the upstream's parser makes of
        // `AccessToken`, the caller must not get a credential past us with it.
        match classify(name_of(&bytes[seg])) {
            ParamName::Other => {}
            ParamName::Owned { .. } => owned_any = true,
            ParamName::Disguised => return Err(DisguisedCredential),
        }
    }
    if !owned_any {
        return Ok((Some(Cow::Borrowed(q)), None));
    }
    let mut key = None;
    let mut kept = String::with_capacity(q.len());
    let mut first = true;
    for (sep, seg) in param_spans(bytes) {
        let segment = q.get(seg).unwrap_or_default();
        if let ParamName::Owned { access_token } = classify(name_of(segment.as_bytes())) {
            if access_token && key.is_none() {
                if let Some((_, value)) = segment.split_once('=') {
                    let value: Cow<[u8]> = percent_decode_str(value).into();
                    if !value.is_empty() {
                        key = Some(KeyHash::of(&value));
                    }
                }
            }
            continue;
        }
        if !first {
            kept.push_str(q.get(sep).unwrap_or_default());
        }
        kept.push_str(segment);
        first = false;
    }
    Ok(((!kept.is_empty()).then_some(Cow::Owned(kept)), key))
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
    scrubber: Scrubber,
}

#[derive(Clone)]
enum Injection {
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
                Credentials {
                    injection: Injection::Spark {
                        oauth: header("OAuth")?,
                        bearer: header("Bearer")?,
                        user_agent: provider.user_agent.clone(),
                    },
                    scrubber: Scrubber::new(&[token.as_bytes()], &[], false),
                }
            }
            ProviderKind::Zillow => {
                let enc = |s: &str| utf8_percent_encode(s, QUERY_VALUE).to_string();
                let api_key = provider
                    .api_key
                    .as_ref()
                    .map(|k| k.expose_secret())
                    .unwrap_or_default();
                Credentials {
                    injection: Injection::Zillow {
                        query: SecretString::from(format!(
                            "accessToken={}&clientId={}&apiKey={}",
                            enc(token),
                            enc(&provider.client_id),
                            enc(api_key)
                        )),
                    },
                    scrubber: Scrubber::new(
                        &[token.as_bytes()],
                        &[provider.client_id.as_bytes(), api_key.as_bytes()],
                        true,
                    ),
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
        query: Option<&str>,
        slot: &Slot,
        path: &str,
    ) -> Option<String> {
        match &self.injection {
            Injection::Spark {
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
                query.map(str::to_owned)
            }
            Injection::Zillow { query: creds } => {
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
        }
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

/// A client id or API key shorter than this is not searched for as free
/// text (a short client id would match unrelated text, such as a date);
/// Zillow's credential parameters are removed whatever their value. The
/// access token is searched for whatever its length: it is the credential
/// that matters most, and mangling unrelated text is the lesser harm.
pub const MIN_SCRUBBED_SECRET: usize = 8;

/// How often `%` may be encoded again (`%253D`, `%25253D`) in a match.
const MAX_ESCAPE_DEPTH: usize = 4;

/// Passes over one header value before it is given up and dropped: removing
/// an occurrence may join the bytes around it into another one.
const MAX_SCRUB_PASSES: usize = 4;

/// Finds a session's secret values in the upstream's answers.
#[derive(Clone)]
struct Scrubber {
    secrets: Vec<memmem::Finder<'static>>,
    /// The same secrets lowercased, to find them in header names (which
    /// hyper lowercases).
    lower: Vec<Vec<u8>>,
    /// Zillow: credential parameters are removed from URL-like values too.
    params: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Scrubbed {
    Untouched,
    Changed(Vec<u8>),
    Dropped,
}

impl Scrubber {
    /// `always` are searched for whatever their length (the empty value
    /// aside), `long` only from [`MIN_SCRUBBED_SECRET`] bytes.
    fn new(always: &[&[u8]], long: &[&[u8]], params: bool) -> Scrubber {
        let wanted = always
            .iter()
            .filter(|s| !s.is_empty())
            .chain(long.iter().filter(|s| s.len() >= MIN_SCRUBBED_SECRET));
        let mut finders: Vec<memmem::Finder<'static>> = Vec::with_capacity(3);
        let mut lower: Vec<Vec<u8>> = Vec::with_capacity(3);
        for s in wanted {
            if !finders.iter().any(|f| f.needle() == *s) {
                finders.push(memmem::Finder::new(s).into_owned());
            }
            let l = s.to_ascii_lowercase();
            if !lower.contains(&l) {
                lower.push(l);
            }
        }
        Scrubber {
            secrets: finders,
            lower,
            params,
        }
    }

    /// Whether a (lowercase) header name contains a secret, compared
    /// ASCII-case-insensitively, raw or percent-encoded.
    fn in_name(&self, name: &str) -> bool {
        let name = name.as_bytes();
        let encoded = memchr::memchr2(b'%', b'+', name).is_some();
        self.lower.iter().any(|secret| {
            if name.len() < secret.len() {
                return false;
            }
            if encoded {
                memchr::memchr3_iter(secret[0], b'%', b'+', name)
                    .any(|at| encoded_match_folded(name, at, secret).is_some())
            } else {
                memmem::find(name, secret).is_some()
            }
        })
    }

    fn scrub(&self, value: &[u8]) -> Scrubbed {
        let mut current: Cow<[u8]> = Cow::Borrowed(value);
        for _ in 0..MAX_SCRUB_PASSES {
            let mut changed = false;
            if let Some(v) = self.remove_secrets(&current) {
                current = Cow::Owned(v);
                changed = true;
            }
            if self.params {
                if let Some(v) = drop_credential_params(&current) {
                    current = Cow::Owned(v);
                    changed = true;
                }
            }
            if !changed {
                return match current {
                    Cow::Borrowed(_) => Scrubbed::Untouched,
                    Cow::Owned(v) => Scrubbed::Changed(v),
                };
            }
        }
        Scrubbed::Dropped
    }

    /// `value` without any occurrence (overlapping ones included) of a
    /// secret, or `None` when there is none.
    fn remove_secrets(&self, value: &[u8]) -> Option<Vec<u8>> {
        let mut hits: Vec<Range<usize>> = Vec::new();
        // Raw bytes only, unless an escape (or `+` for a space) could hide one.
        let encoded = memchr::memchr2(b'%', b'+', value).is_some();
        for finder in &self.secrets {
            let secret = finder.needle();
            // Every spelling of a secret is at least as long as the secret.
            if value.len() < secret.len() {
                continue;
            }
            if encoded {
                for at in memchr::memchr3_iter(secret[0], b'%', b'+', value) {
                    if let Some(end) = encoded_match(value, at, secret) {
                        hits.push(at..end);
                    }
                }
            } else {
                let mut from = 0;
                while let Some(i) = finder.find(&value[from..]) {
                    hits.push(from + i..from + i + secret.len());
                    from += i + 1;
                }
            }
        }
        if hits.is_empty() {
            return None;
        }
        hits.sort_unstable_by_key(|r| r.start);
        let mut out = Vec::with_capacity(value.len());
        let mut copied = 0;
        for hit in hits {
            if hit.start > copied {
                out.extend_from_slice(&value[copied..hit.start]);
            }
            copied = copied.max(hit.end);
        }
        out.extend_from_slice(&value[copied..]);
        Some(out)
    }
}

/// The end of an occurrence of `secret` at `value[at..]`, each of its bytes
/// either raw or percent-encoded (either case, `%` itself encoded up to
/// [`MAX_ESCAPE_DEPTH`] times), a space also as `+`.
fn encoded_match(value: &[u8], at: usize, secret: &[u8]) -> Option<usize> {
    let mut i = at;
    for &b in secret {
        i = encoded_byte(value, i, b, false)?;
    }
    Some(i)
}

/// [`encoded_match`] for a lowercased `value` and `secret`: an escape
/// matches a byte of the secret in either case (`%41` for `a`).
fn encoded_match_folded(value: &[u8], at: usize, secret: &[u8]) -> Option<usize> {
    let mut i = at;
    for &b in secret {
        i = encoded_byte(value, i, b, true)?;
    }
    Some(i)
}

fn encoded_byte(value: &[u8], i: usize, b: u8, fold: bool) -> Option<usize> {
    let c = *value.get(i)?;
    if c == b || (b == b' ' && c == b'+') {
        return Some(i + 1);
    }
    if c != b'%' {
        return None;
    }
    let mut j = i + 1;
    for _ in 0..=MAX_ESCAPE_DEPTH {
        let h = hex_pair(value, j)?;
        if h == b || (fold && h.to_ascii_lowercase() == b) {
            return Some(j + 2);
        }
        if h != b'%' {
            return None;
        }
        j += 2;
    }
    None
}

fn hex_pair(value: &[u8], at: usize) -> Option<u8> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let hi = digit(*value.get(at)?)?;
    let lo = digit(*value.get(at + 1)?)?;
    Some(hi << 4 | lo)
}

/// Where the query of a URL in a header value ends (`Link: <...>`,
/// `Refresh: 0; url=...`, a quoted URL).
fn ends_query(b: u8) -> bool {
    matches!(b, b'#' | b' ' | b'\t' | b'<' | b'>' | b'"' | b'\'')
}

/// `value` with every credential parameter (plain or disguised) removed
/// from the queries of the URLs in it, or `None` when there is none.
fn drop_credential_params(value: &[u8]) -> Option<Vec<u8>> {
    let mut q = memchr::memchr(b'?', value)?;
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    loop {
        let start = q + 1;
        let end = value[start..]
            .iter()
            .position(|&b| ends_query(b))
            .map_or(value.len(), |i| start + i);
        let query = &value[start..end];
        if param_spans(query).any(|(_, seg)| classify(name_of(&query[seg])) != ParamName::Other) {
            let o = out.get_or_insert_with(|| Vec::with_capacity(value.len()));
            o.extend_from_slice(&value[copied..q]);
            let mut first = true;
            for (sep, seg) in param_spans(query) {
                if classify(name_of(&query[seg.clone()])) != ParamName::Other {
                    continue;
                }
                o.extend_from_slice(if first { b"?" } else { &query[sep] });
                o.extend_from_slice(&query[seg]);
                first = false;
            }
            copied = end;
        }
        match memchr::memchr(b'?', &value[end..]) {
            Some(i) => q = end + i,
            None => break,
        }
    }
    let mut out = out?;
    out.extend_from_slice(&value[copied..]);
    Some(out)
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
    fn occurrences_joined_by_a_removal_are_removed_too() {
        let s = Scrubber::new(&[b"SECRET-VALUE"], &[], false);
        // A hostile echo nests the secret in itself: removing the inner one
        // joins the outer halves.
        let v = b"x=SECRET-SECRET-VALUEVALUE;y";
        assert_eq!(s.scrub(v), Scrubbed::Changed(b"x=;y".to_vec()));
        let deep = b"SESESECRET-VALUECRET-VALUECRET-VALUE!";
        assert!(matches!(s.scrub(deep), Scrubbed::Changed(v) if v == b"!"));
        let mut nest = b"SECRET-VALUE".to_vec();
        for _ in 0..MAX_SCRUB_PASSES {
            nest = [&b"SEC"[..], &nest, b"RET-VALUE"].concat();
        }
        assert_eq!(
            s.scrub(&nest),
            Scrubbed::Dropped,
            "a value that never settles goes"
        );
        // Overlapping occurrences of a periodic secret.
        let p = Scrubber::new(&[b"abcabcab"], &[], false);
        assert_eq!(p.scrub(b"<abcabcabcab>"), Scrubbed::Changed(b"<>".to_vec()));
    }

    #[test]
    fn encoded_forms_are_found_in_any_case_and_depth() {
        let s = Scrubber::new(&[], &[b"a b/c=D"], false);
        for v in [
            "a b/c=D",
            "a+b%2Fc%3DD",
            "a%20b%2fc%3dD",
            "%61%20%62%252F%25253dD",
            "a+b/c=%44",
        ] {
            assert_eq!(
                s.scrub(v.as_bytes()),
                Scrubbed::Untouched,
                "too short to search: {v}"
            );
        }
        let s = Scrubber::new(&[b"tok en/c=D"], &[], false);
        for v in [
            "tok en/c=D",
            "tok+en%2Fc%3DD",
            "tok%20en%2fc%3dD",
            "%74ok%20en%252Fc%25253dD",
            "%2574ok+en/%63=D",
        ] {
            let got = s.scrub(format!("<{v}>").as_bytes());
            assert_eq!(got, Scrubbed::Changed(b"<>".to_vec()), "{v}");
        }
        // Bad escapes, a lone %, and near misses are left alone.
        for v in ["%zz tok en/c=", "tok en/c=E", "100%", "%2"] {
            assert_eq!(s.scrub(v.as_bytes()), Scrubbed::Untouched, "{v}");
        }
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
        let (slot, _) = ProviderKind::Spark.take_slot(&mut h, None).expect("spark");
        assert_eq!(slot.key, Some(KeyHash::of(b"abc")));
        assert!(!slot.bearer && h.is_empty());
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer  xyz "));
        let (slot, _) = ProviderKind::Spark
            .take_slot(&mut h, Some("q=1"))
            .expect("spark");
        assert_eq!(slot.key, Some(KeyHash::of(b"xyz")));
        assert!(slot.bearer);
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcjpwYXNz"),
        );
        let (slot, _) = ProviderKind::Spark.take_slot(&mut h, None).expect("spark");
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
