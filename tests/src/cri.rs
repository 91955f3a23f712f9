//! A CRI client as kubelet uses one: the runtime and image services of
//! containerd's CRI plugin (API v1, `k8s-cri`) over a unix socket, with the
//! pod and container configurations kubelet would send for a pod on the
//! node's network.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Request, Response, Status};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AuthConfig, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus,
    ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest, ExecSyncResponse, ImageSpec,
    ImageStatusRequest, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
    RemoveContainerRequest, RemoveImageRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};

use crate::{wait_until, KitError};

pub struct CriClient {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// A pod kubelet would run with `hostNetwork: true`, its container logs
/// under `log_dir`.
pub fn host_network_pod(name: &str, log_dir: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("{name}-uid"),
            namespace: "default".to_owned(),
            attempt: 0,
        }),
        // The node's network comes with the node's name.
        log_directory: log_dir.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container of `image` running `args`, logging to `<name>.log` in its
/// pod's log directory.
pub fn container(name: &str, image: &str, args: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(image_spec(image)),
        command: args.iter().map(|a| (*a).to_owned()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

impl CriClient {
    /// Connects to both CRI services on `socket` (containerd's).
    pub fn connect(socket: &Path) -> Result<Self, KitError> {
        Self::connect_split(socket, socket)
    }

    /// The runtime service on `runtime`, the image service on `images`
    /// (kubelet's `--image-service-endpoint`: Lode's proxy).
    pub fn connect_split(runtime: &Path, images: &Path) -> Result<Self, KitError> {
        let rt = tokio::runtime::Runtime::new().map_err(KitError::io("tokio runtime"))?;
        let connect = |socket: &Path| {
            rt.block_on(containerd_client::connect(socket))
                .map_err(|e| KitError::Command {
                    what: format!("connect to CRI at {}", socket.display()),
                    message: e.to_string(),
                })
        };
        let (runtime, images) = (connect(runtime)?, connect(images)?);
        Ok(Self {
            runtime: RuntimeServiceClient::new(runtime),
            images: ImageServiceClient::new(images),
            rt,
        })
    }

    fn call<T, F: Future<Output = Result<Response<T>, Status>>>(&self, f: F) -> Result<T, Status> {
        self.rt.block_on(f).map(Response::into_inner)
    }

    /// RunPodSandbox: the pod's id.
    pub fn run_pod(&self, config: &PodSandboxConfig) -> Result<String, Status> {
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let mut c = self.runtime.clone();
        self.call(c.run_pod_sandbox(Request::new(request)))
            .map(|r| r.pod_sandbox_id)
    }

    /// PullImage with the pod's configuration, as kubelet sends it: the
    /// image's reference by digest.
    pub fn pull(
        &self,
        image: &str,
        auth: Option<AuthConfig>,
        pod: &PodSandboxConfig,
    ) -> Result<String, Status> {
        let request = PullImageRequest {
            image: Some(image_spec(image)),
            auth,
            sandbox_config: Some(pod.clone()),
        };
        let mut c = self.images.clone();
        self.call(c.pull_image(Request::new(request)))
            .map(|r| r.image_ref)
    }

    /// Whether the image service knows `image`.
    pub fn has_image(&self, image: &str) -> Result<bool, Status> {
        let request = ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        };
        let mut c = self.images.clone();
        self.call(c.image_status(Request::new(request)))
            .map(|r| r.image.is_some())
    }

    pub fn remove_image(&self, image: &str) -> Result<(), Status> {
        let request = RemoveImageRequest {
            image: Some(image_spec(image)),
        };
        let mut c = self.images.clone();
        self.call(c.remove_image(Request::new(request))).map(drop)
    }

    /// CreateContainer then StartContainer: the container's id.
    pub fn start_container(
        &self,
        pod_id: &str,
        config: ContainerConfig,
        pod: &PodSandboxConfig,
    ) -> Result<String, Status> {
        let request = CreateContainerRequest {
            pod_sandbox_id: pod_id.to_owned(),
            config: Some(config),
            sandbox_config: Some(pod.clone()),
        };
        let mut c = self.runtime.clone();
        let id = self
            .call(c.create_container(Request::new(request)))?
            .container_id;
        let request = StartContainerRequest {
            container_id: id.clone(),
        };
        self.call(c.start_container(Request::new(request)))?;
        Ok(id)
    }

    pub fn status(&self, id: &str) -> Result<ContainerStatus, Status> {
        let request = ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        };
        let mut c = self.runtime.clone();
        self.call(c.container_status(Request::new(request)))?
            .status
            .ok_or_else(|| Status::not_found(format!("no status of container {id}")))
    }

    /// Polls ContainerStatus until the container has exited; its status.
    pub fn wait_exited(&self, id: &str, timeout: Duration) -> Result<ContainerStatus, KitError> {
        let mut last = None;
        wait_until(timeout, &format!("container {id} to exit"), || {
            last = self.status(id).ok();
            last.as_ref()
                .is_some_and(|s| s.state == ContainerState::ContainerExited as i32)
        })?;
        Ok(last.expect("polled"))
    }

    /// Starts a container of `image` named `name` that sleeps (to exec
    /// into), and waits until it runs; its id.
    pub fn start_idle(
        &self,
        pod_id: &str,
        name: &str,
        image: &str,
        pod: &PodSandboxConfig,
    ) -> Result<String, KitError> {
        let id = self
            .start_container(pod_id, container(name, image, &["sleep", "100000"]), pod)
            .map_err(|e| KitError::Command {
                what: format!("start {name} ({image})"),
                message: e.to_string(),
            })?;
        self.wait_running(&id, Duration::from_secs(60))?;
        Ok(id)
    }

    /// Polls ContainerStatus until the container runs.
    pub fn wait_running(&self, id: &str, timeout: Duration) -> Result<(), KitError> {
        wait_until(timeout, &format!("container {id} to run"), || {
            self.status(id)
                .is_ok_and(|s| s.state == ContainerState::ContainerRunning as i32)
        })
    }

    /// `sha256sum` of `len` bytes of `path` from `offset`, run in the
    /// container `id` by ExecSync: its output, or why it failed.
    pub fn sha256_of_range(
        &self,
        id: &str,
        path: &str,
        offset: u64,
        len: u64,
    ) -> Result<String, KitError> {
        let script = format!("tail -c +{} {path} | head -c {len} | sha256sum", offset + 1);
        let failed = |message: String| KitError::Command {
            what: format!("exec in {id}: {script}"),
            message,
        };
        let exec = self
            .exec_sync(id, &["sh", "-c", &script])
            .map_err(|e| failed(e.to_string()))?;
        if exec.exit_code != 0 {
            return Err(failed(format!(
                "exit {}: {}",
                exec.exit_code,
                String::from_utf8_lossy(&exec.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&exec.stdout).into_owned())
    }

    pub fn exec_sync(&self, id: &str, cmd: &[&str]) -> Result<ExecSyncResponse, Status> {
        let request = ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|a| (*a).to_owned()).collect(),
            timeout: 30,
        };
        let mut c = self.runtime.clone();
        self.call(c.exec_sync(Request::new(request)))
    }

    /// StopContainer (killed at once) then RemoveContainer.
    pub fn remove_container(&self, id: &str) -> Result<(), Status> {
        let mut c = self.runtime.clone();
        let stop = StopContainerRequest {
            container_id: id.to_owned(),
            timeout: 0,
        };
        self.call(c.stop_container(Request::new(stop)))?;
        let remove = RemoveContainerRequest {
            container_id: id.to_owned(),
        };
        self.call(c.remove_container(Request::new(remove)))
            .map(drop)
    }

    /// StopPodSandbox then RemovePodSandbox.
    pub fn remove_pod(&self, id: &str) -> Result<(), Status> {
        let mut c = self.runtime.clone();
        let stop = StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        };
        self.call(c.stop_pod_sandbox(Request::new(stop)))?;
        let remove = RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        };
        self.call(c.remove_pod_sandbox(Request::new(remove)))
            .map(drop)
    }
}
