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

use async_trait::async_trait;

use crate::session::{KeyHash, Status};

pub mod postgres;
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
}

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

/// The answer to a request for a session's refresh lease.
#[derive(Debug)]
pub enum Lease {
    /// The caller now holds the lease; the row as it is under the lease.
    Acquired(SessionRecord),
    /// Another owner holds it until `until_ms`; `version` is the row's now.
    Held { until_ms: i64, version: i64 },
    /// No such session.
    Gone,
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

/// Sessions counted by provider and status, for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCount {
    pub provider: String,
    pub status: Status,
    pub count: i64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Answers when the store is reachable (`/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Inserts a new session; [`StoreError::DuplicateKey`] when its key hash exists.
    async fn insert_session(&self, new: NewSession) -> Result<SessionRecord, StoreError>;

    async fn session_by_key(&self, hash: &KeyHash) -> Result<Option<SessionRecord>, StoreError>;

    async fn session_by_id(&self, id: &str) -> Result<Option<SessionRecord>, StoreError>;

    /// All sessions, oldest first.
    async fn list_sessions(&self) -> Result<Vec<SessionRecord>, StoreError>;

    async fn count_sessions(&self) -> Result<Vec<SessionCount>, StoreError>;

    /// Replaces a session's tokens, sets it active and bumps its version.
    /// With `expected_version`, only if the row still has that version
    /// (compare-and-swap); returns the new record, or `None` when the session
    /// is gone or its version moved on.
    async fn replace_tokens(
        &self,
        id: &str,
        tokens: SealedTokens,
        expected_version: Option<i64>,
        now: i64,
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

    /// Stores refreshed tokens durably and releases the lease, only while
    /// `owner` holds it and the row still has `expected_version`.
    async fn commit_refresh(
        &self,
        id: &str,
        owner: &str,
        tokens: SealedTokens,
        expected_version: i64,
        now: i64,
    ) -> Result<Option<SessionRecord>, StoreError>;

    /// Marks the session `reauthorization_required` (its refresh token was
    /// refused) and releases the lease, if the row still has `expected_version`.
    async fn mark_reauthorization_required(
        &self,
        id: &str,
        expected_version: i64,
        now: i64,
    ) -> Result<bool, StoreError>;

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

    /// Deletes a session; `false` when there was none.
    async fn delete_session(&self, id: &str, now: i64) -> Result<bool, StoreError>;

    /// The newest change-log position.
    async fn change_cursor(&self) -> Result<i64, StoreError>;

    /// Ids of sessions changed after `cursor`, and the new cursor.
    async fn changes_since(&self, cursor: i64) -> Result<(i64, Vec<String>), StoreError>;

    /// Forgets change-log entries older than `before` (unix seconds).
    async fn prune_changes(&self, before: i64) -> Result<(), StoreError>;

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

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    now_ms() / 1000
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
