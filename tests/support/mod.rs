//! Shared test harness: stand-in providers, a config file pointing at them,
//! and credproxy run either in-process (`start_in_process`) or as the built
//! binary (`BinServer`), always on ephemeral loopback ports.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use credproxy::config::Config;
use credproxy::server::{self, Running};
use credproxy::tokens::sessions::NewTokens;
use credproxy_standins::{Options, Standin, Tokens};
use secrecy::SecretString;

pub const ADMIN_TOKEN: &str = "test-admin-token-7f3a9c2e51";
pub const BIN: &str = env!("CARGO_BIN_EXE_credproxy");

/// Extra TOML lines for each table of the generated config.
#[derive(Default, Clone)]
pub struct Extra {
    /// Replaces the SQLite store (e.g. with a PostgreSQL URL from [`postgres_db`]).
    pub store_url: Option<String>,
    pub server: String,
    pub store: String,
    pub admin: Option<String>,
    pub spark: String,
    pub zillow: String,
}

/// Two stand-ins and a directory holding the config, store and key.
pub struct World {
    pub spark: Standin,
    pub zillow: Standin,
    pub dir: tempfile::TempDir,
}

impl World {
    pub async fn new() -> World {
        World::with(Options::spark(), Options::zillow()).await
    }

    pub async fn with(spark: Options, zillow: Options) -> World {
        World {
            spark: Standin::start(spark).await.expect("spark stand-in"),
            zillow: Standin::start(zillow).await.expect("zillow stand-in"),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config_text(&self, extra: &Extra) -> String {
        let s = self.spark.options();
        let z = self.zillow.options();
        let admin = extra
            .admin
            .clone()
            .unwrap_or_else(|| format!("token = \"{ADMIN_TOKEN}\""));
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = 10
{server}

[store]
url = "{db}"
key_file = "{key}"
{store}

[admin]
{admin}

[providers.spark]
kind = "spark"
api_base = "{spark_base}"
token_url = "{spark_token}"
authorize_url = "{spark_auth}"
client_id = "{spark_id}"
client_secret = "{spark_secret}"
user_agent = "credproxy-tests/1.0"
min_refresh_interval = 0
{spark_extra}

[providers.zillow]
kind = "zillow"
api_base = "{zillow_base}"
token_url = "{zillow_token}"
authorize_url = "{zillow_auth}"
client_id = "{zillow_id}"
client_secret = "{zillow_secret}"
api_key = "{zillow_key}"
min_refresh_interval = 0
{zillow_extra}
"#,
            server = extra.server,
            db = extra
                .store_url
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}", self.path("credproxy.db").display())),
            key = self.path("credproxy.key").display(),
            store = extra.store,
            spark_base = self.spark.base_url(),
            spark_token = self.spark.token_url(),
            spark_auth = self.spark.authorize_url(),
            spark_id = s.client_id,
            spark_secret = s.client_secret,
            spark_extra = extra.spark,
            zillow_base = self.zillow.base_url(),
            zillow_token = self.zillow.token_url(),
            zillow_auth = self.zillow.authorize_url(),
            zillow_id = z.client_id,
            zillow_secret = z.client_secret,
            zillow_key = z.api_key,
            zillow_extra = extra.zillow,
        )
    }

    /// Starts the server in-process with Spark's API at `http://API/api`
    /// instead of the stand-in's: a raw upstream of the test's own.
    pub async fn start_against_spark_api(&self, extra: &Extra, api: SocketAddr) -> Running {
        let text = self.config_text(extra).replace(
            &format!("api_base = \"{}\"", self.spark.base_url()),
            &format!("api_base = \"http://{api}/api\""),
        );
        let cfg = Config::parse(&text, Path::new("t.toml"), |_| None).expect("config");
        server::start(cfg).await.expect("start")
    }

    /// Writes `config.toml` into the world's directory and returns its path.
    pub fn write_config(&self, extra: &Extra) -> PathBuf {
        let path = self.path("config.toml");
        std::fs::write(&path, self.config_text(extra)).expect("write config");
        path
    }

