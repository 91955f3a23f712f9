//! A containerd `hosts.toml` (`lode_common::registry::parse_hosts`):
//! `server`, `capabilities`, `[host."URL"]` tables with `capabilities`,
//! `skip_verify`, `ca`, `header`, `override_path`. Nothing may panic; a
//! file that parses gives at least one host, the last being the server, and
//! every host is a name and port only, nothing an URL would read as more.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use lode_common::registry::parse_hosts;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/containerd/certs.d/reg.io/hosts.toml");
    let Ok(hosts) = parse_hosts(text, path, "reg.io", false) else {
        return;
    };
    assert!(!hosts.is_empty(), "the server is always last");
    for host in &hosts {
        assert!(!host.host.is_empty(), "{hosts:?}");
        // A host is an URL's authority: nothing in it may end up as user
        // information, a path, a query or a fragment of the requests' URLs.
        if let Ok(url) = url::Url::parse(&format!("https://{}/v2/", host.host)) {
            assert!(
                url.username().is_empty()
                    && url.password().is_none()
                    && url.path() == "/v2/"
                    && url.query().is_none()
                    && url.fragment().is_none(),
                "host {:?} is more than host[:port]",
                host.host
            );
        }
        assert!(host.ca.iter().all(|ca| ca.is_absolute()), "{hosts:?}");
    }
});
