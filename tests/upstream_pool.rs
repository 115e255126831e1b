//! credproxy's upstream connections (`proxy/forward/`): kept-alive
//! connections are reused, concurrency bounds how many are opened, a
//! connection the upstream closed is never handed out again, the HTTP/1.1
//! request carries `Host` and an origin-form target, and credproxy's own
//! HTTP/1.1 client reads every framing an upstream may answer with (and
//! refuses broken ones with 502). Isolation between sessions on these
//! connections is tests/isolation.rs's.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use support::{client, url, Extra, World};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A world whose Spark provider sends its API calls to `up`.
async fn world_against(up: &Upstream) -> (World, credproxy::server::Running) {
    world_against_with(up, "").await
}

/// The same, with more lines in the Spark provider's table.
async fn world_against_with(
    up: &Upstream,
    spark_extra: &str,
) -> (World, credproxy::server::Running) {
    let w = World::new().await;
    let extra = Extra {
        spark: spark_extra.into(),
        ..Extra::default()
    };
    let srv = w.start_against_spark_api(&extra, up.addr).await;
    (w, srv)
}

#[tokio::test]
async fn kept_alive_connections_are_reused_and_bounded_by_concurrency() {
    let up = upstream(false).await;
    let (w, srv) = world_against(&up).await;
    let (_, key, _) = support::add_session(&srv, "spark", &w.spark).await;
    let c = client();
    for i in 0..20 {
        let r = c
            .get(url(srv.proxy_addr, &format!("/spark/v1/listings?n={i}")))
            .header("X-Credproxy-Session", &key)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "one client, one request at a time: one upstream connection"
    );
    // Eight at a time, five rounds: never more connections than requests in flight.
    for _ in 0..5 {
        let all = (0..8).map(|_| {
            let c = c.clone();
            let key = key.clone();
            let u = url(srv.proxy_addr, "/spark/v1/listings");
            async move {
                let r = c
                    .get(u)
                    .header("X-Credproxy-Session", &key)
                    .send()
                    .await
                    .expect("send");
                assert_eq!(r.status(), 200);
                r.bytes().await.expect("body");
            }
        });
        futures_util::future::join_all(all).await;
    }
    let opened = up.connections.load(Ordering::SeqCst);
    assert!(opened <= 9, "{opened} upstream connections for 8 at a time");
    let heads: Vec<String> = up
        .seen
        .lock()
        .expect("seen")
        .iter()
        .map(|(head, _)| head.clone())
        .collect();
    assert_eq!(heads.len(), 60);
    let host = format!("host: {}", up.addr);
    for head in &heads {
        assert!(
            head.starts_with("GET /api/v1/listings"),
            "origin-form target: {head}"
        );
        assert_eq!(
            head.lines()
                .filter(|l| l.to_ascii_lowercase() == host)
                .count(),
            1,
            "one Host naming the upstream: {head}"
        );
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn a_connection_the_upstream_closed_is_not_reused() {
    let up = upstream(true).await;
    let (w, srv) = world_against(&up).await;
    let (_, key, _) = support::add_session(&srv, "spark", &w.spark).await;
    let c = client();
    for _ in 0..10 {
        let r = c
            .get(url(srv.proxy_addr, "/spark/v1/listings"))
            .header("X-Credproxy-Session", &key)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "{:?}", support::error_code(&r));
        r.bytes().await.expect("body");
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 10);
    // The upstream closed each connection after its answer; no request
    // comes to find out. Within a few reap intervals none is left half-open.
    let port = up.addr.port();
    let mut left = close_wait_to(port);
    for _ in 0..100 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        left = close_wait_to(port);
    }
    assert_eq!(left, 0, "idle upstream connections left in CLOSE_WAIT");
    srv.shutdown().await;
}

