//! `*.local` domains answer only clients from the internal networks (loopback, the host's own
//! addresses and the Docker networks); a client in another network gets 404, while public
//! domains answer it.
use std::{net::SocketAddr, time::Duration};

use tests::{
    agent::Agent,
    client,
    docker::Container,
    netns::{HostAddress, OutsideHost},
    unique, wait_for,
};

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn internal_domain_from_outside_gets_404() {
    let internal = format!("{}.local", unique("internal"));
    let public = format!("{}.example", unique("public"));
    let agent = Agent::start(&[]);
    let backend = Container::backend(
        &unique("internal"),
        &[&format!("aliyun.routing.port_80={internal};{public}")],
    );
    agent.wait_up(&internal, &[&backend.id], Duration::from_secs(15));

    // From this host (loopback): internal.
    let response = client::get(agent.http_addr(), &internal, "/", &[]).expect("request");
    assert_eq!(response.status, 200);

    let outside = OutsideHost::create(77);
    let url = format!("http://{}:{}/", outside.host_ip, agent.port);
    assert_eq!(
        outside.curl_status(&url, &internal),
        "404",
        "internal domain from 198.19.77.2"
    );
    // The same path works for a public domain, so the 404 is the policy, not the network.
    assert_eq!(
        outside.curl_status(&url, &public),
        "200",
        "public domain from 198.19.77.2"
    );
    let routes = agent.json("/api/routes");
    let route = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["domain"] == internal.as_str())
        .unwrap()
        .clone();
    assert_eq!(route["internal"], true);
}

/// The status a client on this host gets when its connection comes from `source` (an address
/// of the host that is in no Docker network) to the router's port on that same address.
fn status_from(source: &HostAddress, agent: &Agent, domain: &str) -> u16 {
    let router = SocketAddr::new(source.ip, agent.port);
    client::get_from(source.ip, router, domain, "/")
        .unwrap_or_else(|e| panic!("GET {domain} from {}: {e}", source.ip))
        .status
}

fn internal_cidrs(agent: &Agent) -> Vec<String> {
    agent.json("/api/containers")["internal_cidrs"]
        .as_array()
        .expect("internal_cidrs")
        .iter()
        .map(|c| c.as_str().expect("a string").to_owned())
        .collect()
}

/// A process on the Docker host reaching the router from one of the host's own addresses
/// (Docker masquerades host-to-bridge traffic to the uplink address, in no Docker network) is
/// an internal client by default, as loopback is: addresses present at start, and addresses
/// added later. An explicit `--internal-cidr` replaces that default.
#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn host_addresses_are_internal_unless_internal_cidr_is_given() {
    let internal = format!("{}.local", unique("host-addr"));
    let backend = Container::backend(
        &unique("host-addr"),
        &[&format!("aliyun.routing.port_80={internal}")],
    );
    let at_start = HostAddress::add(101);
    let agent = Agent::start(&[]);
    let fixed = Agent::start(&["--internal-cidr", "127.0.0.0/8"]);
    for agent in [&agent, &fixed] {
        agent.wait_up(&internal, &[&backend.id], Duration::from_secs(15));
    }

    assert_eq!(
        status_from(&at_start, &agent, &internal),
        200,
        "from the host address {} (present at start)",
        at_start.ip
    );
    assert_eq!(
        status_from(&at_start, &fixed, &internal),
        404,
        "--internal-cidr 127.0.0.0/8 replaces the default: {} is not internal",
        at_start.ip
    );
    assert_eq!(
        client::get(fixed.http_addr(), &internal, "/", &[])
            .expect("request")
            .status,
        200,
        "loopback is in the explicit --internal-cidr"
    );
    assert_eq!(internal_cidrs(&fixed), ["127.0.0.0/8"]);

    // Addresses are followed: one added while the agent runs becomes internal, one removed is
    // no longer listed.
    let later = HostAddress::add(102);
    let removed = at_start.ip.to_string() + "/32";
    drop(at_start);
    wait_for(
        "the host address added later to be internal",
        Duration::from_secs(15),
        || status_from(&later, &agent, &internal) == 200,
    );
    wait_for(
        "the removed host address to leave the internal ranges",
        Duration::from_secs(15),
        || !internal_cidrs(&agent).contains(&removed),
    );
    assert!(
        internal_cidrs(&agent).contains(&format!("{}/32", later.ip)),
        "{:?}",
        internal_cidrs(&agent)
    );
    assert_eq!(status_from(&later, &fixed, &internal), 404);
}
