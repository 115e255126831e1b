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
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Notify};

use super::{
    Lease, NewSession, OAuthOutcome, OAuthState, SealedTokens, SessionCount, SessionRecord, Store,
    StoreError,
};
use crate::session::{KeyHash, Status};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

const COLUMNS: &str = "id, key_hash, provider, label, status, access_token, refresh_token, expires_at, version, created_at, updated_at, last_refresh_at";

pub struct SqliteStore {
    /// Reads, and the writes of the control plane.
    pool: SqlitePool,
    /// Rotated tokens and reauthorization marks, applied by the
    /// [`commit_writer`] with group commit (`synchronous=FULL`).
    commits: mpsc::UnboundedSender<WriteJob>,
    /// Refresh leases, applied by the [`lease_writer`] on its own
    /// connection with `synchronous=NORMAL`: a lease needs no fsync (one lost
    /// in a power cut is simply free again), and on their own connection
    /// lease writes never hold up a commit's fsync behind them.
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
        let writer = match op {
            WriteOp::AcquireLease { .. } | WriteOp::ReleaseLease { .. } => &self.leases,
            WriteOp::CommitRefresh { .. } | WriteOp::MarkReauthorization { .. } => {
                self.gate.commit_sent();
                &self.commits
            }
        };
        let is_commit = matches!(
            op,
            WriteOp::CommitRefresh { .. } | WriteOp::MarkReauthorization { .. }
        );
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
    CommitRefresh {
        id: String,
        owner: String,
        tokens: SealedTokens,
        expected_version: i64,
        now: i64,
    },
    MarkReauthorization {
        id: String,
        expected_version: i64,
        now: i64,
    },
}

enum Written {
    Lease(Lease),
    Row(Option<SessionRecord>),
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
    let mut tx = writer.begin().await?;
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
        } => {
            let sql = format!(
                "UPDATE sessions SET access_token = ?, refresh_token = ?, expires_at = ?, status = 'active',
                     version = version + 1, updated_at = ?, last_refresh_at = ?,
                     refresh_lease_owner = NULL, refresh_lease_until = NULL
                 WHERE id = ? AND version = ? AND refresh_lease_owner = ?
                 RETURNING {COLUMNS}"
            );
            let row = sqlx::query(&sql)
                .bind(&tokens.access_token)
                .bind(&tokens.refresh_token)
                .bind(tokens.expires_at)
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
            }
            Written::Row(rec)
        }
        WriteOp::MarkReauthorization {
            id,
            expected_version,
            now,
        } => {
            let sql = format!(
                "UPDATE sessions SET status = 'reauthorization_required', version = version + 1, updated_at = ?,
                     refresh_lease_owner = NULL, refresh_lease_until = NULL
                 WHERE id = ? AND version = ?
                 RETURNING {COLUMNS}"
            );
            let row = sqlx::query(&sql)
                .bind(now)
                .bind(id)
                .bind(expected_version)
                .fetch_optional(&mut *tx)
                .await?;
            let rec = row.as_ref().map(record).transpose()?;
            if rec.is_some() {
                log_change(tx, id, *now).await?;
            }
            Written::Row(rec)
        }
    })
}

fn oauth_state(row: &SqliteRow) -> Result<OAuthState, StoreError> {
    let key_hash: Option<Vec<u8>> = row.try_get("key_hash")?;
    let key_hash = key_hash
        .map(|h| {
            h.try_into()
                .map(KeyHash)
                .map_err(|_| StoreError::Corrupt("oauth state".into()))
        })
        .transpose()?;
    Ok(OAuthState {
        provider: row.try_get("provider")?,
        session_id: row.try_get("session_id")?,
        key_hash,
        created_at: row.try_get("created_at")?,
    })
}

