//! The dashboard at `/ui` on the admin listener: the sessions with their
//! health, and per session refresh now, reconnect and revoke.
//!
//! Behind the admin token, and 404 without one, like `/admin/*`. A person
//! signs in by typing the token into a form (rate-limited per client
//! address); the browser then keeps a cookie that proves the sign-in
//! without holding the token, and every state-changing form carries a CSRF
//! token tied to that sign-in (`auth.rs` has the design). A POST whose
//! `Origin` names another origin, or whose `Sec-Fetch-Site` is not
//! `same-origin`, is refused before anything else (403), and so is one
//! without the cookie or with a wrong CSRF token: nothing changes.
//!
//! The outcome of an action is shown after a redirect (POST-redirect-GET)
//! by a one-minute flash cookie, MACed and tied to the sign-in, so no other
//! page can forge a message; a reconnect's one-time link is shown only on
//! the page that made it. Pages are server-rendered with askama (every
//! value escaped), `no-store`, carry a CSP without any script, and work
//! without JavaScript. No token, key, cookie value or CSRF token is ever
//! shown or logged.

mod auth;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use rand::RngCore;
use secrecy::ExposeSecret;
use url::Url;

use crate::config::Config;
use crate::control::connect::Connector;
use crate::store::{self, SessionRecord};
use crate::tokens::refresh::{RefreshError, Refresher};
use crate::tokens::sessions::RevokedBy;
use crate::tokens::sessions::Sessions;
pub use auth::SIGN_IN_TTL_SECS;
use auth::{Keys, SignIn};

/// Sign-in attempts (right or wrong) a minute from one client address (an
/// IPv6 address counts by its /64), a burst of that many, then one every
/// 6 s: an online guess of the admin token gets nowhere.
pub const SIGN_INS_PER_MINUTE: u32 = 10;
/// How long a flash message waits to be shown.
const FLASH_TTL_SECS: i64 = 60;
/// Rows shown at most; filters narrow the rest.
const MAX_ROWS: usize = 500;
/// Form bodies are small: a CSRF token, a filter, an admin token.
const MAX_FORM_BYTES: usize = 8 * 1024;
/// Above this many clients in the sign-in limiter's map, a sign-in first
/// forgets the quiet ones.
const MAX_TRACKED_CLIENTS: usize = 100_000;
/// Signed-out sign-ins remembered at most (each until it would have expired).
const MAX_SIGNED_OUT: usize = 100_000;

const COOKIE: &str = "credproxy_ui";
const FLASH_COOKIE: &str = "credproxy_ui_flash";

/// The statuses a session can have, in the order the filter lists them.
const STATUSES: [&str; 3] = ["active", "refresh_failing", "reauthorization_required"];

/// The dashboard's keys and limits; `AdminState` holds one.
pub struct Dashboard {
    refresher: Arc<Refresher>,
    /// `None` when no admin token is configured: `/ui` answers 404.
    keys: Option<Keys>,
    /// Cookies are `Secure` when `public_url` is https.
    secure: bool,
    /// The base of reconnect links, and the origin a form may come from.
    public_url: Url,
    limiter: governor::DefaultKeyedRateLimiter<IpAddr>,
    /// Ids of sign-ins ended by "Sign out", with their expiry. Per process:
    /// another instance sharing the store accepts such a cookie until it
    /// expires (or the admin token changes).
    signed_out: Mutex<HashMap<[u8; 16], i64>>,
}

/// What an action did, shown once on the next page.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Flash {
    outcome: Outcome,
    /// The session it was about (an id, validated by [`plausible_id`]).
    session: String,
    /// Seconds, for `RefreshFailed` (the next retry).
    secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Refreshed,
    RefreshFailed,
    Reauthorization,
    NotRefreshable,
    RefreshedRecently,
    Revoked,
    Gone,
    StoreUnavailable,
    Internal,
}

impl Outcome {
    const ALL: [Outcome; 9] = [
        Outcome::Refreshed,
        Outcome::RefreshFailed,
        Outcome::Reauthorization,
        Outcome::NotRefreshable,
        Outcome::RefreshedRecently,
        Outcome::Revoked,
        Outcome::Gone,
        Outcome::StoreUnavailable,
        Outcome::Internal,
    ];

    fn code(self) -> &'static str {
        match self {
            Outcome::Refreshed => "refreshed",
            Outcome::RefreshFailed => "refresh_failed",
            Outcome::Reauthorization => "reauthorization_required",
            Outcome::NotRefreshable => "not_refreshable",
            Outcome::RefreshedRecently => "refreshed_recently",
            Outcome::Revoked => "revoked",
            Outcome::Gone => "gone",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::Internal => "internal",
        }
    }

    fn ok(self) -> bool {
        matches!(self, Outcome::Refreshed | Outcome::Revoked)
    }
}

impl Flash {
    fn encode(&self) -> String {
        format!("{}|{}|{}", self.outcome.code(), self.secs, self.session)
    }

