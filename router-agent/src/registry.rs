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
    probe::{self, ProbeOutcome, TaskGuard},
    table::{Backend, BackendStats, RouteInput, RouteKey, RoutingTable},
};

/// Everything the registry hears.
#[derive(Debug)]
pub enum Message {
    Discovery(Update),
    ProbeResult {
        id: String,
        generation: u64,
        outcome: ProbeOutcome,
    },
    /// The proxy could not connect to this backend (refused, unreachable, connect timeout).
    ConnectFailed {
        id: Arc<str>,
        addr: SocketAddr,
        error: String,
    },
    /// This many exchanges in a row failed on this backend (no response, an invalid one, a
    /// response timeout): the error limit was reached.
    ErrorStreak {
        id: Arc<str>,
        addr: SocketAddr,
        errors: u32,
        last_error: String,
    },
    /// A backend without a probe accepts connections again.
    Recovered {
        id: String,
        generation: u64,
    },
    /// The admin API asks for every container's view (built on demand: histories change with
    /// every failed check, and publishing them each time would cost a copy of all of them).
    ViewContainers(tokio::sync::oneshot::Sender<Vec<ContainerView>>),
}

/// What the registry publishes for readers (proxy, admin API).
pub struct Published {
    pub table: ArcSwap<RoutingTable>,
    /// Bumped after every new table, for those who act on changes (the connection pool).
    pub table_version: tokio::sync::watch::Sender<u64>,
    pub internal_cidrs: ArcSwap<Vec<Cidr>>,
    pub engine_connected: AtomicBool,
    /// True once the first Docker sync is done and the first checks of the containers found
    /// running have reported: the routing table then says what the agent would route.
    pub ready: tokio::sync::watch::Sender<bool>,
}

