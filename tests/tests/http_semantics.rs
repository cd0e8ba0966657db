//! HTTP/1.1 behaviour through the router with real sockets: pipelining, `Expect: 100-continue`,
//! HEAD, forwarded headers, backend connection reuse, the 502/504 answers, and graceful
//! shutdown.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use tests::{
    agent::Agent,
    client::{self, KeepAlive},
    docker::{Container, backend_image, with_labels},
    unique, wait_for,
};

fn one_backend(agent: &Agent, name: &str, extra_labels: &[&str]) -> (String, Container) {
    let domain = format!("{}.local", unique(name));
    let mut labels = vec![format!("aliyun.routing.port_80={domain}")];
    labels.extend(extra_labels.iter().map(|l| (*l).to_owned()));
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let backend = Container::backend(&unique(name), &labels);
    agent.wait_up(&domain, &[&backend.id], Duration::from_secs(15));
    (domain, backend)
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let agent = Agent::start(&[]);
    let (domain, backend) = one_backend(&agent, "pipeline", &[]);
    let mut connection = KeepAlive::connect(agent.http_addr()).expect("connect");
    // Three requests in one write; the first is the slowest, and must still come back first.
    let requests = format!(
        "GET /delay?ms=300 HTTP/1.1\r\nHost: {domain}\r\n\r\n\
         GET /bytes?n=5 HTTP/1.1\r\nHost: {domain}\r\n\r\n\
         GET /health HTTP/1.1\r\nHost: {domain}\r\n\r\n"
    );
    connection_write(&mut connection, requests.as_bytes());
    let bodies: Vec<Vec<u8>> = (0..3)
        .map(|_| connection.read_response().expect("response").body)
        .collect();
    assert_eq!(
        bodies[0],
        format!("backend={}\n", backend.short_id()).as_bytes()
    );
    assert_eq!(bodies[1], [0u8, 1, 2, 3, 4]);
    assert_eq!(bodies[2], b"ok\n");
}

fn connection_write(connection: &mut KeepAlive, bytes: &[u8]) {
    connection.write_raw(bytes).expect("write");
}

#[test]
fn expect_100_continue_is_relayed_before_the_body() {
    let agent = Agent::start(&[]);
    let (domain, _backend) = one_backend(&agent, "continue", &[]);
    let mut stream = TcpStream::connect(agent.http_addr()).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: {domain}\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).expect("head");
    // The client waits for the interim answer before it sends the body.
    let mut interim = [0u8; 25];
    stream
        .read_exact(&mut interim)
        .expect("100 Continue arrives without the body");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"hello").expect("body");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("final response");
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("hello"), "{text}");
}

#[test]
fn head_responses_have_no_body_and_the_connection_goes_on() {
    let agent = Agent::start(&[]);
    let (domain, _backend) = one_backend(&agent, "head", &[]);
    let mut connection = KeepAlive::connect(agent.http_addr()).expect("connect");
    connection_write(
        &mut connection,
        format!("HEAD /bytes?n=100000 HTTP/1.1\r\nHost: {domain}\r\n\r\n").as_bytes(),
    );
    let head = connection.read_head_only().expect("HEAD response");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("100000"));
    // Had the router waited for 100000 body bytes, this request would never be answered.
    let next = connection.get(&domain, "/health").expect("next response");
    assert_eq!(next.body, b"ok\n");
}

