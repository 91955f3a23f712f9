#!/usr/bin/env bash
# Quickstart: builds Lode, makes a sample image (busybox + 200 MiB of
# application data), converts it to the Lode format in a local registry, runs
# containerd with Lode as its proxy snapshotter, pulls the image lazily and
# runs a container from it. The same image is then pulled and run the usual
# way (containerd's overlayfs snapshotter) for comparison: start times and
# bytes fetched from the registry are printed side by side. Run as root.
set -euo pipefail
cd "$(dirname "$0")"

[[ $(id -u) -eq 0 ]] || { echo "quickstart.sh needs root (containerd, FUSE, overlayfs)" >&2; exit 1; }
tests/install-deps.sh
echo "== building (release)"
cargo build --release --workspace --bins -q
bin=$PWD/target/release

work=$(mktemp -d /var/tmp/lode-quickstart.XXXXXX)
pids=()
cleanup() {
    set +e
    [[ -S $work/containerd.sock ]] && for ns in lazy plain; do
        ctr -a "$work/containerd.sock" -n "$ns" tasks kill -s KILL demo 2>/dev/null
        ctr -a "$work/containerd.sock" -n "$ns" containers rm demo 2>/dev/null
    done
    # Stops containerd, then the snapshotter (--stop-daemons-on-exit: its
    # daemons unmount and exit with it), then the registry.
    for (( i = ${#pids[@]} - 1; i >= 0; i-- )); do
        kill "${pids[i]}" 2>/dev/null && wait "${pids[i]}" 2>/dev/null
    done
    grep -o " $work[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
wait_for() { # wait_for DESCRIPTION COMMAND...: polls for up to 10 s
    local what=$1; shift
    for _ in $(seq 200); do "$@" > /dev/null 2>&1 && return 0; sleep 0.05; done
    echo "timed out waiting for $what" >&2; exit 1
}

echo "== starting a registry on 127.0.0.1"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$work/registry"
cat > "$work/registry.yml" <<YML
version: 0.1
log: { level: warn, formatter: text }
storage: { filesystem: { rootdirectory: $work/registry } }
http: { addr: 127.0.0.1:$port }
YML
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
pids+=($!)
wait_for "the registry" curl -sf "http://127.0.0.1:$port/v2/"
registry=127.0.0.1:$port

echo "== building a sample image (busybox + 200 MiB of application data)"
umoci init --layout "$work/oci" > /dev/null
umoci new --image "$work/oci:sample" > /dev/null
umoci unpack --image "$work/oci:sample" "$work/bundle" > /dev/null
rootfs=$work/bundle/rootfs
mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/app/models" "$rootfs/app/assets"
cp /bin/busybox "$rootfs/bin/busybox"
for applet in sh cat ls wc sha256sum head; do ln -s busybox "$rootfs/bin/$applet"; done
echo "Hello from a lazily loaded Lode image" > "$rootfs/etc/motd"
for i in $(seq 1 20); do head -c $((10 * 1024 * 1024)) /dev/urandom > "$rootfs/app/models/model-$i.bin"; done
for i in $(seq 1 2000); do head -c 1500 /dev/urandom | base64 > "$rootfs/app/assets/asset-$i.txt"; done
umoci config --image "$work/oci:sample" --config.cmd /bin/sh > /dev/null
umoci repack --image "$work/oci:sample" "$work/bundle" > /dev/null
skopeo copy -q --insecure-policy --dest-tls-verify=false "oci:$work/oci:sample" "docker://$registry/sample:v1"

echo "== converting to the Lode format"
RUST_LOG=warn "$bin/lodectl" convert "$registry/sample:v1" "$registry/sample:v1-lode"

echo "== starting lode-snapshotter and containerd"
cat > "$work/lode.toml" <<TOML
root = "$work/lode"
address = "$work/lode.sock"
[daemon]
binary = "$bin/lode-fsd"
[metrics]
address = "127.0.0.1:0"
TOML
"$bin/lode-snapshotter" --config "$work/lode.toml" --stop-daemons-on-exit > "$work/snapshotter.log" 2>&1 &
pids+=($!)
wait_for "lode-snapshotter" test -S "$work/lode.sock"
cat > "$work/containerd.toml" <<TOML
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd.sock"
[proxy_plugins.lode]
  type = "snapshot"
  address = "$work/lode.sock"
TOML
containerd --config "$work/containerd.toml" > "$work/containerd.log" 2>&1 &
pids+=($!)
wait_for "containerd" ctr -a "$work/containerd.sock" version
ctr_() { local ns=$1; shift; ctr -a "$work/containerd.sock" -n "$ns" "$@"; }

# Bytes the registry served for the given blob digests after log line $1
# (combined access log: ... "GET /v2/<repo>/blobs/<digest> HTTP/1.1" <status> <bytes> ...).
log_lines() { wc -l < "$work/registry.log"; }
bytes_served() {
    local from=$1; shift
    tail -n +"$((from + 1))" "$work/registry.log" | grep -F -f <(printf '%s\n' "$@") \
        | awk '$6 == "\"GET" && ($9 == 200 || $9 == 206) { sum += $10 } END { print sum + 0 }'
}
layers_of() {
    curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$registry/v2/sample/manifests/$1" \
        | jq -r '.layers[].digest'
}
demo='cat /etc/motd; ls /app/models | wc -l; head -c 64 /app/assets/asset-7.txt; echo; sha256sum /app/models/model-3.bin'

echo "== lazy: lodectl pull + ctr run --snapshotter lode"
from=$(log_lines)
start=$(date +%s%N)
RUST_LOG=warn "$bin/lodectl" pull --plain-http --address "$work/containerd.sock" --namespace lazy "$registry/sample:v1-lode"
lazy_pull=$(ms_since "$start")
start=$(date +%s%N)
ctr_ lazy run --rm --snapshotter lode "$registry/sample:v1-lode" demo /bin/sh -c "$demo"
lazy_run=$(ms_since "$start")
mapfile -t lode_layers < <(layers_of v1-lode)
lazy_bytes=$(bytes_served "$from" "${lode_layers[@]}")

echo "== plain: ctr image pull + ctr run (overlayfs)"
from=$(log_lines)
start=$(date +%s%N)
ctr_ plain image pull --plain-http "$registry/sample:v1" > /dev/null
plain_pull=$(ms_since "$start")
start=$(date +%s%N)
ctr_ plain run --rm "$registry/sample:v1" demo /bin/sh -c "$demo"
plain_run=$(ms_since "$start")
mapfile -t plain_layers < <(layers_of v1)
plain_bytes=$(bytes_served "$from" "${plain_layers[@]}")

echo
echo "== summary (same image, same container command)"
printf '%-28s %12s %12s\n' "" "lode (lazy)" "overlayfs"
printf '%-28s %9s ms %9s ms\n' "pull" "$lazy_pull" "$plain_pull"
printf '%-28s %9s ms %9s ms\n' "run (start to exit)" "$lazy_run" "$plain_run"
printf '%-28s %9s ms %9s ms\n' "pull + run" "$((lazy_pull + lazy_run))" "$((plain_pull + plain_run))"
printf '%-28s %8s MiB %8s MiB\n' "layer bytes from registry" "$((lazy_bytes / 1048576))" "$((plain_bytes / 1048576))"
