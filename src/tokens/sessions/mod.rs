//! Sessions as the rest of the program sees them: sealing and hashing on the
//! way into the store, opening on the way out, and the hot-path cache.
//!
//! The cache maps a key hash to an [`ActiveSession`] whose credentials are
//! already in their injected form, so a cached request does no store I/O and
//! no decryption. It holds at most `store.session_cache_capacity` sessions
//! (S3-FIFO eviction, `quick_cache`); an evicted session is read again with
//! one indexed store read (`key_hash`). An index from session id to key
//! hash, kept for exactly the cached entries, makes an invalidation O(1).
//!
//! Keys the store said do not exist are remembered in a bounded negative
//! cache, so a client repeating a revoked or mistyped key costs no store
//! read. **Invariant (negative coherence):** a key added by this process is
//! forgotten there at once (`add_hashed`), one added by another process as
//! soon as [`Sessions::follow_changes`] reads its change-log entry (which
//! carries the key hash); a fill that raced an add is discarded (the
//! `added` counter, like `generation` below). Store reads for keys in
//! neither cache are budgeted per client address (`store.cold_lookups_per_client`).
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
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, UnitWeighter};
use secrecy::SecretString;
use serde::Serialize;
use std::net::IpAddr;

use crate::audit::{self, Actor, AuditAppend, AuditEntry, AuditSigner};
use crate::config::{Config, KeySource, ProviderConfig};
use crate::provider::{Credentials, UnusableToken};
use crate::secrets::live::LiveRing;
use crate::secrets::seal::{KeyError, OpenError, Sealer};
use crate::secrets::session::{new_session_id, BadKey, KeyHash, SessionKey, Status};
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
    /// The client is over its budget of store reads for uncached keys.
    #[error("too many lookups of uncached session keys from this client")]
    ColdBudget { retry_after_secs: u64 },
}

/// Whether [`Sessions::open_with`] creates a store file or key file that is missing.
#[derive(Clone, Copy)]
enum Create {
    Yes,
    No,
}

/// Whether a file could be created at `path` (which does not exist): its
/// directory exists and is a directory.
fn can_create(path: &std::path::Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if std::fs::metadata(dir)?.is_dir() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            format!("{} is not a directory", dir.display()),
        ))
    }
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

/// A capped cache that hands its evictions back to the caller (after the
/// shard lock is released), so the id index can follow them.
type Capped<K, V> = Cache<K, V, UnitWeighter, DefaultHashBuilder, Evictions>;

/// [`Lifecycle`] collecting evicted entries into the request's state.
#[derive(Clone, Copy, Default)]
struct Evictions;

impl<K, V> Lifecycle<K, V> for Evictions {
    type RequestState = Vec<(K, V)>;

    fn on_evict(&self, state: &mut Self::RequestState, key: K, val: V) {
        state.push((key, val));
    }
}

fn capped<K: Eq + std::hash::Hash, V: Clone>(capacity: usize) -> Capped<K, V> {
    Cache::with(
        capacity,
        capacity as u64,
        UnitWeighter,
        DefaultHashBuilder::default(),
        Evictions,
    )
}

/// What one client's cold lookups count against: its address, an IPv6
/// address by its /64 (one host usually holds a whole /64), and an
/// IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Change-log pages (of [`store::CHANGES_PAGE`] rows) one poll reads at most.
const MAX_PAGES_PER_POLL: usize = 100;

/// Above this many clients in the cold-lookup limiter, a cold lookup first
/// forgets the quiet ones (the change follower does it too).
const MAX_TRACKED_CLIENTS: usize = 100_000;

