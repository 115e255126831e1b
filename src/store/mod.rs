//! The persistent store of sessions, behind the [`Store`] trait.
//!
//! The store sees only sealed token bytes and key hashes: sealing and hashing
//! happen above it (`sessions.rs`), so every implementation gets them the same
//! way. Each change to a session also appends to a change log in the same
//! transaction, which other processes sharing the store poll to keep their
//! caches coherent.
//!
//! **Invariant:** a token change is committed durably (SQLite:
//! `synchronous=FULL`) before the call returns.
//!
//! **Invariant (outbox):** an event about a session (`events`) is written
//! in the same transaction as the change it describes, and only when that
//! transaction made the change: the methods that change a session take the
//! event (`Option<&NewEvent>`, `None` without `[notify]`) and decide inside
//! the transaction whether the change happened (a transition of the
//! status, a row inserted, replaced or deleted). A crash therefore loses
//! no event and invents none. `last_used_at` is not a change: it is written
//! in batches ([`SessionStore::note_uses`]) without a version bump, a change-log
//! entry or an event.
//!
//! **Invariant (audit):** the audit row of a change (`audit:
//! Option<&AuditAppend>`) is appended in the same transaction as the
//! change, only when the change happened, after every other write of the
//! transaction and under the chain's lock (SQLite: the write transaction
//! itself; PostgreSQL: `pg_advisory_xact_lock`), so rows are chained in
//! commit order with no gap (see `crate::audit`).

use crate::secrets::session::{KeyHash, Status};

mod audit_log;
mod budgets;
mod changes;
mod keys;
mod oauth;
mod outbox;
pub mod postgres;
mod sessions;
mod shared;
mod sql;
pub mod sqlite;

pub use audit_log::AuditLog;
pub use budgets::Budgets;
pub use changes::ChangeFeed;
pub use keys::SessionKeys;
pub use oauth::OAuthStates;
pub use outbox::Outbox;
pub use sessions::SessionStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Database(#[from] sqlx::Error),
    #[error("store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store: a session with this key already exists")]
    DuplicateKey,
    #[error("store: unsupported url (expected sqlite:... or postgres://...)")]
    UnsupportedUrl,
    #[error("store: the store is shutting down")]
    Closed,
    #[error("store: corrupt row for session {0}")]
    Corrupt(String),
    /// The store could not be opened; the text has had the URL's
    /// credentials taken out (see `scrub`).
    #[error("store: {0}")]
    Open(String),
    /// The URL is malformed; says what is wrong without quoting it.
    #[error("{0}")]
    BadUrl(String),
    /// The SQLite file was deleted or replaced while it was open: what is
    /// written now would be lost, so nothing is.
    #[error("store: the SQLite file {path} was deleted or replaced while credproxy had it open; nothing more is written to it (restore the file and restart credproxy)")]
    FileReplaced { path: String },
    /// The store did not answer within [`HOT_TIMEOUT`] (a lock held, a
    /// stalled network, a database that is not there).
    #[error("store: no answer within {} ms", HOT_TIMEOUT.as_millis())]
    Timeout,
}

