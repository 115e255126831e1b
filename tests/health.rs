//! Sessions' health end to end (issue 13): `refresh_failing` and back,
//! each transition's event written once to the outbox (and none without
//! `[notify]`), the health in the admin API, the CLI and the metrics;
//! `last_used_at` written in batches; idle refresh of idle sessions only.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use credproxy::secrets::session::Status;
use credproxy_standins::TokenMode;
use serde_json::{json, Value};
use support::{client, error_code, run_cli, url, World, ADMIN_TOKEN};

const HDR: &str = "X-Credproxy-Session";

/// `[notify]` at a port nobody listens on: events stay in the outbox.
const NOTIFY: &str =
    "\n[notify]\nurl = \"http://127.0.0.1:9/credproxy-events\"\nsecret = \"notify-secret-4b1e\"\n";

fn config_text(w: &World, extra: &support::Extra, notify: bool) -> String {
    let mut text = w.config_text(extra);
    if notify {
        // A top-level table goes last.
        text.push_str(NOTIFY);
    }
    text
}

async fn start(w: &World, extra: &support::Extra, notify: bool) -> credproxy::server::Running {
    let config = credproxy::config::Config::parse(
        &config_text(w, extra, notify),
        Path::new("test.toml"),
        |_| None,
    )
    .expect("config");
    credproxy::server::start(config).await.expect("start")
}

fn admin(srv: &credproxy::server::Running, path: &str) -> String {
    url(srv.admin_addr, path)
}

/// The outbox's undelivered events as `(type, session, detail)`.
async fn events(srv: &credproxy::server::Running) -> Vec<(String, String, Value)> {
    srv.sessions
        .store()
        .list_events(1000)
        .await
        .expect("events")
        .into_iter()
        .map(|e| {
            let detail: Value = serde_json::from_str(&e.detail).expect("detail is JSON");
            (e.kind, e.session_id, detail)
        })
        .collect()
}

