//! `/metrics`: every series of the agent, in the `OpenMetrics` text format of the
//! `prometheus-client` crate.
//!
//! The counters live where the data path updates them (plain atomics in `Metrics`, the routing
//! table's per-route and per-backend stats, the admission, pool and pipe state); one
//! [`Collector`] reads them at scrape time. Per-route and per-backend series are rendered from
//! the live routing table, so a removed container's or route's series disappear with it
//! instead of growing forever. docs/metrics.md lists every series (a test keeps it honest).
use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use crate::{
    access_log::short,
    config::DatapathMode,
    health::BackendState,
    metrics::Metrics,
    proxy::ProxyContext,
    socket_lb::SocketLb,
    table::{Route, RoutingTable},
};

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every series, as `OpenMetrics` text.
pub fn render(ctx: &Arc<ProxyContext>, socket_lb: Option<&Arc<SocketLb>>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(AgentCollector {
        ctx: ctx.clone(),
        table: ctx.published.table.load_full(),
        socket_lb: socket_lb.cloned(),
    }));
    let mut text = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

struct AgentCollector {
    ctx: Arc<ProxyContext>,
    table: Arc<RoutingTable>,
    socket_lb: Option<Arc<SocketLb>>,
}

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentCollector")
    }
}

/// A series without labels. `name` is without the `_total` a counter gets from the encoder.
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    value: u64,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => metric.encode_counter::<NoLabelSet, _, u64>(&value, None),
        _ => metric.encode_gauge(&value),
    }
}

/// A labelled family, one sample per row.
fn family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        let mut sample = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => sample.encode_counter::<NoLabelSet, _, u64>(&value, None)?,
            _ => sample.encode_gauge(&value)?,
        }
    }
    Ok(())
}

/// The `route` label: the domain, with the context path when it is not `/`.
fn route_label(route: &Route) -> String {
    if route.path.is_empty() || route.path == "/" {
        route.domain.clone()
    } else {
        format!("{}{}", route.domain, route.path)
    }
}

fn datapath_name(mode: DatapathMode) -> &'static str {
    match mode {
        DatapathMode::Auto => "auto",
        DatapathMode::Copy => "copy",
        DatapathMode::Splice => "splice",
        DatapathMode::Sockmap => "sockmap",
    }
}

fn state_name(state: BackendState) -> &'static str {
    match state {
        BackendState::Starting => "starting",
        BackendState::Up => "up",
        BackendState::Down => "down",
        BackendState::Draining => "draining",
        BackendState::Drained => "drained",
        BackendState::Maintenance => "maintenance",
    }
}

