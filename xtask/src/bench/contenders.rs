//! The contenders: what answers wrk on 127.0.0.1 (or, for `direct`, a backend itself), each
//! started fresh for one measured run and stopped after it, one at a time.
//!
//! - `direct`: no proxy; wrk talks to one nginx replica (the physical limit).
//! - `haproxy`: Debian's `HAProxy` 2.6 configured as acsrouting was (Host ACL, inserted
//!   `CONTAINERID` cookie, `option splice-auto`).
//! - `nginx`: the host's nginx as a reverse proxy with a keep-alive upstream.
//! - `router-<mode>`: this workspace's release agent with `--datapath <mode>`.
//! - `router-splice-pipe-<size>`: the agent with `--datapath splice` and `pipe_size_bytes` set
//!   in its TOML file (`--pipe-sweep`).
//! - `router-socket-lb`: the agent with socket-level balancing attached to the bench's cgroup
//!   (`tcp-*` scenarios): the client's connects go straight to the backend.
//!
//! Every other router runs with `--socket-lb off`: socket-level balancing would otherwise
//! attach to Docker's cgroup, where the shared engine's other containers live.
use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use serde_json::Value;

use super::{backends::Backends, system};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contender {
    Direct,
    Haproxy,
    Nginx,
    Router(Datapath),
    /// `--datapath splice` with pipes of this many KiB.
    RouterPipe(u32),
    /// Socket-level balancing of the tcp route (userspace serves only what it does not cover).
    RouterSocketLb,
    /// `--datapath auto` with the access log written to a file (every other router runs with
    /// `--access-log off`): the cost of logging every request.
    RouterAccessLog,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datapath {
    Copy,
    Splice,
    Sockmap,
    Auto,
}

impl Datapath {
    fn flag(self) -> &'static str {
        match self {
            Datapath::Copy => "copy",
            Datapath::Splice => "splice",
            Datapath::Sockmap => "sockmap",
            Datapath::Auto => "auto",
        }
    }
}

impl Contender {
    pub fn name(self) -> String {
        match self {
            Contender::Direct => "direct".into(),
            Contender::Haproxy => "haproxy".into(),
            Contender::Nginx => "nginx".into(),
            Contender::Router(mode) => format!("router-{}", mode.flag()),
            Contender::RouterPipe(kib) => format!("router-splice-pipe-{}", size_name(kib)),
            Contender::RouterSocketLb => "router-socket-lb".into(),
            Contender::RouterAccessLog => "router-accesslog".into(),
        }
    }

    pub fn is_router(self) -> bool {
        matches!(
            self,
            Contender::Router(_)
                | Contender::RouterPipe(_)
                | Contender::RouterSocketLb
                | Contender::RouterAccessLog
        )
    }
}

/// `64k`, `1m`: a size in KiB as the sweeps name it.
pub fn size_name(kib: u32) -> String {
    if kib >= 1024 && kib.is_multiple_of(1024) {
        format!("{}m", kib / 1024)
    } else {
        format!("{kib}k")
    }
}

/// What the contender forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    /// A `tcp://` route to the echo.
    Tunnel,
    /// A `tcp://` route to the whoami (one short exchange per connection).
    Whoami,
    /// A WebSocket upgrade through the HTTP listener, then a tunnel.
    WebSocket,
}

/// Byte counters of the router's data path (`/api/routes` → `datapath`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DatapathCounters {
    pub copied: f64,
    pub spliced: f64,
    pub kernel: f64,
}

impl DatapathCounters {
    pub fn since(self, earlier: Self) -> Self {
        Self {
            copied: self.copied - earlier.copied,
            spliced: self.spliced - earlier.spliced,
            kernel: self.kernel - earlier.kernel,
        }
    }
}

