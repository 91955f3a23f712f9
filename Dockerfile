# Builds every Lode binary in one stage and ships them on a slim Debian image,
# with the node installer of misc/kubernetes/lode-node.yaml.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && find target/release -maxdepth 1 -type f -executable -name 'lode*' -exec cp {} /out/ \;

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates fuse3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# For Kubernetes nodes (misc/kubernetes/lode-node.yaml): what the installer
# puts on the node.
COPY misc/lode-snapshotter.service /usr/share/lode/lode-snapshotter.service
COPY misc/kubernetes/install-on-node.sh /usr/local/bin/lode-install-node
ENTRYPOINT ["/usr/local/bin/lodectl"]
