//! The dashboard at `/ui`: in headless Chromium as an operator uses it (sign
//! in, watch a session turn `refresh_failing` and back, revoke one after the
//! confirmation, reconnect one through the provider's pages, sign out), and
//! over plain HTTP for what a browser would never send (no cookie, a wrong
//! CSRF token, another origin, a tampered cookie). Screenshots at 375 and
//! 1280 px go to target/screenshots/.

#[path = "support/browser.rs"]
mod browser;
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use browser::Browser;
use credproxy::server::Running;
use credproxy_standins::TokenMode;
use fantoccini::Locator;
use support::{add_session, client, url, BinServer, Extra, World, ADMIN_TOKEN};

/// An admin address known before start-up, so that `public_url` (the base
/// of reconnect links and of the provider's redirect) can name it.
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

fn config_at(w: &World, admin: SocketAddr, extra: &Extra) -> String {
    let mut extra = extra.clone();
    if !extra.server.contains("public_url") {
        extra.server = format!("public_url = \"http://{admin}\"\n{}", extra.server);
    }
    w.config_text(&extra).replace(
        "admin_listen = \"127.0.0.1:0\"",
        &format!("admin_listen = \"{admin}\""),
    )
}

async fn start_at(w: &World, admin: SocketAddr, extra: &Extra) -> Running {
    let text = config_at(w, admin, extra);
    let cfg = credproxy::config::Config::parse(&text, std::path::Path::new("t"), |_| None)
        .expect("config");
    credproxy::server::start(cfg).await.expect("start")
}

/// Screenshots at phone and desktop widths; nothing may scroll sideways.
async fn shots(b: &Browser, name: &str) {
    for width in [375, 1280] {
        b.set_width(width).await;
        let scroll_width = b
            .client
            .execute("return document.documentElement.scrollWidth", vec![])
            .await
            .expect("script")
            .as_u64()
            .expect("number");
        assert!(
            scroll_width <= u64::from(width),
            "{name} scrolls sideways at {width} px ({scroll_width})"
        );
        let path = b.screenshot(&format!("{name}-{width}")).await;
        println!("screenshot: {}", path.display());
    }
    b.set_width(1280).await;
}

/// The `data-status` of session `id`'s row.
async fn row_status(b: &Browser, id: &str) -> String {
    b.wait_for(&format!("#row-{id}"))
        .await
        .attr("data-status")
        .await
        .expect("attr")
        .expect("data-status")
}

async fn rows(b: &Browser) -> usize {
    b.client
        .find_all(Locator::Css("#sessions tbody tr"))
        .await
        .expect("rows")
        .len()
}

