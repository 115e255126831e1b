//! The hot path: one proxied request, as a sequence of named phases.
//!
//! ```text
//! route -> identify -> resolve -> ensure_fresh -> prepare_body -> send -> decide -> response_filter
//! ```
//!
//! * `route` picks the provider from the path (or the dedicated listener)
//!   and refuses anything that is not ours: credproxy is never an open proxy.
//! * `identify` takes the session key out of the request, whichever of the
//!   contract's four places carried it, and removes every place a key or a
//!   credential could hide (**invariant: no session key reaches the upstream**).
//! * `resolve` maps the key to an [`ActiveSession`] (cache first, then store).
//! * `ensure_fresh` refreshes a token within `refresh_margin` of its expiry
//!   before it is used (proactive).
//! * `prepare_body` keeps a body up to `max_replay_body` so the request can
//!   be replayed; a larger one streams.
//! * The upstream head is built once: hop-by-hop headers and `Host` out,
//!   the credentials in and the upstream URI made by [`Target::address`].
//!   Each attempt borrows it while another may follow (a rate-limit resend,
//!   a replay) and the last one takes it, so it is copied only when hyper's
//!   client needs it owned and it may still be needed.
//! * `send` forwards with the provider's timeouts; bodies stream both ways.
//! * `decide` is the one place that says what an answer means: an upstream
//!   401 on a kept body means refresh (unless another request already did)
//!   and replay once, with fresh credentials written into the same head
//!   (reactive). The second answer goes back as it is. A streamed body's
//!   401 goes back as it is, and the refresh happens in the background for
//!   the next request.
//! * `response_filter` drops hop-by-hop headers, moves links on the
//!   provider's origins behind the proxy (`links.rs`: `Location`,
//!   `Content-Location`, `Link`, JSON and XML bodies); `send` has already
//!   scrubbed the injected credentials from every header of the answer.
//! * `handle` wraps the answer's body in [`Logged`] (`access.rs`), which
//!   writes the access-log line once the body has been sent or broken off.
//!
//! Traces (with `[telemetry] otlp_endpoint` only, see `telemetry/`): `handle`
//! makes the server span, the child of the caller's `traceparent` if it
//! sent one; `send` makes a client span per upstream attempt (a resend or
//! a replay is another) and sends that span's `traceparent` upstream in
//! place of the caller's. Attributes are the caller's method and path (no
//! query), statuses, the provider and the session id: no token, key or
//! injected parameter.

mod access;
pub mod forward;
pub mod links;
pub mod silence;
mod spans;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH,
    CONTENT_LOCATION, CONTENT_TYPE, HOST, LINK, LOCATION, PROXY_AUTHORIZATION,
};
use http::request::Parts;
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, Uri};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, BodyStream, Either, Full, Limited, StreamBody};

use crate::config::Config;
use crate::config::{JsonCode, Signal};
use crate::error::{Cause, Failure, ProxyError};
use crate::metrics::{Metrics, RouteMetrics};
use crate::pacing::{self, Gate, Verdict};
use crate::provider::{Shape, Slot, MAX_DECODE_ROUNDS};
pub use crate::proxy::forward::enter_worker;
use crate::proxy::forward::{
    strip_hop_by_hop, Head, Outbound, TlsError, UpBody, UpstreamBody, Upstreams,
};
use crate::secrets::session::{KeyHash, Status};
use crate::store;
use crate::telemetry;
use crate::tokens::refresh::{RefreshError, Refresher};
use crate::tokens::sessions::{ActiveSession, Grant, Refusal, Scope, SessionError, Sessions};
pub use access::Logged;
use access::{AccessLog, BytesIn, Line};
use links::{Bases, Coding, LinkBody, LinkMap, Origin, Rewriter};
use silence::{BodyReadTimeout, Silence};
use spans::{attempt_span, record_answer, server_span};
use tracing::Instrument;

/// A response to the caller: the upstream's stream, or credproxy's own answer.
///
/// The link rewriter's body is boxed: it is ~700 bytes, and unboxed every
/// answer (each move of it, from the upstream to the connection's writer)
/// would be that large.
pub type ProxyBody = Either<UpBody, Either<Pin<Box<LinkBody>>, Full<Bytes>>>;

/// A caller's request body, as a server side hands it to [`Proxy::handle`]
/// (credproxy's own HTTP/1.1 server: `server::h1`).
pub trait CallerBody:
    http_body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + Sync
    + Unpin
    + 'static
{
}

impl<B> CallerBody for B where
    B: http_body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + Sync
        + Unpin
        + 'static
{
}

fn own(body: Full<Bytes>) -> ProxyBody {
    Either::Right(Either::Right(body))
}

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
    /// Where a caller may put its key, and what is removed before forwarding.
    shape: Shape,
    /// The answers that mean "refresh and replay" and "over the budget".
    expired: Signal,
    /// `kind = "static"`: sessions hold a stored key, never refreshed.
    stored_key: bool,
    /// Answers that say the credential itself is bad (Spark's 1000, 1010).
    revoked: Vec<Signal>,
    /// Spark's API keys: requests are signed over their body, and the
    /// application's own `POST /v1/session` is answered here.
    signs: bool,
    throttled: Signal,
    /// `api_base`'s path without its trailing slash ("" for a bare host).
    base_path: String,
    /// `api_base`'s host and port (the attempts' `server.address`).
    api_host: String,
    api_port: u16,
    default_session: Option<String>,
    max_request_body: Option<u64>,
    max_replay_body: usize,
    /// `server.body_read_timeout`: a request body's no-progress limit.
    body_read_timeout: Duration,
    refresh_margin: Duration,
    upstream: Upstreams,
    /// Whose sessions this route serves (`sessions_from`, or its own name).
    session_owner: &'static str,
    /// The origins whose links this route's responses move behind the proxy:
    /// its own and those of every provider sharing its sessions.
    links: Option<Arc<LinkMap>>,
    /// Route index of each target of `links`.
    link_targets: Vec<usize>,
    /// The provider's rate-limit gate: a permit before every send.
    gate: Arc<Gate>,
    /// Its place in `Proxy::routes`.
    index: usize,
    /// Its per-request metric series, resolved once.
    metrics: RouteMetrics,
}

/// What the response phase needs to know about the request.
struct Asked<'a> {
    mount: Mount,
    local: SocketAddr,
    uri: &'a Uri,
    /// The request's `Host` as sent (a shared-buffer clone, no copy); only
    /// looked at when a link is rewritten: see [`Asked::host`].
    host_header: Option<HeaderValue>,
    head: bool,
}

impl Asked<'_> {
    /// The request's `Host` (or absolute-form authority), if it is a plain
    /// `host[:port]`; anything else falls back to the listener's address.
    fn host(&self) -> Option<&str> {
        let raw = match self.uri.authority() {
            Some(a) => a.as_str(),
            None => self.host_header.as_ref()?.to_str().ok()?,
        };
        is_plain_host(raw).then_some(raw)
    }
}

/// The TCP peer's address, put in each request's extensions by the
/// server: what the budget of cold session lookups is kept per.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::IpAddr);

pub struct Proxy {
    routes: Vec<Route>,
    /// `server.proxy_url` without its trailing slash.
    proxy_url: Option<String>,
    /// The main listener, for links from a dedicated listener to another provider.
    listen: SocketAddr,
    session_header: HeaderName,
    /// `store.over_budget_hold`: how long a 429 for the cold-lookup budget waits.
    over_budget_hold: Duration,
    sessions: Arc<Sessions>,
    refresher: Arc<Refresher>,
    metrics: Arc<Metrics>,
}

/// A request body after `prepare_body`.
enum Prepared {
    /// Kept whole: the request can be replayed.
    Kept(Bytes),
    /// Too large to keep (or no replay possible): sent once, streamed.
    Streamed(UpstreamBody),
}

/// Where the upstream request goes and how the caller presented its key:
/// what [`Target::address`] writes a session's credentials and the upstream
/// URI from, into the head built once (again with fresh credentials for a
/// replay).
struct Target<'a> {
    slot: Slot,
    /// The path after the route's prefix.
    rest: &'a str,
    /// The caller's query, without the provider's credential slot.
    query: Option<Cow<'a, str>>,
}

/// What a request carried as its session key.
enum Presented<'a> {
    Key(KeyHash),
    Default(&'a str),
}

/// What `identify` found: the key presented (if any), what the provider's
/// slot held, and the query to forward.
type Identified<'q> = (Option<Presented<'q>>, Slot, Option<Cow<'q, str>>);

/// A request's place in its provider's rate-limit queue.
struct Pace {
    /// Set at the first send: the request may wait until then.
    deadline: Option<tokio::time::Instant>,
    /// After the first send, every later one goes to the queue's front.
    resend: bool,
}

