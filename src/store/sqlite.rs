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
use sqlx::SqlitePool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Notify};

use super::shared::{Backend, Claim, Dialect, LeaseAsk, Query, Sql, WriteOp, Written};
use super::sql::{self, once, EVENT_COLUMNS, SESSION_COLUMNS as COLUMNS};
use super::{Budgets, IdleCursor, Resealed, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Sessions one `note_uses` transaction writes at most (one `UPDATE` each).
const USES_PER_TRANSACTION: usize = 250;

/// When a session was last used or refreshed, or made: what idle refresh
/// orders by. Exactly the expression of the index `sessions_idle`.
const IDLE_SINCE: &str = "MAX(COALESCE(last_used_at, 0), COALESCE(last_refresh_at, 0), created_at)";

/// The statement of `SessionStore::idle_sessions` (public for the test that
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

    async fn send(&self, op: Job) -> Result<Written, StoreError> {
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

/// A write for one of the writer tasks: a shared [`WriteOp`], or last uses.
// One per write, moved once into its channel: not worth a box.
#[allow(clippy::large_enum_variant)]
enum Job {
    Op(WriteOp),
    NoteUses(Vec<(String, i64)>),
}

impl Job {
    /// Whether the job goes through the [`commit_writer`] (durable, first)
    /// rather than the [`lease_writer`].
    fn is_commit(&self) -> bool {
        matches!(self, Job::Op(op) if op.is_commit())
    }
}

struct WriteJob {
    op: Job,
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

async fn apply(tx: &mut sqlx::SqliteConnection, job: &Job) -> Result<Written, StoreError> {
    match job {
        Job::Op(op) => Sql::<sqlx::Sqlite>::apply(tx, op).await,
        Job::NoteUses(uses) => {
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
            Ok(Written::Count(moved))
        }
    }
}

impl Dialect for sqlx::Sqlite {
    const NUMBERED: bool = false;
    const INSERT_ORDER: &'static str = "rowid";
    const PRIOR_STATUS: &'static str = sql::PRIOR_STATUS;
    const LOCK_AUDIT: Option<&'static str> = None;
    /// IMMEDIATE: SQLite's write lock from the start, which is the audit
    /// chain's lock.
    const BEGIN_AUDIT: &'static str = "BEGIN IMMEDIATE";
    const COUNT_SEALED_BY_KEY: &'static str = "SELECT k, COUNT(*) AS n FROM ( \
         SELECT CASE WHEN substr(access_token, 1, 1) = x'02' THEN lower(hex(substr(access_token, 2, 4))) ELSE '' END AS k FROM sessions \
         UNION ALL \
         SELECT CASE WHEN substr(refresh_token, 1, 1) = x'02' THEN lower(hex(substr(refresh_token, 2, 4))) ELSE '' END AS k FROM sessions WHERE refresh_token IS NOT NULL \
         ) GROUP BY k ORDER BY k";
    const CHANGE_AT: &'static str = "?";
    const REREADS: bool = false;

    fn rows_affected(done: &Self::QueryResult) -> u64 {
        done.rows_affected()
    }

    fn bind_change_at(q: Query<'_, Self>, now: i64) -> Query<'_, Self> {
        q.bind(now)
    }

    fn changes(cursor: i64) -> Query<'static, Self> {
        sqlx::query(
            "SELECT seq, session_id, key_hash FROM session_changes WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(cursor)
        .bind(super::CHANGES_PAGE as i64)
    }

    fn acquire_lease(ask: &LeaseAsk) -> Query<'_, Self> {
        sqlx::query(once!(format!(
            "UPDATE sessions SET refresh_lease_owner = ?, refresh_lease_until = ?
             WHERE id = ? AND (refresh_lease_until IS NULL OR refresh_lease_until < ? OR refresh_lease_owner = ?)
             RETURNING {COLUMNS}"
        )))
        .bind(ask.owner.as_str())
        .bind(ask.until_ms)
        .bind(ask.id.as_str())
        .bind(ask.now_ms)
        .bind(ask.owner.as_str())
    }

    fn lease_held(ask: &LeaseAsk) -> Query<'_, Self> {
        sqlx::query("SELECT refresh_lease_until AS until_ms, version FROM sessions WHERE id = ?")
            .bind(ask.id.as_str())
    }

    fn claim_events(claim: &Claim) -> Query<'_, Self> {
        sqlx::query(once!(format!(
            "UPDATE events SET lease_owner = ?, lease_until_ms = ?
             WHERE seq IN (
                 SELECT seq FROM events
                 WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at_ms <= ?
                   AND (lease_until_ms IS NULL OR lease_until_ms <= ?)
                 ORDER BY at, seq LIMIT ?)
             RETURNING seq, {EVENT_COLUMNS}"
        )))
        .bind(claim.owner.as_str())
        .bind(claim.now_ms.saturating_add(claim.lease_ms))
        .bind(claim.now_ms)
        .bind(claim.now_ms)
        .bind(i64::from(claim.limit))
    }

    fn idle_sessions() -> &'static str {
        once!(idle_sessions_sql())
    }

    /// `expr >= ? AND (expr > ? OR id > ?)`: see [`idle_sessions_sql`].
    fn bind_idle_cursor<'q>(q: Query<'q, Self>, after: &'q IdleCursor) -> Query<'q, Self> {
        q.bind(after.0).bind(after.0).bind(after.1.as_str())
    }
}

#[async_trait]
impl Backend for SqliteStore {
    type DB = sqlx::Sqlite;

    fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn unchanged(&self) -> Result<(), StoreError> {
        match &self.file {
            Some(file) => file.unchanged(),
            None => Ok(()),
        }
    }

    async fn write(&self, op: WriteOp) -> Result<Written, StoreError> {
        self.send(Job::Op(op)).await
    }

    /// Through the lease writer, one transaction per 250 sessions: a
    /// refresh's commit waits for one chunk at most (about 25 ms on a
    /// loaded 2-core machine with 1M sessions), never for the batch.
    async fn write_uses(&self, uses: &[(String, i64)]) -> Result<u64, StoreError> {
        let mut moved = 0;
        for chunk in uses.chunks(USES_PER_TRANSACTION) {
            moved += self.send(Job::NoteUses(chunk.to_vec())).await?.count()?;
        }
        Ok(moved)
    }

    async fn reseal(&self, rows: &[Resealed]) -> Result<Vec<String>, StoreError> {
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
}

/// One process: its request budgets stay in its memory.
impl Budgets for SqliteStore {}
