//! What both stores run the same way, written once over the sqlx
//! [`Database`]: the [`Dialect`] hooks each database fills in (its
//! placeholders, its clock, its locks), the [`Backend`] each store is (its
//! pools and how it runs a write), and the transaction bodies both run
//! ([`Sql`]). The role traits (`sessions.rs`, `oauth.rs`, ...) are
//! implemented once on top, for every backend. What differs stays in each
//! store: SQLite's single writer and group commit, PostgreSQL's row locks,
//! leases and `NOTIFY`.

use std::marker::PhantomData;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Database, Pool, Row};

use super::sql::{self, bind_event, INSERT_EVENT};
use super::{
    EventRow, IdleCursor, Lease, NewEvent, NewSession, Resealed, SealedTokens, SessionRecord,
    StoreError,
};
use crate::audit::AuditAppend;
use crate::secrets::session::Status;

/// A statement of `DB` with its binds.
pub(crate) type Query<'q, DB> = sqlx::query::Query<'q, DB, <DB as Database>::Arguments<'q>>;

/// What differs between the two databases in a statement both run: how
/// placeholders are written, whose clock times a change, which lock guards
/// what, and the few statements each writes its own way (each built with
/// its binds beside its SQL).
pub(crate) trait Dialect: Database {
    /// Placeholders `$1, $2, ...` (PostgreSQL) rather than `?` (SQLite).
    const NUMBERED: bool;
    /// The column that orders sessions as inserted.
    const INSERT_ORDER: &'static str;
    /// The session's status, read before a change in the same transaction
    /// (PostgreSQL locks the row until the transaction ends).
    const PRIOR_STATUS: &'static str;
    /// Takes the audit chain's lock in a transaction, bound to
    /// [`sql::AUDIT_LOCK`] (PostgreSQL's advisory lock; SQLite's write
    /// transaction is the lock).
    const LOCK_AUDIT: Option<&'static str>;
    /// How a transaction that only appends to the audit chain begins.
    const BEGIN_AUDIT: &'static str;
    /// Sealed values counted by the key id in their header (`k`, `n`).
    const COUNT_SEALED_BY_KEY: &'static str;
    /// The time of a change-log entry in SQL: SQLite binds the caller's
    /// clock ([`Dialect::bind_change_at`]), PostgreSQL reads its own.
    const CHANGE_AT: &'static str;
    /// Whether [`Dialect::changes`] reads some entries again (PostgreSQL's
    /// look-back), so the ids are deduplicated.
    const REREADS: bool;

