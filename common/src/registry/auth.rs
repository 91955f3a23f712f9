//! Authorization headers per (registry, repository, access), obtained on a
//! 401 through oci-client's challenge handling (bearer token flow, or basic
//! credentials when the registry asks for those).

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use base64::Engine as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;
use reqwest::header::HeaderValue;

use super::credentials::CredentialStore;
use super::transport::{Access, AttemptError};

/// Cached headers: registry → repository → [pull, push].
type HeaderCache = HashMap<String, HashMap<String, [Option<HeaderValue>; 2]>>;

pub(crate) struct Authenticator {
    credentials: CredentialStore,
    cache: RwLock<HeaderCache>,
    /// Serializes re-authentication so that a burst of 401s (an expired
    /// token seen by many concurrent reads) costs one token request.
    refresh: tokio::sync::Mutex<()>,
    /// oci-client performs the challenge/token exchange; one per scheme
    /// (https, http) because its protocol setting is per client. Built on
    /// the first challenge: each loads the system's root certificates, and
    /// anonymous registries never challenge.
    oci: [std::sync::OnceLock<Result<oci_client::Client, String>>; 2],
    timeout: Duration,
}

impl Access {
    fn index(self) -> usize {
        match self {
            Access::Pull => 0,
            Access::Push => 1,
        }
    }

    fn operation(self) -> RegistryOperation {
        match self {
            Access::Pull => RegistryOperation::Pull,
            Access::Push => RegistryOperation::Push,
        }
    }
}

/// What a request is authorized for.
pub(crate) struct Scope<'a> {
    /// `host[:port]` the requests go to.
    pub endpoint: &'a str,
    /// The registry as the user wrote it (credential lookup key).
    pub registry: &'a str,
    pub repository: &'a str,
    pub access: Access,
    pub plain_http: bool,
}

impl Authenticator {
    pub(crate) fn new(credentials: CredentialStore, timeout: Duration) -> Self {
        Self {
            credentials,
            cache: RwLock::new(HashMap::new()),
            refresh: tokio::sync::Mutex::new(()),
            oci: Default::default(),
            timeout,
        }
    }

    /// The oci-client of `scope`'s scheme, built on first use.
    fn oci_client(&self, scope: &Scope<'_>) -> Result<&oci_client::Client, AttemptError> {
        let (slot, protocol) = if scope.plain_http {
            (&self.oci[1], ClientProtocol::Http)
        } else {
            (&self.oci[0], ClientProtocol::Https)
        };
        slot.get_or_init(|| {
            oci_client::Client::try_from(ClientConfig {
                protocol,
                connect_timeout: Some(self.timeout),
                read_timeout: Some(self.timeout),
                user_agent: super::transport::USER_AGENT,
                ..ClientConfig::default()
            })
            .map_err(|e| format!("cannot build the HTTP client for authentication: {e}"))
        })
        .as_ref()
        .map_err(|message| AttemptError::Setup(message.clone()))
    }

    pub(crate) fn credentials(&self) -> &CredentialStore {
        &self.credentials
    }

    /// The header to send, if authentication happened before. A pull may use
    /// a push token (its scope includes pull).
    pub(crate) fn header(&self, scope: &Scope<'_>) -> Option<HeaderValue> {
        let cache = self
            .cache
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let slots = cache.get(scope.endpoint)?.get(scope.repository)?;
        match scope.access {
            Access::Pull => slots[0].clone().or_else(|| slots[1].clone()),
            Access::Push => slots[1].clone(),
        }
    }

    /// Called after a 401 on a request sent with `used`: obtains a new
    /// header unless another task already replaced `used`.
    pub(crate) async fn refresh(
        &self,
        scope: &Scope<'_>,
        used: Option<&HeaderValue>,
    ) -> Result<(), AttemptError> {
        let _guard = self.refresh.lock().await;
        let current = self.header(scope);
        if current.is_some() && current.as_ref() != used {
            return Ok(());
        }
        let header = self.authenticate(scope).await?;
        let mut cache = self
            .cache
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let slots = cache
            .entry(scope.endpoint.to_owned())
            .or_default()
            .entry(scope.repository.to_owned())
            .or_default();
        slots[scope.access.index()] = header;
        Ok(())
    }

    async fn authenticate(&self, scope: &Scope<'_>) -> Result<Option<HeaderValue>, AttemptError> {
        let credentials = self.credentials.get(scope.registry);
        let auth = match &credentials {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let client = self.oci_client(scope)?;
        // The tag is irrelevant to authorization; scopes are per repository.
        let image = oci_client::Reference::with_tag(
            scope.endpoint.to_owned(),
            scope.repository.to_owned(),
            "latest".to_owned(),
        );
        tracing::debug!(
            registry = scope.registry,
            repository = scope.repository,
            access = ?scope.access,
            with_credentials = credentials.is_some(),
            "authenticating"
        );
        let outcome = tokio::time::timeout(
            self.timeout,
            client.auth(&image, &auth, scope.access.operation()),
        )
        .await
        .map_err(|_| AttemptError::Timeout)?;
        match outcome {
            Ok(Some(token)) => Ok(Some(sensitive(&format!("Bearer {token}"))?)),
            // No bearer challenge: either the registry wants basic
            // credentials, or it has no challenge at all.
            Ok(None) => match &credentials {
                Some(c) => {
                    let raw = format!("{}:{}", c.username, c.password);
                    let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
                    Ok(Some(sensitive(&format!("Basic {encoded}"))?))
                }
                None => Ok(None),
            },
            Err(OciDistributionError::RequestError(e)) => Err(AttemptError::Transport(e)),
            Err(OciDistributionError::AuthenticationFailure(reason)) => Err(AttemptError::Denied(
                format!("token request refused: {}", reason.trim()),
            )),
            Err(other) => Err(AttemptError::Denied(format!(
                "authentication failed: {other}"
            ))),
        }
    }
}

fn sensitive(value: &str) -> Result<HeaderValue, AttemptError> {
    let mut header = HeaderValue::from_str(value).map_err(|_| {
        AttemptError::Denied(
            "credentials or token contain characters not allowed in a header".into(),
        )
    })?;
    header.set_sensitive(true);
    Ok(header)
}