const STATES: [BackendState; 6] = [
    BackendState::Starting,
    BackendState::Up,
    BackendState::Down,
    BackendState::Draining,
    BackendState::Drained,
    BackendState::Maintenance,
];

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        let e = &mut encoder;
        let ctx = &self.ctx;
        let m: &Metrics = &ctx.metrics;
        let load = Metrics::load;

        family(
            e,
            "router_build_info",
            "The agent's version and data path mode (always 1).",
            Gauge,
            [(
                [
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("datapath", datapath_name(ctx.datapath)),
                ],
                1,
            )],
        )?;

        // Client connections and admission.
        single(
            e,
            "router_connections_accepted",
            "Client connections accepted.",
            Counter,
            load(&m.connections_accepted),
        )?;
        single(
            e,
            "router_connections_active",
            "Client connections open now.",
            Gauge,
            load(&m.connections_active),
        )?;
        single(
            e,
            "router_connections_max",
            "Client connections allowed at once (max_connections).",
            Gauge,
            ctx.admission.max_connections() as u64,
        )?;
        single(
            e,
            "router_connection_limit_reached",
            "Times a listener found the connection limit reached.",
            Counter,
            load(&ctx.admission.limit_reached),
        )?;
        single(
            e,
            "router_fd_exhausted",
            "Times the agent could not get a file descriptor.",
            Counter,
            load(&ctx.admission.fd_exhausted),
        )?;
        single(
            e,
            "router_connections_shed",
            "Idle client connections closed to make room at the connection limit.",
            Counter,
            load(&ctx.admission.shed_connections),
        )?;

        // Requests and responses.
        single(
            e,
            "router_requests",
            "Requests read from clients (heads parsed).",
            Counter,
            load(&m.requests),
        )?;
        single(
            e,
            "router_retries",
            "Requests sent to another backend after a failure.",
            Counter,
            load(&m.retries),
        )?;
        single(
            e,
            "router_stale_reconnects",
            "Requests sent again on a new connection because the backend had closed the pooled one.",
            Counter,
            load(&m.stale_reconnects),
        )?;
        single(
            e,
            "router_queue_timeouts",
            "Requests answered 503 after waiting for a backend at its connection limit.",
            Counter,
            load(&m.queue_timeouts),
        )?;
        family(
            e,
            "router_responses",
            "Responses sent to clients, by exact status code and by who wrote them (backend or router).",
            Counter,
            m.responses.nonzero().map(|(code, source, n)| {
                (
                    [
                        ("code", code.to_string()),
                        ("source", source.label().to_owned()),
                    ],
                    n,
                )
            }),
        )?;
        family(
            e,
            "router_requests_rejected",
            "Requests the router refused as malformed, by reason.",
            Counter,
            m.rejected_counts()
                .into_iter()
                .map(|(reason, n)| ([("reason", reason)], n)),
        )?;
        family(
            e,
            "router_exchange_errors",
            "Failed backend exchanges by kind, over every backend (removed ones included).",
            Counter,
            m.backend_errors
                .iter()
                .map(|(kind, n)| ([("kind", kind.label())], n)),
        )?;
        self.encode_routes(e)?;

        // Data path.
        single(
            e,
            "router_copied_bytes",
            "Bytes moved through userspace buffers.",
            Counter,
            load(&m.bytes_copied),
        )?;
        single(
            e,
            "router_spliced_bytes",
            "Body and tunnel bytes moved with splice(2).",
            Counter,
            load(&m.bytes_spliced),
        )?;
        single(
            e,
            "router_kernel_bytes",
            "Bytes redirected in the kernel between offloaded sockets.",
            Counter,
            load(&m.bytes_kernel),
        )?;
        single(
            e,
            "router_connections_offloaded",
            "Connections handed to the kernel sockhash.",
            Counter,
            load(&m.connections_offloaded),
        )?;
        single(
            e,
            "router_tunnels_demoted",
            "Kernel tunnel directions handed back to userspace because the peer did not keep up.",
            Counter,
            load(&m.tunnels_demoted),
        )?;
        single(
            e,
            "router_tunnel_overlaps_cut",
            "Retransmitted segments of kernel tunnels whose repeated head the verdict program cut off.",
            Counter,
            load(&m.tunnel_overlaps_cut),
        )?;
        single(
            e,
            "router_tunnel_overlap_cut_bytes",
            "Bytes cut off retransmitted segments of kernel tunnels (each would have been delivered twice).",
            Counter,
            load(&m.tunnel_overlap_bytes_cut),
        )?;
        single(
            e,
            "router_pool_idle_connections",
            "Kept-alive backend connections waiting in the pool.",
            Gauge,
            ctx.pool.idle_total() as u64,
        )?;
        single(
            e,
            "router_pipes_in_use",
            "Splice pipes lent to transfers now.",
            Gauge,
            ctx.pipes.in_use() as u64,
        )?;
        single(
            e,
            "router_pipes_exhausted",
            "Transfers copied because no splice pipe was free.",
            Counter,
            load(&ctx.pipes.exhausted),
        )?;

        // The agent's own work.
        single(
            e,
            "router_engine_requests",
            "Requests discovery made to the Docker engine.",
            Counter,
            load(&m.engine_requests),
        )?;
        single(
            e,
            "router_access_log_lines",
            "Access-log lines written.",
            Counter,
            load(&m.access_log_lines),
        )?;
        single(
            e,
            "router_access_log_dropped",
            "Access-log lines dropped because the writer could not keep up (or could not write).",
            Counter,
            load(&m.access_log_dropped),
        )?;

        // Socket-level balancing of tcp routes (no samples when it is off).
        let lb_counts = self
            .socket_lb
            .as_ref()
            .map(|lb| lb.route_counts(&self.table))
            .unwrap_or_default();
        let lb_rows = |pick: fn(&(String, u16, u64, u64)) -> u64| {
            lb_counts.iter().map(move |row| {
                (
                    [("route", row.0.clone()), ("port", row.1.to_string())],
                    pick(row),
                )
            })
        };
        family(
            e,
            "router_socket_lb_connects",
            "Connects of a tcp route sent straight to a backend by the kernel.",
            Counter,
            lb_rows(|r| r.2),
        )?;
        family(
            e,
            "router_socket_lb_refused",
            "Connects of a tcp route refused by the kernel (ECONNREFUSED: no up backend).",
            Counter,
            lb_rows(|r| r.3),
        )?;
        single(
            e,
            "router_socket_lb_routes",
            "tcp routes whose connects the kernel balances.",
            Gauge,
            self.socket_lb
                .as_ref()
                .map_or(0, |lb| lb.served_routes() as u64),
        )?;
        Ok(())
    }
}

