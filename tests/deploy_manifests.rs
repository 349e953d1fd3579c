//! Every deployment manifest parses into its k8s-openapi type, the agent's arguments parse with
//! the real command line, RBAC grants exactly what the agent watches, and image tags match the
//! crate version.

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Resource;
use kube_netpol_iptables::cli::{Cli, Command};
use kube_netpol_iptables::metrics::DEFAULT_BIND;
use kube_netpol_iptables::source::convert::{ClusterNetworkPolicy, cluster_policy};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(yaml_files(&p));
        } else if p.extension().is_some_and(|e| e == "yaml") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Every document of every manifest, parsed strictly into its type.
enum Doc {
    Sa(ServiceAccount),
    Role(ClusterRole),
    Binding(ClusterRoleBinding),
    Ds(Box<DaemonSet>),
    Other(serde_json::Value),
}

fn docs(file: &Path) -> Vec<Doc> {
    docs_of(&std::fs::read_to_string(file).unwrap(), file)
}

/// The documents of `text`, read from `file` (named in failures).
fn docs_of(text: &str, file: &Path) -> Vec<Doc> {
    let mut out = Vec::new();
    for d in serde_yaml_ng::Deserializer::from_str(text) {
        let v =
            serde_json::Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if v.is_null() {
            continue;
        }
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        fn typed<T: serde::de::DeserializeOwned>(
            v: serde_json::Value,
            file: &Path,
            kind: &str,
        ) -> T {
            serde_json::from_value(v).unwrap_or_else(|e| panic!("{} ({kind}): {e}", file.display()))
        }
        out.push(match kind.as_str() {
            "ServiceAccount" => Doc::Sa(typed(v, file, &kind)),
            "ClusterRole" => Doc::Role(typed(v, file, &kind)),
            "ClusterRoleBinding" => Doc::Binding(typed(v, file, &kind)),
            "DaemonSet" => Doc::Ds(Box::new(typed(v, file, &kind))),
            "Namespace" => {
                let _: Namespace = typed(v, file, &kind);
                continue;
            }
            "Pod" => {
                let _: Pod = typed(v, file, &kind);
                continue;
            }
            "ConfigMap" => {
                let _: ConfigMap = typed(v, file, &kind);
                continue;
            }
            "NetworkPolicy" => {
                let _: NetworkPolicy = typed(v, file, &kind);
                continue;
            }
            // Examples must be what the agent accepts.
            "ClusterNetworkPolicy" => {
                let p: ClusterNetworkPolicy = typed(v, file, &kind);
                cluster_policy(&p).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                continue;
            }
            "Kustomization" | "Cluster" | "List" => Doc::Other(v),
            other => panic!("{}: unexpected kind {other:?}", file.display()),
        });
    }
    out
}

fn all_docs() -> Vec<(PathBuf, Doc)> {
    yaml_files(&root().join("manifests"))
        .into_iter()
        .flat_map(|f| docs(&f).into_iter().map(move |d| (f.clone(), d)))
        .collect()
}

fn agent_containers() -> Vec<(PathBuf, Container)> {
    all_docs()
        .into_iter()
        .filter_map(|(f, d)| match d {
            Doc::Ds(ds) => Some((f, ds)),
            _ => None,
        })
        .flat_map(|(f, ds)| {
            ds.spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .containers
                .into_iter()
                .filter(|c| c.name == "kube-netpol-iptables")
                .map(move |c| (f.clone(), c))
        })
        .collect()
}

#[test]
fn every_manifest_parses_and_the_agent_is_deployed_twice() {
    let containers = agent_containers();
    let files: Vec<String> = containers
        .iter()
        .map(|(f, _)| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files,
        ["daemonset.yaml", "sidecar.yaml"],
        "standalone DaemonSet and Flannel sidecar"
    );
}

#[test]
fn container_args_parse_with_the_real_command_line() {
    for (file, c) in agent_containers() {
        check_agent_container(&file.display().to_string(), c);
    }
}

