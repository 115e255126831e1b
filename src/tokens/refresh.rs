//! The token lifecycle: refreshing a session's tokens once, whoever asks.
//!
//! [`Refresher::refresh`] is the one way tokens get refreshed: by the proxy
//! (proactively near expiry, reactively after an upstream 401), by the
//! background refresh-ahead task, by `session refresh` and by the admin API.
//!
//! **Invariant (single flight):** a refresh token is spent at most once.
//! * Within a process, a per-session async mutex queues concurrent callers;
//!   each re-reads the row under it and, if its version moved since the
//!   caller read the session, uses the new tokens instead of refreshing.
//! * Across processes sharing the store, the store's refresh lease
//!   (compare-and-set on the row) admits one owner at a time; the others
//!   wait for the version to move.
//! * The new tokens are committed (durably, `synchronous=FULL`) with a
//!   compare-and-swap on the version before anyone may use them.
//!
//! **Invariant (no refresh abandoned):** every refresh runs as a task of
//! `Refresher::tasks`, and a shutdown waits for them
//! ([`Refresher::finish`], up to `shutdown_grace`) before it gives back
//! whatever leases this process still holds. Refreshes run on the runtime
//! that asked (a proxy worker's, for the hot path); `Running::wait` lets
//! the workers' runtimes end only after that wait. A provider's answer that
//! rotated a refresh token is therefore committed, not sent to a closed
//! socket by a process that has already left.
//!
//! Failures are shared: after a transient failure the session backs off
//! (exponential, capped, jittered), and callers queued behind the failed
//! attempt get the same answer instead of calling the endpoint again.
//! `invalid_grant` marks the session `reauthorization_required`.
//!
//! **The refresh-loop guard.** A 401 is normally cured by a refresh, however
//! recent the last one (a token can expire, or be revoked, right after it was
//! issued). Only when a refresh's replay is refused again (the 401 is about
//! something else, such as Spark's 1010 disabled key) does the proxy call
//! [`Refresher::refusal_survived_refresh`]; later 401s on those same tokens
//! then pass through for `min_refresh_interval` without a refresh, and any
//! accepted request ([`Refresher::accepted`]) lifts the guard. The guard is
//! per process: each instance spends at most one rotation per interval on an
//! incurable refusal.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::audit::{self, Actor, AuditAppend};
use crate::config::{Config, ProviderConfig};
use crate::metrics::Metrics;
use crate::secrets::session::Status;
use crate::store::{self, EventKind, Failure, Health, Lease, SessionRecord, StoreError};
use crate::tls::TlsError;
use crate::tokens::endpoint::{
    backoff, class, usable_access_token, Grant, TokenEndpoint, TokenError,
};
use crate::tokens::journal::Journal;
use crate::tokens::sessions::{ActiveSession, NewTokens, SessionError, Sessions, RECENT_USE};

/// First back-off after a failed refresh; doubles per failure up to the
/// provider's `refresh_backoff_max`.
const BACKOFF_BASE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("the provider refused the refresh token; the session needs reauthorization")]
    Reauthorization,
    #[error("the token endpoint failed; retry in {retry_after:?}")]
    Failed { retry_after: Duration },
    #[error("the session has no refresh token")]
    NotRefreshable,
    #[error("the session no longer exists")]
    Gone,
    /// Not refreshed: for a 401, a refresh moments ago did not cure this
    /// session's refusals (the refresh-loop guard); for a token near expiry,
    /// it was refreshed moments ago and is still valid.
    #[error("the session was refreshed moments ago")]
    TooSoon,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// One session's refresh state in this process.
#[derive(Default)]
struct Flight {
    /// The row version the back-off below applies to; any change resets it.
    version: i64,
    failures: u32,
    retry_at: Option<Instant>,
    /// The span of the last refresh run that called the token endpoint:
    /// a request that waited for it and found the tokens moved links to it.
    run: Option<crate::telemetry::trace::Run>,
}

/// Why a refresh is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// The token is within `refresh_margin` of its expiry.
    Due,
    /// The upstream refused the token (401).
    Refused,
    /// An operator asked (`session refresh`, the admin API).
    Forced,
    /// The endpoint's last answer held an access token that cannot be sent;
    /// its refresh token is stored, and this attempt uses it at once.
    Retry,
    /// Nobody used or refreshed the session for `refresh_idle_after`: its
    /// refresh token is spent before it lapses. Nobody waits for the
    /// result, so it is not cached.
    Idle,
}

impl Why {
    /// The refresh's reason, as the audit trail records it.
    fn as_str(self) -> &'static str {
        match self {
            Why::Due => "due",
            Why::Refused => "refused",
            Why::Forced => "forced",
            Why::Retry => "retry",
            Why::Idle => "idle",
        }
    }
}

/// How one attempt at the token endpoint ended, when it did not fail.
enum Attempt {
    Done(Arc<ActiveSession>),
    /// The answer's access token cannot be sent (see [`usable_access_token`]):
    /// its refresh token was committed with the old access token marked
    /// expired, at row `version`.
    Unusable {
        version: i64,
        provider: String,
        backoff_max: Duration,
    },
}

