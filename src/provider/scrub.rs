//! Finding a session's injected secrets again in the upstream's answers,
//! raw or percent-encoded, in any header's name or value.

use std::borrow::Cow;
use std::ops::Range;

use memchr::memmem;

use super::query::{drop_credential_params, QueryNames};

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
pub(super) struct Scrubber {
    secrets: Vec<memmem::Finder<'static>>,
    /// The same secrets lowercased, to find them in header names (which
    /// hyper lowercases).
    lower: Vec<Vec<u8>>,
    /// Injected query parameters, removed from URL-like values too.
    params: Option<QueryNames>,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Scrubbed {
    Untouched,
    Changed(Vec<u8>),
    Dropped,
}

impl Scrubber {
    /// `always` are searched for whatever their length (the empty value
    /// aside), `long` only from [`MIN_SCRUBBED_SECRET`] bytes.
    pub(super) fn new(always: &[&[u8]], long: &[&[u8]], params: Option<QueryNames>) -> Scrubber {
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
    pub(super) fn in_name(&self, name: &str) -> bool {
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

    pub(super) fn scrub(&self, value: &[u8]) -> Scrubbed {
        let mut current: Cow<[u8]> = Cow::Borrowed(value);
        for _ in 0..MAX_SCRUB_PASSES {
            let mut changed = false;
            if let Some(v) = self.remove_secrets(&current) {
                current = Cow::Owned(v);
                changed = true;
            }
            if let Some(names) = &self.params {
                if let Some(v) = drop_credential_params(&current, names) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occurrences_joined_by_a_removal_are_removed_too() {
        let s = Scrubber::new(&[b"SECRET-VALUE"], &[], None);
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
        let p = Scrubber::new(&[b"abcabcab"], &[], None);
        assert_eq!(p.scrub(b"<abcabcabcab>"), Scrubbed::Changed(b"<>".to_vec()));
    }

    #[test]
    fn encoded_forms_are_found_in_any_case_and_depth() {
        let s = Scrubber::new(&[], &[b"a b/c=D"], None);
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
        let s = Scrubber::new(&[b"tok en/c=D"], &[], None);
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
}
