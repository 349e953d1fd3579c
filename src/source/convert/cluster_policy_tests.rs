//! ClusterNetworkPolicy conversion: what the CRD's schema and CEL rules accept and reject.

use super::cluster_policy::*;
use super::cluster_policy_api::ClusterNetworkPolicy;
use super::node::node_info;
use super::validate::InvalidField;
use crate::model::{
    ClusterPeer, ClusterPolicy, ClusterPort, ClusterRuleAction, ClusterSubject, LabelSelector,
    Protocol, Tier,
};
use k8s_openapi::api::core::v1 as core;

fn cnp(spec: &str) -> Result<ClusterPolicy, InvalidField> {
    let obj: ClusterNetworkPolicy = serde_yaml_ng::from_str(&format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: p}}\nspec: {spec}"
    ))
    .unwrap();
    cluster_policy(&obj)
}

/// A valid spec with one egress rule whose `to` and `protocols` are given.
fn egress(to: &str, protocols: &str) -> Result<ClusterPolicy, InvalidField> {
    cnp(&format!(
        "{{tier: Admin, priority: 5, subject: {{namespaces: {{}}}}, egress: [{{action: Deny, to: {to}{protocols}}}]}}"
    ))
}

fn rejected(result: Result<ClusterPolicy, InvalidField>, path: &str, message: &str) {
    let err = result.expect_err(path);
    assert_eq!(err.path, path, "{err}");
    assert!(err.message.contains(message), "{err}");
}

#[test]
fn a_full_policy_converts() {
    let p = cnp("{tier: Baseline, priority: 1000, subject: {pods: {podSelector: {matchLabels: {app: db}}}},
        ingress: [{name: from-monitoring, action: Accept, from: [{namespaces: {matchLabels: {team: mon}}}, {pods: {namespaceSelector: {}, podSelector: {}}}],
                   protocols: [{tcp: {destinationPort: {number: 80}}}, {udp: {destinationPort: {range: {start: 53, end: 54}}}}, {destinationNamedPort: http}]}],
        egress: [{action: Pass, to: [{networks: [10.1.2.3/8, 'fd00::/64']}, {nodes: {matchLabels: {role: infra}}}, {domainNames: [example.com, '*.example.org']}],
                  protocols: [{sctp: {destinationPort: {number: 9}}}]}]}").unwrap();
    assert_eq!(p.name, "p");
    assert_eq!((p.tier, p.priority), (Tier::Baseline, 1000));
    let app_db = LabelSelector {
        match_labels: [("app".to_string(), "db".to_string())].into(),
        ..Default::default()
    };
    assert_eq!(
        p.subject,
        ClusterSubject::Pods {
            namespaces: LabelSelector::default(),
            pods: app_db
        }
    );
    let rule = &p.ingress[0];
    assert_eq!(rule.name, "from-monitoring");
    assert_eq!(rule.action, ClusterRuleAction::Accept);
    assert!(
        matches!(&rule.peers[0], ClusterPeer::Namespaces(s) if s.match_labels["team"] == "mon")
    );
    assert!(matches!(&rule.peers[1], ClusterPeer::Pods { .. }));
    assert_eq!(
        rule.ports.as_deref().unwrap(),
        [
            ClusterPort::Protocol {
                protocol: Protocol::Tcp,
                ports: Some((80, 80))
            },
            ClusterPort::Protocol {
                protocol: Protocol::Udp,
                ports: Some((53, 54))
            },
            ClusterPort::Named("http".into()),
        ]
    );
    let rule = &p.egress[0];
    assert_eq!(rule.action, ClusterRuleAction::Pass);
    assert_eq!(rule.name, "");
    assert_eq!(
        rule.peers[0],
        ClusterPeer::Networks(vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::/64".parse().unwrap()
        ])
    );
    assert!(matches!(&rule.peers[1], ClusterPeer::Nodes(s) if s.match_labels["role"] == "infra"));
    assert_eq!(
        rule.peers[2],
        ClusterPeer::DomainNames(vec!["example.com".into(), "*.example.org".into()])
    );
    assert_eq!(domain_names(&p), ["example.com", "*.example.org"]);
    // No rules at all is valid: the policy affects nothing.
    let p = cnp("{tier: Admin, priority: 0, subject: {namespaces: {}}}").unwrap();
    assert!(p.ingress.is_empty() && p.egress.is_empty());
    assert!(domain_names(&p).is_empty());
}

