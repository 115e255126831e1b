//! The rotation journal: refreshed tokens written to a local file the
//! moment the token endpoint's answer is read, before anything else.
//!
//! A provider that rotates refresh tokens spends the old one when it
//! answers; until the new pair is in the store, a crash loses the session.
//! The store's commit (a writer, a group commit, an fsync) takes
//! milliseconds under load; one `write(2)` of the sealed tokens to a new
//! file takes microseconds, and survives `kill -9` (the kernel keeps what a
//! process wrote, fsync or not; the store's fsync then covers power loss).
//! The entry is removed once the commit returns.
//!
//! At start-up, `serve` commits what a process that died left here
//! ([`crate::tokens::refresh::Refresher::recover_rotations`]): an entry whose
//! writer is gone (its process no longer runs, or it is older than any
//! live refresh can be) and whose session still has the version the
//! refresh started from. Entries hold the tokens sealed, as the store does:
//! the directory holds no secret in clear (it is created 0700, files 0600).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::store::SealedTokens;

/// An entry older than this belongs to no refresh still under way (a
/// refresh's lease, within which it commits or gives up, is far shorter).
const LIVE_BOUND_SECS: i64 = 120;

/// The journal's directory, or none (off).
pub struct Journal {
    dir: Option<PathBuf>,
    /// Whether the directory exists: made at the first write, so that
    /// commands that never refresh leave nothing behind.
    made: std::sync::OnceLock<bool>,
    /// Numbers this process's entries.
    next: AtomicU64,
}

/// One rotation, as written.
#[derive(Serialize, Deserialize)]
struct Record {
    id: String,
    provider: String,
    /// The refresh lease's owner that wrote it (`PID-RANDOM`).
    owner: String,
    /// The session's version the refresh started from.
    version: i64,
    /// Whether the access token can be sent (else only the refresh token
    /// is kept, as the refresh itself does).
    usable: bool,
    access_token: String,
    refresh_token: Option<String>,
    expires_at: Option<i64>,
    /// Unix seconds when written.
    at: i64,
}

/// A rotation left by a process that is gone.
pub struct Pending {
    path: PathBuf,
    /// Unix seconds when written.
    at: i64,
    pub id: String,
    pub provider: String,
    pub owner: String,
    pub version: i64,
    pub usable: bool,
    pub tokens: SealedTokens,
}

/// An entry written for a refresh under way; [`Journal::done`] removes it.
#[must_use]
pub struct Entry(Option<PathBuf>);

impl Journal {
    /// The journal in `dir`, created (0700) at the first write; `None`:
    /// off, and only the store's commit protects a rotation.
    pub fn new(dir: Option<&Path>) -> Journal {
        Journal {
            dir: dir.map(Path::to_path_buf),
            made: std::sync::OnceLock::new(),
            next: AtomicU64::new(0),
        }
    }

    /// The directory, created if need be; `None` if off or it cannot be
    /// made (logged once: refreshes go on, protected by the commit alone).
    fn dir(&self) -> Option<&Path> {
        let dir = self.dir.as_deref()?;
        let made = *self.made.get_or_init(|| {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            match builder.create(dir) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot create the rotation journal's directory (store.rotation_journal): a crash between a refresh and its commit loses that session");
                    false
                }
            }
        });
        made.then_some(dir)
    }

    /// Writes a rotation: one new file, one `write(2)`, no fsync.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &self,
        id: &str,
        provider: &str,
        owner: &str,
        version: i64,
        usable: bool,
        tokens: &SealedTokens,
        now: i64,
    ) -> Entry {
        let Some(dir) = self.dir() else {
            return Entry(None);
        };
        let record = Record {
            id: id.to_owned(),
            provider: provider.to_owned(),
            owner: owner.to_owned(),
            version,
            usable,
            access_token: B64.encode(&tokens.access_token),
            refresh_token: tokens.refresh_token.as_ref().map(|t| B64.encode(t)),
            expires_at: tokens.expires_at,
            at: now,
        };
        let Ok(mut bytes) = serde_json::to_vec(&record) else {
            return Entry(None);
        };
        bytes.push(b'\n');
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{owner}.{n}.rotation"));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let written = options.open(&path).and_then(|mut f| f.write_all(&bytes));
        match written {
            Ok(()) => Entry(Some(path)),
            Err(e) => {
                tracing::warn!(session = %id, error = %e, "cannot write the rotation journal; the store's commit alone protects this refresh");
                let _ = std::fs::remove_file(&path);
                Entry(None)
            }
        }
    }

    /// The commit returned: the entry is no longer needed.
    pub fn done(&self, entry: Entry) {
        if let Some(path) = entry.0 {
            remove(&path);
        }
    }

    /// The rotations left by processes that are gone (never `me`'s).
    /// Unreadable entries (a process killed between creating the file and
    /// writing it) are removed.
    pub fn pending(&self, me: &str, now: i64) -> Vec<Pending> {
        // Nothing to read where nothing was ever written.
        let Some(dir) = self.dir.as_deref().filter(|d| d.is_dir()) else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "rotation") {
                continue;
            }
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let Some(pending) = parse(&bytes, path.clone()) else {
                tracing::warn!(file = %path.display(), "removing an unreadable rotation journal entry");
                remove(&path);
                continue;
            };
            let owner = &pending.owner;
            if owner == me || (alive(owner) && now - pending.at < LIVE_BOUND_SECS) {
                continue;
            }
            found.push(pending);
        }
        found
    }

    /// Removes a pending entry (recovered, or no longer applicable).
    pub fn forget(&self, pending: &Pending) {
        remove(&pending.path);
    }
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove a rotation journal entry");
        }
    }
}

