//! Request bodies on their way upstream, over credproxy's own HTTP/1.1
//! client (`proxy/forward/h1.rs`): streamed bodies with their length or
//! chunked arrive intact; an upstream that answers before it has the whole
//! body (a 413) has its answer passed on at once, the upload stops and the
//! connection is not reused; an upstream that closes mid-upload is a 502;
//! a body the caller stops sending keeps its own answer (408, 413); and a
//! connection that carried a streamed body is reused by its session only.
//!
//! Most cases drive `Upstreams` directly against a raw upstream, which
//! decodes what it reads strictly (a chunked body chunk by chunk) and runs
//! on a thread of its own, so that it answers while the client is still
//! writing; a few go end to end through the server.

#[path = "support/bodies.rs"]
mod bodies;
mod support;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bodies::{expected, Frames};
use bytes::Bytes;
use credproxy::error::ProxyError;
use credproxy::proxy::forward::{Head, Outbound, UpBody, Upstreams};
use http::{HeaderMap, HeaderValue, Method, Response};
use http_body_util::{BodyExt, Limited};
use support::{add_session, client, error_code, url, Extra, World};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const MIB: usize = 1024 * 1024;

/// What the raw upstream read: a request's head and its body (decoded, if
/// it came chunked), and which connection (counted from 1) carried it.
#[derive(Clone)]
struct Seen {
    conn: usize,
    head: String,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A raw HTTP/1.1 upstream, on a thread of its own, that answers by path
/// (`/api/...`):
/// - `early`: a 413 as soon as the head is read, then nothing is read for
///   30 s (the connection stays open: nothing in the answer ends it);
/// - `early-close`: the same 413, then it closes;
/// - `close-mid`: reads 1 MiB of the body and closes without an answer;
/// - `close-after`: reads the whole body, answers 200 and closes, without
///   saying so (as an upstream's idle timeout would);
/// - anything else: reads the whole body, records it, and answers 200 with
///   `x-conn`, the connection's number.
///
/// Its sockets take 64 KiB at most into their receive buffers, so that an
/// upload it does not read soon fills them.
struct Raw {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Connections it has closed (their handler ended, the socket dropped),
    /// told as they close.
    closed: tokio::sync::watch::Receiver<usize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Raw {
    fn start() -> Raw {
        let (tx, rx) = std::sync::mpsc::channel();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (count, log) = (Arc::clone(&connections), Arc::clone(&seen));
        let (closes, closed) = tokio::sync::watch::channel(0usize);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let socket = TcpSocket::new_v4().expect("socket");
                socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
                socket
                    .bind("127.0.0.1:0".parse().expect("addr"))
                    .expect("bind");
                let listener = socket.listen(64).expect("listen");
                tx.send(listener.local_addr().expect("addr"))
                    .expect("send addr");
                while let Ok((sock, _)) = listener.accept().await {
                    let conn = count.fetch_add(1, Ordering::SeqCst) + 1;
                    let (log, closes) = (Arc::clone(&log), closes.clone());
                    tokio::spawn(async move {
                        serve(sock, conn, log).await;
                        closes.send_modify(|n| *n += 1);
                    });
                }
            });
        });
        Raw {
            addr: rx.recv().expect("the raw upstream's address"),
            connections,
            closed,
            seen,
        }
    }

    /// Waits until it has closed `n` connections, then lets this runtime's
    /// reactor take in the FINs (on loopback they are there once the
    /// socket is dropped).
    async fn closed(&self, n: usize) {
        let mut closed = self.closed.clone();
        tokio::time::timeout(Duration::from_secs(10), closed.wait_for(|&c| c >= n))
            .await
            .expect("the raw upstream closed its connection")
            .expect("the raw upstream runs");
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

/// Reads into `buf` until it holds `n` bytes; `None` at EOF.
async fn fill(sock: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Option<()> {
    let mut chunk = vec![0u8; 64 * 1024];
    while buf.len() < n {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    Some(())
}

/// Reads a CRLF-ended line off the front of `buf`.
async fn line(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 2);
            return Some(line);
        }
        let more = buf.len() + 1;
        fill(sock, buf, more).await?;
    }
}

