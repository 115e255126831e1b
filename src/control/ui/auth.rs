//! Signing in to the dashboard without keeping the admin token in the
//! browser, and the CSRF tokens of its forms.
//!
//! ```text
//! credproxy_ui = v1.EXPIRY.ID.MAC
//!   EXPIRY  unix seconds, 8 hours after the sign-in (one decimal spelling)
//!   ID      128 random bits (base64url), this sign-in's name
//!   MAC     HMAC-SHA256(K, "credproxy-ui-cookie/v1|" EXPIRY "|" ID)
//!   K       HMAC-SHA256(admin token, "credproxy dashboard key v1")
//! csrf    = HMAC-SHA256(K, "credproxy-ui-csrf/v1|" ID-bytes)
//! flash   = PAYLOAD.HMAC-SHA256(K, "credproxy-ui-flash/v1|" ID-bytes "|" PAYLOAD)
//! ```
//!
//! The cookie is `HttpOnly`, `SameSite=Strict`, `Path=/ui`, `Max-Age` of
//! 8 hours, and `Secure` when `public_url` is https. K never leaves the
//! process and HMAC is a PRF, so a cookie or CSRF token says nothing about
//! K or the token, and none can be made without K. Every MAC is compared in
//! constant time (`subtle`); the prefixes keep the three kinds of MAC apart
//! (a cookie's MAC is never a valid CSRF token). K is derived from the
//! admin token, so changing the token signs every browser out. The expiry
//! is checked against the clock (and may not lie further ahead than one
//! sign-in lasts), the id against the signed-out list (`mod.rs`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// How long a sign-in lasts.
pub const SIGN_IN_TTL_SECS: i64 = 8 * 3600;

const COOKIE_PREFIX: &str = "credproxy-ui-cookie/v1|";
const CSRF_PREFIX: &str = "credproxy-ui-csrf/v1|";
const FLASH_PREFIX: &str = "credproxy-ui-flash/v1|";
const KEY_LABEL: &[u8] = b"credproxy dashboard key v1";

pub struct Keys {
    /// SHA-256 of the admin token: a typed token is compared to it.
    token_digest: [u8; 32],
    /// K: MACs cookies, CSRF tokens and flashes.
    mac_key: [u8; 32],
}

/// A valid sign-in, read from its cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignIn {
    pub id: [u8; 16],
    pub expires: i64,
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes a key of any length: this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

impl Keys {
    pub fn new(token: &str) -> Keys {
        Keys {
            token_digest: Sha256::digest(token.as_bytes()).into(),
            mac_key: hmac(token.as_bytes(), &[KEY_LABEL]),
        }
    }

    pub fn token_matches(&self, typed: &str) -> bool {
        let digest = Sha256::digest(typed.trim().as_bytes());
        bool::from(digest.as_slice().ct_eq(&self.token_digest))
    }

    fn cookie_mac(&self, expires: i64, id: &[u8; 16]) -> [u8; 32] {
        let id = URL_SAFE_NO_PAD.encode(id);
        hmac(
            &self.mac_key,
            &[
                COOKIE_PREFIX.as_bytes(),
                expires.to_string().as_bytes(),
                b"|",
                id.as_bytes(),
            ],
        )
    }

    pub fn cookie_value(&self, s: &SignIn) -> String {
        format!(
            "v1.{}.{}.{}",
            s.expires,
            URL_SAFE_NO_PAD.encode(s.id),
            URL_SAFE_NO_PAD.encode(self.cookie_mac(s.expires, &s.id))
        )
    }

    /// The sign-in a cookie value proves, if its MAC is right and it has
    /// not expired.
    pub fn verify_cookie(&self, value: &str, now: i64) -> Option<SignIn> {
        let mut parts = value.split('.');
        let (Some("v1"), Some(expires), Some(id), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let text = expires;
        let expires: i64 = expires.parse().ok()?;
        // One spelling per value (no `+1`, no `01`).
        if expires.to_string() != text {
            return None;
        }
        let id: [u8; 16] = URL_SAFE_NO_PAD.decode(id).ok()?.try_into().ok()?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        let expected = self.cookie_mac(expires, &id);
        if !bool::from(mac.as_slice().ct_eq(&expected)) {
            return None;
        }
        // A cookie cannot outlive its lifetime from now, whatever the clock did.
        if expires <= now || expires > now + SIGN_IN_TTL_SECS + 60 {
            return None;
        }
        Some(SignIn { id, expires })
    }

    pub fn csrf(&self, s: &SignIn) -> String {
        URL_SAFE_NO_PAD.encode(hmac(&self.mac_key, &[CSRF_PREFIX.as_bytes(), &s.id]))
    }

    pub fn csrf_matches(&self, s: &SignIn, sent: Option<&str>) -> bool {
        let Some(sent) = sent else {
            return false;
        };
        let expected = self.csrf(s);
        bool::from(sent.as_bytes().ct_eq(expected.as_bytes()))
    }

    fn flash_mac(&self, s: &SignIn, payload: &str) -> [u8; 32] {
        hmac(
            &self.mac_key,
            &[FLASH_PREFIX.as_bytes(), &s.id, b"|", payload.as_bytes()],
        )
    }

    /// A flash cookie's value: `payload` (base64url) and its MAC, tied to
    /// the sign-in `s`.
    pub fn flash_value(&self, s: &SignIn, payload: &str) -> String {
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(self.flash_mac(s, payload))
        )
    }

