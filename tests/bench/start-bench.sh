#!/usr/bin/env bash
# Cold container starts of real images through containerd: containerd's own
# pull onto overlayfs (`ctr image pull`, `ctr run`) against Lode (`lodectl
# pull`, `ctr run --snapshotter lode`), with the registry on loopback and
# behind emulated links (lan, region, far). Every start is cold: no image,
# content, snapshot or Lode cache, no image served (Lode's shared daemon
# runs with the snapshotter, idle), and the page cache dropped. Prints per
# link, image and workload the median pull and run times, their sum, its
# ratio to overlayfs, the bytes and requests the registry served, and for
# Lode the floor (stored bytes of the chunks read, plus the bootstrap); fails
# if Lode did not fetch well under half of what overlayfs fetched.
#
# The images (Debian bookworm, built with debootstrap and umoci as OCI layouts
# under LODE_START_IMAGES, default /var/tmp/lode-start-images, and reused):
#   python  3 layers (base system; /usr/share; Python's library and /app).
#           "light": python3 -c 'print(json.dumps(...))'; "heavy":
#           /app/heavy.py reads an 8 MiB file and imports a dozen modules.
#   node    2 layers (base system; Node.js, its libraries and CA certificates).
#           "start": node -e 'console.log(...)'.
# The first run downloads packages from the Debian mirror in apt's sources
# (else deb.debian.org; LODE_DEBIAN_MIRROR overrides).
#
# Needs root. Builds the release binaries if missing. BENCH_ROUNDS (5): cold
# starts per cell, the median shown; BENCH_PROFILES ("loopback lan region
# far"): the links measured.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Bump when an image recipe below changes: older caches are then ignored.
images_version=bookworm-1
cache=${LODE_START_IMAGES:-/var/tmp/lode-start-images}/$images_version
tag=bench
rounds=${BENCH_ROUNDS:-5}
profiles=${BENCH_PROFILES:-loopback lan region far}

[[ $(id -u) -eq 0 ]] || { echo "the benchmark needs root (containerd, FUSE, drop_caches)" >&2; exit 1; }
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_ROUNDS must be a positive number, not '$rounds'" >&2; exit 1; }
for p in $profiles; do
    [[ $p =~ ^(loopback|lan|region|far)$ ]] || { echo "BENCH_PROFILES: no profile '$p' (loopback, lan, region, far)" >&2; exit 1; }
done
tests/install-deps.sh
for tool in debootstrap umoci skopeo jq; do
    command -v "$tool" > /dev/null || { echo "$tool is missing: apt-get install $tool" >&2; exit 1; }
done
for b in lodectl lode-snapshotter lode-fsd; do
    [[ -x target/release/$b ]] || { cargo build --release --workspace --bins --quiet; break; }
done

# The Debian mirror apt uses: the first source of the bookworm suite, else
# the first URI ending in /debian, from one-line (.list) and deb822
# (.sources) files.
debian_mirror() {
    python3 - <<'PY'
import glob, re
entries = []  # (uri, suites)
for path in sorted(glob.glob("/etc/apt/sources.list") + glob.glob("/etc/apt/sources.list.d/*.list")
                   + glob.glob("/etc/apt/sources.list.d/*.sources")):
    text = open(path).read()
    if path.endswith(".list"):
        for m in re.finditer(r"^[ \t]*deb[ \t]+(?:\[[^\]]*\][ \t]+)?(\S+)[ \t]+(\S+)", text, re.M):
            entries.append((m[1], [m[2]]))
        continue
    for para in re.split(r"\n[ \t]*\n", text):
        # Field lines only: skip comments and continuation lines.
        fields = {k.lower(): v.split() for k, v in re.findall(r"^([^#\s][^:]*):(.*)$", para, re.M)}
        if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"])[0].lower() != "no":
            entries += [(uri, fields.get("suites", [])) for uri in fields.get("uris", [])]
entries = [(u.rstrip("/"), s) for u, s in entries if re.match(r"(https?|file):", u)]
found = [u for u, s in entries if "bookworm" in s] + [u for u, s in entries if u.endswith("/debian")]
print(found[0] if found else "http://deb.debian.org/debian")
PY
}

