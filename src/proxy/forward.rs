//! Talking to an upstream API: pooled hyper clients per provider (one per
//! proxy worker, see [`Upstreams`]), over
//! rustls (HTTP/1.1 or HTTP/2 by ALPN, webpki roots), with the provider's
//! connect and response-header timeouts, and hop-by-hop header hygiene.
//!
//! Bodies are never collected here: request and response bodies stream
//! through frame by frame, so memory use does not grow with body size.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, CONNECTION};
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::config::ProviderConfig;
use crate::error::ProxyError;

/// A request body on its way upstream: the caller's stream (with the
/// provider's size limit), bytes held for a replay, or both (a prefix read
/// while deciding, then the rest of the stream).
pub type UpstreamBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {path}: {source}")]
    CaFile {
        key: String,
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{key}: {source}")]
    Roots { key: String, source: rustls::Error },
    #[error("{key}: the host and port cannot be used as an HTTP authority")]
    Authority { key: String },
    #[error("{key}: the HTTP client for the token endpoint cannot be built")]
    Client { key: String },
}

/// The rustls client configuration for one provider: webpki's roots, plus
/// the provider's `ca_file` if it names one. Also used for the token endpoint.
pub fn tls_config(provider: &ProviderConfig) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &provider.ca_file {
        let key = format!("providers.{}.ca_file", provider.name);
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::CaFile {
                key: key.clone(),
                path: path.display().to_string(),
                source,
            })?;
        for cert in certs {
            roots.add(cert).map_err(|source| TlsError::Roots {
                key: key.clone(),
                source,
            })?;
        }
    }
    let provider_impl = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider_impl)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Roots {
            key: format!("providers.{}", provider.name),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// One provider's connection pool and timeouts.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
    response_timeout: Duration,
}

thread_local! {
    /// The proxy worker this thread is, if it is one.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks this thread as proxy worker `index`: its requests use that
/// worker's upstream pools (see [`Upstreams::here`]).
pub fn enter_worker(index: usize) {
    WORKER.with(|w| w.set(Some(index)));
}

/// One provider's upstream clients: one per proxy worker, so that a
/// worker's upstream connections (and the tasks that drive them) stay on
/// its thread and its reactor, and one for every other thread.
pub struct Upstreams(Box<[Upstream]>);

impl Upstreams {
    pub fn new(provider: &ProviderConfig, workers: usize) -> Result<Upstreams, TlsError> {
        let tls = tls_config(provider)?;
        Ok(Upstreams(
            (0..=workers)
                .map(|_| Upstream::new(provider, tls.clone()))
                .collect(),
        ))
    }

    /// The client of the worker running this, or the shared one.
    pub fn here(&self) -> &Upstream {
        let shared = self.0.len() - 1;
        let i = WORKER.with(Cell::get).map_or(shared, |i| i.min(shared));
        &self.0[i]
    }
}

impl Upstream {
    fn new(provider: &ProviderConfig, tls: rustls::ClientConfig) -> Upstream {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(provider.connect_timeout));
        http.set_nodelay(true);
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(https);
        Upstream {
            client,
            response_timeout: provider.request_timeout,
        }
    }

    /// Time allowed from sending a request to the response head (also the
    /// bound on reading a body that is rewritten whole).
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// Sends the request and waits for the response head, within the
    /// provider's timeouts; the response body is left streaming.
    pub async fn send(&self, req: Request<UpstreamBody>) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Err(_) => Err(ProxyError::UpstreamTimeout),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(&e)),
        }
    }
}

/// Maps a client error to the contract: a timed-out connect is a timeout,
/// a body over the provider's limit is 413, anything else is unreachable.
fn classify(e: &hyper_util::client::legacy::Error) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return ProxyError::BodyTooLarge;
        }
        if err.is::<crate::server::BodyReadTimeout>() {
            return ProxyError::RequestTimeout;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return ProxyError::UpstreamTimeout;
            }
        }
        source = err.source();
    }
    tracing::debug!(error = %e, "upstream request failed");
    ProxyError::UpstreamUnreachable
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, and those the `Connection` header names.
/// `Upgrade` goes too: credproxy does not tunnel protocol switches.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(http::header::UPGRADE);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, X-Secret-Hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-end-to-end"], "kept");
    }
}
