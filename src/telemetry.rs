//! Log set-up: tracing to stderr, level from `RUST_LOG`.
//!
//! A few dependencies print protocol frames at their most verbose levels;
//! h2's frame dumps would include the request path, and so Zillow's query
//! credentials. Those targets are capped whatever `RUST_LOG` says, so that no
//! level of logging can put a token in the log.

use tracing_subscriber::filter::{Directive, EnvFilter};

/// Targets that may print request lines or headers verbatim, and the most
/// verbose level they are allowed.
const CAPPED: [&str; 1] = ["h2=info"];

pub fn init(default_level: &str) {
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    for cap in CAPPED {
        if let Ok(d) = cap.parse::<Directive>() {
            filter = filter.add_directive(d);
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true)
        .try_init();
}
