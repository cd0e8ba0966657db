//! Routing across the nodes of the real multi-node Swarm (issue 7): a client on one node
//! reaches replicas on the others through its own node's agent, with stickiness; a drain on
//! one node is seen everywhere; a dead node leaves every table within 3 s while requests keep
//! succeeding; the loss of a manager stops neither routing nor discovery; clients outside the
//! cluster get 404 for `.local` names; one more container costs each agent a fixed amount of
//! work however many there are.
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use tests::{
    cluster::{Cluster, Node, Overlay, Service, wait_running_tasks},
    docker::{BACKEND_IMAGE_NAME, CURL_IMAGE},
    stream::RequestStream,
    unique, wait_for,
};

/// A routed backend service with `replicas` tasks, one per node, on nodes other than
/// `avoid`; returns the service and its domain.
fn replicas<'a>(
    cluster: &'a Cluster,
    overlay: &Overlay<'_>,
    name: &str,
    replicas: usize,
    avoid: &str,
) -> (Service<'a>, String) {
    let domain = format!("{name}.local");
    let label = format!("aliyun.routing.port_80={domain}");
    let service = Service::create(
        cluster.manager(),
        name,
        &[
            "--replicas",
            &replicas.to_string(),
            "--replicas-max-per-node",
            "1",
            "--constraint",
            &format!("node.hostname!={avoid}"),
            "--network",
            &overlay.name,
            "--container-label",
            &label,
            BACKEND_IMAGE_NAME,
        ],
    );
    wait_running_tasks(cluster, name, replicas, Duration::from_mins(1));
    (service, domain)
}

/// Waits until every node's agent has exactly these containers `up` behind the domain.
fn wait_routable_everywhere(cluster: &Cluster, domain: &str, ids: &[String], timeout: Duration) {
    let mut wanted: Vec<String> = ids.to_vec();
    wanted.sort();
    for node in &cluster.nodes {
        wait_for(
            &format!("{ids:?} up behind {domain} on {}", node.name),
            timeout,
            || node.up_backends(domain) == wanted,
        );
    }
}

