//! Secrets at rest and in hand: sealing tokens with the key (`seal`), and
//! the ring a running process follows (`live`), and
//! session keys, their hashes and session ids (`session`).

pub mod live;
pub mod seal;
pub mod session;
