#!/usr/bin/env bash
# Install the Debian packages nbdsnap needs (only the missing ones), then
# configure and build.  Idempotent and non-interactive.
#
#   scripts/setup.sh [BUILD_DIR] [extra meson options...]
#
# NBDSNAP_SKIP_INSTALL=1 skips the package step (for machines without root).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-build}
shift || true

packages=(
  nbdkit nbdkit-plugin-dev libnbd-dev libnbd-bin python3-libnbd qemu-utils
  meson ninja-build pkg-config g++ libboost-dev libprotobuf-dev
  protobuf-compiler libgtest-dev libgmock-dev fio
  # kernel NBD client test in a VM (tests/vm), QEMU fleecing benchmark
  qemu-system-x86 qemu-system-common busybox-static
  # benchmark chart
  gnuplot-nox
)

install_missing() {
  local missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
      || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "setup: installing ${missing[*]}"
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q \
    --no-install-recommends "${missing[@]}"
}

# The kernel NBD client test in a VM (tests/vm, docs/testing.md) boots a
# Debian kernel with Debian's nbd-client. Those packages are fetched with
# `apt-get download` (no root needed) and unpacked with `dpkg-deb -x` into
# a cache, never installed: $NBDSNAP_VM_ASSETS, default BUILD_DIR/vm-assets
# (debs/ and root/, about 470 MB). Skipped when already there. If the
# download fails, setup goes on and that test skips.
download_vm_assets() {
  local dir=${NBDSNAP_VM_ASSETS:-}
  if [ -z "$dir" ]; then
    case $build in
      /*) dir=$build/vm-assets ;;
      *) dir=$top/$build/vm-assets ;;
    esac
  fi
  [ -f "$dir/complete" ] && return 0
  # The kernel: whatever linux-image-amd64 depends on (linux-image-6.1.*-amd64 on Debian 12).
  local kernel
  kernel=$(apt-cache depends linux-image-amd64 2>/dev/null \
    | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }')
  if [ -z "$kernel" ]; then
    echo "setup: warning: no linux-image-*-amd64 known to apt; the VM test (tests/vm) will skip" >&2
    return 0
  fi
  local debs=("$kernel" nbd-client libnl-3-200 libnl-genl-3-200)
  echo "setup: downloading ${debs[*]} for the VM test into $dir"
  rm -rf "$dir/debs" "$dir/root"
  mkdir -p "$dir/debs" "$dir/root"
  if ! (cd "$dir/debs" && apt-get download -q "${debs[@]}"); then
    # Maybe stale package lists (404): refresh them once and retry.
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    if ! "${sudo[@]}" apt-get update -q \
        || ! (cd "$dir/debs" && apt-get download -q "${debs[@]}"); then
      echo "setup: warning: apt-get download failed; the VM test (tests/vm) will skip" >&2
      return 0
    fi
  fi
  local deb
  for deb in "$dir"/debs/*.deb; do
    dpkg-deb -x "$deb" "$dir/root" || { echo "setup: dpkg-deb -x $deb failed" >&2; return 1; }
  done
  printf '%s\n' "${debs[@]}" > "$dir/complete"
}

if [ "${NBDSNAP_SKIP_INSTALL:-0}" != 1 ]; then
  install_missing
  download_vm_assets
fi

cd "$top"
if [ ! -f "$build/build.ninja" ]; then
  meson setup "$build" "$@"
elif [ $# -gt 0 ]; then
  meson configure "$build" "$@"
fi
# ninja re-runs meson by itself when a meson.build changed.
ninja -C "$build"
