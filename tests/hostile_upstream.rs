//! An upstream that echoes what it was sent into its answer's headers:
//! the request URI (Zillow's credentials included) and the `Authorization`
//! header (Spark's token), raw, percent-encoded once and twice, in lower
//! case hex, behind non-ASCII bytes, in several `Location`s, `Link`,
//! `Refresh`, `Set-Cookie`... No injected secret may reach the caller in any
//! header, in any spelling.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use credproxy_standins::Tokens;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use support::{add_tokens, Extra, World};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A raw HTTP/1.1 server (so it can send any bytes) that answers every
/// request with 302 and the request echoed into many headers.
struct Echo {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Echo {
    async fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, addr, Arc::clone(&record)));
            }
        });
        Echo { addr, seen }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("seen").clone()
    }
}

fn pct(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

async fn serve(mut stream: tokio::net::TcpStream, me: SocketAddr, seen: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // One request head (the tests send no bodies).
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let uri = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("/")
            .to_owned();
        let auth = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        seen.lock().expect("seen").push(uri.clone());
        let once = pct(&uri);
        let mut resp = Vec::new();
        resp.extend_from_slice(b"HTTP/1.1 302 Found\r\n");
        for line in [
            format!("Location: {uri}"),
            format!("Location: http://{me}{uri}"),
            format!("Content-Location: {uri}"),
            format!("Link: <http://{me}{uri}>; rel=\"next\", <https://elsewhere.example{uri}>; rel=\"prev\""),
            format!("Refresh: 0; url={uri}"),
            format!("X-Login: /login?next={once}"),
            format!("X-Login-Lower: /login?next={}", lower_hex(&once)),
            format!("X-Login-Twice: /login?next={}", pct(&once)),
            format!("Set-Cookie: last={once}; Path=/"),
            format!("X-Echo-Authorization: {auth}"),
            format!("WWW-Authenticate: OAuth realm=\"{}\"", pct(&auth)),
            "X-Innocent: kept as it is".to_owned(),
        ] {
            resp.extend_from_slice(line.as_bytes());
            resp.extend_from_slice(b"\r\n");
        }
        // The secrets in header names too (hyper lowercases them): the
        // token raw where it is a valid name, percent-encoded once and twice,
        // and Zillow's token as it came in the query.
        let token = auth.split_once(' ').map_or("", |(_, t)| t);
        let in_query = uri
            .split(['?', '&'])
            .find_map(|p| p.strip_prefix("accessToken="))
            .unwrap_or("");
        let mut names = vec![];
        if !token.is_empty() {
            names.push(format!("X-Pct-{}", pct(token)));
            names.push(format!("X-Twice-{}", pct(&pct(token))));
            if is_name(token) {
                names.push(format!("X-{token}"));
                names.push(format!("{token}-Suffix"));
            }
        }
        if is_name(in_query) {
            names.push(format!("X-Z-{in_query}"));
        }
        for name in names {
            resp.extend_from_slice(format!("{name}: 1\r\n").as_bytes());
        }
        // Not UTF-8, not ASCII: bytes the old scrubbing skipped.
        resp.extend_from_slice(b"Location: /caf\xc3\xa9");
        resp.extend_from_slice(uri.as_bytes());
        resp.extend_from_slice(b"\r\nX-Latin1: \xe9t\xe9 ");
        resp.extend_from_slice(uri.as_bytes());
        resp.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
        if stream.write_all(&resp).await.is_err() {
            return;
        }
    }
}

