//! The store contract, run against both stores: every function below runs
//! once on SQLite (a temporary file) and once on PostgreSQL (a fresh
//! database on the server of `CREDPROXY_TEST_DATABASE_URL`).

mod support;

use std::sync::Arc;
use std::time::Duration;

use credproxy::session::{KeyHash, Status};
use credproxy::store::{
    self, Lease, NewSession, OAuthOutcome, OAuthState, SealedTokens, Store, StoreError,
};

fn tokens(tag: u8) -> SealedTokens {
    SealedTokens {
        access_token: vec![tag; 40],
        refresh_token: Some(vec![tag + 1; 40]),
        expires_at: Some(1_000_000 + i64::from(tag)),
    }
}

async fn insert(
    s: &Arc<dyn Store>,
    id: &str,
    key: &[u8],
    now: i64,
) -> credproxy::store::SessionRecord {
    s.insert_session(NewSession {
        id: id.to_owned(),
        provider: "spark".into(),
        label: Some(format!("label {id}")),
        key_hash: KeyHash::of(key),
        tokens: tokens(1),
        now,
    })
    .await
    .expect("insert")
}

async fn sessions_crud(s: Arc<dyn Store>) {
    s.ping().await.expect("ping");
    let a = insert(&s, "s_a", b"key-a", 100).await;
    assert_eq!(a.version, 1);
    assert_eq!(a.status, Status::Active);
    insert(&s, "s_b", b"key-b", 100).await;
    let dup = s
        .insert_session(NewSession {
            id: "s_c".into(),
            provider: "spark".into(),
            label: None,
            key_hash: KeyHash::of(b"key-a"),
            tokens: tokens(2),
            now: 101,
        })
        .await;
    assert!(matches!(dup, Err(StoreError::DuplicateKey)), "{dup:?}");

    let by_key = s
        .session_by_key(&KeyHash::of(b"key-b"))
        .await
        .expect("read")
        .expect("found");
    assert_eq!(by_key.id, "s_b");
    assert_eq!(by_key.key_hash, KeyHash::of(b"key-b"));
    assert_eq!(by_key.access_token, vec![1; 40]);
    assert_eq!(by_key.refresh_token, Some(vec![2; 40]));
    assert_eq!(by_key.expires_at, Some(1_000_001));
    assert!(s
        .session_by_key(&KeyHash::of(b"nope"))
        .await
        .expect("read")
        .is_none());
    assert_eq!(
        s.session_by_id("s_a")
            .await
            .expect("read")
            .expect("found")
            .label
            .as_deref(),
        Some("label s_a")
    );

    let ids: Vec<String> = s
        .list_sessions()
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["s_a", "s_b"], "oldest first, in insertion order");
    let counts = s.count_sessions().await.expect("count");
    assert_eq!(counts.len(), 1);
    assert_eq!(counts[0].count, 2);

    // Replace: unconditional, then compare-and-swap on the version.
    let r = s
        .replace_tokens("s_a", tokens(5), None, 200)
        .await
        .expect("replace")
        .expect("row");
    assert_eq!(r.version, 2);
    assert_eq!(r.access_token, vec![5; 40]);
    assert!(
        s.replace_tokens("s_a", tokens(6), Some(1), 201)
            .await
            .expect("cas")
            .is_none(),
        "stale version"
    );
    let r = s
        .replace_tokens("s_a", tokens(6), Some(2), 202)
        .await
        .expect("cas")
        .expect("row");
    assert_eq!((r.version, r.updated_at), (3, 202));
    assert!(s
        .replace_tokens("s_zzz", tokens(6), None, 203)
        .await
        .expect("replace")
        .is_none());

    assert!(s.delete_session("s_a", 300).await.expect("delete"));
    assert!(!s.delete_session("s_a", 301).await.expect("delete"));
    assert!(s.session_by_id("s_a").await.expect("read").is_none());
}

