//! Replicas leaving under load: `docker kill` and `docker stop`, measured with a steady request
//! stream. The measured figures are printed (run with --nocapture to see them).
use std::{
    thread,
    time::{Duration, Instant},
};

use tests::{
    agent::Agent,
    client,
    docker::{Container, docker},
    stream::RequestStream,
    unique, wait_for,
};

fn two_backends(agent: &Agent, domain: &str, prefix: &str) -> (Container, Container) {
    let route = format!("aliyun.routing.port_80={domain}");
    let a = Container::backend(&unique(prefix), &[&route]);
    let b = Container::backend(&unique(prefix), &[&route]);
    agent.wait_up(domain, &[&a.id, &b.id], Duration::from_secs(15));
    (a, b)
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn docker_kill_removes_the_replica_within_a_second_and_no_request_fails() {
    let domain = format!("{}.local", unique("kill"));
    let agent = Agent::start(&[]);
    let (victim, survivor) = two_backends(&agent, &domain, "kill");

    let stream = RequestStream::start(agent.http_addr(), &domain, "/");
    thread::sleep(Duration::from_millis(500));
    let kill_started = Instant::now();
    docker(&["kill", &victim.id]);
    wait_for(
        "the killed replica to leave the routes",
        Duration::from_secs(5),
        || agent.state_of(&domain, &victim.id).is_none(),
    );
    let removed_after = kill_started.elapsed();
    thread::sleep(Duration::from_millis(500));
    let outcomes = stream.finish();

    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let last_from_victim = outcomes
        .iter()
        .filter(|o| o.result.as_deref() == Ok(victim.short_id()))
        .map(|o| o.started)
        .max()
        .expect("the victim served requests before the kill");
    let survivor_after = outcomes
        .iter()
        .filter(|o| o.started > kill_started && o.result.as_deref() == Ok(survivor.short_id()))
        .count();
    eprintln!(
        "docker kill: removed from routing {removed_after:?} after the kill started \
         (the die event follows the kill); last request to reach it started {:?} relative to \
         the kill; {} of {} requests failed",
        last_from_victim
            .checked_duration_since(kill_started)
            .map_or_else(
                || format!("-{:?}", kill_started.duration_since(last_from_victim)),
                |d| format!("+{d:?}")
            ),
        failed.len(),
        outcomes.len()
    );
    assert!(
        removed_after < Duration::from_secs(1),
        "removal took {removed_after:?}"
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(survivor_after > 0, "the survivor took over");
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn docker_stop_drains_in_flight_requests_with_zero_failures() {
    let domain = format!("{}.local", unique("stop"));
    let agent = Agent::start(&[]);
    let (leaving, staying) = two_backends(&agent, &domain, "stop");

    let stream = RequestStream::start(agent.http_addr(), &domain, "/");
    // Slow requests pinned to the leaving replica by its cookie: in flight during the stop.
    let addr = agent.http_addr();
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            let (domain, cookie) = (domain.clone(), format!("CONTAINERID={}", leaving.id));
            thread::spawn(move || {
                client::get(addr, &domain, "/delay?ms=2000", &[("Cookie", &cookie)])
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));

    // Watch for the draining state while `docker stop` runs.
    let stop_started = Instant::now();
    let (draining_seen, stop_took) = thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                match agent.state_of(&domain, &leaving.id).as_deref() {
                    Some("draining") => return Some(Instant::now()),
                    None => return None,
                    _ => thread::sleep(Duration::from_millis(5)),
                }
            }
            None
        });
        docker(&["stop", "-t", "10", &leaving.id]);
        let stop_took = stop_started.elapsed();
        (watcher.join().expect("watcher"), stop_took)
    });
    let draining_seen = draining_seen.expect("the replica was seen draining");
    wait_for(
        "the stopped replica to leave the routes",
        Duration::from_secs(5),
        || agent.state_of(&domain, &leaving.id).is_none(),
    );
    thread::sleep(Duration::from_millis(300));
    let outcomes = stream.finish();

    for request in in_flight {
        let response = request
            .join()
            .expect("thread")
            .expect("in-flight request completed");
        assert_eq!(
            response.status, 200,
            "in-flight request finished during the drain"
        );
        assert_eq!(response.backend(), Some(leaving.short_id()));
    }
    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let new_to_leaving = outcomes
        .iter()
        .filter(|o| o.started > draining_seen && o.result.as_deref() == Ok(leaving.short_id()))
        .count();
    let staying_after = outcomes
        .iter()
        .filter(|o| o.started > stop_started && o.result.as_deref() == Ok(staying.short_id()))
        .count();
    eprintln!(
        "docker stop: draining seen {:?} after the stop started; stop took {stop_took:?}; \
         4 in-flight 2 s requests completed; {} of {} stream requests failed",
        draining_seen.duration_since(stop_started),
        failed.len(),
        outcomes.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert_eq!(
        new_to_leaving, 0,
        "no new request reached the draining replica"
    );
    assert!(staying_after > 0);
}
