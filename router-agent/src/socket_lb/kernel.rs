//! The pinned half of socket-level balancing: the `socket-lb` object loaded with its maps in
//! bpffs, its programs attached to the cgroup through pinned links (adopted, attached, or
//! replaced in place when they come from another build), the maps read and written, and all of
//! it removed by `router-agent uninstall`.
//!
//! Layout under the pin directory (`pin_path`, default `/sys/fs/bpf/router-agent`):
//!
//! ```text
//! socket-lb/maps-<layout>/SLB_*         the maps; <layout> fingerprints their definitions,
//!                                       so every build with the same maps shares them (and
//!                                       the reverse entries of live connections)
//! socket-lb/cgroup-<id>/connect4        the links, per cgroup (<id>: its inode number)
//! socket-lb/cgroup-<id>/getpeername4
//! ```
//!
//! `SLB_CONFIG` records which build's programs the links run (build id and program ids) and
//! which agent writes the maps now (owner). Pins outlive the agent: programs keep balancing
//! while it restarts, and a new agent adopts them.
use std::{
    fs::{self, File},
    hash::Hasher as _,
    net::{Ipv4Addr, SocketAddrV4},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuHashMap, PerCpuValues},
    programs::{
        CgroupAttachMode, CgroupSockAddr,
        links::{FdLink, PinnedLink},
    },
};
use router_common::socket_lb::{
    BackendEntry, Config, Frontend, MAX_SLOTS, RouteSlots, RouteStats, maps, programs,
};

use super::{
    state::{KernelState, Op, RouteState},
    sys::{self, DirLock},
};
use crate::fast_hash::Fnv1a;

/// The object `router-ebpf` builds for socket-level balancing.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/socket-lb"));

/// Environment variable whose value is mixed into the build id. For tests of the replacement
/// of programs pinned by an older build; nothing else should set it.
pub const BUILD_SALT_ENV: &str = "ROUTER_SOCKET_LB_BUILD_SALT";

/// `BPF_NOEXIST`: insert only if the key is absent.
const NOEXIST: u64 = 1;

/// What [`Kernel::ensure_programs`] found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Programs {
    /// This build's programs were attached already (an agent restart): kept as they are.
    Adopted,
    /// Nothing was attached: attached now.
    Attached,
    /// Programs of another build were attached: replaced in place, with no gap.
    Replaced { old_build: u64 },
}

/// The loaded object, its pinned maps, and where its links go.
pub struct Kernel {
    /// `<pin_path>/socket-lb`.
    root: PathBuf,
    maps_dir: PathBuf,
    cgroup: PathBuf,
    cgroup_id: u64,
    ebpf: Ebpf,
    frontends: HashMap<MapData, Frontend, u32>,
    routes: HashMap<MapData, u32, RouteSlots>,
    backends: HashMap<MapData, u32, BackendEntry>,
    stats: PerCpuHashMap<MapData, u32, RouteStats>,
    config: Array<MapData, Config>,
    /// Hash of the object (and of [`BUILD_SALT_ENV`]).
    pub build: u64,
    /// This agent's random id in `SLB_CONFIG.owner`.
    owner: u64,
}

