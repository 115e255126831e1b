//! The stand-ins behave like the real providers where real clients meet
//! them: RESO collections and `$metadata`, redirects, a replication host,
//! Spark's error envelopes and the controls that provoke them, compression
//! and a large streamed JSON body.

use std::collections::HashSet;
use std::io::Read;

use credproxy_standins::{big_json_records, ApiFault, Options, Standin};
use futures_util::StreamExt;
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

async fn get(url: &str, authorization: &str) -> reqwest::Response {
    client()
        .get(url)
        .header("authorization", authorization)
        .send()
        .await
        .expect("request")
}

async fn get_json(url: &str, authorization: &str) -> (u16, Value) {
    let resp = get(url, authorization).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json body"))
}

fn zillow_query(s: &Standin, access_token: &str) -> String {
    let o = s.options();
    format!(
        "accessToken={access_token}&clientId={}&apiKey={}",
        o.client_id, o.api_key
    )
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("gzip");
    out
}

/// Follows `@odata.nextLink` from `url`; the pages' records, in order.
async fn page_all(url: &str, authorization: &str) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    let mut next = Some(url.to_owned());
    while let Some(url) = next {
        let (status, page) = get_json(&url, authorization).await;
        assert_eq!(status, 200, "{url}: {page}");
        pages.push(page["value"].as_array().expect("value").clone());
        next = page["@odata.nextLink"].as_str().map(str::to_owned);
        assert!(pages.len() <= 1000, "paging does not end");
    }
    pages
}

#[tokio::test]
async fn reso_collections_page_with_absolute_next_links() {
    let s = Standin::start(Options::spark()).await.expect("start");
    assert_eq!(s.options().reso_records, 25);
    let bearer = format!("Bearer {}", s.issue_tokens().access_token);
    let base = s.reso_url();
    assert_eq!(base, format!("{}/Reso/OData", s.base_url()));

    let resp = get(&format!("{base}/Property"), &bearer).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    assert_eq!(resp.headers()["odata-version"], "4.0");
    let page: Value = resp.json().await.expect("json");
    assert_eq!(
        page["@odata.context"],
        format!("{base}/$metadata#Property").as_str()
    );
    let records = page["value"].as_array().expect("value");
    assert_eq!(records.len(), 10, "default $top");
    let first = &records[0];
    assert_eq!(first["ListingKey"], "P000001");
    assert_eq!(
        first["@odata.id"],
        format!("{base}/Property('P000001')").as_str()
    );
    assert_eq!(
        first["MediaURL"],
        "https://cdn.example.com/photos/P000001.jpg"
    );
    assert!(
        first.get("ApiHostURL").is_none(),
        "only on the replication host"
    );
    let next = page["@odata.nextLink"].as_str().expect("next link");
    assert!(
        next.starts_with(&format!("{base}/Property?$top=10&$skiptoken=")),
        "{next}"
    );

    // Following the links gets every record once.
    let pages = page_all(&format!("{base}/Property?$top=7"), &bearer).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [7, 7, 7, 4]);
    let keys: HashSet<String> = pages
        .iter()
        .flatten()
        .map(|r| r["ListingKey"].as_str().expect("key").to_owned())
        .collect();
    assert_eq!(keys.len(), 25);

    // flex-mls's default base, any case, and $top above the cap.
    let (status, page) = get_json(
        &format!(
            "{}/Version/3/reso/odata/Member?$top=5000&$count=true",
            s.base_url()
        ),
        &format!("OAuth {}", bearer.trim_start_matches("Bearer ")),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["value"].as_array().map(Vec::len), Some(25));
    assert_eq!(page["@odata.count"], 25);
    assert!(page.get("@odata.nextLink").is_none(), "last page");
    assert_eq!(page["value"][0]["MemberKey"], "M000001");
    assert!(page["value"][0]["MemberPhotoURL"]
        .as_str()
        .is_some_and(|u| u.starts_with("https://cdn.example.com/")));
    assert_eq!(
        page["@odata.context"],
        format!("{}/Version/3/reso/odata/$metadata#Member", s.base_url()).as_str()
    );

    // Other query options are carried over into the next link.
    let (_, page) = get_json(
        &format!("{base}/Office?$select=OfficeKey&$top=20&$filter=x%20eq%201"),
        &bearer,
    )
    .await;
    let next = page["@odata.nextLink"].as_str().expect("next");
    assert!(
        next.ends_with("&$select=OfficeKey&$filter=x%20eq%201"),
        "{next}"
    );
    assert_eq!(page["value"][19]["OfficeKey"], "O000020");

    // One record; a missing one; an unknown entity set; a bad $top.
    let (status, one) = get_json(&format!("{base}/Property('P000003')"), &bearer).await;
    assert_eq!(status, 200);
    assert_eq!(one["ListingKey"], "P000003");
    assert_eq!(
        one["@odata.context"],
        format!("{base}/$metadata#Property/$entity").as_str()
    );
    let (status, err) = get_json(&format!("{base}/Property('P000026')"), &bearer).await;
    assert_eq!(status, 404);
    assert_eq!(err["error"]["code"], "404");
    let (status, empty) = get_json(&format!("{base}/Media"), &bearer).await;
    assert_eq!(status, 200);
    assert_eq!(empty["value"], json!([]));
    let (status, err) = get_json(&format!("{base}/Property?$top=many"), &bearer).await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].is_string());
    let (status, _) = get_json(&format!("{base}/Property?$skiptoken=%21"), &bearer).await;
    assert_eq!(status, 400);

    // The service document.
    let (status, doc) = get_json(&base, &bearer).await;
    assert_eq!(status, 200);
    assert_eq!(doc["value"][0]["name"], "Property");

    // Read-only, except a POST that overrides its method to GET.
    let resp = client()
        .post(format!("{base}/Property"))
        .header("authorization", &bearer)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 405);
    let resp = client()
        .post(format!("{base}/Property?$top=2"))
        .header("authorization", &bearer)
        .header("x-http-method-override", "GET")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);

    // Credentials as everywhere else on Spark.
    let (status, err) = get_json(&format!("{base}/Property"), "Bearer nope").await;
    assert_eq!((status, err["D"]["Code"].as_u64()), (401, Some(1000)));
}

