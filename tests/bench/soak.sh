#!/usr/bin/env bash
# Soak: containers of three Lode images verify their files in a loop while a
# chaos loop SIGKILLs daemons and the snapshotter, pulls, runs and removes a
# fourth image, and pauses the registry (tests/tests/soak.rs, with real
# docker-registry, containerd and Lode). Prints per daemon mode what the
# chaos loop did, the readers' rounds, errors and wrong bytes, and what was
# left behind (mounts, daemons, cached blobs, snapshot directories) once
# everything was removed; fails unless all of those but the rounds are 0.
#
# Usage: tests/bench/soak.sh [SECONDS] (default 1800, per mode). Needs root.
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=${1:-1800}
[[ $seconds =~ ^[1-9][0-9]*$ ]] || { echo "SECONDS must be a positive number, not '$seconds'" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "the soak needs root (containerd, FUSE)" >&2; exit 1; }
tests/install-deps.sh
cargo build --release --workspace --bins --quiet
LODE_SOAK_SECS=$seconds cargo test --release -p lode-tests --test soak -- \
    --test-threads=1 --nocapture 2>&1 | grep -A3 -E '^\[(shared|dedicated)\] soak|^test |panicked|^test result'