/// Whether the row holds an access token marked unusable by a refresh: it
/// "expired" before it was refreshed, which no provider's answer can say
/// (`expires_in` is never negative). Such a token is refreshed whenever it
/// is due, however recent the last refresh.
fn marked_unusable(rec: &SessionRecord) -> bool {
    matches!((rec.expires_at, rec.last_refresh_at), (Some(exp), Some(at)) if exp < at)
}

/// A session whose refusal survived a refresh: until `until`, 401s on
/// tokens of `version` pass through.
#[derive(Debug, Clone, Copy)]
struct Guard {
    version: i64,
    until: Instant,
}

pub struct Refresher {
    sessions: Arc<Sessions>,
    guards: DashMap<String, Guard>,
    /// `guards.len()`, kept apart so the hot path's check is one atomic load.
    guarded: std::sync::atomic::AtomicUsize,
    metrics: Arc<Metrics>,
    endpoints: HashMap<String, (ProviderConfig, TokenEndpoint)>,
    flights: DashMap<String, Arc<tokio::sync::Mutex<Flight>>>,
    /// This process's name in the store's refresh leases.
    owner: String,
    /// Every refresh under way, whoever started it and whether or not
    /// anyone still waits for its answer: a shutdown waits for them.
    tasks: tokio_util::task::TaskTracker,
    /// Rotated tokens, written the moment the token endpoint answers.
    journal: Journal,
    /// Whether every process sharing the store runs on this machine
    /// (SQLite), so that a lease owner's process can be looked up here.
    local_store: bool,
}

impl Refresher {
    pub fn new(
        config: &Config,
        sessions: Arc<Sessions>,
        metrics: Arc<Metrics>,
    ) -> Result<Refresher, TlsError> {
        let mut endpoints = HashMap::new();
        for p in &config.providers {
            endpoints.insert(p.name.clone(), (p.clone(), TokenEndpoint::new(p)?));
        }
        Ok(Refresher {
            sessions,
            guards: DashMap::new(),
            guarded: std::sync::atomic::AtomicUsize::new(0),
            metrics,
            endpoints,
            flights: DashMap::new(),
            owner: format!(
                "{}-{}",
                std::process::id(),
                crate::secrets::session::new_session_id()
            ),
            tasks: tokio_util::task::TaskTracker::new(),
            journal: Journal::new(config.store.rotation_journal.as_deref()),
            local_store: secrecy::ExposeSecret::expose_secret(&config.store.url)
                .starts_with("sqlite:"),
        })
    }

    /// At start-up, before serving: commits the rotations that a process
    /// which died left in the journal (see [`crate::tokens::journal`]),
    /// where the session still has the version that refresh started from;
    /// then, on SQLite (whose processes all run here), gives back the
    /// refresh leases of processes that are gone, so their sessions refresh
    /// at once instead of after the lease (`token_timeout` + 20 s). Returns
    /// how many rotations were committed. Entries that no longer apply go;
    /// those the store cannot take now stay for the next start.
    pub async fn recover_rotations(&self) -> usize {
        let recovered = self.recover_journal().await;
        if self.local_store {
            self.release_dead_leases().await;
        }
        recovered
    }

