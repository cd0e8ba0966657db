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

pub use self::{pool::Pool, splice::PipePool, tcp_routes::serve_tcp_routes};
use crate::{
    config::{DatapathMode, ProxySettings},
    ebpf::KernelOffload,
    metrics::Metrics,
    registry::{Message, Published},
};

/// Bodies (and chunks) at least this large go through splice(2) in `auto` mode; smaller ones are
/// copied (one read, one write). Measured: see README.md, "Data path".
pub const SPLICE_THRESHOLD: u64 = 64 * 1024;

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
            DatapathMode::Auto => Some(SPLICE_THRESHOLD),
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
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot listen on {addr}; is another process using it (or, for ports below 1024, are you root)?"))?;
    socket.listen(4096)?;
    Ok(TcpListener::from_std(socket.into())?)
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
