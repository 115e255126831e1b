//! Prometheus metrics, kept in a registry owned by the server (no global
//! state, so several servers in one test process do not mix their counts).

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::pacing::{Gate, GateMetrics};
use crate::store::SessionCount;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub provider: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: &'static str,
}

/// A refusal by a session key's own limits: the provider and what refused
/// it (never the key or its id: their number is not bounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyRefusalLabels {
    pub provider: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    pub provider: String,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    pub provider: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLatencyLabels {
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: u32,
}

pub struct Metrics {
    registry: Registry,
    worker_connections: Family<WorkerLabels, Gauge>,
    refreshes: Family<RefreshLabels, Counter>,
    refresh_latency: Family<RefreshLatencyLabels, Histogram>,
    refresh_commit: Family<RefreshLatencyLabels, Histogram>,
    requests: Family<RequestLabels, Counter>,
    upstream_latency: Family<ProviderLabels, Histogram>,
    sessions: Family<SessionLabels, Gauge>,
    cached_sessions: Gauge,
    /// The session cache's figures, copied from `Sessions` at each scrape.
    cache: CacheMetrics,
    rate_wait: Family<ProviderLabels, Histogram>,
    upstream_refusals: Family<ProviderLabels, Counter>,
    rate_limited: Family<ProviderLabels, Counter>,
    key_refusals: Family<KeyRefusalLabels, Counter>,
    budget_remaining: Family<ProviderLabels, Gauge>,
    events: Family<EventLabels, Counter>,
    /// The gates whose remaining budget is read at each scrape.
    gates: std::sync::Mutex<Vec<std::sync::Weak<Gate>>>,
}

/// What the session cache counts (`SessionCache::key_reads` and the like),
/// as read at a scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheStats {
    pub key_reads: u64,
    pub absent_hits: u64,
    pub cold_refusals: u64,
    pub absent_cached: usize,
}

#[derive(Default)]
struct CacheMetrics {
    key_reads: Counter,
    absent_hits: Counter,
    cold_refusals: Counter,
    absent_cached: Gauge,
    /// Keeps two scrapes from adding the same increase twice.
    sync: std::sync::Mutex<()>,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn commit_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("credproxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Proxied requests by provider and the status answered",
            requests.clone(),
        );
        let upstream_latency = Family::<ProviderLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "upstream_latency_seconds",
            "Time from sending a request upstream to its response head",
            upstream_latency.clone(),
        );
        let sessions = Family::<SessionLabels, Gauge>::default();
        registry.register(
            "sessions",
            "Stored sessions by provider and status",
            sessions.clone(),
        );
        let worker_connections = Family::<WorkerLabels, Gauge>::default();
        registry.register(
            "worker_connections",
            "Client connections open on each proxy worker",
            worker_connections.clone(),
        );
        let cached_sessions = Gauge::default();
        registry.register(
            "cached_sessions",
            "Sessions held in this process's hot-path cache",
            cached_sessions.clone(),
        );
        let cache = CacheMetrics::default();
        registry.register(
            "session_key_reads",
            "Store reads for session keys in neither cache (cold lookups)",
            cache.key_reads.clone(),
        );
        registry.register(
            "session_absent_hits",
            "Lookups of unknown keys answered by the negative cache, without a store read",
            cache.absent_hits.clone(),
        );
        registry.register(
            "session_cold_lookups_refused",
            "Requests answered 429 too_many_lookups: the client's budget of cold lookups was spent",
            cache.cold_refusals.clone(),
        );
        registry.register(
            "absent_keys_cached",
            "Unknown key hashes held in the negative cache",
            cache.absent_cached.clone(),
        );
        let refreshes = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "refreshes",
            "Token refreshes by provider and outcome (ok, invalid_grant, failed)",
            refreshes.clone(),
        );
        let refresh_latency = Family::<RefreshLatencyLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "refresh_latency_seconds",
            "Time the token endpoint took to answer a refresh",
            refresh_latency.clone(),
        );
        let refresh_commit = Family::<RefreshLatencyLabels, Histogram>::new_with_constructor(
            commit_histogram as fn() -> Histogram,
        );
        registry.register(
            "refresh_commit_seconds",
            "From the token endpoint's answer to the durable commit of the rotated tokens (the crash window)",
            refresh_commit.clone(),
        );
        let rate_wait = Family::<ProviderLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "rate_limit_wait_seconds",
            "How long requests held for the provider's budget (or after its refusal) waited; the count is how many were held",
            rate_wait.clone(),
        );
        let upstream_refusals = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "upstream_rate_limited",
            "Refusals for the rate limit from the provider (429, or Spark's 503 with code 1550)",
            upstream_refusals.clone(),
        );
        let rate_limited = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests credproxy answered 429 rate_limited: no budget within max_queue_wait",
            rate_limited.clone(),
        );
        let key_refusals = Family::<KeyRefusalLabels, Counter>::default();
        registry.register(
            "key_refusals",
            "Requests refused by their session key's own limits, by provider and outcome (forbidden_by_scope, key_rate_limited, key_expired)",
            key_refusals.clone(),
        );
        let budget_remaining = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "rate_budget_remaining",
            "Requests the provider's configured budget has left in the current window (as this instance knows it)",
            budget_remaining.clone(),
        );
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "events",
            "Event deliveries to [notify] url by outcome (delivered, failed_attempt, given_up)",
            events.clone(),
        );
        Metrics {
            events,
            rate_wait,
            upstream_refusals,
            rate_limited,
            key_refusals,
            budget_remaining,
            gates: std::sync::Mutex::new(Vec::new()),
            registry,
            refresh_commit,
            refreshes,
            refresh_latency,
            requests,
            upstream_latency,
            sessions,
            cached_sessions,
            worker_connections,
            cache,
        }
    }
}

