//! Types and constants shared by the eBPF programs (`router-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel and userspace read the same bytes.
#![no_std]

pub mod socket_lb;

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
    /// `DRAINED`: socket cookie (`u64`) -> bytes of what the kernel redirected from that socket
    /// which have left through the peer (`u64`). Userspace keeps it current; the verdict program
    /// compares it with `bytes_redirected` to bound what waits in the kernel.
    pub const DRAINED: &str = "DRAINED";
    /// Max entries compiled into the object. The agent replaces it at load with
    /// [`offloaded_sockets_for`] its connection limit.
    pub const MAX_OFFLOADED_SOCKETS: u32 = 65_536;

    /// `BPF_F_NO_PREALLOC`: a hash map allocates each entry on insert, not all at creation.
    pub const BPF_F_NO_PREALLOC: u32 = 1;

    /// Entries each map needs for `max_connections` client connections: every one may become
    /// a tunnel of two sockets (client and backend).
    pub const fn offloaded_sockets_for(max_connections: u32) -> u32 {
        let wanted = max_connections.saturating_mul(2);
        if wanted < 64 { 64 } else { wanted }
    }
}

/// Most bytes of one direction of a tunnel that may wait in the kernel, redirected but not yet
/// sent on by the peer socket. Redirects have no flow control of their own: without this bound a
/// fast sender and a slow receiver would pile up unbounded kernel memory. Past it, the direction
/// is demoted to userspace, where TCP's own backpressure works.
pub const MAX_KERNEL_BACKLOG: u64 = 16 * 1024 * 1024;

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
    /// Bytes the kernel redirected from this socket to the peer.
    pub bytes_redirected: u64,
    /// Non-zero once the backlog bound was hit: from then on the program passes this socket's
    /// bytes to userspace, which forwards them after the redirected ones have drained.
    pub demoted: u64,
    /// Bytes passed to this socket's own receive queue since the demotion. Passed bytes may sit
    /// in a kernel work queue for a moment before a read can see them: at EOF, userspace keeps
    /// reading until it has read this many.
    pub bytes_passed: u64,
    /// TCP sequence number just past the last byte the program judged (valid once
    /// `seq_known` is non-zero).
    pub next_seq: u32,
    pub seq_known: u32,
    /// Segments that began before `next_seq`: a retransmission that overlaps bytes already
    /// judged, which TCP queues whole and the kernel hands whole to the program. The program
    /// cuts the overlap off (see `router-ebpf`).
    pub overlaps: u64,
    /// Bytes cut off those segments (each would otherwise have been delivered twice).
    pub overlap_bytes: u64,
    /// Segments whose sequence numbers could not be read or did not match their length: no
    /// overlap check was possible for them (non-zero means the kernel's `sk_buff` layout is not
    /// the one the program expects).
    pub unchecked: u64,
}

#[cfg(feature = "user")]
// SAFETY: TunnelEntry is repr(C), Copy, and made only of u64 fields: no padding, any bit
// pattern is valid.
unsafe impl aya::Pod for TunnelEntry {}
