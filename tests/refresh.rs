//! The token lifecycle against stand-ins with strict refresh-token rotation:
//! proactive and reactive refresh, replay, single flight, failures and
//! back-off, invalid_grant, refresh now, refresh-ahead, and restarts.

mod support;

use std::time::Duration;

use credproxy_standins::TokenMode;
use support::{
    add_session, client, error_code, run_cli, url, BinServer, Extra, World, ADMIN_TOKEN,
};

const HDR: &str = "X-Credproxy-Session";

async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("timed out waiting for an event")
}

#[tokio::test]
async fn proactive_refresh_before_expiry() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    // A token 30 s from expiry is inside the default 60 s margin.
    let t = w.spark.issue_tokens();
    let key = support::add_tokens(&srv, "spark", &t, Some(30)).await.1;
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/a"))
        .header(HDR, &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(w.spark.grant_count(), 1);
    let reqs = w.spark.requests();
    assert_eq!(
        reqs.len(),
        1,
        "refreshed before sending: the upstream saw one request"
    );
    assert_ne!(
        reqs[0].header("authorization"),
        Some(format!("OAuth {}", t.access_token).as_str())
    );
    // Now valid for a day: no further refresh.
    client()
        .get(url(srv.proxy_addr, "/spark/v1/b"))
        .header(HDR, &key)
        .send()
        .await
        .expect("send");
    assert_eq!(w.spark.grant_count(), 1);
    assert_eq!(
        w.spark.last_redirect_uri().as_deref(),
        Some(format!("http://{}/callback/spark", "127.0.0.1:0").as_str()),
        "redirect_uri defaults to {{public_url}}/callback/{{provider}}"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn reactive_refresh_and_replay_for_both_providers() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, spark_key, _) = add_session(&srv, "spark", &w.spark).await;
    let (_, zillow_key, _) = add_session(&srv, "zillow", &w.zillow).await;
    w.spark.expire_access_tokens();
    w.zillow.expire_access_tokens();

    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/a"))
        .header(HDR, &spark_key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let reqs = w.spark.requests();
    assert_eq!(reqs.len(), 2, "the 401, then the replay");
    assert_ne!(
        reqs[0].header("authorization"),
        reqs[1].header("authorization")
    );
    assert_eq!(w.spark.grant_count(), 1);

    // Zillow: form body, HTTP Basic, no expires_in: reactive only.
    let r = client()
        .get(url(
            srv.proxy_addr,
            &format!("/zillow/v1/feed?accessToken={zillow_key}&x=1"),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(w.zillow.grant_count(), 1);
    let list = srv.sessions.list().await.expect("list");
    let z = list
        .iter()
        .find(|s| s.provider == "zillow")
        .expect("zillow");
    assert!(z.expires_at.is_none() && z.last_refresh_at.is_some());
    srv.shutdown().await;
}

#[tokio::test]
async fn replayed_post_body_arrives_byte_identical() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    w.spark.expire_access_tokens();
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let r = client()
        .post(url(srv.proxy_addr, "/spark/upload"))
        .header(HDR, &key)
        .body(body.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let reqs = w.spark.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].body_sha256, reqs[1].body_sha256);
    assert_eq!(reqs[1].body_len, body.len() as u64);

    // A chunked body (no Content-Length) under the limit is kept and replayed too.
    w.spark.expire_access_tokens();
    w.spark.clear_requests();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..10).map(|i| Ok(vec![i as u8; 1000])).collect();
    let r = client()
        .post(url(srv.proxy_addr, "/spark/upload"))
        .header(HDR, &key)
        .body(reqwest::Body::wrap_stream(tokio_stream::iter(chunks)))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let reqs = w.spark.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].body_len, 10_000);
    assert_eq!(reqs[0].body_sha256, reqs[1].body_sha256);
    srv.shutdown().await;
}

