//! Tells at start whether another NetworkPolicy engine's nftables table is on this node.
//!
//! kube-network-policies (table `kube-network-policies`) and kind's kindnetd, which embeds it
//! (table `kindnet-network-policies`), send new connections of policy-selected pods to an nfqueue
//! with the `bypass` flag (fail-open). Where such a table exists and a process listens on a
//! queue, both engines enforce: a packet passes only where both allow it. Where the table exists
//! but nobody listens, the bypass accepts everything and that engine enforces nothing.
//!
//! Reading is one netlink dump of the nf_tables tables (all families) and one read of
//! `/proc/net/netfilter/nfnetlink_queue`; nothing is written and no program is run.

use anyhow::{Context, Result, bail};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::nftables::{NfTablesMessage, TableAttribute, TableMessage};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// nftables tables created by other NetworkPolicy engines, and who creates them.
pub const KNOWN_ENGINE_TABLES: [(&str, &str); 2] = [
    ("kube-network-policies", "kube-network-policies"),
    (
        "kindnet-network-policies",
        "kindnetd (kind's default CNI, which embeds kube-network-policies)",
    ),
];

/// One nftables table: its family as `nft` spells it, and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftTable {
    pub family: String,
    pub name: String,
}

/// What was found about one other engine, ready to be logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub table: NftTable,
    pub engine: &'static str,
    /// True when some process listens on an nfqueue, i.e. the engine can enforce.
    pub enforcing: bool,
}

impl Finding {
    pub fn message(&self) -> String {
        let t = &self.table;
        if self.enforcing {
            format!(
                "nftables table {} {} of another NetworkPolicy engine ({}) is present and an nfqueue listener is bound: both engines enforce NetworkPolicy on this node, so a packet passes only where both allow it (they implement the same v1 semantics)",
                t.family, t.name, self.engine
            )
        } else {
            format!(
                "nftables table {} {} of another NetworkPolicy engine ({}) is present but no process listens on an nfqueue: its queue rules are fail-open (bypass), so it enforces nothing and this agent is the only enforcer on this node",
                t.family, t.name, self.engine
            )
        }
    }
}

/// The other engines' tables among `tables`; `bound_queues` are the queue numbers that have a
/// listener (from `/proc/net/netfilter/nfnetlink_queue`; empty when the file is absent).
pub fn assess(tables: &[NftTable], bound_queues: &[u16]) -> Vec<Finding> {
    tables
        .iter()
        .filter_map(|t| {
            let (_, engine) = KNOWN_ENGINE_TABLES
                .iter()
                .find(|(name, _)| *name == t.name)?;
            Some(Finding {
                table: t.clone(),
                engine,
                enforcing: !bound_queues.is_empty(),
            })
        })
        .collect()
}

/// Queue numbers with a listener, from `/proc/net/netfilter/nfnetlink_queue` (one line per bound
/// queue; the first field is the queue number).
pub fn parse_bound_queues(text: &str) -> Vec<u16> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The family name `nft list tables` prints for an nfgenmsg family.
fn family_name(f: NetfilterProtoFamily) -> String {
    match f {
        NetfilterProtoFamily::Inet => "inet".into(),
        NetfilterProtoFamily::IPv4 => "ip".into(),
        NetfilterProtoFamily::IPv6 => "ip6".into(),
        NetfilterProtoFamily::ARP => "arp".into(),
        NetfilterProtoFamily::Bridge => "bridge".into(),
        NetfilterProtoFamily::NetDev => "netdev".into(),
        other => format!("family-{}", u8::from(other)),
    }
}

