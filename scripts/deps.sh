#!/usr/bin/env bash
# Installs the Debian 12 packages pipewright needs, only those missing.
# Idempotent; needs root (or sudo) only when something is missing.
set -euo pipefail

# g++ and libudev-dev: scripts/check-install.sh compiles the public headers
# as C++17, and links libpipewright.a with `pkg-config --static`, which
# follows hwloc's own static flags (-ludev).
PKGS=(build-essential g++ cmake pkg-config
      libhwloc-dev hwloc libevent-dev libjansson-dev zlib1g-dev libudev-dev
      libopenblas-dev libcriterion-dev
      libopenmpi-dev openmpi-bin
      clang libclang-rt-14-dev
      dataset-fashion-mnist fortunes)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "pipewright: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
