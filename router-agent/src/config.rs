//! Configuration: command-line flags, `ROUTER_*` environment variables and a TOML file
//! (`--config`), in that order of precedence, over documented defaults.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::{access_log::AccessLogTarget, cidr::Cidr, http::HeadLimits};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DatapathMode {
    /// Copy small messages; splice bodies of 256 KiB and more (`splice_threshold_bytes`) and
    /// every tunnel (WebSocket, `tcp://` routes).
    #[default]
    Auto,
    /// Copy every byte in userspace.
    Copy,
    /// Splice every body and tunnel.
    Splice,
    /// Tunnels through the kernel (sockhash and the eBPF verdict program); bodies copied.
    Sockmap,
}

/// Whether the agent joins the cluster its Docker engine belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClusterMode {
    /// Cluster mode when the engine is a Swarm node, single-host mode otherwise.
    #[default]
    Auto,
    /// Single-host mode whatever the engine is.
    Off,
}

/// Socket-level balancing of `tcp://` routes (`socket_lb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SocketLbMode {
    /// On when the kernel and the agent's privileges allow it; otherwise tcp routes are served
    /// by the userspace listener alone (one log line says so).
    #[default]
    Auto,
    /// Required: the agent does not start without it.
    On,
    Off,
}

/// Where socket-level balancing attaches and pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketLbSettings {
    pub mode: SocketLbMode,
    /// The cgroup2 directory whose processes' connects are balanced (`None`: Docker's parent
    /// cgroup, `<cgroup2 mount>/docker`).
    pub cgroup_path: Option<PathBuf>,
    /// The bpffs directory where programs' links and maps stay pinned across restarts.
    pub pin_path: PathBuf,
}

/// Default `pin_path`.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/router-agent";

impl Default for SocketLbSettings {
    fn default() -> Self {
        Self {
            mode: SocketLbMode::Auto,
            cgroup_path: None,
            pin_path: PathBuf::from(DEFAULT_PIN_PATH),
        }
    }
}

/// Commands besides serving.
#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Detach the socket-level balancing programs and remove everything pinned under the pin
    /// path (`--pin-path`), then exit. Stop the agent first: a running agent would keep its
    /// maps open (but no longer balance connects).
    Uninstall,
    /// Control a running agent through its admin API: drain, weight, maintenance, why.
    Ctl(crate::ctl::CtlArgs),
}

