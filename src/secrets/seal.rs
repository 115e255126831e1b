//! Sealing tokens at rest with an AEAD (XChaCha20-Poly1305).
//!
//! A sealed value is `2 || 4-byte key id || 24-byte random nonce ||
//! ciphertext+tag`. The 5-byte header (version and key id) is part of the
//! associated data, so a value cannot be relabelled to another key; the rest
//! of the associated data binds each ciphertext to its session id and field,
//! so a database writer cannot swap one session's refresh token into
//! another's row without the open failing.
//!
//! Values sealed before key ids existed are `1 || nonce || ciphertext+tag`
//! (no header in the associated data). They still open, under the key whose
//! id is its *legacy id* (the first 4 bytes of SHA-256 of the key), and are
//! re-sealed with a header when their row is next written.
//!
//! The keys form a ring: several keys, one primary, which seals; opening
//! picks the key a value names. The ring comes from a file (created 0600 on
//! first use, and only while the store holds nothing sealed) or from an
//! environment variable.
//!
//! The ring file holds one key a line, `ID:BASE64KEY`, then `created=UNIX`
//! and, on one line, `primary`; blank lines and `#` comments are skipped:
//!
//! ```text
//! 1f0a93c2:3q2+7w...= created=1764656000
//! 77b1e004:q83vEj...= created=1796192000 primary
//! ```
//!
//! A file from before rings (one base64 key, or 32 raw bytes) is a ring of
//! one, under the key's legacy id; it is rewritten in the ring format
//! (atomically, 0600) the first time the ring changes. The environment
//! variable holds either one base64 key (a ring of one, legacy id) or
//! `ID:BASE64KEY` entries separated by commas or whitespace, the first one
//! primary.

use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::config::KeySource;

/// Values sealed before key ids: `1 || nonce || ciphertext+tag`.
const VERSION_LEGACY: u8 = 1;
/// `2 || key id || nonce || ciphertext+tag`, the header bound into the AAD.
const VERSION: u8 = 2;
const NONCE_LEN: usize = 24;
const KEY_ID_LEN: usize = 4;
const HEADER_LEN: usize = 1 + KEY_ID_LEN;
/// Marks a ring entry that holds only a retired key's audit key.
pub const AUDIT_ONLY: &str = "audit-only";

#[derive(Debug, thiserror::Error)]
pub enum RetireError {
    #[error("the ring holds no such key")]
    NotInRing,
    #[error("it is the primary key: rotate first, then rewrap, then retire it")]
    Primary,
}

/// A sealing key's id: 4 bytes, shown as 8 lowercase hex digits. Not secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl KeyId {
    /// The id a key had before ids existed: the first bytes of SHA-256(key).
    /// Legacy (version 1) values open under the key with this id.
    pub fn legacy(key: &[u8; 32]) -> KeyId {
        let digest = Sha256::digest(key);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        KeyId(id)
    }

    /// Parses 8 hex digits.
    pub fn parse(text: &str) -> Option<KeyId> {
        let text = text.trim();
        if text.len() != 2 * KEY_ID_LEN || !text.is_ascii() {
            return None;
        }
        let mut id = [0u8; KEY_ID_LEN];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(KeyId(id))
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// The id of the key a sealed value names (legacy values: `None`, they name
/// none), or `None` for a value in no known format.
pub fn sealed_key_id(sealed: &[u8]) -> Option<KeyId> {
    if sealed.len() < HEADER_LEN + NONCE_LEN || sealed[0] != VERSION {
        return None;
    }
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&sealed[1..HEADER_LEN]);
    Some(KeyId(id))
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("store.key_file {path}: {reason}")]
    FileRing { path: String, reason: String },
    #[error("store.key_env: environment variable {var}: {reason}")]
    EnvRing { var: String, reason: String },
    #[error("store.key_file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("store.key_file {path}: must hold a ring of keys (lines ID:BASE64KEY), or one 32-byte key as base64 (or 32 raw bytes)")]
    FileContent { path: String },
    #[error("store.key_env: environment variable {0} is not set")]
    EnvMissing(String),
    #[error("store.key_env: environment variable {0} must hold a 32-byte key as base64")]
    EnvContent(String),
    #[error("store.key_command: {0}")]
    Command(String),
}

/// A sealed value could not be opened: wrong key, or tampered data.
#[derive(Debug, thiserror::Error)]
#[error("a sealed token could not be opened (wrong sealing key, or the stored value was altered)")]
pub struct OpenError;

/// One sealing key: its id, when it was made, and its 32 bytes (`Debug`
/// shows only the id).
#[derive(Clone)]
pub struct KeyEntry {
    pub id: KeyId,
    /// Unix seconds; `None` for a key that came without a date (from the
    /// environment, or a key file whose time could not be read).
    pub created_at: Option<i64>,
    /// A retired key kept only for the audit trail: `key` is then its
    /// audit key (see [`AuditKey::derive`]), which opens nothing.
    pub audit_only: bool,
    key: [u8; 32],
}