    pub fn config(&self, extra: &Extra) -> Config {
        Config::parse(&self.config_text(extra), Path::new("test.toml"), |_| None)
            .expect("valid test config")
    }

    /// Starts credproxy in this process.
    pub async fn start(&self, extra: &Extra) -> Running {
        server::start(self.config(extra))
            .await
            .expect("server starts")
    }

    /// Every secret this world uses, for the log-grep tests.
    pub fn secrets(&self) -> Vec<String> {
        let s = self.spark.options();
        let z = self.zillow.options();
        vec![
            s.client_secret.clone(),
            z.client_secret.clone(),
            z.api_key.clone(),
            ADMIN_TOKEN.to_owned(),
        ]
    }
}

/// Adds a session for fresh stand-in tokens; returns (id, session key, tokens).
pub async fn add_session(
    running: &Running,
    provider: &str,
    standin: &Standin,
) -> (String, String, Tokens) {
    let tokens = standin.issue_tokens();
    let (id, key) = add_tokens(running, provider, &tokens, tokens.expires_in).await;
    (id, key, tokens)
}

/// Adds a session for `tokens` with the given lifetime; returns (id, session key).
pub async fn add_tokens(
    running: &Running,
    provider: &str,
    tokens: &Tokens,
    expires_in: Option<u64>,
) -> (String, String) {
    let added = running
        .sessions
        .add(
            provider,
            NewTokens {
                access_token: SecretString::from(tokens.access_token.clone()),
                refresh_token: Some(SecretString::from(tokens.refresh_token.clone())),
                expires_in,
            },
            Some(format!("{provider} test")),
            None,
            credproxy::audit::Actor::Cli,
        )
        .await
        .expect("session added");
    (added.id, added.key.expose().to_owned())
}

pub fn client() -> reqwest::Client {
    // Several rustls providers are linked into the tests; make ring the default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

pub fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

/// Runs `credproxy ARGS --config PATH` to completion.
pub fn run_cli(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run credproxy")
}

/// Log lines of a child process, shared with a reader thread that signals
/// each new line.
#[derive(Default)]
pub struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Lines {
    pub fn all(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Waits until a line satisfies `f` (or the process closes its stream).
    pub fn wait_for(&self, timeout: Duration, f: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut lines = self.lines.lock().expect("lines");
        let mut seen = 0;
        loop {
            if let Some(l) = lines[seen..].iter().find(|l| f(l)) {
                return Some(l.clone());
            }
            seen = lines.len();
            let now = std::time::Instant::now();
            if now >= deadline || lines.last().is_some_and(|l| l == EOF_MARK) {
                return None;
            }
            lines = self
                .changed
                .wait_timeout(lines, deadline - now)
                .expect("lines")
                .0;
        }
    }
}

const EOF_MARK: &str = "\u{0}eof";

fn pump(stream: impl std::io::Read + Send + 'static, into: Arc<Lines>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            into.lines.lock().expect("lines").push(line);
            into.changed.notify_all();
        }
        into.lines.lock().expect("lines").push(EOF_MARK.to_owned());
        into.changed.notify_all();
    });
}

/// `credproxy serve` as a child process; killed when dropped.
pub struct BinServer {
    pub child: Child,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub stdout: Arc<Lines>,
    pub stderr: Arc<Lines>,
}

fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let at = line.find(marker)? + marker.len();
    line[at..].trim().strip_prefix("http://")?.parse().ok()
}

