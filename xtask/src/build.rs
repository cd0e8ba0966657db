//! Builds: the eBPF object alone, the agent, the test backend, and the test run.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::cmd;

/// `cargo xtask build-ebpf`: the same nightly build aya-build runs from the agent's build script,
/// into `target/ebpf`. Returns the objects: the tunnel verdict program and socket-level
/// balancing.
pub fn ebpf() -> anyhow::Result<Vec<PathBuf>> {
    let root = cmd::workspace_root();
    let target_dir = root.join("target/ebpf");
    let status = Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            "router-ebpf",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(&target_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .current_dir(&root)
        .status()
        .context("could not start rustup; is the nightly toolchain installed?")?;
    if !status.success() {
        bail!("building router-ebpf failed ({status}); `cargo xtask setup` installs what it needs");
    }
    let objects = target_dir.join("bpfel-unknown-none/release");
    Ok(vec![objects.join("router"), objects.join("socket-lb")])
}

/// Release build of every host crate at once: the agent, the test backend, the tests.
///
/// One invocation over the default members keeps dependency features unified, so switching
/// between building, testing and the demo does not rebuild anything.
fn release_build() -> anyhow::Result<()> {
    cargo(&["build", "--release", "--bins", "--tests"])
}

/// The agent binary the demo and the end-to-end tests run.
pub fn agent() -> anyhow::Result<PathBuf> {
    release_build()?;
    Ok(cmd::workspace_root().join("target/release/router-agent"))
}

/// The end-to-end tests' HTTP backend, which goes into an image.
pub fn test_backend() -> anyhow::Result<PathBuf> {
    release_build()?;
    Ok(cmd::workspace_root().join("target/release/test-backend"))
}

/// `cargo xtask test`: the lints, then every test of the workspace, unit and end-to-end, one at
/// a time: the end-to-end tests share one Docker engine and two cores, and their timing
/// assertions need them quiet. The end-to-end tests are `#[ignore]`d so that a plain `cargo
/// test` (no root, no Docker) skips them; `--include-ignored` runs them here. Extra arguments
/// are passed to the test harness (a name filter, `--nocapture`).
pub fn test(extra: &[String]) -> anyhow::Result<()> {
    lint()?;
    let agent = agent()?;
    // One cluster serves one checkout's agent build at a time: a second checkout testing on
    // the same machine leaves it alone (and runs no cluster test) with this set.
    if std::env::var_os("ROUTER_SKIP_CLUSTER").is_none() {
        bring_up_cluster();
    }
    // Every test binary runs even after one fails, so that one run reports every failure.
    let mut args = vec![
        "test",
        "--release",
        "--no-fail-fast",
        "--",
        "--include-ignored",
        "--test-threads=1",
    ];
    args.extend(extra.iter().map(String::as_str));
    let status = Command::new("cargo")
        .args(&args)
        .env("ROUTER_AGENT_BIN", &agent)
        .current_dir(cmd::workspace_root())
        .status()
        .context("could not start cargo")?;
    if !status.success() {
        bail!("tests failed ({status})");
    }
    Ok(())
}

/// Formatting and clippy (warnings are errors), first: they fail in seconds, the suite in
/// minutes. Clippy checks the default members; the eBPF crate builds only for the BPF target.
fn lint() -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--check"]).context("run `cargo fmt --all` to format")?;
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])
}

/// The cluster tests need the Swarm (`cargo xtask cluster up`, which keeps one that is up).
/// It runs as a child under `timeout` so that a hung engine cannot hold the suite; if it fails,
/// the cluster tests fail saying so (or skip, on a machine that cannot host a cluster), and the
/// rest of the suite still runs.
fn bring_up_cluster() {
    const LIMIT_SECONDS: &str = "300";
    let up = std::env::current_exe().map(|xtask| {
        Command::new("timeout")
            .args(["--kill-after=10", LIMIT_SECONDS])
            .arg(xtask)
            .args(["cluster", "up"])
            .current_dir(cmd::workspace_root())
            .status()
    });
    match up {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => eprintln!(
            "test: `cargo xtask cluster up` failed ({status}; 124 = over {LIMIT_SECONDS} s): the \
             cluster tests will fail"
        ),
        Ok(Err(e)) | Err(e) => eprintln!("test: could not run `cargo xtask cluster up`: {e}"),
    }
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("cargo")
        .args(args)
        .current_dir(cmd::workspace_root())
        .status()
        .context("could not start cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
