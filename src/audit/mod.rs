//! The audit trail: an append-only, hash-chained table of control-plane
//! events (sessions created, connected, refreshed, revoked...; key
//! rotations; admin API calls; per-session request counts per hour).
//!
//! **Invariant (chain):** row `seq` carries `mac = HMAC(audit key,
//! canonical(row, prev_mac))`, where `prev_mac` is the `mac` of row `seq -
//! 1` (32 zero bytes for row 1), and `seq` has no gaps. The stores append
//! under a lock that serializes every writer of the table (SQLite: the
//! write transaction; PostgreSQL: `pg_advisory_xact_lock(AUDIT_LOCK)`), in
//! the same transaction as the change the row describes where there is
//! one. [`Verifier`] walks the chain and reports the first broken link.
//!
//! The audit key of a row is derived from the sealing key whose id the row
//! names (`key_id`, see [`crate::secrets::seal::AuditKey`]); retiring a sealing key
//! keeps its audit key in the ring, so old rows stay verifiable. A row's
//! `key_id` is no more trusted than its other fields: [`Verifier`] calls a row
//! that names a key the ring lacks broken when a ring key explains its mac,
//! or when the chain never introduced that key (a `key.rotated` row, or row
//! 1 for the first key); only the rest is unverifiable.
//!
//! No field ever holds a token, a session key, a secret or a key.

pub mod cli;

use std::sync::LazyLock;

use serde::Serialize;

use crate::secrets::seal::{AuditKey, KeyId, Sealer};

/// The `prev_mac` of the first row.
pub const ZERO_MAC: [u8; 32] = [0; 32];

/// Who did what a row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// The proxy's hot path (a due or refused token).
    Proxy,
    /// A `credproxy` command.
    Cli,
    /// The admin API.
    Admin,
    /// The dashboard.
    Ui,
    /// The refresh-ahead task.
    RefreshAhead,
    /// The idle-refresh task.
    IdleRefresh,
    /// An OAuth connect flow's callback.
    Connect,
    /// The server itself (request counts).
    Server,
}

impl Actor {
    pub fn as_str(self) -> &'static str {
        match self {
            Actor::Proxy => "proxy",
            Actor::Cli => "cli",
            Actor::Admin => "admin",
            Actor::Ui => "ui",
            Actor::RefreshAhead => "refresh-ahead",
            Actor::IdleRefresh => "idle-refresh",
            Actor::Connect => "connect",
            Actor::Server => "server",
        }
    }
}

/// The kinds of rows (`kind`).
pub mod kind {
    pub const SESSION_CREATED: &str = "session.created";
    pub const SESSION_CONNECTED: &str = "session.connected";
    pub const SESSION_RECONNECTED: &str = "session.reconnected";
    pub const SESSION_REFRESHED: &str = "session.refreshed";
    pub const SESSION_REVOKED: &str = "session.revoked";
    pub const SESSION_REAUTHORIZATION_REQUIRED: &str = "session.reauthorization_required";
    pub const SESSION_REQUESTS: &str = "session.requests";
    /// A key added to a session (`{"key_id", "label", "scoped"}`; never the key).
    pub const SESSION_KEY_ADDED: &str = "session.key_added";
    /// One of a session's keys revoked (`{"key_id"}`).
    pub const SESSION_KEY_REVOKED: &str = "session.key_revoked";
    pub const KEY_ROTATED: &str = "key.rotated";
    pub const KEY_REWRAPPED: &str = "key.rewrapped";
    pub const KEY_RETIRED: &str = "key.retired";
    pub const ADMIN_CALL: &str = "admin.call";
}

/// This process's name in the audit trail: `HOSTNAME:PID`.
pub fn instance() -> &'static str {
    static INSTANCE: LazyLock<String> = LazyLock::new(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .or_else(|_| std::fs::read_to_string("/etc/hostname"))
                    .ok()
                    .map(|h| h.trim().to_owned())
                    .filter(|h| !h.is_empty())
            })
            .unwrap_or_else(|| "localhost".to_owned());
        format!("{host}:{}", std::process::id())
    });
    INSTANCE.as_str()
}

/// The key that chains appended rows: the primary sealing key's id and its
/// audit key. `Debug` shows the id only.
#[derive(Clone)]
pub struct AuditSigner {
    key_id: String,
    key: AuditKey,
}

impl std::fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditSigner({}, [redacted])", self.key_id)
    }
}

impl AuditSigner {
    pub fn new(id: KeyId, key: AuditKey) -> AuditSigner {
        AuditSigner {
            key_id: id.to_string(),
            key,
        }
    }

