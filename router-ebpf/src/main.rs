//! The kernel half of the data path: an `sk_skb` stream verdict program that moves the bytes of
//! offloaded tunnels (WebSocket after `101`, `tcp://` routes) from one socket to its peer without
//! waking userspace.
//!
//! The agent puts both sockets of a tunnel into `PEERS` (redirect destinations, no program),
//! records each socket's peer in `TUNNELS`, then puts both into `SOCKHASH`, where this program
//! judges their incoming bytes. A socket without a `TUNNELS` entry is passed to its own receive
//! queue, where userspace reads it as usual.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action,
    helpers::generated::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use router_common::{MAX_KERNEL_BACKLOG, TunnelEntry, maps::MAX_OFFLOADED_SOCKETS};

#[map]
static SOCKHASH: SockHash<u64> = SockHash::with_max_entries(MAX_OFFLOADED_SOCKETS, 0);

#[map]
static PEERS: SockHash<u64> = SockHash::with_max_entries(MAX_OFFLOADED_SOCKETS, 0);

#[map]
static TUNNELS: HashMap<u64, TunnelEntry> = HashMap::with_max_entries(MAX_OFFLOADED_SOCKETS, 0);

#[map]
static DRAINED: HashMap<u64, u64> = HashMap::with_max_entries(MAX_OFFLOADED_SOCKETS, 0);

#[stream_verdict]
pub fn tunnel_verdict(ctx: SkBuffContext) -> u32 {
    match try_tunnel_verdict(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_tunnel_verdict(ctx: &SkBuffContext) -> Result<u32, u32> {
    let len = ctx.len();
    // A bare FIN arrives as a zero-length skb. It must go nowhere: redirected, it is a hard
    // error in the peer's transmit queue (its sends stop with EPIPE); passed, it is queued behind
    // any bytes waiting to be sent out of this same socket (one queue serves both) and stops
    // that socket's transmit the same way. Dropped, the FIN has still done its work in TCP: the
    // socket is shut for reading, userspace wakes up, reads EOF and passes the half-close on.
    if len == 0 {
        return Ok(sk_action::SK_DROP);
    }
    // SAFETY: the context pointer is the live __sk_buff this program was invoked with.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(entry) = TUNNELS.get_ptr_mut(cookie) else {
        return Ok(sk_action::SK_PASS);
    };
    // SAFETY: get_ptr_mut returned a valid pointer to this socket's map value. The verdict for
    // one socket runs with that socket locked, so plain updates are not raced by another CPU
    // (the BPF target has no atomic fetch_add in core).
    let entry = unsafe { &mut *entry };
    if entry.demoted != 0 {
        entry.bytes_passed += u64::from(len);
        return Ok(sk_action::SK_PASS);
    }
    // SAFETY: a plain read of a u64 map value.
    let drained = unsafe { DRAINED.get(cookie) }.copied().unwrap_or(0);
    let waiting = (entry.bytes_redirected + u64::from(len)).saturating_sub(drained);
    if waiting > MAX_KERNEL_BACKLOG {
        // The peer does not keep up: this byte and all after it go to userspace, in order
        // behind what was redirected (userspace waits for that to drain first).
        entry.demoted = 1;
        entry.bytes_passed += u64::from(len);
        return Ok(sk_action::SK_PASS);
    }
    entry.bytes_redirected += u64::from(len);
    let peer = entry.peer_cookie;
    // Egress redirect (flags 0): the bytes are sent out of the peer socket. The helper answers
    // SK_PASS (redirect) on success and SK_DROP when the peer left the map (it closed); dropping
    // is right then, userspace tears the tunnel down.
    Ok(PEERS.redirect_skb(ctx, peer, 0) as u32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
