//! Connections to backends: choosing one that takes the request (stickiness, weights, per-
//! backend connection limits) and connecting to it.
use std::{
    io,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::BytesMut;
use tokio::{net::TcpStream, sync::OwnedSemaphorePermit};

use super::{ProxyContext, admission::is_fd_exhaustion, set_keepalive};
use crate::{
    cluster::connect::{ThroughError, through},
    metrics::{BackendError, Metrics},
    registry::{Message, PeerEvent},
    table::{Backend, BackendStats, Route, Selection},
};

/// Whether an idle pooled HTTP connection may serve the request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Idempotent requests, which are sent again on a new connection if a kept-alive one turns
    /// out closed: take a pooled connection, trusting one used moments ago without a check.
    Pooled,
    /// Other requests, which must not be sent twice: a pooled connection only after the socket
    /// itself says that the backend has not closed it.
    Checked,
    /// Tunnels, and requests whose body streams from the client: a connection of their own.
    Fresh,
}

/// Why no backend took the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// No backend of the route takes new requests (none up, or every one refused): 503.
    NoBackend,
    /// Every candidate is at its connection limit and the queue wait ran out: 503 with
    /// `Retry-After`.
    Saturated,
    /// The agent is out of descriptors: 503 with `Retry-After`; no backend is blamed.
    Overloaded,
}

/// Picks backends of the route until one accepts a connection. Each backend that refuses is
/// reported to the registry (a refused connection takes it down at once) and added to
/// `tried`. Backends at their connection limit are skipped while others are free; when all
/// are busy the request queues for the first one (or the sticky one) up to the queue timeout.
pub async fn connect_next(
    route: &Route,
    sticky: Option<&[u8]>,
    tried: &mut Tried,
    ctx: &ProxyContext,
    reuse: Reuse,
) -> Result<(Selection, Upstream), Unavailable> {
    let mut busy = Tried::default();
    loop {
        let excluded = tried.with(&busy);
        let candidate = route
            .select(sticky, excluded.as_slice())
            .filter(|_| !tried.is_full());
        let (selection, slot) = if let Some(selection) = candidate {
            let backend = &route.backends[selection.index];
            match try_slot(&backend.stats) {
                Ok(slot) => (selection, slot),
                // A session stays with its backend: it waits for it rather than moving.
                Err(()) if selection.by_cookie => {
                    (selection, queue_for(&backend.stats, ctx).await?)
                }
                Err(()) => {
                    busy.push(selection.index);
                    continue;
                }
            }
        } else {
            // Every candidate is busy (or none is left): wait for the first busy one.
            let Some(&index) = busy.as_slice().first() else {
                return Err(Unavailable::NoBackend);
            };
            let slot = queue_for(&route.backends[index].stats, ctx).await?;
            busy.remove(index);
            let selection = Selection {
                index,
                by_cookie: false,
            };
            (selection, slot)
        };
        if !tried.is_empty() {
            Metrics::add(&ctx.metrics.retries, 1);
        }
        tried.push(selection.index);
        let backend = &route.backends[selection.index];
        if reuse != Reuse::Fresh
            && let Some(mut upstream) = ctx.pool.take(backend, reuse == Reuse::Checked)
        {
            upstream.slot = slot;
            return Ok((selection, upstream));
        }
        match Upstream::connect(backend, ctx).await {
            Ok(mut upstream) => {
                upstream.slot = slot;
                return Ok((selection, upstream));
            }
            Err(ConnectError::Io(e)) if is_fd_exhaustion(&e) => {
                ctx.admission.note_fd_exhaustion();
                return Err(Unavailable::Overloaded);
            }
            Err(e) => {
                ctx.metrics
                    .backend_error(&backend.stats, BackendError::Connect);
                report_connect_failure(ctx, backend, &e);
            }
        }
    }
}

