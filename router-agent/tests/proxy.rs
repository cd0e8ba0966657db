//! HTTP semantics of the proxy core, in-process (see `harness`): routing by Host, the router's
//! own answers (404, 503, 502, 504, 408 and the malformed-request statuses of DESIGN.md),
//! keep-alive, chunked bodies both ways, `Expect: 100-continue`, retry after a refused
//! connect. Every refused request is also checked not to have reached the backend.
//!
//! The end-to-end suite (`tests/tests/`) checks the same contract through the real agent and
//! real containers; these run in a plain `cargo test`, without root or Docker.
mod harness;

use std::time::{Duration, Instant};

use harness::{Behaviour, Proxy, TestBackend, refusing_addr, route, route_to};
use router_agent::{config::ProxySettings, health::BackendState, registry::Message};

fn get(host: &str, target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn requests_are_routed_by_host_and_unknown_hosts_get_404() {
    let a = TestBackend::start("a", Behaviour::Echo).await;
    let b = TestBackend::start("b", Behaviour::Echo).await;
    let proxy = Proxy::start(
        ProxySettings::default(),
        vec![
            route("a.test", &[(&a, BackendState::Up)]),
            route("b.test", &[(&b, BackendState::Up)]),
        ],
    )
    .await;

    let response = proxy.send(&get("a.test", "/x")).await;
    assert_eq!((response.status, response.backend()), (200, Some("a")));
    assert_eq!(response.body_text(), "a GET /x ");
    // Host is case-insensitive and may carry a port.
    let response = proxy.send(&get("B.Test:80", "/y")).await;
    assert_eq!((response.status, response.backend()), (200, Some("b")));

    let mut client = proxy.connect().await;
    client.write(&get("c.test", "/")).await;
    let response = client.response().await;
    assert_eq!(
        (response.status, response.backend()),
        (404, None),
        "{response:?}"
    );
    assert!(
        client.closed().await,
        "the connection stays open after a 404"
    );
    assert_eq!(
        a.seen().len() + b.seen().len(),
        2,
        "only the routed requests"
    );
}

#[tokio::test]
async fn a_route_without_an_up_backend_is_503_and_reaches_no_backend() {
    let down = TestBackend::start("down", Behaviour::Echo).await;
    let starting = TestBackend::start("starting", Behaviour::Echo).await;
    let draining = TestBackend::start("draining", Behaviour::Echo).await;
    let proxy = Proxy::start(
        ProxySettings::default(),
        vec![route(
            "none.test",
            &[
                (&down, BackendState::Down),
                (&starting, BackendState::Starting),
                (&draining, BackendState::Draining),
            ],
        )],
    )
    .await;
    let response = proxy.send(&get("none.test", "/")).await;
    assert_eq!(
        (response.status, response.backend()),
        (503, None),
        "{response:?}"
    );
    for backend in [&down, &starting, &draining] {
        assert_eq!(backend.connections(), 0, "{} was contacted", backend.name);
    }
}

/// Two requests on one client connection: each is routed by its own Host, and the backend
/// connection of the first is pooled and reused by the next request to that backend.
#[tokio::test]
async fn keep_alive_requests_are_routed_each_and_reuse_backend_connections() {
    let a = TestBackend::start("a", Behaviour::Echo).await;
    let b = TestBackend::start("b", Behaviour::Echo).await;
    let proxy = Proxy::start(
        ProxySettings::default(),
        vec![
            route("a.test", &[(&a, BackendState::Up)]),
            route("b.test", &[(&b, BackendState::Up)]),
        ],
    )
    .await;
    let mut client = proxy.connect().await;
    for (host, expected) in [("a.test", "a"), ("b.test", "b"), ("a.test", "a")] {
        client.write(&get(host, "/")).await;
        let response = client.response().await;
        assert_eq!((response.status, response.backend()), (200, Some(expected)));
    }
    assert_eq!(a.seen().len(), 2);
    assert_eq!(
        a.connections(),
        1,
        "the second request to a opened a new connection"
    );

    // Pipelined: both requests in one write, answered in order.
    let mut both = get("b.test", "/1");
    both.extend(get("a.test", "/2"));
    client.write(&both).await;
    assert_eq!(client.response().await.body_text(), "b GET /1 ");
    assert_eq!(client.response().await.body_text(), "a GET /2 ");
}

#[tokio::test]
async fn chunked_bodies_are_relayed_both_ways() {
    let echo = TestBackend::start("echo", Behaviour::Echo).await;
    let chunked = TestBackend::start("chunked", Behaviour::EchoChunked).await;
    let proxy = Proxy::start(
        ProxySettings::default(),
        vec![
            route("echo.test", &[(&echo, BackendState::Up)]),
            route("chunked.test", &[(&chunked, BackendState::Up)]),
        ],
    )
    .await;
    let request = "POST /up HTTP/1.1\r\nHost: echo.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n";
    let response = proxy.send(request.as_bytes()).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body_text(), "echo POST /up hello world");
    assert_eq!(echo.seen()[0].body, b"hello world");

    let response = proxy.send(&get("chunked.test", "/down")).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        response.header("transfer-encoding"),
        Some("chunked"),
        "{response:?}"
    );
    assert_eq!(response.body_text(), "chunked GET /down ");
}

