//! The authorisation pages, walked through the way a browser would: GET the
//! page, post the login form with its hidden fields, post the consent form,
//! follow nothing and read the redirect.

use base64::Engine;
use credproxy_standins::{Options, Standin};
use reqwest::redirect::Policy;
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .expect("client")
}

fn query(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// Undoes the page's HTML escaping.
fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// The value of attribute `name` in the tag starting at `tag`.
fn attr(tag: &str, name: &str) -> Option<String> {
    let end = tag.find('>')?;
    let tag = &tag[..end];
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let len = tag[start..].find('"')?;
    Some(unescape(&tag[start..start + len]))
}

/// Every hidden field of every form of `html`, in order.
fn hidden_fields(html: &str) -> Vec<(String, String)> {
    html.match_indices("<input type=\"hidden\"")
        .map(|(i, _)| {
            let tag = &html[i..];
            (
                attr(tag, "name").expect("name"),
                attr(tag, "value").expect("value"),
            )
        })
        .collect()
}

/// The `action` of the first form of `html`.
fn form_action(html: &str) -> String {
    let i = html.find("<form").expect("a form");
    attr(&html[i..], "action").expect("action")
}

async fn get(url: &str) -> (u16, String) {
    let resp = client().get(url).send().await.expect("GET");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

async fn post_form(s: &Standin, action: &str, fields: &[(String, String)]) -> reqwest::Response {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    client()
        .post(format!("{}{action}", s.base_url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("POST")
}

/// Opens `url`, logs in as `username`, and answers the consent page with
/// `decision`; the redirect's `Location`.
async fn authorise(s: &Standin, url: &str, username: &str, decision: &str) -> String {
    let (status, login) = get(url).await;
    assert_eq!(status, 200, "{login}");
    let mut fields = hidden_fields(&login);
    fields.push(("username".into(), username.into()));
    fields.push(("password".into(), "hunter2".into()));
    let resp = post_form(s, &form_action(&login), &fields).await;
    assert_eq!(resp.status(), 200);
    let consent = resp.text().await.expect("consent page");
    assert!(consent.contains("Allow credproxy-tests to access your listings?"));
    assert!(consent.contains(
        r#"<button id="allow" type="submit" name="decision" value="allow">Allow</button>"#
    ));
    let mut fields = hidden_fields(&consent);
    fields.push(("decision".into(), decision.into()));
    let resp = post_form(s, &form_action(&consent), &fields).await;
    assert_eq!(resp.status(), 302);
    resp.headers()["location"]
        .to_str()
        .expect("ascii location")
        .to_owned()
}

/// The value of `name` in `url`'s query.
fn param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    form_urlencoded::parse(query.as_bytes())
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.into_owned())
}

async fn spark_redeem(s: &Standin, code: &str, redirect_uri: &str) -> (u16, Value) {
    let body = json!({
        "client_id": s.options().client_id,
        "client_secret": s.options().client_secret,
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
    });
    let resp = client()
        .post(s.token_url())
        .json(&body)
        .send()
        .await
        .expect("token request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json answer"))
}

async fn zillow_redeem(s: &Standin, code: &str, redirect_uri: &str) -> (u16, Value) {
    let o = s.options();
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", o.client_id, o.client_secret));
    let resp = client()
        .post(s.token_url())
        .header("authorization", format!("Basic {basic}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(query(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
        ]))
        .send()
        .await
        .expect("token request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json answer"))
}

fn hybrid_url(s: &Standin, return_to: &str, client_id: &str) -> String {
    let q = query(&[
        ("openid.mode", "checkid_setup"),
        ("openid.return_to", return_to),
        ("openid.spark.client_id", client_id),
        ("openid.spark.combined_flow", "true"),
    ]);
    format!("{}?{q}", s.authorize_url())
}

fn oauth2_url(base: &str, client_id: &str, redirect_uri: &str, state: Option<&str>) -> String {
    let mut pairs = vec![
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
    ];
    pairs.extend(state.map(|s| ("state", s)));
    format!("{base}?{}", query(&pairs))
}

