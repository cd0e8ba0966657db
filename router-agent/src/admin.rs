//! The admin API: `/api/routes`, `/api/containers`, `/healthz`, `/metrics` (JSON and
//! Prometheus text, one request per connection).
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
};

/// The admin API reads what the data path shares.
pub struct AdminState {
    pub proxy: Arc<ProxyContext>,
    /// Socket-level balancing, when it loaded.
    pub socket_lb: Option<Arc<SocketLb>>,
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
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let path = loop {
        let n =
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[len..])).await??;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                let method = request.method.unwrap_or_default();
                let path = request.path.unwrap_or_default();
                break (method == "GET")
                    .then(|| path.split('?').next().unwrap_or_default().to_owned());
            }
            Ok(httparse::Status::Partial) if len < buf.len() => {}
            _ => break None,
        }
    };
    let (status, content_type, body) = match path.as_deref() {
        Some("/api/routes") => (200, "application/json", routes_json(state)),
        Some("/api/containers") => match containers_json(state).await {
            Some(json) => (200, "application/json", json),
            None => (
                503,
                "application/json",
                json!({"error": "the registry did not answer; the agent is stopping"}).to_string(),
            ),
        },
        Some("/healthz") => healthz(state),
        Some("/api/cluster") => (200, "application/json", cluster_json(state)),
        Some("/metrics") => (
            200,
            crate::exposition::CONTENT_TYPE,
            crate::exposition::render(&state.proxy, state.socket_lb.as_ref()),
        ),
        Some(_) => (
            404,
            "application/json",
            json!({"error": "not found; try /api/routes, /api/containers, /api/cluster, /healthz, /metrics"})
                .to_string(),
        ),
        None => (
            400,
            "application/json",
            json!({"error": "send GET requests"}).to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        crate::http::status_reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
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
    })
    .to_string();
    let code = if status == "ok" { 200 } else { 503 };
    (code, "application/json", body)
}