/// Default `--state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/router-agent";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The command line. Every flag also reads `ROUTER_<FLAG>`; lists are comma-separated there.
#[derive(Parser, Debug, Default)]
#[command(
    name = "router-agent",
    version,
    about = "Label-driven HTTP router for the containers of this Docker host"
)]
pub struct Cli {
    /// TOML file with the same settings (flags and environment win over it).
    #[arg(long, env = "ROUTER_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Address to serve HTTP routes on (repeatable) [default: 0.0.0.0:80].
    #[arg(long, env = "ROUTER_LISTEN", value_delimiter = ',')]
    pub listen: Vec<SocketAddr>,
    /// Address to serve HTTP routes on with TLS the agent terminates (repeatable), e.g.
    /// 0.0.0.0:443; needs --tls-cert-dir [default: none].
    #[arg(long, env = "ROUTER_LISTEN_TLS", value_delimiter = ',')]
    pub listen_tls: Vec<SocketAddr>,
    /// Directory of PEM certificates and keys for --listen-tls: <domain>.crt and <domain>.key
    /// (or certbot's <domain>/fullchain.pem and privkey.pem; `_wildcard.<suffix>` for
    /// `*.<suffix>`), read again when they change.
    #[arg(long, env = "ROUTER_TLS_CERT_DIR")]
    pub tls_cert_dir: Option<PathBuf>,
    /// Address of the admin API [default: 127.0.0.1:9090].
    #[arg(long, env = "ROUTER_ADMIN")]
    pub admin: Option<SocketAddr>,
    /// Docker engine [default: `$DOCKER_HOST` or `unix:///var/run/docker.sock`].
    #[arg(long, env = "ROUTER_DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Clients allowed to reach `*.local` domains (repeatable) [default: loopback, every
    /// address of the host's own interfaces (followed as they change), the subnets of the
    /// Docker networks, and in a cluster the nodes and their networks]. Given, it replaces the
    /// whole default: list loopback and the host's addresses too if they should stay internal.
    #[arg(long, env = "ROUTER_INTERNAL_CIDR", value_delimiter = ',')]
    pub internal_cidr: Vec<Cidr>,
    /// Suffix for route hosts without a dot [default: local].
    #[arg(long, env = "ROUTER_DEFAULT_DOMAIN")]
    pub default_domain: Option<String>,
    /// How bytes move [default: auto].
    #[arg(long, env = "ROUTER_DATAPATH", value_enum)]
    pub datapath: Option<DatapathMode>,
    /// Format of the agent's log and of the access log [default: text].
    #[arg(long, env = "ROUTER_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Where the access log (one line per request) goes: off, stdout, stderr or a file path
    /// [default: stdout; the agent's own log is on stderr].
    #[arg(long, env = "ROUTER_ACCESS_LOG")]
    pub access_log: Option<AccessLogTarget>,
    /// HTTP worker threads, each with its own listening socket [default: one per CPU].
    #[arg(long, env = "ROUTER_WORKERS")]
    pub workers: Option<usize>,
    /// Join the Swarm the engine belongs to [default: auto].
    #[arg(long, env = "ROUTER_CLUSTER", value_enum)]
    pub cluster: Option<ClusterMode>,
    /// The cluster port, where the other nodes' agents follow this one and reach this node's
    /// containers [default: 0.0.0.0:9191].
    #[arg(long, env = "ROUTER_CLUSTER_LISTEN")]
    pub cluster_listen: Option<SocketAddr>,
    /// Socket-level balancing of tcp routes in the kernel [default: auto].
    #[arg(long, env = "ROUTER_SOCKET_LB", value_enum)]
    pub socket_lb: Option<SocketLbMode>,
    /// cgroup2 directory whose processes' connects to tcp routes are balanced in the kernel
    /// [default: `<cgroup2 mount>/docker`, every Docker container].
    #[arg(long, env = "ROUTER_CGROUP_PATH")]
    pub cgroup_path: Option<PathBuf>,
    /// bpffs directory where the socket-level balancing programs and maps stay pinned
    /// [default: /sys/fs/bpf/router-agent].
    #[arg(long, env = "ROUTER_PIN_PATH", global = true)]
    pub pin_path: Option<PathBuf>,
    /// Directory for state that survives restarts: operators' overrides (`overrides.json`)
    /// and the generated admin token (`admin.token`) [default: /var/lib/router-agent].
    #[arg(long, env = "ROUTER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// File holding the admin API token (`Authorization: Bearer <token>`) [default: generated
    /// at start into `<state-dir>/admin.token`, mode 0600, when that file does not exist].
    #[arg(long, env = "ROUTER_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The TOML file: the flags' names with underscores, plus tuning knobs.
#[derive(Deserialize, Debug, Default)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    listen: Vec<SocketAddr>,
    listen_tls: Vec<SocketAddr>,
    tls_cert_dir: Option<PathBuf>,
    admin: Option<SocketAddr>,
    docker_host: Option<String>,
    internal_cidr: Vec<Cidr>,
    default_domain: Option<String>,
    datapath: Option<DatapathMode>,
    log_format: Option<LogFormat>,
    access_log: Option<AccessLogTarget>,
    workers: Option<usize>,
    cluster: Option<ClusterMode>,
    cluster_listen: Option<SocketAddr>,
    socket_lb: Option<SocketLbMode>,
    cgroup_path: Option<PathBuf>,
    pin_path: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    admin_token_file: Option<PathBuf>,
    connect_timeout_ms: Option<u64>,
    header_timeout_ms: Option<u64>,
    response_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    shutdown_grace_ms: Option<u64>,
    forwarded_headers: Option<bool>,
    max_request_line_bytes: Option<usize>,
    max_head_bytes: Option<usize>,
    splice_threshold_bytes: Option<u64>,
    pipe_size_bytes: Option<usize>,
    body_idle_timeout_ms: Option<u64>,
    tunnel_idle_timeout_ms: Option<u64>,
    tcp_keepalive_ms: Option<u64>,
    max_connections: Option<usize>,
    backend_max_connections: Option<usize>,
    backend_queue_timeout_ms: Option<u64>,
    error_limit: Option<u32>,
    handover_timeout_ms: Option<u64>,
}

