//! The real `router-agent` binary, started per test on free ports, stopped on drop. Its log
//! goes to `target/test-logs/` and is printed when a test fails.
//!
//! Socket-level balancing stays inside the tests: every agent attaches it to
//! [`TEST_CGROUP`] (only client containers started with `--cgroup-parent` there are covered,
//! never other containers of the shared engine) and pins under a directory of its own, which
//! `router-agent uninstall` removes when the agent is dropped (unless a successor took it).
use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{client, unique, wait_for};

pub struct Agent {
    child: Child,
    /// The HTTP listener, on every address (clients in containers use the bridge gateway), or
    /// on `ip` alone for an agent from [`Agent::start_private`].
    pub port: u16,
    /// The address this host's clients reach the agent's listeners on (`127.0.0.1`, or the
    /// agent's own loopback address).
    pub ip: Ipv4Addr,
    pub admin: SocketAddr,
    pub log_path: PathBuf,
    /// Where its socket-level balancing pins programs and maps.
    pub pin_path: PathBuf,
    /// Whether dropping it uninstalls what is pinned there (not once a successor took over).
    owns_pins: bool,
    /// Its `--state-dir` (overrides, admin token): one of its own unless the test gave one.
    pub state_dir: PathBuf,
}

/// The cgroup (under the cgroup2 mount) the tests' agents attach socket-level balancing to;
/// client containers join it with `--cgroup-parent /router-socket-lb-tests`.
pub const TEST_CGROUP: &str = "router-socket-lb-tests";

/// The cgroup2 directory of [`TEST_CGROUP`] (the agent creates it).
pub fn test_cgroup_path() -> PathBuf {
    let hybrid = PathBuf::from("/sys/fs/cgroup/unified");
    let mount = if hybrid.join("cgroup.procs").exists() {
        hybrid
    } else {
        PathBuf::from("/sys/fs/cgroup")
    };
    mount.join(TEST_CGROUP)
}

