//! The hot path: one proxied request, as a sequence of named phases.
//!
//! ```text
//! route -> identify -> resolve -> upstream_request -> send -> response_filter -> log
//! ```
//!
//! * `route` picks the provider from the path (or the dedicated listener)
//!   and refuses anything that is not ours: credproxy is never an open proxy.
//! * `identify` takes the session key out of the request, whichever of the
//!   contract's four places carried it, and removes every place a key or a
//!   credential could hide (**invariant: no session key reaches the upstream**).
//! * `resolve` maps the key to an [`ActiveSession`] (cache first, then store).
//! * `upstream_request` strips hop-by-hop headers, injects the credentials
//!   and builds the upstream URI.
//! * `send` forwards with the provider's timeouts; bodies stream both ways.
//! * The token lifecycle slots in after `send`: a 401 is where a refresh and
//!   a replay of a kept body go.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderName, CONTENT_LENGTH, HOST, PROXY_AUTHORIZATION};
use http::request::Parts;
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;

use crate::config::Config;
use crate::error::ProxyError;
use crate::forward::{strip_hop_by_hop, tls_config, TlsError, Upstream, UpstreamBody};
use crate::metrics::Metrics;
use crate::provider::{ProviderKind, Slot};
use crate::session::{KeyHash, Status};
use crate::sessions::{ActiveSession, SessionError, Sessions};

/// A response to the caller: the upstream's stream, or credproxy's own answer.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy)]
pub enum Mount {
    /// The main listener: `/{provider}/{rest}`.
    Prefixed,
    /// A provider's own `listen` port: every path goes to provider `n`, no prefix.
    Dedicated(usize),
}

/// A configured provider, with everything the hot path needs precomputed.
struct Route {
    /// Leaked once at start-up so metrics labels need no allocation per request.
    name: &'static str,
    kind: ProviderKind,
    scheme: Scheme,
    authority: Authority,
    /// `api_base`'s path without its trailing slash ("" for a bare host).
    base_path: String,
    default_session: Option<String>,
    max_request_body: Option<u64>,
    upstream: Upstream,
}

pub struct Proxy {
    routes: Vec<Route>,
    session_header: HeaderName,
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
}

/// What a request carried as its session key.
enum Presented<'a> {
    Key(KeyHash),
    Default(&'a str),
}

/// The fields of the access log line, filled in as the phases learn them.
struct AccessLog {
    provider: &'static str,
    session: Option<Arc<ActiveSession>>,
    upstream_ms: Option<u128>,
}

