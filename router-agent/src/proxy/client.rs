//! The client side of a connection: a plain TCP socket, or TLS the agent terminates
//! (`--listen-tls`). Both are served by the same request handling (`connection`); only the
//! byte paths differ: splice(2) and the kernel's sockhash work on TCP sockets alone, so a TLS
//! client's bodies and tunnels go through userspace copies.
use std::{
    io,
    os::fd::AsRawFd as _,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};
use tokio_rustls::server::TlsStream;

use super::{ProxyContext, body::Socket, tunnel};

pub enum ClientStream {
    Tcp(TcpStream),
    /// Boxed: the TLS state is large, and most connections are plain.
    Tls(Box<TlsStream<TcpStream>>),
}

impl From<TcpStream> for ClientStream {
    fn from(stream: TcpStream) -> Self {
        Self::Tcp(stream)
    }
}

impl ClientStream {
    /// The client spoke TLS to this agent: the backend is told `X-Forwarded-Proto: https`.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// The TCP socket under the client's bytes (for TLS, the encrypted ones): its kernel
    /// counters measure what crossed the wire.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Tcp(tcp) => tcp,
            Self::Tls(tls) => tls.get_ref().0,
        }
    }

    /// Read and write halves that can be used at the same time (a request body goes up while
    /// the response head comes down).
    pub fn split(&mut self) -> (ClientRead<'_>, ClientWrite<'_>) {
        match self {
            Self::Tcp(tcp) => {
                let (read, write) = tcp.split();
                (ClientRead::Tcp(read), ClientWrite::Tcp(write))
            }
            Self::Tls(tls) => {
                let (read, write) = tokio::io::split(&mut **tls);
                (ClientRead::Tls(read), ClientWrite::Tls(write))
            }
        }
    }

    /// Carries bytes both ways with `backend` after an upgrade: by `path` for a TCP client,
    /// by a userspace copy for a TLS one (its bytes must be decrypted on the way).
    pub async fn tunnel(
        &mut self,
        backend: &mut TcpStream,
        path: tunnel::TunnelPath,
        ctx: &ProxyContext,
    ) {
        match self {
            Self::Tcp(tcp) => tunnel::run(tcp, backend, path, ctx).await,
            Self::Tls(tls) => {
                let fd = tls.get_ref().0.as_raw_fd();
                tunnel::run_copied(&mut **tls, fd, backend, ctx).await;
            }
        }
    }
}

pub enum ClientRead<'a> {
    Tcp(ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>),
}

pub enum ClientWrite<'a> {
    Tcp(WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>),
}

impl Socket for ClientRead<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Self::Tcp(half) => half.tcp(),
            Self::Tls(_) => None,
        }
    }
}

impl Socket for ClientWrite<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Self::Tcp(half) => half.tcp(),
            Self::Tls(_) => None,
        }
    }
}

/// `AsyncRead` by delegation to whichever stream an enum holds.
macro_rules! delegate_read {
    ($type:ty) => {
        impl AsyncRead for $type {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

/// `AsyncWrite` by delegation to whichever stream an enum holds.
macro_rules! delegate_write {
    ($type:ty) => {
        impl AsyncWrite for $type {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    Self::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    Self::Tcp(s) => s.is_write_vectored(),
                    Self::Tls(s) => s.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_flush(cx),
                    Self::Tls(s) => Pin::new(s).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

delegate_read!(ClientStream);
delegate_read!(ClientRead<'_>);
delegate_write!(ClientStream);
delegate_write!(ClientWrite<'_>);
