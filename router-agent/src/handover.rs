//! Restarts without a gap: how an agent that received SIGTERM knows that its successor is
//! serving, so that it can stop accepting without a moment where nobody listens.
//!
//! Every listening socket of the agent has `SO_REUSEPORT`, so a new agent binds the same ports
//! while the old one still serves; it does so only once it is ready (first Docker sync, first
//! health checks). The old agent keeps accepting until it sees more listeners on each of its
//! HTTP ports than its own (`/proc/net/tcp`), or until the handover timeout, then closes its
//! listeners. With `net.ipv4.tcp_migrate_req` on, connections still queued on a closed
//! listener move to the successor's instead of being reset.
use std::{fmt::Write as _, fs, net::SocketAddr};

use tracing::{debug, info};

/// Listening sockets bound to exactly `addr`, from the kernel's socket tables.
pub fn listeners_on(addr: SocketAddr) -> usize {
    let table = match addr {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    };
    fs::read_to_string(table).map_or(0, |text| count_listeners(&text, addr))
}

/// TCP state `LISTEN` as `/proc/net/tcp` prints it.
const LISTEN: &str = "0A";

/// Counts the `LISTEN` rows of a `/proc/net/tcp{,6}` table whose local address is `addr`.
pub fn count_listeners(table: &str, addr: SocketAddr) -> usize {
    let wanted = proc_address(addr);
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1);
            let state = fields.nth(1);
            local.is_some_and(|l| l.eq_ignore_ascii_case(&wanted)) && state == Some(LISTEN)
        })
        .count()
}

/// An address as `/proc/net/tcp` prints it: the address in the kernel's memory order as hex
/// words, a colon, the port in hex.
fn proc_address(addr: SocketAddr) -> String {
    let ip = match addr {
        SocketAddr::V4(v4) => format!("{:08X}", u32::from_ne_bytes(v4.ip().octets())),
        SocketAddr::V6(v6) => v6
            .ip()
            .octets()
            .chunks(4)
            .fold(String::new(), |mut hex, word| {
                let word = u32::from_ne_bytes(word.try_into().expect("4-byte chunk"));
                let _ = write!(hex, "{word:08X}");
                hex
            }),
    };
    format!("{ip}:{:04X}", addr.port())
}

/// Turns on `net.ipv4.tcp_migrate_req` (Linux 5.14+), so that connections queued on a
/// listener that closes move to another listener of its `SO_REUSEPORT` group. Needs root; the
/// handover works without it, with a small chance of resets for connections caught in the
/// backlog at the moment the old agent closes.
pub fn enable_request_migration() {
    const KNOB: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    match fs::read_to_string(KNOB) {
        Ok(value) if value.trim() == "1" => {}
        Ok(_) => match fs::write(KNOB, "1") {
            Ok(()) => info!("turned on {KNOB}: queued connections move to a successor at restart"),
            Err(e) => debug!("cannot turn on {KNOB}: {e}"),
        },
        Err(e) => debug!("{KNOB} unavailable: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0 100 0 0 10 0
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1002 1 0 100 0 0 10 0
   2: 0100007F:2382 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1003 1 0 100 0 0 10 0
   3: 0100007F:0050 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 1004 1 0 100 0 0 10 0
";

    #[test]
    fn counts_listeners_by_address() {
        let at = |s: &str| count_listeners(TABLE, s.parse().unwrap());
        assert_eq!(at("0.0.0.0:80"), 2);
        assert_eq!(at("127.0.0.1:9090"), 1);
        // An established connection on the port is not a listener.
        assert_eq!(at("127.0.0.1:80"), 0);
        assert_eq!(at("0.0.0.0:81"), 0);
    }

    #[test]
    fn this_process_listener_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(listeners_on(addr), 1);
        drop(listener);
        assert_eq!(listeners_on(addr), 0);
    }
}
