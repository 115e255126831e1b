//! Local stand-ins of FBS's Spark API and Zillow's Rental Feeds API, for
//! credproxy's integration tests (in-process) and its demo.
//!
//! A [`Standin`] is one running HTTP/1.1 server on 127.0.0.1 that plays one
//! provider: its token endpoint (see `token.rs`), its authorisation pages
//! (login, consent and redirect; see `authorize.rs`), and an API (see `api.rs`) that checks credentials the way the
//! provider does, records every request it receives and offers a few special
//! paths (`/download`, `/upload`, `/slow`, `/status/{code}`) to exercise a
//! proxy's streaming, timeouts and status handling. Tests steer it through
//! the methods of [`Standin`]: mint tokens and codes, expire access tokens,
//! make the token endpoint fail or hang, and inspect what arrived.

mod api;
mod authorize;
mod token;

pub use api::pattern_byte;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

/// Which provider a stand-in plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Spark,
    Zillow,
}

impl Kind {
    /// `"spark"` or `"zillow"`, as in the `x-standin` response header.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Spark => "spark",
            Kind::Zillow => "zillow",
        }
    }

    fn token_path(self) -> &'static str {
        match self {
            Kind::Spark => "/v1/oauth2/grant",
            Kind::Zillow => "/oauth/token",
        }
    }

    fn authorize_path(self) -> &'static str {
        match self {
            Kind::Spark => "/openid",
            Kind::Zillow => "/oauth/authorize",
        }
    }
}

/// How a stand-in is set up. Start from [`Options::spark`] or [`Options::zillow`].
#[derive(Clone, Debug)]
pub struct Options {
    pub kind: Kind,
    /// The client id the token endpoint (and Zillow's API) expects.
    pub client_id: String,
    /// The client secret the token endpoint expects.
    pub client_secret: String,
    /// Zillow only: the expected `apiKey` query parameter (ignored for Spark).
    pub api_key: String,
    /// Lifetime of access tokens. `None`: the token answer has no
    /// `expires_in` and tokens never expire by time.
    pub access_lifetime: Option<Duration>,
    /// 0 picks an ephemeral port.
    pub port: u16,
}

impl Options {
    pub fn spark() -> Options {
        Options {
            kind: Kind::Spark,
            client_id: "spark-client".into(),
            client_secret: "spark-secret-XYZ".into(),
            api_key: String::new(),
            access_lifetime: Some(Duration::from_secs(86400)),
            port: 0,
        }
    }

    pub fn zillow() -> Options {
        Options {
            kind: Kind::Zillow,
            client_id: "zillow-client".into(),
            client_secret: "zillow-secret-XYZ".into(),
            api_key: "zillow-api-key-XYZ".into(),
            access_lifetime: None,
            port: 0,
        }
    }
}

/// A freshly minted token pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    pub access_token: String,
    pub refresh_token: String,
    /// Seconds, as the token endpoint would announce it (`None` when the
    /// stand-in has no access lifetime).
    pub expires_in: Option<u64>,
}

/// How the token endpoint behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenMode {
    /// Follows the provider's rules.
    Normal,
    /// Always answers 500.
    Fail500,
    /// Never answers, until the mode changes or the stand-in stops.
    Hang,
    /// Always answers 400 `invalid_grant`.
    InvalidGrant,
}

/// One API request as the stand-in received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// The query exactly as received, without the `?`.
    pub query: Option<String>,
    /// Lowercase names, in the order received (repeated names grouped); values lossy UTF-8.
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
    /// Hex SHA-256 of the body.
    pub body_sha256: String,
}