    async fn release_dead_leases(&self) {
        let store = self.sessions.store();
        let owners = match store.refresh_lease_owners().await {
            Ok(owners) => owners,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the refresh leases at start-up; those of exited processes expire on their own");
                return;
            }
        };
        for owner in owners {
            if owner == self.owner || !crate::tokens::journal::owner_gone(&owner) {
                continue;
            }
            match store.release_refresh_leases(&owner).await {
                Ok(n) => {
                    tracing::info!(
                        leases = n,
                        "gave back the refresh leases of a process that is gone"
                    )
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot give back an exited process's refresh leases; they expire on their own")
                }
            }
        }
    }

    async fn recover_journal(&self) -> usize {
        let store = self.sessions.store();
        let now = store::now();
        let mut recovered = 0;
        for pending in self.journal.pending(&self.owner, now) {
            let id = pending.id.as_str();
            let now_ms = now.saturating_mul(1000);
            // The dead writer's lease (or none, or an expired one) is taken
            // in its name, so the commit's compare-and-swap holds.
            let lease = store
                .acquire_refresh_lease(id, &pending.owner, now_ms + 30_000, now_ms)
                .await;
            let rec = match lease {
                Ok(Lease::Acquired(rec)) => rec,
                Ok(Lease::Gone) => {
                    self.journal.forget(&pending);
                    continue;
                }
                Ok(Lease::Held { .. }) => {
                    tracing::warn!(session = %id, "a rotation left by a process that died waits: another process holds the session's refresh lease");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "cannot recover a rotation left by a process that died; kept for the next start");
                    continue;
                }
            };
            if rec.version != pending.version {
                // Committed after all, or the session moved on since.
                let _ = store.release_refresh_lease(id, &pending.owner).await;
                self.journal.forget(&pending);
                continue;
            }
            let health = match pending.usable {
                true => Health::Healthy { recovered: None },
                false => Health::Unchanged,
            };
            let audit = self.sessions.audit(
                audit::kind::SESSION_REFRESHED,
                Some(id),
                Actor::Proxy,
                serde_json::json!({
                    "provider": pending.provider,
                    "reason": "recovered",
                    "usable": pending.usable,
                }),
            );
            let committed = store
                .commit_refresh(
                    id,
                    &pending.owner,
                    pending.tokens.clone(),
                    pending.version,
                    now,
                    health,
                    Some(&audit),
                )
                .await;
            match committed {
                Ok(Some(_)) => {
                    recovered += 1;
                    tracing::warn!(session = %id, provider = %pending.provider, "committed a rotation that a process which died had received but not stored");
                    self.journal.forget(&pending);
                }
                Ok(None) => self.journal.forget(&pending),
                Err(e) => {
                    let _ = store.release_refresh_lease(id, &pending.owner).await;
                    tracing::warn!(session = %id, error = %e, "cannot recover a rotation left by a process that died; kept for the next start");
                }
            }
        }
        recovered
    }

    /// Starts a task that must not be abandoned: tracked for
    /// [`Refresher::finish`].
    fn track<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Refreshes after an upstream refused `seen`'s token without anyone
    /// waiting for the answer (the request's body could not be kept for a
    /// replay, so its 401 went back as it came).
    pub fn refresh_refused_in_background(self: &Arc<Self>, seen: &Arc<ActiveSession>) {
        let me = Arc::clone(self);
        let seen = Arc::clone(seen);
        self.track(async move {
            if let Err(e) = me.refresh_refused(&seen).await {
                tracing::debug!(session = %seen.id, error = %e, "background refresh after a 401 did not refresh");
            }
        });
    }

    /// The upstream refused the session's credential itself (a static key's
    /// 401; Spark's 1000 or 1010 on a signed request): the session is
    /// marked `reauthorization_required` (an event and an audit entry say
    /// so), in the background, once. Nothing is refreshed; an operator
    /// replaces the key.
    pub fn credential_refused(self: &Arc<Self>, seen: &Arc<ActiveSession>) {
        if seen.status == Status::ReauthorizationRequired {
            return;
        }
        let me = Arc::clone(self);
        let seen = Arc::clone(seen);
        self.track(async move {
            let code = "upstream_refused";
            let event = me.sessions.event(
                EventKind::ReauthorizationRequired,
                &seen.id,
                &seen.provider,
                serde_json::json!({"error": code}),
            );
            let audit = me.sessions.audit(
                audit::kind::SESSION_REAUTHORIZATION_REQUIRED,
                Some(&seen.id),
                Actor::Proxy,
                serde_json::json!({"provider": seen.provider, "error": code}),
            );
            let marked = me
                .sessions
                .store()
                .mark_reauthorization_required(
                    &seen.id,
                    seen.version,
                    store::now(),
                    code,
                    event.as_ref(),
                    Some(&audit),
                )
                .await;
            match marked {
                Ok(_) => {
                    tracing::warn!(session = %seen.id, provider = %seen.provider, "the upstream refused a stored key; the session needs a new one");
                    me.sessions.cache().invalidate(&seen.id);
                }
                Err(e) => {
                    tracing::warn!(session = %seen.id, error = %e, "a refused stored key could not be recorded")
                }
            }
        });
    }

    /// At shutdown: waits until every refresh under way has finished (its
    /// tokens committed, or its failure recorded), until `deadline`; then
    /// gives back the refresh leases this process still holds, so that
    /// another instance, or this one restarted, does not wait them out.
    /// Returns how many refreshes were still running at the deadline.
    pub async fn finish(&self, deadline: tokio::time::Instant) -> usize {
        self.tasks.close();
        let running = self.tasks.len();
        if running > 0 {
            tracing::info!(
                refreshes = running,
                "waiting for refreshes under way before exiting"
            );
        }
        let left = match tokio::time::timeout_at(deadline, self.tasks.wait()).await {
            Ok(()) => 0,
            Err(_) => {
                let left = self.tasks.len();
                tracing::warn!(
                    refreshes = left,
                    "shutdown_grace ran out with refreshes under way; their sessions may need reauthorization"
                );
                left
            }
        };
        match self
            .sessions
            .store()
            .release_refresh_leases(&self.owner)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(leases = n, "gave back refresh leases on exit"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot give back refresh leases on exit; they expire on their own")
            }
        }
        left
    }

    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// A provider's configuration and token endpoint.
    pub fn endpoint(&self, provider: &str) -> Option<(&ProviderConfig, &TokenEndpoint)> {
        self.endpoints.get(provider).map(|(p, e)| (p, e))
    }

    /// Refreshes the session `seen` was read from, unless its tokens changed
    /// since then (another request, process or operator got there first), in
    /// which case the current ones are returned. With `force`, refreshes even
    /// so (`session refresh`, the admin API).
    pub async fn refresh(
        self: &Arc<Self>,
        seen: &ActiveSession,
        force: bool,
    ) -> Result<Arc<ActiveSession>, RefreshError> {
        self.refresh_by(seen, force, Actor::Proxy).await
    }

    /// [`Refresher::refresh`], on behalf of `actor` (as the audit trail
    /// records it).
    pub async fn refresh_by(
        self: &Arc<Self>,
        seen: &ActiveSession,
        force: bool,
        actor: Actor,
    ) -> Result<Arc<ActiveSession>, RefreshError> {
        let why = if force { Why::Forced } else { Why::Due };
        self.spawn_refresh(seen.id.clone(), Some(seen.version), why, actor)
            .await
    }

    /// Refreshes after the upstream refused `seen`'s token, unless another
    /// request already did, or the refresh-loop guard holds.
    pub async fn refresh_refused(
        self: &Arc<Self>,
        seen: &ActiveSession,
    ) -> Result<Arc<ActiveSession>, RefreshError> {
        if self.guard_holds(&seen.id, seen.version) {
            return Err(RefreshError::TooSoon);
        }
        self.spawn_refresh(
            seen.id.clone(),
            Some(seen.version),
            Why::Refused,
            Actor::Proxy,
        )
        .await
    }

    /// The replay with `fresh` tokens was refused too: hold later 401s on
    /// them for the provider's `min_refresh_interval`.
    pub fn refusal_survived_refresh(&self, fresh: &ActiveSession) {
        let interval = self
            .endpoints
            .get(&fresh.provider)
            .map_or(Duration::from_secs(30), |(p, _)| p.min_refresh_interval);
        let guard = Guard {
            version: fresh.version,
            until: Instant::now() + interval,
        };
        if self.guards.insert(fresh.id.clone(), guard).is_none() {
            self.guarded
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        tracing::info!(session = %fresh.id, hold_s = interval.as_secs(), "a 401 survived a refresh; later 401s pass through without one for a while");
    }

    /// The upstream accepted a request of session `id`: lifts its guard.
    pub fn accepted(&self, id: &str) {
        if self.guarded.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return;
        }
        if self.guards.remove(id).is_some() {
            self.guarded
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn guard_holds(&self, id: &str, version: i64) -> bool {
        if self.guarded.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return false;
        }
        let holds = match self.guards.get(id) {
            None => return false,
            // Newer tokens exist than those the guard was set on: try them.
            Some(g) => g.version == version && Instant::now() < g.until,
        };
        if !holds {
            self.accepted(id);
        }
        holds
    }

    /// Refreshes session `id` now (`session refresh ID`, the admin API,
    /// the dashboard: `actor`).
    pub async fn refresh_now(
        self: &Arc<Self>,
        id: &str,
        actor: Actor,
    ) -> Result<Arc<ActiveSession>, RefreshError> {
        self.spawn_refresh(id.to_owned(), None, Why::Forced, actor)
            .await
    }

    /// Runs the refresh in a task of its own: a caller that goes away (a
    /// client hanging up, a shutdown) must not cancel it between the token
    /// endpoint's answer and the commit, or the rotated token is lost.
    async fn spawn_refresh(
        self: &Arc<Self>,
        id: String,
        seen: Option<i64>,
        why: Why,
        actor: Actor,
    ) -> Result<Arc<ActiveSession>, RefreshError> {
        use tracing::Instrument;
        let me = Arc::clone(self);
        // A child of the caller's span (the request that asked), ended
        // with the run even if the caller goes away.
        let span = if crate::telemetry::traces_on() {
            tracing::info_span!(
                target: crate::telemetry::TARGET,
                "refresh",
                credproxy.session_id = id.as_str(),
                credproxy.refresh.reason = why.as_str(),
                credproxy.refresh.outcome = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        match self
            .track(async move { me.refresh_id(&id, seen, why, actor).await }.instrument(span))
            .await
        {
            Ok(result) => result,
            Err(_) => Err(RefreshError::Failed {
                retry_after: BACKOFF_BASE,
            }),
        }
    }

    async fn refresh_id(
        &self,
        id: &str,
        seen: Option<i64>,
        why: Why,
        actor: Actor,
    ) -> Result<Arc<ActiveSession>, RefreshError> {
        let flight = Arc::clone(self.flights.entry(id.to_owned()).or_default().value());
        let mut flight = flight.lock().await;
        // During a back-off, fail at once: no store I/O, no endpoint call.
        if let Some(at) = flight.retry_at {
            let now = Instant::now();
            if now < at {
                return Err(RefreshError::Failed {
                    retry_after: at - now,
                });
            }
        }
        let mut result = self.refresh_locked(&mut flight, id, seen, why, actor).await;
        if let Ok(Attempt::Unusable { version, .. }) = result {
            // The rotated refresh token is stored: spend it at once, so a
            // one-off bad answer costs the caller nothing.
            result = self
                .refresh_locked(&mut flight, id, Some(version), Why::Retry, actor)
                .await;
        }
        let result = match result {
            Ok(Attempt::Done(session)) => Ok(session),
            Ok(Attempt::Unusable {
                version,
                provider,
                backoff_max,
            }) => {
                let wait = backoff(flight.failures, BACKOFF_BASE, backoff_max);
                flight.retry_at = Some(Instant::now() + wait);
                self.mark_failing(id, &provider, version, class::UNUSABLE, wait)
                    .await;
                Err(RefreshError::Failed { retry_after: wait })
            }
            Err(e) => Err(e),
        };
        if let Err(RefreshError::Store(e)) = &result {
            // The store is unreachable: back off too, so requests for this
            // session do not queue up behind one store timeout after another.
            flight.failures += 1;
            let wait = backoff(flight.failures, BACKOFF_BASE, STORE_BACKOFF_MAX);
            flight.retry_at = Some(Instant::now() + wait);
            tracing::warn!(session = %id, error = %e, retry_in_ms = wait.as_millis() as u64, "refresh: store unavailable");
        }
        result
    }

    async fn refresh_locked(
        &self,
        flight: &mut Flight,
        id: &str,
        seen: Option<i64>,
        why: Why,
        actor: Actor,
    ) -> Result<Attempt, RefreshError> {
        let force = why == Why::Forced;
        let generation = self.sessions.cache().generation();
        let store = self.sessions.store();
        let rec = store.session_by_id(id).await?.ok_or(RefreshError::Gone)?;
        if flight.version != rec.version {
            *flight = Flight {
                version: rec.version,
                ..Flight::default()
            };
        }
        if rec.status == Status::ReauthorizationRequired {
            return Err(RefreshError::Reauthorization);
        }
        let moved = |version: i64| !force && seen.is_some_and(|v| v != version);
        if moved(rec.version) {
            waited_for(flight);
            return Ok(Attempt::Done(self.settle(&rec, generation, why).await?));
        }
        if rec.refresh_token.is_none() {
            return Err(RefreshError::NotRefreshable);
        }
        let (provider, endpoint) = self
            .endpoints
            .get(&rec.provider)
            .ok_or_else(|| SessionError::UnknownProvider(rec.provider.clone()))?;
        // A token that comes due again right after a refresh (a lifetime
        // shorter than refresh_margin) is used while it lasts, not refreshed
        // on every request. Refusals are not held back here: see the guard.
        let interval = provider.min_refresh_interval.as_secs_f64();
        if why == Why::Due
            && !marked_unusable(&rec)
            && rec
                .last_refresh_at
                .is_some_and(|at| ((store::now() - at) as f64) < interval)
        {
            return Err(RefreshError::TooSoon);
        }

        let leased_at = Instant::now();
        let rec = match self.lease(&rec, provider).await? {
            Leased::Mine(rec) => rec,
            Leased::Moved(rec) => {
                if rec.status == Status::ReauthorizationRequired {
                    return Err(RefreshError::Reauthorization);
                }
                waited_for(flight);
                return Ok(Attempt::Done(self.settle(&rec, generation, why).await?));
            }
        };
        if moved(rec.version) {
            store.release_refresh_lease(id, &self.owner).await?;
            return Ok(Attempt::Done(self.settle(&rec, generation, why).await?));
        }
        self.sessions.vault().know_keys_of(&rec).await;
        let Some(refresh_token) = self
            .sessions
            .vault()
            .refresh_token(&rec)
            .map_err(SessionError::from)?
        else {
            store.release_refresh_lease(id, &self.owner).await?;
            return Err(RefreshError::NotRefreshable);
        };

        let started = Instant::now();
        let answer = endpoint.grant(Grant::RefreshToken(&refresh_token)).await;
        let took = started.elapsed();
        match answer {
            Ok(answer) => {
                // An access token that cannot be sent is not stored (every
                // request would fail on it); the refresh token that came
                // with it is: the provider has rotated it.
                let usable = usable_access_token(provider, &answer.access_token);
                let tokens = NewTokens {
                    access_token: answer.access_token,
                    refresh_token: answer.refresh_token,
                    expires_in: answer.expires_in,
                };
                let now = store::now();
                let sealed = if usable {
                    self.sessions.vault().seal_refreshed(&rec, &tokens, now)
                } else {
                    self.sessions
                        .vault()
                        .seal_unusable(&rec, tokens.refresh_token.as_ref(), now)
                };
                // The provider has rotated the refresh token: until it is
                // written somewhere, a crash loses the session. First the
                // journal (one write(2), which kill -9 cannot undo), then
                // the store's durable commit.
                let entry = self.journal.write(
                    id,
                    &rec.provider,
                    &self.owner,
                    rec.version,
                    usable,
                    &sealed,
                    now,
                );
                let journaled = started.elapsed() - took;
                let lease_ends = leased_at + lease_hold(provider);
                let recovered = self.sessions.event(
                    EventKind::Recovered,
                    id,
                    &rec.provider,
                    serde_json::json!({}),
                );
                let health = match usable {
                    true => Health::Healthy {
                        recovered: recovered.as_ref(),
                    },
                    false => Health::Unchanged,
                };
                let audit = self.sessions.audit(
                    audit::kind::SESSION_REFRESHED,
                    Some(id),
                    actor,
                    serde_json::json!({
                        "provider": rec.provider,
                        "reason": why.as_str(),
                        "usable": usable,
                    }),
                );
                let committed = self
                    .commit_with_retries(id, sealed, rec.version, lease_ends, health, &audit)
                    .await;
                if committed.is_ok() {
                    // Stored, or the row moved on: either way the entry is
                    // spent. On a store error it stays for the next start.
                    self.journal.done(entry);
                }
                let stored = matches!(committed, Ok(Some(_)));
                if !usable || !stored {
                    self.metrics.refresh(&rec.provider, "failed", Some(took));
                }
                if !stored {
                    // Let a later attempt (or a replaced token) proceed at once.
                    if let Err(e) = store.release_refresh_lease(id, &self.owner).await {
                        tracing::warn!(session = %id, error = %e, "cannot release the refresh lease; it expires on its own");
                    }
                }
                match committed {
                    Ok(Some(new)) if !usable => {
                        tracing::warn!(
                            session = %id,
                            provider = %rec.provider,
                            retry = why == Why::Retry,
                            "the token endpoint answered an access token that cannot be sent (empty, spaces, control or non-ASCII characters); kept its refresh token, the access token counts as expired"
                        );
                        *flight = Flight {
                            version: new.version,
                            failures: flight.failures + 1,
                            retry_at: None,
                            run: None,
                        };
                        // Cached copies hold the old expiry: drop them, so
                        // the next request sees the token as expired.
                        self.sessions.cache().invalidate(id);
                        Ok(Attempt::Unusable {
                            version: new.version,
                            provider: rec.provider.clone(),
                            backoff_max: provider.refresh_backoff_max,
                        })
                    }
                    Ok(Some(new)) => {
                        let window = started.elapsed() - took;
                        self.metrics.refresh(&rec.provider, "ok", Some(took));
                        self.metrics.refresh_commit(&rec.provider, window);
                        tracing::info!(
                            session = %id,
                            provider = %rec.provider,
                            took_ms = took.as_millis() as u64,
                            journal_us = journaled.as_micros() as u64,
                            commit_us = window.as_micros() as u64,
                            "tokens refreshed"
                        );
                        *flight = Flight {
                            version: new.version,
                            run: crate::telemetry::trace::run_of(&tracing::Span::current()),
                            ..Flight::default()
                        };
                        tracing::Span::current().record("credproxy.refresh.outcome", "refreshed");
                        if rec.status == Status::RefreshFailing {
                            tracing::info!(session = %id, provider = %rec.provider, "session recovered: refreshed after failing");
                        }
                        Ok(Attempt::Done(self.settle(&new, generation, why).await?))
                    }
                    Ok(None) => {
                        // Only if the row moved under us (our lease ran out, or
                        // an operator replaced the tokens meanwhile).
                        tracing::error!(session = %id, "refreshed tokens were not stored: the session changed while the token endpoint answered");
                        Err(RefreshError::Failed {
                            retry_after: BACKOFF_BASE,
                        })
                    }
                    Err(e) => {
                        tracing::error!(session = %id, error = %e, "refreshed tokens could not be stored; the session may need reauthorization");
                        Err(e.into())
                    }
                }
            }
            Err(TokenError::Rejected { code }) => {
                self.metrics
                    .refresh(&rec.provider, "invalid_grant", Some(took));
                tracing::warn!(session = %id, provider = %rec.provider, code = %code, "refresh refused; session needs reauthorization");
                let event = self.sessions.event(
                    EventKind::ReauthorizationRequired,
                    id,
                    &rec.provider,
                    serde_json::json!({"error": code}),
                );
                let audit = self.sessions.audit(
                    audit::kind::SESSION_REAUTHORIZATION_REQUIRED,
                    Some(id),
                    actor,
                    serde_json::json!({"provider": rec.provider, "error": code}),
                );
                store
                    .mark_reauthorization_required(
                        id,
                        rec.version,
                        store::now(),
                        &code,
                        event.as_ref(),
                        Some(&audit),
                    )
                    .await?;
                self.sessions.cache().invalidate(id);
                Err(RefreshError::Reauthorization)
            }
            Err(TokenError::Failed { class, reason }) => {
                self.metrics.refresh(&rec.provider, "failed", Some(took));
                flight.failures += 1;
                let wait = backoff(flight.failures, BACKOFF_BASE, provider.refresh_backoff_max);
                flight.retry_at = Some(Instant::now() + wait);
                tracing::warn!(session = %id, provider = %rec.provider, class, reason = %reason, retry_in_ms = wait.as_millis() as u64, "refresh failed; session intact");
                // Also gives the lease back.
                self.mark_failing(id, &rec.provider, rec.version, class, wait)
                    .await;
                Err(RefreshError::Failed { retry_after: wait })
            }
        }
    }

    /// The row a refresh ended with, ready for use: cached for the callers
    /// that wait for it, not for idle refresh (see [`Sessions::uncached`]).
    async fn settle(
        &self,
        rec: &SessionRecord,
        generation: u64,
        why: Why,
    ) -> Result<Arc<ActiveSession>, SessionError> {
        // Another process may have sealed it under a key not known here yet.
        self.sessions.vault().know_keys_of(rec).await;
        match why {
            Why::Idle => self.sessions.uncached(rec),
            _ => self.sessions.install(rec, generation),
        }
    }

    /// Records a transient failure on row `version` (status
    /// `refresh_failing`, the error class, the next retry in `wait`) and
    /// gives the lease back; the first failure of an active session is a
    /// transition, with its event. Store errors are logged: the lease then
    /// expires on its own, and the session's health is written next time.
    async fn mark_failing(
        &self,
        id: &str,
        provider: &str,
        version: i64,
        class: &'static str,
        wait: Duration,
    ) {
        let store = self.sessions.store();
        let now = store::now();
        let next_retry_at = now.saturating_add(wait.as_secs_f64().ceil() as i64);
        let event = self.sessions.event(
            EventKind::RefreshFailing,
            id,
            provider,
            serde_json::json!({"error": class, "next_retry_at": next_retry_at}),
        );
        let failure = Failure {
            class,
            next_retry_at,
            event: event.as_ref(),
        };
        match store
            .mark_refresh_failing(id, &self.owner, version, now, failure)
            .await
        {
            Ok(true) => {
                tracing::warn!(session = %id, provider = %provider, class, "session refresh_failing: it serves requests with the token it has while the refresh is retried");
                self.sessions.cache().invalidate(id);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(session = %id, error = %e, "cannot record the failed refresh; the lease expires on its own");
            }
        }
    }

    /// Commits rotated tokens, retrying while the store is unreachable: the
    /// provider has already rotated the refresh token, so giving up loses
    /// the session. Retries stop before our lease runs out: after that
    /// another owner may take the session and the commit would fail anyway.
    async fn commit_with_retries(
        &self,
        id: &str,
        sealed: crate::store::SealedTokens,
        version: i64,
        lease_ends: Instant,
        health: Health<'_>,
        audit: &AuditAppend,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let mut wait = Duration::from_millis(100);
        loop {
            match self
                .sessions
                .store()
                .commit_refresh(
                    id,
                    &self.owner,
                    sealed.clone(),
                    version,
                    store::now(),
                    health,
                    Some(audit),
                )
                .await
            {
                Err(e) if Instant::now() + wait + COMMIT_ATTEMPT_BUDGET < lease_ends => {
                    tracing::warn!(session = %id, error = %e, "cannot store refreshed tokens yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                result => return result,
            }
        }
    }

    /// Takes the store's refresh lease, waiting while another process holds
    /// it; returns the row under our lease, or the row another owner moved on.
    async fn lease(
        &self,
        rec: &SessionRecord,
        provider: &ProviderConfig,
    ) -> Result<Leased, RefreshError> {
        let store = self.sessions.store();
        let hold = lease_hold(provider);
        let give_up = Instant::now() + hold * 2;
        loop {
            let now = store::now_ms();
            match store
                .acquire_refresh_lease(&rec.id, &self.owner, now + hold.as_millis() as i64, now)
                .await?
            {
                Lease::Acquired(r) => return Ok(Leased::Mine(r)),
                Lease::Gone => return Err(RefreshError::Gone),
                Lease::Held { version, until_ms } => {
                    if version != rec.version {
                        let current = store
                            .session_by_id(&rec.id)
                            .await?
                            .ok_or(RefreshError::Gone)?;
                        return Ok(Leased::Moved(current));
                    }
                    if Instant::now() >= give_up {
                        return Err(RefreshError::Failed {
                            retry_after: BACKOFF_BASE,
                        });
                    }
                    // Another process is refreshing: poll its row for the result.
                    let left = Duration::from_millis((until_ms - now).clamp(1, 100) as u64);
                    tokio::time::sleep(left).await;
                }
            }
        }
    }

    /// Refreshes, in the background, the sessions of providers with
    /// `refresh_idle_after` that were neither used nor refreshed for that
    /// long, so that their refresh tokens do not lapse. Each pass walks the
    /// candidates in order of idleness with an indexed query
    /// ([`crate::store::Store::idle_sessions`], a page at a time, never
    /// every session), skips sessions used here since (not yet written) or
    /// being refreshed, and refreshes at most [`IDLE_REFRESHES_PER_SEC`]
    /// through the same single flight as every refresh. The first pass
    /// starts at a random moment within a few minutes. Runs until `stop`
    /// resolves.
    pub async fn refresh_idle(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        use rand::Rng;
        let mut idle: Vec<(String, Duration)> = self
            .endpoints
            .values()
            .filter_map(|(p, _)| p.refresh_idle_after.map(|d| (p.name.clone(), d)))
            .collect();
        idle.sort();
        let Some(shortest) = idle.iter().map(|(_, d)| *d).min() else {
            return;
        };
        let tenth = (shortest / 10).max(Duration::from_secs(1));
        tokio::pin!(stop);
        let first = IDLE_FIRST_PASS_SPREAD
            .min(tenth)
            .mul_f64(rand::rng().random_range(0.0..1.0));
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(first) => {}
        }
        let mut pace = tokio::time::interval(Duration::from_secs(1) / IDLE_REFRESHES_PER_SEC);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(IDLE_IN_FLIGHT));
        loop {
            for (provider, after) in &idle {
                let cutoff = store::now().saturating_sub(after.as_secs() as i64);
                let mut cursor: crate::store::IdleCursor = (i64::MIN, String::new());
                let mut started = 0u64;
                loop {
                    let page = match self
                        .sessions
                        .store()
                        .idle_sessions(provider, cutoff, &cursor, store::now(), IDLE_PAGE)
                        .await
                    {
                        Ok(page) => page,
                        Err(e) => {
                            tracing::warn!(provider = %provider, error = %e, "idle refresh cannot read its candidates; trying again at the next pass");
                            break;
                        }
                    };
                    let Some(last) = page.last() else { break };
                    cursor = (last.idle_since, last.id.clone());
                    let more = page.len() == IDLE_PAGE as usize;
                    for candidate in page {
                        // Used here since the cutoff, not yet in the store.
                        if self
                            .sessions
                            .uses()
                            .last(&candidate.id)
                            .is_some_and(|at| at >= cutoff)
                        {
                            continue;
                        }
                        if self
                            .flights
                            .get(&candidate.id)
                            .is_some_and(|f| f.try_lock().is_err())
                        {
                            continue;
                        }
                        let permit = tokio::select! {
                            () = &mut stop => return,
                            p = Arc::clone(&in_flight).acquire_owned() => match p {
                                Ok(p) => p,
                                Err(_) => return,
                            },
                        };
                        tokio::select! {
                            () = &mut stop => return,
                            _ = pace.tick() => {}
                        }
                        started += 1;
                        let me = Arc::clone(&self);
                        tokio::spawn(async move {
                            let _permit = permit;
                            let id = candidate.id;
                            match me
                                .spawn_refresh(
                                    id.clone(),
                                    Some(candidate.version),
                                    Why::Idle,
                                    Actor::IdleRefresh,
                                )
                                .await
                            {
                                Ok(_) => tracing::debug!(session = %id, "idle session refreshed"),
                                Err(e) => {
                                    tracing::debug!(session = %id, error = %e, "idle refresh did not refresh")
                                }
                            }
                        });
                    }
                    if !more {
                        break;
                    }
                }
                if started > 0 {
                    tracing::info!(provider = %provider, sessions = started, idle_for_s = after.as_secs(), "idle refresh: refreshing sessions nobody used or refreshed for refresh_idle_after");
                }
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(IDLE_PASS_PAUSE.min(tenth)) => {}
            }
        }
    }

    /// Refreshes, in the background, recently used cached sessions of
    /// providers with `refresh_ahead`, before they come due, so requests
    /// never wait on the token endpoint. Runs until `stop` resolves.
    pub async fn refresh_ahead(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let ahead: Vec<&ProviderConfig> = self
            .endpoints
            .values()
            .map(|(p, _)| p)
            .filter(|p| p.refresh_ahead)
            .collect();
        let Some(tick) = ahead
            .iter()
            .map(|p| (p.refresh_margin / 4).clamp(Duration::from_secs(1), Duration::from_secs(30)))
            .min()
        else {
            return;
        };
        tokio::pin!(stop);
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = interval.tick() => {}
            }
            let now = store::now();
            for id in self
                .sessions
                .uses()
                .used_since(now - RECENT_USE.as_secs() as i64)
            {
                let session = match self.sessions.by_id(&id).await {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        self.sessions.uses().forget(&id);
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(session = %id, error = %e, "refresh-ahead cannot read the session");
                        continue;
                    }
                };
                let Some((p, _)) = self.endpoints.get(&session.provider) else {
                    continue;
                };
                // Twice the margin, so the proxy's own proactive check never fires first.
                if !p.refresh_ahead
                    || session.status == Status::ReauthorizationRequired
                    || !session.due(now, p.refresh_margin * 2)
                {
                    continue;
                }
                // One attempt at a time: skip a session whose refresh is under way.
                if self.flights.get(&id).is_some_and(|f| f.try_lock().is_err()) {
                    continue;
                }
                let me = Arc::clone(&self);
                tokio::spawn(async move {
                    if let Err(e) = me.refresh_by(&session, false, Actor::RefreshAhead).await {
                        tracing::debug!(session = %session.id, error = %e, "refresh-ahead did not refresh");
                    }
                });
            }
        }
    }
}

