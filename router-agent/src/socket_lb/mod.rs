//! Socket-level balancing of `tcp://` routes: a `cgroup/connect4` program sends a client's
//! `connect()` to a route's frontend (a local address at the route's port) straight to one of
//! the route's `up` backends, with no agent socket in between; `cgroup/getpeername4` shows the
//! frontend again. The userspace listener stays, for clients outside the cgroup (other hosts)
//! and for every connect the kernel leaves alone.
//!
//! - `host`: what is covered here: the default cgroup and the frontend addresses.
//! - `slots`: the routing table -> per route: slots, refusal, or userspace (pure).
//! - `state`: the maps' content and the incremental plan to the wanted content (pure).
//! - `kernel`: the pinned object: load, adopt or replace programs, read and write maps,
//!   uninstall.
//! - `sys`: the system calls aya does not wrap.
//!
//! This module's task follows the published routing table (like `proxy::maintain_pool`) and
//! the host's addresses (every [`ADDRESS_REFRESH`]).
mod host;
mod kernel;
mod slots;
mod state;
mod sys;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use router_common::socket_lb::RouteStats;
use serde::Serialize;
use tracing::{debug, info, warn};

pub use self::{
    host::{default_cgroup, default_cgroup_in, frontend_addresses},
    kernel::{BUILD_SALT_ENV, Programs, uninstall},
};
use self::{
    kernel::Kernel,
    slots::RoutePlan,
    state::{KernelState, Op},
};
use crate::{config::SocketLbSettings, registry::Published, table::RoutingTable};

/// How often the local addresses (the frontends of `0.0.0.0` listeners) are read again.
pub const ADDRESS_REFRESH: Duration = Duration::from_secs(5);

/// Why a route is left to userspace when the maps are full.
const MAPS_FULL: &str = "the kernel maps are full";

/// The agent's side of socket-level balancing.
pub struct SocketLb {
    /// IPs of `--listen`: the frontends are these (all local IPv4 addresses for `0.0.0.0`).
    listen: Vec<IpAddr>,
    inner: Mutex<Inner>,
}

struct Inner {
    kernel: Kernel,
    /// What the maps hold (as far as this agent wrote them).
    state: KernelState,
    role: Role,
    /// Whether the links run this build's programs (set by the first pass that got there; a
    /// pass that failed before retries).
    programs_ready: bool,
    /// Routes left to userspace, and why.
    userspace: BTreeMap<u16, &'static str>,
    /// Counts of routes whose map entries were deleted (the metric stays monotonic).
    retired: BTreeMap<u16, RouteStats>,
    addresses: BTreeSet<Ipv4Addr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Loaded; the maps are still another agent's (or nobody's) until the first sync.
    Waiting,
    Owner,
    /// A successor claimed the maps: this agent no longer writes them.
    Superseded {
        by_pid: u32,
    },
}

impl Inner {
    /// Claims the maps on the first pass (reading what they hold as the starting point), and
    /// on later ones checks that no successor claimed them since. Call it under the lock.
    fn hold_ownership(&mut self) -> anyhow::Result<bool> {
        if self.role == Role::Waiting {
            let previous = self.kernel.claim()?;
            self.state = self.kernel.read_state()?;
            self.role = Role::Owner;
            if let Some(pid) = previous {
                info!(
                    "socket-level balancing: took over the pinned maps from agent {pid} ({} \
                     route(s), {} frontend(s))",
                    self.state.routes.len(),
                    self.state.frontends.len()
                );
            }
        } else if let Err(pid) = self.kernel.check_owner()? {
            self.role = Role::Superseded { by_pid: pid };
        }
        Ok(self.role == Role::Owner)
    }

