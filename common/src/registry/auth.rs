//! Authorization headers per (registry, repository, access), obtained on a
//! 401: from the challenge the 401 carries (`WWW-Authenticate`: a bearer
//! token from its realm, or basic credentials), else through oci-client's
//! challenge handling, which asks the registry's `/v2/` for the challenge
//! first.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use base64::Engine as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;
use reqwest::header::HeaderValue;

use super::credentials::{CredentialStore, Credentials};
use super::tls::TlsOptions;
use super::transport::{Access, AttemptError};

/// Largest token answer read.
const MAX_TOKEN_ANSWER: usize = 64 * 1024;

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
    /// Asks token realms for tokens; built on the first bearer challenge.
    /// Not the registry requests' client: the headers `hosts.toml` gives
    /// the registry are not sent to its token service.
    token_http: std::sync::OnceLock<Result<reqwest::Client, String>>,
    tls: TlsOptions,
    timeout: Duration,
}

/// What a 401's challenge asks for, as far as this client answers it.
#[derive(Debug, PartialEq, Eq)]
pub enum Challenge {
    /// A bearer token from `realm` (for `service`).
    Bearer {
        realm: String,
        service: Option<String>,
    },
    /// Basic credentials.
    Basic,
}

impl Challenge {
    /// The challenge of a `WWW-Authenticate` value: its bearer challenge
    /// if it has one with a realm, else basic if it offers that.
    pub fn parse(header: &str) -> Option<Self> {
        let challenges = http_auth::parse_challenges(header).ok()?;
        let param = |c: &http_auth::ChallengeRef<'_>, name: &str| {
            c.params
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.to_unescaped())
        };
        if let Some(bearer) = challenges
            .iter()
            .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
        {
            return param(bearer, "realm").map(|realm| Challenge::Bearer {
                realm,
                service: param(bearer, "service"),
            });
        }
        challenges
            .iter()
            .any(|c| c.scheme.eq_ignore_ascii_case("basic"))
            .then_some(Challenge::Basic)
    }
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
    pub(crate) fn new(credentials: CredentialStore, tls: TlsOptions, timeout: Duration) -> Self {
        Self {
            credentials,
            cache: RwLock::new(HashMap::new()),
            refresh: tokio::sync::Mutex::new(()),
            oci: Default::default(),
            token_http: std::sync::OnceLock::new(),
            tls,
            timeout,
        }
    }

    fn token_http(&self) -> Result<&reqwest::Client, AttemptError> {
        self.token_http
            .get_or_init(|| {
                let tls = super::tls::client_config(&self.tls)
                    .map_err(|e| format!("cannot set up TLS for token requests: {e}"))?;
                reqwest::Client::builder()
                    .use_preconfigured_tls(tls)
                    .user_agent(super::transport::USER_AGENT)
                    .connect_timeout(self.timeout)
                    .read_timeout(self.timeout)
                    .build()
                    .map_err(|e| format!("cannot build the HTTP client for token requests: {e}"))
            })
            .as_ref()
            .map_err(|message| AttemptError::Setup(message.clone()))
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

    /// Called after a 401 on a request sent with `used`, with the 401's
    /// `challenge` if it had one: obtains a new header unless another task
    /// already replaced `used`.
    pub(crate) async fn refresh(
        &self,
        scope: &Scope<'_>,
        used: Option<&HeaderValue>,
        challenge: Option<&str>,
    ) -> Result<(), AttemptError> {
        let _guard = self.refresh.lock().await;
        let current = self.header(scope);
        if current.is_some() && current.as_ref() != used {
            return Ok(());
        }
        let credentials = self.credentials.get(scope.registry);
        let challenge = challenge.and_then(Challenge::parse);
        tracing::debug!(
            registry = scope.registry,
            repository = scope.repository,
            access = ?scope.access,
            with_credentials = credentials.is_some(),
            ?challenge,
            "authenticating"
        );
        let header = match challenge {
            Some(Challenge::Bearer { realm, service }) => Some(
                self.token(scope, &realm, service.as_deref(), credentials.as_ref())
                    .await?,
            ),
            Some(Challenge::Basic) => credentials.as_ref().map(basic).transpose()?,
            None => self.authenticate(scope).await?,
        };
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

    /// A bearer token for `scope` from `realm`, as the registry's challenge
    /// named it (the token flow of the distribution spec), with basic
    /// credentials if there are any.
    async fn token(
        &self,
        scope: &Scope<'_>,
        realm: &str,
        service: Option<&str>,
        credentials: Option<&Credentials>,
    ) -> Result<HeaderValue, AttemptError> {
        let actions = match scope.access {
            Access::Pull => "pull",
            Access::Push => "pull,push",
        };
        let wanted = format!("repository:{}:{actions}", scope.repository);
        let mut query = vec![("scope", wanted.as_str())];
        if let Some(service) = service {
            query.push(("service", service));
        }
        let mut request = self.token_http()?.get(realm).query(&query);
        if let Some(c) = credentials {
            request = request.basic_auth(&c.username, Some(&c.password));
        }
        let answer = async {
            let response = request.send().await?;
            let status = response.status();
            let body = super::transport::read_limited(response, MAX_TOKEN_ANSWER).await?;
            Ok::<_, AttemptError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, answer)
            .await
            .map_err(|_| AttemptError::Timeout)??;
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(AttemptError::Status {
                status,
                message: format!(
                    "token request: {}",
                    super::transport::error_body_message(&body)
                ),
            });
        }
        if !status.is_success() {
            return Err(AttemptError::Denied(format!(
                "token request refused: HTTP {status}: {}",
                super::transport::error_body_message(&body)
            )));
        }
        let token: oci_client::token_cache::RegistryToken = serde_json::from_slice(&body)
            .map_err(|e| AttemptError::Denied(format!("token answer from {realm}: {e}")))?;
        sensitive(&token.bearer_token())
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
            Ok(None) => credentials.as_ref().map(basic).transpose(),
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

/// The header of basic credentials.
fn basic(c: &Credentials) -> Result<HeaderValue, AttemptError> {
    let raw = format!("{}:{}", c.username, c.password);
    let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
    sensitive(&format!("Basic {encoded}"))
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
