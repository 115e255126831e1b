//! One process's budget: at most `requests` sends in any window of length
//! `window`, counted exactly as the provider counts arrivals (a sliding
//! log, not a token bucket: a bucket with the same average lets through
//! bursts that Spark refuses).
//!
//! Every function takes `now`, so the window is tested without a clock.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct SlidingWindow {
    requests: u32,
    window: Duration,
    /// Send times still inside the window, oldest first (at most
    /// `requests`, unless [`SlidingWindow::record`] added more).
    sent: VecDeque<Instant>,
}

impl SlidingWindow {
    pub fn new(requests: u32, window: Duration) -> SlidingWindow {
        SlidingWindow {
            requests: requests.max(1),
            window,
            sent: VecDeque::with_capacity(requests.clamp(1, 4096) as usize),
        }
    }

    fn prune(&mut self, now: Instant) {
        while self.sent.front().is_some_and(|&t| t + self.window <= now) {
            self.sent.pop_front();
        }
    }

    /// Takes one send at `now` and says how many are left, or says when
    /// the next one may go.
    pub fn try_take(&mut self, now: Instant) -> Result<u32, Instant> {
        self.prune(now);
        if self.sent.len() < self.requests as usize {
            self.sent.push_back(now);
            return Ok(self.requests - self.sent.len() as u32);
        }
        // Full: one goes when all but `requests - 1` have left the window
        // (the oldest, unless `record` overfilled it).
        let i = self.sent.len() - self.requests as usize;
        Err(self.sent.get(i).map_or(now, |&t| t + self.window))
    }

    /// Records a send at `now` made whether or not the window had room (a
    /// send on a lease of a shared budget: the window only keeps count).
    pub fn record(&mut self, now: Instant) {
        self.prune(now);
        self.sent.push_back(now);
    }

    /// Gives back a send taken at `at` that never happened (its caller left).
    pub fn give_back(&mut self, at: Instant) {
        if let Some(i) = self.sent.iter().rposition(|&t| t == at) {
            self.sent.remove(i);
        }
    }

    /// How many more could go at `now`.
    pub fn remaining(&mut self, now: Instant) -> u32 {
        self.prune(now);
        (self.requests as usize).saturating_sub(self.sent.len()) as u32
    }

    /// When the request with `ahead` others queued before it could go, if
    /// each of them goes as early as the window allows.
    ///
    /// With the sends in the window `t_0..t_{m-1}`, the `j`-th next send
    /// goes at `f_j = max(now, t_{m+j-N} + W)` (`now` while `m+j < N`), and
    /// past the first `N` the pattern repeats one window later:
    /// `f_j = f_{j-N} + W`.
    pub fn estimate(&mut self, now: Instant, ahead: usize) -> Instant {
        self.prune(now);
        let n = self.requests as usize;
        let m = self.sent.len();
        let (rounds, j) = (ahead / n, ahead % n);
        let first = match (m + j).checked_sub(n) {
            None => now,
            Some(i) => self
                .sent
                .get(i)
                .map_or(now, |&t| (t + self.window).max(now)),
        };
        first + self.window * rounds as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn at_most_n_in_any_window() {
        let t0 = Instant::now();
        let mut w = SlidingWindow::new(3, ms(1000));
        assert!(w.try_take(t0).is_ok());
        assert!(w.try_take(t0 + ms(100)).is_ok());
        assert!(w.try_take(t0 + ms(200)).is_ok());
        // The fourth must wait until the first leaves: t0 + 1000.
        assert_eq!(w.try_take(t0 + ms(300)), Err(t0 + ms(1000)));
        assert_eq!(w.remaining(t0 + ms(999)), 0);
        assert_eq!(w.remaining(t0 + ms(1000)), 1);
        assert!(w.try_take(t0 + ms(1000)).is_ok());
        assert_eq!(w.try_take(t0 + ms(1000)), Err(t0 + ms(1100)));
    }

    #[test]
    fn a_bucket_burst_is_refused() {
        // A token bucket of 3 per second would allow 3 at 0.999 s after 3
        // at 0 s refilled... a sliding window never allows 4 in 1 s.
        let t0 = Instant::now();
        let mut w = SlidingWindow::new(3, ms(1000));
        for _ in 0..3 {
            assert!(w.try_take(t0).is_ok());
        }
        let mut sent = vec![t0, t0, t0];
        let mut now = t0;
        for _ in 0..30 {
            now += ms(37);
            if w.try_take(now).is_ok() {
                sent.push(now);
            }
        }
        for (i, &a) in sent.iter().enumerate() {
            let inside = sent[i..].iter().filter(|&&b| b < a + ms(1000)).count();
            assert!(
                inside <= 3,
                "{inside} sends within a window starting at {i}"
            );
        }
    }

    #[test]
    fn give_back_frees_the_slot() {
        let t0 = Instant::now();
        let mut w = SlidingWindow::new(1, ms(1000));
        assert!(w.try_take(t0).is_ok());
        assert!(w.try_take(t0).is_err());
        w.give_back(t0);
        assert!(w.try_take(t0 + ms(1)).is_ok());
    }

    #[test]
    fn estimates_follow_the_window() {
        let t0 = Instant::now();
        let mut w = SlidingWindow::new(2, ms(1000));
        assert_eq!(w.estimate(t0, 0), t0);
        assert_eq!(w.estimate(t0, 1), t0);
        assert_eq!(w.estimate(t0, 2), t0 + ms(1000));
        w.try_take(t0).unwrap();
        w.try_take(t0 + ms(400)).unwrap();
        let now = t0 + ms(500);
        assert_eq!(w.estimate(now, 0), t0 + ms(1000));
        assert_eq!(w.estimate(now, 1), t0 + ms(1400));
        assert_eq!(w.estimate(now, 2), t0 + ms(2000));
        assert_eq!(w.estimate(now, 5), t0 + ms(3400));
    }
}