impl KeyEntry {
    /// This key's id is its legacy id: it opens values sealed before key ids.
    pub fn is_legacy(&self) -> bool {
        !self.audit_only && self.id == KeyId::legacy(&self.key)
    }

    /// The key that chains audit rows under this entry's id.
    pub fn audit_key(&self) -> AuditKey {
        if self.audit_only {
            AuditKey(self.key)
        } else {
            AuditKey::derive(&self.key)
        }
    }
}

/// The HMAC-SHA256 key that chains audit rows, derived from a sealing key
/// (one-way: it opens no token). A retired sealing key whose audit rows
/// remain leaves only this behind in the ring. `Debug` shows nothing.
#[derive(Clone)]
pub struct AuditKey([u8; 32]);

impl AuditKey {
    /// `HMAC-SHA256(sealing key, "credproxy audit key v1")`.
    pub fn derive(sealing_key: &[u8; 32]) -> AuditKey {
        AuditKey(hmac_sha256(sealing_key, &[b"credproxy audit key v1"]))
    }

    /// HMAC-SHA256 under this key over the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        hmac_sha256(&self.0, parts)
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey([redacted])")
    }
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyEntry({}, [redacted])", self.id)
    }
}

/// Several keys, one of them primary (the one that seals).
#[derive(Clone, Debug)]
pub struct Ring {
    keys: Vec<KeyEntry>,
    primary: usize,
    /// Read from a file in the format from before rings (one bare key): it
    /// is rewritten in the ring format the first time the ring changes.
    pub single_key_file: bool,
}

impl Ring {
    /// A ring of one key under its legacy id, so values sealed under it
    /// before key ids existed open too.
    pub fn single(key: [u8; 32], created_at: Option<i64>) -> Ring {
        Ring {
            keys: vec![KeyEntry {
                id: KeyId::legacy(&key),
                created_at,
                audit_only: false,
                key,
            }],
            primary: 0,
            single_key_file: false,
        }
    }

    /// A ring of one new random key under a random id.
    pub fn generate(now: i64) -> Ring {
        let mut ring = Ring {
            keys: Vec::new(),
            primary: 0,
            single_key_file: false,
        };
        ring.rotate(now);
        ring
    }

    pub fn keys(&self) -> &[KeyEntry] {
        &self.keys
    }

    pub fn primary_id(&self) -> KeyId {
        self.keys[self.primary].id
    }

    /// Adds a new random key and makes it primary; returns its id.
    pub fn rotate(&mut self, now: i64) -> KeyId {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        let id = loop {
            let mut id = [0u8; KEY_ID_LEN];
            rand::rng().fill_bytes(&mut id);
            let id = KeyId(id);
            // Never another key's id, nor the new key's legacy id (that
            // would let it try legacy values, which no new key sealed).
            if self.keys.iter().all(|k| k.id != id) && id != KeyId::legacy(&key) {
                break id;
            }
        };
        self.keys.push(KeyEntry {
            id,
            created_at: Some(now),
            audit_only: false,
            key,
        });
        self.primary = self.keys.len() - 1;
        id
    }

    /// Takes key `id` out of the ring. With `keep_for_audit`, what stays is
    /// its audit key (an audit-only entry, which opens no token), so audit
    /// rows chained under it still verify. The primary cannot be retired.
    pub fn retire(&mut self, id: KeyId, keep_for_audit: bool) -> Result<(), RetireError> {
        let i = self
            .keys
            .iter()
            .position(|k| k.id == id)
            .ok_or(RetireError::NotInRing)?;
        if i == self.primary {
            return Err(RetireError::Primary);
        }
        if keep_for_audit {
            let k = &mut self.keys[i];
            if !k.audit_only {
                k.key = k.audit_key().0;
                k.audit_only = true;
            }
        } else {
            self.keys.remove(i);
            if i < self.primary {
                self.primary -= 1;
            }
        }
        Ok(())
    }

    /// The entry with this id, if the ring holds it.
    pub fn get(&self, id: KeyId) -> Option<&KeyEntry> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// Key `id` as an `ID:BASE64KEY` entry, as `key_env` holds it: what
    /// `key rotate` prints for the operator to put in the variable.
    pub fn env_entry(&self, id: KeyId) -> Option<String> {
        let k = self.keys.iter().find(|k| k.id == id)?;
        Some(if k.audit_only {
            format!("{}:{AUDIT_ONLY}:{}", k.id, STANDARD.encode(k.key))
        } else {
            format!("{}:{}", k.id, STANDARD.encode(k.key))
        })
    }

    /// The ring file's text (see the module's doc).
    pub fn to_file_text(&self) -> String {
        let mut out = String::from(
            "# credproxy sealing keys: ID:BASE64KEY created=UNIX-SECONDS, one line marked primary.\n# Keep this file private (0600): it opens every stored token.\n",
        );
        for (i, k) in self.keys.iter().enumerate() {
            out.push_str(&format!("{}:{}", k.id, STANDARD.encode(k.key)));
            if let Some(t) = k.created_at {
                out.push_str(&format!(" created={t}"));
            }
            if i == self.primary {
                out.push_str(" primary");
            }
            if k.audit_only {
                out.push(' ');
                out.push_str(AUDIT_ONLY);
            }
            out.push('\n');
        }
        out
    }

