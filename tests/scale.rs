//! Scaling with sessions, on both stores: bulk inserts log the keys they
//! add, a key added by another process works within the change-follow
//! interval although this one remembered it as unknown, and a flood of
//! random keys from one client is held to its budget of store reads while
//! another client's valid key keeps working.

mod support;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use credproxy::secrets::session::{KeyHash, SessionKey};
use credproxy::store::{self, NewSession, SealedTokens, StoreError};
use credproxy::tokens::sessions::NewTokens;
use secrecy::SecretString;
use support::{client, error_code, run_cli, url, Extra, World};

const HDR: &str = "X-Credproxy-Session";

/// The SQLite URL of a world, or a fresh PostgreSQL database (`None`: skipped).
async fn store_url(w: &World, pg: bool, test: &str) -> Option<Option<String>> {
    if pg {
        Some(Some(support::postgres_db(test).await?))
    } else {
        let _ = w;
        Some(None)
    }
}

fn new_session(i: usize, now: i64) -> NewSession {
    NewSession {
        id: format!("ses_bulk{i:08}"),
        provider: "spark".to_owned(),
        label: None,
        key_hash: KeyHash::of(format!("bulk-key-{i}").as_bytes()),
        tokens: SealedTokens {
            access_token: vec![1, 2, 3],
            refresh_token: Some(vec![4, 5]),
            expires_at: Some(now + 3600),
        },
        now,
    }
}

async fn bulk_insert_logs_added_keys(pg: bool) {
    let dir = tempfile::tempdir().expect("dir");
    let url = if pg {
        match support::postgres_db("bulk_insert_logs_added_keys").await {
            Some(u) => u,
            None => return,
        }
    } else {
        format!("sqlite://{}", dir.path().join("bulk.db").display())
    };
    let s = store::open(&url).await.expect("store");
    let cursor = s.change_cursor().await.expect("cursor");
    let now = store::now();
    // More rows than one statement takes, so the batch is split.
    let batch: Vec<NewSession> = (0..4500).map(|i| new_session(i, now)).collect();
    assert_eq!(s.insert_sessions(&batch, None).await.expect("bulk"), 4500);
    let total: i64 = s
        .count_sessions()
        .await
        .expect("count")
        .iter()
        .map(|c| c.count)
        .sum();
    assert_eq!(total, 4500);
    let rec = s
        .session_by_key(&KeyHash::of(b"bulk-key-4321"))
        .await
        .expect("read")
        .expect("inserted");
    assert_eq!(rec.id, "ses_bulk00004321");
    assert_eq!(rec.version, 1);
    let changes = s.changes(cursor).await.expect("changes");
    assert_eq!(changes.ids.len(), 4500);
    assert_eq!(changes.added_keys.len(), 4500);
    assert!(changes.added_keys.contains(&KeyHash::of(b"bulk-key-17")));
    // A batch with one existing key writes nothing.
    let again: Vec<NewSession> = (4500..4600)
        .map(|i| new_session(i, now))
        .chain(std::iter::once(NewSession {
            id: "ses_bulkdup".to_owned(),
            ..new_session(3, now)
        }))
        .collect();
    assert!(matches!(
        s.insert_sessions(&again, None).await,
        Err(StoreError::DuplicateKey)
    ));
    let total: i64 = s
        .count_sessions()
        .await
        .expect("count")
        .iter()
        .map(|c| c.count)
        .sum();
    assert_eq!(total, 4500, "the failed batch left nothing");
    // A single insert logs its key too; a refresh-like change logs none.
    let next = s.change_cursor().await.expect("cursor");
    s.insert_session(new_session(9000, now), None, None)
        .await
        .expect("insert");
    s.delete_session("ses_bulk00000001", now, None, None)
        .await
        .expect("delete");
    let changes = s.changes(next).await.expect("changes");
    assert!(changes.added_keys.contains(&KeyHash::of(b"bulk-key-9000")));
    if !pg {
        // PostgreSQL reads the last seconds again (commit order), SQLite not.
        assert_eq!(changes.added_keys.len(), 1);
    }
    assert!(changes.ids.contains(&"ses_bulk00000001".to_owned()));
}

