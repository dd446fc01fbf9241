//! The engine's global memory budget.
//!
//! Every queued record holds part of the budget from the moment it is accepted
//! until the last consumer of its batch (sinks and subscribers) is done with it.
//! Publishers take budget in small blocks ("credit") so the hot path rarely
//! touches the shared counter; the batch's [`Reservation`] gives it back on drop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// How much of the budget high-priority records (WARN/ERROR logs, passthrough
/// events, drop-oldest evictions) may overdraw, as a fraction: limit / 8.
const OVERDRAFT_DIVISOR: usize = 8;

pub(crate) struct Budget {
    used: AtomicUsize,
    limit: usize,
    waiters: AtomicUsize,
    lock: Mutex<()>,
    freed: Condvar,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            limit,
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(()),
            freed: Condvar::new(),
        })
    }

    /// The size of a credit block a publisher takes at once: small enough
    /// that a thousand idle threads holding one each leave most of the budget.
    pub(crate) fn credit_block(&self) -> usize {
        (self.limit / 2048).clamp(256, 16 << 10)
    }

    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if they fit under the limit (or the overdraft ceiling).
    pub(crate) fn try_acquire(&self, bytes: usize, overdraft: bool) -> bool {
        let ceiling = if overdraft {
            self.limit.saturating_add(self.limit / OVERDRAFT_DIVISOR)
        } else {
            self.limit
        };
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur.saturating_add(bytes) > ceiling {
                return false;
            }
            match self.used.compare_exchange_weak(
                cur,
                cur + bytes,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Whether a prefix holding `prefix_bytes` may take more: always while
    /// the budget is less than three-quarters spent, and otherwise only while
    /// the prefix holds at most half of it.
    pub(crate) fn fair(&self, prefix_bytes: usize) -> bool {
        prefix_bytes <= self.limit / 2 || self.used() <= self.limit / 4 * 3
    }

    /// Waits until `bytes` fit, fairly for a prefix whose current holding
    /// `prefix_bytes()` reports, or until `deadline` passes.
    pub(crate) fn acquire_until(
        &self,
        bytes: usize,
        deadline: Instant,
        overdraft: bool,
        prefix_bytes: impl Fn() -> usize,
    ) -> bool {
        let attempt = || self.fair(prefix_bytes()) && self.try_acquire(bytes, overdraft);
        if attempt() {
            return true;
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let ok = loop {
            if attempt() {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            guard = self
                .freed
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        drop(guard);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        ok
    }

    pub(crate) fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.freed.notify_all();
        }
    }
}

/// Budget held by a batch (globally and by its prefix); given back when the
/// last of its holders (the sink and dispatch threads) is done with it, or
/// when it is dropped, whichever comes first.
pub(crate) struct Reservation {
    budget: Arc<Budget>,
    share: Arc<AtomicUsize>,
    bytes: AtomicUsize,
    holders: AtomicUsize,
}

impl Reservation {
    pub(crate) fn new(budget: &Arc<Budget>, share: &Arc<AtomicUsize>, bytes: usize) -> Reservation {
        Reservation {
            budget: budget.clone(),
            share: share.clone(),
            bytes: AtomicUsize::new(bytes),
            holders: AtomicUsize::new(1),
        }
    }

    /// Sets how many threads will call [`Reservation::consumed`] (before
    /// the batch is shared).
    pub(crate) fn set_holders(&mut self, n: usize) {
        *self.holders.get_mut() = n;
    }

    /// One holder is done with the batch; the last one gives the budget
    /// back, at once, on its own thread (the batch itself may be freed
    /// later, elsewhere).
    pub(crate) fn consumed(&self) {
        if self.holders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.release();
        }
    }

    fn release(&self) {
        let bytes = self.bytes.swap(0, Ordering::AcqRel);
        if bytes > 0 {
            self.share.fetch_sub(bytes, Ordering::Relaxed);
            self.budget.release(bytes);
        }
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Reservation({} bytes)",
            self.bytes.load(Ordering::Relaxed)
        )
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    // Catches a budget that lets publishers exceed it, or never gives bytes back.
    #[test]
    fn acquire_respects_the_limit_and_release_makes_room() {
        let b = Budget::new(1000);
        assert!(b.try_acquire(600, false));
        assert!(!b.try_acquire(600, false));
        assert!(b.try_acquire(100, true), "overdraft allows limit/8 more");
        assert!(
            !b.try_acquire(500, true),
            "but no more than limit + limit/8"
        );
        let share = Arc::new(AtomicUsize::new(600));
        drop(Reservation::new(&b, &share, 600));
        assert_eq!(b.used(), 100);
        assert_eq!(
            share.load(Ordering::Relaxed),
            0,
            "the prefix's share is given back too"
        );
        assert!(b.try_acquire(600, false));
    }

    // Catches a blocked publisher that is not woken when room appears.
    #[test]
    fn a_blocked_acquire_is_woken_by_a_release() {
        let b = Budget::new(1000);
        assert!(b.try_acquire(1000, false));
        let b2 = b.clone();
        let t = std::thread::spawn(move || {
            b2.acquire_until(500, Instant::now() + Duration::from_secs(30), false, || 0)
        });
        while b.waiters.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        b.release(500);
        assert!(t.join().unwrap());
        assert!(
            !b.acquire_until(1, Instant::now(), false, || 0),
            "full again, deadline already passed"
        );
    }

    // Catches a batch's budget given back before both the sink and the
    // dispatch thread are done with it (the budget would no longer bound
    // what is queued), or given back twice (the counter would underflow and
    // let publishers past the limit).
    #[test]
    fn a_reservation_is_released_once_by_its_last_holder() {
        let b = Budget::new(1000);
        assert!(b.try_acquire(700, false));
        let share = Arc::new(AtomicUsize::new(700));
        let mut r = Reservation::new(&b, &share, 700);
        r.set_holders(2);
        r.consumed();
        assert_eq!(b.used(), 700, "released while a holder still reads it");
        r.consumed();
        assert_eq!(b.used(), 0);
        assert_eq!(share.load(Ordering::Relaxed), 0);
        assert!(b.try_acquire(300, false));
        drop(r);
        assert_eq!(b.used(), 300, "dropping it released it again");
    }
}
