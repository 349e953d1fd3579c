//! A lab of network namespaces: nodes that route /32 and /128 pod routes over veth pairs (as
//! Calico-style routing CNIs do), pods that serve TCP and UDP on ports 80 and 81, and probes that
//! make real connections from inside a pod's namespace. Modelled on the upstream Kubernetes netpol
//! e2e suite: namespaces x, y, z with pods a, b, c.
//!
//! Servers and probes run on threads of the test process that have entered the namespace with
//! setns(2): sockets belong to the namespace they were created in.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
pub const PORTS: [u16; 2] = [80, 81];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Root-only tests call this first; without root they pass after saying loudly that nothing ran.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    assert!(
        std::env::var_os("KNI_E2E_REQUIRED").is_none(),
        "{test}: KNI_E2E_REQUIRED is set but we are not root, so the e2e suite cannot run"
    );
    eprintln!(
        "\n*** SKIPPED {test}: the network-namespace e2e tests need root (run hack/test.sh with sudo; CI runs as root) ***\n"
    );
    true
}

/// Runs a command (stdin empty) and returns its output, whether it succeeded or not.
fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

/// Runs a command; panics with its output if it fails.
pub fn sh(args: &[&str]) -> Output {
    let out = run(args);
    if !out.status.success() {
        panic!(
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs a command with `input` on its stdin (generated text never reaches a shell); panics with
/// its output if it fails.
pub fn run_with_stdin(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    // A tool that fails early closes its stdin: its output says why, not the broken pipe.
    let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    let out = child.wait_with_output().unwrap();
    // Benchmark payloads run to hundreds of thousands of lines: their start is enough to see.
    let head: Vec<&str> = input.lines().take(40).collect();
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}\ninput (first 40 lines):\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        head.join("\n")
    );
    out
}

/// Runs `ip -batch -` inside a namespace.
fn ip_batch(netns: &str, lines: &[String]) {
    run_with_stdin(
        &["ip", "netns", "exec", netns, "ip", "-batch", "-"],
        &lines.join("\n"),
    );
}

/// Creates a network namespace; fails if the name is taken (never someone else's).
pub fn add_netns(name: &str) {
    sh(&["ip", "netns", "add", name]);
}

/// A pod namespace wired to its node as Calico-style routing CNIs do: a veth pair (`eth0` in the
/// pod, `host_if` on the node), the pod's /32 and /128 on `eth0` with a default route via the
/// link-local gateway 169.254.1.1 / fe80::1 that the node answers on `host_if`, and host routes
/// to the pod's addresses on the node. The pod namespace is created here; the node's exists.
pub fn add_pod_netns(node_netns: &str, pod_netns: &str, host_if: &str, v4: Ipv4Addr, v6: Ipv6Addr) {
    add_netns(pod_netns);
    sysctl(
        pod_netns,
        &[
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ],
    );
    sh(&[
        "ip", "-n", node_netns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
        "netns", pod_netns,
    ]);
    ip_batch(
        pod_netns,
        &[
            "link set lo up".into(),
            "link set eth0 up".into(),
            format!("addr add {v4}/32 dev eth0"),
            format!("addr add {v6}/128 dev eth0 nodad"),
            "route add 169.254.1.1 dev eth0".into(),
            "route add default via 169.254.1.1 dev eth0".into(),
            "route add ::/0 via fe80::1 dev eth0".into(),
        ],
    );
    ip_batch(
        node_netns,
        &[
            format!("link set {host_if} up"),
            format!("addr add 169.254.1.1/32 dev {host_if}"),
            format!("addr add fe80::1/64 dev {host_if} nodad"),
            format!("route add {v4}/32 dev {host_if}"),
            format!("route add {v6}/128 dev {host_if}"),
        ],
    );
}

fn sysctl(netns: &str, settings: &[&str]) {
    let mut args = vec!["ip", "netns", "exec", netns, "sysctl", "-qw"];
    args.extend_from_slice(settings);
    sh(&args);
}

/// Runs `f` on a thread that has entered the network namespace `netns`.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

#[derive(Debug, Clone)]
pub struct LabNode {
    /// The Kubernetes node name.
    pub name: String,
    pub netns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

#[derive(Debug, Clone)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
    pub node: usize,
    pub netns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl LabPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// This pod as the (fake) API server holds it: running on node1, labelled `pod: NAME`, with
    /// both addresses; `spec_extra` is added to its spec (e.g. `containers: [{name: c}]`).
    pub fn api_manifest(&self, spec_extra: &str) -> String {
        let spec_extra = if spec_extra.is_empty() {
            String::new()
        } else {
            format!(", {spec_extra}")
        };
        format!(
            "metadata: {{name: {}, namespace: {}, labels: {{pod: {}}}}}\nspec: {{nodeName: node1{spec_extra}}}\nstatus: {{phase: Running, podIPs: [{{ip: {}}}, {{ip: '{}'}}]}}",
            self.name, self.namespace, self.name, self.v4, self.v6
        )
    }
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 { self.v6.into() } else { self.v4.into() }
    }
}

