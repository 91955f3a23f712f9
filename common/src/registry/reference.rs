//! Image references such as `127.0.0.1:5000/library/app:v1` or `host/repo@sha256:...`.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use crate::Digest;

#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    pub input: String,
    pub reason: String,
}

/// A fully qualified image reference. Lode never guesses a default registry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]`
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

/// Longest tag the distribution spec allows.
const MAX_TAG_LEN: usize = 128;
/// Longest repository name the distribution spec allows.
const MAX_REPOSITORY_LEN: usize = 255;

impl Reference {
    /// The same repository, naming `digest`.
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
        }
    }

    /// The same repository, naming `tag`.
    pub fn with_tag(&self, tag: impl Into<String>) -> Self {
        Self {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: Some(tag.into()),
            digest: None,
        }
    }

    /// The registry host without the port (and without IPv6 brackets).
    pub fn host(&self) -> &str {
        split_host_port(&self.registry).0
    }

    /// Whether the registry host is a loopback address or `localhost`.
    pub fn is_loopback(&self) -> bool {
        let host = self.host();
        if host.eq_ignore_ascii_case("localhost") {
            return true;
        }
        match host.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => v4.is_loopback(),
            Ok(IpAddr::V6(v6)) => {
                v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
            Err(_) => false,
        }
    }

    /// What a manifest request names: the digest when there is one, else the
    /// tag, else `latest` (the distribution API's usual default).
    pub(crate) fn manifest_selector(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".to_owned(),
        }
    }
}

/// Splits `host[:port]` / `[v6]:port`; the port part may be empty.
fn split_host_port(registry: &str) -> (&str, Option<&str>) {
    if let Some(rest) = registry.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':')),
            None => (registry, None),
        };
    }
    match registry.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (registry, None),
    }
}

fn validate_registry(registry: &str) -> Result<(), String> {
    if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
        return Err(format!(
            "{registry:?} is not a registry host: the first component must be host[:port] \
             (containing '.' or ':', or 'localhost'); Lode does not assume docker.io"
        ));
    }
    validate_host_port(registry).map_err(|e| format!("{e} in registry {registry:?}"))
}

/// Checks that `host_port` is `host[:port]` and nothing more: DNS labels
/// or an IPv4 address or a bracketed IPv6 address, and a port in 1..=65535.
pub(crate) fn validate_host_port(host_port: &str) -> Result<(), String> {
    if let Some(rest) = host_port.strip_prefix('[') {
        let Some((host, tail)) = rest.split_once(']') else {
            return Err("unclosed '['".to_owned());
        };
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(format!("invalid IPv6 address {host:?}"));
        }
        if !tail.is_empty() && !tail.starts_with(':') {
            return Err("unexpected text after IPv6 address".to_owned());
        }
    }
    let (host, port) = split_host_port(host_port);
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
        if !valid {
            return Err(format!("invalid port {port:?}"));
        }
    }
    if host_port.starts_with('[') {
        return Ok(());
    }
    if host.is_empty() {
        return Err("empty host".to_owned());
    }
    for label in host.split('.') {
        let bytes = label.as_bytes();
        let valid = match (bytes.first(), bytes.last()) {
            (Some(first), Some(last)) => {
                first.is_ascii_alphanumeric()
                    && last.is_ascii_alphanumeric()
                    && bytes
                        .iter()
                        .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            }
            _ => false,
        };
        if !valid {
            return Err(format!("invalid host name {host:?}"));
        }
    }
    Ok(())
}

/// One path component of a repository: lower-case alphanumerics joined by
/// `.`, `_`, `__` or runs of `-`.
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    let mut expect_alnum = true;
    while i < bytes.len() {
        let b = bytes[i];
        if alnum(b) {
            expect_alnum = false;
            i += 1;
            continue;
        }
        if expect_alnum {
            return false;
        }
        let sep_len = match b {
            b'.' => 1,
            b'_' if bytes.get(i + 1) == Some(&b'_') => 2,
            b'_' => 1,
            b'-' => bytes[i..].iter().take_while(|c| **c == b'-').count(),
            _ => return false,
        };
        i += sep_len;
        expect_alnum = true;
    }
    !expect_alnum
}