async fn source(b: &Browser) -> String {
    b.client.source().await.expect("page source")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let w = World::new().await;
    let admin = free_port();
    let srv = start_at(&w, admin, &Extra::default()).await;
    let base = format!("http://{admin}");
    let (failing, failing_key, failing_tokens) = add_session(&srv, "spark", &w.spark).await;
    let (doomed, doomed_key, doomed_tokens) = add_session(&srv, "zillow", &w.zillow).await;
    let (lapsed, lapsed_key, lapsed_tokens) = add_session(&srv, "spark", &w.spark).await;
    let mut pages = Vec::new();

    // Not signed in: the dashboard sends the person to the sign-in form.
    b.goto(&format!("{base}/ui")).await;
    b.wait_for("#token").await;
    assert_eq!(b.current_url().await, format!("{base}/ui/login"));
    assert_eq!(
        b.client.title().await.expect("title"),
        "Sign in – credproxy"
    );
    shots(&b, "ui-sign-in").await;

    // A wrong token: the form again, saying so; then the right one.
    b.fill("#token", "certainly-not-the-admin-token").await;
    b.click_and_navigate("#sign-in", "#error").await;
    assert!(b.text("#error").await.contains("not the admin token"));
    pages.push(source(&b).await);
    b.fill("#token", ADMIN_TOKEN).await;
    b.click_and_navigate("#sign-in", "#sessions").await;
    assert_eq!(b.current_url().await, format!("{base}/ui"));
    for id in [&failing, &doomed, &lapsed] {
        assert_eq!(row_status(&b, id).await, "active");
    }
    assert!(b.text("#counts").await.contains("3 sessions"));

    // The token endpoint fails: refresh now says so, and the session shows
    // refresh_failing with its reason and next retry.
    w.spark.set_token_mode(TokenMode::Fail500);
    b.click_and_navigate(&format!("#refresh-{failing}"), "#flash")
        .await;
    let flash = b.text("#flash").await;
    assert!(flash.contains("failed to refresh"), "{flash}");
    assert_eq!(row_status(&b, &failing).await, "refresh_failing");
    assert_eq!(
        b.text(&format!("#status-{failing}")).await,
        "Refresh failing"
    );
    let reason = b.text(&format!("#reason-{failing}")).await;
    assert!(
        reason.contains("server error") && reason.contains("token_endpoint_error"),
        "{reason}"
    );
    let retry = b.text(&format!("#retry-{failing}")).await;
    assert!(retry.starts_with("Next retry"), "{retry}");
    pages.push(source(&b).await);
    shots(&b, "ui-sessions").await;

    // Filters: by status (a link), by provider (the form).
    b.click_and_navigate("#count-refresh_failing", "#sessions")
        .await;
    assert_eq!(rows(&b).await, 1);
    assert_eq!(row_status(&b, &failing).await, "refresh_failing");
    b.wait_for("#filter-provider")
        .await
        .select_by_value("zillow")
        .await
        .expect("select zillow");
    b.wait_for("#filter-status")
        .await
        .select_by_value("")
        .await
        .expect("select all statuses");
    b.click_and_navigate("#filter", "#sessions").await;
    assert!(b.current_url().await.contains("provider=zillow"));
    assert_eq!(rows(&b).await, 1);
    assert_eq!(row_status(&b, &doomed).await, "active");
    b.click_and_navigate("#show-all", "#sessions").await;
    assert_eq!(rows(&b).await, 3);

    // The endpoint works again: once the back-off has passed, refresh now
    // brings the session back to active.
    w.spark.set_token_mode(TokenMode::Normal);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        b.click_and_navigate(&format!("#refresh-{failing}"), "#flash")
            .await;
        if row_status(&b, &failing).await == "active" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still not active: {}",
            b.text("#flash").await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let flash = b.text("#flash").await;
    assert!(flash.contains("was refreshed"), "{flash}");
    assert!(
        b.client
            .find_all(Locator::Css(&format!("#reason-{failing}")))
            .await
            .expect("find")
            .is_empty(),
        "an active session shows no failure"
    );
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/listings"))
        .header("X-Credproxy-Session", &failing_key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    b.goto(&format!("{base}/ui")).await;
    let used = b
        .text(&format!("#row-{failing} td[data-label='Last used']"))
        .await;
    assert!(!used.contains("not yet"), "{used}");

    // Revoke, with a confirmation: Cancel changes nothing, Revoke deletes.
    b.click_and_navigate(&format!("#revoke-{doomed}"), "#confirm-revoke")
        .await;
    assert!(b.text("h1").await.contains(&doomed));
    shots(&b, "ui-revoke").await;
    b.click_and_navigate("#cancel", "#sessions").await;
    assert_eq!(rows(&b).await, 3);
    b.click_and_navigate(&format!("#revoke-{doomed}"), "#confirm-revoke")
        .await;
    b.click_and_navigate("#confirm-revoke", "#flash").await;
    let flash = b.text("#flash").await;
    assert!(flash.contains("was revoked"), "{flash}");
    assert_eq!(rows(&b).await, 2);
    let r = client()
        .get(url(
            srv.proxy_addr,
            &format!("/zillow/listings/v1/listingsForUser?accessToken={doomed_key}"),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    assert_eq!(support::error_code(&r).as_deref(), Some("unknown_session"));

    // Reconnect: a one-time link, followed through the provider's pages;
    // the session keeps its key and gets new tokens.
    let link = b
        .click_and_navigate(&format!("#reconnect-{lapsed}"), "#reconnect-link")
        .await
        .attr("href")
        .await
        .expect("attr")
        .expect("href");
    assert!(
        link.starts_with(&format!("{base}/connect/spark?link=")),
        "{link}"
    );
    let shown = b
        .wait_for("#reconnect-url")
        .await
        .prop("value")
        .await
        .expect("value")
        .expect("a link");
    assert_eq!(shown, link);
    shots(&b, "ui-reconnect").await;
    b.click_and_navigate("#reconnect-link", "#username").await;
    b.fill("#username", "agent@example.com").await;
    b.fill("#password", "correct horse").await;
    b.click_and_navigate("#login", "#allow").await;
    b.click_and_navigate("#allow", "h1").await;
    assert!(b.text("h1").await.contains("connected"));
    assert!(b.text(".lead").await.contains("has new tokens"));
    assert!(b
        .current_url()
        .await
        .starts_with(&format!("{base}/callback/spark?")));
    assert_eq!(w.spark.codes_redeemed(), 1);
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/listings"))
        .header("X-Credproxy-Session", &lapsed_key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let sent = w
        .spark
        .last_request()
        .and_then(|r| r.header("authorization").map(str::to_owned))
        .expect("an Authorization header upstream");
    assert!(
        !sent.contains(&lapsed_tokens.access_token),
        "the reconnected session sends its new token"
    );
    // The link worked once.
    b.goto(&link).await;
    assert!(b.text("h1").await.contains("Link expired"));

    // Sign out: the dashboard asks for the token again.
    b.goto(&format!("{base}/ui")).await;
    pages.push(source(&b).await);
    b.click_and_navigate("#sign-out", "#note").await;
    assert!(b.text("#note").await.contains("signed out"));
    b.goto(&format!("{base}/ui")).await;
    b.wait_for("#token").await;
    assert!(b.current_url().await.ends_with("/ui/login"));

    // No page showed a token, a key or the admin token.
    let mut secrets = vec![ADMIN_TOKEN.to_owned(), failing_key, doomed_key, lapsed_key];
    for t in [&failing_tokens, &doomed_tokens, &lapsed_tokens] {
        secrets.push(t.access_token.clone());
        secrets.push(t.refresh_token.clone());
    }
    secrets.extend(w.spark.all_tokens());
    secrets.extend(w.zillow.all_tokens());
    for page in &pages {
        for s in &secrets {
            assert!(!page.contains(s.as_str()), "a page shows a secret");
        }
    }

    b.close().await;
    srv.shutdown().await;
}

/// A client that shows redirects instead of following them.
fn plain_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Signs in; the `name=value` of the sign-in cookie and its whole `Set-Cookie`.
async fn sign_in(c: &reqwest::Client, admin: SocketAddr) -> (String, String) {
    let r = c
        .post(url(admin, "/ui/login"))
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui");
    let set = r.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let pair = set.split(';').next().expect("name=value").to_owned();
    assert!(pair.starts_with("credproxy_ui=v1."), "{set}");
    (pair, set)
}

/// The dashboard's HTML for `cookie`, and the CSRF token its forms carry.
async fn dashboard(c: &reqwest::Client, admin: SocketAddr, cookie: &str) -> (String, String) {
    let r = c
        .get(url(admin, "/ui"))
        .header("Cookie", cookie)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let html = r.text().await.expect("text");
    let marker = "name=\"csrf\" value=\"";
    let at = html.find(marker).expect("a CSRF field") + marker.len();
    let end = html[at..].find('"').expect("end of value") + at;
    let csrf = html[at..end].to_owned();
    (html, csrf)
}

#[tokio::test]
async fn forms_without_the_cookie_or_with_a_wrong_csrf_token_change_nothing() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let admin = srv.admin_addr;
    let (id, _, _) = add_session(&srv, "spark", &w.spark).await;
    let c = plain_client();

    // Without a cookie: GET goes to the sign-in form.
    let r = c.get(url(admin, "/ui")).send().await.expect("send");
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/login");
    let r = c.get(url(admin, "/ui/login")).send().await.expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(
        !csp.contains("unsafe") && !csp.contains("script-src"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");

    // Signing in: an HttpOnly, SameSite=Strict cookie for /ui that expires
    // and holds no admin token.
    let (cookie, set) = sign_in(&c, admin).await;
    for attr in ["Max-Age=28800", "Path=/ui", "HttpOnly", "SameSite=Strict"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(!set.contains("Secure"), "http public_url: {set}");
    assert!(!set.contains(ADMIN_TOKEN));
    let (html, csrf) = dashboard(&c, admin, &cookie).await;
    assert!(html.contains(&id));
    assert!(!html.contains(ADMIN_TOKEN));
    assert!(!csrf.is_empty() && !cookie.contains(&csrf));

    let revoke = url(admin, &format!("/ui/sessions/{id}/revoke"));
    let refused = |r: reqwest::Response| {
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()["cache-control"], "no-store");
    };
    // No cookie, even with the right CSRF token.
    refused(
        c.post(&revoke)
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .expect("send"),
    );
    // The cookie, without a CSRF token, with a wrong one, or with the CSRF
    // token of another sign-in.
    refused(
        c.post(&revoke)
            .header("Cookie", &cookie)
            .send()
            .await
            .expect("send"),
    );
    for bad in ["", "x", &csrf[..csrf.len() - 1], &format!("{csrf}A")] {
        refused(
            c.post(&revoke)
                .header("Cookie", &cookie)
                .form(&[("csrf", bad)])
                .send()
                .await
                .expect("send"),
        );
    }
    let (other_cookie, _) = sign_in(&c, admin).await;
    let (_, other_csrf) = dashboard(&c, admin, &other_cookie).await;
    assert_ne!(other_csrf, csrf);
    refused(
        c.post(&revoke)
            .header("Cookie", &cookie)
            .form(&[("csrf", other_csrf.as_str())])
            .send()
            .await
            .expect("send"),
    );
    // The right pair, from another site.
    refused(
        c.post(&revoke)
            .header("Cookie", &cookie)
            .header("Origin", "http://evil.example")
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .expect("send"),
    );
    refused(
        c.post(&revoke)
            .header("Cookie", &cookie)
            .header("Origin", "null")
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .expect("send"),
    );
    refused(
        c.post(&revoke)
            .header("Cookie", &cookie)
            .header("Sec-Fetch-Site", "cross-site")
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .expect("send"),
    );
    // A cookie whose expiry was moved.
    let parts: Vec<&str> = cookie.split('.').collect();
    let later: i64 = parts[1].parse().expect("expiry");
    let tampered = format!("{}.{}.{}.{}", parts[0], later + 3600, parts[2], parts[3]);
    refused(
        c.post(&revoke)
            .header("Cookie", &tampered)
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .expect("send"),
    );
    // Refresh and reconnect are guarded the same way.
    for action in ["refresh", "reconnect"] {
        refused(
            c.post(url(admin, &format!("/ui/sessions/{id}/{action}")))
                .header("Cookie", &cookie)
                .form(&[("csrf", "wrong")])
                .send()
                .await
                .expect("send"),
        );
    }
    assert!(
        srv.sessions.info(&id).await.expect("info").is_some(),
        "nothing was revoked"
    );
    assert_eq!(w.spark.token_calls(), 0, "nothing was refreshed");

    // The right pair from our own page: revoked, then back to the table.
    let r = c
        .post(&revoke)
        .header("Cookie", &cookie)
        .header("Origin", format!("http://{admin}"))
        .header("Sec-Fetch-Site", "same-origin")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui");
    let flash = r.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(flash.starts_with("credproxy_ui_flash="), "{flash}");
    assert!(srv.sessions.info(&id).await.expect("info").is_none());
    let flash_pair = flash.split(';').next().expect("pair");
    let r = c
        .get(url(admin, "/ui"))
        .header("Cookie", format!("{cookie}; {flash_pair}"))
        .send()
        .await
        .expect("send");
    let html = r.text().await.expect("text");
    assert!(
        html.contains(&format!("Session {id} was revoked")),
        "{html}"
    );

    // Signed out: that cookie no longer works; the other sign-in still does.
    let r = c
        .post(url(admin, "/ui/logout"))
        .header("Cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 303);
    assert!(r.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .contains("Max-Age=0"));
    let r = c
        .get(url(admin, "/ui"))
        .header("Cookie", &cookie)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/login?why=expired");
    dashboard(&c, admin, &other_cookie).await;

    // The proxy listener serves no dashboard.
    let r = c
        .get(url(srv.proxy_addr, "/ui/login"))
        .send()
        .await
        .expect("send");
    assert_ne!(r.status(), 200);
    srv.shutdown().await;
}

#[tokio::test]
async fn a_changed_admin_token_signs_everyone_out_and_https_cookies_are_secure() {
    let w = World::new().await;
    let admin = free_port();
    let https = Extra {
        server: "public_url = \"https://creds.example\"".to_owned(),
        ..Extra::default()
    };
    let srv = start_at(&w, admin, &https).await;
    let c = plain_client();
    let (cookie, set) = sign_in(&c, admin).await;
    assert!(set.ends_with("; Secure"), "{set}");
    // A form from public_url's origin is our own.
    let (_, csrf) = dashboard(&c, admin, &cookie).await;
    let r = c
        .post(url(admin, "/ui/logout"))
        .header("Cookie", &cookie)
        .header("Origin", "https://creds.example")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 303);
    let (cookie, _) = sign_in(&c, admin).await;
    srv.shutdown().await;

    // The same store, another admin token: the old cookie proves nothing.
    let other = Extra {
        admin: Some("token = \"a-brand-new-admin-token-4242\"".to_owned()),
        ..https
    };
    let srv = start_at(&w, admin, &other).await;
    let r = c
        .get(url(admin, "/ui"))
        .header("Cookie", &cookie)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/login?why=expired");
    srv.shutdown().await;
}

#[tokio::test]
async fn without_an_admin_token_the_dashboard_is_not_found() {
    let w = World::new().await;
    let srv = w
        .start(&Extra {
            admin: Some(String::new()),
            ..Extra::default()
        })
        .await;
    let c = plain_client();
    for path in ["/ui", "/ui/login", "/ui/sessions/s_1/revoke"] {
        let r = c.get(url(srv.admin_addr, path)).send().await.expect("send");
        assert_eq!(r.status(), 404, "{path}");
    }
    for path in ["/ui/login", "/ui/logout", "/ui/sessions/s_1/refresh"] {
        let r = c
            .post(url(srv.admin_addr, path))
            .form(&[("token", "anything")])
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 404, "{path}");
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn sign_in_attempts_are_rate_limited() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let c = plain_client();
    let attempt = |token: &'static str| {
        c.post(url(srv.admin_addr, "/ui/login"))
            .form(&[("token", token)])
            .send()
    };
    for _ in 0..credproxy::control::ui::SIGN_INS_PER_MINUTE {
        let r = attempt("a-guess").await.expect("send");
        assert_eq!(r.status(), 401);
        let html = r.text().await.expect("text");
        assert!(html.contains("not the admin token"));
    }
    let r = attempt("a-guess").await.expect("send");
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=6).contains(&wait), "{wait}");
    // Even the right token waits: guessing cannot go faster by luck.
    let r = attempt(ADMIN_TOKEN).await.expect("send");
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("set-cookie").is_none());
    srv.shutdown().await;
}

/// The real binary at `RUST_LOG=trace`: signing in, every action and
/// signing out leave no admin token, cookie, CSRF token, reconnect link,
/// session key or token in its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_logs_no_secret() {
    let w = World::new().await;
    let tokens = w.spark.issue_tokens();
    let cfg = w.write_config(&Extra::default());
    let added = support::cli_add(&cfg, "spark", &tokens);
    let id = added["id"].as_str().expect("id").to_owned();
    let key = added["session_key"].as_str().expect("key").to_owned();
    let other = support::cli_add(&cfg, "spark", &w.spark.issue_tokens());
    let other_id = other["id"].as_str().expect("id").to_owned();
    let mut srv = BinServer::spawn(&cfg, "trace");
    let admin = srv.admin_addr;
    let c = plain_client();

    let (cookie, _) = sign_in(&c, admin).await;
    let (_, csrf) = dashboard(&c, admin, &cookie).await;
    let post = |path: String, csrf: &str| {
        c.post(url(admin, &path))
            .header("Cookie", &cookie)
            .form(&[("csrf", csrf)])
            .send()
    };
    let r = post(format!("/ui/sessions/{id}/refresh"), &csrf)
        .await
        .expect("send");
    assert_eq!(r.status(), 303);
    let r = post(format!("/ui/sessions/{id}/reconnect"), &csrf)
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let html = r.text().await.expect("text");
    let at = html.find("?link=").expect("a reconnect link") + "?link=".len();
    let end = html[at..].find('"').expect("end") + at;
    let link = html[at..end].to_owned();
    assert!(link.len() >= 40, "{link}");
    let r = post(format!("/ui/sessions/{other_id}/revoke"), "wrong")
        .await
        .expect("send");
    assert_eq!(r.status(), 403);
    let r = post(format!("/ui/sessions/{other_id}/revoke"), &csrf)
        .await
        .expect("send");
    assert_eq!(r.status(), 303);
    let r = c
        .post(url(admin, "/ui/login"))
        .form(&[("token", "wrong-admin-token-for-the-log-test")])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let r = post("/ui/logout".to_owned(), &csrf).await.expect("send");
    assert_eq!(r.status(), 303);

    assert!(srv.terminate().success());
    srv.stderr
        .wait_for(Duration::from_secs(5), |l| l == "\u{0}eof");
    let logs = format!(
        "{}\n{}",
        srv.stdout.all().join("\n"),
        srv.stderr.all().join("\n")
    );
    assert!(
        logs.contains("session refreshed via the dashboard"),
        "{logs}"
    );
    let cookie_value = cookie.trim_start_matches("credproxy_ui=").to_owned();
    let mac = cookie_value.rsplit('.').next().expect("mac").to_owned();
    let mut secrets = w.secrets();
    secrets.extend([
        cookie_value,
        mac,
        csrf,
        link,
        key,
        "wrong-admin-token-for-the-log-test".to_owned(),
        tokens.access_token,
        tokens.refresh_token,
    ]);
    secrets.extend(w.spark.all_tokens());
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "a log line carries a secret");
    }
}

