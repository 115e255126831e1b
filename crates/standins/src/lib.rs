//! Local stand-ins of FBS's Spark API, Zillow's Rental Feeds API and a
//! generic OAuth 2 API ("acme", see [below](#the-generic-oauth-2-api-acme)),
//! for credproxy's integration tests (in-process) and its demo.
//!
//! A [`Standin`] is one running HTTP/1.1 server on 127.0.0.1 that plays one
//! provider: its token endpoint (see `token.rs`; Spark also its session
//! endpoint, see `apikey.rs`), its authorisation pages
//! (login, consent and redirect; see `authorize.rs`), and an API (see `api.rs`) that checks credentials the way the
//! provider does, records every request it receives and offers a few special
//! paths to exercise a proxy's streaming, timeouts, status handling, link
//! rewriting and compression. Tests steer it through the methods of
//! [`Standin`]: mint tokens and codes, expire access tokens, make the token
//! endpoint fail or hang, make the API refuse, and inspect what arrived.
//!
//! # The API's paths
//!
//! Every path that is not the token endpoint or an authorisation page is the
//! API. It checks credentials first (Spark: `Authorization: OAuth TOKEN` or
//! `Bearer TOKEN`, or a signed request, below; Zillow: `accessToken`, `clientId` and `apiKey` in the
//! query; acme: where [`OAuth2::credential`] says), then answers:
//!
//! | path | answer |
//! | --- | --- |
//! | `/download?bytes=N` | N pattern bytes ([`pattern_byte`]), streamed in 64 KiB chunks, with `Content-Length` |
//! | `/upload` | `{"len", "sha256"}` of the request body |
//! | `/slow?ms=N` | the echo, after N ms |
//! | `/status/{code}` | that status, `{"status": code}` |
//! | `/redirect?to=PATH` | 302, `Location: ORIGIN PATH`; Zillow appends the request's whole query (credentials included), as its trailing-slash redirects do |
//! | `/redirect-away` | 302, `Location: https://elsewhere.example/x` |
//! | `/big-json?bytes=N[&content_length=1]` | about N bytes of `{"value":[...]}` streamed in 64 KiB chunks (see [`big_json_records`]) |
//! | `…/Reso/OData/…` (Spark only) | the RESO Web API, below |
//! | anything else | a JSON echo of the request (method, path, raw query, headers, body length and hash) |
//!
//! `ORIGIN` is always `http://127.0.0.1:PORT` of the listener that got the
//! request: the API host ([`Standin::base_url`]) or the replication host
//! ([`Standin::replication_url`]).
//!
//! # The RESO Web API (Spark)
//!
//! Any path with the segments `Reso/OData` (any case), e.g. `/Reso/OData` or
//! `/Version/3/Reso/OData`, is a RESO prefix:
//! - `PREFIX` or `PREFIX/`: the service document (the entity sets);
//! - `PREFIX/$metadata`: an EDMX document (`application/xml`) whose `xml:base`
//!   and a `Core.Links` annotation are absolute URLs on ORIGIN, and whose
//!   vocabulary reference is on another origin;
//! - `PREFIX/Property`, `PREFIX/Member`, `PREFIX/Office`: [`Options::reso_records`]
//!   synthetic records each (keys `P000001`…, `M000001`…, `O000001`…), paged by
//!   `$top` (default 10, at most 1000) and an opaque `$skiptoken`; `$count=true`
//!   adds `@odata.count`; other query options are ignored. The answer is
//!   `{"@odata.context": ORIGIN PREFIX/$metadata#Property, "value": [...],
//!   "@odata.nextLink": ORIGIN PATH?$top=N&$skiptoken=T}`, the next link absent
//!   on the last page (other query parameters of the request follow `$skiptoken`
//!   in it, as received). Each record has `@odata.id` (ORIGIN, the record's URL), a
//!   media URL on another origin (`MediaURL`, `MemberPhotoURL`,
//!   `OfficeLogoURL`: `https://cdn.example.com/...`) and, on the replication
//!   host only, `ApiHostURL`: the same record's URL on the API host's origin;
//! - `PREFIX/Property('P000001')` (also `Member(...)`, `Office(...)`): that one
//!   record, or 404;
//! - any other entity set name: an empty collection; any deeper path: 404.
//!
//! Methods other than `GET` and `HEAD` (or `POST` with
//! `X-HTTP-Method-Override: GET`) get 405. Errors of the RESO paths other than
//! the credential checks are OData errors: `{"error": {"code", "message"}}`.
//!
//! # Wire details
//!
//! - JSON and XML answers of the API are compressed when the request's
//!   `Accept-Encoding` allows it (`q=0` honoured): gzip when accepted, else
//!   deflate (zlib format). Then `Content-Encoding` is set, `Content-Length` is
//!   dropped (the body is compressed as it streams) and `Vary: Accept-Encoding`
//!   is sent; `Vary` is sent on those answers in any case.
//! - With [`Options::json_escape_slashes`], every `/` in the API's JSON is
//!   written `\/` (valid JSON, as PHP and some .NET servers write it).
//!
//! # Controls
//!
//! - [`Standin::expire_access_tokens`]: every token issued so far is expired.
//! - [`Standin::expire_access_after_uses`]: from now on an access token is
//!   expired after it has been presented N times on the API (0 turns it off).
//!   Presentations are counted only for requests that reach the token check
//!   (not those refused by a fault, the budget or a missing user agent).
//! - [`Standin::set_token_mode`]: the token endpoint fails, hangs or refuses.
//! - [`Standin::set_api_fault`]: every API request is refused whatever its
//!   token, while the token endpoint works: [`ApiFault::DisabledKey`] (Spark
//!   401 code 1010; Zillow 401 `disabled_api_key`) or [`ApiFault::RateLimited`]
//!   (Spark code 1550; Zillow `rate_limited`; with 429 or 503, an optional
//!   `Retry-After`, for a number of requests or until cleared).
//! - [`Standin::set_budget`]: a request budget enforced as Spark does, at most
//!   N API requests in any window of a given length (a sliding window; see
//!   [`Budget`]). Beyond it a request is refused (429, or Spark's 503 with code
//!   1550; Zillow 429 `rate_limited`), optionally with a `Retry-After`, and not
//!   counted. [`Standin::budget_refusals`], [`Standin::max_in_any_window`],
//!   [`Standin::accepted_arrivals`] and [`Standin::wait_for_refusals`] tell a
//!   test what happened.
//! - [`Options::require_user_agent`]: a Spark API request without
//!   `X-SparkApi-User-Agent` gets 400 code 1016.
//! - [`Options::replication`]: a second listener, the replication host, serves
//!   the same API with the same tokens and counters. [`Recorded::host`] tells
//!   which listener got a request.
//!
//! # API-key authentication (Spark)
//!
//! Spark's original authentication, as its Ruby client
//! (`SparkApi::Authentication::ApiAuth`) does it, for the keys in
//! [`Options::api_keys`] (each an [`ApiKey`]: key, secret, optional
//! `ApiUser`); see `apikey.rs`:
//! - `POST /v1/session?ApiKey=K&ApiSig=S` with `S` = [`session_sig`]
//!   answers `{"D": {"Success": true, "Results": [{"AuthToken", "Expires",
//!   "Roles": ["idx"]}]}}`, `Expires` in RFC 3339 with Spark's `-05:00`
//!   offset, [`Options::session_lifetime`] ahead. One session per key:
//!   opening one ends the key's last. An unknown key or a bad signature gets
//!   401 code 1000, a disabled key ([`Standin::set_api_key_disabled`], or
//!   [`ApiFault::DisabledKey`]) 1010. The endpoint follows
//!   [`Standin::set_token_mode`] (hang, 500; `InvalidGrant`: 1000) and is
//!   not an API request: not recorded, not budgeted; [`Standin::session_calls`]
//!   counts its calls and [`Standin::sessions_opened`] the sessions it
//!   opened, per key.
//! - An API request whose query carries `AuthToken` or `ApiSig` is checked
//!   this way instead of by its `Authorization`: `AuthToken` and `ApiSig`
//!   exactly once, `ApiSig` = [`request_sig`] over the path as received,
//!   the query and the body (else 1000), the key's `ApiUser` exactly once
//!   when it has one and none when not (else 1000), the key enabled (else
//!   1010), the session neither ended nor past `Expires` (else 1020; an
//!   `AuthToken` never issued also gets 1020).
//! - Controls: [`Standin::end_api_sessions`], [`Standin::end_api_session`],
//!   [`Standin::set_session_lifetime`], [`Standin::open_api_session`] (another
//!   copy of the application takes the key's session), [`Standin::live_auth_token`].
//!
//! Spark's refusals are `{"D": {"Success": false, "Code": N, "Message": "..."}}`:
//! 1000 invalid key (401), 1010 disabled key (401), 1016 user agent required
//! (400), 1020 expired token (401), 1550 over the rate limit (429 or 503).
//!
//! # The generic OAuth 2 API (acme)
//!
//! [`Options::oauth2`] starts a stand-in of an API that follows RFC 6749 and
//! RFC 6750 with no quirk of its own, each of its choices set by
//! [`Options::oauth2`]'s [`OAuth2`] so that one test can pick each variant:
//! - the token endpoint (`POST /oauth/token`) takes a form body
//!   ([`GrantBody::Form`]) or a JSON object ([`GrantBody::Json`]), and the
//!   client credentials as HTTP Basic ([`ClientAuth::Basic`]) or as
//!   `client_id` and `client_secret` in the body ([`ClientAuth::Body`]); a
//!   request that authenticates the other way (a `client_secret` in the body
//!   under Basic, an `Authorization` header under Body) is refused with 401
//!   `invalid_client`, a body of the wrong format with 400 `invalid_request`;
//! - refresh tokens rotate strictly ([`OAuth2::rotation`]: each works once,
//!   the answer carries the next), or not at all (the answer has no
//!   `refresh_token` and the one presented stays valid);
//! - the answer is `{"access_token", "token_type": "Bearer", "expires_in"?,
//!   "refresh_token"?}`, `expires_in` from [`Options::access_lifetime`];
//! - the authorisation page `/oauth/authorize` is the plain OAuth 2 code
//!   flow (as Zillow's); [`Standin::last_authorize_scope`] is the `scope` it
//!   last received;
//! - the API reads the access token from [`OAuth2::credential`] (a header
//!   whose value follows a template, by default `Authorization: Bearer
//!   {token}`, or a query parameter), exactly once, and requires each of
//!   [`OAuth2::required`] (a client id or API key in another header or query
//!   parameter) with its exact value;
//! - its refusals are `{"error": {"code": CODE, "message": "..."}}`: 401
//!   [`OAuth2::expired_code`] for an expired token (without one, an expired
//!   token is refused as an unknown one), 401 [`OAuth2::invalid_code`] for a
//!   missing or unknown token, 401 `invalid_client` for a missing or wrong
//!   [`OAuth2::required`] value, 401 `disabled_key` for
//!   [`ApiFault::DisabledKey`], 429 `rate_limited` (with `Retry-After` when
//!   set) for [`ApiFault::RateLimited`] and the [`Budget`]; a 401 on a header
//!   credential carries `WWW-Authenticate: Bearer error="invalid_token"`;
//! - a static key ([`OAuth2::static_key`]): a fixed key the API accepts in
//!   [`OAuth2::credential`] besides the issued tokens, which never expires
//!   (not by time, use or [`Standin::expire_access_tokens`]) until
//!   [`Standin::revoke_static_key`]; then it is refused as an unknown token.

