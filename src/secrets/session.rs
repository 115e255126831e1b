//! Session identity: the public id, the secret session key and its hash,
//! and the session's status.
//!
//! A session key is 256 random bits, shown once when the session is made and
//! stored only as its SHA-256 hash. Because the key is random and long, a
//! plain hash (no salt, no slow KDF) is enough to make the store useless for
//! recovering keys, and it lets the hot path find a session with one lookup.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Prefix of generated keys, so a leaked key is recognisable by secret scanners.
const KEY_PREFIX: &str = "cpk_";

/// SHA-256 of a session key: what the store and the cache index by.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &[u8]) -> KeyHash {
        KeyHash(Sha256::digest(key).into())
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHash([redacted])")
    }
}

/// A session key, held only long enough to show it once.
#[derive(Clone)]
pub struct SessionKey(SecretString);

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey([redacted])")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BadKey {
    #[error("a session key must be 16 to 512 characters long")]
    Length,
    #[error("a session key may only hold printable ASCII without spaces")]
    Characters,
}

impl SessionKey {
    pub fn generate() -> SessionKey {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        SessionKey(SecretString::from(format!(
            "{KEY_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(bytes)
        )))
    }

    /// A key chosen by the operator (`session add --key`), e.g. the "access
    /// token" a legacy application already has configured.
    pub fn chosen(key: SecretString) -> Result<SessionKey, BadKey> {
        let k = key.expose_secret();
        if !(16..=512).contains(&k.len()) {
            return Err(BadKey::Length);
        }
        if !k.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(BadKey::Characters);
        }
        Ok(SessionKey(key))
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash::of(self.0.expose_secret().as_bytes())
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

/// A session's public id: safe to log, print and put in URLs.
pub fn new_session_id() -> String {
    random_id("s_")
}

/// A session key's id (`k_` and 64 random bits in hex): what the control
/// plane, the logs and the audit trail name a key by, never the key.
pub fn new_key_id() -> String {
    random_id("k_")
}

/// The id of a session's first key, the one `session add` prints: the
/// session id's, `k_` for `s_` (as the migration that made every existing
/// session's key its first key named them).
pub fn first_key_id(session_id: &str) -> String {
    format!("k_{}", session_id.strip_prefix("s_").unwrap_or(session_id))
}

/// An event's id (`evt_` and 64 random bits in hex), which receivers use
/// to drop duplicate deliveries.
pub fn new_event_id() -> String {
    random_id("evt_")
}

fn random_id(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    rand::rng().fill_bytes(&mut bytes);
    let mut id = String::with_capacity(prefix.len() + 16);
    id.push_str(prefix);
    for b in bytes {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Active,
    /// The last refresh failed transiently (the token endpoint failed, timed
    /// out or answered something unusable): the session still serves
    /// requests with the token it has, and the refresh is retried with
    /// back-off. The next successful refresh makes it `active` again.
    RefreshFailing,
    /// The token endpoint refused the refresh token; a person must reconnect.
    ReauthorizationRequired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::RefreshFailing => "refresh_failing",
            Status::ReauthorizationRequired => "reauthorization_required",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "active" => Some(Status::Active),
            "refresh_failing" => Some(Status::RefreshFailing),
            "reauthorization_required" => Some(Status::ReauthorizationRequired),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_long_random_and_url_safe() {
        let a = SessionKey::generate();
        let b = SessionKey::generate();
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.expose().len(), KEY_PREFIX.len() + 43);
        assert!(a
            .expose()
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'));
        assert_eq!(a.hash(), KeyHash::of(a.expose().as_bytes()));
    }

    #[test]
    fn chosen_keys_are_checked() {
        assert!(SessionKey::chosen("short".to_owned().into()).is_err());
        assert!(SessionKey::chosen("has a space in it!!".to_owned().into()).is_err());
        assert!(SessionKey::chosen("legacy-access-token-123".to_owned().into()).is_ok());
    }

    #[test]
    fn debug_never_shows_a_key() {
        let k = SessionKey::generate();
        assert!(!format!("{k:?} {:?}", k.hash()).contains(&k.expose()[4..]));
    }

    #[test]
    fn ids_look_like_ids() {
        let id = new_session_id();
        assert!(id.starts_with("s_") && id.len() == 18);
        let e = new_event_id();
        assert!(e.starts_with("evt_") && e.len() == 20 && e != new_event_id());
    }

    #[test]
    fn statuses_round_trip() {
        for s in [
            Status::Active,
            Status::RefreshFailing,
            Status::ReauthorizationRequired,
        ] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).expect("json"),
                serde_json::Value::from(s.as_str())
            );
        }
    }
}
