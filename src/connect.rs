//! Connecting a provider account: the OAuth authorisation-code flows.
//!
//! `/connect/{provider}` makes a one-time `state` (256 random bits, stored
//! only as its hash, bound to the provider, valid 10 minutes, usable once)
//! and sends the person to the provider's authorisation page;
//! `/callback/{provider}` consumes the state, exchanges the code at the token
//! endpoint and stores the session. States live in the store, so instances
//! sharing it accept each other's callbacks and `credproxy connect` can
//! wait for a callback served by a running server.
//!
//! Spark uses the OpenID+OAuth 2 hybrid flow (the state travels in
//! `openid.return_to`'s own query), or plain OAuth 2 when `authorize_url`
//! ends in `/oauth2`; Zillow uses OAuth 2 (the state travels in `state`).
//! `redirect_uri` (without the state) is what the code exchange and every
//! refresh send.

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use url::Url;

use crate::config::ProviderConfig;
use crate::provider::ProviderKind;
use crate::refresh::Refresher;
use crate::session::KeyHash;
use crate::sessions::{NewTokens, SessionError, Sessions};
use crate::store::{self, OAuthOutcome, OAuthState, StoreError};
use crate::token::{Grant, TokenError};

/// How long a state may wait for its callback.
pub const STATE_TTL_SECS: i64 = 600;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no provider named `{0}` is configured")]
    UnknownProvider(String),
    #[error("providers.{0}.authorize_url is not configured")]
    NoAuthorizeUrl(String),
    #[error("provider `{provider}` uses the sessions of `{owner}` (sessions_from): connect `{owner}` instead")]
    SessionsFrom { provider: String, owner: String },
    #[error("the link is unknown, used or older than 10 minutes")]
    BadLink,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a callback did not store a session. Texts are safe to show: they
/// never carry a code, a token or a secret. They are written to follow a
/// colon (`credproxy connect` prints "the sign-in did not complete: ...");
/// the pages make sentences of them.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("this sign-in link is missing its state, or the state is unknown, already used or older than 10 minutes")]
    BadState,
    #[error("access was refused at the provider")]
    Refused,
    #[error("the provider sent no authorisation code")]
    NoCode,
    #[error("the token endpoint refused the code ({0})")]
    Rejected(String),
    /// The token endpoint failed: why, in a few words (`answered 500`, `timed out`).
    #[error("the code could not be exchanged at the token endpoint ({0})")]
    Exchange(String),
    #[error("the session could not be stored: {0}")]
    Store(String),
}

/// A state to put in an authorisation URL, and the hash that is stored.
pub struct NewState {
    pub state: SecretString,
    pub hash: [u8; 32],
}

pub fn new_state() -> NewState {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let state = URL_SAFE_NO_PAD.encode(bytes);
    NewState {
        hash: state_hash(&state),
        state: SecretString::from(state),
    }
}

pub fn state_hash(state: &str) -> [u8; 32] {
    Sha256::digest(state.as_bytes()).into()
}

/// What a completed callback stored.
#[derive(Debug)]
pub enum Connected {
    /// A new session; its key, shown once.
    New {
        id: String,
        key: crate::session::SessionKey,
    },
    /// A new session whose key `credproxy connect` holds (and prints).
    KeyWithCli { id: String },
    /// An existing session's tokens replaced; its key is unchanged.
    Reconnected { id: String },
}

pub struct Connector {
    refresher: Arc<Refresher>,
    /// Provider names in configuration order, for the start page.
    order: Vec<String>,
}

impl Connector {
    pub fn new(config: &crate::config::Config, refresher: Arc<Refresher>) -> Connector {
        Connector {
            refresher,
            order: config.providers.iter().map(|p| p.name.clone()).collect(),
        }
    }

    pub fn providers(&self) -> impl Iterator<Item = &ProviderConfig> {
        self.order
            .iter()
            .filter_map(|n| self.refresher.endpoint(n).map(|(p, _)| p))
    }

    fn sessions(&self) -> &Arc<Sessions> {
        self.refresher.sessions()
    }

    pub fn provider(&self, name: &str) -> Result<&ProviderConfig, ConnectError> {
        self.refresher
            .endpoint(name)
            .map(|(p, _)| p)
            .ok_or_else(|| ConnectError::UnknownProvider(name.to_owned()))
            .and_then(|p| match &p.sessions_from {
                Some(owner) => Err(ConnectError::SessionsFrom {
                    provider: name.to_owned(),
                    owner: owner.clone(),
                }),
                None => Ok(p),
            })
    }

    /// Starts a flow: stores a fresh state for `provider` (bound to a
    /// session to reconnect, or to a key chosen by the CLI).
    pub async fn begin(
        &self,
        provider: &str,
        session_id: Option<String>,
        key_hash: Option<KeyHash>,
    ) -> Result<NewState, ConnectError> {
        self.provider(provider)?;
        let state = new_state();
        let now = store::now();
        let store = self.sessions().store();
        store
            .insert_oauth_state(
                &state.hash,
                &OAuthState {
                    provider: provider.to_owned(),
                    session_id,
                    key_hash,
                    created_at: now,
                },
            )
            .await?;
        // Forget states nobody came back for, now and then.
        if rand::random::<u8>() < 8 {
            store.prune_oauth_states(now - 24 * 3600).await?;
        }
        Ok(state)
    }

