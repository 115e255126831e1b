//! The admin listener: health, readiness, metrics, and the session API.
//!
//! `/admin/*` answers 404 unless an admin token is configured, and then
//! needs `Authorization: Bearer TOKEN`, compared in constant time (over
//! SHA-256 digests, so not even the token's length leaks). The proxy
//! listener serves none of these routes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use secrecy::SecretString;
use serde::Deserialize;

use crate::config::Config;
use crate::control::connect::Connector;
use crate::control::pages;
use crate::control::token::AdminToken;
use crate::metrics::Metrics;
use crate::provider::spark::api_key::ApiKeyCredentials;
use crate::secrets::session::SessionKey;
use crate::tokens::refresh::{RefreshError, Refresher};
use crate::tokens::sessions::{NewTokens, ScopeAsked, SessionError, Sessions};

#[derive(Clone)]
pub struct AdminState {
    sessions: Arc<Sessions>,
    refresher: Arc<Refresher>,
    connector: Arc<Connector>,
    metrics: Arc<Metrics>,
    /// The admin token; none configured disables `/admin/*`.
    token: AdminToken,
    /// Where the proxy listens, for the curl line shown after connecting.
    proxy_addr: SocketAddr,
    /// The dashboard at `/ui` (`control/ui/`).
    dashboard: Arc<crate::control::ui::Dashboard>,
}

impl AdminState {
    pub fn new(
        config: &Config,
        refresher: Arc<Refresher>,
        metrics: Arc<Metrics>,
        proxy_addr: SocketAddr,
    ) -> AdminState {
        AdminState {
            dashboard: Arc::new(crate::control::ui::Dashboard::new(
                config,
                Arc::clone(&refresher),
            )),
            sessions: Arc::clone(refresher.sessions()),
            connector: Arc::new(Connector::new(config, Arc::clone(&refresher))),
            refresher,
            metrics,
            token: AdminToken::new(config.admin.token.as_ref()),
            proxy_addr,
        }
    }

    pub fn dashboard(&self) -> &crate::control::ui::Dashboard {
        &self.dashboard
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// The task that forgets expired connect states (and the rate
    /// limiter's quiet clients) on a timer, until `stop`.
    pub fn connect_pruning(
        &self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        Arc::clone(&self.connector).run_pruning(stop)
    }

    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    pub fn admin_enabled(&self) -> bool {
        self.token.enabled()
    }

    /// Whether the request carries `Authorization: Bearer ADMIN_TOKEN`.
    pub fn admin_authorised(&self, headers: &HeaderMap) -> bool {
        self.token.authorises(headers)
    }
}

impl axum::extract::FromRef<AdminState> for pages::PagesState {
    fn from_ref(state: &AdminState) -> pages::PagesState {
        pages::PagesState {
            sessions: Arc::clone(&state.sessions),
            connector: Arc::clone(&state.connector),
            token: state.token,
            proxy_addr: state.proxy_addr,
        }
    }
}

impl axum::extract::FromRef<AdminState> for crate::control::ui::UiState {
    fn from_ref(state: &AdminState) -> crate::control::ui::UiState {
        crate::control::ui::UiState {
            dashboard: Arc::clone(&state.dashboard),
            sessions: Arc::clone(&state.sessions),
            connector: Arc::clone(&state.connector),
        }
    }
}

/// The admin router as a hyper service for one connection from `peer`:
/// every request carries the peer's address (`ConnectInfo`), which
/// `/connect`'s rate limit counts by.
pub fn service(app: &Router, peer: SocketAddr) -> WithPeer {
    WithPeer {
        app: hyper_util::service::TowerToHyperService::new(app.clone()),
        peer,
    }
}

/// See [`service`].
pub struct WithPeer {
    app: hyper_util::service::TowerToHyperService<Router>,
    peer: SocketAddr,
}

type Incoming = hyper::Request<hyper::body::Incoming>;

impl hyper::service::Service<Incoming> for WithPeer {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = <hyper_util::service::TowerToHyperService<Router> as hyper::service::Service<
        Incoming,
    >>::Future;

    fn call(&self, mut req: Incoming) -> Self::Future {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        self.app.call(req)
    }
}

pub fn router(state: AdminState) -> Router {
    let admin = Router::new()
        .route("/admin/sessions", get(list_sessions).post(add_session))
        .route(
            "/admin/sessions/{id}",
            get(get_session).delete(delete_session),
        )
        .route(
            "/admin/sessions/{id}/refresh",
            axum::routing::post(refresh_session),
        )
        .route("/admin/sessions/{id}/keys", get(list_keys).post(add_key))
        .route(
            "/admin/sessions/{id}/keys/{key_id}",
            axum::routing::delete(delete_key),
        )
        .route("/admin/audit", get(list_audit))
        // Inside the token check: only authorised calls are audited (an
        // unauthenticated caller cannot grow the trail).
        .route_layer(middleware::from_fn_with_state(state.clone(), audit_call))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_admin_token,
        ));
    Router::new()
        .route("/", get(pages::index))
        .route("/static/style.css", get(pages::stylesheet))
        .route("/static/copy.js", get(pages::script))
        .route("/connect/{provider}", get(pages::connect))
        .route("/callback/{provider}", get(pages::callback))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(admin)
        .merge(crate::control::ui::router())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(state)
}