# The paths (./usr/bin/node, ...) of the files and symlinks that the
# packages named after the rootfs add to a minbase system: packages their
# dependencies reach that apt and the required packages do not.
added_files() {
    python3 - "$@" <<'PY'
import glob, os, re, sys
root, wanted = os.path.realpath(sys.argv[1]), sys.argv[2:]
deps, providers, base = {}, {}, ["apt"]
for para in open(f"{root}/var/lib/dpkg/status").read().split("\n\n"):
    f = dict(re.findall(r"^(\S+): (.*)$", para, re.M))
    if "install ok installed" not in f.get("Status", ""):
        continue
    names = lambda field: [n for n in (re.split(r"[\s(:]", d.strip())[0]
                                       for d in re.split(r"[,|]", f.get(field, ""))) if n]
    deps[f["Package"]] = names("Depends") + names("Pre-Depends")
    for p in names("Provides"):
        providers.setdefault(p, []).append(f["Package"])
    if f.get("Priority") == "required":
        base.append(f["Package"])
def closure(roots):
    seen, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        new = [m for m in ([n] if n in deps else providers.get(n, [])) if m not in seen]
        seen.update(new)
        todo += [d for m in new for d in deps[m]]
    return seen
added = sorted(closure(wanted) - closure(base))
print("packages in the layer:", " ".join(added), file=sys.stderr)
paths = set()
for pkg in added:
    for lst in glob.glob(f"{root}/var/lib/dpkg/info/{pkg}.list") + glob.glob(f"{root}/var/lib/dpkg/info/{pkg}:*.list"):
        for path in open(lst).read().split("\n"):
            full = root + path
            if path and (os.path.islink(full) or os.path.isfile(full)):
                # Canonical path: /lib/x/y is ./usr/lib/x/y in a merged-/usr system.
                real = os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
                paths.add("." + real[len(root):])
print("\n".join(sorted(paths)))
PY
}

# layer WORK DESCRIPTION TAR-ARGS...: copies what `tar` selects from the
# scratch rootfs into the bundle and repacks the bundle as one more layer.
layer() {
    local work=$1 what=$2
    shift 2
    tar -C "$work/rootfs" --numeric-owner -cf - "$@" | tar -C "$work/bundle/rootfs" --numeric-owner -xpf -
    umoci repack --refresh-bundle --history.created_by "$what" --image "$work/oci:$tag" "$work/bundle"
}

layers_python() {
    local work=$1 root=$1/rootfs
    mkdir -p "$root/app"
    head -c $((8 << 20)) /dev/urandom > "$root/app/data.bin"
    cat > "$root/app/heavy.py" <<'PY'
import importlib
with open("/app/data.bin", "rb") as f:
    assert len(f.read()) == 8 << 20
try:
    import sqlite3
except ImportError:
    import csv
for name in ["json", "email", "http.client", "xml.etree.ElementTree", "decimal", "argparse",
             "logging", "asyncio", "unittest", "urllib.request", "zipfile"]:
    importlib.import_module(name)
print("heavy ok")
PY
    local py=("$root"/usr/lib/python3*)
    layer "$work" "Debian bookworm minbase" --anchored \
        --exclude=./usr/share --exclude='./usr/lib/python3*' --exclude=./app .
    layer "$work" "/usr/share" ./usr/share
    layer "$work" "Python library and /app" "${py[@]/#"$root"/.}" ./app
}

layers_node() {
    local work=$1
    added_files "$work/rootfs" nodejs ca-certificates > "$work/runtime.list"
    layer "$work" "Debian bookworm minbase" --anchored --no-wildcards -X "$work/runtime.list" .
    layer "$work" "Node.js runtime" --no-recursion -T "$work/runtime.list"
}

