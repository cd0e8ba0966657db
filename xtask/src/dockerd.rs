//! A running Docker engine whose networks live in the benchmarking range 198.18.0.0/15.
//!
//! There is no init system on these machines: when no engine answers we start dockerd ourselves,
//! detached, with flags that keep every container address inside 198.18.0.0/16 and make any
//! accidental image pull fail at once (there is no registry access).
use std::{
    fs::OpenOptions,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::cmd;

const LOG_FILE: &str = "/var/log/router-dockerd.log";

pub fn ensure_running() -> anyhow::Result<()> {
    ensure_bpffs()?;
    if !engine_answers() {
        start()?;
    }
    check_bridge_range()?;
    install_guards()
}

fn engine_answers() -> bool {
    cmd::succeeds(cmd::docker(), &["info"])
}

fn start() -> anyhow::Result<()> {
    println!("setup: starting dockerd (log: {LOG_FILE})");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(LOG_FILE)
        .with_context(|| format!("opening {LOG_FILE}; are you root?"))?;
    // setsid --fork: dockerd outlives this command and its terminal, and is not our child.
    // As our child it would stay a zombie after a test stops it (we wait on `cargo test`,
    // not on it), and the engine-restart test would wait for it to exit for ever.
    Command::new("setsid")
        .args([
            "--fork",
            "dockerd",
            "--bip",
            "198.18.0.1/24",
            "--default-address-pool",
            "base=198.18.0.0/16,size=24",
            "--dns",
            "198.18.0.1",
            // Explicit: after a live-restore restart Docker 20.10 resolves `host-gateway` to
            // nothing unless it is given.
            "--host-gateway-ip",
            "198.18.0.1",
            // Containers keep running while the engine restarts: the agent must keep routing
            // to them (and the tests restart the engine to prove it).
            "--live-restore",
        ])
        .env("HTTP_PROXY", "http://127.0.0.1:9")
        .env("HTTPS_PROXY", "http://127.0.0.1:9")
        .env("NO_PROXY", "localhost,127.0.0.0/8,198.18.0.0/15")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("could not start dockerd; is docker.io installed?")?;
    let deadline = Instant::now() + Duration::from_mins(1);
    while !engine_answers() {
        if Instant::now() > deadline {
            bail!("dockerd did not answer within 60 s; see {LOG_FILE}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// The tests and the demo give containers' traffic to addresses in 198.18.0.0/15 only; an engine
/// started with other pools would send it elsewhere.
fn check_bridge_range() -> anyhow::Result<()> {
    let subnet = cmd::output(
        cmd::docker(),
        &[
            "network",
            "inspect",
            "bridge",
            "-f",
            "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
        ],
    )?;
    if !(subnet.starts_with("198.18.") || subnet.starts_with("198.19.")) {
        bail!(
            "the running Docker engine's bridge is {subnet}; the demo and tests need it in \
             198.18.0.0/15. Restart dockerd with `--bip 198.18.0.1/24 --default-address-pool \
             base=198.18.0.0/16,size=24`, or stop it and let `cargo xtask setup` start one."
        );
    }
    Ok(())
}

/// Containers may talk to each other and to this host, never beyond: drop what leaves the range,
/// and make the uncovered rest of the range unreachable instead of routed to a default gateway.
fn install_guards() -> anyhow::Result<()> {
    let rule = [
        "DOCKER-USER",
        "-s",
        "198.18.0.0/15",
        "!",
        "-d",
        "198.18.0.0/15",
        "-j",
        "DROP",
    ];
    let check: Vec<&str> = ["-C"].iter().chain(rule.iter()).copied().collect();
    if !cmd::succeeds("iptables", &check) {
        let insert: Vec<&str> = ["-I"].iter().chain(rule.iter()).copied().collect();
        cmd::run("iptables", &insert)?;
    }
    let routes = cmd::output("ip", &["route", "show", "type", "unreachable"])?;
    if !routes.contains("198.18.0.0/15") {
        cmd::run("ip", &["route", "add", "unreachable", "198.18.0.0/15"])?;
    }
    Ok(())
}

/// The agent pins nothing today, but bpftool and later offload work expect bpffs.
fn ensure_bpffs() -> anyhow::Result<()> {
    if !cmd::succeeds("mountpoint", &["-q", "/sys/fs/bpf"]) {
        cmd::run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    }
    Ok(())
}
