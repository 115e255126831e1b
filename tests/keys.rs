//! `credproxy key list` and `key rotate`, run as the built binary: a key
//! file from before rings is migrated in place, `list` counts what each key
//! seals (by SQL over the stored headers), and `key_env` is never rewritten.

mod support;

use std::process::Command;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use credproxy::secrets::seal::KeyId;
use support::{run_cli, Extra, World, BIN};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The key material of the first `ID:BASE64` entry of a ring line.
fn new_id_key(entry: &str) -> &str {
    entry
        .split(',')
        .next()
        .and_then(|e| e.split_once(':'))
        .map_or("", |(_, k)| k)
}

fn key_list(cfg: &std::path::Path) -> Vec<serde_json::Value> {
    let out = run_cli(cfg, &["key", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("one JSON array")
}

fn add(cfg: &std::path::Path, extra: &[&str]) {
    let mut args = vec![
        "session",
        "add",
        "--provider",
        "spark",
        "--access-token",
        "tok-keys",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = run_cli(cfg, &args);
    assert!(out.status.success(), "{}", stderr(&out));
}

async fn rotate_migrates_and_list_counts(store_url: Option<String>) {
    let w = World::new().await;
    let cfg = w.write_config(&Extra {
        store_url,
        ..Extra::default()
    });
    let key_file = w.path("credproxy.key");
    let old = [7u8; 32];
    std::fs::write(&key_file, format!("{}\n", STANDARD.encode(old))).expect("write key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let old_id = KeyId::legacy(&old).to_string();
    add(&cfg, &["--refresh-token", "ref-keys"]);

    let list = key_list(&cfg);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"], old_id.as_str());
    assert_eq!(list[0]["primary"], true);
    assert_eq!(list[0]["sealed"], 2, "an access and a refresh token");
    assert!(list[0]["created_at"].is_string(), "{list:?}");

    let out = run_cli(&cfg, &["key", "rotate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&key_file).expect("read ring");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(lines.len(), 2, "{}", lines.len());
    assert!(lines[0].starts_with(&format!("{old_id}:")));
    assert!(lines[1].ends_with(" primary"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let stray: Vec<_> = std::fs::read_dir(w.dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    assert!(!stdout(&out).contains(&STANDARD.encode(old)));

    let list = key_list(&cfg);
    assert_eq!(list.len(), 2, "{list:?}");
    let new_id = list[1]["id"].as_str().expect("id").to_owned();
    assert_ne!(new_id, old_id);
    assert!(stdout(&out).contains(&new_id), "{}", stdout(&out));
    assert_eq!(list[0]["primary"], false);
    assert_eq!(
        list[0]["sealed"], 2,
        "the old key still seals what it sealed"
    );
    assert_eq!(list[1]["primary"], true);
    assert_eq!(list[1]["sealed"], 0);

    // New values are sealed under the new key; the old session still opens.
    add(&cfg, &[]);
    let list = key_list(&cfg);
    assert_eq!(
        (list[0]["sealed"].clone(), list[1]["sealed"].clone()),
        (2.into(), 1.into())
    );
    let out = run_cli(&cfg, &["session", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_cli(&cfg, &["check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_cli(&cfg, &["key", "list"]);
    assert!(stdout(&out).contains(&new_id) && stdout(&out).contains("yes"));

    // A second rotation keeps the ring format and adds a third key.
    let out = run_cli(&cfg, &["key", "rotate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list = key_list(&cfg);
    assert_eq!(list.len(), 3);
    assert_eq!(list[2]["primary"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_migrates_a_single_key_file_and_list_counts_by_key() {
    rotate_migrates_and_list_counts(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_migrates_a_single_key_file_and_list_counts_by_key_postgres() {
    let Some(db) = support::postgres_db("key_rotate_list").await else {
        return;
    };
    rotate_migrates_and_list_counts(Some(db)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_with_key_env_says_what_to_put_in_the_variable() {
    let w = World::new().await;
    let text = w
        .config_text(&Extra {
            store: "key_env = \"CREDPROXY_TEST_RING\"".into(),
            ..Extra::default()
        })
        .replace(
            &format!("key_file = \"{}\"\n", w.path("credproxy.key").display()),
            "",
        );
    let cfg = w.path("env-ring.toml");
    std::fs::write(&cfg, text).expect("write");
    let old = STANDARD.encode([9u8; 32]);
    let run = |env: &str, args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .env_remove("RUST_LOG")
            .env("CREDPROXY_TEST_RING", env)
            .output()
            .expect("run")
    };
    let out = run(
        &old,
        &[
            "session",
            "add",
            "--provider",
            "spark",
            "--access-token",
            "tok-env",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&old, &["key", "rotate"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let entry = stdout(&out).trim().to_owned();
    let (new_id, _) = entry.split_once(':').expect("ID:BASE64KEY on stdout");
    let old_id = KeyId::legacy(&[9u8; 32]).to_string();
    assert!(
        entry.ends_with(&format!(",{old_id}:{old}")),
        "the ring to set: the new key first, then the old one under its id"
    );
    assert!(
        stderr(&out).contains("CREDPROXY_TEST_RING"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(new_id), "{}", stderr(&out));
    assert!(!stderr(&out).contains(&old) && !stderr(&out).contains(new_id_key(&entry)));
    assert!(!w.path("credproxy.key").exists());

    // Doing what it said.
    let ring = entry.clone();
    let out = run(&ring, &["key", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Vec<serde_json::Value> = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(list.len(), 2);
    assert_eq!(
        (list[0]["id"].as_str(), list[0]["primary"].as_bool()),
        (Some(new_id), Some(true))
    );
    assert_eq!(list[1]["id"], old_id.as_str());
    assert_eq!(list[1]["sealed"], 1, "the session sealed under the old key");
    let out = run(&ring, &["session", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotates_at_the_same_time_lose_no_key() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    add(&cfg, &[]);
    let before = key_list(&cfg).len();
    // Four rotations at once, each its own process: every key stays.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let cfg = cfg.clone();
            std::thread::spawn(move || run_cli(&cfg, &["key", "rotate"]))
        })
        .collect();
    for h in handles {
        let out = h.join().expect("thread");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let after = key_list(&cfg);
    assert_eq!(after.len(), before + 4, "{after:?}");
    assert_eq!(after.iter().filter(|k| k["primary"] == true).count(), 1);
}

/// Sessions for fresh stand-in tokens, added through the running server.
async fn sessions_for(running: &credproxy::server::Running, w: &World, n: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for _ in 0..n {
        let (_, key, _) = support::add_session(running, "spark", &w.spark).await;
        keys.push(key);
    }
    keys
}

fn primary_of(list: &[serde_json::Value]) -> String {
    list.iter()
        .find(|k| k["primary"] == true)
        .and_then(|k| k["id"].as_str())
        .expect("a primary key")
        .to_owned()
}

async fn run_cli_async(cfg: &std::path::Path, args: &[&str]) -> std::process::Output {
    let cfg = cfg.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli(&cfg, &args)
    })
    .await
    .expect("cli thread")
}

/// Rotate, rewrap and retire while a server serves and refreshes (every
/// access token dies after 3 uses, so refreshes keep rotating refresh
/// tokens throughout): no request fails, no rotation is lost, the retired
/// key leaves the server's memory, and a restart afterwards serves every
/// session under the one key left.
async fn rotate_rewrap_retire_under_load(store_url: Option<String>) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let w = World::new().await;
    let extra = Extra {
        store_url,
        store: "key_reload_interval = \"1s\"".into(),
        ..Extra::default()
    };
    let cfg = w.write_config(&extra);
    let running = w.start(&extra).await;
    let keys = sessions_for(&running, &w, 8).await;
    let old = primary_of(&key_list(&cfg));
    w.spark.expire_access_after_uses(3);
    let grants_before = w.spark.grant_count();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for t in 0..4 {
        let (stop, ok, keys) = (Arc::clone(&stop), Arc::clone(&ok), keys.clone());
        let addr = running.proxy_addr;
        load.push(tokio::spawn(async move {
            let client = support::client();
            let mut failures = Vec::new();
            let mut i = t;
            // Bounded: stops when told, or after 20,000 requests.
            while !stop.load(Ordering::Relaxed) && i < 20_000 {
                let resp = client
                    .get(support::url(addr, "/spark/v1/listings"))
                    .header("X-Credproxy-Session", &keys[i % keys.len()])
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("{} {:?}", r.status(), support::error_code(&r))),
                    Err(e) => failures.push(e.to_string()),
                }
                i += 4;
            }
            failures
        }));
    }
    let served = |n: u64| {
        let ok = Arc::clone(&ok);
        async move {
            let start = ok.load(Ordering::Relaxed);
            for _ in 0..2000 {
                if ok.load(Ordering::Relaxed) >= start + n {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            panic!("the load stalled");
        }
    };
    served(50).await;

    let out = run_cli_async(&cfg, &["key", "rotate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    served(50).await;
    let out = run_cli_async(&cfg, &["key", "rewrap"]).await;
    assert!(out.status.success(), "rewrap: {}", stderr(&out));
    assert!(stdout(&out).contains("re-sealed"), "{}", stdout(&out));
    served(50).await;
    let list = key_list(&cfg);
    let new = primary_of(&list);
    assert_ne!(new, old);
    let sealed_old = list.iter().find(|k| k["id"] == old.as_str()).expect("old")["sealed"].clone();
    assert_eq!(
        sealed_old, 0,
        "rewrap left values under the old key: {list:?}"
    );
    let out = run_cli_async(&cfg, &["key", "retire", &old]).await;
    assert!(out.status.success(), "retire: {}", stderr(&out));
    // The server drops the retired key within key_reload_interval.
    let old_id = KeyId::parse(&old).expect("id");
    let mut gone = false;
    for _ in 0..400 {
        if !running.sessions.sealer().has_key(old_id) {
            gone = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(gone, "the server still holds the retired key");
    served(50).await;
    stop.store(true, Ordering::Relaxed);
    for h in load {
        let failures = h.await.expect("load task");
        assert!(failures.is_empty(), "requests failed: {failures:?}");
    }
    assert!(
        w.spark.grant_count() > grants_before + 5,
        "the load refreshed throughout"
    );
    assert_eq!(w.spark.reused_refresh_tokens(), 0, "a rotation was lost");
    let list = key_list(&cfg);
    assert!(
        list.iter()
            .all(|k| k["id"] != old.as_str() || k["audit_only"] == true),
        "{list:?}"
    );
    let out = run_cli_async(&cfg, &["audit", "verify"]).await;
    assert!(out.status.success(), "{} {}", stdout(&out), stderr(&out));
    let total: i64 = list.iter().map(|k| k["sealed"].as_i64().unwrap_or(0)).sum();
    assert_eq!(
        list.iter().find(|k| k["id"] == new.as_str()).expect("new")["sealed"].as_i64(),
        Some(total)
    );

    // A restart after the retire serves every session.
    running.shutdown().await;
    let running = w.start(&extra).await;
    let client = support::client();
    for key in &keys {
        let r = client
            .get(support::url(running.proxy_addr, "/spark/v1/listings"))
            .header("X-Credproxy-Session", key)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
    }
    assert_eq!(w.spark.reused_refresh_tokens(), 0);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_rewrap_and_retire_while_serving_and_refreshing() {
    rotate_rewrap_retire_under_load(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_rewrap_and_retire_while_serving_and_refreshing_postgres() {
    if let Some(url) = support::postgres_db("keys_under_load").await {
        rotate_rewrap_retire_under_load(Some(url)).await;
    }
}

/// Retire is refused (exit 1, with the count) while a value is sealed under
/// the key, and for the primary; after a rewrap it is accepted, and the
/// sessions still open; a second rewrap has nothing left to do.
async fn retire_refused_then_accepted(store_url: Option<String>) {
    let w = World::new().await;
    let cfg = w.write_config(&Extra {
        store_url,
        ..Extra::default()
    });
    add(&cfg, &["--refresh-token", "ref-keys"]);
    add(&cfg, &[]);
    let old = primary_of(&key_list(&cfg));
    let out = run_cli(&cfg, &["key", "retire", &old]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("primary"), "{}", stderr(&out));

    let out = run_cli(&cfg, &["key", "rotate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_cli(&cfg, &["key", "retire", &old]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("3 stored value(s)") && stderr(&out).contains("rewrap"),
        "{}",
        stderr(&out)
    );
    assert_eq!(key_list(&cfg).len(), 2, "nothing changed");
    let out = run_cli(&cfg, &["key", "retire", "nothex!!"]);
    assert_eq!(out.status.code(), Some(1));
    let out = run_cli(&cfg, &["key", "retire", "0badc0de"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no key 0badc0de"), "{}", stderr(&out));

    let out = run_cli(&cfg, &["key", "rewrap", "--batch", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("re-sealed 3 values (2 sessions)"),
        "{}",
        stdout(&out)
    );
    // Resumable: what is done is not done again.
    let out = run_cli(&cfg, &["key", "rewrap"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("re-sealed 0 values"),
        "{}",
        stdout(&out)
    );
    let out = run_cli(&cfg, &["key", "retire", &old]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("audit-only"), "{}", stdout(&out));
    let list = key_list(&cfg);
    // The sessions' audit rows were chained under the old key: only its
    // audit key stays, and the whole trail still verifies.
    let kept = list
        .iter()
        .find(|k| k["id"] == old.as_str())
        .expect("audit-only entry");
    assert_eq!(kept["audit_only"], true, "{list:?}");
    assert_eq!(kept["sealed"], 0);
    let out = run_cli(&cfg, &["audit", "verify"]);
    assert!(out.status.success(), "{} {}", stdout(&out), stderr(&out));
    let out = run_cli(&cfg, &["audit", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for kind in ["key.rotated", "key.rewrapped", "key.retired"] {
        assert!(text.contains(kind), "{kind} missing: {text}");
    }
    assert_eq!(list.iter().filter(|k| k["audit_only"] != true).count(), 1);
    let ring = std::fs::read_to_string(w.path("credproxy.key")).expect("ring");
    assert!(!ring.contains(&format!("{old}:")) || ring.contains("audit-only"));
    let out = run_cli(&cfg, &["check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_cli(&cfg, &["session", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_is_refused_while_values_use_the_key_then_accepted() {
    retire_refused_then_accepted(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_is_refused_while_values_use_the_key_then_accepted_postgres() {
    if let Some(url) = support::postgres_db("keys_retire").await {
        retire_refused_then_accepted(Some(url)).await;
    }
}

/// A server that reads the ring only hourly still opens a session sealed
/// under a key it has never seen (added by the CLI after a rotation): the
/// unknown key id makes it read the ring at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_server_reads_the_ring_when_it_meets_an_unknown_key() {
    let w = World::new().await;
    let extra = Extra {
        store: "key_reload_interval = \"1h\"".into(),
        ..Extra::default()
    };
    let cfg = w.write_config(&extra);
    let running = w.start(&extra).await;
    let _ = sessions_for(&running, &w, 1).await;
    let out = run_cli_async(&cfg, &["key", "rotate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let new = KeyId::parse(&primary_of(&key_list(&cfg))).expect("id");
    assert!(!running.sessions.sealer().has_key(new));
    let tokens = w.spark.issue_tokens();
    let added = support::cli_add(&cfg, "spark", &tokens);
    let key = added["session_key"].as_str().expect("key");
    let r = support::client()
        .get(support::url(running.proxy_addr, "/spark/v1/listings"))
        .header("X-Credproxy-Session", key)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert!(running.sessions.sealer().has_key(new));
    assert_eq!(running.sessions.sealer().primary_id(), new);
    running.shutdown().await;
}

/// `key_command`: the ring is what a command prints (here `cat` of a file
/// standing in for Vault or a KMS). The server serves with it, `key
/// rotate` prints the ring to store instead of changing anything, a server
/// reads the command again each key_reload_interval, and a failing command
/// is a clear error that shows none of its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_command_ring_is_read_and_followed() {
    let w = World::new().await;
    let ring_file = w.path("ring-from-vault.txt");
    let ring = credproxy::secrets::seal::Ring::generate(1_764_656_000);
    std::fs::write(&ring_file, ring.to_file_text()).expect("ring");
    let extra = Extra {
        store: "key_command = \"cat ring-from-vault.txt\"\nkey_reload_interval = \"1s\"".into(),
        ..Extra::default()
    };
    let text = w.config_text(&extra).replace(
        &format!("key_file = \"{}\"\n", w.path("credproxy.key").display()),
        "",
    );
    let cfg = w.path("config.toml");
    std::fs::write(&cfg, &text).expect("config");
    let config = credproxy::config::Config::load(&cfg).expect("config");
    let running = credproxy::server::start(config.clone())
        .await
        .expect("start");
    let keys = sessions_for(&running, &w, 1).await;
    let first = ring.primary_id();
    assert_eq!(running.sessions.sealer().primary_id(), first);

    let out = run_cli(&cfg, &["key", "rotate"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("store.key_command"),
        "{}",
        stderr(&out)
    );
    let next =
        credproxy::secrets::seal::Ring::parse_file_text(&stdout(&out)).expect("a ring on stdout");
    assert_eq!(next.keys().len(), 2);
    assert_ne!(next.primary_id(), first);
    assert!(!w.path("credproxy.key").exists());
    // Storing it where the command reads it: the server follows.
    std::fs::write(&ring_file, next.to_file_text()).expect("ring");
    let mut followed = false;
    for _ in 0..400 {
        if running.sessions.sealer().primary_id() == next.primary_id() {
            followed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(followed, "the server did not read the command again");
    let out = run_cli(&cfg, &["key", "rewrap"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_cli(&cfg, &["key", "retire", &first.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let after =
        credproxy::secrets::seal::Ring::parse_file_text(&stdout(&out)).expect("a ring on stdout");
    assert!(after.keys().iter().all(|k| k.id != first || k.audit_only));
    std::fs::write(&ring_file, after.to_file_text()).expect("ring");
    let r = support::client()
        .get(support::url(running.proxy_addr, "/spark/v1/listings"))
        .header("X-Credproxy-Session", &keys[0])
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    running.shutdown().await;

    // A failing command: a clear error, with the exit status, never stdout.
    let failing = text.replace(
        "key_command = \"cat ring-from-vault.txt\"",
        "key_command = \"echo SECRETSTDOUT; echo vault: permission denied >&2; exit 3\"",
    );
    std::fs::write(&cfg, failing).expect("config");
    let out = run_cli(&cfg, &["check"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("store.key_command") && err.contains("permission denied"),
        "{err}"
    );
    assert!(!err.contains("SECRETSTDOUT"), "{err}");
}

/// `key list`'s table lines up: every cell starts where its header does,
/// with an empty PRIMARY cell and a count in SEALED, and no line ends in blanks.
#[tokio::test]
async fn key_list_columns_line_up() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    add(&cfg, &[]);
    let out = run_cli(&cfg, &["key", "rotate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    add(&cfg, &[]);
    let out = run_cli(&cfg, &["key", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    let header = lines[0];
    let starts: Vec<usize> = ["ID", "PRIMARY", "SEALED", "CREATED"]
        .iter()
        .map(|h| header.find(h).expect("a column"))
        .collect();
    let ids: Vec<String> = key_list(&cfg)
        .iter()
        .map(|k| k["id"].as_str().expect("id").to_owned())
        .collect();
    for (line, id) in lines[1..].iter().zip(&ids) {
        assert!(!line.ends_with(' '), "{table}");
        assert!(line.starts_with(id.as_str()), "{table}");
        // SEALED and CREATED start where their headers do, after a blank.
        for &at in &starts[2..] {
            let cell = &line[at..];
            assert!(
                line.as_bytes()[at - 1] == b' ' && !cell.starts_with(' '),
                "column at {at} misaligned:\n{table}"
            );
        }
        assert_eq!(
            &line[starts[2]..starts[2] + 1],
            "1",
            "one session each:\n{table}"
        );
        assert!(line[starts[3]..].starts_with("20"), "{table}");
    }
    assert!(lines[2][starts[1]..].starts_with("yes"), "{table}");
    assert!(lines[1][starts[1]..starts[2]].trim().is_empty(), "{table}");
}
