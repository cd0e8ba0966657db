//! The routing table: an immutable snapshot of routes and their backends.
//!
//! The registry builds a new table whenever a container, a label or a health state changes and
//! swaps it in atomically; the proxy loads the current one per request and never locks.
use std::{
    borrow::Cow,
    cmp::Reverse,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
};

use tokio::sync::Semaphore;

use crate::{
    balance::{Schedule, sticky_target_allowed},
    fast_hash::FastHashMap,
    health::BackendState,
    labels::Scheme,
    metrics::{DurationHistogram, ErrorCounts},
};

/// Live counters and limits of one backend container; they outlive table rebuilds.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Connections carrying a request or a tunnel now (idle pooled ones are not counted).
    pub active_connections: AtomicU64,
    pub requests: AtomicU64,
    /// Failed exchanges in a row (no response, an invalid one, a response timeout); any
    /// complete exchange resets it. Passive health acts when it reaches the error limit.
    consecutive_errors: AtomicU32,
    /// Slots for requests in flight, when the backend has a connection limit.
    pub slots: Option<Arc<Semaphore>>,
    /// Failed exchanges by kind (`router_backend_errors_total`).
    pub errors: ErrorCounts,
}

/// Live statistics of one route; like [`BackendStats`] they outlive table rebuilds, and go
/// when the route does (so `/metrics` shows no series of routes that no longer exist).
#[derive(Debug, Default)]
pub struct RouteStats {
    /// From the complete request head to the end of the response, every answer included.
    pub durations: DurationHistogram,
}

impl BackendStats {
    pub fn new(max_connections: Option<usize>) -> Self {
        Self {
            slots: max_connections.map(|n| Arc::new(Semaphore::new(n))),
            ..Self::default()
        }
    }

    /// A complete exchange: the error streak ends. (A load before the store keeps the cache
    /// line shared between workers while there is no streak, which is almost always.)
    pub fn exchange_succeeded(&self) {
        if self.consecutive_errors.load(Ordering::Relaxed) != 0 {
            self.consecutive_errors.store(0, Ordering::Relaxed);
        }
    }

