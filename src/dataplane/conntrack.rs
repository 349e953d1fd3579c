//! Conntrack over netlink (ctnetlink): one dump of the table, deletes by original tuple on the same
//! socket. No program is run. Used by strict mode (see `crate::compile::strict`).

use crate::compile::ir::{DesiredState, Family};
use crate::compile::strict::{CutDirection, Flow, FlowTuple, denied_by};
use anyhow::{Context, Result, bail};
use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Nla,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// `CTA_ZONE`: an entry outside the default zone is deleted in its zone.
const CTA_ZONE: u16 = 18;

/// A dumped entry: what strict mode judges, and what identifies it for deletion.
#[derive(Debug, Clone)]
pub struct Entry {
    pub flow: Flow,
    family: NetfilterProtoFamily,
    original: Vec<Tuple>,
    zone: Option<DefaultNla>,
}

/// A ctnetlink socket.
pub struct Conntrack {
    socket: Socket,
    sequence: u32,
}

impl Conntrack {
    pub fn open() -> Result<Conntrack> {
        let mut socket = Socket::new(NETLINK_NETFILTER).context("netlink socket")?;
        socket.bind_auto().context("netlink bind")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("netlink connect")?;
        Ok(Conntrack {
            socket,
            sequence: 0,
        })
    }

