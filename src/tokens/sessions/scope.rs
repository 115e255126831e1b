//! What a session key may do: its methods, its path patterns, its expiry
//! and its own rate ([`Scope`]), read from its stored row, and the check
//! the hot path makes per request ([`Scope::admit`]). A key without any of
//! them (the first key, and every key added without options) has no
//! `Scope` at all: its check is one branch on `None`.
//!
//! Patterns match the path after the provider's prefix, percent-decoded
//! once (`/v1/%6Cistings` is `/v1/listings`), whole: `*` matches any run
//! of characters, `/` included. A path with a dot segment in any spelling
//! never gets here (`route` refuses it), so `/v1/listings/../contacts`
//! cannot match `/v1/listings/*`.
//!
//! A key's rate is counted in this process (a sliding window per key id,
//! kept apart from the cache so a refill does not reset it, see
//! [`KeyRates`]): with several instances, each counts its own.

use std::borrow::Cow;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use http::Method;

use super::active::ActiveSession;
use crate::pacing::window::SlidingWindow;
use crate::store::{KeyRate, KeyRecord};

/// The longest `--paths` list and pattern accepted.
const MAX_PATTERNS: usize = 64;
const MAX_PATTERN_LEN: usize = 1024;

/// A session as a key presented it: the session, and what that key may do.
/// The session cache holds these by key hash.
#[derive(Debug)]
pub struct Keyed {
    pub session: Arc<ActiveSession>,
    pub grant: Arc<Grant>,
}

impl std::ops::Deref for Keyed {
    type Target = ActiveSession;

    fn deref(&self) -> &ActiveSession {
        &self.session
    }
}

/// A key as the hot path holds it: its id (for the access log, the
/// metrics' outcome and the audit trail; never the key) and its scope,
/// `None` for a key with no limit.
#[derive(Debug)]
pub struct Grant {
    pub key_id: String,
    pub scope: Option<Scope>,
    /// Unix seconds this key was last noted as used (see `Uses::note_key`).
    pub(super) last_used: AtomicI64,
}

impl Grant {
    pub fn new(key_id: String, scope: Option<Scope>) -> Grant {
        Grant {
            key_id,
            scope,
            last_used: AtomicI64::new(0),
        }
    }
}

/// What a limited key may do.
#[derive(Debug)]
pub struct Scope {
    methods: Option<Vec<Method>>,
    paths: Option<Vec<String>>,
    expires_at: Option<i64>,
    rate: Option<Arc<Mutex<SlidingWindow>>>,
}

/// Why a request is refused by its key's scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The key is past its expiry: as if it did not exist.
    Expired,
    /// The method or path is outside the key's scope.
    Forbidden,
    /// The key's own rate is spent: retry after that many seconds.
    Rate { retry_after_secs: u64 },
}

/// A `--methods`, `--paths` or `--rate` that cannot be a scope.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("--methods: `{0}` is not an HTTP method")]
    Method(String),
    #[error("--methods is empty")]
    NoMethods,
    #[error("--paths: each pattern starts with / and is at most {MAX_PATTERN_LEN} bytes, at most {MAX_PATTERNS} of them")]
    Path,
    #[error(
        "--rate takes N/DURATION with N at least 1 and DURATION at least 1ms (e.g. 100/1m, 10/1s)"
    )]
    Rate,
}

impl Scope {
    /// The scope of a stored key, `None` when it has no limit. The rate's
    /// window is `rates`' for this key id, so a refill keeps its count.
    /// A stored scope that cannot be read is an error (the key is not used).
    pub fn of(rec: &KeyRecord, rates: &KeyRates) -> Result<Option<Scope>, ScopeError> {
        if rec.methods.is_none()
            && rec.paths.is_none()
            && rec.expires_at.is_none()
            && rec.rate.is_none()
        {
            return Ok(None);
        }
        let methods = rec.methods.as_deref().map(parse_methods).transpose()?;
        let paths = match &rec.paths {
            Some(text) => {
                let list: Vec<String> = serde_json::from_str(text).map_err(|_| ScopeError::Path)?;
                Some(check_patterns(list)?)
            }
            None => None,
        };
        let rate = rec.rate.map(|r| rates.window(&rec.key_id, r)).transpose()?;
        Ok(Some(Scope {
            methods,
            paths,
            expires_at: rec.expires_at,
            rate,
        }))
    }

    /// Whether the key is past its expiry at `now` (unix seconds).
    pub fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// Whether the key is limited to some methods (then a method override
    /// is refused: it would name another method than the one checked).
    pub fn limits_methods(&self) -> bool {
        self.methods.is_some()
    }

