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
//! The 32-byte key comes from a file (created 0600 on first use, and only
//! while the store holds nothing sealed) or from an environment variable;
//! both hold it as base64 (a file may also hold the 32 raw bytes).

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
    #[error("store.key_file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("store.key_file {path}: must hold a 32-byte key as base64 (or 32 raw bytes)")]
    FileContent { path: String },
    #[error("store.key_env: environment variable {0} is not set")]
    EnvMissing(String),
    #[error("store.key_env: environment variable {0} must hold a 32-byte key as base64")]
    EnvContent(String),
}

/// A sealed value could not be opened: wrong key, or tampered data.
#[derive(Debug, thiserror::Error)]
#[error("a sealed token could not be opened (wrong sealing key, or the stored value was altered)")]
pub struct OpenError;

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
    /// The primary key, which seals.
    primary: RingKey,
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
        Sealer {
            primary: RingKey {
                id: KeyId::legacy(key),
                legacy: true,
                cipher: XChaCha20Poly1305::new(key.into()),
            },
        }
    }

    /// The id of the key that seals.
    pub fn primary_id(&self) -> KeyId {
        self.primary.id
    }

    fn key_by_id(&self, id: KeyId) -> Option<&RingKey> {
        (self.primary.id == id).then_some(&self.primary)
    }

    fn legacy_key(&self) -> Option<&RingKey> {
        self.primary.legacy.then_some(&self.primary)
    }

    /// Whether `sealed` is sealed under the primary key, in the current
    /// format (so re-sealing it would change nothing).
    pub fn is_current(&self, sealed: &[u8]) -> bool {
        sealed_key_id(sealed) == Some(self.primary.id)
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

    /// Loads the key from where the configuration says; `None` when the
    /// key file does not exist. Nothing is created here: whether a new key
    /// may be made depends on the store (see `Sessions::open`).
    pub fn load_existing(source: &KeySource) -> Result<Option<Sealer>, KeyError> {
        match source {
            KeySource::Env(var) => {
                let text = std::env::var(var).map_err(|_| KeyError::EnvMissing(var.clone()))?;
                let key = decode_key(text.trim().as_bytes())
                    .ok_or_else(|| KeyError::EnvContent(var.clone()))?;
                Ok(Some(Sealer::from_key(&key)))
            }
            KeySource::File(path) => Ok(read_key_file(path)?.map(|key| Sealer::from_key(&key))),
        }
    }

    /// Creates the key file (mode 0600) with a new random key; if another
    /// process created it first, uses theirs.
    pub fn create_key_file(path: &Path) -> Result<Sealer, KeyError> {
        Ok(Sealer::from_key(&load_or_create_key_file(path)?))
    }

    pub fn seal(&self, plaintext: &SecretString, aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut header = [0u8; HEADER_LEN];
        header[0] = VERSION;
        header[1..].copy_from_slice(&self.primary.id.0);
        let full_aad = [&header[..], aad].concat();
        let ct = self
            .primary
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

/// The key in the file at `path`, or `None` when there is no such file.
fn read_key_file(path: &Path) -> Result<Option<[u8; 32]>, KeyError> {
    let shown = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => {
            if let Ok(raw) = <[u8; 32]>::try_from(bytes.as_slice()) {
                return Ok(Some(raw));
            }
            let text = String::from_utf8_lossy(&bytes);
            decode_key(text.trim().as_bytes())
                .map(Some)
                .ok_or(KeyError::FileContent { path: shown })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KeyError::File {
            path: shown,
            source,
        }),
    }
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

fn load_or_create_key_file(path: &Path) -> Result<[u8; 32], KeyError> {
    let shown = path.display().to_string();
    let file_err = |source| KeyError::File {
        path: shown.clone(),
        source,
    };
    match read_key_file(path)? {
        Some(key) => Ok(key),
        None => {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            match opts.open(path) {
                Ok(mut f) => {
                    f.write_all(format!("{}\n", STANDARD.encode(key)).as_bytes())
                        .and_then(|()| f.sync_all())
                        .map_err(file_err)?;
                    Ok(key)
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
        assert_eq!(a, b);
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
}
