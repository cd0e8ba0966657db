//! `cargo xtask cluster up|down`: a real multi-node Docker Swarm on this one machine, for the
//! cluster tests, the demo and benchmarks.
//!
//! Each node is a dockerd in a network namespace of its own on a host bridge; the nodes form one
//! Swarm and run the agent stack (`deploy/stack.yml`). `up` is idempotent: it keeps a whole
//! cluster of the asked shape, and removes and rebuilds anything else. `down` removes everything
//! `up` makes, after a partial failure too. The addresses are in [`plan`].
//!
//! Stdout carries only the node lines (`node<i> DOCKER_HOST=.. NETNS=.. ADDR=..`); progress goes
//! to stderr. Tests read the state file, [`plan::STATE_FILE`].
mod demo;
mod images;
mod node;
mod plan;
mod swarm;
mod teardown;

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::json;

use crate::cmd;
use plan::Node;

/// What `up` asks for; `None` keeps what the running cluster has (or takes the default).
pub struct Options {
    pub nodes: Option<usize>,
    pub managers: Option<usize>,
}

const DEFAULT_NODES: usize = 3;
const DEFAULT_MANAGERS: usize = 1;

pub fn up(options: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    ensure_root()?;
    let _lock = lock()?;
    let recorded = recorded_shape();
    let wanted = (
        options
            .nodes
            .or(recorded.map(|(n, _)| n))
            .unwrap_or(DEFAULT_NODES),
        options
            .managers
            .or(recorded.map(|(_, m)| m))
            .unwrap_or(DEFAULT_MANAGERS),
    );
    let nodes = plan::nodes(wanted.0, wanted.1)?;
    match recorded {
        Some(shape) if shape == wanted => match swarm::defect(&nodes) {
            None => {
                refresh_images(&nodes)?;
                eprintln!(
                    "cluster: up already (checked in {:.1} s)",
                    started.elapsed().as_secs_f64()
                );
                print_lines(&nodes);
                return Ok(());
            }
            Some(why) => eprintln!("cluster: rebuilding it: {why}"),
        },
        Some((n, m)) => eprintln!(
            "cluster: rebuilding it: it has {n} node(s) and {m} manager(s), not {} and {}",
            wanted.0, wanted.1
        ),
        None if leftovers_exist() => eprintln!("cluster: removing what an earlier run left"),
        None => {}
    }
    remove_all()?;
    create(&nodes).context("cluster up failed; `cargo xtask cluster down` removes what it made")?;
    write_state(&nodes)?;
    eprintln!(
        "cluster: {} node(s) up in {:.1} s",
        nodes.len(),
        started.elapsed().as_secs_f64()
    );
    print_lines(&nodes);
    Ok(())
}

fn create(nodes: &[Node]) -> anyhow::Result<()> {
    fs::create_dir_all(plan::RUN_DIR).context("creating the cluster's directories")?;
    fs::create_dir_all(plan::VAR_DIR)?;
    node::create_link()?;
    for node in nodes {
        node::create_netns(node)?;
        node::start_engine(node)?;
    }
    for node in nodes {
        node::wait_engine(node, Duration::from_secs(30))?;
    }
    // Images travel while the Swarm forms: they are independent, and loading is the slow part.
    std::thread::scope(|scope| {
        let loading = scope.spawn(|| images::load_into(nodes));
        let formed = swarm::form(nodes);
        let loaded = loading.join().expect("image loading thread panicked");
        formed.and(loaded)
    })?;
    swarm::deploy_stack(&nodes[0])?;
    swarm::wait_agents(nodes, Duration::from_mins(1))
}

/// Loads images that changed on the host since the cluster came up, and moves the agents onto a
/// new agent image.
fn refresh_images(nodes: &[Node]) -> anyhow::Result<()> {
    // The stack file may have changed since: deploying an unchanged stack changes nothing.
    swarm::deploy_stack(&nodes[0])?;
    if images::load_into(nodes)? {
        eprintln!("cluster: restarting the agents on the new router-agent image");
        swarm::restart_agents(&nodes[0])?;
        swarm::wait_agents(nodes, Duration::from_mins(1))?;
    }
    Ok(())
}

/// `cargo xtask cluster demo`: `up` (keeping the cluster's shape), then the seed's stack.
pub fn demo(seconds: u64) -> anyhow::Result<()> {
    up(&Options {
        nodes: None,
        managers: None,
    })?;
    let (nodes, managers) = recorded_shape().context("no cluster state after `up`")?;
    demo::run(&plan::nodes(nodes, managers)?, seconds)
}

pub fn down() -> anyhow::Result<()> {
    ensure_root()?;
    let _lock = lock()?;
    remove_all()
}

fn remove_all() -> anyhow::Result<()> {
    let namespaces = teardown::existing_netns();
    teardown::kill_all(&namespaces)?;
    teardown::remove_cgroups()?;
    teardown::remove_network(&namespaces)?;
    teardown::remove_dirs()
}

/// One `up` or `down` at a time on the machine: worktrees share the one cluster, and two test
/// runs may ask for it at once. Held until the returned file is dropped.
fn lock() -> anyhow::Result<fs::File> {
    let file = fs::File::create(plan::LOCK_FILE)
        .with_context(|| format!("creating {}; are you root?", plan::LOCK_FILE))?;
    if file.try_lock().is_err() {
        eprintln!("cluster: waiting for another `cluster up` or `down` to finish");
        file.lock()
            .with_context(|| format!("locking {}", plan::LOCK_FILE))?;
    }
    Ok(file)
}

fn ensure_root() -> anyhow::Result<()> {
    let uid = cmd::output("id", &["-u"])?;
    anyhow::ensure!(
        uid == "0",
        "the cluster creates network namespaces, a bridge and engines: run it as root"
    );
    Ok(())
}

fn leftovers_exist() -> bool {
    !teardown::existing_netns().is_empty()
        || Path::new(plan::RUN_DIR).exists()
        || Path::new(plan::VAR_DIR).exists()
        || Path::new("/sys/class/net").join(plan::BRIDGE).exists()
}

fn print_lines(nodes: &[Node]) {
    for node in nodes {
        println!("{}", node.line());
    }
}

fn write_state(nodes: &[Node]) -> anyhow::Result<()> {
    let managers = nodes
        .iter()
        .filter(|n| n.role == plan::Role::Manager)
        .count();
    let state = json!({
        "nodes": nodes.iter().map(|node| json!({
            "name": node.name(),
            "docker_host": node.docker_host(),
            "socket": node.socket(),
            "netns": node.netns(),
            "address": node.address(),
            "role": node.role.as_str(),
        })).collect::<Vec<_>>(),
        "managers": managers,
        "bridge": plan::BRIDGE,
        "bridge_address": plan::BRIDGE_ADDRESS,
        "stack": plan::STACK,
        "agent_service": plan::AGENT_SERVICE,
    });
    fs::write(
        plan::STATE_FILE,
        serde_json::to_string_pretty(&state)? + "\n",
    )
    .with_context(|| format!("writing {}", plan::STATE_FILE))
}

/// (nodes, managers) of the cluster the state file describes, if there is one.
fn recorded_shape() -> Option<(usize, usize)> {
    let text = fs::read_to_string(plan::STATE_FILE).ok()?;
    let state: serde_json::Value = serde_json::from_str(&text).ok()?;
    let nodes = state["nodes"].as_array()?.len();
    let managers = usize::try_from(state["managers"].as_u64()?).ok()?;
    Some((nodes, managers))
}
