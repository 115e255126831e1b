//! Behaviour of the Spark and Zillow stand-ins, driven over real HTTP.

use std::time::Duration;

use base64::Engine;
use credproxy_standins::{download_sha256, Options, Standin, TokenMode};
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn basic(id: &str, secret: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    format!("Basic {encoded}")
}

async fn spark_grant(s: &Standin, body: Value) -> (u16, Value) {
    let resp = client()
        .post(s.token_url())
        .json(&body)
        .send()
        .await
        .expect("token request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json answer"))
}

fn spark_refresh_body(s: &Standin, refresh_token: &str) -> Value {
    json!({
        "client_id": s.options().client_id,
        "client_secret": s.options().client_secret,
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "redirect_uri": "http://127.0.0.1:8081/callback/spark",
    })
}

async fn zillow_grant(s: &Standin, auth: Option<String>, form: &[(&str, &str)]) -> (u16, Value) {
    let mut req = client()
        .post(s.token_url())
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let resp = req.body(body).send().await.expect("token request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json answer"))
}

async fn spark_get(s: &Standin, path: &str, authorization: &str) -> reqwest::Response {
    client()
        .get(format!("{}{path}", s.base_url()))
        .header("authorization", authorization)
        .send()
        .await
        .expect("api request")
}

fn zillow_url(s: &Standin, path: &str, access_token: &str) -> String {
    let o = s.options();
    format!(
        "{}{path}?accessToken={access_token}&clientId={}&apiKey={}",
        s.base_url(),
        o.client_id,
        o.api_key
    )
}

#[tokio::test]
async fn spark_refresh_rotates_strictly() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let first = s.issue_tokens();
    assert_eq!(first.expires_in, Some(86400));

    let (status, answer) = spark_grant(&s, spark_refresh_body(&s, &first.refresh_token)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["expires_in"], 86400);
    let new_refresh = answer["refresh_token"].as_str().expect("refresh_token");
    let new_access = answer["access_token"].as_str().expect("access_token");
    assert_ne!(new_refresh, first.refresh_token);
    assert_ne!(new_access, first.access_token);
    assert_eq!(s.grant_count(), 1);
    assert_eq!(
        s.last_redirect_uri().as_deref(),
        Some("http://127.0.0.1:8081/callback/spark")
    );

    // The consumed refresh token is refused from now on.
    let (status, answer) = spark_grant(&s, spark_refresh_body(&s, &first.refresh_token)).await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"], "invalid_grant");
    assert_eq!(s.grant_count(), 1);
    assert_eq!(s.token_calls(), 2);

    // The new one works once.
    let (status, _) = spark_grant(&s, spark_refresh_body(&s, new_refresh)).await;
    assert_eq!(status, 200);
    assert_eq!(s.grant_count(), 2);

    // Both access tokens are still good.
    for token in [first.access_token.as_str(), new_access] {
        let resp = spark_get(&s, "/v1/listings", &format!("OAuth {token}")).await;
        assert_eq!(resp.status(), 200);
    }
}

#[tokio::test]
async fn spark_token_endpoint_errors() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let tokens = s.issue_tokens();

    let mut body = spark_refresh_body(&s, &tokens.refresh_token);
    body["client_secret"] = json!("wrong");
    let (status, answer) = spark_grant(&s, body).await;
    assert_eq!(status, 401);
    assert_eq!(answer["error"], "invalid_client");
    assert!(answer["error_description"].is_string());

    let resp = client()
        .post(s.token_url())
        .header("content-type", "application/json")
        .body("grant_type=refresh_token")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 400);
    let answer: Value = resp.json().await.expect("json");
    assert_eq!(answer["error"], "invalid_request");

    // Failed attempts did not consume the refresh token.
    let (status, _) = spark_grant(&s, spark_refresh_body(&s, &tokens.refresh_token)).await;
    assert_eq!(status, 200);
    assert_eq!(s.token_calls(), 3);
    assert_eq!(s.grant_count(), 1);
    // Token endpoint calls are not API requests.
    assert!(s.requests().is_empty());
}

#[tokio::test]
async fn spark_code_is_single_use() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let code = s.issue_code();
    let body = json!({
        "client_id": s.options().client_id,
        "client_secret": s.options().client_secret,
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": "http://localhost/cb",
    });
    let (status, answer) = spark_grant(&s, body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["access_token"].as_str().is_some());
    assert_eq!(s.grant_count(), 0, "a code exchange is not a refresh");
    let (status, answer) = spark_grant(&s, body).await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"], "invalid_grant");
}