/// `(X-Backend, CONTAINERID cookie)` of each answer a curl loop printed with `-D -` (one head
/// per answer, each starting with its status line).
fn answers(output: &str) -> Vec<(String, Option<String>)> {
    output
        .split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|head| {
            let mut backend = None;
            let mut cookie = None;
            for line in head.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("Set-Cookie: CONTAINERID=") {
                    cookie = rest.split(';').next().map(str::to_owned);
                } else if let Some(name) = line.strip_prefix("X-Backend: ") {
                    backend = Some(name.to_owned());
                }
            }
            Some((backend?, cookie))
        })
        .collect()
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn the_seed_across_nodes_alternates_and_a_cookie_pins_its_replica() {
    let Some(cluster) = Cluster::require("the_seed_across_nodes") else {
        return;
    };
    let overlay = Overlay::create(cluster.manager(), &unique("seedx"));
    let (service, domain) = replicas(&cluster, &overlay, &unique("seedx"), 2, "node3");
    let tasks = cluster.running_tasks(&service.name);
    let ids: Vec<String> = tasks.iter().map(|t| t.container_id.clone()).collect();
    let nodes: BTreeSet<&str> = tasks.iter().map(|t| t.node.as_str()).collect();
    assert_eq!(nodes.len(), 2, "replicas on two different nodes: {tasks:?}");
    assert!(!nodes.contains("node3"));
    wait_routable_everywhere(&cluster, &domain, &ids, Duration::from_secs(20));

    // restclient on node3, as in the seed: its own node's agent through host-gateway.
    let client = cluster.node("node3");
    let host = format!("{domain}:host-gateway");
    let script = format!(
        "for i in 1 2 3 4 5 6; do curl -s -D - -o /dev/null http://{domain}/; done; \
         for i in 1 2 3 4; do curl -s -D - -o /dev/null -H 'Cookie: CONTAINERID={}' http://{domain}/; done",
        ids[0]
    );
    let output = client.docker(&[
        "run",
        "--rm",
        "--add-host",
        &host,
        CURL_IMAGE,
        "sh",
        "-c",
        &script,
    ]);
    let answers = answers(&output);
    assert_eq!(answers.len(), 10, "{output}");
    let (free, pinned) = answers.split_at(6);
    for (i, pair) in free.windows(2).enumerate() {
        assert_ne!(
            pair[0].0, pair[1].0,
            "answers alternate (answer {i}): {free:?}"
        );
    }
    for (backend, cookie) in free {
        let cookie = cookie.as_deref().expect("a cookie on every free answer");
        assert!(
            cookie.starts_with(backend.as_str()) && ids.iter().any(|id| id == cookie),
            "the cookie names the container that answered: {backend} vs {cookie}"
        );
    }
    for (backend, cookie) in pinned {
        assert!(
            ids[0].starts_with(backend.as_str()),
            "pinned to {}: {pinned:?}",
            ids[0]
        );
        assert!(cookie.is_none(), "a pinned request gets no new cookie");
    }
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn a_drain_on_one_node_loses_no_request_of_a_client_on_another() {
    let Some(cluster) = Cluster::require("a_drain_on_one_node") else {
        return;
    };
    let overlay = Overlay::create(cluster.manager(), &unique("drainx"));
    let (service, domain) = replicas(&cluster, &overlay, &unique("drainx"), 2, "node3");
    let tasks = cluster.running_tasks(&service.name);
    let ids: Vec<String> = tasks.iter().map(|t| t.container_id.clone()).collect();
    wait_routable_everywhere(&cluster, &domain, &ids, Duration::from_secs(20));
    let victim = tasks
        .iter()
        .find(|t| t.node == "node1")
        .expect("a replica on node1");
    let survivor = tasks
        .iter()
        .find(|t| t.node != "node1")
        .expect("a replica elsewhere");

    // The client streams from node2, through node2's agent.
    let watcher = cluster.node("node2");
    let stream = {
        let (addr, domain) = (watcher.http_addr(), domain.clone());
        watcher
            .in_netns(move || RequestStream::start(addr, &domain, "/"))
            .join()
            .expect("stream")
    };
    wait_for("requests flowing", Duration::from_secs(5), || {
        stream.count() > 20
    });
    cluster
        .node("node1")
        .docker(&["stop", "--time", "5", &victim.container_id]);
    wait_for(
        "the stopped replica gone from node2's table",
        Duration::from_secs(10),
        || watcher.up_backends(&domain) == [survivor.container_id.clone()],
    );
    let outcomes = stream.finish();
    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    println!(
        "drain across nodes: {} requests from node2, {} failed",
        outcomes.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed during the drain: {failed:?}");
}

/// A node cut off the network: every other agent drops its backends within 3 s, and a client
/// on a surviving node sees no failed request.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn a_dead_node_leaves_every_table_within_3s_and_no_request_fails() {
    let Some(cluster) = Cluster::require("a_dead_node") else {
        return;
    };
    let overlay = Overlay::create(cluster.manager(), &unique("deadx"));
    let (service, domain) = replicas(&cluster, &overlay, &unique("deadx"), 2, "node3");
    let tasks = cluster.running_tasks(&service.name);
    let ids: Vec<String> = tasks.iter().map(|t| t.container_id.clone()).collect();
    wait_routable_everywhere(&cluster, &domain, &ids, Duration::from_secs(20));
    let dead = tasks
        .iter()
        .find(|t| t.node == "node2")
        .expect("a replica on node2");
    let alive = tasks
        .iter()
        .find(|t| t.node != "node2")
        .expect("a replica elsewhere");

    let client = cluster.node("node3");
    let stream = {
        let (addr, domain) = (client.http_addr(), domain.clone());
        client
            .in_netns(move || RequestStream::start(addr, &domain, "/"))
            .join()
            .expect("stream")
    };
    wait_for("requests flowing", Duration::from_secs(5), || {
        stream.count() > 20
    });
    let before_cut = stream.count();
    let cut_at = Instant::now();
    let cut = cluster.node("node2").cut_network();
    let survivors: Vec<&Node> = cluster.nodes.iter().filter(|n| n.name != "node2").collect();
    let mut removed_after = Vec::new();
    for node in &survivors {
        wait_for(
            &format!("node2's replica gone from {}'s table", node.name),
            Duration::from_secs(10),
            || {
                !node
                    .backend_states(&domain)
                    .iter()
                    .any(|(id, _)| *id == dead.container_id)
            },
        );
        removed_after.push((node.name.clone(), cut_at.elapsed()));
    }
    // Keep streaming a little on the survivors alone.
    wait_for("requests after the removal", Duration::from_secs(5), || {
        client
            .agent_metric("router_requests_total")
            .unwrap_or_default()
            > 200
    });
    let outcomes = stream.finish();
    drop(cut);
    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let last_to_dead = outcomes
        .iter()
        .filter(|o| {
            o.result
                .as_deref()
                .is_ok_and(|b| dead.container_id.starts_with(b))
        })
        .map(|o| o.started.saturating_duration_since(cut_at))
        .max();
    let slowest = outcomes
        .iter()
        .filter(|o| o.started >= cut_at)
        .map(|o| o.took)
        .max();
    println!(
        "node cut: removed from the tables after {removed_after:?}; {} requests from node3 \
         ({before_cut} before the cut), {} failed; last request answered by the dead node \
         started {last_to_dead:?} after the cut; slowest request after the cut took {slowest:?}",
        outcomes.len(),
        failed.len()
    );
    for (node, after) in &removed_after {
        assert!(*after < Duration::from_secs(3), "{node} took {after:?}");
    }
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(
        outcomes.iter().any(|o| o
            .result
            .as_deref()
            .is_ok_and(|b| alive.container_id.starts_with(b))),
        "the surviving replica answered"
    );
    // The node comes back and is followed again.
    wait_routable_everywhere(&cluster, &domain, &ids, Duration::from_secs(30));
}

/// Three managers, one of them cut off: Swarm keeps its quorum, and the agents keep routing
/// and keep learning of new containers.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn losing_a_manager_stops_neither_routing_nor_discovery() {
    let Some(cluster) = Cluster::require("losing_a_manager") else {
        return;
    };
    let manager = cluster.manager();
    let promoted: Vec<&Node> = cluster
        .nodes
        .iter()
        .filter(|n| !n.manager)
        .take(2)
        .collect();
    assert_eq!(promoted.len(), 2, "needs three nodes");
    let names: Vec<&str> = promoted.iter().map(|n| n.name.as_str()).collect();
    let mut args = vec!["node", "promote"];
    args.extend(&names);
    manager.docker(&args);
    let _demote = Demote {
        manager,
        nodes: names.iter().map(|n| (*n).to_owned()).collect(),
    };
    wait_for("three managers", Duration::from_secs(30), || {
        manager
            .docker_stdout(&["node", "ls", "--filter", "role=manager", "-q"])
            .lines()
            .count()
            == 3
    });

    let overlay = Overlay::create(manager, &unique("mgrx"));
    let (service, domain) = replicas(&cluster, &overlay, &unique("mgrx"), 2, &manager.name);
    let ids: Vec<String> = cluster
        .running_tasks(&service.name)
        .iter()
        .map(|t| t.container_id.clone())
        .collect();
    wait_routable_everywhere(&cluster, &domain, &ids, Duration::from_secs(20));

    let client = promoted[1];
    let stream = {
        let (addr, domain) = (client.http_addr(), domain.clone());
        client
            .in_netns(move || RequestStream::start(addr, &domain, "/"))
            .join()
            .expect("stream")
    };
    let cut = manager.cut_network();
    // Discovery goes on: a container started on the other promoted node is seen by the
    // client's agent.
    let late_domain = format!("{}.local", unique("late"));
    let late = promoted[0].docker(&[
        "run",
        "-d",
        "--label",
        &format!("aliyun.routing.port_80={late_domain}"),
        BACKEND_IMAGE_NAME,
    ]);
    wait_for(
        "the new container routable on the client's node",
        Duration::from_secs(15),
        || client.up_backends(&late_domain) == [late.clone()],
    );
    let outcomes = stream.finish();
    drop(cut);
    promoted[0].docker(&["rm", "-f", &late]);
    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    println!(
        "manager {} cut: {} requests, {} failed; discovery went on",
        manager.name,
        outcomes.len(),
        failed.len()
    );
    assert!(outcomes.len() > 20);
    assert!(
        failed.is_empty(),
        "failed while a manager was lost: {failed:?}"
    );
}

