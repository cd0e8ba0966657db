//! Socket-level balancing of `tcp://` routes, with real containers and the real kernel
//! programs: client containers in the tests' cgroup (`TEST_CGROUP`) connect to a route's
//! frontend (the bridge gateway at the route's port) and the kernel connects them straight to
//! a backend. Each test proves the path: the backend's whoami listener sees the client
//! container's own address (through the agent it would see the gateway), the agent accepted no
//! connection, and the route's kernel connect counter moved.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    agent::{self, Agent, TEST_CGROUP, free_port},
    docker::{Container, backend_image, docker},
    unique, wait_for,
};

/// The test backend's raw listeners.
const WHOAMI_PORT: u16 = 7003;
const ECHO_PORT: u16 = 7000;
/// `ECONNREFUSED`, the documented errno of a connect to a route without an `up` backend.
const ECONNREFUSED: i32 = 111;

/// The bridge gateway: where containers reach the host (and the router's frontends).
fn gateway() -> String {
    docker(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
    ])
}

/// A tcp route to the whoami port of `backends` under a fresh domain, on a free router port.
struct WhoamiRoute {
    domain: String,
    port: u16,
}

impl WhoamiRoute {
    fn new() -> Self {
        Self {
            domain: format!("{}.local", unique("slb")),
            port: free_port(),
        }
    }

    fn label(&self) -> String {
        format!(
            "aliyun.routing.port_{WHOAMI_PORT}=tcp://{}:{}",
            self.domain, self.port
        )
    }

    fn frontend(&self) -> String {
        format!("{}:{}", gateway(), self.port)
    }

    fn backend(&self, extra_labels: &[&str]) -> Container {
        let label = self.label();
        let mut labels = vec![label.as_str()];
        labels.extend_from_slice(extra_labels);
        Container::backend(&unique("slb"), &labels)
    }
}

/// The `/api/routes` entry of the tcp route on `port`.
fn tcp_route(agent: &Agent, port: u16) -> Option<Value> {
    agent.json("/api/routes")["routes"]
        .as_array()?
        .iter()
        .find(|r| r["listen_port"] == port)
        .cloned()
}