impl Recorded {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (any case), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A running stand-in. Dropping it, or [`Standin::shutdown`], stops the
/// server and closes every connection at once.
pub struct Standin {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl Standin {
    /// Binds 127.0.0.1:`opts.port` and starts serving on the current Tokio runtime.
    pub async fn start(opts: Options) -> std::io::Result<Standin> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, opts.port)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(opts));
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, shared.clone(), stop_rx));
        Ok(Standin { shared, addr, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn kind(&self) -> Kind {
        self.shared.opts.kind
    }

    pub fn options(&self) -> &Options {
        &self.shared.opts
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn token_url(&self) -> String {
        format!("{}{}", self.base_url(), self.kind().token_path())
    }

    /// The authorisation page: Spark's OpenID+OAuth 2 hybrid flow (`/openid`),
    /// or Zillow's OAuth 2 flow (`/oauth/authorize`).
    pub fn authorize_url(&self) -> String {
        format!("{}{}", self.base_url(), self.kind().authorize_path())
    }

    /// The plain OAuth 2 authorisation page: Spark's `/oauth2`. Zillow has only
    /// one authorisation page, already plain OAuth 2: its [`Standin::authorize_url`].
    pub fn authorize_url_oauth2(&self) -> String {
        match self.kind() {
            Kind::Spark => format!("{}/oauth2", self.base_url()),
            Kind::Zillow => self.authorize_url(),
        }
    }

    /// The raw query (without the `?`) of the last `GET` of an authorisation
    /// page, whether or not it was acceptable; `None` before the first.
    pub fn last_authorize_query(&self) -> Option<String> {
        lock(&self.shared.authorize.last_query).clone()
    }

    /// Successful `authorization_code` grants answered by the token endpoint.
    pub fn codes_redeemed(&self) -> u64 {
        self.shared.codes_redeemed.load(Ordering::SeqCst)
    }

    /// Mints a valid access + refresh token pair, as if a code had been exchanged.
    pub fn issue_tokens(&self) -> Tokens {
        self.shared.tokens().mint(&self.shared.opts)
    }

    /// Mints a single-use authorisation code for the token endpoint.
    pub fn issue_code(&self) -> String {
        self.shared.mint_code()
    }

    /// Every access token issued so far answers 401 "expired" from now on.
    pub fn expire_access_tokens(&self) {
        for t in self.shared.tokens().access.values_mut() {
            t.expired = true;
        }
    }

    /// Successful `refresh_token` grants answered.
    pub fn grant_count(&self) -> u64 {
        self.shared.grants.load(Ordering::SeqCst)
    }

    /// POSTs to the token endpoint, whatever their outcome.
    pub fn token_calls(&self) -> u64 {
        *self.shared.token_calls.borrow()
    }

    /// Resolves once at least `n` POSTs have reached the token endpoint
    /// (counted on arrival, before the answer).
    pub async fn wait_for_token_calls(&self, n: u64) {
        let mut rx = self.shared.token_calls.subscribe();
        let _ = rx.wait_for(|count| *count >= n).await;
    }

    /// Every access and refresh token this stand-in ever issued (for tests
    /// that search logs for secrets).
    pub fn all_tokens(&self) -> Vec<String> {
        let t = self.shared.tokens();
        t.access
            .keys()
            .chain(t.refresh.iter())
            .chain(t.consumed.iter())
            .cloned()
            .collect()
    }

    /// Refresh grants refused because their refresh token had already been
    /// used once: each is a client that lost track of a rotation.
    pub fn reused_refresh_tokens(&self) -> u64 {
        self.shared.tokens().reused
    }

    pub fn set_token_mode(&self, mode: TokenMode) {
        self.shared.mode.send_replace(mode);
    }

    /// The `redirect_uri` of the last token request that could be parsed
    /// (`None` if it carried none).
    pub fn last_redirect_uri(&self) -> Option<String> {
        lock(&self.shared.last_redirect_uri).clone()
    }

    /// Every API request received (not token endpoint calls), oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    pub fn last_request(&self) -> Option<Recorded> {
        lock(&self.shared.requests).last().cloned()
    }

    /// Forgets the recorded requests (the count of [`Standin::wait_for_requests`] restarts at 0).
    pub fn clear_requests(&self) {
        let mut reqs = lock(&self.shared.requests);
        reqs.clear();
        self.shared.recorded.send_replace(0);
    }

    /// Resolves once at least `n` API requests have been recorded.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut rx = self.shared.recorded.subscribe();
        // The sender lives in `shared`, which `self` holds: this cannot fail.
        let _ = rx.wait_for(|count| *count >= n).await;
    }

    /// Stops the server and closes every connection.
    pub fn shutdown(self) {}
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl std::fmt::Debug for Standin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standin")
            .field("kind", &self.kind())
            .field("addr", &self.addr)
            .finish()
    }
}

/// State shared by the handle and the server tasks.
pub(crate) struct Shared {
    pub(crate) opts: Options,
    tokens: Mutex<TokenStore>,
    pub(crate) mode: watch::Sender<TokenMode>,
    pub(crate) grants: AtomicU64,
    pub(crate) codes_redeemed: AtomicU64,
    pub(crate) authorize: authorize::State,
    pub(crate) token_calls: watch::Sender<u64>,
    pub(crate) last_redirect_uri: Mutex<Option<String>>,
    requests: Mutex<Vec<Recorded>>,
    recorded: watch::Sender<usize>,
}

