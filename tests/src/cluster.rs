//! The multi-node Swarm of `cargo xtask cluster up`, as tests see it: its state file, node
//! handles (the docker CLI against one node, commands inside a node's network namespace), and
//! Swarm objects removed when a test ends.
//!
//! A test calls [`Cluster::require`]: it skips (returns `None` after printing why) only on a
//! machine that cannot host the cluster at all, and fails when the cluster is merely down, since
//! `cargo xtask test` brings it up.
use std::{
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use serde_json::Value;

use crate::wait_for;

/// Written by `cargo xtask cluster up` (`xtask/src/cluster/plan.rs`).
pub const STATE_FILE: &str = "/run/router-cluster/nodes.json";

pub struct Cluster {
    pub nodes: Vec<Node>,
    /// The agent's global service (`router_agent`).
    pub agent_service: String,
}

#[derive(Clone, Debug)]
pub struct Node {
    /// `node<i>`; also the engine's hostname, so Swarm lists the node by this name.
    pub name: String,
    /// `unix:///run/router-cluster/node<i>/docker.sock`
    pub docker_host: String,
    /// A name `ip netns` knows.
    pub netns: String,
    /// The node's address on the cluster bridge.
    pub address: String,
    pub manager: bool,
}

/// Why there is no cluster to test against.
#[derive(Debug)]
pub enum Unavailable {
    /// This machine cannot run one (not root, no dockerd, no network namespaces).
    CannotExist(String),
    /// It could, but it is not up (or its state file is unreadable).
    Down(String),
}

impl Cluster {
    /// The cluster, or `None` after printing why this machine cannot have one; panics when the
    /// cluster is only down.
    pub fn require(test: &str) -> Option<Self> {
        match Self::from_state() {
            Ok(cluster) => Some(cluster),
            Err(Unavailable::CannotExist(why)) => {
                println!("skipping {test}: no cluster can run on this machine: {why}");
                None
            }
            Err(Unavailable::Down(why)) => {
                panic!("{test} needs the cluster: {why}; start it with `cargo xtask cluster up`")
            }
        }
    }

    pub fn from_state() -> Result<Self, Unavailable> {
        if let Some(why) = cannot_exist() {
            return Err(Unavailable::CannotExist(why));
        }
        let text = std::fs::read_to_string(STATE_FILE)
            .map_err(|e| Unavailable::Down(format!("{STATE_FILE}: {e}")))?;
        let state: Value = serde_json::from_str(&text)
            .map_err(|e| Unavailable::Down(format!("{STATE_FILE} is not JSON: {e}")))?;
        let field = |v: &Value, key: &str| {
            v[key]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| Unavailable::Down(format!("{STATE_FILE}: no `{key}` in {v}")))
        };
        let mut nodes = Vec::new();
        for node in state["nodes"].as_array().into_iter().flatten() {
            nodes.push(Node {
                name: field(node, "name")?,
                docker_host: field(node, "docker_host")?,
                netns: field(node, "netns")?,
                address: field(node, "address")?,
                manager: field(node, "role")? == "manager",
            });
        }
        if nodes.is_empty() {
            return Err(Unavailable::Down(format!("{STATE_FILE} lists no nodes")));
        }
        if let Some(down) = nodes.iter().find(|n| !n.docker_ok(&["info"])) {
            return Err(Unavailable::Down(format!(
                "{}'s engine ({}) does not answer",
                down.name, down.docker_host
            )));
        }
        Ok(Self {
            nodes,
            agent_service: field(&state, "agent_service")?,
        })
    }

    /// A manager: the node that answers for services, tasks and the node list.
    pub fn manager(&self) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.manager)
            .expect("the state file lists a manager")
    }

    /// The node with this name (Swarm's hostname of the node).
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in the cluster"))
    }

    /// Names of the nodes where `service` has a task in state Running now.
    pub fn nodes_running(&self, service: &str) -> Vec<String> {
        self.manager()
            .docker(&[
                "service",
                "ps",
                service,
                "--filter",
                "desired-state=running",
                "--format",
                "{{.Node}} {{.CurrentState}}",
            ])
            .lines()
            .filter_map(|line| {
                let (node, state) = line.split_once(' ')?;
                state.starts_with("Running").then(|| node.to_owned())
            })
            .collect()
    }

    /// The running tasks of `service` (from the manager's `docker inspect` of each task).
    pub fn running_tasks(&self, service: &str) -> Vec<Task> {
        let manager = self.manager();
        let ids = manager.docker(&[
            "service",
            "ps",
            service,
            "--filter",
            "desired-state=running",
            "--no-trunc",
            "--format",
            "{{.ID}}",
        ]);
        let ids: Vec<&str> = ids.lines().collect();
        if ids.is_empty() {
            return Vec::new();
        }
        let mut args = vec!["inspect", "--type", "task"];
        args.extend(&ids);
        let tasks: Value = serde_json::from_str(&manager.docker(&args)).expect("task JSON");
        tasks
            .as_array()
            .expect("an array of tasks")
            .iter()
            .filter(|t| t["Status"]["State"] == "running")
            .map(|t| Task {
                node: manager.docker(&[
                    "node",
                    "inspect",
                    "-f",
                    "{{.Description.Hostname}}",
                    t["NodeID"].as_str().expect("NodeID"),
                ]),
                container_id: t["Status"]["ContainerStatus"]["ContainerID"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                addresses: t["NetworksAttachments"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|a| a["Addresses"].as_array().into_iter().flatten())
                    .filter_map(|a| Some(a.as_str()?.split('/').next()?.to_owned()))
                    .collect(),
            })
            .collect()
    }
}

