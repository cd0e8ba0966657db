//! Admission of client connections: the global connection limit, shedding idle connections
//! when it is reached, and the overload signal `/healthz` reports.
//!
//! The limit keeps the agent below its descriptor limit (config: `max_connections`), so that
//! running out never shows up as failing probes or backend connects, which would blame healthy
//! backends for the agent's own exhaustion. At the limit the listeners stop accepting (new
//! connections wait in the kernel's backlog, as with `maxconn` in `HAProxy`), and connections that
//! sit waiting for a request (idle keep-alive, or silent since accept) for longer than
//! [`SHED_IDLE_AFTER`] are closed to make room for clients that have something to ask.
use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    time::Instant,
};

/// Connections waiting for a request longer than this are closed when the limit is reached.
pub const SHED_IDLE_AFTER: Duration = Duration::from_secs(1);
/// How often a listener blocked at the limit sheds again.
const SHED_PERIOD: Duration = Duration::from_millis(250);
/// `/healthz` reports overload for this long after the last sign of it.
const OVERLOAD_MEMORY: Duration = Duration::from_secs(5);

pub struct Admission {
    slots: Arc<Semaphore>,
    max: usize,
    /// Connections that began waiting for a request before this instant close.
    shed: watch::Sender<Option<Instant>>,
    /// Unix milliseconds of the last time the limit was hit or a descriptor ran out.
    last_overload_ms: AtomicU64,
    last_overload_reason: std::sync::Mutex<&'static str>,
    pub limit_reached: AtomicU64,
    pub fd_exhausted: AtomicU64,
    pub shed_connections: AtomicU64,
}

/// An admitted client connection: its slot is free again when this drops.
pub struct Admitted {
    _slot: OwnedSemaphorePermit,
}

impl Admission {
    pub fn new(max_connections: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_connections)),
            max: max_connections,
            shed: watch::Sender::new(None),
            last_overload_ms: AtomicU64::new(0),
            last_overload_reason: std::sync::Mutex::new(""),
            limit_reached: AtomicU64::new(0),
            fd_exhausted: AtomicU64::new(0),
            shed_connections: AtomicU64::new(0),
        }
    }

    pub fn max_connections(&self) -> usize {
        self.max
    }

    /// A slot for one more connection, waiting while the limit is reached (and shedding idle
    /// connections meanwhile).
    pub async fn admit(&self) -> Admitted {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Admitted { _slot: slot };
        }
        self.limit_reached.fetch_add(1, Ordering::Relaxed);
        self.note_overload("connection limit reached");
        loop {
            self.shed_idle();
            if let Ok(Ok(slot)) =
                tokio::time::timeout(SHED_PERIOD, self.slots.clone().acquire_owned()).await
            {
                return Admitted { _slot: slot };
            }
            self.note_overload("connection limit reached");
        }
    }

    /// Asks connections idle for longer than [`SHED_IDLE_AFTER`] to close.
    fn shed_idle(&self) {
        if let Some(before) = Instant::now().checked_sub(SHED_IDLE_AFTER) {
            self.shed.send_replace(Some(before));
        }
    }

    /// The agent could not get a descriptor (accept, connect, pipe): sheds idle connections and
    /// reports overload.
    pub fn note_fd_exhaustion(&self) {
        self.fd_exhausted.fetch_add(1, Ordering::Relaxed);
        self.note_overload("out of file descriptors");
        self.shed_idle();
    }

    fn note_overload(&self, reason: &'static str) {
        self.last_overload_ms.store(unix_ms(), Ordering::Relaxed);
        if let Ok(mut last) = self.last_overload_reason.lock() {
            *last = reason;
        }
    }

    /// Why the agent is overloaded now, if it is.
    pub fn overloaded(&self) -> Option<&'static str> {
        if self.slots.available_permits() == 0 {
            return Some("connection limit reached");
        }
        let last = self.last_overload_ms.load(Ordering::Relaxed);
        let recent =
            last != 0 && unix_ms().saturating_sub(last) < OVERLOAD_MEMORY.as_millis() as u64;
        recent.then(|| {
            self.last_overload_reason
                .lock()
                .map_or("overloaded", |reason| *reason)
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// For a connection that waits for a request: resolves when it should close to make room.
    pub fn shed_signal(&self) -> ShedSignal {
        ShedSignal(self.shed.subscribe())
    }
}

/// See [`Admission::shed_signal`].
pub struct ShedSignal(watch::Receiver<Option<Instant>>);

impl ShedSignal {
    /// Resolves once shedding reaches connections that began waiting at `since` (never, if the
    /// agent never sheds).
    pub async fn reaches(&mut self, since: Instant) {
        loop {
            if self
                .0
                .borrow_and_update()
                .is_some_and(|before| since < before)
            {
                return;
            }
            if self.0.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Whether an error means the agent ran out of descriptors or kernel memory (its own state,
/// not the peer's).
pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn limit_blocks_and_sheds_idle_connections() {
        let admission = Arc::new(Admission::new(1));
        let first = admission.admit().await;
        assert_eq!(admission.open(), 1);
        assert_eq!(admission.overloaded(), Some("connection limit reached"));

        let idle_since = Instant::now()
            .checked_sub(Duration::from_secs(5))
            .expect("uptime");
        let mut idle = admission.shed_signal();
        let mut fresh = admission.shed_signal();
        let waiting = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit().await }
        });
        // The blocked admission asks long-idle connections to go, not fresh ones.
        tokio::time::timeout(Duration::from_secs(2), idle.reaches(idle_since))
            .await
            .expect("an idle connection is shed");
        let fresh_since = Instant::now();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), fresh.reaches(fresh_since))
                .await
                .is_err(),
            "a connection that just started waiting is kept"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("admitted once a slot is free")
            .unwrap();
        assert_eq!(admission.open(), 1);
        drop(second);
        assert_eq!(admission.open(), 0);
        assert!(admission.limit_reached.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn descriptor_errors() {
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNREFUSED
        )));
    }
}
