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
//!
//! `/connect` is open to anyone who reaches the admin listener, so it is
//! limited: per client address (`server.connect_rate_limit`, 429 beyond it),
//! in the number of sign-ins pending at once (`server.connect_pending_limit`,
//! 503 beyond it), and states older than 10 minutes are forgotten by a timer
//! ([`Connector::run_pruning`]). A state made in a browser is bound to it:
//! the browser gets a random value in a cookie (`Path=/callback`), the state's
//! row keeps the value's hash, and a callback without the matching cookie is
//! refused like an unknown state (login CSRF). The one-time links of
//! `credproxy connect` and reconnects are meant to be opened elsewhere and
//! stay unbound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use url::Url;

use crate::config::Dialect;
use crate::config::{ConnectLimits, ProviderConfig};
use crate::provider::spark;
use crate::secrets::session::KeyHash;
use crate::store::{self, OAuthOutcome, OAuthState, StoreError};
use crate::tokens::endpoint::{Grant, TokenError};
use crate::tokens::refresh::Refresher;
use crate::tokens::sessions::{NewTokens, SessionError, Sessions};

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
    #[error("too many sign-ins are in progress")]
    TooManyPending,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a callback did not store a session. Texts are safe to show: they
/// never carry a code, a token or a secret. They are written to follow a
/// colon (`credproxy connect` prints "the sign-in did not complete: ...");
/// the pages make sentences of them.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("this sign-in link is missing its state, or the state is unknown, already used, older than 10 minutes or was started in another browser")]
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

/// The cookie that binds a state made in a browser to that browser. One
/// cookie per flow (its name comes from the state's hash), so sign-ins
/// begun in two tabs do not overwrite each other.
pub struct BrowserBinding {
    name: String,
    value: SecretString,
    secure: bool,
}

impl BrowserBinding {
    /// The `Set-Cookie` value that gives the browser the binding: readable
    /// only by credproxy's callback (`Path=/callback`, `HttpOnly`), sent on
    /// the top-level redirect back from the provider (`SameSite=Lax`, not
    /// `Strict`), for as long as the state is valid.
    pub fn set_cookie(&self) -> String {
        use secrecy::ExposeSecret;
        cookie_line(
            &self.name,
            self.value.expose_secret(),
            STATE_TTL_SECS,
            self.secure,
        )
    }
}

const BINDING_COOKIE: &str = "credproxy_flow_";