    fn send(
        &mut self,
        family: NetfilterProtoFamily,
        flags: u16,
        message: ConntrackMessage,
    ) -> Result<u32> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(family, 0, 0),
                message,
            )),
        );
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        self.socket.send(&buf, 0).context("netlink send")?;
        Ok(self.sequence)
    }

    /// Reads answers until `Done` (a dump) or the acknowledgement of `sequence`, handing each
    /// conntrack message to `each`.
    fn receive(
        &mut self,
        sequence: u32,
        mut each: impl FnMut(NetfilterProtoFamily, ConntrackMessage),
    ) -> Result<()> {
        loop {
            let (datagram, _) = self.socket.recv_from_full().context("netlink receive")?;
            if datagram.is_empty() {
                bail!("netlink: empty answer");
            }
            let mut rest = &datagram[..];
            while !rest.is_empty() {
                let message = NetlinkMessage::<NetfilterMessage>::deserialize(rest)
                    .map_err(|e| anyhow::anyhow!("netlink: cannot decode an answer: {e}"))?;
                let len = (message.header.length as usize).min(rest.len());
                let ours = message.header.sequence_number == sequence;
                match message.payload {
                    NetlinkPayload::Done(_) if ours => return Ok(()),
                    NetlinkPayload::Error(e) if ours => {
                        return match e.code {
                            None => Ok(()),
                            Some(_) => Err(e.to_io()).context("netlink"),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) if ours => {
                        if let NetfilterMessageInner::Conntrack(c) = m.inner {
                            each(m.header.family, c);
                        }
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                rest = &rest[len..];
            }
        }
    }

    /// Every entry of both families (those whose tuples we cannot read are left out).
    pub fn dump(&mut self) -> Result<Vec<Entry>> {
        let sequence = self.send(
            NetfilterProtoFamily::Unspec,
            NLM_F_REQUEST | NLM_F_DUMP,
            ConntrackMessage::Get(vec![]),
        )?;
        let mut entries = Vec::new();
        self.receive(sequence, |family, message| {
            if let ConntrackMessage::New(attributes) = message
                && let Some(entry) = entry_of(family, attributes)
            {
                entries.push(entry);
            }
        })?;
        Ok(entries)
    }

    /// Deletes one entry. `Ok(false)` when it was already gone.
    pub fn delete(&mut self, entry: &Entry) -> Result<bool> {
        let mut attributes = vec![ConntrackAttribute::CtaTupleOrig(entry.original.clone())];
        if let Some(zone) = &entry.zone {
            attributes.push(ConntrackAttribute::Other(zone.clone()));
        }
        let sequence = self.send(
            entry.family,
            NLM_F_REQUEST | NLM_F_ACK,
            ConntrackMessage::Delete(attributes),
        )?;
        match self.receive(sequence, |_, _| {}) {
            Ok(()) => Ok(true),
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::raw_os_error)
                    == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

fn flow_tuple(tuple: &[Tuple]) -> Option<FlowTuple> {
    let (mut src, mut dst, mut protocol) = (None, None, None);
    let (mut src_port, mut dst_port) = (0, 0);
    for part in tuple {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(protos) => {
                for p in protos {
                    match p {
                        ProtoTuple::Protocol(p) => protocol = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(port) => src_port = *port,
                        ProtoTuple::DestinationPort(port) => dst_port = *port,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(FlowTuple {
        protocol: protocol?,
        src: src?,
        dst: dst?,
        src_port,
        dst_port,
    })
}

fn entry_of(family: NetfilterProtoFamily, attributes: Vec<ConntrackAttribute>) -> Option<Entry> {
    let (mut original, mut reply, mut zone) = (None, None, None);
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(t) => original = Some(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(t),
            ConntrackAttribute::Other(nla) if nla.kind() == CTA_ZONE => zone = Some(nla),
            _ => {}
        }
    }
    let original = original?;
    let flow = Flow {
        original: flow_tuple(&original)?,
        reply: flow_tuple(&reply?)?,
    };
    Some(Entry {
        flow,
        family,
        original,
        zone,
    })
}

/// The addresses of this network namespace's interfaces.
pub fn local_addresses() -> Result<BTreeSet<IpAddr>> {
    let mut out = BTreeSet::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return Err(std::io::Error::last_os_error()).context("getifaddrs");
        }
        let mut cursor = list;
        while !cursor.is_null() {
            let addr = (*cursor).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*(addr as *const libc::sockaddr_in);
                        out.insert(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*(addr as *const libc::sockaddr_in6);
                        out.insert(IpAddr::from(v6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cursor = (*cursor).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    Ok(out)
}

/// What one pass of strict mode did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CutReport {
    /// Entries looked at.
    pub flows: usize,
    /// Entries deleted, by the direction whose policies deny them.
    pub cut: BTreeMap<CutDirection, u64>,
}

/// Deletes every conntrack entry `states` deny (see `crate::compile::strict`), and nothing else.
pub fn cut_denied_flows(states: &[(Family, DesiredState)]) -> Result<CutReport> {
    let local = local_addresses()?;
    let is_local = |ip: &IpAddr| local.contains(ip);
    let mut conntrack = Conntrack::open()?;
    let entries = conntrack.dump().context("conntrack dump")?;
    let mut report = CutReport {
        flows: entries.len(),
        ..Default::default()
    };
    let verdicts = judge(states, entries.iter().map(|e| &e.flow), &is_local)?;
    for (entry, verdict) in entries.iter().zip(verdicts) {
        if let Some(direction) = verdict
            && conntrack.delete(entry).context("conntrack delete")?
        {
            *report.cut.entry(direction).or_default() += 1;
        }
    }
    Ok(report)
}

/// Which direction denies each flow now, judged before anything is deleted. The evaluator panics
/// on a state the compiler never makes (a jump to a missing chain or set): that bug then cuts
/// nothing and comes back as an error, instead of killing the agent or cutting on a half-made
/// judgement.
fn judge<'f>(
    states: &[(Family, DesiredState)],
    flows: impl Iterator<Item = &'f Flow>,
    is_local: &dyn Fn(&IpAddr) -> bool,
) -> Result<Vec<Option<CutDirection>>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        flows.map(|f| denied_by(states, f, is_local)).collect()
    }))
    .map_err(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown");
        anyhow::anyhow!("judging flows against the new state failed (a bug; no flow cut): {what}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::ir::Hook;

    fn tcp_flow(src: &str, dst: &str) -> Flow {
        let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        let tuple = |src, dst, src_port, dst_port| FlowTuple {
            protocol: 6,
            src,
            dst,
            src_port,
            dst_port,
        };
        Flow {
            original: tuple(src, dst, 40000, 80),
            reply: tuple(dst, src, 80, 40000),
        }
    }

    #[test]
    fn a_state_the_evaluator_cannot_walk_cuts_nothing_and_says_so() {
        let broken = DesiredState {
            hooks: vec![Hook {
                builtin: "FORWARD",
                target: "KNI-MISSING".into(),
            }],
            ..DesiredState::default()
        };
        let flows = [tcp_flow("10.0.0.1", "10.0.0.2")];
        let no_local = |_: &IpAddr| false;
        let err = judge(&[(Family::V4, broken)], flows.iter(), &no_local)
            .expect_err("a missing chain is an error, not a verdict");
        assert!(err.to_string().contains("KNI-MISSING"), "{err}");
        assert!(err.to_string().contains("no flow cut"), "{err}");
        // A state it can walk: verdicts, one per flow.
        let fine = judge(
            &[(Family::V4, DesiredState::default())],
            flows.iter(),
            &no_local,
        )
        .unwrap();
        assert_eq!(fine, vec![None]);
    }
}
