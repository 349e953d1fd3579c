#!/usr/bin/env bash
# Runs the agent on a one-node lab of network namespaces and shows who can reach whom before and
# after the example policies in manifests/demo/ apply. Needs root; cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh

if [ "$(id -u)" -ne 0 ]; then
  echo "error: the demo creates network namespaces and programs iptables: run it as root (sudo hack/demo.sh)" >&2
  exit 1
fi
ensure_system_packages
# The probes use OpenBSD netcat flags (-z, -w, -lk); netcat-traditional differs.
if ! nc -h 2>&1 | grep -q OpenBSD; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq netcat-openbsd >&2
fi
ensure_rust
cargo build --release --quiet
BIN=$PWD/target/release/kube-netpol-iptables

NODE=kni-demo-node
PODS=(web api db intruder)
declare -A NS=([web]=shop [api]=shop [db]=shop [intruder]=other)
declare -A IP=([web]=10.88.0.2 [api]=10.88.0.3 [db]=10.88.0.4 [intruder]=10.88.0.5)
WORK=$(mktemp -d)

cleanup() {
  set +e
  for p in "${PODS[@]}"; do ip netns pids "kni-demo-$p" 2>/dev/null | xargs -r kill 2>/dev/null; ip netns del "kni-demo-$p" 2>/dev/null; done
  ip netns del "$NODE" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
cleanup 2>/dev/null || true
WORK=$(mktemp -d)

echo "Building the lab: node namespace $NODE routing to pods ${PODS[*]}"
ip netns add "$NODE"
ip netns exec "$NODE" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0
ip -n "$NODE" link set lo up
for p in "${PODS[@]}"; do
  ns="kni-demo-$p"
  ip netns add "$ns"
  ip -n "$NODE" link add "v$p" type veth peer name eth0 netns "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" link set eth0 up
  ip -n "$ns" addr add "${IP[$p]}/32" dev eth0
  ip -n "$ns" route add 169.254.1.1 dev eth0
  ip -n "$ns" route add default via 169.254.1.1 dev eth0
  ip -n "$NODE" link set "v$p" up
  ip -n "$NODE" addr add 169.254.1.1/32 dev "v$p"
  ip -n "$NODE" route add "${IP[$p]}/32" dev "v$p"
  # Every pod serves TCP port 80.
  ip netns exec "$ns" nc -lk 80 >/dev/null 2>&1 </dev/null &
done
sleep 0.3

matrix() {
  printf '%-10s' "from\\to"
  for to in "${PODS[@]}"; do printf '%-10s' "$to"; done
  echo
  for from in "${PODS[@]}"; do
    printf '%-10s' "$from"
    for to in "${PODS[@]}"; do
      if [ "$from" = "$to" ]; then printf '%-10s' "-"; continue; fi
      if ip netns exec "kni-demo-$from" nc -z -w 1 "${IP[$to]}" 80 2>/dev/null; then
        printf '%-10s' "yes"
      else
        printf '%-10s' "NO"
      fi
    done
    echo
  done
}

sync() {
  ip netns exec "$NODE" "$BIN" run --manifests "$WORK" --node-name demo-node --once
}

cp manifests/demo/cluster.yaml "$WORK/"
sync 2>/dev/null
echo
echo "== Before: no NetworkPolicies (TCP port 80)"
matrix

cp manifests/demo/policies.yaml "$WORK/"
echo
echo "== Applying manifests/demo/policies.yaml"
sync
echo
echo "== After: web is public, web -> api -> db only"
matrix
echo
echo "What the agent wrote (kube-netpol-iptables render):"
"$BIN" render --manifests "$WORK" --node-name demo-node | grep -c '' | xargs -I{} echo "  {} lines of ipset + iptables-restore text; see it with: target/release/kube-netpol-iptables render --manifests manifests/demo --node-name demo-node"
echo
echo "== Why? (kube-netpol-iptables explain, from the same manifests; touches nothing)"
"$BIN" explain --manifests "$WORK" --from shop/web --to shop/api --port 80
echo
"$BIN" explain --manifests "$WORK" --from other/intruder --to shop/db --port 80
echo
echo "== Denied packets, as the agent logs them (run --log-denied; one line per dropped packet, rate-limited per pod)"
LOG="$WORK/agent.log"
ip netns exec "$NODE" "$BIN" run --manifests "$WORK" --node-name demo-node --log-denied \
  --metrics-bind-address off 2>"$LOG" &
AGENT=$!
for _ in $(seq 50); do grep -q ' synced' "$LOG" && break; sleep 0.1; done
ip netns exec kni-demo-intruder nc -z -w 1 "${IP[db]}" 80 2>/dev/null || true
ip netns exec kni-demo-web nc -z -w 1 "${IP[db]}" 80 2>/dev/null || true
sleep 0.3
kill "$AGENT" && wait "$AGENT" 2>/dev/null || true
grep 'kube_netpol_iptables::denied:' "$LOG" | sed 's/\x1b\[[0-9;]*m//g' | head -4