    fn decode(payload: &str) -> Option<Flash> {
        let mut parts = payload.splitn(3, '|');
        let code = parts.next()?;
        let secs = parts.next()?.parse().ok()?;
        let session = parts.next()?;
        let outcome = Outcome::ALL.into_iter().find(|o| o.code() == code)?;
        plausible_id(session).then(|| Flash {
            outcome,
            session: session.to_owned(),
            secs,
        })
    }

    /// The sentence the page shows.
    fn message(&self) -> String {
        let id = &self.session;
        match self.outcome {
            Outcome::Refreshed => format!("Session {id} was refreshed: it has new tokens."),
            Outcome::RefreshFailed => format!(
                "The token endpoint failed to refresh session {id}; its tokens are intact. The next attempt is possible in {}.",
                duration_words(self.secs)
            ),
            Outcome::Reauthorization => format!(
                "The provider refused session {id}'s refresh token: reconnect the account."
            ),
            Outcome::NotRefreshable => format!("Session {id} has no refresh token to refresh with."),
            Outcome::RefreshedRecently => format!("Session {id} was refreshed moments ago."),
            Outcome::Revoked => format!("Session {id} was revoked: its key stops working now."),
            Outcome::Gone => format!("There is no session {id} (any more)."),
            Outcome::StoreUnavailable => {
                format!("The session store did not answer; nothing was done to session {id}. Try again.")
            }
            Outcome::Internal => {
                format!("Session {id} could not be read; see the server log.")
            }
        }
    }
}

/// Whether `id` looks like a session id (`s_` and hex, or anything short
/// and URL-safe): what a path or a flash may name.
fn plausible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Dashboard {
    pub fn new(config: &Config, refresher: Arc<Refresher>) -> Dashboard {
        let per_minute = NonZeroU32::new(SIGN_INS_PER_MINUTE).unwrap_or(NonZeroU32::MIN);
        Dashboard {
            refresher,
            keys: config
                .admin
                .token
                .as_ref()
                .map(|t| Keys::new(t.expose_secret())),
            secure: config.server.public_url.scheme() == "https",
            public_url: config.server.public_url.clone(),
            limiter: governor::RateLimiter::keyed(governor::Quota::per_minute(per_minute)),
            signed_out: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a sign-in attempt from `peer`: `Err` with how long until the
    /// next one is admitted when it is over the limit.
    fn admit(&self, peer: IpAddr) -> Result<(), Duration> {
        use governor::clock::Clock;
        if self.limiter.len() > MAX_TRACKED_CLIENTS {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&crate::control::connect::client_key(peer))
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    /// The valid sign-in the request's cookie proves, if any; also whether
    /// it carried a cookie at all (to say "expired" rather than nothing).
    fn sign_in(&self, keys: &Keys, headers: &HeaderMap) -> (Option<SignIn>, bool) {
        let Some(value) = cookie(headers, COOKIE) else {
            return (None, false);
        };
        let now = store::now();
        let found = keys
            .verify_cookie(value, now)
            .filter(|s| !self.is_signed_out(&s.id));
        (found, true)
    }

    fn is_signed_out(&self, id: &[u8; 16]) -> bool {
        match self.signed_out.lock() {
            Ok(set) => set.contains_key(id),
            // A poisoned lock: refuse rather than accept a signed-out cookie.
            Err(_) => true,
        }
    }

    fn sign_out(&self, s: &SignIn) {
        let now = store::now();
        if let Ok(mut set) = self.signed_out.lock() {
            if set.len() >= MAX_SIGNED_OUT {
                set.retain(|_, expires| *expires > now);
            }
            if set.len() < MAX_SIGNED_OUT {
                set.insert(s.id, s.expires);
            }
        }
    }

    fn cookie_line(&self, name: &str, value: &str, max_age: i64) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        format!("{name}={value}; Max-Age={max_age}; Path=/ui; HttpOnly; SameSite=Strict{secure}")
    }

    /// Whether a POST may come from where its headers say it comes from:
    /// no `Sec-Fetch-Site` but `same-origin`, no `Origin` but this one
    /// (`null`, what a page with `no-referrer` sends, is refused too). A
    /// client that sends neither (curl, an old browser) meets the CSRF check
    /// alone.
    fn same_origin(&self, headers: &HeaderMap) -> bool {
        if let Some(site) = headers.get("sec-fetch-site") {
            if site.as_bytes() != b"same-origin" {
                return false;
            }
        }
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        if origin.eq_ignore_ascii_case(&self.public_url.origin().ascii_serialization()) {
            return true;
        }
        // Reached by another name than public_url (a tunnel, localhost): the
        // origin must then be the host the request was sent to.
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        match (host, origin.split_once("://")) {
            (Some(host), Some((scheme, rest))) => {
                matches!(scheme, "http" | "https") && rest.eq_ignore_ascii_case(host)
            }
            _ => false,
        }
    }

    /// The one-time link that reconnects session `id` of `provider`, as
    /// `credproxy connect PROVIDER --session ID` prints it.
    fn reconnect_link(&self, provider: &str, state: &str) -> String {
        let mut url = self.public_url.clone();
        url.set_path(&format!("/connect/{provider}"));
        url.set_query(None);
        url.query_pairs_mut().append_pair("link", state);
        url.to_string()
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim())
}

/// A form body's fields (the first value of each).
fn form(body: &[u8]) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(body) {
        fields
            .entry(k.into_owned())
            .or_insert_with(|| v.into_owned());
    }
    fields
}

/// What the dashboard's handlers read: taken from the admin listener's
/// state (`FromRef`, in `admin.rs`), so that this module needs nothing above it.
#[derive(Clone)]
pub struct UiState {
    pub dashboard: Arc<Dashboard>,
    pub sessions: Arc<Sessions>,
    pub connector: Arc<Connector>,
}

impl UiState {
    fn dashboard(&self) -> &Dashboard {
        &self.dashboard
    }

    fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    fn connector(&self) -> &Connector {
        &self.connector
    }
}

/// The dashboard's routes, merged into the admin router.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    UiState: axum::extract::FromRef<S>,
{
    Router::new()
        .route("/ui", get(dashboard))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/sessions/{id}/refresh", post(refresh))
        .route("/ui/sessions/{id}/reconnect", post(reconnect))
        .route("/ui/sessions/{id}/revoke", get(confirm_revoke).post(revoke))
        .route("/ui/sessions/{id}/keys", get(keys_page))
        .route("/ui/sessions/{id}/keys/{key_id}/revoke", post(revoke_key))
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
}

// ---------------------------------------------------------------- responses

/// An HTML answer with the headers every dashboard page carries: never
/// stored, never framed, no script at all; the referrer as [`no_store`] says.
fn page(status: StatusCode, body: Result<String, askama::Error>) -> Response {
    crate::control::pages::html(
        status,
        body,
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        "same-origin",
    )
}

/// `no-store`, and a referrer only for our own origin: a form of ours then
/// carries a real `Origin` (with `no-referrer` browsers send `Origin: null`,
/// which [`Dashboard::same_origin`] refuses), and no other site learns a
/// dashboard URL.
fn no_store(h: &mut HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
}

/// 303 to `to` (a path of ours), setting `cookies`.
fn see_other(to: &str, cookies: &[String]) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::try_from(to) {
        h.insert(header::LOCATION, v);
    }
    no_store(h);
    for c in cookies {
        if let Ok(v) = HeaderValue::try_from(c.as_str()) {
            h.append(header::SET_COOKIE, v);
        }
    }
    resp
}