mod api;
mod apikey;
mod authorize;
mod big_json;
mod budget;
mod encoding;
pub mod flexmls;
pub mod receiver;
mod reso;
mod token;

pub use api::pattern_byte;
pub use apikey::{request_sig, session_sig, ApiKey, ApiSession};
pub use big_json::big_json_records;
pub use budget::{Budget, Refusal};

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
    /// A generic OAuth 2 API, "acme", configured by [`OAuth2`].
    OAuth2,
}

impl Kind {
    /// `"spark"`, `"zillow"` or `"acme"`, as in the `x-standin` response header.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Spark => "spark",
            Kind::Zillow => "zillow",
            Kind::OAuth2 => "acme",
        }
    }

    fn token_path(self) -> &'static str {
        match self {
            Kind::Spark => "/v1/oauth2/grant",
            Kind::Zillow | Kind::OAuth2 => "/oauth/token",
        }
    }

    fn authorize_path(self) -> &'static str {
        match self {
            Kind::Spark => "/openid",
            Kind::Zillow | Kind::OAuth2 => "/oauth/authorize",
        }
    }
}

/// The body format the generic stand-in's token endpoint takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantBody {
    /// `application/x-www-form-urlencoded` (RFC 6749).
    Form,
    /// A JSON object (`application/json`), as Spark's.
    Json,
}

