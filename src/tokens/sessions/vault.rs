//! Sealing a session's tokens on the way into the store and opening them on
//! the way out, under the sealing ring as this process knows it now (the
//! live ring follows `key rotate` and other processes' re-sealing).
//! Every sealed value is bound to its session and field (`aad`).

use std::sync::Arc;

use secrecy::SecretString;

use crate::secrets::live::LiveRing;
use crate::secrets::seal::{OpenError, Sealer};
use crate::store::{SealedTokens, SessionRecord};

/// The longest token lifetime believed: a provider (or a hostile token
/// endpoint) announcing more gets this, so `expires_at` stays a date that
/// can be shown (and compared) without overflow.
pub const MAX_LIFETIME_SECS: u64 = 10 * 366 * 24 * 3600;

/// Tokens handed to credproxy by an operator or a code exchange.
#[derive(Debug)]
pub struct NewTokens {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub expires_in: Option<u64>,
}

/// Associated data binding a sealed token to its session and field.
pub(crate) fn aad(id: &str, field: &str) -> Vec<u8> {
    format!("credproxy/{id}/{field}").into_bytes()
}

/// Seals and opens session tokens under the live ring.
pub struct Vault {
    /// The ring, followed as other processes change it.
    ring: Arc<LiveRing>,
}

impl Vault {
    pub fn new(ring: LiveRing) -> Vault {
        Vault {
            ring: Arc::new(ring),
        }
    }

    /// The sealing ring as this process knows it now.
    pub fn sealer(&self) -> Arc<Sealer> {
        self.ring.current()
    }

    /// The ring this process follows (see `secrets::live`).
    pub fn ring(&self) -> &Arc<LiveRing> {
        &self.ring
    }

    /// Makes sure the ring knows every key `rec`'s values are sealed under,
    /// reading it again if not (a value re-sealed by another process).
    pub async fn know_keys_of(&self, rec: &SessionRecord) {
        let mut sealed: Vec<&[u8]> = vec![&rec.access_token];
        sealed.extend(rec.refresh_token.as_deref());
        self.ring.know(&sealed).await;
    }

    /// The session's access token, opened.
    pub fn access_token(&self, rec: &SessionRecord) -> Result<SecretString, OpenError> {
        self.sealer()
            .open(&rec.access_token, &aad(&rec.id, "access"))
    }

    /// The session's refresh token, opened.
    pub fn refresh_token(&self, rec: &SessionRecord) -> Result<Option<SecretString>, OpenError> {
        rec.refresh_token
            .as_ref()
            .map(|sealed| self.sealer().open(sealed, &aad(&rec.id, "refresh")))
            .transpose()
    }

    /// Seals new tokens of session `id` obtained at `now`.
    pub fn seal(&self, id: &str, tokens: &NewTokens, now: i64) -> SealedTokens {
        // Seal under the primary of the key file as it is now, not as it
        // was at start-up (`key rotate` may have run since).
        self.ring.follow_file();
        let sealer = self.sealer();
        SealedTokens {
            access_token: sealer.seal(&tokens.access_token, &aad(id, "access")),
            refresh_token: tokens
                .refresh_token
                .as_ref()
                .map(|r| sealer.seal(r, &aad(id, "refresh"))),
            expires_at: tokens
                .expires_in
                .map(|s| now.saturating_add(s.min(MAX_LIFETIME_SECS) as i64)),
        }
    }

    /// Seals what a refresh returned; the old refresh token is kept when the
    /// provider sent no new one.
    pub fn seal_refreshed(
        &self,
        rec: &SessionRecord,
        tokens: &NewTokens,
        now: i64,
    ) -> SealedTokens {
        let mut sealed = self.seal(&rec.id, tokens, now);
        if sealed.refresh_token.is_none() {
            sealed.refresh_token = rec
                .refresh_token
                .as_ref()
                .map(|r| self.resealed(r, &aad(&rec.id, "refresh")));
        }
        sealed
    }

    /// What a refresh stores when the endpoint answered an access token
    /// that cannot be sent: the refresh token it rotated (or the old one),
    /// and the old access token marked as having expired just before this
    /// refresh, so it is refreshed again at its next use.
    pub fn seal_unusable(
        &self,
        rec: &SessionRecord,
        refresh_token: Option<&SecretString>,
        now: i64,
    ) -> SealedTokens {
        SealedTokens {
            access_token: self.resealed(&rec.access_token, &aad(&rec.id, "access")),
            refresh_token: refresh_token
                .map(|r| self.sealer().seal(r, &aad(&rec.id, "refresh")))
                .or_else(|| {
                    rec.refresh_token
                        .as_ref()
                        .map(|r| self.resealed(r, &aad(&rec.id, "refresh")))
                }),
            expires_at: Some(now - 1),
        }
    }