/// Settings of the HTTP data path.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub connect_timeout: Duration,
    /// For the first request of a connection, from accept to the end of its head; for later
    /// ones, from their first byte (408 after).
    pub header_timeout: Duration,
    /// From the end of the request body to the backend's response head (504 after).
    pub response_timeout: Duration,
    /// A keep-alive client connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// A body (either way) that moves no byte for this long is cut.
    pub body_idle_timeout: Duration,
    /// A tunnel (WebSocket, `tcp://` route) that carries no byte either way for this long is
    /// closed.
    pub tunnel_idle_timeout: Duration,
    /// Idle time before TCP keepalive probes start on client and backend sockets (`None`: off).
    pub tcp_keepalive: Option<Duration>,
    /// Requests in flight per backend container (`None`: no limit); more wait in a queue.
    pub backend_max_connections: Option<usize>,
    /// How long a request waits for a backend under its limit before a 503 with `Retry-After`.
    pub backend_queue_timeout: Duration,
    /// Consecutive failed exchanges (no or invalid response, response timeout) after which a
    /// backend is taken out until its health check passes again.
    pub error_limit: u32,
    pub forwarded_headers: bool,
    pub limits: HeadLimits,
    /// In `auto` mode, bodies and chunks of at least this many bytes are spliced.
    pub splice_threshold: u64,
    /// Capacity asked for each splice pipe.
    pub pipe_size: usize,
}

/// Pipe sizes the agent accepts: one page up to what Linux allows a pipe at most.
const PIPE_SIZES: std::ops::RangeInclusive<usize> = 4096..=(1 << 30);

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            header_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_mins(1),
            idle_timeout: Duration::from_mins(1),
            forwarded_headers: true,
            limits: HeadLimits::default(),
            splice_threshold: crate::proxy::SPLICE_THRESHOLD,
            pipe_size: crate::proxy::DEFAULT_PIPE_SIZE,
            body_idle_timeout: Duration::from_mins(1),
            // HAProxy's documented `timeout tunnel` for WebSocket: an idle WebSocket is normal,
            // and TCP keepalive finds peers that vanished.
            tunnel_idle_timeout: Duration::from_hours(1),
            tcp_keepalive: Some(Duration::from_mins(1)),
            backend_max_connections: None,
            backend_queue_timeout: Duration::from_secs(1),
            // HAProxy's default `error-limit`.
            error_limit: 10,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    /// Where the agent terminates TLS itself (empty: nowhere).
    pub listen_tls: Vec<SocketAddr>,
    /// The certificates for `listen_tls`.
    pub tls_cert_dir: Option<PathBuf>,
    pub admin: SocketAddr,
    pub docker_host: String,
    /// `None`: derived from loopback, the host's own addresses and the Docker networks.
    pub internal_cidrs: Option<Vec<Cidr>>,
    pub default_domain: String,
    pub datapath: DatapathMode,
    pub log_format: LogFormat,
    pub access_log: AccessLogTarget,
    /// HTTP worker threads.
    pub workers: usize,
    pub cluster: ClusterMode,
    pub cluster_listen: SocketAddr,
    pub proxy: ProxySettings,
    /// Client connections open at once (HTTP and `tcp://` routes together); more wait in the
    /// listen backlog.
    pub max_connections: usize,
    /// How long in-flight requests may take to finish after SIGTERM (handover included).
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long to keep accepting while no successor listens on our ports.
    pub handover_timeout: Duration,
    pub socket_lb: SocketLbSettings,
    /// Where overrides and the generated admin token are kept.
    pub state_dir: PathBuf,
    /// The admin token's file, when given (else `<state_dir>/admin.token`, generated).
    pub admin_token_file: Option<PathBuf>,
}

