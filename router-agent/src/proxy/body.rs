//! Moving a message body from one socket to another by its framing, starting with the bytes
//! already buffered. The buffer keeps whatever follows the body (a pipelined request).
use std::{io, sync::atomic::AtomicU64};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::{
    http::{
        BodyFraming,
        chunked::{ChunkError, ChunkedScanner},
    },
    metrics::Metrics,
};

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

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Source(e) => write!(f, "reading the body: {e}"),
            Self::Sink(e) => write!(f, "writing the body: {e}"),
            Self::Framing(e) => e.fmt(f),
        }
    }
}

pub async fn relay<R, W>(
    framing: BodyFraming,
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    copied: &AtomicU64,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match framing {
        BodyFraming::None => Ok(()),
        BodyFraming::Length(n) => relay_length(n, src, buf, dst, copied).await,
        BodyFraming::Chunked => relay_chunked(src, buf, dst, copied).await,
        BodyFraming::UntilClose => relay_until_close(src, buf, dst, copied).await,
    }
}

async fn relay_length<R, W>(
    mut remaining: u64,
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    copied: &AtomicU64,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while remaining > 0 {
        if buf.is_empty() {
            fill(src, buf).await?;
        }
        let take = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        write(dst, &buf[..take], copied).await?;
        buf.advance(take);
        remaining -= take as u64;
    }
    Ok(())
}

async fn relay_chunked<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    copied: &AtomicU64,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut scanner = ChunkedScanner::default();
    loop {
        if buf.is_empty() {
            fill(src, buf).await?;
        }
        let body_bytes = scanner.advance(buf).map_err(RelayError::Framing)?;
        write(dst, &buf[..body_bytes], copied).await?;
        buf.advance(body_bytes);
        if scanner.is_done() {
            return Ok(());
        }
    }
}

async fn relay_until_close<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    copied: &AtomicU64,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        if !buf.is_empty() {
            write(dst, buf, copied).await?;
            buf.clear();
        }
        buf.reserve(READ_CHUNK);
        if src.read_buf(buf).await.map_err(RelayError::Source)? == 0 {
            return Ok(());
        }
    }
}

/// Reads at least one byte; EOF before the body ended is an error.
async fn fill<R: AsyncRead + Unpin>(src: &mut R, buf: &mut BytesMut) -> Result<(), RelayError> {
    buf.reserve(READ_CHUNK);
    match src.read_buf(buf).await {
        Ok(0) => Err(RelayError::Source(io::ErrorKind::UnexpectedEof.into())),
        Ok(_) => Ok(()),
        Err(e) => Err(RelayError::Source(e)),
    }
}

async fn write<W: AsyncWrite + Unpin>(
    dst: &mut W,
    bytes: &[u8],
    copied: &AtomicU64,
) -> Result<(), RelayError> {
    dst.write_all(bytes).await.map_err(RelayError::Sink)?;
    Metrics::add(copied, bytes.len() as u64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(
        framing: BodyFraming,
        buffered: &[u8],
        stream: &[u8],
    ) -> (Result<(), RelayError>, Vec<u8>, Vec<u8>) {
        let mut src = stream;
        let mut buf = BytesMut::from(buffered);
        let mut out = Vec::new();
        let result = relay(framing, &mut src, &mut buf, &mut out, &AtomicU64::new(0)).await;
        (result, out, buf.to_vec())
    }

    #[tokio::test]
    async fn length_body_keeps_what_follows() {
        let (result, out, rest) = run(BodyFraming::Length(5), b"he", b"lloGET").await;
        assert!(result.is_ok());
        assert_eq!(out, b"hello");
        assert_eq!(rest, b"GET");
    }

    #[tokio::test]
    async fn chunked_body_keeps_what_follows() {
        let (result, out, rest) =
            run(BodyFraming::Chunked, b"3\r\nab", b"c\r\n0\r\n\r\nNEXT").await;
        assert!(result.is_ok());
        assert_eq!(out, b"3\r\nabc\r\n0\r\n\r\n");
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