#[derive(Template)]
#[template(path = "ui_problem.html")]
struct ProblemPage<'a> {
    heading: &'a str,
    message: &'a str,
    /// Where to go on.
    next_href: &'a str,
    next_text: &'a str,
}

fn problem(status: StatusCode, heading: &str, message: &str, next: (&str, &str)) -> Response {
    page(
        status,
        ProblemPage {
            heading,
            message,
            next_href: next.0,
            next_text: next.1,
        }
        .render(),
    )
}

fn not_found() -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is nothing here.",
        ("/", "Back to the start page"),
    )
}

/// A refused POST: nothing was changed.
fn forbidden(why: &str) -> Response {
    problem(
        StatusCode::FORBIDDEN,
        "Refused",
        why,
        ("/ui", "Back to the dashboard"),
    )
}

// ------------------------------------------------------------------ sign-in

#[derive(Template)]
#[template(path = "ui_login.html")]
struct LoginPage {
    /// A problem with the last attempt, or a note (signed out, expired).
    error: Option<String>,
    note: Option<&'static str>,
}

fn login_form(status: StatusCode, error: Option<String>, note: Option<&'static str>) -> Response {
    page(status, LoginPage { error, note }.render())
}

/// `GET /ui/login`: the form (or the dashboard, when already signed in).
async fn login_page(
    State(state): State<UiState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let dash = state.dashboard();
    let Some(keys) = &dash.keys else {
        return not_found();
    };
    if let (Some(_), _) = dash.sign_in(keys, &headers) {
        return see_other("/ui", &[]);
    }
    let note = match query.get("why").map(String::as_str) {
        Some("signed_out") => Some("You are signed out."),
        Some("expired") => {
            Some("Your sign-in has expired (or the admin token changed): sign in again.")
        }
        _ => None,
    };
    login_form(StatusCode::OK, None, note)
}

/// `POST /ui/login`: checks the admin token, sets the sign-in cookie.
async fn login(
    State(state): State<UiState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let dash = state.dashboard();
    let Some(keys) = &dash.keys else {
        return not_found();
    };
    if !dash.same_origin(&headers) {
        return forbidden("This sign-in was not sent from credproxy's own page.");
    }
    // The accept loop always sets the peer; without it, every such request
    // shares one budget rather than going unlimited.
    let ip = peer.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |p| p.0 .0.ip());
    if let Err(wait) = dash.admit(ip) {
        tracing::debug!(client = %ip, "dashboard: sign-in over the rate limit");
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut resp = login_form(
            StatusCode::TOO_MANY_REQUESTS,
            Some(format!(
                "Too many sign-in attempts from this address. Wait {} and try again.",
                duration_words(secs)
            )),
            None,
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return resp;
    }
    let fields = form(&body);
    let typed = fields.get("token").map(String::as_str).unwrap_or("");
    if !keys.token_matches(typed) {
        tracing::info!(client = %ip, "dashboard: sign-in with a wrong admin token");
        return login_form(
            StatusCode::UNAUTHORIZED,
            Some("That is not the admin token.".to_owned()),
            None,
        );
    }
    let mut id = [0u8; 16];
    rand::rng().fill_bytes(&mut id);
    let sign_in = SignIn {
        id,
        expires: store::now() + SIGN_IN_TTL_SECS,
    };
    tracing::info!(client = %ip, "dashboard: signed in");
    see_other(
        "/ui",
        &[dash.cookie_line(COOKIE, &keys.cookie_value(&sign_in), SIGN_IN_TTL_SECS)],
    )
}

