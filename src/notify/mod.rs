//! Event notifications: delivering the store's outbox to `[notify] url`.
//!
//! The events themselves are written by the store in the same transaction
//! as the change they describe (`Store` methods taking a `NewEvent`), so a
//! crash loses none. This task only delivers them:
//!
//! * every second (and at once after a delivery round that found work) it
//!   claims due events (`Outbox::claim_events`: a lease, so on PostgreSQL
//!   exactly one instance holds an event at a time; `FOR UPDATE SKIP
//!   LOCKED`), POSTs each as signed JSON ([`sign`]) within `timeout`, and
//!   records the outcome: delivered on a 2xx, otherwise retried with
//!   jittered exponential back-off, or given up once the event is older
//!   than `give_up_after` (a metric and a warning).
//! * Delivered events are deleted a week after delivery, given-up ones
//!   `keep_given_up` after they were given up (`events retry` puts them back
//!   before that, `events clear` deletes them).
//! * An instance that dies mid-delivery leaves its lease to expire; another
//!   delivers the event then: at least once, and the event's `id` lets the
//!   receiver drop duplicates.
//!
//! **Invariant:** an event carries ids, a type, a time and a `detail` made
//! of error classes and flags, never a token, key or secret; the URL is never
//! logged (it may carry a token of the receiver's in its query).

pub mod sign;

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::config::NotifyConfig;
use crate::metrics::Metrics;
use crate::store::{self, EventRow, Store};

/// How many events one claim takes.
const BATCH: u32 = 16;
/// How often the outbox is looked at when it was empty.
const POLL: Duration = Duration::from_secs(1);
/// The longest back-off between two attempts at one event.
const BACKOFF_MAX: Duration = Duration::from_secs(600);
/// Delivered events are kept this long (for `events list`'s neighbours and
/// an operator's look at the table), then deleted.
const KEEP_DELIVERED: Duration = Duration::from_secs(7 * 86400);
/// How often delivered and given-up events are pruned (more often when
/// `keep_given_up` is shorter: at that interval, at least 1 s apart).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

pub struct Notifier {
    store: Arc<dyn Store>,
    config: NotifyConfig,
    client: reqwest::Client,
    /// Names this process's leases.
    owner: String,
    metrics: Arc<Metrics>,
}

/// Why a delivery attempt failed: a short class, safe to store and log.
fn failure_class(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "unreachable"
    } else if e.is_request() || e.is_body() {
        "send_failed"
    } else {
        "error"
    }
}

/// The event as the receiver gets it:
/// `{"id", "type", "session_id", "provider", "at", "detail"}`, `at` in
/// RFC 3339 (UTC, seconds).
pub fn event_body(row: &EventRow) -> Vec<u8> {
    let at = u64::try_from(row.at)
        .ok()
        .map(|s| std::time::UNIX_EPOCH + Duration::from_secs(s))
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_default();
    let detail: serde_json::Value =
        serde_json::from_str(&row.detail).unwrap_or_else(|_| serde_json::json!({}));
    serde_json::json!({
        "id": row.id,
        "type": row.kind,
        "session_id": row.session_id,
        "provider": row.provider,
        "at": at,
        "detail": detail,
    })
    .to_string()
    .into_bytes()
}

