//! The HTTP data path: listeners, and one task per client connection.
//!
//! `connection` runs the per-request state machine, `upstream` owns backend connections,
//! `body` moves message bodies by their framing, and `admission` keeps the number of client
//! connections within the descriptor budget.
mod admission;
mod body;
mod client;
mod connection;
mod pool;
mod record;
mod splice;
mod tcp_routes;
mod tunnel;
mod upstream;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tracing::{debug, info, warn};

pub use self::{
    admission::{Admission, Admitted, is_fd_exhaustion},
    pool::Pool,
    splice::{DEFAULT_PIPE_SIZE, PipePool},
    tcp_routes::serve_tcp_routes,
    tunnel::TunnelKind,
    tunnel::idle_for as tunnel_idle_for,
};

/// Moves bytes both ways between two sockets, by the path this agent's mode picks for tunnels
/// (the cluster port relays other nodes' connections this way).
pub async fn run_tunnel(client: &mut TcpStream, backend: &mut TcpStream, ctx: &ProxyContext) {
    tunnel::run(
        client,
        backend,
        ctx.tunnel_path(TunnelKind::Relay, false),
        ctx,
    )
    .await;
}
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
    /// Where the agent is in its life (serving, handing over, draining).
    pub phase: watch::Receiver<Phase>,
    pub datapath: DatapathMode,
    /// The kernel side, when it loaded (and the mode allows it).
    pub offload: Option<Arc<KernelOffload>>,
    pub pool: Pool,
    pub pipes: PipePool,
    pub admission: Admission,
    /// This agent's place in a Swarm cluster, once joined (unset on a single host).
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    pub access_log: crate::access_log::AccessLog,
}

/// The agent's life after start, as the data path sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Listeners are not bound yet (first sync, first checks, cluster peers): `/healthz` says
    /// `starting` so that nothing sends traffic to ports that would refuse it.
    Starting,
    Serving,
    /// SIGTERM came: connections are no longer kept alive, but new ones are still accepted
    /// until a successor listens (or the handover timeout passes).
    HandingOver,
    /// Listeners are closed; in-flight requests finish within the grace period.
    Draining,
}

impl Phase {
    /// Connections end after their current request.
    pub fn stopping(self) -> bool {
        matches!(self, Self::HandingOver | Self::Draining)
    }
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
/// table changes, and those the backend closed, every sweep period.
pub async fn maintain_pool(ctx: Arc<ProxyContext>) {
    let mut versions = ctx.published.table_version.subscribe();
    let mut sweeps = tokio::time::interval(pool::SWEEP_PERIOD);
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = versions.changed() => {
                if changed.is_err() {
                    return;
                }
                ctx.pool.retain_up(&ctx.published.table.load());
            }
            _ = sweeps.tick() => {
                let closed = ctx.pool.sweep();
                if closed > 0 {
                    debug!("closed {closed} pooled connection(s) the backends had closed");
                }
            }
        }
    }
}

/// TCP keepalive on a client or backend socket: a peer that vanished without a FIN or RST
/// (host down, network cut) is found after `idle` plus about a minute of probes.
pub fn set_keepalive(stream: &TcpStream, idle: Option<Duration>) {
    let Some(idle) = idle else { return };
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Binds a listening socket with a deep backlog (bursts of new connections are normal for a
/// router), `SO_REUSEADDR` (restarts must not wait out `TIME_WAIT`) and `SO_REUSEPORT` (a
/// successor agent binds the same port while this one drains; see `handover`).
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    Ok(TcpListener::from_std(bind_std(addr)?)?)
}

/// The listening socket itself, for a worker thread to adopt. Several sockets share the
/// address (`SO_REUSEPORT`) and the kernel spreads new connections over them.
fn bind_std(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
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
/// port in use fails the start. The TLS listeners (`--listen-tls`), when given, run on the same
/// threads.
pub fn spawn_workers(
    ctx: &Arc<ProxyContext>,
    addresses: &[SocketAddr],
    tls: Option<&TlsListen>,
    workers: usize,
) -> anyhow::Result<()> {
    for worker in 0..workers.max(1) {
        let mut listeners = addresses
            .iter()
            .map(|addr| Ok((bind_std(*addr)?, None)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for addr in tls.iter().flat_map(|tls| &tls.addresses) {
            let acceptor = tls.map(|tls| tls.acceptor.clone());
            listeners.push((bind_std(*addr)?, acceptor));
        }
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
                    for (listener, tls) in listeners {
                        match (TcpListener::from_std(listener), tls) {
                            (Ok(listener), None) => {
                                tokio::spawn(serve(listener, ctx.clone()));
                            }
                            (Ok(listener), Some(acceptor)) => {
                                tokio::spawn(serve_tls(listener, acceptor, ctx.clone()));
                            }
                            (Err(e), _) => warn!("http worker {worker}: {e}"),
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

/// Accepts connections within the connection limit until the agent drains.
pub async fn serve(listener: TcpListener, ctx: Arc<ProxyContext>) {
    let local = listener.local_addr().ok();
    info!("serving HTTP routes on {local:?}");
    while let Some((stream, peer, admitted)) = accept(&listener, &ctx).await {
        tokio::spawn(connection::handle(
            stream.into(),
            peer,
            ctx.clone(),
            admitted,
        ));
    }
    info!("stopped accepting on {local:?}");
}

/// Where the agent terminates TLS itself (`--listen-tls`), with the certificates of
/// `--tls-cert-dir`.
pub struct TlsListen {
    pub addresses: Vec<SocketAddr>,
    pub acceptor: tokio_rustls::TlsAcceptor,
}

/// Accepts TLS connections until the agent drains: each one is served like a plain one once its
/// handshake completed within the header timeout. A client whose SNI names no domain with a
/// certificate fails the handshake (the certificate resolver finds none; rustls alerts).
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    ctx: Arc<ProxyContext>,
) {
    let local = listener.local_addr().ok();
    info!("serving HTTP routes with TLS on {local:?}");
    while let Some((stream, peer, admitted)) = accept(&listener, &ctx).await {
        let (acceptor, ctx) = (acceptor.clone(), ctx.clone());
        tokio::spawn(async move {
            let timeout = ctx.settings.header_timeout;
            match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let client = client::ClientStream::Tls(Box::new(tls));
                    connection::handle(client, peer, ctx, admitted).await;
                }
                Ok(Err(e)) => debug!(%peer, "TLS handshake failed: {e}"),
                Err(_) => debug!(%peer, "no TLS handshake within {timeout:?}: closed"),
            }
        });
    }
    info!("stopped accepting on {local:?}");
}

/// The next client connection with its admission, or `None` once the agent drains. Waits at
/// the connection limit; backs off when descriptors run out.
pub async fn accept(
    listener: &TcpListener,
    ctx: &ProxyContext,
) -> Option<(TcpStream, SocketAddr, Admitted)> {
    let mut phase = ctx.phase.clone();
    let draining = |p: &Phase| *p == Phase::Draining;
    loop {
        let admitted = tokio::select! {
            admitted = ctx.admission.admit() => admitted,
            _ = phase.wait_for(draining) => return None,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = phase.wait_for(draining) => return None,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                set_keepalive(&stream, ctx.settings.tcp_keepalive);
                return Some((stream, peer, admitted));
            }
            Err(e) if is_fd_exhaustion(&e) => {
                warn!("accept: {e}; shedding idle connections");
                ctx.admission.note_fd_exhaustion();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // A connection reset before it was accepted, and the like: nothing to do.
            Err(e) => debug!("accept: {e}"),
        }
    }
}
