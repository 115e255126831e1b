//! Sessions as the rest of the program sees them. [`Sessions`] is a thin
//! facade over the parts it owns, each in a file of its own:
//!
//! - `active.rs`: a session as the hot path holds it ([`ActiveSession`]);
//! - [`cache`]: the hot-path cache of sessions by key hash (and by id, for
//!   default sessions) and the negative cache of unknown keys
//!   ([`SessionCache`]);
//! - [`scope`]: what each of a session's keys may do ([`Scope`]) and the
//!   session as a key presents it ([`Keyed`]), with the keys' own rates
//!   ([`KeyRates`]);
//! - `keys.rs`: a session's keys added, listed and revoked;
//! - [`cold`]: the budget of store reads for keys in neither cache, per
//!   client address ([`ColdBudget`]);
//! - [`uses`]: when sessions were last used, written to the store in
//!   batches ([`Uses`]);
//! - [`counts`]: requests per session and hour for the audit trail
//!   ([`RequestCounts`]);
//! - [`vault`]: sealing tokens on the way into the store, opening them on
//!   the way out ([`Vault`]);
//! - [`open`]: opening the store and the sealing key together
//!   ([`Sessions::open`]);
//! - `changes.rs`: the control plane's changes (add, replace, revoke) and
//!   lists, each change with its event and audit row and the cache
//!   invalidation it implies;
//! - `follow.rs`: following the store's change log, for changes made by
//!   other processes ([`Sessions::follow_changes_from`]).
//!
//! What stays here ties them together: the lookups (the cache, else the
//! negative cache, else the cold budget and one indexed store read, opened
//! and cached), a refresh's row installed in the cache, a request's use
//! noted, and the flushes of uses and counts.
//!
//! **Invariant (coherence):** every change to a session, by this process or
//! another one sharing the store, drops the cached copy: directly for changes
//! made here, and through [`Sessions::follow_changes_from`] for changes made
//! elsewhere. A lookup that raced a change never caches the stale row: fills
//! are discarded when an invalidation happened meanwhile (the cache's
//! [`Ticket`]). **Invariant (negative coherence):** a key added by this
//! process is forgotten as absent at once (`add_hashed`), one added by
//! another process as soon as the change follower reads its entry; a
//! negative fill that raced an add is discarded.

mod active;
pub mod cache;
mod changes;
pub mod cold;
pub mod counts;
mod follow;
mod keys;
pub mod open;
pub mod scope;
pub mod uses;
pub mod vault;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::audit::{self, Actor, AuditAppend, AuditEntry, AuditSigner};
use crate::config::{Config, ProviderConfig};
use crate::provider::{Credentials, UnusableToken};
use crate::secrets::live::LiveRing;
use crate::secrets::seal::{OpenError, Sealer};
use crate::secrets::session::{BadKey, KeyHash, SessionKey, Status};
use crate::store::{self, EventKind, NewEvent, SessionRecord, Store, StoreError};

