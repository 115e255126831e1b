//! Fills a store with many sessions, for the scale benchmarks (key rewrap
//! rate, cold lookups at a million sessions):
//!
//! ```text
//! cargo run --release --example seed -- CONFIG COUNT [PROVIDER] [CONCURRENCY]
//! cargo run --release --example seed -- --bulk CONFIG COUNT [PROVIDER] [BATCH]
//! ```
//!
//! With `--bulk`, sessions are inserted BATCH at a time (default 5,000)
//! through `Store::insert_sessions`: one transaction and multi-row inserts
//! per batch, one audit row per batch, no events; a million sessions take
//! minutes instead of the ~1,000/s of one `session add` each.
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
use credproxy::secrets::session::SessionKey;
use credproxy::tokens::sessions::{NewTokens, Sessions};
use secrecy::SecretString;

/// The key `seed` gives session `i`.
pub fn seed_key(i: u64) -> String {
    format!("seed-session-key-{i:08}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--bulk") {
        args.remove(0);
        return bulk(&args).await;
    }
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

/// `--bulk`: BATCH sessions per transaction through `Sessions::add_many`.
async fn bulk(args: &[String]) -> anyhow::Result<()> {
    let (Some(config), Some(count)) = (args.first(), args.get(1)) else {
        anyhow::bail!("usage: seed --bulk CONFIG COUNT [PROVIDER] [BATCH]");
    };
    let count: u64 = count.parse().context("COUNT must be a number")?;
    let provider = args.get(2).cloned().unwrap_or_else(|| "spark".to_owned());
    let batch: u64 = match args.get(3) {
        Some(b) => b.parse().context("BATCH must be a number")?,
        None => 5000,
    };
    let config = Config::load(std::path::Path::new(config))?;
    let (sessions, _) = Sessions::open(&config).await?;
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut i = 0;
    while i < count {
        let end = (i + batch.max(1)).min(count);
        let mut rows = Vec::with_capacity((end - i) as usize);
        for j in i..end {
            let key = SessionKey::chosen(SecretString::from(seed_key(j)))?;
            rows.push((
                key.hash(),
                NewTokens {
                    access_token: SecretString::from(format!("seed-at-{j}")),
                    refresh_token: Some(SecretString::from(format!("seed-rt-{j}"))),
                    expires_in: Some(365 * 24 * 3600),
                },
            ));
        }
        sessions
            .add_many(&provider, rows, credproxy::audit::Actor::Cli)
            .await
            .with_context(|| format!("sessions {i} to {end}"))?;
        i = end;
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!(
                "seed: {i} of {count} ({:.0} sessions/s)",
                i as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "seed: added {i} sessions in {:.1} s ({:.0}/s, bulk, batches of {batch})",
        started.elapsed().as_secs_f64(),
        i as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}
