//! Traces and logs (the contract's "Traces and logs"): the real binary with
//! `[telemetry]` pointed at a loopback OTLP/HTTP receiver, whose protobuf
//! exports are decoded here; JSON log lines; the access log's line written
//! once the body has been sent or broken off.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use support::{cli_add, client, url, BinServer, Extra, World};

/// A loopback OTLP/HTTP receiver: every body POSTed to `/v1/traces`.
async fn receiver() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let got: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let keep = Arc::clone(&got);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let keep = Arc::clone(&keep);
            async move {
                keep.lock().expect("exports").push(body.to_vec());
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, got)
}

fn spans(exports: &[Vec<u8>]) -> Vec<Span> {
    let mut out = Vec::new();
    for body in exports {
        let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        for rs in req.resource_spans {
            for ss in rs.scope_spans {
                out.extend(ss.spans);
            }
        }
    }
    out
}

fn attr(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone()?.value)
}

fn attr_str(span: &Span, key: &str) -> Option<String> {
    match attr(span, key)? {
        Value::StringValue(s) => Some(s),
        other => Some(format!("{other:?}")),
    }
}

fn attr_int(span: &Span, key: &str) -> Option<i64> {
    match attr(span, key)? {
        Value::IntValue(i) => Some(i),
        _ => None,
    }
}

