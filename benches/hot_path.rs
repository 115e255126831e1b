//! Per-request work on credproxy's hot path, without the network:
//! finding the session key, looking the session up in the cache, and
//! injecting the real credentials; and (`extra/`) everything a request
//! costs beyond forwarding it, piece by piece and together.
//!
//! Quick run (well under a minute):
//!
//! ```text
//! cargo bench --bench hot_path -- --warm-up-time 1 --measurement-time 3
//! cargo bench --bench hot_path -- extra/     # the extra work only (about a minute)
//! ```
//!
//! Requests are rebuilt outside the timed section (`iter_batched`), because
//! `take_slot` consumes the caller's credential header.

use std::borrow::Cow;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, HOST, USER_AGENT};
use secrecy::SecretString;

use credproxy::config::Config;
use credproxy::config::{preset, ProviderKind};
use credproxy::provider::{Credentials, Shape};
use credproxy::proxy::forward::{Head, Outbound};
use credproxy::secrets::seal::Sealer;
use credproxy::secrets::session::KeyHash;
use credproxy::tokens::sessions::{NewTokens, Sessions};

/// The server's allocator (src/main.rs), so that what allocates (a header
/// value, the access line's buffer, freed by the log thread) costs here what
/// it costs there. Before issue 27 these benches ran on glibc's malloc.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A 47-byte key, the length of a generated one (`cpk_` and 43 base64 characters).
const KEY: &str = "cpk_Xq3vN8rT2mLw9YbZk4HfJc7PdAs1GeUo6iRyV0tBn5M";
const SPARK_PATH: &str = "/v1/listings";
const SPARK_QUERY: &str = "_limit=25&_page=1&_select=ListPrice,City";
const ZILLOW_PATH: &str = "/v2/listings";
/// `accessToken` among the caller's own parameters, as a legacy client sends it.
const ZILLOW_QUERY: &str = "city=Seattle&state=WA&accessToken=cpk_Xq3vN8rT2mLw9YbZk4HfJc7PdAs1GeUo6iRyV0tBn5M&minBeds=2&maxPrice=3500&page=3";

fn config_text(dir: &Path) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[store]
url = "sqlite://{db}"
key_file = "{key}"

[providers.spark]
kind = "spark"
api_base = "http://127.0.0.1:9/"
token_url = "http://127.0.0.1:9/v1/oauth2/grant"
authorize_url = "http://127.0.0.1:9/openid"
client_id = "bench-spark-client"
client_secret = "bench-spark-secret"
user_agent = "credproxy-bench/1.0"

[providers.zillow]
kind = "zillow"
api_base = "http://127.0.0.1:9/"
token_url = "http://127.0.0.1:9/oauth/token"
authorize_url = "http://127.0.0.1:9/oauth/authorize"
client_id = "bench-zillow-client"
client_secret = "bench-zillow-secret"
api_key = "bench-zillow-api-key"
"#,
        db = dir.join("b.db").display(),
        key = dir.join("b.key").display(),
    )
}

/// The headers a typical client sends, with the session key in Spark's slot.
fn spark_request() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(HOST, HeaderValue::from_static("127.0.0.1:8080"));
    h.insert(USER_AGENT, HeaderValue::from_static("legacy-app/2.3"));
    h.insert(ACCEPT, HeaderValue::from_static("application/json"));
    h.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("OAuth {KEY}")).unwrap(),
    );
    h
}

fn zillow_request() -> HeaderMap {
    let mut h = spark_request();
    h.remove(AUTHORIZATION);
    h
}

fn shape(kind: ProviderKind) -> Shape {
    Shape::new(&preset(kind))
}

