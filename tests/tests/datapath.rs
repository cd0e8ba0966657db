//! The data path under load: 50 MiB through each `--datapath` mode arrive intact (sha256 for
//! HTTP bodies, a byte-for-byte stream check for tunnels), and the counters prove which path
//! carried the bytes. Run with --nocapture to see the per-mode figures.
use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    agent::{Agent, free_port},
    docker::Container,
    pattern::{Pattern, echo_round_trip},
    tools::{curl, sha256_of},
    unique, wait_for,
    ws::{OP_BINARY, OP_CLOSE, WebSocket},
};

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 50 * MIB;
const MODES: [&str; 4] = ["copy", "splice", "sockmap", "auto"];
/// `router_common::MAX_KERNEL_BACKLOG`: what one direction may have waiting in the kernel before
/// it is demoted to userspace.
const KERNEL_BACKLOG_BOUND: u64 = 16 * MIB;

fn counters(agent: &Agent) -> Value {
    agent.json("/api/routes")["datapath"].clone()
}

fn delta(after: &Value, before: &Value, name: &str) -> u64 {
    after[name].as_u64().unwrap_or(0) - before[name].as_u64().unwrap_or(0)
}

fn write_file(path: &Path, mut fill_block: impl FnMut(u64, &mut [u8])) {
    let mut file = std::fs::File::create(path).expect("temp file");
    let mut block = vec![0u8; MIB as usize];
    for i in 0..SIZE / MIB {
        fill_block(i * MIB, &mut block);
        file.write_all(&block).expect("write");
    }
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn http_bodies_keep_their_sha256_through_every_datapath_mode() {
    let dir = std::env::temp_dir().join(unique("datapath"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let upload = dir.join("upload");
    let mut random = Pattern::new(7);
    write_file(&upload, |_, block| random.fill(block));
    let upload_sha = sha256_of(&upload);
    // What `/bytes` sends: byte i is i % 251.
    let expected = dir.join("expected");
    write_file(&expected, |offset, block| {
        for (i, b) in block.iter_mut().enumerate() {
            *b = ((offset + i as u64) % 251) as u8;
        }
    });
    let download_sha = sha256_of(&expected);
    let upload_arg = format!("@{}", upload.display());

    for mode in MODES {
        let domain = format!("{}.local", unique(&format!("bodies-{mode}")));
        let agent = Agent::start(&["--datapath", mode]);
        let backend = Container::backend(
            &unique("bodies"),
            &[&format!("aliyun.routing.port_80={domain}")],
        );
        agent.wait_up(&domain, &[&backend.id], Duration::from_secs(15));
        let base = format!("http://127.0.0.1:{}", agent.port);
        let host = format!("Host: {domain}");
        let before = counters(&agent);
        let started = Instant::now();

        let by_length = curl(&[
            "-H",
            &host,
            "--data-binary",
            &upload_arg,
            &format!("{base}/sha256"),
        ]);
        assert_eq!(
            by_length,
            format!("{SIZE} {upload_sha}"),
            "{mode}: upload with Content-Length"
        );
        let chunked = curl(&[
            "-H",
            &host,
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &upload_arg,
            &format!("{base}/sha256"),
        ]);
        assert_eq!(
            chunked,
            format!("{SIZE} {upload_sha}"),
            "{mode}: chunked upload"
        );
        let downloaded = dir.join(format!("download-{mode}"));
        curl(&[
            "-H",
            &host,
            "-o",
            downloaded.to_str().expect("path"),
            &format!("{base}/bytes?n={SIZE}"),
        ]);
        assert_eq!(sha256_of(&downloaded), download_sha, "{mode}: download");
        let _ = std::fs::remove_file(&downloaded);

        let after = counters(&agent);
        let (copied, spliced) = (
            delta(&after, &before, "bytes_copied"),
            delta(&after, &before, "bytes_spliced"),
        );
        eprintln!(
            "{mode}: 3 x 50 MiB in {:?}; copied {copied} B, spliced {spliced} B",
            started.elapsed()
        );
        match mode {
            // Bodies never touch splice: every byte went through a userspace buffer.
            "copy" | "sockmap" => {
                assert_eq!(spliced, 0, "{mode}");
                assert!(copied >= 3 * SIZE, "{mode}: copied {copied}");
            }
            // Content-Length bodies are spliced but for what arrived with the head; of chunked
            // bodies, the chunk data that did not arrive with its size line.
            _ => {
                assert!(spliced >= 2 * SIZE - 2 * MIB, "{mode}: spliced {spliced}");
                assert!(
                    copied + spliced >= 3 * SIZE,
                    "{mode}: every body byte accounted for"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A `tcp://` route to the backend's echo port, on a free router port of `agent`'s address.
fn tcp_echo_route(agent: &Agent, name: &str) -> (Container, SocketAddr) {
    let port = free_port();
    let domain = format!("{}.local", unique(name));
    let backend = Container::backend(
        &unique(name),
        &[&format!("aliyun.routing.port_7000=tcp://{domain}:{port}")],
    );
    let addr = SocketAddr::from((agent.ip, port));
    wait_for("the tcp route listener", Duration::from_secs(15), || {
        TcpStream::connect(addr).is_ok()
    });
    // That probe connection was tunnelled too; let its teardown finish before measuring.
    thread::sleep(Duration::from_millis(200));
    (backend, addr)
}

/// Sends `SIZE` bytes, half-closes, and checks that exactly the same bytes come back before EOF.
fn echo_through(mode: &str, addr: SocketAddr, seed: u64) {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let received = echo_round_trip(mode, stream, seed, SIZE, || {});
    assert_eq!(received, SIZE, "{mode}: every byte came back, then EOF");
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn tcp_route_echo_is_intact_through_every_datapath_mode() {
    for mode in MODES {
        // Its own address: other agents on this machine see the route's container too.
        let agent = Agent::start_private(&["--datapath", mode]);
        let (_backend, addr) = tcp_echo_route(&agent, &format!("echo-{mode}"));
        let before = counters(&agent);
        let started = Instant::now();
        echo_through(mode, addr, 11);
        let took = started.elapsed();
        agent.wait_idle();
        let after = counters(&agent);
        assert_eq!(
            after["offloaded_sockets"].as_u64().unwrap_or(0),
            0,
            "the tunnel left the sockhash"
        );
        let (copied, spliced, kernel) = (
            delta(&after, &before, "bytes_copied"),
            delta(&after, &before, "bytes_spliced"),
            delta(&after, &before, "bytes_kernel"),
        );
        eprintln!(
            "{mode}: 50 MiB each way in {took:?}; copied {copied} B, spliced {spliced} B, kernel {kernel} B"
        );
        match mode {
            "copy" => assert!(copied >= 2 * SIZE && spliced == 0 && kernel == 0, "{mode}"),
            // `auto` splices tunnels (README.md, "Data path").
            "splice" | "auto" => {
                assert!(spliced >= 2 * SIZE && copied == 0 && kernel == 0, "{mode}");
            }
            // The kernel carries every byte, unless a direction's peer falls more than the
            // kernel backlog bound behind: that direction is then demoted and copied in
            // userspace from there on. Each direction went through the kernel at least up to
            // the bound first.
            _ => {
                let demoted = delta(&after, &before, "tunnels_demoted");
                assert_eq!(spliced, 0, "{mode}: nothing spliced");
                assert!(
                    kernel + copied >= 2 * SIZE,
                    "{mode}: every byte accounted for"
                );
                assert!(
                    kernel >= 2 * KERNEL_BACKLOG_BOUND,
                    "{mode}: kernel {kernel} (demoted directions: {demoted})"
                );
                if demoted == 0 {
                    assert_eq!(
                        copied, 0,
                        "{mode}: nothing through userspace without a demotion"
                    );
                }
                assert_eq!(delta(&after, &before, "connections_offloaded"), 1, "{mode}");
            }
        }
    }
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn websocket_echo_moves_through_the_kernel_after_the_upgrade() {
    let domain = format!("{}.local", unique("ws"));
    let agent = Agent::start_private(&["--datapath", "sockmap"]);
    let backend = Container::backend(
        &unique("ws"),
        &[&format!("aliyun.routing.port_80=ws://{domain}")],
    );
    agent.wait_up(&domain, &[&backend.id], Duration::from_secs(15));

    let before_upgrade = counters(&agent);
    let (mut socket, head) = WebSocket::connect(agent.http_addr(), &domain).expect("upgrade");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    // From here on every byte is a frame; the handshake heads went through userspace.
    let before = counters(&agent);
    let (mut sent, mut echoed) = (Pattern::new(3), Pattern::new(3));
    let frames = 128;
    for _ in 0..frames {
        let mut payload = vec![0u8; 64 * 1024];
        sent.fill(&mut payload);
        socket.send(OP_BINARY, &payload).expect("send frame");
        let (opcode, echo) = socket.receive().expect("echo frame");
        assert_eq!(opcode, OP_BINARY);
        assert!(echoed.matches(&echo), "echoed payload differs");
    }
    socket
        .send(OP_CLOSE, &1000u16.to_be_bytes())
        .expect("close");
    let (opcode, _) = socket.receive().expect("close reply");
    assert_eq!(opcode, OP_CLOSE);
    assert!(
        socket.at_eof(),
        "the backend's close (FIN) reached the client"
    );
    drop(socket);
    agent.wait_idle();
    let after = counters(&agent);
    assert_eq!(
        after["offloaded_sockets"], 0,
        "the tunnel left the sockhash"
    );
    let (copied, kernel) = (
        delta(&after, &before, "bytes_copied"),
        delta(&after, &before, "bytes_kernel"),
    );
    eprintln!(
        "websocket: 8 MiB each way; after the upgrade kernel {kernel} B, userspace copied {copied} B"
    );
    let payload = frames * 64 * 1024;
    assert!(kernel >= 2 * payload, "kernel carried the frames: {kernel}");
    assert_eq!(
        copied, 0,
        "no byte went through userspace after the upgrade"
    );
    assert_eq!(delta(&after, &before_upgrade, "connections_offloaded"), 1);
}

/// `splice_threshold_bytes` and `pipe_size_bytes` in the TOML file reach the data path: with a
/// threshold of 8 KiB, `auto` splices a 64 KiB body that it copies with the default 256 KiB
/// threshold, through pipes of the asked size, and the body arrives intact either way.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn the_splice_threshold_and_pipe_size_come_from_the_config_file() {
    const BODY: usize = 64 * 1024;
    let dir = std::env::temp_dir().join(unique("splice-knobs"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("router.toml");
    std::fs::write(
        &config,
        "splice_threshold_bytes = 8192\npipe_size_bytes = 65536\n",
    )
    .expect("config file");
    let domain = format!("{}.local", unique("splice-knobs"));
    let backend = Container::backend(
        &unique("splice-knobs"),
        &[&format!("aliyun.routing.port_80={domain}")],
    );
    let expected: Vec<u8> = (0..BODY).map(|i| (i % 251) as u8).collect();
    let spliced_for_one_body = |agent: &Agent| {
        agent.wait_up(&domain, &[&backend.id], Duration::from_secs(15));
        let before = counters(agent);
        let response =
            tests::client::get(agent.http_addr(), &domain, &format!("/bytes?n={BODY}"), &[])
                .expect("request");
        assert_eq!(response.status, 200);
        assert!(response.body == expected, "the body arrives intact");
        delta(&counters(agent), &before, "bytes_spliced")
    };

    let tuned = Agent::start(&["--datapath", "auto", "--config", config.to_str().unwrap()]);
    let datapath = counters(&tuned);
    assert_eq!(datapath["splice_threshold"], 8192);
    assert_eq!(datapath["pipe_size"], 65536);
    let spliced = spliced_for_one_body(&tuned);
    // What arrived in the same read as the response head is copied; the rest is spliced.
    assert!(
        spliced > (BODY / 2) as u64,
        "64 KiB over an 8 KiB threshold is spliced: {spliced}"
    );

    let default = Agent::start(&["--datapath", "auto"]);
    let datapath = counters(&default);
    assert_eq!(datapath["splice_threshold"], 256 * 1024);
    assert_eq!(datapath["pipe_size"], 1024 * 1024);
    assert_eq!(
        spliced_for_one_body(&default),
        0,
        "64 KiB under the default 256 KiB threshold is copied"
    );
    let _ = std::fs::remove_dir_all(dir);
}
