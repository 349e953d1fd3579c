#!/usr/bin/env bash
# Runs every check: formatting, clippy, unit tests, and the network-namespace end-to-end suite
# (which needs root; without it those tests say SKIPPED and pass). With KNI_IMAGE_TEST=1 (as CI
# sets) it also builds the container image and runs it (tests/e2e/image.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
. hack/lib.sh

ensure_system_packages
ensure_kubectl
ensure_rust

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
if [ "${KNI_IMAGE_TEST:-}" = 1 ]; then
  # tests/e2e/image.rs runs the image in a lab namespace; without KNI_IMAGE_TEST it says SKIPPED.
  echo "== container image (hack/image.sh)"
  hack/image.sh
fi
echo "== cargo test"
if [ "$(id -u)" -ne 0 ]; then
  echo "*** not root: the end-to-end tests will be SKIPPED (run: sudo hack/test.sh) ***" >&2
fi
echo "== benchmark smoke run (a small case of benches/sync.rs)"
cargo test --bench sync "$@"
echo "== unit, golden and end-to-end tests"
cargo test --lib --bins --tests "$@"
