//! A node's machine: its network namespace on the host bridge, and its own dockerd in a mount
//! namespace that gives it a sysfs, a `/run`, a bpffs and an `/etc/docker` of its own.
//!
//! `ip netns exec` cannot start dockerd (it remounts `/sys`, and dockerd then finds no devices
//! cgroup), so the engine is entered with `nsenter --net` plus `unshare -m -u` and a short shell
//! recipe that prepares the mounts before it `exec`s dockerd (ENVIRONMENT.md, "Several Docker
//! nodes on one machine").
use std::{
    fs::{self, OpenOptions},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::plan::{self, Node};
use crate::cmd;

/// The host bridge with the host's address on it, and the rule that lets bridged node traffic
/// through the host's FORWARD chain (Docker's policy there is DROP, and `br_netfilter` makes
/// bridged frames pass it).
pub fn create_link() -> anyhow::Result<()> {
    cmd::run("ip", &["link", "add", plan::BRIDGE, "type", "bridge"])
        .context("creating the cluster bridge failed; are you root?")?;
    disable_ipv6(plan::BRIDGE)?;
    let address = format!("{}/{}", plan::BRIDGE_ADDRESS, plan::LINK_PREFIX);
    cmd::run("ip", &["addr", "add", &address, "dev", plan::BRIDGE])?;
    cmd::run("ip", &["link", "set", plan::BRIDGE, "up"])?;
    if !cmd::succeeds("iptables", &forward_rule("-C")) {
        cmd::run("iptables", &forward_rule("-I"))?;
    }
    Ok(())
}

/// Only frames from one node to another over the bridge: nothing leaves it.
fn forward_rule(op: &str) -> Vec<&str> {
    vec![
        op,
        "FORWARD",
        "-i",
        plan::BRIDGE,
        "-o",
        plan::BRIDGE,
        "-j",
        "ACCEPT",
    ]
}

/// The node's namespace, with `eth0` on the bridge at its address. No default route: every
/// address outside the link is unreachable from the node itself, which keeps the network rule
/// by construction.
pub fn create_netns(node: &Node) -> anyhow::Result<()> {
    let netns = node.netns();
    let veth = node.host_veth();
    cmd::run("ip", &["netns", "add", &netns])?;
    cmd::run(
        "ip",
        &[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ],
    )?;
    disable_ipv6(&veth)?;
    // IPv4 only on the link: no IPv6 link-local chatter (router solicitations, MLD) leaves a
    // node. Before the links come up, and `default` for the bridges dockerd creates later.
    cmd::run(
        "ip",
        &[
            "netns",
            "exec",
            &netns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ],
    )?;
    cmd::run("ip", &["link", "set", &veth, "master", plan::BRIDGE, "up"])?;
    let address = format!("{}/{}", node.address(), plan::LINK_PREFIX);
    cmd::run(
        "ip",
        &["-n", &netns, "addr", "add", &address, "dev", "eth0"],
    )?;
    cmd::run("ip", &["-n", &netns, "link", "set", "eth0", "up"])?;
    cmd::run("ip", &["-n", &netns, "link", "set", "lo", "up"])
}

/// Starts the node's dockerd, detached (`setsid --fork`: it outlives this command and is not our
/// child to reap). Returns at once; [`wait_engine`] waits for it to answer.
pub fn start_engine(node: &Node) -> anyhow::Result<()> {
    let var = node.var_dir();
    for dir in ["aside/cgroup", "aside/run", "etc-docker", "docker"] {
        fs::create_dir_all(var.join(dir))
            .with_context(|| format!("creating {}; are you root?", var.display()))?;
    }
    fs::create_dir_all(node.run_dir())?;
    let log_path = node.log_file();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let netns = format!("--net=/run/netns/{}", node.netns());
    let status = Command::new("setsid")
        .args([
            "--fork",
            "nsenter",
            &netns,
            "unshare",
            "-m",
            "-u",
            "--propagation",
            "slave",
            "sh",
            "-c",
            &engine_script(node),
        ])
        // Pulls fail at once: there is no registry, and nothing may leave 198.18.0.0/15.
        .env("HTTP_PROXY", "http://127.0.0.1:9")
        .env("HTTPS_PROXY", "http://127.0.0.1:9")
        .env("NO_PROXY", "localhost,127.0.0.0/8,198.18.0.0/15")
        // Swarm tasks use the image the node has instead of asking a registry first.
        .env("DOCKER_SERVICE_PREFER_OFFLINE_IMAGE", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("could not start setsid/nsenter/unshare; is util-linux installed?")?;
    anyhow::ensure!(
        status.success(),
        "starting {}'s dockerd failed ({status})",
        node.name()
    );
    Ok(())
}

/// The mount recipe, run inside the node's fresh mount namespace (propagation slave: nothing
/// mounted here reaches the host), ending in dockerd.
fn engine_script(node: &Node) -> String {
    let var = node.var_dir();
    let var = var.display();
    let run = node.run_dir();
    let run = run.display();
    format!(
        "set -e
# A sysfs of this netns (its own net devices). The cgroup tree moves aside first: a bind made
# after the sysfs mount shows an empty tree and every container start fails.
mount --rbind /sys/fs/cgroup {var}/aside/cgroup
mount -t sysfs sysfs /sys
mount --move {var}/aside/cgroup /sys/fs/cgroup
# The agent's stack bind-mounts /sys/fs/bpf.
mount -t bpf bpf /sys/fs/bpf
# Engine id (key.json): one per node, or Swarm sees one engine three times.
mount --bind {var}/etc-docker /etc/docker
# A /run of its own, so containers that mount /var/run/docker.sock get this node's engine;
# the node's directory under {run} comes back so the host reaches the socket.
mount --bind {run} {var}/aside/run
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p {run}
mount --move {var}/aside/run {run}
echo {name} > /proc/sys/kernel/hostname
# The engine and its children (containerd, shims) in a cgroup of the node, beside its
# containers: `down` finds every process of the node there.
for h in /sys/fs/cgroup/pids /sys/fs/cgroup/unified; do
  if [ -d $h ]; then mkdir -p $h/{cgroup}/engine; echo $$ > $h/{cgroup}/engine/cgroup.procs; fi
done
exec dockerd --host unix://{run}/docker.sock --host unix:///run/docker.sock \
  --data-root {var}/docker --exec-root {run}/exec --pidfile {run}/dockerd.pid \
  --cgroup-parent /{cgroup} --bip {bip} --default-address-pool {pool} --dns {dns} \
  --swarm-default-advertise-addr {address}
",
        name = node.name(),
        cgroup = node.cgroup(),
        bip = node.bip(),
        pool = node.address_pool(),
        dns = node.dns(),
        address = node.address(),
    )
}

/// Whether the node's engine answers on its host-side socket.
pub fn engine_answers(node: &Node) -> bool {
    cmd::succeeds(
        cmd::docker(),
        &["-H", &node.docker_host(), "info", "--format", "{{.ID}}"],
    )
}

pub fn wait_engine(node: &Node, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !engine_answers(node) {
        if Instant::now() > deadline {
            bail!(
                "{}'s dockerd did not answer within {timeout:?}; its log ({}) ends with:\n{}",
                node.name(),
                node.log_file().display(),
                log_tail(&node.log_file())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Kills every process of every node, found or left over: whatever runs in a node's network
/// namespace (dockerd, containerd, shims, host-network containers, `ip netns exec` commands)
/// and whatever sits in a node's cgroups (the containers). SIGKILL: the cluster is being thrown
/// away, and a dockerd asked to stop would first stop every container in turn.
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
fn node_cgroup_dirs() -> Vec<std::path::PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
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

/// No IPv6 on a host-side link of the cluster (the plan is IPv4 in 198.19.0.0/16 only).
fn disable_ipv6(link: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{link}/disable_ipv6");
    if Path::new(&path).exists() {
        fs::write(&path, "1").with_context(|| format!("writing {path}"))?;
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
