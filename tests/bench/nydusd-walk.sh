#!/usr/bin/env bash
# nydusd baseline for tests/bench/fsd-bench.sh, items (5) and (6), run by it
# when BENCH_NYDUS_BIN_DIR names a directory with nydusd and nydus-image
# (Dragonfly nydus, built separately with `cargo build --release --bin nydusd
# --bin nydus-image`, which needs cmake and libprotobuf-dev; not part of this
# repository):
#
#   nydusd-walk.sh ROOTFS PORT
#
#   a. nydus-image create: ROOTFS -> RAFS bootstrap (local disk) + one data blob
#      (1 MiB chunks, BLAKE3 chunk digests as Lode's and nydus-image's own
#      default, zstd)
#   b. push the data blob to the docker-registry on 127.0.0.1:PORT (monolithic
#      upload); range requests are counted from its access log
#      (NYDUS_REGISTRY_LOG, info level)
#   c. nydusd (FUSE) on the bootstrap, registry backend, blobcache, chunk digest
#      validation on, prefetch off; sha256 of a few files checked against ROOTFS
#   d. umount, nydusd exits
#   (5) nydusd start until a stat of one file answers: median of 3, empty cache
#   (6) cold walk `find small -type f | xargs cat` on a fresh mount, empty
#       blobcache, page cache dropped: wall time, nydusd CPU-s, nydusd VmHWM,
#       range requests; medians of 3
#
# Needs root. Binaries from $NYDUS_BIN.
# NYDUS_FS_VERSION=6 (default) or 5; NYDUS_COMPRESSOR=zstd|lz4_block|none;
# NYDUS_DIGESTER=blake3 (default)|sha256;
# NYDUS_FUSE_THREADS=4 (nydusd default); NYDUS_KEEP=1 keeps the work dir;
# NYDUS_V5_DIGEST_VALIDATE=false turns off v5's metadata digest checks (chunk
# digests are still checked: cache.validate).
set -euo pipefail