#[test]
fn spec_fields_are_checked() {
    let subject = "subject: {namespaces: {}}";
    for (spec, path, message) in [
        (format!("{{priority: 1, {subject}}}"), "spec.tier", "is required"),
        (format!("{{tier: admin, priority: 1, {subject}}}"), "spec.tier", "unsupported value \"admin\""),
        (format!("{{tier: Developer, priority: 1, {subject}}}"), "spec.tier", "expected Admin or Baseline"),
        (format!("{{tier: Admin, {subject}}}"), "spec.priority", "is required"),
        (format!("{{tier: Admin, priority: 1001, {subject}}}"), "spec.priority", "1001 is out of range (0-1000)"),
        (format!("{{tier: Admin, priority: -1, {subject}}}"), "spec.priority", "out of range"),
        ("{tier: Admin, priority: 1}".to_string(), "spec.subject", "is required"),
        ("{tier: Admin, priority: 1, subject: {}}".to_string(), "spec.subject", "must set exactly one of namespaces, pods"),
        ("{tier: Admin, priority: 1, subject: {namespaces: {}, pods: {podSelector: {}}}}".to_string(), "spec.subject", "not namespaces and pods"),
        ("{tier: Admin, priority: 1, subject: {pods: {namespaceSelector: {}}}}".to_string(), "spec.subject.pods.podSelector", "is required"),
        ("{tier: Admin, priority: 1, subject: {services: {}}}".to_string(), "spec.subject", "unknown field \"services\""),
        ("{tier: Admin, priority: 1, subject: {namespaces: {matchExpressions: [{key: a, operator: Near}]}}}".to_string(), "spec.subject.namespaces.matchExpressions[0].operator", "unknown operator"),
    ] {
        rejected(cnp(&spec), path, message);
    }
    let obj: ClusterNetworkPolicy = serde_yaml_ng::from_str("metadata: {name: p}").unwrap();
    rejected(cluster_policy(&obj), "spec", "is required");
    let obj: ClusterNetworkPolicy = serde_yaml_ng::from_str(
        "metadata: {name: Bad_Name}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}}",
    )
    .unwrap();
    rejected(cluster_policy(&obj), "metadata.name", "DNS-1123 subdomain");
}

#[test]
fn rule_counts_names_and_actions_are_checked() {
    let rules = |n: usize, rule: &str| vec![rule; n].join(", ");
    let deny = "{action: Deny, to: [{namespaces: {}}]}";
    let ok = cnp(&format!(
        "{{tier: Admin, priority: 1, subject: {{namespaces: {{}}}}, egress: [{}]}}",
        rules(25, deny)
    ));
    assert_eq!(ok.unwrap().egress.len(), 25);
    rejected(
        cnp(&format!(
            "{{tier: Admin, priority: 1, subject: {{namespaces: {{}}}}, egress: [{}]}}",
            rules(26, deny)
        )),
        "spec.egress",
        "26 items, more than the 25 allowed",
    );
    rejected(
        cnp(&format!(
            "{{tier: Admin, priority: 1, subject: {{namespaces: {{}}}}, ingress: [{}]}}",
            rules(26, "{action: Deny, from: [{namespaces: {}}]}")
        )),
        "spec.ingress",
        "26 items",
    );
    let long = "n".repeat(101);
    for (rule, path, message) in [
        (
            format!("{{name: {long}, action: Deny, to: [{{namespaces: {{}}}}]}}"),
            "spec.egress[0].name",
            "longer than 100",
        ),
        (
            "{to: [{namespaces: {}}]}".to_string(),
            "spec.egress[0].action",
            "is required",
        ),
        (
            "{action: Allow, to: [{namespaces: {}}]}".to_string(),
            "spec.egress[0].action",
            "expected Accept, Deny or Pass",
        ),
        (
            "{action: Deny}".to_string(),
            "spec.egress[0].to",
            "is required",
        ),
        (
            "{action: Deny, to: []}".to_string(),
            "spec.egress[0].to",
            "at least one item",
        ),
        (
            format!("{{action: Deny, to: [{}]}}", rules(26, "{namespaces: {}}")),
            "spec.egress[0].to",
            "26 items",
        ),
        (
            "{action: Deny, to: [{namespaces: {}}], protocols: []}".to_string(),
            "spec.egress[0].protocols",
            "at least one item",
        ),
    ] {
        rejected(
            cnp(&format!(
                "{{tier: Admin, priority: 1, subject: {{namespaces: {{}}}}, egress: [{rule}]}}"
            )),
            path,
            message,
        );
    }
    // 100 characters (not bytes) is allowed.
    let name = "é".repeat(100);
    assert!(cnp(&format!(
        "{{tier: Admin, priority: 1, subject: {{namespaces: {{}}}}, egress: [{{name: {name}, action: Deny, to: [{{namespaces: {{}}}}]}}]}}"
    ))
    .is_ok());
    rejected(
        cnp(
            "{tier: Admin, priority: 1, subject: {namespaces: {}}, ingress: [{action: Deny, to: [{namespaces: {}}]}]}",
        ),
        "spec.ingress[0].from",
        "is required",
    );
}

