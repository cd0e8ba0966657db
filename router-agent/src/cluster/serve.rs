//! The cluster port: what this node's agent offers the other nodes' agents, and nobody else
//! (a connection from an address that is not a node of the cluster is refused).
//!
//! - `GET /cluster/v1/watch`: this node's containers as a stream of JSON lines: a snapshot,
//!   then every change, with a heartbeat in between (`wire::StreamItem`).
//! - `GET /cluster/v1/nodes`: the cluster's nodes, as this agent knows them (agents on
//!   managers read them from Swarm; workers cannot, and ask here).
//! - `CONNECT <container id>:<port>`: a byte stream to one of this node's routed containers.
use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::broadcast::error::RecvError,
};
use tracing::{debug, info};

use super::{
    Cluster,
    wire::{NodeInfo, StreamItem},
};
use crate::{
    metrics::Metrics,
    proxy::{Phase, ProxyContext, tunnel_idle_for},
    registry::{LocalChange, LocalFeed, Message},
};

/// How often a watch stream says it is alive when nothing changes.
pub const HEARTBEAT_PERIOD: Duration = Duration::from_millis(300);
/// Largest request head accepted on the cluster port.
const MAX_HEAD: usize = 8192;
/// How long a relayed connection may stay quiet once the agent drains before it is closed
/// (other agents keep idle relayed connections in their pools).
const DRAIN_IDLE: Duration = Duration::from_millis(500);

pub async fn serve(listener: TcpListener, ctx: Arc<ProxyContext>, cluster: Arc<Cluster>) {
    info!("cluster port on {:?}", listener.local_addr().ok());
    let mut phase = ctx.phase.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = phase.wait_for(|p| *p == Phase::Draining) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!("cluster port accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (ctx, cluster) = (ctx.clone(), cluster.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(stream, peer, &ctx, &cluster).await {
                debug!(%peer, "cluster connection: {e}");
            }
        });
    }
    info!("cluster port closed");
}

async fn handle(
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: &ProxyContext,
    cluster: &Cluster,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    if !cluster.admits(peer.ip()) {
        info!(%peer, "cluster port: refused a connection from outside the cluster's nodes");
        return answer(&mut stream, 403, "not a node of this cluster").await;
    }
    let mut buf = BytesMut::with_capacity(1024);
    let (method, target, head_len) = loop {
        if let Some(head) = parse_request(&buf)? {
            break head;
        }
        if buf.len() >= MAX_HEAD {
            return answer(&mut stream, 431, "head too large").await;
        }
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_buf(&mut buf)).await;
        if read.map_err(|_| io::ErrorKind::TimedOut)?? == 0 {
            return Ok(());
        }
    };
    let rest = buf.split_off(head_len);
    match (method.as_str(), target.as_str()) {
        ("CONNECT", target) => relay(stream, target, rest, ctx, cluster).await,
        ("GET", "/cluster/v1/watch") => watch(stream, ctx, cluster).await,
        ("GET", "/cluster/v1/nodes") => {
            let body = serde_json::to_string(&*cluster.members.borrow()).unwrap_or_default();
            respond(&mut stream, 200, "application/json", &body).await
        }
        _ => answer(&mut stream, 404, "unknown cluster request").await,
    }
}

/// `(method, target, head length)` of a complete request head.
fn parse_request(buf: &[u8]) -> io::Result<Option<(String, String, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some((
            request.method.unwrap_or_default().to_owned(),
            request.path.unwrap_or_default().to_owned(),
            len,
        ))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
    }
}

/// `CONNECT <id>:<port>`: to one of this node's routed containers, never anywhere else (the
/// port is no open proxy).
async fn relay(
    mut client: TcpStream,
    target: &str,
    early: BytesMut,
    ctx: &ProxyContext,
    cluster: &Cluster,
) -> io::Result<()> {
    let Some((id, port)) = target
        .rsplit_once(':')
        .and_then(|(id, port)| Some((id, port.parse::<u16>().ok()?)))
    else {
        return answer(&mut client, 400, "CONNECT <container id>:<port>").await;
    };
    let Some(addr) = ctx.published.table.load().local_backend(id, port) else {
        return answer(&mut client, 404, "no such routed container on this node").await;
    };
    let mut backend =
        match tokio::time::timeout(ctx.settings.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(backend)) => backend,
            Ok(Err(e)) => {
                // The same passive check as for this node's own clients.
                let _ = ctx.registry.send(Message::ConnectFailed {
                    id: id.into(),
                    addr,
                    error: e.to_string(),
                });
                return answer(&mut client, 502, &format!("connect to {addr}: {e}")).await;
            }
            Err(_) => return answer(&mut client, 504, "connect timeout").await,
        };
    let _ = backend.set_nodelay(true);
    crate::proxy::set_keepalive(&backend, ctx.settings.tcp_keepalive);
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    if !early.is_empty() {
        backend.write_all(&early).await?;
    }
    Metrics::add(&cluster.relayed, 1);
    let mut phase = ctx.phase.clone();
    let (client_fd, backend_fd) = {
        use std::os::fd::AsRawFd as _;
        (client.as_raw_fd(), backend.as_raw_fd())
    };
    tokio::select! {
        () = crate::proxy::run_tunnel(&mut client, &mut backend, ctx) => {}
        () = async {
            let _ = phase.wait_for(|p| *p == Phase::Draining).await;
            tunnel_idle_for(client_fd, backend_fd, DRAIN_IDLE).await;
        } => debug!("relayed connection closed while draining"),
    }
    Ok(())
}

/// This node's containers as a stream of JSON lines, until the peer leaves or the agent drains.
async fn watch(mut stream: TcpStream, ctx: &ProxyContext, cluster: &Cluster) -> io::Result<()> {
    let (reply, feed) = tokio::sync::oneshot::channel();
    if cluster
        .registry
        .send(Message::SubscribeLocal(reply))
        .is_err()
    {
        return Ok(());
    }
    let Ok(LocalFeed {
        containers,
        mut cidrs,
        mut changes,
    }) = feed.await
    else {
        return Ok(());
    };
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n",
        )
        .await?;
    let node = |cidrs: &[crate::cidr::Cidr]| NodeInfo {
        node_id: cluster.node_id.clone(),
        addr: cluster.addr,
        cidrs: cidrs.to_vec(),
    };
    let snapshot = StreamItem::Snapshot {
        node: node(&cidrs),
        containers,
    };
    stream.write_all(snapshot.to_line().as_bytes()).await?;
    let mut heartbeat = tokio::time::interval(HEARTBEAT_PERIOD);
    let mut phase = ctx.phase.clone();
    loop {
        let item = tokio::select! {
            change = changes.recv() => match change {
                Ok(LocalChange::Upsert(container)) => StreamItem::Upsert { container },
                Ok(LocalChange::Remove(id)) => StreamItem::Remove { id },
                Ok(LocalChange::Cidrs(new)) => {
                    cidrs = new;
                    StreamItem::Node { node: node(&cidrs) }
                }
                // Behind by more than the feed keeps: the follower starts over with a snapshot.
                Err(RecvError::Lagged(_) | RecvError::Closed) => return Ok(()),
            },
            _ = heartbeat.tick() => StreamItem::Heartbeat,
            _ = phase.wait_for(|p| *p == Phase::Draining) => return Ok(()),
        };
        stream.write_all(item.to_line().as_bytes()).await?;
    }
}

async fn answer(stream: &mut TcpStream, status: u16, why: &str) -> io::Result<()> {
    respond(stream, status, "text/plain", &format!("{why}\n")).await
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        crate::http::status_reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
