//! Restarts without a gap (issue 9, finding 2): an agent started while the old one drains
//! takes over the same ports, serves only once it has synced with Docker and checked the
//! containers, and does not send healthy long-running containers back to `starting`.
use std::{thread, time::Duration};

use tests::{agent::Agent, client, docker::Container, stream::RequestStream, unique, wait_for};

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn a_successor_takes_over_under_load_without_a_failed_request() {
    let mut old = Agent::start(&[]);
    let domain = format!("{}.local", unique("restart"));
    // Probed replicas with an initial delay: a successor that counted it from its own start
    // would hold them `starting`, answering 503 for that long.
    let labels = [
        format!("aliyun.routing.port_80={domain}"),
        "aliyun.probe.url=http://container/health".to_owned(),
        "aliyun.probe.initial_delay_seconds=4".to_owned(),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let replicas = [
        Container::backend(&unique("restart"), &labels),
        Container::backend(&unique("restart"), &labels),
    ];
    let ids: Vec<&str> = replicas.iter().map(|c| c.id.as_str()).collect();
    old.wait_up(&domain, &ids, Duration::from_secs(20));

    let addr = old.http_addr();
    let in_flight = {
        let domain = domain.clone();
        thread::spawn(move || client::get(addr, &domain, "/delay?ms=2000", &[]))
    };
    wait_for("the slow request in flight", Duration::from_secs(5), || {
        old.metric("router_connections_active") == Some(1)
    });
    let stream = RequestStream::start(addr, &domain, "/");
    let (port, admin) = (old.port, old.admin);
    let stopper = thread::spawn(move || {
        let status = old.terminate(Duration::from_secs(20));
        (status, old)
    });
    // Started at once, on the same ports, while the old one hands over.
    let new = Agent::start_on(port, admin, &[], &[]);
    let states: Vec<String> = new
        .backend_states(&domain)
        .into_iter()
        .map(|(_, state)| state)
        .collect();
    assert_eq!(
        states,
        ["up", "up"],
        "the successor serves with the long-running replicas up"
    );
    let (exit_status, old) = stopper.join().expect("stopper");
    assert!(
        exit_status.success(),
        "the old agent exited cleanly: {exit_status}"
    );
    // Some requests on the successor alone.
    wait_for("requests on the successor", Duration::from_secs(5), || {
        new.metric("router_requests_total").unwrap_or_default() >= 20
    });
    let outcomes = stream.finish();
    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    println!(
        "{} requests across the restart, {} failed; the old agent's log:\n{}",
        outcomes.len(),
        failed.len(),
        old.log()
            .lines()
            .filter(|l| l.contains("successor") || l.contains("SIGTERM"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(failed.is_empty(), "failed across the restart: {failed:?}");
    let slow = in_flight
        .join()
        .expect("thread")
        .expect("in-flight request");
    assert_eq!(
        slow.status, 200,
        "the request in flight finished on the old agent"
    );
    assert!(
        old.log().contains("a successor listens on every HTTP port"),
        "the old agent stopped accepting because its successor listened"
    );
}