[[ $# -eq 2 ]] || { echo "usage: $0 ROOTFS PORT" >&2; exit 2; }
rootfs=$(realpath "$1"); port=$2
[[ -d $rootfs ]] || { echo "no such dir: $rootfs" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "needs root (FUSE, drop_caches)" >&2; exit 1; }
bin=${NYDUS_BIN:?set NYDUS_BIN to the directory of nydusd and nydus-image}
fs_version=${NYDUS_FS_VERSION:-6}
compressor=${NYDUS_COMPRESSOR:-zstd}
digester=${NYDUS_DIGESTER:-blake3}
fuse_threads=${NYDUS_FUSE_THREADS:-4}
repo=bench/nydus
stat_file=${NYDUS_STAT_FILE:-small/d000/f000000.txt}
for b in nydusd nydus-image; do
    [[ -x $bin/$b ]] || { echo "missing $bin/$b" >&2; exit 1; }
done

work=$(mktemp -d /var/tmp/nydus-walk.XXXXXX)
mnt=$work/mnt cache=$work/cache
mkdir -p "$mnt" "$work/blobs"
nydusd_pid=
stop_nydusd() { :; }  # redefined below
cleanup() {
    set +e
    stop_nydusd
    if [[ -n ${NYDUS_KEEP:-} ]]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
median() { python3 -c "import statistics, sys; print(f'{statistics.median(float(a) for a in sys.argv[1:]):.3f}')" "$@"; }
hz=$(getconf CLK_TCK)
cpu_s() { awk -v hz="$hz" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# The registry's access log (info level), to count range requests.
registry_log=${NYDUS_REGISTRY_LOG:?set NYDUS_REGISTRY_LOG to the registry access log}
reg_206() { grep -c '" 206 ' "$registry_log" || true; }

# --- registry -----------------------------------------------------------------
url=http://127.0.0.1:$port
curl -sf "$url/v2/" > /dev/null || { echo "no registry answers on 127.0.0.1:$port" >&2; exit 1; }

# --- a. convert -----------------------------------------------------------------
features=()
validate_rafs=false
if [[ $fs_version == 6 ]]; then
    # RAFS v6: chunk digests are only checked if they are inlined in the blob (blob-toc);
    # nydusd refuses rafs-level digest_validate on v6 ("doesn't support integrity validation").
    features=(--features blob-toc)
else
    validate_rafs=${NYDUS_V5_DIGEST_VALIDATE:-true}   # v5: also verify inode/metadata digests
fi
t0=$(now)
"$bin/nydus-image" create -t dir-rafs --fs-version "$fs_version" \
    --chunk-size 0x100000 --digester "$digester" --compressor "$compressor" "${features[@]}" \
    --bootstrap "$work/bootstrap" --blob-dir "$work/blobs" \
    --output-json "$work/build.json" --log-level warn "$rootfs"
t1=$(now)
blob_id=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['blobs'][0])" "$work/build.json")
blob=$work/blobs/$blob_id
sha=$(sha256sum "$blob" | cut -d' ' -f1)
if [[ $sha != "$blob_id" ]]; then
    # With blob-toc the blob id written into the bootstrap is the digest of the blob
    # *before* its TOC was appended, so it is not the registry digest of the file.
    # Rewrite the bootstrap's blob id to the file's sha256, as nydusify does.
    "$bin/nydus-image" merge --blob-digests "$sha" --blob-sizes "$(stat -c %s "$blob")" \
        --original-blob-ids "$blob_id" --bootstrap "$work/bootstrap.merged" \
        --output-json "$work/merge.json" --log-level warn "$work/bootstrap"
    mv "$work/bootstrap.merged" "$work/bootstrap"
    new_id=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['blobs'][0])" "$work/merge.json")
    [[ $new_id == "$sha" ]] || { echo "merge did not set the blob id ($new_id != $sha)" >&2; exit 1; }
    mv "$blob" "$work/blobs/$sha"; blob_id=$sha; blob=$work/blobs/$sha
fi
echo "convert: $(elapsed "$t0" "$t1")s; RAFS v$fs_version bootstrap $(stat -c %s "$work/bootstrap") B," \
    "blob sha256:$blob_id $(stat -c %s "$blob") B"

# --- b. push the data blob --------------------------------------------------------
location=$(curl -sf -X POST -D - -o /dev/null "$url/v2/$repo/blobs/uploads/" |
    tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }')
[[ $location == http* ]] || location=$url$location
[[ $location == *\?* ]] && sep='&' || sep='?'
curl -sf -X PUT -H 'Content-Type: application/octet-stream' -T "$blob" \
    "${location}${sep}digest=sha256:$blob_id" -o /dev/null
curl -sfI "$url/v2/$repo/blobs/sha256:$blob_id" > /dev/null || { echo "blob push failed" >&2; exit 1; }
echo "pushed: $url/v2/$repo/blobs/sha256:$blob_id"

# --- c. nydusd ---------------------------------------------------------------------
cat > "$work/nydusd.json" <<JSON
{
  "device": {
    "backend": {
      "type": "registry",
      "config": {
        "scheme": "http",
        "host": "127.0.0.1:$port",
        "repo": "$repo",
        "timeout": 30,
        "connect_timeout": 5,
        "retry_limit": 2
      }
    },
    "cache": {
      "type": "blobcache",
      "validate": true,
      "config": { "work_dir": "$cache" }
    }
  },
  "mode": "direct",
  "digest_validate": $validate_rafs,
  "iostats_files": false,
  "enable_xattr": true,
  "fs_prefetch": { "enable": false }
}
JSON

start_nydusd() {
    "$bin/nydusd" --config "$work/nydusd.json" --bootstrap "$work/bootstrap" \
        --mountpoint "$mnt" --fuse-threads "$fuse_threads" --rlimit-nofile 0 \
        --log-level warn --log-file "$work/nydusd.log" &
    nydusd_pid=$!
}
stop_nydusd() {
    if mountpoint -q "$mnt"; then umount "$mnt" 2>/dev/null || umount -l "$mnt"; fi
    if [[ -n $nydusd_pid ]]; then
        for _ in $(seq 100); do kill -0 "$nydusd_pid" 2>/dev/null || break; sleep 0.05; done
        kill -0 "$nydusd_pid" 2>/dev/null && { echo "nydusd $nydusd_pid still up after umount, SIGTERM" >&2; kill "$nydusd_pid"; }
        wait "$nydusd_pid" 2>/dev/null || true
        nydusd_pid=
    fi
}
fresh_cache() { rm -rf "$cache"; mkdir -p "$cache"; }
wait_for() {  # wait until stat of $1 answers (20 s at most)
    local i
    for i in $(seq 4000); do
        stat -- "$1" > /dev/null 2>&1 && return 0
        kill -0 "$nydusd_pid" 2>/dev/null || { echo "nydusd died" >&2; cat "$work/nydusd.log" >&2 2>/dev/null; exit 1; }
        sleep 0.005
    done
    echo "timed out waiting for $1" >&2; exit 1
}

fresh_cache
r0=$(reg_206)
start_nydusd
wait_for "$mnt/$stat_file"
mountpoint -q "$mnt" || { echo "not a mountpoint" >&2; exit 1; }
checked=0
while IFS= read -r -d '' rel; do
    a=$(sha256sum < "$mnt/$rel" | cut -d' ' -f1); b=$(sha256sum < "$rootfs/$rel" | cut -d' ' -f1)
    [[ $a == "$b" ]] || { echo "MISMATCH: $rel" >&2; exit 1; }
    checked=$((checked + 1))
done < <(cd "$rootfs" && { printf '%s\0' big.bin "$stat_file"; find small -type f -print0 2>/dev/null | shuf -z -n 8 --random-source=<(yes); })
[[ $(find "$mnt" -type f | wc -l) == $(find "$rootfs" -type f | wc -l) ]] || { echo "file count differs" >&2; exit 1; }
echo "verify: sha256 of $checked files matches ROOTFS; registry 206 responses: $(( $(reg_206) - r0 ))"
stop_nydusd
mountpoint -q "$mnt" && { echo "still mounted" >&2; exit 1; }
echo "umount: ok, nydusd exited"

# --- (5) start to first stat ---------------------------------------------------------
times=() startup_reqs=()
for _ in 1 2 3; do
    fresh_cache
    r0=$(reg_206)
    t0=$(now)
    start_nydusd
    wait_for "$mnt/$stat_file"
    t1=$(now)
    times+=("$(elapsed "$t0" "$t1")")
    startup_reqs+=("$(( $(reg_206) - r0 ))")
    stop_nydusd
done
t_start=$(median "${times[@]}")

# --- (6) cold walk -------------------------------------------------------------------
walk() { (cd "$1/small" && find . -type f -print0 | xargs -0 cat > /dev/null); }
walk_times=() walk_cpus=() walk_rss=() walk_reqs=() local_times=()
for _ in 1 2 3; do
    fresh_cache
    start_nydusd
    until mountpoint -q "$mnt"; do  # mountpoint(1) stats the mount root: nydusd is serving
        kill -0 "$nydusd_pid" 2>/dev/null || { echo "nydusd died" >&2; exit 1; }; sleep 0.005
    done
    drop_caches
    r0=$(reg_206)
    c0=$(cpu_s "$nydusd_pid")
    t0=$(now); walk "$mnt"; t1=$(now)
    c1=$(cpu_s "$nydusd_pid")
    walk_times+=("$(elapsed "$t0" "$t1")")
    walk_cpus+=("$(python3 -c "print(f'{$c1 - $c0:.2f}')")")
    walk_rss+=("$(awk '/VmHWM/ {print $2}' "/proc/$nydusd_pid/status")")
    walk_reqs+=("$(( $(reg_206) - r0 ))")
    cache_kib=$(du -sk "$cache" | cut -f1)
    stop_nydusd
    drop_caches
    t0=$(now); walk "$rootfs"; t1=$(now)
    local_times+=("$(elapsed "$t0" "$t1")")
done
t_walk=$(median "${walk_times[@]}")
walk_cpu=$(median "${walk_cpus[@]}")
rss_kib=$(printf '%s\n' "${walk_rss[@]}" | sort -n | tail -1)
reqs=$(median "${walk_reqs[@]}")
t_local=$(median "${local_times[@]}")
echo "cold walk, 3 rounds: nydusd ${walk_times[*]} s, CPU-s ${walk_cpus[*]}, peak RSS KiB ${walk_rss[*]}, range requests ${walk_reqs[*]}; local ${local_times[*]} s"

cat <<REPORT

== nydusd $("$bin/nydusd" --version 2>/dev/null | awk '/Version:|Git Commit:/ {printf "%s ", $NF}'), RAFS v$fs_version, $compressor, 1 MiB chunks, $digester, cache.validate=true, digest_validate=$validate_rafs, $fuse_threads FUSE threads
(5) nydusd start to first stat       : ${t_start}s  (median of 3: ${times[*]}; bootstrap on local disk, empty blobcache;
                                        registry range GETs by then: ${startup_reqs[*]})
(6) cold walk of the small files     : ${t_walk}s, nydusd ${walk_cpu} CPU-s, nydusd peak RSS $((rss_kib / 1024)) MiB, $reqs range requests
    (medians of 3, RSS the highest; blobcache after a walk: $((cache_kib / 1024)) MiB; local disk, page cache dropped: ${t_local}s)
REPORT
