//! Talking to an upstream API: pools of connections per provider (one per
//! proxy worker, see [`Upstreams`]), over rustls (HTTP/1.1 or HTTP/2 by
//! ALPN, webpki roots), with the provider's connect and response-header
//! timeouts, and hop-by-hop header hygiene. Every HTTP/1.1 request goes
//! over credproxy's own client ([`h1`]), whatever its body; hyper's client
//! carries only HTTP/2.
//!
//! Bodies are never collected here: request and response bodies stream
//! through frame by frame, so memory use does not grow with body size.

use std::borrow::Cow;
use std::cell::Cell;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tower_service::Service as _;

use super::silence::{BodyReadTimeout, BodyStalled, Silence};
use crate::config::ProviderConfig;
use crate::error::{chain, Cause, Failure, ProxyError};
pub use crate::tls::{tls_config, TlsError};

pub mod h1;

/// A request body on its way upstream: the caller's stream (with the
/// provider's size limit), bytes held for a replay, or both (a prefix read
/// while deciding, then the rest of the stream).
pub type UpstreamBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A request body on its way upstream, as the proxy has it: in memory
/// (none, or kept for a replay), or streaming from the caller.
pub enum Outbound {
    Kept(Bytes),
    Streamed(UpstreamBody),
}

impl Outbound {
    fn into_body(self) -> UpstreamBody {
        match self {
            Outbound::Kept(bytes) => Full::new(bytes).map_err(|never| match never {}).boxed(),
            Outbound::Streamed(body) => body,
        }
    }
}

/// An upstream request's head: method, URI in origin form (path and
/// query), headers with the credentials in. The proxy builds it once per
/// request and lends it to each attempt ([`Upstream::send`] takes a
/// `Cow`): credproxy's HTTP/1.1 client only reads it, and hyper's HTTP/2
/// one, which needs it owned, gets a copy only when another attempt may
/// follow.
#[derive(Clone)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

impl Head {
    fn into_request<B>(self, body: B) -> Request<B> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.headers_mut() = self.headers;
        req
    }
}

/// An upstream answer's body: read by credproxy's HTTP/1.1 client, or by
/// hyper's HTTP/2 one. An upstream that sends nothing more
/// for the provider's `request_timeout` while the body is waited for breaks
/// the body off ([`BodyStalled`]): a head and a few bytes, then silence,
/// must not hold the caller's connection and the upstream's forever.
pub type UpBody = Silence<UpInner>;

/// Which client reads an answer's body: credproxy's (HTTP/1.1) or hyper's
/// (HTTP/2).
pub enum UpInner {
    Own(h1::H1Body),
    Hyper(Incoming),
}

impl Body for UpInner {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpInner::Own(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpInner::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpInner::Own(b) => b.is_end_stream(),
            UpInner::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpInner::Own(b) => b.size_hint(),
            UpInner::Hyper(b) => b.size_hint(),
        }
    }
}

