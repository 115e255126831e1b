//! Spark's API-key authentication (interface.md, "Spark's API-key
//! authentication (`kind = "spark_api_key"`)"), black-box through the
//! `credproxy` binary against the Spark stand-in, which checks every
//! signature as Spark does and allows one session per key.
//!
//! What the contract leaves open is named by one helper each, so that a
//! different choice is changed in one place: [`table`] (the provider table),
//! [`legacy_slot`] (where a legacy caller puts its key besides the session
//! header), [`dedicated_addr`] (how the dedicated listener's address is
//! found), [`main_port_prefix`] (a signing client on the main port).

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use credproxy_standins::{request_sig, session_sig, ApiKey, Options, Recorded, Standin, TokenMode};
use serde_json::{json, Value};
use support::{client, error_code, url, BinServer, Extra, World, ADMIN_TOKEN, BIN};

const HDR: &str = "X-Credproxy-Session";
/// The provider's name, so its route: `/sparkkey/...`.
const PROVIDER: &str = "sparkkey";
const API_KEY: &str = "spark-test-api-key-1";
const API_SECRET: &str = "spark-test-api-SECRET-5be1d09a";
/// The environment variable `session add --api-secret-env` names.
const SECRET_ENV: &str = "SPARKKEY_TEST_API_SECRET";
/// A second key, registered with an `ApiUser`.
const USER_KEY: &str = "spark-test-api-key-2";
const USER_SECRET: &str = "spark-test-api-SECRET-77c3e4f2";
const API_USER: &str = "20000426143505724621000000";

// --- the assumptions, one place each ----------------------------------------

/// `[providers.sparkkey]` on the Spark stand-in, with a dedicated listener,
/// then `lines` (e.g. `max_replay_body = 1024`).
fn table(spark: &Standin, lines: &str) -> String {
    format!(
        "\n[providers.{PROVIDER}]\nkind = \"spark_api_key\"\napi_base = \"{}\"\n\
         listen = \"127.0.0.1:0\"\n{lines}\n",
        spark.base_url()
    )
}

/// The provider's own credential slot, holding the session key, for a
/// legacy caller that sends no session header (as the `spark` preset's
/// `Authorization: OAuth KEY`).
fn legacy_slot(key: &str) -> (&'static str, String) {
    ("Authorization", format!("OAuth {key}"))
}

/// The dedicated listener's address, from the line `credproxy serve` prints
/// for it (`credproxy: provider NAME listening on http://ADDR`).
fn dedicated_addr(srv: &BinServer) -> SocketAddr {
    let marker = format!("provider {PROVIDER} listening on http://");
    let line = srv
        .stdout
        .wait_for(Duration::from_secs(10), |l| l.contains(&marker))
        .expect("the dedicated listener's address is printed");
    let at = line.find(&marker).expect("marker") + marker.len();
    line[at..].trim().parse().expect("an address")
}

/// Where a signing client's absolute paths (`/v1/...`) go on the main port.
fn main_port_prefix() -> String {
    format!("/{PROVIDER}")
}

// --- the world ---------------------------------------------------------------

/// The Spark stand-in knowing [`API_KEY`] and [`USER_KEY`] (with
/// [`API_USER`]), and a config with the `sparkkey` table.
struct KeyWorld {
    w: World,
    cfg: PathBuf,
}

impl KeyWorld {
    async fn start(lines: &str) -> KeyWorld {
        KeyWorld::with_store(None, lines).await
    }

    /// The same on a fresh PostgreSQL database; `None` (the test skips) without one.
    async fn postgres(test: &str, lines: &str) -> Option<KeyWorld> {
        let db = support::postgres_db(test).await?;
        Some(KeyWorld::with_store(Some(db), lines).await)
    }

    async fn with_store(store_url: Option<String>, lines: &str) -> KeyWorld {
        let w = World::with(
            Options {
                api_keys: vec![
                    ApiKey::new(API_KEY, API_SECRET),
                    ApiKey::new(USER_KEY, USER_SECRET).with_user(API_USER),
                ],
                ..Options::spark()
            },
            Options::zillow(),
        )
        .await;
        let cfg = w.write_config(&Extra {
            store_url,
            zillow: table(&w.spark, lines),
            ..Extra::default()
        });
        KeyWorld { w, cfg }
    }

    fn spark(&self) -> &Standin {
        &self.w.spark
    }

    /// `session add` for [`API_KEY`] and its secret; (id, session key).
    fn add(&self) -> (String, String) {
        let added = add_key(&self.cfg, API_KEY, API_SECRET, None);
        (added.id, added.key)
    }
}

