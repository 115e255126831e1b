//! The people-facing pages of the admin listener: the start page,
//! `/connect/{provider}` and `/callback/{provider}`.
//!
//! Server-rendered with askama (auto-escaping every value), one stylesheet,
//! and one small script that only adds a Copy button: everything works with
//! JavaScript off. Pages that show a session key are `no-store` and carry a
//! strict Content-Security-Policy.

use std::collections::HashMap;
use std::net::SocketAddr;

use askama::Template;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use secrecy::SecretString;

use std::sync::Arc;

use crate::config::ProviderConfig;
use crate::control::connect::Connector;
use crate::control::connect::{CallbackError, ConnectError, Connected};
use crate::control::token::AdminToken;
use crate::tokens::sessions::Sessions;

struct ProviderView {
    name: String,
    label: String,
    connectable: bool,
    /// The label of the provider whose sessions this one uses
    /// (`sessions_from`): it is connected through that one, never itself.
    sessions_from: Option<String>,
}

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage {
    providers: Vec<ProviderView>,
}

#[derive(Template)]
#[template(path = "connected.html")]
struct ConnectedPage {
    provider_label: String,
    session_id: String,
    key: Option<String>,
    curl: String,
    reconnected: bool,
}

#[derive(Template)]
#[template(path = "problem.html")]
struct ProblemPage {
    heading: String,
    message: String,
    retry: Option<String>,
}

/// An HTML answer with the headers every page carries.
fn page(status: StatusCode, body: Result<String, askama::Error>) -> Response {
    html(
        status,
        body,
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        "no-referrer",
    )
}

/// An HTML page of credproxy's (connect pages, dashboard): never stored,
/// never framed, not sniffed, with its own CSP and referrer policy.
pub(crate) fn html(
    status: StatusCode,
    body: Result<String, askama::Error>,
    csp: &'static str,
    referrer: &'static str,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "a page failed to render");
            return (StatusCode::INTERNAL_SERVER_ERROR, "page rendering failed").into_response();
        }
    };
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static(referrer));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(csp),
    );
    resp
}

fn problem(
    status: StatusCode,
    heading: &str,
    message: impl Into<String>,
    retry: Option<String>,
) -> Response {
    page(
        status,
        ProblemPage {
            heading: heading.to_owned(),
            message: sentence(&message.into()),
            retry,
        }
        .render(),
    )
}

/// `text` as a sentence: a capital first letter and a full stop. Error texts
/// are written lowercase to fit in the middle of a chain (`the sign-in did
/// not complete: the token endpoint answered 500`); a page shows them alone.
fn sentence(text: &str) -> String {
    let text = text.trim();
    let mut chars = text.chars();
    let mut out: String = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => return String::new(),
    };
    if !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}

pub async fn index(State(state): State<PagesState>) -> Response {
    let connector = state.connector();
    let providers = connector
        .providers()
        .map(|p| ProviderView {
            name: p.name.clone(),
            label: p.label.clone(),
            connectable: p.authorize_url.is_some() && p.sessions_from.is_none(),
            sessions_from: p.sessions_from.as_ref().map(|owner| {
                connector
                    .providers()
                    .find(|o| &o.name == owner)
                    .map_or_else(|| owner.clone(), |o| o.label.clone())
            }),
        })
        .collect();
    page(StatusCode::OK, IndexPage { providers }.render())
}

pub async fn stylesheet() -> Response {
    static_file(
        "text/css; charset=utf-8",
        include_str!("../../static/style.css"),
    )
}

pub async fn script() -> Response {
    static_file(
        "text/javascript; charset=utf-8",
        include_str!("../../static/copy.js"),
    )
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    resp
}

