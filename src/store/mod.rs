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
//! in batches ([`Store::note_uses`]) without a version bump, a change-log
//! entry or an event.
//!
//! **Invariant (audit):** the audit row of a change (`audit:
//! Option<&AuditAppend>`) is appended in the same transaction as the
//! change, only when the change happened, after every other write of the
//! transaction and under the chain's lock (SQLite: the write transaction
//! itself; PostgreSQL: `pg_advisory_xact_lock`), so rows are chained in
//! commit order with no gap (see `crate::audit`).

use async_trait::async_trait;

use crate::audit::{AuditAppend, AuditFilter, AuditRow};
use crate::secrets::session::{KeyHash, Status};

pub mod postgres;
mod shared;
mod sql;
pub mod sqlite;

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
pub async fn within<T>(
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(HOT_TIMEOUT, call)
        .await
        .unwrap_or(Err(StoreError::Timeout))
}

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
    /// the batched [`Store::note_uses`]: up to one flush interval behind.
    pub last_used_at: Option<i64>,
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

/// A transient refresh failure, as [`Store::mark_refresh_failing`] records it.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// The error class (`token_endpoint_timeout`, ...): a short fixed string.
    pub class: &'a str,
    /// When the refresh is retried (unix seconds).
    pub next_retry_at: i64,
    /// Appended to the outbox if the session was `active` (a transition).
    pub event: Option<&'a NewEvent>,
}

/// A candidate of idle refresh (see [`Store::idle_sessions`]).
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

/// What [`Store::changes`] read from the change log.
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

