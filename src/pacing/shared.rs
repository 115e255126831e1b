//! A budget shared by every instance on one PostgreSQL store: each instance
//! leases a share of it (`Store::lease_budget`) and spends the share
//! locally, so the hot path takes no database round trip while its share
//! lasts. A share is spent only before its lease ends; when it ends (or the
//! instance needs a new one) the lease is settled with what was used, so an
//! unused share goes back at once. A share whose instance died counts
//! until its lease ended plus one window, then never again.
//!
//! If the store cannot be reached, the instance paces itself with a local
//! window of the whole budget (the provider's own refusals, held by the
//! gate, remain the backstop) and asks the store again a second later.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::window::SlidingWindow;
use crate::store::{BudgetAsk, Store};

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
    /// The store said nothing is left before this instant.
    retry_at: Option<Instant>,
    /// While the store cannot be reached: a local window, until `retry_at`.
    fallback: Option<SlidingWindow>,
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
    Lease(i64),
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
                fallback: None,
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
        let falling_back = s.retry_at.is_some_and(|t| now < t);
        if let (true, Some(fallback)) = (falling_back, &mut s.fallback) {
            return match fallback.try_take(now) {
                Ok(_) => Ok(Taken::Fallback(now)),
                Err(at) => Err(Short::Until(at)),
            };
        }
        if s.id != 0 && s.left > 0 && now < s.ends {
            s.left -= 1;
            s.used += 1;
            return Ok(Taken::Lease(s.id));
        }
        match s.retry_at {
            Some(t) if now < t => Err(Short::Until(t)),
            _ => Err(Short::Renew),
        }
    }

    pub fn give_back(&self, taken: Taken) {
        let mut s = self.state();
        match taken {
            Taken::Lease(id) if id == s.id && id != 0 => {
                s.left += 1;
                s.used = s.used.saturating_sub(1);
            }
            Taken::Fallback(at) => {
                if let Some(f) = &mut s.fallback {
                    f.give_back(at);
                }
            }
            Taken::Lease(_) => {}
        }
    }

    /// Settles the lease being spent and leases a new share. Only the gate's
    /// dispatcher calls this, so renewals never race each other. Returns the
    /// new lease and when it ends, for [`SharedBudget::settle_ended`].
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
            if let Err(e) = self.store.settle_budget(old, used).await {
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
        let answer = self.store.lease_budget(&ask).await;
        let mut s = self.state();
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
                s.fallback = None;
                s.remaining = lease.remaining;
                Some((lease.id, s.ends))
            }
            Ok(lease) => {
                s.retry_at =
                    Some(Instant::now() + Duration::from_millis(lease.retry_in_ms.max(1) as u64));
                s.fallback = None;
                s.remaining = 0;
                None
            }
            Err(e) => {
                tracing::warn!(provider = self.provider, error = %e, "rate limit: the store cannot lease budget; pacing this instance alone for now");
                s.retry_at = Some(Instant::now() + Duration::from_secs(1));
                if s.fallback.is_none() {
                    s.fallback = Some(SlidingWindow::new(self.requests, self.window));
                }
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
        if let Err(e) = self.store.settle_budget(id, used).await {
            tracing::warn!(provider = self.provider, error = %e, "rate limit: could not settle a budget lease; its share counts until it ages out");
        }
    }

    /// The budget left, as this instance knows it.
    pub fn remaining(&self, now: Instant) -> u32 {
        let mut s = self.state();
        if let Some(f) = &mut s.fallback {
            return f.remaining(now);
        }
        let live = if s.id != 0 && now < s.ends { s.left } else { 0 };
        s.remaining.saturating_add(live)
    }

    /// When the next send could go, as far as this instance can tell.
    pub fn estimate(&self, now: Instant) -> Instant {
        let s = self.state();
        match s.retry_at {
            Some(t) if t > now => t,
            _ => now,
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
            let _ = self.store.settle_budget(id, used).await;
        }
    }
}
