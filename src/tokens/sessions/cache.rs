//! The hot-path cache of sessions, and the negative cache of keys the store
//! said do not exist.
//!
//! The cache maps a key hash to a [`Keyed`]: the [`ActiveSession`], whose
//! credentials are already in their injected form, and what that key may
//! do (its [`Grant`]), so a cached request does no store I/O and no
//! decryption. It holds at most `store.session_cache_capacity` keys
//! (S3-FIFO eviction, `quick_cache`); an evicted one is read again with
//! one indexed store read (`session_keys.key_hash`). An index from session
//! id to the key hashes cached for it, kept for exactly the cached
//! entries, makes an invalidation cost the session's cached keys.
//! Default sessions (a provider's `default_session`) are cached by id.
//!
//! **Invariant (index):** a fill inserts into the cache before the index,
//! and an entry leaves the index only under its shard lock after checking
//! that the cache no longer holds that key (`unindex`); so a
//! cached session always has its index entry.
//!
//! **Invariant (coherence):** a fill is discarded when an invalidation
//! happened since the [`Ticket`] it took before its store read (the
//! `generation` counter, checked again after the insert); a negative fill
//! likewise when keys may have been added since (the `added` counter).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, UnitWeighter};

use super::active::ActiveSession;
use super::scope::Keyed;
use crate::secrets::session::KeyHash;

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

/// What the cache's counters were before a store read: a fill made from
/// that read is kept only if nothing was invalidated (and, for a negative
/// fill, nothing added) since.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    generation: u64,
    added: u64,
}

/// The cached sessions by key hash and by id, the id index, and the
/// negative cache; see the module's doc comment for the invariants.
pub struct SessionCache {
    by_key: Capped<KeyHash, Arc<Keyed>>,
    /// Session id -> key hashes of its keys in `by_key` (and, briefly,
    /// of some just evicted or discarded): what `invalidate` removes by.
    /// A hash is added after its cache insert and removed only when the
    /// cache no longer holds that key, under the index's shard lock, so a
    /// cached key always has its entry.
    key_of: DashMap<String, Vec<KeyHash>>,
    by_id: Capped<String, Arc<ActiveSession>>,
    /// Key hashes the store said do not exist (bounded like the cache).
    absent: Capped<KeyHash, ()>,
    /// Bumped whenever keys may have been added; a negative fill that saw
    /// it move is not cached.
    added: AtomicU64,
    /// Bumped by every invalidation; a fill that saw it move is not cached.
    generation: AtomicU64,
    /// Store reads by key hash (lookups neither cache answered), for tests and metrics.
    key_reads: AtomicU64,
    /// Lookups answered by the negative cache.
    absent_hits: AtomicU64,
    capacity: usize,
}

impl SessionCache {
    /// Caches of at most `capacity` sessions (and as many absent keys).
    pub fn new(capacity: usize) -> SessionCache {
        SessionCache {
            by_key: capped(capacity),
            key_of: DashMap::new(),
            by_id: capped(capacity),
            absent: capped(capacity),
            added: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            key_reads: AtomicU64::new(0),
            absent_hits: AtomicU64::new(0),
            capacity,
        }
    }

    /// The cached session this key names, with the key's grant (the hot
    /// path: one cache read).
    #[inline]
    pub fn get(&self, hash: &KeyHash) -> Option<Arc<Keyed>> {
        self.by_key.get(hash)
    }

    /// The cached session with this id (default sessions).
    pub fn get_by_id(&self, id: &str) -> Option<Arc<ActiveSession>> {
        self.by_id.get(id)
    }

    /// Whether `hash` is in the negative cache (counted as a hit if so).
    pub fn answer_absent(&self, hash: &KeyHash) -> bool {
        let hit = self.absent.get(hash).is_some();
        if hit {
            self.absent_hits.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Whether `hash` is in the negative cache (nothing counted).
    pub fn known_absent(&self, hash: &KeyHash) -> bool {
        self.absent.get(hash).is_some()
    }

    /// The ticket to take before a store read whose row may be cached.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            generation: self.generation(),
            added: self.added.load(Ordering::Acquire),
        }
    }

    /// [`SessionCache::ticket`] before a store read by key hash, counting the read.
    pub fn ticket_for_key_read(&self) -> Ticket {
        let ticket = self.ticket();
        self.key_reads.fetch_add(1, Ordering::Relaxed);
        ticket
    }

    /// The invalidation generation now; read it before reading a row that
    /// may be cached later ([`SessionCache::install`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches `active` by its key unless an invalidation happened since
    /// `generation` was read, checking again after the insert (an
    /// invalidation may land between the check and the insert) and taking
    /// the entry back if so. The id index gets its entry after the cache
    /// insert and before the second check, so an invalidation after that
    /// check finds it. Evicted entries leave the index.
    fn fill_key_at(&self, key: KeyHash, keyed: &Arc<Keyed>, generation: u64) {
        if self.generation() != generation {
            return;
        }
        let id = &keyed.session.id;
        let mut evicted = Vec::new();
        self.by_key
            .insert_with_lifecycle(key, Arc::clone(keyed), &mut evicted);
        {
            let mut hashes = self.key_of.entry(id.clone()).or_default();
            if !hashes.contains(&key) {
                hashes.push(key);
            }
        }
        if self.generation() != generation
            && self
                .by_key
                .remove_if(&key, |cached| Arc::ptr_eq(cached, keyed))
                .is_some()
        {
            self.unindex(id, &key);
        }
        for (hash, gone) in evicted {
            self.unindex(&gone.session.id, &hash);
        }
    }

