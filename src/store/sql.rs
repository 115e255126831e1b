//! What both stores share: how rows are read, and the statements they run
//! alike, written once with `?` placeholders ([`numbered`] turns them into
//! PostgreSQL's `$1, $2, ...`). What differs stays in each store: SQLite's
//! single writer and `MAX`, PostgreSQL's row locks, `GREATEST`, `UNNEST`,
//! `SKIP LOCKED` and its own clock.

use super::{EventRow, IdleSession, NewEvent, SessionRecord, StoreError};
use crate::audit::AuditRow;
use crate::secrets::session::{KeyHash, Status};

/// The columns [`record`] reads, in the order both stores select them.
pub(crate) const SESSION_COLUMNS: &str = "id, key_hash, provider, label, status, access_token, refresh_token, expires_at, version, created_at, updated_at, last_refresh_at, last_error, next_retry_at, last_used_at";

/// A session row from either store's `SELECT {SESSION_COLUMNS}`.
pub(crate) fn record<R>(row: &R) -> Result<SessionRecord, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
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
        last_error: row.try_get("last_error")?,
        next_retry_at: row.try_get("next_retry_at")?,
        last_used_at: row.try_get("last_used_at")?,
        id,
    })
}

/// A row of either store's count of sealed values by key: `k` (8 hex
/// digits, or empty for a value from before key ids) and `n`.
pub(crate) fn sealed_count<R>(row: &R) -> Result<super::SealedCount, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let k: String = row.try_get("k")?;
    Ok(super::SealedCount {
        key_id: (!k.is_empty()).then_some(k),
        count: row.try_get("n")?,
    })
}

/// The sessions `key rewrap` has left: a sealed value whose first 5 bytes
/// (version and key id) are not the primary's. Binds: after, header,
/// header, limit.
pub(crate) const SEALED_NOT_UNDER: &str = "SELECT id, access_token, refresh_token FROM sessions \
     WHERE id > ? AND (substr(access_token, 1, 5) <> ? \
       OR (refresh_token IS NOT NULL AND substr(refresh_token, 1, 5) <> ?)) \
     ORDER BY id LIMIT ?";

/// A row of [`SEALED_NOT_UNDER`].
pub(crate) fn sealed_row<R>(row: &R) -> Result<super::SealedRow, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(super::SealedRow {
        id: row.try_get("id")?,
        access_token: row.try_get("access_token")?,
        refresh_token: row.try_get("refresh_token")?,
    })
}

/// The columns [`event_row`] reads.
pub(crate) const EVENT_COLUMNS: &str = "id, kind, session_id, provider, at, detail, attempts, next_attempt_at_ms, last_error, delivered_at, gave_up_at";

/// Appends an event (`?` placeholders; [`numbered`] for PostgreSQL). The
/// first attempt is due at once.
pub(crate) const INSERT_EVENT: &str = "INSERT INTO events (id, kind, session_id, provider, at, detail, next_attempt_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)";

/// Binds an event to [`INSERT_EVENT`].
pub(crate) fn bind_event<'q, DB: sqlx::Database>(
    q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    e: &'q NewEvent,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    q.bind(e.id.as_str())
        .bind(e.kind.as_str())
        .bind(e.session_id.as_str())
        .bind(e.provider.as_str())
        .bind(e.at)
        .bind(e.detail.to_string())
        .bind(e.at.saturating_mul(1000))
}

/// An event row from either store's `SELECT {EVENT_COLUMNS}`.
pub(crate) fn event_row<R>(row: &R) -> Result<EventRow, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(EventRow {
        id: row.try_get("id")?,
        kind: row.try_get("kind")?,
        session_id: row.try_get("session_id")?,
        provider: row.try_get("provider")?,
        at: row.try_get("at")?,
        detail: row.try_get("detail")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at_ms: row.try_get("next_attempt_at_ms")?,
        last_error: row.try_get("last_error")?,
        delivered_at: row.try_get("delivered_at")?,
        gave_up_at: row.try_get("gave_up_at")?,
    })
}

