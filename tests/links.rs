//! Links in responses stay behind the proxy: OData paging, `$metadata`,
//! redirects, JSON's escaped form, compressed bodies, the replication host,
//! `Content-Length`, the base of rewritten links, and memory for a large body.

mod support;

use std::io::Read;
use std::time::Duration;

use credproxy_standins::{Options, Standin};
use serde_json::Value;
use support::{add_session, client, raw_request, url, BinServer, Extra, World};

const HDR: &str = "X-Credproxy-Session";

/// No request the stand-in received carries the session key anywhere.
fn never_saw(standin: &Standin, key: &str) {
    for r in standin.requests() {
        assert!(
            !r.query.as_deref().unwrap_or("").contains(key)
                && r.headers.iter().all(|(_, v)| !v.contains(key)),
            "the stand-in saw the session key: {r:?}"
        );
    }
}

#[tokio::test]
async fn reso_paging_stays_behind_the_proxy() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let base = format!("http://{}/spark", srv.proxy_addr);
    let mut next = Some(format!("{base}/Reso/OData/Property?$top=10"));
    let (mut pages, mut records) = (0, 0);
    while let Some(link) = next.take() {
        assert!(
            link.starts_with(&base),
            "a link that leaves the proxy: {link}"
        );
        let r = client()
            .get(&link)
            .bearer_auth(&key)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        let page: Value = r.json().await.expect("json");
        pages += 1;
        for rec in page["value"].as_array().expect("value") {
            records += 1;
            let id = rec["@odata.id"].as_str().expect("@odata.id");
            assert!(id.starts_with(&base), "{id}");
            let media = rec["MediaURL"].as_str().expect("MediaURL");
            assert!(
                media.starts_with("https://cdn.example.com/"),
                "other origins untouched: {media}"
            );
        }
        let context = page["@odata.context"].as_str().expect("context");
        assert!(context.starts_with(&base), "{context}");
        next = page["@odata.nextLink"].as_str().map(str::to_owned);
        assert!(pages < 10, "paging must end");
    }
    assert_eq!((pages, records), (3, 25));
    never_saw(&w.spark, &key);
    srv.shutdown().await;
}

#[tokio::test]
async fn escaped_slashes_and_metadata_are_rewritten() {
    let w = World::with(
        Options {
            json_escape_slashes: true,
            ..Options::spark()
        },
        Options::zillow(),
    )
    .await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let own = w.spark.base_url();
    let get = |path: String| {
        client()
            .get(url(srv.proxy_addr, &path))
            .header(HDR, &key)
            .send()
    };
    let body = get("/spark/Reso/OData/Member?$top=5".into())
        .await
        .expect("send")
        .text()
        .await
        .expect("body");
    let escaped = format!(
        "http:\\/\\/{}\\/spark\\/Reso\\/OData\\/Member",
        srv.proxy_addr
    );
    assert!(body.contains(&escaped), "{body}");
    assert!(!body.contains(&own.replace('/', "\\/")), "{body}");
    let page: Value = serde_json::from_str(&body).expect("still valid JSON");
    assert!(page["@odata.nextLink"]
        .as_str()
        .expect("next")
        .starts_with(&format!("http://{}/spark/", srv.proxy_addr)));

    let r = get("/spark/Reso/OData/$metadata".into())
        .await
        .expect("send");
    assert!(r.headers()["content-type"]
        .to_str()
        .expect("ct")
        .contains("xml"));
    let xml = r.text().await.expect("body");
    assert!(!xml.contains(&own), "{xml}");
    assert!(
        xml.contains(&format!("http://{}/spark/", srv.proxy_addr)),
        "{xml}"
    );
    srv.shutdown().await;
}

fn gunzip(bytes: &[u8]) -> String {
    let mut out = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut out)
        .expect("gzip");
    out
}

