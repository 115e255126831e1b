//! The audit trail, run as the built binary on both stores: sessions
//! created by the CLI and the admin API, refreshed and revoked, requests
//! counted per session and hour (the hour under way written at a graceful
//! shutdown), admin calls with the caller's address; `audit --json` and
//! `GET /admin/audit` show them without a token or a key; `audit verify`
//! holds, and names the row that was changed or the link that was deleted.

mod support;

use credproxy_standins::TokenMode;
use support::{cli_add, client, run_cli, url, BinServer, Extra, World, ADMIN_TOKEN};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn audit_json(cfg: &std::path::Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["audit", "--json", "--limit", "1000"];
    args.extend_from_slice(extra);
    let out = run_cli(cfg, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("one JSON array")
}

fn find<'a>(
    rows: &'a [serde_json::Value],
    kind: &str,
    session: Option<&str>,
) -> Vec<&'a serde_json::Value> {
    rows.iter()
        .filter(|r| r["kind"] == kind && session.is_none_or(|s| r["session_id"] == s))
        .collect()
}

/// Runs SQL on the store directly, as someone with access to the database
/// would, to tamper with the trail.
async fn tamper(store_url: &str, sql: &str) {
    if store_url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(store_url).await.expect("sqlite");
        let n = sqlx::query(sql).execute(&pool).await.expect("tamper");
        assert_eq!(n.rows_affected(), 1, "{sql}");
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(store_url).await.expect("postgres");
        let n = sqlx::query(sql).execute(&pool).await.expect("tamper");
        assert_eq!(n.rows_affected(), 1, "{sql}");
        pool.close().await;
    }
}