/// What `session add` did.
struct Added {
    id: String,
    key: String,
    stdout: String,
    /// Its log, at trace level.
    stderr: String,
}

/// `credproxy session add --provider sparkkey --api-key KEY --api-secret-env
/// VAR [--api-user USER] --json`, the CLI logging at trace.
fn add_key(cfg: &Path, key: &str, secret: &str, user: Option<&str>) -> Added {
    let mut args = vec![
        "session",
        "add",
        "--provider",
        PROVIDER,
        "--api-key",
        key,
        "--api-secret-env",
        SECRET_ENV,
        "--json",
    ];
    if let Some(user) = user {
        args.extend(["--api-user", user]);
    }
    let out = Command::new(BIN)
        .args(&args)
        .arg("--config")
        .arg(cfg)
        .env("RUST_LOG", "trace")
        .env(SECRET_ENV, secret)
        .stdin(Stdio::null())
        .output()
        .expect("run credproxy");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "session add: {stderr}");
    let v: Value = serde_json::from_str(&stdout).expect("session add --json prints one object");
    assert_eq!(v["provider"], PROVIDER, "{v}");
    Added {
        id: v["id"].as_str().expect("id").to_owned(),
        key: v["session_key"].as_str().expect("session_key").to_owned(),
        stdout,
        stderr,
    }
}

