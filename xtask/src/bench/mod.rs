//! `cargo xtask bench`: router-agent against `HAProxy`, nginx and no proxy at all, side by side on
//! this machine, in one run. A report, never a pass/fail test.
//!
//! Backends are containers (nginx serving fixed-size bodies, a TCP echo) on 198.18.0.0/15; every
//! contender listens on 127.0.0.1 and is started fresh for each measured run. Contenders are
//! interleaved (A B C, A B C, ...) over several rounds and the medians are reported, with
//! machine-wide CPU per request from /proc/stat (splice and sockmap forwarding runs in softirq
//! and kernel workers, outside the proxy's own CPU time) and the proxy's peak RSS. Results go to
//! `results/bench-<UTC time>.md` and `.svg` (`results/splice-sweep-<UTC time>.md` for
//! `--splice-sweep`, `results/pipe-sweep-<UTC time>.md` for `--pipe-sweep`).
//!
//! The `tcp-stream` and `tcp-connect` pair compares ways to serve a `tcp://` route: straight
//! to the backend, socket-level balancing (`router-socket-lb`: the kernel connects the client
//! to the backend), the router's userspace tunnel (splice) and `HAProxy` in `mode tcp`. For
//! them this process moves into a cgroup of its own (`cgroup`), where socket-level balancing
//! is attached.
mod backends;
mod cgroup;
mod connect;
mod contenders;
mod pingpong;
pub mod profile;
mod report;
mod system;
mod tunnel;
mod wrk;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use self::{
    backends::Backends,
    contenders::{Contender, Datapath, Protocol, Setup},
    report::{Measure, RunInfo, Sample},
    system::{CpuTimes, Machine},
};
use crate::{build, cmd, images};

/// The command line of `cargo xtask bench`.
pub struct Options {
    pub rounds: Option<u32>,
    pub duration: Option<u64>,
    /// Scenario names to run (all when empty).
    pub scenarios: Vec<String>,
    pub quick: bool,
    pub study: Study,
}

/// What a run compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Study {
    /// direct, `HAProxy`, nginx and router-agent in each datapath mode.
    Comparison,
    /// router copy against splice by body size: the splice threshold.
    SpliceSweep,
    /// router splice with pipes of several sizes: the pipe size.
    PipeSweep,
    /// router auto with and without the access log: what logging every request costs.
    AccessLogCost,
}

/// Pipe sizes of `--pipe-sweep`, in KiB (1024 is the agent's default).
const SWEEP_PIPE_KIB: [u32; 4] = [64, 256, 1024, 4096];

/// One load pattern.
#[derive(Debug, Clone)]
struct Scenario {
    name: String,
    kind: Kind,
    /// Compare contenders by MiB/s rather than requests/s.
    by_bytes: bool,
}

#[derive(Debug, Clone)]
enum Kind {
    Http {
        file: &'static str,
        connections: u32,
        close_each: bool,
    },
    Tunnel,
    /// Small messages echoed one at a time over a tunnel: latency per message.
    PingPong {
        websocket: bool,
    },
    /// The tunnel's stream through a `tcp://` route, for the tcp-route contenders.
    TcpStream,
    /// Connections per second through a `tcp://` route, one short exchange each.
    TcpConnect,
}

impl Kind {
    /// The `tcp-*` pair: served by the tcp-route contenders, from the bench's cgroup.
    fn is_tcp_route(&self) -> bool {
        matches!(self, Kind::TcpStream | Kind::TcpConnect)
    }
}

/// Ping-pong scenarios: connections, each with one message in flight.
const PINGPONG_CONNECTIONS: usize = 8;

/// Tunnel scenario: connections, and bytes each streams through the echo (and reads back).
const TUNNEL_CONNECTIONS: usize = 8;
const TUNNEL_BYTES: u64 = 64 * 1024 * 1024;
const TUNNEL_WARMUP_BYTES: u64 = 4 * 1024 * 1024;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn http(name: &str, file: &'static str, connections: u32, close_each: bool) -> Scenario {
    Scenario {
        name: name.into(),
        kind: Kind::Http {
            file,
            connections,
            close_each,
        },
        by_bytes: file == "1m",
    }
}