#[tokio::test]
async fn reso_record_count_is_an_option_and_zillow_has_no_reso() {
    let mut opts = Options::spark();
    opts.reso_records = 3;
    let s = Standin::start(opts).await.expect("start");
    let bearer = format!("Bearer {}", s.issue_tokens().access_token);
    let pages = page_all(&format!("{}/Property?$top=2", s.reso_url()), &bearer).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);

    let z = Standin::start(Options::zillow()).await.expect("start");
    let q = zillow_query(&z, &z.issue_tokens().access_token);
    let resp = client()
        .get(format!("{}/Reso/OData/Property?{q}", z.base_url()))
        .send()
        .await
        .expect("send");
    let echo: Value = resp.json().await.expect("json");
    assert_eq!(echo["path"], "/Reso/OData/Property", "the echo");
}

#[tokio::test]
async fn metadata_is_edmx_with_links_on_its_own_origin() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let bearer = format!("Bearer {}", s.issue_tokens().access_token);
    let resp = get(&format!("{}/$metadata", s.reso_url()), &bearer).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/xml; charset=utf-8"
    );
    let doc = resp.text().await.expect("text");
    assert!(doc.starts_with("<?xml"));
    assert!(doc.contains("<edmx:Edmx"));
    assert!(
        doc.contains(&format!("xml:base=\"{}/\"", s.reso_url())),
        "{doc}"
    );
    assert!(doc.contains(&format!("String=\"{}/$metadata\"", s.reso_url())));
    assert!(doc.contains("Uri=\"https://oasis-tcs.github.io/"));
    assert!(doc.contains("<EntitySet Name=\"Property\""));
    assert!(doc.contains("<PropertyRef Name=\"ListingKey\"/>"));
}

