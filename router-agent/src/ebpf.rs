//! The kernel half, from userspace: load `router-ebpf`, attach the stream verdict program to the
//! sockhash, and hand socket pairs to it.
//!
//! Loading can fail for reasons the user may not control (no `CAP_BPF`, old kernel, locked-down
//! host). The router then logs one line saying so and forwards everything in userspace.
use std::{
    io,
    os::fd::{AsRawFd as _, RawFd},
    sync::Mutex,
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, SockHash},
    programs::SkSkb,
};
use router_common::{TunnelEntry, maps, programs};
use tokio::net::TcpStream;

/// The loaded programs and maps; dropping it detaches everything.
pub struct KernelOffload {
    /// Owns the program and its attachment.
    _ebpf: Ebpf,
    maps: Mutex<Maps>,
}

struct Maps {
    /// Sockets whose incoming bytes the verdict program judges.
    sockhash: SockHash<MapData, u64>,
    /// Redirect destinations.
    peers: SockHash<MapData, u64>,
    tunnels: HashMap<MapData, u64, TunnelEntry>,
    drained: HashMap<MapData, u64, u64>,
}

/// Socket cookies of an offloaded pair.
#[derive(Clone, Copy, Debug)]
pub struct OffloadedPair {
    pub client: u64,
    pub backend: u64,
}

impl KernelOffload {
    /// Loads the object with maps sized for `max_connections` client connections (each may
    /// become a tunnel of two sockets) and attaches the verdict program.
    pub fn load(max_connections: usize) -> anyhow::Result<Self> {
        let entries =
            maps::offloaded_sockets_for(u32::try_from(max_connections).unwrap_or(u32::MAX));
        let mut ebpf = load_object(entries)?;
        let sockhash: SockHash<MapData, u64> = take_map(&mut ebpf, maps::SOCKHASH)?;
        let peers: SockHash<MapData, u64> = take_map(&mut ebpf, maps::PEERS)?;
        let tunnels: HashMap<MapData, u64, TunnelEntry> = take_map(&mut ebpf, maps::TUNNELS)?;
        let drained: HashMap<MapData, u64, u64> = take_map(&mut ebpf, maps::DRAINED)?;
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
            maps: Mutex::new(Maps {
                sockhash,
                peers,
                tunnels,
                drained,
            }),
        })
    }

    /// From now on, bytes arriving on either socket leave through the other, in the kernel.
    ///
    /// Order matters (ENVIRONMENT.md traps): both sockets become redirect destinations first,
    /// then each learns its peer, and only then does the verdict program start judging them,
    /// so no redirect ever finds its destination missing. Bytes that arrived before this call
    /// wait in the receive queues and are judged at the next receive ([`kick`]).
    pub fn attach_pair(
        &self,
        client: &TcpStream,
        backend: &TcpStream,
    ) -> io::Result<OffloadedPair> {
        let (client, backend) = (client.as_raw_fd(), backend.as_raw_fd());
        let pair = OffloadedPair {
            client: socket_cookie(client)?,
            backend: socket_cookie(backend)?,
        };
        let mut maps = self.maps.lock().expect("offload maps lock");
        let result = (|| {
            maps.peers.insert(pair.client, client, 0)?;
            maps.peers.insert(pair.backend, backend, 0)?;
            maps.tunnels.insert(
                pair.client,
                TunnelEntry {
                    peer_cookie: pair.backend,
                    ..TunnelEntry::default()
                },
                0,
            )?;
            maps.tunnels.insert(
                pair.backend,
                TunnelEntry {
                    peer_cookie: pair.client,
                    ..TunnelEntry::default()
                },
                0,
            )?;
            maps.sockhash.insert(pair.client, client, 0)?;
            maps.sockhash.insert(pair.backend, backend, 0)
        })();
        if let Err(e) = result {
            maps.remove(pair);
            return Err(io::Error::other(format!(
                "offloading the connection failed: {e}"
            )));
        }
        Ok(pair)
    }

    /// What the kernel did so far with the bytes arriving on the socket with this cookie: how
    /// many it redirected to the peer, whether it demoted the direction to userspace, and how
    /// many it passed to userspace since.
    pub fn direction(&self, cookie: u64) -> TunnelEntry {
        let maps = self.maps.lock().expect("offload maps lock");
        maps.tunnels.get(&cookie, 0).unwrap_or_default()
    }

    /// Tells the verdict program how much of this socket's redirected bytes have left through
    /// the peer, which bounds what may wait in the kernel.
    pub fn set_drained(&self, cookie: u64, drained: u64) {
        let mut maps = self.maps.lock().expect("offload maps lock");
        let _ = maps.drained.insert(cookie, drained, 0);
    }

    /// Takes the pair out of the kernel path; returns the last entries of its two directions
    /// (client to backend, backend to client).
    pub fn detach_pair(&self, pair: OffloadedPair) -> (TunnelEntry, TunnelEntry) {
        let mut maps = self.maps.lock().expect("offload maps lock");
        let entry = |cookie| maps.tunnels.get(&cookie, 0).unwrap_or_default();
        let directions = (entry(pair.client), entry(pair.backend));
        maps.remove(pair);
        directions
    }

    /// Sockets in the sockhash now (the kernel also drops closed sockets by itself).
    pub fn offloaded_sockets(&self) -> usize {
        self.maps
            .lock()
            .expect("offload maps lock")
            .sockhash
            .keys()
            .flatten()
            .count()
    }
}

