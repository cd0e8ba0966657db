//! What the kernel should do for each `tcp://` route of a routing table: send connects to a
//! slot list of backends (weights as repeated slots), refuse them (no `up` backend), or leave
//! the route to the userspace listener (a backend the kernel cannot reach directly). Pure: the
//! table in, the decisions out.
use std::{collections::BTreeMap, net::SocketAddr, net::SocketAddrV4};

use router_common::socket_lb::MAX_SLOTS;

use crate::table::RoutingTable;

/// How one `tcp://` route is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoutePlan {
    /// In the kernel: each connect goes to a random slot. No slot: connects are refused.
    Kernel { slots: Vec<SocketAddrV4> },
    /// By the agent's listener, for this reason.
    Userspace { reason: &'static str },
}

/// Why a route stays in userspace when one of its backends is not kernel-reachable.
pub const NOT_DIRECTLY_REACHABLE: &str =
    "a backend the kernel cannot connect to directly (loopback, IPv6 or behind another node)";
/// Why a route stays in userspace when it has more backends than slots.
pub const TOO_MANY_BACKENDS: &str = "more up backends than kernel slots (256)";

/// The plan of every `tcp://` route of the table, by listen port.
pub fn plan_routes(table: &RoutingTable) -> BTreeMap<u16, RoutePlan> {
    table
        .tcp_ports()
        .filter_map(|port| {
            let route = table.tcp_route(port)?;
            // Only backends that take new connections matter: a draining or down one that
            // the kernel could not reach changes nothing, since it gets no slot either way.
            let mut weights: BTreeMap<SocketAddrV4, u32> = BTreeMap::new();
            for backend in route.backends.iter().filter(|b| b.takes_new_traffic()) {
                if !backend.kernel_reachable() {
                    return Some((
                        port,
                        RoutePlan::Userspace {
                            reason: NOT_DIRECTLY_REACHABLE,
                        },
                    ));
                }
                if let SocketAddr::V4(addr) = backend.addr {
                    // Two containers cannot share an address; if they ever did, one
                    // backend with both weights is what the kernel would see anyway.
                    *weights.entry(addr).or_default() += backend.weight;
                }
            }
            let weights: Vec<(SocketAddrV4, u32)> = weights.into_iter().collect();
            let plan = match slot_counts(&weights.iter().map(|(_, w)| *w).collect::<Vec<_>>()) {
                Some(counts) => RoutePlan::Kernel {
                    slots: weights
                        .iter()
                        .zip(counts)
                        .flat_map(|((addr, _), n)| std::iter::repeat_n(*addr, n as usize))
                        .collect(),
                },
                None => RoutePlan::Userspace {
                    reason: TOO_MANY_BACKENDS,
                },
            };
            Some((port, plan))
        })
        .collect()
}