/// Why a state-changing POST was refused before it changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// No admin token is configured.
    Off,
    /// `Origin` or `Sec-Fetch-Site` names another site.
    CrossSite,
    /// No valid sign-in cookie.
    NotSignedIn,
    /// The form's CSRF token is missing or wrong.
    BadCsrf,
    /// The path names no plausible session.
    UnknownSession,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Off => not_found(),
            Refused::CrossSite => forbidden(
                "This form was not sent from credproxy's own page; nothing was changed.",
            ),
            Refused::NotSignedIn => problem(
                StatusCode::FORBIDDEN,
                "Sign in first",
                "You are not signed in (or your sign-in expired); nothing was changed.",
                ("/ui/login", "Sign in"),
            ),
            Refused::BadCsrf => forbidden(
                "This form's security token is missing or wrong (it may be from an older sign-in); nothing was changed. Reload the dashboard and try again.",
            ),
            Refused::UnknownSession => problem(
                StatusCode::NOT_FOUND,
                "Unknown session",
                "There is no session with that id.",
                ("/ui", "Back to the dashboard"),
            ),
        }
    }
}

/// The checks every state-changing POST passes first: the dashboard is on,
/// the request comes from our own page, carries a valid sign-in cookie and
/// that sign-in's CSRF token.
fn check_post<'a>(
    dash: &'a Dashboard,
    headers: &HeaderMap,
    fields: &HashMap<String, String>,
) -> Result<(&'a Keys, SignIn), Refused> {
    let Some(keys) = &dash.keys else {
        return Err(Refused::Off);
    };
    if !dash.same_origin(headers) {
        tracing::info!("dashboard: a form from another site was refused");
        return Err(Refused::CrossSite);
    }
    let (Some(sign_in), _) = dash.sign_in(keys, headers) else {
        return Err(Refused::NotSignedIn);
    };
    if !keys.csrf_matches(&sign_in, fields.get("csrf").map(String::as_str)) {
        tracing::info!("dashboard: a form without the right CSRF token was refused");
        return Err(Refused::BadCsrf);
    }
    Ok((keys, sign_in))
}

/// `POST /ui/logout`.
async fn logout(State(state): State<UiState>, headers: HeaderMap, body: Bytes) -> Response {
    let dash = state.dashboard();
    let fields = form(&body);
    let (_, sign_in) = match check_post(dash, &headers, &fields) {
        Ok(ok) => ok,
        Err(refused) => return refused.into_response(),
    };
    dash.sign_out(&sign_in);
    tracing::info!("dashboard: signed out");
    see_other(
        "/ui/login?why=signed_out",
        &[dash.cookie_line(COOKIE, "", 0)],
    )
}

// ---------------------------------------------------------------- the table

/// Which rows to show: `?provider=NAME&status=STATUS` (empty or absent: all).
#[derive(Debug, Default, Clone)]
struct Filter {
    provider: Option<String>,
    status: Option<&'static str>,
}

impl Filter {
    fn read(fields: &HashMap<String, String>) -> Filter {
        Filter {
            provider: fields
                .get("provider")
                .filter(|p| !p.is_empty() && plausible_id(p))
                .cloned(),
            status: fields
                .get("status")
                .and_then(|s| STATUSES.into_iter().find(|k| k == s)),
        }
    }

    fn matches(&self, rec: &SessionRecord) -> bool {
        self.provider.as_ref().is_none_or(|p| *p == rec.provider)
            && self.status.is_none_or(|s| s == rec.status.as_str())
    }

    /// `/ui` with these filters, to come back to after an action.
    fn back(&self) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(p) = &self.provider {
            q.append_pair("provider", p);
        }
        if let Some(s) = self.status {
            q.append_pair("status", s);
        }
        let q = q.finish();
        if q.is_empty() {
            "/ui".to_owned()
        } else {
            format!("/ui?{q}")
        }
    }
}

/// A time shown both ways: relative (`in 12 min`) and exact (RFC 3339).
struct When {
    text: String,
    iso: String,
    /// In the past.
    past: bool,
}

fn when(unix: i64, now: i64) -> When {
    let d = unix - now;
    let text = if (-5..=0).contains(&d) {
        "just now".to_owned()
    } else if d > 0 {
        format!("in {}", duration_words(d.unsigned_abs()))
    } else {
        format!("{} ago", duration_words(d.unsigned_abs()))
    };
    When {
        text,
        iso: rfc3339(unix),
        past: d < 0,
    }
}

