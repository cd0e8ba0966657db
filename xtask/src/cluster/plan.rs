//! The cluster's names, paths and addresses: one place that decides them, so that `up`,
//! `down`, the state file and docs/cluster.md agree.
//!
//! Address plan (all of it in 198.19.0.0/16; the host engine owns 198.18.0.0/16):
//!
//! | what | range |
//! |---|---|
//! | node link: bridge `router-cl0`, host side | 198.19.100.254/24 |
//! | node `i` (1..=8) on the link | 198.19.100.`i` |
//! | node `i`'s `docker0` (`--bip`) | 198.19.`8i`.1/24 |
//! | node `i`'s local networks (`--default-address-pool`, e.g. `docker_gwbridge`) | 198.19.`8i+4`.0/22 in /24s |
//! | Swarm overlay networks (`--default-addr-pool`) | 198.19.128.0/17 in /24s |
//!
//! Node blocks end at 198.19.71.255 for 8 nodes, below the 198.19.77.0/30 of the internal
//! test's outside namespace and the node link at .100.
use std::path::PathBuf;

/// The Linux bridge the nodes' veths hang on.
pub const BRIDGE: &str = "router-cl0";
/// The host's address on the bridge (prefix length in [`LINK_PREFIX`]).
pub const BRIDGE_ADDRESS: &str = "198.19.100.254";
pub const LINK_PREFIX: u8 = 24;
/// Swarm's pool for overlay networks, `--default-addr-pool-mask-length 24`.
pub const SWARM_POOL: &str = "198.19.128.0/17";
/// More nodes would run into the addresses above 198.19.72.0 that other tests use.
pub const MAX_NODES: usize = 8;
/// Sockets, exec roots, pid files and the state file; small and gone at `down`.
pub const RUN_DIR: &str = "/run/router-cluster";
/// Data roots (images, containers, Swarm state) and the engines' logs.
pub const VAR_DIR: &str = "/var/lib/router-cluster";
/// Serialises `up` and `down`; outside the directories `down` removes, so it outlives them.
pub const LOCK_FILE: &str = "/run/lock/router-cluster.lock";
/// What tests read: `tests/src/cluster.rs` parses it.
pub const STATE_FILE: &str = "/run/router-cluster/nodes.json";
/// The agent stack (`deploy/stack.yml`) and its one service.
pub const STACK: &str = "router";
pub const AGENT_SERVICE: &str = "router_agent";
/// Prefix of every node's network namespace and cgroup name.
pub const NETNS_PREFIX: &str = "router-node";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Manager,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        }
    }
}

/// One node of the plan; `index` counts from 1.
#[derive(Clone, Debug)]
pub struct Node {
    pub index: usize,
    pub role: Role,
}

impl Node {
    /// Also the engine's hostname, so Swarm's node list uses the same names.
    pub fn name(&self) -> String {
        format!("node{}", self.index)
    }

    pub fn netns(&self) -> String {
        format!("{NETNS_PREFIX}{}", self.index)
    }

    /// Also the name of the node's cgroups (`--cgroup-parent`), under every hierarchy.
    pub fn cgroup(&self) -> String {
        self.netns()
    }

    /// The host end of the node's veth (the node end is `eth0`).
    pub fn host_veth(&self) -> String {
        format!("rcl-node{}", self.index)
    }

    pub fn address(&self) -> String {
        format!("198.19.100.{}", self.index)
    }

    fn block(&self) -> usize {
        8 * self.index
    }

    pub fn bip(&self) -> String {
        format!("198.19.{}.1/24", self.block())
    }

    /// The node's `docker0` gateway: the DNS server its containers are told about. Nothing
    /// answers there, so a lookup fails at once instead of leaving the range.
    pub fn dns(&self) -> String {
        format!("198.19.{}.1", self.block())
    }

    pub fn address_pool(&self) -> String {
        format!("base=198.19.{}.0/22,size=24", self.block() + 4)
    }

    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from(RUN_DIR).join(self.name())
    }

    pub fn var_dir(&self) -> PathBuf {
        PathBuf::from(VAR_DIR).join(self.name())
    }

    /// The engine's socket as the host sees it.
    pub fn socket(&self) -> PathBuf {
        self.run_dir().join("docker.sock")
    }

    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    pub fn log_file(&self) -> PathBuf {
        self.var_dir().join("dockerd.log")
    }

    /// The line `cluster up` prints for this node.
    pub fn line(&self) -> String {
        format!(
            "{} DOCKER_HOST={} NETNS={} ADDR={}",
            self.name(),
            self.docker_host(),
            self.netns(),
            self.address()
        )
    }
}

/// Nodes 1..=`nodes`, the first `managers` of them managers.
pub fn nodes(nodes: usize, managers: usize) -> anyhow::Result<Vec<Node>> {
    anyhow::ensure!(
        (1..=MAX_NODES).contains(&nodes),
        "--nodes {nodes}: choose 1 to {MAX_NODES} (the address plan has room for {MAX_NODES})"
    );
    anyhow::ensure!(
        (1..=nodes).contains(&managers),
        "--managers {managers}: choose 1 to {nodes} (the number of nodes); 1 or 3 are usual"
    );
    Ok((1..=nodes)
        .map(|index| Node {
            index,
            role: if index <= managers {
                Role::Manager
            } else {
                Role::Worker
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn octets(address: &str) -> [u8; 4] {
        let ip: std::net::Ipv4Addr = address.parse().unwrap();
        ip.octets()
    }

    #[test]
    fn node_ranges_do_not_overlap_each_other_the_link_or_the_swarm_pool() {
        let plan = nodes(MAX_NODES, 3).unwrap();
        let mut third_octets = Vec::new();
        for node in &plan {
            let bip = octets(node.bip().split('/').next().unwrap());
            let pool = node.address_pool();
            let pool_base: u8 = pool
                .strip_prefix("base=198.19.")
                .and_then(|rest| rest.strip_suffix(".0/22,size=24"))
                .unwrap_or_else(|| panic!("pool {pool}"))
                .parse()
                .unwrap();
            third_octets.push(bip[2]);
            third_octets.extend(pool_base..pool_base + 4);
            assert_eq!(octets(&node.address())[..3], [198, 19, 100]);
        }
        let mut sorted = third_octets.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), third_octets.len(), "blocks overlap");
        assert!(
            sorted.iter().all(|&o| o < 72),
            "blocks reach 198.19.72.0: {sorted:?}"
        );
    }

    #[test]
    fn roles_and_limits() {
        let plan = nodes(3, 1).unwrap();
        assert_eq!(plan[0].role, Role::Manager);
        assert_eq!(plan[2].role, Role::Worker);
        assert!(nodes(0, 1).is_err());
        assert!(nodes(MAX_NODES + 1, 1).is_err());
        assert!(nodes(3, 4).is_err());
        assert_eq!(
            plan[1].line(),
            "node2 DOCKER_HOST=unix:///run/router-cluster/node2/docker.sock \
             NETNS=router-node2 ADDR=198.19.100.2"
        );
    }
}