/// Reads a chunked body strictly: sizes, data, the CRLF after each chunk,
/// the last chunk and the (empty) trailers. `None` if it breaks the coding.
async fn chunked(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let size = usize::from_str_radix(&line(sock, buf).await?, 16).ok()?;
        if size == 0 {
            return line(sock, buf).await?.is_empty().then_some(body);
        }
        fill(sock, buf, size + 2).await?;
        body.extend_from_slice(&buf[..size]);
        if &buf[size..size + 2] != b"\r\n" {
            return None;
        }
        buf.drain(..size + 2);
    }
}

async fn serve(mut sock: TcpStream, conn: usize, log: Arc<Mutex<Vec<Seen>>>) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let more = buf.len() + 1;
            if fill(&mut sock, &mut buf, more).await.is_none() {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        let too_large = format!(
            "HTTP/1.1 413 Payload Too Large\r\nx-conn: {conn}\r\ncontent-length: 9\r\n\r\ntoo large"
        );
        match path.as_str() {
            "/api/early" => {
                let _ = sock.write_all(too_large.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            "/api/early-close" => {
                let _ = sock.write_all(too_large.as_bytes()).await;
                return;
            }
            "/api/close-mid" => {
                let _ = fill(&mut sock, &mut buf, MIB).await;
                return;
            }
            _ => {}
        }
        let mut seen = Seen {
            conn,
            head,
            body: Vec::new(),
        };
        let body = if seen
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            chunked(&mut sock, &mut buf).await
        } else {
            let length: usize = seen
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            fill(&mut sock, &mut buf, length)
                .await
                .map(|()| buf.drain(..length).collect())
        };
        let Some(body) = body else {
            return;
        };
        seen.body = body;
        log.lock().expect("seen").push(seen);
        let answer = format!("HTTP/1.1 200 OK\r\nx-conn: {conn}\r\ncontent-length: 2\r\n\r\nok");
        if sock.write_all(answer.as_bytes()).await.is_err() || path == "/api/close-after" {
            return;
        }
    }
}

/// Spark's upstream clients, sending to `raw`, with a `request_timeout`
/// (30 s) far above what any case here may take.
fn upstreams(w: &World, raw: &Raw) -> Upstreams {
    let text = w
        .config_text(&Extra {
            spark: "request_timeout = \"30s\"".into(),
            ..Extra::default()
        })
        .replace(
            &format!("api_base = \"{}\"", w.spark.base_url()),
            &format!("api_base = \"http://{}/api\"", raw.addr),
        );
    let cfg = credproxy::config::Config::parse(&text, std::path::Path::new("t.toml"), |_| None)
        .expect("config");
    Upstreams::new(cfg.provider("spark").expect("spark"), 1).expect("upstreams")
}

fn head(method: Method, path: &str) -> Head {
    Head {
        method,
        uri: format!("/api{path}").parse().expect("uri"),
        headers: HeaderMap::new(),
    }
}

fn streamed(body: Frames) -> Outbound {
    Outbound::Streamed(body.boxed())
}

/// The answer's `x-conn` and its body.
async fn conn_of(resp: Result<Response<UpBody>, ProxyError>) -> (usize, Bytes) {
    let resp = resp.expect("an answer");
    assert_eq!(resp.status(), 200);
    let conn = resp
        .headers()
        .get("x-conn")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("x-conn");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (conn, body)
}

/// The error a request ended with.
fn refused(resp: Result<Response<UpBody>, ProxyError>) -> ProxyError {
    match resp {
        Ok(resp) => panic!("an answer came: {}", resp.status()),
        Err(e) => e,
    }
}