/// The router forwards `Expect: 100-continue` and relays the backend's `100 Continue` before
/// the body, so a client that waits for it is not held up.
#[tokio::test]
async fn expect_100_continue_is_relayed_before_the_body() {
    let echo = TestBackend::start("echo", Behaviour::Echo).await;
    let proxy = Proxy::start(
        ProxySettings::default(),
        vec![route("echo.test", &[(&echo, BackendState::Up)])],
    )
    .await;
    let mut client = proxy.connect().await;
    client
        .write(
            b"POST /upload HTTP/1.1\r\nHost: echo.test\r\nContent-Length: 5\r\n\
              Expect: 100-continue\r\n\r\n",
        )
        .await;
    let interim = client.response().await;
    assert_eq!(interim.status, 100, "{interim:?}");
    client.write(b"hello").await;
    let response = client.response().await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body_text(), "echo POST /upload hello");
}

#[tokio::test]
async fn forwarded_headers_are_set_and_hop_by_hop_headers_removed() {
    let echo = TestBackend::start("echo", Behaviour::Echo).await;
    let proxy = Proxy::start(
        ProxySettings::default(),
        vec![route("echo.test", &[(&echo, BackendState::Up)])],
    )
    .await;
    let response = proxy
        .send(
            b"GET / HTTP/1.1\r\nHost: echo.test\r\nConnection: keep-alive, X-Private\r\n\
              X-Private: secret\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\n",
        )
        .await;
    assert_eq!(response.status, 200, "{response:?}");
    let seen = &echo.seen()[0];
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("127.0.0.1"),
        "{}",
        seen.head
    );
    assert_eq!(seen.header("x-kept"), Some("yes"), "{}", seen.head);
    for hop_by_hop in ["x-private", "keep-alive"] {
        assert_eq!(
            seen.header(hop_by_hop),
            None,
            "{hop_by_hop} forwarded:\n{}",
            seen.head
        );
    }
}

