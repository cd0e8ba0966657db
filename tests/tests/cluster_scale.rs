//! Scale on the real multi-node Swarm (issue 7): many labelled service tasks across the nodes
//! become routable on every node's agent, with the agents' CPU and memory measured; and one
//! more container costs each agent a fixed amount of work, shown by counters (requests to its
//! engine, lines from the other agents), not by a timing.
//!
//! `ROUTER_SCALE_TASKS` sets how many tasks (default 200).
use std::time::{Duration, Instant};

use tests::{
    cluster::{Cluster, Node, Overlay, Service, wait_running_tasks},
    docker::BACKEND_IMAGE_NAME,
    unique, wait_for,
};

/// The agent process of a node, seen from the host.
struct AgentProcess {
    pid: u32,
}

impl AgentProcess {
    fn of(cluster: &Cluster, node: &Node) -> Self {
        let container = node.docker(&[
            "ps",
            "-q",
            "--filter",
            &format!(
                "label=com.docker.swarm.service.name={}",
                cluster.agent_service
            ),
        ]);
        let container = container.lines().next().expect("an agent task on the node");
        // tini is PID 1 of the task; the agent is its child.
        let tini: u32 = node
            .docker(&["inspect", "-f", "{{.State.Pid}}", container])
            .parse()
            .expect("pid");
        let children = std::fs::read_to_string(format!("/proc/{tini}/task/{tini}/children"))
            .unwrap_or_default();
        let pid = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(tini);
        Self { pid }
    }

    /// User plus system CPU time so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let after_name = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // utime and stime are fields 14 and 15 of the line, 11 and 12 after the name.
        // SAFETY: sysconf has no preconditions.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
        Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz.max(1))
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

fn scale(manager: &Node, service: &str, tasks: usize) {
    manager.docker(&[
        "service",
        "scale",
        "--detach",
        &format!("{service}={tasks}"),
    ]);
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn many_tasks_become_routable_everywhere_and_one_more_costs_each_agent_o1() {
    let Some(cluster) = Cluster::require("many_tasks_become_routable") else {
        return;
    };
    let tasks: usize = std::env::var("ROUTER_SCALE_TASKS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    let manager = cluster.manager();
    let overlay = Overlay::create(manager, &unique("scalex"));
    let name = unique("scalex");
    let domain = format!("{name}.local");
    let service = Service::create(
        manager,
        &name,
        &[
            "--replicas",
            "0",
            "--network",
            &overlay.name,
            "--container-label",
            &format!("aliyun.routing.port_80={domain}"),
            "--stop-grace-period",
            "1s",
            BACKEND_IMAGE_NAME,
        ],
    );
    let agents: Vec<AgentProcess> = cluster
        .nodes
        .iter()
        .map(|n| AgentProcess::of(&cluster, n))
        .collect();
    let cpu_before: Vec<Duration> = agents.iter().map(AgentProcess::cpu).collect();

    let started = Instant::now();
    scale(manager, &service.name, tasks);
    let mut routable_after = Vec::new();
    for node in &cluster.nodes {
        wait_for(
            &format!("{tasks} tasks routable on {}", node.name),
            Duration::from_mins(10),
            || node.up_backends(&domain).len() == tasks,
        );
        routable_after.push((node.name.clone(), started.elapsed()));
    }
    let cpu: Vec<Duration> = agents
        .iter()
        .zip(&cpu_before)
        .map(|(a, before)| a.cpu().saturating_sub(*before))
        .collect();
    let rss: Vec<u64> = agents.iter().map(AgentProcess::rss_kib).collect();
    let per_node: Vec<(String, usize)> = cluster
        .nodes
        .iter()
        .map(|n| {
            let mine = cluster
                .running_tasks(&service.name)
                .iter()
                .filter(|t| t.node == n.name)
                .count();
            (n.name.clone(), mine)
        })
        .collect();
    println!(
        "{tasks} tasks ({per_node:?}) routable on every node after {routable_after:?}; agent CPU \
         meanwhile {cpu:?}; agent RSS {rss:?} KiB"
    );

    // One more: counters before and after, per agent.
    let counters = |node: &Node| {
        (
            node.agent_metric("router_engine_requests_total")
                .unwrap_or_default(),
            node.agent_json("/api/cluster")["cluster"]["changes_received"]
                .as_u64()
                .unwrap_or_default(),
        )
    };
    let before: Vec<(u64, u64)> = cluster.nodes.iter().map(counters).collect();
    scale(manager, &service.name, tasks + 1);
    wait_running_tasks(&cluster, &service.name, tasks + 1, Duration::from_mins(1));
    for node in &cluster.nodes {
        wait_for(
            &format!("task {} routable on {}", tasks + 1, node.name),
            Duration::from_secs(30),
            || node.up_backends(&domain).len() == tasks + 1,
        );
    }
    let after: Vec<(u64, u64)> = cluster.nodes.iter().map(counters).collect();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let engine = after[i].0 - before[i].0;
        let changes = after[i].1 - before[i].1;
        println!(
            "one more task among {tasks}: {} made {engine} engine request(s) and heard \
             {changes} change(s) from the other agents",
            node.name
        );
        // The new task's own agent inspects it (and its gateway-bridge address); the others
        // ask their engines nothing and hear of it once or twice (discovered, then up).
        assert!(
            engine <= 6,
            "{}: {engine} engine requests for one more container among {tasks}",
            node.name
        );
        assert!(
            changes <= 4,
            "{}: {changes} changes heard for one more container among {tasks}",
            node.name
        );
    }
    scale(manager, &service.name, 0);
}