impl Maps {
    /// Removes every trace of the pair; entries already gone (closed sockets leave the
    /// sockhash on their own) are fine.
    fn remove(&mut self, pair: OffloadedPair) {
        for cookie in [pair.client, pair.backend] {
            let _ = self.sockhash.remove(&cookie);
            let _ = self.tunnels.remove(&cookie);
            let _ = self.drained.remove(&cookie);
            let _ = self.peers.remove(&cookie);
        }
    }
}

/// Loads the object, on a thread that cannot see the kernel's BTF when that can be arranged.
///
/// `EbpfLoader::new()` parses `/sys/kernel/btf/vmlinux` (5.5 MB here) before `.btf(None)` can
/// say it is not wanted: that took the agent's peak RSS from 8 to 24 MiB, and left 2 MiB of
/// heap behind, for nothing (the program uses no CO-RE relocations). The loading thread moves
/// to a mount namespace of its own and covers `/sys/kernel/btf` with an empty tmpfs there;
/// nothing else of the process sees either. Where that is not allowed (no `CAP_SYS_ADMIN`),
/// loading works as before, only with the higher peak.
fn load_object(entries: u32) -> anyhow::Result<Ebpf> {
    let loader = std::thread::Builder::new()
        .name("ebpf-load".into())
        .spawn(move || {
            if let Err(e) = hide_kernel_btf() {
                tracing::debug!(
                    "cannot hide the kernel's BTF from the loader ({e}): it parses it, \
                     about 16 MiB at peak"
                );
            }
            // Only to show the kernel defect the program works around
            // (docs/kernel-findings.md): with this set, overlapping retransmissions are counted
            // but not cut.
            let trim_overlaps =
                u8::from(std::env::var_os("ROUTER_EXPERIMENT_KEEP_OVERLAPS").is_none());
            let mut loader = EbpfLoader::new();
            loader
                .btf(None)
                .override_global("TRIM_OVERLAPS", &trim_overlaps, true);
            for map in [maps::SOCKHASH, maps::PEERS, maps::TUNNELS, maps::DRAINED] {
                loader.map_max_entries(map, entries);
            }
            loader.load(aya::include_bytes_aligned!(concat!(
                env!("OUT_DIR"),
                "/router"
            )))
        })
        .context("starting the eBPF loader thread")?;
    loader
        .join()
        .map_err(|_| anyhow::anyhow!("the eBPF loader thread panicked"))?
        .context("loading the eBPF object failed (needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)")
}

/// Gives the calling thread a mount namespace of its own in which `/sys/kernel/btf` is an empty
/// tmpfs. Only this thread's view changes: `unshare(CLONE_NEWNS)` applies to the calling task,
/// and every mount of the new namespace is made private first, so nothing propagates back.
fn hide_kernel_btf() -> io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: unshare(2) of this thread's mount namespace (and, implied, its fs struct); no
    // pointer is involved.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
    // SAFETY: mount(2) with NUL-terminated literals and null pointers where the call allows
    // them (remount of propagation flags takes no source, type or data).
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    // SAFETY: as above; a tmpfs needs no source and no data.
    check(unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/sys/kernel/btf".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    ebpf.take_map(name)
        .with_context(|| format!("the eBPF object has no {name} map"))?
        .try_into()
        .with_context(|| format!("{name} has an unexpected map type"))
}

/// The kernel's unique id of a socket (`SO_COOKIE`), the key of every map.
pub fn socket_cookie(fd: RawFd) -> io::Result<u64> {
    const SO_COOKIE: libc::c_int = 57;
    socket_option_u64(fd, SO_COOKIE)
}

/// A `SOL_SOCKET` option whose value is a `u64` (the kernel's cookies).
pub fn socket_option_u64(fd: RawFd, name: libc::c_int) -> io::Result<u64> {
    let mut value = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the u64 we own.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}
