//! Least privilege (docs/security.md): an agent started as root with eBPF keeps only the
//! documented capabilities once it serves, in every thread; an agent started as an
//! unprivileged user with only `CAP_NET_BIND_SERVICE` binds a port below 1024 and routes, in
//! userspace, and says once why eBPF is off.
use std::{
    net::{SocketAddr, TcpListener},
    os::unix::fs::MetadataExt as _,
    time::Duration,
};

use tests::{agent::Agent, docker::Container, tools::curl, unique, wait_for};

/// `CAP_NET_BIND_SERVICE`'s bit in the `/proc/<pid>/status` masks.
const NET_BIND_SERVICE: u64 = 1 << 10;
/// `CAP_BPF`'s bit.
const BPF: u64 = 1 << 39;
/// `CAP_SYS_ADMIN`'s bit.
const SYS_ADMIN: u64 = 1 << 21;

/// The documented set after start with eBPF loaded (docs/security.md): `CAP_NET_BIND_SERVICE`;
/// on kernels before 6.5 with `kernel.unprivileged_bpf_disabled` set, also `CAP_BPF`
/// (`CAP_SYS_ADMIN` before 5.8).
fn documented_minimum_with_ebpf() -> u64 {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut numbers = release
        .trim()
        .split(['.', '-'])
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let gated = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .is_ok_and(|v| v.trim() != "0");
    match (version >= (6, 5), gated, version >= (5, 8)) {
        (false, true, true) => NET_BIND_SERVICE | BPF,
        (false, true, false) => NET_BIND_SERVICE | SYS_ADMIN,
        _ => NET_BIND_SERVICE,
    }
}

/// The capability masks and ids of one thread, from its `/proc/.../status`.
#[derive(Debug, PartialEq, Eq)]
struct Privileges {
    inheritable: u64,
    permitted: u64,
    effective: u64,
    bounding: u64,
    ambient: u64,
    no_new_privs: bool,
    uid: u32,
}

fn privileges(status_path: &str) -> Privileges {
    let status = std::fs::read_to_string(status_path)
        .unwrap_or_else(|e| panic!("reading {status_path}: {e}"));
    let field = |name: &str| -> &str {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("{name} in {status_path}:\n{status}"))
            .trim()
    };
    let mask = |name| u64::from_str_radix(field(name), 16).expect("hex mask");
    Privileges {
        inheritable: mask("CapInh"),
        permitted: mask("CapPrm"),
        effective: mask("CapEff"),
        bounding: mask("CapBnd"),
        ambient: mask("CapAmb"),
        no_new_privs: field("NoNewPrivs") == "1",
        uid: field("Uid")
            .split_whitespace()
            .nth(1)
            .and_then(|euid| euid.parse().ok())
            .expect("effective uid"),
    }
}

/// The privileges of every thread of the process (capabilities are per thread: one left
/// behind would keep them).
fn every_thread(pid: u32) -> Vec<(String, Privileges)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("task list");
    tasks
        .flatten()
        .map(|task| {
            let tid = task.file_name().to_string_lossy().into_owned();
            let privileges = privileges(&format!("/proc/{pid}/task/{tid}/status"));
            (tid, privileges)
        })
        .collect()
}

/// Asserts that every thread holds exactly `kept` as effective, permitted and bounding set,
/// nothing inheritable or ambient, and `no_new_privs`.
fn assert_reduced_to(agent: &Agent, kept: u64) {
    let threads = every_thread(agent.pid());
    assert!(
        threads.len() > 2,
        "the runtime's threads are there: {threads:?}"
    );
    for (tid, p) in &threads {
        let context = format!(
            "thread {tid} (uid {}): CapEff {:#x} CapPrm {:#x} CapBnd {:#x} CapInh {:#x} CapAmb \
             {:#x} NoNewPrivs {}; wanted {kept:#x}\n{}",
            p.uid,
            p.effective,
            p.permitted,
            p.bounding,
            p.inheritable,
            p.ambient,
            p.no_new_privs,
            agent.log()
        );
        assert_eq!(p.effective, kept, "CapEff, {context}");
        assert_eq!(p.permitted, kept, "CapPrm, {context}");
        assert_eq!(p.bounding, kept, "CapBnd, {context}");
        assert_eq!(p.inheritable, 0, "CapInh, {context}");
        assert_eq!(p.ambient, 0, "CapAmb, {context}");
        assert!(p.no_new_privs, "NoNewPrivs, {context}");
    }
}

/// Waits until `/healthz` says `ok` (listeners bound, socket-lb attached).
fn wait_serving(agent: &Agent) {
    wait_for("the agent to serve", Duration::from_secs(20), || {
        agent.health().is_some_and(|(status, _)| status == 200)
    });
}

