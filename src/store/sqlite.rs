//! The embedded store: one SQLite file in WAL mode, shared safely by the
//! server and CLI processes on one machine.
//!
//! `synchronous=FULL` makes every commit durable before it returns (a rotated
//! refresh token must survive a power cut), and `busy_timeout` lets a CLI
//! write wait for the server's instead of failing.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Notify};

use super::shared::{chain_audit, insert_session_rows, Shared};
use super::sql::{
    self, bind_event, record, EVENT_COLUMNS, INSERT_EVENT, SESSION_COLUMNS as COLUMNS,
};
use super::{
    Changes, EventRow, Failure, Health, IdleCursor, IdleSession, Lease, NewEvent, NewSession,
    OAuthOutcome, OAuthState, Resealed, SealedCount, SealedRow, SealedTokens, SessionCount,
    SessionRecord, Store, StoreError,
};
use crate::audit::{AuditAppend, AuditFilter, AuditRow};
use crate::secrets::session::{KeyHash, Status};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Sessions one `note_uses` transaction writes at most (one `UPDATE` each).
const USES_PER_TRANSACTION: usize = 250;

/// When a session was last used or refreshed, or made: what idle refresh
/// orders by. Exactly the expression of the index `sessions_idle`.
const IDLE_SINCE: &str = "MAX(COALESCE(last_used_at, 0), COALESCE(last_refresh_at, 0), created_at)";

/// The statement of [`Store::idle_sessions`] (public for the test that
/// checks its plan uses the index). The expression and the first two
/// conditions are those of the partial index `sessions_idle`, word for
/// word: SQLite uses it only so. The cursor is written
/// `expr >= ? AND (expr > ? OR id > ?)` rather than as a row value, which
/// SQLite would not use as the start of the index range (every page would
/// scan from the first candidate: a pass over 400,000 candidates took
/// 165 s instead of 1.7 s).
pub fn idle_sessions_sql() -> String {
    format!(
        "SELECT id, version, {IDLE_SINCE} AS idle_since FROM sessions
         WHERE provider = ? AND status <> 'reauthorization_required' AND refresh_token IS NOT NULL
           AND {IDLE_SINCE} >= ? AND ({IDLE_SINCE} > ? OR id > ?) AND {IDLE_SINCE} < ?
           AND (next_retry_at IS NULL OR next_retry_at <= ?)
         ORDER BY {IDLE_SINCE}, id LIMIT ?"
    )
}

pub struct SqliteStore {
    /// Reads, and the writes of the control plane.
    pool: SqlitePool,
    /// Rotated tokens and health marks (with their events), applied by the
    /// [`commit_writer`] with group commit (`synchronous=FULL`).
    commits: mpsc::UnboundedSender<WriteJob>,
    /// Refresh leases, last uses and the outbox's delivery bookkeeping,
    /// applied by the [`lease_writer`] on its own connection with
    /// `synchronous=NORMAL`: none needs an fsync (a lease lost in a power
    /// cut is simply free again, a last use a little older, an event
    /// delivered again), and on their own connection these writes never
    /// hold up a commit's fsync behind them, nor meet it in SQLite's busy
    /// handler.
    leases: mpsc::UnboundedSender<WriteJob>,
    gate: Arc<WriteGate>,
    /// The file as opened (none in memory): checked before every write and
    /// by `ping`, so a deleted or replaced file is noticed.
    file: Option<DbFile>,
}

/// The database file and its identity (device and inode) when opened.
#[derive(Debug)]
struct DbFile {
    path: PathBuf,
    id: (u64, u64),
}

impl DbFile {
    /// The file `opts` names, unless the database lives in memory.
    fn path_of(opts: &SqliteConnectOptions, url: &str) -> Option<PathBuf> {
        let name = opts.get_filename();
        let text = name.to_string_lossy();
        let params = url.split_once('?').map_or("", |(_, q)| q);
        let memory = text.is_empty()
            || text.starts_with("file:sqlx-in-memory")
            || url::form_urlencoded::parse(params.as_bytes())
                .any(|(k, v)| k == "mode" && v == "memory");
        (!memory).then(|| name.to_path_buf())
    }

    /// Creates the file, empty and 0600, if it does not exist yet: SQLite
    /// gives the `-wal` and `-shm` files it makes the database file's mode.
    fn create_private(path: &Path, url: &str) -> Result<(), StoreError> {
        let params = url.split_once('?').map_or("", |(_, q)| q);
        if url::form_urlencoded::parse(params.as_bytes()).any(|(k, v)| k == "mode" && v == "ro") {
            return Ok(());
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        match opts.open(path) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(StoreError::Open(format!("cannot create the file: {e}"))),
        }
    }

