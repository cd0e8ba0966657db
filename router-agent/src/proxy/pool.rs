//! Idle keep-alive connections to backends, shared by all client connections.
//!
//! A connection goes back to the pool after a complete exchange the backend agreed to keep
//! alive, and is taken by the next request for the same backend. Connections to a backend that
//! left the routing table or stopped being `up` are closed when the table changes; connections
//! idle longer than the idle limit are closed when next seen (backends close idle connections on
//! their own schedule, and a stale one costs a failed write).
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::upstream::Upstream;
use crate::{
    health::BackendState,
    table::{Backend, RoutingTable},
};

/// Idle connections kept per backend.
const MAX_IDLE_PER_BACKEND: usize = 64;
/// Below the keep-alive timeouts of common servers (nginx 75 s, many apps 30 s or more).
const MAX_IDLE_TIME: Duration = Duration::from_secs(20);

type Key = (Arc<str>, SocketAddr);

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<Key, Vec<(Upstream, Instant)>>>,
}

impl Pool {
    /// An idle connection to this backend that still looks open, most recently used first.
    pub fn take(&self, backend: &Backend) -> Option<Upstream> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(&(backend.container_id.clone(), backend.addr))?;
        while let Some((upstream, since)) = list.pop() {
            if since.elapsed() < MAX_IDLE_TIME && upstream.is_idle_and_open() {
                return Some(upstream);
            }
        }
        None
    }

    pub fn put(&self, upstream: Upstream) {
        let key = (upstream.container_id.clone(), upstream.addr);
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_BACKEND {
            list.push((upstream, Instant::now()));
        }
    }

    /// Closes idle connections to backends that are gone or no longer `up` in `table`.
    pub fn retain_up(&self, table: &RoutingTable) {
        let up: std::collections::HashSet<(&str, SocketAddr)> = table
            .routes()
            .into_iter()
            .flat_map(|r| r.backends.iter())
            .filter(|b| b.state == BackendState::Up)
            .map(|b| (&*b.container_id, b.addr))
            .collect();
        let mut idle = self.idle.lock().expect("pool lock");
        idle.retain(|(id, addr), _| up.contains(&(&**id, *addr)));
    }

    /// Idle connections held for this backend, for the admin API.
    pub fn idle_for(&self, backend: &Backend) -> usize {
        self.idle
            .lock()
            .expect("pool lock")
            .get(&(backend.container_id.clone(), backend.addr))
            .map_or(0, Vec::len)
    }
}