#[tokio::test]
async fn compressed_bodies_are_rewritten() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let r = client()
        .get(url(srv.proxy_addr, "/spark/Reso/OData/Property?$top=3"))
        .header(HDR, &key)
        .header("accept-encoding", "zstd, gzip;q=0.9")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let wire = r.bytes().await.expect("body");
    let text = gunzip(&wire);
    let page: Value = serde_json::from_str(&text).expect("json");
    assert!(page["@odata.nextLink"]
        .as_str()
        .expect("next")
        .starts_with(&format!("http://{}/spark/", srv.proxy_addr)));
    assert!(!text.contains(&w.spark.base_url()));
    let asked = w.spark.last_request().expect("request");
    assert_eq!(
        asked.header("accept-encoding"),
        Some("gzip;q=0.9"),
        "only codings credproxy can decode are asked for"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn redirects_stay_behind_the_proxy_and_lose_credentials() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, spark_key, _) = add_session(&srv, "spark", &w.spark).await;
    let (_, zillow_key, _) = add_session(&srv, "zillow", &w.zillow).await;
    let no_follow = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = no_follow
        .get(url(
            srv.proxy_addr,
            "/spark/redirect?to=/v1/listings?_page=2",
        ))
        .header(HDR, &spark_key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 302);
    assert_eq!(
        r.headers()["location"],
        format!("http://{}/spark/v1/listings?_page=2", srv.proxy_addr).as_str()
    );
    let r = no_follow
        .get(url(srv.proxy_addr, "/spark/redirect-away"))
        .header(HDR, &spark_key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.headers()["location"], "https://elsewhere.example/x");

    let r = no_follow
        .get(url(
            srv.proxy_addr,
            &format!("/zillow/redirect?to=/v1/feeds/&page=3&accessToken={zillow_key}"),
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 302);
    let location = r.headers()["location"].to_str().expect("ascii").to_owned();
    assert!(
        location.starts_with(&format!("http://{}/zillow/v1/feeds/", srv.proxy_addr)),
        "{location}"
    );
    let z = w.zillow.options();
    for secret in [
        z.api_key.as_str(),
        z.client_id.as_str(),
        "accessToken",
        zillow_key.as_str(),
    ] {
        assert!(!location.contains(secret), "{location}");
    }
    assert!(location.contains("page=3"), "{location}");
    never_saw(&w.spark, &spark_key);
    never_saw(&w.zillow, &zillow_key);
    srv.shutdown().await;
}

#[tokio::test]
async fn content_length_stays_true() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let get = |path: &'static str| {
        client()
            .get(url(srv.proxy_addr, path))
            .header(HDR, &key)
            .send()
    };
    // Small, with links: rewritten whole, the length recomputed.
    let r = get("/spark/big-json?bytes=20000&content_length=1")
        .await
        .expect("send");
    let declared = r.content_length().expect("a length");
    let body = r.bytes().await.expect("body");
    assert_eq!(declared, body.len() as u64);
    let doc: Value = serde_json::from_slice(&body).expect("json");
    let n = w.spark.big_json_records(20000);
    assert_eq!(doc["value"].as_array().expect("value").len() as u64, n);
    let base = format!("http://{}/spark/", srv.proxy_addr);
    assert_eq!(
        String::from_utf8_lossy(&body).matches(&base).count() as u64,
        n
    );
    // Small, without links: the same bytes and the same length.
    let r = get("/spark/v1/echo").await.expect("send");
    let declared = r.content_length().expect("a length");
    assert_eq!(declared, r.bytes().await.expect("body").len() as u64);
    // Large: streamed, chunked, still every link rewritten.
    let r = get("/spark/big-json?bytes=2000000&content_length=1")
        .await
        .expect("send");
    assert!(
        r.headers().get("content-length").is_none(),
        "chunked when rewritten as it streams"
    );
    let body = r.bytes().await.expect("body");
    let doc: Value = serde_json::from_slice(&body).expect("json");
    let n = w.spark.big_json_records(2_000_000);
    assert_eq!(doc["value"].as_array().expect("value").len() as u64, n);
    assert_eq!(
        String::from_utf8_lossy(&body).matches(&base).count() as u64,
        n
    );
    assert!(!String::from_utf8_lossy(&body).contains(&w.spark.base_url()));
    srv.shutdown().await;
}

/// The `Location` a raw request with this `Host` line gets back.
async fn location_for_host(proxy: std::net::SocketAddr, host: &str, key: &str) -> String {
    let req = format!(
        "GET /spark/redirect?to=/v1/x HTTP/1.1\r\nHost: {host}\r\n{HDR}: {key}\r\nConnection: close\r\n\r\n"
    );
    let answer = raw_request(proxy, req.as_bytes()).await;
    answer
        .lines()
        .find_map(|l| {
            l.strip_prefix("location: ")
                .or_else(|| l.strip_prefix("Location: "))
        })
        .unwrap_or_else(|| panic!("no Location in {answer}"))
        .to_owned()
}

