//! The `credproxy` command line: `serve`, `session ...` and `check`.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};

use credproxy::config::{Config, Needs, DEFAULT_PATH};
use credproxy::secrets::session::SessionKey;
use credproxy::tokens::refresh::{RefreshError, Refresher};
use credproxy::tokens::sessions::{
    NewTokens, RevokedBy, ScopeAsked, SessionError, SessionInfo, Sessions,
};
use credproxy::{server, telemetry};

/// mimalloc instead of glibc's malloc: the hot path allocates and frees a
/// handful of small buffers per request (header maps, body frames, the
/// pool's bookkeeping), and glibc's malloc/free were ~10 % of a worker's CPU
/// in issue 15's profile (mimalloc's thread-local free lists: ~1 %).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A reverse proxy that injects OAuth 2 credentials, so applications call
/// Spark and Zillow with a session key and never hold a token.
#[derive(Parser)]
#[command(
    name = "credproxy",
    version,
    about,
    long_about = None,
    after_help = "Relative paths in the config file are relative to its directory.\n\
        These environment variables, when set, take precedence over the config file:\n  \
        CREDPROXY_LISTEN (server.listen), CREDPROXY_ADMIN_LISTEN (server.admin_listen),\n  \
        CREDPROXY_STORE_URL (store.url), CREDPROXY_KEY_FILE (store.key_file),\n  \
        CREDPROXY_ROTATION_JOURNAL (store.rotation_journal)"
)]
struct Cli {
    /// The configuration file.
    #[arg(long, global = true, env = "CREDPROXY_CONFIG", default_value = DEFAULT_PATH, value_name = "PATH")]
    config: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and the admin listener until SIGINT or SIGTERM, then
    /// let in-flight requests finish (up to server.shutdown_grace).
    Serve,
    /// Manage sessions in the configured store (works with or without a running server).
    #[command(subcommand)]
    Session(SessionCommand),
    /// Validate the configuration and reach the store; exit 0, or print what is wrong and exit 1.
    Check,
    /// Connect a provider account from a browser: prints the URL to open,
    /// waits for the running server's callback, then prints the new
    /// session's key (or, with --session, replaces that session's tokens
    /// and keeps its key).
    Connect(ConnectArgs),
    /// Event notifications ([notify]) kept in the store.
    #[command(subcommand)]
    Events(EventsCommand),
    /// The ring of sealing keys (store.key_file or store.key_env).
    #[command(subcommand)]
    Key(KeyCommand),
    /// The audit trail of control-plane events, newest last; `audit verify`
    /// checks its hash chain.
    Audit(AuditArgs),
    /// Print a shell completion script, e.g. `credproxy completions bash >
    /// /usr/share/bash-completion/completions/credproxy`. Reads no config.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page credproxy(1) as roff, e.g. `credproxy man >
    /// /usr/share/man/man1/credproxy.1`; with --dir, write it and a page for
    /// every subcommand (credproxy-session-add.1, ...) there. Reads no config.
    Man {
        /// Write credproxy.1 and one page per subcommand into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AuditArgs {
    #[command(subcommand)]
    cmd: Option<AuditCommand>,
    /// Only the rows about this session.
    #[arg(long, value_name = "ID")]
    session: Option<String>,
    /// Only rows at or after T: an RFC 3339 time, or a duration (2h, 30m,
    /// 1d) meaning that long ago.
    #[arg(long, value_name = "T")]
    since: Option<String>,
    /// At most N rows (the newest).
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: u32,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Walk the whole chain: recompute each row's mac with the audit key of
    /// the sealing key it names and check the links. Prints `ok: N rows`
    /// (exit 0), or the first broken link's seq and why (exit 1).
    Verify,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// The sealing keys: id, created, which is primary, and how many stored
    /// values each one seals.
    List {
        /// Print a JSON array of {"id", "primary", "sealed", "created_at"}.
        #[arg(long)]
        json: bool,
    },
    /// Add a new sealing key to store.key_file and make it primary: values
    /// sealed from now on use it, the old keys still open what they sealed.
    /// With store.key_env or store.key_command, prints the ring to set
    /// instead (and exits 1: nothing changed).
    Rotate,
    /// Re-seal every stored value under the primary key, online, in
    /// batches (each row a compare-and-swap, so a concurrent refresh wins);
    /// resumable: a second run does only what is left. Progress on stderr.
    Rewrap {
        /// Rows per transaction.
        #[arg(long, default_value_t = credproxy::control::rewrap::BATCH)]
        batch: u32,
    },
    /// Remove key ID from the ring; refused (exit 1, with the count) while
    /// any stored value is still sealed under it.
    Retire {
        /// The key's id, as `key list` shows it.
        id: String,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// The events not delivered yet: pending (with their attempts, last
    /// error and next attempt) and given up (older than notify.give_up_after).
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// Show at most this many, oldest first.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Only the given-up events.
        #[arg(long)]
        given_up: bool,
    },
    /// Put given-up events back for delivery: each is tried again at once
    /// (by a running server); one whose attempt fails is given up again.
    Retry(GivenUpArgs),
    /// Delete given-up events (they are also deleted notify.keep_given_up
    /// after they were given up).
    Clear(GivenUpArgs),
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct GivenUpArgs {
    /// The events' ids, as `events list` shows them.
    #[arg(value_name = "ID")]
    ids: Vec<String>,
    /// Every given-up event.
    #[arg(long)]
    all: bool,
}

impl GivenUpArgs {
    /// Each id once, so that the count found can be compared with it.
    fn dedup(&mut self) {
        self.ids.sort();
        self.ids.dedup();
    }

    /// The ids, or `None` for `--all`.
    fn ids(&self) -> Option<&[String]> {
        (!self.all).then_some(self.ids.as_slice())
    }
}

#[derive(Args)]
struct ConnectArgs {
    /// The provider's name, as in the config's [providers.NAME] table.
    provider: String,
    /// Reconnect this session (e.g. one in reauthorization_required): its
    /// tokens are replaced and its key stays, so applications need no change.
    #[arg(long, value_name = "ID")]
    session: Option<String>,
    /// Also open the URL in the default browser.
    #[arg(long)]
    open: bool,
    /// Give up waiting after this many seconds (the link is valid for 600).
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    timeout: u64,
    /// Print {"id", "session_key", "provider"} as one JSON object when done.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum SessionCommand {
    /// Store a session for tokens obtained elsewhere and print its id and
    /// session key. The key is shown only here: give it to the application.
    Add(AddArgs),
    /// List sessions: id, provider, status (with the last error and the next
    /// retry while a refresh fails), expiry, last refresh, last use, label.
    /// Never a token or a key.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a session. A running server stops honouring its key within 2 seconds.
    Revoke {
        /// The session's id (as shown by `session list`).
        id: String,
    },
    /// Refresh a session's tokens now, at the provider's token endpoint. Safe
    /// while a server runs: the refresh token is never spent twice.
    Refresh {
        /// The session's id (as shown by `session list`).
        id: String,
    },
    /// A session's keys: one per application, each revocable on its own
    /// and each limited to the methods, paths and rate it needs.
    #[command(subcommand)]
    Key(SessionKeyCommand),
}

#[derive(Subcommand)]
enum SessionKeyCommand {
    /// Add a key to session ID and print it once. Without options it may
    /// do anything the session can, like the key `session add` printed.
    Add(SessionKeyAddArgs),
    /// List the session's keys: key id, label, scope, created, expires,
    /// last use. Never a key.
    List {
        /// The session's id (as shown by `session list`).
        id: String,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke one key: it stops working within 2 seconds on every running
    /// server; the session and its other keys go on.
    Revoke {
        /// The session's id.
        id: String,
        /// The key's id (as shown by `session key list`).
        key_id: String,
    },
}

#[derive(Args)]
struct SessionKeyAddArgs {
    /// The session's id (as shown by `session list`).
    id: String,
    /// A note for people: which application holds this key.
    #[arg(long)]
    label: Option<String>,
    /// The methods it may use, separated by commas (e.g. GET,HEAD).
    #[arg(long, value_name = "METHODS")]
    methods: Option<String>,
    /// The paths it may use, after the provider's prefix, separated by
    /// commas; `*` matches any run of characters (e.g. /v1/listings*).
    #[arg(long, value_name = "PATTERN,...")]
    paths: Option<String>,
    /// Seconds until the key stops working.
    #[arg(long, value_name = "SECONDS")]
    expires_in: Option<u64>,
    /// Its own budget, N requests per DURATION (e.g. 100/1m): beyond it,
    /// 429 `rate_limited` at once. Counted by each server for itself.
    #[arg(long, value_name = "N/DURATION")]
    rate: Option<String>,
    /// Print {"key_id", "session_key"} as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct AddArgs {
    /// The provider's name, as in the config's [providers.NAME] table.
    #[arg(long)]
    provider: String,
    /// The access token (or a `static` provider's key); `-` reads it from
    /// standard input (keeps it out of `ps`).
    #[arg(long, value_name = "TOKEN", required_unless_present = "api_key")]
    access_token: Option<String>,
    /// Spark's API-key authentication (`kind = "spark_api_key"`): the API key.
    #[arg(long, value_name = "KEY", conflicts_with_all = ["access_token", "refresh_token", "expires_in"], requires = "api_secret_env")]
    api_key: Option<String>,
    /// The environment variable that holds the API key's secret.
    #[arg(long, value_name = "VAR", requires = "api_key")]
    api_secret_env: Option<String>,
    /// The `ApiUser` to act as, if any.
    #[arg(long, value_name = "USER", requires = "api_key")]
    api_user: Option<String>,
    /// The refresh token, if the provider issued one; `-` reads it from standard input.
    #[arg(long, value_name = "TOKEN")]
    refresh_token: Option<String>,
    /// Seconds until the access token expires, if known.
    #[arg(long, value_name = "SECONDS")]
    expires_in: Option<u64>,
    /// A note for people: which application or account this is.
    #[arg(long)]
    label: Option<String>,
    /// Use this session key instead of a random one (e.g. the "access token" a
    /// legacy application already has). If it names an existing session of
    /// the same provider, that session's tokens are replaced and its id kept.
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// Print {"id", "session_key", "provider"} as one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut log = None;
    let result = run(cli, &mut log);
    // Every log line out before the error lines below.
    drop(log);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Several problems (e.g. every missing secret) come one per line.
            for line in error_text(&e).lines() {
                eprintln!("credproxy: {line}");
            }
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, each said once. Many errors repeat their
/// source's text in their own (`cannot read x: No such file or directory`),
/// which anyhow's `{:#}` would print a second time.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if said.is_empty() || text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}

/// Runs the command; logging starts once the config (which says how lines
/// are written, and where traces go) is read, into `log`.
fn run(cli: Cli, log: &mut Option<telemetry::Guard>) -> anyhow::Result<()> {
    // What is printed from the command line's own description needs no config.
    match &cli.command {
        Command::Completions { shell } => return completions(*shell),
        Command::Man { dir } => return man(dir.as_deref()),
        _ => {}
    }
    // The config is read before the runtime exists: it sets the worker count.
    // Only serve and check need every secret; a command that calls a
    // provider asks for that provider's itself (`require_provider`).
    let needs = match cli.command {
        Command::Serve | Command::Check => Needs::Everything,
        _ => Needs::Store,
    };
    let config = Config::load_for(&cli.config, needs)?;
    let (default_level, settings) = match cli.command {
        Command::Serve => ("info", config.telemetry.clone()),
        // Only the server's requests are traced.
        _ => (
            "warn",
            telemetry::Settings {
                otlp_endpoint: None,
                ..config.telemetry.clone()
            },
        ),
    };
    // Before the runtime: the trace exporter's blocking HTTP client must
    // not be made (or dropped) on a runtime thread.
    *log = telemetry::init(default_level, &settings);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if matches!(cli.command, Command::Serve) {
        // The control plane: admin listener, acceptors, background tasks.
        // Requests are served by the proxy workers, each on a thread of
        // its own (`server.worker_threads`, see server/workers.rs).
        runtime.worker_threads(1).thread_name("credproxy-ctl");
    }
    runtime
        .build()
        .context("starting the tokio runtime")?
        .block_on(command(cli.command, config))
}

async fn command(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(config).await,
        Command::Check => check(config).await,
        Command::Connect(args) => connect(config, args).await,
        Command::Session(cmd) => session(config, cmd).await,
        Command::Events(cmd) => events(config, cmd).await,
        Command::Key(cmd) => key(config, cmd).await,
        Command::Audit(args) => audit(config, args).await,
        Command::Completions { shell } => completions(shell),
        Command::Man { dir } => man(dir.as_deref()),
    }
}

/// `credproxy completions SHELL`: the script, written whole (a closed pipe
/// is an error, not a panic).
fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use std::io::Write;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "credproxy", &mut script);
    std::io::stdout()
        .lock()
        .write_all(&script)
        .context("writing the completion script")
}

/// `credproxy man [--dir DIR]`: credproxy(1) on stdout, or every page in DIR.
fn man(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    use std::io::Write;
    let cmd = Cli::command();
    if let Some(dir) = dir {
        clap_mangen::generate_to(cmd, dir)
            .with_context(|| format!("writing the manual pages into {}", dir.display()))?;
        return Ok(());
    }
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut page)
        .context("rendering the manual page")?;
    std::io::stdout()
        .lock()
        .write_all(&page)
        .context("writing the manual page")
}

