//! Following one other node: its agent's watch stream, turned into registry messages. A stream
//! that stays silent past [`SILENCE_LIMIT`] (the node died, its network was cut) is given up,
//! and if no new stream brings a snapshot within [`LOSS_GRACE`], the node's containers leave
//! the table: a dead node is out of every other agent's table within about 2 s. An agent that
//! restarts on that node is back within the grace, so routing elsewhere does not notice.
use std::{io, net::SocketAddr, sync::atomic::Ordering, time::Duration};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
    time::Instant,
};
use tracing::{debug, info};

use super::{Cluster, wire::StreamItem};
use crate::registry::{Message, PeerEvent};

/// A stream with no line (not even a heartbeat, sent every 300 ms) for this long is dead.
const SILENCE_LIMIT: Duration = Duration::from_secs(1);
/// How long a node may be without a stream before its containers are dropped.
const LOSS_GRACE: Duration = Duration::from_secs(1);
/// Pause between reconnection attempts.
const RETRY: Duration = Duration::from_millis(200);
/// Connecting to a node's agent.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Follows the node `node_id` whose agent listens at `via`, until the task is aborted (the
/// node left the cluster).
pub async fn follow(node_id: String, via: SocketAddr, cluster: std::sync::Arc<Cluster>) {
    // Lost from the start: a node that never answers is never in the table.
    let mut without_stream_since: Option<Instant> = Some(Instant::now());
    let mut reported_lost = true;
    loop {
        let session = stream_once(&node_id, via, &cluster, &mut without_stream_since).await;
        if without_stream_since.is_none() {
            without_stream_since = Some(Instant::now());
            reported_lost = false;
        }
        match session {
            Ok(()) => debug!(node = %node_id, %via, "watch stream ended"),
            Err(e) => debug!(node = %node_id, %via, "watch stream: {e}"),
        }
        let silent_for = without_stream_since.map_or(Duration::ZERO, |t| t.elapsed());
        if !reported_lost && silent_for >= LOSS_GRACE {
            reported_lost = true;
            cluster.synced.send_modify(|s| {
                s.remove(&node_id);
            });
            let _ = cluster.registry.send(Message::Peer(PeerEvent::Lost {
                node_id: node_id.clone(),
                why: format!("no stream from its agent at {via} for {silent_for:?}"),
            }));
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// One stream: connect, read lines until it fails or goes silent. Clears
/// `without_stream_since` once a snapshot arrived.
async fn stream_once(
    node_id: &str,
    via: SocketAddr,
    cluster: &Cluster,
    without_stream_since: &mut Option<Instant>,
) -> io::Result<()> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(via))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    stream
        .write_all(b"GET /cluster/v1/watch HTTP/1.1\r\nHost: cluster\r\n\r\n")
        .await?;
    let mut lines = BufReader::new(stream).lines();
    // The answer head, up to its blank line.
    loop {
        let line = next_line(&mut lines).await?;
        if line.starts_with("HTTP/") && !line.starts_with("HTTP/1.1 200") {
            return Err(io::Error::other(format!("the agent answered {line}")));
        }
        if line.is_empty() {
            break;
        }
    }
    loop {
        let line = next_line(&mut lines).await?;
        let item: StreamItem = serde_json::from_str(&line)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let snapshot = matches!(item, StreamItem::Snapshot { .. });
        cluster.items_received.fetch_add(1, Ordering::Relaxed);
        if item != StreamItem::Heartbeat {
            cluster.changes_received.fetch_add(1, Ordering::Relaxed);
        }
        let event = PeerEvent::Stream {
            node_id: node_id.to_owned(),
            via,
            item,
        };
        if cluster.registry.send(Message::Peer(event)).is_err() {
            return Ok(());
        }
        if snapshot {
            if without_stream_since.take().is_some() {
                info!(node = %node_id, %via, "following the node's agent");
            }
            // Marked after the registry has the snapshot in its queue: whoever waits for the
            // sync then finds the nodes' containers in the next table.
            cluster
                .synced
                .send_if_modified(|s| s.insert(node_id.to_owned()));
        }
    }
}

async fn next_line(lines: &mut tokio::io::Lines<BufReader<TcpStream>>) -> io::Result<String> {
    match tokio::time::timeout(SILENCE_LIMIT, lines.next_line()).await {
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("silent for {SILENCE_LIMIT:?}"),
        )),
        Ok(Ok(Some(line))) => Ok(line.trim_end_matches('\r').to_owned()),
        Ok(Ok(None)) => Err(io::ErrorKind::UnexpectedEof.into()),
        Ok(Err(e)) => Err(e),
    }
}
