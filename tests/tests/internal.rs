//! `*.local` domains answer only clients from the internal networks (loopback and the Docker
//! networks); a client in another network gets 404, while public domains answer it.
use std::time::Duration;

use tests::{agent::Agent, client, docker::Container, netns::OutsideHost, unique};

#[test]
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
