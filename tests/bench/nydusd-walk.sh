#!/usr/bin/env bash
# nydusd baseline for tests/bench/fsd-bench.sh, items (5) and (6), run by it
# when BENCH_NYDUS_BIN_DIR names a directory with nydusd and nydus-image
# (Dragonfly nydus, built separately with `cargo build --release --bin nydusd
# --bin nydus-image`, which needs cmake and libprotobuf-dev; not part of this
# repository). fsd-bench alternates its own rounds with nydusd's, so that
# both see the same machine:
#
#   nydusd-walk.sh prepare ROOTFS PORT DIR
#       nydus-image create: ROOTFS -> RAFS bootstrap (in DIR) + one data blob
#       (1 MiB chunks, BLAKE3 chunk digests as Lode's and nydus-image's own
#       default, zstd); the blob pushed to the docker-registry on
#       127.0.0.1:PORT (monolithic upload); nydusd (FUSE) mounted on it once
#       (registry backend, blobcache, chunk digest validation on, prefetch
#       off) and the sha256 of a few files checked against ROOTFS. Prints a
#       line describing the setup.
#   nydusd-walk.sh start DIR
#       one start of nydusd with an empty blobcache until a stat of one file
#       answers; prints "SECONDS RANGE_REQUESTS"
#   nydusd-walk.sh walk DIR
#       one cold walk `find small -type f | xargs cat` on a fresh mount,
#       empty blobcache, page cache dropped; prints "SECONDS CPU_S
#       PEAK_RSS_KIB RANGE_REQUESTS BLOBCACHE_KIB"
#
# Needs root. Binaries from $NYDUS_BIN; range requests are counted from the
# registry's access log, $NYDUS_REGISTRY_LOG (info level).
# NYDUS_FS_VERSION=6 (default) or 5; NYDUS_COMPRESSOR=zstd|lz4_block|none;
# NYDUS_DIGESTER=blake3 (default)|sha256;
# NYDUS_FUSE_THREADS=4 (nydusd default);
# NYDUS_V5_DIGEST_VALIDATE=false turns off v5's metadata digest checks (chunk
# digests are still checked: cache.validate).
set -euo pipefail