async fn key(config: Config, cmd: KeyCommand) -> anyhow::Result<()> {
    use credproxy::control::keys;
    // Proves the ring and the store belong together (and makes the key
    // file of a store that holds nothing yet), as every command does.
    let sessions = open_sessions(&config).await?;
    match cmd {
        KeyCommand::List { json } => keys::list(&config, &sessions, json).await,
        KeyCommand::Rotate => keys::rotate(&config, &sessions).await,
        KeyCommand::Rewrap { batch } => keys::rewrap(&sessions, batch).await,
        KeyCommand::Retire { id } => keys::retire(&config, &sessions, &id).await,
    }
}

async fn events(config: Config, cmd: EventsCommand) -> anyhow::Result<()> {
    if config.notify.is_none() {
        eprintln!("credproxy: note: [notify] is not configured, so no new events are recorded");
    }
    let store = credproxy::store::open(config.store.url.expose_secret()).await?;
    match cmd {
        EventsCommand::List {
            json,
            limit,
            given_up,
        } => {
            let rows = if given_up {
                store.list_given_up_events(limit).await?
            } else {
                store.list_events(limit).await?
            };
            if json {
                println!("{}", credproxy::notify::events_json(&rows));
            } else {
                print!("{}", credproxy::notify::events_table(&rows));
            }
        }
        EventsCommand::Retry(mut args) => {
            args.dedup();
            let n = store
                .retry_given_up_events(args.ids(), credproxy::store::now_ms())
                .await?;
            println!("credproxy: {n} given-up event(s) put back for delivery");
            if config.notify.is_none() {
                eprintln!("credproxy: note: without [notify] no server delivers them");
            }
            not_all_found(&args, n, "given up")?;
        }
        EventsCommand::Clear(mut args) => {
            args.dedup();
            let n = store.clear_given_up_events(args.ids()).await?;
            println!("credproxy: {n} given-up event(s) deleted");
            not_all_found(&args, n, "given up")?;
        }
    }
    Ok(())
}