/// Requests the router must refuse from the head alone, with the status DESIGN.md gives each
/// (a sample of `tests/tests/malformed.rs`, which runs the full table end to end).
const MALFORMED: &[(&str, &str, u16)] = &[
    (
        "CL and TE",
        "POST / HTTP/1.1\r\nHost: m.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "CL twice",
        "POST / HTTP/1.1\r\nHost: m.test\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
    ),
    (
        "CL with a sign",
        "POST / HTTP/1.1\r\nHost: m.test\r\nContent-Length: +5\r\n\r\nhello",
        400,
    ),
    (
        "CL as a list",
        "POST / HTTP/1.1\r\nHost: m.test\r\nContent-Length: 5, 5\r\n\r\nhello",
        400,
    ),
    (
        "unknown transfer coding",
        "POST / HTTP/1.1\r\nHost: m.test\r\nTransfer-Encoding: foo\r\n\r\n",
        501,
    ),
    (
        "chunked not last",
        "POST / HTTP/1.1\r\nHost: m.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "TE in HTTP/1.0",
        "POST / HTTP/1.0\r\nHost: m.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    (
        "obs-fold",
        "GET / HTTP/1.1\r\nHost: m.test\r\nX-Folded: a\r\n b\r\n\r\n",
        400,
    ),
    (
        "space before the colon",
        "GET / HTTP/1.1\r\nHost : m.test\r\n\r\n",
        400,
    ),
    (
        "NUL in a value",
        "GET / HTTP/1.1\r\nHost: m.test\r\nX: a\x00b\r\n\r\n",
        400,
    ),
    ("bare LF", "GET / HTTP/1.1\nHost: m.test\n\n", 400),
    ("no Host", "GET / HTTP/1.1\r\nX: y\r\n\r\n", 400),
    (
        "two Hosts",
        "GET / HTTP/1.1\r\nHost: m.test\r\nHost: m.test\r\n\r\n",
        400,
    ),
    (
        "Host port above 65535",
        "GET / HTTP/1.1\r\nHost: m.test:99999\r\n\r\n",
        400,
    ),
    (
        "absolute-form authority differs from Host",
        "GET http://other.example/ HTTP/1.1\r\nHost: m.test\r\n\r\n",
        400,
    ),
    ("HTTP/1.2", "GET / HTTP/1.2\r\nHost: m.test\r\n\r\n", 400),
    (
        "CONNECT",
        "CONNECT m.test:80 HTTP/1.1\r\nHost: m.test:80\r\n\r\n",
        400,
    ),
    (
        "unsupported expectation",
        "GET / HTTP/1.1\r\nHost: m.test\r\nExpect: something-else\r\n\r\n",
        417,
    ),
    (
        "asterisk-form on GET",
        "GET * HTTP/1.1\r\nHost: m.test\r\n\r\n",
        400,
    ),
];

