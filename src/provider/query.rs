//! The query parameters a provider injects (Zillow's `accessToken`,
//! `clientId`, `apiKey`; an `oauth2` table's `inject.query`): ours to
//! remove from the caller's query, from the upstream's answers and from
//! rewritten links, in every spelling a server may read as one of them.

use std::borrow::Cow;
use std::ops::Range;

use percent_encoding::{percent_decode, percent_decode_str};

use crate::config::fold_name;
use crate::secrets::session::KeyHash;

use super::DisguisedCredential;

/// The names of a provider's injected query parameters, folded as servers
/// compare them (ASCII case, `.` as `_`), and which one holds the access
/// token (where a legacy caller may put its session key).
#[derive(Debug, Clone, Default)]
pub struct QueryNames {
    names: Vec<(Vec<u8>, bool)>,
}

impl QueryNames {
    /// `names`: each injected parameter's name, and whether its template is
    /// the access token alone.
    pub fn new<'a>(names: impl IntoIterator<Item = (&'a str, bool)>) -> QueryNames {
        QueryNames {
            names: names
                .into_iter()
                .map(|(n, key)| (fold_name(n).into_bytes(), key))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// `Some(holds the access token)` when `name` (decoded) is one of ours.
    fn owned(&self, name: &[u8]) -> Option<bool> {
        if self.names.is_empty() {
            return None;
        }
        let folded: Vec<u8> = name
            .iter()
            .map(|&b| match b {
                b'.' | b' ' => b'_',
                b => b.to_ascii_lowercase(),
            })
            .collect();
        self.names
            .iter()
            .find(|(n, _)| *n == folded)
            .map(|&(_, key)| key)
    }

    /// Whether a query parameter named `name` (as it appears, percent-encoded
    /// or not) is one of these, plainly or in disguise: the one rule for the
    /// request's query, response headers and rewritten links.
    pub fn is_credential_name(&self, name: &[u8]) -> bool {
        self.classify(name) != ParamName::Other
    }

    fn classify(&self, name: &[u8]) -> ParamName {
        let once: Cow<[u8]> = percent_decode(name).into();
        if let Some(access_token) = self.owned(&once) {
            return ParamName::Owned { access_token };
        }
        // Every spelling a lenient parser might reduce to a credential name:
        // decoded until stable, cut where a parser might end the name, trimmed.
        let mut decoded = once;
        for _ in 0..super::MAX_DECODE_ROUNDS {
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
        if self.owned(&core[start..end]).is_some() {
            ParamName::Disguised
        } else {
            ParamName::Other
        }
    }
}

/// How a query parameter's name relates to the provider's credential names.
#[derive(Debug, PartialEq, Eq)]
enum ParamName {
    /// Not a credential.
    Other,
    /// One of ours in any case, percent-decoded once: to remove (and, when it
    /// holds the access token, a session key).
    Owned { access_token: bool },
    /// A credential name in disguise: trailing `+`, spaces, control
    /// characters or `[]`, an encoded `=` (`accessToken%3DKEY`), a NUL, or
    /// encoded more than once.
    Disguised,
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

/// A parameter's name: its bytes before the first `=`.
fn name_of(segment: &[u8]) -> &[u8] {
    memchr::memchr(b'=', segment).map_or(segment, |i| &segment[..i])
}

/// Splits a query into the caller's own parameters (bytes untouched) and
/// the session key the caller sent in the access token's parameter, if any.
///
/// Names are compared after percent-decoding, so `access%54oken` cannot slip
/// a caller's credential past us; values and other parameters are never
/// re-encoded, so odd or invalid escapes pass through as they came. `&` and
/// `;` both separate parameters; a credential name in disguise is refused.
pub fn split_query<'q>(
    query: Option<&'q str>,
    names: &QueryNames,
) -> Result<(Option<Cow<'q, str>>, Option<KeyHash>), DisguisedCredential> {
    let Some(q) = query else {
        return Ok((None, None));
    };
    let bytes = q.as_bytes();
    let mut owned_any = false;
    for (_, seg) in param_spans(bytes) {
        // Case-insensitively too: whatever the upstream's parser makes of
        // `AccessToken`, the caller must not get a credential past us with it.
        match names.classify(name_of(&bytes[seg])) {
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
        if let ParamName::Owned { access_token } = names.classify(name_of(segment.as_bytes())) {
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

/// Where the query of a URL in a header value ends (`Link: <...>`,
/// `Refresh: 0; url=...`, a quoted URL).
fn ends_query(b: u8) -> bool {
    matches!(b, b'#' | b' ' | b'\t' | b'<' | b'>' | b'"' | b'\'')
}

/// `value` with every credential parameter (plain or disguised) removed
/// from the queries of the URLs in it, or `None` when there is none.
pub(super) fn drop_credential_params(value: &[u8], names: &QueryNames) -> Option<Vec<u8>> {
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
        if param_spans(query)
            .any(|(_, seg)| names.classify(name_of(&query[seg])) != ParamName::Other)
        {
            let o = out.get_or_insert_with(|| Vec::with_capacity(value.len()));
            o.extend_from_slice(&value[copied..q]);
            let mut first = true;
            for (sep, seg) in param_spans(query) {
                if names.classify(name_of(&query[seg.clone()])) != ParamName::Other {
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