/// The longest the request path (a cold session lookup, a budget lease,
/// `/readyz`) waits for the store, connecting included. Far above a
/// healthy round trip, far below what a caller would wait: a store that
/// does not answer in time is unavailable for that request (503
/// `store_unavailable`, the limiter's local fallback, not ready).
pub const HOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `call`, bounded by [`HOT_TIMEOUT`]: the store calls of the request path.
/// A dropped call's statement, if it got that far, is ended by the
/// database's own `statement_timeout` (PostgreSQL, see `postgres.rs`).
/// A call slower than [`SLOW_CALL`] is written into the request's trace as
/// a span, named by where it was made.
#[track_caller]
pub fn within<T>(
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> impl std::future::Future<Output = Result<T, StoreError>> {
    let site = std::panic::Location::caller();
    async move {
        let traced = crate::telemetry::traces_on();
        let began = traced.then(|| (std::time::SystemTime::now(), std::time::Instant::now()));
        let result = tokio::time::timeout(HOT_TIMEOUT, call)
            .await
            .unwrap_or(Err(StoreError::Timeout));
        if let Some((at, start)) = began {
            let took = start.elapsed();
            if took >= SLOW_CALL {
                crate::telemetry::trace::after_the_fact("store call", at, took, site);
            }
        }
        result
    }
}

/// A store call of the request path slower than this gets a span.
pub const SLOW_CALL: std::time::Duration = std::time::Duration::from_millis(20);

/// A session row as stored: tokens still sealed.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    pub id: String,
    pub key_hash: KeyHash,
    pub provider: String,
    pub label: Option<String>,
    pub status: Status,
    pub access_token: Vec<u8>,
    pub refresh_token: Option<Vec<u8>>,
    /// Unix seconds; `None` when the provider gave no lifetime.
    pub expires_at: Option<i64>,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_refresh_at: Option<i64>,
    /// The class of the last failed refresh (`token_endpoint_timeout`, ...;
    /// `invalid_grant` for a session that needs reauthorization); cleared by
    /// a successful refresh. Never a token or an endpoint's answer.
    pub last_error: Option<String>,
    /// While `refresh_failing`: when the refresh is retried (unix seconds).
    pub next_retry_at: Option<i64>,
    /// When a request last used the session (unix seconds), as written by
    /// the batched [`SessionStore::note_uses`]: up to one flush interval behind.
    pub last_used_at: Option<i64>,
}

/// A session key as stored: its hash, never the key, and its scope as the
/// control plane wrote it (`tokens::sessions::scope` reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: String,
    pub session_id: String,
    pub key_hash: KeyHash,
    pub label: Option<String>,
    /// `None`: any method; else methods separated by commas (`GET,HEAD`).
    pub methods: Option<String>,
    /// `None`: any path; else a JSON array of patterns.
    pub paths: Option<String>,
    /// The key's own budget: `requests` per `per_ms` milliseconds.
    pub rate: Option<KeyRate>,
    /// Unix seconds; `None` when it never expires.
    pub expires_at: Option<i64>,
    pub created_at: i64,
    /// When a request last used the key (unix seconds), written in batches.
    pub last_used_at: Option<i64>,
}

/// A key's own budget, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRate {
    pub requests: i64,
    pub per_ms: i64,
}

/// What an event is about; `as_str` is its `type` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A session was stored by a connect flow or `session add` (new, or its
    /// tokens replaced: `detail.reconnected`).
    Connected,
    /// A refresh failed transiently while the session was `active`.
    RefreshFailing,
    /// A refresh succeeded while the session was `refresh_failing`.
    Recovered,
    /// The token endpoint refused the refresh token.
    ReauthorizationRequired,
    /// The session was deleted (`detail.by`: `cli`, `admin` or `ui`).
    Revoked,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connected => "session.connected",
            EventKind::RefreshFailing => "session.refresh_failing",
            EventKind::Recovered => "session.recovered",
            EventKind::ReauthorizationRequired => "session.reauthorization_required",
            EventKind::Revoked => "session.revoked",
        }
    }
}

/// An event to append to the outbox with a change (see the outbox
/// invariant above). `detail` never holds a token, key or secret.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// `evt_` and 64 random bits in hex.
    pub id: String,
    pub kind: EventKind,
    pub session_id: String,
    pub provider: String,
    /// When the change happened (unix seconds).
    pub at: i64,
    pub detail: serde_json::Value,
}

impl NewEvent {
    /// An event with a new id.
    pub fn new(
        kind: EventKind,
        session_id: &str,
        provider: &str,
        at: i64,
        detail: serde_json::Value,
    ) -> NewEvent {
        NewEvent {
            id: crate::secrets::session::new_event_id(),
            kind,
            session_id: session_id.to_owned(),
            provider: provider.to_owned(),
            at,
            detail,
        }
    }
}

/// An event as the outbox holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub id: String,
    /// [`EventKind::as_str`].
    pub kind: String,
    pub session_id: String,
    pub provider: String,
    /// Unix seconds.
    pub at: i64,
    /// JSON text.
    pub detail: String,
    /// Failed delivery attempts so far.
    pub attempts: i64,
    /// Not tried again before this (unix milliseconds).
    pub next_attempt_at_ms: i64,
    /// The class of the last failed attempt (no secret).
    pub last_error: Option<String>,
    pub delivered_at: Option<i64>,
    pub gave_up_at: Option<i64>,
}