    /// A kept sealed value as it is written back: re-sealed under the
    /// primary key when it was sealed under another (or before key ids).
    fn resealed(&self, sealed: &[u8], aad: &[u8]) -> Vec<u8> {
        self.sealer()
            .reseal(sealed, aad)
            .unwrap_or_else(|| sealed.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeySource;
    use crate::secrets::seal::{seal_legacy, sealed_key_id};
    use crate::secrets::session::{KeyHash, Status};
    use secrecy::ExposeSecret;

    fn vault(dir: &std::path::Path) -> Vault {
        Vault::new(LiveRing::new(
            Sealer::from_key(&[3; 32]),
            KeySource::File(dir.join("absent.key")),
        ))
    }

    fn tokens(a: &str, r: Option<&str>) -> NewTokens {
        NewTokens {
            access_token: SecretString::from(a.to_owned()),
            refresh_token: r.map(|r| SecretString::from(r.to_owned())),
            expires_in: Some(60),
        }
    }

    /// A stored row holding `sealed`.
    fn record(id: &str, sealed: SealedTokens) -> SessionRecord {
        SessionRecord {
            id: id.to_owned(),
            key_hash: KeyHash::of(b"unit-vault-key"),
            provider: "spark".to_owned(),
            label: None,
            status: Status::Active,
            access_token: sealed.access_token,
            refresh_token: sealed.refresh_token,
            expires_at: sealed.expires_at,
            version: 1,
            created_at: 0,
            updated_at: 0,
            last_refresh_at: None,
            last_error: None,
            next_retry_at: None,
            last_used_at: None,
        }
    }

    #[test]
    fn a_refresh_without_a_new_refresh_token_keeps_the_old_one() {
        let dir = tempfile::tempdir().expect("dir");
        let v = vault(dir.path());
        let rec = record("s1", v.seal("s1", &tokens("a1", Some("r1")), 100));
        let rec2 = record("s1", v.seal_refreshed(&rec, &tokens("a2", None), 200));
        assert_eq!(v.access_token(&rec2).expect("open").expose_secret(), "a2");
        assert_eq!(
            v.refresh_token(&rec2)
                .expect("open")
                .expect("kept")
                .expose_secret(),
            "r1"
        );
        let rec3 = record("s1", v.seal_refreshed(&rec, &tokens("a3", Some("r3")), 300));
        assert_eq!(
            v.refresh_token(&rec3)
                .expect("open")
                .expect("new")
                .expose_secret(),
            "r3"
        );
        // Bound to its session: another id cannot open it.
        let mut moved = record("s2", v.seal("s1", &tokens("a1", None), 100));
        moved.id = "s2".to_owned();
        assert!(v.access_token(&moved).is_err());
    }

    #[test]
    fn tokens_sealed_before_key_ids_open_and_are_resealed_when_written() {
        let dir = tempfile::tempdir().expect("dir");
        let v = vault(dir.path());
        // As a row written before key ids existed holds them.
        let rec = record(
            "s1",
            SealedTokens {
                access_token: seal_legacy(&[3; 32], "a1", &aad("s1", "access")),
                refresh_token: Some(seal_legacy(&[3; 32], "r1", &aad("s1", "refresh"))),
                expires_at: Some(60),
            },
        );
        assert_eq!(
            v.refresh_token(&rec)
                .expect("open")
                .expect("kept")
                .expose_secret(),
            "r1"
        );
        let sealed = v.seal_refreshed(&rec, &tokens("a2", None), 100);
        let kept = sealed.refresh_token.clone().expect("kept");
        assert_eq!(sealed_key_id(&kept), Some(v.sealer().primary_id()));
        assert_eq!(
            sealed_key_id(&sealed.access_token),
            Some(v.sealer().primary_id())
        );
        let unusable = v.seal_unusable(&rec, None, 100);
        assert_eq!(unusable.expires_at, Some(99));
        assert!(v.sealer().is_current(&unusable.access_token));
        assert!(v
            .sealer()
            .is_current(unusable.refresh_token.as_deref().expect("kept")));
        let rec2 = record("s1", sealed);
        assert_eq!(
            v.refresh_token(&rec2)
                .expect("open")
                .expect("kept")
                .expose_secret(),
            "r1"
        );
    }
}
