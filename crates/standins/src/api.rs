//! The API side of both providers: every path that is not the token endpoint
//! or the authorisation page.
//!
//! Each request's body is hashed as it streams in (never held whole), the
//! request is recorded (rejected ones too), then its credentials are checked
//! the way the provider does (Spark: `Authorization: OAuth|Bearer TOKEN`;
//! Zillow: `accessToken`, `clientId` and `apiKey` query parameters) and it is
//! answered by one of the special paths or by a JSON echo.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE,
};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{hex, json as json_response, AccessCheck, Kind, Recorded, Shared};

/// `/download` sends its bytes in chunks of this size.
const CHUNK: usize = 64 * 1024;

pub(crate) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let kind = shared.opts.kind;
    let (parts, body) = req.into_parts();
    let (body_len, body_sha256, complete) = hash_body(body).await;
    let rec = Recorded {
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

    let mut resp = if !complete {
        json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "the request body could not be read"}),
        )
    } else {
        let denied = match kind {
            Kind::Spark => check_spark(&shared, &parts),
            Kind::Zillow => check_zillow(&shared, &parts),
        };
        match denied {
            Some(resp) => resp,
            None => serve(&rec, kind).await,
        }
    };
    resp.headers_mut()
        .insert("x-standin", HeaderValue::from_static(kind.name()));
    resp
}

/// Reads the body to its end, hashing as it goes. `false` when it broke off.
async fn hash_body(mut body: Incoming) -> (u64, String, bool) {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let complete = loop {
        match body.frame().await {
            None => break true,
            Some(Err(_)) => break false,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    len += data.len() as u64;
                    hasher.update(&data);
                }
            }
        }
    };
    (len, hex(&hasher.finalize()), complete)
}

/// `None` when the request carries a valid Spark access token.
fn check_spark(shared: &Shared, parts: &Parts) -> Option<Response<Body>> {
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
        Some(token) => shared.tokens().check_access(&token),
        None => AccessCheck::Unknown,
    };
    let (code, message) = match check {
        AccessCheck::Valid => return None,
        AccessCheck::Expired => (1020, "Session token has expired"),
        AccessCheck::Unknown => (1000, "Invalid API key"),
    };
    Some(json_response(
        StatusCode::UNAUTHORIZED,
        json!({"D": {"Success": false, "Code": code, "Message": message}}),
    ))
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
        Some(token) => shared.tokens().check_access(token),
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

/// Answers an authorised request.
async fn serve(rec: &Recorded, kind: Kind) -> Response<Body> {
    match rec.path.as_str() {
        "/download" => match query_u64(rec, "bytes") {
            Some(n) => download(n),
            None => bad_param("bytes"),
        },
        "/upload" => json_response(
            StatusCode::OK,
            json!({"len": rec.body_len, "sha256": rec.body_sha256}),
        ),
        "/slow" => match query_u64(rec, "ms") {
            Some(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                echo(rec, kind)
            }
            None => bad_param("ms"),
        },
        path => match path.strip_prefix("/status/") {
            Some(code) => match code.parse::<u16>().ok().filter(|c| (200..=599).contains(c)) {
                Some(code) => {
                    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
                    json_response(status, json!({"status": code}))
                }
                None => json_response(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "the status must be a number from 200 to 599"}),
                ),
            },
            None => echo(rec, kind),
        },
    }
}

fn query_u64(rec: &Recorded, name: &str) -> Option<u64> {
    let query = rec.query.as_deref()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.parse().ok())
}

fn bad_param(name: &str) -> Response<Body> {
    json_response(
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
fn echo(rec: &Recorded, kind: Kind) -> Response<Body> {
    let mut resp = json_response(
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
