//! Byte tunnels: after `101 Switching Protocols`, and for `tcp://` routes. Both sockets carry
//! an opaque stream both ways until each side has closed its half.
//!
//! Three ways to move the bytes: a userspace copy, splice(2) through pipes, or the kernel
//! (both sockets in the sockhash; the `sk_skb` verdict program forwards every byte and userspace
//! only watches for the end). The kernel path follows the traps found by experiment
//! (ENVIRONMENT.md): the program drops the empty skb of a FIN, userspace still reads the EOF
//! (TCP shut the socket for reading), and before a half-close is passed on, what the kernel
//! redirected must have left through the peer.
use std::{
    io,
    net::Shutdown,
    os::fd::{AsRawFd as _, RawFd},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, Interest},
    net::TcpStream,
};
use tracing::debug;

use super::{
    ProxyContext,
    splice::{self, SpliceError},
};
use crate::{ebpf::KernelOffload, metrics::Metrics};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelPath {
    Copy,
    Splice,
    Kernel,
}

/// How long a half-close may wait for redirected bytes to leave through the peer.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

impl ProxyContext {
    /// The path for a new tunnel. `spliced` says whether splice already touched the client
    /// socket: such a socket never enters the sockhash (the two misbehave on one socket).
    pub fn tunnel_path(&self, spliced: bool) -> TunnelPath {
        use crate::config::DatapathMode as Mode;
        match self.datapath {
            Mode::Copy => TunnelPath::Copy,
            Mode::Splice => TunnelPath::Splice,
            Mode::Sockmap | Mode::Auto if self.offload.is_some() && !spliced => TunnelPath::Kernel,
            Mode::Sockmap | Mode::Auto => TunnelPath::Splice,
        }
    }
}

/// Moves bytes both ways until both directions ended or one side failed.
pub async fn run(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    path: TunnelPath,
    ctx: &ProxyContext,
) {
    let metrics = &ctx.metrics;
    match path {
        TunnelPath::Copy => copy_both_ways(client, backend, metrics).await,
        TunnelPath::Splice => {
            let (client, backend) = (&*client, &*backend);
            let up = splice_direction(client, backend, ctx);
            let down = splice_direction(backend, client, ctx);
            if let Err(e) = tokio::try_join!(up, down) {
                debug!("spliced tunnel ended: {e:?}");
                reset(client);
                reset(backend);
            }
        }
        TunnelPath::Kernel => {
            let offload = ctx
                .offload
                .as_deref()
                .expect("kernel path chosen only with offload");
            kernel(client, backend, offload, metrics).await;
        }
    }
}

/// Userspace copy, counted as it goes; each side's EOF becomes a half-close of the other.
async fn copy_both_ways(client: &mut TcpStream, backend: &mut TcpStream, metrics: &Metrics) {
    let (mut client_read, mut client_write) = client.split();
    let (mut backend_read, mut backend_write) = backend.split();
    let up = copy_direction(&mut client_read, &mut backend_write, metrics);
    let down = copy_direction(&mut backend_read, &mut client_write, metrics);
    if let Err(e) = tokio::try_join!(up, down) {
        debug!("copied tunnel ended: {e}");
    }
}

async fn copy_direction(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    metrics: &Metrics,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        Metrics::add(&metrics.bytes_copied, n as u64);
    }
}

async fn splice_direction(
    from: &TcpStream,
    to: &TcpStream,
    ctx: &ProxyContext,
) -> Result<(), SpliceError> {
    splice::transfer(from, to, None, &ctx.pipes, &ctx.metrics.bytes_spliced).await?;
    shutdown_write(to);
    Ok(())
}

/// The kernel path: attach both sockets, then only watch for each side's end.
async fn kernel(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    offload: &KernelOffload,
    metrics: &Metrics,
) {
    // What each socket had been given to send before the kernel took over: the flush check
    // compares the kernel's redirected bytes against what was sent since.
    let base = (
        bytes_written(client.as_raw_fd()),
        bytes_written(backend.as_raw_fd()),
    );
    let pair = match offload.attach_pair(client, backend) {
        Ok(pair) => pair,
        Err(e) => {
            debug!("{e}; copying in userspace instead");
            copy_both_ways(client, backend, metrics).await;
            return;
        }
    };
    let (client, backend) = (&*client, &*backend);
    Metrics::add(&metrics.connections_offloaded, 1);
    let mut up = Direction {
        from: client,
        to: backend,
        from_cookie: pair.client,
        to_base: base.1,
        open: true,
        from_shut: false,
    };
    let mut down = Direction {
        from: backend,
        to: client,
        from_cookie: pair.backend,
        to_base: base.0,
        open: true,
        from_shut: false,
    };
    // Bytes that arrived before the attach sit in the receive queues: a receive call runs them
    // through the verdict.
    let mut ended_by_reset = false;
    for direction in [&mut up, &mut down] {
        if direction.on_readable(offload, metrics).await == Step::Reset {
            ended_by_reset = true;
        }
    }
    while !ended_by_reset && (up.open || down.open) {
        let step = tokio::select! {
            r = client.readable(), if up.open => match r {
                Ok(()) => up.on_readable(offload, metrics).await,
                Err(_) => Step::Reset,
            },
            r = backend.readable(), if down.open => match r {
                Ok(()) => down.on_readable(offload, metrics).await,
                Err(_) => Step::Reset,
            },
        };
        ended_by_reset = step == Step::Reset;
        up.from_shut = !down.open;
        down.from_shut = !up.open;
    }
    let redirected = offload.detach_pair(pair);
    Metrics::add(&metrics.bytes_kernel, redirected);
    if ended_by_reset {
        // One side was reset: reset the other too rather than let it wait for a FIN.
        reset(client);
        reset(backend);
    }
    debug!(redirected, reset = ended_by_reset, "kernel tunnel ended");
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Continue,
    Reset,
}