#[tokio::test]
async fn json_slashes_can_be_escaped() {
    let mut opts = Options::spark();
    opts.json_escape_slashes = true;
    let s = Standin::start(opts).await.expect("start");
    let bearer = format!("Bearer {}", s.issue_tokens().access_token);
    let url = format!("{}/Property?$top=2", s.reso_url());
    let text = get(&url, &bearer).await.text().await.expect("text");
    let escaped_origin = s.base_url().replace('/', "\\/");
    assert!(!text.contains("http://"), "{text}");
    assert!(text.contains(&format!(
        "\"@odata.nextLink\":\"{escaped_origin}\\/Reso\\/OData\\/Property?$top=2&$skiptoken="
    )));
    let page: Value = serde_json::from_str(&text).expect("still JSON");
    assert!(page["@odata.nextLink"]
        .as_str()
        .is_some_and(|l| l.starts_with(&format!("{}/Reso/OData/Property?", s.base_url()))));
    // The echo and the errors too.
    let text = get(&format!("{}/v1/x", s.base_url()), &bearer)
        .await
        .text()
        .await
        .expect("text");
    assert!(text.contains(r#""path":"\/v1\/x""#), "{text}");
    let n = 100_000;
    let body = get(&format!("{}/big-json?bytes={n}", s.base_url()), &bearer)
        .await
        .bytes()
        .await
        .expect("body");
    assert!(!body.windows(7).any(|w| w == b"http://"));
    let doc: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(
        doc["value"].as_array().map(|v| v.len() as u64),
        Some(s.big_json_records(n))
    );
}

#[tokio::test]
async fn redirects_point_at_the_own_origin_or_away() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let auth = format!("OAuth {}", s.issue_tokens().access_token);
    let resp = get(
        &format!("{}/redirect?to=/v1/listings%3Fa%3D1", s.base_url()),
        &auth,
    )
    .await;
    assert_eq!(resp.status(), 302);
    assert_eq!(
        resp.headers()["location"],
        format!("{}/v1/listings?a=1", s.base_url()).as_str()
    );
    let resp = get(&format!("{}/redirect-away", s.base_url()), &auth).await;
    assert_eq!(resp.status(), 302);
    assert_eq!(resp.headers()["location"], "https://elsewhere.example/x");
    // Only for authorised requests; `to` must be a path.
    let resp = get(&format!("{}/redirect?to=/x", s.base_url()), "OAuth nope").await;
    assert_eq!(resp.status(), 401);
    for to in ["", "?to=http://evil.example/", "?to=//evil.example/"] {
        let resp = get(&format!("{}/redirect{to}", s.base_url()), &auth).await;
        assert_eq!(resp.status(), 400, "{to}");
    }

    // Zillow keeps the whole query, credentials included.
    let z = Standin::start(Options::zillow()).await.expect("start");
    let q = zillow_query(&z, &z.issue_tokens().access_token);
    let resp = client()
        .get(format!("{}/redirect?to=/listings/&{q}", z.base_url()))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 302);
    assert_eq!(
        resp.headers()["location"],
        format!("{}/listings/?to=/listings/&{q}", z.base_url()).as_str()
    );
}

