//! Configuration: command-line flags, `ROUTER_*` environment variables and a TOML file
//! (`--config`), in that order of precedence, over documented defaults.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::{cidr::Cidr, http::HeadLimits};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DatapathMode {
    /// Copy small messages, splice large bodies, offload tunnels to the kernel when available.
    #[default]
    Auto,
    Copy,
    Splice,
    Sockmap,
}

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
    #[arg(long, env = "ROUTER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve HTTP routes on (repeatable) [default: 0.0.0.0:80].
    #[arg(long, env = "ROUTER_LISTEN", value_delimiter = ',')]
    pub listen: Vec<SocketAddr>,
    /// Address of the admin API [default: 127.0.0.1:9090].
    #[arg(long, env = "ROUTER_ADMIN")]
    pub admin: Option<SocketAddr>,
    /// Docker engine [default: `$DOCKER_HOST` or `unix:///var/run/docker.sock`].
    #[arg(long, env = "ROUTER_DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Clients allowed to reach `*.local` domains (repeatable) [default: loopback plus the
    /// subnets of the Docker networks].
    #[arg(long, env = "ROUTER_INTERNAL_CIDR", value_delimiter = ',')]
    pub internal_cidr: Vec<Cidr>,
    /// Suffix for route hosts without a dot [default: local].
    #[arg(long, env = "ROUTER_DEFAULT_DOMAIN")]
    pub default_domain: Option<String>,
    /// How bytes move [default: auto].
    #[arg(long, env = "ROUTER_DATAPATH", value_enum)]
    pub datapath: Option<DatapathMode>,
    /// Log line format [default: text].
    #[arg(long, env = "ROUTER_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// HTTP worker threads, each with its own listening socket [default: one per CPU].
    #[arg(long, env = "ROUTER_WORKERS")]
    pub workers: Option<usize>,
}

/// The TOML file: the flags' names with underscores, plus tuning knobs.
#[derive(Deserialize, Debug, Default)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    listen: Vec<SocketAddr>,
    admin: Option<SocketAddr>,
    docker_host: Option<String>,
    internal_cidr: Vec<Cidr>,
    default_domain: Option<String>,
    datapath: Option<DatapathMode>,
    log_format: Option<LogFormat>,
    workers: Option<usize>,
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
}

/// Settings of the HTTP data path.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub connect_timeout: Duration,
    /// From the first byte of a request head to its end (408 after).
    pub header_timeout: Duration,
    /// From the end of the request to the backend's response head (504 after).
    pub response_timeout: Duration,
    /// A keep-alive client connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
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
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub docker_host: String,
    /// `None`: derived from the Docker networks (plus loopback).
    pub internal_cidrs: Option<Vec<Cidr>>,
    pub default_domain: String,
    pub datapath: DatapathMode,
    pub log_format: LogFormat,
    /// HTTP worker threads.
    pub workers: usize,
    pub proxy: ProxySettings,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
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
            workers: cli
                .workers
                .or(file.workers)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from)),
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
            },
            shutdown_grace: ms(file.shutdown_grace_ms, Duration::from_secs(10)),
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
        for (name, value) in [
            ("connect_timeout_ms", self.proxy.connect_timeout),
            ("header_timeout_ms", self.proxy.header_timeout),
            ("response_timeout_ms", self.proxy.response_timeout),
            ("idle_timeout_ms", self.proxy.idle_timeout),
        ] {
            if value.is_zero() {
                bail!("{name} must be greater than 0");
            }
        }
        Ok(())
    }
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
