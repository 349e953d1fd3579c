//! The code path the fuzz target (fuzz/) drives, shared with the test that replays its corpus.

use crate::dataplane::render::render_fresh;
use crate::reconcile::desired_states;
use crate::source::manifests;

/// Parses `data` as a manifests file, compiles it for the node of its first pod (or "node") and
/// renders the restore text. Returns the text, or `None` if the input is rejected; must never
/// panic.
pub fn manifests_to_restore_text(data: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(data).ok()?;
    let snapshot = manifests::load_text("fuzz.yaml", text).ok()?;
    let node = snapshot
        .pods
        .iter()
        .find_map(|p| p.node_name.clone())
        .unwrap_or_else(|| "node".to_string());
    Some(render_fresh(&desired_states(&snapshot, &node)))
}
