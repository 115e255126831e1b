//! Spark's original API-key authentication, as Spark's documents and its Ruby
//! client (`SparkApi::Authentication::ApiAuth`) do it.
//!
//! A client opens a session with `POST /v1/session?ApiKey=K&ApiSig=S`,
//! `S = md5_hex(secret + "ApiKey" + K)` ([`session_sig`]), and gets an
//! `AuthToken` that expires at `Expires`. Spark allows one session per key:
//! opening a second ends the first. Every API request then carries
//! `AuthToken` (and `ApiUser` when the key has one) in its query and is
//! signed over its path, its parameters and its body ([`request_sig`]).
//!
//! The session endpoint answers 401 code 1000 for an unknown key or a bad
//! signature, 1010 for a disabled key; an API request 1000 for a bad
//! signature (or a missing, repeated or wrong `ApiUser`), 1020 for an ended,
//! expired or unknown `AuthToken`, 1010 for a disabled key. The session
//! endpoint follows [`TokenMode`] as the token endpoint does.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use md5::{Digest, Md5};
use serde_json::json;
use tokio::time::Instant;

use crate::{hex, json, random_token, ApiFault, Shared, TokenMode};

/// The path of Spark's session endpoint.
pub(crate) const SESSION_PATH: &str = "/v1/session";

/// The offset written in `Expires`, as Spark writes its times (US Central,
/// daylight time), so that a client must read the offset.
const EXPIRES_OFFSET_MINUTES: i64 = -5 * 60;

/// An API key the Spark stand-in accepts for API-key authentication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub key: String,
    pub secret: String,
    /// When set, every API request of this key must carry `ApiUser` with
    /// exactly this value; when not, a request carrying `ApiUser` is refused.
    pub user: Option<String>,
}

impl ApiKey {
    pub fn new(key: &str, secret: &str) -> ApiKey {
        ApiKey {
            key: key.to_owned(),
            secret: secret.to_owned(),
            user: None,
        }
    }

    pub fn with_user(mut self, user: &str) -> ApiKey {
        self.user = Some(user.to_owned());
        self
    }

    /// The key the demo and `credproxy-standins` register.
    pub fn demo() -> ApiKey {
        ApiKey::new("spark-demo-api-key", "spark-demo-api-secret-XYZ")
    }
}

/// An open session, as the session endpoint answered it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiSession {
    pub auth_token: String,
    /// RFC 3339, with Spark's offset (`-05:00`).
    pub expires: String,
}

/// `md5_hex(secret + "ApiKey" + key)`: the signature of `POST /v1/session`.
pub fn session_sig(secret: &str, key: &str) -> String {
    let mut md5 = Md5::new();
    md5.update(secret.as_bytes());
    md5.update(b"ApiKey");
    md5.update(key.as_bytes());
    hex(&md5.finalize())
}

/// `md5_hex(secret + "ApiKey" + key + "ServicePath" + path + PARAMS + body)`,
/// where PARAMS is every parameter of `query` except `ApiSig`, form-decoded
/// (`+` is a space), sorted by name (a repeated name keeps its order) and
/// written as name followed by value.
pub fn request_sig(secret: &str, key: &str, path: &str, query: &str, body: &[u8]) -> String {
    let mut params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .filter(|(name, _)| name != "ApiSig")
        .collect();
    // A stable sort: repeated names keep the order they were sent in.
    params.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut md5 = Md5::new();
    md5.update(secret.as_bytes());
    md5.update(b"ApiKey");
    md5.update(key.as_bytes());
    md5.update(b"ServicePath");
    md5.update(path.as_bytes());
    for (name, value) in &params {
        md5.update(name.as_bytes());
        md5.update(value.as_bytes());
    }
    md5.update(body);
    hex(&md5.finalize())
}

struct Session {
    key: String,
    expires_at: Instant,
    ended: bool,
}

/// The keys, their sessions and what happened to them.
pub(crate) struct State {
    keys: HashMap<String, ApiKey>,
    disabled: HashSet<String>,
    /// By `AuthToken`, ended ones included.
    sessions: HashMap<String, Session>,
    /// Each key's live `AuthToken`.
    live: HashMap<String, String>,
    /// Sessions opened through the endpoint, by key.
    opened: HashMap<String, u64>,
    lifetime: Duration,
}

