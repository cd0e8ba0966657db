//! router-agent: discovers labeled containers on this Docker host, health-checks them, and
//! routes HTTP requests by Host header to the healthy ones.
use std::process::ExitCode;

use clap::Parser as _;
use router_agent::config::{Cli, Command, Config, LogFormat};

fn main() -> ExitCode {
    // Before the configuration: the default connection limit follows the descriptor limit.
    router_agent::config::raise_open_files_limit();
    let cli = Cli::parse();
    // `ctl` talks to a running agent: it needs none of the serving configuration.
    if let Some(Command::Ctl(args)) = &cli.command {
        return router_agent::ctl::run(args);
    }
    let command = cli.command.clone();
    let config = match Config::load(cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("router-agent: {e:#}");
            return ExitCode::from(2);
        }
    };
    if command == Some(Command::Uninstall) {
        return match router_agent::socket_lb::uninstall_report(&config.socket_lb.pin_path) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("router-agent uninstall: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    init_logging(config.log_format);
    // Before the runtime's threads exist: the capabilities it drops are per thread.
    let prepared = match router_agent::app::prepare(&config) {
        Ok(prepared) => prepared,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    // This runtime carries the control plane (discovery, probes, admin API) and tunnels; HTTP
    // requests run on the worker threads `app::run` starts.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("router-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(router_agent::app::run(config, prepared)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