#[tokio::test]
async fn large_body_is_streamed_and_its_401_passes_through() {
    let w = World::new().await;
    let extra = Extra {
        spark: "max_replay_body = 1000".into(),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    w.spark.expire_access_tokens();
    let calls = w.spark.token_calls();
    for body in [vec![7u8; 5000], vec![8u8; 1001]] {
        w.spark.expire_access_tokens();
        let r = client()
            .post(url(srv.proxy_addr, "/spark/upload"))
            .header(HDR, &key)
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(
            r.status(),
            401,
            "not replayable: the upstream's 401 as it is"
        );
        assert!(error_code(&r).is_none());
        let text = r.text().await.expect("text");
        assert!(text.contains("1020"), "{text}");
    }
    // The refresh still happened in the background, for the next request.
    within(10, w.spark.wait_for_token_calls(calls + 1)).await;
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/next"))
        .header(HDR, &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    srv.shutdown().await;
}

#[tokio::test]
async fn second_401_passes_through_after_one_refresh() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let r = client()
        .get(url(srv.proxy_addr, "/spark/status/401"))
        .header(HDR, &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    assert!(error_code(&r).is_none(), "the upstream's own answer");
    assert_eq!(w.spark.grant_count(), 1, "one refresh, one replay, no more");
    assert_eq!(w.spark.requests().len(), 2);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_requests_cause_one_refresh() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    w.spark.expire_access_tokens();
    // Hold the token endpoint until every request has met its 401, so all
    // hundred are waiting on the same refresh.
    w.spark.set_token_mode(TokenMode::Hang);
    let c = client();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..100 {
        let req = c
            .get(url(srv.proxy_addr, &format!("/spark/v1/n{i}")))
            .header(HDR, &key);
        set.spawn(async move { req.send().await.map(|r| r.status().as_u16()) });
    }
    within(20, w.spark.wait_for_requests(100)).await;
    within(20, w.spark.wait_for_token_calls(1)).await;
    w.spark.set_token_mode(TokenMode::Normal);
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        assert_eq!(r.expect("join").expect("send"), 200);
        ok += 1;
    }
    assert_eq!(ok, 100);
    assert_eq!(
        w.spark.token_calls(),
        1,
        "exactly one call to the token endpoint"
    );
    assert_eq!(w.spark.grant_count(), 1);
    srv.shutdown().await;
}

#[tokio::test]
async fn invalid_grant_marks_the_session_until_its_tokens_are_replaced() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let t = w.spark.issue_tokens();
    let added = support::cli_add(&cfg, "spark", &t);
    let key = added["session_key"].as_str().expect("key").to_owned();
    let id = added["id"].as_str().expect("id").to_owned();
    let srv = w.start(&Extra::default()).await;
    w.spark.expire_access_tokens();
    w.spark.set_token_mode(TokenMode::InvalidGrant);
    let get = || {
        client()
            .get(url(srv.proxy_addr, "/spark/v1/x"))
            .header(HDR, &key)
            .send()
    };
    let r = get().await.expect("send");
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(&r).as_deref(), Some("reauthorization_required"));
    let calls = w.spark.token_calls();
    let upstream = w.spark.requests().len();
    let r = get().await.expect("send");
    assert_eq!(error_code(&r).as_deref(), Some("reauthorization_required"));
    assert_eq!(
        w.spark.token_calls(),
        calls,
        "no further call to the token endpoint"
    );
    assert_eq!(w.spark.requests().len(), upstream, "nor to the API");

    let out = run_cli(&cfg, &["session", "list"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.contains("reauthorization_required"), "{table}");

    // `session add --key` with new tokens brings it back, same id, same key.
    w.spark.set_token_mode(TokenMode::Normal);
    let fresh = w.spark.issue_tokens();
    let out = run_cli(
        &cfg,
        &[
            "session",
            "add",
            "--provider",
            "spark",
            "--access-token",
            &fresh.access_token,
            "--refresh-token",
            &fresh.refresh_token,
            "--key",
            &key,
            "--json",
        ],
    );
    assert!(out.status.success());
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(again["id"], id.as_str());
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let r = get().await.expect("send");
        if r.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replaced tokens not picked up within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_token_endpoint_leaves_the_session_intact_and_backs_off() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (id, key, _) = add_session(&srv, "spark", &w.spark).await;
    w.spark.expire_access_tokens();
    w.spark.set_token_mode(TokenMode::Fail500);
    let c = client();
    let r = c
        .get(url(srv.proxy_addr, "/spark/v1/x"))
        .header(HDR, &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(&r).as_deref(), Some("token_refresh_failed"));
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(w.spark.token_calls(), 1);

    // Callers during the back-off share the failure; none calls the endpoint.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let req = c.get(url(srv.proxy_addr, "/spark/v1/y")).header(HDR, &key);
        set.spawn(async move { req.send().await.map(|r| r.status().as_u16()) });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.expect("join").expect("send"), 503);
    }
    assert_eq!(w.spark.token_calls(), 1, "back-off: no new call");
    let info = srv.sessions.info(&id).await.expect("info").expect("exists");
    assert_eq!(
        (info.status, info.last_error.as_deref()),
        (
            credproxy::secrets::session::Status::RefreshFailing,
            Some("token_endpoint_error")
        ),
        "session intact, its health shown"
    );
    assert!(info.next_retry_at.is_some());

    // Once the endpoint recovers and the back-off has passed, it works.
    w.spark.set_token_mode(TokenMode::Normal);
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let r = c
        .get(url(srv.proxy_addr, "/spark/v1/z"))
        .header(HDR, &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(w.spark.grant_count(), 1);
    srv.shutdown().await;
}

