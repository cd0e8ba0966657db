//! The kernel maps as the agent knows them, and the plan that brings them to a wanted state:
//! only what changed, in an order that keeps every reader consistent. Pure.
//!
//! Order of a plan: new backend entries, then slot lists (each route's list is one map value,
//! replaced whole), then frontends; deletions last, in reverse dependency order. A connect
//! therefore never finds a frontend whose route is missing or a slot whose backend was not
//! written yet. The one race left, a connect that read a slot list just before a backend it
//! names was deleted, ends in a map miss, and a miss leaves the connect to the userspace
//! listener.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use router_common::socket_lb::{MAX_BACKENDS, MAX_FRONTENDS, MAX_ROUTES};

/// A route's slot list as written: backend ids, and the generation of this version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteState {
    pub generation: u64,
    pub slots: Vec<u32>,
}

/// The content of the maps (routes are keyed by their listen port).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Frontend (local address, route port) -> route.
    pub frontends: BTreeMap<SocketAddrV4, u16>,
    pub routes: BTreeMap<u16, RouteState>,
    /// Backend id -> address.
    pub backends: BTreeMap<u32, SocketAddrV4>,
}

/// One map update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend { id: u32, addr: SocketAddrV4 },
    PutRoute { port: u16, route: RouteState },
    PutFrontend { frontend: SocketAddrV4, route: u16 },
    DeleteFrontend { frontend: SocketAddrV4 },
    DeleteRoute { port: u16 },
    DeleteBackend { id: u32 },
}

impl KernelState {
    /// The state after `op` was written.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutBackend { id, addr } => {
                self.backends.insert(*id, *addr);
            }
            Op::PutRoute { port, route } => {
                self.routes.insert(*port, route.clone());
            }
            Op::PutFrontend { frontend, route } => {
                self.frontends.insert(*frontend, *route);
            }
            Op::DeleteFrontend { frontend } => {
                self.frontends.remove(frontend);
            }
            Op::DeleteRoute { port } => {
                self.routes.remove(port);
            }
            Op::DeleteBackend { id } => {
                self.backends.remove(id);
            }
        }
    }

    /// Whether connects to `port` are decided in the kernel (some frontend leads to it).
    pub fn serves(&self, port: u16) -> bool {
        self.routes.contains_key(&port) && self.frontends.values().any(|&r| r == port)
    }
}

/// The updates that turn `current` into: these routes (port -> slot list of backend
/// addresses) behind frontends on these local addresses.
pub fn plan(
    current: &KernelState,
    routes: &BTreeMap<u16, Vec<SocketAddrV4>>,
    addresses: &BTreeSet<Ipv4Addr>,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut ids: BTreeMap<SocketAddrV4, u32> = current
        .backends
        .iter()
        .map(|(id, addr)| (*addr, *id))
        .collect();
    let mut taken: BTreeSet<u32> = current.backends.keys().copied().collect();
    let mut next_id = 1;
    for addr in routes.values().flatten() {
        if ids.contains_key(addr) {
            continue;
        }
        // The lowest free id: ids stay small and dense, and one that was freed is reused.
        while !taken.insert(next_id) {
            next_id += 1;
        }
        ids.insert(*addr, next_id);
        ops.push(Op::PutBackend {
            id: next_id,
            addr: *addr,
        });
    }
    for (port, addrs) in routes {
        let slots: Vec<u32> = addrs.iter().map(|addr| ids[addr]).collect();
        let old = current.routes.get(port);
        if old.is_some_and(|old| old.slots == slots) {
            continue;
        }
        ops.push(Op::PutRoute {
            port: *port,
            route: RouteState {
                generation: old.map_or(1, |old| old.generation + 1),
                slots,
            },
        });
    }
    let frontends: BTreeMap<SocketAddrV4, u16> = routes
        .keys()
        .flat_map(|&port| {
            addresses
                .iter()
                .map(move |&ip| (SocketAddrV4::new(ip, port), port))
        })
        .collect();
    for (frontend, route) in &frontends {
        if current.frontends.get(frontend) != Some(route) {
            ops.push(Op::PutFrontend {
                frontend: *frontend,
                route: *route,
            });
        }
    }
    for frontend in current.frontends.keys() {
        if !frontends.contains_key(frontend) {
            ops.push(Op::DeleteFrontend {
                frontend: *frontend,
            });
        }
    }
    for port in current.routes.keys() {
        if !routes.contains_key(port) {
            ops.push(Op::DeleteRoute { port: *port });
        }
    }
    let used: BTreeSet<u32> = routes.values().flatten().map(|addr| ids[addr]).collect();
    for id in current.backends.keys() {
        if !used.contains(id) {
            ops.push(Op::DeleteBackend { id: *id });
        }
    }
    ops
}

