//! A session as the hot path holds it: its credentials already in their
//! injected form, so a cached request does no store I/O and no decryption.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use crate::provider::Credentials;
use crate::secrets::session::Status;

/// A session ready for the hot path.
#[derive(Debug)]
pub struct ActiveSession {
    pub id: String,
    pub provider: String,
    pub status: Status,
    pub credentials: Credentials,
    pub expires_at: Option<i64>,
    pub version: i64,
    pub has_refresh_token: bool,
    /// Unix seconds this cached copy was last used; throttles [`super::Uses::note`].
    pub(super) last_used: AtomicI64,
    /// The session's request counter, shared by its cached copies (see
    /// [`super::RequestCounts`]).
    pub(super) requests: Arc<AtomicU64>,
}

impl ActiveSession {
    /// Whether the access token is within `margin` of its known expiry and
    /// can be refreshed. Tokens of unknown lifetime never are.
    pub fn due(&self, now: i64, margin: Duration) -> bool {
        self.has_refresh_token
            && self
                .expires_at
                .is_some_and(|at| now.saturating_add(margin.as_secs() as i64) >= at)
    }

    pub fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}
