//! Keys with scopes (the contract's "Keys with scopes"): several keys per
//! session, each revocable alone and limited to its methods, paths, expiry
//! and rate; the CLI, the admin API, and a store made by the previous
//! release migrated.

mod support;

use std::time::Duration;

use support::{add_session, client, run_cli, url, Extra, World, ADMIN_TOKEN};

/// `POST /admin/sessions/{id}/keys` with `body`: the new key's id and key.
async fn admin_add_key(
    admin: std::net::SocketAddr,
    id: &str,
    body: serde_json::Value,
) -> (String, String) {
    let r = client()
        .post(url(admin, &format!("/admin/sessions/{id}/keys")))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.expect("json");
    (
        v["key_id"].as_str().expect("key_id").to_owned(),
        v["session_key"].as_str().expect("session_key").to_owned(),
    )
}

/// A request through the proxy with `key` in the session header.
async fn call(
    proxy: std::net::SocketAddr,
    method: reqwest::Method,
    path: &str,
    key: &str,
) -> reqwest::Response {
    client()
        .request(method, url(proxy, path))
        .header("X-Credproxy-Session", key)
        .send()
        .await
        .expect("send")
}

fn error_code(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-credproxy-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_outside_its_scope_is_refused_before_the_provider() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (id, first, _) = add_session(&srv, "spark", &w.spark).await;
    let (key_id, scoped) = admin_add_key(
        srv.admin_addr,
        &id,
        serde_json::json!({"label": "listings app", "methods": ["GET"], "paths": ["/v1/listings*"]}),
    )
    .await;
    assert!(key_id.starts_with("k_"));

    // Inside the scope: it works, percent-encoded or not.
    for path in [
        "/spark/v1/listings",
        "/spark/v1/listings/20",
        "/spark/v1/%6Cistings",
    ] {
        let r = call(srv.proxy_addr, reqwest::Method::GET, path, &scoped).await;
        assert_eq!(r.status(), 200, "{path}");
    }
    w.spark.clear_requests();
    let refused = [
        (reqwest::Method::POST, "/spark/v1/listings"),
        (reqwest::Method::DELETE, "/spark/v1/listings/20"),
        (reqwest::Method::GET, "/spark/v1/contacts"),
        (reqwest::Method::GET, "/spark/v1/%63ontacts"),
        (reqwest::Method::GET, "/spark/v1/listing"),
        (reqwest::Method::GET, "/spark/v2/listings"),
    ];
    for (method, path) in refused {
        let r = call(srv.proxy_addr, method.clone(), path, &scoped).await;
        assert_eq!(r.status(), 403, "{method} {path}");
        assert_eq!(error_code(&r), "forbidden_by_scope");
        let body: serde_json::Value = r.json().await.expect("json");
        assert_eq!(body["error"]["code"], "forbidden_by_scope");
    }
    // A method override cannot name another method for a method-limited key.
    let (_, poster) = admin_add_key(
        srv.admin_addr,
        &id,
        serde_json::json!({"methods": ["POST"]}),
    )
    .await;
    let r = client()
        .post(url(srv.proxy_addr, "/spark/v1/listings"))
        .header("X-Credproxy-Session", &poster)
        .header("X-HTTP-Method-Override", "DELETE")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(&r), "forbidden_by_scope");
    // Dot segments in any spelling never reach the scope check, let alone
    // the provider.
    for path in [
        "/spark/v1/listings/../contacts",
        "/spark/v1/listings/%2e%2e/contacts",
        "/spark/v1/listings/%252e%252e/contacts",
        "/spark/v1/listings%2f..%2fcontacts",
    ] {
        let r = call(srv.proxy_addr, reqwest::Method::GET, path, &scoped).await;
        assert!(
            r.status() == 400 || r.status() == 403,
            "{path}: {}",
            r.status()
        );
    }
    assert!(
        w.spark.requests().is_empty(),
        "a refused request reached the provider"
    );
    // The first key is unlimited.
    let r = call(
        srv.proxy_addr,
        reqwest::Method::POST,
        "/spark/v1/contacts",
        &first,
    )
    .await;
    assert_eq!(r.status(), 200);

    let metrics = client()
        .get(url(srv.admin_addr, "/metrics"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(
            r#"credproxy_key_refusals_total{provider="spark",outcome="forbidden_by_scope"}"#
        ),
        "{metrics}"
    );
    assert!(!metrics.contains(&key_id), "no label per key");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_is_unknown_and_a_key_over_its_rate_is_refused_at_once() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (id, _, _) = add_session(&srv, "spark", &w.spark).await;
    // Expiry is kept in whole seconds: a key of 1 s added late in a second
    // could be over before its first use. 2 s leaves at least one.
    let (_, brief) = admin_add_key(srv.admin_addr, &id, serde_json::json!({"expires_in": 2})).await;
    let r = call(srv.proxy_addr, reqwest::Method::GET, "/spark/v1/x", &brief).await;
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = call(srv.proxy_addr, reqwest::Method::GET, "/spark/v1/x", &brief).await;
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(&r), "unknown_session");

    let (_, slow) = admin_add_key(srv.admin_addr, &id, serde_json::json!({"rate": "2/1m"})).await;
    for _ in 0..2 {
        let r = call(srv.proxy_addr, reqwest::Method::GET, "/spark/v1/x", &slow).await;
        assert_eq!(r.status(), 200);
    }
    w.spark.clear_requests();
    let started = std::time::Instant::now();
    let r = call(srv.proxy_addr, reqwest::Method::GET, "/spark/v1/x", &slow).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    assert_eq!(r.status(), 429);
    assert_eq!(error_code(&r), "rate_limited");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(w.spark.requests().is_empty());
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_lists_adds_and_revokes_keys() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (id, first, _) = add_session(&srv, "spark", &w.spark).await;
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let c = client();
    let (key_id, key) = admin_add_key(
        srv.admin_addr,
        &id,
        serde_json::json!({"label": "reports", "methods": ["get", "HEAD"], "rate": "100/1m"}),
    )
    .await;
    let list: serde_json::Value = c
        .get(url(srv.admin_addr, &format!("/admin/sessions/{id}/keys")))
        .header("Authorization", &bearer)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let keys = list.as_array().expect("array");
    assert_eq!(keys.len(), 2);
    let (added, firsts): (Vec<_>, Vec<_>) =
        keys.iter().partition(|k| k["key_id"] == key_id.as_str());
    assert_eq!(added[0]["label"], "reports");
    assert_eq!(added[0]["methods"], serde_json::json!(["GET", "HEAD"]));
    assert_eq!(added[0]["rate"], "100/1m");
    assert!(firsts[0]["methods"].is_null() && firsts[0]["paths"].is_null());
    let text = list.to_string();
    assert!(!text.contains(&key) && !text.contains(&first));

    // A bad scope, an unknown session, an unknown key.
    let r = c
        .post(url(srv.admin_addr, &format!("/admin/sessions/{id}/keys")))
        .header("Authorization", &bearer)
        .json(&serde_json::json!({"paths": ["no-slash"]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let r = c
        .post(url(
            srv.admin_addr,
            "/admin/sessions/s_0000000000000000/keys",
        ))
        .header("Authorization", &bearer)
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    let r = c
        .delete(url(
            srv.admin_addr,
            &format!("/admin/sessions/{id}/keys/k_nope"),
        ))
        .header("Authorization", &bearer)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);

    // Revoked: at once here; the session and its first key go on.
    let r = call(srv.proxy_addr, reqwest::Method::GET, "/spark/v1/x", &key).await;
    assert_eq!(r.status(), 200);
    let r = c
        .delete(url(
            srv.admin_addr,
            &format!("/admin/sessions/{id}/keys/{key_id}"),
        ))
        .header("Authorization", &bearer)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 204);
    let r = call(srv.proxy_addr, reqwest::Method::GET, "/spark/v1/x", &key).await;
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(&r), "unknown_session");
    let r = call(srv.proxy_addr, reqwest::Method::GET, "/spark/v1/x", &first).await;
    assert_eq!(r.status(), 200);

    // The audit trail names the key id, never the key.
    let rows = srv
        .sessions
        .store()
        .audit_page(0, 1000)
        .await
        .expect("audit");
    let kinds: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.kind.clone(), r.detail.clone()))
        .collect();
    assert!(kinds
        .iter()
        .any(|(k, d)| k == "session.key_added" && d.contains(&key_id)));
    assert!(kinds
        .iter()
        .any(|(k, d)| k == "session.key_revoked" && d.contains(&key_id)));
    assert!(!kinds.iter().any(|(_, d)| d.contains(&key)));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_adds_lists_and_revokes_keys_and_a_running_server_follows() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra {
        store: "invalidation_interval = \"200ms\"".into(),
        ..Extra::default()
    });
    let srv = w
        .start(&Extra {
            store: "invalidation_interval = \"200ms\"".into(),
            ..Extra::default()
        })
        .await;
    let (id, _, _) = add_session(&srv, "spark", &w.spark).await;
    let out = run_cli(
        &cfg,
        &[
            "session",
            "key",
            "add",
            &id,
            "--label",
            "feed",
            "--methods",
            "GET",
            "--paths",
            "/v1/listings*,/v1/contacts",
            "--rate",
            "10/1s",
            "--expires-in",
            "3600",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let added: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let key_id = added["key_id"].as_str().expect("key_id").to_owned();
    let key = added["session_key"]
        .as_str()
        .expect("session_key")
        .to_owned();

    // The running server knows the key added by another process.
    let r = call(
        srv.proxy_addr,
        reqwest::Method::GET,
        "/spark/v1/contacts",
        &key,
    )
    .await;
    assert_eq!(r.status(), 200);

    let out = run_cli(&cfg, &["session", "key", "list", &id, "--json"]);
    assert!(out.status.success());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 2);
    let added = list
        .iter()
        .find(|k| k["key_id"] == key_id.as_str())
        .expect("the key");
    assert_eq!(
        added["paths"],
        serde_json::json!(["/v1/listings*", "/v1/contacts"])
    );
    assert!(added["expires_at"].is_string());
    let out = run_cli(&cfg, &["session", "key", "list", &id]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table.contains(&key_id) && table.contains("feed") && !table.contains(&key),
        "{table}"
    );

    let out = run_cli(&cfg, &["session", "key", "revoke", &id, &key_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Within 2 seconds the server refuses it.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let r = call(
            srv.proxy_addr,
            reqwest::Method::GET,
            "/spark/v1/contacts",
            &key,
        )
        .await;
        if r.status() == 401 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still served after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = run_cli(&cfg, &["session", "key", "revoke", &id, &key_id]);
    assert!(!out.status.success());
    let out = run_cli(&cfg, &["session", "key", "add", &id, "--rate", "ten"]);
    assert!(!out.status.success());
    srv.shutdown().await;
}

/// The migration that added `session_keys`: undone to make a store of the
/// release before it.
const SESSION_KEYS_MIGRATION: i64 = 20270105000001;

/// A store written by the release before keys had scopes: its session's
/// key is the first key after the migration, and still works. The store is
/// made here, not committed: a session added by today's code, then the
/// migration undone (its table dropped, its row in `_sqlx_migrations`
/// deleted), which leaves exactly the previous release's schema and rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_the_previous_release_keeps_its_key() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let out = run_cli(
        &cfg,
        &[
            "session",
            "add",
            "--provider",
            "spark",
            "--access-token",
            "fixture-access-token-0001",
            "--refresh-token",
            "fixture-refresh-token-0001",
            "--key",
            "cpk-fixture-previous-release-key",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let added: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = added["id"].as_str().expect("id").to_owned();
    {
        use sqlx::Connection;
        let db = format!("sqlite://{}", w.path("credproxy.db").display());
        let mut conn = sqlx::SqliteConnection::connect(&db)
            .await
            .expect("open store");
        sqlx::query("DROP TABLE session_keys")
            .execute(&mut conn)
            .await
            .expect("drop session_keys");
        let undone = sqlx::query("DELETE FROM _sqlx_migrations WHERE version = ?")
            .bind(SESSION_KEYS_MIGRATION)
            .execute(&mut conn)
            .await
            .expect("forget the migration");
        assert_eq!(
            undone.rows_affected(),
            1,
            "the session_keys migration moved"
        );
        conn.close().await.expect("close");
    }
    // An upstream of the test's own: it answers 200 and says what it got.
    let api = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api_addr = api.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen_by_api = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = api.accept().await {
            let mut buf = vec![0u8; 8192];
            let n = s.read(&mut buf).await.unwrap_or(0);
            seen_by_api
                .lock()
                .expect("lock")
                .push(String::from_utf8_lossy(&buf[..n]).to_string());
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await;
        }
    });
    let srv = w.start_against_spark_api(&Extra::default(), api_addr).await;
    let r = call(
        srv.proxy_addr,
        reqwest::Method::GET,
        "/spark/v1/listings",
        "cpk-fixture-previous-release-key",
    )
    .await;
    assert_eq!(r.status(), 200);
    let got = seen.lock().expect("lock").join("\n");
    assert!(got.contains("OAuth fixture-access-token-0001"), "{got}");
    let keys = srv
        .sessions
        .keys(&id)
        .await
        .expect("keys")
        .expect("the session");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].key_id, format!("k_{}", &id[2..]));
    assert_eq!(keys[0].scope_text(), "any");
    srv.shutdown().await;
}

