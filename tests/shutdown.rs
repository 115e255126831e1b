//! SIGTERM while a refresh is under way (issue 21, item 2): the process
//! waits for it (up to `shutdown_grace`) so that a refresh token the
//! provider has rotated is committed, and gives back the refresh leases it
//! still holds, so the next process does not wait them out.
//!
//! The refresh here is a background one: a 401 on a request whose body was
//! too large to keep for a replay goes back as it came, and the refresh
//! starts with no caller waiting for it. The Spark stand-in rotates
//! strictly: a refresh token that was answered but not committed is lost.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use credproxy_standins::TokenMode;
use support::{client, error_code, url, BinServer, Extra, World};

const WAIT: Duration = Duration::from_secs(20);

fn sigterm(srv: &BinServer) {
    let status = Command::new("kill")
        .args(["-TERM", &srv.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM");
}

/// Waits (bounded) for the server process to exit; its exit status.
async fn exited(mut srv: BinServer) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = srv.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .expect("join")
}

/// A POST whose body is over `max_replay_body`: its 401 cannot be replayed,
/// so it goes back as it came and starts a background refresh.
async fn refused_unkept(c: &reqwest::Client, srv: &BinServer, key: &str) {
    let r = c
        .post(url(srv.proxy_addr, "/spark/v1/contacts"))
        .header("X-Credproxy-Session", key)
        .body(vec![b'x'; 200])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401, "the upstream's 401 goes back as it came");
}

/// Starts a background refresh (see [`refused_unkept`]) that waits at the
/// token endpoint, which holds its answer until its mode changes.
async fn refresh_in_background_hanging(w: &World, c: &reqwest::Client, srv: &BinServer, key: &str) {
    w.spark.set_token_mode(TokenMode::Hang);
    w.spark.expire_access_tokens();
    refused_unkept(c, srv, key).await;
    tokio::time::timeout(WAIT, w.spark.wait_for_token_calls(1))
        .await
        .expect("the background refresh reached the token endpoint");
}

async fn get(c: &reqwest::Client, srv: &BinServer, key: &str) -> (u16, Option<String>) {
    let r = c
        .get(url(srv.proxy_addr, "/spark/v1/me"))
        .header("X-Credproxy-Session", key)
        .send()
        .await
        .expect("send");
    (r.status().as_u16(), error_code(&r))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_a_background_refresh_to_be_committed() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra {
        spark: "max_replay_body = 16".into(),
        ..Extra::default()
    });
    let key = support::cli_add_spark(&cfg, &w);
    let c = client();
    let srv = BinServer::spawn(&cfg, "info");

    // The token endpoint holds its answer until told to go on.
    refresh_in_background_hanging(&w, &c, &srv, &key).await;

    sigterm(&srv);
    // The process says it waits for the refresh (a process that does not
    // wait exits, closing its log instead).
    let stderr = std::sync::Arc::clone(&srv.stderr);
    let waiting = tokio::task::spawn_blocking(move || {
        stderr.wait_for(WAIT, |l| l.contains("waiting for refreshes under way"))
    })
    .await
    .expect("join");
    // The provider answers now, rotating the refresh token.
    w.spark.set_token_mode(TokenMode::Normal);
    let status = exited(srv).await;
    assert!(
        waiting.is_some(),
        "SIGTERM did not wait for the refresh under way"
    );
    assert!(status.success(), "{status:?}");
    assert_eq!(w.spark.grant_count(), 1, "the refresh was answered");

    // The next process has the rotated tokens: no refresh is needed, and
    // the next one spends the newest refresh token.
    let srv = BinServer::spawn(&cfg, "warn");
    assert_eq!(get(&c, &srv, &key).await, (200, None));
    w.spark.expire_access_tokens();
    assert_eq!(
        get(&c, &srv, &key).await,
        (200, None),
        "the rotated refresh token was kept; stderr:\n{}",
        srv.stderr.all().join("\n")
    );
    assert_eq!(w.spark.reused_refresh_tokens(), 0);
    sigterm(&srv);
    assert!(exited(srv).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_outlasts_the_grace_gives_its_lease_back() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra {
        server: "shutdown_grace = \"1s\"".into(),
        spark: "max_replay_body = 16".into(),
        ..Extra::default()
    });
    // `shutdown_grace = 10` comes first in the test config; the last wins
    // only if the parser allows it, so write the file with one value.
    let text = std::fs::read_to_string(&cfg)
        .expect("config")
        .replace("shutdown_grace = 10\n", "");
    std::fs::write(&cfg, text).expect("write config");
    let key = support::cli_add_spark(&cfg, &w);
    let c = client();
    let srv = BinServer::spawn(&cfg, "info");

    refresh_in_background_hanging(&w, &c, &srv, &key).await;
    sigterm(&srv);
    let status = exited(srv).await;
    assert!(status.success(), "{status:?}");
    // The provider now refuses every grant (the hung call ends without a
    // rotation): the next process's refresh is answered at once.
    w.spark.set_token_mode(TokenMode::InvalidGrant);

    // The next process refreshes at once: the exited process's lease was
    // given back (otherwise it waits for the lease to expire, ~25 s).
    let srv = BinServer::spawn(&cfg, "warn");
    let started = Instant::now();
    let outcome = get(&c, &srv, &key).await;
    let took = started.elapsed();
    assert_eq!(outcome, (401, Some("reauthorization_required".into())));
    assert!(
        took < Duration::from_secs(10),
        "the first request waited {took:?} on the exited process's lease"
    );
    sigterm(&srv);
    assert!(exited(srv).await.success());
}
