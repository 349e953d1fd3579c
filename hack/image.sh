#!/usr/bin/env bash
# Builds the container image localhost/kube-netpol-iptables:<version from Cargo.toml> with podman.
#
# Where the Containerfile's base images can be pulled, it builds the Containerfile as it is.
# Where they cannot (no route to a container registry), it builds the same runtime image offline:
# a Debian base made with `debootstrap --variant=minbase` (+ iptables, ipset) from the Debian
# mirror apt is configured with, imported with `podman import` and cached as an image tag, plus
# the release binary built on this host. Needs root (rootful podman, debootstrap).
#
#   KNI_IMAGE_BUILD=auto|containerfile|offline   which path to take (default: auto, probes a pull)
#   KNI_IMAGE_REFRESH_BASE=1                     rebuild the cached offline base (security updates)
#
# Podman runs with a private containers.conf (target/image/containers.conf, through
# CONTAINERS_CONF): runc instead of crun (crun refuses hybrid cgroup v1/v2 layouts), and modest
# container ulimits no higher than this shell's hard limits (podman's defaults fail in setrlimit
# where the caller cannot raise them). The system's files are left alone. Missing tools (podman,
# buildah, debootstrap, runc) are installed with apt. Use the same file to run the image:
#   CONTAINERS_CONF=target/image/containers.conf podman run --rm localhost/kube-netpol-iptables:<version> version
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

SUITE=bookworm                 # the Containerfile's runtime base is debian:bookworm-slim
PACKAGES=(iptables ipset)      # what the Containerfile's runtime stage installs
NAME=kube-netpol-iptables
VERSION=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)
IMAGE=localhost/$NAME:$VERSION
WORK=target/image
BIN=/usr/local/bin/$NAME

log() { echo "image.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ -n "$VERSION" ] || die "no version in Cargo.toml"
[ "$(id -u)" -eq 0 ] || die "needs root (rootful podman and debootstrap): sudo env \"PATH=\$PATH\" $0"

ensure_packages() {
  local missing=()
  command -v podman >/dev/null 2>&1 || missing+=(podman)
  command -v buildah >/dev/null 2>&1 || missing+=(buildah)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  command -v runc >/dev/null 2>&1 || missing+=(runc)
  [ -r /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# The private containers.conf described above. Modest ulimits (the agent needs few files and
# processes), never above our hard limits: podman's own process may run with lower ones than this
# shell (here it lowers nproc), so "as high as allowed" is not a safe choice.
write_containers_conf() {
  local nofile nproc
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  if [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ]; then nofile=65536; fi
  if [ "$nproc" = unlimited ] || [ "$nproc" -gt 4096 ]; then nproc=4096; fi
  cat >"$WORK/containers.conf" <<EOF
# Written by hack/image.sh: runc, and ulimits a container can set on this host.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
EOF
  export CONTAINERS_CONF=$PWD/$WORK/containers.conf
}

# The first URI of a `deb` source for SUITE with component main, from apt's own configuration
# (one-line .list files and deb822 .sources files).
apt_uri() {
  local suite=$1 f
  {
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [ -r "$f" ] || continue
      awk -v s="$suite" '$1 == "deb" {
          i = 2
          if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
          if ($(i + 1) != s) next
          for (j = i + 2; j <= NF; j++) if ($j == "main") { print $i; exit }
        }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -r "$f" ] || continue
      awk -v s="$suite" '
        function flush() {
          if ((" " types " ") ~ / deb / && tolower(enabled) != "no" &&
              (" " suites " ") ~ (" " s " ") && (" " comps " ") ~ / main /) {
            split(uris, u, " "); print u[1]; exit
          }
          types = uris = suites = comps = enabled = ""
        }
        /^[[:space:]]*$/ { flush(); next }
        /^#/ || /^[[:space:]]/ { next }
        {
          key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "")
          if (key == "types") types = $0
          else if (key == "uris") uris = $0
          else if (key == "suites") suites = $0
          else if (key == "components") comps = $0
          else if (key == "enabled") enabled = $0
        }
        END { flush() }' "$f"
    done
  } | head -n 1 | sed 's:/*$::'
}