/// An upstream answer: streaming, or read whole to be classified (an error
/// whose JSON code says whether it is the rate limit or an expired token,
/// such as Spark's 503 with 1550).
enum Answer {
    Stream(Response<UpBody>),
    Read(Response<Bytes>),
}

/// What an answer means, by the provider's `expired` and `throttled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meaning {
    verdict: Verdict,
    /// The token was refused as expired: refresh and replay.
    expired: bool,
    /// The credential itself was refused: the session needs reauthorization.
    revoked: bool,
}

/// The `Expires` credproxy gives an application's own Spark session: the
/// session key does not expire, so a day keeps old clients from reopening.
const OWN_SESSION_LIFETIME: Duration = Duration::from_secs(86_400);

/// How many rate-limit refusals a request is sent again after.
const MAX_RESENDS: u32 = 3;

impl Proxy {
    pub fn new(
        config: &Config,
        sessions: Arc<Sessions>,
        refresher: Arc<Refresher>,
        metrics: Arc<Metrics>,
    ) -> Result<Proxy, TlsError> {
        let mut routes = Vec::with_capacity(config.providers.len());
        let workers = config.server.workers();
        // Names this process in the shared budget's lease table.
        let instance = format!(
            "{}-{}",
            std::process::id(),
            crate::secrets::session::new_session_id()
        );
        for p in &config.providers {
            let name: &'static str = Box::leak(p.name.clone().into_boxed_str());
            let store = sessions.store();
            let gate = Gate::new(
                name,
                p.rate_limit,
                p.max_queue_wait,
                store.shares_budgets().then_some((store, instance.as_str())),
                metrics.gate_metrics(name, p.rate_limit.is_some()),
            );
            metrics.watch_gate(&gate);
            routes.push(Route {
                name,
                shape: Shape::new(&p.description),
                expired: p.description.expired.clone(),
                stored_key: p.description.scheme == crate::config::Scheme::Static,
                revoked: p.description.revoked.clone(),
                signs: p.description.scheme == crate::config::Scheme::SparkApiKey,
                throttled: p.description.throttled.clone(),
                base_path: p.api_base.path().trim_end_matches('/').to_owned(),
                api_host: p.api_base.host_str().unwrap_or_default().to_owned(),
                api_port: p.api_base.port_or_known_default().unwrap_or_default(),
                default_session: p.default_session.clone(),
                max_request_body: p.max_request_body,
                max_replay_body: p.max_replay_body,
                body_read_timeout: config.server.body_read_timeout,
                refresh_margin: p.refresh_margin,
                upstream: Upstreams::new(p, workers)?,
                session_owner: Box::leak(p.session_owner().to_owned().into_boxed_str()),
                links: None,
                link_targets: Vec::new(),
                gate,
                index: routes.len(),
                metrics: metrics.route(name),
            });
        }
        // A route's family: the providers that share its sessions.
        for i in 0..routes.len() {
            let owner = routes[i].session_owner;
            let family: Vec<usize> = (0..routes.len())
                .filter(|&j| routes[j].session_owner == owner)
                .collect();
            let origins: Vec<Origin> = family
                .iter()
                .enumerate()
                .map(|(target, &j)| {
                    let api = &config.providers[j].api_base;
                    Origin {
                        scheme: api.scheme().to_owned(),
                        host: api.host_str().unwrap_or_default().to_owned(),
                        port: api.port(),
                        base_path: routes[j].base_path.clone(),
                        target,
                    }
                })
                .collect();
            let strip = family
                .iter()
                .map(|&j| routes[j].shape.query_names())
                .collect();
            routes[i].links = LinkMap::new(&origins, strip).map(Arc::new);
            routes[i].link_targets = family;
        }
        Ok(Proxy {
            routes,
            proxy_url: config
                .server
                .proxy_url
                .as_ref()
                .map(|u| u.as_str().trim_end_matches('/').to_owned()),
            listen: config.server.listen,
            session_header: config.server.session_header.clone(),
            over_budget_hold: config.store.over_budget_hold,
            sessions,
            refresher,
            metrics,
        })
    }

    /// Index of the provider named `name`, for a dedicated listener.
    /// Closes the idle upstream connections of the calling worker that
    /// their upstream has closed or that were idle too long (see
    /// [`forward::Upstream::reap`]).
    pub fn reap_idle(&self) {
        for route in &self.routes {
            route.upstream.here().reap();
        }
    }

    pub fn route_index(&self, name: &str) -> Option<usize> {
        self.routes.iter().position(|r| r.name == name)
    }

    /// Serves one request; never fails (errors become credproxy's own answers).
    pub async fn handle<B>(
        &self,
        mount: Mount,
        local: SocketAddr,
        req: Request<B>,
    ) -> Response<Logged<ProxyBody>>
    where
        B: CallerBody,
    {
        let started = Instant::now();
        let (parts, body) = req.into_parts();
        let method = parts.method.clone();
        let uri = parts.uri.clone();
        let span = server_span(&parts);
        let mut log = AccessLog::new(span.clone());
        let (resp, failed) = match self
            .proxy(mount, local, parts, body, &mut log)
            .instrument(span)
            .await
        {
            Ok(resp) => (resp, None),
            // The answer is the fixed code and message; why the upstream
            // failed goes only to the log line.
            Err(e) => (e.to_response().map(own), Some(e)),
        };
        let failure = failed.as_ref().and_then(ProxyError::failure);
        let status = resp.status().as_u16();
        match log.route.and_then(|i| self.routes.get(i)) {
            Some(route) => route.metrics.request(&self.metrics, status),
            None => self.metrics.request(log.provider, status),
        }
        let error = resp.headers().get(crate::error::ERROR_HEADER).cloned();
        if !log.span.is_none() {
            record_answer(&log, status, error.as_ref(), failure);
        }
        let line = Line {
            log,
            method,
            uri,
            status,
            started,
            head: started.elapsed(),
            error,
            cause: failure.map(|f| f.cause.as_str()),
            detail: failure.and_then(|f| f.detail()),
        };
        resp.map(|body| Logged::new(body, line))
    }

    async fn proxy<B: CallerBody>(
        &self,
        mount: Mount,
        local: SocketAddr,
        mut parts: Parts,
        body: B,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (route, rest_at) = self.route(mount, local, &parts)?;
        log.provider = route.name;
        log.route = Some(route.index);
        let uri = parts.uri.clone();
        let rest = &uri.path()[rest_at..];
        let rest = if rest.is_empty() { "/" } else { rest };
        let asked = Asked {
            mount,
            local,
            uri: &uri,
            // The upstream client sets Host (or :authority) from the upstream URI.
            host_header: parts.headers.remove(HOST),
            head: parts.method == Method::HEAD,
        };

        if route.signs && parts.method == Method::POST && rest == "/v1/session" {
            let client = parts.extensions.get::<ClientAddr>().map(|c| c.0);
            // Boxed: rare, and its future would be in every request's.
            return Box::pin(self.open_own_session(route, uri.query(), client, log)).await;
        }
        let (presented, slot, query) = self.identify(route, &mut parts.headers, uri.query())?;
        if matches!(presented, Some(Presented::Default(_))) && from_a_web_page(&parts.headers) {
            // Without a key, any page a browser opens could use the account.
            return Err(ProxyError::BadRequest(
                "a request from a web page must present a session key; the default session is not used for it",
            ));
        }
        let client = parts.extensions.get::<ClientAddr>().map(|c| c.0);
        let (session, grant) = self.resolve(route, presented, client).await?;
        log.session = Some(Arc::clone(&session));
        // The key's scope, before any refresh, budget or upstream call: a
        // key without limits has none (one branch).
        let limits_methods = match grant.as_deref() {
            Some(Grant {
                scope: Some(scope), ..
            }) => {
                self.check_scope(route, scope, &parts, rest)?;
                scope.limits_methods()
            }
            _ => false,
        };
        if let Some(grant) = &grant {
            self.sessions.note_key_use(grant, store::now());
        }
        log.key = grant;
        let version = session.version;
        let session = self.ensure_fresh(route, session).await?;
        log.refreshed = session.version != version;
        log.session = Some(Arc::clone(&session));

        strip_hop_by_hop(&mut parts.headers);
        if route.links.is_some() {
            limit_accept_encoding(&mut parts.headers);
        }
        // A form POST is kept whole when it fits, replayable or not, so that
        // a `_method` in it is seen (`form_overrides_to_refused_method`).
        let form_post = parts.method == Method::POST && is_form(&parts.headers);
        let keep = session.has_refresh_token || form_post;
        let body = match prepare_body(route, &parts.headers, body, keep).await? {
            Prepared::Kept(bytes) => {
                log.bytes_in = BytesIn::Known(bytes.len() as u64);
                Prepared::Kept(bytes)
            }
            Prepared::Streamed(body) => Prepared::Streamed(log.count_in(body)),
        };
        if route.signs && matches!(body, Prepared::Streamed(_)) {
            // Signed over the body as sent: only a body kept in memory can be.
            return Err(ProxyError::BodyTooLargeToSign);
        }
        if let Prepared::Kept(bytes) = &body {
            if form_post && form_overrides_to_refused_method(&parts.headers, bytes) {
                return Err(ProxyError::BadRequest(REFUSED_OVERRIDE));
            }
            // A key limited to some methods may not name another in its form.
            if limits_methods && form_post && form_overrides_method(bytes) {
                self.metrics.key_refusal(route.name, "forbidden_by_scope");
                return Err(ProxyError::ForbiddenByScope);
            }
        }
        // The head is built once; a replay writes fresh credentials into it.
        let target = Target { slot, rest, query };
        let mut headers = parts.headers;
        let signed: &[u8] = match &body {
            Prepared::Kept(bytes) => bytes,
            Prepared::Streamed(_) => &[],
        };
        let uri = target.address(route, &session, &mut headers, signed)?;
        let head = Head {
            method: parts.method,
            uri,
            headers,
        };
        let mut pace = Pace {
            deadline: None,
            resend: false,
        };
        let answer = match body {
            // A streamed body goes once: the head goes with it.
            Prepared::Streamed(body) => {
                let outbound = Outbound::Streamed(body);
                let (answer, meaning) = self
                    .send(route, &session, Cow::Owned(head), outbound, log, &mut pace)
                    .await?;
                if (route.stored_key && meaning.expired) || meaning.revoked {
                    self.refresher.credential_refused(&session);
                }
                self.decide(&session, meaning.expired, None, false);
                answer
            }
            Prepared::Kept(bytes) => {
                self.attempts(route, session, &target, head, bytes, log, &mut pace)
                    .await?
            }
        };
        match answer {
            Answer::Stream(resp) => self.response_filter(route, &asked, resp).await,
            Answer::Read(resp) => Ok(pass_read(resp)),
        }
    }

