//! The conversion pipeline: resolve the source, convert layer after layer
//! (downloading the next layer while converting the current one), write the
//! bootstrap, package and publish.

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use indicatif::ProgressBar;
use lode_common::format::rules::check_chunk_size;
use lode_common::format::{Bootstrap, NodeKind, PrefetchSpan};
use lode_common::registry::RegistryClient;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::chunks::LayerBlob;
use super::decompress::{HashingReader, LayerCompression, LayerReader};
use super::error::ConvertError;
use super::layer::{Converter, LayerStats};
use super::location::ImageLocation;
use super::package::{lode_config, lode_manifest, write_bootstrap_layer};
use super::path::{components, escape};
use super::prefetch_list::Listed;
use super::progress::Progress;
use super::source::{LocalLayer, Source, SourceLayer};
use super::target::{Artifacts, Target, DEFAULT_LAYOUT_TAG};
use super::{ConvertOptions, ConvertOutcome};

/// Converts the image `options.source` names and publishes it at
/// `options.target`.
pub async fn convert(options: &ConvertOptions) -> Result<ConvertOutcome, ConvertError> {
    let started = Instant::now();
    check_chunk_size(options.chunk_size)?;
    let mut client = None;
    let source = match &options.source {
        ImageLocation::Registry(reference) => Source::Registry {
            client: shared_client(&mut client, options)?,
            reference: reference.clone(),
        },
        ImageLocation::Layout { dir, tag } => Source::Layout {
            dir: dir.clone(),
            tag: tag.clone(),
        },
    };
    let target = match &options.target {
        ImageLocation::Registry(reference) => Target::Registry {
            client: shared_client(&mut client, options)?,
            reference: reference.clone(),
        },
        ImageLocation::Layout { dir, tag } => Target::Layout {
            dir: dir.clone(),
            tag: tag.clone().unwrap_or_else(|| DEFAULT_LAYOUT_TAG.to_owned()),
        },
    };
    let image_name = options.source.to_string();
    let progress = Progress::new(options.progress);

    let spinner = progress.spinner(format!("resolving {image_name}"));
    let image = source.resolve(&options.platform).await?;
    spinner.finish_and_clear();
    info!(
        source = %image_name,
        manifest = %image.manifest_digest,
        layers = image.layers.len(),
        "converting"
    );

    let work_parent = options.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("lode-convert-")
        .tempdir_in(&work_parent)
        .map_err(ConvertError::io(format!(
            "create a working directory in {}",
            work_parent.display()
        )))?;
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };

    let mut conv = Converter::new(options.chunk_size, options.zstd_level, threads);
    let mut blobs: Vec<LayerBlob> = Vec::new();
    let mut blob_of_layer = Vec::new();
    let mut layer_stats = Vec::new();
    let total = image.layers.len();
    let fetch = |i: usize| {
        let source = source.clone();
        let layer = image.layers[i].clone();
        let scratch = work.path().to_path_buf();
        AbortOnDrop(tokio::spawn(async move {
            source.fetch_layer(&layer, &scratch).await
        }))
    };
    let mut next = (total > 0).then(|| fetch(0));
    for (i, layer) in image.layers.iter().enumerate() {
        let Some(mut fetching) = next.take() else {
            break;
        };
        let layer_started = Instant::now();
        let local = (&mut fetching.0)
            .await
            .map_err(|e| ConvertError::Task(e.to_string()))??;
        next = (i + 1 < total).then(|| fetch(i + 1));

        let label = format!("#{}/{total} {}", i + 1, layer.digest);
        let bar = progress.bytes(layer.size, format!("layer {}/{total}", i + 1));
        let blob_path = work.path().join(format!("blob-{i}"));
        let layer_owned = layer.clone();
        let task_label = label.clone();
        let bar_for_task = bar.clone();
        let (returned, result) = tokio::task::spawn_blocking(move || {
            let result = convert_layer(
                &mut conv,
                &local,
                &layer_owned,
                &task_label,
                &blob_path,
                bar_for_task,
            );
            if local.temporary {
                if let Err(e) = std::fs::remove_file(&local.path) {
                    warn!(path = %local.path.display(), error = %e, "cannot remove downloaded layer");
                }
            }
            (conv, result)
        })
        .await
        .map_err(|e| ConvertError::Task(e.to_string()))?;
        conv = returned;
        let (blob, stats) = result?;
        bar.finish_and_clear();
        info!(
            layer = %label,
            files = stats.files,
            dirs = stats.dirs,
            whiteouts = stats.whiteouts,
            file_bytes = stats.chunks.file_bytes,
            chunks = stats.chunks.chunks,
            new_chunks = stats.chunks.new_chunks,
            stored_bytes = stats.chunks.stored_bytes,
            blob = blob.as_ref().map(|b| b.digest.to_string()).unwrap_or_else(|| "none".to_owned()),
            elapsed_ms = layer_started.elapsed().as_millis() as u64,
            "converted layer"
        );
        blob_of_layer.push(blob.as_ref().map(|b| b.digest));
        blobs.extend(blob);
        layer_stats.push(stats);
    }

    let prefetch = prefetch_spans(&conv, &options.prefetch);
    let digests_before: Vec<_> = blobs.iter().map(|b| b.digest).collect();
    let (conv, blobs, bootstrap) = tokio::task::spawn_blocking(move || {
        let mut blobs = blobs;
        let bytes = conv
            .store
            .front_load(conv.tree.tree_mut(), &prefetch, &mut blobs)
            .and_then(|()| conv.bootstrap(&prefetch))
            .and_then(|bytes| {
                Bootstrap::from_bytes(bytes.clone())?.verify_all()?;
                Ok(bytes)
            });
        (conv, blobs, bytes)
    })
    .await
    .map_err(|e| ConvertError::Task(e.to_string()))?;
    let bootstrap = bootstrap?;
    // Blobs the prefetch list reordered have new digests.
    for (before, blob) in digests_before.iter().zip(&blobs) {
        for layer_blob in blob_of_layer.iter_mut().flatten() {
            if layer_blob == before {
                *layer_blob = blob.digest;
            }
        }
    }
    if let Some(path) = &options.bootstrap_out {
        std::fs::write(path, &bootstrap)
            .map_err(ConvertError::io(format!("write {}", path.display())))?;
    }
    let boot_layer = write_bootstrap_layer(&bootstrap, &work.path().join("bootstrap.tar.gz"))?;
    let config = lode_config(
        &image_name,
        &image.config,
        &blob_of_layer,
        boot_layer.diff_id,
    )?;
    let manifest = lode_manifest(&config, &blobs, &boot_layer, image.manifest_digest)?;

    let spinner = progress.spinner(format!("publishing to {}", options.target));
    let manifest_digest = target
        .publish(&Artifacts {
            blobs: &blobs,
            bootstrap: &boot_layer,
            config: &config,
            manifest: &manifest,
        })
        .await?;
    spinner.finish_and_clear();

    let store = &conv.store;
    info!(
        target = %options.target,
        manifest = %manifest_digest,
        inodes = conv.tree.tree().nodes.len(),
        unique_chunks = store.records().len(),
        blobs = blobs.len(),
        bootstrap_bytes = bootstrap.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "published Lode image"
    );
    Ok(ConvertOutcome {
        manifest_digest,
        manifest,
        config_digest: lode_common::Digest::of(&config),
        source_manifest_digest: image.manifest_digest,
        blobs: blobs.iter().map(|b| (b.digest, b.size)).collect(),
        bootstrap_layer: boot_layer.digest,
        bootstrap_diff_id: boot_layer.diff_id,
        bootstrap_size: bootstrap.len() as u64,
        layers: layer_stats,
    })
}

