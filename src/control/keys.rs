//! The `credproxy key ...` commands: list, rotate, rewrap and retire the
//! ring of sealing keys (formats and sealing: `secrets::seal`; how a running
//! server follows the ring: `secrets::live`; the re-sealing: `secrets::rewrap`).
//!
//! Only a `key_file` ring is changed here, under a lock beside the file (two
//! changes at once would each write the ring they read, losing the other's
//! key). With `key_env` or `key_command` credproxy changes nothing: the
//! commands print what to change, and exit 1.

use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{bail, Context};

use crate::audit;
use crate::config::{Config, KeySource};
use crate::control::rewrap::{self, Progress};
use crate::secrets::seal::{load_ring, write_key_file, KeyId, Ring};
use crate::store::SealedCount;
use crate::tokens::sessions::{rfc3339, Sessions};

/// Values sealed under each key id (`None`: legacy values, under the ring's
/// legacy key), by the store's count.
struct Counts {
    counts: Vec<SealedCount>,
    legacy: Option<KeyId>,
}

impl Counts {
    async fn read(sessions: &Sessions, ring: &Ring) -> anyhow::Result<Counts> {
        Ok(Counts {
            counts: sessions.store().count_sealed_by_key().await?,
            legacy: ring.keys().iter().find(|k| k.is_legacy()).map(|k| k.id),
        })
    }

    fn sealed_under(&self, id: KeyId) -> i64 {
        let hex = id.to_string();
        self.counts
            .iter()
            .filter(|c| match &c.key_id {
                Some(k) => *k == hex,
                None => self.legacy == Some(id),
            })
            .map(|c| c.count)
            .sum()
    }

    /// Warnings for values sealed under a key the ring does not hold.
    fn strays(&self, ring: &Ring) -> Vec<String> {
        self.counts
            .iter()
            .filter(|c| match &c.key_id {
                Some(k) => !ring
                    .keys()
                    .iter()
                    .any(|r| !r.audit_only && r.id.to_string() == *k),
                None => self.legacy.is_none(),
            })
            .map(|c| {
                format!(
                    "{} stored value(s) sealed under key {}, which the ring cannot open",
                    c.count,
                    c.key_id.as_deref().unwrap_or("(legacy, before key ids)")
                )
            })
            .collect()
    }
}

fn ring_of(config: &Config) -> anyhow::Result<Ring> {
    match load_ring(&config.store.key)? {
        Some(ring) => Ok(ring),
        None => bail!("the sealing key is missing"),
    }
}

/// Appends a key command's audit row, chained under `ring`'s primary (the
/// ring as it is after the change). The change has happened: a failure to
/// record it is a warning, not the command's failure.
async fn record(sessions: &Sessions, ring: &Ring, kind: &str, detail: serde_json::Value) {
    let sealer = crate::secrets::seal::Sealer::from_ring(ring);
    if let Err(e) =
        super::audit::record_key_event(sessions.store().as_ref(), &sealer, kind, detail).await
    {
        eprintln!("credproxy: warning: the change could not be recorded in the audit trail: {e}");
    }
}

