//! The few system calls socket-level balancing needs beyond aya: open a pinned object,
//! swap a link's program in place, lock the pin directory between agents, and read the facts
//! of this host (network namespace cookie, local IPv4 addresses, the cgroup2 mount).
use std::{
    ffi::CString,
    fs::File,
    io,
    net::Ipv4Addr,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya_obj::generated::bpf_cmd;

/// `BPF_OBJ_GET`'s part of `union bpf_attr`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    pad: u32,
}

/// `BPF_LINK_UPDATE`'s part of `union bpf_attr`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live, fully initialised repr(C) prefix of `union bpf_attr` for this
    // command, and its size is passed with it; the kernel reads at most that many bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_long,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens the BPF object (map, program, link) pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a pin path"))?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        pad: 0,
    };
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    // SAFETY: a successful BPF_OBJ_GET returns a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program of a link in one step: every hook run after this call runs `program`,
/// every run before ran the old one, and the attachment itself never goes away.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// An exclusive `flock` on a directory, held until dropped: one agent at a time reads or
/// writes the pinned maps (a successor taking over, its predecessor still running).
pub struct DirLock {
    /// Held for its lock, which the kernel releases when the descriptor closes.
    _dir: File,
}

impl DirLock {
    pub fn acquire(dir: &Path) -> io::Result<Self> {
        let file = File::open(dir)?;
        // SAFETY: flock on a descriptor `file` owns; blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { _dir: file })
    }
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14+), the value
/// `bpf_get_netns_cookie` gives a program for a socket in the same namespace.
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    crate::ebpf::socket_option_u64(socket.as_raw_fd(), SO_NETNS_COOKIE)
}

/// Every IPv4 address of this network namespace's interfaces.
pub fn local_ipv4_addresses() -> io::Result<Vec<Ipv4Addr>> {
    let mut addresses: Vec<Ipv4Addr> = if_addrs::get_if_addrs()?
        .iter()
        .filter_map(|interface| match interface.ip() {
            std::net::IpAddr::V4(ip) => Some(ip),
            std::net::IpAddr::V6(_) => None,
        })
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    Ok(addresses)
}

/// Where the cgroup2 hierarchy is mounted, from `/proc/self/mountinfo` text: the first mount
/// of type `cgroup2` (`/sys/fs/cgroup` on a pure v2 host, `/sys/fs/cgroup/unified` on a hybrid
/// v1 + v2 host).
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `<id> <parent> <major:minor> <root> <mount point> <options> [optional...] - <type> ...`
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace()
            .nth(4)
            .map(unescape_octal)
            .map(PathBuf::from)
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(octal) = field.get(i + 1..i + 4)
            && let Ok(value) = u8::from_str_radix(octal, 8)
        {
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `path` is on a BPF filesystem (bpffs), where pins can live.
pub fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct we own from a NUL-terminated path.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(path.as_ptr(), &raw mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_of_hybrid_and_pure_hosts() {
        let hybrid = "\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
33 31 0:28 / /sys/fs/cgroup/cpu rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,cpu";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let escaped = r"35 24 0:30 / /mnt/my\040cgroups rw shared:9 - cgroup2 none rw";
        assert_eq!(
            cgroup2_mount(escaped),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
        let v1_only = "33 31 0:28 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu";
        assert_eq!(cgroup2_mount(v1_only), None);
    }

    #[test]
    fn reads_this_hosts_facts() {
        assert!(netns_cookie().unwrap() != 0);
        let addresses = local_ipv4_addresses().unwrap();
        assert!(addresses.contains(&Ipv4Addr::LOCALHOST), "{addresses:?}");
        assert!(!is_bpffs(Path::new("/")));
    }

    #[test]
    fn the_directory_lock_is_exclusive() {
        let dir = std::env::temp_dir().join(format!("router-dirlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let held = DirLock::acquire(&dir).unwrap();
        let other = File::open(&dir).unwrap();
        // SAFETY: flock on a descriptor we own, without blocking.
        let rc = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(
            rc, -1,
            "a second exclusive lock is refused while the first is held"
        );
        drop(held);
        // SAFETY: as above.
        let rc = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(rc, 0, "and granted once it is released");
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn opening_a_missing_pin_fails_cleanly() {
        let err = obj_get(Path::new("/sys/fs/bpf/router-agent-no-such-pin")).unwrap_err();
        assert!(
            matches!(err.raw_os_error(), Some(libc::ENOENT | libc::EPERM)),
            "{err}"
        );
    }
}
