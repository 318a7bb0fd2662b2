//! Reconnect delays: exponential backoff with full jitter.

use std::time::Duration;

/// Full-jitter exponential backoff: the n-th delay is uniform in `[0, min(cap, base · 2ⁿ)]`.
///
/// Full jitter spreads a fleet of agents that lost the same control plane over the whole window
/// instead of having them return in synchronised waves. Call [`Backoff::next_delay`] before each
/// attempt and [`Backoff::reset`] once a connection has proven healthy.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// The tunnel default: 0.5 s doubling to 60 s.
    pub const TUNNEL: Self = Self::new(Duration::from_millis(500), Duration::from_secs(60));

    /// A backoff starting at `base` and never exceeding `cap`.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The upper bound of the next delay, without advancing.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay to wait before the next attempt; advances the exponent.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }

    /// Forget past failures: the next delay is drawn from `[0, base]` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_to_the_cap() {
        let mut b = Backoff::TUNNEL;
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay();
        }
        assert_eq!(
            ceilings,
            [
                500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000
            ]
        );
    }

    #[test]
    fn delays_stay_within_the_ceiling_and_spread() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..4 {
            b.next_delay();
        }
        let ceiling = b.ceiling();
        let delays: Vec<Duration> = (0..200)
            .map(|_| {
                let mut probe = b.clone();
                probe.next_delay()
            })
            .collect();
        assert!(delays.iter().all(|d| *d <= ceiling));
        let below_half = delays.iter().filter(|d| **d < ceiling / 2).count();
        assert!(
            (40..=160).contains(&below_half),
            "full jitter is uniform: {below_half}/200 below half"
        );
    }

    #[test]
    fn reset_starts_over_and_huge_attempts_saturate() {
        let mut b = Backoff::TUNNEL;
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(500));
    }
}