/// `key list [--json]`.
pub async fn list(config: &Config, sessions: &Sessions, json: bool) -> anyhow::Result<()> {
    let ring = ring_of(config)?;
    let counts = Counts::read(sessions, &ring).await?;
    let primary = ring.primary_id();
    let rows: Vec<serde_json::Value> = ring
        .keys()
        .iter()
        .map(|k| {
            serde_json::json!({
                "id": k.id.to_string(),
                "primary": k.id == primary,
                "sealed": counts.sealed_under(k.id),
                "created_at": k.created_at.map(rfc3339),
                "audit_only": k.audit_only,
            })
        })
        .collect();
    for w in counts.strays(&ring) {
        eprintln!("credproxy: warning: {w}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let table: Vec<[String; 5]> = rows
        .iter()
        .zip(ring.keys())
        .map(|(r, k)| {
            [
                k.id.to_string(),
                if k.id == primary { "yes" } else { "" }.to_owned(),
                r["sealed"].as_i64().unwrap_or_default().to_string(),
                r["created_at"].as_str().unwrap_or("-").to_owned(),
                if k.audit_only {
                    "retired; kept only to verify the audit trail"
                } else {
                    ""
                }
                .to_owned(),
            ]
        })
        .collect();
    print!("{}", keys_table(&table));
    Ok(())
}

/// `key list`'s table (as `session list` and `audit` lay theirs out).
fn keys_table(rows: &[[String; 5]]) -> String {
    let header = ["ID", "PRIMARY", "SEALED", "CREATED", "NOTE"].map(str::to_owned);
    let lines: Vec<[String; 5]> = std::iter::once(header)
        .chain(rows.iter().cloned())
        .collect();
    crate::table::columns(&lines)
}

/// Holds the lock beside a key file while the ring in it changes.
fn lock_beside(path: &Path) -> anyhow::Result<std::fs::File> {
    let lock_path = path.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("cannot lock {}", lock_path.display()))?;
    Ok(lock)
}

/// What to do instead with a ring credproxy does not write: `next` is the
/// ring as it should become.
fn say_what_to_change(config: &Config, next: &Ring, what: &str) -> anyhow::Error {
    match &config.store.key {
        KeySource::Env(var) => {
            // The primary goes first (the first sealing entry is primary).
            let mut entries: Vec<String> = Vec::new();
            let primary = next.primary_id();
            entries.extend(next.env_entry(primary));
            entries.extend(
                next.keys()
                    .iter()
                    .filter(|k| k.id != primary)
                    .filter_map(|k| next.env_entry(k.id)),
            );
            println!("{}", entries.join(","));
            anyhow::anyhow!(
                "store.key_env: credproxy does not change environment variables. {what}: set {var} to the line printed on stdout (the ring as it should be, primary first), and restart every instance"
            )
        }
        KeySource::Command { .. } => {
            print!("{}", next.to_file_text());
            anyhow::anyhow!(
                "store.key_command: credproxy does not change where the command reads the ring. {what}: store the text printed on stdout (the ring as it should be) where the command reads it; running servers read it again within store.key_reload_interval"
            )
        }
        KeySource::File(_) => anyhow::anyhow!("a key file is changed in place"),
    }
}

/// `key rotate`: a new random key, made primary.
pub async fn rotate(config: &Config, sessions: &Sessions) -> anyhow::Result<()> {
    let now = crate::store::now();
    let KeySource::File(path) = &config.store.key else {
        let ring = ring_of(config)?;
        let mut next = ring.clone();
        let id = next.rotate(now);
        return Err(say_what_to_change(
            config,
            &next,
            &format!("Key {id} is new and primary"),
        ));
    };
    let lock = lock_beside(path)?;
    // Read again under the lock: another rotation may just have written.
    let mut ring = ring_of(config)?;
    let id = ring.rotate(now);
    write_key_file(path, &ring)?;
    drop(lock);
    record(
        sessions,
        &ring,
        audit::kind::KEY_ROTATED,
        serde_json::json!({"key": id.to_string(), "keys": ring.keys().len()}),
    )
    .await;
    println!(
        "credproxy: key {id} added to {} and made primary ({} keys in the ring); running servers seal with it from their next write, and open what it seals at once",
        path.display(),
        ring.keys().len()
    );
    Ok(())
}

/// `key rewrap [--batch N]`: everything re-sealed under the primary, with
/// progress on stderr (at most one line a second).
pub async fn rewrap(sessions: &Sessions, batch: u32) -> anyhow::Result<()> {
    let primary = sessions.sealer().primary_id();
    let started = std::time::Instant::now();
    let mut last = started;
    let tty = std::io::stderr().is_terminal();
    let report = rewrap::rewrap(sessions, batch, |p: &Progress| {
        if last.elapsed() >= std::time::Duration::from_secs(1) {
            last = std::time::Instant::now();
            let pct = if p.values_at_start > 0 {
                (p.values as f64 * 100.0 / p.values_at_start as f64).min(100.0)
            } else {
                100.0
            };
            let line = format!(
                "credproxy: rewrap: {} of {} values ({pct:.0} %), {} rows, {:.0} rows/s",
                p.values,
                p.values_at_start,
                p.rows,
                p.rows as f64 / started.elapsed().as_secs_f64().max(1e-9)
            );
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                write!(err, "\r{line}")
            } else {
                writeln!(err, "{line}")
            };
        }
    })
    .await?;
    if tty && started.elapsed() >= std::time::Duration::from_secs(1) {
        eprintln!();
    }
    if let Err(e) = super::audit::record_key_event(
        sessions.store().as_ref(),
        &sessions.sealer(),
        audit::kind::KEY_REWRAPPED,
        serde_json::json!({
            "key": primary.to_string(),
            "values": report.progress.values,
            "sessions": report.progress.rows,
            "left": report.left,
            "unopenable": report.unopenable,
        }),
    )
    .await
    {
        eprintln!("credproxy: warning: the rewrap could not be recorded in the audit trail: {e}");
    }
    println!(
        "credproxy: re-sealed {} values ({} sessions) under key {primary} in {:.2} s ({:.0} rows/s)",
        report.progress.values,
        report.progress.rows,
        report.elapsed.as_secs_f64(),
        report.rows_per_second()
    );
    if report.conflicts > 0 {
        eprintln!(
            "credproxy: {} row(s) changed while being re-sealed were read again ({} passes)",
            report.conflicts, report.passes
        );
    }
    if report.unopenable > 0 {
        bail!(
            "{} session(s) hold a value no key of the ring opens; they were left as they are (see `credproxy key list`)",
            report.unopenable
        );
    }
    if report.left > 0 {
        bail!(
            "{} value(s) are still sealed under another key (a server that has not read the new ring yet keeps writing them): run `credproxy key rewrap` again",
            report.left
        );
    }
    Ok(())
}

