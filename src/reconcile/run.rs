//! The one sync loop, for every source: starts with a full sync (adopting whatever a previous
//! instance left), then syncs incrementally when the source changes and fully every resync
//! period; failures keep the last good state and are retried with backoff.

use super::schedule::{Schedule, Timing};
use super::target::Target;
use crate::dataplane::SyncMode;
use crate::metrics::Metrics;
use crate::source::Source;
use anyhow::{Result, bail};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The log target from before the module layout of issue 10, kept so users' log filters still
/// match.
const LOG_TARGET: &str = "kube_netpol_iptables::agent";

/// The loop's longest sleep without a change (it keeps /healthz and the metrics current, and
/// lets the canary run).
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Runs `f` on `target` on a blocking thread (it runs processes or reads files) and hands the
/// target back. Awaited to the end: a batch is never cut in half.
async fn off_thread<T: Target, R: Send + 'static>(
    mut target: T,
    f: impl FnOnce(&mut T) -> R + Send + 'static,
) -> Result<(T, R)> {
    Ok(tokio::task::spawn_blocking(move || {
        let r = f(&mut target);
        (target, r)
    })
    .await?)
}

/// Reads the source and syncs it. The generation synced, and the outcome; `None` for both when
/// the source had nothing to offer after all.
fn load_and_sync<S: Source, T: Target>(
    source: &S,
    target: &mut T,
    mode: SyncMode,
    metrics: Option<&Metrics>,
) -> Option<(Option<u64>, Result<()>)> {
    match source.snapshot() {
        Ok(Some((generation, snapshot))) => {
            let result = target.sync(&snapshot, mode);
            // From the earliest change this sync covers to the kernel enforcing it (not counting
            // what the sync does after that, such as strict mode's flow cut).
            if let (Ok(()), Some(m)) = (&result, metrics)
                && let Some(seen) = source.change_seen(generation)
            {
                let in_force = target.in_force_at().unwrap_or_else(std::time::Instant::now);
                m.programmed(in_force.saturating_duration_since(seen));
            }
            Some((Some(generation), result))
        }
        Ok(None) => None,
        Err(e) => {
            if let Some(m) = metrics {
                m.sync_failed(mode, false);
            }
            Some((None, Err(e)))
        }
    }
}

/// Runs until `stop` is cancelled; the sync in progress then finishes and the loop returns.
/// Nothing is written while the source has nothing complete to offer.
pub async fn run<S: Source, T: Target>(
    source: Arc<S>,
    mut target: T,
    timing: Timing,
    metrics: Option<Arc<Metrics>>,
    stop: CancellationToken,
) -> Result<()> {
    let mut schedule = Schedule::new(Instant::now());
    let mut last_generation: Option<u64> = None;
    let mut waiting_logged = false;
    loop {
        if stop.is_cancelled() {
            tracing::info!(target: LOG_TARGET,
                "stopping; the programmed state stays in the kernel (use `cleanup` to remove it)"
            );
            return Ok(());
        }
        if let Some(m) = &metrics {
            m.heartbeat();
        }
        let now = Instant::now();
        match source.generation() {
            None => {
                if !waiting_logged {
                    tracing::info!(target: LOG_TARGET, "{}", source.waiting_for());
                    waiting_logged = true;
                }
            }
            Some(generation) => {
                if last_generation.is_some_and(|g| g != generation) {
                    schedule.changed(now);
                }
                last_generation = Some(generation);
                if schedule.canary_due(now) {
                    let (t, damage) = off_thread(target, |t| t.damage()).await?;
                    target = t;
                    schedule.canary_checked(now, damage);
                }
                if let Some(mode) = schedule.due(now, &timing) {
                    let (src, m) = (source.clone(), metrics.clone());
                    let (t, outcome) =
                        off_thread(target, move |t| load_and_sync(&*src, t, mode, m.as_deref()))
                            .await?;
                    target = t;
                    if let Some((synced, result)) = outcome {
                        if synced.is_some() {
                            last_generation = synced;
                        }
                        schedule.done(now, Instant::now(), mode, &result);
                    }
                }
            }
        }
        // Wake on a change, when the schedule has a sync due (the debounce settles, a resync or
        // retry), at least every heartbeat, and at once when told to stop. Before the source
        // has anything there is nothing to schedule.
        let heartbeat = Instant::now() + HEARTBEAT;
        let wake = match last_generation {
            Some(_) => schedule.next_due(Instant::now(), &timing).min(heartbeat),
            None => heartbeat,
        };
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::timeout_at(wake, source.changed()) => {}
        }
    }
}

/// One full sync, as soon as the source has something complete; then returns. Fails if it could
/// not be written (or read), or if told to stop first.
pub async fn once<S: Source, T: Target>(
    source: Arc<S>,
    target: T,
    stop: CancellationToken,
) -> Result<()> {
    let mut waiting_logged = false;
    while source.generation().is_none() {
        if !waiting_logged {
            tracing::info!(target: LOG_TARGET, "{}", source.waiting_for());
            waiting_logged = true;
        }
        tokio::select! {
            _ = stop.cancelled() => bail!("stopped before the first sync"),
            _ = source.changed() => {}
        }
    }
    let (_, outcome) = off_thread(target, move |t| {
        load_and_sync(&*source, t, SyncMode::Full, None)
    })
    .await?;
    match outcome {
        Some((_, result)) => result,
        None => bail!("the source had nothing to sync"),
    }
}