/// Where the contenders find their programs and write their files.
pub struct Setup<'a> {
    pub backends: &'a Backends,
    /// Scratch directory for configurations and logs (`results/tmp`).
    pub tmp: &'a Path,
    pub agent: &'a Path,
    /// How to enable nginx's stream module, or why it cannot be.
    pub nginx_stream: &'a Result<String, String>,
    /// A command that runs each proxy (`valgrind --tool=callgrind ...` for `cargo xtask
    /// profile`); empty for the benchmark.
    pub wrapper: &'a [String],
    /// How long a contender may take to start answering.
    pub startup_timeout: Duration,
    /// The cgroup the load generator runs in, where `router-socket-lb` attaches; `None` when
    /// the bench could not make one.
    pub socket_lb_cgroup: Option<&'a Path>,
}

/// The file that names the running contender's pid, for the cleanup watchdog.
pub fn pid_file(tmp: &Path) -> PathBuf {
    tmp.join("contender.pid")
}

/// A started contender; stopped when dropped.
pub struct Running {
    /// Where wrk or the tunnel client connects.
    pub target: SocketAddr,
    child: Option<Child>,
    admin: Option<SocketAddr>,
    log: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    /// For `router-socket-lb`: the agent binary and the pin directory it uninstalls after.
    uninstall: Option<(PathBuf, PathBuf)>,
    /// The domain of the tcp route whose kernel counters `kernel_connects` reads.
    route_domain: Option<String>,
}

impl Running {
    /// CPU seconds the proxy's processes used so far; `None` for `direct`.
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.child
            .as_ref()
            .and_then(|c| system::cpu_seconds_tree(c.id()))
    }

    /// Connects of the benchmark's tcp route that the kernel balanced so far (socket-level
    /// balancing); `None` for other contenders.
    pub fn kernel_connects(&self) -> anyhow::Result<Option<u64>> {
        let (Some(admin), Some(domain), Some(_)) =
            (self.admin, &self.route_domain, &self.uninstall)
        else {
            return Ok(None);
        };
        let routes = admin_routes(admin)?;
        Ok(kernel_field(&routes, domain, "connects")
            .and_then(Value::as_f64)
            .map(|n| n as u64))
    }
    /// The proxy's process id; `None` for `direct`.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Peak RSS of the proxy's processes (`VmHWM`, workers included); `None` for `direct`.
    pub fn peak_rss(&self) -> Option<u64> {
        self.child
            .as_ref()
            .and_then(|c| system::peak_rss_tree(c.id()))
    }

    /// The router's data path counters; `None` for other contenders.
    pub fn counters(&self) -> anyhow::Result<Option<DatapathCounters>> {
        let Some(admin) = self.admin else {
            return Ok(None);
        };
        let routes = admin_routes(admin)?;
        let datapath = routes
            .get("datapath")
            .context("no `datapath` in /api/routes")?;
        let counter = |key: &str| datapath.get(key).and_then(Value::as_f64);
        Ok(Some(DatapathCounters {
            copied: counter("bytes_copied").unwrap_or(0.0),
            spliced: counter("bytes_spliced").unwrap_or(0.0),
            kernel: counter("bytes_kernel").unwrap_or(0.0),
        }))
    }

    /// Fails, with the end of the contender's log, if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            bail!("exited ({status}){}", log_tail(self.log.as_deref()));
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            system::stop(child, "TERM", Duration::from_secs(5));
        }
        if let Some(pid_file) = &self.pid_file {
            let _ = fs::remove_file(pid_file);
        }
        if let Some((agent, pins)) = &self.uninstall {
            let done = Command::new(agent)
                .arg("uninstall")
                .arg("--pin-path")
                .arg(pins)
                .stdout(Stdio::null())
                .status();
            if !done.is_ok_and(|s| s.success()) {
                eprintln!(
                    "bench: `{} uninstall --pin-path {}` failed; run it by hand",
                    agent.display(),
                    pins.display()
                );
            }
        }
    }
}

