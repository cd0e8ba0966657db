//! The small-message latency client: parallel connections that each send one small message and
//! wait for its echo, over and over, timing every round trip. Over a `ws://` route each message
//! is a masked WebSocket binary frame (after the opening handshake through the proxy); over a
//! `tcp://` route, raw bytes.
//!
//! This is the traffic of a chat or a game socket: what matters is how long one message takes
//! through the proxy, not how many bytes per second it moves.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// Payload bytes of each message.
pub const MESSAGE_BYTES: usize = 64;

/// How each message is framed.
#[derive(Debug, Clone)]
pub enum Framing {
    Raw,
    /// After a WebSocket opening handshake for `GET /ws` with this Host.
    WebSocket {
        host: String,
    },
}

pub struct PingPongResult {
    /// Every round trip, in seconds, sorted.
    pub round_trips: Vec<f64>,
    pub elapsed: Duration,
    /// Connections that failed, with the first reason.
    pub failed: u64,
    pub first_failure: Option<String>,
}

impl PingPongResult {
    pub fn messages(&self) -> u64 {
        self.round_trips.len() as u64
    }

    pub fn messages_per_sec(&self) -> f64 {
        self.messages() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Payload bytes per second, both ways.
    pub fn bytes_per_sec(&self) -> f64 {
        self.messages_per_sec() * 2.0 * MESSAGE_BYTES as f64
    }

    pub fn percentile(&self, p: f64) -> Option<f64> {
        if self.round_trips.is_empty() {
            return None;
        }
        let rank = ((self.round_trips.len() - 1) as f64 * p).round() as usize;
        self.round_trips.get(rank).copied()
    }
}

/// Runs `connections` ping-pong loops against `addr` for `duration`.
pub fn run(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    framing: &Framing,
) -> anyhow::Result<PingPongResult> {
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..connections)
        .map(|i| {
            let framing = framing.clone();
            thread::Builder::new()
                .name(format!("pingpong-{i}"))
                .spawn(move || ping_pong(addr, &framing, deadline))
                .context("spawning a ping-pong client thread")
        })
        .collect::<anyhow::Result<_>>()?;
    let mut result = PingPongResult {
        round_trips: Vec::new(),
        elapsed: Duration::ZERO,
        failed: 0,
        first_failure: None,
    };
    for worker in workers {
        match worker
            .join()
            .unwrap_or_else(|_| Err("client thread panicked".into()))
        {
            Ok(mut times) => result.round_trips.append(&mut times),
            Err(reason) => {
                result.failed += 1;
                result.first_failure.get_or_insert(reason);
            }
        }
    }
    result.elapsed = start.elapsed();
    result.round_trips.sort_by(f64::total_cmp);
    Ok(result)
}

/// One connection: round trips until `deadline`; returns each one's duration in seconds.
fn ping_pong(addr: SocketAddr, framing: &Framing, deadline: Instant) -> Result<Vec<f64>, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let payload: Vec<u8> = (0..MESSAGE_BYTES).map(|i| (i % 251) as u8).collect();
    let (message, echo_len) = match framing {
        Framing::Raw => (payload.clone(), MESSAGE_BYTES),
        Framing::WebSocket { host } => {
            handshake(&mut stream, host)?;
            // FIN + binary, masked, 7-bit length; the echo comes back unmasked (2-byte head).
            let mask = [0x12, 0x34, 0x56, 0x78];
            let mut frame = vec![0x82, 0x80 | MESSAGE_BYTES as u8];
            frame.extend_from_slice(&mask);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            (frame, 2 + MESSAGE_BYTES)
        }
    };
    let mut echo = vec![0u8; echo_len];
    let mut times = Vec::new();
    while Instant::now() < deadline {
        let sent = Instant::now();
        stream
            .write_all(&message)
            .map_err(|e| format!("sending message {}: {e}", times.len()))?;
        stream
            .read_exact(&mut echo)
            .map_err(|e| format!("reading echo {}: {e}", times.len()))?;
        times.push(sent.elapsed().as_secs_f64());
        if echo[echo_len - MESSAGE_BYTES..] != payload[..] {
            return Err(format!("echo {} differs from the message", times.len()));
        }
    }
    Ok(times)
}

/// The opening handshake (RFC 6455 §4.1) for `GET /ws`; fails unless the answer is a 101.
fn handshake(stream: &mut TcpStream, host: &str) -> Result<(), String> {
    write!(
        stream,
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .map_err(|e| format!("sending the handshake: {e}"))?;
    // Byte by byte up to the blank line: the server sends nothing after its head until a frame
    // arrives, so no frame byte can be swallowed here.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return Err("handshake answer head over 8 KiB".into());
        }
        stream
            .read_exact(&mut byte)
            .map_err(|e| format!("reading the handshake answer: {e}"))?;
        head.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&head);
    if status.starts_with("HTTP/1.1 101") {
        Ok(())
    } else {
        Err(format!(
            "handshake answered `{}`",
            status.lines().next().unwrap_or_default()
        ))
    }
}