impl Proxy {
    pub fn new(
        config: &Config,
        sessions: Arc<Sessions>,
        metrics: Arc<Metrics>,
    ) -> Result<Proxy, TlsError> {
        let mut routes = Vec::with_capacity(config.providers.len());
        for p in &config.providers {
            // Validated at load: api_base is an http(s) URL with a host.
            let scheme = if p.api_base.scheme() == "https" {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            };
            let host = p.api_base.host_str().unwrap_or_default();
            let authority = match p.api_base.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            };
            tls_config(p)?; // surface a bad ca_file before binding anything
            routes.push(Route {
                name: Box::leak(p.name.clone().into_boxed_str()),
                kind: p.kind,
                scheme,
                authority: Authority::try_from(authority.as_str()).map_err(|_| {
                    TlsError::Authority {
                        key: format!("providers.{}.api_base", p.name),
                    }
                })?,
                base_path: p.api_base.path().trim_end_matches('/').to_owned(),
                default_session: p.default_session.clone(),
                max_request_body: p.max_request_body,
                upstream: Upstream::new(p)?,
            });
        }
        Ok(Proxy {
            routes,
            session_header: config.server.session_header.clone(),
            sessions,
            metrics,
        })
    }

    /// Index of the provider named `name`, for a dedicated listener.
    pub fn route_index(&self, name: &str) -> Option<usize> {
        self.routes.iter().position(|r| r.name == name)
    }

    /// Serves one request; never fails (errors become credproxy's own answers).
    pub async fn handle(
        &self,
        mount: Mount,
        local: SocketAddr,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let (parts, body) = req.into_parts();
        let method = parts.method.clone();
        let uri = parts.uri.clone();
        let mut log = AccessLog {
            provider: "-",
            session: None,
            upstream_ms: None,
        };
        let resp = match self.proxy(mount, local, parts, body, &mut log).await {
            Ok(resp) => resp,
            Err(e) => e.to_response().map(Either::Right),
        };
        let status = resp.status().as_u16();
        self.metrics.request(log.provider, status);
        tracing::info!(
            target: "credproxy::access",
            provider = log.provider,
            method = %method,
            path = uri.path(),
            status,
            upstream_ms = log.upstream_ms.map(|m| m as u64),
            total_ms = started.elapsed().as_millis() as u64,
            session = log.session.as_ref().map(|s| s.id.as_str()),
            error = resp.headers().get(crate::error::ERROR_HEADER).and_then(|v| v.to_str().ok()),
            "request"
        );
        resp
    }

    async fn proxy(
        &self,
        mount: Mount,
        local: SocketAddr,
        mut parts: Parts,
        body: Incoming,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (route, rest_at) = self.route(mount, local, &parts)?;
        log.provider = route.name;
        let uri = parts.uri.clone();
        let rest = &uri.path()[rest_at..];
        let rest = if rest.is_empty() { "/" } else { rest };

        let (presented, slot, query) = self.identify(route, &mut parts.headers, uri.query());
        let session = self.resolve(route, presented).await?;
        log.session = Some(Arc::clone(&session));

        let body = limit_body(route, &parts, body)?;
        let req = upstream_request(route, parts, body, &session, &slot, rest, query)?;

        let sent = Instant::now();
        let resp = route.upstream.send(req).await;
        let took = sent.elapsed();
        self.metrics.upstream_latency(route.name, took);
        log.upstream_ms = Some(took.as_millis());
        Ok(response_filter(resp?))
    }

    /// Picks the provider; refuses CONNECT and absolute-form URIs naming
    /// another host. Returns the route and where the upstream path starts.
    fn route(
        &self,
        mount: Mount,
        local: SocketAddr,
        parts: &Parts,
    ) -> Result<(&Route, usize), ProxyError> {
        if parts.method == Method::CONNECT {
            return Err(ProxyError::BadRequest(
                "CONNECT is not supported: credproxy is not an open proxy",
            ));
        }
        if let Some(authority) = parts.uri.authority() {
            if parts.uri.scheme() != Some(&Scheme::HTTP) || !names_us(authority, local) {
                return Err(ProxyError::BadRequest(
                    "absolute-form request URIs may only name this proxy: credproxy is not an open proxy",
                ));
            }
        }
        let path = parts.uri.path();
        match mount {
            Mount::Dedicated(i) => self
                .routes
                .get(i)
                .map(|r| (r, 0))
                .ok_or(ProxyError::UnknownRoute),
            Mount::Prefixed => {
                let tail = path.strip_prefix('/').ok_or(ProxyError::UnknownRoute)?;
                let name_len = tail.find('/').unwrap_or(tail.len());
                let name = &tail[..name_len];
                let route = self
                    .routes
                    .iter()
                    .find(|r| r.name == name)
                    .ok_or(ProxyError::UnknownRoute)?;
                Ok((route, 1 + name_len))
            }
        }
    }

    /// Takes the session key out of the request, in the contract's order:
    /// session header, `Proxy-Authorization: Bearer`, the provider's own
    /// slot, the provider's default session. All of these places are
    /// emptied whichever one carried the key.
    fn identify<'q>(
        &self,
        route: &'q Route,
        headers: &mut http::HeaderMap,
        query: Option<&'q str>,
    ) -> (Option<Presented<'q>>, Slot, Option<Cow<'q, str>>) {
        let from_header = headers
            .remove(&self.session_header)
            .and_then(|v| non_empty_hash(v.as_bytes()));
        let from_proxy_auth = headers.remove(PROXY_AUTHORIZATION).and_then(|v| {
            let v = v.to_str().ok()?.trim();
            let (scheme, key) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| non_empty_hash(key.as_bytes()))?
        });
        let (slot, query) = route.kind.take_slot(headers, query);
        let presented = from_header
            .or(from_proxy_auth)
            .or(slot.key)
            .map(Presented::Key)
            .or_else(|| route.default_session.as_deref().map(Presented::Default));
        (presented, slot, query)
    }

    async fn resolve(
        &self,
        route: &Route,
        presented: Option<Presented<'_>>,
    ) -> Result<Arc<ActiveSession>, ProxyError> {
        let found = match presented.ok_or(ProxyError::MissingSession)? {
            Presented::Key(hash) => self.sessions.by_key(&hash).await,
            Presented::Default(id) => self.sessions.by_id(id).await,
        };
        let session = match found {
            Ok(Some(s)) => s,
            // A session of a provider no longer configured is no session here.
            Ok(None) | Err(SessionError::UnknownProvider(_)) => {
                return Err(ProxyError::UnknownSession)
            }
            Err(SessionError::Store(e)) => {
                tracing::warn!(provider = route.name, error = %e, "session lookup failed");
                return Err(ProxyError::StoreUnavailable);
            }
            Err(e) => {
                tracing::error!(provider = route.name, error = %e, "a stored session cannot be used");
                return Err(ProxyError::Internal);
            }
        };
        // A key is only good for its own provider.
        if session.provider != route.name {
            return Err(ProxyError::UnknownSession);
        }
        if session.status == Status::ReauthorizationRequired {
            return Err(ProxyError::ReauthorizationRequired);
        }
        Ok(session)
    }
}

