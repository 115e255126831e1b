//! The budget of cold lookups: store reads for keys in neither cache,
//! counted per client address (`store.cold_lookups_per_client` a second),
//! so a client cycling through made-up keys cannot turn every request into
//! a store read. Cached and known-absent keys never reach it.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Above this many clients in the limiter, a cold lookup first forgets the
/// quiet ones (the change follower does it too, [`ColdBudget::prune`]).
const MAX_TRACKED_CLIENTS: usize = 100_000;

/// What one client's cold lookups count against: its address, an IPv6
/// address by its /64 (one host usually holds a whole /64), and an
/// IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// A client's budget is spent: it has room again in `retry_after_secs`
/// whole seconds (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    pub retry_after_secs: u64,
}

/// Cold lookups per client address, and how many were refused.
pub struct ColdBudget {
    /// `None`: no limit.
    limiter: Option<governor::DefaultKeyedRateLimiter<IpAddr>>,
    /// Lookups refused so far.
    refusals: AtomicU64,
}

impl ColdBudget {
    /// `per_client` cold lookups a second per client; 0: no limit.
    pub fn new(per_client: u32) -> ColdBudget {
        ColdBudget {
            limiter: std::num::NonZeroU32::new(per_client)
                .map(|n| governor::RateLimiter::keyed(governor::Quota::per_second(n))),
            refusals: AtomicU64::new(0),
        }
    }

    /// Counts a cold lookup against `client`'s budget: [`Spent`] when it is.
    pub fn admit(&self, client: IpAddr) -> Result<(), Spent> {
        use governor::clock::Clock;
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if limiter.len() > MAX_TRACKED_CLIENTS {
            limiter.retain_recent();
        }
        limiter.check_key(&client_key(client)).map_err(|not_until| {
            self.refusals.fetch_add(1, Ordering::Relaxed);
            let wait = not_until.wait_time_from(limiter.clock().now());
            Spent {
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            }
        })
    }

    /// Forgets the clients whose budget is whole again, and gives back
    /// their memory.
    pub fn prune(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Lookups refused so far.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_has_its_own_budget_and_an_ipv6_64_counts_as_one() {
        let budget = ColdBudget::new(3);
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        let b: IpAddr = "127.0.0.3".parse().expect("ip");
        for _ in 0..3 {
            assert_eq!(budget.admit(a), Ok(()));
        }
        let spent = budget.admit(a).expect_err("spent");
        assert!(spent.retry_after_secs >= 1);
        assert_eq!(budget.refusals(), 1);
        assert_eq!(budget.admit(b), Ok(()));
        assert_eq!(
            client_key("2001:db8::1".parse().expect("ip")),
            client_key("2001:db8::ffff".parse().expect("ip"))
        );
        assert_eq!(
            client_key("::ffff:127.0.0.2".parse().expect("ip")),
            client_key(a)
        );
    }

    #[test]
    fn no_budget_admits_everything() {
        let budget = ColdBudget::new(0);
        let a: IpAddr = "127.0.0.2".parse().expect("ip");
        for _ in 0..1000 {
            assert_eq!(budget.admit(a), Ok(()));
        }
        assert_eq!(budget.refusals(), 0);
    }
}
