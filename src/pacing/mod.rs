//! Rate limits: every provider's budget paced across sessions (and, on
//! PostgreSQL, across instances), so applications never meet a 429.
//!
//! Each provider has one [`Gate`]. A request takes a [`Permit`] from it
//! before each send upstream (the first, and every replay).
//!
//! * **Fast path.** Nothing queued, no hold, budget left: the permit is
//!   taken under one short lock (none at all for a provider without a
//!   configured budget while it is calm).
//! * **The queue.** Otherwise the request joins the queue and one
//!   dispatcher task per gate hands out permits as the budget allows:
//!   each session's requests in order, sessions taking turns (round
//!   robin, `queue.rs`), so one session's burst cannot starve another
//!   session's single request, and no starvation. A request that could
//!   not go within `max_queue_wait` is answered 429 `rate_limited` with a
//!   `Retry-After` from the budget (at once when the budget already says it
//!   cannot). A waiter whose client hung up is skipped; a permit that was
//!   never used gives its send back.
//! * **Holds.** An upstream refusal (429, or Spark's 503 with code 1550)
//!   holds the whole gate until its `Retry-After` (a jittered back-off
//!   without one). After a hold, one request goes alone (a probe); each
//!   answer that is not a refusal doubles how many may be in flight, so
//!   one refusal never becomes a burst of them. Only answers to requests
//!   sent since the latest refusal count (see [`Permit`]'s `episode`):
//!   the others were sent before the provider said anything.
//!
//! **Invariant:** with a budget of N per W, no more than N permits are
//! handed out in any window of W plus the margin (`window.rs` locally,
//! `shared.rs` across instances).

mod queue;
mod shared;
pub mod window;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::config::RateLimit;
use crate::store::Store;
use shared::{SharedBudget, Short, Taken};
use window::SlidingWindow;

/// In-flight requests after a hold at which the gate is calm again.
const RAMP_OPEN: u32 = 32;
/// The back-off after a refusal without `Retry-After`: first, and at most.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A `Retry-After` longer than this is taken as this.
const HOLD_MAX: Duration = Duration::from_secs(15 * 60);