#[tokio::test]
async fn a_refused_refresh_token_shows_reconnect_needed() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let admin = srv.admin_addr;
    let (id, _, _) = add_session(&srv, "zillow", &w.zillow).await;
    let c = plain_client();
    let (cookie, _) = sign_in(&c, admin).await;
    let (html, csrf) = dashboard(&c, admin, &cookie).await;
    assert!(html.contains(&format!("id=\"refresh-{id}\"")));

    w.zillow.set_token_mode(TokenMode::InvalidGrant);
    let r = c
        .post(url(admin, &format!("/ui/sessions/{id}/refresh")))
        .header("Cookie", &cookie)
        .form(&[("csrf", csrf.as_str()), ("provider", "zillow")])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 303);
    // Back to the filtered table the form came from.
    assert_eq!(r.headers()["location"], "/ui?provider=zillow");
    let flash = r.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let flash_pair = flash.split(';').next().expect("pair");
    let r = c
        .get(url(admin, "/ui?provider=zillow"))
        .header("Cookie", format!("{cookie}; {flash_pair}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    // The flash is shown once: the answer removes its cookie.
    assert!(r.headers().get_all("set-cookie").iter().any(|v| v
        .to_str()
        .is_ok_and(|v| v.starts_with("credproxy_ui_flash=;"))));
    let html = r.text().await.expect("text");
    assert!(html.contains("refused session"), "{html}");
    assert!(html.contains("data-status=\"reauthorization_required\""));
    assert!(html.contains("Reconnect needed") && html.contains("<code>invalid_grant</code>"));
    assert!(
        !html.contains(&format!("id=\"refresh-{id}\"")),
        "no Refresh now for a refused refresh token"
    );
    assert!(html.contains(&format!("id=\"reconnect-{id}\"")));
    srv.shutdown().await;
}

/// A session's keys in the browser: listed from the sessions table, one
/// revoked with its button (it stops working at once; the first key goes on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_keys_are_listed_and_one_is_revoked_in_the_browser() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let w = World::new().await;
    let admin = free_port();
    let srv = start_at(&w, admin, &Extra::default()).await;
    let base = format!("http://{admin}");
    let (id, first, _) = add_session(&srv, "spark", &w.spark).await;
    let scope = credproxy::tokens::sessions::ScopeAsked::parse(
        Some("GET"),
        Some("/v1/listings*"),
        Some("100/1m"),
        None,
    )
    .expect("scope");
    let added = srv
        .sessions
        .add_key(
            &id,
            Some("feed".into()),
            scope,
            credproxy::audit::Actor::Cli,
        )
        .await
        .expect("key added");
    let key = added.key.expose().to_owned();

    b.goto(&format!("{base}/ui")).await;
    b.fill("#token", ADMIN_TOKEN).await;
    b.click_and_navigate("#sign-in", "#sessions").await;
    b.click_and_navigate(&format!("#keys-{id}"), "#keys").await;
    let listed = b.text("#keys").await;
    assert!(
        listed.contains(&added.key_id) && listed.contains("feed"),
        "{listed}"
    );
    assert!(listed.contains("GET /v1/listings* 100/1m"), "{listed}");
    assert!(
        !source(&b).await.contains(&key),
        "the page never shows a key"
    );
    shots(&b, "ui-keys").await;

    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/listings"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    b.click_and_navigate(&format!("#revoke-key-{}", added.key_id), "#flash")
        .await;
    assert!(b.text("#flash").await.contains("was revoked"));
    assert!(!b.text("#keys").await.contains(&added.key_id));
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/listings"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/listings"))
        .header("X-Credproxy-Session", &first)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    b.close().await;
    srv.shutdown().await;
}