/// An admin API error, in the same JSON shape as the proxy's.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, Json(body)).into_response();
        resp.headers_mut().insert(
            crate::error::ERROR_HEADER,
            HeaderValue::from_static(self.code),
        );
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> ApiError {
        match e {
            SessionError::Store(e) => {
                tracing::warn!(error = %e, "admin: store error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the session store is unavailable",
                )
            }
            SessionError::UnknownProvider(_)
            | SessionError::KeyOfOtherProvider(_)
            | SessionError::SessionsFrom { .. }
            | SessionError::BadKey(_)
            | SessionError::EmptyToken
            | SessionError::StoredKey(_)
            | SessionError::WrongCredential { .. }
            | SessionError::Token(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
            }
            SessionError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            // The admin API looks sessions up without a budget; kept total.
            SessionError::ColdBudget { retry_after_secs } => ApiError {
                retry_after: Some(retry_after_secs),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_lookups",
                    e.to_string(),
                )
            },
            SessionError::Unseal(_) => {
                tracing::error!(error = %e, "admin: cannot open a sealed session");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "see the server log",
                )
            }
        }
    }
}

async fn require_admin_token(
    State(state): State<AdminState>,
    req: Request,
    next: Next,
) -> Response {
    if !state.admin_enabled() {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route").into_response();
    }
    match state.admin_authorised(req.headers()) {
        true => next.run(req).await,
        false => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer ADMIN_TOKEN",
        )
        .into_response(),
    }
}

/// Appends an `admin.call` row for each authorised admin API call: the
/// method, the path (never the query or a body), the status and the
/// caller's address. A row that cannot be written is logged; the call's
/// answer stands (what it did is done).
async fn audit_call(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let caller = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    let resp = next.run(req).await;
    let detail = serde_json::json!({
        "method": method,
        "path": path,
        "status": resp.status().as_u16(),
        "caller": caller,
    });
    if let Err(e) = state
        .sessions
        .record(
            crate::audit::kind::ADMIN_CALL,
            None,
            crate::audit::Actor::Admin,
            detail,
        )
        .await
    {
        tracing::warn!(error = %e, method = %method, path = %path, "cannot write the admin call to the audit trail");
    }
    resp
}

#[derive(Deserialize)]
struct AuditQuery {
    session: Option<String>,
    since: Option<String>,
    limit: Option<u32>,
}

/// `GET /admin/audit?session=ID&since=T&limit=N`: the newest matching rows
/// (default 100, at most 10,000), oldest first, as `credproxy audit --json`.
async fn list_audit(
    State(state): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<AuditQuery>,
) -> Result<Response, ApiError> {
    let since_ms = q
        .since
        .as_deref()
        .map(|t| crate::audit::parse_since(t, crate::store::now_ms()))
        .transpose()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e))?;
    let filter = crate::audit::AuditFilter {
        session_id: q.session.filter(|s| !s.is_empty()),
        since_ms,
        limit: q.limit.unwrap_or(100).clamp(1, crate::audit::MAX_LIST),
    };
    let rows = state
        .sessions
        .store()
        .list_audit(&filter)
        .await
        .map_err(SessionError::from)?;
    let views: Vec<_> = rows.iter().map(crate::audit::AuditRow::view).collect();
    Ok(Json(views).into_response())
}

async fn readyz(State(state): State<AdminState>) -> Response {
    // Bounded: a store held by a lock, or unreachable, is not ready.
    match crate::store::within(state.sessions.store().ping()).await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: store does not answer");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response()
        }
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let counts = match state.sessions.store().count_sessions().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot count sessions");
            Vec::new()
        }
    };
    let s = &state.sessions;
    state.metrics.note_cache(crate::metrics::CacheStats {
        key_reads: s.key_reads(),
        absent_hits: s.cache().absent_hits(),
        cold_refusals: s.cold().refusals(),
        absent_cached: s.cache().sizes().1,
    });
    let text = state
        .metrics
        .render(&counts, state.sessions.cache().cached());
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    (headers, text).into_response()
}

async fn list_sessions(State(state): State<AdminState>) -> Result<Response, ApiError> {
    Ok(Json(state.sessions.list().await?).into_response())
}

async fn get_session(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match state.sessions.info(&id).await? {
        Some(info) => Ok(Json(info).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such session",
        )),
    }
}

async fn delete_session(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if state.sessions.revoke(&id).await? {
        tracing::info!(session = %id, "session revoked via admin API");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such session",
        ))
    }
}

/// `POST /admin/sessions/{id}/keys`: a key's label and scope (see
/// `session key add`), every field optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddKey {
    label: Option<String>,
    methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    expires_in: Option<u64>,
    rate: Option<String>,
}

