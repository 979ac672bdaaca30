//! Token-bucket rate limiting for block and network devices (bytes and operations).
//!
//! A [`TokenBucket`] holds up to `size` tokens and refills `size` tokens every `refill_time`,
//! continuously (tokens accrue in proportion to elapsed time). A request costs one op token
//! and one byte token per byte; it passes only when *both* buckets can pay. An optional
//! one-time burst lets a guest start fast (boot) before the steady rate applies.
//!
//! A request bigger than a whole bucket would never pass; instead it waits for a full bucket
//! and then drains it, so the long-run rate still holds.
//!
//! When a device is throttled it leaves the request in the queue and arms the limiter's
//! [`TimerFd`] for the moment enough tokens will exist; the event loop watches that fd (see
//! [`RateLimiter::timer_fd`]) and re-runs the queue when it fires. Time is passed in explicitly
//! (`*_at` methods) so the arithmetic is testable without sleeping.

use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// Errors of the rate limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    /// A bucket with zero size or zero refill time can never refill.
    #[error("token bucket of size {size} with refill time {refill_ms} ms is invalid")]
    InvalidBucket {
        /// Bucket size.
        size: u64,
        /// Refill time in milliseconds.
        refill_ms: u64,
    },
    /// The timer fd could not be created or armed.
    #[error("rate limiter timer failed: {0}")]
    Timer(#[from] vmm_sys_util::errno::Error),
}

