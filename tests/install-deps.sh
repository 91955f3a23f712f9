#!/usr/bin/env bash
# Installs the system packages Lode's tests and quickstart need (Debian).
# Safe to run repeatedly; does nothing when everything is present.
set -euo pipefail

# g++: libfuzzer-sys compiles libFuzzer for the fuzz targets (tests/bench/fuzz.sh).
packages=(docker-registry skopeo umoci fuse3 curl ca-certificates openssl jq
          protobuf-compiler containerd runc apache2-utils busybox-static debootstrap
          g++)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing packages: ${missing[*]} (run as root or install them yourself)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The Debian registry package starts a system service on its default port; the
# tests run their own instances on free ports, so the service is not needed.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
    systemctl stop docker-registry || true
fi