#[test]
fn peers_need_exactly_one_field_and_egress_only_ones_stay_in_egress() {
    for (to, path, message) in [
        (
            "[{namespaces: {}, networks: [10.0.0.0/8]}]",
            "spec.egress[0].to[0]",
            "not namespaces and networks",
        ),
        (
            "[{namespaces: {}, services: [a]}]",
            "spec.egress[0].to[0]",
            "unknown field \"services\"",
        ),
        (
            "[{pods: {namespaceSelector: {}}}]",
            "spec.egress[0].to[0].pods.podSelector",
            "is required",
        ),
        (
            "[{networks: []}]",
            "spec.egress[0].to[0].networks",
            "at least one item",
        ),
        (
            "[{domainNames: []}]",
            "spec.egress[0].to[0].domainNames",
            "at least one item",
        ),
    ] {
        rejected(egress(to, ""), path, message);
    }
    for field in [
        "networks: [10.0.0.0/8]",
        "nodes: {}",
        "domainNames: [example.com]",
    ] {
        let name = field.split(':').next().unwrap();
        rejected(
            cnp(&format!(
                "{{tier: Admin, priority: 1, subject: {{namespaces: {{}}}}, ingress: [{{action: Deny, from: [{{{field}}}]}}]}}"
            )),
            &format!("spec.ingress[0].from[0].{name}"),
            "only in egress peers",
        );
    }
    // An empty nodes selector selects every node.
    let p = egress("[{nodes: {}}]", "").unwrap();
    assert_eq!(
        p.egress[0].peers[0],
        ClusterPeer::Nodes(LabelSelector::default())
    );
}

#[test]
fn networks_are_cidrs_as_is_cidr_reads_them() {
    let net = |cidr: &str| egress(&format!("[{{networks: ['{cidr}']}}]"), "");
    for ok in [
        "10.0.0.0/8",
        "10.1.2.3/8",
        "0.0.0.0/0",
        "::/0",
        "fd00::/8",
        "2001:db8::1/128",
        "192.168.1.1/32",
    ] {
        assert!(net(ok).is_ok(), "{ok}");
    }
    assert_eq!(
        net("10.1.2.3/8").unwrap().egress[0].peers[0],
        ClusterPeer::Networks(vec!["10.0.0.0/8".parse().unwrap()])
    );
    for bad in [
        "10.0.0.0",
        "10.0.0.0/33",
        "fd00::/129",
        "banana",
        "010.0.0.0/8",
        "10.0.0.0/08",
        "10.0.0.0/+8",
        " 10.0.0.0/8",
        "10.0.0.0/8 ",
        "::ffff:10.0.0.0/104",
        "fe80::1%eth0/64",
        "1:2:3:4:5:6:7:8:9:10:11:12:13:14:15:16:17:18:19:20/128",
    ] {
        rejected(
            net(bad),
            "spec.egress[0].to[0].networks[0]",
            "is not a valid CIDR",
        );
    }
    rejected(
        egress("[{networks: [10.0.0.0/8, 10.0.0.0/8]}]", ""),
        "spec.egress[0].to[0].networks[1]",
        "duplicate value",
    );
    let many: Vec<String> = (0..26).map(|i| format!("10.{i}.0.0/16")).collect();
    rejected(
        egress(&format!("[{{networks: [{}]}}]", many.join(", ")), ""),
        "spec.egress[0].to[0].networks",
        "26 items",
    );
}

