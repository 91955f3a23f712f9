#!/bin/sh
# Installs Lode on the node whose root is mounted at $HOST_ROOT (default
# /host), from the binaries of this image, and starts it with the node's
# systemd; then stays up so that the DaemonSet shows the node's state.
# Run by misc/kubernetes/lode-node.yaml (see docs/kubernetes.md).
#
# The snapshotter runs on the node, not in this pod: containerd needs it
# before it can start any pod, this one included, and the lode-fsd daemons
# must outlive the snapshotter's restarts, which a container's processes do
# not. Binaries are replaced by rename, so running daemons keep theirs;
# systemd's KillMode=process keeps them across the restart.
set -eu
host=${HOST_ROOT:-/host}
on_node() { nsenter --target 1 --mount --uts --ipc --net --pid -- "$@"; }

[ -d "$host/etc/systemd/system" ] || { echo "no systemd under $host/etc: install by hand (docs/kubernetes.md)" >&2; exit 1; }
mkdir -p "$host/usr/local/bin" "$host/etc/lode"
for binary in lode-snapshotter lode-fsd lodectl; do
    cp "/usr/local/bin/$binary" "$host/usr/local/bin/.$binary.new"
    chmod 0755 "$host/usr/local/bin/.$binary.new"
    mv "$host/usr/local/bin/.$binary.new" "$host/usr/local/bin/$binary"
done
if [ ! -e "$host/etc/lode/snapshotter.toml" ]; then
    cp /etc/lode-config/snapshotter.toml "$host/etc/lode/snapshotter.toml"
    echo "wrote /etc/lode/snapshotter.toml"
fi
cp /usr/share/lode/lode-snapshotter.service "$host/etc/systemd/system/lode-snapshotter.service"
on_node systemctl daemon-reload
on_node systemctl enable lode-snapshotter.service
on_node systemctl restart lode-snapshotter.service
echo "lode-snapshotter $(on_node /usr/local/bin/lodectl --version 2>/dev/null || true) running on $(on_node hostname)"
# What is left to do on this node (containerd's and kubelet's configuration).
on_node /usr/local/bin/lodectl doctor --config /etc/lode/snapshotter.toml || true
exec sleep infinity
