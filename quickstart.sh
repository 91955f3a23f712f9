#!/usr/bin/env bash
# Quickstart: builds Lode, makes a sample image, converts it to the Lode
# format in a local registry, mounts it lazily and runs a program from it,
# then shows how little of the image was fetched. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")"

[[ $(id -u) -eq 0 ]] || { echo "quickstart.sh needs root (FUSE mount, chroot)" >&2; exit 1; }
tests/install-deps.sh
echo "== building (release)"
cargo build --release --workspace --bins -q
bin=$PWD/target/release

work=$(mktemp -d /var/tmp/lode-quickstart.XXXXXX)
registry_pid=
cleanup() {
    set +e
    "$bin/lodectl" umount --state-dir "$work/state" "$work/mnt" 2>/dev/null
    [[ -n $registry_pid ]] && kill "$registry_pid" 2>/dev/null && wait "$registry_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

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
registry_pid=$!
for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/v2/" > /dev/null && break; sleep 0.05; done
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
"$bin/lodectl" convert "$registry/sample:v1" "$registry/sample:v1-lode"
manifest=$(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$registry/v2/sample/manifests/v1-lode")
image_bytes=$(jq '[.layers[] | select(.annotations["lode.blob"] == "true") | .size] | add' <<< "$manifest")

echo "== mounting lazily"
mkdir -p "$work/mnt"
before=$(date +%s%N)
"$bin/lodectl" mount --state-dir "$work/state" --cache-dir "$work/cache" "$registry/sample:v1-lode" "$work/mnt"
mounted=$(date +%s%N)
echo "-- running /bin/sh from the image:"
chroot "$work/mnt" /bin/sh -c 'cat /etc/motd; ls /app/models | wc -l; head -c 64 /app/assets/asset-7.txt; echo; sha256sum /app/models/model-3.bin'
ran=$(date +%s%N)

# Bytes of data blobs the registry served, from its access log (combined
# format: ... "GET /v2/<repo>/blobs/<digest> HTTP/1.1" <status> <bytes> ...).
data_blobs=$(jq -r '.layers[] | select(.annotations["lode.blob"] == "true") | .digest' <<< "$manifest")
fetched=$(grep -F -f <(echo "$data_blobs") "$work/registry.log" \
    | awk '$6 == "\"GET" && ($9 == 200 || $9 == 206) { sum += $10 } END { print sum + 0 }')
echo
echo "== summary"
echo "mount ready after:      $(( (mounted - before) / 1000000 )) ms (bootstrap fetched, daemon started)"
echo "program ran after:      $(( (ran - mounted) / 1000000 )) ms more"
echo "image data (blobs):     $((image_bytes / 1024 / 1024)) MiB"
echo "fetched from registry:  $((fetched / 1024 / 1024)) MiB ($(( fetched * 100 / image_bytes ))% of the image data)"
