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
    sync::atomic::{AtomicBool, Ordering},
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

/// How long a half-close may wait for queued bytes to be judged.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long redirected bytes may sit in the kernel without any of them leaving through the
/// peer before the tunnel is given up.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often each kernel tunnel tells the verdict program how far its peer has drained.
const DRAIN_REPORT_PERIOD: Duration = Duration::from_millis(5);

/// What a tunnel carries, as far as the router can tell: `auto` picks its path by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelKind {
    /// A `tcp://` route: any protocol, from small requests to long streams.
    TcpRoute,
    /// After a `101` to a WebSocket upgrade.
    WebSocket,
    /// The cluster port's relay from another node's agent to a local container: it carries
    /// that agent's pooled HTTP exchanges as well as its tunnels.
    Relay,
}

impl ProxyContext {
    /// The path for a new tunnel. `spliced` says whether splice already touched the client
    /// socket: such a socket never enters the sockhash (the two misbehave on one socket).
    pub fn tunnel_path(&self, kind: TunnelKind, spliced: bool) -> TunnelPath {
        use crate::config::DatapathMode as Mode;
        let kernel = self.offload.is_some() && !spliced;
        match (self.datapath, kind) {
            (Mode::Copy, _) => TunnelPath::Copy,
            (Mode::Sockmap, _) if kernel => TunnelPath::Kernel,
            // `auto` splices every kind. `cargo xtask bench --scenarios tunnel,ws-small,tcp-small`
            // (README.md, "Performance"), two runs on this 2-CPU machine: bulk (8 x 64 MiB each
            // way) kernel 2023 against splice 1972 MiB/s at 0.99 and 1.03 CPU s/GiB, then 2179
            // against 2555 at 0.93 and 0.80; 64-byte tcp ping-pong kernel 33673 against 26146
            // messages/s, then 29910 against 29993 (p99 0.84 against 0.57 ms); WebSocket frames
            // were slowest through the kernel in every run. No clear win for the kernel, and
            // its overlap workaround depends on the kernel's skb layout (it stands aside, and
            // counts `unchecked`, where the layout differs): the default takes the path with
            // no such dependency. `--datapath sockmap` sends every tunnel through the kernel.
            (Mode::Splice | Mode::Sockmap | Mode::Auto, _) => TunnelPath::Splice,
        }
    }
}

impl TunnelPath {
    pub fn name(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Splice => "splice",
            Self::Kernel => "kernel",
        }
    }
}

/// Moves bytes both ways until both directions ended, one side failed, or the tunnel carried
/// no byte either way for the tunnel idle timeout (then both sides are closed).
pub async fn run(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    path: TunnelPath,
    ctx: &ProxyContext,
) {
    let metrics = &ctx.metrics;
    let idle_timeout = ctx.settings.tunnel_idle_timeout;
    match path {
        TunnelPath::Copy => {
            let (idle_client, idle_backend) = (client.as_raw_fd(), backend.as_raw_fd());
            tokio::select! {
                () = copy_both_ways(client, backend, metrics) => {}
                () = idle_for(idle_client, idle_backend, idle_timeout) => {
                    debug!("tunnel idle for {idle_timeout:?}: closed");
                }
            }
        }
        TunnelPath::Splice => {
            let (client, backend) = (&*client, &*backend);
            let up = splice_direction(client, backend, ctx);
            let down = splice_direction(backend, client, ctx);
            tokio::select! {
                ended = async { tokio::try_join!(up, down) } => if let Err(e) = ended {
                    debug!("spliced tunnel ended: {e:?}");
                    reset(client);
                    reset(backend);
                },
                () = idle_for(client.as_raw_fd(), backend.as_raw_fd(), idle_timeout) => {
                    debug!("tunnel idle for {idle_timeout:?}: closed");
                }
            }
        }
        TunnelPath::Kernel => {
            let offload = ctx
                .offload
                .as_deref()
                .expect("kernel path chosen only with offload");
            kernel(client, backend, offload, metrics, idle_timeout).await;
        }
    }
}