/// A running Swarm task.
#[derive(Clone, Debug)]
pub struct Task {
    /// The node it runs on (our node name).
    pub node: String,
    pub container_id: String,
    /// Its addresses on the overlay networks it is attached to, without prefix lengths.
    pub addresses: Vec<String>,
}

/// What stops a cluster from running here; `None` when it can.
fn cannot_exist() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0");
    if !root {
        return Some("not root (nodes are network namespaces with their own dockerd)".into());
    }
    for tool in ["/usr/sbin/dockerd", "/usr/bin/nsenter", "/usr/bin/unshare"] {
        if !Path::new(tool).exists() {
            return Some(format!(
                "{tool} is missing (`cargo xtask setup` installs it)"
            ));
        }
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Some("the kernel has no network namespaces".into());
    }
    None
}

fn docker_bin() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

impl Node {
    fn docker_output(&self, args: &[&str]) -> Output {
        Command::new(docker_bin())
            .args(args)
            .env("DOCKER_HOST", &self.docker_host)
            .output()
            .expect("docker CLI runs")
    }

    /// `docker args..` against this node; its stdout, trimmed. Panics with stderr on failure.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = self.docker_output(args);
        assert!(
            out.status.success(),
            "DOCKER_HOST={} docker {} failed: {}",
            self.docker_host,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Like [`Node::docker`] but returns stdout (trimmed) whether or not it succeeded: for polls.
    pub fn docker_stdout(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.docker_output(args).stdout)
            .trim()
            .to_owned()
    }

    /// Like [`Node::docker`] but only says whether it succeeded.
    pub fn docker_ok(&self, args: &[&str]) -> bool {
        self.docker_output(args).status.success()
    }

    /// `program args..` inside the node's network namespace (`ip netns exec`), e.g. curl to
    /// the node's agent on 127.0.0.1.
    pub fn netns_exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns, program])
            .args(args)
            .output()
            .expect("ip netns exec runs")
    }
}

/// A Swarm service created by a test on the manager; removed on drop.
pub struct Service<'a> {
    pub name: String,
    manager: &'a Node,
}

impl<'a> Service<'a> {
    /// `docker service create --detach --name <name> <args..>` (args end with the image), never
    /// asking a registry (the nodes have the local images).
    pub fn create(manager: &'a Node, name: &str, args: &[&str]) -> Self {
        let mut all = vec![
            "service",
            "create",
            "--detach",
            "--no-resolve-image",
            "--name",
            name,
        ];
        all.extend_from_slice(args);
        manager.docker(&all);
        Self {
            name: name.to_owned(),
            manager,
        }
    }
}