/// The wait before attempt `attempts + 1`: 1 s doubling to 10 min, with
/// full jitter over its upper half.
fn backoff(attempts: i64) -> Duration {
    let exp = u32::try_from(attempts.clamp(0, 20)).unwrap_or(20);
    let base = Duration::from_secs(1)
        .saturating_mul(2u32.saturating_pow(exp))
        .min(BACKOFF_MAX);
    base.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

impl Notifier {
    pub fn new(
        config: NotifyConfig,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Notifier, reqwest::Error> {
        let client = reqwest::Client::builder()
            // A receiver may not send the signed event on to anywhere else.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .user_agent(concat!("credproxy/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Notifier {
            store,
            config,
            client,
            owner: format!(
                "{}-{}",
                std::process::id(),
                crate::secrets::session::new_session_id()
            ),
            metrics,
        })
    }

    /// Delivers until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut pruned_at: Option<tokio::time::Instant> = None;
        let prune_every = PRUNE_EVERY
            .min(self.config.keep_given_up)
            .max(Duration::from_secs(1));
        loop {
            if pruned_at.is_none_or(|t| t.elapsed() >= prune_every) {
                pruned_at = Some(tokio::time::Instant::now());
                let now = store::now();
                let delivered_before = now - KEEP_DELIVERED.as_secs() as i64;
                let given_up_before = now.saturating_sub(
                    i64::try_from(self.config.keep_given_up.as_secs()).unwrap_or(i64::MAX),
                );
                match self
                    .store
                    .prune_events(delivered_before, given_up_before)
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        events = n,
                        "events: deleted delivered events older than a week and given-up \
                         events older than notify.keep_given_up"
                    ),
                    Err(e) => tracing::warn!(error = %e, "events: cannot prune the outbox"),
                }
            }
            let worked = tokio::select! {
                n = self.deliver_due() => n,
                _ = shutdown.cancelled() => return,
            };
            if worked == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }

    /// One round: claims the due events and tries each once; returns how
    /// many it tried.
    pub async fn deliver_due(&self) -> usize {
        let lease_ms = (self.config.timeout + Duration::from_secs(10)).as_millis() as i64;
        let rows = match self
            .store
            .claim_events(&self.owner, store::now_ms(), lease_ms, BATCH)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "events: cannot read the outbox");
                return 0;
            }
        };
        let n = rows.len();
        for row in rows {
            self.deliver(row).await;
        }
        n
    }

    async fn deliver(&self, row: EventRow) {
        use tracing::Instrument;
        // A trace of its own per delivery; never the URL (see above).
        let span = if crate::telemetry::traces_on() {
            tracing::info_span!(
                target: crate::telemetry::TARGET,
                "notify",
                otel.name = "POST notify",
                otel.kind = "client",
                http.request.method = "POST",
                credproxy.event_type = row.kind.as_str(),
                credproxy.event_id = row.id.as_str(),
                credproxy.session_id = row.session_id.as_str(),
                http.response.status_code = tracing::field::Empty,
                error.type = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        self.deliver_now(row).instrument(span).await;
    }

    async fn deliver_now(&self, row: EventRow) {
        let body = event_body(&row);
        let t = store::now();
        let signature = sign::signature(self.config.secret.expose_secret().as_bytes(), t, &body);
        let sent = self
            .client
            .post(self.config.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(sign::SIGNATURE_HEADER, signature)
            .header("x-credproxy-event", row.kind.as_str())
            .header("x-credproxy-event-id", row.id.as_str())
            .body(body)
            .send()
            .await;
        if let Ok(resp) = &sent {
            tracing::Span::current().record(
                "http.response.status_code",
                i64::from(resp.status().as_u16()),
            );
        }
        let failure = match sent {
            Ok(resp) if resp.status().is_success() => None,
            Ok(resp) => Some(format!("http_{}", resp.status().as_u16())),
            Err(e) => Some(failure_class(&e).to_owned()),
        };
        if let Some(class) = &failure {
            tracing::Span::current().record("error.type", class.as_str());
        }
        let now = store::now();
        let outcome = match &failure {
            None => {
                self.metrics.event("delivered");
                self.store.event_delivered(&row.id, &self.owner, now).await
            }
            Some(class)
                if now.saturating_sub(row.at) >= self.config.give_up_after.as_secs() as i64 =>
            {
                self.metrics.event("given_up");
                tracing::warn!(
                    event = %row.id,
                    r#type = %row.kind,
                    session = %row.session_id,
                    attempts = row.attempts + 1,
                    error = %class,
                    "events: gave up delivering an event older than notify.give_up_after"
                );
                self.store
                    .event_gave_up(&row.id, &self.owner, now, class)
                    .await
            }
            Some(class) => {
                self.metrics.event("failed_attempt");
                let next = store::now_ms() + backoff(row.attempts).as_millis() as i64;
                tracing::info!(
                    event = %row.id,
                    r#type = %row.kind,
                    attempts = row.attempts + 1,
                    error = %class,
                    "events: delivery failed; will retry"
                );
                self.store
                    .event_retry(&row.id, &self.owner, next, class)
                    .await
            }
        };
        if let Err(e) = outcome {
            // The lease runs out and the event is tried again: at least once.
            tracing::warn!(event = %row.id, error = %e, "events: cannot record a delivery's outcome");
        }
    }
}

fn rfc3339(unix: Option<i64>) -> Option<String> {
    let secs = u64::try_from(unix?).ok()?;
    Some(
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs))
            .to_string(),
    )
}