    /// The attempt loop of a request whose body was kept: send (again
    /// while the provider refuses it for its rate limit, see
    /// [`Proxy::send_kept`]), then [`Proxy::decide`] what the answer means;
    /// on a refused token, refresh and replay once with fresh credentials
    /// in the same head.
    #[allow(clippy::too_many_arguments)]
    async fn attempts(
        &self,
        route: &Route,
        mut session: Arc<ActiveSession>,
        target: &Target<'_>,
        mut head: Head,
        bytes: Bytes,
        log: &mut AccessLog,
        pace: &mut Pace,
    ) -> Result<Answer, ProxyError> {
        let mut replayed = false;
        loop {
            let can_replay = !replayed && session.has_refresh_token;
            let (answer, meaning, kept) = self
                .send_kept(route, &session, head, &bytes, can_replay, log, pace)
                .await?;
            if (route.stored_key && meaning.expired) || meaning.revoked {
                // The credential itself was refused (a static key is never
                // refreshed): the refusal goes back as it came, and the
                // session's health says it needs a new one.
                self.refresher.credential_refused(&session);
            }
            let Some(next) = self.decide(&session, meaning.expired, kept, replayed) else {
                return Ok(answer);
            };
            // Reactive: the token was refused. Refresh (or pick up a refresh
            // another request made meanwhile) and replay once.
            let fresh = match self.refresher.refresh_refused(&session).await {
                Ok(fresh) => fresh,
                // A refresh moments ago did not cure this session's refusals:
                // it is about something else (Spark's 1010 disabled key).
                Err(RefreshError::TooSoon) => return Ok(answer),
                Err(e) => {
                    drain(answer).await;
                    return Err(refresh_error(&session, e));
                }
            };
            drain(answer).await;
            log.session = Some(Arc::clone(&fresh));
            log.replayed = true;
            log.refreshed = true;
            session = fresh;
            replayed = true;
            head = next;
            head.uri = target.address(route, &session, &mut head.headers, &bytes)?;
        }
    }

    /// Spark's API keys: an application that signs for itself opens its
    /// Spark session with `POST /v1/session?ApiKey=KEY&ApiSig=...`. Given
    /// its credproxy session key as its API key, it is answered here, never
    /// by Spark (whose one session per key credproxy holds for every
    /// instance): the `AuthToken` is the session key itself, which the
    /// application then sends with every request (the key's slot), and its
    /// own `ApiSig`s are dropped for credproxy's.
    async fn open_own_session(
        &self,
        route: &Route,
        query: Option<&str>,
        client: Option<std::net::IpAddr>,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let key = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .find(|(name, _)| name == "ApiKey")
            .map(|(_, value)| value.into_owned())
            .filter(|k| !k.is_empty())
            .ok_or(ProxyError::MissingSession)?;
        let (session, grant) = self
            .resolve(
                route,
                Some(Presented::Key(KeyHash::of(key.as_bytes()))),
                client,
            )
            .await?;
        // Answered here, never upstream: only an expired key is refused;
        // the scope is checked on each request the session then makes.
        if grant
            .as_ref()
            .and_then(|g| g.scope.as_ref())
            .is_some_and(|s| s.expired(store::now()))
        {
            self.metrics.key_refusal(route.name, "key_expired");
            return Err(ProxyError::UnknownSession);
        }
        log.session = Some(Arc::clone(&session));
        log.key = grant;
        let expires = std::time::SystemTime::now() + OWN_SESSION_LIFETIME;
        let body = serde_json::json!({"D": {"Success": true, "Results": [{
            "AuthToken": key,
            "Expires": humantime::format_rfc3339_seconds(expires).to_string(),
            "Roles": [],
        }]}});
        let mut resp = Response::new(own(Full::new(Bytes::from(body.to_string()))));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(resp)
    }

    /// The one place that decides what an upstream answer means for its
    /// request: `Some(head)` to refresh and replay it with that head (the
    /// provider's `expired` answer on a session that can refresh, first
    /// attempt, head and body kept); `None`: it is answered, and the
    /// refresh-loop guard and background
    /// refreshes are told what happened.
    fn decide(
        &self,
        session: &Arc<ActiveSession>,
        expired: bool,
        kept: Option<Head>,
        replayed: bool,
    ) -> Option<Head> {
        if !expired {
            self.refresher.accepted(&session.id);
            return None;
        }
        if replayed {
            // Fresh tokens were refused too: hold later 401s of this
            // session for min_refresh_interval instead of rotating again.
            self.refresher.refusal_survived_refresh(session);
            return None;
        }
        if !session.has_refresh_token {
            return None;
        }
        if kept.is_none() {
            // The body went upstream streamed and cannot go again: the 401
            // goes back as it came, and the tokens are refreshed for the
            // next request.
            self.refresher.refresh_refused_in_background(session);
        }
        kept
    }

