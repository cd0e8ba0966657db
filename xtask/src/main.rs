//! Developer workflows: `cargo xtask <command>`.
//!
//! Every workflow starts with the idempotent `setup` so that one command works on a bare machine:
//! it installs what is missing and does nothing when all is present.
mod bench;
mod build;
mod cluster;
mod cmd;
mod demo;
mod dockerd;
mod fuzz;
mod images;
mod setup;
mod soak;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "router workspace tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what a fresh machine lacks (apt packages, nightly rust-src, bpf-linker), start
    /// dockerd on the 198.18.0.0/16 range and build the local images.
    Setup,
    /// Build the eBPF object alone (nightly, bpfel-unknown-none) and print its path.
    BuildEbpf,
    /// Run the seed example: the agent, two `restserver` replicas behind `restserver.local`, and
    /// a `restclient` container whose output is shown.
    Demo {
        /// How long to let the client run, in seconds.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
    },
    /// Build the agent's container image, router-agent:latest, from the release binary (what
    /// deploy/compose.yml and deploy/stack.yml run).
    Image,
    /// A real multi-node Docker Swarm on this machine: dockerd nodes in network namespaces,
    /// running the agent stack.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Check formatting and clippy (`-D warnings`), then run every test: unit tests, the
    /// in-process proxy tests, and the end-to-end suite against the real dockerd (and the
    /// cluster, which it brings up).
    Test {
        /// Extra arguments for the test harness (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmark router-agent (each --datapath mode) against haproxy (configured as acsrouting
    /// was), nginx as a reverse proxy, and no proxy at all, side by side on this machine; writes
    /// a Markdown table and an SVG chart under results/. A report, never a pass/fail test.
    Bench {
        /// Measured runs per contender and scenario (contenders interleaved; medians shown).
        /// Default 3 (1 with --quick).
        #[arg(long)]
        rounds: Option<u32>,
        /// Seconds per measured wrk run (after a 1 s warm-up). Default 5 (2 with --quick).
        #[arg(long)]
        duration: Option<u64>,
        /// Only these scenarios, comma-separated: small-keepalive, small-new-connection, 16k,
        /// 1m, tunnel, tcp-stream, tcp-connect (with --splice-sweep: sweep-4k, sweep-16k, sweep-64k, sweep-256k,
        /// sweep-1m; with --pipe-sweep: sweep-256k, sweep-1m, tunnel).
        #[arg(long, value_delimiter = ',')]
        scenarios: Vec<String>,
        /// Smoke run: 1 round of 2 s per contender.
        #[arg(long)]
        quick: bool,
        /// Instead of the comparison: router --datapath copy vs splice for bodies of 4 KiB to
        /// 1 MiB, to choose the splice threshold.
        #[arg(long, conflicts_with = "pipe_sweep")]
        splice_sweep: bool,
        /// Instead of the comparison: router --datapath splice with pipes of 64 KiB to 4 MiB,
        /// for 256 KiB and 1 MiB bodies and the tunnel, to choose the pipe size.
        #[arg(long)]
        pipe_sweep: bool,
        /// Instead of the comparison: router --datapath auto with the access log off and
        /// written to a file, for the HTTP scenarios: what logging every request costs.
        #[arg(long, conflicts_with_all = ["splice_sweep", "pipe_sweep"])]
        access_log_cost: bool,
    },
    /// Repeat the concurrent kernel-tunnel test (8 tunnels x 48 MiB each way through
    /// `--datapath sockmap`) and count the runs in which a byte was lost or delivered twice.
    SoakTunnels {
        /// How many runs (at most 1000).
        #[arg(long, default_value_t = 200)]
        runs: u32,
        /// Keep every CPU busy with a spinning process beside the test (the defect hunted here
        /// depends on load); same as `--hogs-per-cpu 1`.
        #[arg(long)]
        hog: bool,
        /// Spinning processes per CPU beside the test (more contention than `--hog`).
        #[arg(long)]
        hogs_per_cpu: Option<u32>,
        /// Go on after a failing run instead of stopping at the first.
        #[arg(long)]
        keep_going: bool,
        /// The test to repeat.
        #[arg(
            long,
            default_value = "eight_concurrent_tunnels_under_load_deliver_every_byte"
        )]
        test: String,
    },
    /// Count the userspace instructions per request of router-agent and haproxy with valgrind's
    /// callgrind under the same wrk load; writes results/callgrind-<time>.md. Deterministic
    /// where the benchmark's timings are noisy.
    Profile {
        /// How long wrk loads each proxy while callgrind counts.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Run each cargo-fuzz target of router-agent (HTTP request and response heads, chunked
    /// bodies) for a bounded time; fails naming the target and the saved input on a crash.
    Fuzz {
        /// How long to fuzz each target, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Start the nodes, form the Swarm, load the local images, deploy the agent stack, and
    /// print `node<i> DOCKER_HOST=.. NETNS=.. ADDR=..` per node. Idempotent.
    Up {
        /// How many nodes (1 to 8). Default: those of the cluster that is up, else 3.
        #[arg(long)]
        nodes: Option<usize>,
        /// How many of the nodes are Swarm managers, the others being workers. Default: those
        /// of the cluster that is up, else 1.
        #[arg(long)]
        managers: Option<usize>,
    },
    /// Remove everything `up` made: engines, containers, namespaces, bridge, firewall rule, state.
    Down,
    /// The seed's example on the cluster: two `restserver` replicas on two nodes and a
    /// `restclient` on a third, deployed as a stack; prints which replicas answered.
    Demo {
        /// How long to let the client run, in seconds.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::BuildEbpf => build::ebpf().map(|paths| {
            for path in paths {
                println!("{}", path.display());
            }
        }),
        Command::Demo { seconds } => {
            setup::run()?;
            demo::run(seconds)
        }
        Command::Image => {
            setup::run()?;
            images::ensure_agent(&build::agent()?)
        }
        Command::Cluster {
            action: ClusterAction::Up { nodes, managers },
        } => {
            setup::run()?;
            images::ensure_agent(&build::agent()?)?;
            cluster::up(&cluster::Options { nodes, managers })
        }
        Command::Cluster {
            action: ClusterAction::Down,
        } => cluster::down(),
        Command::Cluster {
            action: ClusterAction::Demo { seconds },
        } => {
            setup::run()?;
            images::ensure_agent(&build::agent()?)?;
            cluster::demo(seconds)
        }
        Command::Test { args } => {
            setup::run()?;
            build::test(&args)
        }
        Command::Bench {
            rounds,
            duration,
            scenarios,
            quick,
            splice_sweep,
            pipe_sweep,
            access_log_cost,
        } => {
            setup::run()?;
            let study = if splice_sweep {
                bench::Study::SpliceSweep
            } else if pipe_sweep {
                bench::Study::PipeSweep
            } else if access_log_cost {
                bench::Study::AccessLogCost
            } else {
                bench::Study::Comparison
            };
            bench::run(&bench::Options {
                rounds,
                duration,
                scenarios,
                quick,
                study,
            })
        }
        Command::SoakTunnels {
            runs,
            hog,
            hogs_per_cpu,
            keep_going,
            test,
        } => {
            setup::run()?;
            soak::run(&soak::Options {
                runs,
                hogs_per_cpu: hogs_per_cpu.unwrap_or(u32::from(hog)),
                keep_going,
                test,
            })
        }
        Command::Profile { seconds } => {
            setup::run()?;
            bench::profile::run(seconds)
        }
        Command::Fuzz { seconds } => {
            setup::run()?;
            fuzz::run(seconds)
        }
    }
}
