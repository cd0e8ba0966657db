//! Reaching a container of another node: a connection to that node's agent, then
//! `CONNECT <container id>:<port>`; once the agent answers 200 the connection is a byte stream
//! to the container, over which the HTTP exchange (or the tunnel) runs as over a direct one.
//!
//! Overlay addresses cannot be reached from a node's host network (and there is no IPVS here
//! for service VIPs), so the container's own node's agent, which reaches it on its node, relays.
use std::{io, net::SocketAddr, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Largest answer head accepted from a node agent.
const MAX_ANSWER_HEAD: usize = 4096;

#[derive(Debug)]
pub enum ThroughError {
    /// The node's agent could not be reached (or did not answer in time): the node may be down.
    Agent(io::Error),
    /// The node's agent answered but could not connect to the container (refused, unknown to
    /// it): the container's own agent deals with its health.
    Refused(String),
}

impl std::fmt::Display for ThroughError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Agent(e) => write!(f, "the node's agent: {e}"),
            Self::Refused(why) => write!(f, "the node's agent could not connect: {why}"),
        }
    }
}

/// Opens a stream to port `port` of container `id` through the agent at `via`. Returns the
/// stream and any bytes the container already sent after the agent's answer.
pub async fn through(
    via: SocketAddr,
    id: &str,
    port: u16,
    timeout: Duration,
) -> Result<(TcpStream, BytesMut), ThroughError> {
    let attempt = async {
        let mut stream = TcpStream::connect(via).await.map_err(ThroughError::Agent)?;
        stream.set_nodelay(true).map_err(ThroughError::Agent)?;
        let request = format!("CONNECT {id}:{port} HTTP/1.1\r\nHost: {id}:{port}\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(ThroughError::Agent)?;
        let mut buf = BytesMut::with_capacity(MAX_ANSWER_HEAD);
        loop {
            if let Some((status, head_len)) = parse_answer(&buf).map_err(ThroughError::Refused)? {
                if status != 200 {
                    return Err(ThroughError::Refused(format!("status {status}")));
                }
                let _ = buf.split_to(head_len);
                return Ok((stream, buf));
            }
            if buf.len() >= MAX_ANSWER_HEAD {
                return Err(ThroughError::Refused("answer head too large".into()));
            }
            if stream
                .read_buf(&mut buf)
                .await
                .map_err(ThroughError::Agent)?
                == 0
            {
                return Err(ThroughError::Agent(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(ThroughError::Agent(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            )))
        })
}

/// `(status, head length)` of a complete answer head, `None` while incomplete.
fn parse_answer(buf: &[u8]) -> Result<Option<(u16, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some((response.code.unwrap_or(0), len))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(format!("invalid answer: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 Connection established\r\n\r\nhello"),
            Ok(Some((200, 39)))
        );
        assert_eq!(parse_answer(b"HTTP/1.1 502 Bad Gateway\r\n"), Ok(None));
        assert!(parse_answer(b"SSH-2.0\r\n\r\n").is_err());
    }
}
