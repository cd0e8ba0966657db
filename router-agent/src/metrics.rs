//! Process-wide counters, exported as Prometheus text on `/metrics` and inside `/api/routes`.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::Serialize;

/// Which way a backend exchange failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BackendError {
    Connect,
    /// Closed or reset before a complete response.
    Reset,
    Timeout,
    InvalidResponse,
    /// The client stopped sending its request body (not the backend's fault).
    ClientTimeout,
}

impl BackendError {
    fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::InvalidResponse => "invalid_response",
            Self::ClientTimeout => "client_timeout",
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    /// Requests sent again on a new connection because the pooled one had been closed.
    pub stale_reconnects: AtomicU64,
    /// Requests that waited for a backend at its connection limit and got a 503.
    pub queue_timeouts: AtomicU64,
    /// Requests made to the Docker engine by discovery (the work each event costs).
    pub engine_requests: Arc<AtomicU64>,
    /// Body and head bytes moved through userspace buffers.
    pub bytes_copied: AtomicU64,
    /// Body bytes moved by splice(2).
    pub bytes_spliced: AtomicU64,
    /// Bytes the kernel redirected between offloaded sockets (sockhash).
    pub bytes_kernel: AtomicU64,
    pub connections_offloaded: AtomicU64,
    /// Kernel tunnel directions handed back to userspace because the peer did not keep up.
    pub tunnels_demoted: AtomicU64,
    /// Retransmitted segments whose head repeated bytes already forwarded, which the verdict
    /// program cut off (the kernel hands such segments whole to it), and the bytes cut.
    pub tunnel_overlaps_cut: AtomicU64,
    pub tunnel_overlap_bytes_cut: AtomicU64,
    responses_by_class: [AtomicU64; 5],
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    backend_errors: Mutex<BTreeMap<&'static str, u64>>,
}

/// A point-in-time copy for the admin API.
#[derive(Serialize, Debug)]
pub struct DatapathCounters {
    pub bytes_copied: u64,
    pub bytes_spliced: u64,
    pub bytes_kernel: u64,
    pub connections_offloaded: u64,
    pub tunnels_demoted: u64,
    pub tunnel_overlaps_cut: u64,
    pub tunnel_overlap_bytes_cut: u64,
}

/// A client connection counted in `connections_active` while it lives.
pub struct OpenConnection<'a>(&'a Metrics);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts a newly accepted client connection; it stays active until the guard drops.
    pub fn open_connection(&self) -> OpenConnection<'_> {
        self.connections_accepted.fetch_add(1, Ordering::Relaxed);
        self.connections_active.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self)
    }

    /// Client connections open now.
    pub fn connections_open(&self) -> u64 {
        self.connections_active.load(Ordering::Relaxed)
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn response(&self, status: u16) {
        if let Some(slot) = self
            .responses_by_class
            .get(usize::from(status / 100).wrapping_sub(1))
        {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn rejected(&self, reason: &'static str) {
        *self
            .rejected
            .lock()
            .expect("metrics lock")
            .entry(reason)
            .or_default() += 1;
    }

    pub fn backend_error(&self, kind: BackendError) {
        *self
            .backend_errors
            .lock()
            .expect("metrics lock")
            .entry(kind.label())
            .or_default() += 1;
    }

    pub fn datapath(&self) -> DatapathCounters {
        DatapathCounters {
            bytes_copied: self.bytes_copied.load(Ordering::Relaxed),
            bytes_spliced: self.bytes_spliced.load(Ordering::Relaxed),
            bytes_kernel: self.bytes_kernel.load(Ordering::Relaxed),
            connections_offloaded: self.connections_offloaded.load(Ordering::Relaxed),
            tunnels_demoted: self.tunnels_demoted.load(Ordering::Relaxed),
            tunnel_overlaps_cut: self.tunnel_overlaps_cut.load(Ordering::Relaxed),
            tunnel_overlap_bytes_cut: self.tunnel_overlap_bytes_cut.load(Ordering::Relaxed),
        }
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "router_connections_accepted_total",
            "Client connections accepted.",
            load(&self.connections_accepted),
        );
        counter(
            "router_requests_total",
            "Requests read from clients.",
            load(&self.requests),
        );
        counter(
            "router_retries_total",
            "Requests sent to another backend after a failure.",
            load(&self.retries),
        );
        counter(
            "router_engine_requests_total",
            "Requests discovery made to the Docker engine.",
            load(&self.engine_requests),
        );
        counter(
            "router_stale_reconnects_total",
            "Requests sent again on a new connection because the backend had closed the pooled one.",
            load(&self.stale_reconnects),
        );
        counter(
            "router_queue_timeouts_total",
            "Requests answered 503 after waiting for a backend at its connection limit.",
            load(&self.queue_timeouts),
        );
        counter(
            "router_bytes_copied_total",
            "Bytes moved through userspace buffers.",
            load(&self.bytes_copied),
        );
        counter(
            "router_bytes_spliced_total",
            "Body bytes moved with splice(2).",
            load(&self.bytes_spliced),
        );
        counter(
            "router_bytes_kernel_total",
            "Bytes redirected in the kernel between offloaded sockets.",
            load(&self.bytes_kernel),
        );
        counter(
            "router_connections_offloaded_total",
            "Connections handed to the kernel sockhash.",
            load(&self.connections_offloaded),
        );
        counter(
            "router_tunnels_demoted_total",
            "Kernel tunnel directions handed back to userspace because the peer did not keep up.",
            load(&self.tunnels_demoted),
        );
        counter(
            "router_tunnel_overlaps_cut_total",
            "Retransmitted segments of kernel tunnels whose repeated head the verdict program cut off.",
            load(&self.tunnel_overlaps_cut),
        );
        counter(
            "router_tunnel_overlap_bytes_cut_total",
            "Bytes cut off retransmitted segments of kernel tunnels (each would have been delivered twice).",
            load(&self.tunnel_overlap_bytes_cut),
        );
        let _ = writeln!(
            out,
            "# HELP router_connections_active Client connections open now.\n# TYPE router_connections_active gauge\nrouter_connections_active {}",
            load(&self.connections_active)
        );
        let _ = writeln!(
            out,
            "# HELP router_responses_total Responses sent to clients by status class.\n# TYPE router_responses_total counter"
        );
        for (i, slot) in self.responses_by_class.iter().enumerate() {
            let _ = writeln!(
                out,
                "router_responses_total{{class=\"{}xx\"}} {}",
                i + 1,
                load(slot)
            );
        }
        let _ = writeln!(
            out,
            "# HELP router_requests_rejected_total Requests refused by the router, by reason.\n# TYPE router_requests_rejected_total counter"
        );
        for (reason, n) in self.rejected.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "router_requests_rejected_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP router_backend_errors_total Failed backend exchanges, by kind.\n# TYPE router_backend_errors_total counter"
        );
        for (kind, n) in self.backend_errors.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "router_backend_errors_total{{kind=\"{kind}\"}} {n}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = Metrics::default();
        Metrics::add(&m.requests, 3);
        m.response(200);
        m.response(503);
        m.rejected("duplicate Host");
        m.backend_error(BackendError::Connect);
        let text = m.render();
        for line in [
            "router_requests_total 3",
            "router_responses_total{class=\"2xx\"} 1",
            "router_responses_total{class=\"5xx\"} 1",
            "router_requests_rejected_total{reason=\"duplicate Host\"} 1",
            "router_backend_errors_total{kind=\"connect\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