/// How the generic stand-in's token endpoint wants the client authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic (RFC 6749 §2.3.1); a `client_secret` in the body is refused.
    Basic,
    /// `client_id` and `client_secret` in the grant body; an `Authorization` header is refused.
    Body,
}

/// Where the generic stand-in's API reads a credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Header `name` (any case), exactly once, whose value is `template` with
    /// `{token}` replaced by the credential (e.g. `Bearer {token}`).
    Header { name: String, template: String },
    /// Query parameter `name`, exactly once (form-urlencoded).
    Query(String),
}

impl Slot {
    /// `Authorization: Bearer {token}` (RFC 6750).
    pub fn bearer() -> Slot {
        Slot::header("Authorization", "Bearer {token}")
    }

    pub fn header(name: &str, template: &str) -> Slot {
        Slot::Header {
            name: name.to_owned(),
            template: template.to_owned(),
        }
    }

    pub fn query(name: &str) -> Slot {
        Slot::Query(name.to_owned())
    }
}

/// What the generic OAuth 2 stand-in ([`Kind::OAuth2`]) does; ignored by
/// Spark and Zillow. See the crate's documentation.
#[derive(Clone, Debug)]
pub struct OAuth2 {
    pub grant_body: GrantBody,
    pub client_auth: ClientAuth,
    /// `true`: strict rotation, a refresh token works once and the answer
    /// carries the next; `false`: the answer has no `refresh_token` and the
    /// one presented stays valid.
    pub rotation: bool,
    /// Where the API reads the access token.
    pub credential: Slot,
    /// Other credentials the API requires, each in its slot with exactly this
    /// value (e.g. a client id or an API key).
    pub required: Vec<(Slot, String)>,
    /// The `error.code` of the 401 for an expired token; `None`: an expired
    /// token is refused as an unknown one.
    pub expired_code: Option<String>,
    /// The `error.code` of the 401 for a missing or unknown token.
    pub invalid_code: String,
    /// A fixed key the API accepts besides issued tokens, until
    /// [`Standin::revoke_static_key`].
    pub static_key: Option<String>,
}

