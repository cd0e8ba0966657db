//! Clusters: one agent per Docker Swarm node (a global service), every agent routing to every
//! node's containers.
//!
//! Cluster state comes from Swarm and the nodes' engines; the agents add health and
//! forwarding, and no consensus or membership protocol of their own:
//! - Each agent discovers and probes the containers of its own node only (plain containers
//!   and service tasks alike), so each backend is probed once per cluster.
//! - Each agent streams its node's containers, with their health, on the cluster port
//!   (`serve`), and follows every other node's stream (`follow`). A change reaches the other
//!   agents as one line: the work per event does not grow with the cluster.
//! - The node list comes from Swarm (`membership`): agents on managers read it from their
//!   engine, agents on workers from the managers' agents.
//! - A request for another node's container goes to that node's agent, which relays it to the
//!   container (`connect`): overlay addresses are not reachable from a node's host network.
//!
//! A node that is not in a Swarm runs alone (single-host mode), exactly as before.
pub mod connect;
mod follow;
mod membership;
mod serve;
pub mod wire;

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use anyhow::Context as _;
use bollard::{Docker, models::LocalNodeState};
use serde::Serialize;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use self::wire::Member;
use crate::{
    discovery::DockerHandle,
    proxy::ProxyContext,
    registry::{Message, PeerEvent},
};

/// This agent's place in the cluster, shared by the cluster tasks and the admin API.
#[derive(Serialize)]
pub struct Cluster {
    pub node_id: String,
    pub addr: IpAddr,
    pub port: u16,
    pub manager: bool,
    /// The cluster's nodes, this one included.
    #[serde(serialize_with = "serialize_members")]
    pub members: watch::Sender<Vec<Member>>,
    #[serde(skip)]
    pub registry: mpsc::UnboundedSender<Message>,
    /// Lines received from other nodes' streams.
    pub items_received: AtomicU64,
    /// Of those, the ones that said something changed (snapshots and changes, not heartbeats):
    /// the work other nodes' events cost this agent.
    pub changes_received: AtomicU64,
    /// The nodes whose stream this agent follows now (it got their snapshot).
    #[serde(serialize_with = "serialize_synced")]
    pub synced: watch::Sender<BTreeSet<String>>,
    /// Connections relayed to this node's containers for other nodes' agents.
    pub relayed: AtomicU64,
}

fn serialize_synced<S: serde::Serializer>(
    synced: &watch::Sender<BTreeSet<String>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    synced.borrow().serialize(s)
}

fn serialize_members<S: serde::Serializer>(
    members: &watch::Sender<Vec<Member>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    members.borrow().serialize(s)
}

/// The longest a starting agent waits to follow the other nodes before it serves.
const SYNC_TIMEOUT: Duration = Duration::from_secs(3);