    /// Sends a request whose body was kept; when the provider refuses it
    /// for its rate limit, waits the hold out and sends it again, if it is
    /// safe to send again ([`pacing::resendable`]) and the hold ends before
    /// the request's `max_queue_wait` does. Otherwise the refusal goes back
    /// as the provider gave it.
    ///
    /// The head is lent to each send while another may follow (a resend,
    /// or a replay when `can_replay`) and given to the last one; it comes
    /// back with the answer when it was kept.
    #[allow(clippy::too_many_arguments)]
    async fn send_kept(
        &self,
        route: &Route,
        session: &ActiveSession,
        head: Head,
        bytes: &Bytes,
        can_replay: bool,
        log: &mut AccessLog,
        pace: &mut Pace,
    ) -> Result<(Answer, Meaning, Option<Head>), ProxyError> {
        let resendable = pacing::resendable(&head.method, &head.headers);
        let mut refusals = 0;
        loop {
            let body = Outbound::Kept(bytes.clone());
            let another_may_follow = can_replay || (resendable && refusals < MAX_RESENDS);
            if !another_may_follow {
                let (answer, meaning) = self
                    .send(route, session, Cow::Owned(head), body, log, pace)
                    .await?;
                return Ok((answer, meaning, None));
            }
            let (answer, meaning) = self
                .send(route, session, Cow::Borrowed(&head), body, log, pace)
                .await?;
            if meaning.verdict == Verdict::Accepted {
                return Ok((answer, meaning, Some(head)));
            }
            refusals += 1;
            // A request sent without waiting has no deadline yet: it
            // starts now, at its first refusal.
            let deadline = *pace
                .deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + route.gate.max_wait());
            let in_time = route.gate.held_until().is_none_or(|held| held <= deadline);
            if !resendable || !in_time || refusals > MAX_RESENDS {
                return Ok((answer, meaning, Some(head)));
            }
            drain(answer).await;
        }
    }

    /// Proactive refresh: a token within `refresh_margin` of its expiry is
    /// refreshed before use. If that fails while the token is still valid,
    /// the request goes ahead with it.
    async fn ensure_fresh(
        &self,
        route: &Route,
        session: Arc<ActiveSession>,
    ) -> Result<Arc<ActiveSession>, ProxyError> {
        let now = store::now();
        self.sessions.note_use(&session, now);
        if !session.due(now, route.refresh_margin) {
            return Ok(session);
        }
        match self.refresher.refresh(&session, false).await {
            Ok(fresh) => Ok(fresh),
            Err(RefreshError::Failed { .. } | RefreshError::Store(_)) if !session.expired(now) => {
                Ok(session)
            }
            Err(RefreshError::TooSoon) => Ok(session),
            Err(e) => Err(refresh_error(&session, e)),
        }
    }

    /// Takes a permit from the provider's gate and sends the request; tells
    /// the gate whether the provider refused it for its rate limit.
    async fn send(
        &self,
        route: &Route,
        session: &ActiveSession,
        head: Cow<'_, Head>,
        body: Outbound,
        log: &mut AccessLog,
        pace: &mut Pace,
    ) -> Result<(Answer, Meaning), ProxyError> {
        let mut permit = route
            .gate
            .acquire_by(&mut pace.deadline, pace.resend, &session.id)
            .await
            .map_err(|l| ProxyError::RateLimited {
                retry_after_secs: l.retry_after_secs,
            })?;
        pace.resend = true;
        if !permit.waited.is_zero() {
            log.queued_ms = Some(log.queued_ms.unwrap_or(0) + permit.waited.as_millis());
        }
        permit.sent();
        log.attempts += 1;
        let span = attempt_span(route, &head, log.attempts);
        let mut head = head;
        if !span.is_none() {
            // This attempt's traceparent goes upstream, not the caller's.
            telemetry::trace::propagate(&span, &mut head.to_mut().headers);
        }
        let sent = Instant::now();
        let resp = route
            .upstream
            .here()
            .send(head, body, &session.id)
            .instrument(span.clone())
            .await;
        let took = sent.elapsed();
        if !span.is_none() {
            match &resp {
                Ok(r) => span.record("http.response.status_code", i64::from(r.status().as_u16())),
                Err(e) => span.record(
                    "error.type",
                    e.failure().map_or(e.code(), |f| f.cause.as_str()),
                ),
            };
        }
        route.metrics.upstream_latency(&self.metrics, took);
        log.upstream_ms = Some(log.upstream_ms.unwrap_or(0) + took.as_millis());
        let mut resp = resp?;
        // Before anything else reads the answer: no injected secret in any
        // header, whatever the upstream echoed.
        session.credentials.scrub_response(resp.headers_mut());
        let status = resp.status().as_u16();
        // 429 holds the budget whatever its body says; a listed status
        // with a JSON code holds it (or means expired) only when its body
        // carries that code, so that body is read first (small JSON only).
        let coded = |s: &Signal| s.json_code.is_some() && s.names(status);
        let throttle_coded = status != 429 && coded(&route.throttled);
        let expire_coded = coded(&route.expired);
        let revoke_coded = route.revoked.iter().any(coded);
        let any_coded = throttle_coded || expire_coded || revoke_coded;
        let (answer, throttled, expired, revoked) = if any_coded && may_carry_code(resp.headers()) {
            let (parts, body) = resp.into_parts();
            let bytes = read_error_body(body, route.upstream.here().response_timeout()).await?;
            let plain = decoded_error_body(&parts.headers, &bytes);
            let carries = |s: &Signal| {
                s.json_code
                    .as_ref()
                    .is_some_and(|code| plain.as_deref().is_some_and(|p| json_code_is(p, code)))
            };
            let throttled = throttle_coded && carries(&route.throttled);
            let expired = expire_coded && carries(&route.expired);
            let revoked = route.revoked.iter().any(|s| coded(s) && carries(s));
            let answer = Answer::Read(Response::from_parts(parts, bytes));
            (answer, throttled, expired, revoked)
        } else {
            let plain = |s: &Signal| s.json_code.is_none() && s.names(status);
            let throttled = status != 429 && plain(&route.throttled);
            let revoked = route.revoked.iter().any(plain);
            (
                Answer::Stream(resp),
                throttled,
                plain(&route.expired),
                revoked,
            )
        };
        let verdict = match &answer {
            Answer::Stream(r) => pacing::verdict(r.status(), r.headers(), throttled),
            Answer::Read(r) => pacing::verdict(r.status(), r.headers(), throttled),
        };
        if verdict != Verdict::Accepted {
            log.upstream_refusals += 1;
        }
        route.gate.answered(&permit, verdict);
        drop(permit);
        Ok((
            answer,
            Meaning {
                verdict,
                expired,
                revoked,
            },
        ))
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
        // TRACE would echo the injected credentials back to the caller, and
        // so would TRACK (IIS); methods are case-sensitive, but a server may
        // take `trace` for TRACE.
        let method = parts.method.as_str();
        if method.eq_ignore_ascii_case("TRACE") || method.eq_ignore_ascii_case("TRACK") {
            return Err(ProxyError::BadRequest("TRACE and TRACK are not supported"));
        }
        // A method override (honoured by Spark, and by many frameworks)
        // makes the upstream answer another method than the one credproxy
        // frames the answer by: a HEAD taken for a GET sends a body that
        // credproxy would read as the next answer on that connection. So an
        // override is accepted only on POST (whose answer is framed by its
        // own head) and never to a method without a body in its answer, or
        // one that echoes the injected credentials.
        match method_override(parts) {
            Override::None => {}
            Override::Allowed if parts.method == Method::POST => {}
            Override::Allowed => {
                return Err(ProxyError::BadRequest(
                    "a method override is accepted only on POST",
                ))
            }
            Override::Refused => return Err(ProxyError::BadRequest(REFUSED_OVERRIDE)),
        }
        // Dot segments could step out of api_base's path on the upstream.
        if has_dot_segment(parts.uri.path()) {
            return Err(ProxyError::BadRequest(
                "the path may not contain . or .. segments",
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
    ) -> Result<Identified<'q>, ProxyError> {
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
        let (slot, query) = route.shape.take_slot(headers, query).map_err(|_| {
            ProxyError::BadRequest(
                "a credential parameter is disguised in the query string (send it plainly, or the key in the session header)",
            )
        })?;
        let presented = from_header
            .or(from_proxy_auth)
            .or(slot.key)
            .map(Presented::Key)
            .or_else(|| route.default_session.as_deref().map(Presented::Default));
        Ok((presented, slot, query))
    }

    /// The session the request presented, and the grant of its key (none
    /// for a provider's default session).
    async fn resolve(
        &self,
        route: &Route,
        presented: Option<Presented<'_>>,
        client: Option<std::net::IpAddr>,
    ) -> Result<(Arc<ActiveSession>, Option<Arc<Grant>>), ProxyError> {
        let (found, grant) = match presented.ok_or(ProxyError::MissingSession)? {
            Presented::Key(hash) => match self.sessions.by_key_from(&hash, client).await {
                Ok(Some(keyed)) => (
                    Ok(Some(Arc::clone(&keyed.session))),
                    Some(Arc::clone(&keyed.grant)),
                ),
                other => (other.map(|_| None), None),
            },
            Presented::Default(id) => (self.sessions.by_id(id).await, None),
        };
        let session = match found {
            Ok(Some(s)) => s,
            // A session of a provider no longer configured is no session here.
            Ok(None) | Err(SessionError::UnknownProvider(_)) => {
                return Err(ProxyError::UnknownSession)
            }
            Err(SessionError::ColdBudget { retry_after_secs }) => {
                // A tarpit: a client over its budget (a flood of made-up
                // keys) waits for its answer, so each of its connections
                // costs one refusal per hold instead of one per round trip.
                if !self.over_budget_hold.is_zero() {
                    tokio::time::sleep(self.over_budget_hold).await;
                }
                return Err(ProxyError::LookupsLimited { retry_after_secs });
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
        // A key is only good for its own provider (and those sharing its sessions).
        if session.provider != route.session_owner {
            return Err(ProxyError::KeyOfOtherProvider);
        }
        // A stored key marked refused still goes: only the provider can
        // say whether it works again.
        if session.status == Status::ReauthorizationRequired && !route.stored_key {
            return Err(ProxyError::ReauthorizationRequired);
        }
        Ok((session, grant))
    }

    /// Checks a request against its key's scope (see `Scope::admit`): an
    /// expired key is unknown, a method or path outside the scope is 403
    /// `forbidden_by_scope`, a key over its own rate is 429 at once. A key
    /// limited to some methods may not carry a method override.
    fn check_scope(
        &self,
        route: &Route,
        scope: &Scope,
        parts: &Parts,
        rest: &str,
    ) -> Result<(), ProxyError> {
        let verdict = if scope.limits_methods() && !matches!(method_override(parts), Override::None)
        {
            Err(Refusal::Forbidden)
        } else {
            scope.admit(&parts.method, rest, store::now())
        };
        let (outcome, error) = match verdict {
            Ok(()) => return Ok(()),
            Err(Refusal::Expired) => ("key_expired", ProxyError::UnknownSession),
            Err(Refusal::Forbidden) => ("forbidden_by_scope", ProxyError::ForbiddenByScope),
            Err(Refusal::Rate { retry_after_secs }) => (
                "key_rate_limited",
                ProxyError::KeyRateLimited { retry_after_secs },
            ),
        };
        self.metrics.key_refusal(route.name, outcome);
        Err(error)
    }
}

/// Whether the path has a `.` or `..` segment in any spelling a server
/// might normalise: percent-decoded again and again (`%2e`, `%252e`),
/// split on `/`, `\` and their escapes (`..%2f`, `%2e%2e%5c`), with `;`
/// parameters cut off (`..;jsessionid=x`), look-alikes folded (IIS's
/// `%u002e`, overlong UTF-8 `%c0%ae`, fullwidth `%ef%bc%8e`). Still decoding
/// after [`MAX_DECODE_ROUNDS`] rounds counts as one too. No allocation for
/// a plain ASCII path without `%`.
fn has_dot_segment(path: &str) -> bool {
    let mut current: Cow<[u8]> = Cow::Borrowed(path.as_bytes());
    for _ in 0..=MAX_DECODE_ROUNDS {
        if let Some(folded) = fold_lookalikes(&current) {
            current = Cow::Owned(folded);
        }
        if current
            .split(|&b| b == b'/' || b == b'\\')
            .any(is_dot_segment)
        {
            return true;
        }
        let next = match Cow::from(percent_encoding::percent_decode(&current)) {
            Cow::Borrowed(_) => return false,
            Cow::Owned(next) => next,
        };
        current = Cow::Owned(next);
    }
    true
}

/// Byte sequences some servers read as `.`, `/` or `\`: overlong UTF-8
/// (which lenient decoders accept), fullwidth and other compatibility forms
/// (which Unicode normalisation or best-fit mapping folds).
const LOOKALIKES: [(&[u8], &[u8]); 16] = [
    (b"\xc0\xae", b"."),
    (b"\xc0\xaf", b"/"),
    (b"\xc1\x9c", b"\\"),
    (b"\xe0\x80\xae", b"."),
    (b"\xe0\x80\xaf", b"/"),
    (b"\xe0\x81\x9c", b"\\"),
    (b"\xf0\x80\x80\xae", b"."),
    (b"\xf0\x80\x80\xaf", b"/"),
    (b"\xef\xbc\x8e", b"."),  // U+FF0E fullwidth full stop
    (b"\xef\xbc\x8f", b"/"),  // U+FF0F fullwidth solidus
    (b"\xef\xbc\xbc", b"\\"), // U+FF3C fullwidth reverse solidus
    (b"\xef\xb9\x92", b"."),  // U+FE52 small full stop
    (b"\xe2\x80\xa4", b"."),  // U+2024 one dot leader
    (b"\xe2\x80\xa5", b".."), // U+2025 two dot leader
    (b"\xe2\x88\x95", b"/"),  // U+2215 division slash
    (b"\xe2\x81\x84", b"/"),  // U+2044 fraction slash
];

/// The path with IIS's `%uXXXX` escapes decoded and look-alikes of `.`,
/// `/` and `\` replaced by them; `None` when there is neither.
fn fold_lookalikes(path: &[u8]) -> Option<Vec<u8>> {
    let decoded = decode_percent_u(path);
    match replace_lookalikes(decoded.as_deref().unwrap_or(path)) {
        Some(folded) => Some(folded),
        None => decoded,
    }
}

fn decode_percent_u(path: &[u8]) -> Option<Vec<u8>> {
    let escape = |at: usize| -> Option<char> {
        let rest = path.get(at..at + 6)?;
        if rest[0] != b'%' || !rest[1].eq_ignore_ascii_case(&b'u') {
            return None;
        }
        let hex = std::str::from_utf8(&rest[2..]).ok()?;
        char::from_u32(u32::from_str_radix(hex, 16).ok()?)
    };
    let first = memchr::memchr_iter(b'%', path).find(|&i| escape(i).is_some())?;
    let mut out = Vec::with_capacity(path.len());
    out.extend_from_slice(&path[..first]);
    let mut i = first;
    while i < path.len() {
        if let Some(c) = escape(i) {
            out.extend_from_slice(c.encode_utf8(&mut [0u8; 4]).as_bytes());
            i += 6;
        } else {
            out.push(path[i]);
            i += 1;
        }
    }
    Some(out)
}

fn replace_lookalikes(path: &[u8]) -> Option<Vec<u8>> {
    // Every look-alike starts with a byte of 0xc0 or more.
    let first = path.iter().position(|&b| b >= 0xc0)?;
    let mut out = Vec::with_capacity(path.len());
    out.extend_from_slice(&path[..first]);
    let mut i = first;
    let mut changed = false;
    while i < path.len() {
        match LOOKALIKES
            .iter()
            .find(|(from, _)| path[i..].starts_with(from))
        {
            Some((from, to)) => {
                out.extend_from_slice(to);
                i += from.len();
                changed = true;
            }
            None => {
                out.push(path[i]);
                i += 1;
            }
        }
    }
    changed.then_some(out)
}

/// Made only of dots (`.`, `..`, and `...` which Windows' trailing-dot
/// stripping reads as `..`; spaces between them too, `.. .`), once `;` parameters and anything after a NUL
/// or a decoded `?` or `#` (where a server that decodes before splitting
/// ends the path) are cut off and surrounding whitespace trimmed.
fn is_dot_segment(segment: &[u8]) -> bool {
    let end = segment
        .iter()
        .position(|&b| matches!(b, b';' | 0 | b'?' | b'#'))
        .unwrap_or(segment.len());
    let name = segment[..end].trim_ascii();
    // Trimmed, so it starts with a dot if it is all dots and whitespace.
    name.first() == Some(&b'.') && name.iter().all(|&b| b == b'.' || b.is_ascii_whitespace())
}

/// The headers and query parameter by which a caller may ask a server to
/// take a request for another method.
const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Why a request whose method override (header, query or form field)
/// names HEAD, TRACE, TRACK or CONNECT is refused.
const REFUSED_OVERRIDE: &str =
    "a method override to HEAD, TRACE, TRACK or CONNECT is not supported";

/// What a request's method overrides ask for.
#[derive(Debug, PartialEq, Eq)]
enum Override {
    /// None is there.
    None,
    /// One or more, none naming a refused method.
    Allowed,
    /// One names HEAD, TRACE, TRACK or CONNECT.
    Refused,
}

/// The request's method overrides (headers and `_method` query
/// parameters): whether there is one, and whether one names HEAD, TRACE,
/// TRACK or CONNECT, in any case, with surrounding whitespace, in a
/// comma-separated list, or percent-encoded (again and again).
fn method_override(parts: &Parts) -> Override {
    let mut found = Override::None;
    let mut see = |value: &[u8]| {
        if names_refused_method(value) {
            found = Override::Refused;
        } else if found == Override::None {
            found = Override::Allowed;
        }
    };
    // One pass over the names; `_` for `-` too (`X_HTTP_METHOD_OVERRIDE`):
    // CGI, PHP and WSGI servers read both spellings as the same variable.
    for (name, value) in &parts.headers {
        let name = name.as_str().as_bytes();
        let is_override = METHOD_OVERRIDE_HEADERS.iter().any(|o| {
            o.len() == name.len()
                && o.bytes()
                    .zip(name)
                    .all(|(o, &n)| o == n || (o == b'-' && n == b'_'))
        });
        if is_override {
            see(value.as_bytes());
        }
    }
    if let Some(q) = parts.uri.query() {
        method_params(q.as_bytes(), &mut see);
    }
    found
}

/// Calls `see` with the value of each `_method` parameter of a query or a
/// form body (`a=1&_method=PUT`; the name percent-encoded or not).
fn method_params(params: &[u8], see: &mut impl FnMut(&[u8])) {
    for param in params.split(|&b| b == b'&' || b == b';') {
        let (name, value) = match memchr::memchr(b'=', param) {
            Some(i) => (&param[..i], &param[i + 1..]),
            None => (param, &b""[..]),
        };
        let name: Cow<[u8]> = percent_encoding::percent_decode(name).into();
        if name.trim_ascii().eq_ignore_ascii_case(b"_method") {
            see(value);
        }
    }
}

/// Whether a POST's form body (`application/x-www-form-urlencoded`) has a
/// `_method` parameter naming HEAD, TRACE, TRACK or CONNECT: frameworks
/// (Rails, Laravel) read the override from the form too.
fn form_overrides_to_refused_method(headers: &HeaderMap, body: &[u8]) -> bool {
    if !is_form(headers) {
        return false;
    }
    let mut refused = false;
    method_params(body, &mut |value| refused |= names_refused_method(value));
    refused
}

/// Whether a form body has a `_method` parameter at all.
fn form_overrides_method(body: &[u8]) -> bool {
    let mut any = false;
    method_params(body, &mut |_| any = true);
    any
}

fn is_form(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        let mime = v.split(|&b| b == b';').next().unwrap_or_default();
        mime.trim_ascii()
            .eq_ignore_ascii_case(b"application/x-www-form-urlencoded")
    })
}

fn names_refused_method(value: &[u8]) -> bool {
    let mut current: Cow<[u8]> = Cow::Borrowed(value);
    for _ in 0..=MAX_DECODE_ROUNDS {
        let refused = current.split(|&b| b == b',').any(|m| {
            let m = m.trim_ascii();
            ["HEAD", "TRACE", "TRACK", "CONNECT"]
                .iter()
                .any(|r| m.eq_ignore_ascii_case(r.as_bytes()))
        });
        if refused {
            return true;
        }
        let plus = memchr::memchr(b'+', &current).is_some();
        let next = match Cow::from(percent_encoding::percent_decode(&current)) {
            Cow::Borrowed(_) if !plus => return false,
            Cow::Borrowed(b) => b.to_vec(),
            Cow::Owned(next) => next,
        };
        current = Cow::Owned(
            next.into_iter()
                .map(|b| if b == b'+' { b' ' } else { b })
                .collect(),
        );
    }
    false
}

/// Whether a browser sent this request on behalf of a page (`Origin`, or
/// `Sec-Fetch-Site` naming another site): the provider's `default_session`
/// must not serve it, or any page could use the account (CSRF, and with
/// DNS rebinding read the answers). Applications and curl send neither.
fn from_a_web_page(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::ORIGIN)
        || headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() != b"none" && v.as_bytes() != b"same-origin")
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

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Decides whether the body is kept for a replay (up to `max_replay_body`)
/// or streamed, and enforces `max_request_body`: a declared length over it
/// is refused at once, a chunked body is cut off by [`Limited`]. A body
/// that stops arriving for `body_read_timeout` ends in 408 while it is
/// being kept; streamed, its error reaches the upstream request (408 if
/// the upstream has not answered yet, else the connection is closed).
async fn prepare_body<B: CallerBody>(
    route: &Route,
    headers: &HeaderMap,
    body: B,
    replayable: bool,
) -> Result<Prepared, ProxyError> {
    let limit = route.max_request_body.unwrap_or(u64::MAX);
    let declared = content_length(headers);
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge);
    }
    if body.is_end_stream() {
        return Ok(Prepared::Kept(Bytes::new()));
    }
    let body = Silence::request(body, route.body_read_timeout);
    let mut body = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    // Kept: what may be replayed, and (replay or not) a body of a known
    // small length, which goes with its head over credproxy's own client.
    let small = declared.is_some_and(|n| n <= crate::proxy::forward::h1::COALESCE as u64);
    if !(replayable || small) || declared.is_some_and(|n| n > route.max_replay_body as u64) {
        return Ok(Prepared::Streamed(body.boxed()));
    }
    // Length unknown or small: read up to the replay limit. A body that
    // turns out longer goes on as what was read, then the rest of the stream.
    let mut kept = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ProxyError::BodyTooLarge
            } else if e.is::<BodyReadTimeout>() {
                ProxyError::RequestTimeout
            } else {
                ProxyError::BadRequest("the request body could not be read")
            }
        })?;
        // Request trailers are not forwarded (`Trailer` is hop-by-hop).
        let Ok(data) = frame.into_data() else {
            continue;
        };
        kept.extend_from_slice(&data);
        if kept.len() > route.max_replay_body {
            let prefix =
                futures_util::stream::once(std::future::ready(Ok(Frame::data(kept.freeze()))));
            let stream = prefix.chain(BodyStream::new(body));
            return Ok(Prepared::Streamed(BodyExt::boxed(StreamBody::new(stream))));
        }
    }
    Ok(Prepared::Kept(kept.freeze()))
}