impl Metrics {
    /// The open-connection gauge of proxy worker `index` (its own atomic:
    /// the hand-off reads it to pick the least loaded worker).
    pub fn worker_connections(&self, index: usize) -> Gauge {
        let worker = u32::try_from(index).unwrap_or(u32::MAX);
        self.worker_connections
            .get_or_create(&WorkerLabels { worker })
            .clone()
    }

    /// Copies the session cache's counts into the registry (before a render).
    pub fn note_cache(&self, stats: CacheStats) {
        let c = &self.cache;
        let _one = c.sync.lock().unwrap_or_else(|e| e.into_inner());
        for (counter, now) in [
            (&c.key_reads, stats.key_reads),
            (&c.absent_hits, stats.absent_hits),
            (&c.cold_refusals, stats.cold_refusals),
        ] {
            counter.inc_by(now.saturating_sub(counter.get()));
        }
        c.absent_cached.set(stats.absent_cached as i64);
    }

    /// A request refused by its key's limits (`outcome`: what refused it).
    pub fn key_refusal(&self, provider: &'static str, outcome: &'static str) {
        self.key_refusals
            .get_or_create(&KeyRefusalLabels { provider, outcome })
            .inc();
    }

    pub fn request(&self, provider: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels { provider, status })
            .inc();
    }

    /// One provider's per-request series, resolved once per series instead
    /// of a label hash and a lock per request (see [`RouteMetrics`]).
    pub fn route(&self, provider: &'static str) -> RouteMetrics {
        RouteMetrics {
            provider,
            requests: (100..600).map(|_| OnceLock::new()).collect(),
            latency: OnceLock::new(),
        }
    }

    pub fn upstream_latency(&self, provider: &'static str, took: Duration) {
        self.upstream_latency
            .get_or_create(&ProviderLabels { provider })
            .observe(took.as_secs_f64());
    }

    pub fn refresh(&self, provider: &str, outcome: &'static str, took: Option<Duration>) {
        self.refreshes
            .get_or_create(&RefreshLabels {
                provider: provider.to_owned(),
                outcome,
            })
            .inc();
        if let Some(took) = took {
            self.refresh_latency
                .get_or_create(&RefreshLatencyLabels {
                    provider: provider.to_owned(),
                })
                .observe(took.as_secs_f64());
        }
    }

    pub fn refresh_commit(&self, provider: &str, took: Duration) {
        self.refresh_commit
            .get_or_create(&RefreshLatencyLabels {
                provider: provider.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// One event delivery attempt's outcome.
    pub fn event(&self, outcome: &'static str) {
        self.events.get_or_create(&EventLabels { outcome }).inc();
    }

    /// A provider's rate-limit metrics, resolved once so the hot path does
    /// no label lookup; `budgeted` adds the remaining-budget gauge.
    pub fn gate_metrics(&self, provider: &'static str, budgeted: bool) -> GateMetrics {
        let labels = ProviderLabels { provider };
        GateMetrics {
            waited: Some(self.rate_wait.get_or_create(&labels).clone()),
            upstream_refusals: self.upstream_refusals.get_or_create(&labels).clone(),
            limited: self.rate_limited.get_or_create(&labels).clone(),
            remaining: if budgeted {
                self.budget_remaining.get_or_create(&labels).clone()
            } else {
                Gauge::default()
            },
        }
    }

    /// Reads `gate`'s remaining budget at every scrape.
    pub fn watch_gate(&self, gate: &std::sync::Arc<Gate>) {
        if let Ok(mut gates) = self.gates.lock() {
            gates.push(std::sync::Arc::downgrade(gate));
        }
    }

    /// Prometheus text exposition, with the session gauges set from `counts`.
    pub fn render(&self, counts: &[SessionCount], cached: usize) -> String {
        if let Ok(mut gates) = self.gates.lock() {
            gates.retain(|g| match g.upgrade() {
                Some(g) => {
                    g.refresh_remaining();
                    true
                }
                None => false,
            });
        }
        self.sessions.clear();
        for c in counts {
            self.sessions
                .get_or_create(&SessionLabels {
                    provider: c.provider.clone(),
                    status: c.status.as_str(),
                })
                .set(c.count);
        }
        self.cached_sessions.set(cached as i64);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A provider's `credproxy_requests_total` counters (one per status, made
/// on first use, so a series appears only once it counts something) and its
/// upstream latency histogram: handles to the registry's own series, so the
/// hot path increments an atomic without hashing labels or taking the
/// family's lock.
pub struct RouteMetrics {
    provider: &'static str,
    /// Index: status - 100.
    requests: Box<[OnceLock<Counter>]>,
    latency: OnceLock<Histogram>,
}

impl RouteMetrics {
    pub fn request(&self, metrics: &Metrics, status: u16) {
        let provider = self.provider;
        match status
            .checked_sub(100)
            .and_then(|i| self.requests.get(usize::from(i)))
        {
            Some(slot) => {
                slot.get_or_init(|| {
                    metrics
                        .requests
                        .get_or_create(&RequestLabels { provider, status })
                        .clone()
                })
                .inc();
            }
            None => metrics.request(provider, status),
        };
    }

    pub fn upstream_latency(&self, metrics: &Metrics, took: Duration) {
        let provider = self.provider;
        self.latency
            .get_or_init(|| {
                metrics
                    .upstream_latency
                    .get_or_create(&ProviderLabels { provider })
                    .clone()
            })
            .observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_series_are_the_registry_series_and_appear_once_used() {
        let m = Metrics::default();
        let spark = m.route("spark");
        let before = m.render(&[], 0);
        assert!(!before.contains("credproxy_requests_total{"), "{before}");
        assert!(!before.contains("provider=\"spark\""), "{before}");
        for _ in 0..3 {
            spark.request(&m, 200);
        }
        spark.request(&m, 401);
        // Outside 100..=599: counted through the family.
        spark.request(&m, 999);
        m.request("spark", 200);
        spark.upstream_latency(&m, Duration::from_millis(3));
        let text = m.render(&[], 0);
        assert!(
            text.contains(r#"credproxy_requests_total{provider="spark",status="200"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(r#"credproxy_requests_total{provider="spark",status="401"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"credproxy_requests_total{provider="spark",status="999"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"credproxy_upstream_latency_seconds_count{provider="spark"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"status="500""#), "{text}");
    }
}
