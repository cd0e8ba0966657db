//! The kernel half of the data path: an `sk_skb` stream verdict program that moves the bytes of
//! offloaded tunnels (WebSocket after `101`, `tcp://` routes) from one socket to its peer without
//! waking userspace.
//!
//! The agent puts both sockets of a tunnel into `PEERS` (redirect destinations, no program),
//! records each socket's peer in `TUNNELS`, then puts both into `SOCKHASH`, where this program
//! judges their incoming bytes. A socket without a `TUNNELS` entry is passed to its own receive
//! queue, where userspace reads it as usual.
//!
//! Retransmissions that overlap bytes already received: TCP queues such a segment whole (its
//! head repeats bytes that came before) and leaves skipping the repeated part to the reader,
//! which `tcp_recvmsg` does from `copied_seq`. The sockmap reader (`tcp_read_skb`) does not: it
//! hands every queued skb whole to this program. Under load (drops, then retransmissions cut
//! differently from the first transmission) a tunnel then delivered tens of KiB twice. So the
//! program remembers, per socket, the sequence number just past the last byte it judged, and
//! cuts off the head of any skb that starts before it.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action,
    helpers::{bpf_probe_read_kernel, generated::bpf_get_socket_cookie},
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use router_common::{
    MAX_KERNEL_BACKLOG, TunnelEntry,
    maps::{BPF_F_NO_PREALLOC, MAX_OFFLOADED_SOCKETS},
};

// Sizes are placeholders: the agent sets every map's max entries at load, from its connection
// limit (`router_common::maps`).
#[map]
static SOCKHASH: SockHash<u64> = SockHash::with_max_entries(MAX_OFFLOADED_SOCKETS, 0);

#[map]
static PEERS: SockHash<u64> = SockHash::with_max_entries(MAX_OFFLOADED_SOCKETS, 0);

// Hash maps allocate their entries on insert rather than all at creation: preallocated, these
// two held 14 MiB of kernel memory per agent for tunnels that mostly never exist.
#[map]
static TUNNELS: HashMap<u64, TunnelEntry> =
    HashMap::with_max_entries(MAX_OFFLOADED_SOCKETS, BPF_F_NO_PREALLOC);

#[map]
static DRAINED: HashMap<u64, u64> =
    HashMap::with_max_entries(MAX_OFFLOADED_SOCKETS, BPF_F_NO_PREALLOC);

/// Non-zero: cut overlapping retransmissions (set by the agent at load; zero only to show the
/// defect, `ROUTER_EXPERIMENT_KEEP_OVERLAPS`).
#[unsafe(no_mangle)]
static TRIM_OVERLAPS: u8 = 1;

/// Offset of `cb` in the kernel's `struct sk_buff` on 64-bit kernels (unchanged since 4.x: two
/// list pointers and a device pointer, the socket, the timestamp). A TCP skb keeps its
/// `struct tcp_skb_cb` there, which starts with `seq` and `end_seq`.
const SKB_CB_OFFSET: usize = 40;

/// The most `bpf_skb_adjust_room` removes from an `sk_skb` in one call.
const MAX_ADJUST: u32 = 0xfff;
/// Bound on the calls that cut one overlap: 32 x 4095 bytes covers any skb of 64 KiB
/// (the largest loopback and GRO build without BIG TCP) twice over.
const MAX_ADJUST_CALLS: u32 = 32;

/// `seq` and `end_seq` of `struct tcp_skb_cb`.
#[repr(C)]
#[derive(Clone, Copy)]
struct SeqRange {
    seq: u32,
    end_seq: u32,
}

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
    let Some(len) = cut_overlap(ctx, entry, len) else {
        // Every byte of it was judged before.
        return Ok(sk_action::SK_DROP);
    };
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

/// Checks the skb against the sequence number just past the last byte judged on this socket,
/// cuts off a head that repeats judged bytes, and returns the length left (`None`: nothing
/// new in it at all).
fn cut_overlap(ctx: &SkBuffContext, entry: &mut TunnelEntry, len: u32) -> Option<u32> {
    let Some(range) = seq_range(ctx, len) else {
        entry.unchecked += 1;
        return Some(len);
    };
    let end = range.seq.wrapping_add(len);
    if entry.seq_known == 0 {
        entry.seq_known = 1;
        entry.next_seq = end;
        return Some(len);
    }
    let overlap = entry.next_seq.wrapping_sub(range.seq);
    // Serial number arithmetic: the skb starts before next_seq when the difference, read as
    // signed, is positive.
    if overlap == 0 || overlap.cast_signed() < 0 {
        entry.next_seq = end;
        return Some(len);
    }
    entry.overlaps += 1;
    // SAFETY: a plain read of a global the loader may have set; never written here.
    if unsafe { core::ptr::read_volatile(&raw const TRIM_OVERLAPS) } == 0 {
        entry.next_seq = end;
        return Some(len);
    }
    if overlap >= len {
        entry.overlap_bytes += u64::from(len);
        return None;
    }
    let mut left = overlap;
    for _ in 0..MAX_ADJUST_CALLS {
        if left == 0 {
            break;
        }
        let step = left.min(MAX_ADJUST);
        if ctx.adjust_room(-(step.cast_signed()), 0, 0).is_err() {
            break;
        }
        left -= step;
    }
    let cut = overlap - left;
    entry.overlap_bytes += u64::from(cut);
    entry.next_seq = end;
    Some(len - cut)
}

/// The skb's TCP sequence range, read from the kernel's `sk_buff` (the program's context is
/// that `sk_buff`). `None` unless the range spans exactly the skb's bytes (plus one for a FIN):
/// anything else means the layout is not the expected one, and nothing is cut.
fn seq_range(ctx: &SkBuffContext, len: u32) -> Option<SeqRange> {
    let cb = ctx
        .as_ptr()
        .cast::<u8>()
        .wrapping_add(SKB_CB_OFFSET)
        .cast::<SeqRange>();
    // SAFETY: bpf_probe_read_kernel copies 8 bytes from kernel memory and fails cleanly on a
    // bad address; the pointer is inside the live sk_buff this program was invoked with.
    let range = unsafe { bpf_probe_read_kernel(cb) }.ok()?;
    let span = range.end_seq.wrapping_sub(range.seq);
    (span == len || span == len + 1).then_some(range)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
