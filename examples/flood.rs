//! A flood of random session keys at a fixed rate, from a chosen local
//! address, for `benches/scale.sh`:
//!
//! ```text
//! cargo run --release --example flood -- URL RATE SECONDS [LOCAL_ADDR] [CONNECTIONS] [--same-key]
//! ```
//!
//! With `--same-key` every request presents one unknown key (after the
//! first, negative-cache hits: 401 without a store read), the control that
//! shows what serving RATE rejected requests a second costs by itself.
//!
//! Sends `GET URL` with `X-Credproxy-Session: flood-RANDOM` RATE times a
//! second (paced per connection; CONNECTIONS default 32) for SECONDS, from
//! LOCAL_ADDR (default 127.0.0.2: every 127/8 address is this machine on
//! Linux, so the flood has a client address, and a budget, of its own).
//! Prints what it sent and how credproxy answered (401 unknown, 429 over
//! budget). Loopback only: refuses a URL that is not on 127.0.0.0/8.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let same_key = args.iter().any(|a| a == "--same-key");
    args.retain(|a| a != "--same-key");
    let (Some(url), Some(rate), Some(secs)) = (args.first(), args.get(1), args.get(2)) else {
        anyhow::bail!("usage: flood URL RATE SECONDS [LOCAL_ADDR] [CONNECTIONS]");
    };
    anyhow::ensure!(
        url.starts_with("http://127."),
        "flood only targets loopback (http://127.x.y.z:PORT/...)"
    );
    let rate: f64 = rate.parse().context("RATE must be a number")?;
    let secs: f64 = secs.parse().context("SECONDS must be a number")?;
    let local: IpAddr = args
        .get(3)
        .map_or("127.0.0.2", String::as_str)
        .parse()
        .context("LOCAL_ADDR must be an IP address")?;
    let connections: u32 = match args.get(4) {
        Some(c) => c.parse().context("CONNECTIONS must be a number")?,
        None => 32,
    };
    anyhow::ensure!(
        rate > 0.0 && secs > 0.0 && connections > 0,
        "positive numbers only"
    );
    let client = reqwest::Client::builder()
        .no_proxy()
        .local_address(local)
        .pool_max_idle_per_host(connections as usize)
        .timeout(Duration::from_secs(10))
        .build()?;
    let counts: Arc<[AtomicU64; 5]> = Arc::new(Default::default()); // sent, 401, 429, other, errors
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    let period = Duration::from_secs_f64(connections as f64 / rate);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..connections {
        let (client, url, counts) = (client.clone(), url.clone(), Arc::clone(&counts));
        tasks.spawn(async move {
            // Spread the connections' ticks over one period.
            let offset = period.mul_f64(c as f64 / connections as f64);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                if Instant::now() >= until {
                    return;
                }
                let key = if same_key {
                    "flood-one-unknown-key".to_owned()
                } else {
                    format!("flood-{:032x}", rand::random::<u128>())
                };
                counts[0].fetch_add(1, Ordering::Relaxed);
                let slot = match client
                    .get(&url)
                    .header("X-Credproxy-Session", key)
                    .send()
                    .await
                {
                    Ok(r) => match r.status().as_u16() {
                        401 => 1,
                        429 => 2,
                        _ => 3,
                    },
                    Err(_) => 4,
                };
                counts[slot].fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("flood task")?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = |i: usize| counts[i].load(Ordering::Relaxed);
    println!(
        "flood{}: sent {} in {elapsed:.1} s ({:.0}/s) from {local}: {} x 401, {} x 429, {} other, {} errors; flood client cpu {}",
        if same_key { " (one key)" } else { "" },
        n(0),
        n(0) as f64 / elapsed,
        n(1),
        n(2),
        n(3),
        n(4),
        own_cpu().map_or_else(|| "?".to_owned(), |s| format!("{:.0}% of a core", 100.0 * s / elapsed)),
    );
    Ok(())
}

/// This process's user + system CPU seconds (/proc/self/stat, 100 ticks a second).
fn own_cpu() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces), 1-based from
    // field 3: utime is field 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