/// A userspace copy both ways between a client that is not a plain socket (TLS the agent
/// terminates; `client_fd` is its TCP socket, watched for idleness) and a backend.
pub async fn run_copied<C>(
    client: &mut C,
    client_fd: RawFd,
    backend: &mut TcpStream,
    ctx: &ProxyContext,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = &ctx.metrics;
    let idle_timeout = ctx.settings.tunnel_idle_timeout;
    let backend_fd = backend.as_raw_fd();
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut backend_read, mut backend_write) = backend.split();
    let up = copy_direction(&mut client_read, &mut backend_write, metrics);
    let down = copy_direction(&mut backend_read, &mut client_write, metrics);
    tokio::select! {
        ended = async { tokio::try_join!(up, down) } => if let Err(e) = ended {
            debug!("copied tunnel ended: {e}");
        },
        () = idle_for(client_fd, backend_fd, idle_timeout) => {
            debug!("tunnel idle for {idle_timeout:?}: closed");
        }
    }
}

/// Resolves once neither socket has received a byte for `timeout`. The kernel stamps each
/// socket's last data receive (`tcpi_last_data_recv`, whichever path then moves the bytes:
/// copy, splice or sockhash redirect), so this sleeps until the earliest moment the tunnel can
/// have been quiet that long instead of sampling byte counters (which made it up to a sampling
/// period late and woke it four times per timeout).
pub async fn idle_for(a: RawFd, b: RawFd, timeout: Duration) {
    loop {
        // A socket whose info cannot be read any more (closed under us) counts as quiet.
        let quiet = [a, b]
            .into_iter()
            .map(|fd| {
                tcp_info(fd).map_or(timeout, |i| {
                    Duration::from_millis(i.tcpi_last_data_recv.into())
                })
            })
            .min()
            .unwrap_or(timeout);
        let Some(left) = timeout.checked_sub(quiet).filter(|left| !left.is_zero()) else {
            return;
        };
        // At least a few milliseconds: the stamp has jiffy resolution.
        tokio::time::sleep(left.max(Duration::from_millis(5))).await;
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

/// One direction through splice, or, when no pipe is free, through a userspace copy.
async fn splice_direction(
    from: &TcpStream,
    to: &TcpStream,
    ctx: &ProxyContext,
) -> Result<(), SpliceError> {
    // No idle limit here: the tunnel has its own (`idle_for`), over both directions, since one
    // direction may rightly stay quiet for ever while the other one talks.
    match splice::transfer(from, to, None, &ctx.pipes, &ctx.metrics.bytes_spliced, None).await {
        Err(SpliceError::NoPipe) => copy_shared(from, to, &ctx.metrics)
            .await
            .map_err(SpliceError::Sink)?,
        result => {
            result?;
        }
    }
    shutdown_write(to);
    Ok(())
}

/// A userspace copy over shared references (the splice path's fallback).
async fn copy_shared(from: &TcpStream, to: &TcpStream, metrics: &Metrics) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        from.readable().await?;
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        write_all(to, &buf[..n]).await?;
        Metrics::add(&metrics.bytes_copied, n as u64);
    }
}