/// Serves one request for `domain` through the agent's HTTP listener on `port` with curl and
/// returns the backend that answered (the test backend's `X-Backend` header).
fn curl_backend(port: u16, domain: &str) -> String {
    let headers = curl(&[
        "-o",
        "/dev/null",
        "-D",
        "-",
        "-H",
        &format!("Host: {domain}"),
        &format!("http://127.0.0.1:{port}/"),
    ]);
    headers
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("x-backend")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no X-Backend header: {headers}"))
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn privilege_a_root_agent_with_ebpf_keeps_only_the_documented_capabilities_once_serving() {
    let agent = Agent::start(&[]);
    wait_serving(&agent);
    // The drop must come after the programs loaded, and must not keep the socket-lb programs
    // from being attached once the agent is ready (which it does after dropping).
    wait_for(
        "socket-level balancing attached",
        Duration::from_secs(10),
        || agent.json("/api/routes")["datapath"]["socket_lb"]["owner"] == true,
    );
    let routes = agent.json("/api/routes");
    assert_eq!(routes["datapath"]["kernel_offload"], true, "{routes}");
    let kept = documented_minimum_with_ebpf();
    assert_reduced_to(&agent, kept);
    assert_eq!(
        privileges(&format!("/proc/{}/status", agent.pid())).uid,
        0,
        "still root: the files it opens are root's"
    );
    let (_, health) = agent.health().expect("healthz");
    assert_eq!(
        health["capabilities"][0], "CAP_NET_BIND_SERVICE",
        "{health}"
    );
    let log = agent.log();
    assert_eq!(
        log.matches("capabilities kept after start: CAP_NET_BIND_SERVICE")
            .count(),
        1,
        "one line says what is kept: {log}"
    );

    // With that set, it still routes.
    let domain = format!("{}.local", unique("priv-root"));
    let backend = Container::backend(
        &unique("priv-root"),
        &[&format!("aliyun.routing.port_80={domain}")],
    );
    agent.wait_up(&domain, &[&backend.id], Duration::from_secs(15));
    assert_eq!(curl_backend(agent.port, &domain), backend.short_id());
}

/// A port below 1024 that nothing listens on.
fn free_low_port() -> u16 {
    let start = 600 + (std::process::id() % 300) as u16;
    (0..400)
        .map(|i| 600 + (start - 600 + i) % 400)
        .find(|port| TcpListener::bind(("0.0.0.0", *port)).is_ok())
        .expect("a free port between 600 and 1000")
}

/// The group of the Docker engine's socket: what an operator adds the agent's user to.
fn docker_socket_group() -> u32 {
    let socket = std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|host| host.strip_prefix("unix://").map(str::to_owned))
        .unwrap_or_else(|| "/var/run/docker.sock".to_owned());
    let metadata =
        std::fs::metadata(&socket).unwrap_or_else(|e| panic!("the Docker socket {socket}: {e}"));
    assert!(
        metadata.mode() & 0o060 == 0o060,
        "{socket} is not read-write for its group (mode {:o})",
        metadata.mode()
    );
    metadata.gid()
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn privilege_an_unprivileged_agent_with_only_net_bind_service_routes_on_a_low_port_in_userspace() {
    let unprivileged_ports_from: u16 =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .expect("ip_unprivileged_port_start")
            .trim()
            .parse()
            .expect("a port number");
    let port = free_low_port();
    assert!(
        port < unprivileged_ports_from,
        "port {port} needs no privilege on this host (net.ipv4.ip_unprivileged_port_start = \
         {unprivileged_ports_from}): the test would prove nothing"
    );
    let groups = format!("--groups={}", docker_socket_group());
    // `nobody`, a member of the Docker socket's group, with CAP_NET_BIND_SERVICE as its only
    // capability (ambient, so that it survives the exec): the systemd unit's non-root variant.
    let wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        groups.as_str(),
        "--inh-caps=-all,+net_bind_service",
        "--ambient-caps=+net_bind_service",
        "--bounding-set=-all,+net_bind_service",
        "--",
    ];
    let admin: SocketAddr = format!("127.0.0.1:{}", tests::agent::free_port())
        .parse()
        .expect("addr");
    let agent = Agent::start_on(port, admin, &wrapper, &[]);
    wait_serving(&agent);
    let p = privileges(&format!("/proc/{}/status", agent.pid()));
    assert_eq!(p.uid, 65534, "{p:?}");
    assert_reduced_to(&agent, NET_BIND_SERVICE);

    let log = agent.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("unavailable")).collect();
    assert_eq!(lines.len(), 1, "one line says why eBPF is off: {log}");
    assert!(
        lines[0].contains("uid 65534 without CAP_BPF or CAP_SYS_ADMIN")
            && lines[0].contains("forwarding everything in userspace"),
        "{log}"
    );
    let routes = agent.json("/api/routes");
    assert_eq!(routes["datapath"]["kernel_offload"], false, "{routes}");

    let domain = format!("{}.local", unique("priv-user"));
    let backend = Container::backend(
        &unique("priv-user"),
        &[&format!("aliyun.routing.port_80={domain}")],
    );
    agent.wait_up(&domain, &[&backend.id], Duration::from_secs(15));
    assert_eq!(curl_backend(port, &domain), backend.short_id());
}
