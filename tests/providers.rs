//! Providers as data (interface.md, "Providers as data"), black-box through
//! the `credproxy` binary against the generic OAuth 2 stand-in (acme):
//! `kind = "oauth2"` tables (grant bodies and client authentication, header
//! and query injection, proactive and reactive refresh with and without
//! rotation, `expired` and `throttled`, `scopes` on connect, legacy key
//! slots, callers' own credential values), tables refused at start-up, and
//! `kind = "static"` sessions.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use credproxy_standins::{ApiFault, ClientAuth, GrantBody, OAuth2, Options, Slot, Standin, Tokens};
use serde_json::Value;
use support::{client, error_code, run_cli, url, BinServer, Extra, World, ADMIN_TOKEN, BIN};

const HDR: &str = "X-Credproxy-Session";

/// The `status` that `session list` and `GET /admin/sessions/{id}` show for
/// a static session whose key the upstream refused with 401 (interface.md:
/// "an upstream 401 goes back as it came and the session's health says so").
fn static_refused_status() -> &'static str {
    "reauthorization_required"
}

/// The Spark and Zillow world of the other suites, plus an acme stand-in.
struct Acme {
    w: World,
    api: Standin,
}

impl Acme {
    async fn start(oauth2: OAuth2) -> Acme {
        Acme {
            w: World::new().await,
            api: Standin::start(Options {
                oauth2,
                ..Options::oauth2()
            })
            .await
            .expect("acme stand-in"),
        }
    }

    /// `[providers.acme]`, `kind = "oauth2"`, pointing at the stand-in, then `lines`.
    fn oauth2_table(&self, lines: &str) -> String {
        let o = self.api.options();
        format!(
            "\n[providers.acme]\nkind = \"oauth2\"\napi_base = \"{}\"\ntoken_url = \"{}\"\n\
             authorize_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\n\
             min_refresh_interval = 0\n{lines}\n",
            self.api.base_url(),
            self.api.token_url(),
            self.api.authorize_url(),
            o.client_id,
            o.client_secret,
        )
    }

    /// `[providers.NAME]`, `kind = "static"`, pointing at the stand-in, then `lines`.
    fn static_table(&self, name: &str, lines: &str) -> String {
        format!(
            "\n[providers.{name}]\nkind = \"static\"\napi_base = \"{}\"\n{lines}\n",
            self.api.base_url(),
        )
    }

    /// The world's config with `tables` appended; its path.
    fn write(&self, tables: &str) -> PathBuf {
        self.w.write_config(&Extra {
            zillow: tables.to_owned(),
            ..Extra::default()
        })
    }

    /// The world's config text with `tables` appended.
    fn text(&self, tables: &str) -> String {
        self.w.config_text(&Extra {
            zillow: tables.to_owned(),
            ..Extra::default()
        })
    }
}

/// `credproxy session add --json` for stand-in tokens; (id, session key).
fn add(cfg: &Path, provider: &str, t: &Tokens, expires_in: Option<u64>) -> (String, String) {
    let expires = expires_in.map(|s| s.to_string());
    let mut args = vec![
        "session",
        "add",
        "--provider",
        provider,
        "--access-token",
        &t.access_token,
        "--refresh-token",
        &t.refresh_token,
        "--json",
    ];
    if let Some(expires) = &expires {
        args.extend(["--expires-in", expires.as_str()]);
    }
    let out = run_cli(cfg, &args);
    assert!(
        out.status.success(),
        "session add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ids(&out.stdout)
}

/// `credproxy session add --provider NAME --access-token - --json`, the key
/// on standard input (kept out of argv); (id, session key).
fn add_static(cfg: &Path, provider: &str, key: &str) -> (String, String) {
    let mut child = Command::new(BIN)
        .args([
            "session",
            "add",
            "--provider",
            provider,
            "--access-token",
            "-",
            "--json",
            "--config",
        ])
        .arg(cfg)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run credproxy");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{key}").expect("write the key");
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "session add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ids(&out.stdout)
}

fn ids(stdout: &[u8]) -> (String, String) {
    let v: Value = serde_json::from_slice(stdout).expect("session add --json prints one object");
    (
        v["id"].as_str().expect("id").to_owned(),
        v["session_key"].as_str().expect("session_key").to_owned(),
    )
}