    /// Parses the ring file's text. Errors name a line, never its content.
    pub fn parse_file_text(text: &str) -> Result<Ring, String> {
        let mut keys = Vec::new();
        let mut primary = None;
        for (n, line) in text.lines().enumerate() {
            let n = n + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (id, key) = parse_entry(words.next().unwrap_or_default()).ok_or_else(|| {
                format!("line {n}: expected ID:BASE64KEY (8 hex digits, a 32-byte key as base64)")
            })?;
            let mut created_at = None;
            let mut audit_only = false;
            for word in words {
                if word == AUDIT_ONLY {
                    audit_only = true;
                } else if word == "primary" {
                    if primary.is_some() {
                        return Err(format!("line {n}: a second key marked primary"));
                    }
                    primary = Some(keys.len());
                } else if let Some(t) = word.strip_prefix("created=") {
                    created_at = Some(
                        t.parse::<i64>()
                            .map_err(|_| format!("line {n}: created= must be unix seconds"))?,
                    );
                } else {
                    return Err(format!(
                        "line {n}: unknown word (expected primary, {AUDIT_ONLY} or created=UNIX)"
                    ));
                }
            }
            if audit_only && primary == Some(keys.len()) {
                return Err(format!("line {n}: an {AUDIT_ONLY} key cannot be primary"));
            }
            push_unique(
                &mut keys,
                KeyEntry {
                    id,
                    created_at,
                    audit_only,
                    key,
                },
            )
            .map_err(|id| format!("line {n}: key id {id} appears twice"))?;
        }
        let sealing: Vec<usize> = (0..keys.len()).filter(|&i| !keys[i].audit_only).collect();
        let primary = match (primary, sealing.as_slice()) {
            (_, []) => return Err("holds no sealing key".to_owned()),
            (Some(p), _) => p,
            (None, [only]) => *only,
            (None, _) => return Err("several keys but none marked primary".to_owned()),
        };
        Ok(Ring {
            keys,
            primary,
            single_key_file: false,
        })
    }

    /// Parses an environment variable's value: one base64 key, or
    /// `ID:BASE64KEY` entries separated by commas or whitespace, the first
    /// one primary. Errors name an entry by position, never its content.
    pub fn parse_env_text(text: &str) -> Result<Ring, String> {
        let entries: Vec<&str> = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|e| !e.is_empty())
            .collect();
        if let [only] = entries.as_slice() {
            if !only.contains(':') {
                return decode_key(only.as_bytes())
                    .map(|key| Ring::single(key, None))
                    .ok_or_else(|| {
                        "must hold a 32-byte key as base64, or ID:BASE64KEY entries".to_owned()
                    });
            }
        }
        let mut keys = Vec::new();
        for (n, e) in entries.iter().enumerate() {
            let n = n + 1;
            let (e, audit_only) = match e.split_once(&format!(":{AUDIT_ONLY}:")) {
                Some((id, key)) => (format!("{id}:{key}"), true),
                None => ((*e).to_owned(), false),
            };
            let (id, key) = parse_entry(&e).ok_or_else(|| {
                format!("entry {n}: expected ID:BASE64KEY (8 hex digits, a 32-byte key as base64)")
            })?;
            push_unique(
                &mut keys,
                KeyEntry {
                    id,
                    created_at: None,
                    audit_only,
                    key,
                },
            )
            .map_err(|id| format!("entry {n}: key id {id} appears twice"))?;
        }
        // The first sealing key is primary.
        let Some(primary) = keys.iter().position(|k| !k.audit_only) else {
            return Err("holds no sealing key".to_owned());
        };
        Ok(Ring {
            keys,
            primary,
            single_key_file: false,
        })
    }
}

/// `ID:BASE64KEY`.
fn parse_entry(entry: &str) -> Option<(KeyId, [u8; 32])> {
    let (id, key) = entry.split_once(':')?;
    Some((KeyId::parse(id)?, decode_key(key.as_bytes())?))
}

fn push_unique(keys: &mut Vec<KeyEntry>, entry: KeyEntry) -> Result<(), KeyId> {
    if keys.iter().any(|k| k.id == entry.id) {
        return Err(entry.id);
    }
    keys.push(entry);
    Ok(())
}

/// One key of the ring: its id, and the cipher made from it.
#[derive(Clone)]
struct RingKey {
    id: KeyId,
    /// The key's legacy id is its id: it opens version-1 values.
    legacy: bool,
    cipher: XChaCha20Poly1305,
}

/// Seals and opens token values. Cloning shares nothing mutable.
#[derive(Clone)]
pub struct Sealer {
    keys: Vec<RingKey>,
    /// Index of the primary key, which seals.
    primary: usize,
    /// Every entry's audit key, audit-only entries included.
    audit: Vec<(KeyId, AuditKey)>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer([redacted])")
    }
}

