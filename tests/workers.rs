//! The proxy's workers (src/server/workers.rs): `server.worker_threads`
//! threads (or `TOKIO_WORKER_THREADS`, or one per core), each serving the
//! connections handed to it, the least loaded first.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{add_session, client, url, BinServer, Extra, World};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The names of the threads of process `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect();
    names.sort();
    names
}

/// `credproxy_worker_connections` per worker, from the admin listener.
async fn worker_connections(admin: SocketAddr) -> Vec<(u32, i64)> {
    let text = client()
        .get(url(admin, "/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let mut out: Vec<(u32, i64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("credproxy_worker_connections{worker=\""))
        .filter_map(|l| {
            let (worker, rest) = l.split_once("\"} ")?;
            Some((worker.parse().ok()?, rest.trim().parse().ok()?))
        })
        .collect();
    out.sort();
    out
}

/// Sends one keep-alive request on `s` and reads its answer (the stand-in
/// answers with a Content-Length).
async fn one_request(s: &mut TcpStream, key: &str) -> String {
    let req =
        format!("GET /spark/v1/listings HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {key}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(n > 0, "closed before the answer");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len = text[..head_end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .expect("content-length");
            if buf.len() >= head_end + 4 + len {
                return text.into_owned();
            }
        }
    }
}

#[tokio::test]
async fn connections_spread_over_the_configured_workers_and_are_counted() {
    let w = World::new().await;
    let running = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&running, "spark", &w.spark).await;
    running.shutdown().await;

    let cfg = w.write_config(&Extra {
        server: "worker_threads = 3".into(),
        ..Extra::default()
    });
    let srv = BinServer::spawn(&cfg, "warn");
    let names = thread_names(srv.pid());
    for i in 0..3 {
        assert!(
            names.contains(&format!("credproxy-w{i}")),
            "worker {i} missing: {names:?}"
        );
    }
    assert!(!names.contains(&"credproxy-w3".to_owned()), "{names:?}");
    assert!(names.contains(&"credproxy-ctl".to_owned()), "{names:?}");

    // Three connections held open at once go to three different workers.
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(srv.proxy_addr).await.expect("connect");
        let answer = one_request(&mut s, &key).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        conns.push(s);
    }
    assert_eq!(
        worker_connections(srv.admin_addr).await,
        vec![(0, 1), (1, 1), (2, 1)]
    );
    // Each keeps being served by its worker.
    for s in &mut conns {
        let answer = one_request(s, &key).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    // Closed connections leave the count (bounded wait for the server to
    // see the FINs).
    drop(conns);
    let mut last = Vec::new();
    for _ in 0..200 {
        last = worker_connections(srv.admin_addr).await;
        if last.iter().all(|&(_, n)| n == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(last, vec![(0, 0), (1, 0), (2, 0)]);
}

#[tokio::test]
async fn tokio_worker_threads_sets_the_count_when_the_config_does_not() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_credproxy"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("TOKIO_WORKER_THREADS", "1")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    // The listeners are bound (and the workers started) once it says so.
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let listening = lines
        .by_ref()
        .take(20)
        .map_while(Result::ok)
        .any(|l| l.contains("proxy listening on"));
    let names = thread_names(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening, "no listening line");
    assert!(names.contains(&"credproxy-w0".to_owned()), "{names:?}");
    assert!(!names.contains(&"credproxy-w1".to_owned()), "{names:?}");
}

#[tokio::test]
async fn worker_threads_out_of_bounds_is_a_clear_error() {
    let w = World::new().await;
    for (value, says) in [("0", "at least 1"), ("5000", "at most 1024")] {
        let cfg = w.write_config(&Extra {
            server: format!("worker_threads = {value}"),
            ..Extra::default()
        });
        let out = support::run_cli(&cfg, &["check"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("server.worker_threads") && err.contains(says),
            "{err}"
        );
    }
}

#[tokio::test]
async fn an_in_process_server_serves_and_drains_through_its_workers() {
    let w = World::new().await;
    let running = w
        .start(&Extra {
            server: "worker_threads = 2".into(),
            ..Extra::default()
        })
        .await;
    let (_, key, _) = add_session(&running, "spark", &w.spark).await;
    let c = client();
    let mut handles = Vec::new();
    for i in 0..8 {
        let c = c.clone();
        let key = key.clone();
        let addr = running.proxy_addr;
        handles.push(tokio::spawn(async move {
            c.get(url(addr, &format!("/spark/v1/listings/{i}")))
                .header("X-Credproxy-Session", &key)
                .send()
                .await
                .expect("send")
                .status()
        }));
    }
    for h in handles {
        assert_eq!(h.await.expect("join"), 200);
    }
    let addr = running.proxy_addr;
    running.shutdown().await;
    // Shut down: the listener is closed.
    assert!(TcpStream::connect(addr).await.is_err());
}
