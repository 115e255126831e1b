//! Changes to sessions made by this process (the CLI, the admin API, the
//! connect flows, the dashboard): add, replace, revoke, and the lists the
//! control plane shows. Each change is written with its event (with
//! `[notify]`) and its audit row in one store transaction, and then drops
//! what the caches hold about it (the cached copy, or the key's absence),
//! so it takes effect here at once.

use super::{rfc3339, Added, NewTokens, RevokedBy, SessionError, SessionInfo, Sessions};
use crate::audit::{self, Actor};
use crate::provider::UnusableToken;
use crate::secrets::session::{new_session_id, KeyHash, SessionKey};
use crate::store::{self, EventKind, NewSession, SessionRecord};

impl Sessions {
    /// Stores a session for tokens obtained elsewhere. With a chosen `key`
    /// that already names a session of the same provider, that session's
    /// tokens are replaced and its id kept, so applications need no change.
    pub async fn add(
        &self,
        provider: &str,
        tokens: NewTokens,
        label: Option<String>,
        key: Option<SessionKey>,
        actor: Actor,
    ) -> Result<Added, SessionError> {
        let key = key.unwrap_or_else(SessionKey::generate);
        let (id, replaced) = self
            .add_hashed(provider, tokens, label, key.hash(), actor)
            .await?;
        Ok(Added {
            id,
            provider: provider.to_owned(),
            key,
            replaced,
        })
    }

    /// [`Sessions::add`] for a key known only by its hash (one chosen by
    /// `credproxy connect`, which shows the key itself). Returns the session
    /// id and whether an existing session's tokens were replaced.
    pub async fn add_hashed(
        &self,
        provider: &str,
        tokens: NewTokens,
        label: Option<String>,
        hash: KeyHash,
        actor: Actor,
    ) -> Result<(String, bool), SessionError> {
        self.check_tokens(provider, &tokens)?;
        let now = store::now();
        if let Some(existing) = self.store.session_by_key(&hash).await? {
            if existing.provider != provider {
                return Err(SessionError::KeyOfOtherProvider(existing.provider));
            }
            self.replace(&existing.id, provider, tokens, actor).await?;
            return Ok((existing.id, true));
        }
        let id = new_session_id();
        let sealed = self.vault.seal(&id, &tokens, now);
        let event = self.event(
            EventKind::Connected,
            &id,
            provider,
            serde_json::json!({"reconnected": false}),
        );
        // A connect flow connects an account; `session add` and the admin
        // API store tokens obtained elsewhere.
        let kind = match actor {
            Actor::Connect => audit::kind::SESSION_CONNECTED,
            _ => audit::kind::SESSION_CREATED,
        };
        let audit = self.audit(
            kind,
            Some(&id),
            actor,
            serde_json::json!({"provider": provider}),
        );
        self.store
            .insert_session(
                NewSession {
                    id: id.clone(),
                    provider: provider.to_owned(),
                    label,
                    key_hash: hash,
                    tokens: sealed,
                    now,
                },
                event.as_ref(),
                Some(&audit),
            )
            .await?;
        // The key works here at once, even if a lookup just found it absent.
        self.cache.forget_absent(&[hash]);
        Ok((id, false))
    }

