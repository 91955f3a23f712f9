//! Opens a layer blob as a tar stream: gzip, zstd or plain, recognised by
//! magic bytes (media types are often wrong, e.g. `tar+gzip` on a zstd
//! blob), optionally hashing the compressed bytes on the way.

use std::io::{self, BufRead, BufReader, Read};

use lode_common::digest::Hasher;
use lode_common::Digest;

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    /// What the media type claims, if it says.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        if media_type.ends_with("+gzip") || media_type.ends_with(".tar.gzip") {
            Some(Self::Gzip)
        } else if media_type.ends_with("+zstd") || media_type.ends_with(".tar.zstd") {
            Some(Self::Zstd)
        } else if media_type.ends_with(".tar") {
            Some(Self::None)
        } else {
            None
        }
    }
}

/// Layer media types the converter reads (the compression itself is sniffed).
pub fn is_layer_media_type(media_type: &str) -> bool {
    const PREFIXES: [&str; 4] = [
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
    ];
    PREFIXES.iter().any(|prefix| {
        media_type
            .strip_prefix(prefix)
            .is_some_and(|rest| matches!(rest, "" | "+gzip" | "+zstd" | ".gzip" | ".zstd"))
    })
}

/// Counts and optionally hashes what is read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Option<Hasher>,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R, hash: bool) -> Self {
        Self {
            inner,
            hasher: hash.then(Hasher::new),
            bytes: 0,
        }
    }

    /// The digest of everything read (if hashing), and the byte count.
    pub fn finish(self) -> (Option<Digest>, u64) {
        (self.hasher.map(Hasher::finish), self.bytes)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&buf[..n]);
        }
        self.bytes += n as u64;
        Ok(n)
    }
}

/// A decompressing reader over a layer blob.
pub enum LayerReader<R: Read> {
    Plain(BufReader<R>),
    Gzip(flate2::bufread::MultiGzDecoder<BufReader<R>>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<R>>),
}

impl<R: Read> LayerReader<R> {
    /// Looks at the first bytes of `raw` and wraps it in the matching decoder.
    pub fn open(raw: R) -> io::Result<Self> {
        let mut buffered = BufReader::with_capacity(256 << 10, raw);
        let head = buffered.fill_buf()?;
        Ok(if head.starts_with(GZIP_MAGIC) {
            LayerReader::Gzip(flate2::bufread::MultiGzDecoder::new(buffered))
        } else if head.starts_with(ZSTD_MAGIC) {
            LayerReader::Zstd(zstd::stream::read::Decoder::with_buffer(buffered)?)
        } else {
            LayerReader::Plain(buffered)
        })
    }

    pub fn compression(&self) -> LayerCompression {
        match self {
            LayerReader::Plain(_) => LayerCompression::None,
            LayerReader::Gzip(_) => LayerCompression::Gzip,
            LayerReader::Zstd(_) => LayerCompression::Zstd,
        }
    }

    /// Reads the rest of the stream (what follows the tar's end marker must
    /// still decompress cleanly) and of the blob, and returns the raw reader.
    pub fn finish(mut self) -> io::Result<R> {
        io::copy(&mut self, &mut io::sink())?;
        let mut raw = match self {
            LayerReader::Plain(r) => r,
            LayerReader::Gzip(d) => d.into_inner(),
            LayerReader::Zstd(d) => d.finish(),
        };
        io::copy(&mut raw, &mut io::sink())?;
        Ok(raw.into_inner())
    }
}

impl<R: Read> Read for LayerReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            LayerReader::Plain(r) => r.read(buf),
            LayerReader::Gzip(r) => r.read(buf),
            LayerReader::Zstd(r) => r.read(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn sample() -> Vec<u8> {
        (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    fn roundtrip(compressed: Vec<u8>, expect: LayerCompression) {
        let raw = HashingReader::new(&compressed[..], true);
        let mut reader = LayerReader::open(raw).unwrap();
        assert_eq!(reader.compression(), expect);
        let mut head = vec![0u8; 1000];
        reader.read_exact(&mut head).unwrap();
        assert_eq!(head, sample()[..1000]);
        let (digest, bytes) = reader.finish().unwrap().finish();
        assert_eq!(digest, Some(Digest::of(&compressed)));
        assert_eq!(bytes, compressed.len() as u64);
    }

    #[test]
    fn sniffs_and_drains_every_compression() {
        roundtrip(sample(), LayerCompression::None);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&sample()).unwrap();
        roundtrip(gz.finish().unwrap(), LayerCompression::Gzip);
        roundtrip(
            zstd::bulk::compress(&sample(), 3).unwrap(),
            LayerCompression::Zstd,
        );
    }

    #[test]
    fn reads_multi_member_gzip() {
        let mut data = Vec::new();
        for part in [&b"first "[..], b"second"] {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(part).unwrap();
            data.extend(gz.finish().unwrap());
        }
        let mut text = String::new();
        LayerReader::open(&data[..])
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "first second");
    }

    #[test]
    fn trailing_garbage_after_gzip_is_an_error() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"data").unwrap();
        let mut data = gz.finish().unwrap();
        data.extend_from_slice(b"garbage!");
        assert!(LayerReader::open(&data[..]).unwrap().finish().is_err());
    }

    #[test]
    fn media_types() {
        assert!(is_layer_media_type(
            "application/vnd.oci.image.layer.v1.tar+gzip"
        ));
        assert!(is_layer_media_type(
            "application/vnd.oci.image.layer.v1.tar"
        ));
        assert!(is_layer_media_type(
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        ));
        assert!(!is_layer_media_type(
            "application/vnd.oci.image.layer.v1.tar+encrypted"
        ));
        assert!(!is_layer_media_type(lode_common::oci::MEDIA_TYPE_DATA_BLOB));
        assert_eq!(
            LayerCompression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(LayerCompression::Gzip)
        );
        assert_eq!(
            LayerCompression::from_media_type("application/vnd.oci.image.layer.v1.tar"),
            Some(LayerCompression::None)
        );
    }
}
