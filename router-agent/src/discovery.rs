//! Discovery: which labeled containers run on this Docker engine, and where they listen.
//!
//! At (re)connect: subscribe to the event stream first, then list running containers and
//! inspect the labeled ones, then tell the registry the full set (anything else it knew has
//! vanished meanwhile). After that only events drive it, and only the container an event names
//! is inspected. When the engine goes away the registry keeps routing with what it knows while
//! this loop reconnects with backoff.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use bollard::{
    Docker,
    models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum},
    query_parameters::{
        EventsOptions, InspectNetworkOptions, ListContainersOptions, ListNetworksOptions,
    },
};
use futures_util::StreamExt as _;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{cidr::Cidr, health::DockerHealth, labels};

/// A running, labeled container as the engine describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub labels: HashMap<String, String>,
    /// The address backends are reached at (see [`choose_address`]); `None` when the container
    /// has no IPv4 address on any network.
    pub address: Option<IpAddr>,
    pub networks: Vec<NetworkAddress>,
    pub docker_health: Option<DockerHealth>,
    /// When the engine last started it (probes' initial delay counts from here).
    pub started_at: Option<SystemTime>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetworkAddress {
    pub network: String,
    pub address: String,
}

/// What discovery tells the registry.
#[derive(Debug)]
pub enum Update {
    Container(ContainerInfo),
    /// `kill` (a terminating signal) or `stop`: no new requests. (A paused container is
    /// found not running and is `Gone`: it would hold connections without answering.)
    Stopping {
        id: String,
    },
    /// `die`, `destroy`, or found not running.
    Gone {
        id: String,
    },
    DockerHealth {
        id: String,
        health: DockerHealth,
    },
    /// The complete set of labeled running containers after a (re)connect.
    Resynced {
        ids: HashSet<String>,
    },
    /// Subnets of the engine's networks.
    Networks(Vec<Cidr>),
    EngineConnected(bool),
}

/// The current engine connection, for exec probes. Empty while disconnected.
pub type DockerHandle = Arc<ArcSwapOption<Docker>>;

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub async fn run(
    docker_host: String,
    updates: mpsc::UnboundedSender<Update>,
    handle: DockerHandle,
    engine_requests: Arc<AtomicU64>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match connect(&docker_host).await {
            Ok(docker) => {
                handle.store(Some(Arc::new(docker.clone())));
                let mut session = Session {
                    docker: &docker,
                    updates: &updates,
                    swarm_networks: HashSet::new(),
                    requests: &engine_requests,
                };
                let outcome = session.follow().await;
                handle.store(None);
                let _ = updates.send(Update::EngineConnected(false));
                match outcome {
                    // The session worked for a while: start the backoff over.
                    Ok(()) => backoff = MIN_BACKOFF,
                    Err(e) => warn!(
                        "Docker engine at {docker_host}: {e:#}; keeping the known routes and reconnecting"
                    ),
                }
            }
            Err(e) => warn!(
                "cannot reach the Docker engine at {docker_host}: {e:#}; retrying in {backoff:?} (set --docker-host if it lives elsewhere)"
            ),
        }
        if updates.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn connect(docker_host: &str) -> anyhow::Result<Docker> {
    let docker = Docker::connect_with_host(docker_host)?;
    // bollard asks for the newest API by default; older engines refuse every call unless we
    // settle on the version they speak.
    Ok(docker.negotiate_version().await?)
}

/// The network through which a node reaches its Swarm service tasks: every task on an overlay
/// network also has an address on it, while overlay addresses are not reachable from the
/// node's own network namespace.
const GATEWAY_BRIDGE: &str = "docker_gwbridge";

/// One connection to the engine.
struct Session<'a> {
    docker: &'a Docker,
    updates: &'a mpsc::UnboundedSender<Update>,
    /// Names of the engine's Swarm-scoped (overlay) networks.
    swarm_networks: HashSet<String>,
    /// Requests made to the engine, for `/metrics` (the work an event costs).
    requests: &'a AtomicU64,
}

