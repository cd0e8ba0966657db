//! Least privilege: once the eBPF programs are loaded, and before any other thread starts, the
//! agent gives up every capability it will not use again, from every set (effective,
//! permitted, inheritable, bounding, ambient), and sets `no_new_privs`. docs/security.md lists
//! the sets and the reasons.
//!
//! What the agent still does after start, and what that needs:
//! - binds listeners: HTTP ones once it is ready (a successor must not take connections
//!   before), a `tcp://` route's whenever the route appears, on the port its label names:
//!   `CAP_NET_BIND_SERVICE` (ports below 1024).
//! - updates eBPF maps (tunnel sockets into the sockhash, socket-level balancing routes) and
//!   attaches the already loaded socket-lb programs to the cgroup through pinned links once
//!   it is ready: from Linux 6.5 a held map or program descriptor is enough; before, with
//!   `kernel.unprivileged_bpf_disabled` set, every `bpf(2)` command needs `CAP_BPF`
//!   (`CAP_SYS_ADMIN` before 5.8, which has no `CAP_BPF`).
//! - everything else (the Docker socket, bpffs pins, cgroupfs, `/proc`) is a file owned by
//!   root, which the agent still is: no `CAP_DAC_OVERRIDE`. Exec probes run through the
//!   Docker API.
//!
//! Capabilities belong to threads, not to the process: [`drop_all_but`] refuses to run once a
//! second thread exists, so every thread (the runtime's, the HTTP workers) inherits the
//! reduced sets.
use std::{
    fmt,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use caps::{CapSet, Capability, CapsHashSet};

/// The effective set [`drop_all_but`] left, for `/healthz`.
static KEPT: OnceLock<Vec<Capability>> = OnceLock::new();

/// The capabilities kept after start by name (`None` before the drop).
pub fn kept_names() -> Option<Vec<String>> {
    KEPT.get()
        .map(|kept| kept.iter().map(ToString::to_string).collect())
}

/// The facts of this kernel that decide what the agent needs after start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// `(major, minor)` of the running kernel.
    pub version: (u32, u32),
    /// `kernel.unprivileged_bpf_disabled` is not 0.
    pub unprivileged_bpf_disabled: bool,
}

impl Kernel {
    /// Reads `/proc/sys/kernel/{osrelease,unprivileged_bpf_disabled}`.
    pub fn read() -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let disabled = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
            // Kernels without the knob let anyone use bpf(2) where it exists.
            .is_ok_and(|v| v.trim() != "0");
        Self {
            version: parse_release(&release).unwrap_or((0, 0)),
            unprivileged_bpf_disabled: disabled,
        }
    }
}

/// `6.18.44-fc-v1272` -> `(6, 18)`.
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The capabilities the agent needs for the rest of its life, given whether any eBPF part
/// loaded (and stays in use) and the kernel.
pub fn needed_after_start(ebpf_loaded: bool, kernel: Kernel) -> Vec<Capability> {
    let mut needed = vec![Capability::CAP_NET_BIND_SERVICE];
    // Linux 6.5 moved the privilege checks of bpf(2) into map and program creation; before,
    // the sysctl gated every command, map updates on descriptors already held included.
    if ebpf_loaded && kernel.version < (6, 5) && kernel.unprivileged_bpf_disabled {
        needed.push(if kernel.version >= (5, 8) {
            Capability::CAP_BPF
        } else {
            Capability::CAP_SYS_ADMIN
        });
    }
    sorted(needed)
}

/// In the kernel's order (capability numbers), as `/proc/<pid>/status` masks list them.
pub fn sorted(caps: impl IntoIterator<Item = Capability>) -> Vec<Capability> {
    let mut caps: Vec<Capability> = caps.into_iter().collect();
    caps.sort_by_key(Capability::index);
    caps.dedup();
    caps
}

