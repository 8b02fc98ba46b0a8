//! Limits: connections per instance and per user, and the chat rate per connection.
//!
//! A connection [`Permit`] is taken before the upgrade (so a refused client gets an HTTP status,
//! not a dropped socket) and released when it is dropped — with the session, or with the
//! upgrade future if the upgrade never completes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("this instance is at its connection limit ({0}); try again (another instance may have room)")]
    Instance(usize),
    #[error("too many simultaneous connections for this user (at most {0} per instance)")]
    User(usize),
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_user: HashMap<String, usize>,
}

#[derive(Debug)]
pub struct ConnLimiter {
    max_total: usize,
    max_per_user: usize,
    counts: Mutex<Counts>,
}

/// One reserved connection slot.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<ConnLimiter>,
    user: String,
}

impl ConnLimiter {
    pub fn new(max_total: usize, max_per_user: usize) -> Arc<Self> {
        Arc::new(ConnLimiter { max_total, max_per_user, counts: Mutex::new(Counts::default()) })
    }

    pub fn try_acquire(self: &Arc<Self>, user: &str) -> Result<Permit, LimitError> {
        let mut c = self.counts.lock();
        if c.total >= self.max_total {
            return Err(LimitError::Instance(self.max_total));
        }
        let n = c.per_user.get(user).copied().unwrap_or(0);
        if n >= self.max_per_user {
            return Err(LimitError::User(self.max_per_user));
        }
        c.total += 1;
        c.per_user.insert(user.to_string(), n + 1);
        Ok(Permit { limiter: self.clone(), user: user.to_string() })
    }

    pub fn in_use(&self) -> usize {
        self.counts.lock().total
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.limiter.counts.lock();
        c.total -= 1;
        if let Some(n) = c.per_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                c.per_user.remove(&self.user);
            }
        }
    }
}

/// Token bucket: `rate` tokens per second sustained, at most `burst` at once. A request
/// costing more tokens than are left is refused whole and takes nothing (no debt).
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u32) -> Self {
        RateLimiter { rate, burst: f64::from(burst), tokens: f64::from(burst), last: Instant::now() }
    }

    /// Takes `cost` tokens at `now` if there are that many.
    pub fn try_take_at(&mut self, now: Instant, cost: usize) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let cost = cost as f64;
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let mut l = RateLimiter::new(10.0, 3);
        let t0 = l.last;
        assert!(l.try_take_at(t0, 1));
        assert!(l.try_take_at(t0, 1));
        assert!(l.try_take_at(t0, 1));
        assert!(!l.try_take_at(t0, 1));
        assert!(l.try_take_at(t0 + Duration::from_millis(100), 1));
        assert!(!l.try_take_at(t0 + Duration::from_millis(150), 1));
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.try_take_at(later, 1));
        }
        assert!(!l.try_take_at(later, 1));
    }

    #[test]
    fn each_recipient_costs_a_token_and_a_costlier_frame_is_refused_whole() {
        let mut l = RateLimiter::new(20.0, 100);
        let t0 = l.last;
        assert!(l.try_take_at(t0, 100), "a full group of 100 fits a fresh bucket");
        assert!(!l.try_take_at(t0, 1), "and uses it up");
        let t1 = t0 + Duration::from_millis(500); // 10 tokens back
        assert!(!l.try_take_at(t1, 11), "11 recipients with 10 tokens: refused");
        assert!(l.try_take_at(t1, 10), "the refusal took nothing: 10 are still there");
        assert!(!l.try_take_at(t1, 1));
        // A clock that steps back never mints tokens.
        assert!(!l.try_take_at(t0, 1));
    }

    #[test]
    fn limits_per_user_and_total_and_release_on_drop() {
        let l = ConnLimiter::new(3, 2);
        let a1 = l.try_acquire("a").unwrap();
        let _a2 = l.try_acquire("a").unwrap();
        assert_eq!(l.try_acquire("a").unwrap_err(), LimitError::User(2));
        let _b = l.try_acquire("b").unwrap();
        assert_eq!(l.try_acquire("c").unwrap_err(), LimitError::Instance(3));
        drop(a1);
        assert_eq!(l.in_use(), 2);
        let _c = l.try_acquire("c").unwrap();
        assert_eq!(l.try_acquire("a").unwrap_err(), LimitError::Instance(3));
    }
}