    /// Checks a state made by `credproxy connect` before sending a person on with it.
    pub async fn check_link(&self, provider: &str, state: &str) -> Result<(), ConnectError> {
        let found = self
            .sessions()
            .store()
            .peek_oauth_state(&state_hash(state), store::now() - STATE_TTL_SECS)
            .await?;
        match found {
            Some(s) if s.provider == provider => Ok(()),
            _ => Err(ConnectError::BadLink),
        }
    }

    /// The provider's authorisation URL for `state`.
    pub fn authorize_url(&self, provider: &str, state: &SecretString) -> Result<Url, ConnectError> {
        authorize_url(self.provider(provider)?, state)
    }

    /// Completes a flow from the callback's query parameters. On failure,
    /// also says whether the flow was a plain one, which a person can simply
    /// start again from `/connect` (a reconnect or a CLI flow cannot).
    pub async fn complete(
        &self,
        provider: &str,
        query: &HashMap<String, String>,
    ) -> Result<Connected, (CallbackError, bool)> {
        let cfg = self
            .provider(provider)
            .map_err(|_| (CallbackError::BadState, true))?;
        let callback = read_callback(cfg.kind, query);
        let state = callback.state.ok_or((CallbackError::BadState, true))?;
        let hash = state_hash(&state);
        let store = self.sessions().store();
        let now = store::now();
        let pending = store
            .take_oauth_state(&hash, provider, now, now - STATE_TTL_SECS)
            .await
            .map_err(|e| (CallbackError::Store(e.to_string()), true))?
            .ok_or((CallbackError::BadState, true))?;
        let plain = pending.session_id.is_none() && pending.key_hash.is_none();
        let result = self.exchange(cfg, callback.answer, pending).await;
        let outcome = match &result {
            Ok(
                Connected::New { id, .. }
                | Connected::KeyWithCli { id }
                | Connected::Reconnected { id },
            ) => OAuthOutcome::Stored {
                session_id: id.clone(),
            },
            Err(e) => OAuthOutcome::Failed {
                reason: e.to_string(),
            },
        };
        if let Err(e) = store.finish_oauth_state(&hash, &outcome).await {
            tracing::warn!(error = %e, "cannot record how a connect flow ended");
        }
        result.map_err(|e| (e, plain))
    }

    async fn exchange(
        &self,
        cfg: &ProviderConfig,
        answer: Answer,
        pending: OAuthState,
    ) -> Result<Connected, CallbackError> {
        let code = match answer {
            Answer::Code(code) => code,
            Answer::Refused => return Err(CallbackError::Refused),
            Answer::Nothing => return Err(CallbackError::NoCode),
        };
        let (_, endpoint) = self
            .refresher
            .endpoint(&cfg.name)
            .ok_or(CallbackError::BadState)?;
        let answer = endpoint
            .grant(Grant::AuthorizationCode(&code))
            .await
            .map_err(|e| match e {
                TokenError::Rejected { code } => CallbackError::Rejected(code),
                TokenError::Failed(why) => CallbackError::Exchange(why),
            })?;
        let tokens = NewTokens {
            access_token: answer.access_token,
            refresh_token: answer.refresh_token,
            expires_in: answer.expires_in,
        };
        let sessions = self.sessions();
        let stored = |e: SessionError| CallbackError::Store(e.to_string());
        let label = Some(format!(
            "connected {}",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        ));
        let connected = match (pending.session_id, pending.key_hash) {
            (Some(id), _) => {
                sessions
                    .replace(&id, &cfg.name, tokens)
                    .await
                    .map_err(stored)?;
                Connected::Reconnected { id }
            }
            (None, Some(hash)) => {
                let (id, _) = sessions
                    .add_hashed(&cfg.name, tokens, label, hash)
                    .await
                    .map_err(stored)?;
                Connected::KeyWithCli { id }
            }
            (None, None) => {
                let added = sessions
                    .add(&cfg.name, tokens, label, None)
                    .await
                    .map_err(stored)?;
                Connected::New {
                    id: added.id,
                    key: added.key,
                }
            }
        };
        Ok(connected)
    }
}

