//! HTTP/1.1 behaviour through the router with real sockets: pipelining, `Expect: 100-continue`,
//! HEAD, forwarded headers, backend connection reuse, the 502/504 answers, graceful shutdown,
//! and what the router passes on of a request's framing and upgrades (issue 9: framing written
//! from the router's reading, only WebSocket upgrades passed on, a 101 only when asked for,
//! `Expect` handled).
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use tests::{
    agent::Agent,
    client::{self, KeepAlive},
    docker::{Container, backend_image, with_labels},
    pattern::Pattern,
    tools::sha256_of,
    unique, wait_for,
    ws::{OP_BINARY, OP_CLOSE, WebSocket},
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
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
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
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
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
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
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
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
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
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
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
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
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
    let nc = Container::run(
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
    agent.wait_up(&garbage, &[&nc.id], Duration::from_secs(15));
    let response = client::get(agent.http_addr(), &garbage, "/", &[]).expect("request");
    assert_eq!(response.status, 502);
}

/// SIGTERM without a successor: the agent keeps serving new connections (one request each)
/// for the handover timeout, then stops accepting, lets the in-flight request finish and exits.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn sigterm_serves_until_the_handover_timeout_then_drains_in_flight_requests() {
    let handover = Duration::from_secs(1);
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
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
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

/// The head the test backend received, as its `/headers` endpoint returns it.
fn seen_by_backend(response: &client::Response) -> String {
    String::from_utf8_lossy(&response.body).into_owned()
}

/// The framing fields of a head, in order.
fn framing_lines(head: &str) -> Vec<&str> {
    head.split("\r\n")
        .filter(|line| {
            let name = line.split(':').next().unwrap_or_default();
            name.eq_ignore_ascii_case("transfer-encoding")
                || name.eq_ignore_ascii_case("content-length")
        })
        .collect()
}

/// What the router understood is what the backend gets (issue 9, finding 7): the framing fields
/// are written by the router from its own reading, one field, canonical, so that a backend
/// that read the client's bytes differently (an empty list element, a leading zero, a
/// `Connection` option naming a framing field) cannot frame the body differently. The test
/// backend's `/headers` answers with the head exactly as it received it.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn framing_reaches_the_backend_as_the_router_read_it() {
    const CHUNKED: &str = "5\r\nhello\r\n0\r\n\r\n";
    let agent = Agent::start(&[]);
    let (domain, backend) = one_backend(&agent, "framing", &[]);
    // (what is wrong, the framing fields the client sends, the body, what the backend must see)
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "RFC 9110 §5.6.1: empty list element before chunked",
            "Transfer-Encoding: ,chunked\r\n",
            CHUNKED,
            &["Transfer-Encoding: chunked"],
        ),
        (
            "upper case and a trailing empty element",
            "Transfer-Encoding: CHUNKED , \r\n",
            CHUNKED,
            &["Transfer-Encoding: chunked"],
        ),
        (
            "an empty Transfer-Encoding field before the real one",
            "Transfer-Encoding: \r\nTransfer-Encoding: chunked\r\n",
            CHUNKED,
            &["Transfer-Encoding: chunked"],
        ),
        (
            "RFC 9110 §7.6.1: Connection names Transfer-Encoding",
            "Connection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n",
            CHUNKED,
            &["Transfer-Encoding: chunked"],
        ),
        (
            "Content-Length with leading zeros",
            "Content-Length: 005\r\n",
            "hello",
            &["Content-Length: 5"],
        ),
        (
            "RFC 9110 §7.6.1: Connection names Content-Length",
            "Connection: Content-Length\r\nContent-Length: 5\r\n",
            "hello",
            &["Content-Length: 5"],
        ),
    ];
    let mut failures = Vec::new();
    for (name, fields, body, expected) in cases {
        let request = format!(
            "POST /headers HTTP/1.1\r\nHost: {domain}\r\n{fields}Connection: close\r\n\r\n{body}"
        );
        let response = client::exchange(agent.http_addr(), request.as_bytes()).expect(name);
        let seen = seen_by_backend(&response);
        let got = framing_lines(&seen);
        println!("{name}: {fields:?} -> {got:?}");
        if response.status != 200 || response.backend() != Some(backend.short_id()) {
            failures.push(format!("{name}: answered {response:?}"));
        } else if got != *expected {
            failures.push(format!(
                "{name}: the backend got {got:?}, not {expected:?}:\n{seen}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Only WebSocket upgrades are passed on (issue 9, finding 8). An h2c upgrade (RFC 7540 §3.2)
/// that reached a backend willing to switch would turn the connection into HTTP/2 straight to
/// it, past the router's per-request routing and checks ("h2c smuggling"). So `Upgrade`, the
/// `upgrade` token of `Connection` and `HTTP2-Settings` never reach the backend, and the
/// request is served as plain HTTP/1.1; when WebSocket is among several offers, only it goes on.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn h2c_and_other_upgrades_are_stripped_and_served_as_http11() {
    const SETTINGS: &str = "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n";
    let agent = Agent::start(&[]);
    let (domain, backend) = one_backend(&agent, "h2c", &[]);
    // (what is offered, the fields, the upgrade lines the backend must see)
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "h2c as RFC 7540 §3.2 sends it",
            format!("Connection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\n{SETTINGS}"),
            &[],
        ),
        (
            "h2c, HTTP2-Settings not named in Connection",
            format!("Connection: Upgrade, close\r\nUpgrade: h2c\r\n{SETTINGS}"),
            &[],
        ),
        (
            "TLS/1.2 (RFC 2817)",
            "Connection: Upgrade, close\r\nUpgrade: TLS/1.2\r\n".to_owned(),
            &[],
        ),
        (
            "h2c and websocket offered: websocket alone goes on",
            "Connection: Upgrade, close\r\nUpgrade: h2c, websocket\r\n".to_owned(),
            &["Upgrade: websocket", "Connection: Upgrade"],
        ),
    ];
    let mut failures = Vec::new();
    for (name, fields, expected) in &cases {
        let request = format!("GET /headers HTTP/1.1\r\nHost: {domain}\r\n{fields}\r\n");
        let response = client::exchange(agent.http_addr(), request.as_bytes()).expect(name);
        let seen = seen_by_backend(&response);
        let got: Vec<&str> = seen
            .split("\r\n")
            .filter(|line| {
                let name = line.split(':').next().unwrap_or_default();
                ["upgrade", "connection", "http2-settings"]
                    .iter()
                    .any(|n| name.eq_ignore_ascii_case(n))
            })
            .collect();
        println!("{name} -> {} {got:?}", response.status);
        if response.status != 200 || response.backend() != Some(backend.short_id()) {
            failures.push(format!("{name}: answered {response:?}"));
        } else if response.header("upgrade").is_some() {
            failures.push(format!("{name}: the answer carries Upgrade: {response:?}"));
        } else if got != *expected {
            failures.push(format!(
                "{name}: the backend got {got:?}, not {expected:?}:\n{seen}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// WebSocket passes on plain `http://` routes as on `ws://` ones. `acsrouting` (`HAProxy` in mode
/// http) passed WebSocket on every route, and existing compose files rely on it; README.md,
/// "Router answers", records the decision.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn websocket_upgrades_pass_on_http_and_ws_routes() {
    let agent = Agent::start(&[]);
    let http_domain = format!("{}.local", unique("ws-on-http"));
    let ws_domain = format!("{}.local", unique("ws-on-ws"));
    let backend = Container::backend(
        &unique("ws-routes"),
        &[&format!(
            "aliyun.routing.port_80={http_domain};ws://{ws_domain}"
        )],
    );
    for domain in [&http_domain, &ws_domain] {
        agent.wait_up(domain, &[&backend.id], Duration::from_secs(15));
    }
    for domain in [&http_domain, &ws_domain] {
        let (mut socket, head) = WebSocket::connect(agent.http_addr(), domain).expect("upgrade");
        assert!(head.starts_with("HTTP/1.1 101"), "{domain}: {head}");
        assert!(
            head.to_ascii_lowercase().contains("upgrade: websocket"),
            "{domain}: {head}"
        );
        socket.send(OP_BINARY, b"hello").expect("frame");
        let (opcode, echo) = socket.receive().expect("echo");
        assert_eq!(
            (opcode, echo.as_slice()),
            (OP_BINARY, &b"hello"[..]),
            "{domain}"
        );
        socket
            .send(OP_CLOSE, &1000u16.to_be_bytes())
            .expect("close");
        let (opcode, _) = socket.receive().expect("close reply");
        assert_eq!(opcode, OP_CLOSE, "{domain}");
        println!("{domain}: 101, one frame echoed, closed");
    }
}

/// RFC 9110 §15.2.2: a server switches protocols only to one the client asked for, and names it
/// in `Upgrade`. A 101 that the request did not ask for (or that names another protocol) would
/// make the connection a tunnel past the router's routing and checks (issue 9, finding 6): it
/// is an invalid response, 502, and no tunnel.
///
/// The backend is busybox nc answering a fixed 101 on three ports, each route used once (nc
/// serves one connection, then restarts; a second connection in between would be refused):
/// 8080 and 8082 switch to websocket, 8081 to h2c.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn a_101_that_was_not_asked_for_is_502_and_no_tunnel() {
    let agent = Agent::start(&[]);
    let name = unique("unasked-101");
    let [plain, wrong, asked] = ["plain", "wrong", "asked"].map(|r| format!("{name}-{r}.local"));
    let labels = [
        format!("aliyun.routing.port_8080={plain}"),
        format!("aliyun.routing.port_8081={wrong}"),
        format!("aliyun.routing.port_8082={asked}"),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let script = "serve() { while true; do \
                    printf 'HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: %s\\r\\nConnection: Upgrade\\r\\n\\r\\n' \"$2\" \
                    | nc -l -p \"$1\"; done; }; \
                  serve 8080 websocket & serve 8081 h2c & serve 8082 websocket; wait";
    let nc = Container::run(
        &name,
        &with_labels(&labels, &[backend_image(), "sh", "-c", script]),
    );
    for domain in [&plain, &wrong, &asked] {
        agent.wait_up(domain, &[&nc.id], Duration::from_secs(15));
    }
    let websocket = |host: &str| {
        format!(
            "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    let cases = [
        (
            "a plain GET answered with 101 websocket",
            format!("GET / HTTP/1.1\r\nHost: {plain}\r\n\r\n"),
        ),
        (
            "a websocket upgrade answered with 101 h2c",
            websocket(&wrong),
        ),
    ];
    for (what, request) in &cases {
        let reply = client::exchange_raw(
            agent.http_addr(),
            request.as_bytes(),
            Duration::from_secs(5),
        )
        .expect(what);
        let response = reply.response().expect(what);
        println!("{what} -> {}, closed: {}", response.status, reply.closed);
        assert_eq!(response.status, 502, "{what}: {response:?}");
        assert!(
            reply.closed,
            "{what}: the connection stayed open (a tunnel?)"
        );
        assert_eq!(
            response.header("connection"),
            Some("close"),
            "{what}: {response:?}"
        );
        assert_eq!(
            response
                .header("content-length")
                .and_then(|v| v.parse().ok()),
            Some(response.body.len()),
            "{what}: something followed the 502: {response:?}"
        );
    }
    // Control: the same backend's 101 does become a tunnel when the client asked for it.
    let (_socket, head) = WebSocket::connect(agent.http_addr(), &asked).expect("asked upgrade");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

/// `Expect: 100-continue` with a real client: curl sends the head, waits for `100 Continue` up
/// to its expect timeout (`--expect100-timeout`, 1 s), and then sends the body anyway. The
/// router relays the backend's `100 Continue` while it relays the body, so the upload finishes
/// long before that timer. Comparing the time against a deadline is the point here: what is
/// measured is curl's own fallback timer (a router that withheld the 100 would cost 1 s).
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn curl_upload_with_100_continue_does_not_wait_for_the_expect_timeout() {
    const EXPECT_TIMEOUT: Duration = Duration::from_secs(1);
    let agent = Agent::start(&[]);
    let (domain, _backend) = one_backend(&agent, "continue-curl", &[]);
    let dir = std::env::temp_dir().join(unique("continue-curl"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("upload");
    let mut body = vec![0u8; 1024 * 1024];
    Pattern::new(9).fill(&mut body);
    std::fs::write(&file, &body).expect("upload file");
    let digest = sha256_of(&file);
    let output = Command::new("curl")
        .args(["-sS", "-v", "--fail", "-o", "-", "-w", "\n%{time_total}"])
        .args([
            "-H",
            &format!("Host: {domain}"),
            "-H",
            "Expect: 100-continue",
        ])
        .args(["--expect100-timeout", &EXPECT_TIMEOUT.as_secs().to_string()])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(format!("http://{}/sha256", agent.http_addr()))
        .output()
        .expect("curl runs");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "curl failed: {stderr}");
    let (answer, seconds) = stdout.rsplit_once('\n').expect("answer and time");
    let took = Duration::from_secs_f64(seconds.trim().parse().expect("time_total"));
    println!("1 MiB upload with Expect: 100-continue took {took:?}");
    assert!(
        stderr.contains("< HTTP/1.1 100 Continue"),
        "curl never saw the 100 Continue:\n{stderr}"
    );
    assert_eq!(
        answer.trim(),
        format!("{} {digest}", body.len()),
        "the backend got the body whole"
    );
    assert!(
        took < EXPECT_TIMEOUT / 2,
        "the upload took {took:?}: curl waited out its {EXPECT_TIMEOUT:?} expect timeout"
    );
}

/// RFC 9110 §10.1.1: "A server that receives a 100-continue expectation in an HTTP/1.0 request
/// MUST ignore that expectation." The router does not pass it on, and relays no 1xx to an
/// HTTP/1.0 client (§15.2: HTTP/1.0 has none).
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn expect_100_continue_in_http10_is_ignored_and_not_forwarded() {
    let agent = Agent::start(&[]);
    let (domain, backend) = one_backend(&agent, "continue-10", &[]);
    let request = format!(
        "POST /headers HTTP/1.0\r\nHost: {domain}\r\nContent-Length: 5\r\n\
         Expect: 100-continue\r\n\r\nhello"
    );
    let reply = client::exchange_raw(
        agent.http_addr(),
        request.as_bytes(),
        Duration::from_secs(5),
    )
    .expect("exchange");
    // The first response in the reply is the final one: no 100 before it.
    let response = reply.response().expect("response");
    assert_eq!(
        (response.status, response.backend()),
        (200, Some(backend.short_id())),
        "{response:?}"
    );
    let seen = seen_by_backend(&response);
    assert!(
        !seen.to_ascii_lowercase().contains("expect"),
        "Expect reached the backend:\n{seen}"
    );
}

/// When the router answers a request that carries `Expect: 100-continue` itself, it answers at
/// once, without waiting for the body the client holds back, and closes: 404 (unknown host),
/// 503 (no backend takes new traffic), 417 (another expectation too), 400 (impossible port).
/// Nothing of the body is sent, so a router that waited for it would time out the client. A
/// refusal is counted under its reason in `router_requests_rejected_total`.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn the_routers_own_answers_do_not_wait_for_an_expected_body() {
    let agent = Agent::start(&[]);
    let (domain, _backend) = one_backend(&agent, "continue-own", &[]);
    let (no_traffic, _idle) = one_backend(&agent, "continue-zero", &["aliyun.routing.weight=0"]);
    let unknown = format!("{}.local", unique("continue-unknown"));
    let rows = [
        (404, unknown, "100-continue", None),
        (503, no_traffic, "100-continue", None),
        (
            417,
            domain.clone(),
            "100-continue, something-else",
            Some("unsupported expectation"),
        ),
        (
            400,
            format!("{domain}:99999"),
            "100-continue",
            Some("port above 65535 in Host"),
        ),
    ];
    for (status, host, expect, reason) in &rows {
        let head = format!(
            "POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100000\r\nExpect: {expect}\r\n\r\n"
        );
        let started = Instant::now();
        let reply =
            client::exchange_raw(agent.http_addr(), head.as_bytes(), Duration::from_secs(5))
                .expect("exchange");
        let waited = started.elapsed();
        let response = reply.response().expect("response");
        println!(
            "{host} / Expect: {expect} -> {} after {waited:?}",
            response.status
        );
        assert_eq!(response.status, *status, "{host}: {response:?}");
        assert!(reply.closed, "{host}: the connection stayed open");
        assert!(
            waited < Duration::from_secs(2),
            "{host}: answered after {waited:?}"
        );
        if let Some(reason) = reason {
            let series = format!("router_requests_rejected_total{{reason=\"{reason}\"}}");
            assert_eq!(agent.metric(&series), Some(1), "{series}");
        }
    }
}