#[tokio::test]
async fn bulk_insert_logs_added_keys_sqlite() {
    bulk_insert_logs_added_keys(false).await;
}

#[tokio::test]
async fn bulk_insert_logs_added_keys_postgres() {
    bulk_insert_logs_added_keys(true).await;
}

/// GETs `/spark/v1/x` with `key` until it answers 200, within `limit`;
/// returns how long it took.
async fn until_ok(addr: std::net::SocketAddr, key: &str, limit: Duration) -> Duration {
    let c = client();
    let started = Instant::now();
    loop {
        let r = c
            .get(url(addr, "/spark/v1/x"))
            .header(HDR, key)
            .send()
            .await
            .expect("send");
        if r.status() == 200 {
            return started.elapsed();
        }
        assert_eq!(r.status(), 401, "{:?}", error_code(&r));
        assert!(
            started.elapsed() < limit,
            "the added key still fails after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status_of(addr: std::net::SocketAddr, key: &str) -> u16 {
    client()
        .get(url(addr, "/spark/v1/x"))
        .header(HDR, key)
        .send()
        .await
        .expect("send")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_added_by_the_cli_works_on_a_running_sqlite_server_within_the_interval() {
    let w = World::new().await;
    let extra = Extra {
        store: "invalidation_interval = 0.5".to_owned(),
        ..Extra::default()
    };
    let cfg = w.write_config(&extra);
    let srv = w.start(&extra).await;
    let key = "cli-added-later-key-000000000001";
    assert_eq!(status_of(srv.proxy_addr, key).await, 401);
    assert_eq!(status_of(srv.proxy_addr, key).await, 401);
    assert_eq!(
        srv.sessions.key_reads(),
        1,
        "the second request was answered by the negative cache"
    );
    let t = w.spark.issue_tokens();
    let out = run_cli(
        &cfg,
        &[
            "session",
            "add",
            "--provider",
            "spark",
            "--access-token",
            &t.access_token,
            "--refresh-token",
            &t.refresh_token,
            "--key",
            key,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = until_ok(srv.proxy_addr, key, Duration::from_secs(2)).await;
    println!("a key added by the CLI worked after {took:?}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_added_on_one_postgres_instance_works_on_the_other_within_the_interval() {
    let Some(db) = support::postgres_db("key_added_other_instance").await else {
        return;
    };
    let w = World::new().await;
    let extra = Extra {
        store_url: Some(db),
        store: "invalidation_interval = 0.5".to_owned(),
        ..Extra::default()
    };
    let a = w.start(&extra).await;
    let b = w.start(&extra).await;
    let key = "pg-added-later-key-0000000000001";
    assert_eq!(status_of(b.proxy_addr, key).await, 401);
    assert_eq!(status_of(b.proxy_addr, key).await, 401);
    assert_eq!(b.sessions.key_reads(), 1);
    let t = w.spark.issue_tokens();
    a.sessions
        .add(
            "spark",
            NewTokens {
                access_token: SecretString::from(t.access_token.clone()),
                refresh_token: Some(SecretString::from(t.refresh_token.clone())),
                expires_in: t.expires_in,
            },
            None,
            Some(SessionKey::chosen(SecretString::from(key.to_owned())).expect("key")),
            credproxy::audit::Actor::Cli,
        )
        .await
        .expect("add on A");
    // At once on A, which added it.
    assert_eq!(status_of(a.proxy_addr, key).await, 200);
    let took = until_ok(b.proxy_addr, key, Duration::from_secs(2)).await;
    println!("a key added on A worked on B after {took:?}");
    a.shutdown().await;
    b.shutdown().await;
}

/// A client sending from `local` (every 127/8 address is this machine).
fn client_from(local: IpAddr) -> reqwest::Client {
    let _ = client();
    reqwest::Client::builder()
        .no_proxy()
        .local_address(local)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

async fn a_flood_of_random_keys_is_held_to_its_budget(pg: bool) {
    let w = World::new().await;
    let Some(store_url) = store_url(&w, pg, "flood_held_to_budget").await else {
        return;
    };
    let extra = Extra {
        store_url,
        // No hold here: this counts reads under a fast flood (the hold
        // has a test of its own below).
        store: "cold_lookups_per_client = 50\nover_budget_hold = \"0s\"".to_owned(),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let (_, key, _) = support::add_session(&srv, "spark", &w.spark).await;
    let started = Instant::now();
    let flooding = Arc::new(AtomicBool::new(true));
    // The valid client, on 127.0.0.1, for as long as the flood lasts.
    let valid = {
        let (addr, key, flooding) = (srv.proxy_addr, key.clone(), Arc::clone(&flooding));
        tokio::spawn(async move {
            let c = client_from("127.0.0.1".parse().expect("ip"));
            let mut ok = 0u64;
            while flooding.load(Ordering::Relaxed) || ok < 10 {
                let r = c
                    .get(url(addr, "/spark/v1/valid"))
                    .header(HDR, &key)
                    .send()
                    .await
                    .expect("send");
                assert_eq!(r.status(), 200, "{:?}", error_code(&r));
                ok += 1;
            }
            ok
        })
    };
    // The flood, from 127.0.0.2: 2,000 random keys, 16 at a time.
    let flood = client_from("127.0.0.2".parse().expect("ip"));
    let (limited, unknown) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut set = tokio::task::JoinSet::new();
    for t in 0..16 {
        let (c, addr) = (flood.clone(), srv.proxy_addr);
        let (limited, unknown) = (Arc::clone(&limited), Arc::clone(&unknown));
        set.spawn(async move {
            for i in 0..125 {
                let k = format!("flood-{t}-{i}-{:016x}", rand::random::<u64>());
                let r = c
                    .get(url(addr, "/spark/v1/flood"))
                    .header(HDR, &k)
                    .send()
                    .await
                    .expect("send");
                match r.status().as_u16() {
                    429 => {
                        assert_eq!(error_code(&r).as_deref(), Some("too_many_lookups"));
                        let after: u64 = r.headers()["retry-after"]
                            .to_str()
                            .expect("ascii")
                            .parse()
                            .expect("seconds");
                        assert!(after >= 1);
                        let body: serde_json::Value = r.json().await.expect("json");
                        assert_eq!(body["error"]["code"], "too_many_lookups");
                        limited.fetch_add(1, Ordering::Relaxed);
                    }
                    401 => {
                        unknown.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("flood answered {other}"),
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("flood task");
    }
    flooding.store(false, Ordering::Relaxed);
    let ok = valid.await.expect("valid client");
    let elapsed = started.elapsed().as_secs_f64();
    let (limited, unknown) = (
        limited.load(Ordering::Relaxed),
        unknown.load(Ordering::Relaxed),
    );
    let reads = srv.sessions.key_reads();
    println!(
        "flood: {unknown} x 401, {limited} x 429 in {elapsed:.2} s; {reads} store reads; valid client {ok} x 200"
    );
    assert_eq!(limited + unknown, 2000);
    // A burst of 50, then 50 a second: each 401 was one store read.
    let allowed = 50 + (50.0 * elapsed).ceil() as u64;
    assert!(
        unknown <= allowed,
        "{unknown} flood keys read, at most {allowed}"
    );
    assert!(limited >= 2000 - allowed, "{limited} refused");
    // Besides those, only the valid key's reads: its first, and one after
    // each change-log pass that named its session (its own insert; on
    // PostgreSQL the log's last seconds are read again at every poll).
    assert!(
        reads <= unknown + 10,
        "{reads} store reads for {unknown} unknown keys"
    );
    srv.shutdown().await;
}

/// `store.over_budget_hold`: a request over its client's budget gets its
/// 429 only after the hold, while other clients are served meanwhile.
#[tokio::test]
async fn requests_over_the_budget_are_held_while_others_are_served() {
    let w = World::new().await;
    let extra = Extra {
        store: "cold_lookups_per_client = 2\nover_budget_hold = \"2s\"".to_owned(),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let (_, key, _) = support::add_session(&srv, "spark", &w.spark).await;
    let flood = client_from("127.0.0.2".parse().expect("ip"));
    let addr = srv.proxy_addr;
    let made_up = |i: u32| format!("made-up-{i}-{:016x}", rand::random::<u64>());
    // The burst: two cold lookups, answered at once (401 unknown).
    for i in 0..2 {
        let r = flood
            .get(url(addr, "/spark/v1/x"))
            .header(HDR, made_up(i))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 401);
    }
    let held = {
        let (flood, k) = (flood.clone(), made_up(9));
        tokio::spawn(async move {
            let asked = Instant::now();
            let r = flood
                .get(url(addr, "/spark/v1/x"))
                .header(HDR, k)
                .send()
                .await
                .expect("send");
            (r.status(), error_code(&r), asked.elapsed())
        })
    };
    // Another client is served while the flood's request is held.
    let valid = client_from("127.0.0.1".parse().expect("ip"));
    for _ in 0..5 {
        let r = valid
            .get(url(addr, "/spark/v1/valid"))
            .header(HDR, &key)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
    }
    assert!(
        !held.is_finished(),
        "the refusal waits for its hold (2 s) while the valid client is served"
    );
    let (status, code, took) = held.await.expect("held request");
    assert_eq!(status, 429);
    assert_eq!(code.as_deref(), Some("too_many_lookups"));
    assert!(took >= Duration::from_secs(2), "answered after {took:?}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_random_keys_is_held_to_its_budget_sqlite() {
    a_flood_of_random_keys_is_held_to_its_budget(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_random_keys_is_held_to_its_budget_postgres() {
    a_flood_of_random_keys_is_held_to_its_budget(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_late_in_a_big_batch_from_elsewhere_works_within_the_interval() {
    let w = World::new().await;
    let extra = Extra {
        store: "invalidation_interval = 0.5".to_owned(),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let last = "batch-key-00024999-late-in-the-batch";
    assert_eq!(status_of(srv.proxy_addr, last).await, 401);
    assert_eq!(status_of(srv.proxy_addr, last).await, 401);
    assert_eq!(srv.sessions.key_reads(), 1);
    // Another writer of the same store (as `seed --bulk` would be): 25,000
    // sessions, more than two pages of the change log, in one transaction.
    let (other, _) = credproxy::tokens::sessions::Sessions::open(&w.config(&extra))
        .await
        .expect("open");
    let t = w.spark.issue_tokens();
    let batch = (0..25_000)
        .map(|i| {
            let key = if i == 24_999 {
                last.to_owned()
            } else {
                format!("batch-key-{i:08}-early")
            };
            (
                KeyHash::of(key.as_bytes()),
                NewTokens {
                    access_token: SecretString::from(t.access_token.clone()),
                    refresh_token: Some(SecretString::from(t.refresh_token.clone())),
                    expires_in: t.expires_in,
                },
            )
        })
        .collect();
    other
        .add_many("spark", batch, credproxy::audit::Actor::Cli)
        .await
        .expect("add many");
    // Within one poll: read page by page, not one page a poll (which
    // would take three polls, 1 s and more).
    let took = until_ok(srv.proxy_addr, last, Duration::from_millis(990)).await;
    println!("the last key of a 25,000-session batch worked after {took:?}");
    srv.shutdown().await;
}
