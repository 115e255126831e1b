//! Several credproxy instances sharing one PostgreSQL database: one refresh
//! per session across all of them, revocations seen everywhere within 2 s,
//! and a database outage survived without a restart.

mod support;

use std::time::{Duration, Instant};

use credproxy_standins::TokenMode;
use support::{client, error_code, url, BinServer, Extra, World, ADMIN_TOKEN};

const HDR: &str = "X-Credproxy-Session";

async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("timed out waiting for an event")
}

/// A world whose config points at a fresh PostgreSQL database.
async fn pg_world(test: &str) -> Option<(World, std::path::PathBuf, String)> {
    let db = support::postgres_db(test).await?;
    let w = World::new().await;
    let cfg = w.write_config(&Extra {
        store_url: Some(db.clone()),
        ..Extra::default()
    });
    Some((w, cfg, db))
}

fn add(cfg: &std::path::Path, provider: &str, t: &credproxy_standins::Tokens) -> (String, String) {
    let v = support::cli_add(cfg, provider, t);
    (
        v["id"].as_str().expect("id").to_owned(),
        v["session_key"].as_str().expect("key").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_requests_across_two_instances_cause_one_refresh() {
    let Some((w, cfg, _)) = pg_world("hundred_two_instances").await else {
        return;
    };
    let (_, key) = add(&cfg, "spark", &w.spark.issue_tokens());
    let a = BinServer::spawn(&cfg, "warn");
    let b = BinServer::spawn(&cfg, "warn");
    w.spark.expire_access_tokens();
    // Hold the token endpoint until all hundred have met their 401, so both
    // instances are refreshing the same session at once.
    w.spark.set_token_mode(TokenMode::Hang);
    let c = client();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..100 {
        let addr = if i % 2 == 0 {
            a.proxy_addr
        } else {
            b.proxy_addr
        };
        let req = c
            .get(url(addr, &format!("/spark/v1/n{i}")))
            .header(HDR, &key);
        set.spawn(async move { req.send().await.map(|r| r.status().as_u16()) });
    }
    within(30, w.spark.wait_for_requests(100)).await;
    within(30, w.spark.wait_for_token_calls(1)).await;
    w.spark.set_token_mode(TokenMode::Normal);
    let mut statuses = Vec::new();
    while let Some(r) = set.join_next().await {
        statuses.push(r.expect("join").expect("send"));
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(statuses.len(), 100);
    assert_eq!(
        w.spark.token_calls(),
        1,
        "one call to the token endpoint across both instances"
    );
    assert_eq!(w.spark.grant_count(), 1);
    assert_eq!(w.spark.reused_refresh_tokens(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_refresh_on_one_instance_are_seen_by_the_other() {
    let Some((w, cfg, _)) = pg_world("revocation_two_instances").await else {
        return;
    };
    let original = w.zillow.issue_tokens();
    let (id, key) = add(&cfg, "zillow", &original);
    let a = BinServer::spawn(&cfg, "warn");
    let b = BinServer::spawn(&cfg, "warn");
    let c = client();
    let get = |addr| {
        c.get(url(addr, &format!("/zillow/v1?accessToken={key}")))
            .send()
    };
    assert_eq!(get(a.proxy_addr).await.expect("send").status(), 200);
    assert_eq!(
        get(b.proxy_addr).await.expect("send").status(),
        200,
        "cached on both"
    );

    // A refresh on A: within 2 s B sends the new token, without a refresh of its own.
    let r = c
        .post(url(a.admin_addr, &format!("/admin/sessions/{id}/refresh")))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let refreshed = Instant::now();
    loop {
        assert_eq!(get(b.proxy_addr).await.expect("send").status(), 200);
        let q = w.zillow.last_request().expect("rec").query.expect("query");
        if !q.contains(&original.access_token) {
            break;
        }
        assert!(
            refreshed.elapsed() < Duration::from_secs(2),
            "B still sends the old token"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!(
        "refresh on A picked up by B after {:?}",
        refreshed.elapsed()
    );
    assert_eq!(w.zillow.token_calls(), 1, "B did not refresh on its own");

    // Revoke on A (admin API); B stops honouring the key within 2 s.
    let r = c
        .delete(url(a.admin_addr, &format!("/admin/sessions/{id}")))
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 204);
    let revoked = Instant::now();
    loop {
        let r = get(b.proxy_addr).await.expect("send");
        if r.status() == 401 {
            assert_eq!(error_code(&r).as_deref(), Some("unknown_session"));
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(2),
            "B still honours a key revoked on A"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!("revocation on A seen by B after {:?}", revoked.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_survived_without_a_restart() {
    let Some((w, cfg, db)) = pg_world("database_outage").await else {
        return;
    };
    let (_, cached_key) = add(&cfg, "spark", &w.spark.issue_tokens());
    let (_, expired_key) = add(&cfg, "zillow", &w.zillow.issue_tokens());
    let srv = BinServer::spawn(&cfg, "info");
    let c = client();
    let spark = || {
        c.get(url(srv.proxy_addr, "/spark/v1/x"))
            .header(HDR, &cached_key)
            .send()
    };
    let zillow = || {
        c.get(url(
            srv.proxy_addr,
            &format!("/zillow/v1?accessToken={expired_key}"),
        ))
        .send()
    };
    assert_eq!(spark().await.expect("send").status(), 200);
    assert_eq!(zillow().await.expect("send").status(), 200);
    let ready = || c.get(url(srv.admin_addr, "/readyz")).send();
    assert_eq!(ready().await.expect("send").status(), 200);

    // The database goes away: no new connections, existing ones killed.
    let name = url::Url::parse(&db)
        .expect("url")
        .path()
        .trim_start_matches('/')
        .to_owned();
    let base = std::env::var("CREDPROXY_TEST_DATABASE_URL").expect("set");
    let admin = sqlx::PgPool::connect(&base)
        .await
        .expect("admin connection");
    let outage = |allow: bool| {
        let admin = admin.clone();
        let name = name.clone();
        async move {
            sqlx::query(&format!(
                "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS {allow}"
            ))
            .execute(&admin)
            .await
            .expect("alter database");
            if !allow {
                sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
                    .bind(&name)
                    .execute(&admin)
                    .await
                    .expect("terminate backends");
            }
        }
    };
    outage(false).await;
    assert_eq!(
        ready().await.expect("send").status(),
        503,
        "/readyz says the store is gone"
    );
    // A cached session whose token is valid keeps working.
    assert_eq!(spark().await.expect("send").status(), 200);
    // A session that needs a refresh: none is attempted (its rotated token
    // could not be stored); the caller is told to retry.
    w.zillow.expire_access_tokens();
    let calls = w.zillow.token_calls();
    let r = zillow().await.expect("send");
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(&r).as_deref(), Some("token_refresh_failed"));
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        w.zillow.token_calls(),
        calls,
        "no refresh without the store"
    );

    // The database returns: the pool reconnects by itself.
    outage(true).await;
    let back = Instant::now();
    loop {
        if ready().await.expect("send").status() == 200 {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(15), "not ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The failed attempt backed off; after its Retry-After the refresh goes through.
    let mut r = zillow().await.expect("send");
    for _ in 0..3 {
        if r.status() != 503 {
            break;
        }
        let wait: u64 = r.headers()["retry-after"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("seconds");
        assert!(wait <= 10, "{wait}");
        tokio::time::sleep(Duration::from_secs(wait)).await;
        r = zillow().await.expect("send");
    }
    assert_eq!(r.status(), 200, "refreshed once the store is back");
    assert_eq!(w.zillow.grant_count(), 1);
    assert_eq!(w.zillow.reused_refresh_tokens(), 0);
    admin.close().await;
}

/// Stops a `scripts/cluster.sh` topology when the test ends, however it ends.
struct ClusterGuard(std::path::PathBuf);

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh"))
            .args(["down", "--run-dir"])
            .arg(&self.0)
            .status();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// docker-compose.yml's topology from local processes (scripts/cluster.sh):
/// two instances and nginx in front, sharing one PostgreSQL database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_topology_from_local_processes() {
    let Some(db) = support::postgres_db("compose_topology").await else {
        return;
    };
    let w = World::new().await;
    let text = w.config_text(&Extra::default());
    let providers = &text[text.find("[providers.spark]").expect("providers")..];
    let fragment = w.path("providers.toml");
    std::fs::write(&fragment, providers).expect("write");
    let run_dir = w.path("cluster");
    let guard = ClusterGuard(run_dir.clone());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
    let ports: Vec<String> = (0..6).map(|_| free_port().to_string()).collect();
    let up = tokio::task::spawn_blocking({
        let (fragment, run_dir) = (fragment.clone(), run_dir.clone());
        move || {
            std::process::Command::new("bash")
                .arg(script)
                .args(["up", "--providers"])
                .arg(&fragment)
                .arg("--run-dir")
                .arg(&run_dir)
                .env("STORE_URL", &db)
                .env("CREDPROXY_BIN", support::BIN)
                .env("CLUSTER_LB_PROXY_PORT", &ports[0])
                .env("CLUSTER_LB_ADMIN_PORT", &ports[1])
                .env("CLUSTER_PROXY_PORT_1", &ports[2])
                .env("CLUSTER_PROXY_PORT_2", &ports[3])
                .env("CLUSTER_ADMIN_PORT_1", &ports[4])
                .env("CLUSTER_ADMIN_PORT_2", &ports[5])
                .output()
                .expect("run cluster.sh")
        }
    })
    .await
    .expect("join");
    assert!(
        up.status.success(),
        "cluster.sh up failed:\n{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let vars: std::collections::HashMap<String, String> = String::from_utf8_lossy(&up.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches(['\'', '"']).to_owned()))
        .collect();
    let proxy = vars["CLUSTER_PROXY_URL"].clone();
    let admin_url = vars["CLUSTER_ADMIN_URL"].clone();
    let admin_token =
        std::fs::read_to_string(&vars["CLUSTER_ADMIN_TOKEN_FILE"]).expect("admin token");
    let c = client();
    let t = w.spark.issue_tokens();
    let r = c
        .post(format!("{admin_url}/admin/sessions"))
        .header("Authorization", format!("Bearer {}", admin_token.trim()))
        .json(&serde_json::json!({"provider": "spark", "access_token": t.access_token, "refresh_token": t.refresh_token}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.expect("json");
    let (id, key) = (
        v["id"].as_str().expect("id").to_owned(),
        v["session_key"].as_str().expect("key").to_owned(),
    );
    w.spark.expire_access_tokens();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let req = c.get(format!("{proxy}/spark/v1/lb{i}")).header(HDR, &key);
        set.spawn(async move { req.send().await.map(|r| r.status().as_u16()) });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.expect("join").expect("send"), 200);
    }
    assert_eq!(
        w.spark.grant_count(),
        1,
        "one refresh behind the load balancer"
    );

    // Revoke through the load balancer's admin port: every instance refuses within 2 s.
    let r = c
        .delete(format!("{admin_url}/admin/sessions/{id}"))
        .header("Authorization", format!("Bearer {}", admin_token.trim()))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 204);
    let revoked = Instant::now();
    let mut refused = 0;
    while refused < 4 {
        let r = c
            .get(format!("{proxy}/spark/v1/after"))
            .header(HDR, &key)
            .send()
            .await
            .expect("send");
        refused = if r.status() == 401 { refused + 1 } else { 0 };
        assert!(
            revoked.elapsed() < Duration::from_secs(2),
            "a replica still honours the revoked key"
        );
    }
    drop(guard);
}

/// The OAuth state lives in the shared store: a flow started on one
/// instance completes on another, and still works only once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_started_on_one_instance_completes_on_the_other() {
    let Some((w, cfg, _)) = pg_world("connect_across_instances").await else {
        return;
    };
    let a = BinServer::spawn(&cfg, "warn");
    let b = BinServer::spawn(&cfg, "warn");
    let c = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = c
        .get(url(a.admin_addr, "/connect/zillow"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 302);
    // The browser's binding cookie goes wherever public_url's host is served.
    let cookie = r.headers()["set-cookie"].to_str().expect("ascii");
    let cookie = cookie.split(';').next().expect("name=value").to_owned();
    let location = url::Url::parse(r.headers()["location"].to_str().expect("ascii")).expect("url");
    let state = location
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .expect("state");
    let callback = format!(
        "/callback/zillow?code={}&state={state}",
        w.zillow.issue_code()
    );
    let r = c
        .get(url(b.admin_addr, &callback))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200, "B accepts A's state");
    assert!(r.text().await.expect("text").contains("session-key"));
    let r = c
        .get(url(a.admin_addr, &callback))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400, "and it worked once, across instances");
    assert_eq!(w.zillow.codes_redeemed(), 1);
}