    /// A failed exchange; returns the length of the streak it extends.
    pub fn exchange_failed(&self) -> u32 {
        self.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Starts counting afresh (after passive health acted on a streak).
    pub fn reset_errors(&self) {
        self.consecutive_errors.store(0, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub container_id: Arc<str>,
    pub container_name: Arc<str>,
    pub addr: SocketAddr,
    pub weight: u32,
    pub state: BackendState,
    pub stats: Arc<BackendStats>,
    /// For a container of another cluster node: that node's agent, through which it is
    /// reached (`addr` is then its address on that node, for display). `None`: on this node.
    pub via: Option<SocketAddr>,
}

impl Backend {
    /// Whether the balancer may hand it new requests.
    pub fn takes_new_traffic(&self) -> bool {
        self.state == BackendState::Up && self.weight > 0
    }

    /// Whether the kernel can send a client's `connect()` straight to this backend
    /// (socket-level balancing, `socket_lb`). Not for loopback addresses (a host-network
    /// container is at 127.0.0.1, which in a client container's own namespace is the client
    /// itself) nor IPv6 (the hook is `connect4`). Backends reachable only through another
    /// node's agent must answer false here: a route with such a backend is then served from
    /// userspace, for every client.
    pub fn kernel_reachable(&self) -> bool {
        self.via.is_none()
            && matches!(self.addr, SocketAddr::V4(v4) if !v4.ip().is_loopback() && !v4.ip().is_unspecified())
    }
}

#[derive(Debug)]
pub struct Route {
    pub domain: String,
    /// Context path: `/`, or a prefix without trailing slash such as `/api`.
    pub path: String,
    pub scheme: Scheme,
    /// `*.local` domains answer only clients from the internal CIDRs.
    pub internal: bool,
    pub sticky: bool,
    /// For `tcp://` routes: the port the router listens on.
    pub listen_port: Option<u16>,
    pub backends: Vec<Backend>,
    pub stats: Arc<RouteStats>,
    schedule: Schedule,
}

impl Route {
    /// A backend for a new request: the one named by the `CONTAINERID` cookie if it may take
    /// it, else the next in the weighted schedule not in `tried`.
    pub fn select(&self, sticky_id: Option<&[u8]>, tried: &[usize]) -> Option<Selection> {
        if self.sticky
            && let Some(id) = sticky_id
            && let Some(index) = self
                .backends
                .iter()
                .position(|b| b.container_id.as_bytes() == id && sticky_target_allowed(b.state))
            && !tried.contains(&index)
        {
            return Some(Selection {
                index,
                by_cookie: true,
            });
        }
        self.schedule.next(tried).map(|index| Selection {
            index,
            by_cookie: false,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    pub index: usize,
    /// The request's cookie chose it (so the response needs no new cookie).
    pub by_cookie: bool,
}

/// Where a route is served: HTTP routes by host and path, TCP routes by listening port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKey {
    Http { domain: String, path: String },
    Tcp { listen_port: u16 },
}

/// Input for one route, gathered by the registry.
#[derive(Debug)]
pub struct RouteInput {
    pub key: RouteKey,
    pub domain: String,
    pub scheme: Scheme,
    pub sticky: bool,
    pub backends: Vec<Backend>,
    pub cursor: Arc<AtomicUsize>,
    pub stats: Arc<RouteStats>,
}

#[derive(Debug, Default)]
pub struct RoutingTable {
    /// Routes per domain, longest context path first.
    http: FastHashMap<String, Vec<Arc<Route>>>,
    tcp: FastHashMap<u16, Arc<Route>>,
    /// This node's routed containers by (container id, port), for other nodes' agents that
    /// connect through this one.
    local: FastHashMap<(Arc<str>, u16), SocketAddr>,
    /// Every backend's state by container id.
    states: FastHashMap<Arc<str>, BackendState>,
}

impl RoutingTable {
    pub fn build(inputs: Vec<RouteInput>) -> Self {
        let mut table = Self::default();
        for input in inputs {
            let weights: Vec<Option<u32>> = input
                .backends
                .iter()
                .map(|b| b.takes_new_traffic().then_some(b.weight))
                .collect();
            let (path, listen_port) = match &input.key {
                RouteKey::Http { path, .. } => (path.clone(), None),
                RouteKey::Tcp { listen_port } => (String::new(), Some(*listen_port)),
            };
            for backend in &input.backends {
                table
                    .states
                    .insert(backend.container_id.clone(), backend.state);
                if backend.via.is_none() {
                    table.local.insert(
                        (backend.container_id.clone(), backend.addr.port()),
                        backend.addr,
                    );
                }
            }
            let route = Arc::new(Route {
                internal: is_internal_domain(&input.domain),
                domain: input.domain,
                path,
                scheme: input.scheme,
                sticky: input.sticky,
                listen_port,
                schedule: Schedule::new(&weights, input.cursor),
                backends: input.backends,
                stats: input.stats,
            });
            match listen_port {
                Some(port) => {
                    table.tcp.insert(port, route);
                }
                None => table
                    .http
                    .entry(route.domain.clone())
                    .or_default()
                    .push(route),
            }
        }
        for routes in table.http.values_mut() {
            routes.sort_by_key(|r| Reverse(r.path.len()));
        }
        table
    }

    /// The route for a request's Host header value and target.
    pub fn lookup(&self, host: &[u8], target: &[u8]) -> Option<&Arc<Route>> {
        let host = normalize_host(host)?;
        let routes = self.http.get(host.as_ref())?;
        routes.iter().find(|r| path_matches(&r.path, target))
    }

    /// Whether the container is still in the table in a state that finishes what it has
    /// (`up`, `draining`, or taken out by an operator: drained, maintenance).
    pub fn still_routed(&self, id: &str) -> bool {
        self.states.get(id).is_some_and(|s| {
            matches!(
                s,
                BackendState::Up
                    | BackendState::Draining
                    | BackendState::Drained
                    | BackendState::Maintenance
            )
        })
    }

    /// Where this node's container `id` serves `port`, if that is one of its routed ports.
    pub fn local_backend(&self, id: &str, port: u16) -> Option<SocketAddr> {
        self.local.get(&(Arc::from(id), port)).copied()
    }

    pub fn tcp_route(&self, listen_port: u16) -> Option<&Arc<Route>> {
        self.tcp.get(&listen_port)
    }

    pub fn tcp_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.tcp.keys().copied()
    }

    /// Every route, sorted by domain then path, for the admin API.
    pub fn routes(&self) -> Vec<&Arc<Route>> {
        let mut all: Vec<&Arc<Route>> = self
            .http
            .values()
            .flatten()
            .chain(self.tcp.values())
            .collect();
        all.sort_by(|a, b| {
            (&a.domain, &a.path, a.listen_port).cmp(&(&b.domain, &b.path, b.listen_port))
        });
        all
    }
}

/// Whether the domain is `local` or under it: its last label is `local`.
pub fn is_internal_domain(domain: &str) -> bool {
    domain.rsplit('.').next() == Some("local")
}

/// Host header value -> lower-case domain without port or trailing dot. Allocates only for
/// upper-case input. The port is split off by the request parser's own rule
/// (`http::split_host_port`), so that a Host the parser refuses (`name:99999`, `name:`) is never
/// routed either.
fn normalize_host(host: &[u8]) -> Option<Cow<'_, str>> {
    let (host, _port) = crate::http::split_host_port(host.trim_ascii()).ok()?;
    let without_port = std::str::from_utf8(host).ok()?;
    let domain = without_port.strip_suffix('.').unwrap_or(without_port);
    if domain.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(domain.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(domain))
    }
}

/// Whether a request target falls under a context path: `/api` takes `/api`, `/api/x` and
/// `/api?q`, not `/apix`.
fn path_matches(context: &str, target: &[u8]) -> bool {
    if context == "/" {
        return true;
    }
    let Some(rest) = target.strip_prefix(context.as_bytes()) else {
        return false;
    };
    matches!(rest.first(), None | Some(b'/' | b'?'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(id: &str, state: BackendState, weight: u32) -> Backend {
        Backend {
            container_id: id.into(),
            container_name: id.into(),
            addr: "198.18.0.2:80".parse().unwrap(),
            weight,
            state,
            stats: Arc::default(),
            via: None,
        }
    }

    fn http(domain: &str, path: &str, backends: Vec<Backend>) -> RouteInput {
        RouteInput {
            key: RouteKey::Http {
                domain: domain.into(),
                path: path.into(),
            },
            domain: domain.into(),
            scheme: Scheme::Http,
            sticky: true,
            backends,
            cursor: Arc::default(),
            stats: Arc::default(),
        }
    }

    fn table() -> RoutingTable {
        RoutingTable::build(vec![
            http(
                "web.local",
                "/",
                vec![backend("root", BackendState::Up, 100)],
            ),
            http(
                "web.local",
                "/api",
                vec![backend("api", BackendState::Up, 100)],
            ),
            http(
                "web.local",
                "/api/v2",
                vec![backend("v2", BackendState::Up, 100)],
            ),
            http(
                "example.com",
                "/",
                vec![backend("pub", BackendState::Up, 100)],
            ),
        ])
    }

    #[test]
    fn lookup_by_host_and_longest_path() {
        let t = table();
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("web.local", "/", Some("root")),
            ("WEB.Local", "/", Some("root")),
            ("web.local:8080", "/x", Some("root")),
            ("web.local.", "/", Some("root")),
            ("web.local", "/api", Some("api")),
            ("web.local", "/api/", Some("api")),
            ("web.local", "/api?x=1", Some("api")),
            ("web.local", "/apix", Some("root")),
            ("web.local", "/api/v2/users", Some("v2")),
            ("web.local", "/api/v20", Some("api")),
            ("example.com", "/a", Some("pub")),
            ("other.local", "/", None),
            ("web.local:x", "/", None),
            ("web.local:65535", "/", Some("root")),
            ("web.local:99999", "/", None),
            ("web.local:", "/", None),
            ("web.local:80:80", "/", None),
            ("", "/", None),
        ];
        for (host, target, expected) in cases {
            let got = t
                .lookup(host.as_bytes(), target.as_bytes())
                .map(|r| r.backends[0].container_id.to_string());
            assert_eq!(got.as_deref(), *expected, "{host} {target}");
        }
    }

    #[test]
    fn internal_domains() {
        let t = table();
        assert!(t.lookup(b"web.local", b"/").unwrap().internal);
        assert!(!t.lookup(b"example.com", b"/").unwrap().internal);
    }

    #[test]
    fn selection_and_stickiness() {
        let t = RoutingTable::build(vec![http(
            "s.local",
            "/",
            vec![
                backend("a", BackendState::Up, 100),
                backend("b", BackendState::Up, 100),
                backend("c", BackendState::Draining, 100),
                backend("d", BackendState::Down, 100),
                backend("e", BackendState::Starting, 100),
                backend("w0", BackendState::Up, 0),
            ],
        )]);
        let route = t.lookup(b"s.local", b"/").unwrap();
        let picks: Vec<usize> = (0..4)
            .map(|_| route.select(None, &[]).unwrap().index)
            .collect();
        assert_eq!(
            picks,
            [0, 1, 0, 1],
            "only up backends with weight take new traffic"
        );
        let cases: &[(&[u8], Option<usize>)] = &[
            (b"b", Some(1)),
            (b"c", Some(2)),  // draining keeps its sessions
            (b"w0", Some(5)), // weight 0 keeps its sessions
            (b"d", None),     // down: re-picked
            (b"e", None),     // starting: re-picked
            (b"zz", None),    // unknown: re-picked
        ];
        for (cookie, expected) in cases {
            let selection = route.select(Some(cookie), &[]).unwrap();
            match expected {
                Some(index) => assert_eq!(
                    selection,
                    Selection {
                        index: *index,
                        by_cookie: true
                    }
                ),
                None => assert!(!selection.by_cookie && selection.index < 2),
            }
        }
        // A retry excludes the failed sticky target.
        assert!(!route.select(Some(b"b"), &[1]).unwrap().by_cookie);
        assert!(route.select(None, &[0, 1]).is_none());
    }

    #[test]
    fn no_ready_backend() {
        let t = RoutingTable::build(vec![http(
            "s.local",
            "/",
            vec![
                backend("a", BackendState::Starting, 100),
                backend("b", BackendState::Down, 100),
            ],
        )]);
        let route = t.lookup(b"s.local", b"/").unwrap();
        assert!(route.select(None, &[]).is_none());
    }

    #[test]
    fn states_and_local_backends_by_container() {
        let mut remote = backend("r", BackendState::Up, 100);
        remote.via = Some("198.19.100.2:9191".parse().unwrap());
        let t = RoutingTable::build(vec![http(
            "s.local",
            "/",
            vec![
                backend("a", BackendState::Up, 100),
                backend("d", BackendState::Draining, 100),
                backend("x", BackendState::Down, 100),
                remote,
            ],
        )]);
        assert!(t.still_routed("a"));
        assert!(
            t.still_routed("d"),
            "a draining backend finishes what it has"
        );
        assert!(t.still_routed("r"));
        assert!(!t.still_routed("x"));
        assert!(!t.still_routed("gone"));
        assert_eq!(
            t.local_backend("a", 80),
            Some("198.18.0.2:80".parse().unwrap())
        );
        assert_eq!(t.local_backend("a", 81), None, "only routed ports");
        assert_eq!(t.local_backend("r", 80), None, "another node's container");
    }

    #[test]
    fn internal_domain_suffix() {
        for domain in ["local", "web.local", "a.b.local", ".local"] {
            assert!(is_internal_domain(domain), "{domain}");
        }
        for domain in ["localhost", "web.locals", "notlocal", "local.com", ""] {
            assert!(!is_internal_domain(domain), "{domain}");
        }
    }
}
