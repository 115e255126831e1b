//! The OAuth connect flows over HTTP: state rules, both providers' code
//! exchange, refusals and failures, reconnecting, and `credproxy connect`.
//! (The same flows in a real browser are in tests/browser.rs.)

mod support;

use std::collections::HashMap;
use std::time::Duration;

use credproxy_standins::TokenMode;
use support::{url, BinServer, Extra, World, ADMIN_TOKEN, BIN};

/// A client that does not follow redirects, so each hop can be checked.
fn no_redirects() -> reqwest::Client {
    let _ = support::client();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

fn query_of(u: &str) -> HashMap<String, String> {
    url::Url::parse(u)
        .expect("url")
        .query_pairs()
        .into_owned()
        .collect()
}

/// Follows `/connect/...` to the provider: returns the authorisation URL's query.
async fn start(
    c: &reqwest::Client,
    admin: std::net::SocketAddr,
    path: &str,
) -> HashMap<String, String> {
    let r = c.get(url(admin, path)).send().await.expect("send");
    assert_eq!(r.status(), 302, "{path}");
    assert_eq!(r.headers()["cache-control"], "no-store");
    query_of(r.headers()["location"].to_str().expect("ascii"))
}

/// The state a Spark hybrid authorisation carries in return_to.
fn hybrid_state(q: &HashMap<String, String>) -> String {
    query_of(&q["openid.return_to"])["state"].clone()
}

fn key_on_page(html: &str) -> Option<String> {
    let at = html.find("id=\"session-key\"")?;
    let rest = &html[at..];
    let start = rest.find('>')? + 1;
    let end = rest.find("</textarea>")?;
    Some(rest[start..end].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spark_hybrid_flow_stores_a_session_and_shows_its_key_once() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let c = no_redirects();

    // The start page lists both providers with a Connect button.
    let home = c.get(url(srv.admin_addr, "/")).send().await.expect("send");
    assert_eq!(home.status(), 200);
    let html = home.text().await.expect("text");
    assert!(html.contains("id=\"connect-spark\"") && html.contains("id=\"connect-zillow\""));
    assert!(html.contains("<title>Connect an account – credproxy</title>"));

    let q = start(&c, srv.admin_addr, "/connect/spark").await;
    assert_eq!(q["openid.mode"], "checkid_setup");
    assert_eq!(q["openid.spark.client_id"], w.spark.options().client_id);
    assert_eq!(q["openid.spark.combined_flow"], "true");
    let state = hybrid_state(&q);
    assert!(state.len() >= 22, "128+ bits");

    let code = w.spark.issue_code();
    let cb = format!("/callback/spark?state={state}&openid.mode=id_res&openid.spark.code={code}");
    let r = c.get(url(srv.admin_addr, &cb)).send().await.expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert!(r.headers()["content-security-policy"]
        .to_str()
        .expect("ascii")
        .contains("default-src 'none'"));
    let html = r.text().await.expect("text");
    let key = key_on_page(&html).expect("the key is on the page");
    assert!(html.contains("Spark API connected"));
    assert!(
        html.contains(&format!("curl -H &#39;Authorization: OAuth {key}&#39;"))
            || html.contains(&format!("Authorization: OAuth {key}"))
    );
    assert!(!html.contains(&code), "no code on the page");
    for t in w.spark.all_tokens() {
        assert!(!html.contains(&t), "no token on the page");
    }
    assert_eq!(
        w.spark.last_redirect_uri().as_deref(),
        Some("http://127.0.0.1:0/callback/spark"),
        "the code exchange sends redirect_uri without the state"
    );

    // The key works through the proxy.
    let r = support::client()
        .get(url(srv.proxy_addr, "/spark/v1/listings"))
        .header("Authorization", format!("OAuth {key}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);

    // The state worked once: a replay of the callback is refused, no code exchanged.
    let calls = w.spark.token_calls();
    let r = c.get(url(srv.admin_addr, &cb)).send().await.expect("send");
    assert_eq!(r.status(), 400);
    assert!(key_on_page(&r.text().await.expect("text")).is_none());
    assert_eq!(w.spark.token_calls(), calls);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_unknown_foreign_and_expired_states_get_400_and_no_exchange() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let c = no_redirects();
    let code = w.spark.issue_code();
    // A state for Zillow is no good for Spark.
    let zq = start(&c, srv.admin_addr, "/connect/zillow").await;
    // An expired one, written as if made 11 minutes ago.
    let old = credproxy::connect::new_state();
    srv.sessions
        .store()
        .insert_oauth_state(
            &old.hash,
            &credproxy::store::OAuthState {
                provider: "spark".into(),
                session_id: None,
                key_hash: None,
                created_at: credproxy::store::now() - 660,
            },
        )
        .await
        .expect("insert");
    use secrecy::ExposeSecret;
    for state in [
        None,
        Some("not-a-state-we-made-000000000000".to_owned()),
        Some(zq["state"].clone()),
        Some(old.state.expose_secret().to_owned()),
    ] {
        let mut cb = format!("/callback/spark?openid.mode=id_res&openid.spark.code={code}");
        if let Some(s) = &state {
            cb.push_str(&format!("&state={s}"));
        }
        let r = c.get(url(srv.admin_addr, &cb)).send().await.expect("send");
        assert_eq!(r.status(), 400, "{state:?}");
        assert!(r
            .text()
            .await
            .expect("text")
            .contains("No code was exchanged"));
    }
    assert_eq!(w.spark.token_calls(), 0, "no code was exchanged");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zillow_and_spark_oauth2_flows() {
    let w = World::new().await;
    let extra = Extra {
        spark: format!("authorize_url = \"{}/oauth2\"", w.spark.base_url()),
        ..Extra::default()
    };
    let text = w.config_text(&extra).replace(
        &format!("authorize_url = \"{}\"\n", w.spark.authorize_url()),
        "",
    );
    let cfg = credproxy::config::Config::parse(&text, std::path::Path::new("t"), |_| None)
        .expect("config");
    let srv = credproxy::server::start(cfg).await.expect("start");
    let c = no_redirects();
    for (provider, standin) in [("zillow", &w.zillow), ("spark", &w.spark)] {
        let q = start(&c, srv.admin_addr, &format!("/connect/{provider}")).await;
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["client_id"], standin.options().client_id);
        assert_eq!(
            q["redirect_uri"],
            format!("http://127.0.0.1:0/callback/{provider}")
        );
        let code = standin.issue_code();
        let r = c
            .get(url(
                srv.admin_addr,
                &format!("/callback/{provider}?code={code}&state={}", q["state"]),
            ))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "{provider}");
        let key = key_on_page(&r.text().await.expect("text")).expect("key");
        let path = if provider == "zillow" {
            format!("/zillow/v1/feed?accessToken={key}")
        } else {
            "/spark/v1/listings".to_owned()
        };
        let r = support::client()
            .get(url(srv.proxy_addr, &path))
            .header("X-Credproxy-Session", &key)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "{provider}");
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_failing_token_endpoint_get_pages_that_say_so() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let c = no_redirects();

    let q = start(&c, srv.admin_addr, "/connect/spark").await;
    let r = c
        .get(url(
            srv.admin_addr,
            &format!(
                "/callback/spark?state={}&openid.mode=cancel",
                hybrid_state(&q)
            ),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403);
    let html = r.text().await.expect("text");
    assert!(
        html.contains("Access was refused") && html.contains("href=\"/connect/spark\""),
        "{html}"
    );

    let q = start(&c, srv.admin_addr, "/connect/zillow").await;
    let r = c
        .get(url(
            srv.admin_addr,
            &format!("/callback/zillow?error=access_denied&state={}", q["state"]),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403);
    assert_eq!(w.zillow.token_calls(), 0);

    w.zillow.set_token_mode(TokenMode::Fail500);
    let q = start(&c, srv.admin_addr, "/connect/zillow").await;
    let code = w.zillow.issue_code();
    let r = c
        .get(url(
            srv.admin_addr,
            &format!("/callback/zillow?code={code}&state={}", q["state"]),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 502);
    let html = r.text().await.expect("text");
    assert!(
        html.contains("answered 500") && html.contains("id=\"retry\""),
        "{html}"
    );
    assert!(!html.contains(&code));
    assert!(
        srv.sessions.list().await.expect("list").is_empty(),
        "nothing stored"
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_keeps_the_key_and_needs_the_admin_token() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (id, key, _) = support::add_session(&srv, "spark", &w.spark).await;
    // The session's refresh token is refused: reauthorization required.
    w.spark.expire_access_tokens();
    w.spark.set_token_mode(TokenMode::InvalidGrant);
    let get = || {
        support::client()
            .get(url(srv.proxy_addr, "/spark/v1/x"))
            .header("X-Credproxy-Session", &key)
            .send()
    };
    let r = get().await.expect("send");
    assert_eq!(
        support::error_code(&r).as_deref(),
        Some("reauthorization_required")
    );
    w.spark.set_token_mode(TokenMode::Normal);

    let c = no_redirects();
    let path = format!("/connect/spark?session={id}");
    let r = c
        .get(url(srv.admin_addr, &path))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401, "reconnecting needs the admin token");
    let r = c
        .get(url(srv.admin_addr, &path))
        .header("Authorization", "Bearer wrong")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let r = c
        .get(url(srv.admin_addr, &path))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 302);
    let q = query_of(r.headers()["location"].to_str().expect("ascii"));
    let code = w.spark.issue_code();
    let r = c
        .get(url(
            srv.admin_addr,
            &format!(
                "/callback/spark?state={}&openid.mode=id_res&openid.spark.code={code}",
                hybrid_state(&q)
            ),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let html = r.text().await.expect("text");
    assert!(
        html.contains("reconnected") || html.contains("has new tokens"),
        "{html}"
    );
    assert!(key_on_page(&html).is_none(), "the key is not shown again");
    let r = get().await.expect("send");
    assert_eq!(r.status(), 200, "same key, new tokens");
    let info = srv.sessions.info(&id).await.expect("info").expect("exists");
    assert_eq!(info.status, credproxy::session::Status::Active);
    assert_eq!(
        srv.sessions.list().await.expect("list").len(),
        1,
        "no new session"
    );
    srv.shutdown().await;
}

/// `credproxy connect` against a running server (the real binary, logging
/// at trace level so the log can be searched for secrets afterwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_connect_prints_the_key_when_the_callback_completes() {
    use std::io::{BufRead, BufReader};
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let srv = BinServer::spawn(&cfg, "trace");
    // public_url defaults to the admin address, which is port 0 in the
    // config: point the CLI's link at the real one.
    let text = std::fs::read_to_string(&cfg).expect("read").replace(
        "shutdown_grace = 10",
        &format!(
            "shutdown_grace = 10\npublic_url = \"http://{}\"",
            srv.admin_addr
        ),
    );
    let cli_cfg = w.path("cli.toml");
    std::fs::write(&cli_cfg, text).expect("write");

    let mut child = std::process::Command::new(BIN)
        .args(["connect", "zillow", "--json", "--timeout", "30", "--config"])
        .arg(&cli_cfg)
        .env("RUST_LOG", "trace")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn connect");
    // With --json the link goes to stderr (with the log): stdout is the JSON.
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let err = BufReader::new(child.stderr.take().expect("stderr"));
    let (link_tx, link_rx) = std::sync::mpsc::channel();
    let stderr_lines = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in err.lines() {
            let Ok(line) = line else { break };
            // The link is output for the person, not a log line: it
            // carries the one-time state, which no log may.
            if line.starts_with("http://") {
                let _ = link_tx.send(line);
            } else {
                lines.push(line);
            }
        }
        lines.join("\n")
    });
    let link = link_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the link, on stderr");
    assert!(
        link.starts_with(&format!("http://{}/connect/zillow?link=", srv.admin_addr)),
        "{link}"
    );

    let c = no_redirects();
    let r = c.get(&link).send().await.expect("send");
    assert_eq!(r.status(), 302);
    let q = query_of(r.headers()["location"].to_str().expect("ascii"));
    let code = w.zillow.issue_code();
    let r = c
        .get(url(
            srv.admin_addr,
            &format!("/callback/zillow?code={code}&state={}", q["state"]),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let html = r.text().await.expect("text");
    assert!(
        html.contains("credproxy connect"),
        "the page points at the terminal: {html}"
    );
    assert!(key_on_page(&html).is_none());

    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("rest");
    let status = child.wait().expect("wait");
    let cli_log = stderr_lines.join().expect("stderr reader");
    assert!(status.success(), "{cli_log}");
    let v: serde_json::Value = serde_json::from_str(&rest).expect("stdout is one JSON object");
    let key = v["session_key"].as_str().expect("key").to_owned();
    let r = support::client()
        .get(url(
            srv.proxy_addr,
            &format!("/zillow/v1/feed?accessToken={key}"),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);

    // The link worked once.
    let r = c.get(&link).send().await.expect("send");
    assert_eq!(r.status(), 400);

    // Nothing secret in either process's log, at trace level.
    let mut srv = srv;
    srv.terminate();
    srv.stderr
        .wait_for(Duration::from_secs(5), |l| l == "\u{0}eof");
    let logs = format!("{}\n{cli_log}", srv.stderr.all().join("\n"));
    assert!(
        logs.contains("connect: session stored"),
        "the flow is in the log"
    );
    let state = q["state"].clone();
    let mut secrets = vec![code, key, state];
    secrets.extend(w.zillow.all_tokens());
    secrets.extend(w.secrets());
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "a secret ({} chars) reached the log",
            s.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_connect_reconnects_a_session_and_times_out_cleanly() {
    use std::io::{BufRead, BufReader};
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (id, key, _) = support::add_session(&srv, "spark", &w.spark).await;
    // The CLI's links must point at the running server's admin address.
    let text = w.config_text(&Extra {
        server: format!("public_url = \"http://{}\"", srv.admin_addr),
        ..Extra::default()
    });
    let cfg = w.path("cli.toml");
    std::fs::write(&cfg, text).expect("write");

    // Nobody opens the link: a clear failure after the timeout.
    let out = std::process::Command::new(BIN)
        .args(["connect", "spark", "--timeout", "1", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sign-in completed within 1 s"));

    // Reconnect through the CLI's one-time link: no admin token needed.
    let mut child = std::process::Command::new(BIN)
        .args([
            "connect",
            "spark",
            "--session",
            &id,
            "--timeout",
            "30",
            "--config",
        ])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut link = String::new();
    out.read_line(&mut link).expect("link");
    let c = no_redirects();
    let r = c.get(link.trim()).send().await.expect("send");
    assert_eq!(r.status(), 302);
    let q = query_of(r.headers()["location"].to_str().expect("ascii"));
    let code = w.spark.issue_code();
    let r = c
        .get(url(
            srv.admin_addr,
            &format!(
                "/callback/spark?state={}&openid.mode=id_res&openid.spark.code={code}",
                hybrid_state(&q)
            ),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("rest");
    assert!(tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait")
        .success());
    assert!(
        rest.contains(&format!("session {id} reconnected")),
        "{rest}"
    );
    // The old key now carries the new tokens.
    let r = support::client()
        .get(url(srv.proxy_addr, "/spark/v1/x"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let tokens_now = w.spark.last_request().expect("rec");
    assert_ne!(tokens_now.header("authorization"), None);
    assert_eq!(w.spark.codes_redeemed(), 1);
    srv.shutdown().await;
}

#[tokio::test]
async fn a_provider_with_sessions_from_is_connected_through_its_owner() {
    let w = World::new().await;
    let srv = w
        .start(&Extra {
            zillow: "\n[providers.spark-two]\nkind = \"spark\"\napi_base = \"http://127.0.0.1:9\"\nsessions_from = \"spark\"\n".into(),
            ..Extra::default()
        })
        .await;
    let r = no_redirects()
        .get(url(srv.admin_addr, "/connect/spark-two"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    let page = r.text().await.expect("page");
    assert!(page.contains("connect spark instead"), "{page}");
    assert_eq!(w.spark.token_calls(), 0);
    srv.shutdown().await;
}