    fn identity(path: &Path) -> Option<(u64, u64)> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
        }
        #[cfg(not(unix))]
        {
            std::fs::metadata(path).ok().map(|_| (0, 0))
        }
    }

    /// Whether the path still names the file that was opened.
    fn unchanged(&self) -> Result<(), StoreError> {
        if DbFile::identity(&self.path) == Some(self.id) {
            Ok(())
        } else {
            Err(StoreError::FileReplaced {
                path: self.path.display().to_string(),
            })
        }
    }
}

impl SqliteStore {
    pub async fn open(url: &str) -> Result<SqliteStore, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let path = DbFile::path_of(&opts, url);
        if let Some(path) = &path {
            DbFile::create_private(path, url)?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts.clone())
            .await?;
        MIGRATOR.run(&pool).await?;
        let single = || {
            SqlitePoolOptions::new()
                .min_connections(1)
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(10))
        };
        let lease_conn = single()
            .connect_with(opts.clone().synchronous(SqliteSynchronous::Normal))
            .await?;
        let commit_conn = single().connect_with(opts).await?;
        // Every connection is open: this is the file they all write to.
        let file = match path {
            Some(path) => match DbFile::identity(&path) {
                Some(id) => Some(DbFile { path, id }),
                None => {
                    return Err(StoreError::FileReplaced {
                        path: path.display().to_string(),
                    })
                }
            },
            None => None,
        };
        let (commits, commit_jobs) = mpsc::unbounded_channel();
        let (leases, lease_jobs) = mpsc::unbounded_channel();
        let gate = Arc::new(WriteGate::default());
        tokio::spawn(commit_writer(commit_conn, commit_jobs, Arc::clone(&gate)));
        tokio::spawn(lease_writer(lease_conn, lease_jobs, Arc::clone(&gate)));
        Ok(SqliteStore {
            pool,
            commits,
            leases,
            gate,
            file,
        })
    }

    /// Runs a [`WriteOp::EventsStatement`]; how many rows it changed.
    async fn events_statement(
        &self,
        sql: String,
        values: Vec<EventValue>,
    ) -> Result<u64, StoreError> {
        match self.write(WriteOp::EventsStatement { sql, values }).await? {
            Written::Count(n) => Ok(n),
            _ => Err(StoreError::Closed),
        }
    }

    async fn event_update(
        &self,
        sql: &'static str,
        first: EventValue,
        second: Option<EventValue>,
        id: &str,
        owner: &str,
    ) -> Result<(), StoreError> {
        let op = WriteOp::EventUpdate {
            sql,
            first,
            second,
            id: id.to_owned(),
            owner: owner.to_owned(),
        };
        self.write(op).await.map(|_| ())
    }

    /// Refuses a write, loudly, once the file has been deleted or replaced:
    /// SQLite would go on writing to the unlinked file, and every change
    /// (a rotated refresh token too) would vanish at the next start.
    fn writable(&self) -> Result<(), StoreError> {
        match &self.file {
            Some(file) => file.unchanged().inspect_err(|e| {
                tracing::error!(error = %e, "store write refused");
            }),
            None => Ok(()),
        }
    }

    async fn write(&self, op: WriteOp) -> Result<Written, StoreError> {
        self.writable()?;
        let (reply, answer) = oneshot::channel();
        let is_commit = op.is_commit();
        let writer = if is_commit {
            self.gate.commit_sent();
            &self.commits
        } else {
            &self.leases
        };
        if writer.send(WriteJob { op, reply }).is_err() {
            // The writer is gone: undo the count, or lease writes would wait forever.
            if is_commit {
                self.gate.committed(1);
            }
            return Err(StoreError::Closed);
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// A write of the refresh path.
enum WriteOp {
    AcquireLease {
        id: String,
        owner: String,
        until_ms: i64,
        now_ms: i64,
    },
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
    NoteUses(Vec<(String, i64)>),
    ClaimEvents {
        owner: String,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    },
    /// One of the outbox's `UPDATE events ... WHERE id = ? AND lease_owner = ?`.
    EventUpdate {
        sql: &'static str,
        first: EventValue,
        second: Option<EventValue>,
        id: String,
        owner: String,
    },
    /// A statement on the outbox that changes many rows (prune, retry,
    /// clear): its values in order; answers how many rows it changed.
    EventsStatement {
        sql: String,
        values: Vec<EventValue>,
    },
}

/// A value bound to an outbox update.
enum EventValue {
    Int(i64),
    Text(String),
}

impl WriteOp {
    /// Whether the op goes through the [`commit_writer`] (durable, first)
    /// rather than the [`lease_writer`].
    fn is_commit(&self) -> bool {
        matches!(
            self,
            WriteOp::CommitRefresh { .. }
                | WriteOp::MarkReauthorization { .. }
                | WriteOp::MarkFailing { .. }
        )
    }
}

enum Written {
    Lease(Lease),
    Row(Option<SessionRecord>),
    Flag(bool),
    Count(u64),
    Events(Vec<EventRow>),
    Done,
}

struct WriteJob {
    op: WriteOp,
    reply: oneshot::Sender<Result<Written, StoreError>>,
}

/// Orders this process's refresh writes before they reach SQLite, so they
/// never meet in SQLite's busy handler (which sleeps in steps of
/// milliseconds), and lets commits go first: a commit closes a crash
/// window, a lease only opens one.
#[derive(Default)]
struct WriteGate {
    lock: tokio::sync::Mutex<()>,
    /// Commit jobs sent and not yet written.
    pending_commits: AtomicUsize,
    /// Signalled whenever `pending_commits` drops to zero.
    idle: Notify,
}

impl WriteGate {
    fn commit_sent(&self) {
        self.pending_commits.fetch_add(1, Ordering::AcqRel);
    }

    fn committed(&self, n: usize) {
        if self.pending_commits.fetch_sub(n, Ordering::AcqRel) == n {
            self.idle.notify_waiters();
        }
    }

    /// Waits until no commit is pending, then takes the lock.
    async fn after_commits(&self) -> tokio::sync::MutexGuard<'_, ()> {
        loop {
            let idle = self.idle.notified();
            if self.pending_commits.load(Ordering::Acquire) == 0 {
                return self.lock.lock().await;
            }
            idle.await;
        }
    }
}

/// Writes rotated tokens with group commit: whatever commits are waiting
/// go into one transaction and one fsync.
///
/// This is what keeps the crash window (the provider has rotated the
/// refresh token, the commit has not returned) short in a refresh storm:
/// the rotated tokens of many sessions wait for one fsync, not a queue of
/// them, and never behind more than one lease write (see [`WriteGate`]).
/// `tests/crash.rs` measures it.
async fn commit_writer(
    conn: SqlitePool,
    mut jobs: mpsc::UnboundedReceiver<WriteJob>,
    gate: Arc<WriteGate>,
) {
    const BATCH: usize = 256;
    let mut batch = Vec::with_capacity(BATCH);
    while jobs.recv_many(&mut batch, BATCH).await > 0 {
        let n = batch.len();
        let locked = gate.lock.lock().await;
        match run_batch(&conn, &batch).await {
            Ok(results) => {
                for (job, result) in batch.drain(..).zip(results) {
                    let _ = job.reply.send(Ok(result));
                }
            }
            // The batch rolled back: retry each job alone, so one failing
            // job cannot lose the others' rotations.
            Err(_) => {
                for job in batch.drain(..) {
                    let result = run_one(&conn, &job).await;
                    let _ = job.reply.send(result);
                }
            }
        }
        drop(locked);
        gate.committed(n);
    }
}

/// Writes leases one at a time, each in its own short transaction, and
/// only while no commit is waiting.
async fn lease_writer(
    conn: SqlitePool,
    mut jobs: mpsc::UnboundedReceiver<WriteJob>,
    gate: Arc<WriteGate>,
) {
    while let Some(job) = jobs.recv().await {
        let result = {
            let _locked = gate.after_commits().await;
            run_one(&conn, &job).await
        };
        let _ = job.reply.send(result);
    }
}

async fn run_one(conn: &SqlitePool, job: &WriteJob) -> Result<Written, StoreError> {
    run_batch(conn, std::slice::from_ref(job))
        .await?
        .pop()
        .ok_or(StoreError::Closed)
}

async fn run_batch(writer: &SqlitePool, jobs: &[WriteJob]) -> Result<Vec<Written>, StoreError> {
    // IMMEDIATE: the write lock from the start, so a job may read the row
    // it is about to change (its prior status) without its transaction
    // failing to upgrade because another process wrote in between.
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        results.push(apply(&mut tx, &job.op).await?);
    }
    tx.commit().await?;
    Ok(results)
}

