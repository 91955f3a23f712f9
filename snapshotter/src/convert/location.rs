//! Where images come from and go to (`host/repo:tag` or `oci:DIR[:tag]`),
//! and which platform of a multi-platform image to convert.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use lode_common::registry::Reference;
use oci_spec::image::Platform;

use super::error::ConvertError;

/// Prefix of OCI image layout locations.
const LAYOUT_PREFIX: &str = "oci:";

/// An image in a registry or in an OCI image layout directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageLocation {
    Registry(Reference),
    /// `oci:DIR[:tag]`; the tag is matched against
    /// `org.opencontainers.image.ref.name` in `index.json`.
    Layout {
        dir: PathBuf,
        tag: Option<String>,
    },
}

impl FromStr for ImageLocation {
    type Err = ConvertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| ConvertError::BadLocation {
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        let Some(rest) = s.strip_prefix(LAYOUT_PREFIX) else {
            return s
                .parse::<Reference>()
                .map(ImageLocation::Registry)
                .map_err(|e| bad(&e.reason));
        };
        // A colon followed by a slash belongs to the directory name.
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((dir, tag)) if !tag.contains('/') => (dir, Some(tag)),
            _ => (rest, None),
        };
        if dir.is_empty() {
            return Err(bad("missing layout directory after \"oci:\""));
        }
        if tag.is_some_and(str::is_empty) {
            return Err(bad("empty tag after the layout directory"));
        }
        Ok(ImageLocation::Layout {
            dir: PathBuf::from(dir),
            tag: tag.map(str::to_owned),
        })
    }
}

impl fmt::Display for ImageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageLocation::Registry(reference) => write!(f, "{reference}"),
            ImageLocation::Layout { dir, tag: None } => {
                write!(f, "{LAYOUT_PREFIX}{}", dir.display())
            }
            ImageLocation::Layout {
                dir,
                tag: Some(tag),
            } => {
                write!(f, "{LAYOUT_PREFIX}{}:{tag}", dir.display())
            }
        }
    }
}

/// `os/arch[/variant]`, e.g. `linux/arm64/v8`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for PlatformSpec {
    fn default() -> Self {
        Self {
            os: "linux".to_owned(),
            architecture: "amd64".to_owned(),
            variant: None,
        }
    }
}

impl FromStr for PlatformSpec {
    type Err = ConvertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let valid = |p: &&str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        };
        match parts.as_slice() {
            [os, arch] if valid(os) && valid(arch) => Ok(Self {
                os: (*os).to_owned(),
                architecture: (*arch).to_owned(),
                variant: None,
            }),
            [os, arch, variant] if valid(os) && valid(arch) && valid(variant) => Ok(Self {
                os: (*os).to_owned(),
                architecture: (*arch).to_owned(),
                variant: Some((*variant).to_owned()),
            }),
            _ => Err(ConvertError::BadPlatform {
                input: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

impl PlatformSpec {
    /// Whether an index entry's platform is this one. Without a wanted
    /// variant any variant matches; arm64 without a variant counts as v8.
    pub fn matches(&self, platform: &Platform) -> bool {
        if platform.os().to_string() != self.os
            || platform.architecture().to_string() != self.architecture
        {
            return false;
        }
        let Some(want) = &self.variant else {
            return true;
        };
        let default_variant = (self.architecture == "arm64").then_some("v8");
        platform.variant().as_deref().or(default_variant) == Some(want.as_str())
    }

    /// `os/arch[/variant]` of an index entry, for messages.
    pub fn describe(platform: &Platform) -> String {
        let mut out = format!("{}/{}", platform.os(), platform.architecture());
        if let Some(variant) = platform.variant() {
            out.push('/');
            out.push_str(variant);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layout_locations() {
        let loc: ImageLocation = "oci:/tmp/img:v1".parse().unwrap();
        assert_eq!(
            loc,
            ImageLocation::Layout {
                dir: "/tmp/img".into(),
                tag: Some("v1".into())
            }
        );
        let loc: ImageLocation = "oci:/tmp/img".parse().unwrap();
        assert_eq!(
            loc,
            ImageLocation::Layout {
                dir: "/tmp/img".into(),
                tag: None
            }
        );
        let loc: ImageLocation = "oci:rel:dir/sub".parse().unwrap();
        assert_eq!(
            loc,
            ImageLocation::Layout {
                dir: "rel:dir/sub".into(),
                tag: None
            }
        );
        assert_eq!(loc.to_string(), "oci:rel:dir/sub");
        assert!("oci:".parse::<ImageLocation>().is_err());
        assert!("oci::tag".parse::<ImageLocation>().is_err());
        assert!("oci:/x:".parse::<ImageLocation>().is_err());
    }

    #[test]
    fn parses_registry_locations() {
        let loc: ImageLocation = "127.0.0.1:5000/repo:tag".parse().unwrap();
        let ImageLocation::Registry(reference) = &loc else {
            panic!("not a registry location: {loc:?}");
        };
        assert_eq!(reference.registry, "127.0.0.1:5000");
        assert_eq!(reference.tag.as_deref(), Some("tag"));
        let err = "ubuntu".parse::<ImageLocation>().unwrap_err();
        assert!(err.to_string().contains("ubuntu"), "{err}");
    }

    #[test]
    fn parses_and_matches_platforms() {
        let p: PlatformSpec = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            assert!(bad.parse::<PlatformSpec>().is_err(), "{bad}");
        }
        let platform = |json: &str| -> Platform { serde_json::from_str(json).unwrap() };
        let amd64 = platform(r#"{"os":"linux","architecture":"amd64"}"#);
        let arm64 = platform(r#"{"os":"linux","architecture":"arm64"}"#);
        let armv7 = platform(r#"{"os":"linux","architecture":"arm","variant":"v7"}"#);
        assert!(PlatformSpec::default().matches(&amd64));
        assert!(!PlatformSpec::default().matches(&arm64));
        assert!(p.matches(&arm64), "arm64 without variant is v8");
        let v6: PlatformSpec = "linux/arm/v6".parse().unwrap();
        assert!(!v6.matches(&armv7));
        assert!("linux/arm".parse::<PlatformSpec>().unwrap().matches(&armv7));
        assert_eq!(PlatformSpec::describe(&armv7), "linux/arm/v7");
    }
}
