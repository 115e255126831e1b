//! A request budget enforced the way Spark enforces its per-key limit: at
//! most [`Budget::requests`] API requests in any window of length
//! [`Budget::per`], a true sliding window over arrival times (not a token
//! bucket, which would let through bursts that Spark refuses).
//!
//! The window logic ([`Window`]) is a pure struct that takes `now` as an
//! argument, so it is tested without sleeping; the stand-in feeds it the
//! Tokio clock (which follows `tokio::time::pause` in tests).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A request budget for a stand-in's API (see [`crate::Standin::set_budget`]):
/// at most `requests` API requests in any window of length `per`.
///
/// Counted per stand-in, all tokens and sessions together (Spark budgets per
/// client key, and a proxy uses one client), over both listeners (the API
/// host and the replication host). Only API requests count: not the token
/// endpoint, not the authorisation pages, not a request whose body broke
/// off, not one refused by an [`crate::ApiFault`] in force (those are
/// answered before the budget is consulted). A request the budget accepts
/// counts whatever its credentials then turn out to be worth.
///
/// A request beyond the budget is refused and is **not** counted toward the
/// window: Spark does not count refused requests, so a client that keeps
/// retrying while refused is let in again as soon as the oldest counted
/// request has left the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Requests allowed in any window of length `per` (0 refuses every request).
    pub requests: u32,
    /// The window's length (zero: no limit).
    pub per: Duration,
    /// How a request beyond the budget is answered.
    pub refusal: Refusal,
    /// Send `Retry-After` (whole seconds, rounded up: when the oldest counted
    /// request leaves the window, so a retry then is accepted) with a refusal.
    /// `false` exercises a client's back-off when there is none.
    pub retry_after: bool,
}

impl Budget {
    /// `requests` per `per`, refused with 429 and `Retry-After`.
    pub fn new(requests: u32, per: Duration) -> Budget {
        Budget {
            requests,
            per,
            refusal: Refusal::TooManyRequests,
            retry_after: true,
        }
    }

    /// Spark's budget for an IDX key: 1,500 requests per 5 minutes.
    pub fn spark_idx() -> Budget {
        Budget::new(1500, Duration::from_secs(300))
    }
}

/// How a request beyond a [`Budget`] is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `429 Too Many Requests`. Spark: body `{"D":{"Success":false,"Code":1550,
    /// "Message":"Over rate limit"}}`; Zillow: `{"error":"rate_limited",...}`.
    TooManyRequests,
    /// Spark's `503 Service Unavailable` with the same 1550 body. The Zillow
    /// stand-in has no such variant and answers 429 as for
    /// [`Refusal::TooManyRequests`].
    Spark1550,
}

/// The sliding window: the arrival times of the counted requests still in it.
#[derive(Debug)]
pub(crate) struct Window {
    requests: u32,
    per: Duration,
    /// Accepted arrivals less than `per` before the latest `now`, oldest first.
    counted: VecDeque<Instant>,
}

impl Window {
    pub(crate) fn new(requests: u32, per: Duration) -> Window {
        Window {
            requests,
            per,
            counted: VecDeque::new(),
        }
    }

    /// Decides a request that arrives at `now` (not earlier than any `now`
    /// given before). `Ok`: accepted, and counted. `Err(wait)`: refused, not
    /// counted; `wait` is how long until the oldest counted request leaves
    /// the window (then one more is accepted).
    ///
    /// A request at `t` is in the window at `now` while `now - t < per`: the
    /// windows are half-open, so at most `requests` accepted arrivals lie in
    /// any `[s, s + per)`.
    pub(crate) fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        while let Some(&oldest) = self.counted.front() {
            if now.saturating_duration_since(oldest) >= self.per {
                self.counted.pop_front();
            } else {
                break;
            }
        }
        if (self.counted.len() as u64) < u64::from(self.requests) {
            self.counted.push_back(now);
            return Ok(());
        }
        Err(match self.counted.front() {
            Some(&oldest) => self.per - now.saturating_duration_since(oldest),
            // A budget of 0 requests: nothing will ever leave.
            None => self.per,
        })
    }
}

/// `wait` in whole seconds, rounded up (a `Retry-After` that is never early).
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// The most of `arrivals` (in order) that lie in any window `[s, s + per)`.
pub(crate) fn max_in_any_window(arrivals: &[Instant], per: Duration) -> u32 {
    let mut best = 0usize;
    let mut start = 0usize;
    for (end, &t) in arrivals.iter().enumerate() {
        while start < end && t.saturating_duration_since(arrivals[start]) >= per {
            start += 1;
        }
        // With per == 0 no window holds anything.
        let n = if per.is_zero() { 0 } else { end + 1 - start };
        best = best.max(n);
    }
    u32::try_from(best).unwrap_or(u32::MAX)
}

/// The budget in force and what it has seen (behind one lock in `Shared`).
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) budget: Option<Budget>,
    window: Option<Window>,
    /// Accepted arrivals since the budget was set or the observations cleared.
    pub(crate) accepted: Vec<Instant>,
}

/// What the budget says about one API request.
pub(crate) enum Verdict {
    Accepted,
    /// Refused: answer as `refusal`, with `Retry-After: seconds` if `Some`.
    Refused {
        refusal: Refusal,
        retry_after: Option<u64>,
    },
}

impl State {
    /// Puts `budget` in force with an empty window and no observations, or
    /// (`None`) stops enforcing (the observations are kept).
    pub(crate) fn set(&mut self, budget: Option<Budget>) {
        self.budget = budget;
        self.window = budget.map(|b| Window::new(b.requests, b.per));
        if budget.is_some() {
            self.accepted.clear();
        }
    }

