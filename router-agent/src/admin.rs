//! The admin API: `/api/routes`, `/api/containers`, `/healthz`, `/metrics` (JSON and
//! Prometheus text, one request per connection); the operators' writes and `why` (`control`),
//! the token they need (`auth`), and the dashboard at `/`.
pub mod auth;
mod control;

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use serde::Serialize;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info};

use crate::{
    config::DatapathMode,
    health::BackendState,
    labels::Scheme,
    metrics::DatapathCounters,
    proxy::{Phase, Pool, ProxyContext, TunnelKind},
    registry::Published,
    socket_lb::{self, SocketLb},
    table::Route,
    tls::CertStore,
};

/// The admin API reads what the data path shares.
pub struct AdminState {
    pub proxy: Arc<ProxyContext>,
    /// Socket-level balancing, when it loaded.
    pub socket_lb: Option<Arc<SocketLb>>,
    /// The certificates of `--listen-tls`, when the agent terminates TLS.
    pub tls: Option<Arc<CertStore>>,
    pub token: auth::AdminToken,
    /// Whether the admin API listens on loopback only (reads then need no token).
    pub loopback_only: bool,
    /// The Docker engine, for `why` about containers the registry does not know.
    pub docker: crate::discovery::DockerHandle,
}

/// The dashboard: one self-contained page that polls the JSON API.
const DASHBOARD_HTML: &str = include_str!("admin/dashboard.html");

/// Largest request body the admin API reads (a weight, a flag).
const MAX_BODY: usize = 4096;

/// One parsed admin request.
struct AdminRequest {
    method: String,
    path: String,
    query: String,
    authorization: Option<Vec<u8>>,
    body: Vec<u8>,
}

/// What the admin API answers.
pub(crate) struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Reply {
    fn json(status: u16, body: String) -> Self {
        Self {
            status,
            content_type: "application/json",
            body,
        }
    }

    fn error(status: u16, message: &str) -> Self {
        Self::json(status, json!({ "error": message }).to_string())
    }
}

impl AdminState {
    fn published(&self) -> &Published {
        &self.proxy.published
    }
}

/// Serves until the agent drains (a successor then answers on the same address).
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    info!("admin API on {:?}", listener.local_addr().ok());
    let mut phase = state.proxy.phase.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = phase.wait_for(|p| *p == Phase::Draining) => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &state).await {
                debug!("admin connection: {e}");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let reply = match read_request(&mut stream).await? {
        None => return Ok(()),
        Some(Err(message)) => Reply::error(400, message),
        Some(Ok(request)) => {
            let write = request.method != "GET";
            match state
                .token
                .check(state.loopback_only, write, request.authorization.as_deref())
            {
                Ok(()) => dispatch(&request, state).await,
                Err(message) => Reply::error(401, &message),
            }
        }
    };
    let extra = if reply.status == 401 {
        "WWW-Authenticate: Bearer realm=\"router-agent\"\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{extra}Connection: close\r\n\r\n",
        reply.status,
        reason(reply.status),
        reply.content_type,
        reply.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(reply.body.as_bytes()).await?;
    stream.shutdown().await
}

fn reason(status: u16) -> &'static str {
    match status {
        401 => "Unauthorized",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        status => crate::http::status_reason(status),
    }
}

/// Reads one request (head and a small body). `None`: the client left without one.
async fn read_request(
    stream: &mut TcpStream,
) -> std::io::Result<Option<Result<AdminRequest, &'static str>>> {
    let mut buf = vec![0u8; 8192 + MAX_BODY];
    let mut len = 0;
    loop {
        let n =
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[len..])).await??;
        if n == 0 {
            return Ok(None);
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(head_len)) => {
                let header = |name: &str| {
                    request
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| h.value)
                };
                let body_len = match header("content-length").map(|v| {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|v| v.trim().parse::<usize>().ok())
                }) {
                    None => 0,
                    Some(Some(n)) if n <= MAX_BODY => n,
                    Some(Some(_)) => return Ok(Some(Err("body too large for the admin API"))),
                    Some(None) => return Ok(Some(Err("invalid Content-Length"))),
                };
                if header("transfer-encoding").is_some() {
                    return Ok(Some(Err("send the body with Content-Length")));
                }
                if len < head_len + body_len {
                    continue;
                }
                let (path, query) = request
                    .path
                    .unwrap_or_default()
                    .split_once('?')
                    .unwrap_or((request.path.unwrap_or_default(), ""));
                return Ok(Some(Ok(AdminRequest {
                    method: request.method.unwrap_or_default().to_owned(),
                    path: path.to_owned(),
                    query: query.to_owned(),
                    authorization: header("authorization").map(<[u8]>::to_vec),
                    body: buf[head_len..head_len + body_len].to_vec(),
                })));
            }
            Ok(httparse::Status::Partial) if len < buf.len() => {}
            _ => return Ok(Some(Err("malformed request"))),
        }
    }
}