#[test]
fn domain_names_follow_the_crd_pattern() {
    let names = |n: &str| egress(&format!("[{{domainNames: ['{n}']}}]"), "");
    for ok in [
        "example.com",
        "*.example.com",
        "a.b.c.example.com",
        "example.com.",
        "x_y.example.com",
    ] {
        assert!(names(ok).is_ok(), "{ok}");
    }
    for bad in [
        "example",
        "*.com",
        "*example.com",
        "www.*.example.com",
        "-a.example.com",
        "a..example.com",
        "exa mple.com",
        "",
    ] {
        rejected(
            names(bad),
            "spec.egress[0].to[0].domainNames[0]",
            "is not a domain name",
        );
    }
    rejected(
        egress("[{domainNames: [example.com, example.com]}]", ""),
        "spec.egress[0].to[0].domainNames[1]",
        "duplicate value",
    );
}

#[test]
fn protocols_need_exactly_one_field_and_valid_ports() {
    let to = "[{namespaces: {}}]";
    let with = |p: &str| egress(to, &format!(", protocols: [{p}]"));
    let path = "spec.egress[0].protocols[0]";
    for (p, at, message) in [
        (
            "{}",
            path.to_string(),
            "must set exactly one of tcp, udp, sctp, destinationNamedPort",
        ),
        (
            "{tcp: {destinationPort: {number: 80}}, udp: {destinationPort: {number: 80}}}",
            path.to_string(),
            "not tcp and udp",
        ),
        ("{icmp: {}}", path.to_string(), "unknown field \"icmp\""),
        (
            "{tcp: {}}",
            format!("{path}.tcp.destinationPort"),
            "is required",
        ),
        (
            "{udp: {destinationPort: {}}}",
            format!("{path}.udp.destinationPort"),
            "must set exactly one of number, range",
        ),
        (
            "{tcp: {destinationPort: {number: 80, range: {start: 1, end: 2}}}}",
            format!("{path}.tcp.destinationPort"),
            "not number and range",
        ),
        (
            "{tcp: {destinationPort: {number: 0}}}",
            format!("{path}.tcp.destinationPort.number"),
            "0 is not a port number",
        ),
        (
            "{sctp: {destinationPort: {number: 65536}}}",
            format!("{path}.sctp.destinationPort.number"),
            "65536 is not a port number",
        ),
        (
            "{tcp: {destinationPort: {range: {start: 80, end: 80}}}}",
            format!("{path}.tcp.destinationPort.range"),
            "start 80 must be less than end 80",
        ),
        (
            "{tcp: {destinationPort: {range: {start: 90, end: 80}}}}",
            format!("{path}.tcp.destinationPort.range"),
            "must be less than",
        ),
        (
            "{tcp: {destinationPort: {range: {start: 80}}}}",
            format!("{path}.tcp.destinationPort.range.end"),
            "is required",
        ),
        (
            "{tcp: {destinationPort: {range: {start: 0, end: 80}}}}",
            format!("{path}.tcp.destinationPort.range.start"),
            "not a port number",
        ),
        (
            "{destinationNamedPort: ''}",
            format!("{path}.destinationNamedPort"),
            "must not be empty",
        ),
    ] {
        rejected(with(p), &at, message);
    }
    let many = vec!["{tcp: {destinationPort: {number: 1}}}"; 26].join(", ");
    rejected(with(&many), "spec.egress[0].protocols", "26 items");
    assert_eq!(
        with("{tcp: {destinationPort: {range: {start: 1, end: 65535}}}}")
            .unwrap()
            .egress[0]
            .ports,
        Some(vec![ClusterPort::Protocol {
            protocol: Protocol::Tcp,
            ports: Some((1, 65535))
        }])
    );
}

#[test]
fn named_ports_are_refused_with_address_peers() {
    for peer in [
        "{networks: [10.0.0.0/8]}",
        "{nodes: {}}",
        "{domainNames: [example.com]}",
    ] {
        rejected(
            egress(
                &format!("[{{namespaces: {{}}}}, {peer}]"),
                ", protocols: [{tcp: {destinationPort: {number: 1}}}, {destinationNamedPort: http}]",
            ),
            "spec.egress[0]",
            "cannot be set with namedPorts",
        );
        // With numbered ports they are fine.
        assert!(
            egress(
                &format!("[{peer}]"),
                ", protocols: [{tcp: {destinationPort: {number: 1}}}]"
            )
            .is_ok()
        );
    }
    assert!(
        egress(
            "[{pods: {podSelector: {}}}]",
            ", protocols: [{destinationNamedPort: http}]"
        )
        .is_ok()
    );
}

