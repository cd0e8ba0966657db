//! What agents tell each other, as JSON lines on the cluster port: each agent's view of its own
//! node (the containers it discovers and checks there, with their health), and the node list
//! that agents on manager nodes read from Swarm.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::{cidr::Cidr, health::BackendState};

/// One routed container as its own node's agent sees it. Other agents parse the labels
/// themselves (the same parser, so the same routes) and take the state as given: the owner
/// probes, the others do not.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SharedContainer {
    pub id: String,
    pub name: String,
    /// The router's own labels (`aliyun.*`); orchestration labels are left out.
    pub labels: BTreeMap<String, String>,
    pub state: BackendState,
    /// Its address on its own node, as the owner reaches it (other nodes go through the owner).
    pub address: Option<IpAddr>,
}

/// Who a node's agent is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Swarm node id.
    pub node_id: String,
    /// The node's address (Swarm's advertise address).
    pub addr: IpAddr,
    /// Subnets of the node's Docker networks: clients from them are internal cluster-wide.
    pub cidrs: Vec<Cidr>,
}

/// One line of a node's watch stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamItem {
    /// The whole view: first on every stream.
    Snapshot {
        node: NodeInfo,
        containers: Vec<SharedContainer>,
    },
    /// A container appeared or changed.
    Upsert { container: SharedContainer },
    /// A container is gone (died, removed).
    Remove { id: String },
    /// The node's networks changed.
    Node { node: NodeInfo },
    /// Nothing changed; the stream is alive (a follower that hears nothing for a while counts
    /// the node as lost).
    Heartbeat,
}

/// A Swarm node, as agents on managers list them for agents on workers (which cannot ask
/// Swarm themselves).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    pub node_id: String,
    /// Where its agent's cluster port is.
    pub cluster_addr: SocketAddr,
}

impl StreamItem {
    /// One JSON line.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("stream items serialise");
        line.push('\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let container = SharedContainer {
            id: "a".repeat(64),
            name: "web.1".into(),
            labels: BTreeMap::from([("aliyun.routing.port_80".into(), "web".into())]),
            state: BackendState::Draining,
            address: Some("198.19.84.3".parse().unwrap()),
        };
        let items = [
            StreamItem::Snapshot {
                node: NodeInfo {
                    node_id: "n1".into(),
                    addr: "198.19.100.1".parse().unwrap(),
                    cidrs: vec!["198.19.84.0/24".parse().unwrap()],
                },
                containers: vec![container.clone()],
            },
            StreamItem::Upsert { container },
            StreamItem::Remove { id: "b".into() },
            StreamItem::Heartbeat,
        ];
        for item in items {
            let line = item.to_line();
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            let back: StreamItem = serde_json::from_str(&line).unwrap();
            assert_eq!(back, item);
        }
        assert_eq!(
            StreamItem::Heartbeat.to_line(),
            "{\"type\":\"heartbeat\"}\n"
        );
    }
}
