//! When to sync: coalesces changes, schedules full resyncs and retries with backoff. Pure: the
//! caller passes the time in.

use crate::dataplane::SyncMode;
use std::time::Duration;
use tokio::time::Instant;

/// The log target from before the module layout of issue 10, kept so users' log filters still
/// match.
const LOG_TARGET: &str = "kube_netpol_iptables::agent";

/// The loop's timing, from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A change that follows a quiet spell this long (no change and no sync) is synced at once;
    /// the burst that may follow it becomes one sync once the source has been quiet this long...
    pub debounce: Duration,
    /// ...but a sync is never put off longer than this after the first change.
    pub max_delay: Duration,
    /// How often to read the kernel back and repair drift, even without changes.
    pub resync_period: Duration,
}

/// How often the loop checks that our hooks and dispatch chains are intact between full syncs
/// (see `Dataplane::hooks_damaged`); damage triggers a full sync at once.
pub const CANARY_INTERVAL: Duration = Duration::from_secs(3);

pub const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct Schedule {
    /// (first change, latest change) while changes wait for the source to settle.
    pending: Option<(Instant, Instant)>,
    /// When the last sync ended: a change long enough after it starts a sync at once (the
    /// leading edge, as kube-proxy's bounded-frequency runner does), so one change on a quiet
    /// cluster costs no debounce.
    last_sync_end: Option<Instant>,
    last_full: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_canary: Instant,
}

impl Schedule {
    pub fn new(now: Instant) -> Schedule {
        Schedule {
            pending: None,
            last_sync_end: None,
            last_full: None,
            retry_at: None,
            backoff: INITIAL_BACKOFF,
            last_canary: now,
        }
    }

    /// Whether to look for damage now: every `CANARY_INTERVAL`, unless a full sync is already
    /// scheduled to retry.
    pub fn canary_due(&self, now: Instant) -> bool {
        now - self.last_canary >= CANARY_INTERVAL && self.retry_at.is_none()
    }

    /// The canary's finding: damage schedules a full sync now.
    pub fn canary_checked(&mut self, now: Instant, damage: Option<String>) {
        self.last_canary = now;
        if let Some(what) = damage {
            tracing::warn!(target: LOG_TARGET,
                damage = what.as_str(),
                "our rules were changed by someone else: repairing with a full sync now"
            );
            self.retry_at = Some(now);
        }
    }

    pub fn changed(&mut self, now: Instant) {
        self.pending = Some(self.pending.map_or((now, now), |(first, _)| (first, now)));
    }

    /// Whether the pending changes began after a quiet spell of a debounce since the last sync.
    fn leading(&self, t: &Timing) -> bool {
        self.pending.is_some_and(|(first, _)| {
            self.last_sync_end
                .is_none_or(|end| first.saturating_duration_since(end) >= t.debounce)
        })
    }

    /// The sync to run now, if any.
    pub fn due(&self, now: Instant, t: &Timing) -> Option<SyncMode> {
        let settled = self.leading(t)
            || self.pending.is_some_and(|(first, latest)| {
                now - latest >= t.debounce || now - first >= t.max_delay
            });
        let full_due = self.last_full.is_none_or(|at| now - at >= t.resync_period);
        let retry_due = self.retry_at.is_some_and(|at| now >= at);
        if full_due || retry_due {
            Some(SyncMode::Full)
        } else if settled {
            Some(SyncMode::Incremental)
        } else {
            None
        }
    }

    /// When `due` will next have something to do, unless another change comes first.
    pub fn next_due(&self, now: Instant, t: &Timing) -> Instant {
        let settle = self.pending.map(|(first, latest)| {
            if self.leading(t) {
                first
            } else {
                (latest + t.debounce).min(first + t.max_delay)
            }
        });
        let full = self.last_full.map_or(now, |at| at + t.resync_period);
        [settle, Some(full), self.retry_at]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(full)
    }

    /// Records the outcome of a sync started at `started`; `now` is when it ended.
    pub fn done(
        &mut self,
        started: Instant,
        now: Instant,
        mode: SyncMode,
        result: &anyhow::Result<()>,
    ) {
        self.pending = None;
        self.last_sync_end = Some(now);
        match result {
            Ok(()) => {
                self.retry_at = None;
                self.backoff = INITIAL_BACKOFF;
                if mode == SyncMode::Full {
                    self.last_full = Some(started);
                }
            }
            Err(e) => {
                tracing::error!(target: LOG_TARGET,
                    "sync failed, the last good state stays in the kernel; retrying in {:?}: {e:#}",
                    self.backoff
                );
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                // A source that never loads still counts as a resync attempt.
                self.last_full.get_or_insert(started);
            }
        }
    }
}