/// A duration in a few words: `42 s`, `12 min`, `3 h 5 min`, `4 d`.
fn duration_words(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min", secs / 60),
        3600..=172_799 => match (secs % 3600) / 60 {
            0 => format!("{} h", secs / 3600),
            m => format!("{} h {m} min", secs / 3600),
        },
        _ => format!("{} d", secs / 86_400),
    }
}

fn rfc3339(unix: i64) -> String {
    // Clamped to what RFC 3339 can write (year 9999), so a stored value
    // never panics the page.
    let secs = unix.clamp(0, 253_402_300_799) as u64;
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

struct Row {
    id: String,
    provider: String,
    label: Option<String>,
    status: &'static str,
    status_text: &'static str,
    /// Why the status is what it is, when it is not `active`.
    reason: Option<&'static str>,
    /// The class of the last failed refresh (`last_error`).
    error_class: Option<String>,
    next_retry: Option<When>,
    expires: Option<When>,
    last_used: Option<When>,
    last_refresh: Option<When>,
    refreshable: bool,
    reconnectable: bool,
}

fn status_text(status: &str) -> &'static str {
    match status {
        "active" => "Active",
        "refresh_failing" => "Refresh failing",
        "reauthorization_required" => "Reconnect needed",
        _ => "Unknown",
    }
}

struct Choice {
    value: String,
    text: String,
    selected: bool,
}

struct FlashView {
    ok: bool,
    message: String,
}

struct Count {
    status: &'static str,
    text: &'static str,
    n: usize,
}

#[derive(Template)]
#[template(path = "ui_sessions.html")]
struct SessionsPage {
    csrf: String,
    flash: Option<FlashView>,
    providers: Vec<Choice>,
    statuses: Vec<Choice>,
    counts: Vec<Count>,
    total: usize,
    shown: usize,
    matching: usize,
    filtered: bool,
    rows: Vec<Row>,
    /// The current filters, for the forms to come back to.
    back_provider: String,
    back_status: String,
    /// `?provider=...&status=...` (or nothing), for the revoke links.
    back_query: String,
    error: Option<&'static str>,
}

