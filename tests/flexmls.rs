//! A real client: flex-mls (PyPI, a third-party client of Spark's RESO Web
//! API) pages through collections through credproxy, following the absolute
//! `@odata.nextLink`s it is given, on the API host and on the replication
//! host, while its tokens expire under it.
//!
//! The venv is made by `scripts/flexmls-venv.sh` (pip install from PyPI).
//! Where it cannot be made (no registry), the test says so and passes,
//! except under CI, where it must run.

mod support;

use std::process::Command;

use credproxy_standins::Options;
use serde_json::Value;
use support::{add_session, Extra, World};

async fn page_all(python: &str, base_url: String, key: &str) -> Value {
    let script = credproxy_standins::flexmls::page_all_script();
    let (python, key) = (python.to_owned(), key.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args(["--top", "7", "--max-retries", "0"])
            .arg(&base_url)
            .arg(&key)
            .output()
            .expect("run page_all.py")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "flex-mls failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flex_mls_pages_through_credproxy_and_never_sees_the_provider() {
    let Some(python) = credproxy_standins::flexmls::python("flex_mls_pages_through_credproxy")
    else {
        return;
    };
    let w = World::with(
        Options {
            replication: true,
            ..Options::spark()
        },
        Options::zillow(),
    )
    .await;
    let replication = w.spark.replication_url().expect("replication host");
    let srv = w
        .start(&Extra {
            zillow: format!(
                "\n[providers.spark-replication]\nkind = \"spark\"\napi_base = \"{replication}\"\nsessions_from = \"spark\"\n"
            ),
            ..Extra::default()
        })
        .await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    // Each access token is good for three requests: paging meets expiry.
    w.spark.expire_access_after_uses(3);

    let expect = serde_json::json!({"members": 25, "member_pages": 4, "properties": 25, "property_pages": 4});
    for base in [
        format!("http://{}/spark/Reso/OData", srv.proxy_addr),
        // flex-mls's default base, https://replication.sparkapi.com/Version/3/Reso/OData, behind us.
        format!(
            "http://{}/spark-replication/Version/3/Reso/OData",
            srv.proxy_addr
        ),
    ] {
        assert_eq!(page_all(&python, base, &key).await, expect);
    }
    let seen = w.spark.requests();
    let on = |host: &str| {
        seen.iter()
            .filter(|r| r.host == host && r.header("authorization").is_some())
            .count()
    };
    assert!(
        on("api") >= 8 && on("replication") >= 8,
        "every page went through: {} + {}",
        on("api"),
        on("replication")
    );
    for r in &seen {
        assert!(
            r.headers.iter().all(|(_, v)| !v.contains(&key))
                && !r.query.as_deref().unwrap_or("").contains(&key),
            "the stand-in saw the session key: {r:?}"
        );
    }
    assert!(
        w.spark.grant_count() >= 4,
        "tokens expired and were refreshed: {}",
        w.spark.grant_count()
    );
    assert_eq!(w.spark.reused_refresh_tokens(), 0);
    srv.shutdown().await;
}
