//! The one shape every source has for the reconcile loop.

use crate::model::ClusterSnapshot;
use std::future::Future;

/// A source as the reconcile loop sees it: a generation that changes whenever the content may
/// have changed, a way to wait for that, and the content itself.
pub trait Source: Send + Sync + 'static {
    /// Changes whenever the content may have changed; `None` while there is nothing complete to
    /// enforce yet (the node is never programmed from a partial view).
    fn generation(&self) -> Option<u64>;

    /// Returns once `generation` may have changed since the last call (a change before the call
    /// counts: none is missed).
    fn changed(&self) -> impl Future<Output = ()> + Send;

    /// The content and the generation it belongs to; `Ok(None)` while `generation` is `None`.
    /// May block (reads files): the loop calls it off the async threads.
    fn snapshot(&self) -> anyhow::Result<Option<(u64, ClusterSnapshot)>>;

    /// What the loop waits for while `generation` is `None`, for the log.
    fn waiting_for(&self) -> &'static str;

    /// When the earliest change up to `generation` (just synced) was seen; each change is
    /// given once. `None`: none, or the source does not say.
    fn change_seen(&self, _generation: u64) -> Option<std::time::Instant> {
        None
    }
}