/// `credproxy events list --json`: one array of the undelivered events.
pub fn events_json(rows: &[EventRow]) -> serde_json::Value {
    serde_json::Value::Array(
        rows.iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id,
                    "type": r.kind,
                    "session_id": r.session_id,
                    "provider": r.provider,
                    "at": rfc3339(Some(r.at)),
                    "state": if r.gave_up_at.is_some() { "given_up" } else { "pending" },
                    "attempts": r.attempts,
                    "last_error": r.last_error,
                    "next_attempt_at": rfc3339(Some(r.next_attempt_at_ms / 1000)),
                    "gave_up_at": rfc3339(r.gave_up_at),
                })
            })
            .collect(),
    )
}

/// `credproxy events list`: a table of the undelivered events.
pub fn events_table(rows: &[EventRow]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<26} {:<34} {:<20} {:<10} {:<20} {:<8} {:>8}  {:<12} NEXT ATTEMPT",
        "ID", "TYPE", "SESSION", "PROVIDER", "AT", "STATE", "ATTEMPTS", "LAST ERROR",
    );
    for r in rows {
        let state = if r.gave_up_at.is_some() {
            "given_up"
        } else {
            "pending"
        };
        let next = if r.gave_up_at.is_some() {
            "-".to_owned()
        } else {
            rfc3339(Some(r.next_attempt_at_ms / 1000)).unwrap_or_else(|| "-".into())
        };
        let _ = writeln!(
            out,
            "{:<26} {:<34} {:<20} {:<10} {:<20} {:<8} {:>8}  {:<12} {}",
            r.id,
            r.kind,
            r.session_id,
            r.provider,
            rfc3339(Some(r.at)).unwrap_or_default(),
            state,
            r.attempts,
            r.last_error.as_deref().unwrap_or("-"),
            next
        );
    }
    if rows.is_empty() {
        out.push_str("(no undelivered events)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        for (attempts, secs) in [(0, 1), (1, 2), (3, 8), (9, 512), (10, 600), (60, 600)] {
            let d = backoff(attempts);
            let base = Duration::from_secs(secs);
            assert!(d >= base / 2 && d <= base, "{attempts}: {d:?}");
        }
    }

    #[test]
    fn the_body_is_the_contracts_shape() {
        let row = EventRow {
            id: "evt_1".into(),
            kind: "session.refresh_failing".into(),
            session_id: "s_1".into(),
            provider: "spark".into(),
            at: 1_700_000_000,
            detail: r#"{"error":"token_endpoint_timeout","next_retry_at":1700000002}"#.into(),
            attempts: 0,
            next_attempt_at_ms: 0,
            last_error: None,
            delivered_at: None,
            gave_up_at: None,
        };
        let v: serde_json::Value = serde_json::from_slice(&event_body(&row)).expect("json");
        assert_eq!(v["id"], "evt_1");
        assert_eq!(v["type"], "session.refresh_failing");
        assert_eq!(v["session_id"], "s_1");
        assert_eq!(v["provider"], "spark");
        assert_eq!(v["at"], "2023-11-14T22:13:20Z");
        assert_eq!(v["detail"]["error"], "token_endpoint_timeout");
        assert_eq!(v.as_object().map(|o| o.len()), Some(6));
    }
}