impl Config {
    pub fn load(cli: Cli) -> anyhow::Result<Self> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing the config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let defaults = ProxySettings::default();
        let ms = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_millis);
        let config = Self {
            listen: first_non_empty(cli.listen, file.listen)
                .unwrap_or_else(|| vec![SocketAddr::from(([0, 0, 0, 0], 80))]),
            listen_tls: first_non_empty(cli.listen_tls, file.listen_tls).unwrap_or_default(),
            tls_cert_dir: cli.tls_cert_dir.or(file.tls_cert_dir),
            admin: cli
                .admin
                .or(file.admin)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090))),
            docker_host: cli
                .docker_host
                .or(file.docker_host)
                .or_else(|| std::env::var("DOCKER_HOST").ok())
                .unwrap_or_else(|| "unix:///var/run/docker.sock".into()),
            internal_cidrs: first_non_empty(cli.internal_cidr, file.internal_cidr),
            default_domain: cli
                .default_domain
                .or(file.default_domain)
                .unwrap_or_else(|| "local".into()),
            datapath: cli.datapath.or(file.datapath).unwrap_or_default(),
            log_format: cli.log_format.or(file.log_format).unwrap_or_default(),
            access_log: cli.access_log.or(file.access_log).unwrap_or_default(),
            workers: cli
                .workers
                .or(file.workers)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from)),
            cluster: cli.cluster.or(file.cluster).unwrap_or_default(),
            cluster_listen: cli
                .cluster_listen
                .or(file.cluster_listen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], crate::cluster::DEFAULT_PORT))),
            proxy: ProxySettings {
                connect_timeout: ms(file.connect_timeout_ms, defaults.connect_timeout),
                header_timeout: ms(file.header_timeout_ms, defaults.header_timeout),
                response_timeout: ms(file.response_timeout_ms, defaults.response_timeout),
                idle_timeout: ms(file.idle_timeout_ms, defaults.idle_timeout),
                forwarded_headers: file.forwarded_headers.unwrap_or(defaults.forwarded_headers),
                limits: HeadLimits {
                    max_request_line: file
                        .max_request_line_bytes
                        .unwrap_or(defaults.limits.max_request_line),
                    max_head: file.max_head_bytes.unwrap_or(defaults.limits.max_head),
                },
                splice_threshold: file
                    .splice_threshold_bytes
                    .unwrap_or(defaults.splice_threshold),
                pipe_size: file.pipe_size_bytes.unwrap_or(defaults.pipe_size),
                body_idle_timeout: ms(file.body_idle_timeout_ms, defaults.body_idle_timeout),
                tunnel_idle_timeout: ms(file.tunnel_idle_timeout_ms, defaults.tunnel_idle_timeout),
                tcp_keepalive: match file.tcp_keepalive_ms {
                    Some(0) => None,
                    Some(v) => Some(Duration::from_millis(v)),
                    None => defaults.tcp_keepalive,
                },
                backend_max_connections: match file.backend_max_connections {
                    Some(0) | None => None,
                    Some(n) => Some(n),
                },
                backend_queue_timeout: ms(
                    file.backend_queue_timeout_ms,
                    defaults.backend_queue_timeout,
                ),
                error_limit: file.error_limit.unwrap_or(defaults.error_limit),
            },
            max_connections: match file.max_connections {
                Some(0) | None => default_max_connections(),
                Some(n) => n,
            },
            shutdown_grace: ms(file.shutdown_grace_ms, Duration::from_secs(10)),
            handover_timeout: ms(file.handover_timeout_ms, Duration::from_secs(5)),
            socket_lb: SocketLbSettings {
                mode: cli.socket_lb.or(file.socket_lb).unwrap_or_default(),
                cgroup_path: cli.cgroup_path.or(file.cgroup_path),
                pin_path: cli
                    .pin_path
                    .or(file.pin_path)
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_PATH)),
            },
            state_dir: cli
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            admin_token_file: cli.admin_token_file.or(file.admin_token_file),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let domain = &self.default_domain;
        if domain.is_empty()
            || domain.len() > 63
            || !domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            bail!("--default-domain {domain:?}: use a lower-case DNS suffix such as `local`");
        }
        if self.workers == 0 || self.workers > 256 {
            bail!("--workers {}: use 1 to 256 threads", self.workers);
        }
        if self.proxy.limits.max_request_line > self.proxy.limits.max_head {
            bail!("max_request_line_bytes must not exceed max_head_bytes");
        }
        if self.proxy.splice_threshold == 0 {
            bail!("splice_threshold_bytes must be at least 1");
        }
        if !PIPE_SIZES.contains(&self.proxy.pipe_size) {
            bail!(
                "pipe_size_bytes {}: use {} to {} bytes (the kernel rounds up to a power of two \
                 pages, and caps unprivileged processes at /proc/sys/fs/pipe-max-size)",
                self.proxy.pipe_size,
                PIPE_SIZES.start(),
                PIPE_SIZES.end()
            );
        }
        if let Some(path) = &self.socket_lb.cgroup_path
            && !path.is_absolute()
        {
            bail!(
                "cgroup_path {}: use an absolute path to a cgroup2 directory, such as \
                 /sys/fs/cgroup/unified/docker",
                path.display()
            );
        }
        if !self.socket_lb.pin_path.is_absolute() {
            bail!(
                "pin_path {}: use an absolute path on bpffs, such as {DEFAULT_PIN_PATH}",
                self.socket_lb.pin_path.display()
            );
        }
        match (self.listen_tls.is_empty(), &self.tls_cert_dir) {
            (false, None) => bail!(
                "--listen-tls needs --tls-cert-dir DIR, the directory with <domain>.crt and \
                 <domain>.key files"
            ),
            (true, Some(dir)) => bail!(
                "--tls-cert-dir {} without --listen-tls: add --listen-tls 0.0.0.0:443 (or drop \
                 the directory)",
                dir.display()
            ),
            _ => {}
        }
        if !self.state_dir.is_absolute() {
            bail!(
                "state_dir {}: use an absolute path, such as {DEFAULT_STATE_DIR}",
                self.state_dir.display()
            );
        }
        if self.proxy.error_limit == 0 {
            bail!("error_limit must be at least 1 (consecutive failed exchanges)");
        }
        let fd_limit = open_files_limit();
        if self.max_connections > fd_limit {
            bail!(
                "max_connections {} exceeds the open-files limit {fd_limit}: lower it (0 picks \
                 a safe value) or raise `ulimit -n`",
                self.max_connections
            );
        }
        for (name, value) in [
            ("connect_timeout_ms", self.proxy.connect_timeout),
            ("header_timeout_ms", self.proxy.header_timeout),
            ("response_timeout_ms", self.proxy.response_timeout),
            ("idle_timeout_ms", self.proxy.idle_timeout),
            ("body_idle_timeout_ms", self.proxy.body_idle_timeout),
            ("tunnel_idle_timeout_ms", self.proxy.tunnel_idle_timeout),
            ("backend_queue_timeout_ms", self.proxy.backend_queue_timeout),
        ] {
            if value.is_zero() {
                bail!("{name} must be greater than 0");
            }
        }
        Ok(())
    }
}

