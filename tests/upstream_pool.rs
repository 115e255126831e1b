//! credproxy's own upstream connection pool (`proxy/forward.rs`): kept-alive
//! connections are reused, concurrency bounds how many are opened, a
//! connection the upstream closed is never handed out again, and the
//! HTTP/1.1 request carries `Host` and an origin-form target.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use support::{client, url, Extra, World};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A raw HTTP/1.1 upstream: counts connections, records each request
/// head, answers 200 with a small JSON body; with `close_after` it closes
/// each connection after its first answer (without saying so in a header,
/// as an upstream's idle timeout would).
struct Upstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

async fn upstream(close_after: bool) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (count, seen) = (Arc::clone(&connections), Arc::clone(&heads));
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        seen.lock().expect("heads").push(head);
                        let body = br#"{"D":{"Success":true}}"#;
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        if sock.write_all(answer.as_bytes()).await.is_err()
                            || sock.write_all(body).await.is_err()
                        {
                            return;
                        }
                        if close_after {
                            return;
                        }
                    }
                }
            });
        }
    });
    Upstream {
        addr,
        connections,
        heads,
    }
}

/// A world whose Spark provider sends its API calls to `up`.
async fn world_against(up: &Upstream) -> (World, credproxy::server::Running) {
    let w = World::new().await;
    let text = w.config_text(&Extra::default()).replace(
        &format!("api_base = \"{}\"", w.spark.base_url()),
        &format!("api_base = \"http://{}/api\"", up.addr),
    );
    let cfg = credproxy::config::Config::parse(&text, std::path::Path::new("t.toml"), |_| None)
        .expect("config");
    let srv = credproxy::server::start(cfg).await.expect("start");
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
    let heads = up.heads.lock().expect("heads").clone();
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
    srv.shutdown().await;
}
