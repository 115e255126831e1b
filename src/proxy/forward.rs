//! Talking to an upstream API: a pool of hyper client connections per
//! provider (one per proxy worker, see [`Upstreams`]), over
//! rustls (HTTP/1.1 or HTTP/2 by ALPN, webpki roots), with the provider's
//! connect and response-header timeouts, and hop-by-hop header hygiene.
//!
//! Bodies are never collected here: request and response bodies stream
//! through frame by frame, so memory use does not grow with body size.

use std::cell::Cell;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tower_service::Service as _;

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

/// One provider's upstream connections (for one proxy worker) and timeouts.
///
/// The pool is credproxy's own rather than hyper-util's legacy client: a
/// worker's requests reach their connection through a short uncontended
/// lock and a scan for a ready sender, with no checkout future, no pool
/// key hashing and no task per request to put the connection back
/// (hyper-util's spends ~1.6 us per request here, the profile on issue 15).
/// Connections are made by hyper-rustls's connector and driven by hyper's
/// HTTP/1.1 or HTTP/2 client (by ALPN), each in a task of the worker.
pub struct Upstream {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`, where connections go.
    origin: Uri,
    scheme: Scheme,
    authority: Authority,
    /// The `Host` of HTTP/1.1 requests (HTTP/2 carries `:authority`).
    host: HeaderValue,
    pool: Mutex<Pool>,
    response_timeout: Duration,
}

/// Connections kept open between requests.
#[derive(Default)]
struct Pool {
    /// HTTP/1.1 connections, the most recently used last. A connection
    /// comes back as soon as its response head is in; hyper's dispatcher
    /// marks it ready again once it has read that response to its end.
    idle: Vec<Pooled>,
    /// An HTTP/2 connection carries every request at once.
    h2: Option<http2::SendRequest<UpstreamBody>>,
}

struct Pooled {
    tx: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

enum Sender {
    H1(http1::SendRequest<UpstreamBody>),
    H2(http2::SendRequest<UpstreamBody>),
}

/// At most this many HTTP/1.1 connections per provider and worker are kept.
const MAX_IDLE: usize = 256;
/// A connection unused for this long is closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

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
        (0..=workers)
            .map(|_| Upstream::new(provider, tls.clone()))
            .collect::<Result<Box<[Upstream]>, TlsError>>()
            .map(Upstreams)
    }

    /// The client of the worker running this, or the shared one.
    pub fn here(&self) -> &Upstream {
        let shared = self.0.len() - 1;
        let i = WORKER.with(Cell::get).map_or(shared, |i| i.min(shared));
        &self.0[i]
    }
}

impl Upstream {
    fn new(provider: &ProviderConfig, tls: rustls::ClientConfig) -> Result<Upstream, TlsError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(provider.connect_timeout));
        http.set_nodelay(true);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let bad = || TlsError::Authority {
            key: format!("providers.{}.api_base", provider.name),
        };
        // Validated at load: api_base is an http(s) URL with a host; its
        // port is only there when it is not the scheme's default.
        let api = &provider.api_base;
        let scheme = if api.scheme() == "https" {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let host = api.host_str().ok_or_else(bad)?;
        let authority = match api.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.as_str())
            .path_and_query("/")
            .build()
            .map_err(|_| bad())?;
        Ok(Upstream {
            connector,
            origin,
            scheme,
            authority: Authority::try_from(authority.as_str()).map_err(|_| bad())?,
            host: HeaderValue::try_from(authority).map_err(|_| bad())?,
            pool: Mutex::new(Pool::default()),
            response_timeout: provider.request_timeout,
        })
    }

    /// Time allowed from sending a request to the response head (also the
    /// bound on reading a body that is rewritten whole).
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// Sends the request (its URI in origin form: path and query) and waits
    /// for the response head, within the provider's timeouts; the response
    /// body is left streaming.
    pub async fn send(&self, req: Request<UpstreamBody>) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout(self.response_timeout, self.send_now(req)).await {
            Err(_) => Err(ProxyError::UpstreamTimeout),
            Ok(answer) => answer,
        }
    }

    async fn send_now(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        loop {
            let (sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            let sent = match sender {
                Sender::H1(mut tx) => {
                    req.headers_mut().insert(HOST, self.host.clone());
                    let sent = tx.try_send_request(req).await;
                    if sent.is_ok() {
                        self.checkin(tx);
                    }
                    sent
                }
                Sender::H2(mut tx) => {
                    let mut parts = std::mem::take(req.uri_mut()).into_parts();
                    parts.scheme = Some(self.scheme.clone());
                    parts.authority = Some(self.authority.clone());
                    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| {
                        ProxyError::BadRequest("the request path cannot be forwarded")
                    })?;
                    tx.try_send_request(req).await
                }
            };
            match sent {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    // The connection closed before the request went out on
                    // it (a kept-alive one the upstream had just closed):
                    // nothing was sent, so it goes again, on another one.
                    Some(back) if reused => {
                        req = back;
                        if let Some(uri) = origin_form(req.uri()) {
                            *req.uri_mut() = uri;
                        }
                    }
                    _ => return Err(classify(e.error())),
                },
            }
        }
    }

    /// A connection ready for a request, if the pool has one.
    fn checkout(&self) -> Option<Sender> {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h2) = &pool.h2 {
            if !h2.is_closed() {
                return Some(Sender::H2(h2.clone()));
            }
            pool.h2 = None;
        }
        while let Some(i) = pool
            .idle
            .iter()
            .rposition(|c| c.tx.is_ready() || c.tx.is_closed())
        {
            let c = pool.idle.swap_remove(i);
            if !c.tx.is_closed() && c.since.elapsed() < IDLE_TIMEOUT {
                return Some(Sender::H1(c.tx));
            }
        }
        None
    }

    fn checkin(&self, tx: http1::SendRequest<UpstreamBody>) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.idle.len() >= MAX_IDLE {
            pool.idle.retain(|c| !c.tx.is_closed());
            if pool.idle.len() >= MAX_IDLE {
                pool.idle.remove(0);
            }
        }
        pool.idle.push(Pooled {
            tx,
            since: Instant::now(),
        });
    }

    /// Opens a connection (TCP, then TLS for https; HTTP/2 if ALPN says
    /// so) and starts the task that drives it.
    async fn connect(&self) -> Result<Sender, ProxyError> {
        let mut connector = self.connector.clone();
        let io = connector
            .call(self.origin.clone())
            .await
            .map_err(|e| classify(&*e))?;
        if io.connected().is_negotiated_h2() {
            let (tx, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| classify(&e))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            pool.h2 = Some(tx.clone());
            return Ok(Sender::H2(tx));
        }
        let (tx, conn) = http1::handshake(io).await.map_err(|e| classify(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(Sender::H1(tx))
    }
}

/// `uri` reduced to its path and query, if it has more.
fn origin_form(uri: &Uri) -> Option<Uri> {
    uri.authority()?;
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = uri.path_and_query().cloned();
    Uri::from_parts(parts).ok()
}

/// Maps a client error to the contract: a timed-out connect is a timeout,
/// a body over the provider's limit is 413, anything else is unreachable.
fn classify(e: &(dyn std::error::Error + 'static)) -> ProxyError {
    let mut source = Some(e);
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
    // Most heads have none of them: one pass over the names (standard
    // names compare as tags) instead of nine hashed removals.
    let is_hop = |name: &HeaderName| HOP_BY_HOP.contains(name) || name == http::header::UPGRADE;
    if !headers.keys().any(is_hop) {
        return;
    }
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