/// What a commit of refreshed tokens does to the session's health.
#[derive(Debug, Clone, Copy)]
pub enum Health<'a> {
    /// The endpoint answered usable tokens: the session becomes `active`
    /// and its error is cleared; `recovered` is appended to the outbox if
    /// it was `refresh_failing`.
    Healthy { recovered: Option<&'a NewEvent> },
    /// Stored as they are, health unchanged: the rotated refresh token of
    /// an answer whose access token cannot be sent.
    Unchanged,
}

/// A transient refresh failure, as [`SessionStore::mark_refresh_failing`] records it.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// The error class (`token_endpoint_timeout`, ...): a short fixed string.
    pub class: &'a str,
    /// When the refresh is retried (unix seconds).
    pub next_retry_at: i64,
    /// Appended to the outbox if the session was `active` (a transition).
    pub event: Option<&'a NewEvent>,
}

/// A candidate of idle refresh (see [`SessionStore::idle_sessions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleSession {
    pub id: String,
    pub version: i64,
    /// The latest of its last use, last refresh and creation (unix seconds).
    pub idle_since: i64,
}

/// Where a walk through idle sessions goes on from: after this
/// `(idle_since, id)`.
pub type IdleCursor = (i64, String);

/// Sealed tokens and their lifetime, as written by an insert or a replace.
#[derive(Debug, Clone)]
pub struct SealedTokens {
    pub access_token: Vec<u8>,
    pub refresh_token: Option<Vec<u8>>,
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct NewSession {
    pub id: String,
    pub provider: String,
    pub label: Option<String>,
    pub key_hash: KeyHash,
    pub tokens: SealedTokens,
    pub now: i64,
}

/// What [`ChangeFeed::changes`] read from the change log.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// The newest position read (the cursor of the next call).
    pub cursor: i64,
    /// Sessions changed (inserted, replaced, refreshed, deleted...).
    pub ids: Vec<String>,
    /// Key hashes of the sessions inserted.
    pub added_keys: Vec<KeyHash>,
    /// The page was full ([`CHANGES_PAGE`] rows): more may follow at once.
    pub more: bool,
}

/// Change-log rows one [`ChangeFeed::changes`] reads at most.
pub const CHANGES_PAGE: usize = 10_000;

/// The answer to a request for a session's refresh lease.
// One per refresh attempt, moved once: not worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Lease {
    /// The caller now holds the lease; the row as it is under the lease.
    Acquired(SessionRecord),
    /// Another owner holds it until `until_ms`; `version` is the row's now.
    Held { until_ms: i64, version: i64 },
    /// No such session.
    Gone,
}

/// What an instance asks for when it leases a share of a provider's request
/// budget (see [`Budgets::lease_budget`]).
#[derive(Debug, Clone)]
pub struct BudgetAsk<'a> {
    /// The provider whose budget this is (its table name).
    pub provider: &'a str,
    /// Who asks: this process's instance id (for operators reading the table).
    pub instance: &'a str,
    /// The budget: at most `requests` in any window of `window_ms`
    /// (the configured `per`, safety margin included).
    pub requests: u32,
    pub window_ms: i64,
    /// How long the share may be spent: requests sent from it leave the
    /// instance before the lease ends.
    pub lease_ms: i64,
    /// How many requests the instance would like to send under this lease.
    pub want: u32,
}

/// A share of a provider's budget, granted to one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetLease {
    /// Identifies the lease for [`Budgets::settle_budget`]; 0 when nothing was granted.
    pub id: i64,
    /// Requests the instance may send until the lease ends (0: none now).
    pub granted: u32,
    /// When nothing was granted: milliseconds until some budget frees.
    pub retry_in_ms: i64,
    /// The budget left for other leases after this one, for the metrics.
    pub remaining: u32,
}

/// A pending OAuth authorisation, keyed by the hash of its one-time state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthState {
    pub provider: String,
    /// Reconnect: the session whose tokens the callback replaces.
    pub session_id: Option<String>,
    /// The key `credproxy connect` chose for the new session (only its hash).
    pub key_hash: Option<KeyHash>,
    pub created_at: i64,
}

/// How a connect flow ended, as `credproxy connect` learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OAuthOutcome {
    Pending,
    Stored {
        session_id: String,
    },
    Failed {
        reason: String,
    },
    /// Unknown state (never created, or pruned).
    Unknown,
}