    /// Checks a request against the scope: its expiry at `now` (unix
    /// seconds), its method, its path after the provider's prefix
    /// (`rest`, still percent-encoded), and last its rate, which only a
    /// request inside the scope spends.
    pub fn admit(&self, method: &Method, rest: &str, now: i64) -> Result<(), Refusal> {
        if self.expired(now) {
            return Err(Refusal::Expired);
        }
        if let Some(methods) = &self.methods {
            if !methods.contains(method) {
                return Err(Refusal::Forbidden);
            }
        }
        if let Some(patterns) = &self.paths {
            let path: Cow<[u8]> = percent_encoding::percent_decode(rest.as_bytes()).into();
            if !patterns.iter().any(|p| matches(p.as_bytes(), &path)) {
                return Err(Refusal::Forbidden);
            }
        }
        if let Some(rate) = &self.rate {
            let now = tokio::time::Instant::now();
            let mut window = rate.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(next) = window.try_take(now) {
                let wait = next.saturating_duration_since(now);
                return Err(Refusal::Rate {
                    retry_after_secs: (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1),
                });
            }
        }
        Ok(())
    }
}

/// Whether `path` matches `pattern` whole, `*` matching any run of bytes.
fn matches(pattern: &[u8], path: &[u8]) -> bool {
    let (mut p, mut s) = (0, 0);
    // The last `*` seen and the path position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while s < path.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, s));
                p += 1;
            }
            Some(&c) if c == path[s] => {
                p += 1;
                s += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    p = sp + 1;
                    s = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// `GET,head` as methods (upper-cased), or why not.
fn parse_methods(text: &str) -> Result<Vec<Method>, ScopeError> {
    let mut out = Vec::new();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let upper = name.to_ascii_uppercase();
        let m = Method::from_bytes(upper.as_bytes())
            .map_err(|_| ScopeError::Method(name.to_owned()))?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    if out.is_empty() {
        return Err(ScopeError::NoMethods);
    }
    Ok(out)
}

fn check_patterns(list: Vec<String>) -> Result<Vec<String>, ScopeError> {
    if list.is_empty()
        || list.len() > MAX_PATTERNS
        || list
            .iter()
            .any(|p| !p.starts_with('/') || p.len() > MAX_PATTERN_LEN)
    {
        return Err(ScopeError::Path);
    }
    Ok(list)
}

/// A key's scope as the control plane asks for it (`session key add`, the
/// admin API), in its stored form.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeAsked {
    /// Methods separated by commas, upper-case (`GET,HEAD`).
    pub methods: Option<String>,
    /// A JSON array of patterns.
    pub paths: Option<String>,
    pub rate: Option<KeyRate>,
    /// Seconds from now.
    pub expires_in: Option<u64>,
}

impl ScopeAsked {
    /// Reads the options of `session key add` (methods and patterns
    /// separated by commas, a rate as `N/DURATION`), checking each.
    pub fn parse(
        methods: Option<&str>,
        paths: Option<&str>,
        rate: Option<&str>,
        expires_in: Option<u64>,
    ) -> Result<ScopeAsked, ScopeError> {
        let paths = paths.map(|p| {
            p.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        });
        ScopeAsked::from_parts(methods, paths, rate, expires_in)
    }

    /// [`ScopeAsked::parse`] with the patterns as a list (the admin API's JSON).
    pub fn from_parts(
        methods: Option<&str>,
        paths: Option<Vec<String>>,
        rate: Option<&str>,
        expires_in: Option<u64>,
    ) -> Result<ScopeAsked, ScopeError> {
        let methods = methods
            .map(parse_methods)
            .transpose()?
            .map(|ms| ms.iter().map(Method::as_str).collect::<Vec<_>>().join(","));
        let paths = paths
            .map(check_patterns)
            .transpose()?
            .map(|list| serde_json::Value::from(list).to_string());
        let rate = rate.map(parse_rate).transpose()?;
        Ok(ScopeAsked {
            methods,
            paths,
            rate,
            expires_in,
        })
    }
}

/// `N/DURATION` (`100/1m`, `10/1s`; humantime durations) as a rate.
pub fn parse_rate(text: &str) -> Result<KeyRate, ScopeError> {
    let (n, per) = text.split_once('/').ok_or(ScopeError::Rate)?;
    let requests: u32 = n.trim().parse().map_err(|_| ScopeError::Rate)?;
    let per = humantime::parse_duration(per.trim()).map_err(|_| ScopeError::Rate)?;
    let per_ms = i64::try_from(per.as_millis()).map_err(|_| ScopeError::Rate)?;
    if requests == 0 || per_ms == 0 {
        return Err(ScopeError::Rate);
    }
    Ok(KeyRate {
        requests: i64::from(requests),
        per_ms,
    })
}