async fn dispatch(request: &AdminRequest, state: &AdminState) -> Reply {
    let path = request.path.as_str();
    if path.starts_with("/api/containers/") || path.starts_with("/api/overrides") {
        return control::handle(request, state).await;
    }
    if request.method != "GET" {
        return Reply::error(
            405,
            "only GET here; changes go to /api/containers/<name>/drain|undrain|weight|maintenance \
             and /api/overrides",
        );
    }
    match path {
        "/" | "/dashboard" => Reply {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: DASHBOARD_HTML.to_owned(),
        },
        "/api/routes" => Reply::json(200, routes_json(state)),
        "/api/events" => {
            let since = query_param(&request.query, "since")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            Reply::json(
                200,
                json!({ "events": state.published().events.since(since) }).to_string(),
            )
        }
        "/api/containers" => match containers_json(state).await {
            Some(json) => Reply::json(200, json),
            None => Reply::error(503, "the registry did not answer; the agent is stopping"),
        },
        "/healthz" => {
            let (status, content_type, body) = healthz(state);
            Reply {
                status,
                content_type,
                body,
            }
        }
        "/api/cluster" => Reply::json(200, cluster_json(state)),
        "/metrics" => Reply {
            status: 200,
            content_type: crate::exposition::CONTENT_TYPE,
            body: crate::exposition::render(&state.proxy, state.socket_lb.as_ref()),
        },
        _ => Reply::error(
            404,
            "not found; try /, /api/routes, /api/containers, /api/containers/<name>/why, \
             /api/overrides, /api/events, /api/cluster, /healthz, /metrics",
        ),
    }
}

/// The value of `name` in a query string (no percent-decoding: the values here are plain).
fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|pair| match pair.split_once('=') {
            Some((k, v)) if k == name => Some(v),
            None if pair == name => Some(""),
            _ => None,
        })
}

#[derive(Serialize)]
struct RouteJson<'a> {
    domain: &'a str,
    path: &'a str,
    scheme: Scheme,
    #[serde(skip_serializing_if = "Option::is_none")]
    listen_port: Option<u16>,
    internal: bool,
    sticky: bool,
    /// Who ends the clients' TLS: `agent` (a certificate for the domain is loaded; served on
    /// `--listen-tls` too), `external` (an https/wss route without one: a terminator in front
    /// sends plain HTTP). Absent for http/ws routes the agent has no certificate for.
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<&'static str>,
    /// tcp routes: whether the kernel balances their connects (socket-level balancing).
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel: Option<socket_lb::RouteStatus>,
    backends: Vec<BackendJson<'a>>,
}

#[derive(Serialize)]
struct BackendJson<'a> {
    container_id: &'a str,
    container_name: &'a str,
    address: String,
    weight: u32,
    state: BackendState,
    active_connections: u64,
    /// What an operator set on this (local) container, if anything; `weight` and `state`
    /// above already include it.
    #[serde(rename = "override", skip_serializing_if = "Option::is_none")]
    operator_override: Option<crate::registry::overrides::Override>,
    /// Kept-alive connections waiting in the pool for the next request.
    idle_connections: usize,
    requests: u64,
}

#[derive(Serialize)]
struct DatapathJson {
    mode: DatapathMode,
    kernel_offload: bool,
    /// Sockets in the kernel's sockhash now (two per offloaded tunnel).
    offloaded_sockets: Option<usize>,
    /// How `tcp://` route tunnels move their bytes in this mode.
    tunnels: &'static str,
    /// How WebSocket tunnels (after `101`) move their bytes in this mode.
    websocket_tunnels: &'static str,
    /// Smallest body run that is spliced (`null`: bodies are always copied in this mode).
    splice_threshold: Option<u64>,
    /// Capacity of each splice pipe, as granted by the kernel.
    pipe_size: usize,
    /// Socket-level balancing of tcp routes (`null`: off or unavailable).
    socket_lb: Option<socket_lb::Summary>,
    #[serde(flatten)]
    counters: DatapathCounters,
}