#[tokio::test]
async fn unreachable_or_hanging_token_endpoint_is_a_503() {
    let w = World::new().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let extra = Extra {
        spark: "token_timeout = \"500ms\"".into(),
        ..Extra::default()
    };
    let text = w
        .config_text(&extra)
        .replace(&w.zillow.token_url(), &format!("http://{dead}/oauth/token"));
    let cfg = credproxy::config::Config::parse(&text, std::path::Path::new("t"), |_| None)
        .expect("config");
    let srv = credproxy::server::start(cfg).await.expect("start");
    let (_, spark_key, _) = add_session(&srv, "spark", &w.spark).await;
    let (zid, zillow_key, _) = add_session(&srv, "zillow", &w.zillow).await;

    w.zillow.expire_access_tokens();
    let r = client()
        .get(url(
            srv.proxy_addr,
            &format!("/zillow/v1?accessToken={zillow_key}"),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(&r).as_deref(), Some("token_refresh_failed"));
    assert!(r.headers().contains_key("retry-after"));
    let info = srv
        .sessions
        .info(&zid)
        .await
        .expect("info")
        .expect("exists");
    assert_eq!(
        (info.status, info.last_error.as_deref()),
        (
            credproxy::secrets::session::Status::RefreshFailing,
            Some("token_endpoint_unreachable")
        )
    );

    w.spark.expire_access_tokens();
    w.spark.set_token_mode(TokenMode::Hang);
    let started = std::time::Instant::now();
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1"))
        .header(HDR, &spark_key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(&r).as_deref(), Some("token_refresh_failed"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "token_timeout applies"
    );
    let spark = srv.sessions.list().await.expect("list");
    let spark = spark.iter().find(|s| s.provider == "spark").expect("spark");
    assert_eq!(spark.last_error.as_deref(), Some("token_endpoint_timeout"));
    w.spark.set_token_mode(TokenMode::Normal);
    srv.shutdown().await;
}

// Multi-threaded: the CLI runs blocking while the in-process stand-in answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_now_from_cli_and_admin_api_with_metrics() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let t = w.zillow.issue_tokens();
    let added = support::cli_add(&cfg, "zillow", &t);
    let id = added["id"].as_str().expect("id").to_owned();
    let key = added["session_key"].as_str().expect("key").to_owned();

    // The CLI, with no server running.
    let out = run_cli(&cfg, &["session", "refresh", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("refreshed"));
    assert_eq!(w.zillow.grant_count(), 1);
    let out = run_cli(&cfg, &["session", "refresh", "s_nope"]);
    assert_eq!(out.status.code(), Some(1));

    // The admin API, against the running server.
    let srv = BinServer::spawn(&cfg, "info");
    let c = client();
    let post = |id: &str| {
        c.post(url(
            srv.admin_addr,
            &format!("/admin/sessions/{id}/refresh"),
        ))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
    };
    let r = post(&id).await.expect("send");
    assert_eq!(r.status(), 200);
    let info: serde_json::Value = r.json().await.expect("json");
    assert_eq!(info["id"], id.as_str());
    assert!(info["last_refresh_at"].is_string());
    assert_eq!(w.zillow.grant_count(), 2);
    assert_eq!(post("s_nope").await.expect("send").status(), 404);
    // The session works with the twice-rotated tokens.
    let r = c
        .get(url(
            srv.proxy_addr,
            &format!("/zillow/v1?accessToken={key}"),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    // A refused refresh and a failed one are counted too.
    w.zillow.set_token_mode(TokenMode::Fail500);
    let r = post(&id).await.expect("send");
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    w.zillow.set_token_mode(TokenMode::InvalidGrant);
    let (id2, _, _) = {
        let t = w.zillow.issue_tokens();
        let v = support::cli_add(&cfg, "zillow", &t);
        (v["id"].as_str().expect("id").to_owned(), (), ())
    };
    let r = post(&id2).await.expect("send");
    assert_eq!(r.status(), 409);
    assert_eq!(
        r.json::<serde_json::Value>().await.expect("json")["error"]["code"],
        "reauthorization_required"
    );
    let metrics = c
        .get(url(srv.admin_addr, "/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    for line in [
        r#"credproxy_refreshes_total{provider="zillow",outcome="ok"} 1"#,
        r#"credproxy_refreshes_total{provider="zillow",outcome="failed"} 1"#,
        r#"credproxy_refreshes_total{provider="zillow",outcome="invalid_grant"} 1"#,
        r#"credproxy_refresh_latency_seconds_count{provider="zillow"} 3"#,
        r#"credproxy_sessions{provider="zillow",status="reauthorization_required"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_refresh_while_the_server_refreshes_never_reuses_a_refresh_token() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let t = w.spark.issue_tokens();
    let added = support::cli_add(&cfg, "spark", &t);
    let id = added["id"].as_str().expect("id").to_owned();
    let key = added["session_key"].as_str().expect("key").to_owned();
    let srv = BinServer::spawn(&cfg, "info");

    // The CLI starts a refresh and holds the store's lease while the token
    // endpoint hangs; the server, meeting a 401 meanwhile, must wait for
    // the CLI's result instead of spending the same refresh token.
    w.spark.set_token_mode(TokenMode::Hang);
    let cfg2 = cfg.clone();
    let id2 = id.clone();
    let cli = tokio::task::spawn_blocking(move || run_cli(&cfg2, &["session", "refresh", &id2]));
    within(10, w.spark.wait_for_token_calls(1)).await;
    w.spark.expire_access_tokens();
    let in_flight = tokio::spawn(
        client()
            .get(url(srv.proxy_addr, "/spark/v1/x"))
            .header(HDR, &key)
            .send(),
    );
    // The server has met its 401 once the stand-in has recorded the request.
    within(10, w.spark.wait_for_requests(1)).await;
    w.spark.set_token_mode(TokenMode::Normal);
    let out = cli.await.expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = in_flight.await.expect("join").expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(
        w.spark.reused_refresh_tokens(),
        0,
        "no refresh token spent twice"
    );
    assert_eq!(w.spark.grant_count(), 1, "the server used the CLI's result");
    assert_eq!(w.spark.token_calls(), 1);
    // A second CLI refresh now really refreshes, with the rotated token.
    let out = run_cli(&cfg, &["session", "refresh", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(w.spark.grant_count(), 2);
    assert_eq!(w.spark.reused_refresh_tokens(), 0);
}

#[tokio::test]
async fn rotation_survives_a_restart() {
    let w = World::new().await;
    let first = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&first, "zillow", &w.zillow).await;
    for round in 1..=3 {
        let srv = if round == 1 {
            None
        } else {
            Some(w.start(&Extra::default()).await)
        };
        let addr = srv.as_ref().map_or(first.proxy_addr, |s| s.proxy_addr);
        w.zillow.expire_access_tokens();
        let r = client()
            .get(url(addr, &format!("/zillow/v1?accessToken={key}")))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "round {round}");
        assert_eq!(w.zillow.grant_count(), round);
        if let Some(s) = srv {
            s.shutdown().await;
        }
    }
    assert_eq!(w.zillow.reused_refresh_tokens(), 0);
    first.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_refreshes_recently_used_sessions_in_the_background() {
    let w = World::new().await;
    let extra = Extra {
        spark: "refresh_ahead = true\nrefresh_margin = 2".into(),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let t = w.spark.issue_tokens();
    let key = support::add_tokens(&srv, "spark", &t, Some(3)).await.1;
    // Used once: 3 s left is outside the 2 s margin, so no refresh in the request.
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/a"))
        .header(HDR, &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(w.spark.token_calls(), 0);
    // The background task refreshes it before it comes due.
    within(10, w.spark.wait_for_token_calls(1)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while w.spark.grant_count() == 0 {
        assert!(std::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let calls = w.spark.token_calls();
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/b"))
        .header(HDR, &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(
        w.spark.token_calls(),
        calls,
        "the request did not wait on the token endpoint"
    );
    assert_ne!(
        w.spark.last_request().expect("rec").header("authorization"),
        Some(format!("OAuth {}", t.access_token).as_str())
    );
    srv.shutdown().await;
}

/// The generated config with the contract's default guard interval (the
/// test config sets 0 so unrelated tests never meet the guard).
fn guarded_config(w: &World, store_url: Option<String>) -> credproxy::config::Config {
    let extra = Extra {
        store_url,
        ..Extra::default()
    };
    let text = w
        .config_text(&extra)
        .replace("min_refresh_interval = 0", "min_refresh_interval = 30");
    credproxy::config::Config::parse(&text, std::path::Path::new("t"), |_| None).expect("config")
}

#[tokio::test]
async fn a_401_that_a_refresh_does_not_cure_costs_one_rotation() {
    let w = World::new().await;
    let srv = credproxy::server::start(guarded_config(&w, None))
        .await
        .expect("start");
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let get = |path: &'static str| {
        client()
            .get(url(srv.proxy_addr, path))
            .header(HDR, &key)
            .send()
    };
    // An upstream that refuses whatever the token (Spark's 1010 disabled key).
    let r = get("/spark/status/401").await.expect("send");
    assert_eq!(r.status(), 401);
    assert!(error_code(&r).is_none(), "the upstream's own answer");
    assert_eq!(w.spark.grant_count(), 1, "one refresh, replayed once");
    assert_eq!(w.spark.requests().len(), 2);
    for _ in 0..5 {
        let r = get("/spark/status/401").await.expect("send");
        assert_eq!(r.status(), 401);
    }
    assert_eq!(w.spark.grant_count(), 1, "no rotation per request");
    assert_eq!(w.spark.requests().len(), 7, "and no replays");
    // An accepted request lifts the guard: the next refusal is refreshed again.
    assert_eq!(get("/spark/v1/a").await.expect("send").status(), 200);
    assert_eq!(get("/spark/status/401").await.expect("send").status(), 401);
    assert_eq!(w.spark.grant_count(), 2);
    srv.shutdown().await;
}

/// Tokens that expire right after each refresh: every request is still
/// answered 200, however soon after the last refresh it comes.
async fn expire_right_after_refreshes(
    w: &World,
    srv: &credproxy::server::Running,
    key: &str,
    provider: &str,
    rounds: u64,
    grants_before: u64,
) {
    let standin = if provider == "spark" {
        &w.spark
    } else {
        &w.zillow
    };
    for i in 1..=rounds {
        standin.expire_access_tokens();
        let r = if provider == "spark" {
            client()
                .get(url(srv.proxy_addr, "/spark/v1/listings"))
                .header(HDR, key)
                .send()
                .await
        } else {
            client()
                .get(url(
                    srv.proxy_addr,
                    &format!("/zillow/v1/feeds?accessToken={key}"),
                ))
                .send()
                .await
        }
        .expect("send");
        assert_eq!(r.status(), 200, "{provider}: round {i}");
        assert_eq!(
            standin.grant_count(),
            grants_before + i,
            "{provider}: one rotation per expiry"
        );
    }
    assert_eq!(standin.reused_refresh_tokens(), 0);
}

#[tokio::test]
async fn repeated_expiry_right_after_refreshes_is_always_cured() {
    let w = World::new().await;
    let cfg = guarded_config(&w, None);
    let srv = credproxy::server::start(cfg.clone()).await.expect("start");
    let (_, spark_key, _) = add_session(&srv, "spark", &w.spark).await;
    // Zillow's tokens carry no lifetime and rotate nothing but the access token.
    let (_, zillow_key, _) = add_session(&srv, "zillow", &w.zillow).await;
    expire_right_after_refreshes(&w, &srv, &spark_key, "spark", 4, 0).await;
    expire_right_after_refreshes(&w, &srv, &zillow_key, "zillow", 4, 0).await;
    srv.shutdown().await;
    // After a restart the last refresh is seconds old: still cured.
    let srv = credproxy::server::start(cfg).await.expect("restart");
    expire_right_after_refreshes(&w, &srv, &spark_key, "spark", 2, 4).await;
    expire_right_after_refreshes(&w, &srv, &zillow_key, "zillow", 2, 4).await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_mid_refresh_does_not_lose_the_rotation() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "zillow", &w.zillow).await;
    w.zillow.expire_access_tokens();
    w.zillow.set_token_mode(TokenMode::Hang);
    // A client that gives up while the token endpoint is still thinking.
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("client");
    let u = url(srv.proxy_addr, &format!("/zillow/v1?accessToken={key}"));
    let gave_up = tokio::spawn(async move { impatient.get(u).send().await.is_err() });
    within(10, w.zillow.wait_for_token_calls(1)).await;
    assert!(gave_up.await.expect("join"), "the client hung up");
    // The provider answers after the caller left: the rotation must still be stored.
    w.zillow.set_token_mode(TokenMode::Normal);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while w.zillow.grant_count() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the refresh was abandoned"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The next request finds the new tokens; the old refresh token is never reused.
    let r = client()
        .get(url(
            srv.proxy_addr,
            &format!("/zillow/v1?accessToken={key}"),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(w.zillow.grant_count(), 1);
    assert_eq!(w.zillow.reused_refresh_tokens(), 0);
    srv.shutdown().await;
}
