//! The Docker engine goes away and comes back while the agent runs: routing continues with what
//! is known, and once the engine answers again new containers become routable.
use std::{
    fs::OpenOptions,
    process::{Command, Stdio},
    time::Duration,
};

use tests::{
    agent::Agent,
    client,
    docker::{Container, docker_ok},
    unique, wait_for,
};

/// The running dockerd's command line and environment, to start it again the same way.
struct EngineCommand {
    argv: Vec<String>,
    env: Vec<(String, String)>,
}

/// The one live dockerd of this host. A stopped dockerd whose parent has not reaped it yet
/// lingers as a zombie under the same name; it is not running, so it does not count. Nor do the
/// engines of `cargo xtask cluster up`'s nodes, each in a network namespace of its own.
fn dockerd_pid() -> i32 {
    let out = Command::new("pidof")
        .arg("dockerd")
        .output()
        .expect("pidof");
    let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|pid| pid.parse().expect("pid"))
        .filter(|&pid| is_running(pid) && in_our_netns(pid))
        .collect();
    assert_eq!(pids.len(), 1, "exactly one dockerd runs: {pids:?}");
    pids[0]
}

/// Whether `pid` is a live process: it exists and is not a zombie (state `Z` or `X` in
/// /proc/PID/stat, the field after the parenthesised command name).
fn is_running(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

fn in_our_netns(pid: i32) -> bool {
    let ours = std::fs::read_link("/proc/self/ns/net").expect("our network namespace");
    std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|ns| ns == ours)
}

fn read_nul_separated(path: &str) -> Vec<String> {
    std::fs::read(path)
        .expect("readable /proc entry")
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

impl EngineCommand {
    fn of(pid: i32) -> Self {
        let argv = read_nul_separated(&format!("/proc/{pid}/cmdline"));
        let env = read_nul_separated(&format!("/proc/{pid}/environ"))
            .into_iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect();
        Self { argv, env }
    }

    fn start(&self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open("/var/log/router-dockerd.log")
            .expect("log");
        // --fork: the engine must not be a child of this test binary (see `dockerd_pid`).
        Command::new("setsid")
            .arg("--fork")
            .args(&self.argv)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .status()
            .expect("setsid forks dockerd off and returns");
        wait_for("dockerd to answer again", Duration::from_mins(1), || {
            docker_ok(&["info"])
        });
    }
}

/// Brings the engine back even if the test fails half-way.
struct RestartGuard(Option<EngineCommand>);

impl Drop for RestartGuard {
    fn drop(&mut self) {
        if let Some(engine) = self.0.take()
            && !docker_ok(&["info"])
        {
            engine.start();
        }
    }
}

#[test]
#[ignore = "end-to-end: needs root, dockerd and the agent; run with `cargo xtask test`"]
fn routing_survives_an_engine_restart_and_new_containers_are_found_after_it() {
    let before = format!("{}.local", unique("before"));
    let after = format!("{}.local", unique("after"));
    let agent = Agent::start(&[]);
    let old = Container::backend(
        &unique("before"),
        &[&format!("aliyun.routing.port_80={before}")],
    );
    agent.wait_up(&before, &[&old.id], Duration::from_secs(15));

    let pid = dockerd_pid();
    let mut guard = RestartGuard(Some(EngineCommand::of(pid)));
    // SAFETY: kill(2) with a pid read from pidof; at worst it fails.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_for("dockerd to exit", Duration::from_secs(30), || {
        !is_running(pid)
    });
    wait_for("the agent to notice", Duration::from_secs(10), || {
        agent.json("/healthz")["engine_connected"] == false
    });

    // The engine is gone (live-restore keeps the container running): routing goes on.
    for _ in 0..5 {
        let response = client::get(agent.http_addr(), &before, "/", &[]).expect("request");
        assert_eq!(response.status, 200, "routing continues without the engine");
        assert_eq!(response.backend(), Some(old.short_id()));
    }

    guard.0.take().expect("engine command").start();
    wait_for("the agent to reconnect", Duration::from_secs(20), || {
        agent.json("/healthz")["engine_connected"] == true
    });
    let new = Container::backend(
        &unique("after"),
        &[&format!("aliyun.routing.port_80={after}")],
    );
    agent.wait_up(&after, &[&new.id], Duration::from_secs(15));
    let response = client::get(agent.http_addr(), &after, "/", &[]).expect("request");
    assert_eq!(response.status, 200);
    assert_eq!(response.backend(), Some(new.short_id()));
    // What was known before the restart is still routed after the resync.
    assert_eq!(agent.state_of(&before, &old.id).as_deref(), Some("up"));
}
