//! A session's keys, as the control plane changes them (`session key
//! add|list|revoke`, the admin API, the dashboard): each change with its
//! audit row and change-log entry in one store transaction, and the caches
//! told here at once (an added key's absence forgotten, a revoked key's
//! cached copy dropped); other processes follow the change log.

use serde::Serialize;

use super::scope::{show_rate, ScopeAsked};
use super::{rfc3339, SessionError, Sessions};
use crate::audit::{self, Actor};
use crate::secrets::session::{new_key_id, SessionKey};
use crate::store::{self, KeyRecord};

/// A key just added: shown this once.
#[derive(Debug)]
pub struct KeyAdded {
    pub key_id: String,
    pub key: SessionKey,
}

/// A key as the control plane shows it: never the key.
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub key_id: String,
    pub label: Option<String>,
    /// The methods it may use, or null for any.
    pub methods: Option<Vec<String>>,
    /// Its path patterns, or null for any path.
    pub paths: Option<Vec<String>>,
    /// Its own rate (`100/1m`), or null.
    pub rate: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339, or null when it never expires.
    pub expires_at: Option<String>,
    /// RFC 3339, or null if no request has used it.
    pub last_used_at: Option<String>,
}

impl KeyInfo {
    /// The scope in one short text: `any` for a key without limits.
    pub fn scope_text(&self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = &self.methods {
            parts.push(m.join(","));
        }
        if let Some(p) = &self.paths {
            parts.push(p.join(","));
        }
        if let Some(r) = &self.rate {
            parts.push(r.clone());
        }
        if parts.is_empty() {
            "any".to_owned()
        } else {
            parts.join(" ")
        }
    }
}

impl Sessions {
    /// Adds a key to session `id` with `scope`; the key is returned this
    /// once. [`SessionError::NotFound`] when there is no such session.
    pub async fn add_key(
        &self,
        id: &str,
        label: Option<String>,
        scope: ScopeAsked,
        actor: Actor,
    ) -> Result<KeyAdded, SessionError> {
        let key = SessionKey::generate();
        let now = store::now();
        let expires_at = scope
            .expires_in
            .map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX)));
        let rec = KeyRecord {
            key_id: new_key_id(),
            session_id: id.to_owned(),
            key_hash: key.hash(),
            label,
            methods: scope.methods,
            paths: scope.paths,
            rate: scope.rate,
            expires_at,
            created_at: now,
            last_used_at: None,
        };
        let scoped = rec.methods.is_some()
            || rec.paths.is_some()
            || rec.rate.is_some()
            || rec.expires_at.is_some();
        let audit = self.audit(
            audit::kind::SESSION_KEY_ADDED,
            Some(id),
            actor,
            serde_json::json!({"key_id": rec.key_id, "label": rec.label, "scoped": scoped}),
        );
        if !self.store.insert_key(&rec, now, Some(&audit)).await? {
            return Err(SessionError::NotFound(id.to_owned()));
        }
        // The key works here at once, even if a lookup just found it absent.
        self.cache.forget_absent(&[rec.key_hash]);
        Ok(KeyAdded {
            key_id: rec.key_id,
            key,
        })
    }

    /// Session `id`'s keys, oldest first; `None` when there is no such session.
    pub async fn keys(&self, id: &str) -> Result<Option<Vec<KeyInfo>>, SessionError> {
        if self.store.session_by_id(id).await?.is_none() {
            return Ok(None);
        }
        let keys = self.store.list_keys(id).await?;
        Ok(Some(keys.iter().map(|k| self.key_shown(k)).collect()))
    }

    fn key_shown(&self, k: &KeyRecord) -> KeyInfo {
        let split = |s: &str| s.split(',').map(str::to_owned).collect::<Vec<_>>();
        let last = match (k.last_used_at, self.uses.last_of_key(&k.key_id)) {
            (Some(stored), Some(own)) => Some(stored.max(own)),
            (stored, own) => stored.or(own),
        };
        KeyInfo {
            key_id: k.key_id.clone(),
            label: k.label.clone(),
            methods: k.methods.as_deref().map(split),
            paths: k
                .paths
                .as_deref()
                .and_then(|p| serde_json::from_str(p).ok()),
            rate: k.rate.as_ref().map(show_rate),
            created_at: rfc3339(k.created_at),
            expires_at: k.expires_at.map(rfc3339),
            last_used_at: last.map(rfc3339),
        }
    }

    /// Revokes key `key_id` of session `id`: it stops working here at once
    /// and in other processes within one change-poll interval; the session
    /// and its other keys go on. `false` when there was no such key.
    pub async fn revoke_key(
        &self,
        id: &str,
        key_id: &str,
        actor: Actor,
    ) -> Result<bool, SessionError> {
        let audit = self.audit(
            audit::kind::SESSION_KEY_REVOKED,
            Some(id),
            actor,
            serde_json::json!({"key_id": key_id}),
        );
        let deleted = self
            .store
            .delete_key(id, key_id, store::now(), Some(&audit))
            .await?;
        self.cache.invalidate(id);
        self.rates.forget(key_id);
        Ok(deleted)
    }
}
