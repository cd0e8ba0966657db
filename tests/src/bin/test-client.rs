//! `test-client`: the end-to-end tests' raw TCP client, run inside client containers (it ships
//! in the `router-local/backend` image next to `test-backend`), where the kernel's socket-level
//! balancing applies. It reports what a test cannot see from outside the container: the
//! `errno` of a failed `connect()`, and the peer address `getpeername()` returns.
//!
//! ```text
//! test-client connect ADDR [--count N] [--interval-ms M] [--timeout-ms T]
//! test-client hold ADDR --seconds S [--interval-ms M] [--timeout-ms T]
//! ```
//!
//! `connect` opens N connections (0: until stopped), one every M ms (default 0), each sending
//! `hello\n` and reading the answer to EOF (the backend's whoami listener answers
//! `peer=... backend=...`). One line per connection:
//!
//! ```text
//! ok t=<unix ms at the start> ms=<duration> peer=<getpeername> local=<getsockname> reply=<answer>
//! err t=<unix ms> errno=<n> <message>
//! ```
//!
//! and `done ok=<n> err=<n>` at the end. `hold` keeps one connection to an echo for S seconds,
//! sending `ping <i>\n` every M ms (default 100) and checking each echo, then half-closes, and
//! prints `held ok pings=<n> peer=<getpeername>` or `held err pings=<n> <reason>`.
use std::{
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

const USAGE: &str = "usage: test-client connect ADDR [--count N] [--interval-ms M] [--timeout-ms T]
       test-client hold ADDR --seconds S [--interval-ms M] [--timeout-ms T]";
/// Most bytes of an answer kept for the report line.
const REPLY_LIMIT: u64 = 4096;

struct Options {
    addr: SocketAddr,
    count: u64,
    interval: Duration,
    timeout: Duration,
    seconds: u64,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.split_first() {
        Some((mode, rest)) if mode == "connect" => parse(rest, 0).map(|o| connect_loop(&o)),
        Some((mode, rest)) if mode == "hold" => parse(rest, 100).map(|o| hold(&o)),
        _ => Err("a mode: connect or hold".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("test-client: {message}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn parse(args: &[String], default_interval_ms: u64) -> Result<Options, String> {
    let (addr, flags) = args.split_first().ok_or("an address")?;
    let mut options = Options {
        addr: addr.parse().map_err(|e| format!("address {addr:?}: {e}"))?,
        count: 1,
        interval: Duration::from_millis(default_interval_ms),
        timeout: Duration::from_secs(2),
        seconds: 1,
    };
    for pair in flags.chunks(2) {
        let [flag, value] = pair else {
            return Err(format!("{} needs a value", pair[0]));
        };
        let number: u64 = value
            .parse()
            .map_err(|e| format!("{flag} {value:?}: {e}"))?;
        match flag.as_str() {
            "--count" => options.count = number,
            "--interval-ms" => options.interval = Duration::from_millis(number),
            "--timeout-ms" => options.timeout = Duration::from_millis(number),
            "--seconds" => options.seconds = number,
            _ => return Err(format!("unknown flag {flag:?}")),
        }
    }
    Ok(options)
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn connect_loop(options: &Options) {
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut n = 0u64;
    while options.count == 0 || n < options.count {
        n += 1;
        let started = unix_ms();
        let clock = Instant::now();
        match exchange(options) {
            Ok((peer, local, reply)) => {
                ok += 1;
                println!(
                    "ok t={started} ms={} peer={peer} local={local} reply={}",
                    clock.elapsed().as_millis(),
                    reply.trim_end()
                );
            }
            Err(e) => {
                failed += 1;
                println!(
                    "err t={started} errno={} {e}",
                    e.raw_os_error().unwrap_or(0)
                );
            }
        }
        thread::sleep(options.interval);
    }
    println!("done ok={ok} err={failed}");
}

/// One connection: `hello\n`, then the answer to EOF.
fn exchange(options: &Options) -> io::Result<(SocketAddr, SocketAddr, String)> {
    let mut stream = TcpStream::connect_timeout(&options.addr, options.timeout)?;
    stream.set_read_timeout(Some(options.timeout))?;
    let peer = stream.peer_addr()?;
    let local = stream.local_addr()?;
    stream.write_all(b"hello\n")?;
    let mut reply = String::new();
    (&mut stream).take(REPLY_LIMIT).read_to_string(&mut reply)?;
    Ok((peer, local, reply))
}

fn hold(options: &Options) {
    let mut pings = 0u64;
    let outcome = (|| -> io::Result<SocketAddr> {
        let mut stream = TcpStream::connect_timeout(&options.addr, options.timeout)?;
        stream.set_read_timeout(Some(options.timeout))?;
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        let until = Instant::now() + Duration::from_secs(options.seconds);
        while Instant::now() < until {
            let ping = format!("ping {pings}\n");
            stream.write_all(ping.as_bytes())?;
            let mut echo = vec![0u8; ping.len()];
            stream.read_exact(&mut echo)?;
            if echo != ping.as_bytes() {
                return Err(io::Error::other(format!(
                    "echo {:?} for {ping:?}",
                    String::from_utf8_lossy(&echo)
                )));
            }
            pings += 1;
            thread::sleep(options.interval);
        }
        stream.shutdown(Shutdown::Write)?;
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest)?;
        if !rest.is_empty() {
            return Err(io::Error::other(format!("{} unexpected bytes", rest.len())));
        }
        Ok(peer)
    })();
    match outcome {
        Ok(peer) => println!("held ok pings={pings} peer={peer}"),
        Err(e) => println!("held err pings={pings} {e}"),
    }
}
