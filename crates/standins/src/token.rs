//! The token endpoint of every provider.
//!
//! Spark (`POST /v1/oauth2/grant`) takes a JSON body carrying the client
//! credentials; Zillow (`POST /oauth/token`) takes a form body and accepts the
//! client credentials only as HTTP Basic; acme (`POST /oauth/token`) takes
//! the body format and client authentication its [`OAuth2`] options name, and
//! refuses the other client authentication. All grant `authorization_code`
//! (codes from `Standin::issue_code` or the authorisation pages) and
//! `refresh_token` with strict rotation: a refresh token works once (acme
//! without rotation: it keeps working, and the answer carries none).
//! [`TokenMode`] can make the endpoint fail, hang or refuse every grant.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use base64::Engine;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE,
};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::{
    json as json_response, ClientAuth, GrantBody, Kind, OAuth2, Shared, TokenMode, Tokens,
};

/// Token requests are small; anything bigger is refused.
const MAX_BODY: usize = 64 * 1024;

/// Why a token request is refused: status, OAuth error code, description.
type Refusal = (StatusCode, &'static str, &'static str);

/// The fields of a grant request, whichever way they arrived.
#[derive(Default)]
struct Grant {
    grant_type: Option<String>,
    code: Option<String>,
    refresh_token: Option<String>,
    redirect_uri: Option<String>,
}

pub(crate) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        let mut resp = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "use POST",
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    shared.token_calls.send_modify(|n| *n += 1);
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "unreadable or oversized body",
            )
        }
    };

    let mut mode = shared.mode.subscribe();
    let mode = match mode.wait_for(|m| *m != TokenMode::Hang).await {
        Ok(m) => *m,
        Err(_) => TokenMode::Fail500,
    };
    match mode {
        TokenMode::Normal => {}
        TokenMode::Hang | TokenMode::Fail500 => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the stand-in was told to fail",
            )
        }
        TokenMode::InvalidGrant => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "the stand-in was told to refuse every grant",
            )
        }
    }

    let opts = &shared.opts;
    let parsed = match opts.kind {
        Kind::Spark => spark_request(&body, &opts.client_id, &opts.client_secret),
        Kind::Zillow => zillow_request(&parts, &body, &opts.client_id, &opts.client_secret),
        Kind::OAuth2 => oauth2_request(
            &parts,
            &body,
            &opts.oauth2,
            &opts.client_id,
            &opts.client_secret,
        ),
    };
    let grant = match parsed {
        Ok(grant) => grant,
        Err((status, code, description)) => {
            let mut resp = error(status, code, description);
            let basic = match opts.kind {
                Kind::Zillow => true,
                Kind::OAuth2 => opts.oauth2.client_auth == ClientAuth::Basic,
                Kind::Spark => false,
            };
            if basic && status == StatusCode::UNAUTHORIZED {
                resp.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"oauth\""),
                );
            }
            return resp;
        }
    };
    *crate::lock(&shared.last_redirect_uri) = grant.redirect_uri.clone();

    // Without rotation the refresh answer carries no refresh token.
    let mut rotated = true;
    let issued = match grant.grant_type.as_deref() {
        Some("refresh_token") => {
            rotated = opts.kind != Kind::OAuth2 || opts.oauth2.rotation;
            let Some(refresh_token) = grant.refresh_token.as_deref() else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "refresh_token is required",
                );
            };
            let issued = shared.tokens().redeem_refresh(refresh_token, opts);
            if issued.is_some() {
                shared.grants.fetch_add(1, Ordering::SeqCst);
            }
            issued
        }
        Some("authorization_code") => {
            let Some(code) = grant.code.as_deref() else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "code is required",
                );
            };
            let issued = shared.tokens().redeem_code(code, opts);
            if issued.is_some() {
                shared.codes_redeemed.fetch_add(1, Ordering::SeqCst);
            }
            issued
        }
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type must be authorization_code or refresh_token",
            )
        }
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type is required",
            )
        }
    };
    match issued {
        Some(tokens) => token_answer(opts.kind, &tokens, rotated),
        None => error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "the code or refresh token is invalid, expired or already used",
        ),
    }
}

/// Spark: a JSON object with the client credentials in it.
fn spark_request(body: &[u8], client_id: &str, client_secret: &str) -> Result<Grant, Refusal> {
    let object: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => object,
        _ => {
            return Err((
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the body must be a JSON object",
            ))
        }
    };
    let field = |name: &str| object.get(name).and_then(Value::as_str).map(str::to_owned);
    if field("client_id").as_deref() != Some(client_id)
        || field("client_secret").as_deref() != Some(client_secret)
    {
        return Err((
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "unknown client or wrong client secret",
        ));
    }
    Ok(Grant {
        grant_type: field("grant_type"),
        code: field("code"),
        refresh_token: field("refresh_token"),
        redirect_uri: field("redirect_uri"),
    })
}

