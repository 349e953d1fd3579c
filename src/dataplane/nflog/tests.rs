//! Decoding NFLOG packet messages: the kernel's byte layout, several messages in one datagram,
//! both families, ports, fragments and foreign prefixes.

use super::*;
use netlink_packet_core::NetlinkHeader;
use netlink_packet_netfilter::NetfilterHeader;
use std::ffi::CString;

const PREFIX: &str = "kni-deny-ingress-KNI-PODI-0123456789abcdef";

fn ipv4_tcp(src: [u8; 4], dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    p.extend(src);
    p.extend(dst);
    p.extend(40000u16.to_be_bytes());
    p.extend(dport.to_be_bytes());
    p.extend([0; 16]);
    p
}

fn ipv6(next: u8, src: Ipv6Addr, dst: Ipv6Addr, rest: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend((rest.len() as u16).to_be_bytes());
    p.extend([next, 64]);
    p.extend(src.octets());
    p.extend(dst.octets());
    p.extend(rest);
    p
}

/// An NFLOG packet message as the crate emits it.
fn message(prefix: &str, payload: Vec<u8>) -> Vec<u8> {
    let mut m = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 100),
            ULogMessage::Packet(vec![
                PacketNla::Mark(0),
                PacketNla::Prefix(CString::new(prefix).unwrap()),
                PacketNla::Payload(payload),
            ]),
        )),
    );
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

/// An NLA: length, type, value, padded to 4 bytes.
fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut out = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
    out.extend(kind.to_ne_bytes());
    out.extend(value);
    out.resize(out.len().div_ceil(4) * 4, 0);
    out
}

#[test]
fn a_packet_message_in_the_kernels_byte_layout_decodes() {
    // nfnetlink_log's NFULNL_MSG_PACKET (subsystem 4, message 0): nlmsghdr, nfgenmsg
    // (AF_INET, version 0, group 100 big-endian), then NFULA_PREFIX (10, NUL-terminated) and
    // NFULA_PAYLOAD (9).
    let payload = ipv4_tcp([10, 0, 1, 1], [10, 0, 2, 2], 8080);
    let mut body = vec![2, 0];
    body.extend(100u16.to_be_bytes());
    body.extend(nla(10, &[PREFIX.as_bytes(), &[0]].concat()));
    body.extend(nla(9, &payload));
    let mut datagram = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
    datagram.extend(0x0400u16.to_ne_bytes());
    datagram.extend(0u16.to_ne_bytes());
    datagram.extend(0u32.to_ne_bytes());
    datagram.extend(0u32.to_ne_bytes());
    datagram.extend(body);
    assert_eq!(
        decode_datagram(&datagram),
        vec![DeniedPacket {
            direction: Direction::Ingress,
            chain: "KNI-PODI-0123456789abcdef".into(),
            src: "10.0.1.1".parse().unwrap(),
            dst: "10.0.2.2".parse().unwrap(),
            protocol: 6,
            dst_port: Some(8080),
        }]
    );
}

#[test]
fn several_messages_in_one_datagram_and_foreign_prefixes_left_out() {
    let a: Ipv6Addr = "fd00::1:1".parse().unwrap();
    let b: Ipv6Addr = "fd00::2:2".parse().unwrap();
    let mut udp = 5353u16.to_be_bytes().to_vec();
    udp.extend(53u16.to_be_bytes());
    udp.extend([0, 8, 0, 0]);
    let mut datagram = message(PREFIX, ipv4_tcp([10, 0, 1, 1], [10, 0, 2, 2], 80));
    datagram.extend(message(
        "someone-else",
        ipv4_tcp([1, 1, 1, 1], [2, 2, 2, 2], 1),
    ));
    datagram.extend(message(
        "kni-deny-egress-KNI-PODE-0123456789abcdef",
        ipv6(17, a, b, &udp),
    ));
    let packets = decode_datagram(&datagram);
    assert_eq!(packets.len(), 2, "{packets:?}");
    assert_eq!(packets[0].dst_port, Some(80));
    assert_eq!(packets[1].direction, Direction::Egress);
    assert_eq!(
        (packets[1].src, packets[1].dst),
        (IpAddr::from(a), IpAddr::from(b))
    );
    assert_eq!((packets[1].protocol, packets[1].dst_port), (17, Some(53)));
    assert_eq!(protocol_name(packets[1].protocol), "udp");
}

#[test]
fn ipv6_extension_headers_are_skipped_and_later_fragments_have_no_port() {
    let a: Ipv6Addr = "fd00::1".parse().unwrap();
    let b: Ipv6Addr = "fd00::2".parse().unwrap();
    let tcp = [0x9c, 0x40, 0x01, 0xbb, 0, 0, 0, 0];
    // Hop-by-hop (8 bytes) then TCP to 443.
    let mut hop = vec![6, 0, 0, 0, 0, 0, 0, 0];
    hop.extend(tcp);
    let p = parse_headers(&ipv6(0, a, b, &hop)).unwrap();
    assert_eq!((p.protocol, p.dst_port), (6, Some(443)));
    // A fragment header with offset 0 (first fragment): the port is there.
    let mut first = vec![6, 0, 0, 1, 0, 0, 0, 7];
    first.extend(tcp);
    assert_eq!(
        parse_headers(&ipv6(44, a, b, &first)).unwrap().dst_port,
        Some(443)
    );
    // Offset 8: no TCP header in this fragment.
    let mut later = vec![6, 0, 0, 0x40, 0, 0, 0, 7];
    later.extend(tcp);
    let p = parse_headers(&ipv6(44, a, b, &later)).unwrap();
    assert_eq!((p.protocol, p.dst_port), (6, None));
    // IPv4: a later fragment has no port either; ICMP never does.
    let mut v4 = ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 80);
    v4[6] = 0x00;
    v4[7] = 0x10;
    assert_eq!(parse_headers(&v4).unwrap().dst_port, None);
    let mut icmp = ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 80);
    icmp[9] = 1;
    assert_eq!(parse_headers(&icmp).unwrap().dst_port, None);
    // Truncated or not IP at all.
    assert!(parse_headers(&[0x45, 0]).is_none());
    assert!(parse_headers(&[0x20; 40]).is_none());
}

#[test]
fn a_kernel_refusing_the_log_rule_is_named_with_its_modules_and_left_clean() {
    use crate::dataplane::Backend;
    use crate::dataplane::memory::MemoryKernel;
    let kernel = MemoryKernel::new(Backend::Nft);
    kernel.state().faults.reject_iptables = usize::MAX;
    let log = LogDenied {
        group: 100,
        rate: Default::default(),
    };
    let err = probe(&kernel, &log).err().expect("refused").to_string();
    assert!(err.contains("NFLOG") && err.contains("xt_NFLOG"), "{err}");
    kernel.state().faults.reject_iptables = 0;
    for family in Family::ALL {
        let saved = kernel.iptables_save(family).unwrap();
        assert!(!saved.contains(PROBE_CHAIN), "{saved}");
    }
}
