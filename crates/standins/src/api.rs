//! The API side of every provider: every path that is not the token endpoint
//! or the authorisation page.
//!
//! Each request's body is hashed as it streams in (never held whole), the
//! request is recorded (rejected ones too), then its credentials are checked
//! the way the provider does (Spark: `Authorization: OAuth|Bearer TOKEN`,
//! or, when its query carries `AuthToken` or `ApiSig`, API-key
//! authentication's signature over its path, query and body: see `apikey.rs`;
//! Zillow: `accessToken`, `clientId` and `apiKey` query parameters; acme:
//! its [`crate::OAuth2`] credential slot and required values) and it is
//! answered by one of the special paths, the RESO Web API (Spark) or a JSON
//! echo. Before the credentials, in this order, an [`crate::ApiFault`] in
//! force, the [`crate::Budget`] in force and (Spark, with
//! `require_user_agent`) a missing `X-SparkApi-User-Agent` refuse the
//! request. JSON and XML answers are compressed when the client asks.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION,
    RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::budget::Verdict;
use crate::{
    apikey, big_json, encoding, hex, reso, AccessCheck, ApiFault, Kind, Listener, Recorded,
    Refusal, Shared, Slot,
};

/// Where `/redirect-away` points.
const AWAY: &str = "https://elsewhere.example/x";

/// `/download` sends its bytes in chunks of this size.
const CHUNK: usize = 64 * 1024;

pub(crate) async fn handle(
    shared: Arc<Shared>,
    ctx: &Listener,
    req: Request<Incoming>,
) -> Response<Body> {
    let kind = shared.opts.kind;
    let (parts, body) = req.into_parts();
    let coding = encoding::negotiate(&parts.headers);
    let head = parts.method == Method::HEAD;
    // A signed request's body is part of its signature: kept, up to a limit.
    let signed = kind == Kind::Spark && apikey::is_signed(&parts);
    let (body_len, body_sha256, complete, kept) = hash_body(body, signed).await;
    let rec = Recorded {
        host: ctx.host,
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body_len,
        body_sha256,
    };
    shared.record(rec.clone());

    let resp = if !complete {
        json_response(
            &shared,
            StatusCode::BAD_REQUEST,
            json!({"error": "the request body could not be read"}),
        )
    } else {
        let denied = fault(&shared)
            .or_else(|| over_budget(&shared))
            .or_else(|| match kind {
                Kind::Spark => check_spark(&shared, &parts, signed, kept.as_deref()),
                Kind::Zillow => check_zillow(&shared, &parts),
                Kind::OAuth2 => check_oauth2(&shared, &parts),
            });
        match denied {
            Some(resp) => resp,
            None => serve(&shared, ctx, &rec, &parts).await,
        }
    };
    let mut resp = encoding::compress(resp, coding, head);
    resp.headers_mut()
        .insert("x-standin", HeaderValue::from_static(kind.name()));
    resp
}

/// The most of a signed request's body kept to check its signature.
const MAX_SIGNED_BODY: usize = 16 * 1024 * 1024;

/// Reads the body to its end, hashing as it goes (`false` when it broke
/// off), and with `keep` keeps it too (`None` past [`MAX_SIGNED_BODY`]).
async fn hash_body(mut body: Incoming, keep: bool) -> (u64, String, bool, Option<Vec<u8>>) {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut kept = keep.then(Vec::new);
    let complete = loop {
        match body.frame().await {
            None => break true,
            Some(Err(_)) => break false,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    len += data.len() as u64;
                    hasher.update(&data);
                    if let Some(buf) = &mut kept {
                        if buf.len() + data.len() <= MAX_SIGNED_BODY {
                            buf.extend_from_slice(&data);
                        } else {
                            kept = None;
                        }
                    }
                }
            }
        }
    };
    (len, hex(&hasher.finalize()), complete, kept)
}

/// A JSON answer of the API (`/` escaped if the options say so).
fn json_response(shared: &Shared, status: StatusCode, value: serde_json::Value) -> Response<Body> {
    encoding::json_as(
        status,
        &value,
        shared.opts.json_escape_slashes,
        "application/json",
    )
}

/// Spark's error envelope.
fn spark_error(shared: &Shared, status: StatusCode, code: u32, message: &str) -> Response<Body> {
    json_response(
        shared,
        status,
        json!({"D": {"Success": false, "Code": code, "Message": message}}),
    )
}