impl OAuthOutcome {
    /// The outcome as the `result_session_id` and `failure` columns hold it.
    fn columns(&self) -> (Option<&str>, Option<&str>) {
        match self {
            OAuthOutcome::Stored { session_id } => (Some(session_id), None),
            OAuthOutcome::Failed { reason } => (None, Some(reason)),
            OAuthOutcome::Pending | OAuthOutcome::Unknown => (None, None),
        }
    }

    fn from_columns(session: Option<String>, failure: Option<String>) -> OAuthOutcome {
        match (session, failure) {
            (Some(session_id), _) => OAuthOutcome::Stored { session_id },
            (None, Some(reason)) => OAuthOutcome::Failed { reason },
            (None, None) => OAuthOutcome::Pending,
        }
    }
}

/// Stored sealed values counted by the key id in their header, for `key
/// list`: `key_id` is 8 lowercase hex digits, or `None` for values sealed
/// before key ids existed (no header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedCount {
    pub key_id: Option<String>,
    pub count: i64,
}

/// A session's sealed values, as `key rewrap` reads them.
#[derive(Clone)]
pub struct SealedRow {
    pub id: String,
    pub access_token: Vec<u8>,
    pub refresh_token: Option<Vec<u8>>,
}

/// A row's values re-sealed under the primary key, with the values they
/// replace (the compare-and-swap's expectation).
#[derive(Clone)]
pub struct Resealed {
    pub id: String,
    pub old_access: Vec<u8>,
    pub old_refresh: Option<Vec<u8>>,
    pub access_token: Vec<u8>,
    pub refresh_token: Option<Vec<u8>>,
}

impl std::fmt::Debug for SealedRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealedRow({}, [sealed])", self.id)
    }
}

impl std::fmt::Debug for Resealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Resealed({}, [sealed])", self.id)
    }
}

/// Sessions counted by provider and status, for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCount {
    pub provider: String,
    pub status: Status,
    pub count: i64,
}

/// The store as the rest of the code holds it (`Arc<dyn Store>`): every
/// role at once. A caller names the role it uses (`SessionStore`,
/// `SessionKeys`, `OAuthStates`, `Outbox`, `AuditLog`, `ChangeFeed`, `Budgets`); each role
/// is implemented once for both databases (`shared.rs`), but for the
/// budgets, which only PostgreSQL shares.
pub trait Store:
    SessionStore
    + SessionKeys
    + OAuthStates
    + Outbox
    + AuditLog
    + ChangeFeed
    + Budgets
    + Send
    + Sync
    + 'static
{
}

impl<T> Store for T where
    T: SessionStore
        + SessionKeys
        + OAuthStates
        + Outbox
        + AuditLog
        + ChangeFeed
        + Budgets
        + Send
        + Sync
        + 'static
{
}

/// Opens the store named by `url`, applying migrations.
pub async fn open(url: &str) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(sqlite::SqliteStore::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(postgres::PgStore::open(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl)
    }
}

/// The store URL as it may be shown: for PostgreSQL only host, port and
/// database (`postgres://db:5432/credproxy`), never the user, the password
/// or the query; for SQLite the file, without the query. A PostgreSQL URL
/// that does not parse cleanly (a password with an unescaped `/`, `?`, `#`
/// or `@` spills into the host, port or path) is not shown at all.
pub fn describe_url(url: &str) -> String {
    if url.starts_with("sqlite:") {
        return url.split(['?', '#']).next().unwrap_or(url).to_owned();
    }
    match PgUrl::parse(url, false) {
        Ok(pg) => format!("postgres://{}:{}/{}", pg.host, pg.port, pg.database),
        Err(_) if is_postgres(url) => "postgres://(not shown: the URL does not parse)".to_owned(),
        Err(_) => "(an unsupported store URL, not shown)".to_owned(),
    }
}

