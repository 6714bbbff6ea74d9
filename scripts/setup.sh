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

if [ "${NBDSNAP_SKIP_INSTALL:-0}" != 1 ]; then
  install_missing
fi

cd "$top"
if [ ! -f "$build/build.ninja" ]; then
  meson setup "$build" "$@"
elif [ $# -gt 0 ]; then
  meson configure "$build" "$@"
fi
# ninja re-runs meson by itself when a meson.build changed.
ninja -C "$build"