#[tokio::test]
async fn the_replication_host_shares_tokens_and_links_to_the_api_host() {
    let plain = Standin::start(Options::spark()).await.expect("start");
    assert_eq!(plain.replication_url(), None);

    let mut opts = Options::spark();
    opts.replication = true;
    let s = Standin::start(opts).await.expect("start");
    let repl = s.replication_url().expect("replication host");
    assert_ne!(repl, s.base_url());
    assert_eq!(
        Some(repl.clone()),
        s.replication_addr().map(|a| format!("http://{a}"))
    );
    let tokens = s.issue_tokens();
    let bearer = format!("Bearer {}", tokens.access_token);

    let (status, page) = get_json(
        &format!("{repl}/Version/3/Reso/OData/Property?$top=2"),
        &bearer,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let record = &page["value"][0];
    assert_eq!(
        record["@odata.id"],
        format!("{repl}/Version/3/Reso/OData/Property('P000001')").as_str()
    );
    assert_eq!(
        record["ApiHostURL"],
        format!("{}/Version/3/Reso/OData/Property('P000001')", s.base_url()).as_str()
    );
    assert!(page["@odata.nextLink"]
        .as_str()
        .is_some_and(|l| l.starts_with(&format!("{repl}/Version/3/Reso/OData/Property?"))));
    let (status, _) = get_json(&format!("{}/v1/x", s.base_url()), &bearer).await;
    assert_eq!(status, 200);
    let resp = get(&format!("{repl}/redirect?to=/y"), &bearer).await;
    assert_eq!(resp.headers()["location"], format!("{repl}/y").as_str());

    let hosts: Vec<&str> = s.requests().iter().map(|r| r.host).collect();
    assert_eq!(hosts, ["replication", "api", "replication"]);

    // One token store: a refresh on either host rotates for both.
    let resp = client()
        .post(format!("{repl}/v1/oauth2/grant"))
        .json(&json!({
            "client_id": s.options().client_id,
            "client_secret": s.options().client_secret,
            "grant_type": "refresh_token",
            "refresh_token": tokens.refresh_token,
            "redirect_uri": "http://127.0.0.1/cb",
        }))
        .send()
        .await
        .expect("grant");
    assert_eq!(resp.status(), 200);
    let fresh: Value = resp.json().await.expect("json");
    assert_eq!(s.grant_count(), 1);
    let fresh = format!("OAuth {}", fresh["access_token"].as_str().expect("token"));
    assert_eq!(
        get_json(&format!("{}/v1/x", s.base_url()), &fresh).await.0,
        200
    );
    s.expire_access_tokens();
    let (status, err) = get_json(&format!("{repl}/v1/x"), &fresh).await;
    assert_eq!((status, err["D"]["Code"].as_u64()), (401, Some(1020)));
}

#[tokio::test]
async fn spark_error_envelopes_and_faults() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let tokens = s.issue_tokens();
    let auth = format!("OAuth {}", tokens.access_token);
    let url = format!("{}/v1/listings", s.base_url());

    s.set_api_fault(Some(ApiFault::DisabledKey));
    assert_eq!(s.api_fault(), Some(ApiFault::DisabledKey));
    for a in [auth.as_str(), "OAuth unknown"] {
        let (status, body) = get_json(&url, a).await;
        assert_eq!(status, 401);
        assert_eq!(
            body,
            json!({"D": {"Success": false, "Code": 1010, "Message": "API key is disabled"}})
        );
    }
    // The token endpoint still works.
    let resp = client()
        .post(s.token_url())
        .json(&json!({
            "client_id": s.options().client_id,
            "client_secret": s.options().client_secret,
            "grant_type": "refresh_token",
            "refresh_token": tokens.refresh_token,
        }))
        .send()
        .await
        .expect("grant");
    assert_eq!(resp.status(), 200);
    s.set_api_fault(None);
    assert_eq!(get_json(&url, &auth).await.0, 200);

    // Rate limited twice, then normal again.
    s.set_api_fault(Some(ApiFault::RateLimited {
        status: 429,
        retry_after: Some(7),
        times: Some(2),
    }));
    for _ in 0..2 {
        let resp = get(&url, &auth).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "7");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["D"]["Code"], 1550);
        assert_eq!(body["D"]["Success"], false);
    }
    assert_eq!(s.api_fault(), None);
    assert_eq!(get_json(&url, &auth).await.0, 200);

    // The 503 variant, without Retry-After, until cleared.
    s.set_api_fault(Some(ApiFault::RateLimited {
        status: 503,
        retry_after: None,
        times: None,
    }));
    for _ in 0..3 {
        let resp = get(&url, &auth).await;
        assert_eq!(resp.status(), 503);
        assert!(resp.headers().get("retry-after").is_none());
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["D"]["Code"], 1550);
    }
    s.set_api_fault(None);
    assert_eq!(get_json(&url, &auth).await.0, 200);
    // Every refused request was recorded.
    assert_eq!(s.requests().len(), 10);

    // The user agent header, when required.
    let mut opts = Options::spark();
    opts.require_user_agent = true;
    let s = Standin::start(opts).await.expect("start");
    let auth = format!("OAuth {}", s.issue_tokens().access_token);
    let url = format!("{}/v1/listings", s.base_url());
    let (status, body) = get_json(&url, &auth).await;
    assert_eq!((status, body["D"]["Code"].as_u64()), (400, Some(1016)));
    let resp = client()
        .get(&url)
        .header("authorization", &auth)
        .header("x-sparkapi-user-agent", "MyApp/1.0")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn zillow_faults() {
    let z = Standin::start(Options::zillow()).await.expect("start");
    let url = format!(
        "{}/listings?{}",
        z.base_url(),
        zillow_query(&z, &z.issue_tokens().access_token)
    );
    z.set_api_fault(Some(ApiFault::DisabledKey));
    let resp = client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "disabled_api_key");
    z.set_api_fault(Some(ApiFault::RateLimited {
        status: 429,
        retry_after: Some(1),
        times: Some(1),
    }));
    let resp = client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 429);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(client().get(&url).send().await.expect("send").status(), 200);
}