/// The agent's container: `run` against the API with args the real CLI accepts, probes on the
/// metrics port, the node name from the downward API, only the capabilities it needs, and the
/// xtables lock and kernel modules mounted.
fn check_agent_container(what: &str, c: Container) {
    let mut argv = vec!["kube-netpol-iptables".to_string()];
    argv.extend(c.args.clone().unwrap_or_default());
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{what}: {e}"));
    let Command::Run {
        manifests,
        metrics_bind_address,
        ..
    } = cli.command
    else {
        panic!("{what}: the container must run `run`");
    };
    assert!(
        manifests.is_none(),
        "in a cluster the agent watches the API"
    );
    let port: i32 = metrics_bind_address
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(metrics_bind_address, DEFAULT_BIND);
    for probe in [
        c.liveness_probe.as_ref().unwrap(),
        c.readiness_probe.as_ref().unwrap(),
    ] {
        let get = probe.http_get.as_ref().unwrap();
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port)
        );
    }
    assert_eq!(
        c.liveness_probe.unwrap().http_get.unwrap().path.as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        c.readiness_probe.unwrap().http_get.unwrap().path.as_deref(),
        Some("/readyz")
    );
    let env = c.env.unwrap();
    let node = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let sc = c.security_context.unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps: BTreeSet<String> = sc.capabilities.unwrap().add.unwrap().into_iter().collect();
    assert_eq!(
        caps,
        BTreeSet::from(["NET_ADMIN".to_string(), "NET_RAW".to_string()])
    );
    let mounts: Vec<(String, String, bool)> = c
        .volume_mounts
        .unwrap()
        .into_iter()
        .map(|m| (m.name, m.mount_path, m.read_only.unwrap_or(false)))
        .collect();
    assert!(
        mounts.contains(&("xtables-lock".into(), "/run/xtables.lock".into(), false)),
        "{mounts:?}"
    );
    assert!(
        mounts.contains(&("lib-modules".into(), "/lib/modules".into(), true)),
        "{mounts:?}"
    );
    assert!(c.resources.unwrap().requests.is_some());
}

#[test]
fn the_standalone_daemonset_runs_everywhere_with_node_critical_priority() {
    for (file, d) in all_docs() {
        if let Doc::Ds(ds) = d
            && file.ends_with("manifests/daemonset.yaml")
        {
            let spec = ds.spec.unwrap().template.spec.unwrap();
            assert_eq!(spec.host_network, Some(true));
            assert_eq!(
                spec.priority_class_name.as_deref(),
                Some("system-node-critical")
            );
            let tolerations = spec.tolerations.unwrap();
            assert!(
                tolerations
                    .iter()
                    .any(|t| t.operator.as_deref() == Some("Exists")
                        && t.key.is_none()
                        && t.effect.is_none())
            );
            let volumes = spec.volumes.unwrap();
            let xtables = volumes
                .iter()
                .find(|v| v.name == "xtables-lock")
                .unwrap()
                .host_path
                .clone()
                .unwrap();
            assert_eq!(
                (xtables.path.as_str(), xtables.type_.as_deref()),
                ("/run/xtables.lock", Some("FileOrCreate"))
            );
            return;
        }
    }
    panic!("manifests/daemonset.yaml has no DaemonSet");
}

/// (apiGroup, resource) of every kind the agent watches, from the same types its source uses.
fn watched() -> BTreeSet<(String, String)> {
    fn of<K: Resource<DynamicType = ()>>() -> (String, String) {
        (K::group(&()).into_owned(), K::plural(&()).into_owned())
    }
    BTreeSet::from([
        of::<Pod>(),
        of::<Namespace>(),
        of::<NetworkPolicy>(),
        of::<Node>(),
        of::<ClusterNetworkPolicy>(),
    ])
}

#[test]
fn cluster_roles_grant_exactly_list_and_watch_of_what_the_agent_watches() {
    let mut roles = 0;
    for (file, d) in all_docs() {
        let Doc::Role(role) = d else { continue };
        roles += 1;
        let mut granted = BTreeSet::new();
        for rule in role.rules.unwrap() {
            let verbs: BTreeSet<String> = rule.verbs.into_iter().collect();
            assert_eq!(
                verbs,
                BTreeSet::from(["list".to_string(), "watch".to_string()]),
                "{}",
                file.display()
            );
            assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
            for group in rule.api_groups.unwrap() {
                for resource in rule.resources.clone().unwrap() {
                    granted.insert((group.clone(), resource));
                }
            }
        }
        assert_eq!(granted, watched(), "{}", file.display());
    }
    assert_eq!(roles, 2, "standalone and Flannel");
}

