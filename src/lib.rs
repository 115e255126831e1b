//! credproxy: a reverse proxy that injects OAuth 2 credentials.
//!
//! An application presents a session key; credproxy maps it to stored
//! tokens, injects them the way the provider wants, and forwards the request
//! streamed. See ARCHITECTURE.md for the map of this crate.
//!
//! The folders are the layers, each reading downward only:
//! `control` (admin API, connect flows, pages) -> `proxy` (the hot path,
//! providers, upstream, links) -> `tokens` (sessions, refresh, token
//! endpoints) -> `store` -> `secrets` -> `config`.
//! `audit` (the audit trail's rows, chain and check) sits below `store`,
//! which appends its rows; `control::audit` reads and verifies the trail.
//! `clock` (the wall clock) is at the bottom.

pub mod audit;
pub mod clock;
pub mod config;
pub mod control;
pub mod error;
pub mod metrics;
pub mod notify;
pub mod pacing;
pub mod provider;
pub mod proxy;
pub mod secrets;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod tokens;