pub use active::ActiveSession;
pub use cache::{SessionCache, Ticket};
pub use cold::{client_key, ColdBudget};
pub use counts::{RequestCounts, COUNT_PERIOD_SECS};
pub use keys::{KeyAdded, KeyInfo};
pub use scope::{Grant, KeyRates, Keyed, Refusal, Scope, ScopeAsked, ScopeError};
pub use uses::{Uses, RECENT_USE};
pub(crate) use vault::aad;
pub use vault::{NewTokens, Vault};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Unseal(#[from] OpenError),
    #[error(transparent)]
    Token(#[from] UnusableToken),
    #[error("no provider named `{0}` is configured")]
    UnknownProvider(String),
    #[error("session {0} does not exist")]
    NotFound(String),
    #[error("that session key belongs to a session of provider `{0}`")]
    KeyOfOtherProvider(String),
    #[error("provider `{provider}` uses the sessions of `{owner}` (sessions_from): add or connect the session there")]
    SessionsFrom { provider: String, owner: String },
    #[error(transparent)]
    BadKey(#[from] BadKey),
    #[error("provider `{0}` is of kind \"static\": its sessions hold one key (--access-token), never refreshed, with no refresh token or expiry")]
    StoredKey(String),
    #[error("provider `{provider}` takes {wanted}")]
    WrongCredential {
        provider: String,
        wanted: &'static str,
    },
    #[error("the access token is empty")]
    EmptyToken,
    /// The client is over its budget of store reads for uncached keys.
    #[error("too many lookups of uncached session keys from this client")]
    ColdBudget { retry_after_secs: u64 },
}

/// What `session add` answers; the key is shown this once.
#[derive(Debug)]
pub struct Added {
    pub id: String,
    pub provider: String,
    pub key: SessionKey,
    /// `true` when `--key` named an existing session whose tokens were replaced.
    pub replaced: bool,
}

/// A session's metadata: never a token or a key.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub id: String,
    pub provider: String,
    pub label: Option<String>,
    pub status: Status,
    /// Why it is not `active`: the class of the last failed refresh
    /// (`token_endpoint_timeout`, ...; `invalid_grant` or `invalid_client`
    /// when it needs reauthorization). Never a token or an endpoint's answer.
    pub last_error: Option<String>,
    /// While `refresh_failing`: when the refresh is tried again (RFC 3339).
    pub next_retry_at: Option<String>,
    /// RFC 3339, or null when the provider gave no lifetime.
    pub expires_at: Option<String>,
    pub last_refresh_at: Option<String>,
    /// When a request last used it (RFC 3339; written up to
    /// `store.use_flush_interval` late), or null if none has.
    pub last_used_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z).
const MAX_RFC3339: i64 = 253_402_300_799;

/// Unix seconds as RFC 3339 UTC, clamped to what it can show.
pub fn rfc3339(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(unix.clamp(0, MAX_RFC3339) as u64);
    let mut out = String::new();
    // humantime's Display cannot fail within its range; never panic on a stored value.
    if std::fmt::Write::write_fmt(
        &mut out,
        format_args!("{}", humantime::format_rfc3339_seconds(t)),
    )
    .is_err()
    {
        out = "9999-12-31T23:59:59Z".to_owned();
    }
    out
}

impl From<&SessionRecord> for SessionInfo {
    fn from(r: &SessionRecord) -> SessionInfo {
        SessionInfo {
            id: r.id.clone(),
            provider: r.provider.clone(),
            label: r.label.clone(),
            status: r.status,
            last_error: r.last_error.clone(),
            next_retry_at: r.next_retry_at.map(rfc3339),
            expires_at: r.expires_at.map(rfc3339),
            last_refresh_at: r.last_refresh_at.map(rfc3339),
            last_used_at: r.last_used_at.map(rfc3339),
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
        }
    }
}

/// Who revoked a session, as the `session.revoked` event says (`detail.by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokedBy {
    Cli,
    Admin,
    Ui,
}

impl RevokedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            RevokedBy::Cli => "cli",
            RevokedBy::Admin => "admin",
            RevokedBy::Ui => "ui",
        }
    }
}

impl From<cold::Spent> for SessionError {
    fn from(spent: cold::Spent) -> SessionError {
        SessionError::ColdBudget {
            retry_after_secs: spent.retry_after_secs,
        }
    }
}

/// Sessions: lookups for the hot path and changes for the control plane,
/// over the parts listed in the module's doc comment.
pub struct Sessions {
    store: Arc<dyn Store>,
    providers: HashMap<String, ProviderConfig>,
    /// `[notify]` is configured: changes append events to the outbox.
    notify: bool,
    vault: Vault,
    cache: SessionCache,
    cold: ColdBudget,
    uses: Uses,
    counts: RequestCounts,
    rates: KeyRates,
}