/// acme's error envelope (credproxy's own shape): `{"error": {"code", "message"}}`.
fn oauth2_error(shared: &Shared, status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        shared,
        status,
        json!({"error": {"code": code, "message": message}}),
    )
}

/// The answer of the [`ApiFault`] in force, if any.
fn fault(shared: &Shared) -> Option<Response<Body>> {
    let kind = shared.opts.kind;
    match shared.take_fault()? {
        ApiFault::DisabledKey => Some(match kind {
            Kind::Spark => spark_error(
                shared,
                StatusCode::UNAUTHORIZED,
                1010,
                "API key is disabled",
            ),
            Kind::Zillow => json_response(
                shared,
                StatusCode::UNAUTHORIZED,
                json!({"error": "disabled_api_key", "error_description": "the API key is disabled"}),
            ),
            Kind::OAuth2 => oauth2_error(
                shared,
                StatusCode::UNAUTHORIZED,
                "disabled_key",
                "the client is disabled",
            ),
        }),
        ApiFault::RateLimited {
            status,
            retry_after,
            ..
        } => {
            let status = match status {
                503 => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::TOO_MANY_REQUESTS,
            };
            Some(rate_limited(shared, status, retry_after))
        }
    }
}

/// The answer of a request beyond the [`crate::Budget`] in force, if it is.
fn over_budget(shared: &Shared) -> Option<Response<Body>> {
    match shared.take_budget()? {
        Verdict::Accepted => None,
        Verdict::Refused {
            refusal,
            retry_after,
        } => {
            let status = match (shared.opts.kind, refusal) {
                (Kind::Spark, Refusal::Spark1550) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::TOO_MANY_REQUESTS,
            };
            Some(rate_limited(shared, status, retry_after))
        }
    }
}

/// Over the rate limit: Spark's code 1550, or Zillow's `rate_limited`, with
/// `Retry-After: seconds` if given.
fn rate_limited(shared: &Shared, status: StatusCode, retry_after: Option<u64>) -> Response<Body> {
    let mut resp = match shared.opts.kind {
        Kind::Spark => spark_error(shared, status, 1550, "Over rate limit"),
        Kind::Zillow => json_response(
            shared,
            status,
            json!({"error": "rate_limited", "error_description": "too many requests"}),
        ),
        Kind::OAuth2 => oauth2_error(shared, status, "rate_limited", "too many requests"),
    };
    if let Some(seconds) = retry_after {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    resp
}

/// `None` when the request carries a valid Spark access token, or (`signed`,
/// API-key authentication) a live `AuthToken` and a right signature over
/// `body`; and, if required, an `X-SparkApi-User-Agent`.
fn check_spark(
    shared: &Shared,
    parts: &Parts,
    signed: bool,
    body: Option<&[u8]>,
) -> Option<Response<Body>> {
    if shared.opts.require_user_agent {
        let has_agent = parts
            .headers
            .get_all("x-sparkapi-user-agent")
            .iter()
            .any(|v| !v.as_bytes().trim_ascii().is_empty());
        if !has_agent {
            return Some(spark_error(
                shared,
                StatusCode::BAD_REQUEST,
                1016,
                "X-SparkApi-User-Agent header must be provided",
            ));
        }
    }
    if signed {
        return apikey::check(shared, parts, body);
    }
    let mut values = parts.headers.get_all(AUTHORIZATION).iter();
    let token = match (values.next(), values.next()) {
        (Some(value), None) => value.to_str().ok().and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            (scheme.eq_ignore_ascii_case("oauth") || scheme.eq_ignore_ascii_case("bearer"))
                .then(|| token.trim().to_owned())
        }),
        _ => None,
    };
    let check = match token {
        Some(token) => shared.tokens().present_access(&token),
        None => AccessCheck::Unknown,
    };
    let (code, message) = match check {
        AccessCheck::Valid => return None,
        AccessCheck::Expired => (1020, "Session token has expired"),
        AccessCheck::Unknown => (1000, "Invalid API key"),
    };
    Some(spark_error(shared, StatusCode::UNAUTHORIZED, code, message))
}

