//! `cargo xtask fuzz`: every cargo-fuzz target of `router-agent/fuzz` for a bounded time, on its
//! working corpus (`fuzz/corpus/<target>`, untracked) plus the tracked seeds
//! (`fuzz/seeds/<target>`). A crash, a hang or an out-of-memory input fails the command, naming
//! the target and the input libFuzzer saved under `fuzz/artifacts/<target>/`.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::cmd;

/// The version installed when `cargo fuzz` is missing; pinned so that CI builds the same tool.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Seconds one input may take before libFuzzer calls it a hang (its default is 20 minutes).
const INPUT_TIMEOUT_SECONDS: u64 = 10;

struct Target {
    name: &'static str,
    /// libFuzzer dictionary, relative to the fuzz directory.
    dict: Option<&'static str>,
}

const TARGETS: &[Target] = &[
    Target {
        name: "request_head",
        dict: Some("dict/http.dict"),
    },
    Target {
        name: "response_head",
        dict: Some("dict/http.dict"),
    },
    Target {
        name: "chunked",
        dict: None,
    },
];

pub fn run(seconds: u64) -> anyhow::Result<()> {
    ensure_cargo_fuzz()?;
    let fuzz_dir = cmd::workspace_root().join("router-agent/fuzz");
    std::env::set_current_dir(&fuzz_dir)
        .with_context(|| format!("cannot enter {}", fuzz_dir.display()))?;

    let mut failures = Vec::new();
    for target in TARGETS {
        println!(
            "fuzz: {} for {seconds} s (corpus/{0}, seeds/{0})",
            target.name
        );
        if let Err(e) = run_target(&fuzz_dir, target, seconds) {
            eprintln!("fuzz: {e:#}");
            failures.push(format!("{e:#}"));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} fuzz targets failed:\n  {}",
            failures.len(),
            TARGETS.len(),
            failures.join("\n  ")
        );
    }
    println!("fuzz: no crash in {} targets", TARGETS.len());
    Ok(())
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if cmd::succeeds("cargo", &["fuzz", "--version"]) {
        return Ok(());
    }
    println!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    cmd::run(
        "cargo",
        &[
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ],
    )
}

fn run_target(fuzz_dir: &Path, target: &Target, seconds: u64) -> anyhow::Result<()> {
    let name = target.name;
    let corpus = format!("corpus/{name}");
    fs::create_dir_all(&corpus).with_context(|| format!("cannot create {corpus}"))?;
    let seeds = format!("seeds/{name}");
    let artifact_dir = fuzz_dir.join("artifacts").join(name);
    let before = artifacts(&artifact_dir);

    let max_total_time = format!("-max_total_time={seconds}");
    let timeout = format!("-timeout={INPUT_TIMEOUT_SECONDS}");
    let dict = target.dict.map(|d| format!("-dict={d}"));
    let mut args = vec![
        "+nightly",
        "fuzz",
        "run",
        name,
        corpus.as_str(),
        seeds.as_str(),
        "--",
        max_total_time.as_str(),
        "-rss_limit_mb=2048",
        timeout.as_str(),
        "-print_final_stats=1",
    ];
    args.extend(dict.as_deref());

    let Err(error) = cmd::run("cargo", &args) else {
        return Ok(());
    };
    let found: Vec<PathBuf> = artifacts(&artifact_dir)
        .difference(&before)
        .cloned()
        .collect();
    if found.is_empty() {
        // No input was saved: the build failed, or libFuzzer could not start.
        return Err(error.context(format!("fuzz target `{name}` did not run")));
    }
    let shown: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "fuzz target `{name}` failed (crash, hang or out of memory) on {}; reproduce with `cargo +nightly fuzz run {name} {}` \
         in router-agent/fuzz (`cargo +nightly fuzz tmin {name} <file>` minimizes it)",
        shown.join(", "),
        shown[0]
    )
}

/// The files in a target's artifact directory (none when it does not exist yet).
fn artifacts(dir: &Path) -> BTreeSet<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default()
}