#[tokio::test]
async fn tokens_can_expire_after_a_number_of_uses() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let old = format!("OAuth {}", s.issue_tokens().access_token);
    let url = format!("{}/v1/x", s.base_url());
    assert_eq!(get_json(&url, &old).await.0, 200);

    s.expire_access_after_uses(2);
    let new = format!("Bearer {}", s.issue_tokens().access_token);
    for auth in [&old, &new] {
        assert_eq!(get_json(&url, auth).await.0, 200);
        assert_eq!(get_json(&url, auth).await.0, 200);
        let (status, body) = get_json(&url, auth).await;
        assert_eq!((status, body["D"]["Code"].as_u64()), (401, Some(1020)));
    }
    // A refused request does not use a token up.
    s.set_api_fault(Some(ApiFault::DisabledKey));
    let third = format!("OAuth {}", s.issue_tokens().access_token);
    assert_eq!(get_json(&url, &third).await.0, 401);
    s.set_api_fault(None);
    assert_eq!(get_json(&url, &third).await.0, 200);
    assert_eq!(get_json(&url, &third).await.0, 200);
    assert_eq!(get_json(&url, &third).await.0, 401);

    // 0 turns the limit off; a token expired by it stays expired.
    s.expire_access_after_uses(0);
    let free = format!("OAuth {}", s.issue_tokens().access_token);
    for _ in 0..4 {
        assert_eq!(get_json(&url, &free).await.0, 200);
    }
    assert_eq!(get_json(&url, &new).await.0, 401);

    let z = Standin::start(Options::zillow()).await.expect("start");
    z.expire_access_after_uses(1);
    let url = format!(
        "{}/listings?{}",
        z.base_url(),
        zillow_query(&z, &z.issue_tokens().access_token)
    );
    assert_eq!(client().get(&url).send().await.expect("send").status(), 200);
    let resp = client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "expired_token");
}

