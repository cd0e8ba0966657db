//! Which nodes the cluster has, from Swarm: an agent on a manager asks its engine (`/nodes`);
//! an agent on a worker, whose engine cannot answer that, asks the agents on the managers its
//! engine knows (`RemoteManagers` in `docker info`), one after the other, so that a manager
//! that is down does not stop it while the Swarm keeps a quorum.
use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use bollard::{Docker, models::NodeState, query_parameters::ListNodesOptions};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tracing::{debug, warn};

use super::wire::Member;

/// How often the node list is read again. Nodes join and leave rarely, and a dead node is
/// noticed sooner by its silent stream (`follow`).
pub const REFRESH: Duration = Duration::from_secs(3);

/// The nodes Swarm lists as ready, with their agents' cluster addresses (every agent listens
/// on the same cluster port).
pub async fn from_engine(docker: &Docker, cluster_port: u16) -> anyhow::Result<Vec<Member>> {
    let nodes = docker.list_nodes(None::<ListNodesOptions>).await?;
    let mut members: BTreeSet<Member> = BTreeSet::new();
    for node in nodes {
        let (Some(node_id), Some(status)) = (node.id, node.status) else {
            continue;
        };
        if status.state != Some(NodeState::READY) {
            continue;
        }
        let Some(ip) = status.addr.and_then(|a| a.parse().ok()) else {
            continue;
        };
        members.insert(Member {
            node_id,
            cluster_addr: SocketAddr::new(ip, cluster_port),
        });
    }
    Ok(members.into_iter().collect())
}

/// The node list as the first manager's agent that answers gives it.
pub async fn from_managers(managers: &[SocketAddr]) -> anyhow::Result<Vec<Member>> {
    let mut last_error = anyhow::anyhow!("no manager is known");
    for manager in managers {
        match ask(*manager).await {
            Ok(members) => return Ok(members),
            Err(e) => {
                debug!(%manager, "node list: {e:#}");
                last_error = e;
            }
        }
    }
    warn!("no manager's agent gave the node list ({last_error:#}); keeping the last one");
    Err(last_error)
}

async fn ask(agent: SocketAddr) -> anyhow::Result<Vec<Member>> {
    let exchange = async {
        let mut stream = TcpStream::connect(agent).await?;
        stream
            .write_all(
                b"GET /cluster/v1/nodes HTTP/1.1\r\nHost: cluster\r\nConnection: close\r\n\r\n",
            )
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(2), exchange).await??;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no answer head"))?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "answered {head:?}");
    Ok(serde_json::from_str(body)?)
}
