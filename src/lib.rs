//! credproxy: a reverse proxy that injects OAuth 2 credentials.
//!
//! An application presents a session key; credproxy maps it to stored
//! tokens, injects them the way the provider wants, and forwards the request
//! streamed. See ARCHITECTURE.md for the map of this crate.

pub mod admin;
pub mod config;
pub mod connect;
pub mod error;
pub mod forward;
pub mod metrics;
pub mod pages;
pub mod provider;
pub mod proxy;
pub mod refresh;
pub mod seal;
pub mod server;
pub mod session;
pub mod sessions;
pub mod store;
pub mod telemetry;
pub mod token;