/// Demotes the promoted nodes again when the test ends, however it ends.
struct Demote<'a> {
    manager: &'a Node,
    nodes: Vec<String>,
}

impl Drop for Demote<'_> {
    fn drop(&mut self) {
        // Back to the shape the other tests expect, once the Swarm is whole again (the cut
        // manager back and reachable): demoting while it still rejoins can leave the Raft
        // group without a working quorum for a while.
        let deadline = Instant::now() + Duration::from_mins(1);
        let whole = || {
            let nodes = self.manager.docker_stdout(&[
                "node",
                "ls",
                "--format",
                "{{.Status}} {{.ManagerStatus}}",
            ]);
            !nodes.is_empty()
                && nodes
                    .lines()
                    .all(|l| l.starts_with("Ready") && !l.contains("Unreachable"))
        };
        while Instant::now() < deadline && !whole() {
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut args = vec!["node", "demote"];
        args.extend(self.nodes.iter().map(String::as_str));
        while Instant::now() < deadline && !self.manager.docker_ok(&args) {
            std::thread::sleep(Duration::from_millis(500));
        }
        // The manager takes writes again.
        let probe = unique("quorum");
        while Instant::now() < deadline
            && !self
                .manager
                .docker_ok(&["network", "create", "--driver", "overlay", &probe])
        {
            std::thread::sleep(Duration::from_millis(500));
        }
        let _ = self.manager.docker_ok(&["network", "rm", &probe]);
    }
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn a_client_outside_the_cluster_gets_404_for_local_names() {
    let Some(cluster) = Cluster::require("a_client_outside") else {
        return;
    };
    let overlay = Overlay::create(cluster.manager(), &unique("outx"));
    let (service, domain) = replicas(&cluster, &overlay, &unique("outx"), 1, "node3");
    let ids: Vec<String> = cluster
        .running_tasks(&service.name)
        .iter()
        .map(|t| t.container_id.clone())
        .collect();
    wait_routable_everywhere(&cluster, &domain, &ids, Duration::from_secs(20));
    let node = cluster.node("node3");
    // A node itself is inside.
    let inside = node.netns_exec(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Host: {domain}"),
            &format!("http://{}/", node.address),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&inside.stdout), "200");
    // A host on the cluster's network that is not a node: outside.
    let outsider = tests::netns::OutsideHost::on_bridge("router-cl0", "198.19.100.200/24");
    let status = outsider.curl_status(&format!("http://{}/", node.address), &domain);
    assert_eq!(status, "404", "a `.local` name from outside the cluster");
    let cluster_port = outsider.curl_status(
        &format!("http://{}:9191/cluster/v1/nodes", node.address),
        "x",
    );
    assert_eq!(cluster_port, "403", "the cluster port refuses non-members");
}

