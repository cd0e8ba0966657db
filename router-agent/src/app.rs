//! Start-up and shutdown: loads the eBPF programs and drops the privileges no longer needed
//! ([`prepare`], before any thread starts), then wires discovery and probes to the registry,
//! the registry to the listeners and the admin API; serves only once ready, and hands over to a
//! successor at SIGTERM (see `handover`).
use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
    time::Instant,
};
use tracing::{info, warn};

use crate::{
    access_log::AccessLog,
    admin, cluster,
    config::{ClusterMode, Config, DatapathMode, SocketLbMode},
    discovery,
    ebpf::KernelOffload,
    handover, host_addrs,
    metrics::Metrics,
    privilege,
    proxy::{self, Phase, ProxyContext},
    registry::{Message, Published, Registry, RegistrySettings, overrides::Overrides},
    socket_lb::{self, SocketLb},
    tls,
};

/// The longest the agent waits for its first Docker sync and first health checks before it
/// serves anyway (an engine that does not answer must not keep the router down).
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a handing-over agent looks for its successor's listeners.
const SUCCESSOR_POLL: Duration = Duration::from_millis(20);

/// What the agent set up while it still held every capability it was started with.
pub struct Prepared {
    offload: Option<KernelOffload>,
    socket_lb: Option<Arc<SocketLb>>,
}

/// Does what needs privileges, then gives them up: loads and attaches the eBPF programs (the
/// socket-lb ones are loaded here and attached once the agent is ready, which needs no
/// capability), turns on request migration, and drops every capability but those
/// [`privilege::needed_after_start`] names. Call it before any other thread exists (before the
/// async runtime): capabilities are per thread.
pub fn prepare(config: &Config) -> anyhow::Result<Prepared> {
    let (offload, socket_lb) = load_kernel(config)?;
    handover::enable_request_migration();
    let needed = privilege::needed_after_start(
        offload.is_some() || socket_lb.is_some(),
        privilege::Kernel::read(),
    );
    let privileges = privilege::drop_all_but(&needed).context("dropping capabilities")?;
    info!("{privileges}");
    Ok(Prepared { offload, socket_lb })
}

