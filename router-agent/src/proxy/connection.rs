//! One client connection: read a request head, route it, exchange it with a backend, relay the
//! response; repeat while both sides keep the connection alive.
//!
//! Every request on a keep-alive connection is parsed, validated and routed on its own: a second
//! request with another Host goes to that host's backends.
use std::{
    io,
    net::SocketAddr,
    pin::pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::{Buf as _, BytesMut};
use tokio::{
    io::{AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::watch,
    time::Instant,
};
use tracing::{debug, info};

use super::{
    Admitted, Phase, ProxyContext,
    admission::ShedSignal,
    body::{self, BodyPath, RelayError},
    client::ClientStream,
    record::{Answer, RequestRecord},
    tunnel,
    upstream::{self, Reuse, Tried, Unavailable, Upstream},
};
use crate::{
    http::{
        BodyFraming, Reject, error_response,
        request::{self, ForwardContext, RequestHead},
        response::{self, ClientSide, ResponseHead},
    },
    metrics::{BackendError, Metrics},
    table::{Route, RoutingTable},
};

/// Bytes read from a client per read call while waiting for a head.
const HEAD_READ_CHUNK: usize = 8 * 1024;
/// How long to keep reading (and discarding) after refusing a request, so that the refusal is
/// not lost to a reset caused by unread bytes.
const LINGER: Duration = Duration::from_millis(500);

pub async fn handle(
    stream: ClientStream,
    peer: SocketAddr,
    ctx: Arc<ProxyContext>,
    _admitted: Admitted,
) {
    let metrics = ctx.metrics.clone();
    let _open = metrics.open_connection();
    let mut connection = Connection {
        accepted_at: Instant::now(),
        phase: ctx.phase.clone(),
        shed: ctx.admission.shed_signal(),
        client: stream,
        peer,
        peer_ip: peer.ip().to_string(),
        ctx,
        buf: BytesMut::with_capacity(HEAD_READ_CHUNK),
        request_head: Vec::with_capacity(1024),
        response_head: Vec::with_capacity(1024),
        spliced: false,
        record: RequestRecord::new(Instant::now()),
    };
    if let Err(e) = connection.run().await {
        debug!(%peer, "client connection ended: {e}");
    }
}

enum Next {
    KeepAlive,
    Close,
}

/// How one attempt at a backend ended.
enum Attempt {
    /// The response went to the client.
    Done { next: Next, keep_backend: bool },
    /// The backend closed or reset the connection before a complete response head, and
    /// nothing reached the client: the request may be sent again if it can be.
    Lost(String),
    /// The backend's node (reached through its agent) was given up while the request waited
    /// for its answer; nothing reached the client.
    NodeGone,
    /// Answer the client with this status (nothing was sent to it yet).
    Fail {
        status: u16,
        kind: BackendError,
        why: String,
    },
    /// The client went away, or it was told something already: just close.
    Abort,
}

struct Connection {
    client: ClientStream,
    peer: SocketAddr,
    /// `peer`'s address as text, for `X-Forwarded-For`.
    peer_ip: String,
    ctx: Arc<ProxyContext>,
    accepted_at: Instant,
    phase: watch::Receiver<Phase>,
    /// Closes the connection while it waits for a request, when the agent needs room.
    shed: ShedSignal,
    /// Bytes from the client not handled yet (a head, a body, the next pipelined request).
    buf: BytesMut,
    /// The head sent to the backend, rewritten from the client's.
    request_head: Vec<u8>,
    /// The head sent to the client, rewritten from the backend's.
    response_head: Vec<u8>,
    /// Whether splice(2) has touched this connection's socket (it must then never go into the
    /// sockhash: the two misbehave on one socket).
    spliced: bool,
    /// The request being served, for the access log and the metrics.
    record: RequestRecord,
}

impl Connection {
    async fn run(&mut self) -> io::Result<()> {
        // One reference each for the connection's life, so that requests do not touch shared
        // reference counts (cache lines the workers would pass back and forth). The table is
        // loaded again only when the registry published a new one.
        let ctx = Arc::clone(&self.ctx);
        let mut versions = ctx.published.table_version.subscribe();
        let mut table = ctx.published.table.load_full();
        let mut first = true;
        while let Some(head) = self.read_request_head(first).await? {
            first = false;
            if versions.has_changed().unwrap_or(false) {
                versions.borrow_and_update();
                table = ctx.published.table.load_full();
            }
            match self.exchange(&head, &ctx, &table).await? {
                Next::KeepAlive => {}
                Next::Close => {
                    self.close().await;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The next request head, or `None` when the connection should end (client closed, idle
    /// timeout, shutdown, shedding, or a refused head that was already answered). The first
    /// head of a connection must be complete within the header timeout of the accept (a
    /// connection that says nothing gets 408 then); later ones may be awaited for the idle
    /// timeout, then have the header timeout from their first byte.
    async fn read_request_head(&mut self, first: bool) -> io::Result<Option<RequestHead>> {
        let settings = &self.ctx.settings;
        let forward = ForwardContext {
            client_ip: &self.peer_ip,
            forwarded_headers: settings.forwarded_headers,
        };
        let waiting_since = Instant::now();
        // The request starts with its first byte (one may be buffered already, pipelined).
        let mut started = (!self.buf.is_empty()).then_some(waiting_since);
        let mut head_deadline = if first {
            Some(self.accepted_at + settings.header_timeout)
        } else {
            (!self.buf.is_empty()).then(|| waiting_since + settings.header_timeout)
        };
        loop {
            if !self.buf.is_empty() {
                match request::parse(
                    &self.buf,
                    &settings.limits,
                    &forward,
                    &mut self.request_head,
                ) {
                    Ok(Some(head)) => {
                        self.record.begin(started.unwrap_or(waiting_since));
                        self.record.has_request_line = true;
                        return Ok(Some(head));
                    }
                    Ok(None) => {}
                    Err(reject) => {
                        self.record.begin(started.unwrap_or(waiting_since));
                        self.refuse(reject).await;
                        return Ok(None);
                    }
                }
            }
            self.buf.reserve(HEAD_READ_CHUNK);
            let deadline = head_deadline.unwrap_or(waiting_since + settings.idle_timeout);
            let read = if self.buf.is_empty() {
                // Waiting for a request to begin: the connection may be closed to make room,
                // and kept-alive ones end when shutdown begins (a new connection's first
                // request is still served while the agent hands over).
                tokio::select! {
                    r = tokio::time::timeout_at(deadline, self.client.read_buf(&mut self.buf)) => r,
                    _ = self.phase.wait_for(|p| p.stopping()), if !first => return Ok(None),
                    () = self.shed.reaches(waiting_since) => {
                        Metrics::add(&self.ctx.admission.shed_connections, 1);
                        debug!(peer = %self.peer, "idle connection closed to make room");
                        return Ok(None);
                    }
                }
            } else {
                tokio::time::timeout_at(deadline, self.client.read_buf(&mut self.buf)).await
            };
            match read {
                Err(_) if head_deadline.is_some() => {
                    self.record.begin(started.unwrap_or(waiting_since));
                    self.refuse(Reject::HeadTimeout).await;
                    return Ok(None);
                }
                Err(_) | Ok(Ok(0)) => return Ok(None),
                Ok(Ok(_)) => {
                    let now = *started.get_or_insert_with(Instant::now);
                    head_deadline.get_or_insert_with(|| now + settings.header_timeout);
                }
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    async fn refuse(&mut self, reject: Reject) {
        self.ctx.metrics.rejected(reject.reason());
        debug!(peer = %self.peer, status = reject.status(), "refused request: {}", reject.reason());
        let reason = if matches!(reject, Reject::HeadTimeout) {
            "header_timeout"
        } else {
            "bad_request"
        };
        self.record.detail = Some(reject.reason());
        self.answer(reject.status(), reason).await;
        // The head was not parsed: no request line, no route.
        self.record.finish(&self.ctx, self.peer, None, &[]);
        self.close().await;
    }

    /// Writes one of the router's own responses; the connection closes after it.
    async fn answer(&mut self, status: u16, reason: &'static str) {
        let response = error_response(status, true);
        self.record.router_answered(status, reason, response.len());
        let _ = self.client.write_all(&response).await;
    }

    /// The router's answer when no backend took the request.
    async fn answer_unavailable(&mut self, why: Unavailable) {
        match why {
            Unavailable::NoBackend => self.answer(503, "no_backend").await,
            // Busy, not broken: tell the client when to come back.
            Unavailable::Saturated | Unavailable::Overloaded => {
                let reason = if matches!(why, Unavailable::Saturated) {
                    "backend_busy"
                } else {
                    "overloaded"
                };
                let response = crate::http::retry_later_response(RETRY_AFTER_SECONDS);
                self.record.router_answered(503, reason, response.len());
                let _ = self.client.write_all(&response).await;
            }
        }
    }

    /// Ends the connection politely: FIN, then read and discard what the client still sends
    /// for a moment, so our last response is not destroyed by a reset.
    async fn close(&mut self) {
        let _ = self.client.shutdown().await;
        let mut sink = [0u8; 4096];
        let deadline = Instant::now() + LINGER;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.client.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
    }

    /// Serves one request, then counts it and logs it.
    async fn exchange(
        &mut self,
        head: &RequestHead,
        ctx: &ProxyContext,
        table: &RoutingTable,
    ) -> io::Result<Next> {
        self.record.bytes_in = head.head_len as u64;
        let mut route = None;
        let next = self.route_and_exchange(head, ctx, table, &mut route).await;
        self.record
            .finish(ctx, self.peer, route.map(|r| &**r), &self.request_head);
        next
    }

    /// Routes the request and runs it against backends until one answers or none is left.
    /// (`ctx` is this connection's `self.ctx`, borrowed apart from `self`.) The matched route
    /// is left in `matched`.
    async fn route_and_exchange<'t>(
        &mut self,
        head: &RequestHead,
        ctx: &ProxyContext,
        table: &'t RoutingTable,
        matched: &mut Option<&'t std::sync::Arc<Route>>,
    ) -> io::Result<Next> {
        let metrics = &ctx.metrics;
        Metrics::add(&metrics.requests, 1);
        let Some(route) = table.lookup(&self.buf[head.host.clone()], &self.buf[head.path.clone()])
        else {
            self.answer(404, "no_route").await;
            return Ok(Next::Close);
        };
        if route.internal && !ctx.published.is_internal(self.peer.ip()) {
            info!(peer = %self.peer, domain = %route.domain, "internal domain asked from outside the internal networks: 404");
            self.answer(404, "internal_domain").await;
            return Ok(Next::Close);
        }
        *matched = Some(route);
        // Either a TLS terminator in front of the router or this agent's own TLS listener.
        if route.scheme.behind_tls() || self.client.is_tls() {
            head.forward_as_https(&mut self.request_head);
        }
        let sticky = StickyId::new(head.sticky_id.clone().map(|r| &self.buf[r]));
        self.buf.advance(head.head_len);
        // A small body that arrived whole with its head leaves with it, in one write (and goes
        // again, whole, if the request is retried).
        let request_body = if coalesce_body(head.body, &mut self.buf, &mut self.request_head) {
            if let BodyFraming::Length(n) = head.body {
                self.record.bytes_in += n;
            }
            BodyFraming::None
        } else {
            head.body
        };

        // All of the request is in `request_head` when its body was coalesced or absent: it
        // can then go out again. A body that streams from the client cannot, so it never rides
        // a pooled connection the backend may have closed meanwhile.
        let replayable = request_body == BodyFraming::None;
        let idempotent = head.method.is_idempotent();
        let reuse = match (replayable, idempotent) {
            (true, true) => Reuse::Pooled,
            (true, false) => Reuse::Checked,
            (false, _) => Reuse::Fresh,
        };
        let mut tried = Tried::default();
        // What to answer if no backend is left after a failed exchange.
        let mut failed_with = None;
        let mut resent_elsewhere = false;
        loop {
            let (selection, mut upstream) =
                match upstream::connect_next(route, sticky.get(), &mut tried, ctx, reuse).await {
                    Ok(connected) => connected,
                    Err(Unavailable::NoBackend) if failed_with.is_some() => {
                        debug!(tried = ?tried, "no backend left after a failed exchange: 502");
                        self.answer(failed_with.unwrap_or(502), "backend_failed")
                            .await;
                        return Ok(Next::Close);
                    }
                    Err(why) => {
                        self.answer_unavailable(why).await;
                        return Ok(Next::Close);
                    }
                };
            let backend = &route.backends[selection.index];
            backend.stats.requests.fetch_add(1, Ordering::Relaxed);
            self.record.connected = Some(Instant::now());
            self.record.backend = Some(selection.index);
            let set_sticky =
                (route.sticky && !selection.by_cookie).then_some(&*backend.container_id);
            let mut outcome = self
                .attempt(head, request_body, &mut upstream, set_sticky, ctx)
                .await;
            // A kept-alive connection the backend had closed says nothing about the backend or
            // the request: the same backend again, on a new connection. (Only for idempotent
            // requests: the backend may also have closed because of the request itself.)
            if matches!(outcome, Attempt::Lost(_)) && upstream.reused && idempotent {
                Metrics::add(&metrics.stale_reconnects, 1);
                match upstream.reconnect(backend, ctx).await {
                    Ok(()) => {
                        outcome = self
                            .attempt(head, request_body, &mut upstream, set_sticky, ctx)
                            .await;
                    }
                    Err(upstream::ConnectError::Io(e)) if super::is_fd_exhaustion(&e) => {
                        ctx.admission.note_fd_exhaustion();
                        self.answer_unavailable(Unavailable::Overloaded).await;
                        return Ok(Next::Close);
                    }
                    Err(e) => {
                        metrics.backend_error(&backend.stats, BackendError::Connect);
                        upstream::report_connect_failure(ctx, backend, &e);
                        continue;
                    }
                }
            }
            match outcome {
                Attempt::Done { next, keep_backend } => {
                    backend.stats.exchange_succeeded();
                    if keep_backend {
                        upstream.reused = true;
                        ctx.pool.put(upstream);
                    }
                    return Ok(next);
                }
                Attempt::NodeGone => {
                    metrics.backend_error(&backend.stats, BackendError::Reset);
                    debug!(backend = %backend.addr, id = %backend.container_id, via = ?backend.via, "the backend's node was lost mid-request");
                    // The node is out of the table: another backend, if the request allows.
                    if replayable && idempotent && !resent_elsewhere {
                        resent_elsewhere = true;
                        failed_with = Some(502);
                        continue;
                    }
                    self.answer(502, "node_lost").await;
                    return Ok(Next::Close);
                }
                Attempt::Lost(why) => {
                    metrics.backend_error(&backend.stats, BackendError::Reset);
                    upstream::report_exchange_failure(ctx, backend, &why);
                    debug!(backend = %backend.addr, "no response: {why}");
                    // Sent again at most once, to another backend, and only when repeating it
                    // is harmless and the session is not pinned: a request that makes backends
                    // close without answering must not go round every replica.
                    if replayable && idempotent && !selection.by_cookie && !resent_elsewhere {
                        resent_elsewhere = true;
                        failed_with = Some(502);
                        continue;
                    }
                    self.answer(502, "backend_failed").await;
                    return Ok(Next::Close);
                }
                Attempt::Fail { status, kind, why } => {
                    metrics.backend_error(&backend.stats, kind);
                    if kind != BackendError::ClientTimeout {
                        upstream::report_exchange_failure(ctx, backend, &why);
                    }
                    debug!(backend = %backend.addr, "answering {status}: {why}");
                    self.answer(status, kind.label()).await;
                    return Ok(Next::Close);
                }
                Attempt::Abort => return Ok(Next::Close),
            }
        }
    }

    /// Sends the request to one backend and relays its response.
    async fn attempt(
        &mut self,
        head: &RequestHead,
        request_body: BodyFraming,
        upstream: &mut Upstream,
        set_sticky: Option<&str>,
        ctx: &ProxyContext,
    ) -> Attempt {
        let metrics = &ctx.metrics;
        if let Err(e) = upstream.stream.write_all(&self.request_head).await {
            return Attempt::Lost(format!("sending the request: {e}"));
        }
        Metrics::add(&metrics.bytes_copied, self.request_head.len() as u64);
        let client_side = ClientSide {
            request_was_head: head.method == request::Method::Head,
            keep_alive: head.keep_alive && !self.phase.borrow().stopping(),
            http10: head.http10,
            set_sticky,
            websocket_upgrade: head.upgrade,
        };
        let body_path = BodyPath {
            splice: ctx.splice_threshold().map(|t| (&ctx.pipes, t)),
            copied: &metrics.bytes_copied,
            spliced: &metrics.bytes_spliced,
            idle_timeout: ctx.settings.body_idle_timeout,
            max_trailer_bytes: ctx.settings.limits.max_head,
        };
        let exchange = RequestExchange {
            client: &mut self.client,
            client_buf: &mut self.buf,
            upstream,
            response_head: &mut self.response_head,
            ctx,
            metrics,
            body_path: &body_path,
            spliced: &mut self.spliced,
            response_timeout: ctx.settings.response_timeout,
            record: &mut self.record,
        };
        exchange.run(request_body, &client_side).await
    }
}

/// The parts of a connection one request/response exchange borrows.
struct RequestExchange<'a> {
    client: &'a mut ClientStream,
    client_buf: &'a mut BytesMut,
    upstream: &'a mut Upstream,
    response_head: &'a mut Vec<u8>,
    ctx: &'a ProxyContext,
    metrics: &'a Metrics,
    body_path: &'a BodyPath<'a>,
    /// Set when splice moved any body byte on this client connection.
    spliced: &'a mut bool,
    response_timeout: Duration,
    record: &'a mut RequestRecord,
}

/// How the concurrent request-body / response-head phase ended.
enum ExchangeOutcome {
    Response(Result<ResponseHead, ResponseError>, RequestBody),
    /// The client's chunked framing is broken: 400, and the connection ends.
    BadRequestBody(&'static str),
    /// The client stopped sending its body for the body idle timeout: 408.
    ClientStalled,
    ClientGone,
    /// No response head within the response timeout of the end of the request body.
    ResponseTimeout,
    /// The backend's node (reached through its agent) was given up by the registry.
    NodeGone,
}

/// How the request body transfer ended.
enum RequestBody {
    Complete,
    /// The response came before the whole body was relayed: the client connection cannot be
    /// reused (its remaining body bytes would be read as a request).
    Abandoned,
}

impl RequestExchange<'_> {
    /// `request_body` is what is left of the request body to relay (nothing when it went out
    /// with the head).
    async fn run(self, request_body: BodyFraming, client_side: &ClientSide<'_>) -> Attempt {
        let (mut client_read, mut client_write) = self.client.split();
        let (mut backend_read, mut backend_write) = self.upstream.stream.split();

        // The request body and the response head move at the same time: the backend may answer
        // `100 Continue` first (the client waits for it before sending the body), or answer
        // early without reading the body at all. The response timeout runs from the end of
        // the request body: a long upload is not the backend being slow.
        let outcome = {
            let body = body::relay(
                request_body,
                &mut client_read,
                self.client_buf,
                &mut backend_write,
                self.body_path,
            );
            let response = read_response_head(
                &mut backend_read,
                &mut self.upstream.buf,
                &mut client_write,
                client_side,
                self.response_head,
                self.metrics,
            );
            let mut body = pin!(body);
            let mut response = pin!(response);
            // Through another node's agent: a node that dies sends nothing more, not even a
            // reset, so the exchange ends when the registry gives the node up.
            let node_gone = node_gone(self.ctx, &self.upstream.container_id, self.upstream.via);
            let mut node_gone = pin!(node_gone);
            let mut body_done = request_body == BodyFraming::None;
            let mut response_deadline = body_done.then(|| Instant::now() + self.response_timeout);
            loop {
                let deadline = response_deadline.unwrap_or_else(far_future);
                tokio::select! {
                    result = &mut body, if !body_done => {
                        match result {
                            Ok(relayed) => {
                                *self.spliced |= relayed.spliced;
                                self.record.bytes_in += relayed.bytes;
                            }
                            // A backend that stopped reading answers or fails next.
                            Err(RelayError::Sink(_)) => {}
                            Err(RelayError::Framing(e)) => break ExchangeOutcome::BadRequestBody(e.0),
                            Err(e @ RelayError::Source(_)) if e.is_timeout() => break ExchangeOutcome::ClientStalled,
                            Err(RelayError::Source(_)) => break ExchangeOutcome::ClientGone,
                        }
                        body_done = true;
                        response_deadline = Some(Instant::now() + self.response_timeout);
                    },
                    result = &mut response => {
                        let body = if body_done { RequestBody::Complete } else { RequestBody::Abandoned };
                        break ExchangeOutcome::Response(result, body);
                    }
                    () = tokio::time::sleep_until(deadline), if response_deadline.is_some() => {
                        break ExchangeOutcome::ResponseTimeout;
                    }
                    () = &mut node_gone => break ExchangeOutcome::NodeGone,
                }
            }
        };
        let (response, request_body) = match outcome {
            ExchangeOutcome::Response(response, body) => (response, body),
            ExchangeOutcome::BadRequestBody(why) => {
                debug!("bad chunked request body: {why}");
                self.metrics.rejected(why);
                let response = error_response(400, true);
                self.record
                    .router_answered(400, "bad_request", response.len());
                self.record.detail = Some(why);
                let _ = client_write.write_all(&response).await;
                return Attempt::Abort;
            }
            ExchangeOutcome::ClientStalled => {
                return Attempt::Fail {
                    status: 408,
                    kind: BackendError::ClientTimeout,
                    why: format!(
                        "the client sent no body byte for {:?}",
                        self.body_path.idle_timeout
                    ),
                };
            }
            ExchangeOutcome::ClientGone => return Attempt::Abort,
            ExchangeOutcome::NodeGone => return Attempt::NodeGone,
            ExchangeOutcome::ResponseTimeout => {
                return Attempt::Fail {
                    status: 504,
                    kind: BackendError::Timeout,
                    why: format!("no response head within {:?}", self.response_timeout),
                };
            }
        };
        let response = match response {
            Ok(response) => response,
            Err(ResponseError::Invalid(why)) => {
                return Attempt::Fail {
                    status: 502,
                    kind: BackendError::InvalidResponse,
                    why: why.into(),
                };
            }
            Err(ResponseError::Lost {
                error,
                client_saw_bytes,
            }) if client_saw_bytes => {
                debug!("backend lost after an interim response: {error}");
                return Attempt::Abort;
            }
            Err(ResponseError::Lost { error, .. }) => return Attempt::Lost(error),
            Err(ResponseError::ClientGone) => return Attempt::Abort,
        };

        self.record.first_byte = Some(Instant::now());
        self.record.status = response.status;
        self.record.answer = Answer::Backend;
        self.upstream.buf.advance(response.head_len);
        // A small body that arrived whole with its head leaves with it: one read, one write.
        let mut response_body = response.body;
        if coalesce_body(response_body, &mut self.upstream.buf, self.response_head) {
            response_body = BodyFraming::None;
        }
        // Counted before the write: a client that has the bytes must find them counted (a
        // test that reads the counters right after a `101` would otherwise race the agent).
        Metrics::add(&self.metrics.bytes_copied, self.response_head.len() as u64);
        if client_write.write_all(self.response_head).await.is_err() {
            return Attempt::Abort;
        }
        self.record.bytes_out += self.response_head.len() as u64;

        if response.status == 101 {
            // The split halves are not used past this point, so their borrows of both
            // sockets end here and the sockets can move into the tunnel.
            let path = self
                .ctx
                .tunnel_path(tunnel::TunnelKind::WebSocket, *self.spliced);
            self.record.kind = crate::access_log::Kind::Websocket;
            let moved =
                upgrade_to_tunnel(self.client, self.client_buf, self.upstream, path, self.ctx)
                    .await;
            self.record.bytes_in += moved.from_client;
            self.record.bytes_out += moved.to_client;
            return Attempt::Done {
                next: Next::Close,
                keep_backend: false,
            };
        }
        match body::relay(
            response_body,
            &mut backend_read,
            &mut self.upstream.buf,
            &mut client_write,
            self.body_path,
        )
        .await
        {
            Ok(relayed) => {
                *self.spliced |= relayed.spliced;
                self.record.bytes_out += relayed.bytes;
            }
            Err(e) => {
                debug!("response body: {e}");
                return Attempt::Abort;
            }
        }
        let body_complete = matches!(request_body, RequestBody::Complete);
        Attempt::Done {
            next: if response.close_client || !body_complete {
                Next::Close
            } else {
                Next::KeepAlive
            },
            keep_backend: response.backend_keep_alive
                && body_complete
                && self.upstream.buf.is_empty(),
        }
    }
}

enum ResponseError {
    Invalid(&'static str),
    /// The backend closed or reset the connection before a complete head.
    Lost {
        error: String,
        client_saw_bytes: bool,
    },
    ClientGone,
}

/// Reads the final response head, relaying interim (1xx) responses to the client on the way.
async fn read_response_head<R, W>(
    backend: &mut R,
    buf: &mut BytesMut,
    client: &mut W,
    client_side: &ClientSide<'_>,
    out: &mut Vec<u8>,
    metrics: &Metrics,
) -> Result<ResponseHead, ResponseError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut client_saw_bytes = false;
    loop {
        if !buf.is_empty() {
            match response::parse(buf, client_side, out) {
                Ok(Some(head)) if head.is_interim() => {
                    client
                        .write_all(out)
                        .await
                        .map_err(|_| ResponseError::ClientGone)?;
                    Metrics::add(&metrics.bytes_copied, out.len() as u64);
                    // Empty when swallowed (no 1xx to an HTTP/1.0 client).
                    client_saw_bytes |= !out.is_empty();
                    buf.advance(head.head_len);
                    continue;
                }
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(invalid) => return Err(ResponseError::Invalid(invalid.0)),
            }
        }
        buf.reserve(16 * 1024);
        match backend.read_buf(buf).await {
            Ok(0) => {
                let error = if buf.is_empty() {
                    "closed without a response"
                } else {
                    "closed inside the response head"
                };
                return Err(ResponseError::Lost {
                    error: error.into(),
                    client_saw_bytes,
                });
            }
            Ok(_) => {}
            Err(e) => {
                return Err(ResponseError::Lost {
                    error: e.to_string(),
                    client_saw_bytes,
                });
            }
        }
    }
}

/// After `101 Switching Protocols`: both sides speak another protocol. What either side sent
/// along with the handshake (already in our buffers) goes first, through userspace, before the
/// sockets become a tunnel.
async fn upgrade_to_tunnel(
    client: &mut ClientStream,
    client_buf: &mut BytesMut,
    upstream: &mut Upstream,
    path: tunnel::TunnelPath,
    ctx: &ProxyContext,
) -> tunnel::Moved {
    let before = tunnel::ClientBytes::read(client.tcp());
    let mut sent = true;
    for (bytes, to) in [
        (
            &mut upstream.buf,
            &mut *client as &mut (dyn AsyncWrite + Unpin + Send),
        ),
        (client_buf, &mut upstream.stream),
    ] {
        if !bytes.is_empty() {
            // Counted before the write, as the response head is.
            Metrics::add(&ctx.metrics.bytes_copied, bytes.len() as u64);
            if to.write_all(bytes).await.is_err() {
                sent = false;
                break;
            }
            bytes.clear();
        }
    }
    if sent {
        client.tunnel(&mut upstream.stream, path, ctx).await;
    }
    before.moved_since(client.tcp())
}

/// Bodies up to this size that are already buffered go out in the same write as their head.
const COALESCE_LIMIT: u64 = 64 * 1024;

/// What a 503 for a busy backend or an overloaded agent tells the client to wait.
const RETRY_AFTER_SECONDS: u32 = 1;

/// Resolves once the backend, reached through the agent at `via`, no longer takes requests
/// (its node was lost or cannot be reached); never for a backend of this node.
async fn node_gone(ctx: &ProxyContext, id: &str, via: Option<std::net::SocketAddr>) {
    if via.is_none() {
        return std::future::pending().await;
    }
    let mut versions = ctx.published.table_version.subscribe();
    loop {
        if versions.changed().await.is_err() {
            return std::future::pending().await;
        }
        if !ctx.published.table.load().still_routed(id) {
            return;
        }
    }
}

/// A deadline that never comes (for a `select!` arm that is disabled anyway).
fn far_future() -> Instant {
    Instant::now() + Duration::from_hours(24 * 365)
}

/// Moves a small `Content-Length` body that is entirely in `buf` to the end of `head`, so that
/// both leave in one write. Returns whether it did.
fn coalesce_body(framing: BodyFraming, buf: &mut BytesMut, head: &mut Vec<u8>) -> bool {
    let BodyFraming::Length(n) = framing else {
        return false;
    };
    if n > COALESCE_LIMIT || (buf.len() as u64) < n {
        return false;
    }
    let n = n as usize;
    head.extend_from_slice(&buf[..n]);
    buf.advance(n);
    true
}

/// The `CONTAINERID` cookie value, copied out of the read buffer (container ids are 64 hex
/// characters; longer values cannot name a container).
struct StickyId {
    bytes: [u8; 64],
    len: usize,
}

impl StickyId {
    fn new(value: Option<&[u8]>) -> Self {
        let mut id = Self {
            bytes: [0; 64],
            len: 0,
        };
        if let Some(value) = value.filter(|v| v.len() <= id.bytes.len()) {
            id.bytes[..value.len()].copy_from_slice(value);
            id.len = value.len();
        }
        id
    }

    fn get(&self) -> Option<&[u8]> {
        (self.len > 0).then(|| &self.bytes[..self.len])
    }
}