#[test]
fn bindings_name_the_service_accounts_that_run_the_agent() {
    let mut subjects = BTreeSet::new();
    let mut accounts = BTreeSet::new();
    for (_, d) in all_docs() {
        match d {
            Doc::Binding(b) => {
                // Each deployment binds a role of its own name: deleting one never breaks the other.
                assert_eq!(b.role_ref.name, b.metadata.name.clone().unwrap());
                for s in b.subjects.unwrap() {
                    subjects.insert((s.namespace.unwrap(), s.name));
                }
            }
            Doc::Sa(sa) => {
                accounts.insert((sa.metadata.namespace.unwrap(), sa.metadata.name.unwrap()));
            }
            _ => {}
        }
    }
    assert!(subjects.is_superset(&accounts));
    assert!(subjects.contains(&("kube-flannel".into(), "flannel".into())));
}

#[test]
fn image_tags_match_the_crate_version() {
    let version = env!("CARGO_PKG_VERSION");
    let want = format!("kube-netpol-iptables:{version}");
    for (file, c) in agent_containers() {
        assert_eq!(
            c.image.as_deref(),
            Some(want.as_str()),
            "{}",
            file.display()
        );
    }
    let containerfile = std::fs::read_to_string(root().join("Containerfile")).unwrap();
    assert!(
        containerfile.contains(&format!("-t {want}")),
        "Containerfile's build command"
    );
    let deploy = std::fs::read_to_string(root().join("docs/deploy.md")).unwrap();
    for line in deploy
        .lines()
        .filter(|l| l.contains("kube-netpol-iptables:"))
    {
        assert!(
            line.contains(&want),
            "docs/deploy.md names another tag: {line}"
        );
    }
}

#[test]
fn kustomizations_reference_existing_files_and_kind_config_is_a_cluster() {
    let mut kustomizations = 0;
    let mut kind_clusters = 0;
    for (file, d) in all_docs() {
        let Doc::Other(v) = d else { continue };
        let dir = file.parent().unwrap();
        match v["kind"].as_str() {
            Some("Kustomization") => {
                kustomizations += 1;
                let mut paths: Vec<String> = Vec::new();
                for r in v["resources"].as_array().unwrap() {
                    paths.push(r.as_str().unwrap().to_string());
                }
                for p in v["patches"].as_array().into_iter().flatten() {
                    paths.push(p["path"].as_str().unwrap().to_string());
                }
                for p in paths.iter().filter(|p| !p.starts_with("https://")) {
                    assert!(
                        dir.join(p).is_file(),
                        "{} references missing {p}",
                        file.display()
                    );
                }
            }
            Some("Cluster") => {
                kind_clusters += 1;
                assert_eq!(v["apiVersion"], "kind.x-k8s.io/v1alpha4");
                let nodes = v["nodes"].as_array().unwrap();
                assert!(!nodes.is_empty());
                // Only a config without kind's CNI may mount extra plugins; every node needs them.
                let mounts: Vec<usize> = nodes
                    .iter()
                    .map(|n| n["extraMounts"].as_array().map_or(0, Vec::len))
                    .collect();
                if v["networking"]["disableDefaultCNI"] == true {
                    assert!(mounts.iter().all(|&m| m > 0), "{}", file.display());
                } else {
                    assert!(mounts.iter().all(|&m| m == 0), "{}", file.display());
                }
            }
            _ => {}
        }
    }
    assert_eq!((kustomizations, kind_clusters), (2, 2));
}

