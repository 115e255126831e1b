//! The store contract, run against both stores: every function below runs
//! once on SQLite (a temporary file) and once on PostgreSQL (a fresh
//! database on the server of `CREDPROXY_TEST_DATABASE_URL`).

mod support;

use std::sync::Arc;
use std::time::Duration;

use credproxy::secrets::session::{KeyHash, Status};
use credproxy::store::{
    self, EventKind, EventRow, Failure, Health, IdleSession, Lease, NewEvent, NewSession,
    OAuthOutcome, OAuthState, SealedTokens, Store, StoreError,
};

const HEALTHY: Health<'static> = Health::Healthy { recovered: None };

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
    s.insert_session(
        NewSession {
            id: id.to_owned(),
            provider: "spark".into(),
            label: Some(format!("label {id}")),
            key_hash: KeyHash::of(key),
            tokens: tokens(1),
            now,
        },
        None,
        None,
    )
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
        .insert_session(
            NewSession {
                id: "s_c".into(),
                provider: "spark".into(),
                label: None,
                key_hash: KeyHash::of(b"key-a"),
                tokens: tokens(2),
                now: 101,
            },
            None,
            None,
        )
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
        .replace_tokens("s_a", tokens(5), None, 200, None, None)
        .await
        .expect("replace")
        .expect("row");
    assert_eq!(r.version, 2);
    assert_eq!(r.access_token, vec![5; 40]);
    assert!(
        s.replace_tokens("s_a", tokens(6), Some(1), 201, None, None)
            .await
            .expect("cas")
            .is_none(),
        "stale version"
    );
    let r = s
        .replace_tokens("s_a", tokens(6), Some(2), 202, None, None)
        .await
        .expect("cas")
        .expect("row");
    assert_eq!((r.version, r.updated_at), (3, 202));
    assert!(s
        .replace_tokens("s_zzz", tokens(6), None, 203, None, None)
        .await
        .expect("replace")
        .is_none());

    assert!(s
        .delete_session("s_a", 300, None, None)
        .await
        .expect("delete"));
    assert!(!s
        .delete_session("s_a", 301, None, None)
        .await
        .expect("delete"));
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
        .commit_refresh("s_l", "two", tokens(7), 1, 500, HEALTHY, None)
        .await
        .expect("commit")
        .is_none());
    assert!(s
        .commit_refresh("s_l", "one", tokens(7), 9, 500, HEALTHY, None)
        .await
        .expect("commit")
        .is_none());
    let c = s
        .commit_refresh("s_l", "one", tokens(7), 1, 500, HEALTHY, None)
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
        .mark_reauthorization_required("s_l", 1, 600, "invalid_grant", None, None)
        .await
        .expect("mark"));
    assert!(s
        .mark_reauthorization_required("s_l", 2, 600, "invalid_grant", None, None)
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
        .replace_tokens("s_l", tokens(9), None, 700, None, None)
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
    s.replace_tokens("s_x", tokens(3), None, now, None, None)
        .await
        .expect("replace");
    s.delete_session("s_y", now, None, None)
        .await
        .expect("delete");
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

fn event(kind: EventKind, id: &str, detail: serde_json::Value) -> NewEvent {
    NewEvent::new(kind, id, "spark", store::now(), detail)
}

async fn lease_for(s: &Arc<dyn Store>, id: &str, owner: &str) -> credproxy::store::SessionRecord {
    let now = store::now_ms();
    match s
        .acquire_refresh_lease(id, owner, now + 60_000, now)
        .await
        .expect("lease")
    {
        Lease::Acquired(rec) => rec,
        other => panic!("{other:?}"),
    }
}

/// The events of `s`, undelivered, as `(kind, session, detail)`.
async fn events_of(s: &Arc<dyn Store>) -> Vec<(String, String, serde_json::Value)> {
    s.list_events(1000)
        .await
        .expect("list events")
        .into_iter()
        .map(|e| {
            let detail = serde_json::from_str(&e.detail).expect("detail is JSON");
            (e.kind, e.session_id, detail)
        })
        .collect()
}

/// Health transitions, each with its event written once, in the
/// transaction of the change.
async fn health_and_events(s: Arc<dyn Store>) {
    use serde_json::json;
    let connected = event(EventKind::Connected, "s_h", json!({"reconnected": false}));
    let rec = s
        .insert_session(
            NewSession {
                id: "s_h".into(),
                provider: "spark".into(),
                label: None,
                key_hash: KeyHash::of(b"key-h"),
                tokens: tokens(1),
                now: 100,
            },
            Some(&connected),
            None,
        )
        .await
        .expect("insert");
    assert_eq!(
        (
            rec.last_error.as_deref(),
            rec.next_retry_at,
            rec.last_used_at
        ),
        (None, None, None)
    );
    let listed = s.list_events(10).await.expect("list");
    assert_eq!(listed.len(), 1);
    let e = &listed[0];
    assert_eq!(
        (
            e.id.as_str(),
            e.kind.as_str(),
            e.session_id.as_str(),
            e.provider.as_str()
        ),
        (connected.id.as_str(), "session.connected", "s_h", "spark")
    );
    assert_eq!((e.attempts, e.last_error.as_deref()), (0, None));
    assert_eq!((e.delivered_at, e.gave_up_at), (None, None));
    assert_eq!(e.at, connected.at);
    assert!(e.next_attempt_at_ms <= store::now_ms(), "due at once");

    // A transient failure under the lease: refresh_failing, the lease
    // released, the version kept, one event and one change-log entry.
    let v = lease_for(&s, "s_h", "one").await.version;
    let cursor = s.change_cursor().await.expect("cursor");
    let failing = |class: &'static str, at: i64| {
        event(
            EventKind::RefreshFailing,
            "s_h",
            json!({"error": class, "next_retry_at": at}),
        )
    };
    let first = failing("token_endpoint_error", 1_000);
    let became = s
        .mark_refresh_failing(
            "s_h",
            "one",
            v,
            200,
            Failure {
                class: "token_endpoint_error",
                next_retry_at: 1_000,
                event: Some(&first),
            },
        )
        .await
        .expect("mark failing");
    assert!(became, "active -> refresh_failing is a transition");
    let r = s.session_by_id("s_h").await.expect("read").expect("row");
    assert_eq!(r.status, Status::RefreshFailing);
    assert_eq!(r.last_error.as_deref(), Some("token_endpoint_error"));
    assert_eq!((r.next_retry_at, r.version), (Some(1_000), v));
    let (after, ids) = s.changes_since(cursor).await.expect("changes");
    assert!(ids.contains(&"s_h".to_owned()), "{ids:?}");
    assert!(
        matches!(lease_for_any(&s, "s_h", "two").await, Lease::Acquired(_)),
        "the failure released the lease"
    );
    // A second failure: the error and retry time move, nothing else.
    let second = failing("token_endpoint_timeout", 2_000);
    let became = s
        .mark_refresh_failing(
            "s_h",
            "two",
            v,
            300,
            Failure {
                class: "token_endpoint_timeout",
                next_retry_at: 2_000,
                event: Some(&second),
            },
        )
        .await
        .expect("mark failing again");
    assert!(!became, "already failing: no transition");
    let r = s.session_by_id("s_h").await.expect("read").expect("row");
    assert_eq!(
        (r.status, r.last_error.as_deref(), r.next_retry_at),
        (
            Status::RefreshFailing,
            Some("token_endpoint_timeout"),
            Some(2_000)
        )
    );
    assert_eq!(
        s.change_cursor().await.expect("cursor"),
        after,
        "no change logged"
    );
    // A stale version marks nothing (someone refreshed meanwhile).
    assert!(!s
        .mark_refresh_failing(
            "s_h",
            "two",
            v - 1,
            300,
            Failure {
                class: "token_endpoint_error",
                next_retry_at: 9_000,
                event: Some(&second),
            },
        )
        .await
        .expect("stale mark"));
    assert_eq!(
        s.session_by_id("s_h")
            .await
            .expect("read")
            .expect("row")
            .next_retry_at,
        Some(2_000)
    );

    // Rotated tokens whose access token cannot be sent: stored, health unchanged.
    let v = lease_for(&s, "s_h", "one").await.version;
    let r = s
        .commit_refresh("s_h", "one", tokens(3), v, 400, Health::Unchanged, None)
        .await
        .expect("commit")
        .expect("row");
    assert_eq!((r.status, r.version), (Status::RefreshFailing, v + 1));
    assert_eq!(r.last_error.as_deref(), Some("token_endpoint_timeout"));
    // Recovery: active, error cleared, one event.
    let recovered = event(EventKind::Recovered, "s_h", json!({}));
    let v = lease_for(&s, "s_h", "one").await.version;
    let r = s
        .commit_refresh(
            "s_h",
            "one",
            tokens(4),
            v,
            500,
            Health::Healthy {
                recovered: Some(&recovered),
            },
            None,
        )
        .await
        .expect("commit")
        .expect("row");
    assert_eq!(
        (r.status, r.last_error.as_deref(), r.next_retry_at),
        (Status::Active, None, None)
    );
    // Committing again while active is no recovery.
    let again = event(EventKind::Recovered, "s_h", json!({}));
    let v = lease_for(&s, "s_h", "one").await.version;
    s.commit_refresh(
        "s_h",
        "one",
        tokens(5),
        v,
        600,
        Health::Healthy {
            recovered: Some(&again),
        },
        None,
    )
    .await
    .expect("commit")
    .expect("row");

    // invalid_grant: reauthorization_required with its code, one event;
    // failures no longer touch it.
    let reauth = event(
        EventKind::ReauthorizationRequired,
        "s_h",
        json!({"error": "invalid_grant"}),
    );
    let v = lease_for(&s, "s_h", "one").await.version;
    assert!(s
        .mark_reauthorization_required("s_h", v, 700, "invalid_grant", Some(&reauth), None)
        .await
        .expect("mark"));
    let r = s.session_by_id("s_h").await.expect("read").expect("row");
    assert_eq!(
        (r.status, r.last_error.as_deref(), r.version),
        (
            Status::ReauthorizationRequired,
            Some("invalid_grant"),
            v + 1
        )
    );
    assert!(!s
        .mark_refresh_failing(
            "s_h",
            "one",
            v + 1,
            710,
            Failure {
                class: "token_endpoint_error",
                next_retry_at: 9_000,
                event: Some(&second),
            },
        )
        .await
        .expect("mark"));
    assert_eq!(
        s.session_by_id("s_h")
            .await
            .expect("read")
            .expect("row")
            .status,
        Status::ReauthorizationRequired
    );
    // A reconnect: active again, error cleared, its event.
    let reconnected = event(EventKind::Connected, "s_h", json!({"reconnected": true}));
    let r = s
        .replace_tokens("s_h", tokens(6), None, 800, Some(&reconnected), None)
        .await
        .expect("replace")
        .expect("row");
    assert_eq!(
        (r.status, r.last_error.as_deref(), r.next_retry_at),
        (Status::Active, None, None)
    );
    // A revoke, and a revoke of nothing (no event).
    let revoked = event(EventKind::Revoked, "s_h", json!({"by": "cli"}));
    assert!(s
        .delete_session("s_h", 900, Some(&revoked), None)
        .await
        .expect("delete"));
    assert!(!s
        .delete_session("s_h", 901, Some(&revoked), None)
        .await
        .expect("delete again"));

    let kinds: Vec<(String, serde_json::Value)> = events_of(&s)
        .await
        .into_iter()
        .map(|(kind, id, detail)| {
            assert_eq!(id, "s_h");
            (kind, detail)
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("session.connected".into(), json!({"reconnected": false})),
            (
                "session.refresh_failing".into(),
                json!({"error": "token_endpoint_error", "next_retry_at": 1_000})
            ),
            ("session.recovered".into(), json!({})),
            (
                "session.reauthorization_required".into(),
                json!({"error": "invalid_grant"})
            ),
            ("session.connected".into(), json!({"reconnected": true})),
            ("session.revoked".into(), json!({"by": "cli"})),
        ],
        "each transition once, in order"
    );
}

