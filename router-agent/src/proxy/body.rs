//! Moving a message body from one socket to another by its framing, starting with the bytes
//! already buffered. The buffer keeps whatever follows the body (a pipelined request).
use std::{io, sync::atomic::AtomicU64, time::Duration};

use bytes::{Buf as _, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::splice::{self, PipePool, SpliceError};
use crate::{
    http::{
        BodyFraming,
        chunked::{ChunkError, ChunkedScanner},
    },
    metrics::Metrics,
};

/// A stream end that may be a TCP socket, which splice can use directly.
pub trait Socket {
    fn tcp(&self) -> Option<&TcpStream>;
}

impl Socket for ReadHalf<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl Socket for WriteHalf<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

/// How body bytes may move, and where they are counted.
pub struct BodyPath<'a> {
    /// splice(2) runs of at least this many bytes, with pipes from this pool.
    pub splice: Option<(&'a PipePool, u64)>,
    pub copied: &'a AtomicU64,
    pub spliced: &'a AtomicU64,
    /// A body that moves no byte for this long is cut (`TimedOut` on the side that stalled).
    pub idle_timeout: Duration,
    /// Bound on a chunked body's trailer section (`max_head_bytes`).
    pub max_trailer_bytes: usize,
}

impl BodyPath<'_> {
    /// The pipes and the two sockets, when a run of `len` bytes (`None`: until EOF) should be
    /// spliced.
    fn splice_pair<'s, R: Socket, W: Socket>(
        &self,
        src: &'s R,
        dst: &'s W,
        len: Option<u64>,
    ) -> Option<(&PipePool, &'s TcpStream, &'s TcpStream)> {
        let (pipes, threshold) = self.splice?;
        if len.is_some_and(|n| n < threshold) {
            return None;
        }
        Some((pipes, src.tcp()?, dst.tcp()?))
    }
}

/// Read size when the buffer runs dry.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug)]
pub enum RelayError {
    /// The sending side failed or closed before the body ended.
    Source(io::Error),
    /// The receiving side failed.
    Sink(io::Error),
    Framing(ChunkError),
}

impl RelayError {
    /// The stalled side made no progress within the idle timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Source(e) | Self::Sink(e) if e.kind() == io::ErrorKind::TimedOut)
    }
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Source(e) => write!(f, "reading the body: {e}"),
            Self::Sink(e) => write!(f, "writing the body: {e}"),
            Self::Framing(e) => e.fmt(f),
        }
    }
}

/// What relaying one body did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Relayed {
    /// splice(2) carried some of it.
    pub spliced: bool,
    /// Bytes written to the receiving side (chunk framing included), for the access log.
    pub bytes: u64,
}

/// Relays one body.
pub async fn relay<R, W>(
    framing: BodyFraming,
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    path: &BodyPath<'_>,
) -> Result<Relayed, RelayError>
where
    R: AsyncRead + Socket + Unpin,
    W: AsyncWrite + Socket + Unpin,
{
    match framing {
        BodyFraming::None => Ok(Relayed::default()),
        BodyFraming::Length(n) => relay_length(n, src, buf, dst, path)
            .await
            .map(|spliced| Relayed { spliced, bytes: n }),
        BodyFraming::Chunked => relay_chunked(src, buf, dst, path).await,
        BodyFraming::UntilClose => relay_until_close(src, buf, dst, path).await,
    }
}

