#!/usr/bin/env bash
# Read-path benchmark of lode-fsd against baselines measured in the same run.
#
#   (1) cold sequential read of a large file through fsd (empty cache, registry
#       on loopback) vs `curl` of the same blob from the same registry; the
#       median of BENCH_COLD_RUNS (3) runs with the blob read from disk, and
#       the same with the registry serving it from memory
#   (2) warm re-read through fsd (chunks in fsd's cache) vs the same file on
#       local disk; both with the page cache dropped first, and both hot
#   (3) `find -type f | xargs stat` on the mount vs on a local extraction
#   (4) fsd peak RSS
#   (5) mount to first stat: `lodectl mount` (bootstrap fetch, daemon start)
#       until a stat of a file answers; median of BENCH_WALK_ROUNDS (5); and
#       the same with the bootstrap already on local disk
#   (6) a cold walk reading every small file (`find | xargs cat`) on a fresh
#       mount: time, fsd CPU-seconds, peak RSS and range requests, medians
#       of BENCH_WALK_ROUNDS; local disk for reference
#
# Needs root (FUSE mount, drop_caches) and release binaries
# (`cargo build --release --workspace --bins`). Sizes can be lowered for a
# quick run: BENCH_BIG_MIB=1024 BENCH_SMALL_FILES=20000 (defaults).
# BENCH_PROFILE=FILE records a `perf` profile of fsd during the first cold
# read (FILE) and the cold walk (FILE.walk);
# BENCH_FSD_CONFIG=FILE runs fsd with that configuration.
# BENCH_NYDUS_BIN_DIR=DIR (nydusd and nydus-image built from Dragonfly nydus)
# also runs (5) and (6) with nydusd on the same files and registry
# (tests/bench/nydusd-walk.sh), a nydusd round right after each of fsd's.
set -euo pipefail
cd "$(dirname "$0")/../.."

big_mib=${BENCH_BIG_MIB:-1024}
small_files=${BENCH_SMALL_FILES:-20000}
walk_rounds=${BENCH_WALK_ROUNDS:-5}
bin=${LODE_BIN_DIR:-target/release}
for b in lodectl lode-fsd; do
    [[ -x $bin/$b ]] || { echo "missing $bin/$b: run cargo build --release --workspace --bins" >&2; exit 1; }
done
[[ $(id -u) -eq 0 ]] || { echo "the benchmark needs root (FUSE, drop_caches)" >&2; exit 1; }
tests/install-deps.sh

