use super::pod::*;
use super::policy::*;
use super::validate::*;
use crate::model::{
    ContainerPort, LabelSelector, Peer, Pod, PodPhase, Policy, PolicyRule, PortRef, PortSpec,
    Protocol,
};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use std::net::IpAddr;

fn policy_from(yaml: &str) -> Result<Policy, InvalidField> {
    let p: net::NetworkPolicy = serde_yaml_ng::from_str(yaml).unwrap();
    policy(&p)
}

const HEAD: &str =
    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n";

#[test]
fn policy_types_default_like_the_api_server() {
    let p = policy_from(&format!("{HEAD}spec: {{podSelector: {{}}}}")).unwrap();
    assert!(p.isolates_ingress && !p.isolates_egress);
    let p = policy_from(&format!(
        "{HEAD}spec: {{podSelector: {{}}, egress: [{{}}]}}"
    ))
    .unwrap();
    assert!(p.isolates_ingress && p.isolates_egress);
    // An empty egress list without policyTypes does not imply Egress (len(egress) == 0).
    let p = policy_from(&format!("{HEAD}spec: {{podSelector: {{}}, egress: []}}")).unwrap();
    assert!(!p.isolates_egress);
    let p = policy_from(&format!(
        "{HEAD}spec: {{podSelector: {{}}, policyTypes: [Egress]}}"
    ))
    .unwrap();
    assert!(!p.isolates_ingress && p.isolates_egress);
    assert_eq!(p.namespace, "x");
}

#[test]
fn empty_lists_mean_everything() {
    let p = policy_from(&format!(
        "{HEAD}spec: {{podSelector: {{}}, ingress: [{{from: [], ports: []}}, {{}}]}}"
    ))
    .unwrap();
    assert_eq!(
        p.ingress,
        vec![
            PolicyRule {
                peers: None,
                ports: None
            };
            2
        ]
    );
}

#[test]
fn ports_default_to_tcp_and_validate() {
    let p = policy_from(&format!(
        "{HEAD}spec: {{podSelector: {{}}, ingress: [{{ports: [{{port: 80}}, {{protocol: UDP, port: 81, endPort: 90}}, {{port: web}}, {{protocol: SCTP}}]}}]}}"
    ))
    .unwrap();
    let ports = p.ingress[0].ports.clone().unwrap();
    assert_eq!(
        ports[0],
        PortSpec {
            protocol: Protocol::Tcp,
            port: Some(PortRef::Range {
                first: 80,
                last: 80
            })
        }
    );
    assert_eq!(
        ports[1],
        PortSpec {
            protocol: Protocol::Udp,
            port: Some(PortRef::Range {
                first: 81,
                last: 90
            })
        }
    );
    assert_eq!(ports[2].port, Some(PortRef::Named("web".into())));
    assert_eq!(
        ports[3],
        PortSpec {
            protocol: Protocol::Sctp,
            port: None
        }
    );

    for (bad, expect) in [
        ("{port: 80, endPort: 79}", "endPort: 79 is below port 80"),
        ("{port: 0}", "port: 0 is not a port number"),
        ("{port: 70000}", "port: 70000 is not a port number"),
        ("{protocol: ICMP}", "unknown protocol \"ICMP\""),
        ("{port: averyveryverylongname}", "not a valid port name"),
        ("{port: \"80\"}", "not a valid port name"),
        ("{endPort: 90}", "endPort: requires port"),
        (
            "{port: web, endPort: 90}",
            "cannot be used with a named port",
        ),
    ] {
        let err = policy_from(&format!(
            "{HEAD}spec: {{podSelector: {{}}, ingress: [{{ports: [{bad}]}}]}}"
        ))
        .unwrap_err();
        assert!(err.to_string().contains(expect), "{bad}: {err}");
        assert!(
            err.to_string().starts_with("spec.ingress[0].ports[0]"),
            "{err}"
        );
    }
}