impl crate::config::StoreConfig {
    /// The store URL for messages: PostgreSQL's host, port and database
    /// only, never its user, password or query (see [`describe_url`]).
    pub fn shown_url(&self) -> String {
        use secrecy::ExposeSecret;
        describe_url(self.url.expose_secret())
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The parts of a PostgreSQL URL that may be shown.
struct PgUrl {
    host: String,
    port: String,
    database: String,
}

/// What a PostgreSQL URL may be told to hold in its query (sqlx's list);
/// anything else is refused, because sqlx logs an unknown parameter's value.
const PG_PARAMS: [&str; 17] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
];

impl PgUrl {
    /// Parses a `postgres://` URL; with `strict`, also checks its
    /// parameters. The error says what is wrong without quoting any of it.
    fn parse(url: &str, strict: bool) -> Result<PgUrl, String> {
        const MALFORMED: &str = "the URL does not parse as postgres://USER:PASSWORD@HOST:PORT/DATABASE: percent-encode `/ ? # @ : %` in the user name and password";
        if !is_postgres(url) {
            return Err("expected sqlite:... or postgres://...".into());
        }
        let parsed = url::Url::parse(url).map_err(|_| MALFORMED.to_owned())?;
        let path = parsed.path().strip_prefix('/').unwrap_or(parsed.path());
        // `postgres://u:pa/ss@h/db` parses as host `u`, port `pa`... or,
        // with a numeric password start, as a path holding `@`.
        if path.contains(['/', '@']) || parsed.fragment().is_some() {
            return Err(MALFORMED.to_owned());
        }
        let mut host = parsed.host_str().unwrap_or_default().to_owned();
        let mut port = parsed.port().map(|p| p.to_string());
        let mut database = path.to_owned();
        for (key, value) in parsed.query_pairs() {
            let known = PG_PARAMS.contains(&key.as_ref())
                || key == "options"
                || (key.starts_with("options[") && key.ends_with(']'));
            if strict && !known {
                let shown = if key.len() <= 40
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_[]".contains(&b))
                {
                    format!("`{key}`")
                } else {
                    "(not shown)".to_owned()
                };
                return Err(format!(
                    "the URL has an unknown parameter {shown} (known: {})",
                    PG_PARAMS.join(", ")
                ));
            }
            match key.as_ref() {
                "sslmode" | "ssl-mode"
                    if strict
                        && ![
                            "disable",
                            "allow",
                            "prefer",
                            "require",
                            "verify-ca",
                            "verify-full",
                        ]
                        .contains(&value.to_ascii_lowercase().as_str()) =>
                {
                    return Err(
                        "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full"
                            .into(),
                    );
                }
                "port" if strict && value.parse::<u16>().is_err() => {
                    return Err("the `port` parameter must be a port number".into());
                }
                "port" if value.parse::<u16>().is_err() => {}
                "host" | "hostaddr" if host.is_empty() => host = value.into_owned(),
                "port" if port.is_none() => port = Some(value.into_owned()),
                "dbname" => database = value.into_owned(),
                _ => {}
            }
        }
        if host.is_empty() {
            host = "localhost".to_owned();
        }
        Ok(PgUrl {
            host,
            port: port.unwrap_or_else(|| "5432".to_owned()),
            database,
        })
    }
}

/// Checks a PostgreSQL URL before sqlx sees it (see [`PgUrl::parse`]).
pub(crate) fn check_postgres_url(url: &str) -> Result<(), StoreError> {
    PgUrl::parse(url, true)
        .map(|_| ())
        .map_err(StoreError::BadUrl)
}

/// `text` (an error message) with every credential the store URL holds
/// replaced by `***`: the URL itself, its user information, the password
/// (as written and decoded) and every `password` parameter.
pub(crate) fn scrub(text: &str, url: &str) -> String {
    let mut needles: Vec<String> = vec![url.to_owned()];
    if let Ok(parsed) = url::Url::parse(url) {
        if let Some(password) = parsed.password() {
            needles.push(password.to_owned());
            needles.push(
                percent_encoding::percent_decode_str(password)
                    .decode_utf8_lossy()
                    .into_owned(),
            );
        }
        for (key, value) in parsed.query_pairs() {
            if key == "password" {
                needles.push(value.into_owned());
            }
        }
        if let Some(query) = parsed.query() {
            for pair in query.split('&') {
                if let Some(("password", raw)) = pair.split_once('=') {
                    needles.push(raw.to_owned());
                }
            }
        }
    }
    // Also whatever sits between the scheme and the last `@`, in case the
    // URL does not parse the way it was meant to.
    if let Some(rest) = url.split_once("://").map(|(_, r)| r) {
        if let Some((userinfo, _)) = rest.rsplit_once('@') {
            needles.push(userinfo.to_owned());
            if let Some((_, password)) = userinfo.split_once(':') {
                needles.push(password.to_owned());
            }
        }
    }
    needles.retain(|n| !n.is_empty());
    // Longest first, so a part never leaves the rest of a longer needle behind.
    needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut out = text.to_owned();
    for n in &needles {
        out = out.replace(n.as_str(), "***");
    }
    out
}

pub use crate::clock::{now, now_ms};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        use sql::{numbered, INSERT_EVENT};
        assert_eq!(
            numbered("UPDATE t SET a = ? WHERE b = ? AND c = ?"),
            "UPDATE t SET a = $1 WHERE b = $2 AND c = $3"
        );
        assert_eq!(
            numbered(INSERT_EVENT).matches('$').count(),
            INSERT_EVENT.matches('?').count()
        );
    }

    #[test]
    fn event_kinds_are_named_as_on_the_wire() {
        let kinds = [
            (EventKind::Connected, "session.connected"),
            (EventKind::RefreshFailing, "session.refresh_failing"),
            (EventKind::Recovered, "session.recovered"),
            (
                EventKind::ReauthorizationRequired,
                "session.reauthorization_required",
            ),
            (EventKind::Revoked, "session.revoked"),
        ];
        for (kind, name) in kinds {
            assert_eq!(kind.as_str(), name);
        }
        let e = NewEvent::new(EventKind::Revoked, "s_1", "spark", 5, serde_json::json!({}));
        assert!(e.id.starts_with("evt_"));
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        for (url, shown) in [
            ("postgres://u:hunter2@db:5432/cp", "postgres://db:5432/cp"),
            (
                "postgres://u@db/cp?password=hunter2",
                "postgres://db:5432/cp",
            ),
            (
                "postgresql://u:p%2Fw@db:6543/cp?sslmode=require",
                "postgres://db:6543/cp",
            ),
            (
                "postgres:///cp?host=/run/postgresql&user=u",
                "postgres:///run/postgresql:5432/cp",
            ),
            ("postgres://db", "postgres://db:5432/"),
            (
                "sqlite:///var/lib/credproxy.db?mode=rwc",
                "sqlite:///var/lib/credproxy.db",
            ),
            ("sqlite::memory:", "sqlite::memory:"),
        ] {
            assert_eq!(describe_url(url), shown, "{url}");
        }
        // An unescaped `/` in the password: host `u`, port or path taken
        // from the password. Nothing of it is shown.
        for url in [
            "postgres://u:hun/ter2@db/cp",
            "postgres://u:1234/ter2@db/cp",
            "postgres://u:12#ter2@db/cp",
            "postgres://u:hun?ter2@db/cp",
        ] {
            let shown = describe_url(url);
            assert!(
                !shown.contains("ter2") && !shown.contains("hun") && !shown.contains("1234"),
                "{url}: {shown}"
            );
            let e = check_postgres_url(url).expect_err(url).to_string();
            assert!(
                !e.contains("ter2") && !e.contains("hun") && !e.contains("1234"),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn unknown_parameters_are_refused_by_name_only() {
        let e = check_postgres_url("postgres://db/cp?passwd=hunter2")
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("`passwd`") && !e.contains("hunter2"), "{e}");
        let e = check_postgres_url("postgres://db/cp?sslmode=hunter2")
            .expect_err("bad sslmode")
            .to_string();
        assert!(e.contains("sslmode") && !e.contains("hunter2"), "{e}");
        check_postgres_url("postgres://u:p@db:5432/cp?sslmode=verify-full&application_name=x&options[statement_timeout]=5s")
            .expect("known parameters");
    }

    #[test]
    fn scrub_takes_out_every_form_of_the_password() {
        let url = "postgres://u:p%40ss%2Fword@db/cp?password=other";
        let text = format!("failed for {url}: p@ss/word, p%40ss%2Fword, other");
        let out = scrub(&text, url);
        for secret in ["p@ss/word", "p%40ss%2Fword", "other"] {
            assert!(!out.contains(secret), "{out}");
        }
        assert!(out.starts_with("failed for ***"), "{out}");
    }
}