work=$(mktemp -d /var/tmp/lode-bench.XXXXXX)
registry_pid=
cleanup() {
    set +e
    "$bin/lodectl" umount --state-dir "$work/state" "$work/mnt" 2>/dev/null
    [[ -n $registry_pid ]] && kill "$registry_pid" 2>/dev/null && wait "$registry_pid" 2>/dev/null
    restore_reporting
    rm -rf "$work" /dev/shm/lode-bench-warm
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$1" "$2"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# CPU seconds (user + system) a process has used so far.
hz=$(getconf CLK_TCK)
cpu_s() { awk -v hz="$hz" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
# CPU seconds used per GiB read between two cpu_s samples.
per_gib() { python3 -c "import sys; print(f'{(float(sys.argv[2]) - float(sys.argv[1])) / (float(sys.argv[3]) / 2**30):.2f}')" "$1" "$2" "$3"; }
# Seconds taken by a command, its output discarded.
timed() { local t0 t1; t0=$(now); "$@" > /dev/null; t1=$(now); elapsed "$t0" "$t1"; }

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$work/registry"
cat > "$work/registry.yml" <<YML
version: 0.1
log: { level: info }
storage: { filesystem: { rootdirectory: $work/registry } }
http: { addr: 127.0.0.1:$port }
YML
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/v2/" > /dev/null && break; sleep 0.05; done
curl -sf "http://127.0.0.1:$port/v2/" > /dev/null || { echo "registry did not start" >&2; cat "$work/registry.log"; exit 1; }

echo "== building a source image: ${big_mib} MiB file + $small_files small files"
umoci init --layout "$work/oci" > /dev/null
umoci new --image "$work/oci:src" > /dev/null
umoci unpack --image "$work/oci:src" "$work/bundle" > /dev/null
rootfs=$work/bundle/rootfs
head -c "$((big_mib * 1024 * 1024))" /dev/urandom > "$rootfs/big.bin"
python3 - "$rootfs" "$small_files" <<'PY'
import os, random, sys
root, count = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
for i in range(count):
    d = os.path.join(root, "small", f"d{i // 1000:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:06d}.txt"), "wb") as f:
        f.write(rng.randbytes(rng.randint(200, 8192)))
PY
umoci repack --image "$work/oci:src" "$work/bundle" > /dev/null
skopeo copy -q --dest-tls-verify=false "oci:$work/oci:src" "docker://127.0.0.1:$port/bench/src:v1"

echo "== converting"
t=$(timed "$bin/lodectl" convert "127.0.0.1:$port/bench/src:v1" "127.0.0.1:$port/bench/lode:v1")
echo "convert: ${t}s"
manifest=$(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://127.0.0.1:$port/v2/bench/lode/manifests/v1")
# The source image has one layer, so the Lode image has one data blob.
blob=$(jq -r '[.layers[] | select(.annotations["lode.blob"] == "true")][0].digest' <<< "$manifest")
blob_size=$(jq -r '[.layers[] | select(.annotations["lode.blob"] == "true")][0].size' <<< "$manifest")

cold_runs=${BENCH_COLD_RUNS:-3}
file_bytes=$((big_mib * 1024 * 1024))
blob_path=$(find "$work/registry" -path "*/${blob#sha256:}/data")
mkdir -p "$work/mnt"
# The previous mount and the cache go; then lodectl mount fetches the
# bootstrap, starts lode-fsd and returns once it serves.
unmount_and_clear() {
    "$bin/lodectl" umount --state-dir "$work/state" "$work/mnt" 2>/dev/null || true
    rm -rf "$work/cache"
}
mount_now() {
    "$bin/lodectl" mount --state-dir "$work/state" --cache-dir "$work/cache" \
        ${BENCH_FSD_CONFIG:+--fsd-config "$BENCH_FSD_CONFIG"} \
        "127.0.0.1:$port/bench/lode:v1" "$work/mnt" > /dev/null
}
mount_fresh() {
    unmount_and_clear
    mount_now
    fsd_pid=$(jq -r .pid "$work"/state/mounts/*.json)
}
# Some VMs hand freed memory back to their host ("free page reporting");
# touching it again then costs a host fault per page, about a second per GiB
# here, and that cost fell on random parts of a run. Where the kernel lets us
# delay reporting, hold it back while the bench runs and touch memory once
# so that the baseline and fsd both run on memory the host backs.
reporting=/sys/module/page_reporting/parameters
saved_reporting=()
if [[ -w $reporting/min_free_ms && -w $reporting/max_waiting_mib ]]; then
    saved_reporting=("$(cat $reporting/min_free_ms)" "$(cat $reporting/max_waiting_mib)")
    echo 65535 > $reporting/min_free_ms
    echo 1048576 > $reporting/max_waiting_mib
fi
restore_reporting() {
    if [[ ${#saved_reporting[@]} -eq 2 ]]; then
        echo "${saved_reporting[0]}" > $reporting/min_free_ms
        echo "${saved_reporting[1]}" > $reporting/max_waiting_mib
    fi
}
warm_memory() {
    [[ ${#saved_reporting[@]} -eq 2 ]] || return 0
    dd if=/dev/zero of=/dev/shm/lode-bench-warm bs=1M count=$((big_mib * 4)) status=none
    rm -f /dev/shm/lode-bench-warm
}
median() { python3 -c "import statistics, sys; print(f'{statistics.median(float(a) for a in sys.argv[1:]):.3f}')" "$@"; }
# The median of counts, as a count (or half way between two).
count_median() { python3 -c "import statistics, sys; print(f'{statistics.median(int(a) for a in sys.argv[1:]):g}')" "$@"; }

# One cold measurement: curl of the blob, then fsd with an empty cache.
# `disk`: the page cache is dropped before each, so the registry reads the
# blob from disk both times; `memory`: the registry serves it from memory.
cold_pair() {
    local where=$1 reg0 reg1 t_curl t_cold fsd0 fsd1
    mount_fresh
    warm_memory
    if [[ $where == disk ]]; then drop_caches; else cat "$blob_path" > /dev/null; fi
    reg0=$(cpu_s "$registry_pid")
    t_curl=$(timed curl -sf -o /dev/null "http://127.0.0.1:$port/v2/bench/lode/blobs/$blob")
    reg1=$(cpu_s "$registry_pid")
    curl_mbps=$(python3 -c "print(f'{$blob_size / 1048576 / $t_curl:.0f}')")
    curl_reg=$(per_gib "$reg0" "$reg1" "$blob_size")
    if [[ $where == disk ]]; then drop_caches; fi
    fsd0=$(cpu_s "$fsd_pid"); reg0=$(cpu_s "$registry_pid")
    if [[ -n ${BENCH_PROFILE:-} && $where == disk ]]; then
        perf record -q -g -o "$BENCH_PROFILE" -p "$fsd_pid" 2> /dev/null &
        perf_pid=$!
        sleep 0.5 # perf attaches asynchronously; only the profile depends on it
    fi
    t_cold=$(timed cat "$work/mnt/big.bin")
    if [[ -n ${BENCH_PROFILE:-} && $where == disk ]]; then
        kill -INT "$perf_pid"; wait "$perf_pid" || true
    fi
    fsd1=$(cpu_s "$fsd_pid"); reg1=$(cpu_s "$registry_pid")
    cold_mbps=$(python3 -c "print(f'{$file_bytes / 1048576 / $t_cold:.0f}')")
    pair_ratio=$(ratio "$cold_mbps" "$curl_mbps")
    echo "  registry from $where: curl ${curl_mbps} MiB/s (registry $curl_reg CPU-s/GiB)," \
        "fsd ${cold_mbps} MiB/s (fsd $(per_gib "$fsd0" "$fsd1" "$file_bytes"), registry" \
        "$(per_gib "$reg0" "$reg1" "$file_bytes") CPU-s/GiB), ratio $pair_ratio"
}

echo "== (1) cold sequential read vs curl of the blob, $cold_runs runs each"
disk_ratios=(); memory_ratios=(); disk_fsd=(); disk_curl=()
for _ in $(seq "$cold_runs"); do
    cold_pair disk
    disk_ratios+=("$pair_ratio"); disk_fsd+=("$cold_mbps"); disk_curl+=("$curl_mbps")
    cold_pair memory
    memory_ratios+=("$pair_ratio")
done
cold_ratio=$(median "${disk_ratios[@]}")
memory_ratio=$(median "${memory_ratios[@]}")
echo "median: registry from disk: fsd $(count_median "${disk_fsd[@]}") MiB/s, curl $(count_median "${disk_curl[@]}") MiB/s"

echo "== (2) warm re-read vs local disk"
drop_caches
fsd_cpu0=$(cpu_s "$fsd_pid")
t_warm=$(timed cat "$work/mnt/big.bin")
fsd_cpu1=$(cpu_s "$fsd_pid")
drop_caches
t_local=$(timed cat "$rootfs/big.bin")
warm_ratio=$(ratio "$t_local" "$t_warm")
# Hot: both files already in the page cache (the drop above evicted fsd's pages).
cat "$work/mnt/big.bin" > /dev/null
t_warm_hot=$(timed cat "$work/mnt/big.bin")
t_local_hot=$(timed cat "$rootfs/big.bin")
hot_ratio=$(ratio "$t_local_hot" "$t_warm_hot")
echo "fsd warm (page cache dropped): ${t_warm}s, local: ${t_local}s, fsd CPU-s per GiB $(per_gib "$fsd_cpu0" "$fsd_cpu1" "$file_bytes")"
echo "fsd warm (page cache hot): ${t_warm_hot}s, local: ${t_local_hot}s"

echo "== (3) find | xargs stat"
stat_all() { (cd "$1" && find . -type f -print0 | xargs -0 stat > /dev/null); }
stat_all "$work/mnt"; stat_all "$rootfs"
t_stat_fsd=$(timed stat_all "$work/mnt")
t_stat_local=$(timed stat_all "$rootfs")
stat_ratio=$(ratio "$t_stat_local" "$t_stat_fsd")
echo "fsd: ${t_stat_fsd}s, local: ${t_stat_local}s"

rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$fsd_pid/status")

echo "== (5) mount to first stat, (6) cold walk of the small files, $walk_rounds rounds"
# With BENCH_NYDUS_BIN_DIR, nydusd's round follows fsd's in each round
# (tests/bench/nydusd-walk.sh), on the same files and registry.
nydus() {
    NYDUS_BIN=$BENCH_NYDUS_BIN_DIR NYDUS_REGISTRY_LOG=$work/registry.log \
        tests/bench/nydusd-walk.sh "$@"
}
if [[ -n ${BENCH_NYDUS_BIN_DIR:-} ]]; then
    nydus prepare "$rootfs" "$port" "$work/nydus"
fi
# A fresh mount each time (the previous one and the cache removed first,
# untimed), then one stat (`[[ -e ]]`, as nydusd-walk.sh polls: no process
# started).
first_stat() {
    mount_now
    [[ -e $work/mnt/small/d000/f000000.txt ]] || { echo "the mount does not show the files" >&2; exit 1; }
}
# The same with the bootstrap already on local disk, as nydusd's is:
# everything else in the cache removed (`lodectl mount` still resolves the
# image's manifest).
unmount_keep_bootstrap() {
    "$bin/lodectl" umount --state-dir "$work/state" "$work/mnt" 2>/dev/null || true
    find "$work/cache" -mindepth 1 -maxdepth 1 ! -name bootstraps -exec rm -rf {} +
}
mount_times=(); local_mount_times=(); nydus_starts=(); nydus_start_reqs=()
for _ in $(seq "$walk_rounds"); do
    unmount_and_clear
    mount_times+=("$(timed first_stat)")
    unmount_keep_bootstrap
    local_mount_times+=("$(timed first_stat)")
    if [[ -n ${BENCH_NYDUS_BIN_DIR:-} ]]; then
        unmount_and_clear
        read -r t reqs < <(nydus start "$work/nydus")
        nydus_starts+=("$t"); nydus_start_reqs+=("$reqs")
    fi
done
# The walk reads every small file once, cold: empty cache, page cache dropped.
walk() { (cd "$1/small" && find . -type f -print0 | xargs -0 cat > /dev/null); }
ranges() { grep -c '" 206 ' "$work/registry.log" || true; }
walk_times=(); walk_cpus=(); walk_rss=(); walk_reqs=(); local_times=()
nydus_times=(); nydus_cpus=(); nydus_rss=(); nydus_reqs=()
for round in $(seq "$walk_rounds"); do
    mount_fresh
    drop_caches
    if [[ -n ${BENCH_PROFILE:-} && $round == 1 ]]; then
        perf record -q -g -o "$BENCH_PROFILE.walk" -p "$fsd_pid" 2> /dev/null &
        perf_pid=$!
        sleep 0.5 # perf attaches asynchronously; only the profile depends on it
    fi
    walk_r0=$(ranges)
    fsd_cpu0=$(cpu_s "$fsd_pid")
    walk_times+=("$(timed walk "$work/mnt")")
    fsd_cpu1=$(cpu_s "$fsd_pid")
    walk_reqs+=("$(( $(ranges) - walk_r0 ))")
    if [[ -n ${BENCH_PROFILE:-} && $round == 1 ]]; then
        kill -INT "$perf_pid"; wait "$perf_pid" || true
    fi
    walk_rss+=("$(awk '/VmHWM/ {print $2}' "/proc/$fsd_pid/status")")
    walk_cpus+=("$(python3 -c "print(f'{$fsd_cpu1 - $fsd_cpu0:.2f}')")")
    if [[ -n ${BENCH_NYDUS_BIN_DIR:-} ]]; then
        unmount_and_clear
        read -r t cpu rss reqs nydus_cache_kib < <(nydus walk "$work/nydus")
        nydus_times+=("$t"); nydus_cpus+=("$cpu"); nydus_rss+=("$rss"); nydus_reqs+=("$reqs")
    fi
    drop_caches
    local_times+=("$(timed walk "$rootfs")")
done
t_mount=$(median "${mount_times[@]}")
t_mount_local=$(median "${local_mount_times[@]}")
t_walk=$(median "${walk_times[@]}")
walk_cpu=$(median "${walk_cpus[@]}")
walk_ranges=$(count_median "${walk_reqs[@]}")
walk_rss_kib=$(printf '%s\n' "${walk_rss[@]}" | sort -n | tail -1)
t_walk_local=$(median "${local_times[@]}")
echo "mount to first stat: ${t_mount}s (median of $walk_rounds: ${mount_times[*]}); bootstrap on local disk: ${t_mount_local}s (${local_mount_times[*]})"
echo "cold walk: fsd ${walk_times[*]} s, fsd CPU-s ${walk_cpus[*]}, peak RSS KiB ${walk_rss[*]}, range requests ${walk_reqs[*]}; local ${local_times[*]} s"

nydus_report=
if [[ -n ${BENCH_NYDUS_BIN_DIR:-} ]]; then
    echo "nydusd start to first stat: ${nydus_starts[*]} s, range requests ${nydus_start_reqs[*]}"
    echo "cold walk: nydusd ${nydus_times[*]} s, CPU-s ${nydus_cpus[*]}, peak RSS KiB ${nydus_rss[*]}, range requests ${nydus_reqs[*]}"
    # Rounds in which fsd took less time than nydusd right after it.
    below() {
        python3 -c "import sys; a, b = sys.argv[1].split(), sys.argv[2].split(); print(sum(float(x) < float(y) for x, y in zip(a, b)))" "$1" "$2"
    }
    nydus_rss_kib=$(printf '%s\n' "${nydus_rss[@]}" | sort -n | tail -1)
    nydus_report="== nydusd: $(cat "$work/nydus/setup.txt")
(5) nydusd start to first stat       : $(median "${nydus_starts[@]}")s  (bootstrap on local disk, empty blobcache; range requests by then: $(count_median "${nydus_start_reqs[@]}"))
(6) cold walk of the small files     : $(median "${nydus_times[@]}")s, $(median "${nydus_cpus[@]}") CPU-s, peak RSS $((nydus_rss_kib / 1024)) MiB, $(count_median "${nydus_reqs[@]}") range requests  (blobcache after a walk: $((nydus_cache_kib / 1024)) MiB)
nydusd / fsd (time)                  : (5) $(ratio "$(median "${nydus_starts[@]}")" "$t_mount"), fsd faster in $(below "${mount_times[*]}" "${nydus_starts[*]}") of $walk_rounds rounds; both bootstraps on local disk: $(ratio "$(median "${nydus_starts[@]}")" "$t_mount_local"), fsd faster in $(below "${local_mount_times[*]}" "${nydus_starts[*]}") of $walk_rounds; (6) $(ratio "$(median "${nydus_times[@]}")" "$t_walk"), fsd faster in $(below "${walk_times[*]}" "${nydus_times[*]}") of $walk_rounds rounds (each nydusd round right after fsd's)"
fi

cat <<REPORT

== results (ratios: >1 means fsd is faster than the baseline)
(1) cold read throughput / curl throughput : $cold_ratio  (goal >= 0.8; median of $cold_runs, blob read from disk)
    the same, registry serving from memory  : $memory_ratio
(2) warm re-read, page cache dropped       : $warm_ratio  (goal >= 0.8)
    warm re-read, page cache hot           : $hot_ratio
(3) stat of all files, warm                : $stat_ratio  (goal >= 0.5)
(4) fsd peak RSS                           : $((rss_kib / 1024)) MiB
(5) mount to first stat                    : ${t_mount}s  (bootstrap fetched from the registry; median of $walk_rounds)
    the same, bootstrap on local disk       : ${t_mount_local}s
(6) cold walk of the small files           : ${t_walk}s, ${walk_cpu} CPU-s, peak RSS $((walk_rss_kib / 1024)) MiB, $walk_ranges range requests  (medians of $walk_rounds, RSS the highest; local disk, page cache dropped: ${t_walk_local}s)
${nydus_report:+
$nydus_report}
REPORT
