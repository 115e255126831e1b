//! Behaviour of the generic OAuth 2 stand-in (acme), driven over real HTTP:
//! each grant body and client authentication, rotation or none, each
//! credential slot, the expired and invalid codes, the static key, faults,
//! the budget and the authorisation page's scope.

use std::time::Duration;

use base64::Engine;
use credproxy_standins::{
    ApiFault, Budget, ClientAuth, GrantBody, Kind, OAuth2, Options, Slot, Standin,
};
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

fn basic(id: &str, secret: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    format!("Basic {encoded}")
}

async fn acme(oauth2: OAuth2) -> Standin {
    Standin::start(Options {
        oauth2,
        ..Options::oauth2()
    })
    .await
    .expect("acme stand-in")
}

/// POSTs a form grant, with HTTP Basic when `auth` is set.
async fn form_grant(s: &Standin, auth: bool, form: &[(&str, &str)]) -> (u16, Value) {
    let mut req = client()
        .post(s.token_url())
        .header("content-type", "application/x-www-form-urlencoded");
    if auth {
        let o = s.options();
        req = req.header("authorization", basic(&o.client_id, &o.client_secret));
    }
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let resp = req.body(body).send().await.expect("token request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json answer"))
}

/// POSTs a JSON grant, with HTTP Basic when `auth` is set.
async fn json_grant(s: &Standin, auth: bool, body: Value) -> (u16, Value) {
    let mut req = client().post(s.token_url()).json(&body);
    if auth {
        let o = s.options();
        req = req.header("authorization", basic(&o.client_id, &o.client_secret));
    }
    let resp = req.send().await.expect("token request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json answer"))
}

async fn get(s: &Standin, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = client().get(format!("{}{path}", s.base_url()));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.expect("api request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn code_of(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn form_grants_with_basic_rotate_strictly_and_refuse_a_secret_in_the_body() {
    let s = Standin::start(Options::oauth2()).await.expect("acme");
    assert_eq!(s.kind(), Kind::OAuth2);
    assert!(s.token_url().ends_with("/oauth/token"));
    let code = s.issue_code();
    let (status, v) = form_grant(
        &s,
        true,
        &[("grant_type", "authorization_code"), ("code", &code)],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3600);
    assert_eq!(s.codes_redeemed(), 1);
    let rt = v["refresh_token"]
        .as_str()
        .expect("refresh_token")
        .to_owned();

    // Strict rotation: the refresh token works once.
    let refresh = [("grant_type", "refresh_token"), ("refresh_token", &rt)];
    let (status, v) = form_grant(&s, true, &refresh).await;
    assert_eq!(status, 200, "{v}");
    assert_ne!(v["refresh_token"].as_str(), Some(rt.as_str()));
    let (status, v) = form_grant(&s, true, &refresh).await;
    assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));
    assert_eq!(s.reused_refresh_tokens(), 1);

    // Client credentials in the body, with or without Basic: invalid_client.
    let t = s.issue_tokens();
    let o = s.options().clone();
    let in_body = [
        ("grant_type", "refresh_token"),
        ("refresh_token", t.refresh_token.as_str()),
        ("client_id", o.client_id.as_str()),
        ("client_secret", o.client_secret.as_str()),
    ];
    for auth in [false, true] {
        let (status, v) = form_grant(&s, auth, &in_body).await;
        assert_eq!((status, v["error"].as_str()), (401, Some("invalid_client")));
    }
    // A JSON body is not a form.
    let (status, v) = json_grant(
        &s,
        true,
        json!({"grant_type": "refresh_token", "refresh_token": t.refresh_token}),
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_request"))
    );
    assert_eq!(s.grant_count(), 1);
}

#[tokio::test]
async fn json_grants_with_body_auth_refuse_basic() {
    let s = acme(OAuth2 {
        grant_body: GrantBody::Json,
        client_auth: ClientAuth::Body,
        ..OAuth2::default()
    })
    .await;
    let o = s.options().clone();
    let t = s.issue_tokens();
    let body = json!({
        "grant_type": "refresh_token",
        "refresh_token": t.refresh_token,
        "client_id": o.client_id,
        "client_secret": o.client_secret,
    });
    let (status, v) = json_grant(&s, true, body.clone()).await;
    assert_eq!((status, v["error"].as_str()), (401, Some("invalid_client")));
    let (status, v) = json_grant(&s, false, json!({"grant_type": "refresh_token", "refresh_token": t.refresh_token, "client_id": o.client_id})).await;
    assert_eq!((status, v["error"].as_str()), (401, Some("invalid_client")));
    let (status, v) = form_grant(
        &s,
        false,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", t.refresh_token.as_str()),
            ("client_id", o.client_id.as_str()),
            ("client_secret", o.client_secret.as_str()),
        ],
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, v) = json_grant(&s, false, body).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["refresh_token"].is_string());
    assert_eq!(s.grant_count(), 1);
}