impl Kernel {
    /// Loads the object with its maps pinned under `pin_path` (reusing maps pinned by an
    /// earlier agent with the same layout). Attaches nothing and writes nothing yet.
    pub fn open(pin_path: &Path, cgroup: &Path) -> anyhow::Result<Self> {
        let root = pin_path.join("socket-lb");
        fs::create_dir_all(&root).with_context(|| {
            format!(
                "cannot create {}; is bpffs mounted (`mount -t bpf bpf /sys/fs/bpf`) and are you \
                 root?",
                root.display()
            )
        })?;
        if !sys::is_bpffs(&root) {
            bail!(
                "{} is not on a BPF filesystem: mount one (`mount -t bpf bpf /sys/fs/bpf`) or set \
                 pin_path to a directory on it",
                root.display()
            );
        }
        // Two agents starting at once must not both create the maps.
        let _lock =
            DirLock::acquire(&root).with_context(|| format!("locking {}", root.display()))?;
        let maps_dir = root.join(format!("maps-{:016x}", layout_fingerprint()?));
        fs::create_dir_all(&maps_dir)
            .with_context(|| format!("cannot create {}", maps_dir.display()))?;
        let mut loader = EbpfLoader::new();
        // No kernel BTF: the programs use no CO-RE relocations.
        loader.btf(None);
        for name in maps::ALL {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        let mut ebpf = loader.load(OBJECT).context(
            "loading the socket-lb eBPF object failed (needs root, or CAP_BPF, CAP_PERFMON and \
             CAP_NET_ADMIN)",
        )?;
        // Loaded now, while the agent holds CAP_BPF and CAP_NET_ADMIN (`privilege` drops them
        // before it is ready); attached once it is ready, which needs only the descriptors
        // (`ensure_programs`).
        for name in [programs::CONNECT4, programs::GETPEERNAME4] {
            sock_addr_program(&mut ebpf, name)?
                .load()
                .with_context(|| format!("the kernel refused the {name} program"))?;
        }
        let cgroup_id = prepare_cgroup(cgroup)?;
        Ok(Self {
            frontends: take_map(&mut ebpf, maps::FRONTENDS)?,
            routes: take_map(&mut ebpf, maps::ROUTES)?,
            backends: take_map(&mut ebpf, maps::BACKENDS)?,
            stats: take_map(&mut ebpf, maps::STATS)?,
            config: take_map(&mut ebpf, maps::CONFIG)?,
            ebpf,
            root,
            maps_dir,
            cgroup: cgroup.to_owned(),
            cgroup_id,
            build: build_id(),
            owner: rand::random::<u64>() | 1,
        })
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Holds every other agent off the pinned maps until dropped.
    pub fn lock(&self) -> anyhow::Result<DirLock> {
        DirLock::acquire(&self.root).with_context(|| format!("locking {}", self.root.display()))
    }

    fn read_config(&self) -> anyhow::Result<Config> {
        self.config
            .get(&0, 0)
            .context("reading the socket-lb config map")
    }

    /// Makes this agent the one that writes the maps (under [`Kernel::lock`]); returns the pid
    /// of the agent that wrote them before, if any.
    pub fn claim(&mut self) -> anyhow::Result<Option<u32>> {
        let mut config = self.read_config()?;
        let previous = (config.owner != 0).then_some(config.owner_pid);
        config.owner = self.owner;
        config.owner_pid = std::process::id();
        config.host_netns_cookie =
            sys::netns_cookie().context("reading this network namespace's cookie")?;
        self.config
            .set(0, config, 0)
            .context("writing the socket-lb config map")?;
        Ok(previous)
    }

    /// `Err(pid)` when another agent claimed the maps since this one did.
    pub fn check_owner(&self) -> anyhow::Result<Result<(), u32>> {
        let config = self.read_config()?;
        Ok(if config.owner == self.owner {
            Ok(())
        } else {
            Err(config.owner_pid)
        })
    }

    /// What the maps hold now.
    pub fn read_state(&self) -> anyhow::Result<KernelState> {
        let mut state = KernelState::default();
        for item in &self.frontends {
            let (frontend, route) = item.context("reading SLB_FRONTENDS")?;
            // Route ids are ports: no agent writes a larger one.
            if let Ok(route) = u16::try_from(route) {
                state.frontends.insert(frontend_addr(frontend), route);
            }
        }
        for item in &self.routes {
            let (port, slots) = item.context("reading SLB_ROUTES")?;
            let Ok(port) = u16::try_from(port) else {
                continue;
            };
            let count = (slots.count as usize).min(MAX_SLOTS);
            state.routes.insert(
                port,
                RouteState {
                    generation: slots.generation,
                    slots: slots.slots[..count].to_vec(),
                },
            );
        }
        for item in &self.backends {
            let (id, backend) = item.context("reading SLB_BACKENDS")?;
            state.backends.insert(id, backend_addr(backend));
        }
        Ok(state)
    }

    /// Writes one planned update.
    pub fn apply(&mut self, op: &Op) -> anyhow::Result<()> {
        let written = match op {
            Op::PutBackend { id, addr } => self.backends.insert(id, backend_entry(*addr), 0),
            Op::PutRoute { port, route } => {
                let zeros = zero_stats()?;
                let mut value = RouteSlots {
                    generation: route.generation,
                    count: route.slots.len().min(MAX_SLOTS) as u32,
                    ..RouteSlots::default()
                };
                for (slot, id) in value.slots.iter_mut().zip(&route.slots) {
                    *slot = *id;
                }
                self.routes
                    .insert(u32::from(*port), value, 0)
                    .and_then(|()| {
                        // The program counts only into an existing entry; keep the old counts.
                        match self.stats.insert(u32::from(*port), zeros, NOEXIST) {
                            Err(e) if !is_errno(&e, libc::EEXIST) => Err(e),
                            _ => Ok(()),
                        }
                    })
            }
            Op::PutFrontend { frontend, route } => {
                self.frontends
                    .insert(frontend_key(*frontend), u32::from(*route), 0)
            }
            Op::DeleteFrontend { frontend } => {
                absent_is_fine(self.frontends.remove(&frontend_key(*frontend)))
            }
            Op::DeleteRoute { port } => {
                absent_is_fine(self.routes.remove(&u32::from(*port)))?;
                absent_is_fine(self.stats.remove(&u32::from(*port)))
            }
            Op::DeleteBackend { id } => absent_is_fine(self.backends.remove(id)),
        };
        written.with_context(|| format!("{op:?}"))
    }

    /// Connects balanced and refused for a route, summed over CPUs.
    pub fn stats(&self, port: u16) -> RouteStats {
        self.stats
            .get(&u32::from(port), 0)
            .map(|values| {
                values
                    .iter()
                    .fold(RouteStats::default(), |sum, v| RouteStats {
                        connects: sum.connects + v.connects,
                        refused: sum.refused + v.refused,
                    })
            })
            .unwrap_or_default()
    }

    /// Makes the links of this cgroup run this build's programs: adopts them if they do,
    /// replaces the program inside each link if they run another build's (`BPF_LINK_UPDATE`:
    /// the hook never goes empty), attaches and pins new links if there are none. Call it with
    /// the maps already filled (under [`Kernel::lock`]).
    pub fn ensure_programs(&mut self) -> anyhow::Result<Programs> {
        let mut config = self.read_config()?;
        let dir = self.root.join(format!("cgroup-{}", self.cgroup_id));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut outcome = Programs::Adopted;
        for (name, file) in [
            (programs::CONNECT4, "connect4"),
            (programs::GETPEERNAME4, "getpeername4"),
        ] {
            let link_path = dir.join(file);
            let attached = linked_program(&link_path);
            let recorded = if name == programs::CONNECT4 {
                &mut config.connect4_prog
            } else {
                &mut config.getpeername4_prog
            };
            if config.build == self.build && attached.is_some_and(|id| id == *recorded) {
                continue;
            }
            let program = sock_addr_program(&mut self.ebpf, name)?;
            *recorded = program.info().context("reading the program's id")?.id();
            if attached.is_some() {
                let link = sys::obj_get(&link_path)
                    .with_context(|| format!("opening the pinned link {}", link_path.display()))?;
                sys::link_update(link.as_fd(), program.fd()?.as_fd())
                    .with_context(|| format!("replacing the program of {}", link_path.display()))?;
                outcome = Programs::Replaced {
                    old_build: config.build,
                };
            } else {
                let cgroup = File::open(&self.cgroup)
                    .with_context(|| format!("opening the cgroup {}", self.cgroup.display()))?;
                // Single: AllowMultiple fails with EINVAL on bpf links here; a link still
                // coexists with other programs on the same cgroup.
                let link_id = program
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .with_context(|| {
                        format!("attaching {name} to the cgroup {}", self.cgroup.display())
                    })?;
                let link: FdLink = program
                    .take_link(link_id)
                    .context("taking the new link")?
                    .try_into()
                    .context("the new link is not a bpf link (kernel older than 5.7?)")?;
                // Dropped at once: the pin alone keeps the program attached.
                let _pinned = link
                    .pin(&link_path)
                    .with_context(|| format!("pinning the link at {}", link_path.display()))?;
                if outcome == Programs::Adopted {
                    outcome = Programs::Attached;
                }
            }
        }
        config.build = self.build;
        self.config
            .set(0, config, 0)
            .context("writing the socket-lb config map")?;
        Ok(outcome)
    }

    /// Removes the links of other cgroups (an earlier `cgroup_path`) and the maps of other
    /// layouts (an earlier build), whose programs nothing runs any more. Returns what it
    /// removed.
    pub fn remove_stale(&self) -> Vec<PathBuf> {
        let ours = [
            self.root.join(format!("cgroup-{}", self.cgroup_id)),
            self.maps_dir.clone(),
        ];
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.is_dir() && !ours.contains(path))
            .flat_map(|dir| remove_pins(&dir))
            .collect()
    }
}

/// Detaches and unpins everything socket-level balancing pinned under `pin_path`; returns the
/// pins it removed. Links detach as their pin goes (no agent holds them open); maps are freed
/// with the last program that uses them.
pub fn uninstall(pin_path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let root = pin_path.join("socket-lb");
    if !root.exists() {
        return Ok(Vec::new());
    }
    let lock = DirLock::acquire(&root).with_context(|| format!("locking {}", root.display()))?;
    let mut removed = Vec::new();
    // Links first, so no program runs on half-removed maps.
    let mut dirs: Vec<PathBuf> = fs::read_dir(&root)
        .with_context(|| format!("reading {}", root.display()))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_dir())
        .collect();
    dirs.sort_by_key(|dir| {
        !dir.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("cgroup-"))
    });
    for dir in dirs {
        removed.extend(remove_pins(&dir));
        if dir.exists() {
            bail!("could not remove everything in {}", dir.display());
        }
    }
    drop(lock);
    fs::remove_dir(&root).with_context(|| format!("removing {}", root.display()))?;
    // The pin directory itself goes too if nothing else lives there.
    let _ = fs::remove_dir(pin_path);
    Ok(removed)
}