async fn lease_for_any(s: &Arc<dyn Store>, id: &str, owner: &str) -> Lease {
    let now = store::now_ms();
    s.acquire_refresh_lease(id, owner, now + 60_000, now)
        .await
        .expect("lease")
}

/// Without `[notify]` the callers pass no event: the same changes write none.
async fn no_events_without_notify(s: Arc<dyn Store>) {
    insert(&s, "s_n", b"key-n", 100).await;
    let v = lease_for(&s, "s_n", "one").await.version;
    let failure = Failure {
        class: "token_endpoint_error",
        next_retry_at: 1_000,
        event: None,
    };
    assert!(s
        .mark_refresh_failing("s_n", "one", v, 200, failure)
        .await
        .expect("mark"));
    let v = lease_for(&s, "s_n", "one").await.version;
    s.commit_refresh(
        "s_n",
        "one",
        tokens(2),
        v,
        300,
        Health::Healthy { recovered: None },
        None,
    )
    .await
    .expect("commit")
    .expect("row");
    s.mark_reauthorization_required("s_n", v + 1, 400, "invalid_client", None, None)
        .await
        .expect("mark");
    s.replace_tokens("s_n", tokens(3), None, 500, None, None)
        .await
        .expect("replace");
    s.delete_session("s_n", 600, None, None)
        .await
        .expect("delete");
    assert!(s.list_events(10).await.expect("list").is_empty());
}