#[tokio::test]
async fn without_rotation_the_refresh_token_stays_valid_and_is_not_sent_again() {
    let s = acme(OAuth2 {
        rotation: false,
        ..OAuth2::default()
    })
    .await;
    let t = s.issue_tokens();
    let refresh = [
        ("grant_type", "refresh_token"),
        ("refresh_token", t.refresh_token.as_str()),
    ];
    let mut access = Vec::new();
    for _ in 0..2 {
        let (status, v) = form_grant(&s, true, &refresh).await;
        assert_eq!(status, 200, "{v}");
        assert!(v.get("refresh_token").is_none(), "{v}");
        access.push(v["access_token"].as_str().expect("access").to_owned());
    }
    assert_ne!(access[0], access[1]);
    assert_eq!(s.grant_count(), 2);
    assert_eq!(s.reused_refresh_tokens(), 0);
    // A code still gets a refresh token.
    let code = s.issue_code();
    let (_, v) = form_grant(
        &s,
        true,
        &[("grant_type", "authorization_code"), ("code", &code)],
    )
    .await;
    assert!(v["refresh_token"].is_string(), "{v}");
    let (status, _) = get(&s, "/v1/x", &[("authorization", &bearer(&access[1]))]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn bearer_by_default_with_expired_and_invalid_codes() {
    let s = Standin::start(Options::oauth2()).await.expect("acme");
    let t = s.issue_tokens();
    let (status, v) = get(
        &s,
        "/v1/x?a=1",
        &[("authorization", &bearer(&t.access_token))],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["standin"], "acme");
    assert_eq!(
        s.last_request().expect("recorded").query.as_deref(),
        Some("a=1")
    );

    for headers in [
        vec![],
        vec![("authorization", "Bearer nope")],
        vec![("authorization", "OAuth x")],
    ] {
        let resp = client()
            .get(format!("{}/v1/x", s.base_url()))
            .headers(
                headers
                    .iter()
                    .map(|(n, v)| (n.parse().expect("name"), v.parse().expect("value")))
                    .collect(),
            )
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 401);
        assert_eq!(
            resp.headers()["www-authenticate"],
            "Bearer error=\"invalid_token\""
        );
        let v: Value = resp.json().await.expect("json");
        assert_eq!(code_of(&v), "invalid_token", "{v}");
    }
    // The token twice: ambiguous, refused.
    let resp = client()
        .get(format!("{}/v1/x", s.base_url()))
        .header("authorization", bearer(&t.access_token))
        .header("authorization", bearer(&t.access_token))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 401);

    s.expire_access_tokens();
    let (status, v) = get(&s, "/v1/x", &[("authorization", &bearer(&t.access_token))]).await;
    assert_eq!((status, code_of(&v)), (401, "token_expired"));
    assert_eq!(s.requests().len(), 6, "every request is recorded");
}

#[tokio::test]
async fn without_an_expired_code_an_expired_token_is_refused_as_unknown() {
    let s = acme(OAuth2 {
        expired_code: None,
        invalid_code: "bad_token".into(),
        ..OAuth2::default()
    })
    .await;
    let t = s.issue_tokens();
    s.expire_access_after_uses(1);
    let auth = bearer(&t.access_token);
    assert_eq!(get(&s, "/v1/x", &[("authorization", &auth)]).await.0, 200);
    let (status, v) = get(&s, "/v1/x", &[("authorization", &auth)]).await;
    assert_eq!((status, code_of(&v)), (401, "bad_token"));
}

#[tokio::test]
async fn custom_header_template_and_required_client_id_in_the_query() {
    let o = Options::oauth2();
    let s = acme(OAuth2 {
        credential: Slot::header("X-Api-Token", "token={token};v1"),
        required: vec![(Slot::query("client_id"), o.client_id.clone())],
        ..OAuth2::default()
    })
    .await;
    let t = s.issue_tokens();
    let value = format!("token={};v1", t.access_token);
    let with_id = format!("/v1/x?client_id={}", o.client_id);
    assert_eq!(get(&s, &with_id, &[("x-api-token", &value)]).await.0, 200);
    let (status, v) = get(&s, "/v1/x", &[("x-api-token", &value)]).await;
    assert_eq!((status, code_of(&v)), (401, "invalid_client"));
    let (status, v) = get(&s, "/v1/x?client_id=other", &[("x-api-token", &value)]).await;
    assert_eq!((status, code_of(&v)), (401, "invalid_client"));
    let (status, v) = get(&s, &with_id, &[("authorization", &bearer(&t.access_token))]).await;
    assert_eq!((status, code_of(&v)), (401, "invalid_token"));
    let (status, _) = get(&s, &with_id, &[("x-api-token", &t.access_token)]).await;
    assert_eq!(status, 401, "the value must follow the template");
}

