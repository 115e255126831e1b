//! The configuration file (`config.toml`), parsed and validated once at start-up.
//!
//! Parsing is two steps: serde reads the raw TOML into `Raw*` structs with
//! `deny_unknown_fields`, so a typo names its key; `validate` then resolves
//! secrets from the environment, parses URLs and addresses, and applies
//! defaults. Everything after start-up works on the validated [`Config`] and
//! can no longer fail on configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

mod keys;
mod provider;
pub use keys::{known_keys, PROVIDER_NAME};
pub use provider::{
    fold_name, header_case, preset, presets_table, ClientAuth, Description, Dialect, GrantBody,
    JsonCode, Piece, Placeholder, ProviderKind, Scheme, Signal, Template,
};

/// Where the config file is looked for when `--config` is not given.
pub const DEFAULT_PATH: &str = "config.toml";

/// Environment variables that take precedence over the file's values, for
/// deployments (a container image) that share one config file: each names
/// the key it overrides. An empty value counts as unset. Paths in them are
/// relative to the working directory, as on a command line.
pub const ENV_OVERRIDES: [(&str, &str); 5] = [
    ("CREDPROXY_LISTEN", "server.listen"),
    ("CREDPROXY_ADMIN_LISTEN", "server.admin_listen"),
    ("CREDPROXY_STORE_URL", "store.url"),
    ("CREDPROXY_KEY_FILE", "store.key_file"),
    ("CREDPROXY_ROTATION_JOURNAL", "store.rotation_journal"),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The io error is part of the message, not a `source`: printed with
    /// its chain (`{:#}`), it would otherwise appear twice.
    #[error("cannot read {path}: {reason}")]
    Read {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    /// Several problems found in one pass (e.g. every missing secret), one per line.
    #[error("{}", join_lines(.0))]
    Several(Vec<ConfigError>),
}

fn join_lines(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// One error as itself, several as [`ConfigError::Several`].
    fn all(mut errors: Vec<ConfigError>) -> ConfigError {
        if errors.len() == 1 {
            if let Some(e) = errors.pop() {
                return e;
            }
        }
        ConfigError::Several(errors)
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A duration given either as a number of seconds (`30`, `0.5`) or as a
/// string with a unit (`"500ms"`, `"2s"`, `"1m"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Seconds(f64),
    Text(String),
}

impl RawDuration {
    fn resolve(self, key: &str) -> Result<Duration, ConfigError> {
        let secs = match self {
            RawDuration::Seconds(s) => s,
            RawDuration::Text(text) => {
                let t = text.trim();
                let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
                    (n, 0.001)
                } else if let Some(n) = t.strip_suffix('s') {
                    (n, 1.0)
                } else if let Some(n) = t.strip_suffix('m') {
                    (n, 60.0)
                } else if let Some(n) = t.strip_suffix('h') {
                    (n, 3600.0)
                } else {
                    (t, 1.0)
                };
                let n: f64 = num.trim().parse().map_err(|_| {
                    invalid(
                        key,
                        format!("`{text}` is not a duration (use seconds, or e.g. \"500ms\", \"2s\", \"1m\")"),
                    )
                })?;
                n * scale
            }
        };
        if !secs.is_finite() || secs < 0.0 {
            return Err(invalid(key, "must be a non-negative duration"));
        }
        Duration::try_from_secs_f64(secs).map_err(|_| invalid(key, "is too long"))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    notify: Option<RawNotify>,
    #[serde(default)]
    telemetry: RawTelemetry,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    otlp_endpoint: Option<String>,
    sample_ratio: Option<f64>,
    log_format: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    url: String,
    secret: Option<String>,
    secret_env: Option<String>,
    timeout: Option<RawDuration>,
    give_up_after: Option<RawDuration>,
    keep_given_up: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    public_url: Option<String>,
    connect_rate_limit: Option<u32>,
    connect_pending_limit: Option<u64>,
    proxy_url: Option<String>,
    session_header: Option<String>,
    shutdown_grace: Option<RawDuration>,
    header_read_timeout: Option<RawDuration>,
    write_timeout: Option<RawDuration>,
    body_read_timeout: Option<RawDuration>,
    max_header_bytes: Option<usize>,
    max_connections: Option<usize>,
    worker_threads: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<String>,
    key_file: Option<PathBuf>,
    key_env: Option<String>,
    key_command: Option<String>,
    key_reload_interval: Option<RawDuration>,
    invalidation_interval: Option<RawDuration>,
    use_flush_interval: Option<RawDuration>,
    session_cache_capacity: Option<u64>,
    cold_lookups_per_client: Option<u64>,
    over_budget_hold: Option<RawDuration>,
    rotation_journal: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    token: Option<String>,
    token_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    kind: ProviderKind,
    api_base: Option<String>,
    token_url: Option<String>,
    authorize_url: Option<String>,
    redirect_uri: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_secret_env: Option<String>,
    api_key: Option<String>,
    api_key_env: Option<String>,
    user_agent: Option<String>,
    listen: Option<String>,
    default_session: Option<String>,
    refresh_margin: Option<RawDuration>,
    connect_timeout: Option<RawDuration>,
    request_timeout: Option<RawDuration>,
    max_replay_body: Option<usize>,
    max_request_body: Option<u64>,
    ca_file: Option<PathBuf>,
    token_timeout: Option<RawDuration>,
    refresh_ahead: Option<bool>,
    refresh_backoff_max: Option<RawDuration>,
    min_refresh_interval: Option<RawDuration>,
    label: Option<String>,
    sessions_from: Option<String>,
    rate_limit: Option<RawRateLimit>,
    max_queue_wait: Option<RawDuration>,
    refresh_idle_after: Option<RawDuration>,
    scopes: Option<Vec<String>>,
    grant_body: Option<GrantBody>,
    client_auth: Option<ClientAuth>,
    inject: Option<provider::RawInject>,
    expired: Option<provider::RawSignal>,
    throttled: Option<provider::RawSignal>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    requests: i64,
    per: RawDuration,
}

/// The largest `rate_limit.requests`: the window keeps 16 bytes per request.
pub const MAX_BUDGET: u32 = 1_000_000;

/// `notify.keep_given_up` when unset: a week to look at, retry or clear
/// given-up events.
pub const DEFAULT_KEEP_GIVEN_UP: Duration = Duration::from_secs(7 * 86400);
/// The longest `notify.keep_given_up` (its seconds are subtracted from now).
const MAX_KEEP_GIVEN_UP: Duration = Duration::from_secs(3650 * 86400);

/// `[notify]`: where signed events about sessions are POSTed.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    pub url: Url,
    /// The HMAC-SHA256 key of `X-Credproxy-Signature`.
    pub secret: SecretString,
    /// Each delivery attempt must be answered within this (default 10 s).
    pub timeout: Duration,
    /// An event still undelivered this long after it happened is given up
    /// (a metric and a log line; `events list` shows it); default 24 h.
    pub give_up_after: Duration,
    /// A given-up event is deleted this long after it was given up (unless
    /// `events retry` put it back first); default 7 days.
    pub keep_given_up: Duration,
}

/// A provider's budget: at most `requests` in any window of `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
}

/// What a command needs of the configuration: every secret, or only the
/// store's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Every secret must resolve (`serve`, `check`).
    Everything,
    /// The store's settings (its URL and sealing key) must; a provider's or
    /// `[notify]`'s missing secret is kept aside, with a placeholder in its
    /// place, until [`Config::require_provider`] (or
    /// [`Config::require_everything`]) asks for it. For the commands that
    /// touch only the store: `session list`, `key list`, `audit`, ...
    Store,
}

/// A secret that did not resolve under [`Needs::Store`]: whose it is and
/// the problem, as [`Needs::Everything`] would have refused it.
#[derive(Debug, Clone)]
struct Unresolved {
    /// The provider it belongs to; `None`: `[notify]`'s.
    provider: Option<String>,
    key: String,
    message: String,
}

impl Unresolved {
    fn new(provider: Option<&str>, e: ConfigError) -> Unresolved {
        let (key, message) = match e {
            ConfigError::Invalid { key, message } => (key, message),
            other => (String::new(), other.to_string()),
        };
        Unresolved {
            provider: provider.map(str::to_owned),
            key,
            message,
        }
    }