/// Inserts `n` sessions, each with a connect event; returns the events' ids
/// in the order written.
async fn with_events(s: &Arc<dyn Store>, prefix: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("s_{prefix}{i}");
        let e = NewEvent::new(
            EventKind::Connected,
            &id,
            "spark",
            store::now(),
            serde_json::json!({"reconnected": false}),
        );
        s.insert_session(
            NewSession {
                id: id.clone(),
                provider: "spark".into(),
                label: None,
                key_hash: KeyHash::of(id.as_bytes()),
                tokens: tokens(1),
                now: 100,
            },
            Some(&e),
            None,
        )
        .await
        .expect("insert");
        ids.push(e.id);
    }
    ids
}

fn ids(rows: &[EventRow]) -> Vec<String> {
    rows.iter().map(|e| e.id.clone()).collect()
}

/// Claims lease events; only the holder settles them; retries wait; given
/// up and delivered events are never claimed again.
async fn outbox(s: Arc<dyn Store>) {
    let written = with_events(&s, "o", 3).await;
    let now = store::now_ms();
    let a = s.claim_events("a", now, 60_000, 2).await.expect("claim");
    assert_eq!(ids(&a), written[..2], "oldest first");
    let b = s.claim_events("b", now, 60_000, 10).await.expect("claim");
    assert_eq!(ids(&b), written[2..], "leased events are not claimed again");
    assert!(s
        .claim_events("c", now, 60_000, 10)
        .await
        .expect("claim")
        .is_empty());

    // Only the lease holder marks an event delivered.
    s.event_delivered(&written[0], "b", 1_000)
        .await
        .expect("not the holder");
    assert_eq!(s.list_events(10).await.expect("list").len(), 3);
    s.event_delivered(&written[0], "a", 1_000)
        .await
        .expect("delivered");
    let left = s.list_events(10).await.expect("list");
    assert_eq!(ids(&left), written[1..], "delivered events are not listed");

    // A failed attempt: counted, its error kept, the lease given back, due
    // again only at the time given.
    let later = store::now_ms() + 3_600_000;
    s.event_retry(&written[1], "a", later, "receiver_503")
        .await
        .expect("retry");
    let e = &s.list_events(10).await.expect("list")[0];
    assert_eq!(
        (e.attempts, e.last_error.as_deref(), e.next_attempt_at_ms),
        (1, Some("receiver_503"), later)
    );
    // Given up: listed with the time, never claimed again.
    s.event_gave_up(&written[2], "b", 3_000, "too_old")
        .await
        .expect("gave up");
    let listed = s.list_events(10).await.expect("list");
    let gone = listed
        .iter()
        .find(|e| e.id == written[2])
        .expect("given-up events are listed");
    assert_eq!(
        (gone.gave_up_at, gone.last_error.as_deref()),
        (Some(3_000), Some("too_old"))
    );
    let now = store::now_ms();
    assert!(s
        .claim_events("c", now, 60_000, 10)
        .await
        .expect("claim")
        .is_empty());
    let due = s.claim_events("c", later, 60_000, 10).await.expect("claim");
    assert_eq!(ids(&due), [written[1].clone()], "due again; given up never");
    assert_eq!(due[0].attempts, 1);
    // The former holder can no longer settle it.
    s.event_delivered(&written[1], "a", 2_000)
        .await
        .expect("stale holder");
    assert_eq!(s.list_events(10).await.expect("list").len(), 2);

    // An expired lease frees the event for another claimer.
    let more = with_events(&s, "p", 1).await;
    let now = store::now_ms();
    assert_eq!(
        ids(&s.claim_events("e", now, 1, 10).await.expect("claim")),
        more
    );
    tokio::time::sleep(Duration::from_millis(30)).await;
    let now = store::now_ms();
    assert_eq!(
        ids(&s.claim_events("f", now, 60_000, 10).await.expect("claim")),
        more
    );
    s.event_delivered(&more[0], "f", store::now())
        .await
        .expect("delivered");

    // Pruning forgets delivered events delivered before the time only.
    assert_eq!(s.prune_events(1_500, 0).await.expect("prune"), 1);
    assert_eq!(s.prune_events(1_500, 0).await.expect("prune"), 0);
    assert_eq!(
        s.prune_events(store::now() + 10, 0).await.expect("prune"),
        1,
        "the other delivered one"
    );
    assert_eq!(
        s.list_events(10).await.expect("list").len(),
        2,
        "pending and given up stay"
    );

    // Given-up events: listed apart; retried (due at once, claimable
    // again) or cleared by id or all; pruned once given up before the time.
    let given_up = s.list_given_up_events(10).await.expect("list");
    assert_eq!(ids(&given_up), [written[2].clone()]);
    let pending = vec![written[1].clone(), "evt_unknown".to_owned()];
    assert_eq!(
        s.retry_given_up_events(Some(&pending), 0)
            .await
            .expect("retry"),
        0,
        "a pending or unknown event is not given up"
    );
    assert_eq!(
        s.clear_given_up_events(Some(&pending))
            .await
            .expect("clear"),
        0
    );
    let now = store::now_ms();
    assert_eq!(
        s.retry_given_up_events(Some(&written[2..]), now)
            .await
            .expect("retry"),
        1
    );
    assert!(s.list_given_up_events(10).await.expect("list").is_empty());
    let due = s.claim_events("g", now, 60_000, 10).await.expect("claim");
    assert_eq!(ids(&due), [written[2].clone()], "due again at once");
    s.event_gave_up(&written[2], "g", 3_000, "too_old")
        .await
        .expect("gave up again");
    assert_eq!(s.prune_events(0, 3_000).await.expect("prune"), 0);
    assert_eq!(s.prune_events(0, 3_001).await.expect("prune"), 1);
    let more = with_events(&s, "q", 3).await;
    let now = store::now_ms();
    for (i, e) in s
        .claim_events("h", now, 60_000, 10)
        .await
        .expect("claim")
        .iter()
        .enumerate()
    {
        s.event_gave_up(&e.id, "h", 4_000 + i as i64, "too_old")
            .await
            .expect("gave up");
    }
    assert_eq!(ids(&s.list_given_up_events(10).await.expect("list")), more);
    assert_eq!(
        s.clear_given_up_events(Some(&more[..1]))
            .await
            .expect("clear"),
        1
    );
    assert_eq!(s.clear_given_up_events(None).await.expect("clear"), 2);
    assert_eq!(s.retry_given_up_events(None, now).await.expect("retry"), 0);
    assert_eq!(
        ids(&s.list_events(10).await.expect("list")),
        [written[1].clone()],
        "the pending one stays"
    );
}