    /// Decides a request that arrives at `now`; `None` when no budget is set.
    pub(crate) fn decide(&mut self, now: Instant) -> Option<Verdict> {
        let budget = self.budget?;
        let window = self.window.as_mut()?;
        Some(match window.admit(now) {
            Ok(()) => {
                self.accepted.push(now);
                Verdict::Accepted
            }
            Err(wait) => Verdict::Refused {
                refusal: budget.refusal,
                retry_after: budget.retry_after.then(|| retry_after_secs(wait)),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Feeds `window` arrivals at `t0 + offsets` (ms); which were accepted.
    fn run(window: &mut Window, t0: Instant, offsets: &[u64]) -> Vec<bool> {
        offsets
            .iter()
            .map(|&o| window.admit(t0 + ms(o)).is_ok())
            .collect()
    }

    #[test]
    fn exactly_n_in_any_window() {
        let t0 = Instant::now();
        let mut w = Window::new(3, ms(1000));
        // A burst of five: three in, two out.
        assert_eq!(
            run(&mut w, t0, &[0, 0, 1, 2, 999]),
            [true, true, true, false, false]
        );
        // Exactly `per` after them, the two at 0 have left (half-open windows).
        assert_eq!(run(&mut w, t0, &[1000]), [true]);
        assert_eq!(run(&mut w, t0, &[1000]), [true]);
        // The third (at 1 ms) is still in until 1001 ms.
        assert_eq!(run(&mut w, t0, &[1000, 1001, 1001]), [false, true, false]);
    }

    #[test]
    fn a_sliding_window_not_fixed_buckets() {
        // Fixed one-second buckets would let 3 in at 900..999 and 3 more at
        // 1000..1100: six in 200 ms. The sliding window does not.
        let t0 = Instant::now();
        let mut w = Window::new(3, ms(1000));
        let offsets = [900, 950, 999, 1000, 1050, 1100, 1899, 1900, 1950, 1999];
        let got = run(&mut w, t0, &offsets);
        assert_eq!(
            got,
            [true, true, true, false, false, false, false, true, true, true]
        );
        let accepted: Vec<Instant> = offsets
            .iter()
            .zip(&got)
            .filter(|(_, &ok)| ok)
            .map(|(&o, _)| t0 + ms(o))
            .collect();
        assert_eq!(max_in_any_window(&accepted, ms(1000)), 3);
        assert_eq!(max_in_any_window(&accepted, ms(1001)), 4);
    }

    #[test]
    fn refused_requests_do_not_count() {
        let t0 = Instant::now();
        let mut w = Window::new(2, ms(1000));
        assert_eq!(run(&mut w, t0, &[0, 500]), [true, true]);
        // A client hammering while refused...
        let hammering: Vec<u64> = (501..1000).collect();
        assert!(run(&mut w, t0, &hammering).iter().all(|ok| !ok));
        // ...is let in as soon as the first accepted one leaves, as if it had
        // never been refused; then the second one's slot frees at 1500.
        assert_eq!(
            run(&mut w, t0, &[1000, 1001, 1499, 1500]),
            [true, false, false, true]
        );
    }

    #[test]
    fn retry_after_is_when_the_oldest_counted_leaves() {
        let t0 = Instant::now();
        let mut w = Window::new(2, Duration::from_secs(300));
        assert!(w.admit(t0).is_ok());
        assert!(w.admit(t0 + Duration::from_secs(10)).is_ok());
        let refused_at = t0 + Duration::from_millis(100_250);
        assert_eq!(w.admit(refused_at), Err(ms(199_750)));
        assert_eq!(retry_after_secs(ms(199_750)), 200);
        // Retrying after Retry-After is accepted.
        assert!(w.admit(refused_at + Duration::from_secs(200)).is_ok());

        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn degenerate_budgets() {
        let t0 = Instant::now();
        let mut none = Window::new(0, Duration::from_secs(2));
        assert_eq!(none.admit(t0), Err(Duration::from_secs(2)));
        let mut unlimited = Window::new(1, Duration::ZERO);
        assert!(run(&mut unlimited, t0, &[0, 0, 0]).iter().all(|&ok| ok));
        assert_eq!(max_in_any_window(&[t0, t0], Duration::ZERO), 0);
        assert_eq!(max_in_any_window(&[], ms(1)), 0);
    }

    #[test]
    fn state_records_accepted_arrivals_and_verdicts() {
        let t0 = Instant::now();
        let mut s = State::default();
        assert!(s.decide(t0).is_none());
        s.set(Some(Budget {
            requests: 1,
            per: Duration::from_secs(2),
            refusal: Refusal::Spark1550,
            retry_after: true,
        }));
        assert!(matches!(s.decide(t0), Some(Verdict::Accepted)));
        assert!(matches!(
            s.decide(t0 + ms(500)),
            Some(Verdict::Refused {
                refusal: Refusal::Spark1550,
                retry_after: Some(2),
            })
        ));
        s.set(Some(Budget {
            retry_after: false,
            ..Budget::new(1, Duration::from_secs(2))
        }));
        assert!(s.accepted.is_empty(), "a new budget starts afresh");
        assert!(matches!(s.decide(t0 + ms(600)), Some(Verdict::Accepted)));
        assert!(matches!(
            s.decide(t0 + ms(700)),
            Some(Verdict::Refused {
                refusal: Refusal::TooManyRequests,
                retry_after: None,
            })
        ));
        assert_eq!(s.accepted, [t0 + ms(600)]);
        s.set(None);
        assert!(s.decide(t0 + ms(800)).is_none());
        assert_eq!(
            s.accepted.len(),
            1,
            "turning the budget off keeps the history"
        );
    }
}
