//! TLS for registry requests with the system's root certificates loaded on
//! the first handshake, not when a client is built.
//!
//! reqwest's default rustls set-up reads and parses every root certificate
//! of the system (hundreds of files) when a client is built. Each process
//! that talks to a registry builds one (fsd at start, `lodectl mount`, the
//! snapshotter for each classification), and plain-HTTP registries never
//! need them: loading them made up about a quarter of the CPU of a
//! `lodectl mount` against a loopback registry. This verifier defers the
//! loading to the first certificate it has to check, then verifies exactly
//! as reqwest's own platform verifier does (the same crate, the same roots).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, Error, SignatureScheme};
use rustls_platform_verifier::Verifier;

/// Whether `error` comes from TLS refusing the server (a certificate that
/// does not verify, no roots to verify it with): retrying cannot help.
pub(crate) fn is_tls_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<Error>().is_some() {
            return true;
        }
        // io::Error's source() skips the error it wraps (rustls errors come
        // wrapped in io::Errors, twice): walk into it instead.
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(wrapped) => Some(wrapped as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    false
}

/// How a host's certificate is checked (a `hosts.toml` host's `ca` and
/// `skip_verify`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM files of certificate authorities trusted besides the system's.
    pub ca: Vec<PathBuf>,
    /// Accept any certificate (the handshake is still encrypted).
    pub skip_verify: bool,
    /// Use HTTPS even for a loopback host (an `https://` host of a
    /// `hosts.toml`); otherwise loopback hosts use plain HTTP.
    pub required: bool,
}

/// A rustls client configuration for reqwest (`use_preconfigured_tls`) that
/// loads the system's roots (and `tls.ca`) on first use.
pub(crate) fn client_config(tls: &TlsOptions) -> Result<ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = LazyPlatformVerifier {
        provider: Arc::clone(&provider),
        verifier: OnceLock::new(),
        ca: tls.ca.clone(),
        skip_verify: tls.skip_verify,
    };
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

#[derive(Debug)]
struct LazyPlatformVerifier {
    provider: Arc<CryptoProvider>,
    /// The platform verifier, or why it could not be built (no roots, an
    /// unreadable CA file).
    verifier: OnceLock<Result<Verifier, Error>>,
    ca: Vec<PathBuf>,
    skip_verify: bool,
}

impl LazyPlatformVerifier {
    fn platform(&self) -> Result<&Verifier, Error> {
        self.verifier
            .get_or_init(|| {
                let provider = Arc::clone(&self.provider);
                if self.ca.is_empty() {
                    return Verifier::new(provider);
                }
                Verifier::new_with_extra_roots(extra_roots(&self.ca)?, provider)
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// The certificates of the PEM files `paths`.
fn extra_roots(paths: &[PathBuf]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let mut roots = Vec::new();
    for path in paths {
        let unreadable =
            |e: &dyn std::fmt::Display| Error::General(format!("CA file {}: {e}", path.display()));
        let before = roots.len();
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| unreadable(&e))? {
            roots.push(cert.map_err(|e| unreadable(&e))?);
        }
        if roots.len() == before {
            return Err(unreadable(&"no certificate in it"));
        }
    }
    Ok(roots)
}

impl ServerCertVerifier for LazyPlatformVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if self.skip_verify {
            return Ok(ServerCertVerified::assertion());
        }
        self.platform()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    // Handshake signatures are checked against the server's certificate,
    // not the roots: no need to load them for these.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connect")]
    struct Connect(#[source] std::io::Error);

    #[test]
    fn tls_refusals_are_told_from_other_failures() {
        let refused = Connect(std::io::Error::other(Error::General(
            "No CA certificates were loaded from the system".into(),
        )));
        assert!(is_tls_refusal(&refused));
        assert!(is_tls_refusal(&Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer
        )));
        let reset = Connect(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(!is_tls_refusal(&reset));
    }

    /// What reqwest reports for a server that does not speak TLS: rustls's
    /// error, inside two io::Errors, inside hyper's and reqwest's.
    #[tokio::test]
    async fn a_real_handshake_failure_is_a_refusal() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            use std::io::Write;
            for stream in listener.incoming().flatten().take(1) {
                let _ = (&stream).write_all(b"HTTP/1.1 400 not TLS\r\n\r\n");
            }
        });
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(client_config(&TlsOptions::default()).unwrap())
            .build()
            .unwrap();
        let error = client
            .get(format!("https://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap_err();
        assert!(is_tls_refusal(&error), "{error:?}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let refused = client
            .get(format!("https://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap_err();
        assert!(!is_tls_refusal(&refused), "{refused:?}");
    }
}