/// Last uses move forward only, in a batch, and are no change.
async fn last_uses(s: Arc<dyn Store>) {
    insert(&s, "s_u1", b"key-u1", 100).await;
    insert(&s, "s_u2", b"key-u2", 100).await;
    let cursor = s.change_cursor().await.expect("cursor");
    let moved = s
        .note_uses(&[
            ("s_u1".into(), 500),
            ("s_u2".into(), 600),
            ("s_gone".into(), 700),
        ])
        .await
        .expect("note");
    assert_eq!(moved, 2);
    let u1 = s.session_by_id("s_u1").await.expect("read").expect("row");
    assert_eq!(
        (u1.last_used_at, u1.version, u1.updated_at),
        (Some(500), 1, 100)
    );
    assert_eq!(
        s.session_by_id("s_u2")
            .await
            .expect("read")
            .expect("row")
            .last_used_at,
        Some(600)
    );
    // Never backwards.
    assert_eq!(
        s.note_uses(&[("s_u1".into(), 400), ("s_u2".into(), 650)])
            .await
            .expect("note"),
        1
    );
    assert_eq!(
        s.session_by_id("s_u1")
            .await
            .expect("read")
            .expect("row")
            .last_used_at,
        Some(500)
    );
    assert_eq!(
        s.change_cursor().await.expect("cursor"),
        cursor,
        "not a change: nothing in the change log"
    );
    // Batches larger than one transaction.
    let many: Vec<(String, i64)> = (0..2_500)
        .map(|i| {
            (
                if i % 2 == 0 { "s_u1" } else { "s_u2" }.to_owned(),
                1_000 + i,
            )
        })
        .collect();
    s.note_uses(&many).await.expect("note many");
    assert_eq!(
        s.session_by_id("s_u2")
            .await
            .expect("read")
            .expect("row")
            .last_used_at,
        Some(3_499)
    );
    assert_eq!(s.note_uses(&[]).await.expect("nothing"), 0);
}

