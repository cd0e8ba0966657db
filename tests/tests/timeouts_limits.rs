//! Timeouts and limits (issue 9, findings 3 to 6): the response timeout runs from the end of
//! the request body; stalled bodies, silent connections and idle tunnels are cut; the agent
//! stays within its descriptors and sheds idle connections instead of blaming backends; a
//! backend's connection limit queues, then answers 503 with `Retry-After`; an exec probe that
//! times out is killed.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use tests::{
    agent::{Agent, free_port},
    client::{self, KeepAlive},
    docker::{Container, backend_image, docker, with_labels},
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

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
}

/// Reads until EOF; returns what came and when the connection ended.
fn read_to_close(stream: &mut TcpStream) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return (got, Instant::now()),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (got, Instant::now()),
            Err(e) => panic!("reading: {e} after {} bytes", got.len()),
        }
    }
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn a_slow_upload_is_answered_and_a_stalled_one_gets_408() {
    let agent = Agent::start_with_config(
        "response_timeout_ms = 1000\nbody_idle_timeout_ms = 800\n",
        &[],
    );
    let (domain, _backend) = one_backend(&agent, "upload", &[]);

    // 10 KiB over about 3 s, a piece every 300 ms: longer than the response timeout, never idle
    // for the body idle timeout.
    let mut stream = connect(agent.http_addr());
    let head = format!(
        "POST /sha256 HTTP/1.1\r\nHost: {domain}\r\nContent-Length: 10240\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).expect("head");
    let started = Instant::now();
    for _ in 0..10 {
        thread::sleep(Duration::from_millis(300));
        stream.write_all(&[b'x'; 1024]).expect("piece");
    }
    let (reply, _) = read_to_close(&mut stream);
    let reply = String::from_utf8_lossy(&reply);
    println!("slow upload answered after {:?}", started.elapsed());
    assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
    assert!(
        reply.contains("\r\n\r\n10240 "),
        "the whole body arrived: {reply}"
    );

    // The same upload stopping half-way: 408 after the body idle timeout.
    let mut stream = connect(agent.http_addr());
    stream.write_all(head.as_bytes()).expect("head");
    stream.write_all(&[b'x'; 1024]).expect("piece");
    let stalled_at = Instant::now();
    let (reply, closed_at) = read_to_close(&mut stream);
    let reply = String::from_utf8_lossy(&reply);
    let waited = closed_at - stalled_at;
    println!("stalled upload answered after {waited:?}");
    assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(5),
        "408 after the 800 ms body idle timeout, not {waited:?}"
    );
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn a_stalled_response_body_is_cut_and_both_sides_closed() {
    let agent = Agent::start_with_config("body_idle_timeout_ms = 1000\n", &[]);
    let (domain, backend) = one_backend(&agent, "stall", &[]);

    // The backend sends half of what it announced, then nothing.
    let mut stream = connect(agent.http_addr());
    let request = format!("GET /stall?bytes=100000 HTTP/1.1\r\nHost: {domain}\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("request");
    let sent_at = Instant::now();
    let (got, closed_at) = read_to_close(&mut stream);
    let head_end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    assert!(got.starts_with(b"HTTP/1.1 200 "));
    assert_eq!(
        got.len() - head_end,
        100_000,
        "the half that was sent arrived"
    );
    let cut_after = closed_at - sent_at;
    println!("stalled body cut after {cut_after:?}");
    assert!(
        cut_after >= Duration::from_millis(900) && cut_after < Duration::from_secs(5),
        "cut after the 1 s body idle timeout, not {cut_after:?}"
    );
    wait_for("the backend side closed", Duration::from_secs(5), || {
        backend.stat("stalls_closed") == 1
    });

    // A client that leaves while the body stalls frees the backend connection too (no
    // CLOSE-WAIT on either side for ever).
    let mut stream = connect(agent.http_addr());
    stream.write_all(request.as_bytes()).expect("request");
    let mut head = [0u8; 512];
    let _ = stream.read(&mut head).expect("the head arrives");
    drop(stream);
    wait_for(
        "the abandoned exchange closed",
        Duration::from_secs(5),
        || backend.stat("stalls_closed") == 2,
    );
    agent.wait_idle();
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn a_silent_connection_gets_408_from_the_header_timeout_of_its_accept() {
    let agent = Agent::start_with_config("header_timeout_ms = 700\n", &[]);
    let mut stream = connect(agent.http_addr());
    let connected = Instant::now();
    let (reply, closed_at) = read_to_close(&mut stream);
    let waited = closed_at - connected;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_secs(4),
        "408 after the 700 ms header timeout, not {waited:?}"
    );
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn an_idle_tunnel_is_closed_and_a_busy_one_is_not() {
    let agent = Agent::start_with_config("tunnel_idle_timeout_ms = 1000\n", &[]);
    let port = free_port();
    let name = unique("tunnelidle");
    let label = format!("aliyun.routing.port_7000=tcp://{name}.local:{port}");
    let _backend = Container::backend(&name, &[&label]);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for("the tcp route", Duration::from_secs(15), || {
        TcpStream::connect(addr).is_ok()
    });
    agent.wait_idle();

    // Busy: a byte each 300 ms for 2.5 s stays open.
    let mut busy = connect(addr);
    let mut quiet_from = Instant::now();
    for i in 0..8u8 {
        thread::sleep(Duration::from_millis(300));
        busy.write_all(&[i]).expect("write");
        let mut echo = [0u8; 1];
        busy.read_exact(&mut echo).expect("echo");
        assert_eq!(echo[0], i);
        quiet_from = Instant::now();
    }
    // Idle from the last echo: closed after the tunnel idle timeout.
    let (_, closed_at) = read_to_close(&mut busy);
    let idle = closed_at - quiet_from;
    println!("idle tunnel closed after {idle:?}");
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(3),
        "closed after the 1 s tunnel idle timeout, not {idle:?}"
    );
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn a_backend_at_its_connection_limit_queues_then_answers_503_with_retry_after() {
    for (queue_ms, expect_queued_success) in [(300, false), (5000, true)] {
        let agent = Agent::start_with_config(
            &format!("backend_max_connections = 1\nbackend_queue_timeout_ms = {queue_ms}\n"),
            &[],
        );
        let (domain, backend) = one_backend(&agent, "maxconn", &[]);
        let addr = agent.http_addr();
        let slow = {
            let domain = domain.clone();
            thread::spawn(move || client::get(addr, &domain, "/delay?ms=1500", &[]))
        };
        wait_for(
            "the slow request at the backend",
            Duration::from_secs(5),
            || agent.route(&domain, "/").expect("route")["backends"][0]["active_connections"] == 1,
        );
        let started = Instant::now();
        let second = client::get(addr, &domain, "/", &[]).expect("second request");
        let waited = started.elapsed();
        if expect_queued_success {
            assert_eq!(second.status, 200, "queued until the slot was free");
        } else {
            assert_eq!(second.status, 503);
            assert_eq!(second.header("retry-after"), Some("1"));
            assert!(
                waited >= Duration::from_millis(250) && waited < Duration::from_secs(1),
                "answered after the 300 ms queue wait, not {waited:?}"
            );
            assert_eq!(agent.metric("router_queue_timeouts_total"), Some(1));
        }
        assert_eq!(slow.join().expect("thread").expect("slow").status, 200);
        assert_eq!(agent.state_of(&domain, &backend.id).as_deref(), Some("up"));
    }
}

/// An agent whose descriptor limit is low (512: 64 connections) under 300 idle connections:
/// real requests are still served, backends and probes are never blamed, and `/healthz` says
/// that the agent is overloaded.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn at_the_descriptor_limit_idle_connections_are_shed_and_no_backend_is_blamed() {
    let agent = Agent::start_with_prefix(&["sh", "-c", "ulimit -n 512 && exec \"$0\" \"$@\""], &[]);
    let (_, health) = agent.health().expect("healthz");
    assert_eq!(health["max_connections"], 64, "{health}");
    let (domain, backend) = one_backend(
        &agent,
        "fdlimit",
        &[
            "aliyun.probe.url=http://container/health",
            "aliyun.probe.period_seconds=1",
        ],
    );

    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(agent.http_addr()).expect("idle connection"))
        .collect();
    wait_for(
        "the agent to report overload",
        Duration::from_secs(10),
        || {
            agent
                .health()
                .is_some_and(|(code, h)| code == 503 && h["status"] == "overloaded")
        },
    );
    let started = Instant::now();
    for i in 0..20 {
        let response = client::get(agent.http_addr(), &domain, "/", &[])
            .unwrap_or_else(|e| panic!("request {i} under overload: {e}"));
        assert_eq!(response.status, 200, "request {i}");
    }
    println!(
        "20 requests served behind 300 idle connections in {:?}; {} shed",
        started.elapsed(),
        agent
            .metric("router_connections_shed_total")
            .unwrap_or_default()
    );
    assert!(
        agent
            .metric("router_connections_shed_total")
            .unwrap_or_default()
            > 0,
        "idle connections were shed"
    );
    let history = agent.container(&backend.id).expect("container")["history"].to_string();
    assert!(
        !history.contains("down") && !history.contains("probe failed"),
        "the backend was blamed for the agent's own limit: {history}"
    );
    drop(idle);
    wait_for("overload to pass", Duration::from_secs(15), || {
        agent.health().is_some_and(|(code, _)| code == 200)
    });
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn an_exec_probe_that_times_out_is_killed() {
    let agent = Agent::start(&[]);
    let name = unique("execkill");
    let domain = format!("{name}.local");
    let labels = [
        format!("aliyun.routing.port_80={domain}"),
        "aliyun.probe.cmd=sleep 30".to_owned(),
        "aliyun.probe.timeout_seconds=1".to_owned(),
        "aliyun.probe.period_seconds=1".to_owned(),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let container = Container::run(&name, &with_labels(&labels, &[backend_image()]));
    let timeouts = || {
        agent.container(&container.id).map_or(0, |c| {
            c["history"]
                .to_string()
                .matches("did not finish within")
                .count()
        })
    };
    wait_for("four probe timeouts", Duration::from_secs(30), || {
        timeouts() >= 4
    });
    let history = agent.container(&container.id).expect("container")["history"].to_string();
    assert!(
        history.contains("(killed 1 process") || history.contains("(killed 2 process"),
        "the timed-out command was killed: {history}"
    );
    let sleeping = docker(&["exec", &container.id, "ps"])
        .lines()
        .filter(|l| l.contains("sleep 30"))
        .count();
    assert!(
        sleeping <= 2,
        "only the check in progress may still run, found {sleeping} `sleep 30` processes"
    );
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn idle_keep_alive_connections_do_not_count_against_a_quiet_agent() {
    // A smoke check of the admission accounting: after many requests on kept-alive
    // connections, the open count goes back to zero once they close.
    let agent = Agent::start(&[]);
    let (domain, _backend) = one_backend(&agent, "accounting", &[]);
    let mut connections: Vec<KeepAlive> = (0..20)
        .map(|_| KeepAlive::connect(agent.http_addr()).expect("connect"))
        .collect();
    for connection in &mut connections {
        assert_eq!(connection.get(&domain, "/").expect("GET").status, 200);
    }
    let (_, health) = agent.health().expect("healthz");
    assert_eq!(health["connections"], 20, "{health}");
    drop(connections);
    agent.wait_idle();
    let (code, health) = agent.health().expect("healthz");
    assert_eq!((code, health["connections"].as_u64()), (200, Some(0)));
}