    /// Stores many new sessions of `provider` at once (seeding a large
    /// store): sealed as [`Sessions::add`] seals them, inserted in one
    /// transaction with one `session.created` audit row for the batch
    /// (`{"provider", "count"}`) and no events. Every key must be new
    /// ([`crate::store::StoreError::DuplicateKey`] and nothing written otherwise).
    /// Returns the new sessions' ids, in order.
    pub async fn add_many(
        &self,
        provider: &str,
        batch: Vec<(KeyHash, NewTokens)>,
        actor: Actor,
    ) -> Result<Vec<String>, SessionError> {
        let now = store::now();
        let mut rows = Vec::with_capacity(batch.len());
        for (hash, tokens) in batch {
            self.check_tokens(provider, &tokens)?;
            let id = new_session_id();
            let sealed = self.vault.seal(&id, &tokens, now);
            rows.push(NewSession {
                id,
                provider: provider.to_owned(),
                label: None,
                key_hash: hash,
                tokens: sealed,
                now,
            });
        }
        let audit = self.audit(
            audit::kind::SESSION_CREATED,
            None,
            actor,
            serde_json::json!({"provider": provider, "count": rows.len()}),
        );
        self.store.insert_sessions(&rows, Some(&audit)).await?;
        let hashes: Vec<KeyHash> = rows.iter().map(|r| r.key_hash).collect();
        self.cache.forget_absent(&hashes);
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// Replaces the tokens of session `id` (a reconnect, or `add --key`),
    /// keeping its key, and makes it active again: a `session.connected`
    /// event with `reconnected: true`.
    pub async fn replace(
        &self,
        id: &str,
        provider: &str,
        tokens: NewTokens,
        actor: Actor,
    ) -> Result<(), SessionError> {
        self.check_tokens(provider, &tokens)?;
        let existing = self
            .store
            .session_by_id(id)
            .await?
            .ok_or_else(|| SessionError::NotFound(id.to_owned()))?;
        if existing.provider != provider {
            return Err(SessionError::KeyOfOtherProvider(existing.provider));
        }
        let now = store::now();
        let sealed = self.vault.seal(id, &tokens, now);
        let event = self.event(
            EventKind::Connected,
            id,
            provider,
            serde_json::json!({"reconnected": true}),
        );
        let audit = self.audit(
            audit::kind::SESSION_RECONNECTED,
            Some(id),
            actor,
            serde_json::json!({"provider": provider}),
        );
        self.store
            .replace_tokens(id, sealed, None, now, event.as_ref(), Some(&audit))
            .await?
            .ok_or_else(|| SessionError::NotFound(id.to_owned()))?;
        self.cache.invalidate(id);
        Ok(())
    }

    fn check_tokens(&self, provider: &str, tokens: &NewTokens) -> Result<(), SessionError> {
        use secrecy::ExposeSecret;
        let provider_cfg = self
            .providers
            .get(provider)
            .ok_or_else(|| SessionError::UnknownProvider(provider.to_owned()))?;
        if let Some(owner) = &provider_cfg.sessions_from {
            return Err(SessionError::SessionsFrom {
                provider: provider.to_owned(),
                owner: owner.clone(),
            });
        }
        if tokens.access_token.expose_secret().is_empty() {
            return Err(SessionError::EmptyToken);
        }
        if provider_cfg.description.scheme == crate::config::Scheme::Static
            && (tokens.refresh_token.is_some() || tokens.expires_in.is_some())
        {
            return Err(SessionError::StoredKey(provider.to_owned()));
        }
        // Spark's API-key sessions hold a key and its secret, every other
        // kind tokens: neither is taken for the other.
        let api_key =
            crate::provider::spark::api_key::ApiKeyCredentials::read(&tokens.access_token);
        let wants_api_key = provider_cfg.description.scheme == crate::config::Scheme::SparkApiKey;
        if api_key.is_some() != wants_api_key {
            return Err(SessionError::WrongCredential {
                provider: provider.to_owned(),
                wanted: if wants_api_key {
                    "an API key and its secret (--api-key, --api-secret-env)"
                } else {
                    "tokens (--access-token), not an API key"
                },
            });
        }
        // Refuse tokens that could never be injected, now rather than per
        // request: the same rule as for a token endpoint's answer.
        if !crate::tokens::endpoint::usable_access_token(provider_cfg, &tokens.access_token) {
            return Err(UnusableToken.into());
        }
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<SessionInfo>, SessionError> {
        Ok(self
            .store
            .list_sessions()
            .await?
            .iter()
            .map(|r| self.shown(r))
            .collect())
    }

    pub async fn info(&self, id: &str) -> Result<Option<SessionInfo>, SessionError> {
        Ok(self
            .store
            .session_by_id(id)
            .await?
            .as_ref()
            .map(|r| self.shown(r)))
    }

    /// A session as the control plane shows it: the store's row, with this
    /// process's own last use when it is newer than the stored one (the
    /// store's is written every `use_flush_interval`; the process that
    /// served a request shows it at once).
    fn shown(&self, rec: &SessionRecord) -> SessionInfo {
        let mut info = SessionInfo::from(rec);
        if let Some(own) = self.uses.last(&rec.id) {
            if rec.last_used_at.is_none_or(|stored| own > stored) {
                info.last_used_at = Some(rfc3339(own));
            }
        }
        info
    }

    /// Deletes a session; its key stops working here at once and in other
    /// processes within one change-poll interval. With `[notify]`, a
    /// `session.revoked` event says who did (`by`).
    pub async fn revoke_by(&self, id: &str, by: RevokedBy) -> Result<bool, SessionError> {
        let event = match self.notify {
            true => match self.store.session_by_id(id).await? {
                Some(rec) => self.event(
                    EventKind::Revoked,
                    id,
                    &rec.provider,
                    serde_json::json!({"by": by.as_str()}),
                ),
                None => return Ok(false),
            },
            false => None,
        };
        let actor = match by {
            RevokedBy::Cli => Actor::Cli,
            RevokedBy::Admin => Actor::Admin,
            RevokedBy::Ui => Actor::Ui,
        };
        let audit = self.audit(
            audit::kind::SESSION_REVOKED,
            Some(id),
            actor,
            serde_json::json!({}),
        );
        let deleted = self
            .store
            .delete_session(id, store::now(), event.as_ref(), Some(&audit))
            .await?;
        self.cache.invalidate(id);
        Ok(deleted)
    }

    /// [`Sessions::revoke_by`] with [`RevokedBy::Admin`]: the admin API's
    /// `DELETE /admin/sessions/{id}`.
    pub async fn revoke(&self, id: &str) -> Result<bool, SessionError> {
        self.revoke_by(id, RevokedBy::Admin).await
    }
}
