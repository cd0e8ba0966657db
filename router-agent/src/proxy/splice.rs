//! splice(2): body bytes go socket -> pipe -> socket without being copied into userspace.
//!
//! Pipes are made once and reused (a pipe of 1 MiB lets one splice call move a large slice of a
//! body); only empty pipes go back to the pool, so a transfer that failed half-way can never leak
//! its bytes into the next one. The number of pipes in use is bounded (each costs two
//! descriptors and up to its capacity in kernel memory): past the bound, or when the kernel
//! refuses a new pipe, a transfer reports [`SpliceError::NoPipe`] before moving anything and
//! the caller copies instead.
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream};

use crate::metrics::Metrics;

/// Pipe capacity asked for by default; the kernel may grant less (see
/// /proc/sys/fs/pipe-max-size). Measured with `cargo xtask bench --pipe-sweep`
/// (docs/performance.md).
pub const DEFAULT_PIPE_SIZE: usize = 1024 * 1024;
/// Empty pipes kept for reuse.
const MAX_FREE_PIPES: usize = 64;

pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new(size: usize) -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two fds into the array we own; we check the result.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a pipe fd we own; failure leaves the default size, which still works.
        let granted = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX),
            )
        };
        // Refused (beyond pipe-max-size, or past the owner's fs.pipe-user-pages-soft once the
        // agent dropped CAP_SYS_RESOURCE): the pipe keeps what it was created with, which is
        // less than the default 64 KiB past the soft limit. Splicing must know the real size:
        // a transfer that believes the pipe has room it lacks spins.
        let capacity = if granted > 0 {
            granted as usize
        } else {
            // SAFETY: fcntl on a pipe fd we own, without arguments.
            let current = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            usize::try_from(current).unwrap_or(0).max(4096)
        };
        Ok(Self {
            read,
            write,
            capacity,
        })
    }
}

pub struct PipePool {
    free: Mutex<Vec<Pipe>>,
    /// Capacity asked for each new pipe.
    size: usize,
    /// Capacity the kernel granted the first pipe (it rounds up to a power of two pages, and
    /// refuses more than /proc/sys/fs/pipe-max-size to an unprivileged process).
    granted: usize,
    /// Pipes lent to transfers now, and the most that may be.
    in_use: AtomicUsize,
    max_in_use: usize,
    /// Transfers that found no pipe and were copied instead.
    pub exhausted: AtomicU64,
}

/// A pipe lent to one transfer; it goes back to the pool when dropped if it ended empty.
struct Lease<'a> {
    pool: &'a PipePool,
    pipe: Option<Pipe>,
    empty: bool,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.pool.in_use.fetch_sub(1, Ordering::Relaxed);
        if let Some(pipe) = self.pipe.take().filter(|_| self.empty) {
            let mut free = self
                .pool
                .free
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if free.len() < MAX_FREE_PIPES {
                free.push(pipe);
            }
        }
    }
}

impl PipePool {
    /// A pool asking for pipes of `size` bytes, lending at most `max_in_use` at once, with its
    /// first pipe made (which tells what the kernel grants).
    pub fn new(size: usize, max_in_use: usize) -> io::Result<Self> {
        let first = Pipe::new(size)?;
        Ok(Self {
            granted: first.capacity,
            free: Mutex::new(vec![first]),
            size,
            in_use: AtomicUsize::new(0),
            max_in_use: max_in_use.max(1),
            exhausted: AtomicU64::new(0),
        })
    }

    pub fn granted_size(&self) -> usize {
        self.granted
    }