#[tokio::test]
async fn query_credential_and_required_api_key_header() {
    let o = Options::oauth2();
    let s = acme(OAuth2 {
        credential: Slot::query("access_token"),
        required: vec![(Slot::header("X-Api-Key", "{token}"), o.api_key.clone())],
        ..OAuth2::default()
    })
    .await;
    let t = s.issue_tokens();
    let path = format!("/v1/x?q=1&access_token={}", t.access_token);
    let key = [("x-api-key", o.api_key.as_str())];
    let resp = client()
        .get(format!("{}{path}", s.base_url()))
        .header("x-api-key", &o.api_key)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert!(
        !resp.headers().contains_key("www-authenticate"),
        "a query credential gets no challenge"
    );
    let (status, v) = get(&s, &path, &[]).await;
    assert_eq!((status, code_of(&v)), (401, "invalid_client"));
    let twice = format!("{path}&access_token={}", t.access_token);
    assert_eq!(get(&s, &twice, &key).await.0, 401);
    s.expire_access_tokens();
    let (status, v) = get(&s, &path, &key).await;
    assert_eq!((status, code_of(&v)), (401, "token_expired"));
}

#[tokio::test]
async fn a_static_key_never_expires_until_revoked() {
    let s = acme(OAuth2 {
        static_key: Some("acme-static-KEY".into()),
        ..OAuth2::default()
    })
    .await;
    let auth = bearer("acme-static-KEY");
    assert_eq!(s.static_key().as_deref(), Some("acme-static-KEY"));
    assert_eq!(get(&s, "/v1/x", &[("authorization", &auth)]).await.0, 200);
    s.expire_access_tokens();
    s.expire_access_after_uses(1);
    for _ in 0..3 {
        assert_eq!(get(&s, "/v1/x", &[("authorization", &auth)]).await.0, 200);
    }
    s.revoke_static_key();
    assert_eq!(s.static_key(), None);
    let (status, v) = get(&s, "/v1/x", &[("authorization", &auth)]).await;
    assert_eq!((status, code_of(&v)), (401, "invalid_token"));
    assert_eq!(s.token_calls(), 0);
}

#[tokio::test]
async fn faults_and_the_budget_answer_in_acme_shape() {
    let s = Standin::start(Options::oauth2()).await.expect("acme");
    let t = s.issue_tokens();
    let auth = bearer(&t.access_token);
    s.set_api_fault(Some(ApiFault::RateLimited {
        status: 429,
        retry_after: Some(7),
        times: Some(1),
    }));
    let resp = client()
        .get(format!("{}/v1/x", s.base_url()))
        .header("authorization", &auth)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    let v: Value = resp.json().await.expect("json");
    assert_eq!(code_of(&v), "rate_limited");
    assert_eq!(get(&s, "/v1/x", &[("authorization", &auth)]).await.0, 200);

    s.set_api_fault(Some(ApiFault::DisabledKey));
    let (status, v) = get(&s, "/v1/x", &[("authorization", &auth)]).await;
    assert_eq!((status, code_of(&v)), (401, "disabled_key"));
    s.set_api_fault(None);

    s.set_budget(Some(Budget::new(1, Duration::from_secs(60))));
    assert_eq!(get(&s, "/v1/x", &[("authorization", &auth)]).await.0, 200);
    let (status, v) = get(&s, "/v1/x", &[("authorization", &auth)]).await;
    assert_eq!((status, code_of(&v)), (429, "rate_limited"));
    assert_eq!(s.budget_refusals(), 1);
}

#[tokio::test]
async fn the_authorisation_page_records_the_scope() {
    let s = Standin::start(Options::oauth2()).await.expect("acme");
    assert_eq!(s.authorize_url(), s.authorize_url_oauth2());
    assert_eq!(s.last_authorize_scope(), None);
    let query = |scope: Option<&str>| {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("response_type", "code")
            .append_pair("client_id", "acme-client")
            .append_pair("redirect_uri", "http://127.0.0.1:9/callback/acme")
            .append_pair("state", "s1");
        if let Some(scope) = scope {
            q.append_pair("scope", scope);
        }
        q.finish()
    };
    let resp = client()
        .get(format!(
            "{}?{}",
            s.authorize_url(),
            query(Some("listings.read offline"))
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-standin"], "acme");
    assert!(resp.text().await.expect("html").contains("Sign in to Acme"));
    assert_eq!(
        s.last_authorize_scope().as_deref(),
        Some("listings.read offline")
    );
    let resp = client()
        .get(format!("{}?{}", s.authorize_url(), query(None)))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(s.last_authorize_scope(), None);
}
