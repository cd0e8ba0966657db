//! Health checks take replicas out and bring them back: HTTP probes, exec probes, Docker's own
//! HEALTHCHECK. The backend's health is flipped through its own `/set-health` endpoint (HTTP
//! probe, HEALTHCHECK) or a file (exec probe).
use std::{collections::HashSet, net::SocketAddr, time::Duration};

use tests::{
    agent::Agent,
    client,
    docker::{Container, backend_image, docker, with_labels},
    unique, wait_for,
};

/// Which replicas answer `n` requests.
fn answering(agent: &Agent, domain: &str, n: usize) -> HashSet<String> {
    (0..n)
        .map(|_| {
            let response = client::get(agent.http_addr(), domain, "/", &[]).expect("request");
            assert_eq!(response.status, 200, "{response:?}");
            response.backend().expect("X-Backend").to_owned()
        })
        .collect()
}

fn set_health(container: &Container, ok: bool) {
    let addr: SocketAddr = format!("{}:80", container.ip())
        .parse()
        .expect("container address");
    let path = format!("/set-health?ok={}", u8::from(ok));
    let response = client::get(addr, "backend", &path, &[]).expect("backend answers directly");
    assert_eq!(response.status, 200);
}

/// A flaky replica next to a steady one; flip the flaky one's health and watch routing follow.
fn check_out_and_back(
    agent: &Agent,
    domain: &str,
    flaky: &Container,
    steady: &Container,
    flip: impl Fn(bool),
) {
    agent.wait_up(domain, &[&flaky.id, &steady.id], Duration::from_secs(15));
    let both: HashSet<String> = [flaky.short_id().to_owned(), steady.short_id().to_owned()].into();
    assert_eq!(answering(agent, domain, 10), both);

    flip(false);
    wait_for(
        "the failing replica to go down",
        Duration::from_secs(10),
        || agent.state_of(domain, &flaky.id).as_deref() == Some("down"),
    );
    assert_eq!(
        answering(agent, domain, 20),
        HashSet::from([steady.short_id().to_owned()])
    );

    flip(true);
    agent.wait_up(domain, &[&flaky.id, &steady.id], Duration::from_secs(10));
    assert_eq!(answering(agent, domain, 10), both);
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn http_probe_failure_takes_the_replica_out_and_recovery_brings_it_back() {
    let domain = format!("{}.local", unique("probe-http"));
    let route = format!("aliyun.routing.port_80={domain}");
    let labels = [
        route.as_str(),
        "aliyun.probe.url=http://container:80/health",
        "aliyun.probe.period_seconds=1",
        "aliyun.probe.failure_threshold=2",
        "aliyun.probe.success_threshold=1",
    ];
    let agent = Agent::start(&[]);
    let flaky = Container::backend(&unique("probe-http"), &labels);
    let steady = Container::backend(&unique("probe-http"), &labels);
    check_out_and_back(&agent, &domain, &flaky, &steady, |ok| {
        set_health(&flaky, ok);
    });
    let view = agent.container(&flaky.id).expect("in /api/containers");
    let history = view["history"].to_string();
    assert!(history.contains("probe failed: HTTP 503"), "{history}");
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn exec_probe_failure_takes_the_replica_out_and_recovery_brings_it_back() {
    let domain = format!("{}.local", unique("probe-exec"));
    let route = format!("aliyun.routing.port_80={domain}");
    let labels = [
        route.as_str(),
        "aliyun.probe.cmd=test ! -f /tmp/broken",
        "aliyun.probe.period_seconds=1",
        "aliyun.probe.failure_threshold=1",
    ];
    let agent = Agent::start(&[]);
    let flaky = Container::backend(&unique("probe-exec"), &labels);
    let steady = Container::backend(&unique("probe-exec"), &labels);
    check_out_and_back(&agent, &domain, &flaky, &steady, |ok| {
        let command = if ok {
            "rm -f /tmp/broken"
        } else {
            "touch /tmp/broken"
        };
        docker(&["exec", &flaky.id, "sh", "-c", command]);
    });
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn docker_healthcheck_status_is_honoured() {
    let domain = format!("{}.local", unique("healthcheck"));
    let route = format!("aliyun.routing.port_80={domain}");
    let agent = Agent::start(&[]);
    let run = |name: &str| {
        Container::run(
            name,
            &with_labels(
                &[&route],
                &[
                    "--health-cmd",
                    "wget -q -O /dev/null http://127.0.0.1/health",
                    "--health-interval",
                    "1s",
                    "--health-retries",
                    "1",
                    backend_image(),
                ],
            ),
        )
    };
    let flaky = run(&unique("healthcheck"));
    // Until Docker reports healthy, the replica is starting and gets nothing.
    let first_state = agent.state_of(&domain, &flaky.id);
    assert!(
        matches!(first_state.as_deref(), None | Some("starting")),
        "before the first HEALTHCHECK passed: {first_state:?}"
    );
    let steady = run(&unique("healthcheck"));
    check_out_and_back(&agent, &domain, &flaky, &steady, |ok| {
        set_health(&flaky, ok);
    });
}
