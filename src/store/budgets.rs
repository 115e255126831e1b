//! Request budgets shared by every instance (PostgreSQL; see
//! `pacing::shared`). A store that keeps none (SQLite: one process, the
//! budgets in its memory) takes the defaults.

use async_trait::async_trait;

use super::{BudgetAsk, BudgetLease, StoreError};

#[async_trait]
pub trait Budgets: Send + Sync {
    /// Whether request budgets are kept here, shared by every instance
    /// (PostgreSQL), rather than in each process's memory (SQLite, one process).
    fn shares_budgets(&self) -> bool {
        false
    }

    /// Leases a share of a provider's budget, atomically against every other
    /// instance: the shares of leases that ended within the last `window_ms`
    /// (or have not ended) count as spent, so at most `requests` are sent in
    /// any window of that length. A lease whose instance dies stops counting
    /// `window_ms` after it ends. Only stores that [`Budgets::shares_budgets`].
    async fn lease_budget(&self, ask: &BudgetAsk<'_>) -> Result<BudgetLease, StoreError> {
        let _ = ask;
        Err(StoreError::Open(
            "this store keeps no shared request budgets".into(),
        ))
    }

    /// Records that a lease, now ended (or given back early: nothing more is
    /// sent under it), was used for `used` requests, so its unused share
    /// counts for nothing.
    async fn settle_budget(&self, lease_id: i64, used: u32) -> Result<(), StoreError> {
        let _ = (lease_id, used);
        Ok(())
    }
}