/// A free slot of a backend with a connection limit (`Ok(None)` without a limit).
fn try_slot(stats: &BackendStats) -> Result<Option<OwnedSemaphorePermit>, ()> {
    match &stats.slots {
        None => Ok(None),
        Some(slots) => slots.clone().try_acquire_owned().map(Some).map_err(|_| ()),
    }
}

/// Waits for a slot of a backend at its limit, up to the queue timeout.
async fn queue_for(
    stats: &BackendStats,
    ctx: &ProxyContext,
) -> Result<Option<OwnedSemaphorePermit>, Unavailable> {
    let Some(slots) = &stats.slots else {
        return Ok(None);
    };
    if let Ok(Ok(slot)) = tokio::time::timeout(
        ctx.settings.backend_queue_timeout,
        slots.clone().acquire_owned(),
    )
    .await
    {
        Ok(Some(slot))
    } else {
        Metrics::add(&ctx.metrics.queue_timeouts, 1);
        Err(Unavailable::Saturated)
    }
}

/// Why no connection to a backend could be opened.
#[derive(Debug)]
pub enum ConnectError {
    /// This node's own connection attempt (to a local container) failed.
    Io(io::Error),
    /// Another node's agent could not be reached, or could not reach its container.
    Through(ThroughError),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "connect: {e}"),
            Self::Through(e) => e.fmt(f),
        }
    }
}

/// A refused or unreachable backend: the registry takes it out. For another node's
/// container, an agent that cannot be reached takes that node's containers out until its
/// stream speaks again; a container its agent could not reach is that agent's to judge.
pub fn report_connect_failure(ctx: &ProxyContext, backend: &Backend, error: &ConnectError) {
    let message = match (error, backend.via) {
        (ConnectError::Through(ThroughError::Refused(why)), via) => {
            tracing::debug!(backend = %backend.addr, ?via, "the node's agent could not connect: {why}");
            return;
        }
        (ConnectError::Through(ThroughError::Agent(e)), Some(via)) => {
            Message::Peer(PeerEvent::Unreachable {
                via,
                why: e.to_string(),
            })
        }
        (_, _) => Message::ConnectFailed {
            id: backend.container_id.clone(),
            addr: backend.addr,
            error: error.to_string(),
        },
    };
    let _ = ctx.registry.send(message);
}

/// An exchange with the backend failed after the request was sent: one more in its error
/// streak; the registry hears of it when the streak reaches the error limit.
pub fn report_exchange_failure(ctx: &ProxyContext, backend: &Backend, error: &str) {
    let errors = backend.stats.exchange_failed();
    if errors == ctx.settings.error_limit {
        let _ = ctx.registry.send(Message::ErrorStreak {
            id: backend.container_id.clone(),
            addr: backend.addr,
            errors,
            last_error: error.to_owned(),
        });
    }
}

/// Backends already tried for one request (a small fixed set: no allocation per request).
#[derive(Default, Clone, Copy, Debug)]
pub struct Tried {
    indices: [usize; 8],
    len: usize,
}

impl Tried {
    fn push(&mut self, index: usize) {
        if self.len < self.indices.len() && !self.as_slice().contains(&index) {
            self.indices[self.len] = index;
            self.len += 1;
        }
    }

    fn remove(&mut self, index: usize) {
        if let Some(at) = self.as_slice().iter().position(|&i| i == index) {
            self.indices.copy_within(at + 1..self.len, at);
            self.len -= 1;
        }
    }

    /// Both sets together (capped at the capacity).
    fn with(&self, other: &Self) -> Self {
        let mut all = *self;
        for &index in other.as_slice() {
            all.push(index);
        }
        all
    }