/// One direction of a kernel tunnel.
struct Direction<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    from_cookie: u64,
    /// `to`'s bytes written before the attach.
    to_base: u64,
    /// Bytes still flow this way.
    open: bool,
    /// We shut down `from`'s write side (the other direction ended).
    from_shut: bool,
}

impl Direction<'_> {
    /// `from` is readable: EOF (the verdict passes FINs), a reset, or bytes the kernel did not
    /// redirect (the peer vanished between checks).
    async fn on_readable(&mut self, offload: &KernelOffload, metrics: &Metrics) -> Step {
        let mut buf = [0u8; 16 * 1024];
        let fd = self.from.as_raw_fd();
        match self.from.try_io(Interest::READABLE, || recv(fd, &mut buf)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Continue,
            Err(e) => {
                debug!("tunnel side failed: {e}");
                Step::Reset
            }
            // With the socket in the sockhash a reset can read as EOF: ask the socket. A socket
            // whose write side we already shut down also reads CLOSE after a normal FIN (it
            // went to TIME_WAIT), so CLOSE means reset only while our side was still open.
            Ok(0)
                if socket_error(self.from) != 0
                    || (tcp_state(fd) == Some(TCP_CLOSE) && !self.from_shut) =>
            {
                debug!(error = socket_error(self.from), state = ?tcp_state(fd), "tunnel side reset");
                Step::Reset
            }
            Ok(0) => {
                if self.judge_queued(metrics).await.is_err() {
                    return Step::Reset;
                }
                self.wait_flushed(offload).await;
                shutdown_write(self.to);
                self.open = false;
                Step::Continue
            }
            Ok(n) => {
                debug!(bytes = n, "tunnel bytes passed to userspace");
                Metrics::add(&metrics.bytes_copied, n as u64);
                if write_all(self.to, &buf[..n]).await.is_err() {
                    Step::Reset
                } else {
                    Step::Continue
                }
            }
        }
    }

    /// After EOF: bytes that reached `from` before the attach may still wait in its receive
    /// queue, unjudged (a receive call that reports EOF does not judge them all). Keep calling
    /// receive until the queue is empty, so every byte was redirected before the FIN is passed
    /// on.
    async fn judge_queued(&self, metrics: &Metrics) -> io::Result<()> {
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let fd = self.from.as_raw_fd();
        let mut buf = [0u8; 16 * 1024];
        while unread_bytes(fd) > 0 && Instant::now() < deadline {
            match recv(fd, &mut buf) {
                Ok(n) if n > 0 => {
                    Metrics::add(&metrics.bytes_copied, n as u64);
                    write_all(self.to, &buf[..n]).await?;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Waits until every byte the kernel redirected from `from` has been handed to `to`'s TCP
    /// stack (acked or queued): a FIN sent earlier would overtake them.
    async fn wait_flushed(&self, offload: &KernelOffload) {
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let to = self.to.as_raw_fd();
        loop {
            let redirected = offload.redirected_from(self.from_cookie);
            let sent = bytes_written(to).saturating_sub(self.to_base);
            if sent >= redirected {
                return;
            }
            if Instant::now() > deadline {
                tracing::warn!(
                    redirected,
                    sent,
                    "kernel tunnel: redirected bytes not flushed in time"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

const TCP_CLOSE: u8 = 7;

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv into a buffer we own, of its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn tcp_info(fd: RawFd) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; getsockopt fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: as above, the pointer and length describe `info`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(info)
}

fn tcp_state(fd: RawFd) -> Option<u8> {
    tcp_info(fd).map(|i| i.tcpi_state)
}

/// Bytes handed to the socket's TCP stack so far: acknowledged plus still queued.
fn bytes_written(fd: RawFd) -> u64 {
    let acked = tcp_info(fd).map_or(0, |i| i.tcpi_bytes_acked);
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    let _ = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut queued) };
    acked + u64::try_from(queued).unwrap_or(0)
}

/// Bytes in the socket's receive queue that nobody (userspace or the verdict) consumed yet.
fn unread_bytes(fd: RawFd) -> i32 {
    let mut unread: libc::c_int = 0;
    // SAFETY: FIONREAD (SIOCINQ) writes one int.
    let _ = unsafe { libc::ioctl(fd, libc::FIONREAD, &raw mut unread) };
    unread
}

fn socket_error(socket: &TcpStream) -> i32 {
    socket2::SockRef::from(socket)
        .take_error()
        .ok()
        .flatten()
        .and_then(|e| e.raw_os_error())
        .unwrap_or(0)
}

fn shutdown_write(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).shutdown(Shutdown::Write);
}

/// Makes the close of this socket send a reset (SO_LINGER 0).
fn reset(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}