/// Why this process cannot load eBPF programs at all, if it holds neither `CAP_BPF` nor
/// `CAP_SYS_ADMIN` (a non-root agent, or root with them dropped from its bounding set).
pub fn lacks_bpf_privilege() -> Option<String> {
    let effective = caps::read(None, CapSet::Effective).ok()?;
    if effective.contains(&Capability::CAP_BPF) || effective.contains(&Capability::CAP_SYS_ADMIN) {
        return None;
    }
    // SAFETY: geteuid cannot fail and takes no argument.
    let uid = unsafe { libc::geteuid() };
    let remedy = if uid == 0 {
        "its bounding set lacks them; give it CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN for the \
         kernel paths"
    } else {
        "run it as root for the kernel paths"
    };
    Some(format!(
        "the agent runs as uid {uid} without CAP_BPF or CAP_SYS_ADMIN, which loading eBPF \
         programs needs (with CAP_NET_ADMIN); {remedy}"
    ))
}

/// What [`drop_all_but`] left, read back from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub effective: Vec<Capability>,
    pub permitted: Vec<Capability>,
    pub bounding: Vec<Capability>,
    /// Needed but not held at start (a non-root agent started without them).
    pub missing: Vec<Capability>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "capabilities kept after start: {}",
            names(&self.effective)
        )?;
        write!(
            f,
            " (effective = permitted; inheritable and ambient empty; no_new_privs set"
        )?;
        if self.bounding == self.permitted {
            write!(f, "; bounding set the same)")?;
        } else {
            write!(
                f,
                "; bounding set {} left as started: shrinking it needs CAP_SETPCAP, and \
                 no_new_privs keeps exec from gaining any of it)",
                names(&self.bounding)
            )?;
        }
        if !self.missing.is_empty() {
            write!(
                f,
                "; not held at start: {} (without CAP_NET_BIND_SERVICE, binding a port below \
                 1024 fails)",
                names(&self.missing)
            )?;
        }
        Ok(())
    }
}

