//! A budget shared by every instance on one PostgreSQL store: each instance
//! leases a share of it (`Budgets::lease_budget`) and spends the share
//! locally, so the hot path takes no database round trip while its share
//! lasts. A share is spent only before its lease ends; when it ends (or the
//! instance needs a new one) the lease is settled with what was used, so an
//! unused share goes back at once. A share whose instance died counts
//! until its lease ended plus one window, then never again.
//!
//! If the store does not answer, with an error or not within [`PATIENCE`]
//! (a lock held, a stalled network, a database that is down), the instance
//! paces itself meanwhile with a local window of the whole budget that
//! counts its own sends, leased ones included (the provider's own
//! refusals, held by the gate, remain the backstop), and asks the store
//! again a second after an error. A renewal runs in a task of its own,
//! never on the gate's dispatcher: however long the store takes, requests
//! go on from the fallback, and each store call gives up after
//! [`crate::store::HOT_TIMEOUT`].
//!
//! The same window of this instance's own sends gives the admission
//! estimate for a queue: the request with `k` others ahead cannot go
//! before this instance alone could send `k + 1` more (other instances'
//! sends only make it later), nor before the store said budget frees.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::window::SlidingWindow;
use crate::store::{self, BudgetAsk, Store};

/// How long requests wait for a renewal before the local fallback serves
/// them: far above a healthy round trip, far below `max_queue_wait`.
pub const PATIENCE: Duration = Duration::from_millis(500);
/// After the store failed, how long the fallback paces alone before the
/// store is asked again.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

pub struct SharedBudget {
    store: Arc<dyn Store>,
    provider: &'static str,
    instance: String,
    requests: u32,
    window: Duration,
    /// How long a lease lasts (ms): a tenth of the window, longer when the
    /// database is slow (see [`SharedBudget::renew`]).
    lease_ms: std::sync::atomic::AtomicU64,
    want: u32,
    state: std::sync::Mutex<LeaseState>,
}

#[derive(Debug)]
struct LeaseState {
    /// The lease being spent (0: none).
    id: i64,
    left: u32,
    used: u32,
    /// Sends from this lease must leave before this instant.
    ends: Instant,
    /// Do not ask the store before this instant: it said nothing is left
    /// before then, or it failed (then `fallback` is set).
    retry_at: Option<Instant>,
    /// The store did not answer (an error, or not within [`PATIENCE`]):
    /// `own` paces alone until a renewal succeeds, while one is in flight
    /// or until `retry_at`.
    fallback: bool,
    /// A renewal in flight, asked at this instant.
    renewing: Option<Instant>,
    /// This instance's own sends, leased or not: the fallback's window and
    /// the queue's estimate.
    own: SlidingWindow,
    /// The budget left for everyone, as the last lease reported it.
    remaining: u32,
}

/// Why a send cannot be taken from the share now.
pub enum Short {
    /// Nothing left anywhere until then.
    Until(Instant),
    /// The share is spent or ended: ask the store for another.
    Renew,
}

/// What a taken send is tied to, so it can be given back.
#[derive(Debug, Clone, Copy)]
pub enum Taken {
    Lease(i64, Instant),
    Fallback(Instant),
}