async fn relay_length<R, W>(
    mut remaining: u64,
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    path: &BodyPath<'_>,
) -> Result<bool, RelayError>
where
    R: AsyncRead + Socket + Unpin,
    W: AsyncWrite + Socket + Unpin,
{
    let copied = path.copied;
    while remaining > 0 {
        if buf.is_empty() {
            // What is not buffered yet can go straight from socket to socket.
            if let Some((pipes, from, to)) = path.splice_pair(src, dst, Some(remaining)) {
                match splice::transfer(
                    from,
                    to,
                    Some(remaining),
                    pipes,
                    path.spliced,
                    Some(path.idle_timeout),
                )
                .await
                {
                    Ok(_) => return Ok(true),
                    // Out of pipes: the body is copied instead.
                    Err(SpliceError::NoPipe) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            fill(src, buf, path.idle_timeout).await?;
        }
        let take = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        write(dst, &buf[..take], copied, path.idle_timeout).await?;
        buf.advance(take);
        remaining -= take as u64;
    }
    Ok(false)
}

/// Chunk framing is scanned in userspace; the data of large chunks is spliced.
async fn relay_chunked<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    path: &BodyPath<'_>,
) -> Result<Relayed, RelayError>
where
    R: AsyncRead + Socket + Unpin,
    W: AsyncWrite + Socket + Unpin,
{
    let mut scanner = ChunkedScanner::new(path.max_trailer_bytes);
    let mut relayed = Relayed::default();
    loop {
        if buf.is_empty() {
            let data = scanner.data_remaining();
            if data > 0
                && let Some((pipes, from, to)) = path.splice_pair(src, dst, Some(data))
            {
                match splice::transfer(
                    from,
                    to,
                    Some(data),
                    pipes,
                    path.spliced,
                    Some(path.idle_timeout),
                )
                .await
                {
                    Ok(_) => {
                        scanner.skip_data(data);
                        relayed.spliced = true;
                        relayed.bytes += data;
                        continue;
                    }
                    Err(SpliceError::NoPipe) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            fill(src, buf, path.idle_timeout).await?;
        }
        let body_bytes = scanner.advance(buf).map_err(RelayError::Framing)?;
        write(dst, &buf[..body_bytes], path.copied, path.idle_timeout).await?;
        buf.advance(body_bytes);
        relayed.bytes += body_bytes as u64;
        if scanner.is_done() {
            return Ok(relayed);
        }
    }
}

async fn relay_until_close<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    path: &BodyPath<'_>,
) -> Result<Relayed, RelayError>
where
    R: AsyncRead + Socket + Unpin,
    W: AsyncWrite + Socket + Unpin,
{
    let mut relayed = Relayed::default();
    if !buf.is_empty() {
        write(dst, buf, path.copied, path.idle_timeout).await?;
        relayed.bytes += buf.len() as u64;
        buf.clear();
    }
    if let Some((pipes, from, to)) = path.splice_pair(src, dst, None) {
        match splice::transfer(from, to, None, pipes, path.spliced, Some(path.idle_timeout)).await {
            Ok(n) => {
                relayed.spliced = true;
                relayed.bytes += n;
                return Ok(relayed);
            }
            Err(SpliceError::NoPipe) => {}
            Err(e) => return Err(e.into()),
        }
    }
    loop {
        buf.reserve(READ_CHUNK);
        let read = tokio::time::timeout(path.idle_timeout, src.read_buf(buf))
            .await
            .unwrap_or_else(|_| Err(idle(path.idle_timeout)));
        if read.map_err(RelayError::Source)? == 0 {
            return Ok(relayed);
        }
        write(dst, buf, path.copied, path.idle_timeout).await?;
        relayed.bytes += buf.len() as u64;
        buf.clear();
    }
}

impl From<SpliceError> for RelayError {
    fn from(e: SpliceError) -> Self {
        match e {
            SpliceError::Source(e) => Self::Source(e),
            SpliceError::Sink(e) => Self::Sink(e),
            SpliceError::NoPipe => Self::Source(io::Error::other("no splice pipe")),
        }
    }
}

/// The error of a side that made no progress for `timeout`.
pub fn idle(timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no progress for {timeout:?}"),
    )
}

/// Reads at least one byte; EOF before the body ended is an error.
async fn fill<R: AsyncRead + Unpin>(
    src: &mut R,
    buf: &mut BytesMut,
    idle_timeout: Duration,
) -> Result<(), RelayError> {
    buf.reserve(READ_CHUNK);
    match tokio::time::timeout(idle_timeout, src.read_buf(buf)).await {
        Err(_) => Err(RelayError::Source(idle(idle_timeout))),
        Ok(Ok(0)) => Err(RelayError::Source(io::ErrorKind::UnexpectedEof.into())),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(RelayError::Source(e)),
    }
}

async fn write<W: AsyncWrite + Unpin>(
    dst: &mut W,
    bytes: &[u8],
    copied: &AtomicU64,
    idle_timeout: Duration,
) -> Result<(), RelayError> {
    // The whole write must finish in the idle time: a peer that reads nothing for that long
    // stalls it; one that reads slowly but steadily is given whole chunks of at most 64 KiB.
    match tokio::time::timeout(idle_timeout, dst.write_all(bytes)).await {
        Err(_) => return Err(RelayError::Sink(idle(idle_timeout))),
        Ok(result) => result.map_err(RelayError::Sink)?,
    }
    Metrics::add(copied, bytes.len() as u64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Socket for &[u8] {
        fn tcp(&self) -> Option<&TcpStream> {
            None
        }
    }

    impl Socket for Vec<u8> {
        fn tcp(&self) -> Option<&TcpStream> {
            None
        }
    }

    async fn run(
        framing: BodyFraming,
        buffered: &[u8],
        stream: &[u8],
    ) -> (Result<Relayed, RelayError>, Vec<u8>, Vec<u8>) {
        let mut src = stream;
        let mut buf = BytesMut::from(buffered);
        let mut out = Vec::new();
        let (copied, spliced) = (AtomicU64::new(0), AtomicU64::new(0));
        let path = BodyPath {
            splice: None,
            copied: &copied,
            spliced: &spliced,
            idle_timeout: Duration::from_secs(5),
            max_trailer_bytes: crate::http::DEFAULT_MAX_HEAD,
        };
        let result = relay(framing, &mut src, &mut buf, &mut out, &path).await;
        (result, out, buf.to_vec())
    }

    #[tokio::test]
    async fn length_body_keeps_what_follows() {
        let (result, out, rest) = run(BodyFraming::Length(5), b"he", b"lloGET").await;
        assert_eq!(result.unwrap().bytes, 5);
        assert_eq!(out, b"hello");
        assert_eq!(rest, b"GET");
    }

    #[tokio::test]
    async fn chunked_body_keeps_what_follows() {
        let (result, out, rest) =
            run(BodyFraming::Chunked, b"3\r\nab", b"c\r\n0\r\n\r\nNEXT").await;
        assert_eq!(out, b"3\r\nabc\r\n0\r\n\r\n");
        assert_eq!(
            result.unwrap().bytes,
            out.len() as u64,
            "chunk framing included"
        );
        assert_eq!(rest, b"NEXT");
    }

    #[tokio::test]
    async fn early_eof_is_an_error() {
        let (result, _, _) = run(BodyFraming::Length(10), b"abc", b"").await;
        assert!(matches!(result, Err(RelayError::Source(_))));
        let (result, _, _) = run(BodyFraming::Chunked, b"", b"5\r\nab").await;
        assert!(matches!(result, Err(RelayError::Source(_))));
    }

    #[tokio::test]
    async fn until_close() {
        let (result, out, _) = run(BodyFraming::UntilClose, b"ab", b"cdef").await;
        assert!(result.is_ok());
        assert_eq!(out, b"abcdef");
    }

    #[tokio::test]
    async fn bad_chunks_are_refused() {
        let (result, _, _) = run(BodyFraming::Chunked, b"zz\r\n", b"").await;
        assert!(matches!(result, Err(RelayError::Framing(_))));
    }
}
