//! Idle keep-alive connections to backends, shared by all client connections.
//!
//! A connection goes back to the pool after a complete exchange the backend agreed to keep
//! alive, and is taken by the next request for the same backend. Connections to a backend that
//! left the routing table or stopped being `up` are closed when the table changes; connections
//! idle longer than the idle limit are closed when next seen (backends close idle connections on
//! their own schedule, and a stale one costs a failed write).
use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::upstream::Upstream;
use crate::{
    fast_hash::FastHashMap,
    health::BackendState,
    table::{Backend, RoutingTable},
};

/// Idle connections kept per backend.
const MAX_IDLE_PER_BACKEND: usize = 64;
/// Below the keep-alive timeouts of common servers (nginx 75 s, many apps 30 s or more).
const MAX_IDLE_TIME: Duration = Duration::from_secs(20);
/// A connection idle for less than this is taken without first asking the socket whether the
/// backend closed it (one syscall per request saved under load); a backend closing a kept-alive
/// connection this soon is rare, and the request is then retried as for any stale connection.
const FRESH: Duration = Duration::from_millis(500);

#[derive(Default)]
pub struct Pool {
    /// Keyed by backend address; each connection also remembers its container, which is checked
    /// on the way out (a new container may reuse the address).
    idle: Mutex<FastHashMap<SocketAddr, Vec<(Upstream, Instant)>>>,
}

impl Pool {
    /// An idle connection to this backend that still looks open, most recently used first.
    pub fn take(&self, backend: &Backend) -> Option<Upstream> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(&backend.addr)?;
        while let Some((upstream, since)) = list.pop() {
            let idle_for = since.elapsed();
            if upstream.container_id != backend.container_id || idle_for >= MAX_IDLE_TIME {
                continue;
            }
            if idle_for < FRESH || upstream.is_idle_and_open() {
                return Some(upstream);
            }
        }
        None
    }

    pub fn put(&self, upstream: Upstream) {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.entry(upstream.addr).or_default();
        if list.len() < MAX_IDLE_PER_BACKEND {
            list.push((upstream, Instant::now()));
        }
    }

    /// Closes idle connections to backends that are gone or no longer `up` in `table`.
    pub fn retain_up(&self, table: &RoutingTable) {
        let up: HashSet<(&str, SocketAddr)> = table
            .routes()
            .into_iter()
            .flat_map(|r| r.backends.iter())
            .filter(|b| b.state == BackendState::Up)
            .map(|b| (&*b.container_id, b.addr))
            .collect();
        let mut idle = self.idle.lock().expect("pool lock");
        for (addr, list) in idle.iter_mut() {
            list.retain(|(upstream, _)| up.contains(&(&*upstream.container_id, *addr)));
        }
        idle.retain(|_, list| !list.is_empty());
    }

    /// Idle connections held for this backend, for the admin API.
    pub fn idle_for(&self, backend: &Backend) -> usize {
        self.idle
            .lock()
            .expect("pool lock")
            .get(&backend.addr)
            .map_or(0, |list| {
                list.iter()
                    .filter(|(u, _)| u.container_id == backend.container_id)
                    .count()
            })
    }
}