    /// The payload of a flash cookie made by [`Keys::flash_value`] for `s`.
    pub fn verify_flash(&self, s: &SignIn, value: &str) -> Option<String> {
        let (payload, mac) = value.split_once('.')?;
        let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        let expected = self.flash_mac(s, &payload);
        if !bool::from(mac.as_slice().ct_eq(&expected)) {
            return None;
        }
        Some(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new("the-admin-token")
    }

    #[test]
    fn a_cookie_proves_its_sign_in_until_it_expires() {
        let k = keys();
        let s = SignIn {
            id: [7; 16],
            expires: 1_000_000 + SIGN_IN_TTL_SECS,
        };
        let v = k.cookie_value(&s);
        assert!(v.starts_with("v1."), "{v}");
        assert!(!v.contains("the-admin-token"));
        assert_eq!(k.verify_cookie(&v, 1_000_000), Some(s));
        assert_eq!(k.verify_cookie(&v, s.expires - 1), Some(s));
        assert_eq!(k.verify_cookie(&v, s.expires), None, "expired");
        // A cookie claiming to last longer than a sign-in does is refused.
        assert_eq!(k.verify_cookie(&v, 1_000_000 - 3600), None);
    }

    #[test]
    fn a_changed_cookie_or_admin_token_is_refused() {
        let k = keys();
        let now = 1_000_000;
        let s = SignIn {
            id: [7; 16],
            expires: now + 60,
        };
        let v = k.cookie_value(&s);
        let parts: Vec<&str> = v.split('.').collect();
        let later = format!("v1.{}.{}.{}", now + 120, parts[2], parts[3]);
        assert_eq!(k.verify_cookie(&later, now), None, "expiry moved");
        let other_id = format!(
            "v1.{}.{}.{}",
            parts[1],
            URL_SAFE_NO_PAD.encode([8u8; 16]),
            parts[3]
        );
        assert_eq!(k.verify_cookie(&other_id, now), None, "id changed");
        assert_eq!(Keys::new("a-new-token").verify_cookie(&v, now), None);
        let plus = format!("v1.+{}.{}.{}", parts[1], parts[2], parts[3]);
        assert_eq!(k.verify_cookie(&plus, now), None, "one spelling only");
        for bad in ["", "v1", "v1...", "v2.1.2.3", &format!("{v}.x"), "v1.x.y.z"] {
            assert_eq!(k.verify_cookie(bad, now), None, "{bad}");
        }
    }

    #[test]
    fn csrf_tokens_belong_to_one_sign_in() {
        let k = keys();
        let a = SignIn {
            id: [1; 16],
            expires: 10,
        };
        let b = SignIn {
            id: [2; 16],
            expires: 10,
        };
        let t = k.csrf(&a);
        assert!(k.csrf_matches(&a, Some(&t)));
        assert!(!k.csrf_matches(&b, Some(&t)));
        assert!(!k.csrf_matches(&a, None));
        assert!(!k.csrf_matches(&a, Some("")));
        assert!(!Keys::new("other").csrf_matches(&a, Some(&t)));
        // Not the cookie's MAC under another name.
        assert!(!k.cookie_value(&a).contains(&t));
    }

    #[test]
    fn typed_tokens_are_compared_whole() {
        let k = keys();
        assert!(k.token_matches("the-admin-token"));
        assert!(k.token_matches("  the-admin-token\n"));
        assert!(!k.token_matches("the-admin-toke"));
        assert!(!k.token_matches(""));
    }

    #[test]
    fn flashes_belong_to_one_sign_in() {
        let k = keys();
        let s = SignIn {
            id: [3; 16],
            expires: 10,
        };
        let v = k.flash_value(&s, "refreshed|0|s_1");
        assert_eq!(k.verify_flash(&s, &v).as_deref(), Some("refreshed|0|s_1"));
        let other = SignIn { id: [4; 16], ..s };
        assert_eq!(k.verify_flash(&other, &v), None);
        assert_eq!(Keys::new("other").verify_flash(&s, &v), None);
        let (payload, mac) = v.split_once('.').expect("two parts");
        let forged = format!("{}.{mac}", URL_SAFE_NO_PAD.encode("revoked|0|s_1"));
        assert_ne!(payload, URL_SAFE_NO_PAD.encode("revoked|0|s_1"));
        assert_eq!(k.verify_flash(&s, &forged), None);
    }
}