/// Every nftables table of this network namespace, all families, by one netlink dump.
pub fn list_tables() -> Result<Vec<NftTable>> {
    let mut socket = Socket::new(NETLINK_NETFILTER).context("netlink socket")?;
    socket.bind_auto().context("netlink bind")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("netlink connect")?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            NfTablesMessage::GetTable(TableMessage { attributes: vec![] }),
        )),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).context("netlink send")?;

    let mut tables = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full().context("netlink receive")?;
        if datagram.is_empty() {
            bail!("netlink: empty answer");
        }
        let mut rest = &datagram[..];
        while !rest.is_empty() {
            let message = NetlinkMessage::<NetfilterMessage>::deserialize(rest)
                .map_err(|e| anyhow::anyhow!("netlink: cannot decode an answer: {e}"))?;
            let len = (message.header.length as usize).min(rest.len());
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(tables),
                NetlinkPayload::Error(e) => bail!("netlink: {}", e.to_io()),
                NetlinkPayload::InnerMessage(m) => {
                    if let NetfilterMessageInner::NfTables(NfTablesMessage::NewTable(t)) = m.inner
                        && let Some(name) = t.attributes.iter().find_map(|a| match a {
                            TableAttribute::Name(n) => Some(n.clone()),
                            _ => None,
                        })
                    {
                        tables.push(NftTable {
                            family: family_name(m.header.family),
                            name,
                        });
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

/// Logs, once at start, which other policy engines' tables are on this node and what that means.
pub fn report() {
    let tables = match list_tables() {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(
                "could not check for another NetworkPolicy engine's nftables table (kube-network-policies, kindnet-network-policies): {e:#}"
            );
            return;
        }
    };
    let queues = std::fs::read_to_string("/proc/net/netfilter/nfnetlink_queue")
        .map(|t| parse_bound_queues(&t))
        .unwrap_or_default();
    let findings = assess(&tables, &queues);
    if findings.is_empty() {
        // Said at info: on WSL2 with kind's default CNI this line is how a user sees that kindnetd's
        // table did not load and this agent is the only enforcer.
        tracing::info!(
            "no other NetworkPolicy engine's nftables table (kube-network-policies, kindnet-network-policies) on this node: this agent is the only NetworkPolicy engine here"
        );
    }
    for f in findings {
        tracing::warn!(bound_queues = ?queues, "{}", f.message());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(family: &str, name: &str) -> NftTable {
        NftTable {
            family: family.into(),
            name: name.into(),
        }
    }

    #[test]
    fn finds_both_engines_in_any_family_and_ignores_other_tables() {
        let tables = [
            table("ip", "filter"),
            table("inet", "kube-network-policies"),
            table("ip6", "kindnet-network-policies"),
            table("inet", "kube-network-policies-not"),
        ];
        let found = assess(&tables, &[100]);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].table, tables[1]);
        assert_eq!(found[0].engine, "kube-network-policies");
        assert_eq!(found[1].table, tables[2]);
        assert!(found[1].engine.starts_with("kindnetd"));
        assert!(found.iter().all(|f| f.enforcing));
        assert!(found[0].message().contains("both engines enforce"));
    }

    #[test]
    fn a_table_without_a_queue_listener_enforces_nothing() {
        let found = assess(&[table("inet", "kindnet-network-policies")], &[]);
        assert_eq!(found.len(), 1);
        assert!(!found[0].enforcing);
        let m = found[0].message();
        assert!(m.contains("inet kindnet-network-policies"), "{m}");
        assert!(m.contains("enforces nothing"), "{m}");
    }

    #[test]
    fn no_engine_tables_no_findings() {
        assert!(assess(&[table("ip", "nat"), table("inet", "firewalld")], &[101]).is_empty());
    }

    #[test]
    fn bound_queues_from_proc() {
        // Format of /proc/net/netfilter/nfnetlink_queue: queue number, peer portid, queue length,
        // copy mode, copy range, queue dropped, user dropped, last id, 1.
        let text =
            "  100  12345     0 2   128     0     0        7  1\n  101 4242 0 2 128 0 0 0 1\n";
        assert_eq!(parse_bound_queues(text), vec![100, 101]);
        assert!(parse_bound_queues("").is_empty());
    }
}