#[tokio::test]
async fn streamed_bodies_arrive_intact_with_their_length_or_chunked() {
    let raw = Raw::start();
    let w = World::new().await;
    let ups = upstreams(&w, &raw);
    let up = ups.here();
    let n = 3 * MIB + 17;

    // Its size known: a Content-Length.
    conn_of(
        up.send(
            Cow::Owned(head(Method::PUT, "/sized")),
            streamed(Frames::new(n, true)),
            "s",
        )
        .await,
    )
    .await;
    // Unknown: chunked, a chunk per frame, the empty frames skipped.
    conn_of(
        up.send(
            Cow::Owned(head(Method::PUT, "/chunked")),
            streamed(Frames::new(n, false)),
            "s",
        )
        .await,
    )
    .await;
    // Unknown to the body, but the caller said (a body partly read before
    // it was streamed): the caller's Content-Length.
    let mut said = head(Method::PUT, "/said");
    said.headers.insert("content-length", HeaderValue::from(n));
    conn_of(
        up.send(Cow::Owned(said), streamed(Frames::new(n, false)), "s")
            .await,
    )
    .await;
    // In memory, over 64 KiB: written after the head.
    let kept = Outbound::Kept(expected(n).into());
    conn_of(
        up.send(Cow::Owned(head(Method::PUT, "/kept")), kept, "s")
            .await,
    )
    .await;

    let seen = raw.seen();
    assert_eq!(seen.len(), 4);
    let length = n.to_string();
    for (s, path, cl, te) in [
        (&seen[0], "/api/sized", Some(length.as_str()), None),
        (&seen[1], "/api/chunked", None, Some("chunked")),
        (&seen[2], "/api/said", Some(length.as_str()), None),
        (&seen[3], "/api/kept", Some(length.as_str()), None),
    ] {
        assert!(
            s.head.starts_with(&format!("PUT {path} HTTP/1.1\r\n")),
            "{}",
            s.head
        );
        assert_eq!(s.header("content-length"), cl, "{path}");
        assert_eq!(s.header("transfer-encoding"), te, "{path}");
        assert_eq!(s.body.len(), n, "{path}");
        assert!(s.body == expected(n), "{path}: the body arrived altered");
        assert_eq!(
            s.conn, 1,
            "{path}: the connection went back to the pool once its request was sent"
        );
    }
}

#[tokio::test]
async fn an_early_answer_comes_back_at_once_and_the_upload_stops() {
    let raw = Raw::start();
    let w = World::new().await;
    let ups = upstreams(&w, &raw);
    let up = ups.here();
    for path in ["/early", "/early-close"] {
        let body = Frames::new(16 * MIB, true);
        let pulled = body.pulled();
        let started = Instant::now();
        let resp = up
            .send(Cow::Owned(head(Method::PUT, path)), streamed(body), "s")
            .await
            .expect("the early answer");
        let took = started.elapsed();
        assert_eq!(resp.status(), 413, "{path}");
        assert!(
            took < Duration::from_secs(5),
            "{path}: the 413 took {took:?}"
        );
        let text = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&text[..], b"too large", "{path}");
        let sent = pulled.load(Ordering::SeqCst);
        assert!(
            sent < 16 * MIB,
            "{path}: the upload went on after the answer ({sent} bytes taken)"
        );
        // Its connection is not reused: the session's next request opens
        // one (the upstream is still reading the first one's request).
        let before = raw.connections.load(Ordering::SeqCst);
        let (conn, _) = conn_of(
            up.send(
                Cow::Owned(head(Method::GET, "/next")),
                Outbound::Kept(Bytes::new()),
                "s",
            )
            .await,
        )
        .await;
        assert_eq!(
            conn,
            before + 1,
            "{path}: a new connection after an early answer"
        );
    }
}