    fn error(&self) -> ConfigError {
        invalid(self.key.clone(), self.message.clone())
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub admin: AdminConfig,
    /// Ordered by name, so listings and metrics are stable.
    pub providers: Vec<ProviderConfig>,
    /// `[notify]`, when configured.
    pub notify: Option<NotifyConfig>,
    /// `[telemetry]`: traces and the log's format.
    pub telemetry: crate::telemetry::Settings,
    /// Things worth telling the operator that do not stop start-up.
    pub warnings: Vec<String>,
    /// Secrets put aside under [`Needs::Store`] (always empty under
    /// [`Needs::Everything`]): their values are placeholders, never to be sent.
    unresolved: Vec<Unresolved>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub public_url: Url,
    /// Limits of `/connect`, which anyone who reaches the admin listener may open.
    pub connect: ConnectLimits,
    /// Base of the links credproxy rewrites in responses (`None`: `http://`
    /// plus the request's own `Host`). No trailing slash, no query.
    pub proxy_url: Option<Url>,
    pub session_header: http::HeaderName,
    /// How long in-flight requests may run on after SIGINT/SIGTERM.
    pub shutdown_grace: Duration,
    /// A client must send its whole request head within this time.
    pub header_read_timeout: Duration,
    /// A response that makes no progress for this long (the client does not
    /// read) closes its connection.
    pub write_timeout: Duration,
    /// A request body that makes no progress for this long gets 408 (or,
    /// once the response has started, its connection is closed).
    pub body_read_timeout: Duration,
    /// The largest request head accepted, counted as sent: request line,
    /// header lines and the blank line that ends them. Above it: 431.
    pub max_header_bytes: usize,
    /// Connections served at once per listener; further accepts wait.
    pub max_connections: usize,
    /// Proxy worker threads; `None`: `TOKIO_WORKER_THREADS` if set, else
    /// one per core. See [`ServerConfig::workers`].
    pub worker_threads: Option<usize>,
}

/// The most proxy workers `server.worker_threads` may ask for.
pub const MAX_WORKERS: usize = 1024;

impl ServerConfig {
    /// How many proxy workers `serve` runs: `server.worker_threads`, else
    /// `TOKIO_WORKER_THREADS` (a whole number above 0), else one per core.
    pub fn workers(&self) -> usize {
        self.worker_threads
            .or_else(|| {
                std::env::var("TOKIO_WORKER_THREADS")
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
                    .filter(|&n: &usize| n > 0)
                    .map(|n| n.min(MAX_WORKERS))
            })
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// Limits of `/connect` (the CLI's `credproxy connect` writes its states
/// itself and is not limited).
#[derive(Debug, Clone)]
pub struct ConnectLimits {
    /// `server.connect_rate_limit`: `/connect` requests a minute from one
    /// client address (an IPv6 address counts by its /64); 0: no limit.
    pub rate_per_minute: u32,
    /// `server.connect_pending_limit`: sign-ins begun in a browser and not
    /// yet back (unused states under 10 minutes old, all providers); a
    /// `/connect` beyond it answers 503.
    pub max_pending: u64,
    /// How often the server forgets states older than 10 minutes, and idle
    /// entries of the rate limiter.
    pub prune_interval: Duration,
}

impl Default for ConnectLimits {
    fn default() -> ConnectLimits {
        ConnectLimits {
            rate_per_minute: 30,
            max_pending: 10_000,
            prune_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// May carry a database password: shown only through `StoreConfig::shown_url`
    /// (in `store/`, which knows how to read a store URL).
    pub url: SecretString,
    pub key: KeySource,
    /// How often the server looks for sessions changed by another process.
    pub invalidation_interval: Duration,
    /// How often the sessions' last use is written to the store, in one
    /// batch (each session at most once per interval); default 60 s.
    pub use_flush_interval: Duration,
    /// How often a running server reads the ring again (a key file: only
    /// when it changed; `key_command`: runs it); default 60 s. A key id the
    /// ring does not know makes it read the ring at once.
    pub key_reload_interval: Duration,
    /// Sessions the hot-path cache holds at most (S3-FIFO eviction beyond);
    /// also the cap of the cache of unknown keys. Default 100,000.
    pub session_cache_capacity: usize,
    /// Store reads for keys not in the cache allowed per client address a
    /// second (a burst of as many); 0: no limit. Default 200.
    pub cold_lookups_per_client: u32,
    /// How long a request over its client's budget of cold lookups waits
    /// before its 429: a client flooding unknown keys gets one answer per
    /// connection per hold. Default 1 s; 0: none; at most 10 s.
    pub over_budget_hold: Duration,
    /// The rotation journal's directory (`tokens/journal.rs`); `None`: off
    /// (`rotation_journal = ""`, or an in-memory SQLite store). Default:
    /// beside a SQLite file (`credproxy.db-rotations`), else
    /// `credproxy.rotations` in the configuration's directory.
    pub rotation_journal: Option<PathBuf>,
}

/// Default of `store.session_cache_capacity`.
pub const DEFAULT_SESSION_CACHE_CAPACITY: usize = 100_000;
/// Bounds of `store.session_cache_capacity`.
pub const SESSION_CACHE_CAPACITY_BOUNDS: (u64, u64) = (100, 50_000_000);
/// Default of `store.cold_lookups_per_client`.
pub const DEFAULT_COLD_LOOKUPS_PER_CLIENT: u32 = 200;
/// Largest `store.cold_lookups_per_client`.
pub const MAX_COLD_LOOKUPS_PER_CLIENT: u64 = 1_000_000;

/// Where the ring of sealing keys comes from (formats: `seal.rs`).
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A file holding the ring (`ID:BASE64KEY` lines), or one key from
    /// before rings (base64 text, or 32 raw bytes); created 0600 if absent.
    File(PathBuf),
    /// An environment variable holding one base64 key, or `ID:BASE64KEY`
    /// entries (the first primary). Only the name is kept here.
    Env(String),
    /// A command (run by `sh -c` in the configuration's directory) whose
    /// standard output is the ring, in the key file's format.
    Command { command: String, dir: PathBuf },
}

impl KeySource {
    /// The configuration key that names this source, for messages.
    pub fn describe(&self) -> String {
        match self {
            KeySource::File(path) => format!("store.key_file {}", path.display()),
            KeySource::Env(var) => format!("store.key_env {var}"),
            KeySource::Command { .. } => "store.key_command".to_owned(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Without a token, every `/admin/*` route answers 404.
    pub token: Option<SecretString>,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// The table name, which is also the route prefix: `/{name}/...`.
    pub name: String,
    pub kind: ProviderKind,
    /// What the provider is: its scheme, injection, signals and grants
    /// (`kind`'s preset with the table's own keys over it).
    pub description: Description,
    pub api_base: Url,
    pub token_url: Option<Url>,
    pub authorize_url: Option<Url>,
    pub redirect_uri: Url,
    pub client_id: String,
    pub client_secret: SecretString,
    /// The key a template's `{api_key}` names (Zillow's `apiKey`).
    pub api_key: Option<SecretString>,
    pub user_agent: Option<http::HeaderValue>,
    pub listen: Option<SocketAddr>,
    pub default_session: Option<String>,
    pub refresh_margin: Duration,
    pub connect_timeout: Duration,
    /// Time from sending the request to the upstream's response head.
    pub request_timeout: Duration,
    /// Request bodies up to this size are kept so the request can be replayed.
    pub max_replay_body: usize,
    /// Request bodies above this size are refused with 413 (`None`: no limit).
    pub max_request_body: Option<u64>,
    /// Extra PEM roots trusted for this provider's upstream, besides webpki's.
    pub ca_file: Option<PathBuf>,
    /// A token endpoint call (refresh or code exchange) must finish within this.
    pub token_timeout: Duration,
    /// Refresh recently used sessions before they expire, in the background.
    pub refresh_ahead: bool,
    /// Upper bound of the back-off between failed refreshes of one session.
    pub refresh_backoff_max: Duration,
    /// What people see on the connect pages, e.g. "Spark API".
    pub label: String,
    /// After a refresh whose replay was refused again (the 401 is not about
    /// the token's age), later 401s within this long pass through as they are.
    pub min_refresh_interval: Duration,
    /// The provider whose sessions this one uses (`sessions_from`), e.g. a
    /// second host of the same API; `None`: its own sessions.
    pub sessions_from: Option<String>,
    /// `rate_limit`: the provider's budget for this client.
    pub rate_limit: Option<RateLimit>,
    /// How long a request may wait for budget before 429 `rate_limited`.
    pub max_queue_wait: Duration,
    /// `refresh_idle_after`: refresh sessions unused this long in the
    /// background, so their refresh tokens never lapse (off when `None`).
    pub refresh_idle_after: Option<Duration>,
}

impl Config {
    /// Reads and validates the file at `path`, with the process environment.
    /// Relative paths in it (`store.url`'s SQLite file, `store.key_file`,
    /// `ca_file`) are relative to the file's own directory, wherever
    /// credproxy is started from.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_for(path, Needs::Everything)
    }

    /// [`Config::load`] for a command that needs only what `needs` says.
    pub fn load_for(path: &Path, needs: Needs) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|reason| ConfigError::Read {
            path: path.to_owned(),
            reason,
        })?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        // The directory, not the file, is made canonical: a symlinked config
        // file (a mounted secret, say) still keeps its data next to where it
        // was named.
        let dir = std::fs::canonicalize(dir)
            .or_else(|_| std::path::absolute(dir))
            .unwrap_or_else(|_| dir.to_owned());
        Config::parse_for(&text, path, Some(&dir), needs, |name| {
            std::env::var(name).ok()
        })
    }

    /// Parses `text`; `env` looks up environment variables (a parameter so
    /// tests need not touch the process environment). Relative paths stay
    /// as they are, relative to the working directory.
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Config::parse_in(text, path, None, env)
    }

    /// [`Config::parse`], with relative paths made relative to `dir` when given.
    pub fn parse_in(
        text: &str,
        path: &Path,
        dir: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Config::parse_for(text, path, dir, Needs::Everything, env)
    }

    /// [`Config::parse_in`] for a command that needs only what `needs` says.
    pub fn parse_for(
        text: &str,
        path: &Path,
        dir: Option<&Path>,
        needs: Needs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_message(text, &e),
        })?;
        // Problems that do not stop validation (missing secrets) are
        // collected, so one run names them all.
        let mut problems = Vec::new();
        match validate(raw, &env, dir, needs, &mut problems) {
            Ok(config) if problems.is_empty() => Ok(config),
            Ok(_) => Err(ConfigError::all(problems)),
            Err(e) => {
                problems.push(e);
                Err(ConfigError::all(problems))
            }
        }
    }

    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.name == name)
    }

    /// Refuses, as [`Needs::Everything`] would have, when a secret that
    /// provider `name` calls its provider with was put aside: its own, or
    /// those of the provider it takes its sessions from. An unknown name
    /// passes (the caller says it is unknown).
    pub fn require_provider(&self, name: &str) -> Result<(), ConfigError> {
        let owner = self
            .provider(name)
            .map_or(name, ProviderConfig::session_owner);
        self.refuse(|u| {
            u.provider
                .as_deref()
                .is_some_and(|p| p == name || p == owner)
        })
    }

    /// Refuses, as [`Needs::Everything`] would have, when any secret was put aside.
    pub fn require_everything(&self) -> Result<(), ConfigError> {
        self.refuse(|_| true)
    }

    fn refuse(&self, which: impl Fn(&Unresolved) -> bool) -> Result<(), ConfigError> {
        let errors: Vec<ConfigError> = self
            .unresolved
            .iter()
            .filter(|u| which(u))
            .map(Unresolved::error)
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::all(errors))
        }
    }
}