impl Published {
    pub fn new(fixed_cidrs: Option<&[Cidr]>) -> Self {
        Self {
            table: ArcSwap::from_pointee(RoutingTable::default()),
            table_version: tokio::sync::watch::Sender::new(0),
            internal_cidrs: ArcSwap::from_pointee(
                fixed_cidrs.map_or_else(|| Cidr::loopback().to_vec(), <[Cidr]>::to_vec),
            ),
            engine_connected: AtomicBool::new(false),
            ready: tokio::sync::watch::Sender::new(false),
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

/// How long a backend without a probe stays out after failed exchanges before its port is
/// checked again: it accepts connections all along, so only time can tell whether it
/// recovered (Envoy's outlier detection ejects for a base time in the same way).
const EJECTION_TIME: Duration = Duration::from_secs(10);

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
    /// Its probe's first run was due when the probe task started (the container has been
    /// running longer than the initial delay).
    first_check_due_at_once: bool,
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

/// What the registry is told once, at start.
pub struct RegistrySettings {
    pub default_domain: String,
    /// Derive the internal CIDRs from the Docker networks.
    pub auto_cidrs: bool,
    /// Requests in flight per backend container, when limited.
    pub backend_max_connections: Option<usize>,
}

pub struct Registry {
    settings: RegistrySettings,
    docker: DockerHandle,
    sender: mpsc::UnboundedSender<Message>,
    published: Arc<Published>,
    containers: HashMap<String, Entry>,
    cursors: HashMap<RouteKey, Arc<AtomicUsize>>,
    next_generation: u64,
    /// Until the agent is ready: the containers whose first check is still to report.
    startup: Startup,
}

/// The way to readiness: the first sync, then the first result of every check that is due at
/// once (containers that were running before the agent started).
enum Startup {
    BeforeSync,
    FirstChecks(HashSet<String>),
    Ready,
}

impl Registry {
    pub fn new(
        settings: RegistrySettings,
        docker: DockerHandle,
        sender: mpsc::UnboundedSender<Message>,
        published: Arc<Published>,
    ) -> Self {
        Self {
            settings,
            docker,
            sender,
            published,
            containers: HashMap::new(),
            cursors: HashMap::new(),
            next_generation: 0,
            startup: Startup::BeforeSync,
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
            } => {
                self.first_check_reported(&id);
                self.with_current(&id, generation, |entry| {
                    let Some(tracker) = entry.health.probe.as_mut() else {
                        return;
                    };
                    match &outcome {
                        ProbeOutcome::Passed(_) => tracker.record(true),
                        ProbeOutcome::Failed(reason) => {
                            tracker.record(false);
                            entry.remember(format!("probe failed: {reason}"));
                        }
                        // Not the backend's doing: no verdict either way.
                        ProbeOutcome::NotRun(reason) => {
                            entry.remember(format!("probe not run: {reason}"));
                        }
                    }
                })
            }
            Message::ConnectFailed { id, addr, error } => self.connect_failed(&id, addr, &error),
            Message::ErrorStreak {
                id,
                addr,
                errors,
                last_error,
            } => self.error_streak(&id, addr, errors, &last_error),
            Message::Recovered { id, generation } => self.with_current(&id, generation, |entry| {
                entry.health.passive_down = false;
                entry.checker = None;
                entry.remember("accepts connections again".into());
            }),
            Message::ViewContainers(reply) => {
                let _ = reply.send(self.views());
                false
            }
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
                for id in vanished {
                    self.remove(&id, "gone while the Docker engine was unreachable");
                }
                if matches!(self.startup, Startup::BeforeSync) {
                    let due = self
                        .containers
                        .iter()
                        .filter(|(_, e)| e.first_check_due_at_once)
                        .map(|(id, _)| id.clone())
                        .collect();
                    self.startup = Startup::FirstChecks(due);
                    // Ready at once when nothing is due.
                    self.first_check_reported("");
                }
                // Published even when nothing changed: readers wait for the first table.
                true
            }
            Update::Networks(cidrs) => {
                if self.settings.auto_cidrs {
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

    /// Marks the first check of `id` as reported; the agent is ready when none is left.
    fn first_check_reported(&mut self, id: &str) {
        let Startup::FirstChecks(pending) = &mut self.startup else {
            return;
        };
        pending.remove(id);
        if pending.is_empty() {
            self.startup = Startup::Ready;
            self.published.ready.send_replace(true);
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
        let spec = labels::parse(&info.labels, &self.settings.default_domain);
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
            stats: Arc::new(BackendStats::new(self.settings.backend_max_connections)),
            generation: 0,
            checker: None,
            history: VecDeque::new(),
            first_check_due_at_once: false,
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
        // Kubernetes' meaning of the initial delay: counted from the container's start, so a
        // container that has been running for a while (found at an agent restart, or after a
        // network change) is checked at once instead of waiting again.
        let running_for = entry
            .info
            .started_at
            .and_then(|started| SystemTime::now().duration_since(started).ok())
            .unwrap_or_default();
        let first_delay = spec.initial_delay.saturating_sub(running_for);
        entry.first_check_due_at_once = first_delay.is_zero();
        entry.checker = Some(probe::spawn_probe(
            probe::ProbeTarget {
                container_id: id.to_owned(),
                generation,
                ip,
            },
            spec,
            first_delay,
            self.docker.clone(),
            self.sender.clone(),
        ));
    }

    fn remove(&mut self, id: &str, why: &str) -> bool {
        // A container gone before its first check does not hold readiness back.
        self.first_check_reported(id);
        let Some(entry) = self.containers.remove(id) else {
            return false;
        };
        info!(container = %entry.info.name, id = %short(id), "container removed: {why}");
        true
    }

    /// A refused or unreachable backend is out at once: nothing was sent, so this is about
    /// the backend, not about a request.
    fn connect_failed(&mut self, id: &str, addr: SocketAddr, error: &str) -> bool {
        let up = self
            .containers
            .get(id)
            .is_some_and(|e| e.health.state() == BackendState::Up);
        if !up {
            return false;
        }
        self.take_out(
            id,
            addr,
            &format!("connection to {addr} failed: {error}"),
            Duration::ZERO,
        )
    }

    /// The error limit was reached. Failed exchanges can be caused by the requests themselves,
    /// so they take a backend out only while at least half of every route it serves stays up
    /// (`health::may_eject`); either way the streak starts over.
    fn error_streak(&mut self, id: &str, addr: SocketAddr, errors: u32, last_error: &str) -> bool {
        let Some(entry) = self.containers.get(id) else {
            return false;
        };
        entry.stats.reset_errors();
        if entry.health.state() != BackendState::Up {
            return false;
        }
        let why = format!("{errors} failed exchanges in a row (last: {last_error})");
        if let Some(route) = self.route_kept_by_ejection_cap(id) {
            let entry = self.containers.get_mut(id).expect("checked above");
            warn!(container = %entry.info.name, id = %short(id), %addr, "{why}; kept in: taking it out would leave fewer than half of {route} up");
            entry.remember(format!(
                "{why}; kept in to leave at least half of {route} up"
            ));
            return false;
        }
        self.take_out(id, addr, &why, EJECTION_TIME)
    }

    /// A route of the container that passive health must not thin out further, if any.
    fn route_kept_by_ejection_cap(&self, id: &str) -> Option<String> {
        let spec = self.containers.get(id)?.spec.as_ref().ok()?;
        spec.routes.iter().find_map(|route| {
            let key = route_key(route);
            let (mut up, mut backends) = (0, 0);
            for entry in self.containers.values() {
                let serves = entry
                    .spec
                    .as_ref()
                    .is_ok_and(|s| s.routes.iter().any(|r| route_key(r) == key));
                if serves && entry.info.address.is_some() {
                    backends += 1;
                    up += usize::from(entry.health.state() == BackendState::Up);
                }
            }
            (!crate::health::may_eject(up, backends))
                .then(|| format!("{}://{}{}", route.scheme, route.domain, route.path))
        })
    }

    /// Takes an `up` backend out until its probe passes again, or, without a probe, until its
    /// port accepts connections again (checked after `hold`, then every recovery period).
    fn take_out(&mut self, id: &str, addr: SocketAddr, why: &str, hold: Duration) -> bool {
        self.next_generation += 1;
        let generation = self.next_generation;
        let Some(entry) = self.containers.get_mut(id) else {
            return false;
        };
        let before = entry.health.state();
        warn!(container = %entry.info.name, id = %short(id), %addr, "{why}; taking the backend out");
        entry.health.record_passive_failure();
        entry.remember(why.to_owned());
        if entry.health.probe.is_none() {
            // No probe will notice the recovery: check the port until it accepts again.
            entry.generation = generation;
            entry.checker = Some(probe::spawn_recovery(
                id.to_owned(),
                generation,
                addr,
                hold,
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
                let key = route_key(route);
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
        self.published.table.store(Arc::new(RoutingTable::build(
            routes.into_values().collect(),
        )));
        self.published.table_version.send_modify(|v| *v += 1);
    }
}

/// Where a route is served: the key every container of the route shares.
fn route_key(route: &RouteSpec) -> RouteKey {
    match route.listen_port {
        Some(listen_port) => RouteKey::Tcp { listen_port },
        None => RouteKey::Http {
            domain: route.domain.clone(),
            path: route.path.clone(),
        },
    }
}

impl Registry {
    /// Every container as the admin API shows it, sorted by name.
    fn views(&self) -> Vec<ContainerView> {
        let mut sorted: Vec<&Entry> = self.containers.values().collect();
        sorted.sort_by(|a, b| (&a.info.name, &a.info.id).cmp(&(&b.info.name, &b.info.id)));
        sorted.into_iter().map(view).collect()
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
