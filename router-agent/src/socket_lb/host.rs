//! What socket-level balancing covers on this host: the default cgroup (the engine's
//! containers) and the frontend addresses (the local addresses the router listens on).
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use super::sys;

/// The default cgroup, in the cgroup2 hierarchy: the parent cgroup of the Docker engine's
/// containers, so that every container is covered and none of the host's own processes.
pub fn default_cgroup() -> anyhow::Result<PathBuf> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mount = sys::cgroup2_mount(&mountinfo).context(
        "no cgroup2 hierarchy is mounted (mount one, e.g. `mount -t cgroup2 none \
         /sys/fs/cgroup/unified`, or set cgroup_path)",
    )?;
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    Ok(default_cgroup_in(&mount, &own))
}

/// The default cgroup under the cgroup2 `mount`, given this process's `/proc/self/cgroup`:
/// - an agent running in a container of the engine (its cgroup is `<parent>/<64 hex id>`, as
///   Docker's `cgroupfs` driver names them) covers its sibling containers: `<parent>`, which
///   follows an engine's `--cgroup-parent`;
/// - anywhere else, `docker`: the `cgroupfs` driver's default parent.
pub fn default_cgroup_in(mount: &Path, own_cgroup: &str) -> PathBuf {
    let parent = own_cgroup.lines().find_map(|line| {
        let path = line.strip_prefix("0::/")?;
        let (parent, leaf) = path.rsplit_once('/')?;
        let container_id = leaf.len() == 64 && leaf.bytes().all(|b| b.is_ascii_hexdigit());
        (container_id && !parent.is_empty()).then_some(parent)
    });
    mount.join(parent.unwrap_or("docker"))
}

/// The frontend addresses for these listen addresses: a wildcard (`0.0.0.0` or `::`, which
/// takes IPv4 too) means every local IPv4 address; IPv6 addresses have none (the hook is
/// `connect4`).
pub fn frontend_addresses(listen: &[IpAddr], local: &[Ipv4Addr]) -> BTreeSet<Ipv4Addr> {
    let mut out = BTreeSet::new();
    for ip in listen {
        match ip {
            IpAddr::V4(v4) if v4.is_unspecified() => out.extend(local),
            IpAddr::V6(v6) if v6.is_unspecified() => out.extend(local),
            IpAddr::V4(v4) => {
                out.insert(*v4);
            }
            IpAddr::V6(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cgroup_is_the_engines_container_parent() {
        let mount = Path::new("/sys/fs/cgroup/unified");
        let id = "4fb92d0623bfd8854e380300a85267f12ea75126f7f07d54807e0ac05bbbf5d6";
        let cases: &[(String, &str)] = &[
            // A host process: Docker's default parent.
            ("0::/\n".to_owned(), "/sys/fs/cgroup/unified/docker"),
            (
                "1:cpu:/\n0::/user.slice/session-1.scope\n".to_owned(),
                "/sys/fs/cgroup/unified/docker",
            ),
            // The agent in a container of the engine: its siblings.
            (
                format!("9:pids:/docker/{id}\n0::/docker/{id}\n"),
                "/sys/fs/cgroup/unified/docker",
            ),
            (
                format!("0::/router-node1/{id}\n"),
                "/sys/fs/cgroup/unified/router-node1",
            ),
            (format!("0::/a/b/{id}\n"), "/sys/fs/cgroup/unified/a/b"),
            // A private cgroup namespace shows the container at the root: not enough to tell.
            ("0::/\n".to_owned(), "/sys/fs/cgroup/unified/docker"),
            (format!("0::/{id}\n"), "/sys/fs/cgroup/unified/docker"),
            // systemd's scope names are not container ids.
            (
                format!("0::/system.slice/docker-{id}.scope\n"),
                "/sys/fs/cgroup/unified/docker",
            ),
        ];
        for (own, expected) in cases {
            assert_eq!(
                default_cgroup_in(mount, own),
                Path::new(expected),
                "{own:?}"
            );
        }
    }

    #[test]
    fn frontends_follow_the_listen_addresses() {
        let local: Vec<Ipv4Addr> = ["127.0.0.1", "198.18.0.1", "10.1.2.3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let ips =
            |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|s| s.parse().unwrap()).collect() };
        let set = |list: &[&str]| -> BTreeSet<Ipv4Addr> {
            list.iter().map(|s| s.parse().unwrap()).collect()
        };
        let cases: &[(&[&str], &[&str])] = &[
            (&["0.0.0.0"], &["127.0.0.1", "198.18.0.1", "10.1.2.3"]),
            (&["::"], &["127.0.0.1", "198.18.0.1", "10.1.2.3"]),
            (&["127.0.0.1"], &["127.0.0.1"]),
            (&["198.18.0.1", "::1"], &["198.18.0.1"]),
            (&["fd00::1"], &[]),
        ];
        for (listen, expected) in cases {
            assert_eq!(
                frontend_addresses(&ips(listen), &local),
                set(expected),
                "{listen:?}"
            );
        }
    }
}
