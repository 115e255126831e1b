//! The admin listener: health, readiness, metrics and the session API.

mod support;

use support::{add_session, client, url, Extra, World, ADMIN_TOKEN};

#[tokio::test]
async fn health_ready_and_metrics() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let c = client();
    assert_eq!(
        c.get(url(srv.admin_addr, "/healthz"))
            .send()
            .await
            .expect("send")
            .status(),
        200
    );
    assert_eq!(
        c.get(url(srv.admin_addr, "/readyz"))
            .send()
            .await
            .expect("send")
            .status(),
        200
    );
    for _ in 0..3 {
        c.get(url(srv.proxy_addr, "/spark/v1/x"))
            .header("X-Credproxy-Session", &key)
            .send()
            .await
            .expect("send");
    }
    c.get(url(srv.proxy_addr, "/spark/v1/x"))
        .send()
        .await
        .expect("send");
    let m = c
        .get(url(srv.admin_addr, "/metrics"))
        .send()
        .await
        .expect("send");
    assert_eq!(m.status(), 200);
    let text = m.text().await.expect("text");
    assert!(
        text.contains(r#"credproxy_requests_total{provider="spark",status="200"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"credproxy_requests_total{provider="spark",status="401"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"credproxy_upstream_latency_seconds_count{provider="spark"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"credproxy_sessions{provider="spark",status="active"} 1"#),
        "{text}"
    );
    assert!(!text.contains(&key));
    srv.shutdown().await;
}

#[tokio::test]
async fn session_api_needs_the_admin_token() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let c = client();
    let tokens = w.zillow.issue_tokens();
    let body = serde_json::json!({
        "provider": "zillow",
        "access_token": tokens.access_token,
        "refresh_token": tokens.refresh_token,
        "label": "rental feed",
    });
    for auth in [None, Some("Bearer wrong-token"), Some("Basic dXNlcjpwYXNz")] {
        let mut req = c.post(url(srv.admin_addr, "/admin/sessions")).json(&body);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let r = req.send().await.expect("send");
        assert_eq!(r.status(), 401, "{auth:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
    }
    let bearer = format!("Bearer {ADMIN_TOKEN}");

    // Create, then use the key through the proxy.
    let r = c
        .post(url(srv.admin_addr, "/admin/sessions"))
        .header("Authorization", &bearer)
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 201);
    let created: serde_json::Value = r.json().await.expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    let key = created["session_key"].as_str().expect("key").to_owned();
    assert_eq!(created["provider"], "zillow");
    let r = c
        .get(url(
            srv.proxy_addr,
            &format!("/zillow/v1/feed?accessToken={key}"),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);

    // Read: metadata only.
    let list: serde_json::Value = c
        .get(url(srv.admin_addr, "/admin/sessions"))
        .header("Authorization", &bearer)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    assert_eq!(list.as_array().expect("array").len(), 1);
    let text = list.to_string();
    assert!(
        !text.contains(&key)
            && !text.contains(&tokens.access_token)
            && !text.contains(&tokens.refresh_token)
    );
    let one = c
        .get(url(srv.admin_addr, &format!("/admin/sessions/{id}")))
        .header("Authorization", &bearer)
        .send()
        .await
        .expect("send");
    assert_eq!(one.status(), 200);
    let one: serde_json::Value = one.json().await.expect("json");
    assert_eq!(one["label"], "rental feed");
    assert_eq!(one["status"], "active");

    // Bad input is refused without echoing it.
    let r = c
        .post(url(srv.admin_addr, "/admin/sessions"))
        .header("Authorization", &bearer)
        .body(r#"{"provider":"zillow","access_token":"tok-XYZZY","expires_in":"tok-XYZZY"}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    assert!(!r.text().await.expect("text").contains("XYZZY"));
    let r = c
        .post(url(srv.admin_addr, "/admin/sessions"))
        .header("Authorization", &bearer)
        .json(&serde_json::json!({"provider": "nope", "access_token": "t"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);

    // Delete: the key stops working, and a second delete is 404.
    let del = || {
        c.delete(url(srv.admin_addr, &format!("/admin/sessions/{id}")))
            .header("Authorization", &bearer)
            .send()
    };
    assert_eq!(del().await.expect("send").status(), 204);
    assert_eq!(del().await.expect("send").status(), 404);
    let r = c
        .get(url(
            srv.proxy_addr,
            &format!("/zillow/v1/feed?accessToken={key}"),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    srv.shutdown().await;
}

#[tokio::test]
async fn chosen_key_replaces_tokens_of_its_session() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let c = client();
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let legacy_key = "legacy-app-configured-token-0001";
    let mut ids = Vec::new();
    for expected in [201, 200] {
        let t = w.spark.issue_tokens();
        let r = c
            .post(url(srv.admin_addr, "/admin/sessions"))
            .header("Authorization", &bearer)
            .json(&serde_json::json!({"provider": "spark", "access_token": t.access_token, "session_key": legacy_key}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), expected);
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["session_key"], legacy_key);
        ids.push(v["id"].as_str().expect("id").to_owned());
        // The proxy uses the newest tokens at once.
        c.get(url(srv.proxy_addr, "/spark/v1/x"))
            .header("Authorization", format!("OAuth {legacy_key}"))
            .send()
            .await
            .expect("send");
        assert_eq!(
            w.spark.last_request().expect("rec").header("authorization"),
            Some(format!("OAuth {}", t.access_token).as_str())
        );
    }
    assert_eq!(ids[0], ids[1], "same session, tokens replaced");
    srv.shutdown().await;
}

#[tokio::test]
async fn admin_routes_are_404_without_a_configured_token() {
    let w = World::new().await;
    let extra = Extra {
        admin: Some(String::new()),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let c = client();
    for auth in ["", "Bearer anything"] {
        let r = c
            .get(url(srv.admin_addr, "/admin/sessions"))
            .header("Authorization", auth)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 404);
    }
    assert_eq!(
        c.get(url(srv.admin_addr, "/healthz"))
            .send()
            .await
            .expect("send")
            .status(),
        200
    );
    srv.shutdown().await;
}
