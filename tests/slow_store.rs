//! A slow or absent PostgreSQL must not take the request path down with it:
//! a table held by a lock, a database that stops answering (a black hole)
//! and one that is stopped. The shared rate limiter paces from its local
//! fallback, a cold session lookup gets 503 `store_unavailable`, and
//! `/readyz` goes non-ready, each within a bound, not after the stall
//! (a silent or stopped database was already bounded for lookups and
//! `/readyz` by the pool's acquire timeout).
//!
//! The database is the one of `CREDPROXY_TEST_DATABASE_URL` (never stopped
//! here: other tests use it); "stopped" and "black hole" are a relay in
//! front of it that the test cuts.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use credproxy::config::RateLimit;
use credproxy::pacing::{Gate, GateMetrics};
use support::{client, error_code, url, BinServer, Extra, World};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const HDR: &str = "X-Credproxy-Session";

/// What the relay does with traffic.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Forward,
    /// Connections stay open (new ones are accepted) and no byte moves:
    /// a database that stopped answering, or a network that drops packets.
    BlackHole,
    /// Every connection is closed and new ones are refused: a stopped database.
    Stopped,
}

/// A TCP relay on a loopback port in front of the test database.
struct Relay {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let (mode, watching) = watch::channel(Mode::Forward);
        tokio::spawn(async move {
            let mut watching_accept = watching.clone();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = watching_accept.wait_for(|m| *m == Mode::Stopped) => return,
                };
                let Ok((inbound, _)) = accepted else { return };
                let watching = watching.clone();
                tokio::spawn(relay_one(inbound, to, watching));
            }
        });
        Relay { addr, mode }
    }

    fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// `db` with its host and port replaced by the relay's.
    fn url(&self, db: &str) -> String {
        let mut u = url::Url::parse(db).expect("database url");
        u.set_port(Some(self.addr.port())).expect("port");
        u.set_host(Some("127.0.0.1")).expect("host");
        u.to_string()
    }
}

async fn relay_one(inbound: TcpStream, to: SocketAddr, mut mode: watch::Receiver<Mode>) {
    if *mode.borrow() != Mode::Forward {
        // Accepted, never answered (black hole), or closed (stopped).
        let _ = mode.wait_for(|m| *m == Mode::Stopped).await;
        return;
    }
    let Ok(outbound) = TcpStream::connect(to).await else {
        return;
    };
    let (mut ri, mut wi) = inbound.into_split();
    let (mut ro, mut wo) = outbound.into_split();
    let pump = async {
        tokio::select! {
            _ = tokio::io::copy(&mut ri, &mut wo) => {}
            _ = tokio::io::copy(&mut ro, &mut wi) => {}
        }
    };
    let pumped = tokio::select! {
        _ = pump => true,
        _ = mode.wait_for(|m| *m != Mode::Forward) => false,
    };
    if !pumped {
        // Stop moving bytes; close when stopped.
        let _ = mode.wait_for(|m| *m == Mode::Stopped).await;
    }
}

fn db_addr(db: &str) -> SocketAddr {
    let u = url::Url::parse(db).expect("database url");
    let host = u.host_str().expect("host");
    let port = u.port().unwrap_or(5432);
    let ip = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{ip}:{port}")
        .parse()
        .expect("the test database is on an IP address")
}

/// A second connection holding `table` locked, in a transaction that stays
/// open until the returned connection is dropped.
async fn lock_table(db: &str, table: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(db).await.expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut conn)
        .await
        .expect("begin");
    sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut conn)
        .await
        .expect("lock");
    conn
}

fn shared_gate(
    store: &Arc<dyn credproxy::store::Store>,
    requests: u32,
    per: Duration,
) -> Arc<Gate> {
    Gate::new(
        "spark",
        Some(RateLimit { requests, per }),
        Duration::from_secs(20),
        Some((store, "a")),
        GateMetrics::default(),
    )
}