/// Claimed event rows (with their `seq`), oldest first (by `at`, then
/// `seq`): `RETURNING` keeps no order.
pub(crate) fn oldest_first<R>(rows: &[R]) -> Result<Vec<EventRow>, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut events = rows
        .iter()
        .map(|r| Ok((r.try_get::<i64, _>("seq")?, event_row(r)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    events.sort_by_key(|(seq, e)| (e.at, *seq));
    Ok(events.into_iter().map(|(_, e)| e).collect())
}

/// An idle-refresh candidate from either store's `idle_sessions_sql()`.
pub(crate) fn idle_session<R>(row: &R) -> Result<IdleSession, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(IdleSession {
        id: row.try_get("id")?,
        version: row.try_get("version")?,
        idle_since: row.try_get("idle_since")?,
    })
}

/// `sql` with its `?` placeholders numbered `$1, $2, ...`, for PostgreSQL:
/// a statement both stores run is written once. (No `?` may appear in a
/// literal.)
pub(crate) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// The session's status, read before a change in the same transaction
/// (PostgreSQL appends `FOR UPDATE`): what decides whether the change is a
/// transition worth an event.
pub(crate) const PRIOR_STATUS: &str = "SELECT status FROM sessions WHERE id = ?";

/// Stores refreshed tokens and releases the lease, under the compare-and-
/// swap on version and lease owner; the first bound flag (three times)
/// says whether the session becomes `active` with its error cleared
/// ([`super::Health::Healthy`]).
pub(crate) fn commit_refresh_sql() -> String {
    format!(
        "UPDATE sessions SET access_token = ?, refresh_token = ?, expires_at = ?,
             status = CASE WHEN ? THEN 'active' ELSE status END,
             last_error = CASE WHEN ? THEN NULL ELSE last_error END,
             next_retry_at = CASE WHEN ? THEN NULL ELSE next_retry_at END,
             version = version + 1, updated_at = ?, last_refresh_at = ?,
             refresh_lease_owner = NULL, refresh_lease_until = NULL
         WHERE id = ? AND version = ? AND refresh_lease_owner = ?
         RETURNING {SESSION_COLUMNS}"
    )
}

/// Records a transient failure: `last_error`, `next_retry_at` and the
/// status `refresh_failing`. Never touches a session that needs
/// reauthorization, and never bumps the version (the tokens did not
/// change, and the refresh's back-off is kept per version).
pub(crate) const MARK_REFRESH_FAILING: &str =
    "UPDATE sessions SET status = 'refresh_failing', last_error = ?, next_retry_at = ?, updated_at = ?
     WHERE id = ? AND version = ? AND status <> 'reauthorization_required'";

/// Gives the refresh lease back, if the owner holds it.
pub(crate) const RELEASE_LEASE: &str =
    "UPDATE sessions SET refresh_lease_owner = NULL, refresh_lease_until = NULL
     WHERE id = ? AND refresh_lease_owner = ?";

/// Who holds refresh leases (SQLite: the partial index `sessions_leased`).
pub(crate) const LEASE_OWNERS: &str =
    "SELECT DISTINCT refresh_lease_owner FROM sessions WHERE refresh_lease_owner IS NOT NULL";

/// Gives back every refresh lease an owner (a process leaving) still holds.
pub(crate) const RELEASE_LEASES_OF: &str =
    "UPDATE sessions SET refresh_lease_owner = NULL, refresh_lease_until = NULL
     WHERE refresh_lease_owner = ?";

pub(crate) const MARK_REAUTHORIZATION: &str =
    "UPDATE sessions SET status = 'reauthorization_required', last_error = ?, next_retry_at = NULL,
         version = version + 1, updated_at = ?,
         refresh_lease_owner = NULL, refresh_lease_until = NULL
     WHERE id = ? AND version = ?";

/// Whether a change from `prior` to `status` is a transition of the
/// session's health that an event reports.
pub(crate) fn transition(prior: Option<&str>, to: Status) -> bool {
    match prior.and_then(Status::parse) {
        Some(from) => from != to,
        None => false,
    }
}

pub(crate) const EVENT_DELIVERED: &str =
    "UPDATE events SET delivered_at = ?, lease_owner = NULL, lease_until_ms = NULL
     WHERE id = ? AND lease_owner = ?";

pub(crate) const EVENT_RETRY: &str =
    "UPDATE events SET attempts = attempts + 1, last_error = ?, next_attempt_at_ms = ?,
         lease_owner = NULL, lease_until_ms = NULL
     WHERE id = ? AND lease_owner = ?";

pub(crate) const EVENT_GAVE_UP: &str =
    "UPDATE events SET gave_up_at = ?, last_error = ?, lease_owner = NULL, lease_until_ms = NULL
     WHERE id = ? AND lease_owner = ?";

pub(crate) fn list_events_sql() -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE delivered_at IS NULL ORDER BY at, seq LIMIT ?"
    )
}