async fn apply(tx: &mut sqlx::SqliteConnection, op: &WriteOp) -> Result<Written, StoreError> {
    Ok(match op {
        WriteOp::AcquireLease {
            id,
            owner,
            until_ms,
            now_ms,
        } => {
            let sql = format!(
                "UPDATE sessions SET refresh_lease_owner = ?, refresh_lease_until = ?
                 WHERE id = ? AND (refresh_lease_until IS NULL OR refresh_lease_until < ? OR refresh_lease_owner = ?)
                 RETURNING {COLUMNS}"
            );
            let row = sqlx::query(&sql)
                .bind(owner)
                .bind(until_ms)
                .bind(id)
                .bind(now_ms)
                .bind(owner)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = row {
                return Ok(Written::Lease(Lease::Acquired(record(&row)?)));
            }
            let held =
                sqlx::query("SELECT refresh_lease_until, version FROM sessions WHERE id = ?")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            Written::Lease(match held {
                None => Lease::Gone,
                Some(r) => Lease::Held {
                    until_ms: r
                        .try_get::<Option<i64>, _>("refresh_lease_until")?
                        .unwrap_or(0),
                    version: r.try_get("version")?,
                },
            })
        }
        WriteOp::ReleaseLeasesOf { owner } => {
            let done = sqlx::query(super::sql::RELEASE_LEASES_OF)
                .bind(owner)
                .execute(&mut *tx)
                .await?;
            Written::Count(done.rows_affected())
        }
        WriteOp::ReleaseLease { id, owner } => {
            sqlx::query(
                "UPDATE sessions SET refresh_lease_owner = NULL, refresh_lease_until = NULL
                 WHERE id = ? AND refresh_lease_owner = ?",
            )
            .bind(id)
            .bind(owner)
            .execute(&mut *tx)
            .await?;
            Written::Done
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
            let prior = prior_status(tx, id).await?;
            let row = sqlx::query(&sql::commit_refresh_sql())
                .bind(&tokens.access_token)
                .bind(&tokens.refresh_token)
                .bind(tokens.expires_at)
                .bind(healthy)
                .bind(healthy)
                .bind(healthy)
                .bind(now)
                .bind(now)
                .bind(id)
                .bind(expected_version)
                .bind(owner)
                .fetch_optional(&mut *tx)
                .await?;
            let rec = row.as_ref().map(record).transpose()?;
            if rec.is_some() {
                log_change(tx, id, *now).await?;
                if *healthy && sql::transition(prior.as_deref(), Status::Active) {
                    insert_event(tx, recovered.as_ref()).await?;
                }
                append_audit_tx(tx, audit.as_ref()).await?;
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
            let prior = prior_status(tx, id).await?;
            let n = sqlx::query(sql::MARK_REAUTHORIZATION)
                .bind(code)
                .bind(now)
                .bind(id)
                .bind(expected_version)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n > 0 {
                log_change(tx, id, *now).await?;
                if sql::transition(prior.as_deref(), Status::ReauthorizationRequired) {
                    insert_event(tx, event.as_ref()).await?;
                    append_audit_tx(tx, audit.as_ref()).await?;
                }
            }
            Written::Flag(n > 0)
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
            let prior = prior_status(tx, id).await?;
            let n = sqlx::query(sql::MARK_REFRESH_FAILING)
                .bind(class)
                .bind(next_retry_at)
                .bind(now)
                .bind(id)
                .bind(expected_version)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(sql::RELEASE_LEASE)
                .bind(id)
                .bind(owner)
                .execute(&mut *tx)
                .await?;
            let became = n > 0 && sql::transition(prior.as_deref(), Status::RefreshFailing);
            if became {
                log_change(tx, id, *now).await?;
                insert_event(tx, event.as_ref()).await?;
            }
            Written::Flag(became)
        }
        WriteOp::NoteUses(uses) => {
            let mut moved = 0;
            for (id, at) in uses {
                moved += sqlx::query(
                    "UPDATE sessions SET last_used_at = ?
                     WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)",
                )
                .bind(at)
                .bind(id)
                .bind(at)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            Written::Count(moved)
        }
        WriteOp::ClaimEvents {
            owner,
            now_ms,
            lease_ms,
            limit,
        } => {
            let rows = sqlx::query(&format!(
                "UPDATE events SET lease_owner = ?, lease_until_ms = ?
                 WHERE seq IN (
                     SELECT seq FROM events
                     WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at_ms <= ?
                       AND (lease_until_ms IS NULL OR lease_until_ms <= ?)
                     ORDER BY at, seq LIMIT ?)
                 RETURNING seq, {EVENT_COLUMNS}"
            ))
            .bind(owner)
            .bind(now_ms.saturating_add(*lease_ms))
            .bind(now_ms)
            .bind(now_ms)
            .bind(i64::from(*limit))
            .fetch_all(&mut *tx)
            .await?;
            Written::Events(sql::oldest_first(&rows)?)
        }
        WriteOp::EventUpdate {
            sql,
            first,
            second,
            id,
            owner,
        } => {
            let mut q = sqlx::query(sql);
            for v in std::iter::once(first).chain(second) {
                q = match v {
                    EventValue::Int(n) => q.bind(*n),
                    EventValue::Text(t) => q.bind(t.as_str()),
                };
            }
            q.bind(id).bind(owner).execute(&mut *tx).await?;
            Written::Done
        }
        WriteOp::EventsStatement { sql, values } => {
            let mut q = sqlx::query(sql);
            for v in values {
                q = match v {
                    EventValue::Int(n) => q.bind(*n),
                    EventValue::Text(t) => q.bind(t.as_str()),
                };
            }
            Written::Count(q.execute(&mut *tx).await?.rows_affected())
        }
    })
}

async fn prior_status(
    tx: &mut sqlx::SqliteConnection,
    id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(sql::PRIOR_STATUS)
        .bind(id)
        .fetch_optional(tx)
        .await?)
}

