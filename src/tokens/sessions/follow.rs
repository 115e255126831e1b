//! Coherence with other processes sharing the store: following its change
//! log ([`Sessions::follow_changes_from`]) drops the cached copies of
//! sessions changed elsewhere (revocations take effect within one poll
//! interval, at most 2 s) and forgets absent keys added elsewhere (an
//! inserted session's change-log entry carries its key hash).

use std::sync::Arc;
use std::time::Duration;

use super::Sessions;
use crate::store;

/// Change-log pages (of [`store::CHANGES_PAGE`] rows) one poll reads at most.
const MAX_PAGES_PER_POLL: usize = 100;

impl Sessions {
    /// Follows the store's change log from `cursor` until `stop` resolves,
    /// dropping cached sessions that another process changed and
    /// forgetting absent keys it added. `cursor` was read before this
    /// process served any lookup (`server::start`); with `None`, following
    /// starts from the position read now, forgetting the keys found absent
    /// before it. Store errors are logged and retried on the next tick; the
    /// cache keeps serving meanwhile.
    pub async fn follow_changes_from(
        self: Arc<Self>,
        cursor: Option<i64>,
        every: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut cursor = loop {
            if let Some(c) = cursor {
                break c;
            }
            match self.store.change_cursor().await {
                Ok(c) => {
                    // Keys found absent before the cursor was read may have
                    // been added before it, where the log is not read.
                    self.cache.forget_all_absent();
                    break c;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the store's change log; retrying");
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(every) => {}
                    }
                }
            }
        };
        let mut polls: u64 = 0;
        loop {
            tokio::select! {
                () = &mut stop => return,
                notified = self.store.wait_for_change(every) => {
                    for id in notified {
                        self.cache.invalidate(&id);
                    }
                }
            }
            // A full page (a bulk insert, say) is followed at once by the
            // next, so a key added late in a big batch waits no extra polls.
            for _ in 0..MAX_PAGES_PER_POLL {
                match self.store.changes(cursor).await {
                    Ok(changes) => {
                        let more = changes.more && changes.cursor > cursor;
                        cursor = changes.cursor;
                        // Keys added elsewhere work here from now on.
                        self.cache.forget_absent(&changes.added_keys);
                        for id in changes.ids {
                            tracing::debug!(session = %id, "session changed in the store; dropping cached copy");
                            self.cache.invalidate(&id);
                        }
                        if !more {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the store's change log");
                        break;
                    }
                }
            }
            polls += 1;
            // Keep the change log short: an hour is far longer than any poll gap.
            if polls.is_multiple_of(1200) {
                self.cache.sweep_index();
                self.cold.prune();
                if let Err(e) = self.store.prune_changes(store::now() - 3600).await {
                    tracing::warn!(error = %e, "cannot prune the store's change log");
                }
            }
        }
    }
}