fn parse(bytes: &[u8], path: PathBuf) -> Option<Pending> {
    let r: Record = serde_json::from_slice(bytes).ok()?;
    let access_token = B64.decode(&r.access_token).ok()?;
    let refresh_token = match &r.refresh_token {
        Some(t) => Some(B64.decode(t).ok()?),
        None => None,
    };
    Some(Pending {
        path,
        at: r.at,
        id: r.id,
        provider: r.provider,
        owner: r.owner,
        version: r.version,
        usable: r.usable,
        tokens: SealedTokens {
            access_token,
            refresh_token,
            expires_at: r.expires_at,
        },
    })
}

/// Whether the process named by a lease owner (`PID-RANDOM`) is gone, as
/// far as this machine can tell (a PID that runs and is no zombie is alive).
pub fn owner_gone(owner: &str) -> bool {
    !alive(owner)
}

/// Whether the process that owns `owner` (`PID-RANDOM`) may still run: its
/// PID is in use by a process that is not a zombie (killed, not yet reaped
/// by its parent), and is not this process's (a restarted container reuses
/// its PIDs). Where `/proc` is not there, every owner counts as alive.
fn alive(owner: &str) -> bool {
    let Some(pid) = owner.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    if pid == std::process::id() {
        return false;
    }
    if !Path::new("/proc/self").exists() {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `PID (COMM) STATE ...`; COMM may hold spaces and parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> SealedTokens {
        SealedTokens {
            access_token: vec![1, 2, 3],
            refresh_token: Some(vec![4, 5]),
            expires_at: Some(99),
        }
    }

    #[test]
    fn entries_of_gone_processes_are_pending_and_own_ones_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::new(Some(&dir.path().join("j")));
        let me = format!("{}-me", std::process::id());
        let mine = journal.write("s1", "spark", &me, 3, true, &tokens(), 1000);
        // PID 0 never names a running process here.
        let dead = journal.write("s2", "spark", "0-gone", 7, false, &tokens(), 1000);
        // A PID that runs (ours), under another owner: a previous
        // incarnation of this container's process.
        let reused = format!("{}-before", std::process::id());
        let _ = journal.write("s3", "zillow", &reused, 1, true, &tokens(), 1000);
        let mut pending = journal.pending(&me, 1001);
        pending.sort_by(|a, b| a.id.cmp(&b.id));
        let ids: Vec<&str> = pending.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["s2", "s3"]);
        assert_eq!(pending[0].version, 7);
        assert!(!pending[0].usable);
        assert_eq!(pending[0].tokens.access_token, vec![1, 2, 3]);
        assert_eq!(pending[0].tokens.refresh_token, Some(vec![4, 5]));
        assert_eq!(pending[0].tokens.expires_at, Some(99));
        for p in &pending {
            journal.forget(p);
        }
        journal.done(mine);
        journal.done(dead);
        assert!(journal.pending(&me, 1001).is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("j"))
                .expect("dir")
                .count(),
            0,
            "nothing left behind"
        );
    }

    #[test]
    fn a_running_process_is_alive_and_a_zombie_is_gone() {
        let mut running = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        assert!(!owner_gone(&format!("{}-x", running.id())));
        running.kill().expect("kill");
        // Killed, not yet reaped: a zombie, which no longer holds anything.
        let zombie = running.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !owner_gone(&format!("{zombie}-x")) {
            assert!(
                std::time::Instant::now() < deadline,
                "a zombie counts as alive"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        running.wait().expect("reap");
        assert!(owner_gone(&format!("{zombie}-x")), "reaped");
        assert!(owner_gone(&format!("{}-other", std::process::id())));
        assert!(owner_gone("not-a-pid"));
    }

    #[test]
    fn a_torn_entry_is_removed_and_a_missing_directory_disables_the_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::new(Some(dir.path()));
        std::fs::write(dir.path().join("0-x.0.rotation"), b"{\"id\":").expect("write");
        assert!(journal.pending("1-me", 0).is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);

        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").expect("write");
        let journal = Journal::new(Some(&file.join("j")));
        let entry = journal.write("s", "spark", "0-x", 1, true, &tokens(), 0);
        assert!(entry.0.is_none());
        assert!(journal.pending("1-me", 0).is_empty());
    }
}