#[test]
fn node_labels_and_addresses() {
    let node: core::Node = serde_yaml_ng::from_str(
        "metadata: {name: n1, labels: {role: infra}}\nstatus: {addresses: [{type: Hostname, address: n1}, {type: InternalIP, address: 10.0.0.1}, {type: InternalIP, address: 'fd00::1'}, {type: ExternalIP, address: 10.0.0.1}, {type: ExternalIP, address: 203.0.113.7}, {type: InternalDNS, address: n1.local}]}",
    )
    .unwrap();
    let info = node_info(&node).unwrap();
    assert_eq!(info.name, "n1");
    assert_eq!(info.labels["role"], "infra");
    let ips: Vec<String> = info.addresses.iter().map(|a| a.to_string()).collect();
    assert_eq!(ips, ["10.0.0.1", "fd00::1", "203.0.113.7"]);
    let bare: core::Node = serde_yaml_ng::from_str("metadata: {name: n2}").unwrap();
    assert!(node_info(&bare).unwrap().addresses.is_empty());
    let bad: core::Node = serde_yaml_ng::from_str(
        "metadata: {name: n3}\nstatus: {addresses: [{type: InternalIP, address: not-an-ip}]}",
    )
    .unwrap();
    assert_eq!(
        node_info(&bad).unwrap_err().path,
        "status.addresses[0].address"
    );
}

#[test]
fn domain_names_are_warned_about_once_per_policy() {
    let with_names = |name: &str| {
        let mut p = egress("[{domainNames: [example.com]}]", "").unwrap();
        p.name = name.to_string();
        p
    };
    assert!(warn_domain_names_once(&with_names("dn-once-a")));
    assert!(!warn_domain_names_once(&with_names("dn-once-a")));
    assert!(warn_domain_names_once(&with_names("dn-once-b")));
    let mut without = egress("[{networks: [10.0.0.0/8]}]", "").unwrap();
    without.name = "dn-once-c".into();
    assert!(!warn_domain_names_once(&without));
}

/// `clusternetworkpolicy_types.go`: a peer with no field the implementation knows (a newer CRD)
/// fails closed — an Accept rule does not match it, a Deny or Pass rule denies everything.
#[test]
fn peers_with_no_known_field_fail_closed() {
    let all = ClusterPeer::Networks(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]);
    for action in ["Deny", "Pass"] {
        for peer in ["{}", "{services: [a]}"] {
            let p = cnp(&format!(
                "{{tier: Admin, priority: 1, subject: {{namespaces: {{}}}}, ingress: [{{name: r, action: {action}, from: [{{namespaces: {{}}}}, {peer}], protocols: [{{tcp: {{destinationPort: {{number: 80}}}}}}]}}]}}"
            ))
            .unwrap();
            let rule = &p.ingress[0];
            assert_eq!(rule.action, ClusterRuleAction::Deny, "{action} {peer}");
            assert_eq!(rule.peers, vec![all.clone()], "{action} {peer}");
            assert_eq!(rule.ports, None, "{action} {peer}: every port");
            assert_eq!(rule.name, "r");
        }
    }
    let p = egress("[{networks: [10.0.0.0/8]}, {services: [a]}]", "").unwrap();
    assert_eq!(p.egress[0].action, ClusterRuleAction::Deny);
    let accept = cnp(
        "{tier: Admin, priority: 1, subject: {namespaces: {}}, egress: [{action: Accept, to: [{networks: [10.0.0.0/8]}, {services: [a]}], protocols: [{udp: {destinationPort: {number: 53}}}]}, {action: Accept, to: [{}]}]}",
    )
    .unwrap();
    assert_eq!(accept.egress[0].action, ClusterRuleAction::Accept);
    assert_eq!(
        accept.egress[0].peers,
        vec![ClusterPeer::Networks(vec!["10.0.0.0/8".parse().unwrap()])]
    );
    assert!(accept.egress[0].ports.is_some(), "its ports are kept");
    assert!(accept.egress[1].peers.is_empty(), "matches nothing");
}