/// Descriptors reserved for everything but client connections' own sockets: the admin API,
/// Docker, probes, logs, eBPF maps.
const RESERVED_FDS: usize = 256;

/// A client connection can hold up to four descriptors at once: its socket, a backend socket,
/// and a splice pipe (two). A quarter of what is left after the reserve keeps the agent from
/// running out under any mix, so it sheds load instead of failing probes and backend connects.
fn default_max_connections() -> usize {
    (open_files_limit().saturating_sub(RESERVED_FDS) / 4).max(16)
}

/// The soft open-files limit (`ulimit -n`), which the agent raises to the hard limit at start.
pub fn open_files_limit() -> usize {
    rlimit_nofile().0
}

fn rlimit_nofile() -> (usize, usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return (1024, 1024);
    }
    let clamp = |v: libc::rlim_t| usize::try_from(v).unwrap_or(usize::MAX).min(1 << 24);
    (clamp(limit.rlim_cur), clamp(limit.rlim_max))
}

/// Raises the soft open-files limit to the hard one (what a server is allowed to use; the soft
/// limit is often left at 1024 for old `select()` users). Returns the limit in force.
pub fn raise_open_files_limit() -> usize {
    let (soft, hard) = rlimit_nofile();
    if soft < hard {
        let limit = libc::rlimit {
            rlim_cur: hard as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: setrlimit reads the struct we own; raising soft up to hard needs no privilege.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) };
    }
    open_files_limit()
}

