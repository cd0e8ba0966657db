//! `cargo xtask setup`: make a bare Debian 12 machine able to build, demo and test the router.
//!
//! Each step checks first and does nothing when its part is present, so every workflow can call
//! it.
use std::path::Path;

use anyhow::Context as _;

use crate::{cmd, dockerd, images};

/// Debian packages the build, the tests and the benchmarks use.
const APT_PACKAGES: &[&str] = &[
    // bpf-linker must link against the LLVM of the nightly rustc (22).
    "llvm-22-dev",
    "libpolly-22-dev",
    "docker.io",
    "docker-compose",
    "iptables",
    "iproute2",
    "busybox-static",
    "tini",
    "curl",
    // The TLS tests make their certificates, and drive WebSocket over TLS, with it.
    "openssl",
    "wrk",
    "haproxy",
    "nginx-light",
    "bpftool",
    "procps",
    // `cargo xtask profile`: callgrind's instruction counts.
    "valgrind",
    // The dashboard test renders the admin page in a real headless browser.
    "chromium",
];

pub fn run() -> anyhow::Result<()> {
    install_packages()?;
    install_rust_parts()?;
    dockerd::ensure_running()?;
    images::ensure_built()?;
    Ok(())
}

fn install_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !package_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing {}", missing.join(" "));
    // Keep package scripts from starting services (dockerd, nginx, haproxy): we start what we
    // need ourselves, with our own flags.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let created_policy = !policy.exists();
    if created_policy {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")
            .context("writing policy-rc.d; are you root?")?;
        cmd::run("chmod", &["+x", "/usr/sbin/policy-rc.d"])?;
    }
    let result = apt_install(&missing);
    if created_policy {
        let _ = std::fs::remove_file(policy);
    }
    result
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    // SAFETY of env: xtask is single-threaded here.
    unsafe { std::env::set_var("DEBIAN_FRONTEND", "noninteractive") };
    cmd::run("apt-get", &["update", "-q"]).context("apt-get update failed; are you root?")?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(packages);
    cmd::run("apt-get", &args)
}

fn package_installed(pkg: &str) -> bool {
    cmd::output("dpkg-query", &["-W", "-f=${Status}", pkg])
        .is_ok_and(|status| status == "install ok installed")
}

fn install_rust_parts() -> anyhow::Result<()> {
    let components = cmd::output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if !components.lines().any(|c| c.starts_with("rust-src")) {
        println!("setup: adding rust-src to the nightly toolchain");
        // `component add`, not `toolchain install`: the latter could move nightly to a newer
        // rustc whose LLVM no longer matches bpf-linker's.
        cmd::run(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    // `cargo xtask test` lints first.
    if !cmd::succeeds("cargo", &["clippy", "--version"])
        || !cmd::succeeds("cargo", &["fmt", "--version"])
    {
        println!("setup: adding clippy and rustfmt to the default toolchain");
        cmd::run("rustup", &["component", "add", "clippy", "rustfmt"])?;
    }
    if !cmd::succeeds("bpf-linker", &["--version"]) {
        println!("setup: building bpf-linker against LLVM 22 (about 5 minutes)");
        let status = std::process::Command::new("cargo")
            .args([
                "install",
                // The version verified with LLVM 22 here.
                "bpf-linker@0.13.0",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .status()
            .context("could not start cargo")?;
        anyhow::ensure!(status.success(), "installing bpf-linker failed ({status})");
    }
    Ok(())
}