    /// Writes the planned updates; returns the failures. Each failed update is left for the
    /// next pass: any map miss leaves connects to the userspace listener, so the updates
    /// after it are still safe.
    fn write(&mut self, ops: &[Op]) -> Vec<String> {
        let mut failed = Vec::new();
        for op in ops {
            if let Op::DeleteRoute { port } = op {
                let last = self.kernel.stats(*port);
                let retired = self.retired.entry(*port).or_default();
                retired.connects += last.connects;
                retired.refused += last.refused;
            }
            match self.kernel.apply(op) {
                Ok(()) => self.state.apply(op),
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        if !ops.is_empty() {
            debug!(
                updates = ops.len(),
                failed = failed.len(),
                "socket-level balancing: maps updated"
            );
        }
        failed
    }

    /// Attaches, adopts or replaces the programs (once the maps hold this agent's routes) and
    /// removes pins nothing uses any more.
    fn attach_programs(&mut self) -> anyhow::Result<()> {
        let outcome = self.kernel.ensure_programs()?;
        self.programs_ready = true;
        let stale = self.kernel.remove_stale();
        let build = self.kernel.build;
        let what = match outcome {
            Programs::Adopted => {
                format!("adopted the pinned programs of this build ({build:016x})")
            }
            Programs::Attached => format!("attached the programs (build {build:016x})"),
            Programs::Replaced { old_build } => format!(
                "replaced the pinned programs of build {old_build:016x} with this build's \
                 ({build:016x}) in place"
            ),
        };
        info!(
            cgroup = %self.kernel.cgroup().display(),
            "socket-level balancing: {what}; {} tcp route(s) in the kernel, frontends on {:?}",
            self.state.routes.len(),
            self.addresses
        );
        if !stale.is_empty() {
            info!("socket-level balancing: removed stale pins {stale:?}");
        }
        Ok(())
    }
}

/// The routes the kernel should serve (port -> slot list), fitted to the maps, and those left
/// to userspace with the reason.
fn wanted_routes(
    table: &RoutingTable,
    addresses: usize,
) -> (
    BTreeMap<u16, Vec<std::net::SocketAddrV4>>,
    BTreeMap<u16, &'static str>,
) {
    let mut routes = BTreeMap::new();
    let mut userspace = BTreeMap::new();
    for (port, plan) in slots::plan_routes(table) {
        match plan {
            RoutePlan::Kernel { slots } => {
                routes.insert(port, slots);
            }
            RoutePlan::Userspace { reason } => {
                userspace.insert(port, reason);
            }
        }
    }
    for port in state::fit(&mut routes, addresses) {
        userspace.insert(port, MAPS_FULL);
    }
    (routes, userspace)
}

/// One `tcp://` route as `/api/routes` shows it.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct RouteStatus {
    /// Whether connects from the covered cgroup are decided in the kernel.
    pub served: bool,
    /// Version of the route's slot list in the map (bumped by every rewrite).
    pub generation: Option<u64>,
    /// Connects the kernel sent to a backend, and refused for want of one.
    pub connects: u64,
    pub refused: u64,
    /// Why the kernel does not serve it, when it does not.
    pub reason: Option<String>,
}

/// Socket-level balancing as a whole, for `/api/routes`.
#[derive(Serialize, Debug, Clone)]
pub struct Summary {
    pub cgroup: PathBuf,
    pub frontend_addresses: Vec<Ipv4Addr>,
    /// Whether this agent writes the maps (false before it is ready, and once a successor
    /// took over).
    pub owner: bool,
    pub build: String,
}

impl SocketLb {
    /// Loads the programs' object and opens (or creates) the pinned maps. Attaches nothing and
    /// writes nothing until [`SocketLb::run`]: until this agent is ready, the pinned programs
    /// keep serving with what its predecessor wrote.
    pub fn open(settings: &SocketLbSettings, listen: &[SocketAddr]) -> anyhow::Result<Self> {
        let cgroup = match &settings.cgroup_path {
            Some(path) => path.clone(),
            None => default_cgroup()?,
        };
        let kernel = Kernel::open(&settings.pin_path, &cgroup)?;
        let mut listen: Vec<IpAddr> = listen.iter().map(SocketAddr::ip).collect();
        listen.sort_unstable();
        listen.dedup();
        Ok(Self {
            listen,
            inner: Mutex::new(Inner {
                kernel,
                state: KernelState::default(),
                role: Role::Waiting,
                programs_ready: false,
                userspace: BTreeMap::new(),
                retired: BTreeMap::new(),
                addresses: BTreeSet::new(),
            }),
        })
    }

    pub fn cgroup(&self) -> PathBuf {
        self.lock().kernel.cgroup().to_owned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("socket-lb lock")
    }

    /// Takes the maps over and keeps them in step with the routing table and the local
    /// addresses, until a successor takes them over or the agent exits. Start it once the
    /// agent is ready (its table says what it would route).
    pub async fn run(self: Arc<Self>, published: Arc<Published>) {
        let mut versions = published.table_version.subscribe();
        let mut refresh = tokio::time::interval(ADDRESS_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let table = published.table.load_full();
            match self.sync(&table) {
                Ok(Role::Superseded { by_pid }) => {
                    info!(
                        "socket-level balancing: agent {by_pid} took the pinned maps over; this \
                         one no longer writes them"
                    );
                    return;
                }
                Ok(_) => {}
                Err(e) => warn!("socket-level balancing: {e:#}"),
            }
            tokio::select! {
                changed = versions.changed() => if changed.is_err() { return },
                _ = refresh.tick() => {}
            }
        }
    }