/// Idle refresh's pace: at most this many refreshes a second, all
/// providers together (so 7,200 an hour, 144,000 in 20 hours).
pub const IDLE_REFRESHES_PER_SEC: u32 = 2;

/// Idle refreshes under way at once, at most (a slow token endpoint slows
/// idle refresh down rather than piling refreshes up).
const IDLE_IN_FLIGHT: usize = 4;

/// The first pass starts at a random moment within this (or a tenth of the
/// shortest `refresh_idle_after`, if less): instances started together do
/// not all refresh at once.
const IDLE_FIRST_PASS_SPREAD: Duration = Duration::from_secs(3 * 60);

/// The pause between passes (or a tenth of the shortest `refresh_idle_after`).
const IDLE_PASS_PAUSE: Duration = Duration::from_secs(5 * 60);

/// Candidates read from the store at once.
const IDLE_PAGE: u32 = 100;

/// Room left in the lease for one more commit attempt (a store call may
/// wait this long for a connection).
const COMMIT_ATTEMPT_BUDGET: Duration = Duration::from_secs(4);

/// Longest back-off after the store failed during a refresh.
const STORE_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// How long a refresh lease lasts: longer than our token call plus the
/// commit and its retries, so a live owner never loses it.
/// This request's refresh found the tokens refreshed by a run it waited
/// for (or another process's): its span links to that run's, when known.
fn waited_for(flight: &Flight) {
    let span = tracing::Span::current();
    if span.is_none() {
        return;
    }
    span.record("credproxy.refresh.outcome", "already_refreshed");
    if let Some(run) = &flight.run {
        crate::telemetry::trace::link(&span, run);
    }
}

fn lease_hold(provider: &ProviderConfig) -> Duration {
    provider.token_timeout + Duration::from_secs(20)
}

enum Leased {
    Mine(SessionRecord),
    Moved(SessionRecord),
}
