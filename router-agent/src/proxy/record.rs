//! What the router learns about one request while serving it. The connection fills it in as
//! the request goes (instants, status, bytes, who answered); when the request ends, one call
//! feeds both the metrics and the access log from it. Filling it in is plain stores into a
//! struct the connection owns: nothing is allocated unless the access log is on.
use std::time::SystemTime;

use tokio::time::Instant;

use super::ProxyContext;
use crate::{
    access_log::{BackendRef, Entry, Kind},
    metrics::Source,
    table::Route,
};

/// Who wrote the response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// No response was sent (the client went away, or the connection ended before one).
    Nobody,
    Backend,
    /// The router itself, and why (`no_route`, `no_backend`, `bad_request`, ...).
    Router(&'static str),
}

#[derive(Debug)]
pub struct RequestRecord {
    /// When the first byte of the request head arrived.
    pub start: Instant,
    /// When the backend connection was ready (from the pool, or connected).
    pub connected: Option<Instant>,
    /// When the backend's response head was complete.
    pub first_byte: Option<Instant>,
    /// The status sent to the client (0: none).
    pub status: u16,
    pub answer: Answer,
    /// The parser's complaint, for a refused request.
    pub detail: Option<&'static str>,
    /// Bytes received from the client and sent to it for this request.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The backend (its index in the route's list) that took the request last.
    pub backend: Option<usize>,
    pub kind: Kind,
    /// Whether a request line was read (refusals of broken heads have none).
    pub has_request_line: bool,
}

impl RequestRecord {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            connected: None,
            first_byte: None,
            status: 0,
            answer: Answer::Nobody,
            detail: None,
            bytes_in: 0,
            bytes_out: 0,
            backend: None,
            kind: Kind::Http,
            has_request_line: false,
        }
    }

    /// Starts over for the next request on the connection.
    pub fn begin(&mut self, start: Instant) {
        *self = Self::new(start);
    }

    /// The router answers the request itself.
    pub fn router_answered(&mut self, status: u16, reason: &'static str, bytes: usize) {
        self.status = status;
        self.answer = Answer::Router(reason);
        self.bytes_out += bytes as u64;
    }

    /// Counts the request in the metrics and writes its access-log line. `request_head`
    /// starts with the request line (the head as forwarded); `route` is the matched route.
    pub fn finish(
        &self,
        ctx: &ProxyContext,
        client: std::net::SocketAddr,
        route: Option<&Route>,
        request_head: &[u8],
    ) {
        let total = self.start.elapsed();
        let (source, reason) = match self.answer {
            Answer::Nobody => (None, Some("client_closed")),
            Answer::Backend => (Some(Source::Backend), None),
            Answer::Router(reason) => (Some(Source::Router), Some(reason)),
        };
        if let Some(source) = source {
            ctx.metrics.responses.add(self.status, source);
        }
        if let Some(route) = route {
            route.stats.durations.observe(total);
        }
        if !ctx.access_log.enabled() {
            return;
        }
        let backend = route
            .zip(self.backend)
            .and_then(|(route, i)| route.backends.get(i))
            .map(|b| BackendRef {
                name: &b.container_name,
                id: &b.container_id,
                addr: b.addr,
                via: b.via,
            });
        let request_line = self.has_request_line.then(|| {
            let end = memchr::memchr(b'\r', request_head).unwrap_or(request_head.len());
            &request_head[..end]
        });
        let entry = Entry {
            time: SystemTime::now(),
            kind: self.kind,
            client,
            request_line,
            route: route.map(|r| (r.domain.as_str(), r.path.as_str())),
            backend,
            status: self.status,
            answered_by: source.map_or("none", Source::label),
            reason,
            detail: self.detail,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            connect: self.connected.map(|t| t - self.start),
            first_byte: self.first_byte.map(|t| t - self.start),
            total,
        };
        ctx.access_log.log(&entry, &ctx.metrics);
    }
}