/// The routes that fit the maps, in port order: at most [`MAX_ROUTES`], [`MAX_FRONTENDS`]
/// frontends (routes times `addresses`) and [`MAX_BACKENDS`] distinct backends. Returns the
/// ports of those that do not.
pub fn fit(routes: &mut BTreeMap<u16, Vec<SocketAddrV4>>, addresses: usize) -> Vec<u16> {
    let mut backends = BTreeSet::new();
    let mut left_out = Vec::new();
    let mut kept = 0usize;
    routes.retain(|port, slots| {
        let new: BTreeSet<SocketAddrV4> = slots
            .iter()
            .filter(|a| !backends.contains(*a))
            .copied()
            .collect();
        let fits = kept < MAX_ROUTES as usize
            && (kept + 1) * addresses <= MAX_FRONTENDS as usize
            && backends.len() + new.len() <= MAX_BACKENDS as usize;
        if fits {
            kept += 1;
            backends.extend(new);
        } else {
            left_out.push(*port);
        }
        fits
    });
    left_out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn ips(list: &[&str]) -> BTreeSet<Ipv4Addr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// Applies the plan and checks that planning again changes nothing.
    fn step(
        state: &mut KernelState,
        routes: &BTreeMap<u16, Vec<SocketAddrV4>>,
        addresses: &BTreeSet<Ipv4Addr>,
    ) -> Vec<Op> {
        let ops = plan(state, routes, addresses);
        for op in &ops {
            state.apply(op);
        }
        assert_eq!(plan(state, routes, addresses), [], "a second plan is empty");
        ops
    }

    #[test]
    fn from_nothing_to_one_route_in_dependency_order() {
        let mut state = KernelState::default();
        let routes = BTreeMap::from([(
            16379,
            vec![
                a("198.18.0.2:6379"),
                a("198.18.0.3:6379"),
                a("198.18.0.3:6379"),
            ],
        )]);
        let ops = step(&mut state, &routes, &ips(&["198.18.0.1", "127.0.0.1"]));
        assert_eq!(
            ops,
            [
                Op::PutBackend {
                    id: 1,
                    addr: a("198.18.0.2:6379")
                },
                Op::PutBackend {
                    id: 2,
                    addr: a("198.18.0.3:6379")
                },
                Op::PutRoute {
                    port: 16379,
                    route: RouteState {
                        generation: 1,
                        slots: vec![1, 2, 2]
                    }
                },
                Op::PutFrontend {
                    frontend: a("127.0.0.1:16379"),
                    route: 16379
                },
                Op::PutFrontend {
                    frontend: a("198.18.0.1:16379"),
                    route: 16379
                },
            ]
        );
        assert!(state.serves(16379));
        assert!(!state.serves(16380));
    }

    #[test]
    fn changes_touch_only_what_changed() {
        let mut state = KernelState::default();
        let addresses = ips(&["198.18.0.1"]);
        let mut routes = BTreeMap::from([
            (1000, vec![a("198.18.0.2:7000"), a("198.18.0.3:7000")]),
            (2000, vec![a("198.18.0.9:80")]),
        ]);
        step(&mut state, &routes, &addresses);

        // One backend of route 1000 leaves: its list is rewritten (next generation), then the
        // backend entry goes; route 2000 is untouched.
        routes.insert(1000, vec![a("198.18.0.3:7000")]);
        let ops = step(&mut state, &routes, &addresses);
        assert_eq!(
            ops,
            [
                Op::PutRoute {
                    port: 1000,
                    route: RouteState {
                        generation: 2,
                        slots: vec![2]
                    }
                },
                Op::DeleteBackend { id: 1 },
            ]
        );

        // No up backend: the route stays, with an empty list (connects are refused).
        routes.insert(1000, vec![]);
        let ops = step(&mut state, &routes, &addresses);
        assert_eq!(
            ops,
            [
                Op::PutRoute {
                    port: 1000,
                    route: RouteState {
                        generation: 3,
                        slots: vec![]
                    }
                },
                Op::DeleteBackend { id: 2 },
            ]
        );
        assert!(state.serves(1000));

        // A new backend takes the lowest free id; a new local address adds frontends only.
        routes.insert(1000, vec![a("198.18.0.4:7000")]);
        let ops = step(&mut state, &routes, &ips(&["198.18.0.1", "198.18.1.1"]));
        assert_eq!(
            ops,
            [
                Op::PutBackend {
                    id: 1,
                    addr: a("198.18.0.4:7000")
                },
                Op::PutRoute {
                    port: 1000,
                    route: RouteState {
                        generation: 4,
                        slots: vec![1]
                    }
                },
                Op::PutFrontend {
                    frontend: a("198.18.1.1:1000"),
                    route: 1000
                },
                Op::PutFrontend {
                    frontend: a("198.18.1.1:2000"),
                    route: 2000
                },
            ]
        );

        // The route goes away (served from userspace, or gone): frontends first, then the
        // route, then its backends.
        routes.remove(&1000);
        let ops = step(&mut state, &routes, &ips(&["198.18.0.1", "198.18.1.1"]));
        assert_eq!(
            ops,
            [
                Op::DeleteFrontend {
                    frontend: a("198.18.0.1:1000")
                },
                Op::DeleteFrontend {
                    frontend: a("198.18.1.1:1000")
                },
                Op::DeleteRoute { port: 1000 },
                Op::DeleteBackend { id: 1 },
            ]
        );
    }

    #[test]
    fn an_adopted_state_keeps_its_ids_and_generations() {
        // What a new agent reads from pinned maps, with a leftover frontend of a route that
        // no longer exists and a backend nothing references.
        let mut state = KernelState {
            frontends: BTreeMap::from([(a("198.18.0.1:1000"), 1000), (a("198.18.0.1:3000"), 3000)]),
            routes: BTreeMap::from([(
                1000,
                RouteState {
                    generation: 7,
                    slots: vec![5],
                },
            )]),
            backends: BTreeMap::from([(5, a("198.18.0.2:7000")), (9, a("198.18.0.9:7000"))]),
        };
        let routes = BTreeMap::from([(1000, vec![a("198.18.0.2:7000")])]);
        let ops = step(&mut state, &routes, &ips(&["198.18.0.1"]));
        assert_eq!(
            ops,
            [
                Op::DeleteFrontend {
                    frontend: a("198.18.0.1:3000")
                },
                Op::DeleteBackend { id: 9 },
            ]
        );
        assert_eq!(state.routes[&1000].generation, 7);
    }

    #[test]
    fn fit_leaves_out_what_the_maps_cannot_hold() {
        let mut routes: BTreeMap<u16, Vec<SocketAddrV4>> = (0..5000u16)
            .map(|p| (p, vec![a("198.18.0.2:80")]))
            .collect();
        let left_out = fit(&mut routes, 1);
        assert_eq!(routes.len(), MAX_ROUTES as usize);
        assert_eq!(left_out.len(), 5000 - MAX_ROUTES as usize);
        assert_eq!(left_out[0], MAX_ROUTES as u16);

        // Frontends: 8 addresses each.
        let mut routes: BTreeMap<u16, Vec<SocketAddrV4>> =
            (0..3000u16).map(|p| (p, vec![])).collect();
        let left_out = fit(&mut routes, 8);
        assert_eq!(routes.len(), MAX_FRONTENDS as usize / 8);
        assert_eq!(left_out.len(), 3000 - MAX_FRONTENDS as usize / 8);
    }
}
