#!/usr/bin/env bash
# Installs the Debian packages that the local cluster's real node and the test suite need, when they are missing.
# Idempotent and quick: with everything present it only asks dpkg (well under a second) and changes nothing.
#
#   containerd, runc   the real node's container runtime (hack/localcluster/containerd.py)
#   iptables, nftables kube-proxy's Service rules and the pod firewall, and removing them (localcluster/network.py)
#   busybox-static     the real node tests' toolbox image (a shell, nslookup, wget, nc)
#   gcc, libc6-dev     the static pause binary of the real node (hack/localcluster/pause.c)
#   debootstrap        the worker image's root filesystem (make image)
#   zstd               compressing the worker image's layers (make image)
#   prometheus         the Prometheus-backed tests
#
# Usage: hack/install-system-packages.sh [PACKAGE ...]   (default: all of the above)
set -euo pipefail

packages=("$@")
[[ ${#packages[@]} -gt 0 ]] || packages=(containerd runc iptables nftables busybox-static gcc libc6-dev debootstrap zstd prometheus)

missing=()
for package in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
  [[ $status == "install ok installed" ]] || missing+=("$package")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]]; then
  echo "missing Debian packages: ${missing[*]}; this user cannot apt-get them (run as root)" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
