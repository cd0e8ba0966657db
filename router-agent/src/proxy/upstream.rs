//! Connections to backends.
use std::{
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::table::{Backend, BackendStats};

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

    pub fn serves(&self, backend: &Backend) -> bool {
        self.addr == backend.addr && self.container_id == backend.container_id
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