/// One registry client for source and target (they share connections and
/// tokens), made only when a registry is involved.
fn shared_client(
    slot: &mut Option<RegistryClient>,
    options: &ConvertOptions,
) -> Result<RegistryClient, ConvertError> {
    if let Some(client) = slot {
        return Ok(client.clone());
    }
    let client = RegistryClient::new(options.registry.clone())?;
    *slot = Some(client.clone());
    Ok(client)
}

/// Applies one downloaded layer, checking its digest when nobody has yet.
fn convert_layer(
    conv: &mut Converter,
    local: &LocalLayer,
    layer: &SourceLayer,
    label: &str,
    blob_path: &Path,
    bar: ProgressBar,
) -> Result<(Option<LayerBlob>, LayerStats), ConvertError> {
    let read_err = |source| ConvertError::LayerRead {
        layer: label.to_owned(),
        source,
    };
    let file = File::open(&local.path).map_err(read_err)?;
    let raw = HashingReader::new(bar.wrap_read(file), !local.verified);
    let mut reader = LayerReader::open(raw).map_err(read_err)?;
    let claimed = LayerCompression::from_media_type(&layer.media_type);
    if claimed.is_some_and(|c| c != reader.compression()) {
        debug!(
            layer = %label,
            media_type = %layer.media_type,
            actual = ?reader.compression(),
            "layer compression differs from its media type"
        );
    }
    let result = conv.apply_layer(&mut reader, label, blob_path)?;
    let (digest, _) = reader.finish().map_err(read_err)?.finish();
    if let Some(actual) = digest {
        if actual != layer.digest {
            return Err(ConvertError::LayerDigest {
                layer: label.to_owned(),
                expected: layer.digest,
                actual,
            });
        }
    }
    Ok(result)
}

/// The chunks of the prefetch list's entries, in order: a whole file's, or
/// those holding a listed byte range. Names that are not regular files in
/// the image, and ranges past a file's end, are skipped with a warning (a
/// list written for an older image should not stop a conversion).
fn prefetch_spans(conv: &Converter, list: &[Listed]) -> Vec<PrefetchSpan> {
    let cs = u64::from(conv.store.chunk_size());
    let mut out = Vec::new();
    for entry in list {
        let found = components(&entry.path)
            .ok()
            .and_then(|parts| conv.tree.lookup(&parts))
            .and_then(|id| match &conv.tree.tree().node(id).kind {
                NodeKind::File { chunks, .. } => Some((id, chunks.len() as u64)),
                _ => None,
            });
        let Some((node, count)) = found else {
            warn!(path = %escape(&entry.path), "prefetch path is not a regular file in the image; skipped");
            continue;
        };
        let (first, end) = match &entry.bytes {
            None => (0, count),
            Some(bytes) => (bytes.start / cs, bytes.end.div_ceil(cs).min(count)),
        };
        if first >= end {
            if entry.bytes.is_some() {
                warn!(path = %escape(&entry.path), bytes = ?entry.bytes, "prefetch range is past the file's end; skipped");
            }
            continue;
        }
        // Chunk numbers of a file fit in u32 (the format's limit, checked
        // when the file was chunked). Repeats are left to the writer, which
        // drops them, and to front_load, which moves a chunk once.
        out.push(PrefetchSpan {
            node,
            chunks: first as u32..end as u32,
        });
    }
    out
}

/// A spawned task that is cancelled if its result is no longer wanted.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
