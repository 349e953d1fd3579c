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
