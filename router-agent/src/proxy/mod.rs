//! The HTTP data path: listeners, and one task per client connection.
//!
//! `connection` runs the per-request state machine, `upstream` owns backend connections, and
//! `body` moves message bodies by their framing.
mod body;
mod connection;
mod upstream;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tracing::{info, warn};

use crate::{
    config::ProxySettings,
    metrics::Metrics,
    registry::{Message, Published},
};

/// What every connection task shares.
pub struct ProxyContext {
    pub published: Arc<Published>,
    pub settings: ProxySettings,
    pub metrics: Arc<Metrics>,
    /// Passive failures go to the registry.
    pub registry: mpsc::UnboundedSender<Message>,
    /// Flips to true when the agent begins shutting down.
    pub shutdown: watch::Receiver<bool>,
}

/// Binds a listening socket with a deep backlog (bursts of new connections are normal for a
/// router) and SO_REUSEADDR (restarts must not wait out TIME_WAIT).
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
