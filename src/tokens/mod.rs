//! The token lifecycle: sessions and their hot-path cache (`sessions`), the
//! one way tokens are refreshed (`refresh`: single flight, leases, the
//! refresh-loop guard), the providers' token endpoints (`endpoint`), and
//! the rotation journal that keeps a rotated token across a crash
//! (`journal`).

pub mod endpoint;
pub mod journal;
pub mod refresh;
pub mod sessions;