impl ProviderConfig {
    /// The provider whose sessions this one serves: `sessions_from`, or itself.
    pub fn session_owner(&self) -> &str {
        self.sessions_from.as_deref().unwrap_or(&self.name)
    }
}

impl StoreConfig {
    /// The file of a SQLite store (its path made absolute when the config
    /// was loaded from a file); `None` for PostgreSQL or an in-memory store.
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        use secrecy::ExposeSecret;
        sqlite_file(self.url.expose_secret())
    }
}

/// A TOML error as "line N, key `k`: what is wrong". toml's own Display
/// quotes the whole offending line, which may hold an inline secret; serde's
/// "invalid type" messages quote the value, which may be one too.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let mut message = e.message().to_owned();
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some(at) = rest.find(", expected ") {
                message = format!("{}{}", prefix.trim_end_matches(": "), &rest[at..]);
            }
        }
    }
    let Some(span) = e.span() else { return message };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or_default();
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() => {
            format!("line {line_no}, key `{}`: {message}", key.trim())
        }
        _ => format!("line {line_no}: {message}"),
    }
}

fn addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("`{value}` is not an address (expected IP:PORT, e.g. 127.0.0.1:8080)"),
        )
    })
}

fn http_url(key: &str, value: &str) -> Result<Url, ConfigError> {
    let url =
        Url::parse(value).map_err(|e| invalid(key, format!("`{value}` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            key,
            format!("`{value}` must be an http:// or https:// URL"),
        ));
    }
    if url.host().is_none() {
        return Err(invalid(key, format!("`{value}` has no host")));
    }
    Ok(url)
}

/// A secret given inline (`name = "..."`) or by environment variable (`name_env = "VAR"`).
fn secret(
    key: &str,
    inline: Option<String>,
    env_name: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<SecretString>, ConfigError> {
    match (inline, env_name) {
        (Some(_), Some(_)) => Err(invalid(
            key,
            format!("give either `{key}` or `{key}_env`, not both"),
        )),
        (Some(v), None) if v.is_empty() => Err(invalid(key, "is empty")),
        (Some(v), None) => Ok(Some(SecretString::from(v))),
        (None, Some(var)) => match env(&var) {
            Some(v) if !v.is_empty() => Ok(Some(SecretString::from(v))),
            _ => Err(invalid(
                format!("{key}_env"),
                format!("environment variable {var} is not set or empty"),
            )),
        },
        (None, None) => Ok(None),
    }
}

/// The value of an [`ENV_OVERRIDES`] variable, if set and not empty, and the
/// key to name in messages about it.
fn env_override(
    env: &dyn Fn(&str) -> Option<String>,
    config_key: &str,
) -> Option<(String, String)> {
    let (var, _) = ENV_OVERRIDES.iter().find(|(_, k)| *k == config_key)?;
    let value = env(var).filter(|v| !v.is_empty())?;
    Some((value, format!("{var} (overrides {config_key})")))
}

/// `path` made relative to the config file's directory, when there is one.
fn relative_to(dir: Option<&Path>, path: PathBuf) -> PathBuf {
    match dir {
        Some(dir) if path.is_relative() => {
            let path = path.strip_prefix(".").unwrap_or(&path);
            dir.join(path)
        }
        _ => path,
    }
}

/// A `sqlite:` URL naming a relative file, made relative to `dir`; any
/// query (`?mode=...`) is kept. In-memory databases, absolute paths and
/// other stores are left alone.
/// The file a `sqlite:` URL names (already made absolute, see
/// [`sqlite_relative_to`]), or `None` for another store or an in-memory one.
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (file, query) = match rest.split_once('?') {
        Some((f, q)) => (f, Some(q)),
        None => (rest, None),
    };
    let in_memory = file.is_empty()
        || file == ":memory:"
        || query.is_some_and(|q| q.split('&').any(|kv| kv == "mode=memory"));
    if in_memory {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(file).decode_utf8_lossy();
    Some(PathBuf::from(&*decoded))
}

fn sqlite_relative_to(dir: &Path, url: &str) -> Result<String, ConfigError> {
    // The same prefixes sqlx strips.
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return Ok(url.to_owned());
    };
    let (file, query) = match rest.split_once('?') {
        Some((f, q)) => (f, Some(q)),
        None => (rest, None),
    };
    let in_memory = file.is_empty()
        || file == ":memory:"
        || query.is_some_and(|q| q.split('&').any(|kv| kv == "mode=memory"));
    let decoded = percent_encoding::percent_decode_str(file).decode_utf8_lossy();
    if in_memory || Path::new(&*decoded).is_absolute() {
        return Ok(url.to_owned());
    }
    let Some(dir) = dir.to_str() else {
        return Err(invalid(
            "store.url",
            "the config file's directory is not valid UTF-8, so a relative SQLite path cannot be resolved: give an absolute one (sqlite:///path/credproxy.db)",
        ));
    };
    // sqlx percent-decodes the file name: the directory must be encoded.
    const FILE_NAME: &percent_encoding::AsciiSet =
        &percent_encoding::CONTROLS.add(b'%').add(b'?').add(b'#');
    let dir = percent_encoding::utf8_percent_encode(dir.trim_end_matches('/'), FILE_NAME);
    let mut file = file;
    while let Some(f) = file.strip_prefix("./") {
        file = f;
    }
    Ok(match query {
        Some(q) => format!("sqlite://{dir}/{file}?{q}"),
        None => format!("sqlite://{dir}/{file}"),
    })
}