/// An answer read whole to be classified goes back as it came (no link
/// rewriting: it is an error body).
fn pass_read(resp: Response<Bytes>) -> Response<ProxyBody> {
    let (mut parts, bytes) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.extensions.clear();
    Response::from_parts(parts, own(Full::new(bytes)))
}

/// How much of an upstream error body is read (and decoded) to see what it says.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Reads an error body (up to [`ERROR_BODY_LIMIT`]) to see what it says.
async fn read_error_body(body: UpBody, wait: Duration) -> Result<Bytes, ProxyError> {
    let limited = Limited::new(body, ERROR_BODY_LIMIT);
    match tokio::time::timeout(wait, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        // Over the limit: an error body longer than is read.
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::unreachable(Cause::TooLong))
        }
        // Broke off: unreachable whatever broke it.
        Ok(Err(e)) => Err(ProxyError::UpstreamUnreachable(Failure::new(
            forward::cause_of(&*e),
            Some(e),
        ))),
        Err(_) => Err(ProxyError::timeout(Cause::Timeout)),
    }
}

/// Whether an error answer is worth reading for a JSON code (Spark's 1550
/// on a 503), a small JSON body. One declaring more than
/// [`ERROR_BODY_LIMIT`], or of unknown length and not JSON, is something
/// else (a maintenance page): it streams on to the caller as it came
/// instead of being cut off into a 502.
fn may_carry_code(headers: &HeaderMap) -> bool {
    match content_length(headers) {
        Some(n) => n <= ERROR_BODY_LIMIT as u64,
        None => headers.get(CONTENT_TYPE).is_none_or(|v| {
            v.as_bytes()
                .windows(4)
                .any(|w| w.eq_ignore_ascii_case(b"json"))
        }),
    }
}