#[test]
fn peers_validate() {
    for (bad, expect) in [
        ("{}", "must set at least one"),
        (
            "{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}",
            "cannot be combined",
        ),
        ("{ipBlock: {cidr: 10.0.0.0/33}}", "is not a CIDR"),
        ("{ipBlock: {cidr: banana}}", "is not a CIDR"),
        (
            "{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}",
            "strictly within",
        ),
        (
            "{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}",
            "strictly within",
        ),
        (
            "{podSelector: {matchExpressions: [{key: a, operator: Like}]}}",
            "unknown operator",
        ),
        (
            "{podSelector: {matchExpressions: [{key: a, operator: In}]}}",
            "must not be empty",
        ),
        (
            "{podSelector: {matchExpressions: [{key: a, operator: Exists, values: [b]}]}}",
            "must be empty",
        ),
    ] {
        let err = policy_from(&format!(
            "{HEAD}spec: {{podSelector: {{}}, egress: [{{to: [{bad}]}}]}}"
        ))
        .unwrap_err();
        assert!(err.to_string().contains(expect), "{bad}: {err}");
    }
    let p = policy_from(&format!(
        "{HEAD}spec: {{podSelector: {{}}, ingress: [{{from: [{{ipBlock: {{cidr: 10.1.2.3/8, except: [10.1.0.0/16]}}}}, {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{a: b}}}}}}]}}]}}"
    ))
    .unwrap();
    let peers = p.ingress[0].peers.clone().unwrap();
    assert!(
        matches!(&peers[0], Peer::IpBlock { cidr, except } if cidr.to_string() == "10.1.2.3/8" && except.len() == 1)
    );
    assert!(
        matches!(&peers[1], Peer::Pods { namespaces: Some(ns), pods: Some(_) } if *ns == LabelSelector::default())
    );
}

#[test]
fn pod_addresses_and_ports() {
    let p: core::Pod = serde_yaml_ng::from_str(
        "metadata: {name: a, labels: {app: web}}\nspec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 8080, name: http}, {containerPort: 53, protocol: UDP}]}]}\nstatus: {phase: Running, podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}",
    )
    .unwrap();
    let p = pod(&p).unwrap();
    assert_eq!(p.namespace, "default");
    assert_eq!(p.ips.len(), 2);
    assert_eq!(
        p.ports[0],
        ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp
        }
    );
    assert_eq!(p.ports[1].protocol, Protocol::Udp);
    assert_eq!(p.phase, PodPhase::Running);

    let only_pod_ip: core::Pod =
        serde_yaml_ng::from_str("metadata: {name: b}\nstatus: {podIP: 10.0.0.2}").unwrap();
    assert_eq!(
        pod(&only_pod_ip).unwrap().ips,
        vec!["10.0.0.2".parse::<IpAddr>().unwrap()]
    );
    let bad: core::Pod =
        serde_yaml_ng::from_str("metadata: {name: b}\nstatus: {podIP: 10.0.0.300}").unwrap();
    assert!(pod(&bad).unwrap_err().to_string().contains("status.podIP:"));
}

fn pod_with_status(status: &str) -> Result<Pod, InvalidField> {
    pod(&serde_yaml_ng::from_str(&format!("metadata: {{name: p}}\nstatus: {status}")).unwrap())
}

#[test]
fn pod_addresses_are_parsed_like_the_api_server() {
    let ips = |status: &str| pod_with_status(status).unwrap().ips;
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    // netutils.ParseIPSloppy: leading zeros are decimal, not octal, also in an IPv6 tail.
    assert_eq!(ips("{podIP: 010.001.002.003}"), vec![ip("10.1.2.3")]);
    assert_eq!(ips("{podIPs: [{ip: 010.0.0.0010}]}"), vec![ip("10.0.0.10")]);
    assert_eq!(
        ips("{podIPs: [{ip: '::ffff:010.1.2.3'}]}"),
        vec![ip("10.1.2.3")]
    );
    assert_eq!(
        ips("{podIPs: [{ip: 'fd00::10.1.2.3'}]}"),
        vec![ip("fd00::a01:203")]
    );
    // podIP wins when podIPs[0] disagrees (the API server's v1 conversion).
    assert_eq!(
        ips("{podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.2}, {ip: 'fd00::2'}]}"),
        vec![ip("10.0.0.1")]
    );
    assert_eq!(
        ips("{podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}"),
        vec![ip("10.0.0.1"), ip("fd00::1")]
    );
    assert!(ips("{podIP: ''}").is_empty());
    for bad in [
        "10.0.0.256",
        "1.2.3",
        "10.0.0.1/32",
        "fe80::1%eth0",
        "0x0a.0.0.1",
        "+1.2.3.4",
    ] {
        let err = pod_with_status(&format!("{{podIPs: [{{ip: '{bad}'}}]}}")).unwrap_err();
        assert_eq!(err.path, "status.podIPs[0]", "{bad}");
    }
}