/// `None` when the query carries a valid `accessToken`, the right `clientId`
/// and the right `apiKey`, each exactly once.
fn check_zillow(shared: &Shared, parts: &Parts) -> Option<Response<Body>> {
    let opts = &shared.opts;
    let mut access_token = Vec::new();
    let mut client_id = Vec::new();
    let mut api_key = Vec::new();
    let query = parts.uri.query().unwrap_or("");
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "accessToken" => access_token.push(value.into_owned()),
            "clientId" => client_id.push(value.into_owned()),
            "apiKey" => api_key.push(value.into_owned()),
            _ => {}
        }
    }
    let deny = |status: StatusCode, error: &str, description: &str| {
        Some(json_response(
            shared,
            status,
            json!({"error": error, "error_description": description}),
        ))
    };
    if access_token.len() > 1 || client_id.len() > 1 || api_key.len() > 1 {
        return deny(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "accessToken, clientId and apiKey may each appear only once",
        );
    }
    if api_key.first() != Some(&opts.api_key) {
        return deny(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing or unknown apiKey",
        );
    }
    if client_id.first() != Some(&opts.client_id) {
        return deny(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "missing or unknown clientId",
        );
    }
    let check = match access_token.first() {
        Some(token) => shared.tokens().present_access(token),
        None => AccessCheck::Unknown,
    };
    match check {
        AccessCheck::Valid => None,
        AccessCheck::Expired => deny(
            StatusCode::UNAUTHORIZED,
            "expired_token",
            "the access token has expired",
        ),
        AccessCheck::Unknown => deny(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "missing or unknown accessToken",
        ),
    }
}

/// What slot `slot` of the request holds: `None` when it is absent or
/// repeated, or (a header) its value does not follow the template.
fn read_slot(parts: &Parts, slot: &Slot) -> Option<String> {
    match slot {
        Slot::Header { name, template } => {
            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
            let mut values = parts.headers.get_all(name).iter();
            let (Some(value), None) = (values.next(), values.next()) else {
                return None;
            };
            let value = value.to_str().ok()?;
            let (prefix, suffix) = template.split_once("{token}")?;
            let token = value.strip_prefix(prefix)?.strip_suffix(suffix)?;
            (!token.is_empty()).then(|| token.to_owned())
        }
        Slot::Query(name) => {
            let query = parts.uri.query().unwrap_or("");
            let mut values = form_urlencoded::parse(query.as_bytes())
                .filter(|(n, _)| n == name.as_str())
                .map(|(_, v)| v.into_owned());
            match (values.next(), values.next()) {
                (Some(value), None) => Some(value),
                _ => None,
            }
        }
    }
}

