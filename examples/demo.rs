//! Try credproxy end to end with no provider account:
//!
//! ```text
//! cargo run --release --example demo
//! ```
//!
//! Starts local stand-ins of Spark and Zillow, then credproxy itself on the
//! embedded SQLite store (in `./demo-data/`), adds a session for each
//! provider, and prints curl lines that work as they are, and `credproxy`
//! commands that use the binary built next to this example
//! (`target/release/credproxy`; `cargo run --release --` when there is none
//! yet). Ctrl-C stops it.
//!
//! Each run starts from a fresh store: the stand-ins forget their tokens when
//! they stop, so every session of an earlier run (those added here and any
//! connected from the browser) is dead, and the store's file is deleted at
//! start. The sealing key (`demo-data/credproxy.key`) is kept.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use credproxy::config::Config;
use credproxy::tokens::sessions::NewTokens;
use credproxy_standins::{ApiKey, Options, Standin};
use secrecy::SecretString;

/// The preferred port, or any free one when it is taken.
fn free_addr(preferred: u16) -> SocketAddr {
    let want = SocketAddr::from(([127, 0, 0, 1], preferred));
    match std::net::TcpListener::bind(want) {
        Ok(_) => want,
        Err(_) => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or(want),
    }
}

/// How to run credproxy from the directory the demo was started in: the
/// binary next to this example's (`target/release/examples/demo` sits
/// beside `target/release/credproxy`), or cargo when it is not built yet.
fn credproxy_command() -> String {
    let built = std::env::current_exe().ok().and_then(|exe| {
        let bin = exe
            .parent()?
            .parent()?
            .join(format!("credproxy{}", std::env::consts::EXE_SUFFIX));
        bin.is_file().then_some(bin)
    });
    match built {
        Some(bin) => {
            let shown = std::env::current_dir()
                .ok()
                .and_then(|cwd| bin.strip_prefix(cwd).ok().map(Path::to_owned))
                .unwrap_or(bin);
            shell_word(&shown)
        }
        None if cfg!(debug_assertions) => "cargo run --".to_owned(),
        None => "cargo run --release --".to_owned(),
    }
}