fn main_scenarios() -> Vec<Scenario> {
    vec![
        http("small-keepalive", "100b", 50, false),
        http("small-new-connection", "100b", 50, true),
        http("16k", "16k", 50, false),
        http("1m", "1m", 20, false),
        Scenario {
            name: "tunnel".into(),
            kind: Kind::Tunnel,
            by_bytes: true,
        },
        Scenario {
            name: "ws-small".into(),
            kind: Kind::PingPong { websocket: true },
            by_bytes: false,
        },
        Scenario {
            name: "tcp-small".into(),
            kind: Kind::PingPong { websocket: false },
            by_bytes: false,
        },
        Scenario {
            name: "tcp-stream".into(),
            kind: Kind::TcpStream,
            by_bytes: true,
        },
        Scenario {
            name: "tcp-connect".into(),
            kind: Kind::TcpConnect,
            by_bytes: false,
        },
    ]
}

fn sweep_scenarios(files: &[&'static str]) -> Vec<Scenario> {
    files
        .iter()
        .map(|file| http(&format!("sweep-{file}"), file, 20, false))
        .collect()
}

fn scenarios_of(study: Study) -> Vec<Scenario> {
    match study {
        Study::Comparison => main_scenarios(),
        Study::SpliceSweep => sweep_scenarios(&["4k", "16k", "64k", "256k", "1m"]),
        Study::PipeSweep => {
            let mut scenarios = sweep_scenarios(&["256k", "1m"]);
            scenarios.extend(main_scenarios().into_iter().filter(|s| s.name == "tunnel"));
            scenarios
        }
        Study::AccessLogCost => main_scenarios()
            .into_iter()
            .filter(|s| matches!(s.kind, Kind::Http { .. }))
            .collect(),
    }
}

fn contenders_for(scenario: &Scenario, study: Study) -> Vec<Contender> {
    use Contender::{Direct, Haproxy, Nginx, Router, RouterAccessLog, RouterPipe, RouterSocketLb};
    match study {
        Study::SpliceSweep => return vec![Router(Datapath::Copy), Router(Datapath::Splice)],
        Study::PipeSweep => return SWEEP_PIPE_KIB.into_iter().map(RouterPipe).collect(),
        Study::AccessLogCost => return vec![Router(Datapath::Auto), RouterAccessLog],
        Study::Comparison => {}
    }
    let routers: &[Datapath] = match scenario.kind {
        Kind::Http { .. } => &[Datapath::Copy, Datapath::Splice, Datapath::Auto],
        // Every tunnel path, and the one `auto` picks.
        Kind::Tunnel | Kind::PingPong { .. } => &[
            Datapath::Copy,
            Datapath::Splice,
            Datapath::Sockmap,
            Datapath::Auto,
        ],
        Kind::TcpStream | Kind::TcpConnect => {
            return vec![Direct, Haproxy, Router(Datapath::Splice), RouterSocketLb];
        }
    };
    let logging = matches!(scenario.kind, Kind::Http { .. }).then_some(RouterAccessLog);
    [Direct, Haproxy, Nginx]
        .into_iter()
        .chain(routers.iter().copied().map(Router))
        .chain(logging)
        .collect()
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let rounds = options
        .rounds
        .unwrap_or(if options.quick { 1 } else { 3 })
        .max(1);
    let duration = options
        .duration
        .unwrap_or(if options.quick { 2 } else { 5 })
        .max(1);
    let scenarios = select_scenarios(options)?;
    let root = cmd::workspace_root();
    let results = root.join("results");
    let tmp = results.join("tmp");
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let agent = prepare_agent(&tmp)?;
    let nginx_stream = contenders::nginx_stream_support();

    let mut notes = caveats(options.study);
    notes.extend(busy_warning(&agent)?);
    let mut backends = Backends::new(&contenders::pid_file(&tmp))?;
    if scenarios
        .iter()
        .any(|s| matches!(s.kind, Kind::Http { .. }))
    {
        println!("bench: starting 2 nginx replicas for {}", backends.domain);
        backends.start_replicas()?;
    }
    let plan: Vec<(Scenario, Vec<Contender>)> = scenarios
        .into_iter()
        .map(|s| {
            let contenders = contenders_for(&s, options.study);
            (s, contenders)
        })
        .collect();
    let total: usize = plan
        .iter()
        .map(|(s, c)| {
            c.iter()
                .filter(|&&c| unavailable(s, c, &nginx_stream).is_none())
                .count()
        })
        .sum::<usize>()
        * rounds as usize;
    println!(
        "bench: {total} runs ({rounds} round(s), {duration} s each plus warm-up and start-up); \
         keep this machine otherwise idle"
    );

    let mut samples = Vec::new();
    let mut steal = 0.0;
    let mut index = 0;
    for (scenario, contenders) in &plan {
        if !matches!(scenario.kind, Kind::Http { .. }) {
            println!(
                "bench: starting the TCP echo and whoami for {} and {}",
                backends.tunnel_domain, backends.whoami_domain
            );
            backends.start_echo()?;
        }
        // The load generator of the tcp-route pair runs in the bench's cgroup (every
        // contender alike), where the socket-LB contender attaches its programs.
        let cgroup = if scenario.kind.is_tcp_route() {
            match cgroup::BenchCgroup::enter() {
                Ok(cgroup) => Some(cgroup),
                Err(e) => {
                    println!("bench: no cgroup for socket-level balancing: {e:#}");
                    None
                }
            }
        } else {
            None
        };
        let setup = Setup {
            backends: &backends,
            tmp: &tmp,
            agent: &agent,
            nginx_stream: &nginx_stream,
            wrapper: &[],
            startup_timeout: Duration::from_secs(10),
            socket_lb_cgroup: cgroup.as_ref().map(|c| c.path.as_path()),
        };
        for round in 1..=rounds {
            for &contender in contenders {
                if unavailable(scenario, contender, &nginx_stream).is_some() {
                    continue;
                }
                index += 1;
                let progress = format!(
                    "bench [{index}/{total}] {} round {round}/{rounds} {}:",
                    scenario.name,
                    contender.name()
                );
                let sample = run_one(contender, scenario, &setup, duration, &progress);
                if let Ok(measure) = &sample.outcome {
                    steal += measure.steal;
                }
                samples.push(sample);
            }
        }
    }
    drop(backends);

    let mut rows = report::aggregate(&samples);
    add_unavailable_rows(&mut rows, &plan, &nginx_stream);
    let info = RunInfo {
        title: match options.study {
            Study::SpliceSweep => {
                "router-agent splice sweep: --datapath copy vs splice by body size".into()
            }
            Study::PipeSweep => "router-agent pipe sweep: --datapath splice by pipe size".into(),
            Study::AccessLogCost => {
                "router-agent access-log cost: --datapath auto, access log off vs on".into()
            }
            Study::Comparison => {
                "router-agent benchmark: direct, HAProxy, nginx, router-agent".into()
            }
        },
        command: command_line(),
        machine: Machine::read(),
        revision: revision(&root),
        rounds,
        duration,
        elapsed: started.elapsed(),
        steal_seconds: steal,
        notes,
    };
    let stamp = cmd::output("date", &["-u", "+%Y%m%dT%H%M%SZ"])?;
    if options.study == Study::Comparison {
        let markdown = report::markdown(&info, &rows);
        let md_path = results.join(format!("bench-{stamp}.md"));
        let svg_path = results.join(format!("bench-{stamp}.svg"));
        write(&md_path, &markdown)?;
        let title = format!(
            "Throughput relative to HAProxy (median of {rounds} round(s), {} CPUs)",
            info.machine.cpus
        );
        write(&svg_path, &report::svg(&title, &rows))?;
        println!(
            "\n{markdown}\nbench: wrote {} and {}",
            md_path.display(),
            svg_path.display()
        );
    } else {
        let (markdown, name) = match options.study {
            Study::SpliceSweep => (report::sweep_markdown(&info, &rows), "splice-sweep"),
            Study::AccessLogCost => (report::access_log_markdown(&info, &rows), "access-log"),
            _ => (report::pipe_sweep_markdown(&info, &rows), "pipe-sweep"),
        };
        let path = results.join(format!("{name}-{stamp}.md"));
        write(&path, &markdown)?;
        println!("\n{markdown}\nbench: wrote {}", path.display());
    }
    let elapsed = started.elapsed().as_secs();
    println!("bench: took {}m{:02}s", elapsed / 60, elapsed % 60);
    Ok(())
}

fn select_scenarios(options: &Options) -> anyhow::Result<Vec<Scenario>> {
    let all = scenarios_of(options.study);
    for scenario in &all {
        if let Kind::Http { file, .. } = scenario.kind
            && !images::BENCH_BODIES.iter().any(|(name, _)| *name == file)
        {
            bail!(
                "scenario {} asks for /{file}, which images.rs does not put in the nginx image",
                scenario.name
            );
        }
    }
    if options.scenarios.is_empty() {
        return Ok(all);
    }
    let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
    for wanted in &options.scenarios {
        if !names.contains(&wanted.as_str()) {
            bail!(
                "unknown scenario `{wanted}`; choose from {}",
                names.join(", ")
            );
        }
    }
    Ok(all
        .into_iter()
        .filter(|s| options.scenarios.contains(&s.name))
        .collect())
}

/// Why `contender` cannot run `scenario` here, if it cannot.
fn unavailable(
    scenario: &Scenario,
    contender: Contender,
    nginx_stream: &Result<String, String>,
) -> Option<String> {
    match (&scenario.kind, contender, nginx_stream) {
        (Kind::Tunnel | Kind::PingPong { websocket: false }, Contender::Nginx, Err(reason)) => {
            Some(format!("this nginx cannot proxy raw TCP: {reason}"))
        }
        (Kind::PingPong { websocket: true }, Contender::Nginx, _) => {
            Some("not configured for WebSocket upgrades in this benchmark".into())
        }
        _ => None,
    }
}

/// Adds an n/a row for every contender that could not take part, at its place in the plan.
fn add_unavailable_rows(
    rows: &mut Vec<report::Row>,
    plan: &[(Scenario, Vec<Contender>)],
    nginx_stream: &Result<String, String>,
) {
    for (scenario, contenders) in plan {
        for (i, &contender) in contenders.iter().enumerate() {
            let Some(reason) = unavailable(scenario, contender, nginx_stream) else {
                continue;
            };
            // Insert after the previous contender of the same scenario, or at the scenario's start.
            let before: Vec<String> = contenders[..i].iter().map(|c| c.name()).collect();
            let at = rows
                .iter()
                .rposition(|r| r.scenario == scenario.name && before.contains(&r.contender))
                .map(|p| p + 1)
                .or_else(|| rows.iter().position(|r| r.scenario == scenario.name))
                .unwrap_or(rows.len());
            rows.insert(
                at,
                report::Row {
                    scenario: scenario.name.clone(),
                    contender: contender.name(),
                    unavailable: Some(reason),
                    ..report::Row::default()
                },
            );
        }
    }
}

/// A warning for the report when the machine is busy with other work before the benchmark.
fn busy_warning(agent: &Path) -> anyhow::Result<Option<String>> {
    let background = system::background_busy()?;
    let other_agents = system::other_agents(agent);
    if background <= 0.15 && other_agents.is_empty() {
        return Ok(None);
    }
    let mut warning = format!(
        "the machine was not idle at the start: {:.0} % of its CPU busy with other work",
        background * 100.0
    );
    if !other_agents.is_empty() {
        let _ = write!(
            warning,
            ", router-agent processes {other_agents:?} not started by the bench (tests?)"
        );
    }
    println!("bench: warning: {warning}; results will be noisier than they should be");
    Ok(Some(format!("Warning: {warning}.")))
}

/// One run, with its progress line, noting router-agents of others seen around it.
fn run_one(
    contender: Contender,
    scenario: &Scenario,
    setup: &Setup<'_>,
    duration: u64,
    progress_prefix: &str,
) -> Sample {
    let before = system::other_agents(setup.agent);
    let outcome = measure(contender, scenario, setup, duration);
    let mut others = system::other_agents(setup.agent);
    others.extend(before);
    others.sort_unstable();
    others.dedup();
    let disturbed = (!others.is_empty())
        .then(|| format!("router-agent processes {others:?} not started by the bench"));
    match &outcome {
        Ok(m) => {
            let note = disturbed
                .as_ref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            println!("{progress_prefix} {}{note}", progress(m));
        }
        Err(e) => println!("{progress_prefix} FAILED: {e:#}"),
    }
    Sample {
        scenario: scenario.name.clone(),
        contender: contender.name(),
        is_router: contender.is_router(),
        by_bytes: scenario.by_bytes,
        outcome: outcome.map_err(|e| format!("{e:#}")),
        disturbed,
    }
}

/// One measured run: start the contender, warm up, measure, read its peak RSS, stop it.
fn measure(
    contender: Contender,
    scenario: &Scenario,
    setup: &Setup<'_>,
    duration: u64,
) -> anyhow::Result<Measure> {
    let protocol = match scenario.kind {
        Kind::Http { .. } => Protocol::Http,
        Kind::Tunnel | Kind::TcpStream | Kind::PingPong { websocket: false } => Protocol::Tunnel,
        Kind::PingPong { websocket: true } => Protocol::WebSocket,
        Kind::TcpConnect => Protocol::Whoami,
    };
    let mut running = contenders::start(contender, protocol, setup)?;
    match scenario.kind {
        Kind::Http {
            file,
            connections,
            close_each,
        } => {
            let url = format!("http://{}/{file}", running.target);
            let mut load = wrk::Load {
                url: &url,
                host: &setup.backends.domain,
                connections,
                duration: Duration::from_secs(1),
                close_each,
            };
            wrk::run(&load).context("warm-up")?;
            running.check_alive()?;
            load.duration = Duration::from_secs(duration);
            let counters_before = running.counters()?;
            let cpu_before = CpuTimes::now()?;
            let result = wrk::run(&load)?;
            let cpu = CpuTimes::now()?.since(cpu_before);
            running.check_alive()?;
            if result.requests == 0 {
                bail!("wrk completed no request");
            }
            let counters = running.counters()?;
            let errors = result.non_2xx + result.socket_errors;
            let measure = Measure {
                requests_per_sec: Some(result.requests_per_sec),
                bytes_per_sec: result.bytes_per_sec,
                p50: Some(result.p50),
                p99: Some(result.p99),
                cpu_per_unit: cpu.busy / result.requests as f64,
                peak_rss: running.peak_rss(),
                errors,
                error_detail: (errors > 0).then(|| {
                    format!(
                        "{} non-2xx/3xx responses and {} socket errors in {} requests",
                        result.non_2xx, result.socket_errors, result.requests
                    )
                }),
                counters: counters.zip(counters_before).map(|(a, b)| a.since(b)),
                steal: cpu.steal,
                ..Measure::default()
            };
            Ok(measure)
        }
        Kind::TcpConnect => measure_connects(&mut running, duration),
        Kind::Tunnel | Kind::TcpStream => {
            let target = running.target;
            tunnel::run(target, TUNNEL_CONNECTIONS, TUNNEL_WARMUP_BYTES).context("warm-up")?;
            running.check_alive()?;
            let counters_before = running.counters()?;
            let kernel_before = running.kernel_connects()?;
            let proxy_before = running.cpu_seconds();
            let cpu_before = CpuTimes::now()?;
            let started = std::time::Instant::now();
            let result = tunnel::run(target, TUNNEL_CONNECTIONS, TUNNEL_BYTES)?;
            let cpu = CpuTimes::now()?.since(cpu_before);
            let wall = started.elapsed().as_secs_f64();
            let proxy_cpu = running
                .cpu_seconds()
                .zip(proxy_before)
                .map(|(after, before)| (after - before) / wall);
            let kernel_connects = running
                .kernel_connects()?
                .zip(kernel_before)
                .map(|(after, before)| after - before);
            running.check_alive()?;
            if result.bytes == 0 {
                bail!(
                    "no byte came back through {target}: {}",
                    result.first_failure.unwrap_or_default()
                );
            }
            let counters = running.counters()?;
            let measure = Measure {
                requests_per_sec: None,
                bytes_per_sec: result.bytes_per_sec(),
                p50: None,
                p99: None,
                cpu_per_unit: cpu.busy / (result.bytes as f64 / GIB),
                peak_rss: running.peak_rss(),
                errors: result.failed,
                error_detail: result.first_failure.map(|reason| {
                    format!(
                        "{} of {TUNNEL_CONNECTIONS} connections failed: {reason}",
                        result.failed
                    )
                }),
                counters: counters.zip(counters_before).map(|(a, b)| a.since(b)),
                steal: cpu.steal,
                proxy_cpu: proxy_cpu.filter(|_| scenario.kind.is_tcp_route()),
                kernel_connects,
            };
            Ok(measure)
        }
        Kind::PingPong { websocket } => {
            let framing = if websocket {
                pingpong::Framing::WebSocket {
                    host: setup.backends.ws_domain.clone(),
                }
            } else {
                pingpong::Framing::Raw
            };
            let target = running.target;
            pingpong::run(
                target,
                PINGPONG_CONNECTIONS,
                Duration::from_secs(1),
                &framing,
            )
            .context("warm-up")?;
            running.check_alive()?;
            let counters_before = running.counters()?;
            let cpu_before = CpuTimes::now()?;
            let result = pingpong::run(
                target,
                PINGPONG_CONNECTIONS,
                Duration::from_secs(duration),
                &framing,
            )?;
            let cpu = CpuTimes::now()?.since(cpu_before);
            running.check_alive()?;
            if result.messages() == 0 {
                bail!(
                    "no message came back through {target}: {}",
                    result.first_failure.unwrap_or_default()
                );
            }
            let counters = running.counters()?;
            Ok(Measure {
                requests_per_sec: Some(result.messages_per_sec()),
                bytes_per_sec: result.bytes_per_sec(),
                p50: result.percentile(0.50),
                p99: result.percentile(0.99),
                cpu_per_unit: cpu.busy / result.messages() as f64,
                peak_rss: running.peak_rss(),
                errors: result.failed,
                error_detail: result.first_failure.map(|reason| {
                    format!(
                        "{} of {PINGPONG_CONNECTIONS} connections failed: {reason}",
                        result.failed
                    )
                }),
                counters: counters.zip(counters_before).map(|(a, b)| a.since(b)),
                steal: cpu.steal,
                proxy_cpu: None,
                kernel_connects: None,
            })
        }
    }
}

/// `tcp-connect`: connections per second through the contender, each with one short exchange.
fn measure_connects(running: &mut contenders::Running, duration: u64) -> anyhow::Result<Measure> {
    let target = running.target;
    connect::run(target, Duration::from_secs(1)).context("warm-up")?;
    running.check_alive()?;
    let kernel_before = running.kernel_connects()?;
    let proxy_before = running.cpu_seconds();
    let cpu_before = CpuTimes::now()?;
    let result = connect::run(target, Duration::from_secs(duration))?;
    let cpu = CpuTimes::now()?.since(cpu_before);
    let wall = result.elapsed.as_secs_f64();
    let proxy_cpu = running
        .cpu_seconds()
        .zip(proxy_before)
        .map(|(after, before)| (after - before) / wall);
    running.check_alive()?;
    if result.connections == 0 {
        bail!(
            "no connection through {target} completed: {}",
            result.first_failure.unwrap_or_default()
        );
    }
    let kernel_connects = running
        .kernel_connects()?
        .zip(kernel_before)
        .map(|(after, before)| after - before);
    let per_sec = result.per_sec();
    let mut error_detail = result.first_failure.map(|reason| {
        format!(
            "{} of {} connections failed: {reason}",
            result.failed,
            result.connections + result.failed
        )
    });
    // The socket-LB row must come from the kernel path, not the listener behind it.
    if let Some(kernel) = kernel_connects
        && kernel < result.connections
    {
        error_detail.get_or_insert_with(|| {
            format!(
                "only {kernel} of {} connections were balanced in the kernel",
                result.connections
            )
        });
    }
    Ok(Measure {
        requests_per_sec: Some(per_sec),
        bytes_per_sec: 0.0,
        p50: Some(result.p50),
        p99: Some(result.p99),
        cpu_per_unit: cpu.busy / result.connections as f64,
        peak_rss: running.peak_rss(),
        errors: result.failed,
        error_detail,
        counters: None,
        steal: cpu.steal,
        proxy_cpu,
        kernel_connects,
    })
}

fn progress(m: &Measure) -> String {
    let mib = m.bytes_per_sec / (1024.0 * 1024.0);
    let mut line = match (m.requests_per_sec, m.p99) {
        (Some(rps), Some(p99)) => format!(
            "{rps:.0} req/s, {mib:.1} MiB/s, p99 {:.2} ms, CPU {:.1} µs/req",
            p99 * 1e3,
            m.cpu_per_unit * 1e6
        ),
        _ => format!("{mib:.1} MiB/s, CPU {:.2} s/GiB", m.cpu_per_unit),
    };
    if m.errors > 0 {
        let _ = write!(line, ", {} errors", m.errors);
    }
    line
}

/// Builds the release agent and copies it aside, so a rebuild during the benchmark (someone
/// else working in the tree) cannot swap the binary between runs.
fn prepare_agent(tmp: &Path) -> anyhow::Result<PathBuf> {
    println!("bench: building the release agent");
    let built = build::agent()?;
    let copy = tmp.join("router-agent");
    fs::copy(&built, &copy).with_context(|| {
        format!(
            "copying {} to {}; did the release build succeed?",
            built.display(),
            copy.display()
        )
    })?;
    Ok(copy)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `cargo xtask bench ...` as typed (cargo's alias runs xtask with the same arguments).
fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo xtask {}", args.join(" "))
}

fn revision(root: &Path) -> String {
    let root = root.to_str().unwrap_or(".");
    let head = cmd::output("git", &["-C", root, "rev-parse", "--short", "HEAD"])
        .unwrap_or_else(|_| "unknown".into());
    let dirty = cmd::output(
        "git",
        &[
            "-C",
            root,
            "status",
            "--porcelain",
            "--",
            "router-agent",
            "router-ebpf",
            "router-common",
        ],
    )
    .is_ok_and(|s| !s.is_empty());
    if dirty {
        format!("{head} + uncommitted changes (router-agent/, router-ebpf/ or router-common/)")
    } else {
        head
    }
}

fn caveats(study: Study) -> Vec<String> {
    let sweep = study != Study::Comparison;
    let mut notes = vec![
        "One machine does everything: wrk (2 threads), the backends and the proxy share its \
         CPUs, so the numbers compare contenders with each other; they are not any proxy's \
         capacity."
            .to_owned(),
        "CPU per request is machine-wide busy time over the measured run divided by the \
         requests (tunnel: by GiB moved, both directions), so it includes wrk, the backends \
         and background work, equally for every contender."
            .to_owned(),
        "MiB = 2^20 bytes (wrk's unit); HTTP MiB/s counts response heads too. Peak RSS is \
         VmHWM summed over the proxy's processes (nginx master and workers), for a process \
         started fresh for the run (warm-up included)."
            .to_owned(),
    ];
    if !sweep {
        notes.push(
            "The `direct` row (wrk straight to one nginx replica or to the echo) is the floor \
             of that CPU figure and the ceiling of throughput."
                .to_owned(),
        );
    }
    let maxconn = contenders::haproxy_maxconn();
    if !sweep && maxconn < 20_000 {
        notes.push(format!(
            "haproxy runs with `maxconn {maxconn}` instead of 20000: this machine's open-files \
             hard limit is too low for 20000 (no effect at 50 connections)."
        ));
    }
    if !sweep {
        notes.push(
            "haproxy and router-agent answer with a Set-Cookie (sticky sessions); nginx does not. \
             nginx runs with default proxy buffering."
                .to_owned(),
        );
    }
    notes
}