    /// The primary key of `sealer`.
    pub fn of(sealer: &Sealer) -> AuditSigner {
        let (id, key) = sealer.audit_key();
        AuditSigner::new(id, key)
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }
}

/// What a row says, before it is chained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Unix milliseconds.
    pub at: i64,
    pub instance: String,
    pub kind: String,
    pub session_id: Option<String>,
    pub actor: String,
    /// JSON text; never a secret.
    pub detail: String,
}

impl AuditEntry {
    /// An entry of this process, now.
    pub fn new(
        kind: &str,
        session_id: Option<&str>,
        actor: Actor,
        detail: serde_json::Value,
    ) -> AuditEntry {
        AuditEntry {
            at: crate::clock::now_ms(),
            instance: instance().to_owned(),
            kind: kind.to_owned(),
            session_id: session_id.map(str::to_owned),
            actor: actor.as_str().to_owned(),
            detail: detail.to_string(),
        }
    }
}

/// An entry and the key that chains it: what a store appends.
#[derive(Debug, Clone)]
pub struct AuditAppend {
    pub entry: AuditEntry,
    pub signer: AuditSigner,
}

impl AuditAppend {
    pub fn new(entry: AuditEntry, signer: AuditSigner) -> AuditAppend {
        AuditAppend { entry, signer }
    }

    /// The row that follows `last` (`(seq, mac)` of the chain's last row,
    /// `None` for an empty table).
    pub fn chain(&self, last: Option<(i64, Vec<u8>)>) -> AuditRow {
        let (seq, prev_mac) = match last {
            Some((seq, mac)) => (seq + 1, mac),
            None => (1, ZERO_MAC.to_vec()),
        };
        let mut row = AuditRow {
            seq,
            at: self.entry.at,
            instance: self.entry.instance.clone(),
            kind: self.entry.kind.clone(),
            session_id: self.entry.session_id.clone(),
            actor: self.entry.actor.clone(),
            detail: self.entry.detail.clone(),
            key_id: self.signer.key_id.clone(),
            prev_mac,
            mac: Vec::new(),
        };
        row.mac = row.expected_mac(&self.signer.key).to_vec();
        row
    }
}

/// A row as the table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub seq: i64,
    /// Unix milliseconds.
    pub at: i64,
    pub instance: String,
    pub kind: String,
    pub session_id: Option<String>,
    pub actor: String,
    /// JSON text.
    pub detail: String,
    /// The sealing key id (8 hex digits) whose audit key chained the row.
    pub key_id: String,
    pub prev_mac: Vec<u8>,
    pub mac: Vec<u8>,
}

/// Version tag of [`AuditRow::canonical`].
const CANONICAL_V1: &[u8] = b"credproxy-audit-v1";

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_be_bytes());
    out.extend_from_slice(b);
}

impl AuditRow {
    /// The bytes the mac covers: a version tag, then every field but `mac`
    /// in a fixed order, integers as 8 bytes big-endian, strings and bytes
    /// as an 8-byte big-endian length and the bytes, the optional session
    /// id as a 0 byte (none) or a 1 byte and the string. No two different
    /// rows encode alike.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.detail.len());
        put_bytes(&mut out, CANONICAL_V1);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.at.to_be_bytes());
        put_bytes(&mut out, self.instance.as_bytes());
        put_bytes(&mut out, self.kind.as_bytes());
        match &self.session_id {
            None => out.push(0),
            Some(s) => {
                out.push(1);
                put_bytes(&mut out, s.as_bytes());
            }
        }
        put_bytes(&mut out, self.actor.as_bytes());
        put_bytes(&mut out, self.detail.as_bytes());
        put_bytes(&mut out, self.key_id.as_bytes());
        put_bytes(&mut out, &self.prev_mac);
        out
    }

    /// The mac this row should carry under `key`.
    pub fn expected_mac(&self, key: &AuditKey) -> [u8; 32] {
        key.mac(&[&self.canonical()])
    }

    /// The row as `audit --json` and `GET /admin/audit` show it.
    pub fn view(&self) -> AuditView {
        AuditView {
            seq: self.seq,
            at: rfc3339_ms(self.at),
            instance: self.instance.clone(),
            kind: self.kind.clone(),
            session_id: self.session_id.clone(),
            actor: self.actor.clone(),
            detail: serde_json::from_str(&self.detail)
                .unwrap_or_else(|_| serde_json::Value::String(self.detail.clone())),
            key_id: self.key_id.clone(),
            mac: hex(&self.mac),
        }
    }
}