#[tokio::test]
async fn an_upstream_that_closes_mid_upload_is_unreachable_and_the_upload_stops() {
    let raw = Raw::start();
    let w = World::new().await;
    let ups = upstreams(&w, &raw);
    let up = ups.here();
    for sized in [true, false] {
        let body = Frames::new(16 * MIB, sized);
        let pulled = body.pulled();
        let started = Instant::now();
        let err = refused(
            up.send(
                Cow::Owned(head(Method::PUT, "/close-mid")),
                streamed(body),
                "s",
            )
            .await,
        );
        assert_eq!(
            err.code(),
            "upstream_unreachable",
            "sized: {sized}: {err:?}"
        );
        let cause = err.failure().map(|f| f.cause.as_str());
        assert!(
            matches!(cause, Some("closed" | "reset")),
            "sized: {sized}: {cause:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "sized: {sized}");
        assert!(pulled.load(Ordering::SeqCst) < 16 * MIB, "sized: {sized}");
    }
    // A PUT is not sent again on a new connection: one for each.
    assert_eq!(raw.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_body_the_caller_stops_sending_keeps_its_answer_and_ends_its_connection() {
    let raw = Raw::start();
    let w = World::new().await;
    let ups = upstreams(&w, &raw);
    let up = ups.here();
    let (first, _) = conn_of(
        up.send(
            Cow::Owned(head(Method::GET, "/first")),
            Outbound::Kept(Bytes::new()),
            "s",
        )
        .await,
    )
    .await;
    // Over the provider's limit (as `Limited` cuts a chunked body off): 413.
    let over = Limited::new(Frames::new(MIB, false), 100_000);
    let err = refused(
        up.send(
            Cow::Owned(head(Method::PUT, "/over")),
            Outbound::Streamed(BodyExt::boxed(over.map_err(Into::into))),
            "s",
        )
        .await,
    );
    assert_eq!(err.code(), "body_too_large", "{err:?}");
    // Silent for the body-read timeout: 408.
    let stalled = credproxy::proxy::silence::Silence::request(
        Frames::stalling(MIB, 200_000),
        Duration::from_millis(300),
    );
    let err = refused(
        up.send(
            Cow::Owned(head(Method::PUT, "/stalled")),
            Outbound::Streamed(BodyExt::boxed(stalled)),
            "s",
        )
        .await,
    );
    assert_eq!(err.code(), "request_timeout", "{err:?}");
    // Neither connection, their requests left unfinished, is reused.
    let (next, _) = conn_of(
        up.send(
            Cow::Owned(head(Method::GET, "/next")),
            Outbound::Kept(Bytes::new()),
            "s",
        )
        .await,
    )
    .await;
    assert_eq!(first, 1);
    assert_eq!(next, 3, "the first went to the 413, the second to the 408");
    assert!(
        raw.seen()
            .iter()
            .all(|s| !s.head.contains("/over") && !s.head.contains("/stalled")),
        "no broken-off body was taken for a whole one"
    );
}

#[tokio::test]
async fn a_streamed_body_connection_is_reused_by_its_session_and_never_by_another() {
    let raw = Raw::start();
    let w = World::new().await;
    let ups = upstreams(&w, &raw);
    let up = ups.here();
    let send = |session: &'static str, body: Outbound| {
        up.send(Cow::Owned(head(Method::POST, "/x")), body, session)
    };
    let (a, _) = conn_of(send("a", streamed(Frames::new(200_000, true))).await).await;
    let (a2, _) = conn_of(send("a", streamed(Frames::new(300_000, false))).await).await;
    assert_eq!(a2, a, "A's streamed-body connection, again for A");
    let (b, _) = conn_of(send("b", streamed(Frames::new(100, false))).await).await;
    assert_ne!(b, a, "never A's for B");
    let (b2, _) = conn_of(send("b", Outbound::Kept(expected(70_000).into())).await).await;
    assert_eq!(b2, b);
    let (a3, _) = conn_of(send("a", Outbound::Kept(Bytes::new())).await).await;
    assert_eq!(a3, a);
    // Both at once: each on its own.
    let (x, y) = tokio::join!(
        send("a", streamed(Frames::new(500_000, false))),
        send("b", streamed(Frames::new(500_000, true))),
    );
    let ((x, _), (y, _)) = (conn_of(x).await, conn_of(y).await);
    assert_eq!((x, y), (a, b));
    assert_eq!(raw.connections.load(Ordering::SeqCst), 2);
}

/// A streamed body is never sent twice, so it must not be sent on a
/// connection the upstream has closed: one closed after its answer is seen
/// closed at checkout, and every upload gets through on a new one. (A
/// close still on its way when the next request leaves cannot be seen: as
/// for a PUT with its body in memory, that request gets a 502.)
#[tokio::test]
async fn streamed_bodies_do_not_go_on_connections_the_upstream_closed() {
    let raw = Raw::start();
    let w = World::new().await;
    let ups = upstreams(&w, &raw);
    let up = ups.here();
    for i in 0..20 {
        // The close arrives.
        raw.closed(i).await;
        let body = streamed(Frames::new(100_000, i % 2 == 0));
        let (conn, _) = conn_of(
            up.send(Cow::Owned(head(Method::PUT, "/close-after")), body, "s")
                .await,
        )
        .await;
        assert_eq!(conn, i + 1, "upload {i}");
    }
}

// ---------------------------------------------------------------------------
// End to end, through the server.

/// Sends `head` and then `len` bytes of body from a task of its own, and
/// reads the answer meanwhile: what arrived by the time the head of an
/// answer did (or the connection ended), and when.
async fn upload_raw(addr: SocketAddr, head: String, len: usize) -> (String, Duration) {
    let sock = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = sock.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        let piece = vec![b'u'; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(piece.len());
            wr.write_all(&piece[..n]).await?;
            left -= n;
        }
        Ok::<_, std::io::Error>(wr)
    });
    let mut answer = Vec::new();
    let mut chunk = [0u8; 8192];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(20), rd.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no answer within 20 s"),
        }
    }
    let took = started.elapsed();
    writer.abort();
    (String::from_utf8_lossy(&answer).into_owned(), took)
}

