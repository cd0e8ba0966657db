//! `cargo xtask soak-tunnels`: runs the concurrent kernel-tunnel test over and over, optionally
//! with every CPU kept busy, and counts the runs that lost or duplicated bytes.
//!
//! The defect this hunts (a tunnel delivering a run of bytes twice) showed up in about one run in
//! 20 to 60, and only with the CPUs busy, so a single pass of the test says little. Each run is a
//! separate test process (a fresh agent and backend); the log of each failing run is kept under
//! `target/soak/`.
use std::{
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{build, cmd};

pub struct Options {
    /// Runs to make (at most [`MAX_RUNS`]).
    pub runs: u32,
    /// Busy loops per CPU to keep running beside the test (0: none).
    pub hogs_per_cpu: u32,
    /// Go on after a failing run (default: stop at the first).
    pub keep_going: bool,
    /// The test to repeat (a name filter).
    pub test: String,
}

/// Bound on one soak, so that a typo cannot keep a shared machine busy for a day.
pub const MAX_RUNS: u32 = 1000;
/// One run of the test is a few tens of seconds; past this it is hung and counts as failed.
const RUN_LIMIT_SECONDS: &str = "300";

pub fn run(options: &Options) -> anyhow::Result<()> {
    if options.runs == 0 || options.runs > MAX_RUNS {
        bail!("--runs must be between 1 and {MAX_RUNS}");
    }
    let agent = build::agent()?;
    let root = cmd::workspace_root();
    let logs = root.join("target/soak");
    std::fs::create_dir_all(&logs).context("creating target/soak")?;
    let _hogs = (options.hogs_per_cpu > 0)
        .then(|| Hogs::start(options.hogs_per_cpu))
        .transpose()?;
    let mut failures = Vec::new();
    let mut durations = Vec::new();
    for i in 1..=options.runs {
        let started = Instant::now();
        let output = Command::new("timeout")
            .args([
                "--kill-after=10",
                RUN_LIMIT_SECONDS,
                "cargo",
                "test",
                "--release",
                "-p",
            ])
            .args(["tests", "--test", "tunnels", "--", "--include-ignored"])
            .args(["--test-threads=1", "--nocapture", &options.test])
            .env("ROUTER_AGENT_BIN", &agent)
            .current_dir(&root)
            .stdin(Stdio::null())
            .output()
            .context("could not start cargo test")?;
        let elapsed = started.elapsed();
        durations.push(elapsed);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load = load.split_whitespace().next().unwrap_or("?");
        let overlaps = overlap_counters(&text);
        if output.status.success() && text.contains("test result: ok. 1 passed") {
            println!(
                "soak: run {i}/{}: ok in {:.1} s (load {load}){overlaps}",
                options.runs,
                elapsed.as_secs_f64()
            );
            continue;
        }
        let log = logs.join(format!("run-{i}-{}.log", std::process::id()));
        std::fs::write(&log, &text).context("writing the run's log")?;
        let reason = text
            .lines()
            .skip_while(|line| !line.contains("panicked at"))
            .nth(1)
            .unwrap_or("no panic message (see the log)");
        println!(
            "soak: run {i}/{}: FAILED in {:.1} s (load {load}){overlaps}: {reason}\n      log: {}",
            options.runs,
            elapsed.as_secs_f64(),
            log.display()
        );
        failures.push(i);
        if !options.keep_going {
            break;
        }
    }
    durations.sort();
    let median = durations[durations.len() / 2];
    println!(
        "soak: {} run(s), {} failed{}; median run {:.1} s; {} busy loop(s) per CPU",
        durations.len(),
        failures.len(),
        if failures.is_empty() {
            String::new()
        } else {
            format!(" (runs {failures:?})")
        },
        median.as_secs_f64(),
        options.hogs_per_cpu
    );
    if failures.is_empty() {
        Ok(())
    } else {
        bail!("{} of {} runs failed", failures.len(), durations.len())
    }
}

/// The agent's overlap counters, from the datapath line the test prints at its end (the
/// segments the verdict program found overlapping bytes it had already forwarded).
fn overlap_counters(text: &str) -> String {
    let number = |key: &str| {
        let at = text.rfind(&format!("\"{key}\":"))? + key.len() + 3;
        let digits: String = text[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse::<u64>().ok()
    };
    match (
        number("tunnel_overlaps_cut"),
        number("tunnel_overlap_bytes_cut"),
    ) {
        (Some(segments), Some(bytes)) => format!(", overlapping segments {segments} ({bytes} B)"),
        _ => String::new(),
    }
}

/// Spins; every 200000 iterations (well under a second) exits if process `$1` is gone.
const HOG_SCRIPT: &str =
    "while kill -0 \"$1\" 2>/dev/null; do i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; done";

/// Busy loops, stopped (by pid) when dropped.
struct Hogs(Vec<Child>);

impl Hogs {
    fn start(per_cpu: u32) -> anyhow::Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(2, usize::from);
        let count = cpus * per_cpu as usize;
        let hogs = (0..count)
            .map(|_| {
                // The loop checks now and then that xtask still runs, so that an interrupted
                // soak leaves no hog behind.
                Command::new("sh")
                    .args(["-c", HOG_SCRIPT])
                    .arg("hog")
                    .arg(std::process::id().to_string())
                    .stdin(Stdio::null())
                    .spawn()
                    .context("starting a CPU hog")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        println!("soak: {count} busy loop(s) running beside the test ({cpus} CPUs)");
        Ok(Self(hogs))
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for hog in &mut self.0 {
            let _ = hog.kill();
            let _ = hog.wait();
        }
    }
}
