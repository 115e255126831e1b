//! Measures what sessions cost at scale, on a store seeded by
//! `examples/seed.rs` (keys `seed-session-key-{i:08}`):
//!
//! ```text
//! cargo run --release --example scale_probe -- CONFIG [SAMPLES] [CACHE]
//! ```
//!
//! 1. resident memory (`VmRSS` of /proc/self/status) before and after
//!    caching CACHE sessions (default 100,000: sessions 0..CACHE, looked up
//!    once each), and so the bytes one cached session costs;
//! 2. SAMPLES (default 2,000) cold lookups (`Sessions::by_key` of a seeded
//!    key not in the cache, spread over the whole store), one at a time:
//!    p50, p99 and max, and the store reads they took (one each);
//! 3. as many lookups of keys the store does not hold (a flood's first
//!    sight of each key), then the same keys again (negative-cache hits).
//!
//! The store must hold at least CACHE + SAMPLES sessions. Prints one
//! `scale_probe:` line per figure.

use std::time::{Duration, Instant};

use anyhow::Context;
use credproxy::config::Config;
use credproxy::secrets::session::KeyHash;
use credproxy::tokens::sessions::Sessions;

fn seed_key(i: u64) -> KeyHash {
    KeyHash::of(format!("seed-session-key-{i:08}").as_bytes())
}

fn rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort_unstable();
    println!(
        "scale_probe: {what}: n={} p50={:.0}us p99={:.0}us max={:.0}us",
        times.len(),
        percentile(&times, 0.50).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6,
        times.last().copied().unwrap_or_default().as_secs_f64() * 1e6,
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(config) = args.first() else {
        anyhow::bail!("usage: scale_probe CONFIG [SAMPLES] [CACHE]");
    };
    let samples: u64 = match args.get(1) {
        Some(s) => s.parse().context("SAMPLES must be a number")?,
        None => 2000,
    };
    let cache: u64 = match args.get(2) {
        Some(c) => c.parse().context("CACHE must be a number")?,
        None => 100_000,
    };
    let config = Config::load(std::path::Path::new(config))?;
    let (sessions, _) = Sessions::open(&config).await?;
    let stored: i64 = sessions
        .store()
        .count_sessions()
        .await?
        .iter()
        .map(|c| c.count)
        .sum();
    let stored = stored as u64;
    anyhow::ensure!(
        stored >= cache + samples,
        "the store holds {stored} sessions; seed at least {} (examples/seed.rs --bulk)",
        cache + samples
    );
    println!(
        "scale_probe: store {} with {stored} sessions; cache capacity {}",
        config.store.shown_url(),
        sessions.cache().capacity()
    );

    // Warm the pool, the statement cache and the allocator's arenas first,
    // then forget what that cached.
    for i in 0..100 {
        sessions.by_key(&seed_key(stored - 1 - i)).await?;
    }
    let before = rss_kib()?;
    let fill = Instant::now();
    for i in 0..cache {
        sessions
            .by_key(&seed_key(i))
            .await?
            .with_context(|| format!("seeded session {i} is missing"))?;
    }
    let fill = fill.elapsed();
    let after = rss_kib()?;
    let (cached, _) = sessions.cache().sizes();
    println!(
        "scale_probe: rss {before} KiB before, {after} KiB after caching {cached} sessions: {:.0} bytes per cached session (filled at {:.0} lookups/s)",
        (after.saturating_sub(before) * 1024) as f64 / cached.max(1) as f64,
        cache as f64 / fill.as_secs_f64()
    );

    // Cold lookups spread over the store, past the cached ones.
    let span = stored - cache;
    let step = (span / samples).max(1);
    let reads = sessions.key_reads();
    let mut times = Vec::with_capacity(samples as usize);
    for n in 0..samples {
        let i = cache + (n * step) % span;
        let hash = seed_key(i);
        let t = Instant::now();
        let found = sessions.by_key(&hash).await?;
        times.push(t.elapsed());
        anyhow::ensure!(found.is_some(), "seeded session {i} is missing");
    }
    println!(
        "scale_probe: {} store reads for {samples} cold lookups",
        sessions.key_reads() - reads
    );
    report("cold lookup (uncached key, 1 indexed read)", times);

    let unknown = |n: u64| KeyHash::of(format!("unknown-probe-key-{n:08}").as_bytes());
    let mut times = Vec::with_capacity(samples as usize);
    for n in 0..samples {
        let t = Instant::now();
        let found = sessions.by_key(&unknown(n)).await?;
        times.push(t.elapsed());
        anyhow::ensure!(found.is_none(), "an unknown key was found");
    }
    report("unknown key, first sight (1 store read)", times);
    let reads = sessions.key_reads();
    let mut times = Vec::with_capacity(samples as usize);
    for n in 0..samples {
        let t = Instant::now();
        sessions.by_key(&unknown(n)).await?;
        times.push(t.elapsed());
    }
    report("unknown key again (negative cache)", times);
    println!(
        "scale_probe: {} store reads for {samples} repeated unknown keys",
        sessions.key_reads() - reads
    );
    Ok(())
}