/// Slots per backend for these weights (all > 0): proportional to the weights, at least one
/// each, at most [`MAX_SLOTS`] in all. `None` when there are more backends than slots.
///
/// Weights are first divided by their greatest common divisor (two backends of weight 100 take
/// one slot each). If the reduced weights still need too many slots, each backend gets one
/// slot plus its share of the rest, rounded down: no backend is off by more than one slot.
pub fn slot_counts(weights: &[u32]) -> Option<Vec<u32>> {
    let max = MAX_SLOTS as u64;
    if weights.len() as u64 > max {
        return None;
    }
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let reduced: Vec<u64> = weights.iter().map(|w| u64::from(w / divisor)).collect();
    let total: u64 = reduced.iter().sum();
    if total <= max {
        return Some(reduced.iter().map(|&w| w as u32).collect());
    }
    let spare = max - weights.len() as u64;
    Some(
        reduced
            .iter()
            .map(|&w| (1 + w * spare / total) as u32)
            .collect(),
    )
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        health::BackendState,
        labels::Scheme,
        table::{Backend, RouteInput, RouteKey},
    };

    #[test]
    fn slot_counts_follow_the_weights() {
        let cases: &[(&[u32], Option<&[u32]>)] = &[
            (&[], Some(&[])),
            (&[100], Some(&[1])),
            (&[100, 100], Some(&[1, 1])),
            (&[100, 50], Some(&[2, 1])),
            (&[30, 20, 10], Some(&[3, 2, 1])),
            (&[1, 100], Some(&[1, 100])),
            (&[99, 100], Some(&[99, 100])),
            // 3 x 97 = 291 slots needed: one each plus the share of the 253 others.
            (&[97, 97, 97], Some(&[1, 1, 1])),
            (&[97, 98, 99], Some(&[84, 85, 86])),
        ];
        for (weights, expected) in cases {
            let got = slot_counts(weights);
            assert_eq!(got.as_deref(), *expected, "{weights:?}");
            if let Some(counts) = got {
                assert!(counts.iter().sum::<u32>() as usize <= MAX_SLOTS);
                assert!(counts.iter().all(|&n| n >= 1));
            }
        }
    }

    #[test]
    fn slot_counts_stay_bounded_and_fair_for_many_backends() {
        let weights: Vec<u32> = (1..=200).map(|i| i % 100 + 1).collect();
        let counts = slot_counts(&weights).unwrap();
        assert!(counts.iter().sum::<u32>() as usize <= MAX_SLOTS);
        assert!(counts.iter().all(|&n| n >= 1));
        assert_eq!(
            slot_counts(&vec![100; MAX_SLOTS]).unwrap(),
            vec![1; MAX_SLOTS]
        );
        assert_eq!(slot_counts(&vec![100; MAX_SLOTS + 1]), None);
    }

    fn backend(addr: &str, state: BackendState, weight: u32) -> Backend {
        Backend {
            container_id: addr.into(),
            container_name: addr.into(),
            addr: addr.parse().unwrap(),
            weight,
            state,
            stats: Arc::default(),
            via: None,
        }
    }

    fn tcp(port: u16, backends: Vec<Backend>) -> RouteInput {
        RouteInput {
            key: RouteKey::Tcp { listen_port: port },
            domain: format!("r{port}.local"),
            scheme: Scheme::Tcp,
            sticky: false,
            backends,
            cursor: Arc::default(),
            stats: Arc::default(),
        }
    }

    #[test]
    fn routes_become_slots_refusals_or_userspace() {
        use BackendState::{Down, Draining, Starting, Up};
        let table = RoutingTable::build(vec![
            tcp(
                1000,
                vec![
                    backend("198.18.0.3:6379", Up, 100),
                    backend("198.18.0.2:6379", Up, 50),
                    backend("198.18.0.4:6379", Draining, 100),
                    backend("198.18.0.5:6379", Down, 100),
                    backend("198.18.0.6:6379", Starting, 100),
                    backend("198.18.0.7:6379", Up, 0),
                ],
            ),
            tcp(1001, vec![backend("198.18.0.4:6379", Draining, 100)]),
            tcp(
                1002,
                vec![
                    backend("198.18.0.2:6379", Up, 100),
                    backend("127.0.0.1:6379", Up, 100),
                ],
            ),
            // A loopback backend that takes no traffic does not matter.
            tcp(
                1003,
                vec![
                    backend("198.18.0.2:6379", Up, 100),
                    backend("127.0.0.1:6379", Down, 100),
                ],
            ),
            tcp(
                1005,
                vec![{
                    // Another node's container: reached through that node's agent only.
                    let mut remote = backend("198.19.20.3:6379", Up, 100);
                    remote.via = Some("198.19.100.2:9191".parse().unwrap());
                    remote
                }],
            ),
            tcp(1004, vec![backend("[fd00::2]:6379", Up, 100)]),
        ]);
        let a = |s: &str| s.parse::<SocketAddrV4>().unwrap();
        let plans = plan_routes(&table);
        let expected = BTreeMap::from([
            (
                1000,
                RoutePlan::Kernel {
                    slots: vec![
                        a("198.18.0.2:6379"),
                        a("198.18.0.3:6379"),
                        a("198.18.0.3:6379"),
                    ],
                },
            ),
            (1001, RoutePlan::Kernel { slots: vec![] }),
            (
                1002,
                RoutePlan::Userspace {
                    reason: NOT_DIRECTLY_REACHABLE,
                },
            ),
            (
                1003,
                RoutePlan::Kernel {
                    slots: vec![a("198.18.0.2:6379")],
                },
            ),
            (
                1004,
                RoutePlan::Userspace {
                    reason: NOT_DIRECTLY_REACHABLE,
                },
            ),
            (
                1005,
                RoutePlan::Userspace {
                    reason: NOT_DIRECTLY_REACHABLE,
                },
            ),
        ]);
        assert_eq!(plans, expected);
    }
}