/// Exit 1 when fewer of the named events than named were found in `state`.
fn not_all_found(args: &GivenUpArgs, n: u64, state: &str) -> anyhow::Result<()> {
    let named = args.ids().map_or(0, <[String]>::len);
    if args.ids().is_some() && (n as usize) < named {
        bail!(
            "{} of the {named} event(s) named are not {state} (unknown, delivered or pending)",
            named - n as usize
        );
    }
    Ok(())
}

async fn audit(config: Config, args: AuditArgs) -> anyhow::Result<()> {
    use credproxy::audit::{self, AuditFilter, Verdict};
    // Opens the ring with the store, as every command does: verify needs
    // the audit keys.
    let sessions = open_sessions(&config).await?;
    let store = sessions.store();
    match args.cmd {
        Some(AuditCommand::Verify) => {
            let sealer = sessions.sealer();
            let started = std::time::Instant::now();
            let mut said = started;
            let verdict = credproxy::control::audit::verify(store.as_ref(), &sealer, |n| {
                if said.elapsed() >= std::time::Duration::from_secs(2) {
                    said = std::time::Instant::now();
                    eprintln!("credproxy: audit verify: {n} rows checked");
                }
            })
            .await?;
            match verdict {
                Verdict::Ok { rows } => {
                    println!("ok: {rows} rows");
                    Ok(())
                }
                Verdict::Broken { seq, reason } => {
                    println!("broken: seq {seq}: {reason}");
                    bail!("the audit chain is broken at seq {seq}: {reason}")
                }
                Verdict::Unverifiable {
                    rows,
                    first_seq,
                    key_id,
                    checked,
                } => {
                    println!("not verifiable: {rows} of {checked} rows (the first: seq {first_seq}) were chained under key {key_id}, which the ring no longer holds; the links hold");
                    bail!("{rows} audit rows cannot be verified: key {key_id} is not in the ring")
                }
            }
        }
        None => {
            let since_ms = args
                .since
                .as_deref()
                .map(|t| audit::parse_since(t, credproxy::store::now_ms()))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--{e}"))?;
            let filter = AuditFilter {
                session_id: args.session,
                since_ms,
                limit: args.limit.clamp(1, audit::MAX_LIST),
            };
            let rows = store.list_audit(&filter).await?;
            if args.json {
                println!("{}", audit::cli::rows_json(&rows));
            } else {
                print!("{}", audit::cli::rows_table(&rows));
            }
            Ok(())
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Before anything opens a descriptor; `start` fits max_connections to it.
    server::raise_nofile_limit();
    let running = server::start(config).await?;
    // Printed whatever the log level, so people and scripts learn the ports
    // (also when a listen address asks for port 0).
    println!(
        "credproxy: proxy listening on http://{}",
        running.proxy_addr
    );
    for (name, addr) in &running.provider_addrs {
        println!("credproxy: provider {name} listening on http://{addr}");
    }
    println!(
        "credproxy: admin listening on http://{}",
        running.admin_addr
    );
    let stop = running.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: no new connections, draining in-flight requests");
        stop.cancel();
    });
    running.wait().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn open_sessions(config: &Config) -> anyhow::Result<Sessions> {
    let (sessions, warnings) = Sessions::open(config).await?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    Ok(sessions)
}

async fn connect(config: Config, args: ConnectArgs) -> anyhow::Result<()> {
    use credproxy::control::connect::{state_hash, Connector};
    use credproxy::store::OAuthOutcome;

    // The sign-in ends at the provider's token endpoint (in the server,
    // which reads the same config): its secrets must be there.
    config.require_provider(&args.provider)?;
    let sessions = Arc::new(open_sessions(&config).await?);
    let metrics = Arc::new(credproxy::metrics::Metrics::default());
    let refresher = Arc::new(Refresher::new(&config, Arc::clone(&sessions), metrics)?);
    let connector = Connector::new(&config, refresher);
    let provider = connector.provider(&args.provider)?;
    if provider.authorize_url.is_none() {
        bail!(
            "providers.{}.authorize_url is not configured",
            args.provider
        );
    }
    let label = provider.label.clone();
    // A new session gets its key here, so this terminal can show it; the
    // server only ever learns its hash.
    let key = match &args.session {
        Some(id) => {
            match sessions.info(id).await? {
                Some(info) if info.provider == args.provider => {}
                Some(info) => bail!("session {id} belongs to provider {}", info.provider),
                None => bail!("no session with id {id}"),
            }
            None
        }
        None => Some(SessionKey::generate()),
    };
    let state = connector
        .begin(
            &args.provider,
            args.session.clone(),
            key.as_ref().map(SessionKey::hash),
        )
        .await?;
    let hash = state_hash(state.state.expose_secret());
    let mut url = config.server.public_url.clone();
    url.set_path(&format!("/connect/{}", args.provider));
    url.query_pairs_mut()
        .append_pair("link", state.state.expose_secret());
    eprintln!("Open this link in a browser to connect {label} (valid for 10 minutes, once):");
    // With --json, stdout carries the one JSON object and nothing else.
    if args.json {
        eprintln!("{url}");
    } else {
        println!("{url}");
    }
    if args.open {
        if let Err(e) = webbrowser::open(url.as_str()) {
            eprintln!("(could not open a browser: {e}; open the link by hand)");
        }
    }
    eprintln!(
        "Waiting for the sign-in to complete (a credproxy server must be running at {})…",
        config.server.public_url
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(args.timeout);
    let outcome = loop {
        match sessions.store().oauth_outcome(&hash).await? {
            OAuthOutcome::Pending => {}
            done => break done,
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "no sign-in completed within {} s; run `credproxy connect` again",
                args.timeout
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    match outcome {
        OAuthOutcome::Stored { session_id } => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "id": session_id,
                        "session_key": key.as_ref().map(|k| k.expose()),
                        "provider": args.provider,
                    })
                );
            } else if let Some(key) = key {
                println!(
                    "session {session_id} connected for provider {}",
                    args.provider
                );
                println!("session key (shown only now): {}", key.expose());
            } else {
                println!("session {session_id} reconnected; its session key is unchanged");
            }
            Ok(())
        }
        OAuthOutcome::Failed { reason } => bail!("the sign-in did not complete: {reason}"),
        OAuthOutcome::Unknown | OAuthOutcome::Pending => {
            bail!("the sign-in link was lost; run `credproxy connect` again")
        }
    }
}

