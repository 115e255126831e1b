//! flex-mls, a real RESO client, pages through the stand-in's collections
//! (`tests/flexmls/page_all.py`), with the venv `scripts/flexmls-venv.sh`
//! makes (or `CREDPROXY_FLEXMLS_PYTHON`, a python with flex-mls installed).
//! Where the venv cannot be made (no PyPI), the test prints a SKIPPED line,
//! except under CI, where it fails.

use std::path::PathBuf;
use std::process::Command;

use credproxy_standins::{Options, Standin};
use serde_json::Value;

fn python(test: &str) -> Option<String> {
    credproxy_standins::flexmls::python(test)
}

fn script() -> PathBuf {
    credproxy_standins::flexmls::page_all_script()
}

/// Runs page_all.py; its exit status, stdout and stderr.
async fn page_all(python: &str, args: Vec<String>) -> (i32, String, String) {
    let python = python.to_owned();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(python)
            .arg(script())
            .args(args)
            .output()
            .expect("run page_all.py");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn flexmls_pages_through_both_hosts() {
    const TEST: &str = "flexmls_pages_through_both_hosts";
    let Some(python) = python(TEST) else {
        return;
    };
    let mut opts = Options::spark();
    opts.replication = true;
    opts.reso_records = 23;
    let s = Standin::start(opts).await.expect("start");
    let token = s.issue_tokens().access_token;

    let (code, out, err) = page_all(
        &python,
        vec!["--top".into(), "5".into(), s.reso_url(), token.clone()],
    )
    .await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let counts: Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(
        counts,
        serde_json::json!({"members": 23, "member_pages": 5, "properties": 23, "property_pages": 5})
    );

    // What flex-mls sends: Bearer, gzip accepted, `$` percent-encoded in the
    // first query, the next links' bytes as they were, no Spark user agent.
    let reqs = s.requests();
    assert_eq!(reqs.len(), 10);
    assert_eq!(reqs[0].path, "/Reso/OData/Member");
    assert_eq!(reqs[0].query.as_deref(), Some("%24top=5"));
    assert!(reqs[1]
        .query
        .as_deref()
        .is_some_and(|q| q.starts_with("$top=5&$skiptoken=")));
    for r in &reqs {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {token}").as_str())
        );
        assert!(r
            .header("accept-encoding")
            .is_some_and(|v| v.contains("gzip")));
        assert_eq!(r.header("accept"), Some("application/json"));
        assert_eq!(r.header("x-sparkapi-user-agent"), None);
        assert!(r
            .header("user-agent")
            .is_some_and(|v| v.starts_with("flex-mls-python-client/")));
    }

    // The replication host, at flex-mls's default path, with flex-mls's
    // default page size (1000: one page).
    s.clear_requests();
    let base = format!(
        "{}/Version/3/Reso/OData",
        s.replication_url().expect("replication")
    );
    let (code, out, err) =
        page_all(&python, vec!["--top".into(), "1000".into(), base, token]).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let counts: Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(counts["member_pages"], 1);
    assert_eq!(counts["properties"], 23);
    assert!(s.requests().iter().all(|r| r.host == "replication"));
}

#[tokio::test]
async fn flexmls_copes_with_escaped_slashes_and_reports_errors() {
    const TEST: &str = "flexmls_copes_with_escaped_slashes_and_reports_errors";
    let Some(python) = python(TEST) else {
        return;
    };
    let mut opts = Options::spark();
    opts.json_escape_slashes = true;
    opts.require_user_agent = true;
    let s = Standin::start(opts).await.expect("start");
    let token = s.issue_tokens().access_token;

    // flex-mls sends no X-SparkApi-User-Agent: a Spark that requires it refuses.
    let (code, out, err) = page_all(
        &python,
        vec!["--max-retries".into(), "0".into(), s.reso_url(), token],
    )
    .await;
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(out.is_empty());
    assert!(err.contains("1016"), "{err}");

    let mut opts = Options::spark();
    opts.json_escape_slashes = true;
    let s = Standin::start(opts).await.expect("start");
    let token = s.issue_tokens().access_token;
    let (code, out, err) = page_all(&python, vec![s.reso_url(), token]).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let counts: Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(counts["members"], 25);
    assert_eq!(counts["member_pages"], 3);

    // An unknown token: flex-mls's AuthenticationError, exit 1.
    let (code, _, err) = page_all(
        &python,
        vec![
            "--max-retries".into(),
            "0".into(),
            s.reso_url(),
            "nope".into(),
        ],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("AuthenticationError") && err.contains("1000"),
        "{err}"
    );
}
