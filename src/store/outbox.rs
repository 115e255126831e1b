//! The outbox: events written with the change they describe (see the
//! outbox invariant in `mod.rs`), claimed and delivered by `notify`.

use async_trait::async_trait;

use super::shared::{dialect_sql, over_sql, Backend, Claim, WriteOp};
use super::sql;
use super::{EventRow, StoreError};

#[async_trait]
pub trait Outbox: Send + Sync {
    /// Due events (not delivered, not given up, `next_attempt_at_ms <=
    /// now_ms`, and no live lease), oldest first, at most `limit`; leased to
    /// `owner` until `now_ms + lease_ms`. Two claimers never hold one event
    /// at once (PostgreSQL: `FOR UPDATE SKIP LOCKED`, leases timed by the
    /// database's clock).
    async fn claim_events(
        &self,
        owner: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError>;

    /// Delivered: only while `owner` holds the lease (it has not been
    /// claimed by another since).
    async fn event_delivered(&self, id: &str, owner: &str, now: i64) -> Result<(), StoreError>;

    /// Failed this attempt: `attempts + 1`, `last_error = error` (a short
    /// class, no secret), `next_attempt_at_ms`, lease released; only while
    /// `owner` holds the lease.
    async fn event_retry(
        &self,
        id: &str,
        owner: &str,
        next_attempt_at_ms: i64,
        error: &str,
    ) -> Result<(), StoreError>;

    /// Given up for good (too old): `gave_up_at = now`, `last_error =
    /// error`, lease released; only while `owner` holds the lease.
    async fn event_gave_up(
        &self,
        id: &str,
        owner: &str,
        now: i64,
        error: &str,
    ) -> Result<(), StoreError>;

    /// Undelivered events (pending and given up), oldest first, at most `limit`.
    async fn list_events(&self, limit: u32) -> Result<Vec<EventRow>, StoreError>;

    /// Forgets delivered events delivered before `delivered_before` and
    /// given-up events given up before `given_up_before` (unix seconds);
    /// returns how many.
    async fn prune_events(
        &self,
        delivered_before: i64,
        given_up_before: i64,
    ) -> Result<u64, StoreError>;

    /// Given-up events, oldest first, at most `limit`.
    async fn list_given_up_events(&self, limit: u32) -> Result<Vec<EventRow>, StoreError>;

    /// Puts given-up events back for delivery, due at `now_ms`: those of
    /// `ids` (unknown, delivered or pending ones are left alone), or every
    /// one (`None`); returns how many. Their `at` stays, so one whose next
    /// attempt fails is given up again at once.
    async fn retry_given_up_events(
        &self,
        ids: Option<&[String]>,
        now_ms: i64,
    ) -> Result<u64, StoreError>;

    /// Deletes given-up events: those of `ids`, or every one (`None`);
    /// returns how many.
    async fn clear_given_up_events(&self, ids: Option<&[String]>) -> Result<u64, StoreError>;
}

over_sql! {
#[async_trait]
impl [<DB, B: Backend<DB = DB>> Outbox for B] {
    async fn claim_events(
        &self,
        owner: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError> {
        let claim = Claim { owner: owner.to_owned(), now_ms, lease_ms, limit };
        self.write(WriteOp::ClaimEvents(claim)).await?.events()
    }

    async fn event_delivered(&self, id: &str, owner: &str, now: i64) -> Result<(), StoreError> {
        let op = WriteOp::EventDelivered { id: id.to_owned(), owner: owner.to_owned(), now };
        self.write(op).await.map(|_| ())
    }

    async fn event_retry(
        &self,
        id: &str,
        owner: &str,
        next_attempt_at_ms: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        let op = WriteOp::EventRetry {
            id: id.to_owned(),
            owner: owner.to_owned(),
            next_attempt_at_ms,
            error: error.to_owned(),
        };
        self.write(op).await.map(|_| ())
    }

    async fn event_gave_up(
        &self,
        id: &str,
        owner: &str,
        now: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        let op = WriteOp::EventGaveUp {
            id: id.to_owned(),
            owner: owner.to_owned(),
            now,
            error: error.to_owned(),
        };
        self.write(op).await.map(|_| ())
    }

    async fn list_events(&self, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(dialect_sql!(DB, sql::list_events_sql()))
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(sql::event_row).collect()
    }

    async fn prune_events(
        &self,
        delivered_before: i64,
        given_up_before: i64,
    ) -> Result<u64, StoreError> {
        let op = WriteOp::PruneEvents { delivered_before, given_up_before };
        self.write(op).await?.count()
    }

    async fn list_given_up_events(&self, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(dialect_sql!(DB, sql::list_given_up_events_sql()))
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(sql::event_row).collect()
    }

    async fn retry_given_up_events(
        &self,
        ids: Option<&[String]>,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let op = WriteOp::RetryGivenUp { ids: ids.map(<[String]>::to_vec), now_ms };
        self.write(op).await?.count()
    }

    async fn clear_given_up_events(&self, ids: Option<&[String]>) -> Result<u64, StoreError> {
        let op = WriteOp::ClearGivenUp { ids: ids.map(<[String]>::to_vec) };
        self.write(op).await?.count()
    }
}
}
