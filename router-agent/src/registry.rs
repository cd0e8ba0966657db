//! The registry: the single owner of what the agent knows about containers and their health.
//!
//! Discovery, probes and the proxy (passive failures) send it messages; it applies them in order
//! and, when something visible changed, publishes a new routing table and a new admin view by
//! atomic swap. Nothing else mutates routing state, so there are no locks on the request path.
use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    cidr::Cidr,
    discovery::{ContainerInfo, DockerHandle, NetworkAddress, Update, short},
    health::{BackendHealth, BackendState, DockerHealth, ProbeTracker, ProbeVerdict},
    labels::{self, ContainerSpec, LabelError, ProbeSpec, RouteSpec, Scheme},
    probe::{self, TaskGuard},
    table::{Backend, BackendStats, RouteInput, RouteKey, RoutingTable},
};

/// Everything the registry hears.
#[derive(Debug)]
pub enum Message {
    Discovery(Update),
    ProbeResult {
        id: String,
        generation: u64,
        outcome: Result<String, String>,
    },
    /// The proxy could not connect to (or lost) this backend.
    PassiveFailure {
        id: Arc<str>,
        addr: SocketAddr,
        error: String,
    },
    /// A backend without a probe accepts connections again.
    Recovered {
        id: String,
        generation: u64,
    },
}

/// What the registry publishes for readers (proxy, admin API).
pub struct Published {
    pub table: ArcSwap<RoutingTable>,
    /// Bumped after every new table, for those who act on changes (the connection pool).
    pub table_version: tokio::sync::watch::Sender<u64>,
    pub containers: ArcSwap<Vec<ContainerView>>,
    pub internal_cidrs: ArcSwap<Vec<Cidr>>,
    pub engine_connected: AtomicBool,
}

impl Published {
    pub fn new(fixed_cidrs: Option<&[Cidr]>) -> Self {
        Self {
            table: ArcSwap::from_pointee(RoutingTable::default()),
            table_version: tokio::sync::watch::Sender::new(0),
            containers: ArcSwap::from_pointee(Vec::new()),
            internal_cidrs: ArcSwap::from_pointee(
                fixed_cidrs.map_or_else(|| Cidr::loopback().to_vec(), <[Cidr]>::to_vec),
            ),
            engine_connected: AtomicBool::new(false),
        }
    }

    pub fn is_internal(&self, ip: IpAddr) -> bool {
        self.internal_cidrs.load().iter().any(|c| c.contains(ip))
    }
}

/// One container as the admin API shows it ("why is this not routed?").
#[derive(Serialize, Debug, Clone)]
pub struct ContainerView {
    pub id: String,
    pub name: String,
    pub address: Option<IpAddr>,
    pub networks: Vec<NetworkAddress>,
    pub state: BackendState,
    pub routed: bool,
    /// Why it receives no new requests, when it does not.
    pub not_routed_because: Option<String>,
    pub routes: Vec<RouteSpec>,
    pub sticky: Option<bool>,
    pub weight: Option<u32>,
    pub probe: Option<ProbeSpec>,
    pub probe_verdict: Option<ProbeVerdict>,
    pub docker_health: Option<DockerHealth>,
    pub errors: Vec<LabelError>,
    pub history: Vec<HistoryItem>,
}

#[derive(Serialize, Debug, Clone)]
pub struct HistoryItem {
    pub at_unix_ms: u64,
    pub event: String,
}

const HISTORY_LEN: usize = 32;

/// How often a backend without a probe is re-checked after a passive failure.
const RECOVERY_PERIOD: Duration = Duration::from_secs(labels::probe_defaults::PERIOD_SECONDS);

struct Entry {
    info: ContainerInfo,
    spec: Result<ContainerSpec, Vec<LabelError>>,
    health: BackendHealth,
    stats: Arc<BackendStats>,
    /// Tags the results of the current checker task.
    generation: u64,
    /// The probe task, or the recovery check after a passive failure.
    checker: Option<TaskGuard>,
    history: VecDeque<HistoryItem>,
}

