//! The HTTP data path: listeners, and one task per client connection.
//!
//! `connection` runs the per-request state machine, `upstream` owns backend connections, and
//! `body` moves message bodies by their framing.
mod body;
mod connection;
mod pool;
mod splice;
mod tcp_routes;
mod tunnel;
mod upstream;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tracing::{info, warn};

pub use self::{
    pool::Pool,
    splice::{DEFAULT_PIPE_SIZE, PipePool},
    tcp_routes::serve_tcp_routes,
};
use crate::{
    config::{DatapathMode, ProxySettings},
    ebpf::KernelOffload,
    metrics::Metrics,
    registry::{Message, Published},
};

/// Bodies (and chunks) at least this large go through splice(2) in `auto` mode by default
/// (`splice_threshold_bytes` in the TOML file); smaller ones are copied. Measured with
/// `cargo xtask bench --splice-sweep` (README.md, "Performance"): splice lost to copy up to
/// 64 KiB (0.76x to 0.93x requests/s) and won from 256 KiB (1.08x to 1.12x).
pub const SPLICE_THRESHOLD: u64 = 256 * 1024;

/// What every connection task shares.
pub struct ProxyContext {
    pub published: Arc<Published>,
    pub settings: ProxySettings,
    pub metrics: Arc<Metrics>,
    /// Passive failures go to the registry.
    pub registry: mpsc::UnboundedSender<Message>,
    /// Flips to true when the agent begins shutting down.
    pub shutdown: watch::Receiver<bool>,
    pub datapath: DatapathMode,
    /// The kernel side, when it loaded (and the mode allows it).
    pub offload: Option<Arc<KernelOffload>>,
    pub pool: Pool,
    pub pipes: PipePool,
}

impl ProxyContext {
    /// The smallest body run that is spliced, or `None` when bodies are always copied.
    pub fn splice_threshold(&self) -> Option<u64> {
        match self.datapath {
            DatapathMode::Auto => Some(self.settings.splice_threshold),
            // Forced: every body byte that is not already buffered goes through splice.
            DatapathMode::Splice => Some(1),
            // sockmap mode keeps splice off every socket: the two must never mix on one socket.
            DatapathMode::Copy | DatapathMode::Sockmap => None,
        }
    }
}

/// Closes pooled connections to backends that left or stopped being up, whenever the routing
/// table changes.
pub async fn maintain_pool(ctx: Arc<ProxyContext>) {
    let mut versions = ctx.published.table_version.subscribe();
    while versions.changed().await.is_ok() {
        ctx.pool.retain_up(&ctx.published.table.load());
    }
}

/// Binds a listening socket with a deep backlog (bursts of new connections are normal for a
/// router) and `SO_REUSEADDR` (restarts must not wait out `TIME_WAIT`).
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    Ok(TcpListener::from_std(bind_std(addr, false)?)?)
}

/// The listening socket itself, for a worker thread to adopt. With `reuse_port` several
/// sockets share the address and the kernel spreads new connections over them.
fn bind_std(addr: SocketAddr, reuse_port: bool) -> anyhow::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot listen on {addr}; is another process using it (or, for ports below 1024, are you root)?"))?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Starts `workers` threads, each with its own single-threaded runtime and its own listening
/// socket on every address (`SO_REUSEPORT`): a connection lives and dies on one thread, with no
/// cross-thread wake-ups or shared timer wheel on the request path. Binding happens here, so a
/// port in use fails the start.
pub fn spawn_workers(
    ctx: &Arc<ProxyContext>,
    addresses: &[SocketAddr],
    workers: usize,
) -> anyhow::Result<()> {
    for worker in 0..workers.max(1) {
        let listeners = addresses
            .iter()
            .map(|addr| bind_std(*addr, workers > 1))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ctx = ctx.clone();
        std::thread::Builder::new()
            .name(format!("http-worker-{worker}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        warn!("http worker {worker} could not start its runtime: {e}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    for listener in listeners {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => {
                                tokio::spawn(serve(listener, ctx.clone()));
                            }
                            Err(e) => warn!("http worker {worker}: {e}"),
                        }
                    }
                    // The connections of this thread run until the process exits (the main
                    // thread ends it after the shutdown grace period).
                    std::future::pending::<()>().await;
                });
            })
            .context("starting an HTTP worker thread")?;
    }
    Ok(())
}

/// Accepts connections until shutdown begins.
pub async fn serve(listener: TcpListener, ctx: Arc<ProxyContext>) {
    let local = listener.local_addr().ok();
    info!("serving HTTP routes on {local:?}");
    let mut shutdown = ctx.shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(connection::handle(stream, peer, ctx.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!("accept on {local:?} failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    info!("stopped accepting on {local:?}");
}
