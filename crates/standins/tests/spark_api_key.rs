//! The Spark stand-in's API-key authentication (Spark's original scheme, as
//! its Ruby client `SparkApi::Authentication::ApiAuth` does it), over real HTTP.

use std::time::Duration;

use credproxy_standins::{request_sig, session_sig, ApiFault, ApiKey, Options, Standin, TokenMode};
use serde_json::Value;

const KEY: &str = "k-123";
const SECRET: &str = "s3cret";

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn spark(keys: Vec<ApiKey>) -> Standin {
    Standin::start(Options {
        api_keys: keys,
        ..Options::spark()
    })
    .await
    .expect("start")
}

async fn standin() -> Standin {
    spark(vec![ApiKey::new(KEY, SECRET)]).await
}

/// `POST /v1/session?ApiKey=key&ApiSig=sig`: status and JSON.
async fn open_with(s: &Standin, key: &str, sig: &str) -> (u16, Value) {
    let r = client()
        .post(format!(
            "{}/v1/session?ApiKey={key}&ApiSig={sig}",
            s.base_url()
        ))
        .body("")
        .send()
        .await
        .expect("session request");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

/// Opens a session for KEY the way the Ruby client does; its `AuthToken`.
async fn open(s: &Standin) -> String {
    let (status, v) = open_with(s, KEY, &session_sig(SECRET, KEY)).await;
    assert_eq!(status, 200, "{v}");
    v["D"]["Results"][0]["AuthToken"]
        .as_str()
        .expect("AuthToken")
        .to_owned()
}

/// `method path?query&ApiSig=...` signed with `secret`, with `body`.
async fn signed(
    s: &Standin,
    method: reqwest::Method,
    path: &str,
    query: &str,
    body: &[u8],
    secret: &str,
) -> (u16, Value) {
    let sig = request_sig(secret, KEY, path, query, body);
    let r = client()
        .request(
            method,
            format!("{}{path}?{query}&ApiSig={sig}", s.base_url()),
        )
        .body(body.to_vec())
        .send()
        .await
        .expect("api request");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

async fn get(s: &Standin, token: &str) -> (u16, Value) {
    signed(
        s,
        reqwest::Method::GET,
        "/v1/listings",
        &format!("_limit=1&AuthToken={token}"),
        b"",
        SECRET,
    )
    .await
}

fn code(v: &Value) -> i64 {
    v["D"]["Code"].as_i64().unwrap_or(-1)
}

#[test]
fn signatures_worked_by_hand() {
    // printf '%s' 's3cretApiKeyk-123' | md5sum
    assert_eq!(session_sig(SECRET, KEY), "bf89261982a24c6a551001df10fc6b91");
    // printf '%s' "s3cretApiKeyk-123ServicePath/v1/listingsAuthTokentok_filterCity Eq 'Fargo'_limit1b2b1{\"D\":{}}" | md5sum
    // Sorted by name as bytes (upper case, then `_`, then lower case), the
    // repeated `b` in the order sent, `+` a space, `%27` a quote, ApiSig left out.
    assert_eq!(
        request_sig(
            SECRET,
            KEY,
            "/v1/listings",
            "_limit=1&b=2&AuthToken=tok&_filter=City+Eq+%27Fargo%27&b=1&ApiSig=whatever",
            br#"{"D":{}}"#,
        ),
        "3851a580da91a75497a2361aa628e5be"
    );
}

#[tokio::test]
async fn a_session_is_opened_with_the_keys_signature() {
    let s = standin().await;
    let (status, v) = open_with(&s, KEY, &session_sig(SECRET, KEY)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["D"]["Success"], true);
    let result = &v["D"]["Results"][0];
    let token = result["AuthToken"].as_str().expect("AuthToken");
    assert_eq!(result["Roles"], serde_json::json!(["idx"]));
    let expires = result["Expires"].as_str().expect("Expires");
    assert_eq!(
        expires.len(),
        "2024-01-01T00:00:00-05:00".len(),
        "{expires}"
    );
    assert!(
        expires.ends_with("-05:00") && expires.as_bytes()[10] == b'T',
        "{expires}"
    );
    assert_eq!(s.sessions_opened(KEY), 1);
    assert_eq!(s.session_calls(), 1);
    assert_eq!(s.live_auth_token(KEY).as_deref(), Some(token));
    assert!(
        s.requests().is_empty(),
        "the session endpoint is not an API request"
    );
}

#[tokio::test]
async fn a_bad_signature_or_an_unknown_key_gets_1000() {
    let s = standin().await;
    let (status, v) = open_with(&s, KEY, &session_sig("wrong", KEY)).await;
    assert_eq!((status, code(&v)), (401, 1000), "{v}");
    assert_eq!(v["D"]["Success"], false);
    let (status, v) = open_with(&s, "nobody", &session_sig(SECRET, "nobody")).await;
    assert_eq!((status, code(&v)), (401, 1000), "{v}");
    let r = client()
        .get(format!("{}/v1/session", s.base_url()))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 405);
    assert_eq!(s.sessions_opened(KEY), 0);
    assert_eq!(s.session_calls(), 2, "GET is not counted");
}

#[tokio::test]
async fn signed_requests_are_checked_over_path_query_and_body() {
    let s = standin().await;
    let token = open(&s).await;
    let (status, v) = get(&s, &token).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["path"], "/v1/listings");

    // Escaped values and repeated names.
    let query = format!("b=2&_filter=City+Eq+%27Fargo%27&AuthToken={token}&b=1&x=%2F%26");
    let (status, v) = signed(
        &s,
        reqwest::Method::GET,
        "/v1/listings",
        &query,
        b"",
        SECRET,
    )
    .await;
    assert_eq!(status, 200, "{v}");

    // A body is signed too.
    let body = br#"{"D":{"Name":"x"}}"#;
    let query = format!("AuthToken={token}");
    let (status, v) = signed(
        &s,
        reqwest::Method::POST,
        "/v1/contacts",
        &query,
        body,
        SECRET,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["body_len"], body.len());

    // The wrong secret, or a body other than the one signed: 1000.
    let (status, v) = signed(
        &s,
        reqwest::Method::GET,
        "/v1/listings",
        &query,
        b"",
        "wrong",
    )
    .await;
    assert_eq!((status, code(&v)), (401, 1000), "{v}");
    let sig = request_sig(SECRET, KEY, "/v1/contacts", &query, body);
    let r = client()
        .post(format!("{}/v1/contacts?{query}&ApiSig={sig}", s.base_url()))
        .body(r#"{"D":{"Name":"y"}}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    assert_eq!(code(&r.json().await.expect("json")), 1000);

    // No ApiSig, or two: 1000.
    let r = client()
        .get(format!("{}/v1/listings?AuthToken={token}", s.base_url()))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    assert_eq!(code(&r.json().await.expect("json")), 1000);

    // Every request was recorded, refused ones too.
    assert_eq!(s.requests().len(), 6);
}

#[tokio::test]
async fn opening_a_second_session_ends_the_first() {
    let s = standin().await;
    let first = open(&s).await;
    let second = open(&s).await;
    assert_ne!(first, second);
    let (status, v) = get(&s, &first).await;
    assert_eq!((status, code(&v)), (401, 1020), "{v}");
    assert_eq!(get(&s, &second).await.0, 200);
    assert_eq!(s.sessions_opened(KEY), 2);

    // Another copy of the application takes the key's session.
    let other = s.open_api_session(KEY);
    assert_eq!(get(&s, &second).await.0, 401);
    assert_eq!(get(&s, &other.auth_token).await.0, 200);
    assert_eq!(s.sessions_opened(KEY), 2, "the control is not counted");
}

#[tokio::test]
async fn a_session_expires_at_its_lifetime_or_when_ended() {
    let s = standin().await;
    s.set_session_lifetime(Duration::from_millis(300));
    let token = open(&s).await;
    assert_eq!(get(&s, &token).await.0, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, v) = get(&s, &token).await;
    assert_eq!((status, code(&v)), (401, 1020), "{v}");
    assert_eq!(s.live_auth_token(KEY), None);

    s.set_session_lifetime(Duration::from_secs(3600));
    let token = open(&s).await;
    assert_eq!(get(&s, &token).await.0, 200);
    s.end_api_sessions();
    let (status, v) = get(&s, &token).await;
    assert_eq!((status, code(&v)), (401, 1020), "{v}");

    let (status, v) = get(&s, "never-issued").await;
    assert_eq!((status, code(&v)), (401, 1020), "{v}");
}

#[tokio::test]
async fn a_disabled_key_gets_1010() {
    let s = standin().await;
    let token = open(&s).await;
    s.set_api_key_disabled(KEY, true);
    let (status, v) = get(&s, &token).await;
    assert_eq!((status, code(&v)), (401, 1010), "{v}");
    let (status, v) = open_with(&s, KEY, &session_sig(SECRET, KEY)).await;
    assert_eq!((status, code(&v)), (401, 1010), "{v}");
    s.set_api_key_disabled(KEY, false);
    assert_eq!(get(&s, &token).await.0, 200);

    // The fault of every request refuses the session endpoint too.
    s.set_api_fault(Some(ApiFault::DisabledKey));
    let (status, v) = open_with(&s, KEY, &session_sig(SECRET, KEY)).await;
    assert_eq!((status, code(&v)), (401, 1010), "{v}");
    let (status, v) = get(&s, &token).await;
    assert_eq!((status, code(&v)), (401, 1010), "{v}");
}

#[tokio::test]
async fn a_key_with_an_api_user_needs_it_on_every_request() {
    let s = spark(vec![ApiKey::new(KEY, SECRET).with_user("user-42")]).await;
    let token = open(&s).await;
    let (status, v) = get(&s, &token).await;
    assert_eq!((status, code(&v)), (401, 1000), "{v}");
    let query = format!("ApiUser=user-42&AuthToken={token}");
    let (status, v) = signed(
        &s,
        reqwest::Method::GET,
        "/v1/my/account",
        &query,
        b"",
        SECRET,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let query = format!("ApiUser=user-43&AuthToken={token}");
    let (status, v) = signed(
        &s,
        reqwest::Method::GET,
        "/v1/my/account",
        &query,
        b"",
        SECRET,
    )
    .await;
    assert_eq!((status, code(&v)), (401, 1000), "{v}");
}

#[tokio::test]
async fn the_session_endpoint_follows_the_token_mode() {
    let s = standin().await;
    s.set_token_mode(TokenMode::Fail500);
    let (status, _) = open_with(&s, KEY, &session_sig(SECRET, KEY)).await;
    assert_eq!(status, 500);
    s.set_token_mode(TokenMode::Hang);
    let hung = tokio::spawn({
        let url = format!(
            "{}/v1/session?ApiKey={KEY}&ApiSig={}",
            s.base_url(),
            session_sig(SECRET, KEY)
        );
        async move { client().post(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::timeout(Duration::from_secs(5), s.wait_for_session_calls(2))
        .await
        .expect("the call arrives");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!hung.is_finished(), "held while hanging");
    s.set_token_mode(TokenMode::Normal);
    assert_eq!(hung.await.expect("join").expect("send"), 200);
    assert_eq!(s.sessions_opened(KEY), 1);
}

#[tokio::test]
async fn oauth_requests_still_work_beside_signed_ones() {
    let s = standin().await;
    let tokens = s.issue_tokens();
    let r = client()
        .get(format!("{}/v1/listings?_limit=1", s.base_url()))
        .header("authorization", format!("OAuth {}", tokens.access_token))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let token = open(&s).await;
    assert_eq!(get(&s, &token).await.0, 200);
}