#[tokio::test]
async fn zillow_requires_basic_client_auth() {
    let s = Standin::start(Options::zillow()).await.expect("start");
    let tokens = s.issue_tokens();
    assert_eq!(tokens.expires_in, None);
    let id = s.options().client_id.clone();
    let secret = s.options().client_secret.clone();
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", tokens.refresh_token.as_str()),
        ("redirect_uri", "http://127.0.0.1:8081/callback/zillow"),
    ];

    // No Basic header, even with the credentials in the body.
    let mut with_body_creds = form.to_vec();
    with_body_creds.push(("client_id", &id));
    with_body_creds.push(("client_secret", &secret));
    let (status, answer) = zillow_grant(&s, None, &with_body_creds).await;
    assert_eq!(status, 401);
    assert_eq!(answer["error"], "invalid_client");

    let (status, answer) = zillow_grant(&s, Some(basic(&id, "wrong")), &form).await;
    assert_eq!(status, 401);
    assert_eq!(answer["error"], "invalid_client");

    let (status, answer) = zillow_grant(&s, Some(basic(&id, &secret)), &form).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["Token_type"], "bearer");
    assert!(answer["id_token"]
        .as_str()
        .is_some_and(|t| t.starts_with("eyJ")));
    assert!(answer.get("expires_in").is_none());
    assert_ne!(answer["refresh_token"], tokens.refresh_token.as_str());
    assert_eq!(s.grant_count(), 1);

    // Strict rotation here too.
    let (status, answer) = zillow_grant(&s, Some(basic(&id, &secret)), &form).await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"], "invalid_grant");
}

#[tokio::test]
async fn spark_expired_and_unknown_tokens() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let tokens = s.issue_tokens();
    let bearer = format!("Bearer {}", tokens.access_token);
    assert_eq!(
        spark_get(&s, "/Reso/OData/Property", &bearer)
            .await
            .status(),
        200
    );

    let resp = spark_get(&s, "/v1/listings", "OAuth nope").await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["D"]["Code"], 1000);

    s.expire_access_tokens();
    let resp = spark_get(
        &s,
        "/v1/listings",
        &format!("OAuth {}", tokens.access_token),
    )
    .await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"D": {"Success": false, "Code": 1020, "Message": "Session token has expired"}})
    );

    // Tokens issued afterwards are fine.
    let fresh = s.issue_tokens();
    let resp = spark_get(&s, "/v1/listings", &format!("OAuth {}", fresh.access_token)).await;
    assert_eq!(resp.status(), 200);
    // Rejected requests are recorded too.
    assert_eq!(s.requests().len(), 4);
}

#[tokio::test]
async fn spark_tokens_expire_by_time() {
    let mut opts = Options::spark();
    opts.access_lifetime = Some(Duration::from_millis(100));
    let s = Standin::start(opts).await.expect("start");
    let tokens = s.issue_tokens();
    let auth = format!("OAuth {}", tokens.access_token);
    assert_eq!(spark_get(&s, "/x", &auth).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let resp = spark_get(&s, "/x", &auth).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["D"]["Code"], 1020);
}

#[tokio::test]
async fn zillow_api_checks_query_credentials() {
    let s = Standin::start(Options::zillow()).await.expect("start");
    let tokens = s.issue_tokens();
    let url = zillow_url(&s, "/listings/v1/listingsForUser", &tokens.access_token);

    let resp = client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-standin"], "zillow");

    let wrong_key = url.replace("apiKey=", "apiKey=x");
    assert_eq!(
        client()
            .get(&wrong_key)
            .send()
            .await
            .expect("send")
            .status(),
        401
    );
    let no_token = zillow_url(&s, "/listings", "unknown");
    assert_eq!(
        client().get(&no_token).send().await.expect("send").status(),
        401
    );

    s.expire_access_tokens();
    let resp = client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "expired_token");
    assert_eq!(s.requests().len(), 4);
}

#[tokio::test]
async fn echo_keeps_the_raw_query_and_sends_hop_headers() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let tokens = s.issue_tokens();
    let resp = client()
        .post(format!("{}/v1/listings?b=%2F%20x&a=1+2&b=3", s.base_url()))
        .header("authorization", format!("OAuth {}", tokens.access_token))
        .header("x-one", "1")
        .body("hello")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let headers = resp.headers();
    assert_eq!(headers["x-standin"], "spark");
    assert_eq!(headers["connection"], "x-hop");
    assert_eq!(headers["x-hop"], "1");
    assert_eq!(headers["keep-alive"], "timeout=5");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["method"], "POST");
    assert_eq!(body["path"], "/v1/listings");
    assert_eq!(body["query"], "b=%2F%20x&a=1+2&b=3");
    assert_eq!(body["body_len"], 5);

    let rec = s.last_request().expect("recorded");
    assert_eq!(rec.query.as_deref(), Some("b=%2F%20x&a=1+2&b=3"));
    assert_eq!(rec.header("X-One"), Some("1"));
    assert_eq!(rec.header_all("x-one"), vec!["1"]);
    assert_eq!(rec.body_len, 5);
    assert_eq!(rec.body_sha256, format!("{:x}", Sha256::digest(b"hello")));
    assert_eq!(body["body_sha256"], rec.body_sha256.as_str());
}