#[tokio::test]
async fn malformed_requests_get_their_status_and_never_reach_the_backend() {
    let backend = TestBackend::start("m", Behaviour::Echo).await;
    let proxy = Proxy::start(
        ProxySettings::default(),
        vec![route("m.test", &[(&backend, BackendState::Up)])],
    )
    .await;
    let long_target = format!("/{}", "a".repeat(9000));
    let many_fields = "X-F: v\r\n".repeat(101);
    let big_field = format!("X-Big: {}\r\n", "b".repeat(70_000));
    let oversized = [
        (
            "request line over 8 KiB",
            format!("GET {long_target} HTTP/1.1\r\nHost: m.test\r\n\r\n"),
            414,
        ),
        (
            "101 header fields",
            format!("GET / HTTP/1.1\r\nHost: m.test\r\n{many_fields}\r\n"),
            431,
        ),
        (
            "head over 64 KiB",
            format!("GET / HTTP/1.1\r\nHost: m.test\r\n{big_field}\r\n"),
            431,
        ),
    ];
    let rows = MALFORMED
        .iter()
        .map(|(name, request, status)| (*name, (*request).to_owned(), *status))
        .chain(oversized);
    let mut wrong = Vec::new();
    for (name, request, status) in rows {
        let mut client = proxy.connect().await;
        client.write(request.as_bytes()).await;
        let response = client.try_response().await;
        let got = response.as_ref().map(|r| (r.status, r.backend().is_some()));
        if got != Some((status, false)) {
            wrong.push(format!("{name}: expected {status}, got {response:?}"));
        } else if !client.closed().await {
            wrong.push(format!(
                "{name}: the connection stayed open after the {status}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(
        backend.connections(),
        0,
        "a malformed request reached the backend"
    );

    // The router is unharmed.
    let response = proxy.send(&get("m.test", "/")).await;
    assert_eq!((response.status, response.backend()), (200, Some("m")));
}

#[tokio::test]
async fn an_incomplete_head_gets_408_after_the_header_timeout() {
    let backend = TestBackend::start("slow", Behaviour::Echo).await;
    let header_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(
        ProxySettings {
            header_timeout,
            ..ProxySettings::default()
        },
        vec![route("slow.test", &[(&backend, BackendState::Up)])],
    )
    .await;
    let started = Instant::now();
    let mut client = proxy.connect().await;
    client.write(b"GET / HTTP/1.1\r\nHost: slow.te").await;
    let response = client.response().await;
    let waited = started.elapsed();
    assert_eq!(response.status, 408, "{response:?}");
    assert!(
        waited >= header_timeout && waited < header_timeout * 5,
        "408 after {waited:?}, with a header timeout of {header_timeout:?}"
    );
    assert!(client.closed().await);
    assert_eq!(backend.connections(), 0);
}

#[tokio::test]
async fn a_backend_that_does_not_answer_in_time_gets_504() {
    let silent = TestBackend::start("silent", Behaviour::Silent).await;
    let response_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(
        ProxySettings {
            response_timeout,
            ..ProxySettings::default()
        },
        vec![route("silent.test", &[(&silent, BackendState::Up)])],
    )
    .await;
    let started = Instant::now();
    let response = proxy.send(&get("silent.test", "/")).await;
    let waited = started.elapsed();
    assert_eq!(
        (response.status, response.backend()),
        (504, None),
        "{response:?}"
    );
    assert!(
        waited >= response_timeout && waited < response_timeout * 5,
        "504 after {waited:?}, with a response timeout of {response_timeout:?}"
    );
    assert_eq!(
        silent.seen().len(),
        1,
        "the request reached the backend once"
    );
}

#[tokio::test]
async fn an_invalid_response_head_is_502() {
    let garbage = TestBackend::start("garbage", Behaviour::Raw(b"HTTP/1.1 2x0 OK\r\n\r\n")).await;
    let not_http = TestBackend::start("not-http", Behaviour::Raw(b"SSH-2.0-OpenSSH\r\n\r\n")).await;
    let proxy = Proxy::start(
        ProxySettings::default(),
        vec![
            route("garbage.test", &[(&garbage, BackendState::Up)]),
            route("not-http.test", &[(&not_http, BackendState::Up)]),
        ],
    )
    .await;
    for host in ["garbage.test", "not-http.test"] {
        let response = proxy.send(&get(host, "/")).await;
        assert_eq!(response.status, 502, "{host}: {response:?}");
    }
}

/// A refused connect means nothing was sent: the request goes to another backend, and the
/// registry hears of the refusal (passive health). With every backend refusing: 503.
#[tokio::test]
async fn a_refused_backend_is_retried_on_another_then_503() {
    let live = TestBackend::start("live", Behaviour::Echo).await;
    let dead = refusing_addr();
    let mut proxy = Proxy::start(
        ProxySettings::default(),
        vec![
            route_to(
                "retry.test",
                &[
                    ("dead", dead, BackendState::Up),
                    ("live", live.addr, BackendState::Up),
                ],
            ),
            route_to("dead.test", &[("dead", dead, BackendState::Up)]),
        ],
    )
    .await;
    // Round robin starts somewhere: over four requests, the dead backend is picked first at
    // least once.
    for _ in 0..4 {
        let response = proxy.send(&get("retry.test", "/")).await;
        assert_eq!((response.status, response.backend()), (200, Some("live")));
    }
    let reported = proxy
        .registry_messages()
        .into_iter()
        .filter(|m| matches!(m, Message::ConnectFailed { id, addr, .. } if &**id == "dead" && *addr == dead))
        .count();
    assert!(
        reported >= 1,
        "the refused connect was not reported to the registry"
    );

    let response = proxy.send(&get("dead.test", "/")).await;
    assert_eq!(
        (response.status, response.backend()),
        (503, None),
        "{response:?}"
    );
}