async fn check(config: Config) -> anyhow::Result<()> {
    // Opening proves the sealing key fits the store (one stored value opens).
    // Nothing is created: a store or key file that serve would create is
    // said, and stood in for in memory.
    let (sessions, key_warnings, would_create) = Sessions::open_without_creating(&config).await?;
    let sessions = Arc::new(sessions);
    // Building the proxy checks what parsing cannot: TLS roots, upstream authorities.
    let metrics = Arc::new(credproxy::metrics::Metrics::default());
    let refresher = Arc::new(Refresher::new(
        &config,
        Arc::clone(&sessions),
        Arc::clone(&metrics),
    )?);
    credproxy::proxy::Proxy::new(&config, Arc::clone(&sessions), refresher, metrics)?;
    sessions
        .store()
        .ping()
        .await
        .with_context(|| format!("store.url: cannot reach {}", config.store.shown_url()))?;
    // Counted by the store (a million sessions are not read to count them).
    let n: i64 = sessions
        .store()
        .count_sessions()
        .await?
        .iter()
        .map(|c| c.count)
        .sum();
    for w in config.warnings.iter().chain(&key_warnings) {
        println!("warning: {w}");
    }
    for what in &would_create {
        println!("{what}");
    }
    let store = match config.store.sqlite_file() {
        Some(file) if !file.exists() => "store not created yet (check creates nothing)".to_owned(),
        _ => format!("store reachable with {n} session(s)"),
    };
    println!(
        "ok: {} provider(s) configured ({}), {store}{}",
        config.providers.len(),
        config
            .providers
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if n > 0 {
            ", and the sealing key opens them"
        } else {
            ""
        }
    );
    Ok(())
}

