//! Kubernetes' side: the CRI image service proxy kubelet talks to
//! (`--image-service-endpoint`), and the credentials it learns.

mod keychain;
mod proxy;

pub use keychain::{credentials_of, Keychain};
pub use proxy::{serve, ProxyError};
