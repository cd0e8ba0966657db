//! The registry: the single owner of what the agent knows about containers and their health.
//!
//! Discovery, probes, the proxy (passive failures) and, in a cluster, the other nodes' agents
//! send it messages; it applies them in order and, when something visible changed, publishes a
//! new routing table by atomic swap. Nothing else mutates routing state, so there are no locks
//! on the request path. This node's own containers also go out as a feed of changes, which the
//! cluster port streams to the other nodes.
//!
//! The registry decides and returns effects (start or stop a container's checks); the shell in
//! [`Registry::run`] carries them out, so the decisions are tested without tasks or Docker.
//!
//! `entry` holds one local container, `passive` what proxy failures do, `remote` the other
//! nodes' containers, `publish` the building of the table, `effect` what the shell does,
//! `overrides` and `control` what operators set at runtime, `events` the recent changes the
//! dashboard shows.
mod control;
mod effect;
mod entry;
pub mod events;
pub mod overrides;
mod passive;
mod publish;
mod remote;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::SystemTime,
};

use arc_swap::ArcSwap;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{info, warn};

pub use self::{
    control::{Control, ControlError, ControlMessage, ControlReply},
    effect::Effect,
    entry::{ContainerView, HistoryItem},
    remote::PeerEvent,
};
use self::{effect::Checkers, entry::Entry, remote::RemoteNodes};
use self::{events::EventLog, overrides::Overrides};
use crate::{
    cidr::Cidr,
    cluster::wire::SharedContainer,
    discovery::{ContainerInfo, DockerHandle, Update, short},
    health::{BackendHealth, BackendState, ProbeTracker},
    host_addrs, labels,
    probe::{self, ProbeOutcome},
    table::{BackendStats, RouteKey, RoutingTable},
};

/// Everything the registry hears.
#[derive(Debug)]
pub enum Message {
    Discovery(Update),
    /// The addresses of the host's interfaces changed (`host_addrs`).
    HostAddresses(Vec<Cidr>),
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
    ViewContainers(oneshot::Sender<Vec<ContainerView>>),
    /// Who this node is in its Swarm (cluster mode).
    OwnNode {
        node_id: String,
        addr: IpAddr,
    },
    /// About another node of the cluster.
    Peer(PeerEvent),
    /// The cluster port subscribes to this node's containers.
    SubscribeLocal(oneshot::Sender<LocalFeed>),
    /// An operator's override or question (admin API, `router-agent ctl`).
    Control(ControlMessage),
}

/// This node's containers, for the other nodes' agents: what is there now, and every change
/// after it (in order; a subscriber that falls behind the channel starts over).
#[derive(Debug)]
pub struct LocalFeed {
    pub containers: Vec<SharedContainer>,
    pub cidrs: Vec<Cidr>,
    pub changes: broadcast::Receiver<LocalChange>,
}

#[derive(Clone, Debug)]
pub enum LocalChange {
    Upsert(SharedContainer),
    Remove(String),
    Cidrs(Vec<Cidr>),
}

/// Changes a slow subscriber may lag behind before it must start over with a snapshot.
const FEED_CAPACITY: usize = 4096;

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
    /// Recent container events, for the dashboard.
    pub events: EventLog,
    /// Operators' overrides by container name, for `/api/routes`.
    pub overrides: ArcSwap<std::collections::BTreeMap<String, overrides::Override>>,
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
            events: EventLog::default(),
            overrides: ArcSwap::default(),
        }
    }

    pub fn is_internal(&self, ip: IpAddr) -> bool {
        self.internal_cidrs.load().iter().any(|c| c.contains(ip))
    }
}

/// What the registry is told once, at start.
pub struct RegistrySettings {
    pub default_domain: String,
    /// Derive the internal CIDRs from the Docker networks (and the cluster's nodes).
    pub auto_cidrs: bool,
    /// Requests in flight per backend container, when limited.
    pub backend_max_connections: Option<usize>,
    /// Operators' overrides, as loaded from the state file.
    pub overrides: Overrides,
}

