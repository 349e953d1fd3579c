//! Compiled state through the dataplane's renderer and kernel view (rendering and drift, not
//! compile semantics): these belong with the dataplane's tests and can move there as they are.

use super::*;

#[test]
fn incremental_rendering_writes_only_the_difference() {
    use crate::dataplane::kernel::View;
    use crate::dataplane::render::{render_ipset_destroy, render_ipset_update, render_iptables};
    let policy = "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: db}}}]}]";
    let before = with_policies(cluster(), &[policy]);
    let states = |s: &ClusterSnapshot| -> Vec<(Family, crate::compile::ir::DesiredState)> {
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
        .pods_mut()
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
    assert!(
        matches!(
            drift[0],
            crate::dataplane::Drift::SetMembers { missing: 1, .. }
        ),
        "{drift:?}"
    );
}

/// An upgrade: the kernel holds the sets the previous release wrote for the demo manifests (its
/// per-peer-list `hash:net` sets and per-rule named-port sets). The first sync must create every
/// set of the new layout and destroy every old one; none keeps its name with another type.
#[test]
fn the_previous_releases_sets_are_replaced_on_upgrade() {
    use crate::compile::names;
    use crate::dataplane::kernel::parse_ipset_save;
    use crate::dataplane::render::{render_ipset_destroy, render_ipset_update};
    let previous = parse_ipset_save(include_str!("previous_release_demo_sets.txt"));
    assert_eq!(previous.sets.len(), 14);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/demo");
    let snapshot = crate::source::manifests::load_dir(&dir).unwrap();
    let states = Compiler::new().compile(&snapshot, "demo-node");
    let desired = [&states.v4, &states.v6];
    let destroy = render_ipset_destroy(desired, &previous);
    for old in previous.sets.keys() {
        assert!(names::is_generated_set(old), "{old}");
        assert!(
            destroy.lines().any(|l| l == format!("destroy {old}")),
            "{old} stays behind:\n{destroy}"
        );
    }
    let update = render_ipset_update(desired, &previous).unwrap();
    for state in desired {
        for (name, set) in &state.sets {
            assert!(!previous.sets.contains_key(name), "{name} reused");
            assert!(update.contains(&format!("create {name} {}", set.kind.ipset_type())));
        }
    }
}