/// A non-empty HTTP token (what a header name may be made of).
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `%2F` becomes `%2f`; every other byte stays.
fn lower_hex(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut escape = 0;
    for c in s.chars() {
        if c == '%' {
            escape = 2;
            out.push(c);
        } else if escape > 0 {
            escape -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Every spelling of `secret` that an echo could produce: raw and
/// percent-encoded once, twice, thrice, in upper and lower case hex.
fn spellings(secret: &str) -> Vec<String> {
    let mut out = vec![secret.to_owned()];
    let mut enc = secret.to_owned();
    for _ in 0..3 {
        enc = pct(&enc);
        out.push(enc.clone());
    }
    let lower: Vec<String> = out.iter().map(|s| s.to_ascii_lowercase()).collect();
    out.extend(lower);
    out
}

fn assert_no_secret(headers: &reqwest::header::HeaderMap, secrets: &[&str]) {
    for (name, value) in headers {
        let text = String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase();
        for secret in secrets {
            for s in spellings(secret) {
                let s = s.to_ascii_lowercase();
                assert!(
                    !text.contains(&s),
                    "{name} gives the caller a secret: {text:?}"
                );
                assert!(
                    !name.as_str().contains(&s),
                    "a header name gives the caller a secret: {name}"
                );
            }
        }
    }
}

/// A world whose providers both send their API calls to `echo`.
async fn world_against(echo: &Echo) -> (World, credproxy::server::Running) {
    let w = World::new().await;
    let text = w
        .config_text(&Extra::default())
        .replace(
            &format!("api_base = \"{}\"", w.spark.base_url()),
            &format!("api_base = \"{}\"", echo.base_url()),
        )
        .replace(
            &format!("api_base = \"{}\"", w.zillow.base_url()),
            &format!("api_base = \"{}\"", echo.base_url()),
        );
    let cfg = credproxy::config::Config::parse(&text, std::path::Path::new("t.toml"), |_| None)
        .expect("config");
    let srv = credproxy::server::start(cfg).await.expect("start");
    (w, srv)
}

fn no_redirects() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Tokens as a real provider might issue them: with characters that are
/// percent-encoded in a query (`+`, `/`, `=`), so encoded forms differ.
fn tokens(prefix: &str) -> Tokens {
    Tokens {
        access_token: format!("{prefix}+AccessToken/With=Base64+Chars/0123456789"),
        refresh_token: format!("{prefix}-refresh"),
        expires_in: Some(3600),
    }
}

#[tokio::test]
async fn zillow_credentials_never_come_back_in_a_header() {
    let echo = Echo::start().await;
    let (w, srv) = world_against(&echo).await;
    let t = tokens("zat");
    let (_, key) = add_tokens(&srv, "zillow", &t, t.expires_in).await;
    let z = w.zillow.options().clone();
    let resp = no_redirects()
        .get(format!(
            "http://{}/zillow/listings/?a=1&accessToken={key}&b=%41",
            srv.proxy_addr
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 302);
    // The upstream did get the credentials (so it could echo them)...
    let seen = echo.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].ends_with(&format!(
            "?a=1&b=%41&accessToken={}&clientId={}&apiKey={}",
            pct(&t.access_token),
            z.client_id,
            z.api_key
        )),
        "{seen:?}"
    );
    // ...and not one spelling of them reaches the caller.
    assert_no_secret(resp.headers(), &[&t.access_token, &z.client_id, &z.api_key]);
    assert!(!resp
        .headers()
        .values()
        .any(|v| v.as_bytes().windows(key.len()).any(|w| w == key.as_bytes())));
    // The links still work: behind credproxy, the caller's parameters kept.
    let locations: Vec<&[u8]> = resp
        .headers()
        .get_all("location")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    assert_eq!(locations.len(), 3, "{locations:?}");
    assert_eq!(locations[0], b"/zillow/listings/?a=1&b=%41");
    assert_eq!(
        locations[1],
        format!("http://{}/zillow/listings/?a=1&b=%41", srv.proxy_addr).as_bytes()
    );
    assert_eq!(locations[2], b"/zillow/caf\xc3\xa9/listings/?a=1&b=%41");
    assert_eq!(resp.headers()["refresh"], "0; url=/listings/?a=1&b=%41");
    assert_eq!(resp.headers()["x-innocent"], "kept as it is");
    let link = resp.headers()["link"].to_str().expect("ascii");
    assert!(
        link.starts_with(&format!(
            "<http://{}/zillow/listings/?a=1&b=%41>",
            srv.proxy_addr
        )),
        "{link}"
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn spark_token_never_comes_back_in_a_header() {
    let echo = Echo::start().await;
    let (_w, srv) = world_against(&echo).await;
    let t = tokens("sat");
    let (_, key) = add_tokens(&srv, "spark", &t, t.expires_in).await;
    for auth in [format!("OAuth {key}"), format!("Bearer {key}")] {
        let resp = no_redirects()
            .get(format!(
                "http://{}/spark/v1/listings?_limit=1",
                srv.proxy_addr
            ))
            .header("Authorization", &auth)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 302);
        assert_no_secret(resp.headers(), &[&t.access_token]);
        let echoed = resp.headers()["x-echo-authorization"]
            .to_str()
            .expect("ascii");
        assert!(
            echoed == "OAuth" || echoed == "Bearer" || echoed.is_empty(),
            "{echoed}"
        );
        assert_eq!(resp.headers()["location"], "/spark/v1/listings?_limit=1");
    }
    assert_eq!(echo.seen().len(), 2);
    srv.shutdown().await;
}

#[tokio::test]
async fn secrets_in_header_names_and_short_tokens_never_come_back() {
    let echo = Echo::start().await;
    let (w, srv) = world_against(&echo).await;
    // A token that is a valid header name (in mixed case, which hyper
    // lowercases), and one far shorter than a client id.
    for (i, access_token) in ["Sat-Name.Safe_Token~42", "zQ7x"].into_iter().enumerate() {
        let t = Tokens {
            access_token: access_token.to_owned(),
            refresh_token: format!("refresh-{i}"),
            expires_in: Some(3600),
        };
        let (_, key) = add_tokens(&srv, "spark", &t, t.expires_in).await;
        let resp = no_redirects()
            .get(format!("http://{}/spark/v1/listings", srv.proxy_addr))
            .header("Authorization", format!("OAuth {key}"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 302, "{access_token}");
        assert_no_secret(resp.headers(), &[access_token]);
        assert_eq!(resp.headers()["x-echo-authorization"], "OAuth");
        assert_eq!(resp.headers()["x-innocent"], "kept as it is");
        let (_, zkey) = add_tokens(&srv, "zillow", &t, t.expires_in).await;
        let z = w.zillow.options().clone();
        let resp = no_redirects()
            .get(format!(
                "http://{}/zillow/listings/?accessToken={zkey}",
                srv.proxy_addr
            ))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 302, "{access_token}");
        assert_no_secret(resp.headers(), &[access_token, &z.client_id, &z.api_key]);
        assert_eq!(resp.headers()["x-innocent"], "kept as it is");
    }
    assert_eq!(echo.seen().len(), 4);
    srv.shutdown().await;
}
