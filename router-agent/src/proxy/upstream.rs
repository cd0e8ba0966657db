//! Connections to backends.
use std::{
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::BytesMut;
use tokio::net::TcpStream;

use super::ProxyContext;
use crate::{
    metrics::{BackendError, Metrics},
    registry::Message,
    table::{Backend, BackendStats, Route, Selection},
};

/// Whether an idle pooled HTTP connection may serve the request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// HTTP requests: take a pooled connection if there is one.
    Pooled,
    /// Tunnels: a connection of their own.
    Fresh,
}

/// Picks backends of the route until one accepts a connection. Each backend that refuses is
/// reported to the registry (a passive failure takes it down at once) and added to `tried`.
/// `None` when no backend is left (the caller answers 503 or closes).
pub async fn connect_next(
    route: &Route,
    sticky: Option<&[u8]>,
    tried: &mut Tried,
    ctx: &ProxyContext,
    reuse: Reuse,
) -> Option<(Selection, Upstream)> {
    loop {
        let selection = route
            .select(sticky, tried.as_slice())
            .filter(|_| !tried.is_full())?;
        if !tried.is_empty() {
            Metrics::add(&ctx.metrics.retries, 1);
        }
        tried.push(selection.index);
        let backend = &route.backends[selection.index];
        if reuse == Reuse::Pooled
            && let Some(upstream) = ctx.pool.take(backend)
        {
            return Some((selection, upstream));
        }
        match Upstream::connect(backend, ctx.settings.connect_timeout).await {
            Ok(upstream) => return Some((selection, upstream)),
            Err(e) => {
                ctx.metrics.backend_error(BackendError::Connect);
                report_failure(ctx, backend, format!("connect: {e}"));
            }
        }
    }
}

pub fn report_failure(ctx: &ProxyContext, backend: &Backend, error: String) {
    let _ = ctx.registry.send(Message::PassiveFailure {
        id: backend.container_id.clone(),
        addr: backend.addr,
        error,
    });
}

/// Backends already tried for one request (a small fixed set: no allocation per request).
#[derive(Default)]
pub struct Tried {
    indices: [usize; 8],
    len: usize,
}

impl Tried {
    fn push(&mut self, index: usize) {
        if self.len < self.indices.len() {
            self.indices[self.len] = index;
            self.len += 1;
        }
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

/// An open connection to one backend container, counted in its `active_connections`.
pub struct Upstream {
    pub stream: TcpStream,
    /// Bytes read from the backend and not yet relayed.
    pub buf: BytesMut,
    pub container_id: Arc<str>,
    pub addr: SocketAddr,
    stats: Arc<BackendStats>,
    /// Whether it already carried a request (a kept-alive connection may have been closed by
    /// the backend in the meantime).
    pub reused: bool,
}

impl Upstream {
    pub async fn connect(backend: &Backend, timeout: Duration) -> io::Result<Self> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(backend.addr)).await {
            Ok(stream) => stream?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {timeout:?}"),
                ));
            }
        };
        stream.set_nodelay(true)?;
        backend
            .stats
            .active_connections
            .fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            container_id: backend.container_id.clone(),
            addr: backend.addr,
            stats: backend.stats.clone(),
            reused: false,
        })
    }

    /// Whether a kept-alive connection still looks usable: a backend that closed it reads as
    /// EOF (or sent something unasked) without blocking.
    pub fn is_idle_and_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stats
            .active_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}
