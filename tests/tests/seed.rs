//! The seed scenario: two `restserver` replicas (nginx) with the seed's labels behind
//! `<name>.local`, and a client container that reaches the router through
//! `extra_hosts: <name>.local:host-gateway`, exactly as the compose example does.
use std::time::Duration;

use tests::{
    agent::Agent,
    docker::{CURL_IMAGE, Container, NGINX_IMAGE, docker, with_labels},
    unique,
};

/// One response as curl dumped its head: (status line, X-Hostname, CONTAINERID cookie).
#[derive(Debug)]
struct Seen {
    status: String,
    hostname: Option<String>,
    cookie: Option<String>,
}

/// Runs `curl -D -` in a client container `times` times and parses the dumped heads.
fn client_requests(domain: &str, port: u16, times: usize, cookie: Option<&str>) -> Vec<Seen> {
    let cookie_arg = cookie
        .map(|c| format!("-b CONTAINERID={c}"))
        .unwrap_or_default();
    let script = format!(
        "for i in $(seq {times}); do curl -s -o /dev/null -D - {cookie_arg} http://{domain}:{port}/; done"
    );
    let output = docker(&[
        "run",
        "--rm",
        "--label",
        "router-test=1",
        "--add-host",
        &format!("{domain}:host-gateway"),
        CURL_IMAGE,
        "sh",
        "-c",
        &script,
    ]);
    output
        .split("HTTP/1.1 ")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let header = |name: &str| {
                block.lines().find_map(|line| {
                    let (n, v) = line.split_once(':')?;
                    n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                })
            };
            Seen {
                status: block.lines().next().unwrap_or_default().trim().to_owned(),
                hostname: header("x-hostname"),
                cookie: header("set-cookie").and_then(|c| {
                    c.strip_prefix("CONTAINERID=")
                        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
                }),
            }
        })
        .collect()
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn two_replicas_alternate_and_cookies_name_the_answering_container() {
    let domain = format!("{}.local", unique("restserver"));
    let route_label = format!("aliyun.routing.port_80={domain}");
    let labels = [
        route_label.as_str(),
        "aliyun.scale=2",
        "aliyun.probe.url=http://container:80",
        "aliyun.probe.initial_delay_seconds=2",
        "aliyun.probe.timeout_seconds=2",
    ];
    let agent = Agent::start(&[]);
    let first = Container::run(&unique("restserver"), &with_labels(&labels, &[NGINX_IMAGE]));
    let second = Container::run(&unique("restserver"), &with_labels(&labels, &[NGINX_IMAGE]));
    // The probe's initial delay holds both in `starting` for 2 s first.
    agent.wait_up(&domain, &[&first.id, &second.id], Duration::from_secs(20));

    let seen = client_requests(&domain, agent.port, 6, None);
    assert_eq!(seen.len(), 6, "{seen:?}");
    for response in &seen {
        assert!(response.status.starts_with("200"), "{seen:?}");
        let cookie = response
            .cookie
            .as_deref()
            .expect("every response sets CONTAINERID");
        assert_eq!(cookie.len(), 64, "a full container id: {cookie}");
        assert!(
            cookie == first.id || cookie == second.id,
            "{cookie} is not a replica"
        );
        // The replica that answered (nginx's $hostname is the short id) is the one named.
        assert_eq!(
            response.hostname.as_deref(),
            Some(&cookie[..12]),
            "{seen:?}"
        );
    }
    for pair in seen.windows(2) {
        assert_ne!(
            pair[0].cookie, pair[1].cookie,
            "requests alternate between replicas: {seen:?}"
        );
    }

    // The cookie pins the session: every request goes to that replica, and no new cookie is set.
    let pinned = client_requests(&domain, agent.port, 4, Some(&second.id));
    assert_eq!(pinned.len(), 4, "{pinned:?}");
    for response in &pinned {
        assert!(response.status.starts_with("200"), "{pinned:?}");
        assert_eq!(
            response.hostname.as_deref(),
            Some(second.short_id()),
            "{pinned:?}"
        );
        assert_eq!(response.cookie, None, "{pinned:?}");
    }
}