/// Builds the provider's authorisation URL carrying `state`.
pub fn authorize_url(cfg: &ProviderConfig, state: &SecretString) -> Result<Url, ConnectError> {
    use secrecy::ExposeSecret;
    let mut url = cfg
        .authorize_url
        .clone()
        .ok_or_else(|| ConnectError::NoAuthorizeUrl(cfg.name.clone()))?;
    let state = state.expose_secret();
    let redirect = cfg.redirect_uri.as_str();
    match cfg.kind {
        ProviderKind::Spark if !url.path().trim_end_matches('/').ends_with("/oauth2") => {
            // OpenID carries no state parameter: it rides in return_to's query.
            let mut return_to = cfg.redirect_uri.clone();
            return_to.query_pairs_mut().append_pair("state", state);
            url.query_pairs_mut()
                .append_pair("openid.mode", "checkid_setup")
                .append_pair("openid.return_to", return_to.as_str())
                .append_pair("openid.spark.client_id", &cfg.client_id)
                .append_pair("openid.spark.combined_flow", "true");
        }
        ProviderKind::Spark | ProviderKind::Zillow => {
            url.query_pairs_mut()
                .append_pair("response_type", "code")
                .append_pair("client_id", &cfg.client_id)
                .append_pair("redirect_uri", redirect)
                .append_pair("state", state);
        }
    }
    Ok(url)
}

enum Answer {
    Code(SecretString),
    Refused,
    Nothing,
}

struct Callback {
    state: Option<String>,
    answer: Answer,
}

/// Reads a callback's query: the state, and the code or the refusal.
fn read_callback(kind: ProviderKind, query: &HashMap<String, String>) -> Callback {
    let get = |k: &str| query.get(k).filter(|v| !v.is_empty()).cloned();
    let refused =
        matches!(get("openid.mode").as_deref(), Some("cancel" | "error")) || get("error").is_some();
    let code = match kind {
        ProviderKind::Spark => get("openid.spark.code").or_else(|| get("code")),
        ProviderKind::Zillow => get("code"),
    };
    Callback {
        state: get("state"),
        answer: match (refused, code) {
            (true, _) => Answer::Refused,
            (false, Some(code)) => Answer::Code(SecretString::from(code)),
            (false, None) => Answer::Nothing,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(spark_authorize: &str) -> Config {
        let text = format!(
            r#"
            [server]
            public_url = "https://proxy.example/"
            [providers.spark]
            kind = "spark"
            api_base = "https://sparkapi.com"
            authorize_url = "{spark_authorize}"
            client_id = "cid"
            client_secret = "s"
            [providers.zillow]
            kind = "zillow"
            api_base = "https://rentalsapi.zillowgroup.com"
            authorize_url = "https://authv2.zillow.com/oauth/authorize"
            client_id = "zid"
            client_secret = "s"
            api_key = "k"
        "#
        );
        Config::parse(&text, std::path::Path::new("t"), |_| None).expect("config")
    }

    fn query(url: &Url) -> HashMap<String, String> {
        url.query_pairs().into_owned().collect()
    }

    #[test]
    fn spark_hybrid_carries_state_in_return_to() {
        let c = config("https://sparkplatform.com/openid");
        let s = new_state();
        let url = authorize_url(c.provider("spark").expect("spark"), &s.state).expect("url");
        let q = query(&url);
        assert_eq!(q["openid.mode"], "checkid_setup");
        assert_eq!(q["openid.spark.client_id"], "cid");
        assert_eq!(q["openid.spark.combined_flow"], "true");
        let return_to = Url::parse(&q["openid.return_to"]).expect("return_to");
        assert_eq!(return_to.path(), "/callback/spark");
        use secrecy::ExposeSecret;
        assert_eq!(query(&return_to)["state"], s.state.expose_secret());
    }

    #[test]
    fn spark_oauth2_and_zillow_use_plain_oauth2() {
        let c = config("https://sparkplatform.com/oauth2");
        let s = new_state();
        for name in ["spark", "zillow"] {
            let url = authorize_url(c.provider(name).expect("provider"), &s.state).expect("url");
            let q = query(&url);
            assert_eq!(q["response_type"], "code");
            assert_eq!(
                q["redirect_uri"],
                format!("https://proxy.example/callback/{name}")
            );
            assert!(q.contains_key("state") && q.contains_key("client_id"));
        }
    }

    #[test]
    fn callbacks_are_read_per_flow() {
        let q = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let cb = read_callback(
            ProviderKind::Spark,
            &q(&[
                ("state", "s"),
                ("openid.mode", "id_res"),
                ("openid.spark.code", "c"),
            ]),
        );
        assert!(matches!(cb.answer, Answer::Code(_)) && cb.state.as_deref() == Some("s"));
        let cb = read_callback(
            ProviderKind::Spark,
            &q(&[("state", "s"), ("openid.mode", "cancel")]),
        );
        assert!(matches!(cb.answer, Answer::Refused));
        let cb = read_callback(
            ProviderKind::Zillow,
            &q(&[("state", "s"), ("error", "access_denied")]),
        );
        assert!(matches!(cb.answer, Answer::Refused));
        let cb = read_callback(ProviderKind::Zillow, &q(&[("code", "c")]));
        assert!(cb.state.is_none());
        let cb = read_callback(ProviderKind::Zillow, &q(&[("state", "s")]));
        assert!(matches!(cb.answer, Answer::Nothing));
    }
}