fn validate_repository(repository: &str) -> Result<(), String> {
    if repository.is_empty() {
        return Err("missing repository after the registry host".to_owned());
    }
    if repository.len() > MAX_REPOSITORY_LEN {
        return Err(format!(
            "repository is longer than {MAX_REPOSITORY_LEN} characters"
        ));
    }
    for component in repository.split('/') {
        if !valid_path_component(component) {
            return Err(format!(
                "invalid repository path component {component:?} (lower-case letters and digits, \
                 separated by '.', '_', '__' or '-')"
            ));
        }
    }
    Ok(())
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let valid = tag.len() <= MAX_TAG_LEN
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid tag {tag:?} (up to {MAX_TAG_LEN} of [A-Za-z0-9_.-], not starting with '.' or '-')"
        ))
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ReferenceError {
            input: s.chars().take(300).collect(),
            reason,
        };
        if s.is_empty() {
            return Err(err("empty reference".to_owned()));
        }
        if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(err(format!("contains the character {c:?}")));
        }
        let (name, digest) = match s.split_once('@') {
            Some((name, digest)) => {
                let digest = digest.parse::<Digest>().map_err(|e| err(e.to_string()))?;
                (name, Some(digest))
            }
            None => (s, None),
        };
        let (registry, path) = name.split_once('/').ok_or_else(|| {
            err("expected registry host[:port]/repository[:tag][@digest]; \
                 Lode does not assume docker.io"
                .to_owned())
        })?;
        validate_registry(registry).map_err(err)?;
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repository, tag)) => (repository, Some(tag)),
            None => (path, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(err)?;
        }
        validate_repository(repository).map_err(err)?;
        Ok(Self {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag: tag.map(str::to_owned),
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const DIGEST: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    fn parse(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s:?} rejected: {e}"))
    }

    #[test]
    fn parses_host_port_repository_and_tag() {
        let r = parse("127.0.0.1:5000/library/app:v1");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "library/app");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.digest, None);
        assert_eq!(r.host(), "127.0.0.1");
    }

    #[test]
    fn parses_digest_with_and_without_tag() {
        let r = parse(&format!("registry.example.com/a/b/c@{DIGEST}"));
        assert_eq!(r.repository, "a/b/c");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.map(|d| d.to_string()).as_deref(), Some(DIGEST));
        let r = parse(&format!("localhost/app:1.0@{DIGEST}"));
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.tag.as_deref(), Some("1.0"));
        assert!(r.digest.is_some());
        assert_eq!(r.manifest_selector(), DIGEST);
    }

    #[test]
    fn parses_ipv6_registry() {
        let r = parse("[::1]:5000/app:latest");
        assert_eq!(r.registry, "[::1]:5000");
        assert_eq!(r.host(), "::1");
        assert!(r.is_loopback());
    }

    #[test]
    fn refuses_to_guess_a_registry() {
        for s in [
            "library/busybox:latest",
            "busybox",
            "busybox:1.36",
            "user/repo",
        ] {
            let e = s.parse::<Reference>().unwrap_err();
            assert!(e.to_string().contains("registry host"), "{s}: {e}");
        }
    }

    #[test]
    fn rejects_malformed_references() {
        let bad = [
            "",
            "host.example.com",
            "host.example.com/",
            "host.example.com/Upper",
            "host.example.com/a//b",
            "host.example.com/a/",
            "host.example.com/-a",
            "host.example.com/a___b",
            "host.example.com/a:",
            "host.example.com/a:-tag",
            "host.example.com/a:b/c",
            "host.example.com:/a",
            "host.example.com:0/a",
            "host.example.com:99999/a",
            "host.example.com:50x/a",
            "-host.com/a",
            "host..com/a",
            "[::1/a",
            "[zz]:5000/a",
            "host.com/a@sha256:1234",
            "host.com/a@md5:abc",
            "host.com/a b",
            "host.com/a\n",
        ];
        for s in bad {
            assert!(s.parse::<Reference>().is_err(), "{s:?} accepted");
        }
        let long_tag = format!("host.com/a:{}", "t".repeat(129));
        assert!(long_tag.parse::<Reference>().is_err());
    }

    #[test]
    fn error_names_the_input() {
        let e = "host.com/UPPER:tag".parse::<Reference>().unwrap_err();
        assert!(e.to_string().contains("host.com/UPPER:tag"), "{e}");
        assert!(e.to_string().contains("UPPER"), "{e}");
    }

    #[test]
    fn accepts_repository_separators() {
        for s in [
            "h.io/a.b",
            "h.io/a_b",
            "h.io/a__b",
            "h.io/a---b",
            "h.io/a1/b-2/c.3",
        ] {
            parse(s);
        }
    }

    #[test]
    fn loopback_detection() {
        for s in [
            "localhost/a",
            "localhost:5000/a",
            "127.0.0.1:5000/a",
            "127.8.9.10/a",
            "[::1]/a",
            "LOCALHOST:1/a",
        ] {
            assert!(parse(s).is_loopback(), "{s}");
        }
        for s in [
            "10.0.0.1:5000/a",
            "registry.example.com/a",
            "[::2]:5000/a",
            "localhost.example.com/a",
        ] {
            assert!(!parse(s).is_loopback(), "{s}");
        }
    }

    #[test]
    fn with_digest_and_with_tag_replace_the_selector() {
        let r = parse("h.io/app:v1");
        let d: Digest = DIGEST.parse().unwrap();
        assert_eq!(r.with_digest(d).to_string(), format!("h.io/app@{DIGEST}"));
        assert_eq!(r.with_digest(d).with_tag("v2").to_string(), "h.io/app:v2");
        assert_eq!(parse("h.io/app").manifest_selector(), "latest");
    }

    fn component() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-z0-9]{1,5}(([._]|__|-{1,3})[a-z0-9]{1,5}){0,2}").unwrap()
    }

    fn reference_text() -> impl Strategy<Value = String> {
        (
            prop_oneof![
                Just("localhost".to_owned()),
                Just("127.0.0.1:5000".to_owned()),
                Just("[::1]:443".to_owned()),
                proptest::string::string_regex("[a-z0-9]{1,8}\\.[a-z]{2,4}(:[1-9][0-9]{0,3})?")
                    .unwrap(),
            ],
            proptest::collection::vec(component(), 1..4),
            proptest::option::of(
                proptest::string::string_regex("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}").unwrap(),
            ),
            proptest::option::of(any::<[u8; 32]>()),
        )
            .prop_map(|(host, components, tag, digest)| {
                let mut s = format!("{host}/{}", components.join("/"));
                if let Some(tag) = tag {
                    s.push(':');
                    s.push_str(&tag);
                }
                if let Some(digest) = digest {
                    s.push('@');
                    s.push_str(&Digest::from_bytes(digest).to_string());
                }
                s
            })
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(s in "\\PC{0,80}") {
            let _ = s.parse::<Reference>();
        }

        #[test]
        fn never_panics_on_reference_like_text(s in "[a-zA-Z0-9.:/@_\\[\\]-]{0,60}") {
            if let Ok(r) = s.parse::<Reference>() {
                let _ = r.is_loopback();
                prop_assert_eq!(r.to_string().parse::<Reference>().ok(), Some(r));
            }
        }

        #[test]
        fn valid_references_round_trip(s in reference_text()) {
            let r: Reference = s.parse().map_err(|e: ReferenceError| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(r.to_string(), s);
        }
    }
}