# The Debian base for the offline path, cached as an image tag keyed by everything that goes in.
offline_base() {
  local mirror updates security key tag root
  mirror=$(apt_uri "$SUITE")
  [ -n "$mirror" ] || die "apt has no 'deb' source for $SUITE main (see /etc/apt/sources.list*); the offline path needs a Debian mirror"
  updates=$(apt_uri "$SUITE-updates")
  security=$(apt_uri "$SUITE-security")
  key=$(printf '%s\n' "recipe 1" "$SUITE" minbase "${PACKAGES[*]}" "$mirror" "$updates" "$security" |
    sha256sum | cut -c1-12)
  tag=localhost/$NAME-base:$SUITE-$key
  if [ "${KNI_IMAGE_REFRESH_BASE:-}" != 1 ] && podman image exists "$tag"; then
    log "offline base: $tag (cached)"
    echo "$tag"
    return
  fi
  log "offline base: debootstrap --variant=minbase $SUITE from $mirror (+ ${PACKAGES[*]})"
  root=$WORK/rootfs
  rm -rf "$root"
  mkdir -p "$root"
  debootstrap --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" "$SUITE" "$root" "$mirror" >&2 ||
    die "debootstrap failed (see $root/debootstrap/debootstrap.log)"
  # The image's apt sources: the same mirrors, with updates and security as in debian:*-slim.
  rm -f "$root/etc/apt/sources.list"
  {
    echo "Types: deb"
    echo "URIs: $mirror"
    echo "Suites: $SUITE${updates:+ $SUITE-updates}"
    echo "Components: main"
    echo "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
    if [ -n "$security" ]; then
      echo
      echo "Types: deb"
      echo "URIs: $security"
      echo "Suites: $SUITE-security"
      echo "Components: main"
      echo "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
    fi
  } >"$root/etc/apt/sources.list.d/debian.sources"
  if [ -n "$updates$security" ]; then
    log "offline base: installing updates${security:+ and security updates}"
    chroot "$root" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get upgrade -y -qq >&2
  fi
  # Trimmed as debian:*-slim is: no package lists, caches, logs, docs or man pages.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/debootstrap "$root"/tmp/* "$root"/run/*
  : >"$root/etc/resolv.conf"
  : >"$root/etc/hostname"
  # /dev, /proc and /sys are the runtime's to fill.
  tar --numeric-owner -C "$root" --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* -c . |
    podman import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["bash"]' \
      - "$tag" >/dev/null
  rm -rf "$root"
  log "offline base: $tag"
  echo "$tag"
}

build_offline() {
  local base ctx
  command -v cargo >/dev/null 2>&1 \
    || die "cargo is not on PATH (sudo's secure_path drops ~/.cargo/bin): run sudo env \"PATH=\$PATH\" $0"
  # The compile (CPU) runs while debootstrap downloads (network): the two overlap.
  log "building the release binary on this host (cargo build --release --locked), log: $WORK/cargo-release.log"
  cargo build --release --locked --bin "$NAME" >"$WORK/cargo-release.log" 2>&1 &
  cargo_pid=$!
  trap 'kill "$cargo_pid" 2>/dev/null || true' EXIT
  base=$(offline_base)
  if ! wait "$cargo_pid"; then
    cat "$WORK/cargo-release.log" >&2
    die "cargo build --release failed"
  fi
  trap - EXIT
  ctx=$WORK/context
  rm -rf "$ctx"
  mkdir -p "$ctx"
  cp "${CARGO_TARGET_DIR:-target}/release/$NAME" "$ctx/$NAME"
  # The Containerfile's runtime stage, on the offline base.
  cat >"$ctx/Containerfile" <<EOF
FROM $base
COPY $NAME $BIN
ENTRYPOINT ["$BIN"]
CMD ["run"]
EOF
  podman build --pull=never --label "org.opencontainers.image.version=$VERSION" \
    -t "$IMAGE" -f "$ctx/Containerfile" "$ctx" >&2
  rm -rf "$ctx"
}

build_containerfile() {
  podman build --label "org.opencontainers.image.version=$VERSION" -t "$IMAGE" -f Containerfile . >&2
}

# Whether the Containerfile's base images are here or can be pulled: a quick, bounded probe (a
# pull of the small runtime base) decides, so an offline machine does not wait for retries.
registry_reachable() {
  local images image runtime_base missing=0
  images=$(awk 'toupper($1) == "FROM" { print $2 }' Containerfile)
  for image in $images; do podman image exists "$image" || missing=1; done
  [ "$missing" = 0 ] && return 0
  runtime_base=$(echo "$images" | tail -n 1)
  log "probing the registry: podman pull $runtime_base (at most 30 s)"
  timeout 30 podman pull -q "$runtime_base" >/dev/null 2>&1
}

mkdir -p "$WORK"
ensure_packages
write_containers_conf

start=$(date +%s)
mode=${KNI_IMAGE_BUILD:-auto}
if [ "$mode" = auto ]; then
  if registry_reachable; then mode=containerfile; else
    log "the Containerfile's base images cannot be pulled: taking the offline path"
    mode=offline
  fi
fi
case $mode in
  containerfile) log "building $IMAGE from Containerfile"; build_containerfile ;;
  offline) log "building $IMAGE offline (debootstrap base + host release binary)"; build_offline ;;
  *) die "KNI_IMAGE_BUILD must be auto, containerfile or offline, not '$mode'" ;;
esac

# The image must run here: e.g. a binary linked against a newer glibc than the base's fails now.
got=$(podman run --rm --network none "$IMAGE" version) || die "$IMAGE does not run: $got"
log "built $IMAGE ($mode path, $(($(date +%s) - start)) s): $got"
