//! The Swarm over the nodes: init on the first manager, joins, the agent stack, and the checks
//! that say whether an existing cluster is whole.
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::{
    node,
    plan::{self, Node, Role},
};
use crate::cmd;

/// `docker -H <node> args..`, its stdout.
pub fn docker(node: &Node, args: &[&str]) -> anyhow::Result<String> {
    let host = node.docker_host();
    let mut all = vec!["-H", host.as_str()];
    all.extend_from_slice(args);
    cmd::output(cmd::docker(), &all)
}

/// Initialises the Swarm on `nodes[0]` and joins the others: managers one at a time (each join
/// changes the Raft membership), then the workers.
pub fn form(nodes: &[Node]) -> anyhow::Result<()> {
    let leader = &nodes[0];
    let pool_mask = "24";
    docker(
        leader,
        &[
            "swarm",
            "init",
            "--advertise-addr",
            &leader.address(),
            "--listen-addr",
            &format!("{}:2377", leader.address()),
            "--default-addr-pool",
            plan::SWARM_POOL,
            "--default-addr-pool-mask-length",
            pool_mask,
        ],
    )
    .with_context(|| format!("docker swarm init on {} failed", leader.name()))?;
    let remote = format!("{}:2377", leader.address());
    for node in &nodes[1..] {
        let token = docker(leader, &["swarm", "join-token", "-q", node.role.as_str()])?;
        docker(
            node,
            &[
                "swarm",
                "join",
                "--token",
                &token,
                "--advertise-addr",
                &node.address(),
                "--listen-addr",
                &format!("{}:2377", node.address()),
                &remote,
            ],
        )
        .with_context(|| format!("{} could not join the Swarm at {remote}", node.name()))?;
    }
    wait_nodes_ready(nodes, Duration::from_secs(30))
}

/// The nodes Swarm lists as Ready, by hostname (our node names).
fn ready_nodes(manager: &Node) -> anyhow::Result<Vec<String>> {
    let list = docker(
        manager,
        &["node", "ls", "--format", "{{.Hostname}} {{.Status}}"],
    )?;
    Ok(list
        .lines()
        .filter_map(|line| line.strip_suffix(" Ready").map(str::to_owned))
        .collect())
}

fn wait_nodes_ready(nodes: &[Node], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready = ready_nodes(&nodes[0])?;
        if nodes.iter().all(|n| ready.contains(&n.name())) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("Swarm nodes not Ready after {timeout:?}; Ready: {ready:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the agents of this machine's cluster log: their answers' failure paths and the
/// cluster's comings and goings too, so that a failed cluster test can be read from
/// `docker service logs router_agent`.
const AGENT_LOG: &str = "info,router_agent::proxy::connection=debug,router_agent::cluster=debug";

/// `docker stack deploy` of `deploy/stack.yml`, never asking a registry for image digests.
pub fn deploy_stack(manager: &Node) -> anyhow::Result<()> {
    let file = cmd::workspace_root().join("deploy/stack.yml");
    let output = std::process::Command::new(cmd::docker())
        .args(["-H", &manager.docker_host()])
        .args(["stack", "deploy", "--resolve-image", "never", "-c"])
        .arg(&file)
        .arg(plan::STACK)
        .env("RUST_LOG", AGENT_LOG)
        .output()
        .context("could not run docker")?;
    if !output.status.success() {
        bail!(
            "docker stack deploy of deploy/stack.yml failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Restarts the agent tasks so they run the image just loaded (the tag did not change, so the
/// service spec did not either).
pub fn restart_agents(manager: &Node) -> anyhow::Result<()> {
    docker(
        manager,
        &[
            "service",
            "update",
            "--force",
            "--detach",
            "--quiet",
            plan::AGENT_SERVICE,
        ],
    )?;
    Ok(())
}

/// The nodes on which an agent task is running now.
fn nodes_running_agent(manager: &Node) -> anyhow::Result<Vec<String>> {
    let tasks = docker(
        manager,
        &[
            "service",
            "ps",
            plan::AGENT_SERVICE,
            "--filter",
            "desired-state=running",
            "--format",
            "{{.Node}} {{.CurrentState}}",
        ],
    )?;
    Ok(tasks
        .lines()
        .filter_map(|line| {
            let (node, state) = line.split_once(' ')?;
            state.starts_with("Running").then(|| node.to_owned())
        })
        .collect())
}

pub fn wait_agents(nodes: &[Node], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let running = nodes_running_agent(&nodes[0]).unwrap_or_default();
        if nodes.iter().all(|n| running.contains(&n.name())) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let tasks = docker(
                &nodes[0],
                &["service", "ps", "--no-trunc", plan::AGENT_SERVICE],
            )
            .unwrap_or_else(|e| format!("{e:#}"));
            bail!(
                "the agent does not run on every node after {timeout:?} (running on {running:?}):\n\
                 {tasks}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Why an existing cluster is not whole, or `None` when every node answers, is in the Swarm with
/// the planned role, and runs an agent.
pub fn defect(nodes: &[Node]) -> Option<String> {
    for node in nodes {
        if !node::engine_answers(node) {
            return Some(format!(
                "{}'s engine does not answer on {}",
                node.name(),
                node.socket().display()
            ));
        }
        let info = docker(
            node,
            &[
                "info",
                "--format",
                "{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}",
            ],
        );
        let expected = format!("active {}", node.role == Role::Manager);
        match info {
            Ok(state) if state == expected => {}
            Ok(state) => {
                return Some(format!(
                    "{}'s Swarm state and manager flag are `{state}`, not `{expected}`",
                    node.name()
                ));
            }
            Err(e) => return Some(format!("{e:#}")),
        }
    }
    match ready_nodes(&nodes[0]) {
        Ok(ready)
            if ready.len() != nodes.len() || !nodes.iter().all(|n| ready.contains(&n.name())) =>
        {
            return Some(format!("the Swarm's Ready nodes are {ready:?}"));
        }
        Ok(_) => {}
        Err(e) => return Some(format!("{e:#}")),
    }
    match nodes_running_agent(&nodes[0]) {
        Ok(running) if nodes.iter().all(|n| running.contains(&n.name())) => None,
        Ok(running) => Some(format!("the agent runs only on {running:?}")),
        Err(e) => Some(format!("{e:#}")),
    }
}