impl Default for OAuth2 {
    /// Form grants, Basic client authentication, strict rotation,
    /// `Authorization: Bearer {token}`, nothing else required, 401
    /// `token_expired` and `invalid_token`, no static key.
    fn default() -> OAuth2 {
        OAuth2 {
            grant_body: GrantBody::Form,
            client_auth: ClientAuth::Basic,
            rotation: true,
            credential: Slot::bearer(),
            required: Vec::new(),
            expired_code: Some("token_expired".into()),
            invalid_code: "invalid_token".into(),
            static_key: None,
        }
    }
}

/// How a stand-in is set up. Start from [`Options::spark`],
/// [`Options::zillow`] or [`Options::oauth2`].
#[derive(Clone, Debug)]
pub struct Options {
    pub kind: Kind,
    /// The client id the token endpoint (and Zillow's API) expects.
    pub client_id: String,
    /// The client secret the token endpoint expects.
    pub client_secret: String,
    /// Zillow: the expected `apiKey` query parameter; acme: a key a test may
    /// put in [`OAuth2::required`] or [`OAuth2::static_key`] (ignored for Spark).
    pub api_key: String,
    /// Lifetime of access tokens. `None`: the token answer has no
    /// `expires_in` and tokens never expire by time.
    pub access_lifetime: Option<Duration>,
    /// 0 picks an ephemeral port.
    pub port: u16,
    /// Records in each RESO collection (`Property`, `Member`, `Office`; Spark only).
    pub reso_records: usize,
    /// Write every `/` in the API's JSON strings as `\/`.
    pub json_escape_slashes: bool,
    /// Also serve the API on a second listener, the replication host, that
    /// shares tokens and counters with the first.
    pub replication: bool,
    /// The replication host's port when [`Options::replication`] is set; 0 picks an ephemeral port.
    pub replication_port: u16,
    /// Spark only: refuse an API request without `X-SparkApi-User-Agent` (400, code 1016).
    pub require_user_agent: bool,
    /// The generic OAuth 2 stand-in's choices (ignored by Spark and Zillow).
    pub oauth2: OAuth2,
    /// Spark only: the keys its API-key authentication accepts (see
    /// [below](#api-key-authentication-spark)); none by default.
    pub api_keys: Vec<ApiKey>,
    /// Spark only: how long a session of API-key authentication lasts
    /// (`Expires`); [`Standin::set_session_lifetime`] changes it later.
    pub session_lifetime: Duration,
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
            reso_records: 25,
            json_escape_slashes: false,
            replication: false,
            replication_port: 0,
            require_user_agent: false,
            oauth2: OAuth2::default(),
            api_keys: Vec::new(),
            session_lifetime: Duration::from_secs(3600),
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
            reso_records: 25,
            json_escape_slashes: false,
            replication: false,
            replication_port: 0,
            require_user_agent: false,
            oauth2: OAuth2::default(),
            api_keys: Vec::new(),
            session_lifetime: Duration::from_secs(3600),
        }
    }

    /// The generic OAuth 2 API, acme: [`OAuth2::default`], access tokens
    /// valid for an hour, an API key (`acme-api-key-XYZ`) ready for
    /// [`OAuth2::required`] or a static key.
    pub fn oauth2() -> Options {
        Options {
            kind: Kind::OAuth2,
            client_id: "acme-client".into(),
            client_secret: "acme-secret-XYZ".into(),
            api_key: "acme-api-key-XYZ".into(),
            access_lifetime: Some(Duration::from_secs(3600)),
            port: 0,
            reso_records: 25,
            json_escape_slashes: false,
            replication: false,
            replication_port: 0,
            require_user_agent: false,
            oauth2: OAuth2::default(),
            api_keys: Vec::new(),
            session_lifetime: Duration::from_secs(3600),
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

/// How every API request is refused, whatever its credentials, while the
/// token endpoint keeps working (see [`Standin::set_api_fault`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiFault {
    /// Spark: 401 `{"D":{"Code":1010,...}}`; Zillow: 401 `disabled_api_key`.
    DisabledKey,
    /// Spark: code 1550; Zillow: `rate_limited`.
    RateLimited {
        /// 429 or 503 (anything else is sent as 429).
        status: u16,
        /// Seconds, sent as `Retry-After`.
        retry_after: Option<u64>,
        /// Answer this many requests so, then back to normal; `None`: until cleared.
        times: Option<u32>,
    },
}

/// One API request as the stand-in received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Which listener got it: `"api"` or `"replication"`.
    pub host: &'static str,
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
    replication_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
}

