//! Why an upstream failed reaches the access-log line (`cause=`), while the
//! caller's answer stays the contract's fixed code and message: one test
//! per cause that can be provoked on loopback, against the real binary.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::{cli_add_spark, client, error_code, url, BinServer, Extra, World};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a raw upstream does with each connection.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Reads the request head, then closes without a word.
    Close,
    /// Reads the request head, then resets the connection.
    Reset,
    /// Answers anything with bytes that are neither TLS nor HTTP.
    Garbage,
    /// Reads the request head and never answers.
    Silent,
}

async fn read_head(sock: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn raw_upstream(behaviour: Behaviour) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                match behaviour {
                    Behaviour::Close => read_head(&mut sock).await,
                    Behaviour::Reset => {
                        read_head(&mut sock).await;
                        // A zero linger: the close is a reset, at once
                        // (nothing blocks, which is what the lint is about).
                        #[allow(deprecated)]
                        let _ = sock.set_linger(Some(Duration::ZERO));
                    }
                    Behaviour::Garbage => {
                        let _ = sock
                            .write_all(b"\x00\x01 this is not a protocol \r\n\r\n")
                            .await;
                        let _ = sock.flush().await;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Behaviour::Silent => {
                        read_head(&mut sock).await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                }
            });
        }
    });
    addr
}

/// A TLS upstream whose certificate (for `localhost`) no one trusts.
async fn untrusted_tls_upstream() -> SocketAddr {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    addr
}

/// Runs credproxy with Spark's API at `api_base`, sends one request, and
/// returns the status, the error code and the request's access-log line.
async fn through(api_base: &str, spark: &str) -> (u16, Option<String>, String) {
    let w = World::new().await;
    let text = w
        .config_text(&Extra {
            spark: spark.to_owned(),
            ..Extra::default()
        })
        .replace(
            &format!("api_base = \"{}\"", w.spark.base_url()),
            &format!("api_base = \"{api_base}\""),
        );
    let cfg = w.path("config.toml");
    std::fs::write(&cfg, text).expect("write config");
    let key = cli_add_spark(&cfg, &w);
    let srv = BinServer::spawn(&cfg, "info");
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/cause"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let code = error_code(&r);
    let body = r.text().await.expect("text");
    let line = srv
        .stderr
        .wait_for(Duration::from_secs(10), |l| {
            l.contains("credproxy::access") && l.contains("/v1/cause")
        })
        .expect("an access-log line");
    // The answer is the contract's, whatever the cause.
    let message = match status {
        502 => "the upstream API could not be reached",
        504 => "the upstream API did not answer in time",
        other => panic!("status {other}: {body}"),
    };
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["error"]["message"], message, "{body}");
    assert_eq!(v["error"].as_object().map(|o| o.len()), Some(2), "{body}");
    (status, code, line)
}

fn assert_cause(line: &str, cause: &str) {
    assert!(line.contains(&format!("cause=\"{cause}\"")), "{line}");
}

#[tokio::test]
async fn refused() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let (status, code, line) = through(&format!("http://{dead}"), "").await;
    assert_eq!(
        (status, code.as_deref()),
        (502, Some("upstream_unreachable"))
    );
    assert_cause(&line, "refused");
    assert!(line.contains("error=\"upstream_unreachable\""), "{line}");
}

#[tokio::test]
async fn closed_before_answering() {
    let up = raw_upstream(Behaviour::Close).await;
    let (status, code, line) = through(&format!("http://{up}"), "").await;
    assert_eq!(
        (status, code.as_deref()),
        (502, Some("upstream_unreachable"))
    );
    assert_cause(&line, "closed");
}

#[tokio::test]
async fn reset() {
    let up = raw_upstream(Behaviour::Reset).await;
    let (status, code, line) = through(&format!("http://{up}"), "").await;
    assert_eq!(
        (status, code.as_deref()),
        (502, Some("upstream_unreachable"))
    );
    assert_cause(&line, "reset");
}

#[tokio::test]
async fn not_http() {
    let up = raw_upstream(Behaviour::Garbage).await;
    let (status, code, line) = through(&format!("http://{up}"), "").await;
    assert_eq!(
        (status, code.as_deref()),
        (502, Some("upstream_unreachable"))
    );
    assert_cause(&line, "protocol");
}

#[tokio::test]
async fn tls_handshake_with_a_server_that_does_not_speak_tls() {
    let up = raw_upstream(Behaviour::Garbage).await;
    let base = format!("https://localhost:{}", up.port());
    let (status, code, line) = through(&base, "").await;
    assert_eq!(
        (status, code.as_deref()),
        (502, Some("upstream_unreachable"))
    );
    assert_cause(&line, "tls_handshake");
}

#[tokio::test]
async fn untrusted_certificate() {
    let up = untrusted_tls_upstream().await;
    let base = format!("https://localhost:{}", up.port());
    let (status, code, line) = through(&base, "").await;
    assert_eq!(
        (status, code.as_deref()),
        (502, Some("upstream_unreachable"))
    );
    assert_cause(&line, "certificate");
    assert!(line.contains("detail="), "the TLS error in the log: {line}");
}

#[tokio::test]
async fn no_answer_in_time() {
    let up = raw_upstream(Behaviour::Silent).await;
    let (status, code, line) =
        through(&format!("http://{up}"), "request_timeout = \"300ms\"").await;
    assert_eq!((status, code.as_deref()), (504, Some("upstream_timeout")));
    assert_cause(&line, "timeout");
}
