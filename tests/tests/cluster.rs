//! The multi-node Swarm of `cargo xtask cluster up`: the agent runs as a global service (one task
//! per node, with its kernel programs loaded), and the overlay network carries traffic between
//! nodes (VXLAN across the nodes' namespaces).
use std::time::Duration;

use serde_json::Value;
use tests::{
    cluster::{self, Cluster, Overlay, Service},
    docker::{BACKEND_IMAGE_NAME, CURL_IMAGE},
    unique, wait_for,
};

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn agent_runs_one_task_per_node() {
    let Some(cluster) = Cluster::require("agent_runs_one_task_per_node") else {
        return;
    };
    let manager = cluster.manager();
    assert_ne!(
        manager.docker(&[
            "service",
            "inspect",
            "-f",
            "{{.Spec.Mode.Global}}",
            &cluster.agent_service
        ]),
        "<nil>",
        "{} is a global service",
        cluster.agent_service
    );
    let mut running = Vec::new();
    wait_for(
        "an agent task on every node",
        Duration::from_secs(30),
        || {
            running = cluster.nodes_running(&cluster.agent_service);
            running.sort();
            running.len() == cluster.nodes.len()
        },
    );
    let mut names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    names.sort();
    assert_eq!(running, names, "exactly one running agent task per node");

    // Each agent answers on its own node's loopback, sees its node's engine through the
    // mounted socket, and has its eBPF program loaded with the stack's capabilities.
    for node in &cluster.nodes {
        let mut health = Value::Null;
        wait_for(
            &format!("the agent's /healthz on {}", node.name),
            Duration::from_secs(20),
            || {
                let out =
                    node.netns_exec("curl", &["-s", "-m", "2", "http://127.0.0.1:9090/healthz"]);
                health = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                health["engine_connected"] == true
            },
        );
        assert_eq!(
            health["kernel_offload"], true,
            "the agent on {} loaded its eBPF program: {health}",
            node.name
        );
    }
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn overlay_carries_a_client_on_one_node_to_a_backend_task_on_another() {
    let Some(cluster) =
        Cluster::require("overlay_carries_a_client_on_one_node_to_a_backend_task_on_another")
    else {
        return;
    };
    assert!(
        cluster.nodes.len() >= 2,
        "the cluster has one node; `cargo xtask cluster up --nodes 3`"
    );
    let manager = cluster.manager();
    let network = Overlay::create(manager, &unique("overlay"));
    let backend = Service::create(
        manager,
        &unique("backend"),
        &[
            "--replicas",
            "2",
            "--network",
            &network.name,
            BACKEND_IMAGE_NAME,
        ],
    );
    cluster::wait_running_tasks(&cluster, &backend.name, 2, Duration::from_secs(30));
    let tasks = cluster.running_tasks(&backend.name);

    for task in &tasks {
        let address = task
            .addresses
            .first()
            .unwrap_or_else(|| panic!("task on {} has no overlay address: {task:?}", task.node));
        let client_node = cluster
            .nodes
            .iter()
            .find(|n| n.name != task.node)
            .expect("another node");
        // The overlay's VXLAN endpoint on the client's node may lag the task by a moment.
        let mut answer = String::new();
        wait_for(
            &format!(
                "a client on {} to reach the backend task at {address} on {}",
                client_node.name, task.node
            ),
            Duration::from_secs(20),
            || {
                answer = client_node.docker_stdout(&[
                    "run",
                    "--rm",
                    "--network",
                    &network.name,
                    CURL_IMAGE,
                    "curl",
                    "-s",
                    "-i",
                    "-m",
                    "3",
                    &format!("http://{address}/"),
                ]);
                answer.starts_with("HTTP/1.1 200")
            },
        );
        let short_id = &task.container_id[..12];
        assert!(
            answer.contains(&format!("X-Backend: {short_id}\r\n")),
            "the answer names the task's container {short_id}: {answer:?}"
        );
        assert!(
            answer.ends_with(&format!("backend={short_id}")),
            "body names {short_id}: {answer:?}"
        );
    }
}
