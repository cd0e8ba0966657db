//! The proxy core in-process: `proxy::serve` on a 127.0.0.1 listener, with a routing table
//! built here and local tokio backends that record what reached them. No Docker, no root, no
//! eBPF: fast enough to run in a plain `cargo test`.
//!
//! What it leaves out is what the end-to-end suite (`tests/tests/`) is for: discovery, health
//! checks, the registry, kernel offload, real containers and clients.
#![allow(dead_code, reason = "each test binary uses a part of the harness")]

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use router_agent::{
    config::{DatapathMode, ProxySettings},
    health::BackendState,
    labels::Scheme,
    metrics::Metrics,
    proxy::{self, Admission, DEFAULT_PIPE_SIZE, Phase, PipePool, Pool, ProxyContext},
    registry::{Message, Published},
    table::{Backend, BackendStats, RouteInput, RouteKey, RoutingTable},
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};

/// How long any single step of a test may take before it counts as hung.
pub const STEP: Duration = Duration::from_secs(5);

/// The router under test.
pub struct Proxy {
    pub addr: SocketAddr,
    pub ctx: Arc<ProxyContext>,
    /// What the proxy told the registry (connect failures, error streaks).
    pub registry: mpsc::UnboundedReceiver<Message>,
    _phase: watch::Sender<Phase>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Serves `routes` with `settings`, as the agent does once it is ready.
    pub async fn start(settings: ProxySettings, routes: Vec<RouteInput>) -> Self {
        // Loopback is the only internal range: the tests' clients are internal.
        let published = Arc::new(Published::new(None));
        published.table.store(Arc::new(RoutingTable::build(routes)));
        let (registry_tx, registry) = mpsc::unbounded_channel();
        let (phase_tx, phase) = watch::channel(Phase::Serving);
        let ctx = Arc::new(ProxyContext {
            published,
            settings,
            metrics: Arc::new(Metrics::default()),
            registry: registry_tx,
            phase,
            datapath: DatapathMode::Auto,
            offload: None,
            pool: Pool::new(256),
            pipes: PipePool::new(DEFAULT_PIPE_SIZE, 16).expect("splice pipes"),
            admission: Admission::new(256),
            cluster: OnceLock::new(),
            access_log: router_agent::access_log::AccessLog::off(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(proxy::serve(listener, ctx.clone()));
        Self {
            addr,
            ctx,
            registry,
            _phase: phase_tx,
            task,
        }
    }

    pub async fn connect(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// Sends one request on a fresh connection and reads the answer.
    pub async fn send(&self, request: &[u8]) -> Response {
        let mut client = self.connect().await;
        client.write(request).await;
        client.response().await
    }

    /// The messages the proxy sent the registry so far.
    pub fn registry_messages(&mut self) -> Vec<Message> {
        std::iter::from_fn(|| self.registry.try_recv().ok()).collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP route `domain/` over these backends, in the states given.
pub fn route(domain: &str, backends: &[(&TestBackend, BackendState)]) -> RouteInput {
    route_to(
        domain,
        &backends
            .iter()
            .map(|(b, state)| (b.name, b.addr, *state))
            .collect::<Vec<_>>(),
    )
}

/// An HTTP route `domain/` over backends at any address (one that refuses, say).
pub fn route_to(domain: &str, backends: &[(&str, SocketAddr, BackendState)]) -> RouteInput {
    RouteInput {
        key: RouteKey::Http {
            domain: domain.into(),
            path: "/".into(),
        },
        domain: domain.into(),
        scheme: Scheme::Http,
        sticky: false,
        backends: backends
            .iter()
            .map(|(name, addr, state)| Backend {
                container_id: (*name).into(),
                container_name: (*name).into(),
                addr: *addr,
                weight: 100,
                state: *state,
                stats: Arc::new(BackendStats::new(None)),
                via: None,
            })
            .collect(),
        cursor: Arc::default(),
        stats: Arc::default(),
    }
}

/// A loopback address nothing listens on: connecting is refused.
pub fn refusing_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr")
}

/// How a test backend answers each request it has read whole.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// `200` with `X-Backend: <name>` and the body `<name> <method> <target> <request body>`;
    /// sends `100 Continue` first when the request expects it.
    Echo,
    /// Like `Echo`, with a chunked response body.
    EchoChunked,
    /// Reads the request and never answers.
    Silent,
    /// Writes these bytes and closes.
    Raw(&'static [u8]),
}

/// One request as a backend read it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub head: String,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.head, name)
    }
}

/// A local HTTP/1.1 backend that records every request (head and decoded body) and counts
/// the connections it accepted.
pub struct TestBackend {
    pub name: &'static str,
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<Mutex<usize>>,
    task: JoinHandle<()>,
}

impl TestBackend {
    pub async fn start(name: &'static str, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let task = tokio::spawn({
            let (seen, connections) = (seen.clone(), connections.clone());
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    *connections.lock().unwrap() += 1;
                    tokio::spawn(serve_backend(stream, name, behaviour, seen.clone()));
                }
            }
        });
        Self {
            name,
            addr,
            seen,
            connections,
            task,
        }
    }

    /// Every request read so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        *self.connections.lock().unwrap()
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_backend(
    stream: TcpStream,
    name: &str,
    behaviour: Behaviour,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    let mut stream = BufReader::new(stream);
    loop {
        let Some(head) = read_head(&mut stream).await else {
            return;
        };
        let expects_continue =
            header_in(&head, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if expects_continue
            && stream
                .get_mut()
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return;
        }
        let Some(body) = read_body(&mut stream, &head).await else {
            return;
        };
        let request_line = head.lines().next().unwrap_or_default().to_owned();
        seen.lock().unwrap().push(Seen {
            head,
            body: body.clone(),
        });
        let mut words = request_line.split(' ');
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let mut answer = format!("{name} {method} {target} ").into_bytes();
        answer.extend_from_slice(&body);
        let reply = match behaviour {
            Behaviour::Echo => {
                let mut reply = format!(
                    "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nContent-Length: {}\r\n\r\n",
                    answer.len()
                )
                .into_bytes();
                reply.extend_from_slice(&answer);
                reply
            }
            Behaviour::EchoChunked => {
                let mut reply = format!(
                    "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                .into_bytes();
                // Two chunks, so that the client's decoding must join them.
                let (first, second) = answer.split_at(answer.len() / 2);
                for chunk in [first, second] {
                    reply.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    reply.extend_from_slice(chunk);
                    reply.extend_from_slice(b"\r\n");
                }
                reply.extend_from_slice(b"0\r\n\r\n");
                reply
            }
            Behaviour::Silent => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            Behaviour::Raw(bytes) => {
                let _ = stream.get_mut().write_all(bytes).await;
                return;
            }
        };
        if stream.get_mut().write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// A client connection to the proxy.
pub struct Client {
    stream: BufReader<TcpStream>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the proxy");
        Self {
            stream: BufReader::new(stream),
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream
            .get_mut()
            .write_all(bytes)
            .await
            .expect("write to the proxy");
    }

    /// The next response (head and decoded body); panics if none comes within [`STEP`].
    pub async fn response(&mut self) -> Response {
        tokio::time::timeout(STEP, self.try_response())
            .await
            .expect("a response within the step timeout")
            .expect("a complete response")
    }

    /// The next response, or `None` at EOF or on a broken one.
    pub async fn try_response(&mut self) -> Option<Response> {
        let head = read_head(&mut self.stream).await?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        let body = if status / 100 == 1 || status == 204 || status == 304 {
            Vec::new()
        } else if header_in(&head, "content-length").is_some()
            || header_in(&head, "transfer-encoding").is_some()
        {
            read_body(&mut self.stream, &head).await?
        } else {
            let mut rest = Vec::new();
            self.stream.read_to_end(&mut rest).await.ok()?;
            rest
        };
        Some(Response { status, head, body })
    }

    /// Whether the proxy closes the connection (EOF) within [`STEP`], with nothing more sent.
    pub async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match tokio::time::timeout(STEP, self.stream.read_to_end(&mut rest)).await {
            Ok(Ok(_)) => rest.is_empty(),
            // A reset after the answer is a close as well.
            Ok(Err(_)) => true,
            Err(_) => false,
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.head, name)
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Which test backend answered, if one did.
    pub fn backend(&self) -> Option<&str> {
        self.header("x-backend")
    }
}

/// The value of the first field `name` in a head.
fn header_in<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().skip(1).find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// A head up to its empty line (CRLF line ends), or `None` at EOF.
async fn read_head(stream: &mut BufReader<TcpStream>) -> Option<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            return Some(head);
        }
        head.push_str(&line);
    }
}

/// A message body by its framing (Content-Length, chunked, or none), decoded.
async fn read_body(stream: &mut BufReader<TcpStream>, head: &str) -> Option<Vec<u8>> {
    if header_in(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let mut size_line = String::new();
            stream.read_line(&mut size_line).await.ok()?;
            let size = size_line.trim_end().split(';').next()?;
            let size = usize::from_str_radix(size, 16).ok()?;
            if size == 0 {
                // Trailers, up to the empty line.
                read_head_rest(stream).await?;
                return Some(body);
            }
            let start = body.len();
            body.resize(start + size, 0);
            stream.read_exact(&mut body[start..]).await.ok()?;
            let mut crlf = [0; 2];
            stream.read_exact(&mut crlf).await.ok()?;
            if &crlf != b"\r\n" {
                return None;
            }
        }
    }
    let length: usize = header_in(head, "content-length").map_or(Some(0), |v| v.parse().ok())?;
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.ok()?;
    Some(body)
}

async fn read_head_rest(stream: &mut BufReader<TcpStream>) -> Option<()> {
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            return Some(());
        }
    }
}