/// Zillow: a form body, and the client credentials only as HTTP Basic.
fn zillow_request(
    parts: &Parts,
    body: &[u8],
    client_id: &str,
    client_secret: &str,
) -> Result<Grant, Refusal> {
    if !basic_auth_matches(parts, client_id, client_secret) {
        return Err((
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication by HTTP Basic is required",
        ));
    }
    let is_form = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err((
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let mut grant = Grant::default();
    for (name, value) in form_urlencoded::parse(body) {
        let slot = match name.as_ref() {
            "grant_type" => &mut grant.grant_type,
            "code" => &mut grant.code,
            "refresh_token" => &mut grant.refresh_token,
            "redirect_uri" => &mut grant.redirect_uri,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(value.into_owned());
        }
    }
    Ok(grant)
}

/// acme: the body format and client authentication its options name.
fn oauth2_request(
    parts: &Parts,
    body: &[u8],
    opts: &OAuth2,
    client_id: &str,
    client_secret: &str,
) -> Result<Grant, Refusal> {
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let fields: Vec<(String, String)> = match opts.grant_body {
        GrantBody::Form => {
            if !content_type.starts_with("application/x-www-form-urlencoded") {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the body must be application/x-www-form-urlencoded",
                ));
            }
            form_urlencoded::parse(body).into_owned().collect()
        }
        GrantBody::Json => {
            let object = match serde_json::from_slice(body) {
                Ok(Value::Object(object)) if content_type.starts_with("application/json") => object,
                _ => {
                    return Err((
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "the body must be an application/json object",
                    ))
                }
            };
            object
                .into_iter()
                .filter_map(|(name, value)| Some((name, value.as_str()?.to_owned())))
                .collect()
        }
    };
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let authenticated = match opts.client_auth {
        ClientAuth::Basic => {
            field("client_secret").is_none() && basic_auth_matches(parts, client_id, client_secret)
        }
        ClientAuth::Body => {
            !parts.headers.contains_key(AUTHORIZATION)
                && field("client_id").as_deref() == Some(client_id)
                && field("client_secret").as_deref() == Some(client_secret)
        }
    };
    if !authenticated {
        return Err((
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            match opts.client_auth {
                ClientAuth::Basic => "client authentication by HTTP Basic only is required",
                ClientAuth::Body => "client_id and client_secret in the body only are required",
            },
        ));
    }
    Ok(Grant {
        grant_type: field("grant_type"),
        code: field("code"),
        refresh_token: field("refresh_token"),
        redirect_uri: field("redirect_uri"),
    })
}

fn basic_auth_matches(parts: &Parts, client_id: &str, client_secret: &str) -> bool {
    let mut values = parts.headers.get_all(AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Some((scheme, encoded)) = value.to_str().ok().and_then(|v| v.trim().split_once(' ')) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let Ok(decoded) = String::from_utf8(decoded) else {
        return false;
    };
    let Some((id, secret)) = decoded.split_once(':') else {
        return false;
    };
    if id == client_id && secret == client_secret {
        return true;
    }
    // RFC 6749 §2.3.1: both parts are form-urlencoded before encoding.
    let unescape = |s: &str| {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    unescape(id).as_deref() == Some(client_id) && unescape(secret).as_deref() == Some(client_secret)
}

/// The grant's answer; `rotated` false leaves the refresh token out.
fn token_answer(kind: Kind, tokens: &Tokens, rotated: bool) -> Response<Body> {
    let mut body = match kind {
        Kind::Spark => json!({
            "access_token": tokens.access_token,
            "refresh_token": tokens.refresh_token,
        }),
        Kind::Zillow => json!({
            "access_token": tokens.access_token,
            "Token_type": "bearer",
            "refresh_token": tokens.refresh_token,
            "id_token": id_token(),
        }),
        Kind::OAuth2 => {
            let mut body = json!({
                "access_token": tokens.access_token,
                "token_type": "Bearer",
            });
            if let (true, Some(object)) = (rotated, body.as_object_mut()) {
                object.insert("refresh_token".into(), tokens.refresh_token.clone().into());
            }
            body
        }
    };
    if let (Some(expires_in), Some(object)) = (tokens.expires_in, body.as_object_mut()) {
        object.insert("expires_in".into(), expires_in.into());
    }
    let mut resp = json_response(StatusCode::OK, body);
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// An unsigned JWT-shaped string, like Zillow's `id_token`.
fn id_token() -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = json!({"iat": now, "sub": "zillow-standin-user"}).to_string();
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none"}"#),
        b64.encode(claims.as_bytes())
    )
}

fn error(status: StatusCode, code: &str, description: &str) -> Response<Body> {
    json_response(
        status,
        json!({"error": code, "error_description": description}),
    )
}