fn verify(cfg: &std::path::Path) -> (bool, String) {
    let out = run_cli(cfg, &["audit", "verify"]);
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

async fn audit_trail(store_url: Option<String>) {
    let w = World::new().await;
    let cfg = w.write_config(&Extra {
        store_url: store_url.clone(),
        ..Extra::default()
    });
    let db_url = store_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", w.path("credproxy.db").display()));
    let mut srv = BinServer::spawn(&cfg, "info");
    let c = client();
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let mut secrets: Vec<String> = w.secrets();

    // A session made by the CLI, one by the admin API.
    let t1 = w.spark.issue_tokens();
    let one = cli_add(&cfg, "spark", &t1);
    let id1 = one["id"].as_str().expect("id").to_owned();
    let key1 = one["session_key"].as_str().expect("key").to_owned();
    let t2 = w.spark.issue_tokens();
    let r = c
        .post(url(srv.admin_addr, "/admin/sessions"))
        .header("Authorization", &bearer)
        .json(&serde_json::json!({"provider": "spark", "access_token": t2.access_token, "refresh_token": t2.refresh_token}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 201);
    let two: serde_json::Value = r.json().await.expect("json");
    let id2 = two["id"].as_str().expect("id").to_owned();
    let key2 = two["session_key"].as_str().expect("key").to_owned();
    secrets.extend([
        t1.access_token.clone(),
        t1.refresh_token.clone(),
        t2.access_token.clone(),
        t2.refresh_token.clone(),
        key1.clone(),
        key2.clone(),
    ]);

    // The second refreshed by the admin API; its new token seen upstream.
    let r = c
        .post(url(
            srv.admin_addr,
            &format!("/admin/sessions/{id2}/refresh"),
        ))
        .header("Authorization", &bearer)
        .send()
        .await
        .expect("send");
    assert!(r.status().is_success(), "{}", r.status());
    let r = c
        .get(url(srv.proxy_addr, "/spark/v1/x"))
        .header("X-Credproxy-Session", &key2)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let seen = w.spark.last_request().expect("recorded");
    let refreshed = seen
        .header("authorization")
        .and_then(|h| h.strip_prefix("OAuth "))
        .expect("the refreshed token")
        .to_owned();
    assert_ne!(refreshed, t2.access_token);
    secrets.push(refreshed);

    // Three requests of the first session (and a fourth below).
    for _ in 0..3 {
        let r = c
            .get(url(srv.proxy_addr, "/spark/v1/x"))
            .header("X-Credproxy-Session", &key1)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
    }

    // The token endpoint refuses the refresh token: a refresh by the proxy
    // marks the session; new tokens under its key reconnect it.
    w.spark.expire_access_tokens();
    w.spark.set_token_mode(TokenMode::InvalidGrant);
    let r = c
        .get(url(srv.proxy_addr, "/spark/v1/x"))
        .header("X-Credproxy-Session", &key1)
        .send()
        .await
        .expect("send");
    assert_eq!(
        support::error_code(&r).as_deref(),
        Some("reauthorization_required")
    );
    w.spark.set_token_mode(TokenMode::Normal);
    let t3 = w.spark.issue_tokens();
    let out = run_cli(
        &cfg,
        &[
            "session",
            "add",
            "--provider",
            "spark",
            "--access-token",
            &t3.access_token,
            "--key",
            &key1,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // The admin API shows the trail, filtered, with the caller's address.
    let r = c
        .get(url(srv.admin_addr, &format!("/admin/audit?session={id2}")))
        .header("Authorization", &bearer)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).expect("JSON array");
    assert!(!rows.is_empty());
    assert!(
        rows.iter().all(|r| r["session_id"] == id2.as_str()),
        "{text}"
    );
    let created = find(&rows, "session.created", Some(&id2));
    assert_eq!(created.len(), 1, "{text}");
    assert_eq!(created[0]["actor"], "admin");
    let refreshes = find(&rows, "session.refreshed", Some(&id2));
    assert_eq!(refreshes.len(), 1, "{text}");
    assert_eq!(refreshes[0]["actor"], "admin");
    assert_eq!(refreshes[0]["detail"]["reason"], "forced");
    let r = c
        .get(url(srv.admin_addr, "/admin/audit?since=1h&limit=1000"))
        .header("Authorization", &bearer)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let all: Vec<serde_json::Value> = r.json().await.expect("JSON array");
    let calls = find(&all, "admin.call", None);
    assert!(
        calls.iter().any(|c| c["detail"]["method"] == "POST"
            && c["detail"]["path"] == "/admin/sessions"
            && c["detail"]["status"] == 201
            && c["detail"]["caller"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:"))),
        "{all:?}"
    );
    // The query is not recorded.
    assert!(
        calls
            .iter()
            .all(|c| !c["detail"]["path"].as_str().unwrap_or("").contains('?')),
        "{calls:?}"
    );
    let r = c
        .get(url(srv.admin_addr, "/admin/audit?since=yesterday"))
        .header("Authorization", &bearer)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    // Without the admin token: refused, and not audited.
    let r = c
        .get(url(srv.admin_addr, "/admin/audit"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);

    // Revoked by the CLI, then a graceful shutdown writes the hour under way.
    let out = run_cli(&cfg, &["session", "revoke", &id2]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(srv.terminate().success());

    let rows = audit_json(&cfg, &[]);
    let text = serde_json::to_string(&rows).expect("text");
    secrets.extend(w.spark.all_tokens());
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "the audit trail holds a secret");
    }
    let created = find(&rows, "session.created", Some(&id1));
    assert_eq!(created.len(), 1, "{text}");
    assert_eq!(created[0]["actor"], "cli");
    let revoked = find(&rows, "session.revoked", Some(&id2));
    assert_eq!(revoked.len(), 1, "{text}");
    assert_eq!(revoked[0]["actor"], "cli");
    let counts = find(&rows, "session.requests", Some(&id1));
    assert_eq!(counts.len(), 1, "{text}");
    assert_eq!(counts[0]["detail"]["count"], 4, "{text}");
    let reauth = find(&rows, "session.reauthorization_required", Some(&id1));
    assert_eq!(reauth.len(), 1, "{text}");
    assert_eq!(reauth[0]["actor"], "proxy");
    assert_eq!(reauth[0]["detail"]["error"], "invalid_grant");
    let reconnected = find(&rows, "session.reconnected", Some(&id1));
    assert_eq!(reconnected.len(), 1, "{text}");
    assert_eq!(reconnected[0]["actor"], "cli");
    assert_eq!(counts[0]["detail"]["partial"], true, "{text}");
    assert!(counts[0]["detail"]["hour"]
        .as_str()
        .is_some_and(|h| h.ends_with(":00:00Z")));
    let counts2 = find(&rows, "session.requests", Some(&id2));
    assert_eq!(counts2.len(), 1, "{text}");
    assert_eq!(counts2[0]["detail"]["count"], 1, "{text}");
    for r in &rows {
        assert!(r["instance"].as_str().is_some_and(|i| i.contains(':')));
        assert_eq!(r["key_id"].as_str().map(str::len), Some(8), "{r}");
    }
    let seqs: Vec<i64> = rows
        .iter()
        .map(|r| r["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=rows.len() as i64).collect::<Vec<_>>());
    // --session filters; the table has a header and a line per row.
    let only = audit_json(&cfg, &["--session", &id1, "--since", "1h"]);
    assert!(only.len() >= 2 && only.iter().all(|r| r["session_id"] == id1.as_str()));
    let out = run_cli(&cfg, &["audit", "--limit", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.starts_with("SEQ"), "{table}");

    // The chain holds.
    let (ok, said) = verify(&cfg);
    assert!(ok, "{said}");
    assert!(said.contains(&format!("ok: {} rows", rows.len())), "{said}");

    // A row changed in the database: verify names it.
    let target = created[0]["seq"].as_i64().expect("seq");
    tamper(
        &db_url,
        &format!("UPDATE audit SET detail = '{{\"provider\":\"zillow\"}}' WHERE seq = {target}"),
    )
    .await;
    let (ok, said) = verify(&cfg);
    assert!(!ok, "{said}");
    assert!(said.contains(&format!("seq {target}:")), "{said}");
    assert!(said.contains("changed"), "{said}");
    tamper(
        &db_url,
        &format!("UPDATE audit SET detail = '{{\"provider\":\"spark\"}}' WHERE seq = {target}"),
    )
    .await;
    let (ok, said) = verify(&cfg);
    assert!(ok, "put back as it was: {said}");

    // A row's key_id changed to a key the ring never held (issue 21, item
    // 8): broken, not "not verifiable", whether the mac still fits the row
    // under the key it really names, or its content was changed too; the
    // first row as well as one in the middle.
    for seq in [1, rows.len() as i64 / 2] {
        let instance = rows[usize::try_from(seq - 1).expect("seq")]["instance"]
            .as_str()
            .expect("instance")
            .to_owned();
        tamper(
            &db_url,
            &format!("UPDATE audit SET key_id = 'deadbeef' WHERE seq = {seq}"),
        )
        .await;
        let (ok, said) = verify(&cfg);
        assert!(!ok, "{said}");
        assert!(said.contains(&format!("broken: seq {seq}:")), "{said}");
        assert!(said.contains("key_id was changed"), "{said}");
        assert!(!said.contains("not verifiable"), "{said}");
        tamper(
            &db_url,
            &format!("UPDATE audit SET instance = 'elsewhere:1' WHERE seq = {seq}"),
        )
        .await;
        let (ok, said) = verify(&cfg);
        assert!(!ok, "{said}");
        assert!(said.contains(&format!("broken: seq {seq}:")), "{said}");
        assert!(said.contains("key_id was changed"), "{said}");
        assert!(!said.contains("not verifiable"), "{said}");
        let key_id = rows[usize::try_from(seq - 1).expect("seq")]["key_id"]
            .as_str()
            .expect("key_id")
            .to_owned();
        tamper(
            &db_url,
            &format!(
                "UPDATE audit SET key_id = '{key_id}', instance = '{instance}' WHERE seq = {seq}"
            ),
        )
        .await;
        let (ok, said) = verify(&cfg);
        assert!(ok, "put back as it was: {said}");
    }

    // A row deleted in the middle: the link after it is broken.
    let middle = rows.len() as i64 / 2;
    tamper(&db_url, &format!("DELETE FROM audit WHERE seq = {middle}")).await;
    let (ok, said) = verify(&cfg);
    assert!(!ok, "{said}");
    assert!(said.contains(&format!("seq {}:", middle + 1)), "{said}");
    assert!(said.contains("missing"), "{said}");
}

#[tokio::test]
async fn the_audit_trail_records_verifies_and_detects_tampering_sqlite() {
    audit_trail(None).await;
}

#[tokio::test]
async fn the_audit_trail_records_verifies_and_detects_tampering_postgres() {
    let Some(url) = support::postgres_db("audit_trail").await else {
        return;
    };
    audit_trail(Some(url)).await;
}

/// Appenders racing on one store (two pools, as two instances) still make
/// one chain without gaps, and key ids are counted.
async fn concurrent_appends(url: String) {
    use credproxy::audit::{self, Actor, AuditEntry, AuditFilter};
    use credproxy::control::audit as trail;
    use credproxy::secrets::seal::Sealer;
    let one = credproxy::store::open(&url).await.expect("open");
    let two = credproxy::store::open(&url).await.expect("open again");
    let sealer = std::sync::Arc::new(Sealer::from_key(&[9; 32]));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let s = std::sync::Arc::clone(if i % 2 == 0 { &one } else { &two });
            let sealer = std::sync::Arc::clone(&sealer);
            tokio::spawn(async move {
                for n in 0..10 {
                    let e = AuditEntry::new(
                        audit::kind::ADMIN_CALL,
                        None,
                        Actor::Admin,
                        serde_json::json!({"task": i, "n": n}),
                    );
                    trail::append(s.as_ref(), &sealer, e).await.expect("append");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let verdict = trail::verify(one.as_ref(), &sealer, |_| {})
        .await
        .expect("verify");
    assert_eq!(verdict, audit::Verdict::Ok { rows: 80 });
    let counts = one.count_audit_by_key().await.expect("count");
    assert_eq!(counts, vec![(sealer.primary_id().to_string(), 80)]);
    let newest = one
        .list_audit(&AuditFilter {
            limit: 5,
            ..AuditFilter::default()
        })
        .await
        .expect("list");
    let seqs: Vec<i64> = newest.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![76, 77, 78, 79, 80]);
    // Another ring cannot verify the rows: reported, not mistaken for tampering.
    let other = Sealer::from_key(&[10; 32]);
    match trail::verify(one.as_ref(), &other, |_| {})
        .await
        .expect("verify")
    {
        audit::Verdict::Unverifiable {
            rows, first_seq, ..
        } => {
            assert_eq!((rows, first_seq), (80, 1));
        }
        v => panic!("{v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_make_one_chain_sqlite() {
    let dir = tempfile::tempdir().expect("dir");
    concurrent_appends(format!("sqlite://{}", dir.path().join("a.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_make_one_chain_postgres() {
    let Some(url) = support::postgres_db("audit_concurrent").await else {
        return;
    };
    concurrent_appends(url).await;
}

/// Rows under keys the ring lost but the chain introduced (the first key, or
/// one a `key.rotated` row names) stay "not verifiable", never "broken"; a
/// key no `key.rotated` row introduced is broken.
#[tokio::test]
async fn lost_keys_are_unverifiable_and_unknown_ones_broken() {
    use credproxy::audit::{self, Actor, AuditEntry, Verdict};
    use credproxy::control::audit as trail;
    use credproxy::secrets::seal::Sealer;
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("a.db").display());
    let store = credproxy::store::open(&url).await.expect("open");
    let (first, second) = (Sealer::from_key(&[21; 32]), Sealer::from_key(&[22; 32]));
    let call = |n: u32| {
        AuditEntry::new(
            audit::kind::ADMIN_CALL,
            None,
            Actor::Admin,
            serde_json::json!({ "n": n }),
        )
    };
    for n in 0..3 {
        trail::append(store.as_ref(), &first, call(n))
            .await
            .expect("append");
    }
    // `key rotate` records the new key, chained under it.
    trail::record_key_event(
        store.as_ref(),
        &second,
        audit::kind::KEY_ROTATED,
        serde_json::json!({"key": second.primary_id().to_string(), "keys": 2}),
    )
    .await
    .expect("append");
    for n in 3..6 {
        trail::append(store.as_ref(), &second, call(n))
            .await
            .expect("append");
    }
    let verify = |sealer: Sealer| {
        let store = store.clone();
        async move {
            trail::verify(store.as_ref(), &sealer, |_| {})
                .await
                .expect("verify")
        }
    };
    // The first key lost: its 3 rows cannot be checked; the rest hold.
    match verify(Sealer::from_key(&[22; 32])).await {
        Verdict::Unverifiable {
            rows,
            first_seq,
            checked,
            ..
        } => assert_eq!((rows, first_seq, checked), (3, 1, 7)),
        v => panic!("{v:?}"),
    }
    // The rotated-to key lost: its 4 rows cannot be checked.
    match verify(Sealer::from_key(&[21; 32])).await {
        Verdict::Unverifiable {
            rows,
            first_seq,
            checked,
            ..
        } => assert_eq!((rows, first_seq, checked), (4, 4, 7)),
        v => panic!("{v:?}"),
    }
    // A row that names a key nobody introduced, its content changed too.
    let pool = sqlx::SqlitePool::connect(&url).await.expect("sqlite");
    sqlx::query("UPDATE audit SET key_id = 'deadbeef', detail = '{\"n\":9}' WHERE seq = 6")
        .execute(&pool)
        .await
        .expect("tamper");
    pool.close().await;
    match verify(Sealer::from_key(&[22; 32])).await {
        Verdict::Broken { seq, reason } => {
            assert_eq!(seq, 6, "{reason}");
            assert!(reason.contains("key_id was changed"), "{reason}");
        }
        v => panic!("{v:?}"),
    }
}
