//! Building what readers see from what the registry knows: the routing table (this node's
//! containers and, in a cluster, the other nodes'), and the internal address ranges.
use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::Arc,
};

use super::{Registry, entry::Entry};
use crate::{
    cidr::Cidr,
    health::BackendState,
    labels::{ContainerSpec, RouteSpec},
    table::{Backend, BackendStats, RouteInput, RouteKey, RoutingTable},
};

/// Where a route is served: the key every container of the route shares.
pub fn route_key(route: &RouteSpec) -> RouteKey {
    match route.listen_port {
        Some(listen_port) => RouteKey::Tcp { listen_port },
        None => RouteKey::Http {
            domain: route.domain.clone(),
            path: route.path.clone(),
        },
    }
}

/// One routable container, wherever it runs.
struct Routable<'a> {
    id: &'a str,
    name: &'a str,
    spec: &'a ContainerSpec,
    /// In force: an operator's override, else the label's.
    weight: u32,
    ip: std::net::IpAddr,
    state: BackendState,
    stats: &'a Arc<BackendStats>,
    /// The node agent to go through, for another node's container.
    via: Option<SocketAddr>,
}

impl Registry {
    pub(super) fn publish(&mut self) {
        let mut all: Vec<Routable<'_>> = self
            .containers
            .values()
            .filter_map(|entry: &Entry| {
                let operator = self.overrides.get(&entry.info.name);
                let spec = entry.spec.as_ref().ok()?;
                Some(Routable {
                    id: &entry.info.id,
                    name: &entry.info.name,
                    spec,
                    weight: operator.map_or(spec.weight, |o| o.weight(spec.weight)),
                    ip: entry.info.address?,
                    state: entry.state(operator),
                    stats: &entry.stats,
                    via: None,
                })
            })
            .collect();
        for node in self.remote.nodes.values() {
            all.extend(node.containers.values().filter_map(|entry| {
                let spec = entry.spec.as_ref().ok()?;
                Some(Routable {
                    id: &entry.shared.id,
                    name: &entry.shared.name,
                    spec,
                    // The owner's weight override arrives as the weight label.
                    weight: spec.weight,
                    ip: entry.shared.address?,
                    state: entry.state(node.reachable),
                    stats: &entry.stats,
                    via: Some(node.via),
                })
            }));
        }
        // A stable order (by name, then id) keeps the schedule the same on every agent and
        // after every rebuild.
        all.sort_by(|a, b| (a.name, a.id).cmp(&(b.name, b.id)));

        let mut routes: BTreeMap<RouteKey, RouteInput> = BTreeMap::new();
        for container in &all {
            for route in &container.spec.routes {
                let key = route_key(route);
                let (cursor, stats) = self.cursors.entry(key.clone()).or_default().clone();
                let input = routes.entry(key.clone()).or_insert_with(|| RouteInput {
                    key,
                    domain: route.domain.clone(),
                    scheme: route.scheme,
                    sticky: true,
                    backends: Vec::new(),
                    cursor,
                    stats,
                });
                // One container opting out of stickiness turns it off for the route: the cookie
                // would otherwise pin sessions to some replicas and not others.
                input.sticky &= container.spec.sticky;
                // A WebSocket scheme (ws, wss) wins over a plain one; otherwise the first
                // container's scheme (by name) stays, https and http alike.
                if route.scheme.is_websocket() && !input.scheme.is_websocket() {
                    input.scheme = route.scheme;
                }
                input.backends.push(Backend {
                    container_id: container.id.into(),
                    container_name: container.name.into(),
                    addr: SocketAddr::new(container.ip, route.container_port),
                    weight: container.weight,
                    state: container.state,
                    stats: container.stats.clone(),
                    via: container.via,
                });
            }
        }
        let live: HashSet<&RouteKey> = routes.keys().collect();
        self.cursors.retain(|k, _| live.contains(k));
        self.published.table.store(Arc::new(RoutingTable::build(
            routes.into_values().collect(),
        )));
        self.publish_internal_cidrs();
        self.published.table_version.send_modify(|v| *v += 1);
    }

    /// Loopback, the host's own addresses, this node's Docker networks, and in a cluster every
    /// node's networks and addresses: the clients that may reach `*.local` domains. A fixed
    /// `--internal-cidr` replaces all of it.
    fn publish_internal_cidrs(&self) {
        if !self.settings.auto_cidrs {
            return;
        }
        let mut all: Vec<Cidr> = Cidr::loopback().to_vec();
        all.extend(self.host_cidrs.iter().copied());
        all.extend(self.local_cidrs.iter().copied());
        all.extend(self.own_node.as_ref().map(|(_, addr)| Cidr::host(*addr)));
        all.extend(self.remote.internal_cidrs());
        all.sort_by_key(ToString::to_string);
        all.dedup();
        self.published.internal_cidrs.store(Arc::new(all));
    }
}