/// A GET through the proxy with `headers`.
async fn get(srv: &BinServer, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client().get(url(srv.proxy_addr, path));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await.expect("send")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The pairs of a request's query, decoded, in order.
fn pairs(query: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// Every value of query parameter `name`.
fn values(query: Option<&str>, name: &str) -> Vec<String> {
    pairs(query)
        .into_iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .collect()
}

/// No request the stand-in received carried `secret` anywhere: path,
/// query (raw or decoded) or any header.
fn never_seen(api: &Standin, secret: &str) {
    for r in api.requests() {
        let query = r.query.clone().unwrap_or_default();
        let decoded: String = pairs(Some(&query))
            .into_iter()
            .map(|(n, v)| format!("{n}={v}&"))
            .collect();
        assert!(
            !r.path.contains(secret) && !query.contains(secret) && !decoded.contains(secret),
            "the session key reached the upstream: {} {}?{query}",
            r.method,
            r.path
        );
        for (name, value) in &r.headers {
            assert!(
                !value.contains(secret),
                "the session key reached the upstream in {name}"
            );
        }
    }
}

/// The JSON error code of a stand-in's refusal.
async fn upstream_code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.expect("json");
    v["error"]["code"].as_str().unwrap_or("").to_owned()
}

// --- kind = "oauth2": injection ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_header_is_injected_by_default() {
    let a = Acme::start(OAuth2::default()).await;
    let cfg = a.write(&a.oauth2_table(""));
    let t = a.api.issue_tokens();
    let (_, key) = add(&cfg, "acme", &t, None);
    let srv = BinServer::spawn(&cfg, "info");

    let r = get(&srv, "/acme/v1/listings?b=2&a=1", &[(HDR, &key)]).await;
    assert_eq!(r.status(), 200);
    let rec = a.api.last_request().expect("recorded");
    assert_eq!(rec.path, "/v1/listings");
    assert_eq!(
        rec.query.as_deref(),
        Some("b=2&a=1"),
        "the query passes byte for byte"
    );
    assert_eq!(
        rec.header_all("authorization"),
        vec![bearer(&t.access_token).as_str()]
    );
    assert_eq!(rec.header(HDR), None);
    never_seen(&a.api, &key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_header_template_is_injected_with_the_client_id() {
    let o = Options::oauth2();
    let a = Acme::start(OAuth2 {
        credential: Slot::header("X-Api-Token", "token {token}"),
        required: vec![(Slot::header("X-Client-Id", "{token}"), o.client_id.clone())],
        ..OAuth2::default()
    })
    .await;
    let cfg = a.write(&a.oauth2_table(
        r#"inject.headers = { X-Api-Token = "token {access_token}", X-Client-Id = "{client_id}" }"#,
    ));
    let t = a.api.issue_tokens();
    let (_, key) = add(&cfg, "acme", &t, None);
    let srv = BinServer::spawn(&cfg, "info");

    let r = get(&srv, "/acme/v1/x", &[(HDR, &key)]).await;
    assert_eq!(r.status(), 200);
    let rec = a.api.last_request().expect("recorded");
    assert_eq!(
        rec.header_all("x-api-token"),
        vec![format!("token {}", t.access_token).as_str()]
    );
    assert_eq!(rec.header_all("x-client-id"), vec![o.client_id.as_str()]);
    assert_eq!(
        rec.header("authorization"),
        None,
        "with inject.headers set, no default Authorization"
    );
    never_seen(&a.api, &key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_injection_appends_the_token_and_keeps_the_callers_parameters() {
    let o = Options::oauth2();
    let a = Acme::start(OAuth2 {
        credential: Slot::query("access_token"),
        required: vec![
            (Slot::query("client_id"), o.client_id.clone()),
            (Slot::header("X-Api-Key", "{token}"), o.api_key.clone()),
        ],
        ..OAuth2::default()
    })
    .await;
    let cfg = a.write(&a.oauth2_table(&format!(
        "api_key = \"{}\"\n{}",
        o.api_key,
        r#"inject.query = { access_token = "{access_token}", client_id = "{client_id}" }
inject.headers = { X-Api-Key = "{api_key}" }"#
    )));
    let t = a.api.issue_tokens();
    let (_, key) = add(&cfg, "acme", &t, None);
    let srv = BinServer::spawn(&cfg, "info");

    let r = get(&srv, "/acme/v1/x?z=3&a=%2F1&z=4", &[(HDR, &key)]).await;
    assert_eq!(r.status(), 200);
    let rec = a.api.last_request().expect("recorded");
    let query = rec.query.as_deref().expect("a query");
    let callers: Vec<&str> = query
        .split('&')
        .filter(|p| !p.starts_with("access_token=") && !p.starts_with("client_id="))
        .collect();
    assert_eq!(
        callers.join("&"),
        "z=3&a=%2F1&z=4",
        "the caller's parameters keep their bytes and order: {query}"
    );
    assert_eq!(
        values(Some(query), "access_token"),
        vec![t.access_token.clone()]
    );
    assert_eq!(values(Some(query), "client_id"), vec![o.client_id.clone()]);
    assert_eq!(rec.header_all("x-api-key"), vec![o.api_key.as_str()]);
    assert_eq!(
        rec.header("authorization"),
        None,
        "with inject.query set, no default Authorization"
    );
    never_seen(&a.api, &key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_on_its_origin_are_rewritten() {
    let a = Acme::start(OAuth2::default()).await;
    let cfg = a.write(&a.oauth2_table(""));
    let (_, key) = add(&cfg, "acme", &a.api.issue_tokens(), None);
    let srv = BinServer::spawn(&cfg, "info");
    let c = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = c
        .get(url(srv.proxy_addr, "/acme/redirect?to=/v1/next%3Fpage%3D2"))
        .header(HDR, &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 302);
    assert_eq!(
        r.headers()["location"],
        format!("http://{}/acme/v1/next?page=2", srv.proxy_addr).as_str()
    );
}

// --- kind = "oauth2": refresh -----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_and_basic_refresh_proactively_before_expiry() {
    let a = Acme::start(OAuth2::default()).await;
    let cfg = a.write(&a.oauth2_table("grant_body = \"form\"\nclient_auth = \"basic\""));
    let t = a.api.issue_tokens();
    // 30 s from expiry: inside the default 60 s margin.
    let (_, key) = add(&cfg, "acme", &t, Some(30));
    let srv = BinServer::spawn(&cfg, "info");

    let r = get(&srv, "/acme/v1/a", &[(HDR, &key)]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(a.api.grant_count(), 1);
    let reqs = a.api.requests();
    assert_eq!(reqs.len(), 1, "refreshed before sending");
    assert_ne!(
        reqs[0].header("authorization"),
        Some(bearer(&t.access_token).as_str())
    );
    // Now valid for an hour: no further refresh.
    assert_eq!(get(&srv, "/acme/v1/b", &[(HDR, &key)]).await.status(), 200);
    assert_eq!(a.api.grant_count(), 1);
    assert_eq!(a.api.reused_refresh_tokens(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_and_basic_refresh_on_401_and_replay_byte_identical_with_rotation() {
    let a = Acme::start(OAuth2::default()).await;
    let cfg = a.write(&a.oauth2_table(""));
    let t = a.api.issue_tokens();
    let (_, key) = add(&cfg, "acme", &t, None);
    let srv = BinServer::spawn(&cfg, "info");

    let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    for round in 1..=2u64 {
        a.api.expire_access_tokens();
        a.api.clear_requests();
        let r = client()
            .post(url(srv.proxy_addr, "/acme/upload"))
            .header(HDR, &key)
            .body(body.clone())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "round {round}");
        let reqs = a.api.requests();
        assert_eq!(reqs.len(), 2, "the 401, then the replay");
        assert_eq!(reqs[0].body_sha256, reqs[1].body_sha256);
        assert_eq!(reqs[1].body_len, body.len() as u64);
        assert_ne!(
            reqs[0].header("authorization"),
            reqs[1].header("authorization")
        );
        assert_eq!(a.api.grant_count(), round);
    }
    assert_eq!(
        a.api.reused_refresh_tokens(),
        0,
        "each rotated refresh token was kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_body_auth_refresh_proactively_and_on_401() {
    let a = Acme::start(OAuth2 {
        grant_body: GrantBody::Json,
        client_auth: ClientAuth::Body,
        ..OAuth2::default()
    })
    .await;
    let cfg = a.write(&a.oauth2_table("grant_body = \"json\"\nclient_auth = \"body\""));
    let (_, key) = add(&cfg, "acme", &a.api.issue_tokens(), Some(30));
    let srv = BinServer::spawn(&cfg, "info");

    assert_eq!(get(&srv, "/acme/v1/a", &[(HDR, &key)]).await.status(), 200);
    assert_eq!(a.api.grant_count(), 1, "proactive");
    assert_eq!(a.api.requests().len(), 1);

    a.api.expire_access_tokens();
    assert_eq!(get(&srv, "/acme/v1/b", &[(HDR, &key)]).await.status(), 200);
    assert_eq!(a.api.grant_count(), 2, "reactive");
    assert_eq!(a.api.requests().len(), 3, "the 401, then the replay");
    assert_eq!(a.api.reused_refresh_tokens(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rotation_the_refresh_token_is_kept_for_the_next_refresh() {
    let a = Acme::start(OAuth2 {
        rotation: false,
        ..OAuth2::default()
    })
    .await;
    let cfg = a.write(&a.oauth2_table(""));
    let (id, key) = add(&cfg, "acme", &a.api.issue_tokens(), Some(30));
    let srv = BinServer::spawn(&cfg, "info");

    assert_eq!(get(&srv, "/acme/v1/a", &[(HDR, &key)]).await.status(), 200);
    assert_eq!(a.api.grant_count(), 1, "proactive");
    for round in 2..=3u64 {
        a.api.expire_access_tokens();
        let r = get(&srv, "/acme/v1/b", &[(HDR, &key)]).await;
        assert_eq!(r.status(), 200, "round {round}");
        assert_eq!(a.api.grant_count(), round, "reactive");
    }
    let s: Value = client()
        .get(url(srv.admin_addr, &format!("/admin/sessions/{id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(s["status"], "active", "{s}");
    assert!(s["last_refresh_at"].is_string(), "{s}");
}

// --- kind = "oauth2": expired and throttled ---------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_401_with_the_expired_json_code_refreshes() {
    let a = Acme::start(OAuth2::default()).await;
    let cfg =
        a.write(&a.oauth2_table(r#"expired = { status = 401, json_code = "token_expired" }"#));
    let (_, key) = add(&cfg, "acme", &a.api.issue_tokens(), None);
    let srv = BinServer::spawn(&cfg, "info");

    // Another 401 (a disabled client): back as it came, no refresh.
    a.api.set_api_fault(Some(ApiFault::DisabledKey));
    let r = get(&srv, "/acme/v1/a", &[(HDR, &key)]).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        error_code(&r),
        None,
        "the upstream's answer, not credproxy's"
    );
    assert_eq!(upstream_code(r).await, "disabled_key");
    a.api.set_api_fault(None);
    // A 401 with no code at all: the same.
    let r = get(&srv, "/acme/status/401", &[(HDR, &key)]).await;
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v, serde_json::json!({"status": 401}));
    assert_eq!(a.api.token_calls(), 0);
    assert_eq!(a.api.requests().len(), 2, "neither was replayed");

    // The expired one: refresh and replay.
    a.api.expire_access_tokens();
    a.api.clear_requests();
    let r = get(&srv, "/acme/v1/b", &[(HDR, &key)]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(a.api.grant_count(), 1);
    assert_eq!(a.api.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_answer_holds_the_providers_requests_until_retry_after() {
    let a = Acme::start(OAuth2::default()).await;
    let cfg = a.write(&a.oauth2_table("throttled = { status = [429] }"));
    let (_, key) = add(&cfg, "acme", &a.api.issue_tokens(), None);
    let (_, other) = add(&cfg, "acme", &a.api.issue_tokens(), None);
    let srv = BinServer::spawn(&cfg, "info");
    let proxy = srv.proxy_addr;

    a.api.set_api_fault(Some(ApiFault::RateLimited {
        status: 429,
        retry_after: Some(2),
        times: Some(1),
    }));
    let started = std::time::Instant::now();
    let send = |key: String, path: &'static str| {
        tokio::spawn(async move {
            client()
                .get(url(proxy, path))
                .header(HDR, key)
                .send()
                .await
                .expect("send")
                .status()
        })
    };
    let first = send(key, "/acme/v1/first");
    a.api.wait_for_requests(1).await;
    // Recorded before it is answered: give credproxy the 429 first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another session of the same provider, while it is held.
    let second = send(other, "/acme/v1/second");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        a.api.requests().len(),
        1,
        "nothing reaches the provider before its Retry-After"
    );
    assert_eq!(first.await.expect("join"), 200, "sent again when safe");
    assert_eq!(second.await.expect("join"), 200);
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(a.api.requests().len(), 3);
}

// --- kind = "oauth2": connect -----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_are_sent_space_separated_on_connect() {
    let a = Acme::start(OAuth2::default()).await;
    let cfg = a.write(&a.oauth2_table(r#"scopes = ["listings.read", "offline_access"]"#));
    let srv = BinServer::spawn(&cfg, "info");
    let c = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");

    let r = c
        .get(url(srv.admin_addr, "/connect/acme"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 302);
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned);
    let location = r.headers()["location"].to_str().expect("ascii").to_owned();
    assert!(location.starts_with(&a.api.authorize_url()), "{location}");
    let q: HashMap<String, String> = url::Url::parse(&location)
        .expect("url")
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], a.api.options().client_id);
    assert_eq!(q["scope"], "listings.read offline_access");

    // The provider's page gets them so.
    let page = c.get(&location).send().await.expect("send");
    assert_eq!(page.status(), 200);
    assert_eq!(
        a.api.last_authorize_scope().as_deref(),
        Some("listings.read offline_access")
    );

    // The callback exchanges the code and shows a key that works.
    let code = a.api.issue_code();
    let mut callback = c.get(url(
        srv.admin_addr,
        &format!(
            "/callback/acme?code={code}&state={}",
            url::form_urlencoded::byte_serialize(q["state"].as_bytes()).collect::<String>()
        ),
    ));
    if let Some(cookie) = &cookie {
        callback = callback.header("cookie", cookie);
    }
    let r = callback.send().await.expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(a.api.codes_redeemed(), 1);
    let html = r.text().await.expect("html");
    let at = html
        .find("id=\"session-key\"")
        .expect("the key on the page");
    let rest = &html[at..];
    let key = &rest[rest.find('>').expect(">") + 1..rest.find("</textarea>").expect("end")];
    assert_eq!(get(&srv, "/acme/v1/x", &[(HDR, key)]).await.status(), 200);
}

// --- kind = "oauth2": where a caller's key and values go --------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_key_in_the_injected_bearer_header() {
    let a = Acme::start(OAuth2::default()).await;
    let cfg = a.write(&a.oauth2_table(""));
    let t = a.api.issue_tokens();
    let (_, key) = add(&cfg, "acme", &t, None);
    let srv = BinServer::spawn(&cfg, "info");

    let r = get(&srv, "/acme/v1/x", &[("Authorization", &bearer(&key))]).await;
    assert_eq!(r.status(), 200);
    let rec = a.api.last_request().expect("recorded");
    assert_eq!(
        rec.header_all("authorization"),
        vec![bearer(&t.access_token).as_str()]
    );
    never_seen(&a.api, &key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_key_in_a_custom_header_written_as_its_template() {
    let a = Acme::start(OAuth2 {
        credential: Slot::header("X-Api-Token", "token {token}"),
        ..OAuth2::default()
    })
    .await;
    let cfg =
        a.write(&a.oauth2_table(r#"inject.headers = { X-Api-Token = "token {access_token}" }"#));
    let t = a.api.issue_tokens();
    let (_, key) = add(&cfg, "acme", &t, None);
    let srv = BinServer::spawn(&cfg, "info");

    let r = get(
        &srv,
        "/acme/v1/x",
        &[("X-Api-Token", &format!("token {key}"))],
    )
    .await;
    assert_eq!(r.status(), 200);
    let rec = a.api.last_request().expect("recorded");
    assert_eq!(
        rec.header_all("x-api-token"),
        vec![format!("token {}", t.access_token).as_str()]
    );
    never_seen(&a.api, &key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_key_in_the_injected_query_parameter() {
    let a = Acme::start(OAuth2 {
        credential: Slot::query("access_token"),
        ..OAuth2::default()
    })
    .await;
    let cfg = a.write(&a.oauth2_table(r#"inject.query = { access_token = "{access_token}" }"#));
    let t = a.api.issue_tokens();
    let (_, key) = add(&cfg, "acme", &t, None);
    let srv = BinServer::spawn(&cfg, "info");

    let r = get(&srv, &format!("/acme/v1/x?a=1&access_token={key}&b=2"), &[]).await;
    assert_eq!(r.status(), 200);
    let rec = a.api.last_request().expect("recorded");
    let q = pairs(rec.query.as_deref());
    let others: Vec<_> = q.iter().filter(|(n, _)| n != "access_token").collect();
    assert_eq!(
        others,
        vec![
            &("a".to_owned(), "1".to_owned()),
            &("b".to_owned(), "2".to_owned())
        ]
    );
    assert_eq!(
        values(rec.query.as_deref(), "access_token"),
        vec![t.access_token.clone()]
    );
    never_seen(&a.api, &key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_own_injected_header_never_reaches_the_upstream() {
    let a = Acme::start(OAuth2 {
        credential: Slot::header("X-Api-Token", "token {token}"),
        ..OAuth2::default()
    })
    .await;
    let cfg =
        a.write(&a.oauth2_table(r#"inject.headers = { X-Api-Token = "token {access_token}" }"#));
    let t = a.api.issue_tokens();
    let (_, key) = add(&cfg, "acme", &t, None);
    let srv = BinServer::spawn(&cfg, "info");

    for mine in ["token mine-123", "mine-123", ""] {
        let r = get(&srv, "/acme/v1/x", &[(HDR, &key), ("x-API-token", mine)]).await;
        assert_eq!(r.status(), 200, "{mine:?}");
        let rec = a.api.last_request().expect("recorded");
        assert_eq!(
            rec.header_all("x-api-token"),
            vec![format!("token {}", t.access_token).as_str()],
            "{mine:?}"
        );
    }
    never_seen(&a.api, "mine-123");
    never_seen(&a.api, &key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_own_injected_query_parameter_never_reaches_the_upstream() {
    let a = Acme::start(OAuth2 {
        credential: Slot::query("access_token"),
        ..OAuth2::default()
    })
    .await;
    let cfg = a.write(&a.oauth2_table(r#"inject.query = { access_token = "{access_token}" }"#));
    let t = a.api.issue_tokens();
    let (_, key) = add(&cfg, "acme", &t, None);
    let srv = BinServer::spawn(&cfg, "info");

    for query in [
        "access_token=mine-123&x=1",
        "x=1&access_token=mine-123&access_token=mine-123",
    ] {
        let r = get(&srv, &format!("/acme/v1/x?{query}"), &[(HDR, &key)]).await;
        assert_eq!(r.status(), 200, "{query}");
        let rec = a.api.last_request().expect("recorded");
        assert_eq!(
            values(rec.query.as_deref(), "access_token"),
            vec![t.access_token.clone()],
            "{query}"
        );
        assert_eq!(values(rec.query.as_deref(), "x"), vec!["1".to_owned()]);
    }
    // The name in disguise: refused (as Zillow's are), or the caller's value
    // dropped; never passed on.
    let r = get(
        &srv,
        "/acme/v1/x?x=1&access%5Ftoken=mine-123",
        &[(HDR, &key)],
    )
    .await;
    match r.status().as_u16() {
        400 => assert_eq!(error_code(&r).as_deref(), Some("bad_request")),
        status => assert_eq!(status, 200),
    }
    never_seen(&a.api, "mine-123");
    never_seen(&a.api, &key);
}

// --- kind = "oauth2": tables refused at start-up ----------------------------

/// `credproxy check` on the world's config with `table` as the acme table.
fn check(a: &Acme, table: &str) -> std::process::Output {
    let path = a.w.path("providers.toml");
    std::fs::write(&path, a.text(table)).expect("write");
    Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .output()
        .expect("run credproxy check")
}

/// `check` refuses `lines` in the acme table, and its message names `key`.
fn refused(a: &Acme, lines: &str, key: &str) {
    let out = check(a, &a.oauth2_table(lines));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{lines}: {stderr}");
    assert!(
        stderr.contains(key),
        "{lines}: the message names {key}: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_table_passes_check() {
    let a = Acme::start(OAuth2::default()).await;
    for lines in [
        "",
        r#"inject.headers = { X-Api-Token = "token {access_token}", X-Client-Id = "{client_id}" }"#,
        r#"inject.query = { access_token = "{access_token}", client_id = "{client_id}" }"#,
        "expired = { status = 401, json_code = \"token_expired\" }\nthrottled = { status = [429, 503] }",
        "scopes = [\"a\", \"b\"]\ngrant_body = \"json\"\nclient_auth = \"body\"",
    ] {
        let out = check(&a, &a.oauth2_table(lines));
        assert!(
            out.status.success(),
            "{lines}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = check(
        &a,
        &a.static_table("acmekey", r#"inject.query = { key = "{access_token}" }"#),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_placeholder_is_refused_naming_the_key() {
    let a = Acme::start(OAuth2::default()).await;
    refused(
        &a,
        r#"inject.headers = { Authorization = "Bearer {acces_token}" }"#,
        "providers.acme.inject.headers.Authorization",
    );
    refused(
        &a,
        r#"inject.query = { access_token = "{access_token}", client = "{client}" }"#,
        "providers.acme.inject.query.client",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_that_inject_no_access_token_are_refused() {
    let a = Acme::start(OAuth2::default()).await;
    refused(
        &a,
        r#"inject.headers = { X-Client-Id = "{client_id}" }"#,
        "providers.acme.inject",
    );
    refused(
        &a,
        r#"inject.query = { client_id = "{client_id}" }"#,
        "providers.acme.inject",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_names_a_caller_could_override_are_refused() {
    let a = Acme::start(OAuth2::default()).await;
    for name in ["tok[0]", "tok%5F", "a+b", "a b", "a=b"] {
        refused(
            &a,
            &format!("inject.query = {{ \"{name}\" = \"{{access_token}}\" }}"),
            "providers.acme.inject.query",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_status_that_is_2xx_is_refused() {
    let a = Acme::start(OAuth2::default()).await;
    for status in [200, 204, 299] {
        refused(
            &a,
            &format!("expired = {{ status = {status} }}"),
            "providers.acme.expired",
        );
    }
}

// --- kind = "static" ----------------------------------------------------------

/// An acme stand-in with a static key, a `static` provider `acmekey` for it,
/// and a session holding the key; (world, config, session id, session key).
async fn static_world() -> (Acme, PathBuf, String, String) {
    let a = Acme::start(OAuth2 {
        static_key: Some("acme-static-KEY-4f1c".into()),
        ..OAuth2::default()
    })
    .await;
    let cfg = a.write(&a.static_table(
        "acmekey",
        r#"inject.headers = { Authorization = "Bearer {access_token}" }"#,
    ));
    let (id, key) = add_static(&cfg, "acmekey", "acme-static-KEY-4f1c");
    (a, cfg, id, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_key_is_stored_injected_and_never_refreshed() {
    let (a, cfg, id, key) = static_world().await;
    let srv = BinServer::spawn(&cfg, "info");

    let r = get(&srv, "/acmekey/v1/x", &[(HDR, &key)]).await;
    assert_eq!(r.status(), 200);
    let rec = a.api.last_request().expect("recorded");
    assert_eq!(
        rec.header_all("authorization"),
        vec!["Bearer acme-static-KEY-4f1c"]
    );
    never_seen(&a.api, &key);
    assert_eq!(a.api.token_calls(), 0);

    let out = run_cli(&cfg, &["session", "list", "--json"]);
    assert!(out.status.success());
    let list: Value = serde_json::from_slice(&out.stdout).expect("json");
    let s = list
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["id"] == id.as_str())
        .expect("the static session is listed");
    assert_eq!(s["provider"], "acmekey");
    assert_eq!(s["status"], "active");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("acme-static-KEY-4f1c"), "no key in the list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_401_on_a_static_session_goes_back_as_it_came_and_its_health_says_so() {
    let (a, cfg, id, key) = static_world().await;
    let srv = BinServer::spawn(&cfg, "info");
    assert_eq!(
        get(&srv, "/acmekey/v1/x", &[(HDR, &key)]).await.status(),
        200
    );

    a.api.revoke_static_key();
    a.api.clear_requests();
    let r = get(&srv, "/acmekey/v1/y", &[(HDR, &key)]).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        error_code(&r),
        None,
        "the upstream's answer, not credproxy's"
    );
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    assert_eq!(upstream_code(r).await, "invalid_token");
    assert_eq!(a.api.requests().len(), 1, "not replayed");
    assert_eq!(a.api.token_calls(), 0, "never refreshed");

    // The running server says so, and so does the store (soon after).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let admin: Value = client()
            .get(url(srv.admin_addr, &format!("/admin/sessions/{id}")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        let out = run_cli(&cfg, &["session", "list", "--json"]);
        let list: Value = serde_json::from_slice(&out.stdout).expect("json");
        let listed = list
            .as_array()
            .expect("array")
            .iter()
            .find(|s| s["id"] == id.as_str())
            .map(|s| s["status"].clone())
            .expect("listed");
        if admin["status"] == static_refused_status() && listed == static_refused_status() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the session's health does not say so: admin {admin}, session list {listed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
