//! Types and constants shared by the eBPF programs (`router-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel and userspace read the same bytes.
#![no_std]

/// Names and sizes of the maps the agent opens in the loaded object.
pub mod maps {
    /// `SOCKHASH`: socket cookie (`u64`) -> socket. The stream verdict program is attached to
    /// it: every socket inserted here has its incoming bytes judged by the program.
    pub const SOCKHASH: &str = "SOCKHASH";
    /// `PEERS`: socket cookie (`u64`) -> socket, with no program: the destinations of
    /// redirects. Inserting both sockets of a tunnel here first means a redirect never finds
    /// its destination missing, whatever order the sockets then enter `SOCKHASH` in.
    pub const PEERS: &str = "PEERS";
    /// `TUNNELS`: socket cookie (`u64`) -> [`super::TunnelEntry`] for every offloaded socket.
    pub const TUNNELS: &str = "TUNNELS";
    /// Upper bound on offloaded sockets (two per tunnel).
    pub const MAX_OFFLOADED_SOCKETS: u32 = 65_536;
}

/// Names of the programs in the object.
pub mod programs {
    /// The `sk_skb/stream_verdict` program attached to the sockhash.
    pub const TUNNEL_VERDICT: &str = "tunnel_verdict";
}

/// Per offloaded socket: where its incoming bytes go and how many went there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelEntry {
    /// Socket cookie of the peer socket: bytes received here are sent out of that one.
    pub peer_cookie: u64,
    /// Bytes the kernel redirected from this socket to the peer (updated atomically).
    pub bytes_redirected: u64,
}

#[cfg(feature = "user")]
// SAFETY: TunnelEntry is repr(C), Copy, and made only of u64 fields: no padding, any bit
// pattern is valid.
unsafe impl aya::Pod for TunnelEntry {}
