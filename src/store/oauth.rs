//! The pending OAuth authorisations (`oauth_states`), keyed by the hash of
//! their one-time `state`.

use async_trait::async_trait;
use sqlx::Row;

use super::shared::{dialect_sql, over_sql, Backend};
use super::{OAuthOutcome, OAuthState, StoreError};
use crate::secrets::session::KeyHash;

#[async_trait]
pub trait OAuthStates: Send + Sync {
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

    /// [`OAuthStates::take_oauth_state_from_browser`] without a browser: only a
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
}

over_sql! {
#[async_trait]
impl [<DB, B: Backend<DB = DB>> OAuthStates for B] {
    async fn insert_oauth_state(
        &self,
        state_hash: &[u8; 32],
        state: &OAuthState,
    ) -> Result<(), StoreError> {
        sqlx::query(dialect_sql!(
            DB,
            "INSERT INTO oauth_states (state_hash, provider, session_id, key_hash, created_at) VALUES (?, ?, ?, ?, ?)"
        ))
        .bind(&state_hash[..])
        .bind(state.provider.as_str())
        .bind(state.session_id.as_deref())
        .bind(state.key_hash.as_ref().map(|h| h.0.to_vec()))
        .bind(state.created_at)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn peek_oauth_state(
        &self,
        state_hash: &[u8; 32],
        not_before: i64,
    ) -> Result<Option<OAuthState>, StoreError> {
        let row = sqlx::query(dialect_sql!(
            DB,
            "SELECT provider, session_id, key_hash, created_at FROM oauth_states
             WHERE state_hash = ? AND used_at IS NULL AND created_at >= ?"
        ))
        .bind(&state_hash[..])
        .bind(not_before)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(oauth_state).transpose()
    }

    async fn insert_browser_oauth_state(
        &self,
        state_hash: &[u8; 32],
        state: &OAuthState,
        browser_hash: &[u8; 32],
        not_before: i64,
        max_pending: u64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(dialect_sql!(
            DB,
            "INSERT INTO oauth_states (state_hash, provider, session_id, key_hash, created_at, browser_hash)
             SELECT ?, ?, ?, ?, ?, ?
             WHERE (SELECT COUNT(*) FROM oauth_states WHERE used_at IS NULL AND created_at >= ?) < ?"
        ))
        .bind(&state_hash[..])
        .bind(state.provider.as_str())
        .bind(state.session_id.as_deref())
        .bind(state.key_hash.as_ref().map(|h| h.0.to_vec()))
        .bind(state.created_at)
        .bind(&browser_hash[..])
        .bind(not_before)
        .bind(i64::try_from(max_pending).unwrap_or(i64::MAX))
        .execute(self.pool())
        .await?;
        Ok(DB::rows_affected(&done) > 0)
    }

    async fn count_pending_oauth_states(&self, not_before: i64) -> Result<u64, StoreError> {
        let row = sqlx::query(dialect_sql!(
            DB,
            "SELECT COUNT(*) FROM oauth_states WHERE used_at IS NULL AND created_at >= ?"
        ))
        .bind(not_before)
        .fetch_one(self.pool())
        .await?;
        let n: i64 = row.try_get(0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn take_oauth_state_from_browser(
        &self,
        state_hash: &[u8; 32],
        provider: &str,
        browser_hash: Option<&[u8; 32]>,
        now: i64,
        not_before: i64,
    ) -> Result<Option<OAuthState>, StoreError> {
        // With no browser, `browser_hash = NULL` is never true: only an
        // unbound state is taken.
        let row = sqlx::query(dialect_sql!(
            DB,
            "UPDATE oauth_states SET used_at = ?
             WHERE state_hash = ? AND provider = ? AND used_at IS NULL AND created_at >= ?
               AND (browser_hash IS NULL OR browser_hash = ?)
             RETURNING provider, session_id, key_hash, created_at"
        ))
        .bind(now)
        .bind(&state_hash[..])
        .bind(provider)
        .bind(not_before)
        .bind(browser_hash.map(|h| h.to_vec()))
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(oauth_state).transpose()
    }

    async fn finish_oauth_state(
        &self,
        state_hash: &[u8; 32],
        outcome: &OAuthOutcome,
    ) -> Result<(), StoreError> {
        let (session, failure) = outcome.columns();
        sqlx::query(dialect_sql!(
            DB,
            "UPDATE oauth_states SET result_session_id = ?, failure = ? WHERE state_hash = ?"
        ))
        .bind(session)
        .bind(failure)
        .bind(&state_hash[..])
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn oauth_outcome(&self, state_hash: &[u8; 32]) -> Result<OAuthOutcome, StoreError> {
        let row = sqlx::query(dialect_sql!(
            DB,
            "SELECT result_session_id, failure FROM oauth_states WHERE state_hash = ?"
        ))
        .bind(&state_hash[..])
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            return Ok(OAuthOutcome::Unknown);
        };
        Ok(OAuthOutcome::from_columns(
            row.try_get("result_session_id")?,
            row.try_get("failure")?,
        ))
    }

    async fn prune_oauth_states(&self, before: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(dialect_sql!(
            DB,
            "DELETE FROM oauth_states WHERE created_at < ? AND (used_at IS NULL OR used_at < ?)"
        ))
        .bind(before)
        .bind(before)
        .execute(self.pool())
        .await?;
        Ok(DB::rows_affected(&done))
    }
}
}

/// An OAuth state row: `provider, session_id, key_hash, created_at`.
fn oauth_state<R>(row: &R) -> Result<OAuthState, StoreError>
where
    R: Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let key_hash: Option<Vec<u8>> = row.try_get("key_hash")?;
    let key_hash = key_hash
        .map(|h| {
            h.try_into()
                .map(KeyHash)
                .map_err(|_| StoreError::Corrupt("oauth state".into()))
        })
        .transpose()?;
    Ok(OAuthState {
        provider: row.try_get("provider")?,
        session_id: row.try_get("session_id")?,
        key_hash,
        created_at: row.try_get("created_at")?,
    })
}
