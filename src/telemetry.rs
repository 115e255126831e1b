//! Log set-up: tracing to stderr, level from `RUST_LOG`.
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

use tracing_subscriber::filter::{Directive, EnvFilter};

/// Targets that may print request lines or headers verbatim, and the most
/// verbose level they are allowed.
const CAPPED: [&str; 1] = ["h2=info"];

/// Sets up logging; the returned guard flushes what is queued when dropped
/// (keep it until the process is about to exit). `None` if a subscriber was
/// already set.
#[must_use = "dropping the guard stops the log writer"]
pub fn init(default_level: &str) -> Option<tracing_appender::non_blocking::WorkerGuard> {
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true)
        .try_init()
        .ok()
        .map(|()| guard)
}
