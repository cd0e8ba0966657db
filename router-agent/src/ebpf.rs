//! The kernel half, from userspace: load `router-ebpf`, attach the stream verdict program to the
//! sockhash, and hold the maps the data path programs.
//!
//! Loading can fail for reasons the user may not control (no CAP_BPF, old kernel, locked-down
//! host). The router then logs one line saying so and forwards everything in userspace.
use std::sync::Mutex;

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap, MapData, SockHash},
    programs::SkSkb,
};
use router_common::{TunnelEntry, maps, programs};

/// The loaded programs and maps; dropping it detaches everything.
pub struct KernelOffload {
    /// Owns the program and its attachment.
    _ebpf: Ebpf,
    pub sockhash: Mutex<SockHash<MapData, u64>>,
    pub tunnels: Mutex<HashMap<MapData, u64, TunnelEntry>>,
}

impl KernelOffload {
    pub fn load() -> anyhow::Result<Self> {
        let mut ebpf = Ebpf::load(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/router"
        )))
        .context("loading the eBPF object failed (needs root or CAP_BPF + CAP_NET_ADMIN)")?;
        let sockhash: SockHash<MapData, u64> = ebpf
            .take_map(maps::SOCKHASH)
            .context("the eBPF object has no SOCKHASH map")?
            .try_into()
            .context("SOCKHASH is not a sockhash")?;
        let tunnels: HashMap<MapData, u64, TunnelEntry> = ebpf
            .take_map(maps::TUNNELS)
            .context("the eBPF object has no TUNNELS map")?
            .try_into()
            .context("TUNNELS is not a hash map")?;
        let program: &mut SkSkb = ebpf
            .program_mut(programs::TUNNEL_VERDICT)
            .context("the eBPF object has no tunnel_verdict program")?
            .try_into()
            .context("tunnel_verdict is not an sk_skb program")?;
        program
            .load()
            .context("the kernel refused the sk_skb verdict program")?;
        program
            .attach(sockhash.fd())
            .context("attaching the stream verdict to the sockhash failed")?;
        Ok(Self {
            _ebpf: ebpf,
            sockhash: Mutex::new(sockhash),
            tunnels: Mutex::new(tunnels),
        })
    }
}
