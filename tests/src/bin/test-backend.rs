//! `test-backend`: the origin server behind the reverse proxy in the end-to-end tests.
//!
//! It runs as the `router-local/backend` container (`FROM scratch`, tini as PID 1) and is a small
//! but real HTTP/1.1 server, so the tests exercise the proxy against honest framing: keep-alive,
//! pipelining, `Content-Length` and chunked bodies in both directions, HEAD, and graceful
//! shutdown on SIGTERM. Every response names the container (`X-Backend`), which is how the tests
//! see where the proxy sent a request.
//!
//! Endpoints (query strings are split on `&` and `=`, without percent-decoding):
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /`, any unknown path | `backend=NAME` |
//! | `GET /health` | `ok`, or 503 `unhealthy` while `/tmp/unhealthy` exists |
//! | `GET /set-health?ok=0\|1` | creates or removes `/tmp/unhealthy` |
//! | `GET /delay?ms=N` | sleeps N ms, then `backend=NAME` |
//! | `GET /bytes?n=N[&chunked=1]` | N bytes, byte i = i % 251 |
//! | `POST\|PUT /echo` | the request body |
//! | `POST\|PUT /sha256` | `<len> <hex sha256>` of the request body |
//! | `GET /stats` | one `key=<n>` line each, in this order: `requests` (this request included), `tcp_connections`, `tcp_bytes`, `http_connections`, `greeter_bytes`, `resets`, `booms`, `stalls_closed`, `whoami_connections` |
//! | `GET /headers` | the request head exactly as received |
//! | `GET /boom` | reads the request, then closes the connection without answering (`booms` in `/stats`) |
//! | `GET /stall?bytes=N` | a head announcing 2N bytes, N of them, then nothing until the peer closes (`stalls_closed` in `/stats` counts those ends) |
//! | `GET /ws` + WebSocket upgrade | 101, then a frame echo (below); 400 without a valid upgrade |
//!
//! Environment switches for failure tests: `BACKEND_FAIL=close` answers every request like
//! `/boom`; `BACKEND_KEEPALIVE=off` answers every request with `Connection: close`;
//! `BACKEND_KEEPALIVE_MS=N` closes a kept-alive connection idle for N ms between requests
//! (servers do, on their own schedule).
//!
//! Routing looks at the path only: the method matters just for HEAD, which gets the headers of
//! the matching GET. Design: one std thread per connection, no async runtime, so the code reads
//! top to bottom and a stuck connection can never stall another one.
//!
//! `/ws` (RFC 6455, version 13, no extensions): every text, binary and continuation frame comes
//! back unmasked with the same opcode, FIN bit and payload, one frame at a time, so fragmented
//! messages stay fragmented; a ping gets a pong with its payload; a close gets a close with the
//! same status code, then the server half-closes. A payload over 16 MiB gets close 1009, a
//! protocol error close 1002. The session has no idle timeout: it lasts until the client ends it.
//!
//! Four more listeners speak raw TCP:
//!
//! | flag (env) | default | on each connection |
//! | --- | --- | --- |
//! | `--tcp-echo` (`BACKEND_TCP_ECHO`) | `0.0.0.0:7000` | sends back every byte it receives, half-closes once the client has half-closed |
//! | `--tcp-greeter` (`BACKEND_TCP_GREETER`) | `0.0.0.0:7001` | writes `hello\n` and half-closes at once, then reads (and counts) until EOF |
//! | `--tcp-reset` (`BACKEND_TCP_RESET`) | `0.0.0.0:7002` | waits for one byte (or EOF), then closes with `SO_LINGER` 0: a TCP RST |
//! | `--tcp-whoami` (`BACKEND_TCP_WHOAMI`) | `0.0.0.0:7003` | reads one line (or to EOF), answers `peer=<client address as seen here> backend=NAME` and closes |
//!
//! The echo lets tests see a stream through the proxy end to end; the greeter, that a proxy
//! passes on the server's half-close and still carries the client's bytes afterwards
//! (`greeter_bytes` in `/stats`); the reset, that a proxy passes on an abortive close (`resets`);
//! the whoami, whose address a client reached and whether a proxy stood in between (the peer
//! is the client itself only without one; `whoami_connections`). It closes first, so a client
//! that opens many short connections leaves no `TIME_WAIT` behind on its side.
//! All listeners stop accepting on SIGTERM; open WebSocket and raw TCP sessions count as in
//! flight, so shutdown waits for them up to its 10 s bound.

use std::{
    fmt::Write as _,
    fs,
    io::{self, Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    process::ExitCode,
    sync::{
        OnceLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use httparse::Status;
use sha2::{Digest as _, Sha256};

const USAGE: &str = "usage: test-backend [--listen ADDR] [--tcp-echo ADDR] [--tcp-greeter ADDR] [--tcp-reset ADDR] [--tcp-whoami ADDR]
  --listen ADDR       HTTP (default 0.0.0.0:80, env BACKEND_LISTEN)
  --tcp-echo ADDR     raw TCP echo (default 0.0.0.0:7000, env BACKEND_TCP_ECHO)
  --tcp-greeter ADDR  writes hello, half-closes, reads to EOF (default 0.0.0.0:7001, env BACKEND_TCP_GREETER)
  --tcp-reset ADDR    resets each connection after its first byte (default 0.0.0.0:7002, env BACKEND_TCP_RESET)
  --tcp-whoami ADDR   answers each connection with the peer address it sees (default 0.0.0.0:7003, env BACKEND_TCP_WHOAMI)";
const DEFAULT_LISTEN: &str = "0.0.0.0:80";
const DEFAULT_TCP_ECHO: &str = "0.0.0.0:7000";
const DEFAULT_TCP_GREETER: &str = "0.0.0.0:7001";
const DEFAULT_TCP_RESET: &str = "0.0.0.0:7002";
const DEFAULT_TCP_WHOAMI: &str = "0.0.0.0:7003";
/// Longest line the whoami reads before it answers anyway.
const WHOAMI_LINE_LIMIT: usize = 1024;
/// Accept threads of the whoami, each serving its connections itself: a thread per connection
/// would cost more than the short exchange (the connection-rate benchmark measures the path to
/// this server, not thread creation). A client that never sends holds one of them for at most
/// `WHOAMI_READ_TIMEOUT`.
const WHOAMI_THREADS: usize = 4;
const WHOAMI_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// What the TCP greeter writes before it half-closes.
const GREETING: &[u8] = b"hello\n";
/// Read size of the TCP echo: large, so a bulk transfer takes few system calls.
const TCP_ECHO_BUFFER: usize = 256 * 1024;
const MAX_HEADERS: usize = 100;
/// Limit on a request head, and on a chunked body's trailer section.
const MAX_HEAD: usize = 64 * 1024;
/// Largest single read, and largest single write of a generated body.
const IO_CHUNK: usize = 64 * 1024;
/// `/echo` holds a body of up to this size in memory; a larger chunked body is refused (413),
/// a larger `Content-Length` body is copied straight through instead.
const ECHO_BUFFER_LIMIT: u64 = 64 * 1024 * 1024;
/// Read timeout of every socket: how often an idle connection looks at the shutdown flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often the accept loop looks at the shutdown flag when no connection arrives.
const ACCEPT_POLL_MS: libc::c_int = 50;
/// A connection that makes no progress for this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection keeps reading what the client still sends (see `linger_close`).
const LINGER: Duration = Duration::from_millis(500);
const UNHEALTHY_FILE: &str = "/tmp/unhealthy";
/// Period of the `/bytes` pattern: a prime, so the pattern never lines up with buffer sizes and a
/// misplaced or repeated block shows up as a wrong byte.
const PATTERN_PERIOD: usize = 251;

const TEXT: &str = "text/plain; charset=utf-8";
const BINARY: &str = "application/octet-stream";

/// Set by the SIGTERM/SIGINT handler; everything else only reads it.
static SHUTDOWN: AtomicBool = AtomicBool::new(false);
/// Requests handled by this process, for `/stats`.
static REQUESTS: AtomicU64 = AtomicU64::new(0);
/// Connections accepted by the TCP echo listener, for `/stats`.
static TCP_CONNECTIONS: AtomicU64 = AtomicU64::new(0);
/// Bytes the TCP echo has sent back, for `/stats`.
static TCP_BYTES: AtomicU64 = AtomicU64::new(0);
/// Connections accepted by the HTTP listener, for `/stats`.
static HTTP_CONNECTIONS: AtomicU64 = AtomicU64::new(0);
/// Bytes the TCP greeter has read after its half-close, for `/stats`.
static GREETER_BYTES: AtomicU64 = AtomicU64::new(0);
/// Connections the TCP reset listener has closed with a reset, for `/stats`.
static RESETS: AtomicU64 = AtomicU64::new(0);
/// Open connections, on both listeners; shutdown waits for this to reach zero.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);
/// Requests answered by closing the connection (`/boom`, `BACKEND_FAIL=close`), for `/stats`.
static BOOMS: AtomicU64 = AtomicU64::new(0);
/// `/stall` responses that ended because the peer closed the connection, for `/stats`.
static STALLS_CLOSED: AtomicU64 = AtomicU64::new(0);
/// Connections the TCP whoami answered, for `/stats`.
static WHOAMI_CONNECTIONS: AtomicU64 = AtomicU64::new(0);
/// This backend's name (`identity()`), for the raw listeners that report it.
static NAME: OnceLock<&'static str> = OnceLock::new();

/// The environment switches (see the module header), read once.
struct Behaviour {
    fail_close: bool,
    keep_alive: bool,
    keep_alive_idle: Option<Duration>,
}

fn behaviour() -> &'static Behaviour {
    static BEHAVIOUR: OnceLock<Behaviour> = OnceLock::new();
    BEHAVIOUR.get_or_init(|| {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        Behaviour {
            fail_close: var("BACKEND_FAIL") == "close",
            keep_alive: var("BACKEND_KEEPALIVE") != "off",
            keep_alive_idle: var("BACKEND_KEEPALIVE_MS")
                .parse()
                .ok()
                .map(Duration::from_millis),
        }
    })
}

fn main() -> ExitCode {
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("test-backend: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = install_signal_handlers() {
        eprintln!("test-backend: installing signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    let bind_or_report =
        |addr: &str| bind(addr).map_err(|e| eprintln!("test-backend: listening on {addr}: {e}"));
    let (
        Ok(listener),
        Ok(echo_listener),
        Ok(greeter_listener),
        Ok(reset_listener),
        Ok(whoami_listener),
    ) = (
        bind_or_report(&config.listen),
        bind_or_report(&config.tcp_echo),
        bind_or_report(&config.tcp_greeter),
        bind_or_report(&config.tcp_reset),
        bind_or_report(&config.tcp_whoami),
    )
    else {
        return ExitCode::FAILURE;
    };
    // Leaked once: every connection thread borrows the name for the life of the process.
    let name: &'static str = Box::leak(identity().into_boxed_str());
    let _ = NAME.set(name);
    let local_of = |listener: &TcpListener, configured: &str| {
        listener
            .local_addr()
            .map_or_else(|_| configured.to_owned(), |a| a.to_string())
    };
    println!(
        "test-backend listening on {}",
        local_of(&listener, &config.listen)
    );
    let raw: [RawListener; 4] = [
        ("tcp echo", echo_listener, spawn_tcp_echo),
        ("tcp greeter", greeter_listener, spawn_tcp_greeter),
        ("tcp reset", reset_listener, spawn_tcp_reset),
        ("tcp whoami", whoami_listener, serve_tcp_whoami),
    ];
    let configured = [
        &config.tcp_echo,
        &config.tcp_greeter,
        &config.tcp_reset,
        &config.tcp_whoami,
    ];
    for ((kind, raw_listener, _), configured) in raw.iter().zip(configured) {
        println!(
            "test-backend {kind} on {}",
            local_of(raw_listener, configured)
        );
    }

    // The whoami's extra accept threads, on clones of its listener.
    let whoami_extra: Vec<RawListener> = (1..WHOAMI_THREADS)
        .filter_map(|_| raw[3].1.try_clone().ok())
        .map(|clone| ("tcp whoami", clone, serve_tcp_whoami as fn(TcpStream)))
        .collect();
    // Each raw TCP listener gets its own accept thread; they see `SHUTDOWN` as soon as this one.
    let raw_accepts: Vec<_> = raw
        .into_iter()
        .chain(whoami_extra)
        .map(|(kind, raw_listener, on_accept)| {
            let spawned = thread::Builder::new()
                .name(format!("{}-accept", kind.replace(' ', "-")))
                .spawn(move || accept_loop(&raw_listener, on_accept));
            (kind, spawned)
        })
        .collect();
    accept_loop(&listener, |stream| spawn_connection(stream, name));
    drop(listener);
    for (kind, spawned) in raw_accepts {
        match spawned {
            Ok(handle) => {
                let _ = handle.join();
            }
            Err(e) => eprintln!("test-backend: spawning the {kind} accept thread: {e}"),
        }
    }
    println!("test-backend draining");
    drain();
    println!("test-backend exit");
    ExitCode::SUCCESS
}

/// A raw TCP listener: its name in messages, the socket and what to do with each connection.
type RawListener = (&'static str, TcpListener, fn(TcpStream));

/// What the command line (or the environment) asks for.
#[derive(Debug)]
struct Config {
    /// HTTP listen address.
    listen: String,
    /// Raw TCP echo listen address.
    tcp_echo: String,
    /// Raw TCP greeter listen address.
    tcp_greeter: String,
    /// Raw TCP reset listen address.
    tcp_reset: String,
    /// Raw TCP whoami listen address.
    tcp_whoami: String,
}

/// `Ok(None)` asks for the usage text. A flag (`--flag ADDR` or `--flag=ADDR`) wins over its
/// environment variable, which wins over the default.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Config>, String> {
    let mut listen = None;
    let mut tcp_echo = None;
    let mut tcp_greeter = None;
    let mut tcp_reset = None;
    let mut tcp_whoami = None;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_owned())),
            None => (arg.as_str(), None),
        };
        let slot = match flag {
            "-h" | "--help" => return Ok(None),
            "--listen" => &mut listen,
            "--tcp-echo" => &mut tcp_echo,
            "--tcp-greeter" => &mut tcp_greeter,
            "--tcp-reset" => &mut tcp_reset,
            "--tcp-whoami" => &mut tcp_whoami,
            _ => return Err(format!("unknown argument {arg:?}")),
        };
        let value = match inline {
            Some(value) => value,
            None => args.next().ok_or(format!("{flag} needs an address"))?,
        };
        *slot = Some(value);
    }
    let env_or =
        |var: &str, default: &str| std::env::var(var).unwrap_or_else(|_| default.to_owned());
    Ok(Some(Config {
        listen: listen.unwrap_or_else(|| env_or("BACKEND_LISTEN", DEFAULT_LISTEN)),
        tcp_echo: tcp_echo.unwrap_or_else(|| env_or("BACKEND_TCP_ECHO", DEFAULT_TCP_ECHO)),
        tcp_greeter: tcp_greeter
            .unwrap_or_else(|| env_or("BACKEND_TCP_GREETER", DEFAULT_TCP_GREETER)),
        tcp_reset: tcp_reset.unwrap_or_else(|| env_or("BACKEND_TCP_RESET", DEFAULT_TCP_RESET)),
        tcp_whoami: tcp_whoami.unwrap_or_else(|| env_or("BACKEND_TCP_WHOAMI", DEFAULT_TCP_WHOAMI)),
    }))
}

fn bind(addr: &str) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    // Non-blocking so that accept never sleeps past a shutdown request (see `accept_loop`).
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The name in `X-Backend` and `backend=NAME`: in Docker, the short container id.
fn identity() -> String {
    let non_empty = |s: String| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    std::env::var("HOSTNAME")
        .ok()
        .and_then(non_empty)
        .or_else(|| fs::read_to_string("/etc/hostname").ok().and_then(non_empty))
        .unwrap_or_else(|| "unknown".to_owned())
}

extern "C" fn on_signal(_signal: libc::c_int) {
    // An atomic store is async-signal-safe; all the real work happens on the normal threads.
    SHUTDOWN.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> io::Result<()> {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: an all-zero `sigaction` is a valid value (no flags, empty mask) that we then
        // fill in; the handler only stores to an atomic, which is async-signal-safe.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as libc::sighandler_t;
            // SA_RESTART keeps blocking reads and writes in connection threads from failing
            // with EINTR; poll() in the accept loop still returns early, which is what we want.
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(signal, &raw const action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Accepts connections until a signal sets `SHUTDOWN`, handing each to `on_accept`.
fn accept_loop(listener: &TcpListener, mut on_accept: impl FnMut(TcpStream)) {
    while !SHUTDOWN.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => on_accept(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(listener),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning on an error that persists.
                eprintln!("test-backend: accept: {e}");
                thread::sleep(Duration::from_millis(ACCEPT_POLL_MS as u64));
            }
        }
    }
}

/// Waits until a connection is pending or `ACCEPT_POLL_MS` pass. Better than a plain sleep: a new
/// connection is taken at once rather than up to 50 ms late, and a signal cuts the wait short.
fn wait_readable(listener: &TcpListener) {
    let mut pollfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid, initialised pollfd for an fd that `listener` keeps open. The result does
    // not matter: the caller just tries accept again.
    unsafe { libc::poll(&raw mut pollfd, 1, ACCEPT_POLL_MS) };
}

fn spawn_connection(stream: TcpStream, name: &'static str) {
    HTTP_CONNECTIONS.fetch_add(1, Ordering::SeqCst);
    spawn_counted("connection", move || serve_connection(stream, name));
}

fn spawn_tcp_echo(stream: TcpStream) {
    TCP_CONNECTIONS.fetch_add(1, Ordering::SeqCst);
    spawn_counted("tcp-echo", move || {
        // Any error (a reset, a peer that stopped reading) just ends the session: nothing to tell.
        let _ = tcp_echo(stream);
    });
}

fn spawn_tcp_greeter(stream: TcpStream) {
    spawn_counted("tcp-greeter", move || {
        // As with the echo, an error just ends the session.
        let _ = tcp_greeter(stream);
    });
}

/// Serves a whoami connection on the accept thread itself (see `WHOAMI_THREADS`).
fn serve_tcp_whoami(stream: TcpStream) {
    WHOAMI_CONNECTIONS.fetch_add(1, Ordering::SeqCst);
    let _active = ActiveGuard::new();
    // As with the echo, an error just ends the session.
    let _ = tcp_whoami(stream);
}

/// Reads the client's line (up to `WHOAMI_LINE_LIMIT` bytes, or EOF), then answers with the
/// peer address of this connection and closes. Reading first means the close never finds
/// unread bytes (which would turn it into a reset); closing first puts `TIME_WAIT` here, not
/// on a client that opens thousands of connections.
fn tcp_whoami(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(WHOAMI_READ_TIMEOUT))?;
    let peer = stream.peer_addr()?;
    let mut line = Vec::new();
    let mut buf = [0u8; 256];
    while line.len() < WHOAMI_LINE_LIMIT && !line.contains(&b'\n') {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let name = NAME.get().copied().unwrap_or("unknown");
    stream.write_all(format!("peer={peer} backend={name}\n").as_bytes())
}

fn spawn_tcp_reset(stream: TcpStream) {
    spawn_counted("tcp-reset", move || {
        if let Err(e) = tcp_reset(stream) {
            // Loudly: the close that follows is an orderly FIN, not the reset a test expects.
            eprintln!("test-backend: tcp reset: {e}");
        }
    });
}

/// Runs `serve` on a thread of its own, counted in `ACTIVE` while it runs.
fn spawn_counted(kind: &str, serve: impl FnOnce() + Send + 'static) {
    // Counted before the thread starts, so that a shutdown right now still waits for it.
    let guard = ActiveGuard::new();
    let spawned = thread::Builder::new().name(kind.to_owned()).spawn(move || {
        let _guard = guard;
        serve();
    });
    if let Err(e) = spawned {
        eprintln!("test-backend: spawning a {kind} thread: {e}");
    }
}

/// Sends back every byte received until the peer half-closes, then half-closes as well. Blocking
/// reads without a timeout: a raw stream has no idle point where closing would be polite, so
/// the session lasts as long as the client wants (shutdown's drain bounds it at SIGTERM).
fn tcp_echo(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    // Echoes of small writes go out at once instead of waiting on the peer's delayed ACK.
    stream.set_nodelay(true)?;
    // A client that sends without reading would fill both socket buffers and block us forever.
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    let mut buf = vec![0u8; TCP_ECHO_BUFFER];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stream.write_all(&buf[..n])?;
        TCP_BYTES.fetch_add(n as u64, Ordering::SeqCst);
    }
    // The peer sends nothing more, so closing after this cannot turn into a reset.
    stream.shutdown(Shutdown::Write)
}

/// Writes `GREETING`, half-closes at once, then reads (and counts in `GREETER_BYTES`) until the
/// peer half-closes too; dropping the stream then closes it. The server's FIN goes out before the
/// client has sent anything, so a proxy in between must keep the client-to-server direction open
/// after passing that FIN on. Blocking reads without a timeout, as in `tcp_echo`.
/// How long the greeter waits after accepting before it speaks.
const GREETER_DELAY: Duration = Duration::from_millis(300);

fn tcp_greeter(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    // A moment first: a proxy in front gets to finish setting up its side (an established
    // socket can go into a sockmap, one the peer already half-closed cannot), so the half-close
    // travels through the proxy's steady-state path.
    thread::sleep(GREETER_DELAY);
    stream.write_all(GREETING)?;
    stream.shutdown(Shutdown::Write)?;
    let mut buf = vec![0u8; TCP_ECHO_BUFFER];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                GREETER_BYTES.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Waits until at least one byte arrives (or EOF), then closes abortively: with `SO_LINGER` set to
/// on and 0 s, `close()` discards the socket at once and sends a RST instead of a FIN. Counted in
/// `RESETS` before the close, so a client that has seen the reset also sees the count.
fn tcp_reset(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut buf = [0u8; 1];
    loop {
        match stream.read(&mut buf) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The peer is gone already (e.g. it reset first): nothing left to reset.
            Err(_) => return Ok(()),
        }
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `stream` keeps the fd open for the whole call; the option value points at a live,
    // initialised `libc::linger` on the stack, and the length passed is exactly its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast::<libc::c_void>(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    RESETS.fetch_add(1, Ordering::SeqCst);
    drop(stream);
    Ok(())
}

/// Waits (up to `DRAIN_TIMEOUT`) for the connection threads. They close idle connections within
/// `POLL_INTERVAL` of the signal, so what remains are the requests still being answered.
fn drain() {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while ACTIVE.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let left = ACTIVE.load(Ordering::SeqCst);
    if left > 0 {
        eprintln!("test-backend: {left} connection(s) still busy after {DRAIN_TIMEOUT:?}");
    }
}

/// Keeps `ACTIVE` equal to the number of live connection threads.
struct ActiveGuard;

impl ActiveGuard {
    fn new() -> Self {
        ACTIVE.fetch_add(1, Ordering::SeqCst);
        Self
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve_connection(stream: TcpStream, name: &'static str) {
    match Conn::new(stream, name) {
        Ok(mut conn) => conn.run(),
        Err(e) => eprintln!("test-backend: setting up a connection: {e}"),
    }
}

/// Why a connection ends early.
enum Abort {
    /// The peer went away, the socket failed or stayed idle: there is no one to answer.
    Drop,
    /// The request broke the protocol or a limit: answer with this status, then close.
    Reject(u16, String),
}

impl From<io::Error> for Abort {
    fn from(_: io::Error) -> Self {
        Self::Drop
    }
}

fn bad_request(why: impl Into<String>) -> Abort {
    Abort::Reject(400, why.into())
}

/// How the request body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

/// A parsed request head, owned so that the connection buffer can move on.
#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    query: String,
    http10: bool,
    /// The head as received, for `/headers`.
    head: Vec<u8>,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
    /// `Sec-WebSocket-Key` when the head is a valid WebSocket opening handshake.
    websocket_key: Option<String>,
}

impl Request {
    fn from_parsed(parsed: &httparse::Request<'_, '_>, head: Vec<u8>) -> Result<Self, Abort> {
        // A complete parse always fills these in.
        let method = parsed.method.unwrap_or_default().to_owned();
        let target = parsed.path.unwrap_or_default();
        let http10 = parsed.version == Some(0);
        let (path, query) = target.split_once('?').unwrap_or((target, ""));

        let mut connection = String::new();
        let mut transfer_encoding = String::new();
        let mut content_length = None;
        let mut expect_continue = false;
        for header in parsed.headers.iter() {
            let name = header.name;
            if name.eq_ignore_ascii_case("connection") {
                append_list(&mut connection, header.value)?;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                append_list(&mut transfer_encoding, header.value)?;
            } else if name.eq_ignore_ascii_case("content-length") {
                content_length = Some(parse_content_length(header.value, content_length)?);
            } else if name.eq_ignore_ascii_case("expect") {
                expect_continue |= header.value.eq_ignore_ascii_case(b"100-continue");
            }
        }

        let framing = framing(&transfer_encoding, content_length)?;
        // Both headers at once is a request-smuggling shape (RFC 9112 §6.1), and HTTP/1.0 knows
        // no chunked: decode by Transfer-Encoding, but never trust this connection again.
        let suspicious = !transfer_encoding.is_empty() && (content_length.is_some() || http10);
        let keep_alive = !suspicious
            && if http10 {
                has_token(&connection, "keep-alive")
            } else {
                !has_token(&connection, "close")
            };
        // A body would come before the frames, with nothing to say where it ends for us.
        let websocket_key =
            websocket_key(parsed, &connection).filter(|_| framing == Framing::Empty);
        Ok(Self {
            method,
            path: path.to_owned(),
            query: query.to_owned(),
            http10,
            head,
            framing,
            keep_alive,
            expect_continue,
            websocket_key,
        })
    }

    fn is_websocket(&self) -> bool {
        self.path == "/ws" && self.websocket_key.is_some()
    }
}

/// The key of a WebSocket opening handshake (RFC 6455 §4.2.1), `None` if anything is missing.
fn websocket_key(parsed: &httparse::Request<'_, '_>, connection: &str) -> Option<String> {
    let upgrade = header_list(parsed, "upgrade");
    let version = header_list(parsed, "sec-websocket-version");
    let key = header_list(parsed, "sec-websocket-key");
    let key = key.trim();
    let valid = parsed.method == Some("GET")
        && parsed.version == Some(1)
        && has_token(connection, "upgrade")
        && has_token(&upgrade, "websocket")
        && version.trim() == "13"
        // Repeated keys would show up joined by a comma, which base64 never contains.
        && !key.is_empty()
        && !key.contains(',');
    valid.then(|| key.to_owned())
}

/// All values of the header `name`, joined by commas; values that are not UTF-8 are skipped.
fn header_list(parsed: &httparse::Request<'_, '_>, name: &str) -> String {
    let mut list = String::new();
    for header in parsed.headers.iter() {
        if header.name.eq_ignore_ascii_case(name) {
            // Only used for WebSocket headers, where a bad value just means "no upgrade".
            let _ = append_list(&mut list, header.value);
        }
    }
    list
}

/// Joins repeated list headers (`Connection`, `Transfer-Encoding`) into one comma list.
fn append_list(list: &mut String, value: &[u8]) -> Result<(), Abort> {
    let value = std::str::from_utf8(value).map_err(|_| bad_request("header is not UTF-8"))?;
    if !list.is_empty() {
        list.push(',');
    }
    list.push_str(value);
    Ok(())
}

fn has_token(list: &str, token: &str) -> bool {
    list.split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Parses one `Content-Length` header. Repeated values (in one header or several) must agree,
/// otherwise the body's end is ambiguous.
fn parse_content_length(value: &[u8], previous: Option<u64>) -> Result<u64, Abort> {
    let invalid = || bad_request("invalid Content-Length");
    let value = std::str::from_utf8(value).map_err(|_| invalid())?;
    let mut length = previous;
    for item in value.split(',').map(str::trim) {
        // u64::from_str would also take a leading '+', which HTTP does not allow.
        if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let n = item.parse::<u64>().map_err(|_| invalid())?;
        if length.is_some_and(|l| l != n) {
            return Err(invalid());
        }
        length = Some(n);
    }
    length.ok_or_else(invalid)
}

fn framing(transfer_encoding: &str, content_length: Option<u64>) -> Result<Framing, Abort> {
    if !transfer_encoding.is_empty() {
        // Only a final `chunked` tells where the body ends (RFC 9112 §6.3).
        let last = transfer_encoding.rsplit(',').next().unwrap_or_default();
        return if last.trim().eq_ignore_ascii_case("chunked") {
            Ok(Framing::Chunked)
        } else {
            Err(bad_request("unsupported Transfer-Encoding"))
        };
    }
    Ok(match content_length {
        None | Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
    })
}

/// Receives the body bytes of a request, piece by piece.
type Sink<'a> = dyn FnMut(&[u8]) -> Result<(), Abort> + 'a;

/// The read side of a connection: the socket plus the bytes received but not yet used, which
/// is what makes pipelining work.
struct Input {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Last time the connection moved; the idle timeout counts from here.
    last_progress: Instant,
}

impl Input {
    /// Reads more bytes into `buf`. `Ok(false)` means end of stream, or a shutdown caught while
    /// the connection sits between requests (`between_requests`), which closes it at once.
    fn fill(&mut self, between_requests: bool) -> Result<bool, Abort> {
        let start = self.buf.len();
        self.buf.resize(start + IO_CHUNK, 0);
        let result = loop {
            match self.stream.read(&mut self.buf[start..]) {
                Ok(n) => break Ok(n),
                // The read timeout fires every POLL_INTERVAL: a chance to check the clock and flag.
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {
                    if between_requests && SHUTDOWN.load(Ordering::SeqCst) {
                        break Ok(0);
                    }
                    if between_requests
                        && behaviour()
                            .keep_alive_idle
                            .is_some_and(|idle| self.last_progress.elapsed() >= idle)
                    {
                        break Ok(0);
                    }
                    if self.last_progress.elapsed() >= IDLE_TIMEOUT {
                        break Err(Abort::Drop);
                    }
                }
                Err(e) => break Err(Abort::from(e)),
            }
        };
        let n = result.as_ref().map_or(0, |n| *n);
        self.buf.truncate(start + n);
        if n > 0 {
            self.last_progress = Instant::now();
        }
        result.map(|n| n > 0)
    }

    /// Makes `buf` hold at least `n` bytes; the stream ending first is an aborted request.
    fn fill_to(&mut self, n: usize) -> Result<(), Abort> {
        while self.buf.len() < n {
            if !self.fill(false)? {
                return Err(Abort::Drop);
            }
        }
        Ok(())
    }

    /// The next request head, or `None` when the connection should just close.
    fn read_request(&mut self) -> Result<Option<Request>, Abort> {
        loop {
            if let Some(request) = self.parse_head()? {
                return Ok(Some(request));
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(bad_request("request head too large"));
            }
            // Only an empty buffer is "between requests": a half-received head is in flight.
            if !self.fill(self.buf.is_empty())? {
                return Ok(None);
            }
        }
    }

    /// Parses a complete head off the front of `buf`; `None` while it is still partial.
    fn parse_head(&mut self) -> Result<Option<Request>, Abort> {
        // Blank lines before a request belong to no message (RFC 9112 §2.2); dropping them keeps
        // `/headers` exact and `buf.is_empty()` meaning "idle".
        let blank = self
            .buf
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        self.buf.drain(..blank);
        if self.buf.is_empty() {
            return Ok(None);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        let len = match parsed.parse(&self.buf) {
            Ok(Status::Complete(len)) => len,
            Ok(Status::Partial) => return Ok(None),
            Err(e) => return Err(bad_request(format!("malformed request head: {e}"))),
        };
        let request = Request::from_parsed(&parsed, self.buf[..len].to_vec())?;
        self.buf.drain(..len);
        Ok(Some(request))
    }

    /// Reads the whole body, handing each piece to `sink`. This must run for every request, even
    /// when the body is ignored, so that the next request starts at the right byte.
    fn read_body(&mut self, framing: Framing, sink: &mut Sink<'_>) -> Result<(), Abort> {
        match framing {
            Framing::Empty => Ok(()),
            Framing::Length(n) => self.read_exact_body(n, sink),
            Framing::Chunked => self.read_chunked_body(sink),
        }
    }

    fn read_exact_body(&mut self, mut remaining: u64, sink: &mut Sink<'_>) -> Result<(), Abort> {
        while remaining > 0 {
            if self.buf.is_empty() {
                self.fill_to(1)?;
            }
            let take = self
                .buf
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX));
            sink(&self.buf[..take])?;
            self.buf.drain(..take);
            remaining -= take as u64;
        }
        Ok(())
    }

    fn read_chunked_body(&mut self, sink: &mut Sink<'_>) -> Result<(), Abort> {
        loop {
            let size = self.read_chunk_size()?;
            if size == 0 {
                return self.skip_trailers();
            }
            self.read_exact_body(size, sink)?;
            self.fill_to(2)?;
            if !self.buf.starts_with(b"\r\n") {
                return Err(bad_request("chunk data not followed by CRLF"));
            }
            self.buf.drain(..2);
        }
    }

    fn read_chunk_size(&mut self) -> Result<u64, Abort> {
        loop {
            // httparse reads an empty size line as 0, which would end the body early.
            if self.buf.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
                return Err(bad_request("invalid chunk size"));
            }
            match httparse::parse_chunk_size(&self.buf) {
                Ok(Status::Complete((used, size))) => {
                    self.buf.drain(..used);
                    return Ok(size);
                }
                Ok(Status::Partial) if self.buf.len() < MAX_HEAD => {
                    let wanted = self.buf.len() + 1;
                    self.fill_to(wanted)?;
                }
                _ => return Err(bad_request("invalid chunk size")),
            }
        }
    }

    /// Skips the trailer section after the last chunk, up to and including its blank line.
    fn skip_trailers(&mut self) -> Result<(), Abort> {
        let mut total = 0;
        loop {
            let Some(end) = self.buf.iter().position(|&b| b == b'\n') else {
                if total + self.buf.len() >= MAX_HEAD {
                    return Err(bad_request("trailers too large"));
                }
                let wanted = self.buf.len() + 1;
                self.fill_to(wanted)?;
                continue;
            };
            let blank = self.buf[..end] == *b"" || self.buf[..end] == *b"\r";
            self.buf.drain(..=end);
            total += end + 1;
            if blank {
                return Ok(());
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// What a handler answers; `Conn::send` adds the framing and connection headers.
struct Response {
    status: u16,
    content_type: &'static str,
    body: Body,
}

enum Body {
    Full(Vec<u8>),
    /// `len` bytes of the `/bytes` pattern, generated while writing.
    Pattern {
        len: u64,
        chunked: bool,
    },
    /// The request body itself (`Content-Length` framed), copied through while writing.
    EchoStream(u64),
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Self::Full(bytes) => bytes.len() as u64,
            Self::Pattern { len, .. } | Self::EchoStream(len) => *len,
        }
    }
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: TEXT,
            body: Body::Full(body.into().into_bytes()),
        }
    }

    fn binary(body: Body) -> Self {
        Self {
            status: 200,
            content_type: BINARY,
            body,
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        413 => "Content Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// A status line plus the headers every response carries. `length: None` means chunked.
fn response_head(
    status: u16,
    name: &str,
    content_type: &str,
    length: Option<u64>,
    connection: Option<&str>,
) -> String {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nX-Backend: {name}\r\nContent-Type: {content_type}\r\n",
        reason(status)
    );
    match length {
        Some(n) => write!(head, "Content-Length: {n}\r\n"),
        None => write!(head, "Transfer-Encoding: chunked\r\n"),
    }
    .expect("writing to a String cannot fail");
    if let Some(value) = connection {
        write!(head, "Connection: {value}\r\n").expect("writing to a String cannot fail");
    }
    head.push_str("\r\n");
    head
}

/// One client connection, served request after request on its own thread.
struct Conn {
    input: Input,
    /// A second handle on the same socket, so a body can be read and written at the same time.
    out: TcpStream,
    name: &'static str,
}

impl Conn {
    fn new(stream: TcpStream, name: &'static str) -> io::Result<Self> {
        stream.set_nonblocking(false)?;
        // Heads and bodies go out as separate writes; don't let Nagle hold the second one back.
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(POLL_INTERVAL))?;
        stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
        let out = stream.try_clone()?;
        Ok(Self {
            input: Input {
                stream,
                buf: Vec::new(),
                last_progress: Instant::now(),
            },
            out,
            name,
        })
    }

    fn run(&mut self) {
        loop {
            let outcome = match self.input.read_request() {
                Ok(Some(request)) if request.is_websocket() => {
                    let key = request.websocket_key.unwrap_or_default();
                    return self.websocket(&key);
                }
                Ok(Some(request)) => self.respond(&request),
                Ok(None) => return,
                Err(abort) => Err(abort),
            };
            match outcome {
                Ok(true) => {}
                Ok(false) => return self.linger_close(),
                Err(Abort::Drop) => return,
                Err(Abort::Reject(status, why)) => return self.reject(status, &why),
            }
        }
    }

    /// Answers one request; `Ok(true)` keeps the connection open for the next.
    fn respond(&mut self, request: &Request) -> Result<bool, Abort> {
        REQUESTS.fetch_add(1, Ordering::SeqCst);
        if request.path == "/boom" || behaviour().fail_close {
            self.input.read_body(request.framing, &mut |_| Ok(()))?;
            BOOMS.fetch_add(1, Ordering::SeqCst);
            return Err(Abort::Drop);
        }
        if request.path == "/stall" {
            return self.stall(request);
        }
        if request.expect_continue && request.framing != Framing::Empty && !request.http10 {
            // Without this, curl (and others) sit out a timeout before sending a large body.
            self.out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let response = self.route(request)?;
        let keep_alive = self.send(request, response)?;
        self.input.last_progress = Instant::now();
        Ok(keep_alive)
    }

    fn route(&mut self, request: &Request) -> Result<Response, Abort> {
        match request.path.as_str() {
            "/echo" => return self.echo(request),
            "/sha256" => return self.sha256(request),
            _ => {}
        }
        self.input.read_body(request.framing, &mut |_| Ok(()))?;
        let query = request.query.as_str();
        Ok(match request.path.as_str() {
            "/health" => health(),
            "/set-health" => set_health(query),
            "/delay" => delay(query, self.name),
            "/bytes" => bytes(query),
            "/stats" => stats(),
            // A valid upgrade never gets here (see `Conn::run`).
            "/ws" => Response::text(
                400,
                "/ws needs a WebSocket upgrade: GET, Upgrade: websocket, Connection: upgrade, \
                 Sec-WebSocket-Version: 13, Sec-WebSocket-Key\n",
            ),
            "/headers" => Response {
                status: 200,
                content_type: TEXT,
                body: Body::Full(request.head.clone()),
            },
            _ => greeting(self.name),
        })
    }

    /// A head announcing twice the bytes that follow, then silence until the peer closes (or
    /// the idle timeout).
    fn stall(&mut self, request: &Request) -> Result<bool, Abort> {
        self.input.read_body(request.framing, &mut |_| Ok(()))?;
        let n = number_param(&request.query, "bytes").unwrap_or(1024);
        let head = response_head(200, self.name, BINARY, Some(2 * n), None);
        self.out.write_all(head.as_bytes())?;
        write_pattern(&mut self.out, n, false)?;
        self.out.flush()?;
        loop {
            match self.input.fill(false) {
                // Whatever the peer sends now is ignored; only its close matters.
                Ok(true) => self.input.buf.clear(),
                Ok(false) => {
                    STALLS_CLOSED.fetch_add(1, Ordering::SeqCst);
                    return Err(Abort::Drop);
                }
                Err(abort) => {
                    if matches!(abort, Abort::Drop)
                        && self.input.last_progress.elapsed() < IDLE_TIMEOUT
                    {
                        STALLS_CLOSED.fetch_add(1, Ordering::SeqCst);
                    }
                    return Err(abort);
                }
            }
        }
    }

    fn echo(&mut self, request: &Request) -> Result<Response, Abort> {
        if let Framing::Length(n) = request.framing
            && n > ECHO_BUFFER_LIMIT
        {
            // The length is known up front, so the body need not fit in memory: copy it through.
            return Ok(Response::binary(Body::EchoStream(n)));
        }
        let mut body = match request.framing {
            Framing::Length(n) => Vec::with_capacity(n as usize),
            _ => Vec::new(),
        };
        self.input.read_body(request.framing, &mut |data| {
            if (body.len() + data.len()) as u64 > ECHO_BUFFER_LIMIT {
                return Err(Abort::Reject(
                    413,
                    "chunked /echo body over 64 MiB".to_owned(),
                ));
            }
            body.extend_from_slice(data);
            Ok(())
        })?;
        Ok(Response::binary(Body::Full(body)))
    }

    fn sha256(&mut self, request: &Request) -> Result<Response, Abort> {
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        self.input.read_body(request.framing, &mut |data| {
            hasher.update(data);
            len += data.len() as u64;
            Ok(())
        })?;
        let digest = hex(&hasher.finalize());
        Ok(Response::text(200, format!("{len} {digest}\n")))
    }

    /// Writes the response; `Ok(true)` if the connection stays open.
    fn send(&mut self, request: &Request, response: Response) -> Result<bool, Abort> {
        // Checked here, at the last moment, so a request caught by shutdown still gets its
        // answer but is told that the connection ends.
        let keep_alive =
            request.keep_alive && !SHUTDOWN.load(Ordering::SeqCst) && behaviour().keep_alive;
        let connection = match (keep_alive, request.http10) {
            (false, _) => Some("close"),
            (true, true) => Some("keep-alive"),
            (true, false) => None,
        };
        // HTTP/1.0 clients cannot read chunked framing; they get Content-Length instead.
        let chunked =
            !request.http10 && matches!(response.body, Body::Pattern { chunked: true, .. });
        let length = (!chunked).then(|| response.body.len());
        let head = response_head(
            response.status,
            self.name,
            response.content_type,
            length,
            connection,
        );
        let with_body = request.method != "HEAD";
        match response.body {
            Body::Full(body) => self.write_full(head.into_bytes(), &body, with_body)?,
            Body::Pattern { len, .. } => {
                self.out.write_all(head.as_bytes())?;
                if with_body {
                    write_pattern(&mut self.out, len, chunked)?;
                }
            }
            Body::EchoStream(len) => {
                self.out.write_all(head.as_bytes())?;
                let out = &mut self.out;
                let mut copy = |data: &[u8]| out.write_all(data).map_err(Abort::from);
                let mut discard = |_: &[u8]| Ok(());
                let sink: &mut Sink<'_> = if with_body { &mut copy } else { &mut discard };
                self.input.read_exact_body(len, sink)?;
            }
        }
        self.out.flush()?;
        Ok(keep_alive)
    }

    fn write_full(&mut self, mut head: Vec<u8>, body: &[u8], with_body: bool) -> io::Result<()> {
        if !with_body {
            return self.out.write_all(&head);
        }
        // Small bodies share the head's write, so the response leaves in one segment.
        if body.len() <= IO_CHUNK {
            head.extend_from_slice(body);
            return self.out.write_all(&head);
        }
        self.out.write_all(&head)?;
        self.out.write_all(body)
    }

    /// Answers a request that cannot be served, then closes.
    fn reject(&mut self, status: u16, why: &str) {
        let body = format!("{why}\n");
        let head = response_head(
            status,
            self.name,
            TEXT,
            Some(body.len() as u64),
            Some("close"),
        );
        if self
            .write_full(head.into_bytes(), body.as_bytes(), true)
            .is_ok()
        {
            self.linger_close();
        }
    }

    /// Closes after a response. Closing a socket that still has unread input makes the kernel
    /// send a RST, which can destroy the response on its way to the client; so half-close first
    /// and read whatever still comes, until the client closes or `LINGER` passes.
    fn linger_close(&mut self) {
        let _ = self.out.shutdown(Shutdown::Write);
        let deadline = Instant::now() + LINGER;
        let mut scratch = [0u8; 4096];
        while Instant::now() < deadline {
            match self.input.stream.read(&mut scratch) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Accepts a WebSocket upgrade and echoes frames until the session ends.
    fn websocket(&mut self, key: &str) {
        REQUESTS.fetch_add(1, Ordering::SeqCst);
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\nX-Backend: {}\r\n\r\n",
            websocket::accept_key(key),
            self.name
        );
        // From now on the client talks when it likes: reads block without the poll interval, so
        // neither the idle timeout nor a shutdown ends the session (the drain bound does).
        if self.out.write_all(head.as_bytes()).is_err()
            || self.input.stream.set_read_timeout(None).is_err()
        {
            return;
        }
        match self.echo_frames() {
            Ok(()) => {
                let _ = self.out.shutdown(Shutdown::Write);
            }
            Err(Abort::Drop) => {}
            Err(Abort::Reject(code, why)) => {
                let close = websocket::close_payload(code, &why);
                if self.write_frame(true, websocket::CLOSE, &close).is_ok()
                    && self
                        .input
                        .stream
                        .set_read_timeout(Some(POLL_INTERVAL))
                        .is_ok()
                {
                    // The client may still be sending the frame we refused.
                    self.linger_close();
                }
            }
        }
    }

    /// Echoes frames until the close handshake is done or the peer half-closes (`Ok`), the
    /// socket fails (`Abort::Drop`), or the client breaks the protocol (`Abort::Reject` with
    /// the close code to send).
    fn echo_frames(&mut self) -> Result<(), Abort> {
        // Inside a fragmented message only continuations (and control frames) may come, and
        // outside one no continuation may (RFC 6455 §5.4).
        let mut fragmented = false;
        while let Some(frame) = self.read_frame()? {
            match frame.opcode {
                websocket::PING => self.write_frame(true, websocket::PONG, &frame.payload)?,
                websocket::PONG => {}
                websocket::CLOSE => {
                    // The status code, if any, goes back; the reason text does not matter.
                    let code = frame.payload.get(..2).unwrap_or_default();
                    self.write_frame(true, websocket::CLOSE, code)?;
                    return Ok(());
                }
                opcode => {
                    if (opcode == websocket::CONTINUATION) != fragmented {
                        return Err(websocket::protocol_error("unexpected continuation state"));
                    }
                    fragmented = !frame.fin;
                    self.write_frame(frame.fin, opcode, &frame.payload)?;
                }
            }
        }
        Ok(())
    }

    /// The next client frame, unmasked; `None` once the peer has half-closed. Bytes that came
    /// with the upgrade request are already in `input.buf` and are read first.
    fn read_frame(&mut self) -> Result<Option<websocket::Frame>, Abort> {
        let header = loop {
            if let Some(header) = websocket::parse_header(&self.input.buf)? {
                break header;
            }
            if !self.input.fill(false)? {
                return Ok(None);
            }
        };
        let end = header.size + header.len;
        while self.input.buf.len() < end {
            if !self.input.fill(false)? {
                return Ok(None);
            }
        }
        let mut payload = self.input.buf[header.size..end].to_vec();
        self.input.buf.drain(..end);
        websocket::unmask(&mut payload, header.mask);
        Ok(Some(websocket::Frame {
            fin: header.fin,
            opcode: header.opcode,
            payload,
        }))
    }

    fn write_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> io::Result<()> {
        self.out.write_all(&websocket::encode(fin, opcode, payload))
    }
}

fn stats() -> Response {
    // `requests=` stays the first line, so a reader of the original one-line body still works.
    Response::text(
        200,
        format!(
            "requests={}\ntcp_connections={}\ntcp_bytes={}\n\
             http_connections={}\ngreeter_bytes={}\nresets={}\nbooms={}\nstalls_closed={}\n\
             whoami_connections={}\n",
            REQUESTS.load(Ordering::SeqCst),
            TCP_CONNECTIONS.load(Ordering::SeqCst),
            TCP_BYTES.load(Ordering::SeqCst),
            HTTP_CONNECTIONS.load(Ordering::SeqCst),
            GREETER_BYTES.load(Ordering::SeqCst),
            RESETS.load(Ordering::SeqCst),
            BOOMS.load(Ordering::SeqCst),
            STALLS_CLOSED.load(Ordering::SeqCst),
            WHOAMI_CONNECTIONS.load(Ordering::SeqCst),
        ),
    )
}

fn greeting(name: &str) -> Response {
    Response::text(200, format!("backend={name}\n"))
}

fn health() -> Response {
    if Path::new(UNHEALTHY_FILE).exists() {
        Response::text(503, "unhealthy\n")
    } else {
        Response::text(200, "ok\n")
    }
}

fn set_health(query: &str) -> Response {
    let result = match query_param(query, "ok") {
        Some("1") => match fs::remove_file(UNHEALTHY_FILE) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok("health=ok\n"),
        },
        Some("0") => fs::write(UNHEALTHY_FILE, b"").map(|()| "health=failing\n"),
        _ => return Response::text(400, "usage: /set-health?ok=0|1\n"),
    };
    match result {
        Ok(body) => Response::text(200, body),
        Err(e) => Response::text(500, format!("{UNHEALTHY_FILE}: {e}\n")),
    }
}

fn delay(query: &str, name: &str) -> Response {
    match number_param(query, "ms") {
        Ok(ms) => {
            thread::sleep(Duration::from_millis(ms));
            greeting(name)
        }
        Err(response) => response,
    }
}

fn bytes(query: &str) -> Response {
    match number_param(query, "n") {
        Ok(len) => Response::binary(Body::Pattern {
            len,
            chunked: query_param(query, "chunked") == Some("1"),
        }),
        Err(response) => response,
    }
}

/// The value of `key` in `a=1&b=2`; a key without `=` has the empty value.
fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

/// A numeric query parameter, 0 when absent; a 400 response when it is not a number.
fn number_param(query: &str, key: &str) -> Result<u64, Response> {
    match query_param(query, key) {
        None => Ok(0),
        Some(v) => v
            .parse()
            .map_err(|_| Response::text(400, format!("{key} must be a non-negative integer\n"))),
    }
}

/// `IO_CHUNK + PATTERN_PERIOD` bytes of the `/bytes` pattern: any write of up to `IO_CHUNK` bytes
/// at any offset is one slice of it.
fn pattern_block() -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK.get_or_init(|| {
        (0..IO_CHUNK + PATTERN_PERIOD)
            .map(|i| (i % PATTERN_PERIOD) as u8)
            .collect()
    })
}

/// Writes `len` pattern bytes in writes of at most `IO_CHUNK`, never holding the whole body.
fn write_pattern(out: &mut impl io::Write, len: u64, chunked: bool) -> io::Result<()> {
    let block = pattern_block();
    let mut frame = Vec::with_capacity(IO_CHUNK + 16);
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(IO_CHUNK as u64) as usize;
        let start = (offset % PATTERN_PERIOD as u64) as usize;
        let data = &block[start..start + n];
        if chunked {
            frame.clear();
            write!(frame, "{n:x}\r\n")?;
            frame.extend_from_slice(data);
            frame.extend_from_slice(b"\r\n");
            out.write_all(&frame)?;
        } else {
            out.write_all(data)?;
        }
        offset += n as u64;
    }
    if chunked {
        out.write_all(b"0\r\n\r\n")?;
    }
    Ok(())
}

/// Lower-case hex, as `sha256sum` prints digests.
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            write!(s, "{b:02x}").expect("writing to a String cannot fail");
            s
        })
}

/// RFC 6455 framing, without I/O; `Conn::websocket` does the reading and writing.
mod websocket {
    use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
    use sha1::{Digest as _, Sha1};

    use super::Abort;

    /// Appended to the client's key before hashing (RFC 6455 §1.3).
    const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    /// Largest payload echoed; a frame announcing more is refused before it is read.
    const MAX_PAYLOAD: u64 = 16 * 1024 * 1024;

    pub const CONTINUATION: u8 = 0x0;
    const TEXT: u8 = 0x1;
    const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xa;

    const CLOSE_PROTOCOL_ERROR: u16 = 1002;
    const CLOSE_TOO_BIG: u16 = 1009;
    /// A close frame is a control frame: 125 bytes at most, 2 of them the code.
    const MAX_CLOSE_REASON: usize = 123;

    /// The `Sec-WebSocket-Accept` value that proves the server read `key`.
    pub fn accept_key(key: &str) -> String {
        BASE64.encode(Sha1::digest(format!("{key}{GUID}").as_bytes()))
    }

    pub struct Header {
        pub fin: bool,
        pub opcode: u8,
        pub mask: [u8; 4],
        /// Payload length, at most `MAX_PAYLOAD`.
        pub len: usize,
        /// Length of the header itself.
        pub size: usize,
    }

    pub struct Frame {
        pub fin: bool,
        pub opcode: u8,
        pub payload: Vec<u8>,
    }

    pub fn protocol_error(why: &str) -> Abort {
        Abort::Reject(CLOSE_PROTOCOL_ERROR, why.to_owned())
    }

    /// Parses the frame header at the front of `buf`; `None` while it is incomplete. Everything
    /// a server must refuse is refused here, before the payload is read.
    pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, Abort> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        // RSV1-3 mean an extension, and the handshake agreed to none.
        if b0 & 0x70 != 0 {
            return Err(protocol_error("reserved bits set"));
        }
        if !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
            return Err(protocol_error("unknown opcode"));
        }
        // Clients must mask (RFC 6455 §5.1), so that a proxy never sees attacker-chosen bytes.
        if b1 & 0x80 == 0 {
            return Err(protocol_error("client frame not masked"));
        }
        let (len, size) = match b1 & 0x7f {
            126 => match be_bytes::<2>(buf, 2) {
                Some(b) => (u64::from(u16::from_be_bytes(b)), 4),
                None => return Ok(None),
            },
            127 => match be_bytes::<8>(buf, 2) {
                Some(b) => (u64::from_be_bytes(b), 10),
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        let control = opcode & 0x08 != 0;
        if control && (!fin || len > 125) {
            return Err(protocol_error("fragmented or oversized control frame"));
        }
        if len > MAX_PAYLOAD {
            return Err(Abort::Reject(CLOSE_TOO_BIG, "frame over 16 MiB".to_owned()));
        }
        let Some(mask) = be_bytes::<4>(buf, size) else {
            return Ok(None);
        };
        Ok(Some(Header {
            fin,
            opcode,
            mask,
            len: len as usize,
            size: size + 4,
        }))
    }

    /// `N` bytes of `buf` from `at`, if they have arrived.
    fn be_bytes<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
        buf.get(at..)?.first_chunk::<N>().copied()
    }

    pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
        for (byte, key) in payload.iter_mut().zip(mask.iter().cycle()) {
            *byte ^= key;
        }
    }

    /// A server frame: never masked, with the shortest length encoding.
    pub fn encode(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(payload.len() + 10);
        frame.push((u8::from(fin) << 7) | opcode);
        match payload.len() {
            n @ 0..=125 => frame.push(n as u8),
            n @ 126..=0xffff => {
                frame.push(126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(payload);
        frame
    }

    pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend(reason.bytes().take(MAX_CLOSE_REASON));
        payload
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The example of RFC 6455 §1.3.
        #[test]
        fn rfc6455_accept_key() {
            assert_eq!(
                accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
                "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
            );
        }

        #[test]
        fn length_encodings_round_trip() {
            for len in [0, 125, 126, 0xffff, 0x1_0000] {
                let mut frame = encode(true, BINARY, &vec![7; len]);
                // Turn the server frame into a client one: set the mask bit, insert a zero mask.
                frame[1] |= 0x80;
                let size = frame.len() - len;
                frame.splice(size..size, [0; 4]);
                let header = parse_header(&frame).ok().flatten().unwrap();
                assert_eq!((header.fin, header.opcode), (true, BINARY));
                assert_eq!((header.len, header.size), (len, size + 4));
                assert!(parse_header(&frame[..size + 3]).ok().unwrap().is_none());
            }
        }

        #[test]
        fn refuses_what_a_server_must_refuse() {
            let code = |header: &[u8]| match parse_header(header) {
                Err(Abort::Reject(code, _)) => Some(code),
                _ => None,
            };
            assert_eq!(code(&[0x81, 0x05]), Some(1002), "unmasked");
            assert_eq!(code(&[0xc1, 0x85]), Some(1002), "RSV1");
            assert_eq!(code(&[0x83, 0x85]), Some(1002), "opcode 3");
            assert_eq!(code(&[0x09, 0x80]), Some(1002), "fragmented ping");
            assert_eq!(code(&[0x89, 0xfe, 0, 126]), Some(1002), "126-byte ping");
            let too_big = (MAX_PAYLOAD + 1).to_be_bytes();
            assert_eq!(
                code(&[[0x82, 0xff].as_slice(), &too_big].concat()),
                Some(1009)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{Mutex, MutexGuard, PoisonError},
    };

    use super::*;

    /// `exchange_bytes`, read as text.
    fn exchange(raw: &[u8]) -> String {
        String::from_utf8_lossy(&exchange_bytes(raw)).into_owned()
    }

    /// Serves one connection on loopback, sends `raw`, half-closes and returns all that came back.
    fn exchange_bytes(raw: &[u8]) -> Vec<u8> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            serve_connection(stream, "unit");
        });
        let mut client = TcpStream::connect(addr).unwrap();
        client.write_all(raw).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        server.join().unwrap();
        reply
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param("a=1&b=2", "b"), Some("2"));
        assert_eq!(query_param("a=1&flag", "flag"), Some(""));
        assert_eq!(query_param("a=1", "c"), None);
        assert_eq!(query_param("", "a"), None);
    }

    #[test]
    fn content_length_values_must_agree() {
        assert!(matches!(parse_content_length(b"12", None), Ok(12)));
        assert!(matches!(parse_content_length(b"5, 5", None), Ok(5)));
        assert!(parse_content_length(b"5, 6", None).is_err());
        assert!(parse_content_length(b"5", Some(6)).is_err());
        assert!(parse_content_length(b"+5", None).is_err());
        assert!(parse_content_length(b"", None).is_err());
    }

    #[test]
    fn pipelined_requests_with_chunked_body() {
        let reply = exchange(
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
              POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n\
              GET /headers HTTP/1.1\r\nHost: b\r\n\r\n",
        );
        assert_eq!(reply.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{reply}");
        assert!(reply.contains("X-Backend: unit\r\n"));
        assert!(reply.contains("\r\n\r\nbackend=unit\n"));
        assert!(reply.contains("Content-Length: 5\r\n\r\nabcde"));
        assert!(reply.ends_with("\r\n\r\nGET /headers HTTP/1.1\r\nHost: b\r\n\r\n"));
    }

    #[test]
    fn sha256_of_content_length_body() {
        let reply =
            exchange(b"PUT /sha256 HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc");
        assert!(reply.contains("Connection: close\r\n"));
        assert!(reply.ends_with(
            "\r\n\r\n3 ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
        ));
    }

    #[test]
    fn http10_closes_unless_keep_alive_is_asked() {
        let reply = exchange(b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n");
        assert_eq!(reply.matches("HTTP/1.1 200").count(), 1);
        assert!(reply.contains("Connection: close\r\n"));

        let reply =
            exchange(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.0\r\n\r\n");
        assert_eq!(reply.matches("HTTP/1.1 200").count(), 2);
        assert!(reply.contains("Connection: keep-alive\r\n"));
    }

    #[test]
    fn bytes_pattern_and_head() {
        let reply = exchange_bytes(b"GET /bytes?n=300 HTTP/1.1\r\n\r\n");
        let head_end = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let body = &reply[head_end + 4..];
        assert_eq!(body.len(), 300);
        assert!(body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));

        let reply = exchange(b"GET /bytes?n=300&chunked=1 HTTP/1.1\r\n\r\n");
        assert!(reply.contains("Transfer-Encoding: chunked\r\n\r\n12c\r\n"));
        assert!(reply.ends_with("\r\n0\r\n\r\n"));

        let reply = exchange(b"HEAD /bytes?n=1000 HTTP/1.1\r\n\r\n");
        assert!(reply.contains("Content-Length: 1000\r\n"));
        assert!(reply.ends_with("\r\n\r\n"));
    }

    #[test]
    fn malformed_input_gets_400_and_close() {
        for raw in [
            &b"NOT HTTP\r\n\r\n"[..],
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        ] {
            let reply = exchange(raw);
            assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{reply}");
            assert!(reply.contains("Connection: close\r\n"));
        }
    }

    #[test]
    fn bad_parameter_keeps_the_connection() {
        let reply = exchange(b"GET /delay?ms=x HTTP/1.1\r\n\r\nGET /delay?ms=1 HTTP/1.1\r\n\r\n");
        assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(reply.ends_with("backend=unit\n"));
    }

    /// Addresses of the listeners `start_server` runs.
    struct Servers {
        http: SocketAddr,
        echo: SocketAddr,
        greeter: SocketAddr,
        reset: SocketAddr,
        whoami: SocketAddr,
    }

    /// All listeners on loopback ports, served by the real accept loops until the process ends.
    fn start_server() -> Servers {
        let http = bind("127.0.0.1:0").unwrap();
        let raw: [(TcpListener, fn(TcpStream)); 4] = [
            (bind("127.0.0.1:0").unwrap(), spawn_tcp_echo),
            (bind("127.0.0.1:0").unwrap(), spawn_tcp_greeter),
            (bind("127.0.0.1:0").unwrap(), spawn_tcp_reset),
            (bind("127.0.0.1:0").unwrap(), serve_tcp_whoami),
        ];
        let [echo, greeter, reset, whoami] = raw.each_ref().map(|(l, _)| l.local_addr().unwrap());
        let servers = Servers {
            http: http.local_addr().unwrap(),
            echo,
            greeter,
            reset,
            whoami,
        };
        thread::spawn(move || accept_loop(&http, |stream| spawn_connection(stream, "unit")));
        for (listener, on_accept) in raw {
            thread::spawn(move || accept_loop(&listener, on_accept));
        }
        servers
    }

    /// Held by every test that connects to a `start_server` HTTP listener, so that the test of
    /// `HTTP_CONNECTIONS` (a process-wide counter) sees no other test's connections.
    fn http_counter_lock() -> MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Polls `counter` until it reaches `target` or 5 s pass; returns its last value.
    fn wait_for_counter(counter: &AtomicU64, target: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let value = counter.load(Ordering::SeqCst);
            if value >= target || Instant::now() > deadline {
                return value;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The `/stats` body as (key, value) pairs, in order.
    fn stats_lines(body: &str) -> Vec<(&str, u64)> {
        body.lines()
            .map(|line| {
                let (key, value) = line.split_once('=').unwrap();
                (key, value.parse().unwrap())
            })
            .collect()
    }

    const WS_UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    /// A client frame from the first header byte (FIN bit and opcode): the harness's.
    fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        ::tests::ws::client_frame(b0 & 0x80 != 0, b0 & 0x0f, payload)
    }

    /// Reads exactly `n` more bytes.
    fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        stream.read_exact(&mut buf).unwrap();
        buf
    }

    /// Reads one server frame: (first byte, payload). Server frames must not be masked.
    fn server_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
        let head = read_n(stream, 2);
        assert_eq!(head[1] & 0x80, 0, "server frame masked");
        let len = match head[1] {
            126 => u64::from(u16::from_be_bytes(read_n(stream, 2).try_into().unwrap())),
            127 => u64::from_be_bytes(read_n(stream, 8).try_into().unwrap()),
            n => u64::from(n),
        };
        (head[0], read_n(stream, len as usize))
    }

    /// Reads the response head, byte by byte so that no frame byte is taken with it.
    fn response_head_of(stream: &mut TcpStream) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.extend(read_n(stream, 1));
        }
        String::from_utf8(head).unwrap()
    }

    #[test]
    fn websocket_echo_over_loopback() {
        let _lock = http_counter_lock();
        let Servers { http, .. } = start_server();
        let mut client = TcpStream::connect(http).unwrap();
        // The first frame rides in the same write as the upgrade: it must not be lost.
        let text = b"0123456789";
        client
            .write_all(&[WS_UPGRADE, &client_frame(0x81, text)].concat())
            .unwrap();
        let head = response_head_of(&mut client);
        assert!(
            head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{head}"
        );
        assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(head.contains("Upgrade: websocket\r\n"));
        assert!(head.contains("Connection: Upgrade\r\n"));
        assert!(head.contains("X-Backend: unit\r\n"));

        let binary: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
        let mut frames = client_frame(0x82, &binary);
        frames.extend(client_frame(0x89, b"are you there"));
        client.write_all(&frames).unwrap();
        assert_eq!(server_frame(&mut client), (0x81, text.to_vec()));
        assert_eq!(server_frame(&mut client), (0x82, binary));
        assert_eq!(server_frame(&mut client), (0x8a, b"are you there".to_vec()));

        // A fragmented message comes back fragmented, a ping in between answered in place.
        let mut frames = client_frame(0x01, b"frag");
        frames.extend(client_frame(0x89, b""));
        frames.extend(client_frame(0x80, b"ment"));
        frames.extend(client_frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e']));
        client.write_all(&frames).unwrap();
        assert_eq!(server_frame(&mut client), (0x01, b"frag".to_vec()));
        assert_eq!(server_frame(&mut client), (0x8a, Vec::new()));
        assert_eq!(server_frame(&mut client), (0x80, b"ment".to_vec()));
        assert_eq!(server_frame(&mut client), (0x88, vec![0x03, 0xe8]));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "bytes after the close frame: {rest:?}");
    }

    #[test]
    fn websocket_half_close_and_refusals() {
        // EOF without a close frame: the echo, then the server half-closes too.
        let reply = exchange_bytes(&[WS_UPGRADE, &client_frame(0x82, b"xyz")].concat());
        assert!(reply.starts_with(b"HTTP/1.1 101 "));
        assert!(reply.ends_with(b"\r\n\r\n\x82\x03xyz"));

        // A frame announcing more than 16 MiB is refused before its payload arrives.
        let mut oversized = WS_UPGRADE.to_vec();
        oversized.extend([0x82, 0xff]);
        oversized.extend((16u64 * 1024 * 1024 + 1).to_be_bytes());
        oversized.extend([0; 4]);
        let reply = exchange_bytes(&oversized);
        let close = &reply[reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        assert_eq!(close[0], 0x88);
        assert_eq!(close[2..4], 1009u16.to_be_bytes());

        // Without a valid upgrade, /ws is an ordinary 400 and the connection stays usable.
        let no_version = String::from_utf8_lossy(WS_UPGRADE).replace("Version: 13", "Version: 8");
        let reply = exchange(&[no_version.as_bytes(), b"GET / HTTP/1.1\r\n\r\n"].concat());
        assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{reply}");
        assert!(reply.ends_with("backend=unit\n"));
        let reply = exchange(b"GET /ws HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{reply}");
    }

    #[test]
    fn tcp_echo_returns_every_byte_then_eof() {
        let _lock = http_counter_lock();
        let Servers { http, echo, .. } = start_server();
        let data: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let mut client = TcpStream::connect(echo).unwrap();
        let mut reader = client.try_clone().unwrap();
        // Reading while writing: 5 MiB is far more than both socket buffers hold.
        let received = thread::spawn(move || {
            let mut received = Vec::new();
            reader.read_to_end(&mut received).unwrap();
            received
        });
        client.write_all(&data).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        // read_to_end only returns at EOF, so the server's half-close came after all the data.
        let received = received.join().unwrap();
        assert!(
            received == data,
            "echo differs: {} bytes back",
            received.len()
        );

        let mut stats = TcpStream::connect(http).unwrap();
        stats
            .write_all(b"GET /stats HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        stats.read_to_string(&mut reply).unwrap();
        let value = |key: &str| -> u64 {
            let line = reply.lines().find_map(|l| l.strip_prefix(key)).unwrap();
            line.parse().unwrap()
        };
        assert!(reply.contains("\r\n\r\nrequests="), "{reply}");
        assert!(value("tcp_connections=") >= 1);
        assert!(value("tcp_bytes=") >= data.len() as u64);
    }

    #[test]
    fn tcp_greeter_half_closes_first_then_counts_what_follows() {
        let Servers { greeter, .. } = start_server();
        let before = GREETER_BYTES.load(Ordering::SeqCst);
        let mut client = TcpStream::connect(greeter).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // read_to_end only returns at EOF: the server half-closed before we sent a byte.
        let mut greeting = Vec::new();
        client.read_to_end(&mut greeting).unwrap();
        assert_eq!(greeting, b"hello\n");

        // Our direction is still open: every byte sent now must still reach the greeter.
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&data).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        // The session reads to our EOF and then closes; nothing of that is visible on this side
        // (both FINs are already exchanged), so watch the counter it keeps instead.
        let after = wait_for_counter(&GREETER_BYTES, before + data.len() as u64);
        assert_eq!(after - before, data.len() as u64);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "bytes after the greeting: {rest:?}");
    }

    #[test]
    fn tcp_reset_answers_the_first_byte_with_a_reset() {
        let Servers { reset, .. } = start_server();
        let before = RESETS.load(Ordering::SeqCst);
        let mut client = TcpStream::connect(reset).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        client.write_all(b"x").unwrap();
        let mut buf = [0u8; 16];
        // A timeout would show up as WouldBlock, an orderly close as Ok(0): both fail here.
        let err = client
            .read(&mut buf)
            .expect_err("read after the reset must fail");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        // Counted before the close, so it is visible once the reset has arrived.
        assert_eq!(RESETS.load(Ordering::SeqCst), before + 1);
    }

    #[test]
    fn http_connections_count_connections_not_requests() {
        let _lock = http_counter_lock();
        let Servers { http, .. } = start_server();
        let before = HTTP_CONNECTIONS.load(Ordering::SeqCst);
        let mut client = TcpStream::connect(http).unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        let head = response_head_of(&mut client);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(!head.contains("Connection: close"), "{head}");
        assert_eq!(
            read_n(&mut client, "backend=unit\n".len()),
            b"backend=unit\n"
        );

        // The second request on the same connection: /stats, which ends the connection.
        client
            .write_all(b"GET /stats HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        let (head, body) = reply.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        let stats = stats_lines(body);
        let keys: Vec<&str> = stats.iter().map(|&(key, _)| key).collect();
        assert_eq!(
            keys,
            [
                "requests",
                "tcp_connections",
                "tcp_bytes",
                "http_connections",
                "greeter_bytes",
                "resets",
                "booms",
                "stalls_closed",
                "whoami_connections"
            ]
        );
        assert_eq!(stats[3].1, before + 1, "{body}");
        assert_eq!(HTTP_CONNECTIONS.load(Ordering::SeqCst), before + 1);
    }

    #[test]
    fn tcp_whoami_names_the_peer_and_closes() {
        let Servers { whoami, .. } = start_server();
        let mut client = TcpStream::connect(whoami).unwrap();
        let local = client.local_addr().unwrap();
        client.write_all(b"hello\n").unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        assert!(
            reply.starts_with(&format!("peer={local} backend=")),
            "{reply:?}"
        );
        assert!(reply.ends_with('\n'));
    }

    #[test]
    fn all_addresses_from_flags() {
        let args = [
            "--listen",
            "127.0.0.1:1",
            "--tcp-echo=127.0.0.1:2",
            "--tcp-greeter",
            "127.0.0.1:3",
            "--tcp-reset=127.0.0.1:4",
            "--tcp-whoami",
            "127.0.0.1:5",
        ]
        .map(String::from);
        let config = parse_args(args.into_iter()).unwrap().unwrap();
        assert_eq!(config.listen, "127.0.0.1:1");
        assert_eq!(config.tcp_echo, "127.0.0.1:2");
        assert_eq!(config.tcp_greeter, "127.0.0.1:3");
        assert_eq!(config.tcp_reset, "127.0.0.1:4");
        assert_eq!(config.tcp_whoami, "127.0.0.1:5");
        for flag in ["--tcp-echo", "--tcp-greeter", "--tcp-reset", "--tcp-whoami"] {
            assert!(parse_args([String::from(flag)].into_iter()).is_err());
        }
        assert!(parse_args([String::from("--bogus")].into_iter()).is_err());
    }
}