/// The address a person (or a provider's redirect) reaches a listener at:
/// a listener on every interface is reached on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// Validates `raw`. A missing secret goes into `problems` and validation goes
/// on (so that one run names every one); any other problem ends it. Under
/// [`Needs::Store`], a provider's or `[notify]`'s secret problems go into the
/// config's `unresolved` instead.
fn validate(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
    dir: Option<&Path>,
    needs: Needs,
    problems: &mut Vec<ConfigError>,
) -> Result<Config, ConfigError> {
    let s = raw.server;
    let listen = match env_override(env, "server.listen") {
        Some((value, key)) => addr(&key, &value)?,
        None => addr(
            "server.listen",
            s.listen.as_deref().unwrap_or("127.0.0.1:8080"),
        )?,
    };
    let admin_listen = match env_override(env, "server.admin_listen") {
        Some((value, key)) => addr(&key, &value)?,
        None => addr(
            "server.admin_listen",
            s.admin_listen.as_deref().unwrap_or("127.0.0.1:8081"),
        )?,
    };
    let public_url = match s.public_url {
        Some(u) => http_url("server.public_url", &u)?,
        None => http_url(
            "server.public_url",
            &format!("http://{}", reachable(admin_listen)),
        )?,
    };
    let proxy_url = s
        .proxy_url
        .map(|u| {
            let url = http_url("server.proxy_url", &u)?;
            if url.query().is_some() || url.fragment().is_some() {
                return Err(invalid(
                    "server.proxy_url",
                    "must not carry a query or fragment",
                ));
            }
            Ok(url)
        })
        .transpose()?;
    let header_name = s.session_header.as_deref().unwrap_or("X-Credproxy-Session");
    let session_header = http::HeaderName::from_bytes(header_name.as_bytes()).map_err(|_| {
        invalid(
            "server.session_header",
            format!("`{header_name}` is not a valid header name"),
        )
    })?;
    let dur = |v: Option<RawDuration>, key: &str, default: f64| -> Result<Duration, ConfigError> {
        v.map(|d| d.resolve(key))
            .unwrap_or(Ok(Duration::from_secs_f64(default)))
    };
    let connect = ConnectLimits {
        rate_per_minute: s
            .connect_rate_limit
            .unwrap_or(ConnectLimits::default().rate_per_minute),
        max_pending: s
            .connect_pending_limit
            .unwrap_or(ConnectLimits::default().max_pending),
        ..ConnectLimits::default()
    };
    if connect.max_pending == 0 {
        return Err(invalid(
            "server.connect_pending_limit",
            "must be at least 1",
        ));
    }
    let server = ServerConfig {
        listen,
        admin_listen,
        public_url,
        connect,
        proxy_url,
        session_header,
        shutdown_grace: dur(s.shutdown_grace, "server.shutdown_grace", 30.0)?,
        header_read_timeout: dur(s.header_read_timeout, "server.header_read_timeout", 10.0)?,
        write_timeout: dur(s.write_timeout, "server.write_timeout", 30.0)?,
        body_read_timeout: dur(s.body_read_timeout, "server.body_read_timeout", 30.0)?,
        max_header_bytes: s.max_header_bytes.unwrap_or(64 * 1024),
        max_connections: s.max_connections.unwrap_or(10_000),
        worker_threads: s.worker_threads,
    };
    if server.worker_threads == Some(0) {
        return Err(invalid("server.worker_threads", "must be at least 1"));
    }
    if server.worker_threads.is_some_and(|n| n > MAX_WORKERS) {
        return Err(invalid(
            "server.worker_threads",
            format!("must be at most {MAX_WORKERS}"),
        ));
    }
    if server.max_header_bytes < 8192 {
        return Err(invalid("server.max_header_bytes", "must be at least 8192"));
    }
    if server.max_connections == 0 {
        return Err(invalid("server.max_connections", "must be at least 1"));
    }
    if server.header_read_timeout.is_zero() {
        return Err(invalid("server.header_read_timeout", "must be above zero"));
    }
    if server.write_timeout.is_zero() {
        return Err(invalid("server.write_timeout", "must be above zero"));
    }
    if server.body_read_timeout.is_zero() {
        return Err(invalid("server.body_read_timeout", "must be above zero"));
    }

    let st = raw.store;
    let (url, url_key) = match env_override(env, "store.url") {
        Some((value, key)) => (value, key),
        None => {
            let url = st.url.unwrap_or_else(|| "sqlite://credproxy.db".to_owned());
            let url = match dir {
                Some(dir) => sqlite_relative_to(dir, &url)?,
                None => url,
            };
            (url, "store.url".to_owned())
        }
    };
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://"))
    {
        return Err(invalid(
            url_key,
            "must start with sqlite: (e.g. sqlite://credproxy.db) or postgres://",
        ));
    }
    let key = match (st.key_file, st.key_env, st.key_command) {
        (None, Some(var), None) => KeySource::Env(var),
        (Some(f), None, None) => KeySource::File(relative_to(dir, f)),
        (None, None, Some(command)) if command.trim().is_empty() => {
            return Err(invalid("store.key_command", "is empty"))
        }
        (None, None, Some(command)) => KeySource::Command {
            command,
            dir: dir.map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        },
        (None, None, None) => KeySource::File(relative_to(dir, PathBuf::from("credproxy.key"))),
        _ => {
            return Err(invalid(
                "store.key_file",
                "give one of `key_file`, `key_env` and `key_command`",
            ))
        }
    };
    let journal = env_override(env, "store.rotation_journal")
        .map(|(path, _)| PathBuf::from(path))
        .or(st.rotation_journal);
    let rotation_journal = match journal {
        Some(path) if path.as_os_str().is_empty() => None,
        Some(path) => Some(relative_to(dir, path)),
        None => match sqlite_file(&url) {
            Some(file) => {
                let mut name = file.into_os_string();
                name.push("-rotations");
                Some(PathBuf::from(name))
            }
            None if url.starts_with("sqlite:") => None,
            None => Some(relative_to(dir, PathBuf::from("credproxy.rotations"))),
        },
    };
    let key = match env_override(env, "store.key_file") {
        Some((file, _)) => KeySource::File(PathBuf::from(file)),
        None => key,
    };
    if let KeySource::Env(var) = &key {
        if env(var).is_none_or(|v| v.is_empty()) {
            problems.push(invalid(
                "store.key_env",
                format!("environment variable {var} is not set or empty"),
            ));
        }
    }
    let store = StoreConfig {
        url: SecretString::from(url),
        key,
        invalidation_interval: dur(st.invalidation_interval, "store.invalidation_interval", 0.5)?,
        use_flush_interval: dur(st.use_flush_interval, "store.use_flush_interval", 60.0)?,
        key_reload_interval: dur(st.key_reload_interval, "store.key_reload_interval", 60.0)?,
        session_cache_capacity: match st.session_cache_capacity {
            None => DEFAULT_SESSION_CACHE_CAPACITY,
            Some(n) => {
                let (lo, hi) = SESSION_CACHE_CAPACITY_BOUNDS;
                if !(lo..=hi).contains(&n) {
                    return Err(invalid(
                        "store.session_cache_capacity",
                        format!("must be between {lo} and {hi} sessions (got {n})"),
                    ));
                }
                n as usize
            }
        },
        cold_lookups_per_client: match st.cold_lookups_per_client {
            None => DEFAULT_COLD_LOOKUPS_PER_CLIENT,
            Some(n) if n > MAX_COLD_LOOKUPS_PER_CLIENT => {
                return Err(invalid(
                    "store.cold_lookups_per_client",
                    format!("must be at most {MAX_COLD_LOOKUPS_PER_CLIENT} a second, or 0 for no limit (got {n})"),
                ))
            }
            Some(n) => n as u32,
        },
        over_budget_hold: dur(st.over_budget_hold, "store.over_budget_hold", 1.0)?,
        rotation_journal,
    };
    if store.over_budget_hold > Duration::from_secs(10) {
        return Err(invalid(
            "store.over_budget_hold",
            "must be at most 10 seconds (0 answers at once)",
        ));
    }
    if store.key_reload_interval < Duration::from_secs(1)
        || store.key_reload_interval > Duration::from_secs(3600)
    {
        return Err(invalid(
            "store.key_reload_interval",
            "must be between 1 second and 1 hour",
        ));
    }
    if store.use_flush_interval < Duration::from_secs(1)
        || store.use_flush_interval > Duration::from_secs(3600)
    {
        return Err(invalid(
            "store.use_flush_interval",
            "must be between 1 second and 1 hour",
        ));
    }
    if store.invalidation_interval.is_zero() || store.invalidation_interval > Duration::from_secs(2)
    {
        return Err(invalid(
            "store.invalidation_interval",
            "must be above zero and at most 2 seconds (revocations must take effect within 2 s)",
        ));
    }

    // The admin token is optional by design: when its variable is unset the
    // admin API is off (404), which is worth a warning, not a refusal.
    let mut warnings = Vec::new();
    let admin_token = match (&raw.admin.token, &raw.admin.token_env) {
        (None, Some(var)) if env(var).is_none_or(|v| v.is_empty()) => {
            warnings.push(format!(
                "admin.token_env: environment variable {var} is not set; /admin/* is disabled (404)"
            ));
            None
        }
        _ => secret("admin.token", raw.admin.token, raw.admin.token_env, env).unwrap_or_else(|e| {
            problems.push(e);
            None
        }),
    };
    let admin = AdminConfig { token: admin_token };

    let mut providers = Vec::new();
    let mut ports = vec![
        ("server.listen".to_owned(), listen),
        ("server.admin_listen".to_owned(), admin_listen),
    ];
    // A provider's problems are all about its secrets: under Needs::Store
    // they are put aside for the commands that call that provider.
    let mut unresolved = Vec::new();
    for (name, p) in raw.providers {
        let mut secrets = Vec::new();
        let provider = validate_provider(&name, p, &server, env, dir, &mut ports, &mut secrets);
        match needs {
            Needs::Everything => problems.append(&mut secrets),
            Needs::Store => {
                unresolved.extend(secrets.into_iter().map(|e| Unresolved::new(Some(&name), e)))
            }
        }
        providers.push(provider?);
    }
    inherit_sessions(&mut providers)?;
    let notify = raw
        .notify
        .map(|n| -> Result<NotifyConfig, ConfigError> {
            let url = http_url("notify.url", &n.url)?;
            let secret = secret("notify.secret", n.secret, n.secret_env, env).and_then(|s| {
                s.ok_or_else(|| invalid("notify.secret", "is required (or notify.secret_env)"))
            });
            let secret = match (secret, needs) {
                (Ok(s), _) => s,
                (Err(e), Needs::Everything) => return Err(e),
                (Err(e), Needs::Store) => {
                    unresolved.push(Unresolved::new(None, e));
                    SecretString::from(String::new())
                }
            };
            let timeout = n
                .timeout
                .map(|d| d.resolve("notify.timeout"))
                .transpose()?
                .unwrap_or(Duration::from_secs(10));
            if timeout.is_zero() {
                return Err(invalid("notify.timeout", "must be above zero"));
            }
            let give_up_after = n
                .give_up_after
                .map(|d| d.resolve("notify.give_up_after"))
                .transpose()?
                .unwrap_or(Duration::from_secs(24 * 3600));
            if give_up_after.is_zero() {
                return Err(invalid("notify.give_up_after", "must be above zero"));
            }
            let keep_given_up = n
                .keep_given_up
                .map(|d| d.resolve("notify.keep_given_up"))
                .transpose()?
                .unwrap_or(DEFAULT_KEEP_GIVEN_UP);
            if keep_given_up < Duration::from_secs(1) {
                return Err(invalid("notify.keep_given_up", "must be at least 1 s"));
            }
            if keep_given_up > MAX_KEEP_GIVEN_UP {
                return Err(invalid("notify.keep_given_up", "must be at most 3650 days"));
            }
            Ok(NotifyConfig {
                url,
                secret,
                timeout,
                give_up_after,
                keep_given_up,
            })
        })
        .transpose()?;
    let telemetry = telemetry(raw.telemetry)?;
    // Two listeners on one address would fail at bind time with a vaguer message.
    for (i, (ka, a)) in ports.iter().enumerate() {
        for (kb, b) in &ports[i + 1..] {
            if a == b && a.port() != 0 {
                return Err(invalid(kb.clone(), format!("{b} is already used by {ka}")));
            }
        }
    }
    Ok(Config {
        server,
        store,
        admin,
        providers,
        notify,
        telemetry,
        warnings,
        unresolved,
    })
}