    /// The rows a statement wrote.
    fn rows_affected(done: &Self::QueryResult) -> u64;
    /// Binds what [`Dialect::CHANGE_AT`] needs.
    fn bind_change_at(q: Query<'_, Self>, now: i64) -> Query<'_, Self>;
    /// A page of the change log after `cursor` (`seq, session_id, key_hash`).
    fn changes(cursor: i64) -> Query<'static, Self>;
    /// Takes a refresh lease: the session's row if it was taken.
    fn acquire_lease(ask: &LeaseAsk) -> Query<'_, Self>;
    /// Who holds the lease that was not taken: `until_ms` in the caller's
    /// clock, and `version`.
    fn lease_held(ask: &LeaseAsk) -> Query<'_, Self>;
    /// Leases due events: `seq` and the event columns.
    fn claim_events(claim: &Claim) -> Query<'_, Self>;
    /// Idle-refresh candidates (`id, version, idle_since`): binds the
    /// provider, the cursor ([`Dialect::bind_idle_cursor`]), `idle_before`,
    /// `now` and the limit.
    fn idle_sessions() -> &'static str;
    /// Binds the cursor of [`Dialect::idle_sessions`], as its SQL writes it.
    fn bind_idle_cursor<'q>(q: Query<'q, Self>, after: &'q IdleCursor) -> Query<'q, Self>;
}

/// A shared statement (`?` placeholders; a `&'static str`, or a `String`
/// made once) as `DB` runs it: numbered by [`sql::pg_sql!`] where `DB`
/// wants.
macro_rules! dialect_sql {
    ($db:ty, $text:expr) => {
        if <$db as $crate::store::shared::Dialect>::NUMBERED {
            $crate::store::sql::pg_sql!($text)
        } else {
            $crate::store::sql::once!($text)
        }
    };
}
pub(crate) use dialect_sql;

/// `impl [HEADER] { ... }` under the bounds every shared statement needs
/// of the database `DB` (sqlx states them type by type, and Rust does not
/// carry a trait's where clauses to its users): written once, here.
macro_rules! over_sql {
    ($(#[$attr:meta])* impl [$($head:tt)*] { $($body:tt)* }) => {
        $(#[$attr])*
        impl $($head)*
        where
            DB: $crate::store::shared::Dialect,
            for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
            for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
            for<'q> &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
            for<'q> Option<&'q [u8]>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
            for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
            for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
            for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
            for<'q> Option<Vec<u8>>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
            for<'q> Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
            for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
            for<'q> bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
            for<'a> &'a str: sqlx::ColumnIndex<DB::Row>,
            usize: sqlx::ColumnIndex<DB::Row>,
            for<'r> String: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
            for<'r> i64: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
            for<'r> Vec<u8>: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
        {
            $($body)*
        }
    };
}
pub(crate) use over_sql;

/// A store over one database: its pools, and the writes it runs its own
/// way. Every role trait (`SessionStore`, `Outbox`, ...) is implemented
/// once for every backend.
#[async_trait]
pub(crate) trait Backend: Send + Sync + 'static {
    type DB: Dialect;

    /// Reads, and the control plane's writes.
    fn pool(&self) -> &Pool<Self::DB>;

    /// The request path's reads (PostgreSQL: connections of their own).
    fn hot(&self) -> &Pool<Self::DB> {
        self.pool()
    }

    /// Whether the store is still the one opened (SQLite: the file was not
    /// deleted or replaced).
    fn unchanged(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// [`Backend::unchanged`] before a write, logged when refused: SQLite
    /// would go on writing to an unlinked file, and every change (a
    /// rotated refresh token too) would vanish at the next start.
    fn writable(&self) -> Result<(), StoreError> {
        self.unchanged().inspect_err(|e| {
            tracing::error!(error = %e, "store write refused");
        })
    }

    /// Runs a write of the refresh path or of the outbox's bookkeeping
    /// (SQLite: through its writers; PostgreSQL: at once, the refresh
    /// commits in a transaction of their own).
    async fn write(&self, op: WriteOp) -> Result<Written, StoreError>;

    /// `SessionStore::note_uses`.
    async fn write_uses(&self, uses: &[(String, i64)]) -> Result<u64, StoreError>;

    /// `SessionStore::reseal_rows`.
    async fn reseal(&self, rows: &[Resealed]) -> Result<Vec<String>, StoreError>;

    /// `ChangeFeed::wait_for_change`: polling stores just wait.
    async fn notified(&self, max: Duration) -> Vec<String> {
        tokio::time::sleep(max).await;
        Vec::new()
    }
}

/// A refresh lease asked for (see `SessionStore::acquire_refresh_lease`).
pub(crate) struct LeaseAsk {
    pub id: String,
    pub owner: String,
    pub until_ms: i64,
    pub now_ms: i64,
}

/// Due events asked for (see `Outbox::claim_events`).
pub(crate) struct Claim {
    pub owner: String,
    pub now_ms: i64,
    pub lease_ms: i64,
    pub limit: u32,
}

/// A write a [`Backend`] runs its own way (owned: SQLite sends it to a
/// writer task).
pub(crate) enum WriteOp {
    AcquireLease(LeaseAsk),
    ReleaseLease {
        id: String,
        owner: String,
    },
    ReleaseLeasesOf {
        owner: String,
    },
    CommitRefresh {
        id: String,
        owner: String,
        tokens: SealedTokens,
        expected_version: i64,
        now: i64,
        healthy: bool,
        recovered: Option<NewEvent>,
        audit: Option<AuditAppend>,
    },
    MarkReauthorization {
        id: String,
        expected_version: i64,
        now: i64,
        code: String,
        event: Option<NewEvent>,
        audit: Option<AuditAppend>,
    },
    MarkFailing {
        id: String,
        owner: String,
        expected_version: i64,
        now: i64,
        class: String,
        next_retry_at: i64,
        event: Option<NewEvent>,
    },
    ClaimEvents(Claim),
    EventDelivered {
        id: String,
        owner: String,
        now: i64,
    },
    EventRetry {
        id: String,
        owner: String,
        next_attempt_at_ms: i64,
        error: String,
    },
    EventGaveUp {
        id: String,
        owner: String,
        now: i64,
        error: String,
    },
    PruneEvents {
        delivered_before: i64,
        given_up_before: i64,
    },
    RetryGivenUp {
        ids: Option<Vec<String>>,
        now_ms: i64,
    },
    ClearGivenUp {
        ids: Option<Vec<String>>,
    },
}

impl WriteOp {
    /// Whether the op commits a refresh's outcome (durable, first; in a
    /// transaction) rather than keeping leases and the outbox.
    pub(crate) fn is_commit(&self) -> bool {
        matches!(
            self,
            WriteOp::CommitRefresh { .. }
                | WriteOp::MarkReauthorization { .. }
                | WriteOp::MarkFailing { .. }
        )
    }
}

/// What a [`WriteOp`] answers.
pub(crate) enum Written {
    Lease(Lease),
    Row(Option<SessionRecord>),
    Flag(bool),
    Count(u64),
    Events(Vec<EventRow>),
    Done,
}

impl Written {
    pub(crate) fn lease(self) -> Result<Lease, StoreError> {
        match self {
            Written::Lease(lease) => Ok(lease),
            _ => Err(StoreError::Closed),
        }
    }

    pub(crate) fn row(self) -> Result<Option<SessionRecord>, StoreError> {
        match self {
            Written::Row(row) => Ok(row),
            _ => Err(StoreError::Closed),
        }
    }

    pub(crate) fn flag(self) -> Result<bool, StoreError> {
        match self {
            Written::Flag(flag) => Ok(flag),
            _ => Err(StoreError::Closed),
        }
    }

    pub(crate) fn count(self) -> Result<u64, StoreError> {
        match self {
            Written::Count(n) => Ok(n),
            _ => Err(StoreError::Closed),
        }
    }

    pub(crate) fn events(self) -> Result<Vec<EventRow>, StoreError> {
        match self {
            Written::Events(events) => Ok(events),
            _ => Err(StoreError::Closed),
        }
    }
}

/// The transaction bodies both stores run, on a connection of `DB` (in a
/// transaction where the body says so).
pub(crate) struct Sql<DB>(PhantomData<DB>);

over_sql! {
impl [<DB> Sql<DB>] {
    /// Runs `op` on `tx`: the writes both stores make alike.
    pub(crate) async fn apply(tx: &mut DB::Connection, op: &WriteOp) -> Result<Written, StoreError> {
        Ok(match op {
            WriteOp::AcquireLease(ask) => {
                if let Some(row) = DB::acquire_lease(ask).fetch_optional(&mut *tx).await? {
                    return Ok(Written::Lease(Lease::Acquired(sql::record(&row)?)));
                }
                let held = DB::lease_held(ask).fetch_optional(&mut *tx).await?;
                Written::Lease(match held {
                    None => Lease::Gone,
                    Some(r) => Lease::Held {
                        until_ms: r.try_get::<Option<i64>, _>("until_ms")?.unwrap_or(0),
                        version: r.try_get("version")?,
                    },
                })
            }
            WriteOp::ReleaseLease { id, owner } => {
                sqlx::query(dialect_sql!(DB, sql::RELEASE_LEASE))
                    .bind(id.as_str())
                    .bind(owner.as_str())
                    .execute(&mut *tx)
                    .await?;
                Written::Done
            }
            WriteOp::ReleaseLeasesOf { owner } => {
                let done = sqlx::query(dialect_sql!(DB, sql::RELEASE_LEASES_OF))
                    .bind(owner.as_str())
                    .execute(&mut *tx)
                    .await?;
                Written::Count(DB::rows_affected(&done))
            }
            WriteOp::CommitRefresh {
                id,
                owner,
                tokens,
                expected_version,
                now,
                healthy,
                recovered,
                audit,
            } => {
                let prior = Self::prior_status(tx, id).await?;
                let row = sqlx::query(dialect_sql!(DB, sql::commit_refresh_sql()))
                    .bind(tokens.access_token.as_slice())
                    .bind(tokens.refresh_token.as_deref())
                    .bind(tokens.expires_at)
                    .bind(*healthy)
                    .bind(*healthy)
                    .bind(*healthy)
                    .bind(*now)
                    .bind(*now)
                    .bind(id.as_str())
                    .bind(*expected_version)
                    .bind(owner.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
                let rec = row.as_ref().map(sql::record).transpose()?;
                if rec.is_some() {
                    Self::log_change(tx, id, *now).await?;
                    if *healthy && sql::transition(prior.as_deref(), Status::Active) {
                        Self::insert_event(tx, recovered.as_ref()).await?;
                    }
                    Self::append_audit(tx, audit.as_ref()).await?;
                }
                Written::Row(rec)
            }
            WriteOp::MarkReauthorization {
                id,
                expected_version,
                now,
                code,
                event,
                audit,
            } => {
                let prior = Self::prior_status(tx, id).await?;
                let done = sqlx::query(dialect_sql!(DB, sql::MARK_REAUTHORIZATION))
                    .bind(code.as_str())
                    .bind(*now)
                    .bind(id.as_str())
                    .bind(*expected_version)
                    .execute(&mut *tx)
                    .await?;
                let changed = DB::rows_affected(&done) > 0;
                if changed {
                    Self::log_change(tx, id, *now).await?;
                    if sql::transition(prior.as_deref(), Status::ReauthorizationRequired) {
                        Self::insert_event(tx, event.as_ref()).await?;
                        Self::append_audit(tx, audit.as_ref()).await?;
                    }
                }
                Written::Flag(changed)
            }
            WriteOp::MarkFailing {
                id,
                owner,
                expected_version,
                now,
                class,
                next_retry_at,
                event,
            } => {
                let prior = Self::prior_status(tx, id).await?;
                let done = sqlx::query(dialect_sql!(DB, sql::MARK_REFRESH_FAILING))
                    .bind(class.as_str())
                    .bind(*next_retry_at)
                    .bind(*now)
                    .bind(id.as_str())
                    .bind(*expected_version)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(dialect_sql!(DB, sql::RELEASE_LEASE))
                    .bind(id.as_str())
                    .bind(owner.as_str())
                    .execute(&mut *tx)
                    .await?;
                let became = DB::rows_affected(&done) > 0
                    && sql::transition(prior.as_deref(), Status::RefreshFailing);
                if became {
                    Self::log_change(tx, id, *now).await?;
                    Self::insert_event(tx, event.as_ref()).await?;
                }
                Written::Flag(became)
            }
            WriteOp::ClaimEvents(claim) => {
                let rows = DB::claim_events(claim).fetch_all(&mut *tx).await?;
                Written::Events(sql::oldest_first(&rows)?)
            }
            WriteOp::EventDelivered { id, owner, now } => {
                sqlx::query(dialect_sql!(DB, sql::EVENT_DELIVERED))
                    .bind(*now)
                    .bind(id.as_str())
                    .bind(owner.as_str())
                    .execute(&mut *tx)
                    .await?;
                Written::Done
            }
            WriteOp::EventRetry { id, owner, next_attempt_at_ms, error } => {
                sqlx::query(dialect_sql!(DB, sql::EVENT_RETRY))
                    .bind(error.as_str())
                    .bind(*next_attempt_at_ms)
                    .bind(id.as_str())
                    .bind(owner.as_str())
                    .execute(&mut *tx)
                    .await?;
                Written::Done
            }
            WriteOp::EventGaveUp { id, owner, now, error } => {
                sqlx::query(dialect_sql!(DB, sql::EVENT_GAVE_UP))
                    .bind(*now)
                    .bind(error.as_str())
                    .bind(id.as_str())
                    .bind(owner.as_str())
                    .execute(&mut *tx)
                    .await?;
                Written::Done
            }
            WriteOp::PruneEvents { delivered_before, given_up_before } => {
                let done = sqlx::query(dialect_sql!(DB, sql::PRUNE_EVENTS))
                    .bind(*delivered_before)
                    .bind(*given_up_before)
                    .execute(&mut *tx)
                    .await?;
                Written::Count(DB::rows_affected(&done))
            }
            WriteOp::RetryGivenUp { ids, now_ms } => {
                let mut n = 0;
                for chunk in sql::id_chunks(ids.as_deref()) {
                    let text = Self::text(sql::retry_given_up_sql(chunk.map(<[String]>::len)));
                    let mut q = sqlx::query(&text).bind(*now_ms);
                    for id in chunk.into_iter().flatten() {
                        q = q.bind(id.as_str());
                    }
                    n += DB::rows_affected(&q.execute(&mut *tx).await?);
                }
                Written::Count(n)
            }
            WriteOp::ClearGivenUp { ids } => {
                let mut n = 0;
                for chunk in sql::id_chunks(ids.as_deref()) {
                    let text = Self::text(sql::clear_given_up_sql(chunk.map(<[String]>::len)));
                    let mut q = sqlx::query(&text);
                    for id in chunk.into_iter().flatten() {
                        q = q.bind(id.as_str());
                    }
                    n += DB::rows_affected(&q.execute(&mut *tx).await?);
                }
                Written::Count(n)
            }
        })
    }

    /// A statement made at run time, numbered if `DB` wants.
    pub(crate) fn text(text: String) -> String {
        if DB::NUMBERED {
            sql::numbered(&text)
        } else {
            text
        }
    }

    /// [`Dialect::PRIOR_STATUS`]: what decides whether a change is a
    /// transition worth an event.
    async fn prior_status(tx: &mut DB::Connection, id: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(DB::PRIOR_STATUS)
            .bind(id)
            .fetch_optional(tx)
            .await?)
    }

    /// Appends `event` (if any) to the outbox.
    pub(crate) async fn insert_event(
        tx: &mut DB::Connection,
        event: Option<&NewEvent>,
    ) -> Result<(), StoreError> {
        if let Some(e) = event {
            bind_event(sqlx::query(dialect_sql!(DB, INSERT_EVENT)), e)
                .execute(tx)
                .await?;
        }
        Ok(())
    }

    /// Appends `audit` (if any) to the chain, last in the transaction:
    /// under the chain's lock ([`Dialect::LOCK_AUDIT`], or SQLite's write
    /// lock, which the transaction holds by now: it wrote the change
    /// first, or began IMMEDIATE), so appenders of every process take
    /// turns and the last row read here is the last row.
    pub(crate) async fn append_audit(
        tx: &mut DB::Connection,
        audit: Option<&AuditAppend>,
    ) -> Result<Option<i64>, StoreError> {
        let Some(audit) = audit else { return Ok(None) };
        if let Some(lock) = DB::LOCK_AUDIT {
            sqlx::query(lock).bind(sql::AUDIT_LOCK).execute(&mut *tx).await?;
        }
        let last = sqlx::query(sql::LAST_AUDIT)
            .fetch_optional(&mut *tx)
            .await?
            .as_ref()
            .map(sql::last_audit)
            .transpose()?;
        let row = audit.chain(last);
        sql::bind_audit(sqlx::query(dialect_sql!(DB, sql::INSERT_AUDIT)), &row)
            .execute(tx)
            .await?;
        Ok(Some(row.seq))
    }

    /// A change-log entry for the session `id`.
    pub(crate) async fn log_change(tx: &mut DB::Connection, id: &str, now: i64) -> Result<(), StoreError> {
        let text = Self::text(format!(
            "INSERT INTO session_changes (session_id, at) VALUES (?, {})",
            DB::CHANGE_AT
        ));
        DB::bind_change_at(sqlx::query(&text).bind(id), now)
            .execute(tx)
            .await?;
        Ok(())
    }

    /// Change-log entries of inserted sessions, with their key hashes.
    pub(crate) async fn log_added(tx: &mut DB::Connection, new: &[NewSession]) -> Result<(), StoreError> {
        for chunk in new.chunks(sql::BULK_ROWS) {
            let text = Self::text(sql::insert_added_changes_sql(chunk.len(), DB::CHANGE_AT));
            let mut q = sqlx::query(&text);
            for s in chunk {
                q = DB::bind_change_at(q.bind(s.id.as_str()), s.now).bind(&s.key_hash.0[..]);
            }
            q.execute(&mut *tx).await?;
        }
        Ok(())
    }

    /// The change-log entry of a key added to session `id`, with its hash
    /// (other processes forget the key's absence).
    pub(crate) async fn log_key_added(
        tx: &mut DB::Connection,
        id: &str,
        hash: &crate::secrets::session::KeyHash,
        now: i64,
    ) -> Result<(), StoreError> {
        let text = Self::text(sql::insert_added_changes_sql(1, DB::CHANGE_AT));
        DB::bind_change_at(sqlx::query(&text).bind(id), now)
            .bind(&hash.0[..])
            .execute(tx)
            .await?;
        Ok(())
    }

    /// The first key of each new session (its `key_hash`, unlimited), or
    /// [`StoreError::DuplicateKey`] when one names a key already.
    pub(crate) async fn insert_first_keys(
        tx: &mut DB::Connection,
        batch: &[NewSession],
    ) -> Result<(), StoreError> {
        for chunk in batch.chunks(sql::BULK_ROWS) {
            let text = Self::text(format!(
                "INSERT INTO session_keys (key_id, session_id, key_hash, created_at) VALUES {}",
                vec!["(?, ?, ?, ?)"; chunk.len()].join(", ")
            ));
            let mut q = sqlx::query(&text);
            for s in chunk {
                q = q
                    .bind(crate::secrets::session::first_key_id(&s.id))
                    .bind(s.id.as_str())
                    .bind(&s.key_hash.0[..])
                    .bind(s.now);
            }
            unique(q.execute(&mut *tx).await)?;
        }
        Ok(())
    }

    /// Inserts new sessions, [`sql::BULK_ROWS`] to a statement, each with
    /// its first key; the rows inserted, or [`StoreError::DuplicateKey`].
    pub(crate) async fn insert_session_rows(
        tx: &mut DB::Connection,
        batch: &[NewSession],
    ) -> Result<u64, StoreError> {
        let mut inserted = 0;
        for chunk in batch.chunks(sql::BULK_ROWS) {
            let text = Self::text(sql::insert_sessions_sql(chunk.len()));
            let mut q = sqlx::query(&text);
            for s in chunk {
                q = sql::bind_new_session(q, s);
            }
            inserted += DB::rows_affected(&unique(q.execute(&mut *tx).await)?);
        }
        Self::insert_first_keys(tx, batch).await?;
        Ok(inserted)
    }
}
}

/// A write's result, with a unique violation as [`StoreError::DuplicateKey`].
pub(crate) fn unique<T>(result: Result<T, sqlx::Error>) -> Result<T, StoreError> {
    match result {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::DuplicateKey),
        other => Ok(other?),
    }
}
