//! Compiled state through the dataplane's renderer and kernel view (rendering and drift, not
//! compile semantics): these belong with the dataplane's tests and can move there as they are.

use super::*;

#[test]
fn incremental_rendering_writes_only_the_difference() {
    use crate::dataplane::kernel::View;
    use crate::dataplane::render::{render_ipset_destroy, render_ipset_update, render_iptables};
    let policy = "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: db}}}]}]";
    let before = with_policies(cluster(), &[policy]);
    let states = |s: &ClusterSnapshot| -> Vec<(Family, crate::state::DesiredState)> {
        Family::ALL
            .iter()
            .map(|f| (*f, compile(s, "n1", *f)))
            .collect()
    };
    let old = states(&before);
    let view = View::of_desired(&old);
    // Nothing changed: compiling again renders nothing to write against what was written.
    let again = View::of_desired(&states(&before));
    for (family, _) in &old {
        assert_eq!(
            render_iptables(&again.tables[family], &view.tables[family]),
            None
        );
    }
    assert_eq!(
        render_ipset_update(old.iter().map(|(_, s)| s), &view.sets).unwrap(),
        ""
    );
    assert_eq!(
        render_ipset_destroy(old.iter().map(|(_, s)| s), &view.sets),
        ""
    );
    assert!(view.drift_from(&view).is_empty());

    // A remote pod's label: one member per family, no rules.
    let mut after = before.clone();
    after
        .pods
        .iter_mut()
        .find(|p| p.key() == "y/c")
        .unwrap()
        .labels
        .insert("role".into(), "db".into());
    let new = states(&after);
    let want = View::of_desired(&new);
    for (family, _) in &new {
        assert_eq!(
            render_iptables(&want.tables[family], &view.tables[family]),
            None
        );
    }
    let update = render_ipset_update(new.iter().map(|(_, s)| s), &view.sets).unwrap();
    assert_eq!(update.lines().count(), 2, "{update}");
    assert!(
        update.lines().all(|l| l.starts_with("add KNI-")),
        "{update}"
    );

    // The drift report names what differs.
    let drift = View::of_desired(&new).drift_from(&view);
    assert_eq!(drift.len(), 2, "{drift:?}");
    assert!(drift[0].contains("1 members missing"), "{drift:?}");
}
