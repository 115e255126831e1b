//! The ring a running process seals and opens with, kept up to date.
//!
//! Another process changes the ring (`key rotate`, `key retire`, or the
//! operator changing what `key_command` prints); a running server follows:
//!
//! - when it meets a value sealed under a key id it does not know, it reads
//!   the ring at once (at most once a second, one read at a time), so values
//!   re-sealed elsewhere under a new key open here too;
//! - before sealing, a key file whose size, time or inode changed is read
//!   again, so a server seals under the primary of the file as it is now;
//! - every `store.key_reload_interval` the ring is read again (a key file
//!   only when it changed), so a retired key leaves memory within one
//!   interval.
//!
//! A ring that cannot be read (a broken file, a failing command) leaves the
//! one in use in place, with a warning: serving goes on.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::KeySource;
use crate::secrets::seal::{load_ring, sealed_key_id, KeyError, Ring, Sealer};

/// How often a value under an unknown key may make the ring be read again.
const UNKNOWN_KEY_RELOAD_EVERY: Duration = Duration::from_secs(1);

/// What identifies a key file's content without reading it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Fingerprint {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
}

fn fingerprint(path: &std::path::Path) -> Option<Fingerprint> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Fingerprint {
        len: meta.len(),
        modified: meta.modified().ok(),
        inode,
    })
}

pub struct LiveRing {
    current: RwLock<Arc<Sealer>>,
    source: KeySource,
    /// The key file as it was when last read (`None` for other sources).
    seen: Mutex<Option<Fingerprint>>,
    /// One read at a time; when the last one for an unknown key happened.
    reading: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for LiveRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveRing([redacted])")
    }
}

impl LiveRing {
    pub fn new(sealer: Sealer, source: KeySource) -> LiveRing {
        let seen = match &source {
            KeySource::File(path) => fingerprint(path),
            _ => None,
        };
        LiveRing {
            current: RwLock::new(Arc::new(sealer)),
            source,
            seen: Mutex::new(seen),
            reading: tokio::sync::Mutex::new(None),
        }
    }

    /// The ring as this process knows it now.
    pub fn current(&self) -> Arc<Sealer> {
        // A poisoned lock still holds a whole Arc: a write is one store.
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn install(&self, ring: &Ring) {
        let next = Sealer::from_ring(ring);
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.ids() != next.ids() || current.primary_id() != next.primary_id() {
            tracing::info!(
                keys = %next.ids().iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                primary = %next.primary_id(),
                "sealing key ring changed"
            );
        }
        *current = Arc::new(next);
    }

    /// Before sealing: a key file that changed since it was read is read
    /// again (one `stat` when it did not). Other sources: nothing.
    pub fn follow_file(&self) {
        let KeySource::File(path) = &self.source else {
            return;
        };
        let now = fingerprint(path);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if now.is_none() || *seen == now {
            return;
        }
        match load_ring(&self.source) {
            Ok(Some(ring)) => {
                self.install(&ring);
                *seen = now;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the sealing key ring could not be read again; the ring in use stays")
            }
        }
    }

    /// Reads the ring from its source now (off the async threads: it may run
    /// a command). Returns whether it was read.
    pub async fn reload(&self) -> Result<bool, KeyError> {
        let source = self.source.clone();
        let read = tokio::task::spawn_blocking(move || {
            let seen = match &source {
                KeySource::File(path) => fingerprint(path),
                _ => None,
            };
            load_ring(&source).map(|ring| (ring, seen))
        })
        .await
        .map_err(|e| KeyError::Command(format!("the read of the ring failed: {e}")))?;
        match read? {
            (Some(ring), seen) => {
                self.install(&ring);
                *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = seen;
                Ok(true)
            }
            (None, _) => Ok(false),
        }
    }

    /// Makes sure the ring knows the key of each of `sealed`: when one names
    /// a key id it does not, the ring is read again (at most once a second,
    /// and one read at a time; callers that waited for a read use it).
    pub async fn know(&self, sealed: &[&[u8]]) {
        let unknown = |sealer: &Sealer| {
            sealed
                .iter()
                .filter_map(|s| sealed_key_id(s))
                .any(|id| !sealer.has_key(id))
        };
        if !unknown(&self.current()) {
            return;
        }
        let mut last = self.reading.lock().await;
        if !unknown(&self.current()) {
            return; // another caller's read found it
        }
        if last.is_some_and(|t| t.elapsed() < UNKNOWN_KEY_RELOAD_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        match self.reload().await {
            Ok(_) if unknown(&self.current()) => tracing::warn!(
                "a stored value is sealed under a key the ring does not hold, even read again"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the sealing key ring could not be read again; the ring in use stays")
            }
        }
    }

    /// Reads the ring every `every` until `shutdown`: a key file only when
    /// it changed, a command each time; an environment variable never
    /// changes while the process runs.
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        if matches!(self.source, KeySource::Env(_)) {
            return;
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match &self.source {
                KeySource::File(_) => {
                    let me = Arc::clone(&self);
                    let _ = tokio::task::spawn_blocking(move || me.follow_file()).await;
                }
                _ => {
                    if let Err(e) = self.reload().await {
                        tracing::warn!(error = %e, "the sealing key ring could not be read again; the ring in use stays");
                    }
                }
            }
        }
    }
}
