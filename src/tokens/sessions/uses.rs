//! When sessions were last used: noted in memory by the hot path, read by
//! refresh-ahead and idle refresh, and written to the store's
//! `last_used_at` in batches ([`Uses::flush`], every
//! `store.use_flush_interval`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;

use super::active::ActiveSession;
use super::scope::Grant;
use crate::store::{self, Store, StoreError};

/// A use stays in [`Uses`]' memory this long (refresh-ahead counts a
/// session used this recently as in use); the store keeps it after that.
pub const RECENT_USE: Duration = Duration::from_secs(15 * 60);

/// Uses of the last seconds wait for the next flush: a request that read
/// the clock just before a flush may record its use just after it.
pub(super) const USE_FLUSH_LAG_SECS: i64 = 2;

/// The recent uses of sessions, and what of them the store has.
#[derive(Default)]
pub struct Uses {
    /// Session id -> unix seconds of its last use, for refresh-ahead, idle
    /// refresh and the store's `last_used_at`. Kept apart from the cache,
    /// which changes evict.
    recent: DashMap<String, i64>,
    /// Key id -> unix seconds of its last use, for the store's
    /// `session_keys.last_used_at` (written with the sessions').
    recent_keys: DashMap<String, i64>,
    /// Uses recorded at or after this (unix seconds) are not in the store
    /// yet (see [`Uses::flush`]); the lock keeps flushes apart.
    flushed_to: tokio::sync::Mutex<i64>,
    /// Session rows the flusher has written, for tests and logs.
    writes: AtomicU64,
}

impl Uses {
    /// Notes that a request used `session` at `now`; the shared map is
    /// written at most once a second per cached copy, so busy sessions
    /// cost one atomic load.
    #[inline]
    pub fn note(&self, session: &ActiveSession, now: i64) {
        if session.last_used.load(Ordering::Relaxed) != now {
            session.last_used.store(now, Ordering::Relaxed);
            self.recent.insert(session.id.clone(), now);
        }
    }

    /// Notes that a request presented `grant`'s key at `now`, as
    /// [`Uses::note`] does for its session.
    #[inline]
    pub fn note_key(&self, grant: &Grant, now: i64) {
        if grant.last_used.load(Ordering::Relaxed) != now {
            grant.last_used.store(now, Ordering::Relaxed);
            self.recent_keys.insert(grant.key_id.clone(), now);
        }
    }

    /// When this process last saw key `key_id` used, if not yet flushed.
    pub fn last_of_key(&self, key_id: &str) -> Option<i64> {
        self.recent_keys.get(key_id).map(|at| *at)
    }

    /// Ids of sessions used at or after `since` (unix seconds); older
    /// entries are forgotten.
    pub fn used_since(&self, since: i64) -> Vec<String> {
        self.recent.retain(|_, at| *at >= since);
        self.recent.iter().map(|e| e.key().clone()).collect()
    }

    /// Forgets session `id`'s use (it is gone).
    pub fn forget(&self, id: &str) {
        self.recent.remove(id);
    }

    /// When this process last saw session `id` used, if within [`RECENT_USE`].
    pub fn last(&self, id: &str) -> Option<i64> {
        self.recent.get(id).map(|at| *at)
    }

    /// Writes the uses recorded since the last flush and before `until`
    /// (unix seconds) to the store's `last_used_at`, in one batch
    /// ([`Store::note_uses`]): each session at most once, whatever number
    /// of requests used it. The hot path only ever touches memory
    /// ([`Uses::note`]). On a store error nothing is forgotten: the next
    /// flush writes the same uses (if newer, newer ones). Returns how many
    /// sessions were written.
    pub async fn flush(&self, store: &dyn Store, until: i64) -> Result<usize, StoreError> {
        let mut from = self.flushed_to.lock().await;
        if until <= *from {
            return Ok(0);
        }
        let uses: Vec<(String, i64)> = self
            .recent
            .iter()
            .filter(|e| (*from..until).contains(e.value()))
            .map(|e| (e.key().clone(), *e.value()))
            .collect();
        let key_uses: Vec<(String, i64)> = self
            .recent_keys
            .iter()
            .filter(|e| (*from..until).contains(e.value()))
            .map(|e| (e.key().clone(), *e.value()))
            .collect();
        if !key_uses.is_empty() {
            store.note_key_uses(&key_uses).await?;
        }
        if !uses.is_empty() {
            store.note_uses(&uses).await?;
            self.writes.fetch_add(uses.len() as u64, Ordering::Relaxed);
            tracing::debug!(sessions = uses.len(), "wrote the sessions' last use");
        }
        *from = until;
        // What is written and older than refresh-ahead looks at is kept by
        // the store alone.
        let keep = until.min(store::now() - RECENT_USE.as_secs() as i64);
        self.recent.retain(|_, at| *at >= keep);
        self.recent_keys
            .retain(|_, at| *at >= until.min(store::now()));
        Ok(uses.len())
    }

    /// Session rows [`Uses::flush`] has written so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}
