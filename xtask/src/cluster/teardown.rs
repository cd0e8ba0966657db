//! Taking the nodes apart, whatever state a run left them in: their processes (found by network
//! namespace and by cgroup, not by a state file that a failed `up` may not have written), their
//! cgroups, namespaces, links, the FORWARD rule and the directories.
use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::bail;

use super::{node::forward_rule, plan};
use crate::cmd;

/// Kills every process of every node, found or left over: whatever runs in a node's network
/// namespace (dockerd, containerd, shims, host-network containers, `ip netns exec` commands)
/// and whatever sits in a node's cgroups (the containers, and the engine with its children even
/// when its namespace is gone). SIGKILL: the cluster is being thrown away, and a dockerd asked
/// to stop would first stop every container in turn.
pub fn kill_all(netns_names: &[String]) -> anyhow::Result<()> {
    let namespaces: Vec<String> = netns_names
        .iter()
        .filter_map(|name| netns_id(name))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut pids = processes_in_netns(&namespaces);
        pids.extend(processes_in_node_cgroups());
        pids.sort_unstable();
        pids.dedup();
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("node processes {pids:?} survived SIGKILL for 30 s");
        }
        let mut args = vec!["-KILL".to_owned()];
        args.extend(pids.iter().map(u32::to_string));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // Some may have exited meanwhile: kill's failure for those is expected.
        let _ = cmd::output("kill", &args);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `net:[<inode>]`, as `/proc/<pid>/ns/net` reads for processes in that namespace.
fn netns_id(name: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(Path::new("/run/netns").join(name)).ok()?;
    Some(format!("net:[{}]", meta.ino()))
}

fn processes_in_netns(namespaces: &[String]) -> Vec<u32> {
    if namespaces.is_empty() {
        return Vec::new();
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|ns| namespaces.iter().any(|n| ns.as_os_str() == n.as_str()))
        })
        .collect()
}

/// Every `/sys/fs/cgroup/<hierarchy>/router-node*` directory, deepest first.
fn node_cgroup_dirs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.filter_map(Result::ok) {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut dirs = Vec::new();
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
        return dirs;
    };
    for hierarchy in hierarchies.filter_map(Result::ok) {
        let Ok(entries) = fs::read_dir(hierarchy.path()) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let is_node = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(plan::NETNS_PREFIX));
            if is_node && entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&entry.path(), &mut dirs);
            }
        }
    }
    dirs
}

fn processes_in_node_cgroups() -> Vec<u32> {
    node_cgroup_dirs()
        .iter()
        .filter_map(|dir| fs::read_to_string(dir.join("cgroup.procs")).ok())
        .flat_map(|procs| {
            procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Removes the nodes' cgroups (empty once [`kill_all`] ran); Docker leaves them behind when it
/// is killed.
pub fn remove_cgroups() -> anyhow::Result<()> {
    for dir in node_cgroup_dirs() {
        if let Err(e) = fs::remove_dir(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            bail!("removing cgroup {}: {e}", dir.display());
        }
    }
    Ok(())
}

/// The node namespaces that exist now, whether or not a state file lists them.
pub fn existing_netns() -> Vec<String> {
    cmd::output("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| {
            name.strip_prefix(plan::NETNS_PREFIX)
                .is_some_and(|n| n.parse::<usize>().is_ok())
        })
        .map(str::to_owned)
        .collect()
}

/// Deletes the namespaces, the host veths, the bridge and the FORWARD rule; each only if present.
pub fn remove_network(netns_names: &[String]) -> anyhow::Result<()> {
    for name in netns_names {
        cmd::run("ip", &["netns", "del", name])?;
        // The veth goes with its namespace, but namespaces die asynchronously.
        let index = name.trim_start_matches(plan::NETNS_PREFIX);
        let veth = format!("rcl-node{index}");
        if link_exists(&veth) {
            let _ = cmd::output("ip", &["link", "del", &veth]);
        }
    }
    if link_exists(plan::BRIDGE) {
        cmd::run("ip", &["link", "del", plan::BRIDGE])?;
    }
    while cmd::succeeds("iptables", &forward_rule("-C")) {
        cmd::run("iptables", &forward_rule("-D"))?;
    }
    Ok(())
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Unmounts anything still mounted under the cluster's directories in the host's namespace
/// (nothing, normally: node mounts live in the nodes' namespaces) and deletes the directories.
pub fn remove_dirs() -> anyhow::Result<()> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut leftovers: Vec<&str> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|point| point.starts_with(plan::RUN_DIR) || point.starts_with(plan::VAR_DIR))
        .collect();
    // Deepest first.
    leftovers.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in leftovers {
        cmd::run("umount", &["-l", point])?;
    }
    for dir in [plan::RUN_DIR, plan::VAR_DIR] {
        if Path::new(dir).exists() {
            // --one-file-system: never follow a mount we failed to see into another tree.
            cmd::run("rm", &["-rf", "--one-file-system", dir])?;
        }
    }
    Ok(())
}