pub struct Sessions {
    store: Arc<dyn Store>,
    /// The ring, followed as other processes change it.
    ring: Arc<LiveRing>,
    providers: HashMap<String, ProviderConfig>,
    by_key: Capped<KeyHash, Arc<ActiveSession>>,
    /// Session id -> key hash of every session in `by_key` (and, briefly,
    /// of some just evicted or discarded): what `invalidate` removes by.
    /// An entry is added after its cache insert and removed only when the
    /// cache no longer holds that key, under the index's shard lock, so a
    /// cached session always has its entry.
    key_of: DashMap<String, KeyHash>,
    by_id: Capped<String, Arc<ActiveSession>>,
    /// Key hashes the store said do not exist (bounded like the cache).
    absent: Capped<KeyHash, ()>,
    /// Bumped whenever keys may have been added; a negative fill that saw
    /// it move is not cached.
    added: AtomicU64,
    /// Store reads by key hash ([`Sessions::by_key`] misses), for tests and metrics.
    key_reads: AtomicU64,
    /// Lookups answered by the negative cache.
    absent_hits: AtomicU64,
    /// Lookups refused by the cold-lookup budget.
    cold_refusals: AtomicU64,
    /// Store reads for uncached keys per client address; `None`: no limit.
    cold_budget: Option<governor::DefaultKeyedRateLimiter<IpAddr>>,
    capacity: usize,
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
            by_key: capped(config.store.session_cache_capacity),
            key_of: DashMap::new(),
            by_id: capped(config.store.session_cache_capacity),
            absent: capped(config.store.session_cache_capacity),
            added: AtomicU64::new(0),
            key_reads: AtomicU64::new(0),
            absent_hits: AtomicU64::new(0),
            cold_refusals: AtomicU64::new(0),
            cold_budget: std::num::NonZeroU32::new(config.store.cold_lookups_per_client)
                .map(|n| governor::RateLimiter::keyed(governor::Quota::per_second(n))),
            capacity: config.store.session_cache_capacity,
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
        let (sessions, warnings, _) = Sessions::open_with(config, Create::Yes).await?;
        Ok((sessions, warnings))
    }

    /// [`Sessions::open`] that creates nothing (for `check`): a SQLite file
    /// that does not exist yet is stood in for by an empty in-memory store,
    /// a key file that does not exist yet (while the store holds no
    /// session) by a key in memory. Returns also what `open` would create,
    /// as sentences ("would create the key file at PATH").
    pub async fn open_without_creating(
        config: &Config,
    ) -> Result<(Sessions, Vec<String>, Vec<String>), StartError> {
        Sessions::open_with(config, Create::No).await
    }

    async fn open_with(
        config: &Config,
        create: Create,
    ) -> Result<(Sessions, Vec<String>, Vec<String>), StartError> {
        use secrecy::ExposeSecret;
        let shown = config.store.shown_url();
        let in_store = |reason| StartError::Store {
            shown: shown.clone(),
            reason,
        };
        let mut would_create = Vec::new();
        let new_file = match (create, config.store.sqlite_file()) {
            (Create::No, Some(file)) if !file.exists() => Some(file),
            _ => None,
        };
        let store = match new_file {
            Some(file) => {
                can_create(&file).map_err(|e| {
                    in_store(StoreError::Open(format!("cannot create the file: {e}")))
                })?;
                would_create.push(format!(
                    "would create the SQLite store at {}",
                    file.display()
                ));
                store::open("sqlite::memory:").await.map_err(in_store)?
            }
            None => store::open(config.store.url.expose_secret())
                .await
                .map_err(in_store)?,
        };
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
                match create {
                    Create::Yes => Sealer::create_key_file(path)?,
                    Create::No => {
                        can_create(path).map_err(|source| KeyError::File {
                            path: path.display().to_string(),
                            source,
                        })?;
                        would_create.push(format!(
                            "would create the key file at {} (mode 0600; back it up)",
                            path.display()
                        ));
                        Sealer::from_ring(&crate::secrets::seal::Ring::generate(
                            store::now_ms() / 1000,
                        ))
                    }
                }
            }
            // An environment variable that is not set is an error of its own.
            (None, KeySource::Env(var)) => return Err(KeyError::EnvMissing(var.clone()).into()),
            // A command that printed nothing usable fails in load_existing.
            (None, KeySource::Command { .. }) => {
                return Err(KeyError::Command("printed no ring".to_owned()).into())
            }
        };
        if let KeySource::File(path) = &config.store.key {
            warnings.extend(crate::secrets::seal::key_file_warning(path));
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
        Ok((Sessions::new(store, sealer, config), warnings, would_create))
    }

    /// The session a key names, from the cache or else the store, with no
    /// budget of cold lookups (the CLI, tests, benches).
    pub async fn by_key(&self, hash: &KeyHash) -> Result<Option<Arc<ActiveSession>>, SessionError> {
        self.by_key_from(hash, None).await
    }

    /// The session a key presented by `client` names: from the cache, or
    /// `None` at once when the store said lately that the key does not
    /// exist, or else from the store (one indexed read), charged to the
    /// client's budget of cold lookups ([`SessionError::ColdBudget`] over it).
    pub async fn by_key_from(
        &self,
        hash: &KeyHash,
        client: Option<IpAddr>,
    ) -> Result<Option<Arc<ActiveSession>>, SessionError> {
        if let Some(s) = self.by_key.get(hash) {
            return Ok(Some(s));
        }
        if self.absent.get(hash).is_some() {
            self.absent_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        if let Some(client) = client {
            self.admit_cold(client)?;
        }
        let generation = self.generation.load(Ordering::Acquire);
        let added = self.added.load(Ordering::Acquire);
        self.key_reads.fetch_add(1, Ordering::Relaxed);
        // Bounded: a store that cannot answer in time is unavailable for
        // this request (503 `store_unavailable`), not a wait for the caller.
        let Some(rec) = store::within(self.store.session_by_key(hash)).await? else {
            self.remember_absent(*hash, added);
            return Ok(None);
        };
        self.know_keys_of(&rec).await;
        let active = Arc::new(self.activate(&rec)?);
        self.cache_by_key(*hash, &active, generation);
        Ok(Some(active))
    }

    /// Whether the cache holds `hash` (no store read, no budget): for
    /// benches and tests.
    pub fn cached_key(&self, hash: &KeyHash) -> Option<Arc<ActiveSession>> {
        self.by_key.get(hash)
    }

    /// Whether `hash` is in the negative cache.
    pub fn known_absent(&self, hash: &KeyHash) -> bool {
        self.absent.get(hash).is_some()
    }

    /// Counts a cold lookup against `client`'s budget: `Err` with the whole
    /// seconds until it has room again (at least 1) when it is spent.
    pub fn admit_cold(&self, client: IpAddr) -> Result<(), SessionError> {
        use governor::clock::Clock;
        let Some(limiter) = &self.cold_budget else {
            return Ok(());
        };
        if limiter.len() > MAX_TRACKED_CLIENTS {
            limiter.retain_recent();
        }
        limiter.check_key(&client_key(client)).map_err(|not_until| {
            self.cold_refusals.fetch_add(1, Ordering::Relaxed);
            let wait = not_until.wait_time_from(limiter.clock().now());
            SessionError::ColdBudget {
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            }
        })
    }

    /// Remembers that the store has no session for `hash`, unless keys may
    /// have been added since `added` was read (before the store read).
    fn remember_absent(&self, hash: KeyHash, added: u64) {
        if self.added.load(Ordering::Acquire) != added {
            return;
        }
        self.absent.insert(hash, ());
        if self.added.load(Ordering::Acquire) != added {
            self.absent.remove(&hash);
        }
    }

    /// Forgets that these keys were absent: they have just been added (here
    /// or, as the change log says, by another process). The bump first, so
    /// a lookup that read the store before the add discards its answer.
    pub fn forget_absent(&self, hashes: &[KeyHash]) {
        if hashes.is_empty() {
            return;
        }
        self.added.fetch_add(1, Ordering::AcqRel);
        for h in hashes {
            self.absent.remove(h);
        }
    }

    /// Forgets every absent key (start of change following: the log read
    /// from here on does not cover what came before).
    fn forget_all_absent(&self) {
        self.added.fetch_add(1, Ordering::AcqRel);
        self.absent.clear();
    }

    /// Store reads by key hash so far (lookups the caches could not answer).
    pub fn key_reads(&self) -> u64 {
        self.key_reads.load(Ordering::Relaxed)
    }

    /// Lookups answered by the negative cache so far.
    pub fn absent_hits(&self) -> u64 {
        self.absent_hits.load(Ordering::Relaxed)
    }

    /// Lookups refused by the cold-lookup budget so far.
    pub fn cold_refusals(&self) -> u64 {
        self.cold_refusals.load(Ordering::Relaxed)
    }

    /// Sessions cached by key now, and key hashes cached as absent.
    pub fn cache_sizes(&self) -> (usize, usize) {
        (self.by_key.len(), self.absent.len())
    }

    /// `store.session_cache_capacity`.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries of the id index (the cached sessions, plus any left by a
    /// race that the next sweep removes).
    pub fn indexed(&self) -> usize {
        self.key_of.len()
    }

    /// The session with this id (a provider's `default_session`), cached likewise.
    pub async fn by_id(&self, id: &str) -> Result<Option<Arc<ActiveSession>>, SessionError> {
        if let Some(s) = self.by_id.get(id) {
            return Ok(Some(s));
        }
        let generation = self.generation.load(Ordering::Acquire);
        let Some(rec) = store::within(self.store.session_by_id(id)).await? else {
            return Ok(None);
        };
        self.know_keys_of(&rec).await;
        let active = Arc::new(self.activate(&rec)?);
        self.cache_by_id(id.to_owned(), &active, generation);
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
            if self
                .by_key
                .remove_if(&rec.key_hash, |cached| cached.version < rec.version)
                .is_some()
            {
                self.unindex(&rec.id, &rec.key_hash);
            }
            self.by_id
                .remove_if(&rec.id, |cached| cached.version < rec.version);
            return Ok(active);
        }
        self.cache_by_key(rec.key_hash, &active, before + 1);
        if self.by_id.contains_key(&rec.id) {
            self.cache_by_id(rec.id.clone(), &active, before + 1);
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
        self.unindex(&rec.id, &rec.key_hash);
        self.by_id.remove(&rec.id);
        Ok(active)
    }

    /// The invalidation generation now; read it before reading a row that
    /// may be cached later.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches `active` by its key unless an invalidation happened since
    /// `generation` was read, checking again after the insert (an
    /// invalidation may land between the check and the insert) and taking
    /// the entry back if so. The id index gets its entry after the cache
    /// insert and before the second check, so an invalidation after that
    /// check finds it. Evicted entries leave the index.
    fn cache_by_key(&self, key: KeyHash, active: &Arc<ActiveSession>, generation: u64) {
        if self.generation() != generation {
            return;
        }
        let mut evicted = Vec::new();
        self.by_key
            .insert_with_lifecycle(key, Arc::clone(active), &mut evicted);
        self.key_of.insert(active.id.clone(), key);
        if self.generation() != generation
            && self
                .by_key
                .remove_if(&key, |cached| Arc::ptr_eq(cached, active))
                .is_some()
        {
            self.unindex(&active.id, &key);
        }
        for (hash, session) in evicted {
            self.unindex(&session.id, &hash);
        }
    }

    /// Drops `id`'s index entry if it names `hash` and the cache no longer
    /// holds `hash`. Checked under the index's shard lock: a fill inserts
    /// into the cache before the index, so either this sees the new cache
    /// entry and keeps the index entry, or the fill's index insert comes after.
    fn unindex(&self, id: &str, hash: &KeyHash) {
        self.key_of
            .remove_if(id, |_, h| h == hash && !self.by_key.contains_key(hash));
    }

    /// [`Sessions::cache_by_key`] for the cache by id (default sessions).
    fn cache_by_id(&self, id: String, active: &Arc<ActiveSession>, generation: u64) {
        if self.generation() != generation {
            return;
        }
        self.by_id.insert(id.clone(), Arc::clone(active));
        if self.generation() != generation {
            self.by_id
                .remove_if(&id, |cached| Arc::ptr_eq(cached, active));
        }
    }

    /// Removes index entries whose session the cache no longer holds (left
    /// by races; each check as in [`Sessions::unindex`]).
    fn sweep_index(&self) {
        self.key_of
            .retain(|id, h| self.by_key.peek(h).is_some_and(|s| s.id == *id));
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
        // The key works here at once, even if a lookup just found it absent.
        self.forget_absent(&[hash]);
        Ok((id, false))
    }

    /// Stores many new sessions of `provider` at once (seeding a large
    /// store): sealed as [`Sessions::add`] seals them, inserted in one
    /// transaction with one `session.created` audit row for the batch
    /// (`{"provider", "count"}`) and no events. Every key must be new
    /// ([`StoreError::DuplicateKey`] and nothing written otherwise).
    /// Returns the new sessions' ids, in order.
    pub async fn add_many(
        &self,
        provider: &str,
        batch: Vec<(KeyHash, NewTokens)>,
        actor: Actor,
    ) -> Result<Vec<String>, SessionError> {
        let now = store::now();
        let mut rows = Vec::with_capacity(batch.len());
        for (hash, tokens) in batch {
            self.check_tokens(provider, &tokens)?;
            let id = new_session_id();
            let sealed = self.seal_tokens(&id, &tokens, now);
            rows.push(NewSession {
                id,
                provider: provider.to_owned(),
                label: None,
                key_hash: hash,
                tokens: sealed,
                now,
            });
        }
        let audit = self.audit(
            audit::kind::SESSION_CREATED,
            None,
            actor,
            serde_json::json!({"provider": provider, "count": rows.len()}),
        );
        self.store.insert_sessions(&rows, Some(&audit)).await?;
        let hashes: Vec<KeyHash> = rows.iter().map(|r| r.key_hash).collect();
        self.forget_absent(&hashes);
        Ok(rows.into_iter().map(|r| r.id).collect())
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
        if !crate::tokens::endpoint::usable_access_token(provider_cfg, &tokens.access_token) {
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
            .map(|r| self.shown(r))
            .collect())
    }

    pub async fn info(&self, id: &str) -> Result<Option<SessionInfo>, SessionError> {
        Ok(self
            .store
            .session_by_id(id)
            .await?
            .as_ref()
            .map(|r| self.shown(r)))
    }

    /// A session as the control plane shows it: the store's row, with this
    /// process's own last use when it is newer than the stored one (the
    /// store's is written every `use_flush_interval`; the process that
    /// served a request shows it at once).
    fn shown(&self, rec: &SessionRecord) -> SessionInfo {
        let mut info = SessionInfo::from(rec);
        if let Some(own) = self.last_use(&rec.id) {
            if rec.last_used_at.is_none_or(|stored| own > stored) {
                info.last_used_at = Some(rfc3339(own));
            }
        }
        info
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

    /// Drops every cached copy of session `id`: O(1), through the id index.
    pub fn invalidate(&self, id: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.by_id.remove(id);
        if let Some((_, hash)) = self.key_of.remove(id) {
            self.by_key.remove(&hash);
        }
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
        self.follow_changes_from(None, every, stop).await
    }

    /// [`Sessions::follow_changes`] from `cursor`, read before this process
    /// served any lookup (`server::start`); with `None`, from the position
    /// read now, forgetting the keys found absent before it.
    pub async fn follow_changes_from(
        self: Arc<Self>,
        cursor: Option<i64>,
        every: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut cursor = loop {
            if let Some(c) = cursor {
                break c;
            }
            match self.store.change_cursor().await {
                Ok(c) => {
                    // Keys found absent before the cursor was read may have
                    // been added before it, where the log is not read.
                    self.forget_all_absent();
                    break c;
                }
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
            // A full page (a bulk insert, say) is followed at once by the
            // next, so a key added late in a big batch waits no extra polls.
            for _ in 0..MAX_PAGES_PER_POLL {
                match self.store.changes(cursor).await {
                    Ok(changes) => {
                        let more = changes.more && changes.cursor > cursor;
                        cursor = changes.cursor;
                        // Keys added elsewhere work here from now on.
                        self.forget_absent(&changes.added_keys);
                        for id in changes.ids {
                            tracing::debug!(session = %id, "session changed in the store; dropping cached copy");
                            self.invalidate(&id);
                        }
                        if !more {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the store's change log");
                        break;
                    }
                }
            }
            polls += 1;
            // Keep the change log short: an hour is far longer than any poll gap.
            if polls.is_multiple_of(1200) {
                self.sweep_index();
                if let Some(limiter) = &self.cold_budget {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
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
            let (cached, _) = s.cache_sizes();
            assert!(cached <= 100, "{cached} cached with a cap of 100");
        }
        assert_eq!(s.key_reads(), 400);
        // The index follows the cache exactly: evicted sessions left it.
        assert_eq!(s.indexed(), s.cache_sizes().0);
        let evicted = (0..400)
            .find(|i| s.cached_key(&key_hash(*i)).is_none())
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
        s.invalidate(&ids[evicted]);
        assert!(s.cached_key(&key_hash(evicted)).is_none());
        assert_eq!(s.indexed(), s.cache_sizes().0);
        s.sweep_index();
        assert_eq!(s.indexed(), s.cache_sizes().0);
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
        assert_eq!(s.absent_hits(), 5);
        s.add("spark", seed_tokens(1), None, Some(key), Actor::Cli)
            .await
            .expect("add");
        assert!(!s.known_absent(&hash));
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
    async fn a_negative_fill_that_raced_an_add_is_not_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let s = sessions(dir.path()).await;
        let hash = key_hash(7);
        let before = s.added.load(Ordering::Acquire);
        // The add lands between the lookup's store read and its fill.
        s.forget_absent(&[hash]);
        s.remember_absent(hash, before);
        assert!(!s.known_absent(&hash));
        s.remember_absent(hash, s.added.load(Ordering::Acquire));
        assert!(s.known_absent(&hash));
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
        assert_eq!(s.cold_refusals(), 1);
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
        rec.access_token =
            crate::secrets::seal::seal_legacy(&[3; 32], "a1", &aad(&rec.id, "access"));
        rec.refresh_token = Some(crate::secrets::seal::seal_legacy(
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
            crate::secrets::seal::sealed_key_id(&kept),
            Some(s.sealer().primary_id())
        );
        assert_eq!(
            crate::secrets::seal::sealed_key_id(&sealed.access_token),
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
