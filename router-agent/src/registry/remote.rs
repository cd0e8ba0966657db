//! The containers of the other nodes of a cluster, as their agents share them: each node's
//! agent discovers and checks its own containers, and the others take its word for their
//! state. Connections to them go through their node's agent (`via`).
use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use tracing::{info, warn};

use crate::{
    cidr::Cidr,
    cluster::wire::{NodeInfo, SharedContainer, StreamItem},
    health::BackendState,
    labels::{self, ContainerSpec, LabelError},
    table::{BackendStats, RouteKey},
};

/// What the cluster module tells the registry about another node.
#[derive(Debug)]
pub enum PeerEvent {
    /// A line of the node's watch stream (`via`: its agent's cluster address).
    Stream {
        node_id: String,
        via: SocketAddr,
        item: StreamItem,
    },
    /// The node's stream is gone and did not come back in time: its containers leave the table.
    Lost { node_id: String, why: String },
    /// A connection through the node's agent failed: its containers take no new requests until
    /// its stream shows it alive again.
    Unreachable { via: SocketAddr, why: String },
}

pub struct RemoteEntry {
    pub shared: SharedContainer,
    pub spec: Result<ContainerSpec, Vec<LabelError>>,
    pub stats: Arc<BackendStats>,
}

impl RemoteEntry {
    /// Its state as routing sees it.
    pub fn state(&self, node_reachable: bool) -> BackendState {
        if node_reachable {
            self.shared.state
        } else {
            BackendState::Down
        }
    }
}

pub struct RemoteNode {
    /// The node's agent, through which its containers are reached.
    pub via: SocketAddr,
    pub info: NodeInfo,
    pub containers: HashMap<String, RemoteEntry>,
    /// False after a connection through its agent failed, until its stream speaks again.
    pub reachable: bool,
}

#[derive(Default)]
pub struct RemoteNodes {
    pub nodes: HashMap<String, RemoteNode>,
}

impl RemoteNodes {
    /// Applies one event; returns whether routing changed.
    pub fn apply(
        &mut self,
        event: PeerEvent,
        default_domain: &str,
        backend_max_connections: Option<usize>,
    ) -> bool {
        let new_stats = || Arc::new(BackendStats::new(backend_max_connections));
        match event {
            PeerEvent::Stream { node_id, via, item } => match item {
                StreamItem::Snapshot { node, containers } => {
                    let old = self.nodes.remove(&node_id);
                    let mut old_containers = old.map(|n| n.containers).unwrap_or_default();
                    let containers = containers
                        .into_iter()
                        .map(|shared| {
                            // Counters survive a resync of the same container.
                            let stats = old_containers
                                .remove(&shared.id)
                                .map_or_else(new_stats, |e| e.stats);
                            let spec = parse(&shared, default_domain);
                            (
                                shared.id.clone(),
                                RemoteEntry {
                                    shared,
                                    spec,
                                    stats,
                                },
                            )
                        })
                        .collect::<HashMap<_, _>>();
                    info!(node = %node_id, %via, containers = containers.len(), "node synced");
                    self.nodes.insert(
                        node_id,
                        RemoteNode {
                            via,
                            info: node,
                            containers,
                            reachable: true,
                        },
                    );
                    true
                }
                other => {
                    let Some(node) = self.nodes.get_mut(&node_id) else {
                        // Before its snapshot: the follower resyncs anyway.
                        return false;
                    };
                    let was_reachable = std::mem::replace(&mut node.reachable, true);
                    let changed = node.apply(other, default_domain, new_stats);
                    changed || !was_reachable
                }
            },
            PeerEvent::Lost { node_id, why } => {
                let removed = self.nodes.remove(&node_id);
                if let Some(node) = &removed {
                    warn!(node = %node_id, via = %node.via, containers = node.containers.len(), "node lost ({why}): its containers leave the table");
                }
                removed.is_some()
            }
            PeerEvent::Unreachable { via, why } => {
                let mut changed = false;
                for (node_id, node) in &mut self.nodes {
                    if node.via == via && node.reachable {
                        warn!(node = %node_id, %via, "cannot reach the node's agent ({why}): its containers take no new requests until it answers");
                        node.reachable = false;
                        changed = true;
                    }
                }
                changed
            }
        }
    }

    /// `(up, backends)` among the other nodes' containers serving the route `key`.
    pub fn count_serving(&self, key: &RouteKey) -> (usize, usize) {
        let (mut up, mut backends) = (0, 0);
        for node in self.nodes.values() {
            for entry in node.containers.values() {
                let serves = entry.spec.as_ref().is_ok_and(|s| {
                    s.routes
                        .iter()
                        .any(|r| super::publish::route_key(r) == *key)
                });
                if serves && entry.shared.address.is_some() {
                    backends += 1;
                    up += usize::from(entry.state(node.reachable) == BackendState::Up);
                }
            }
        }
        (up, backends)
    }