#[tokio::test]
async fn spark_hybrid_flow() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let id = s.options().client_id.clone();
    assert_eq!(s.last_authorize_query(), None);

    // The state travels in return_to's own query: the answer is appended with '&'.
    let return_to = "http://127.0.0.1:8081/callback/spark?state=st-1";
    let url = hybrid_url(&s, return_to, &id);
    let (status, login) = get(&url).await;
    assert_eq!(status, 200);
    assert!(login.contains("<title>Sign in \u{2013} Spark stand-in</title>"));
    assert!(login.contains(r#"<input id="password" name="password" type="password""#));
    assert!(login.contains(r#"<button id="login" type="submit">Log in</button>"#));
    let carried: Vec<(String, String)> = hidden_fields(&login);
    let sent: Vec<(String, String)> =
        form_urlencoded::parse(url.split_once('?').unwrap().1.as_bytes())
            .into_owned()
            .collect();
    assert_eq!(
        carried, sent,
        "the login form carries the original parameters"
    );
    assert_eq!(
        s.last_authorize_query().as_deref(),
        url.split_once('?').map(|(_, q)| q)
    );

    let location = authorise(&s, &url, "agent@example.test", "allow").await;
    let prefix = format!("{return_to}&openid.mode=id_res&openid.spark.code=");
    assert!(location.starts_with(&prefix), "{location}");
    let code = param(&location, "openid.spark.code").expect("code");
    assert_eq!(param(&location, "state").as_deref(), Some("st-1"));

    assert_eq!(s.codes_redeemed(), 0);
    let (status, answer) = spark_redeem(&s, &code, return_to).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["access_token"].as_str().is_some());
    assert_eq!(answer["expires_in"], 86400);
    let (status, answer) = spark_redeem(&s, &code, return_to).await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"], "invalid_grant");
    assert_eq!(s.codes_redeemed(), 1);

    // Refusing: openid.mode=cancel, and '?' when return_to has no query.
    let return_to = "http://127.0.0.1:8081/callback/spark";
    let location = authorise(&s, &hybrid_url(&s, return_to, &id), "agent", "deny").await;
    assert_eq!(location, format!("{return_to}?openid.mode=cancel"));
}

#[tokio::test]
async fn spark_oauth2_flow() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let id = s.options().client_id.clone();
    let base = s.authorize_url_oauth2();
    assert_eq!(base, format!("{}/oauth2", s.base_url()));
    let redirect_uri = "http://127.0.0.1:8081/callback/spark";

    let state = "a b&c=d/é";
    let url = oauth2_url(&base, &id, redirect_uri, Some(state));
    let (_, login) = get(&url).await;
    assert!(login.contains("<title>Sign in \u{2013} Spark stand-in</title>"));
    let location = authorise(&s, &url, "agent", "allow").await;
    assert!(
        location.starts_with(&format!("{redirect_uri}?code=")),
        "{location}"
    );
    assert_eq!(param(&location, "state").as_deref(), Some(state));
    let code = param(&location, "code").expect("code");
    assert_eq!(spark_redeem(&s, &code, redirect_uri).await.0, 200);
    assert_eq!(spark_redeem(&s, &code, redirect_uri).await.0, 400);
    assert_eq!(s.codes_redeemed(), 1);

    let location = authorise(&s, &url, "agent", "deny").await;
    assert_eq!(
        location,
        format!("{redirect_uri}?error=access_denied&state=a+b%26c%3Dd%2F%C3%A9")
    );

    // No state given: none echoed.
    let url = oauth2_url(&base, &id, redirect_uri, None);
    let location = authorise(&s, &url, "agent", "allow").await;
    assert_eq!(param(&location, "state"), None);
    assert!(param(&location, "code").is_some());
    let location = authorise(&s, &url, "agent", "deny").await;
    assert_eq!(location, format!("{redirect_uri}?error=access_denied"));
}

#[tokio::test]
async fn zillow_flow() {
    let s = Standin::start(Options::zillow()).await.expect("start");
    let id = s.options().client_id.clone();
    assert_eq!(s.authorize_url_oauth2(), s.authorize_url());
    let redirect_uri = "https://app.example.test/callback/zillow?tenant=7";

    let url = oauth2_url(&s.authorize_url(), &id, redirect_uri, Some("zs-1"));
    let (_, login) = get(&url).await;
    assert!(login.contains("<title>Sign in \u{2013} Zillow stand-in</title>"));
    let location = authorise(&s, &url, "renter", "allow").await;
    assert!(
        location.starts_with(&format!("{redirect_uri}&code=")),
        "{location}"
    );
    assert!(location.ends_with("&state=zs-1"), "{location}");
    let code = param(&location, "code").expect("code");
    let (status, answer) = zillow_redeem(&s, &code, redirect_uri).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["refresh_token"].as_str().is_some());
    assert_eq!(zillow_redeem(&s, &code, redirect_uri).await.0, 400);
    assert_eq!(s.codes_redeemed(), 1);

    let location = authorise(&s, &url, "renter", "deny").await;
    assert_eq!(
        location,
        format!("{redirect_uri}&error=access_denied&state=zs-1")
    );

    // Zillow has no Spark pages.
    let (status, _) = get(&format!("{}/openid", s.base_url())).await;
    assert_ne!(status, 200);
}