pub async fn run(config: Config, prepared: Prepared) -> anyhow::Result<()> {
    let Prepared { offload, socket_lb } = prepared;
    let (overrides, admin_token) = load_state(&config)?;
    let published = Arc::new(Published::new(config.internal_cidrs.as_deref()));
    let metrics = Arc::new(Metrics::default());

    let (registry_tx, registry_rx) = mpsc::unbounded_channel();
    let docker = discovery::DockerHandle::default();
    tokio::spawn(
        Registry::new(
            RegistrySettings {
                default_domain: config.default_domain.clone(),
                auto_cidrs: config.internal_cidrs.is_none(),
                backend_max_connections: config.proxy.backend_max_connections,
                overrides,
            },
            docker.clone(),
            registry_tx.clone(),
            published.clone(),
        )
        .run(registry_rx),
    );
    if config.internal_cidrs.is_none() {
        tokio::spawn(host_addrs::watch(registry_tx.clone()));
    }
    let (updates_tx, mut updates_rx) = mpsc::unbounded_channel();
    tokio::spawn(discovery::run(
        config.docker_host.clone(),
        updates_tx,
        docker.clone(),
        metrics.engine_requests.clone(),
    ));
    let to_registry = registry_tx.clone();
    tokio::spawn(async move {
        while let Some(update) = updates_rx.recv().await {
            if to_registry.send(Message::Discovery(update)).is_err() {
                return;
            }
        }
    });

    let (phase_tx, phase_rx) = watch::channel(Phase::Starting);
    let offload = offload.map(Arc::new);
    // Pipes cost two descriptors each: half the connection limit keeps them within the budget
    // `config::default_max_connections` reserves.
    let pipes = proxy::PipePool::new(config.proxy.pipe_size, config.max_connections / 2)
        .context("creating a splice pipe; is the open-files limit exhausted?")?;
    if pipes.granted_size() < config.proxy.pipe_size {
        warn!(
            asked = config.proxy.pipe_size,
            granted = pipes.granted_size(),
            "splice pipes are smaller than pipe_size_bytes asks: raise \
             /proc/sys/fs/pipe-max-size, or run with CAP_SYS_RESOURCE"
        );
    }
    let ctx = Arc::new(ProxyContext {
        published: published.clone(),
        settings: config.proxy.clone(),
        metrics: metrics.clone(),
        registry: registry_tx,
        phase: phase_rx,
        datapath: config.datapath,
        offload: offload.clone(),
        pool: proxy::Pool::new(config.max_connections),
        pipes,
        admission: proxy::Admission::new(config.max_connections),
        cluster: std::sync::OnceLock::new(),
        access_log: AccessLog::start(&config.access_log, config.log_format, metrics.clone())?,
    });
    tokio::spawn(proxy::maintain_pool(ctx.clone()));
    let tls = match &config.tls_cert_dir {
        Some(dir) if !config.listen_tls.is_empty() => {
            let certs = tls::CertDir::open(dir)?;
            let store = certs.store();
            tokio::spawn(certs.follow());
            Some(store)
        }
        _ => None,
    };
    let admin = admin::AdminState {
        proxy: ctx.clone(),
        socket_lb: socket_lb.clone(),
        tls: tls.clone(),
        token: admin_token,
        loopback_only: config.admin.ip().is_loopback(),
        docker: docker.clone(),
    };
    tokio::spawn(admin::serve(proxy::bind(config.admin)?, Arc::new(admin)));

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        () = wait_until_ready(&published) => {}
        _ = terminate.recv() => return Ok(()),
        _ = interrupt.recv() => return Ok(()),
    }
    if config.cluster == ClusterMode::Auto {
        match cluster::start(config.cluster_listen, ctx.clone(), docker).await {
            Ok(Some(joined)) => {
                let _ = ctx.cluster.set(joined);
            }
            Ok(None) => {}
            Err(e) => warn!("cluster mode unavailable ({e:#}); running as a single host"),
        }
    }
    let mut route_addresses: Vec<_> = config.listen.iter().map(SocketAddr::ip).collect();
    route_addresses.dedup();
    if let Some(socket_lb) = &socket_lb {
        tokio::spawn(socket_lb.clone().run(published.clone()));
    }
    tokio::spawn(proxy::serve_tcp_routes(ctx.clone(), route_addresses));
    let tls_listen = match tls {
        Some(store) => Some(proxy::TlsListen {
            addresses: config.listen_tls.clone(),
            acceptor: tls::acceptor(store)?,
        }),
        None => None,
    };
    proxy::spawn_workers(&ctx, &config.listen, tls_listen.as_ref(), config.workers)?;
    phase_tx.send_replace(Phase::Serving);
    info!(
        max_connections = config.max_connections,
        "serving; SIGTERM hands over to a successor on the same ports, then drains"
    );

    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    let stop_deadline = Instant::now() + config.shutdown_grace;
    phase_tx.send_replace(Phase::HandingOver);
    let handover_deadline = Instant::now() + config.handover_timeout.min(config.shutdown_grace);
    info!(
        "SIGTERM: accepting until a successor listens on {:?} (at most {:?}), then draining",
        config.listen,
        config.handover_timeout.min(config.shutdown_grace)
    );
    if wait_for_successor(&config.listen, config.workers, handover_deadline).await {
        info!("a successor listens on every HTTP port: no longer accepting");
    } else {
        info!("no successor within the handover timeout: no longer accepting");
    }
    phase_tx.send_replace(Phase::Draining);
    while ctx.metrics.connections_open() > 0 && Instant::now() < stop_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = ctx.metrics.connections_open();
    if left > 0 {
        warn!("{left} connection(s) still open at the shutdown deadline; closing them");
    }
    drop(offload);
    Ok(())
}

/// The state directory's parts: operators' overrides (a corrupt file stops the start: serving
/// without the drains an operator set would send traffic where they said not to) and the admin
/// token. A state directory that cannot be created leaves overrides in memory only.
fn load_state(config: &Config) -> anyhow::Result<(Overrides, admin::auth::AdminToken)> {
    let dir = &config.state_dir;
    let usable = std::fs::create_dir_all(dir).is_ok() && is_writable(dir);
    let overrides = if usable {
        let overrides = Overrides::load(Some(dir))?;
        info!(state_dir = %dir.display(), overrides = overrides.iter().count(), "operator overrides loaded");
        overrides
    } else {
        warn!(
            "state directory {} is not writable: operator overrides (`router-agent ctl`) will \
             not survive a restart; give --state-dir a writable directory",
            dir.display()
        );
        Overrides::load(None)?
    };
    let token =
        admin::auth::AdminToken::load(config.admin, config.admin_token_file.as_deref(), dir)?;
    Ok((overrides, token))
}

