//! Sealing tokens at rest with an AEAD (XChaCha20-Poly1305).
//!
//! A sealed value is `version byte || 24-byte random nonce || ciphertext+tag`.
//! The associated data binds each ciphertext to its session id and field, so
//! a database writer cannot swap one session's refresh token into another's
//! row without the open failing.
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

use crate::config::KeySource;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;

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

/// Seals and opens token values. Cloning shares nothing mutable.
#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer([redacted])")
    }
}

impl Sealer {
    pub fn from_key(key: &[u8; 32]) -> Sealer {
        Sealer {
            cipher: XChaCha20Poly1305::new(key.into()),
        }
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
        let ct = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.expose_secret().as_bytes(),
                    aad,
                },
            )
            // Encryption only fails for inputs beyond 256 GiB.
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<SecretString, OpenError> {
        if sealed.len() < 1 + NONCE_LEN || sealed[0] != VERSION {
            return Err(OpenError);
        }
        let (nonce, ct) = sealed[1..].split_at(NONCE_LEN);
        let pt = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| OpenError)?;
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
