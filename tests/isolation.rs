//! Isolation between sessions on shared upstream connections (issue 21,
//! ARCHITECTURE.md "a kept-alive upstream connection is reused only by the
//! session it was opened for").
//!
//! A raw upstream answers each request by a plan: interim answers, every
//! framing, a body after a bodiless answer, stray bytes after a body (at
//! once, or held back until the next request on the connection, where no
//! check can see them coming), early closes, answers before the request's
//! body was read. Every answer and every stray
//! byte is tagged with the session whose request it follows; a caller must
//! only ever receive its own session's tags.
//!
//! - end to end, through the real server: method overrides only on POST,
//!   and each way an upstream can send more than its framing says, for
//!   requests whose body is in memory and for streamed ones (both over
//!   credproxy's own HTTP/1.1 client);
//! - a property test that drives the upstream client directly with
//!   generated plans and request bodies (none, kept, over 64 KiB, streamed
//!   with a length or chunked) interleaved across two sessions, in turn
//!   and at once.

#[path = "support/bodies.rs"]
mod bodies;
mod support;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use credproxy::proxy::forward::{Head, Outbound, Upstreams};
use http_body_util::BodyExt;
use proptest::prelude::*;
use support::{client, url, Extra, World};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length,
    Chunked,
    UntilClose,
    /// 204 No Content.
    NoContent,
    /// 304 Not Modified.
    NotModified,
    /// The answer to a HEAD: a `Content-Length` and no body.
    Head,
}

/// Bytes an upstream sends beyond an answer's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stray {
    None,
    /// Written right after the answer.
    AtOnce,
    /// Held back until the next request arrives on the connection, then
    /// written before its answer: no readiness check can see these.
    Deferred,
}

/// How the raw upstream answers one request.
#[derive(Debug, Clone)]
struct Plan {
    interim: usize,
    framing: Framing,
    body_len: usize,
    /// For bodiless answers (204, 304, HEAD): a body anyway, one that
    /// looks like a complete answer (a HEAD that the upstream took for a
    /// GET, say, through a method override).
    body_anyway: bool,
    stray: Stray,
    /// Head and body in two writes, with a pause between.
    split: bool,
    /// Close the connection after the head (a body left short).
    close_after_head: bool,
    /// Answer as soon as the request's head is read, and read its body
    /// after the answer.
    early: bool,
}

impl Plan {
    fn plain() -> Plan {
        Plan {
            interim: 0,
            framing: Framing::Length,
            body_len: 24,
            body_anyway: false,
            stray: Stray::None,
            split: false,
            close_after_head: false,
            early: false,
        }
    }
}

/// A complete answer tagged with `tag`: what a stray or unwanted body
/// looks like, so that misreading it as an answer is seen.
fn forged_answer(tag: &str) -> Vec<u8> {
    let body = tag.repeat(4);
    format!(
        "HTTP/1.1 200 OK\r\nx-for: {tag}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The raw upstream: answers by the plan whose index is the request path's
/// last segment; tags with the request's `x-tag` header, or else with a
/// hash of its `Authorization` (the injected token names the session).
#[derive(Clone)]
struct Raw {
    addr: SocketAddr,
    plans: Arc<Mutex<Vec<Plan>>>,
}

impl Raw {
    async fn start() -> Raw {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let plans: Arc<Mutex<Vec<Plan>>> = Arc::default();
        let shared = Arc::clone(&plans);
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, Arc::clone(&shared)));
            }
        });
        Raw { addr, plans }
    }

    /// Registers a plan; the request path ends with the returned number.
    fn plan(&self, plan: Plan) -> usize {
        let mut plans = self.plans.lock().expect("plans");
        plans.push(plan);
        plans.len() - 1
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn tag_of(head: &str) -> String {
    if let Some(tag) = header(head, "x-tag") {
        return tag.to_owned();
    }
    let auth = header(head, "authorization").unwrap_or("");
    // FNV-1a: a short, stable tag per token, never the token itself.
    let hash = auth.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{:08x}", hash as u32)
}

/// Reads one request's head from `sock`; `None` at EOF.
async fn read_head(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end + 4);
    Some(head)
}