/// `key retire ID`: refused while anything is sealed under the key; a key
/// that chained audit rows stays as an audit-only entry (`audit_rows`
/// counts them), which opens no token.
pub async fn retire(config: &Config, sessions: &Sessions, id: &str) -> anyhow::Result<()> {
    let Some(id) = KeyId::parse(id) else {
        bail!("`{id}` is not a key id (8 hex digits, as `credproxy key list` shows)");
    };
    let check = async |ring: &Ring| -> anyhow::Result<(i64, i64)> {
        let Some(entry) = ring.get(id) else {
            bail!("the ring holds no key {id} (see `credproxy key list`)");
        };
        if entry.id == ring.primary_id() {
            bail!("key {id} is the primary key: run `credproxy key rotate`, then `credproxy key rewrap`, then retire it");
        }
        let sealed = Counts::read(sessions, ring).await?.sealed_under(id);
        let hex = id.to_string();
        let audit: i64 = sessions
            .store()
            .count_audit_by_key()
            .await?
            .iter()
            .filter(|(k, _)| *k == hex)
            .map(|(_, n)| n)
            .sum();
        Ok((sealed, audit))
    };
    let refuse = |sealed: i64| {
        anyhow::anyhow!(
            "key {id} still seals {sealed} stored value(s): run `credproxy key rewrap` first (retiring it would make them unreadable)"
        )
    };
    let retired = |ring: &Ring, audit: i64| -> anyhow::Result<Ring> {
        let mut next = ring.clone();
        next.retire(id, audit > 0)?;
        Ok(next)
    };
    let what = |audit: i64| {
        if audit > 0 {
            format!(
                "key {id} retired; {audit} audit row(s) were chained under it, so its audit key (which opens no token) stays in the ring, marked audit-only"
            )
        } else {
            format!("key {id} retired and removed from the ring")
        }
    };
    let KeySource::File(path) = &config.store.key else {
        let ring = ring_of(config)?;
        let (sealed, audit) = check(&ring).await?;
        if sealed > 0 {
            return Err(refuse(sealed));
        }
        let next = retired(&ring, audit)?;
        return Err(say_what_to_change(config, &next, &what(audit)));
    };
    let lock = lock_beside(path)?;
    let ring = ring_of(config)?;
    let (sealed, audit) = check(&ring).await?;
    if sealed > 0 {
        return Err(refuse(sealed));
    }
    let next = retired(&ring, audit)?;
    write_key_file(path, &next)?;
    // A server that had not read the new ring yet may have sealed a value
    // under this key between the count and the write: count again, and put
    // the key back if so.
    let sealed = Counts::read(sessions, &ring).await?.sealed_under(id);
    if sealed > 0 {
        write_key_file(path, &ring)?;
        drop(lock);
        return Err(refuse(sealed));
    }
    drop(lock);
    record(
        sessions,
        &next,
        audit::kind::KEY_RETIRED,
        serde_json::json!({"key": id.to_string(), "audit_only": audit > 0}),
    )
    .await;
    println!("credproxy: {}", what(audit));
    Ok(())
}