#[tokio::test]
async fn json_and_xml_are_compressed_when_asked() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let auth = format!("Bearer {}", s.issue_tokens().access_token);
    let send = |path: &str, accept: &str| {
        let mut req = client()
            .get(format!("{}{path}", s.base_url()))
            .header("authorization", &auth);
        if !accept.is_empty() {
            req = req.header("accept-encoding", accept);
        }
        req.send()
    };

    let resp = send("/v1/echo", "gzip, deflate").await.expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    assert_eq!(resp.headers()["vary"], "Accept-Encoding");
    assert!(resp.headers().get("content-length").is_none());
    let echo: Value =
        serde_json::from_slice(&gunzip(&resp.bytes().await.expect("body"))).expect("json");
    assert_eq!(echo["path"], "/v1/echo");

    for path in ["/Reso/OData/Property", "/Reso/OData/$metadata"] {
        let resp = send(path, "br;q=1, gzip;q=0.5").await.expect("send");
        assert_eq!(resp.headers()["content-encoding"], "gzip", "{path}");
        let body = gunzip(&resp.bytes().await.expect("body"));
        assert!(body.len() > 500, "{path}");
    }

    // q=0 refuses; identity then, but Vary still.
    let resp = send("/v1/echo", "gzip;q=0").await.expect("send");
    assert!(resp.headers().get("content-encoding").is_none());
    assert_eq!(resp.headers()["vary"], "Accept-Encoding");
    let _: Value = resp.json().await.expect("plain json");
    let resp = send("/v1/echo", "").await.expect("send");
    assert!(resp.headers().get("content-encoding").is_none());

    // deflate is zlib format.
    let resp = send("/v1/echo", "deflate").await.expect("send");
    assert_eq!(resp.headers()["content-encoding"], "deflate");
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(&resp.bytes().await.expect("body")[..])
        .read_to_end(&mut out)
        .expect("zlib");
    let _: Value = serde_json::from_slice(&out).expect("json");

    // Binary downloads are sent as they are.
    let resp = send("/download?bytes=1000", "gzip").await.expect("send");
    assert!(resp.headers().get("content-encoding").is_none());
    assert_eq!(resp.content_length(), Some(1000));

    // Errors are JSON too.
    let resp = client()
        .get(format!("{}/v1/x", s.base_url()))
        .header("authorization", "OAuth nope")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let err: Value =
        serde_json::from_slice(&gunzip(&resp.bytes().await.expect("body"))).expect("json");
    assert_eq!(err["D"]["Code"], 1000);
}

/// Reads a whole body chunk by chunk; the bytes and the number of chunks.
async fn read_all(resp: reqwest::Response) -> (Vec<u8>, usize) {
    let mut stream = resp.bytes_stream();
    let mut body = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.expect("chunk"));
        chunks += 1;
    }
    (body, chunks)
}

#[tokio::test]
async fn big_json_streams_valid_json_with_own_origin_links() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let auth = format!("OAuth {}", s.issue_tokens().access_token);
    let n: u64 = 3 * 1024 * 1024 + 17;
    let expected = s.big_json_records(n);
    assert_eq!(expected, big_json_records(n, &s.base_url(), false));
    assert!(expected > 10_000, "{expected}");

    let resp = get(&format!("{}/big-json?bytes={n}", s.base_url()), &auth).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.content_length().is_none(), "no length unless asked");
    let (body, chunks) = read_all(resp).await;
    assert_eq!(body.len() as u64, n);
    assert!(chunks > 1);
    let doc: Value = serde_json::from_slice(&body).expect("valid JSON");
    let records = doc["value"].as_array().expect("value");
    assert_eq!(records.len() as u64, expected);
    let own = format!("{}/Reso/OData/Property('K", s.base_url());
    assert!(records
        .iter()
        .all(|r| r["@odata.id"].as_str().is_some_and(|u| u.starts_with(&own))));
    assert_eq!(records[0]["ListingKey"], "K0000000000");
    assert!(records[0]["PublicRemarks"]
        .as_str()
        .is_some_and(|t| t.contains("\"corner\"") && t.contains('é')));

    // An exact Content-Length when asked.
    let resp = get(
        &format!("{}/big-json?bytes={n}&content_length=1", s.base_url()),
        &auth,
    )
    .await;
    assert_eq!(resp.content_length(), Some(n));
    assert_eq!(read_all(resp).await.0.len() as u64, n);

    // Small sizes still make a document.
    let (status, doc) = get_json(&format!("{}/big-json?bytes=5", s.base_url()), &auth).await;
    assert_eq!((status, doc), (200, json!({"value": []})));
    let resp = get(&format!("{}/big-json", s.base_url()), &auth).await;
    assert_eq!(resp.status(), 400);

    // Compressed as it streams.
    let resp = client()
        .get(format!(
            "{}/big-json?bytes={n}&content_length=1",
            s.base_url()
        ))
        .header("authorization", &auth)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    assert!(resp.content_length().is_none());
    let (body, _) = read_all(resp).await;
    assert!((body.len() as u64) < n / 4);
    let doc: Value = serde_json::from_slice(&gunzip(&body)).expect("valid JSON");
    assert_eq!(
        doc["value"].as_array().map(|v| v.len() as u64),
        Some(expected)
    );
}
