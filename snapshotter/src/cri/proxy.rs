//! The CRI image service, served on a socket of Lode's own and forwarded
//! call by call to containerd's CRI plugin. `PullImage` requests carry the
//! pod's registry credentials: they go to the [`Keychain`] before the call
//! is forwarded (containerd's pull prepares the image's snapshots, and Lode
//! fetches the bootstrap then), are put back as they were if the pull
//! fails, and are handed to the daemons already serving the image after a
//! pull succeeds.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use k8s_cri::v1::{
    ImageFsInfoRequest, ImageFsInfoResponse, ImageStatusRequest, ImageStatusResponse,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse,
};
use lode_common::registry::Reference;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

use super::keychain::{credentials_of, Keychain};
use crate::daemons::DaemonManager;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("CRI image service on {path}: {source}")]
    Serve {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

struct ImageProxy {
    containerd: ImageServiceClient<Channel>,
    keychain: Arc<Keychain>,
    manager: Arc<DaemonManager>,
}

/// A channel to containerd's socket, connected at the first call (and again
/// after containerd restarts), so that the proxy may start before it.
fn containerd_channel(socket: &Path) -> Channel {
    let socket = socket.to_path_buf();
    Endpoint::from_static("http://containerd.sock").connect_with_connector_lazy(tower::service_fn(
        move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        },
    ))
}

/// Serves the proxy on `listener` (bound by the caller, mode 0600) until
/// `shutdown` completes.
pub async fn serve(
    listener: tokio::net::UnixListener,
    path: PathBuf,
    containerd: PathBuf,
    keychain: Arc<Keychain>,
    manager: Arc<DaemonManager>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ProxyError> {
    let proxy = ImageProxy {
        containerd: ImageServiceClient::new(containerd_channel(&containerd)),
        keychain,
        manager,
    };
    tonic::transport::Server::builder()
        .add_service(ImageServiceServer::new(proxy))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .map_err(|source| ProxyError::Serve { path, source })
}

impl ImageProxy {
    fn upstream(&self) -> ImageServiceClient<Channel> {
        self.containerd.clone()
    }
}

#[tonic::async_trait]
impl ImageService for ImageProxy {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        self.upstream().list_images(request.into_inner()).await
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        self.upstream().image_status(request.into_inner()).await
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let request = request.into_inner();
        let image = request
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        let reference = image.parse::<Reference>().ok();
        let credentials = match request.auth.as_ref().map(credentials_of) {
            Some(Ok(credentials)) => credentials,
            Some(Err(why)) => {
                tracing::warn!(%image, why, "credentials of the pull not usable by Lode");
                None
            }
            None => None,
        };
        let kept = match (&reference, credentials) {
            (Some(reference), Some(credentials)) => {
                Some((reference, self.keychain.put(reference, credentials)))
            }
            _ => None,
        };
        let answer = self.upstream().pull_image(request).await;
        match (&answer, kept) {
            (Err(status), Some((reference, previous))) => {
                tracing::info!(%image, code = ?status.code(), "pull failed; its credentials are not kept");
                self.keychain.restore(reference, previous);
            }
            (Ok(_), Some((reference, _))) => {
                tracing::info!(%image, "pulled with credentials; kept in memory for its reads");
                self.manager.refresh_credentials(reference).await;
            }
            _ => {}
        }
        answer
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        self.upstream().remove_image(request.into_inner()).await
    }

    async fn image_fs_info(
        &self,
        request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        self.upstream().image_fs_info(request.into_inner()).await
    }
}