/// One provider's upstream connections (for one proxy worker) and timeouts.
///
/// Pools are credproxy's own rather than hyper-util's legacy client (which
/// spent ~1.6 us per request here: a checkout future, pool key hashing, a
/// task per request to put the connection back; the profile on issue 15).
/// Every HTTP/1.1 request, its body in memory or streamed, goes over
/// credproxy's HTTP/1.1 client ([`h1`]), read and written by the request's
/// own task; when ALPN picks HTTP/2, every request goes over that
/// connection, with hyper's HTTP/2 client (its connection in a task of the
/// worker). Connections come from hyper-rustls's connector (TCP, then TLS
/// for https).
pub struct Upstream {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`, where connections go.
    origin: Uri,
    scheme: Scheme,
    authority: Authority,
    /// The `Host` of HTTP/1.1 requests (HTTP/2 carries `:authority`).
    host: HeaderValue,
    /// Idle connections of credproxy's HTTP/1.1 client.
    own: h1::Idle,
    /// The HTTP/2 connection, which carries every request at once, if the
    /// upstream chose HTTP/2.
    h2: Mutex<Option<http2::SendRequest<UpstreamBody>>>,
    /// Whether the upstream has answered in HTTP/2 (then `h2`).
    speaks_h2: AtomicBool,
    response_timeout: Duration,
}

/// A new connection, by what ALPN chose (plain http: HTTP/1.1).
enum Connected {
    H1(Box<MaybeHttpsStream<TokioIo<TcpStream>>>),
    H2(http2::SendRequest<UpstreamBody>),
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

/// How often a proxy worker closes the idle upstream connections that the
/// upstream has closed ([`Upstream::reap`]).
pub const REAP_INTERVAL: Duration = Duration::from_secs(2);

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
            own: h1::Idle::default(),
            h2: Mutex::new(None),
            speaks_h2: AtomicBool::new(false),
            response_timeout: provider.request_timeout,
        })
    }

    /// Time allowed from sending a request to the response head (also the
    /// bound on reading a body that is rewritten whole).
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// Sends the request (`head`, then `body`) for the session `owner` and
    /// waits for the response head, within the provider's timeouts; the
    /// response body is left streaming.
    ///
    /// **Isolation:** an HTTP/1.1 connection is reused only by the session
    /// it was opened for (`owner`), so whatever an upstream sends beyond an
    /// answer's framing can never reach another session. HTTP/2 streams
    /// are framed apart by the protocol and share one connection.
    pub async fn send(
        &self,
        head: Cow<'_, Head>,
        body: Outbound,
        owner: &str,
    ) -> Result<Response<UpBody>, ProxyError> {
        let idle = self.response_timeout;
        match tokio::time::timeout(self.response_timeout, self.send_now(head, body, owner)).await {
            Err(_) => Err(ProxyError::timeout(Cause::Timeout)),
            Ok(answer) => answer.map(|resp| resp.map(|body| Silence::answer(body, idle))),
        }
    }

    async fn send_now(
        &self,
        head: Cow<'_, Head>,
        body: Outbound,
        owner: &str,
    ) -> Result<Response<UpInner>, ProxyError> {
        if self.speaks_h2.load(Ordering::Relaxed) {
            if let Some(tx) = self.checkout_h2() {
                let req = head.into_owned().into_request(body.into_body());
                // Boxed, as `connect` is: HTTP/2 upstreams are the rare
                // case, and their ~900 bytes would be in every request.
                return Ok(Box::pin(self.send_h2(tx, req)).await?.map(UpInner::Hyper));
            }
        }
        self.send_h1(head, body, owner).await
    }

    /// Over credproxy's HTTP/1.1 client, on an idle connection of
    /// `owner`'s or a new one (or over HTTP/2, if ALPN chooses it for the
    /// new one). A GET, HEAD or OPTIONS with its body in memory that finds
    /// its kept-alive connection closed by the upstream (before any byte of
    /// an answer) goes once more, on a new connection; a streamed body
    /// never goes twice.
    async fn send_h1(
        &self,
        head: Cow<'_, Head>,
        body: Outbound,
        owner: &str,
    ) -> Result<Response<UpInner>, ProxyError> {
        let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
        let (method, headers) = (&head.method, &head.headers);
        let (wire, mut stream) = match body {
            Outbound::Kept(bytes) => (
                h1::Wire::kept(method, path, &self.host, headers, bytes),
                None,
            ),
            Outbound::Streamed(body) => (
                h1::Wire::streamed(method, path, &self.host, headers, &body),
                Some(body),
            ),
        };
        let head_request = head.method == Method::HEAD;
        // Only a safe method goes again: the request was written, and an
        // upstream that acted on it and then reset would see a PUT or a
        // DELETE twice.
        let safe = matches!(head.method, Method::GET | Method::HEAD | Method::OPTIONS);
        // The first try on an idle connection, if there is one; a second
        // one (only after a reused connection failed) always on a new one:
        // another idle one may have been closed at the same moment. A new
        // connection is never tried again, so this loops at most twice.
        let mut pooled = self.checkout_own(owner);
        loop {
            let (conn, reused) = match pooled.take() {
                Some(conn) => (conn, true),
                // Boxed: the connector's future (TCP, then TLS) is ~8 KB,
                // and unboxed it would make every request's future that
                // big, and every move of it (one per call level) a copy
                // of that much, for the few requests that connect.
                None => match Box::pin(self.connect()).await? {
                    Connected::H1(io) => (h1::Conn::new(TokioIo::new(*io), owner), false),
                    Connected::H2(tx) => {
                        // A streamed body is still here: only a body in
                        // memory is tried twice.
                        let body = match stream {
                            Some(body) => Outbound::Streamed(body),
                            None => Outbound::Kept(wire.into_kept()),
                        };
                        let req = head.into_owned().into_request(body.into_body());
                        return Ok(Box::pin(self.send_h2(tx, req)).await?.map(UpInner::Hyper));
                    }
                },
            };
            let streamed = stream.is_some();
            match conn
                .exchange(&wire, stream.take(), head_request, &self.own)
                .await
            {
                Ok(resp) => return Ok(resp.map(UpInner::Own)),
                Err(e) if reused && safe && !streamed && e.unanswered() => {
                    tracing::debug!(error = %e, "a kept-alive upstream connection was closed; sending again");
                }
                Err(e) => return Err(classify(e)),
            }
        }
    }

    /// An idle connection of credproxy's client, opened for `owner`, that
    /// can take a request: the most recently used first.
    fn checkout_own(&self, owner: &str) -> Option<Box<h1::Conn>> {
        let mut idle = self.own.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let i = idle.iter().rposition(|c| c.owner() == owner)?;
            let mut conn = idle.remove(i)?;
            if conn.since().elapsed() < h1::IDLE_TIMEOUT && conn.still_open() {
                return Some(conn);
            }
        }
    }

    /// Closes the idle connections that the upstream has closed (each
    /// would sit in CLOSE_WAIT, holding a descriptor, until a checkout
    /// found it) or that have been idle too long. Called by each proxy
    /// worker every [`REAP_INTERVAL`], on its own pools.
    pub fn reap(&self) {
        let mut idle = self.own.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain_mut(|c| c.since().elapsed() < h1::IDLE_TIMEOUT && c.still_open());
    }

    async fn send_h2(
        &self,
        mut tx: http2::SendRequest<UpstreamBody>,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        *req.uri_mut() = Uri::from_parts(parts)
            .map_err(|_| ProxyError::BadRequest("the request path cannot be forwarded"))?;
        tx.send_request(req).await.map_err(classify)
    }

    /// The HTTP/2 connection, if there is one and it is open.
    fn checkout_h2(&self) -> Option<http2::SendRequest<UpstreamBody>> {
        let mut h2 = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = h2.as_ref()?;
        if !tx.is_closed() {
            return Some(tx.clone());
        }
        *h2 = None;
        self.speaks_h2.store(false, Ordering::Relaxed);
        None
    }

    /// Opens a connection (TCP, then TLS for https). An HTTP/2 one (by
    /// ALPN) gets its task and becomes the upstream's `h2`; an HTTP/1.1 one
    /// is returned as it is, for credproxy's client.
    async fn connect(&self) -> Result<Connected, ProxyError> {
        let mut connector = self.connector.clone();
        let io = connector
            .call(self.origin.clone())
            .await
            .map_err(connect_error)?;
        if !io.connected().is_negotiated_h2() {
            return Ok(Connected::H1(Box::new(io)));
        }
        let (tx, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(classify)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        *self.h2.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx.clone());
        self.speaks_h2.store(true, Ordering::Relaxed);
        Ok(Connected::H2(tx))
    }
}

/// Maps a client error to the contract: a body over the provider's limit
/// is 413, a request body that stopped arriving 408, a timed-out connect or
/// a silent answer a timeout, anything else unreachable; the last two keep
/// the error and its [`Cause`] for the access log.
pub fn classify(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ProxyError {
    let e = e.into();
    let mut timed_out = None;
    for err in chain(&*e) {
        if err.is::<http_body_util::LengthLimitError>() {
            return ProxyError::BodyTooLarge;
        }
        if err.is::<BodyReadTimeout>() {
            return ProxyError::RequestTimeout;
        }
        if err.is::<BodyStalled>() {
            timed_out = timed_out.or(Some(Cause::Stalled));
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                timed_out = timed_out.or(Some(Cause::Timeout));
            }
        }
    }
    match timed_out {
        Some(cause) => ProxyError::UpstreamTimeout(Failure::new(cause, Some(e))),
        None => ProxyError::UpstreamUnreachable(Failure::new(cause_of(&*e), Some(e))),
    }
}

/// What a client error says about why the exchange failed: a TLS error
/// anywhere in its chain first, else the outermost error that says.
pub fn cause_of(e: &(dyn std::error::Error + 'static)) -> Cause {
    if let Some(tls) = chain(e).find_map(|e| e.downcast_ref::<rustls::Error>()) {
        return match tls {
            rustls::Error::InvalidCertificate(_) => Cause::Certificate,
            _ => Cause::Protocol,
        };
    }
    chain(e).find_map(says).unwrap_or(Cause::Other)
}

/// The cause one error of a chain names, if it names one.
fn says(e: &(dyn std::error::Error + 'static)) -> Option<Cause> {
    use std::io::ErrorKind;
    if e.is::<BodyStalled>() {
        return Some(Cause::Stalled);
    }
    if let Some(h1) = e.downcast_ref::<h1::H1Error>() {
        return match h1 {
            h1::H1Error::Closed => Some(Cause::Closed),
            h1::H1Error::Invalid(_) => Some(Cause::Protocol),
            // Its source, the I/O error or the body's, says.
            h1::H1Error::Io(_) | h1::H1Error::Body(_) => None,
        };
    }
    if let Some(h) = e.downcast_ref::<hyper::Error>() {
        if h.is_parse() || h.is_parse_status() || h.is_parse_too_large() {
            return Some(Cause::Protocol);
        }
        if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
            return Some(Cause::Closed);
        }
        return None;
    }
    let io = e.downcast_ref::<std::io::Error>()?;
    Some(match io.kind() {
        ErrorKind::ConnectionRefused => Cause::Refused,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            Cause::Reset
        }
        ErrorKind::UnexpectedEof => Cause::Closed,
        ErrorKind::TimedOut => Cause::Timeout,
        ErrorKind::InvalidData => Cause::Protocol,
        _ => return None,
    })
}

/// A connection that could not be opened. hyper-util's connector reports
/// the TCP stage (name resolution, connect) in an error of its own, whose
/// text for a resolver's failure is "dns error"; hyper-rustls reports the
/// TLS stage as an I/O error, and everything that fails there, past the
/// TCP connect, is the handshake (or the certificate).
fn connect_error(e: Box<dyn std::error::Error + Send + Sync>) -> ProxyError {
    let tls_stage = e.is::<std::io::Error>();
    let dns = !tls_stage && e.to_string() == "dns error";
    let mut error = classify(e);
    if let Some(failure) = error.failure_mut() {
        failure.cause = match failure.cause {
            Cause::Certificate => Cause::Certificate,
            _ if tls_stage => Cause::TlsHandshake,
            _ if dns => Cause::Dns,
            Cause::Timeout => Cause::ConnectTimeout,
            cause => cause,
        };
    }
    error
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
    // One pass over the names (standard names compare as tags), then
    // removals only for what is there: most heads have none, or just
    // `Connection: keep-alive`.
    let is_hop = |name: &HeaderName| HOP_BY_HOP.contains(name) || name == http::header::UPGRADE;
    let mut doomed: Vec<HeaderName> = headers.keys().filter(|n| is_hop(n)).cloned().collect();
    if doomed.is_empty() {
        return;
    }
    for token in headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        if let Ok(name) = HeaderName::from_bytes(token.trim().as_bytes()) {
            if headers.contains_key(&name) && !doomed.contains(&name) {
                doomed.push(name);
            }
        }
    }
    for name in doomed {
        headers.remove(name);
    }
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

        // nginx's answer: `Connection: keep-alive` and nothing else of the kind.
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));

        // A name listed in Connection goes even when no other hop header is there.
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("x-a, X-B"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.insert("x-b", HeaderValue::from_static("3"));
        h.insert("x-c", HeaderValue::from_static("4"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-c"], "4");
    }
}
