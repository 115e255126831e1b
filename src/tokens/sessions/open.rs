//! Opening the store and the sealing key together ([`Sessions::open`]):
//! they must belong together, so a lost or replaced key stops start-up
//! instead of turning every session into a 500.

use super::{vault::aad, Sessions};
use crate::config::{Config, KeySource};
use crate::secrets::seal::{KeyError, Sealer};
use crate::store::{self, StoreError};

/// Whether [`Sessions::open_with`] creates a store file or key file that is missing.
#[derive(Clone, Copy)]
enum Create {
    Yes,
    No,
}

/// Whether a file could be created at `path` (which does not exist): its
/// directory exists and is a directory.
fn can_create(path: &std::path::Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if std::fs::metadata(dir)?.is_dir() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            format!("{} is not a directory", dir.display()),
        ))
    }
}

/// Why the store and the sealing key could not be opened together. The
/// texts name what is missing and where, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store.url: cannot open {shown}: {reason}")]
    Store { shown: String, reason: StoreError },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{key} {path} does not exist, but the store ({store}) holds {sealed} session(s) sealed under the key it held, and a new key could not open them, so none is made. Restore the key file from your backup (or point {key} or store.key_env at the key). If the key is lost for good, so are the stored tokens: empty the store (delete its sessions, or start from a new database or SQLite file) and connect the accounts again; a new key is then made.")]
    KeyMissing {
        key: &'static str,
        path: String,
        store: String,
        sealed: i64,
    },
    #[error("the sealing key ({key}) does not open the stored sessions: session {session} in {store} was sealed under another key. The key was replaced, or belongs to another store: restore the key this store was sealed with.")]
    WrongKey {
        key: String,
        session: String,
        store: String,
    },
}

impl Sessions {
    /// Opens the configured store and sealing key, and proves that they
    /// belong together: the newest stored session's access token must open.
    /// A key file is created only while the store holds no session (a new
    /// key could open none of them). Returns warnings for the operator (a
    /// key file others can read).
    pub async fn open(config: &Config) -> Result<(Sessions, Vec<String>), StartError> {
        let (sessions, warnings, _) = Sessions::open_with(config, Create::Yes).await?;
        Ok((sessions, warnings))
    }

    /// [`Sessions::open`] that creates nothing (for `check`): a SQLite file
    /// that does not exist yet is stood in for by an empty in-memory store,
    /// a key file that does not exist yet (while the store holds no
    /// session) by a key in memory. Returns also what `open` would create,
    /// as sentences ("would create the key file at PATH").
    pub async fn open_without_creating(
        config: &Config,
    ) -> Result<(Sessions, Vec<String>, Vec<String>), StartError> {
        Sessions::open_with(config, Create::No).await
    }

    async fn open_with(
        config: &Config,
        create: Create,
    ) -> Result<(Sessions, Vec<String>, Vec<String>), StartError> {
        use secrecy::ExposeSecret;
        let shown = config.store.shown_url();
        let in_store = |reason| StartError::Store {
            shown: shown.clone(),
            reason,
        };
        let mut would_create = Vec::new();
        let new_file = match (create, config.store.sqlite_file()) {
            (Create::No, Some(file)) if !file.exists() => Some(file),
            _ => None,
        };
        let store = match new_file {
            Some(file) => {
                can_create(&file).map_err(|e| {
                    in_store(StoreError::Open(format!("cannot create the file: {e}")))
                })?;
                would_create.push(format!(
                    "would create the SQLite store at {}",
                    file.display()
                ));
                store::open("sqlite::memory:").await.map_err(in_store)?
            }
            None => store::open(config.store.url.expose_secret())
                .await
                .map_err(in_store)?,
        };
        let mut warnings = Vec::new();
        let sealer = match (Sealer::load_existing(&config.store.key)?, &config.store.key) {
            (Some(sealer), _) => sealer,
            (None, KeySource::File(path)) => {
                let sealed: i64 = store
                    .count_sessions()
                    .await
                    .map_err(in_store)?
                    .iter()
                    .map(|c| c.count)
                    .sum();
                if sealed > 0 {
                    return Err(StartError::KeyMissing {
                        key: "store.key_file",
                        path: path.display().to_string(),
                        store: shown,
                        sealed,
                    });
                }
                match create {
                    Create::Yes => Sealer::create_key_file(path)?,
                    Create::No => {
                        can_create(path).map_err(|source| KeyError::File {
                            path: path.display().to_string(),
                            source,
                        })?;
                        would_create.push(format!(
                            "would create the key file at {} (mode 0600; back it up)",
                            path.display()
                        ));
                        Sealer::from_ring(&crate::secrets::seal::Ring::generate(
                            store::now_ms() / 1000,
                        ))
                    }
                }
            }
            // An environment variable that is not set is an error of its own.
            (None, KeySource::Env(var)) => return Err(KeyError::EnvMissing(var.clone()).into()),
            // A command that printed nothing usable fails in load_existing.
            (None, KeySource::Command { .. }) => {
                return Err(KeyError::Command("printed no ring".to_owned()).into())
            }
        };
        if let KeySource::File(path) = &config.store.key {
            warnings.extend(crate::secrets::seal::key_file_warning(path));
        }
        if let Some(rec) = store.newest_session().await.map_err(in_store)? {
            if sealer
                .open(&rec.access_token, &aad(&rec.id, "access"))
                .is_err()
            {
                return Err(StartError::WrongKey {
                    key: config.store.key.describe(),
                    session: rec.id,
                    store: shown,
                });
            }
        }
        Ok((Sessions::new(store, sealer, config), warnings, would_create))
    }
}
