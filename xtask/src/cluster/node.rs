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
pub(super) fn forward_rule(op: &str) -> Vec<&str> {
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
            // What docs/configuration.md asks of hosts that run the agent in a container (which cannot set
            // it): connections queued on an agent that hands over move to its successor.
            "net.ipv4.tcp_migrate_req=1",
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

/// No IPv6 on a host-side link of the cluster (the plan is IPv4 in 198.19.0.0/16 only).
fn disable_ipv6(link: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{link}/disable_ipv6");
    if Path::new(&path).exists() {
        fs::write(&path, "1").with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
