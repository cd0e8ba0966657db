//! Idle keep-alive connections to backends, shared by all client connections.
//!
//! A connection goes back to the pool after a complete exchange the backend agreed to keep
//! alive, and is taken by the next request for the same backend. Connections are closed when
//! their backend leaves the routing table or stops being `up`, when they have been idle longer
//! than the idle limit, and when the backend closed them (a sweep looks for that every
//! [`SWEEP_PERIOD`], so they do not linger in CLOSE-WAIT).
use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Mutex, MutexGuard, PoisonError},
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
/// connection this soon is rare, and the request is then sent again on a new connection.
const FRESH: Duration = Duration::from_millis(500);
/// How often idle connections are checked for a close by the backend.
pub const SWEEP_PERIOD: Duration = Duration::from_secs(1);

type PoolKey = (SocketAddr, Option<SocketAddr>);

pub struct Pool {
    /// Keyed by backend address and the node agent it goes through (another node's container
    /// may have the same address on its node); each connection also remembers its container,
    /// which is checked on the way out (a new container may reuse the address).
    idle: Mutex<FastHashMap<PoolKey, Vec<(Upstream, Instant)>>>,
    /// Idle connections kept in all, so that the pool cannot eat the descriptor budget.
    max_total: usize,
}

impl Pool {
    pub fn new(max_total: usize) -> Self {
        Self {
            idle: Mutex::default(),
            max_total,
        }
    }

    /// The pool stays usable after a panic elsewhere: its state is a plain map that no
    /// operation leaves half-changed.
    fn lock(&self) -> MutexGuard<'_, FastHashMap<PoolKey, Vec<(Upstream, Instant)>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection to this backend that still looks open, most recently used first.
    /// With `check`, even a connection used moments ago is asked whether it is still open.
    pub fn take(&self, backend: &Backend, check: bool) -> Option<Upstream> {
        let mut idle = self.lock();
        let list = idle.get_mut(&(backend.addr, backend.via))?;
        while let Some((mut upstream, since)) = list.pop() {
            let idle_for = since.elapsed();
            if upstream.container_id != backend.container_id || idle_for >= MAX_IDLE_TIME {
                continue;
            }
            if (idle_for < FRESH && !check) || upstream.is_idle_and_open() {
                upstream.set_active(true);
                return Some(upstream);
            }
        }
        None
    }

    pub fn put(&self, mut upstream: Upstream) {
        upstream.set_active(false);
        let mut idle = self.lock();
        let total: usize = idle.values().map(Vec::len).sum();
        let list = idle.entry((upstream.addr, upstream.via)).or_default();
        if list.len() < MAX_IDLE_PER_BACKEND && total < self.max_total {
            list.push((upstream, Instant::now()));
        }
    }

    /// Closes idle connections to backends that are gone or no longer `up` in `table`.
    pub fn retain_up(&self, table: &RoutingTable) {
        let up: HashSet<(&str, PoolKey)> = table
            .routes()
            .into_iter()
            .flat_map(|r| r.backends.iter())
            .filter(|b| b.state == BackendState::Up)
            .map(|b| (&*b.container_id, (b.addr, b.via)))
            .collect();
        let mut idle = self.lock();
        for (key, list) in idle.iter_mut() {
            list.retain(|(upstream, _)| up.contains(&(&*upstream.container_id, *key)));
        }
        idle.retain(|_, list| !list.is_empty());
    }

    /// Closes idle connections the backend closed (or sent something unasked on), and those
    /// idle past the limit. Returns how many it closed.
    pub fn sweep(&self) -> usize {
        let mut idle = self.lock();
        let mut closed = 0;
        for list in idle.values_mut() {
            let before = list.len();
            list.retain(|(upstream, since)| {
                since.elapsed() < MAX_IDLE_TIME && upstream.is_idle_and_open()
            });
            closed += before - list.len();
        }
        idle.retain(|_, list| !list.is_empty());
        closed
    }

    /// Idle connections held for this backend, for the admin API.
    pub fn idle_for(&self, backend: &Backend) -> usize {
        self.lock()
            .get(&(backend.addr, backend.via))
            .map_or(0, |list| {
                list.iter()
                    .filter(|(u, _)| u.container_id == backend.container_id)
                    .count()
            })
    }

    /// Idle connections held in all.
    pub fn idle_total(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}
