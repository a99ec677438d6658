//! A per-socket token bucket.
//!
//! Each socket owns its bucket and checks it from its own task, so it needs no atomics nor
//! locks; a keyed, shared limiter crate would add synchronisation this path does not need.

use tokio::time::Instant;

use crate::config::RateConfig;

/// What the bucket says about one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rate {
    Allowed,
    /// Refused; the socket keeps going.
    Limited,
    /// Refused, and the socket refused too many frames in a row: close it (1008).
    Flood,
}

/// `per_second` frames on average, in bursts of up to `burst`.
#[derive(Debug, Clone)]
pub(crate) struct RateLimit {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    refused_in_a_row: u32,
    flood_after: u32,
}

impl RateLimit {
    pub(crate) fn new(config: RateConfig, now: Instant) -> Option<Self> {
        (config.per_second > 0).then(|| RateLimit {
            per_second: f64::from(config.per_second),
            burst: f64::from(config.burst.max(1)),
            tokens: f64::from(config.burst.max(1)),
            last: now,
            refused_in_a_row: 0,
            flood_after: config.flood_after,
        })
    }

    /// Takes a token for one frame arriving at `now`.
    pub(crate) fn check(&mut self, now: Instant) -> Rate {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused_in_a_row = 0;
            return Rate::Allowed;
        }
        self.refused_in_a_row = self.refused_in_a_row.saturating_add(1);
        if self.refused_in_a_row > self.flood_after {
            Rate::Flood
        } else {
            Rate::Limited
        }
    }

    /// How long until one token is back.
    #[cfg(test)]
    fn next_token_in(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(((1.0 - self.tokens).max(0.0)) / self.per_second)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const CONFIG: RateConfig = RateConfig {
        per_second: 10,
        burst: 5,
        flood_after: 3,
    };

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut bucket = RateLimit::new(CONFIG, t0).unwrap();
        for _ in 0..5 {
            assert_eq!(bucket.check(t0), Rate::Allowed);
        }
        assert_eq!(bucket.check(t0), Rate::Limited);
        assert_eq!(bucket.next_token_in(), Duration::from_millis(100));
        assert_eq!(bucket.check(t0 + Duration::from_millis(100)), Rate::Allowed);
        // Never more than the burst, however long the pause.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..5 {
            assert_eq!(bucket.check(later), Rate::Allowed);
        }
        assert_eq!(bucket.check(later), Rate::Limited);
    }

    #[test]
    fn a_sustained_flood_is_told_apart_from_a_fast_client() {
        let t0 = Instant::now();
        let mut bucket = RateLimit::new(CONFIG, t0).unwrap();
        for _ in 0..5 {
            bucket.check(t0);
        }
        assert_eq!(bucket.check(t0), Rate::Limited);
        assert_eq!(bucket.check(t0), Rate::Limited);
        assert_eq!(bucket.check(t0), Rate::Limited);
        assert_eq!(bucket.check(t0), Rate::Flood);
        // An accepted frame resets the count.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(bucket.check(t1), Rate::Allowed);
        assert_eq!(bucket.check(t1), Rate::Limited);
    }

    #[test]
    fn zero_disables_the_limit() {
        let off = RateConfig {
            per_second: 0,
            ..CONFIG
        };
        assert!(RateLimit::new(off, Instant::now()).is_none());
    }
}
