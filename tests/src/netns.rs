//! A network namespace outside every Docker network: a client the router must treat as external.
//!
//! It is joined to the host by a veth pair in 198.19.0.0/16 (the benchmarking range, not a
//! Docker subnet), so traffic from it reaches the router with a non-internal source address.
use std::process::Command;

pub struct OutsideHost {
    pub name: String,
    host_veth: String,
    /// The host's address on the pair: where the namespace reaches the router.
    pub host_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) runs");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl OutsideHost {
    /// A host on an existing bridge (the cluster's, say) with this address (`a.b.c.d/len`):
    /// on the same network as the bridge's members, yet none of them.
    pub fn on_bridge(bridge: &str, address: &str) -> Self {
        let id = std::process::id() % 100_000;
        let name = format!("rt-brout-{id}");
        let host_veth = format!("rtb{id}h");
        let ns_veth = format!("rtb{id}n");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &host_veth])
            .output();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_veth, "type", "veth", "peer", "name", &ns_veth,
        ]);
        ip(&["link", "set", &ns_veth, "netns", &name]);
        ip(&["link", "set", &host_veth, "master", bridge]);
        ip(&["link", "set", &host_veth, "up"]);
        ip(&[
            "netns", "exec", &name, "ip", "addr", "add", address, "dev", &ns_veth,
        ]);
        ip(&["netns", "exec", &name, "ip", "link", "set", &ns_veth, "up"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        Self {
            name,
            host_veth,
            host_ip: String::new(),
        }
    }

    /// `subnet_octet` picks 198.19.<octet>.0/30, so concurrent users do not collide.
    pub fn create(subnet_octet: u8) -> Self {
        let id = std::process::id() % 100_000;
        let name = format!("rt-out-{id}");
        let host_veth = format!("rto{id}h");
        let ns_veth = format!("rto{id}n");
        let host_ip = format!("198.19.{subnet_octet}.1");
        let ns_ip = format!("198.19.{subnet_octet}.2");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &host_veth])
            .output();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_veth, "type", "veth", "peer", "name", &ns_veth,
        ]);
        ip(&["link", "set", &ns_veth, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_veth]);
        ip(&["link", "set", &host_veth, "up"]);
        ip(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_veth,
        ]);
        ip(&["netns", "exec", &name, "ip", "link", "set", &ns_veth, "up"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        Self {
            name,
            host_veth,
            host_ip,
        }
    }

    /// Runs curl inside the namespace; returns the HTTP status it printed.
    pub fn curl_status(&self, url: &str, host_header: &str) -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-m",
                "5",
                "-w",
                "%{http_code}",
                "-H",
            ])
            .arg(format!("Host: {host_header}"))
            .arg(url)
            .output()
            .expect("curl runs in the namespace");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for OutsideHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// An address of this host on an interface of its own (a veth pair left in the host's
/// namespace: this kernel has no `dummy` links), in none of the Docker networks: a connection
/// bound to it comes from the host itself, as one that Docker masquerades to the host's uplink
/// address does. Removed (with its interfaces) on drop.
pub struct HostAddress {
    link: String,
    pub ip: std::net::IpAddr,
}

impl HostAddress {
    /// `198.19.250.<host_octet>/32` on a new interface.
    pub fn add(host_octet: u8) -> Self {
        let link = format!("rth{}-{host_octet}", std::process::id() % 100_000);
        let peer = format!("{link}p");
        let address = std::net::IpAddr::from([198, 19, 250, host_octet]);
        let _ = Command::new("ip").args(["link", "del", &link]).output();
        ip(&["link", "add", &link, "type", "veth", "peer", "name", &peer]);
        ip(&["addr", "add", &format!("{address}/32"), "dev", &link]);
        ip(&["link", "set", &peer, "up"]);
        ip(&["link", "set", &link, "up"]);
        Self { link, ip: address }
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
    }
}
