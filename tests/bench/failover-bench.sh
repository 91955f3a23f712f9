#!/usr/bin/env bash
# Failover pause of lode-fsd: SIGKILLs the daemon N times (default 100) while
# three reader threads in another process read and verify every file, in two
# set-ups: a successor started with --takeover after each kill serves the
# kept FUSE connection; and a standby that already serves the connection
# next to the daemon takes over alone (the next standby is started after
# the outage). Prints the reads, errors, wrong bytes and how long readers were
# blocked per outage (median, p90, max); exits non-zero if a reader saw an
# error or a wrong byte, or the mount left the mount table.
#
# Needs root and /dev/fuse. Builds the release binaries if needed.
set -euo pipefail
cd "$(dirname "$0")/../.."

iterations=${1:-100}
[[ $(id -u) -eq 0 ]] || { echo "the benchmark needs root (FUSE)" >&2; exit 1; }
cargo build --release --workspace --bins --quiet
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
LODE_FAILOVER_ITERATIONS=$iterations cargo test --release --quiet -p lode-tests --test failover \
    -- sigkill --test-threads=1 --nocapture > "$out" 2>&1 || status=$?
grep -oE 'failover:.*|panicked.*|test result.*' "$out" || cat "$out"
exit "$status"