/// `CAP_A, CAP_B`, or `none`.
pub fn names(set: &[Capability]) -> String {
    if set.is_empty() {
        return "none".to_owned();
    }
    set.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits until the agent is down to one thread. A thread that was joined (the eBPF loader's)
/// can still be listed for a moment: `join` returns once it has cleared its tid, before the
/// kernel takes it out of the thread group. A thread still there after two seconds is a real
/// one, and dropping now would leave it its capabilities.
fn wait_for_one_thread() -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let threads = std::fs::read_dir("/proc/self/task")
            .context("reading /proc/self/task")?
            .count();
        if threads == 1 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "capabilities must be dropped while the agent has one thread (it has {threads}): \
                 they are per thread, and threads started before would keep them"
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Reduces every capability set of this (single-threaded) process to `needed` (less what it
/// does not hold), and sets `no_new_privs`. The bounding set shrinks only with `CAP_SETPCAP`
/// (an unprivileged agent keeps the one it was started with; `no_new_privs` makes it moot).
pub fn drop_all_but(needed: &[Capability]) -> anyhow::Result<Report> {
    wait_for_one_thread()?;
    let permitted = read(CapSet::Permitted)?;
    let keep: CapsHashSet = needed
        .iter()
        .copied()
        .filter(|c| permitted.contains(c))
        .collect();
    let can_shrink_bounding = read(CapSet::Effective)?.contains(&Capability::CAP_SETPCAP);
    if can_shrink_bounding {
        for cap in read(CapSet::Bounding)?.difference(&keep) {
            caps::drop(None, CapSet::Bounding, *cap)
                .with_context(|| format!("dropping {cap} from the bounding set"))?;
        }
    }
    // Ambient capabilities exist from Linux 4.3; clearing what does not exist is done.
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, CapSet::Ambient).context("clearing the ambient set")?;
    }
    caps::clear(None, CapSet::Inheritable).context("clearing the inheritable set")?;
    // Effective first: it must stay within permitted at every step.
    caps::set(None, CapSet::Effective, &keep).context("reducing the effective set")?;
    caps::set(None, CapSet::Permitted, &keep).context("reducing the permitted set")?;
    set_no_new_privs()?;
    let report = Report {
        effective: sorted(read(CapSet::Effective)?),
        permitted: sorted(read(CapSet::Permitted)?),
        bounding: sorted(read(CapSet::Bounding)?),
        missing: needed
            .iter()
            .copied()
            .filter(|c| !keep.contains(c))
            .collect(),
    };
    let kept = sorted(keep);
    if report.effective != kept || report.permitted != kept {
        bail!(
            "the kernel kept other capabilities than asked: effective {}, permitted {}, asked {}",
            names(&report.effective),
            names(&report.permitted),
            names(&kept)
        );
    }
    let _ = KEPT.set(report.effective.clone());
    Ok(report)
}

fn read(set: CapSet) -> anyhow::Result<CapsHashSet> {
    caps::read(None, set).with_context(|| format!("reading the {set:?} capability set"))
}

/// `prctl(PR_SET_NO_NEW_PRIVS)`: no exec (setuid, file capabilities) can give the process
/// back what it dropped. Inherited by every thread started after.
fn set_no_new_privs() -> anyhow::Result<()> {
    // SAFETY: prctl with integer arguments only; PR_SET_NO_NEW_PRIVS takes 1 and three zeros.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernel_release() {
        assert_eq!(parse_release("6.18.44-fc-v1272\n"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_release("6.5-rc1"), Some((6, 5)));
        assert_eq!(parse_release(""), None);
        assert_eq!(parse_release("x.y"), None);
    }

    #[test]
    fn keeps_what_the_kernel_checks_after_start() {
        use Capability::{CAP_BPF, CAP_NET_BIND_SERVICE, CAP_SYS_ADMIN};
        let kernel = |version, disabled| Kernel {
            version,
            unprivileged_bpf_disabled: disabled,
        };
        let cases: &[(bool, Kernel, &[Capability])] = &[
            // Descriptors held are enough from 6.5 on.
            (true, kernel((6, 18), true), &[CAP_NET_BIND_SERVICE]),
            (true, kernel((6, 5), true), &[CAP_NET_BIND_SERVICE]),
            // Before, the sysctl gates every bpf(2) command.
            (true, kernel((6, 4), true), &[CAP_NET_BIND_SERVICE, CAP_BPF]),
            (true, kernel((5, 8), true), &[CAP_NET_BIND_SERVICE, CAP_BPF]),
            (
                true,
                kernel((5, 4), true),
                &[CAP_NET_BIND_SERVICE, CAP_SYS_ADMIN],
            ),
            (true, kernel((6, 1), false), &[CAP_NET_BIND_SERVICE]),
            // Without eBPF, only the listeners.
            (false, kernel((5, 4), true), &[CAP_NET_BIND_SERVICE]),
            (false, kernel((6, 18), true), &[CAP_NET_BIND_SERVICE]),
        ];
        for (ebpf, kernel, expected) in cases {
            assert_eq!(
                needed_after_start(*ebpf, *kernel),
                *expected,
                "{ebpf} {kernel:?}"
            );
        }
    }

    #[test]
    fn the_log_line_names_the_sets() {
        let set = |caps: &[Capability]| caps.to_vec();
        let kept = set(&[Capability::CAP_NET_BIND_SERVICE]);
        let root = Report {
            effective: kept.clone(),
            permitted: kept.clone(),
            bounding: kept.clone(),
            missing: Vec::new(),
        };
        assert_eq!(
            root.to_string(),
            "capabilities kept after start: CAP_NET_BIND_SERVICE (effective = permitted; \
             inheritable and ambient empty; no_new_privs set; bounding set the same)"
        );
        let unprivileged = Report {
            effective: Vec::new(),
            permitted: Vec::new(),
            bounding: set(&[Capability::CAP_CHOWN]),
            missing: kept,
        };
        let line = unprivileged.to_string();
        assert!(
            line.starts_with("capabilities kept after start: none"),
            "{line}"
        );
        assert!(
            line.contains("bounding set CAP_CHOWN left as started"),
            "{line}"
        );
        assert!(
            line.contains("not held at start: CAP_NET_BIND_SERVICE"),
            "{line}"
        );
    }
}