/// Idle candidates: by the latest of use, refresh and creation, refreshable
/// only, in pages.
async fn idle_candidates(s: Arc<dyn Store>) {
    let add = |id: &'static str, now: i64, refresh: bool| {
        let s = Arc::clone(&s);
        async move {
            let mut t = tokens(1);
            if !refresh {
                t.refresh_token = None;
            }
            s.insert_session(
                NewSession {
                    id: id.into(),
                    provider: "spark".into(),
                    label: None,
                    key_hash: KeyHash::of(id.as_bytes()),
                    tokens: t,
                    now,
                },
                None,
                None,
            )
            .await
            .expect("insert")
        }
    };
    add("s_i_made", 100, true).await; // idle since 100
    add("s_i_used", 50, true).await; // used at 5_000
    add("s_i_refreshed", 60, true).await; // refreshed at 300
    add("s_i_norefresh", 10, false).await;
    add("s_i_reauth", 10, true).await;
    add("s_i_waiting", 10, true).await; // failing, retry at 2_000
    add("s_i_fresh", 4_000, true).await;
    s.note_uses(&[("s_i_used".into(), 5_000), ("s_i_made".into(), 20)])
        .await
        .expect("note");
    let v = lease_for(&s, "s_i_refreshed", "o").await.version;
    s.commit_refresh(
        "s_i_refreshed",
        "o",
        tokens(2),
        v,
        300,
        Health::Healthy { recovered: None },
        None,
    )
    .await
    .expect("commit")
    .expect("row");
    s.mark_reauthorization_required("s_i_reauth", 1, 10, "invalid_grant", None, None)
        .await
        .expect("mark");
    s.mark_refresh_failing(
        "s_i_waiting",
        "o",
        1,
        10,
        Failure {
            class: "token_endpoint_error",
            next_retry_at: 2_000,
            event: None,
        },
    )
    .await
    .expect("mark");

    let start = (i64::MIN, String::new());
    let at = |now: i64, before: i64| {
        let s = Arc::clone(&s);
        let start = start.clone();
        async move {
            s.idle_sessions("spark", before, &start, now, 100)
                .await
                .expect("idle")
                .into_iter()
                .map(|c| (c.id, c.idle_since))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        at(1_000, 3_000).await,
        [
            ("s_i_made".to_owned(), 100),
            ("s_i_refreshed".to_owned(), 300)
        ],
        "oldest first; used, fresh, unrefreshable, reauthorization and waiting ones left out"
    );
    assert_eq!(
        at(2_000, 3_000).await,
        [
            ("s_i_waiting".to_owned(), 10),
            ("s_i_made".to_owned(), 100),
            ("s_i_refreshed".to_owned(), 300)
        ],
        "a failing session is a candidate again once its retry is due"
    );
    assert_eq!(
        at(2_000, 4_001).await.len(),
        4,
        "made at 4,000: idle before 4,001"
    );
    // Page by page, from a cursor.
    let mut cursor = start.clone();
    let mut walked = Vec::new();
    loop {
        let page: Vec<IdleSession> = s
            .idle_sessions("spark", 10_000, &cursor, 2_000, 2)
            .await
            .expect("page");
        let Some(last) = page.last() else { break };
        cursor = (last.idle_since, last.id.clone());
        walked.extend(page.into_iter().map(|c| c.id));
    }
    assert_eq!(
        walked,
        [
            "s_i_waiting",
            "s_i_made",
            "s_i_refreshed",
            "s_i_fresh",
            "s_i_used"
        ]
    );
    assert!(s
        .idle_sessions("zillow", 10_000, &start, 2_000, 10)
        .await
        .expect("other provider")
        .is_empty());
    let version = s
        .idle_sessions("spark", 10_000, &start, 2_000, 10)
        .await
        .expect("idle")
        .into_iter()
        .find(|c| c.id == "s_i_refreshed")
        .expect("refreshed")
        .version;
    assert_eq!(version, 2, "the version a refresh compares with");
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

on_both_stores!(
    sessions_crud,
    leases_and_commits,
    change_log,
    oauth_states,
    health_and_events,
    no_events_without_notify,
    outbox,
    last_uses,
    idle_candidates,
);

/// Two instances (two pools on one database), four claimers each, claim
/// 400 due events in small batches at once: no event is ever held by two.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_concurrent_claimers_never_share_an_event() {
    let Some(url) = support::postgres_db("outbox_concurrent").await else {
        return;
    };
    let one = store::open(&url).await.expect("open");
    let two = store::open(&url).await.expect("open again");
    let written = with_events(&one, "c", 400).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let claimers: Vec<_> = (0..8)
        .map(|i| {
            let s = Arc::clone(if i % 2 == 0 { &one } else { &two });
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                let owner = format!("owner-{i}");
                barrier.wait().await;
                let mut mine = Vec::new();
                loop {
                    let batch = s
                        .claim_events(&owner, store::now_ms(), 600_000, 7)
                        .await
                        .expect("claim");
                    if batch.is_empty() {
                        break mine;
                    }
                    mine.extend(batch.into_iter().map(|e| e.id));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut per = Vec::new();
    for c in claimers {
        let mine = c.await.expect("claimer");
        per.push(mine.len());
        all.extend(mine);
    }
    assert_eq!(all.len(), 400, "claimed {per:?}");
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 400, "an event was claimed twice: {per:?}");
    let mut expected = written.clone();
    expected.sort();
    assert_eq!(all, expected);
    assert!(
        per.iter().filter(|&&n| n > 0).count() > 1,
        "the claimers shared the work: {per:?}"
    );
}

/// Idle refresh's query is an indexed range scan on both stores.
#[tokio::test]
async fn idle_sessions_use_the_index() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    drop(store::open(&url).await.expect("migrate"));
    let pool = sqlx::SqlitePool::connect(&url).await.expect("connect");
    let sql = format!(
        "EXPLAIN QUERY PLAN {}",
        credproxy::store::sqlite::idle_sessions_sql()
    );
    let q = sqlx::query_as::<_, (i64, i64, i64, String)>(&sql)
        .bind("spark")
        .bind(i64::MIN)
        .bind(i64::MIN)
        .bind("")
        .bind(1_000)
        .bind(1_000)
        .bind(100);
    let plan: Vec<String> = q
        .fetch_all(&pool)
        .await
        .expect("plan")
        .into_iter()
        .map(|r| r.3)
        .collect();
    // Both ends of the range from the index: the cursor's too, or each
    // page would scan from the first candidate.
    assert!(
        plan.iter().any(|l| l.contains("USING INDEX sessions_idle")
            && l.contains("<expr>>?")
            && l.contains("<expr><?")),
        "{plan:?}"
    );
    assert!(
        !plan.iter().any(|l| l.contains("TEMP B-TREE")),
        "no sort: {plan:?}"
    );

    let Some(url) = support::postgres_db("idle_index").await else {
        return;
    };
    drop(store::open(&url).await.expect("migrate"));
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let mut tx = pool.begin().await.expect("tx");
    // A table this small would be scanned whole; the question is whether
    // the index can answer the query.
    sqlx::query("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await
        .expect("set");
    let sql = credproxy::store::postgres::idle_sessions_sql();
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {sql}"))
        .bind("spark")
        .bind(i64::MIN)
        .bind("")
        .bind(1_000i64)
        .bind(1_000i64)
        .bind(100i64)
        .fetch_all(&mut *tx)
        .await
        .expect("plan");
    let text = plan.join("\n");
    assert!(text.contains("sessions_idle"), "{text}");
    assert!(
        text.contains("Index Cond") && text.contains("ROW("),
        "the cursor bounds the index range: {text}"
    );
    assert!(!text.contains("Sort"), "no sort: {text}");
}

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

// Shared request budgets (issue 12): PostgreSQL leases shares of a
// provider's budget to each instance; SQLite keeps budgets in memory.

mod budgets {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use credproxy::store::{self, BudgetAsk, BudgetLease, Store};

    fn ask(
        provider: &str,
        requests: u32,
        window_ms: i64,
        lease_ms: i64,
        want: u32,
    ) -> BudgetAsk<'_> {
        BudgetAsk {
            provider,
            instance: "test-instance",
            requests,
            window_ms,
            lease_ms,
            want,
        }
    }

    /// Leases are timed in whole milliseconds of the database's clock,
    /// compared below with this process's: leeway for rounding.
    const ROUNDING_MS: i64 = 5;

    async fn lease(s: &Arc<dyn Store>, a: BudgetAsk<'_>) -> BudgetLease {
        s.lease_budget(&a).await.expect("lease_budget")
    }

    async fn pg(test: &str) -> Option<(String, Arc<dyn Store>)> {
        let url = crate::support::postgres_db(test).await?;
        let s = store::open(&url).await.expect("open");
        assert!(s.shares_budgets());
        Some((url, s))
    }

    #[tokio::test]
    async fn sqlite_keeps_budgets_in_memory() {
        let dir = tempfile::tempdir().expect("dir");
        let url = format!("sqlite://{}", dir.path().join("s.db").display());
        let s = store::open(&url).await.expect("open");
        assert!(!s.shares_budgets());
        assert!(s
            .lease_budget(&ask("spark", 10, 1_000, 100, 1))
            .await
            .is_err());
        s.settle_budget(1, 0).await.expect("settling is a no-op");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_grants_never_exceed_the_budget_across_concurrent_askers() {
        let Some((url, one)) = pg("budget_concurrent").await else {
            return;
        };
        concurrent_askers(&url, one).await;
    }

    /// The same with the database's default isolation raised: a lease's
    /// reads must still see the lease committed while it waited for the lock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_grants_never_exceed_the_budget_under_repeatable_read() {
        let Some(url) = crate::support::postgres_db("budget_repeatable_read").await else {
            return;
        };
        let admin = sqlx::PgPool::connect(&url).await.expect("connect");
        let name: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&admin)
            .await
            .expect("name");
        sqlx::query(&format!(
            "ALTER DATABASE \"{name}\" SET default_transaction_isolation TO 'repeatable read'"
        ))
        .execute(&admin)
        .await
        .expect("alter database");
        admin.close().await;
        let one = store::open(&url).await.expect("open");
        concurrent_askers(&url, one).await;
    }

    /// 8 askers at once, wanting 3 each of a budget of 10, half of them on
    /// a second store (another instance's pool); three rounds.
    async fn concurrent_askers(url: &str, one: Arc<dyn Store>) {
        let two = store::open(url).await.expect("open again");
        for round in 0..3 {
            let provider = format!("spark{round}");
            let barrier = Arc::new(tokio::sync::Barrier::new(8));
            let tasks: Vec<_> = (0..8)
                .map(|i| {
                    let s = Arc::clone(if i % 2 == 0 { &one } else { &two });
                    let barrier = Arc::clone(&barrier);
                    let provider = provider.clone();
                    tokio::spawn(async move {
                        barrier.wait().await;
                        lease(&s, ask(&provider, 10, 60_000, 60_000, 3)).await
                    })
                })
                .collect();
            let mut leases = Vec::new();
            for t in tasks {
                leases.push(t.await.expect("task"));
            }
            let total: u32 = leases.iter().map(|l| l.granted).sum();
            assert_eq!(total, 10, "{leases:?}");
            assert!(leases.iter().all(|l| l.granted <= 3), "{leases:?}");
            let mut ids: Vec<i64> = leases
                .iter()
                .filter(|l| l.granted > 0)
                .map(|l| l.id)
                .collect();
            assert!(ids.iter().all(|&id| id > 0), "{leases:?}");
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), 4, "3 + 3 + 3 + 1: {leases:?}");
            for l in leases.iter().filter(|l| l.granted == 0) {
                assert_eq!((l.id, l.remaining), (0, 0), "{l:?}");
                assert!(
                    (1..=120_000).contains(&l.retry_in_ms),
                    "frees when the first lease has been over for a window: {l:?}"
                );
            }
            // The grants, in the order they were made, leave 7, 4, 1, 0.
            let mut left: Vec<u32> = leases
                .iter()
                .filter(|l| l.granted > 0)
                .map(|l| l.remaining)
                .collect();
            left.sort_unstable();
            assert_eq!(left, [0, 1, 4, 7], "{leases:?}");
            let after = lease(&one, ask(&provider, 10, 60_000, 60_000, 1)).await;
            assert_eq!((after.granted, after.remaining), (0, 0), "{after:?}");
        }
        // Each provider has its own budget.
        let other = lease(&two, ask("zillow", 10, 60_000, 60_000, 10)).await;
        assert_eq!((other.granted, other.remaining), (10, 0), "{other:?}");
    }

    #[tokio::test]
    async fn postgres_a_settled_lease_gives_back_its_unused_share_at_once() {
        let Some((_url, s)) = pg("budget_settle").await else {
            return;
        };
        let a = lease(&s, ask("spark", 10, 60_000, 60_000, 10)).await;
        assert_eq!((a.granted, a.remaining), (10, 0), "{a:?}");
        assert_eq!(
            lease(&s, ask("spark", 10, 60_000, 60_000, 1)).await.granted,
            0
        );
        // Given back early, 4 used: the other 6 are free again at once.
        s.settle_budget(a.id, 4).await.expect("settle");
        let b = lease(&s, ask("spark", 10, 60_000, 60_000, 10)).await;
        assert_eq!((b.granted, b.remaining), (6, 0), "{b:?}");
        // Settling only ever lowers a share: a later, larger `used` changes nothing.
        s.settle_budget(a.id, 9).await.expect("settle again");
        s.settle_budget(b.id, 6).await.expect("settle fully used");
        let none = lease(&s, ask("spark", 10, 60_000, 60_000, 1)).await;
        assert_eq!((none.granted, none.remaining), (0, 0), "{none:?}");
        s.settle_budget(b.id, 0).await.expect("settle unused");
        let c = lease(&s, ask("spark", 10, 60_000, 60_000, 10)).await;
        assert_eq!((c.granted, c.remaining), (6, 0), "{c:?}");
        // No lease (0, as a refusal's id) or a forgotten one: nothing happens.
        s.settle_budget(0, 0).await.expect("settle id 0");
        s.settle_budget(i64::MAX, 0)
            .await
            .expect("settle an unknown id");
        // Wanting nothing takes nothing, and says the budget is free now.
        let d = lease(&s, ask("zillow", 10, 60_000, 60_000, 0)).await;
        assert_eq!(
            d,
            BudgetLease {
                id: 0,
                granted: 0,
                retry_in_ms: 0,
                remaining: 10
            }
        );
    }

    #[tokio::test]
    async fn postgres_a_lease_never_settled_stops_counting_a_window_after_it_ends() {
        let Some((_url, s)) = pg("budget_dead_instance").await else {
            return;
        };
        // Window 300 ms, lease 100 ms: an instance takes the whole budget
        // and dies (never settles). The budget is free again 400 ms after
        // the lease was granted, not before, and not much later.
        let (window, lease_ms) = (300, 100);
        let start = Instant::now();
        let dead = lease(&s, ask("spark", 3, window, lease_ms, 3)).await;
        assert_eq!(dead.granted, 3, "{dead:?}");
        let deadline = start + Duration::from_secs(10);
        let mut refusals = 0;
        let granted = loop {
            let l = lease(&s, ask("spark", 3, window, lease_ms, 3)).await;
            if l.granted > 0 {
                break l;
            }
            refusals += 1;
            // The database timed both leases; both lie between `start` and now.
            let elapsed = i64::try_from(start.elapsed().as_millis()).expect("ms");
            assert!(
                l.retry_in_ms >= 1 && l.retry_in_ms <= window + lease_ms,
                "{l:?}"
            );
            assert!(
                l.retry_in_ms >= window + lease_ms - elapsed - ROUNDING_MS,
                "{l:?} after {elapsed} ms"
            );
            assert!(
                Instant::now() < deadline,
                "the dead lease never stopped counting"
            );
            tokio::time::sleep(Duration::from_millis(
                u64::try_from(l.retry_in_ms.clamp(1, 50)).expect("ms"),
            ))
            .await;
        };
        assert!(refusals > 0, "the dead lease counted for a while");
        assert_eq!((granted.granted, granted.remaining), (3, 0), "{granted:?}");
        assert!(
            start.elapsed() >= Duration::from_millis(400 - ROUNDING_MS as u64),
            "freed after {:?}, before the lease had been over for a window",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn postgres_retry_in_is_when_a_request_fits_again() {
        let Some((_url, s)) = pg("budget_retry_in").await else {
            return;
        };
        let start = Instant::now();
        let elapsed = || i64::try_from(start.elapsed().as_millis()).expect("ms");
        // A lease settled unused frees nothing: the wait is for the one
        // that holds the budget (5 s + the window), not the older one.
        let short = lease(&s, ask("spark", 10, 300, 100, 2)).await;
        s.settle_budget(short.id, 0).await.expect("settle");
        let long = lease(&s, ask("spark", 10, 300, 5_000, 10)).await;
        assert_eq!((long.granted, long.remaining), (10, 0), "{long:?}");
        let r = lease(&s, ask("spark", 10, 300, 100, 1)).await;
        assert_eq!((r.id, r.granted), (0, 0), "{r:?}");
        assert!(
            r.retry_in_ms <= 5_300 && r.retry_in_ms >= 5_300 - elapsed() - ROUNDING_MS,
            "{r:?}"
        );

        // Two leases of 5, ending 100 ms and 5 s from now. With the budget
        // at 10, the first one's end frees enough; with the budget lowered
        // to 4 (a new configuration), only the second one's does.
        let start = Instant::now();
        let elapsed = || i64::try_from(start.elapsed().as_millis()).expect("ms");
        let a = lease(&s, ask("zillow", 10, 300, 100, 5)).await;
        let b = lease(&s, ask("zillow", 10, 300, 5_000, 5)).await;
        assert_eq!((a.granted, b.granted, b.remaining), (5, 5, 0));
        let soon = lease(&s, ask("zillow", 10, 300, 100, 1)).await;
        assert_eq!(soon.granted, 0, "{soon:?}");
        assert!(
            soon.retry_in_ms <= 400 && soon.retry_in_ms >= 400 - elapsed() - ROUNDING_MS,
            "{soon:?}"
        );
        let lowered = lease(&s, ask("zillow", 4, 300, 100, 1)).await;
        assert_eq!((lowered.granted, lowered.remaining), (0, 0), "{lowered:?}");
        assert!(
            lowered.retry_in_ms <= 5_300 && lowered.retry_in_ms >= 5_300 - elapsed() - ROUNDING_MS,
            "{lowered:?}"
        );

        // A budget of nothing never frees: ask again in a window.
        let zero = lease(&s, ask("other", 0, 300, 100, 1)).await;
        assert_eq!(
            zero,
            BudgetLease {
                id: 0,
                granted: 0,
                retry_in_ms: 300,
                remaining: 0
            }
        );
    }

    #[tokio::test]
    async fn postgres_two_stores_on_one_database_share_one_budget() {
        let Some((url, one)) = pg("budget_two_stores").await else {
            return;
        };
        // The second open runs the migrations again: already applied.
        let two = store::open(&url).await.expect("open again");
        assert!(two.shares_budgets());
        let a = lease(&one, ask("spark", 10, 60_000, 60_000, 7)).await;
        assert_eq!((a.granted, a.remaining), (7, 3), "{a:?}");
        let b = lease(&two, ask("spark", 10, 60_000, 60_000, 5)).await;
        assert_eq!((b.granted, b.remaining), (3, 0), "{b:?}");
        let c = lease(&one, ask("spark", 10, 60_000, 60_000, 1)).await;
        assert_eq!((c.granted, c.remaining), (0, 0), "{c:?}");
        // A lease is settled wherever: the first store's unused 5 are free
        // for the second one.
        two.settle_budget(a.id, 2).await.expect("settle");
        let d = lease(&two, ask("spark", 10, 60_000, 60_000, 9)).await;
        assert_eq!((d.granted, d.remaining), (5, 0), "{d:?}");
    }
}
