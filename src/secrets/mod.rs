//! Secrets at rest and in hand: sealing tokens with the key (`seal`), and
//! session keys, their hashes and session ids (`session`).

pub mod seal;
pub mod session;
