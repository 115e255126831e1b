//! A hostile token endpoint (written here, with a matching API): one that
//! streams its answer without end, and one that answers an access token
//! that cannot travel in a header. credproxy runs as the built binary, so
//! its memory and its log lines are those of the real process.

mod support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use support::{client, error_code, url, BinServer, ADMIN_TOKEN};

const HDR: &str = "X-Credproxy-Session";

/// What the token endpoint answers to a refresh with the valid refresh token.
enum Answer {
    /// 200 with these tokens; the refresh token becomes the only valid one,
    /// and an access token without control characters the one the API takes.
    Tokens { access: String, refresh: String },
    /// 200 and a body of 1 MiB chunks that does not end (it stops at
    /// 256 MiB and then stalls, so that a credproxy without a cap cannot
    /// take the test machine down).
    Endless,
}

#[derive(Default)]
struct Inner {
    answers: VecDeque<Answer>,
    /// Strict rotation: only this refresh token is accepted.
    valid_refresh: String,
    /// The access token the API accepts.
    good_access: String,
    /// Every refresh token presented, in order.
    seen: Vec<String>,
    /// Tokens of the answers made when the queue was empty.
    issued: u64,
}

#[derive(Clone, Default)]
struct Hostile {
    inner: Arc<Mutex<Inner>>,
    streamed: Arc<AtomicU64>,
}

impl Hostile {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("hostile state")
    }

    fn queue(&self, answer: Answer) {
        self.lock().answers.push_back(answer);
    }

    fn seen(&self) -> Vec<String> {
        self.lock().seen.clone()
    }

    fn valid_refresh(&self) -> String {
        self.lock().valid_refresh.clone()
    }
}

fn tokens(access: &str, refresh: &str) -> Answer {
    Answer::Tokens {
        access: access.to_owned(),
        refresh: refresh.to_owned(),
    }
}

async fn token(State(h): State<Hostile>, body: axum::body::Bytes) -> Response {
    let presented = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["refresh_token"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let answer = {
        let mut s = h.lock();
        s.seen.push(presented.clone());
        if presented != s.valid_refresh {
            return (
                StatusCode::BAD_REQUEST,
                [("content-type", "application/json")],
                r#"{"error":"invalid_grant"}"#,
            )
                .into_response();
        }
        let answer = match s.answers.pop_front() {
            Some(a) => a,
            None => {
                s.issued += 1;
                tokens(&format!("good-{}", s.issued), &format!("r-x{}", s.issued))
            }
        };
        if let Answer::Tokens { access, refresh } = &answer {
            s.valid_refresh = refresh.clone();
            if access.bytes().all(|b| b.is_ascii_graphic()) {
                s.good_access = access.clone();
            }
        }
        answer
    };
    match answer {
        Answer::Tokens { access, refresh } => (
            [("content-type", "application/json")],
            serde_json::json!({
                "access_token": access,
                "refresh_token": refresh,
                "expires_in": 3600,
            })
            .to_string(),
        )
            .into_response(),
        Answer::Endless => {
            let streamed = Arc::clone(&h.streamed);
            let chunks = futures_util::stream::unfold(0u32, move |n| {
                let streamed = Arc::clone(&streamed);
                async move {
                    if n == 256 {
                        std::future::pending::<()>().await;
                    }
                    streamed.fetch_add(1 << 20, Ordering::Relaxed);
                    Some((
                        Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 1 << 20])),
                        n + 1,
                    ))
                }
            });
            (
                [("content-type", "application/json")],
                Body::from_stream(chunks),
            )
                .into_response()
        }
    }
}

async fn api(State(h): State<Hostile>, headers: HeaderMap) -> Response {
    let good = format!("OAuth {}", h.lock().good_access);
    let sent = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !h.lock().good_access.is_empty() && sent == good {
        ([("content-type", "application/json")], r#"{"ok":true}"#).into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [("content-type", "application/json")],
            r#"{"D":{"Success":false,"Code":1020,"Message":"Session token has expired"}}"#,
        )
            .into_response()
    }
}