/// An error body as it reads: decoded when it came compressed (the
/// caller's `Accept-Encoding` goes upstream as it is, so Spark's 1550 may
/// come gzipped), at most [`ERROR_BODY_LIMIT`] of it. `None`: a coding
/// credproxy cannot decode, or a broken stream.
fn decoded_error_body<'b>(headers: &HeaderMap, body: &'b [u8]) -> Option<Cow<'b, [u8]>> {
    use std::io::Read;
    let limit = ERROR_BODY_LIMIT as u64;
    let mut out = Vec::new();
    let read = match Coding::from_header(headers.get(CONTENT_ENCODING))? {
        Coding::Identity => return Some(Cow::Borrowed(body)),
        Coding::Gzip => flate2::read::MultiGzDecoder::new(body)
            .take(limit)
            .read_to_end(&mut out),
        // zlib-wrapped per RFC 9110; some servers send raw deflate.
        Coding::Deflate => match flate2::read::ZlibDecoder::new(body)
            .take(limit)
            .read_to_end(&mut out)
        {
            Ok(n) => Ok(n),
            Err(_) => {
                out.clear();
                flate2::read::DeflateDecoder::new(body)
                    .take(limit)
                    .read_to_end(&mut out)
            }
        },
        Coding::Brotli => brotli::Decompressor::new(body, 4096)
            .take(limit)
            .read_to_end(&mut out),
    };
    read.ok()?;
    Some(Cow::Owned(out))
}

/// Whether a JSON error body carries `code` in a `code` field (any case)
/// at its top level or one object down (Spark's `{"D": {"Code": 1550}}`,
/// OAuth-style `{"error": {"code": "..."}}`).
fn json_code_is(body: &[u8], code: &JsonCode) -> bool {
    let Ok(serde_json::Value::Object(top)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return false;
    };
    let same = |v: &serde_json::Value| match (code, v) {
        (JsonCode::Number(n), serde_json::Value::Number(m)) => m.as_i64() == Some(*n),
        (JsonCode::Number(n), serde_json::Value::String(m)) => m.trim() == n.to_string(),
        (JsonCode::Text(t), serde_json::Value::String(m)) => m == t,
        (JsonCode::Text(t), serde_json::Value::Number(m)) => m.to_string() == *t,
        _ => false,
    };
    let in_object = |o: &serde_json::Map<String, serde_json::Value>| {
        o.iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("code") && same(v))
    };
    in_object(&top)
        || top.values().any(|v| match v {
            serde_json::Value::Object(inner) => in_object(inner),
            _ => false,
        })
}

/// Reads (a little of) an answer that will be thrown away, so its
/// connection can go back to the pool.
async fn drain(answer: Answer) {
    let Answer::Stream(resp) = answer else { return };
    let body = Limited::new(resp.into_body(), 64 * 1024);
    let _ = tokio::time::timeout(Duration::from_secs(1), body.collect()).await;
}