/// `[telemetry]`: traces off unless `otlp_endpoint` is set.
fn telemetry(t: RawTelemetry) -> Result<crate::telemetry::Settings, ConfigError> {
    use crate::telemetry::{LogFormat, Settings};
    let otlp_endpoint = t
        .otlp_endpoint
        .map(|u| http_url("telemetry.otlp_endpoint", &u).map(|u| u.to_string()))
        .transpose()?;
    let sample_ratio = t.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        return Err(invalid("telemetry.sample_ratio", "must be between 0 and 1"));
    }
    let log_format = match t.log_format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            return Err(invalid(
                "telemetry.log_format",
                format!("`{other}` is neither \"text\" nor \"json\""),
            ))
        }
    };
    Ok(Settings {
        otlp_endpoint,
        sample_ratio,
        log_format,
    })
}

#[allow(clippy::too_many_arguments)]
fn validate_provider(
    name: &str,
    p: RawProvider,
    server: &ServerConfig,
    env: &dyn Fn(&str) -> Option<String>,
    dir: Option<&Path>,
    ports: &mut Vec<(String, SocketAddr)>,
    problems: &mut Vec<ConfigError>,
) -> Result<ProviderConfig, ConfigError> {
    let key = |k: &str| format!("providers.{name}.{k}");
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(invalid(
            format!("providers.{name}"),
            "a provider's name is its route: use lowercase letters, digits, '-' and '_'",
        ));
    }
    let description = provider::describe(
        name,
        p.kind,
        provider::RawDescription {
            scopes: p.scopes,
            grant_body: p.grant_body,
            client_auth: p.client_auth,
            inject: p.inject,
            expired: p.expired,
            throttled: p.throttled,
        },
        Some(server.session_header.as_str()),
    )?;
    let public_url = &server.public_url;
    // A static key, and Spark's API keys (each session holds its own key
    // and secret), have no token endpoint, client or connect flow.
    let stored_key = matches!(description.scheme, Scheme::Static | Scheme::SparkApiKey);
    if stored_key {
        for (given, k) in [
            (p.token_url.is_some(), "token_url"),
            (p.authorize_url.is_some(), "authorize_url"),
            (
                p.client_secret.is_some() || p.client_secret_env.is_some(),
                "client_secret",
            ),
        ] {
            if given {
                return Err(invalid(
                    key(k),
                    format!(
                        "is not used by kind = \"{}\": its sessions hold their own keys",
                        p.kind
                    ),
                ));
            }
        }
    }
    // A provider that takes another's sessions also takes its client
    // credentials (filled in by `inherit_sessions`): they must not differ.
    let inherits = p.sessions_from.is_some();
    if inherits {
        for (given, k) in [
            (p.client_id.is_some(), "client_id"),
            (
                p.client_secret.is_some() || p.client_secret_env.is_some(),
                "client_secret",
            ),
            (p.api_key.is_some() || p.api_key_env.is_some(), "api_key"),
            (p.token_url.is_some(), "token_url"),
            (p.authorize_url.is_some(), "authorize_url"),
            (p.redirect_uri.is_some(), "redirect_uri"),
        ] {
            if given {
                return Err(invalid(
                    key(k),
                    "is taken from the provider named by sessions_from; remove it here",
                ));
            }
        }
    }
    let api_base = match (&p.api_base, p.kind.default_api_base()) {
        (Some(given), _) => http_url(&key("api_base"), given)?,
        (None, Some(home)) => http_url(&key("api_base"), home)?,
        (None, None) => return Err(invalid(key("api_base"), "is required")),
    };
    if api_base.query().is_some() || api_base.fragment().is_some() {
        return Err(invalid(
            key("api_base"),
            "must not carry a query or fragment",
        ));
    }
    let token_url = p
        .token_url
        .map(|u| http_url(&key("token_url"), &u))
        .transpose()?;
    let authorize_url = p
        .authorize_url
        .map(|u| http_url(&key("authorize_url"), &u))
        .transpose()?;
    let redirect_uri = match p.redirect_uri {
        Some(u) => http_url(&key("redirect_uri"), &u)?,
        None => {
            let base = public_url.as_str().trim_end_matches('/');
            http_url(&key("redirect_uri"), &format!("{base}/callback/{name}"))?
        }
    };
    let client_id = match p.client_id {
        Some(id) if !id.is_empty() => id,
        _ if inherits => String::new(),
        _ if stored_key && !description.uses(Placeholder::ClientId) => String::new(),
        _ => return Err(invalid(key("client_id"), "is required")),
    };
    // A missing secret is noted and validation goes on, so that one run
    // names every one (the placeholder is never used: the config is refused).
    let client_secret = match secret(
        &key("client_secret"),
        p.client_secret,
        p.client_secret_env,
        env,
    ) {
        Ok(Some(s)) => s,
        Ok(None) if inherits || stored_key => SecretString::from(String::new()),
        Ok(None) => {
            problems.push(invalid(
                key("client_secret"),
                "is required (or client_secret_env)",
            ));
            SecretString::from(String::new())
        }
        Err(e) => {
            problems.push(e);
            SecretString::from(String::new())
        }
    };
    let api_key_given = p.api_key.is_some() || p.api_key_env.is_some();
    let kind = p.kind;
    match description.uses(Placeholder::ApiKey) {
        true if !api_key_given && !inherits => problems.push(invalid(
            key("api_key"),
            format!(
                "is required for kind = \"{kind}\" (or api_key_env): a template names {{api_key}}"
            ),
        )),
        false if api_key_given => {
            return Err(invalid(
                key("api_key"),
                format!("is not used by kind = \"{kind}\": no template names {{api_key}}"),
            ))
        }
        _ => {}
    }
    let api_key = secret(&key("api_key"), p.api_key, p.api_key_env, env).unwrap_or_else(|e| {
        problems.push(e);
        None
    });
    let user_agent = p
        .user_agent
        .map(|ua| {
            http::HeaderValue::from_str(&ua)
                .map_err(|_| invalid(key("user_agent"), "must be printable ASCII"))
        })
        .transpose()?
        // Spark refuses an API-key session without one.
        .or_else(|| {
            (p.kind == ProviderKind::SparkApiKey).then(|| {
                http::HeaderValue::from_static(concat!("credproxy/", env!("CARGO_PKG_VERSION")))
            })
        });
    let listen = p.listen.map(|l| addr(&key("listen"), &l)).transpose()?;
    if let Some(l) = listen {
        ports.push((key("listen"), l));
    }
    let dur = |v: Option<RawDuration>, k: &str, default: f64| -> Result<Duration, ConfigError> {
        v.map(|d| d.resolve(&key(k)))
            .unwrap_or(Ok(Duration::from_secs_f64(default)))
    };
    let connect_timeout = dur(p.connect_timeout, "connect_timeout", 5.0)?;
    let request_timeout = dur(p.request_timeout, "request_timeout", 60.0)?;
    if connect_timeout.is_zero() {
        return Err(invalid(key("connect_timeout"), "must be above zero"));
    }
    if request_timeout.is_zero() {
        return Err(invalid(key("request_timeout"), "must be above zero"));
    }
    let token_timeout = dur(p.token_timeout, "token_timeout", 10.0)?;
    if token_timeout.is_zero() {
        return Err(invalid(key("token_timeout"), "must be above zero"));
    }
    let rate_limit = p
        .rate_limit
        .map(|r| -> Result<RateLimit, ConfigError> {
            let requests = u32::try_from(r.requests)
                .ok()
                .filter(|&n| (1..=MAX_BUDGET).contains(&n))
                .ok_or_else(|| {
                    invalid(
                        key("rate_limit.requests"),
                        format!("must be a whole number from 1 to {MAX_BUDGET} (the window keeps one time per request)"),
                    )
                })?;
            let per = r.per.resolve(&key("rate_limit.per"))?;
            if per.is_zero() || per > Duration::from_secs(7 * 86400) {
                return Err(invalid(
                    key("rate_limit.per"),
                    "must be above zero and at most 7 days",
                ));
            }
            Ok(RateLimit { requests, per })
        })
        .transpose()?;
    let max_queue_wait = dur(p.max_queue_wait, "max_queue_wait", 10.0)?;
    if max_queue_wait > Duration::from_secs(3600) {
        return Err(invalid(key("max_queue_wait"), "must be at most 1 hour"));
    }
    let ca_file = p.ca_file.map(|f| relative_to(dir, f));
    if let Some(f) = &ca_file {
        if !f.is_file() {
            return Err(invalid(
                key("ca_file"),
                format!("{} is not a readable file", f.display()),
            ));
        }
    }
    Ok(ProviderConfig {
        name: name.to_owned(),
        kind: p.kind,
        description,
        api_base,
        token_url,
        authorize_url,
        redirect_uri,
        client_id,
        client_secret,
        api_key,
        user_agent,
        listen,
        default_session: p.default_session,
        refresh_margin: dur(p.refresh_margin, "refresh_margin", 60.0)?,
        connect_timeout,
        request_timeout,
        max_replay_body: p.max_replay_body.unwrap_or(1024 * 1024),
        max_request_body: p.max_request_body,
        ca_file,
        token_timeout,
        refresh_ahead: p.refresh_ahead.unwrap_or(false),
        label: p.label.unwrap_or_else(|| match p.kind {
            ProviderKind::Spark => "Spark API".to_owned(),
            ProviderKind::Zillow => "Zillow Rental Feeds".to_owned(),
            ProviderKind::SparkApiKey => "Spark API (API key)".to_owned(),
            ProviderKind::OAuth2 | ProviderKind::Static => name.to_owned(),
        }),
        refresh_backoff_max: dur(p.refresh_backoff_max, "refresh_backoff_max", 60.0)?,
        min_refresh_interval: dur(p.min_refresh_interval, "min_refresh_interval", 30.0)?,
        sessions_from: p.sessions_from,
        rate_limit,
        max_queue_wait,
        refresh_idle_after: p
            .refresh_idle_after
            .map(|d| d.resolve(&key("refresh_idle_after")))
            .transpose()?
            .map(|d| {
                if d < Duration::from_secs(60) {
                    Err(invalid(
                        key("refresh_idle_after"),
                        "must be at least 1 minute",
                    ))
                } else {
                    Ok(d)
                }
            })
            .transpose()?,
    })
}

