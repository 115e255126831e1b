//! The listeners' limits against clients that hold the server: peers that
//! pipeline requests and never read, request bodies that stall, heads one
//! byte over `max_header_bytes`, and a process out of file descriptors.

mod support;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{add_session, client, raw_request, url, BinServer, Extra, World};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpSocket, TcpStream};

/// Waits, without reading a byte, until the peer closes the connection
/// (FIN or RST). Returns when the last data arrived and when the close did,
/// or `None` if the connection is still open at `limit`.
async fn wait_closed_unread(s: &TcpStream, limit: Duration) -> Option<(Instant, Instant)> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut last_data = Instant::now();
    loop {
        let ready = tokio::time::timeout_at(deadline, s.ready(Interest::READABLE))
            .await
            .ok()?
            .ok()?;
        if ready.is_read_closed() || ready.is_error() {
            return Some((last_data, Instant::now()));
        }
        last_data = Instant::now();
        // Forget this readiness without reading: the next event is more
        // data or the close.
        let _ = s.try_io(Interest::READABLE, || {
            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
        });
    }
}

#[tokio::test]
async fn pipelining_peers_that_never_read_are_closed_and_others_are_served() {
    const NON_READERS: usize = 30;
    const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
    let w = World::new().await;
    let extra = Extra {
        server: "write_timeout = \"1s\"".into(),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;

    // Each asks for 16 × 4 MiB in one write, then never reads: far more
    // than the socket buffers on both sides hold.
    let pipelined = format!(
        "GET /spark/download?bytes=4194304 HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {key}\r\n\r\n"
    )
    .repeat(16);
    let mut peers = Vec::new();
    for _ in 0..NON_READERS {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
        let mut s = socket.connect(srv.proxy_addr).await.expect("connect");
        s.write_all(pipelined.as_bytes()).await.expect("pipeline");
        peers.push(tokio::spawn(async move {
            let closed = wait_closed_unread(&s, Duration::from_secs(20)).await;
            drop(s);
            closed
        }));
    }

    // Meanwhile a well-behaved client is answered promptly, every time.
    let c = client();
    for i in 0..20 {
        let asked = Instant::now();
        let r = c
            .get(url(srv.proxy_addr, &format!("/spark/v1/good/{i}")))
            .header("X-Credproxy-Session", &key)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(2), "request {i} took {took:?}");
    }

    let mut slowest = Duration::ZERO;
    for (i, peer) in peers.into_iter().enumerate() {
        let Some((last_data, closed)) = peer.await.expect("join") else {
            panic!("non-reader {i} still connected after 20 s");
        };
        let stalled_for = closed - last_data;
        slowest = slowest.max(stalled_for);
        assert!(
            stalled_for < WRITE_TIMEOUT + Duration::from_secs(3),
            "non-reader {i} closed {stalled_for:?} after its last data"
        );
    }
    println!("{NON_READERS} non-readers closed at most {slowest:?} after their last data");
    // And the server is still fine.
    let r = c
        .get(url(srv.proxy_addr, "/spark/v1/after"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    srv.shutdown().await;
}

fn stalled_post(key: &str) -> String {
    format!(
        "POST /spark/upload HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {key}\r\n\
         Content-Type: text/plain\r\nContent-Length: 1000\r\n\r\n0123456789"
    )
}

fn assert_request_timeout(answer: &str, started: Instant) {
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("x-credproxy-error: request_timeout"),
        "{answer:?}"
    );
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "answered after {took:?}"
    );
}

