//! Log and trace set-up: tracing to stderr (text or JSON lines, level from
//! `RUST_LOG`), and with `[telemetry] otlp_endpoint` OpenTelemetry traces.
//!
//! Lines are formatted where they happen and written by a thread of their
//! own (tracing-appender's non-blocking writer, into a buffer flushed each
//! time the queue runs dry): a proxy worker never waits for a `write` to
//! stderr, and a burst of access-log lines costs one system call, not one
//! per line. The queue is not lossy: if stderr cannot keep up with 128,000
//! queued lines, the workers wait rather than drop a line.
//!
//! A few dependencies print protocol frames at their most verbose levels;
//! h2's frame dumps would include the request path, and so Zillow's query
//! credentials. Those targets are capped whatever `RUST_LOG` says, so that no
//! level of logging can put a token in the log.
//!
//! Traces (`trace.rs`): the spans are `tracing` spans of target [`TARGET`],
//! made only while [`traces_on`] (so with `[telemetry]` absent the hot path
//! makes none); tracing-opentelemetry turns them into OpenTelemetry spans,
//! which the SDK's batch processor exports from a thread of its own. The log
//! lines never show these spans, and the spans carry no log events: what
//! reaches the collector is only what the span sites write, never a token,
//! key or secret.

mod json;
pub mod trace;

use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::filter::{filter_fn, Directive, EnvFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

pub use trace::{traces_on, TARGET};

/// Targets that may print request lines or headers verbatim, and the most
/// verbose level they are allowed.
const CAPPED: [&str; 1] = ["h2=info"];

/// How log lines are written (`[telemetry] log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// tracing-subscriber's text lines (the default).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`,
    /// `message`, `fields`, and `trace_id`/`span_id` within a trace.
    Json,
}

/// `[telemetry]`, validated.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Where traces go: the OTLP/HTTP traces URL (`.../v1/traces`); `None`:
    /// no traces.
    pub otlp_endpoint: Option<String>,
    /// The share of traces begun here that are kept (a caller's sampled
    /// flag is followed).
    pub sample_ratio: f64,
    pub log_format: LogFormat,
}

/// Flushes what is queued when dropped (keep it until the process is about
/// to exit): spans not yet exported, then log lines.
#[must_use = "dropping the guard stops the log writer and the trace exporter"]
pub struct Guard {
    traces: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    _log: tracing_appender::non_blocking::WorkerGuard,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.traces.take() {
            trace::stop();
            // Exports what the batch holds; a collector that is gone costs
            // the exporter's timeout at most.
            let _ = provider.shutdown();
        }
    }
}

/// Sets up logging (and traces, when `settings` names an endpoint). `None`
/// if a subscriber was already set.
pub fn init(default_level: &str, settings: &Settings) -> Option<Guard> {
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    for cap in CAPPED {
        if let Ok(d) = cap.parse::<Directive>() {
            filter = filter.add_directive(d);
        }
    }
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("credproxy-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    // The trace spans are for the collector only: never a log line's prefix.
    let not_a_trace_span = filter_fn(|m| !(m.is_span() && m.target() == TARGET));
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(
            settings.log_format == LogFormat::Text
                && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        )
        .with_target(true);
    let lines = match settings.log_format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines.event_format(json::Json).boxed(),
    }
    .with_filter(filter.and(not_a_trace_span));
    let (otel, provider) = match &settings.otlp_endpoint {
        Some(endpoint) => match trace::pipeline(endpoint, settings.sample_ratio) {
            Ok((layer, provider)) => (Some(layer), Some(provider)),
            Err(e) => {
                eprintln!("credproxy: traces are off: {e}");
                (None, None)
            }
        },
        None => (None, None),
    };
    let installed = tracing_subscriber::registry()
        .with(lines)
        .with(otel)
        .try_init()
        .is_ok();
    if !installed {
        return None;
    }
    if provider.is_some() {
        trace::start();
    }
    Some(Guard {
        traces: provider,
        _log: guard,
    })
}