/// One token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill: Duration,
    tokens: u64,
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `size` tokens refilled every `refill`, plus `one_time_burst` extra
    /// tokens usable once.
    pub fn new(size: u64, refill: Duration, one_time_burst: u64) -> Result<Self, RateLimiterError> {
        if size == 0 || refill.is_zero() {
            return Err(RateLimiterError::InvalidBucket {
                size,
                refill_ms: refill.as_millis() as u64,
            });
        }
        Ok(Self {
            size,
            refill,
            tokens: size,
            burst: one_time_burst,
            last: Instant::now(),
        })
    }

    /// Tokens available now (without the burst).
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    fn refill_at(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let refill_ns = self.refill.as_nanos();
        let add =
            (elapsed.saturating_mul(u128::from(self.size)) / refill_ns).min(u128::from(self.size));
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add as u64).min(self.size);
            // Advance `last` only by the time those tokens represent, keeping the remainder.
            let used_ns = add * refill_ns / u128::from(self.size);
            let used = Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
            self.last = if self.tokens == self.size {
                now
            } else {
                self.last + used
            };
        }
    }

    /// Whether `cost` tokens are available at `now` (burst included).
    fn can_pay_at(&mut self, cost: u64, now: Instant) -> bool {
        self.refill_at(now);
        let cost = cost.min(self.size);
        self.burst.saturating_add(self.tokens) >= cost
    }

    fn pay(&mut self, cost: u64) {
        let from_burst = cost.min(self.burst);
        self.burst -= from_burst;
        let rest = (cost - from_burst).min(self.size);
        self.tokens = self.tokens.saturating_sub(rest);
    }

    /// Time until `cost` tokens will be available.
    fn wait_for(&self, cost: u64) -> Duration {
        let cost = cost.min(self.size);
        let have = self.tokens.saturating_add(self.burst);
        if have >= cost {
            return Duration::ZERO;
        }
        let missing = u128::from(cost - have);
        let ns = missing * self.refill.as_nanos() / u128::from(self.size) + 1;
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// A byte bucket and an op bucket with the timer that wakes a throttled device.
#[derive(Debug)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter with the given buckets (`None` = unlimited in that dimension).
    pub fn new(
        bytes: Option<TokenBucket>,
        ops: Option<TokenBucket>,
    ) -> Result<Self, RateLimiterError> {
        Ok(Self {
            bytes,
            ops,
            timer: TimerFd::new()?,
            blocked: false,
        })
    }

    /// Tries to pay for one operation of `bytes` bytes now.
    pub fn consume(&mut self, bytes: u64) -> bool {
        self.consume_at(bytes, Instant::now())
    }

    /// Tries to pay for one operation of `bytes` bytes at time `now`. On refusal the timer is
    /// armed for when the payment will be possible and the limiter reports blocked.
    pub fn consume_at(&mut self, bytes: u64, now: Instant) -> bool {
        let ok_b = self.bytes.as_mut().is_none_or(|b| b.can_pay_at(bytes, now));
        let ok_o = self.ops.as_mut().is_none_or(|b| b.can_pay_at(1, now));
        if ok_b && ok_o {
            if let Some(b) = self.bytes.as_mut() {
                b.pay(bytes);
            }
            if let Some(b) = self.ops.as_mut() {
                b.pay(1);
            }
            self.blocked = false;
            return true;
        }
        let wait = self
            .bytes
            .as_ref()
            .map_or(Duration::ZERO, |b| b.wait_for(bytes))
            .max(self.ops.as_ref().map_or(Duration::ZERO, |b| b.wait_for(1)))
            .max(Duration::from_micros(100));
        if let Err(e) = self.timer.reset(wait, None) {
            log::error!("rate limiter: cannot arm timer: {e}");
        }
        self.blocked = true;
        false
    }

    /// Whether the last [`RateLimiter::consume`] was refused (the device waits for the timer).
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer to watch while blocked.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Called when the timer fired: clears it and unblocks.
    pub fn timer_event(&mut self) {
        let _ = self.timer.clear();
        self.blocked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_proportionally() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(
            Some(TokenBucket::new(1000, Duration::from_secs(1), 0).unwrap()),
            None,
        )
        .unwrap();
        r.bytes.as_mut().unwrap().last = t0;
        assert!(r.consume_at(600, t0));
        assert!(!r.consume_at(600, t0));
        assert!(r.is_blocked());
        // 200 ms later: 400 + 200 = 600 tokens.
        assert!(r.consume_at(600, t0 + Duration::from_millis(200)));
        assert!(!r.is_blocked());
        assert_eq!(r.bytes.as_ref().unwrap().tokens(), 0);
        // Never more than the bucket size.
        assert!(r.consume_at(1000, t0 + Duration::from_secs(100)));
        assert!(!r.consume_at(1, t0 + Duration::from_secs(100)));
        r.timer_event();
        assert!(!r.is_blocked());
        assert!(r.timer_fd() >= 0);
    }

    #[test]
    fn ops_and_burst() {
        let t0 = Instant::now();
        let mut ops = TokenBucket::new(2, Duration::from_secs(1), 3).unwrap();
        ops.last = t0;
        let mut r = RateLimiter::new(None, Some(ops)).unwrap();
        for i in 0..5 {
            assert!(r.consume_at(1 << 30, t0), "op {i}");
        }
        assert!(!r.consume_at(0, t0));
        assert!(r.consume_at(0, t0 + Duration::from_millis(500)));
    }

    #[test]
    fn oversized_request_waits_for_full_bucket() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, Duration::from_millis(100), 0).unwrap();
        b.last = t0;
        let mut r = RateLimiter::new(Some(b), None).unwrap();
        assert!(r.consume_at(50, t0));
        assert!(!r.consume_at(1000, t0));
        assert_eq!(
            r.bytes.as_ref().unwrap().wait_for(1000),
            Duration::from_nanos(50_000_001)
        );
        assert!(r.consume_at(1000, t0 + Duration::from_millis(50)));
        assert!(!r.consume_at(1, t0 + Duration::from_millis(50)));
    }

    #[test]
    fn invalid_buckets() {
        assert!(TokenBucket::new(0, Duration::from_secs(1), 0).is_err());
        let e = TokenBucket::new(1, Duration::ZERO, 0).unwrap_err();
        assert!(e.to_string().contains("refill time 0 ms"));
    }
}
