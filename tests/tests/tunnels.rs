//! `tcp://` routes through the kernel path: half-close in each direction, resets from either
//! side (after which no sockhash entry and no file descriptor is left behind), a slow receiver
//! (demotion), retransmissions that overlap forwarded bytes, and eight tunnels at once with every
//! byte checked.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    time::Duration,
};

use tests::{
    agent::{Agent, free_port},
    docker::Container,
    inject::{Sniffer, endpoints, flush_ack, send_segment},
    pattern::echo_round_trip,
    unique, wait_for,
};

/// A backend with tcp routes to its greeter (7001), reset (7002) and echo (7000) ports.
struct TcpBackend {
    container: Container,
    greeter: SocketAddr,
    reset: SocketAddr,
    echo: SocketAddr,
}

fn tcp_backend(agent: &Agent) -> TcpBackend {
    let ports = [free_port(), free_port(), free_port()];
    let name = unique("tunnels");
    let labels: Vec<String> = [7001, 7002, 7000]
        .iter()
        .zip(ports)
        .map(|(container_port, port)| {
            format!(
                "aliyun.routing.port_{container_port}=tcp://{name}-{container_port}.local:{port}"
            )
        })
        .collect();
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let container = Container::backend(&name, &labels);
    let addr = |port: u16| SocketAddr::from((agent.ip, port));
    for port in ports {
        wait_for("the tcp route listeners", Duration::from_secs(15), || {
            agent.json("/api/routes")["routes"]
                .as_array()
                .is_some_and(|routes| {
                    routes
                        .iter()
                        .any(|r| r["listen_port"] == port && r["backends"][0]["state"] == "up")
                })
        });
    }
    agent.wait_idle();
    TcpBackend {
        container,
        greeter: addr(ports[0]),
        reset: addr(ports[1]),
        echo: addr(ports[2]),
    }
}

fn offloaded_sockets(agent: &Agent) -> u64 {
    agent.json("/api/routes")["datapath"]["offloaded_sockets"]
        .as_u64()
        .expect("kernel offload is on")
}