impl Cluster {
    /// Waits until the node list is known (false at the timeout).
    async fn wait_members(&self, timeout: Duration) -> bool {
        let mut members = self.members.subscribe();
        tokio::time::timeout(timeout, members.wait_for(|m| !m.is_empty()))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until the node list is known and every other node's stream gave its snapshot;
    /// returns false at the timeout (a node that is down must not keep this one from serving).
    async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut synced = self.synced.subscribe();
        let mut members = self.members.subscribe();
        let all_followed = |members: &[Member], synced: &BTreeSet<String>| {
            !members.is_empty()
                && members
                    .iter()
                    .filter(|m| m.node_id != self.node_id)
                    .all(|m| synced.contains(&m.node_id))
        };
        let wait = async {
            loop {
                if all_followed(&members.borrow_and_update(), &synced.borrow_and_update()) {
                    return;
                }
                tokio::select! {
                    _ = synced.changed() => {}
                    _ = members.changed() => {}
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Whether a connection to the cluster port may come from `ip`: the cluster's nodes (and
    /// this host), nobody else.
    fn admits(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        ip.is_loopback()
            || ip == self.addr
            || self
                .members
                .borrow()
                .iter()
                .any(|m| m.cluster_addr.ip() == ip)
    }
}

/// Joins the cluster the local engine belongs to, if it is a Swarm node: tells the registry
/// who this node is, opens the cluster port and starts following the other nodes. `None` in
/// single-host mode.
pub async fn start(
    listen: SocketAddr,
    ctx: Arc<ProxyContext>,
    docker: DockerHandle,
) -> anyhow::Result<Option<Arc<Cluster>>> {
    let Some(engine) = docker.load_full() else {
        warn!("the Docker engine is not connected: running as a single host");
        return Ok(None);
    };
    let swarm = engine
        .info()
        .await
        .context("asking the Docker engine whether it is in a Swarm")?
        .swarm
        .unwrap_or_default();
    if swarm.local_node_state != Some(LocalNodeState::ACTIVE) {
        info!("the Docker engine is not in a Swarm: single-host mode");
        return Ok(None);
    }
    let node_id = swarm.node_id.context("Swarm gave no node id")?;
    let addr: IpAddr = swarm
        .node_addr
        .as_deref()
        .and_then(|a| a.parse().ok())
        .context("Swarm gave no node address")?;
    let manager = swarm.control_available == Some(true);
    let cluster = Arc::new(Cluster {
        node_id: node_id.clone(),
        addr,
        port: listen.port(),
        manager,
        members: watch::Sender::new(Vec::new()),
        registry: ctx.registry.clone(),
        items_received: AtomicU64::new(0),
        changes_received: AtomicU64::new(0),
        synced: watch::Sender::new(BTreeSet::new()),
        relayed: AtomicU64::new(0),
    });
    let _ = ctx.registry.send(Message::OwnNode {
        node_id: node_id.clone(),
        addr,
    });
    tokio::spawn(track_members(engine, cluster.clone()));
    // The cluster port admits the members only: open it once they are known, so that a peer
    // is not turned away while this agent starts.
    if !cluster.wait_members(SYNC_TIMEOUT).await {
        warn!("no node list from Swarm within {SYNC_TIMEOUT:?}; opening the cluster port anyway");
    }
    let listener = crate::proxy::bind(listen)
        .with_context(|| format!("opening the cluster port {listen} (--cluster-listen)"))?;
    tokio::spawn(serve::serve(listener, ctx, cluster.clone()));
    tokio::spawn(follow_members(cluster.clone()));
    // Serving before the other nodes are followed would answer 404 for their routes.
    if !cluster.wait_synced(SYNC_TIMEOUT).await {
        warn!(
            "not every node's agent answered within {SYNC_TIMEOUT:?}: serving with the nodes \
             followed so far ({:?})",
            cluster.synced.borrow()
        );
    }
    info!(
        node = %node_id,
        %addr,
        role = if manager { "manager" } else { "worker" },
        "cluster mode: following the other nodes' agents on port {}",
        listen.port()
    );
    Ok(Some(cluster))
}

/// Keeps `cluster.members` current from Swarm.
async fn track_members(engine: Arc<Docker>, cluster: Arc<Cluster>) {
    loop {
        let members = if cluster.manager {
            membership::from_engine(&engine, cluster.port).await
        } else {
            match manager_agents(&engine, cluster.port).await {
                Ok(managers) => membership::from_managers(&managers).await,
                Err(e) => Err(e),
            }
        };
        match members {
            Ok(members) => {
                cluster.members.send_if_modified(|current| {
                    let changed = *current != members;
                    *current = members;
                    changed
                });
            }
            Err(e) => tracing::debug!("node list: {e:#}"),
        }
        tokio::time::sleep(membership::REFRESH).await;
    }
}

/// The managers' agents, from the engine's view of its Swarm.
async fn manager_agents(engine: &Docker, port: u16) -> anyhow::Result<Vec<SocketAddr>> {
    let swarm = engine.info().await?.swarm.unwrap_or_default();
    Ok(swarm
        .remote_managers
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| {
            let addr = m.addr?;
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
            Some(SocketAddr::new(host.parse().ok()?, port))
        })
        .collect())
}

/// One follower per other node; a node that leaves the list is dropped from the table.
async fn follow_members(cluster: Arc<Cluster>) {
    let mut followers: HashMap<Member, JoinHandle<()>> = HashMap::new();
    let mut members = cluster.members.subscribe();
    loop {
        let wanted: Vec<Member> = members
            .borrow_and_update()
            .iter()
            .filter(|m| m.node_id != cluster.node_id)
            .cloned()
            .collect();
        followers.retain(|member, task| {
            let keep = wanted.contains(member);
            if !keep {
                task.abort();
                cluster.synced.send_modify(|s| {
                    s.remove(&member.node_id);
                });
                let _ = cluster.registry.send(Message::Peer(PeerEvent::Lost {
                    node_id: member.node_id.clone(),
                    why: "it left the Swarm's node list".into(),
                }));
            }
            keep
        });
        for member in wanted {
            followers.entry(member.clone()).or_insert_with(|| {
                tokio::spawn(follow::follow(
                    member.node_id.clone(),
                    member.cluster_addr,
                    cluster.clone(),
                ))
            });
        }
        if members.changed().await.is_err() {
            return;
        }
    }
}

/// Default cluster port.
pub const DEFAULT_PORT: u16 = 9191;

/// The longest a request waits for another node's agent to relay a connection (and for the
/// relayed connection to open): nodes share a LAN, and an agent that does not answer within
/// this is treated as unreachable (the request goes to another backend).
pub const RELAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
