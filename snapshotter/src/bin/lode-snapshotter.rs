//! lode-snapshotter: containerd proxy snapshotter serving Lode images lazily.
//!
//! Serves containerd's snapshots API on a unix socket (mode 0600); point
//! containerd's `[proxy_plugins.lode]` at it (misc/containerd-config.toml).
//! Plain layers are overlay snapshots like containerd's own; Lode images are
//! served by lode-fsd daemons this process starts and recovers. Daemons
//! outlive the snapshotter, which re-attaches to them when it starts again.
//! SIGTERM/SIGINT stop serving (daemons keep running unless
//! --stop-daemons-on-exit).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use containerd_snapshots::tonic::transport::Server;
use lode_config::SnapshotterConfig;
use lode_snapshotter::content::ContentStore;
use lode_snapshotter::cri::Keychain;
use lode_snapshotter::daemons::DaemonManager;
use lode_snapshotter::lazy::LazyLayers;
use lode_snapshotter::metrics::Metrics;
use lode_snapshotter::service::LodeSnapshotter;
use lode_snapshotter::store::Store;
use lode_snapshotter::{cri, metrics_http, overlay};
use nix::sys::socket::{listen, Backlog, SockType};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::UnixListenerStream;

#[derive(Parser, Debug)]
#[command(name = "lode-snapshotter", version, verbatim_doc_comment)]
struct Args {
    /// TOML configuration (misc/snapshotter.sample.toml documents every key).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Overrides `root`.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Overrides `address` (the gRPC socket).
    #[arg(long, value_name = "PATH")]
    address: Option<PathBuf>,
    /// Log filter when RUST_LOG is unset.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Stop every daemon and unmount its images when exiting.
    #[arg(long)]
    stop_daemons_on_exit: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut config = match &args.config {
        Some(path) => SnapshotterConfig::load(path)?,
        None => SnapshotterConfig::default(),
    };
    if let Some(root) = args.root.clone() {
        config.root = root;
    }
    if let Some(address) = args.address.clone() {
        config.address = address;
    }
    config.validate()?;
    overlay::validate_root(&config.root.join("snapshots"))
        .context("the snapshotter root cannot hold overlay snapshots")?;
    let store = Store::open(&config.store_path())?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?
        .block_on(serve(config, store, args.stop_daemons_on_exit))
}

async fn serve(config: SnapshotterConfig, store: Store, stop_daemons: bool) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let keychain = Arc::new(Keychain::new());
    let manager =
        DaemonManager::start(&config, store.database(), metrics.clone(), keychain.clone()).await?;
    let lazy = LazyLayers::new(
        config.registry.clone(),
        config.bootstraps_dir(),
        keychain.clone(),
        ContentStore::new(&config.containerd_address),
    );
    let snapshotter = LodeSnapshotter::new(
        store,
        config.snapshots_dir(),
        lazy,
        manager.clone(),
        metrics,
    )?;
    snapshotter
        .cleanup()
        .await
        .context("remove orphaned snapshot directories")?;
    let listener = bind(&config.address).await?;
    let _metrics_task = match &config.metrics.address {
        Some(address) => {
            let (bound, task) = metrics_http::serve(address, manager.clone())
                .await
                .with_context(|| format!("metrics endpoint {address}"))?;
            tracing::info!(address = %bound, "Prometheus metrics at http://{bound}/metrics");
            Some(task)
        }
        None => None,
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let cri_proxy = match &config.cri.image_service_address {
        Some(path) => {
            let listener = bind(path).await?;
            let mut stopped = stopped.clone();
            let containerd = config.containerd_address.clone();
            tracing::info!(address = %path.display(), containerd = %containerd.display(), "CRI image service proxy serving");
            Some(tokio::spawn(cri::serve(
                listener,
                path.clone(),
                containerd,
                keychain,
                manager.clone(),
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            )))
        }
        None => None,
    };
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = stop.send(true);
    };
    tracing::info!(address = %config.address.display(), root = %config.root.display(), "lode-snapshotter serving");
    Server::builder()
        .add_service(containerd_snapshots::server(Arc::new(snapshotter)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("gRPC server")?;
    let _ = std::fs::remove_file(&config.address);
    if let (Some(task), Some(path)) = (cri_proxy, &config.cri.image_service_address) {
        if let Ok(Err(error)) = task.await {
            tracing::error!(%error, "CRI image service proxy");
        }
        let _ = std::fs::remove_file(path);
    }
    if stop_daemons {
        manager.stop_all().await;
    }
    Ok(())
}

/// Binds a socket with mode 0600 from the start, replacing a stale socket
/// file but refusing one a live process still answers on.
async fn bind(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() && UnixStream::connect(path).await.is_ok() {
        bail!(
            "{}: another process is serving on this socket",
            path.display()
        );
    }
    let fd = lode_common::socket::bind_private(path, SockType::Stream)?;
    listen(&fd, Backlog::new(128).expect("a valid backlog"))
        .with_context(|| format!("listen on {}", path.display()))?;
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(UnixListener::from_std(listener)?)
}
