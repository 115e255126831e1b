//! End to end in headless Chromium, as a person does it: open credproxy's
//! start page, click Connect, sign in and click Allow at the (stand-in)
//! provider, land on the callback page, read the session key from it, and
//! use the key for a proxied request. Screenshots of every page, at phone
//! and desktop widths, go to target/screenshots/.

#[path = "support/browser.rs"]
mod browser;
mod support;

use std::net::SocketAddr;

use browser::Browser;
use support::{client, url, Extra, World};

/// An admin address known before start-up: the provider must be told where
/// to send the person back (`public_url`).
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

async fn shots(b: &Browser, name: &str) {
    for width in [375, 1280] {
        b.set_width(width).await;
        b.screenshot(&format!("{name}-{width}")).await;
        let scroll_width: u64 = b
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
    }
    b.set_width(1280).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_in_a_real_browser_then_use_the_key() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let w = World::new().await;
    let admin = free_port();
    let extra = Extra {
        server: format!("public_url = \"http://{admin}\""),
        ..Extra::default()
    };
    let text = w.config_text(&extra).replace(
        "admin_listen = \"127.0.0.1:0\"",
        &format!("admin_listen = \"{admin}\""),
    );
    let cfg = credproxy::config::Config::parse(&text, std::path::Path::new("t"), |_| None)
        .expect("config");
    let srv = credproxy::server::start(cfg).await.expect("start");

    // The start page.
    b.goto(&format!("http://{admin}/")).await;
    b.wait_for("#connect-spark").await;
    assert_eq!(
        b.client.title().await.expect("title"),
        "Connect an account – credproxy"
    );
    shots(&b, "credproxy-start").await;

    // Connect Spark: the stand-in's sign-in and consent pages.
    b.click_and_navigate("#connect-spark", "#username").await;
    shots(&b, "provider-login").await;
    b.fill("#username", "agent@example.com").await;
    b.fill("#password", "correct horse").await;
    b.click_and_navigate("#login", "#allow").await;
    shots(&b, "provider-consent").await;
    // Back on credproxy: the key, once.
    let field = b.click_and_navigate("#allow", "#session-key").await;
    assert!(b
        .current_url()
        .await
        .starts_with(&format!("http://{admin}/callback/spark?")));
    let key = field.prop("value").await.expect("value").expect("a key");
    assert!(key.starts_with("cpk_"), "{key}");
    let copy = b.wait_for("#copy").await;
    assert!(
        copy.is_displayed().await.expect("displayed"),
        "the Copy button appears with JavaScript on"
    );
    let curl = b.text("#curl").await;
    assert!(
        curl.contains(&key) && curl.contains(&srv.proxy_addr.to_string()),
        "{curl}"
    );
    shots(&b, "credproxy-connected").await;
    assert_eq!(w.spark.codes_redeemed(), 1);

    // The key works, as the page's curl line says.
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/listings?_limit=1"))
        .header("Authorization", format!("OAuth {key}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);

    // Going back to the same callback URL does not show the key again.
    let callback = b.current_url().await;
    b.goto(&callback).await;
    b.wait_for("h1").await;
    assert!(b.text("h1").await.contains("not valid"));
    shots(&b, "credproxy-bad-state").await;

    // Zillow, refused at the provider: a page that says so, and a way back.
    b.goto(&format!("http://{admin}/")).await;
    b.click_and_navigate("#connect-zillow", "#username").await;
    b.fill("#username", "manager@example.com").await;
    b.fill("#password", "secret").await;
    b.click_and_navigate("#login", "#deny").await;
    b.click_and_navigate("#deny", "#retry").await;
    assert!(b.text("h1").await.contains("refused"));
    shots(&b, "credproxy-refused").await;
    assert_eq!(w.zillow.token_calls(), 0);

    b.close().await;
    srv.shutdown().await;
}