impl AgentCollector {
    /// Per-route and per-backend series, from the live table.
    fn encode_routes(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        let routes: Vec<(String, &Arc<Route>)> = self
            .table
            .routes()
            .into_iter()
            .map(|r| (route_label(r), r))
            .collect();
        {
            let mut metric = e.encode_descriptor(
                "router_request_duration_seconds",
                "Time from the first byte of a request to the end of its response (tunnels: to their end), per route.",
                None,
                MetricType::Histogram,
            )?;
            for (label, route) in &routes {
                let s = route.stats.durations.snapshot();
                metric
                    .encode_family(&[("route", label.as_str())])?
                    .encode_histogram::<NoLabelSet>(s.sum_seconds, s.count, &s.buckets, None)?;
            }
        }
        // One row per (route, backend): a container serving two routes has two.
        let backends = || {
            routes.iter().flat_map(|(label, route)| {
                route.backends.iter().map(move |b| {
                    let labels = [
                        ("route", label.as_str()),
                        ("backend", &*b.container_name),
                        ("id", short(&b.container_id)),
                    ];
                    (labels, b)
                })
            })
        };
        family(
            e,
            "router_backend_requests",
            "Requests sent to a backend container.",
            Counter,
            backends().map(|(l, b)| (l, Metrics::load(&b.stats.requests))),
        )?;
        {
            let mut metric = e.encode_descriptor(
                "router_backend_errors",
                "Failed exchanges with a backend container, by kind (connect, reset, timeout, invalid_response, client_timeout).",
                None,
                Counter,
            )?;
            for (l, b) in backends() {
                for (kind, n) in b.stats.errors.iter() {
                    let labels = [l[0], l[1], l[2], ("kind", kind.label())];
                    metric
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }
        {
            let mut metric = e.encode_descriptor(
                "router_backend_state",
                "A backend container's health state: 1 for the state it is in, 0 for the others.",
                None,
                Gauge,
            )?;
            for (l, b) in backends() {
                for state in STATES {
                    let labels = [l[0], l[1], l[2], ("state", state_name(state))];
                    metric
                        .encode_family(&labels)?
                        .encode_gauge(&u64::from(b.state == state))?;
                }
            }
        }
        family(
            e,
            "router_backend_active_connections",
            "Connections to a backend container carrying a request or a tunnel now.",
            Gauge,
            backends().map(|(l, b)| (l, Metrics::load(&b.stats.active_connections))),
        )?;
        family(
            e,
            "router_backend_weight",
            "A backend container's weight (aliyun.routing.weight).",
            Gauge,
            backends().map(|(l, b)| (l, u64::from(b.weight))),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