fn is_writable(dir: &std::path::Path) -> bool {
    let probe = dir.join(format!(".write-test.{}", std::process::id()));
    let ok = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Waits for the registry's first sync and first checks, at most [`READY_TIMEOUT`]: serving
/// before would answer 404 for known domains and 503 for healthy backends still `starting`.
async fn wait_until_ready(published: &Published) {
    let mut ready = published.ready.subscribe();
    if tokio::time::timeout(READY_TIMEOUT, ready.wait_for(|r| *r))
        .await
        .is_err()
    {
        warn!(
            "not ready after {READY_TIMEOUT:?} (Docker engine unreachable, or slow first health \
             checks): serving anyway with what is known"
        );
    }
}

/// Polls the kernel's socket table until every HTTP address has more listeners than this
/// agent's own `workers` sockets, or the deadline passes. Returns whether a successor showed.
async fn wait_for_successor(listen: &[SocketAddr], workers: usize, deadline: Instant) -> bool {
    loop {
        if listen
            .iter()
            .all(|addr| handover::listeners_on(*addr) > workers)
        {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(SUCCESSOR_POLL).await;
    }
}

/// Loads the eBPF sides the configuration asks for: the `sk_skb` tunnel offload (unless the
/// datapath mode excludes it) and socket-level balancing (unless `--socket-lb off`). What cannot
/// load is not fatal in the `auto` modes: the agent then serves that part in userspace, and one
/// line says what (a host without the privilege gets exactly one line for both).
fn load_kernel(config: &Config) -> anyhow::Result<(Option<KernelOffload>, Option<Arc<SocketLb>>)> {
    // Without either capability nothing of it could load: say that, rather than the first
    // syscall's EPERM, and leave no directory behind in bpffs.
    let unprivileged = privilege::lacks_bpf_privilege();
    let offload = if matches!(config.datapath, DatapathMode::Copy | DatapathMode::Splice) {
        info!(
            "kernel offload off: --datapath {:?} keeps every byte in userspace",
            config.datapath
        );
        Ok(None)
    } else if let Some(why) = &unprivileged {
        Err(anyhow::anyhow!("{why}"))
    } else {
        KernelOffload::load(config.max_connections).map(Some)
    };
    let socket_lb = if config.socket_lb.mode == SocketLbMode::Off {
        info!("socket-level balancing off (--socket-lb off): tcp routes are served in userspace");
        // Off means off: programs an earlier agent pinned here would go on balancing.
        let pins = &config.socket_lb.pin_path;
        match socket_lb::uninstall(pins) {
            Ok(removed) if !removed.is_empty() => info!(
                "socket-level balancing off: detached the programs an earlier agent pinned \
                 under {} ({} pin(s) removed)",
                pins.display(),
                removed.len()
            ),
            Ok(_) => {}
            Err(e) => warn!(
                "socket-level balancing off, but what an earlier agent pinned under {} stays: \
                 {e:#}; run `router-agent uninstall --pin-path {}` as root",
                pins.display(),
                pins.display()
            ),
        }
        Ok(None)
    } else if let Some(why) = unprivileged {
        Err(anyhow::anyhow!("{why}"))
    } else {
        SocketLb::open(&config.socket_lb, &config.listen).map(|lb| Some(Arc::new(lb)))
    };
    if let (Err(e), DatapathMode::Sockmap) = (&offload, config.datapath) {
        bail!("--datapath sockmap needs the eBPF programs: {e:#}");
    }
    if let (Err(e), SocketLbMode::On) = (&socket_lb, config.socket_lb.mode) {
        bail!("--socket-lb on needs its eBPF programs: {e:#}");
    }
    match (&offload, &socket_lb) {
        (Err(e), Err(_)) => warn!(
            "kernel offload unavailable ({e:#}); forwarding everything in userspace, tcp routes \
             included (no socket-level balancing)"
        ),
        (Err(e), Ok(_)) => {
            warn!("kernel offload unavailable ({e:#}); forwarding everything in userspace");
        }
        (Ok(_), Err(e)) => warn!(
            "socket-level balancing unavailable ({e:#}); tcp routes are served by the userspace \
             listener only"
        ),
        (Ok(_), Ok(_)) => {}
    }
    if let Ok(Some(_)) = &offload {
        info!("kernel offload available: sk_skb stream verdict attached to the sockhash");
    }
    if let Ok(Some(lb)) = &socket_lb {
        info!(
            cgroup = %lb.cgroup().display(),
            "socket-level balancing loaded; it takes over the kernel maps once the agent is ready"
        );
    }
    Ok((offload.ok().flatten(), socket_lb.ok().flatten()))
}
