//! The benchmark's own cgroup (cgroup2): while the `tcp-*` scenarios run, this process (the
//! load generator) sits in it, and the `router-socket-lb` contender attaches socket-level
//! balancing there, so that it applies to the benchmark's connects and to nobody else's
//! (attaching at Docker's cgroup would reach every container of the shared engine).
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// Name of the cgroup under the cgroup2 mount.
const NAME: &str = "router-bench";

/// This process inside the bench cgroup until dropped, then back where it was.
pub struct BenchCgroup {
    pub path: PathBuf,
    previous: PathBuf,
}

impl BenchCgroup {
    pub fn enter() -> anyhow::Result<Self> {
        let mount = cgroup2_mount()?;
        let own = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
        let relative = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("/proc/self/cgroup has no cgroup2 line")?;
        let previous = mount.join(relative.trim_start_matches('/'));
        let path = mount.join(NAME);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        move_self(&path)?;
        Ok(Self { path, previous })
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        if let Err(e) = move_self(&self.previous) {
            eprintln!("bench: could not leave {}: {e:#}", self.path.display());
            return;
        }
        // Fails while a process still sits there (nothing should); harmless then.
        let _ = fs::remove_dir(&self.path);
    }
}

/// Moves this whole process (every thread) into the cgroup at `path`.
fn move_self(path: &Path) -> anyhow::Result<()> {
    let procs = path.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("writing to {}; run the bench as root", procs.display()))
}

fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    for candidate in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let path = PathBuf::from(candidate);
        if path.join("cgroup.controllers").exists() {
            return Ok(path);
        }
    }
    bail!("no cgroup2 hierarchy at /sys/fs/cgroup/unified or /sys/fs/cgroup")
}