/// Delivered events delivered before the first `?`, given-up events given
/// up before the second.
pub(crate) const PRUNE_EVENTS: &str =
    "DELETE FROM events WHERE (delivered_at IS NOT NULL AND delivered_at < ?)
         OR (gave_up_at IS NOT NULL AND gave_up_at < ?)";

pub(crate) fn list_given_up_events_sql() -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE gave_up_at IS NOT NULL ORDER BY at, seq LIMIT ?"
    )
}

/// At most this many ids in one statement of [`retry_given_up_sql`] or
/// [`clear_given_up_sql`] (SQLite allows 32,766 variables).
pub(crate) const IDS_PER_STATEMENT: usize = 500;

/// The statements an id list takes: one over every given-up event for
/// `None`, none for no ids, else one per [`IDS_PER_STATEMENT`] ids.
pub(crate) fn id_chunks(ids: Option<&[String]>) -> Vec<Option<&[String]>> {
    match ids {
        None => vec![None],
        Some(ids) => ids.chunks(IDS_PER_STATEMENT).map(Some).collect(),
    }
}

/// `AND id IN (?, ...)` for `ids` ids, or nothing (every given-up event).
fn given_up_ids(ids: Option<usize>) -> String {
    match ids {
        None => String::new(),
        Some(n) => format!(" AND id IN ({})", vec!["?"; n.max(1)].join(", ")),
    }
}

/// Puts given-up events back for delivery, due at the first `?`
/// (milliseconds), then the ids if any.
pub(crate) fn retry_given_up_sql(ids: Option<usize>) -> String {
    format!(
        "UPDATE events SET gave_up_at = NULL, next_attempt_at_ms = ?,
             lease_owner = NULL, lease_until_ms = NULL
         WHERE gave_up_at IS NOT NULL AND delivered_at IS NULL{}",
        given_up_ids(ids)
    )
}

/// Deletes given-up events (the ids if any).
pub(crate) fn clear_given_up_sql(ids: Option<usize>) -> String {
    format!(
        "DELETE FROM events WHERE gave_up_at IS NOT NULL{}",
        given_up_ids(ids)
    )
}

/// How many sessions one `note_uses` transaction writes at most on
/// PostgreSQL (one `UPDATE ... FROM UNNEST` each).
pub(crate) const USES_PER_TRANSACTION: usize = 1000;

/// A statement made once (a `&'static str`, or a `String` built at first
/// use), for the statement cache.
macro_rules! once {
    ($text:expr) => {{
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| String::from($text));
        SQL.as_str()
    }};
}
pub(crate) use once;

/// `numbered` once per statement, for PostgreSQL's statement cache.
macro_rules! pg_sql {
    ($text:expr) => {
        $crate::store::sql::once!($crate::store::sql::numbered(&$text))
    };
}
pub(crate) use pg_sql;

/// The columns [`audit_row`] reads.
pub(crate) const AUDIT_COLUMNS: &str =
    "seq, at, instance, kind, session_id, actor, detail, key_id, prev_mac, mac";

/// The chain's last row (`seq`, `mac`), read under the append lock.
pub(crate) const LAST_AUDIT: &str = "SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1";

/// Appends a chained row ([`bind_audit`]).
pub(crate) const INSERT_AUDIT: &str = "INSERT INTO audit (seq, at, instance, kind, session_id, actor, detail, key_id, prev_mac, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

/// The PostgreSQL advisory lock that serializes appends to the audit chain
/// across instances (`pg_advisory_xact_lock`): an arbitrary constant, apart
/// from the request budgets' name space (which hashes text).
pub(crate) const AUDIT_LOCK: i64 = 0x6372_6564_6175_6474; // "credaudt"

/// Binds a chained row to [`INSERT_AUDIT`].
pub(crate) fn bind_audit<'q, DB: sqlx::Database>(
    q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    r: &'q AuditRow,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    q.bind(r.seq)
        .bind(r.at)
        .bind(r.instance.as_str())
        .bind(r.kind.as_str())
        .bind(r.session_id.as_deref())
        .bind(r.actor.as_str())
        .bind(r.detail.as_str())
        .bind(r.key_id.as_str())
        .bind(r.prev_mac.as_slice())
        .bind(r.mac.as_slice())
}