#[tokio::test]
async fn a_stalled_body_gets_408_within_body_read_timeout() {
    let w = World::new().await;
    let extra = Extra {
        server: "body_read_timeout = \"1s\"".into(),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;

    // Kept for a replay (1000 bytes ≤ max_replay_body): the upstream never
    // sees it.
    let started = Instant::now();
    let answer = raw_request(srv.proxy_addr, stalled_post(&key).as_bytes()).await;
    assert_request_timeout(&answer, started);
    // Chunked, stalled mid-chunk; and a client that asks for 100-continue
    // and then sends nothing.
    for stalled in [
        "Transfer-Encoding: chunked\r\n\r\na\r\n01234",
        "Content-Length: 10\r\nExpect: 100-continue\r\n\r\n",
    ] {
        let req = format!(
            "POST /spark/upload HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {key}\r\n{stalled}"
        );
        let started = Instant::now();
        let mut s = TcpStream::connect(srv.proxy_addr).await.expect("connect");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        // Until the server closes: after a 100 Continue, the real answer.
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        let answer = answer.trim_start_matches("HTTP/1.1 100 Continue\r\n\r\n");
        assert_request_timeout(answer, started);
    }
    assert!(w.spark.requests().iter().all(|r| r.path != "/upload"));
    srv.shutdown().await;
}

#[tokio::test]
async fn a_stalled_streamed_body_gets_408_before_the_upstream_answers() {
    let w = World::new().await;
    let extra = Extra {
        server: "body_read_timeout = \"1s\"".into(),
        // Larger than a replay may keep: streamed to the upstream as it comes.
        spark: "max_replay_body = 100".into(),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let started = Instant::now();
    let answer = raw_request(srv.proxy_addr, stalled_post(&key).as_bytes()).await;
    assert_request_timeout(&answer, started);
    srv.shutdown().await;
}

#[tokio::test]
async fn a_slow_body_that_keeps_coming_is_not_cut_off() {
    let w = World::new().await;
    let extra = Extra {
        server: "body_read_timeout = \"1s\"".into(),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let mut s = TcpStream::connect(srv.proxy_addr).await.expect("connect");
    let head = format!(
        "POST /spark/upload HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {key}\r\n\
         Connection: close\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("head");
    // 100 bytes over 4 s, 10 every 400 ms: slower in total than the
    // timeout, but never silent for as long.
    let started = Instant::now();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(b"0123456789").await.expect("body");
    }
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    assert!(started.elapsed() > Duration::from_secs(3));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains(r#""len":100"#), "{answer:?}");
    srv.shutdown().await;
}

/// A request head of exactly `size` bytes, as sent: request line, headers
/// and the blank line.
fn head_of(size: usize, path: &str, key: &str) -> String {
    let start = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {key}\r\nX-Pad: ");
    let end = "\r\nConnection: close\r\n\r\n";
    let pad = size - start.len() - end.len();
    let head = format!("{start}{}{end}", "a".repeat(pad));
    assert_eq!(head.len(), size);
    head
}

#[tokio::test]
async fn max_header_bytes_is_exact() {
    // The default; hyper's buffer growth used to let heads of up to ~115 KB
    // through at this setting.
    const MAX: usize = 65536;
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    for (listener, addr, path) in [
        ("proxy", srv.proxy_addr, "/spark/v1/head"),
        ("admin", srv.admin_addr, "/healthz"),
    ] {
        let answer = raw_request(addr, head_of(MAX, path, &key).as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{listener}: {:?}",
            &answer[..answer.len().min(200)]
        );
        for over in [MAX + 1, MAX + 100, 100_000, 2 * MAX] {
            let answer = raw_request(addr, head_of(over, path, &key).as_bytes()).await;
            assert!(
                answer.starts_with("HTTP/1.1 431"),
                "{listener}, {over} bytes: {:?}",
                &answer[..answer.len().min(200)]
            );
        }
    }
    srv.shutdown().await;
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

fn set_nofile(pid: u32, soft: usize, hard: usize) {
    let ok = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:{hard}"))
        .status()
        .expect("prlimit")
        .success();
    assert!(ok, "prlimit --pid={pid} --nofile={soft}:{hard}");
}

#[tokio::test]
async fn out_of_file_descriptors_the_server_backs_off_warns_once_and_recovers() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let srv = BinServer::spawn(&cfg, "info");
    // Leave the server a handful of descriptors, then connect more clients
    // than that: accept fails with EMFILE.
    let used = open_fds(srv.pid());
    set_nofile(srv.pid(), used + 4, used + 4);
    let mut held = Vec::new();
    for _ in 0..24 {
        held.push(TcpStream::connect(srv.proxy_addr).await.expect("connect"));
    }
    let warned = srv
        .stderr
        .wait_for(Duration::from_secs(10), |l| l.contains("accept failed"));
    assert!(warned.is_some(), "no accept warning");
    // The window in which the old loop logged a warning every 50 ms.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(held);
    // Serving again once descriptors are free (the back-off is at most 1 s).
    let healthy = client()
        .get(url(srv.admin_addr, "/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("healthz after the back-off");
    assert_eq!(healthy.status(), 200);
    let warnings = srv
        .stderr
        .all()
        .into_iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    println!("{warnings} accept warning(s) while out of descriptors");
    // One per back-off episode and listener that ran out.
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} accept warnings:\n{}",
        srv.stderr.all().join("\n")
    );
}

/// `credproxy serve` started under `prlimit`, its stderr lines sent to a channel.
struct Limited {
    child: Child,
    admin_addr: SocketAddr,
    proxy_addr: SocketAddr,
    stderr: mpsc::Receiver<String>,
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_under_prlimit(config: &Path, nofile: &str) -> Limited {
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={nofile}"))
        .arg(support::BIN)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn prlimit credproxy serve");
    let (out_tx, out_rx) = mpsc::channel();
    let (err_tx, err_rx) = mpsc::channel();
    for (stream, tx) in [
        (
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            out_tx,
        ),
        (Box::new(child.stderr.take().expect("stderr")), err_tx),
    ] {
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let addr = |marker: &str| -> SocketAddr {
        let line = out_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("serve prints its addresses");
        let at = line.find(marker).expect(marker) + marker.len();
        line[at..].trim().parse().expect("address")
    };
    let proxy_addr = addr("proxy listening on http://");
    let admin_addr = addr("admin listening on http://");
    Limited {
        child,
        admin_addr,
        proxy_addr,
        stderr: err_rx,
    }
}

fn nofile_of(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().expect("soft").to_owned(),
        fields.next().expect("hard").to_owned(),
    )
}

#[tokio::test]
async fn the_open_file_limit_is_raised_and_max_connections_clamped_to_it() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    // Soft 256, hard 4096: serve raises the soft limit to 4096, which still
    // cannot hold 10000 connections with an upstream socket each.
    let srv = spawn_under_prlimit(&cfg, "256:4096");
    assert_eq!(
        nofile_of(srv.child.id()),
        ("4096".to_owned(), "4096".to_owned())
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut clamped = None;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = srv.stderr.recv_timeout(left) else {
            break;
        };
        if line.contains("max_connections") {
            clamped = Some(line);
            break;
        }
    }
    let clamped = clamped.expect("a warning about server.max_connections");
    // (4096 - 128 in reserve) / 2 descriptors per proxied connection.
    assert!(clamped.contains("1984"), "{clamped}");
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/x"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401, "serving");
    let r = client()
        .get(url(srv.admin_addr, "/healthz"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
}
