//! Reading denied packets (`--log-denied`) from their NFLOG group over netlink (nfnetlink_log,
//! with `netlink-packet-netfilter`'s NFLOG messages; no C library): each packet our log rules
//! copied, with the prefix saying which direction and chain dropped it, turned into addresses,
//! protocol and destination port. Which pods and policies those are is for the caller.

use super::error::{DataplaneError, MissingFeature};
use super::kernel::Kernel;
use super::render;
use crate::compile::ir::{Family, LogRule, Rule, Target};
use crate::compile::log_denied::{self, Direction, LogDenied};
use anyhow::{Context, Result, bail};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{ConfigCmd, ConfigMode, ConfigNla, PacketNla, ULogMessage};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Bytes of each packet copied to us: the IP header, IPv6 extension headers and the ports.
const COPY_RANGE: u32 = 256;
/// Room for bursts of logged packets while the agent is busy.
const RECEIVE_BUFFER: usize = 1 << 20;
const PROBE_CHAIN: &str = "KNI-PROBE-NFLOG";

/// One packet a log rule of ours copied before its drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeniedPacket {
    pub direction: Direction,
    /// The chain whose rule dropped it.
    pub chain: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The IP protocol number (of the last header, after IPv6 extension headers).
    pub protocol: u8,
    /// TCP, UDP and SCTP only, and not for a later fragment.
    pub dst_port: Option<u16>,
}

/// The name of an IP protocol number, as the kernel's tools print it.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "ipv6-icmp".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

/// An NFLOG socket bound to one group: what the kernel copies there reaches only us.
pub struct NflogReader {
    socket: Socket,
}

impl NflogReader {
    /// Binds `group`. Fails when nfnetlink_log is missing or another process reads the group.
    pub fn open(group: u16) -> Result<NflogReader> {
        let mut socket = Socket::new(NETLINK_NETFILTER).context("netlink socket")?;
        socket.bind_auto().context("netlink bind")?;
        // Best effort: a smaller buffer only loses more under a flood.
        let _ = socket.set_rx_buf_sz(RECEIVE_BUFFER);
        let mut request = netlink_packet_netfilter::nflog::config_request(
            NetfilterProtoFamily::Unspec,
            group,
            vec![
                ConfigCmd::Bind.into(),
                ConfigMode::new_packet(COPY_RANGE).into(),
                // Each packet as it comes, not batched for up to a second.
                ConfigNla::QThresh(1),
            ],
        );
        request.header.sequence_number = 1;
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        socket.send(&buf, 0).context("netlink send")?;
        let (answer, _) = socket.recv_from_full().context("netlink receive")?;
        let message = NetlinkMessage::<NetfilterMessage>::deserialize(&answer)
            .map_err(|e| anyhow::anyhow!("netlink: cannot decode the answer: {e}"))?;
        match message.payload {
            NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()).with_context(|| {
                format!(
                    "cannot read NFLOG group {group} (kernel module nfnetlink_log; another process, e.g. ulogd, may read that group: pick another with --nflog-group)"
                )
            }),
            NetlinkPayload::Error(_) => Ok(NflogReader { socket }),
            other => bail!("netlink: unexpected answer to binding NFLOG group {group}: {other:?}"),
        }
    }

    /// Waits for the next datagram and returns the packets of ours in it.
    pub fn receive(&mut self) -> Result<Vec<DeniedPacket>> {
        let (datagram, _) = self.socket.recv_from_full().context("netlink receive")?;
        Ok(decode_datagram(&datagram))
    }
}

/// The packets of ours in one datagram from the NFLOG socket (other messages, and packets
/// logged with someone else's prefix, are left out).
pub fn decode_datagram(datagram: &[u8]) -> Vec<DeniedPacket> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let Ok(message) = NetlinkMessage::<NetfilterMessage>::deserialize(rest) else {
            break;
        };
        let len = message.header.length as usize;
        if let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
            ..
        }) = &message.payload
            && let Some(packet) = decode_packet(nlas)
        {
            out.push(packet);
        }
        // Messages are 4-byte aligned within a datagram.
        let next = len.div_ceil(4) * 4;
        if len == 0 || next > rest.len() {
            break;
        }
        rest = &rest[next..];
    }
    out
}

