//! Sessions as the rest of the program sees them: sealing and hashing on the
//! way into the store, opening on the way out, and the hot-path cache.
//!
//! The cache maps a key hash to an [`ActiveSession`] whose credentials are
//! already in their injected form, so a cached request does no store I/O and
//! no decryption. It holds only sessions that exist in the store, so it is
//! bounded by the store's size.
//!
//! **Invariant (coherence):** every change to a session, by this process or
//! another one sharing the store, drops the cached copy: directly for changes
//! made here, and through [`Sessions::follow_changes`] polling the store's
//! change log for changes made elsewhere (revocations take effect within one
//! poll interval, at most 2 s). A lookup that raced a change never caches the
//! stale row: fills are discarded when an invalidation happened meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use secrecy::SecretString;
use serde::Serialize;

use crate::audit::{self, Actor, AuditAppend, AuditEntry, AuditSigner};
use crate::config::{Config, KeySource, ProviderConfig};
use crate::live::LiveRing;
use crate::provider::{Credentials, UnusableToken};
use crate::seal::{KeyError, OpenError, Sealer};
use crate::session::{new_session_id, BadKey, KeyHash, SessionKey, Status};
use crate::store::{
    self, EventKind, NewEvent, NewSession, SealedTokens, SessionRecord, Store, StoreError,
};

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
    #[error("the access token is empty")]
    EmptyToken,
}

/// Why the store and the sealing key could not be opened together. The
/// texts name what is missing and where, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store.url: cannot open {shown}: {reason}")]
    Store { shown: String, reason: StoreError },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{key} {path} does not exist, but the store ({store}) holds {sealed} session(s) sealed under the key it held, and a new key could not open them, so none is made. Restore the key file from your backup (or point {key} or store.key_env at the key). If the key is lost for good, so are the stored tokens: empty the store (delete its sessions, or start from a new database or SQLite file) and connect the accounts again; a new key is then made.")]
    KeyMissing {
        key: &'static str,
        path: String,
        store: String,
        sealed: i64,
    },
    #[error("the sealing key ({key}) does not open the stored sessions: session {session} in {store} was sealed under another key. The key was replaced, or belongs to another store: restore the key this store was sealed with.")]
    WrongKey {
        key: String,
        session: String,
        store: String,
    },
}

/// A session ready for the hot path.
#[derive(Debug)]
pub struct ActiveSession {
    pub id: String,
    pub provider: String,
    pub status: Status,
    pub credentials: Credentials,
    pub expires_at: Option<i64>,
    pub version: i64,
    pub has_refresh_token: bool,
    /// Unix seconds this cached copy was last used; throttles [`Sessions::note_use`].
    last_used: AtomicI64,
    /// The session's request counter, shared by its cached copies (see
    /// [`Sessions::flush_request_counts`]).
    requests: Arc<AtomicU64>,
}

impl ActiveSession {
    /// Whether the access token is within `margin` of its known expiry and
    /// can be refreshed. Tokens of unknown lifetime never are.
    pub fn due(&self, now: i64, margin: Duration) -> bool {
        self.has_refresh_token
            && self
                .expires_at
                .is_some_and(|at| now.saturating_add(margin.as_secs() as i64) >= at)
    }

