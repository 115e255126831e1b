//! No secret reaches a log: a full run of the real binary at `RUST_LOG=trace`
//! (CLI and server), then every secret it used is searched for in all output.

mod support;

use std::process::Command;

use support::{client, url, BinServer, Extra, World, ADMIN_TOKEN, BIN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_any_log_at_trace_level() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let mut secrets = w.secrets();
    let mut logs = String::new();

    // Sessions added by the CLI, itself logging at trace.
    let mut add = |provider: &str, tokens: &credproxy_standins::Tokens| {
        let out = Command::new(BIN)
            .args(["session", "add", "--provider", provider, "--json"])
            .args([
                "--access-token",
                &tokens.access_token,
                "--refresh-token",
                &tokens.refresh_token,
            ])
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "trace")
            .output()
            .expect("run");
        assert!(out.status.success());
        logs.push_str(&String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v["session_key"].as_str().expect("key").to_owned()
    };
    let spark_tokens = w.spark.issue_tokens();
    let zillow_tokens = w.zillow.issue_tokens();
    let spark_key = add("spark", &spark_tokens);
    let zillow_key = add("zillow", &zillow_tokens);

    let srv = BinServer::spawn(&cfg, "trace");
    let c = client();
    let p = srv.proxy_addr;
    let send = |req: reqwest::RequestBuilder| async move {
        req.send().await.expect("send").status().as_u16()
    };

    // Every way of presenting a key, both providers.
    assert_eq!(
        send(
            c.get(url(p, "/spark/v1/a?x=1"))
                .header("X-Credproxy-Session", &spark_key)
        )
        .await,
        200
    );
    assert_eq!(
        send(
            c.get(url(p, "/spark/v1/b"))
                .header("Proxy-Authorization", format!("Bearer {spark_key}"))
        )
        .await,
        200
    );
    assert_eq!(
        send(
            c.get(url(p, "/spark/v1/c"))
                .header("Authorization", format!("OAuth {spark_key}"))
        )
        .await,
        200
    );
    assert_eq!(
        send(
            c.get(url(p, "/spark/Reso/OData/Property"))
                .header("Authorization", format!("Bearer {spark_key}"))
        )
        .await,
        200
    );
    assert_eq!(
        send(
            c.post(url(p, "/spark/upload"))
                .header("X-Credproxy-Session", &spark_key)
                .body("payload")
        )
        .await,
        200
    );
    assert_eq!(
        send(c.get(url(
            p,
            &format!("/zillow/v1/feed?accessToken={zillow_key}&q=1")
        )))
        .await,
        200
    );
    assert_eq!(
        send(
            c.get(url(p, "/zillow/v1/feed"))
                .header("X-Credproxy-Session", &zillow_key)
        )
        .await,
        200
    );
    // Failure paths: unknown key, wrong provider; an expired token is
    // refreshed and the request replayed, so the token endpoint is in the log too.
    let wrong = "cpk_this-key-is-unknown-but-secret-0000000000";
    secrets.push(wrong.to_owned());
    assert_eq!(
        send(
            c.get(url(p, "/spark/v1/d"))
                .header("X-Credproxy-Session", wrong)
        )
        .await,
        401
    );
    assert_eq!(
        send(c.get(url(p, &format!("/zillow/v1?accessToken={spark_key}")))).await,
        401
    );
    w.spark.expire_access_tokens();
    assert_eq!(
        send(
            c.get(url(p, "/spark/v1/e"))
                .header("X-Credproxy-Session", &spark_key)
        )
        .await,
        200
    );
    assert_eq!(w.spark.grant_count(), 1);

    // The admin API, with a chosen key and tokens in the body.
    let chosen = "chosen-legacy-key-for-log-test-42";
    secrets.push(chosen.to_owned());
    let admin_tokens = w.spark.issue_tokens();
    let r = c
        .post(url(srv.admin_addr, "/admin/sessions"))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .json(&serde_json::json!({
            "provider": "spark",
            "access_token": admin_tokens.access_token,
            "refresh_token": admin_tokens.refresh_token,
            "session_key": chosen,
        }))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(
        send(
            c.get(url(p, "/spark/v1/f"))
                .header("X-Credproxy-Session", chosen)
        )
        .await,
        200
    );
    assert_eq!(
        send(
            c.get(url(srv.admin_addr, "/admin/sessions"))
                .header("Authorization", "Bearer wrong-admin-token-123")
        )
        .await,
        401
    );
    assert_eq!(
        send(
            c.delete(url(srv.admin_addr, &format!("/admin/sessions/{id}")))
                .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        )
        .await,
        204
    );
    assert_eq!(send(c.get(url(srv.admin_addr, "/metrics"))).await, 200);

    let mut srv = srv;
    let exit = srv.terminate();
    assert!(exit.success());
    srv.stderr
        .wait_for(std::time::Duration::from_secs(5), |l| l == "\u{0}eof");
    logs.push_str(&srv.stderr.all().join("\n"));
    logs.push_str(&srv.stdout.all().join("\n"));

    for t in [&spark_tokens, &zillow_tokens, &admin_tokens] {
        secrets.push(t.access_token.clone());
        secrets.push(t.refresh_token.clone());
    }
    secrets.extend(w.spark.all_tokens());
    secrets.extend(w.zillow.all_tokens());
    secrets.push(spark_key.clone());
    secrets.push(zillow_key.clone());
    secrets.push("wrong-admin-token-123".to_owned());
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "a secret ({} chars) reached the log",
            s.len()
        );
    }

    // The logs are real: trace output and one access line per request.
    assert!(logs.lines().count() > 50, "trace logging was on");
    let access: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("credproxy::access"))
        .collect();
    assert_eq!(access.len(), 11, "{access:#?}");
    assert!(
        logs.contains("tokens refreshed"),
        "the refresh is in the log"
    );
    let line = access
        .iter()
        .find(|l| l.contains("/v1/a"))
        .expect("line for /v1/a");
    for field in [
        "provider=\"spark\"",
        "method=GET",
        "status=200",
        "upstream_ms=",
        "session=\"s_",
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }
    assert!(!line.contains("x=1"), "no query in the access log");
}