/// kind with Flannel: no kindnetd, pod CIDRs from Flannel's network, and the `bridge` plugin that
/// Flannel's CNI plugin delegates to (kind's node image has host-local, loopback, ptp and portmap
/// only) mounted into every node's CNI directory.
#[test]
fn kind_flannel_config_has_no_default_cni_and_brings_the_bridge_plugin() {
    let text = std::fs::read_to_string(root().join("manifests/kind/cluster-flannel.yaml")).unwrap();
    let v: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(v["networking"]["disableDefaultCNI"], true);
    assert_eq!(v["networking"]["podSubnet"], FLANNEL_NETWORK);
    for node in v["nodes"].as_array().unwrap() {
        let mounts = node["extraMounts"].as_array().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m["containerPath"] == "/opt/cni/bin/bridge"
                    && m["hostPath"]
                        .as_str()
                        .is_some_and(|p| p.ends_with("/bridge"))),
            "{node}"
        );
    }
    let kindnet = std::fs::read_to_string(root().join("manifests/kind/cluster.yaml")).unwrap();
    let v: serde_json::Value = serde_yaml_ng::from_str(&kindnet).unwrap();
    assert!(
        v["networking"]["disableDefaultCNI"].is_null(),
        "kind's default CNI"
    );
}

/// The kube-flannel.yml release that manifests/flannel pins, and the upstream copy of it that
/// stands in for the download in tests (`../shared/fixtures` beside the clone, or
/// `$KNI_SHARED_DIR/fixtures`): data we test against, never committed here.
const FLANNEL_RELEASE: &str = "v0.28.9";

/// The "Network" of net-conf.json in kube-flannel.yml, which kind's podSubnet must match.
const FLANNEL_NETWORK: &str = "10.244.0.0/16";

fn flannel_fixture() -> PathBuf {
    let shared = std::env::var_os("KNI_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared"));
    shared.join(format!(
        "fixtures/flannel/kube-flannel-{FLANNEL_RELEASE}.yml"
    ))
}

