//! Fills a store with many sessions, for the scale benchmarks (key rewrap
//! rate, cold lookups at a million sessions):
//!
//! ```text
//! cargo run --release --example seed -- CONFIG COUNT [PROVIDER] [CONCURRENCY]
//! ```
//!
//! Adds COUNT sessions of PROVIDER (default `spark`) through the same code
//! as `credproxy session add` (sealed under the ring's primary key, with a
//! refresh token), CONCURRENCY at a time (default 8). Session `i` gets the
//! key `seed-session-key-{i:08}`, so a load generator can present any of
//! them without a key file; its tokens are made up (`seed-at-{i}`), so they
//! only work against a stand-in that accepts any token. Progress on stderr,
//! once a second. Never point it at a store that matters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use credproxy::config::Config;
use credproxy::session::SessionKey;
use credproxy::sessions::{NewTokens, Sessions};
use secrecy::SecretString;

/// The key `seed` gives session `i`.
pub fn seed_key(i: u64) -> String {
    format!("seed-session-key-{i:08}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(config), Some(count)) = (args.first(), args.get(1)) else {
        anyhow::bail!("usage: seed CONFIG COUNT [PROVIDER] [CONCURRENCY]");
    };
    let count: u64 = count.parse().context("COUNT must be a number")?;
    let provider = args.get(2).cloned().unwrap_or_else(|| "spark".to_owned());
    let concurrency: u64 = match args.get(3) {
        Some(c) => c.parse().context("CONCURRENCY must be a number")?,
        None => 8,
    };
    let config = Config::load(std::path::Path::new(config))?;
    let (sessions, _) = Sessions::open(&config).await?;
    let sessions = Arc::new(sessions);
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (sessions, next, done, provider) = (
            Arc::clone(&sessions),
            Arc::clone(&next),
            Arc::clone(&done),
            provider.clone(),
        );
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<(), anyhow::Error>(());
                }
                let key = SessionKey::chosen(SecretString::from(seed_key(i)))?;
                sessions
                    .add(
                        &provider,
                        NewTokens {
                            access_token: SecretString::from(format!("seed-at-{i}")),
                            refresh_token: Some(SecretString::from(format!("seed-rt-{i}"))),
                            expires_in: Some(365 * 24 * 3600),
                        },
                        None,
                        Some(key),
                        credproxy::audit::Actor::Cli,
                    )
                    .await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let report = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = done.load(Ordering::Relaxed);
                eprintln!(
                    "seed: {n} of {count} ({:.0} sessions/s)",
                    n as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    };
    while let Some(r) = workers.join_next().await {
        r.context("worker")??;
    }
    report.abort();
    let n = done.load(Ordering::Relaxed);
    println!(
        "seed: added {n} sessions in {:.1} s ({:.0}/s)",
        started.elapsed().as_secs_f64(),
        n as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}
