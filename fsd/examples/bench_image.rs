//! Builds a synthetic Lode image holding one large file, for measuring the
//! read path: `bench_image OUT_DIR SIZE_MIB [raw|zstd] [registry://HOST:PORT/REPO]`.
//! Writes OUT_DIR/bootstrap and OUT_DIR/blobs/<digest hex>, and with a
//! registry source also pushes the blob there (plain HTTP). Prints the blob digest.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use lode_common::digest::Hasher;
use lode_common::format::{
    write_bootstrap, BlobIndex, BlobInfo, ChunkHash, ChunkIndex, ChunkRecord, ImageTree, Meta,
    Node, NodeKind, DEFAULT_CHUNK_SIZE,
};
use lode_common::registry::{RegistryClient, RegistryOptions};
use lode_fsd::read::backend::BlobSource;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 3,
        "usage: bench_image OUT_DIR SIZE_MIB [raw|zstd] [registry://HOST:PORT/REPO]"
    );
    let out = PathBuf::from(&args[1]);
    let size_mib: u64 = args[2].parse()?;
    let compress = args.get(3).map(String::as_str) == Some("zstd");
    let push: Option<BlobSource> = args.get(4).map(|s| s.parse()).transpose()?;

    std::fs::create_dir_all(out.join("blobs"))?;
    let tmp_blob = out.join("blobs/blob.tmp");
    let mut blob = std::io::BufWriter::new(std::fs::File::create(&tmp_blob)?);
    let mut blob_hasher = Hasher::new();
    let cs = DEFAULT_CHUNK_SIZE as usize;
    let mut chunks = Vec::new();
    let (mut stored_off, mut plain_off) = (0u64, 0u64);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..size_mib {
        // Text-like content: compressible about 3:1 with zstd, never repeating.
        let mut data = Vec::with_capacity(cs);
        while data.len() < cs {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let word = [
                "lorem", "ipsum", "dolor", "sit", "amet", "lode", "chunk", "fuse",
            ][(state % 8) as usize];
            write!(data, "{word}{} ", state % 1000)?;
        }
        data.truncate(cs);
        let stored = if compress {
            zstd::bulk::compress(&data, 1)?
        } else {
            data.clone()
        };
        blob.write_all(&stored)?;
        blob_hasher.update(&stored);
        chunks.push(ChunkRecord {
            digest: ChunkHash::WRITTEN.digest(&data),
            blob: BlobIndex(0),
            compressed_offset: stored_off,
            compressed_size: stored.len() as u32,
            uncompressed_offset: plain_off,
            uncompressed_size: data.len() as u32,
            compressed: compress,
        });
        stored_off += stored.len() as u64;
        plain_off += data.len() as u64;
    }
    blob.flush()?;
    drop(blob);
    let digest = blob_hasher.finish();
    let blob_path = out.join("blobs").join(digest.hex());
    std::fs::rename(&tmp_blob, &blob_path)?;

    let meta = |perm| Meta {
        perm,
        uid: 0,
        gid: 0,
        mtime_sec: 0,
        mtime_nsec: 0,
        xattrs: BTreeMap::new(),
    };
    let mut tree = ImageTree::new(meta(0o755));
    let file = tree.add(Node {
        meta: meta(0o644),
        kind: NodeKind::File {
            size: plain_off,
            chunks: (0..chunks.len() as u32).map(ChunkIndex).collect(),
        },
    });
    if let NodeKind::Dir { entries } = &mut tree.node_mut(ImageTree::ROOT).kind {
        entries.insert(b"big".to_vec(), file);
    }
    let blobs = [BlobInfo {
        digest,
        compressed_size: stored_off,
    }];
    std::fs::write(
        out.join("bootstrap"),
        write_bootstrap(&tree, DEFAULT_CHUNK_SIZE, &blobs, &chunks, &[])?,
    )?;

    if let Some(BlobSource::Registry(reference)) = push {
        let client = RegistryClient::new(RegistryOptions {
            plain_http: true,
            ..RegistryOptions::default()
        })?;
        tokio::runtime::Runtime::new()?
            .block_on(client.push_blob_file(&reference, &digest, &blob_path))?;
    }
    println!("{digest}");
    Ok(())
}
