//! The command line, run as the built binary: session management, `check`,
//! start-up errors that name their key, cross-process revocation, and curl
//! used exactly as a person would.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{run_cli, url, BinServer, Extra, World, BIN};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn add_json(
    cfg: &std::path::Path,
    provider: &str,
    token: &str,
    extra: &[&str],
) -> serde_json::Value {
    let mut args = vec![
        "session",
        "add",
        "--provider",
        provider,
        "--access-token",
        token,
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = run_cli(cfg, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("one JSON object")
}

#[tokio::test]
async fn session_add_list_revoke() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let t = w.spark.issue_tokens();
    let added = add_json(
        &cfg,
        "spark",
        &t.access_token,
        &[
            "--refresh-token",
            &t.refresh_token,
            "--expires-in",
            "3600",
            "--label",
            "office listings",
        ],
    );
    let id = added["id"].as_str().expect("id");
    let key = added["session_key"].as_str().expect("key");
    assert_eq!(added["provider"], "spark");
    assert!(key.starts_with("cpk_") && key.len() >= 40);

    // Human output shows the key once, with a warning that it is shown once.
    let z = w.zillow.issue_tokens();
    let out = run_cli(
        &cfg,
        &[
            "session",
            "add",
            "--provider",
            "zillow",
            "--access-token",
            &z.access_token,
        ],
    );
    assert!(out.status.success());
    assert!(stdout(&out).contains("shown only now"), "{}", stdout(&out));

    let out = run_cli(&cfg, &["session", "list"]);
    assert!(out.status.success());
    let table = stdout(&out);
    assert!(
        table.contains(id) && table.contains("office listings") && table.contains("active"),
        "{table}"
    );
    for secret in [key, &t.access_token, &t.refresh_token, &z.access_token] {
        assert!(!table.contains(secret), "list shows no secret");
    }
    let out = run_cli(&cfg, &["session", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(list.as_array().expect("array").len(), 2);
    assert_eq!(list[0]["provider"], "spark", "oldest first");
    assert!(list[0]["expires_at"].is_string());
    assert!(list[1]["expires_at"].is_null(), "zillow: no known lifetime");

    let out = run_cli(&cfg, &["session", "revoke", id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_cli(&cfg, &["session", "revoke", id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no session"), "{}", stderr(&out));

    // Bad input: unknown provider, empty stdin, a weak chosen key.
    let out = run_cli(
        &cfg,
        &[
            "session",
            "add",
            "--provider",
            "nope",
            "--access-token",
            "x",
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
    let out = run_cli(
        &cfg,
        &[
            "session",
            "add",
            "--provider",
            "spark",
            "--access-token",
            "-",
        ],
    );
    assert!(!out.status.success());
    let out = run_cli(
        &cfg,
        &[
            "session",
            "add",
            "--provider",
            "spark",
            "--access-token",
            "x",
            "--key",
            "short",
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--key"), "{}", stderr(&out));
}

#[tokio::test]
async fn access_token_can_come_from_stdin() {
    use std::io::Write;
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let t = w.spark.issue_tokens();
    let mut child = Command::new(BIN)
        .args([
            "session",
            "add",
            "--provider",
            "spark",
            "--access-token",
            "-",
            "--json",
            "--config",
        ])
        .arg(&cfg)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{}\n", t.access_token).as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    let added: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    // Prove the stored token is the one sent, by using it.
    let srv = BinServer::spawn(&cfg, "warn");
    let r = support::client()
        .get(url(srv.proxy_addr, "/spark/v1/x"))
        .header(
            "X-Credproxy-Session",
            added["session_key"].as_str().expect("key"),
        )
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(
        w.spark.last_request().expect("rec").header("authorization"),
        Some(format!("OAuth {}", t.access_token).as_str())
    );
}

#[tokio::test]
async fn check_passes_and_startup_errors_name_the_key() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let out = run_cli(&cfg, &["check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("ok"));

    let good = w.config_text(&Extra::default());
    let cases: Vec<(String, &str)> = vec![
        (good.replace("user_agent", "user_agnet"), "user_agnet"),
        (
            good.replace(
                &format!("client_secret = \"{}\"", w.spark.options().client_secret),
                "client_secret_env = \"CREDPROXY_TEST_UNSET_VAR\"",
            ),
            "providers.spark.client_secret_env",
        ),
        (
            good.replace(
                &format!("api_base = \"{}\"", w.zillow.base_url()),
                "api_base = \"not a url\"",
            ),
            "providers.zillow.api_base",
        ),
        (
            good.replace(
                "admin_listen = \"127.0.0.1:0\"",
                "admin_listen = \"127.0.0.1\"",
            ),
            "server.admin_listen",
        ),
        (
            format!("{good}\n[providers.extra]\nkind = \"myspace\"\napi_base = \"http://x\"\n"),
            "kind",
        ),
    ];
    for (text, key) in cases {
        let path = w.path("bad.toml");
        std::fs::write(&path, text).expect("write");
        for cmd in [&["check"][..], &["serve"][..]] {
            let out = Command::new(BIN)
                .args(cmd)
                .arg("--config")
                .arg(&path)
                .env_remove("CREDPROXY_TEST_UNSET_VAR")
                .output()
                .expect("run");
            assert_eq!(out.status.code(), Some(1), "{cmd:?} {key}");
            assert!(
                stderr(&out).contains(key),
                "{cmd:?}: message names {key}: {}",
                stderr(&out)
            );
        }
    }
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(w.path("missing.toml"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing.toml"));

    // CREDPROXY_CONFIG is honoured.
    let out = Command::new(BIN)
        .arg("check")
        .env("CREDPROXY_CONFIG", &cfg)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn help_explains_every_command() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    let help = stdout(&out);
    for cmd in ["serve", "session", "check", "--config", "CREDPROXY_CONFIG"] {
        assert!(help.contains(cmd), "{help}");
    }
    let out = Command::new(BIN)
        .args(["session", "add", "--help"])
        .output()
        .expect("run");
    let help = stdout(&out);
    for flag in [
        "--provider",
        "--access-token",
        "--refresh-token",
        "--expires-in",
        "--label",
        "--key",
        "--json",
    ] {
        assert!(help.contains(flag), "{help}");
    }
}

#[tokio::test]
async fn revoke_from_another_process_takes_effect_within_two_seconds() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let added = add_json(&cfg, "spark", &w.spark.issue_tokens().access_token, &[]);
    let key = added["session_key"].as_str().expect("key").to_owned();
    let srv = BinServer::spawn(&cfg, "info");
    let c = support::client();
    let get = || {
        c.get(url(srv.proxy_addr, "/spark/v1/x"))
            .header("X-Credproxy-Session", &key)
            .send()
    };
    assert_eq!(get().await.expect("send").status(), 200, "cached now");
    let out = run_cli(
        &cfg,
        &["session", "revoke", added["id"].as_str().expect("id")],
    );
    assert!(out.status.success());
    let revoked_at = Instant::now();
    // Poll the proxy itself, bounded: the deadline is the contract's 2 s.
    loop {
        let r = get().await.expect("send");
        if r.status() == 401 {
            assert_eq!(support::error_code(&r).as_deref(), Some("unknown_session"));
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(2),
            "still honoured after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("revocation seen after {:?}", revoked_at.elapsed());
}

// Multi-threaded: curl runs blocking while the in-process stand-ins serve it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_as_a_person_would() {
    if Command::new("curl").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "curl must be installed in CI"
        );
        println!("SKIPPED curl_as_a_person_would: curl is not installed");
        return;
    }
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let spark = add_json(&cfg, "spark", &w.spark.issue_tokens().access_token, &[]);
    let zillow_tokens = w.zillow.issue_tokens();
    let zillow = add_json(&cfg, "zillow", &zillow_tokens.access_token, &[]);
    let srv = BinServer::spawn(&cfg, "info");
    let curl = |args: &[String]| {
        let out = Command::new("curl")
            .args(["-sS", "--noproxy", "*", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("curl");
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let out = curl(&[
        "-H".into(),
        format!(
            "Authorization: OAuth {}",
            spark["session_key"].as_str().expect("key")
        ),
        format!("http://{}/spark/v1/listings", srv.proxy_addr),
    ]);
    assert!(out.ends_with("\n200"), "{out}");
    assert!(out.contains("\"standin\""), "{out}");
    let out = curl(&[format!(
        "http://{}/zillow/listings/v1/listingsForUser?accessToken={}",
        srv.proxy_addr,
        zillow["session_key"].as_str().expect("key")
    )]);
    assert!(out.ends_with("\n200"), "{out}");
    let got = w.zillow.last_request().expect("rec");
    assert!(got
        .query
        .expect("query")
        .contains(&zillow_tokens.access_token));
    // And without a key, a person reads why.
    let out = curl(&[format!("http://{}/spark/v1/listings", srv.proxy_addr)]);
    assert!(
        out.contains("missing_session") && out.ends_with("\n401"),
        "{out}"
    );
}

#[tokio::test]
async fn sealing_key_from_the_environment() {
    use base64::Engine;
    let w = World::new().await;
    let extra = Extra {
        store: "key_env = \"CREDPROXY_TEST_SEAL_KEY\"".into(),
        ..Extra::default()
    };
    let text = w.config_text(&extra).replace(
        &format!("key_file = \"{}\"\n", w.path("credproxy.key").display()),
        "",
    );
    let cfg = w.path("env-key.toml");
    std::fs::write(&cfg, text).expect("write");
    let key = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    let run = |env: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args([
            "session",
            "add",
            "--provider",
            "spark",
            "--access-token",
            "tok-env-key",
            "--json",
            "--config",
        ])
        .arg(&cfg)
        .env_remove("CREDPROXY_TEST_SEAL_KEY");
        if let Some(v) = env {
            c.env("CREDPROXY_TEST_SEAL_KEY", v);
        }
        c.output().expect("run")
    };
    let out = run(Some(&key));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !w.path("credproxy.key").exists(),
        "no key file when the key comes from the environment"
    );
    let out = run(None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("store.key_env"), "{}", stderr(&out));
    let out = run(Some("not-base64-of-32-bytes"));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("store.key_env"), "{}", stderr(&out));
}

#[tokio::test]
async fn store_holds_no_token_or_key_in_clear() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let t = w.spark.issue_tokens();
    let added = add_json(
        &cfg,
        "spark",
        &t.access_token,
        &["--refresh-token", &t.refresh_token],
    );
    let key = added["session_key"].as_str().expect("key");
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(w.dir.path()).expect("dir") {
        let path = entry.expect("entry").path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("credproxy.db"))
        {
            bytes.extend(std::fs::read(&path).expect("read"));
        }
    }
    assert!(bytes.len() > 4096, "the store was written");
    for secret in [key, t.access_token.as_str(), t.refresh_token.as_str()] {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
}

/// The text of the page's lead paragraph (the message).
fn lead(html: &str) -> String {
    let start = html.find("<p class=\"lead\">").expect("a lead paragraph") + 16;
    let end = html[start..].find("</p>").expect("its end") + start;
    html[start..end].trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_messages_are_sentences() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let c = support::client();
    let admin = srv.admin_addr;
    let get = |path: String| {
        let c = c.clone();
        async move {
            let r = c.get(url(admin, &path)).send().await.expect("send");
            (r.status().as_u16(), r.text().await.expect("text"))
        }
    };
    let sentence = |status: u16, html: &str| {
        let text = lead(html);
        assert!(
            text.chars().next().is_some_and(char::is_uppercase) && text.ends_with('.'),
            "{status}: {text:?}"
        );
        text
    };
    let (status, html) = get("/callback/zillow?code=c&state=nope".into()).await;
    assert_eq!(status, 400);
    sentence(status, &html);

    // A failing token endpoint.
    w.zillow
        .set_token_mode(credproxy_standins::TokenMode::Fail500);
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("client")
        .get(url(admin, "/connect/zillow"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 302);
    let location = r.headers()["location"].to_str().expect("ascii").to_owned();
    let state = url::Url::parse(&location)
        .expect("url")
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .expect("state");
    // The state is bound to this "browser" by the cookie /connect set.
    let cookie = r.headers()["set-cookie"].to_str().expect("ascii");
    let cookie = cookie.split(';').next().expect("name=value").to_owned();
    let code = w.zillow.issue_code();
    let r = c
        .get(url(
            admin,
            &format!("/callback/zillow?code={code}&state={state}"),
        ))
        .header("cookie", cookie)
        .send()
        .await
        .expect("send");
    let (status, html) = (r.status().as_u16(), r.text().await.expect("text"));
    assert_eq!(status, 502);
    let text = sentence(status, &html);
    assert!(
        text.contains("answered 500") && text.contains("No session was stored."),
        "{text}"
    );
    srv.shutdown().await;
}

/// A config like the World's, but with the store and key given as paths
/// relative to the config file, as config.toml has them.
fn relative_store_config(w: &World, extra: &Extra) -> String {
    w.config_text(extra)
        .replace(
            &format!("url = \"sqlite://{}\"", w.path("credproxy.db").display()),
            "url = \"sqlite://./data.db?mode=rwc\"",
        )
        .replace(
            &format!("key_file = \"{}\"", w.path("credproxy.key").display()),
            "key_file = \"seal.key\"",
        )
}

#[tokio::test]
async fn relative_paths_are_relative_to_the_config_file() {
    let w = World::new().await;
    let conf = w.path("conf");
    let elsewhere = w.path("elsewhere");
    std::fs::create_dir_all(&conf).expect("mkdir");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    let cfg = conf.join("config.toml");
    std::fs::write(&cfg, relative_store_config(&w, &Extra::default())).expect("write");
    let run = |cwd: &std::path::Path, args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .current_dir(cwd)
            .env_remove("RUST_LOG")
            .output()
            .expect("run")
    };
    let t = w.zillow.issue_tokens();
    let out = run(
        &elsewhere,
        &[
            "session",
            "add",
            "--provider",
            "zillow",
            "--access-token",
            &t.access_token,
            "--label",
            "made elsewhere",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        conf.join("data.db").is_file(),
        "the store is next to the config"
    );
    assert!(conf.join("seal.key").is_file(), "so is the key");
    assert_eq!(
        std::fs::read_dir(&elsewhere).expect("dir").count(),
        0,
        "nothing is created in the working directory"
    );
    // From a third directory, through a relative --config: the same store.
    let out = Command::new(BIN)
        .args(["session", "list", "--config", "conf/config.toml"])
        .current_dir(w.dir.path())
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("made elsewhere"), "{}", stdout(&out));
    let out = run(&elsewhere, &["check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("1 session(s)"), "{}", stdout(&out));
}

#[tokio::test]
async fn environment_overrides_the_listen_addresses_and_the_store() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
    };
    let (proxy, admin) = (free(), free());
    let data = w.path("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .current_dir(&data)
        .env("CREDPROXY_LISTEN", proxy.to_string())
        .env("CREDPROXY_ADMIN_LISTEN", admin.to_string())
        // Relative to the working directory, as on a command line.
        .env("CREDPROXY_STORE_URL", "sqlite://elsewhere.db")
        .env("CREDPROXY_KEY_FILE", "elsewhere.key")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut lines = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).expect("read");
        lines.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = lines.concat();
    assert!(
        text.contains(&format!("proxy listening on http://{proxy}"))
            && text.contains(&format!("admin listening on http://{admin}")),
        "{text}"
    );
    assert!(data.join("elsewhere.db").is_file() && data.join("elsewhere.key").is_file());
    assert!(!w.path("credproxy.db").exists(), "store.url was overridden");

    // A bad value names the variable.
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .env("CREDPROXY_LISTEN", "0.0.0.0")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("CREDPROXY_LISTEN"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn check_names_every_missing_secret_at_once() {
    let w = World::new().await;
    let (s, z) = (w.spark.options(), w.zillow.options());
    let text = w
        .config_text(&Extra {
            admin: Some("token_env = \"CREDPROXY_TEST_NO_ADMIN\"".into()),
            ..Extra::default()
        })
        .replace(
            &format!("client_secret = \"{}\"", s.client_secret),
            "client_secret_env = \"CREDPROXY_TEST_NO_SPARK\"",
        )
        .replace(
            &format!("client_secret = \"{}\"", z.client_secret),
            "client_secret_env = \"CREDPROXY_TEST_NO_ZILLOW\"",
        )
        .replace(&format!("api_key = \"{}\"\n", z.api_key), "");
    let cfg = w.path("secrets.toml");
    std::fs::write(&cfg, text).expect("write");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .env_remove("CREDPROXY_TEST_NO_SPARK")
        .env_remove("CREDPROXY_TEST_NO_ZILLOW")
        .env_remove("CREDPROXY_TEST_NO_ADMIN")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "one line per problem: {err}");
    for (line, names) in lines.iter().zip([
        "providers.spark.client_secret_env: environment variable CREDPROXY_TEST_NO_SPARK",
        "providers.zillow.client_secret_env: environment variable CREDPROXY_TEST_NO_ZILLOW",
        "providers.zillow.api_key",
    ]) {
        assert!(line.starts_with(&format!("credproxy: {names}")), "{err}");
    }
}

#[tokio::test]
async fn errors_say_their_cause_once() {
    let w = World::new().await;
    let once = |out: &std::process::Output, what: &str| {
        assert_eq!(out.status.code(), Some(1), "{what}");
        let err = stderr(out);
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        let cause = err.rsplit(": ").next().map(str::trim).expect("a cause");
        assert_eq!(err.matches(cause).count(), 1, "{what}: {err}");
        err
    };
    let out = run_cli(&w.path("missing.toml"), &["check"]);
    let err = once(&out, "a missing config");
    assert!(
        err.contains("missing.toml") && err.contains("os error 2"),
        "{err}"
    );

    // A key file that is a directory.
    let text = w.config_text(&Extra::default()).replace(
        &w.path("credproxy.key").display().to_string(),
        &w.path("").display().to_string(),
    );
    let cfg = w.path("dir-key.toml");
    std::fs::write(&cfg, text).expect("write");
    let err = once(&run_cli(&cfg, &["check"]), "a key file that is a directory");
    assert!(err.contains("store.key_file"), "{err}");

    // A store in a directory that does not exist.
    let text = w.config_text(&Extra {
        store_url: Some(format!(
            "sqlite://{}",
            w.path("no/such/dir/credproxy.db").display()
        )),
        ..Extra::default()
    });
    let cfg = w.path("no-store.toml");
    std::fs::write(&cfg, text).expect("write");
    let err = once(&run_cli(&cfg, &["check"]), "an unreachable store");
    assert!(err.contains("store.url"), "{err}");
}

#[tokio::test]
async fn connect_json_keeps_stdout_for_json() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    // Nobody completes the sign-in: the link and the failure go to stderr,
    // and stdout, where the JSON would be, stays empty.
    let out = run_cli(&cfg, &["connect", "zillow", "--json", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out), "", "stdout holds only the JSON object");
    let err = stderr(&out);
    assert!(err.contains("/connect/zillow?link="), "{err}");
    assert!(err.contains("no sign-in completed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_refresh_says_what_it_knows_of_the_lifetime() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let spark = support::cli_add(&cfg, "spark", &w.spark.issue_tokens());
    let zillow = support::cli_add(&cfg, "zillow", &w.zillow.issue_tokens());
    let refresh = |added: &serde_json::Value| {
        let out = run_cli(
            &cfg,
            &["session", "refresh", added["id"].as_str().expect("id")],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let said = refresh(&zillow);
    assert!(
        said.contains("refreshed; the provider gave no lifetime, so it is refreshed when the provider refuses it"),
        "{said}"
    );
    let said = refresh(&spark);
    assert!(
        said.contains("refreshed; the new access token expires at 20"),
        "{said}"
    );
}

/// `examples/demo.rs` as built by `cargo test` (which builds the examples
/// too), run twice in a fresh directory: the commands it prints use the
/// built binary and work as they are, and a second run leaves no dead
/// sessions of the first behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_working_commands_and_starts_fresh() {
    use std::io::BufRead;
    let demo = std::path::Path::new(BIN)
        .with_file_name("examples")
        .join(format!("demo{}", std::env::consts::EXE_SUFFIX));
    if !demo.is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI builds the examples (cargo test --workspace)"
        );
        println!(
            "SKIPPED demo test: {} is not built (cargo build --example demo)",
            demo.display()
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for run in 1..=2 {
        let log = std::fs::File::create(dir.path().join(format!("demo-{run}.log"))).expect("log");
        let mut child = Command::new(&demo)
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn the demo");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let done = line.contains("Ctrl-C stops the demo");
                if tx.send(line).is_err() || done {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
            let done = line.contains("Ctrl-C stops the demo");
            lines.push(line);
            if done {
                break;
            }
        }
        let printed = lines.join("\n");
        let log = || {
            std::fs::read_to_string(dir.path().join(format!("demo-{run}.log"))).unwrap_or_default()
        };
        let Some(list) = lines
            .iter()
            .find(|l| !l.starts_with('#') && l.ends_with("session list"))
            .cloned()
        else {
            let _ = child.kill();
            panic!(
                "run {run}: no session list command in:\n{printed}\nstderr:\n{}",
                log()
            );
        };
        assert!(!list.contains("cargo run"), "run {run}: {list}");
        // The command as printed, with --json to count.
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{list} --json"))
            .current_dir(dir.path())
            .output()
            .expect("sh");
        assert!(out.status.success(), "run {run}: {list}: {}", stderr(&out));
        let sessions: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        // Spark's, Zillow's and the Spark API key's.
        assert_eq!(
            sessions.as_array().map(Vec::len),
            Some(3),
            "run {run}: only this run's sessions: {sessions}"
        );
        // And they are alive: the printed curl line's key works.
        let curl = lines
            .iter()
            .find(|l| l.starts_with("curl -H 'Authorization: OAuth "))
            .expect("a Spark curl line");
        let key = curl["curl -H 'Authorization: OAuth ".len()..]
            .split('\'')
            .next()
            .expect("key");
        let target = curl.rsplit(' ').next().expect("url");
        let r = support::client()
            .get(target)
            .header("Authorization", format!("OAuth {key}"))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "run {run}");
        let refresh = lines
            .iter()
            .find(|l| !l.starts_with('#') && l.contains(" session refresh "))
            .expect("a session refresh command");
        let out = Command::new("sh")
            .arg("-c")
            .arg(refresh)
            .current_dir(dir.path())
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "run {run}: {refresh}: {}",
            stderr(&out)
        );
        support::signal(child.id(), "INT");
        let status = child.wait().expect("wait");
        assert!(
            status.success(),
            "run {run}: the demo stops cleanly on Ctrl-C: {}",
            log()
        );
    }
}

/// The Dockerfile's `docker run` example, followed as Docker would: the
/// image's ENV, the example's `-e`, `-v` and `-p`, and the repository's
/// config.toml at the mounted path. Docker is not needed: what matters is
/// what credproxy makes of that environment.
#[test]
fn dockerfile_run_example_works_as_written() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    // The example: comment lines from `docker run` to the one not ending in `\`.
    let mut example = String::new();
    for line in dockerfile
        .lines()
        .map(|l| l.trim_start_matches('#').trim())
        .skip_while(|l| !l.starts_with("docker run"))
    {
        example.push_str(line.trim_end_matches('\\'));
        example.push(' ');
        if !line.ends_with('\\') {
            break;
        }
    }
    let words: Vec<String> = example
        .split_whitespace()
        .map(|w| w.trim_matches('"').to_owned())
        .collect();
    assert!(
        words.len() > 3,
        "a docker run example in the Dockerfile's header"
    );
    let mut env: std::collections::HashMap<String, String> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let (mut mounts, mut ports) = (Vec::new(), Vec::new());
    for pair in words.windows(2) {
        match pair[0].as_str() {
            "-e" => {
                let (k, v) = pair[1]
                    .split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    // `-e NAME` passes the caller's value: any will do.
                    .unwrap_or_else(|| (pair[1].clone(), "from-the-caller".into()));
                env.insert(k, v);
            }
            "-v" => mounts.push(pair[1].clone()),
            "-p" => ports.push(pair[1].clone()),
            _ => {}
        }
    }
    let config_path = env
        .get("CREDPROXY_CONFIG")
        .expect("the image names its config");
    let config_mount = mounts
        .iter()
        .find_map(|m| {
            let mut parts = m.split(':');
            let (src, dst) = (parts.next()?, parts.next()?);
            (dst == config_path).then(|| (src.to_owned(), parts.next() == Some("ro")))
        })
        .expect("the example mounts the config where the image looks for it");
    assert!(config_mount.0.ends_with("/config.toml"), "{config_mount:?}");
    let volume = mounts
        .iter()
        .find_map(|m| m.strip_prefix("credproxy-data:"))
        .expect("a volume for the data");
    let text = std::fs::read_to_string(root.join("config.toml")).expect("config.toml");
    let config_dir = std::path::Path::new(config_path).parent().expect("dir");
    let config = credproxy::config::Config::parse_in(
        &text,
        std::path::Path::new(config_path),
        Some(config_dir),
        |name| env.get(name).cloned(),
    )
    .expect("the repository's config.toml, in the container");

    // Reachable through -p: listening on every interface, on the published ports.
    for (addr, what) in [
        (config.server.listen, "proxy"),
        (config.server.admin_listen, "admin"),
    ] {
        assert!(addr.ip().is_unspecified(), "{what} listens on {addr}");
        assert!(
            ports
                .iter()
                .any(|p| p.ends_with(&format!(":{}", addr.port()))),
            "{what}'s port {} is published: {ports:?}",
            addr.port()
        );
        assert!(
            dockerfile
                .lines()
                .any(|l| l.starts_with("EXPOSE") && l.contains(&addr.port().to_string())),
            "{what}'s port is exposed"
        );
    }
    // The store and the key land in the volume, not in the read-only config mount.
    use secrecy::ExposeSecret;
    let url = config.store.url.expose_secret();
    let file = url.strip_prefix("sqlite://").expect("sqlite");
    assert!(
        file.starts_with(&format!("{volume}/")),
        "the store is in the volume: {url}"
    );
    match &config.store.key {
        credproxy::config::KeySource::File(f) => {
            assert!(
                f.starts_with(volume),
                "the key is in the volume: {}",
                f.display()
            )
        }
        credproxy::config::KeySource::Env(_) | credproxy::config::KeySource::Command { .. } => {}
    }
    let workdir = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("WORKDIR "))
        .next_back()
        .expect("WORKDIR");
    assert_eq!(
        workdir.trim(),
        volume,
        "relative paths in the environment land in the volume"
    );
}

/// A config like `w`'s, with the store URL replaced; written to `name`.
fn config_with_store(w: &World, name: &str, store_url: &str) -> std::path::PathBuf {
    let path = w.path(name);
    let text = w.config_text(&Extra {
        store_url: Some(store_url.to_owned()),
        ..Extra::default()
    });
    std::fs::write(&path, text).expect("write config");
    path
}

/// Everything a run printed, stdout and stderr.
fn printed(o: &std::process::Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_urls_credentials_are_never_printed() {
    let w = World::new().await;
    // Nothing listens on 127.0.0.1:1; none of these URLs can be opened.
    let cases = [
        // In the query, where sqlx takes it from.
        "postgres://cpuser@127.0.0.1:1/cpdb?password=Hunter2-query",
        // An unescaped `/`: the URL parser makes `cpuser` the host and the
        // password's start a port (or the path).
        "postgres://cpuser:Hunter2/slash@127.0.0.1:1/cpdb",
        "postgres://cpuser:1234/Hunter2@127.0.0.1:1/cpdb",
        // A misspelt parameter: sqlx would log its value.
        "postgres://cpuser@127.0.0.1:1/cpdb?passwd=Hunter2-typo",
        "postgres://cpuser:Hunter2%2Fescaped@127.0.0.1:1/cpdb?sslmode=Hunter2-mode",
    ];
    for (i, store_url) in cases.iter().enumerate() {
        let cfg = config_with_store(&w, &format!("pg{i}.toml"), store_url);
        let mut commands: Vec<Vec<&str>> = vec![vec!["check"]];
        if i == 0 {
            commands.extend([
                vec!["serve"],
                vec!["session", "list"],
                vec!["session", "revoke", "s_nope"],
                vec![
                    "session",
                    "add",
                    "--provider",
                    "spark",
                    "--access-token",
                    "tok-x",
                ],
                vec!["connect", "spark"],
            ]);
        }
        for args in commands {
            let out = Command::new(BIN)
                .args(&args)
                .arg("--config")
                .arg(&cfg)
                .env("RUST_LOG", "trace")
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run");
            let all = printed(&out);
            assert_eq!(out.status.code(), Some(1), "{args:?} {store_url}: {all}");
            assert!(all.contains("store.url"), "{args:?} {store_url}: {all}");
            // Every line, at trace level too, of every kind.
            assert!(!all.contains("Hunter2"), "{args:?} {store_url}: {all}");
            for secret in ["Hunter2", "1234", "cpuser", "password=", "cpdb?"] {
                let said = all
                    .lines()
                    .filter(|l| l.contains("store") || l.contains("sqlx"))
                    .any(|l| l.contains(secret));
                assert!(!said, "{args:?} {store_url} printed {secret:?}: {all}");
            }
        }
    }
    let cfg = config_with_store(&w, "pg-shown.toml", cases[0]);
    let out = run_cli(&cfg, &["check"]);
    assert!(
        stderr(&out).contains("postgres://127.0.0.1:1/cpdb"),
        "host, port and database are shown: {}",
        stderr(&out)
    );

    // A real server refusing a wrong password, and one accepting the right
    // password given in the query.
    let Some(db) = support::postgres_db("store_url_credentials").await else {
        return;
    };
    let mut wrong = url::Url::parse(&db).expect("url");
    wrong.set_password(Some("Hunter2-wrong")).expect("password");
    let cfg = config_with_store(&w, "pg-wrong.toml", wrong.as_str());
    let out = run_cli(&cfg, &["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(
        !printed(&out).contains("Hunter2")
            && stderr(&out).contains("password authentication failed"),
        "{}",
        printed(&out)
    );
    let mut in_query = url::Url::parse(&db).expect("url");
    let password = in_query.password().expect("a password").to_owned();
    in_query.set_password(None).expect("no password");
    in_query.set_query(Some(&format!("password={password}")));
    let cfg = config_with_store(&w, "pg-query.toml", in_query.as_str());
    let out = run_cli(&cfg, &["check"]);
    assert!(out.status.success(), "{}", printed(&out));
    assert!(!printed(&out).contains(&password), "{}", printed(&out));
}

/// What `check` and the other commands do when the key file is gone, or
/// another one is in its place, with sessions in the store.
async fn missing_or_wrong_key(store_url: Option<String>) {
    use base64::Engine;
    let w = World::new().await;
    let cfg = w.write_config(&Extra {
        store_url,
        ..Extra::default()
    });
    let key_file = w.path("credproxy.key");
    // An empty store: check says the key would be made, and the first
    // session command makes it, as ever.
    let out = run_cli(&cfg, &["check"]);
    assert!(out.status.success(), "{}", printed(&out));
    assert!(stdout(&out).contains("would create the key file at"));
    assert!(!key_file.exists(), "check creates nothing");
    let out = run_cli(&cfg, &["session", "list"]);
    assert!(out.status.success(), "{}", printed(&out));
    assert!(key_file.exists());
    let t = w.spark.issue_tokens();
    support::cli_add(&cfg, "spark", &t);
    let out = run_cli(&cfg, &["check"]);
    assert!(
        stdout(&out).contains("the sealing key opens them"),
        "{}",
        printed(&out)
    );

    std::fs::remove_file(&key_file).expect("rm credproxy.key");
    for args in [
        &["check"][..],
        &["serve"][..],
        &["session", "list"][..],
        &[
            "session",
            "add",
            "--provider",
            "spark",
            "--access-token",
            "tok-new",
        ][..],
    ] {
        let out = run_cli(&cfg, args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", printed(&out));
        assert!(
            err.contains("store.key_file")
                && err.contains(&key_file.display().to_string())
                && err.contains("does not exist")
                && err.contains("1 session(s)")
                && err.contains("Restore the key file"),
            "{args:?}: the message says what is missing, where, and how to recover: {err}"
        );
        assert!(!key_file.exists(), "{args:?}: no new key is made");
    }

    // Another key in its place: refused too, with a clear message.
    let other = base64::engine::general_purpose::STANDARD.encode([42u8; 32]);
    std::fs::write(&key_file, format!("{other}\n")).expect("write key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    for args in [&["check"][..], &["serve"][..]] {
        let out = run_cli(&cfg, args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", printed(&out));
        assert!(
            err.contains("does not open the stored sessions") && err.contains("store.key_file"),
            "{args:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_key_is_refused_while_sessions_are_stored() {
    missing_or_wrong_key(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_key_is_refused_while_sessions_are_stored_postgres() {
    let Some(db) = support::postgres_db("missing_or_wrong_key").await else {
        return;
    };
    missing_or_wrong_key(Some(db)).await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_others_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let out = run_cli(&cfg, &["session", "list"]);
    assert!(out.status.success(), "{}", printed(&out));
    let out = run_cli(&cfg, &["check"]);
    assert!(out.status.success(), "{}", printed(&out));
    assert!(!printed(&out).contains("chmod"), "{}", printed(&out));
    let key_file = w.path("credproxy.key");
    let mode = std::fs::metadata(&key_file)
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "made 0600");

    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = run_cli(&cfg, &["check"]);
    assert!(
        out.status.success(),
        "a warning, not a refusal: {}",
        printed(&out)
    );
    assert!(
        stdout(&out).contains("warning: store.key_file")
            && stdout(&out).contains("0644")
            && stdout(&out).contains("chmod 600"),
        "{}",
        printed(&out)
    );
    let srv = BinServer::spawn(&cfg, "info");
    srv.stderr
        .wait_for(Duration::from_secs(10), |l| {
            l.contains("WARN") && l.contains("store.key_file") && l.contains("chmod 600")
        })
        .expect("serve warns at start-up");
}

#[tokio::test]
async fn an_absurd_lifetime_is_believed_for_ten_years_and_listed() {
    let w = World::new().await;
    let config = w.write_config(&Extra::default());
    let t = w.spark.issue_tokens();
    let out = run_cli(
        &config,
        &[
            "session",
            "add",
            "--provider",
            "spark",
            "--access-token",
            &t.access_token,
            "--expires-in",
            "18446744073709551615",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_cli(&config, &["session", "list", "--json"]);
    assert!(
        out.status.success(),
        "session list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let expires = list[0]["expires_at"].as_str().expect("expires_at");
    let year: i32 = expires[..4].parse().expect("year");
    let now_year = 1970 + (credproxy::store::now() / 31_556_952) as i32;
    assert!((now_year + 9..=now_year + 11).contains(&year), "{expires}");
}

/// `.ci/run` runs exactly the test command that README gives a newcomer, and
/// that command goes on after a failing test binary (`--no-fail-fast`), so
/// that one failure never hides another.
#[test]
fn ci_runs_exactly_readmes_test_command() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |name: &str| {
        std::fs::read_to_string(root.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let readme = read("README.md");
    let ci = read(".ci/run");
    let command = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#') && l.contains("cargo test"))
            .map(str::to_owned)
            .collect()
    };
    // README's first `cargo test` line is its test command.
    let readme_command = command(&readme)
        .into_iter()
        .next()
        .expect("README's test command");
    assert_eq!(command(&ci), vec![readme_command.clone()], ".ci/run");
    assert!(
        readme_command.contains(" --no-fail-fast"),
        "{readme_command}"
    );
}

/// The commands that touch only the store run from a plain shell, with no
/// provider's secret set; what calls a provider needs that provider's (and
/// only its), and serve and check need every one, as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_commands_need_no_provider_secret() {
    let w = World::new().await;
    let (s, z) = (w.spark.options(), w.zillow.options());
    let good = w.write_config(&Extra::default());
    let spark = support::cli_add(&good, "spark", &w.spark.issue_tokens());
    let spark_id = spark["id"].as_str().expect("id");
    let zillow = support::cli_add(&good, "zillow", &w.zillow.issue_tokens());
    let zillow_id = zillow["id"].as_str().expect("id");
    // The same store and key, with every provider secret in unset variables.
    let text = w
        .config_text(&Extra::default())
        .replace(
            &format!("client_secret = \"{}\"", s.client_secret),
            "client_secret_env = \"CREDPROXY_TEST_NO_SPARK\"",
        )
        .replace(
            &format!("client_secret = \"{}\"", z.client_secret),
            "client_secret_env = \"CREDPROXY_TEST_NO_ZILLOW\"",
        )
        .replace(
            &format!("api_key = \"{}\"", z.api_key),
            "api_key_env = \"CREDPROXY_TEST_NO_ZILLOW_KEY\"",
        );
    let cfg = w.path("plain-shell.toml");
    std::fs::write(&cfg, text).expect("write");
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .env_remove("RUST_LOG")
            .env_remove("CREDPROXY_TEST_NO_SPARK")
            .env_remove("CREDPROXY_TEST_NO_ZILLOW")
            .env_remove("CREDPROXY_TEST_NO_ZILLOW_KEY")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run")
    };
    let out = run(&["session", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(spark_id) && stdout(&out).contains(zillow_id),
        "{}",
        stdout(&out)
    );
    for args in [
        &["session", "list", "--json"][..],
        &["key", "list"][..],
        &["audit"][..],
        &["audit", "verify"][..],
        &["events", "list"][..],
        &[
            "session",
            "add",
            "--provider",
            "spark",
            "--access-token",
            "tok-plain-shell",
        ][..],
        &["session", "revoke", zillow_id][..],
    ] {
        let out = run(args);
        assert!(out.status.success(), "{args:?}: {}", printed(&out));
        assert!(!stderr(&out).contains("CREDPROXY_TEST_NO"), "{args:?}");
    }
    // A refresh calls its session's provider: spark's secret, not zillow's.
    let out = run(&["session", "refresh", spark_id]);
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let err = stderr(&out);
    assert_eq!(
        err.trim_end(),
        "credproxy: providers.spark.client_secret_env: environment variable CREDPROXY_TEST_NO_SPARK is not set or empty"
    );
    let out = run(&["connect", "zillow", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    let err = stderr(&out);
    assert!(
        err.contains("CREDPROXY_TEST_NO_ZILLOW") && !err.contains("SPARK"),
        "{err}"
    );
    assert!(
        !err.contains("/connect/zillow?link="),
        "no link is offered: {err}"
    );
    for cmd in ["check", "serve"] {
        let out = run(&[cmd]);
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        assert_eq!(stderr(&out).lines().count(), 3, "{cmd}: {}", stderr(&out));
    }
}

/// `check` creates nothing: on a fresh directory it says which store and
/// key file the first other command would create, and leaves the directory
/// as it was; once they exist it opens them as before.
#[tokio::test]
async fn check_creates_nothing_and_says_what_it_would() {
    let w = World::new().await;
    let cfg = w.write_config(&Extra::default());
    let before: Vec<_> = std::fs::read_dir(w.dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    let out = run_cli(&cfg, &["check"]);
    assert!(out.status.success(), "{}", printed(&out));
    let said = stdout(&out);
    let (db, key) = (w.path("credproxy.db"), w.path("credproxy.key"));
    assert!(
        said.contains(&format!(
            "would create the SQLite store at {}",
            db.display()
        )) && said.contains(&format!("would create the key file at {}", key.display()))
            && said.contains("ok: 2 provider(s) configured"),
        "{said}"
    );
    let after: Vec<_> = std::fs::read_dir(w.dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(before, after, "check created nothing");
    assert!(!w.path("credproxy.db-rotations").exists());

    // A key file's directory that does not exist: refused, naming the key.
    let text = w.config_text(&Extra::default()).replace(
        &key.display().to_string(),
        &w.path("no/such/dir/credproxy.key").display().to_string(),
    );
    let bad = w.path("bad-key-dir.toml");
    std::fs::write(&bad, text).expect("write");
    let out = run_cli(&bad, &["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", printed(&out));
    assert!(stderr(&out).contains("store.key_file"), "{}", printed(&out));

    support::cli_add(&cfg, "spark", &w.spark.issue_tokens());
    let out = run_cli(&cfg, &["check"]);
    assert!(out.status.success(), "{}", printed(&out));
    let said = stdout(&out);
    assert!(!said.contains("would create"), "{said}");
    assert!(
        said.contains("store reachable with 1 session(s), and the sealing key opens them"),
        "{said}"
    );
}

/// Completions and the manual page come from the command line's own
/// description, with no config file (the one named does not exist).
#[test]
fn completions_and_man_page_need_no_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(dir.path().join("missing.toml"))
            .current_dir(dir.path())
            .output()
            .expect("run")
    };
    let out = run(&["completions", "bash"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bash = stdout(&out);
    assert!(bash.contains("complete -F _credproxy"), "{bash}");
    for cmd in [
        "serve",
        "session",
        "check",
        "connect",
        "events",
        "key",
        "audit",
        "completions",
        "man",
        "rewrap",
        "--config",
    ] {
        assert!(bash.contains(cmd), "bash completes {cmd}");
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        assert!(stdout(&out).contains("rewrap"), "{shell}");
    }
    let out = run(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses an unknown shell");

    let out = run(&["man"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = stdout(&out);
    assert!(
        page.contains("\n.TH credproxy 1 "),
        "roff with a title: {page}"
    );
    assert!(
        page.contains(".SH SYNOPSIS") && page.contains("session"),
        "{page}"
    );
    let pages = dir.path().join("man1");
    std::fs::create_dir(&pages).expect("mkdir");
    let out = run(&["man", "--dir", pages.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let add = std::fs::read_to_string(pages.join("credproxy-session-add.1")).expect("a page");
    assert!(
        add.contains(".TH credproxy-session-add 1") && add.contains("access\\-token"),
        "{add}"
    );
    assert!(pages.join("credproxy.1").is_file());
    let made: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
    assert_eq!(made.len(), 1, "nothing but the pages asked for");
}

/// `deploy/credproxy.service`: hardened, runs `serve` on /etc/credproxy's
/// config, and the `[store]` its header tells you to write keeps the store,
/// the key file and the rotation journal in the one directory the unit lets
/// the service write; `systemd-analyze verify` accepts it where installed.
#[test]
fn systemd_unit_is_hardened_and_keeps_state_where_it_may_write() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("deploy/credproxy.service")).expect("unit");
    let directives: Vec<(&str, &str)> = unit
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    let value = |key: &str| {
        directives
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{key}= is set"))
    };
    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("StateDirectory", "credproxy"),
        ("ReadWritePaths", "/var/lib/credproxy"),
        ("Restart", "on-failure"),
        ("User", "credproxy"),
        (
            "ExecStart",
            "/usr/local/bin/credproxy serve --config /etc/credproxy/config.toml",
        ),
    ] {
        assert_eq!(value(key), want, "{key}");
    }
    let nofile: u64 = value("LimitNOFILE").parse().expect("a number");
    assert!(nofile >= 2 * 10_000 + 1024, "room for max_connections");

    // The [store] of the header, as the config would hold it.
    let store: String = unit
        .lines()
        .skip_while(|l| l.trim() != "#   [store]")
        .take_while(|l| l.starts_with("#   "))
        .map(|l| format!("{}\n", l.trim_start_matches("#   ")))
        .collect();
    assert!(store.contains("key_file"), "{store}");
    let config = credproxy::config::Config::parse_in(
        &store,
        std::path::Path::new("/etc/credproxy/config.toml"),
        Some(std::path::Path::new("/etc/credproxy")),
        |_| None,
    )
    .expect("a valid [store]");
    let state = std::path::Path::new("/var/lib/credproxy");
    assert!(config
        .store
        .sqlite_file()
        .expect("SQLite")
        .starts_with(state));
    match &config.store.key {
        credproxy::config::KeySource::File(path) => assert!(path.starts_with(state)),
        other => panic!("a key file: {other:?}"),
    }
    let journal = config.store.rotation_journal.as_ref().expect("a journal");
    assert!(journal.starts_with(state), "{}", journal.display());

    let verify = Command::new("systemd-analyze").arg("--version").output();
    if verify.is_err() {
        println!("SKIPPED systemd-analyze verify: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("credproxy.service");
    let unit = unit
        .replace("/usr/local/bin/credproxy", BIN)
        .replace("Documentation=man:credproxy(1)\n", "");
    std::fs::write(&copy, unit).expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        printed(&out)
    );
}