impl Sessions {
    pub fn new(store: Arc<dyn Store>, sealer: Sealer, config: &Config) -> Sessions {
        Sessions {
            store,
            providers: config
                .providers
                .iter()
                .map(|p| (p.name.clone(), p.clone()))
                .collect(),
            notify: config.notify.is_some(),
            vault: Vault::new(LiveRing::new(sealer, config.store.key.clone())),
            cache: SessionCache::new(config.store.session_cache_capacity),
            cold: ColdBudget::new(config.store.cold_lookups_per_client),
            uses: Uses::default(),
            counts: RequestCounts::default(),
            rates: KeyRates::default(),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The cache of sessions and of unknown keys.
    pub fn cache(&self) -> &SessionCache {
        &self.cache
    }

    /// The budget of cold lookups per client.
    pub fn cold(&self) -> &ColdBudget {
        &self.cold
    }

    /// The sessions' recent uses.
    pub fn uses(&self) -> &Uses {
        &self.uses
    }

    /// Sealing and opening tokens.
    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// The sealing ring as this process knows it now.
    pub fn sealer(&self) -> Arc<Sealer> {
        self.vault.sealer()
    }

    /// Store reads by key hash so far ([`SessionCache::key_reads`]).
    pub fn key_reads(&self) -> u64 {
        self.cache.key_reads()
    }

    /// Session rows the use flusher has written so far ([`Uses::writes`]).
    pub fn use_writes(&self) -> u64 {
        self.uses.writes()
    }

    /// An audit row about a change, chained under the primary key of the
    /// ring as this process knows it now.
    pub fn audit(
        &self,
        kind: &str,
        session_id: Option<&str>,
        actor: Actor,
        detail: serde_json::Value,
    ) -> AuditAppend {
        AuditAppend::new(
            AuditEntry::new(kind, session_id, actor, detail),
            AuditSigner::of(&self.sealer()),
        )
    }

    /// Appends an audit row in a transaction of its own.
    pub async fn record(
        &self,
        kind: &str,
        session_id: Option<&str>,
        actor: Actor,
        detail: serde_json::Value,
    ) -> Result<i64, StoreError> {
        self.store
            .append_audit(&self.audit(kind, session_id, actor, detail))
            .await
    }

    /// An event for the outbox about session `id`, or `None` without
    /// `[notify]` (then nothing is written). `detail` never holds a token,
    /// key or secret.
    pub fn event(
        &self,
        kind: EventKind,
        id: &str,
        provider: &str,
        detail: serde_json::Value,
    ) -> Option<NewEvent> {
        self.notify
            .then(|| NewEvent::new(kind, id, provider, store::now(), detail))
    }

    /// The session a key names, from the cache or else the store, with no
    /// budget of cold lookups (the CLI, tests, benches).
    pub async fn by_key(&self, hash: &KeyHash) -> Result<Option<Arc<Keyed>>, SessionError> {
        self.by_key_from(hash, None).await
    }

    /// The session a key presented by `client` names, with what the key
    /// may do: from the cache, or
    /// `None` at once when the store said lately that the key does not
    /// exist, or else from the store (one indexed read), charged to the
    /// client's budget of cold lookups ([`SessionError::ColdBudget`] over it).
    pub async fn by_key_from(
        &self,
        hash: &KeyHash,
        client: Option<IpAddr>,
    ) -> Result<Option<Arc<Keyed>>, SessionError> {
        if let Some(s) = self.cache.get(hash) {
            return Ok(Some(s));
        }
        if self.cache.answer_absent(hash) {
            return Ok(None);
        }
        if let Some(client) = client {
            self.cold.admit(client)?;
        }
        // Boxed: the store read's future is large, and it would otherwise
        // be part of every request's future (and of every copy of it), for
        // the few requests that miss the cache.
        Box::pin(self.read_key(hash)).await
    }

    /// The store's read of a key the cache does not know.
    async fn read_key(&self, hash: &KeyHash) -> Result<Option<Arc<Keyed>>, SessionError> {
        let ticket = self.cache.ticket_for_key_read();
        // Bounded: a store that cannot answer in time is unavailable for
        // this request (503 `store_unavailable`), not a wait for the caller.
        let Some((rec, key)) = store::within(self.store.session_for_key(hash)).await? else {
            self.cache.remember_absent(*hash, ticket);
            return Ok(None);
        };
        self.vault.know_keys_of(&rec).await;
        let scope = Scope::of(&key, &self.rates).map_err(|e| {
            tracing::error!(key_id = %key.key_id, error = %e, "a stored key's scope cannot be read");
            SessionError::Store(StoreError::Corrupt(key.key_id.clone()))
        })?;
        let keyed = Arc::new(Keyed {
            session: Arc::new(self.activate(&rec)?),
            grant: Arc::new(Grant::new(key.key_id, scope)),
        });
        self.cache.fill_key(*hash, &keyed, ticket);
        Ok(Some(keyed))
    }

    /// The session with this id (a provider's `default_session`), cached likewise.
    pub async fn by_id(&self, id: &str) -> Result<Option<Arc<ActiveSession>>, SessionError> {
        if let Some(s) = self.cache.get_by_id(id) {
            return Ok(Some(s));
        }
        let ticket = self.cache.ticket();
        let Some(rec) = store::within(self.store.session_by_id(id)).await? else {
            return Ok(None);
        };
        self.vault.know_keys_of(&rec).await;
        let active = Arc::new(self.activate(&rec)?);
        self.cache.fill_id(&active, ticket);
        Ok(Some(active))
    }

    fn activate(&self, rec: &SessionRecord) -> Result<ActiveSession, SessionError> {
        let provider = self
            .providers
            .get(&rec.provider)
            .ok_or_else(|| SessionError::UnknownProvider(rec.provider.clone()))?;
        let access = self.vault.access_token(rec)?;
        Ok(ActiveSession {
            id: rec.id.clone(),
            provider: rec.provider.clone(),
            status: rec.status,
            credentials: Credentials::new(provider, &access)?,
            expires_at: rec.expires_at,
            version: rec.version,
            has_refresh_token: rec.refresh_token.is_some(),
            last_used: AtomicI64::new(0),
            requests: self.counts.counter(&rec.id),
        })
    }

    /// Puts a row just written (or read) by a refresh in the cache and
    /// returns it ready for use. `generation`
    /// ([`SessionCache::generation`]) was read before the row: if anything
    /// was invalidated since (a revocation, say), the row is used for this
    /// request only and not cached ([`SessionCache::install`]).
    pub fn install(
        &self,
        rec: &SessionRecord,
        generation: u64,
    ) -> Result<Arc<ActiveSession>, SessionError> {
        let active = Arc::new(self.activate(rec)?);
        self.cache.install(&active, generation);
        Ok(active)
    }

    /// A row committed by a background refresh nobody waits for (idle
    /// refresh), ready for use but not cached: a cached copy of the old
    /// tokens is dropped instead, and a lookup racing the commit discards
    /// the row it read. The next request reads the new row.
    pub fn uncached(&self, rec: &SessionRecord) -> Result<Arc<ActiveSession>, SessionError> {
        let active = Arc::new(self.activate(rec)?);
        self.cache.invalidate(&rec.id);
        Ok(active)
    }

    /// Notes that a request used `session`: its request count (one atomic
    /// increment) and its last use ([`Uses::note`]).
    #[inline]
    pub fn note_use(&self, session: &ActiveSession, now: i64) {
        session.requests.fetch_add(1, Ordering::Relaxed);
        self.uses.note(session, now);
    }

    /// Notes that a request presented `grant`'s key ([`Uses::note_key`]).
    #[inline]
    pub fn note_key_use(&self, grant: &Grant, now: i64) {
        self.uses.note_key(grant, now);
    }

    /// Flushes the recorded uses and request counts every `every` until
    /// `stop` resolves (started by `server::start`; `Running::wait` flushes
    /// once more after the last request). Store errors are logged and the
    /// uses kept for the next flush.
    pub async fn write_last_uses(
        self: Arc<Self>,
        every: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self
                .uses
                .flush(self.store.as_ref(), store::now() - uses::USE_FLUSH_LAG_SECS)
                .await
            {
                tracing::warn!(error = %e, "cannot write the sessions' last use; retrying at the next flush");
            }
            if let Err(e) = self.flush_request_counts(store::now(), false).await {
                tracing::warn!(error = %e, "cannot write the request counts to the audit trail; retrying at the next flush");
            }
        }
    }

    /// The last flush, at shutdown: every use recorded so far, and the
    /// request counts of the hour under way.
    pub async fn flush_all_uses(&self) {
        if let Err(e) = self.uses.flush(self.store.as_ref(), i64::MAX).await {
            tracing::warn!(error = %e, "cannot write the sessions' last use at shutdown");
        }
        if let Err(e) = self.flush_request_counts(store::now(), true).await {
            tracing::warn!(error = %e, "cannot write the request counts to the audit trail at shutdown");
        }
    }

    /// Appends a `session.requests` row (`{"hour", "count"}`) for every
    /// session and hour that is over (with `partial`, the hour under way
    /// too: a graceful shutdown), as [`RequestCounts::harvest`] gives them.
    /// Called by the use flusher, so a request is counted in the hour of
    /// the flush that collects it (up to one `store.use_flush_interval`
    /// late); a crash loses the counts not yet written (the hour under
    /// way). On a store error the counts are kept for the next call.
    /// Returns how many rows were appended.
    async fn flush_request_counts(&self, now: i64, partial: bool) -> Result<usize, StoreError> {
        let hour = counts::hour_of(now);
        let mut written = 0;
        for ((id, h), n) in self.counts.harvest(now, partial) {
            let mut detail = serde_json::json!({"hour": rfc3339(h), "count": n});
            if partial && h == hour {
                detail["partial"] = serde_json::Value::Bool(true);
            }
            self.record(
                audit::kind::SESSION_REQUESTS,
                Some(&id),
                Actor::Server,
                detail,
            )
            .await?;
            self.counts.written(id, h, n);
            written += 1;
        }
        Ok(written)
    }
}

#[cfg(test)]
mod lifetime_tests {
    use super::vault::MAX_LIFETIME_SECS;
    use super::*;

