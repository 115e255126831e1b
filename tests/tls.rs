//! Upstream TLS: rustls with ALPN, HTTP/2 when the upstream offers it, and a
//! provider's own `ca_file` trusted besides the webpki roots.

mod support;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{add_session, client, error_code, url, Extra, World};

/// A TLS upstream on 127.0.0.1 answering with the HTTP version and the
/// Authorization it received; its certificate is for `localhost`, signed
/// by a throwaway CA written to `ca.pem`.
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

async fn through(alpn: &[&[u8]], trust: bool) -> (u16, String, Option<String>) {
    let w = World::new().await;
    let (addr, ca) = tls_upstream(alpn, w.dir.path()).await;
    let mut spark = format!("ca_file = \"{}\"", ca.display());
    if !trust {
        spark.clear();
    }
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