    pub fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

/// Tokens handed to credproxy by an operator or a code exchange.
#[derive(Debug)]
pub struct NewTokens {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub expires_in: Option<u64>,
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

/// The longest token lifetime believed: a provider (or a hostile token
/// endpoint) announcing more gets this, so `expires_at` stays a date that
/// can be shown (and compared) without overflow.
pub const MAX_LIFETIME_SECS: u64 = 10 * 366 * 24 * 3600;

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

/// Associated data binding a sealed token to its session and field.
pub(crate) fn aad(id: &str, field: &str) -> Vec<u8> {
    format!("credproxy/{id}/{field}").into_bytes()
}

pub struct Sessions {
    store: Arc<dyn Store>,
    /// The ring, followed as other processes change it.
    ring: Arc<LiveRing>,
    providers: HashMap<String, ProviderConfig>,
    by_key: DashMap<KeyHash, Arc<ActiveSession>>,
    by_id: DashMap<String, Arc<ActiveSession>>,
    /// Bumped by every invalidation; a fill that saw it move is not cached.
    generation: AtomicU64,
    /// Session id -> unix seconds of its last use, for refresh-ahead, idle
    /// refresh and the store's `last_used_at`. Kept apart from the cache,
    /// which changes evict.
    recent: DashMap<String, i64>,
    /// Uses recorded at or after this (unix seconds) are not in the store
    /// yet (see [`Sessions::flush_uses`]); the lock keeps flushes apart.
    flushed_to: tokio::sync::Mutex<i64>,
    /// Session rows the flusher has written, for tests and logs.
    use_writes: AtomicU64,
    /// `[notify]` is configured: changes append events to the outbox.
    notify: bool,
    /// Session id -> requests counted since the last harvest (the hot
    /// path's one atomic increment; see [`Sessions::flush_request_counts`]).
    counters: DashMap<String, Arc<AtomicU64>>,
    /// Harvested counts not yet in the audit trail: (session id, hour
    /// start in unix seconds) -> requests.
    hours: std::sync::Mutex<HashMap<(String, i64), u64>>,
}

/// The period of the audit trail's request counts: an hour.
pub const COUNT_PERIOD_SECS: i64 = 3600;

/// A use stays in [`Sessions`]' memory this long (refresh-ahead counts a
/// session used this recently as in use); the store keeps it after that.
pub const RECENT_USE: Duration = Duration::from_secs(15 * 60);

/// Uses of the last seconds wait for the next flush: a request that read
/// the clock just before a flush may record its use just after it.
const USE_FLUSH_LAG_SECS: i64 = 2;

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

impl Sessions {
    pub fn new(store: Arc<dyn Store>, sealer: Sealer, config: &Config) -> Sessions {
        Sessions {
            store,
            ring: Arc::new(LiveRing::new(sealer, config.store.key.clone())),
            providers: config
                .providers
                .iter()
                .map(|p| (p.name.clone(), p.clone()))
                .collect(),
            by_key: DashMap::new(),
            by_id: DashMap::new(),
            generation: AtomicU64::new(0),
            recent: DashMap::new(),
            flushed_to: tokio::sync::Mutex::new(0),
            use_writes: AtomicU64::new(0),
            notify: config.notify.is_some(),
            counters: DashMap::new(),
            hours: std::sync::Mutex::new(HashMap::new()),
        }
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

    /// The sealing ring as this process knows it now.
    pub fn sealer(&self) -> Arc<Sealer> {
        self.ring.current()
    }

    /// The ring this process follows (see `secrets::live`).
    pub fn ring(&self) -> &Arc<LiveRing> {
        &self.ring
    }

    /// Makes sure the ring knows every key `rec`'s values are sealed under,
    /// reading it again if not (a value re-sealed by another process).
    pub async fn know_keys_of(&self, rec: &SessionRecord) {
        let mut sealed: Vec<&[u8]> = vec![&rec.access_token];
        sealed.extend(rec.refresh_token.as_deref());
        self.ring.know(&sealed).await;
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Opens the configured store and sealing key, and proves that they
    /// belong together: the newest stored session's access token must open.
    /// A key file is created only while the store holds no session (a new
    /// key could open none of them). Returns warnings for the operator (a
    /// key file others can read).
    pub async fn open(config: &Config) -> Result<(Sessions, Vec<String>), StartError> {
        use secrecy::ExposeSecret;
        let shown = config.store.shown_url();
        let in_store = |reason| StartError::Store {
            shown: shown.clone(),
            reason,
        };
        let store = store::open(config.store.url.expose_secret())
            .await
            .map_err(in_store)?;
        let mut warnings = Vec::new();
        let sealer = match (Sealer::load_existing(&config.store.key)?, &config.store.key) {
            (Some(sealer), _) => sealer,
            (None, KeySource::File(path)) => {
                let sealed: i64 = store
                    .count_sessions()
                    .await
                    .map_err(in_store)?
                    .iter()
                    .map(|c| c.count)
                    .sum();
                if sealed > 0 {
                    return Err(StartError::KeyMissing {
                        key: "store.key_file",
                        path: path.display().to_string(),
                        store: shown,
                        sealed,
                    });
                }
                Sealer::create_key_file(path)?
            }
            // An environment variable that is not set is an error of its own.
            (None, KeySource::Env(var)) => return Err(KeyError::EnvMissing(var.clone()).into()),
            // A command that printed nothing usable fails in load_existing.
            (None, KeySource::Command { .. }) => {
                return Err(KeyError::Command("printed no ring".to_owned()).into())
            }
        };
        if let KeySource::File(path) = &config.store.key {
            warnings.extend(crate::seal::key_file_warning(path));
        }
        if let Some(rec) = store.newest_session().await.map_err(in_store)? {
            if sealer
                .open(&rec.access_token, &aad(&rec.id, "access"))
                .is_err()
            {
                return Err(StartError::WrongKey {
                    key: config.store.key.describe(),
                    session: rec.id,
                    store: shown,
                });
            }
        }
        Ok((Sessions::new(store, sealer, config), warnings))
    }

    /// The session a key names, from the cache or else the store.
    pub async fn by_key(&self, hash: &KeyHash) -> Result<Option<Arc<ActiveSession>>, SessionError> {
        if let Some(s) = self.by_key.get(hash) {
            return Ok(Some(Arc::clone(s.value())));
        }
        let generation = self.generation.load(Ordering::Acquire);
        let Some(rec) = self.store.session_by_key(hash).await? else {
            return Ok(None);
        };
        self.know_keys_of(&rec).await;
        let active = Arc::new(self.activate(&rec)?);
        self.cache_if_unchanged(&self.by_key, *hash, &active, generation);
        Ok(Some(active))
    }

    /// The session with this id (a provider's `default_session`), cached likewise.
    pub async fn by_id(&self, id: &str) -> Result<Option<Arc<ActiveSession>>, SessionError> {
        if let Some(s) = self.by_id.get(id) {
            return Ok(Some(Arc::clone(s.value())));
        }
        let generation = self.generation.load(Ordering::Acquire);
        let Some(rec) = self.store.session_by_id(id).await? else {
            return Ok(None);
        };
        self.know_keys_of(&rec).await;
        let active = Arc::new(self.activate(&rec)?);
        self.cache_if_unchanged(&self.by_id, id.to_owned(), &active, generation);
        Ok(Some(active))
    }

    fn activate(&self, rec: &SessionRecord) -> Result<ActiveSession, SessionError> {
        let provider = self
            .providers
            .get(&rec.provider)
            .ok_or_else(|| SessionError::UnknownProvider(rec.provider.clone()))?;
        let access = self
            .sealer()
            .open(&rec.access_token, &aad(&rec.id, "access"))?;
        Ok(ActiveSession {
            id: rec.id.clone(),
            provider: rec.provider.clone(),
            status: rec.status,
            credentials: Credentials::new(provider, &access)?,
            expires_at: rec.expires_at,
            version: rec.version,
            has_refresh_token: rec.refresh_token.is_some(),
            last_used: AtomicI64::new(0),
            requests: Arc::clone(self.counters.entry(rec.id.clone()).or_default().value()),
        })
    }

    /// Puts a row just written (or read) by a refresh in the cache and
    /// returns it ready for use. `generation` was read before the row: if
    /// anything was invalidated since (a revocation, say), the row is used
    /// for this request only and not cached. The bump first makes lookups
    /// that read an older row discard their copy.
    pub fn install(
        &self,
        rec: &SessionRecord,
        generation: u64,
    ) -> Result<Arc<ActiveSession>, SessionError> {
        let active = Arc::new(self.activate(rec)?);
        let before = self.generation.fetch_add(1, Ordering::AcqRel);
        if before != generation {
            // Not cached (something was invalidated meanwhile), but an
            // older copy must not stay: requests would keep presenting the
            // tokens this refresh replaced, each refused and replayed.
            self.by_key
                .remove_if(&rec.key_hash, |_, cached| cached.version < rec.version);
            self.by_id
                .remove_if(&rec.id, |_, cached| cached.version < rec.version);
            return Ok(active);
        }
        self.cache_if_unchanged(&self.by_key, rec.key_hash, &active, before + 1);
        if self.by_id.contains_key(&rec.id) {
            self.cache_if_unchanged(&self.by_id, rec.id.clone(), &active, before + 1);
        }
        Ok(active)
    }

    /// A row committed by a background refresh nobody waits for (idle
    /// refresh), ready for use but not cached: a cached copy of the old
    /// tokens is dropped instead, and a lookup racing the commit discards
    /// the row it read (the bump). The next request reads the new row.
    pub fn uncached(&self, rec: &SessionRecord) -> Result<Arc<ActiveSession>, SessionError> {
        let active = Arc::new(self.activate(rec)?);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.by_key.remove(&rec.key_hash);
        self.by_id.remove(&rec.id);
        Ok(active)
    }

    /// The invalidation generation now; read it before reading a row that
    /// may be cached later.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches `active` unless an invalidation happened since `generation`
    /// was read, checking again after the insert (an invalidation may land
    /// between the check and the insert) and taking the entry back if so.
    fn cache_if_unchanged<K: std::hash::Hash + Eq + Clone>(
        &self,
        map: &DashMap<K, Arc<ActiveSession>>,
        key: K,
        active: &Arc<ActiveSession>,
        generation: u64,
    ) {
        if self.generation() != generation {
            return;
        }
        map.insert(key.clone(), Arc::clone(active));
        if self.generation() != generation {
            map.remove_if(&key, |_, cached| Arc::ptr_eq(cached, active));
        }
    }

    /// The session's refresh token, opened.
    pub fn refresh_token(&self, rec: &SessionRecord) -> Result<Option<SecretString>, SessionError> {
        rec.refresh_token
            .as_ref()
            .map(|sealed| self.sealer().open(sealed, &aad(&rec.id, "refresh")))
            .transpose()
            .map_err(SessionError::from)
    }

    /// Seals what a refresh returned; the old refresh token is kept when the
    /// provider sent no new one.
    pub fn seal_refreshed(
        &self,
        rec: &SessionRecord,
        tokens: &NewTokens,
        now: i64,
    ) -> SealedTokens {
        let mut sealed = self.seal_tokens(&rec.id, tokens, now);
        if sealed.refresh_token.is_none() {
            sealed.refresh_token = rec
                .refresh_token
                .as_ref()
                .map(|r| self.resealed(r, &aad(&rec.id, "refresh")));
        }
        sealed
    }

    /// A kept sealed value as it is written back: re-sealed under the
    /// primary key when it was sealed under another (or before key ids).
    fn resealed(&self, sealed: &[u8], aad: &[u8]) -> Vec<u8> {
        self.sealer()
            .reseal(sealed, aad)
            .unwrap_or_else(|| sealed.to_vec())
    }

    /// What a refresh stores when the endpoint answered an access token
    /// that cannot be sent: the refresh token it rotated (or the old one),
    /// and the old access token marked as having expired just before this
    /// refresh, so it is refreshed again at its next use.
    pub fn seal_unusable(
        &self,
        rec: &SessionRecord,
        refresh_token: Option<&SecretString>,
        now: i64,
    ) -> SealedTokens {
        SealedTokens {
            access_token: self.resealed(&rec.access_token, &aad(&rec.id, "access")),
            refresh_token: refresh_token
                .map(|r| self.sealer().seal(r, &aad(&rec.id, "refresh")))
                .or_else(|| {
                    rec.refresh_token
                        .as_ref()
                        .map(|r| self.resealed(r, &aad(&rec.id, "refresh")))
                }),
            expires_at: Some(now - 1),
        }
    }

    /// Notes that a request used `session`; the shared map is written at
    /// most once a second per cached copy, so busy sessions cost one atomic load.
    pub fn note_use(&self, session: &ActiveSession, now: i64) {
        session.requests.fetch_add(1, Ordering::Relaxed);
        if session.last_used.load(Ordering::Relaxed) != now {
            session.last_used.store(now, Ordering::Relaxed);
            self.recent.insert(session.id.clone(), now);
        }
    }

    /// Ids of sessions used at or after `since` (unix seconds); older
    /// entries are forgotten.
    pub fn used_since(&self, since: i64) -> Vec<String> {
        self.recent.retain(|_, at| *at >= since);
        self.recent.iter().map(|e| e.key().clone()).collect()
    }

    pub fn forget_use(&self, id: &str) {
        self.recent.remove(id);
    }

    /// When this process last saw session `id` used, if within [`RECENT_USE`].
    pub fn last_use(&self, id: &str) -> Option<i64> {
        self.recent.get(id).map(|at| *at)
    }

    /// Writes the uses recorded since the last flush and before `until`
    /// (unix seconds) to the store's `last_used_at`, in one batch
    /// ([`Store::note_uses`]): each session at most once, whatever number
    /// of requests used it. The hot path only ever touches memory
    /// ([`Sessions::note_use`]). On a store error nothing is forgotten: the
    /// next flush writes the same uses (if newer, newer ones). Returns how
    /// many sessions were written.
    pub async fn flush_uses(&self, until: i64) -> Result<usize, StoreError> {
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
        if !uses.is_empty() {
            self.store.note_uses(&uses).await?;
            self.use_writes
                .fetch_add(uses.len() as u64, Ordering::Relaxed);
            tracing::debug!(sessions = uses.len(), "wrote the sessions' last use");
        }
        *from = until;
        // What is written and older than refresh-ahead looks at is kept by
        // the store alone.
        let keep = until.min(store::now() - RECENT_USE.as_secs() as i64);
        self.recent.retain(|_, at| *at >= keep);
        Ok(uses.len())
    }

    /// Session rows [`Sessions::flush_uses`] has written so far.
    pub fn use_writes(&self) -> u64 {
        self.use_writes.load(Ordering::Relaxed)
    }

    /// Flushes the recorded uses every `every` until `stop` resolves
    /// (started by `server::start`; `Running::wait` flushes once more after
    /// the last request). Store errors are logged and the uses kept for the
    /// next flush.
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
            if let Err(e) = self.flush_uses(store::now() - USE_FLUSH_LAG_SECS).await {
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
        if let Err(e) = self.flush_uses(i64::MAX).await {
            tracing::warn!(error = %e, "cannot write the sessions' last use at shutdown");
        }
        if let Err(e) = self.flush_request_counts(store::now(), true).await {
            tracing::warn!(error = %e, "cannot write the request counts to the audit trail at shutdown");
        }
    }

    /// Moves the requests counted since the last call into the hour of
    /// `now`, and appends a `session.requests` row (`{"hour", "count"}`)
    /// for every session and hour that is over (with `partial`, the hour
    /// under way too: a graceful shutdown). Called by the use flusher, so a
    /// request is counted in the hour of the flush that collects it (up to
    /// one `store.use_flush_interval` late); a crash loses the counts not
    /// yet written (the hour under way). On a store error the counts are
    /// kept for the next call. Returns how many rows were appended.
    pub async fn flush_request_counts(&self, now: i64, partial: bool) -> Result<usize, StoreError> {
        let hour = now - now.rem_euclid(COUNT_PERIOD_SECS);
        {
            let mut hours = self.hours.lock().unwrap_or_else(|e| e.into_inner());
            self.counters.retain(|id, counter| {
                let n = counter.swap(0, Ordering::Relaxed);
                if n > 0 {
                    *hours.entry((id.clone(), hour)).or_default() += n;
                }
                // Kept while a cached copy may still count into it.
                n > 0 || Arc::strong_count(counter) > 1
            });
        }
        let due: Vec<((String, i64), u64)> = {
            let hours = self.hours.lock().unwrap_or_else(|e| e.into_inner());
            hours
                .iter()
                .filter(|((_, h), _)| partial || *h < hour)
                .map(|(k, n)| (k.clone(), *n))
                .collect()
        };
        let mut written = 0;
        for ((id, h), n) in due {
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
            let mut hours = self.hours.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(left) = hours.get_mut(&(id.clone(), h)) {
                *left -= n.min(*left);
                if *left == 0 {
                    hours.remove(&(id, h));
                }
            }
            written += 1;
        }
        Ok(written)
    }

    fn seal_tokens(&self, id: &str, tokens: &NewTokens, now: i64) -> SealedTokens {
        // Seal under the primary of the key file as it is now, not as it
        // was at start-up (`key rotate` may have run since).
        self.ring.follow_file();
        let sealer = self.sealer();
        SealedTokens {
            access_token: sealer.seal(&tokens.access_token, &aad(id, "access")),
            refresh_token: tokens
                .refresh_token
                .as_ref()
                .map(|r| sealer.seal(r, &aad(id, "refresh"))),
            expires_at: tokens
                .expires_in
                .map(|s| now.saturating_add(s.min(MAX_LIFETIME_SECS) as i64)),
        }
    }

    /// Stores a session for tokens obtained elsewhere. With a chosen `key`
    /// that already names a session of the same provider, that session's
    /// tokens are replaced and its id kept, so applications need no change.
    pub async fn add(
        &self,
        provider: &str,
        tokens: NewTokens,
        label: Option<String>,
        key: Option<SessionKey>,
        actor: Actor,
    ) -> Result<Added, SessionError> {
        let key = key.unwrap_or_else(SessionKey::generate);
        let (id, replaced) = self
            .add_hashed(provider, tokens, label, key.hash(), actor)
            .await?;
        Ok(Added {
            id,
            provider: provider.to_owned(),
            key,
            replaced,
        })
    }

    /// [`Sessions::add`] for a key known only by its hash (one chosen by
    /// `credproxy connect`, which shows the key itself). Returns the session
    /// id and whether an existing session's tokens were replaced.
    pub async fn add_hashed(
        &self,
        provider: &str,
        tokens: NewTokens,
        label: Option<String>,
        hash: KeyHash,
        actor: Actor,
    ) -> Result<(String, bool), SessionError> {
        self.check_tokens(provider, &tokens)?;
        let now = store::now();
        if let Some(existing) = self.store.session_by_key(&hash).await? {
            if existing.provider != provider {
                return Err(SessionError::KeyOfOtherProvider(existing.provider));
            }
            self.replace(&existing.id, provider, tokens, actor).await?;
            return Ok((existing.id, true));
        }
        let id = new_session_id();
        let sealed = self.seal_tokens(&id, &tokens, now);
        let event = self.event(
            EventKind::Connected,
            &id,
            provider,
            serde_json::json!({"reconnected": false}),
        );
        // A connect flow connects an account; `session add` and the admin
        // API store tokens obtained elsewhere.
        let kind = match actor {
            Actor::Connect => audit::kind::SESSION_CONNECTED,
            _ => audit::kind::SESSION_CREATED,
        };
        let audit = self.audit(
            kind,
            Some(&id),
            actor,
            serde_json::json!({"provider": provider}),
        );
        self.store
            .insert_session(
                NewSession {
                    id: id.clone(),
                    provider: provider.to_owned(),
                    label,
                    key_hash: hash,
                    tokens: sealed,
                    now,
                },
                event.as_ref(),
                Some(&audit),
            )
            .await?;
        Ok((id, false))
    }

    /// Replaces the tokens of session `id` (a reconnect, or `add --key`),
    /// keeping its key, and makes it active again: a `session.connected`
    /// event with `reconnected: true`.
    pub async fn replace(
        &self,
        id: &str,
        provider: &str,
        tokens: NewTokens,
        actor: Actor,
    ) -> Result<(), SessionError> {
        self.check_tokens(provider, &tokens)?;
        let existing = self
            .store
            .session_by_id(id)
            .await?
            .ok_or_else(|| SessionError::NotFound(id.to_owned()))?;
        if existing.provider != provider {
            return Err(SessionError::KeyOfOtherProvider(existing.provider));
        }
        let now = store::now();
        let sealed = self.seal_tokens(id, &tokens, now);
        let event = self.event(
            EventKind::Connected,
            id,
            provider,
            serde_json::json!({"reconnected": true}),
        );
        let audit = self.audit(
            audit::kind::SESSION_RECONNECTED,
            Some(id),
            actor,
            serde_json::json!({"provider": provider}),
        );
        self.store
            .replace_tokens(id, sealed, None, now, event.as_ref(), Some(&audit))
            .await?
            .ok_or_else(|| SessionError::NotFound(id.to_owned()))?;
        self.invalidate(id);
        Ok(())
    }

    fn check_tokens(&self, provider: &str, tokens: &NewTokens) -> Result<(), SessionError> {
        use secrecy::ExposeSecret;
        let provider_cfg = self
            .providers
            .get(provider)
            .ok_or_else(|| SessionError::UnknownProvider(provider.to_owned()))?;
        if let Some(owner) = &provider_cfg.sessions_from {
            return Err(SessionError::SessionsFrom {
                provider: provider.to_owned(),
                owner: owner.clone(),
            });
        }
        if tokens.access_token.expose_secret().is_empty() {
            return Err(SessionError::EmptyToken);
        }
        // Refuse tokens that could never be injected, now rather than per
        // request: the same rule as for a token endpoint's answer.
        if !crate::token::usable_access_token(provider_cfg, &tokens.access_token) {
            return Err(UnusableToken.into());
        }
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<SessionInfo>, SessionError> {
        Ok(self
            .store
            .list_sessions()
            .await?
            .iter()
            .map(SessionInfo::from)
            .collect())
    }

    pub async fn info(&self, id: &str) -> Result<Option<SessionInfo>, SessionError> {
        Ok(self
            .store
            .session_by_id(id)
            .await?
            .as_ref()
            .map(SessionInfo::from))
    }

    /// Deletes a session; its key stops working here at once and in other
    /// processes within one change-poll interval. With `[notify]`, a
    /// `session.revoked` event says who did (`by`).
    pub async fn revoke_by(&self, id: &str, by: RevokedBy) -> Result<bool, SessionError> {
        let event = match self.notify {
            true => match self.store.session_by_id(id).await? {
                Some(rec) => self.event(
                    EventKind::Revoked,
                    id,
                    &rec.provider,
                    serde_json::json!({"by": by.as_str()}),
                ),
                None => return Ok(false),
            },
            false => None,
        };
        let actor = match by {
            RevokedBy::Cli => Actor::Cli,
            RevokedBy::Admin => Actor::Admin,
            RevokedBy::Ui => Actor::Ui,
        };
        let audit = self.audit(
            audit::kind::SESSION_REVOKED,
            Some(id),
            actor,
            serde_json::json!({}),
        );
        let deleted = self
            .store
            .delete_session(id, store::now(), event.as_ref(), Some(&audit))
            .await?;
        self.invalidate(id);
        Ok(deleted)
    }

    /// [`Sessions::revoke_by`] with [`RevokedBy::Admin`]: the admin API's
    /// `DELETE /admin/sessions/{id}`.
    pub async fn revoke(&self, id: &str) -> Result<bool, SessionError> {
        self.revoke_by(id, RevokedBy::Admin).await
    }

    /// Drops every cached copy of session `id`.
    pub fn invalidate(&self, id: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.by_id.remove(id);
        self.by_key.retain(|_, s| s.id != id);
    }

    pub fn cached(&self) -> usize {
        self.by_key.len() + self.by_id.len()
    }

    /// Follows the store's change log until `stop` resolves, dropping cached
    /// sessions that another process changed. Store errors are logged and
    /// retried on the next tick; the cache keeps serving meanwhile.
    pub async fn follow_changes(
        self: Arc<Self>,
        every: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut cursor = loop {
            match self.store.change_cursor().await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the store's change log; retrying");
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(every) => {}
                    }
                }
            }
        };
        let mut polls: u64 = 0;
        loop {
            tokio::select! {
                () = &mut stop => return,
                notified = self.store.wait_for_change(every) => {
                    for id in notified {
                        self.invalidate(&id);
                    }
                }
            }
            match self.store.changes_since(cursor).await {
                Ok((next, ids)) => {
                    cursor = next;
                    for id in ids {
                        tracing::debug!(session = %id, "session changed in the store; dropping cached copy");
                        self.invalidate(&id);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the store's change log"),
            }
            polls += 1;
            // Keep the change log short: an hour is far longer than any poll gap.
            if polls.is_multiple_of(1200) {
                if let Err(e) = self.store.prune_changes(store::now() - 3600).await {
                    tracing::warn!(error = %e, "cannot prune the store's change log");
                }
            }
        }
    }
}

#[cfg(test)]
mod lifetime_tests {
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
    use secrecy::ExposeSecret;

    async fn sessions(dir: &std::path::Path) -> Sessions {
        let text = r#"
            [providers.spark]
            kind = "spark"
            api_base = "https://sparkapi.com"
            client_id = "c"
            client_secret = "s"
        "#;
        let config = Config::parse(text, std::path::Path::new("t"), |_| None).expect("config");
        let store = store::open(&format!("sqlite://{}", dir.join("t.db").display()))
            .await
            .expect("store");
        Sessions::new(store, Sealer::from_key(&[3; 32]), &config)
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
        s.invalidate(&added.id);
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

    #[tokio::test]
    async fn a_refresh_without_a_new_refresh_token_keeps_the_old_one() {
        let dir = tempfile::tempdir().expect("dir");
        let s = sessions(dir.path()).await;
        let tokens = |a: &str, r: Option<&str>| NewTokens {
            access_token: SecretString::from(a.to_owned()),
            refresh_token: r.map(|r| SecretString::from(r.to_owned())),
            expires_in: Some(60),
        };
        let added = s
            .add("spark", tokens("a1", Some("r1")), None, None, Actor::Cli)
            .await
            .expect("add");
        let rec = s
            .store()
            .session_by_id(&added.id)
            .await
            .expect("read")
            .expect("row");
        let sealed = s.seal_refreshed(&rec, &tokens("a2", None), store::now());
        let mut rec2 = rec.clone();
        rec2.access_token = sealed.access_token;
        rec2.refresh_token = sealed.refresh_token;
        assert_eq!(
            s.refresh_token(&rec2)
                .expect("open")
                .expect("kept")
                .expose_secret(),
            "r1"
        );
        let sealed = s.seal_refreshed(&rec, &tokens("a3", Some("r3")), store::now());
        rec2.refresh_token = sealed.refresh_token;
        assert_eq!(
            s.refresh_token(&rec2)
                .expect("open")
                .expect("new")
                .expose_secret(),
            "r3"
        );
    }

    #[tokio::test]
    async fn tokens_sealed_before_key_ids_open_and_are_resealed_when_written() {
        let dir = tempfile::tempdir().expect("dir");
        let s = sessions(dir.path()).await;
        let added = s
            .add(
                "spark",
                NewTokens {
                    access_token: SecretString::from("a1".to_owned()),
                    refresh_token: Some(SecretString::from("r1".to_owned())),
                    expires_in: Some(60),
                },
                None,
                None,
                Actor::Cli,
            )
            .await
            .expect("add");
        let mut rec = s
            .store()
            .session_by_id(&added.id)
            .await
            .expect("read")
            .expect("row");
        // As a row written before key ids existed holds them.
        rec.access_token = crate::seal::seal_legacy(&[3; 32], "a1", &aad(&rec.id, "access"));
        rec.refresh_token = Some(crate::seal::seal_legacy(
            &[3; 32],
            "r1",
            &aad(&rec.id, "refresh"),
        ));
        assert_eq!(
            s.refresh_token(&rec)
                .expect("open")
                .expect("kept")
                .expose_secret(),
            "r1"
        );
        let fresh = NewTokens {
            access_token: SecretString::from("a2".to_owned()),
            refresh_token: None,
            expires_in: Some(60),
        };
        let sealed = s.seal_refreshed(&rec, &fresh, store::now());
        let kept = sealed.refresh_token.expect("kept");
        assert_eq!(
            crate::seal::sealed_key_id(&kept),
            Some(s.sealer().primary_id())
        );
        assert_eq!(
            crate::seal::sealed_key_id(&sealed.access_token),
            Some(s.sealer().primary_id())
        );
        let unusable = s.seal_unusable(&rec, None, store::now());
        assert!(s.sealer().is_current(&unusable.access_token));
        assert!(s
            .sealer()
            .is_current(unusable.refresh_token.as_deref().expect("kept")));
        let mut rec2 = rec.clone();
        rec2.refresh_token = Some(kept);
        assert_eq!(
            s.refresh_token(&rec2)
                .expect("open")
                .expect("kept")
                .expose_secret(),
            "r1"
        );
    }
}