fn non_empty_hash(key: &[u8]) -> Option<KeyHash> {
    let key = key.trim_ascii();
    (!key.is_empty()).then(|| KeyHash::of(key))
}

/// Whether an absolute-form authority names this listener itself.
fn names_us(authority: &Authority, local: SocketAddr) -> bool {
    let port = authority.port_u16().unwrap_or(80);
    if port != local.port() {
        return false;
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip == local.ip())
}

/// Refuses a declared body over the provider's limit at once; a chunked one
/// is cut off by [`Limited`] when it crosses the limit.
fn limit_body(route: &Route, parts: &Parts, body: Incoming) -> Result<UpstreamBody, ProxyError> {
    let limit = route.max_request_body.unwrap_or(u64::MAX);
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge);
    }
    Ok(Either::Left(Limited::new(
        body,
        usize::try_from(limit).unwrap_or(usize::MAX),
    )))
}

/// Builds the request credproxy sends upstream.
fn upstream_request(
    route: &Route,
    mut parts: Parts,
    body: UpstreamBody,
    session: &ActiveSession,
    slot: &Slot,
    rest: &str,
    query: Option<Cow<'_, str>>,
) -> Result<Request<UpstreamBody>, ProxyError> {
    strip_hop_by_hop(&mut parts.headers);
    // The client sets Host (or :authority) from the upstream URI.
    parts.headers.remove(HOST);
    let query = session
        .credentials
        .inject(&mut parts.headers, query, slot, rest);
    let mut path_and_query = String::with_capacity(
        route.base_path.len() + rest.len() + query.as_ref().map_or(0, |q| q.len() + 1),
    );
    path_and_query.push_str(&route.base_path);
    path_and_query.push_str(rest);
    if let Some(q) = &query {
        path_and_query.push('?');
        path_and_query.push_str(q);
    }
    let uri = Uri::builder()
        .scheme(route.scheme.clone())
        .authority(route.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| ProxyError::BadRequest("the request path cannot be forwarded"))?;
    let mut req = Request::from_parts(parts, body);
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    req.extensions_mut().clear();
    Ok(req)
}

/// Passes the upstream's answer back with its hop-by-hop headers removed.
fn response_filter(resp: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.extensions.clear();
    Response::from_parts(parts, Either::Left(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_form_must_name_this_listener() {
        let local: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let a = |s: &str| Authority::try_from(s).expect("authority");
        assert!(names_us(&a("127.0.0.1:8080"), local));
        assert!(names_us(&a("localhost:8080"), local));
        assert!(!names_us(&a("127.0.0.1:9999"), local));
        assert!(!names_us(&a("evil.example:8080"), local));
        assert!(!names_us(&a("sparkapi.com"), local));
    }
}
