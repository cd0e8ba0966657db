//! The benchmark's containers: two nginx replicas serving the fixed-size bodies, and the test
//! backend as a TCP echo (a `tcp://` route) and a WebSocket echo (a `ws://` route) for the
//! tunnel scenarios, all labeled for the router under domains unique to this run.
//!
//! They are removed when [`Backends`] is dropped (normal end or error), and by a detached
//! watchdog shell when this process dies without unwinding (Ctrl-C, kill).
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::system;
use crate::{cmd, images};

/// Label that marks every container of one bench run (value: the xtask pid).
const RUN_LABEL: &str = "router.bench";
/// The test backend's raw TCP echo port.
const ECHO_PORT: u16 = 7000;
/// The test backend's whoami port (reads a line, answers, closes first).
const WHOAMI_PORT: u16 = 7003;
/// The test backend's HTTP port (its WebSocket echo is `GET /ws` there).
const HTTP_PORT: u16 = 80;

pub struct Container {
    pub id: String,
    pub ip: Ipv4Addr,
}

pub struct Backends {
    run: String,
    /// Host header and routing label of the HTTP replicas.
    pub domain: String,
    /// Domain of the echo's `tcp://` route.
    pub tunnel_domain: String,
    /// Domain of the whoami's `tcp://` route (same container).
    pub whoami_domain: String,
    /// Domain of the echo's `ws://` route (Host of the WebSocket handshake).
    pub ws_domain: String,
    pub replicas: Vec<Container>,
    pub echo: Option<Echo>,
    created: Vec<String>,
}

pub struct Echo {
    pub container: Container,
    /// The port the router listens on for the echo's `tcp://` route (127.0.0.1).
    pub router_port: u16,
    /// The port of the whoami's `tcp://` route.
    pub whoami_router_port: u16,
}

impl Echo {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.container.ip, ECHO_PORT))
    }

    pub fn whoami_addr(&self) -> SocketAddr {
        SocketAddr::from((self.container.ip, WHOAMI_PORT))
    }

    /// The backend's own HTTP listener, where `GET /ws` upgrades.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from((self.container.ip, HTTP_PORT))
    }
}

impl Backends {
    /// `pid_file` lists the contender processes running now; the watchdog stops them too.
    pub fn new(pid_file: &Path) -> anyhow::Result<Self> {
        let run = std::process::id().to_string();
        start_watchdog(&run, pid_file)?;
        Ok(Self {
            domain: format!("bench-{run}.local"),
            tunnel_domain: format!("bench-{run}-tunnel.local"),
            whoami_domain: format!("bench-{run}-whoami.local"),
            ws_domain: format!("bench-{run}-ws.local"),
            run,
            replicas: Vec::new(),
            echo: None,
            created: Vec::new(),
        })
    }

    /// Starts the two nginx replicas (once).
    pub fn start_replicas(&mut self) -> anyhow::Result<()> {
        if !self.replicas.is_empty() {
            return Ok(());
        }
        for i in 1..=2 {
            let name = format!("bench-{}-nginx-{i}", self.run);
            let label = format!("aliyun.routing.port_80={}", self.domain);
            let container = self.start(&name, &images::pinned(images::NGINX), &[&label])?;
            wait_ready(SocketAddr::from((container.ip, 80)), &name)?;
            self.replicas.push(container);
        }
        Ok(())
    }

    /// Starts the test backend with `tcp://` routes to its echo and its whoami, each on a free
    /// router port (once).
    pub fn start_echo(&mut self) -> anyhow::Result<&Echo> {
        if self.echo.is_none() {
            let router_port = system::free_port()?;
            let whoami_router_port = system::free_port()?;
            let name = format!("bench-{}-echo", self.run);
            let tcp_label = format!(
                "aliyun.routing.port_{ECHO_PORT}=tcp://{}:{router_port}",
                self.tunnel_domain
            );
            let ws_label = format!("aliyun.routing.port_{HTTP_PORT}=ws://{}", self.ws_domain);
            let whoami_label = format!(
                "aliyun.routing.port_{WHOAMI_PORT}=tcp://{}:{whoami_router_port}",
                self.whoami_domain
            );
            // This checkout's backend: the whoami listener is newer than some images around.
            let container = self.start(
                &name,
                &images::pinned(images::BACKEND),
                &[&tcp_label, &whoami_label, &ws_label],
            )?;
            wait_ready(SocketAddr::from((container.ip, ECHO_PORT)), &name)?;
            wait_ready(SocketAddr::from((container.ip, WHOAMI_PORT)), &name)?;
            wait_ready(SocketAddr::from((container.ip, HTTP_PORT)), &name)?;
            self.echo = Some(Echo {
                container,
                router_port,
                whoami_router_port,
            });
        }
        self.echo.as_ref().context("echo container")
    }

    fn start(
        &mut self,
        name: &str,
        image: &str,
        route_labels: &[&str],
    ) -> anyhow::Result<Container> {
        let run_label = format!("{RUN_LABEL}={}", self.run);
        let mut args = vec!["run", "-d", "--name", name, "--label", &run_label];
        for label in route_labels {
            args.extend_from_slice(&["--label", label]);
        }
        args.push(image);
        let id = cmd::output(cmd::docker(), &args)
            .with_context(|| format!("starting container {name} from {image}"))?;
        self.created.push(id.clone());
        let ips = cmd::output(
            cmd::docker(),
            &[
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                &id,
            ],
        )?;
        let ip: Ipv4Addr = ips
            .split_whitespace()
            .next()
            .and_then(|ip| ip.parse().ok())
            .with_context(|| format!("container {name} has no IPv4 address (`{ips}`)"))?;
        system::check_container_ip(ip)?;
        Ok(Container { id, ip })
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        if self.created.is_empty() {
            return;
        }
        let mut args = vec!["rm", "-f"];
        args.extend(self.created.iter().map(String::as_str));
        if let Err(e) = cmd::output(cmd::docker(), &args) {
            eprintln!(
                "bench: removing containers failed ({e:#}); remove them with \
                 `docker rm -f $(docker ps -aq --filter label={RUN_LABEL}={})`",
                self.run
            );
        }
    }
}

fn wait_ready(addr: SocketAddr, name: &str) -> anyhow::Result<()> {
    if !system::wait_listening(addr, Duration::from_secs(20)) {
        bail!(
            "container {name} does not accept connections on {addr} after 20 s; see `docker logs {name}`"
        );
    }
    Ok(())
}

/// A detached shell that, once this process is gone however it ended, stops the contender that
/// was running (by the pids in `pid_file`) and removes this run's containers. It lives in its
/// own session, so Ctrl-C in the terminal does not reach it.
fn start_watchdog(run: &str, pid_file: &Path) -> anyhow::Result<()> {
    let docker = cmd::docker();
    let pid_file = pid_file.to_str().context("non-UTF-8 results path")?;
    let script = format!(
        "while kill -0 {run} 2>/dev/null; do sleep 1; done; \
         for pid in $(cat '{pid_file}' 2>/dev/null); do kill -TERM \"$pid\" 2>/dev/null; done; \
         ids=$({docker} ps -aq --filter label={RUN_LABEL}={run}); \
         [ -z \"$ids\" ] || {docker} rm -f $ids"
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("could not start the cleanup watchdog (setsid sh)")?;
    Ok(())
}
