//! The agent loads the eBPF program into this kernel and says so; without the privilege it
//! says that in one line and routes in userspace.
use std::{process::Command, time::Duration};

use tests::{agent::Agent, client, docker::Container, unique};

fn bpftool_lists_verdict_program() -> bool {
    let out = Command::new("bpftool")
        .args(["prog", "show", "name", "tunnel_verdict"])
        .output()
        .expect("bpftool runs");
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && text.contains("sk_skb") && text.contains("tunnel_verdict")
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn verdict_program_is_loaded_and_reported() {
    let agent = Agent::start(&[]);
    let routes = agent.json("/api/routes");
    assert_eq!(routes["datapath"]["kernel_offload"], true, "{routes}");
    assert_eq!(routes["datapath"]["mode"], "auto");
    // `auto` splices tunnels of every kind (README.md, "Data path").
    assert_eq!(routes["datapath"]["tunnels"], "splice", "{routes}");
    assert_eq!(
        routes["datapath"]["websocket_tunnels"], "splice",
        "{routes}"
    );
    assert!(
        bpftool_lists_verdict_program(),
        "bpftool shows the sk_skb program while the agent runs"
    );
    assert!(
        agent.log().contains("kernel offload available"),
        "{}",
        agent.log()
    );
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn without_bpf_privilege_the_agent_says_so_and_routes_in_userspace() {
    let domain = format!("{}.local", unique("nobpf"));
    // Root without CAP_BPF / CAP_SYS_ADMIN / CAP_PERFMON in its bounding set: the bpf(2)
    // syscall is refused, as on a host that forbids eBPF.
    let agent = Agent::start_with_prefix(
        &[
            "setpriv",
            "--bounding-set",
            "-bpf,-sys_admin,-perfmon",
            "--",
        ],
        &[],
    );
    let routes = agent.json("/api/routes");
    assert_eq!(routes["datapath"]["kernel_offload"], false, "{routes}");
    let log = agent.log();
    assert_eq!(
        log.matches("kernel offload unavailable").count(),
        1,
        "one clear line: {log}"
    );

    let backend = Container::backend(
        &unique("nobpf"),
        &[&format!("aliyun.routing.port_80={domain}")],
    );
    agent.wait_up(&domain, &[&backend.id], Duration::from_secs(15));
    let response = client::get(agent.http_addr(), &domain, "/", &[]).expect("request");
    assert_eq!(response.status, 200);
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn copy_datapath_does_not_load_the_program() {
    let agent = Agent::start(&["--datapath", "copy"]);
    let routes = agent.json("/api/routes");
    assert_eq!(routes["datapath"]["kernel_offload"], false, "{routes}");
    assert_eq!(routes["datapath"]["mode"], "copy");
}