async fn leases_and_commits(s: Arc<dyn Store>) {
    insert(&s, "s_l", b"key-l", 100).await;
    // Deadlines are now + hold (PostgreSQL times them by its own clock).
    let lease = |owner: &'static str, hold_ms: i64| {
        let s = Arc::clone(&s);
        async move {
            let now = store::now_ms();
            s.acquire_refresh_lease("s_l", owner, now + hold_ms, now)
                .await
                .expect("lease")
        }
    };
    let Lease::Acquired(rec) = lease("one", 5_000).await else {
        panic!("free lease")
    };
    assert_eq!(rec.version, 1);
    // Another owner waits until the deadline; the same owner may renew.
    match lease("two", 6_000).await {
        Lease::Held { until_ms, version } => {
            assert_eq!(version, 1);
            let left = until_ms - store::now_ms();
            assert!((3_000..=5_000).contains(&left), "{left} ms left");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(lease("one", 7_000).await, Lease::Acquired(_)));
    let now = store::now_ms();
    assert!(matches!(
        s.acquire_refresh_lease("s_gone", "one", now + 1_000, now)
            .await
            .expect("lease"),
        Lease::Gone
    ));
    // Only the owner commits, and only on the version it read.
    assert!(s
        .commit_refresh("s_l", "two", tokens(7), 1, 500)
        .await
        .expect("commit")
        .is_none());
    assert!(s
        .commit_refresh("s_l", "one", tokens(7), 9, 500)
        .await
        .expect("commit")
        .is_none());
    let c = s
        .commit_refresh("s_l", "one", tokens(7), 1, 500)
        .await
        .expect("commit")
        .expect("row");
    assert_eq!((c.version, c.last_refresh_at), (2, Some(500)));
    assert_eq!(c.refresh_token, Some(vec![8; 40]));
    // The commit released the lease.
    assert!(matches!(lease("two", 9_000).await, Lease::Acquired(_)));
    s.release_refresh_lease("s_l", "one")
        .await
        .expect("release by a non-owner is a no-op");
    assert!(matches!(lease("one", 9_000).await, Lease::Held { .. }));
    s.release_refresh_lease("s_l", "two")
        .await
        .expect("release");
    // An expired lease is free for anyone.
    assert!(matches!(lease("one", 1).await, Lease::Acquired(_)));
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    assert!(matches!(lease("two", 9_000).await, Lease::Acquired(_)));
    // Reauthorization: compare-and-swap too; it bumps the version and clears the lease.
    assert!(!s
        .mark_reauthorization_required("s_l", 1, 600)
        .await
        .expect("mark"));
    assert!(s
        .mark_reauthorization_required("s_l", 2, 600)
        .await
        .expect("mark"));
    let r = s.session_by_id("s_l").await.expect("read").expect("row");
    assert_eq!((r.status, r.version), (Status::ReauthorizationRequired, 3));
    assert!(
        matches!(lease("one", 9_000).await, Lease::Acquired(_)),
        "marking released the lease"
    );
    // Replacing the tokens makes it active again.
    let r = s
        .replace_tokens("s_l", tokens(9), None, 700)
        .await
        .expect("replace")
        .expect("row");
    assert_eq!(r.status, Status::Active);
}

async fn change_log(s: Arc<dyn Store>) {
    let start = s.change_cursor().await.expect("cursor");
    let now = store::now();
    insert(&s, "s_x", b"key-x", now).await;
    insert(&s, "s_y", b"key-y", now).await;
    s.replace_tokens("s_x", tokens(3), None, now)
        .await
        .expect("replace");
    s.delete_session("s_y", now).await.expect("delete");
    let (cursor, ids) = s.changes_since(start).await.expect("changes");
    assert!(cursor > start);
    assert!(
        ids.contains(&"s_x".to_owned()) && ids.contains(&"s_y".to_owned()),
        "{ids:?}"
    );
    s.prune_changes(now + 10).await.expect("prune");
    // The newest entry survives a prune, so cursors stay meaningful.
    assert!(s.change_cursor().await.expect("cursor") >= cursor);
}