impl Shared {
    fn new(opts: Options) -> Shared {
        Shared {
            opts,
            tokens: Mutex::new(TokenStore::default()),
            mode: watch::Sender::new(TokenMode::Normal),
            grants: AtomicU64::new(0),
            codes_redeemed: AtomicU64::new(0),
            authorize: authorize::State::default(),
            token_calls: watch::Sender::new(0),
            last_redirect_uri: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
            recorded: watch::Sender::new(0),
        }
    }

    pub(crate) fn tokens(&self) -> MutexGuard<'_, TokenStore> {
        lock(&self.tokens)
    }

    /// A single-use authorisation code for the token endpoint.
    pub(crate) fn mint_code(&self) -> String {
        let code = random_token(&format!("{}-code-", self.opts.kind.name()));
        self.tokens().codes.insert(code.clone());
        code
    }

    pub(crate) fn record(&self, rec: Recorded) {
        let mut reqs = lock(&self.requests);
        reqs.push(rec);
        self.recorded.send_replace(reqs.len());
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct AccessToken {
    expires_at: Option<Instant>,
    expired: bool,
}

/// What an access token presented to the API is worth.
pub(crate) enum AccessCheck {
    Valid,
    Expired,
    Unknown,
}

/// Access tokens, live refresh tokens and unused authorisation codes.
#[derive(Default)]
pub(crate) struct TokenStore {
    access: HashMap<String, AccessToken>,
    refresh: HashSet<String>,
    /// Refresh tokens already redeemed once (strict rotation).
    consumed: HashSet<String>,
    reused: u64,
    codes: HashSet<String>,
}

impl TokenStore {
    fn mint(&mut self, opts: &Options) -> Tokens {
        let prefix = opts.kind.name();
        let access_token = random_token(&format!("{prefix}-at-"));
        let refresh_token = random_token(&format!("{prefix}-rt-"));
        self.access.insert(
            access_token.clone(),
            AccessToken {
                expires_at: opts.access_lifetime.map(|d| Instant::now() + d),
                expired: false,
            },
        );
        self.refresh.insert(refresh_token.clone());
        Tokens {
            access_token,
            refresh_token,
            expires_in: opts.access_lifetime.map(|d| d.as_secs()),
        }
    }

    pub(crate) fn check_access(&self, token: &str) -> AccessCheck {
        match self.access.get(token) {
            None => AccessCheck::Unknown,
            Some(t) if t.expired || t.expires_at.is_some_and(|at| Instant::now() >= at) => {
                AccessCheck::Expired
            }
            Some(_) => AccessCheck::Valid,
        }
    }

    /// Consumes a live refresh token (strict rotation) and mints a new pair.
    pub(crate) fn redeem_refresh(&mut self, refresh_token: &str, opts: &Options) -> Option<Tokens> {
        if self.refresh.remove(refresh_token) {
            self.consumed.insert(refresh_token.to_owned());
            return Some(self.mint(opts));
        }
        if self.consumed.contains(refresh_token) {
            self.reused += 1;
        }
        None
    }

    /// Consumes an unused authorisation code and mints a pair.
    pub(crate) fn redeem_code(&mut self, code: &str, opts: &Options) -> Option<Tokens> {
        self.codes.remove(code).then(|| self.mint(opts))
    }
}

/// Hex SHA-256 of what `GET /download?bytes=n` sends, computed without
/// holding it in memory.
pub fn download_sha256(n: u64) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut i = 0u64;
    while i < n {
        buf.clear();
        let end = n.min(i + 64 * 1024);
        buf.extend((i..end).map(pattern_byte));
        hasher.update(&buf);
        i = end;
    }
    hex(&hasher.finalize())
}

/// `prefix` followed by 32 random hex digits.
pub(crate) fn random_token(prefix: &str) -> String {
    let bytes: [u8; 16] = rand::random();
    format!("{prefix}{}", hex(&bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A response with a JSON body.
pub(crate) fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Body::from(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Resolves once the stand-in is told to stop (or its handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            () = stopped(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of file descriptors and the like: back off a little.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(shared, req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.header_read_timeout(None);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            // Stopping drops the connection, in-flight requests included.
            tokio::select! {
                _ = conn => {}
                () = stopped(&mut stop) => {}
            }
        });
    }
}

async fn route(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let kind = shared.opts.kind;
    let path = req.uri().path();
    if path == kind.token_path() {
        token::handle(shared, req).await
    } else if let Some((page, flow, step)) = authorize::route(kind, path) {
        authorize::handle(shared, req, page, flow, step).await
    } else {
        api::handle(shared, req).await
    }
}