impl State {
    pub(crate) fn new(keys: &[ApiKey], lifetime: Duration) -> State {
        State {
            keys: keys.iter().map(|k| (k.key.clone(), k.clone())).collect(),
            disabled: HashSet::new(),
            sessions: HashMap::new(),
            live: HashMap::new(),
            opened: HashMap::new(),
            lifetime,
        }
    }

    /// A new session for `key`; the key's live one, if any, ends.
    pub(crate) fn open(&mut self, key: &str) -> ApiSession {
        self.end(key);
        let auth_token = random_token("spark-authtoken-");
        let expires = rfc3339(SystemTime::now() + self.lifetime);
        self.sessions.insert(
            auth_token.clone(),
            Session {
                key: key.to_owned(),
                expires_at: Instant::now() + self.lifetime,
                ended: false,
            },
        );
        self.live.insert(key.to_owned(), auth_token.clone());
        ApiSession {
            auth_token,
            expires,
        }
    }

    /// Ends `key`'s live session, if any.
    pub(crate) fn end(&mut self, key: &str) {
        if let Some(token) = self.live.remove(key) {
            if let Some(s) = self.sessions.get_mut(&token) {
                s.ended = true;
            }
        }
    }

    pub(crate) fn end_all(&mut self) {
        let keys: Vec<String> = self.live.keys().cloned().collect();
        for key in keys {
            self.end(&key);
        }
    }

    pub(crate) fn set_lifetime(&mut self, lifetime: Duration) {
        self.lifetime = lifetime;
    }

    pub(crate) fn set_disabled(&mut self, key: &str, disabled: bool) {
        if disabled {
            self.disabled.insert(key.to_owned());
        } else {
            self.disabled.remove(key);
        }
    }

    pub(crate) fn opened(&self, key: &str) -> u64 {
        self.opened.get(key).copied().unwrap_or(0)
    }

    pub(crate) fn opened_total(&self) -> u64 {
        self.opened.values().sum()
    }

    /// The live `AuthToken` of `key`, if it has one that has not expired.
    pub(crate) fn live_token(&self, key: &str) -> Option<String> {
        let token = self.live.get(key)?;
        let s = self.sessions.get(token)?;
        (!s.ended && Instant::now() < s.expires_at).then(|| token.clone())
    }

    pub(crate) fn all_tokens(&self) -> Vec<String> {
        self.sessions.keys().cloned().collect()
    }
}

/// `true` when an API request uses API-key authentication rather than
/// OAuth: its query carries `AuthToken` or `ApiSig`.
pub(crate) fn is_signed(parts: &Parts) -> bool {
    let query = parts.uri.query().unwrap_or("");
    form_urlencoded::parse(query.as_bytes()).any(|(n, _)| n == "AuthToken" || n == "ApiSig")
}

/// Spark's error envelope (never escaped: the session endpoint is not the API's JSON).
fn spark_error(status: StatusCode, code: u32, message: &str) -> Response<Body> {
    json(
        status,
        json!({"D": {"Success": false, "Code": code, "Message": message}}),
    )
}

/// Exactly one value of `name` in the query, else `None`.
fn single(query: &str, name: &str) -> Option<String> {
    let mut values = form_urlencoded::parse(query.as_bytes())
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.into_owned());
    match (values.next(), values.next()) {
        (Some(value), None) => Some(value),
        _ => None,
    }
}

