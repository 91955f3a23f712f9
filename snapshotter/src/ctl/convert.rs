//! `lodectl convert [OPTIONS] SOURCE TARGET`

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::Args;
use lode_common::format::rules::check_chunk_size;
use lode_common::format::DEFAULT_CHUNK_SIZE;
use lode_common::registry::RegistryOptions;

use super::{runtime, CtlError};
use crate::convert::{
    convert, prefetch_list, ConvertOptions, ImageLocation, PlatformSpec, DEFAULT_ZSTD_LEVEL,
};

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source image: HOST[:PORT]/REPO[:TAG|@DIGEST] or oci:DIR[:TAG].
    pub source: ImageLocation,
    /// Target image: HOST[:PORT]/REPO[:TAG] or oci:DIR[:TAG] (tag defaults to latest).
    pub target: ImageLocation,
    /// Use plain HTTP for every registry (loopback registries always do).
    #[arg(long)]
    pub plain_http: bool,
    /// Chunk size: a power of two from 64K to 16M (suffixes K and M accepted).
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE, value_parser = parse_chunk_size)]
    pub chunk_size: u32,
    /// Platform to pick from a multi-platform image: OS/ARCH[/VARIANT].
    #[arg(long, default_value = "linux/amd64")]
    pub platform: PlatformSpec,
    /// zstd compression level of chunks.
    #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub zstd_level: i32,
    /// Threads hashing and compressing chunks (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Directory for temporary files (downloaded layers, blobs).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Also write the raw bootstrap to this file.
    #[arg(long)]
    pub bootstrap_out: Option<PathBuf>,
    /// File listing what to prefetch, one entry per line: a path inside
    /// the image, or a path, a tab and a byte range START-END of it, as
    /// `lodectl daemon record` writes (empty lines and lines starting with
    /// '#' are ignored).
    #[arg(long)]
    pub prefetch_paths: Option<PathBuf>,
    /// Docker config with registry credentials (default: $DOCKER_CONFIG or ~/.docker).
    #[arg(long)]
    pub docker_config: Option<PathBuf>,
}

impl ConvertArgs {
    pub fn into_options(self) -> Result<ConvertOptions, CtlError> {
        let prefetch = match &self.prefetch_paths {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|source| CtlError::Io {
                    what: format!("read prefetch list {}", path.display()),
                    source,
                })?;
                prefetch_list::parse(&bytes)
            }
            None => Vec::new(),
        };
        let mut options = ConvertOptions::new(self.source, self.target);
        options.platform = self.platform;
        options.chunk_size = self.chunk_size;
        options.zstd_level = self.zstd_level;
        options.threads = self.threads;
        options.registry = RegistryOptions {
            plain_http: self.plain_http,
            docker_config: self.docker_config,
            ..RegistryOptions::default()
        };
        options.work_dir = self.work_dir;
        options.bootstrap_out = self.bootstrap_out;
        options.prefetch = prefetch;
        options.progress = std::io::stderr().is_terminal();
        Ok(options)
    }
}

pub fn run(args: ConvertArgs, out: &mut dyn Write) -> Result<(), CtlError> {
    let options = args.into_options()?;
    let outcome = runtime()?.block_on(convert(&options))?;
    writeln!(out, "{}", outcome.manifest_digest).map_err(|source| CtlError::Io {
        what: "write to stdout".to_owned(),
        source,
    })
}

/// `65536`, `64K`, `64KiB`, `1M`, `1MiB`.
fn parse_chunk_size(text: &str) -> Result<u32, String> {
    let upper = text.trim().to_ascii_uppercase();
    let (digits, unit) = match upper.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => upper.split_at(i),
        None => (upper.as_str(), ""),
    };
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        _ => return Err(format!("unknown unit {unit:?}")),
    };
    let size = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("{text:?} is not a size"))?;
    check_chunk_size(size).map_err(|e| e.to_string())?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::ctl::{Cli, Command};

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size("65536"), Ok(65536));
        assert_eq!(parse_chunk_size("64K"), Ok(65536));
        assert_eq!(parse_chunk_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_chunk_size("16m"), Ok(16 << 20));
        for bad in ["32K", "32M", "100000", "1G", "", "K", "-1"] {
            assert!(parse_chunk_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn command_line_parses_into_options() {
        let cli = Cli::try_parse_from([
            "lodectl",
            "convert",
            "--plain-http",
            "--chunk-size",
            "256K",
            "--platform",
            "linux/arm64/v8",
            "127.0.0.1:5000/src:v1",
            "oci:/tmp/out:lode",
        ])
        .unwrap();
        let Command::Convert(args) = cli.command else {
            panic!("parsed as another subcommand")
        };
        let options = args.into_options().unwrap();
        assert_eq!(options.chunk_size, 256 << 10);
        assert!(options.registry.plain_http);
        assert_eq!(options.platform.to_string(), "linux/arm64/v8");
        assert_eq!(
            options.target,
            ImageLocation::Layout {
                dir: "/tmp/out".into(),
                tag: Some("lode".into())
            }
        );
        assert!(matches!(options.source, ImageLocation::Registry(_)));

        let defaults = Cli::try_parse_from(["lodectl", "convert", "oci:/a", "oci:/b"]).unwrap();
        let Command::Convert(args) = defaults.command else {
            panic!("parsed as another subcommand")
        };
        let options = args.into_options().unwrap();
        assert_eq!(options.chunk_size, DEFAULT_CHUNK_SIZE);
        assert_eq!(options.platform, PlatformSpec::default());

        for bad in [
            vec!["lodectl", "convert", "oci:/a"],
            vec![
                "lodectl",
                "convert",
                "--chunk-size",
                "3",
                "oci:/a",
                "oci:/b",
            ],
            vec![
                "lodectl",
                "convert",
                "--platform",
                "linux",
                "oci:/a",
                "oci:/b",
            ],
            vec!["lodectl", "convert", "ubuntu", "oci:/b"],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?}");
        }
    }
}