/// A `kubectl` whose built-in kustomize can render manifests/flannel ($KUBECTL, else PATH).
fn kubectl() -> Option<String> {
    let bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let ok = std::process::Command::new(&bin)
        .args(["kustomize", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(bin)
}

/// `kubectl kustomize manifests/flannel` with the pinned upstream manifest read from the fixture
/// instead of the network; None (after saying SKIPPED loudly) when the fixture is absent.
fn render_flannel_kustomization(test: &str) -> Option<String> {
    let fixture = flannel_fixture();
    if !fixture.is_file() {
        eprintln!(
            "\n*** SKIPPED {test}: the upstream Flannel manifest {} is absent (it lives in shared/ beside the clone, or set KNI_SHARED_DIR) ***\n",
            fixture.display()
        );
        return None;
    }
    let Some(kubectl) = kubectl() else {
        assert!(
            std::env::var_os("KNI_E2E_REQUIRED").is_none(),
            "{test}: KNI_E2E_REQUIRED is set and the fixture is present, but there is no kubectl with kustomize (hack/lib.sh's ensure_kubectl installs one)"
        );
        eprintln!(
            "\n*** SKIPPED {test}: no kubectl with kustomize (run hack/test.sh, which installs one) ***\n"
        );
        return None;
    };
    let pinned = format!(
        "https://github.com/flannel-io/flannel/releases/download/{FLANNEL_RELEASE}/kube-flannel.yml"
    );
    let dir = std::env::temp_dir().join(format!("kni-flannel-render-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(root().join("manifests/flannel")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    let remote: Vec<&str> = kustomization
        .lines()
        .filter(|l| l.contains("://"))
        .collect();
    assert_eq!(
        remote,
        [format!("- {pinned}")],
        "manifests/flannel must pin kube-flannel.yml {FLANNEL_RELEASE} and fetch nothing else"
    );
    std::fs::copy(&fixture, dir.join("kube-flannel.yml")).unwrap();
    std::fs::write(
        dir.join("kustomization.yaml"),
        kustomization.replace(&pinned, "kube-flannel.yml"),
    )
    .unwrap();
    let out = std::process::Command::new(&kubectl)
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("run kubectl kustomize");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "kubectl kustomize manifests/flannel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn flannel_kustomization_renders_one_engine_beside_kube_flannel() {
    let test = "flannel_kustomization_renders_one_engine_beside_kube_flannel";
    let Some(rendered) = render_flannel_kustomization(test) else {
        return;
    };
    let docs = docs_of(&rendered, Path::new("rendered manifests/flannel"));

    let daemonsets: Vec<&DaemonSet> = docs
        .iter()
        .filter_map(|d| match d {
            Doc::Ds(ds) => Some(&**ds),
            _ => None,
        })
        .collect();
    assert_eq!(daemonsets.len(), 1, "only Flannel's DaemonSet");
    let ds = daemonsets[0];
    assert_eq!(ds.metadata.name.as_deref(), Some("kube-flannel-ds"));
    let namespace = ds.metadata.namespace.clone().unwrap();
    assert_eq!(namespace, "kube-flannel");
    let pod = ds.spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(
        pod.host_network,
        Some(true),
        "the agent needs the node's network"
    );

    let names: BTreeSet<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["kube-flannel", "kube-netpol-iptables"]),
        "sidecar beside kube-flannel"
    );
    // The strategic merge puts the sidecar first; `kubectl logs`/`exec` still default to Flannel.
    let template = ds
        .spec
        .clone()
        .unwrap()
        .template
        .metadata
        .unwrap_or_default();
    assert_eq!(
        template
            .annotations
            .unwrap_or_default()
            .get("kubectl.kubernetes.io/default-container")
            .map(String::as_str),
        Some("kube-flannel")
    );
    // One policy engine only: no kube-network-policies sidecar from upstream (Flannel's Helm chart
    // can add one; the pinned kube-flannel.yml must not).
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        let image = c.image.as_deref().unwrap_or_default();
        assert!(
            !c.name.contains("network-policies") && !image.contains("kube-network-policies"),
            "a second policy engine in the pod: {} ({image})",
            c.name
        );
    }

    let agent = pod
        .containers
        .iter()
        .find(|c| c.name == "kube-netpol-iptables")
        .unwrap()
        .clone();
    let volumes: BTreeSet<&str> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    for m in agent.volume_mounts.iter().flatten() {
        assert!(
            volumes.contains(m.name.as_str()),
            "mount {} of the agent has no volume in the pod ({volumes:?})",
            m.name
        );
    }
    let xtables = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "xtables-lock")
        .and_then(|v| v.host_path.clone())
        .unwrap();
    assert_eq!(
        xtables.path, "/run/xtables.lock",
        "the node's xtables lock, shared"
    );
    check_agent_container("rendered manifests/flannel", agent);

    let net_conf = rendered
        .split("net-conf.json: |")
        .nth(1)
        .expect("Flannel's net-conf.json in the render");
    assert!(
        net_conf.contains(&format!("\"Network\": \"{FLANNEL_NETWORK}\"")),
        "Flannel's pod network is not the podSubnet of manifests/kind/cluster-flannel.yaml"
    );

    // RBAC: the binding names the account the pod really runs as, and that account exists.
    let account = pod.service_account_name.clone().unwrap();
    let subjects: Vec<(String, String)> = docs
        .iter()
        .filter_map(|d| match d {
            Doc::Binding(b) if b.role_ref.name == "kube-netpol-iptables-flannel" => Some(b),
            _ => None,
        })
        .flat_map(|b| b.subjects.clone().unwrap())
        .map(|s| (s.namespace.unwrap_or_default(), s.name))
        .collect();
    assert_eq!(subjects, [(namespace.clone(), account.clone())]);
    assert!(docs.iter().any(|d| matches!(d, Doc::Sa(sa)
        if sa.metadata.name.as_deref() == Some(account.as_str())
            && sa.metadata.namespace.as_deref() == Some(namespace.as_str()))));
    let roles: Vec<&ClusterRole> = docs
        .iter()
        .filter_map(|d| match d {
            Doc::Role(r) if r.metadata.name.as_deref() == Some("kube-netpol-iptables-flannel") => {
                Some(r)
            }
            _ => None,
        })
        .collect();
    assert_eq!(roles.len(), 1);
}
