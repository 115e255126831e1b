//! Requests per session and hour, for the audit trail's `session.requests`
//! rows. The hot path's share is one atomic increment on a counter its
//! cached session holds ([`RequestCounts::counter`]); the use flusher
//! harvests the counters into hours and writes the hours that are over
//! (`Sessions::write_last_uses`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;

/// The period of the audit trail's request counts: an hour.
pub const COUNT_PERIOD_SECS: i64 = 3600;

/// A count due for the audit trail: (session id, hour start in unix
/// seconds), and the requests in it.
pub type Due = ((String, i64), u64);

/// The request counters of sessions, and the harvested hours not yet in
/// the audit trail.
#[derive(Default)]
pub struct RequestCounts {
    /// Session id -> requests counted since the last harvest, shared by
    /// the session's cached copies.
    counters: DashMap<String, Arc<AtomicU64>>,
    /// Harvested counts not yet in the audit trail: (session id, hour
    /// start in unix seconds) -> requests.
    hours: Mutex<HashMap<(String, i64), u64>>,
}

impl RequestCounts {
    /// Session `id`'s counter, for a cached copy of it to count into.
    pub fn counter(&self, id: &str) -> Arc<AtomicU64> {
        Arc::clone(self.counters.entry(id.to_owned()).or_default().value())
    }

    /// Moves the requests counted since the last call into the hour of
    /// `now`, and returns the counts of every session and hour that is over
    /// (with `partial`, the hour under way too). They stay here until
    /// [`RequestCounts::written`] says so.
    pub fn harvest(&self, now: i64, partial: bool) -> Vec<Due> {
        let hour = hour_of(now);
        let mut hours = self.hours.lock().unwrap_or_else(|e| e.into_inner());
        self.counters.retain(|id, counter| {
            let n = counter.swap(0, Ordering::Relaxed);
            if n > 0 {
                *hours.entry((id.clone(), hour)).or_default() += n;
            }
            // Kept while a cached copy may still count into it.
            n > 0 || Arc::strong_count(counter) > 1
        });
        hours
            .iter()
            .filter(|((_, h), _)| partial || *h < hour)
            .map(|(k, n)| (k.clone(), *n))
            .collect()
    }

    /// `n` requests of session `id` in hour `hour` are in the audit trail.
    pub fn written(&self, id: String, hour: i64, n: u64) {
        let mut hours = self.hours.lock().unwrap_or_else(|e| e.into_inner());
        let key = (id, hour);
        if let Some(left) = hours.get_mut(&key) {
            *left -= n.min(*left);
            if *left == 0 {
                hours.remove(&key);
            }
        }
    }
}

/// The start of the hour `now` is in (unix seconds).
pub fn hour_of(now: i64) -> i64 {
    now - now.rem_euclid(COUNT_PERIOD_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hour_is_due_once_it_is_over_and_until_it_is_written() {
        let counts = RequestCounts::default();
        let hour = hour_of(1_800_000_000);
        let counter = counts.counter("s1");
        counter.fetch_add(3, Ordering::Relaxed);
        assert!(counts.harvest(hour + 10, false).is_empty());
        // A counter fetched again is the same one.
        counts.counter("s1").fetch_add(2, Ordering::Relaxed);
        assert_eq!(
            counts.harvest(hour + 20, true),
            vec![(("s1".to_owned(), hour), 5)]
        );
        let later = hour + COUNT_PERIOD_SECS + 1;
        counter.fetch_add(1, Ordering::Relaxed);
        let mut due = counts.harvest(later, false);
        assert_eq!(due, vec![(("s1".to_owned(), hour), 5)]);
        let ((id, h), n) = due.remove(0);
        counts.written(id, h, n);
        assert!(counts.harvest(later, false).is_empty());
        assert_eq!(
            counts.harvest(later, true),
            vec![(("s1".to_owned(), hour + COUNT_PERIOD_SECS), 1)]
        );
    }
}