# build NAME PACKAGE CMD: the OCI layout $cache/NAME, unless already there:
# debootstrap with PACKAGE into a scratch rootfs, layers_NAME, then config.
build_image() {
    local name=$1 package=$2 cmd=$3 start=$SECONDS work
    [[ -f $cache/$name/index.json ]] && return
    mkdir -p "$cache"
    work=$(mktemp -d "$cache/build-$name.XXXXXX")
    scratch+=("$work")
    echo "== building the $name image (debootstrap $package from $mirror)"
    debootstrap --variant=minbase --include="$package" bookworm "$work/rootfs" "$mirror" \
        > "$work/debootstrap.log" 2>&1 \
        || { tail -n 30 "$work/debootstrap.log" >&2; echo "debootstrap of $name failed" >&2; exit 1; }
    # What a container image leaves out: device nodes, downloaded packages,
    # apt's indexes, logs, the build host's resolver and name.
    (cd "$work/rootfs" && rm -rf --one-file-system dev/* var/cache/apt/archives/*.deb \
        var/cache/apt/*.bin var/lib/apt/lists/* var/log/*.log etc/resolv.conf etc/hostname)
    umoci init --layout "$work/oci"
    umoci new --image "$work/oci:$tag"
    umoci unpack --image "$work/oci:$tag" "$work/bundle" > /dev/null
    "layers_$name" "$work"
    umoci config --image "$work/oci:$tag" --history.created_by "config" \
        --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --config.env LANG=C.UTF-8 --config.cmd "$cmd"
    umoci gc --layout "$work/oci"
    mv "$work/oci" "$cache/$name"
    rm -rf --one-file-system "$work"
    echo "$name: built in $((SECONDS - start)) s"
}

# The compressed layer sizes of image NAME (its layout holds one manifest).
layer_sizes() {
    local manifest
    manifest=$(jq -r '.manifests[0].digest | sub("sha256:"; "")' "$cache/$1/index.json")
    jq -r --arg name "$1" '[.layers[].size] | "\($name): \(length) layers, \(add) bytes compressed (\(map(tostring) | join(" + ")))"' \
        "$cache/$1/blobs/sha256/$manifest"
}

scratch=()
trap '((${#scratch[@]})) && rm -rf --one-file-system "${scratch[@]}"' EXIT
mirror=${LODE_DEBIAN_MIRROR:-$(debian_mirror)}
build_image python python3 python3
build_image node nodejs,ca-certificates node
layer_sizes python
layer_sizes node

plan=$cache/plan.json
jq -n --arg python "$cache/python" --arg node "$cache/node" --arg tag "$tag" \
    --arg light "import json; print(json.dumps({'ok': 1}))" --arg start "console.log('node ok')" \
    --arg profiles "$profiles" --argjson rounds "$rounds" '{
    images: [
        {name: "python", layout: $python, tag: $tag, workloads: [
            {name: "light", args: ["python3", "-c", $light], expect: "{\"ok\": 1}"},
            {name: "heavy", args: ["python3", "/app/heavy.py"], expect: "heavy ok"}]},
        {name: "node", layout: $node, tag: $tag, workloads: [
            {name: "start", args: ["node", "-e", $start], expect: "node ok"}]}],
    profiles: ($profiles | split(" ") | map(select(. != ""))),
    rounds: $rounds}' > "$plan"

echo "== cold starts: $rounds round(s) on $profiles"
log=$cache/start-bench.log
status=0
LODE_START_BENCH=$plan cargo test --release --quiet -p lode-tests --test start_bench \
    -- --nocapture --test-threads=1 > "$log" 2>&1 || status=$?
# The table, then why the test failed or was skipped (first line of each).
sed -n '/^cold starts/,/^$/p' "$log"
awk '/^SKIPPED/ { print } p { print; p = 0 } /^thread .* panicked at/ { p = 1 }' "$log"
if ((status)) || ! grep -q '^cold starts' "$log"; then
    echo "the start benchmark failed or was skipped; its output is in $log" >&2
    exit $((status ? status : 1))
fi