/// The agent of one node dies and Swarm restarts it, then the agents are updated one node at a
/// time: a client on another node sees no failed request.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn an_agent_restarting_on_one_node_does_not_disturb_the_others() {
    let Some(cluster) = Cluster::require("an_agent_restarting") else {
        return;
    };
    let overlay = Overlay::create(cluster.manager(), &unique("restartx"));
    let (service, domain) = replicas(&cluster, &overlay, &unique("restartx"), 2, "node3");
    let ids: Vec<String> = cluster
        .running_tasks(&service.name)
        .iter()
        .map(|t| t.container_id.clone())
        .collect();
    wait_routable_everywhere(&cluster, &domain, &ids, Duration::from_secs(20));
    let client = cluster.node("node3");
    let stream = {
        let (addr, domain) = (client.http_addr(), domain.clone());
        client
            .in_netns(move || RequestStream::start(addr, &domain, "/"))
            .join()
            .expect("stream")
    };
    wait_for("requests flowing", Duration::from_secs(5), || {
        stream.count() > 20
    });

    // node1's agent dies; Swarm starts a new one.
    let node1 = cluster.node("node1");
    let agents_on_node1 = || {
        node1
            .docker(&[
                "ps",
                "-q",
                "--filter",
                &format!(
                    "label=com.docker.swarm.service.name={}",
                    cluster.agent_service
                ),
            ])
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let mut agent = Vec::new();
    wait_for("one agent on node1", Duration::from_mins(1), || {
        agent = agents_on_node1();
        agent.len() == 1
    });
    node1.docker(&["kill", &agent[0]]);
    wait_for("a new agent on node1", Duration::from_secs(30), || {
        node1.agent_json("/healthz")["status"] == "ok"
    });
    wait_routable_everywhere(&cluster, &domain, &ids, Duration::from_secs(20));
    let after_kill = stream.count();

    // A rolling update of every agent (the stack starts each new agent before stopping the
    // old one: they share the ports, and the old one hands over).
    cluster.manager().docker(&[
        "service",
        "update",
        "--force",
        "--quiet",
        &cluster.agent_service,
    ]);
    wait_for("the update to settle", Duration::from_mins(1), || {
        cluster.nodes_running(&cluster.agent_service).len() == cluster.nodes.len()
    });
    wait_routable_everywhere(&cluster, &domain, &ids, Duration::from_secs(20));
    let outcomes = stream.finish();
    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    println!(
        "agent killed on node1, then a rolling update of all agents: {} requests from node3 \
         ({after_kill} by the end of the kill), {} failed",
        outcomes.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
}
