//! Start-up and shutdown: wires discovery and probes to the registry, the registry to the
//! listeners and the admin API, and waits for SIGTERM.
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{info, warn};

use crate::{
    admin,
    config::{Config, DatapathMode},
    discovery,
    ebpf::KernelOffload,
    metrics::Metrics,
    proxy::{self, ProxyContext},
    registry::{Message, Published, Registry},
};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let offload = load_kernel_offload(config.datapath)?;
    let published = Arc::new(Published::new(config.internal_cidrs.as_deref()));
    let metrics = Arc::new(Metrics::default());

    let (registry_tx, registry_rx) = mpsc::unbounded_channel();
    let docker = discovery::DockerHandle::default();
    tokio::spawn(
        Registry::new(
            config.default_domain.clone(),
            config.internal_cidrs.is_none(),
            docker.clone(),
            registry_tx.clone(),
            published.clone(),
        )
        .run(registry_rx),
    );
    let (updates_tx, mut updates_rx) = mpsc::unbounded_channel();
    tokio::spawn(discovery::run(
        config.docker_host.clone(),
        updates_tx,
        docker,
    ));
    let to_registry = registry_tx.clone();
    tokio::spawn(async move {
        while let Some(update) = updates_rx.recv().await {
            if to_registry.send(Message::Discovery(update)).is_err() {
                return;
            }
        }
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let offload = offload.map(Arc::new);
    let pipes = proxy::PipePool::new(config.proxy.pipe_size)
        .context("creating a splice pipe; is the open-files limit exhausted?")?;
    if pipes.granted_size() < config.proxy.pipe_size {
        warn!(
            asked = config.proxy.pipe_size,
            granted = pipes.granted_size(),
            "splice pipes are smaller than pipe_size_bytes asks: raise \
             /proc/sys/fs/pipe-max-size, or run with CAP_SYS_RESOURCE"
        );
    }
    let ctx = Arc::new(ProxyContext {
        published: published.clone(),
        settings: config.proxy.clone(),
        metrics: metrics.clone(),
        registry: registry_tx,
        shutdown: shutdown_rx,
        datapath: config.datapath,
        offload: offload.clone(),
        pool: proxy::Pool::default(),
        pipes,
    });
    tokio::spawn(proxy::maintain_pool(ctx.clone()));
    let mut route_addresses: Vec<_> = config.listen.iter().map(std::net::SocketAddr::ip).collect();
    route_addresses.dedup();
    tokio::spawn(proxy::serve_tcp_routes(ctx.clone(), route_addresses));
    proxy::spawn_workers(&ctx, &config.listen, config.workers)?;
    let admin = admin::AdminState { proxy: ctx.clone() };
    tokio::spawn(admin::serve(proxy::bind(config.admin)?, Arc::new(admin)));

    wait_for_stop_signal().await?;
    info!(
        "shutting down: no new connections; waiting up to {:?} for in-flight requests",
        config.shutdown_grace
    );
    let _ = shutdown_tx.send(true);
    let deadline = tokio::time::Instant::now() + config.shutdown_grace;
    while metrics.connections_active.load(Ordering::Relaxed) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = metrics.connections_active.load(Ordering::Relaxed);
    if left > 0 {
        warn!("{left} connection(s) still open at the shutdown deadline; closing them");
    }
    drop(offload);
    Ok(())
}

/// Loads the eBPF side unless the datapath mode excludes it. Failure is not fatal in `auto`:
/// everything then runs in userspace.
fn load_kernel_offload(mode: DatapathMode) -> anyhow::Result<Option<KernelOffload>> {
    if matches!(mode, DatapathMode::Copy | DatapathMode::Splice) {
        info!("kernel offload off: --datapath {mode:?} keeps every byte in userspace");
        return Ok(None);
    }
    match KernelOffload::load() {
        Ok(offload) => {
            info!("kernel offload available: sk_skb stream verdict attached to the sockhash");
            Ok(Some(offload))
        }
        Err(e) if mode == DatapathMode::Sockmap => {
            bail!("--datapath sockmap needs the eBPF programs: {e:#}")
        }
        Err(e) => {
            warn!("kernel offload unavailable ({e:#}); forwarding everything in userspace");
            Ok(None)
        }
    }
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}
