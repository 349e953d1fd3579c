#!/usr/bin/env bash
# Runs the sync benchmark (benches/sync.rs) on a network namespace it creates and removes, then
# the cold-run benchmark (benches/coldrun.rs: the whole agent process, manifests and Kubernetes
# mode, against the bare restore of its payload; same options).
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
cargo bench --bench sync -- "$@"
exec cargo bench --bench coldrun -- "$@"
