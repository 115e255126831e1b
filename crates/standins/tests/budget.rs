//! The request budget over HTTP: what counts, the refusal styles and
//! `Retry-After`. The windows are long (a minute), so no request ever
//! leaves one during a test and nothing depends on the clock; the sliding
//! window itself is unit-tested in `src/budget.rs`.

use std::time::Duration;

use credproxy_standins::{ApiFault, Budget, Options, Refusal, Standin};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

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

fn retry_after(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("ascii").parse().expect("whole seconds"))
}

#[tokio::test]
async fn spark_429_with_retry_after() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let auth = format!("OAuth {}", s.issue_tokens().access_token);
    let url = format!("{}/v1/listings", s.base_url());
    s.set_budget(Some(Budget::new(3, MINUTE)));
    assert_eq!(s.budget(), Some(Budget::new(3, MINUTE)));

    for _ in 0..3 {
        assert_eq!(get(&url, &auth).await.status(), 200);
    }
    for _ in 0..2 {
        let resp = get(&url, &auth).await;
        assert_eq!(resp.status(), 429);
        let seconds = retry_after(&resp).expect("Retry-After");
        assert!((50..=60).contains(&seconds), "{seconds}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(
            body,
            json!({"D": {"Success": false, "Code": 1550, "Message": "Over rate limit"}})
        );
    }
    assert!(s.wait_for_refusals(2, Duration::from_secs(5)).await);
    assert!(!s.wait_for_refusals(3, Duration::from_millis(50)).await);
    assert_eq!(s.budget_refusals(), 2);
    // Refused requests are recorded, but not counted in the window.
    assert_eq!(s.requests().len(), 5);
    assert_eq!(s.accepted_arrivals().len(), 3);
    assert_eq!(s.max_in_any_window(MINUTE), 3);

    // Setting a budget again starts afresh.
    s.set_budget(Some(Budget::new(1, MINUTE)));
    assert_eq!((s.budget_refusals(), s.accepted_arrivals().len()), (0, 0));
    assert_eq!(get(&url, &auth).await.status(), 200);
    assert_eq!(get(&url, &auth).await.status(), 429);

    // Off: nothing is refused, the observations stay.
    s.set_budget(None);
    assert_eq!(get(&url, &auth).await.status(), 200);
    assert_eq!((s.budget_refusals(), s.accepted_arrivals().len()), (1, 1));
    // clear_requests forgets them.
    s.clear_requests();
    assert_eq!((s.budget_refusals(), s.accepted_arrivals().len()), (0, 0));
}

#[tokio::test]
async fn spark_503_1550_without_retry_after() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let auth = format!("Bearer {}", s.issue_tokens().access_token);
    let url = format!("{}/Reso/OData/Property", s.base_url());
    s.set_budget(Some(Budget {
        requests: 1,
        per: MINUTE,
        refusal: Refusal::Spark1550,
        retry_after: false,
    }));
    assert_eq!(get(&url, &auth).await.status(), 200);
    let resp = get(&url, &auth).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(retry_after(&resp), None);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"D": {"Success": false, "Code": 1550, "Message": "Over rate limit"}})
    );
}

#[tokio::test]
async fn only_api_requests_count_whatever_their_credentials() {
    let mut opts = Options::spark();
    opts.replication = true;
    let s = Standin::start(opts).await.expect("start");
    let tokens = s.issue_tokens();
    let auth = format!("OAuth {}", tokens.access_token);
    s.set_budget(Some(Budget::new(3, MINUTE)));

    // The token endpoint and the authorisation page do not count.
    for _ in 0..5 {
        let resp = client()
            .post(s.token_url())
            .json(&json!({
                "client_id": s.options().client_id,
                "client_secret": s.options().client_secret,
                "grant_type": "refresh_token",
                "refresh_token": "unknown",
            }))
            .send()
            .await
            .expect("grant");
        assert_eq!(resp.status(), 400);
        client().get(s.authorize_url()).send().await.expect("page");
    }
    assert!(s.accepted_arrivals().is_empty());

    // A request refused by a fault does not count either.
    s.set_api_fault(Some(ApiFault::DisabledKey));
    let api = format!("{}/v1/x", s.base_url());
    assert_eq!(get(&api, &auth).await.status(), 401);
    s.set_api_fault(None);
    assert!(s.accepted_arrivals().is_empty());

    // One budget for both hosts and every token, valid or not.
    let repl = s.replication_url().expect("replication");
    assert_eq!(get(&api, "OAuth unknown").await.status(), 401);
    assert_eq!(get(&format!("{repl}/v1/x"), &auth).await.status(), 200);
    let other = format!("OAuth {}", s.issue_tokens().access_token);
    assert_eq!(get(&api, &other).await.status(), 200);
    assert_eq!(get(&api, &auth).await.status(), 429);
    assert_eq!(get(&format!("{repl}/v1/x"), &other).await.status(), 429);
    assert_eq!(s.budget_refusals(), 2);
    assert_eq!(s.max_in_any_window(MINUTE), 3);
}

#[tokio::test]
async fn concurrent_requests_get_exactly_the_budget() {
    let s = Standin::start(Options::spark()).await.expect("start");
    let auth = format!("OAuth {}", s.issue_tokens().access_token);
    let url = format!("{}/v1/x", s.base_url());
    s.set_budget(Some(Budget::new(5, MINUTE)));
    let client = client();
    let sends = (0..20).map(|_| {
        let request = client.get(&url).header("authorization", &auth).send();
        async move { request.await.expect("send").status().as_u16() }
    });
    let mut statuses = futures_util::future::join_all(sends).await;
    statuses.sort_unstable();
    assert_eq!(statuses, [[200; 5].as_slice(), &[429; 15]].concat());
    assert!(s.wait_for_refusals(15, Duration::from_secs(5)).await);
    assert_eq!(s.max_in_any_window(MINUTE), 5);
    let arrivals = s.accepted_arrivals();
    assert!(arrivals.windows(2).all(|w| w[0] <= w[1]), "oldest first");
}

#[tokio::test]
async fn zillow_answers_429_either_way() {
    let z = Standin::start(Options::zillow()).await.expect("start");
    let o = z.options();
    let url = format!(
        "{}/listings?accessToken={}&clientId={}&apiKey={}",
        z.base_url(),
        z.issue_tokens().access_token,
        o.client_id,
        o.api_key
    );
    for refusal in [Refusal::TooManyRequests, Refusal::Spark1550] {
        z.set_budget(Some(Budget {
            refusal,
            ..Budget::new(1, MINUTE)
        }));
        assert_eq!(client().get(&url).send().await.expect("send").status(), 200);
        let resp = client().get(&url).send().await.expect("send");
        assert_eq!(resp.status(), 429);
        assert!(retry_after(&resp).is_some_and(|s| (50..=60).contains(&s)));
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"], "rate_limited");
    }
}