#[test]
fn pods_claiming_impossible_addresses_are_invalid() {
    for (addr, why) in [
        ("127.0.0.1", "loopback"),
        ("127.1.2.3", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "0.0.0.0/8"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0127.0.0.01", "loopback"),
    ] {
        let err = pod_with_status(&format!("{{podIPs: [{{ip: '{addr}'}}]}}")).unwrap_err();
        assert_eq!(err.path, "status.podIPs[0]", "{addr}");
        assert!(err.message.contains(why), "{addr}: {err}");
        let err = pod_with_status(&format!("{{podIP: '{addr}'}}")).unwrap_err();
        assert_eq!(err.path, "status.podIP", "{addr}");
    }
    // At most one address per family, no duplicates, at most two in all.
    let err = pod_with_status("{podIPs: [{ip: 10.0.0.1}, {ip: 10.0.0.2}]}").unwrap_err();
    assert_eq!(err.path, "status.podIPs[1]");
    assert!(err.message.contains("one IP per family"), "{err}");
    let err = pod_with_status("{podIPs: [{ip: 'fd00::1'}, {ip: 'fd00::1'}]}").unwrap_err();
    assert!(err.message.contains("duplicate"), "{err}");
    let many: Vec<String> = (1..=300)
        .map(|i| format!("{{ip: 10.0.{}.{}}}", i / 256, i % 256))
        .collect();
    let err = pod_with_status(&format!("{{podIPs: [{}]}}", many.join(", "))).unwrap_err();
    assert!(err.message.contains("300 addresses"), "{err}");
}

#[test]
fn names_and_labels_are_validated_like_the_api_server() {
    let ns = |y: &str| namespace(&serde_yaml_ng::from_str::<core::Namespace>(y).unwrap());
    assert!(ns(&format!("metadata: {{name: {}}}", "n".repeat(63))).is_ok());
    assert!(
        ns(&format!("metadata: {{name: {}}}", "n".repeat(64)))
            .unwrap_err()
            .to_string()
            .contains("DNS-1123 label")
    );
    assert!(ns("metadata: {name: Upper}").is_err());
    for (bad, field) in [
        ("{'a b': x}", "metadata.labels"),
        ("{a: 'x y'}", "metadata.labels"),
        ("{a: 'x\\ny'}", "metadata.labels"),
        ("{a: '$(reboot)'}", "metadata.labels"),
        ("{a: 'café'}", "metadata.labels"),
        ("{a: '\"q\"'}", "metadata.labels"),
    ] {
        let err = ns(&format!("metadata: {{name: x, labels: {bad}}}")).unwrap_err();
        assert!(err.to_string().starts_with(field), "{bad}: {err}");
    }
    assert!(
        ns(&format!(
            "metadata: {{name: x, labels: {{example.com/{}: {}}}}}",
            "k".repeat(63),
            "v".repeat(63)
        ))
        .is_ok()
    );
    assert!(
        ns(&format!(
            "metadata: {{name: x, labels: {{a: {}}}}}",
            "v".repeat(64)
        ))
        .is_err()
    );
    let long = format!(
        "{}.{}.{}.{}",
        "p".repeat(63),
        "q".repeat(63),
        "r".repeat(63),
        "s".repeat(61)
    );
    assert_eq!(long.len(), 253);
    let p: net::NetworkPolicy = serde_yaml_ng::from_str(&format!(
        "metadata: {{name: {long}, namespace: x}}\nspec: {{podSelector: {{}}}}"
    ))
    .unwrap();
    assert!(policy(&p).is_ok());
    let p: net::NetworkPolicy = serde_yaml_ng::from_str(&format!(
        "metadata: {{name: {long}x, namespace: x}}\nspec: {{podSelector: {{}}}}"
    ))
    .unwrap();
    assert!(
        policy(&p)
            .unwrap_err()
            .to_string()
            .contains("DNS-1123 subdomain")
    );
    let p = policy_from(&format!(
        "{HEAD}spec: {{podSelector: {{matchLabels: {{app: 'a;b'}}}}}}"
    ));
    assert!(
        p.unwrap_err()
            .to_string()
            .starts_with("spec.podSelector.matchLabels")
    );
    let p = policy_from(&format!(
        "{HEAD}spec: {{podSelector: {{matchExpressions: [{{key: app, operator: In, values: ['x y']}}]}}}}"
    ));
    assert!(
        p.unwrap_err()
            .to_string()
            .contains("matchExpressions[0].values[0]")
    );
}

#[test]
fn namespaces_get_the_name_label() {
    let ns: core::Namespace =
        serde_yaml_ng::from_str("metadata: {name: x, labels: {team: a}}").unwrap();
    let ns = namespace(&ns).unwrap();
    assert_eq!(
        ns.labels.get(NAMESPACE_NAME_LABEL).map(String::as_str),
        Some("x")
    );
    assert_eq!(ns.labels.get("team").map(String::as_str), Some("a"));
}