impl Sealer {
    /// A ring of one key, with its legacy id (so values sealed under it
    /// before key ids existed open too).
    pub fn from_key(key: &[u8; 32]) -> Sealer {
        Sealer::from_ring(&Ring::single(*key, None))
    }

    pub fn from_ring(ring: &Ring) -> Sealer {
        Sealer {
            keys: ring
                .keys
                .iter()
                .filter(|k| !k.audit_only)
                .map(|k| RingKey {
                    id: k.id,
                    legacy: k.is_legacy(),
                    cipher: XChaCha20Poly1305::new((&k.key).into()),
                })
                .collect(),
            primary: ring
                .keys
                .iter()
                .take(ring.primary)
                .filter(|k| !k.audit_only)
                .count(),
            audit: ring.keys.iter().map(|k| (k.id, k.audit_key())).collect(),
        }
    }

    /// The primary key's id and audit key: new audit rows are chained
    /// under it.
    pub fn audit_key(&self) -> (KeyId, AuditKey) {
        let id = self.primary_id();
        let key = self
            .audit_key_for(id)
            .unwrap_or_else(|| unreachable!("the primary is in the ring"));
        (id, key)
    }

    /// Every ring entry's id and audit key (audit-only entries too), in ring
    /// order: what `audit verify` tries on a row that names a key the ring
    /// does not hold.
    pub fn audit_keys(&self) -> &[(KeyId, AuditKey)] {
        &self.audit
    }

    /// The audit key of ring entry `id` (audit-only entries too).
    pub fn audit_key_for(&self, id: KeyId) -> Option<AuditKey> {
        self.audit
            .iter()
            .find(|(k, _)| *k == id)
            .map(|(_, key)| key.clone())
    }

    /// The first bytes of every value sealed under the primary key now (the
    /// version and its id): what `key rewrap` compares stored values with.
    pub fn current_header(&self) -> [u8; HEADER_LEN] {
        let mut header = [0u8; HEADER_LEN];
        header[0] = VERSION;
        header[1..].copy_from_slice(&self.primary_id().0);
        header
    }

    /// The ids of the keys that open values, in ring order.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// Whether the ring can open values sealed under key `id`.
    pub fn has_key(&self, id: KeyId) -> bool {
        self.key_by_id(id).is_some()
    }

    /// The id of the key that seals.
    pub fn primary_id(&self) -> KeyId {
        self.keys[self.primary].id
    }

    fn key_by_id(&self, id: KeyId) -> Option<&RingKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    fn legacy_key(&self) -> Option<&RingKey> {
        self.keys.iter().find(|k| k.legacy)
    }

    /// Whether `sealed` is sealed under the primary key, in the current
    /// format (so re-sealing it would change nothing).
    pub fn is_current(&self, sealed: &[u8]) -> bool {
        sealed_key_id(sealed) == Some(self.primary_id())
    }

    /// `sealed` re-sealed under the primary key when it is not already (a
    /// legacy value, or one sealed under another key of the ring); `None`
    /// when it is current or does not open (then it is left as it is).
    pub fn reseal(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        if self.is_current(sealed) {
            return None;
        }
        let plain = self.open(sealed, aad).ok()?;
        Some(self.seal(&plain, aad))
    }

    /// Loads the ring from where the configuration says; `None` when the
    /// key file does not exist. Nothing is created here: whether a new key
    /// may be made depends on the store (see `Sessions::open`).
    pub fn load_existing(source: &KeySource) -> Result<Option<Sealer>, KeyError> {
        Ok(load_ring(source)?.map(|ring| Sealer::from_ring(&ring)))
    }

    /// Creates the key file (mode 0600) with a new random key; if another
    /// process created it first, uses theirs.
    pub fn create_key_file(path: &Path) -> Result<Sealer, KeyError> {
        Ok(Sealer::from_ring(&load_or_create_key_file(path)?))
    }

    pub fn seal(&self, plaintext: &SecretString, aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut header = [0u8; HEADER_LEN];
        header[0] = VERSION;
        let primary = &self.keys[self.primary];
        header[1..].copy_from_slice(&primary.id.0);
        let full_aad = [&header[..], aad].concat();
        let ct = primary
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.expose_secret().as_bytes(),
                    aad: &full_aad,
                },
            )
            // Encryption only fails for inputs beyond 256 GiB.
            .unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + ct.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a value sealed under any key of the ring (the one its header
    /// names), or a legacy value under the legacy key.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<SecretString, OpenError> {
        let pt = match sealed.first() {
            Some(&VERSION) => {
                let id = sealed_key_id(sealed).ok_or(OpenError)?;
                let key = self.key_by_id(id).ok_or(OpenError)?;
                let (header, rest) = sealed.split_at(HEADER_LEN);
                let (nonce, ct) = rest.split_at(NONCE_LEN);
                let full_aad = [header, aad].concat();
                key.cipher
                    .decrypt(
                        XNonce::from_slice(nonce),
                        Payload {
                            msg: ct,
                            aad: &full_aad,
                        },
                    )
                    .map_err(|_| OpenError)?
            }
            Some(&VERSION_LEGACY) if sealed.len() > NONCE_LEN => {
                let key = self.legacy_key().ok_or(OpenError)?;
                let (nonce, ct) = sealed[1..].split_at(NONCE_LEN);
                key.cipher
                    .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
                    .map_err(|_| OpenError)?
            }
            _ => return Err(OpenError),
        };
        String::from_utf8(pt)
            .map(SecretString::from)
            .map_err(|_| OpenError)
    }
}