#[tokio::test]
async fn bad_requests_get_a_400_page() {
    let spark = Standin::start(Options::spark()).await.expect("start");
    let zillow = Standin::start(Options::zillow()).await.expect("start");
    let cb = "http://127.0.0.1:8081/callback";

    let cases = [
        (&spark, hybrid_url(&spark, cb, "someone-else"), "is not a client this provider knows"),
        (
            &spark,
            oauth2_url(&spark.authorize_url_oauth2(), "someone-else", cb, Some("s")),
            "is not a client this provider knows",
        ),
        (
            &zillow,
            oauth2_url(&zillow.authorize_url(), "someone-else", cb, Some("s")),
            "is not a client this provider knows",
        ),
        (&spark, spark.authorize_url(), "The parameter openid.return_to is missing."),
        (
            &zillow,
            format!("{}?client_id=zillow-client&response_type=code", zillow.authorize_url()),
            "The parameter redirect_uri is missing.",
        ),
        (
            &zillow,
            oauth2_url(&zillow.authorize_url(), "zillow-client", "/relative", None),
            "is not an absolute http or https URL",
        ),
        (
            &spark,
            format!(
                "{}?openid.mode=checkid_setup&openid.return_to={cb}&openid.spark.client_id=spark-client",
                spark.authorize_url()
            ),
            "The parameter openid.spark.combined_flow is missing.",
        ),
    ];
    for (s, url, expected) in cases {
        let resp = client().get(&url).send().await.expect("GET");
        assert_eq!(resp.status(), 400, "{url}");
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let html = resp.text().await.expect("body");
        assert!(html.contains(expected), "{url}: {html}");
        assert!(!html.contains("<form"), "no login form on an error page");
        assert_eq!(
            s.last_authorize_query(),
            url.split_once('?')
                .map(|(_, q)| q.to_owned())
                .or(Some(String::new()))
        );
    }

    // The login and consent steps only take POST.
    let resp = client()
        .get(format!("{}/openid/login", spark.base_url()))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "POST");
}

#[tokio::test]
async fn empty_credentials_show_the_login_page_again() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let url = hybrid_url(&s, "http://127.0.0.1:8081/callback/spark", "spark-client");
    let (_, login) = get(&url).await;
    for (username, password) in [("", "pw"), ("agent", ""), ("", "")] {
        let mut fields = hidden_fields(&login);
        fields.push(("username".into(), username.into()));
        fields.push(("password".into(), password.into()));
        let resp = post_form(&s, &form_action(&login), &fields).await;
        assert_eq!(resp.status(), 200);
        let again = resp.text().await.expect("page");
        assert!(again.contains(r#"<p id="error""#), "{again}");
        assert!(again.contains(r#"<button id="login""#));
        assert!(!again.contains("id=\"allow\""));
        assert_eq!(hidden_fields(&again), hidden_fields(&login));
        assert!(again.contains(&format!(
            r#"name="username" type="text" value="{username}""#
        )));
    }
}

#[tokio::test]
async fn consent_needs_a_fresh_ticket() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let url = hybrid_url(&s, "http://127.0.0.1:8081/callback/spark", "spark-client");
    let (_, login) = get(&url).await;
    let mut fields = hidden_fields(&login);
    fields.push(("username".into(), "agent".into()));
    fields.push(("password".into(), "pw".into()));
    let consent = post_form(&s, &form_action(&login), &fields)
        .await
        .text()
        .await
        .expect("consent");
    let mut fields = hidden_fields(&consent);
    fields.push(("decision".into(), "allow".into()));
    let action = form_action(&consent);
    assert_eq!(post_form(&s, &action, &fields).await.status(), 302);
    // A replay, or a made-up ticket, gets nowhere.
    assert_eq!(post_form(&s, &action, &fields).await.status(), 400);
    let forged = [
        ("ticket".to_owned(), "ticket-forged".to_owned()),
        ("decision".to_owned(), "allow".to_owned()),
    ];
    assert_eq!(post_form(&s, &action, &forged).await.status(), 400);
}

#[tokio::test]
async fn hostile_values_are_escaped() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let return_to = r#"http://127.0.0.1:8081/cb?x="><script>alert(1)</script>&y='"#;
    let url = hybrid_url(&s, return_to, "spark-client");
    let (status, login) = get(&url).await;
    assert_eq!(status, 200, "{login}");
    assert!(!login.contains("<script"), "{login}");
    assert!(login.contains(
        "value=\"http://127.0.0.1:8081/cb?x=&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;&amp;y=&#39;\""
    ));
    // It survives the round trip unchanged.
    assert!(hidden_fields(&login).contains(&("openid.return_to".to_owned(), return_to.to_owned())));

    let username = "<img src=x onerror=alert(1)>\"";
    let location = authorise(&s, &url, username, "allow").await;
    assert!(
        location.starts_with(&format!("{return_to}&openid.mode=id_res&")),
        "{location}"
    );

    let mut fields = hidden_fields(&login);
    fields.push(("username".into(), username.into()));
    fields.push(("password".into(), "pw".into()));
    let consent = post_form(&s, &form_action(&login), &fields)
        .await
        .text()
        .await
        .expect("page");
    assert!(
        !consent.contains("<script") && !consent.contains("<img"),
        "{consent}"
    );
    assert!(consent.contains("&lt;img src=x onerror=alert(1)&gt;&quot;"));

    // Echoed on an error page too.
    let url = hybrid_url(&s, return_to, "<b>evil</b>");
    let (status, html) = get(&url).await;
    assert_eq!(status, 400);
    assert!(
        !html.contains("<script") && !html.contains("<b>evil"),
        "{html}"
    );
    assert!(html.contains("&lt;b&gt;evil&lt;/b&gt;"));
}
