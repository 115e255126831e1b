//! Signed event notifications, end to end: a local receiver checks every
//! signature and refuses its first deliveries; credproxy is restarted in
//! between; every event still arrives, at least once, with no secret in
//! it. Both stores.

mod support;

use std::path::Path;
use std::time::Duration;

use credproxy_standins::receiver::Receiver;
use credproxy_standins::TokenMode;
use support::{client, run_cli, url, BinServer, Extra, World};

const HDR: &str = "X-Credproxy-Session";
const SECRET: &str = "whsec-test-0123456789";

fn notify(receiver: &Receiver, give_up_after: &str) -> String {
    format!(
        "[notify]\nurl = \"{}\"\nsecret = \"{SECRET}\"\ntimeout = \"2s\"\ngive_up_after = \"{give_up_after}\"\n",
        receiver.url()
    )
}

/// The config with `[notify]` appended (a top-level table goes last).
fn write_config(w: &World, store_url: Option<String>, notify: &str) -> std::path::PathBuf {
    let text = w.config_text(&Extra {
        store_url,
        ..Extra::default()
    }) + notify;
    let path = w.path("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn events_list(cfg: &Path) -> serde_json::Value {
    let out = run_cli(cfg, &["events", "list", "--json"]);
    assert!(
        out.status.success(),
        "events list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("events list --json prints JSON")
}

async fn every_event_arrives_across_a_restart(store_url: Option<String>) {
    let w = World::new().await;
    let receiver = Receiver::start("127.0.0.1:0".parse().expect("addr"), SECRET, 3)
        .await
        .expect("receiver");
    let cfg = write_config(&w, store_url, &notify(&receiver, "1h"));
    let tokens = w.spark.issue_tokens();
    let added = support::cli_add(&cfg, "spark", &tokens);
    let id = added["id"].as_str().expect("id").to_owned();
    let key = added["session_key"].as_str().expect("key").to_owned();

    let mut a = BinServer::spawn(&cfg, "info");
    // The token endpoint fails: the session turns refresh_failing.
    w.spark.set_token_mode(TokenMode::Fail500);
    w.spark.expire_access_tokens();
    let c = client();
    let resp = c
        .get(url(a.proxy_addr, "/spark/v1/listings"))
        .header(HDR, &key)
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 503);
    // The receiver refuses the first three deliveries; stop credproxy
    // while events are still undelivered.
    assert!(
        receiver.wait_for_refusals(1, Duration::from_secs(20)).await,
        "no delivery was attempted"
    );
    a.terminate();
    let pending = events_list(&cfg);
    assert!(
        pending.as_array().is_some_and(|a| !a.is_empty()),
        "events list shows the undelivered events: {pending}"
    );

    // A new process: it recovers the session and revokes it.
    let b = BinServer::spawn(&cfg, "info");
    w.spark.set_token_mode(TokenMode::Normal);
    let refreshed = run_cli(&cfg, &["session", "refresh", &id]);
    assert!(
        refreshed.status.success(),
        "{}",
        String::from_utf8_lossy(&refreshed.stderr)
    );
    let revoked = run_cli(&cfg, &["session", "revoke", &id]);
    assert!(revoked.status.success());

    for kind in [
        "session.connected",
        "session.refresh_failing",
        "session.recovered",
        "session.revoked",
    ] {
        let got = receiver
            .wait_for(Duration::from_secs(60), |e| {
                e["type"] == kind && e["session_id"] == id.as_str()
            })
            .await;
        assert!(
            got.is_some(),
            "{kind} never arrived; accepted: {:?}",
            receiver.accepted()
        );
    }
    assert_eq!(receiver.bad_signatures(), 0);
    assert!(receiver.refused() >= 3);
    // The contract's shape, and nothing secret in any event.
    let secrets: Vec<String> = [
        tokens.access_token.clone(),
        tokens.refresh_token.clone(),
        key.clone(),
        SECRET.to_owned(),
    ]
    .into_iter()
    .chain(w.secrets())
    .chain(w.spark.all_tokens())
    .collect();
    for d in receiver.accepted() {
        let keys: Vec<&str> = d
            .event
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        for k in ["id", "type", "session_id", "provider", "at", "detail"] {
            assert!(keys.contains(&k), "{k} missing from {}", d.body);
        }
        assert_eq!(d.event["provider"], "spark");
        for s in &secrets {
            assert!(
                !d.body.contains(s.as_str()),
                "a secret in an event: {}",
                d.body
            );
        }
    }
    let failing = receiver
        .accepted()
        .into_iter()
        .find(|d| d.event["type"] == "session.refresh_failing")
        .expect("refresh_failing");
    assert!(
        failing.event["detail"]["error"].is_string(),
        "{}",
        failing.body
    );
    // Delivered events leave the list once their delivery is recorded
    // (moments after the receiver's answer; until then a crash would
    // deliver them again: at least once).
    let mut left = serde_json::Value::Null;
    for _ in 0..100 {
        left = events_list(&cfg);
        let ours = left.as_array().map_or(0, |a| {
            a.iter().filter(|e| e["session_id"] == id.as_str()).count()
        });
        if ours == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !left
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["session_id"] == id.as_str())),
        "{left}"
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_across_a_restart_sqlite() {
    every_event_arrives_across_a_restart(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_across_a_restart_postgres() {
    let Some(db) = support::postgres_db("events_restart").await else {
        return;
    };
    every_event_arrives_across_a_restart(Some(db)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_nobody_takes_is_given_up_and_listed() {
    let w = World::new().await;
    let receiver = Receiver::start("127.0.0.1:0".parse().expect("addr"), SECRET, u64::MAX)
        .await
        .expect("receiver");
    let cfg = write_config(&w, None, &notify(&receiver, "2s"));
    let added = support::cli_add(&cfg, "spark", &w.spark.issue_tokens());
    let id = added["id"].as_str().expect("id").to_owned();
    let server = BinServer::spawn(&cfg, "info");
    let gave_up = server
        .stdout
        .wait_for(Duration::from_secs(30), |l| {
            l.contains("gave up delivering")
        })
        .or_else(|| {
            server
                .stderr
                .wait_for(Duration::from_secs(1), |l| l.contains("gave up delivering"))
        });
    assert!(gave_up.is_some(), "no log line says the event was given up");
    let listed = events_list(&cfg);
    let ours = listed
        .as_array()
        .and_then(|a| a.iter().find(|e| e["session_id"] == id.as_str()).cloned())
        .expect("the given-up event is listed");
    assert!(!ours["gave_up_at"].is_null(), "{ours}");
    let metrics = client()
        .get(url(server.admin_addr, "/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("credproxy_events_total{outcome=\"given_up\"} 1"),
        "{metrics}"
    );
}

/// `events list --given-up --json`.
fn given_up(cfg: &Path) -> Vec<serde_json::Value> {
    let out = run_cli(cfg, &["events", "list", "--given-up", "--json"]);
    assert!(
        out.status.success(),
        "events list --given-up: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("events list --json prints JSON");
    v.as_array().cloned().unwrap_or_default()
}

/// Polls `f` every 100 ms until it holds, at most `within`.
async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 21, item 9: a given-up event is deleted `keep_given_up` after it
/// was given up, so the table does not grow while a receiver stays down.
async fn given_up_events_are_pruned(store_url: Option<String>) {
    let w = World::new().await;
    let receiver = Receiver::start("127.0.0.1:0".parse().expect("addr"), SECRET, u64::MAX)
        .await
        .expect("receiver");
    let cfg = write_config(
        &w,
        store_url,
        &format!("{}keep_given_up = \"2s\"\n", notify(&receiver, "1s")),
    );
    let added = support::cli_add(&cfg, "spark", &w.spark.issue_tokens());
    let id = added["id"].as_str().expect("id").to_owned();
    let ours = |cfg: &Path| {
        events_list(cfg)
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["session_id"] == id.as_str()))
    };
    assert!(ours(&cfg), "the connect event waits for delivery");
    let server = BinServer::spawn(&cfg, "info");
    let said = |l: &str| l.contains("gave up delivering");
    let gave_up = server
        .stdout
        .wait_for(Duration::from_secs(30), said)
        .or_else(|| server.stderr.wait_for(Duration::from_secs(1), said));
    assert!(gave_up.is_some(), "no log line says the event was given up");
    assert!(
        eventually(Duration::from_secs(30), || !ours(&cfg)).await,
        "the given-up event is still there: {}",
        events_list(&cfg)
    );
    assert!(receiver.accepted().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_up_events_are_pruned_sqlite() {
    given_up_events_are_pruned(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_up_events_are_pruned_postgres() {
    let Some(db) = support::postgres_db("events_prune").await else {
        return;
    };
    given_up_events_are_pruned(Some(db)).await;
}

/// Issue 21, item 9: `events list --given-up`, `events clear` and `events
/// retry` (by id or `--all`); a retried event is delivered once the
/// receiver takes it.
async fn given_up_events_can_be_retried_and_cleared(store_url: Option<String>) {
    let w = World::new().await;
    let receiver = Receiver::start("127.0.0.1:0".parse().expect("addr"), SECRET, u64::MAX)
        .await
        .expect("receiver");
    let cfg = write_config(&w, store_url, &notify(&receiver, "1s"));
    let one = support::cli_add(&cfg, "spark", &w.spark.issue_tokens());
    let two = support::cli_add(&cfg, "spark", &w.spark.issue_tokens());
    let (one, two) = (
        one["id"].as_str().expect("id").to_owned(),
        two["id"].as_str().expect("id").to_owned(),
    );
    let _server = BinServer::spawn(&cfg, "info");
    let mut listed = Vec::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            listed = given_up(&cfg);
            listed.len() == 2
        })
        .await,
        "both connect events are given up: {listed:?}"
    );
    let event_of = |session: &str| {
        listed
            .iter()
            .find(|e| e["session_id"] == session)
            .and_then(|e| e["id"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no event of {session}: {listed:?}"))
    };
    let (first, second) = (event_of(&one), event_of(&two));

    // Neither ids nor --all: refused.
    let out = run_cli(&cfg, &["events", "clear"]);
    assert!(!out.status.success());
    // An id that is not a given-up event: exit 1, nothing deleted.
    let out = run_cli(&cfg, &["events", "clear", "evt_nosuchevent"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not given up"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(given_up(&cfg).len(), 2);
    // Clear one by id.
    let out = run_cli(&cfg, &["events", "clear", &first]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 given-up event(s) deleted"));
    let left = given_up(&cfg);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["id"], second.as_str());
    assert!(!events_list(&cfg)
        .as_array()
        .is_some_and(|a| a.iter().any(|e| e["id"] == first.as_str())));

    // The receiver is back: retry the rest; it is delivered.
    receiver.fail_next(0);
    let out = run_cli(&cfg, &["events", "retry", "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 given-up event(s) put back"));
    let got = receiver
        .wait_for(Duration::from_secs(30), |e| e["id"] == second.as_str())
        .await;
    assert!(got.is_some(), "the retried event never arrived");
    assert!(
        eventually(Duration::from_secs(10), || {
            !events_list(&cfg)
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["id"] == second.as_str()))
        })
        .await,
        "the delivered event left the list"
    );
    assert!(receiver
        .accepted()
        .iter()
        .all(|d| d.event["id"] != first.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_up_events_can_be_retried_and_cleared_sqlite() {
    given_up_events_can_be_retried_and_cleared(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_up_events_can_be_retried_and_cleared_postgres() {
    let Some(db) = support::postgres_db("events_given_up").await else {
        return;
    };
    given_up_events_can_be_retried_and_cleared(Some(db)).await;
}

#[test]
fn credproxys_signature_verifies_at_an_independent_receiver() {
    let body = br#"{"id":"evt_1","type":"session.revoked"}"#;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let header = credproxy::notify::sign::signature(SECRET.as_bytes(), now, body);
    assert!(credproxy_standins::receiver::signature_is_valid(
        SECRET.as_bytes(),
        &header,
        body,
        now
    ));
    assert!(!credproxy_standins::receiver::signature_is_valid(
        b"another secret",
        &header,
        body,
        now
    ));
}
