//! Try credproxy end to end with no provider account:
//!
//! ```text
//! cargo run --release --example demo
//! ```
//!
//! Starts local stand-ins of Spark and Zillow, then credproxy itself on the
//! embedded SQLite store (in `./demo-data/`), adds a session for each
//! provider, and prints curl lines that work as they are. Ctrl-C stops it.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use credproxy::config::Config;
use credproxy::sessions::NewTokens;
use credproxy_standins::{Options, Standin};
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    credproxy::telemetry::init("info");
    let spark = Standin::start(Options::spark()).await?;
    let zillow = Standin::start(Options::zillow()).await?;

    let dir = Path::new("demo-data");
    std::fs::create_dir_all(dir)?;
    let (listen, admin) = (free_addr(8080), free_addr(8081));
    let (s, z) = (spark.options(), zillow.options());
    let text = format!(
        r#"# Written by `cargo run --example demo`: credproxy in front of local stand-ins.
[server]
listen = "{listen}"
admin_listen = "{admin}"

[store]
url = "sqlite://demo-data/credproxy.db"
key_file = "demo-data/credproxy.key"

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

    let mut keys = Vec::new();
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
            )
            .await?;
        keys.push(added.key.expose().to_owned());
    }
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
    println!("# Zillow: the session key as the accessToken parameter");
    println!(
        "curl 'http://{p}/zillow/listings/v1/listingsForUser?accessToken={}'",
        keys[1]
    );
    println!("# Connect an account from a browser (the stand-ins accept any login):");
    println!("#   open http://{}/", running.admin_addr);
    println!("# Health, metrics and the session list");
    println!("curl http://{}/metrics", running.admin_addr);
    println!(
        "cargo run --release -- --config {} session list",
        config_path.display()
    );
    println!();
    println!("The stand-ins answer with what they received: look for the injected");
    println!("\"authorization\" header and accessToken/clientId/apiKey parameters.");
    println!("Ctrl-C stops the demo.");

    tokio::signal::ctrl_c().await?;
    running.shutdown().await;
    Ok(())
}