async fn oauth_states(s: Arc<dyn Store>) {
    let hash = [7u8; 32];
    let other = [8u8; 32];
    let state = OAuthState {
        provider: "zillow".into(),
        session_id: Some("s_r".into()),
        key_hash: Some(KeyHash::of(b"cli-key")),
        created_at: 1_000,
    };
    s.insert_oauth_state(&hash, &state).await.expect("insert");
    assert_eq!(
        s.peek_oauth_state(&hash, 900).await.expect("peek"),
        Some(state.clone())
    );
    assert_eq!(
        s.peek_oauth_state(&hash, 1_001).await.expect("peek"),
        None,
        "too old"
    );
    assert_eq!(
        s.oauth_outcome(&hash).await.expect("outcome"),
        OAuthOutcome::Pending
    );
    assert_eq!(
        s.take_oauth_state(&hash, "zillow", 1_100, 1_001)
            .await
            .expect("take"),
        None,
        "expired"
    );
    assert_eq!(
        s.take_oauth_state(&hash, "spark", 1_100, 900)
            .await
            .expect("take"),
        None,
        "bound to its provider"
    );
    assert_eq!(
        s.take_oauth_state(&hash, "zillow", 1_100, 900)
            .await
            .expect("take"),
        Some(state),
        "and not burnt by the wrong provider's callback"
    );
    assert_eq!(
        s.take_oauth_state(&hash, "zillow", 1_101, 900)
            .await
            .expect("take"),
        None,
        "once"
    );
    assert_eq!(
        s.peek_oauth_state(&hash, 900).await.expect("peek"),
        None,
        "used"
    );
    s.finish_oauth_state(
        &hash,
        &OAuthOutcome::Stored {
            session_id: "s_r".into(),
        },
    )
    .await
    .expect("finish");
    assert_eq!(
        s.oauth_outcome(&hash).await.expect("outcome"),
        OAuthOutcome::Stored {
            session_id: "s_r".into()
        }
    );
    assert_eq!(
        s.oauth_outcome(&other).await.expect("outcome"),
        OAuthOutcome::Unknown
    );
    s.insert_oauth_state(
        &other,
        &OAuthState {
            provider: "spark".into(),
            session_id: None,
            key_hash: None,
            created_at: 50,
        },
    )
    .await
    .expect("insert");
    s.finish_oauth_state(
        &other,
        &OAuthOutcome::Failed {
            reason: "refused".into(),
        },
    )
    .await
    .expect("finish");
    assert_eq!(
        s.oauth_outcome(&other).await.expect("outcome"),
        OAuthOutcome::Failed {
            reason: "refused".into()
        }
    );
    s.prune_oauth_states(100).await.expect("prune");
    assert_eq!(
        s.oauth_outcome(&other).await.expect("outcome"),
        OAuthOutcome::Unknown
    );
    assert_ne!(
        s.oauth_outcome(&hash).await.expect("outcome"),
        OAuthOutcome::Unknown
    );
}

/// Runs each suite function on both stores.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite_store {
            $(
                #[tokio::test]
                async fn $name() {
                    let dir = tempfile::tempdir().expect("dir");
                    let url = format!("sqlite://{}", dir.path().join("s.db").display());
                    super::$name(credproxy::store::open(&url).await.expect("open")).await;
                }
            )*
        }
        mod postgres_store {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(url) = crate::support::postgres_db(stringify!($name)).await else { return };
                    super::$name(credproxy::store::open(&url).await.expect("open")).await;
                }
            )*
        }
    };
}

on_both_stores!(sessions_crud, leases_and_commits, change_log, oauth_states);

// The SQLite file on disk, with the server running.

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_files_are_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let w = support::World::new().await;
    let srv = w.start(&support::Extra::default()).await;
    // A write, so that the -wal and -shm files exist.
    support::add_session(&srv, "spark", &w.spark).await;
    for name in [
        "credproxy.db",
        "credproxy.db-wal",
        "credproxy.db-shm",
        "credproxy.key",
    ] {
        let mode = std::fs::metadata(w.path(name))
            .expect(name)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}: {:o}", mode & 0o777);
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_sqlite_file_fails_readiness_and_every_write_loudly() {
    let w = support::World::new().await;
    let cfg = w.write_config(&support::Extra::default());
    let srv = support::BinServer::spawn(&cfg, "info");
    let c = support::client();
    let admin = |path: &str| support::url(srv.admin_addr, path);
    let ready = || async {
        c.get(admin("/readyz"))
            .send()
            .await
            .expect("readyz")
            .status()
    };
    assert_eq!(ready().await, 200);
    let add = || async {
        c.post(admin("/admin/sessions"))
            .bearer_auth(support::ADMIN_TOKEN)
            .json(&serde_json::json!({"provider": "spark", "access_token": "tok-deleted-file"}))
            .send()
            .await
            .expect("add")
    };
    let r = add().await;
    assert_eq!(r.status(), 201);
    let id = r.json::<serde_json::Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();

    let db = w.path("credproxy.db");
    std::fs::remove_file(&db).expect("rm credproxy.db");
    assert_eq!(
        ready().await,
        503,
        "the store is not ready without its file"
    );
    assert!(!add().await.status().is_success(), "an insert is refused");
    let r = c
        .post(admin(&format!("/admin/sessions/{id}/refresh")))
        .bearer_auth(support::ADMIN_TOKEN)
        .send()
        .await
        .expect("refresh");
    assert!(!r.status().is_success(), "a refresh is refused");
    assert_eq!(
        w.spark.token_calls(),
        0,
        "no refresh token is spent on a commit that would be lost"
    );
    let path = db.display().to_string();
    let line = srv
        .stderr
        .wait_for(Duration::from_secs(10), |l| {
            l.contains("ERROR") && l.contains(&path) && l.contains("deleted or replaced")
        })
        .expect("an error log line naming the file");
    assert!(line.contains("store write refused"), "{line}");

    // A new file in its place is not the one the server has open either.
    std::fs::write(&db, b"").expect("a new file");
    assert_eq!(ready().await, 503);
}