    /// The other nodes' addresses and network subnets: their clients are internal too.
    pub fn internal_cidrs(&self) -> Vec<Cidr> {
        self.nodes
            .values()
            .flat_map(|node| {
                node.info
                    .cidrs
                    .iter()
                    .copied()
                    .chain(std::iter::once(Cidr::host(node.info.addr)))
            })
            .collect()
    }
}

impl RemoteNode {
    fn apply(
        &mut self,
        item: StreamItem,
        default_domain: &str,
        new_stats: impl Fn() -> Arc<BackendStats>,
    ) -> bool {
        match item {
            StreamItem::Upsert { container } => match self.containers.get_mut(&container.id) {
                Some(entry) if entry.shared == container => false,
                Some(entry) => {
                    if entry.shared.labels != container.labels {
                        entry.spec = parse(&container, default_domain);
                    }
                    entry.shared = container;
                    true
                }
                None => {
                    let spec = parse(&container, default_domain);
                    self.containers.insert(
                        container.id.clone(),
                        RemoteEntry {
                            shared: container,
                            spec,
                            stats: new_stats(),
                        },
                    );
                    true
                }
            },
            StreamItem::Remove { id } => self.containers.remove(&id).is_some(),
            StreamItem::Node { node } => {
                let changed = self.info != node;
                self.info = node;
                changed
            }
            // A new snapshot is handled by the caller; a heartbeat only proves it is alive.
            StreamItem::Snapshot { .. } | StreamItem::Heartbeat => false,
        }
    }
}

fn parse(shared: &SharedContainer, default_domain: &str) -> Result<ContainerSpec, Vec<LabelError>> {
    let labels: HashMap<String, String> = shared
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels::parse(&labels, default_domain)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn container(id: &str, state: BackendState) -> SharedContainer {
        SharedContainer {
            id: id.into(),
            name: id.into(),
            labels: BTreeMap::from([("aliyun.routing.port_80".into(), "web".into())]),
            state,
            address: Some("198.19.84.2".parse().unwrap()),
        }
    }

    fn stream(item: StreamItem) -> PeerEvent {
        PeerEvent::Stream {
            node_id: "n2".into(),
            via: "198.19.100.2:9191".parse().unwrap(),
            item,
        }
    }

    fn snapshot(containers: Vec<SharedContainer>) -> PeerEvent {
        stream(StreamItem::Snapshot {
            node: NodeInfo {
                node_id: "n2".into(),
                addr: "198.19.100.2".parse().unwrap(),
                cidrs: vec!["198.19.84.0/24".parse().unwrap()],
            },
            containers,
        })
    }

    #[test]
    fn a_node_lives_from_snapshot_to_loss() {
        let mut remote = RemoteNodes::default();
        let key = RouteKey::Http {
            domain: "web.local".into(),
            path: "/".into(),
        };
        // Changes before a snapshot are ignored: the stream starts with one.
        assert!(!remote.apply(stream(StreamItem::Remove { id: "a".into() }), "local", None));
        assert!(remote.apply(
            snapshot(vec![container("a", BackendState::Up)]),
            "local",
            None
        ));
        assert_eq!(remote.count_serving(&key), (1, 1));
        // The same state again changes nothing; a new state does.
        let same = stream(StreamItem::Upsert {
            container: container("a", BackendState::Up),
        });
        assert!(!remote.apply(same, "local", None));
        let draining = stream(StreamItem::Upsert {
            container: container("a", BackendState::Draining),
        });
        assert!(remote.apply(draining, "local", None));
        assert_eq!(remote.count_serving(&key), (0, 1));
        let added = stream(StreamItem::Upsert {
            container: container("b", BackendState::Up),
        });
        assert!(remote.apply(added, "local", None));
        assert_eq!(remote.count_serving(&key), (1, 2));

        // A failed connection through its agent: no new requests until the stream speaks.
        let via = "198.19.100.2:9191".parse().unwrap();
        assert!(remote.apply(
            PeerEvent::Unreachable {
                via,
                why: "refused".into()
            },
            "local",
            None
        ));
        assert_eq!(remote.count_serving(&key), (0, 2));
        assert!(remote.apply(stream(StreamItem::Heartbeat), "local", None));
        assert_eq!(remote.count_serving(&key), (1, 2));

        let cidrs: Vec<String> = remote
            .internal_cidrs()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(cidrs, ["198.19.84.0/24", "198.19.100.2/32"]);

        assert!(remote.apply(
            PeerEvent::Lost {
                node_id: "n2".into(),
                why: "no heartbeat".into()
            },
            "local",
            None
        ));
        assert_eq!(remote.count_serving(&key), (0, 0));
        assert!(remote.internal_cidrs().is_empty());
    }
}
