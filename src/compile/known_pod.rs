//! What the peer index (peers.rs) keeps of each policy-relevant pod between compiles.

use super::ir::SetMember;
use super::selection::PodSelection;
use crate::model::{ContainerPort, Labels, Pod, Protocol};
use foldhash::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

/// What selections and named ports look at of a pod: not a copy of the whole pod, and its
/// labels shared with every other pod that has the same (a label map costs ~700 bytes).
pub(super) struct KnownPod {
    pub(super) namespace: String,
    labels: Arc<Labels>,
    pub(super) ips: Vec<IpAddr>,
    pub(super) ports: Vec<ContainerPort>,
}

impl KnownPod {
    pub(super) fn new(pod: &Pod, pool: &mut HashSet<Arc<Labels>>) -> KnownPod {
        let labels = match pool.get(&pod.labels) {
            Some(shared) => shared.clone(),
            None => {
                let labels = Arc::new(pod.labels.clone());
                pool.insert(labels.clone());
                labels
            }
        };
        KnownPod {
            namespace: pod.namespace.clone(),
            labels,
            ips: pod.ips.clone(),
            ports: pod.ports.clone(),
        }
    }

    /// Whether `pod` (of the same key) is the same to every selection and named port.
    pub(super) fn same_as(&self, pod: &Pod) -> bool {
        *self.labels == pod.labels
            && self.ips == pod.ips
            && self.ports == pod.ports
            && self.namespace == pod.namespace
    }

    pub(super) fn selected_by(
        &self,
        selection: &PodSelection,
        namespace_labels: Option<&Labels>,
    ) -> bool {
        selection.selects_labels(&self.namespace, &self.labels, namespace_labels)
    }

    pub(super) fn named_pairs<'p>(
        &'p self,
        port_name: &'p str,
        protocol: Protocol,
    ) -> impl Iterator<Item = SetMember> + 'p {
        pairs_of(&self.ips, &self.ports, port_name, protocol)
    }
}

/// The (address, protocol, port) pairs a named port resolves to, given a pod's addresses and ports.
pub(super) fn pairs_of<'p>(
    ips: &'p [IpAddr],
    ports: &'p [ContainerPort],
    port_name: &'p str,
    protocol: Protocol,
) -> impl Iterator<Item = SetMember> + 'p {
    ports
        .iter()
        .filter(move |cp| cp.name.as_deref() == Some(port_name) && cp.protocol == protocol)
        .flat_map(move |cp| {
            ips.iter()
                .map(move |ip| SetMember::IpPort(*ip, protocol, cp.port))
        })
}
