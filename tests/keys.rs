//! `credproxy key list` and `key rotate`, run as the built binary: a key
//! file from before rings is migrated in place, `list` counts what each key
//! seals (by SQL over the stored headers), and `key_env` is never rewritten.

mod support;

use std::process::Command;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use credproxy::seal::KeyId;
use support::{run_cli, Extra, World, BIN};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
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
    assert!(
        stderr(&out).contains("CREDPROXY_TEST_RING"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(new_id), "{}", stderr(&out));
    assert!(!stderr(&out).contains(&old) && !stderr(&out).contains(&entry));
    assert!(!w.path("credproxy.key").exists());

    // Doing what it said: the new entry first, then the old key with its id.
    let old_id = KeyId::legacy(&[9u8; 32]).to_string();
    let ring = format!("{entry}, {old_id}:{old}");
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