impl Entry {
    fn remember(&mut self, event: String) {
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(HistoryItem {
            at_unix_ms: unix_ms(),
            event,
        });
    }

    fn probe_spec(&self) -> Option<&ProbeSpec> {
        self.spec.as_ref().ok().and_then(|s| s.probe.as_ref())
    }
}

pub struct Registry {
    default_domain: String,
    auto_cidrs: bool,
    docker: DockerHandle,
    sender: mpsc::UnboundedSender<Message>,
    published: Arc<Published>,
    containers: HashMap<String, Entry>,
    cursors: HashMap<RouteKey, Arc<AtomicUsize>>,
    next_generation: u64,
}

impl Registry {
    pub fn new(
        default_domain: String,
        auto_cidrs: bool,
        docker: DockerHandle,
        sender: mpsc::UnboundedSender<Message>,
        published: Arc<Published>,
    ) -> Self {
        Self {
            default_domain,
            auto_cidrs,
            docker,
            sender,
            published,
            containers: HashMap::new(),
            cursors: HashMap::new(),
            next_generation: 0,
        }
    }

    /// Applies messages until every sender is gone, publishing after each batch that changed
    /// something.
    pub async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Message>) {
        while let Some(message) = inbox.recv().await {
            let mut changed = self.apply(message);
            while let Ok(message) = inbox.try_recv() {
                changed |= self.apply(message);
            }
            if changed {
                self.publish();
            }
        }
    }

    /// Returns whether the published state must change.
    fn apply(&mut self, message: Message) -> bool {
        match message {
            Message::Discovery(update) => self.apply_update(update),
            Message::ProbeResult {
                id,
                generation,
                outcome,
            } => self.with_current(&id, generation, |entry| {
                let Some(tracker) = entry.health.probe.as_mut() else {
                    return;
                };
                tracker.record(outcome.is_ok());
                if let Err(reason) = &outcome {
                    entry.remember(format!("probe failed: {reason}"));
                }
            }),
            Message::PassiveFailure { id, addr, error } => self.passive_failure(&id, addr, &error),
            Message::Recovered { id, generation } => self.with_current(&id, generation, |entry| {
                entry.health.passive_down = false;
                entry.checker = None;
                entry.remember("accepts connections again".into());
            }),
        }
    }

    /// Runs `f` on the entry if `generation` is its current checker's; reports a state change.
    fn with_current(&mut self, id: &str, generation: u64, f: impl FnOnce(&mut Entry)) -> bool {
        let current = self
            .containers
            .get(id)
            .is_some_and(|entry| entry.generation == generation);
        current && self.change(id, f)
    }

    /// Runs `f` on the entry, if known; reports (logs, remembers, returns) a state change.
    fn change(&mut self, id: &str, f: impl FnOnce(&mut Entry)) -> bool {
        let Some(entry) = self.containers.get_mut(id) else {
            return false;
        };
        let before = entry.health.state();
        f(entry);
        Self::note_transition(entry, before)
    }

    fn note_transition(entry: &mut Entry, before: BackendState) -> bool {
        let after = entry.health.state();
        if before == after {
            return false;
        }
        info!(container = %entry.info.name, id = %short(&entry.info.id), "backend {before:?} -> {after:?}");
        entry.remember(format!("state {before:?} -> {after:?}").to_lowercase());
        true
    }

    fn apply_update(&mut self, update: Update) -> bool {
        match update {
            Update::Container(info) => self.upsert(info),
            Update::Stopping { id } => self.change(&id, |entry| {
                entry.health.draining = true;
                entry.remember("docker is stopping it: draining".into());
            }),
            Update::Gone { id } => self.remove(&id, "stopped"),
            Update::DockerHealth { id, health } => self.change(&id, |entry| {
                entry.health.docker = Some(health);
                entry.remember(format!("docker health: {health:?}").to_lowercase());
            }),
            Update::Resynced { ids } => {
                let vanished: Vec<String> = self
                    .containers
                    .keys()
                    .filter(|id| !ids.contains(*id))
                    .cloned()
                    .collect();
                let mut changed = false;
                for id in vanished {
                    changed |= self.remove(&id, "gone while the Docker engine was unreachable");
                }
                changed
            }
            Update::Networks(cidrs) => {
                if self.auto_cidrs {
                    let mut all = Cidr::loopback().to_vec();
                    all.extend(cidrs);
                    self.published.internal_cidrs.store(Arc::new(all));
                }
                false
            }
            Update::EngineConnected(connected) => {
                self.published
                    .engine_connected
                    .store(connected, Ordering::Relaxed);
                false
            }
        }
    }

    fn upsert(&mut self, info: ContainerInfo) -> bool {
        if let Some(entry) = self.containers.get_mut(&info.id) {
            if entry.info.address == info.address && entry.info.labels == info.labels {
                // Same run, same place: only the descriptive parts may have changed.
                let changed = entry.info.name != info.name;
                entry.info = info;
                return changed;
            }
            // New address (network change): same health, new checks against the new address.
            let old = entry.info.address;
            entry.remember(format!("address {old:?} -> {:?}", info.address));
            entry.info = info;
            let id = entry.info.id.clone();
            self.restart_checker(&id);
            return true;
        }
        let spec = labels::parse(&info.labels, &self.default_domain);
        if let Err(errors) = &spec {
            for error in errors {
                warn!(container = %info.name, id = %short(&info.id), "{error}; container not routed");
            }
        }
        if spec.is_ok() && info.address.is_none() {
            warn!(container = %info.name, id = %short(&info.id), "no IPv4 address on any network; container not routed");
        }
        let probe = spec.as_ref().ok().and_then(|s| s.probe.as_ref());
        let health = BackendHealth::new(
            probe.map(|p| ProbeTracker::new(p.success_threshold, p.failure_threshold)),
            info.docker_health,
        );
        info!(
            container = %info.name,
            id = %short(&info.id),
            address = ?info.address,
            routes = ?spec.as_ref().map(|s| s.routes.iter().map(|r| format!("{}://{}{}", r.scheme, r.domain, r.path)).collect::<Vec<_>>()).ok(),
            "container discovered"
        );
        let mut entry = Entry {
            info,
            spec,
            health,
            stats: Arc::default(),
            generation: 0,
            checker: None,
            history: VecDeque::new(),
        };
        match &entry.spec {
            Ok(_) => entry.remember("discovered".into()),
            Err(errors) => {
                for e in errors.clone() {
                    entry.remember(format!("label error: {e}"));
                }
            }
        }
        let id = entry.info.id.clone();
        self.containers.insert(id.clone(), entry);
        self.restart_checker(&id);
        true
    }

    /// Starts the probe task of the entry (replacing any checker), if it has a probe.
    fn restart_checker(&mut self, id: &str) {
        self.next_generation += 1;
        let generation = self.next_generation;
        let Some(entry) = self.containers.get_mut(id) else {
            return;
        };
        entry.generation = generation;
        entry.checker = None;
        let (Some(spec), Some(ip)) = (entry.probe_spec().cloned(), entry.info.address) else {
            return;
        };
        entry.checker = Some(probe::spawn_probe(
            id.to_owned(),
            generation,
            ip,
            spec,
            self.docker.clone(),
            self.sender.clone(),
        ));
    }

    fn remove(&mut self, id: &str, why: &str) -> bool {
        let Some(entry) = self.containers.remove(id) else {
            return false;
        };
        info!(container = %entry.info.name, id = %short(id), "container removed: {why}");
        true
    }

    fn passive_failure(&mut self, id: &str, addr: SocketAddr, error: &str) -> bool {
        self.next_generation += 1;
        let generation = self.next_generation;
        let Some(entry) = self.containers.get_mut(id) else {
            return false;
        };
        let before = entry.health.state();
        if before != BackendState::Up {
            return false;
        }
        warn!(container = %entry.info.name, id = %short(id), %addr, "connection failed: {error}; taking the backend out");
        entry.health.record_passive_failure();
        entry.remember(format!("connection to {addr} failed: {error}"));
        if entry.health.probe.is_none() {
            // No probe will notice the recovery: check the port until it accepts again.
            entry.generation = generation;
            entry.checker = Some(probe::spawn_recovery(
                id.to_owned(),
                generation,
                addr,
                RECOVERY_PERIOD,
                self.sender.clone(),
            ));
        }
        Self::note_transition(entry, before)
    }

    fn publish(&mut self) {
        let mut routes: BTreeMap<RouteKey, RouteInput> = BTreeMap::new();
        let mut sorted: Vec<&Entry> = self.containers.values().collect();
        sorted.sort_by(|a, b| (&a.info.name, &a.info.id).cmp(&(&b.info.name, &b.info.id)));
        for entry in &sorted {
            let (Ok(spec), Some(ip)) = (&entry.spec, entry.info.address) else {
                continue;
            };
            let state = entry.health.state();
            for route in &spec.routes {
                let key = match route.listen_port {
                    Some(listen_port) => RouteKey::Tcp { listen_port },
                    None => RouteKey::Http {
                        domain: route.domain.clone(),
                        path: route.path.clone(),
                    },
                };
                let cursor = self.cursors.entry(key.clone()).or_default().clone();
                let input = routes.entry(key.clone()).or_insert_with(|| RouteInput {
                    key,
                    domain: route.domain.clone(),
                    scheme: route.scheme,
                    sticky: true,
                    backends: Vec::new(),
                    cursor,
                });
                // One container opting out of stickiness turns it off for the route: the cookie
                // would otherwise pin sessions to some replicas and not others.
                input.sticky &= spec.sticky;
                if route.scheme == Scheme::Ws {
                    input.scheme = Scheme::Ws;
                }
                input.backends.push(Backend {
                    container_id: entry.info.id.as_str().into(),
                    container_name: entry.info.name.as_str().into(),
                    addr: SocketAddr::new(ip, route.container_port),
                    weight: spec.weight,
                    state,
                    stats: entry.stats.clone(),
                });
            }
        }
        let live: HashSet<&RouteKey> = routes.keys().collect();
        self.cursors.retain(|k, _| live.contains(k));
        let views = sorted.iter().map(|e| view(e)).collect();
        self.published.table.store(Arc::new(RoutingTable::build(
            routes.into_values().collect(),
        )));
        self.published.containers.store(Arc::new(views));
        self.published.table_version.send_modify(|v| *v += 1);
    }
}