async fn add_by_admin(
    srv: &credproxy::server::Running,
    w: &World,
    session_key: Option<&str>,
) -> (String, String) {
    let t = w.spark.issue_tokens();
    let mut body = json!({
        "provider": "spark",
        "access_token": t.access_token,
        "refresh_token": t.refresh_token,
        "expires_in": 86_400,
    });
    if let Some(k) = session_key {
        body["session_key"] = json!(k);
    }
    let r = client()
        .post(admin(srv, "/admin/sessions"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("add");
    assert!(r.status().is_success(), "{}", r.status());
    let v: Value = r.json().await.expect("json");
    (
        v["id"].as_str().expect("id").to_owned(),
        v["session_key"].as_str().expect("key").to_owned(),
    )
}

async fn session_json(srv: &credproxy::server::Running, id: &str) -> Value {
    client()
        .get(admin(srv, &format!("/admin/sessions/{id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

async fn get(srv: &credproxy::server::Running, key: &str) -> reqwest::Response {
    client()
        .get(url(srv.proxy_addr, "/spark/v1/listings"))
        .header(HDR, key)
        .send()
        .await
        .expect("send")
}

async fn metrics(srv: &credproxy::server::Running) -> String {
    client()
        .get(admin(srv, "/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// Sends requests until one is answered 200 (the back-off ends), at most 15 s.
async fn until_ok(srv: &credproxy::server::Running, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = get(srv, key).await;
        if r.status() == 200 {
            return;
        }
        assert_eq!(r.status(), 503, "{:?}", error_code(&r));
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn health_transitions(store_url: Option<String>) {
    let w = World::new().await;
    let extra = support::Extra {
        store_url,
        ..support::Extra::default()
    };
    let srv = start(&w, &extra, true).await;
    let (id, key) = add_by_admin(&srv, &w, None).await;

    // The token endpoint fails: refresh_failing, with its class and retry.
    w.spark.expire_access_tokens();
    w.spark.set_token_mode(TokenMode::Fail500);
    let r = get(&srv, &key).await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(&r).as_deref(), Some("token_refresh_failed"));
    let s = session_json(&srv, &id).await;
    assert_eq!(s["status"], "refresh_failing", "{s}");
    assert_eq!(s["last_error"], "token_endpoint_error", "{s}");
    assert!(s["next_retry_at"].is_string(), "{s}");
    for field in ["expires_at", "last_refresh_at", "last_used_at"] {
        assert!(s.get(field).is_some(), "{field} is shown: {s}");
    }
    let text = metrics(&srv).await;
    assert!(
        text.contains(r#"credproxy_sessions{provider="spark",status="refresh_failing"} 1"#),
        "{text}"
    );
    // The CLI shows it too (another process, same store).
    let cfg = w.path("health.toml");
    std::fs::write(&cfg, config_text(&w, &extra, true)).expect("config");
    let out = run_cli(&cfg, &["session", "list"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table.contains("refresh_failing") && table.contains("token_endpoint_error"),
        "{table}"
    );
    let out = run_cli(&cfg, &["session", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list[0]["status"], "refresh_failing");
    assert_eq!(list[0]["last_error"], "token_endpoint_error");

    // It keeps failing after the back-off: still one event.
    let calls = w.spark.token_calls();
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.spark.token_calls() == calls {
        assert_eq!(get(&srv, &key).await.status(), 503);
        assert!(Instant::now() < deadline, "no second attempt");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = session_json(&srv, &id).await;
    assert_eq!(s["status"], "refresh_failing", "{s}");

    // The endpoint recovers: active again, the error cleared.
    w.spark.set_token_mode(TokenMode::Normal);
    until_ok(&srv, &key).await;
    let s = session_json(&srv, &id).await;
    assert_eq!(s["status"], "active", "{s}");
    assert!(
        s["last_error"].is_null() && s["next_retry_at"].is_null(),
        "{s}"
    );
    assert!(s["last_refresh_at"].is_string(), "{s}");

    // invalid_grant: reauthorization_required.
    w.spark.expire_access_tokens();
    w.spark.set_token_mode(TokenMode::InvalidGrant);
    let r = get(&srv, &key).await;
    assert_eq!(error_code(&r).as_deref(), Some("reauthorization_required"));
    let s = session_json(&srv, &id).await;
    assert_eq!(
        (&s["status"], &s["last_error"]),
        (&json!("reauthorization_required"), &json!("invalid_grant")),
        "{s}"
    );
    // New tokens under the same key: reconnected.
    w.spark.set_token_mode(TokenMode::Normal);
    let (again, _) = add_by_admin(&srv, &w, Some(&key)).await;
    assert_eq!(again, id);
    let s = session_json(&srv, &id).await;
    assert_eq!(s["status"], "active", "{s}");
    // Revoked by the admin API, and another one by the CLI.
    let r = client()
        .delete(admin(&srv, &format!("/admin/sessions/{id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let (other, _) = add_by_admin(&srv, &w, None).await;
    let out = run_cli(&cfg, &["session", "revoke", &other]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let all = events(&srv).await;
    let of = |sid: &str| -> Vec<(String, Value)> {
        all.iter()
            .filter(|(_, s, _)| s == sid)
            .map(|(k, _, d)| (k.clone(), d.clone()))
            .collect()
    };
    let first = of(&id);
    assert_eq!(first.len(), 6, "{first:?}");
    assert_eq!(
        first[0],
        ("session.connected".into(), json!({"reconnected": false}))
    );
    assert_eq!(first[1].0, "session.refresh_failing");
    assert_eq!(first[1].1["error"], "token_endpoint_error");
    assert!(first[1].1["next_retry_at"].is_i64(), "{first:?}");
    assert_eq!(first[2], ("session.recovered".into(), json!({})));
    assert_eq!(
        first[3],
        (
            "session.reauthorization_required".into(),
            json!({"error": "invalid_grant"})
        )
    );
    assert_eq!(
        first[4],
        ("session.connected".into(), json!({"reconnected": true}))
    );
    assert_eq!(first[5], ("session.revoked".into(), json!({"by": "admin"})));
    assert_eq!(
        of(&other),
        [
            ("session.connected".into(), json!({"reconnected": false})),
            ("session.revoked".into(), json!({"by": "cli"})),
        ]
    );
    // Never a token, key or secret in an event.
    let rows = srv
        .sessions
        .store()
        .list_events(1000)
        .await
        .expect("events");
    let text = format!("{rows:?}");
    let mut secrets = w.spark.all_tokens();
    secrets.extend(w.secrets());
    secrets.push(key.clone());
    secrets.push("notify-secret-4b1e".into());
    for secret in &secrets {
        assert!(!text.contains(secret.as_str()), "an event holds a secret");
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_transitions_write_each_event_once_sqlite() {
    health_transitions(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_transitions_write_each_event_once_postgres() {
    let Some(db) = support::postgres_db("health_transitions").await else {
        return;
    };
    health_transitions(Some(db)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notify_no_event_is_written() {
    let w = World::new().await;
    let srv = start(&w, &support::Extra::default(), false).await;
    let (id, key) = add_by_admin(&srv, &w, None).await;
    w.spark.expire_access_tokens();
    w.spark.set_token_mode(TokenMode::Fail500);
    assert_eq!(get(&srv, &key).await.status(), 503);
    assert_eq!(
        srv.sessions
            .info(&id)
            .await
            .expect("info")
            .expect("row")
            .status,
        Status::RefreshFailing,
        "the health is kept all the same"
    );
    w.spark.set_token_mode(TokenMode::Normal);
    until_ok(&srv, &key).await;
    assert!(srv.sessions.revoke(&id).await.expect("revoke"));
    assert!(events(&srv).await.is_empty());
    srv.shutdown().await;
}

/// Reads `last_used_at` straight from the store.
async fn last_used_at(srv: &credproxy::server::Running, id: &str) -> Option<i64> {
    srv.sessions
        .store()
        .session_by_id(id)
        .await
        .expect("read")
        .expect("row")
        .last_used_at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_use_is_written_once_per_interval_not_per_request() {
    let w = World::new().await;
    let extra = support::Extra {
        store: "use_flush_interval = \"1s\"".into(),
        ..support::Extra::default()
    };
    let srv = start(&w, &extra, false).await;
    let (id, key, _) = support::add_session(&srv, "spark", &w.spark).await;
    let (idle, _, _) = support::add_session(&srv, "spark", &w.spark).await;
    assert_eq!(last_used_at(&srv, &id).await, None);
    let before = srv.sessions.use_writes();
    let started = credproxy::store::now();
    let t0 = Instant::now();
    for _ in 0..100 {
        assert_eq!(get(&srv, &key).await.status(), 200);
    }
    let took = t0.elapsed();
    let ended = credproxy::store::now();
    // Written within an interval and the flush's lag (2 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    let at = loop {
        if let Some(at) = last_used_at(&srv, &id).await {
            break at;
        }
        assert!(Instant::now() < deadline, "last_used_at never written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        (started..=ended).contains(&at),
        "{started} <= {at} <= {ended}"
    );
    // Quiet for a while: the flushes that follow write nothing.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let writes = srv.sessions.use_writes() - before;
    // A second-granular use in each window: the 100 requests span at most
    // `took` + 1 distinct seconds, each written at most once.
    let bound = took.as_secs() + 2;
    println!("100 requests in {took:?}: {writes} write(s) of the session's last use");
    assert!(
        (1..=bound).contains(&writes),
        "{writes} writes for 100 requests in {took:?}"
    );
    assert_eq!(
        last_used_at(&srv, &idle).await,
        None,
        "unused: never written"
    );
    let version = |r: credproxy::store::SessionRecord| (r.version, r.updated_at);
    let row = srv
        .sessions
        .store()
        .session_by_id(&id)
        .await
        .expect("read")
        .expect("row");
    assert_eq!(version(row).0, 1, "a use is no change: the version stays");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_uses_are_written_at_shutdown() {
    let w = World::new().await;
    let extra = support::Extra {
        store: "use_flush_interval = \"1h\"".into(),
        ..support::Extra::default()
    };
    let srv = start(&w, &extra, false).await;
    let (id, key, _) = support::add_session(&srv, "spark", &w.spark).await;
    assert_eq!(get(&srv, &key).await.status(), 200);
    let store = std::sync::Arc::clone(srv.sessions.store());
    srv.shutdown().await;
    let row = store.session_by_id(&id).await.expect("read").expect("row");
    assert!(row.last_used_at.is_some(), "flushed once more at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_process_shows_its_own_last_use_at_once() {
    let w = World::new().await;
    let extra = support::Extra {
        store: "use_flush_interval = \"1h\"".into(),
        ..support::Extra::default()
    };
    let srv = start(&w, &extra, false).await;
    let (id, key, _) = support::add_session(&srv, "spark", &w.spark).await;
    assert!(session_json(&srv, &id).await["last_used_at"].is_null());
    let before = credproxy::store::now();
    assert_eq!(get(&srv, &key).await.status(), 200);
    // Not written to the store for an hour, yet shown by the admin API
    // (and so the dashboard) of the process that served the request.
    assert_eq!(last_used_at(&srv, &id).await, None, "not flushed yet");
    let shown = session_json(&srv, &id).await["last_used_at"]
        .as_str()
        .map(str::to_owned)
        .expect("last_used_at shown right after a request");
    let at = humantime::parse_rfc3339(&shown).expect("RFC 3339");
    let at = at
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    assert!(at >= before, "{shown} is the request's time");
    let listed: Value = client()
        .get(admin(&srv, "/admin/sessions"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let listed = listed
        .as_array()
        .or_else(|| listed["sessions"].as_array())
        .expect("a list")
        .iter()
        .find(|s| s["id"] == id.as_str())
        .cloned()
        .expect("listed");
    assert_eq!(
        listed["last_used_at"],
        shown.as_str(),
        "the list shows it too"
    );
    srv.shutdown().await;
}

/// Moves every session's creation two hours back, as if made long ago.
async fn age_sessions(store_url: Option<&str>, w: &World) {
    const AGE: &str = "UPDATE sessions SET created_at = created_at - 7200";
    match store_url {
        Some(pg) => {
            let pool = sqlx::PgPool::connect(pg).await.expect("connect");
            sqlx::query(AGE).execute(&pool).await.expect("age");
        }
        None => {
            let url = format!("sqlite://{}", w.path("credproxy.db").display());
            let pool = sqlx::SqlitePool::connect(&url).await.expect("connect");
            sqlx::query(AGE).execute(&pool).await.expect("age");
        }
    }
}

async fn idle_refresh(store_url: Option<String>) {
    let w = World::new().await;
    let extra = support::Extra {
        store_url: store_url.clone(),
        store: "use_flush_interval = \"1s\"".into(),
        spark: "refresh_idle_after = \"1m\"".into(),
        ..support::Extra::default()
    };
    let srv = start(&w, &extra, false).await;
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(support::add_session(&srv, "spark", &w.spark).await);
    }
    let (used, used_key, _) = support::add_session(&srv, "spark", &w.spark).await;
    age_sessions(store_url.as_deref(), &w).await;
    // Used now: not idle, though made "two hours ago".
    assert_eq!(get(&srv, &used_key).await.status(), 200);
    assert_eq!(w.spark.grant_count(), 0);

    // The first pass starts within a tenth of refresh_idle_after (6 s) and
    // refreshes the five idle sessions, two a second at most.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut first = None;
    while w.spark.grant_count() < 5 {
        if first.is_none() && w.spark.grant_count() > 0 {
            first = Some(Instant::now());
        }
        assert!(Instant::now() < deadline, "idle sessions not refreshed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spread = first.map(|f| f.elapsed()).unwrap_or_default();
    println!("5 idle refreshes spread over {spread:?}");
    assert!(
        spread >= Duration::from_millis(1_800),
        "at most 2 a second: 5 took {spread:?}"
    );
    // The grants are counted as answered; the commits follow.
    for (id, _, _) in &idle {
        loop {
            let info = srv.sessions.info(id).await.expect("info").expect("row");
            if info.last_refresh_at.is_some() {
                assert_eq!(info.status, Status::Active);
                break;
            }
            assert!(Instant::now() < deadline, "{id} not refreshed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let info = srv.sessions.info(&used).await.expect("info").expect("row");
    assert!(
        info.last_refresh_at.is_none(),
        "the used session was not refreshed"
    );
    // A next pass (6 s later) leaves them all alone: refreshed, or used.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(w.spark.grant_count(), 5);
    assert_eq!(w.spark.reused_refresh_tokens(), 0);
    // An idle-refreshed session serves its new token (nothing stale cached).
    let (_, key, old) = &idle[0];
    assert_eq!(get(&srv, key).await.status(), 200);
    assert_ne!(
        w.spark
            .last_request()
            .expect("recorded")
            .header("authorization"),
        Some(format!("OAuth {}", old.access_token).as_str())
    );
    assert_eq!(w.spark.grant_count(), 5);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_refreshed_and_used_ones_not_sqlite() {
    idle_refresh(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_refreshed_and_used_ones_not_postgres() {
    let Some(db) = support::postgres_db("idle_refresh").await else {
        return;
    };
    idle_refresh(Some(db)).await;
}

/// The OAuth callback stores a session: `session.connected`, new and reconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_and_a_reconnect_through_the_callback_are_events() {
    let w = World::new().await;
    let srv = start(&w, &support::Extra::default(), true).await;
    let c = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let callback = |path: String, admin_token: bool| {
        let c = c.clone();
        let addr = srv.admin_addr;
        let code = w.zillow.issue_code();
        async move {
            let mut req = c.get(url(addr, &path));
            if admin_token {
                req = req.bearer_auth(ADMIN_TOKEN);
            }
            let r = req.send().await.expect("connect");
            assert_eq!(r.status(), 302, "{path}");
            let cookie = r
                .headers()
                .get("set-cookie")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .map(str::to_owned);
            let location = r.headers()["location"].to_str().expect("ascii").to_owned();
            let state = url::Url::parse(&location)
                .expect("url")
                .query_pairs()
                .find(|(k, _)| k == "state")
                .map(|(_, v)| v.into_owned())
                .expect("state");
            let mut req = c.get(url(
                addr,
                &format!("/callback/zillow?code={code}&state={state}"),
            ));
            if let Some(cookie) = cookie {
                req = req.header("cookie", cookie);
            }
            let r = req.send().await.expect("callback");
            assert_eq!(r.status(), 200);
        }
    };
    callback("/connect/zillow".to_owned(), false).await;
    let list = srv.sessions.list().await.expect("list");
    assert_eq!(list.len(), 1);
    let id = list[0].id.clone();
    callback(format!("/connect/zillow?session={id}"), true).await;
    assert_eq!(srv.sessions.list().await.expect("list").len(), 1);
    assert_eq!(
        events(&srv).await,
        [
            (
                "session.connected".to_owned(),
                id.clone(),
                json!({"reconnected": false})
            ),
            (
                "session.connected".to_owned(),
                id.clone(),
                json!({"reconnected": true})
            ),
        ]
    );
    srv.shutdown().await;
}
