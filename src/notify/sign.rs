//! `X-Credproxy-Signature: t=UNIX_SECONDS,v1=HEX`, where HEX is
//! HMAC-SHA256(secret, `t + "." + body`): the receiver recomputes it over
//! the raw body and compares in constant time, and refuses old `t` values
//! to stop replays.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const SIGNATURE_HEADER: &str = "x-credproxy-signature";

/// The header value for `body` sent at `t`.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", hex(&mac(secret, t, body)))
}

fn mac(secret: &[u8], t: i64, body: &[u8]) -> [u8; 32] {
    // HMAC takes a key of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Checks a signature header as a receiver would: the `v1` MAC over
/// `t.body`, compared in constant time, and `t` within `tolerance_secs` of
/// `now`. Used by the tests' receiver and shown in docs/events.md.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now: i64, tolerance_secs: i64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = Some(v),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    if (now - t).abs() > tolerance_secs {
        return false;
    }
    let expected = hex(&mac(secret, t, body));
    use subtle::ConstantTimeEq;
    expected.as_bytes().ct_eq(v1.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer() {
        // echo -n '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec
        let s = signature(b"whsec", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(
            s,
            "t=1700000000,v1=8ad37ba156048ae0e0a5533c75cdf26fee88b07f93cb57ee4c80adb053012032"
        );
        assert!(verify(b"whsec", &s, br#"{"a":1}"#, 1_700_000_010, 300));
    }

    #[test]
    fn tampering_is_caught() {
        let s = signature(b"whsec", 1_700_000_000, b"{}");
        assert!(!verify(b"other", &s, b"{}", 1_700_000_000, 300));
        assert!(!verify(b"whsec", &s, b"{ }", 1_700_000_000, 300));
        assert!(!verify(b"whsec", &s, b"{}", 1_700_001_000, 300), "too old");
        let relabelled = s.replace("t=1700000000", "t=1700000001");
        assert!(!verify(b"whsec", &relabelled, b"{}", 1_700_000_000, 300));
        assert!(!verify(b"whsec", "garbage", b"{}", 1_700_000_000, 300));
    }
}
