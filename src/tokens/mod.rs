//! The token lifecycle: sessions and their hot-path cache (`sessions`), the
//! one way tokens are refreshed (`refresh`: single flight, leases, the
//! refresh-loop guard), and the providers' token endpoints (`endpoint`).

pub mod endpoint;
pub mod refresh;
pub mod sessions;
