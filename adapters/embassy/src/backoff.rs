//! Reconnect backoff with full jitter: the n-th wait is uniform in `[0, min(cap, base * 2^n)]`.
//!
//! Full jitter (rather than a fixed delay or one-sided jitter) spreads a fleet of gateways that lost
//! the same control plane over the whole window, so they do not come back in lockstep. Randomness
//! comes from the caller's RNG (a hardware RNG on the firmware, the OS on Linux).

use embassy_time::Duration;
use rand_core::RngCore;

/// Backoff parameters. The default is DESIGN.md's: 0.5 s doubling to 60 s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BackoffConfig {
    /// Ceiling of the first wait.
    pub base: Duration,
    /// Largest ceiling.
    pub cap: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(60),
        }
    }
}

/// Attempt counter of a reconnect loop.
#[derive(Clone, Debug)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    /// A backoff at its first attempt.
    #[must_use]
    pub const fn new(config: BackoffConfig) -> Self {
        Self { config, attempt: 0 }
    }

    /// The ceiling of the next wait: `min(cap, base * 2^attempt)`.
    #[must_use]
    pub fn ceiling(&self) -> Duration {
        let base = self.config.base.as_micros();
        let factor = 1u64.checked_shl(self.attempt.min(63)).unwrap_or(u64::MAX);
        Duration::from_micros(base.saturating_mul(factor).min(self.config.cap.as_micros()))
    }

    /// The next wait, uniform in `[0, ceiling]`; the ceiling then doubles (up to the cap).
    pub fn next_delay(&mut self, rng: &mut impl RngCore) -> Duration {
        let ceiling = self.ceiling().as_micros();
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_micros(rng.next_u64() % ceiling.saturating_add(1))
    }

    /// Back to the first attempt (after a connection that registered).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts since the last reset.
    #[must_use]
    pub const fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic xorshift for tests.
    struct Xs(u64);
    impl RngCore for Xs {
        fn next_u32(&mut self) -> u32 {
            self.next_u64() as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            rand_core::impls::fill_bytes_via_next(self, dest);
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    #[test]
    fn ceilings_double_from_half_a_second_to_a_minute() {
        let mut b = Backoff::new(BackoffConfig::default());
        let mut rng = Xs(0x9e37_79b9_7f4a_7c15);
        let mut ceilings = [0u64; 10];
        for c in &mut ceilings {
            *c = b.ceiling().as_millis();
            let d = b.next_delay(&mut rng);
            assert!(d.as_millis() <= *c);
        }
        assert_eq!(
            ceilings,
            [
                500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000
            ]
        );
        b.reset();
        assert_eq!(b.ceiling().as_millis(), 500);
    }

    #[test]
    fn delays_are_spread_over_the_whole_window() {
        let mut rng = Xs(42);
        let mut b = Backoff::new(BackoffConfig::default());
        for _ in 0..20 {
            b.next_delay(&mut rng);
        }
        // At the cap: many samples cover low and high thirds of [0, 60 s].
        let (mut low, mut high) = (0, 0);
        for _ in 0..300 {
            let d = b.next_delay(&mut rng).as_millis();
            assert!(d <= 60_000);
            low += usize::from(d < 20_000);
            high += usize::from(d > 40_000);
        }
        assert!(low > 50 && high > 50, "{low} {high}");
    }
}