/// `POST /v1/session`.
pub(crate) async fn session(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        let mut resp = spark_error(StatusCode::METHOD_NOT_ALLOWED, 1000, "use POST");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    shared.session_calls.send_modify(|n| *n += 1);
    let (parts, body) = req.into_parts();
    // The Ruby client sends an empty body; read whatever comes, up to a limit.
    if Limited::new(body, 64 * 1024).collect().await.is_err() {
        return spark_error(
            StatusCode::BAD_REQUEST,
            1000,
            "unreadable or oversized body",
        );
    }
    let mut mode = shared.mode.subscribe();
    let mode = match mode.wait_for(|m| *m != TokenMode::Hang).await {
        Ok(m) => *m,
        Err(_) => TokenMode::Fail500,
    };
    match mode {
        TokenMode::Normal => {}
        TokenMode::Hang | TokenMode::Fail500 => {
            return spark_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                500,
                "the stand-in was told to fail",
            )
        }
        TokenMode::InvalidGrant => {
            return spark_error(
                StatusCode::UNAUTHORIZED,
                1000,
                "the stand-in was told to refuse every key",
            )
        }
    }

    let query = parts.uri.query().unwrap_or("");
    let (Some(key), Some(sig)) = (single(query, "ApiKey"), single(query, "ApiSig")) else {
        return spark_error(
            StatusCode::UNAUTHORIZED,
            1000,
            "ApiKey and ApiSig are required, once each",
        );
    };
    let fault = *crate::lock(&shared.fault);
    let mut state = shared.api_keys();
    let Some(api_key) = state.keys.get(&key).cloned() else {
        return spark_error(StatusCode::UNAUTHORIZED, 1000, "Invalid API key");
    };
    if sig != session_sig(&api_key.secret, &api_key.key) {
        return spark_error(
            StatusCode::UNAUTHORIZED,
            1000,
            "Invalid API key and/or request signed improperly",
        );
    }
    if state.disabled.contains(&key) || fault == Some(ApiFault::DisabledKey) {
        return spark_error(StatusCode::UNAUTHORIZED, 1010, "API key is disabled");
    }
    *state.opened.entry(key.clone()).or_insert(0) += 1;
    let session = state.open(&key);
    json(
        StatusCode::OK,
        json!({"D": {"Success": true, "Results": [{
            "AuthToken": session.auth_token,
            "Expires": session.expires,
            "Roles": ["idx"],
        }]}}),
    )
}

/// `None` when a signed API request is acceptable: a live `AuthToken`
/// exactly once, the key's `ApiUser` exactly once when it has one (none
/// when not), and the right `ApiSig`.
pub(crate) fn check(shared: &Shared, parts: &Parts, body: Option<&[u8]>) -> Option<Response<Body>> {
    let query = parts.uri.query().unwrap_or("");
    let bad_sig = || {
        Some(spark_error(
            StatusCode::UNAUTHORIZED,
            1000,
            "Invalid API key and/or request signed improperly",
        ))
    };
    let (Some(token), Some(sig)) = (single(query, "AuthToken"), single(query, "ApiSig")) else {
        return bad_sig();
    };
    let state = shared.api_keys();
    let Some(session) = state.sessions.get(&token) else {
        return Some(spark_error(
            StatusCode::UNAUTHORIZED,
            1020,
            "Session token has expired",
        ));
    };
    let Some(api_key) = state.keys.get(&session.key) else {
        return bad_sig();
    };
    // A body too large to keep cannot be checked: refused as signed improperly.
    let Some(body) = body else {
        return bad_sig();
    };
    let expected = request_sig(&api_key.secret, &api_key.key, parts.uri.path(), query, body);
    if sig != expected {
        return bad_sig();
    }
    let users: Vec<String> = form_urlencoded::parse(query.as_bytes())
        .filter(|(n, _)| n == "ApiUser")
        .map(|(_, v)| v.into_owned())
        .collect();
    let user_ok = match &api_key.user {
        Some(user) => users.len() == 1 && users[0] == *user,
        None => users.is_empty(),
    };
    if !user_ok {
        return Some(spark_error(
            StatusCode::UNAUTHORIZED,
            1000,
            "ApiUser is missing, repeated or not this key's",
        ));
    }
    if state.disabled.contains(&api_key.key) {
        return Some(spark_error(
            StatusCode::UNAUTHORIZED,
            1010,
            "API key is disabled",
        ));
    }
    if session.ended || Instant::now() >= session.expires_at {
        return Some(spark_error(
            StatusCode::UNAUTHORIZED,
            1020,
            "Session token has expired",
        ));
    }
    None
}

/// `at` as RFC 3339 with Spark's offset, to the second: `2024-05-01T07:00:00-05:00`.
fn rfc3339(at: SystemTime) -> String {
    let utc = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let local = utc + EXPIRES_OFFSET_MINUTES * 60;
    let (days, secs) = (local.div_euclid(86400), local.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    let offset = EXPIRES_OFFSET_MINUTES.abs();
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{}{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        if EXPIRES_OFFSET_MINUTES < 0 { '-' } else { '+' },
        offset / 60,
        offset % 60,
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_writes_spark_offset() {
        // 2021-03-04T05:06:07Z
        let at = UNIX_EPOCH + Duration::from_secs(1_614_834_367);
        assert_eq!(rfc3339(at), "2021-03-04T00:06:07-05:00");
        // Across a day and a leap day: 2024-03-01T03:00:00Z
        let at = UNIX_EPOCH + Duration::from_secs(1_709_262_000);
        assert_eq!(rfc3339(at), "2024-02-29T22:00:00-05:00");
    }
}