fn routes_json(state: &AdminState) -> String {
    let table = state.published().table.load();
    let routes: Vec<RouteJson<'_>> = table
        .routes()
        .into_iter()
        .map(|r| route_json(r, state))
        .collect();
    json!({
        "routes": routes,
        "datapath": DatapathJson {
            mode: state.proxy.datapath,
            kernel_offload: state.proxy.offload.is_some(),
            offloaded_sockets: state.proxy.offload.as_ref().map(|o| o.offloaded_sockets()),
            tunnels: state.proxy.tunnel_path(TunnelKind::TcpRoute, false).name(),
            websocket_tunnels: state.proxy.tunnel_path(TunnelKind::WebSocket, false).name(),
            splice_threshold: state.proxy.splice_threshold(),
            pipe_size: state.proxy.pipes.granted_size(),
            socket_lb: state.socket_lb.as_ref().map(|lb| lb.summary()),
            counters: state.proxy.metrics.datapath(),
        },
    })
    .to_string()
}

fn route_json<'a>(route: &'a Route, state: &AdminState) -> RouteJson<'a> {
    let pool: &Pool = &state.proxy.pool;
    let overrides = state.published().overrides.load();
    RouteJson {
        domain: &route.domain,
        path: if route.listen_port.is_some() {
            ""
        } else {
            &route.path
        },
        scheme: route.scheme,
        listen_port: route.listen_port,
        internal: route.internal,
        sticky: route.sticky,
        tls: match &state.tls {
            _ if route.listen_port.is_some() => None,
            Some(store) if store.terminates(&route.domain) => Some("agent"),
            _ if route.scheme.behind_tls() => Some("external"),
            _ => None,
        },
        kernel: route.listen_port.map(|port| match &state.socket_lb {
            Some(lb) => lb.route_status(port),
            None => socket_lb::RouteStatus {
                served: false,
                generation: None,
                connects: 0,
                refused: 0,
                reason: Some("socket-level balancing is off or unavailable (see the log)".into()),
            },
        }),
        backends: route
            .backends
            .iter()
            .map(|b| BackendJson {
                container_id: &b.container_id,
                container_name: &b.container_name,
                address: b.addr.to_string(),
                weight: b.weight,
                state: b.state,
                active_connections: b.stats.active_connections.load(Ordering::Relaxed),
                // Overrides are set on the container's own node; others get their effect.
                operator_override: b
                    .via
                    .is_none()
                    .then(|| overrides.get(&*b.container_name).cloned())
                    .flatten(),
                idle_connections: pool.idle_for(b),
                requests: b.stats.requests.load(Ordering::Relaxed),
            })
            .collect(),
    }
}

async fn containers_json(state: &AdminState) -> Option<String> {
    let (reply, views) = tokio::sync::oneshot::channel();
    state
        .proxy
        .registry
        .send(crate::registry::Message::ViewContainers(reply))
        .ok()?;
    let containers = tokio::time::timeout(Duration::from_secs(5), views)
        .await
        .ok()?
        .ok()?;
    Some(
        json!({
            "engine_connected": state.published().engine_connected.load(Ordering::Relaxed),
            "internal_cidrs": &**state.published().internal_cidrs.load(),
            "containers": containers,
        })
        .to_string(),
    )
}

/// This agent's place in the cluster (`{"mode":"single-host"}` outside a Swarm).
fn cluster_json(state: &AdminState) -> String {
    match state.proxy.cluster.get() {
        Some(cluster) => json!({"mode": "cluster", "cluster": &**cluster}).to_string(),
        None => json!({"mode": "single-host"}).to_string(),
    }
}

/// 200 while the agent serves normally; 503 while it is starting (before its first Docker
/// sync and until its listeners are bound), overloaded (connection limit reached or descriptors exhausted in the last seconds),
/// or stopping, so that whatever watches it can tell.
fn healthz(state: &AdminState) -> (u16, &'static str, String) {
    let ready = *state.published().ready.borrow();
    let phase = *state.proxy.phase.borrow();
    let overloaded = state.proxy.admission.overloaded();
    let status = match (ready, phase, overloaded) {
        (_, Phase::HandingOver | Phase::Draining, _) => "stopping",
        (false, _, _) | (_, Phase::Starting, _) => "starting",
        (true, Phase::Serving, Some(_)) => "overloaded",
        (true, Phase::Serving, None) => "ok",
    };
    let body = json!({
        "status": status,
        "overloaded": overloaded,
        "engine_connected": state.published().engine_connected.load(Ordering::Relaxed),
        "kernel_offload": state.proxy.offload.is_some(),
        "connections": state.proxy.metrics.connections_open(),
        "max_connections": state.proxy.admission.max_connections(),
        "capabilities": crate::privilege::kept_names(),
    })
    .to_string();
    let code = if status == "ok" { 200 } else { 503 };
    (code, "application/json", body)
}