/// A path as one shell word.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    if text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c))
    {
        text
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// Deletes the store left by an earlier run (its sessions are dead).
fn fresh_store(dir: &Path) -> anyhow::Result<()> {
    for name in ["credproxy.db", "credproxy.db-wal", "credproxy.db-shm"] {
        let path: PathBuf = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("cannot delete {}", path.display()))
                )
            }
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _log = credproxy::telemetry::init("info", &Default::default());
    // Spark with its replication host, as flex-mls and replication jobs use
    // it, and a key of its API-key authentication.
    let spark = Standin::start(Options {
        replication: true,
        api_keys: vec![ApiKey::demo()],
        ..Options::spark()
    })
    .await?;
    let zillow = Standin::start(Options::zillow()).await?;

    let dir = Path::new("demo-data");
    std::fs::create_dir_all(dir).context("cannot create demo-data")?;
    fresh_store(dir)?;
    let (listen, admin) = (free_addr(8080), free_addr(8081));
    let (s, z) = (spark.options(), zillow.options());
    let text = format!(
        r#"# Written by `cargo run --example demo`: credproxy in front of local stand-ins.
[server]
listen = "{listen}"
admin_listen = "{admin}"

[store]                       # relative to this file's directory
url = "sqlite://credproxy.db"
key_file = "credproxy.key"

[admin]
token = "demo-admin-token"

[providers.spark]
kind = "spark"
api_base = "{spark_base}"
token_url = "{spark_token}"
authorize_url = "{spark_auth}"
client_id = "{spark_id}"
client_secret = "{spark_secret}"
user_agent = "credproxy-demo/1.0"

[providers.spark-replication]  # same sessions, tokens and refreshes as spark
kind = "spark"
api_base = "{replication_base}"
sessions_from = "spark"

[providers.spark-apikey]      # Spark's API-key authentication: credproxy signs every request
kind = "spark_api_key"
api_base = "{spark_base}"

[providers.zillow]
kind = "zillow"
api_base = "{zillow_base}"
token_url = "{zillow_token}"
authorize_url = "{zillow_auth}"
client_id = "{zillow_id}"
client_secret = "{zillow_secret}"
api_key = "{zillow_key}"
"#,
        spark_base = spark.base_url(),
        spark_token = spark.token_url(),
        spark_auth = spark.authorize_url(),
        spark_id = s.client_id,
        spark_secret = s.client_secret,
        replication_base = spark.replication_url().unwrap_or_default(),
        zillow_base = zillow.base_url(),
        zillow_token = zillow.token_url(),
        zillow_auth = zillow.authorize_url(),
        zillow_id = z.client_id,
        zillow_secret = z.client_secret,
        zillow_key = z.api_key,
    );
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, &text)?;
    let config = Config::load(&config_path)?;
    let running = credproxy::server::start(config)
        .await
        .context("starting credproxy")?;

    let (mut keys, mut ids) = (Vec::new(), Vec::new());
    for (name, standin) in [("spark", &spark), ("zillow", &zillow)] {
        let t = standin.issue_tokens();
        let added = running
            .sessions
            .add(
                name,
                NewTokens {
                    access_token: SecretString::from(t.access_token),
                    refresh_token: Some(SecretString::from(t.refresh_token)),
                    expires_in: t.expires_in,
                },
                Some(format!("demo {name}")),
                None,
                credproxy::audit::Actor::Cli,
            )
            .await?;
        keys.push(added.key.expose().to_owned());
        ids.push(added.id);
    }
    // A session of Spark's API-key authentication: the key and its secret.
    let demo_key = ApiKey::demo();
    let (access_token, refresh_token) =
        credproxy::provider::spark::api_key::ApiKeyCredentials::new_session(
            demo_key.key.clone(),
            SecretString::from(demo_key.secret.clone()),
            None,
        );
    let signed = running
        .sessions
        .add(
            "spark-apikey",
            NewTokens {
                access_token,
                refresh_token: Some(refresh_token),
                expires_in: Some(0),
            },
            Some("demo spark API key".to_owned()),
            None,
            credproxy::audit::Actor::Cli,
        )
        .await?;
    let p = running.proxy_addr;
    println!();
    println!(
        "credproxy demo: proxy on http://{p}, admin on http://{}",
        running.admin_addr
    );
    println!(
        "Stand-ins: Spark at {}, Zillow at {}",
        spark.base_url(),
        zillow.base_url()
    );
    println!();
    println!("# Spark: the session key where the access token would go");
    println!(
        "curl -H 'Authorization: OAuth {}' http://{p}/spark/v1/listings",
        keys[0]
    );
    println!("# Spark: the session key in credproxy's own header");
    println!(
        "curl -H 'X-Credproxy-Session: {}' 'http://{p}/spark/v1/listings?_limit=1'",
        keys[0]
    );
    println!("# Spark's RESO Web API, paged: follow @odata.nextLink, it points back at credproxy");
    println!(
        "curl -s -H 'Authorization: Bearer {}' 'http://{p}/spark/Reso/OData/Property?$top=5' | grep -o '\"@odata.nextLink\":\"[^\"]*\"'",
        keys[0]
    );
    println!("# The same key on Spark's replication host (flex-mls's default)");
    println!(
        "curl -H 'Authorization: Bearer {}' 'http://{p}/spark-replication/Version/3/Reso/OData/Member?$top=2'",
        keys[0]
    );
    println!(
        "# Spark's API-key authentication: credproxy opens Spark's session and signs the request"
    );
    println!(
        "curl -H 'X-Credproxy-Session: {}' 'http://{p}/spark-apikey/v1/listings?_limit=1'",
        signed.key.expose()
    );
    println!("# Zillow: the session key as the accessToken parameter");
    println!(
        "curl 'http://{p}/zillow/listings/v1/listingsForUser?accessToken={}'",
        keys[1]
    );
    println!("# Connect an account from a browser (the stand-ins accept any login):");
    println!("#   open http://{}/", running.admin_addr);
    println!("# Health, metrics and the session list");
    println!("curl http://{}/metrics", running.admin_addr);
    let credproxy = credproxy_command();
    let config_arg = shell_word(&config_path);
    println!("{credproxy} --config {config_arg} session list");
    println!("# Refresh the Zillow session now (the stand-in, like Zillow, gives no lifetime)");
    println!(
        "{credproxy} --config {config_arg} session refresh {}",
        ids[1]
    );
    println!();
    println!("The stand-ins answer with what they received: look for the injected");
    println!("\"authorization\" header and accessToken/clientId/apiKey parameters.");
    println!("Ctrl-C stops the demo.");

    tokio::signal::ctrl_c().await?;
    running.shutdown().await;
    Ok(())
}