#[tokio::test]
async fn the_base_of_links_is_the_request_host_validated_or_proxy_url() {
    let w = World::new().await;
    let srv = w.start(&Extra::default()).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let p = srv.proxy_addr;
    assert_eq!(
        location_for_host(p, "credproxy.internal:8443", &key).await,
        "http://credproxy.internal:8443/spark/v1/x"
    );
    assert_eq!(
        location_for_host(p, "[::1]:9", &key).await,
        "http://[::1]:9/spark/v1/x"
    );
    for hostile in [
        "evil.example/steal?",
        "a@evil.example",
        "evil.example:80:80",
        "ev!l.example",
        "%65vil",
    ] {
        assert_eq!(
            location_for_host(p, hostile, &key).await,
            format!("http://{p}/spark/v1/x"),
            "Host {hostile:?} falls back to the listen address"
        );
    }
    srv.shutdown().await;

    let srv = w
        .start(&Extra {
            server: "proxy_url = \"https://credproxy.example.net/base/\"".into(),
            ..Extra::default()
        })
        .await;
    assert_eq!(
        location_for_host(srv.proxy_addr, "ignored.example", &key).await,
        "https://credproxy.example.net/base/spark/v1/x"
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replication_host_shares_sessions_and_links() {
    let w = World::with(
        Options {
            replication: true,
            ..Options::spark()
        },
        Options::zillow(),
    )
    .await;
    let replication = w.spark.replication_url().expect("replication host");
    let extra = Extra {
        zillow: format!(
            "\n[providers.replication]\nkind = \"spark\"\napi_base = \"{replication}\"\nsessions_from = \"spark\"\n"
        ),
        ..Extra::default()
    };
    let srv = w.start(&extra).await;
    let (_, key, _) = add_session(&srv, "spark", &w.spark).await;
    let page: Value = client()
        .get(url(
            srv.proxy_addr,
            "/replication/Version/3/Reso/OData/Property?$top=2",
        ))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let proxy = format!("http://{}", srv.proxy_addr);
    let next = page["@odata.nextLink"].as_str().expect("next");
    assert!(
        next.starts_with(&format!("{proxy}/replication/Version/3/")),
        "{next}"
    );
    let api = page["value"][0]["ApiHostURL"].as_str().expect("ApiHostURL");
    assert!(
        api.starts_with(&format!("{proxy}/spark/")),
        "links between the hosts: {api}"
    );
    let hosts: Vec<&str> = w.spark.requests().iter().map(|r| r.host).collect();
    assert_eq!(hosts, ["replication"]);

    // One token for both hosts, one refresh when it expires.
    w.spark.expire_access_tokens();
    let mut calls = Vec::new();
    for i in 0..10 {
        let path = if i % 2 == 0 {
            "/spark/v1/listings"
        } else {
            "/replication/v1/listings"
        };
        let req = client().get(url(srv.proxy_addr, path)).header(HDR, &key);
        calls.push(tokio::spawn(async move {
            req.send().await.map(|r| r.status().as_u16())
        }));
    }
    for c in calls {
        assert_eq!(c.await.expect("join").expect("send"), 200);
    }
    assert_eq!(w.spark.grant_count(), 1, "one single flight for both hosts");
    never_saw(&w.spark, &key);
    srv.shutdown().await;
}

#[test]
fn a_64_mib_json_body_streams_in_bounded_memory() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let w = rt.block_on(World::new());
    let config = w.write_config(&Extra::default());
    let tokens = w.spark.issue_tokens();
    let added = support::cli_add(&config, "spark", &tokens);
    let key = added["session_key"].as_str().expect("key").to_owned();
    let srv = BinServer::spawn(&config, "warn");
    let size: u64 = 64 * 1024 * 1024;
    let base = format!("http://{}/spark/", srv.proxy_addr);
    let (len, links) = rt.block_on(async {
        let mut r = client()
            .get(url(
                srv.proxy_addr,
                &format!("/spark/big-json?bytes={size}"),
            ))
            .header(HDR, &key)
            .timeout(Duration::from_secs(300))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        // Count links across chunk boundaries without holding the body.
        let (mut len, mut links, mut carry) = (0u64, 0u64, Vec::new());
        while let Some(chunk) = r.chunk().await.expect("chunk") {
            len += chunk.len() as u64;
            carry.extend_from_slice(&chunk);
            let text = String::from_utf8_lossy(&carry).into_owned();
            links += text.matches(&base).count() as u64;
            let keep = carry.len().saturating_sub(base.len() - 1);
            carry.drain(..keep);
            // What is kept cannot hold a whole match already counted.
        }
        (len, links)
    });
    let rss_mib = srv.peak_rss_kib() / 1024;
    println!("64 MiB JSON through the proxy: {len} bytes, {links} links, peak RSS {rss_mib} MiB");
    assert!(len >= size, "{len}");
    assert_eq!(links, w.spark.big_json_records(size));
    assert!(rss_mib < 50, "peak RSS {rss_mib} MiB");
}
