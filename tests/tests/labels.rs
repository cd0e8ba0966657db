//! A container with a bad label is reported (log line and `/api/containers`) and skipped;
//! every other route keeps working.
use std::time::Duration;

use tests::{
    agent::Agent,
    client,
    docker::Container,
    unique, wait_for,
    ws::{OP_BINARY, OP_CLOSE, WebSocket},
};

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn bad_label_is_reported_and_other_routes_work() {
    let good_domain = format!("{}.local", unique("good"));
    let agent = Agent::start(&[]);
    let bad = Container::backend(
        &unique("bad-label"),
        &[
            "aliyun.routing.port_80=Bad_Name.local",
            "aliyun.routing.weight=150",
        ],
    );
    let good = Container::backend(
        &unique("good"),
        &[&format!("aliyun.routing.port_80={good_domain}")],
    );
    agent.wait_up(&good_domain, &[&good.id], Duration::from_secs(15));

    let response = client::get(agent.http_addr(), &good_domain, "/", &[]).expect("request");
    assert_eq!(response.status, 200);
    assert_eq!(response.backend(), Some(good.short_id()));

    wait_for(
        "the bad container in /api/containers",
        Duration::from_secs(5),
        || agent.container(&bad.id).is_some(),
    );
    let view = agent.container(&bad.id).expect("listed");
    assert_eq!(view["routed"], false, "{view}");
    let errors = view["errors"].as_array().expect("errors").clone();
    assert_eq!(errors.len(), 2, "both bad labels are reported: {view}");
    let port_error = errors
        .iter()
        .find(|e| e["label"] == "aliyun.routing.port_80")
        .expect("route error");
    assert_eq!(port_error["value"], "Bad_Name.local");
    assert!(
        port_error["reason"]
            .as_str()
            .unwrap()
            .contains("lower-case"),
        "{port_error}"
    );
    let weight_error = errors
        .iter()
        .find(|e| e["label"] == "aliyun.routing.weight")
        .expect("weight error");
    assert!(
        weight_error["reason"]
            .as_str()
            .unwrap()
            .contains("0 to 100"),
        "{weight_error}"
    );

    // No route was made from the bad container.
    let routes = agent.json("/api/routes").to_string();
    assert!(!routes.contains(&bad.id), "{routes}");
    // The log names container, label, value and reason.
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains(&bad.name)
            && l.contains("aliyun.routing.port_80")
            && l.contains("Bad_Name.local")
            && l.contains("lower-case")),
        "{log}"
    );
}

/// `https://` and `wss://` routes (acsrouting: TLS ended in front of the router, on the cloud
/// load balancer) are served as plain HTTP and WebSocket, and keep their scheme in the admin
/// API.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn https_and_wss_routes_are_served_behind_a_tls_terminator() {
    let https_domain = format!("{}.local", unique("https"));
    let wss_domain = format!("{}.local", unique("wss"));
    let agent = Agent::start(&[]);
    let web = Container::backend(
        &unique("https"),
        &[&format!("aliyun.routing.port_80=https://{https_domain}")],
    );
    let chat = Container::backend(
        &unique("wss"),
        &[&format!("aliyun.routing.port_80=wss://{wss_domain}")],
    );
    agent.wait_up(&https_domain, &[&web.id], Duration::from_secs(15));
    agent.wait_up(&wss_domain, &[&chat.id], Duration::from_secs(15));

    for (domain, scheme) in [(&https_domain, "https"), (&wss_domain, "wss")] {
        let route = agent.route(domain, "/").expect("routed");
        assert_eq!(route["scheme"], scheme, "{route}");
    }
    for (id, scheme) in [(&web.id, "https"), (&chat.id, "wss")] {
        let view = agent.container(id).expect("listed");
        assert_eq!(view["routed"], true, "{view}");
        assert_eq!(view["routes"][0]["scheme"], scheme, "{view}");
    }

    let response = client::get(agent.http_addr(), &https_domain, "/", &[]).expect("request");
    assert_eq!(response.status, 200);
    assert_eq!(response.backend(), Some(web.short_id()));
    // The client spoke TLS to the terminator: the backend builds its links with https.
    let seen = client::get(agent.http_addr(), &https_domain, "/headers", &[]).expect("request");
    let seen = String::from_utf8_lossy(&seen.body).to_ascii_lowercase();
    assert!(seen.contains("\r\nx-forwarded-proto: https\r\n"), "{seen}");

    let (mut socket, head) = WebSocket::connect(agent.http_addr(), &wss_domain).expect("upgrade");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    socket.send(OP_BINARY, b"over wss").expect("frame");
    let (opcode, echo) = socket.receive().expect("echo");
    assert_eq!((opcode, echo.as_slice()), (OP_BINARY, &b"over wss"[..]));
    socket
        .send(OP_CLOSE, &1000u16.to_be_bytes())
        .expect("close");
    let (opcode, _) = socket.receive().expect("close reply");
    assert_eq!(opcode, OP_CLOSE);
}