#[test]
fn forwarded_headers_are_set_and_hop_by_hop_ones_removed() {
    let agent = Agent::start(&[]);
    let (domain, _backend) = one_backend(&agent, "fwd", &[]);
    let response = client::get(
        agent.http_addr(),
        &domain,
        "/headers",
        &[
            ("Cookie", "a=1; CONTAINERID=abc; b=2"),
            ("Connection", "close, X-Hop"),
            ("X-Hop", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("X-Forwarded-For", "203.0.113.9"),
        ],
    )
    .expect("request");
    let seen = String::from_utf8_lossy(&response.body).to_ascii_lowercase();
    for expected in [
        "x-forwarded-for: 203.0.113.9, 127.0.0.1\r\n".to_owned(),
        "x-forwarded-proto: http\r\n".to_owned(),
        format!("x-forwarded-host: {domain}\r\n"),
        "cookie: a=1; b=2\r\n".to_owned(),
    ] {
        assert!(
            seen.contains(&expected),
            "{expected:?} missing from what the backend saw:\n{seen}"
        );
    }
    for gone in ["x-hop", "keep-alive", "containerid"] {
        assert!(!seen.contains(gone), "{gone} reached the backend:\n{seen}");
    }
}

#[test]
fn backend_connections_are_reused_and_closed_when_the_backend_goes_down() {
    let agent = Agent::start(&[]);
    let (domain, backend) = one_backend(
        &agent,
        "pool",
        &[
            "aliyun.probe.url=http://container:80/health",
            "aliyun.probe.period_seconds=1",
            "aliyun.probe.failure_threshold=1",
        ],
    );
    let before = backend.stat("http_connections");
    for _ in 0..20 {
        // A new client connection each time: only the router's backend side can be reused.
        let response = client::get(agent.http_addr(), &domain, "/", &[]).expect("request");
        assert_eq!(response.status, 200);
    }
    // Our own /stats call is one more connection.
    let opened = backend.stat("http_connections") - before - 1;
    assert_eq!(opened, 1, "20 requests over one pooled backend connection");
    let idle = |agent: &Agent| {
        agent.route(&domain, "/").expect("route")["backends"][0]["idle_connections"].as_u64()
    };
    assert_eq!(idle(&agent), Some(1));

    client::get(backend.http_addr(), "backend", "/set-health?ok=0", &[]).expect("flip health");
    wait_for("the backend down", Duration::from_secs(10), || {
        agent.state_of(&domain, &backend.id).as_deref() == Some("down")
    });
    wait_for(
        "its pooled connection closed",
        Duration::from_secs(5),
        || idle(&agent) == Some(0),
    );
}

#[test]
fn backend_response_timeout_is_504_and_an_invalid_head_is_502() {
    let dir = std::env::temp_dir().join(unique("config"));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("router.toml");
    std::fs::write(&config, "response_timeout_ms = 500\n").expect("config");
    let agent = Agent::start(&["--config", config.to_str().expect("path")]);
    let (domain, _backend) = one_backend(&agent, "timeout", &[]);
    let started = Instant::now();
    let response = client::get(agent.http_addr(), &domain, "/delay?ms=3000", &[]).expect("request");
    assert_eq!(response.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at the timeout"
    );

    // A real server that answers garbage: busybox nc serving a fixed reply.
    let garbage = format!("{}.local", unique("garbage"));
    let label = format!("aliyun.routing.port_8080={garbage}");
    let _nc = Container::run(
        &unique("garbage"),
        &with_labels(
            &[&label],
            &[
                backend_image(),
                "sh",
                "-c",
                "while true; do printf 'HTTP/1.1 2OO NOT OK\\r\\n\\r\\n' | nc -l -p 8080; done",
            ],
        ),
    );
    agent.wait_up(&garbage, &[&_nc.id], Duration::from_secs(15));
    let response = client::get(agent.http_addr(), &garbage, "/", &[]).expect("request");
    assert_eq!(response.status, 502);
}

/// SIGTERM without a successor: the agent keeps serving new connections (one request each)
/// for the handover timeout, then stops accepting, lets the in-flight request finish and exits.
#[test]
fn sigterm_serves_until_the_handover_timeout_then_drains_in_flight_requests() {
    let handover = Duration::from_millis(1000);
    let mut agent = Agent::start_with_config(
        &format!("handover_timeout_ms = {}\n", handover.as_millis()),
        &[],
    );
    let (domain, backend) = one_backend(&agent, "shutdown", &[]);
    let addr = agent.http_addr();
    let in_flight = {
        let domain = domain.clone();
        thread::spawn(move || client::get(addr, &domain, "/delay?ms=2500", &[]))
    };
    wait_for(
        "the slow request to be in flight",
        Duration::from_secs(5),
        || agent.metric("router_connections_active") == Some(1),
    );
    let admin = agent.admin;
    let started = Instant::now();
    let stopper = thread::spawn(move || {
        let status = agent.terminate(Duration::from_secs(15));
        (status, agent)
    });
    wait_for(
        "the agent to report that it stops",
        Duration::from_secs(5),
        || {
            client::get(admin, "localhost", "/healthz", &[]).is_ok_and(|r| {
                r.status == 503 && String::from_utf8_lossy(&r.body).contains("stopping")
            })
        },
    );
    // Nobody took over yet: a new client is still served, and told that the connection ends.
    let mut fresh = KeepAlive::connect(addr).expect("connect while handing over");
    let during_handover = fresh.get(&domain, "/").expect("served while handing over");
    assert_eq!(during_handover.status, 200);
    assert_eq!(during_handover.header("connection"), Some("close"));
    wait_for("the listener to close", Duration::from_secs(5), || {
        TcpStream::connect(addr).is_err()
    });
    assert!(
        started.elapsed() >= handover,
        "stopped accepting before the handover timeout ({:?})",
        started.elapsed()
    );
    let response = in_flight
        .join()
        .expect("thread")
        .expect("in-flight request completed");
    assert_eq!(response.status, 200);
    assert_eq!(response.backend(), Some(backend.short_id()));
    let (status, _agent) = stopper.join().expect("stopper");
    assert!(status.success(), "clean exit: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited once the request was done"
    );
}

#[test]
fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let dir = std::env::temp_dir().join(unique("config"));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("router.toml");
    std::fs::write(&config, "idle_timeout_ms = 400\n").expect("config");
    let agent = Agent::start(&["--config", config.to_str().expect("path")]);
    let (domain, _backend) = one_backend(&agent, "idle", &[]);
    let mut connection = KeepAlive::connect(agent.http_addr()).expect("connect");
    assert_eq!(
        connection.get(&domain, "/health").expect("response").status,
        200
    );
    let started = Instant::now();
    assert!(
        connection.is_closed(),
        "the router closed the idle connection"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
}