    /// One pass: plan from the table and addresses, write what changed. The first pass claims
    /// the maps; the first that has written them attaches, adopts or replaces the programs.
    fn sync(&self, table: &RoutingTable) -> anyhow::Result<Role> {
        let addresses = frontend_addresses(
            &self.listen,
            &sys::local_ipv4_addresses().context("listing the local addresses")?,
        );
        let mut inner = self.lock();
        if let Role::Superseded { .. } = inner.role {
            return Ok(inner.role);
        }
        let _lock = inner.kernel.lock()?;
        if !inner.hold_ownership()? {
            return Ok(inner.role);
        }
        let (routes, userspace) = wanted_routes(table, addresses.len());
        let ops = state::plan(&inner.state, &routes, &addresses);
        let failed = inner.write(&ops);
        inner.userspace = userspace;
        inner.addresses = addresses;
        if !inner.programs_ready {
            inner.attach_programs()?;
        }
        if let Some(first_failure) = failed.first() {
            anyhow::bail!(
                "{} of {} map update(s) failed, first: {first_failure}",
                failed.len(),
                ops.len()
            );
        }
        Ok(inner.role)
    }

    /// How the kernel serves the `tcp://` route on `port`.
    pub fn route_status(&self, port: u16) -> RouteStatus {
        let inner = self.lock();
        let counts = Self::counts(&inner, port);
        let served = inner.role == Role::Owner && inner.programs_ready && inner.state.serves(port);
        let reason = if served {
            None
        } else {
            Some(match inner.role {
                Role::Waiting => "the agent is not ready yet".to_owned(),
                Role::Superseded { by_pid } => format!("agent {by_pid} writes the maps now"),
                Role::Owner if !inner.programs_ready => {
                    "the programs are not attached yet (see the log)".to_owned()
                }
                Role::Owner => inner
                    .userspace
                    .get(&port)
                    .map_or("no local address to serve it on", |r| r)
                    .to_owned(),
            })
        };
        RouteStatus {
            served,
            generation: inner.state.routes.get(&port).map(|r| r.generation),
            connects: counts.connects,
            refused: counts.refused,
            reason,
        }
    }

    fn counts(inner: &Inner, port: u16) -> RouteStats {
        let live = if inner.state.routes.contains_key(&port) {
            inner.kernel.stats(port)
        } else {
            RouteStats::default()
        };
        let retired = inner.retired.get(&port).copied().unwrap_or_default();
        RouteStats {
            connects: live.connects + retired.connects,
            refused: live.refused + retired.refused,
        }
    }

    pub fn summary(&self) -> Summary {
        let inner = self.lock();
        Summary {
            cgroup: inner.kernel.cgroup().to_owned(),
            frontend_addresses: inner.addresses.iter().copied().collect(),
            owner: inner.role == Role::Owner && inner.programs_ready,
            build: format!("{:016x}", inner.kernel.build),
        }
    }

    /// Per `tcp://` route of the table (domain, port): the connects the kernel balanced and
    /// refused, for `/metrics`.
    pub fn route_counts(&self, table: &RoutingTable) -> Vec<(String, u16, u64, u64)> {
        let inner = self.lock();
        let mut ports: Vec<u16> = table.tcp_ports().collect();
        ports.sort_unstable();
        ports
            .into_iter()
            .filter_map(|port| {
                let route = table.tcp_route(port)?;
                let counts = Self::counts(&inner, port);
                Some((route.domain.clone(), port, counts.connects, counts.refused))
            })
            .collect()
    }

    /// tcp routes whose connects the kernel balances now.
    pub fn served_routes(&self) -> usize {
        let inner = self.lock();
        inner
            .state
            .routes
            .keys()
            .filter(|&&port| inner.state.serves(port))
            .count()
    }
}

/// `router-agent uninstall`: removes everything pinned under `pin_path` and says what it
/// removed.
pub fn uninstall_report(pin_path: &Path) -> anyhow::Result<String> {
    let removed = uninstall(pin_path)?;
    Ok(if removed.is_empty() {
        format!(
            "nothing of socket-level balancing is pinned under {}",
            pin_path.display()
        )
    } else {
        let mut report = format!(
            "socket-level balancing uninstalled: its programs are detached and {} pin(s) under {} \
             removed:",
            removed.len(),
            pin_path.display()
        );
        for pin in removed {
            let _ = write!(report, "\n  {}", pin.display());
        }
        report
    })
}