fn decode_key(bytes: &[u8]) -> Option<[u8; 32]> {
    let decoded = STANDARD.decode(bytes).ok()?;
    decoded.try_into().ok()
}

/// The ring where the configuration says; `None` when the key file does
/// not exist.
pub fn load_ring(source: &KeySource) -> Result<Option<Ring>, KeyError> {
    match source {
        KeySource::Env(var) => {
            let text = std::env::var(var).map_err(|_| KeyError::EnvMissing(var.clone()))?;
            Ring::parse_env_text(&text)
                .map(Some)
                .map_err(|reason| KeyError::EnvRing {
                    var: var.clone(),
                    reason,
                })
        }
        KeySource::File(path) => read_key_file(path),
        KeySource::Command { command, dir } => run_key_command(command, dir).map(Some),
    }
}

/// How long `key_command` may run.
const KEY_COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `key_command` (`sh -c`, in `dir`, no stdin) and reads its standard
/// output as a ring in the key file's format (or one bare base64 key). Its
/// output is never shown; errors say the exit status and the start of
/// what it wrote to standard error.
fn run_key_command(command: &str, dir: &Path) -> Result<Ring, KeyError> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let fail = |reason: String| KeyError::Command(reason);
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run sh: {e}")))?;
    // Both pipes are drained while the command runs (a full pipe would
    // stall it), each up to a bound.
    let drain = |pipe: Option<Box<dyn Read + Send>>, max: u64| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(p) = pipe {
                let _ = p.take(max).read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        1 << 20,
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        4096,
    );
    let deadline = std::time::Instant::now() + KEY_COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "did not finish within {} s",
                    KEY_COMMAND_TIMEOUT.as_secs()
                )));
            }
            Err(e) => return Err(fail(format!("cannot wait for it: {e}"))),
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        let said = String::from_utf8_lossy(&err);
        let said: String = said.trim().chars().take(300).collect();
        return Err(fail(if said.is_empty() {
            format!("exited with {status}")
        } else {
            format!("exited with {status}: {said}")
        }));
    }
    let text =
        std::str::from_utf8(&out).map_err(|_| fail("its output is not UTF-8 text".to_owned()))?;
    if !text.contains(':') {
        return decode_key(text.trim().as_bytes())
            .map(|key| Ring::single(key, None))
            .ok_or_else(|| {
                fail("its output must be a ring (lines ID:BASE64KEY) or one base64 key".to_owned())
            });
    }
    Ring::parse_file_text(text).map_err(|reason| fail(format!("its output: {reason}")))
}

