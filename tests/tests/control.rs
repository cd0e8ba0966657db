//! Runtime control: `router-agent ctl` drains, reweights and puts containers in maintenance on a
//! real agent with real backends; the overrides survive an agent restart; the admin API refuses
//! writes without the token; `ctl why` explains; the dashboard renders in a real headless
//! chromium.
use std::{collections::HashMap, path::PathBuf, process::Command, time::Duration};

use tests::{
    agent::Agent,
    client,
    docker::{Container, backend_image, docker},
    unique, wait_for,
};

/// How many of `n` fresh requests (no cookie) each backend answered, by short id.
fn split(agent: &Agent, domain: &str, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let response = client::get(agent.http_addr(), domain, "/", &[]).expect("request");
        assert_eq!(response.status, 200, "{response:?}");
        *counts
            .entry(response.backend().expect("X-Backend").to_owned())
            .or_default() += 1;
    }
    counts
}

fn wait_state(agent: &Agent, domain: &str, container: &Container, state: &str) {
    wait_for(
        &format!("{} {state} in /api/routes", container.name),
        Duration::from_secs(10),
        || agent.state_of(domain, &container.id).as_deref() == Some(state),
    );
}

fn backend_json(agent: &Agent, domain: &str, container: &Container) -> serde_json::Value {
    agent
        .route(domain, "/")
        .and_then(|r| {
            r["backends"]
                .as_array()?
                .iter()
                .find(|b| b["container_id"] == container.id.as_str())
                .cloned()
        })
        .unwrap_or_else(|| panic!("{} not in /api/routes", container.name))
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn control_drain_weight_and_maintenance_through_ctl() {
    let domain = format!("{}.local", unique("ctl"));
    let route = format!("aliyun.routing.port_80={domain}");
    let agent = Agent::start(&[]);
    let a = Container::backend(&unique("ctl-a"), &[&route]);
    let b = Container::backend(&unique("ctl-b"), &[&route]);
    agent.wait_up(&domain, &[&a.id, &b.id], Duration::from_secs(15));
    let both = split(&agent, &domain, 20);
    assert_eq!(both.len(), 2, "both replicas serve before: {both:?}");

    // Drain: no new request reaches it, the other keeps serving, and the table shows it.
    let out = agent.ctl_ok(&["drain", &a.name]);
    assert!(out.contains("state drained"), "{out}");
    wait_state(&agent, &domain, &a, "drained");
    let drained = backend_json(&agent, &domain, &a);
    assert_eq!(drained["override"]["drained"], true, "{drained}");
    let before = drained["requests"].as_u64().unwrap();
    let counts = split(&agent, &domain, 30);
    assert_eq!(
        counts,
        HashMap::from([(b.short_id().to_owned(), 30)]),
        "drained replica got requests"
    );
    assert_eq!(
        backend_json(&agent, &domain, &a)["requests"]
            .as_u64()
            .unwrap(),
        before
    );
    let view = agent.container(&a.id).expect("in /api/containers");
    assert_eq!(view["state"], "drained");
    assert_eq!(view["override"]["drained"], true);
    let why = agent.ctl_ok(&["why", &a.name]);
    assert!(
        why.contains("NOT routed") && why.contains("drained"),
        "{why}"
    );

    agent.ctl_ok(&["undrain", &a.name]);
    wait_state(&agent, &domain, &a, "up");
    assert_eq!(split(&agent, &domain, 20).len(), 2);

    // Weight 25 against the label's 100: about a fifth of new requests.
    let out = agent.ctl_ok(&["weight", &a.name, "25"]);
    assert!(out.contains("weight 25"), "{out}");
    wait_for("weight 25 in /api/routes", Duration::from_secs(10), || {
        backend_json(&agent, &domain, &a)["weight"] == 25
    });
    let counts = split(&agent, &domain, 100);
    let to_a = counts.get(a.short_id()).copied().unwrap_or(0);
    assert!(
        (10..=30).contains(&to_a),
        "weight 25:100 should send about 20 of 100 to a, sent {to_a}: {counts:?}"
    );
    agent.ctl_ok(&["weight", &a.name, "label"]);
    wait_for("the label's weight again", Duration::from_secs(10), || {
        backend_json(&agent, &domain, &a)["weight"] == 100
    });
    let bad = agent.ctl(&["weight", &a.name, "101"]);
    assert!(!bad.0 && bad.2.contains("0 to 100"), "{bad:?}");

    // Maintenance: out of rotation whatever the probes say, shown as such.
    agent.ctl_ok(&["maintenance", &b.name, "on"]);
    wait_state(&agent, &domain, &b, "maintenance");
    assert_eq!(
        split(&agent, &domain, 20),
        HashMap::from([(a.short_id().to_owned(), 20)])
    );
    let why = agent.ctl_ok(&["why", &b.name]);
    assert!(why.contains("maintenance"), "{why}");
    agent.ctl_ok(&["maintenance", &b.name, "off"]);
    wait_state(&agent, &domain, &b, "up");

    // The events the dashboard shows.
    let events = agent.json("/api/events").to_string();
    for expected in [
        "override: drained",
        "override: weight 25",
        "override: maintenance on",
    ] {
        assert!(
            events.contains(expected),
            "{expected} missing from {events}"
        );
    }
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn control_writes_need_the_token() {
    let agent = Agent::start(&[]);
    let write = |auth: Option<&str>| {
        let mut request =
            "POST /api/containers/nothing-here/drain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                .to_owned();
        if let Some(auth) = auth {
            request.push_str("Authorization: ");
            request.push_str(auth);
            request.push_str("\r\n");
        }
        request += "\r\n";
        client::exchange(agent.admin, request.as_bytes()).expect("admin answers")
    };
    let refused = write(None);
    assert_eq!(refused.status, 401);
    let body = String::from_utf8_lossy(&refused.body);
    assert!(
        body.contains("Authorization: Bearer") && body.contains("admin.token"),
        "{body}"
    );
    assert_eq!(write(Some("Bearer wrong-token-0123456789")).status, 401);
    let token = std::fs::read_to_string(agent.state_dir.join("admin.token")).expect("token file");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(agent.state_dir.join("admin.token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "token file readable by others");
    // With the token: past the check (the container does not exist).
    let accepted = write(Some(&format!("Bearer {}", token.trim())));
    assert_eq!(accepted.status, 404, "{accepted:?}");
    // Reads on loopback need none.
    let read = client::get(agent.admin, "x", "/api/overrides", &[]).expect("read");
    assert_eq!(read.status, 200);
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn control_overrides_survive_an_agent_restart_and_stale_ones_are_listed() {
    let domain = format!("{}.local", unique("ctl-keep"));
    let route = format!("aliyun.routing.port_80={domain}");
    let state_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-state")
        .join(unique("restart"));
    let state_arg = state_dir.to_str().expect("utf-8").to_owned();
    let a = Container::backend(&unique("ctl-keep-a"), &[&route]);
    let b = Container::backend(&unique("ctl-keep-b"), &[&route]);
    let gone = Container::backend(&unique("ctl-keep-gone"), &[&route]);
    {
        let agent = Agent::start(&["--state-dir", &state_arg]);
        agent.wait_up(&domain, &[&a.id, &b.id, &gone.id], Duration::from_secs(15));
        agent.ctl_ok(&["drain", &a.name]);
        agent.ctl_ok(&["weight", &b.name, "7"]);
        agent.ctl_ok(&["maintenance", &gone.name, "on"]);
        wait_state(&agent, &domain, &a, "drained");
    }
    docker(&["rm", "-f", &gone.id]);
    let agent = Agent::start(&["--state-dir", &state_arg]);
    // From the first table on: no window where the drained replica takes traffic.
    wait_for(
        "both containers in the table",
        Duration::from_secs(10),
        || agent.backend_states(&domain).len() == 2,
    );
    assert_eq!(agent.state_of(&domain, &a.id).as_deref(), Some("drained"));
    assert_eq!(backend_json(&agent, &domain, &b)["weight"], 7);
    assert_eq!(
        split(&agent, &domain, 10),
        HashMap::from([(b.short_id().to_owned(), 10)])
    );
    let status = agent.ctl_ok(&["status"]);
    assert!(
        status.contains(&gone.name) && status.contains("stale"),
        "{status}"
    );
    let cleared = agent.ctl_ok(&["clear", "--stale"]);
    assert!(cleared.contains(&gone.name), "{cleared}");
    let status = agent.ctl_ok(&["status"]);
    assert!(!status.contains(&gone.name), "{status}");
    agent.ctl_ok(&["clear", &a.name]);
    wait_state(&agent, &domain, &a, "up");
    let file = std::fs::read_to_string(state_dir.join("overrides.json")).expect("state file");
    assert!(!file.contains(&a.name) && file.contains(&b.name), "{file}");
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn control_why_says_why_a_container_is_not_routed() {
    let domain = format!("{}.local", unique("ctl-why"));
    let agent = Agent::start(&[]);
    let plain = Container::run(&unique("ctl-why-plain"), &[backend_image()]);
    let bad = Container::backend(
        &unique("ctl-why-bad"),
        &[
            &format!("aliyun.routing.port_80={domain}"),
            "aliyun.routing.weight=heavy",
        ],
    );
    let good = Container::backend(
        &unique("ctl-why-good"),
        &[&format!("aliyun.routing.port_80={domain}")],
    );
    agent.wait_up(&domain, &[&good.id], Duration::from_secs(15));

    let why = agent.ctl_ok(&["why", &plain.name]);
    assert!(
        why.contains("NOT routed") && why.contains("no router labels"),
        "{why}"
    );
    let why = agent.ctl_ok(&["why", &bad.name]);
    assert!(
        why.contains("bad label") && why.contains("aliyun.routing.weight") && why.contains("heavy"),
        "{why}"
    );
    let why = agent.ctl_ok(&["why", good.short_id()]);
    assert!(why.contains("routed (state up"), "{why}");
    assert!(why.contains("internal-only"), "{why}");
    let why = agent.ctl_ok(&["why", "no-such-container-anywhere"]);
    assert!(why.contains("no container"), "{why}");

    // No agent at the address: a clear error naming it, and a failing exit status.
    let out = Command::new(tests::agent::agent_binary())
        .args(["ctl", "status", "--admin", "127.0.0.1:1"])
        .output()
        .expect("ctl runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("127.0.0.1:1") && stderr.contains("is router-agent running"),
        "{stderr}"
    );
}

/// The DOM chromium has after the page's scripts ran (a real headless browser).
fn rendered_dom(url: &str, profile: &std::path::Path) -> String {
    let out = Command::new("chromium")
        .args(chromium_flags(profile))
        .args(["--virtual-time-budget=3000", "--dump-dom", url])
        .output()
        .expect("chromium runs (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn chromium_flags(profile: &std::path::Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

/// The `<tr>` of a container in the dashboard's DOM.
fn row<'a>(dom: &'a str, name: &str) -> &'a str {
    let start = dom
        .find(&format!("data-container=\"{name}\""))
        .unwrap_or_else(|| panic!("{name} not on the dashboard:\n{dom}"));
    let end = dom[start..].find("</tr>").map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn control_dashboard_renders_in_headless_chromium() {
    let domain = format!("{}.local", unique("ctl-dash"));
    let route = format!("aliyun.routing.port_80={domain}");
    let agent = Agent::start(&[]);
    let a = Container::backend(&unique("ctl-dash-a"), &[&route]);
    let b = Container::backend(&unique("ctl-dash-b"), &[&route, "aliyun.routing.weight=40"]);
    agent.wait_up(&domain, &[&a.id, &b.id], Duration::from_secs(15));
    split(&agent, &domain, 10);
    let profile = std::env::temp_dir().join(unique("chromium-profile"));
    let url = format!("http://{}/", agent.admin);

    let dom = rendered_dom(&url, &profile);
    assert!(
        dom.contains(&format!("http://{domain}/")),
        "route missing:\n{dom}"
    );
    let row_a = row(&dom, &a.name);
    assert!(
        row_a.contains("data-state=\"up\"") && row_a.contains(">100<"),
        "{row_a}"
    );
    let row_b = row(&dom, &b.name);
    assert!(
        row_b.contains("data-state=\"up\"") && row_b.contains(">40<"),
        "{row_b}"
    );
    assert!(dom.contains("discovered"), "events missing:\n{dom}");

    agent.ctl_ok(&["drain", &a.name]);
    agent.ctl_ok(&["weight", &b.name, "60"]);
    let dom = rendered_dom(&url, &profile);
    let row_a = row(&dom, &a.name);
    assert!(
        row_a.contains("data-state=\"drained\"") && row_a.contains(">drained<"),
        "{row_a}"
    );
    let row_b = row(&dom, &b.name);
    assert!(
        row_b.contains("60") && row_b.contains("(override)"),
        "{row_b}"
    );
    assert!(dom.contains("override: drained"), "events missing:\n{dom}");

    // One screenshot for a human to look at.
    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&shot).expect("artifact dir");
    let shot = shot.join("dashboard.png");
    let out = Command::new("chromium")
        .args(chromium_flags(&profile))
        .args([
            "--virtual-time-budget=3000",
            "--window-size=1100,700",
            &format!("--screenshot={}", shot.display()),
            &url,
        ])
        .output()
        .expect("chromium runs");
    assert!(out.status.success() && shot.exists(), "no screenshot");
    eprintln!("dashboard screenshot: {}", shot.display());
    let _ = std::fs::remove_dir_all(&profile);
}