/// A row as shown (JSON).
#[derive(Debug, Clone, Serialize)]
pub struct AuditView {
    pub seq: i64,
    /// RFC 3339.
    pub at: String,
    pub instance: String,
    pub kind: String,
    pub session_id: Option<String>,
    pub actor: String,
    pub detail: serde_json::Value,
    pub key_id: String,
    /// Hex.
    pub mac: String,
}

/// Which rows `audit` and `GET /admin/audit` list: the newest `limit`
/// matching rows, shown oldest first.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub session_id: Option<String>,
    /// Unix milliseconds: rows at or after.
    pub since_ms: Option<i64>,
    pub limit: u32,
}

/// The largest `limit` a listing takes.
pub const MAX_LIST: u32 = 10_000;

/// `--since`: an RFC 3339 time, or a duration (`2h`, `30m`, `1d`)
/// meaning that long before `now_ms`; unix milliseconds.
pub fn parse_since(text: &str, now_ms: i64) -> Result<i64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        return Ok(ms);
    }
    match humantime::parse_duration(text) {
        Ok(d) => Ok(now_ms.saturating_sub(d.as_millis().min(i64::MAX as u128) as i64)),
        Err(_) => Err(format!(
            "since: expected an RFC 3339 time (2026-12-25T10:00:00Z) or a duration (2h, 30m, 1d), not `{text}`"
        )),
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Unix milliseconds as RFC 3339 (UTC, milliseconds).
pub fn rfc3339_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// What a [`Verifier`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every row's mac and link hold; `rows` were checked.
    Ok { rows: u64 },
    /// The first broken link: row `seq` (or the row after `seq`, for a
    /// gap), and why.
    Broken { seq: i64, reason: String },
    /// The links hold, but `rows` rows were chained under keys the ring no
    /// longer holds (the first at `first_seq`, key `key_id`): their macs
    /// cannot be checked.
    Unverifiable {
        rows: u64,
        first_seq: i64,
        key_id: String,
        checked: u64,
    },
}

/// Checks the chain row by row in `seq` order, fed a page at a time by
/// whoever reads the store (`control::audit::verify`): each row's mac
/// recomputed with the audit key of the key it names, its `prev_mac`
/// against the previous row's mac, and `seq` without gaps (a deleted row is
/// a broken link).
///
/// A row that names a key the ring does not hold is not taken at its word,
/// since `key_id` is a field like any other that someone with access to the
/// database can change:
///
/// - if its mac matches under a key the ring does hold, once that key's id is
///   put back in the row, the row was chained under that key and its
///   `key_id` was changed: broken;
/// - otherwise the key must be one the chain itself introduces. Every key
///   that chained rows but the first was made primary by `key rotate`, which
///   records a `key.rotated` row naming it (`detail.key`); so at most one
///   key may have chained rows without such a row, and it is row 1's. A key
///   the ring does not hold and no `key.rotated` row names is broken at its
///   first row unless it is row 1's key and no other key lacks a
///   `key.rotated` row. Reported at the end (a broken link found during
///   the walk comes first).
///
/// Only rows under a key the chain knows of and the ring no longer holds are
/// [`Verdict::Unverifiable`].
pub struct Verifier<'s> {
    sealer: &'s Sealer,
    prev: Option<(i64, Vec<u8>)>,
    checked: u64,
    unverifiable: Option<(u64, i64, String)>,
    keys: std::collections::HashMap<String, Option<AuditKey>>,
    /// Every key rows name: the first row that names it, and whether the
    /// ring holds it.
    named: std::collections::BTreeMap<String, (i64, bool)>,
    /// The keys `key.rotated` rows name.
    rotated: std::collections::HashSet<String>,
    /// Row 1's key.
    first_key: Option<String>,
}