/// A pin directory of its own for a new agent.
fn new_pin_path() -> PathBuf {
    PathBuf::from("/sys/fs/bpf").join(unique("router-test"))
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The agent binary under test (`ROUTER_AGENT_BIN`, set by `cargo xtask test`).
pub fn agent_binary() -> PathBuf {
    std::env::var_os("ROUTER_AGENT_BIN").map_or_else(
        || workspace_root().join("target/release/router-agent"),
        PathBuf::from,
    )
}

/// A port nothing listens on, below the kernel's ephemeral range (32768 and up), so that no
/// outgoing connection of this machine can take it between now and the agent binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = 20_000 + (std::process::id() % 500) as u16 * 20;
    for _ in 0..10_000 {
        let port = 20_000 + (start - 20_000 + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}

/// A loopback address of this test process's own: `127.x.y.z` from its process id (ids are
/// below 2^22, and 127.0.0.1 is process 1, never a test).
fn private_loopback() -> Ipv4Addr {
    let [_, x, y, z] = std::process::id().to_be_bytes();
    Ipv4Addr::new(127, x, y, z)
}

/// Writes a TOML configuration file for one agent and returns its path.
pub fn config_file(toml: &str) -> PathBuf {
    let dir = workspace_root().join("target/test-configs");
    std::fs::create_dir_all(&dir).expect("config dir");
    let path = dir.join(format!("{}.toml", unique("router")));
    std::fs::write(&path, toml).expect("config file");
    path
}

impl Agent {
    /// Starts the agent on a free HTTP port and a free admin port, with extra flags, and waits
    /// until it has synced with the Docker engine.
    pub fn start(extra_args: &[&str]) -> Self {
        Self::start_with_prefix(&[], extra_args)
    }

    /// Like [`Agent::start`], but every listener of the agent (HTTP and `tcp://` routes) binds
    /// only a loopback address of its own (`127.x.y.z` from the test's process id).
    ///
    /// Every agent on this machine sees every labelled container of the shared Docker engine,
    /// also those of tests running in parallel from other checkouts, and opens their `tcp://`
    /// route ports with `SO_REUSEPORT`: on `0.0.0.0` two agents would share each other's
    /// connections. A listener on a specific address wins the kernel's lookup over wildcard
    /// ones, so clients of this agent reach only this agent, and it takes no one else's.
    pub fn start_private(extra_args: &[&str]) -> Self {
        let ip = private_loopback();
        let port = free_port();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Self::launch(
            SocketAddr::from((ip, port)),
            admin,
            new_pin_path(),
            &[],
            extra_args,
        )
    }

    /// Like [`Agent::start`], with this TOML configuration.
    pub fn start_with_config(toml: &str, extra_args: &[&str]) -> Self {
        let config = config_file(toml);
        let mut args = vec!["--config", config.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra_args);
        Self::start(&args)
    }

    /// Like [`Agent::start`], run through a wrapper command (e.g. `setpriv ... --`).
    pub fn start_with_prefix(wrapper: &[&str], extra_args: &[&str]) -> Self {
        let port = free_port();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Self::start_on(port, admin, wrapper, extra_args)
    }

    /// Starts an agent on these ports (a successor of an agent that is stopping, say).
    pub fn start_on(port: u16, admin: SocketAddr, wrapper: &[&str], extra_args: &[&str]) -> Self {
        Self::start_with_pins(port, admin, new_pin_path(), wrapper, extra_args)
    }

    /// Gives up this agent's pins to a successor: dropping it no longer uninstalls them.
    pub fn release_pins(&mut self) -> PathBuf {
        self.owns_pins = false;
        self.pin_path.clone()
    }

    /// Starts an agent on these ports that pins under `pin_path` (a successor that adopts its
    /// predecessor's kernel programs, from [`Agent::release_pins`]).
    pub fn start_with_pins(
        port: u16,
        admin: SocketAddr,
        pin_path: PathBuf,
        wrapper: &[&str],
        extra_args: &[&str],
    ) -> Self {
        Self::launch(
            SocketAddr::from(([0, 0, 0, 0], port)),
            admin,
            pin_path,
            wrapper,
            extra_args,
        )
    }

    fn launch(
        listen: SocketAddr,
        admin: SocketAddr,
        pin_path: PathBuf,
        wrapper: &[&str],
        extra_args: &[&str],
    ) -> Self {
        let log_dir = workspace_root().join("target/test-logs");
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let log_path = log_dir.join(format!("{}.log", unique("agent")));
        let log = File::create(&log_path).expect("log file");
        let binary = agent_binary();
        // A state directory of its own (overrides, admin token), so that agents of parallel
        // tests never share overrides; a test's own `--state-dir` wins over the variable.
        let state_dir = extra_args
            .iter()
            .position(|a| *a == "--state-dir")
            .and_then(|i| extra_args.get(i + 1))
            .map_or_else(
                || {
                    workspace_root()
                        .join("target/test-state")
                        .join(unique("agent"))
                },
                PathBuf::from,
            );
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        let child = command
            .args([
                "--listen",
                &listen.to_string(),
                "--admin",
                &admin.to_string(),
            ])
            .args(extra_args)
            .env("RUST_LOG", "info,router_agent=debug")
            .env("ROUTER_CGROUP_PATH", test_cgroup_path())
            .env("ROUTER_PIN_PATH", &pin_path)
            .env("ROUTER_STATE_DIR", &state_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {} failed: {e} (run `cargo xtask test`)",
                    binary.display()
                )
            });
        let ip = match listen.ip() {
            std::net::IpAddr::V4(ip) if !ip.is_unspecified() => ip,
            _ => Ipv4Addr::LOCALHOST,
        };
        let agent = Self {
            child,
            port: listen.port(),
            ip,
            admin,
            log_path,
            pin_path,
            owns_pins: true,
            state_dir,
        };
        wait_for(
            "the agent to connect to the Docker engine",
            Duration::from_secs(20),
            || {
                agent
                    .try_json("/healthz")
                    .is_some_and(|h| h["engine_connected"] == true)
            },
        );
        agent
    }

    /// The HTTP listener as reached from this host.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }

    fn try_json(&self, path: &str) -> Option<Value> {
        let response = client::get(self.admin, "localhost", path, &[]).ok()?;
        (response.status == 200).then(|| serde_json::from_slice(&response.body).ok())?
    }

    /// `/healthz`: its HTTP status (200 only while serving normally) and body.
    pub fn health(&self) -> Option<(u16, Value)> {
        let response = client::get(self.admin, "localhost", "/healthz", &[]).ok()?;
        Some((
            response.status,
            serde_json::from_slice(&response.body).ok()?,
        ))
    }

    pub fn json(&self, path: &str) -> Value {
        self.try_json(path)
            .unwrap_or_else(|| panic!("admin API {path} did not answer; log:\n{}", self.log()))
    }

    /// The `/api/routes` entry for a domain and path.
    pub fn route(&self, domain: &str, path: &str) -> Option<Value> {
        self.json("/api/routes")["routes"]
            .as_array()?
            .iter()
            .find(|r| r["domain"] == domain && r["path"] == path)
            .cloned()
    }

    /// `(container_id, state)` of every backend of a route.
    pub fn backend_states(&self, domain: &str) -> Vec<(String, String)> {
        self.route(domain, "/")
            .and_then(|r| r["backends"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|b| {
                (
                    b["container_id"].as_str().unwrap_or_default().to_owned(),
                    b["state"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    pub fn state_of(&self, domain: &str, container_id: &str) -> Option<String> {
        self.backend_states(domain)
            .into_iter()
            .find(|(id, _)| id == container_id)
            .map(|(_, state)| state)
    }

    /// Waits until exactly these containers are `up` behind the domain.
    pub fn wait_up(&self, domain: &str, ids: &[&str], timeout: Duration) {
        wait_for(&format!("{ids:?} up behind {domain}"), timeout, || {
            let up: Vec<String> = self
                .backend_states(domain)
                .into_iter()
                .filter(|(_, s)| s == "up")
                .map(|(id, _)| id)
                .collect();
            up.len() == ids.len() && ids.iter().all(|id| up.iter().any(|u| u == id))
        });
    }

    /// The container as `/api/containers` shows it.
    pub fn container(&self, id: &str) -> Option<Value> {
        self.json("/api/containers")["containers"]
            .as_array()?
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
    }

    /// A value from `/metrics` (the exact series name, labels included).
    pub fn metric(&self, series: &str) -> Option<u64> {
        let response = client::get(self.admin, "localhost", "/metrics", &[]).ok()?;
        String::from_utf8_lossy(&response.body)
            .lines()
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name == series).then(|| value.parse().ok())?
            })
    }

    /// Waits until no client connection is open (so every counter of finished work is final).
    pub fn wait_idle(&self) {
        wait_for("no open client connection", Duration::from_secs(10), || {
            self.metric("router_connections_active") == Some(0)
        });
    }

    /// Runs `router-agent ctl <args>` against this agent (its admin address and token);
    /// returns (success, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(agent_binary())
            .arg("ctl")
            .args(args)
            .arg("--admin")
            .arg(self.admin.to_string())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .expect("router-agent ctl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Like [`Agent::ctl`], panicking with the output unless it succeeds; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.ctl(args);
        assert!(ok, "router-agent ctl {args:?} failed:\n{stdout}{stderr}");
        stdout
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open file descriptors of the agent process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, Iterator::count)
    }

    /// Sends SIGTERM and waits for the exit status (or panics after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the agent did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; at worst it fails with ESRCH.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.owns_pins {
            uninstall(&self.pin_path);
        }
        if std::thread::panicking() {
            eprintln!(
                "---- router-agent log ({}) ----\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// `router-agent uninstall` for a pin directory: detaches the programs pinned there and removes
/// the pins (nothing to do for an agent that could not load them).
pub fn uninstall(pin_path: &std::path::Path) {
    let out = Command::new(agent_binary())
        .arg("uninstall")
        .arg("--pin-path")
        .arg(pin_path)
        .output();
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "router-agent uninstall --pin-path {} failed: {}",
            pin_path.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("could not run router-agent uninstall: {e}"),
    }
}