/// Unpins every object in `dir`, then removes it; returns the pins removed.
fn remove_pins(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for path in entries.flatten().map(|entry| entry.path()) {
            if fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    let _ = fs::remove_dir(dir);
    removed
}

/// The id of the program a pinned link runs, if the link is there.
fn linked_program(path: &Path) -> Option<u32> {
    let link = PinnedLink::from_pin(path).ok()?;
    FdLink::from(link).info().ok().map(|info| info.program_id())
}

/// Creates the cgroup if it is missing (Docker creates its parent cgroup only with its first
/// container) and returns its id (the inode number, as the kernel reports cgroup ids).
fn prepare_cgroup(cgroup: &Path) -> anyhow::Result<u64> {
    fs::create_dir_all(cgroup).with_context(|| {
        format!(
            "cannot create the cgroup {}; set cgroup_path to a directory of the cgroup2 \
             hierarchy",
            cgroup.display()
        )
    })?;
    if !cgroup.join("cgroup.procs").exists() {
        bail!(
            "{} is not a cgroup2 directory (no cgroup.procs): set cgroup_path to one under the \
             cgroup2 mount",
            cgroup.display()
        );
    }
    Ok(fs::metadata(cgroup)
        .with_context(|| format!("reading {}", cgroup.display()))?
        .ino())
}

/// Hash of the object: another build (other programs) has another id.
fn build_id() -> u64 {
    let mut hasher = Fnv1a::default();
    hasher.write(OBJECT);
    if let Ok(salt) = std::env::var(BUILD_SALT_ENV) {
        hasher.write(salt.as_bytes());
    }
    hasher.finish()
}

/// Hash of the definitions of the maps (name, type, key and value size, entries, flags):
/// builds that agree on it can share pinned maps.
fn layout_fingerprint() -> anyhow::Result<u64> {
    let object = aya_obj::Object::parse(OBJECT).context("parsing the socket-lb object")?;
    let mut hasher = Fnv1a::default();
    for name in maps::ALL {
        let map = object
            .maps
            .get(name)
            .with_context(|| format!("the socket-lb object has no {name} map"))?;
        hasher.write(name.as_bytes());
        for value in [
            map.map_type(),
            map.key_size(),
            map.value_size(),
            map.max_entries(),
            map.map_flags(),
        ] {
            hasher.write(&value.to_le_bytes());
        }
    }
    Ok(hasher.finish())
}

fn sock_addr_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut CgroupSockAddr> {
    ebpf.program_mut(name)
        .with_context(|| format!("the socket-lb object has no {name} program"))?
        .try_into()
        .with_context(|| format!("{name} is not a cgroup sock_addr program"))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    ebpf.take_map(name)
        .with_context(|| format!("the socket-lb object has no {name} map"))?
        .try_into()
        .with_context(|| format!("{name} has an unexpected map type"))
}

fn zero_stats() -> anyhow::Result<PerCpuValues<RouteStats>> {
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("reading {what}: {e}"))?;
    PerCpuValues::try_from(vec![RouteStats::default(); cpus]).context("per-CPU counters")
}

