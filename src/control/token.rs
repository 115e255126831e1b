//! The admin token, kept as its SHA-256 and compared in constant time over
//! digests (so the length leaks nothing). `None`: no token configured,
//! `/admin/*` and the dashboard answer 404.

use axum::http::{header, HeaderMap};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Clone, Copy)]
pub struct AdminToken(Option<[u8; 32]>);

impl AdminToken {
    pub fn new(token: Option<&SecretString>) -> AdminToken {
        AdminToken(token.map(|t| Sha256::digest(t.expose_secret().as_bytes()).into()))
    }

    /// Whether a token is configured.
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Whether the request carries `Authorization: Bearer ADMIN_TOKEN`.
    pub fn authorises(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = self.0 else {
            return false;
        };
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| Sha256::digest(token.trim().as_bytes()))
            .is_some_and(|digest| bool::from(digest.as_slice().ct_eq(&expected)))
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.enabled() {
            "AdminToken(set)"
        } else {
            "AdminToken(none)"
        })
    }
}