/// Takes `n` permits one after another; each one's wait.
async fn take(gate: &Arc<Gate>, n: usize) -> Vec<Duration> {
    let mut waits = Vec::new();
    for i in 0..n {
        let asked = Instant::now();
        let deadline = tokio::time::Instant::now() + gate.max_wait();
        let mut p = gate
            .acquire(deadline, false)
            .await
            .unwrap_or_else(|l| panic!("request {i} refused after {:?}: {l:?}", asked.elapsed()));
        p.sent();
        waits.push(asked.elapsed());
    }
    waits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_budget_table_does_not_stop_a_rate_limited_provider() {
    let Some(db) = support::postgres_db("slow_budget_lock").await else {
        return;
    };
    let store = credproxy::store::open(&db).await.expect("store");
    let gate = shared_gate(&store, 50, Duration::from_secs(60));
    take(&gate, 1).await;
    // A transaction holds the leases' table (for longer than the test).
    let lock = lock_table(&db, "budget_leases").await;
    // The first lease's share (an eighth: 6) runs out; every renewal from
    // here on waits for the lock.
    let started = Instant::now();
    let waits = take(&gate, 12).await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "12 requests took {:?} under a budget of 50 (each: {waits:?}); the limiter waited for the store",
        started.elapsed()
    );
    drop(lock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_answering_does_not_stop_a_rate_limited_provider() {
    let Some(db) = support::postgres_db("slow_budget_blackhole").await else {
        return;
    };
    let relay = Relay::start(db_addr(&db)).await;
    let store = credproxy::store::open(&relay.url(&db))
        .await
        .expect("store");
    let gate = shared_gate(&store, 50, Duration::from_secs(60));
    take(&gate, 1).await;
    relay.set(Mode::BlackHole);
    // No request waits for the silent store longer than the fallback's
    // patience (the pool's acquire timeout, 3 s, without the fix).
    let waits = take(&gate, 12).await;
    let worst = waits.iter().max().copied().unwrap_or_default();
    assert!(
        worst < Duration::from_millis(2500),
        "a request waited {worst:?} with the database silent (each: {waits:?})"
    );
    relay.set(Mode::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_database_never_blocks_the_limiters_dispatcher() {
    let Some(db) = support::postgres_db("slow_budget_stopped").await else {
        return;
    };
    let relay = Relay::start(db_addr(&db)).await;
    let store = credproxy::store::open(&relay.url(&db))
        .await
        .expect("store");
    // A lease of one request (an eighth of 8): every request renews.
    let gate = shared_gate(&store, 8, Duration::from_secs(60));
    take(&gate, 1).await;
    relay.set(Mode::Stopped);
    // The store is asked again a second after each failure: requests spread
    // over 3 s meet several renewals, and none of them waits for one (the
    // pool gives up on a refused connection after seconds).
    let mut waits = Vec::new();
    for _ in 0..6 {
        waits.extend(take(&gate, 1).await);
        // The thing tested is what happens over time: bounded.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let worst = waits.iter().max().copied().unwrap_or_default();
    assert!(
        worst < Duration::from_millis(2500),
        "a request waited {worst:?} for a renewal with the database stopped (each: {waits:?})"
    );
}

/// A server on `store_url` with one session added before it started (so
/// its key is not cached: a cold lookup); returns it and the key.
fn serve_cold(w: &World, store_url: String) -> (BinServer, String) {
    let cfg = w.write_config(&Extra {
        store_url: Some(store_url),
        ..Extra::default()
    });
    let added = support::cli_add(&cfg, "spark", &w.spark.issue_tokens());
    let key = added["session_key"].as_str().expect("key").to_owned();
    (BinServer::spawn(&cfg, "warn"), key)
}

/// Status, error code and how long it took, or `None` when no answer came
/// within 20 s (a stall).
async fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> Option<(u16, Option<String>)> {
    let mut req = client()
        .get(url(addr, path))
        .timeout(Duration::from_secs(20));
    if let Some(key) = key {
        req = req.header(HDR, key);
    }
    let resp = req.send().await.ok()?;
    Some((resp.status().as_u16(), error_code(&resp)))
}

async fn unavailable_within_bounds(server: &BinServer, key: &str, what: &str) {
    let asked = Instant::now();
    let answer = get(server.proxy_addr, "/spark/v1/me", Some(key)).await;
    let took = asked.elapsed();
    assert_eq!(
        answer,
        Some((503, Some("store_unavailable".to_owned()))),
        "a cold lookup with {what}: answered {answer:?} after {took:?}"
    );
    assert!(
        took < Duration::from_secs(8),
        "the cold lookup took {took:?}"
    );
    let asked = Instant::now();
    let ready = get(server.admin_addr, "/readyz", None).await;
    let took = asked.elapsed();
    assert_eq!(
        ready.map(|r| r.0),
        Some(503),
        "/readyz with {what} after {took:?}"
    );
    assert!(took < Duration::from_secs(8), "/readyz took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_sessions_table_is_503_store_unavailable_and_not_ready() {
    let Some(db) = support::postgres_db("slow_sessions_lock").await else {
        return;
    };
    let w = World::new().await;
    let (server, key) = serve_cold(&w, db.clone());
    assert_eq!(
        get(server.admin_addr, "/readyz", None).await.map(|r| r.0),
        Some(200)
    );
    let lock = lock_table(&db, "sessions").await;
    unavailable_within_bounds(&server, &key, "sessions locked").await;
    // The lock ends: the same key is served, and the store is ready again.
    drop(lock);
    assert_eq!(
        get(server.proxy_addr, "/spark/v1/me", Some(&key))
            .await
            .map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        get(server.admin_addr, "/readyz", None).await.map(|r| r.0),
        Some(200)
    );
}