/// `GET /connect/{provider}`: a new session; `?session=ID` reconnects one
/// (admin token required); `?link=STATE` continues a `credproxy connect`.
///
/// Every request counts against its client address's rate limit; a new
/// session's flow (the one a browser opens, no link) also against the cap on
/// sign-ins in progress, and binds its state to the browser with a cookie.
pub async fn connect(
    State(state): State<PagesState>,
    Path(provider): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Response {
    let connector = state.connector();
    // The accept loop always sets the peer; without it, every such request
    // shares one budget rather than going unlimited.
    let ip = peer.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |p| p.0 .0.ip());
    if let Err(wait) = connector.admit(ip) {
        // debug: a flood of these must not flood the log too.
        tracing::debug!(client = %ip, "connect: over the rate limit");
        let mut resp = problem(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many attempts",
            "Too many sign-ins were started from this address. Wait a moment, then try again.",
            None,
        );
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs_f64().ceil().max(1.0) as u64),
        );
        return resp;
    }
    let cfg = match connector.provider(&provider) {
        Ok(cfg) => cfg,
        Err(ConnectError::SessionsFrom { owner, .. }) => {
            return problem(
                StatusCode::NOT_FOUND,
                "Connect the other provider",
                format!("This provider uses the sessions of {owner}: connect {owner} instead."),
                Some(format!("/connect/{owner}")),
            )
        }
        Err(_) => {
            return problem(
                StatusCode::NOT_FOUND,
                "Unknown provider",
                "No provider of that name is configured.",
                None,
            )
        }
    };
    if cfg.authorize_url.is_none() {
        return problem(
            StatusCode::NOT_FOUND,
            "Cannot connect",
            format!("This provider has no authorisation page configured (providers.{provider}.authorize_url)."),
            None,
        );
    }
    let mut binding = None;
    let started = if let Some(link) = query.get("link") {
        // The state was made by `credproxy connect`; check it and send the person on with it.
        match connector.check_link(&provider, link).await {
            Ok(()) => Ok(SecretString::from(link.clone())),
            Err(e) => Err(e),
        }
    } else if let Some(session) = query.get("session") {
        if !state.admin_enabled() {
            return problem(
                StatusCode::NOT_FOUND,
                "Not found",
                "Reconnecting needs the admin API, which is off.",
                None,
            );
        }
        if !state.admin_authorised(&headers) {
            return problem(
                StatusCode::UNAUTHORIZED,
                "Admin token required",
                "Reconnecting a session needs the admin token (Authorization: Bearer), or the one-time link printed by `credproxy connect PROVIDER --session ID`.",
                None,
            );
        }
        match state.sessions().info(session).await {
            Ok(Some(info)) if info.provider == provider => connector
                .begin(&provider, Some(session.clone()), None)
                .await
                .map(|s| s.state),
            Ok(_) => {
                return problem(
                    StatusCode::NOT_FOUND,
                    "Unknown session",
                    "No session of this provider has that id.",
                    None,
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "connect: store error");
                return problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Try again later",
                    "The session store is unavailable.",
                    None,
                );
            }
        }
    } else {
        match connector.begin_in_browser(&provider).await {
            Ok((s, cookie)) => {
                binding = Some(cookie);
                Ok(s.state)
            }
            Err(e) => Err(e),
        }
    };
    let state_value = match started {
        Ok(s) => s,
        Err(ConnectError::TooManyPending) => {
            tracing::warn!(provider = %provider, "connect: too many sign-ins in progress (server.connect_pending_limit)");
            let mut resp = problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Too many sign-ins in progress",
                "Too many sign-ins are in progress. Try again in a few minutes.",
                None,
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            return resp;
        }
        Err(ConnectError::BadLink) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Link expired",
                "This link is unknown, was already used, or is older than 10 minutes. Run `credproxy connect` again.",
                None,
            )
        }
        Err(e) => {
            tracing::warn!(provider = %provider, error = %e, "connect: cannot start");
            return problem(StatusCode::SERVICE_UNAVAILABLE, "Try again later", "The flow could not be started.", None);
        }
    };
    match connector.authorize_url(&provider, &state_value) {
        Ok(url) => {
            tracing::info!(provider = %provider, "connect: sending a person to the provider");
            let mut resp = Redirect::to(url.as_str()).into_response();
            *resp.status_mut() = StatusCode::FOUND;
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp.headers_mut().insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            if let Some(cookie) = binding.and_then(|b| HeaderValue::try_from(b.set_cookie()).ok()) {
                resp.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            resp
        }
        Err(e) => {
            tracing::warn!(provider = %provider, error = %e, "connect: no authorisation URL");
            problem(
                StatusCode::NOT_FOUND,
                "Cannot connect",
                "This provider has no authorisation page configured.",
                None,
            )
        }
    }
}

/// `GET /callback/{provider}`: the provider sends the person back here.
pub async fn callback(
    State(state): State<PagesState>,
    Path(provider): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut resp = callback_page(&state, &provider, &query, &headers).await;
    // The state's binding cookie has served its purpose (or the state is
    // gone): forget it, unless the state is still waiting for its browser.
    if resp.status() != StatusCode::BAD_REQUEST {
        if let Some(clear) = state
            .connector()
            .clear_binding(&query, &headers)
            .and_then(|c| HeaderValue::try_from(c).ok())
        {
            resp.headers_mut().append(header::SET_COOKIE, clear);
        }
    }
    resp
}

