//! Rate limits against stand-ins that enforce a Spark-style budget (a
//! sliding window, 429 or 503/1550, `Retry-After`): a configured budget
//! paces requests so the provider refuses none; an unconfigured provider's
//! refusal is waited out and the request sent again; `max_queue_wait`
//! bounds every wait.

mod support;

use std::time::{Duration, Instant};

use credproxy_standins::{Budget, Refusal, Standin};
use support::{add_session, client, error_code, url, BinServer, Extra, World};

const HDR: &str = "X-Credproxy-Session";

fn budget(requests: u32, per_ms: u64) -> Budget {
    Budget::new(requests, Duration::from_millis(per_ms))
}

fn paced(requests: u32, per: &str, max_wait: &str) -> String {
    format!("rate_limit = {{ requests = {requests}, per = \"{per}\" }}\nmax_queue_wait = \"{max_wait}\"")
}

/// Sends `n` GETs at once; returns their statuses in order.
async fn concurrent(addr: std::net::SocketAddr, route: &str, key: &str, n: usize) -> Vec<u16> {
    let c = client();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let req = c
            .get(url(addr, &format!("/{route}/v1/listings/{i}")))
            .header(HDR, key);
        set.spawn(async move { (i, req.send().await.expect("answer").status().as_u16()) });
    }
    let mut out = vec![0; n];
    while let Some(r) = set.join_next().await {
        let (i, status) = r.expect("task");
        out[i] = status;
    }
    out
}