/// Reads the body of the request whose head is `head`; `None` at EOF.
async fn read_body(sock: &mut TcpStream, buf: &mut Vec<u8>, head: &str) -> Option<()> {
    let mut chunk = [0u8; 8192];
    let chunked = header(head, "transfer-encoding").is_some_and(|v| v.contains("chunked"));
    if chunked {
        loop {
            if let Some(end) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                buf.drain(..end + 5);
                break;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    } else {
        let length: usize = header(head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < length {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..length);
    }
    Some(())
}

async fn serve(mut sock: TcpStream, plans: Arc<Mutex<Vec<Plan>>>) {
    let mut buf = Vec::new();
    let mut deferred: Option<Vec<u8>> = None;
    while let Some(head) = read_head(&mut sock, &mut buf).await {
        let tag = tag_of(&head);
        let index: usize = head
            .split(' ')
            .nth(1)
            .and_then(|p| p.split('?').next())
            .and_then(|p| p.rsplit('/').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(usize::MAX);
        let plan = plans
            .lock()
            .expect("plans")
            .get(index)
            .cloned()
            .unwrap_or_else(Plan::plain);
        if !plan.early && read_body(&mut sock, &mut buf, &head).await.is_none() {
            return;
        }
        if let Some(stray) = deferred.take() {
            if sock.write_all(&stray).await.is_err() {
                return;
            }
        }
        let mut out = Vec::new();
        for _ in 0..plan.interim {
            out.extend_from_slice(b"HTTP/1.1 102 Processing\r\n\r\n");
        }
        let body = tag
            .repeat(plan.body_len / tag.len().max(1) + 1)
            .into_bytes();
        let body = &body[..plan.body_len];
        let unwanted = forged_answer(&tag);
        let (status, rest): (String, Vec<u8>) = match plan.framing {
            Framing::Length => (
                format!("200 OK\r\ncontent-length: {}", body.len()),
                body.to_vec(),
            ),
            Framing::Chunked => {
                let mut chunks = Vec::new();
                for piece in body.chunks(7) {
                    chunks.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                    chunks.extend_from_slice(piece);
                    chunks.extend_from_slice(b"\r\n");
                }
                chunks.extend_from_slice(b"0\r\n\r\n");
                ("200 OK\r\ntransfer-encoding: chunked".to_owned(), chunks)
            }
            Framing::UntilClose => ("200 OK".to_owned(), body.to_vec()),
            Framing::NoContent | Framing::NotModified | Framing::Head => {
                let status = match plan.framing {
                    Framing::NoContent => "204 No Content",
                    Framing::NotModified => "304 Not Modified",
                    _ => "200 OK",
                };
                let length = if plan.framing == Framing::Head || plan.body_anyway {
                    format!("\r\ncontent-length: {}", unwanted.len())
                } else {
                    String::new()
                };
                let rest = if plan.body_anyway {
                    unwanted.clone()
                } else {
                    Vec::new()
                };
                (format!("{status}{length}"), rest)
            }
        };
        out.extend_from_slice(format!("HTTP/1.1 {status}\r\nx-for: {tag}\r\n\r\n").as_bytes());
        if plan.split || plan.close_after_head {
            if sock.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
            if plan.close_after_head {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        out.extend_from_slice(&rest);
        match plan.stray {
            Stray::AtOnce => out.extend_from_slice(&unwanted),
            Stray::Deferred => deferred = Some(unwanted),
            Stray::None => {}
        }
        if sock.write_all(&out).await.is_err() || plan.framing == Framing::UntilClose {
            return;
        }
        if plan.early && read_body(&mut sock, &mut buf, &head).await.is_none() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// End to end, through the real server.

async fn world_against(raw: &Raw, spark_extra: &str) -> (World, credproxy::server::Running) {
    let w = World::new().await;
    let extra = Extra {
        server: "worker_threads = 1".into(),
        spark: spark_extra.into(),
        ..Extra::default()
    };
    let srv = w.start_against_spark_api(&extra, raw.addr).await;
    (w, srv)
}

#[tokio::test]
async fn method_overrides_are_accepted_only_on_post_and_never_to_head() {
    let raw = Raw::start().await;
    let (w, srv) = world_against(&raw, "").await;
    let (_, key, _) = support::add_session(&srv, "spark", &w.spark).await;
    let c = client();
    let send = |method: &str, path: &str, header: Option<(&str, &str)>| {
        let mut r = c
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
                url(srv.proxy_addr, path),
            )
            .header("X-Credproxy-Session", &key);
        if let Some((name, value)) = header {
            r = r.header(name, value);
        }
        r.send()
    };
    let overrides: Vec<(&str, Option<(&str, &str)>)> = vec![
        ("/spark/v1/x", Some(("X-HTTP-Method-Override", "GET"))),
        ("/spark/v1/x", Some(("X-HTTP-Method", "GET"))),
        ("/spark/v1/x", Some(("X-Method-Override", "DELETE"))),
        ("/spark/v1/x?_method=GET", None),
        ("/spark/v1/x?a=1&%5Fmethod=PUT", None),
    ];
    for method in ["GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        for (path, header) in &overrides {
            let r = send(method, path, *header).await.expect("send");
            assert_eq!(r.status(), 400, "{method} {path} {header:?}");
            assert_eq!(
                support::error_code(&r).as_deref(),
                Some("bad_request"),
                "{method} {path} {header:?}"
            );
        }
    }
    // On POST an override goes through, unless it names HEAD (or TRACE,
    // TRACK, CONNECT), in any spelling.
    for (path, header) in &overrides {
        let r = send("POST", path, *header).await.expect("send");
        assert_eq!(r.status(), 200, "POST {path} {header:?}");
    }
    for (path, header) in [
        ("/spark/v1/x", Some(("X-HTTP-Method-Override", "HEAD"))),
        ("/spark/v1/x", Some(("X-HTTP-Method-Override", " head "))),
        ("/spark/v1/x", Some(("X-Method-Override", "%48EAD"))),
        ("/spark/v1/x?_method=Head", None),
        ("/spark/v1/x", Some(("X-HTTP-Method", "TRACE"))),
    ] {
        let r = send("POST", path, header).await.expect("send");
        assert_eq!(r.status(), 400, "POST {path} {header:?}");
    }
    // CGI, PHP and WSGI servers read `_` for `-` in header names.
    for method in ["GET", "HEAD"] {
        let r = send(
            method,
            "/spark/v1/x",
            Some(("X_HTTP_METHOD_OVERRIDE", "GET")),
        )
        .await
        .expect("send");
        assert_eq!(r.status(), 400, "{method} with X_HTTP_METHOD_OVERRIDE");
    }
    let r = send(
        "POST",
        "/spark/v1/x",
        Some(("X_HTTP_METHOD_OVERRIDE", "HEAD")),
    )
    .await
    .expect("send");
    assert_eq!(r.status(), 400, "POST with X_HTTP_METHOD_OVERRIDE: HEAD");
    // Rails and Laravel read `_method` from a form body too.
    for body in ["_method=HEAD", "a=1&%5Fmethod=head"] {
        let r = c
            .post(url(srv.proxy_addr, "/spark/v1/x"))
            .header("X-Credproxy-Session", &key)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "form body {body}");
    }
    let r = c
        .post(url(srv.proxy_addr, "/spark/v1/x"))
        .header("X-Credproxy-Session", &key)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("_method=PUT&a=1")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200, "a form override to PUT goes through");
    srv.shutdown().await;
}

/// What a caller received: the `x-for` tag of the answer's head and its body.
async fn tagged(r: reqwest::Response) -> (u16, Option<String>, Result<Bytes, String>) {
    let status = r.status().as_u16();
    let tag = r
        .headers()
        .get("x-for")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let body = r.bytes().await.map_err(|e| e.to_string());
    (status, tag, body)
}

/// Session A's request makes the upstream send more than its framing says;
/// session B's next request, on the same worker, gets B's answer only.
/// Both kinds of request body: kept in memory, and streamed (a body over
/// `max_replay_body`, here 16 bytes).
#[tokio::test]
async fn bytes_beyond_an_answers_framing_never_reach_another_session() {
    let raw = Raw::start().await;
    let (w, srv) = world_against(&raw, "max_replay_body = 16").await;
    let (_, key_a, _) = support::add_session(&srv, "spark", &w.spark).await;
    let (_, key_b, _) = support::add_session(&srv, "spark", &w.spark).await;
    let c = client();
    let send = |key: &str, method: reqwest::Method, n: usize, big: bool| {
        let r = c
            .request(method, url(srv.proxy_addr, &format!("/spark/v1/{n}")))
            .header("X-Credproxy-Session", key);
        let r = if big { r.body(vec![b'x'; 100]) } else { r };
        r.send()
    };
    // The tags the upstream gives each session.
    let (_, Some(tag_a), _) = tagged(
        send(&key_a, reqwest::Method::GET, 999, false)
            .await
            .expect("a"),
    )
    .await
    else {
        panic!("no tag for A")
    };
    let (_, Some(tag_b), _) = tagged(
        send(&key_b, reqwest::Method::GET, 999, false)
            .await
            .expect("b"),
    )
    .await
    else {
        panic!("no tag for B")
    };
    assert_ne!(tag_a, tag_b);

    let cases: Vec<(&str, Plan)> = vec![
        (
            "stray bytes right after a length body",
            Plan {
                stray: Stray::AtOnce,
                ..Plan::plain()
            },
        ),
        (
            "stray bytes held back until the next request",
            Plan {
                stray: Stray::Deferred,
                ..Plan::plain()
            },
        ),
        (
            "stray bytes after a chunked body, held back",
            Plan {
                framing: Framing::Chunked,
                stray: Stray::Deferred,
                ..Plan::plain()
            },
        ),
        (
            "a body after 204",
            Plan {
                framing: Framing::NoContent,
                body_anyway: true,
                ..Plan::plain()
            },
        ),
        (
            "a body after 204, written later",
            Plan {
                framing: Framing::NoContent,
                body_anyway: true,
                split: true,
                ..Plan::plain()
            },
        ),
        (
            "a body after 304",
            Plan {
                framing: Framing::NotModified,
                body_anyway: true,
                ..Plan::plain()
            },
        ),
        (
            "a HEAD answered as a GET",
            Plan {
                framing: Framing::Head,
                body_anyway: true,
                split: true,
                ..Plan::plain()
            },
        ),
    ];
    for big in [false, true] {
        for (what, plan) in &cases {
            let head = plan.framing == Framing::Head;
            let n = raw.plan(plan.clone());
            let method = if head {
                reqwest::Method::HEAD
            } else if big {
                reqwest::Method::POST
            } else {
                reqwest::Method::GET
            };
            let (_, tag, _) = tagged(send(&key_a, method, n, big && !head).await.expect("a")).await;
            assert_eq!(
                tag.as_deref(),
                Some(tag_a.as_str()),
                "{what}: A's own answer"
            );
            // B, three times: on whatever connection the pool offers.
            for _ in 0..3 {
                let method = if big {
                    reqwest::Method::POST
                } else {
                    reqwest::Method::GET
                };
                let (status, tag, body) =
                    tagged(send(&key_b, method, 999, big).await.expect("b")).await;
                let body = body.unwrap_or_default();
                assert_eq!(
                    (status, tag.as_deref()),
                    (200, Some(tag_b.as_str())),
                    "{what} (big body: {big}): B got {:?}",
                    String::from_utf8_lossy(&body)
                );
                assert!(
                    !String::from_utf8_lossy(&body).contains(&tag_a),
                    "{what} (big body: {big}): A's bytes reached B"
                );
            }
        }
    }
    srv.shutdown().await;
}

/// Within one session too, bytes past an answer's end that credproxy can
/// see are never read as the next answer: credproxy's client drops a
/// connection with bytes left over, whatever the request's body (kept, or
/// streamed: here over `max_replay_body`). Bytes held back until the next
/// request on the connection cannot be seen, for either body: they can
/// only reach the session that caused them (ARCHITECTURE.md, isolation).
#[tokio::test]
async fn stray_bytes_that_can_be_seen_never_become_the_next_answer() {
    let raw = Raw::start().await;
    let (w, srv) = world_against(&raw, "max_replay_body = 16").await;
    let (_, key, _) = support::add_session(&srv, "spark", &w.spark).await;
    let c = client();
    let send = |n: usize, big: bool| {
        let r = c
            .post(url(srv.proxy_addr, &format!("/spark/v1/{n}")))
            .header("X-Credproxy-Session", &key);
        let r = if big { r.body(vec![b'x'; 100]) } else { r };
        r.send()
    };
    let plain = Plan::plain();
    for (big, stray) in [(false, Stray::AtOnce), (true, Stray::AtOnce)] {
        let n = raw.plan(Plan {
            stray,
            ..Plan::plain()
        });
        let (status, _, _) = tagged(send(n, big).await.expect("send")).await;
        assert_eq!(status, 200);
        for _ in 0..2 {
            let (status, _, body) = tagged(send(999, big).await.expect("send")).await;
            let body = body.expect("body");
            assert_eq!(
                (status, body.len()),
                (200, plain.body_len),
                "big body: {big}, {stray:?}: the next answer is its own, not the stray one"
            );
        }
    }
    srv.shutdown().await;
}

/// A token endpoint that answers each refresh and then, when the next
/// request arrives on the same connection, first writes a copy of that
/// answer (a buggy server's stray bytes, holding the previous session's new
/// tokens). Tokens are `AT-<refresh token>` / `RT2-<refresh token>`.
async fn stray_token_endpoint() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let mut deferred: Option<Vec<u8>> = None;
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
                    let length: usize = header(&head, "content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    while buf.len() < length {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = String::from_utf8_lossy(&buf[..length]).into_owned();
                    buf.drain(..length);
                    let rt = body
                        .split("\"refresh_token\":\"")
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                        .unwrap_or("none")
                        .to_owned();
                    let json = format!(
                        r#"{{"access_token":"AT-{rt}","refresh_token":"RT2-{rt}","expires_in":3600}}"#
                    );
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
                        json.len()
                    )
                    .into_bytes();
                    if let Some(stray) = deferred.replace(answer.clone()) {
                        if sock.write_all(&stray).await.is_err() {
                            return;
                        }
                    }
                    if sock.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The tag the raw upstream gives a request carrying `authorization`.
fn tag_for(authorization: &str) -> String {
    tag_of(&format!("GET / HTTP/1.1\r\nauthorization: {authorization}"))
}

/// The token endpoint is shared by every session too: a stray copy of one
/// session's refresh answer must never become another session's tokens.
#[tokio::test]
async fn a_token_endpoints_stray_bytes_never_give_one_session_anothers_tokens() {
    let raw = Raw::start().await;
    let token = stray_token_endpoint().await;
    let w = World::new().await;
    let extra = Extra {
        server: "worker_threads = 1".into(),
        ..Extra::default()
    };
    let text = w
        .config_text(&extra)
        .replace(
            &format!("api_base = \"{}\"", w.spark.base_url()),
            &format!("api_base = \"http://{}/api\"", raw.addr),
        )
        .replace(
            &format!("token_url = \"{}\"", w.spark.token_url()),
            &format!("token_url = \"http://{token}/v1/oauth2/grant\""),
        );
    let cfg = credproxy::config::Config::parse(&text, std::path::Path::new("t.toml"), |_| None)
        .expect("config");
    let srv = credproxy::server::start(cfg).await.expect("start");
    let mut keys = Vec::new();
    for rt in ["rt-a", "rt-b", "rt-c"] {
        let tokens = credproxy_standins::Tokens {
            access_token: format!("old-{rt}"),
            refresh_token: rt.to_owned(),
            expires_in: Some(0),
        };
        // Expired at once: the first request refreshes.
        let (_, key) = support::add_tokens(&srv, "spark", &tokens, Some(0)).await;
        keys.push((rt, key));
    }
    let c = client();
    for (rt, key) in &keys {
        let r = c
            .get(url(srv.proxy_addr, "/spark/v1/999"))
            .header("X-Credproxy-Session", key)
            .send()
            .await
            .expect("send");
        let (status, tag, _) = tagged(r).await;
        assert_eq!(status, 200, "{rt}");
        assert_eq!(
            tag.as_deref(),
            Some(tag_for(&format!("OAuth AT-{rt}")).as_str()),
            "session {rt} is using another session's tokens"
        );
    }
    srv.shutdown().await;
}

// ---------------------------------------------------------------------------
// The property: generated upstream byte streams, two sessions.

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![
        4 => Just(Framing::Length),
        2 => Just(Framing::Chunked),
        1 => Just(Framing::UntilClose),
        1 => Just(Framing::NoContent),
        1 => Just(Framing::NotModified),
        1 => Just(Framing::Head),
    ]
}

fn stray() -> impl Strategy<Value = Stray> {
    prop_oneof![
        3 => Just(Stray::None),
        1 => Just(Stray::AtOnce),
        2 => Just(Stray::Deferred),
    ]
}

fn plan() -> impl Strategy<Value = Plan> {
    (
        prop_oneof![8 => 0usize..3, 1 => 30usize..40],
        framing(),
        prop_oneof![4 => 0usize..64, 1 => 64usize..40_000],
        any::<bool>(),
        stray(),
        any::<bool>(),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(interim, framing, body_len, body_anyway, stray, split, close_after_head, early)| {
                Plan {
                    interim,
                    framing,
                    body_len,
                    body_anyway,
                    stray,
                    split,
                    close_after_head,
                    early,
                }
            },
        )
}

/// A request's body, as the proxy hands it over.
#[derive(Debug, Clone, Copy)]
enum Sent {
    /// In memory, this long (over 64 KiB: written after the head).
    Kept(usize),
    /// Streamed, its length known (written under a `Content-Length`).
    Sized(usize),
    /// Streamed, its length unknown (written chunked).
    Chunked(usize),
}

impl Sent {
    fn len(self) -> usize {
        match self {
            Sent::Kept(n) | Sent::Sized(n) | Sent::Chunked(n) => n,
        }
    }

    fn outbound(self) -> Outbound {
        match self {
            Sent::Kept(n) => Outbound::Kept(bodies::expected(n).into()),
            Sent::Sized(n) => Outbound::Streamed(bodies::Frames::new(n, true).boxed()),
            Sent::Chunked(n) => Outbound::Streamed(bodies::Frames::new(n, false).boxed()),
        }
    }
}

fn sent() -> impl Strategy<Value = Sent> {
    let len = || prop_oneof![3 => Just(0usize), 2 => 1usize..2048, 2 => 64 * 1024usize..300_000];
    prop_oneof![
        3 => len().prop_map(Sent::Kept),
        2 => len().prop_map(Sent::Sized),
        2 => len().prop_map(Sent::Chunked),
    ]
}

/// One request of the run: which session sends it (`true`: B), how the
/// upstream answers it, and the body it carries (every one over
/// credproxy's own client).
type Step = (bool, Plan, Sent);

async fn run_steps(
    up: &credproxy::proxy::forward::Upstream,
    raw: &Raw,
    steps: Vec<Step>,
) -> Result<(), String> {
    for (is_b, plan, sent) in steps {
        let (owner, tag, other) = if is_b {
            ("session-b", "<b>", "<a>")
        } else {
            ("session-a", "<a>", "<b>")
        };
        let method = if plan.framing == Framing::Head {
            http::Method::HEAD
        } else if sent.len() == 0 {
            http::Method::GET
        } else {
            http::Method::POST
        };
        let n = raw.plan(plan.clone());
        let body = sent.outbound();
        let mut headers = http::HeaderMap::new();
        headers.insert("x-tag", http::HeaderValue::from_static(tag));
        let head = Head {
            method,
            uri: format!("/p/{n}").parse().map_err(|e| format!("{e}"))?,
            headers,
        };
        let Ok(resp) = up.send(Cow::Owned(head), body, owner).await else {
            continue; // a refusal is allowed
        };
        let got = resp.headers().get("x-for").map(|v| v.as_bytes().to_vec());
        if got.as_deref() != Some(tag.as_bytes()) {
            return Err(format!(
                "{owner} got an answer tagged {:?} for {plan:?} ({sent:?})",
                got.map(|g| String::from_utf8_lossy(&g).into_owned())
            ));
        }
        let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
            .await
            .map_err(|_| format!("{owner}: the body of {plan:?} ({sent:?}) hung"))?;
        if let Ok(body) = body {
            let body = body.to_bytes();
            if body.windows(other.len()).any(|w| w == other.as_bytes()) {
                return Err(format!(
                    "{owner} got the other session's bytes in a body for {plan:?} ({sent:?})"
                ));
            }
        }
    }
    Ok(())
}

fn check_isolation(steps: Vec<Step>, at_once: bool) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let outcome: Result<(), String> = rt.block_on(async move {
        let raw = Raw::start().await;
        let w = World::new().await;
        let text = w
            .config_text(&Extra {
                spark: "request_timeout = \"5s\"".into(),
                ..Extra::default()
            })
            .replace(
                &format!("api_base = \"{}\"", w.spark.base_url()),
                &format!("api_base = \"http://{}/api\"", raw.addr),
            );
        let cfg = credproxy::config::Config::parse(&text, std::path::Path::new("t.toml"), |_| None)
            .map_err(|e| e.to_string())?;
        let spark = cfg.provider("spark").ok_or("no spark provider")?;
        let ups = Upstreams::new(spark, 1).map_err(|e| e.to_string())?;
        credproxy::proxy::forward::enter_worker(0);
        let up = ups.here();
        if at_once {
            let (a, b): (Vec<Step>, Vec<Step>) = steps.into_iter().partition(|s| !s.0);
            let (ra, rb) = tokio::join!(run_steps(up, &raw, a), run_steps(up, &raw, b));
            ra.and(rb)
        } else {
            run_steps(up, &raw, steps).await
        }
    });
    outcome.map_err(TestCaseError::fail)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Every byte a session receives was sent for one of that session's
    /// own requests, whatever the upstream sends, in turn or at once.
    #[test]
    fn every_byte_a_session_receives_was_sent_for_that_session(
        steps in prop::collection::vec((any::<bool>(), plan(), sent()), 2..16),
        at_once in any::<bool>(),
    ) {
        check_isolation(steps, at_once)?;
    }
}