/// Change-log rows one [`Store::changes`] reads at most.
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
/// budget (see [`Store::lease_budget`]).
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
    /// Identifies the lease for [`Store::settle_budget`]; 0 when nothing was granted.
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

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Answers when the store is reachable and can read sessions (`/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Inserts a new session; [`StoreError::DuplicateKey`] when its key
    /// hash exists. `event` (a connect) is appended in the same transaction.
    async fn insert_session(
        &self,
        new: NewSession,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<SessionRecord, StoreError>;

    async fn session_by_key(&self, hash: &KeyHash) -> Result<Option<SessionRecord>, StoreError>;

    async fn session_by_id(&self, id: &str) -> Result<Option<SessionRecord>, StoreError>;

    /// All sessions, oldest first.
    async fn list_sessions(&self) -> Result<Vec<SessionRecord>, StoreError>;

    /// The session updated last, if any: the one a start-up check opens to
    /// prove the sealing key fits.
    async fn newest_session(&self) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self
            .list_sessions()
            .await?
            .into_iter()
            .max_by_key(|r| r.updated_at))
    }

    async fn count_sessions(&self) -> Result<Vec<SessionCount>, StoreError>;

    /// Every sealed value (access and refresh tokens) counted by the key id
    /// its header names (see `seal.rs`), by SQL over the stored bytes.
    async fn count_sealed_by_key(&self) -> Result<Vec<SealedCount>, StoreError>;

    /// Up to `limit` sessions, in id order after `after`, holding a sealed
    /// value whose first bytes are not `header` (the version byte and the
    /// primary key's id): the rows `key rewrap` has left to do.
    async fn sealed_not_under(
        &self,
        header: &[u8],
        after: &str,
        limit: u32,
    ) -> Result<Vec<SealedRow>, StoreError>;

    /// Writes re-sealed values, each row only if it still holds the values
    /// it was read with (a compare-and-swap on the sealed bytes, in one
    /// transaction per call). The version and `updated_at` are left alone:
    /// a re-sealed row means what it meant, and a refresh that read the row
    /// before still wins its own compare-and-swap. Returns the ids of the
    /// rows written.
    async fn reseal_rows(&self, rows: &[Resealed]) -> Result<Vec<String>, StoreError>;

    /// Replaces a session's tokens, sets it active (its error cleared) and
    /// bumps its version. With `expected_version`, only if the row still has
    /// that version (compare-and-swap); returns the new record, or `None`
    /// when the session is gone or its version moved on. `event` (a
    /// reconnect) is appended when the row was replaced.
    async fn replace_tokens(
        &self,
        id: &str,
        tokens: SealedTokens,
        expected_version: Option<i64>,
        now: i64,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<Option<SessionRecord>, StoreError>;

    /// Takes the session's refresh lease for `owner` until `until_ms` (unix
    /// milliseconds), unless another owner holds an unexpired one.
    async fn acquire_refresh_lease(
        &self,
        id: &str,
        owner: &str,
        until_ms: i64,
        now_ms: i64,
    ) -> Result<Lease, StoreError>;

    /// Gives the lease back without changing the session.
    async fn release_refresh_lease(&self, id: &str, owner: &str) -> Result<(), StoreError>;

    /// Gives back every lease `owner` still holds (a process shutting down
    /// whose refreshes did not finish in its grace period); returns how many.
    async fn release_refresh_leases(&self, owner: &str) -> Result<u64, StoreError>;

    /// The owners holding a refresh lease now (expired ones too).
    async fn refresh_lease_owners(&self) -> Result<Vec<String>, StoreError>;

    /// Stores refreshed tokens durably and releases the lease, only while
    /// `owner` holds it and the row still has `expected_version`; `health`
    /// says whether the session becomes `active` again (and whether that
    /// was a recovery worth an event).
    // The compare-and-swap's parts, the health and the audit row: one call.
    #[allow(clippy::too_many_arguments)]
    async fn commit_refresh(
        &self,
        id: &str,
        owner: &str,
        tokens: SealedTokens,
        expected_version: i64,
        now: i64,
        health: Health<'_>,
        audit: Option<&AuditAppend>,
    ) -> Result<Option<SessionRecord>, StoreError>;

    /// Records a transient refresh failure, if the row still has
    /// `expected_version` and does not need reauthorization: `last_error`
    /// and `next_retry_at`, the status `refresh_failing` (the version stays:
    /// the tokens did not change). The lease is released if `owner` holds
    /// it, whatever the version. Returns `true` when the session was
    /// `active` until now (a transition: a change-log entry, and
    /// `failure.event` appended); a failure while already failing updates
    /// the error and the retry time only.
    async fn mark_refresh_failing(
        &self,
        id: &str,
        owner: &str,
        expected_version: i64,
        now: i64,
        failure: Failure<'_>,
    ) -> Result<bool, StoreError>;

    /// Marks the session `reauthorization_required` (its refresh token was
    /// refused: `code`, `invalid_grant` or `invalid_client`, becomes its
    /// `last_error`) and releases the lease, if the row still has
    /// `expected_version`. `event` is appended when it did not need
    /// reauthorization already.
    async fn mark_reauthorization_required(
        &self,
        id: &str,
        expected_version: i64,
        now: i64,
        code: &str,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<bool, StoreError>;

    /// Records when sessions were last used: `(id, unix seconds)`, one entry
    /// per session (of an id given twice, the latest counts; an unknown id
    /// is skipped). `last_used_at` only ever moves forward, and it is not a
    /// change: no version bump, no change-log entry, no event. Written in
    /// few transactions (of up to 250 sessions on SQLite, 1,000 on
    /// PostgreSQL); returns how many rows moved.
    async fn note_uses(&self, uses: &[(String, i64)]) -> Result<u64, StoreError>;

    /// The sessions of `provider` neither used nor refreshed since
    /// `idle_before` (the latest of `last_used_at`, `last_refresh_at` and
    /// `created_at` is older), that can be refreshed (a refresh token, not
    /// `reauthorization_required`, not waiting for a retry after `now`),
    /// in order of `(idle_since, id)` after `after`; at most `limit`.
    /// An indexed range scan (`sessions_idle`), never a pass over every row.
    async fn idle_sessions(
        &self,
        provider: &str,
        idle_before: i64,
        after: &IdleCursor,
        now: i64,
        limit: u32,
    ) -> Result<Vec<IdleSession>, StoreError>;

    /// Records a new one-time OAuth state.
    async fn insert_oauth_state(
        &self,
        state_hash: &[u8; 32],
        state: &OAuthState,
    ) -> Result<(), StoreError>;

    /// The state, if it exists, is unused and was created at or after `not_before`.
    async fn peek_oauth_state(
        &self,
        state_hash: &[u8; 32],
        not_before: i64,
    ) -> Result<Option<OAuthState>, StoreError>;

    /// Records a new state made in a browser and bound to it (`browser_hash`:
    /// the SHA-256 of the value in that browser's cookie), unless
    /// `max_pending` states that are unused and were created at or after
    /// `not_before` exist already: then nothing is written and the answer is
    /// `false`. (On PostgreSQL, requests racing each other may overshoot the
    /// cap by a few rows.)
    async fn insert_browser_oauth_state(
        &self,
        state_hash: &[u8; 32],
        state: &OAuthState,
        browser_hash: &[u8; 32],
        not_before: i64,
        max_pending: u64,
    ) -> Result<bool, StoreError>;

    /// How many states are unused and were created at or after `not_before`.
    async fn count_pending_oauth_states(&self, not_before: i64) -> Result<u64, StoreError>;

    /// Consumes the state (marks it used) and returns it, only if it exists,
    /// belongs to `provider`, is unused, was created at or after
    /// `not_before`, and is either bound to no browser or bound to
    /// `browser_hash`: a state works once, only for its own provider, and
    /// only in the browser that started it. A refusal leaves the state as it
    /// was.
    async fn take_oauth_state_from_browser(
        &self,
        state_hash: &[u8; 32],
        provider: &str,
        browser_hash: Option<&[u8; 32]>,
        now: i64,
        not_before: i64,
    ) -> Result<Option<OAuthState>, StoreError>;

    /// [`Store::take_oauth_state_from_browser`] without a browser: only a
    /// state bound to no browser is taken.
    async fn take_oauth_state(
        &self,
        state_hash: &[u8; 32],
        provider: &str,
        now: i64,
        not_before: i64,
    ) -> Result<Option<OAuthState>, StoreError> {
        self.take_oauth_state_from_browser(state_hash, provider, None, now, not_before)
            .await
    }

    /// Records how a consumed state's flow ended.
    async fn finish_oauth_state(
        &self,
        state_hash: &[u8; 32],
        outcome: &OAuthOutcome,
    ) -> Result<(), StoreError>;

    async fn oauth_outcome(&self, state_hash: &[u8; 32]) -> Result<OAuthOutcome, StoreError>;

    /// Forgets states created before `before`, except those consumed at or
    /// after `before` (their flow may still be running, and `credproxy
    /// connect` reads its outcome); returns how many it forgot.
    async fn prune_oauth_states(&self, before: i64) -> Result<u64, StoreError>;

    /// Deletes a session; `false` when there was none. `event` (a revoke)
    /// is appended when a row was deleted.
    async fn delete_session(
        &self,
        id: &str,
        now: i64,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<bool, StoreError>;

    /// Due events (not delivered, not given up, `next_attempt_at_ms <=
    /// now_ms`, and no live lease), oldest first, at most `limit`; leased to
    /// `owner` until `now_ms + lease_ms`. Two claimers never hold one event
    /// at once (PostgreSQL: `FOR UPDATE SKIP LOCKED`, leases timed by the
    /// database's clock).
    async fn claim_events(
        &self,
        owner: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError>;

    /// Delivered: only while `owner` holds the lease (it has not been
    /// claimed by another since).
    async fn event_delivered(&self, id: &str, owner: &str, now: i64) -> Result<(), StoreError>;

    /// Failed this attempt: `attempts + 1`, `last_error = error` (a short
    /// class, no secret), `next_attempt_at_ms`, lease released; only while
    /// `owner` holds the lease.
    async fn event_retry(
        &self,
        id: &str,
        owner: &str,
        next_attempt_at_ms: i64,
        error: &str,
    ) -> Result<(), StoreError>;

    /// Given up for good (too old): `gave_up_at = now`, `last_error =
    /// error`, lease released; only while `owner` holds the lease.
    async fn event_gave_up(
        &self,
        id: &str,
        owner: &str,
        now: i64,
        error: &str,
    ) -> Result<(), StoreError>;

    /// Undelivered events (pending and given up), oldest first, at most `limit`.
    async fn list_events(&self, limit: u32) -> Result<Vec<EventRow>, StoreError>;

    /// Forgets delivered events delivered before `delivered_before` and
    /// given-up events given up before `given_up_before` (unix seconds);
    /// returns how many.
    async fn prune_events(
        &self,
        delivered_before: i64,
        given_up_before: i64,
    ) -> Result<u64, StoreError>;

    /// Given-up events, oldest first, at most `limit`.
    async fn list_given_up_events(&self, limit: u32) -> Result<Vec<EventRow>, StoreError>;

    /// Puts given-up events back for delivery, due at `now_ms`: those of
    /// `ids` (unknown, delivered or pending ones are left alone), or every
    /// one (`None`); returns how many. Their `at` stays, so one whose next
    /// attempt fails is given up again at once.
    async fn retry_given_up_events(
        &self,
        ids: Option<&[String]>,
        now_ms: i64,
    ) -> Result<u64, StoreError>;

    /// Deletes given-up events: those of `ids`, or every one (`None`);
    /// returns how many.
    async fn clear_given_up_events(&self, ids: Option<&[String]>) -> Result<u64, StoreError>;

    /// Appends a row to the audit chain in a transaction of its own, under
    /// the lock that serializes every appender (see `crate::audit`);
    /// returns its `seq`. The methods above that take an `audit` append it
    /// the same way, in the change's transaction, when the change happened.
    async fn append_audit(&self, audit: &AuditAppend) -> Result<i64, StoreError>;

    /// The newest `filter.limit` rows matching `filter`, oldest first.
    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRow>, StoreError>;

    /// Rows with `seq > after_seq`, in `seq` order, at most `limit`.
    async fn audit_page(&self, after_seq: i64, limit: u32) -> Result<Vec<AuditRow>, StoreError>;

    /// How many audit rows each key id chained (`key retire` keeps the
    /// audit key of a key with rows).
    async fn count_audit_by_key(&self) -> Result<Vec<(String, i64)>, StoreError>;

    /// The newest change-log position.
    async fn change_cursor(&self) -> Result<i64, StoreError>;

    /// The change log after `cursor`: ids of sessions changed, the key
    /// hashes of sessions inserted (so negative caches forget them), and
    /// the new cursor.
    async fn changes(&self, cursor: i64) -> Result<Changes, StoreError>;

    /// Ids of sessions changed after `cursor`, and the new cursor.
    async fn changes_since(&self, cursor: i64) -> Result<(i64, Vec<String>), StoreError> {
        let c = self.changes(cursor).await?;
        Ok((c.cursor, c.ids))
    }

    /// Inserts many new sessions in one transaction (multi-row inserts),
    /// each with its change-log entry, and `audit` (one row for the batch)
    /// last; [`StoreError::DuplicateKey`] (and nothing written) when a key
    /// hash or id exists. For seeding large stores; no events.
    async fn insert_sessions(
        &self,
        batch: &[NewSession],
        audit: Option<&AuditAppend>,
    ) -> Result<u64, StoreError>;

    /// Forgets change-log entries older than `before` (unix seconds).
    async fn prune_changes(&self, before: i64) -> Result<(), StoreError>;

    /// Whether request budgets are kept here, shared by every instance
    /// (PostgreSQL), rather than in each process's memory (SQLite, one process).
    fn shares_budgets(&self) -> bool {
        false
    }

    /// Leases a share of a provider's budget, atomically against every other
    /// instance: the shares of leases that ended within the last `window_ms`
    /// (or have not ended) count as spent, so at most `requests` are sent in
    /// any window of that length. A lease whose instance dies stops counting
    /// `window_ms` after it ends. Only stores that [`Store::shares_budgets`].
    async fn lease_budget(&self, ask: &BudgetAsk<'_>) -> Result<BudgetLease, StoreError> {
        let _ = ask;
        Err(StoreError::Open(
            "this store keeps no shared request budgets".into(),
        ))
    }

    /// Records that a lease, now ended (or given back early: nothing more is
    /// sent under it), was used for `used` requests, so its unused share
    /// counts for nothing.
    async fn settle_budget(&self, lease_id: i64, used: u32) -> Result<(), StoreError> {
        let _ = (lease_id, used);
        Ok(())
    }

    /// Returns when another process may have changed a session, or after
    /// `max`, with the ids it knows changed (they are dropped from the cache
    /// at once; the change-log poll that follows catches the rest). Polling
    /// stores just wait; PostgreSQL wakes on NOTIFY.
    async fn wait_for_change(&self, max: std::time::Duration) -> Vec<String> {
        tokio::time::sleep(max).await;
        Vec::new()
    }
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