/// Waits until exactly these containers are `up` on the route and the kernel serves it with
/// the slot list that follows from them.
fn wait_kernel_serves(agent: &Agent, port: u16, up: &[&Container]) {
    wait_for(
        &format!("the kernel to serve tcp route {port} with {} up", up.len()),
        Duration::from_secs(20),
        || {
            let Some(route) = tcp_route(agent, port) else {
                return false;
            };
            let states: BTreeMap<String, String> = route["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    (
                        b["container_id"].as_str().unwrap_or_default().to_owned(),
                        b["state"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            route["kernel"]["served"] == true
                && up
                    .iter()
                    .all(|c| states.get(&c.id).is_some_and(|s| s == "up"))
                && states.values().filter(|s| *s == "up").count() == up.len()
        },
    );
}

/// Runs `test-client` in a client container in the tests' cgroup (`docker run --rm`, or `-d`);
/// returns its output, or its id when detached.
fn run_client(name: &str, detach: bool, client: &[&str]) -> String {
    let cgroup_parent = format!("/{TEST_CGROUP}");
    let mut args = vec!["run", if detach { "-d" } else { "--rm" }];
    args.extend_from_slice(&[
        "--name",
        name,
        "--label",
        "router-test=1",
        "--cgroup-parent",
        &cgroup_parent,
        "--entrypoint",
        "/usr/local/bin/test-client",
        backend_image(),
    ]);
    args.extend_from_slice(client);
    docker(&args)
}

/// Runs `test-client connect <frontend> --count n` in a client container; its report lines.
fn connect_from_container(frontend: &str, count: u32) -> Vec<Attempt> {
    let name = unique("slb-client");
    let count = count.to_string();
    attempts(&run_client(
        &name,
        false,
        &["connect", frontend, "--count", &count],
    ))
}

/// A `test-client` running in the background, removed on drop.
struct BackgroundClient(Container);

impl BackgroundClient {
    fn start(client: &[&str]) -> Self {
        let name = unique("slb-client");
        let id = run_client(&name, true, client);
        Self(Container { id, name })
    }

    fn output(&self) -> String {
        let out = Command::new("docker")
            .args(["logs", &self.0.id])
            .output()
            .expect("docker logs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn attempts(&self) -> Vec<Attempt> {
        attempts(&self.output())
    }

    /// Stops it (SIGTERM ends the loop at once) and returns every attempt.
    fn finish(self) -> Vec<Attempt> {
        docker(&["stop", "-t", "2", &self.0.id]);
        self.attempts()
    }
}

/// One connection as `test-client connect` reported it.
#[derive(Debug, Clone)]
struct Attempt {
    /// Unix milliseconds at the start of the connect.
    t: u128,
    outcome: Result<Reached, i32>,
}

#[derive(Debug, Clone)]
struct Reached {
    /// `getpeername()` in the client.
    peer: String,
    /// `getsockname()` in the client: its own address.
    local: String,
    /// The client address the backend saw, and the backend's name.
    seen_by_backend: String,
    backend: String,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

fn attempts(output: &str) -> Vec<Attempt> {
    output
        .lines()
        .filter_map(|line| {
            let t = field(line, "t")?.parse().ok()?;
            let outcome = if line.starts_with("ok ") {
                Ok(Reached {
                    peer: field(line, "peer")?.to_owned(),
                    local: field(line, "local")?.to_owned(),
                    seen_by_backend: field(line, "reply=peer")?.to_owned(),
                    backend: field(line, "backend")?.to_owned(),
                })
            } else {
                Err(field(line, "errno")?.parse().ok()?)
            };
            Some(Attempt { t, outcome })
        })
        .collect()
}

fn ip_of(addr: &str) -> String {
    addr.parse::<SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

fn kernel_connects(agent: &Agent, route: &WhoamiRoute) -> u64 {
    agent
        .metric(&format!(
            "router_socket_lb_connects_total{{route=\"{}\",port=\"{}\"}}",
            route.domain, route.port
        ))
        .unwrap_or(0)
}

fn accepted(agent: &Agent) -> u64 {
    agent
        .metric("router_connections_accepted_total")
        .expect("the accepted connections metric")
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis()
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn socket_lb_a_client_container_reaches_both_backends_straight_through_the_kernel() {
    let agent = Agent::start(&[]);
    let route = WhoamiRoute::new();
    let backends = [route.backend(&[]), route.backend(&[])];
    wait_kernel_serves(&agent, route.port, &[&backends[0], &backends[1]]);
    let accepted_before = accepted(&agent);
    let connects_before = kernel_connects(&agent, &route);

    let frontend = route.frontend();
    let attempts = connect_from_container(&frontend, 40);
    assert_eq!(attempts.len(), 40, "{attempts:?}");
    let mut per_backend: BTreeMap<String, u32> = BTreeMap::new();
    for attempt in &attempts {
        let reached = attempt.outcome.as_ref().expect("every connect succeeds");
        assert_eq!(
            reached.peer, frontend,
            "getpeername() in the client shows the frontend"
        );
        assert_eq!(
            ip_of(&reached.seen_by_backend),
            ip_of(&reached.local),
            "the backend sees the client container's own address: {reached:?}"
        );
        assert_ne!(ip_of(&reached.seen_by_backend), gateway());
        *per_backend.entry(reached.backend.clone()).or_default() += 1;
    }
    let names: Vec<&str> = backends.iter().map(Container::short_id).collect();
    assert_eq!(
        per_backend.keys().map(String::as_str).collect::<Vec<_>>(),
        {
            let mut sorted = names.clone();
            sorted.sort_unstable();
            sorted
        },
        "both backends get connects: {per_backend:?}"
    );
    assert_eq!(
        accepted(&agent),
        accepted_before,
        "no connection went through the agent"
    );
    assert_eq!(
        kernel_connects(&agent, &route) - connects_before,
        40,
        "the route's kernel connect counter counts each connect"
    );
    let kernel = &tcp_route(&agent, route.port).expect("route")["kernel"];
    assert!(kernel["generation"].as_u64().unwrap_or(0) >= 1, "{kernel}");
    println!("40 connects in the kernel, per backend: {per_backend:?}");
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn socket_lb_docker_kill_sends_the_next_connects_to_the_survivor() {
    let agent = Agent::start(&[]);
    let route = WhoamiRoute::new();
    let (doomed, survivor) = (route.backend(&[]), route.backend(&[]));
    wait_kernel_serves(&agent, route.port, &[&doomed, &survivor]);
    let frontend = route.frontend();
    let client = BackgroundClient::start(&[
        "connect",
        &frontend,
        "--count",
        "0",
        "--interval-ms",
        "5",
        "--timeout-ms",
        "1000",
    ]);
    wait_for(
        "connects reaching both backends",
        Duration::from_secs(10),
        || {
            let seen: Vec<String> = client
                .attempts()
                .into_iter()
                .filter_map(|a| a.outcome.ok().map(|r| r.backend))
                .collect();
            [&doomed, &survivor]
                .iter()
                .all(|c| seen.iter().any(|b| b == c.short_id()))
        },
    );
    let since = (unix_ms() / 1000).to_string();
    docker(&["kill", &doomed.id]);
    let killed_at = unix_ms();
    wait_for(
        "200 connects after the kill",
        Duration::from_secs(20),
        || client.attempts().iter().filter(|a| a.t > killed_at).count() >= 200,
    );
    let attempts = client.finish();
    let until = (unix_ms() / 1000 + 1).to_string();
    let die_ns: u128 = docker(&[
        "events",
        "--since",
        &since,
        "--until",
        &until,
        "--filter",
        &format!("container={}", doomed.id),
        "--filter",
        "event=die",
        "--format",
        "{{.TimeNano}}",
    ])
    .lines()
    .next()
    .and_then(|l| l.trim().parse().ok())
    .expect("a die event of the killed backend");
    let died_at = die_ns / 1_000_000;
    // The last connect that did not reach the survivor: the switch happened after its start.
    let last_miss = attempts
        .iter()
        .filter(|a| {
            a.outcome
                .as_ref()
                .map_or(true, |r| r.backend != survivor.short_id())
        })
        .map(|a| a.t)
        .max()
        .unwrap_or(0);
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.t > last_miss).collect();
    println!(
        "die event at {died_at}; last connect not sent to the survivor started {} ms after it; \
         {} connects after it, all to the survivor",
        last_miss as i128 - died_at as i128,
        after.len()
    );
    assert!(
        last_miss < died_at + 1000,
        "connects still went to the killed backend (or failed) {} ms after its die event",
        last_miss - died_at
    );
    assert!(
        attempts.iter().filter(|a| a.t > died_at + 1000).all(|a| a
            .outcome
            .as_ref()
            .is_ok_and(|r| r.backend == survivor.short_id())),
        "every connect from 1 s after the die event reaches the survivor"
    );
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn socket_lb_docker_stop_lets_open_connections_finish_and_sends_new_ones_elsewhere() {
    let agent = Agent::start(&[]);
    let route = WhoamiRoute::new();
    let echo_domain = format!("{}.local", unique("slb-echo"));
    let echo_port = free_port();
    let echo_label = format!("aliyun.routing.port_{ECHO_PORT}=tcp://{echo_domain}:{echo_port}");
    let first = route.backend(&[&echo_label]);
    wait_kernel_serves(&agent, route.port, &[&first]);
    wait_kernel_serves(&agent, echo_port, &[&first]);
    // A session held open for 6 s, on the first backend (the only one yet).
    let echo_frontend = format!("{}:{echo_port}", gateway());
    let held = BackgroundClient::start(&[
        "hold",
        &echo_frontend,
        "--seconds",
        "6",
        "--interval-ms",
        "100",
    ]);
    wait_for(
        "the held session on the first backend",
        Duration::from_secs(10),
        || first.stat("tcp_connections") == 1,
    );
    let second = route.backend(&[&echo_label]);
    wait_kernel_serves(&agent, route.port, &[&first, &second]);

    // `docker stop` waits until the backend exits: it drains the held session first.
    let first_id = first.id.clone();
    let stopper = thread::spawn(move || docker(&["stop", "-t", "30", &first_id]));
    wait_for(
        "the first backend draining",
        Duration::from_secs(10),
        || {
            tcp_route(&agent, route.port).is_some_and(|r| {
                r["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|b| b["container_id"] == first.id.as_str() && b["state"] == "draining")
            })
        },
    );
    wait_kernel_serves(&agent, route.port, &[&second]);
    let attempts = connect_from_container(&route.frontend(), 20);
    assert!(
        attempts.iter().all(|a| a
            .outcome
            .as_ref()
            .is_ok_and(|r| r.backend == second.short_id())),
        "new connects go to the other backend while the first drains: {attempts:?}"
    );
    stopper.join().expect("docker stop");
    let report = held.output();
    let line = report
        .lines()
        .find(|l| l.starts_with("held"))
        .unwrap_or_default();
    assert!(
        line.starts_with("held ok") && line.ends_with(&format!("peer={echo_frontend}")),
        "the session open at the stop finished normally: {report:?}"
    );
    let pings: u32 = field(line, "pings")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    assert!(pings >= 20, "{line}");
    println!("the held session: {line}");
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn socket_lb_a_backend_of_weight_zero_gets_no_new_connects() {
    let agent = Agent::start(&[]);
    let route = WhoamiRoute::new();
    let light = route.backend(&["aliyun.routing.weight=0"]);
    let heavy = route.backend(&[]);
    // A weight-0 backend is `up` but takes no slot.
    wait_kernel_serves(&agent, route.port, &[&light, &heavy]);
    let attempts = connect_from_container(&route.frontend(), 30);
    assert!(
        attempts.iter().all(|a| a
            .outcome
            .as_ref()
            .is_ok_and(|r| r.backend == heavy.short_id())),
        "{attempts:?}"
    );
    assert_eq!(light.stat("whoami_connections"), 0);
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn socket_lb_with_no_up_backend_connect_fails_at_once_with_econnrefused() {
    let agent = Agent::start(&[]);
    let route = WhoamiRoute::new();
    let backend = route.backend(&[
        "aliyun.probe.url=http://container/health",
        "aliyun.probe.period_seconds=1",
        "aliyun.probe.failure_threshold=1",
    ]);
    wait_kernel_serves(&agent, route.port, &[&backend]);
    tests::client::get(backend.http_addr(), "backend", "/set-health?ok=0", &[])
        .expect("turning the backend unhealthy");
    wait_kernel_serves(&agent, route.port, &[]);
    let accepted_before = accepted(&agent);
    let refused = |agent: &Agent| {
        agent
            .metric(&format!(
                "router_socket_lb_refused_total{{route=\"{}\",port=\"{}\"}}",
                route.domain, route.port
            ))
            .unwrap_or(0)
    };
    let refused_before = refused(&agent);
    let started = Instant::now();
    let attempts = connect_from_container(&route.frontend(), 3);
    let took = started.elapsed();
    assert_eq!(attempts.len(), 3);
    for attempt in &attempts {
        assert_eq!(
            attempt.outcome.as_ref().err(),
            Some(&ECONNREFUSED),
            "{attempt:?}"
        );
    }
    assert_eq!(
        refused(&agent) - refused_before,
        3,
        "the kernel refused them"
    );
    assert_eq!(
        accepted(&agent),
        accepted_before,
        "the agent never saw them"
    );
    println!("3 refused connects, container run included: {took:?}");
}

/// A loop of connects from a container while the agent stops and a new one starts on the same
/// ports and pins; `salt` makes the first agent look like another build.
fn restart_under_load(first_agent_env: &[&str]) -> (Agent, Vec<Attempt>) {
    let mut wrapper = vec!["env"];
    wrapper.extend_from_slice(first_agent_env);
    let mut old = Agent::start_with_prefix(&wrapper, &[]);
    let route = WhoamiRoute::new();
    let backends = [route.backend(&[]), route.backend(&[])];
    wait_kernel_serves(&old, route.port, &[&backends[0], &backends[1]]);
    let frontend = route.frontend();
    let client = BackgroundClient::start(&[
        "connect",
        &frontend,
        "--count",
        "0",
        "--interval-ms",
        "2",
        "--timeout-ms",
        "1000",
    ]);
    wait_for("connects flowing", Duration::from_secs(10), || {
        client.attempts().len() >= 20
    });
    let pins = old.release_pins();
    let (port, admin) = (old.port, old.admin);
    let status = old.terminate(Duration::from_secs(20));
    assert!(status.success(), "the old agent exited cleanly: {status}");
    let stopped_at = unix_ms();
    wait_for(
        "connects with no agent running",
        Duration::from_secs(10),
        || {
            client
                .attempts()
                .iter()
                .filter(|a| a.t > stopped_at)
                .count()
                >= 20
        },
    );
    let new = Agent::start_with_pins(port, admin, pins, &[], &[]);
    wait_kernel_serves(&new, route.port, &[&backends[0], &backends[1]]);
    let owned_at = unix_ms();
    wait_for(
        "connects under the new agent",
        Duration::from_secs(10),
        || client.attempts().iter().filter(|a| a.t > owned_at).count() >= 20,
    );
    let attempts = client.finish();
    let during_gap = attempts
        .iter()
        .filter(|a| a.t > stopped_at && a.t < owned_at)
        .count();
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.outcome.is_err()).collect();
    println!(
        "{} connects across the restart ({during_gap} while no agent served), {} failed",
        attempts.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed connects: {failed:?}");
    assert!(during_gap > 0);
    drop(old);
    (new, attempts)
}

/// The other order (Swarm's `start-first`, `tests/tests/restart.rs`): the successor starts on
/// the same ports and pins while the old agent still runs, claims the maps once ready, and the
/// old one stops writing them before it is stopped.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn socket_lb_a_successor_started_first_takes_the_maps_over_without_a_failed_connect() {
    let mut old = Agent::start(&[]);
    let route = WhoamiRoute::new();
    let backends = [route.backend(&[]), route.backend(&[])];
    wait_kernel_serves(&old, route.port, &[&backends[0], &backends[1]]);
    let client = BackgroundClient::start(&[
        "connect",
        &route.frontend(),
        "--count",
        "0",
        "--interval-ms",
        "2",
        "--timeout-ms",
        "1000",
    ]);
    wait_for("connects flowing", Duration::from_secs(10), || {
        client.attempts().len() >= 20
    });
    let pins = old.release_pins();
    let new = Agent::start_with_pins(old.port, old.admin, pins, &[], &[]);
    wait_kernel_serves(&new, route.port, &[&backends[0], &backends[1]]);
    // The old agent notices at its next pass (a routing change or the 5 s address refresh).
    wait_for(
        "the old agent to stop writing the maps",
        Duration::from_secs(10),
        || {
            old.log()
                .contains("took the pinned maps over; this one no longer writes them")
        },
    );
    let status = old.terminate(Duration::from_secs(20));
    assert!(status.success(), "the old agent exited cleanly: {status}");
    let stopped_at = unix_ms();
    wait_for(
        "connects after the old agent left",
        Duration::from_secs(10),
        || {
            client
                .attempts()
                .iter()
                .filter(|a| a.t > stopped_at)
                .count()
                >= 20
        },
    );
    let attempts = client.finish();
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.outcome.is_err()).collect();
    println!(
        "{} connects across the handover, {} failed",
        attempts.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed connects: {failed:?}");
    assert!(
        new.log().contains("took over the pinned maps from agent")
            && new
                .log()
                .contains("adopted the pinned programs of this build"),
        "{}",
        new.log()
    );
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn socket_lb_connects_never_fail_while_the_agent_restarts() {
    let (new, _) = restart_under_load(&[]);
    assert!(
        new.log()
            .contains("adopted the pinned programs of this build"),
        "{}",
        new.log()
    );
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn socket_lb_a_stale_program_of_an_older_build_is_replaced_without_a_failed_connect() {
    let salt = format!("{SALT_ENV}=older");
    let (new, _) = restart_under_load(&[&salt]);
    assert!(
        new.log().contains("replaced the pinned programs of build"),
        "{}",
        new.log()
    );
}

/// The variable that gives an agent another build id (the agent's `BUILD_SALT_ENV`).
const SALT_ENV: &str = "ROUTER_SOCKET_LB_BUILD_SALT";

/// Ids of the programs behind the links an agent pinned under `pins` (other agents of this
/// machine, of concurrent test runs, attach theirs to the same test cgroup).
fn programs_linked_under(pins: &std::path::Path) -> Vec<String> {
    let mut ids = Vec::new();
    for dir in std::fs::read_dir(pins.join("socket-lb")).expect("the pin directory") {
        let dir = dir.expect("a pin directory entry").path();
        if !dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("cgroup-"))
        {
            continue;
        }
        for link in std::fs::read_dir(&dir).expect("the cgroup's links") {
            let link = link.expect("a link pin").path();
            let out = Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(&link)
                .output()
                .expect("bpftool runs");
            let info: Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
            ids.push(info["prog_id"].to_string());
        }
    }
    ids
}

/// Ids of the socket-LB programs attached to the tests' cgroup now.
fn attached_programs() -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(agent::test_cgroup_path())
        .output()
        .expect("bpftool runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("slb_"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn socket_lb_uninstall_detaches_the_programs_and_removes_every_pin() {
    let mut agent = Agent::start(&[]);
    let route = WhoamiRoute::new();
    let backend = route.backend(&[]);
    wait_kernel_serves(&agent, route.port, &[&backend]);
    let pins = agent.release_pins();
    let ours_before = programs_linked_under(&pins);
    assert_eq!(
        ours_before.len(),
        2,
        "connect4 and getpeername4: {ours_before:?}"
    );
    agent.terminate(Duration::from_secs(20));
    assert!(pins.exists(), "the pins outlive the agent");
    let attached = attached_programs();
    assert!(
        ours_before.iter().all(|id| attached.contains(id)),
        "the programs stay attached: {ours_before:?} in {attached:?}"
    );

    let out = Command::new(agent::agent_binary())
        .arg("uninstall")
        .arg("--pin-path")
        .arg(&pins)
        .output()
        .expect("router-agent uninstall runs");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains("socket-level balancing uninstalled"),
        "{report}"
    );
    assert!(!pins.exists(), "{} is gone: {report}", pins.display());
    let left: Vec<String> = attached_programs()
        .into_iter()
        .filter(|id| ours_before.contains(id))
        .collect();
    assert!(left.is_empty(), "still attached: {left:?}");
    println!("{report}");
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn socket_lb_an_unprivileged_agent_serves_tcp_routes_in_userspace() {
    let agent = Agent::start_with_prefix(
        &[
            "setpriv",
            "--bounding-set",
            "-bpf,-sys_admin,-perfmon",
            "--",
        ],
        &[],
    );
    let log = agent.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("unavailable")).collect();
    assert_eq!(
        lines.len(),
        1,
        "one line says what runs in userspace: {log}"
    );
    assert!(lines[0].contains("no socket-level balancing"), "{log}");
    let route = WhoamiRoute::new();
    let backend = route.backend(&[]);
    wait_for("the route up", Duration::from_secs(20), || {
        tcp_route(&agent, route.port)
            .is_some_and(|r| r["backends"][0]["state"] == "up" && r["kernel"]["served"] == false)
    });
    let accepted_before = accepted(&agent);
    let attempts = connect_from_container(&route.frontend(), 5);
    for attempt in &attempts {
        let reached = attempt.outcome.as_ref().expect("connects succeed");
        assert_eq!(reached.backend, backend.short_id());
        assert_eq!(
            ip_of(&reached.seen_by_backend),
            gateway(),
            "through the agent, the backend sees the host's address"
        );
    }
    assert_eq!(accepted(&agent) - accepted_before, 5);
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn socket_lb_off_detaches_what_an_earlier_agent_pinned() {
    let mut old = Agent::start(&[]);
    let route = WhoamiRoute::new();
    let backend = route.backend(&[]);
    wait_kernel_serves(&old, route.port, &[&backend]);
    let pins = old.release_pins();
    let (port, admin) = (old.port, old.admin);
    let ours = programs_linked_under(&pins);
    old.terminate(Duration::from_secs(20));
    let attached = attached_programs();
    assert!(
        !ours.is_empty() && ours.iter().all(|id| attached.contains(id)),
        "pinned programs outlive the agent: {ours:?} in {attached:?}"
    );

    let off = Agent::start_with_pins(port, admin, pins.clone(), &[], &["--socket-lb", "off"]);
    assert!(
        off.log()
            .contains("detached the programs an earlier agent pinned"),
        "{}",
        off.log()
    );
    assert!(!pins.exists(), "{} is gone", pins.display());
    assert!(
        attached_programs().iter().all(|id| !ours.contains(id)),
        "nothing of the earlier agent stays attached"
    );
    wait_for("the route up", Duration::from_secs(20), || {
        tcp_route(&off, route.port)
            .is_some_and(|r| r["backends"][0]["state"] == "up" && r["kernel"]["served"] == false)
    });
    let attempts = connect_from_container(&route.frontend(), 3);
    for attempt in &attempts {
        let reached = attempt.outcome.as_ref().expect("connects succeed");
        assert_eq!(
            ip_of(&reached.seen_by_backend),
            gateway(),
            "through the agent's listener"
        );
    }
}
