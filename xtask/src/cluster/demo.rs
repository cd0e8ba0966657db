//! `cargo xtask cluster demo`: the seed's example on the multi-node Swarm: `restserver` (two
//! replicas on two nodes) and `restclient` (on a third) deployed as a stack; shows what the
//! client printed and which replicas answered, on which node.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{plan::Node, swarm};
use crate::cmd;

const STACK: &str = "seed";

pub fn run(nodes: &[Node], seconds: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        nodes.len() >= 3,
        "the demo needs 3 nodes (replicas on two, the client on a third): `cargo xtask cluster up --nodes 3`"
    );
    let manager = &nodes[0];
    let stack_file = cmd::workspace_root().join("xtask/demo/stack.yml");
    let stack_file = stack_file.to_str().context("non-UTF-8 path")?;
    println!("demo: deploying the seed stack (restserver x2 on node1/node2, restclient on node3)");
    swarm::docker(
        manager,
        &[
            "stack",
            "deploy",
            "--resolve-image",
            "never",
            "-c",
            stack_file,
            STACK,
        ],
    )?;
    let result = (|| {
        wait_client_output(manager, Duration::from_mins(1))?;
        println!("demo: letting restclient run for {seconds} s");
        std::thread::sleep(Duration::from_secs(seconds));
        let logs = client_logs(manager)?;
        println!("{logs}");
        summarize(nodes, &logs)
    })();
    let removed = swarm::docker(manager, &["stack", "rm", STACK]).map(drop);
    result.and(removed)
}

fn client_logs(manager: &Node) -> anyhow::Result<String> {
    swarm::docker(
        manager,
        &[
            "service",
            "logs",
            "--raw",
            "--no-trunc",
            &format!("{STACK}_restclient"),
        ],
    )
}

/// Waits until the client has printed its first answer (tasks scheduled, images there,
/// replicas passed their first probe).
fn wait_client_output(manager: &Node, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if client_logs(manager).is_ok_and(|logs| logs.contains("HTTP/1.1 200")) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!(
        "restclient printed no 200 within {timeout:?}; see `docker service ps {STACK}_restclient` on node1"
    )
}

/// Prints which replicas answered (by the CONTAINERID cookies the router set) and where each
/// runs.
fn summarize(nodes: &[Node], logs: &str) -> anyhow::Result<()> {
    let mut answered: BTreeMap<&str, usize> = BTreeMap::new();
    for id in logs
        .lines()
        .filter_map(|line| line.split("Set-Cookie: CONTAINERID=").nth(1))
        .filter_map(|rest| rest.split(';').next())
    {
        *answered.entry(id.trim()).or_default() += 1;
    }
    println!(
        "demo: restclient on node3 was answered by {} replica(s):",
        answered.len()
    );
    for (id, count) in &answered {
        let place = nodes
            .iter()
            .find_map(|node| {
                let name = swarm::docker(node, &["inspect", "-f", "{{.Name}}", id]).ok()?;
                Some(format!(
                    "{} on {}",
                    name.trim_start_matches('/'),
                    node.name()
                ))
            })
            .unwrap_or_else(|| "(gone)".into());
        println!("  CONTAINERID={id} {place}: {count} answer(s)");
    }
    if answered.len() < 2 {
        bail!(
            "expected both restserver replicas to answer; see the agents' logs (`docker service logs router_agent` on node1)"
        );
    }
    Ok(())
}