/// A rate as `session key list` shows it: `100/60s`.
pub fn show_rate(rate: &KeyRate) -> String {
    let per = Duration::from_millis(u64::try_from(rate.per_ms).unwrap_or(0));
    format!("{}/{}", rate.requests, humantime::format_duration(per))
}

/// The sliding windows of limited keys, by key id: kept apart from the
/// cache so a refill (after any change to the session) keeps the count.
#[derive(Default)]
pub struct KeyRates {
    windows: DashMap<String, (KeyRate, Arc<Mutex<SlidingWindow>>)>,
}

impl KeyRates {
    /// Key `key_id`'s window for `rate` (a new one if the rate changed).
    fn window(&self, key_id: &str, rate: KeyRate) -> Result<Arc<Mutex<SlidingWindow>>, ScopeError> {
        if let Some(w) = self.windows.get(key_id) {
            if w.0 == rate {
                return Ok(Arc::clone(&w.1));
            }
        }
        let requests = u32::try_from(rate.requests).map_err(|_| ScopeError::Rate)?;
        let per = Duration::from_millis(u64::try_from(rate.per_ms).map_err(|_| ScopeError::Rate)?);
        let window = Arc::new(Mutex::new(SlidingWindow::new(requests, per)));
        self.windows
            .insert(key_id.to_owned(), (rate, Arc::clone(&window)));
        Ok(window)
    }

    /// Forgets a revoked key's window.
    pub fn forget(&self, key_id: &str) {
        self.windows.remove(key_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::session::KeyHash;

    fn rec(methods: Option<&str>, paths: Option<&str>) -> KeyRecord {
        KeyRecord {
            key_id: "k_1".into(),
            session_id: "s_1".into(),
            key_hash: KeyHash::of(b"unit-scope-key"),
            label: None,
            methods: methods.map(str::to_owned),
            paths: paths.map(str::to_owned),
            rate: None,
            expires_at: None,
            created_at: 0,
            last_used_at: None,
        }
    }

    #[test]
    fn patterns_match_the_whole_path_with_stars_for_any_run() {
        assert!(matches(b"/v1/listings", b"/v1/listings"));
        assert!(!matches(b"/v1/listings", b"/v1/listings/1"));
        assert!(matches(b"/v1/listings*", b"/v1/listings/1/photos"));
        assert!(matches(b"/v1/*/photos", b"/v1/listings/1/photos"));
        assert!(!matches(b"/v1/*/photos", b"/v1/listings/1/photos/2"));
        assert!(matches(b"*", b"/anything"));
        assert!(!matches(b"/v1/listings/*", b"/v1/contacts"));
    }

    #[test]
    fn a_scope_refuses_other_methods_and_paths_decoded_once() {
        let rates = KeyRates::default();
        let scope = Scope::of(&rec(Some("GET,HEAD"), Some(r#"["/v1/listings*"]"#)), &rates)
            .expect("scope")
            .expect("limited");
        assert_eq!(scope.admit(&Method::GET, "/v1/listings/1", 0), Ok(()));
        assert_eq!(scope.admit(&Method::GET, "/v1/%6Cistings", 0), Ok(()));
        assert_eq!(
            scope.admit(&Method::POST, "/v1/listings", 0),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            scope.admit(&Method::GET, "/v1/contacts", 0),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            scope.admit(&Method::GET, "/v1/%63ontacts", 0),
            Err(Refusal::Forbidden)
        );
        assert!(Scope::of(&rec(None, None), &rates)
            .expect("scope")
            .is_none());
    }

    #[test]
    fn options_are_checked_and_stored_in_one_form() {
        let asked = ScopeAsked::parse(
            Some("get, Head"),
            Some("/v1/a*,/v1/b"),
            Some("10/1s"),
            Some(60),
        )
        .expect("valid");
        assert_eq!(asked.methods.as_deref(), Some("GET,HEAD"));
        assert_eq!(asked.paths.as_deref(), Some(r#"["/v1/a*","/v1/b"]"#));
        assert_eq!(
            asked.rate,
            Some(KeyRate {
                requests: 10,
                per_ms: 1000
            })
        );
        assert!(ScopeAsked::parse(None, Some("v1/no-slash"), None, None).is_err());
        assert!(ScopeAsked::parse(None, None, Some("0/1s"), None).is_err());
        assert!(ScopeAsked::parse(None, None, Some("10"), None).is_err());
        assert!(ScopeAsked::parse(Some("G ET"), None, None, None).is_err());
        assert_eq!(
            show_rate(&KeyRate {
                requests: 10,
                per_ms: 60_000
            }),
            "10/1m"
        );
    }
}
