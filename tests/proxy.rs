//! The proxied request path, end to end against the stand-ins: routing, the
//! four ways of presenting a key, injection, streaming and error mapping.

mod support;

use std::time::Duration;

use support::{add_session, client, error_code, url, Extra, World};

#[tokio::test]
async fn spark_request_gets_oauth_header_and_user_agent() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, tokens) = add_session(&srv, "spark", &w.spark).await;

    let resp = client()
        .get(url(
            srv.proxy_addr,
            "/spark/v1/listings?_limit=1&_filter=City%20Eq%20%27Fargo%27",
        ))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-standin"], "spark");
    let got = w.spark.last_request().expect("recorded");
    assert_eq!(got.path, "/v1/listings");
    assert_eq!(
        got.query.as_deref(),
        Some("_limit=1&_filter=City%20Eq%20%27Fargo%27")
    );
    assert_eq!(
        got.header("authorization"),
        Some(format!("OAuth {}", tokens.access_token).as_str())
    );
    assert_eq!(
        got.header("x-sparkapi-user-agent"),
        Some("credproxy-tests/1.0")
    );
    assert_eq!(
        got.header("host"),
        Some(w.spark.addr().to_string().as_str())
    );
    assert!(
        got.header("x-credproxy-session").is_none(),
        "the key never reaches the upstream"
    );
    assert!(got.headers.iter().all(|(_, v)| !v.contains(&key)));
    srv.shutdown().await;
}

#[tokio::test]
async fn caller_user_agent_is_kept() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let resp = client()
        .get(url(srv.proxy_addr, "/spark/v1/system"))
        .header("X-Credproxy-Session", &key)
        .header("X-SparkApi-User-Agent", "Legacy/2.3")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let got = w.spark.last_request().expect("recorded");
    assert_eq!(got.header_all("x-sparkapi-user-agent"), vec!["Legacy/2.3"]);
    srv.shutdown().await;
}