async fn insert_event(
    tx: &mut sqlx::SqliteConnection,
    event: Option<&NewEvent>,
) -> Result<(), StoreError> {
    if let Some(e) = event {
        bind_event(sqlx::query(INSERT_EVENT), e).execute(tx).await?;
    }
    Ok(())
}

/// Appends `audit` to the chain, last in the transaction. The transaction
/// holds SQLite's write lock by now (it wrote the change first, or began
/// IMMEDIATE), so appenders of every process take turns: the last row read
/// here is the last row.
async fn append_audit_tx(
    tx: &mut sqlx::SqliteConnection,
    audit: Option<&AuditAppend>,
) -> Result<Option<i64>, StoreError> {
    let Some(audit) = audit else { return Ok(None) };
    Ok(Some(chain_audit::<sqlx::Sqlite>(tx, audit).await?))
}

async fn log_change(tx: &mut sqlx::SqliteConnection, id: &str, now: i64) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO session_changes (session_id, at) VALUES (?, ?)")
        .bind(id)
        .bind(now)
        .execute(tx)
        .await?;
    Ok(())
}

/// Change-log entries of inserted sessions, with their key hashes.
async fn log_added(tx: &mut sqlx::SqliteConnection, new: &[NewSession]) -> Result<(), StoreError> {
    for chunk in new.chunks(sql::BULK_ROWS) {
        let text = sql::insert_added_changes_sql(chunk.len(), "?");
        let mut q = sqlx::query(&text);
        for s in chunk {
            q = q.bind(s.id.as_str()).bind(s.now).bind(&s.key_hash.0[..]);
        }
        q.execute(&mut *tx).await?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        // Answering is not enough: the file must still be the one written to.
        if let Some(file) = &self.file {
            file.unchanged()?;
        }
        Ok(())
    }

    async fn insert_session(
        &self,
        new: NewSession,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<SessionRecord, StoreError> {
        self.writable()?;
        let mut tx = self.pool.begin().await?;
        let res = sqlx::query(
            "INSERT INTO sessions (id, provider, label, key_hash, access_token, refresh_token, expires_at, status, version, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, 'active', 1, ?, ?)",
        )
        .bind(&new.id)
        .bind(&new.provider)
        .bind(&new.label)
        .bind(&new.key_hash.0[..])
        .bind(&new.tokens.access_token)
        .bind(&new.tokens.refresh_token)
        .bind(new.tokens.expires_at)
        .bind(new.now)
        .bind(new.now)
        .execute(&mut *tx)
        .await;
        if let Err(sqlx::Error::Database(e)) = &res {
            if e.is_unique_violation() {
                return Err(StoreError::DuplicateKey);
            }
        }
        res?;
        log_added(&mut tx, std::slice::from_ref(&new)).await?;
        insert_event(&mut tx, event).await?;
        append_audit_tx(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(SessionRecord {
            id: new.id,
            key_hash: new.key_hash,
            provider: new.provider,
            label: new.label,
            status: Status::Active,
            access_token: new.tokens.access_token,
            refresh_token: new.tokens.refresh_token,
            expires_at: new.tokens.expires_at,
            version: 1,
            created_at: new.now,
            updated_at: new.now,
            last_refresh_at: None,
            last_error: None,
            next_retry_at: None,
            last_used_at: None,
        })
    }

    async fn session_by_key(&self, hash: &KeyHash) -> Result<Option<SessionRecord>, StoreError> {
        Shared(&self.pool).session_by_key(hash).await
    }

    async fn session_by_id(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        Shared(&self.pool).session_by_id(id).await
    }

    async fn list_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM sessions ORDER BY created_at, rowid"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record).collect()
    }

    async fn newest_session(&self) -> Result<Option<SessionRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM sessions ORDER BY updated_at DESC, rowid DESC LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record).transpose()
    }

    async fn count_sessions(&self) -> Result<Vec<SessionCount>, StoreError> {
        Shared(&self.pool).count_sessions().await
    }

    async fn count_sealed_by_key(&self) -> Result<Vec<SealedCount>, StoreError> {
        let rows = sqlx::query(
            "SELECT k, COUNT(*) AS n FROM ( \
             SELECT CASE WHEN substr(access_token, 1, 1) = x'02' THEN lower(hex(substr(access_token, 2, 4))) ELSE '' END AS k FROM sessions \
             UNION ALL \
             SELECT CASE WHEN substr(refresh_token, 1, 1) = x'02' THEN lower(hex(substr(refresh_token, 2, 4))) ELSE '' END AS k FROM sessions WHERE refresh_token IS NOT NULL \
             ) GROUP BY k ORDER BY k",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(sql::sealed_count).collect()
    }

    async fn sealed_not_under(
        &self,
        header: &[u8],
        after: &str,
        limit: u32,
    ) -> Result<Vec<SealedRow>, StoreError> {
        Shared(&self.pool)
            .sealed_not_under(header, after, limit)
            .await
    }

    async fn reseal_rows(&self, rows: &[Resealed]) -> Result<Vec<String>, StoreError> {
        self.writable()?;
        let mut tx = self.pool.begin().await?;
        let mut written = Vec::with_capacity(rows.len());
        for r in rows {
            let n = sqlx::query(
                "UPDATE sessions SET access_token = ?, refresh_token = ?
                 WHERE id = ? AND access_token = ? AND refresh_token IS ?",
            )
            .bind(&r.access_token)
            .bind(&r.refresh_token)
            .bind(&r.id)
            .bind(&r.old_access)
            .bind(&r.old_refresh)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n > 0 {
                written.push(r.id.clone());
            }
        }
        tx.commit().await?;
        Ok(written)
    }

    async fn replace_tokens(
        &self,
        id: &str,
        tokens: SealedTokens,
        expected_version: Option<i64>,
        now: i64,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<Option<SessionRecord>, StoreError> {
        self.writable()?;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE sessions SET access_token = ?, refresh_token = ?, expires_at = ?, status = 'active',
                 last_error = NULL, next_retry_at = NULL, version = version + 1, updated_at = ?
             WHERE id = ? AND (? IS NULL OR version = ?)
             RETURNING {COLUMNS}"
        ))
        .bind(&tokens.access_token)
        .bind(&tokens.refresh_token)
        .bind(tokens.expires_at)
        .bind(now)
        .bind(id)
        .bind(expected_version)
        .bind(expected_version)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let rec = record(&row)?;
        log_change(&mut tx, id, now).await?;
        insert_event(&mut tx, event).await?;
        append_audit_tx(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(Some(rec))
    }

    async fn acquire_refresh_lease(
        &self,
        id: &str,
        owner: &str,
        until_ms: i64,
        now_ms: i64,
    ) -> Result<Lease, StoreError> {
        let op = WriteOp::AcquireLease {
            id: id.to_owned(),
            owner: owner.to_owned(),
            until_ms,
            now_ms,
        };
        match self.write(op).await? {
            Written::Lease(lease) => Ok(lease),
            _ => Err(StoreError::Closed),
        }
    }

    async fn refresh_lease_owners(&self) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(super::sql::LEASE_OWNERS)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn release_refresh_leases(&self, owner: &str) -> Result<u64, StoreError> {
        let op = WriteOp::ReleaseLeasesOf {
            owner: owner.to_owned(),
        };
        match self.write(op).await? {
            Written::Count(n) => Ok(n),
            _ => Ok(0),
        }
    }

    async fn release_refresh_lease(&self, id: &str, owner: &str) -> Result<(), StoreError> {
        let op = WriteOp::ReleaseLease {
            id: id.to_owned(),
            owner: owner.to_owned(),
        };
        self.write(op).await.map(|_| ())
    }

    // The compare-and-swap's parts, the health and the audit row: one call.
    #[allow(clippy::too_many_arguments)]
    async fn commit_refresh(
        &self,
        id: &str,
        owner: &str,
        tokens: SealedTokens,
        expected_version: i64,
        now: i64,
        health: Health<'_>,
        audit: Option<&AuditAppend>,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let (healthy, recovered) = match health {
            Health::Healthy { recovered } => (true, recovered.cloned()),
            Health::Unchanged => (false, None),
        };
        let op = WriteOp::CommitRefresh {
            id: id.to_owned(),
            owner: owner.to_owned(),
            tokens,
            expected_version,
            now,
            healthy,
            recovered,
            audit: audit.cloned(),
        };
        match self.write(op).await? {
            Written::Row(rec) => Ok(rec),
            _ => Err(StoreError::Closed),
        }
    }

    async fn mark_reauthorization_required(
        &self,
        id: &str,
        expected_version: i64,
        now: i64,
        code: &str,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<bool, StoreError> {
        let op = WriteOp::MarkReauthorization {
            id: id.to_owned(),
            expected_version,
            now,
            code: code.to_owned(),
            event: event.cloned(),
            audit: audit.cloned(),
        };
        match self.write(op).await? {
            Written::Flag(done) => Ok(done),
            _ => Err(StoreError::Closed),
        }
    }

    async fn mark_refresh_failing(
        &self,
        id: &str,
        owner: &str,
        expected_version: i64,
        now: i64,
        failure: Failure<'_>,
    ) -> Result<bool, StoreError> {
        let op = WriteOp::MarkFailing {
            id: id.to_owned(),
            owner: owner.to_owned(),
            expected_version,
            now,
            class: failure.class.to_owned(),
            next_retry_at: failure.next_retry_at,
            event: failure.event.cloned(),
        };
        match self.write(op).await? {
            Written::Flag(became) => Ok(became),
            _ => Err(StoreError::Closed),
        }
    }

    /// Through the lease writer, one transaction per 250 sessions: a
    /// refresh's commit waits for one chunk at most (about 25 ms on a
    /// loaded 2-core machine with 1M sessions), never for the batch.
    async fn note_uses(&self, uses: &[(String, i64)]) -> Result<u64, StoreError> {
        let mut moved = 0;
        for chunk in uses.chunks(USES_PER_TRANSACTION) {
            match self.write(WriteOp::NoteUses(chunk.to_vec())).await? {
                Written::Count(n) => moved += n,
                _ => return Err(StoreError::Closed),
            }
        }
        Ok(moved)
    }

    async fn idle_sessions(
        &self,
        provider: &str,
        idle_before: i64,
        after: &IdleCursor,
        now: i64,
        limit: u32,
    ) -> Result<Vec<IdleSession>, StoreError> {
        let rows = sqlx::query(&idle_sessions_sql())
            .bind(provider)
            .bind(after.0)
            .bind(after.0)
            .bind(&after.1)
            .bind(idle_before)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(sql::idle_session).collect()
    }

    async fn insert_oauth_state(
        &self,
        state_hash: &[u8; 32],
        state: &OAuthState,
    ) -> Result<(), StoreError> {
        Shared(&self.pool)
            .insert_oauth_state(state_hash, state)
            .await
    }

    async fn peek_oauth_state(
        &self,
        state_hash: &[u8; 32],
        not_before: i64,
    ) -> Result<Option<OAuthState>, StoreError> {
        Shared(&self.pool)
            .peek_oauth_state(state_hash, not_before)
            .await
    }

    async fn insert_browser_oauth_state(
        &self,
        state_hash: &[u8; 32],
        state: &OAuthState,
        browser_hash: &[u8; 32],
        not_before: i64,
        max_pending: u64,
    ) -> Result<bool, StoreError> {
        Shared(&self.pool)
            .insert_browser_oauth_state(state_hash, state, browser_hash, not_before, max_pending)
            .await
    }

    async fn count_pending_oauth_states(&self, not_before: i64) -> Result<u64, StoreError> {
        Shared(&self.pool)
            .count_pending_oauth_states(not_before)
            .await
    }

    async fn take_oauth_state_from_browser(
        &self,
        state_hash: &[u8; 32],
        provider: &str,
        browser_hash: Option<&[u8; 32]>,
        now: i64,
        not_before: i64,
    ) -> Result<Option<OAuthState>, StoreError> {
        Shared(&self.pool)
            .take_oauth_state_from_browser(state_hash, provider, browser_hash, now, not_before)
            .await
    }

    async fn finish_oauth_state(
        &self,
        state_hash: &[u8; 32],
        outcome: &OAuthOutcome,
    ) -> Result<(), StoreError> {
        Shared(&self.pool)
            .finish_oauth_state(state_hash, outcome)
            .await
    }

    async fn oauth_outcome(&self, state_hash: &[u8; 32]) -> Result<OAuthOutcome, StoreError> {
        Shared(&self.pool).oauth_outcome(state_hash).await
    }

    async fn prune_oauth_states(&self, before: i64) -> Result<u64, StoreError> {
        Shared(&self.pool).prune_oauth_states(before).await
    }

    async fn delete_session(
        &self,
        id: &str,
        now: i64,
        event: Option<&NewEvent>,
        audit: Option<&AuditAppend>,
    ) -> Result<bool, StoreError> {
        self.writable()?;
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("DELETE FROM sessions WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            log_change(&mut tx, id, now).await?;
            insert_event(&mut tx, event).await?;
            append_audit_tx(&mut tx, audit).await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn append_audit(&self, audit: &AuditAppend) -> Result<i64, StoreError> {
        self.writable()?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let seq = append_audit_tx(&mut tx, Some(audit)).await?;
        tx.commit().await?;
        seq.ok_or(StoreError::Closed)
    }

    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRow>, StoreError> {
        Shared(&self.pool).list_audit(filter).await
    }

    async fn audit_page(&self, after_seq: i64, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
        Shared(&self.pool).audit_page(after_seq, limit).await
    }

    async fn count_audit_by_key(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Shared(&self.pool).count_audit_by_key().await
    }

    async fn claim_events(
        &self,
        owner: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<EventRow>, StoreError> {
        let op = WriteOp::ClaimEvents {
            owner: owner.to_owned(),
            now_ms,
            lease_ms,
            limit,
        };
        match self.write(op).await? {
            Written::Events(events) => Ok(events),
            _ => Err(StoreError::Closed),
        }
    }

    async fn event_delivered(&self, id: &str, owner: &str, now: i64) -> Result<(), StoreError> {
        self.event_update(sql::EVENT_DELIVERED, EventValue::Int(now), None, id, owner)
            .await
    }

    async fn event_retry(
        &self,
        id: &str,
        owner: &str,
        next_attempt_at_ms: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        self.event_update(
            sql::EVENT_RETRY,
            EventValue::Text(error.to_owned()),
            Some(EventValue::Int(next_attempt_at_ms)),
            id,
            owner,
        )
        .await
    }

    async fn event_gave_up(
        &self,
        id: &str,
        owner: &str,
        now: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        self.event_update(
            sql::EVENT_GAVE_UP,
            EventValue::Int(now),
            Some(EventValue::Text(error.to_owned())),
            id,
            owner,
        )
        .await
    }

    async fn list_events(&self, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        Shared(&self.pool).list_events(limit).await
    }

    async fn prune_events(
        &self,
        delivered_before: i64,
        given_up_before: i64,
    ) -> Result<u64, StoreError> {
        self.events_statement(
            sql::PRUNE_EVENTS.to_owned(),
            vec![
                EventValue::Int(delivered_before),
                EventValue::Int(given_up_before),
            ],
        )
        .await
    }

    async fn list_given_up_events(&self, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        Shared(&self.pool).list_given_up_events(limit).await
    }

    async fn retry_given_up_events(
        &self,
        ids: Option<&[String]>,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut n = 0;
        for chunk in sql::id_chunks(ids) {
            let values = std::iter::once(EventValue::Int(now_ms))
                .chain(chunk.into_iter().flatten().cloned().map(EventValue::Text))
                .collect();
            n += self
                .events_statement(sql::retry_given_up_sql(chunk.map(<[String]>::len)), values)
                .await?;
        }
        Ok(n)
    }

    async fn clear_given_up_events(&self, ids: Option<&[String]>) -> Result<u64, StoreError> {
        let mut n = 0;
        for chunk in sql::id_chunks(ids) {
            let values = chunk
                .into_iter()
                .flatten()
                .cloned()
                .map(EventValue::Text)
                .collect();
            n += self
                .events_statement(sql::clear_given_up_sql(chunk.map(<[String]>::len)), values)
                .await?;
        }
        Ok(n)
    }

    async fn change_cursor(&self) -> Result<i64, StoreError> {
        Shared(&self.pool).change_cursor().await
    }

    async fn changes(&self, cursor: i64) -> Result<Changes, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, session_id, key_hash FROM session_changes WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(cursor)
        .bind(super::CHANGES_PAGE as i64)
        .fetch_all(&self.pool)
        .await?;
        sql::changes(&rows, cursor)
    }

    async fn insert_sessions(
        &self,
        batch: &[NewSession],
        audit: Option<&AuditAppend>,
    ) -> Result<u64, StoreError> {
        self.writable()?;
        let mut tx = self.pool.begin().await?;
        let inserted = insert_session_rows::<sqlx::Sqlite>(&mut tx, batch).await?;
        log_added(&mut tx, batch).await?;
        append_audit_tx(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(inserted)
    }

    async fn prune_changes(&self, before: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM session_changes WHERE at < ? AND seq < (SELECT MAX(seq) FROM session_changes)")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
