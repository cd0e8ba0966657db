//! The host's own addresses: clients as internal as loopback.
//!
//! A process on the Docker host that reaches the router through the bridge gateway (the
//! `host-gateway` alias) or any other address of the host is seen with one of the host's own
//! addresses as its source, often the uplink's, since Docker masquerades traffic from the host
//! to its bridges. Every address assigned to an interface of the agent's network namespace (the
//! host's, with host networking) is therefore an internal client by default. The set is read at
//! start, re-read when the Docker networks are listed again, and polled, so addresses added or
//! removed later are followed.
use std::{net::IpAddr, time::Duration};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::{cidr::Cidr, registry::Message};

/// How often the interface addresses are read again.
pub const POLL_PERIOD: Duration = Duration::from_secs(5);

/// Each address of the host's interfaces as a one-address range, sorted and without
/// duplicates. Empty (and one warning) if the interfaces cannot be listed.
pub fn read() -> Vec<Cidr> {
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => ranges(interfaces.iter().map(if_addrs::Interface::ip)),
        Err(e) => {
            warn!("cannot list the host's interface addresses ({e}); they are not internal");
            Vec::new()
        }
    }
}

/// The addresses for a log line: `127.0.0.1/32, ::1/128`.
pub fn list(cidrs: &[Cidr]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One range per distinct address, in a stable order.
fn ranges(addresses: impl IntoIterator<Item = IpAddr>) -> Vec<Cidr> {
    let mut all: Vec<Cidr> = addresses.into_iter().map(Cidr::host).collect();
    all.sort_by_key(ToString::to_string);
    all.dedup();
    all
}

/// Tells the registry the host's addresses whenever they change, until it is gone.
pub async fn watch(registry: mpsc::UnboundedSender<Message>) {
    // The first read is sent too: the registry read its own at start, and drops a set it has.
    let mut known = None;
    let mut tick = tokio::time::interval(POLL_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = read();
        if known.as_ref() == Some(&now) {
            continue;
        }
        debug!(addresses = %list(&now), "read the host's addresses");
        known = Some(now.clone());
        if registry.send(Message::HostAddresses(now)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_range_per_address() {
        let got = ranges(
            [
                "198.19.250.1",
                "::1",
                "127.0.0.1",
                "198.19.250.1",
                "fe80::1",
            ]
            .map(|a| a.parse::<IpAddr>().unwrap()),
        );
        let got: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            ["127.0.0.1/32", "198.19.250.1/32", "::1/128", "fe80::1/128"]
        );
        let host: Cidr = "198.19.250.1/32".parse().unwrap();
        assert!(host.contains("198.19.250.1".parse().unwrap()));
        assert!(!host.contains("198.19.250.2".parse().unwrap()));
    }

    #[test]
    fn loopback_is_among_the_host_addresses() {
        let all = read();
        assert!(
            all.iter().any(|c| c.contains("127.0.0.1".parse().unwrap())),
            "{all:?}"
        );
    }
}