fn is_errno(error: &MapError, errno: i32) -> bool {
    matches!(error, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(errno))
}

fn absent_is_fine(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
        other => other,
    }
}

// The maps hold addresses as `bpf_sock_addr` does: network order read as native integers.

fn frontend_key(addr: SocketAddrV4) -> Frontend {
    Frontend {
        ip4: u32::from_ne_bytes(addr.ip().octets()),
        port: addr.port().to_be(),
        pad: 0,
    }
}

fn frontend_addr(key: Frontend) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(key.ip4.to_ne_bytes()),
        u16::from_be(key.port),
    )
}

fn backend_entry(addr: SocketAddrV4) -> BackendEntry {
    BackendEntry {
        ip4: u32::from_ne_bytes(addr.ip().octets()),
        port: addr.port().to_be(),
        pad: 0,
    }
}

fn backend_addr(entry: BackendEntry) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(entry.ip4.to_ne_bytes()),
        u16::from_be(entry.port),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_stored_as_the_hook_sees_them() {
        let addr: SocketAddrV4 = "198.18.0.1:16379".parse().unwrap();
        let key = frontend_key(addr);
        // In memory: the bytes of the address and port exactly as on the wire.
        assert_eq!(key.ip4.to_ne_bytes(), [198, 18, 0, 1]);
        assert_eq!(key.port.to_ne_bytes(), 16379u16.to_be_bytes());
        assert_eq!(frontend_addr(key), addr);
        assert_eq!(backend_addr(backend_entry(addr)), addr);
    }

    #[test]
    fn the_embedded_object_has_what_the_agent_opens() {
        assert_ne!(layout_fingerprint().unwrap(), 0);
        let object = aya_obj::Object::parse(OBJECT).unwrap();
        for name in [programs::CONNECT4, programs::GETPEERNAME4] {
            assert!(object.programs.contains_key(name), "{name}");
        }
    }
}