fn record(row: &SqliteRow) -> Result<SessionRecord, StoreError> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let status = Status::parse(&status).ok_or_else(|| StoreError::Corrupt(id.clone()))?;
    let hash: Vec<u8> = row.try_get("key_hash")?;
    let key_hash = KeyHash(
        hash.try_into()
            .map_err(|_| StoreError::Corrupt(id.clone()))?,
    );
    Ok(SessionRecord {
        key_hash,
        provider: row.try_get("provider")?,
        label: row.try_get("label")?,
        status,
        access_token: row.try_get("access_token")?,
        refresh_token: row.try_get("refresh_token")?,
        expires_at: row.try_get("expires_at")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        last_refresh_at: row.try_get("last_refresh_at")?,
        id,
    })
}

async fn log_change(tx: &mut sqlx::SqliteConnection, id: &str, now: i64) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO session_changes (session_id, at) VALUES (?, ?)")
        .bind(id)
        .bind(now)
        .execute(tx)
        .await?;
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

    async fn insert_session(&self, new: NewSession) -> Result<SessionRecord, StoreError> {
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
        log_change(&mut tx, &new.id, new.now).await?;
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
        })
    }

    async fn session_by_key(&self, hash: &KeyHash) -> Result<Option<SessionRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM sessions WHERE key_hash = ?"
        ))
        .bind(&hash.0[..])
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record).transpose()
    }

    async fn session_by_id(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM sessions WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(record).transpose()
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
        let rows = sqlx::query(
            "SELECT provider, status, COUNT(*) AS n FROM sessions GROUP BY provider, status ORDER BY provider, status",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let status: String = r.try_get("status")?;
                Ok(SessionCount {
                    provider: r.try_get("provider")?,
                    status: Status::parse(&status)
                        .ok_or_else(|| StoreError::Corrupt(status.clone()))?,
                    count: r.try_get("n")?,
                })
            })
            .collect()
    }

    async fn replace_tokens(
        &self,
        id: &str,
        tokens: SealedTokens,
        expected_version: Option<i64>,
        now: i64,
    ) -> Result<Option<SessionRecord>, StoreError> {
        self.writable()?;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE sessions SET access_token = ?, refresh_token = ?, expires_at = ?, status = 'active',
                 version = version + 1, updated_at = ?
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

    async fn release_refresh_lease(&self, id: &str, owner: &str) -> Result<(), StoreError> {
        let op = WriteOp::ReleaseLease {
            id: id.to_owned(),
            owner: owner.to_owned(),
        };
        self.write(op).await.map(|_| ())
    }

    async fn commit_refresh(
        &self,
        id: &str,
        owner: &str,
        tokens: SealedTokens,
        expected_version: i64,
        now: i64,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let op = WriteOp::CommitRefresh {
            id: id.to_owned(),
            owner: owner.to_owned(),
            tokens,
            expected_version,
            now,
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
    ) -> Result<bool, StoreError> {
        let op = WriteOp::MarkReauthorization {
            id: id.to_owned(),
            expected_version,
            now,
        };
        match self.write(op).await? {
            Written::Row(rec) => Ok(rec.is_some()),
            _ => Err(StoreError::Closed),
        }
    }

    async fn insert_oauth_state(
        &self,
        state_hash: &[u8; 32],
        state: &OAuthState,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO oauth_states (state_hash, provider, session_id, key_hash, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&state_hash[..])
        .bind(&state.provider)
        .bind(&state.session_id)
        .bind(state.key_hash.as_ref().map(|h| h.0.to_vec()))
        .bind(state.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn peek_oauth_state(
        &self,
        state_hash: &[u8; 32],
        not_before: i64,
    ) -> Result<Option<OAuthState>, StoreError> {
        let row = sqlx::query(
            "SELECT provider, session_id, key_hash, created_at FROM oauth_states
             WHERE state_hash = ? AND used_at IS NULL AND created_at >= ?",
        )
        .bind(&state_hash[..])
        .bind(not_before)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(oauth_state).transpose()
    }

    async fn insert_browser_oauth_state(
        &self,
        state_hash: &[u8; 32],
        state: &OAuthState,
        browser_hash: &[u8; 32],
        not_before: i64,
        max_pending: u64,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO oauth_states (state_hash, provider, session_id, key_hash, created_at, browser_hash)
             SELECT ?, ?, ?, ?, ?, ?
             WHERE (SELECT COUNT(*) FROM oauth_states WHERE used_at IS NULL AND created_at >= ?) < ?",
        )
        .bind(&state_hash[..])
        .bind(&state.provider)
        .bind(&state.session_id)
        .bind(state.key_hash.as_ref().map(|h| h.0.to_vec()))
        .bind(state.created_at)
        .bind(&browser_hash[..])
        .bind(not_before)
        .bind(i64::try_from(max_pending).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted > 0)
    }

    async fn count_pending_oauth_states(&self, not_before: i64) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM oauth_states WHERE used_at IS NULL AND created_at >= ?",
        )
        .bind(not_before)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn take_oauth_state_from_browser(
        &self,
        state_hash: &[u8; 32],
        provider: &str,
        browser_hash: Option<&[u8; 32]>,
        now: i64,
        not_before: i64,
    ) -> Result<Option<OAuthState>, StoreError> {
        // With no browser, `browser_hash = NULL` is never true: only an
        // unbound state is taken.
        let row = sqlx::query(
            "UPDATE oauth_states SET used_at = ?
             WHERE state_hash = ? AND provider = ? AND used_at IS NULL AND created_at >= ?
               AND (browser_hash IS NULL OR browser_hash = ?)
             RETURNING provider, session_id, key_hash, created_at",
        )
        .bind(now)
        .bind(&state_hash[..])
        .bind(provider)
        .bind(not_before)
        .bind(browser_hash.map(|h| h.to_vec()))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(oauth_state).transpose()
    }

    async fn finish_oauth_state(
        &self,
        state_hash: &[u8; 32],
        outcome: &OAuthOutcome,
    ) -> Result<(), StoreError> {
        let (session, failure) = outcome.columns();
        sqlx::query(
            "UPDATE oauth_states SET result_session_id = ?, failure = ? WHERE state_hash = ?",
        )
        .bind(session)
        .bind(failure)
        .bind(&state_hash[..])
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn oauth_outcome(&self, state_hash: &[u8; 32]) -> Result<OAuthOutcome, StoreError> {
        let row =
            sqlx::query("SELECT result_session_id, failure FROM oauth_states WHERE state_hash = ?")
                .bind(&state_hash[..])
                .fetch_optional(&self.pool)
                .await?;
        let Some(row) = row else {
            return Ok(OAuthOutcome::Unknown);
        };
        Ok(OAuthOutcome::from_columns(
            row.try_get("result_session_id")?,
            row.try_get("failure")?,
        ))
    }

    async fn prune_oauth_states(&self, before: i64) -> Result<u64, StoreError> {
        let forgotten = sqlx::query(
            "DELETE FROM oauth_states WHERE created_at < ? AND (used_at IS NULL OR used_at < ?)",
        )
        .bind(before)
        .bind(before)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(forgotten)
    }

    async fn delete_session(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        self.writable()?;
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query("DELETE FROM sessions WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            log_change(&mut tx, id, now).await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }

    async fn change_cursor(&self) -> Result<i64, StoreError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM session_changes")
            .fetch_one(&self.pool)
            .await?;
        Ok(seq.unwrap_or(0))
    }

    async fn changes_since(&self, cursor: i64) -> Result<(i64, Vec<String>), StoreError> {
        let rows = sqlx::query(
            "SELECT seq, session_id FROM session_changes WHERE seq > ? ORDER BY seq LIMIT 10000",
        )
        .bind(cursor)
        .fetch_all(&self.pool)
        .await?;
        let mut next = cursor;
        let mut ids = Vec::with_capacity(rows.len());
        for r in &rows {
            next = next.max(r.try_get::<i64, _>("seq")?);
            ids.push(r.try_get("session_id")?);
        }
        Ok((next, ids))
    }

    async fn prune_changes(&self, before: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM session_changes WHERE at < ? AND seq < (SELECT MAX(seq) FROM session_changes)")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