fn first_non_empty<T>(a: Vec<T>, b: Vec<T>) -> Option<Vec<T>> {
    if !a.is_empty() {
        Some(a)
    } else if !b.is_empty() {
        Some(b)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let config = Config::load(Cli::default()).unwrap();
        assert_eq!(config.listen, vec!["0.0.0.0:80".parse().unwrap()]);
        assert_eq!(config.admin, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(config.default_domain, "local");
        assert_eq!(config.datapath, DatapathMode::Auto);
        assert!(config.internal_cidrs.is_none());
    }

    #[test]
    fn file_then_flags() {
        let dir = std::env::temp_dir().join(format!("router-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("router.toml");
        std::fs::write(
            &path,
            "listen = [\"127.0.0.1:8080\"]\ndefault_domain = \"corp\"\nidle_timeout_ms = 500\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "router-agent",
            "--config",
            path.to_str().unwrap(),
            "--default-domain",
            "test",
        ]);
        let config = Config::load(cli).unwrap();
        assert_eq!(config.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(config.default_domain, "test");
        assert_eq!(config.proxy.idle_timeout, Duration::from_millis(500));

        std::fs::write(&path, "lisen = [\"127.0.0.1:8080\"]\n").unwrap();
        let cli = Cli::parse_from(["router-agent", "--config", path.to_str().unwrap()]);
        let err = format!("{:#}", Config::load(cli).unwrap_err());
        assert!(err.contains("unknown field `lisen`"), "{err}");
    }

    #[test]
    fn bad_values_say_what_to_change() {
        let cli = Cli::parse_from(["router-agent", "--default-domain", "Bad Domain"]);
        let err = Config::load(cli).unwrap_err().to_string();
        assert!(err.contains("lower-case DNS suffix"), "{err}");
        assert!(Cli::try_parse_from(["router-agent", "--internal-cidr", "10.0.0.0/40"]).is_err());
        assert!(Cli::try_parse_from(["router-agent", "--datapath", "fast"]).is_err());
    }

    #[test]
    fn tls_listener_and_directory_go_together() {
        let cli = Cli::parse_from(["router-agent", "--listen-tls", "127.0.0.1:8443"]);
        let err = Config::load(cli).unwrap_err().to_string();
        assert!(err.contains("--listen-tls needs --tls-cert-dir"), "{err}");
        let cli = Cli::parse_from(["router-agent", "--tls-cert-dir", "/etc/router/certs"]);
        let err = Config::load(cli).unwrap_err().to_string();
        assert!(err.contains("without --listen-tls"), "{err}");
        let dir = std::env::temp_dir().join(format!("router-tls-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("router.toml");
        std::fs::write(
            &path,
            "listen_tls = [\"0.0.0.0:443\"]\ntls_cert_dir = \"/etc/router/certs\"\n",
        )
        .unwrap();
        let config = Config::load(Cli::parse_from([
            "router-agent",
            "--config",
            path.to_str().unwrap(),
        ]))
        .unwrap();
        assert_eq!(config.listen_tls, vec!["0.0.0.0:443".parse().unwrap()]);
        assert_eq!(
            config.tls_cert_dir.as_deref(),
            Some(std::path::Path::new("/etc/router/certs"))
        );
    }

    #[test]
    fn socket_lb_settings() {
        let defaults = Config::load(Cli::default()).unwrap().socket_lb;
        assert_eq!(defaults, SocketLbSettings::default());
        let cli = Cli::parse_from([
            "router-agent",
            "--socket-lb",
            "off",
            "--cgroup-path",
            "/sys/fs/cgroup/unified/swarm",
            "uninstall",
            "--pin-path",
            "/sys/fs/bpf/other",
        ]);
        assert_eq!(cli.command, Some(Command::Uninstall));
        let settings = Config::load(cli).unwrap().socket_lb;
        assert_eq!(settings.mode, SocketLbMode::Off);
        assert_eq!(
            settings.cgroup_path.as_deref(),
            Some(std::path::Path::new("/sys/fs/cgroup/unified/swarm"))
        );
        assert_eq!(settings.pin_path, PathBuf::from("/sys/fs/bpf/other"));
        let cli = Cli::parse_from(["router-agent", "--cgroup-path", "docker"]);
        let err = Config::load(cli).unwrap_err().to_string();
        assert!(
            err.contains("use an absolute path to a cgroup2 directory"),
            "{err}"
        );
    }

    #[test]
    fn splice_knobs_from_the_file_are_checked() {
        let dir = std::env::temp_dir().join(format!("router-splice-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("router.toml");
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Config::load(Cli::parse_from([
                "router-agent",
                "--config",
                path.to_str().unwrap(),
            ]))
        };
        let config = load("splice_threshold_bytes = 4096\npipe_size_bytes = 65536\n").unwrap();
        assert_eq!(config.proxy.splice_threshold, 4096);
        assert_eq!(config.proxy.pipe_size, 65536);
        let defaults = load("").unwrap();
        assert_eq!(defaults.proxy.splice_threshold, 256 * 1024);
        assert_eq!(defaults.proxy.pipe_size, 1024 * 1024);
        for (text, says) in [
            (
                "pipe_size_bytes = 100\n",
                "pipe_size_bytes 100: use 4096 to",
            ),
            (
                "splice_threshold_bytes = 0\n",
                "splice_threshold_bytes must be at least 1",
            ),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