/// What a failed refresh means for the caller.
fn refresh_error(session: &ActiveSession, e: RefreshError) -> ProxyError {
    match e {
        RefreshError::Reauthorization => ProxyError::ReauthorizationRequired,
        RefreshError::Failed { retry_after } => ProxyError::TokenRefreshFailed {
            retry_after_secs: retry_after.as_secs_f64().ceil().max(1.0) as u64,
        },
        RefreshError::Gone => ProxyError::UnknownSession,
        // Callers handle this one before: the request goes on as it is.
        RefreshError::TooSoon => ProxyError::TokenRefreshFailed {
            retry_after_secs: 1,
        },
        RefreshError::NotRefreshable => ProxyError::TokenRefreshFailed {
            retry_after_secs: 1,
        },
        // Without the store no refresh is attempted (a rotated token that
        // cannot be stored would be lost): the caller may retry shortly.
        RefreshError::Store(e) => {
            tracing::warn!(session = %session.id, error = %e, "refresh: store unavailable");
            ProxyError::TokenRefreshFailed {
                retry_after_secs: 1,
            }
        }
        RefreshError::Session(e) => {
            tracing::error!(session = %session.id, error = %e, "refresh: session cannot be used");
            ProxyError::Internal
        }
    }
}

impl Target<'_> {
    /// Writes `session`'s credentials into `headers` (only
    /// [`Credentials::inject`](crate::provider::Credentials::inject) does)
    /// and returns the upstream URI, in origin form: the upstream client
    /// adds the scheme and authority where the protocol wants them (Host for
    /// HTTP/1.1, :authority for h2). Spark's API keys sign the request over
    /// the path, the query as it goes (with the injected `AuthToken`) and
    /// `body`, as sent.
    fn address(
        &self,
        route: &Route,
        session: &ActiveSession,
        headers: &mut HeaderMap,
        body: &[u8],
    ) -> Result<Uri, ProxyError> {
        let mut query =
            session
                .credentials
                .inject(headers, self.query.as_deref(), &self.slot, self.rest);
        if session.credentials.signs() {
            let path = format!("{}{}", route.base_path, self.rest);
            session
                .credentials
                .sign(&path, query.get_or_insert_with(String::new), body);
        }
        let mut path_and_query = String::with_capacity(
            route.base_path.len() + self.rest.len() + query.as_ref().map_or(0, |q| q.len() + 1),
        );
        path_and_query.push_str(&route.base_path);
        path_and_query.push_str(self.rest);
        if let Some(q) = &query {
            path_and_query.push('?');
            path_and_query.push_str(q);
        }
        Uri::try_from(path_and_query)
            .map_err(|_| ProxyError::BadRequest("the request path cannot be forwarded"))
    }
}

/// Bodies up to this size with a known length are rewritten whole, so their
/// `Content-Length` stays exact (and unchanged when no link was found);
/// larger or unknown-length ones stream, chunked.
const WHOLE_BODY_LIMIT: u64 = 256 * 1024;

impl Proxy {
    /// Passes the upstream's answer back: hop-by-hop headers removed, links
    /// on the provider's origins moved behind the proxy (`send` scrubbed
    /// the injected credentials from its headers).
    async fn response_filter(
        &self,
        route: &Route,
        asked: &Asked<'_>,
        resp: Response<UpBody>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.extensions.clear();
        let Some(map) = &route.links else {
            return Ok(Response::from_parts(parts, Either::Left(body)));
        };
        let has_link_header = [LOCATION, CONTENT_LOCATION, LINK]
            .iter()
            .any(|h| parts.headers.contains_key(h));
        let rewrite_body = !asked.head
            && !matches!(parts.status.as_u16(), 100..=199 | 204 | 304)
            && is_structured_text(&parts.headers);
        if !has_link_header && !rewrite_body {
            return Ok(Response::from_parts(parts, Either::Left(body)));
        }
        if has_link_header {
            let bases = self.bases(route, asked);
            self.rewrite_link_headers(route, asked, map, &bases, &mut parts.headers);
        }
        if !rewrite_body {
            return Ok(Response::from_parts(parts, Either::Left(body)));
        }
        let Some(coding) = Coding::from_header(parts.headers.get(CONTENT_ENCODING)) else {
            // A coding we cannot decode (the request asked for none): as it is.
            return Ok(Response::from_parts(parts, Either::Left(body)));
        };
        match content_length(&parts.headers) {
            Some(len) if len <= WHOLE_BODY_LIMIT => {
                let collected =
                    read_whole(body, len, route.upstream.here().response_timeout()).await?;
                if coding == Coding::Identity && !map.may_contain_links(&collected) {
                    // Most answers: nothing to rewrite, the same bytes and length.
                    return Ok(Response::from_parts(parts, own(Full::new(collected))));
                }
                let mut rewriter = Rewriter::new(Arc::clone(map), self.bases(route, asked));
                let out = match links::rewrite_whole(&mut rewriter, coding, collected.clone()) {
                    Ok(Some(out)) => out,
                    Ok(None) => collected,
                    Err(e) => {
                        tracing::debug!(provider = route.name, error = %e, "an upstream body could not be decoded; passed on as it came");
                        collected
                    }
                };
                parts
                    .headers
                    .insert(CONTENT_LENGTH, HeaderValue::from(out.len()));
                Ok(Response::from_parts(
                    parts,
                    Either::Right(Either::Right(Full::new(out))),
                ))
            }
            _ => {
                parts.headers.remove(CONTENT_LENGTH);
                let rewriter = Rewriter::new(Arc::clone(map), self.bases(route, asked));
                Ok(Response::from_parts(
                    parts,
                    Either::Right(Either::Left(Box::pin(LinkBody::new(
                        body, rewriter, coding,
                    )))),
                ))
            }
        }
    }

    /// Per link target, the base its origin becomes: the provider's
    /// dedicated listener when the request came in on it, else the main
    /// listener's `{proxy_url}/{provider}`.
    fn bases(&self, route: &Route, asked: &Asked<'_>) -> Bases {
        let host = asked.host();
        let this = match host {
            Some(h) => format!("http://{h}"),
            None => format!("http://{}", asked.local),
        };
        let main = match (&self.proxy_url, asked.mount) {
            (Some(url), _) => url.clone(),
            (None, Mount::Prefixed) => this.clone(),
            (None, Mount::Dedicated(_)) => {
                // The main listener, named as the client named us.
                let host = host
                    .map(host_without_port)
                    .map(str::to_owned)
                    .unwrap_or_else(|| asked.local.ip().to_string());
                let host = if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]")
                } else {
                    host
                };
                format!("http://{host}:{}", self.listen.port())
            }
        };
        Bases::new(
            route
                .link_targets
                .iter()
                .map(|&j| match asked.mount {
                    Mount::Dedicated(d) if d == j => this.clone(),
                    _ => format!("{main}/{}", self.routes[j].name),
                })
                .collect(),
        )
    }

    fn rewrite_link_headers(
        &self,
        route: &Route,
        asked: &Asked<'_>,
        map: &Arc<LinkMap>,
        bases: &Bases,
        headers: &mut HeaderMap,
    ) {
        for name in [LOCATION, CONTENT_LOCATION, LINK] {
            let values: Vec<HeaderValue> = match headers.get_all(&name).iter().next() {
                None => continue,
                Some(_) => headers.get_all(&name).iter().cloned().collect(),
            };
            headers.remove(&name);
            for value in values {
                let mut rewriter = Rewriter::new(Arc::clone(map), bases.clone());
                let mut out = rewriter.rewrite_all(Bytes::copy_from_slice(value.as_bytes()));
                if name != LINK {
                    if let Some(moved) = relative_behind_proxy(route, asked.mount, &out) {
                        out = moved;
                    }
                }
                match HeaderValue::from_maybe_shared(out) {
                    Ok(v) => {
                        headers.append(&name, v);
                    }
                    Err(_) => {
                        tracing::debug!(header = %name, "a rewritten link header is not a valid value; dropped");
                    }
                }
            }
        }
    }
}

/// Reads a small upstream body of `declared` bytes whole. A body that has
/// already arrived (the usual case: it came with the head) is taken frame by
/// frame without a timer or a collecting buffer, and reading stops at the
/// declared length instead of waiting for the connection task to signal the
/// end (a wake-up and a timer per response); only a frame that is not there
/// yet is waited for, within `wait`.
async fn read_whole(mut body: UpBody, declared: u64, wait: Duration) -> Result<Bytes, ProxyError> {
    use futures_util::FutureExt;
    // Broke off: unreachable whatever broke it.
    let broke = |e: Box<dyn std::error::Error + Send + Sync>| {
        ProxyError::UpstreamUnreachable(Failure::new(forward::cause_of(&*e), Some(e)))
    };
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    while !body.is_end_stream() {
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => tokio::time::timeout(wait, body.frame())
                .await
                .map_err(|_| ProxyError::timeout(Cause::Stalled))?,
        };
        let Some(frame) = frame else { break };
        let Ok(data) = frame.map_err(broke)?.into_data() else {
            continue;
        };
        match &first {
            None => first = Some(data),
            Some(f) => {
                if rest.is_empty() {
                    rest.extend_from_slice(f);
                }
                rest.extend_from_slice(&data);
            }
        }
        let len = if rest.is_empty() {
            first.as_ref().map_or(0, Bytes::len)
        } else {
            rest.len()
        };
        // Longer than its Content-Length (which is within WHOLE_BODY_LIMIT).
        if len as u64 > WHOLE_BODY_LIMIT || len as u64 > declared {
            return Err(ProxyError::unreachable(Cause::Protocol));
        }
        if len as u64 == declared {
            break;
        }
    }
    Ok(if rest.is_empty() {
        first.unwrap_or_default()
    } else {
        rest.freeze()
    })
}