#[tokio::test]
async fn key_in_every_slot_in_contract_order() {
    let w = World::new().await;
    let extra = Extra::default();
    let srv = w.start(&extra).await;
    let (_, spark_key, spark_tokens) = add_session(&srv, "spark", &w.spark).await;
    let (_, other_key, other_tokens) = add_session(&srv, "spark", &w.spark).await;
    let c = client();
    let oauth = |t: &str| format!("OAuth {t}");

    // 1. session header wins over everything else.
    let r = c
        .get(url(srv.proxy_addr, "/spark/v1/a"))
        .header("X-Credproxy-Session", &spark_key)
        .header("Proxy-Authorization", format!("Bearer {other_key}"))
        .header("Authorization", format!("OAuth {other_key}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let got = w.spark.last_request().expect("rec");
    assert_eq!(
        got.header("authorization"),
        Some(oauth(&spark_tokens.access_token).as_str())
    );
    assert!(got.header("proxy-authorization").is_none());

    // 2. Proxy-Authorization: Bearer beats the provider slot.
    let r = c
        .get(url(srv.proxy_addr, "/spark/v1/b"))
        .header("Proxy-Authorization", format!("Bearer {other_key}"))
        .header("Authorization", format!("OAuth {spark_key}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let got = w.spark.last_request().expect("rec");
    assert_eq!(
        got.header("authorization"),
        Some(oauth(&other_tokens.access_token).as_str())
    );
    assert!(got.header("proxy-authorization").is_none());

    // 3. The provider's own slot, as a legacy application would use it.
    let r = c
        .get(url(srv.proxy_addr, "/spark/v1/c"))
        .header("Authorization", format!("OAuth {spark_key}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let got = w.spark.last_request().expect("rec");
    assert_eq!(
        got.header_all("authorization"),
        vec![oauth(&spark_tokens.access_token).as_str()]
    );

    // No key at all, no default session.
    let r = c
        .get(url(srv.proxy_addr, "/spark/v1/d"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(&r).as_deref(), Some("missing_session"));
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "missing_session");

    // An unknown key in an earlier slot is not rescued by a later one.
    let r = c
        .get(url(srv.proxy_addr, "/spark/v1/e"))
        .header("X-Credproxy-Session", "cpk_not-a-real-key-000000000")
        .header("Authorization", format!("OAuth {spark_key}"))
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(&r).as_deref(), Some("unknown_session"));
    assert_eq!(r.status(), 401);
    srv.shutdown().await;
}

#[tokio::test]
async fn default_session_is_used_without_a_key() {
    let w = World::new().await;
    // A first server creates the session whose id the second one names.
    let first = w.start(&Extra::default()).await;
    let (id, _, tokens) = add_session(&first, "spark", &w.spark).await;
    first.shutdown().await;
    let extra = Extra {
        spark: format!("default_session = \"{id}\""),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/x"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let got = w.spark.last_request().expect("rec");
    assert_eq!(
        got.header("authorization"),
        Some(format!("OAuth {}", tokens.access_token).as_str())
    );
    // Zillow has no default: still a missing session.
    let r = client()
        .get(url(srv.proxy_addr, "/zillow/x"))
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(&r).as_deref(), Some("missing_session"));
    // A page in a browser must not ride on the default session (CSRF).
    let before = w.spark.requests().len();
    for (name, value) in [
        ("origin", "http://attacker.example"),
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-site"),
    ] {
        let r = client()
            .post(url(srv.proxy_addr, "/spark/v1/x"))
            .header(name, value)
            .body("a=1")
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "{name}: {value}");
        assert_eq!(error_code(&r).as_deref(), Some("bad_request"));
    }
    assert_eq!(
        w.spark.requests().len(),
        before,
        "nothing reached the upstream"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn bearer_scheme_is_kept_for_reso() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, tokens) = add_session(&srv, "spark", &w.spark).await;
    let c = client();
    let r = c
        .get(url(srv.proxy_addr, "/spark/Reso/OData/Property?$top=1"))
        .header("Authorization", format!("Bearer {key}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let got = w.spark.last_request().expect("rec");
    assert_eq!(
        got.header("authorization"),
        Some(format!("Bearer {}", tokens.access_token).as_str())
    );
    assert_eq!(got.query.as_deref(), Some("$top=1"));
    // Key by header on the RESO path: Bearer, since RESO takes nothing else.
    c.get(url(srv.proxy_addr, "/spark/Reso/OData/Member"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    let got = w.spark.last_request().expect("rec");
    assert_eq!(
        got.header("authorization"),
        Some(format!("Bearer {}", tokens.access_token).as_str())
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn zillow_query_is_rewritten_byte_for_byte() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, tokens) = add_session(&srv, "zillow", &w.zillow).await;
    let z = w.zillow.options().clone();
    let odd = "b=2&x=%zz&clientId=evil&sp=a+b%20c&&apiKey=evil&last=%E2%82%AC";
    let r = client()
        .get(url(
            srv.proxy_addr,
            &format!("/zillow/listings/v1/listingsForUser?accessToken={key}&{odd}"),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let got = w.zillow.last_request().expect("rec");
    assert_eq!(got.path, "/listings/v1/listingsForUser");
    assert_eq!(
        got.query.as_deref(),
        Some(
            format!(
                "b=2&x=%zz&sp=a+b%20c&&last=%E2%82%AC&accessToken={}&clientId={}&apiKey={}",
                tokens.access_token, z.client_id, z.api_key
            )
            .as_str()
        )
    );
    // A caller's Authorization header never reaches Zillow (it may hold the key).
    client()
        .get(url(
            srv.proxy_addr,
            &format!("/zillow/v3?accessToken={key}"),
        ))
        .header("Authorization", format!("Bearer {key}"))
        .send()
        .await
        .expect("send");
    assert!(w
        .zillow
        .last_request()
        .expect("rec")
        .header("authorization")
        .is_none());
    // Key by header: a caller-sent accessToken is dropped, not forwarded.
    let r = client()
        .get(url(srv.proxy_addr, "/zillow/v2?accessToken=mine&q=1"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let got = w.zillow.last_request().expect("rec");
    assert!(got
        .query
        .as_deref()
        .expect("query")
        .starts_with("q=1&accessToken="));
    assert!(!got.query.as_deref().expect("query").contains("mine"));
    srv.shutdown().await;
}

#[tokio::test]
async fn keys_only_work_for_their_provider() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, spark_key, _) = add_session(&srv, "spark", &w.spark).await;
    let r = client()
        .get(url(srv.proxy_addr, "/zillow/x"))
        .header("X-Credproxy-Session", &spark_key)
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(&r).as_deref(), Some("unknown_session"));
    assert_eq!(w.zillow.requests().len(), 0);
    srv.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_foreign_hosts_are_refused() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let c = client();
    for path in [
        "/",
        "/nope/x",
        "/sparkx/v1",
        "/healthz",
        "/metrics",
        "/admin/sessions",
    ] {
        let r = c
            .get(url(srv.proxy_addr, path))
            .header("X-Credproxy-Session", &key)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(error_code(&r).as_deref(), Some("unknown_route"), "{path}");
    }
    // Absolute-form naming another host, and CONNECT: raw, since clients won't send these.
    let other = format!(
        "GET http://{}/spark/v1/x HTTP/1.1\r\nHost: {}\r\nX-Credproxy-Session: {key}\r\n\r\n",
        w.zillow.addr(),
        w.zillow.addr()
    );
    let resp = support::raw_request(srv.proxy_addr, other.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("bad_request"));
    let connect = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", w.spark.addr());
    let resp = support::raw_request(srv.proxy_addr, connect.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    // Dot segments (plain or encoded) and TRACE are refused.
    for line in [
        "GET /spark/../zillow/x",
        "GET /spark/v1/%2e%2e/x",
        "TRACE /spark/v1/x",
    ] {
        let req = format!(
            "{line} HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {key}\r\nConnection: close\r\n\r\n"
        );
        let resp = support::raw_request(srv.proxy_addr, req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{line}: {resp}");
    }
    assert!(w.spark.requests().is_empty() && w.zillow.requests().is_empty());
    // Absolute-form naming this proxy itself is fine.
    let own = format!(
        "GET http://{0}/spark/v1/own HTTP/1.1\r\nHost: {0}\r\nX-Credproxy-Session: {key}\r\nConnection: close\r\n\r\n",
        srv.proxy_addr
    );
    let resp = support::raw_request(srv.proxy_addr, own.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(w.spark.last_request().expect("rec").path, "/v1/own");
    srv.shutdown().await;
}

#[tokio::test]
async fn dedicated_listener_routes_without_prefix() {
    let w = World::new().await;
    let extra = Extra {
        zillow: "listen = \"127.0.0.1:0\"".into(),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let (_, key, _) = add_session(&srv, "zillow", &w.zillow).await;
    let (name, addr) = srv.provider_addrs[0].clone();
    assert_eq!(name, "zillow");
    let r = client()
        .get(url(addr, &format!("/listings/v1/feed?accessToken={key}")))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(
        w.zillow.last_request().expect("rec").path,
        "/listings/v1/feed"
    );
    // On that port, /spark/... is just a Zillow path.
    client()
        .get(url(addr, &format!("/spark/v1?accessToken={key}")))
        .send()
        .await
        .expect("send");
    assert_eq!(w.zillow.last_request().expect("rec").path, "/spark/v1");
    srv.shutdown().await;
}

#[tokio::test]
async fn post_body_and_status_headers_pass_through() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let body: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let r = client()
        .post(url(srv.proxy_addr, "/spark/upload"))
        .header("X-Credproxy-Session", &key)
        .header("Content-Type", "application/octet-stream")
        .body(body.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let answer: serde_json::Value = r.json().await.expect("json");
    assert_eq!(answer["len"], body.len());
    let got = w.spark.last_request().expect("rec");
    assert_eq!(got.body_sha256, sha256_hex(&body));

    // A chunked upload (unknown length) streams through too.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..50).map(|i| Ok(vec![i as u8; 3000])).collect();
    let r = client()
        .put(url(srv.proxy_addr, "/spark/upload"))
        .header("X-Credproxy-Session", &key)
        .body(reqwest::Body::wrap_stream(tokio_stream::iter(chunks)))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(w.spark.last_request().expect("rec").body_len, 150_000);

    // Upstream statuses and end-to-end headers come back unchanged; hop-by-hop ones do not.
    let r = client()
        .get(url(srv.proxy_addr, "/spark/status/418"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 418);
    assert!(
        error_code(&r).is_none(),
        "an upstream answer is not credproxy's"
    );
    let r = client()
        .get(url(srv.proxy_addr, "/spark/echo"))
        .header("X-Credproxy-Session", &key)
        .header("Connection", "x-client-hop")
        .header("X-Client-Hop", "1")
        .header("X-End-To-End", "kept")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("x-hop").is_none(),
        "named in the upstream's Connection"
    );
    assert!(r.headers().get("keep-alive").is_none());
    assert_eq!(r.headers()["x-standin"], "spark");
    let got = w.spark.last_request().expect("rec");
    assert!(got.header("x-client-hop").is_none());
    assert_eq!(got.header("x-end-to-end"), Some("kept"));
    srv.shutdown().await;
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[tokio::test]
async fn upstream_failures_map_to_contract_codes() {
    let w = World::new().await;
    // A port with nothing listening: bind, note, drop.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let extra = Extra {
        spark: "request_timeout = \"300ms\"\nmax_request_body = 1000".into(),
        zillow: String::new(),
        ..Extra::default()
    };
    let mut text = w.config_text(&extra);
    text = text.replace(&w.zillow.base_url(), &format!("http://{dead}"));
    let cfg = credproxy::config::Config::parse(&text, std::path::Path::new("t"), |_| None)
        .expect("config");
    let srv = credproxy::server::start(cfg).await.expect("start");
    let (_, spark_key, _) = add_session(&srv, "spark", &w.spark).await;
    let (_, zillow_key, _) = add_session(&srv, "zillow", &w.zillow).await;
    let c = client();

    let r = c
        .get(url(
            srv.proxy_addr,
            &format!("/zillow/x?accessToken={zillow_key}"),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(&r).as_deref(), Some("upstream_unreachable"));

    let r = c
        .get(url(srv.proxy_addr, "/spark/slow?ms=3000"))
        .header("X-Credproxy-Session", &spark_key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 504);
    assert_eq!(error_code(&r).as_deref(), Some("upstream_timeout"));

    let r = c
        .post(url(srv.proxy_addr, "/spark/upload"))
        .header("X-Credproxy-Session", &spark_key)
        .body(vec![0u8; 5000])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(&r).as_deref(), Some("body_too_large"));
    srv.shutdown().await;
}

#[tokio::test]
async fn revoked_key_stops_working_at_once() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (id, key, _) = add_session(&srv, "spark", &w.spark).await;
    let c = client();
    let get = || {
        c.get(url(srv.proxy_addr, "/spark/v1/x"))
            .header("X-Credproxy-Session", &key)
            .send()
    };
    assert_eq!(get().await.expect("send").status(), 200);
    assert!(srv.sessions.revoke(&id).await.expect("revoke"));
    let r = get().await.expect("send");
    assert_eq!(error_code(&r).as_deref(), Some("unknown_session"));
    srv.shutdown().await;
}

#[tokio::test]
async fn concurrent_requests_share_one_cached_session() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let c = client();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..100 {
        let c = c.clone();
        let key = key.clone();
        let u = url(srv.proxy_addr, &format!("/spark/v1/n{i}"));
        set.spawn(async move {
            c.get(u)
                .header("X-Credproxy-Session", key)
                .send()
                .await
                .map(|r| r.status())
        });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.expect("join").expect("send"), 200);
    }
    assert_eq!(w.spark.requests().len(), 100);
    tokio::time::timeout(Duration::from_secs(5), srv.shutdown())
        .await
        .expect("shutdown");
}

#[tokio::test]
async fn a_key_of_another_provider_is_told_so() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let resp = client()
        .get(url(srv.proxy_addr, "/zillow/v1/feeds"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 401);
    assert_eq!(error_code(&resp).as_deref(), Some("unknown_session"));
    let body: serde_json::Value = resp.json().await.expect("json");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("belongs to another provider"), "{message}");
    assert!(
        w.zillow.requests().is_empty(),
        "nothing reached the upstream"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn sessions_are_added_to_the_provider_that_owns_them() {
    let w = World::new().await;
    let srv = w
        .start(&Extra {
            zillow: "\n[providers.spark-two]\nkind = \"spark\"\napi_base = \"http://127.0.0.1:9\"\nsessions_from = \"spark\"\n".into(),
            ..Extra::default()
        })
        .await;
    let tokens = w.spark.issue_tokens();
    let err = srv
        .sessions
        .add(
            "spark-two",
            credproxy::tokens::sessions::NewTokens {
                access_token: secrecy::SecretString::from(tokens.access_token.clone()),
                refresh_token: None,
                expires_in: None,
            },
            None,
            None,
            credproxy::audit::Actor::Cli,
        )
        .await
        .expect_err("a provider with sessions_from has no sessions of its own");
    assert!(err.to_string().contains("sessions of `spark`"), "{err}");
    srv.shutdown().await;
}

/// Sends `line` (method and target) raw with the key in the session header.
async fn raw_with_key(addr: std::net::SocketAddr, line: &str, key: &str) -> String {
    let req = format!(
        "{line} HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {key}\r\nConnection: close\r\n\r\n"
    );
    support::raw_request(addr, req.as_bytes()).await
}

#[tokio::test]
async fn dot_segments_in_every_spelling_and_trace_in_any_case_are_refused() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    for line in [
        "GET /spark/v1/..%2f..%2fzillow/x",
        "GET /spark/v1/..%2Fx",
        "GET /spark/v1/..;/x",
        "GET /spark/v1/..;jsessionid=x/y",
        "GET /spark/v1/.;x/y",
        "GET /spark/v1/..\\x",
        "GET /spark/v1\\..\\x",
        "GET /spark/v1/%2e%2e%5cx",
        "GET /spark/v1/%2E%2E%5Cx",
        "GET /spark/v1/.%2e/x",
        "GET /spark/v1/%2e/x",
        "GET /spark/v1/%252e%252e/x",
        "GET /spark/v1/%25252e%25252e%25252fx",
        "GET /spark/v1/..%252fx",
        "GET /spark/v1/%2e%2e%3bx/y",
        "GET /spark/v1/..%00/x",
        "GET /spark/v1/x/..",
        "GET /spark/v1/x/%2e%2e%5c",
        "GET /spark/v1/%u002e%u002e/x",
        "GET /spark/v1/..%u2215x",
        "GET /spark/v1/x/%U002E",
        "GET /spark/v1/..%e2%88%95x",
        "GET /spark/v1/%c0%ae%c0%ae/x",
        "GET /spark/v1/..%c0%afx",
        "GET /spark/v1/..%c1%9cx",
        "GET /spark/v1/%25c0%25ae%25c0%25ae/x",
        "GET /spark/v1/%ef%bc%8e%ef%bc%8e/x",
        "GET /spark/v1/..%ef%bc%8fx",
        "GET /spark/v1/%e2%80%a5/x",
        "GET /spark/v1/%uff0e%uff0e/x",
        "GET /spark/v1/..%3f/x",
        "GET /spark/v1/..%3F/x",
        "GET /spark/v1/..%23/x",
        "GET /spark/v1/..%253f/x",
        "GET /spark/v1/...",
        "GET /spark/v1/x/..../y",
        "GET /spark/v1/%2e%2e%2e/x",
        "POST /spark/v1/x?_method=TRACE",
        "POST /spark/v1/x?a=1&_method=%20trace%20",
        "POST /spark/v1/x?_method=Track",
        "POST /spark/v1/x?_METHOD=CONNECT",
        "trace /spark/v1/x",
        "Trace /spark/v1/x",
        "TRACK /spark/v1/x",
        "track /spark/v1/x",
    ] {
        let resp = raw_with_key(srv.proxy_addr, line, &key).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{line}: {resp}");
        assert!(resp.contains("bad_request"), "{line}: {resp}");
    }
    assert!(
        w.spark.requests().is_empty() && w.zillow.requests().is_empty(),
        "nothing reached an upstream"
    );
    // A method override naming TRACE, TRACK or CONNECT, in any of its headers.
    for header in [
        "X-HTTP-Method-Override",
        "x-http-method-override",
        "X-HTTP-Method",
        "X-Method-Override",
    ] {
        for method in ["TRACE", " trace ", "Track", "CONNECT"] {
            let req = format!(
                "POST /spark/v1/x HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {key}\r\n\
                 {header}: {method}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let resp = support::raw_request(srv.proxy_addr, req.as_bytes()).await;
            assert!(
                resp.starts_with("HTTP/1.1 400"),
                "{header}: {method}: {resp}"
            );
            assert!(resp.contains("bad_request"), "{header}: {method}: {resp}");
        }
    }
    assert!(
        w.spark.requests().is_empty(),
        "no override reached the upstream"
    );
    // Dots that are not whole segments, and odd escapes, still pass.
    for (line, path) in [
        ("GET /spark/v1/a..b/file...txt", "/v1/a..b/file...txt"),
        ("GET /spark/v1.2/.well-known/x...", "/v1.2/.well-known/x..."),
        ("GET /spark/v1/%3f../%23", "/v1/%3f../%23"),
        ("POST /spark/v1/x?_method=PATCH", "/v1/x"),
        ("GET /spark/v1/..x/.x", "/v1/..x/.x"),
        ("GET /spark/v1/%2e%2ex", "/v1/%2e%2ex"),
        ("GET /spark/v1/a%2Fb;c=d", "/v1/a%2Fb;c=d"),
        ("GET /spark/v1/%zz", "/v1/%zz"),
        (
            "GET /spark/v1/caf%C3%A9/%E2%80%A6",
            "/v1/caf%C3%A9/%E2%80%A6",
        ),
        ("GET /spark/v1/%u00e9t%c3%a9", "/v1/%u00e9t%c3%a9"),
    ] {
        let resp = raw_with_key(srv.proxy_addr, line, &key).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{line}: {resp}");
        assert_eq!(w.spark.last_request().expect("rec").path, path, "{line}");
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn disguised_credential_parameters_are_refused() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, tokens) = add_session(&srv, "zillow", &w.zillow).await;
    let c = client();
    for query in [
        "accessToken+=KEY",
        "x=1&accessToken[]=KEY",
        "accessToken%5B%5D=KEY",
        "accessToken%3DKEY",
        "x=1&accessToken%3dKEY",
        "accessToken%00=KEY",
        "accessToken%20=KEY",
        "access%2554oken=KEY",
        "x=1;clientId+=evil",
        "APIKEY[]=evil",
        "apiKey%09=evil",
    ] {
        let r = c
            .get(url(srv.proxy_addr, &format!("/zillow/v1/feed?{query}")))
            .header("X-Credproxy-Session", &key)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "{query}");
        assert_eq!(error_code(&r).as_deref(), Some("bad_request"), "{query}");
        let body: serde_json::Value = r.json().await.expect("json");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains("disguised"), "{query}: {message}");
    }
    assert!(
        w.zillow.requests().is_empty(),
        "nothing reached the upstream"
    );
    // `;` separates too: the key is taken out, the rest keeps its bytes.
    let z = w.zillow.options().clone();
    let r = c
        .get(url(
            srv.proxy_addr,
            &format!("/zillow/v1/feed?x=1;accessToken={key};y=%41&clientId=evil"),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let got = w.zillow.last_request().expect("rec");
    assert_eq!(
        got.query.as_deref(),
        Some(
            format!(
                "x=1;y=%41&accessToken={}&clientId={}&apiKey={}",
                tokens.access_token, z.client_id, z.api_key
            )
            .as_str()
        )
    );
    // The plain forms keep working: any case, a percent-encoded name.
    for query in [
        format!("ACCESSTOKEN={key}&a=1"),
        format!("access%54oken={key}&a=1"),
    ] {
        let r = c
            .get(url(srv.proxy_addr, &format!("/zillow/v1/feed?{query}")))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "{query}");
        let got = w.zillow.last_request().expect("rec");
        assert!(
            got.query
                .as_deref()
                .is_some_and(|q| q.starts_with("a=1&accessToken=") && !q.contains(&key)),
            "{query}: {:?}",
            got.query
        );
    }
    srv.shutdown().await;
}