/// Each request's head and body, as the upstream read them.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A raw HTTP/1.1 upstream that answers by path with canned bytes, as a
/// server might put them on the wire ([`scripted_answer`]); counts
/// connections and records each request's head and body. With
/// `close_every` it closes each connection after its first answer (without
/// saying so in a header, as an upstream's idle timeout would).
struct Upstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    seen: Seen,
}

/// An upstream that answers with an endless run of interim answers.
static PROCESSING_FLOOD: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let mut flood = b"HTTP/1.1 102 Processing\r\n\r\n".repeat(200_000);
    flood.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal");
    flood
});

/// The raw answer for a request path, and whether the connection closes after it.
fn scripted_answer(path: &str) -> (&'static [u8], bool) {
    match path {
        "/api/processing-flood" => (&PROCESSING_FLOOD, false),
        // A head and three bytes of a 100-byte body, then silence.
        "/api/stall" => (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\nabc",
            false,
        ),
        "/api/chunked" => (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: dropped\r\n\r\n",
            false,
        ),
        "/api/until-close" => (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nthe body ends when the connection does",
            true,
        ),
        "/api/interim" => (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nfinal",
            false,
        ),
        "/api/no-content" => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        "/api/head" => (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 50\r\n\r\n",
            false,
        ),
        "/api/both" => (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            true,
        ),
        "/api/close-header" => (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbye",
            true,
        ),
        "/api/garbage" => (b"HTTP/1.1 2x0 Nope\r\n\r\n", true),
        "/api/two-lengths" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!",
            true,
        ),
        "/api/plus-length" => (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: +2\r\n\r\nok",
            true,
        ),
        "/api/same-lengths" => (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2, 2\r\n\r\nok",
            false,
        ),
        "/api/short" => (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 10\r\n\r\nabc",
            true,
        ),
        "/api/bad-chunk" => (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            true,
        ),
        "/api/ok" => (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok",
            false,
        ),
        _ => (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 22\r\n\r\n{\"D\":{\"Success\":true}}",
            false,
        ),
    }
}

async fn upstream(close_every: bool) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let seen: Seen = Arc::default();
    let (count, log) = (Arc::clone(&connections), Arc::clone(&seen));
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (name, value) = l.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < length {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..length).collect();
                    let path = head
                        .split(' ')
                        .nth(1)
                        .unwrap_or("/")
                        .split('?')
                        .next()
                        .unwrap_or("/")
                        .to_owned();
                    log.lock().expect("seen").push((head, body));
                    let (answer, close) = scripted_answer(&path);
                    if sock.write_all(answer).await.is_err() || close || close_every {
                        return;
                    }
                }
            });
        }
    });
    Upstream {
        addr,
        connections,
        seen,
    }
}