    /// Pipes lent to transfers now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// A pipe for one transfer, or `None` at the bound or when the kernel refuses a new one.
    fn lease(&self) -> Option<Lease<'_>> {
        if self.in_use.fetch_add(1, Ordering::Relaxed) >= self.max_in_use {
            self.in_use.fetch_sub(1, Ordering::Relaxed);
            self.exhausted.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let reused = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut lease = Lease {
            pool: self,
            pipe: None,
            empty: false,
        };
        if let Ok(pipe) = reused.map_or_else(|| Pipe::new(self.size), Ok) {
            lease.pipe = Some(pipe);
            Some(lease)
        } else {
            self.exhausted.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Why a splice transfer stopped early.
#[derive(Debug)]
pub enum SpliceError {
    Source(io::Error),
    Sink(io::Error),
    /// No pipe to lend: nothing was moved, copy instead.
    NoPipe,
}

/// Moves exactly `len` bytes (or, with `None`, everything until EOF) from `src` to `dst`.
/// Returns the bytes moved. A side that makes no progress for `idle_timeout` (if given) fails
/// with `TimedOut`. The pipe goes back to the pool only if it ended empty.
pub async fn transfer(
    src: &TcpStream,
    dst: &TcpStream,
    len: Option<u64>,
    pipes: &PipePool,
    counter: &AtomicU64,
    idle_timeout: Option<Duration>,
) -> Result<u64, SpliceError> {
    let mut lease = pipes.lease().ok_or(SpliceError::NoPipe)?;
    let mut state = Transfer {
        pipe: lease.pipe.as_ref().expect("a lease holds its pipe"),
        in_pipe: 0,
        remaining: len,
        moved: 0,
        eof: false,
    };
    let result = state.run(src, dst, counter, idle_timeout).await;
    lease.empty = result.is_ok() && state.in_pipe == 0;
    result
}

struct Transfer<'a> {
    pipe: &'a Pipe,
    /// Bytes sitting in the pipe.
    in_pipe: usize,
    /// Bytes still to read from the source (`None`: until EOF).
    remaining: Option<u64>,
    moved: u64,
    eof: bool,
}

impl Transfer<'_> {
    fn source_done(&self) -> bool {
        self.eof || self.remaining == Some(0)
    }

    async fn run(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        counter: &AtomicU64,
        idle_timeout: Option<Duration>,
    ) -> Result<u64, SpliceError> {
        loop {
            let mut progressed = false;
            if !self.source_done() && self.in_pipe < self.pipe.capacity {
                let room = self.pipe.capacity - self.in_pipe;
                let want = self
                    .remaining
                    .map_or(room, |r| room.min(usize::try_from(r).unwrap_or(usize::MAX)));
                match src.try_io(Interest::READABLE, || {
                    splice(src.as_raw_fd(), self.pipe.write.as_raw_fd(), want)
                }) {
                    Ok(0) if self.remaining.is_some() => {
                        return Err(SpliceError::Source(io::ErrorKind::UnexpectedEof.into()));
                    }
                    Ok(0) => self.eof = true,
                    Ok(n) => {
                        self.in_pipe += n;
                        if let Some(r) = &mut self.remaining {
                            *r -= n as u64;
                        }
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(SpliceError::Source(e)),
                }
            }
            if self.in_pipe > 0 {
                match dst.try_io(Interest::WRITABLE, || {
                    splice(self.pipe.read.as_raw_fd(), dst.as_raw_fd(), self.in_pipe)
                }) {
                    Ok(n) => {
                        self.in_pipe -= n;
                        self.moved += n as u64;
                        Metrics::add(counter, n as u64);
                        progressed = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(SpliceError::Sink(e)),
                }
            }
            if self.source_done() && self.in_pipe == 0 {
                return Ok(self.moved);
            }
            if !progressed {
                self.wait(src, dst, idle_timeout).await?;
            }
        }
    }

    /// Waits until the side that blocked progress is ready, at most `idle_timeout`.
    async fn wait(
        &self,
        src: &TcpStream,
        dst: &TcpStream,
        idle_timeout: Option<Duration>,
    ) -> Result<(), SpliceError> {
        let can_read = !self.source_done() && self.in_pipe < self.pipe.capacity;
        let can_write = self.in_pipe > 0;
        let ready = async {
            tokio::select! {
                r = src.readable(), if can_read => r.map_err(SpliceError::Source),
                r = dst.writable(), if can_write => r.map_err(SpliceError::Sink),
            }
        };
        let Some(limit) = idle_timeout else {
            return ready.await;
        };
        tokio::time::timeout(limit, ready)
            .await
            .unwrap_or_else(|_| {
                let stalled = super::body::idle(limit);
                Err(if can_write {
                    SpliceError::Sink(stalled)
                } else {
                    SpliceError::Source(stalled)
                })
            })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between fds this transfer holds open; null offsets are required for
    // sockets and pipes. Non-blocking: readiness is handled by tokio.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    const IDLE: Duration = Duration::from_secs(5);

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn moves_exactly_the_length_and_leaves_the_rest() {
        let (mut writer, src) = pair().await;
        let (dst, mut reader) = pair().await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sender = {
            let data = data.clone();
            tokio::spawn(async move {
                writer.write_all(&data).await.unwrap();
                writer.write_all(b"NEXT").await.unwrap();
                writer
            })
        };
        let pipes = PipePool::new(DEFAULT_PIPE_SIZE, 4).unwrap();
        let counter = AtomicU64::new(0);
        let receiver = tokio::spawn(async move {
            let mut got = vec![0u8; 3_000_000];
            reader.read_exact(&mut got).await.unwrap();
            got
        });
        let moved = transfer(&src, &dst, Some(3_000_000), &pipes, &counter, Some(IDLE))
            .await
            .unwrap();
        assert_eq!(moved, 3_000_000);
        assert_eq!(
            counter.load(std::sync::atomic::Ordering::Relaxed),
            3_000_000
        );
        assert_eq!(receiver.await.unwrap(), data);
        let _writer = sender.await.unwrap();
        // The bytes after the body stay in the source socket for the next reader.
        let mut src = src;
        let mut next = [0u8; 4];
        src.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"NEXT");
        assert_eq!(
            pipes.free.lock().unwrap().len(),
            1,
            "the emptied pipe is reused"
        );
        assert_eq!(pipes.in_use(), 0);
    }

    #[tokio::test]
    async fn no_pipe_past_the_bound_and_a_stalled_side_times_out() {
        let (mut writer, src) = pair().await;
        let (dst, _reader) = pair().await;
        writer.write_all(b"abc").await.unwrap();
        let pipes = PipePool::new(DEFAULT_PIPE_SIZE, 1).unwrap();
        let counter = AtomicU64::new(0);
        let stalled = transfer(
            &src,
            &dst,
            Some(10),
            &pipes,
            &counter,
            Some(Duration::from_millis(200)),
        );
        let second = async {
            // The first transfer holds the only pipe while it waits for the missing bytes.
            tokio::task::yield_now().await;
            transfer(&src, &dst, Some(10), &pipes, &counter, Some(IDLE)).await
        };
        let (stalled, second) = tokio::join!(stalled, second);
        assert!(matches!(second, Err(SpliceError::NoPipe)));
        assert_eq!(pipes.exhausted.load(Ordering::Relaxed), 1);
        assert!(
            matches!(stalled, Err(SpliceError::Source(e)) if e.kind() == io::ErrorKind::TimedOut)
        );
        assert_eq!(pipes.in_use(), 0, "the lease is returned after a failure");
        assert!(
            pipes.free.lock().unwrap().is_empty(),
            "a non-empty pipe is not reused"
        );
    }

    #[tokio::test]
    async fn early_eof_is_a_source_error() {
        let (mut writer, src) = pair().await;
        let (dst, _reader) = pair().await;
        writer.write_all(b"short").await.unwrap();
        drop(writer);
        let result = transfer(
            &src,
            &dst,
            Some(100),
            &PipePool::new(DEFAULT_PIPE_SIZE, 4).unwrap(),
            &AtomicU64::new(0),
            Some(IDLE),
        )
        .await;
        assert!(matches!(result, Err(SpliceError::Source(_))));
    }

    #[tokio::test]
    async fn until_eof() {
        let (mut writer, src) = pair().await;
        let (dst, mut reader) = pair().await;
        tokio::spawn(async move {
            writer.write_all(&vec![7u8; 100_000]).await.unwrap();
        });
        let pipes = PipePool::new(DEFAULT_PIPE_SIZE, 4).unwrap();
        let moved = transfer(&src, &dst, None, &pipes, &AtomicU64::new(0), Some(IDLE))
            .await
            .unwrap();
        assert_eq!(moved, 100_000);
        drop(dst);
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 100_000);
    }
}