impl Drop for Service<'_> {
    fn drop(&mut self) {
        let _ = self.manager.docker_ok(&["service", "rm", &self.name]);
    }
}

/// An attachable overlay network created by a test; removed on drop, once the tasks that used
/// it are gone.
pub struct Overlay<'a> {
    pub name: String,
    manager: &'a Node,
}

impl<'a> Overlay<'a> {
    pub fn create(manager: &'a Node, name: &str) -> Self {
        manager.docker(&[
            "network",
            "create",
            "--driver",
            "overlay",
            "--attachable",
            name,
        ]);
        Self {
            name: name.to_owned(),
            manager,
        }
    }
}

impl Drop for Overlay<'_> {
    fn drop(&mut self) {
        // Removal fails while a task's endpoint is still on it; services drop before this.
        let mut removed = false;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !removed && std::time::Instant::now() < deadline {
            removed = self.manager.docker_ok(&["network", "rm", &self.name]);
            if !removed {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Waits until `service` runs `count` tasks.
pub fn wait_running_tasks(cluster: &Cluster, service: &str, count: usize, timeout: Duration) {
    wait_for(
        &format!("{count} running task(s) of {service}"),
        timeout,
        || cluster.running_tasks(service).len() == count,
    );
}

impl Node {
    /// The agent's admin API on this node (`/api/routes`, ...), as JSON; `Null` if it does not
    /// answer.
    pub fn agent_json(&self, path: &str) -> Value {
        let out = self.netns_exec(
            "curl",
            &["-s", "-m", "2", &format!("http://127.0.0.1:9090{path}")],
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// `(container id, state)` of the backends this node's agent has for a domain's `/` route.
    pub fn backend_states(&self, domain: &str) -> Vec<(String, String)> {
        self.agent_json("/api/routes")["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["domain"] == domain && r["path"] == "/")
            .flat_map(|r| r["backends"].as_array().cloned().unwrap_or_default())
            .map(|b| {
                (
                    b["container_id"].as_str().unwrap_or_default().to_owned(),
                    b["state"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// The ids of the `up` backends this node's agent has for a domain.
    pub fn up_backends(&self, domain: &str) -> Vec<String> {
        let mut up: Vec<String> = self
            .backend_states(domain)
            .into_iter()
            .filter(|(_, state)| state == "up")
            .map(|(id, _)| id)
            .collect();
        up.sort();
        up
    }

    /// A value of this node's agent's `/metrics` (exact series name).
    pub fn agent_metric(&self, series: &str) -> Option<u64> {
        let out = self.netns_exec("curl", &["-s", "-m", "2", "http://127.0.0.1:9090/metrics"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name == series).then(|| value.parse().ok())?
            })
    }

    /// The node's HTTP port (its agent listens on every address of the node).
    pub fn http_addr(&self) -> std::net::SocketAddr {
        format!("{}:80", self.address).parse().expect("address")
    }

    /// Runs `f` on a thread inside the node's network namespace: sockets it opens are the
    /// node's (a client on the node, talking to the node's agent).
    pub fn in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.netns);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd as _;
            let netns = std::fs::File::open(&path).expect("the node's netns");
            // SAFETY: setns on this thread only, with a namespace fd we hold open.
            let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns into {path}: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
    }

    /// The host end of the node's link to the cluster bridge.
    fn host_link(&self) -> String {
        format!("rcl-{}", self.name)
    }

    /// Cuts the node off the cluster network (as if its cable were pulled: no FIN, no RST)
    /// until the guard drops.
    pub fn cut_network(&self) -> NetworkCut {
        let link = self.host_link();
        let ok = Command::new("ip")
            .args(["link", "set", &link, "down"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip link set {link} down failed");
        NetworkCut { link }
    }
}

/// A node's network, cut by [`Node::cut_network`]; restored on drop.
pub struct NetworkCut {
    link: String,
}

impl Drop for NetworkCut {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "set", &self.link, "up"])
            .status();
    }
}