async fn list_keys(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match state.sessions.keys(&id).await? {
        Some(keys) => Ok(Json(keys).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such session",
        )),
    }
}

async fn add_key(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { &body };
    let req: AddKey = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "the body must be a JSON object {{label?, methods?, paths?, expires_in?, rate?}} ({:?} error at line {}, column {})",
                e.classify(),
                e.line(),
                e.column()
            ),
        )
    })?;
    let methods = req.methods.map(|m| m.join(","));
    let scope = ScopeAsked::from_parts(
        methods.as_deref(),
        req.paths,
        req.rate.as_deref(),
        req.expires_in,
    )
    .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
    let added = state
        .sessions
        .add_key(&id, req.label, scope, crate::audit::Actor::Admin)
        .await?;
    tracing::info!(session = %id, key_id = %added.key_id, "key added via admin API");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "key_id": added.key_id,
            "session_key": added.key.expose(),
        })),
    )
        .into_response())
}

async fn delete_key(
    State(state): State<AdminState>,
    Path((id, key_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    if state
        .sessions
        .revoke_key(&id, &key_id, crate::audit::Actor::Admin)
        .await?
    {
        tracing::info!(session = %id, key_id = %key_id, "key revoked via admin API");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such key",
        ))
    }
}

impl From<RefreshError> for ApiError {
    fn from(e: RefreshError) -> ApiError {
        match e {
            RefreshError::Reauthorization => ApiError::new(
                StatusCode::CONFLICT,
                "reauthorization_required",
                "the provider refused this session's refresh token; reconnect the account or replace its tokens",
            ),
            RefreshError::Failed { retry_after } => {
                let mut err = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "token_refresh_failed",
                    "the provider's token endpoint failed; the session is intact, retry later",
                );
                err.retry_after = Some(retry_after.as_secs_f64().ceil().max(1.0) as u64);
                err
            }
            RefreshError::NotRefreshable => {
                ApiError::new(StatusCode::CONFLICT, "not_refreshable", "this session has no refresh token")
            }
            RefreshError::Gone => ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such session"),
            RefreshError::TooSoon => ApiError::new(
                StatusCode::CONFLICT,
                "refreshed_recently",
                "this session was refreshed moments ago",
            ),
            RefreshError::Store(e) => SessionError::Store(e).into(),
            RefreshError::Session(e) => e.into(),
        }
    }
}

async fn refresh_session(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state
        .refresher
        .refresh_now(&id, crate::audit::Actor::Admin)
        .await?;
    tracing::info!(session = %id, "session refreshed via admin API");
    match state.sessions.info(&id).await? {
        Some(info) => Ok(Json(info).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such session",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddSession {
    provider: String,
    access_token: Option<SecretString>,
    /// Spark's API keys (`kind = "spark_api_key"`): the key, its secret
    /// and the optional `ApiUser`, instead of tokens.
    api_key: Option<String>,
    api_secret: Option<SecretString>,
    api_user: Option<String>,
    refresh_token: Option<SecretString>,
    expires_in: Option<u64>,
    label: Option<String>,
    session_key: Option<SecretString>,
}

async fn add_session(State(state): State<AdminState>, body: Bytes) -> Result<Response, ApiError> {
    // Parsed by hand so a rejection never echoes a value from the body
    // (serde's messages may quote it, and it may be a token).
    let req: AddSession = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "the body must be a JSON object {{provider, access_token or api_key and api_secret, refresh_token?, expires_in?, api_user?, label?, session_key?}} ({:?} error at line {}, column {})",
                e.classify(),
                e.line(),
                e.column()
            ),
        )
    })?;
    let key = req
        .session_key
        .map(SessionKey::chosen)
        .transpose()
        .map_err(SessionError::from)?;
    let tokens = match (req.access_token, req.api_key, req.api_secret) {
        (Some(access_token), None, None) if req.api_user.is_none() => NewTokens {
            access_token,
            refresh_token: req.refresh_token,
            expires_in: req.expires_in,
        },
        (None, Some(api_key), Some(api_secret))
            if req.refresh_token.is_none() && req.expires_in.is_none() =>
        {
            let (access_token, refresh_token) =
                ApiKeyCredentials::new_session(api_key, api_secret, req.api_user);
            NewTokens {
                access_token,
                refresh_token: Some(refresh_token),
                expires_in: Some(0),
            }
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "give either access_token (with refresh_token, expires_in) or api_key and api_secret (with api_user)",
            ))
        }
    };
    let added = state
        .sessions
        .add(
            &req.provider,
            tokens,
            req.label,
            key,
            crate::audit::Actor::Admin,
        )
        .await?;
    tracing::info!(session = %added.id, provider = %added.provider, replaced = added.replaced, "session added via admin API");
    let status = if added.replaced {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(serde_json::json!({
            "id": added.id,
            "session_key": added.key.expose(),
            "provider": added.provider,
        })),
    )
        .into_response())
}
