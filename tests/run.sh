#!/usr/bin/env bash
# Runs every test of the workspace: unit tests and the real-component tests
# (registry, FUSE, containerd). Tests that need root or /dev/fuse print why they
# skip when those are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

tests/install-deps.sh
# One release build serves both the binaries the end-to-end tests start and the
# test executables themselves.
cargo build --release --workspace --bins
cargo test --release --workspace -- --test-threads="${LODE_TEST_THREADS:-2}"
