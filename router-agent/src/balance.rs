//! Backend selection for one route: smooth weighted round robin and `CONTAINERID` stickiness.
//!
//! The schedule is computed once when the routing table is built (nginx's smooth weighted round
//! robin, so weights interleave instead of bunching) and walked with one atomic counter: picking
//! takes no lock and allocates nothing.
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use crate::health::BackendState;

/// The sequence of backend indices a route hands out, for the backends that take new traffic.
#[derive(Debug, Default)]
pub struct Schedule {
    order: Vec<usize>,
    /// Shared with the previous table's schedule for the same route, so a rebuild does not send
    /// the next request back to the first backend.
    cursor: Arc<AtomicUsize>,
}

impl Schedule {
    /// `weights[i]` is backend i's weight, `None` when it takes no new traffic (not up).
    pub fn new(weights: &[Option<u32>], cursor: Arc<AtomicUsize>) -> Self {
        let eligible: Vec<(usize, u64)> = weights
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.filter(|w| *w > 0).map(|w| (i, u64::from(w))))
            .collect();
        let divisor = eligible.iter().fold(0, |g, (_, w)| gcd(g, *w)).max(1);
        let reduced: Vec<(usize, i64)> = eligible
            .iter()
            .map(|(i, w)| (*i, (w / divisor) as i64))
            .collect();
        let total: i64 = reduced.iter().map(|(_, w)| w).sum();
        let mut current = vec![0i64; reduced.len()];
        let mut order = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (slot, (_, weight)) in reduced.iter().enumerate() {
                current[slot] += weight;
                if current[slot] > current[best] {
                    best = slot;
                }
            }
            current[best] -= total;
            order.push(reduced[best].0);
        }
        Self { order, cursor }
    }

    /// The next backend, skipping those in `exclude` (already tried for this request).
    pub fn next(&self, exclude: &[usize]) -> Option<usize> {
        if self.order.is_empty() {
            return None;
        }
        // At most one lap: after that every candidate was excluded.
        for _ in 0..self.order.len() {
            let n = self.cursor.fetch_add(1, Ordering::Relaxed);
            let candidate = self.order[n % self.order.len()];
            if !exclude.contains(&candidate) {
                return Some(candidate);
            }
        }
        None
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Whether a `CONTAINERID` cookie may pin a request to a backend in this state: sessions follow
/// their container while it is up, and also while it drains (Docker stopping it, or an
/// operator's drain), so they can finish.
pub fn sticky_target_allowed(state: BackendState) -> bool {
    matches!(
        state,
        BackendState::Up | BackendState::Draining | BackendState::Drained
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequence(weights: &[Option<u32>], n: usize) -> Vec<usize> {
        let schedule = Schedule::new(weights, Arc::default());
        (0..n).map(|_| schedule.next(&[]).unwrap()).collect()
    }

    #[test]
    fn weighted_round_robin() {
        let cases: &[(&[Option<u32>], &[usize])] = &[
            (&[Some(100), Some(100)], &[0, 1, 0, 1]),
            (&[Some(100), Some(100), Some(100)], &[0, 1, 2, 0, 1, 2]),
            (&[Some(100), None, Some(100)], &[0, 2, 0, 2]),
            (&[Some(0), Some(100)], &[1, 1, 1]),
            (&[Some(50), Some(100)], &[1, 0, 1, 1, 0, 1]),
            // nginx's example: weights 5,1,1 interleave as a a b a c a a.
            (&[Some(5), Some(1), Some(1)], &[0, 0, 1, 0, 2, 0, 0]),
        ];
        for (weights, expected) in cases {
            assert_eq!(&sequence(weights, expected.len()), expected, "{weights:?}");
        }
    }

    #[test]
    fn shares_follow_weights() {
        let picks = sequence(&[Some(30), Some(70)], 1000);
        let first = picks.iter().filter(|&&i| i == 0).count();
        assert_eq!(first, 300);
    }

    #[test]
    fn nothing_to_pick() {
        assert!(Schedule::new(&[], Arc::default()).next(&[]).is_none());
        assert!(
            Schedule::new(&[None, Some(0)], Arc::default())
                .next(&[])
                .is_none()
        );
        let schedule = Schedule::new(&[Some(1), Some(1)], Arc::default());
        assert!(schedule.next(&[0, 1]).is_none());
        assert_eq!(schedule.next(&[0]), Some(1));
        assert_eq!(schedule.next(&[0]), Some(1));
    }

    #[test]
    fn cursor_survives_rebuild() {
        let cursor = Arc::new(AtomicUsize::new(0));
        let first = Schedule::new(&[Some(1), Some(1)], cursor.clone());
        assert_eq!(first.next(&[]), Some(0));
        let rebuilt = Schedule::new(&[Some(1), Some(1)], cursor);
        assert_eq!(rebuilt.next(&[]), Some(1));
    }

    #[test]
    fn sticky_states() {
        assert!(sticky_target_allowed(BackendState::Up));
        assert!(sticky_target_allowed(BackendState::Draining));
        assert!(sticky_target_allowed(BackendState::Drained));
        assert!(!sticky_target_allowed(BackendState::Maintenance));
        assert!(!sticky_target_allowed(BackendState::Down));
        assert!(!sticky_target_allowed(BackendState::Starting));
    }
}