    #[test]
    fn absurd_dates_are_shown_not_panicked_on() {
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00Z");
        assert!(store::now() + (MAX_LIFETIME_SECS as i64) < MAX_RFC3339);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    async fn sessions(dir: &std::path::Path) -> Sessions {
        sessions_with(dir, "").await
    }

    /// Sessions on a SQLite store in `dir`, with `store` lines in `[store]`.
    async fn sessions_with(dir: &std::path::Path, store: &str) -> Sessions {
        let text = format!(
            r#"
            [store]
            {store}
            [providers.spark]
            kind = "spark"
            api_base = "https://sparkapi.com"
            client_id = "c"
            client_secret = "s"
        "#
        );
        let config = Config::parse(&text, std::path::Path::new("t"), |_| None).expect("config");
        let store = store::open(&format!("sqlite://{}", dir.join("t.db").display()))
            .await
            .expect("store");
        Sessions::new(store, Sealer::from_key(&[3; 32]), &config)
    }

    fn seed_tokens(i: usize) -> NewTokens {
        NewTokens {
            access_token: SecretString::from(format!("at-{i}")),
            refresh_token: Some(SecretString::from(format!("rt-{i}"))),
            expires_in: Some(3600),
        }
    }

    fn key_hash(i: usize) -> KeyHash {
        KeyHash::of(format!("unit-key-{i:06}").as_bytes())
    }

    #[tokio::test]
    async fn the_cache_stays_at_its_cap_and_an_evicted_session_costs_one_read() {
        let dir = tempfile::tempdir().expect("dir");
        let s = sessions_with(dir.path(), "session_cache_capacity = 100").await;
        let ids = s
            .add_many(
                "spark",
                (0..400).map(|i| (key_hash(i), seed_tokens(i))).collect(),
                Actor::Cli,
            )
            .await
            .expect("add many");
        assert_eq!(ids.len(), 400);
        for (i, id) in ids.iter().enumerate() {
            let found = s
                .by_key(&key_hash(i))
                .await
                .expect("lookup")
                .expect("found");
            assert_eq!(&found.id, id);
            let (cached, _) = s.cache().sizes();
            assert!(cached <= 100, "{cached} cached with a cap of 100");
        }
        assert_eq!(s.key_reads(), 400);
        // The index follows the cache exactly: evicted sessions left it.
        assert_eq!(s.cache().indexed(), s.cache().sizes().0);
        let evicted = (0..400)
            .find(|i| s.cache().get(&key_hash(*i)).is_none())
            .expect("some session was evicted");
        let reads = s.key_reads();
        let again = s
            .by_key(&key_hash(evicted))
            .await
            .expect("lookup")
            .expect("an evicted session still works");
        assert_eq!(again.id, ids[evicted]);
        assert_eq!(s.key_reads(), reads + 1, "exactly one store read");
        s.by_key(&key_hash(evicted)).await.expect("lookup");
        assert_eq!(s.key_reads(), reads + 1, "cached again");
        // An invalidation finds the cached copy through the index.
        s.cache().invalidate(&ids[evicted]);
        assert!(s.cache().get(&key_hash(evicted)).is_none());
        assert_eq!(s.cache().indexed(), s.cache().sizes().0);
        s.cache().sweep_index();
        assert_eq!(s.cache().indexed(), s.cache().sizes().0);
    }

    #[tokio::test]
    async fn an_unknown_key_is_read_once_and_works_at_once_when_added_here() {
        let dir = tempfile::tempdir().expect("dir");
        let s = sessions(dir.path()).await;
        let key =
            SessionKey::chosen(SecretString::from("unit-later-key-0001".to_owned())).expect("key");
        let hash = key.hash();
        assert!(s.by_key(&hash).await.expect("lookup").is_none());
        assert_eq!(s.key_reads(), 1);
        for _ in 0..5 {
            assert!(s.by_key(&hash).await.expect("lookup").is_none());
        }
        assert_eq!(s.key_reads(), 1, "the negative cache answered");
        assert_eq!(s.cache().absent_hits(), 5);
        s.add("spark", seed_tokens(1), None, Some(key), Actor::Cli)
            .await
            .expect("add");
        assert!(!s.cache().known_absent(&hash));
        assert!(s.by_key(&hash).await.expect("lookup").is_some());
        assert_eq!(s.key_reads(), 2);
        // A revoked key is unknown again, then remembered as such.
        let id = s
            .by_key(&hash)
            .await
            .expect("lookup")
            .expect("found")
            .id
            .clone();
        s.revoke(&id).await.expect("revoke");
        assert!(s.by_key(&hash).await.expect("lookup").is_none());
        assert!(s.by_key(&hash).await.expect("lookup").is_none());
        assert_eq!(s.key_reads(), 3);
    }

    #[tokio::test]
    async fn cold_lookups_are_budgeted_per_client_and_cached_keys_are_free() {
        let dir = tempfile::tempdir().expect("dir");
        let s = sessions_with(dir.path(), "cold_lookups_per_client = 5").await;
        let ids = s
            .add_many("spark", vec![(key_hash(0), seed_tokens(0))], Actor::Cli)
            .await
            .expect("add");
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let b: IpAddr = "127.0.0.3".parse().expect("ip");
        // The valid key, cached by a first (charged) lookup.
        assert_eq!(
            s.by_key_from(&key_hash(0), Some(a))
                .await
                .expect("ok")
                .expect("found")
                .id,
            ids[0]
        );
        for i in 1..5 {
            assert!(s
                .by_key_from(&key_hash(i), Some(a))
                .await
                .expect("ok")
                .is_none());
        }
        match s.by_key_from(&key_hash(99), Some(a)).await {
            Err(SessionError::ColdBudget { retry_after_secs }) => assert!(retry_after_secs >= 1),
            other => panic!(
                "expected the budget to be spent: {:?}",
                other.map(|o| o.is_some())
            ),
        }
        assert_eq!(s.key_reads(), 5);
        assert_eq!(s.cold().refusals(), 1);
        // Cached and known-absent keys cost nothing.
        for _ in 0..20 {
            assert!(s
                .by_key_from(&key_hash(0), Some(a))
                .await
                .expect("ok")
                .is_some());
            assert!(s
                .by_key_from(&key_hash(1), Some(a))
                .await
                .expect("ok")
                .is_none());
        }
        // Another client has its own budget; an IPv6 /64 counts as one.
        assert!(s
            .by_key_from(&key_hash(99), Some(b))
            .await
            .expect("ok")
            .is_none());
        assert_eq!(s.key_reads(), 6);
        assert_eq!(
            client_key("2001:db8::1".parse().expect("ip")),
            client_key("2001:db8::ffff".parse().expect("ip"))
        );
    }

    #[tokio::test]
    async fn request_counts_are_written_once_their_hour_is_over() {
        let dir = tempfile::tempdir().expect("dir");
        let s = sessions(dir.path()).await;
        let tokens = NewTokens {
            access_token: SecretString::from("a1".to_owned()),
            refresh_token: None,
            expires_in: None,
        };
        let added = s
            .add("spark", tokens, None, None, Actor::Cli)
            .await
            .expect("add");
        let active = s
            .by_key(&added.key.hash())
            .await
            .expect("lookup")
            .expect("found");
        let hour = 1_800_000_000 - 1_800_000_000 % COUNT_PERIOD_SECS;
        for _ in 0..3 {
            s.note_use(&active, hour + 10);
        }
        // Within the hour: counted, nothing written yet.
        assert_eq!(
            s.flush_request_counts(hour + 20, false)
                .await
                .expect("flush"),
            0
        );
        s.note_use(&active, hour + 30);
        // A copy cached anew counts into the same counter.
        s.cache().invalidate(&added.id);
        let again = s.by_id(&added.id).await.expect("lookup").expect("found");
        s.note_use(&again, hour + 40);
        assert_eq!(
            s.flush_request_counts(hour + 50, false)
                .await
                .expect("flush"),
            0
        );
        // The next hour: the last one is written, once.
        s.note_use(&again, hour + COUNT_PERIOD_SECS + 1);
        let later = hour + COUNT_PERIOD_SECS + 5;
        assert_eq!(
            s.flush_request_counts(later, false).await.expect("flush"),
            1
        );
        assert_eq!(
            s.flush_request_counts(later, false).await.expect("flush"),
            0
        );
        // A graceful shutdown writes the hour under way too.
        assert_eq!(s.flush_request_counts(later, true).await.expect("flush"), 1);
        let rows = s
            .store()
            .list_audit(&audit::AuditFilter {
                session_id: Some(added.id.clone()),
                since_ms: None,
                limit: 10,
            })
            .await
            .expect("list");
        let counts: Vec<serde_json::Value> = rows
            .iter()
            .filter(|r| r.kind == audit::kind::SESSION_REQUESTS)
            .map(|r| serde_json::from_str(&r.detail).expect("json"))
            .collect();
        assert_eq!(
            counts,
            vec![
                serde_json::json!({"hour": rfc3339(hour), "count": 5}),
                serde_json::json!({"hour": rfc3339(hour + COUNT_PERIOD_SECS), "count": 1, "partial": true}),
            ]
        );
    }
}