/// The window a budget is kept in: `per` plus a margin for the jitter
/// between leaving here and arriving there (2 %, 100 ms to 5 s).
pub fn effective_window(per: Duration) -> Duration {
    per + (per / 50).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// A provider's budget, where it is kept.
enum Budget {
    Local(std::sync::Mutex<SlidingWindow>),
    Shared(SharedBudget),
}

/// A taken send, to give back if it never happens.
#[derive(Debug, Clone, Copy)]
enum Spent {
    Nothing,
    Local(Instant),
    Shared(Taken),
}

enum NotNow {
    Until(Instant),
    Renew,
}

impl Budget {
    /// Takes one send; says what was spent and how much is left.
    fn try_take(&self, now: Instant) -> Result<(Spent, Option<u32>), NotNow> {
        match self {
            Budget::Local(w) => match lock(w).try_take(now) {
                Ok(left) => Ok((Spent::Local(now), Some(left))),
                Err(at) => Err(NotNow::Until(at)),
            },
            Budget::Shared(s) => match s.try_take(now) {
                Ok(t) => Ok((Spent::Shared(t), None)),
                Err(Short::Until(at)) => Err(NotNow::Until(at)),
                Err(Short::Renew) => Err(NotNow::Renew),
            },
        }
    }

    fn give_back(&self, spent: Spent) {
        match (self, spent) {
            (Budget::Local(w), Spent::Local(at)) => lock(w).give_back(at),
            (Budget::Shared(s), Spent::Shared(t)) => s.give_back(t),
            _ => {}
        }
    }

    fn remaining(&self, now: Instant) -> u32 {
        match self {
            Budget::Local(w) => lock(w).remaining(now),
            Budget::Shared(s) => s.remaining(now),
        }
    }

    fn estimate(&self, now: Instant, ahead: usize) -> Instant {
        match self {
            Budget::Local(w) => lock(w).estimate(now, ahead),
            Budget::Shared(s) => s.estimate(now, ahead),
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The gate's metrics, resolved once per provider.
#[derive(Clone, Default)]
pub struct GateMetrics {
    /// How long held requests waited (only requests that waited).
    pub waited: Option<Histogram>,
    /// Refusals (429 / 1550) from the upstream.
    pub upstream_refusals: Counter,
    /// `rate_limited` answers credproxy made.
    pub limited: Counter,
    /// The budget left (configured budgets only).
    pub remaining: Gauge,
}

pub struct Gate {
    provider: &'static str,
    budget: Option<Budget>,
    max_wait: Duration,
    /// No budget, no hold, no ramp, no queue: an unbudgeted provider's
    /// requests take no lock.
    calm: AtomicBool,
    inner: std::sync::Mutex<Inner>,
    /// Wakes the dispatcher: a waiter joined, a permit ended, a hold moved.
    changed: Notify,
    metrics: GateMetrics,
}

#[derive(Default)]
struct Inner {
    queue: queue::FairQueue,
    /// Counts the refusals that began a hold; a permit carries the value
    /// it was taken under, so the gate knows an answer to a request sent
    /// before the latest refusal from one sent since.
    episode: u64,
    hold_until: Option<Instant>,
    /// After a hold: how many may be in flight (1: the probe).
    cap: Option<u32>,
    in_flight: u32,
    backoff: Duration,
    dispatching: bool,
}

/// Leave to send one request upstream.
pub struct Permit {
    gate: Option<Arc<Gate>>,
    spent: Spent,
    counted: bool,
    sent: bool,
    /// The gate's `episode` when this permit was taken; `None`: taken
    /// while the gate was calm (so before any refusal it now holds for).
    episode: Option<u64>,
    /// How long the request waited for it (zero on the fast path).
    pub waited: Duration,
}

/// The answer when no permit can be had in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub retry_after_secs: u64,
}

/// What an upstream answer says about the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    Refused { retry_after: Option<Duration> },
}

impl Permit {
    /// The request is about to leave: its send is spent whatever happens.
    pub fn sent(&mut self) {
        self.sent = true;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(gate) = self.gate.take() else {
            return;
        };
        let mut gave_back = false;
        if !self.sent {
            if let Some(b) = &gate.budget {
                b.give_back(self.spent);
                gave_back = !matches!(self.spent, Spent::Nothing);
            }
        }
        if self.counted || gave_back {
            let mut g = lock(&gate.inner);
            if self.counted {
                g.in_flight = g.in_flight.saturating_sub(1);
            }
            // The dispatcher may be asleep until the window frees (a send
            // given back frees it now) or until a permit ends (the ramp).
            let wake = !g.queue.is_empty() && (gave_back || (self.counted && g.cap.is_some()));
            drop(g);
            if wake {
                gate.changed.notify_one();
            }
        }
    }
}

impl Gate {
    pub fn new(
        provider: &'static str,
        limit: Option<RateLimit>,
        max_wait: Duration,
        shared: Option<(&Arc<dyn Store>, &str)>,
        metrics: GateMetrics,
    ) -> Arc<Gate> {
        let budget = limit.map(|l| {
            let window = effective_window(l.per);
            if let Some((store, instance)) = shared {
                Budget::Shared(SharedBudget::new(
                    Arc::clone(store),
                    provider,
                    instance.to_owned(),
                    l.requests,
                    window,
                ))
            } else {
                Budget::Local(std::sync::Mutex::new(SlidingWindow::new(
                    l.requests, window,
                )))
            }
        });
        if let Some(l) = limit {
            metrics.remaining.set(i64::from(l.requests));
        }
        Arc::new(Gate {
            provider,
            calm: AtomicBool::new(budget.is_none()),
            budget,
            max_wait,
            inner: std::sync::Mutex::new(Inner {
                backoff: BACKOFF_FIRST,
                ..Inner::default()
            }),
            changed: Notify::new(),
            metrics,
        })
    }

    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Until when the provider's requests are held after a refusal.
    pub fn held_until(&self) -> Option<Instant> {
        lock(&self.inner).hold_until
    }

    fn permit(self: &Arc<Self>, spent: Spent, counted: bool, episode: u64) -> Permit {
        Permit {
            gate: Some(Arc::clone(self)),
            spent,
            counted,
            sent: false,
            episode: Some(episode),
            waited: Duration::ZERO,
        }
    }

    /// Waits for leave to send, until `deadline`. `front` puts the request
    /// at the head of the queue: it was admitted before and is being sent
    /// again (after a refusal, or a refreshed token).
    pub async fn acquire(
        self: &Arc<Self>,
        deadline: Instant,
        front: bool,
    ) -> Result<Permit, Limited> {
        self.acquire_by(&mut Some(deadline), front, "").await
    }

    /// [`Gate::acquire`] for a request whose deadline is set by its first
    /// wait: `now + max_queue_wait` then, so a request that never waits
    /// reads no clock for it. `session` (its id) gets a fair share of the
    /// queue: sessions take turns (see `queue.rs`).
    pub async fn acquire_by(
        self: &Arc<Self>,
        deadline: &mut Option<Instant>,
        front: bool,
        session: &str,
    ) -> Result<Permit, Limited> {
        if self.calm.load(Ordering::Acquire) {
            return Ok(Permit {
                gate: None,
                spent: Spent::Nothing,
                counted: false,
                sent: false,
                episode: None,
                waited: Duration::ZERO,
            });
        }
        let start = Instant::now();
        let deadline = *deadline.get_or_insert(start + self.max_wait);
        let rx = {
            let mut g = lock(&self.inner);
            let now = Instant::now();
            if g.queue.is_empty() && g.hold_until.is_none_or(|h| h <= now) {
                g.hold_until = None;
                if g.cap.is_none_or(|c| g.in_flight < c) {
                    match self.budget.as_ref().map(|b| b.try_take(now)) {
                        None => {
                            let counted = g.cap.is_some();
                            if counted {
                                g.in_flight += 1;
                            }
                            return Ok(self.permit(Spent::Nothing, counted, g.episode));
                        }
                        Some(Ok((spent, left))) => {
                            let counted = g.cap.is_some();
                            if counted {
                                g.in_flight += 1;
                            }
                            let episode = g.episode;
                            drop(g);
                            match left {
                                Some(left) => {
                                    self.metrics.remaining.set(i64::from(left));
                                }
                                None => self.note_remaining(now),
                            }
                            return Ok(self.permit(spent, counted, episode));
                        }
                        Some(Err(_)) => {}
                    }
                }
            }
            let who = (!front).then(|| queue::session_key(session));
            let ahead = who.map_or(0, |s| g.queue.ahead(s));
            let at = self.estimate(&g, now, ahead);
            if at > deadline {
                drop(g);
                return Err(self.limited(at, now));
            }
            let (tx, rx) = oneshot::channel();
            match who {
                None => g.queue.push_front(tx),
                Some(s) => g.queue.push_back(s, tx),
            }
            if !g.dispatching {
                g.dispatching = true;
                tokio::spawn(Arc::clone(self).dispatch());
            }
            rx
        };
        self.changed.notify_one();
        let wait = tokio::time::timeout_at(deadline, rx);
        let waited = if crate::telemetry::traces_on() {
            use tracing::Instrument;
            let span = tracing::info_span!(
                target: crate::telemetry::TARGET,
                "wait for budget",
                credproxy.provider = self.provider,
            );
            wait.instrument(span).await
        } else {
            wait.await
        };
        match waited {
            Ok(Ok(mut permit)) => {
                permit.waited = start.elapsed();
                if let Some(h) = &self.metrics.waited {
                    h.observe(permit.waited.as_secs_f64());
                }
                Ok(permit)
            }
            // The dispatcher is gone (the runtime is shutting down) or the
            // deadline passed; dropping the receiver takes us off the queue.
            _ => {
                let now = Instant::now();
                let at = {
                    let g = lock(&self.inner);
                    self.estimate(&g, now, 0)
                };
                Err(self.limited(at, now))
            }
        }
    }

    /// When the request with `ahead` others before it could go.
    fn estimate(&self, g: &Inner, now: Instant, ahead: usize) -> Instant {
        let held = g.hold_until.filter(|&h| h > now);
        let by_budget = self
            .budget
            .as_ref()
            .map_or(now, |b| b.estimate(held.unwrap_or(now), ahead));
        held.map_or(by_budget, |h| h.max(by_budget))
    }

    fn limited(&self, at: Instant, now: Instant) -> Limited {
        self.metrics.limited.inc();
        let secs = at
            .saturating_duration_since(now)
            .as_secs_f64()
            .ceil()
            .max(1.0);
        Limited {
            retry_after_secs: secs as u64,
        }
    }

    fn note_remaining(&self, now: Instant) {
        if let Some(b) = &self.budget {
            self.metrics.remaining.set(i64::from(b.remaining(now)));
        }
    }

    /// The budget left now (configured budgets only), for `/metrics`.
    pub fn refresh_remaining(&self) {
        self.note_remaining(Instant::now());
    }

    /// Tells the gate how the upstream answered the request sent with
    /// `permit`.
    ///
    /// Only an answer to a request sent since the latest refusal moves the
    /// gate: the others left before the provider refused anything, so their
    /// acceptance says nothing about the budget now (counting them would
    /// open the ramp before the probe went) and their refusal is the same
    /// one again (counting it would double the back-off once per request
    /// that was in flight). A stale refusal's `Retry-After` still lengthens
    /// the hold.
    pub fn answered(&self, permit: &Permit, verdict: Verdict) {
        if verdict == Verdict::Accepted && self.calm.load(Ordering::Acquire) {
            return;
        }
        let mut g = lock(&self.inner);
        // `calm` changes only under the lock, so this reads it as it is.
        let current = match permit.episode {
            Some(e) => e == g.episode,
            None => self.calm.load(Ordering::Acquire),
        };
        match verdict {
            Verdict::Accepted if !current => {}
            Verdict::Accepted => {
                g.backoff = BACKOFF_FIRST;
                if let Some(cap) = g.cap {
                    let next = cap.saturating_mul(2);
                    g.cap = (next < RAMP_OPEN).then_some(next);
                    if g.cap.is_none()
                        && g.hold_until.is_none()
                        && g.queue.is_empty()
                        && self.budget.is_none()
                    {
                        // Under the lock: a refusal taking it next must
                        // find (and clear) it set, not have it set after.
                        self.calm.store(true, Ordering::Release);
                    }
                    let wake = !g.queue.is_empty();
                    drop(g);
                    if wake {
                        self.changed.notify_one();
                    }
                }
            }
            Verdict::Refused { retry_after } => {
                self.metrics.upstream_refusals.inc();
                let retry_after = retry_after.filter(|d| !d.is_zero());
                if !current {
                    // The same refusal again: only a longer hold counts.
                    if let Some(d) = retry_after {
                        let until = Instant::now() + d.min(HOLD_MAX);
                        if g.hold_until.is_some_and(|h| h < until) {
                            g.hold_until = Some(until);
                            drop(g);
                            self.changed.notify_one();
                        }
                    }
                    return;
                }
                let wait = match retry_after {
                    Some(d) => d.min(HOLD_MAX),
                    // `Retry-After: 0`, or a date already past (the
                    // provider's clock behind ours), gives no time to wait:
                    // a resend at once meets the same refusal. Back off as
                    // without one.
                    None => {
                        let b = g.backoff;
                        g.backoff = (b * 2).min(BACKOFF_MAX);
                        // Full jitter over the upper half: instances that
                        // were refused together do not come back together.
                        b.mul_f64(0.5 + rand::random::<f64>() * 0.5)
                    }
                };
                let until = Instant::now() + wait;
                if g.hold_until.is_none_or(|h| h < until) {
                    g.hold_until = Some(until);
                }
                g.episode += 1;
                g.cap = Some(1);
                self.calm.store(false, Ordering::Release);
                tracing::warn!(
                    provider = self.provider,
                    hold_ms = wait.as_millis() as u64,
                    "the provider refused a request for its rate limit; holding its requests"
                );
                drop(g);
                self.changed.notify_one();
            }
        }
    }

    /// Hands out permits in queue order as the hold, the ramp and the
    /// budget allow; exits when the queue is empty.
    async fn dispatch(self: Arc<Self>) {
        loop {
            let mut renew = false;
            let wait_until = {
                let mut g = lock(&self.inner);
                g.queue.prune_head();
                if g.queue.is_empty() {
                    g.dispatching = false;
                    if g.cap.is_none() && g.hold_until.is_none() && self.budget.is_none() {
                        self.calm.store(true, Ordering::Release);
                    }
                    return;
                }
                let now = Instant::now();
                match g.hold_until {
                    Some(h) if h > now => Some(h),
                    _ => {
                        g.hold_until = None;
                        if g.cap.is_some_and(|c| g.in_flight >= c) {
                            None // a permit's end wakes us
                        } else {
                            let took = match &self.budget {
                                None => Ok((Spent::Nothing, None)),
                                Some(b) => b.try_take(now),
                            };
                            match took {
                                Ok((spent, _)) => {
                                    let counted = g.cap.is_some();
                                    if counted {
                                        g.in_flight += 1;
                                    }
                                    let tx = g.queue.pop();
                                    let episode = g.episode;
                                    drop(g);
                                    let permit = self.permit(spent, counted, episode);
                                    if let Some(tx) = tx {
                                        // A waiter gone since: the permit
                                        // drops here and gives its send back.
                                        let _ = tx.send(permit);
                                    }
                                    self.note_remaining(now);
                                    continue;
                                }
                                Err(NotNow::Until(at)) => Some(at),
                                Err(NotNow::Renew) => {
                                    renew = true;
                                    None
                                }
                            }
                        }
                    }
                }
            };
            if renew {
                // In a task of its own: however long the store takes, the
                // dispatcher goes on (from the local fallback after
                // `shared::PATIENCE`); the renewal wakes it when it is done.
                if let Some(Budget::Shared(s)) = &self.budget {
                    if s.begin_renew(Instant::now()) {
                        tokio::spawn(Arc::clone(&self).renew());
                    }
                }
                continue;
            }
            match wait_until {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }

    /// Renews the shared budget's lease (see [`SharedBudget::begin_renew`]),
    /// then wakes the dispatcher.
    async fn renew(self: Arc<Self>) {
        let Some(Budget::Shared(s)) = &self.budget else {
            return;
        };
        let lease = s.renew().await;
        self.changed.notify_one();
        if let Some((id, ends)) = lease {
            // Settled at its end, used or not: an idle instance's share
            // must not wait for its next request to go back.
            let gate = Arc::downgrade(&self);
            drop(self);
            tokio::time::sleep_until(ends).await;
            if let Some(gate) = gate.upgrade() {
                if let Some(Budget::Shared(s)) = &gate.budget {
                    s.settle_ended(id).await;
                }
            }
        }
    }

    /// Gives an instance's unused share back (shutdown).
    pub async fn release(&self) {
        if let Some(Budget::Shared(s)) = &self.budget {
            s.release().await;
        }
    }
}

/// Whether an upstream answer is a refusal for the rate limit: 429, or
/// another of the provider's `throttled` answers (`throttled` says whether
/// the caller found it so, e.g. Spark's 503 whose body carries code 1550). `Retry-After` may be seconds or an HTTP date.
pub fn verdict(status: http::StatusCode, headers: &http::HeaderMap, throttled: bool) -> Verdict {
    if status != http::StatusCode::TOO_MANY_REQUESTS && !throttled {
        return Verdict::Accepted;
    }
    let retry_after = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    Verdict::Refused { retry_after }
}

fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Whether a refused request may be sent again: its body was kept, and its
/// method is idempotent, or it is a POST that Spark reads as a GET.
pub fn resendable(method: &http::Method, headers: &http::HeaderMap) -> bool {
    use http::Method;
    match *method {
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE => true,
        Method::POST => headers
            .get("x-http-method-override")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"GET")),
        _ => false,
    }
}

/// One gate per provider, in route order.
pub struct Pacer {
    gates: Vec<Arc<Gate>>,
}

impl Pacer {
    pub fn new(gates: Vec<Arc<Gate>>) -> Pacer {
        Pacer { gates }
    }

    pub fn gate(&self, i: usize) -> &Arc<Gate> {
        &self.gates[i]
    }

    pub fn gates(&self) -> &[Arc<Gate>] {
        &self.gates
    }
}

#[cfg(test)]
mod tests;
