#!/usr/bin/env bash
# Runs the sync benchmark (benches/sync.rs) on a network namespace it creates and removes, then
# the cold-run benchmark (benches/coldrun.rs: the whole agent process, manifests and Kubernetes
# mode, against the bare restore of its payload; same options), and prints every figure of the
# run in one table, with the machine it ran on.
# Defaults are the large case: 10,000 pods, 500 namespaces, 1,000 policies, 110 local pods.
# Pass options through, e.g.: sudo hack/bench.sh --pods 2000 --namespaces 100 --skip-iperf
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh

if [ "$(id -u)" -ne 0 ]; then
  echo "error: the benchmark programs a network namespace: run it as root (sudo hack/bench.sh)" >&2
  exit 1
fi
ensure_system_packages
if ! command -v iperf3 >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >&2
fi
if [ ! -x /usr/bin/time ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >&2
fi
ensure_rust
# Both benchmarks append their rows here; printed once at the end as one table (issue 11).
KNI_BENCH_TABLE="$(mktemp)"
export KNI_BENCH_TABLE
trap 'rm -f "$KNI_BENCH_TABLE"' EXIT
machine() {
  echo "$(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), kernel $(uname -r), $(iptables --version | head -1), $(ipset --version | head -1 | cut -d, -f1)"
}
load_average() { cut -d' ' -f1-3 /proc/loadavg; }
load_before="$(load_average)"
cargo bench --bench sync -- "$@"
cargo bench --bench coldrun -- "$@"
echo
echo "kube-netpol-iptables benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), options: ${*:-(defaults)}"
echo "machine: $(machine); load average before / after: $load_before / $(load_average)"
echo
echo "| measure | result |"
echo "|---|---|"
cat "$KNI_BENCH_TABLE"
