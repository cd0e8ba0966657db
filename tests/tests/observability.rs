//! Access log and metrics with a real container and real requests: the JSON line of a proxied
//! request and of a router 404, the text line, and `/metrics` moving with the traffic
//! (histogram, per-backend series, code and source labels), including the removal of a
//! container's series when it goes.
use std::{path::PathBuf, time::Duration};

use serde_json::Value;
use tests::{agent::Agent, client, docker::Container, unique, wait_for};

fn route_label(route: &str) -> String {
    format!("aliyun.routing.port_80={route}")
}

fn log_path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-logs");
    std::fs::create_dir_all(&dir).expect("log dir");
    dir.join(format!("{}.log", unique(name)))
}

/// The access-log lines written so far, once at least `n` are there.
fn wait_lines(path: &PathBuf, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    wait_for("access-log lines", Duration::from_secs(10), || {
        lines = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        lines.len() >= n
    });
    lines
}

fn metrics(agent: &Agent) -> String {
    let response = client::get(agent.admin, "localhost", "/metrics", &[]).expect("/metrics");
    assert_eq!(response.status, 200);
    String::from_utf8(response.body).expect("utf-8")
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn json_access_log_names_the_backend_and_the_router_answers() {
    let domain = format!("{}.local", unique("alog"));
    let path = log_path("access-json");
    let agent = Agent::start(&[
        "--access-log",
        path.to_str().unwrap(),
        "--log-format",
        "json",
    ]);
    let backend = Container::backend(&unique("alog"), &[&route_label(&domain)]);
    agent.wait_up(&domain, &[&backend.id], Duration::from_secs(15));

    let ok = client::get(agent.http_addr(), &domain, "/hello?x=1", &[]).expect("request");
    assert_eq!(ok.status, 200);
    let missing = format!("{}.local", unique("nobody"));
    let not_found = client::get(agent.http_addr(), &missing, "/", &[]).expect("request");
    assert_eq!(not_found.status, 404);

    let lines = wait_lines(&path, 2);
    let entries: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let proxied = entries
        .iter()
        .find(|e| e["domain"] == domain.as_str())
        .unwrap_or_else(|| panic!("no line for {domain} in {lines:?}"));
    assert_eq!(proxied["status"], 200, "{proxied}");
    assert_eq!(proxied["method"], "GET");
    assert_eq!(proxied["target"], "/hello?x=1");
    assert_eq!(proxied["answered_by"], "backend");
    assert_eq!(proxied["backend"], backend.name.as_str());
    assert_eq!(proxied["backend_id"], backend.short_id());
    assert_eq!(proxied["kind"], "http");
    assert!(
        proxied["client"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(proxied["bytes_in"].as_u64().unwrap() > 0);
    // The test backend's answer carries its body: more than a bare head.
    assert!(proxied["bytes_out"].as_u64().unwrap() as usize > ok.body.len());
    let connect = proxied["connect_seconds"].as_f64().unwrap();
    let ttfb = proxied["ttfb_seconds"].as_f64().unwrap();
    let total = proxied["total_seconds"].as_f64().unwrap();
    assert!(connect <= ttfb && ttfb <= total && total < 5.0, "{proxied}");

    let refused = entries
        .iter()
        .find(|e| e["status"] == 404)
        .unwrap_or_else(|| panic!("no 404 line in {lines:?}"));
    assert_eq!(refused["answered_by"], "router");
    assert_eq!(refused["reason"], "no_route");
    assert_eq!(refused["backend"], Value::Null);
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn text_access_log_and_malformed_requests() {
    let domain = format!("{}.local", unique("tlog"));
    let path = log_path("access-text");
    let agent = Agent::start(&["--access-log", path.to_str().unwrap()]);
    let backend = Container::backend(&unique("tlog"), &[&route_label(&domain)]);
    agent.wait_up(&domain, &[&backend.id], Duration::from_secs(15));
    assert_eq!(
        client::get(agent.http_addr(), &domain, "/", &[])
            .expect("request")
            .status,
        200
    );
    // Two Host headers: 400 from the router, logged with the parser's reason.
    let mut stream = std::net::TcpStream::connect(agent.http_addr()).expect("connect");
    std::io::Write::write_all(
        &mut stream,
        format!("GET / HTTP/1.1\r\nHost: {domain}\r\nHost: {domain}\r\n\r\n").as_bytes(),
    )
    .expect("send");
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stream, &mut answer);
    assert!(answer.starts_with(b"HTTP/1.1 400"));

    let lines = wait_lines(&path, 2);
    let proxied = lines
        .iter()
        .find(|l| l.contains(" 200 "))
        .unwrap_or_else(|| panic!("{lines:?}"));
    for field in [
        "\"GET / HTTP/1.1\" 200 ".to_owned(),
        format!("route={domain}/ "),
        format!("backend={} id={} ", backend.name, backend.short_id()),
        "answered=backend ".to_owned(),
        "kind=http ".to_owned(),
    ] {
        assert!(proxied.contains(&field), "{field:?} missing from {proxied}");
    }
    assert!(proxied.contains(" total_ms="), "{proxied}");
    let refused = lines
        .iter()
        .find(|l| l.contains("\" 400 "))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(
        refused.contains("answered=router reason=bad_request detail="),
        "{refused}"
    );
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn metrics_move_with_traffic_and_forget_removed_containers() {
    let domain = format!("{}.local", unique("met"));
    let agent = Agent::start(&["--access-log", "off"]);
    let one = Container::backend(&unique("met"), &[&route_label(&domain)]);
    let two = Container::backend(&unique("met"), &[&route_label(&domain)]);
    agent.wait_up(&domain, &[&one.id, &two.id], Duration::from_secs(15));

    for _ in 0..10 {
        let r = client::get(agent.http_addr(), &domain, "/", &[]).expect("request");
        assert_eq!(r.status, 200);
    }
    let missing = format!("{}.local", unique("nobody"));
    assert_eq!(
        client::get(agent.http_addr(), &missing, "/", &[])
            .expect("request")
            .status,
        404
    );
    agent.wait_idle();

    let text = metrics(&agent);
    let count = format!("router_request_duration_seconds_count{{route=\"{domain}\"}}");
    assert_eq!(agent.metric(&count), Some(10), "{count} in\n{text}");
    assert!(
        text.contains(&format!(
            "router_request_duration_seconds_bucket{{le=\"+Inf\",route=\"{domain}\"}} 10"
        )),
        "{text}"
    );
    let per_backend = |c: &Container| {
        agent.metric(&format!(
            "router_backend_requests_total{{route=\"{domain}\",backend=\"{}\",id=\"{}\"}}",
            c.name,
            c.short_id()
        ))
    };
    let (a, b) = (per_backend(&one).unwrap(), per_backend(&two).unwrap());
    assert_eq!(a + b, 10, "{text}");
    assert!(a > 0 && b > 0, "both backends take traffic: {a} and {b}");
    assert_eq!(
        agent.metric(&format!(
            "router_backend_state{{route=\"{domain}\",backend=\"{}\",id=\"{}\",state=\"up\"}}",
            one.name,
            one.short_id()
        )),
        Some(1)
    );
    // Other tests' agents do not share this counter: this agent saw exactly its own traffic.
    assert_eq!(
        agent.metric("router_responses_total{code=\"404\",source=\"router\"}"),
        Some(1),
        "{text}"
    );
    assert!(
        agent
            .metric("router_responses_total{code=\"200\",source=\"backend\"}")
            .is_some_and(|n| n >= 10),
        "{text}"
    );
    assert!(text.contains("router_build_info{version=\""), "{text}");

    // The container goes: its series go with it, the other's stay.
    let gone = (two.name.clone(), two.short_id().to_owned());
    drop(two);
    wait_for(
        "the removed container's series to go",
        Duration::from_secs(15),
        || !metrics(&agent).contains(&gone.0),
    );
    assert!(per_backend(&one).is_some());
    assert!(!metrics(&agent).contains(&gone.1));
}