#[tokio::test]
async fn every_framing_an_upstream_answers_with_is_read() {
    let up = upstream(false).await;
    let (w, srv) = world_against(&up).await;
    let (_, key, _) = support::add_session(&srv, "spark", &w.spark).await;
    let c = client();
    let get = |path: &str| {
        c.get(url(srv.proxy_addr, &format!("/spark{path}")))
            .header("X-Credproxy-Session", &key)
    };
    let text = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let length = r.headers().get("content-length").cloned();
        let trailer = r.headers().get("x-trailer").cloned();
        let body = r.text().await.expect("body");
        (status, length, trailer, body)
    };

    let (status, _, trailer, body) = text(get("/chunked").send().await.expect("send")).await;
    assert_eq!((status, body.as_str()), (200, "hello world"));
    assert!(trailer.is_none(), "trailers are not passed on as headers");
    let (status, _, _, body) = text(get("/interim").send().await.expect("send")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "final"),
        "1xx answers are skipped"
    );
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "chunked and interim answers kept one connection"
    );
    // 204 and HEAD: no body is waited for, and the connection ends with the
    // answer: a body the upstream sent anyway would be read as the next one.
    let (status, _, _, body) = text(get("/no-content").send().await.expect("send")).await;
    assert_eq!((status, body.as_str()), (204, ""));
    let (status, _, _, body) = text(get("/ok").send().await.expect("send")).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        2,
        "a new one after 204"
    );
    let r = c
        .head(url(srv.proxy_addr, "/spark/head"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "50");
    let (status, _, _, body) = text(get("/ok").send().await.expect("send")).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        3,
        "a new one after HEAD"
    );

    let (status, _, _, body) = text(get("/until-close").send().await.expect("send")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "the body ends when the connection does")
    );
    let (status, length, _, body) = text(get("/both").send().await.expect("send")).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_ne!(
        length.as_ref().map(|v| v.as_bytes()),
        Some(&b"100"[..]),
        "a length beside chunked is not passed on"
    );
    let (status, _, _, body) = text(get("/close-header").send().await.expect("send")).await;
    assert_eq!((status, body.as_str()), (200, "bye"));
    let before = up.connections.load(Ordering::SeqCst);
    let (status, _, _, _) = text(get("/ok").send().await.expect("send")).await;
    assert_eq!(status, 200);
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        before + 1,
        "after answers that end with the connection, a new one"
    );

    let (status, _, _, body) = text(get("/same-lengths").send().await.expect("send")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ok"),
        "one length, listed twice"
    );
    for broken in ["/garbage", "/two-lengths", "/plus-length"] {
        let r = get(broken).send().await.expect("send");
        assert_eq!(r.status(), 502, "{broken}");
        assert_eq!(
            support::error_code(&r).as_deref(),
            Some("upstream_unreachable"),
            "{broken}"
        );
    }
    // A body that breaks off midway reaches the client broken off, not complete.
    for broken in ["/short", "/bad-chunk"] {
        let outcome = match get(broken).send().await {
            Err(_) => None,
            Ok(r) => Some(r.bytes().await.map(|b| b.len())),
        };
        assert!(
            !matches!(outcome, Some(Ok(n)) if n == 10 || n == 5),
            "{broken}: {outcome:?}"
        );
    }

    // A small POST: the body goes with its length, in one piece.
    let r = c
        .post(url(srv.proxy_addr, "/spark/post"))
        .header("X-Credproxy-Session", &key)
        .body(r#"{"a":1}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let seen = up.seen.lock().expect("seen").clone();
    let (head, body) = seen.last().expect("the POST arrived");
    assert!(head.starts_with("POST /api/post HTTP/1.1\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("\r\ncontent-length: 7"),
        "{head}"
    );
    assert_eq!(body, br#"{"a":1}"#);
    srv.shutdown().await;
}

#[tokio::test]
async fn an_upstream_that_goes_silent_within_a_body_is_broken_off() {
    let up = upstream(false).await;
    let (w, srv) = world_against_with(&up, "request_timeout = \"1s\"").await;
    let (_, key, _) = support::add_session(&srv, "spark", &w.spark).await;
    let r = client()
        .get(url(srv.proxy_addr, "/spark/stall"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200, "the head came in time");
    // Without a bound the caller waits as long as the upstream stays silent.
    let body = tokio::time::timeout(std::time::Duration::from_secs(20), r.bytes())
        .await
        .expect("the body was broken off within request_timeout, not held");
    assert!(
        body.is_err(),
        "a body left short reaches the caller broken off"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn an_endless_run_of_interim_answers_is_refused() {
    let up = upstream(false).await;
    let (w, srv) = world_against(&up).await;
    let (_, key, _) = support::add_session(&srv, "spark", &w.spark).await;
    let r = client()
        .get(url(srv.proxy_addr, "/spark/processing-flood"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 502);
    assert_eq!(
        support::error_code(&r).as_deref(),
        Some("upstream_unreachable")
    );
    srv.shutdown().await;
}

/// Connections to `port` in CLOSE_WAIT (the peer closed, this side did
/// not), from the kernel's table.
fn close_wait_to(port: u16) -> usize {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return 0;
    };
    let remote = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[2].ends_with(&remote) && fields[3] == "08"
        })
        .count()
}
