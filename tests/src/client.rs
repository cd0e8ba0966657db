//! A small, strict HTTP/1.1 client for assertions: one request per connection (Connection:
//! close), the whole response read until EOF.
use std::{
    fmt::Write as _,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `CONTAINERID` value of a `Set-Cookie` header.
    pub fn sticky_cookie(&self) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie"))
            .find_map(|(_, v)| v.strip_prefix("CONTAINERID="))
            .map(|v| v.split(';').next().unwrap_or_default())
    }

    /// Which test backend answered (its `X-Backend` header: the short container id).
    pub fn backend(&self) -> Option<&str> {
        self.header("x-backend")
    }
}

/// GET `path` from `addr` with this Host, plus extra header lines.
pub fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    extra_headers: &[(&str, &str)],
) -> io::Result<Response> {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in extra_headers {
        let _ = write!(request, "{name}: {value}\r\n");
    }
    request.push_str("\r\n");
    exchange(addr, request.as_bytes())
}

/// Like [`get`], from a connection bound to this source address (one of the host's own).
pub fn get_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> io::Result<Response> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    exchange_on(socket.into(), request.as_bytes())
}

/// Sends raw bytes and parses the single response that comes back before EOF.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> io::Result<Response> {
    exchange_on(
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))?,
        request,
    )
}

fn exchange_on(mut stream: TcpStream, request: &[u8]) -> io::Result<Response> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(request)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse(&raw)
}

fn parse(raw: &[u8]) -> io::Result<Response> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{what}: {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            ),
        )
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = response.parse(raw) else {
        return Err(bad("no complete response head"));
    };
    Ok(Response {
        status: response.code.ok_or_else(|| bad("no status"))?,
        headers: response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        body: raw[head_len..].to_vec(),
    })
}

/// A kept-alive connection carrying several requests; responses are framed by Content-Length.
pub struct KeepAlive {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    pub fn get(&mut self, host: &str, path: &str) -> io::Result<Response> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        self.stream.write_all(request.as_bytes())?;
        self.read_response()
    }

    /// Reads one response whose body has a Content-Length (or none).
    pub fn read_response(&mut self) -> io::Result<Response> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(head_len)) = parsed.parse(&self.buf) {
                let length = parsed
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .unwrap_or(0);
                if self.buf.len() >= head_len + length {
                    let mut response = parse(&self.buf[..head_len])?;
                    response.body = self.buf[head_len..head_len + length].to_vec();
                    self.buf.drain(..head_len + length);
                    return Ok(response);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one response head and no body (the answer to a HEAD request).
    pub fn read_head_only(&mut self) -> io::Result<Response> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let response = parse(&self.buf[..end + 4])?;
                self.buf.drain(..end + 4);
                return Ok(response);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Whether the peer closed the connection (reads EOF).
    pub fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0))
    }
}

/// Everything one connection returned: the bytes read, and whether the peer closed it.
#[derive(Debug)]
pub struct RawReply {
    pub bytes: Vec<u8>,
    /// EOF was read before the deadline: the peer closed (or half-closed) the connection.
    pub closed: bool,
}

impl RawReply {
    /// The single response in `bytes`.
    pub fn response(&self) -> io::Result<Response> {
        parse(&self.bytes)
    }
}

/// Sends raw bytes, then reads until EOF or until `timeout` passes. Unlike [`exchange`], a peer
/// that keeps the connection open is not an error: `closed` tells the two apart.
pub fn exchange_raw(addr: SocketAddr, request: &[u8], timeout: Duration) -> io::Result<RawReply> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.write_all(request)?;
    read_until_closed(&mut stream, timeout)
}

/// Reads from `stream` until EOF or until `timeout` passes.
pub fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> io::Result<RawReply> {
    let deadline = std::time::Instant::now() + timeout;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(RawReply {
                bytes,
                closed: false,
            });
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Ok(RawReply {
                    bytes,
                    closed: true,
                });
            }
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}