/// Reads a secret argument, or a line of standard input when it is `-`.
fn secret_arg(value: String, what: &str) -> anyhow::Result<SecretString> {
    if value != "-" {
        return Ok(SecretString::from(value));
    }
    if std::io::stdin().is_terminal() {
        eprintln!("{what}: ");
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let line = line.trim_end_matches(['\r', '\n']).to_owned();
    if line.is_empty() {
        bail!("{what}: nothing on standard input");
    }
    Ok(SecretString::from(line))
}

async fn session(config: Config, cmd: SessionCommand) -> anyhow::Result<()> {
    let sessions = Arc::new(open_sessions(&config).await?);
    match cmd {
        SessionCommand::Add(a) => {
            let tokens = match (a.access_token, a.api_key) {
                (Some(access_token), None) => {
                    if access_token == "-" && a.refresh_token.as_deref() == Some("-") {
                        bail!("only one of --access-token and --refresh-token can be read from standard input");
                    }
                    NewTokens {
                        access_token: secret_arg(access_token, "--access-token")?,
                        refresh_token: a
                            .refresh_token
                            .map(|r| secret_arg(r, "--refresh-token"))
                            .transpose()?,
                        expires_in: a.expires_in,
                    }
                }
                (None, Some(api_key)) => {
                    let var = a.api_secret_env.unwrap_or_default();
                    let secret = std::env::var(&var)
                        .ok()
                        .filter(|s| !s.is_empty())
                        .with_context(|| format!("--api-secret-env: {var} is not set"))?;
                    let (access_token, refresh_token) =
                        credproxy::provider::spark::api_key::ApiKeyCredentials::new_session(
                            api_key,
                            SecretString::from(secret),
                            a.api_user,
                        );
                    NewTokens {
                        access_token,
                        refresh_token: Some(refresh_token),
                        expires_in: Some(0),
                    }
                }
                _ => bail!("give --access-token, or --api-key with --api-secret-env"),
            };
            let key = a
                .key
                .map(|k| SessionKey::chosen(SecretString::from(k)))
                .transpose()
                .context("--key")?;
            let added = sessions
                .add(
                    &a.provider,
                    tokens,
                    a.label,
                    key,
                    credproxy::audit::Actor::Cli,
                )
                .await?;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"id": added.id, "session_key": added.key.expose(), "provider": added.provider})
                );
            } else {
                let verb = if added.replaced {
                    "updated (tokens replaced)"
                } else {
                    "added"
                };
                println!(
                    "session {} {verb} for provider {}",
                    added.id, added.provider
                );
                println!("session key (shown only now): {}", added.key.expose());
            }
        }
        SessionCommand::List { json } => {
            let list = sessions.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(&list);
            }
        }
        SessionCommand::Revoke { id } => {
            if !sessions.revoke_by(&id, RevokedBy::Cli).await? {
                bail!("no session with id {id}");
            }
            println!("session {id} revoked");
        }
        SessionCommand::Key(cmd) => session_key(&sessions, cmd).await?,
        SessionCommand::Refresh { id } => {
            let Some(info) = sessions.info(&id).await? else {
                bail!("no session with id {id}");
            };
            config.require_provider(&info.provider)?;
            let metrics = Arc::new(credproxy::metrics::Metrics::default());
            let refresher = Arc::new(Refresher::new(&config, Arc::clone(&sessions), metrics)?);
            match refresher
                .refresh_now(&id, credproxy::audit::Actor::Cli)
                .await
            {
                Ok(_) => {}
                Err(RefreshError::Gone) => bail!("no session with id {id}"),
                Err(e) => bail!("session {id}: {e}"),
            }
            match sessions.info(&id).await? {
                Some(info) => match info.expires_at {
                    Some(at) => {
                        println!("session {id} refreshed; the new access token expires at {at}")
                    }
                    None => println!(
                        "session {id} refreshed; the provider gave no lifetime, so it is refreshed when the provider refuses it"
                    ),
                },
                // Revoked in the meantime, by someone else.
                None => println!("session {id} refreshed (and since revoked)"),
            }
        }
    }
    Ok(())
}