    /// Caches a session read by key (see `fill_key_at`).
    pub fn fill_key(&self, key: KeyHash, keyed: &Arc<Keyed>, ticket: Ticket) {
        self.fill_key_at(key, keyed, ticket.generation);
    }

    /// [`SessionCache::fill_key`] for the cache by id (default sessions).
    pub fn fill_id(&self, active: &Arc<ActiveSession>, ticket: Ticket) {
        self.fill_id_at(active, ticket.generation);
    }

    fn fill_id_at(&self, active: &Arc<ActiveSession>, generation: u64) {
        if self.generation() != generation {
            return;
        }
        self.by_id.insert(active.id.clone(), Arc::clone(active));
        if self.generation() != generation {
            self.by_id
                .remove_if(&active.id, |cached| Arc::ptr_eq(cached, active));
        }
    }

    /// Puts a row just written (or read) by a refresh in place of the
    /// older copies of its session, under every key cached for it (each
    /// keeps its grant). `generation` was read before the row: if anything
    /// was invalidated since (a revocation, say), it is not cached, but
    /// older copies are dropped. The bump first makes lookups that read an
    /// older row discard their copy. Returns whether it was cached.
    pub fn install(&self, active: &Arc<ActiveSession>, generation: u64) -> bool {
        let before = self.generation.fetch_add(1, Ordering::AcqRel);
        let hashes = self
            .key_of
            .get(&active.id)
            .map(|h| h.clone())
            .unwrap_or_default();
        let older = |cached: &Arc<Keyed>| cached.session.version < active.version;
        if before != generation {
            // Not cached (something was invalidated meanwhile), but an
            // older copy must not stay: requests would keep presenting the
            // tokens this refresh replaced, each refused and replayed.
            for key in &hashes {
                if self.by_key.remove_if(key, older).is_some() {
                    self.unindex(&active.id, key);
                }
            }
            self.by_id
                .remove_if(&active.id, |cached| cached.version < active.version);
            return false;
        }
        for key in hashes {
            if let Some(cached) = self.by_key.peek(&key).filter(older) {
                let keyed = Arc::new(Keyed {
                    session: Arc::clone(active),
                    grant: Arc::clone(&cached.grant),
                });
                self.fill_key_at(key, &keyed, before + 1);
            }
        }
        if self.by_id.contains_key(&active.id) {
            self.fill_id_at(active, before + 1);
        }
        true
    }

    /// Drops every cached copy of session `id` (under each of its keys),
    /// through the id index; a lookup racing the change discards the row
    /// it read (the bump).
    pub fn invalidate(&self, id: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.by_id.remove(id);
        if let Some((_, hashes)) = self.key_of.remove(id) {
            for hash in hashes {
                self.by_key.remove(&hash);
            }
        }
    }

    /// Drops `hash` from `id`'s index entry if the cache no longer holds
    /// `hash` (and the entry when it names no key left). Checked under the
    /// index's shard lock: a fill inserts into the cache before the index,
    /// so either this sees the new cache entry and keeps the index entry,
    /// or the fill's index insert comes after.
    fn unindex(&self, id: &str, hash: &KeyHash) {
        if let Some(mut hashes) = self.key_of.get_mut(id) {
            if !self.by_key.contains_key(hash) {
                hashes.retain(|h| h != hash);
            }
        }
        self.key_of.remove_if(id, |_, hashes| hashes.is_empty());
    }

    /// Removes index entries whose key the cache no longer holds for that
    /// session (left by races; each check as in `unindex`).
    pub fn sweep_index(&self) {
        self.key_of.retain(|id, hashes| {
            hashes.retain(|h| self.by_key.peek(h).is_some_and(|k| k.session.id == *id));
            !hashes.is_empty()
        });
    }

    /// Remembers that the store has no session for `hash`, unless keys may
    /// have been added since `ticket` was taken (before the store read).
    pub fn remember_absent(&self, hash: KeyHash, ticket: Ticket) {
        if self.added.load(Ordering::Acquire) != ticket.added {
            return;
        }
        self.absent.insert(hash, ());
        if self.added.load(Ordering::Acquire) != ticket.added {
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
    pub fn forget_all_absent(&self) {
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

    /// Keys cached now, and key hashes cached as absent.
    pub fn sizes(&self) -> (usize, usize) {
        (self.by_key.len(), self.absent.len())
    }

    /// Sessions cached now, by key and by id.
    pub fn cached(&self) -> usize {
        self.by_key.len() + self.by_id.len()
    }

    /// `store.session_cache_capacity`.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries of the id index (the cached keys, plus any left by a race
    /// that the next sweep removes).
    pub fn indexed(&self) -> usize {
        self.key_of.iter().map(|e| e.value().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_fill_that_raced_an_add_is_not_kept() {
        let cache = SessionCache::new(10);
        let hash = KeyHash::of(b"unit-key-000007");
        let before = cache.ticket();
        // The add lands between the lookup's store read and its fill.
        cache.forget_absent(&[hash]);
        cache.remember_absent(hash, before);
        assert!(!cache.known_absent(&hash));
        cache.remember_absent(hash, cache.ticket());
        assert!(cache.known_absent(&hash));
        assert!(cache.answer_absent(&hash));
        assert_eq!(cache.absent_hits(), 1);
        cache.forget_all_absent();
        assert!(!cache.known_absent(&hash));
    }
}
