//! The headless-Chromium harness, exercised on the Spark stand-in's own
//! authorisation pages: log in, allow, land on the application's return_to
//! with a code that the token endpoint redeems once. Also keeps screenshots
//! of the pages at phone and desktop widths in target/screenshots/.

#[path = "support/browser.rs"]
mod browser;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::response::Html;
use axum::routing::{get, post};
use axum::Router;
use browser::Browser;
use credproxy_standins::{Options, Standin};
use serde_json::{json, Value};
use tokio::sync::Notify;

/// Every query the application's landing page received.
type Landed = Arc<Mutex<Vec<String>>>;

/// A stand-in for the application behind return_to: answers its query as text.
async fn start_landing_page() -> (String, Landed) {
    let landed = Landed::default();
    let app = Router::new()
        .route(
            "/landing",
            get(
                |State(landed): State<Landed>, RawQuery(query): RawQuery| async move {
                    let query = query.unwrap_or_default();
                    landed.lock().unwrap().push(query.clone());
                    query
                },
            ),
        )
        .with_state(landed.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, landed)
}

async fn redeem(spark: &Standin, code: &str, redirect_uri: &str) -> (u16, Value) {
    let o = spark.options();
    let resp = reqwest::Client::new()
        .post(spark.token_url())
        .json(&json!({
            "client_id": o.client_id,
            "client_secret": o.client_secret,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
        }))
        .send()
        .await
        .expect("token request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json answer"))
}

/// Screenshots of the current page at 375 and 1280 px; checks that nothing
/// sticks out sideways at either width.
async fn screenshots(b: &Browser, name: &str) {
    for width in [375, 1280] {
        b.set_width(width).await;
        assert_eq!(b.inner_width().await, u64::from(width), "viewport width");
        let overflow = b
            .client
            .execute(
                "return document.documentElement.scrollWidth - window.innerWidth;",
                vec![],
            )
            .await
            .expect("scrollWidth");
        assert!(
            overflow.as_i64().is_some_and(|o| o <= 0),
            "{name} scrolls sideways at {width} px: {overflow}"
        );
        let path = b.screenshot(&format!("{name}-{width}")).await;
        println!("screenshot: {}", path.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spark_hybrid_login_in_a_browser() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let spark = Standin::start(Options::spark())
        .await
        .expect("spark stand-in");
    let (app, landed) = start_landing_page().await;
    let return_to = format!("{app}/landing?state=st-42");
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("openid.mode", "checkid_setup")
        .append_pair("openid.return_to", &return_to)
        .append_pair("openid.spark.client_id", &spark.options().client_id)
        .append_pair("openid.spark.combined_flow", "true")
        .finish();

    // A request the stand-in refuses: a page saying why, and no form.
    let wrong = query.replace("spark-client", "someone-else");
    b.goto(&format!("{}?{wrong}", spark.authorize_url())).await;
    assert!(b
        .text("#problems")
        .await
        .contains("\"someone-else\" is not a client this provider knows"));
    screenshots(&b, "spark-bad-request").await;

    b.goto(&format!("{}?{query}", spark.authorize_url())).await;
    b.wait_for("#username").await;
    assert_eq!(
        b.client.title().await.expect("title"),
        "Sign in \u{2013} Spark stand-in"
    );
    assert_eq!(
        spark.last_authorize_query().as_deref(),
        Some(query.as_str())
    );
    screenshots(&b, "spark-login").await;

    // Empty credentials: the same page again, saying why.
    b.click_and_navigate("#login", "#error").await;
    assert!(b.text("#error").await.contains("username and a password"));
    screenshots(&b, "spark-login-error").await;

    b.fill("#username", "agent@example.test").await;
    b.fill("#password", "correct horse").await;
    b.click_and_navigate("#login", "#allow").await;
    assert_eq!(
        b.text("h1").await,
        "Allow credproxy-tests to access your listings?"
    );
    assert_eq!(b.text("#user").await, "agent@example.test");
    screenshots(&b, "spark-consent").await;

    // The landing page is text/plain, which Chromium shows in a <pre>.
    b.click_and_navigate("#allow", "body > pre").await;
    let shown = b.text("body > pre").await;
    let landed_at = url::Url::parse(&b.current_url().await).expect("landing URL");
    assert_eq!(landed_at.path(), "/landing");
    let param = |name: &str| {
        landed_at
            .query_pairs()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.into_owned())
    };
    assert_eq!(param("state").as_deref(), Some("st-42"));
    assert_eq!(param("openid.mode").as_deref(), Some("id_res"));
    let code = param("openid.spark.code").expect("openid.spark.code");
    assert_eq!(shown, landed_at.query().expect("a query"));
    assert_eq!(landed.lock().unwrap().len(), 1);

    assert_eq!(spark.codes_redeemed(), 0);
    let (status, answer) = redeem(&spark, &code, &return_to).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["access_token"].as_str().is_some());
    let (status, answer) = redeem(&spark, &code, &return_to).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert_eq!(spark.codes_redeemed(), 1);

    b.close().await;
}

/// The page a click leaves: its button posts the form, as the dashboard's and
/// the providers' buttons do, but only a moment after the click (as a page's
/// script may), so that the click command returns well before the browser
/// starts to navigate.
const OLD_PAGE: &str = r#"<!doctype html><title>old</title><p id="which">old</p>
<form id="f" method="post" action="/new"><button id="go" type="button">go</button></form>
<script>
document.getElementById("go").addEventListener("click", () => {
  setTimeout(() => document.getElementById("f").submit(), 500);
});
</script>"#;

/// Two pages that share an element: `/old`, whose button posts to `/new`,
/// whose answer waits until the test releases it (after saying that the
/// request arrived).
async fn start_slow_pages() -> (String, Arc<Notify>, Arc<Notify>) {
    let arrived = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (a, r) = (arrived.clone(), release.clone());
    let app = Router::new()
        .route("/old", get(|| async { Html(OLD_PAGE) }))
        .route(
            "/new",
            post(move || async move {
                a.notify_one();
                r.notified().await;
                Html(r#"<!doctype html><title>new</title><p id="which">new</p>"#)
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, arrived, release)
}

/// The flake of issue 21: after a click, waiting for an element that the old
/// page also has found the old one. `click_and_navigate` must return the new
/// page's element even when the new page answers only after the click.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_that_navigates_waits_for_the_new_page() {
    let Some(b) = Browser::start().await else {
        return;
    };
    let (base, arrived, release) = start_slow_pages().await;
    b.goto(&format!("{base}/old")).await;
    assert_eq!(b.text("#which").await, "old");

    let (which, ()) = tokio::join!(
        async {
            let which = b.click_and_navigate("#go", "#which").await;
            which.text().await.expect("text of #which")
        },
        async {
            tokio::time::timeout(Duration::from_secs(10), arrived.notified())
                .await
                .expect("the click asked for /new");
            release.notify_one();
        },
    );
    assert_eq!(which, "new");
    assert_eq!(b.current_url().await, format!("{base}/new"));

    b.close().await;
}