/// Waits until the agent holds no tunnel: no sockhash entry, no connection, and its
/// descriptor count back to `baseline`.
fn assert_nothing_left(agent: &Agent, baseline: usize, what: &str) {
    wait_for(
        &format!("no tunnel left after {what}"),
        Duration::from_secs(5),
        || {
            offloaded_sockets(agent) == 0
                && agent.metric("router_connections_active") == Some(0)
                && agent.open_fds() <= baseline
        },
    );
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn backend_half_close_reaches_the_client_and_the_client_can_still_send() {
    let agent = Agent::start_private(&["--datapath", "sockmap"]);
    let backend = tcp_backend(&agent);
    let before = backend.container.stat("greeter_bytes");

    let mut stream = TcpStream::connect(backend.greeter).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut greeting = Vec::new();
    stream
        .read_to_end(&mut greeting)
        .expect("greeting then EOF");
    assert_eq!(
        greeting, b"hello\n",
        "the backend's half-close arrived as EOF after its bytes"
    );

    // Our direction is still open: everything we send now reaches the backend.
    let payload = vec![0x5au8; 1024 * 1024];
    stream
        .write_all(&payload)
        .expect("send after the backend's half-close");
    stream.shutdown(Shutdown::Write).expect("our half-close");
    wait_for(
        "the backend to count our bytes",
        Duration::from_secs(10),
        || backend.container.stat("greeter_bytes") - before == payload.len() as u64,
    );
    drop(stream);
    agent.wait_idle();
    let datapath = agent.json("/api/routes")["datapath"].clone();
    let kernel = datapath["bytes_kernel"].as_u64().unwrap();
    assert!(
        kernel >= payload.len() as u64,
        "the kernel carried the upload: {datapath}"
    );
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn client_half_close_reaches_the_backend_and_its_answer_still_arrives() {
    let agent = Agent::start_private(&["--datapath", "sockmap"]);
    let backend = tcp_backend(&agent);
    let mut stream = TcpStream::connect(backend.echo).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(b"last words").expect("send");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).expect("echo then EOF");
    assert_eq!(echoed, b"last words");
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn client_reset_leaves_no_sockhash_entry_and_no_descriptor() {
    let agent = Agent::start_private(&["--datapath", "sockmap"]);
    let backend = tcp_backend(&agent);
    let baseline = agent.open_fds();

    let stream = TcpStream::connect(backend.echo).expect("connect");
    (&stream).write_all(&vec![1u8; 64 * 1024]).expect("send");
    wait_for("the tunnel in the sockhash", Duration::from_secs(5), || {
        offloaded_sockets(&agent) == 2
    });
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("linger 0");
    drop(stream); // RST
    assert_nothing_left(&agent, baseline, "a client reset");
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn backend_reset_leaves_no_sockhash_entry_and_no_descriptor() {
    let agent = Agent::start_private(&["--datapath", "sockmap"]);
    let backend = tcp_backend(&agent);
    let baseline = agent.open_fds();
    let resets = backend.container.stat("resets");

    let mut stream = TcpStream::connect(backend.reset).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(b"x").expect("send");
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        // The reset is passed on as a reset (or, if it raced our read, as the end).
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => assert_eq!(n, 0, "no data from a resetting backend"),
    }
    assert_eq!(backend.container.stat("resets"), resets + 1);
    drop(stream);
    assert_nothing_left(&agent, baseline, "a backend reset");
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn a_receiver_that_stops_reading_bounds_the_kernel_backlog_and_loses_nothing() {
    const TOTAL: u64 = 64 * 1024 * 1024;
    let agent = Agent::start_private(&["--datapath", "sockmap"]);
    let backend = tcp_backend(&agent);
    let stream = TcpStream::connect(backend.echo).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // We do not read for a while: the echo backend blocks writing to us and stops reading, so
    // redirected bytes pile up in the kernel until the bound hands the directions to userspace.
    let received = echo_round_trip("the demoted tunnel", stream, 21, TOTAL, || {
        wait_for(
            "a tunnel direction demoted to userspace",
            Duration::from_secs(20),
            || {
                agent.json("/api/routes")["datapath"]["tunnels_demoted"]
                    .as_u64()
                    .unwrap_or(0)
                    >= 1
            },
        );
    });
    assert_eq!(received, TOTAL, "every byte came back in order, then EOF");
}

/// A retransmission that repeats bytes already received and carries new ones (what a sender
/// makes after loss, here made by hand): TCP queues it whole, and the kernel hands it whole
/// to the verdict program, which must cut the repeated head off, or the backend gets those
/// bytes twice (docs/kernel-findings.md; `sockmap-overlap-repro` shows the kernel side alone).
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn an_overlapping_retransmission_reaches_the_backend_once() {
    let agent = Agent::start_private(&["--datapath", "sockmap"]);
    let backend = tcp_backend(&agent);
    let mut stream = TcpStream::connect(backend.echo).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    wait_for("the tunnel in the sockhash", Duration::from_secs(5), || {
        offloaded_sockets(&agent) == 2
    });
    let sniffer = Sniffer::open().expect("a packet socket on lo (needs CAP_NET_RAW)");
    let (client, router) = endpoints(&stream);
    stream.write_all(b"0123456789").expect("send");
    let mut echoed = [0u8; 10];
    stream.read_exact(&mut echoed).expect("echo");
    assert_eq!(&echoed, b"0123456789");
    flush_ack(&stream).expect("TCP_QUICKACK");
    let last = sniffer
        .latest(client, router)
        .expect("our last segment was captured");

    // 5 bytes already sent, 5 new ones.
    send_segment(
        client,
        router,
        last.next_seq.wrapping_sub(5),
        &last,
        b"56789ABCDE",
    )
    .expect("raw send");
    // Our socket sends the 5 new bytes itself too, so its sequence numbers catch up with what
    // the router's socket received (to the router they are an old retransmission, dropped).
    stream.write_all(b"ABCDE").expect("send");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("echo then EOF");
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "ABCDE",
        "after \"0123456789\", the backend got the new bytes once, not the repeated ones again"
    );
    drop(stream);
    agent.wait_idle();
    let datapath = agent.json("/api/routes")["datapath"].clone();
    assert_eq!(
        datapath["tunnel_overlap_bytes_cut"], 5,
        "the verdict program cut the 5 repeated bytes: {datapath}"
    );
}

/// Eight tunnels streaming at once, each checking every byte it gets back. Under load this
/// once delivered a run of 64 to 128 KiB twice in about one run in 20 to 60: retransmissions
/// that overlap bytes already forwarded, which the kernel hands whole to the verdict program
/// (docs/kernel-findings.md; `an_overlapping_retransmission_reaches_the_backend_once` makes the
/// case on demand). `cargo xtask soak-tunnels --hog` repeats this test under CPU load.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn eight_concurrent_tunnels_under_load_deliver_every_byte() {
    const EACH: u64 = 48 * 1024 * 1024;
    let agent = Agent::start_private(&["--datapath", "sockmap"]);
    let backend = tcp_backend(&agent);
    let workers: Vec<_> = (0..8u64)
        .map(|seed| {
            let addr = backend.echo;
            std::thread::spawn(move || {
                let stream = TcpStream::connect(addr).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_mins(1)))
                    .expect("timeout");
                echo_round_trip(&format!("tunnel {seed}"), stream, seed + 100, EACH, || {})
            })
        })
        .collect();
    for (i, worker) in workers.into_iter().enumerate() {
        assert_eq!(
            worker.join().expect("worker"),
            EACH,
            "tunnel {i} got every byte before EOF"
        );
    }
    agent.wait_idle();
    let datapath = agent.json("/api/routes")["datapath"].clone();
    eprintln!("8 tunnels x 48 MiB each way: {datapath}");
    assert_eq!(datapath["offloaded_sockets"], 0);
}