fn attr_bool(span: &Span, key: &str) -> Option<bool> {
    match attr(span, key)? {
        Value::BoolValue(b) => Some(b),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn telemetry(otlp: SocketAddr, format: &str) -> Extra {
    Extra {
        zillow: format!(
            "\n[telemetry]\notlp_endpoint = \"http://{otlp}\"\nsample_ratio = 1.0\nlog_format = \"{format}\"\n"
        ),
        ..Extra::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_a_trace_with_its_refresh_and_replay_and_no_secret() {
    let (otlp, exports) = receiver().await;
    let w = World::new().await;
    let cfg = w.write_config(&telemetry(otlp, "json"));
    let tokens = w.spark.issue_tokens();
    let added = cli_add(&cfg, "spark", &tokens);
    let key = added["session_key"].as_str().expect("key").to_owned();
    let id = added["id"].as_str().expect("id").to_owned();
    let mut srv = BinServer::spawn(&cfg, "info");
    let c = client();

    // A caller's trace: the upstream sees the same trace, a parent of ours.
    let trace1 = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let r = c
        .get(url(srv.proxy_addr, "/spark/v1/first?q=1"))
        .header("X-Credproxy-Session", &key)
        .header("traceparent", format!("00-{trace1}-{caller_span}-01"))
        .header("tracestate", "vendor=abc")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let seen = w.spark.last_request().expect("upstream request");
    let up = seen
        .header("traceparent")
        .expect("traceparent upstream")
        .to_owned();
    let parts: Vec<&str> = up.split('-').collect();
    assert_eq!(parts.len(), 4, "{up}");
    assert_eq!(parts[1], trace1, "the upstream is in the caller's trace");
    assert_ne!(
        parts[2], caller_span,
        "the caller's traceparent is not forwarded as is"
    );
    assert_eq!(seen.header("tracestate"), Some("vendor=abc"));
    let upstream_parent1 = parts[2].to_owned();

    // An expired token: refreshed, then the request replayed.
    w.spark.expire_access_tokens();
    let trace2 = "0af7651916cd43dd8448eb211c80319c";
    let r = c
        .get(url(srv.proxy_addr, "/spark/v1/second"))
        .header("X-Credproxy-Session", &key)
        .header("traceparent", format!("00-{trace2}-b7ad6b7169203331-01"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(w.spark.grant_count(), 1);

    assert!(srv.terminate().success());
    srv.stderr
        .wait_for(Duration::from_secs(5), |l| l == "\u{0}eof");
    let exported = exports.lock().expect("exports").clone();
    let all = spans(&exported);
    let in_trace =
        |t: &str| -> Vec<&Span> { all.iter().filter(|s| hex(&s.trace_id) == t).collect() };

    // Trace 1: server span under the caller's, one upstream attempt under it.
    let t1 = in_trace(trace1);
    let server1 = t1
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .expect("a server span in the caller's trace");
    assert_eq!(hex(&server1.parent_span_id), caller_span);
    assert_eq!(server1.name, "GET");
    assert_eq!(
        attr_str(server1, "http.route").as_deref(),
        Some("/spark/{rest}")
    );
    assert_eq!(
        attr_str(server1, "http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(
        attr_str(server1, "url.path").as_deref(),
        Some("/spark/v1/first")
    );
    assert_eq!(
        attr_int(server1, "http.response.status_code"),
        Some(200),
        "{server1:#?}"
    );
    assert_eq!(
        attr_str(server1, "credproxy.provider").as_deref(),
        Some("spark")
    );
    assert_eq!(
        attr_str(server1, "credproxy.session_id").as_deref(),
        Some(id.as_str())
    );
    assert_eq!(attr_bool(server1, "credproxy.refreshed"), Some(false));
    let attempt1: Vec<&&Span> = t1
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32 && s.parent_span_id == server1.span_id)
        .collect();
    assert_eq!(attempt1.len(), 1, "{t1:#?}");
    assert_eq!(
        hex(&attempt1[0].span_id),
        upstream_parent1,
        "the upstream's parent is the attempt"
    );
    assert_eq!(
        attr_int(attempt1[0], "http.response.status_code"),
        Some(200)
    );

    // Trace 2: two attempts (the second a resend), the refresh between
    // them with its token endpoint call.
    let t2 = in_trace(trace2);
    let server2 = t2
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .expect("server span of the replayed request");
    assert_eq!(attr_bool(server2, "credproxy.refreshed"), Some(true));
    assert_eq!(attr_bool(server2, "credproxy.replayed"), Some(true));
    let children = |parent: &Span| -> Vec<&Span> {
        t2.iter()
            .copied()
            .filter(|s| s.parent_span_id == parent.span_id)
            .collect()
    };
    let under = children(server2);
    let attempts: Vec<&&Span> = under
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    assert_eq!(attempts.len(), 2, "{t2:#?}");
    let statuses: Vec<Option<i64>> = attempts
        .iter()
        .map(|s| attr_int(s, "http.response.status_code"))
        .collect();
    assert!(
        statuses.contains(&Some(401)) && statuses.contains(&Some(200)),
        "{statuses:?}"
    );
    assert!(attempts
        .iter()
        .any(|s| attr_int(s, "http.request.resend_count") == Some(1)));
    let refresh = under
        .iter()
        .find(|s| s.name == "refresh")
        .expect("the refresh under the request");
    assert_eq!(
        attr_str(refresh, "credproxy.refresh.outcome").as_deref(),
        Some("refreshed")
    );
    let token = children(refresh);
    assert!(
        token
            .iter()
            .any(|s| s.name == "POST" && s.kind == SpanKind::Client as i32),
        "the token endpoint call under the refresh: {token:#?}"
    );

    // No secret anywhere in what was exported.
    let mut secrets = w.secrets();
    secrets.extend(w.spark.all_tokens());
    secrets.push(tokens.access_token.clone());
    secrets.push(tokens.refresh_token.clone());
    secrets.push(key.clone());
    let bytes: Vec<u8> = exported.concat();
    for s in &secrets {
        assert!(
            !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
            "a secret ({} chars) was exported",
            s.len()
        );
    }
    assert!(!bytes.windows(3).any(|w| w == b"q=1"), "no query exported");

    // JSON lines: each parses; the access line carries its trace's ids.
    let lines = srv.stderr.all();
    let mut access = HashMap::new();
    for line in lines.iter().filter(|l| !l.is_empty() && *l != "\u{0}eof") {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for k in ["timestamp", "level", "target", "message", "fields"] {
            assert!(v.get(k).is_some(), "{k} in {line}");
        }
        if v["target"] == "credproxy::access" {
            access.insert(
                v["fields"]["path"].as_str().unwrap_or_default().to_owned(),
                v,
            );
        }
    }
    let first = &access["/spark/v1/first"];
    assert_eq!(first["trace_id"], trace1);
    assert_eq!(first["span_id"], hex(&server1.span_id));
    assert_eq!(first["fields"]["status"], 200);
    assert_eq!(access["/spark/v1/second"]["fields"]["replayed"], true);
    assert_eq!(access["/spark/v1/second"]["fields"]["refreshed"], true);
}

/// The access line: bytes and total time of a streamed download, and a
/// client that hangs up mid-body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_line_tells_how_the_body_ended() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let key = support::cli_add_spark(&cfg, &w);
    let srv = BinServer::spawn(&cfg, "info");
    let c = client();
    let n = 3_000_000;
    let r = c
        .get(url(srv.proxy_addr, &format!("/spark/download?bytes={n}")))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("body");
    assert_eq!(body.len(), n);
    let line = srv
        .stderr
        .wait_for(Duration::from_secs(10), |l| {
            l.contains("credproxy::access") && l.contains("/spark/download")
        })
        .expect("the download's access line");
    assert!(line.contains(&format!("bytes_out={n}")), "{line}");
    assert!(
        line.contains("head_ms=") && line.contains("total_ms="),
        "{line}"
    );
    assert!(!line.contains("broke_off"), "{line}");

    // A client that reads the head and a little, then hangs up.
    let mut s = tokio::net::TcpStream::connect(srv.proxy_addr)
        .await
        .expect("connect");
    s.write_all(
        format!(
            "GET /spark/download?bytes=200000000 HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {key}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < 200_000 {
        let k = s.read(&mut buf).await.expect("read");
        assert!(k > 0);
        got += k;
    }
    drop(s);
    let line = srv
        .stderr
        .wait_for(Duration::from_secs(20), |l| {
            l.contains("credproxy::access")
                && l.contains("/spark/download")
                && !l.contains("bytes_out=3000000")
        })
        .expect("the broken-off download's access line");
    assert!(line.contains("broke_off=\"client\""), "{line}");
    let out: u64 = line
        .split("bytes_out=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("bytes_out");
    assert!(out > 0 && out < 200_000_000, "{line}");
}

/// The access line of an answer whose upstream breaks off mid-body: the
/// upstream is named as the side that broke off, with the bytes that got
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_line_names_an_upstream_that_broke_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Declares 100,000 bytes, sends 1,000, then closes.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let up_addr = upstream.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                    .await;
                let _ = s.write_all(&[b'x'; 1000]).await;
                let _ = s.shutdown().await;
            });
        }
    });
    let w = World::new().await;
    let text = format!(
        "{}\n[providers.cut]\nkind = \"static\"\napi_base = \"http://{up_addr}\"\n",
        w.config_text(&Extra::default())
    );
    let cfg = w.path("cut.toml");
    std::fs::write(&cfg, text).expect("config");
    let out = support::run_cli(
        &cfg,
        &[
            "session",
            "add",
            "--provider",
            "cut",
            "--access-token",
            "static-key",
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
    let srv = BinServer::spawn(&cfg, "info");
    // The caller sees the connection end before the declared length: at
    // the head (nothing was flushed yet) or in the body.
    let sent = client()
        .get(url(srv.proxy_addr, "/cut/file"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await;
    if let Ok(r) = sent {
        assert_eq!(r.status(), 200);
        assert!(r.bytes().await.is_err(), "the body cannot end well");
    }
    let line = srv
        .stderr
        .wait_for(Duration::from_secs(10), |l| {
            l.contains("credproxy::access") && l.contains("/cut/file")
        })
        .expect("the access line");
    assert!(line.contains("broke_off=\"upstream\""), "{line}");
    let out: u64 = line
        .split("bytes_out=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("bytes_out");
    assert!(out <= 1000, "{line}");
}