pub fn start(
    contender: Contender,
    protocol: Protocol,
    setup: &Setup<'_>,
) -> anyhow::Result<Running> {
    let backends = setup.backends;
    match contender {
        Contender::Direct => Ok(Running {
            target: match protocol {
                Protocol::Http => {
                    let replica = backends.replicas.first().context("no nginx replica")?;
                    SocketAddr::from((replica.ip, 80))
                }
                Protocol::Tunnel => backends.echo.as_ref().context("no echo container")?.addr(),
                Protocol::Whoami => backends
                    .echo
                    .as_ref()
                    .context("no echo container")?
                    .whoami_addr(),
                Protocol::WebSocket => backends
                    .echo
                    .as_ref()
                    .context("no echo container")?
                    .http_addr(),
            },
            child: None,
            admin: None,
            log: None,
            pid_file: None,
            uninstall: None,
            route_domain: None,
        }),
        Contender::Haproxy => start_haproxy(protocol, setup),
        Contender::Nginx => start_nginx(protocol, setup),
        Contender::Router(mode) => start_router(mode, None, false, false, protocol, setup),
        Contender::RouterPipe(kib) => {
            start_router(Datapath::Splice, Some(kib), false, false, protocol, setup)
        }
        // Splice serves whatever the kernel leaves to userspace (nothing, here).
        Contender::RouterSocketLb => {
            start_router(Datapath::Splice, None, true, false, protocol, setup)
        }
        Contender::RouterAccessLog => {
            start_router(Datapath::Auto, None, false, true, protocol, setup)
        }
    }
}