async fn metric(admin: std::net::SocketAddr, prefix: &str) -> f64 {
    let text = client()
        .get(url(admin, "/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {prefix} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_budget_paces_nine_concurrent_requests_without_a_refusal() {
    let w = World::new().await;
    w.spark.set_budget(Some(budget(3, 1500)));
    let running = w
        .start(&Extra {
            spark: paced(3, "1500ms", "20s"),
            ..Extra::default()
        })
        .await;
    let (_, key, _) = add_session(&running, "spark", &w.spark).await;
    let statuses = concurrent(running.proxy_addr, "spark", &key, 9).await;
    assert_eq!(statuses, vec![200; 9]);
    assert_eq!(
        w.spark.budget_refusals(),
        0,
        "the provider refused a paced request"
    );
    assert!(w.spark.max_in_any_window(Duration::from_millis(1500)) <= 3);
    // Six of the nine waited; the budget was spent when the last one went.
    assert_eq!(
        metric(
            running.admin_addr,
            "credproxy_rate_limit_wait_seconds_count{provider=\"spark\"}"
        )
        .await,
        6.0
    );
    assert_eq!(
        metric(
            running.admin_addr,
            "credproxy_upstream_rate_limited_total{provider=\"spark\"}"
        )
        .await,
        0.0
    );
    let left = metric(
        running.admin_addr,
        "credproxy_rate_budget_remaining{provider=\"spark\"}",
    )
    .await;
    assert!(left <= 3.0, "{left}");
    running.shutdown().await;
}

/// The provider is out of budget for this client (someone else spent it):
/// the first request meets its refusal, is held for its `Retry-After` and
/// sent again, and the caller sees only the 200.
async fn refusal_is_waited_out(
    proxy: std::net::SocketAddr,
    standin: &Standin,
    route: &str,
    key: &str,
    accept_encoding: Option<&str>,
) {
    // Spend the provider's budget directly, as another client of it would.
    let c = client();
    let direct = format!("{}/v1/listings", standin.base_url());
    let _ = c.get(&direct).send().await;
    let _ = c.get(&direct).send().await;
    let refused_before = standin.budget_refusals();
    let started = Instant::now();
    let mut req = c
        .get(url(proxy, &format!("/{route}/v1/listings/after")))
        .header(HDR, key);
    if let Some(coding) = accept_encoding {
        req = req.header("Accept-Encoding", coding);
    }
    let resp = req.send().await.expect("answer");
    assert_eq!(resp.status(), 200, "{route} {accept_encoding:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "it was not held"
    );
    // The first refusal, and at most one more.
    let refusals = standin.budget_refusals() - refused_before;
    assert!((1..=2).contains(&refusals), "{route}: {refusals} refusals");
}

#[tokio::test(flavor = "current_thread")]
async fn an_unconfigured_providers_refusal_is_waited_out_429_and_1550() {
    let w = World::new().await;
    // Spark answers 503 with code 1550, Zillow 429; both with Retry-After: 2.
    let mut spark = budget(2, 2000);
    spark.refusal = Refusal::Spark1550;
    w.spark.set_budget(Some(spark));
    w.zillow.set_budget(Some(budget(2, 2000)));
    let running = w.start(&Extra::default()).await;
    let (_, spark_key, _) = add_session(&running, "spark", &w.spark).await;
    let (_, zillow_key, _) = add_session(&running, "zillow", &w.zillow).await;
    refusal_is_waited_out(running.proxy_addr, &w.spark, "spark", &spark_key, None).await;
    refusal_is_waited_out(running.proxy_addr, &w.zillow, "zillow", &zillow_key, None).await;
    assert!(
        metric(
            running.admin_addr,
            "credproxy_upstream_rate_limited_total{provider=\"spark\"}"
        )
        .await
            >= 1.0
    );
    assert!(
        metric(
            running.admin_addr,
            "credproxy_rate_limit_wait_seconds_count{provider=\"zillow\"}"
        )
        .await
            >= 1.0
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_compressed_1550_is_a_refusal_too() {
    // The caller's Accept-Encoding goes to Spark as it is (Ruby's Net::HTTP
    // asks for gzip by default), and Spark compresses its 1550 answer.
    let w = World::new().await;
    let mut spark = budget(2, 2000);
    spark.refusal = Refusal::Spark1550;
    w.spark.set_budget(Some(spark));
    let running = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&running, "spark", &w.spark).await;
    refusal_is_waited_out(running.proxy_addr, &w.spark, "spark", &key, Some("gzip")).await;
    running.shutdown().await;
}

/// A raw upstream answering every request with `response`.
async fn answering(response: Vec<u8>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let response = std::sync::Arc::new(response);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let response = std::sync::Arc::clone(&response);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // One request head per answer (the test sends no bodies).
                loop {
                    while let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..i + 4);
                        if stream.write_all(&response).await.is_err() {
                            return;
                        }
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "current_thread")]
async fn a_large_spark_503_goes_back_as_the_provider_sent_it() {
    // Not a 1550: more than credproxy reads to find out (a maintenance
    // page), with a length or chunked. The caller gets it whole, not a 502.
    let page = "<html>down for maintenance</html>".repeat(3000);
    let head = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\n";
    let mut sized = format!("{head}Content-Length: {}\r\n\r\n", page.len()).into_bytes();
    sized.extend_from_slice(page.as_bytes());
    let mut chunked = format!("{head}Transfer-Encoding: chunked\r\n\r\n").into_bytes();
    for piece in page.as_bytes().chunks(10_000) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    for response in [sized, chunked] {
        let upstream = answering(response).await;
        let w = World::new().await;
        let text = w.config_text(&Extra::default()).replace(
            &format!("api_base = \"{}\"", w.spark.base_url()),
            &format!("api_base = \"http://{upstream}\""),
        );
        let cfg = credproxy::config::Config::parse(&text, std::path::Path::new("t.toml"), |_| None)
            .expect("config");
        let running = credproxy::server::start(cfg).await.expect("start");
        let (_, key, _) = add_session(&running, "spark", &w.spark).await;
        let resp = client()
            .get(url(running.proxy_addr, "/spark/v1/listings"))
            .header(HDR, &key)
            .send()
            .await
            .expect("answer");
        assert_eq!(resp.status(), 503);
        assert_eq!(error_code(&resp), None, "the provider's own answer");
        assert_eq!(resp.text().await.expect("body"), page);
        running.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refusal_does_not_become_a_burst_of_them() {
    // An unconfigured provider, six requests at once against a budget of
    // two per second: after the first refusals, the held requests are
    // released one probe at a time, not all together.
    let w = World::new().await;
    w.spark.set_budget(Some(budget(2, 1000)));
    let running = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&running, "spark", &w.spark).await;
    let statuses = concurrent(running.proxy_addr, "spark", &key, 6).await;
    assert_eq!(statuses, vec![200; 6]);
    // At most the four that were in flight before any refusal was known,
    // and then one per probe while the window frees: far fewer than the
    // one-per-request-per-retry a blind retry would cost.
    let refusals = w.spark.budget_refusals();
    assert!(refusals <= 6, "{refusals} refusals");
    running.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn max_queue_wait_bounds_the_wait_and_answers_rate_limited_with_retry_after() {
    let w = World::new().await;
    let running = w
        .start(&Extra {
            spark: paced(1, "30s", "1s"),
            zillow: paced(1, "1500ms", "1s"),
            ..Extra::default()
        })
        .await;
    let (_, key, _) = add_session(&running, "spark", &w.spark).await;
    let c = client();
    let get = || {
        c.get(url(running.proxy_addr, "/spark/v1/listings"))
            .header(HDR, &key)
            .send()
    };
    assert_eq!(get().await.expect("first").status(), 200);
    let started = Instant::now();
    let resp = get().await.expect("second");
    assert_eq!(resp.status(), 429);
    assert_eq!(error_code(&resp).as_deref(), Some("rate_limited"));
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    // The budget frees 30 s (plus the margin) after the first request.
    assert!((29..=31).contains(&retry), "Retry-After: {retry}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the budget said at once it could not"
    );
    assert_eq!(
        w.spark.requests().len(),
        1,
        "the refused request reached the provider"
    );

    // A wait that fits is waited: Zillow's window frees 1.5 s after its
    // first request, past max_queue_wait = 1s... so it too is refused,
    // while one that fits (after the window) goes.
    let (_, zkey, _) = add_session(&running, "zillow", &w.zillow).await;
    let zget = || {
        c.get(url(running.proxy_addr, "/zillow/v1/listings"))
            .header(HDR, &zkey)
            .send()
    };
    assert_eq!(zget().await.expect("first").status(), 200);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let started = Instant::now();
    assert_eq!(
        zget().await.expect("second").status(),
        200,
        "a wait under max_queue_wait is waited"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert!(
        metric(
            running.admin_addr,
            "credproxy_rate_limited_total{provider=\"spark\"}"
        )
        .await
            >= 1.0
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_post_is_resent_only_with_the_get_override() {
    let w = World::new().await;
    w.spark.set_budget(Some(budget(1, 1500)));
    let running = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&running, "spark", &w.spark).await;
    let c = client();
    let post = |method_override: bool| {
        let mut req = c
            .post(url(running.proxy_addr, "/spark/v1/listings"))
            .header(HDR, &key)
            .body("_filter=ListPrice Gt 100000");
        if method_override {
            req = req.header("X-HTTP-Method-Override", "GET");
        }
        req.send()
    };
    let posts = || {
        w.spark
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count()
    };
    // Spark's large search, a POST read as a GET, meets the refusal (the
    // budget spent directly), is held and sent again.
    let _ = c
        .get(format!("{}/v1/listings", w.spark.base_url()))
        .send()
        .await;
    let resp = post(true).await.expect("answer");
    assert_eq!(resp.status(), 200);
    assert_eq!(w.spark.budget_refusals(), 1);
    assert_eq!(posts(), 2, "the refused search was sent again");
    // A plain POST is not sent twice: it meets the window the resend just
    // filled, and the provider's refusal goes back.
    let resp = post(false).await.expect("answer");
    assert_eq!(resp.status(), 429);
    assert_eq!(error_code(&resp), None, "the provider's own answer");
    assert_eq!(w.spark.budget_refusals(), 2);
    assert_eq!(posts(), 3, "the plain POST went once");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_whose_client_hangs_up_leaves_the_queue() {
    let w = World::new().await;
    w.spark.set_budget(Some(budget(1, 2000)));
    let running = w
        .start(&Extra {
            spark: paced(1, "2s", "10s"),
            ..Extra::default()
        })
        .await;
    let (_, key, _) = add_session(&running, "spark", &w.spark).await;
    let c = client();
    let get = |path: &'static str| {
        c.get(url(running.proxy_addr, path))
            .header(HDR, &key)
            .send()
    };
    let first_at = Instant::now();
    assert_eq!(get("/spark/v1/first").await.expect("first").status(), 200);
    // The second waits for the window; its client gives up.
    let impatient = client()
        .get(url(running.proxy_addr, "/spark/v1/abandoned"))
        .header(HDR, &key)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(impatient.is_err(), "the client timed out");
    // The third takes the slot the second left: it goes one window after
    // the first, not two.
    assert_eq!(get("/spark/v1/third").await.expect("third").status(), 200);
    let took = first_at.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "the abandoned request kept its slot: {took:?}"
    );
    let paths: Vec<String> = w.spark.requests().iter().map(|r| r.path.clone()).collect();
    assert!(!paths.iter().any(|p| p.contains("abandoned")), "{paths:?}");
    assert_eq!(w.spark.budget_refusals(), 0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_says_when_a_request_waited() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra {
        spark: paced(1, "1s", "10s"),
        ..Extra::default()
    });
    let server = BinServer::spawn(&cfg, "info");
    let added = support::cli_add(&cfg, "spark", &w.spark.issue_tokens());
    let key = added["session_key"].as_str().expect("key").to_owned();
    let statuses = concurrent(server.proxy_addr, "spark", &key, 2).await;
    assert_eq!(statuses, vec![200, 200]);
    let line = server
        .stdout
        .wait_for(Duration::from_secs(10), |l| l.contains("queued_ms="))
        .or_else(|| {
            server
                .stderr
                .wait_for(Duration::from_secs(1), |l| l.contains("queued_ms="))
        });
    assert!(line.is_some(), "no access log line says the request waited");
    assert!(!line.unwrap_or_default().contains(&key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres_share_one_budget() {
    let Some(db) = support::postgres_db("rate_two_instances").await else {
        return;
    };
    let w = World::new().await;
    w.spark.set_budget(Some(budget(4, 3000)));
    let cfg = w.write_config(&Extra {
        store_url: Some(db),
        spark: paced(4, "3s", "30s"),
        ..Extra::default()
    });
    let added = support::cli_add(&cfg, "spark", &w.spark.issue_tokens());
    let key = added["session_key"].as_str().expect("key").to_owned();
    let a = BinServer::spawn(&cfg, "warn");
    let b = BinServer::spawn(&cfg, "warn");
    let c = client();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..12 {
        let addr = if i % 2 == 0 {
            a.proxy_addr
        } else {
            b.proxy_addr
        };
        let req = c
            .get(url(addr, &format!("/spark/v1/listings/{i}")))
            .header(HDR, &key);
        set.spawn(async move { req.send().await.expect("answer").status().as_u16() });
    }
    let mut statuses = Vec::new();
    while let Some(r) = set.join_next().await {
        statuses.push(r.expect("task"));
    }
    assert_eq!(statuses, vec![200; 12]);
    assert_eq!(
        w.spark.budget_refusals(),
        0,
        "the provider refused a paced request"
    );
    let most = w.spark.max_in_any_window(Duration::from_secs(3));
    assert!(most <= 4, "{most} requests reached the provider within 3 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_instances_unused_share_goes_back_when_its_lease_ends() {
    use credproxy::config::RateLimit;
    use credproxy::pacing::{Gate, GateMetrics};
    let Some(db) = support::postgres_db("rate_idle_share").await else {
        return;
    };
    let store = credproxy::store::open(&db).await.expect("store");
    let limit = RateLimit {
        requests: 16,
        per: Duration::from_secs(3),
    };
    let gate = |instance: &str| {
        Gate::new(
            "spark",
            Some(limit),
            Duration::from_secs(30),
            Some((&store, instance)),
            GateMetrics::default(),
        )
    };
    let (a, b) = (gate("a"), gate("b"));
    let in_time = || tokio::time::Instant::now() + Duration::from_millis(500);
    // Instance a sends one request, under a lease of two (an eighth), and
    // goes idle.
    let mut p = a.acquire(in_time(), false).await.expect("a's request");
    p.sent();
    drop(p);
    // Its lease ends (300 ms: a tenth of the window) and is settled to the
    // one it used, without a request of a's asking for the next.
    let pool = sqlx::PgPool::connect(&db).await.expect("connect");
    let settled = async {
        loop {
            let counts: Vec<i32> =
                sqlx::query_scalar("SELECT count FROM budget_leases WHERE instance = 'a'")
                    .fetch_all(&pool)
                    .await
                    .expect("leases");
            if counts == [1] {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), settled)
        .await
        .expect("a's lease was not settled when it ended");
    // So instance b has the whole rest of the budget at once, not the rest
    // less a's unused share.
    for i in 0..15 {
        let mut p = b
            .acquire(in_time(), false)
            .await
            .unwrap_or_else(|l| panic!("b's request {i}: {l:?}"));
        p.sent();
    }
    assert!(b.acquire(in_time(), false).await.is_err(), "over budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_request_that_cannot_go_in_time_is_refused_at_once() {
    use credproxy::config::RateLimit;
    use credproxy::pacing::{Gate, GateMetrics};
    let Some(db) = support::postgres_db("rate_flood_at_once").await else {
        return;
    };
    let store = credproxy::store::open(&db).await.expect("store");
    // 8 a minute, 10 s of patience: a flood of 20 gets 8 sends, and the
    // other 12 cannot go within 10 s whatever happens.
    let gate = Gate::new(
        "spark",
        Some(RateLimit {
            requests: 8,
            per: Duration::from_secs(60),
        }),
        Duration::from_secs(10),
        Some((&store, "a")),
        GateMetrics::default(),
    );
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let gate = std::sync::Arc::clone(&gate);
        set.spawn(async move {
            let deadline = tokio::time::Instant::now() + gate.max_wait();
            let asked = Instant::now();
            let got = gate.acquire(deadline, false).await.map(|mut p| p.sent());
            (got, asked.elapsed())
        });
    }
    let (mut sent, mut refused) = (0, Vec::new());
    while let Some(r) = set.join_next().await {
        match r.expect("task") {
            (Ok(()), _) => sent += 1,
            (Err(l), took) => refused.push((l.retry_after_secs, took)),
        }
    }
    assert_eq!(sent, 8);
    assert_eq!(refused.len(), 12);
    for (retry_after, took) in &refused {
        // At once (not after the 10 s of max_queue_wait), and told to come
        // back when the window has room (about a minute).
        assert!(
            *took < Duration::from_secs(5),
            "a request was refused after {took:?}: {refused:?}"
        );
        assert!(*retry_after > 10, "Retry-After {retry_after}: {refused:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(8));
}
