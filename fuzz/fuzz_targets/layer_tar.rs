//! A source image layer through the converter, as `lodectl convert` reads
//! it: sniffed as plain tar, gzip or zstd (`convert::LayerReader`) and
//! applied to a merged tree (`convert::Converter::apply_layer`), twice, as
//! two layers, so that entries meet what an earlier layer left. Nothing may
//! panic; a layer that is accepted gives a bootstrap that opens and
//! verifies. Decompressed input is capped so that a bomb costs little.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use lode_common::format::{Bootstrap, MIN_CHUNK_SIZE};
use lode_snapshotter::convert::{Converter, LayerReader};

/// Most bytes one layer may decompress to.
const MAX_TAR: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut conv = Converter::new(MIN_CHUNK_SIZE, 1, 1);
    for layer in 0..2 {
        let Ok(reader) = LayerReader::open(data) else {
            return;
        };
        let label = format!("#{}", layer + 1);
        let blob = dir.path().join(format!("blob-{layer}"));
        if conv
            .apply_layer(reader.take(MAX_TAR), &label, &blob)
            .is_err()
        {
            return;
        }
        let bootstrap = conv.bootstrap(&[]).expect("accepted layers serialise");
        let opened = Bootstrap::from_bytes(bootstrap).expect("and open");
        opened.verify_all().expect("and verify");
    }
});
