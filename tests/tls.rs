//! Upstream TLS: rustls with ALPN, HTTP/2 when the upstream offers it, and a
//! provider's own `ca_file` trusted besides the webpki roots.

mod support;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{add_session, client, error_code, url, Extra, World};

/// A TLS upstream on 127.0.0.1 answering with the HTTP version and the
/// Authorization it received (at `/v1/upload`: the version, and the
/// length and SHA-256 of the body); its certificate is for `localhost`,
/// signed by a throwaway CA written to `ca.pem`.
async fn tls_upstream(
    alpn: &[&[u8]],
    dir: &std::path::Path,
) -> (std::net::SocketAddr, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf");
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write ca");

    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .expect("server config");
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    if req.uri().path() == "/v1/upload" {
                        let version = req.version();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let text = match body {
                            Ok(b) => format!("{version:?} {} {}", b.len(), sha256(&b)),
                            Err(e) => format!("{version:?} broken: {e}"),
                        };
                        return Ok(hyper::Response::new(Full::new(Bytes::from(text))));
                    }
                    let auth = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let body = format!("{:?} {} {auth}", req.version(), req.uri().path());
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, ca_path)
}

fn sha256(bytes: &[u8]) -> String {
    <sha2::Sha256 as sha2::Digest>::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// credproxy in front of a TLS upstream offering `alpn`, its CA trusted
/// when `trust`, with `extra` lines in the Spark provider's table.
async fn against(alpn: &[&[u8]], trust: bool, extra: &str) -> (World, credproxy::server::Running) {
    let w = World::new().await;
    let (addr, ca) = tls_upstream(alpn, w.dir.path()).await;
    let mut spark = format!("ca_file = \"{}\"", ca.display());
    if !trust {
        spark.clear();
    }
    spark.push('\n');
    spark.push_str(extra);
    let mut text = w.config_text(&Extra {
        spark,
        ..Extra::default()
    });
    text = text.replace(
        &format!("api_base = \"{}\"", w.spark.base_url()),
        &format!("api_base = \"https://localhost:{}\"", addr.port()),
    );
    let cfg = credproxy::config::Config::parse(&text, std::path::Path::new("t"), |_| None)
        .expect("config");
    let srv = credproxy::server::start(cfg).await.expect("start");
    (w, srv)
}

async fn through(alpn: &[&[u8]], trust: bool) -> (u16, String, Option<String>) {
    let (w, srv) = against(alpn, trust, "").await;
    let (_, key, tokens) = add_session(&srv, "spark", &w.spark).await;
    let r = client()
        .get(url(srv.proxy_addr, "/spark/v1/tls"))
        .header("X-Credproxy-Session", &key)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let code = error_code(&r);
    let body = r.text().await.expect("text");
    srv.shutdown().await;
    (status, body.replace(&tokens.access_token, "TOKEN"), code)
}

#[tokio::test]
async fn http2_by_alpn_over_tls() {
    let (status, body, _) = through(&[b"h2", b"http/1.1"], true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "HTTP/2.0 /v1/tls OAuth TOKEN");
}

#[tokio::test]
async fn http1_when_the_upstream_offers_only_http1() {
    let (status, body, _) = through(&[b"http/1.1"], true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "HTTP/1.1 /v1/tls OAuth TOKEN");
}

#[tokio::test]
async fn untrusted_certificate_is_refused() {
    let (status, _, code) = through(&[b"h2", b"http/1.1"], false).await;
    assert_eq!(status, 502);
    assert_eq!(code.as_deref(), Some("upstream_unreachable"));
}

/// Uploads over TLS, streamed (over `max_replay_body`) with their length
/// and chunked, and one kept in memory over 64 KiB: over credproxy's own
/// HTTP/1.1 client, or hyper's HTTP/2 one, each arrives whole.
#[tokio::test]
async fn uploads_over_tls_arrive_intact_over_http1_and_http2() {
    let n = 3 * 1024 * 1024 + 5;
    let body: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
    let want = format!("{n} {}", sha256(&body));
    for (alpn, version) in [
        (&[&b"http/1.1"[..]][..], "HTTP/1.1"),
        (&[&b"h2"[..], &b"http/1.1"[..]][..], "HTTP/2.0"),
    ] {
        let (w, srv) = against(alpn, true, "max_replay_body = 100000").await;
        let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
        let c = client();
        let chunks: Vec<Vec<u8>> = body.chunks(100_000).map(<[u8]>::to_vec).collect();
        let small = body[..90_000].to_vec();
        let small_want = format!("90000 {}", sha256(&small));
        for (what, sent, want) in [
            ("sized", reqwest::Body::from(body.clone()), &want),
            (
                "chunked",
                reqwest::Body::wrap_stream(tokio_stream::iter(
                    chunks.into_iter().map(Ok::<_, std::io::Error>),
                )),
                &want,
            ),
            ("kept", reqwest::Body::from(small), &small_want),
        ] {
            let r = c
                .post(url(srv.proxy_addr, "/spark/v1/upload"))
                .header("X-Credproxy-Session", &key)
                .body(sent)
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200, "{version} {what}");
            let text = r.text().await.expect("text");
            assert_eq!(text, format!("{version} {want}"), "{what}");
        }
        srv.shutdown().await;
    }
}