pub struct Registry {
    settings: RegistrySettings,
    docker: DockerHandle,
    sender: mpsc::UnboundedSender<Message>,
    published: Arc<Published>,
    /// This node's containers.
    containers: HashMap<String, Entry>,
    /// The other nodes' containers (cluster mode).
    remote: RemoteNodes,
    /// This node's Swarm id and address (cluster mode).
    own_node: Option<(String, IpAddr)>,
    /// Subnets of this node's Docker networks.
    local_cidrs: Vec<Cidr>,
    /// The host's own addresses, one range each (with `auto_cidrs` only).
    host_cidrs: Vec<Cidr>,
    cursors: HashMap<RouteKey, (Arc<AtomicUsize>, Arc<crate::table::RouteStats>)>,
    next_generation: u64,
    /// Until the agent is ready: the containers whose first check is still to report.
    startup: Startup,
    /// Local containers whose shared view changed in the current batch.
    dirty: HashSet<String>,
    local_changes: broadcast::Sender<LocalChange>,
    /// What the current batch asks the shell to do, in order.
    effects: Vec<Effect>,
    /// Operators' overrides by container name (taken from the settings).
    overrides: Overrides,
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
        mut settings: RegistrySettings,
        docker: DockerHandle,
        sender: mpsc::UnboundedSender<Message>,
        published: Arc<Published>,
    ) -> Self {
        let host_cidrs = if settings.auto_cidrs {
            let cidrs = host_addrs::read();
            info!(addresses = %host_addrs::list(&cidrs), "the host's own addresses (internal clients)");
            cidrs
        } else {
            Vec::new()
        };
        let overrides = std::mem::take(&mut settings.overrides);
        published.overrides.store(Arc::new(overrides.snapshot()));
        Self {
            overrides,
            host_cidrs,
            settings,
            docker,
            sender,
            published,
            containers: HashMap::new(),
            remote: RemoteNodes::default(),
            own_node: None,
            local_cidrs: Vec::new(),
            cursors: HashMap::new(),
            next_generation: 0,
            startup: Startup::BeforeSync,
            dirty: HashSet::new(),
            local_changes: broadcast::channel(FEED_CAPACITY).0,
            effects: Vec::new(),
        }
    }

    /// Applies messages until every sender is gone, publishing after each batch that changed
    /// something, and carries out the effects each batch returns.
    pub async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Message>) {
        let mut checkers = Checkers::new(self.docker.clone(), self.sender.clone());
        while let Some(message) = inbox.recv().await {
            let mut batch = vec![message];
            while let Ok(message) = inbox.try_recv() {
                batch.push(message);
            }
            for effect in self.handle(batch) {
                checkers.carry_out(effect);
            }
        }
    }

    /// Applies a batch of messages in order, publishes if anything visible changed, and
    /// returns what the shell must do.
    pub fn handle(&mut self, batch: impl IntoIterator<Item = Message>) -> Vec<Effect> {
        let mut changed = false;
        for message in batch {
            changed |= self.apply(message);
        }
        self.send_local_changes();
        if changed {
            self.publish();
        }
        std::mem::take(&mut self.effects)
    }

    /// Returns whether the published state must change.
    fn apply(&mut self, message: Message) -> bool {
        match message {
            Message::Discovery(update) => self.apply_update(update),
            Message::HostAddresses(cidrs) => self.set_host_cidrs(cidrs),
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
            // The recovery check ended with this report.
            Message::Recovered { id, generation } => self.with_current(&id, generation, |entry| {
                entry.health.passive_down = false;
                entry.remember("accepts connections again".into());
            }),
            Message::ViewContainers(reply) => {
                let _ = reply.send(self.views());
                false
            }
            Message::OwnNode { node_id, addr } => {
                info!(node = %node_id, %addr, "this node in the Swarm");
                self.own_node = Some((node_id, addr));
                true
            }
            Message::Peer(event) => self.remote.apply(
                event,
                &self.settings.default_domain,
                self.settings.backend_max_connections,
            ),
            Message::SubscribeLocal(reply) => {
                let _ = reply.send(LocalFeed {
                    containers: self
                        .containers
                        .values()
                        .map(|e| e.shared(self.overrides.get(&e.info.name)))
                        .collect(),
                    cidrs: self.local_cidrs.clone(),
                    changes: self.local_changes.subscribe(),
                });
                false
            }
            Message::Control(message) => self.control(message),
        }
    }

    /// Remembers the host's addresses; reports whether they changed.
    fn set_host_cidrs(&mut self, cidrs: Vec<Cidr>) -> bool {
        if !self.settings.auto_cidrs || cidrs == self.host_cidrs {
            return false;
        }
        info!(addresses = %host_addrs::list(&cidrs), "the host's own addresses changed (internal clients)");
        self.host_cidrs = cidrs;
        true
    }

    /// Sends the batch's changes of local containers to the other nodes' agents.
    fn send_local_changes(&mut self) {
        for id in std::mem::take(&mut self.dirty) {
            let change = match self.containers.get(&id) {
                Some(entry) => {
                    LocalChange::Upsert(entry.shared(self.overrides.get(&entry.info.name)))
                }
                None => LocalChange::Remove(id),
            };
            // No subscriber is fine: single-host mode, or no peer connected yet.
            let _ = self.local_changes.send(change);
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
        self.note_transition(id, before)
    }

    /// Logs and remembers a change of the entry's state; returns whether there was one.
    fn note_transition(&mut self, id: &str, before: BackendState) -> bool {
        let Some(entry) = self.containers.get_mut(id) else {
            return false;
        };
        let after = entry.health.state();
        if before == after {
            return false;
        }
        info!(container = %entry.info.name, id = %short(&entry.info.id), "backend {before:?} -> {after:?}");
        let event = format!("state {before:?} -> {after:?}").to_lowercase();
        self.published.events.push(&entry.info.name, event.clone());
        entry.remember(event);
        self.dirty.insert(id.to_owned());
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
                if cidrs != self.local_cidrs {
                    self.local_cidrs = cidrs;
                    let _ = self
                        .local_changes
                        .send(LocalChange::Cidrs(self.local_cidrs.clone()));
                }
                // A network created or removed adds or removes a host address (its gateway):
                // read them again now rather than at the next poll.
                if self.settings.auto_cidrs {
                    self.set_host_cidrs(host_addrs::read());
                }
                // The internal ranges change, not the routes: no new table needed, but the
                // ranges are published with one.
                true
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
        let id = info.id.clone();
        if let Some(entry) = self.containers.get_mut(&id) {
            if entry.info.address == info.address && entry.info.labels == info.labels {
                // Same run, same place: only the descriptive parts may have changed.
                let changed = entry.info.name != info.name;
                entry.info = info;
                if changed {
                    self.dirty.insert(id);
                }
                return changed;
            }
            // New address (network change): same health, new checks against the new address.
            let old = entry.info.address;
            entry.remember(format!("address {old:?} -> {:?}", info.address));
            entry.info = info;
            self.restart_checker(&id);
            self.dirty.insert(id);
            return true;
        }
        let spec = labels::parse(&info.labels, &self.settings.default_domain);
        if let Err(errors) = &spec {
            for error in errors {
                warn!(container = %info.name, id = %short(&info.id), "{error}; container not routed");
            }
        }
        if spec.is_ok() && info.address.is_none() {
            warn!(container = %info.name, id = %short(&info.id), "no IPv4 address reachable from this node; container not routed");
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
            history: VecDeque::new(),
            first_check_due_at_once: false,
        };
        self.published.events.push(
            &entry.info.name,
            match &entry.spec {
                Ok(_) => "discovered".into(),
                Err(errors) => format!(
                    "discovered with {} label error(s): not routed",
                    errors.len()
                ),
            },
        );
        match &entry.spec {
            Ok(_) => entry.remember("discovered".into()),
            Err(errors) => {
                for e in errors.clone() {
                    entry.remember(format!("label error: {e}"));
                }
            }
        }
        self.containers.insert(id.clone(), entry);
        self.restart_checker(&id);
        self.dirty.insert(id);
        true
    }

    /// Starts the probe of the entry (replacing any checker), if it has a probe; stops its
    /// checks otherwise.
    fn restart_checker(&mut self, id: &str) {
        self.next_generation += 1;
        let generation = self.next_generation;
        let Some(entry) = self.containers.get_mut(id) else {
            return;
        };
        entry.generation = generation;
        let (Some(spec), Some(ip)) = (entry.probe_spec().cloned(), entry.info.address) else {
            self.effects.push(Effect::StopChecks { id: id.to_owned() });
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
        self.effects.push(Effect::StartProbe {
            target: probe::ProbeTarget {
                container_id: id.to_owned(),
                generation,
                ip,
            },
            spec,
            first_delay,
        });
    }

    fn remove(&mut self, id: &str, why: &str) -> bool {
        // A container gone before its first check does not hold readiness back.
        self.first_check_reported(id);
        let Some(entry) = self.containers.remove(id) else {
            return false;
        };
        info!(container = %entry.info.name, id = %short(id), "container removed: {why}");
        self.effects.push(Effect::StopChecks { id: id.to_owned() });
        self.published
            .events
            .push(&entry.info.name, format!("removed: {why}"));
        self.dirty.insert(id.to_owned());
        true
    }

    /// Every container as the admin API shows it, sorted by name: this node's, then, in a
    /// cluster, the other nodes'.
    fn views(&self) -> Vec<ContainerView> {
        let mut local: Vec<&Entry> = self.containers.values().collect();
        local.sort_by(|a, b| (&a.info.name, &a.info.id).cmp(&(&b.info.name, &b.info.id)));
        let mut views: Vec<ContainerView> = local
            .into_iter()
            .map(|e| e.view(self.overrides.get(&e.info.name)))
            .collect();
        let mut remote: Vec<ContainerView> = self
            .remote
            .nodes
            .iter()
            .flat_map(|(node_id, node)| {
                node.containers.values().map(move |entry| {
                    ContainerView::remote(node_id, &entry.shared, &entry.spec, node.reachable)
                })
            })
            .collect();
        remote.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        views.extend(remote);
        views
    }
}

#[cfg(test)]
mod tests;