/// The ring in the file at `path`, or `None` when there is no such file.
/// A file holding one bare key (base64, or 32 raw bytes) is a ring of one.
fn read_key_file(path: &Path) -> Result<Option<Ring>, KeyError> {
    let shown = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => {
            let created_at = std::fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .and_then(|d| i64::try_from(d.as_secs()).ok());
            let single = |key| {
                let mut ring = Ring::single(key, created_at);
                ring.single_key_file = true;
                Ok(Some(ring))
            };
            if let Ok(raw) = <[u8; 32]>::try_from(bytes.as_slice()) {
                return single(raw);
            }
            let Ok(text) = std::str::from_utf8(&bytes) else {
                return Err(KeyError::FileContent { path: shown });
            };
            if !text.contains(':') {
                return match decode_key(text.trim().as_bytes()) {
                    Some(key) => single(key),
                    None => Err(KeyError::FileContent { path: shown }),
                };
            }
            Ring::parse_file_text(text)
                .map(Some)
                .map_err(|reason| KeyError::FileRing {
                    path: shown,
                    reason,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KeyError::File {
            path: shown,
            source,
        }),
    }
}

/// Replaces the key file with `ring`, in the ring format, atomically: a
/// temporary file (0600) in the same directory, fsync, rename, fsync of the
/// directory. A single-key file is migrated this way.
pub fn write_key_file(path: &Path, ring: &Ring) -> Result<(), KeyError> {
    let shown = path.display().to_string();
    let file_err = |source| KeyError::File {
        path: shown.clone(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "key".to_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(ring.to_file_text().as_bytes())?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(file_err(e));
    }
    #[cfg(unix)]
    {
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(file_err)?;
    }
    Ok(())
}

/// A warning when the key file can be read or written by anyone but its
/// owner (Unix permission bits).
pub fn key_file_warning(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then(|| {
            format!(
                "store.key_file {} is accessible by group or others (mode {mode:04o}); anyone who can read it can open the stored tokens: chmod 600 it",
                path.display()
            )
        })
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

fn load_or_create_key_file(path: &Path) -> Result<Ring, KeyError> {
    let shown = path.display().to_string();
    let file_err = |source| KeyError::File {
        path: shown.clone(),
        source,
    };
    match read_key_file(path)? {
        Some(ring) => Ok(ring),
        None => {
            let ring = Ring::generate(unix_now());
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            match opts.open(path) {
                Ok(mut f) => {
                    f.write_all(ring.to_file_text().as_bytes())
                        .and_then(|()| f.sync_all())
                        .map_err(file_err)?;
                    Ok(ring)
                }
                // Another process created it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    load_or_create_key_file(path)
                }
                Err(e) => Err(file_err(e)),
            }
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
/// A value sealed the way credproxy sealed before key ids existed.
pub(crate) fn seal_legacy(key: &[u8; 32], plain: &str, aad: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let nonce = [9u8; NONCE_LEN];
    let ct = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plain.as_bytes(),
                aad,
            },
        )
        .expect("encrypt");
    let mut out = vec![VERSION_LEGACY];
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_owned())
    }

    #[test]
    fn round_trip_and_binding() {
        let s = Sealer::from_key(&[7; 32]);
        let sealed = s.seal(&secret("tok"), b"s_1/access");
        assert!(!sealed.windows(3).any(|w| w == b"tok"));
        assert_eq!(
            s.open(&sealed, b"s_1/access")
                .expect("opens")
                .expose_secret(),
            "tok"
        );
        assert!(s.open(&sealed, b"s_2/access").is_err(), "bound to its row");
        assert!(
            Sealer::from_key(&[8; 32])
                .open(&sealed, b"s_1/access")
                .is_err(),
            "bound to its key"
        );
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(s.open(&bad, b"s_1/access").is_err(), "tamper-evident");
    }

    #[test]
    fn sealed_values_name_their_key_and_cannot_be_relabelled() {
        let s = Sealer::from_key(&[7; 32]);
        let sealed = s.seal(&secret("tok"), b"a");
        assert_eq!(sealed[0], VERSION);
        assert_eq!(sealed_key_id(&sealed), Some(KeyId::legacy(&[7; 32])));
        assert_eq!(s.primary_id(), KeyId::legacy(&[7; 32]));
        assert!(s.is_current(&sealed));
        for i in 1..HEADER_LEN {
            let mut relabelled = sealed.clone();
            relabelled[i] ^= 1;
            assert!(s.open(&relabelled, b"a").is_err(), "key id byte {i}");
        }
        // A value re-headed as legacy (the header stripped) does not open
        // either: the header is in the associated data.
        let mut stripped = vec![VERSION_LEGACY];
        stripped.extend_from_slice(&sealed[HEADER_LEN..]);
        assert!(s.open(&stripped, b"a").is_err());
    }

    #[test]
    fn legacy_values_open_and_are_resealed_with_a_header() {
        let key = [5u8; 32];
        let old = seal_legacy(&key, "old-tok", b"s_1/refresh");
        let s = Sealer::from_key(&key);
        assert_eq!(sealed_key_id(&old), None);
        assert!(!s.is_current(&old));
        assert_eq!(
            s.open(&old, b"s_1/refresh").expect("opens").expose_secret(),
            "old-tok"
        );
        assert!(
            s.open(&old, b"s_2/refresh").is_err(),
            "still bound to its row"
        );
        assert!(Sealer::from_key(&[6; 32])
            .open(&old, b"s_1/refresh")
            .is_err());
        let new = s.reseal(&old, b"s_1/refresh").expect("re-sealed");
        assert_eq!(sealed_key_id(&new), Some(s.primary_id()));
        assert_eq!(
            s.open(&new, b"s_1/refresh").expect("opens").expose_secret(),
            "old-tok"
        );
        assert!(
            s.reseal(&new, b"s_1/refresh").is_none(),
            "current: unchanged"
        );
    }

    #[test]
    fn key_ids_print_and_parse_as_hex() {
        let id = KeyId([0x01, 0xab, 0x00, 0xff]);
        assert_eq!(id.to_string(), "01ab00ff");
        assert_eq!(KeyId::parse("01AB00ff"), Some(id));
        assert_eq!(KeyId::parse("01ab00f"), None);
        assert_eq!(KeyId::parse("01ab00fg"), None);
        assert_eq!(KeyId::parse("é1ab00f"), None);
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.key");
        let a = load_or_create_key_file(&path).expect("create");
        let b = load_or_create_key_file(&path).expect("reuse");
        assert_eq!(a.primary_id(), b.primary_id());
        assert_eq!(a.keys()[0].key, b.keys()[0].key);
        assert!(!b.single_key_file);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "not a key").expect("write");
        assert!(matches!(
            load_or_create_key_file(&path),
            Err(KeyError::FileContent { .. })
        ));
    }

    #[test]
    fn a_ring_seals_with_its_primary_and_opens_with_any_key() {
        let mut ring = Ring::single([1; 32], None);
        let old = Sealer::from_ring(&ring);
        let sealed_old = old.seal(&secret("one"), b"a");
        let legacy = seal_legacy(&[1; 32], "zero", b"a");
        let first = ring.primary_id();
        let second = ring.rotate(100);
        assert_ne!(first, second);
        assert_eq!(ring.primary_id(), second);
        let s = Sealer::from_ring(&ring);
        let sealed_new = s.seal(&secret("two"), b"a");
        assert_eq!(sealed_key_id(&sealed_new), Some(second));
        assert!(!s.is_current(&sealed_old));
        for (v, want) in [
            (&sealed_old, "one"),
            (&sealed_new, "two"),
            (&legacy, "zero"),
        ] {
            assert_eq!(s.open(v, b"a").expect("opens").expose_secret(), want);
        }
        assert!(old.open(&sealed_new, b"a").is_err(), "an unknown key id");
        let resealed = s.reseal(&sealed_old, b"a").expect("resealed");
        assert_eq!(sealed_key_id(&resealed), Some(second));
        // A value relabelled to the other key of the ring does not open.
        let mut relabelled = sealed_new.clone();
        relabelled[1..HEADER_LEN].copy_from_slice(&first.0);
        assert!(s.open(&relabelled, b"a").is_err());
    }

    #[test]
    fn the_ring_file_round_trips_and_says_no_key_in_its_errors() {
        let mut ring = Ring::generate(10);
        ring.rotate(20);
        let text = ring.to_file_text();
        let back = Ring::parse_file_text(&text).expect("parses");
        assert_eq!(back.primary_id(), ring.primary_id());
        assert_eq!(back.keys().len(), 2);
        for (a, b) in back.keys().iter().zip(ring.keys()) {
            assert_eq!((a.id, a.created_at, a.key), (b.id, b.created_at, b.key));
        }
        let key = STANDARD.encode([4u8; 32]);
        for bad in [
            format!("0000000a:{key} primary\n0000000b:{key} primary"),
            format!("0000000a:{key}\n0000000b:{key}"),
            format!("0000000a:{key} primary\n0000000a:{key}"),
            format!("0000000a:{key} sometimes"),
            format!("0000000a:{key} created=soon"),
            format!("zz:{key}"),
            "0000000a:c2hvcnQ=".to_owned(),
            "# nothing\n".to_owned(),
        ] {
            let e = Ring::parse_file_text(&bad).expect_err(&bad);
            assert!(!e.contains(&key) && !e.contains("c2hvcnQ"), "{e}");
        }
        let one = Ring::parse_file_text(&format!("# c\n\n0000000a:{key}\n")).expect("one");
        assert_eq!(one.primary_id(), KeyId([0, 0, 0, 0x0a]));
    }

    #[test]
    fn a_single_key_file_is_a_ring_of_one_and_migrates_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.key");
        let key = [2u8; 32];
        std::fs::write(&path, format!("{}\n", STANDARD.encode(key))).expect("write");
        let ring = read_key_file(&path).expect("read").expect("exists");
        assert!(ring.single_key_file);
        assert_eq!(ring.primary_id(), KeyId::legacy(&key));
        let legacy = seal_legacy(&key, "t", b"a");
        let before = Sealer::from_ring(&ring).seal(&secret("u"), b"a");
        let mut ring = ring;
        let new = ring.rotate(50);
        write_key_file(&path, &ring).expect("migrate");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        let back = read_key_file(&path).expect("read").expect("exists");
        assert!(!back.single_key_file);
        assert_eq!(back.primary_id(), new);
        assert_eq!(back.keys().len(), 2);
        assert_eq!(back.keys()[0].id, KeyId::legacy(&key));
        let s = Sealer::from_ring(&back);
        assert_eq!(s.open(&legacy, b"a").expect("legacy").expose_secret(), "t");
        assert_eq!(s.open(&before, b"a").expect("old key").expose_secret(), "u");
        // 32 raw bytes are a ring of one too.
        std::fs::write(&path, key).expect("write raw");
        let raw = read_key_file(&path).expect("read").expect("exists");
        assert_eq!(raw.primary_id(), KeyId::legacy(&key));
    }

    #[test]
    fn the_environment_holds_one_key_or_several_entries() {
        let a = STANDARD.encode([1u8; 32]);
        let b = STANDARD.encode([2u8; 32]);
        let one = Ring::parse_env_text(&format!(" {a}\n")).expect("one");
        assert_eq!(one.primary_id(), KeyId::legacy(&[1; 32]));
        for text in [
            format!("0000000b:{b},0000000a:{a}"),
            format!("0000000b:{b} 0000000a:{a}"),
            format!(" 0000000b:{b} ,\n 0000000a:{a} "),
        ] {
            let ring = Ring::parse_env_text(&text).expect(&text);
            assert_eq!(
                ring.primary_id(),
                KeyId([0, 0, 0, 0x0b]),
                "the first is primary"
            );
            assert_eq!(ring.keys().len(), 2);
        }
        for bad in [
            String::new(),
            "notbase64!".to_owned(),
            format!("0000000b:{b},{a}"),
            format!("0000000b:{b},0000000b:{a}"),
        ] {
            let e = Ring::parse_env_text(&bad).expect_err(&bad);
            assert!(!e.contains(&a) && !e.contains(&b), "{e}");
        }
        std::env::set_var(
            "CREDPROXY_TEST_RING_ENV",
            format!("0000000b:{b},0000000a:{a}"),
        );
        let ring = load_ring(&KeySource::Env("CREDPROXY_TEST_RING_ENV".to_owned()))
            .expect("loads")
            .expect("some");
        assert_eq!(ring.keys().len(), 2);
        std::env::set_var("CREDPROXY_TEST_RING_ENV", "0000000b:short");
        let e = load_ring(&KeySource::Env("CREDPROXY_TEST_RING_ENV".to_owned()))
            .expect_err("bad")
            .to_string();
        assert!(
            e.contains("CREDPROXY_TEST_RING_ENV") && e.contains("entry 1"),
            "{e}"
        );
    }

    #[test]
    fn retire_keeps_only_an_audit_key_that_opens_nothing() {
        let mut ring = Ring::generate(1);
        let old = ring.primary_id();
        let sealer = Sealer::from_ring(&ring);
        let sealed = sealer.seal(&secret("tok"), b"ad");
        let (chain_id, chain_key) = sealer.audit_key();
        assert_eq!(chain_id, old);
        let mac = chain_key.mac(&[b"row"]);
        let new = ring.rotate(2);
        assert!(matches!(ring.retire(new, true), Err(RetireError::Primary)));
        assert!(matches!(
            ring.retire(KeyId([0; 4]), true),
            Err(RetireError::NotInRing)
        ));
        ring.retire(old, true).expect("retire");
        let after = Sealer::from_ring(&ring);
        assert!(!after.has_key(old), "a retired key opens nothing");
        assert!(after.open(&sealed, b"ad").is_err());
        let kept = after.audit_key_for(old).expect("audit key kept");
        assert_eq!(kept.mac(&[b"row"]), mac, "old audit rows still verify");
        assert_eq!(after.primary_id(), new);
        assert_eq!(format!("{kept:?}"), "AuditKey([redacted])");

        // The audit-only entry survives the file and the environment form.
        let text = ring.to_file_text();
        assert!(text.contains(AUDIT_ONLY));
        let back = Ring::parse_file_text(&text).expect("parse");
        assert!(back.get(old).expect("entry").audit_only);
        assert_eq!(back.primary_id(), new);
        let env: Vec<String> = [new, old]
            .iter()
            .filter_map(|id| ring.env_entry(*id))
            .collect();
        let back = Ring::parse_env_text(&env.join(",")).expect("env");
        assert!(back.get(old).expect("entry").audit_only);
        assert_eq!(back.primary_id(), new);
        let sealer = Sealer::from_ring(&back);
        assert_eq!(sealer.audit_key_for(old).expect("kept").mac(&[b"row"]), mac);
        // An audit-only entry first in the environment is not primary.
        let back = Ring::parse_env_text(&format!("{},{}", env[1], env[0])).expect("env");
        assert_eq!(back.primary_id(), new);
        assert!(Ring::parse_env_text(&env[1]).is_err(), "no sealing key");

        // Retiring without audit rows removes the entry.
        let mut ring = Ring::generate(1);
        let first = ring.primary_id();
        ring.rotate(2);
        ring.retire(first, false).expect("retire");
        assert_eq!(ring.keys().len(), 1);
        assert!(ring.get(first).is_none());
        assert!(Ring::parse_file_text(&format!(
            "{} primary {AUDIT_ONLY}\n",
            env[1].replacen(&format!(":{AUDIT_ONLY}:"), ":", 1)
        ))
        .is_err());
    }

    #[test]
    fn a_key_command_prints_the_ring_and_fails_clearly() {
        let dir = tempfile::tempdir().expect("dir");
        let ring = Ring::generate(5);
        std::fs::write(dir.path().join("ring"), ring.to_file_text()).expect("write");
        let source = |command: &str| KeySource::Command {
            command: command.to_owned(),
            dir: dir.path().to_path_buf(),
        };
        let read = load_ring(&source("cat ring")).expect("ring").expect("some");
        assert_eq!(read.primary_id(), ring.primary_id());
        let key = STANDARD.encode([4u8; 32]);
        let one = load_ring(&source(&format!("echo {key}")))
            .expect("ring")
            .expect("some");
        assert_eq!(one.primary_id(), KeyId::legacy(&[4u8; 32]));
        let e = load_ring(&source("echo TOPSECRET; exit 7"))
            .expect_err("fails")
            .to_string();
        assert!(
            e.contains("exit status: 7") && !e.contains("TOPSECRET"),
            "{e}"
        );
        let e = load_ring(&source("echo not-a-ring:x"))
            .expect_err("fails")
            .to_string();
        assert!(e.contains("line 1") && !e.contains("not-a-ring"), "{e}");
    }
}
