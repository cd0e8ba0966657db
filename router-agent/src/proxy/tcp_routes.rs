//! `tcp://` routes: a route such as `tcp://redis.local:16379` on a container's port 6379 makes
//! the router listen on port 16379 (on the addresses of `--listen`) and tunnel every connection
//! to one of the route's backends. Listeners open and close as such routes appear and vanish.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::{net::TcpStream, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{
    Admitted, Phase, ProxyContext, accept, bind,
    record::{Answer, RequestRecord},
    tunnel,
    upstream::{self, Reuse, Tried},
};
use crate::access_log::Kind;

/// Keeps one listener per tcp route port and address, following the routing table.
pub async fn serve_tcp_routes(ctx: Arc<ProxyContext>, addresses: Vec<IpAddr>) {
    let mut listeners: HashMap<u16, Vec<JoinHandle<()>>> = HashMap::new();
    let mut versions = ctx.published.table_version.subscribe();
    let mut phase = ctx.phase.clone();
    loop {
        let wanted: HashSet<u16> = ctx.published.table.load().tcp_ports().collect();
        listeners.retain(|port, tasks| {
            let keep = wanted.contains(port);
            if !keep {
                tasks.iter().for_each(JoinHandle::abort);
                info!("tcp route port {port}: no backend route left, listener closed");
            }
            keep
        });
        for port in wanted {
            if listeners.contains_key(&port) {
                continue;
            }
            let tasks: Vec<_> = addresses
                .iter()
                .filter_map(|ip| match bind(SocketAddr::new(*ip, port)) {
                    Ok(listener) => Some(tokio::spawn(accept_loop(listener, port, ctx.clone()))),
                    Err(e) => {
                        warn!("tcp route port {port}: {e:#}");
                        None
                    }
                })
                .collect();
            if !tasks.is_empty() {
                info!("tcp route port {port}: listening");
            }
            // Kept even when empty: binding again on every table change would repeat the
            // warning; the port is retried when its route goes away and comes back.
            listeners.insert(port, tasks);
        }
        tokio::select! {
            changed = versions.changed() => if changed.is_err() { break },
            _ = phase.wait_for(|p| *p == Phase::Draining) => break,
        }
    }
    listeners.values().flatten().for_each(JoinHandle::abort);
}

async fn accept_loop(listener: tokio::net::TcpListener, port: u16, ctx: Arc<ProxyContext>) {
    while let Some((stream, peer, admitted)) = accept(&listener, &ctx).await {
        tokio::spawn(handle(stream, peer, port, ctx.clone(), admitted));
    }
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    port: u16,
    ctx: Arc<ProxyContext>,
    _admitted: Admitted,
) {
    let _open = ctx.metrics.open_connection();
    let table = ctx.published.table.load_full();
    let Some(route) = table.tcp_route(port) else {
        return;
    };
    // One access-log line per connection, when it ends (no status: the route carries bytes).
    let mut record = RequestRecord::new(tokio::time::Instant::now());
    record.kind = Kind::Tcp;
    if route.internal && !ctx.published.is_internal(peer.ip()) {
        info!(%peer, domain = %route.domain, "internal tcp route asked from outside the internal networks: closed");
        record.answer = Answer::Router("internal_domain");
        record.finish(&ctx, peer, Some(route), &[]);
        return;
    }
    match upstream::connect_next(route, None, &mut Tried::default(), &ctx, Reuse::Fresh).await {
        Ok((selection, mut upstream)) => {
            record.connected = Some(tokio::time::Instant::now());
            record.backend = Some(selection.index);
            record.answer = Answer::Backend;
            let before = tunnel::ClientBytes::read(&client);
            // Bytes the backend sent first (through another node's agent they may come with
            // its answer) go before the tunnel starts.
            if !upstream.buf.is_empty() {
                use tokio::io::AsyncWriteExt as _;
                if client.write_all(&upstream.buf).await.is_ok() {
                    upstream.buf.clear();
                }
            }
            if upstream.buf.is_empty() {
                tunnel::run(
                    &mut client,
                    &mut upstream.stream,
                    ctx.tunnel_path(tunnel::TunnelKind::TcpRoute, false),
                    &ctx,
                )
                .await;
            }
            let moved = before.moved_since(&client);
            record.bytes_in = moved.from_client;
            record.bytes_out = moved.to_client;
        }
        Err(why) => {
            debug!(%peer, port, "tcp route: no backend ({why:?}); closed");
            record.answer = Answer::Router("no_backend");
        }
    }
    record.finish(&ctx, peer, Some(route), &[]);
}
