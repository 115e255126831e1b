//! `key rewrap`: every stored sealed value re-sealed under the primary key,
//! online.
//!
//! Sessions are read in id order, a page at a time, choosing by SQL only the
//! rows holding a value not under the primary (so a second run, or one
//! after an interruption, resumes where the first stopped: what is done is
//! never selected again). Each page is written in one transaction, each row
//! a compare-and-swap on the sealed bytes it was read with: a refresh that
//! wrote the row meanwhile wins, and the row is looked at again in the next
//! pass (it may have been sealed by a server that has not read the new ring
//! yet). The session's version is not touched, so a refresh that read the
//! row before the rewrap still commits.
//!
//! Session tokens are the only sealed values credproxy stores.

use std::time::{Duration, Instant};

use crate::store::{Resealed, StoreError};
use crate::tokens::sessions::{aad, Sessions};

/// Rows read and written per transaction.
pub const BATCH: u32 = 500;
/// Passes over the rows left after conflicts, at most.
const MAX_PASSES: u32 = 5;

/// Where a rewrap stands, for progress lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Session rows re-sealed (a row holds one or two values).
    pub rows: u64,
    /// Sealed values re-sealed.
    pub values: u64,
    /// Values not under the primary when the rewrap began.
    pub values_at_start: u64,
}

/// What a rewrap did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub progress: Progress,
    /// Rows a concurrent write changed between read and write (looked at
    /// again in a next pass).
    pub conflicts: u64,
    /// Values no key of the ring opens: left as they are.
    pub unopenable: u64,
    /// Values still not under the primary at the end.
    pub left: u64,
    pub passes: u32,
    pub elapsed: Duration,
}

impl Report {
    /// Rows re-sealed per second.
    pub fn rows_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.progress.rows as f64 / secs
        } else {
            0.0
        }
    }
}

/// Values not under the primary key, by the store's count.
async fn values_not_current(sessions: &Sessions) -> Result<u64, StoreError> {
    let primary = sessions.sealer().primary_id().to_string();
    Ok(sessions
        .store()
        .count_sealed_by_key()
        .await?
        .iter()
        .filter(|c| c.key_id.as_deref() != Some(primary.as_str()))
        .map(|c| c.count.max(0) as u64)
        .sum())
}

/// Re-seals every stored value under the ring's primary key (as this
/// process read the ring), calling `progress` after each page.
pub async fn rewrap(
    sessions: &Sessions,
    batch: u32,
    mut progress: impl FnMut(&Progress),
) -> Result<Report, StoreError> {
    let started = Instant::now();
    let sealer = sessions.sealer();
    let header = sealer.current_header();
    let store = sessions.store();
    let mut report = Report {
        progress: Progress {
            values_at_start: values_not_current(sessions).await?,
            ..Progress::default()
        },
        ..Report::default()
    };
    for pass in 1..=MAX_PASSES {
        report.passes = pass;
        let mut conflicts = 0;
        let mut after = String::new();
        loop {
            let page = store
                .sealed_not_under(&header, &after, batch.max(1))
                .await?;
            let Some(last) = page.last() else { break };
            after = last.id.clone();
            let mut rows = Vec::with_capacity(page.len());
            let mut values = std::collections::HashMap::new();
            for row in page {
                let again = |sealed: &[u8], field: &str| -> Option<(Vec<u8>, bool)> {
                    if sealer.is_current(sealed) {
                        return Some((sealed.to_vec(), false));
                    }
                    let plain = sealer.open(sealed, &aad(&row.id, field)).ok()?;
                    Some((sealer.seal(&plain, &aad(&row.id, field)), true))
                };
                let Some((access, a_changed)) = again(&row.access_token, "access") else {
                    report.unopenable += 1;
                    continue;
                };
                let refresh = match row.refresh_token.as_deref().map(|r| again(r, "refresh")) {
                    None => None,
                    Some(Some(r)) => Some(r),
                    Some(None) => {
                        report.unopenable += 1;
                        continue;
                    }
                };
                let changed =
                    u64::from(a_changed) + u64::from(refresh.as_ref().is_some_and(|r| r.1));
                values.insert(row.id.clone(), changed);
                rows.push(Resealed {
                    old_access: row.access_token,
                    old_refresh: row.refresh_token,
                    access_token: access,
                    refresh_token: refresh.map(|r| r.0),
                    id: row.id,
                });
            }
            if rows.is_empty() {
                continue;
            }
            let written = store.reseal_rows(&rows).await?;
            conflicts += (rows.len() - written.len().min(rows.len())) as u64;
            report.progress.rows += written.len() as u64;
            report.progress.values += written.iter().filter_map(|id| values.get(id)).sum::<u64>();
            progress(&report.progress);
        }
        report.conflicts += conflicts;
        if conflicts == 0 {
            break;
        }
    }
    report.left = values_not_current(sessions).await?;
    report.elapsed = started.elapsed();
    Ok(report)
}
