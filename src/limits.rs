//! Connection limits: per instance and per user. A [`Permit`] is taken before the upgrade
//! (so a refused client gets an HTTP status, not a dropped socket) and released when it is
//! dropped — with the session, or with the upgrade future if the upgrade never completes.

use std::collections::HashMap;
use std::sync::Arc;

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

#[cfg(test)]
mod tests {
    use super::*;

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