/// `command` run by `wrapper` (its program and arguments become the wrapper's last arguments),
/// or `command` itself when there is no wrapper.
fn wrapped(command: Command, wrapper: &[String]) -> Command {
    let Some((program, wrapper_args)) = wrapper.split_first() else {
        return command;
    };
    let mut outer = Command::new(program);
    outer
        .args(wrapper_args)
        .arg(command.get_program())
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => outer.env(key, value),
            None => outer.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        outer.current_dir(dir);
    }
    outer
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Spawns `command` (under `setup.wrapper`, if any) with its output in `log`, then waits for
/// `target` to accept connections.
fn spawn(
    command: Command,
    log: PathBuf,
    target: SocketAddr,
    what: &str,
    setup: &Setup<'_>,
) -> anyhow::Result<Running> {
    let mut command = wrapped(command, setup.wrapper);
    let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("could not start {what}; `cargo xtask setup` installs it"))?;
    let pid_file = pid_file(log.parent().context("log path has a parent")?);
    fs::write(&pid_file, child.id().to_string())
        .with_context(|| format!("writing {}", pid_file.display()))?;
    let mut running = Running {
        target,
        child: Some(child),
        admin: None,
        log: Some(log),
        pid_file: Some(pid_file),
        uninstall: None,
        route_domain: None,
    };
    let deadline = Instant::now() + setup.startup_timeout;
    loop {
        running
            .check_alive()
            .with_context(|| format!("{what} did not start"))?;
        if TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok() {
            return Ok(running);
        }
        if Instant::now() > deadline {
            bail!(
                "{what} does not listen on {target} after {:?}{}",
                setup.startup_timeout,
                log_tail(running.log.as_deref())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_haproxy(protocol: Protocol, setup: &Setup<'_>) -> anyhow::Result<Running> {
    let port = system::free_port()?;
    let config = haproxy_config(protocol, port, setup.backends)?;
    let path = setup.tmp.join("haproxy.cfg");
    fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    let mut command = Command::new("/usr/sbin/haproxy");
    command.arg("-db").arg("-f").arg(&path);
    spawn(
        command,
        setup.tmp.join("haproxy.log"),
        loopback(port),
        "haproxy",
        setup,
    )
}

/// `HAProxy` as acsrouting configured it: HTTP mode, Host ACLs, sticky cookie, splice-auto.
fn haproxy_config(protocol: Protocol, port: u16, backends: &Backends) -> anyhow::Result<String> {
    let mut cfg = format!(
        "global\n    nbthread 2\n    maxconn {}\n\n\
         defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n    \
         timeout server 60s\n\n",
        haproxy_maxconn()
    );
    match protocol {
        Protocol::Http => {
            let domain = &backends.domain;
            let _ = write!(
                cfg,
                "frontend bench_http\n    bind 127.0.0.1:{port}\n    \
                 acl host_bench hdr(host) -i {domain}\n    use_backend bench_servers if host_bench\n\n\
                 backend bench_servers\n    balance roundrobin\n    \
                 cookie CONTAINERID insert indirect nocache\n    option splice-auto\n    \
                 option http-keep-alive\n"
            );
            if backends.replicas.is_empty() {
                bail!("no nginx replicas to configure HAProxy with");
            }
            for (i, replica) in backends.replicas.iter().enumerate() {
                let _ = writeln!(
                    cfg,
                    "    server s{} {}:80 cookie {}",
                    i + 1,
                    replica.ip,
                    replica.id
                );
            }
        }
        Protocol::Tunnel | Protocol::Whoami => {
            let echo = backends.echo.as_ref().context("no echo container")?;
            let server = if protocol == Protocol::Tunnel {
                echo.addr()
            } else {
                echo.whoami_addr()
            };
            let _ = write!(
                cfg,
                "frontend bench_tunnel\n    mode tcp\n    bind 127.0.0.1:{port}\n    \
                 option splice-auto\n    default_backend bench_echo\n\n\
                 backend bench_echo\n    mode tcp\n    option splice-auto\n    server echo {server}\n"
            );
        }
        Protocol::WebSocket => {
            // HTTP mode passes the upgrade on and tunnels after the 101, as acsrouting did.
            let echo = backends.echo.as_ref().context("no echo container")?;
            let _ = write!(
                cfg,
                "frontend bench_ws\n    bind 127.0.0.1:{port}\n    default_backend bench_ws\n\n\
                 backend bench_ws\n    option splice-auto\n    server echo {}\n",
                echo.http_addr()
            );
        }
    }
    Ok(cfg)
}

/// `maxconn 20000` as acsrouting had, unless the open-files limit is too low for it: `HAProxy`
/// needs about two descriptors per connection (plus its own) and refuses to start without them.
pub fn haproxy_maxconn() -> u64 {
    system::open_files_hard_limit().map_or(HAPROXY_MAXCONN, |limit| {
        HAPROXY_MAXCONN.min(limit.saturating_sub(1000) / 3)
    })
}

const HAPROXY_MAXCONN: u64 = 20_000;

fn start_nginx(protocol: Protocol, setup: &Setup<'_>) -> anyhow::Result<Running> {
    let prefix = setup.tmp.join("nginx");
    fs::create_dir_all(&prefix).with_context(|| format!("creating {}", prefix.display()))?;
    let port = system::free_port()?;
    let config = nginx_config(protocol, port, &prefix, setup)?;
    let conf = prefix.join("nginx.conf");
    fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
    let mut command = Command::new("/usr/sbin/nginx");
    command
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(prefix.join("error.log"));
    spawn(
        command,
        setup.tmp.join("nginx.log"),
        loopback(port),
        "nginx",
        setup,
    )
}

/// nginx as a reverse proxy: `worker_processes 2`, a keep-alive upstream of both replicas, and
/// the Host header routed by `server_name` (anything else gets 404, like `HAProxy`'s ACL).
fn nginx_config(
    protocol: Protocol,
    port: u16,
    prefix: &Path,
    setup: &Setup<'_>,
) -> anyhow::Result<String> {
    let prefix = prefix.to_str().context("non-UTF-8 results path")?;
    let backends = setup.backends;
    let load_module = match (protocol, setup.nginx_stream) {
        (Protocol::Tunnel | Protocol::Whoami, Ok(line)) => line.as_str(),
        (Protocol::Tunnel | Protocol::Whoami, Err(reason)) => {
            bail!("nginx cannot proxy raw TCP here: {reason}")
        }
        (Protocol::WebSocket, _) => bail!("nginx is not configured for WebSocket here"),
        (Protocol::Http, _) => "",
    };
    let nofile = system::open_files_hard_limit().unwrap_or(65536);
    let connections = nofile / 2;
    let mut cfg = format!(
        "{load_module}\ndaemon off;\nmaster_process on;\nuser root;\nworker_processes 2;\n\
         worker_rlimit_nofile {nofile};\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n\
         events {{ worker_connections {connections}; }}\n"
    );
    match protocol {
        Protocol::Http => {
            let servers = backends.replicas.iter().fold(String::new(), |mut out, r| {
                let _ = writeln!(out, "        server {}:80;", r.ip);
                out
            });
            let domain = &backends.domain;
            let _ = write!(
                cfg,
                "http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream bench_servers {{
{servers}        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} default_server;
        return 404;
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name {domain};
        location / {{
            proxy_pass http://bench_servers;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $host;
        }}
    }}
}}
"
            );
        }
        Protocol::Tunnel | Protocol::Whoami => {
            let echo = backends.echo.as_ref().context("no echo container")?;
            let server = if protocol == Protocol::Tunnel {
                echo.addr()
            } else {
                echo.whoami_addr()
            };
            let _ = write!(
                cfg,
                "stream {{\n    upstream bench_echo {{ server {server}; }}\n    server {{\n        \
                 listen 127.0.0.1:{port};\n        proxy_pass bench_echo;\n    }}\n}}\n"
            );
        }
        Protocol::WebSocket => unreachable!("refused above"),
    }
    Ok(cfg)
}

