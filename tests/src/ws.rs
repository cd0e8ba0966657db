//! A minimal WebSocket client (RFC 6455) over a plain `TcpStream`: enough to drive the test
//! backend's `/ws` echo through the router.
use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

pub struct WebSocket {
    pub stream: TcpStream,
    /// Bytes read past the handshake response.
    pending: Vec<u8>,
}

pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;

impl WebSocket {
    /// Opens `ws://<host>/ws` through `addr`; returns the socket and the 101 response head.
    pub fn connect(addr: SocketAddr, host: &str) -> io::Result<(Self, String)> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        Ok((
            Self {
                stream,
                pending: buf[head_end..].to_vec(),
            },
            head,
        ))
    }

    /// Sends one masked, final frame.
    pub fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        self.stream.write_all(&client_frame(true, opcode, payload))
    }

    /// Reads one (unmasked, server) frame: (opcode, payload).
    pub fn receive(&mut self) -> io::Result<(u8, Vec<u8>)> {
        self.fill(2)?;
        let opcode = self.pending[0] & 0x0f;
        let (len, header) = match self.pending[1] & 0x7f {
            126 => {
                self.fill(4)?;
                (
                    u64::from(u16::from_be_bytes([self.pending[2], self.pending[3]])),
                    4,
                )
            }
            127 => {
                self.fill(10)?;
                (
                    u64::from_be_bytes(self.pending[2..10].try_into().expect("8 bytes")),
                    10,
                )
            }
            n => (u64::from(n), 2),
        };
        let total = header + usize::try_from(len).expect("frame fits");
        self.fill(total)?;
        let payload = self.pending[header..total].to_vec();
        self.pending.drain(..total);
        Ok((opcode, payload))
    }

    fn fill(&mut self, n: usize) -> io::Result<()> {
        let mut chunk = vec![0u8; 256 * 1024];
        while self.pending.len() < n {
            let got = self.stream.read(&mut chunk)?;
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.pending.extend_from_slice(&chunk[..got]);
        }
        Ok(())
    }

    /// Whether the peer has closed (EOF) with nothing left unread.
    pub fn at_eof(&mut self) -> bool {
        let mut byte = [0u8; 1];
        self.pending.is_empty() && matches!(self.stream.read(&mut byte), Ok(0))
    }
}

/// A client frame: masked, as RFC 6455 requires of clients (a fixed mask is enough for tests).
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            // Length marker 126: a 16-bit length follows.
            frame.push(0x80 | 0x7e);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            // Length marker 127: a 64-bit length follows.
            frame.push(0x80 | 0x7f);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}
