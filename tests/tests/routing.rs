//! HTTP routing through the agent with real clients: host and path matching, keep-alive with
//! per-request routing, weights, bodies in both directions, the router's own statuses, and
//! passive failure detection.
use std::{collections::HashMap, process::Command, time::Duration};

use tests::{
    agent::Agent,
    client::{self, KeepAlive},
    docker::Container,
    tools::{curl, sha256_of},
    unique,
};

fn route_label(route: &str) -> String {
    format!("aliyun.routing.port_80={route}")
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn keep_alive_connection_routes_each_request_by_its_own_host() {
    let (one, two) = (
        format!("{}.local", unique("ka-one")),
        format!("{}.local", unique("ka-two")),
    );
    let agent = Agent::start(&[]);
    let first = Container::backend(&unique("ka"), &[&route_label(&one)]);
    let second = Container::backend(&unique("ka"), &[&route_label(&two)]);
    agent.wait_up(&one, &[&first.id], Duration::from_secs(15));
    agent.wait_up(&two, &[&second.id], Duration::from_secs(15));

    let mut connection = KeepAlive::connect(agent.http_addr()).expect("connect");
    for (host, expected) in [
        (&one, &first),
        (&two, &second),
        (&one, &first),
        (&two, &second),
    ] {
        let response = connection
            .get(host, "/")
            .expect("response on the same connection");
        assert_eq!(response.status, 200);
        assert_eq!(response.backend(), Some(expected.short_id()), "Host {host}");
    }
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn longest_context_path_wins() {
    let domain = format!("{}.local", unique("paths"));
    let agent = Agent::start(&[]);
    let root = Container::backend(&unique("paths"), &[&route_label(&domain)]);
    let api = Container::backend(&unique("paths"), &[&route_label(&format!("{domain}/api"))]);
    agent.wait_up(&domain, &[&root.id], Duration::from_secs(15));
    wait_route_up(&agent, &domain, "/api");
    for (path, expected) in [
        ("/", &root),
        ("/api", &api),
        ("/api/users?id=1", &api),
        ("/apix", &root),
        ("/API", &root),
    ] {
        let response = client::get(agent.http_addr(), &domain, path, &[]).expect("request");
        assert_eq!(response.backend(), Some(expected.short_id()), "{path}");
    }
}

fn wait_route_up(agent: &Agent, domain: &str, path: &str) {
    tests::wait_for(
        &format!("route {domain}{path} up"),
        Duration::from_secs(15),
        || {
            agent.route(domain, path).is_some_and(|r| {
                r["backends"]
                    .as_array()
                    .is_some_and(|b| b.iter().any(|b| b["state"] == "up"))
            })
        },
    );
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn weights_split_traffic() {
    let domain = format!("{}.local", unique("weights"));
    let agent = Agent::start(&[]);
    let light = Container::backend(
        &unique("w"),
        &[
            &route_label(&domain),
            "aliyun.routing.weight=25",
            "aliyun.routing.session_sticky=false",
        ],
    );
    let heavy = Container::backend(
        &unique("w"),
        &[
            &route_label(&domain),
            "aliyun.routing.weight=75",
            "aliyun.routing.session_sticky=false",
        ],
    );
    let idle = Container::backend(
        &unique("w"),
        &[
            &route_label(&domain),
            "aliyun.routing.weight=0",
            "aliyun.routing.session_sticky=false",
        ],
    );
    agent.wait_up(
        &domain,
        &[&light.id, &heavy.id, &idle.id],
        Duration::from_secs(15),
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let response = client::get(agent.http_addr(), &domain, "/", &[]).expect("request");
        assert_eq!(
            response.sticky_cookie(),
            None,
            "session_sticky=false sets no cookie"
        );
        *counts
            .entry(response.backend().expect("backend").to_owned())
            .or_default() += 1;
    }
    assert_eq!(counts.get(light.short_id()), Some(&10), "{counts:?}");
    assert_eq!(counts.get(heavy.short_id()), Some(&30), "{counts:?}");
    assert_eq!(
        counts.get(idle.short_id()),
        None,
        "weight 0 takes no new traffic: {counts:?}"
    );
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn router_statuses_for_unknown_host_and_no_backend() {
    let starting = format!("{}.local", unique("starting"));
    let agent = Agent::start(&[]);
    let response = client::get(agent.http_addr(), "nobody.local", "/", &[]).expect("request");
    assert_eq!(response.status, 404);
    assert_eq!(response.header("connection"), Some("close"));
    // A probe that never passes keeps the only backend starting: the route exists, nothing is up.
    let backend = Container::backend(
        &unique("starting"),
        &[
            &route_label(&starting),
            "aliyun.probe.url=http://container:80/missing-health",
            "aliyun.probe.initial_delay_seconds=600",
        ],
    );
    tests::wait_for(
        "the starting backend listed",
        Duration::from_secs(15),
        || agent.state_of(&starting, &backend.id).as_deref() == Some("starting"),
    );
    let response = client::get(agent.http_addr(), &starting, "/", &[]).expect("request");
    assert_eq!(response.status, 503);
    let view = agent.container(&backend.id).expect("listed");
    assert!(
        view["not_routed_because"]
            .as_str()
            .unwrap()
            .contains("starting"),
        "{view}"
    );
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn connection_refused_counts_as_a_failure_at_once_and_the_request_is_retried() {
    let domain = format!("{}.local", unique("passive"));
    let agent = Agent::start(&[]);
    // Routed to port 8081, where nothing listens: every connection is refused.
    let broken = Container::backend(
        &unique("passive"),
        &[&format!("aliyun.routing.port_8081={domain}")],
    );
    let working = Container::backend(&unique("passive"), &[&route_label(&domain)]);
    agent.wait_up(&domain, &[&broken.id, &working.id], Duration::from_secs(15));
    for _ in 0..6 {
        let response = client::get(agent.http_addr(), &domain, "/", &[]).expect("request");
        assert_eq!(response.status, 200, "retried on the working replica");
        assert_eq!(response.backend(), Some(working.short_id()));
    }
    assert_eq!(agent.state_of(&domain, &broken.id).as_deref(), Some("down"));
    let metrics = String::from_utf8(
        client::get(agent.admin, "localhost", "/metrics", &[])
            .unwrap()
            .body,
    )
    .unwrap();
    assert!(
        metrics.contains("router_exchange_errors_total{kind=\"connect\"} 1\n"),
        "one refused connect, then down:\n{metrics}"
    );
    assert!(metrics.contains("router_retries_total 1\n"), "{metrics}");
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn bodies_cross_the_router_intact_in_both_directions() {
    let domain = format!("{}.local", unique("bodies"));
    let agent = Agent::start(&[]);
    let backend = Container::backend(&unique("bodies"), &[&route_label(&domain)]);
    agent.wait_up(&domain, &[&backend.id], Duration::from_secs(15));
    let base = format!("http://127.0.0.1:{}", agent.port);
    let host = format!("Host: {domain}");

    let file = std::env::temp_dir().join(unique("upload"));
    let status = Command::new("sh")
        .args([
            "-c",
            &format!("head -c 3000000 /dev/urandom > {}", file.display()),
        ])
        .status()
        .expect("sh");
    assert!(status.success());
    let digest = sha256_of(&file);
    let upload = format!("@{}", file.display());

    // Upload with Content-Length, then chunked.
    let by_length = curl(&[
        "-H",
        &host,
        "--data-binary",
        &upload,
        &format!("{base}/sha256"),
    ]);
    assert_eq!(by_length, format!("3000000 {digest}"));
    let chunked = curl(&[
        "-H",
        &host,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &upload,
        &format!("{base}/sha256"),
    ]);
    assert_eq!(chunked, format!("3000000 {digest}"));

    // Download with Content-Length, then chunked; the pattern is byte i = i % 251.
    for query in ["n=2500000", "n=2500000&chunked=1"] {
        let out = Command::new("curl")
            .args([
                "-s",
                "--fail",
                "-H",
                &host,
                &format!("{base}/bytes?{query}"),
            ])
            .output()
            .expect("curl");
        assert!(out.status.success());
        assert_eq!(out.stdout.len(), 2_500_000, "{query}");
        assert!(
            out.stdout
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 251) as u8),
            "{query}: content differs"
        );
    }
    let _ = std::fs::remove_file(file);
}