/// The kernel path: attach both sockets, then only watch for each side's end.
async fn kernel(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    offload: &KernelOffload,
    metrics: &Metrics,
    idle_timeout: Duration,
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
    // Each direction runs on its own, so that one waiting for its peer to drain never stops the
    // other (which may be what the peer waits for).
    let (up_ended, down_ended) = (AtomicBool::new(false), AtomicBool::new(false));
    let up = Direction {
        from: client,
        to: backend,
        from_cookie: pair.client,
        to_base: base.1,
        ended: &up_ended,
        from_shut: &down_ended,
        in_userspace: false,
        passed_read: 0,
    };
    let down = Direction {
        from: backend,
        to: client,
        from_cookie: pair.backend,
        to_base: base.0,
        ended: &down_ended,
        from_shut: &up_ended,
        in_userspace: false,
        passed_read: 0,
    };
    let (up, down) = (up.run(offload, metrics), down.run(offload, metrics));
    let idle = idle_for(client.as_raw_fd(), backend.as_raw_fd(), idle_timeout);
    tokio::pin!(up, down, idle);
    let (mut up_done, mut down_done) = (false, false);
    let mut ended_by_reset = false;
    while !(ended_by_reset || (up_done && down_done)) {
        tokio::select! {
            step = &mut up, if !up_done => {
                up_done = true;
                ended_by_reset = step == Step::Reset;
            }
            step = &mut down, if !down_done => {
                down_done = true;
                ended_by_reset = step == Step::Reset;
            }
            () = &mut idle => {
                debug!("kernel tunnel idle for {idle_timeout:?}: closed");
                break;
            }
        }
    }
    let (up, down) = offload.detach_pair(pair);
    let redirected = up.bytes_redirected + down.bytes_redirected;
    Metrics::add(&metrics.bytes_kernel, redirected);
    Metrics::add(&metrics.tunnel_overlaps_cut, up.overlaps + down.overlaps);
    Metrics::add(
        &metrics.tunnel_overlap_bytes_cut,
        up.overlap_bytes + down.overlap_bytes,
    );
    if up.unchecked + down.unchecked > 0 {
        tracing::warn!(
            unchecked = up.unchecked + down.unchecked,
            "kernel tunnel: segments whose sequence numbers the verdict program could not read \
             (unexpected sk_buff layout): retransmissions on them may be delivered twice"
        );
    }
    if ended_by_reset {
        // One side was reset: reset the other too rather than let it wait for a FIN.
        reset(client);
        reset(backend);
    }
    // Per direction: a stream judged twice by the kernel shows as more bytes redirected than
    // the stream carried.
    debug!(
        up_redirected = up.bytes_redirected,
        up_passed = up.bytes_passed,
        up_demoted = up.demoted,
        down_redirected = down.bytes_redirected,
        down_passed = down.bytes_passed,
        down_demoted = down.demoted,
        up_overlaps = up.overlaps,
        up_overlap_bytes = up.overlap_bytes,
        down_overlaps = down.overlaps,
        down_overlap_bytes = down.overlap_bytes,
        reset = ended_by_reset,
        "kernel tunnel ended"
    );
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Continue,
    /// This direction is over: EOF seen and passed on as a half-close.
    Ended,
    Reset,
}

/// One direction of a kernel tunnel.
struct Direction<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    from_cookie: u64,
    /// `to`'s bytes written before the attach.
    to_base: u64,
    /// Set when this direction ended (we shut down `to`'s write side).
    ended: &'a AtomicBool,
    /// Whether we shut down `from`'s write side (the other direction ended).
    from_shut: &'a AtomicBool,
    /// The verdict program passes this direction's bytes to userspace now (it was demoted: the
    /// peer did not keep up), and userspace forwards them.
    in_userspace: bool,
    /// Bytes userspace read from `from` (all of them passed by the program).
    passed_read: u64,
}