/// The name of the cookie that binds the state with hash `state_hash`.
fn binding_cookie_name(state_hash: &[u8; 32]) -> String {
    let mut name = String::from(BINDING_COOKIE);
    for b in &state_hash[..8] {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

/// What the state's row keeps of a binding cookie's value.
fn browser_hash(value: &str) -> [u8; 32] {
    Sha256::digest(value.as_bytes()).into()
}

fn cookie_line(name: &str, value: &str, max_age: i64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{name}={value}; Max-Age={max_age}; Path=/callback; HttpOnly; SameSite=Lax{secure}")
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim())
}

/// What one client's `/connect` requests count against: its address, an
/// IPv6 address by its /64, as for the proxy's cold lookups.
pub(crate) use crate::tokens::sessions::client_key;

/// Above this many clients in the rate limiter's map, a `/connect` first
/// forgets the quiet ones (the timer does it too), so the map stays small
/// even when many addresses take turns.
const MAX_TRACKED_CLIENTS: usize = 100_000;

/// What a completed callback stored.
#[derive(Debug)]
pub enum Connected {
    /// A new session; its key, shown once.
    New {
        id: String,
        key: crate::secrets::session::SessionKey,
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
    limits: ConnectLimits,
    /// `/connect` requests per client address; `None`: no limit.
    limiter: Option<governor::DefaultKeyedRateLimiter<IpAddr>>,
    /// Binding cookies are `Secure` when `public_url` is https.
    secure_cookies: bool,
}

impl Connector {
    pub fn new(config: &crate::config::Config, refresher: Arc<Refresher>) -> Connector {
        let limits = config.server.connect.clone();
        Connector {
            refresher,
            order: config.providers.iter().map(|p| p.name.clone()).collect(),
            limiter: NonZeroU32::new(limits.rate_per_minute)
                .map(|n| governor::RateLimiter::keyed(governor::Quota::per_minute(n))),
            limits,
            secure_cookies: config.server.public_url.scheme() == "https",
        }
    }

    /// Counts a `/connect` request from `peer` against its rate limit:
    /// `Err` with how long until the next one is admitted when it is over.
    pub fn admit(&self, peer: IpAddr) -> Result<(), Duration> {
        use governor::clock::Clock;
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if limiter.len() > MAX_TRACKED_CLIENTS {
            limiter.retain_recent();
        }
        limiter
            .check_key(&client_key(peer))
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// Forgets states older than 10 minutes (those whose flow ended within
    /// the last 10 minutes stay, for `credproxy connect` to read) and the
    /// rate limiter's entries of clients that went quiet; returns how many
    /// states it forgot.
    pub async fn prune(&self) -> Result<u64, StoreError> {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        self.sessions()
            .store()
            .prune_oauth_states(store::now() - STATE_TTL_SECS)
            .await
    }

    /// Runs [`Connector::prune`] now and then every
    /// `server.connect.prune_interval`, until `stop` completes.
    pub async fn run_pruning(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.limits.prune_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = tick.tick() => {}
            }
            match self.prune().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(forgotten = n, "connect: forgot expired sign-in states"),
                Err(e) => {
                    tracing::warn!(error = %e, "connect: cannot forget expired sign-in states")
                }
            }
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
        Ok(state)
    }

    /// Starts a flow in a browser: stores a fresh state for `provider`,
    /// bound to a new cookie value for that browser, unless
    /// `server.connect_pending_limit` sign-ins are already in progress
    /// ([`ConnectError::TooManyPending`]: nothing is stored).
    pub async fn begin_in_browser(
        &self,
        provider: &str,
    ) -> Result<(NewState, BrowserBinding), ConnectError> {
        use secrecy::ExposeSecret;
        self.provider(provider)?;
        let state = new_state();
        let mut value = [0u8; 32];
        rand::rng().fill_bytes(&mut value);
        let binding = BrowserBinding {
            name: binding_cookie_name(&state.hash),
            value: SecretString::from(URL_SAFE_NO_PAD.encode(value)),
            secure: self.secure_cookies,
        };
        let now = store::now();
        let stored = self
            .sessions()
            .store()
            .insert_browser_oauth_state(
                &state.hash,
                &OAuthState {
                    provider: provider.to_owned(),
                    session_id: None,
                    key_hash: None,
                    created_at: now,
                },
                &browser_hash(binding.value.expose_secret()),
                now - STATE_TTL_SECS,
                self.limits.max_pending,
            )
            .await?;
        match stored {
            true => Ok((state, binding)),
            false => Err(ConnectError::TooManyPending),
        }
    }

    /// The `Set-Cookie` value that removes the binding cookie of the
    /// callback's state, when the request carries one.
    pub fn clear_binding(
        &self,
        query: &HashMap<String, String>,
        headers: &http::HeaderMap,
    ) -> Option<String> {
        let state = query.get("state")?;
        let name = binding_cookie_name(&state_hash(state));
        cookie(headers, &name)?;
        Some(cookie_line(&name, "", 0, self.secure_cookies))
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
    ///
    /// A state bound to a browser is taken only with its cookie in `headers`;
    /// without it the state is left as it was, for the right browser.
    pub async fn complete(
        &self,
        provider: &str,
        query: &HashMap<String, String>,
        headers: &http::HeaderMap,
    ) -> Result<Connected, (CallbackError, bool)> {
        let cfg = self
            .provider(provider)
            .map_err(|_| (CallbackError::BadState, true))?;
        let callback = read_callback(cfg.description.dialect, query);
        let state = callback.state.ok_or((CallbackError::BadState, true))?;
        let hash = state_hash(&state);
        let browser = cookie(headers, &binding_cookie_name(&hash)).map(browser_hash);
        let store = self.sessions().store();
        let now = store::now();
        let pending = store
            .take_oauth_state_from_browser(
                &hash,
                provider,
                browser.as_ref(),
                now,
                now - STATE_TTL_SECS,
            )
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
                TokenError::Failed { reason, .. } => CallbackError::Exchange(reason),
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
                    .replace(&id, &cfg.name, tokens, crate::audit::Actor::Connect)
                    .await
                    .map_err(stored)?;
                Connected::Reconnected { id }
            }
            (None, Some(hash)) => {
                let (id, _) = sessions
                    .add_hashed(&cfg.name, tokens, label, hash, crate::audit::Actor::Connect)
                    .await
                    .map_err(stored)?;
                Connected::KeyWithCli { id }
            }
            (None, None) => {
                let added = sessions
                    .add(&cfg.name, tokens, label, None, crate::audit::Actor::Connect)
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
    let d = &cfg.description;
    if d.dialect == Dialect::Spark && spark::is_openid(&url) {
        spark::openid_authorize(&mut url, &cfg.redirect_uri, &cfg.client_id, state);
        return Ok(url);
    }
    let mut query = url.query_pairs_mut();
    query
        .append_pair("response_type", "code")
        .append_pair("client_id", &cfg.client_id)
        .append_pair("redirect_uri", cfg.redirect_uri.as_str());
    if !d.scopes.is_empty() {
        // RFC 6749 §3.3: space-delimited.
        query.append_pair("scope", &d.scopes.join(" "));
    }
    query.append_pair("state", state);
    drop(query);
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
fn read_callback(dialect: Dialect, query: &HashMap<String, String>) -> Callback {
    let get = |k: &str| query.get(k).filter(|v| !v.is_empty()).cloned();
    let refused =
        matches!(get("openid.mode").as_deref(), Some("cancel" | "error")) || get("error").is_some();
    let code = match dialect {
        Dialect::Spark => get(spark::OPENID_CODE).or_else(|| get("code")),
        Dialect::Plain => get("code"),
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
    fn clients_count_by_address_and_ipv6_by_its_64() {
        let key = |s: &str| client_key(s.parse().expect("ip"));
        assert_eq!(key("192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    #[test]
    fn the_rate_limit_admits_a_burst_then_says_how_long_to_wait() {
        let limiter = governor::RateLimiter::keyed(governor::Quota::per_minute(
            NonZeroU32::new(3).expect("3"),
        ));
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        for _ in 0..3 {
            assert!(limiter.check_key(&ip).is_ok());
        }
        use governor::clock::Clock;
        let wait = limiter
            .check_key(&ip)
            .expect_err("over")
            .wait_time_from(limiter.clock().now());
        assert!(
            wait > Duration::from_secs(15) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
    }

    #[test]
    fn binding_cookies_are_found_among_others() {
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            "a=1; credproxy_flow_ab=v=x ; b=2".parse().expect("v"),
        );
        h.append(http::header::COOKIE, "c=3".parse().expect("v"));
        assert_eq!(cookie(&h, "credproxy_flow_ab"), Some("v=x"));
        assert_eq!(cookie(&h, "c"), Some("3"));
        assert_eq!(cookie(&h, "credproxy_flow"), None);
        let name = binding_cookie_name(&[0xab; 32]);
        assert_eq!(name, "credproxy_flow_abababababababab");
        assert_eq!(
            cookie_line(&name, "v", 600, true),
            "credproxy_flow_abababababababab=v; Max-Age=600; Path=/callback; HttpOnly; SameSite=Lax; Secure"
        );
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
            Dialect::Spark,
            &q(&[
                ("state", "s"),
                ("openid.mode", "id_res"),
                ("openid.spark.code", "c"),
            ]),
        );
        assert!(matches!(cb.answer, Answer::Code(_)) && cb.state.as_deref() == Some("s"));
        let cb = read_callback(
            Dialect::Spark,
            &q(&[("state", "s"), ("openid.mode", "cancel")]),
        );
        assert!(matches!(cb.answer, Answer::Refused));
        let cb = read_callback(
            Dialect::Plain,
            &q(&[("state", "s"), ("error", "access_denied")]),
        );
        assert!(matches!(cb.answer, Answer::Refused));
        let cb = read_callback(Dialect::Plain, &q(&[("code", "c")]));
        assert!(cb.state.is_none());
        let cb = read_callback(Dialect::Plain, &q(&[("state", "s")]));
        assert!(matches!(cb.answer, Answer::Nothing));
    }
}