fn view(entry: &Entry) -> ContainerView {
    let state = entry.health.state();
    let spec = entry.spec.as_ref().ok();
    let not_routed_because = match (&entry.spec, entry.info.address, state) {
        (Err(_), _, _) => Some("label errors (see errors)".to_owned()),
        (_, None, _) => Some("no IPv4 address on any network".to_owned()),
        (_, _, BackendState::Starting) => {
            Some("starting: the health check has not passed yet".to_owned())
        }
        (_, _, BackendState::Down) => Some("down: failing its health check".to_owned()),
        (_, _, BackendState::Draining) => Some("draining: Docker is stopping it".to_owned()),
        (Ok(spec), _, BackendState::Up) if spec.weight == 0 => {
            Some("weight 0: no new sessions".to_owned())
        }
        _ => None,
    };
    ContainerView {
        id: entry.info.id.clone(),
        name: entry.info.name.clone(),
        address: entry.info.address,
        networks: entry.info.networks.clone(),
        state,
        routed: not_routed_because.is_none(),
        not_routed_because,
        routes: spec.map(|s| s.routes.clone()).unwrap_or_default(),
        sticky: spec.map(|s| s.sticky),
        weight: spec.map(|s| s.weight),
        probe: spec.and_then(|s| s.probe.clone()),
        probe_verdict: entry.health.probe.as_ref().map(ProbeTracker::verdict),
        docker_health: entry.health.docker,
        errors: entry.spec.as_ref().err().cloned().unwrap_or_default(),
        history: entry.history.iter().cloned().collect(),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