impl Standin {
    /// Binds 127.0.0.1:`opts.port` (and, with [`Options::replication`],
    /// 127.0.0.1:`opts.replication_port`) and starts serving on the current
    /// Tokio runtime.
    pub async fn start(opts: Options) -> std::io::Result<Standin> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, opts.port)).await?;
        let addr = listener.local_addr()?;
        let replication = if opts.replication {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, opts.replication_port)).await?;
            let addr = listener.local_addr()?;
            Some((listener, addr))
        } else {
            None
        };
        let replication_addr = replication.as_ref().map(|(_, addr)| *addr);
        let shared = Arc::new(Shared::new(
            opts,
            format!("http://{addr}"),
            replication_addr.map(|a| format!("http://{a}")),
        ));
        let (stop, stop_rx) = watch::channel(false);
        let api = Arc::new(Listener {
            host: HOST_API,
            origin: shared.api_origin.clone(),
        });
        tokio::spawn(accept_loop(listener, shared.clone(), api, stop_rx.clone()));
        if let Some((listener, _)) = replication {
            let ctx = Arc::new(Listener {
                host: HOST_REPLICATION,
                origin: shared.replication_origin.clone().unwrap_or_default(),
            });
            tokio::spawn(accept_loop(listener, shared.clone(), ctx, stop_rx));
        }
        Ok(Standin {
            shared,
            addr,
            replication_addr,
            stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The replication host's address, when [`Options::replication`] is set.
    pub fn replication_addr(&self) -> Option<SocketAddr> {
        self.replication_addr
    }

    /// `http://127.0.0.1:PORT` of the replication host, when [`Options::replication`] is set.
    pub fn replication_url(&self) -> Option<String> {
        self.replication_addr.map(|a| format!("http://{a}"))
    }

    /// The RESO Web API's base on the API host: `http://127.0.0.1:PORT/Reso/OData`.
    pub fn reso_url(&self) -> String {
        format!("{}/Reso/OData", self.base_url())
    }

    /// Records in `{"value":[...]}` of `GET /big-json?bytes=n` on the API host.
    pub fn big_json_records(&self, n: u64) -> u64 {
        big_json_records(n, &self.base_url(), self.options().json_escape_slashes)
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

    /// The plain OAuth 2 authorisation page: Spark's `/oauth2`. Zillow and acme
    /// have only one authorisation page, already plain OAuth 2: their
    /// [`Standin::authorize_url`].
    pub fn authorize_url_oauth2(&self) -> String {
        match self.kind() {
            Kind::Spark => format!("{}/oauth2", self.base_url()),
            Kind::Zillow | Kind::OAuth2 => self.authorize_url(),
        }
    }

    /// The raw query (without the `?`) of the last `GET` of an authorisation
    /// page, whether or not it was acceptable; `None` before the first.
    pub fn last_authorize_query(&self) -> Option<String> {
        lock(&self.shared.authorize.last_query).clone()
    }

    /// The `scope` parameter (decoded) of the last `GET` of an authorisation
    /// page; `None` before the first or when it carried none.
    pub fn last_authorize_scope(&self) -> Option<String> {
        let query = self.last_authorize_query()?;
        form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| name == "scope")
            .map(|(_, value)| value.into_owned())
    }

    /// The generic stand-in's static key in force ([`OAuth2::static_key`]
    /// until [`Standin::revoke_static_key`]).
    pub fn static_key(&self) -> Option<String> {
        lock(&self.shared.static_key).clone()
    }

    /// The static key is refused (401, as an unknown token) from now on.
    pub fn revoke_static_key(&self) {
        *lock(&self.shared.static_key) = None;
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

    /// From now on, every access token (those issued so far and those issued
    /// later) is expired once it has been presented `n` times on the API: its
    /// next presentation answers 1020 (Zillow: `expired_token`). The counts
    /// start at 0 now; `n = 0` turns the limit off (tokens already expired by
    /// it stay expired).
    pub fn expire_access_after_uses(&self, n: u32) {
        self.shared.tokens().set_max_uses(n);
    }

    /// Makes every API request fail as `fault` says, whatever its token, or
    /// (`None`) stops it. The token endpoint is not affected.
    pub fn set_api_fault(&self, fault: Option<ApiFault>) {
        *lock(&self.shared.fault) = fault;
    }

    /// The fault in force (a [`ApiFault::RateLimited`] with its remaining `times`).
    pub fn api_fault(&self) -> Option<ApiFault> {
        *lock(&self.shared.fault)
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

    /// Spark: every session of API-key authentication ends now; its
    /// `AuthToken` answers 401 code 1020 from now on.
    pub fn end_api_sessions(&self) {
        self.shared.api_keys().end_all();
    }

    /// Spark: `key`'s session, if it has one, ends now (1020 from now on).
    pub fn end_api_session(&self, key: &str) {
        self.shared.api_keys().end(key);
    }

    /// Spark: sessions opened from now on last `lifetime` (their `Expires`);
    /// an `AuthToken` past it answers 401 code 1020.
    pub fn set_session_lifetime(&self, lifetime: Duration) {
        self.shared.api_keys().set_lifetime(lifetime);
    }

    /// Spark: opens a session for `key` as another copy of the application
    /// would, ending the one it had. Not counted by [`Standin::sessions_opened`].
    pub fn open_api_session(&self, key: &str) -> ApiSession {
        self.shared.api_keys().open(key)
    }

    /// Spark: `key` is disabled (`true`) or enabled again: while disabled,
    /// its session endpoint and its API requests answer 401 code 1010.
    pub fn set_api_key_disabled(&self, key: &str, disabled: bool) {
        self.shared.api_keys().set_disabled(key, disabled);
    }

    /// Spark: sessions that `POST /v1/session` opened for `key`.
    pub fn sessions_opened(&self, key: &str) -> u64 {
        self.shared.api_keys().opened(key)
    }

    /// Spark: sessions that `POST /v1/session` opened, every key together.
    pub fn sessions_opened_total(&self) -> u64 {
        self.shared.api_keys().opened_total()
    }

    /// Spark: `key`'s live `AuthToken`, if it has one that has not ended or expired.
    pub fn live_auth_token(&self, key: &str) -> Option<String> {
        self.shared.api_keys().live_token(key)
    }

    /// Spark: every `AuthToken` ever issued (for tests that search logs for secrets).
    pub fn all_auth_tokens(&self) -> Vec<String> {
        self.shared.api_keys().all_tokens()
    }

    /// Spark: POSTs to the session endpoint, whatever their outcome.
    pub fn session_calls(&self) -> u64 {
        *self.shared.session_calls.borrow()
    }

    /// Resolves once at least `n` POSTs have reached the session endpoint
    /// (counted on arrival, before the answer).
    pub async fn wait_for_session_calls(&self, n: u64) {
        let mut rx = self.shared.session_calls.subscribe();
        let _ = rx.wait_for(|count| *count >= n).await;
    }

    /// Every API request received (not token endpoint calls), oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    pub fn last_request(&self) -> Option<Recorded> {
        lock(&self.shared.requests).last().cloned()
    }

    /// Forgets the recorded requests (the count of [`Standin::wait_for_requests`] restarts at 0)
    /// and what the budget observed: its accepted arrivals
    /// ([`Standin::accepted_arrivals`], [`Standin::max_in_any_window`]) and
    /// its refusals ([`Standin::budget_refusals`], [`Standin::wait_for_refusals`]).
    /// The budget's window itself is not reset: requests accepted before
    /// still count against it, as they would at the provider.
    pub fn clear_requests(&self) {
        let mut reqs = lock(&self.shared.requests);
        reqs.clear();
        self.shared.recorded.send_replace(0);
        drop(reqs);
        let mut budget = lock(&self.shared.budget);
        budget.accepted.clear();
        self.shared.refusals.send_replace(0);
    }

    /// Puts `budget` in force from now on, with an empty window, no recorded
    /// arrivals and the refusal count at 0; or (`None`) stops enforcing one
    /// (what it observed stays readable). See [`Budget`] for what counts.
    pub fn set_budget(&self, budget: Option<Budget>) {
        let mut state = lock(&self.shared.budget);
        state.set(budget);
        if budget.is_some() {
            self.shared.refusals.send_replace(0);
        }
    }

    /// The budget in force.
    pub fn budget(&self) -> Option<Budget> {
        lock(&self.shared.budget).budget
    }

    /// API requests the budget refused since it was set (or since
    /// [`Standin::clear_requests`]).
    pub fn budget_refusals(&self) -> u64 {
        *self.shared.refusals.borrow()
    }

    /// Resolves `true` once the budget has refused at least `n` requests
    /// (counted as [`Standin::budget_refusals`] counts them), or `false` after
    /// `timeout`.
    pub async fn wait_for_refusals(&self, n: u64, timeout: Duration) -> bool {
        let mut rx = self.shared.refusals.subscribe();
        // The sender lives in `shared`, which `self` holds: `wait_for` cannot fail.
        let reached = async { rx.wait_for(|count| *count >= n).await.is_ok() };
        tokio::time::timeout(timeout, reached)
            .await
            .unwrap_or(false)
    }

    /// When each API request the budget accepted arrived, oldest first: every
    /// one while a budget was in force, since it was set (or since
    /// [`Standin::clear_requests`]). Refused requests are not in it. Times are
    /// on Tokio's clock (they follow `tokio::time::pause`).
    pub fn accepted_arrivals(&self) -> Vec<std::time::Instant> {
        lock(&self.shared.budget).accepted.clone()
    }

    /// The most of [`Standin::accepted_arrivals`] that lie in any window of
    /// length `per` (half-open: two arrivals exactly `per` apart are in no
    /// window together). Under a budget of N per `per` this is at most N.
    pub fn max_in_any_window(&self, per: Duration) -> u32 {
        budget::max_in_any_window(&lock(&self.shared.budget).accepted, per)
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
            .field("replication_addr", &self.replication_addr)
            .finish()
    }
}

/// [`Recorded::host`] of a request to the API host.
pub(crate) const HOST_API: &str = "api";
/// [`Recorded::host`] of a request to the replication host.
pub(crate) const HOST_REPLICATION: &str = "replication";

/// Which listener a connection came in on.
pub(crate) struct Listener {
    /// [`HOST_API`] or [`HOST_REPLICATION`].
    pub(crate) host: &'static str,
    /// `http://127.0.0.1:PORT` of this listener.
    pub(crate) origin: String,
}

/// State shared by the handle and the server tasks.
pub(crate) struct Shared {
    pub(crate) opts: Options,
    /// `http://127.0.0.1:PORT` of the API host.
    pub(crate) api_origin: String,
    /// `http://127.0.0.1:PORT` of the replication host, if there is one.
    pub(crate) replication_origin: Option<String>,
    pub(crate) fault: Mutex<Option<ApiFault>>,
    budget: Mutex<budget::State>,
    /// Requests refused by the budget.
    refusals: watch::Sender<u64>,
    tokens: Mutex<TokenStore>,
    pub(crate) mode: watch::Sender<TokenMode>,
    pub(crate) grants: AtomicU64,
    pub(crate) codes_redeemed: AtomicU64,
    pub(crate) authorize: authorize::State,
    pub(crate) token_calls: watch::Sender<u64>,
    pub(crate) last_redirect_uri: Mutex<Option<String>>,
    requests: Mutex<Vec<Recorded>>,
    recorded: watch::Sender<usize>,
    /// The generic stand-in's static key, until revoked.
    pub(crate) static_key: Mutex<Option<String>>,
    /// Spark's API keys and their sessions.
    api_keys: Mutex<apikey::State>,
    /// POSTs to Spark's session endpoint, whatever their outcome.
    pub(crate) session_calls: watch::Sender<u64>,
}

impl Shared {
    fn new(opts: Options, api_origin: String, replication_origin: Option<String>) -> Shared {
        Shared {
            static_key: Mutex::new(opts.oauth2.static_key.clone()),
            api_keys: Mutex::new(apikey::State::new(&opts.api_keys, opts.session_lifetime)),
            session_calls: watch::Sender::new(0),
            opts,
            api_origin,
            replication_origin,
            fault: Mutex::new(None),
            budget: Mutex::new(budget::State::default()),
            refusals: watch::Sender::new(0),
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

    pub(crate) fn api_keys(&self) -> MutexGuard<'_, apikey::State> {
        lock(&self.api_keys)
    }

    /// A single-use authorisation code for the token endpoint.
    pub(crate) fn mint_code(&self) -> String {
        let code = random_token(&format!("{}-code-", self.opts.kind.name()));
        self.tokens().codes.insert(code.clone());
        code
    }

    /// The fault that answers this API request, if any; counts it against
    /// a [`ApiFault::RateLimited`]'s `times`.
    pub(crate) fn take_fault(&self) -> Option<ApiFault> {
        let mut fault = lock(&self.fault);
        let current = (*fault)?;
        if let ApiFault::RateLimited {
            status,
            retry_after,
            times: Some(times),
        } = current
        {
            let left = times.saturating_sub(1);
            *fault = (left > 0).then_some(ApiFault::RateLimited {
                status,
                retry_after,
                times: Some(left),
            });
            if times == 0 {
                return None;
            }
        }
        Some(current)
    }

    /// What the budget in force (if any) says about an API request arriving
    /// now; a refusal is counted.
    pub(crate) fn take_budget(&self) -> Option<budget::Verdict> {
        let mut state = lock(&self.budget);
        // Read under the lock, so arrivals are recorded in order.
        let verdict = state.decide(Instant::now().into_std())?;
        if let budget::Verdict::Refused { .. } = verdict {
            self.refusals.send_modify(|n| *n += 1);
        }
        Some(verdict)
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
    /// Presentations on the API since the use limit was last set.
    uses: u32,
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
    /// Presentations after which an access token expires (`None`: no limit).
    max_uses: Option<u32>,
}

impl TokenStore {
    fn mint(&mut self, opts: &Options) -> Tokens {
        let refresh_token = random_token(&format!("{}-rt-", opts.kind.name()));
        self.refresh.insert(refresh_token.clone());
        self.mint_access(opts, refresh_token)
    }

    /// A new access token, paired with `refresh_token` (already live).
    fn mint_access(&mut self, opts: &Options, refresh_token: String) -> Tokens {
        let access_token = random_token(&format!("{}-at-", opts.kind.name()));
        self.access.insert(
            access_token.clone(),
            AccessToken {
                expires_at: opts.access_lifetime.map(|d| Instant::now() + d),
                expired: false,
                uses: 0,
            },
        );
        Tokens {
            access_token,
            refresh_token,
            expires_in: opts.access_lifetime.map(|d| d.as_secs()),
        }
    }

    /// What `token`, presented on the API, is worth; a valid one's
    /// presentation counts against the use limit.
    pub(crate) fn present_access(&mut self, token: &str) -> AccessCheck {
        let max_uses = self.max_uses;
        let Some(t) = self.access.get_mut(token) else {
            return AccessCheck::Unknown;
        };
        if t.expired || t.expires_at.is_some_and(|at| Instant::now() >= at) {
            return AccessCheck::Expired;
        }
        if let Some(max) = max_uses {
            if t.uses >= max {
                t.expired = true;
                return AccessCheck::Expired;
            }
            t.uses += 1;
        }
        AccessCheck::Valid
    }

    fn set_max_uses(&mut self, n: u32) {
        self.max_uses = (n > 0).then_some(n);
        for t in self.access.values_mut() {
            t.uses = 0;
        }
    }

    /// Consumes a live refresh token (strict rotation) and mints a new pair;
    /// or, for the generic stand-in without rotation, mints an access token
    /// and keeps the refresh token live.
    pub(crate) fn redeem_refresh(&mut self, refresh_token: &str, opts: &Options) -> Option<Tokens> {
        if opts.kind == Kind::OAuth2 && !opts.oauth2.rotation {
            return self
                .refresh
                .contains(refresh_token)
                .then(|| self.mint_access(opts, refresh_token.to_owned()));
        }
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

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    ctx: Arc<Listener>,
    mut stop: watch::Receiver<bool>,
) {
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
        let ctx = ctx.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(route(shared, ctx, req).await) }
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

async fn route(shared: Arc<Shared>, ctx: Arc<Listener>, req: Request<Incoming>) -> Response<Body> {
    let kind = shared.opts.kind;
    let path = req.uri().path();
    if path == kind.token_path() {
        token::handle(shared, req).await
    } else if kind == Kind::Spark && path == apikey::SESSION_PATH {
        apikey::session(shared, req).await
    } else if let Some((page, flow, step)) = authorize::route(kind, path) {
        authorize::handle(shared, req, page, flow, step).await
    } else {
        api::handle(shared, &ctx, req).await
    }
}