impl Direction<'_> {
    /// Watches `from` until this direction ends; meanwhile keeps the verdict program told how
    /// far the peer has drained.
    async fn run(mut self, offload: &KernelOffload, metrics: &Metrics) -> Step {
        // Bytes that arrived before the attach sit in the receive queue: a receive call runs
        // them through the verdict. Called directly, since tokio may hold no readiness for a
        // socket whose earlier events were consumed by the reads before the attach.
        let mut step = match peek(self.from.as_raw_fd()) {
            Ok(0) => self.on_eof(offload, metrics).await,
            Ok(_) => self.on_readable(offload, metrics).await,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Continue,
            Err(e) => {
                debug!("tunnel side failed: {e}");
                Step::Reset
            }
        };
        let mut drain_reports = tokio::time::interval(DRAIN_REPORT_PERIOD);
        drain_reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while step == Step::Continue {
            step = tokio::select! {
                _ = drain_reports.tick() => {
                    self.report_drained(offload);
                    Step::Continue
                }
                r = self.from.readable() => match r {
                    Ok(()) => self.on_readable(offload, metrics).await,
                    Err(_) => Step::Reset,
                },
            };
        }
        step
    }

    /// Tells the verdict program how much of what it redirected has left through the peer.
    fn report_drained(&self, offload: &KernelOffload) {
        if !self.in_userspace {
            let drained = bytes_written(self.to.as_raw_fd()).saturating_sub(self.to_base);
            offload.set_drained(self.from_cookie, drained);
        }
    }

    /// `from` is readable: EOF (TCP shut it for reading), a reset, or bytes the program passed
    /// to userspace (the direction was demoted, or the peer vanished).
    ///
    /// It looks with `MSG_PEEK` first and reads only when there are passed bytes to take. A
    /// receive call on a socket in the sockhash first runs the verdict over what waits in the
    /// receive queue (bytes that arrived before the attach are judged only that way), and a
    /// consuming one then writes back the `copied_seq` it saw on entry, losing the verdict's
    /// advances (`tcp_bpf_recvmsg_parser`; a peek skips that write). A stale `copied_seq` makes
    /// the socket look readable for ever: every byte the kernel forwards would wake the agent.
    async fn on_readable(&mut self, offload: &KernelOffload, metrics: &Metrics) -> Step {
        let mut buf = vec![0u8; 64 * 1024];
        let fd = self.from.as_raw_fd();
        loop {
            match self.from.try_io(Interest::READABLE, || peek(fd)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Continue,
                Err(e) => {
                    debug!("tunnel side failed: {e}");
                    return Step::Reset;
                }
                Ok(0) => return self.on_eof(offload, metrics).await,
                Ok(_) => {}
            }
            match recv(fd, &mut buf) {
                Ok(0) => return self.on_eof(offload, metrics).await,
                Ok(n) => {
                    if self
                        .forward_passed(&buf[..n], offload, metrics)
                        .await
                        .is_err()
                    {
                        return Step::Reset;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!("tunnel side failed: {e}");
                    return Step::Reset;
                }
            }
        }
    }

    /// `from` reads as ended: a reset, or a FIN that is passed on as a half-close once every
    /// byte before it left through the peer.
    async fn on_eof(&mut self, offload: &KernelOffload, metrics: &Metrics) -> Step {
        let fd = self.from.as_raw_fd();
        // With the socket in the sockhash a reset can read as EOF: ask the socket. A socket
        // whose write side we already shut down also reads CLOSE after a normal FIN (it went
        // to TIME_WAIT), so CLOSE means reset only while our side was still open.
        if socket_error(self.from) != 0
            || (tcp_state(fd) == Some(TCP_CLOSE) && !self.from_shut.load(Ordering::Relaxed))
        {
            debug!(error = socket_error(self.from), state = ?tcp_state(fd), "tunnel side reset");
            return Step::Reset;
        }
        if self.judge_queued(offload, metrics).await.is_err() {
            return Step::Reset;
        }
        self.wait_flushed(offload, FLUSH_TIMEOUT).await;
        shutdown_write(self.to);
        self.ended.store(true, Ordering::Relaxed);
        Step::Ended
    }

    /// After EOF: bytes that reached `from` before the attach may still wait in its receive
    /// queue, unjudged (a receive call that reports EOF does not judge them all). Keep calling
    /// receive until the queue is empty, so every byte was redirected before the FIN is passed
    /// on.
    ///
    /// Likewise bytes the program passed (after a demotion) may still sit in a kernel work
    /// queue on their way to the socket's own queue while a read already reports EOF: keep
    /// reading until every passed byte was read.
    async fn judge_queued(&mut self, offload: &KernelOffload, metrics: &Metrics) -> io::Result<()> {
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let fd = self.from.as_raw_fd();
        let mut buf = vec![0u8; 64 * 1024];
        while (unread_bytes(fd) > 0
            || self.passed_read < offload.direction(self.from_cookie).bytes_passed)
            && Instant::now() < deadline
        {
            match recv(fd, &mut buf) {
                Ok(n) if n > 0 => self.forward_passed(&buf[..n], offload, metrics).await?,
                Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends bytes the program passed to userspace on to the peer. The first time, the bytes
    /// the kernel redirected before must leave first, or these would overtake them.
    async fn forward_passed(
        &mut self,
        bytes: &[u8],
        offload: &KernelOffload,
        metrics: &Metrics,
    ) -> io::Result<()> {
        if !self.in_userspace {
            self.in_userspace = true;
            let entry = offload.direction(self.from_cookie);
            if entry.demoted != 0 {
                Metrics::add(&metrics.tunnels_demoted, 1);
                debug!(
                    cookie = self.from_cookie,
                    redirected = entry.bytes_redirected,
                    passed = entry.bytes_passed,
                    first_read = bytes.len(),
                    "tunnel direction demoted to userspace: the peer does not keep up"
                );
            } else {
                debug!(
                    cookie = self.from_cookie,
                    redirected = entry.bytes_redirected,
                    first_read = bytes.len(),
                    "tunnel direction read bytes in userspace without a demotion"
                );
            }
            if !self.wait_flushed(offload, STALL_TIMEOUT).await {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer stopped draining",
                ));
            }
        }
        self.passed_read += bytes.len() as u64;
        Metrics::add(&metrics.bytes_copied, bytes.len() as u64);
        write_all(self.to, bytes).await
    }

    /// Waits until every byte the kernel redirected from `from` has been handed to `to`'s TCP
    /// stack (acked or queued): a FIN, or bytes forwarded by userspace, would overtake them.
    /// Gives up when nothing leaves for `stall` (returns false).
    async fn wait_flushed(&self, offload: &KernelOffload, stall: Duration) -> bool {
        let to = self.to.as_raw_fd();
        let mut last_sent = 0;
        let mut last_progress = Instant::now();
        loop {
            let redirected = offload.direction(self.from_cookie).bytes_redirected;
            let sent = bytes_written(to).saturating_sub(self.to_base);
            if sent >= redirected {
                return true;
            }
            if sent > last_sent {
                last_sent = sent;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > stall {
                tracing::warn!(
                    redirected,
                    sent,
                    "kernel tunnel: redirected bytes stopped leaving through the peer"
                );
                return false;
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

/// One byte with `MSG_PEEK`: 0 at EOF, 1 when bytes wait to be read, `WouldBlock` otherwise.
fn peek(fd: RawFd) -> io::Result<usize> {
    let mut byte = 0u8;
    // SAFETY: recv into one byte we own.
    let n = unsafe {
        libc::recv(
            fd,
            (&raw mut byte).cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_PEEK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

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

/// Makes the close of this socket send a reset (`SO_LINGER` 0).
fn reset(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// Bytes a tunnel moved each way, as the client's socket counts them (whatever path carried
/// them: copy, splice or the kernel), for the access log.
#[derive(Clone, Copy, Debug, Default)]
pub struct Moved {
    pub from_client: u64,
    pub to_client: u64,
}

/// The client socket's own byte counters at one moment.
pub struct ClientBytes {
    received: u64,
    written: u64,
}

impl ClientBytes {
    pub fn read(client: &TcpStream) -> Self {
        let fd = client.as_raw_fd();
        Self {
            received: tcp_info(fd).map_or(0, |i| i.tcpi_bytes_received),
            written: bytes_written(fd),
        }
    }

    pub fn moved_since(&self, client: &TcpStream) -> Moved {
        let now = Self::read(client);
        Moved {
            from_client: now.received.saturating_sub(self.received),
            to_client: now.written.saturating_sub(self.written),
        }
    }
}