async fn callback_page(
    state: &PagesState,
    provider: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Response {
    let provider = provider.to_owned();
    let connector = state.connector();
    let label = match connector.provider(&provider) {
        Ok(cfg) => cfg.label.clone(),
        Err(_) => {
            return problem(
                StatusCode::NOT_FOUND,
                "Unknown provider",
                "No provider of that name is configured.",
                None,
            )
        }
    };
    let again = |plain: bool| plain.then(|| format!("/connect/{provider}"));
    match connector.complete(&provider, query, headers).await {
        Ok(connected) => {
            let (session_id, key, reconnected) = match connected {
                Connected::New { id, key } => (id, Some(key.expose().to_owned()), false),
                Connected::KeyWithCli { id } => (id, None, false),
                Connected::Reconnected { id } => (id, None, true),
            };
            tracing::info!(provider = %provider, session = %session_id, reconnected, "connect: session stored");
            let curl = key
                .as_deref()
                .map(|k| state.curl_line(&provider, k))
                .unwrap_or_default();
            page(
                StatusCode::OK,
                ConnectedPage {
                    provider_label: label,
                    session_id,
                    key,
                    curl,
                    reconnected,
                }
                .render(),
            )
        }
        Err((CallbackError::BadState, plain)) => problem(
            StatusCode::BAD_REQUEST,
            "This sign-in link is not valid",
            format!("{}. No code was exchanged.", CallbackError::BadState),
            again(plain),
        ),
        Err((CallbackError::Refused, plain)) => problem(
            StatusCode::FORBIDDEN,
            "Access was refused",
            format!("{label} reports that access was refused, so no session was stored."),
            again(plain),
        ),
        Err((
            e @ (CallbackError::NoCode | CallbackError::Rejected(_) | CallbackError::Exchange(_)),
            plain,
        )) => {
            tracing::warn!(provider = %provider, error = %e, "connect: code exchange failed");
            problem(
                StatusCode::BAD_GATEWAY,
                "The account could not be connected",
                format!("{e}. No session was stored."),
                again(plain),
            )
        }
        Err((e @ CallbackError::Store(_), plain)) => {
            tracing::error!(provider = %provider, error = %e, "connect: cannot store the session");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "The session could not be stored",
                "The session store did not answer, so no session was stored. Try again in a moment.",
                again(plain),
            )
        }
    }
}

/// The curl line shown after connecting, as a person would type it.
/// What the pages' handlers read: taken from the admin listener's state
/// (`FromRef`, in `admin.rs`), so that this file needs nothing above it.
#[derive(Clone)]
pub struct PagesState {
    pub sessions: Arc<Sessions>,
    pub connector: Arc<Connector>,
    /// The admin token (`/admin/*` and the dashboard are on with one).
    pub token: AdminToken,
    /// Where the proxy listens, for the curl line shown after connecting.
    pub proxy_addr: SocketAddr,
}

impl PagesState {
    fn connector(&self) -> &Connector {
        &self.connector
    }

    fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    fn admin_enabled(&self) -> bool {
        self.token.enabled()
    }

    fn admin_authorised(&self, headers: &HeaderMap) -> bool {
        self.token.authorises(headers)
    }

    fn curl_line(&self, provider: &str, key: &str) -> String {
        match self.connector.provider(provider) {
            Ok(p) => curl_line(self.proxy_addr, p, key),
            Err(_) => String::new(),
        }
    }
}

/// A curl command that calls the provider with `key` where a legacy
/// application would put its token.
pub fn curl_line(listen: SocketAddr, provider: &ProviderConfig, key: &str) -> String {
    let host = if listen.ip().is_unspecified() {
        format!("127.0.0.1:{}", listen.port())
    } else {
        listen.to_string()
    };
    let (header, path) = crate::provider::key_example(&provider.description, key);
    let name = &provider.name;
    match header {
        Some(h) => format!("curl -H '{h}' 'http://{host}/{name}{path}'"),
        None => format!("curl 'http://{host}/{name}{path}'"),
    }
}

#[cfg(test)]
mod tests {
    use super::sentence;

    #[test]
    fn messages_become_sentences() {
        assert_eq!(
            sentence("the token endpoint answered 500"),
            "The token endpoint answered 500."
        );
        assert_eq!(sentence("Already one."), "Already one.");
        assert_eq!(sentence("  écrit  "), "Écrit.");
        assert_eq!(sentence(""), "");
    }
}