fn extraction(c: &mut Criterion) {
    let mut g = c.benchmark_group("extract");
    let spark_shape = shape(ProviderKind::Spark);
    let zillow_shape = shape(ProviderKind::Zillow);
    let spark = spark_request();
    g.bench_function("spark_authorization", |b| {
        b.iter_batched(
            || spark.clone(),
            |mut h| {
                let (slot, query) = spark_shape
                    .take_slot(&mut h, black_box(None))
                    .expect("plain");
                black_box((slot, query, h))
            },
            BatchSize::SmallInput,
        )
    });
    let zillow = zillow_request();
    g.bench_function("zillow_query", |b| {
        b.iter_batched(
            || zillow.clone(),
            |mut h| {
                let (slot, query) = zillow_shape
                    .take_slot(&mut h, black_box(Some(ZILLOW_QUERY)))
                    .expect("plain");
                black_box((slot, query.map(Cow::into_owned), h))
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("key_hash_47b", |b| {
        b.iter(|| KeyHash::of(black_box(KEY.as_bytes())))
    });
    g.finish();
}

struct World {
    rt: tokio::runtime::Runtime,
    sessions: Arc<Sessions>,
    config: Config,
    _dir: tempfile::TempDir,
}

fn world() -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::parse(&config_text(dir.path()), Path::new("bench.toml"), |_| None)
        .expect("valid bench config");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let sessions = rt.block_on(async {
        let store = credproxy::store::open(secrecy::ExposeSecret::expose_secret(&config.store.url))
            .await
            .expect("store opens");
        let sessions = Arc::new(Sessions::new(store, Sealer::from_key(&[7; 32]), &config));
        // One Spark session under the bench key, looked up once to fill the cache.
        let key =
            credproxy::secrets::session::SessionKey::chosen(SecretString::from(KEY.to_owned()))
                .expect("valid key");
        sessions
            .add(
                "spark",
                NewTokens {
                    access_token: SecretString::from(
                        "spark-access-token-0123456789abcdef".to_owned(),
                    ),
                    refresh_token: None,
                    expires_in: None,
                },
                None,
                Some(key),
                credproxy::audit::Actor::Cli,
            )
            .await
            .expect("session added");
        let hit = sessions
            .by_key(&KeyHash::of(KEY.as_bytes()))
            .await
            .expect("lookup");
        assert!(hit.is_some(), "the bench session is found");
        sessions
    });
    World {
        rt,
        sessions,
        config,
        _dir: dir,
    }
}

fn lookup(c: &mut Criterion, w: &World) {
    let hash = KeyHash::of(KEY.as_bytes());
    let sessions = &*w.sessions;
    let client: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    c.bench_function("lookup/cache_hit", |b| {
        b.to_async(&w.rt)
            .iter(|| async { sessions.by_key(black_box(&hash)).await.unwrap().unwrap() })
    });
    // As the proxy calls it: with the client's address (never charged on a hit).
    c.bench_function("lookup/cache_hit_from_client", |b| {
        b.to_async(&w.rt).iter(|| async {
            sessions
                .by_key_from(black_box(&hash), Some(client))
                .await
                .unwrap()
                .unwrap()
        })
    });
    // The lookup with the scope check the proxy makes after it: one branch
    // on `None` for an unlimited key (the session's first key, above)...
    let method = http::Method::GET;
    c.bench_function("lookup/scope_check_unlimited", |b| {
        b.to_async(&w.rt).iter(|| async {
            let keyed = sessions
                .by_key_from(black_box(&hash), Some(client))
                .await
                .unwrap()
                .unwrap();
            match &keyed.grant.scope {
                Some(scope) => scope
                    .admit(&method, black_box("/v1/listings/20"), 0)
                    .is_ok(),
                None => true,
            }
        })
    });
    // ...and the methods and patterns of a limited key (no rate: its
    // window is a lock and a deque, measured by the gate's benches).
    let limited = w.rt.block_on(async {
        let added = sessions
            .add_key(
                &keyed_session_id(sessions, &hash).await,
                None,
                credproxy::tokens::sessions::ScopeAsked::parse(
                    Some("GET,HEAD"),
                    Some("/v1/contacts*,/v1/listings/*/photos,/v1/listings*"),
                    None,
                    None,
                )
                .expect("scope"),
                credproxy::audit::Actor::Cli,
            )
            .await
            .expect("key added");
        added.key.hash()
    });
    c.bench_function("lookup/scope_check_limited", |b| {
        b.to_async(&w.rt).iter(|| async {
            let keyed = sessions
                .by_key_from(black_box(&limited), Some(client))
                .await
                .unwrap()
                .unwrap();
            let allowed = match &keyed.grant.scope {
                Some(scope) => scope
                    .admit(&method, black_box("/v1/listings/20"), 0)
                    .is_ok(),
                None => true,
            };
            assert!(allowed);
        })
    });
    // A key the store said does not exist: answered by the negative cache.
    let unknown = KeyHash::of(b"cpk_not-a-session-key-at-all-0123456789abcdefgh");
    w.rt.block_on(sessions.by_key(&unknown)).unwrap();
    assert!(sessions.cache().known_absent(&unknown));
    c.bench_function("lookup/negative_cache_hit", |b| {
        b.to_async(&w.rt).iter(|| async {
            let none = sessions
                .by_key_from(black_box(&unknown), Some(client))
                .await
                .unwrap();
            assert!(none.is_none());
        })
    });
    // The budget check of a cold lookup; spent after the first 200, so this
    // is the refused path a flood of random keys takes.
    c.bench_function("lookup/cold_budget_check", |b| {
        b.iter(|| black_box(sessions.cold().admit(black_box(client)).is_ok()))
    });
}

/// The id of the session `hash` names.
async fn keyed_session_id(sessions: &Sessions, hash: &KeyHash) -> String {
    let keyed = sessions.by_key(hash).await.unwrap().unwrap();
    keyed.session.id.clone()
}

fn injection(c: &mut Criterion, w: &World) {
    let mut g = c.benchmark_group("inject");
    let token = SecretString::from("access-token-0123456789abcdef-0123456789".to_owned());

    let spark_cfg = w.config.provider("spark").expect("spark provider");
    let spark = Credentials::new(spark_cfg, &token).expect("credentials");
    let mut spark_headers = spark_request();
    let (spark_slot, _) = shape(ProviderKind::Spark)
        .take_slot(&mut spark_headers, None)
        .expect("plain");
    g.bench_function("spark", |b| {
        b.iter_batched(
            || spark_headers.clone(),
            |mut h| {
                let q = spark.inject(
                    &mut h,
                    Some(black_box(SPARK_QUERY)),
                    &spark_slot,
                    SPARK_PATH,
                );
                black_box((q, h))
            },
            BatchSize::SmallInput,
        )
    });

    let zillow_cfg = w.config.provider("zillow").expect("zillow provider");
    let zillow = Credentials::new(zillow_cfg, &token).expect("credentials");
    let mut zillow_headers = zillow_request();
    let (zillow_slot, rest) = shape(ProviderKind::Zillow)
        .take_slot(&mut zillow_headers, Some(ZILLOW_QUERY))
        .expect("plain");
    let rest = rest.map(Cow::into_owned);
    g.bench_function("zillow", |b| {
        b.iter_batched(
            || zillow_headers.clone(),
            |mut h| {
                let q = zillow.inject(&mut h, rest.as_deref(), &zillow_slot, ZILLOW_PATH);
                black_box((q, h))
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Extraction, cached lookup and injection of one Spark request, as the
/// proxy does them between reading the request head and sending upstream.
fn whole(c: &mut Criterion, w: &World) {
    let sessions = &*w.sessions;
    let request = spark_request();
    let spark_shape = &shape(ProviderKind::Spark);
    c.bench_function("whole/spark", |b| {
        b.to_async(&w.rt).iter_batched(
            || request.clone(),
            |mut h| async move {
                let (slot, query) = spark_shape
                    .take_slot(&mut h, Some(SPARK_QUERY))
                    .expect("plain");
                let hash = slot.key.expect("key in the slot");
                let session = sessions.by_key(&hash).await.unwrap().unwrap();
                let q = session
                    .credentials
                    .inject(&mut h, query.as_deref(), &slot, SPARK_PATH);
                black_box((q, h))
            },
            BatchSize::SmallInput,
        )
    });
}

/// Which upstream pool a request uses: the worker's own, found through a
/// thread-local (`forward::Upstreams::here`), once per upstream send.
fn upstream_pick(c: &mut Criterion, w: &World) {
    let spark = w.config.provider("spark").expect("spark provider");
    let ups = credproxy::proxy::forward::Upstreams::new(spark, 2).expect("upstreams");
    credproxy::proxy::forward::enter_worker(1);
    c.bench_function("upstream/pick_worker_pool", |b| {
        b.iter(|| black_box(black_box(&ups).here().response_timeout()))
    });
}

/// Taking the hop-by-hop headers out of an upstream answer's head: the
/// usual head (none there, one pass over the names) and one that has them.
fn hop_by_hop(c: &mut Criterion) {
    use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, DATE, SERVER};
    let mut plain = HeaderMap::new();
    plain.insert(SERVER, HeaderValue::from_static("nginx"));
    plain.insert(
        DATE,
        HeaderValue::from_static("Wed, 02 Dec 2026 14:00:00 GMT"),
    );
    plain.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    plain.insert(CONTENT_LENGTH, HeaderValue::from_static("72"));
    plain.insert("x-request-id", HeaderValue::from_static("8c1f"));
    let mut hop = plain.clone();
    hop.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-hop"));
    hop.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    hop.insert("x-hop", HeaderValue::from_static("1"));
    let mut nginx = plain.clone();
    nginx.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
    let mut g = c.benchmark_group("hop_by_hop");
    for (name, head) in [("none", plain), ("keep_alive", nginx), ("three", hop)] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || head.clone(),
                |mut h| {
                    credproxy::proxy::forward::strip_hop_by_hop(&mut h);
                    black_box(h)
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// One request through a provider's pooled upstream connection to a
/// loopback stand-in that answers every request with a fixed 200: the
/// pool's checkout and check-in, the client's encode and parse, and
/// loopback TCP (most of it); credproxy's own HTTP/1.1 client against
/// hyper's (with its connection task's wake-ups).
fn upstream_roundtrip(c: &mut Criterion, w: &World) {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener =
        w.rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the stand-in");
    let port = listener.local_addr().expect("local addr").port();
    w.rt.spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = sock.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if sock.write_all(ANSWER).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let text = config_text(w._dir.path()).replace(
        "127.0.0.1:9/\"\ntoken_url = \"http://127.0.0.1:9/v1",
        &format!("127.0.0.1:{port}/\"\ntoken_url = \"http://127.0.0.1:9/v1"),
    );
    let config = Config::parse(&text, Path::new("bench.toml"), |_| None).expect("config");
    let spark = config.provider("spark").expect("spark provider");
    let ups = credproxy::proxy::forward::Upstreams::new(spark, 1).expect("upstreams");
    credproxy::proxy::forward::enter_worker(0);
    let up = ups.here();
    let mut headers = http::HeaderMap::new();
    headers.insert(ACCEPT, http::HeaderValue::from_static("application/json"));
    let head = Head {
        method: http::Method::GET,
        uri: http::Uri::from_static("/v1/listings"),
        headers,
    };
    // A body in memory (the usual case): credproxy's HTTP/1.1 client, the
    // head lent (as while a replay may follow).
    c.bench_function("upstream/roundtrip_kept_body", |b| {
        b.to_async(&w.rt).iter(|| async {
            let body = Outbound::Kept(bytes::Bytes::new());
            let resp = up
                .send(Cow::Borrowed(&head), body, "bench")
                .await
                .expect("answer");
            black_box(resp.into_body().collect().await.expect("body"));
        })
    });
    // A streamed body: hyper's client, its connection in a task of its own.
    c.bench_function("upstream/roundtrip_streamed_body", |b| {
        b.to_async(&w.rt).iter(|| async {
            let body = http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed();
            let resp = up
                .send(Cow::Owned(head.clone()), Outbound::Streamed(body), "bench")
                .await
                .expect("answer");
            black_box(resp.into_body().collect().await.expect("body"));
        })
    });
}

/// Counting a request and its upstream latency: the route's resolved
/// series against a label lookup in the family (what it replaced).
fn metrics(c: &mut Criterion) {
    let m = credproxy::metrics::Metrics::default();
    let route = m.route("spark");
    let took = std::time::Duration::from_micros(800);
    let mut g = c.benchmark_group("metrics");
    g.bench_function("route_series", |b| {
        b.iter(|| {
            route.request(&m, black_box(200));
            route.upstream_latency(&m, black_box(took));
        })
    });
    g.bench_function("family_lookup", |b| {
        b.iter(|| {
            m.request("spark", black_box(200));
            m.upstream_latency("spark", black_box(took));
        })
    });
    g.finish();
}

/// The rate-limit gate's fast path (no contention): a provider without a
/// budget (calm: no lock), and one with a local budget that has room (one
/// short lock; the permit goes unsent and gives its send back, so the
/// window never fills).
fn gate(c: &mut Criterion) {
    use credproxy::config::RateLimit;
    use credproxy::pacing::{Gate, GateMetrics};
    use std::time::Duration;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let max_wait = Duration::from_secs(10);
    let calm = Gate::new("bench", None, max_wait, None, GateMetrics::default());
    let budgeted = Gate::new(
        "bench",
        Some(RateLimit {
            requests: 1500,
            per: Duration::from_secs(300),
        }),
        max_wait,
        None,
        GateMetrics::default(),
    );
    let deadline = rt.block_on(async { tokio::time::Instant::now() }) + Duration::from_secs(3600);
    c.bench_function("gate/unbudgeted_calm", |b| {
        b.to_async(&rt)
            .iter(|| async { drop(black_box(calm.acquire(deadline, false).await.unwrap())) })
    });
    c.bench_function("gate/budget_uncontended", |b| {
        b.to_async(&rt)
            .iter(|| async { drop(black_box(budgeted.acquire(deadline, false).await.unwrap())) })
    });
}

/// The headers of the load test's request (`benches/load.sh`): the key in
/// the session header.
fn keyed_request(header: &http::HeaderName) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(HOST, HeaderValue::from_static("127.0.0.1:8080"));
    h.insert(USER_AGENT, HeaderValue::from_static("legacy-app/2.3"));
    h.insert(ACCEPT, HeaderValue::from_static("application/json"));
    h.insert(header.clone(), HeaderValue::from_static(KEY));
    h
}

/// An nginx upstream's answer head, as credproxy's client hands it over.
fn answer_head() -> HeaderMap {
    use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, DATE, SERVER};
    let mut h = HeaderMap::new();
    h.insert(SERVER, HeaderValue::from_static("nginx/1.22.1"));
    h.insert(
        DATE,
        HeaderValue::from_static("Mon, 07 Dec 2026 14:00:00 GMT"),
    );
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CONTENT_LENGTH, HeaderValue::from_static("11"));
    h.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
    h
}

/// The access-log line as `proxy/access.rs` (`write`) makes it for a
/// plain 200: the same target, fields and value types, within
/// `Span::none()`. A copy, because that function is private: keep the two
/// alike.
#[allow(clippy::too_many_arguments)]
fn access_line(
    method: &http::Method,
    uri: &http::Uri,
    status: u16,
    started: std::time::Instant,
    head: std::time::Duration,
    upstream_ms: u128,
    session: &str,
    key_id: &str,
) {
    let total = started.elapsed();
    let span = tracing::Span::none();
    let _in = span.enter();
    tracing::info!(
        target: "credproxy::access",
        provider = "spark",
        method = %method,
        path = uri.path(),
        status,
        upstream_ms = Some(upstream_ms as u64),
        head_ms = head.as_millis() as u64,
        total_ms = total.as_millis() as u64,
        bytes_in = 0u64,
        bytes_out = 11u64,
        session = Some(session),
        key_id = Some(key_id),
        replayed = false,
        refreshed = false,
        queued_ms = None::<u64>,
        upstream_refusals = None::<u32>,
        error = None::<&str>,
        cause = None::<&str>,
        detail = None::<&str>,
        broke_off = None::<&str>,
        "request"
    );
}

/// Installs a log subscriber as `telemetry::init` makes it for text lines
/// at `info` (fmt layer with the target, no colours, EnvFilter, the trace
/// spans filtered out, tracing-appender's non-blocking writer, not lossy,
/// into a 64 KiB `BufWriter`), writing to `io::sink()` instead of stderr.
/// Global, as in the server, so callsites cache their interest; the
/// returned guard keeps the writer's thread.
fn install_access_log() -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt as _};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("bench-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::sink(),
        ));
    let not_a_trace_span =
        filter_fn(|m| !(m.is_span() && m.target() == credproxy::telemetry::TARGET));
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(false)
        .with_target(true)
        .boxed()
        .with_filter(EnvFilter::new("info").and(not_a_trace_span));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(lines))
        .expect("no subscriber set before");
    guard
}

/// What one request costs beyond forwarding it (issue 27), in the setting
/// of the load test: traces off, no rate limit (a calm gate), a key
/// without limits, the access-log line on. Each piece as the proxy does it
/// through the public API, then all of them for one request
/// (`extra/all`); the upstream round trip is `upstream/roundtrip_*`.
///
/// Not covered (private to `proxy/`, so neither called nor copied here):
/// routing (`route`: the method, dot-segment and override checks),
/// `limit_accept_encoding`, the upstream URI's string (`Target::address`
/// around `inject`), `response_filter`'s content-type test, the access
/// line's `Line` and its box, and `Logged`'s count of each body frame.
/// The access line is a copy of `access::write`'s event (`access_line`).
fn extra(c: &mut Criterion, w: &World) {
    use credproxy::pacing::{Gate, Verdict};
    use std::time::{Duration, Instant};
    let sessions = &*w.sessions;
    let header = w.config.server.session_header.clone();
    let request = keyed_request(&header);
    // The head once `identify` has taken the key out.
    let mut bare = request.clone();
    bare.remove(&header);
    let answer = answer_head();
    let spark_shape = &shape(ProviderKind::Spark);
    let margin = w.config.provider("spark").expect("spark").refresh_margin;
    let client: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let hash = KeyHash::of(KEY.as_bytes());
    let keyed = w.rt.block_on(sessions.by_key(&hash)).unwrap().unwrap();
    assert!(keyed.grant.scope.is_none(), "the bench key has no limits");
    let (slot, _) = spark_shape
        .take_slot(&mut keyed_request(&header), Some(SPARK_QUERY))
        .expect("plain");
    let metrics = credproxy::metrics::Metrics::default();
    let route = metrics.route("spark");
    let gate = Gate::new(
        "spark",
        None,
        Duration::from_secs(10),
        None,
        metrics.gate_metrics("spark", false),
    );
    let method = http::Method::GET;
    let uri = http::Uri::from_static("/spark/v1/listings?_limit=25&_page=1&_select=ListPrice,City");
    let log_guard = install_access_log();

    let mut g = c.benchmark_group("extra");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    // The key out of the head (session header, Proxy-Authorization, the
    // provider's own slot) and its hash: `identify`.
    g.bench_function("identify", |b| {
        b.iter_batched(
            || request.clone(),
            |mut h| {
                let from_header = h
                    .remove(&header)
                    .map(|v| KeyHash::of(v.as_bytes().trim_ascii()));
                let from_proxy_auth = h.remove(http::header::PROXY_AUTHORIZATION);
                let (slot, query) = spark_shape
                    .take_slot(&mut h, black_box(Some(SPARK_QUERY)))
                    .expect("plain");
                black_box((from_header, from_proxy_auth, slot, query, h))
            },
            BatchSize::SmallInput,
        )
    });
    // The cached session as `resolve` takes it (with the client's address,
    // the session and grant cloned out, its provider and status checked).
    g.bench_function("lookup", |b| {
        b.to_async(&w.rt).iter(|| async {
            let keyed = sessions
                .by_key_from(black_box(&hash), Some(client))
                .await
                .unwrap()
                .unwrap();
            let (session, grant) = (Arc::clone(&keyed.session), Arc::clone(&keyed.grant));
            assert!(
                session.provider == "spark"
                    && session.status
                        != credproxy::secrets::session::Status::ReauthorizationRequired
            );
            black_box((session, grant))
        })
    });
    // An unlimited key's scope: one branch on `None`.
    g.bench_function("scope_check", |b| {
        b.iter(|| {
            let grant = black_box(&keyed.grant);
            black_box(match &grant.scope {
                Some(scope) => scope.limits_methods(),
                None => false,
            })
        })
    });
    // The key's and the session's use noted, and whether the token is due
    // for a refresh (`ensure_fresh`).
    g.bench_function("note_use", |b| {
        b.iter(|| {
            let now = credproxy::clock::now();
            sessions.note_key_use(&keyed.grant, now);
            sessions.note_use(&keyed.session, now);
            black_box(keyed.session.due(now, margin))
        })
    });
    // Hop-by-hop headers out of the request head and out of the answer's.
    g.bench_function("hop_by_hop", |b| {
        b.iter_batched(
            || (bare.clone(), answer.clone()),
            |(mut req, mut ans)| {
                credproxy::proxy::forward::strip_hop_by_hop(&mut req);
                credproxy::proxy::forward::strip_hop_by_hop(&mut ans);
                black_box((req, ans))
            },
            BatchSize::SmallInput,
        )
    });
    // The session's credentials into the head (Spark: `Authorization`).
    g.bench_function("inject", |b| {
        b.iter_batched(
            || bare.clone(),
            |mut h| {
                let q = keyed.credentials.inject(
                    &mut h,
                    black_box(Some(SPARK_QUERY)),
                    &slot,
                    SPARK_PATH,
                );
                black_box((q, h))
            },
            BatchSize::SmallInput,
        )
    });
    // The provider's gate without a rate limit: a permit, spent, and the
    // answer's verdict told back.
    g.bench_function("gate", |b| {
        b.to_async(&w.rt).iter(|| async {
            let mut permit = gate
                .acquire_by(&mut None, false, black_box("s_1"))
                .await
                .unwrap();
            permit.sent();
            let verdict =
                credproxy::pacing::verdict(http::StatusCode::OK, black_box(&answer), false);
            gate.answered(&permit, verdict);
            black_box(verdict == Verdict::Accepted)
        })
    });
    // The injected secrets out of the answer's headers (none there: the
    // usual case, one search per value and secret, nothing allocated).
    g.bench_function("scrub", |b| {
        b.iter_batched(
            || answer.clone(),
            |mut h| {
                keyed.credentials.scrub_response(&mut h);
                black_box(h)
            },
            BatchSize::SmallInput,
        )
    });
    // The request counted and its upstream latency observed.
    let took = Duration::from_micros(800);
    g.bench_function("metrics", |b| {
        b.iter(|| {
            route.request(&metrics, black_box(200));
            route.upstream_latency(&metrics, black_box(took));
        })
    });
    // The clock reads `handle` and `send` make besides the access line's
    // (the total): the request's start, the upstream send's, its latency
    // and the head's time.
    g.bench_function("clocks", |b| {
        b.iter(|| {
            let started = Instant::now();
            let sent = Instant::now();
            black_box((sent.elapsed(), started.elapsed()))
        })
    });
    // The access-log line formatted (text, at `info`) and handed to the
    // log thread.
    let started = Instant::now();
    g.bench_function("access_line", |b| {
        b.iter(|| {
            access_line(
                black_box(&method),
                black_box(&uri),
                200,
                started,
                Duration::from_micros(900),
                0,
                &keyed.session.id,
                &keyed.grant.key_id,
            )
        })
    });
    // All of it for one request, in the proxy's order; and the same without
    // the access line (`RUST_LOG=warn`, as load.sh's `credproxy` target
    // runs: the line's callsite is then off, a cached check).
    let (header, gate, route, metrics, method, uri) =
        (&header, &gate, &route, &metrics, &method, &uri);
    for (name, line) in [("all", true), ("all_without_line", false)] {
        g.bench_function(name, |b| {
            b.to_async(&w.rt).iter_batched(
                || (request.clone(), answer.clone()),
                |(mut req, mut ans)| async move {
                    let started = Instant::now();
                    let hash = req
                        .remove(header)
                        .map(|v| KeyHash::of(v.as_bytes().trim_ascii()))
                        .expect("key");
                    let from_proxy_auth = req.remove(http::header::PROXY_AUTHORIZATION);
                    let (slot, query) = spark_shape
                        .take_slot(&mut req, Some(SPARK_QUERY))
                        .expect("plain");
                    let keyed = sessions
                        .by_key_from(&hash, Some(client))
                        .await
                        .unwrap()
                        .unwrap();
                    let (session, grant) = (Arc::clone(&keyed.session), Arc::clone(&keyed.grant));
                    assert!(
                        session.provider == "spark"
                            && session.status
                                != credproxy::secrets::session::Status::ReauthorizationRequired
                    );
                    let limits = match &grant.scope {
                        Some(scope) => scope.limits_methods(),
                        None => false,
                    };
                    let now = credproxy::clock::now();
                    sessions.note_key_use(&grant, now);
                    sessions.note_use(&session, now);
                    assert!(!session.due(now, margin));
                    credproxy::proxy::forward::strip_hop_by_hop(&mut req);
                    let q =
                        session
                            .credentials
                            .inject(&mut req, query.as_deref(), &slot, SPARK_PATH);
                    let mut permit = gate
                        .acquire_by(&mut None, false, &session.id)
                        .await
                        .unwrap();
                    permit.sent();
                    let sent = Instant::now();
                    // (the upstream round trip)
                    let took = sent.elapsed();
                    route.upstream_latency(metrics, took);
                    session.credentials.scrub_response(&mut ans);
                    let verdict = credproxy::pacing::verdict(http::StatusCode::OK, &ans, false);
                    gate.answered(&permit, verdict);
                    drop(permit);
                    credproxy::proxy::forward::strip_hop_by_hop(&mut ans);
                    route.request(metrics, 200);
                    let head = started.elapsed();
                    if line {
                        access_line(
                            method,
                            uri,
                            200,
                            started,
                            head,
                            took.as_millis(),
                            &session.id,
                            &grant.key_id,
                        );
                    }
                    black_box((from_proxy_auth, limits, q, req, ans))
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
    drop(log_guard);
}

fn benches(c: &mut Criterion) {
    gate(c);
    extraction(c);
    let w = world();
    lookup(c, &w);
    injection(c, &w);
    whole(c, &w);
    upstream_pick(c, &w);
    upstream_roundtrip(c, &w);
    hop_by_hop(c);
    metrics(c);
    // Last: it installs the global log subscriber.
    extra(c, &w);
}

criterion_group!(hot_path, benches);
criterion_main!(hot_path);
