//! The connection-rate client of the `tcp-connect` scenario (wrk speaks only HTTP): threads
//! that each open a connection, send one short line, read the short answer to EOF and close,
//! as fast as they can for a fixed time. The server (the test backend's whoami) closes first,
//! so `TIME_WAIT` stays on its side and this client never runs out of ports.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::report::median;

/// Concurrent connections: enough to keep both CPUs of the machine busy through the blocking
/// connect and read of each one.
pub const THREADS: usize = 32;
const REQUEST: &[u8] = b"bench\n";
/// Longest answer read (the whoami's is under 100 bytes).
const ANSWER_LIMIT: usize = 512;

pub struct ConnectResult {
    pub connections: u64,
    pub elapsed: Duration,
    /// Connections that failed, with the first reason.
    pub failed: u64,
    pub first_failure: Option<String>,
    /// Seconds from connect to the end of the answer.
    pub p50: f64,
    pub p99: f64,
}

impl ConnectResult {
    pub fn per_sec(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Opens connections to `addr` from [`THREADS`] threads for `duration`.
pub fn run(addr: SocketAddr, duration: Duration) -> anyhow::Result<ConnectResult> {
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            thread::Builder::new()
                .name(format!("connect-{i}"))
                .spawn(move || worker(addr, deadline))
                .context("spawning a connect client thread")
        })
        .collect::<anyhow::Result<_>>()?;
    let mut latencies = Vec::new();
    let mut failed = 0;
    let mut first_failure = None;
    for worker in workers {
        let outcome = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a connect client thread panicked"))?;
        latencies.extend(outcome.latencies);
        failed += outcome.failed;
        if first_failure.is_none() {
            first_failure = outcome.first_failure;
        }
    }
    let elapsed = start.elapsed();
    let connections = latencies.len() as u64;
    let p99 = percentile(&mut latencies, 0.99);
    Ok(ConnectResult {
        connections,
        elapsed,
        failed,
        first_failure,
        p50: median(&mut latencies).unwrap_or(0.0),
        p99,
    })
}

struct WorkerOutcome {
    latencies: Vec<f64>,
    failed: u64,
    first_failure: Option<String>,
}

fn worker(addr: SocketAddr, deadline: Instant) -> WorkerOutcome {
    let mut outcome = WorkerOutcome {
        latencies: Vec::new(),
        failed: 0,
        first_failure: None,
    };
    let mut answer = [0u8; ANSWER_LIMIT];
    while Instant::now() < deadline {
        let began = Instant::now();
        match exchange(addr, &mut answer) {
            Ok(()) => outcome.latencies.push(began.elapsed().as_secs_f64()),
            Err(e) => {
                outcome.failed += 1;
                outcome.first_failure.get_or_insert(e);
            }
        }
    }
    outcome
}

fn exchange(addr: SocketAddr, answer: &mut [u8]) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(REQUEST)
        .map_err(|e| format!("sending: {e}"))?;
    let mut got = 0;
    loop {
        match stream.read(&mut answer[got..]) {
            Ok(0) if got > 0 => return Ok(()),
            Ok(0) => return Err("closed without an answer".into()),
            Ok(n) => {
                got += n;
                if got == answer.len() {
                    return Err("answer longer than expected".into());
                }
            }
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
}

/// The `q` quantile (0..1) of `values`, nearest rank.
fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&mut values, 0.99) - 99.0).abs() < f64::EPSILON);
        assert!((percentile(&mut values, 0.5) - 50.0).abs() < f64::EPSILON);
        assert!((percentile(&mut [7.0], 0.99) - 7.0).abs() < f64::EPSILON);
        assert!(percentile(&mut [], 0.5).abs() < f64::EPSILON);
    }
}
