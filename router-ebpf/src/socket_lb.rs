//! Socket-level balancing of `tcp://` routes (the `socket-lb` object): a client's `connect()`
//! to a route's frontend (a local address at the route's port) is rewritten, before any packet
//! leaves, to one of the route's `up` backends, and `getpeername()` on that socket shows the
//! frontend again. No proxy hop: the backend sees the client's own address.
//!
//! The agent attaches both programs to a cgroup (the Docker parent cgroup by default) and keeps
//! the maps (`router_common::socket_lb`) in step with its routing table. Any miss (not a
//! frontend, a route or backend entry just being replaced) leaves the connect unchanged: it then
//! reaches the agent's userspace listener, which serves the route too.
//!
//! A separate object from the sk_skb tunnel program, so that each has its own maps, its own
//! build id (the agent replaces pinned socket-LB programs only when this object changes) and
//! its own loader.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_F_NO_PREALLOC,
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval,
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap},
    programs::SockAddrContext,
};
use router_common::socket_lb::{
    BackendEntry, Config, Frontend, MAX_BACKENDS, MAX_FRONTENDS, MAX_REVERSE, MAX_ROUTES,
    REFUSED_ERRNO, ReverseEntry, RouteSlots, RouteStats,
};

/// Return values of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const SOCK_STREAM: u32 = 1;

// The hash maps are not preallocated: an update then swaps in a new element under RCU and the
// old one stays intact for a program still reading it (a preallocated element is recycled at
// once and could change under the reader).
#[map]
static SLB_FRONTENDS: HashMap<Frontend, u32> =
    HashMap::with_max_entries(MAX_FRONTENDS, BPF_F_NO_PREALLOC);

#[map]
static SLB_ROUTES: HashMap<u32, RouteSlots> =
    HashMap::with_max_entries(MAX_ROUTES, BPF_F_NO_PREALLOC);

#[map]
static SLB_BACKENDS: HashMap<u32, BackendEntry> =
    HashMap::with_max_entries(MAX_BACKENDS, BPF_F_NO_PREALLOC);

#[map]
static SLB_REVERSE: LruHashMap<u64, ReverseEntry> = LruHashMap::with_max_entries(MAX_REVERSE, 0);

#[map]
static SLB_STATS: PerCpuHashMap<u32, RouteStats> =
    PerCpuHashMap::with_max_entries(MAX_ROUTES, BPF_F_NO_PREALLOC);

#[map]
static SLB_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[cgroup_sock_addr(connect4)]
pub fn slb_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn slb_getpeername4(ctx: SockAddrContext) -> i32 {
    match try_getpeername4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let addr = ctx.sock_addr;
    // SAFETY: `addr` is the live bpf_sock_addr of this call; the verifier checks every field
    // access (4-byte loads of these fields are allowed).
    let (kind, ip4, port) = unsafe { ((*addr).type_, (*addr).user_ip4, (*addr).user_port) };
    // tcp:// routes only: a connected UDP socket to the same address is left alone.
    if kind != SOCK_STREAM {
        return Ok(ALLOW);
    }
    let frontend = Frontend {
        ip4,
        // The port sits in the low 16 bits, in network order.
        port: port as u16,
        pad: 0,
    };
    // SAFETY: a copy of a u32 value of a non-preallocated map (see above).
    let Some(&route) = (unsafe { SLB_FRONTENDS.get(&frontend) }) else {
        return Ok(ALLOW);
    };
    if ip4.to_ne_bytes()[0] == 127 && !in_host_namespace(ctx) {
        return Ok(ALLOW);
    }
    let Some(slots) = SLB_ROUTES.get_ptr(route) else {
        return Ok(ALLOW);
    };
    let stats = SLB_STATS.get_ptr_mut(route);
    // SAFETY: `slots` points at a live element for the rest of this program (RCU).
    let count = unsafe { (*slots).count };
    if count == 0 {
        if let Some(stats) = stats {
            // SAFETY: this CPU's own counter; plain increments are what per-CPU maps are for.
            unsafe { (*stats).refused += 1 };
        }
        // Without this the kernel answers EPERM, which reads as a local policy problem; the
        // truth is that nothing serves the route right now.
        // SAFETY: a helper call without pointers.
        unsafe { bpf_set_retval(-REFUSED_ERRNO) };
        return Ok(REJECT);
    }
    // SAFETY: a helper call without arguments.
    let index = (unsafe { bpf_get_prandom_u32() } % count) as usize;
    // `get` bounds the index for the verifier (count comes from a map value).
    // SAFETY: as above, `slots` is live.
    let Some(&backend_id) = (unsafe { (*slots).slots.get(index) }) else {
        return Ok(ALLOW);
    };
    // SAFETY: a copy of a value of a non-preallocated map.
    let Some(&backend) = (unsafe { SLB_BACKENDS.get(&backend_id) }) else {
        return Ok(ALLOW);
    };
    // SAFETY: writes of the two fields the hook may rewrite, as 4-byte stores.
    unsafe {
        (*addr).user_ip4 = backend.ip4;
        (*addr).user_port = u32::from(backend.port);
    }
    // SAFETY: the context pointer is the live bpf_sock_addr.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A full LRU map evicts the oldest entry; an insert cannot fail for want of room.
    let _ = SLB_REVERSE.insert(&cookie, &ReverseEntry { frontend, backend }, 0);
    if let Some(stats) = stats {
        // SAFETY: this CPU's own counter.
        unsafe { (*stats).connects += 1 };
    }
    Ok(ALLOW)
}

/// Whether the connecting socket lives in the agent's (the host's) network namespace.
fn in_host_namespace(ctx: &SockAddrContext) -> bool {
    let Some(config) = SLB_CONFIG.get(0) else {
        return false;
    };
    // SAFETY: the context pointer is the live bpf_sock_addr.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    config.host_netns_cookie != 0 && cookie == config.host_netns_cookie
}

fn try_getpeername4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let addr = ctx.sock_addr;
    // SAFETY: the context pointer is the live bpf_sock_addr.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a copy of the value; a recycled LRU element would fail the backend check below.
    let Some(&entry) = (unsafe { SLB_REVERSE.get(&cookie) }) else {
        return Ok(ALLOW);
    };
    // SAFETY: as in connect4.
    let (ip4, port) = unsafe { ((*addr).user_ip4, (*addr).user_port) };
    if ip4 == entry.backend.ip4 && port as u16 == entry.backend.port {
        // SAFETY: 4-byte stores of the fields the hook may rewrite.
        unsafe {
            (*addr).user_ip4 = entry.frontend.ip4;
            (*addr).user_port = u32::from(entry.frontend.port);
        }
    }
    Ok(ALLOW)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