impl SharedBudget {
    pub fn new(
        store: Arc<dyn Store>,
        provider: &'static str,
        instance: String,
        requests: u32,
        window: Duration,
    ) -> SharedBudget {
        SharedBudget {
            store,
            provider,
            instance,
            requests,
            window,
            // Short leases waste little when an instance dies and keep
            // shares moving between instances; long enough that a share
            // of a busy budget lasts many requests.
            lease_ms: std::sync::atomic::AtomicU64::new(
                (window / 10)
                    .clamp(Duration::from_millis(200), Duration::from_secs(5))
                    .as_millis() as u64,
            ),
            // An eighth of the budget per lease: several instances can each
            // hold one while the budget is far from spent.
            want: (requests / 8).clamp(1, 500),
            state: std::sync::Mutex::new(LeaseState {
                id: 0,
                left: 0,
                used: 0,
                ends: Instant::now(),
                retry_at: None,
                fallback: false,
                renewing: None,
                own: SlidingWindow::new(requests, window),
                remaining: requests,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn try_take(&self, now: Instant) -> Result<Taken, Short> {
        let mut s = self.state();
        if s.id != 0 && s.left > 0 && now < s.ends {
            s.left -= 1;
            s.used += 1;
            s.own.record(now);
            return Ok(Taken::Lease(s.id, now));
        }
        if s.renewing.is_some_and(|t| now >= t + PATIENCE) && !s.fallback {
            tracing::warn!(
                provider = self.provider,
                "rate limit: the store is slow to lease budget; pacing this instance alone meanwhile"
            );
            s.fallback = true;
        }
        if s.fallback && (s.renewing.is_some() || s.retry_at.is_some_and(|t| now < t)) {
            return match s.own.try_take(now) {
                Ok(_) => Ok(Taken::Fallback(now)),
                Err(at) => Err(Short::Until(at)),
            };
        }
        if let Some(t) = s.renewing {
            return Err(Short::Until(t + PATIENCE));
        }
        match s.retry_at {
            Some(t) if now < t => Err(Short::Until(t)),
            _ => Err(Short::Renew),
        }
    }

    pub fn give_back(&self, taken: Taken) {
        let mut s = self.state();
        match taken {
            Taken::Lease(id, at) => {
                s.own.give_back(at);
                if id == s.id && id != 0 {
                    s.left += 1;
                    s.used = s.used.saturating_sub(1);
                }
            }
            Taken::Fallback(at) => s.own.give_back(at),
        }
    }

    /// Marks a renewal as in flight, unless one is: the caller then runs
    /// [`SharedBudget::renew`] in a task of its own.
    pub fn begin_renew(&self, now: Instant) -> bool {
        let mut s = self.state();
        if s.renewing.is_some() {
            return false;
        }
        s.renewing = Some(now);
        true
    }

    /// Settles the lease being spent and leases a new share; the renewal
    /// [`SharedBudget::begin_renew`] marked (one at a time, so renewals
    /// never race each other). Returns the new lease and when it ends, for
    /// [`SharedBudget::settle_ended`].
    pub async fn renew(&self) -> Option<(i64, Instant)> {
        let asked_at = Instant::now();
        let lease_len =
            Duration::from_millis(self.lease_ms.load(std::sync::atomic::Ordering::Relaxed));
        let (old, used) = {
            let mut s = self.state();
            let old = (s.id, s.used);
            s.id = 0;
            s.left = 0;
            s.used = 0;
            old
        };
        if old != 0 {
            if let Err(e) = store::within(self.store.settle_budget(old, used)).await {
                tracing::warn!(provider = self.provider, error = %e, "rate limit: could not settle a budget lease; its share counts until it ages out");
            }
        }
        let ask = BudgetAsk {
            provider: self.provider,
            instance: &self.instance,
            requests: self.requests,
            window_ms: self.window.as_millis() as i64,
            lease_ms: lease_len.as_millis() as i64,
            want: self.want,
        };
        let answer = store::within(self.store.lease_budget(&ask)).await;
        let mut s = self.state();
        s.renewing = None;
        match answer {
            Ok(lease) if lease.granted > 0 => {
                s.id = lease.id;
                s.left = lease.granted;
                s.used = 0;
                // The lease began at the store between asking and the
                // answer; ending it early by a fifth leaves room for the
                // last send to leave this process.
                s.ends = asked_at + lease_len.mul_f64(0.8);
                // A database slower than a fifth of the lease would hand out
                // shares that end before they can be spent: lengthen the
                // lease (up to half the window) so the round trip stays small
                // against it.
                let rtt = asked_at.elapsed();
                if rtt > lease_len / 5 {
                    let longer = (lease_len * 2)
                        .max(rtt * 5)
                        .min((self.window / 2).max(lease_len));
                    self.lease_ms.store(
                        longer.as_millis() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                s.retry_at = None;
                s.fallback = false;
                s.remaining = lease.remaining;
                Some((lease.id, s.ends))
            }
            Ok(lease) => {
                s.retry_at =
                    Some(Instant::now() + Duration::from_millis(lease.retry_in_ms.max(1) as u64));
                s.fallback = false;
                s.remaining = 0;
                None
            }
            Err(e) => {
                tracing::warn!(provider = self.provider, error = %e, "rate limit: the store cannot lease budget; pacing this instance alone for now");
                s.retry_at = Some(Instant::now() + RETRY_AFTER_ERROR);
                s.fallback = true;
                None
            }
        }
    }

    /// Settles lease `id` when it has ended, if this instance is still on
    /// it (not renewed since): its unused share goes back now, instead of
    /// counting against every instance until a window after its end while
    /// this one is idle.
    pub async fn settle_ended(&self, id: i64) {
        let used = {
            let mut s = self.state();
            if s.id != id {
                return;
            }
            let used = s.used;
            s.id = 0;
            s.left = 0;
            s.used = 0;
            used
        };
        if let Err(e) = store::within(self.store.settle_budget(id, used)).await {
            tracing::warn!(provider = self.provider, error = %e, "rate limit: could not settle a budget lease; its share counts until it ages out");
        }
    }

    /// The budget left, as this instance knows it.
    pub fn remaining(&self, now: Instant) -> u32 {
        let mut s = self.state();
        if s.fallback {
            return s.own.remaining(now);
        }
        let live = if s.id != 0 && now < s.ends { s.left } else { 0 };
        s.remaining.saturating_add(live)
    }

    /// When the request with `ahead` others queued before it could go, at
    /// the earliest: when this instance alone could have sent them all and
    /// it (other instances only make it later), and not before the store
    /// said budget frees.
    pub fn estimate(&self, now: Instant, ahead: usize) -> Instant {
        let mut s = self.state();
        let alone = s.own.estimate(now, ahead);
        match s.retry_at {
            Some(t) if t > now && !s.fallback => alone.max(t),
            _ => alone,
        }
    }

    /// Gives the unused rest of the share back, at shutdown.
    pub async fn release(&self) {
        let (id, used) = {
            let mut s = self.state();
            let old = (s.id, s.used);
            s.id = 0;
            s.left = 0;
            old
        };
        if id != 0 {
            let _ = store::within(self.store.settle_budget(id, used)).await;
        }
    }
}