#[tokio::test]
async fn callers_get_an_early_answer_or_a_502_while_still_uploading() {
    let raw = Raw::start();
    let w = World::new().await;
    let srv = w
        .start_against_spark_api(
            &Extra {
                spark: "request_timeout = \"30s\"".into(),
                ..Extra::default()
            },
            raw.addr,
        )
        .await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    for (path, status) in [("early", "413"), ("close-mid", "502")] {
        let head = format!(
            "PUT /spark/{path} HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {key}\r\n\
             Content-Length: {}\r\n\r\n",
            16 * MIB
        );
        let (answer, took) = upload_raw(srv.proxy_addr, head, 16 * MIB).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{path}: {answer:?}"
        );
        assert!(
            took < Duration::from_secs(10),
            "{path}: answered after {took:?}"
        );
        if status == "502" {
            assert!(
                answer
                    .to_ascii_lowercase()
                    .contains("x-credproxy-error: upstream_unreachable"),
                "{answer:?}"
            );
        }
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn a_chunked_upload_of_unknown_length_arrives_intact_at_the_stand_in() {
    let w = World::new().await;
    let srv = w
        .start(&Extra {
            spark: "max_replay_body = 1024\nmax_request_body = 8388608".into(),
            ..Extra::default()
        })
        .await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let c = client();
    let n = 5 * MIB + 3;
    let want = expected(n);
    let digest: String = <sha2::Sha256 as sha2::Digest>::digest(&want)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    // Unknown length: frames of odd sizes, empty ones among them.
    let pieces: Vec<Vec<u8>> = {
        let mut pieces = Vec::new();
        let mut at = 0;
        for size in [1usize, 0, 70_000, 5, 0, 1 << 20].iter().cycle() {
            if at == n {
                break;
            }
            let size = (*size).min(n - at);
            pieces.push(want[at..at + size].to_vec());
            at += size;
        }
        pieces
    };
    let stream = tokio_stream::iter(pieces.into_iter().map(Ok::<_, std::io::Error>));
    let r = c
        .post(url(srv.proxy_addr, "/spark/upload"))
        .header("X-Credproxy-Session", &key)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let answer: serde_json::Value = r.json().await.expect("json");
    assert_eq!(answer["len"], n as u64);
    assert_eq!(answer["sha256"], digest.as_str());
    let rec = w.spark.requests().into_iter().last().expect("recorded");
    assert_eq!(rec.header("transfer-encoding"), Some("chunked"));
    assert_eq!(rec.header("content-length"), None);

    // Its length said: under a Content-Length.
    let r = c
        .post(url(srv.proxy_addr, "/spark/upload"))
        .header("X-Credproxy-Session", &key)
        .body(want.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let answer: serde_json::Value = r.json().await.expect("json");
    assert_eq!(answer["len"], n as u64);
    assert_eq!(answer["sha256"], digest.as_str());
    let rec = w.spark.requests().into_iter().last().expect("recorded");
    assert_eq!(rec.header("content-length"), Some(n.to_string().as_str()));
    assert_eq!(rec.header("transfer-encoding"), None);

    // Over `max_request_body` (8 MiB), of unknown length: cut off, 413. Just
    // over, so that the caller has sent it all when the answer comes.
    let big = vec![b'b'; 8 * MIB + 100];
    let stream = tokio_stream::iter(
        big.chunks(64 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = c
        .post(url(srv.proxy_addr, "/spark/upload"))
        .header("X-Credproxy-Session", &key)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("an answer");
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(&r).as_deref(), Some("body_too_large"));
    srv.shutdown().await;
}