/// One NFLOG packet message: our prefix and the packet's headers.
pub fn decode_packet(nlas: &[PacketNla]) -> Option<DeniedPacket> {
    let mut prefix = None;
    let mut payload = None;
    for nla in nlas {
        match nla {
            PacketNla::Prefix(p) => prefix = p.to_str().ok(),
            PacketNla::Payload(p) => payload = Some(p.as_slice()),
            _ => {}
        }
    }
    let prefix = log_denied::decode_prefix(prefix?)?;
    let headers = parse_headers(payload?)?;
    Some(DeniedPacket {
        direction: prefix.direction,
        chain: prefix.chain,
        src: headers.src,
        dst: headers.dst,
        protocol: headers.protocol,
        dst_port: headers.dst_port,
    })
}

struct Headers {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    dst_port: Option<u16>,
}

/// Addresses, protocol and destination port from an IPv4 or IPv6 packet's start.
fn parse_headers(packet: &[u8]) -> Option<Headers> {
    let version = packet.first()? >> 4;
    let (src, dst, mut protocol, mut offset, mut first_fragment) = match version {
        4 => {
            let header_len = usize::from(packet.first()? & 0x0f) * 4;
            let bytes: [u8; 20] = packet.get(..20)?.try_into().ok()?;
            let fragment_offset = u16::from_be_bytes([bytes[6] & 0x1f, bytes[7]]);
            (
                IpAddr::from(Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[12..16]).ok()?)),
                IpAddr::from(Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[16..20]).ok()?)),
                bytes[9],
                header_len,
                fragment_offset == 0,
            )
        }
        6 => {
            let bytes: [u8; 40] = packet.get(..40)?.try_into().ok()?;
            (
                IpAddr::from(Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[8..24]).ok()?)),
                IpAddr::from(Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[24..40]).ok()?)),
                bytes[6],
                40,
                true,
            )
        }
        _ => return None,
    };
    if version == 6 {
        // Hop-by-hop, routing, destination options: (length + 1) × 8 bytes; fragment: 8 bytes.
        while let 0 | 43 | 44 | 60 = protocol {
            let header = packet.get(offset..offset + 8);
            let Some(header) = header else {
                break;
            };
            let next = header[0];
            if protocol == 44 {
                first_fragment = u16::from_be_bytes([header[2], header[3]]) >> 3 == 0;
                offset += 8;
            } else {
                offset += (usize::from(header[1]) + 1) * 8;
            }
            protocol = next;
        }
    }
    let dst_port = match protocol {
        6 | 17 | 132 if first_fragment => packet
            .get(offset + 2..offset + 4)
            .map(|p| u16::from_be_bytes([p[0], p[1]])),
        _ => None,
    };
    Some(Headers {
        src,
        dst,
        protocol,
        dst_port,
    })
}

/// Checks, before anything is programmed, that `--log-denied` can work: the kernel takes our log
/// rule (the NFLOG target and limit match) in both families, and the group can be read.
pub fn probe(kernel: &(impl Kernel + ?Sized), log: &LogDenied) -> Result<NflogReader> {
    let rule = Rule::new(
        vec![],
        Target::LogDenied(LogRule {
            group: log.group,
            prefix: log_denied::encode_prefix(Direction::Other, PROBE_CHAIN),
            per_second: log.rate.per_second,
            burst: log.rate.burst,
        }),
    );
    for family in Family::ALL {
        let written =
            kernel.iptables_restore(family, &render::chain_batch(family, PROBE_CHAIN, &[&rule]));
        let _ = kernel.iptables_restore(family, &render::delete_chain_batch(PROBE_CHAIN));
        if let Err(e) = written {
            if matches!(e, DataplaneError::LockHeld { .. }) {
                return Err(e.into());
            }
            let missing = MissingFeature {
                what: "the NFLOG target and limit match (--log-denied)",
                module: "xt_NFLOG, xt_limit, nfnetlink_log",
                error: e.to_string(),
            };
            return Err(DataplaneError::FeatureMissing(vec![missing]).into());
        }
    }
    NflogReader::open(log.group)
}

#[cfg(test)]
mod tests;