impl<'s> Verifier<'s> {
    pub fn new(sealer: &'s Sealer) -> Verifier<'s> {
        Verifier {
            sealer,
            prev: None,
            checked: 0,
            unverifiable: None,
            keys: Default::default(),
            named: Default::default(),
            rotated: Default::default(),
            first_key: None,
        }
    }

    /// The `seq` the next page starts after.
    pub fn after(&self) -> i64 {
        self.prev.as_ref().map_or(0, |(s, _)| *s)
    }

    /// Rows checked so far.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// Checks the next rows; the verdict if one of them breaks the chain.
    pub fn feed(&mut self, page: Vec<AuditRow>) -> Option<Verdict> {
        for row in page {
            let (want_seq, want_prev) = match &self.prev {
                Some((s, m)) => (s + 1, m.as_slice()),
                None => (1, &ZERO_MAC[..]),
            };
            if row.seq != want_seq {
                return Some(Verdict::Broken {
                    seq: row.seq,
                    reason: format!(
                        "row {want_seq} is missing (the chain goes from {} to {})",
                        want_seq - 1,
                        row.seq
                    ),
                });
            }
            if row.prev_mac != want_prev {
                return Some(Verdict::Broken {
                    seq: row.seq,
                    reason: "its prev_mac is not the previous row's mac".into(),
                });
            }
            if row.seq == 1 {
                self.first_key = Some(row.key_id.clone());
            }
            if let Some(key_id) = rotated_key(&row) {
                self.rotated.insert(key_id);
            }
            let sealer = self.sealer;
            let key = self.keys.entry(row.key_id.clone()).or_insert_with(|| {
                KeyId::parse(&row.key_id).and_then(|id| sealer.audit_key_for(id))
            });
            match key {
                Some(key) => {
                    self.named
                        .entry(row.key_id.clone())
                        .or_insert((row.seq, true));
                    if !mac_matches(&row, key) {
                        return Some(Verdict::Broken {
                            seq: row.seq,
                            reason: "its mac does not match its content (the row was changed)"
                                .into(),
                        });
                    }
                }
                None => {
                    if let Some(id) = chained_under(&row, sealer) {
                        return Some(Verdict::Broken {
                            seq: row.seq,
                            reason: format!(
                                "its key_id was changed: it names key {}, but it was chained \
                                 under key {id}, which the ring holds",
                                printable(&row.key_id)
                            ),
                        });
                    }
                    self.named
                        .entry(row.key_id.clone())
                        .or_insert((row.seq, false));
                    let u = self
                        .unverifiable
                        .get_or_insert((0, row.seq, row.key_id.clone()));
                    u.0 += 1;
                }
            }
            self.checked += 1;
            self.prev = Some((row.seq, row.mac));
        }
        None
    }

    /// The verdict once every row was fed.
    pub fn finish(self) -> Verdict {
        // Keys that chained rows without a `key.rotated` row: only the
        // first key may.
        let unrotated: Vec<(&String, i64, bool)> = self
            .named
            .iter()
            .filter(|(key_id, _)| !self.rotated.contains(*key_id))
            .map(|(key_id, (seq, held))| (key_id, *seq, *held))
            .collect();
        let held_unrotated = unrotated.iter().find(|(_, _, held)| *held);
        let first_key = self.first_key.as_ref();
        let stray = unrotated
            .iter()
            .filter(|(key_id, _, held)| {
                !held && (first_key != Some(*key_id) || held_unrotated.is_some())
            })
            .min_by_key(|(_, seq, _)| *seq);
        if let Some((key_id, seq, _)) = stray {
            let why = match held_unrotated {
                Some((first, _, _)) if first_key == Some(*key_id) => format!(
                    "key {first}, which the ring holds, chained rows without a key.rotated row, \
                     so it is the first key"
                ),
                _ => "it is not the first key".to_owned(),
            };
            return Verdict::Broken {
                seq: *seq,
                reason: format!(
                    "its key_id was changed (and maybe more): it names key {}, which the ring does \
                     not hold and no key.rotated row introduced, and {why}",
                    printable(key_id)
                ),
            };
        }
        match self.unverifiable {
            None => Verdict::Ok { rows: self.checked },
            Some((rows, first_seq, key_id)) => Verdict::Unverifiable {
                rows,
                first_seq,
                key_id,
                checked: self.checked,
            },
        }
    }
}

/// Whether `row`'s mac is the one `key` gives its content (constant time).
fn mac_matches(row: &AuditRow, key: &AuditKey) -> bool {
    let want = row.expected_mac(key);
    bool::from(subtle::ConstantTimeEq::ct_eq(&want[..], &row.mac[..]))
}

/// The ring key that chained `row` if the row named it, when the row names
/// another one: a changed `key_id`.
fn chained_under(row: &AuditRow, sealer: &Sealer) -> Option<KeyId> {
    let mut as_written = row.clone();
    sealer.audit_keys().iter().find_map(|(id, key)| {
        as_written.key_id = id.to_string();
        mac_matches(&as_written, key).then_some(*id)
    })
}

/// The key a `key.rotated` row made primary (`detail.key`).
fn rotated_key(row: &AuditRow) -> Option<String> {
    if row.kind != kind::KEY_ROTATED {
        return None;
    }
    let detail: serde_json::Value = serde_json::from_str(&row.detail).ok()?;
    detail.get("key")?.as_str().map(str::to_owned)
}

/// A `key_id` as read from the table, for a message: an edited one may hold
/// anything, so at most 16 characters, control characters escaped.
fn printable(key_id: &str) -> String {
    let mut shown: String = key_id
        .chars()
        .take(16)
        .flat_map(char::escape_debug)
        .collect();
    if key_id.chars().count() > 16 {
        shown.push_str("...");
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(detail: &str) -> AuditEntry {
        AuditEntry {
            at: 1_700_000_000_123,
            instance: "host:1".into(),
            kind: kind::SESSION_CREATED.into(),
            session_id: Some("s_1".into()),
            actor: "cli".into(),
            detail: detail.into(),
        }
    }

    fn signer() -> AuditSigner {
        AuditSigner::of(&Sealer::from_key(&[7; 32]))
    }

    #[test]
    fn the_first_row_links_to_zero_and_the_next_to_it() {
        let a = AuditAppend::new(entry("{}"), signer());
        let first = a.chain(None);
        assert_eq!(first.seq, 1);
        assert_eq!(first.prev_mac, ZERO_MAC.to_vec());
        assert_eq!(first.mac.len(), 32);
        let second = a.chain(Some((first.seq, first.mac.clone())));
        assert_eq!(second.seq, 2);
        assert_eq!(second.prev_mac, first.mac);
        assert_ne!(second.mac, first.mac);
    }

    #[test]
    fn every_field_is_covered_by_the_mac() {
        let s = signer();
        let row = AuditAppend::new(entry("{\"a\":1}"), s.clone()).chain(None);
        let key = Sealer::from_key(&[7; 32]).audit_key().1;
        assert_eq!(row.expected_mac(&key).to_vec(), row.mac);
        type Change = Box<dyn Fn(&mut AuditRow)>;
        let changes: Vec<Change> = vec![
            Box::new(|r| r.seq += 1),
            Box::new(|r| r.at += 1),
            Box::new(|r| r.instance.push('x')),
            Box::new(|r| r.kind.push('x')),
            Box::new(|r| r.session_id = None),
            Box::new(|r| r.actor.push('x')),
            Box::new(|r| r.detail = "{\"a\":2}".into()),
            Box::new(|r| r.key_id = "00000000".into()),
            Box::new(|r| r.prev_mac[0] ^= 1),
        ];
        for change in changes {
            let mut r = row.clone();
            change(&mut r);
            assert_ne!(r.expected_mac(&key).to_vec(), row.mac);
        }
        // Another key gives another mac.
        let other = Sealer::from_key(&[8; 32]).audit_key().1;
        assert_ne!(row.expected_mac(&other).to_vec(), row.mac);
    }

    #[test]
    fn the_encoding_is_unambiguous() {
        // Moving a byte from one field to the next changes the encoding.
        let mut a = AuditAppend::new(entry("{}"), signer()).chain(None);
        let mut b = a.clone();
        a.instance = "ab".into();
        a.kind = "c".into();
        b.instance = "a".into();
        b.kind = "bc".into();
        assert_ne!(a.canonical(), b.canonical());
        // No session and an empty session id differ.
        let mut c = a.clone();
        let mut d = a.clone();
        c.session_id = None;
        d.session_id = Some(String::new());
        assert_ne!(c.canonical(), d.canonical());
        // A fixed vector, so the encoding cannot change unnoticed.
        let row = AuditRow {
            seq: 1,
            at: 2,
            instance: "i".into(),
            kind: "k".into(),
            session_id: None,
            actor: "a".into(),
            detail: "{}".into(),
            key_id: "0011aabb".into(),
            prev_mac: vec![0; 32],
            mac: vec![],
        };
        let enc = row.canonical();
        assert_eq!(&enc[..8], &18u64.to_be_bytes());
        assert_eq!(&enc[8..26], b"credproxy-audit-v1");
        assert_eq!(&enc[26..34], &1i64.to_be_bytes());
        assert_eq!(&enc[34..42], &2i64.to_be_bytes());
        assert_eq!(
            enc.len(),
            8 + 18 + 16 + (8 + 1) + (8 + 1) + 1 + (8 + 1) + (8 + 2) + (8 + 8) + (8 + 32)
        );
    }

    #[test]
    fn the_signer_shows_no_key() {
        let s = format!("{:?}", signer());
        assert!(s.contains("redacted"), "{s}");
        assert_eq!(signer().key_id().len(), 8);
    }

    #[test]
    fn since_takes_a_time_or_a_duration() {
        let now = 1_700_000_000_000;
        assert_eq!(parse_since("2h", now), Ok(now - 7_200_000));
        assert_eq!(
            parse_since("2023-11-14T22:13:20Z", now),
            Ok(1_700_000_000_000)
        );
        assert!(parse_since("yesterday", now).is_err());
    }

    #[test]
    fn times_are_shown_in_rfc3339() {
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(hex(&[0, 0xab]), "00ab");
    }
}