/// Resolves `sessions_from`: the named provider must exist, be of the same
/// kind and own its sessions (no chains); its client credentials, token
/// endpoint and user agent become this provider's, so that both inject and
/// refresh alike.
fn inherit_sessions(providers: &mut [ProviderConfig]) -> Result<(), ConfigError> {
    for i in 0..providers.len() {
        let Some(from) = providers[i].sessions_from.clone() else {
            continue;
        };
        let key = format!("providers.{}.sessions_from", providers[i].name);
        let Some(root) = providers.iter().find(|p| p.name == from).cloned() else {
            return Err(invalid(
                key,
                format!("no provider named `{from}` is configured"),
            ));
        };
        if root.name == providers[i].name {
            return Err(invalid(
                key,
                "a provider cannot take its sessions from itself",
            ));
        }
        if root.sessions_from.is_some() {
            return Err(invalid(
                key,
                format!("`{from}` takes its own sessions from another provider; name that one"),
            ));
        }
        if root.kind != providers[i].kind {
            return Err(invalid(
                key,
                format!("`{from}` is of another kind; sessions only carry over within one kind"),
            ));
        }
        let p = &mut providers[i];
        p.client_id = root.client_id;
        p.client_secret = root.client_secret;
        p.api_key = root.api_key;
        p.token_url = root.token_url;
        p.authorize_url = root.authorize_url;
        p.redirect_uri = root.redirect_uri;
        if p.user_agent.is_none() {
            p.user_agent = root.user_agent;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const GOOD: &str = r#"
        [server]
        listen = "127.0.0.1:0"
        admin_listen = "127.0.0.1:0"
        [store]
        url = "sqlite://x.db"
        [providers.spark]
        kind = "spark"
        api_base = "https://sparkapi.com"
        token_url = "https://sparkapi.com/v1/oauth2/grant"
        client_id = "cid"
        client_secret_env = "SPARK_SECRET"
        user_agent = "MyApp/1.0"
        [providers.zillow]
        kind = "zillow"
        api_base = "https://rentalsapi.zillowgroup.com"
        client_id = "zid"
        client_secret = "inline-secret"
        api_key_env = "ZKEY"
        request_timeout = "500ms"
    "#;

    fn env(name: &str) -> Option<String> {
        match name {
            "SPARK_SECRET" => Some("s3cret".into()),
            "ZKEY" => Some("apikey".into()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("config.toml"), env)
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.providers.len(), 2);
        let spark = c.provider("spark").expect("spark");
        assert_eq!(spark.client_secret.expose_secret(), "s3cret");
        assert_eq!(spark.refresh_margin, Duration::from_secs(60));
        assert_eq!(spark.max_replay_body, 1024 * 1024);
        assert_eq!(
            spark.redirect_uri.as_str(),
            "http://127.0.0.1:0/callback/spark"
        );
        let zillow = c.provider("zillow").expect("zillow");
        assert_eq!(zillow.request_timeout, Duration::from_millis(500));
        assert_eq!(c.server.session_header.as_str(), "x-credproxy-session");
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("must fail").to_string()
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&GOOD.replace("user_agent", "user_agnet"));
        assert!(e.contains("user_agnet"), "{e}");
        let e = err(&format!("{GOOD}\n[server2]\nx=1"));
        assert!(e.contains("server2"), "{e}");
    }

    #[test]
    fn missing_secret_is_named() {
        let e = err(&GOOD.replace("SPARK_SECRET", "NOPE"));
        assert!(
            e.contains("providers.spark.client_secret_env") && e.contains("NOPE"),
            "{e}"
        );
        let e = err(&GOOD.replace("api_key_env = \"ZKEY\"", ""));
        assert!(e.contains("providers.zillow.api_key"), "{e}");
    }

    #[test]
    fn store_commands_put_provider_secrets_aside() {
        let text = format!(
            "{}\n[providers.spark2]\nkind = \"spark\"\napi_base = \"https://replication.sparkapi.com\"\nsessions_from = \"spark\"\n[notify]\nurl = \"https://hooks.example\"\nsecret_env = \"NOTIFY_SECRET\"\n",
            GOOD.replace("api_key_env = \"ZKEY\"", "")
        );
        let none = |_: &str| None;
        let everything = Config::parse(&text, Path::new("c.toml"), none)
            .expect_err("every secret is missing")
            .to_string();
        let c = Config::parse_for(&text, Path::new("c.toml"), None, Needs::Store, none)
            .expect("the store's settings are enough");
        assert_eq!(c.providers.len(), 3);
        let spark = c
            .require_provider("spark")
            .expect_err("spark's")
            .to_string();
        assert!(spark.contains("SPARK_SECRET"), "{spark}");
        assert!(!spark.contains("zillow"), "{spark}");
        let spark2 = c
            .require_provider("spark2")
            .expect_err("the owner's")
            .to_string();
        assert_eq!(spark2, spark);
        let zillow = c
            .require_provider("zillow")
            .expect_err("zillow's")
            .to_string();
        assert!(zillow.contains("providers.zillow.api_key"), "{zillow}");
        assert!(c.require_provider("nope").is_ok());
        // Everything, as a full parse names it.
        let all = c.require_everything().expect_err("all").to_string();
        assert_eq!(all, everything);
        assert!(all.ends_with("NOTIFY_SECRET is not set or empty"), "{all}");
        // Nothing is put aside when everything resolves.
        let c =
            Config::parse_for(GOOD, Path::new("c.toml"), None, Needs::Store, env).expect("valid");
        assert!(c.require_everything().is_ok());
        // A missing store secret is still refused.
        let text = GOOD.replace("url = \"sqlite://x.db\"", "key_env = \"NO_KEY\"");
        let e = Config::parse_for(&text, Path::new("c.toml"), None, Needs::Store, env)
            .expect_err("the sealing key is the store's")
            .to_string();
        assert!(e.contains("store.key_env"), "{e}");
    }

    #[test]
    fn bad_url_and_address_are_named() {
        let e = err(&GOOD.replace("https://sparkapi.com\"", "sparkapi.com\""));
        assert!(e.contains("providers.spark.api_base"), "{e}");
        let e = err(&GOOD.replace("listen = \"127.0.0.1:0\"", "listen = \"localhost\""));
        assert!(e.contains("server.listen"), "{e}");
        let e = err(&GOOD.replace("\"500ms\"", "\"soon\""));
        assert!(e.contains("providers.zillow.request_timeout"), "{e}");
    }

    #[test]
    fn secrets_never_appear_in_debug() {
        let c = parse(GOOD).expect("valid");
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("s3cret") && !dbg.contains("inline-secret") && !dbg.contains("apikey")
        );
    }

    #[test]
    fn parse_errors_never_quote_a_value() {
        let e = err(&GOOD.replace(
            "client_secret = \"inline-secret\"",
            "client_secret = 12345678\nclient_secrett = \"also-secret\"",
        ));
        assert!(!e.contains("12345678") && !e.contains("also-secret"), "{e}");
        assert!(e.contains("line "), "{e}");
        let e = err(&GOOD.replace(
            "user_agent = \"MyApp/1.0\"",
            "user_agent = \"MyApp/1.0\"\nuser_agnet = \"x-secret\"",
        ));
        assert!(e.contains("user_agnet") && !e.contains("x-secret"), "{e}");
    }

    #[test]
    fn store_url_password_is_hidden() {
        let c = parse(&GOOD.replace("sqlite://x.db", "postgres://u:hunter2@db:5432/cp"))
            .expect("valid");
        assert_eq!(c.store.shown_url(), "postgres://db:5432/cp");
        assert!(!format!("{c:?}").contains("hunter2"));
        let c = parse(&GOOD.replace("sqlite://x.db", "postgres://u@db/cp?password=hunter2"))
            .expect("valid");
        assert_eq!(c.store.shown_url(), "postgres://db:5432/cp");
    }
    #[test]
    fn listener_timeouts_have_defaults_and_must_be_above_zero() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.server.write_timeout, Duration::from_secs(30));
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(30));
        let c = parse(&GOOD.replace(
            "[store]",
            "write_timeout = \"2s\"\nbody_read_timeout = 90\n[store]",
        ))
        .expect("valid");
        assert_eq!(c.server.write_timeout, Duration::from_secs(2));
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(90));
        for key in ["write_timeout", "body_read_timeout"] {
            let e = err(&GOOD.replace("[store]", &format!("{key} = 0\n[store]")));
            assert!(e.contains(&format!("server.{key}")), "{e}");
        }
    }

    #[test]
    fn rate_limits_are_read_and_checked() {
        let c = parse(GOOD).expect("valid");
        let spark = c.provider("spark").expect("spark");
        assert_eq!(spark.rate_limit, None);
        assert_eq!(spark.max_queue_wait, Duration::from_secs(10));
        let with = |extra: &str| {
            GOOD.replacen("kind = \"spark\"", &format!("kind = \"spark\"\n{extra}"), 1)
        };
        let c = parse(&with(
            "rate_limit = { requests = 1500, per = \"5m\" }\nmax_queue_wait = \"2s\"",
        ))
        .expect("valid");
        let spark = c.provider("spark").expect("spark");
        assert_eq!(
            spark.rate_limit,
            Some(RateLimit {
                requests: 1500,
                per: Duration::from_secs(300)
            })
        );
        assert_eq!(spark.max_queue_wait, Duration::from_secs(2));
        let e = err(&with("rate_limit = { requests = 0, per = \"5m\" }"));
        assert!(e.contains("providers.spark.rate_limit.requests"), "{e}");
        let e = err(&with("rate_limit = { requests = 1000001, per = \"1h\" }"));
        assert!(e.contains("providers.spark.rate_limit.requests"), "{e}");
        let e = err(&with("rate_limit = { requests = 10, per = 1e19 }"));
        assert!(e.contains("providers.spark.rate_limit.per"), "{e}");
        let e = err(&with("max_queue_wait = 1e30"));
        assert!(e.contains("providers.spark.max_queue_wait"), "{e}");
        let e = err(&with("rate_limit = { requests = 10, per = 0 }"));
        assert!(e.contains("providers.spark.rate_limit.per"), "{e}");
        let e = err(&with("rate_limit = { requests = 10, per = \"soon\" }"));
        assert!(e.contains("providers.spark.rate_limit.per"), "{e}");
        let e = err(&with("rate_limit = { requests = 10 }"));
        assert!(e.contains("per"), "{e}");
        let e = err(&with(
            "rate_limit = { requests = 10, per = \"1s\", burst = 3 }",
        ));
        assert!(e.contains("burst"), "{e}");
    }

    #[test]
    fn session_cache_keys_are_read_and_bounded() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.store.session_cache_capacity, 100_000);
        assert_eq!(c.store.cold_lookups_per_client, 200);
        let with = |k: &str, v: &str| GOOD.replacen("[store]", &format!("[store]\n{k} = {v}"), 1);
        let c = parse(&with("session_cache_capacity", "2500")).expect("valid");
        assert_eq!(c.store.session_cache_capacity, 2500);
        let c = parse(&with("cold_lookups_per_client", "0")).expect("valid");
        assert_eq!(c.store.cold_lookups_per_client, 0);
        for bad in ["0", "99", "50000001"] {
            let e = parse(&with("session_cache_capacity", bad))
                .expect_err(bad)
                .to_string();
            assert!(e.contains("store.session_cache_capacity"), "{e}");
            assert!(e.contains("between 100 and 50000000"), "{e}");
        }
        let e = parse(&with("cold_lookups_per_client", "1000001"))
            .expect_err("too many")
            .to_string();
        assert!(e.contains("store.cold_lookups_per_client"), "{e}");
        // A negative number is not a count at all.
        let e = parse(&with("session_cache_capacity", "-1"))
            .expect_err("negative")
            .to_string();
        assert!(e.contains("session_cache_capacity"), "{e}");
    }

    #[test]
    fn over_budget_hold_is_read_and_bounded() {
        assert_eq!(
            parse(GOOD).expect("valid").store.over_budget_hold,
            Duration::from_secs(1)
        );
        let with =
            |v: &str| GOOD.replacen("[store]", &format!("[store]\nover_budget_hold = {v}"), 1);
        for (v, d) in [("\"0s\"", 0), ("\"250ms\"", 250), ("\"10s\"", 10_000)] {
            assert_eq!(
                parse(&with(v)).expect(v).store.over_budget_hold,
                Duration::from_millis(d)
            );
        }
        let e = parse(&with("\"11s\"")).expect_err("over 10 s").to_string();
        assert!(e.contains("store.over_budget_hold"), "{e}");
    }

    #[test]
    fn use_flush_interval_is_read_and_bounded() {
        assert_eq!(
            parse(GOOD).expect("valid").store.use_flush_interval,
            Duration::from_secs(60)
        );
        let with =
            |v: &str| GOOD.replacen("[store]", &format!("[store]\nuse_flush_interval = {v}"), 1);
        assert_eq!(
            parse(&with("\"5m\""))
                .expect("valid")
                .store
                .use_flush_interval,
            Duration::from_secs(300)
        );
        for bad in ["\"500ms\"", "\"2h\""] {
            let e = parse(&with(bad)).expect_err(bad).to_string();
            assert!(e.contains("store.use_flush_interval"), "{e}");
        }
    }

    #[test]
    fn notify_is_read_and_checked() {
        assert!(parse(GOOD).expect("valid").notify.is_none());
        let text = format!(
            "{GOOD}\n[notify]\nurl = \"https://ops.example.com/hook\"\nsecret = \"whsec\"\n"
        );
        let n = parse(&text).expect("valid").notify.expect("notify");
        assert_eq!(n.url.as_str(), "https://ops.example.com/hook");
        assert_eq!(n.secret.expose_secret(), "whsec");
        assert_eq!(n.timeout, Duration::from_secs(10));
        assert_eq!(n.give_up_after, Duration::from_secs(86400));
        assert_eq!(n.keep_given_up, Duration::from_secs(7 * 86400));
        let keep = |v: &str| {
            parse(&format!("{text}keep_given_up = {v}\n"))
                .map(|c| c.notify.expect("notify").keep_given_up)
        };
        assert_eq!(
            keep("\"48h\"").expect("valid"),
            Duration::from_secs(48 * 3600)
        );
        assert_eq!(keep("60").expect("valid"), Duration::from_secs(60));
        for bad in ["\"0s\"", "\"500ms\"", "\"a week\"", "315360001"] {
            let e = keep(bad).expect_err(bad).to_string();
            assert!(e.contains("notify.keep_given_up"), "{bad}: {e}");
        }
        let e = err(&format!(
            "{GOOD}\n[notify]\nurl = \"https://ops.example.com/hook\"\n"
        ));
        assert!(e.contains("notify.secret"), "{e}");
        let e = err(&format!(
            "{GOOD}\n[notify]\nurl = \"ftp://x\"\nsecret = \"s\"\n"
        ));
        assert!(e.contains("notify.url"), "{e}");
        let e = err(&format!(
            "{GOOD}\n[notify]\nurl = \"https://x\"\nsecret = \"s\"\nretries = 3\n"
        ));
        assert!(e.contains("retries"), "{e}");
        let idle = GOOD.replacen(
            "kind = \"spark\"",
            "kind = \"spark\"\nrefresh_idle_after = \"20h\"",
            1,
        );
        let c = parse(&idle).expect("valid");
        assert_eq!(
            c.provider("spark").and_then(|p| p.refresh_idle_after),
            Some(Duration::from_secs(20 * 3600))
        );
        let e = err(&GOOD.replacen(
            "kind = \"spark\"",
            "kind = \"spark\"\nrefresh_idle_after = 5",
            1,
        ));
        assert!(e.contains("providers.spark.refresh_idle_after"), "{e}");
    }

    #[test]
    fn sessions_from_takes_the_owners_credentials() {
        let text = format!(
            "{GOOD}\n[providers.replication]\nkind = \"spark\"\napi_base = \"https://replication.sparkapi.com\"\nsessions_from = \"spark\"\n"
        );
        let c = parse(&text).expect("valid");
        let r = c.provider("replication").expect("replication");
        assert_eq!(r.session_owner(), "spark");
        assert_eq!(r.client_id, "cid");
        assert_eq!(r.client_secret.expose_secret(), "s3cret");
        assert_eq!(
            r.user_agent.as_ref().map(|v| v.as_bytes()),
            Some(&b"MyApp/1.0"[..])
        );
        assert_eq!(
            c.provider("spark").map(|p| p.session_owner()),
            Some("spark")
        );

        let e = err(&text.replace("sessions_from = \"spark\"", "sessions_from = \"nope\""));
        assert!(e.contains("providers.replication.sessions_from"), "{e}");
        let e = err(&text.replace("sessions_from = \"spark\"", "sessions_from = \"zillow\""));
        assert!(e.contains("another kind"), "{e}");
        let e = err(&text.replace(
            "sessions_from = \"spark\"",
            "sessions_from = \"spark\"\nclient_id = \"other\"",
        ));
        assert!(e.contains("providers.replication.client_id"), "{e}");
    }

    #[test]
    fn proxy_url_is_checked() {
        let c = parse(&GOOD.replace(
            "[store]",
            "proxy_url = \"https://credproxy.internal\"\n[store]",
        ))
        .expect("valid");
        assert_eq!(
            c.server.proxy_url.as_ref().map(Url::as_str),
            Some("https://credproxy.internal/")
        );
        let e = err(&GOOD.replace("[store]", "proxy_url = \"credproxy\"\n[store]"));
        assert!(e.contains("server.proxy_url"), "{e}");
    }

    fn parse_in(text: &str, dir: &Path) -> Result<Config, ConfigError> {
        Config::parse_in(text, Path::new("config.toml"), Some(dir), env)
    }

    fn store_url(c: &Config) -> &str {
        c.store.url.expose_secret()
    }

    #[test]
    fn relative_store_paths_are_relative_to_the_config_directory() {
        let dir = Path::new("/etc/cp");
        for (given, resolved) in [
            ("sqlite://credproxy.db", "sqlite:///etc/cp/credproxy.db"),
            ("sqlite:credproxy.db", "sqlite:///etc/cp/credproxy.db"),
            ("sqlite://./x/y.db", "sqlite:///etc/cp/x/y.db"),
            ("sqlite://x.db?mode=rwc", "sqlite:///etc/cp/x.db?mode=rwc"),
            ("sqlite:///abs/path.db", "sqlite:///abs/path.db"),
            ("sqlite:///abs/p.db?mode=ro", "sqlite:///abs/p.db?mode=ro"),
            ("sqlite::memory:", "sqlite::memory:"),
            ("sqlite://?mode=memory", "sqlite://?mode=memory"),
            ("postgres://u@db/cp", "postgres://u@db/cp"),
        ] {
            let c = parse_in(&GOOD.replace("sqlite://x.db", given), dir).expect(given);
            assert_eq!(store_url(&c), resolved, "{given}");
        }
        let c = parse_in(GOOD, dir).expect("valid");
        assert!(
            matches!(&c.store.key, KeySource::File(f) if f == Path::new("/etc/cp/credproxy.key")),
            "the default key file: {:?}",
            c.store.key
        );
        let text = GOOD.replace("[store]", "[store]\nkey_file = \"./keys/k\"");
        let c = parse_in(&text, dir).expect("valid");
        assert!(matches!(&c.store.key, KeySource::File(f) if f == Path::new("/etc/cp/keys/k")));
        let text = GOOD.replace("[store]", "[store]\nkey_file = \"/abs/k\"");
        let c = parse_in(&text, dir).expect("valid");
        assert!(matches!(&c.store.key, KeySource::File(f) if f == Path::new("/abs/k")));
        // Without a directory (tests' Config::parse), paths stay as written.
        let c = parse(GOOD).expect("valid");
        assert_eq!(store_url(&c), "sqlite://x.db");
        assert!(matches!(&c.store.key, KeySource::File(f) if f == Path::new("credproxy.key")));
    }

    #[test]
    fn a_directory_with_url_characters_still_names_the_file() {
        use std::str::FromStr;
        let dir = Path::new("/tmp/a b%41?c#d");
        let c = parse_in(
            &GOOD.replace("sqlite://x.db", "sqlite://x.db?mode=rwc"),
            dir,
        )
        .expect("valid");
        let opts = sqlx::sqlite::SqliteConnectOptions::from_str(store_url(&c)).expect("sqlx");
        assert_eq!(opts.get_filename(), Path::new("/tmp/a b%41?c#d/x.db"));
    }

    #[test]
    fn relative_ca_file_is_relative_to_the_config_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("roots.pem"), "").expect("write");
        let text = GOOD.replace(
            "request_timeout = \"500ms\"",
            "request_timeout = \"500ms\"\nca_file = \"roots.pem\"",
        );
        let c = parse_in(&text, dir.path()).expect("found next to the config");
        assert_eq!(
            c.provider("zillow").and_then(|p| p.ca_file.clone()),
            Some(dir.path().join("roots.pem"))
        );
        let e = err(&text);
        assert!(e.contains("providers.zillow.ca_file"), "{e}");
    }

    #[test]
    fn environment_overrides_take_precedence() {
        let text = GOOD.replace(
            "url = \"sqlite://x.db\"",
            "url = \"sqlite://x.db\"\nkey_env = \"SEAL\"",
        );
        let with = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
                    .or_else(|| env(name))
            }
        };
        let c = Config::parse_in(
            &text,
            Path::new("c.toml"),
            Some(Path::new("/etc/cp")),
            with(&[
                ("SEAL", "k"),
                ("CREDPROXY_LISTEN", "0.0.0.0:8080"),
                ("CREDPROXY_ADMIN_LISTEN", "0.0.0.0:8081"),
                ("CREDPROXY_STORE_URL", "sqlite://data/cp.db"),
                ("CREDPROXY_KEY_FILE", "data/cp.key"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.server.admin_listen.to_string(), "0.0.0.0:8081");
        // Reachable from a browser, unlike 0.0.0.0.
        assert_eq!(c.server.public_url.as_str(), "http://127.0.0.1:8081/");
        // Relative to the working directory, as any path on a command line.
        assert_eq!(store_url(&c), "sqlite://data/cp.db");
        assert!(matches!(&c.store.key, KeySource::File(f) if f == Path::new("data/cp.key")));

        // Empty is unset; a bad value names the variable.
        let c = Config::parse(
            &text,
            Path::new("c.toml"),
            with(&[("SEAL", "k"), ("CREDPROXY_LISTEN", "")]),
        )
        .expect("valid");
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:0");
        let e = Config::parse(
            &text,
            Path::new("c.toml"),
            with(&[("SEAL", "k"), ("CREDPROXY_ADMIN_LISTEN", "0.0.0.0")]),
        )
        .expect_err("bad address")
        .to_string();
        assert!(
            e.contains("CREDPROXY_ADMIN_LISTEN (overrides server.admin_listen)"),
            "{e}"
        );
    }

    #[test]
    fn every_missing_secret_is_named_at_once() {
        let text = GOOD
            .replace("SPARK_SECRET", "NOPE_1")
            .replace("api_key_env = \"ZKEY\"", "")
            .replace("[admin]", "")
            .replace(
                "[providers.spark]",
                "key_env = \"NOPE_2\"\n[admin]\ntoken = \"\"\n[providers.spark]",
            );
        let e = err(&text);
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 4, "{e}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("store.key_env") && l.contains("NOPE_2")),
            "{e}"
        );
        assert!(lines.iter().any(|l| l.starts_with("admin.token")), "{e}");
        assert!(
            lines.iter().any(|l| l.starts_with("providers.spark.client_secret_env") && l.contains("NOPE_1")),
            "{e}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("providers.zillow.api_key")),
            "{e}"
        );
        // Along with a problem that stops validation, the ones found before it.
        let e = err(&text.replace("kind = \"zillow\"", "kind = \"zillow\"\nlisten = \"x\""));
        assert!(
            e.contains("providers.zillow.listen") && e.contains("NOPE_1"),
            "{e}"
        );
    }

    #[test]
    fn an_unreadable_file_is_named_once() {
        let e = Config::load(Path::new("/nonexistent/credproxy/config.toml")).expect_err("missing");
        assert!(std::error::Error::source(&e).is_none());
        let text = format!("{:#}", anyhow::Error::from(e));
        assert!(
            text.contains("/nonexistent/credproxy/config.toml"),
            "{text}"
        );
        assert_eq!(text.matches("os error").count(), 1, "{text}");
    }

    #[test]
    fn bad_provider_name_is_refused() {
        let e = err(&GOOD.replace("[providers.spark]", "[providers.Spark]"));
        assert!(e.contains("providers.Spark"), "{e}");
    }
}