#[tokio::test]
async fn streaming_upload_and_download() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let auth = format!("OAuth {}", s.issue_tokens().access_token);

    // Upload 5 MiB + 7 bytes as a stream of chunks.
    let chunks: Vec<Vec<u8>> = (0..81u32)
        .map(|i| vec![(i % 256) as u8; if i == 80 { 7 } else { 64 * 1024 }])
        .collect();
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    for c in &chunks {
        hasher.update(c);
        total += c.len() as u64;
    }
    let expected = format!("{:x}", hasher.finalize());
    let stream = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
    let resp = client()
        .put(format!("{}/upload", s.base_url()))
        .header("authorization", &auth)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.expect("json");
    assert_eq!(answer, json!({"len": total, "sha256": expected}));
    let rec = s.last_request().expect("recorded");
    assert_eq!(
        (rec.body_len, rec.body_sha256.as_str()),
        (total, expected.as_str())
    );

    // Download a length that is not a multiple of the chunk size.
    let n = 3 * 64 * 1024 + 1234;
    let resp = spark_get(&s, &format!("/download?bytes={n}"), &auth).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(n));
    let mut body = resp.bytes_stream();
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("chunk");
        got += chunk.len() as u64;
        hasher.update(&chunk);
    }
    assert_eq!(got, n);
    assert_eq!(format!("{:x}", hasher.finalize()), download_sha256(n));

    let resp = spark_get(&s, "/download?bytes=lots", &auth).await;
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn wait_for_requests_resolves_when_enough_arrived() {
    let s = std::sync::Arc::new(Standin::start(Options::zillow()).await.expect("start"));
    let waiter = {
        let s = s.clone();
        tokio::spawn(async move { s.wait_for_requests(3).await })
    };
    let tokens = s.issue_tokens();
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished(), "resolved after {i} requests");
        let url = zillow_url(&s, &format!("/r{i}"), &tokens.access_token);
        client().get(url).send().await.expect("send");
    }
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("wait_for_requests resolved")
        .expect("join");
    // Already satisfied: resolves at once.
    s.wait_for_requests(2).await;
    let paths: Vec<String> = s.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/r0", "/r1", "/r2"]);
}

#[tokio::test]
async fn token_modes() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let tokens = s.issue_tokens();
    let body = spark_refresh_body(&s, &tokens.refresh_token);

    s.set_token_mode(TokenMode::Fail500);
    assert_eq!(spark_grant(&s, body.clone()).await.0, 500);
    s.set_token_mode(TokenMode::InvalidGrant);
    let (status, answer) = spark_grant(&s, body.clone()).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_grant"))
    );

    s.set_token_mode(TokenMode::Hang);
    let hanging = tokio::spawn({
        let url = s.token_url();
        let body = body.clone();
        async move {
            client()
                .post(url)
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!hanging.is_finished());
    s.set_token_mode(TokenMode::Normal);
    let status = tokio::time::timeout(Duration::from_secs(5), hanging)
        .await
        .expect("answered once the mode changed")
        .expect("join")
        .expect("response");
    assert_eq!(status, 200);
    assert_eq!(s.token_calls(), 3);
    assert_eq!(s.grant_count(), 1);
}

#[tokio::test]
async fn slow_status_and_shutdown() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let auth = format!("OAuth {}", s.issue_tokens().access_token);

    let started = std::time::Instant::now();
    let resp = spark_get(&s, "/slow?ms=150", &auth).await;
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(150));

    let resp = spark_get(&s, "/status/503", &auth).await;
    assert_eq!(resp.status(), 503);
    let resp = spark_get(&s, "/status/204", &auth).await;
    assert_eq!(resp.status(), 204);

    // The authorisation page without its parameters says what is missing.
    let page = client().get(s.authorize_url()).send().await.expect("send");
    assert_eq!(page.status(), 400);

    // A hanging token call is cut off by shutdown.
    s.set_token_mode(TokenMode::Hang);
    let hanging = tokio::spawn({
        let url = s.token_url();
        async move { client().post(url).body("{}").send().await.is_err() }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let base = s.base_url();
    s.shutdown();
    let cut = tokio::time::timeout(Duration::from_secs(5), hanging)
        .await
        .expect("hanging call ended")
        .expect("join");
    assert!(cut, "the hanging call got no answer");
    assert!(client().get(format!("{base}/x")).send().await.is_err());
}
