//! credproxy: a reverse proxy that injects OAuth 2 credentials.
//!
//! An application presents a session key; credproxy maps it to stored
//! tokens, injects them the way the provider wants, and forwards the request
//! streamed. See ARCHITECTURE.md for the map of this crate.
//!
//! The modules are layers, each reading only from those below it (the
//! table is ARCHITECTURE.md's code map, and tests/layers.rs checks it):
//! `server` -> `proxy`, `control` -> `tokens`, `notify` -> `metrics` ->
//! `pacing` -> `store`, `provider`, `tls` -> `audit` -> `secrets` ->
//! `config` -> `clock`, `error`, `table`, `telemetry`. Nothing is re-exported here:
//! every path names the module it reads.

pub mod audit;
pub mod clock;
pub mod config;
pub mod control;
pub mod error;
pub mod http1;
pub mod metrics;
pub mod notify;
pub mod pacing;
pub mod provider;
pub mod proxy;
pub mod secrets;
pub mod server;
pub mod store;
pub mod table;
pub mod telemetry;
pub mod tls;
pub mod tokens;
