//! The tunnel throughput client: parallel connections that each stream a block of bytes through
//! a TCP echo and read it all back at the same time (one writer and one reader thread per
//! connection, half-close at the end), timed from the first connect to the last byte.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

const BLOCK: usize = 256 * 1024;

pub struct TunnelResult {
    /// Payload bytes that made the round trip, counted both ways (sent and received back).
    pub bytes: u64,
    pub elapsed: Duration,
    /// Connections that failed or got fewer bytes back than they sent, with the first reason.
    pub failed: u64,
    pub first_failure: Option<String>,
}

impl TunnelResult {
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Streams `bytes_each` through each of `connections` connections to `addr`.
pub fn run(addr: SocketAddr, connections: usize, bytes_each: u64) -> anyhow::Result<TunnelResult> {
    let start = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|i| {
            thread::Builder::new()
                .name(format!("tunnel-{i}"))
                .spawn(move || echo_once(addr, bytes_each))
                .context("spawning a tunnel client thread")
        })
        .collect::<anyhow::Result<_>>()?;
    let mut result = TunnelResult {
        bytes: 0,
        elapsed: Duration::ZERO,
        failed: 0,
        first_failure: None,
    };
    for worker in workers {
        let outcome = worker
            .join()
            .unwrap_or_else(|_| Err("client thread panicked".into()));
        match outcome {
            Ok(received) if received == bytes_each => result.bytes += 2 * received,
            Ok(received) => {
                result.bytes += 2 * received;
                result.failed += 1;
                result.first_failure.get_or_insert_with(|| {
                    format!("got {received} of {bytes_each} bytes back before EOF")
                });
            }
            Err(reason) => {
                result.failed += 1;
                result.first_failure.get_or_insert(reason);
            }
        }
    }
    result.elapsed = start.elapsed();
    Ok(result)
}

/// One connection: sends `bytes` then half-closes, while reading until EOF. Returns the number
/// of bytes received.
fn echo_once(addr: SocketAddr, bytes: u64) -> Result<u64, String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_mins(1)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let sender = thread::spawn(move || -> Result<(), String> {
        let block: Vec<u8> = (0..BLOCK).map(|i| (i % 251) as u8).collect();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(BLOCK as u64) as usize;
            writer
                .write_all(&block[..n])
                .map_err(|e| format!("sending: {e}"))?;
            left -= n as u64;
        }
        writer
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("half-close: {e}"))
    });
    let mut reader = stream;
    let mut buf = vec![0u8; BLOCK];
    let mut received = 0u64;
    let read_result = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => received += n as u64,
            Err(e) => break Err(format!("receiving after {received} bytes: {e}")),
        }
    };
    let sent = sender
        .join()
        .unwrap_or_else(|_| Err("sender thread panicked".into()));
    read_result?;
    sent?;
    Ok(received)
}