/// An absolute-path `Location` (`/v1/x`) means the provider's own origin:
/// on the main listener it needs the route's prefix to stay behind us.
fn relative_behind_proxy(route: &Route, mount: Mount, value: &[u8]) -> Option<Bytes> {
    if !value.starts_with(b"/") || value.starts_with(b"//") || value.starts_with(b"/\\") {
        return None;
    }
    let rest = value.strip_prefix(route.base_path.as_bytes())?;
    if !(rest.is_empty()
        || rest.starts_with(b"/")
        || rest.starts_with(b"?")
        || rest.starts_with(b"#"))
    {
        return None;
    }
    let prefix: &[u8] = match mount {
        Mount::Prefixed => route.name.as_bytes(),
        Mount::Dedicated(_) if route.base_path.is_empty() => return None,
        Mount::Dedicated(_) => b"",
    };
    let mut out = BytesMut::with_capacity(value.len() + prefix.len() + 1);
    if !prefix.is_empty() {
        out.extend_from_slice(b"/");
        out.extend_from_slice(prefix);
    }
    if rest.is_empty() || !rest.starts_with(b"/") {
        out.extend_from_slice(b"/");
    }
    out.extend_from_slice(rest);
    Some(out.freeze())
}

/// JSON and XML bodies carry links worth rewriting; other types pass as they are.
fn is_structured_text(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or_default().trim();
    let Some((_, sub)) = essence.split_once('/') else {
        return false;
    };
    let sub = sub.trim();
    let sub = sub.as_bytes();
    [&b"json"[..], &b"xml"[..]].iter().any(|t| {
        sub.eq_ignore_ascii_case(t)
            || (sub.len() > t.len()
                && sub[sub.len() - t.len() - 1] == b'+'
                && sub[sub.len() - t.len()..].eq_ignore_ascii_case(t))
    })
}

/// Asks the upstream only for codings credproxy can decode to rewrite
/// links (gzip, deflate, br): another one would carry links past us.
fn limit_accept_encoding(headers: &mut HeaderMap) {
    let Some(value) = headers.get(ACCEPT_ENCODING) else {
        return;
    };
    let Ok(text) = value.to_str() else {
        headers.remove(ACCEPT_ENCODING);
        return;
    };
    let coding = |item: &str| item.split(';').next().unwrap_or_default().trim().to_owned();
    if text.split(',').all(|item| {
        let c = coding(item);
        c.is_empty() || Coding::accepted(&c)
    }) {
        return;
    }
    let kept: Vec<&str> = text
        .split(',')
        .filter(|item| Coding::accepted(&coding(item)))
        .map(str::trim)
        .collect();
    match HeaderValue::from_str(&kept.join(", ")) {
        Ok(v) if !kept.is_empty() => {
            headers.insert(ACCEPT_ENCODING, v);
        }
        _ => {
            headers.remove(ACCEPT_ENCODING);
        }
    }
}

/// Whether a `Host` is a plain `host[:port]` (a DNS name, an IPv4 address
/// or a bracketed IPv6 one): it becomes the base of rewritten links, so
/// nothing else (no path, userinfo or space) may pass.
fn is_plain_host(value: &str) -> bool {
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => ("", None),
            p => match p.strip_prefix(':') {
                Some(p) => ("", Some(p)),
                None => return false,
            },
        }
    } else {
        match value.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (value, None),
        }
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok()
    });
    let host_ok = value.starts_with('[')
        || (!host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    port_ok && host_ok
}

fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| h)
            .trim_start_matches('[');
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_codes_are_read_at_the_top_or_one_object_down() {
        let n = JsonCode::Number(1550);
        assert!(json_code_is(
            br#"{"D":{"Success":false,"Code":1550,"Message":"Over rate limit"}}"#,
            &n
        ));
        assert!(!json_code_is(br#"{"D":{"Success":false,"Code":1020}}"#, &n));
        assert!(!json_code_is(b"<html>busy</html>", &n));
        assert!(json_code_is(br#"{"code":"1550"}"#, &n));
        let t = JsonCode::Text("token_expired".into());
        assert!(json_code_is(br#"{"error":{"code":"token_expired"}}"#, &t));
        assert!(!json_code_is(br#"{"error":{"code":"bad_token"}}"#, &t));
        assert!(!json_code_is(
            br#"{"a":{"b":{"code":"token_expired"}}}"#,
            &t
        ));
    }

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

    #[test]
    fn dot_only_segments_and_decoded_query_marks() {
        for p in [
            "/a/.",
            "/a/../b",
            "/a/...",
            "/a/..../b",
            "/a/%2e%2e%2e/b",
            "/a/.. ./b",
            "/a/..%3f/b",
            "/a/..%3F/b",
            "/a/..%23/b",
            "/a/..%3fx=1/b",
            "/a/.%23frag",
            "/a/..%253f/b",
            "/a/%2e%2e%3f",
        ] {
            assert!(has_dot_segment(p), "{p}");
        }
        for p in [
            "/v1.2/x",
            "/.well-known/x",
            "/a/file...txt",
            "/a/...x",
            "/a/x...",
            "/a/..x%3f",
            "/a/%3f../b",
            "/a/%23",
            "/a/x%3f..",
        ] {
            assert!(!has_dot_segment(p), "{p}");
        }
    }

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn form_bodies_are_read_for_method_overrides() {
        let form = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).expect("value"));
            h
        };
        let f = form("application/x-www-form-urlencoded; charset=utf-8");
        for body in [
            &b"_method=HEAD"[..],
            b"a=1&_method=head",
            b"a=1&%5Fmethod=%48EAD",
            b"_method=+trace+&b=2",
        ] {
            assert!(form_overrides_to_refused_method(&f, body), "{body:?}");
        }
        for body in [
            &b"_method=PUT"[..],
            b"a=_method%3DHEAD",
            b"method=HEAD",
            b"",
        ] {
            assert!(!form_overrides_to_refused_method(&f, body), "{body:?}");
        }
        let json = form("application/json");
        assert!(!form_overrides_to_refused_method(&json, b"_method=HEAD"));
    }

    #[test]
    fn method_overrides_to_head_trace_track_connect_are_refused() {
        let refused = |p: &Parts| method_override(p) == Override::Refused;
        for name in METHOD_OVERRIDE_HEADERS {
            for v in [
                "TRACE",
                "trace",
                " Track ",
                "CONNECT",
                "HEAD",
                "head",
                "GET, TRACE",
                "%54RACE",
                "%48EAD",
            ] {
                assert!(refused(&parts("POST", "/x", &[(name, v)])), "{name}: {v}");
            }
        }
        let upper = [("X-HTTP-Method-Override", "Trace")];
        assert!(refused(&parts("POST", "/x", &upper)));
        // CGI, PHP and WSGI take `_` for `-` in header names.
        for name in [
            "X_HTTP_METHOD_OVERRIDE",
            "x_http_method",
            "X-Method_Override",
        ] {
            assert!(refused(&parts("POST", "/x", &[(name, "HEAD")])), "{name}");
            assert_eq!(
                method_override(&parts("GET", "/x", &[(name, "GET")])),
                Override::Allowed,
                "{name}"
            );
        }
        for q in [
            "/x?_method=TRACE",
            "/x?a=1&_method=trace",
            "/x?a=1;_method=%20TRACK%20",
            "/x?_method=+connect+",
            "/x?_method=Head",
            "/x?%5Fmethod=TRACE",
            "/x?_METHOD=%2554RACE",
        ] {
            assert!(refused(&parts("POST", q, &[])), "{q}");
        }
        for (q, h) in [
            ("/x?_method=PATCH", ("x-http-method-override", "DELETE")),
            ("/x?_method=TRACED", ("x-http-method", "HEADER")),
            ("/x", ("x-method-override", "GET")),
            ("/x?_method=", ("accept", "*/*")),
        ] {
            assert_eq!(
                method_override(&parts("POST", q, &[h])),
                Override::Allowed,
                "{q}"
            );
        }
        for (q, h) in [
            ("/x?method=TRACE", ("x-override", "TRACE")),
            ("/x?q=_method%3DTRACE", ("accept", "*/*")),
        ] {
            assert_eq!(
                method_override(&parts("GET", q, &[h])),
                Override::None,
                "{q}"
            );
        }
    }
}