    fn as_slice(&self) -> &[usize] {
        &self.indices[..self.len]
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Enough attempts for one request.
    fn is_full(&self) -> bool {
        self.len == self.indices.len()
    }
}

/// An open connection to one backend container. While it carries a request or a tunnel it is
/// counted in the backend's `active_connections` (and holds one of its slots, if limited);
/// idle in the pool it is not.
pub struct Upstream {
    pub stream: TcpStream,
    /// Bytes read from the backend and not yet relayed.
    pub buf: BytesMut,
    pub container_id: Arc<str>,
    pub addr: SocketAddr,
    /// The other node's agent it goes through, if any.
    pub via: Option<SocketAddr>,
    stats: Arc<BackendStats>,
    /// Whether it already carried a request (a kept-alive connection may have been closed by
    /// the backend in the meantime).
    pub reused: bool,
    /// Counted in `active_connections` now.
    active: bool,
    slot: Option<OwnedSemaphorePermit>,
}

impl Upstream {
    pub async fn connect(backend: &Backend, ctx: &ProxyContext) -> Result<Self, ConnectError> {
        let (stream, buf) = open_to(backend, ctx).await?;
        let mut upstream = Self {
            stream,
            buf,
            container_id: backend.container_id.clone(),
            addr: backend.addr,
            via: backend.via,
            stats: backend.stats.clone(),
            reused: false,
            active: false,
            slot: None,
        };
        upstream.set_active(true);
        Ok(upstream)
    }

    /// Replaces a kept-alive connection the backend closed with a new one to the same backend,
    /// keeping its slot.
    pub async fn reconnect(
        &mut self,
        backend: &Backend,
        ctx: &ProxyContext,
    ) -> Result<(), ConnectError> {
        let (stream, buf) = open_to(backend, ctx).await?;
        self.stream = stream;
        self.buf = buf;
        self.reused = false;
        Ok(())
    }

    /// Whether a kept-alive connection still looks usable: a backend that closed it reads as
    /// EOF (or sent something unasked). Asks the socket itself (a peek that never blocks), not
    /// the runtime's readiness cache, which learns of a close only when its reactor turns.
    pub fn is_idle_and_open(&self) -> bool {
        let mut probe = [0u8; 1];
        // SAFETY: recv into a one-byte buffer we own; MSG_PEEK leaves any byte in the socket.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                probe.as_mut_ptr().cast(),
                probe.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }

    /// Going idle into the pool (false) or back to work (true).
    pub fn set_active(&mut self, active: bool) {
        if active != self.active {
            self.active = active;
            if active {
                self.stats
                    .active_connections
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats
                    .active_connections
                    .fetch_sub(1, Ordering::Relaxed);
                self.slot = None;
            }
        }
    }
}

/// A new connection to the backend: straight to a container of this node, or through the
/// agent of the container's node. Returns the stream and any bytes that already came.
async fn open_to(
    backend: &Backend,
    ctx: &ProxyContext,
) -> Result<(TcpStream, BytesMut), ConnectError> {
    let (stream, mut buf) = match backend.via {
        None => {
            let stream = open(backend.addr, ctx.settings.connect_timeout)
                .await
                .map_err(ConnectError::Io)?;
            (stream, BytesMut::new())
        }
        Some(via) => through(
            via,
            &backend.container_id,
            backend.addr.port(),
            ctx.settings
                .connect_timeout
                .min(crate::cluster::RELAY_CONNECT_TIMEOUT),
        )
        .await
        .map_err(ConnectError::Through)?,
    };
    set_keepalive(&stream, ctx.settings.tcp_keepalive);
    buf.reserve(16 * 1024);
    Ok((stream, buf))
}

async fn open(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(stream) => stream?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {timeout:?}"),
            ));
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.set_active(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tried_set() {
        let mut tried = Tried::default();
        tried.push(3);
        tried.push(3);
        tried.push(1);
        assert_eq!(tried.as_slice(), &[3, 1]);
        let mut busy = Tried::default();
        busy.push(2);
        assert_eq!(tried.with(&busy).as_slice(), &[3, 1, 2]);
        tried.remove(3);
        assert_eq!(tried.as_slice(), &[1]);
        for i in 0..20 {
            tried.push(i);
        }
        assert!(tried.is_full());
    }
}
