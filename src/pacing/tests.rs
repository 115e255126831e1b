//! The gate under tokio's paused clock: time moves only when every task
//! waits, so these tests are exact and take no wall-clock time.

use super::*;

fn gate(limit: Option<(u32, u64)>, max_wait_ms: u64) -> Arc<Gate> {
    Gate::new(
        "test",
        limit.map(|(requests, per_ms)| RateLimit {
            requests,
            per: Duration::from_millis(per_ms),
        }),
        Duration::from_millis(max_wait_ms),
        None,
        GateMetrics::default(),
    )
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Starts `n` requests in order; each records when it got its permit.
async fn race(
    g: &Arc<Gate>,
    n: usize,
    max_wait: Duration,
) -> Vec<Result<(usize, Instant), Limited>> {
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let g = Arc::clone(g);
        tasks.push(tokio::spawn(async move {
            let mut p = g.acquire(t0 + max_wait, false).await?;
            p.sent();
            let at = Instant::now();
            g.answered(&p, Verdict::Accepted);
            drop(p);
            Ok((i, at))
        }));
        // Arrival order is the spawn order.
        tokio::task::yield_now().await;
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

#[tokio::test(start_paused = true)]
async fn nine_requests_are_paced_in_order_within_the_window() {
    let g = gate(Some((3, 1000)), 10_000);
    let window = effective_window(ms(1000));
    let t0 = Instant::now();
    let got = race(&g, 9, ms(10_000)).await;
    let mut times = Vec::new();
    for (k, r) in got.into_iter().enumerate() {
        let (i, at) = r.expect("every request gets a permit");
        assert_eq!(i, k);
        times.push(at);
    }
    // First come, first served.
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    for (i, &a) in times.iter().enumerate() {
        let inside = times[i..].iter().filter(|&&b| b < a + window).count();
        assert!(inside <= 3, "{inside} sends in one window from #{i}");
    }
    // Three rounds: at 0, one window later, two windows later.
    assert_eq!(times[0], t0);
    assert_eq!(times[3], t0 + window);
    assert_eq!(times[8], t0 + window * 2);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_go_in_time_is_refused_at_once_with_the_budgets_retry_after() {
    let g = gate(Some((1, 10_000)), 2_000);
    let t0 = Instant::now();
    let mut p = g.acquire(t0 + ms(2000), false).await.expect("first");
    p.sent();
    drop(p);
    let refused = g
        .acquire(t0 + ms(2000), false)
        .await
        .err()
        .expect("refused");
    assert_eq!(Instant::now(), t0, "refused without waiting");
    assert_eq!(
        refused.retry_after_secs,
        effective_window(ms(10_000)).as_secs_f64().ceil() as u64
    );
}

#[tokio::test(start_paused = true)]
async fn a_wait_is_bounded_by_the_deadline() {
    // A hold whose end is unknown to the estimate (a probe in flight)
    // makes the request wait, but never past its deadline.
    let g = gate(None, 1_000);
    let t0 = Instant::now();
    let p = g.acquire(t0 + ms(1000), false).await.expect("first");
    g.answered(
        &p,
        Verdict::Refused {
            retry_after: Some(ms(100)),
        },
    );
    drop(p);
    let mut probe = g
        .acquire(t0 + ms(1000), false)
        .await
        .expect("the probe after the hold");
    probe.sent();
    assert_eq!(Instant::now(), t0 + ms(100));
    // The probe is still in flight: the next request waits, then gives up.
    let r = g.acquire(t0 + ms(1000), false).await;
    assert!(r.is_err());
    assert_eq!(Instant::now(), t0 + ms(1000));
    drop(probe);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_holds_everyone_then_releases_a_probe_then_ramps() {
    let g = gate(None, 30_000);
    let t0 = Instant::now();
    let p = g.acquire(t0 + ms(30_000), false).await.expect("calm");
    g.answered(
        &p,
        Verdict::Refused {
            retry_after: Some(ms(2000)),
        },
    );
    drop(p);
    let got = race(&g, 6, ms(30_000)).await;
    let times: Vec<Instant> = got.into_iter().map(|r| r.expect("permit").1).collect();
    // Nobody before the hold ended.
    assert!(times.iter().all(|&t| t >= t0 + ms(2000)), "{times:?}");
    // Five accepted answers ramp 1, 2, 4, 8, 16 to 32 in flight: calm
    // again, no lock on the fast path.
    assert!(g.calm.load(Ordering::Acquire));
}

#[tokio::test(start_paused = true)]
async fn after_a_hold_only_the_probe_is_in_flight_until_it_is_answered() {
    let g = gate(None, 30_000);
    let t0 = Instant::now();
    let p = g.acquire(t0 + ms(30_000), false).await.expect("calm");
    g.answered(&p, Verdict::Refused { retry_after: None });
    drop(p);
    let held = g.held_until().expect("held");
    // Jittered back-off: between half and all of the first back-off.
    assert!(held >= t0 + BACKOFF_FIRST / 2 && held <= t0 + BACKOFF_FIRST);
    let mut probe = g.acquire(t0 + ms(30_000), false).await.expect("probe");
    probe.sent();
    assert!(Instant::now() >= held);
    let g2 = Arc::clone(&g);
    let second = tokio::spawn(async move {
        g2.acquire(t0 + ms(30_000), false)
            .await
            .map(|_| Instant::now())
    });
    tokio::time::sleep(ms(500)).await;
    assert!(
        !second.is_finished(),
        "a second request went while the probe was in flight"
    );
    let answered_at = Instant::now();
    g.answered(&probe, Verdict::Accepted);
    drop(probe);
    let at = second.await.expect("task").expect("permit");
    assert_eq!(at, answered_at);
}

#[tokio::test(start_paused = true)]
async fn answers_to_requests_sent_before_the_refusal_neither_ramp_nor_lengthen_the_back_off() {
    let g = gate(None, 30_000);
    let t0 = Instant::now();
    // Eight requests in flight when the provider's budget runs out.
    let mut before = Vec::new();
    for _ in 0..8 {
        before.push(g.acquire(t0 + ms(30_000), false).await.expect("calm"));
    }
    // Half of them are refused (no Retry-After): one refusal, one back-off,
    // not one doubling per request that happened to be in flight.
    for p in &before[..4] {
        g.answered(p, Verdict::Refused { retry_after: None });
    }
    let held = g.held_until().expect("held");
    assert!(held <= t0 + BACKOFF_FIRST, "held for {:?}", held - t0);
    // The other half were accepted (sent before the budget ran out): they
    // say nothing about it now and must not open the ramp.
    for p in &before[4..] {
        g.answered(p, Verdict::Accepted);
    }
    drop(before);
    let mut probe = g.acquire(t0 + ms(30_000), false).await.expect("probe");
    probe.sent();
    let g2 = Arc::clone(&g);
    let second = tokio::spawn(async move {
        g2.acquire(t0 + ms(30_000), false)
            .await
            .map(|_| Instant::now())
    });
    tokio::time::sleep(ms(500)).await;
    assert!(
        !second.is_finished(),
        "a second request went while the probe was in flight"
    );
    // The probe's own refusal is news: the back-off doubles.
    let refused_at = Instant::now();
    g.answered(&probe, Verdict::Refused { retry_after: None });
    drop(probe);
    let held = g.held_until().expect("held again");
    assert!(
        held >= refused_at + BACKOFF_FIRST,
        "held for {:?}",
        held - refused_at
    );
    let at = second.await.expect("task").expect("permit");
    assert!(at >= held);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_of_zero_or_in_the_past_still_backs_off() {
    let g = gate(None, 30_000);
    let t0 = Instant::now();
    let p = g.acquire(t0 + ms(30_000), false).await.expect("calm");
    // What `Retry-After: 0`, or an HTTP date already past, parses to.
    g.answered(
        &p,
        Verdict::Refused {
            retry_after: Some(Duration::ZERO),
        },
    );
    drop(p);
    let held = g.held_until().expect("held");
    assert!(
        held >= t0 + BACKOFF_FIRST / 2 && held <= t0 + BACKOFF_FIRST,
        "held for {:?}",
        held - t0
    );
    let probe = g.acquire(t0 + ms(30_000), false).await.expect("probe");
    assert!(Instant::now() >= held, "the resend went at once");
    drop(probe);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_leaves_takes_no_budget() {
    let g = gate(Some((1, 1000)), 10_000);
    let t0 = Instant::now();
    let mut first = g.acquire(t0 + ms(10_000), false).await.expect("first");
    first.sent();
    drop(first);
    // The second waits for the window; its caller hangs up.
    let g2 = Arc::clone(&g);
    let gone = tokio::spawn(async move { g2.acquire(t0 + ms(10_000), false).await.is_ok() });
    tokio::task::yield_now().await;
    gone.abort();
    let _ = gone.await;
    // The third takes the slot the second would have had, and the one
    // after it is not delayed by the one who left.
    let third = g.acquire(t0 + ms(10_000), false).await.expect("third");
    assert_eq!(Instant::now(), t0 + effective_window(ms(1000)));
    drop(third); // never sent: gives its send back
    let fourth = g.acquire(t0 + ms(10_000), false).await.expect("fourth");
    assert_eq!(Instant::now(), t0 + effective_window(ms(1000)));
    drop(fourth);
}

#[tokio::test(start_paused = true)]
async fn a_send_given_back_goes_to_the_next_waiter_at_once() {
    let g = gate(Some((1, 1000)), 10_000);
    let t0 = Instant::now();
    // The only send in the window, taken by a request that fails before it
    // leaves (its upstream request could not be built).
    let unsent = g.acquire(t0 + ms(10_000), false).await.expect("first");
    let g2 = Arc::clone(&g);
    let next = tokio::spawn(async move {
        g2.acquire(t0 + ms(10_000), false)
            .await
            .map(|_| Instant::now())
    });
    tokio::task::yield_now().await;
    tokio::time::sleep(ms(100)).await;
    drop(unsent);
    let at = next.await.expect("task").expect("permit");
    assert_eq!(at, t0 + ms(100), "the waiter slept until the window freed");
}

#[tokio::test(start_paused = true)]
async fn a_resend_goes_to_the_front() {
    let g = gate(Some((1, 1000)), 10_000);
    let t0 = Instant::now();
    let mut first = g.acquire(t0 + ms(10_000), false).await.expect("first");
    first.sent();
    drop(first);
    let g2 = Arc::clone(&g);
    let later = tokio::spawn(async move {
        let p = g2.acquire(t0 + ms(10_000), false).await;
        (Instant::now(), p.map(|mut p| p.sent()).is_ok())
    });
    tokio::task::yield_now().await;
    let mut resend = g.acquire(t0 + ms(10_000), true).await.expect("resend");
    resend.sent();
    let resent_at = Instant::now();
    let (later_at, ok) = later.await.expect("task");
    assert!(ok);
    assert!(resent_at < later_at, "the resend went first");
}

#[test]
fn verdicts_read_429_and_retry_after() {
    use http::{HeaderMap, HeaderValue, StatusCode};
    let mut h = HeaderMap::new();
    assert_eq!(verdict(StatusCode::OK, &h, false), Verdict::Accepted);
    assert_eq!(
        verdict(StatusCode::TOO_MANY_REQUESTS, &h, false),
        Verdict::Refused { retry_after: None }
    );
    h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("7"));
    assert_eq!(
        verdict(StatusCode::TOO_MANY_REQUESTS, &h, false),
        Verdict::Refused {
            retry_after: Some(Duration::from_secs(7))
        }
    );
    assert_eq!(
        verdict(StatusCode::SERVICE_UNAVAILABLE, &h, true),
        Verdict::Refused {
            retry_after: Some(Duration::from_secs(7))
        }
    );
    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
    h.insert(
        http::header::RETRY_AFTER,
        HeaderValue::from_str(&date).expect("date"),
    );
    match verdict(StatusCode::TOO_MANY_REQUESTS, &h, false) {
        Verdict::Refused {
            retry_after: Some(d),
        } => assert!(d <= Duration::from_secs(30) && d >= Duration::from_secs(28)),
        other => panic!("{other:?}"),
    }
    h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("soon"));
    assert_eq!(
        verdict(StatusCode::TOO_MANY_REQUESTS, &h, false),
        Verdict::Refused { retry_after: None }
    );
}

#[test]
fn only_safe_requests_are_resent() {
    use http::{HeaderMap, HeaderValue, Method};
    let mut h = HeaderMap::new();
    assert!(resendable(&Method::GET, &h));
    assert!(resendable(&Method::DELETE, &h));
    assert!(!resendable(&Method::POST, &h));
    assert!(!resendable(&Method::PATCH, &h));
    h.insert("x-http-method-override", HeaderValue::from_static("get"));
    assert!(resendable(&Method::POST, &h));
    h.insert("x-http-method-override", HeaderValue::from_static("DELETE"));
    assert!(!resendable(&Method::POST, &h));
}

/// Takes a permit as `session` and sends at once; when it got it.
async fn send_as(
    g: Arc<Gate>,
    session: &'static str,
    deadline: Instant,
) -> Result<Instant, Limited> {
    let mut p = g.acquire_by(&mut Some(deadline), false, session).await?;
    p.sent();
    let at = Instant::now();
    g.answered(&p, Verdict::Accepted);
    Ok(at)
}

#[tokio::test(start_paused = true)]
async fn one_sessions_burst_does_not_starve_another_sessions_single_request() {
    // 3 per second, 1.5 s of patience: session a's burst of 9 takes the
    // first window's three and queues three more for the next window
    // (the other three cannot go in time and are refused at once).
    let g = gate(Some((3, 1000)), 1500);
    let window = effective_window(ms(1000));
    let t0 = Instant::now();
    let deadline = t0 + ms(1500);
    let mut burst = Vec::new();
    for _ in 0..9 {
        burst.push(tokio::spawn(send_as(Arc::clone(&g), "a", deadline)));
        tokio::task::yield_now().await;
    }
    // Session b's single request, after the burst: it takes its turn in
    // the next window instead of queueing behind all of a's.
    let single = send_as(Arc::clone(&g), "b", deadline).await;
    assert_eq!(single, Ok(t0 + window), "b's request");
    let mut a_sent = Vec::new();
    for t in burst {
        if let Ok(at) = t.await.expect("task") {
            a_sent.push(at);
        }
    }
    // a keeps the rest of the budget: 3 at once, 2 with b in the next window.
    assert_eq!(a_sent.iter().filter(|&&t| t == t0).count(), 3, "{a_sent:?}");
    assert_eq!(
        a_sent.iter().filter(|&&t| t == t0 + window).count(),
        2,
        "{a_sent:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn sessions_take_turns_and_each_sessions_requests_stay_in_order() {
    let g = gate(Some((1, 1000)), 60_000);
    let window = effective_window(ms(1000));
    let t0 = Instant::now();
    let deadline = t0 + ms(60_000);
    let mut tasks = Vec::new();
    for (i, who) in ["a", "a", "a", "a", "b", "b", "c"].into_iter().enumerate() {
        let g = Arc::clone(&g);
        tasks.push(tokio::spawn(async move {
            (i, who, send_as(g, who, deadline).await.expect("permit"))
        }));
        tokio::task::yield_now().await;
    }
    let mut order = Vec::new();
    for t in tasks {
        order.push(t.await.expect("task"));
    }
    order.sort_by_key(|&(_, _, at)| at);
    let served: Vec<(usize, &str)> = order.iter().map(|&(i, w, _)| (i, w)).collect();
    // a's first goes at once; then the sessions queued take turns.
    assert_eq!(
        served,
        vec![
            (0, "a"),
            (1, "a"),
            (4, "b"),
            (6, "c"),
            (2, "a"),
            (5, "b"),
            (3, "a")
        ]
    );
    assert_eq!(order[6].2, t0 + window * 6);
}
