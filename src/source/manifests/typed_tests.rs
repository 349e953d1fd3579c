//! The fast route to typed objects (typed.rs) against the general route through
//! `serde_json::Value` (parse.rs): the same objects from valid input, and no objects (so the
//! general route reports the error) from anything the general route refuses.

use super::parse::{Object, Parsed, parse_general};
use super::typed::{parse, parse_typed};
use std::path::Path;

fn listing(parsed: &Parsed) -> Vec<String> {
    parsed
        .objects
        .iter()
        .map(|(at, object)| format!("{at}: {object:?}"))
        .collect()
}

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-1\n  namespace: shop\n  labels: {app: web, tier: front}\n  annotations: {note: \"x\"}\nspec:\n  nodeName: n1\n  hostNetwork: false\n  containers:\n  - name: c\n    image: nginx\n    env: [{name: A, value: \"1\"}]\n    ports: [{name: http, containerPort: 8080, protocol: TCP}]\nstatus:\n  phase: Running\n  podIP: 10.0.0.5\n  podIPs: [{ip: 10.0.0.5}, {ip: \"fd00::5\"}]\n  conditions: [{type: Ready, status: \"True\"}]\n";

const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [a, b]}]}\n      podSelector: {}\n    - ipBlock: {cidr: 10.1.0.0/16, except: [10.1.2.0/24]}\n    ports: [{port: http}, {protocol: UDP, port: 53, endPort: 60}]\n  egress: [{}]\n";

#[test]
fn the_fast_route_gives_what_the_general_route_gives() {
    let documents = [
        POD,
        POLICY,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n",
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {podCIDRs: [10.0.0.0/24, \"fd00::/64\"]}\n",
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"j","namespace":"shop"},"status":{"podIP":"10.0.0.9"}}"#,
        // kind before apiVersion; fields before kind; an object without a name.
        "kind: Pod\napiVersion: v1\nmetadata: {name: k, namespace: shop}\n",
        "metadata: {name: late, namespace: shop}\napiVersion: v1\nkind: Pod\n",
        // Kinds not used, one of them with fields we would refuse in a Pod.
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: \"1\", b: '2'}\n",
        "apiVersion: apps/v1\nkind: Deployment\nspec: {replicas: 3}\n",
        "",
        // Lists: typed lists whose items leave kind out, a mixed List, items before kind (as
        // kubectl writes a list), an empty list, a list in a list.
        "apiVersion: v1\nkind: PodList\nmetadata: {resourceVersion: \"1\"}\nitems:\n- metadata: {name: a, namespace: x}\n- metadata: {name: b, namespace: x}\n  status: {podIP: 10.0.0.7}\n",
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: x}\n- apiVersion: v1\n  kind: Secret\n  metadata: {name: s}\n- null\n",
        "apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: c, namespace: x}\nkind: List\nmetadata: {}\n",
        "apiVersion: v1\nkind: NamespaceList\nitems: []\n",
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: List\n  items:\n  - {apiVersion: v1, kind: Pod, metadata: {name: d, namespace: x}}\n",
    ];
    let text = documents.join("\n---\n");
    let fast = parse_typed(Path::new("m.yaml"), &text).expect("the fast route refused valid input");
    let general = parse_general(Path::new("m.yaml"), &text);
    assert!(general.error.is_none(), "{:?}", general.error);
    assert_eq!(fast.documents, general.documents);
    assert_eq!(listing(&fast), listing(&general));
    assert_eq!(fast.objects.len(), 12, "{:#?}", listing(&fast));

    // An item whose own kind, given after its other fields, is not its typed list's: the fast
    // route gives up on it, and what is loaded is what the general route makes of it.
    let odd = "apiVersion: v1\nkind: PodList\nitems:\n- metadata: {name: a}\n  kind: Namespace\n";
    assert!(parse_typed(Path::new("o.yaml"), odd).is_none());
    let loaded = parse(Path::new("o.yaml"), odd);
    assert!(loaded.error.is_none());
    assert_eq!(
        listing(&loaded),
        listing(&parse_general(Path::new("o.yaml"), odd))
    );
    assert!(matches!(loaded.objects[..], [(_, Object::Namespace(_))]));
}

#[test]
fn the_fast_route_refuses_what_the_general_route_refuses() {
    let deep_block: String = (0..70)
        .map(|level| format!("{}k:\n", "  ".repeat(level + 1)))
        .collect();
    let bad = [
        // A key given twice, in a typed field, in a field the types ignore, at the top.
        POD.replace("name: c\n", "name: c\n    name: d\n"),
        POD.replace(
            "phase: Running\n",
            "phase: Running\n  extra: {a: 1, a: 2}\n",
        ),
        format!("{POD}status: {{}}\n"),
        POLICY.replace("app: web}", "app: web, app: db}"),
        // Nesting beyond the limit, in block style (the flow pre-check does not see it).
        format!("{POD}unknown:\n{deep_block}"),
        // Scalars of the wrong type, which serde_yaml_ng would take as strings if asked.
        POD.replace("tier: front", "tier: 1"),
        POD.replace("name: web-1", "name: 12"),
        POD.replace("image: nginx", "image: true"),
        POD.replace("containerPort: 8080", "containerPort: \"8080\""),
        // Wrong shapes, a kind that contradicts its list, a value our conversion refuses.
        POD.replace("containers:\n", "containers: 7\n  x:\n"),
        POLICY.replace("endPort: 60", "endPort: 50"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: [a]}\n".into(),
        "- just a list\n".into(),
        "apiVersion: v1\nkind: List\nitems: {a: 1}\n".into(),
        "apiVersion: v2\nkind: Pod\nmetadata: {name: a}\n".into(),
    ];
    for text in &bad {
        let general = parse_general(Path::new("b.yaml"), text);
        assert!(
            general.error.is_some(),
            "the general route accepts:\n{text}"
        );
        assert!(
            parse_typed(Path::new("b.yaml"), text).is_none(),
            "the fast route accepts what the general route refuses ({}):\n{text}",
            general.error.unwrap()
        );
    }
}
