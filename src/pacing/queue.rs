//! The gate's queue: a fair share per session. Each session's waiters
//! wait in order (FIFO) and sessions with waiters take turns (round
//! robin), so one session's burst cannot starve another session's single
//! request: that one goes after at most one request of each session queued
//! before it. Resends (requests admitted before, sent again) go first.
//!
//! Sessions are told apart by a hash of their id; two ids with the same
//! hash only share a turn.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use tokio::sync::oneshot;

use super::Permit;

type Waiter = oneshot::Sender<Permit>;

/// A session's place in the queue: a hash of its id.
pub fn session_key(id: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

#[derive(Default)]
pub struct FairQueue {
    /// Resends: before everyone, the latest first.
    front: VecDeque<Waiter>,
    /// Each session's waiters, in arrival order.
    sessions: HashMap<u64, VecDeque<Waiter>>,
    /// The sessions with waiters, in turn order.
    turns: VecDeque<u64>,
    len: usize,
}

impl FairQueue {
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push_front(&mut self, w: Waiter) {
        self.front.push_front(w);
        self.len += 1;
    }

    pub fn push_back(&mut self, session: u64, w: Waiter) {
        let q = self.sessions.entry(session).or_default();
        if q.is_empty() {
            self.turns.push_back(session);
        }
        q.push_back(w);
        self.len += 1;
    }

    /// How many go before a new request of `session` if nobody else comes:
    /// the resends, the session's own waiters, and from each other session
    /// one per turn the new request waits (one more from a session whose
    /// turn comes before the session's).
    pub fn ahead(&self, session: u64) -> usize {
        let own = self.sessions.get(&session).map_or(0, VecDeque::len);
        let mut before = true;
        let mut ahead = self.front.len() + own;
        for s in &self.turns {
            if *s == session {
                before = false;
                continue;
            }
            let theirs = self.sessions.get(s).map_or(0, VecDeque::len);
            ahead += theirs.min(if before { own + 1 } else { own });
        }
        ahead
    }

    /// Drops waiters whose callers left from the head of the line.
    pub fn prune_head(&mut self) {
        while self.front.front().is_some_and(Waiter::is_closed) {
            self.front.pop_front();
            self.len -= 1;
        }
        if !self.front.is_empty() {
            return;
        }
        while let Some(&s) = self.turns.front() {
            let Some(q) = self.sessions.get_mut(&s) else {
                self.turns.pop_front();
                continue;
            };
            while q.front().is_some_and(Waiter::is_closed) {
                q.pop_front();
                self.len -= 1;
            }
            if !q.is_empty() {
                return;
            }
            self.sessions.remove(&s);
            self.turns.pop_front();
        }
    }

    /// The next waiter to serve; its session's turn goes to the back.
    pub fn pop(&mut self) -> Option<Waiter> {
        if let Some(w) = self.front.pop_front() {
            self.len -= 1;
            return Some(w);
        }
        while let Some(s) = self.turns.pop_front() {
            let Some(q) = self.sessions.get_mut(&s) else {
                continue;
            };
            let w = q.pop_front();
            if q.is_empty() {
                self.sessions.remove(&s);
            } else {
                self.turns.push_back(s);
            }
            if let Some(w) = w {
                self.len -= 1;
                return Some(w);
            }
        }
        None
    }
}
