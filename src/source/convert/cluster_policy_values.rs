//! The values inside a ClusterNetworkPolicy as its CRD checks them: list sizes
//! (`minItems`/`maxItems`), `x-kubernetes-list-type: set`, CIDRs (`isCIDR`), domain names (the
//! `DomainName` pattern) and port numbers; see `cluster_policy`.

use super::validate::*;
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::sync::OnceLock;

/// `maxItems` of ingress, egress, from, to, protocols, networks and domainNames.
pub(super) const MAX_ITEMS: usize = 25;
/// `maxLength` of a CIDR.
const MAX_CIDR: usize = 43;
/// The CRD's pattern for a domain name, as written (its `A-z` ranges include `[\]^_` and the
/// backquote, which kube-apiserver accepts too).
const DOMAIN_NAME_PATTERN: &str = r"^(\*\.)?([a-zA-z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.)+[a-zA-z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?\.?$";

pub(super) fn at_most(len: usize, path: &str) -> Result<(), InvalidField> {
    if len > MAX_ITEMS {
        return Err(invalid(
            path,
            format!("{len} items, more than the {MAX_ITEMS} allowed"),
        ));
    }
    Ok(())
}

/// `minItems: 1` and `maxItems: 25`.
pub(super) fn one_to_max(len: usize, path: &str) -> Result<(), InvalidField> {
    if len == 0 {
        return Err(invalid(path, "must have at least one item"));
    }
    at_most(len, path)
}

/// `x-kubernetes-list-type: set`: kube-apiserver rejects an item given twice.
pub(super) fn no_duplicate(items: &[String], path: &str) -> Result<(), InvalidField> {
    let mut seen = BTreeSet::new();
    for (i, item) in items.iter().enumerate() {
        if !seen.insert(item) {
            return Err(invalid(
                format!("{path}[{i}]"),
                format!("duplicate value {item:?}"),
            ));
        }
    }
    Ok(())
}

/// A CIDR as the CEL function `isCIDR` accepts it (kube-apiserver
/// staging/src/k8s.io/apiserver/pkg/cel/library/cidr.go: Go's `netip.ParsePrefix`, which refuses
/// leading zeros in the address and the prefix length, zones and blanks, and no IPv4-mapped IPv6
/// address). Bits after the prefix are allowed there and dropped here.
pub(super) fn cidr(text: &str, path: &str) -> Result<IpNet, InvalidField> {
    let bad = |why: &str| {
        invalid(
            path,
            format!("{text:?} is not a valid CIDR ({why}; like 10.0.0.0/8 or fd00::/8)"),
        )
    };
    if text.chars().count() > MAX_CIDR {
        return Err(bad("longer than 43 characters"));
    }
    let Some((addr, bits)) = text.split_once('/') else {
        return Err(bad("no prefix length"));
    };
    let canonical_bits = bits == "0"
        || (!bits.is_empty() && !bits.starts_with('0') && bits.bytes().all(|b| b.is_ascii_digit()));
    if !canonical_bits {
        return Err(bad("the prefix length must be a decimal number"));
    }
    if addr.contains('%') {
        return Err(bad("zones are not allowed"));
    }
    // ipnet's own parser takes leading zeros ("010.0.0.0"); the standard library's does not.
    addr.parse::<std::net::IpAddr>()
        .map_err(|_| bad("not an IP address before the '/'"))?;
    let net: IpNet = text.parse().map_err(|_| bad("not an address/length"))?;
    if let IpNet::V6(v6) = net
        && v6.addr().to_ipv4_mapped().is_some()
    {
        return Err(bad("IPv4-mapped IPv6 addresses are not allowed"));
    }
    Ok(net.trunc())
}

pub(super) fn domain_name_list(list: &[String], path: &str) -> Result<Vec<String>, InvalidField> {
    one_to_max(list.len(), path)?;
    no_duplicate(list, path)?;
    static PATTERN: OnceLock<regex::Regex> = OnceLock::new();
    let pattern = PATTERN.get_or_init(|| regex::Regex::new(DOMAIN_NAME_PATTERN).unwrap());
    for (i, name) in list.iter().enumerate() {
        if !pattern.is_match(name) {
            return Err(invalid(
                format!("{path}[{i}]"),
                format!(
                    "{name:?} is not a domain name (like example.com or *.example.com: '*' only as a whole first label)"
                ),
            ));
        }
    }
    Ok(list.to_vec())
}

pub(super) fn port_number(n: i64, path: &str) -> Result<u16, InvalidField> {
    u16::try_from(n)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| invalid(path, format!("{n} is not a port number (1-65535)")))
}