/// `GET /ui`: the sessions, filtered by `?provider=` and `?status=`.
async fn dashboard(
    State(state): State<UiState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let dash = state.dashboard();
    let Some(keys) = &dash.keys else {
        return not_found();
    };
    let sign_in = match dash.sign_in(keys, &headers) {
        (Some(s), _) => s,
        (None, false) => return see_other("/ui/login", &[]),
        (None, true) => {
            return see_other("/ui/login?why=expired", &[dash.cookie_line(COOKIE, "", 0)])
        }
    };
    let filter = Filter::read(&query);
    let mut set_cookies = Vec::new();
    let flash = cookie(&headers, FLASH_COOKIE).map(|v| {
        set_cookies.push(dash.cookie_line(FLASH_COOKIE, "", 0));
        keys.verify_flash(&sign_in, v)
            .and_then(|p| Flash::decode(&p))
            .map(|f| FlashView {
                ok: f.outcome.ok(),
                message: f.message(),
            })
    });
    let flash = flash.flatten();

    let (records, error) = match state.sessions().store().list_sessions().await {
        Ok(r) => (r, None),
        Err(e) => {
            tracing::warn!(error = %e, "dashboard: cannot list sessions");
            (
                Vec::new(),
                Some("The session store did not answer, so no session can be shown. Reload in a moment."),
            )
        }
    };
    let now = store::now();
    let connector = state.connector();
    let configured: Vec<String> = connector
        .providers()
        .filter(|p| p.sessions_from.is_none())
        .map(|p| p.name.clone())
        .collect();
    let mut provider_names = configured.clone();
    for r in &records {
        if !provider_names.contains(&r.provider) {
            provider_names.push(r.provider.clone());
        }
    }
    let counts = STATUSES
        .into_iter()
        .map(|s| Count {
            status: s,
            text: status_text(s),
            n: records.iter().filter(|r| r.status.as_str() == s).count(),
        })
        .collect();
    let total = records.len();
    let mut matching: Vec<&SessionRecord> = records.iter().filter(|r| filter.matches(r)).collect();
    // What needs a person first, then by provider, newest first.
    let urgency = |r: &SessionRecord| match r.status.as_str() {
        "reauthorization_required" => 0,
        "refresh_failing" => 1,
        _ => 2,
    };
    matching.sort_by(|a, b| {
        (urgency(a), &a.provider, std::cmp::Reverse(a.created_at)).cmp(&(
            urgency(b),
            &b.provider,
            std::cmp::Reverse(b.created_at),
        ))
    });
    let reconnectable: HashSet<&str> = connector
        .providers()
        .filter(|p| p.sessions_from.is_none() && p.authorize_url.is_some())
        .map(|p| p.name.as_str())
        .collect();
    let matching_count = matching.len();
    let rows: Vec<Row> = matching
        .into_iter()
        .take(MAX_ROWS)
        .map(|r| {
            let last_use = state.sessions().uses().last(&r.id);
            row(
                r,
                now,
                last_use,
                reconnectable.contains(r.provider.as_str()),
            )
        })
        .collect();
    let body = SessionsPage {
        csrf: keys.csrf(&sign_in),
        flash,
        providers: provider_names
            .into_iter()
            .map(|p| Choice {
                selected: filter.provider.as_deref() == Some(p.as_str()),
                text: p.clone(),
                value: p,
            })
            .collect(),
        statuses: STATUSES
            .into_iter()
            .map(|s| Choice {
                value: s.to_owned(),
                text: status_text(s).to_owned(),
                selected: filter.status == Some(s),
            })
            .collect(),
        counts,
        total,
        shown: rows.len(),
        matching: matching_count,
        filtered: filter.provider.is_some() || filter.status.is_some(),
        rows,
        back_provider: filter.provider.clone().unwrap_or_default(),
        back_status: filter.status.unwrap_or_default().to_owned(),
        back_query: filter.back().trim_start_matches("/ui").to_owned(),
        error,
    }
    .render();
    let mut resp = page(StatusCode::OK, body);
    for c in set_cookies {
        if let Ok(v) = HeaderValue::try_from(c) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

/// A sentence for the class of a failed refresh (`last_error`): what the
/// store keeps is a fixed name, never the endpoint's answer.
fn error_text(class: &str) -> &'static str {
    match class {
        "token_endpoint_timeout" => "The token endpoint did not answer in time.",
        "token_endpoint_unreachable" => "The token endpoint could not be reached.",
        "token_endpoint_error" => "The token endpoint answered with a server error.",
        "token_endpoint_rate_limited" => "The token endpoint refused: too many requests.",
        "token_endpoint_client_error" => "The token endpoint refused the request.",
        "token_answer_too_large" => "The token endpoint's answer was too large.",
        "token_answer_unreadable" => "The token endpoint's answer broke off.",
        "token_answer_without_access_token" => {
            "The token endpoint answered without an access token."
        }
        "unusable_access_token" => {
            "The token endpoint answered an access token that cannot be sent."
        }
        "no_token_url" => "No token_url is configured for this provider.",
        "invalid_grant" => "The provider refused the refresh token: reconnect the account.",
        "invalid_client" => {
            "The provider refused the client credentials: check client_id and client_secret."
        }
        _ => "The last refresh failed.",
    }
}

fn row(r: &SessionRecord, now: i64, last_use: Option<i64>, reconnectable: bool) -> Row {
    let status = r.status.as_str();
    let (reason, error_class) = match (status, r.last_error.as_deref()) {
        ("active", _) => (None, None),
        (_, Some(class)) => (Some(error_text(class)), Some(class.to_owned())),
        ("reauthorization_required", None) => (Some(error_text("invalid_grant")), None),
        (_, None) => (Some(error_text("")), None),
    };
    Row {
        id: r.id.clone(),
        provider: r.provider.clone(),
        label: r.label.clone(),
        status,
        status_text: status_text(status),
        reason,
        error_class,
        next_retry: r
            .next_retry_at
            .filter(|_| status == "refresh_failing")
            .map(|t| when(t, now)),
        expires: r.expires_at.map(|t| when(t, now)),
        // The store's is written in batches: this process may know better.
        last_used: r.last_used_at.max(last_use).map(|t| when(t, now)),
        last_refresh: r.last_refresh_at.map(|t| when(t, now)),
        refreshable: r.refresh_token.is_some() && status != "reauthorization_required",
        reconnectable,
    }
}

// ------------------------------------------------------------------ actions

/// Reads an action's form and runs the checks; `Err` is the answer.
fn action<'a>(
    dash: &'a Dashboard,
    id: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(&'a Keys, SignIn, Filter), Refused> {
    let fields = form(body);
    let (keys, sign_in) = check_post(dash, headers, &fields)?;
    if !plausible_id(id) {
        return Err(Refused::UnknownSession);
    }
    Ok((keys, sign_in, Filter::read(&fields)))
}

/// Back to the table, with `flash` to show there.
fn done(
    dash: &Dashboard,
    keys: &Keys,
    sign_in: &SignIn,
    filter: &Filter,
    flash: Flash,
) -> Response {
    let value = keys.flash_value(sign_in, &flash.encode());
    see_other(
        &filter.back(),
        &[dash.cookie_line(FLASH_COOKIE, &value, FLASH_TTL_SECS)],
    )
}

/// `POST /ui/sessions/{id}/refresh`: the admin API's refresh now.
async fn refresh(
    State(state): State<UiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let dash = state.dashboard();
    let (keys, sign_in, filter) = match action(dash, &id, &headers, &body) {
        Ok(ok) => ok,
        Err(refused) => return refused.into_response(),
    };
    let mut secs = 0;
    let outcome = match dash
        .refresher
        .refresh_now(&id, crate::audit::Actor::Ui)
        .await
    {
        Ok(_) => {
            tracing::info!(session = %id, "session refreshed via the dashboard");
            Outcome::Refreshed
        }
        Err(e) => {
            tracing::info!(session = %id, error = %e, "dashboard: refresh did not succeed");
            match e {
                RefreshError::Failed { retry_after } => {
                    secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                    Outcome::RefreshFailed
                }
                RefreshError::Reauthorization => Outcome::Reauthorization,
                RefreshError::NotRefreshable => Outcome::NotRefreshable,
                RefreshError::TooSoon => Outcome::RefreshedRecently,
                RefreshError::Gone => Outcome::Gone,
                RefreshError::Store(_) => Outcome::StoreUnavailable,
                RefreshError::Session(_) => Outcome::Internal,
            }
        }
    };
    done(
        dash,
        keys,
        &sign_in,
        &filter,
        Flash {
            outcome,
            session: id,
            secs,
        },
    )
}

#[derive(Template)]
#[template(path = "ui_revoke.html")]
struct RevokePage {
    csrf: String,
    id: String,
    provider: String,
    label: Option<String>,
    status_text: &'static str,
    back: String,
    back_provider: String,
    back_status: String,
}

/// `GET /ui/sessions/{id}/revoke`: are you sure? (Changes nothing.)
async fn confirm_revoke(
    State(state): State<UiState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let dash = state.dashboard();
    let Some(keys) = &dash.keys else {
        return not_found();
    };
    let Some(sign_in) = dash.sign_in(keys, &headers).0 else {
        return see_other("/ui/login", &[]);
    };
    let filter = Filter::read(&query);
    let gone = || {
        problem(
            StatusCode::NOT_FOUND,
            "Unknown session",
            "There is no session with that id (any more).",
            ("/ui", "Back to the dashboard"),
        )
    };
    if !plausible_id(&id) {
        return gone();
    }
    let rec = match state.sessions().store().session_by_id(&id).await {
        Ok(Some(rec)) => rec,
        Ok(None) => return gone(),
        Err(e) => {
            tracing::warn!(error = %e, "dashboard: cannot read a session");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again later",
                "The session store did not answer.",
                ("/ui", "Back to the dashboard"),
            );
        }
    };
    page(
        StatusCode::OK,
        RevokePage {
            csrf: keys.csrf(&sign_in),
            id: rec.id,
            provider: rec.provider,
            label: rec.label,
            status_text: status_text(rec.status.as_str()),
            back: filter.back(),
            back_provider: filter.provider.clone().unwrap_or_default(),
            back_status: filter.status.unwrap_or_default().to_owned(),
        }
        .render(),
    )
}