/// `(seq, mac)` from [`LAST_AUDIT`].
pub(crate) fn last_audit<R>(row: &R) -> Result<(i64, Vec<u8>), StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok((row.try_get("seq")?, row.try_get("mac")?))
}

/// An audit row from either store's `SELECT {AUDIT_COLUMNS}`.
pub(crate) fn audit_row<R>(row: &R) -> Result<AuditRow, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(AuditRow {
        seq: row.try_get("seq")?,
        at: row.try_get("at")?,
        instance: row.try_get("instance")?,
        kind: row.try_get("kind")?,
        session_id: row.try_get("session_id")?,
        actor: row.try_get("actor")?,
        detail: row.try_get("detail")?,
        key_id: row.try_get("key_id")?,
        prev_mac: row.try_get("prev_mac")?,
        mac: row.try_get("mac")?,
    })
}

/// The newest rows matching a filter (session, since), newest first:
/// bind the session twice, the time twice, then the limit.
pub(crate) fn list_audit_sql() -> String {
    format!(
        "SELECT {AUDIT_COLUMNS} FROM audit
         WHERE (CAST(? AS TEXT) IS NULL OR session_id = ?) AND (CAST(? AS BIGINT) IS NULL OR at >= ?)
         ORDER BY seq DESC LIMIT ?"
    )
}

/// A page of the chain in order: rows after a `seq`, at most a limit.
pub(crate) fn audit_page_sql() -> String {
    format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?")
}

/// Rows chained under each key id.
pub(crate) const COUNT_AUDIT_BY_KEY: &str =
    "SELECT key_id, COUNT(*) AS n FROM audit GROUP BY key_id ORDER BY key_id";

/// The columns of a new session row, as both inserts write them.
const NEW_SESSION_COLUMNS: &str = "id, provider, label, key_hash, access_token, refresh_token, expires_at, status, version, created_at, updated_at";

/// Inserts `rows` new sessions in one statement ([`bind_new_session`]
/// each, in order).
pub(crate) fn insert_sessions_sql(rows: usize) -> String {
    let one = "(?, ?, ?, ?, ?, ?, ?, 'active', 1, ?, ?)";
    format!(
        "INSERT INTO sessions ({NEW_SESSION_COLUMNS}) VALUES {}",
        vec![one; rows].join(", ")
    )
}

/// Binds a new session to a row of [`insert_sessions_sql`].
pub(crate) fn bind_new_session<'q, DB: sqlx::Database>(
    q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    s: &'q super::NewSession,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<&'q [u8]>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    q.bind(s.id.as_str())
        .bind(s.provider.as_str())
        .bind(s.label.as_deref())
        .bind(&s.key_hash.0[..])
        .bind(s.tokens.access_token.as_slice())
        .bind(s.tokens.refresh_token.as_deref())
        .bind(s.tokens.expires_at)
        .bind(s.now)
        .bind(s.now)
}

/// Change-log entries of `rows` inserted sessions, with their key hashes:
/// binds `session_id, key_hash` per row; `at` is the time expression
/// (each store's clock, no bind).
pub(crate) fn insert_added_changes_sql(rows: usize, at: &str) -> String {
    let one = format!("(?, {at}, ?)");
    format!(
        "INSERT INTO session_changes (session_id, at, key_hash) VALUES {}",
        vec![one.as_str(); rows].join(", ")
    )
}

/// The change log after a cursor, as both stores read it (PostgreSQL adds
/// its look-back); `key_hash` is set for inserted sessions.
pub(crate) fn changes<R>(rows: &[R], cursor: i64) -> Result<super::Changes, StoreError>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut out = super::Changes {
        cursor,
        ..Default::default()
    };
    for r in rows {
        out.cursor = out.cursor.max(r.try_get::<i64, _>("seq")?);
        out.ids.push(r.try_get("session_id")?);
        let hash: Option<Vec<u8>> = r.try_get("key_hash")?;
        // A hash of another length is no key: nothing to forget.
        if let Some(h) = hash.and_then(|h| <[u8; 32]>::try_from(h).ok()) {
            out.added_keys.push(KeyHash(h));
        }
    }
    out.more = rows.len() >= super::CHANGES_PAGE;
    Ok(out)
}

/// Rows a bulk insert writes per statement at most (9 binds each, below
/// SQLite's 32,766 and PostgreSQL's 65,535 parameters).
pub(crate) const BULK_ROWS: usize = 2000;
