//! `cargo xtask demo`: the seed example end to end, on this machine.
//!
//! Starts the agent on port 80, brings up two `restserver` replicas and a `restclient` with
//! docker-compose, shows what the client printed, and names the replicas that answered.
use std::{
    collections::BTreeSet,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{build, cmd};

const PROJECT: &str = "seed";

pub fn run(seconds: u64) -> anyhow::Result<()> {
    let agent_bin = build::agent()?;
    let compose_file = cmd::workspace_root().join("xtask/demo/docker-compose.yml");
    let compose_file = compose_file.to_str().context("non-UTF-8 path")?.to_owned();
    let compose = |args: &[&str]| {
        let mut all = vec!["-f", compose_file.as_str(), "-p", PROJECT];
        all.extend_from_slice(args);
        cmd::run("docker-compose", &all)
    };
    let agent = AgentProcess(
        Command::new(&agent_bin)
            .env("RUST_LOG", "info")
            .spawn()
            .context("could not start router-agent")?,
    );
    let result = (|| {
        compose(&["up", "-d"])?;
        println!("demo: letting restclient run for {seconds} s");
        std::thread::sleep(Duration::from_secs(seconds));
        let logs = cmd::output(
            "docker-compose",
            &[
                "-f",
                &compose_file,
                "-p",
                PROJECT,
                "logs",
                "--no-color",
                "restclient",
            ],
        )?;
        println!("{logs}");
        summarize(&logs)
    })();
    let down = compose(&["down", "--timeout", "2"]);
    drop(agent);
    result.and(down)
}

/// Prints which containers answered, by the CONTAINERID cookies the router set.
fn summarize(logs: &str) -> anyhow::Result<()> {
    let ids: BTreeSet<&str> = logs
        .lines()
        .filter_map(|line| line.split("Set-Cookie: CONTAINERID=").nth(1))
        .filter_map(|rest| rest.split(';').next())
        .collect();
    println!("demo: restclient was answered by {} replica(s):", ids.len());
    for id in &ids {
        let name = cmd::output(cmd::docker(), &["inspect", "-f", "{{.Name}}", id])
            .unwrap_or_else(|_| "(gone)".into());
        println!("  CONTAINERID={id} {name}");
    }
    if ids.len() < 2 {
        bail!("expected both restserver replicas to answer; see the agent's log above");
    }
    Ok(())
}

/// The agent, stopped (SIGTERM, then waited for) when the demo ends however it ends.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .stdout(Stdio::null())
            .status();
        let _ = self.0.wait();
    }
}
