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
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use bollard::{
    Docker,
    models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum},
    query_parameters::{EventsOptions, ListContainersOptions, ListNetworksOptions},
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
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match connect(&docker_host).await {
            Ok(docker) => {
                handle.store(Some(Arc::new(docker.clone())));
                let outcome = follow(&docker, &updates).await;
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

/// One session with the engine: resync, then follow events until the stream fails.
async fn follow(docker: &Docker, updates: &mpsc::UnboundedSender<Update>) -> anyhow::Result<()> {
    let filters = HashMap::from([(
        "type".to_owned(),
        vec!["container".to_owned(), "network".to_owned()],
    )]);
    let events = docker.events(Some(EventsOptions {
        filters: Some(filters),
        ..Default::default()
    }));
    let mut events = pin!(events.peekable());
    // Get the subscription in place before listing, so nothing that happens during the list
    // is missed. The events endpoint answers at once; an event arriving now stays peeked.
    let _ = tokio::time::timeout(Duration::from_millis(200), events.as_mut().peek()).await;

    send_networks(docker, updates).await?;
    let mut ids = HashSet::new();
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
        if let Some(info) = inspect(docker, &id).await? {
            ids.insert(info.id.clone());
            let _ = updates.send(Update::Container(info));
        }
    }
    info!(
        "Docker engine connected: {} labeled container(s) running",
        ids.len()
    );
    let _ = updates.send(Update::Resynced { ids });
    let _ = updates.send(Update::EngineConnected(true));

    while let Some(event) = events.next().await {
        handle_event(docker, event?, updates).await?;
    }
    anyhow::bail!("the event stream ended")
}

async fn handle_event(
    docker: &Docker,
    event: EventMessage,
    updates: &mpsc::UnboundedSender<Update>,
) -> anyhow::Result<()> {
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
            container_event(docker, id, action, &attributes, updates).await
        }
        Some(EventMessageTypeEnum::NETWORK) => {
            match action {
                "connect" | "disconnect" => {
                    if let Some(id) = attributes.get("container") {
                        reinspect(docker, id, updates).await?;
                    }
                }
                "create" | "destroy" => send_networks(docker, updates).await?,
                _ => {}
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

async fn container_event(
    docker: &Docker,
    id: String,
    action: &str,
    attributes: &HashMap<String, String>,
    updates: &mpsc::UnboundedSender<Update>,
) -> anyhow::Result<()> {
    // Actions carry suffixes ("health_status: healthy", "exec_start: sh -c ..."): match the
    // prefix.
    let verb = action.split(':').next().unwrap_or_default().trim();
    debug!(container = %short(&id), action, "docker event");
    match verb {
        "start" | "unpause" | "pause" | "rename" => reinspect(docker, &id, updates).await?,
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

/// Signals that end a process by default (and so start a stop): `docker kill -s HUP` to reload
/// a server must not drain it.
fn is_terminating_signal(signal: &str) -> bool {
    let signal = signal.trim().trim_start_matches("SIG");
    matches!(
        signal,
        "2" | "3" | "9" | "15" | "INT" | "QUIT" | "KILL" | "TERM"
    )
}

async fn reinspect(
    docker: &Docker,
    id: &str,
    updates: &mpsc::UnboundedSender<Update>,
) -> anyhow::Result<()> {
    match inspect(docker, id).await? {
        Some(info) if labels::is_router_container(&info.labels) => {
            let _ = updates.send(Update::Container(info));
        }
        Some(_) => {}
        None => {
            let _ = updates.send(Update::Gone { id: id.to_owned() });
        }
    }
    Ok(())
}

/// The container's details, or `None` when it is not running (or no longer exists).
async fn inspect(docker: &Docker, id: &str) -> anyhow::Result<Option<ContainerInfo>> {
    match docker.inspect_container(id, None).await {
        Ok(details) => Ok(Some(details)),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e.into()),
    }
    .map(|details| details.and_then(container_info))
}

fn container_info(details: ContainerInspectResponse) -> Option<ContainerInfo> {
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
        address: choose_address(host_network, &networks),
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

/// The address rule (documented in README.md): a container on the host network is reached on
/// 127.0.0.1; otherwise the IPv4 address on the network whose name sorts first. Deterministic,
/// so every agent and every resync picks the same one.
pub fn choose_address(host_network: bool, sorted_networks: &[NetworkAddress]) -> Option<IpAddr> {
    if host_network {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    sorted_networks
        .iter()
        .find_map(|n| n.address.parse::<Ipv4Addr>().ok().map(IpAddr::V4))
}

async fn send_networks(
    docker: &Docker,
    updates: &mpsc::UnboundedSender<Update>,
) -> anyhow::Result<()> {
    let networks = docker
        .list_networks(Some(ListNetworksOptions::default()))
        .await?;
    let cidrs = networks
        .into_iter()
        .filter_map(|n| n.ipam?.config)
        .flatten()
        .filter_map(|c| c.subnet?.parse::<Cidr>().ok())
        .collect();
    let _ = updates.send(Update::Networks(cidrs));
    Ok(())
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
        assert_eq!(choose_address(true, &[]), ip("127.0.0.1"));
        assert_eq!(choose_address(false, &[]), None);
        assert_eq!(
            choose_address(
                false,
                &[net("app", "198.18.2.5"), net("bridge", "198.18.0.5")]
            ),
            ip("198.18.2.5")
        );
        assert_eq!(
            choose_address(false, &[net("a", "fd00::5"), net("b", "198.18.0.5")]),
            ip("198.18.0.5")
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