/// Runs `credproxy ARGS --config CFG`; stdout, after checking it succeeded.
fn cli(cfg: &Path, args: &[&str]) -> String {
    let out = support::run_cli(cfg, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `session list --json`: the session `id`.
fn listed(cfg: &Path, id: &str) -> Value {
    let list: Value =
        serde_json::from_str(&cli(cfg, &["session", "list", "--json"])).expect("json");
    list.as_array()
        .expect("an array")
        .iter()
        .find(|s| s["id"] == id)
        .cloned()
        .expect("the session is listed")
}

/// `GET /admin/sessions/{id}`: status and body text.
async fn admin_session(srv: &BinServer, id: &str) -> (u16, String) {
    let r = client()
        .get(url(srv.admin_addr, &format!("/admin/sessions/{id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    (r.status().as_u16(), r.text().await.expect("text"))
}

/// Waits (up to 5 s) until both the running server and the store say the
/// session's status is `status`.
async fn wait_for_status(srv: &BinServer, cfg: &Path, id: &str, status: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, text) = admin_session(srv, id).await;
        let admin: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let stored = listed(cfg, id);
        if admin["status"] == status && stored["status"] == status {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the session's status is not {status}: admin {admin}, session list {stored}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A request through the main port with the session header.
async fn send(
    srv: &BinServer,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<&str>,
) -> reqwest::Response {
    let mut req = client()
        .request(method, url(srv.proxy_addr, path))
        .header(HDR, key);
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    req.send().await.expect("send")
}

async fn get(srv: &BinServer, path: &str, key: &str) -> reqwest::Response {
    send(srv, reqwest::Method::GET, path, key, None).await
}

/// `n` concurrent GETs with `key`, spread over `addrs`; their statuses.
fn spawn_gets(addrs: &[SocketAddr], key: &str, n: usize) -> tokio::task::JoinSet<u16> {
    let c = client();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let req = c
            .get(url(addrs[i % addrs.len()], &format!("/{PROVIDER}/v1/n{i}")))
            .header(HDR, key);
        set.spawn(async move { req.send().await.expect("send").status().as_u16() });
    }
    set
}

async fn statuses(mut set: tokio::task::JoinSet<u16>) -> Vec<u16> {
    let mut all = Vec::new();
    while let Some(s) = set.join_next().await {
        all.push(s.expect("join"));
    }
    all
}

async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("timed out waiting for the stand-in")
}

/// The raw `name=value` pieces of a query, in order.
fn pieces(query: Option<&str>) -> Vec<String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Every (decoded) value of `name` in a recorded request's query.
fn values(rec: &Recorded, name: &str) -> Vec<String> {
    url::form_urlencoded::parse(rec.query.as_deref().unwrap_or("").as_bytes())
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// The raw query pieces other than the four credential parameters.
fn callers_pieces(rec: &Recorded) -> Vec<String> {
    pieces(rec.query.as_deref())
        .into_iter()
        .filter(|p| {
            let name = p.split('=').next().unwrap_or("");
            !["ApiKey", "ApiSig", "AuthToken", "ApiUser"].contains(&name)
        })
        .collect()
}

/// The stand-in accepted it (an echo), and it carried credproxy's
/// credentials: one `AuthToken`, the key's live one, and one `ApiSig`.
fn assert_signed_by_credproxy(spark: &Standin, rec: &Recorded, key: &str) {
    assert_eq!(
        values(rec, "AuthToken"),
        vec![spark.live_auth_token(key).expect("a live session")],
        "{:?}",
        rec.query
    );
    assert_eq!(values(rec, "ApiSig").len(), 1, "{:?}", rec.query);
    assert!(values(rec, "ApiKey").is_empty(), "{:?}", rec.query);
}

/// No request the stand-in received carried `secret` anywhere.
fn never_seen(spark: &Standin, secret: &str) {
    for r in spark.requests() {
        let query = r.query.clone().unwrap_or_default();
        let decoded: Vec<String> = url::form_urlencoded::parse(query.as_bytes())
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        assert!(
            !r.path.contains(secret)
                && !query.contains(secret)
                && !decoded.iter().any(|p| p.contains(secret)),
            "reached the upstream: {} {}?{query}",
            r.method,
            r.path
        );
        for (name, value) in &r.headers {
            assert!(!value.contains(secret), "reached the upstream in {name}");
        }
    }
}

/// The JSON `D.Code` of a Spark answer.
fn spark_code(v: &Value) -> i64 {
    v["D"]["Code"].as_i64().unwrap_or(-1)
}

/// Seconds since the epoch of an RFC 3339 time (`Z` or an offset,
/// optional fraction); `None` when it is not one.
fn rfc3339_secs(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let s = text.get(from..from + len)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let (y, m, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hh, mm, ss) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let mut rest = &text[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (oh, om) = (num(text.len() - 5, 2)?, num(text.len() - 2, 2)?);
            (rest.len() == 6).then_some(sign * (oh * 3600 + om * 60))?
        }
    };
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86400 + hh * 3600 + mm * 60 + ss - offset)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// An application written as Spark's Ruby client (`ApiAuth`) signs: it
/// knows a key and a secret (for credproxy: the session key and any
/// secret), opens a session, then signs every request over its path, its
/// parameters (its `AuthToken` among them) and its body.
struct SigningApp {
    /// `http://ADDR` or `http://ADDR/sparkkey`: where its `/v1/...` go.
    base: String,
    key: String,
    secret: String,
    auth_token: Option<String>,
}

impl SigningApp {
    /// `POST /v1/session?ApiKey=K&ApiSig=md5(secret + "ApiKey" + K)`, empty
    /// body; keeps the `AuthToken`; the answer.
    async fn authenticate(&mut self) -> (u16, Value) {
        let sig = session_sig(&self.secret, &self.key);
        let r = client()
            .post(format!(
                "{}/v1/session?ApiKey={}&ApiSig={sig}",
                self.base, self.key
            ))
            .body("")
            .send()
            .await
            .expect("send");
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        self.auth_token = v["D"]["Results"][0]["AuthToken"]
            .as_str()
            .map(str::to_owned);
        (status, v)
    }

    /// A request signed as the gem signs it: `ApiSig` first, then its
    /// `AuthToken` and `params`, form-encoded.
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        params: &[(&str, &str)],
        body: &str,
    ) -> reqwest::Response {
        let token = self.auth_token.as_deref().expect("authenticated first");
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query.append_pair("AuthToken", token);
        for (name, value) in params {
            query.append_pair(name, value);
        }
        let query = query.finish();
        let sig = request_sig(&self.secret, &self.key, path, &query, body.as_bytes());
        let mut req = client().request(method, format!("{}{path}?ApiSig={sig}&{query}", self.base));
        if !body.is_empty() {
            req = req
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        req.send().await.expect("send")
    }

    /// The `ApiSig` it would send for `path` and `params`, without a body.
    fn own_sig(&self, path: &str, params: &[(&str, &str)]) -> String {
        let token = self.auth_token.as_deref().expect("authenticated first");
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query.append_pair("AuthToken", token);
        for (name, value) in params {
            query.append_pair(name, value);
        }
        request_sig(&self.secret, &self.key, path, &query.finish(), b"")
    }
}

// --- sessions: added, shown, never a secret ----------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_add_prints_a_key_and_the_secret_is_never_shown() {
    let k = KeyWorld::start("").await;
    let Added {
        id,
        key,
        stdout,
        stderr,
    } = add_key(&k.cfg, API_KEY, API_SECRET, None);
    assert!(!key.is_empty());
    assert!(
        !stdout.contains(API_SECRET) && !stderr.contains(API_SECRET),
        "session add wrote the secret"
    );

    let list = cli(&k.cfg, &["session", "list", "--json"]);
    assert!(!list.contains(API_SECRET), "session list shows the secret");
    let s = listed(&k.cfg, &id);
    assert_eq!(s["provider"], PROVIDER);
    assert_eq!(s["status"], "active");
    let text = cli(&k.cfg, &["session", "list"]);
    assert!(!text.contains(API_SECRET));

    let srv = BinServer::spawn(&k.cfg, "info");
    let (status, body) = admin_session(&srv, &id).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(API_SECRET), "the admin API shows the secret");
    assert!(!body.contains(&key), "the admin API shows the session key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_auth_token_in_any_log_at_trace_level() {
    let k = KeyWorld::start("").await;
    let added = add_key(&k.cfg, API_KEY, API_SECRET, None);
    let (key, mut logs) = (added.key, added.stderr);
    let srv = BinServer::spawn(&k.cfg, "trace");

    assert_eq!(
        get(&srv, "/sparkkey/v1/listings?_limit=1", &key)
            .await
            .status(),
        200
    );
    let post = send(
        &srv,
        reqwest::Method::POST,
        "/sparkkey/v1/contacts",
        &key,
        Some(r#"{"D":{"Contacts":[{"DisplayName":"x"}]}}"#),
    )
    .await;
    assert_eq!(post.status(), 200);
    k.spark().end_api_sessions();
    assert_eq!(
        get(&srv, "/sparkkey/v1/listings?_limit=2", &key)
            .await
            .status(),
        200
    );
    let mut app = SigningApp {
        base: format!("http://{}", dedicated_addr(&srv)),
        key: key.clone(),
        secret: "the-apps-own-secret-0b9f".into(),
        auth_token: None,
    };
    assert_eq!(app.authenticate().await.0, 200);
    let r = app
        .request(reqwest::Method::GET, "/v1/listings", &[("_limit", "1")], "")
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(k.spark().sessions_opened(API_KEY), 2);

    logs.push_str(&srv.stdout.all().join("\n"));
    logs.push_str(&srv.stderr.all().join("\n"));
    let mut secrets = vec![API_SECRET.to_owned(), key.clone()];
    secrets.extend(k.spark().all_auth_tokens());
    secrets.extend(app.auth_token.clone());
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret, session key or AuthToken is in the log"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_adds_a_session_with_an_api_user() {
    let k = KeyWorld::start("").await;
    let srv = BinServer::spawn(&k.cfg, "info");
    let r = client()
        .post(url(srv.admin_addr, "/admin/sessions"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({
            "provider": PROVIDER,
            "api_key": USER_KEY,
            "api_secret": USER_SECRET,
            "api_user": API_USER,
        }))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 201);
    let text = r.text().await.expect("text");
    assert!(!text.contains(USER_SECRET), "the answer shows the secret");
    let v: Value = serde_json::from_str(&text).expect("json");
    let (id, key) = (
        v["id"].as_str().expect("id").to_owned(),
        v["session_key"].as_str().expect("session_key").to_owned(),
    );

    let r = get(&srv, "/sparkkey/v1/my/account", &key).await;
    assert_eq!(r.status(), 200);
    let rec = k.spark().last_request().expect("recorded");
    assert_eq!(values(&rec, "ApiUser"), vec![API_USER.to_owned()]);
    assert_signed_by_credproxy(k.spark(), &rec, USER_KEY);

    let (_, body) = admin_session(&srv, &id).await;
    assert!(!body.contains(USER_SECRET));
    assert!(!cli(&k.cfg, &["session", "list", "--json"]).contains(USER_SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_add_with_an_api_user_sends_it_on_every_request() {
    let k = KeyWorld::start("").await;
    let key = add_key(&k.cfg, USER_KEY, USER_SECRET, Some(API_USER)).key;
    let srv = BinServer::spawn(&k.cfg, "info");
    // The caller's own ApiUser is replaced by the session's.
    let r = get(
        &srv,
        "/sparkkey/v1/my/account?ApiUser=someone-else&x=1",
        &key,
    )
    .await;
    assert_eq!(r.status(), 200);
    let rec = k.spark().last_request().expect("recorded");
    assert_eq!(values(&rec, "ApiUser"), vec![API_USER.to_owned()]);
    assert_eq!(callers_pieces(&rec), vec!["x=1"]);
}

// --- signing -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_is_signed_and_the_callers_parameters_keep_their_bytes() {
    let k = KeyWorld::start("").await;
    let (_, key) = k.add();
    let srv = BinServer::spawn(&k.cfg, "info");

    let r = get(&srv, "/sparkkey/v1/listings?_limit=1&b=2", &key).await;
    assert_eq!(r.status(), 200, "the stand-in accepted the signature");
    let rec = k.spark().last_request().expect("recorded");
    assert_eq!(rec.path, "/v1/listings");
    assert_eq!(callers_pieces(&rec), vec!["_limit=1", "b=2"]);
    assert_signed_by_credproxy(k.spark(), &rec, API_KEY);
    assert!(
        values(&rec, "ApiUser").is_empty(),
        "no ApiUser for this key"
    );

    // Escaped values, `+` for a space, repeated names, six parameters.
    let query =
        "_filter=City+Eq+%27Fargo%27&b=2&_select=Id%2CListPrice&b=1&x=%2F%26%3D&_expand=Photos";
    let r = get(&srv, &format!("/sparkkey/v1/listings?{query}"), &key).await;
    assert_eq!(r.status(), 200);
    let rec = k.spark().last_request().expect("recorded");
    assert_eq!(callers_pieces(&rec).join("&"), query);
    assert_signed_by_credproxy(k.spark(), &rec, API_KEY);

    assert_eq!(
        k.spark().sessions_opened(API_KEY),
        1,
        "the session is reused"
    );
    never_seen(k.spark(), &key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_own_credential_parameters_are_dropped() {
    let k = KeyWorld::start("").await;
    let (_, key) = k.add();
    let srv = BinServer::spawn(&k.cfg, "info");
    let r = get(
        &srv,
        "/sparkkey/v1/listings?ApiSig=bogus&_limit=1&AuthToken=bogus&ApiKey=bogus&b=2&ApiUser=bogus",
        &key,
    )
    .await;
    assert_eq!(r.status(), 200);
    let rec = k.spark().last_request().expect("recorded");
    assert_eq!(callers_pieces(&rec), vec!["_limit=1", "b=2"]);
    assert_signed_by_credproxy(k.spark(), &rec, API_KEY);
    assert!(values(&rec, "ApiUser").is_empty());
    assert!(!values(&rec, "ApiSig").contains(&"bogus".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_in_the_legacy_slot_works_and_never_reaches_spark() {
    let k = KeyWorld::start("").await;
    let (_, key) = k.add();
    let srv = BinServer::spawn(&k.cfg, "info");
    let (name, value) = legacy_slot(&key);
    let r = client()
        .get(url(srv.proxy_addr, "/sparkkey/v1/listings?_limit=1&b=2"))
        .header(name, value)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let rec = k.spark().last_request().expect("recorded");
    assert_eq!(callers_pieces(&rec), vec!["_limit=1", "b=2"]);
    assert_signed_by_credproxy(k.spark(), &rec, API_KEY);
    never_seen(k.spark(), &key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_signed_over_its_json_body() {
    let k = KeyWorld::start("").await;
    let (_, key) = k.add();
    let srv = BinServer::spawn(&k.cfg, "info");
    let body =
        r#"{"D":{"Contacts":[{"DisplayName":"Contact Four","PrimaryEmail":"c4@example.com"}]}}"#;
    let r = send(
        &srv,
        reqwest::Method::POST,
        "/sparkkey/v1/contacts?_notify=true",
        &key,
        Some(body),
    )
    .await;
    assert_eq!(r.status(), 200);
    let echo: Value = r.json().await.expect("echo");
    assert_eq!(echo["body_len"], body.len());
    let rec = k.spark().last_request().expect("recorded");
    assert_eq!(rec.method, "POST");
    assert_eq!(callers_pieces(&rec), vec!["_notify=true"]);
    assert_signed_by_credproxy(k.spark(), &rec, API_KEY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_and_a_post_with_a_method_override_are_signed() {
    let k = KeyWorld::start("").await;
    let (_, key) = k.add();
    let srv = BinServer::spawn(&k.cfg, "info");
    let r = send(
        &srv,
        reqwest::Method::PUT,
        "/sparkkey/v1/contacts/20090928182824338901000000",
        &key,
        Some(r#"{"D":{"DisplayName":"Renamed"}}"#),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(k.spark().last_request().expect("recorded").method, "PUT");

    let r = client()
        .post(url(srv.proxy_addr, "/sparkkey/v1/listings?_limit=25"))
        .header(HDR, &key)
        .header("X-HTTP-Method-Override", "GET")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("_filter=PropertyType+Eq+%27A%27")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let rec = k.spark().last_request().expect("recorded");
    assert_eq!(rec.header("x-http-method-override"), Some("GET"));
    assert_signed_by_credproxy(k.spark(), &rec, API_KEY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_replay_limit_cannot_be_signed_and_gets_413() {
    let k = KeyWorld::start("max_replay_body = 1024").await;
    let (_, key) = k.add();
    let srv = BinServer::spawn(&k.cfg, "info");
    let big = format!(r#"{{"D":{{"Notes":"{}"}}}}"#, "x".repeat(4096));
    let r = send(
        &srv,
        reqwest::Method::POST,
        "/sparkkey/v1/contacts",
        &key,
        Some(&big),
    )
    .await;
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(&r).as_deref(), Some("body_too_large"));
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "body_too_large");
    assert!(
        !v["error"]["message"].as_str().unwrap_or("").is_empty(),
        "a message that says why"
    );
    assert!(k.spark().requests().is_empty(), "nothing reached Spark");

    // A body within the limit goes.
    let small = r#"{"D":{"Notes":"short"}}"#;
    let r = send(
        &srv,
        reqwest::Method::POST,
        "/sparkkey/v1/contacts",
        &key,
        Some(small),
    )
    .await;
    assert_eq!(r.status(), 200);
}

// --- one Spark session per key -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_requests_on_a_fresh_session_open_one_spark_session() {
    let k = KeyWorld::start("").await;
    let (_, key) = k.add();
    let srv = BinServer::spawn(&k.cfg, "warn");
    // Hold Spark's session endpoint until every request is waiting for it.
    k.spark().set_token_mode(TokenMode::Hang);
    let set = spawn_gets(&[srv.proxy_addr], &key, 20);
    within(30, k.spark().wait_for_session_calls(1)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    k.spark().set_token_mode(TokenMode::Normal);
    let all = statuses(set).await;
    assert_eq!(all, vec![200; 20]);
    assert_eq!(k.spark().session_calls(), 1, "one POST /v1/session");
    assert_eq!(k.spark().sessions_opened(API_KEY), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_requests_on_an_ended_session_open_one_new_one() {
    let k = KeyWorld::start("").await;
    let (_, key) = k.add();
    let srv = BinServer::spawn(&k.cfg, "warn");
    assert_eq!(get(&srv, "/sparkkey/v1/first", &key).await.status(), 200);
    k.spark().end_api_sessions();
    k.spark().set_token_mode(TokenMode::Hang);
    let set = spawn_gets(&[srv.proxy_addr], &key, 100);
    // The new session is held until the others have met their 1020 (or
    // wait for the reopening already under way).
    within(30, k.spark().wait_for_session_calls(2)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    k.spark().set_token_mode(TokenMode::Normal);
    let all = statuses(set).await;
    assert_eq!(all, vec![200; 100]);
    assert_eq!(k.spark().session_calls(), 2);
    assert_eq!(k.spark().sessions_opened(API_KEY), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres_open_one_spark_session() {
    let Some(k) = KeyWorld::postgres("apikey_two_instances_fresh", "").await else {
        return;
    };
    let (_, key) = k.add();
    let a = BinServer::spawn(&k.cfg, "warn");
    let b = BinServer::spawn(&k.cfg, "warn");
    k.spark().set_token_mode(TokenMode::Hang);
    let set = spawn_gets(&[a.proxy_addr, b.proxy_addr], &key, 20);
    within(30, k.spark().wait_for_session_calls(1)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    k.spark().set_token_mode(TokenMode::Normal);
    let all = statuses(set).await;
    assert_eq!(all, vec![200; 20]);
    assert_eq!(
        k.spark().session_calls(),
        1,
        "one POST /v1/session across both instances"
    );
    assert_eq!(k.spark().sessions_opened(API_KEY), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres_reopen_an_ended_session_once() {
    let Some(k) = KeyWorld::postgres("apikey_two_instances_ended", "").await else {
        return;
    };
    let (_, key) = k.add();
    let a = BinServer::spawn(&k.cfg, "warn");
    let b = BinServer::spawn(&k.cfg, "warn");
    assert_eq!(get(&a, "/sparkkey/v1/first", &key).await.status(), 200);
    assert_eq!(get(&b, "/sparkkey/v1/second", &key).await.status(), 200);
    assert_eq!(k.spark().sessions_opened(API_KEY), 1, "B used A's session");
    k.spark().end_api_sessions();
    k.spark().set_token_mode(TokenMode::Hang);
    let set = spawn_gets(&[a.proxy_addr, b.proxy_addr], &key, 100);
    within(30, k.spark().wait_for_session_calls(2)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    k.spark().set_token_mode(TokenMode::Normal);
    let all = statuses(set).await;
    assert_eq!(all, vec![200; 100]);
    assert_eq!(k.spark().session_calls(), 2);
    assert_eq!(k.spark().sessions_opened(API_KEY), 2);
}

// --- ended, expired and refused keys -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_by_spark_is_reopened_once_and_the_request_replayed() {
    let k = KeyWorld::start("").await;
    let (_, key) = k.add();
    let srv = BinServer::spawn(&k.cfg, "info");
    assert_eq!(get(&srv, "/sparkkey/v1/a", &key).await.status(), 200);
    let ended = k.spark().live_auth_token(API_KEY).expect("live");

    // Another copy of the application opens a session for the same key.
    k.spark().open_api_session(API_KEY);
    let r = get(&srv, "/sparkkey/v1/b?x=1", &key).await;
    assert_eq!(r.status(), 200, "the caller never sees the 1020");
    let reqs = k.spark().requests();
    assert_eq!(reqs.len(), 3, "the first, then b refused, then b replayed");
    assert_eq!(values(&reqs[1], "AuthToken"), vec![ended]);
    assert_eq!(reqs[2].path, "/v1/b");
    assert_eq!(callers_pieces(&reqs[2]), vec!["x=1"]);
    assert_signed_by_credproxy(k.spark(), &reqs[2], API_KEY);
    assert_eq!(k.spark().sessions_opened(API_KEY), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_reopened() {
    let k = KeyWorld::start("").await;
    k.spark().set_session_lifetime(Duration::from_secs(3));
    let (_, key) = k.add();
    let srv = BinServer::spawn(&k.cfg, "info");
    assert_eq!(get(&srv, "/sparkkey/v1/a", &key).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(get(&srv, "/sparkkey/v1/b", &key).await.status(), 200);
    assert_eq!(k.spark().sessions_opened(API_KEY), 2);
    let rec = k.spark().last_request().expect("recorded");
    assert_signed_by_credproxy(k.spark(), &rec, API_KEY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_spark_calls_invalid_marks_the_session_reauthorization_required() {
    let k = KeyWorld::start("").await;
    // The stand-in answers code 1000 for this secret.
    let Added { id, key, .. } = add_key(&k.cfg, API_KEY, "not-the-secret", None);
    let srv = BinServer::spawn(&k.cfg, "info");
    let r = get(&srv, "/sparkkey/v1/listings", &key).await;
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(&r).as_deref(), Some("reauthorization_required"));
    assert!(
        k.spark().requests().is_empty(),
        "no API request without a session"
    );
    wait_for_status(&srv, &k.cfg, &id, "reauthorization_required").await;

    let calls = k.spark().session_calls();
    let r = get(&srv, "/sparkkey/v1/listings", &key).await;
    assert_eq!(error_code(&r).as_deref(), Some("reauthorization_required"));
    assert_eq!(k.spark().session_calls(), calls, "Spark is not asked again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_key_marks_the_session_reauthorization_required() {
    let k = KeyWorld::start("").await;
    let (id, key) = k.add();
    k.spark().set_api_key_disabled(API_KEY, true);
    let srv = BinServer::spawn(&k.cfg, "info");
    let r = get(&srv, "/sparkkey/v1/listings", &key).await;
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(&r).as_deref(), Some("reauthorization_required"));
    wait_for_status(&srv, &k.cfg, &id, "reauthorization_required").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_disabled_during_its_session_marks_it_reauthorization_required() {
    let k = KeyWorld::start("").await;
    let (id, key) = k.add();
    let srv = BinServer::spawn(&k.cfg, "info");
    assert_eq!(get(&srv, "/sparkkey/v1/a", &key).await.status(), 200);
    k.spark().set_api_key_disabled(API_KEY, true);
    // This request meets Spark's 1010: it goes back as a 401, Spark's or credproxy's.
    let r = get(&srv, "/sparkkey/v1/b", &key).await;
    assert_eq!(r.status(), 401);
    if error_code(&r).is_none() {
        let v: Value = r.json().await.expect("Spark's answer");
        assert_eq!(spark_code(&v), 1010, "{v}");
    }
    assert_eq!(
        k.spark().sessions_opened(API_KEY),
        1,
        "no reopening for 1010"
    );
    wait_for_status(&srv, &k.cfg, &id, "reauthorization_required").await;
    let r = get(&srv, "/sparkkey/v1/c", &key).await;
    assert_eq!(error_code(&r).as_deref(), Some("reauthorization_required"));
}

// --- an unmodified signing application ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmodified_signing_app_works_on_the_dedicated_port() {
    let k = KeyWorld::start("").await;
    let (_, key) = k.add();
    let srv = BinServer::spawn(&k.cfg, "info");
    let mut app = SigningApp {
        base: format!("http://{}", dedicated_addr(&srv)),
        key: key.clone(),
        secret: "any-secret-the-app-was-given".into(),
        auth_token: None,
    };

    let (status, v) = app.authenticate().await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["D"]["Success"], true, "{v}");
    let result = &v["D"]["Results"][0];
    assert!(
        app.auth_token.as_deref().is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    let expires = result["Expires"].as_str().expect("Expires");
    let at = rfc3339_secs(expires).expect("Expires is RFC 3339");
    assert!(at > now_secs(), "Expires is in the future: {expires}");
    assert_eq!(
        k.spark().session_calls(),
        0,
        "credproxy answered the app's session request itself"
    );

    let params = [("_limit", "1"), ("_filter", "City Eq 'Fargo'")];
    let own = app.own_sig("/v1/listings", &params);
    let r = app
        .request(reqwest::Method::GET, "/v1/listings", &params, "")
        .await;
    assert_eq!(r.status(), 200, "Spark accepted credproxy's signature");
    let rec = k.spark().last_request().expect("recorded");
    assert_eq!(rec.path, "/v1/listings");
    assert!(
        !values(&rec, "ApiSig").contains(&own),
        "the app's ApiSig was dropped"
    );
    assert_signed_by_credproxy(k.spark(), &rec, API_KEY);
    assert_eq!(
        callers_pieces(&rec),
        vec!["_limit=1", "_filter=City+Eq+%27Fargo%27"]
    );

    // A POST with a body, signed by the app over it, re-signed by credproxy.
    let r = app
        .request(
            reqwest::Method::POST,
            "/v1/contacts",
            &[],
            r#"{"D":{"Contacts":[{"DisplayName":"x"}]}}"#,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        k.spark().sessions_opened(API_KEY),
        1,
        "credproxy's own session"
    );
    never_seen(k.spark(), &key);
    never_seen(k.spark(), app.auth_token.as_deref().expect("token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmodified_signing_app_works_under_the_prefix_on_the_main_port() {
    let k = KeyWorld::start("").await;
    let (_, key) = k.add();
    let srv = BinServer::spawn(&k.cfg, "info");
    let mut app = SigningApp {
        base: format!("http://{}{}", srv.proxy_addr, main_port_prefix()),
        key: key.clone(),
        secret: "any-secret".into(),
        auth_token: None,
    };
    let (status, v) = app.authenticate().await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["D"]["Success"], true, "{v}");
    assert_eq!(k.spark().session_calls(), 0);
    // The app signs the path it knows (`/v1/...`); credproxy signs the one it sends.
    let r = app
        .request(reqwest::Method::GET, "/v1/listings", &[("_limit", "1")], "")
        .await;
    assert_eq!(r.status(), 200);
    let rec = k.spark().last_request().expect("recorded");
    assert_eq!(rec.path, "/v1/listings");
    assert_signed_by_credproxy(k.spark(), &rec, API_KEY);
    never_seen(k.spark(), &key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmodified_app_with_an_unknown_key_gets_no_session() {
    let k = KeyWorld::start("").await;
    let srv = BinServer::spawn(&k.cfg, "info");
    let mut app = SigningApp {
        base: format!("http://{}", dedicated_addr(&srv)),
        key: "not-a-session-key".into(),
        secret: "any".into(),
        auth_token: None,
    };
    let (status, v) = app.authenticate().await;
    assert_eq!(status, 401, "{v}");
    assert_ne!(v["D"]["Success"], true);
    assert_eq!(k.spark().session_calls(), 0);
}

#[test]
fn the_rfc3339_reader_of_these_tests() {
    assert_eq!(rfc3339_secs("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(rfc3339_secs("2021-03-04T05:06:07Z"), Some(1_614_834_367));
    assert_eq!(
        rfc3339_secs("2021-03-04T00:06:07-05:00"),
        Some(1_614_834_367)
    );
    assert_eq!(
        rfc3339_secs("2024-02-29T22:00:00.123-05:00"),
        Some(1_709_262_000)
    );
    assert_eq!(rfc3339_secs("2024-02-29 22:00:00"), None);
}