/// `None` when the request carries a valid acme access token (or the static
/// key) where the options say, and each required value.
fn check_oauth2(shared: &Shared, parts: &Parts) -> Option<Response<Body>> {
    let opts = &shared.opts.oauth2;
    let deny = |code: &str, message: &str| {
        let mut resp = oauth2_error(shared, StatusCode::UNAUTHORIZED, code, message);
        if let Slot::Header { .. } = opts.credential {
            resp.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        Some(resp)
    };
    let required_ok = opts
        .required
        .iter()
        .all(|(slot, value)| read_slot(parts, slot).as_ref() == Some(value));
    if !required_ok {
        return deny(
            "invalid_client",
            "a required client credential is missing or wrong",
        );
    }
    let Some(token) = read_slot(parts, &opts.credential) else {
        return deny(&opts.invalid_code, "missing access token");
    };
    if crate::lock(&shared.static_key).as_ref() == Some(&token) {
        return None;
    }
    match shared.tokens().present_access(&token) {
        AccessCheck::Valid => None,
        AccessCheck::Expired => match &opts.expired_code {
            Some(code) => deny(code, "the access token has expired"),
            None => deny(&opts.invalid_code, "invalid access token"),
        },
        AccessCheck::Unknown => deny(&opts.invalid_code, "invalid access token"),
    }
}

/// Answers an authorised request.
async fn serve(shared: &Shared, ctx: &Listener, rec: &Recorded, parts: &Parts) -> Response<Body> {
    let kind = shared.opts.kind;
    if kind == Kind::Spark {
        if let Some(path) = reso::split(&rec.path) {
            let method_override = parts
                .headers
                .get("x-http-method-override")
                .and_then(|v| v.to_str().ok());
            let origins = reso::Origins::new(shared, rec, &ctx.origin);
            return reso::serve(shared, rec, method_override, &origins, path);
        }
    }
    match rec.path.as_str() {
        "/download" => match query_u64(rec, "bytes") {
            Some(n) => download(n),
            None => bad_param(shared, "bytes"),
        },
        "/big-json" => match query_u64(rec, "bytes") {
            Some(n) => big_json::response(
                n,
                &ctx.origin,
                shared.opts.json_escape_slashes,
                query_u64(rec, "content_length").is_some_and(|v| v != 0),
            ),
            None => bad_param(shared, "bytes"),
        },
        "/redirect" => redirect(shared, ctx, rec),
        "/redirect-away" => found(AWAY),
        "/upload" => json_response(
            shared,
            StatusCode::OK,
            json!({"len": rec.body_len, "sha256": rec.body_sha256}),
        ),
        "/slow" => match query_u64(rec, "ms") {
            Some(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                echo(shared, rec)
            }
            None => bad_param(shared, "ms"),
        },
        path => match path.strip_prefix("/status/") {
            Some(code) => match code.parse::<u16>().ok().filter(|c| (200..=599).contains(c)) {
                Some(code) => {
                    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
                    json_response(shared, status, json!({"status": code}))
                }
                None => json_response(
                    shared,
                    StatusCode::BAD_REQUEST,
                    json!({"error": "the status must be a number from 200 to 599"}),
                ),
            },
            None => echo(shared, rec),
        },
    }
}

/// A 302 to `location` with an empty body.
fn found(location: &str) -> Response<Body> {
    match HeaderValue::from_str(location) {
        Ok(value) => {
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = StatusCode::FOUND;
            resp.headers_mut().insert(LOCATION, value);
            resp
        }
        Err(_) => {
            let mut resp = Response::new(Body::from(
                "the redirect target is not a valid header value",
            ));
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            resp
        }
    }
}

/// `/redirect?to=PATH`: 302 to PATH on this listener's origin. Zillow keeps
/// the whole query of the request, credentials included, on the target.
fn redirect(shared: &Shared, ctx: &Listener, rec: &Recorded) -> Response<Body> {
    let query = rec.query.as_deref().unwrap_or("");
    let to = form_urlencoded::parse(query.as_bytes())
        .find(|(n, _)| n == "to")
        .map(|(_, v)| v.into_owned());
    let Some(to) = to.filter(|t| t.starts_with('/') && !t.starts_with("//")) else {
        return json_response(
            shared,
            StatusCode::BAD_REQUEST,
            json!({"error": "query parameter to must be a path starting with a single /"}),
        );
    };
    let mut location = format!("{}{to}", ctx.origin);
    if shared.opts.kind == Kind::Zillow && !query.is_empty() {
        location.push(if to.contains('?') { '&' } else { '?' });
        location.push_str(query);
    }
    found(&location)
}

fn query_u64(rec: &Recorded, name: &str) -> Option<u64> {
    let query = rec.query.as_deref()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.parse().ok())
}

fn bad_param(shared: &Shared, name: &str) -> Response<Body> {
    json_response(
        shared,
        StatusCode::BAD_REQUEST,
        json!({"error": format!("query parameter {name} must be a non-negative integer")}),
    )
}

/// Byte `i` of every download is `(i % 251) as u8`.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// `n` pattern bytes, produced chunk by chunk as the client reads.
fn download(n: u64) -> Response<Body> {
    // One chunk plus a period of the pattern: chunk k is a slice of it.
    static PATTERN: OnceLock<Bytes> = OnceLock::new();
    let pattern = PATTERN
        .get_or_init(|| (0..(CHUNK + 251) as u64).map(pattern_byte).collect())
        .clone();
    let chunks = futures_util::stream::unfold(0u64, move |offset| {
        let pattern = pattern.clone();
        async move {
            if offset >= n {
                return None;
            }
            let len = (n - offset).min(CHUNK as u64) as usize;
            let start = (offset % 251) as usize;
            let chunk = pattern.slice(start..start + len);
            Some((Ok::<_, std::io::Error>(chunk), offset + len as u64))
        }
    });
    let mut resp = Response::new(Body::from_stream(chunks));
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
    resp
}

/// The request as received, plus hop-by-hop headers for a proxy to strip.
fn echo(shared: &Shared, rec: &Recorded) -> Response<Body> {
    let kind = shared.opts.kind;
    let mut resp = json_response(
        shared,
        StatusCode::OK,
        json!({
            "method": rec.method,
            "path": rec.path,
            "query": rec.query,
            "headers": rec.headers,
            "body_len": rec.body_len,
            "body_sha256": rec.body_sha256,
            "standin": kind.name(),
        }),
    );
    let headers = resp.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("x-hop"));
    headers.insert(
        HeaderName::from_static("x-hop"),
        HeaderValue::from_static("1"),
    );
    headers.insert(
        HeaderName::from_static("keep-alive"),
        HeaderValue::from_static("timeout=5"),
    );
    resp
}