async fn session_key(sessions: &Sessions, cmd: SessionKeyCommand) -> anyhow::Result<()> {
    match cmd {
        SessionKeyCommand::Add(a) => {
            let scope = ScopeAsked::parse(
                a.methods.as_deref(),
                a.paths.as_deref(),
                a.rate.as_deref(),
                a.expires_in,
            )?;
            let added = match sessions
                .add_key(&a.id, a.label, scope, credproxy::audit::Actor::Cli)
                .await
            {
                Err(SessionError::NotFound(_)) => bail!("no session with id {}", a.id),
                other => other?,
            };
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"key_id": added.key_id, "session_key": added.key.expose()})
                );
            } else {
                println!("key {} added to session {}", added.key_id, a.id);
                println!("session key (shown only now): {}", added.key.expose());
            }
        }
        SessionKeyCommand::List { id, json } => {
            let Some(keys) = sessions.keys(&id).await? else {
                bail!("no session with id {id}");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                let mut rows = vec![
                    ["KEY ID", "LABEL", "SCOPE", "CREATED", "EXPIRES", "LAST USE"]
                        .map(str::to_owned),
                ];
                for k in &keys {
                    rows.push([
                        k.key_id.clone(),
                        k.label.clone().unwrap_or_default(),
                        k.scope_text(),
                        k.created_at.clone(),
                        k.expires_at.clone().unwrap_or_else(|| "never".to_owned()),
                        k.last_used_at.clone().unwrap_or_else(|| "never".to_owned()),
                    ]);
                }
                print!("{}", credproxy::table::columns(&rows));
            }
        }
        SessionKeyCommand::Revoke { id, key_id } => {
            if !sessions
                .revoke_key(&id, &key_id, credproxy::audit::Actor::Cli)
                .await?
            {
                bail!("session {id} has no key {key_id}");
            }
            println!("key {key_id} of session {id} revoked");
        }
    }
    Ok(())
}

fn print_table(list: &[SessionInfo]) {
    if list.is_empty() {
        println!("no sessions");
        return;
    }
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<[String; 9]> = list
        .iter()
        .map(|s| {
            [
                s.id.clone(),
                s.provider.clone(),
                s.status.as_str().to_owned(),
                or_dash(&s.last_error),
                or_dash(&s.next_retry_at),
                or_dash(&s.expires_at),
                or_dash(&s.last_refresh_at),
                or_dash(&s.last_used_at),
                s.label.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let header = [
        "ID",
        "PROVIDER",
        "STATUS",
        "LAST ERROR",
        "NEXT RETRY",
        "EXPIRES",
        "LAST REFRESH",
        "LAST USED",
        "LABEL",
    ];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 9]| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i == cells.len() - 1 {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header);
    for r in &rows {
        line(std::array::from_fn(|i| r[i].as_str()));
    }
}