impl BinServer {
    /// Starts `credproxy serve`: the binary cargo built for the tests, or
    /// the one `CREDPROXY_TEST_SERVE_BIN` names (to measure a release
    /// build with the same test, e.g. tests/crash.rs's windows).
    pub fn spawn(config: &Path, rust_log: &str) -> BinServer {
        let bin = std::env::var("CREDPROXY_TEST_SERVE_BIN").unwrap_or_else(|_| BIN.to_owned());
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn credproxy serve");
        let stdout = Arc::new(Lines::default());
        let stderr = Arc::new(Lines::default());
        pump(child.stdout.take().expect("stdout"), Arc::clone(&stdout));
        pump(child.stderr.take().expect("stderr"), Arc::clone(&stderr));
        let wait = |marker: &str| {
            stdout
                .wait_for(Duration::from_secs(30), |l| l.contains(marker))
                .and_then(|line| addr_after(&line, marker))
        };
        let (Some(proxy_addr), Some(admin_addr)) =
            (wait("proxy listening on"), wait("admin listening on"))
        else {
            // Never leave a server behind when the test gives up on it.
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "credproxy serve did not start; stderr:\n{}",
                stderr.all().join("\n")
            );
        };
        BinServer {
            child,
            stdout,
            proxy_addr,
            admin_addr,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(self.pid(), "TERM");
        self.child.wait().expect("wait")
    }

    /// Peak resident memory of the process so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }
}

impl Drop for BinServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Reads the JSON error code credproxy answered with, if any.
pub fn error_code(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("x-credproxy-error")
        .map(|v| v.to_str().expect("ascii").to_owned())
}

/// Sends raw bytes and reads the answer: until the peer closes, or until a
/// full response (head plus Content-Length body) has arrived.
pub async fn raw_request(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => break,
            Err(_) => panic!(
                "no complete answer within 10 s; got {:?}",
                String::from_utf8_lossy(&buf)
            ),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if response_complete(&buf) {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn response_complete(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let Some(end) = text.find("\r\n\r\n") else {
        return false;
    };
    let len = text[..end]
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    buf.len() >= end + 4 + len
}

/// A fresh PostgreSQL database for one test (tests run in parallel), made on
/// the server named by `CREDPROXY_TEST_DATABASE_URL` (see
/// scripts/test-postgres.sh). Without that variable the test is skipped with
/// a printed reason, except in CI, where it must run.
pub async fn postgres_db(test: &str) -> Option<String> {
    let Ok(base) = std::env::var("CREDPROXY_TEST_DATABASE_URL") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the PostgreSQL tests: export CREDPROXY_TEST_DATABASE_URL=$(scripts/test-postgres.sh)"
        );
        println!(
            "SKIPPED {test}: CREDPROXY_TEST_DATABASE_URL is not set (run scripts/test-postgres.sh)"
        );
        return None;
    };
    let suffix: String = test
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(30)
        .collect();
    let name = format!(
        "cp_t_{}_{:08x}",
        suffix.to_ascii_lowercase(),
        rand::random::<u32>()
    );
    let admin = sqlx::PgPool::connect(&base)
        .await
        .expect("connect to CREDPROXY_TEST_DATABASE_URL");
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&admin)
        .await
        .expect("create a database for the test");
    admin.close().await;
    let mut url = url::Url::parse(&base).expect("CREDPROXY_TEST_DATABASE_URL is a URL");
    url.set_path(&format!("/{name}"));
    Some(url.to_string())
}

/// Adds a Spark session for fresh stand-in tokens with the CLI; its key.
pub fn cli_add_spark(config: &Path, w: &World) -> String {
    let v = cli_add(config, "spark", &w.spark.issue_tokens());
    v["session_key"]
        .as_str()
        .expect("session_key in the JSON")
        .to_owned()
}

/// `credproxy session add --json` for stand-in tokens (access and refresh);
/// the printed `{"id", "session_key", "provider"}`.
pub fn cli_add(config: &Path, provider: &str, tokens: &Tokens) -> serde_json::Value {
    let out = run_cli(
        config,
        &[
            "session",
            "add",
            "--provider",
            provider,
            "--access-token",
            &tokens.access_token,
            "--refresh-token",
            &tokens.refresh_token,
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "session add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("session add --json prints one JSON object")
}