/// On PostgreSQL, a key revoked through one instance's admin API stops
/// working there at once and on the other instance within 2 seconds; the
/// session's other key goes on working on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_on_one_instance_stops_on_the_other_within_two_seconds() {
    let Some(db) = support::postgres_db("session_key_revoked_two_instances").await else {
        return;
    };
    let w = World::new().await;
    let cfg = w.write_config(&Extra {
        store_url: Some(db),
        ..Extra::default()
    });
    let added = support::cli_add(&cfg, "spark", &w.spark.issue_tokens());
    let id = added["id"].as_str().expect("id").to_owned();
    let first = added["session_key"].as_str().expect("key").to_owned();
    let a = support::BinServer::spawn(&cfg, "warn");
    let b = support::BinServer::spawn(&cfg, "warn");
    let (key_id, key) = admin_add_key(
        a.admin_addr,
        &id,
        serde_json::json!({"label": "leaked", "paths": ["/v1/*"]}),
    )
    .await;
    // Both instances serve the new key (b learns it from the change log).
    for srv in [&a, &b] {
        let r = call(srv.proxy_addr, reqwest::Method::GET, "/spark/v1/x", &key).await;
        assert_eq!(r.status(), 200);
    }
    let r = client()
        .delete(url(
            a.admin_addr,
            &format!("/admin/sessions/{id}/keys/{key_id}"),
        ))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 204);
    // At once where it was revoked.
    let r = call(a.proxy_addr, reqwest::Method::GET, "/spark/v1/x", &key).await;
    assert_eq!(r.status(), 401);
    // Within 2 seconds on the other instance.
    let revoked = std::time::Instant::now();
    loop {
        let r = call(b.proxy_addr, reqwest::Method::GET, "/spark/v1/x", &key).await;
        if r.status() == 401 {
            assert_eq!(error_code(&r), "unknown_session");
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(2),
            "instance b still serves a revoked key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for srv in [&a, &b] {
        let r = call(srv.proxy_addr, reqwest::Method::GET, "/spark/v1/x", &first).await;
        assert_eq!(r.status(), 200, "the session's first key goes on");
    }
}