async fn start_hostile(h: Hostile) -> SocketAddr {
    let app = axum::Router::new()
        .route("/token", axum::routing::post(token))
        .route("/api/{*rest}", axum::routing::any(api))
        .with_state(h);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// A credproxy config whose one provider (Spark) talks to the hostile server.
fn write_config(
    dir: &std::path::Path,
    addr: SocketAddr,
    store: Option<String>,
    extra: &str,
) -> std::path::PathBuf {
    let store = store.unwrap_or_else(|| format!("sqlite://{}", dir.join("credproxy.db").display()));
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[store]
url = "{store}"
key_file = "{key}"

[admin]
token = "{ADMIN_TOKEN}"

[providers.spark]
kind = "spark"
api_base = "http://{addr}/api"
token_url = "http://{addr}/token"
authorize_url = "http://{addr}/authorize"
client_id = "hostile-client"
client_secret = "hostile-secret"
token_timeout = "20s"
{extra}
"#,
        key = dir.join("credproxy.key").display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Adds a Spark session through the admin API: an access token the API
/// refuses (so the first request refreshes) and refresh token `r-1`.
async fn add_session(srv: &BinServer, h: &Hostile) -> (String, String) {
    h.lock().valid_refresh = "r-1".into();
    let r = client()
        .post(url(srv.admin_addr, "/admin/sessions"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({
            "provider": "spark",
            "access_token": "stale-1",
            "refresh_token": "r-1",
            "expires_in": 3600,
        }))
        .send()
        .await
        .expect("add session");
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.expect("json");
    (
        v["id"].as_str().expect("id").to_owned(),
        v["session_key"].as_str().expect("key").to_owned(),
    )
}

async fn status_of(srv: &BinServer, id: &str) -> String {
    let v: serde_json::Value = client()
        .get(url(srv.admin_addr, &format!("/admin/sessions/{id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("session info")
        .json()
        .await
        .expect("json");
    v["status"].as_str().expect("status").to_owned()
}

/// The session's status and last error, as the admin API shows them.
async fn health_of(srv: &BinServer, id: &str) -> (String, Option<String>) {
    let v: serde_json::Value = client()
        .get(url(srv.admin_addr, &format!("/admin/sessions/{id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("session info")
        .json()
        .await
        .expect("json");
    (
        v["status"].as_str().expect("status").to_owned(),
        v["last_error"].as_str().map(str::to_owned),
    )
}

async fn get(srv: &BinServer, key: &str, path: &str) -> reqwest::Response {
    client()
        .get(url(srv.proxy_addr, path))
        .header(HDR, key)
        .send()
        .await
        .expect("send")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_token_answer_is_cut_off_and_fails_the_refresh_as_transient() {
    let h = Hostile::default();
    let addr = start_hostile(h.clone()).await;
    let dir = tempfile::tempdir().expect("dir");
    let cfg = write_config(dir.path(), addr, None, "");
    let srv = BinServer::spawn(&cfg, "info");
    let (id, key) = add_session(&srv, &h).await;
    let before_kib = srv.peak_rss_kib();

    h.queue(Answer::Endless);
    let started = Instant::now();
    let r = get(&srv, &key, "/spark/v1/listings").await;
    let took = started.elapsed();
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(&r).as_deref(), Some("token_refresh_failed"));
    assert!(r.headers().contains_key("retry-after"));
    // Cut off at 64 KiB, not read until token_timeout (20 s).
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let streamed = h.streamed.load(Ordering::Relaxed);
    assert!(
        streamed <= 32 << 20,
        "the endpoint got {} MiB out before credproxy hung up",
        streamed >> 20
    );
    let grown_kib = srv.peak_rss_kib().saturating_sub(before_kib);
    assert!(grown_kib < 32 * 1024, "peak RSS grew by {grown_kib} KiB");

    // Transient: the session is intact (refresh_failing, the cause shown)
    // and its refresh token unspent.
    assert_eq!(
        health_of(&srv, &id).await,
        (
            "refresh_failing".to_owned(),
            Some("token_answer_too_large".to_owned())
        )
    );
    assert_eq!(h.valid_refresh(), "r-1");
    let line = srv
        .stderr
        .wait_for(Duration::from_secs(5), |l| l.contains("refresh failed"))
        .expect("a log line for the failed refresh");
    assert!(line.contains("65536 bytes"), "{line}");

    // The stored refresh token still works: a refresh from the CLI
    // succeeds, and the server picks its tokens up (change log, <= 2 s).
    let out = support::run_cli(&cfg, &["session", "refresh", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(h.seen(), ["r-1", "r-1"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(&srv, &key, "/spark/v1/listings").await;
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(Instant::now() < deadline, "refreshed tokens not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A refresh answered with an access token holding a newline (and a good,
/// rotated refresh token), then with good tokens.
async fn unusable_access_token_then_good(store: Option<String>) {
    let h = Hostile::default();
    let addr = start_hostile(h.clone()).await;
    let dir = tempfile::tempdir().expect("dir");
    let cfg = write_config(dir.path(), addr, store, "");
    let srv = BinServer::spawn(&cfg, "info");
    let (id, key) = add_session(&srv, &h).await;

    h.queue(tokens("bad-7f3c\ntoken-91ab", "r-2"));
    h.queue(tokens("good-2", "r-3"));
    // The 401 on the stale token makes credproxy refresh: the first answer
    // is unusable, so it stores r-2 and spends it at once; the caller sees
    // nothing of it.
    let r = get(&srv, &key, "/spark/v1/listings").await;
    assert_eq!(r.status(), 200, "{:?}", r.headers());
    let r = get(&srv, &key, "/spark/v1/listings").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        h.seen(),
        ["r-1", "r-2"],
        "the rotated refresh token was kept"
    );
    assert_eq!(status_of(&srv, &id).await, "active");

    let line = srv
        .stderr
        .wait_for(Duration::from_secs(5), |l| l.contains("cannot be sent"))
        .expect("a warning about the unusable access token");
    assert!(line.contains("WARN") && line.contains(&id), "{line}");
    for l in srv.stderr.all().iter().chain(&srv.stdout.all()) {
        assert!(
            !l.contains("7f3c") && !l.contains("91ab"),
            "token logged: {l}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_access_token_is_not_stored_and_the_refresh_token_is() {
    unusable_access_token_then_good(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_access_token_is_not_stored_and_the_refresh_token_is_postgres() {
    let Some(db) = support::postgres_db("unusable_access_token").await else {
        return;
    };
    unusable_access_token_then_good(Some(db)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_access_tokens_twice_are_a_503_and_the_next_refresh_recovers() {
    let h = Hostile::default();
    let addr = start_hostile(h.clone()).await;
    let dir = tempfile::tempdir().expect("dir");
    // The default min_refresh_interval (30 s) stays: the token marked
    // unusable is refreshed at its next use however recent the last refresh.
    let cfg = write_config(dir.path(), addr, None, "refresh_backoff_max = \"1ms\"");
    let srv = BinServer::spawn(&cfg, "info");
    let (id, key) = add_session(&srv, &h).await;

    h.queue(tokens("bad one", "r-2"));
    h.queue(tokens("bad\u{7f}two", "r-3"));
    h.queue(tokens("good-4", "r-4"));
    let r = get(&srv, &key, "/spark/v1/listings").await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(&r).as_deref(), Some("token_refresh_failed"));
    assert_eq!(h.seen(), ["r-1", "r-2"]);
    assert_eq!(
        health_of(&srv, &id).await,
        (
            "refresh_failing".to_owned(),
            Some("unusable_access_token".to_owned())
        )
    );
    // The back-off is at most 1 ms here; a request during it is a 503 too,
    // never a 500.
    let mut tries = 0;
    let r = loop {
        tries += 1;
        let r = get(&srv, &key, "/spark/v1/listings").await;
        if r.status() != 503 || tries == 50 {
            break r;
        }
    };
    assert_eq!(r.status(), 200, "after {tries} tries");
    assert_eq!(h.seen(), ["r-1", "r-2", "r-3"]);
    assert_eq!(health_of(&srv, &id).await, ("active".to_owned(), None));
}
