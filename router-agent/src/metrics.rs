//! Process-wide counters, kept as plain atomics so that the request path only ever adds to
//! them. `exposition` renders them (with the routing table's per-route and per-backend series)
//! as Prometheus text on `/metrics`; `/api/routes` shows the data path ones.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
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
    pub const ALL: [Self; 5] = [
        Self::Connect,
        Self::Reset,
        Self::Timeout,
        Self::InvalidResponse,
        Self::ClientTimeout,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::InvalidResponse => "invalid_response",
            Self::ClientTimeout => "client_timeout",
        }
    }
}

/// One counter per [`BackendError`] kind.
#[derive(Debug, Default)]
pub struct ErrorCounts([AtomicU64; BackendError::ALL.len()]);

impl ErrorCounts {
    pub fn add(&self, kind: BackendError) {
        self.0[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Every kind with its count (zeros included: a series that exists from the start makes
    /// `rate()` see the first error).
    pub fn iter(&self) -> impl Iterator<Item = (BackendError, u64)> + '_ {
        BackendError::ALL
            .into_iter()
            .map(|kind| (kind, self.0[kind as usize].load(Ordering::Relaxed)))
    }
}

/// Who wrote the response a client got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Backend,
    Router,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Self::Backend => "backend",
            Self::Router => "router",
        }
    }
}

/// Status codes counted one by one (the router relays only three-digit codes from 100 to 599).
const CODES: std::ops::RangeInclusive<u16> = 100..=599;

/// Responses by exact status code and by who answered: a fixed table, so counting one is an
/// index and an atomic add.
pub struct ResponseCounts(Box<[[AtomicU64; 2]]>);

impl Default for ResponseCounts {
    fn default() -> Self {
        Self(
            CODES
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
        )
    }
}

impl ResponseCounts {
    pub fn add(&self, status: u16, source: Source) {
        if let Some(slot) = self.0.get(usize::from(status.wrapping_sub(*CODES.start()))) {
            slot[source as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The codes that were sent at least once, with their counts.
    pub fn nonzero(&self) -> impl Iterator<Item = (u16, Source, u64)> + '_ {
        CODES.zip(self.0.iter()).flat_map(|(code, slots)| {
            [Source::Backend, Source::Router]
                .into_iter()
                .map(move |source| (code, source, slots[source as usize].load(Ordering::Relaxed)))
                .filter(|&(_, _, n)| n > 0)
        })
    }
}

/// Upper bounds (seconds) of the request duration buckets: from a cached answer on the same
/// host (about a millisecond) to a slow report (ten seconds); slower ones land in `+Inf`.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A histogram of request durations made of atomics: observing is a bucket search over twelve
/// floats and two atomic adds, with no lock.
#[derive(Debug, Default)]
pub struct DurationHistogram {
    /// Per bucket (not cumulative), the last one being `+Inf`.
    counts: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// What the exposition needs of a histogram.
pub struct HistogramSnapshot {
    pub sum_seconds: f64,
    pub count: u64,
    /// Per upper bound (ending with `f64::MAX` for `+Inf`), the observations in that bucket alone: the
    /// encoder of `prometheus-client` makes them cumulative.
    pub buckets: Vec<(f64, u64)>,
}

impl DurationHistogram {
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = DURATION_BUCKETS
            .iter()
            .copied()
            // The encoder writes `+Inf` for `f64::MAX` (the crate's own histograms end so).
            .chain([f64::MAX])
            .zip(&self.counts)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: buckets.iter().map(|b| b.1).sum(),
            buckets,
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
    /// Access-log lines written, and those dropped because the writer fell behind.
    pub access_log_lines: AtomicU64,
    pub access_log_dropped: AtomicU64,
    pub responses: ResponseCounts,
    /// Failed backend exchanges by kind, over every backend (removed ones included).
    pub backend_errors: ErrorCounts,
    /// Requests the router refused, by reason (a small fixed set of `&'static str`).
    rejected: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
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

    pub fn load(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// A refused request (rare: the lock is off the normal request path).
    pub fn rejected(&self, reason: &'static str) {
        *self
            .rejected
            .lock()
            .expect("metrics lock")
            .entry(reason)
            .or_default() += 1;
    }

    pub fn rejected_counts(&self) -> Vec<(&'static str, u64)> {
        let rejected = self.rejected.lock().expect("metrics lock");
        rejected.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// A failed exchange with a backend, counted for the backend and over all backends.
    pub fn backend_error(&self, backend: &crate::table::BackendStats, kind: BackendError) {
        self.backend_errors.add(kind);
        backend.errors.add(kind);
    }

    pub fn datapath(&self) -> DatapathCounters {
        let load = Self::load;
        DatapathCounters {
            bytes_copied: load(&self.bytes_copied),
            bytes_spliced: load(&self.bytes_spliced),
            bytes_kernel: load(&self.bytes_kernel),
            connections_offloaded: load(&self.connections_offloaded),
            tunnels_demoted: load(&self.tunnels_demoted),
            tunnel_overlaps_cut: load(&self.tunnel_overlaps_cut),
            tunnel_overlap_bytes_cut: load(&self.tunnel_overlap_bytes_cut),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_hold_their_own_observations() {
        let h = DurationHistogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_mins(1));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.001, 1));
        assert_eq!(s.buckets[4], (0.025, 0));
        assert_eq!(s.buckets[5], (0.05, 1));
        assert_eq!(*s.buckets.last().unwrap(), (f64::MAX, 1));
        assert!((s.sum_seconds - 60.0305).abs() < 1e-9);
    }

    #[test]
    fn responses_by_code_and_source() {
        let r = ResponseCounts::default();
        r.add(404, Source::Router);
        r.add(404, Source::Backend);
        r.add(404, Source::Backend);
        r.add(99, Source::Router);
        r.add(600, Source::Router);
        let all: Vec<_> = r.nonzero().collect();
        assert_eq!(all, [(404, Source::Backend, 2), (404, Source::Router, 1)]);
    }
}