impl Session<'_> {
    fn count(&self, requests: u64) {
        self.requests.fetch_add(requests, Ordering::Relaxed);
    }

    /// Resync, then follow events until the stream fails.
    async fn follow(&mut self) -> anyhow::Result<()> {
        let filters = HashMap::from([(
            "type".to_owned(),
            vec!["container".to_owned(), "network".to_owned()],
        )]);
        let docker = self.docker;
        let events = docker.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }));
        let mut events = pin!(events.peekable());
        // Get the subscription in place before listing, so nothing that happens during the
        // list is missed. The events endpoint answers at once; an event arriving now stays
        // peeked.
        let _ = tokio::time::timeout(Duration::from_millis(200), events.as_mut().peek()).await;

        self.send_networks().await?;
        let mut ids = HashSet::new();
        self.count(1);
        let summaries = docker
            .list_containers(Some(ListContainersOptions::default()))
            .await?;
        for summary in summaries {
            let (Some(id), Some(labels)) = (summary.id, summary.labels) else {
                continue;
            };
            if !labels::is_router_container(&labels) {
                continue;
            }
            if let Some(info) = self.inspect(&id).await? {
                ids.insert(info.id.clone());
                let _ = self.updates.send(Update::Container(info));
            }
        }
        info!(
            "Docker engine connected: {} labeled container(s) running",
            ids.len()
        );
        let _ = self.updates.send(Update::Resynced { ids });
        let _ = self.updates.send(Update::EngineConnected(true));

        while let Some(event) = events.next().await {
            self.handle_event(event?).await?;
        }
        anyhow::bail!("the event stream ended")
    }

    async fn handle_event(&mut self, event: EventMessage) -> anyhow::Result<()> {
        let action = event.action.as_deref().unwrap_or_default();
        let actor = event.actor.unwrap_or_default();
        let attributes = actor.attributes.unwrap_or_default();
        match event.typ {
            Some(EventMessageTypeEnum::CONTAINER) => {
                let Some(id) = actor.id else { return Ok(()) };
                // Every container event carries the labels: skip the ones that are not ours
                // without asking the engine anything.
                if !labels::is_router_container(&attributes) {
                    return Ok(());
                }
                self.container_event(id, action, &attributes).await
            }
            Some(EventMessageTypeEnum::NETWORK) => {
                match action {
                    "connect" | "disconnect" => {
                        if let Some(id) = attributes.get("container") {
                            self.reinspect(id).await?;
                        }
                    }
                    "create" | "destroy" => self.send_networks().await?,
                    _ => {}
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn container_event(
        &mut self,
        id: String,
        action: &str,
        attributes: &HashMap<String, String>,
    ) -> anyhow::Result<()> {
        // Actions carry suffixes ("health_status: healthy", "exec_start: sh -c ..."): match the
        // prefix.
        let verb = action.split(':').next().unwrap_or_default().trim();
        debug!(container = %short(&id), action, "docker event");
        let updates = self.updates;
        match verb {
            "start" | "unpause" | "pause" | "rename" => self.reinspect(&id).await?,
            "kill"
                if attributes
                    .get("signal")
                    .is_some_and(|s| is_terminating_signal(s)) =>
            {
                let _ = updates.send(Update::Stopping { id });
            }
            "stop" => {
                let _ = updates.send(Update::Stopping { id });
            }
            "die" | "destroy" => {
                let _ = updates.send(Update::Gone { id });
            }
            "health_status" => {
                if let Some(health) = action
                    .split_once(':')
                    .and_then(|(_, s)| DockerHealth::from_docker(s))
                {
                    let _ = updates.send(Update::DockerHealth { id, health });
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn reinspect(&mut self, id: &str) -> anyhow::Result<()> {
        match self.inspect(id).await? {
            Some(info) if labels::is_router_container(&info.labels) => {
                let _ = self.updates.send(Update::Container(info));
            }
            Some(_) => {}
            None => {
                let _ = self.updates.send(Update::Gone { id: id.to_owned() });
            }
        }
        Ok(())
    }

    /// The container's details, or `None` when it is not running (or no longer exists).
    async fn inspect(&mut self, id: &str) -> anyhow::Result<Option<ContainerInfo>> {
        self.count(1);
        let details = match self.docker.inspect_container(id, None).await {
            Ok(details) => details,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Some(mut info) = container_info(details, &self.swarm_networks) else {
            return Ok(None);
        };
        if info.address.is_none()
            && info
                .networks
                .iter()
                .any(|n| self.swarm_networks.contains(&n.network))
        {
            info.address = self.gateway_bridge_address(&info.id).await?;
        }
        Ok(Some(info))
    }

    /// The container's address on the node's gateway bridge (Swarm tasks on overlay
    /// networks have one).
    async fn gateway_bridge_address(&self, id: &str) -> anyhow::Result<Option<IpAddr>> {
        self.count(1);
        let network = match self
            .docker
            .inspect_network(GATEWAY_BRIDGE, None::<InspectNetworkOptions>)
            .await
        {
            Ok(network) => network,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(network
            .containers
            .unwrap_or_default()
            .get(id)
            .and_then(|c| c.ipv4_address.as_deref())
            .and_then(|cidr| cidr.split('/').next())
            .and_then(|ip| ip.parse().ok()))
    }

    /// Tells the registry the subnets of the engine's networks, and remembers which are
    /// Swarm-scoped.
    async fn send_networks(&mut self) -> anyhow::Result<()> {
        self.count(1);
        let networks = self
            .docker
            .list_networks(Some(ListNetworksOptions::default()))
            .await?;
        self.swarm_networks = networks
            .iter()
            .filter(|n| n.scope.as_deref() == Some("swarm"))
            .filter_map(|n| n.name.clone())
            .collect();
        let mut cidrs: Vec<Cidr> = networks
            .into_iter()
            .filter_map(|n| n.ipam?.config)
            .flatten()
            .filter_map(|c| c.subnet?.parse::<Cidr>().ok())
            .collect();
        cidrs.sort_by_key(ToString::to_string);
        cidrs.dedup();
        let _ = self.updates.send(Update::Networks(cidrs));
        Ok(())
    }
}

/// Signals that end a process by default (and so start a stop): `docker kill -s HUP` to reload
/// a server must not drain it.
fn is_terminating_signal(signal: &str) -> bool {
    let signal = signal.trim().trim_start_matches("SIG");
    matches!(
        signal,
        "2" | "3" | "9" | "15" | "INT" | "QUIT" | "KILL" | "TERM"
    )
}

/// What the router needs of an inspected container; `None` when it is not running.
fn container_info(
    details: ContainerInspectResponse,
    swarm_networks: &HashSet<String>,
) -> Option<ContainerInfo> {
    let state = details.state.unwrap_or_default();
    if state.running != Some(true) || state.paused == Some(true) {
        return None;
    }
    let host_network = details
        .host_config
        .and_then(|h| h.network_mode)
        .is_some_and(|mode| mode == "host");
    let mut networks: Vec<NetworkAddress> = details
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(network, endpoint)| {
            let address = endpoint.ip_address.filter(|a| !a.is_empty())?;
            Some(NetworkAddress { network, address })
        })
        .collect();
    networks.sort_by(|a, b| a.network.cmp(&b.network));
    Some(ContainerInfo {
        id: details.id?,
        name: details
            .name
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_default(),
        labels: details.config.and_then(|c| c.labels).unwrap_or_default(),
        address: choose_address(host_network, &networks, swarm_networks),
        networks,
        docker_health: state
            .health
            .and_then(|h| h.status)
            .and_then(|s| DockerHealth::from_docker(s.as_ref())),
        started_at: state
            .started_at
            .and_then(|t| humantime::parse_rfc3339_weak(&t).ok()),
    })
}

/// The address rule (documented in docs/health.md): a container on the host network is reached
/// on 127.0.0.1; otherwise the IPv4 address on the node-local network whose name sorts first.
/// Overlay (Swarm-scoped) addresses are skipped: the node cannot reach them (a task on overlay
/// networks only is reached on its gateway-bridge address instead, see `Session::inspect`).
/// Deterministic, so every resync picks the same one.
pub fn choose_address<S: std::hash::BuildHasher>(
    host_network: bool,
    sorted_networks: &[NetworkAddress],
    swarm_networks: &HashSet<String, S>,
) -> Option<IpAddr> {
    if host_network {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    sorted_networks
        .iter()
        .filter(|n| !swarm_networks.contains(&n.network))
        .find_map(|n| n.address.parse::<Ipv4Addr>().ok().map(IpAddr::V4))
}

pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(network: &str, address: &str) -> NetworkAddress {
        NetworkAddress {
            network: network.into(),
            address: address.into(),
        }
    }

    #[test]
    fn address_rule() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let none = HashSet::new();
        assert_eq!(choose_address(true, &[], &none), ip("127.0.0.1"));
        assert_eq!(choose_address(false, &[], &none), None);
        assert_eq!(
            choose_address(
                false,
                &[net("app", "198.18.2.5"), net("bridge", "198.18.0.5")],
                &none
            ),
            ip("198.18.2.5")
        );
        assert_eq!(
            choose_address(false, &[net("a", "fd00::5"), net("b", "198.18.0.5")], &none),
            ip("198.18.0.5")
        );
        // Overlay addresses are not reachable from the node: skipped.
        let overlay = HashSet::from(["app".to_owned()]);
        assert_eq!(
            choose_address(
                false,
                &[net("app", "198.19.200.5"), net("bridge", "198.18.0.5")],
                &overlay
            ),
            ip("198.18.0.5")
        );
        assert_eq!(
            choose_address(false, &[net("app", "198.19.200.5")], &overlay),
            None
        );
    }

    #[test]
    fn signals() {
        for s in ["15", "9", "SIGTERM", "KILL", "2", "QUIT"] {
            assert!(is_terminating_signal(s), "{s}");
        }
        for s in ["1", "HUP", "SIGUSR1", "10", "28"] {
            assert!(!is_terminating_signal(s), "{s}");
        }
    }
}