/// `POST /ui/sessions/{id}/revoke`: deletes the session (its key stops
/// working at once), after the confirmation page.
async fn revoke(
    State(state): State<UiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let dash = state.dashboard();
    let (keys, sign_in, filter) = match action(dash, &id, &headers, &body) {
        Ok(ok) => ok,
        Err(refused) => return refused.into_response(),
    };
    let outcome = match state.sessions().revoke_by(&id, RevokedBy::Ui).await {
        Ok(true) => {
            tracing::info!(session = %id, "session revoked via the dashboard");
            Outcome::Revoked
        }
        Ok(false) => Outcome::Gone,
        Err(e) => {
            tracing::warn!(session = %id, error = %e, "dashboard: cannot revoke");
            Outcome::StoreUnavailable
        }
    };
    done(
        dash,
        keys,
        &sign_in,
        &filter,
        Flash {
            outcome,
            session: id,
            secs: 0,
        },
    )
}

/// A key as the keys page shows it: never the key.
struct KeyRow {
    key_id: String,
    label: Option<String>,
    scope: String,
    created_at: String,
    expires_at: Option<String>,
    last_used_at: Option<String>,
}

#[derive(Template)]
#[template(path = "ui_keys.html")]
struct KeysPage {
    csrf: String,
    id: String,
    keys: Vec<KeyRow>,
    /// The key just revoked (`?revoked=`), when it is gone from the list.
    revoked: Option<String>,
}

/// `GET /ui/sessions/{id}/keys`: the session's keys, each with its revoke
/// button. (Changes nothing.)
async fn keys_page(
    State(state): State<UiState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let dash = state.dashboard();
    let Some(keys) = &dash.keys else {
        return not_found();
    };
    let Some(sign_in) = dash.sign_in(keys, &headers).0 else {
        return see_other("/ui/login", &[]);
    };
    let gone = || {
        problem(
            StatusCode::NOT_FOUND,
            "Unknown session",
            "There is no session with that id (any more).",
            ("/ui", "Back to the dashboard"),
        )
    };
    if !plausible_id(&id) {
        return gone();
    }
    let list = match state.sessions().keys(&id).await {
        Ok(Some(list)) => list,
        Ok(None) => return gone(),
        Err(e) => {
            tracing::warn!(error = %e, "dashboard: cannot read a session's keys");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again later",
                "The session store did not answer.",
                ("/ui", "Back to the dashboard"),
            );
        }
    };
    let revoked = query
        .get("revoked")
        .filter(|k| plausible_id(k) && !list.iter().any(|i| &i.key_id == *k))
        .cloned();
    let rows = list
        .into_iter()
        .map(|k| KeyRow {
            scope: k.scope_text(),
            key_id: k.key_id,
            label: k.label,
            created_at: k.created_at,
            expires_at: k.expires_at,
            last_used_at: k.last_used_at,
        })
        .collect();
    page(
        StatusCode::OK,
        KeysPage {
            csrf: keys.csrf(&sign_in),
            id,
            keys: rows,
            revoked,
        }
        .render(),
    )
}