pub struct Lab {
    /// The agent binary under test (`env!("CARGO_BIN_EXE_kube-netpol-iptables")` in its tests).
    pub agent_bin: PathBuf,
    pub prefix: String,
    pub nodes: Vec<LabNode>,
    pub pods: Vec<LabPod>,
    pub manifests: PathBuf,
    /// The ports every pod serves on TCP and UDP (`PORTS` unless built with [`Lab::with_layout`]).
    pub ports: Vec<u16>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
}

static LAB_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Lab {
    /// `node_of(namespace, pod)` places each pod on a node (index into `node_count` nodes);
    /// `agent_bin` is the agent binary the lab's helpers run.
    pub fn new(
        agent_bin: impl Into<PathBuf>,
        node_count: usize,
        node_of: impl Fn(&str, &str) -> usize,
    ) -> Lab {
        let pods: Vec<(&str, &str)> = NAMESPACES
            .iter()
            .flat_map(|ns| PODS.iter().map(move |pod| (*ns, *pod)))
            .collect();
        let lab = Lab::with_layout(agent_bin, node_count, &pods, &PORTS, node_of);
        lab.write_cluster_manifests(&[]);
        lab
    }

    /// A lab with other pods (`(namespace, name)`, e.g. the ClusterNetworkPolicy conformance
    /// suite's) serving TCP and UDP on `ports`. Writes no manifests: the caller knows its labels.
    pub fn with_layout(
        agent_bin: impl Into<PathBuf>,
        node_count: usize,
        layout: &[(&str, &str)],
        ports: &[u16],
        node_of: impl Fn(&str, &str) -> usize,
    ) -> Lab {
        let id = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("kni{}-{id}", std::process::id() % 100_000);
        let manifests = std::env::temp_dir().join(format!("{prefix}-manifests"));
        let _ = std::fs::remove_dir_all(&manifests);
        std::fs::create_dir_all(&manifests).unwrap();

        let mut lab = Lab {
            agent_bin: agent_bin.into(),
            prefix: prefix.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            manifests,
            ports: ports.to_vec(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
        };
        for n in 0..node_count {
            let netns = format!("{prefix}-n{}", n + 1);
            add_netns(&netns);
            sysctl(
                &netns,
                &[
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                    // Rejected probes must fail fast: no rate limit on the ICMP errors REJECT sends.
                    "net.ipv4.icmp_ratelimit=0",
                    "net.ipv6.icmp.ratelimit=0",
                    "net.ipv4.icmp_msgs_per_sec=100000",
                    "net.ipv4.icmp_msgs_burst=100000",
                ],
            );
            lab.nodes.push(LabNode {
                name: format!("node{}", n + 1),
                netns,
                v4: Ipv4Addr::new(192, 168, 100, n as u8 + 1),
                v6: format!("fd00:100::{}", n + 1).parse().unwrap(),
            });
        }
        // Node addresses: a link between nodes (or, on a single node, a veth pair; no dummy module needed).
        let mut node_lines: Vec<Vec<String>> = vec![vec!["link set lo up".into()]; node_count];
        if node_count == 1 {
            node_lines[0].push("link add host0 type veth peer name host0p".into());
            node_lines[0].push("link set host0p up".into());
            node_lines[0].push("link set host0 up".into());
            node_lines[0].push(format!("addr add {}/24 dev host0", lab.nodes[0].v4));
            node_lines[0].push(format!("addr add {}/64 dev host0 nodad", lab.nodes[0].v6));
        } else {
            assert_eq!(node_count, 2, "the lab links one or two nodes");
            sh(&[
                "ip",
                "-n",
                &lab.nodes[0].netns,
                "link",
                "add",
                "peer",
                "type",
                "veth",
                "peer",
                "name",
                "peer",
                "netns",
                &lab.nodes[1].netns,
            ]);
            for (i, lines) in node_lines.iter_mut().enumerate() {
                let other = 1 - i;
                lines.push(format!("addr add {}/24 dev peer", lab.nodes[i].v4));
                lines.push(format!("addr add {}/64 dev peer nodad", lab.nodes[i].v6));
                lines.push("link set peer up".into());
                lines.push(format!(
                    "route add 10.244.{}.0/24 via {}",
                    other + 1,
                    lab.nodes[other].v4
                ));
                lines.push(format!(
                    "route add fd00:244:{}::/64 via {}",
                    other + 1,
                    lab.nodes[other].v6
                ));
            }
        }
        for (i, lines) in node_lines.iter().enumerate() {
            ip_batch(&lab.nodes[i].netns, lines);
        }
        {
            for (k, (ns, pod)) in layout.iter().enumerate() {
                let node = node_of(ns, pod);
                // Short names (interface names have 15 characters) for the long ones.
                let short = if ns.len() + pod.len() <= 4 {
                    format!("{ns}{pod}")
                } else {
                    format!("p{k}")
                };
                let netns = format!("{prefix}-{short}");
                let host_if = format!("v{short}");
                let k = (k + 2) as u8;
                let v4 = Ipv4Addr::new(10, 244, node as u8 + 1, k);
                let v6: Ipv6Addr = format!("fd00:244:{}::{k}", node + 1).parse().unwrap();
                add_pod_netns(&lab.nodes[node].netns, &netns, &host_if, v4, v6);
                lab.pods.push(LabPod {
                    namespace: ns.to_string(),
                    name: pod.to_string(),
                    node,
                    netns,
                    v4,
                    v6,
                });
            }
        }
        let targets: Vec<(String, String)> = lab
            .pods
            .iter()
            .map(|p| (p.netns.clone(), p.key()))
            .chain(lab.nodes.iter().map(|n| (n.netns.clone(), n.name.clone())))
            .collect();
        for (netns, who) in targets {
            lab.serve(&netns, &who);
        }
        lab
    }

    /// TCP and UDP servers on ports 80 and 81 (both families) that answer with `who`.
    fn serve(&mut self, netns: &str, who: &str) {
        for port in self.ports.clone() {
            let stop = self.stop.clone();
            let reply = who.to_string();
            let tcp = in_netns(netns, move || {
                TcpListener::bind(("::", port)).expect("bind tcp")
            })
            .join()
            .unwrap();
            tcp.set_nonblocking(true).unwrap();
            self.servers.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.write_all(reply.as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
            let stop = self.stop.clone();
            let reply = who.to_string();
            let udp = in_netns(netns, move || {
                UdpSocket::bind(("::", port)).expect("bind udp")
            })
            .join()
            .unwrap();
            udp.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            self.servers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(reply.as_bytes(), from);
                    }
                }
            }));
        }
    }

    pub fn pod(&self, key: &str) -> &LabPod {
        self.pods
            .iter()
            .find(|p| p.key() == key)
            .unwrap_or_else(|| panic!("no pod {key}"))
    }

    /// Namespace and Pod manifests for the lab, plus `extra` documents, replacing the directory.
    /// `extra_labels` adds `(namespace or pod key, key, value)` labels. Besides the upstream
    /// suite's serve-* ports, x/a names port 80 "web" and x/b and y/a name port 81 "web", so named
    /// ports resolve differently per pod.
    pub fn write_cluster_manifests_labelled(
        &self,
        extra: &[&str],
        extra_labels: &[(&str, &str, &str)],
    ) {
        let labels_of = |who: &str, base: String| {
            let mut l = vec![base];
            for (w, k, v) in extra_labels {
                if *w == who {
                    l.push(format!("{k}: {v}"));
                }
            }
            format!("{{{}}}", l.join(", "))
        };
        let mut docs = Vec::new();
        for ns in NAMESPACES {
            docs.push(format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels: {}\n",
                labels_of(ns, format!("ns: {ns}"))
            ));
        }
        for p in &self.pods {
            let web = match p.key().as_str() {
                "x/a" => "\n    - {name: web, containerPort: 80}",
                "x/b" | "y/a" => "\n    - {name: web, containerPort: 81}",
                _ => "",
            };
            docs.push(format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {labels}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: agnhost\n    ports:\n    - {{name: serve-80-tcp, containerPort: 80}}\n    - {{name: serve-81-tcp, containerPort: 81}}\n    - {{name: serve-80-udp, containerPort: 80, protocol: UDP}}\n    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}{web}\nstatus:\n  phase: Running\n  podIP: {v4}\n  podIPs: [{{ip: {v4}}}, {{ip: \"{v6}\"}}]\n",
                name = p.name,
                ns = p.namespace,
                labels = labels_of(&p.key(), format!("pod: {}", p.name)),
                node = self.nodes[p.node].name,
                v4 = p.v4,
                v6 = p.v6
            ));
        }
        self.write_file("cluster.yaml", &docs.join("---\n"));
        self.write_file("policies.yaml", &extra.join("\n---\n"));
    }

    pub fn write_cluster_manifests(&self, extra: &[&str]) {
        self.write_cluster_manifests_labelled(extra, &[]);
    }

    /// Writes a file atomically (write + rename), as a watcher must expect from tools.
    pub fn write_file(&self, name: &str, text: &str) {
        let tmp = self.manifests.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.manifests.join(name)).unwrap();
    }

    pub fn agent(&self, node: usize, args: &[&str]) -> Output {
        let bin = self.agent_bin.to_str().unwrap();
        let mut full: Vec<&str> = vec!["netns", "exec", &self.nodes[node].netns, bin];
        full.extend_from_slice(args);
        Command::new("ip")
            .args(&full)
            .stdin(Stdio::null())
            .output()
            .expect("run agent")
    }

    /// `run --once` on every node; panics with the agent's output if it fails.
    pub fn sync_all(&self, backend: &str) {
        for (i, node) in self.nodes.iter().enumerate() {
            let out = self.agent(
                i,
                &[
                    "run",
                    "--manifests",
                    self.manifests.to_str().unwrap(),
                    "--node-name",
                    &node.name,
                    "--once",
                    "--backend",
                    backend,
                    // The matrices judge which probes pass; a refused probe answers at once where
                    // a dropped one waits out its timeout (e2e_strict.rs covers drop, the default).
                    "--deny-action",
                    "reject",
                ],
            );
            assert!(
                out.status.success(),
                "agent on {} failed:\n{}",
                node.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.forget_flows();
    }

    /// Policies judge new flows; flows already in conntrack go on (as with every iptables-based
    /// agent). A probe reusing an earlier probe's UDP source port would ride the old entry, so
    /// each step of a test starts with an empty conntrack table.
    pub fn forget_flows(&self) {
        for node in &self.nodes {
            let out = Command::new("ip")
                .args(["netns", "exec", &node.netns, "conntrack", "-F"])
                .output()
                .expect("conntrack (install the conntrack package)");
            assert!(
                out.status.success(),
                "conntrack -F: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// `ipset restore` of `text` in node `node`'s namespace.
    pub fn ipset_restore(&self, node: usize, text: &str) {
        run_with_stdin(
            &[
                "ip",
                "netns",
                "exec",
                &self.nodes[node].netns,
                "ipset",
                "restore",
            ],
            text,
        );
    }

    /// Runs `args` in a node's namespace and returns its output; panics if it fails.
    ///
    /// An `*-save` that fails is tried again for a while first: the legacy tools read a table,
    /// then resolve each rule's set by its index, and fail ("Set with index N in kernel doesn't
    /// exist") when an agent syncing at that moment destroyed the set in between.
    pub fn node_cmd(&self, node: usize, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.nodes[node].netns];
        full.extend_from_slice(args);
        if args.first().is_some_and(|tool| tool.ends_with("-save")) {
            for _ in 0..10 {
                let out = run(&full);
                if out.status.success() {
                    return String::from_utf8_lossy(&out.stdout).into_owned();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        String::from_utf8_lossy(&sh(&full).stdout).into_owned()
    }

    pub fn manifests_dir(&self) -> &Path {
        &self.manifests
    }

    /// A new TCP connection over IPv4 from one pod to another (conntrack emptied first).
    pub fn tcp(&self, from: &str, to: &str, port: u16) -> bool {
        self.forget_flows();
        probe(
            &self.pod(from).netns,
            self.pod(to).ip(false),
            Proto::Tcp,
            port,
        )
    }

    /// Everything of ours on node 1: rules of both families (without counters) and `ipset save`.
    pub fn our_state(&self, backend: &str) -> String {
        let mut out = String::new();
        for tool in ["iptables", "ip6tables"] {
            let save = self.node_cmd(0, &[&format!("{tool}-{backend}-save"), "-t", "filter"]);
            for line in save
                .lines()
                .filter(|l| l.contains("KNI-") && !l.starts_with('#'))
            {
                out.push_str(line.split(" [").next().unwrap());
                out.push('\n');
            }
        }
        out + &self.node_cmd(0, &["ipset", "save"])
    }

    fn agent_args<'a>(&'a self, dir: &'a str, backend: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let bin = self.agent_bin.to_str().unwrap();
        let mut args = vec![
            "netns",
            "exec",
            &self.nodes[0].netns,
            bin,
            "run",
            "--manifests",
            dir,
            "--node-name",
            "node1",
            "--backend",
            backend,
        ];
        args.extend_from_slice(extra);
        args
    }

    /// `run --once` on node 1 with extra environment (e.g. a PATH with shims) and arguments.
    pub fn once(&self, backend: &str, env: &[(&str, String)], extra: &[&str]) -> Output {
        let dir = self.manifests.to_str().unwrap().to_string();
        let mut args = self.agent_args(&dir, backend, extra);
        args.push("--once");
        let mut cmd = Command::new("ip");
        cmd.args(&args).stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run agent")
    }

    /// The agent running on node 1 until killed, logging to `agent.log` in the manifests directory.
    pub fn spawn_agent(&self, backend: &str, extra: &[&str]) -> AgentProcess {
        let dir = self.manifests.to_str().unwrap().to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.manifests.join("agent.log"))
            .unwrap();
        AgentProcess(
            Command::new("ip")
                .args(self.agent_args(&dir, backend, extra))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    /// The agent in Kubernetes mode on node 1 (`NODE_NAME=node1`), reading the API through
    /// `kubeconfig` (written to the manifests directory), log in `agent.log`.
    pub fn spawn_kube_agent(
        &self,
        kubeconfig: &str,
        backend: &str,
        extra: &[&str],
    ) -> AgentProcess {
        let path = self.manifests.join("kubeconfig.conf");
        std::fs::write(&path, kubeconfig).unwrap();
        let log = std::fs::File::create(self.manifests.join("agent.log")).unwrap();
        AgentProcess(
            Command::new("ip")
                .args(["netns", "exec", &self.nodes[0].netns])
                .arg(&self.agent_bin)
                .args(["run", "--kubeconfig", path.to_str().unwrap()])
                .args(["--backend", backend])
                .args(extra)
                .env("NODE_NAME", "node1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    /// A TCP listener on 127.0.0.1 (any port) inside node `node`'s namespace, where the agent
    /// under test runs (e.g. for a fake API server).
    pub fn loopback_listener(&self, node: usize) -> TcpListener {
        in_netns(&self.nodes[node].netns, || {
            TcpListener::bind("127.0.0.1:0").unwrap()
        })
        .join()
        .unwrap()
    }

    /// A directory with executable shims that stand in for tools (`(name, script)`), and a PATH
    /// that finds them first.
    pub fn shims(&self, tools: &[(&str, &str)]) -> (PathBuf, String) {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.manifests.with_extension("shims");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, script) in tools {
            let p = dir.join(name);
            std::fs::write(&p, script).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let path = format!(
            "{}:{}",
            dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        (dir, path)
    }

    /// What `render` prints for node 1 and the current manifests.
    /// `explain --output json` of one flow (`protocol` "TCP" or "UDP"), from the lab's manifests.
    pub fn explain_json(
        &self,
        from: &str,
        to: &str,
        port: u16,
        protocol: &str,
        v6: bool,
    ) -> serde_json::Value {
        let port = port.to_string();
        let out = Command::new(&self.agent_bin)
            .arg("explain")
            .arg("--manifests")
            .arg(&self.manifests)
            .args(["--from", from, "--to", to, "--port", &port])
            .args(["--protocol", protocol])
            .args(["--family", if v6 { "6" } else { "4" }, "--output", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "explain {from} -> {to} {protocol}/{port} v6={v6} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn render(&self) -> String {
        let out = self.agent(
            0,
            &[
                "render",
                "--manifests",
                self.manifests.to_str().unwrap(),
                "--node-name",
                "node1",
            ],
        );
        assert!(
            out.status.success(),
            "render: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.manifests.join("agent.log")).unwrap_or_default()
    }
}

/// A running agent that is killed when dropped, so a failing test never leaves one behind.
pub struct AgentProcess(pub std::process::Child);

impl std::ops::Deref for AgentProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for AgentProcess {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Polls `ok` until it holds; panics after `limit`. Returns how long it took.
pub fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = std::time::Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// An HTTP GET of the agent's endpoints (127.0.0.1:9847) from inside `netns`: (status, response).
pub fn http_get(netns: &str, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    in_netns(netns, move || {
        let mut s =
            TcpStream::connect_timeout(&"127.0.0.1:9847".parse().unwrap(), Duration::from_secs(1))
                .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some((text.split_whitespace().nth(1)?.parse().ok()?, text))
    })
    .join()
    .unwrap()
}

/// `count` Running pods of `namespace` on a node that is not in the lab (peers only), with IPv4
/// and IPv6 addresses outside the lab's ranges.
pub fn remote_pods(namespace: &str, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: {namespace}}}\nspec: {{nodeName: far}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.{}.{}.{}}}, {{ip: 'fd00:50::{:x}'}}]}}",
                50 + i / 65536,
                (i / 256) % 256,
                i % 256,
                i + 1
            )
        })
        .collect()
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
        for ns in self
            .pods
            .iter()
            .map(|p| &p.netns)
            .chain(self.nodes.iter().map(|n| &n.netns))
        {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}

/// One real connection attempt from inside `netns`: TCP connect and read the answer, or a UDP
/// datagram and its echo. True if the server answered.
pub fn probe(netns: &str, target: IpAddr, proto: Proto, port: u16) -> bool {
    in_netns(netns, move || probe_here(target, proto, port))
        .join()
        .unwrap()
}

pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

fn probe_here(target: IpAddr, proto: Proto, port: u16) -> bool {
    let addr = SocketAddr::new(target, port);
    let mut buf = [0u8; 64];
    match proto {
        Proto::Tcp => match TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
                matches!(s.read(&mut buf), Ok(n) if n > 0)
            }
            Err(_) => false,
        },
        Proto::Udp => {
            let bind: SocketAddr = if target.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let s = UdpSocket::bind(bind).unwrap();
            s.set_read_timeout(Some(PROBE_TIMEOUT)).unwrap();
            if s.connect(addr).is_err() || s.send(b"ping").is_err() {
                return false;
            }
            matches!(s.recv(&mut buf), Ok(n) if n > 0)
        }
    }
}

/// One probe of a matrix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Probe {
    pub from: String,
    pub to: String,
    pub proto: Proto,
    pub port: u16,
    pub v6: bool,
}

/// Probes every ordered pair of distinct pods on every port, protocol and family, in parallel,
/// and returns the probes whose outcome differs from `expect`, described.
pub fn check_matrix(lab: &Lab, expect: &dyn Fn(&Probe) -> bool) -> Vec<String> {
    let mut probes = Vec::new();
    for from in &lab.pods {
        for to in &lab.pods {
            if from.key() == to.key() {
                continue;
            }
            for proto in [Proto::Tcp, Proto::Udp] {
                for &port in &lab.ports {
                    for v6 in [false, true] {
                        probes.push(Probe {
                            from: from.key(),
                            to: to.key(),
                            proto,
                            port,
                            v6,
                        });
                    }
                }
            }
        }
    }
    run_probes(lab, probes, expect)
}

pub fn run_probes(lab: &Lab, probes: Vec<Probe>, expect: &dyn Fn(&Probe) -> bool) -> Vec<String> {
    let mut wrong = Vec::new();
    for chunk in probes.chunks(48) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|p| {
                let from = lab.pod(&p.from).netns.clone();
                let target = lab.pod(&p.to).ip(p.v6);
                let (proto, port) = (p.proto, p.port);
                in_netns(&from, move || probe_here(target, proto, port))
            })
            .collect();
        for (p, h) in chunk.iter().zip(handles) {
            let got = h.join().unwrap();
            let want = expect(p);
            if got != want {
                wrong.push(format!(
                    "{} -> {} {:?}/{} {}: expected {}, got {}",
                    p.from,
                    p.to,
                    p.proto,
                    p.port,
                    if p.v6 { "IPv6" } else { "IPv4" },
                    if want { "allowed" } else { "blocked" },
                    if got { "allowed" } else { "blocked" }
                ));
            }
        }
    }
    wrong.sort();
    wrong
}
