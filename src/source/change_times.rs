//! When each change was seen, by the generation it produced, until the loop has synced it: what
//! `kni_programming_latency_seconds` measures from.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// Changes remembered at most; past that the earliest are kept (they give each sync's sample),
/// and later ones go unmeasured.
const MAX_PENDING: usize = 1024;

#[derive(Default)]
pub struct ChangeTimes {
    pending: Mutex<VecDeque<(u64, Instant)>>,
}

impl ChangeTimes {
    /// A change seen now made `generation`.
    pub fn record(&self, generation: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() < MAX_PENDING {
            pending.push_back((generation, Instant::now()));
        }
    }

    /// When the earliest change up to `generation` was seen, forgetting those changes.
    pub fn take_through(&self, generation: u64) -> Option<Instant> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut earliest = None;
        while let Some((g, seen)) = pending.front().copied() {
            if g > generation {
                break;
            }
            pending.pop_front();
            earliest = earliest.min(Some(seen)).or(Some(seen));
        }
        earliest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_takes_the_earliest_change_it_covers_and_leaves_later_ones() {
        let times = ChangeTimes::default();
        assert_eq!(times.take_through(5), None);
        times.record(1);
        let first = times.take_through(0);
        assert_eq!(first, None, "generation 1 is not synced by 0");
        times.record(2);
        times.record(3);
        let covered = times.take_through(2).unwrap();
        assert_eq!(times.take_through(2), None, "taken once");
        let later = times.take_through(3).unwrap();
        assert!(covered <= later);
    }
}