/// `POST /ui/sessions/{id}/keys/{key_id}/revoke`: revokes one key (it
/// stops working at once here, within 2 seconds elsewhere), then back to
/// the keys page saying so.
async fn revoke_key(
    State(state): State<UiState>,
    Path((id, key_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let dash = state.dashboard();
    if let Err(refused) = action(dash, &id, &headers, &body) {
        return refused.into_response();
    }
    if !plausible_id(&key_id) {
        return not_found();
    }
    match state
        .sessions()
        .revoke_key(&id, &key_id, crate::audit::Actor::Ui)
        .await
    {
        Ok(true) => {
            tracing::info!(session = %id, key_id = %key_id, "key revoked via the dashboard");
            see_other(&format!("/ui/sessions/{id}/keys?revoked={key_id}"), &[])
        }
        Ok(false) => problem(
            StatusCode::NOT_FOUND,
            "Unknown key",
            "That session has no such key (any more).",
            ("/ui", "Back to the dashboard"),
        ),
        Err(e) => {
            tracing::warn!(session = %id, error = %e, "dashboard: cannot revoke a key");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again later",
                "The session store did not answer; nothing was changed.",
                ("/ui", "Back to the dashboard"),
            )
        }
    }
}

#[derive(Template)]
#[template(path = "ui_reconnect.html")]
struct ReconnectPage {
    id: String,
    provider_label: String,
    link: String,
    back: String,
}

/// `POST /ui/sessions/{id}/reconnect`: a one-time link (valid 10 minutes)
/// that signs the account in again and gives the session new tokens,
/// keeping its key; shown on the page that answers, nowhere else.
async fn reconnect(
    State(state): State<UiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let dash = state.dashboard();
    let (_, _, filter) = match action(dash, &id, &headers, &body) {
        Ok(ok) => ok,
        Err(refused) => return refused.into_response(),
    };
    let back = ("/ui", "Back to the dashboard");
    let rec = match state.sessions().store().session_by_id(&id).await {
        Ok(Some(rec)) => rec,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                "Unknown session",
                "There is no session with that id (any more).",
                back,
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "dashboard: cannot read a session");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again later",
                "The session store did not answer.",
                back,
            );
        }
    };
    let connector = state.connector();
    let provider_label = match connector.provider(&rec.provider) {
        Ok(p) if p.authorize_url.is_some() => p.label.clone(),
        _ => {
            return problem(
                StatusCode::CONFLICT,
                "Cannot reconnect",
                "This session's provider has no authorisation page configured (providers.NAME.authorize_url).",
                back,
            )
        }
    };
    let state_value = match connector
        .begin(&rec.provider, Some(rec.id.clone()), None)
        .await
    {
        Ok(s) => s.state,
        Err(e) => {
            tracing::warn!(session = %id, error = %e, "dashboard: cannot start a reconnect");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again later",
                "The reconnect link could not be made.",
                back,
            );
        }
    };
    tracing::info!(session = %id, provider = %rec.provider, "dashboard: reconnect link made");
    page(
        StatusCode::OK,
        ReconnectPage {
            link: dash.reconnect_link(&rec.provider, state_value.expose_secret()),
            id: rec.id,
            provider_label,
            back: filter.back(),
        }
        .render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flashes_say_what_happened() {
        let f = Flash {
            outcome: Outcome::RefreshFailed,
            session: "s_0123456789abcdef".to_owned(),
            secs: 3,
        };
        assert_eq!(Flash::decode(&f.encode()), Some(f.clone()));
        assert!(f.message().contains("3 s"), "{}", f.message());
        for o in Outcome::ALL {
            let f = Flash {
                outcome: o,
                session: "s_1".to_owned(),
                secs: 0,
            };
            assert_eq!(Flash::decode(&f.encode()), Some(f));
        }
        assert_eq!(Flash::decode("revoked|0|<b>"), None);
        assert_eq!(Flash::decode("nonsense|0|s_1"), None);
    }

    #[test]
    fn durations_read_as_words() {
        assert_eq!(duration_words(42), "42 s");
        assert_eq!(duration_words(720), "12 min");
        assert_eq!(duration_words(3600), "1 h");
        assert_eq!(duration_words(3 * 3600 + 5 * 60), "3 h 5 min");
        assert_eq!(duration_words(4 * 86_400), "4 d");
        assert_eq!(when(100, 100).text, "just now");
        assert_eq!(when(160, 100).text, "in 1 min");
        assert_eq!(when(102, 100).text, "in 2 s");
        assert_eq!(when(97, 100).text, "just now");
        assert_eq!(when(40, 100).text, "1 min ago");
        assert!(when(40, 100).past);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn filters_keep_only_known_statuses_and_plain_names() {
        let q = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        let f = Filter::read(&q(&[("provider", "spark"), ("status", "refresh_failing")]));
        assert_eq!(f.back(), "/ui?provider=spark&status=refresh_failing");
        let f = Filter::read(&q(&[("provider", "<x>"), ("status", "nope")]));
        assert!(f.provider.is_none() && f.status.is_none());
        assert_eq!(f.back(), "/ui");
    }
}
