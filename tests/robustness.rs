//! Bad input and hostile clients: garbage, oversized heads, slow senders,
//! and draining on SIGTERM. Also the memory bound on large streamed bodies.

mod support;

use std::time::{Duration, Instant};

use support::{add_session, client, raw_request, url, BinServer, Extra, World};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn garbage_gets_400_and_the_server_keeps_serving() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 tls hello\r\n\r\n"[..],
        b"GARBAGE\r\n\r\n",
        b"GET /spark/v1 HTTP/9.9\r\n\r\n",
        b"GET /spark/v1 HTTP/1.1\r\nBad Header Line\r\n\r\n",
    ] {
        let resp = raw_request(srv.proxy_addr, garbage).await;
        assert!(
            resp.is_empty() || resp.starts_with("HTTP/1.1 400"),
            "{resp:?}"
        );
    }
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/after"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    srv.shutdown().await;
}

#[tokio::test]
async fn oversized_head_gets_431() {
    let w = World::new().await;
    let extra = Extra {
        server: "max_header_bytes = 16384".into(),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let big = "a".repeat(40_000);
    let req = format!("GET /spark/v1 HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let resp = raw_request(srv.proxy_addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:?}");
    // The admin listener (it faces browsers) has the same limits.
    let resp = raw_request(srv.admin_addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "admin: {resp:?}");
    srv.shutdown().await;
}

#[tokio::test]
async fn slow_sender_is_cut_off_and_does_not_hold_up_others() {
    let w = World::new().await;
    let extra = Extra {
        server: "header_read_timeout = \"1s\"".into(),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;

    // A client that sends one byte every 200 ms.
    let addr = srv.proxy_addr;
    let started = Instant::now();
    let slow = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let head = b"GET /spark/v1/slow HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        for b in head {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The server closed on us: reading gives EOF (or an error), never a 200.
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).into_owned()
    });

    // Meanwhile, others are served normally.
    for _ in 0..5 {
        let r = client()
            .get(url(srv.proxy_addr, "/spark/v1/fast"))
            .header("X-Credproxy-Session", &key)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
    }
    let answer = slow.await.expect("join");
    assert!(!answer.contains(" 200 "), "{answer:?}");
    // The head would take ~16 s at this pace; the cut-off came long before.
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "cut off by the header-read timeout"
    );
    assert!(w.spark.requests().iter().all(|r| r.path != "/v1/slow"));
    srv.shutdown().await;
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let out = support::run_cli(
        &cfg,
        &[
            "session",
            "add",
            "--provider",
            "spark",
            "--access-token",
            &w.spark.issue_tokens().access_token,
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let added: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let key = added["session_key"].as_str().expect("key").to_owned();

    let mut srv = BinServer::spawn(&cfg, "info");
    let in_flight = {
        let u = url(srv.proxy_addr, "/spark/slow?ms=1500");
        let key = key.clone();
        tokio::spawn(async move {
            client()
                .get(u)
                .header("X-Credproxy-Session", key)
                .send()
                .await
                .map(|r| r.status())
        })
    };
    // Signal once the upstream has the request, so it is truly in flight.
    w.spark.wait_for_requests(1).await;
    support::signal(srv.pid(), "TERM");
    let status = in_flight
        .await
        .expect("join")
        .expect("the in-flight request completes");
    assert_eq!(status, 200);
    let exit = tokio::task::spawn_blocking(move || srv.child.wait().expect("wait"))
        .await
        .expect("join");
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn large_bodies_stream_in_bounded_memory() {
    const SIZE: u64 = 64 * 1024 * 1024;
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let out = support::run_cli(
        &cfg,
        &[
            "session",
            "add",
            "--provider",
            "spark",
            "--access-token",
            &w.spark.issue_tokens().access_token,
            "--json",
        ],
    );
    assert!(out.status.success());
    let added: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let key = added["session_key"].as_str().expect("key").to_owned();
    let srv = BinServer::spawn(&cfg, "warn");
    let c = client();

    // Download: count the bytes as they arrive, never holding them.
    let mut resp = c
        .get(url(
            srv.proxy_addr,
            &format!("/spark/download?bytes={SIZE}"),
        ))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let mut got = 0u64;
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    while let Some(chunk) = resp.chunk().await.expect("chunk") {
        got += chunk.len() as u64;
        sha2::Digest::update(&mut hasher, &chunk);
    }
    assert_eq!(got, SIZE);
    let hex: String = sha2::Digest::finalize(hasher)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(hex, credproxy_standins::download_sha256(SIZE));

    // Upload: a generated stream of 64 MiB.
    let chunk = vec![0x5au8; 1 << 20];
    let stream = tokio_stream::iter((0..64).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let r = c
        .post(url(srv.proxy_addr, "/spark/upload"))
        .header("X-Credproxy-Session", &key)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let answer: serde_json::Value = r.json().await.expect("json");
    assert_eq!(answer["len"], SIZE);

    let peak_kib = srv.peak_rss_kib();
    println!("peak RSS after 64 MiB down + 64 MiB up: {} KiB", peak_kib);
    assert!(peak_kib < 50 * 1024, "peak RSS {peak_kib} KiB");
}
