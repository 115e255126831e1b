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

/// Follows `/connect/...` to the provider: returns the authorisation URL's
/// query, and the cookie (`name=value`) that binds the flow to this "browser".
async fn start(
    c: &reqwest::Client,
    admin: std::net::SocketAddr,
    path: &str,
) -> (HashMap<String, String>, String) {
    let r = c.get(url(admin, path)).send().await.expect("send");
    assert_eq!(r.status(), 302, "{path}");
    assert_eq!(r.headers()["cache-control"], "no-store");
    let cookie = binding_cookie(&r).expect("a browser flow sets its binding cookie");
    (
        query_of(r.headers()["location"].to_str().expect("ascii")),
        cookie,
    )
}

/// The `name=value` of the binding cookie a `/connect` answer sets.
fn binding_cookie(r: &reqwest::Response) -> Option<String> {
    let line = r.headers().get("set-cookie")?.to_str().expect("ascii");
    Some(line.split(';').next().expect("name=value").to_owned())
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

    let (q, cookie) = start(&c, srv.admin_addr, "/connect/spark").await;
    assert_eq!(q["openid.mode"], "checkid_setup");
    assert_eq!(q["openid.spark.client_id"], w.spark.options().client_id);
    assert_eq!(q["openid.spark.combined_flow"], "true");
    let state = hybrid_state(&q);
    assert!(state.len() >= 22, "128+ bits");

    let code = w.spark.issue_code();
    let cb = format!("/callback/spark?state={state}&openid.mode=id_res&openid.spark.code={code}");
    let r = c
        .get(url(srv.admin_addr, &cb))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("send");
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
    let r = c
        .get(url(srv.admin_addr, &cb))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("send");
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
    let (zq, zcookie) = start(&c, srv.admin_addr, "/connect/zillow").await;
    // An expired one, written as if made 11 minutes ago.
    let old = credproxy::control::connect::new_state();
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
        let r = c
            .get(url(srv.admin_addr, &cb))
            .header("cookie", &zcookie)
            .send()
            .await
            .expect("send");
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
        let (q, cookie) = start(&c, srv.admin_addr, &format!("/connect/{provider}")).await;
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
            .header("cookie", &cookie)
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

    let (q, cookie) = start(&c, srv.admin_addr, "/connect/spark").await;
    let r = c
        .get(url(
            srv.admin_addr,
            &format!(
                "/callback/spark?state={}&openid.mode=cancel",
                hybrid_state(&q)
            ),
        ))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403);
    let html = r.text().await.expect("text");
    assert!(
        html.contains("Access was refused") && html.contains("href=\"/connect/spark\""),
        "{html}"
    );

    let (q, cookie) = start(&c, srv.admin_addr, "/connect/zillow").await;
    let r = c
        .get(url(
            srv.admin_addr,
            &format!("/callback/zillow?error=access_denied&state={}", q["state"]),
        ))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403);
    assert_eq!(w.zillow.token_calls(), 0);

    w.zillow.set_token_mode(TokenMode::Fail500);
    let (q, cookie) = start(&c, srv.admin_addr, "/connect/zillow").await;
    let code = w.zillow.issue_code();
    let r = c
        .get(url(
            srv.admin_addr,
            &format!("/callback/zillow?code={code}&state={}", q["state"]),
        ))
        .header("cookie", &cookie)
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
    assert_eq!(info.status, credproxy::secrets::session::Status::Active);
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
    // The start page offers no Connect for it, and says which one to use.
    let r = no_redirects()
        .get(url(srv.admin_addr, "/"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let page = r.text().await.expect("page");
    assert!(page.contains("href=\"/connect/spark\""), "{page}");
    assert!(!page.contains("/connect/spark-two"), "{page}");
    assert!(
        page.contains("Uses the sessions of Spark API: connect Spark API"),
        "{page}"
    );
    srv.shutdown().await;
}

/// Like [`no_redirects`], sending from `local` (every 127/8 address is this machine).
fn no_redirects_from(local: std::net::IpAddr) -> reqwest::Client {
    let _ = support::client();
    reqwest::Client::builder()
        .no_proxy()
        .local_address(local)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

async fn pending_states(srv: &credproxy::server::Running) -> u64 {
    srv.sessions
        .store()
        .count_pending_oauth_states(credproxy::store::now() - 600)
        .await
        .expect("count")
}

fn unbound_state(created_at: i64) -> credproxy::store::OAuthState {
    credproxy::store::OAuthState {
        provider: "spark".into(),
        session_id: None,
        key_hash: None,
        created_at,
    }
}

/// One unauthenticated client used to write thousands of states a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_rate_limited_per_client_address() {
    let w = World::new().await;
    // The default limit: 30 a minute.
    let srv = w.start(&Extra::default()).await;
    let c = no_redirects();
    let began = std::time::Instant::now();
    let (mut started, mut limited) = (0u64, 0u64);
    for _ in 0..100 {
        let r = c
            .get(url(srv.admin_addr, "/connect/zillow"))
            .send()
            .await
            .expect("send");
        match r.status().as_u16() {
            302 => started += 1,
            429 => {
                limited += 1;
                let retry: u64 = r.headers()["retry-after"]
                    .to_str()
                    .expect("ascii")
                    .parse()
                    .expect("seconds");
                assert!((1..=60).contains(&retry), "{retry}");
                assert!(r.headers().get("set-cookie").is_none());
                assert_eq!(r.headers()["cache-control"], "no-store");
                let html = r.text().await.expect("text");
                assert!(
                    html.contains("Too many attempts") && html.contains("class=\"bar\""),
                    "a page in the house style: {html}"
                );
            }
            s => panic!("/connect answered {s}"),
        }
    }
    // 30 at once, then one more every 2 s.
    let slack = began.elapsed().as_secs() / 2 + 1;
    assert!((30..=30 + slack).contains(&started), "{started} admitted");
    assert_eq!(started + limited, 100);
    assert_eq!(
        pending_states(&srv).await,
        started,
        "a refused request writes no state"
    );

    // Another address has a budget of its own.
    let r = no_redirects_from("127.0.0.2".parse().expect("ip"))
        .get(url(srv.admin_addr, "/connect/zillow"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 302);
    assert_eq!(pending_states(&srv).await, started + 1);

    // `credproxy connect` writes its state itself: not limited.
    let cfg = w.write_config(&Extra::default());
    let out = support::run_cli(&cfg, &["connect", "zillow", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(1), "it waits, then times out");
    assert!(String::from_utf8_lossy(&out.stdout).contains("/connect/zillow?link="));
    assert_eq!(pending_states(&srv).await, started + 2);
    srv.shutdown().await;
}

async fn pending_sign_ins_are_capped(extra: Extra) {
    let w = World::new().await;
    let srv = w
        .start(&Extra {
            server: "connect_pending_limit = 3\nconnect_rate_limit = 1000".into(),
            ..extra
        })
        .await;
    let c = no_redirects();
    let mut flows = Vec::new();
    for _ in 0..3 {
        flows.push(start(&c, srv.admin_addr, "/connect/zillow").await);
    }
    // Expired states are not in progress: they do not count.
    srv.sessions
        .store()
        .insert_oauth_state(&[9u8; 32], &unbound_state(credproxy::store::now() - 700))
        .await
        .expect("insert");
    for provider in ["spark", "zillow"] {
        let r = c
            .get(url(srv.admin_addr, &format!("/connect/{provider}")))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
        assert!(r.headers().get("set-cookie").is_none());
        let html = r.text().await.expect("text");
        assert!(html.contains("Too many sign-ins in progress"), "{html}");
    }
    assert_eq!(
        pending_states(&srv).await,
        3,
        "no state written beyond the cap"
    );

    // A flow that comes back frees its place.
    let (q, cookie) = flows.pop().expect("a flow");
    let code = w.zillow.issue_code();
    let r = c
        .get(url(
            srv.admin_addr,
            &format!("/callback/zillow?code={code}&state={}", q["state"]),
        ))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    start(&c, srv.admin_addr, "/connect/spark").await;
    assert_eq!(pending_states(&srv).await, 3);
    srv.shutdown().await;
}

async fn expired_states_are_forgotten_by_a_timer(extra: Extra) {
    use credproxy::store::OAuthOutcome;
    let w = World::new().await;
    let store_url = extra
        .store_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", w.path("credproxy.db").display()));

    // What a prune forgets: states over 10 minutes old, unless their flow
    // ended (or is still running) within the last 10 minutes.
    {
        let store = credproxy::store::open(&store_url).await.expect("open");
        let now = credproxy::store::now();
        let (old, fresh, taken, taken_long_ago) = ([1u8; 32], [2u8; 32], [3u8; 32], [4u8; 32]);
        for (hash, created) in [
            (old, now - 700),
            (fresh, now),
            (taken, now - 700),
            (taken_long_ago, now - 1_300),
        ] {
            store
                .insert_oauth_state(&hash, &unbound_state(created))
                .await
                .expect("insert");
        }
        // A callback 11 minutes after its /connect (its state older than
        // 10 minutes at any rate when the prune runs) is still running.
        for (hash, at) in [(taken, now), (taken_long_ago, now - 1_200)] {
            assert!(store
                .take_oauth_state(&hash, "spark", at, 0)
                .await
                .expect("take")
                .is_some());
        }
        assert_eq!(store.prune_oauth_states(now - 600).await.expect("prune"), 2);
        for (hash, gone) in [
            (old, true),
            (taken_long_ago, true),
            (fresh, false),
            (taken, false),
        ] {
            let outcome = store.oauth_outcome(&hash).await.expect("outcome");
            assert_eq!(outcome == OAuthOutcome::Unknown, gone, "{hash:?}");
        }
    }

    // The server prunes on a timer (every minute; here every 50 ms), not
    // by chance.
    let mut cfg = w.config(&extra);
    cfg.server.connect.prune_interval = Duration::from_millis(50);
    let srv = credproxy::server::start(cfg).await.expect("start");
    let store = srv.sessions.store();
    let expired = [5u8; 32];
    store
        .insert_oauth_state(&expired, &unbound_state(credproxy::store::now() - 601))
        .await
        .expect("insert");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.oauth_outcome(&expired).await.expect("outcome") != OAuthOutcome::Unknown {
        assert!(
            std::time::Instant::now() < deadline,
            "the expired state was not forgotten within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        store.oauth_outcome(&[2u8; 32]).await.expect("outcome"),
        OAuthOutcome::Pending,
        "a fresh state stays"
    );
    srv.shutdown().await;
}

/// Login CSRF: a callback with a state made in another browser is refused.
async fn a_browser_bound_state_needs_its_cookie(extra: Extra) {
    let w = World::new().await;
    let srv = w.start(&extra).await;
    let c = no_redirects();
    let r = c
        .get(url(srv.admin_addr, "/connect/zillow"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 302);
    let line = r.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/callback", "Max-Age=600"] {
        assert!(
            line.split("; ").any(|a| a == attribute),
            "{attribute}: {line}"
        );
    }
    assert!(!line.contains("Secure"), "public_url is http: {line}");
    let cookie = binding_cookie(&r).expect("cookie");
    let q = query_of(r.headers()["location"].to_str().expect("ascii"));
    // Another flow in the same browser has a cookie of its own.
    let (other_q, other_cookie) = start(&c, srv.admin_addr, "/connect/zillow").await;
    assert_ne!(cookie.split('=').next(), other_cookie.split('=').next());

    let code = w.zillow.issue_code();
    let cb = format!("/callback/zillow?code={code}&state={}", q["state"]);
    let (name, value) = cookie.split_once('=').expect("name=value");
    for bad in [
        None,
        Some(format!("{name}=not-the-value")),
        Some(format!("{name}={value}x")),
        Some(format!("{name}=")),
        Some(other_cookie.clone()),
    ] {
        let mut req = c.get(url(srv.admin_addr, &cb));
        if let Some(b) = &bad {
            req = req.header("cookie", b);
        }
        let r = req.send().await.expect("send");
        assert_eq!(r.status(), 400, "{bad:?}");
        let html = r.text().await.expect("text");
        assert!(html.contains("No code was exchanged"), "{html}");
        assert!(key_on_page(&html).is_none());
    }
    assert_eq!(w.zillow.token_calls(), 0, "no code was exchanged");

    // The right cookie, among others, as a browser sends them: the state
    // was left for it.
    let r = c
        .get(url(srv.admin_addr, &cb))
        .header("cookie", format!("theme=dark; {other_cookie}; {cookie}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let cleared = r.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        cleared.starts_with(&format!("{name}=;")) && cleared.contains("Max-Age=0"),
        "the used binding is cleared: {cleared}"
    );
    assert!(key_on_page(&r.text().await.expect("text")).is_some());
    assert_eq!(w.zillow.token_calls(), 1);

    // The other flow is still good in its browser.
    let code = w.zillow.issue_code();
    let r = c
        .get(url(
            srv.admin_addr,
            &format!("/callback/zillow?code={code}&state={}", other_q["state"]),
        ))
        .header("cookie", &other_cookie)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);

    // A reconnect (admin token) is meant to be handed on: unbound.
    let (id, _, _) = support::add_session(&srv, "spark", &w.spark).await;
    let r = c
        .get(url(srv.admin_addr, &format!("/connect/spark?session={id}")))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 302);
    assert!(r.headers().get("set-cookie").is_none());
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binding_cookie_is_secure_behind_https() {
    let w = World::new().await;
    let srv = w
        .start(&Extra {
            server: "public_url = \"https://creds.example\"".into(),
            ..Extra::default()
        })
        .await;
    let r = no_redirects()
        .get(url(srv.admin_addr, "/connect/spark"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 302);
    let line = r.headers()["set-cookie"].to_str().expect("ascii");
    assert!(line.ends_with("; Secure"), "{line}");
    srv.shutdown().await;
}

/// Runs each of these on SQLite and on PostgreSQL.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Extra::default()).await;
                }
            )*
        }
        mod postgres_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(url) = crate::support::postgres_db(stringify!($name)).await else { return };
                    super::$name(super::Extra { store_url: Some(url), ..super::Extra::default() }).await;
                }
            )*
        }
    };
}

on_both_stores!(
    pending_sign_ins_are_capped,
    expired_states_are_forgotten_by_a_timer,
    a_browser_bound_state_needs_its_cookie,
);