/// Whether this nginx can proxy raw TCP: `Ok(load_module line, maybe empty)` or `Err(reason)`.
pub fn nginx_stream_support() -> Result<String, String> {
    let out = Command::new("/usr/sbin/nginx")
        .arg("-V")
        .output()
        .map_err(|e| format!("cannot run /usr/sbin/nginx -V: {e}"))?;
    // nginx -V prints to stderr.
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.contains(&"--with-stream") {
        return Ok(String::new());
    }
    if words.contains(&"--with-stream=dynamic") {
        let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
        if Path::new(module).exists() {
            return Ok(format!("load_module {module};"));
        }
        return Err(format!(
            "its stream module is built as a dynamic module and {module} is not installed \
             (Debian package libnginx-mod-stream)"
        ));
    }
    Err("it was built without the stream module (`nginx -V` shows no --with-stream)".into())
}

fn start_router(
    mode: Datapath,
    pipe_kib: Option<u32>,
    socket_lb: bool,
    access_log: bool,
    protocol: Protocol,
    setup: &Setup<'_>,
) -> anyhow::Result<Running> {
    let backends = setup.backends;
    let port = system::free_port()?;
    let admin_port = system::free_port()?;
    let target = match protocol {
        Protocol::Http | Protocol::WebSocket => loopback(port),
        Protocol::Tunnel | Protocol::Whoami => {
            let echo = backends.echo.as_ref().context("no echo container")?;
            let route_port = if protocol == Protocol::Tunnel {
                echo.router_port
            } else {
                echo.whoami_router_port
            };
            if !system::port_is_free(route_port) {
                bail!(
                    "127.0.0.1:{route_port} (the tcp route's port) is taken by another process, \
                     probably another router-agent that discovered the bench's echo container; \
                     stop it and run again"
                );
            }
            loopback(route_port)
        }
    };
    let admin = loopback(admin_port);
    let mut command = Command::new(setup.agent);
    command
        .args(["--listen", &loopback(port).to_string()])
        .args(["--admin", &admin.to_string()])
        .args(["--datapath", mode.flag()])
        .env("RUST_LOG", "warn");
    let mut what = format!("router-agent --datapath {}", mode.flag());
    let mut log = setup.tmp.join(format!("router-{}.log", mode.flag()));
    let pins = PathBuf::from(format!("/sys/fs/bpf/router-bench-{}", std::process::id()));
    if socket_lb {
        let cgroup = setup
            .socket_lb_cgroup
            .context("the bench has no cgroup of its own for socket-level balancing")?;
        command
            .args(["--socket-lb", "on", "--cgroup-path"])
            .arg(cgroup)
            .arg("--pin-path")
            .arg(&pins);
        what.push_str(" --socket-lb on");
        log = setup.tmp.join("router-socket-lb.log");
    } else {
        command.args(["--socket-lb", "off"]);
    }
    if access_log {
        let path = setup.tmp.join("router-access.log");
        command.arg("--access-log").arg(&path);
        let _ = write!(what, " --access-log {}", path.display());
        log = setup.tmp.join("router-accesslog.log");
    } else {
        command.args(["--access-log", "off"]);
    }
    if let Some(kib) = pipe_kib {
        let config = setup
            .tmp
            .join(format!("router-pipe-{}.toml", size_name(kib)));
        let bytes = u64::from(kib) * 1024;
        fs::write(&config, format!("pipe_size_bytes = {bytes}\n"))
            .with_context(|| format!("writing {}", config.display()))?;
        command.arg("--config").arg(&config);
        let _ = write!(what, " (pipe_size_bytes = {bytes})");
        log = setup
            .tmp
            .join(format!("router-pipe-{}.log", size_name(kib)));
    }
    let mut running = spawn(command, log, admin, &what, setup)?;
    running.admin = Some(admin);
    if socket_lb {
        running.uninstall = Some((setup.agent.to_owned(), pins));
    }
    let (domain, wanted) = match protocol {
        Protocol::Http => (&backends.domain, backends.replicas.len()),
        Protocol::Tunnel => (&backends.tunnel_domain, 1),
        Protocol::Whoami => (&backends.whoami_domain, 1),
        Protocol::WebSocket => (&backends.ws_domain, 1),
    };
    running.route_domain = Some(domain.clone());
    // Discovery and the first probes take a moment after the admin API answers.
    let deadline = Instant::now() + setup.startup_timeout * 2;
    loop {
        running
            .check_alive()
            .with_context(|| format!("{what} stopped"))?;
        let routes = admin_routes(admin);
        let up = routes
            .as_ref()
            .map_or(0, |routes| backends_up(routes, domain));
        // The kernel path only once the agent owns the maps and serves the route there.
        let kernel_ready = !socket_lb
            || routes.as_ref().is_ok_and(|routes| {
                kernel_field(routes, domain, "served").and_then(Value::as_bool) == Some(true)
            });
        if up >= wanted
            && kernel_ready
            && system::wait_listening(running.target, Duration::from_millis(200))
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: /api/routes on {admin} does not list {wanted} `up` backend(s) for {domain} \
                 after {:?} (it lists {up}){}",
                setup.startup_timeout * 2,
                log_tail(running.log.as_deref())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if protocol != Protocol::Http {
        // The readiness probe connection was tunnelled too; let its teardown finish.
        std::thread::sleep(Duration::from_millis(200));
    }
    running.target = target;
    Ok(running)
}

/// A field of the `kernel` object of the tcp route for `domain` in `/api/routes`.
fn kernel_field<'a>(routes: &'a Value, domain: &str, key: &str) -> Option<&'a Value> {
    routes
        .get("routes")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .find(|r| r.get("domain").and_then(Value::as_str) == Some(domain))?
        .get("kernel")?
        .get(key)
}

/// How many backends of the route for `domain` are `up`.
fn backends_up(routes: &Value, domain: &str) -> usize {
    routes
        .get("routes")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter(|r| r.get("domain").and_then(Value::as_str) == Some(domain))
        .flat_map(|r| {
            r.get("backends")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice)
        })
        .filter(|b| b.get("state").and_then(Value::as_str) == Some("up"))
        .count()
}

/// The router's `/api/routes`, parsed.
fn admin_routes(admin: SocketAddr) -> anyhow::Result<Value> {
    serde_json::from_str(&admin_get(admin, "/api/routes")?).context("/api/routes is not JSON")
}

/// GET on the router's admin API (it answers with Content-Length and closes).
fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(2))
        .with_context(|| format!("connecting to the admin API on {admin}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading {path} from {admin}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP head in the answer to {path}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "GET {path} on {admin}: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_owned())
}

/// The last lines of a contender's log, for error messages.
fn log_tail(log: Option<&Path>) -> String {
    let Some(log) = log else {
        return String::new();
    };
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(8)..].join("\n    ");
    format!("; its log {} ends with:\n    {tail}", log.display())
}
