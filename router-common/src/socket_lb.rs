//! Socket-level balancing of `tcp://` routes: the maps shared by the `cgroup/connect4` and
//! `cgroup/getpeername4` programs (`router-ebpf`, object `socket-lb`) and the agent.
//!
//! Addresses and ports are kept exactly as the kernel hands them to the programs in
//! `bpf_sock_addr`: `user_ip4` is the IPv4 address in network order read as a native `u32`
//! (`u32::from_ne_bytes(octets)`), `user_port` the port in network order (`port.to_be()`).
//! Neither side converts on the hot path.

/// Names of the maps in the `socket-lb` object (also their pin names in bpffs).
pub mod maps {
    /// `SLB_FRONTENDS`: [`super::Frontend`] -> route id (`u32`, the route's listen port). One
    /// entry per local address the router listens on, per `tcp://` route.
    pub const FRONTENDS: &str = "SLB_FRONTENDS";
    /// `SLB_ROUTES`: route id (`u32`) -> [`super::RouteSlots`], the route's backend slots.
    /// Created with `BPF_F_NO_PREALLOC`: an update swaps the whole value in under RCU, so a
    /// connect reads either the old slot list or the new one, never a mix.
    pub const ROUTES: &str = "SLB_ROUTES";
    /// `SLB_BACKENDS`: backend id (`u32`) -> [`super::BackendEntry`].
    pub const BACKENDS: &str = "SLB_BACKENDS";
    /// `SLB_REVERSE`: socket cookie (`u64`) -> [`super::ReverseEntry`], an LRU map: there is no
    /// hook at close, so entries of closed sockets are evicted by newer ones.
    pub const REVERSE: &str = "SLB_REVERSE";
    /// `SLB_STATS`: route id (`u32`) -> [`super::RouteStats`], per CPU. The agent creates the
    /// entry with the route; the program only counts into an existing one.
    pub const STATS: &str = "SLB_STATS";
    /// `SLB_CONFIG`: one [`super::Config`] at index 0.
    pub const CONFIG: &str = "SLB_CONFIG";
    /// Every map of the object, in the order the agent opens them.
    pub const ALL: [&str; 6] = [FRONTENDS, ROUTES, BACKENDS, REVERSE, STATS, CONFIG];
}

/// Names of the programs in the `socket-lb` object.
pub mod programs {
    pub const CONNECT4: &str = "slb_connect4";
    pub const GETPEERNAME4: &str = "slb_getpeername4";
}

/// Frontends: local addresses times `tcp://` route ports.
pub const MAX_FRONTENDS: u32 = 16_384;
/// `tcp://` routes served in the kernel at once.
pub const MAX_ROUTES: u32 = 4_096;
/// Distinct backend addresses over all routes.
pub const MAX_BACKENDS: u32 = 16_384;
/// Slots of one route. Weights become repeated slots (as in Cilium), scaled down to fit.
pub const MAX_SLOTS: usize = 256;
/// Sockets whose peer address `getpeername` translates back (least recently used evicted).
pub const MAX_REVERSE: u32 = 65_536;

/// A route's frontend: a local address and the route's port, as `connect()` names them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// `user_ip4`: network order, read as a native `u32`.
    pub ip4: u32,
    /// `user_port`: network order.
    pub port: u16,
    /// Always 0: hash keys compare every byte.
    pub pad: u16,
}

/// A backend's address, in the same representation as [`Frontend`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendEntry {
    pub ip4: u32,
    pub port: u16,
    pub pad: u16,
}

/// A route's backend slots: `count` backend ids in `slots[..count]`, each backend repeated in
/// proportion to its weight. `count == 0` means the route exists but has no `up` backend: the
/// connect is refused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteSlots {
    /// Bumped by the agent each time it rewrites the slot list.
    pub generation: u64,
    pub count: u32,
    pub pad: u32,
    pub slots: [u32; MAX_SLOTS],
}

impl Default for RouteSlots {
    fn default() -> Self {
        Self {
            generation: 0,
            count: 0,
            pad: 0,
            slots: [0; MAX_SLOTS],
        }
    }
}

/// What `getpeername` translates back: the connect went to `frontend` and was sent to
/// `backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseEntry {
    pub frontend: Frontend,
    pub backend: BackendEntry,
}

/// Per route and CPU: connects sent to a backend, and connects refused for want of one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteStats {
    pub connects: u64,
    pub refused: u64,
}

/// Settings and ownership of the pinned maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Network namespace cookie of the agent's namespace (the host's). Loopback frontends are
    /// translated only for sockets in it: in a container's own namespace, 127.0.0.1 is the
    /// container itself.
    pub host_netns_cookie: u64,
    /// Random id of the agent that programs the maps now; another agent that finds its own id
    /// replaced stops writing.
    pub owner: u64,
    /// Build id (hash of the object) of the programs attached now.
    pub build: u64,
    /// Process id of the owner, for messages.
    pub owner_pid: u32,
    /// Kernel ids of the attached programs of `build`: links that run other ids were changed
    /// behind the agent's back and are replaced.
    pub connect4_prog: u32,
    pub getpeername4_prog: u32,
    pub pad: u32,
}

/// Value of `errno` a `connect()` gets when its route has no `up` backend.
pub const REFUSED_ERRNO: i32 = 111; // ECONNREFUSED

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): repr(C), Copy, made of integers with explicit padding fields, so every bit
    // pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::Frontend {}
    unsafe impl aya::Pod for super::BackendEntry {}
    unsafe impl aya::Pod for super::RouteSlots {}
    unsafe impl aya::Pod for super::ReverseEntry {}
    unsafe impl aya::Pod for super::RouteStats {}
    unsafe impl aya::Pod for super::Config {}
}