usage() { echo "usage: $0 prepare ROOTFS PORT DIR | start DIR | walk DIR" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
command=$1
[[ $(id -u) -eq 0 ]] || { echo "needs root (FUSE, drop_caches)" >&2; exit 1; }
bin=${NYDUS_BIN:?set NYDUS_BIN to the directory of nydusd and nydus-image}
for b in nydusd nydus-image; do
    [[ -x $bin/$b ]] || { echo "missing $bin/$b" >&2; exit 1; }
done
registry_log=${NYDUS_REGISTRY_LOG:?set NYDUS_REGISTRY_LOG to the registry access log}
fuse_threads=${NYDUS_FUSE_THREADS:-4}
stat_file=${NYDUS_STAT_FILE:-small/d000/f000000.txt}

case $command in
    prepare) [[ $# -eq 4 ]] || usage; rootfs=$(realpath "$2"); port=$3; work=$4 ;;
    start | walk) [[ $# -eq 2 ]] || usage; work=$2 ;;
    *) usage ;;
esac
mkdir -p "$work"
work=$(realpath "$work")
mnt=$work/mnt cache=$work/cache

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
hz=$(getconf CLK_TCK)
cpu_s() { awk -v hz="$hz" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
reg_206() { grep -c '" 206 ' "$registry_log" || true; }

nydusd_pid=
start_nydusd() {
    mkdir -p "$mnt"
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
trap 'set +e; stop_nydusd' EXIT
fresh_cache() { rm -rf "$cache"; mkdir -p "$cache"; }
# Waits until a stat of $1 answers (20 s at most), polling every
# millisecond without starting a process: `[[ -e ]]` stats the path, and a
# read timing out on a pipe nobody writes to pauses.
exec {pause_fd}<> <(:)
wait_for() {
    local i
    for i in $(seq 20000); do
        [[ -e $1 ]] && return 0
        kill -0 "$nydusd_pid" 2>/dev/null || { echo "nydusd died" >&2; cat "$work/nydusd.log" >&2 2>/dev/null; exit 1; }
        read -r -t 0.001 -u "$pause_fd" || true
    done
    echo "timed out waiting for $1" >&2; exit 1
}

prepare() {
    [[ -d $rootfs ]] || { echo "no such dir: $rootfs" >&2; exit 2; }
    local fs_version=${NYDUS_FS_VERSION:-6} compressor=${NYDUS_COMPRESSOR:-zstd}
    local digester=${NYDUS_DIGESTER:-blake3} repo=bench/nydus url=http://127.0.0.1:$port
    curl -sf "$url/v2/" > /dev/null || { echo "no registry answers on 127.0.0.1:$port" >&2; exit 1; }
    mkdir -p "$work/blobs"
    local features=() validate_rafs=false
    if [[ $fs_version == 6 ]]; then
        # RAFS v6: chunk digests are only checked if they are inlined in the blob (blob-toc);
        # nydusd refuses rafs-level digest_validate on v6 ("doesn't support integrity validation").
        features=(--features blob-toc)
    else
        validate_rafs=${NYDUS_V5_DIGEST_VALIDATE:-true}   # v5: also verify inode/metadata digests
    fi
    local t0 t1
    t0=$(now)
    "$bin/nydus-image" create -t dir-rafs --fs-version "$fs_version" \
        --chunk-size 0x100000 --digester "$digester" --compressor "$compressor" "${features[@]}" \
        --bootstrap "$work/bootstrap" --blob-dir "$work/blobs" \
        --output-json "$work/build.json" --log-level warn "$rootfs"
    t1=$(now)
    local blob_id blob sha
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
        local new_id
        new_id=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['blobs'][0])" "$work/merge.json")
        [[ $new_id == "$sha" ]] || { echo "merge did not set the blob id ($new_id != $sha)" >&2; exit 1; }
        mv "$blob" "$work/blobs/$sha"; blob_id=$sha; blob=$work/blobs/$sha
    fi
    echo "nydus convert: $(elapsed "$t0" "$t1")s; RAFS v$fs_version bootstrap $(stat -c %s "$work/bootstrap") B," \
        "blob sha256:$blob_id $(stat -c %s "$blob") B"

    # The data blob, pushed in one upload.
    local location sep
    location=$(curl -sf -X POST -D - -o /dev/null "$url/v2/$repo/blobs/uploads/" |
        tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }')
    [[ $location == http* ]] || location=$url$location
    [[ $location == *\?* ]] && sep='&' || sep='?'
    curl -sf -X PUT -H 'Content-Type: application/octet-stream' -T "$blob" \
        "${location}${sep}digest=sha256:$blob_id" -o /dev/null
    curl -sfI "$url/v2/$repo/blobs/sha256:$blob_id" > /dev/null || { echo "blob push failed" >&2; exit 1; }
    rm -rf "$work/blobs"

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

    # One mount, checked against ROOTFS.
    fresh_cache
    local r0 checked=0 rel a b
    r0=$(reg_206)
    start_nydusd
    wait_for "$mnt/$stat_file"
    mountpoint -q "$mnt" || { echo "not a mountpoint" >&2; exit 1; }
    while IFS= read -r -d '' rel; do
        a=$(sha256sum < "$mnt/$rel" | cut -d' ' -f1); b=$(sha256sum < "$rootfs/$rel" | cut -d' ' -f1)
        [[ $a == "$b" ]] || { echo "MISMATCH: $rel" >&2; exit 1; }
        checked=$((checked + 1))
    done < <(cd "$rootfs" && { printf '%s\0' "$stat_file"; find . -type f -print0 | shuf -z -n 8 --random-source=<(yes); })
    [[ $(find "$mnt" -type f | wc -l) == $(find "$rootfs" -type f | wc -l) ]] || { echo "file count differs" >&2; exit 1; }
    echo "nydus verify: sha256 of $checked files matches ROOTFS; registry 206 responses: $(( $(reg_206) - r0 ))"
    stop_nydusd
    mountpoint -q "$mnt" && { echo "still mounted" >&2; exit 1; }
    echo "nydusd $("$bin/nydusd" --version 2>/dev/null | awk '/Version:|Git Commit:/ {printf "%s ", $NF}')," \
        "RAFS v$fs_version, $compressor, 1 MiB chunks, $digester, cache.validate=true," \
        "digest_validate=$validate_rafs, $fuse_threads FUSE threads" > "$work/setup.txt"
    cat "$work/setup.txt"
}

start() {
    fresh_cache
    local r0 t0 t1
    r0=$(reg_206)
    t0=$(now)
    start_nydusd
    wait_for "$mnt/$stat_file"
    t1=$(now)
    echo "$(elapsed "$t0" "$t1") $(( $(reg_206) - r0 ))"
}

walk() {
    local r0 c0 c1 t0 t1 rss reqs cache_kib
    fresh_cache
    start_nydusd
    until mountpoint -q "$mnt"; do  # mountpoint(1) stats the mount root: nydusd is serving
        kill -0 "$nydusd_pid" 2>/dev/null || { echo "nydusd died" >&2; exit 1; }; sleep 0.005
    done
    drop_caches
    r0=$(reg_206)
    c0=$(cpu_s "$nydusd_pid")
    t0=$(now)
    (cd "$mnt/small" && find . -type f -print0 | xargs -0 cat > /dev/null)
    t1=$(now)
    c1=$(cpu_s "$nydusd_pid")
    rss=$(awk '/VmHWM/ {print $2}' "/proc/$nydusd_pid/status")
    reqs=$(( $(reg_206) - r0 ))
    cache_kib=$(du -sk "$cache" | cut -f1)
    echo "$(elapsed "$t0" "$t1") $(python3 -c "print(f'{$c1 - $c0:.2f}')") $rss $reqs $cache_kib"
}

$command
